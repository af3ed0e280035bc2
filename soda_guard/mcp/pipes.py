"""The started server's process and the line reading both pipes share."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import AsyncIterator, Sequence

DEFAULT_MAX_MESSAGE_BYTES = 16 << 20


async def lines(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """Lines of `reader`, each carriage return in them made a space; one longer than its limit
    comes back as its length in a too-long marker (bytes of that size are not kept), so the
    relay answers it instead of dying.

    The MCP SDK's stdio transport reads with universal newlines, where a lone CR ends a line
    too. A line the proxy reads as one message (a ping, say) could then reach the other side
    as several, one of them a `tools/call` never judged (or a tool result never moderated).
    Outside JSON strings a CR can only be whitespace, and inside them it must be escaped, so
    as a space it reads the same to the proxy and cannot split anything further on."""
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as end:
            if end.partial:
                yield end.partial.replace(b"\r", b" ")
            return
        except asyncio.LimitOverrunError as over:
            skipped = 0
            while True:
                try:
                    chunk = await reader.readuntil(b"\n")
                    skipped += len(chunk)
                    break
                except asyncio.LimitOverrunError as more:
                    skipped += more.consumed
                    await reader.readexactly(more.consumed)
                except asyncio.IncompleteReadError:
                    return
            yield TooLong(max(over.consumed, skipped))
            continue
        yield line.replace(b"\r", b" ") if b"\r" in line else line


class TooLong(bytes):
    """Stands for a line over the limit: its length, none of its bytes."""

    def __new__(cls, size: int) -> TooLong:
        instance = super().__new__(cls, b"")
        instance.size = size  # type: ignore[attr-defined]
        return instance


async def start_server(command: Sequence[str]) -> asyncio.subprocess.Process:
    """The real server, in its own process group so that cleaning up takes its children too;
    its stderr is the proxy's (MCP servers log there)."""
    return await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=None,
        limit=DEFAULT_MAX_MESSAGE_BYTES * 4,
        start_new_session=True,
    )


async def stop_server(process: asyncio.subprocess.Process, grace_s: float = 2.0) -> None:
    """Close its input (the MCP way to ask a stdio server to exit), then SIGTERM, then SIGKILL
    its process group."""
    if process.returncode is None and process.stdin is not None:
        with contextlib.suppress(Exception):
            process.stdin.close()
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, sig)
        try:
            await asyncio.wait_for(process.wait(), grace_s)
            return
        except asyncio.TimeoutError:
            continue
