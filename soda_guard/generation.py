"""What a judge asks of a model and what it gets back: the types the judging engine, every
backend and the judges share. A leaf module (no project imports), so the engine depends on
these and not on `backends` or `judges`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class ScoreSpec:
    """Tells a backend how to read a probability from its output: at the token that holds the
    label, the distribution is split into `positive` (unsafe) and `negative` label words;
    score = P(positive) / P(positive ∪ negative). `locate` is the judge parser's character
    offset of the label it accepted (`soda_guard.score` reads there); a spec without one reads after
    the first run of prefixes matching `marker` (a regex anchored at the end), which also
    tells verdict-only mode what to write."""

    marker: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    locate: Callable[[str], int | None] | None = None
    any_case: bool = False
    """The parser accepts the label words in any casing (SODA reads `unsafe` as UNSAFE), so
    every casing's tokens count towards its side; otherwise only the exact words do."""


@dataclass
class GenerationRequest:
    messages: list[dict[str, str]]
    max_new_tokens: int = 128
    score: ScoreSpec | None = None
    cache_key: str | None = None
    deadline: float | None = None
    """`time.monotonic()` value after which nobody waits for the answer any more: in-process
    work on it is dropped (before it starts, or between decode steps) instead of finished."""
    prefill_only: bool = False
    """A warm-up: compute and keep the prompt's keys and values (the prefix cache), generate
    nothing; answered with an empty result."""
    cancelled: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)
    """Set when the caller stops waiting before the deadline (its task was cancelled, another
    judgment of its batch failed, the backend is closing): the work is dropped the same way."""

    def abandon(self) -> None:
        self.cancelled.set()

    def given_up(self, now: float) -> bool:
        """Whether nobody will read the answer: cancelled, or past the deadline at `now`."""
        return self.cancelled.is_set() or (self.deadline is not None and now >= self.deadline)


@dataclass
class GenerationResult:
    text: str
    score: float | None = None
    prompt_tokens: int | None = None
    generated_tokens: int | None = None
    score_source: str | None = None
    finish_reason: str | None = None
    """Why the server stopped (`stop`, `length`, ...), where it says: an empty reply is reported
    with it instead of as text that could not be parsed."""
