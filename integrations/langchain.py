"""LangChain adapters: agent middleware (enforcement) and a callback handler (observation, with
an optional hard stop for plain tool-calling loops).

    agent = create_agent(model, tools, middleware=[SodaGuardMiddleware(policy)], checkpointer=saver)

`SodaGuardDecisionModel` (the judges as the classifier of LangChain's `AutoModeMiddleware`)
needs `langchain_core.decisions`, new in langchain-core 1.8: `HAS_DECISION_MODELS` says whether
this install has it.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import uuid
from typing import Any, Awaitable, Callable, Generator, Mapping
from uuid import UUID

from langchain.agents.middleware import AgentMiddleware, AgentState
from langchain.agents.middleware.types import ExtendedModelResponse, ModelCallResult, ModelRequest, ModelResponse
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.func import task
from langgraph.types import Command
from typing_extensions import NotRequired

from soda_guard.binding import CallBinding
from soda_guard.errors import SodaGuardError
from soda_guard.guard import Guard
from soda_guard.policy import Policy
from soda_guard.records import TurnRecords
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep, Trajectory
from soda_guard.verdict import Decision

from soda_guard.integrations._convert import (
    STATE_KEY,
    message_text,
    refusal_text,
    to_step,
    to_trajectory,
    turn_records,
    with_calls,
)
from soda_guard.integrations._enforce import (
    ToolCallEnforcer,
    in_graph,
    arun_steps,
    as_guard,
    resolve_turn,
    run_steps,
    thread_id,
)

HAS_DECISION_MODELS = importlib.util.find_spec("langchain_core.decisions") is not None

__all__ = [
    "HAS_DECISION_MODELS",
    "SodaGuardCallbackHandler",
    "SodaGuardMiddleware",
    "SodaGuardState",
    "ToolCallBlocked",
]

if HAS_DECISION_MODELS:
    from soda_guard.integrations.decision_model import SodaGuardDecisionModel

    __all__ += ["SodaGuardDecisionModel"]


class SodaGuardState(AgentState):
    """Agent state plus the records of the latest model turn (`soda_guard.records.TurnRecords`
    as JSON), replaced when the next turn is judged. A call's finished record travels on in
    its ToolMessage's metadata and in the audit sinks, so the state does not grow with the
    thread and the checkpoints stay small."""

    soda_guard: NotRequired[dict[str, Any]]


class SodaGuardMiddleware(AgentMiddleware):
    """Judges every tool call of a model turn in one batched judge call as the model answers
    and, when any is escalated, asks a reviewer once for the turn (a LangChain `HITLRequest`
    interrupt) before any call of it runs (`wrap_model_call`); then enforces each call where
    the tool would run (`wrap_tool_call`), only on the record bound to that exact call: allow
    and log run the tool, block answers the model with an error `ToolMessage`. Each
    ToolMessage carries a summary in `response_metadata["soda_guard"]`.

    The turn is judged inside the model's own step rather than in an `after_model` step of its
    own: every step of a checkpointed graph stores the whole conversation again, and a step
    per turn would grow the checkpoints by half. The model call, the judgment and the question
    are LangGraph tasks, so a run resumed after a review neither calls the model nor judges
    again, even in a new process."""

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
        self._model = task(_call_model, name="model")
        self._amodel = task(_acall_model, name="model")

    def _turn(
        self, request: ModelRequest, response: ModelResponse
    ) -> tuple[TurnRecords | None, Generator[Any, Any, TurnRecords | None]]:
        stored = turn_records(request.state, STATE_KEY)
        steps = resolve_turn(
            [*request.state.get("messages", []), *response.result],
            stored,
            thread=thread_id(),
            hold_turn=self.guard.policy.review.hold_turn,
            harm=self.harm,
            environment=self.environment,
        )
        return stored, steps

    @staticmethod
    def _answer(
        response: ModelResponse, update: list[tuple[str, Any]], stored: TurnRecords | None, turn: TurnRecords | None
    ) -> ModelCallResult:
        if turn is not None and turn != stored:
            update = [*update, (STATE_KEY, turn.for_state())]
        return ExtendedModelResponse(model_response=response, command=Command(update=update)) if update else response

    def _warm_up(self, request: ModelRequest) -> None:
        """Start warming the judge with the conversation so far, just before the model is
        called: only the coming action is then left for the judgment to prefill. Queues
        work and returns; the conversion runs on the guard's warm-up thread."""
        messages, thread = list(request.state.get("messages", [])), thread_id()
        self.guard.warm_up(lambda: to_trajectory(messages, conversation_id=thread, harm=self.harm, environment=self.environment))

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], ModelCallResult]) -> ModelCallResult:
        self._warm_up(request)
        response, update = _replayed(self._model(handler, request).result() if in_graph() else _call_model(handler, request))
        stored, steps = self._turn(request, response)
        return self._answer(response, update, stored, run_steps(steps, self._enforcer.answer(None)))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelCallResult]]
    ) -> ModelCallResult:
        self._warm_up(request)
        response, update = _replayed(await self._amodel(handler, request) if in_graph() else await _acall_model(handler, request))
        stored, steps = self._turn(request, response)
        return self._answer(response, update, stored, await arun_steps(steps, self._enforcer.aanswer(None)))

    def wrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Any]
    ) -> Any:
        return self._enforcer.wrap(request, handler)

    async def awrap_tool_call(
        self, request: ToolCallRequest, handler: Callable[[ToolCallRequest], Awaitable[Any]]
    ) -> Any:
        return await self._enforcer.awrap(request, handler)


def _with_message_ids(result: ModelCallResult) -> ModelResponse | ExtendedModelResponse:
    """The model's answer with an id on every message: LangGraph's reducer would otherwise
    give the AI message one only after the turn was judged, and the turn's records are bound
    to that id."""
    if isinstance(result, AIMessage):
        result = ModelResponse(result=[result])
    if isinstance(result, ModelResponse):
        for message in result.result:
            if message.id is None:
                message.id = f"lc_{uuid.uuid4()}"
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


class SodaGuardCallbackHandler(BaseCallbackHandler):
    """Rebuilds the trajectory from callback events of any runnable and judges each tool call
    as it starts. With `raise_error=True` (the default) a call the policy does not let run
    raises `ToolCallBlocked` before the tool body runs; with `raise_error=False` it only records
    (`decisions`). One handler follows one conversation: use a handler per thread.

    A callback cannot substitute a result or wait for review; use `SodaGuardMiddleware` or the
    LangGraph node for that. Sync handler: LangChain runs it off the event loop on async paths.
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
        self.trajectory = Trajectory(harm=harm, environment=environment, conversation_id=conversation_id)
        self.decisions: list[Decision] = []
        self._turn: dict[CallBinding, Decision] = {}
        self._tool_runs: dict[UUID, ToolCall] = {}
        self._lock = threading.RLock()

    def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        """The model's input is the conversation so far: it replaces what was accumulated, so
        a trimmed or summarised history is judged as the model saw it. A new model call ends
        the previous turn: its decisions can no longer be used."""
        if not messages:
            return
        fresh = to_trajectory(messages[0])
        with self._lock:
            self.trajectory = self.trajectory.model_copy(update={"steps": fresh.steps})
            self._turn.clear()

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        generations = response.generations[0] if response.generations else []
        if not generations or not isinstance(generations[0], ChatGeneration):
            return
        message = generations[0].message
        if isinstance(message, AIMessage):
            step = to_step(message)
            if step is not None:
                with self._lock:
                    self.trajectory.append(step)
                    self._turn.clear()

    def _turn_id(self) -> str:
        """The latest model turn, by its place in the conversation as this handler saw it."""
        steps = self.trajectory.steps
        return next((f"#{i}" for i in range(len(steps) - 1, -1, -1) if isinstance(steps[i], AssistantStep)), "#none")

    def _binding(self, call: ToolCall, turn: str) -> CallBinding:
        return CallBinding.of(
            thread_id=self.trajectory.conversation_id, turn_id=turn, call_id=call.id, tool=call.name, args=call.args
        )

    def _match(self, name: str, args: Any, call_id: str | None, run_id: UUID) -> tuple[ToolCall, bool]:
        """The call as it will run (these arguments, not necessarily the model's) and whether
        it is one of the turn's pending calls. `tool_call_id` reaches `on_tool_start` only from
        langchain-core 1.8.2; without it the pending call with this name and arguments is it."""
        args = args if isinstance(args, (dict, str)) else str(args)
        running = {call.id for call in self._tool_runs.values()}
        for call in self.trajectory.pending_tool_calls():
            if call.name == name and (call_id is None or call.id == call_id) and call.id not in running and _same_args(call.args, args):
                return call, True
        return ToolCall(id=call_id or str(run_id), name=name, args=args), False

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: UUID,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Each decision lets one run of its exact call through, once: it is taken out of the
        turn when used, and a call that matches no pending call (arguments changed since the
        model asked, a reused id, a tool run outside a model turn) is judged on its own."""
        name = (serialized or {}).get("name") or kwargs.get("name") or "tool"
        args: Any = inputs if inputs is not None else _parse_args(input_str)
        with self._lock:
            call, pending = self._match(name, args, kwargs.get("tool_call_id"), run_id)
            self._tool_runs[run_id] = call
            turn = self._turn_id()
            key = self._binding(call, turn)
            if key not in self._turn:
                if pending:
                    calls = [c for c in self.trajectory.pending_tool_calls() if self._binding(c, turn) not in self._turn]
                    found = self.guard.check_tool_calls(with_calls(self.trajectory, calls))
                else:
                    found = self.guard.check_tool_calls(with_calls(self.trajectory, [call]))
                for decision in found:
                    if decision.tool_call is not None:
                        self._turn.setdefault(self._binding(decision.tool_call, turn), decision)
                        self.decisions.append(decision)
            decision = self._turn.pop(key)
        if self.raise_error and not decision.allowed:
            self._tool_result(run_id, refusal_text(call.name, decision.why), is_error=True)
            raise ToolCallBlocked(decision)

    def on_tool_end(self, output: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._tool_result(run_id, output, is_error=False)

    def on_tool_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._tool_result(run_id, f"{type(error).__name__}: {error}", is_error=True)

    def _tool_result(self, run_id: UUID, output: Any, *, is_error: bool) -> None:
        with self._lock:
            call = self._tool_runs.pop(run_id, None)
            if call is None:
                return
            content = getattr(output, "content", output)
            status_error = getattr(output, "status", None) == "error"
            self.trajectory.append(
                ToolStep(
                    tool_call_id=call.id, name=call.name, content=message_text(content), is_error=is_error or status_error
                )
            )


def _parse_args(input_str: str) -> dict[str, Any] | str:
    try:
        parsed = json.loads(input_str)
    except (TypeError, ValueError):
        return input_str
    return parsed if isinstance(parsed, dict) else input_str


def _same_args(left: Any, right: Any) -> bool:
    if left == right:
        return True
    return json.dumps(left, sort_keys=True, default=str) == json.dumps(right, sort_keys=True, default=str)


