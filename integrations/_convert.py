"""LangChain messages → `Trajectory`, and the JSON records the adapters keep per tool call.

Records are typed (`soda_guard.records`) and become JSON only here, at the graph-state
boundary, since LangGraph state and interrupt payloads must survive any checkpointer's
serializer and a process restart.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from soda_guard.binding import CallBinding
from soda_guard.records import TurnRecords
from soda_guard.seal import RecordSeal
from soda_guard.trajectory import AssistantStep, SystemStep, ToolCall, ToolStep, Trajectory, UserStep

STATE_KEY = "soda_guard"
METADATA_KEY = "soda_guard"


def message_text(content: Any) -> str:
    """Text of a message `content` that may be a string or a list of blocks; non-text blocks
    become a `[type]` marker so the judge knows something was there."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces = []
        for block in content:
            if isinstance(block, str):
                pieces.append(block)
            elif isinstance(block, dict):
                text = block.get("text")
                pieces.append(text if isinstance(text, str) else f"[{block.get('type', 'block')}]")
            else:
                pieces.append(str(block))
        return "\n".join(pieces)
    return "" if content is None else str(content)


def call_id(call: Mapping[str, Any], index: int) -> str:
    """Providers occasionally omit ids; a positional stand-in keeps calls distinct."""
    return str(call.get("id") or f"{call.get('name', 'tool')}#{index}")


def to_tool_call(call: Mapping[str, Any], index: int = 0) -> ToolCall:
    args = call.get("args")
    if not isinstance(args, (dict, str)):
        args = {} if args is None else str(args)
    return ToolCall(id=call_id(call, index), name=str(call.get("name") or ""), args=args)


def to_step(message: BaseMessage) -> SystemStep | UserStep | AssistantStep | ToolStep | None:
    text = message_text(message.content)
    if isinstance(message, SystemMessage):
        return SystemStep(content=text)
    if isinstance(message, HumanMessage):
        return UserStep(content=text)
    if isinstance(message, AIMessage):
        calls = [to_tool_call(call, index) for index, call in enumerate(message.tool_calls)]
        return AssistantStep(content=text, tool_calls=calls)
    if isinstance(message, ToolMessage):
        return ToolStep(
            tool_call_id=message.tool_call_id, name=message.name, content=text, is_error=message.status == "error"
        )
    role = getattr(message, "role", None) or message.type
    if role in ("user", "human"):
        return UserStep(content=text)
    if role == "system":
        return SystemStep(content=text)
    if role in ("assistant", "ai"):
        return AssistantStep(content=text)
    return None


def to_trajectory(
    messages: Iterable[BaseMessage],
    *,
    conversation_id: str | None = None,
    harm: str | None = None,
    environment: str | None = None,
) -> Trajectory:
    """Messages of types the judge cannot use (removals, function messages) are skipped."""
    steps = [step for step in (to_step(message) for message in messages) if step is not None]
    return Trajectory(steps=steps, conversation_id=conversation_id, harm=harm, environment=environment)


def with_calls(trajectory: Trajectory, calls: list[ToolCall]) -> Trajectory:
    """The trajectory as the judge must see it for `calls`: only those calls pending. Calls
    that are not in the last assistant step (rewritten by other middleware, edited by a
    reviewer) replace that step's calls, so the judge sees exactly what would run."""
    for index in range(len(trajectory.steps) - 1, -1, -1):
        step = trajectory.steps[index]
        if isinstance(step, AssistantStep):
            steps = list(trajectory.steps[:index]) + [step.model_copy(update={"tool_calls": list(calls)})]
            return trajectory.model_copy(update={"steps": steps})
    return trajectory.model_copy(update={"steps": [*trajectory.steps, AssistantStep(tool_calls=list(calls))]})


def with_result(trajectory: Trajectory, call: ToolCall, result: ToolMessage) -> Trajectory:
    """`call` followed by its result: the shape `Guard.check_tool_result` moderates."""
    view = with_calls(trajectory, [call])
    step = ToolStep(
        tool_call_id=call.id,
        name=call.name,
        content=message_text(result.content),
        is_error=result.status == "error",
    )
    return view.model_copy(update={"steps": [*view.steps, step]})


def last_turn(messages: Sequence[BaseMessage]) -> tuple[int, AIMessage] | None:
    for index in range(len(messages) - 1, -1, -1):
        if isinstance(messages[index], AIMessage):
            return index, messages[index]  # type: ignore[return-value]
    return None


def same_call(left: Mapping[str, Any], right: Mapping[str, Any]) -> bool:
    """Two LangChain tool-call dicts for the same call: id, name and arguments."""
    return left.get("id") == right.get("id") and left.get("name") == right.get("name") and left.get("args") == right.get("args")


def turn_of_call(messages: Sequence[BaseMessage], call: Mapping[str, Any]) -> tuple[int, AIMessage] | None:
    """The model turn that issued `call`: the latest AI message holding this very call; else
    the latest AI message."""
    for index in range(len(messages) - 1, -1, -1):
        message = messages[index]
        if isinstance(message, AIMessage) and any(same_call(c, call) for c in message.tool_calls):
            return index, message
    return last_turn(messages)


def turn_id(message: AIMessage, index: int) -> str:
    """LangGraph's message reducer gives every message an id; a hand-built state without one
    falls back to the message's position."""
    return str(message.id) if message.id else f"#{index}"


def binding_of(call: ToolCall, *, thread: str | None, turn: str) -> CallBinding:
    return CallBinding.of(thread_id=thread, turn_id=turn, call_id=call.id, tool=call.name, args=call.args)


def turn_records(state: Any, key: str, seal: RecordSeal, replay: str | None) -> TurnRecords | None:
    """The stored records of the current turn that the guard itself wrote (their MAC
    verifies), that no later turn closed, and, in a time-travel replay, that it wrote in this
    replay; anything else (a forged record, a closed turn's, one copied from the first run, an
    older format) reads as none, and those calls are judged again."""
    raw = state.get(key) if isinstance(state, Mapping) else getattr(state, key, None)
    if not isinstance(raw, Mapping) or "turn_id" not in raw:
        return None
    stored = TurnRecords.from_state(raw, seal)
    return stored.for_replay(replay) if stored is not None and not stored.closed else None


def refusal_text(name: str, why: str) -> str:
    return (
        f"soda-guard refused to run the tool call `{name}`: {why}. "
        "The tool was not executed. Continue without it, or explain to the user why this cannot be done."
    )
