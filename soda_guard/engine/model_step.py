"""The engine's fallback forward: the model's own `forward` over a transformers `DynamicCache`
filled from the engine's key/value buffers, for a model, transformers release or attention
implementation that `qwen3_step.LeanQwen3` does not reproduce. Slower (the cache is rebuilt
each call and the model's per-call machinery runs), but what the model computes is what is
judged, so the engine's prefix reuse, batching and early stop keep working on it."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache

from soda_guard.engine.kv import KVCache


class ModelStep:
    """The interface of `LeanQwen3` the engine uses (`new_cache`, `prefill`, `decode_step`)."""

    def __init__(self, model: Any) -> None:
        config = model.config.get_text_config()
        self.model = model
        self.layer_count = config.num_hidden_layers
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        weight = model.get_input_embeddings().weight
        self.dtype, self.device = weight.dtype, weight.device
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name warns)
        self.cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def new_cache(self, batch: int, capacity: int, *, growable: bool = False) -> KVCache:
        return KVCache.empty(self.layer_count, batch, self.kv_heads, capacity, self.head_dim,
                             dtype=self.dtype, device=self.device, growable=growable)

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, vocab] of the last new token; the new tokens' keys and values are
        appended to `kv`."""
        start = kv.length
        cache = DynamicCache()
        if start:
            for index, layer in enumerate(kv.layers):
                cache.update(layer.keys, layer.values, index)
        output = self.model(
            input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=True, **{self.cache_argument: cache}
        )
        for index, layer in enumerate(kv.layers):
            held = cache.layers[index]  # updated in place by the forward
            layer.append(held.keys[:, :, start:], held.values[:, :, start:])
        return output.logits[:, -1]

    def prefill(self, tokens: torch.Tensor, kv: KVCache, stop: Any = None) -> torch.Tensor:
        """Logits [1, vocab] after `tokens` ([1, new]) continuing the `kv.length` tokens in `kv`.
        The model's forward cannot be stopped part way: `stop` is not asked."""
        start = kv.length
        positions = torch.arange(start, start + tokens.shape[1], device=tokens.device)[None]
        return self._forward(tokens, positions, kv, None)

    def decode_step(self, tokens: torch.Tensor, positions: torch.Tensor, kv: KVCache, mask: torch.Tensor | None) -> torch.Tensor:
        """One new token per row; `mask` is the 2-D padding mask over cache plus new token."""
        return self._forward(tokens, positions, kv, mask)
