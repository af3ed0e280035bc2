"""A Qwen3 causal LM's decode step, and its prefill on top of a cached prefix, without
`transformers`' per-call machinery.

On CPU with a small judge, the decorated `forward` (output capture, config merging, mask
building, keyword plumbing through every layer) costs more than the arithmetic of one token
(benchmarks/RESULTS.md). These call the model's own modules in the order
`Qwen3ForCausalLM.forward` does with SDPA attention. The decode step takes the same SDPA branch
for the same mask, so its logits equal the model's; the prefill computes the same attention
another way (see `prefill_on_prefix`), equal to float rounding (tests/test_engine_backend.py
checks both). `supports` says when the model is one they reproduce, and the engine calls the
model itself otherwise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache


_CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"


def supports(model: Any) -> bool:
    """Qwen3 with SDPA attention and no sliding-window layer: the case this step reproduces."""
    config = model.config
    return (
        type(model).__name__ == "Qwen3ForCausalLM"
        and config._attn_implementation == "sdpa"
        and all(kind == "full_attention" for kind in config.layer_types)
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


Attend = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(attention module, query, key, value) → attention output [batch, heads, new tokens, head_dim]."""


def _last_logits(model: Any, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, attend: Attend) -> torch.Tensor:
    """Logits [batch, vocab] at the last of `tokens` ([batch, new]), appending their keys and
    values to `cache`, in the order `Qwen3ForCausalLM.forward` runs the model's modules."""
    inner = model.model
    batch, new = tokens.shape
    hidden = inner.embed_tokens(tokens)
    cos, sin = inner.rotary_emb(hidden, positions)
    cos, sin = cos[:, None], sin[:, None]
    for index, layer in enumerate(inner.layers):
        attention = layer.self_attn
        shape = (batch, new, -1, attention.head_dim)
        normed = layer.input_layernorm(hidden)
        query = attention.q_norm(attention.q_proj(normed).view(shape)).transpose(1, 2)
        key = attention.k_norm(attention.k_proj(normed).view(shape)).transpose(1, 2)
        value = attention.v_proj(normed).view(shape).transpose(1, 2)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        key, value = cache.layers[index].update(key, value)
        out = attend(attention, query, key, value)
        out = out.transpose(1, 2).reshape(batch, new, -1)
        hidden = hidden + attention.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden[:, -1:]))[:, -1]


def decode_step(
    model: Any, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, mask: torch.Tensor | None
) -> torch.Tensor:
    """Logits [batch, vocab] for one new token per row. `tokens` and `positions` are [batch, 1];
    `mask` is the 2-D padding mask over cache plus new token, or None when no row is padded
    (then SDPA runs unmasked, as `transformers` does for an all-ones mask)."""
    attend_mask = None if mask is None else mask[:, None, None, :].bool()

    def attend(attention: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, groups = query.shape[0], attention.num_key_value_groups
        if groups == 1:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attend_mask, scale=attention.scaling)
        if attend_mask is None:
            return F.scaled_dot_product_attention(query, key, value, scale=attention.scaling, enable_gqa=True)
        # one query per row: its heads become queries of their key/value head (`pack_gqa`)
        packed = query.reshape(batch, -1, groups, query.shape[-1])
        out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attend_mask, scale=attention.scaling)
        return out.reshape(batch, -1, 1, value.shape[-1])

    return _last_logits(model, tokens, positions, cache, attend)


def supports_split_prefill(model: Any) -> bool:
    """The split prefill needs the CPU flash kernel that also returns its log-sum-exp."""
    return supports(model) and model.device.type == "cpu" and hasattr(torch.ops.aten, _CPU_FLASH)


def prefill_on_prefix(model: Any, tokens: torch.Tensor, start: int, cache: Cache) -> torch.Tensor:
    """Logits [1, vocab] after `tokens` ([1, new]) that continue the `start` tokens in `cache`.

    `transformers` attends the new tokens over prefix plus themselves through an explicit
    bottom-right causal mask, which sends CPU SDPA to its masked kernel: on a judge prompt that
    costs two to three times the unmasked flash kernel (benchmarks/RESULTS.md), enough that
    reusing a short shared header made prefill slower than starting over. Here each layer
    attends twice with the flash kernel, unmasked over the prefix and causally over the new
    tokens, and merges the two by their log-sum-exps: the same softmax, to float rounding."""
    flash = getattr(torch.ops.aten, _CPU_FLASH)

    def attend(attention: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        old, old_lse = flash(query, key[:, :, :start], value[:, :, :start], 0.0, False, scale=attention.scaling)
        new, new_lse = flash(query, key[:, :, start:], value[:, :, start:], 0.0, True, scale=attention.scaling)
        top = torch.maximum(old_lse, new_lse)
        old_weight, new_weight = (old_lse - top).exp()[..., None], (new_lse - top).exp()[..., None]
        return (old * old_weight + new * new_weight) / (old_weight + new_weight)

    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
    return _last_logits(model, tokens, positions, cache, attend)
