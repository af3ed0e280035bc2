"""MCP tools loaded through `langchain.mcp` into a LangChain agent, guarded as MCP tools.

`SodaGuardMiddleware` registers every MCP tool it is given (by the `metadata["mcp"]` that
`langchain.mcp` puts on each tool) with its guard, so the policy matches them by server,
`server:tool` and annotations, and the judge sees `server:tool`. The server's name is the one
it declares about itself unless `name_server` gives the tools the name the policy uses. Tools
of several servers loaded at once (a FastMCP `ClientGroup`, an `MCPConfig` of several
servers) are named `<server>_<tool>` for the agent; each is registered as the tool it is on
the server its group names (by its key path, for a group inside a group), by the server's own
name for a tool a config's transform renamed, or refused where that cannot be told.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from langchain_core.tools import BaseTool

from soda_guard.errors import SodaGuardError
from soda_guard.guard import Guard
from soda_guard.mcp.annotations import from_wire

#: `metadata` key under which `name_server` records the name the policy knows a server by
SERVER_KEY = "soda_guard_mcp_server"


class McpRoutingError(SodaGuardError):
    """A tool of several MCP servers loaded at once whose server cannot be told: judged as the
    tool of no server (or of the wrong one), no `server:tool` rule would hold for it."""


class McpIdentity(NamedTuple):
    """What the guard registers a tool as: the policy names servers and their tools, not the
    agent's name for them."""

    server: str
    tool: str
    """The tool's name on its server (the agent may call it by another)."""
    annotations: dict[str, bool] | None


def mcp_identity(tool: Any) -> McpIdentity | None:
    """The server, the tool's name there and the declared annotations of a tool
    `langchain.mcp` made; None for any other. Raises `McpRoutingError` for one whose server
    or whose name there cannot be told, and for one whose server has no name: taken for the
    tool of no server, no rule for servers would hold for it."""
    metadata = getattr(tool, "metadata", None)
    if not isinstance(metadata, Mapping):
        return None
    mcp = metadata.get("mcp")
    named = metadata.get(SERVER_KEY)
    if not isinstance(mcp, Mapping) and not isinstance(named, str):
        return None
    mcp = mcp if isinstance(mcp, Mapping) else {}
    path, server_tool = _route(_client_of(tool), tool.name) if mcp else ((), tool.name)
    server_info = mcp.get("server")
    declared_name = server_info.get("name") if isinstance(server_info, Mapping) else None
    server = named if isinstance(named, str) else "_".join(path) if path else declared_name
    if not isinstance(server, str) or not server:
        raise McpRoutingError(f"soda-guard cannot tell which MCP server runs `{tool.name}`: it has no name; name it with name_server")
    tool_meta = mcp.get("tool")
    annotations = tool_meta.get("annotations") if isinstance(tool_meta, Mapping) else None
    return McpIdentity(server, server_tool, from_wire(annotations if isinstance(annotations, Mapping) else None))


def _client_of(tool: Any) -> Any:
    """The client `langchain.mcp` calls the tool through: its tool's coroutine holds it, and
    nothing else on the tool says which servers stand behind it."""
    coroutine = getattr(tool, "coroutine", None)
    try:
        client = inspect.getclosurevars(coroutine).nonlocals.get("client") if coroutine is not None else None
    except TypeError:  # not a Python function
        client = None
    if client is None:
        raise McpRoutingError(
            f"soda-guard cannot tell which MCP server runs `{tool.name}`: it was not made by the "
            "langchain.mcp this version reads (its call holds no client); load it with langchain.mcp's MCPAdapter"
        )
    return client


def _route(client: Any, name: str) -> tuple[tuple[str, ...], str]:
    """(the keys that lead to the server, the tool's name there) of the tool `client` names
    `name`. A FastMCP `ClientGroup` (whose member may be a client of an `MCPConfig` of several
    servers again) or such a client names it `<key>_<tool>`: the server is known by its key
    path, joined with `_` as the agent's name is, so `prod`'s `files` and `staging`'s are two
    servers. A config mounted without the prefixes is refused. The tool is named as its
    server's config may have renamed it (`_unrenamed`)."""
    from fastmcp.client.group import ClientGroup
    from fastmcp.client.transports import FastMCPTransport, MCPConfigTransport

    if isinstance(client, ClientGroup):
        key, upstream = _prefix(client.clients, name)
        path, server_tool = _route(client.clients[key], upstream)
        return (key, *path), server_tool
    transport = getattr(client, "transport", None)
    if isinstance(transport, FastMCPTransport):
        return (), _unrenamed(name, _proxy_renames(transport.server, name))
    if not isinstance(transport, MCPConfigTransport):
        return (), name
    servers = transport.config.mcpServers
    if len(servers) == 1:
        return (), _unrenamed(name, [_configured_renames(next(iter(servers.values())))])
    if not transport.name_as_prefix:
        raise McpRoutingError(
            f"soda-guard cannot tell which MCP server runs `{name}`: its MCPConfig mounts "
            f"{sorted(servers)} without prefixes; load them as a ClientGroup or one adapter each"
        )
    key, upstream = _prefix(servers, name)
    return (key,), _unrenamed(upstream, [_configured_renames(servers[key])])


def _prefix(members: Mapping[str, Any], name: str) -> tuple[str, str]:
    """(the member key that, with `_`, begins `name`, the rest of it). Two keys that could are
    refused, and so is the empty key: no rule could name its server."""
    keys = [key for key in members if name.startswith(f"{key}_")]
    if len(keys) != 1 or not keys[0]:
        raise McpRoutingError(
            f"soda-guard cannot tell which MCP server runs `{name}`: "
            + (f"servers {sorted(keys)} could all be its prefix; give them names none of which begins another's" if len(keys) > 1
               else "its server's key is empty, so no rule can name it; give it a name" if keys
               else f"no server of {sorted(members)} is its prefix")
        )
    return keys[0], name[len(keys[0]) + 1 :]


def _configured_renames(server: Any) -> Mapping[str, Any]:
    """An `MCPConfig` server's tool transforms, by the name each renames: a multi-server
    config builds the proxy that applies them anew at each connection, so they are read where
    the user wrote them."""
    return getattr(server, "tools", None) or {}


def _proxy_renames(server: Any, name: str) -> list[Mapping[str, Any]]:
    """The tool transforms of an in-process FastMCP proxy, in the order it applies them:
    `ClientGroup.from_config` puts a server's configured transforms on the proxy its member
    calls, and nothing else keeps them. Another in-process server's names are its own.
    Refused where they cannot be read: a tool read without them would pass as read."""
    from mcp.server.mcpserver import MCPServer

    if isinstance(server, MCPServer):  # the `mcp` SDK's: FastMCP's server half may be absent
        return []
    from fastmcp.server.providers.proxy import FastMCPProxy
    from fastmcp.server.transforms import ToolTransform

    if not isinstance(server, FastMCPProxy):
        return []
    renames = [getattr(transform, "_transforms", None) for transform in server.transforms if isinstance(transform, ToolTransform)]
    if not all(isinstance(configs, Mapping) for configs in renames):
        raise McpRoutingError(
            f"soda-guard cannot tell which tool `{name}` is on its MCP server: this FastMCP's tool transforms cannot be read"
        )
    return renames


def _unrenamed(name: str, renames: list[Mapping[str, Any]]) -> str:
    """The server's own name of the tool that tool transforms (applied in order, each keyed by
    the name it renames) hand on as `name`, read back as FastMCP routes a call: the policy's
    `files:delete_*` means the server's `delete_file`, whatever a config calls it for the agent."""
    if not any(renames):
        return name
    from fastmcp.tools.tool_transform import ToolTransformConfig

    for configs in reversed(renames):
        for original, config in configs.items():
            renamed = config if isinstance(config, ToolTransformConfig) else ToolTransformConfig.model_validate(config)
            if (renamed.name or original) == name:
                name = original
                break
    return name


def register_mcp_tools(guard: Guard, tools: Iterable[Any]) -> None:
    """Tell the guard which tools come from MCP servers. The agent hands the same tool objects
    at every step: each is read once, unless its name or metadata object was replaced."""
    for tool in tools:
        if tool is None or not guard.tools.unread(tool):
            continue
        try:
            identity = mcp_identity(tool)
        except BaseException:  # refused, or unreadable: asked again at the next step, never taken for a tool of no server
            guard.tools.forget(tool)
            raise
        if identity is not None:
            guard.tools.add(tool.name, identity.server, identity.annotations, server_tool=identity.tool)


def name_server(tools: Iterable[BaseTool], name: str) -> list[BaseTool]:
    """Copies of `tools` that the guard knows as server `name`, whatever the server calls
    itself: a server chooses its own `serverInfo.name`, so a policy that pins a server's
    annotations or rules on `server:` should name the server here rather than trust it."""
    return [tool.model_copy(update={"metadata": {**(tool.metadata or {}), SERVER_KEY: name}}) for tool in tools]
