"""One decode step of a Qwen3 causal LM without `transformers`' per-call machinery.

On CPU with a small judge, the decorated `forward` (output capture, config merging, mask
building, keyword plumbing through every layer) costs more than the arithmetic of one token
(benchmarks/RESULTS.md). This step calls the model's own modules in the order
`Qwen3ForCausalLM.forward` does with SDPA attention, and takes the same SDPA branch for the same
mask, so its logits equal the model's (tests/test_engine_backend.py checks it); `supports` says
when that holds, and the engine calls the model itself otherwise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache


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


def decode_step(
    model: Any, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, mask: torch.Tensor | None
) -> torch.Tensor:
    """Logits [batch, vocab] for one new token per row. `tokens` and `positions` are [batch, 1];
    `mask` is the 2-D padding mask over cache plus new token, or None when no row is padded
    (then SDPA runs unmasked, as `transformers` does for an all-ones mask)."""
    inner = model.model
    batch = tokens.shape[0]
    hidden = inner.embed_tokens(tokens)
    cos, sin = inner.rotary_emb(hidden, positions)
    cos, sin = cos[:, None], sin[:, None]
    attend = None if mask is None else mask[:, None, None, :].bool()
    for index, layer in enumerate(inner.layers):
        attention = layer.self_attn
        shape = (batch, 1, -1, attention.head_dim)
        normed = layer.input_layernorm(hidden)
        query = attention.q_norm(attention.q_proj(normed).view(shape)).transpose(1, 2)
        key = attention.k_norm(attention.k_proj(normed).view(shape)).transpose(1, 2)
        value = attention.v_proj(normed).view(shape).transpose(1, 2)
        query = query * cos + _rotate_half(query) * sin
        key = key * cos + _rotate_half(key) * sin
        key, value = cache.layers[index].update(key, value)
        groups = attention.num_key_value_groups
        if groups == 1:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attend, scale=attention.scaling)
        elif attend is None:
            out = F.scaled_dot_product_attention(query, key, value, scale=attention.scaling, enable_gqa=True)
        else:  # one query per row: its heads become queries of their key/value head (`pack_gqa`)
            packed = query.reshape(batch, -1, groups, query.shape[-1])
            out = F.scaled_dot_product_attention(packed, key, value, attn_mask=attend, scale=attention.scaling)
        out = out.reshape(batch, -1, 1, value.shape[-1]).transpose(1, 2).reshape(batch, 1, -1)
        hidden = hidden + attention.o_proj(out)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(inner.norm(hidden))[:, -1]
