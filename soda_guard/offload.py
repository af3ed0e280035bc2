"""The guard's own threads for the work an async check moves off the event loop (rendering a
long prompt, routing that scans tool results, the audit write, tokenising).

`asyncio.to_thread` uses the loop's default executor, which the application shares: LangChain
runs sync tools there, so an agent whose tools block kept every worker busy and a check waited
for one past its deadline (an allow returned seconds late; a judge never asked in time). These
threads serve only the guard, so what bounds a check is its own deadline.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

MAX_THREADS = 64
"""Each thread runs one bounded piece of a check; past this many at once they queue."""

_pool: ThreadPoolExecutor | None = None
_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    pool = _pool
    if pool is None:
        with _lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="soda-guard-offload")
            pool = _pool
    return pool


def _forget_after_fork() -> None:
    """A forked child has none of its parent's threads, but an executor copied from it counts
    them as idle and would start none: the child makes its own on first use."""
    global _pool, _lock
    _pool, _lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


async def off_loop(fn: Callable[..., T], /, *args: Any) -> T:
    """`asyncio.to_thread` on the guard's threads: `fn(*args)` with the caller's context."""
    call = functools.partial(contextvars.copy_context().run, fn, *args)
    return await asyncio.get_running_loop().run_in_executor(_executor(), call)
