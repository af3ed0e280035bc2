"""What a judge asks of a model and what it gets back: the types the judging engine, every
backend and the judges share. A leaf module (no project imports), so the engine depends on
these and not on `backends` or `judges`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoreSpec:
    """Tells a backend how to read a probability from its output: after the generated text
    matches `marker` (a regex anchored at the end), the next token's distribution is split into
    `positive` (unsafe) and `negative` label words; score = P(positive) / P(positive ∪ negative)."""

    marker: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = 128
    score: ScoreSpec | None = None
    cache_key: str | None = None
    deadline: float | None = None
    """`time.monotonic()` value after which nobody waits for the answer any more: in-process
    work on it is dropped (before it starts, or between decode steps) instead of finished."""


@dataclass
class GenerationResult:
    text: str
    score: float | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    score_source: str | None = None
