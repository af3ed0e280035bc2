"""Shared enforcement for the middleware, the graph node and the `ToolNode` wrapper.

A decision (or a reviewer's answer) is used only for the exact call it judged: records are
bound (`CallBinding`) to the thread, the model turn, the call id, the tool and the arguments,
and a call that matches no record is judged again. One turn's calls are judged in one batch
and, when any is escalated, reviewed in one interrupt before any of them runs.

The logic is written once as generators that yield what they need (a judgment, the tool's run,
a moderation, an audit record) and are sent the answer; `run_steps` answers with sync calls and
`arun_steps` awaits them.
"""

from __future__ import annotations

import copy
import hashlib
import threading
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any, Awaitable, Callable, Generator, TypeVar

from langchain_core.callbacks import BaseCallbackManager
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.runnables.config import var_child_runnable_config
from langgraph._internal._constants import CONFIG_KEY_CHECKPOINTER
from langgraph.config import get_config
from langgraph.errors import GraphBubbleUp, ParentCommand
from langgraph.func import task
from langgraph.pregel._messages import StreamMessagesHandler
from langsmith.utils import tracing_is_enabled as tracing_enabled
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command

from soda_guard.errors import SodaGuardError
from soda_guard.guard import CarryOut, Guard, unasked
from soda_guard.judges.incremental import Lru
from soda_guard.policy import Policy
from soda_guard.records import CallRecord, TurnRecords
from soda_guard.review import review_event
from soda_guard.seal import RecordSeal
from soda_guard.tracing import OpenTelemetrySink
from soda_guard.binding import CallBinding, args_digest
from soda_guard.trajectory import ToolCall, Trajectory
from soda_guard.verdict import Action, Decision

from soda_guard.integrations._convert import (
    METADATA_KEY,
    binding_of,
    call_args,
    call_id,
    command_messages,
    command_reads,
    error_text,
    first_same,
    last_turn,
    read_as_one,
    refusal_text,
    other_writes,
    same_calls,
    sent_messages,
    to_tool_calls,
    to_trajectory,
    turn_id,
    turn_of_call,
    with_calls,
    with_command_messages,
    with_result,
)
from soda_guard.integrations._review import Asked, Refused, Ruled, ask, rule_decisions
from soda_guard.integrations._seal import SealedTool
from soda_guard.integrations._handoff import TurnHandoff
from soda_guard.integrations.mcp import register_mcp_tools
from soda_guard.integrations._state import Replayed, replay_of, stored_turn
from soda_guard.integrations._turns import TURNS, Key, TurnCoordinator

Handler = Callable[[ToolCallRequest], "ToolMessage | Command[Any]"]
AsyncHandler = Callable[[ToolCallRequest], Awaitable["ToolMessage | Command[Any]"]]
RUN_NAME = "soda_guard"


@dataclass(frozen=True)
class Judge:
    """Decisions for `calls` (in order), judged on `trajectory`."""

    trajectory: Trajectory
    calls: list[ToolCall]


@dataclass(frozen=True)
class Record:
    """A reviewer's answer, for the audit sinks and the trace; `on_error` is the escalating
    rule's, what the answer becomes if it cannot be recorded."""

    event: Decision
    on_error: Action | None = None


@dataclass(frozen=True)
class Run:
    request: ToolCallRequest


@dataclass(frozen=True)
class Raised:
    """What a tool run raised: its text reaches a model too, as whatever outside the guard
    turns the exception into a message (a ToolNode's error handling, retry middleware)."""

    error: Exception


@dataclass(frozen=True)
class Moderate:
    trajectory: Trajectory
    call: ToolCall
    message: ToolMessage


@dataclass(frozen=True)
class Follow:
    """Wait for the call that leads this turn's judgment (see `TurnCoordinator`)."""

    key: Key


Need = TypeVar("Need")
Answer = TypeVar("Answer")
Result = TypeVar("Result")


def run_steps(steps: Generator[Need, Answer, Result], answer: Callable[[Need], Answer]) -> Result:
    """Drive logic written once as a generator with sync answers."""
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


def as_guard(policy_or_guard: Policy | Guard, *, otel: bool = True) -> Guard:
    """A Policy gets its own Guard; either way the guard emits OpenTelemetry spans (no-ops
    until an SDK is configured) unless `otel=False`."""
    guard = policy_or_guard if isinstance(policy_or_guard, Guard) else Guard(policy_or_guard)
    if otel and not any(isinstance(sink, OpenTelemetrySink) for sink in guard.sinks):
        guard.sinks.append(OpenTelemetrySink())
    return guard


def thread_id() -> str | None:
    """The LangGraph thread, used as the conversation id (it keys the judge's prefix cache
    and is part of every binding)."""
    try:
        configurable = get_config().get("configurable") or {}
    except RuntimeError:
        return None
    value = configurable.get("thread_id")
    return None if value is None else str(value)


def warm_judges(guard: Guard, messages: Sequence[BaseMessage], *, harm: str | None = None, environment: str | None = None) -> None:
    """Start warming the guard's judges with the conversation so far (`Guard.warm_up`), from
    inside the graph node that is about to call the model: the thread is that node's, and the
    messages are converted on the warm-up thread, as every judgment of the thread converts
    them. `harm` and `environment` as the node or wrapper that judges the thread has them: the
    prompt warmed is then the one judged. Returns at once; nothing when no judge can be warmed."""
    if not guard.warmable():
        return
    messages, thread = list(messages), thread_id()
    guard.warm_up(lambda: to_trajectory(messages, conversation_id=thread, harm=harm, environment=environment))


def task_id() -> str | None:
    """The LangGraph task running now (one per node run), None outside a graph."""
    try:
        return get_config().get("configurable", {}).get("__pregel_task_id")
    except RuntimeError:
        return None


def in_graph() -> bool:
    try:
        get_config()
    except RuntimeError:
        return False
    return True


def checkpointed() -> bool:
    """Whether the node runs in a graph with a checkpointer: only there can it pause for a
    reviewer and resume, and only there does a LangGraph task's result outlive the node run."""
    try:
        configurable = get_config().get("configurable") or {}
    except RuntimeError:
        return False
    return configurable.get(CONFIG_KEY_CHECKPOINTER) is not None


def listening() -> bool:
    """Whether a tracer or callback handler would see a "soda_guard" run: building one costs
    more than an instant judgment, so nobody listening means no run. LangGraph's own
    handler for `stream_mode="messages"` reads chat model runs only."""
    if tracing_enabled():
        return True
    config = var_child_runnable_config.get()
    callbacks = config.get("callbacks") if config else None
    handlers = callbacks.handlers if isinstance(callbacks, BaseCallbackManager) else callbacks or []
    return any(not isinstance(handler, StreamMessagesHandler) for handler in handlers)


def _run_config(kind: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
    return {
        "run_name": RUN_NAME,
        "tags": [RUN_NAME, f"{RUN_NAME}:{kind}"],
        "metadata": {"soda_guard_kind": kind, "soda_guard_tools": [call.name for call in calls]},
    }


def _outputs(decisions: Sequence[Decision]) -> dict[str, Any]:
    return {"decisions": [d.model_dump(mode="json") for d in decisions]}


def _inputs(calls: Sequence[ToolCall]) -> dict[str, Any]:
    return {"tool_calls": [call.model_dump(mode="json") for call in calls]}


def _asked(digest: str, nonce: str) -> list[str]:
    return [digest, nonce]


async def _aasked(digest: str, nonce: str) -> list[str]:
    return [digest, nonce]


def _ruled(nonce: str, refusal: str | None) -> list[str | None]:
    return [nonce, refusal]


async def _aruled(nonce: str, refusal: str | None) -> list[str | None]:
    return [nonce, refusal]


def _replayed(replay: str) -> str:
    return replay


async def _areplayed(replay: str) -> str:
    return replay


def _never_sync(_: Any) -> Any:
    raise RuntimeError("soda-guard's async judging run was invoked synchronously")


def _answers(decisions: Sequence[Decision], calls: Sequence[ToolCall]) -> bool:
    return same_calls([decision.tool_call for decision in decisions], calls)


class Judging:
    """Runs the guard as a child LangChain run named "soda_guard" of whatever is running now,
    so tracers (LangSmith included) show every verdict and review as the run's output.

    Where a node can pause for review (a checkpointed graph, a policy that can escalate) the
    judgment is also a LangGraph task, whose result the checkpointer keeps: a node that
    pauses for review after judging does not judge again when it resumes, even in a new
    process. A replayed result is used only if it answers exactly the calls asked about.
    Where no node can pause, a re-run node only ever follows a failure, and judging again
    then is what an unguarded agent does too: no task is paid for."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard
        self.pauses = guard.policy.can_escalate()
        self._task = task(self._judge, name="soda_guard_judgment")
        self._atask = task(self._ajudge, name="soda_guard_judgment")
        self._asked = task(_asked, name="soda_guard_question")
        self._aasked = task(_aasked, name="soda_guard_question")
        self._ruled = task(_ruled, name="soda_guard_answer")
        self._aruled = task(_aruled, name="soda_guard_answer")
        self._replayed = task(_replayed, name="soda_guard_replay")
        self._areplayed = task(_areplayed, name="soda_guard_replay")

    def asked(self, question: Asked) -> Asked:
        if not in_graph():
            return question
        return Asked(*self._asked(question.digest, question.nonce).result())

    async def aasked(self, question: Asked) -> Asked:
        if not in_graph():
            return question
        return Asked(*(await self._aasked(question.digest, question.nonce)))

    def durable(self) -> bool:
        """Whether this node can pause for review and resume (see the class)."""
        return self.pauses and checkpointed()

    def replayed(self, mark: Replayed) -> Replayed:
        if not self.durable():
            return mark
        return Replayed(self._replayed(mark.replay or "").result() or None)

    async def areplayed(self, mark: Replayed) -> Replayed:
        if not self.durable():
            return mark
        return Replayed(await self._areplayed(mark.replay or "") or None)

    def ruled(self, ruling: Ruled) -> Ruled:
        if not in_graph():
            return ruling
        nonce, refusal = self._ruled(ruling.nonce, ruling.refusal).result()
        return Ruled(str(nonce), refusal)

    async def aruled(self, ruling: Ruled) -> Ruled:
        if not in_graph():
            return ruling
        nonce, refusal = await self._aruled(ruling.nonce, ruling.refusal)
        return Ruled(str(nonce), refusal)

    def refused(self, refused: Refused) -> None:
        for event in refused.events:
            self.review(event)

    async def arefused(self, refused: Refused) -> None:
        for event in refused.events:
            await self.areview(event)

    def _judge(self, trajectory: Trajectory, calls: list[ToolCall]) -> list[dict[str, Any]]:
        return [d.model_dump(mode="json") for d in self.traced_calls(trajectory, calls)]

    async def _ajudge(self, trajectory: Trajectory, calls: list[ToolCall]) -> list[dict[str, Any]]:
        return [d.model_dump(mode="json") for d in await self.atraced_calls(trajectory, calls)]

    def calls(self, trajectory: Trajectory, calls: list[ToolCall]) -> list[Decision]:
        if self.durable():
            found = [Decision.model_validate(d) for d in self._task(trajectory, calls).result()]
            if _answers(found, calls):
                return found
        return self.traced_calls(trajectory, calls)

    async def acalls(self, trajectory: Trajectory, calls: list[ToolCall]) -> list[Decision]:
        if self.durable():
            found = [Decision.model_validate(d) for d in await self._atask(trajectory, calls)]
            if _answers(found, calls):
                return found
        return await self.atraced_calls(trajectory, calls)

    def _traced(self, kind: str, calls: list[ToolCall], work: Callable[[], list[Decision]]) -> list[Decision]:
        """`work` as the "soda_guard" run, its decisions the run's output (`listening`)."""
        if not listening():
            return work()
        found: list[Decision] = []

        def run(_: Any) -> dict[str, Any]:
            found[:] = work()
            return _outputs(found)

        RunnableLambda(run, name=RUN_NAME).invoke(_inputs(calls), _run_config(kind, calls))
        return found

    async def _atraced(
        self, kind: str, calls: list[ToolCall], work: Callable[[], Awaitable[list[Decision]]]
    ) -> list[Decision]:
        if not listening():
            return await work()
        found: list[Decision] = []

        async def run(_: Any) -> dict[str, Any]:
            found[:] = await work()
            return _outputs(found)

        await RunnableLambda(_never_sync, afunc=run, name=RUN_NAME).ainvoke(_inputs(calls), _run_config(kind, calls))
        return found

    def traced_calls(self, trajectory: Trajectory, calls: list[ToolCall], carry_out: CarryOut | None = None) -> list[Decision]:
        """The judge sees the turn with only `calls` pending; the rules' conditions read the
        whole conversation, in which the turn's calls that already ran come before them."""
        view = with_calls(trajectory, calls)
        return self._traced("tool_call", calls, lambda: self.guard.check_tool_calls(view, context=trajectory, carry_out=carry_out))

    async def atraced_calls(self, trajectory: Trajectory, calls: list[ToolCall], carry_out: CarryOut | None = None) -> list[Decision]:
        view = with_calls(trajectory, calls)
        return await self._atraced(
            "tool_call", calls, lambda: self.guard.acheck_tool_calls(view, context=trajectory, carry_out=carry_out)
        )

    def review(self, event: Decision, on_error: Action | None = None) -> Decision:
        calls = [event.tool_call] if event.tool_call else []
        return self._traced("review", calls, lambda: [self.guard.record_review(event, on_error)])[0]

    async def areview(self, event: Decision, on_error: Action | None = None) -> Decision:
        calls = [event.tool_call] if event.tool_call else []

        async def record() -> list[Decision]:
            return [await self.guard.arecord_review(event, on_error)]

        return (await self._atraced("review", calls, record))[0]

    def result(self, trajectory: Trajectory, call: ToolCall, message: ToolMessage) -> Decision | None:
        """The moderation of a tool's result (the caller checks that the policy asks for one)."""
        view = with_result(trajectory, call, message)

        def moderate() -> list[Decision]:
            decision = self.guard.check_tool_result(view)
            return [decision] if decision is not None else []

        found = self._traced("tool_result", [call], moderate)
        return found[0] if found else None

    async def aresult(self, trajectory: Trajectory, call: ToolCall, message: ToolMessage) -> Decision | None:
        view = with_result(trajectory, call, message)

        async def moderate() -> list[Decision]:
            decision = await self.guard.acheck_tool_result(view)
            return [decision] if decision is not None else []

        found = await self._atraced("tool_result", [call], moderate)
        return found[0] if found else None


def _review_why(record: CallRecord) -> str:
    review = record.review
    assert review is not None
    if record.outcome == "run":
        edited = " with the reviewer's edited arguments" if record.run_args is not None else ""
        return f"a reviewer answered {review.type}: the call runs{edited}"
    if record.outcome == "respond":
        return "a reviewer answered in the tool's place: the tool does not run"
    return f"a reviewer answered {review.type}: {record.message}"


def review_records(
    records: Sequence[CallRecord], trajectory: Trajectory, policy: Policy, turn: Sequence[CallRecord] = ()
) -> Generator[Judge | Record | Asked | Ruled | Refused, Any, list[CallRecord]]:
    """Ask one question for `records` (all escalated, all of one turn), judge the edits
    again, and write each answer to the audit sinks and the trace."""
    reviews = yield from ask(records, policy, turn)
    done = []
    for record, review in zip(records, reviews):
        edit_decision = None
        if review.type == "edit":
            edited = record.call.model_copy(update={"args": review.args})
            edit_decision = (yield Judge(trajectory, [edited]))[0]
            review = review.model_copy(update={"edit_decision_id": edit_decision.decision_id})
        reviewed = record.reviewed(review, edit_decision)
        if reviewed.outcome == "run" and edit_decision is not None and edit_decision.action is Action.ESCALATE:
            # the edit escalates under a rule of its own, where running it is approving it
            allowed = rule_decisions(edit_decision.rule, policy)
            if "approve" not in allowed and "edit" not in allowed:
                reviewed = reviewed.model_copy(update={"outcome": "refuse", "run_args": None, "message": (
                    f"the reviewer's edit falls under `{edit_decision.rule}`, whose escalations may only be "
                    f"answered with {', '.join(allowed)}: it does not run"
                )})
        event = review_event(
            record.decision, review, runs=reviewed.outcome == "run", ran_call=reviewed.ran_call(), why=_review_why(reviewed)
        )
        recorded = yield Record(event, policy.outcome(policy.rule_named(record.decision.rule), "on_error"))
        if reviewed.outcome == "run" and not recorded.allowed:
            reviewed = reviewed.model_copy(update={"outcome": "refuse", "message": recorded.why})
        done.append(reviewed)
    return done


def judge_turn(
    messages: Sequence[BaseMessage],
    stored: TurnRecords | None,
    *,
    thread: str | None,
    harm: str | None,
    environment: str | None,
) -> Generator[Judge, Any, tuple[Trajectory, TurnRecords] | None]:
    """The records of the latest model turn's pending calls, before any review: kept where
    they bind to a stored record of this very turn, judged (in one batch) where they do not.
    None when the latest turn has no pending call."""
    trajectory = to_trajectory(messages, conversation_id=thread, harm=harm, environment=environment)
    pending = trajectory.pending_tool_calls()
    located = last_turn(messages)
    if located is None or not pending:
        return None
    turn = turn_id(located[1], located[0])
    same_turn = stored is not None and stored.turn_id == turn and stored.thread_id == thread
    bindings = [binding_of(call, thread=thread, turn=turn) for call in pending]
    records: list[CallRecord | None] = [
        stored.find(binding) if same_turn and stored is not None else None for binding in bindings
    ]
    unjudged = [call for call, record in zip(pending, records) if record is None]
    if unjudged:
        decisions = iter((yield Judge(trajectory, unjudged)))
        records = [
            record or CallRecord.judged(binding, call, next(decisions))
            for call, binding, record in zip(pending, bindings, records)
        ]
    return trajectory, TurnRecords(thread_id=thread, turn_id=turn, records=[r for r in records if r is not None])


def resolve_turn(
    messages: Sequence[BaseMessage],
    stored: TurnRecords | None,
    *,
    thread: str | None,
    policy: Policy,
    hold_turn: bool,
    harm: str | None,
    environment: str | None,
) -> Generator[Judge | Record | Asked | Ruled | Refused, Any, TurnRecords | None]:
    """The turn's records (`judge_turn`) and, with `hold_turn`, every escalation of the turn
    reviewed in one interrupt. None when the latest turn has no pending call."""
    judged = yield from judge_turn(messages, stored, thread=thread, harm=harm, environment=environment)
    if judged is None:
        return None
    trajectory, result = judged
    waiting = [record for record in result.records if record.awaiting_review]
    if waiting and hold_turn:
        for reviewed in (yield from review_records(waiting, trajectory, policy, result.records)):
            result = result.replace(reviewed)
    return result


class ToolCallEnforcer:
    """Enforces one tool call inside a `wrap_tool_call` chain. The call runs only on a record
    bound to it: one the middleware handed over (`handoff`), one it or the guard node stored
    for this turn, or one made here (the whole turn judged once, led by its first call) when
    there is none. A call whose arguments were changed after judging matches no record and is
    judged again on its own. What runs is the tool of the call's own name, sealed to the call
    (`SealedTool`), so whatever runs inside this wrapper (later middleware, tools nested in the
    tool's body) is judged too."""

    def __init__(self, guard: Guard, *, state_key: str, messages_key: str = "messages", harm: str | None = None,
                 environment: str | None = None, coordinator: TurnCoordinator | None = None) -> None:
        self.guard = guard
        self.judging = Judging(guard)
        self.state_key = state_key
        self.messages_key = messages_key
        self.harm = harm
        self.environment = environment
        self.coordinator = coordinator or TURNS
        self._policy_key = hashlib.sha256(guard.policy.model_dump_json().encode()).hexdigest()
        self.seal = RecordSeal.for_policy(guard.policy)
        self.handoff = TurnHandoff()
        self._ran = _ran_memory(self.seal.key_id)
        """The decision each call this process ran went by, by the binding's parts: a record
        licenses one run. Still open (its turn not yet closed by the next model turn), the same
        record is no licence to run the call again when the tools step runs a second time or
        the call's result was removed from the state; a judgment made since is."""

    @property
    def follow_wait_s(self) -> float:
        return 3 * self.guard.policy.defaults.timeout_s + 5.0

    def _messages(self, state: Any) -> Sequence[BaseMessage]:
        """The state's own list (read, never changed here: a copy per call is a copy of the
        whole conversation per tool call). A state that keeps no list under `messages_key` is
        refused with an error: its calls would be judged without the conversation, so without
        the request they serve. A list state (`Annotated[list[AnyMessage], add_messages]`) is
        the conversation itself (a ToolNode hands it on as the state); one that holds no
        message (a bare list of calls) has none. The search stops at the first message, which
        a conversation a ToolNode runs holds near its start (its model turn at the latest)."""
        key = self.messages_key
        if isinstance(state, Mapping):
            if key not in state:
                raise SodaGuardError(_NO_MESSAGES.format(key=key, found=sorted(map(str, state))))
            messages = state[key]
        elif isinstance(state, list):
            if not any(isinstance(entry, BaseMessage) for entry in state):
                raise SodaGuardError(_NO_MESSAGES.format(key=key, found="a list that holds no message"))
            return state
        else:
            messages = getattr(state, key, None)
            if messages is None:
                raise SodaGuardError(_NO_MESSAGES.format(key=key, found=type(state).__name__))
        return messages if isinstance(messages, list) else list(messages)

    def _steps(self, request: ToolCallRequest) -> Generator[Any, Any, ToolMessage | Command[Any]]:
        # the tool that will run, read for its MCP server before the wrapper judges it: nothing
        # on the wrapper's own path read it before (the middleware reads the model's tools)
        register_mcp_tools(self.guard, [request.tool])
        messages = self._messages(request.state)
        thread = thread_id()
        located = turn_of_call(messages, request.tool_call)
        turn = turn_id(located[1], located[0]) if located else "#none"
        index = (first_same(located[1].tool_calls, request.tool_call) or 0) if located else 0
        name, args = str(request.tool_call.get("name") or ""), call_args(request.tool_call)
        id_, digest = call_id(request.tool_call, index), args_digest(args)
        # converted only when needed: a call with a stored record is enforced without it
        converted: list[Trajectory] = []

        def trajectory() -> Trajectory:
            if not converted:
                converted.append(to_trajectory(messages, conversation_id=thread, harm=self.harm, environment=self.environment))
            return converted[0]

        # found by the binding's parts, before (and without) building the call and binding
        parts = (thread, turn, id_, name, digest)
        record = self.handoff.take(parts, replay_of())
        if record is None:
            call = ToolCall(id=id_, name=name, args=args)
            binding = CallBinding(thread_id=thread, turn_id=turn, call_id=id_, tool=name, args_digest=digest)
            stored = yield from stored_turn(request.state, self.state_key, self.seal)
            if stored is not None and stored.turn_id == turn and stored.thread_id == thread:
                record = stored.find(binding)
            elif located is not None:
                shared = yield from self._shared_turn(messages, trajectory(), call, thread, turn)
                record = shared.find(binding) if shared is not None else None
            if record is not None and self._ran.get(parts) == record.decision.decision_id:
                record = None  # it ran on that record already: judged (and asked) again
            if record is None:
                same_id = [c for c in _turn_calls(located, call) if c.id == call.id]
                decisions = yield Judge(trajectory(), same_id if len(same_id) > 1 else [call])
                record = CallRecord.judged(binding, call, next((d for d in decisions if same_calls([d.tool_call], [call])), decisions[0]))
        if record.awaiting_review:
            [record] = yield from review_records([record], trajectory(), self.guard.policy)
        return (yield from self._enforce(request, trajectory, record, parts))

    def _shared_turn(
        self, messages: Sequence[BaseMessage], trajectory: Trajectory, call: ToolCall, thread: str | None, turn: str
    ) -> Generator[Any, Any, TurnRecords | None]:
        pending = trajectory.pending_tool_calls()
        unique = [c for c in pending if sum(1 for other in pending if other.id == c.id) == 1]
        key = (self._policy_key, thread, turn)
        if unique and unique[0] == call:
            attempt = self.coordinator.lead(key, followers=len(pending) - 1, task=task_id())
            try:
                shared = yield from resolve_turn(
                    messages, None, thread=thread, policy=self.guard.policy, hold_turn=True, harm=self.harm,
                    environment=self.environment,
                )
            except BaseException as error:
                self.coordinator.finish(key, attempt, error=error)
                raise
            self.coordinator.finish(key, attempt, turn=shared)
            return shared
        return (yield Follow(key))

    def _enforce(
        self, request: ToolCallRequest, trajectory: Callable[[], Trajectory], record: CallRecord, parts: tuple[Any, ...]
    ) -> Generator[Any, Any, ToolMessage | Command[Any]]:
        call = record.call
        if record.outcome == "refuse":
            message = ToolMessage(
                content=refusal_text(call.name, record.message or record.decision.why),
                tool_call_id=call.id, name=call.name, status="error",
            )
            return _stamped(message, record)
        if record.outcome == "respond":
            return _stamped(ToolMessage(content=record.message or "", tool_call_id=call.id, name=call.name), record)
        ran = record.ran_call()
        # the call as judged: its arguments are those the binding's digest was made of
        sealed = self._sealed(request, trajectory, ran, record.binding.args_digest if record.run_args is None else None, once=record.review is not None)
        # a copy: what runs after the guard may edit the arguments it is handed in place, and
        # must not reach the judged record (or the steps cached with it) that way
        result = yield Run(request.override(tool_call={**request.tool_call, "args": _copied(ran.args)}, tool=sealed))
        self._ran.put(parts, record.decision.decision_id, 1)
        binding = record.binding
        judged = (binding.thread_id, binding.turn_id, binding.call_id, binding.tool, binding.args_digest)
        if judged != parts:  # run as edited (the guard node hands on the edit): the call as asked ran too
            self._ran.put(judged, record.decision.decision_id, 1)
        if sealed is not None and sealed.refused is not None:
            stopped = record.model_copy(update={"decision": sealed.refused, "outcome": "refuse", "message": sealed.refused.why})
            refusal = sealed.refusal or ToolMessage(
                content=refusal_text(call.name, sealed.refused.why), tool_call_id=call.id, name=call.name, status="error"
            )
            return _stamped(refusal, stopped)  # not what the tool made of the stop: the refusal
        if isinstance(result, Raised):
            return (yield from self._raised(result.error, trajectory, ran, record))
        if isinstance(result, list):
            return (yield from self._list_answer(result, trajectory, ran, record))
        # what a Command adds to the conversation is read by the model, as a ToolMessage is, and
        # so is what its `goto` hands a node in a `Send`
        key = self.messages_key
        found = ([result], 0) if isinstance(result, ToolMessage) else command_messages(result, call.id, key)
        sent = [*sent_messages(result, key), *other_writes(result, key)] if isinstance(result, Command) else []
        if found is None and not sent:
            return result
        messages, index = found if found is not None else ([], None)
        answer = messages[index] if index is not None else None
        if isinstance(answer, ToolMessage) and record.run_args is not None:
            answer = answer.model_copy(update={"content": _with_edit_notice(answer.content, ran)})
            messages = [*messages[:index], answer, *messages[index + 1 :]]  # type: ignore[index, operator]
        moderation = None
        if self.guard.policy.tool_results is not None:
            moderation = yield Moderate(trajectory(), ran, read_as_one([*messages, *sent], index, ran))
        if moderation is not None:
            record = record.model_copy(update={"result_decision": moderation})
            if not moderation.action.runs_tool:
                answer = _withheld(call, moderation)
                if sent:  # what it hands on goes with the Command: the refusal is all that is left of it
                    return _stamped(answer, record)
                messages, index = [answer], 0
        if found is None:
            return result
        if isinstance(answer, ToolMessage) and index is not None:
            messages = [*messages[:index], _stamped(answer, record), *messages[index + 1 :]]
        return messages[0] if isinstance(result, ToolMessage) else with_command_messages(result, messages, key)  # type: ignore[return-value]

    def _raised(
        self, error: Exception, trajectory: Callable[[], Trajectory], ran: ToolCall, record: CallRecord
    ) -> Generator[Any, Any, ToolMessage]:
        """A tool that raised: its exception goes on as it came, unless its text, which a
        ToolNode or a retry middleware outside the guard hands the model, is a result the
        policy withholds (an exception can carry what the tool fetched)."""
        if self.guard.policy.tool_results is None:
            raise error
        if isinstance(error, ParentCommand):  # a graph inside the tool hands its parent a Command
            text = read_as_one(command_reads(error.args[0], self.messages_key), None, ran)
        else:
            text = ToolMessage(content=error_text(error), tool_call_id=ran.id, name=ran.name, status="error")
        moderation = yield Moderate(trajectory(), ran, text)
        if moderation is None or moderation.action.runs_tool:
            raise error
        return _stamped(_withheld(record.call, moderation), record.model_copy(update={"result_decision": moderation}))

    def _list_answer(
        self, result: list[Any], trajectory: Callable[[], Trajectory], ran: ToolCall, record: CallRecord
    ) -> Generator[Any, Any, Any]:
        """A tool may answer with a list of ToolMessages and Commands, all of which the ToolNode
        adds: the model reads them as one answer, moderated as one and withheld as one."""
        if self.guard.policy.tool_results is None:
            return result
        key, messages = self.messages_key, []
        for item in result:
            if isinstance(item, BaseMessage):
                messages.append(item)
            elif isinstance(item, Command):
                messages += command_reads(item, key)
            else:
                messages.append(ToolMessage(content=str(item), tool_call_id=ran.id, name=ran.name))
        index = next((i for i, m in enumerate(messages) if isinstance(m, ToolMessage) and m.tool_call_id == ran.id), None)
        moderation = yield Moderate(trajectory(), ran, read_as_one(messages, index, ran))
        if moderation is None or moderation.action.runs_tool:  # None: not a tool it moderates
            return result
        return _stamped(_withheld(record.call, moderation), record.model_copy(update={"result_decision": moderation}))

    def _sealed(
        self, request: ToolCallRequest, trajectory: Callable[[], Trajectory], call: ToolCall, digest: str | None, *, once: bool = False
    ) -> SealedTool | None:
        """The tool of the call's name, sealed to the call (see `SealedTool`); None where no
        tool has that name (the ToolNode then answers that the tool does not exist). An outer
        `wrap_tool_call` that renamed the call left the old name's tool in the request: that
        one must not run on a judgment of the new name."""
        tool = request.tool
        if tool is None or tool.name != call.name:
            tools = getattr(request.runtime, "tools", None) or []
            tool = next((t for t in tools if getattr(t, "name", None) == call.name), None)
        if tool is None:
            return None

        def check(nested: ToolCall) -> Decision:
            return self.judging.traced_calls(trajectory(), [nested], unasked)[0]

        async def acheck(nested: ToolCall) -> Decision:
            return (await self.judging.atraced_calls(trajectory(), [nested], unasked))[0]

        return SealedTool(tool, call, check, acheck, digest, once=once)

    def answer(self, handler: Handler | None) -> Callable[[Any], Any]:
        def answer(need: Any) -> Any:
            if isinstance(need, Judge):
                return self.judging.calls(need.trajectory, need.calls)
            if isinstance(need, Record):
                return self.judging.review(need.event, need.on_error)
            if isinstance(need, Asked):
                return self.judging.asked(need)
            if isinstance(need, Ruled):
                return self.judging.ruled(need)
            if isinstance(need, Replayed):
                return self.judging.replayed(need)
            if isinstance(need, Refused):
                return self.judging.refused(need)
            if isinstance(need, Run):
                assert handler is not None
                try:
                    return handler(need.request)
                except ParentCommand as error:  # its Command is read by the parent graph's model
                    return Raised(error)
                except GraphBubbleUp:  # an interrupt: LangGraph's own
                    raise
                except Exception as error:
                    return Raised(error)
            if isinstance(need, Follow):
                return self.coordinator.follow(need.key, self.follow_wait_s, task_id())
            return self.judging.result(need.trajectory, need.call, need.message)

        return answer

    def wrap(self, request: ToolCallRequest, handler: Handler) -> ToolMessage | Command[Any]:
        return run_steps(self._steps(request), self.answer(handler))

    async def awrap(self, request: ToolCallRequest, handler: AsyncHandler) -> ToolMessage | Command[Any]:
        return await arun_steps(self._steps(request), self.aanswer(handler))

    def aanswer(self, handler: AsyncHandler | None) -> Callable[[Any], Awaitable[Any]]:
        async def answer(need: Any) -> Any:
            if isinstance(need, Judge):
                return await self.judging.acalls(need.trajectory, need.calls)
            if isinstance(need, Record):
                return await self.judging.areview(need.event, need.on_error)
            if isinstance(need, Asked):
                return await self.judging.aasked(need)
            if isinstance(need, Ruled):
                return await self.judging.aruled(need)
            if isinstance(need, Replayed):
                return await self.judging.areplayed(need)
            if isinstance(need, Refused):
                return await self.judging.arefused(need)
            if isinstance(need, Run):
                assert handler is not None
                try:
                    return await handler(need.request)
                except ParentCommand as error:
                    return Raised(error)
                except GraphBubbleUp:
                    raise
                except Exception as error:
                    return Raised(error)
            if isinstance(need, Follow):
                return await self.coordinator.afollow(need.key, self.follow_wait_s, task_id())
            return await self.judging.aresult(need.trajectory, need.call, need.message)

        return answer


_ATOMS = frozenset({str, int, float, bool, type(None)})
RAN_REMEMBERED = 1 << 14
"""Calls remembered as run (`ToolCallEnforcer._ran`), the oldest forgotten first."""
_RAN: dict[str, Lru[str]] = {}
_RAN_LOCK = threading.Lock()


def _ran_memory(key_id: str) -> Lru[str]:
    """The calls run in this process on records sealed with one key, whichever middleware,
    node or wrapper ran them: an app that builds its agent per request (the same checkpointer,
    whose records every such guard can read) must not run an approved call again on its record."""
    with _RAN_LOCK:
        return _RAN.setdefault(key_id, Lru(RAN_REMEMBERED))
_NO_MESSAGES = (
    "soda-guard found no conversation under {key!r} in the tool step's state ({found}); a call judged "
    "without it is judged without the request it serves. Pass messages_key= (the ToolNode's own)."
)


def _copied(args: Any) -> Any:
    """A deep copy of a call's arguments: for the common flat object of plain values (which
    a deep copy would share anyway), a new dict, at a quarter of `copy.deepcopy`'s cost."""
    if type(args) is dict and all(type(value) in _ATOMS for value in args.values()):
        return dict(args)
    return copy.deepcopy(args)


def _turn_calls(located: tuple[int, AIMessage] | None, call: ToolCall) -> list[ToolCall]:
    if located is None:
        return [call]
    return to_tool_calls(located[1].tool_calls)


def _with_edit_notice(content: Any, call: ToolCall) -> Any:
    """The tool's result, told to the model as the result of the reviewer's edit, so it does
    not issue its original call again."""
    notice = (
        f"[A reviewer replaced this tool call before it ran; what ran was `{call.name}` with arguments "
        f"{call.args}. Do not issue the original call again.]"
    )
    if isinstance(content, list):
        return [{"type": "text", "text": notice}, *content]
    return f"{notice}\n{content}"


def _withheld(call: ToolCall, moderation: Decision) -> ToolMessage:
    """The answer the model reads in place of a result the policy does not let it read."""
    return ToolMessage(
        content=f"soda-guard withheld the result of `{call.name}`: {moderation.why}.", tool_call_id=call.id, name=call.name, status="error"
    )


def _stamped(message: ToolMessage, record: CallRecord) -> ToolMessage:
    """`message` with the record's summary, where there is something to tell: a simply allowed
    call's result goes unmarked, since checkpointers store every message again at every step
    and its decision is in the audit sinks and the trace (by tool call id and decision id)."""
    if record.simply_allowed:
        return message
    metadata = {**message.response_metadata, METADATA_KEY: record.summary()}
    return message.model_copy(update={"response_metadata": metadata})
