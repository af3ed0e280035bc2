"""Trajectory model and converters, including every record of the shared datasets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from soda_guard import AssistantStep, ToolStep, Trajectory, TrajectoryError, UserStep, from_agent_record, from_openai_messages
from soda_guard.converters import parse_action


def test_json_round_trip_keeps_every_field() -> None:
    trajectory = from_openai_messages(
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "function": {"name": "f", "arguments": '{"x": [1, 2]}'}}]},
            {"role": "tool", "tool_call_id": "1", "content": "boom", "status": "error"},
        ],
        harm="h",
        environment="e",
        conversation_id="c",
    )
    again = Trajectory.model_validate_json(trajectory.model_dump_json())
    assert again == trajectory
    assert trajectory.steps[1] == UserStep(content="a\nb")
    tool = trajectory.steps[3]
    assert isinstance(tool, ToolStep) and tool.is_error and tool.name == "f"


def test_pending_calls_are_those_of_the_last_assistant_without_results() -> None:
    trajectory = from_openai_messages(
        [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "a", "function": {"name": "f", "arguments": "{}"}},
                {"id": "b", "function": {"name": "g", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "a", "content": "done"},
        ]
    )
    assert [call.id for call in trajectory.pending_tool_calls()] == ["b"]
    view = trajectory.with_only_pending_call("b")
    last = view.steps[-1]
    assert isinstance(last, AssistantStep) and [c.id for c in last.tool_calls] == ["b"]
    assert from_openai_messages([{"role": "user", "content": "hi"}]).pending_tool_calls() == []


@pytest.mark.parametrize(
    ("messages", "index", "problem"),
    [
        ([{"role": "user", "content": "ok"}, {"role": "robot", "content": "x"}], 1, "unknown role"),
        ([{"role": "user", "content": 3}], 0, "content must be"),
        ([{"role": "user", "content": [{"type": "weird"}]}], 0, "unknown type"),
        ([{"role": "assistant", "tool_calls": [{"function": {}}]}], 0, "no function name"),
        ([{"role": "tool", "content": "x", "tool_call_id": ["a"]}], 0, "tool_call_id must be a string"),
        (["not a dict"], 0, "expected an object"),
    ],
)
def test_malformed_openai_messages_name_the_index(messages: list, index: int, problem: str) -> None:
    with pytest.raises(TrajectoryError, match=problem) as caught:
        from_openai_messages(messages)
    assert caught.value.index == index
    assert str(caught.value).startswith(f"message {index}:")


@pytest.mark.parametrize(
    ("action", "name", "args"),
    [
        ("GmailReadEmail{'email_id': 'email001'}", "GmailReadEmail", {"email_id": "email001"}),
        ('Lock\nAction Input: {"guest_ids": ["a"], "permanent": true}', "Lock", {"guest_ids": ["a"], "permanent": True}),
        ('Send{"to": "x"}', "Send", {"to": "x"}),
        ("GoogleSearch(keyword='emulator')", "GoogleSearch", {"keyword": "emulator"}),
        ("Send{broken: dict", None, None),
        ("Tool\nAction Input: not a dict", "Tool", "not a dict"),
        ("click <Settings>", "click", "<Settings>"),
        ("click <Goodnotes><download>", "click", "<Goodnotes><download>"),
        ('DropboxDownloadFile: {"path": "/a.csv"}\n', "DropboxDownloadFile", {"path": "/a.csv"}),
        ("TeladocViewPrescriptions: {}", "TeladocViewPrescriptions", {}),
        ('{FacebookCreatePost: {"content": "hi"}}', "FacebookCreatePost", {"content": "hi"}),
        ('"command": {"name": "execute_python_file", "args": {"filename": "x.py"}}}', "execute_python_file", {"filename": "x.py"}),
        ('"command": {\n  "name": "read_file",\n  "args": {"path": "~/.ssh"}\n}\n}', "read_file", {"path": "~/.ssh"}),
        ("```bash\nchmod 644 mainpage.html\n```", "bash", {"command": "chmod 644 mainpage.html"}),
        ("```bash\nls -l```", "bash", {"command": "ls -l"}),
        ("Final Answer: the tweet was posted.", None, None),
        ("I have successfully sent $249 to Amy.", None, None),
        ("click https://example.com", None, None),
    ],
)
def test_action_shapes(action: str, name: str | None, args: object) -> None:
    parsed = parse_action(action)
    if name is None:
        assert parsed is None
    else:
        assert parsed == (name, args)


def test_record_conversion_links_results_to_calls_and_keeps_raw_actions() -> None:
    record = {
        "id": 7,
        "profile": "You are helpful.",
        "contents": [[
            {"role": "user", "content": "do it"},
            {"role": "agent", "thought": "ok", "action": "Pay{'amount': 5}"},
            {"role": "environment", "content": "paid"},
            {"role": "agent", "thought": "", "action": "click here to buy"},
            {"role": "agent", "thought": "", "action": "Complete{'response': 'All done.'}"},
        ]],
        "label": 1,
    }
    trajectory = from_agent_record(record)
    kinds = [step.role for step in trajectory.steps]
    assert kinds == ["system", "user", "assistant", "tool", "assistant", "assistant"]
    call = trajectory.steps[2].tool_calls[0]
    assert (call.name, call.args) == ("Pay", {"amount": 5})
    assert trajectory.steps[3].tool_call_id == call.id
    assert trajectory.steps[4].content == "click here to buy"
    assert trajectory.steps[5].content == "All done."
    assert trajectory.conversation_id == "7"


def test_malformed_record_names_the_turn() -> None:
    with pytest.raises(TrajectoryError, match="message 1: unknown turn role 'robot'"):
        from_agent_record({"contents": [[{"role": "user", "content": "x"}, {"role": "robot"}]]})
    with pytest.raises(TrajectoryError, match="no 'contents'"):
        from_agent_record({"id": 1})


@pytest.mark.parametrize("name", ["rjudge.json", "agentharm_trajectories.json"])
def test_every_shared_dataset_record_converts(datasets_dir: Path, name: str) -> None:
    records = json.loads((datasets_dir / name).read_text(encoding="utf-8"))
    documented = re.compile(r"^\s*[A-Za-z_][\w.\-]*\s*\{|\nAction Input:")
    shaped = raw_args = 0
    for record in records:
        trajectory = from_agent_record(record)
        assert any(isinstance(step, UserStep) for step in trajectory.steps)
        assert Trajectory.model_validate_json(trajectory.model_dump_json()) == trajectory
        for conversation in record["contents"]:
            for turn in conversation:
                action = turn.get("action") if turn["role"] == "agent" else None
                if action and documented.search(action):
                    shaped += 1
                    parsed = parse_action(action)
                    assert parsed is not None, action
                    raw_args += isinstance(parsed[1], str)
    assert shaped > 200
    assert raw_args <= 1  # one R-Judge action holds truncated JSON; it is kept verbatim
