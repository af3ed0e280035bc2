"""A small MCP server over stdio with one read-only and one destructive tool, a resource and a
prompt: what the MCP example and tests put soda-guard in front of.

    python examples/mcp_files_server.py            # serves on stdio

Its files live in memory, and `ran` lists every tool call the server executed, so a test can
see what was really forwarded.
"""

from __future__ import annotations

import asyncio
import os

from fastmcp import FastMCP
from mcp.types import ToolAnnotations

FILES: dict[str, str] = {"notes.txt": "buy milk", "report.txt": "Q3 numbers"}
RAN: list[str] = []

server = FastMCP("files")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def read_file(path: str) -> str:
    """Read a file by name."""
    RAN.append(f"read_file {path}")
    return FILES.get(path, f"no such file: {path}")


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True, openWorldHint=False))
def delete_file(path: str) -> str:
    """Delete a file by name."""
    RAN.append(f"delete_file {path}")
    return "deleted" if FILES.pop(path, None) is not None else f"no such file: {path}"


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def ran() -> list[str]:
    """The tool calls this server process has executed, oldest first."""
    return list(RAN)


@server.tool
async def sleep(seconds: float) -> str:
    """Wait, then answer: a tool that can hang for the proxy's timeout tests."""
    RAN.append(f"sleep {seconds}")
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:  # the client cancelled it (notifications/cancelled)
        RAN.append(f"sleep {seconds} cancelled")
        raise
    return "slept"


@server.tool
def crash() -> str:
    """Exit the server process mid-call: what a crashing server looks like to the proxy."""
    os._exit(3)


@server.resource("file://notes.txt")
def notes() -> str:
    return FILES.get("notes.txt", "")


@server.prompt
def summarize(path: str) -> str:
    return f"Summarize the file {path}."


if __name__ == "__main__":
    server.run(show_banner=False)
