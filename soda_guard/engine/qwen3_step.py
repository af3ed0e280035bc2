"""A Qwen3 causal LM's decode step, and its prefill on top of a cached prefix, without
`transformers`' per-call machinery.

On CPU with a small judge, the decorated `forward` (output capture, config merging, mask
building, keyword plumbing through every layer) and even plain `nn.Module` calls cost more than
the arithmetic of one token (benchmarks/RESULTS.md). `LeanQwen3` holds the model's own weights
and runs the arithmetic of `Qwen3ForCausalLM.forward` with SDPA attention as functional ops. The
decode step takes the same SDPA branch for the same mask, so its logits equal the model's; the
prefill computes the same attention another way (see `prefill_on_prefix`), equal to float
rounding (tests/test_engine_backend.py checks both). `supports` says when the model is one they
reproduce, and the engine calls the model itself otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def supports(model: Any) -> bool:
    """Qwen3 with SDPA attention, SiLU MLPs and no sliding-window layer: the case reproduced here."""
    config = model.config
    return (
        type(model).__name__ == "Qwen3ForCausalLM"
        and config._attn_implementation == "sdpa"
        and config.hidden_act == "silu"
        and all(kind == "full_attention" for kind in config.layer_types)
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """`Qwen3RMSNorm`: normalised in float32, cast back, then scaled."""
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor
    q: tuple[torch.Tensor, torch.Tensor | None]
    k: tuple[torch.Tensor, torch.Tensor | None]
    v: tuple[torch.Tensor, torch.Tensor | None]
    o: tuple[torch.Tensor, torch.Tensor | None]
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_norm: torch.Tensor
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor


def _linear(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, module.bias


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(query, key, value) → attention output [batch, heads, new tokens, head_dim]."""


class LeanQwen3:
    """The model's weights (shared, not copied) and its forward pass for the engine's two hot
    paths. Built once per engine: gathering the weights is itself a few hundred attribute
    lookups."""

    def __init__(self, model: Any) -> None:
        inner, config = model.model, model.config
        self.embed = inner.embed_tokens.weight
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight
        self.lm_head = model.lm_head.weight
        self.eps = config.rms_norm_eps
        self.head_dim = config.head_dim
        self.groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = inner.layers[0].self_attn.scaling
        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                _linear(layer.self_attn.q_proj),
                _linear(layer.self_attn.k_proj),
                _linear(layer.self_attn.v_proj),
                _linear(layer.self_attn.o_proj),
                layer.self_attn.q_norm.weight,
                layer.self_attn.k_norm.weight,
                layer.post_attention_layernorm.weight,
                layer.mlp.gate_proj.weight,
                layer.mlp.up_proj.weight,
                layer.mlp.down_proj.weight,
            )
            for layer in inner.layers
        ]

    def _last_logits(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, attend: Attend) -> torch.Tensor:
        """Logits [batch, vocab] at the last of `tokens` ([batch, new]), appending their keys and
        values to `cache`."""
        batch, new = tokens.shape
        eps = self.eps
        hidden = F.embedding(tokens, self.embed)
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos[:, None], sin[:, None]
        shape = (batch, new, -1, self.head_dim)
        for index, layer in enumerate(self.layers):
            normed = _norm(hidden, layer.input_norm, eps)
            query = _norm(F.linear(normed, *layer.q).view(shape), layer.q_norm, eps).transpose(1, 2)
            key = _norm(F.linear(normed, *layer.k).view(shape), layer.k_norm, eps).transpose(1, 2)
            value = F.linear(normed, *layer.v).view(shape).transpose(1, 2)
            query = query * cos + _rotate_half(query) * sin
            key = key * cos + _rotate_half(key) * sin
            key, value = cache.layers[index].update(key, value)
            out = attend(query, key, value).transpose(1, 2).reshape(batch, new, -1)
            hidden = hidden + F.linear(out, *layer.o)
            normed = _norm(hidden, layer.post_norm, eps)
            hidden = hidden + F.linear(F.silu(F.linear(normed, layer.gate)) * F.linear(normed, layer.up), layer.down)
        return F.linear(_norm(hidden[:, -1], self.final_norm, eps), self.lm_head)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, vocab] for one new token per row, bit for bit the model's. `tokens` and
        `positions` are [batch, 1]; `mask` is the 2-D padding mask over cache plus new token, or
        None when no row is padded (then SDPA runs unmasked, as `transformers` does for an
        all-ones mask)."""
        attend_mask = None if mask is None else mask[:, None, None, :].bool()
        groups, scale = self.groups, self.scaling

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            if groups == 1:
                return F.scaled_dot_product_attention(query, key, value, attn_mask=attend_mask, scale=scale)
            if attend_mask is None:
                return F.scaled_dot_product_attention(query, key, value, scale=scale, enable_gqa=True)
            # one query per row: its heads become queries of their key/value head (`pack_gqa`)
            batch = query.shape[0]
            packed = query.reshape(batch, -1, groups, query.shape[-1])
            out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attend_mask, scale=scale)
            return out.reshape(batch, -1, 1, value.shape[-1])

        return self._last_logits(tokens, positions, cache, attend)

    def prefill_on_prefix(self, tokens: torch.Tensor, start: int, cache: Cache) -> torch.Tensor:
        """Logits [1, vocab] after `tokens` ([1, new]) that continue the `start` tokens in `cache`.

        `transformers` attends the new tokens over prefix plus themselves through an explicit
        bottom-right causal mask, which sends CPU SDPA to its masked kernel: on a judge prompt
        that costs two to three times the unmasked flash kernel (benchmarks/RESULTS.md), enough
        that reusing a short shared header made prefill slower than starting over. Here each
        layer attends twice with the flash kernel, unmasked over the prefix and causally over
        the new tokens, and merges the two by their log-sum-exps: the same softmax, to float
        rounding. CPU only (`supports_split_prefill`)."""
        flash = getattr(torch.ops.aten, _CPU_FLASH)
        scale = self.scaling

        def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            old, old_lse = flash(query, key[:, :, :start], value[:, :, :start], 0.0, False, scale=scale)
            new, new_lse = flash(query, key[:, :, start:], value[:, :, start:], 0.0, True, scale=scale)
            top = torch.maximum(old_lse, new_lse)
            old_weight, new_weight = (old_lse - top).exp()[..., None], (new_lse - top).exp()[..., None]
            merged = (old * old_weight + new * new_weight) / (old_weight + new_weight)
            return merged.to(query.dtype)

        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        return self._last_logits(tokens, positions, cache, attend)


def supports_split_prefill(model: Any) -> bool:
    """The split prefill needs the CPU flash kernel that also returns its log-sum-exp."""
    return supports(model) and model.device.type == "cpu" and hasattr(torch.ops.aten, _CPU_FLASH)
