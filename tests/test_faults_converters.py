"""Issue 22: converters refuse every bad input with TrajectoryError (or, for lone surrogates,
replace them with U+FFFD, as documented), and the agent-action parser is linear: inputs that
took 9-17 s each at 64 KB (4x per doubling) are parsed here at 256 KB."""

from __future__ import annotations

import json

import pytest

from soda_guard.converters import MAX_INPUT_DEPTH, from_agent_record, from_openai_messages, parse_action
from soda_guard.errors import TrajectoryError
from soda_guard.verdict import Action, Decision

BIG = 256 * 1024


@pytest.mark.parametrize(
    "action, name",
    [
        ("Search(query=" + " " * BIG + "x", "Search"),
        ("Search(q='" + "a" * BIG, "Search"),
        ("```bash\n" + "ls \n" * (BIG // 4), "bash"),
        ("{Tool: {" + " }" * (BIG // 2), "Tool"),
        ("Tool" + " " * BIG + "\nAction Input: {}", "Tool"),
        ("click " + "<a> " * (BIG // 4) + "x", None),
        ("Tool\n" + "\n" * BIG + "Action Input:" + " " * BIG, "Tool"),
    ],
)
def test_pathological_actions_parse_in_linear_time(action: str, name: str | None) -> None:
    parsed = parse_action(action)
    assert (parsed[0] if parsed else None) in (name, None)


def test_the_parser_still_reads_the_documented_shapes() -> None:
    assert parse_action("  Search(query='x')  ") == ("Search", {"query": "x"})
    assert parse_action("Search(query='x'  ") == ("Search", {"query": "x"})
    assert parse_action("```bash\n rm -rf / \n```") == ("bash", {"command": "rm -rf /"})
    assert parse_action("{Tool: {\"a\": 1}} ") == ("Tool", {"a": 1})
    assert parse_action("Tool \nAction Input: {\"a\": 1}  ") == ("Tool", {"a": 1})


def nested(depth: int) -> object:
    value: object = "x"
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("depth", [MAX_INPUT_DEPTH + 1, 1_000, 100_000])
def test_deep_python_inputs_are_a_trajectory_error(depth: int) -> None:
    deep = nested(depth)
    with pytest.raises(TrajectoryError, match="nested"):
        from_openai_messages([{"role": "user", "content": "x", "metadata": deep}])
    with pytest.raises(TrajectoryError, match="nested"):
        from_agent_record({"contents": [[{"role": "environment", "content": deep}]]})
    with pytest.raises(TrajectoryError, match="nested"):
        from_openai_messages(
            [{"role": "assistant", "content": "", "tool_calls": [{"id": "c", "function": {"name": "t", "arguments": {"a": deep}}}]}]
        )


def test_deep_json_in_an_agent_action_is_refused() -> None:
    action = "Tool: " + '{"a": ' * 300 + "1" + "}" * 300
    with pytest.raises(TrajectoryError, match="nested"):
        from_agent_record({"contents": [[{"role": "agent", "action": action}]]})


@pytest.mark.parametrize("call_id", [7, 1.5, True, ["c"], {"id": "c"}])
def test_call_ids_that_are_not_strings_are_refused(call_id: object) -> None:
    with pytest.raises(TrajectoryError, match="id must be a string"):
        from_openai_messages([{"role": "assistant", "content": "", "tool_calls": [{"id": call_id, "function": {"name": "t"}}]}])
    with pytest.raises(TrajectoryError, match="tool_call_id must be a string"):
        from_openai_messages([{"role": "user", "content": "x"}, {"role": "tool", "tool_call_id": call_id, "content": "r"}])


@pytest.mark.parametrize("record_id", [1.5, True, ["x"]])
def test_record_ids_of_other_types_are_refused(record_id: object) -> None:
    with pytest.raises(TrajectoryError, match="record id"):
        from_agent_record({"id": record_id, "contents": [[{"role": "user", "content": "x"}]]})


def test_lone_surrogates_are_replaced_so_the_decision_can_be_recorded() -> None:
    trajectory = from_openai_messages(
        [
            {"role": "user", "content": "pay \ud800 now"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"id": "c\udc00", "function": {"name": "pay", "arguments": '{"to": "\\ud83d x", "k\\udfff": 1}'}}],
            },
        ],
        conversation_id="conv\ud800",
    )
    [call] = trajectory.pending_tool_calls()
    assert call.id == "c\ufffd" and call.args == {"to": "\ufffd x", "k\ufffd": 1}
    assert trajectory.conversation_id == "conv\ufffd"
    decision = Decision(action=Action.BLOCK, why="x", rule="r", tool_call=call, verdict=None, conversation_id=trajectory.conversation_id)
    json.dumps(decision.model_dump(mode="json"), ensure_ascii=False).encode("utf-8")
    record = from_agent_record({"contents": [[{"role": "agent", "thought": "t\ud800", "action": 'Tool: {"a": "\\udc00"}'}]]})
    assert "\ufffd" in record.steps[0].content and record.steps[0].tool_calls[0].args == {"a": "\ufffd"}
