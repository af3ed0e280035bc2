"""Per-conversation KV cache of the longest judged prompt prefix.

In an agent loop judgment k+1 re-sends everything judgment k saw, so the keys and values of the
shared token prefix are kept and only the new tokens are prefilled. Entries are immutable: a
lookup returns views that callers copy into their own buffers, and what is stored is a row's
prefill buffer, which nothing writes after its prefill, so one conversation's reuse can never
write into another's state.

The budget is in tokens, the unit a judge prompt grows in (bytes per token depend on the
model; `Engine` converts). A conversation longer than the whole budget keeps its first
`max_tokens` tokens: a prefix of a prefix is still reusable, and the long conversations are the
ones that gain most. A lookup checks the caller's own entry, then finds the entry sharing the
most whole blocks of tokens through a hash index, so it costs the prompt's length in blocks,
not a scan over every entry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

BLOCK = 64
"""Tokens per indexed block: cross-conversation sharing (the fixed judge header) is found at
this granularity, then extended token by token within the entry found."""


@dataclass(frozen=True)
class CachedPrefix:
    ids: torch.Tensor
    """Token ids (1-D, on CPU) whose keys and values are held."""
    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    """Per layer (keys, values), each shaped [kv_heads, tokens, head_dim]."""
    blocks: tuple[int, ...] = field(default=(), compare=False)
    """Chained hashes of the whole blocks of `ids`, filled in by the cache."""
    held: int = 0
    """Tokens' worth of memory its buffers hold, where more than `tokens`: a warm-up cut short
    keeps its prefix in the buffer made for the whole prompt, and the budget counts all of it."""

    @property
    def tokens(self) -> int:
        return len(self.ids)

    @property
    def footprint(self) -> int:
        """What the cache's token budget counts for it."""
        return max(self.tokens, self.held)

    def truncated(self, tokens: int) -> CachedPrefix:
        """The first `tokens` tokens, copied so the rest of the original can be freed."""
        layers = tuple((k[:, :tokens].clone(), v[:, :tokens].clone()) for k, v in self.layers)
        return CachedPrefix(self.ids[:tokens].clone(), layers)


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    mismatch = torch.nonzero(a[:n] != b[:n])
    return int(mismatch[0, 0]) if len(mismatch) else n


def block_hashes(ids: torch.Tensor) -> tuple[int, ...]:
    """Hash of every whole-block prefix of `ids`, each chained on the previous one."""
    values = ids.tolist()
    hashes, running = [], 0
    for end in range(BLOCK, len(values) + 1, BLOCK):
        running = hash((running, tuple(values[end - BLOCK : end])))
        hashes.append(running)
    return tuple(hashes)


class PrefixCache:
    """LRU of cached prefixes bounded in tokens. A key (the conversation) holds one entry, its
    latest prompt; a lookup takes the longer of the caller's own entry and the entry sharing
    the most blocks, so the fixed judge header is shared across conversations too (same tokens
    give the same keys and values, so sharing changes no result)."""

    def __init__(self, max_tokens: int) -> None:
        if max_tokens < 1:
            raise ValueError("a prefix cache needs room for at least one token")
        self.max_tokens = max_tokens
        self._entries: OrderedDict[object, CachedPrefix] = OrderedDict()
        self._by_block: dict[int, object] = {}
        self._tokens = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tokens(self) -> int:
        return self._tokens

    def lookup(self, key: object, ids: torch.Tensor) -> tuple[int, CachedPrefix | None]:
        """Longest reusable prefix length of `ids` and the entry holding it. At least one token is
        always left to prefill, since its logits start the generation."""
        hashes = block_hashes(ids)
        with self._lock:
            candidates = [key]
            for value in reversed(hashes):
                holder = self._by_block.get(value)
                if holder is not None:
                    candidates.append(holder)
                    break
            best, found, found_key = 0, None, None
            for candidate in candidates:
                entry = self._entries.get(candidate)
                if entry is None:
                    continue
                length = min(common_prefix(entry.ids, ids), len(ids) - 1)
                if length > best:
                    best, found, found_key = length, entry, candidate
            if found_key is not None:
                self._entries.move_to_end(found_key)
        return best, found

    def store(self, key: object, entry: CachedPrefix) -> None:
        if entry.footprint > self.max_tokens:
            entry = entry.truncated(min(entry.tokens, self.max_tokens))
        entry = CachedPrefix(entry.ids, entry.layers, block_hashes(entry.ids), entry.held)
        with self._lock:
            self._remove(key)
            self._entries[key] = entry
            self._tokens += entry.footprint
            for value in entry.blocks:
                self._by_block[value] = key
            while self._tokens > self.max_tokens:
                self._remove(next(iter(self._entries)))

    def _remove(self, key: object) -> None:
        old = self._entries.pop(key, None)
        if old is None:
            return
        self._tokens -= old.footprint
        for value in old.blocks:
            if self._by_block.get(value) == key:
                del self._by_block[value]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._by_block.clear()
            self._tokens = 0
