"""Review speaks LangChain's human-in-the-loop protocol as `HumanInTheLoopMiddleware` does:
one review config per action request, answers as an `HITLResponse` (a bare decision is not
spread over every call), edits checked whatever shape they come in, the `per_call` interrupt
mode (`ToolApprovalRequest`), and the allowed decisions and description set per policy rule."""

from __future__ import annotations

from typing import Any

import pytest
from langchain.agents.middleware.human_in_the_loop import HITLRequest, ToolApprovalRequest
from langchain_core.messages import ToolMessage
from langgraph.types import Command
from pydantic import TypeAdapter

from soda_guard import Policy
from soda_guard.errors import PolicyError

from integration_helpers import make_guard
from test_integration_binding import USER, config, graph_for, turn

PATHS = ["middleware", "middleware-async", "guard_node", "guard_node-async", "wrapper", "wrapper-async"]
DELETE = ("delete_file", {"path": "/"})
EMAIL = ("send_email", {"to": "a@x.org"})


async def drive(path: str, graph: Any, value: Any) -> Any:
    return await graph.ainvoke(value, config()) if path.endswith("async") else graph.invoke(value, config())


def two_escalations(path: str, **policy: Any) -> tuple[Any, list[Any]]:
    guard, _ = make_guard(unsafe=("delete_file", "send_email"), defaults={"on_unsafe": "escalate"}, **policy)
    ran: list[Any] = []
    second = ("delete_file", {"path": "/etc"})
    return graph_for(path, guard, [turn(DELETE, second, EMAIL, ids=["a", "b", "c"]), "done"], ran), ran


@pytest.mark.parametrize("path", PATHS)
async def test_one_review_config_per_action_request(path: str) -> None:
    graph, _ = two_escalations(path)
    [pause] = (await drive(path, graph, USER))["__interrupt__"]
    request = pause.value
    TypeAdapter(HITLRequest).validate_python({k: request[k] for k in ("action_requests", "review_configs")})
    assert [c["action_name"] for c in request["review_configs"]] == [a["name"] for a in request["action_requests"]]
    assert [a["name"] for a in request["action_requests"]] == ["delete_file", "delete_file", "send_email"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_bare_decision_is_not_applied_to_every_call(path: str) -> None:
    graph, ran = two_escalations(path)
    await drive(path, graph, USER)
    again = await drive(path, graph, Command(resume={"type": "approve"}))
    assert ran == [] and "decisions" in again["__interrupt__"][0].value["error"]
    await drive(path, graph, Command(resume={"decisions": [{"type": "reject"}, {"type": "approve"}, {"type": "reject"}]}))
    assert ran == [("delete_file", {"path": "/etc"})]


@pytest.mark.parametrize(
    "edit",
    [
        {"type": "edit", "args": {"path": "/tmp/x"}, "edited_action": {"name": "read_file", "args": {"path": "/tmp/x"}}},
        {"type": "edit", "args": {"path": "/tmp/x"}, "edited_action": {"name": "delete_file", "args": {"path": "/"}}},
    ],
)
@pytest.mark.parametrize("path", ["middleware", "guard_node", "wrapper"])
async def test_an_edit_with_both_shapes_that_disagree_is_refused(path: str, edit: dict[str, Any]) -> None:
    guard, _ = make_guard(unsafe=("nothing",), defaults={"on_safe": "escalate"})
    ran: list[Any] = []
    graph = graph_for(path, guard, [turn(DELETE, ids=["a"]), "done"], ran)
    await drive(path, graph, USER)
    again = await drive(path, graph, Command(resume={"decisions": [edit]}))
    assert ran == [] and again["__interrupt__"][0].value["error"]


@pytest.mark.parametrize("path", PATHS)
async def test_per_call_mode_asks_one_tool_approval_request_per_call(path: str) -> None:
    graph, ran = two_escalations(path, review={"interrupt_mode": "per_call"})
    [first] = (await drive(path, graph, USER))["__interrupt__"]
    TypeAdapter(ToolApprovalRequest).validate_python({k: v for k, v in first.value.items() if k != "soda_guard"})
    assert (first.value["type"], first.value["tool_call_id"], first.value["args"]) == ("tool_approval", "a", {"path": "/"})
    [second] = (await drive(path, graph, Command(resume={"type": "reject", "message": "no"})))["__interrupt__"]
    assert ran == [] and second.value["tool_call_id"] == "b"
    wrong = await drive(path, graph, Command(resume={"decisions": [{"type": "approve"}]}))
    assert ran == [] and wrong["__interrupt__"][0].value["tool_call_id"] == "b"
    [third] = (await drive(path, graph, Command(resume={"type": "approve"})))["__interrupt__"]
    assert third.value["tool_call_id"] == "c"
    result = await drive(path, graph, Command(resume={"type": "respond", "message": "sent by hand"}))
    assert ran == [("delete_file", {"path": "/etc"})]
    by_id = {m.tool_call_id: m for m in result["messages"] if isinstance(m, ToolMessage)}
    assert "no" in by_id["a"].content and by_id["c"].content == "sent by hand"


RULES = [{"tools": ["delete_file"], "allowed_decisions": ["approve", "reject"], "description": "Deleting needs sign-off."}]


@pytest.mark.parametrize("path", PATHS)
async def test_allowed_decisions_and_description_come_from_the_rule(path: str) -> None:
    graph, ran = two_escalations(path, rules=RULES)
    [pause] = (await drive(path, graph, USER))["__interrupt__"]
    configs = pause.value["review_configs"]
    assert [c["allowed_decisions"] for c in configs] == [["approve", "reject"], ["approve", "reject"], ["approve", "edit", "reject", "respond"]]
    assert pause.value["action_requests"][0]["description"] == "Deleting needs sign-off."
    respond = {"decisions": [{"type": "respond", "message": "done"}, {"type": "approve"}, {"type": "reject"}]}
    again = await drive(path, graph, Command(resume=respond))
    assert ran == [] and "not allowed" in again["__interrupt__"][0].value["error"]


CONDITIONAL = [
    {"tools": ["delete_file"], "when": {"args": {"path": {"eq": "/etc"}}}, "allowed_decisions": ["reject"], "description": "System paths: reject only."},
]


@pytest.mark.parametrize("path", PATHS)
async def test_the_review_fields_are_the_escalating_rules_even_when_it_has_conditions(path: str) -> None:
    """The rule that escalated the call sets what may be answered, not the first rule without
    conditions for the tool's name (which would be none here, widening the answers)."""
    graph, ran = two_escalations(path, rules=CONDITIONAL)
    [pause] = (await drive(path, graph, USER))["__interrupt__"]
    configs = pause.value["review_configs"]
    assert [c["allowed_decisions"] for c in configs] == [["approve", "edit", "reject", "respond"], ["reject"], ["approve", "edit", "reject", "respond"]]
    assert pause.value["action_requests"][1]["description"] == "System paths: reject only."
    again = await drive(path, graph, Command(resume={"decisions": [{"type": "reject"}, {"type": "approve"}, {"type": "reject"}]}))
    assert ran == [] and "not allowed" in again["__interrupt__"][0].value["error"]


def test_rule_review_fields_are_strict() -> None:
    policy = Policy.from_dict({"rules": RULES})
    assert policy.rules[0].allowed_decisions == ["approve", "reject"]
    for bad in ({"allowed_decisions": []}, {"allowed_decisions": ["aprove"]}, {"description": 3}):
        with pytest.raises(PolicyError):
            Policy.from_dict({"rules": [{"tools": ["x"], **bad}]})
    with pytest.raises(PolicyError):
        Policy.from_dict({"review": {"interrupt_mode": "per_tool"}})

