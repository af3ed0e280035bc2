"""Decode-time KV cache that is written in place.

`DynamicCache` concatenates at every step, so each generated token copies every row's whole
cached prompt once per layer; on CPU with long judge prompts that copy was most of the decode
time (benchmarks/RESULTS.md). Here the decode batch's keys and values are copied once into
buffers sized for the prompt plus the tokens still to generate, and each step writes only its
own column; attention reads a view of the filled part, so it sees exactly the tensors
`DynamicCache` would have built.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class InPlaceLayer(DynamicLayer):
    """One layer's keys and values in buffers shaped [batch, kv_heads, capacity, head_dim]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int) -> None:
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._key_buffer, self._value_buffer = keys, values
        self._length = length
        self._expose()

    def _expose(self) -> None:
        self.keys = self._key_buffer[:, :, : self._length]
        self.values = self._value_buffer[:, :, : self._length]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        end = self._length + key_states.shape[-2]
        if end > self._key_buffer.shape[2]:
            raise RuntimeError(f"KV buffer of {self._key_buffer.shape[2]} tokens cannot hold {end}")
        self._key_buffer[:, :, self._length : end] = key_states
        self._value_buffer[:, :, self._length : end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Drop finished rows (a copy, but only when a row ends, not every step)."""
        self._key_buffer = self._key_buffer[indices]
        self._value_buffer = self._value_buffer[indices]
        self._expose()


def in_place_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> Cache:
    """A cache over per-layer (key buffer, value buffer) whose first `length` columns are filled."""
    return Cache(layers=[InPlaceLayer(keys, values, length) for keys, values in layers])
