"""Key/value buffers the engine owns outright, written in place.

`transformers`' dynamic cache concatenates at every token, so each generated token copies every
row's whole cached prompt once per layer (on CPU with long judge prompts that copy was most of
the decode time, benchmarks/RESULTS.md), and its layers are not meant to be filled from outside.
These buffers are plain tensors shaped [batch, kv_heads, capacity, head_dim]: a forward writes
only its own columns and attends over a view of the filled part, the exact tensors a
concatenating cache would have built. The judging engine and the stream monitor both use them,
so there is one cache implementation and it depends on no private `transformers` state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class KVLayer:
    """One layer's keys and values; the first `length` columns are filled."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int = 0, *, growable: bool = False) -> None:
        self._keys, self._values = keys, values
        self.length = length
        self.growable = growable

    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.length]

    @property
    def capacity(self) -> int:
        return self._keys.shape[2]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `keys`/`values` ([batch, kv_heads, new, head_dim]) after the filled part and
        return the filled views including them."""
        end = self.length + keys.shape[2]
        if end > self.capacity:
            if not self.growable:
                raise RuntimeError(f"KV buffer of {self.capacity} tokens cannot hold {end}")
            self._grow(max(end, 2 * self.capacity, 256))
        self._keys[:, :, self.length : end] = keys
        self._values[:, :, self.length : end] = values
        self.length = end
        return self.keys, self.values

    def _grow(self, capacity: int) -> None:
        """Doubling keeps a stream's appends amortised O(1) per token."""
        for name in ("_keys", "_values"):
            old: torch.Tensor = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    def place(self, row: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Put one row's keys/values ([kv_heads, tokens, head_dim]) at columns from `start`,
        zeroing the columns before it: stale values from an earlier batch sit under the pad
        mask, but a non-finite one would still reach the output through its zero weight."""
        end = start + keys.shape[1]
        self._keys[row, :, :start], self._values[row, :, :start] = 0, 0
        self._keys[row, :, start:end], self._values[row, :, start:end] = keys, values

    def window(self, batch: int, capacity: int) -> KVLayer:
        """An empty layer over the first `batch` rows and `capacity` columns of these buffers,
        so one allocation serves every batch that fits in it."""
        return KVLayer(self._keys[:batch, :, :capacity], self._values[:batch, :, :capacity])

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Compact the rows listed in `rows` to the front of the same buffers: the batch shrinks
        when a row ends without reallocating (a copy of the kept rows, only when a row ends)."""
        count = len(rows)
        self._keys[:count] = self._keys[rows]
        self._values[:count] = self._values[rows]
        self._keys, self._values = self._keys[:count], self._values[:count]


@dataclass
class KVCache:
    layers: list[KVLayer]

    @property
    def length(self) -> int:
        return self.layers[0].length

    @classmethod
    def empty(
        cls, layers: int, batch: int, kv_heads: int, capacity: int, head_dim: int, *, dtype: torch.dtype,
        device: torch.device, growable: bool = False,
    ) -> KVCache:
        # Zeros, not empty: pad columns are masked, but a NaN there would still reach the
        # output through its zero attention weight.
        shape = (batch, kv_heads, capacity, head_dim)
        return cls([
            KVLayer(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
                    growable=growable)
            for _ in range(layers)
        ])

    @property
    def batch(self) -> int:
        return self.layers[0].keys.shape[0]

    @property
    def capacity(self) -> int:
        return self.layers[0].capacity

    def window(self, batch: int, capacity: int) -> KVCache:
        return KVCache([layer.window(batch, capacity) for layer in self.layers])

    def keep_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_rows(rows)

    def truncate(self, length: int) -> None:
        """Forget every column from `length` on: undoes a forward that failed part way through
        its layers, which would otherwise leave some layers longer than others."""
        for layer in self.layers:
            layer.length = min(layer.length, length)
