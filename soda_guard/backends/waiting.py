"""A backend caller waiting for its batch of judgments, sync or async, and letting go of them.

Whatever ends the wait (an answer for every request, the first failure, the deadline, or the
caller's own task being cancelled) every request still unanswered is abandoned
(`GenerationRequest.abandon`): a queued one is never started, an HTTP request in flight is
aborted at its next read, and an engine row is dropped at the next decode step. Work nobody
waits for must not hold a worker that a live check needs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Sequence, TypeVar

from soda_guard.generation import GenerationRequest

T = TypeVar("T")


def _let_go(futures: Sequence[concurrent.futures.Future[T]], requests: Sequence[GenerationRequest]) -> None:
    for future, request in zip(futures, requests):
        if not future.done():
            request.abandon()
            future.cancel()


def wait_all(
    futures: Sequence[concurrent.futures.Future[T]], requests: Sequence[GenerationRequest], until: float
) -> list[T]:
    """Every result by `until` (time.monotonic); raises the first failure, or TimeoutError."""
    try:
        done, pending = concurrent.futures.wait(
            futures, timeout=max(0.0, until - time.monotonic()), return_when=concurrent.futures.FIRST_EXCEPTION
        )
        for future in futures:
            if future in done and future.exception() is not None:
                raise future.exception()  # type: ignore[misc]
        if pending:
            raise TimeoutError
        return [future.result() for future in futures]
    finally:
        _let_go(futures, requests)


async def await_all(
    futures: Sequence[concurrent.futures.Future[T]], requests: Sequence[GenerationRequest], until: float
) -> list[T]:
    """`wait_all` without blocking the event loop. No `gather`: a gathering future whose caller
    was cancelled reports its children's later failures as never retrieved."""
    waiting = [asyncio.wrap_future(future) for future in futures]
    try:
        done, pending = await asyncio.wait(
            waiting, timeout=max(0.0, until - time.monotonic()), return_when=asyncio.FIRST_EXCEPTION
        )
        failures = [task.exception() for task in waiting if task in done and not task.cancelled()]
        for failure in failures:
            if failure is not None:
                raise failure
        if pending:
            raise TimeoutError
        return [task.result() for task in waiting]
    finally:
        _let_go(futures, requests)
        for task in waiting:
            if task.done() and not task.cancelled():
                task.exception()
            else:
                task.cancel()
