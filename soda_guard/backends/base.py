"""The one interface between judges and the things that run models.

A backend takes a batch of chat-message requests and returns text (plus a verdict score when
it can read token probabilities). Local transformers, an OpenAI-compatible server and the
scripted test double all implement it, with twin sync / async methods.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from soda_guard.generation import GenerationRequest, GenerationResult

__all__ = ["Backend", "GenerationRequest", "GenerationResult"]


@runtime_checkable
class Backend(Protocol):
    model_id: str

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...
