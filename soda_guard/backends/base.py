"""The one interface between judges and the things that run models.

A backend takes a batch of chat-message requests and returns text (plus a verdict score when
it can read token probabilities). Local transformers, an OpenAI-compatible server and the
scripted test double all implement it, with twin sync / async methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from soda_guard.judges.base import ScoreSpec


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


@runtime_checkable
class Backend(Protocol):
    model_id: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...
