"""A backend that answers from a script instead of a model.

Random-weight models cannot give meaningful verdicts, so tests, examples and offline demos
drive the guard through this backend to get deterministic ones; it records every request so a
test can assert what the judge was asked and how often.
"""

from __future__ import annotations

import asyncio
import re
import threading
from typing import Callable, Sequence

from soda_guard.backends.base import GenerationRequest, GenerationResult

Responder = Callable[[GenerationRequest], str | GenerationResult]


def soda_reply(unsafe: bool, reason: str = "The agent acted on the request.") -> str:
    return f"[Reason] {reason}\n[Verdict] {'UNSAFE' if unsafe else 'SAFE'}"


def keyword_responder(unsafe_patterns: Sequence[str], *, score: bool = True) -> Responder:
    """UNSAFE when the rendered user message matches any pattern (e.g. a tool name)."""
    compiled = [re.compile(p) for p in unsafe_patterns]

    def respond(request: GenerationRequest) -> GenerationResult:
        last = request.messages[-1]["content"]
        unsafe = any(p.search(last) for p in compiled)
        text = soda_reply(unsafe, "The call matches a forbidden action." if unsafe else "The call is benign.")
        return GenerationResult(text=text, score=(0.97 if unsafe else 0.02) if score else None)

    respond.instant = True  # type: ignore[attr-defined]
    return respond


class ScriptedBackend:
    def __init__(self, responder: Responder | Sequence[str], *, model_id: str = "scripted", delay_s: float = 0.0) -> None:
        if callable(responder):
            self._responder: Responder = responder
        else:
            replies = list(responder)
            self._responder = lambda request: replies[min(len(self.requests) - 1, len(replies) - 1)]
        self.model_id = model_id
        self.delay_s = delay_s
        self.inline = delay_s == 0 and (not callable(responder) or getattr(responder, "instant", False) is True)
        """Answers at once (from a fixed list, or a responder marked `instant`, as
        `keyword_responder`'s pattern scan is), so the guard calls it on the caller's thread;
        any other responder may wait and gets a judge thread, bounded by the deadline."""
        self.requests: list[GenerationRequest] = []
        self.batches: list[int] = []
        self._lock = threading.Lock()

    def _answer(self, request: GenerationRequest) -> GenerationResult:
        with self._lock:
            self.requests.append(request)
        answer = self._responder(request)
        return answer if isinstance(answer, GenerationResult) else GenerationResult(text=answer)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            self.batches.append(len(requests))
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        return [self._answer(request) for request in requests]

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        with self._lock:
            self.batches.append(len(requests))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return [self._answer(request) for request in requests]
