"""LangGraph adapters for hand-built graphs: a guard node between the model node and the tools
node, and a `wrap_tool_call` wrapper for `ToolNode`.

    builder.add_node("agent", call_model)
    builder.add_node("guard", guard_node(policy))          # routes with Command(goto=...)
    builder.add_node("tools", ToolNode(tools, wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap))
    builder.add_edge(START, "agent"); builder.add_edge("agent", "guard"); builder.add_edge("tools", "agent")

The graph state needs the `soda_guard` key (use or extend `GuardState`): the node writes each
verdict there before it pauses for review, so a resume, even in a new process over the same
checkpointer, reads the verdict back instead of judging again.
"""

from __future__ import annotations

from typing import Annotated, Any, Generator, Literal, Mapping

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, MessagesState
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command, Send
from typing_extensions import NotRequired

from soda_guard.guard import Guard
from soda_guard.policy import Policy
from soda_guard.trajectory import ToolCall, Trajectory
from soda_guard.verdict import Action, Decision

from soda_guard.integrations._convert import (
    METADATA_KEY,
    STATE_KEY,
    merge_records,
    record_of,
    refusal_text,
    to_trajectory,
)
from soda_guard.integrations._enforce import (
    AsyncHandler,
    Handler,
    Judging,
    ToolCallEnforcer,
    apply_review,
    arun_steps,
    as_guard,
    ask_reviewer,
    resolve_fixed,
    run_steps,
    thread_id,
)

__all__ = ["GuardNode", "GuardState", "SodaGuardToolWrapper", "guard_node", "merge_records"]


class GuardState(MessagesState):
    """Messages plus the guard's per-tool-call records (verdict, review, result moderation)."""

    soda_guard: NotRequired[Annotated[dict[str, dict[str, Any]], merge_records]]


class GuardNode:
    """Judges the latest model turn's tool calls in one batch and routes: allowed calls go to
    the tools node (one `Send` each, like `create_agent`), refused calls are answered with
    error `ToolMessage`s, escalated calls wait for a person via `interrupt()`, and a turn
    without tool calls ends the graph."""

    def __init__(
        self,
        guard: Guard,
        *,
        name: str,
        tools: str,
        model: str,
        on_block: Literal["model", "end"],
        state_key: str,
        messages_key: str,
        harm: str | None,
        environment: str | None,
    ) -> None:
        self.guard = guard
        self.name = name
        self.tools = tools
        self.model = model
        self.on_block = on_block
        self.state_key = state_key
        self.messages_key = messages_key
        self.harm = harm
        self.environment = environment
        self.judging = Judging(guard)

    def _view(self, state: Mapping[str, Any]) -> tuple[AIMessage | None, Trajectory, dict[str, dict[str, Any]]]:
        messages = list(state.get(self.messages_key) or [])
        last_ai = next((m for m in reversed(messages) if isinstance(m, AIMessage)), None)
        trajectory = to_trajectory(messages, conversation_id=thread_id(), harm=self.harm, environment=self.environment)
        return last_ai, trajectory, dict(state.get(self.state_key) or {})

    def _judged(self, decisions: list[Decision]) -> Command[Any]:
        """Verdicts are checkpointed before anything can pause: the node comes back to itself."""
        records = {d.tool_call.id: {"decision": record_of(d)} for d in decisions if d.tool_call is not None}
        return Command(update={self.state_key: records}, goto=self.name)

    def _next_review(self, pending: list[ToolCall], records: dict[str, dict[str, Any]]) -> ToolCall | None:
        return next((call for call in pending if resolve_fixed(records[call.id], call) is None), None)

    def _route(self, last_ai: AIMessage, pending: list[ToolCall], records: dict[str, dict[str, Any]]) -> Command[Any]:
        runs: list[ToolCall] = []
        messages: list[Any] = []
        for call in pending:
            kind, detail = resolve_fixed(records[call.id], call)  # type: ignore[misc]
            if kind == "run":
                assert isinstance(detail, ToolCall)
                runs.append(detail)
            else:
                messages.append(
                    ToolMessage(
                        content=refusal_text(call.name, str(detail)),
                        tool_call_id=call.id,
                        name=call.name,
                        status="error",
                        response_metadata={METADATA_KEY: records[call.id]},
                    )
                )
        edited = {call.id: call.args for call in runs if call.args != _original_args(last_ai, call.id)}
        if edited:
            calls = [{**c, "args": edited.get(c["id"], c["args"])} for c in last_ai.tool_calls]
            messages.insert(0, last_ai.model_copy(update={"tool_calls": calls}))
        update = {self.messages_key: messages} if messages else None
        if runs:
            by_id = {c["id"]: c for c in last_ai.tool_calls}
            sends = [Send(self.tools, [{**by_id[call.id], "args": call.args}]) for call in runs]
            return Command(update=update, goto=sends)
        return Command(update=update, goto=self.model if self.on_block == "model" else END)

    def _steps(self, state: Mapping[str, Any]) -> Generator[tuple[Trajectory, list[ToolCall]], list[Decision], Command[Any]]:
        """The node's logic once for both paths: it yields (trajectory, calls) whenever it needs
        decisions and is sent them back; `invoke` judges with the sync guard, `ainvoke` awaits."""
        last_ai, trajectory, records = self._view(state)
        pending = trajectory.pending_tool_calls()
        if last_ai is None or not last_ai.tool_calls:
            return Command(goto=END)
        if not pending:
            return Command(goto=self.model)
        unjudged = [call for call in pending if call.id not in records]
        if unjudged:
            decisions = yield trajectory, unjudged
            if any(d.action is Action.ESCALATE for d in decisions):
                return self._judged(decisions)
            records = merge_records(records, {d.tool_call.id: {"decision": record_of(d)} for d in decisions if d.tool_call})
            return self._with_records(self._route(last_ai, pending, records), decisions)
        call = self._next_review(pending, records)
        if call is not None:
            review = ask_reviewer(call, records[call.id])
            edit = None
            if review["type"] == "edit":
                edit = (yield trajectory, [call.model_copy(update={"args": review["args"]})])[0]
            return Command(update={self.state_key: {call.id: apply_review(records[call.id], call, review, edit)}}, goto=self.name)
        return self._route(last_ai, pending, records)

    def invoke(self, state: Mapping[str, Any]) -> Command[Any]:
        return run_steps(self._steps(state), lambda need: self.judging.calls(*need))

    async def ainvoke(self, state: Mapping[str, Any]) -> Command[Any]:
        return await arun_steps(self._steps(state), lambda need: self.judging.acalls(*need))

    def _with_records(self, command: Command[Any], decisions: list[Decision]) -> Command[Any]:
        update = dict(command.update or {})
        update[self.state_key] = {d.tool_call.id: {"decision": record_of(d)} for d in decisions if d.tool_call}
        return Command(update=update, goto=command.goto)


def _original_args(message: AIMessage, call_id: str) -> Any:
    return next((c["args"] for c in message.tool_calls if c["id"] == call_id), None)


def guard_node(
    policy_or_guard: Policy | Guard,
    *,
    name: str = "guard",
    tools: str = "tools",
    model: str = "agent",
    on_block: Literal["model", "end"] = "model",
    state_key: str = STATE_KEY,
    messages_key: str = "messages",
    harm: str | None = None,
    environment: str | None = None,
    otel: bool = True,
) -> RunnableLambda:
    """The guard as a graph node (sync and async). `name` must be the name it is added under:
    the node returns to itself to checkpoint verdicts before a review pause. `on_block="end"`
    stops the run instead of telling the model that its calls were refused."""
    node = GuardNode(
        as_guard(policy_or_guard, otel=otel),
        name=name,
        tools=tools,
        model=model,
        on_block=on_block,
        state_key=state_key,
        messages_key=messages_key,
        harm=harm,
        environment=environment,
    )
    return RunnableLambda(node.invoke, afunc=node.ainvoke, name=name)


class SodaGuardToolWrapper:
    """`ToolNode(tools, wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap)`: enforces the
    verdicts the guard node stored (so it never judges twice), moderates tool results when the
    policy asks, and stamps `response_metadata["soda_guard"]`. Used without the guard node it
    judges each call itself (one judge call per tool call, not batched) and pauses escalated
    calls; verdicts are then remembered in memory only, so a resume in a new process judges again."""

    def __init__(
        self,
        policy_or_guard: Policy | Guard,
        *,
        state_key: str = STATE_KEY,
        harm: str | None = None,
        environment: str | None = None,
        otel: bool = True,
    ) -> None:
        self.guard = as_guard(policy_or_guard, otel=otel)
        self._enforcer = ToolCallEnforcer(self.guard, state_key=state_key, harm=harm, environment=environment)

    def __call__(self, request: ToolCallRequest, handler: Handler) -> ToolMessage | Command[Any]:
        return self._enforcer.wrap(request, handler)

    async def awrap(self, request: ToolCallRequest, handler: AsyncHandler) -> ToolMessage | Command[Any]:
        return await self._enforcer.awrap(request, handler)
