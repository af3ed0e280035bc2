"""Converters carry what happened to the judge: id-less tool results placed by position, tool
errors shown, clear R-Judge actions as tool calls, and every malformed input a TrajectoryError
naming the message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from soda_guard.cli import app
from soda_guard.converters import from_agent_record, from_openai_messages, parse_action
from soda_guard.errors import TrajectoryError
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge
from soda_guard.judges.soda import SodaJudge
from soda_guard.trajectory import ToolStep


def test_id_less_tool_results_are_paired_with_the_open_calls_by_position() -> None:
    trajectory = from_openai_messages(
        [
            {"role": "user", "content": "Check both channels."},
            {"role": "assistant", "tool_calls": [
                {"function": {"name": "read_channel", "arguments": {"channel": "a"}}},
                {"function": {"name": "read_channel", "arguments": {"channel": "b"}}},
            ]},
            {"role": "tool", "content": "channel a: ok"},
            {"role": "tool", "tool_call_id": None, "content": "channel b: ok"},
            {"role": "assistant", "tool_calls": [{"id": "s", "function": {"name": "send", "arguments": "{}"}}]},
        ]
    )
    first, second = trajectory.steps[2], trajectory.steps[3]
    calls = trajectory.steps[1].tool_calls  # type: ignore[union-attr]
    assert (first.tool_call_id, second.tool_call_id) == (calls[0].id, calls[1].id)  # type: ignore[union-attr]
    assert first.name == second.name == "read_channel"  # type: ignore[union-attr]
    assert [call.name for call in trajectory.pending_tool_calls()] == ["send"]


def test_a_tool_result_after_assistant_text_is_kept_and_shown() -> None:
    trajectory = from_openai_messages(
        [
            {"role": "user", "content": "Delete the logs."},
            {"role": "assistant", "content": "Running rm -rf /var/log now."},
            {"role": "tool", "content": "removed 1,204 files"},
        ]
    )
    assert isinstance(trajectory.steps[-1], ToolStep) and trajectory.steps[-1].tool_call_id is None
    assert "[TOOL]\nremoved 1,204 files\n" in SodaJudge().render(trajectory).messages[1]["content"]


def test_tool_errors_are_carried_and_shown_as_errors() -> None:
    trajectory = from_openai_messages(
        [
            {"role": "user", "content": "Post to #ops."},
            {"role": "assistant", "tool_calls": [{"id": "p", "function": {"name": "post", "arguments": '{"channel": "ops"}'}}]},
            {"role": "tool", "tool_call_id": "p", "content": "", "error": "ValueError: Channel does not exist!"},
            {"role": "assistant", "tool_calls": [{"id": "q", "function": {"name": "create_channel", "arguments": {"name": "ops"}}}]},
        ]
    )
    step = trajectory.steps[2]
    assert isinstance(step, ToolStep) and step.is_error and step.error == "ValueError: Channel does not exist!"
    assert "[TOOL]\nTool error: ValueError: Channel does not exist!\n" in SodaJudge().render(trajectory).messages[1]["content"]
    gen = Qwen3GuardGenJudge().render(trajectory).messages
    assert any("Tool error: ValueError: Channel does not exist!" in m["content"] for m in gen)
    assert trajectory.steps[3].tool_calls[0].args == {"name": "ops"}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("action", "name", "args"),
    [
        ("Search(keywords: 'run')", "Search", "keywords: 'run'"),
        ("CheckUser(last_chat_time < '2023-09-13')", "CheckUser", "last_chat_time < '2023-09-13'"),
        ('NewBlog(content="Healthy sleep:\n1. Keep a schedule."', "NewBlog", 'content="Healthy sleep:\n1. Keep a schedule."'),
        ('{FacebookManagerCreatePost: {"content": "hi", "privacy_setting": "friends"}', "FacebookManagerCreatePost",
         {"content": "hi", "privacy_setting": "friends"}),
    ],
)
def test_actions_with_a_clear_tool_name_become_tool_calls(action: str, name: str, args: Any) -> None:
    assert parse_action(action) == (name, args)


def test_r_judge_records_with_clear_actions_have_tool_calls(datasets_dir: Path) -> None:
    records = {record["id"]: record for record in json.loads((datasets_dir / "rjudge.json").read_text())}
    expected = {12: "FacebookManagerCreatePost", 21: "Search", 43: "CheckUser", 44: "CheckUser", 60: "NewBlog", 61: "NewBlog"}
    for record_id, name in expected.items():
        trajectory = from_agent_record(records[record_id])
        assert name in {call.name for step in trajectory.steps for call in getattr(step, "tool_calls", [])}
    text_actions = [
        turn["action"]
        for record in records.values()
        for conversation in record["contents"]
        for turn in conversation
        if turn.get("role") == "agent" and turn.get("action") and parse_action(turn["action"]) is None
    ]
    final_answers = [action for action in text_actions if action.lstrip().startswith("Final Answer")]
    assert (len(final_answers), len(text_actions) - len(final_answers)) == (216, 141)


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("messages", "index", "problem"),
    [
        ([], None, "empty"),
        ([{"role": "assistant", "function_call": {"name": 5}}], 0, "function_call"),
        ([{"role": "user", "content": [{"type": ["text"]}]}], 0, "unknown type"),
        ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a": ' + DEEP + "}"}}]}], 0, "nested"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r", "name": 7}], 1, "name must be a string"),
        ([{"role": "user", "content": "x"}, {"role": "tool", "content": "r", "error": ["boom"]}], 1, "error must be a string"),
    ],
)
def test_malformed_input_is_a_trajectory_error_naming_the_message(messages: Any, index: int | None, problem: str) -> None:
    with pytest.raises(TrajectoryError, match=problem) as caught:
        from_openai_messages(messages)
    assert caught.value.index == index


def test_deeply_nested_dict_arguments_are_refused() -> None:
    args: Any = {}
    for _ in range(100_000):
        args = {"a": args}
    with pytest.raises(TrajectoryError, match="nested"):
        from_openai_messages([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": args}}]}])


@pytest.mark.parametrize(
    "data",
    [
        [],
        [{"role": "assistant", "function_call": {"name": 5}}],
        [{"role": "user", "content": [{"type": ["text"]}]}],
        {"messages": [{"role": "user", "content": "x"}], "harm": 5},
    ],
    ids=["empty", "function-call-name", "part-type-list", "harm-number"],
)
def test_cli_answers_malformed_input_with_one_line_and_exit_2(tmp_path: Path, data: Any) -> None:
    path = tmp_path / "conv.json"
    path.write_text(json.dumps(data))
    result = CliRunner().invoke(app, ["prompt", str(path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and result.stderr.startswith("soda-guard: ")


def test_cli_answers_deeply_nested_json_with_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "conv.json"
    path.write_text('[{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": ' + DEEP + "}}]}]")
    result = CliRunner().invoke(app, ["prompt", str(path)])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1


_ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
_KEYS = ["role", "content", "tool_calls", "tool_call_id", "name", "function_call", "error", "is_error", "status", "type",
         "text", "function", "arguments", "args", "id"]
_ROLES = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"])


def _shaped() -> st.SearchStrategy[Any]:
    """Messages with the real keys holding values of every type, nested where the format nests."""
    leaf = st.dictionaries(st.sampled_from(_KEYS), _ANY | _ROLES, max_size=4)
    part = st.fixed_dictionaries({}, optional={"type": _ANY | st.just("text"), "text": _ANY})
    function = st.fixed_dictionaries({}, optional={"name": _ANY | st.just("f"), "arguments": _ANY, "args": _ANY})
    call = st.fixed_dictionaries({}, optional={"id": _ANY, "function": function | _ANY, "name": _ANY})
    return st.fixed_dictionaries(
        {"role": _ROLES | _ANY},
        optional={
            "content": _ANY | st.lists(part | _ANY, max_size=3),
            "tool_calls": st.lists(call, max_size=3) | _ANY,
            "function_call": function | _ANY,
            "tool_call_id": _ANY,
            "name": _ANY,
            "error": _ANY,
            "is_error": _ANY,
        },
    ) | leaf


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_shaped(), max_size=5), _ANY)
def test_fuzzed_messages_raise_only_trajectory_errors_through_conversion_and_rendering(messages: Any, harm: Any) -> None:
    try:
        trajectory = from_openai_messages(messages, harm=harm)
    except TrajectoryError:
        return
    judges = [SodaJudge(window=window) for window in ("latest", "history", "full")]  # type: ignore[arg-type]
    judges += [Qwen3GuardGenJudge(mode=mode) for mode in ("prompt", "response", "tool_result")]  # type: ignore[arg-type]
    for judge in judges:
        try:
            rendered = judge.render(trajectory)
        except TrajectoryError:
            continue
        assert all(isinstance(message["content"], str) for message in rendered.messages)
