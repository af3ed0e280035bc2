"""LangChain adapters: agent middleware (enforcement) and a callback handler (observation, with
an optional hard stop for plain tool-calling loops).

    agent = create_agent(model, tools, middleware=[SodaGuardMiddleware(policy)], checkpointer=saver)

`SodaGuardDecisionModel` (the judges as the classifier of LangChain's `AutoModeMiddleware`)
needs `langchain_core.decisions`, new in langchain-core 1.8: `HAS_DECISION_MODELS` says whether
this install has it.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Generator
from uuid import UUID

from langchain.agents.middleware import AgentMiddleware, AgentState
from langchain.agents.middleware.types import ExtendedModelResponse, ModelCallResult, ModelRequest, ModelResponse
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.func import task
from langgraph.types import Command
from langsmith.utils import tracing_is_enabled
from typing_extensions import NotRequired

from soda_guard.binding import CallBinding, args_digest
from soda_guard.errors import SodaGuardError
from soda_guard.ids import new_run_id
from soda_guard.guard import Guard, unasked
from soda_guard.policy import Policy
from soda_guard.records import TurnRecords
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep, Trajectory
from soda_guard.verdict import Decision

from soda_guard.integrations._convert import (
    STATE_KEY,
    error_text,
    injected_left_out,
    refusal_text,
    result_text,
    started_tool,
    to_step,
    to_trajectory,
    with_calls,
    with_result,
)
from soda_guard.integrations.mcp import register_mcp_tools
from soda_guard.integrations._enforce import (
    Judge,
    ToolCallEnforcer,
    arun_steps,
    as_guard,
    judge_turn,
    resolve_turn,
    run_steps,
    thread_id,
    warm_judges,
)
from soda_guard.integrations._handoff import TurnHandoff
from soda_guard.integrations._state import closing, replay_of, state_form, stored_turn

HAS_DECISION_MODELS = importlib.util.find_spec("langchain_core.decisions") is not None

__all__ = [
    "HAS_DECISION_MODELS",
    "SodaGuardCallbackHandler",
    "SodaGuardMiddleware",
    "SodaGuardState",
    "ToolCallBlocked",
    "ToolResultBlocked",
]

if HAS_DECISION_MODELS:
    from soda_guard.integrations.decision_model import JudgmentFailed, SodaGuardDecisionModel

    __all__ += ["JudgmentFailed", "SodaGuardDecisionModel"]


class SodaGuardState(AgentState):
    """Agent state plus the records of the latest model turn that needed more than a plain
    allow (`soda_guard.records.TurnRecords` as JSON), replaced or closed when the next turn is
    judged (a turn of simply allowed calls is handed to the tool step in memory). A call's
    finished record travels on in its ToolMessage's metadata and in the audit sinks, so the
    state does not grow with the thread and the checkpoints stay small."""

    soda_guard: NotRequired[dict[str, Any]]


class SodaGuardMiddleware(AgentMiddleware):
    """Judges every tool call of a model turn in one batched judge call as the model answers
    and, when any is escalated, asks a reviewer once for the turn (a LangChain `HITLRequest`
    interrupt) before any call of it runs (`wrap_model_call`); then enforces each call where
    the tool would run (`wrap_tool_call`), only on the record bound to that exact call: allow
    and log run the tool, block answers the model with an error `ToolMessage`. A ToolMessage
    of a call the guard did more than allow carries a summary in
    `response_metadata["soda_guard"]`.

    The turn is judged inside the model's own step rather than in an `after_model` step of its
    own: every step of a checkpointed graph stores the whole conversation again, and a step
    per turn would grow the checkpoints by half. Where the graph can pause for review (a
    checkpointer, a policy that can escalate), the model call with its judgment, and the
    question, are LangGraph tasks, so a run resumed after a review neither calls the model nor
    judges again, even in a new process; where it cannot, no task is paid for."""

    state_schema = SodaGuardState

    def __init__(
        self,
        policy_or_guard: Policy | Guard,
        *,
        harm: str | None = None,
        environment: str | None = None,
        otel: bool = True,
    ) -> None:
        super().__init__()
        self.guard = as_guard(policy_or_guard, otel=otel)
        self.harm = harm
        self.environment = environment
        self._enforcer = ToolCallEnforcer(self.guard, state_key=STATE_KEY, harm=harm, environment=environment)
        # named "model" so that streamed tokens keep the model step's name in their metadata
        self._model = task(self._call_and_judge, name="model")
        self._amodel = task(self._acall_and_judge, name="model")
        # `create_agent` wraps every hook in LangSmith's `traceable`, whose sync wrapper reads
        # the hook's signature again at every call, tracing or not: 10 µs for a bound method,
        # 1 µs for a function that carries its signature (`_bound_hook`), of about 23 µs a hook
        # call in all. The hooks go to it as such functions, with the very same parameters.
        self.wrap_model_call = _bound_hook(self, type(self).wrap_model_call)  # type: ignore[method-assign]
        self.wrap_tool_call = _bound_hook(self, type(self).wrap_tool_call)  # type: ignore[method-assign]
        if not tracing_is_enabled():
            # Its async wrapper hands the span's start and end to threads and the hook to a new
            # task, tracing or not: about 0.37 ms a call against 0.03 for its sync wrapper. With
            # LangSmith tracing off when the middleware is made, the async hooks go to it as
            # plain functions that return their coroutine, which the sync wrapper passes on to
            # be awaited. (Tracing turned on later still shows the hooks, as spans that end
            # where they start.)
            self.awrap_model_call = _bound_hook(self, type(self).awrap_model_call)  # type: ignore[method-assign]
            self.awrap_tool_call = _bound_hook(self, type(self).awrap_tool_call)  # type: ignore[method-assign]

    def _turn(
        self, request: ModelRequest, stored: TurnRecords | None, recorded: dict[str, Any], judged: TurnRecords | None
    ) -> Generator[Any, Any, ModelCallResult]:
        """The turn's records, reviewed: `judged` when the model's task judged the turn,
        else judged here (every pending call binds to a record of `judged`, so it is not
        judged again); and the records stored, or the previous turn's closed."""
        response, update = _replayed(recorded)
        messages = [*request.state.get("messages", []), *response.result]
        turn = yield from resolve_turn(
            messages,
            judged or stored,
            thread=thread_id(),
            policy=self.guard.policy,
            hold_turn=self.guard.policy.review.hold_turn,
            harm=self.harm,
            environment=self.environment,
        )
        if turn is not None and TurnHandoff.takes(turn):
            self._enforcer.handoff.put(turn, replay_of())
            turn = None
        turn = turn or closing(stored, messages)
        if turn is not None and turn != stored:
            update = [*update, (STATE_KEY, state_form(turn, self._enforcer.seal))]
        return ExtendedModelResponse(model_response=response, command=Command(update=update)) if update else response

    def _judgment(
        self, request: ModelRequest, recorded: dict[str, Any], stored: TurnRecords | None
    ) -> Generator[Judge, Any, TurnRecords | None]:
        messages = [*request.state.get("messages", []), *recorded["messages"]]
        judged = yield from judge_turn(messages, stored, thread=thread_id(), harm=self.harm, environment=self.environment)
        return None if judged is None else judged[1]

    def _call_and_judge(
        self, handler: Callable[[ModelRequest], ModelCallResult], request: ModelRequest, stored: TurnRecords | None,
        judged: dict[str, TurnRecords | None],
    ) -> dict[str, Any]:
        """The model's answer and the judgment of its calls as one LangGraph task, where the
        node can pause for review (`Judging.durable`): a node resumed after the review
        neither calls the model nor judges again, even in a new process. The records come
        back through `judged` on the run that made them, and as JSON from the checkpointer."""
        recorded = _call_model(handler, request)
        turn = run_steps(self._judgment(request, recorded, stored), self._judge_now)
        judged["turn"] = turn
        return {**recorded, "turn": None if turn is None else turn.for_task()}

    async def _acall_and_judge(
        self, handler: Callable[[ModelRequest], Awaitable[ModelCallResult]], request: ModelRequest,
        stored: TurnRecords | None, judged: dict[str, TurnRecords | None],
    ) -> dict[str, Any]:
        recorded = await _acall_model(handler, request)
        turn = await arun_steps(self._judgment(request, recorded, stored), self._ajudge_now)
        judged["turn"] = turn
        return {**recorded, "turn": None if turn is None else turn.for_task()}

    def _judge_now(self, need: Judge) -> list[Decision]:
        return self._enforcer.judging.traced_calls(need.trajectory, need.calls)

    async def _ajudge_now(self, need: Judge) -> list[Decision]:
        return await self._enforcer.judging.atraced_calls(need.trajectory, need.calls)

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelCallResult]) -> ModelCallResult:
        register_mcp_tools(self.guard, request.tools)
        warm_judges(self.guard, request.state.get("messages", []), harm=self.harm, environment=self.environment)  # just before the model
        answer = self._enforcer.answer(None)
        stored = run_steps(stored_turn(request.state, STATE_KEY, self._enforcer.seal), answer)
        if self._enforcer.judging.durable():
            judged: dict[str, TurnRecords | None] = {}
            recorded = self._model(handler, request, stored, judged).result()
            turn = judged["turn"] if "turn" in judged else _recorded_turn(recorded)
        else:
            recorded, turn = _call_model(handler, request), None
        return run_steps(self._turn(request, stored, recorded, turn), answer)

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelCallResult]]
    ) -> ModelCallResult:
        register_mcp_tools(self.guard, request.tools)
        warm_judges(self.guard, request.state.get("messages", []), harm=self.harm, environment=self.environment)  # just before the model
        answer = self._enforcer.aanswer(None)
        stored = await arun_steps(stored_turn(request.state, STATE_KEY, self._enforcer.seal), answer)
        if self._enforcer.judging.durable():
            judged: dict[str, TurnRecords | None] = {}
            recorded = await self._amodel(handler, request, stored, judged)
            turn = judged["turn"] if "turn" in judged else _recorded_turn(recorded)
        else:
            recorded, turn = await _acall_model(handler, request), None
        return await arun_steps(self._turn(request, stored, recorded, turn), answer)

    def wrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Any]
    ) -> Any:
        return self._enforcer.wrap(request, handler)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> Any:
        return await self._enforcer.awrap(request, handler)


def _bound_hook(middleware: SodaGuardMiddleware, hook: Callable[..., Any]) -> Callable[[Any, Any], Any]:
    """`hook` bound to `middleware` as a plain function that carries its signature (the
    method's, less `self`), so that `inspect.signature` finds it at once; an async hook's
    function returns its coroutine. No `__wrapped__`, which LangSmith would follow to the
    method."""

    def bound(request: Any, handler: Any) -> Any:
        return hook(middleware, request, handler)

    bound.__name__, bound.__qualname__, bound.__doc__ = hook.__name__, hook.__qualname__, hook.__doc__
    bound.__signature__ = _signature_less_self(hook)  # type: ignore[attr-defined]
    return bound


@functools.lru_cache(maxsize=64)
def _signature_less_self(hook: Callable[..., Any]) -> inspect.Signature:
    signature = inspect.signature(hook)
    return signature.replace(parameters=list(signature.parameters.values())[1:])


def _with_message_ids(result: ModelCallResult) -> ModelResponse | ExtendedModelResponse:
    """The model's answer with an id on every message: LangGraph's reducer would otherwise
    give the AI message one only after the turn was judged, and the turn's records are bound
    to that id."""
    if isinstance(result, AIMessage):
        result = ModelResponse(result=[result])
    if isinstance(result, ModelResponse):
        for message in result.result:
            if message.id is None:
                message.id = f"lc_{new_run_id()}"
    return result


def _recorded(result: ModelResponse | ExtendedModelResponse) -> dict[str, Any]:
    """What the task hands the checkpointer: messages and plain data, which it stores and reads
    back without complaint. A command from an inner middleware can only update state in
    this hook, so its updates are kept as (key, value) pairs."""
    update: list[tuple[str, Any]] = []
    if isinstance(result, ExtendedModelResponse):
        command = result.command
        raw = command.update if command is not None else None
        update = list(raw.items()) if isinstance(raw, Mapping) else list(raw or [])
        result = result.model_response
    return {"messages": list(result.result), "structured_response": result.structured_response, "update": update}


def _recorded_turn(recorded: dict[str, Any]) -> TurnRecords | None:
    """The records the model's task made, as the checkpointer gave them back (None from a
    task of an older version, whose calls are then judged again)."""
    raw = recorded.get("turn")
    return TurnRecords.model_validate(raw) if isinstance(raw, Mapping) else None


def _replayed(recorded: dict[str, Any]) -> tuple[ModelResponse, list[tuple[str, Any]]]:
    response = ModelResponse(result=list(recorded["messages"]), structured_response=recorded["structured_response"])
    return response, [tuple(pair) for pair in recorded["update"]]  # type: ignore[misc]


def _call_model(handler: Callable[[ModelRequest], ModelCallResult], request: ModelRequest) -> dict[str, Any]:
    return _recorded(_with_message_ids(handler(request)))


async def _acall_model(
    handler: Callable[[ModelRequest], Awaitable[ModelCallResult]], request: ModelRequest
) -> dict[str, Any]:
    return _recorded(_with_message_ids(await handler(request)))


class ToolCallBlocked(SodaGuardError):
    """Raised from `on_tool_start` (with `raise_error=True`) before a blocked or escalated tool
    body runs; a callback cannot ask a person, so escalate stops the tool too. `decision` is the
    full record of why."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        name = decision.tool_call.name if decision.tool_call else "tool"
        super().__init__(f"soda-guard stopped `{name}` ({decision.action.value}): {decision.why}")


class ToolResultBlocked(SodaGuardError):
    """Raised from `on_tool_end` (with `raise_error=True`) where the policy withholds a tool's
    result (`tool_results`): the tool has run, but its output does not reach the caller, which
    gets this instead. `decision` is the moderation's full record."""

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        name = decision.tool_call.name if decision.tool_call else "tool"
        super().__init__(f"soda-guard withheld the result of `{name}` ({decision.action.value}): {decision.why}")


MAX_OPEN_TURNS = 16
"""Model turns per conversation whose calls have not all started that the callback handler
matches starting tools against; past it the oldest is no longer matched, and a call of it that
starts later is judged on its own, in its turn's conversation while `RECENT_TURNS` holds it."""
RECENT_TURNS = 256
"""Model turns per conversation whose conversation the callback handler keeps for calls that
no waiting call matches: a call started again (a retry after a block), one whose turn left
`MAX_OPEN_TURNS`, one whose arguments changed. Each is judged in the conversations of the
latest `CONTEXTS` kept turns that asked for it (`_decide`), and takes the strictest of those
decisions: a router or side model that reused the id, or ran last, does not stand in for the
user's turn."""
CONTEXTS = 4
"""Kept turns at most, the latest that asked for a starting run's call, whose conversations or
decisions a run that no single waiting call settles is decided by."""


class _Recent:
    """The latest `RECENT_TURNS` turns of a conversation, found by the ids and the names of
    their calls (a lookup per tool start, not a walk over every turn)."""

    def __init__(self) -> None:
        self._turns: deque[_Turn] = deque()
        self._by: dict[tuple[str, str], list[_Turn]] = {}

    def add(self, turn: _Turn) -> None:
        self._turns.append(turn)
        for key in self._keys(turn):
            self._by.setdefault(key, []).append(turn)
        if len(self._turns) > RECENT_TURNS:
            old = self._turns.popleft()
            for key in self._keys(old):
                held = self._by[key]
                held.remove(old)
                if not held:
                    del self._by[key]

    def asking(self, name: str, call_id: str | None) -> list[_Turn]:
        """The latest `CONTEXTS` turns that asked for a call of this id, else of this name."""
        by_id = self._by.get(("id", call_id), []) if call_id is not None else []
        return (by_id or self._by.get(("name", name), []))[-CONTEXTS:]

    @staticmethod
    def _keys(turn: _Turn) -> set[tuple[str, str]]:
        return {("id", call.id) for call in turn.calls} | {("name", call.name) for call in turn.calls}


@dataclass(eq=False)
class _Turn:
    """A model turn that asked for tools, kept until each of its calls has started: a call is
    judged in the conversation its turn was made in, whatever other model runs (a router, a
    node that describes the plan, a run beside it on the same handler) the app makes before
    its tools start."""

    trajectory: Trajectory
    turn_id: str
    calls: tuple[ToolCall, ...]
    waiting: list[ToolCall]
    """Its calls that have not started yet, each let through once."""
    decisions: dict[CallBinding, Decision] = field(default_factory=dict)
    spent: dict[CallBinding, Decision] = field(default_factory=dict)
    """The decisions of its calls that have started: a later run of the same call (a retry)
    takes its decision too where a newer turn that asked for that call is waiting."""
    keys: dict[int, CallBinding] = field(default_factory=dict)
    """Each of its calls' binding (by the call's identity), made once: it digests the arguments."""


@dataclass
class _Scope:
    """One conversation the handler follows: the outer one, or that of a model run inside a
    tool (a summariser, a sub-agent), each with its own trajectory and its own turns."""

    trajectory: Trajectory
    prefix: str = ""
    turns: list[_Turn] = field(default_factory=list)
    """Turns whose calls have not all started (at most `MAX_OPEN_TURNS`)."""
    recent: _Recent = field(default_factory=_Recent)


@dataclass(frozen=True)
class _ToolRun:
    call: ToolCall
    scope: UUID | None
    """The tool run whose nested conversation the call belongs to (None: the outer one)."""
    recorded: bool
    """Whether its result joins that conversation (a call of it, or of no model turn at all)."""
    turn: _Turn | None = None
    """The model turn that asked for the call, whose conversation its result joins."""


class SodaGuardCallbackHandler(BaseCallbackHandler):
    """Rebuilds the trajectory from callback events of any runnable and judges each tool call
    as it starts. With `raise_error=True` (the default) a call the policy does not let run
    raises `ToolCallBlocked` before the tool body runs; with `raise_error=False` it only records
    (`decisions`). One handler follows one conversation: use a handler per thread. A model
    turn's calls are judged in the conversation that turn was made in, even where another model
    runs before they start (a router, a node that describes the plan).

    Callbacks propagate into child runs, so a chat model that runs inside a tool (a summariser,
    a sub-agent) reaches this handler too. Parent run ids tell such a nested conversation apart:
    it gets a trajectory and a turn of its own, and the outer turn keeps its decisions and its
    user request. A tool called inside a tool without a model of its own is judged on its own,
    in the context of the conversation around it.

    Where the policy moderates tool results (`tool_results`), each result is judged as the tool
    ends; one the policy withholds raises `ToolResultBlocked` in place of the output (with
    `raise_error=True`; else it is only recorded). A callback cannot substitute a result or
    wait for review; use `SodaGuardMiddleware` or the LangGraph node for that. Sync handler:
    LangChain runs it off the event loop on async paths.
    Given a `conversation_id`, it warms the judges when the model is called, as the middleware
    does (`Guard.warm_up`).
    """

    def __init__(
        self,
        policy_or_guard: Policy | Guard,
        *,
        raise_error: bool = True,
        harm: str | None = None,
        environment: str | None = None,
        conversation_id: str | None = None,
        otel: bool = True,
    ) -> None:
        self.guard = as_guard(policy_or_guard, otel=otel)
        self.raise_error = raise_error
        self._root = _Scope(Trajectory(harm=harm, environment=environment, conversation_id=conversation_id))
        self.decisions: list[Decision] = []
        self._scopes: dict[UUID, _Scope] = {}
        self._parents: dict[UUID, UUID | None] = {}
        self._model_runs: dict[UUID, tuple[UUID | None, Trajectory | None]] = {}
        """Each running model's conversation (by the tool it is nested in) and its input."""
        self._tool_runs: dict[UUID, _ToolRun] = {}
        self._lock = threading.RLock()

    @property
    def trajectory(self) -> Trajectory:
        """The outer conversation as this handler has followed it."""
        return self._root.trajectory

    def _enclosing_tool(self, parent_run_id: UUID | None) -> UUID | None:
        """The innermost running tool above a run, by its parents; None outside every tool."""
        run = parent_run_id
        while run is not None:
            if run in self._tool_runs:
                return run
            run = self._parents.get(run)
        return None

    def _scope(self, key: UUID | None) -> _Scope:
        return self._root if key is None else self._scopes[key]

    def _started(self, run_id: UUID, parent_run_id: UUID | None) -> None:
        with self._lock:
            self._parents[run_id] = parent_run_id

    def _ended(self, run_id: UUID) -> None:
        with self._lock:
            self._parents.pop(run_id, None)

    def on_chain_start(
        self, serialized: dict[str, Any], inputs: Any, *, run_id: UUID, parent_run_id: UUID | None = None, **kwargs: Any
    ) -> None:
        self._started(run_id, parent_run_id)

    def on_chain_end(self, outputs: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._ended(run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._ended(run_id)

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        **kwargs: Any,
    ) -> None:
        """The model's input is the conversation so far: it replaces what was accumulated in
        its own conversation (the outer one, or the one nested in the tool it runs in), so a
        trimmed or summarised history is judged as the model saw it. Turns whose calls have not
        all started stay: a model run between a turn and its tools (a router, a node that tells
        the user the plan) is not that turn's conversation, and the turn's calls are judged in
        their own. The run keeps its input, so its answer joins the conversation it was given
        even where another model starts before it ends (a handler shared by runs).

        A model that starts a run of its own (no parent) while a tool of the outer conversation
        is running was started inside that tool with the app's config rather than the tool's:
        the outer model does not start its next turn before its tools are done. It is nested in
        the latest such tool, so it neither replaces the outer conversation nor clears the
        decisions of the outer turn, whose remaining calls would then be judged without it."""
        with self._lock:
            self._parents[run_id] = parent_run_id
            key = self._enclosing_tool(parent_run_id)
            if parent_run_id is None:
                running = [tool_run for tool_run, run in self._tool_runs.items() if run.scope is None]
                key = running[-1] if running else None
            self._model_runs[run_id] = (key, None)
            if not messages:
                return
            fresh = to_trajectory(messages[0])
            if key is not None and key not in self._scopes:
                self._scopes[key] = _Scope(self._root.trajectory.model_copy(update={"steps": []}), prefix=f"{key}")
            scope = self._scope(key)
            scope.trajectory = scope.trajectory.model_copy(update={"steps": fresh.steps})
            self._model_runs[run_id] = (key, scope.trajectory)
            if key is None and scope.trajectory.conversation_id is not None and self.guard.warmable():
                # the steps as they are now: the handler appends the model's answer to its list
                self.guard.warm_up(scope.trajectory.model_copy(update={"steps": list(fresh.steps)}))

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """An answer with tool calls opens a turn, judged when its first call starts; a side
        model's answer with calls of its own is a turn of its conversation too."""
        with self._lock:
            self._parents.pop(run_id, None)
            key, trajectory = self._model_runs.pop(run_id, (None, None))
            scope = self._scopes.get(key) if key is not None else self._root
        generations = response.generations[0] if response.generations else []
        if scope is None or not generations or not isinstance(generations[0], ChatGeneration):
            return
        message = generations[0].message
        if isinstance(message, AIMessage):
            step = to_step(message)
            if step is not None:
                with self._lock:
                    trajectory = scope.trajectory if trajectory is None else trajectory
                    trajectory.append(step)
                    if isinstance(step, AssistantStep) and step.tool_calls:
                        place = f"{scope.prefix}#{len(trajectory.steps) - 1}"
                        turn = _Turn(trajectory, place, tuple(step.tool_calls), list(step.tool_calls))
                        scope.turns.append(turn)
                        del scope.turns[:-MAX_OPEN_TURNS]
                        scope.recent.add(turn)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        with self._lock:
            self._parents.pop(run_id, None)
            self._model_runs.pop(run_id, None)

    def _key(self, turn: _Turn, call: ToolCall) -> CallBinding:
        """`call`'s binding in `turn` (one of its calls), made once per call."""
        key = turn.keys.get(id(call))
        if key is None:
            key = turn.keys[id(call)] = self._binding(call, turn.turn_id)
        return key

    def _binding(self, call: ToolCall, turn: str) -> CallBinding:
        return CallBinding.of(
            thread_id=self._root.trajectory.conversation_id, turn_id=turn, call_id=call.id, tool=call.name, args=call.args
        )

    @staticmethod
    def _asked(calls: Any, name: str, args: Any, call_id: str | None, digest: str) -> list[ToolCall]:
        """Those of `calls` that this run may be, as the model asked for them: by
        `tool_call_id` (from langchain-core 1.8.2), else by name and arguments; LangChain leaves
        `InjectedToolArg` values out of `inputs`, so without an id a run may be more than one."""
        return [
            call for call in calls
            if call.name == name and (call_id is None or call.id == call_id)
            and (args_digest(call.args) == digest or injected_left_out(call.args, args, digest))
        ]

    def _decide(
        self, scope: _Scope, own: bool, name: str, args: Any, call_id: str | None, run_id: UUID
    ) -> tuple[Decision, ToolCall, _Turn | None]:
        """The decision a starting run takes, the call it is recorded as, and its turn.

        A run that waiting calls of open turns may be takes the strictest of their decisions
        (each judged with its turn's other waiting calls, in its turn's conversation; a side
        model that asked for the same call is one more of them, and a run that may be more
        than one call never runs on another's allow) and of the latest `CONTEXTS` turns whose
        same call started already (a retry), and the least strict waiting call leaves its turn.
        Any other run of its own conversation (started again after a block, its arguments
        changed, its turn no longer open) is judged alone in the conversations of the latest
        `CONTEXTS` kept turns that asked for a call of its id (else of its name), those that
        asked for exactly this call if any, and takes the strictest. A run no turn asked for (a
        tool called by a tool, by the app) is judged alone in the conversation as it stands."""
        started = ToolCall(id=call_id or str(run_id), name=name, args=args)
        if not own:
            return self._judge(scope.trajectory, [started])[0], started, None
        digest = args_digest(args)
        waiting = [(turn, call) for turn in scope.turns for call in self._asked(turn.waiting, name, args, call_id, digest)]
        for turn in dict.fromkeys(turn for turn, call in waiting if self._key(turn, call) not in turn.decisions):
            unjudged = [c for c in turn.waiting if self._key(turn, c) not in turn.decisions]
            for made in self._judge(turn.trajectory, unjudged):
                turn.decisions.setdefault(self._binding(made.tool_call, turn.turn_id), made)  # type: ignore[arg-type]
        nearby = scope.recent.asking(name, call_id)
        exact = [(turn, self._asked(turn.calls, name, args, call_id, digest)) for turn in nearby]
        exact = [(turn, calls) for turn, calls in exact if calls]
        if waiting:
            ranked = sorted(waiting, key=lambda pair: pair[0].decisions[self._key(*pair)].allowed)
            (turn, call), (spent_turn, spent) = ranked[0], ranked[-1]
            made = [turn.decisions[self._key(turn, call)]]
            made += [t.spent[b] for t, calls in exact for c in calls if (b := self._key(t, c)) in t.spent]
            binding = self._key(spent_turn, spent)
            spent_turn.spent[binding] = spent_turn.decisions.pop(binding)
            spent_turn.waiting.remove(spent)
            if not spent_turn.waiting:
                scope.turns.remove(spent_turn)
            return min(made, key=lambda decision: decision.allowed), spent, spent_turn
        contexts = [turn.trajectory for turn, _ in exact] or [turn.trajectory for turn in nearby] or [scope.trajectory]
        decisions = [self._judge(trajectory, [started])[0] for trajectory in contexts]
        return min(decisions, key=lambda made: made.allowed), started, None

    def _judge(self, trajectory: Trajectory, calls: list[ToolCall]) -> list[Decision]:
        carry_out = unasked if self.raise_error else None  # it can stop a run, never wait for a person
        decisions = self.guard.check_tool_calls(with_calls(trajectory, calls), context=trajectory, carry_out=carry_out)
        judged = [decision for decision in decisions if decision.tool_call is not None]
        self.decisions.extend(judged)
        return judged

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        parent_run_id: UUID | None = None,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Each decision lets one run of its exact call through, once: the call leaves its turn
        when it starts, and a call that matches no waiting call (arguments changed since the
        model asked, a reused id, a tool run outside a model turn, a tool called by a tool) is
        judged on its own. A call of a turn is judged with the turn's other waiting calls, in
        the turn's conversation, and as the model asked for it: LangChain leaves the values of
        `InjectedToolArg` parameters out of `inputs`, though a call run as the model wrote it
        hands the tool the model's."""
        name, args = started_tool(serialized, input_str, inputs, kwargs)
        args = args if isinstance(args, (dict, str)) else str(args)
        call_id = kwargs.get("tool_call_id")
        with self._lock:
            self._parents[run_id] = parent_run_id
            key = self._enclosing_tool(parent_run_id)
            own = key is None or key in self._scopes
            while key is not None and key not in self._scopes:  # no model ran in that tool
                key = self._tool_runs[key].scope
            scope = self._scope(key)
            decision, call, turn = self._decide(scope, own, name, args, call_id, run_id)
            self._tool_runs[run_id] = _ToolRun(call, key, recorded=own, turn=turn)
        if self.raise_error and not decision.allowed:
            self._tool_result(run_id, refusal_text(call.name, decision.why), is_error=True)
            raise ToolCallBlocked(decision)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        moderation = self._moderated(run_id, output)
        if moderation is None or moderation.action.runs_tool or not self.raise_error:
            self._tool_result(run_id, output, is_error=False)
            return
        self._tool_result(run_id, f"soda-guard withheld the result: {moderation.why}", is_error=True)
        raise ToolResultBlocked(moderation)

    def _moderated(self, run_id: UUID, output: Any) -> Decision | None:
        """The moderation of a tool's result, where the policy asks for one, on the
        conversation of the call that ran (recorded in `decisions`)."""
        if self.guard.policy.tool_results is None:
            return None
        with self._lock:
            run = self._tool_runs.get(run_id)
            if run is None:
                return None
            alive = run.scope is None or run.scope in self._scopes
            # a nested conversation already over leaves the call to the one around it
            scope = self._scopes[run.scope] if run.scope in self._scopes else self._root
            trajectory = run.turn.trajectory if run.turn is not None and alive else scope.trajectory
        text, failed = result_text(output)
        message = ToolMessage(content=text, tool_call_id=run.call.id, name=run.call.name, status="error" if failed else "success")
        decision = self.guard.check_tool_result(with_result(trajectory, run.call, message))
        if decision is not None:
            with self._lock:
                self.decisions.append(decision)
        return decision

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        """An exception's text reaches the model too (a ToolNode's error handling, a retry
        middleware), so it is moderated as the tool's result; withheld, `ToolResultBlocked`
        goes up in its place, and whatever turns it into a message shows the refusal."""
        moderation = self._moderated(run_id, ToolMessage(content=error_text(error), tool_call_id="", status="error"))
        if moderation is None or moderation.action.runs_tool or not self.raise_error:
            self._tool_result(run_id, f"{type(error).__name__}: {error}", is_error=True)
            return
        self._tool_result(run_id, f"soda-guard withheld the error: {moderation.why}", is_error=True)
        raise ToolResultBlocked(moderation) from None

    def _tool_result(self, run_id: UUID, output: Any, *, is_error: bool) -> None:
        with self._lock:
            self._parents.pop(run_id, None)
            self._scopes.pop(run_id, None)  # the conversation nested in this tool is over
            run = self._tool_runs.pop(run_id, None)
            if run is None or not run.recorded or (run.scope is not None and run.scope not in self._scopes):
                return
            text, failed = result_text(output)
            (run.turn.trajectory if run.turn is not None else self._scope(run.scope).trajectory).append(
                ToolStep(tool_call_id=run.call.id, name=run.call.name, content=text, is_error=is_error or failed)
            )



