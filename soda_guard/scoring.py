"""Reading the verdict probability out of a generation.

The judges write their label after a fixed marker (`[Verdict]`, `Safety:`). The score is the
probability mass of the unsafe label words' first tokens at that position, renormalised over
all label words, so thresholds are comparable across judges and tokenizers.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import torch

from soda_guard.chat_tokens import tokenize
from soda_guard.generation import ScoreSpec


@dataclass(frozen=True)
class LabelTokens:
    positive: tuple[int, ...]
    negative: tuple[int, ...]


def _first_ids(tokenizer: Any, words: Sequence[str], with_space: bool) -> set[int]:
    ids = set()
    for word in words:
        encoded = tokenize(tokenizer, (" " if with_space else "") + word)["input_ids"]
        if encoded:
            ids.add(int(encoded[0]))
    return ids


def label_tokens(tokenizer: Any, spec: ScoreSpec, with_space: bool) -> LabelTokens:
    """First-token ids of the label words; ids shared by both sides say nothing and are dropped."""
    cache = _cache_for(tokenizer)
    key = (spec, with_space)
    if key not in cache:
        positive = _first_ids(tokenizer, spec.positive, with_space)
        negative = _first_ids(tokenizer, spec.negative, with_space)
        shared = positive & negative
        cache[key] = LabelTokens(tuple(sorted(positive - shared)), tuple(sorted(negative - shared)))
    return cache[key]


_CACHES: weakref.WeakKeyDictionary[Any, dict[Any, LabelTokens]] = weakref.WeakKeyDictionary()


def _cache_for(tokenizer: Any) -> dict[Any, LabelTokens]:
    return _CACHES.setdefault(tokenizer, {})


@lru_cache(maxsize=32)
def _marker(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def verdict_position(tokenizer: Any, generated: Sequence[int], spec: ScoreSpec) -> tuple[int, bool] | None:
    """Index of the generated token that carries the label, and whether the marker text before
    it already ends in whitespace (so the label is spelled without a leading space).

    The last prefix that matches is taken, so a marker followed by a separate space token
    (byte-level tokenizers) still lands on the label's own first token.
    """
    marker = _marker(spec.marker)
    found: tuple[int, bool] | None = None
    for index in range(len(generated)):
        prefix = tokenizer.decode(list(generated[:index]), skip_special_tokens=True)
        if marker.search(prefix):
            found = (index, prefix[-1:].isspace())
        elif found is not None:
            break
    return found


def score_from_logits(logits: torch.Tensor, tokens: LabelTokens) -> float | None:
    if not tokens.positive or not tokens.negative:
        return None
    probs = torch.softmax(logits.float(), dim=-1)
    positive = probs[list(tokens.positive)].sum()
    negative = probs[list(tokens.negative)].sum()
    total = positive + negative
    if total <= 0:
        return None
    return float(positive / total)


def score_generation(
    tokenizer: Any, generated: Sequence[int], step_logits: Sequence[torch.Tensor], spec: ScoreSpec
) -> float | None:
    """Score from per-step logits (`step_logits[i]` produced `generated[i]`)."""
    position = verdict_position(tokenizer, generated, spec)
    if position is None:
        return None
    index, ends_in_space = position
    return score_from_logits(step_logits[index], label_tokens(tokenizer, spec, with_space=not ends_in_space))
