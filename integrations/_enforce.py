"""Shared enforcement for the middleware, the graph node and the `ToolNode` wrapper.

One place decides what happens to a tool call given its Decision (run, refuse, ask a person),
moderates the tool's result, and stamps the record on the `ToolMessage`, so the three
LangChain/LangGraph entry points cannot drift apart in behaviour.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Generator, Mapping, TypeVar

from langchain_core.messages import ToolMessage
from langchain_core.runnables import RunnableLambda
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command, interrupt

from soda_guard.guard import Guard
from soda_guard.policy import Policy
from soda_guard.tracing import OpenTelemetrySink
from soda_guard.trajectory import ToolCall, Trajectory
from soda_guard.verdict import Action, Decision

from soda_guard.integrations._convert import (
    METADATA_KEY,
    REVIEW_RESPONSES,
    STATE_KEY,
    json_safe,
    record_of,
    refusal_text,
    to_tool_call,
    to_trajectory,
    with_calls,
    with_result,
)

Handler = Callable[[ToolCallRequest], "ToolMessage | Command[Any]"]
AsyncHandler = Callable[[ToolCallRequest], Awaitable["ToolMessage | Command[Any]"]]


@dataclass(frozen=True)
class _Judge:
    trajectory: Trajectory
    call: ToolCall


@dataclass(frozen=True)
class _Run:
    request: ToolCallRequest


@dataclass(frozen=True)
class _Moderate:
    trajectory: Trajectory
    call: ToolCall
    message: ToolMessage


_Need = _Judge | _Run | _Moderate

Need = TypeVar("Need")
Answer = TypeVar("Answer")
Result = TypeVar("Result")


def run_steps(steps: Generator[Need, Answer, Result], answer: Callable[[Need], Answer]) -> Result:
    """Drive logic written once as a generator (it yields what it needs, is sent the answer,
    returns its result) with sync answers; `arun_steps` is the same with awaited ones."""
    reply: Any = None
    while True:
        try:
            need = steps.send(reply)
        except StopIteration as done:
            return done.value
        reply = answer(need)


async def arun_steps(steps: Generator[Need, Answer, Result], answer: Callable[[Need], Awaitable[Answer]]) -> Result:
    reply: Any = None
    while True:
        try:
            need = steps.send(reply)
        except StopIteration as done:
            return done.value
        reply = await answer(need)
RUN_NAME = "soda_guard"


def as_guard(policy_or_guard: Policy | Guard, *, otel: bool = True) -> Guard:
    """A Policy gets its own Guard; either way the guard emits OpenTelemetry spans (no-ops
    until an SDK is configured) unless `otel=False`."""
    guard = policy_or_guard if isinstance(policy_or_guard, Guard) else Guard(policy_or_guard)
    if otel and not any(isinstance(sink, OpenTelemetrySink) for sink in guard.sinks):
        guard.sinks.append(OpenTelemetrySink())
    return guard


def thread_id() -> str | None:
    """The LangGraph thread, used as the conversation id (it keys the judge's prefix cache)."""
    from langgraph.config import get_config

    try:
        configurable = get_config().get("configurable") or {}
    except RuntimeError:
        return None
    value = configurable.get("thread_id")
    return None if value is None else str(value)


def _run_config(kind: str, calls: list[ToolCall]) -> dict[str, Any]:
    return {
        "run_name": RUN_NAME,
        "tags": [RUN_NAME, f"{RUN_NAME}:{kind}"],
        "metadata": {"soda_guard_kind": kind, "soda_guard_tools": [call.name for call in calls]},
    }


def _outputs(decisions: list[Decision | None]) -> dict[str, Any]:
    return {"decisions": [record_of(d) for d in decisions if d is not None]}


class Judging:
    """Runs the guard as a child LangChain run named "soda_guard" of whatever is running now,
    so tracers (LangSmith included) show the guard's own run with every verdict as output."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def calls(self, trajectory: Trajectory, calls: list[ToolCall]) -> list[Decision]:
        view = with_calls(trajectory, calls)
        found: list[Decision] = []

        def judge(_: Any) -> dict[str, Any]:
            found[:] = self.guard.check_tool_calls(view)
            return _outputs(list(found))

        RunnableLambda(judge, name=RUN_NAME).invoke(_inputs(calls), _run_config("tool_call", calls))
        return found

    async def acalls(self, trajectory: Trajectory, calls: list[ToolCall]) -> list[Decision]:
        view = with_calls(trajectory, calls)
        found: list[Decision] = []

        async def judge(_: Any) -> dict[str, Any]:
            found[:] = await self.guard.acheck_tool_calls(view)
            return _outputs(list(found))

        await RunnableLambda(_never_sync, afunc=judge, name=RUN_NAME).ainvoke(
            _inputs(calls), _run_config("tool_call", calls)
        )
        return found

    def result(self, trajectory: Trajectory, call: ToolCall, message: ToolMessage) -> Decision | None:
        if self.guard.policy.tool_results is None:
            return None
        view = with_result(trajectory, call, message)
        found: list[Decision | None] = [None]

        def judge(_: Any) -> dict[str, Any]:
            found[0] = self.guard.check_tool_result(view)
            return _outputs(found)

        RunnableLambda(judge, name=RUN_NAME).invoke(_inputs([call]), _run_config("tool_result", [call]))
        return found[0]

    async def aresult(self, trajectory: Trajectory, call: ToolCall, message: ToolMessage) -> Decision | None:
        if self.guard.policy.tool_results is None:
            return None
        view = with_result(trajectory, call, message)
        found: list[Decision | None] = [None]

        async def judge(_: Any) -> dict[str, Any]:
            found[0] = await self.guard.acheck_tool_result(view)
            return _outputs(found)

        await RunnableLambda(_never_sync, afunc=judge, name=RUN_NAME).ainvoke(
            _inputs([call]), _run_config("tool_result", [call])
        )
        return found[0]


def _never_sync(_: Any) -> Any:
    raise RuntimeError("soda-guard's async judging run was invoked synchronously")


def _inputs(calls: list[ToolCall]) -> dict[str, Any]:
    return {"tool_calls": [call.model_dump(mode="json") for call in calls]}


def review_payload(call: ToolCall, record: Mapping[str, Any]) -> dict[str, Any]:
    """What a reviewer sees: JSON only, so any UI or checkpointer can carry it."""
    decision = record["decision"]
    return json_safe(
        {
            "type": "soda_guard_review",
            "tool_call": call.model_dump(mode="json"),
            "action": decision["action"],
            "rule": decision["rule"],
            "why": decision["why"],
            "decision_id": decision["decision_id"],
            "verdict": decision.get("verdict"),
            "allowed_responses": list(REVIEW_RESPONSES),
            "description": f"soda-guard needs a reviewer for `{call.name}`: {decision['why']}",
        }
    )


def parse_review(answer: Any) -> dict[str, Any]:
    """Accepts HumanInTheLoopMiddleware's words (approve / reject+message / edit+args, or
    its `edited_action`); anything else is a ValueError rather than a guess at what the
    reviewer meant."""
    if isinstance(answer, str):
        answer = {"type": answer}
    if not isinstance(answer, Mapping) or answer.get("type") not in REVIEW_RESPONSES:
        raise ValueError(
            f"soda-guard review answer must be a dict with type in {REVIEW_RESPONSES}, got {answer!r}"
        )
    kind = answer["type"]
    if kind == "approve":
        return {"type": "approve"}
    if kind == "reject":
        return {"type": "reject", "message": str(answer.get("message") or "the reviewer rejected this call")}
    args = answer.get("args")
    if args is None and isinstance(answer.get("edited_action"), Mapping):
        args = answer["edited_action"].get("args")
    if not isinstance(args, Mapping):
        raise ValueError(f"soda-guard edit answer needs an `args` object, got {answer!r}")
    return {"type": "edit", "args": json_safe(dict(args))}


def ask_reviewer(call: ToolCall, record: Mapping[str, Any]) -> dict[str, Any]:
    """Pause for a person. LangGraph keeps a resume value once given, so an unusable answer
    cannot be taken back: the question is asked again (a new interrupt, carrying the error)
    until a usable answer arrives."""
    payload = review_payload(call, record)
    while True:
        try:
            return parse_review(interrupt(payload))
        except ValueError as error:
            payload = {**payload, "error": str(error)}


def resolve_fixed(record: Mapping[str, Any], call: ToolCall) -> tuple[str, ToolCall | str] | None:
    """The outcome when no one has to be asked: ("run", call) or ("refuse", why); None when
    the decision is escalate and no review has been recorded yet."""
    if "outcome" in record:
        if record["outcome"] == "run":
            args = record.get("args", call.args)
            return "run", call.model_copy(update={"args": args})
        return "refuse", str(record.get("refusal") or record["decision"]["why"])
    action = Action(record["decision"]["action"])
    if action.runs_tool:
        return "run", call
    if action is Action.BLOCK:
        return "refuse", record["decision"]["why"]
    return None


def apply_review(
    record: dict[str, Any], call: ToolCall, review: dict[str, Any], edit_decision: Decision | None
) -> dict[str, Any]:
    """Fold the reviewer's answer (and the judge's view of an edit) into the record. An edit
    the judge still escalates runs: the person has already reviewed those exact arguments."""
    record = {**record, "review": review}
    if review["type"] == "approve":
        return {**record, "outcome": "run"}
    if review["type"] == "reject":
        return {**record, "outcome": "refuse", "refusal": f"a reviewer rejected it: {review['message']}"}
    assert edit_decision is not None
    record["edit_decision"] = record_of(edit_decision)
    if edit_decision.action is Action.BLOCK:
        return {**record, "outcome": "refuse", "refusal": f"the reviewer's edit was judged too: {edit_decision.why}"}
    return {**record, "outcome": "run", "args": review["args"]}


class ToolCallEnforcer:
    """Enforces one tool call inside a `wrap_tool_call` chain. Decisions come from the graph
    state's `soda_guard` key when an earlier hook judged the turn in one batch; otherwise the
    call is judged here, and remembered by id so an interrupt's resume does not judge again."""

    def __init__(self, guard: Guard, *, state_key: str = STATE_KEY, harm: str | None = None,
                 environment: str | None = None, cache_size: int = 4096) -> None:
        self.guard = guard
        self.judging = Judging(guard)
        self.state_key = state_key
        self.harm = harm
        self.environment = environment
        self._memory: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def trajectory(self, state: Any) -> Trajectory:
        messages = state.get("messages", []) if isinstance(state, Mapping) else getattr(state, "messages", [])
        return to_trajectory(messages, conversation_id=thread_id(), harm=self.harm, environment=self.environment)

    def _known(self, state: Any, call_id: str) -> dict[str, Any] | None:
        records = state.get(self.state_key) if isinstance(state, Mapping) else None
        if records and call_id in records and "decision" in records[call_id]:
            return dict(records[call_id])
        with self._lock:
            found = self._memory.get(call_id)
        return dict(found) if found is not None else None

    def _remember(self, call_id: str, record: dict[str, Any]) -> None:
        with self._lock:
            self._memory[call_id] = record
            self._memory.move_to_end(call_id)
            while len(self._memory) > self._cache_size:
                self._memory.popitem(last=False)

    def _refusal(self, request: ToolCallRequest, call: ToolCall, why: str) -> ToolMessage:
        return ToolMessage(
            content=refusal_text(call.name, why), tool_call_id=call.id, name=call.name, status="error"
        )

    def _finish(self, request: ToolCallRequest, call: ToolCall, record: dict[str, Any],
                message: ToolMessage) -> ToolMessage | Command[Any]:
        self._remember(call.id, record)
        metadata = {**message.response_metadata, METADATA_KEY: record}
        message = message.model_copy(update={"response_metadata": metadata})
        if isinstance(request.state, Mapping) and self.state_key in request.state:
            return Command(update={"messages": [message], self.state_key: {call.id: record}})
        return message

    def _moderated(self, record: dict[str, Any], call: ToolCall, result: ToolMessage,
                   decision: Decision | None) -> tuple[dict[str, Any], ToolMessage]:
        if decision is None:
            return record, result
        record = {**record, "result_decision": record_of(decision)}
        if decision.action.runs_tool:
            return record, result
        why = decision.why if decision.action is Action.BLOCK else (
            f"{decision.why} (a tool result cannot wait for review without running the tool again, so it is withheld)"
        )
        refused = ToolMessage(
            content=f"soda-guard withheld the result of `{call.name}`: {why}.",
            tool_call_id=result.tool_call_id, name=result.name, status="error",
        )
        return record, refused

    def _run_request(self, request: ToolCallRequest, call: ToolCall) -> ToolCallRequest:
        if call.args == request.tool_call.get("args"):
            return request
        return request.override(tool_call={**request.tool_call, "args": call.args})

    def _steps(self, request: ToolCallRequest) -> Generator[_Need, Any, ToolMessage | Command[Any]]:
        """One tool call's enforcement once for both paths: it yields what it needs (decisions
        for calls, the tool's run, the result's moderation) and is sent the answer; `wrap`
        answers with sync calls, `awrap` awaits them."""
        call = to_tool_call(request.tool_call)
        base = self.trajectory(request.state)
        record = self._known(request.state, call.id)
        if record is None:
            record = {"decision": record_of((yield _Judge(base, call))[0])}
            self._remember(call.id, record)
        outcome = resolve_fixed(record, call)
        if outcome is None:
            review = ask_reviewer(call, record)
            edit_decision = None
            if review["type"] == "edit":
                edited = call.model_copy(update={"args": review["args"]})
                edit_decision = (yield _Judge(base, edited))[0]
            record = apply_review(record, call, review, edit_decision)
            outcome = resolve_fixed(record, call)
            assert outcome is not None
        kind, detail = outcome
        if kind == "refuse":
            return self._finish(request, call, record, self._refusal(request, call, str(detail)))
        assert isinstance(detail, ToolCall)
        result = yield _Run(self._run_request(request, detail))
        if not isinstance(result, ToolMessage):
            return result
        verdict = yield _Moderate(base, detail, result)
        record, result = self._moderated(record, detail, result, verdict)
        return self._finish(request, call, record, result)

    def wrap(self, request: ToolCallRequest, handler: Handler) -> ToolMessage | Command[Any]:
        def answer(need: _Need) -> Any:
            if isinstance(need, _Judge):
                return self.judging.calls(need.trajectory, [need.call])
            if isinstance(need, _Run):
                return handler(need.request)
            return self.judging.result(need.trajectory, need.call, need.message)

        return run_steps(self._steps(request), answer)

    async def awrap(self, request: ToolCallRequest, handler: AsyncHandler) -> ToolMessage | Command[Any]:
        async def answer(need: _Need) -> Any:
            if isinstance(need, _Judge):
                return await self.judging.acalls(need.trajectory, [need.call])
            if isinstance(need, _Run):
                return await handler(need.request)
            return await self.judging.aresult(need.trajectory, need.call, need.message)

        return await arun_steps(self._steps(request), answer)
