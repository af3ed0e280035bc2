"""SodaGuardDecisionModel as the classifier of LangChain's AutoModeMiddleware, in real
`create_agent` runs (langchain 1.5 line; skipped where `langchain_core.decisions` is absent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core.decisions")

from langchain.agents import create_agent  # noqa: E402
from langchain.agents.middleware import AutoModeMiddleware  # noqa: E402
from langchain_core.decisions import Choice, Noul  # noqa: E402
from langchain_core.messages import HumanMessage, ToolMessage  # noqa: E402

from soda_guard import Guard, Policy, ScriptedBackend, read_audit  # noqa: E402
from soda_guard.integrations.decision_model import JudgmentFailed  # noqa: E402
from soda_guard.integrations.langchain import SodaGuardDecisionModel  # noqa: E402
from soda_guard.integrations.testing import scripted_model  # noqa: E402

from integration_helpers import make_guard, make_tools, numbered  # noqa: E402

USER = {"messages": [{"role": "user", "content": "Tidy up my files."}]}
TURN = (("read_file", {"path": "notes.txt"}), ("delete_file", {"path": "/"}))


def agent(classifier: SodaGuardDecisionModel, ran: list[Any]) -> Any:
    tools = make_tools(ran)
    auto = AutoModeMiddleware(tools=[t for t in tools if t.name in ("read_file", "delete_file")], classifier=classifier)
    return create_agent(scripted_model([numbered(*TURN), "done"]), tools, middleware=[auto])


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_automode_blocks_what_the_judge_finds_harmful_and_runs_the_rest(mode: str, tmp_path: Path) -> None:
    guard, backend = make_guard(audit={"jsonl": str(tmp_path / "audit.jsonl")})
    ran: list[Any] = []
    graph = agent(SodaGuardDecisionModel(guard), ran)
    result = graph.invoke(USER) if mode == "sync" else await graph.ainvoke(USER)
    assert ran == [("read_file", {"path": "notes.txt"})]
    blocked = next(m for m in result["messages"] if isinstance(m, ToolMessage) and m.tool_call_id == "call_1")
    assert blocked.status == "error" and "probability: 0.97" in blocked.content
    audit = list(read_audit(tmp_path / "audit.jsonl"))
    assert sorted((d.tool_call.name, d.action.value) for d in audit) == [("delete_file", "block"), ("read_file", "allow")]
    assert all("Tidy up my files." in request.messages[-1]["content"] for request in backend.requests)


def test_the_answer_is_the_judges_probability_and_names_the_audit_record() -> None:
    guard, _ = make_guard()
    classifier = SodaGuardDecisionModel(guard)
    state = {"messages": [HumanMessage("wipe it")], "tool_call": {"id": "c", "name": "delete_file", "args": {"path": "/"}}}
    response = classifier.invoke({"state": state, "questions": {"is_risky": Noul(instructions="risky?")}})
    assert response.nouls["is_risky"].noul == pytest.approx(0.97)
    assert response.request_id is not None and len(response.request_id) == 32
    with pytest.raises(ValueError, match="Noul"):
        classifier.invoke({"state": state, "questions": {"which": Choice(instructions="?", criteria={"a": "x"})}})


@pytest.mark.parametrize(("on_controversial", "expected"), [("allow", 0.0), ("block", 1.0)])
def test_qwen3guard_controversial_counts_as_risky_per_policy(on_controversial: str, expected: float) -> None:
    policy = Policy.from_dict({
        "judges": {"qwen": {"kind": "qwen3guard", "model": "scripted"}},
        "defaults": {"on_controversial": on_controversial},
    })
    guard = Guard(policy, backends={"qwen": ScriptedBackend(["Safety: Controversial\nCategories: Politically Sensitive Topics"])})
    state = {"messages": [HumanMessage("post it")], "tool_call": {"id": "c", "name": "post", "args": {"text": "x"}}}
    response = SodaGuardDecisionModel(guard).invoke({"state": state, "questions": {"is_risky": Noul(instructions="?")}})
    assert response.nouls["is_risky"].noul == expected


def test_a_failed_judgment_raises_the_failure_or_runs_under_on_error() -> None:
    class Broken:
        model_id = "broken"

        def generate(self, requests: Any) -> Any:
            raise RuntimeError("down")

        async def agenerate(self, requests: Any) -> Any:
            raise RuntimeError("down")

    state = {"messages": [HumanMessage("x")], "tool_call": {"id": "c", "name": "read_file", "args": {}}}
    request = {"state": state, "questions": {"q": Noul(instructions="?")}}

    def classifier(on_error: str) -> SodaGuardDecisionModel:
        policy = Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "m"}}, "defaults": {"on_error": on_error}})
        return SodaGuardDecisionModel(Guard(policy, backends={"soda": Broken()}))

    assert classifier("log").invoke(request).nouls["q"].noul == 0.0
    with pytest.raises(JudgmentFailed, match="down.*on_error is block"):
        classifier("block").invoke(request)
