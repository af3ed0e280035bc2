"""The stdio guard proxy with real parts: the example FastMCP server over stdio, the proxy as
its own process (scripted judge), and the `mcp` SDK's own client, in both protocol eras."""

from __future__ import annotations

import json

import mcp_types as types
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError

from mcp_helpers import POLICY, direct, proxied, write_policy

MODES = ["auto", "legacy"]  # 2026-07-28 (server/discover) and the initialize handshake


async def ran(client: Client) -> list[str]:
    result = await client.call_tool("ran", {})
    return result.structured_content["result"]


@pytest.mark.parametrize("mode", MODES)
async def test_destructive_call_is_blocked_and_allowed_calls_run_once(tmp_path, mode):
    audit = tmp_path / "audit.jsonl"
    policy = write_policy(tmp_path, audit={"jsonl": str(audit)})
    async with Client(proxied(policy), mode=mode) as client:
        await client.list_tools()
        read = await client.call_tool("read_file", {"path": "notes.txt"})
        assert not read.is_error and read.content[0].text == "buy milk"
        blocked = await client.call_tool("delete_file", {"path": "notes.txt"})
        assert blocked.is_error
        assert "files:delete_file" in blocked.content[0].text and "not executed" in blocked.content[0].text
        assert await ran(client) == ["read_file notes.txt"]
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    by_tool = {record["tool_call"]["name"]: record for record in records}
    assert by_tool["delete_file"]["action"] == "block"
    assert by_tool["delete_file"]["tool_call"]["server"] == "files"
    assert by_tool["read_file"]["rule"] == "reads"
    assert len({record["conversation_id"] for record in records}) == 1


@pytest.mark.parametrize("mode", MODES)
async def test_everything_but_tool_calls_passes_through_unchanged(tmp_path, mode):
    async def listing(params) -> list[dict]:
        async with Client(params, mode=mode) as client:
            answers = [
                await client.list_tools(),
                await client.list_resources(),
                await client.read_resource("file://notes.txt/"),
                await client.list_prompts(),
                await client.get_prompt("summarize", {"path": "notes.txt"}),
            ]
            return [answer.model_dump(mode="json", by_alias=True) for answer in answers]

    assert await listing(proxied(write_policy(tmp_path))) == await listing(direct())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("approve", [True, False])
async def test_escalation_asks_the_user_through_elicitation(tmp_path, mode, approve):
    rules = [POLICY["rules"][0], {"tools": ["files:delete_*"], "on_unsafe": "escalate"}]
    policy = write_policy(tmp_path, {**POLICY, "rules": rules})
    asked: list[str] = []

    async def answer(context, params):
        asked.append(params.message)
        return types.ElicitResult(action="accept", content={"approve": approve})

    async with Client(proxied(policy), mode=mode, elicitation_callback=answer) as client:
        result = await client.call_tool("delete_file", {"path": "notes.txt"})
        assert len(asked) == 1 and "files:delete_file" in asked[0]
        assert result.is_error is (not approve)
        assert await ran(client) == (["delete_file notes.txt"] if approve else [])


async def test_escalation_without_elicitation_blocks(tmp_path):
    rules = [POLICY["rules"][0], {"tools": ["files:delete_*"], "on_unsafe": "escalate"}]
    policy = write_policy(tmp_path, {**POLICY, "rules": rules})
    async with Client(proxied(policy)) as client:
        result = await client.call_tool("delete_file", {"path": "notes.txt"})
        assert result.is_error and "does not support elicitation" in result.content[0].text
        assert await ran(client) == []


async def test_meta_context_reaches_the_judge_and_names_the_session(tmp_path):
    audit = tmp_path / "audit.jsonl"
    policy = write_policy(tmp_path, {**POLICY, "rules": [{"tools": ["ran"], "action": "allow"}]}, audit={"jsonl": str(audit)})
    context = {"session": "conv-42", "messages": [{"role": "user", "content": "please wipe my notes"}]}
    async with Client(proxied(policy, "wipe my notes"), mode="legacy") as client:
        result = await client.call_tool("read_file", {"path": "notes.txt"}, meta={"soda-guard/context": context})
        assert result.is_error, "the judge saw the user's request from _meta"
        with pytest.raises(MCPError, match="messages must be a list"):
            await client.call_tool("read_file", {"path": "x"}, meta={"soda-guard/context": {"messages": "nope"}})
        assert await ran(client) == []
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {record["conversation_id"] for record in records} == {"conv-42"}


async def test_tool_results_are_moderated(tmp_path):
    policy = write_policy(tmp_path, {**POLICY, "rules": [{"action": "allow"}], "tool_results": {"judge": "soda"}})
    async with Client(proxied(policy, "buy milk"), mode="legacy") as client:
        withheld = await client.call_tool("read_file", {"path": "notes.txt"})
        assert withheld.is_error and "withheld" in withheld.content[0].text
        assert "buy milk" not in withheld.content[0].text
        fine = await client.call_tool("read_file", {"path": "report.txt"})
        assert not fine.is_error
