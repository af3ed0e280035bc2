"""A small MCP server over stdio with one read-only and one destructive tool, a resource and a
prompt: what the MCP example and tests put soda-guard in front of.

    python examples/mcp_files_server.py            # serves on stdio

Its files live in memory, so a test can see whether a destructive call really ran (`count`).
"""

from __future__ import annotations

import asyncio

from fastmcp import FastMCP
from mcp.types import ToolAnnotations

FILES: dict[str, str] = {"notes.txt": "buy milk", "report.txt": "Q3 numbers"}
DELETED: list[str] = []

server = FastMCP("files")


@server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def read_file(path: str) -> str:
    """Read a file by name."""
    return FILES.get(path, f"no such file: {path}")


@server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True, openWorldHint=False))
def delete_file(path: str) -> str:
    """Delete a file by name."""
    DELETED.append(path)
    return "deleted" if FILES.pop(path, None) is not None else f"no such file: {path}"


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def count() -> str:
    """How many deletions this server process has run (tests read it to see what was forwarded)."""
    return str(len(DELETED))


@server.tool
async def sleep(seconds: float) -> str:
    """Wait, then answer: a tool that can hang for the proxy's timeout tests."""
    await asyncio.sleep(seconds)
    return "slept"


@server.resource("file://notes.txt")
def notes() -> str:
    return FILES.get("notes.txt", "")


@server.prompt
def summarize(path: str) -> str:
    return f"Summarize the file {path}."


if __name__ == "__main__":
    server.run(show_banner=False)
