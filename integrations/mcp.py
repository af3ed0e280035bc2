"""MCP tools loaded through `langchain.mcp` into a LangChain agent, guarded as MCP tools.

`SodaGuardMiddleware` registers every MCP tool it is given (by the `metadata["mcp"]` that
`langchain.mcp` puts on each tool) with its guard, so the policy matches them by server,
`server:tool` and annotations, and the judge sees `server:tool`. The server's name is the one
it declares about itself unless `name_server` gives the tools the name the policy uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from langchain_core.tools import BaseTool

from soda_guard.guard import Guard
from soda_guard.mcp.annotations import from_wire

#: `metadata` key under which `name_server` records the name the policy knows a server by
SERVER_KEY = "soda_guard_mcp_server"


def mcp_identity(tool: Any) -> tuple[str, dict[str, bool] | None] | None:
    """(server, declared annotations) of a tool `langchain.mcp` made; None for any other."""
    metadata = getattr(tool, "metadata", None)
    if not isinstance(metadata, Mapping):
        return None
    mcp = metadata.get("mcp")
    named = metadata.get(SERVER_KEY)
    if not isinstance(mcp, Mapping) and not isinstance(named, str):
        return None
    mcp = mcp if isinstance(mcp, Mapping) else {}
    server_info = mcp.get("server")
    declared_name = server_info.get("name") if isinstance(server_info, Mapping) else None
    server = named if isinstance(named, str) else declared_name
    if not isinstance(server, str) or not server:
        return None
    tool_meta = mcp.get("tool")
    annotations = tool_meta.get("annotations") if isinstance(tool_meta, Mapping) else None
    return server, from_wire(annotations if isinstance(annotations, Mapping) else None)


def register_mcp_tools(guard: Guard, tools: Iterable[Any]) -> None:
    """Tell the guard which tools come from MCP servers. The agent hands the same tool objects
    at every step: each is read once, unless its name or metadata object was replaced."""
    for tool in tools:
        if tool is None or not guard.tools.unread(tool):
            continue
        identity = mcp_identity(tool)
        if identity is not None:
            guard.tools.add(tool.name, *identity)


def name_server(tools: Iterable[BaseTool], name: str) -> list[BaseTool]:
    """Copies of `tools` that the guard knows as server `name`, whatever the server calls
    itself: a server chooses its own `serverInfo.name`, so a policy that pins a server's
    annotations or rules on `server:` should name the server here rather than trust it."""
    return [tool.model_copy(update={"metadata": {**(tool.metadata or {}), SERVER_KEY: name}}) for tool in tools]
