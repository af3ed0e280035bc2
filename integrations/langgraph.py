"""LangGraph adapters for hand-built graphs: a guard node between the model node and the tools
node, and a `wrap_tool_call` wrapper for `ToolNode`.

    builder.add_node("agent", call_model)
    builder.add_node("guard", guard_node(policy))          # routes with Command(goto=...)
    builder.add_node("tools", ToolNode(tools, wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap))
    builder.add_edge(START, "agent"); builder.add_edge("agent", "guard"); builder.add_edge("tools", "agent")

The graph state needs the `soda_guard` key (use or extend `GuardState`): the node stores the
latest turn's records there for the wrapper. Its judgments are LangGraph tasks, so a resume
after a review pause, even in a new process over the same checkpointer, does not judge again.
Neither sees the model called: `warm_judges(guard, state["messages"])` in the model node, just
before the model, warms the judges as the middleware does for `create_agent`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Generator, Literal, Mapping

from langchain_core.messages import AIMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langgraph.graph import END, MessagesState
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command, Send
from typing_extensions import NotRequired

from soda_guard.errors import SodaGuardError
from soda_guard.guard import Guard
from soda_guard.policy import Policy
from soda_guard.records import CallRecord, TurnRecords

from soda_guard.integrations._convert import METADATA_KEY, STATE_KEY, last_turn, refusal_text
from soda_guard.integrations._enforce import (
    AsyncHandler,
    Handler,
    ToolCallEnforcer,
    arun_steps,
    as_guard,
    resolve_turn,
    run_steps,
    thread_id,
    warm_judges,
)
from soda_guard.integrations._state import closing, state_form, stored_turn

__all__ = ["GuardNode", "GuardState", "SodaGuardToolWrapper", "guard_node", "warm_judges"]

ANSWER_KEY = "soda_guard_answer"

logger = logging.getLogger("soda_guard")


class GuardState(MessagesState):
    """Messages plus the records of the latest model turn (verdicts, reviews), replaced when
    the next turn is judged."""

    soda_guard: NotRequired[dict[str, Any]]


class GuardNode:
    """Judges the latest model turn's tool calls in one batch, asks a reviewer once for the
    turn's escalated calls (an `HITLRequest` interrupt; the judgment is a LangGraph task, so
    the resume does not judge again), then routes: calls that run go to the tools node (one
    `Send` each, like `create_agent`), refused calls are answered with error `ToolMessage`s,
    and a turn without tool calls ends the graph."""

    def __init__(
        self,
        guard: Guard,
        *,
        tools: str,
        model: str,
        on_block: Literal["model", "end"],
        state_key: str,
        messages_key: str,
        harm: str | None,
        environment: str | None,
    ) -> None:
        self.guard = guard
        self.tools = tools
        self.model = model
        self.on_block = on_block
        self.state_key = state_key
        self.messages_key = messages_key
        self.harm = harm
        self.environment = environment
        self.enforcer = ToolCallEnforcer(guard, state_key=state_key, messages_key=messages_key, harm=harm, environment=environment)

    def _route(self, last_ai: AIMessage, turn: TurnRecords) -> Command[Any]:
        """Calls that run go to the tools node; the others are answered here. When both kinds
        are in the turn, every answer is its own `Send` in call order (a refusal to this very
        node), so the turn's results land in the order of its calls, as on the other paths,
        and the next judgment reads the same conversation whichever path ran."""
        answers: list[Send | ToolMessage] = []
        for record in turn.records:
            call = record.call
            if record.outcome == "run":
                ran = record.ran_call()
                original = next((c for c in last_ai.tool_calls if c.get("id") == call.id), None)
                answers.append(Send(self.tools, [{**(original or {}), "id": call.id, "name": ran.name, "args": ran.args, "type": "tool_call"}]))
            else:
                answers.append(_answer(record))
        update: dict[str, Any] = {self.state_key: state_form(turn, self.enforcer.seal)}
        if any(isinstance(answer, Send) for answer in answers):
            node = _this_node()
            return Command(update=update, goto=[a if isinstance(a, Send) else Send(node, {ANSWER_KEY: a}) for a in answers])
        if answers:
            update[self.messages_key] = answers
        return Command(update=update, goto=self.model if self.on_block == "model" else END)

    def _steps(self, state: Mapping[str, Any]) -> Generator[Any, Any, Command[Any]]:
        if not isinstance(state, Mapping):  # a list state is the conversation, with no key for the records
            raise SodaGuardError(
                f"guard_node reads the conversation under {self.messages_key!r} and keeps the turn's records under "
                f"{self.state_key!r} of the graph state, which is a {type(state).__name__} here: use (or extend) GuardState"
            )
        messages = list(state.get(self.messages_key) or [])
        located = last_turn(messages)
        stored = yield from stored_turn(state, self.state_key, self.enforcer.seal)
        if located is None or not located[1].tool_calls:
            closed = closing(stored, messages)
            return Command(goto=END, update={self.state_key: state_form(closed, self.enforcer.seal)} if closed else None)
        turn = yield from resolve_turn(
            messages,
            stored,
            thread=thread_id(),
            policy=self.guard.policy,
            hold_turn=True,
            harm=self.harm,
            environment=self.environment,
        )
        if turn is None:
            return Command(goto=self.model)
        return self._route(located[1], turn)

    def _answered(self, state: Mapping[str, Any]) -> dict[str, Any] | None:
        """A call of a turn that also runs tools, answered without running (refused, or
        answered by a reviewer): the node sent it to itself to write it in its call's place.
        A plain dict holding a ToolMessage, so any checkpointer stores the pending send."""
        message = state.get(ANSWER_KEY) if isinstance(state, Mapping) and len(state) == 1 else None
        return {self.messages_key: [message]} if isinstance(message, ToolMessage) else None

    def invoke(self, state: Mapping[str, Any]) -> Command[Any] | dict[str, Any]:
        answered = self._answered(state)
        if answered is not None:
            return answered
        return run_steps(self._steps(state), self.enforcer.answer(None))

    async def ainvoke(self, state: Mapping[str, Any]) -> Command[Any] | dict[str, Any]:
        answered = self._answered(state)
        if answered is not None:
            return answered
        return await arun_steps(self._steps(state), self.enforcer.aanswer(None))


def _answer(record: CallRecord) -> ToolMessage:
    call = record.call
    if record.outcome == "respond":
        content = record.message or ""
    else:
        content = refusal_text(call.name, record.message or record.decision.why)
    return ToolMessage(
        content=content,
        tool_call_id=call.id,
        name=call.name,
        status="success" if record.outcome == "respond" else "error",
        response_metadata={METADATA_KEY: record.summary()},
    )


def _this_node() -> str:
    """The guard node's name in its graph (whatever `add_node` called it)."""
    from langgraph.config import get_config

    return str(get_config()["metadata"]["langgraph_node"])


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
    """The guard as a graph node (sync and async), named `name` in traces. `on_block="end"`
    stops the run instead of telling the model that its calls were refused."""
    node = GuardNode(
        as_guard(policy_or_guard, otel=otel),
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
    policy asks, and stamps `response_metadata["soda_guard"]` where it did more than allow a
    call. Used without the guard node it judges each turn itself: the turn's first call leads,
    judging all of the turn's calls in one batch and asking a reviewer once for its
    escalations, while the other calls wait for it (give the ToolNode the whole model message,
    as `tools_condition` routing does)."""

    def __init__(
        self,
        policy_or_guard: Policy | Guard,
        *,
        state_key: str = STATE_KEY,
        messages_key: str = "messages",
        harm: str | None = None,
        environment: str | None = None,
        otel: bool = True,
    ) -> None:
        self.guard = as_guard(policy_or_guard, otel=otel)
        self._enforcer = ToolCallEnforcer(
            self.guard, state_key=state_key, messages_key=messages_key, harm=harm, environment=environment
        )
        self._warned = False

    def __call__(self, request: ToolCallRequest, handler: Handler) -> ToolMessage | Command[Any]:
        if not self._warned and asyncio._get_running_loop() is not None:
            # a ToolNode given no `awrap_tool_call` calls this one from async runs, on the loop
            self._warned = True
            logger.warning(
                "SodaGuardToolWrapper was called on a running event loop, which it holds while it judges: "
                "give the ToolNode awrap_tool_call=wrapper.awrap as well"
            )
        return self._enforcer.wrap(request, handler)

    async def awrap(self, request: ToolCallRequest, handler: AsyncHandler) -> ToolMessage | Command[Any]:
        return await self._enforcer.awrap(request, handler)
