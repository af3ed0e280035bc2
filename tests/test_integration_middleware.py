"""SodaGuardMiddleware inside real `create_agent` graphs, driven by a scripted chat model."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.messages import AIMessage, ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command

from soda_guard import Guard, Policy, ScriptedBackend, read_audit
from soda_guard.backends.base import GenerationRequest
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.testing import scripted_model, tool_calls_message

from integration_helpers import MemoryTracer, make_guard, make_tools, numbered

THREE = (("read_file", {"path": "notes.txt"}), ("delete_file", {"path": "/"}), ("send_email", {"to": "bob@x.org"}))
USER = {"messages": [{"role": "user", "content": "Tidy up my machine."}]}


def build(guard: Guard, replies: list[Any], ran: list[Any], checkpointer: Any = None) -> Any:
    return create_agent(
        scripted_model(replies), make_tools(ran), middleware=[SodaGuardMiddleware(guard)], checkpointer=checkpointer
    )


def tool_messages(result: dict[str, Any]) -> list[ToolMessage]:
    return [m for m in result["messages"] if isinstance(m, ToolMessage)]


def records(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The latest turn's records in the graph state (each stored as its signed JSON), by call id."""
    stored = [json.loads(record["record"]) for record in result["soda_guard"]["records"]]
    return {record["call"]["id"]: record for record in stored}


def test_parallel_calls_are_judged_in_one_batch_and_blocked_calls_never_run() -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    result = build(guard, [numbered(*THREE), "All done."], ran).invoke(USER)
    assert backend.batches == [3]
    assert sorted(name for name, _ in ran) == ["read_file", "send_email"]
    messages = tool_messages(result)
    assert sorted(m.tool_call_id for m in messages) == ["call_0", "call_1", "call_2"]
    blocked = next(m for m in messages if m.tool_call_id == "call_1")
    assert blocked.status == "error" and "refused" in blocked.content and "unsafe" in blocked.content
    assert blocked.response_metadata["soda_guard"]["action"] == "block"
    assert result["messages"][-1].content == "All done."
    assert {k: v["decision"]["action"] for k, v in records(result).items()} == {
        "call_0": "allow", "call_1": "block", "call_2": "allow"
    }


async def test_async_agent_batches_and_blocks() -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    result = await build(guard, [numbered(*THREE), "All done."], ran).ainvoke(USER)
    assert backend.batches == [3]
    assert sorted(name for name, _ in ran) == ["read_file", "send_email"]
    assert len(tool_messages(result)) == 3


def test_log_action_runs_and_records() -> None:
    guard, _ = make_guard(defaults={"on_unsafe": "log"})
    ran: list[Any] = []
    result = build(guard, [tool_calls_message(("delete_file", {"path": "/"})), "ok"], ran).invoke(USER)
    assert ran == [("delete_file", {"path": "/"})]
    assert tool_messages(result)[0].response_metadata["soda_guard"]["action"] == "log"


def _escalating(checkpointer: Any, ran: list[Any], guard: Guard, *, resumed: bool = False) -> tuple[Any, dict[str, Any]]:
    """An agent whose first turn reads a file and deletes `/`; `resumed=True` is the same agent
    in a new process after the pause, whose model only has its final answer left."""
    turn = tool_calls_message(("read_file", {"path": "a"}), ("delete_file", {"path": "/"}), ids=["call_0", "call_1"])
    agent = build(guard, ["done"] if resumed else [turn, "done"], ran, checkpointer)
    return agent, {"configurable": {"thread_id": "t1"}}


@pytest.mark.parametrize(
    ("answer", "runs", "content"),
    [
        ({"type": "approve"}, [("delete_file", {"path": "/"})], "deleted /"),
        ({"type": "reject", "message": "never delete root"}, [], "never delete root"),
        ({"type": "edit", "args": {"path": "/tmp/scratch"}}, [("delete_file", {"path": "/tmp/scratch"})], "deleted /tmp/scratch"),
    ],
)
def test_escalation_interrupts_and_resumes(answer: dict[str, Any], runs: list[Any], content: str) -> None:
    guard, backend = make_guard(defaults={"on_unsafe": "escalate"}, unsafe=("delete_file.*\"/\"",))
    ran: list[Any] = []
    agent, config = _escalating(InMemorySaver(), ran, guard)
    paused = agent.invoke(USER, config)
    [pause] = paused["__interrupt__"]
    [action] = pause.value["action_requests"]
    assert (action["name"], action["args"]) == ("delete_file", {"path": "/"})
    assert pause.value["review_configs"] == [
        {"action_name": "delete_file", "allowed_decisions": ["approve", "edit", "reject", "respond"]}
    ]
    assert pause.value["soda_guard"]["calls"][0]["tool_call_id"] == "call_1"
    json.dumps(pause.value)
    assert ran == []
    result = agent.invoke(Command(resume={"decisions": [answer]}), config)
    assert sorted(ran, key=str) == sorted([("read_file", {"path": "a"}), *runs], key=str)
    message = next(m for m in tool_messages(result) if m.tool_call_id == "call_1")
    assert content in message.content
    assert message.status == ("error" if answer["type"] == "reject" else "success")
    assert message.response_metadata["soda_guard"]["review"] == answer["type"]
    assert records(result)["call_1"]["review"]["type"] == answer["type"]
    assert backend.batches == ([2, 1] if answer["type"] == "edit" else [2])


def test_edit_rejudged_and_still_blocked() -> None:
    replies = ["Safety: Safe\nCategories: None", "Safety: Controversial\nCategories: Violent",
               "Safety: Unsafe\nCategories: Violent"]
    backend = ScriptedBackend(replies)
    policy = Policy.from_dict({"judges": {"qwen": {"kind": "qwen3guard", "model": "scripted"}}})
    ran: list[Any] = []
    agent, config = _escalating(InMemorySaver(), ran, Guard(policy, backends={"qwen": backend}))
    assert agent.invoke(USER, config)["__interrupt__"][0].value["soda_guard"]["calls"][0]["action"] == "escalate"
    result = agent.invoke(Command(resume={"decisions": [{"type": "edit", "args": {"path": "/etc"}}]}), config)
    message = next(m for m in tool_messages(result) if m.tool_call_id == "call_1")
    assert message.status == "error" and "edit was judged" in message.content
    assert message.response_metadata["soda_guard"]["edit_decision"]["action"] == "block"
    assert [name for name, _ in ran] == ["read_file"]
    assert backend.batches == [2, 1]


def test_resume_after_restart_with_sqlite_does_not_rejudge(tmp_path: Path) -> None:
    path = tmp_path / "checkpoints.sqlite"
    guard, backend = make_guard(defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    with sqlite3.connect(path, check_same_thread=False) as connection:
        agent, config = _escalating(SqliteSaver(connection), ran, guard)
        assert agent.invoke(USER, config)["__interrupt__"]
    assert backend.batches == [2]
    fresh_guard, fresh_backend = make_guard(defaults={"on_unsafe": "escalate"})
    with sqlite3.connect(path, check_same_thread=False) as connection:
        agent, config = _escalating(SqliteSaver(connection), ran, fresh_guard, resumed=True)
        result = agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config)
    assert fresh_backend.batches == []
    assert ("delete_file", {"path": "/"}) in ran
    assert records(result)["call_1"]["outcome"] == "run"


async def test_async_escalation_resume_does_not_rejudge() -> None:
    guard, backend = make_guard(defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    agent, config = _escalating(InMemorySaver(), ran, guard)
    assert (await agent.ainvoke(USER, config))["__interrupt__"]
    result = await agent.ainvoke(Command(resume={"decisions": [{"type": "reject", "message": "no"}]}), config)
    assert backend.batches == [2]
    assert [name for name, _ in ran] == ["read_file"]
    assert result["messages"][-1].content == "done"


def test_bad_resume_answer_asks_again() -> None:
    guard, _ = make_guard(defaults={"on_unsafe": "escalate"})
    ran: list[Any] = []
    agent, config = _escalating(InMemorySaver(), ran, guard)
    agent.invoke(USER, config)
    again = agent.invoke(Command(resume={"decisions": [{"type": "maybe"}]}), config)["__interrupt__"][0].value
    assert "maybe" in again["error"] and again["soda_guard"]["calls"][0]["tool_call_id"] == "call_1"
    assert ("delete_file", {"path": "/"}) not in ran
    result = agent.invoke(Command(resume={"decisions": [{"type": "approve"}]}), config)
    assert ("delete_file", {"path": "/"}) in ran and result["messages"][-1].content == "done"


def test_tool_result_moderation_blocks_injected_output(tmp_path: Path) -> None:
    guard, backend = make_guard(
        unsafe=("delete_file", "IGNORE PREVIOUS"),
        judges={
            "soda": {"kind": "soda", "model": "scripted"},
            "qwen": {"kind": "qwen3guard", "model": "scripted", "mode": "tool_result"},
        },
        defaults={"judge": "soda"},
        tool_results={"judge": "qwen", "tools": ["fetch_page"]},
        extra_backends={"qwen": ScriptedBackend(["Safety: Unsafe\nCategories: Jailbreak"])},
    )
    ran: list[Any] = []
    replies = [numbered(("fetch_page", {"url": "http://evil.example"}), ("read_file", {"path": "a"})), "ok"]
    result = build(guard, replies, ran).invoke(USER)
    assert sorted(name for name, _ in ran) == ["fetch_page", "read_file"]
    page = next(m for m in tool_messages(result) if m.tool_call_id == "call_0")
    assert page.status == "error" and "IGNORE" not in page.content and "withheld" in page.content
    assert page.response_metadata["soda_guard"]["result_decision"]["action"] == "block"
    other = next(m for m in tool_messages(result) if m.tool_call_id == "call_1")
    assert "soda_guard" not in other.response_metadata


def test_verdicts_reach_metadata_state_tracer_and_audit(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    guard, _ = make_guard(audit={"jsonl": str(audit)})
    tracer = MemoryTracer()
    ran: list[Any] = []
    result = build(guard, [numbered(*THREE), "done"], ran).invoke(USER, {"callbacks": [tracer]})
    [run] = tracer.runs_named("soda_guard")
    assert "soda_guard" in run.tags
    assert [d["action"] for d in run.outputs["decisions"]] == ["allow", "block", "allow"]
    assert run.outputs["decisions"][1]["verdict"]["label"] == "unsafe"
    logged = [d.decision_id for d in read_audit(audit)]
    assert logged == [records(result)[f"call_{i}"]["decision"]["decision_id"] for i in range(3)]
    stamped = {m.tool_call_id: m.response_metadata.get("soda_guard") for m in tool_messages(result)}
    assert stamped["call_0"] is None and stamped["call_2"] is None  # simply allowed: in the audit only
    assert stamped["call_1"] == {"decision_id": logged[1], "action": "block", "label": "unsafe", "score": 0.97, "why": stamped["call_1"]["why"]}


class Boom:
    model_id = "boom"

    def generate(self, requests: list[GenerationRequest]) -> Any:
        raise RuntimeError("judge exploded")

    async def agenerate(self, requests: list[GenerationRequest]) -> Any:
        raise RuntimeError("judge exploded")


@pytest.mark.parametrize("on_error", ["block", "log"])
def test_judge_failure_falls_back_to_on_error(on_error: str) -> None:
    policy = Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "m"}}, "defaults": {"on_error": on_error}})
    guard = Guard(policy, backends={"soda": Boom()})
    ran: list[Any] = []
    result = build(guard, [tool_calls_message(("read_file", {"path": "a"})), "finished"], ran).invoke(USER)
    record = next(iter(records(result).values()))["decision"]
    assert record["action"] == on_error and "judge exploded" in record["why"]
    assert tool_messages(result)[0].response_metadata["soda_guard"]["action"] == on_error
    assert bool(ran) is (on_error == "log")
    assert result["messages"][-1].content == "finished"


def test_judge_timeout_is_recorded() -> None:
    policy = Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "m"}}, "defaults": {"timeout_s": 0.05}})
    guard = Guard(policy, backends={"soda": ScriptedBackend(["[Verdict] SAFE"], delay_s=0.5)})
    ran: list[Any] = []
    result = build(guard, [tool_calls_message(("read_file", {"path": "a"})), "finished"], ran).invoke(USER)
    record = tool_messages(result)[0].response_metadata["soda_guard"]
    assert record["action"] == "block" and "timed out" in record["why"] and ran == []


def test_bad_input_unknown_tool_huge_args_list_content_and_tool_errors() -> None:
    guard, backend = make_guard()
    ran: list[Any] = []
    first = AIMessage(
        content=[{"type": "text", "text": "Working on it"}, {"type": "image_url", "image_url": {"url": "x"}}],
        tool_calls=[
            {"name": "launch_missiles", "args": {"target": "x"}, "id": "c0", "type": "tool_call"},
            {"name": "read_file", "args": {"path": "p" * 200_000}, "id": "c1", "type": "tool_call"},
            {"name": "flaky", "args": {"x": "1"}, "id": "c2", "type": "tool_call"},
        ],
        invalid_tool_calls=[{"name": "send_email", "args": "{not json", "id": "c3", "error": "bad", "type": "invalid_tool_call"}],
    )
    result = build(guard, [first, "recovered"], ran).invoke(USER)
    assert backend.batches == [3]
    by_id = {m.tool_call_id: m for m in tool_messages(result)}
    assert by_id["c0"].status == "error" and "launch_missiles" in by_id["c0"].content
    assert [len(args["path"]) for name, args in ran if name == "read_file"] == [200_000]
    assert by_id["c2"].status == "error" and "service is down" in by_id["c2"].content
    assert all("soda_guard" not in by_id[i].response_metadata for i in ("c0", "c1", "c2"))  # all three allowed by the judge
    assert by_id["c3"].status == "error" and "send_email" not in [name for name, _ in ran]
    assert result["messages"][-1].content == "recovered"


def test_real_tiny_transformers_judge_parse_failure_takes_on_error(tiny_judge_dir: Path) -> None:
    policy = Policy.from_dict(
        {
            "judges": {"soda": {"kind": "soda", "model": str(tiny_judge_dir), "device": "cpu", "max_new_tokens": 4}},
            "defaults": {"on_error": "log"},
        }
    )
    guard = Guard(policy)
    ran: list[Any] = []
    result = build(guard, [tool_calls_message(("read_file", {"path": "a"}), ("delete_file", {"path": "/"})), "done"], ran).invoke(USER)
    decisions = [record["decision"] for record in records(result).values()]
    assert [r["action"] for r in decisions] == ["log", "log"]
    assert [m.response_metadata["soda_guard"]["action"] for m in tool_messages(result)] == ["log", "log"]
    assert all(r["verdict"]["parse_failure"] and r["verdict"].get("label") is None for r in decisions)
    assert all(r["verdict"]["model"] == str(tiny_judge_dir) or r["verdict"]["model"] for r in decisions)
    assert len(ran) == 2
