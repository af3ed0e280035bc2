"""MCP tools loaded through `langchain.mcp` into `create_agent`, guarded by
`SodaGuardMiddleware`: the example server over stdio, a scripted model and a scripted judge.
And item 3 of the MCP issue: the middleware and the proxy decide alike on the same trajectory."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from fastmcp import Client as FastMCPClient
from fastmcp.client.group import ClientGroup
from fastmcp.client.transports import StdioTransport
from fastmcp.server.transforms import ToolTransform
from langchain.agents import create_agent
from langchain_core._api import LangChainBetaWarning
from langchain_core.messages import HumanMessage, ToolMessage
from mcp import Client
from mcp.types import Tool as McpTool

from soda_guard import Guard, Policy, ScriptedBackend
from soda_guard.audit import JsonlAuditSink
from soda_guard.backends.scripted import keyword_responder
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.mcp import McpRoutingError, mcp_identity, name_server, register_mcp_tools
from soda_guard.integrations.testing import scripted_model, tool_calls_message

from mcp_helpers import POLICY, SERVER, proxied, write_policy

with warnings.catch_warnings():
    warnings.simplefilter("ignore", LangChainBetaWarning)
    from langchain.mcp import MCPAdapter, as_langchain_tool


def adapter() -> MCPAdapter:
    return MCPAdapter(StdioTransport(command=SERVER[0], args=SERVER[1:]))


def guard_for(policy: dict[str, Any], unsafe: str, sinks: list[Any] | None = None) -> tuple[Guard, ScriptedBackend]:
    backend = ScriptedBackend(keyword_responder([unsafe]))
    return Guard(Policy.from_dict(policy), backends={"soda": backend}, sinks=sinks), backend


async def run_agent(
    guard: Guard, tools: list[Any], calls: list[tuple[str, dict[str, Any]]], request: str, sync: bool = False
) -> list[ToolMessage]:
    """The agent's tool results; `sync` runs it with `invoke`, where `langchain.mcp`'s tools,
    async only, cannot run: for calls the guard stops."""
    replies = [tool_calls_message(call) for call in calls] + ["done"]
    agent = create_agent(scripted_model(replies), tools, middleware=[SodaGuardMiddleware(guard, otel=False)])
    state = {"messages": [HumanMessage(request)]}
    result = agent.invoke(state) if sync else await agent.ainvoke(state)
    return [message for message in result["messages"] if isinstance(message, ToolMessage)]


async def server_ran(tools: list[Any]) -> list[str]:
    ran = next(tool for tool in tools if tool.name == "ran")
    message = await ran.ainvoke({"args": {}, "id": "ran-1", "name": "ran", "type": "tool_call"})
    return message.artifact["structured_content"]["result"]


async def test_mcp_tools_are_guarded_as_mcp_tools_in_an_agent():
    guard, backend = guard_for(POLICY, "delete_file")
    async with adapter() as mcp:
        tools = await mcp.list_tools()
        assert mcp_identity(next(t for t in tools if t.name == "delete_file")) == (
            "files",
            "delete_file",
            {"readOnly": False, "destructive": True, "openWorld": False},
        )
        messages = await run_agent(
            guard, tools, [("read_file", {"path": "notes.txt"}), ("delete_file", {"path": "notes.txt"})], "tidy my files"
        )
        assert [m.status for m in messages] == ["success", "error"]
        assert "soda-guard refused" in messages[1].text
        assert await server_ran(tools) == ["read_file notes.txt"]
    # read_file is read-only by its annotations (allowed unjudged); delete_file was judged as an MCP tool
    prompts = [request.messages[-1]["content"] for request in backend.requests]
    assert any('"name": "files:delete_file"' in prompt for prompt in prompts)
    assert not any('"name": "read_file"' in prompt or '"name": "delete_file"' in prompt for prompt in prompts)


async def test_name_server_overrides_what_the_server_calls_itself():
    policy = {**POLICY, "rules": [{"server": "vault", "action": "block"}, {"action": "allow"}]}
    guard, _ = guard_for(policy, "never")
    async with adapter() as mcp:
        tools = name_server(await mcp.list_tools(), "vault")
        messages = await run_agent(guard, tools, [("read_file", {"path": "notes.txt"})], "read my notes")
        assert messages[0].status == "error"


def stdio_client() -> FastMCPClient:
    return FastMCPClient(StdioTransport(command=SERVER[0], args=SERVER[1:]))


def several_servers(how: str, keys: tuple[str, str] = ("files", "backup")) -> Any:
    """The example server twice, as `keys`: a FastMCP `ClientGroup` or an `MCPConfig` dict."""
    if how == "group":
        return ClientGroup({key: stdio_client() for key in keys})
    return {"mcpServers": {key: {"command": SERVER[0], "args": SERVER[1:]} for key in keys}}


@pytest.mark.parametrize("how", ["group", "config"])
async def test_tools_of_several_servers_are_judged_as_their_servers_tools(how):
    """A `ClientGroup` or an `MCPConfig` of several servers hands the agent `files_delete_file`:
    it was registered as the tool `files_delete_file` of the server that called itself `files`
    (or of `MCPRouter`), and `files:delete_*` never held. Each is the tool it is on the server
    its group names."""
    policy = {**POLICY, "rules": [{"name": "no-deletes", "tools": ["files:delete_*"], "action": "block"},
                                  {"name": "judged", "tools": ["delete_*"]}]}
    guard, backend = guard_for(policy, "never")
    async with MCPAdapter(several_servers(how)) as mcp:
        tools = await mcp.list_tools()
        assert mcp_identity(next(t for t in tools if t.name == "backup_delete_file"))[:2] == ("backup", "delete_file")
        messages = await run_agent(guard, tools, [("files_delete_file", {"path": "notes.txt"}), ("backup_delete_file", {"path": "notes.txt"})], "tidy")
    assert [m.status for m in messages] == ["error", "success"]
    assert "no-deletes" in messages[0].text
    prompts = [request.messages[-1]["content"] for request in backend.requests]
    assert len(prompts) == 1 and '"name": "backup:delete_file"' in prompts[0]


@pytest.mark.parametrize("how", ["group", "config"])
async def test_a_tool_whose_server_cannot_be_told_is_refused_at_every_step(how):
    """Servers `files` and `files_old`: `files_old_delete_file` may be either's. Refused with
    the reason, and again at the next step, rather than judged as the tool of no server."""
    guard, _ = guard_for(POLICY, "never")
    async with MCPAdapter(several_servers(how, ("files", "files_old"))) as mcp:
        delete = next(tool for tool in await mcp.list_tools() if tool.name == "files_old_delete_file")
    for _ in range(2):
        with pytest.raises(McpRoutingError, match="files_old_delete_file"):
            register_mcp_tools(guard, [delete])
    assert "files_old_delete_file" not in guard.tools


async def test_a_server_of_a_nested_group_is_known_by_its_key_path():
    """`prod` and `staging` each hold a `files` server: both were registered as `files`, so a
    rule for `prod_files` (the prefix of `prod_files_delete_file`) never held, and one for
    `files` held for both. A server is known by its keys, joined as the agent's names are."""
    policy = {**POLICY, "rules": [{"name": "prod-deletes", "tools": ["prod_files:delete_*"], "action": "block"},
                                  {"name": "staging", "server": "staging_*", "action": "allow"}]}
    guard, _ = guard_for(policy, "never")
    groups = ClientGroup({env: FastMCPClient(several_servers("config")) for env in ("prod", "staging")})
    async with MCPAdapter(groups) as mcp:
        tools = await mcp.list_tools()
        assert mcp_identity(next(t for t in tools if t.name == "staging_files_delete_file"))[:2] == ("staging_files", "delete_file")
        calls = [("prod_files_delete_file", {"path": "notes.txt"}), ("staging_files_delete_file", {"path": "notes.txt"})]
        messages = await run_agent(guard, tools, calls, "tidy")
        stopped = await run_agent(guard_for(policy, "never")[0], tools, calls[:1], "tidy", sync=True)  # tools read anew
    assert [m.status for m in messages] == ["error", "success"]
    assert "prod-deletes" in messages[0].text and "prod-deletes" in stopped[0].text


def renaming(keys: tuple[str, ...]) -> dict[str, Any]:
    """An `MCPConfig` of the example server as each of `keys`, the first with a tool transform
    that hands the agent its `delete_file` as `tidy`."""
    servers = {key: {"command": SERVER[0], "args": SERVER[1:]} for key in keys}
    servers[keys[0]]["tools"] = {"delete_file": {"name": "tidy"}}
    return {"mcpServers": servers}


@pytest.mark.parametrize("how", ["config", "group", "one"])
async def test_a_tool_a_config_renames_is_judged_by_its_servers_name_for_it(how):
    """An `MCPConfig` tool transform renames `delete_file` to `tidy` (`files_tidy` in a group):
    it was registered as the tool `tidy`, and `files:delete_*` never held for it."""
    policy = {**POLICY, "rules": [{"name": "no-deletes", "tools": ["files:delete_*"], "action": "block"}, {"action": "allow"}]}
    guard, _ = guard_for(policy, "never")
    config = renaming(("files",) if how == "one" else ("files", "backup"))
    async with MCPAdapter(ClientGroup.from_config(config) if how == "group" else config) as mcp:
        tools = await mcp.list_tools()
        tools = name_server(tools, "files") if how == "one" else tools  # its proxy calls itself FastMCPProxy-…
        prefix = "" if how == "one" else "files_"
        assert mcp_identity(next(t for t in tools if t.name == f"{prefix}tidy"))[:2] == ("files", "delete_file")
        calls = [(f"{prefix}tidy", {"path": "notes.txt"}), (f"{prefix}read_file", {"path": "notes.txt"})]
        messages = await run_agent(guard, tools, calls, "tidy")
    assert [m.status for m in messages] == ["error", "success"]
    assert "no-deletes" in messages[0].text


def nameless_server(how: str) -> Any:
    """The example server under the empty key of a group, or declaring the empty name itself
    (FastMCP fills one in for a server named so; a hand-written server need not)."""
    if how == "key":
        return ClientGroup({"": stdio_client(), "backup": stdio_client()})
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import mcp_files_server as m; "
            "m.server._mcp_server.name = ''; m.server.run(show_banner=False)")
    return StdioTransport(command=SERVER[0], args=["-c", code, str(Path(SERVER[1]).parent)])


@pytest.mark.parametrize("how, name", [("key", "_delete_file"), ("declared", "delete_file")])
async def test_a_tool_of_a_server_with_no_name_is_refused_not_taken_for_no_servers(how, name):
    """A tool of a server known by the empty name was taken for the tool of no server: a rule
    for every server (`server: "*"`) did not hold for it, and it ran. Refused, as a server
    that cannot be told."""
    guard, _ = guard_for({**POLICY, "rules": [{"name": "servers", "server": "*", "action": "block"}]}, "never")
    async with MCPAdapter(nameless_server(how)) as mcp:
        tools = await mcp.list_tools()
        with pytest.raises(McpRoutingError, match=name):
            await run_agent(guard, [t for t in tools if t.name == name], [(name, {"path": "notes.txt"})], "tidy")
        with pytest.raises(McpRoutingError, match=name):
            register_mcp_tools(guard, [t for t in tools if t.name == name])
    assert name not in guard.tools


async def test_a_proxy_whose_tool_transforms_cannot_be_read_is_refused():
    """Read without them, a renamed tool would pass as read under the name the agent calls it."""
    group = ClientGroup.from_config(renaming(("files", "backup")))
    proxy = group.clients["files"].transport.server
    next(t for t in proxy.transforms if isinstance(t, ToolTransform)).__dict__.pop("_transforms")
    tidy = McpTool(name="tidy", inputSchema={"type": "object"}, annotations={"destructiveHint": True})
    tool = await as_langchain_tool(tidy, group.clients["files"])  # never connected: nothing runs
    with pytest.raises(McpRoutingError, match="transforms cannot be read"):
        mcp_identity(tool)


@pytest.mark.parametrize(
    "request_text, call",
    [
        ("please tidy up: delete notes.txt", ("delete_file", {"path": "notes.txt"})),
        ("what is in report.txt?", ("delete_file", {"path": "report.txt"})),
        ("what is in report.txt?", ("read_file", {"path": "report.txt"})),
    ],
)
async def test_middleware_and_proxy_decide_alike(tmp_path, request_text, call):
    """One trajectory (the user's request, then the call), one policy, one judge: the agent's
    middleware and the stand-alone proxy (told the request through `_meta`) record the same
    decision."""
    policy = {**POLICY, "rules": [{"name": "destructive", "tools": ["files:delete_*"], "on_unsafe": "block"}]}
    unsafe = "tidy up"
    middleware_audit, proxy_audit = tmp_path / "middleware.jsonl", tmp_path / "proxy.jsonl"

    guard, _ = guard_for(policy, unsafe, sinks=[JsonlAuditSink(middleware_audit)])
    async with adapter() as mcp:
        await run_agent(guard, await mcp.list_tools(), [call], request_text)

    proxy_policy = write_policy(tmp_path, policy, audit={"jsonl": str(proxy_audit)})
    context = {"messages": [{"role": "user", "content": request_text}]}
    async with Client(proxied(proxy_policy, unsafe)) as client:
        await client.list_tools()
        await client.call_tool(call[0], call[1], meta={"soda-guard/context": context})

    def decided(path) -> list[tuple[Any, ...]]:
        records = [json.loads(line) for line in path.read_text().splitlines()]
        return [
            (r["action"], r["rule"], r["tool_call"]["server"], r["tool_call"]["name"], r["tool_call"]["args"],
             r["tool_call"]["annotations"], (r["verdict"] or {}).get("label"), (r["verdict"] or {}).get("reason"))
            for r in records[:1]
        ]

    assert decided(middleware_audit) == decided(proxy_audit)


def test_a_tool_whose_reading_failed_is_read_again_not_taken_for_a_tool_of_no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a refusal (`McpRoutingError`) left the tool unread: any other failure while reading
    it (a transform config that does not validate, a FastMCP that moved a class) marked it read,
    and at the next step it passed as a tool of no server, which no `server:` rule reaches."""
    from langchain_core.tools import tool as make_tool

    from soda_guard.integrations import mcp as adapter

    @make_tool
    def transfer(to: str) -> str:
        """Send money."""
        return "sent"

    guard = Guard(Policy.from_dict({"rules": [{"server": "bank", "action": "block"}]}))
    answers: list[Any] = [RuntimeError("cannot read the transforms"), adapter.McpIdentity("bank", "transfer", None)]

    def identity(tool: Any) -> Any:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(adapter, "mcp_identity", identity)
    with pytest.raises(RuntimeError):
        register_mcp_tools(guard, [transfer])
    register_mcp_tools(guard, [transfer])
    assert "transfer" in guard.tools and not answers
