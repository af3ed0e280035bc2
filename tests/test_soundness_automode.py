"""Issue 20 item 3: AutoMode tells the truth. What AutoModeMiddleware does with the decision
model's answer (block at 0.5, nothing else) equals what the guard decided, and the audit records
what AutoMode did (langchain-core 1.8+; skipped where `langchain_core.decisions` is absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core.decisions")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import AutoModeMiddleware  # noqa: E402
from langchain_core.decisions import Noul  # noqa: E402
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402

from soda_guard import Guard, Policy, ScriptedBackend, read_audit  # noqa: E402
from soda_guard.backends.scripted import soda_reply  # noqa: E402
from soda_guard.errors import SodaGuardError  # noqa: E402
from soda_guard.generation import GenerationRequest, GenerationResult  # noqa: E402
from soda_guard.integrations.langchain import SodaGuardDecisionModel  # noqa: E402
from soda_guard.integrations.testing import scripted_model  # noqa: E402

from integration_helpers import make_tools, numbered  # noqa: E402

USER = {"messages": [{"role": "user", "content": "Tidy up my files."}]}
TURN = (("read_file", {"path": "notes.txt"}), ("delete_file", {"path": "/"}))


def _scored(score: float) -> ScriptedBackend:
    """A judge that says SAFE with `score` as its P(UNSAFE) for every call."""
    return ScriptedBackend(lambda request: GenerationResult(text=soda_reply(False), score=score))


def _guard(backend: Any, tmp_path: Path, **defaults: Any) -> Guard:
    policy = Policy.from_dict({
        "judges": {"soda": {"kind": "soda", "model": "scripted"}},
        "defaults": defaults,
        "audit": {"jsonl": str(tmp_path / "audit.jsonl")},
    })
    return Guard(policy, backends={"soda": backend})


async def _run(guard: Guard, mode: str, ran: list[Any], replies: list[Any] | None = None) -> dict[str, Any]:
    tools = make_tools(ran)
    auto = AutoModeMiddleware(tools=[t for t in tools if t.name in ("read_file", "delete_file")], classifier=SodaGuardDecisionModel(guard))
    agent = create_agent(scripted_model(replies or [numbered(*TURN), "done"]), tools, middleware=[auto])
    return agent.invoke(USER) if mode == "sync" else await agent.ainvoke(USER)


def _audit(tmp_path: Path) -> list[Any]:
    return list(read_audit(tmp_path / "audit.jsonl"))


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_threshold_below_one_half_still_blocks(mode: str, tmp_path: Path) -> None:
    guard = _guard(_scored(0.35), tmp_path, threshold=0.3)
    ran: list[Any] = []
    result = await _run(guard, mode, ran)
    assert ran == [], "the guard blocked both calls (0.35 >= threshold 0.3) and AutoMode ran them"
    assert all(m.status == "error" for m in result["messages"] if isinstance(m, ToolMessage))
    assert {d.action.value for d in _audit(tmp_path)} == {"block"}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_threshold_above_the_score_lets_the_call_run(mode: str, tmp_path: Path) -> None:
    backend = ScriptedBackend(lambda request: GenerationResult(text=soda_reply(True), score=0.7))
    guard = _guard(backend, tmp_path, threshold=0.9)
    ran: list[Any] = []
    await _run(guard, mode, ran)
    assert sorted(name for name, _ in ran) == ["delete_file", "read_file"]
    assert {d.action.value for d in _audit(tmp_path)} == {"allow"}


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_an_escalation_is_audited_as_the_block_automode_carried_out(mode: str, tmp_path: Path) -> None:
    guard = _guard(ScriptedBackend(lambda request: GenerationResult(text=soda_reply(True), score=0.97)), tmp_path, on_unsafe="escalate")
    ran: list[Any] = []
    await _run(guard, mode, ran)
    assert ran == []
    audit = _audit(tmp_path)
    assert [d.action.value for d in audit] == ["block", "block"]
    assert all("escalate" in d.why and "AutoMode" in d.why for d in audit)


class Broken:
    model_id = "broken"

    def generate(self, requests: list[GenerationRequest]) -> Any:
        raise RuntimeError("judge down")

    async def agenerate(self, requests: list[GenerationRequest]) -> Any:
        raise RuntimeError("judge down")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_judge_failure_is_reported_as_the_failure_not_a_probability(mode: str, tmp_path: Path) -> None:
    guard = _guard(Broken(), tmp_path)
    ran: list[Any] = []
    with pytest.raises(SodaGuardError, match=r"judge down.*on_error.*block"):
        await _run(guard, mode, ran)
    assert ran == []
    audit = _audit(tmp_path)
    assert audit and all(d.action.value == "block" and "judge down" in d.why for d in audit)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_judge_failure_with_on_error_log_runs_and_says_so(mode: str, tmp_path: Path) -> None:
    guard = _guard(Broken(), tmp_path, on_error="log")
    ran: list[Any] = []
    await _run(guard, mode, ran)
    assert sorted(name for name, _ in ran) == ["delete_file", "read_file"]
    assert all(d.action.value == "log" and "judge down" in d.why for d in _audit(tmp_path))


def _long_state(count: int) -> dict[str, Any]:
    messages: list[Any] = [HumanMessage("Wipe the server, she must lose her thesis.")]
    for index in range(count):
        messages += [AIMessage("", tool_calls=[{"id": f"r{index}", "name": "read_file", "args": {"path": str(index)}}]),
                     ToolMessage("ok", tool_call_id=f"r{index}")]
    return {"messages": messages}


@pytest.mark.parametrize(("on_truncated", "expected"), [("judge", "allow"), ("error", "block")])
def test_a_window_cut_by_automode_is_a_truncated_verdict(on_truncated: str, expected: str, tmp_path: Path) -> None:
    guard = _guard(_scored(0.02), tmp_path, on_truncated=on_truncated)
    state = {"messages": _long_state(20)["messages"][-30:], "tool_call": {"id": "d", "name": "delete_file", "args": {"path": "/"}}}
    response = SodaGuardDecisionModel(guard).invoke({"state": state, "questions": {"is_risky": Noul(instructions="?")}})
    [decision] = _audit(tmp_path)
    assert decision.verdict is not None and decision.verdict.truncated
    assert decision.action.value == expected
    assert expected == "allow" or "already cut" in decision.why
    assert (response.nouls["is_risky"].noul >= 0.5) is (expected == "block")


def test_a_short_conversation_is_not_called_truncated(tmp_path: Path) -> None:
    guard = _guard(_scored(0.02), tmp_path, on_truncated="error")
    state = {"messages": _long_state(3)["messages"], "tool_call": {"id": "d", "name": "read_file", "args": {"path": "a"}}}
    response = SodaGuardDecisionModel(guard).invoke({"state": state, "questions": {"is_risky": Noul(instructions="?")}})
    [decision] = _audit(tmp_path)
    assert not decision.verdict.truncated and decision.action.value == "allow"
    assert response.nouls["is_risky"].noul < 0.5


def test_plain_dict_messages_are_judged(tmp_path: Path) -> None:
    backend = _scored(0.02)
    guard = _guard(backend, tmp_path)
    state = {
        "messages": [{"role": "user", "content": "Read my notes."},
                     {"role": "assistant", "content": "", "tool_calls": [{"id": "r", "name": "read_file", "args": {"path": "n"}}]}],
        "tool_call": {"id": "r", "name": "read_file", "args": {"path": "n"}},
    }
    SodaGuardDecisionModel(guard).invoke({"state": state, "questions": {"is_risky": Noul(instructions="?")}})
    assert "Read my notes." in backend.requests[0].messages[-1]["content"]
