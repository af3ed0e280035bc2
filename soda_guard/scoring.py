"""Reading the verdict probability out of a generation.

The judges write their label after a fixed marker (`[Verdict]`, `Safety:`). The score is the
probability mass of the unsafe label words' first tokens at the token of the label the judge's
parser accepted (`soda_guard.score`), renormalised over all label words, so thresholds are
comparable across judges and tokenizers.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from soda_guard.chat_tokens import token_bytes, tokenize
from soda_guard.generation import ScoreSpec
from soda_guard.score import decode_pieces, label_token


@dataclass(frozen=True)
class LabelTokens:
    positive: tuple[int, ...]
    negative: tuple[int, ...]


def _first_ids(tokenizer: Any, words: Sequence[str], with_space: bool, any_case: bool) -> set[int]:
    """First-token ids of the words; of each casing a parser could accept, when it accepts any."""
    if any_case:
        words = sorted({form for word in words for form in (word, word.lower(), word.upper(), word.capitalize())})
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
        positive = _first_ids(tokenizer, spec.positive, with_space, spec.any_case)
        negative = _first_ids(tokenizer, spec.negative, with_space, spec.any_case)
        shared = positive & negative
        cache[key] = LabelTokens(tuple(sorted(positive - shared)), tuple(sorted(negative - shared)))
    return cache[key]


_CACHES: weakref.WeakKeyDictionary[Any, dict[Any, LabelTokens]] = weakref.WeakKeyDictionary()


def _cache_for(tokenizer: Any) -> dict[Any, LabelTokens]:
    return _CACHES.setdefault(tokenizer, {})


def output_pieces(tokenizer: Any, generated: Sequence[int]) -> list[str]:
    """Each generated token's share of `decode(generated, skip_special_tokens=True)`, from the
    tokens' bytes (linear); a tokenizer whose pieces do not join to its own decoding (one that
    cleans up spaces, say) gets each token's share from decoding prefixes instead."""
    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    pieces = decode_pieces(b"" if token in specials else token_bytes(tokenizer, token) for token in generated)
    text = tokenizer.decode(list(generated), skip_special_tokens=True)
    if "".join(pieces) == text:
        return pieces
    prefixes = [tokenizer.decode(list(generated[:end]), skip_special_tokens=True) for end in range(len(generated) + 1)]
    return [prefixes[i + 1][len(prefixes[i]) :] if prefixes[i + 1].startswith(prefixes[i]) else "" for i in range(len(generated))]


def verdict_position(tokenizer: Any, generated: Sequence[int], spec: ScoreSpec) -> tuple[int, bool] | None:
    """Index of the generated token that carries the label the judge's parser accepted, and
    whether the text before it ends in whitespace (`soda_guard.score.label_token`)."""
    return label_token(output_pieces(tokenizer, generated), spec)


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
