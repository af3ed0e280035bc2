"""Whether the event loop stays free while something is awaited."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def with_ticks(awaited: Awaitable[T], every_s: float = 0.01) -> tuple[T, int]:
    """`awaited`'s result and how often a task sleeping `every_s` at a time woke meanwhile: a
    held loop wakes it once or twice however long the wait."""
    ticks = 0

    async def ticking() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(every_s)
            ticks += 1

    ticker = asyncio.ensure_future(ticking())
    try:
        return await awaited, ticks
    finally:
        ticker.cancel()
