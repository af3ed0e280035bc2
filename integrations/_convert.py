"""LangChain messages → `Trajectory`, and the JSON records the adapters keep per tool call.

Records are typed (`soda_guard.records`) and become JSON only here, at the graph-state
boundary, since LangGraph state and interrupt payloads must survive any checkpointer's
serializer and a process restart.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import json
import marshal
import operator
from itertools import repeat
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage, convert_to_messages
from langgraph.types import Command, Send

from soda_guard.binding import MARSHAL_VERSION, CallBinding, args_digest
from soda_guard.converters import MAX_ARGUMENT_DEPTH, Ancestors, base64_text, cleaned, nesting_depth, text_media
from soda_guard.errors import TrajectoryError
from soda_guard.judges.incremental import IdentityMemo, Lru
from soda_guard.mcp.jsonrpc import parse as parse_json
from soda_guard.records import TurnRecords
from soda_guard.seal import RecordSeal
from soda_guard.trajectory import AssistantStep, SystemStep, ToolCall, ToolStep, Trajectory, UserStep

STATE_KEY = "soda_guard"
METADATA_KEY = "soda_guard"


def message_text(content: Any) -> str:
    """Text of a message `content` that may be a string or a list of blocks: a block of any
    type is read as the text the model would read in it (`block_text`)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(block_text(block) for block in content)
    return "" if content is None else str(content)


_CALL_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "server_tool_call", "server_tool_call_chunk", "function_call"})
"""Blocks that repeat a model's tool call, which the judges are shown from `tool_calls`."""

_NOT_TEXT = frozenset({"type", "id", "index", "url", "file_id", "mime_type", "media_type", "cache_control", "signature", "status"})
"""Keys whose values are addresses, identifiers or formats, not text a model reads."""

_ENCODED = frozenset({"base64", "data"})


def block_text(block: Any) -> str:
    """A content block as its text: a text block is its text; any other block (`json`,
    `search_result`, `document`, `file`, `image` with a caption, types this code has never
    seen) is `[type]` followed by every piece of text it carries, in order: strings at any depth,
    a JSON payload as JSON, and base64 or raw data declared as text. A block with no text at all
    (a plain image) stays `[type]`, so the judge knows something was there. An injection in a
    JSON tool result thereby reaches the judges as the text the model reads, not as `[json]`."""
    if isinstance(block, str):
        return block
    if not isinstance(block, Mapping):
        return str(block)
    kind = block.get("type")
    if kind == "text" and isinstance(block.get("text"), str):
        return block["text"]
    label = f"[{kind if isinstance(kind, str) else 'block'}]"
    if isinstance(kind, str) and kind in _CALL_BLOCKS:  # a `type` a tool wrote as a dict is no call
        return label
    pieces = _text_pieces(block)
    return " ".join([label, "\n".join(pieces)]) if pieces else label


def _text_pieces(block: Mapping[str, Any]) -> list[str]:
    """The pieces of text in a block, in order (`block_text`). Walked with an explicit stack: a
    tool's result may nest its data however deep (a JSON API's answer handed on as a block),
    and a recursive walk raised RecursionError out of the agent at the next model turn, with
    that turn's calls undecided."""
    pieces: list[str] = []
    pending: list[tuple[Any, str | None, Mapping[str, Any], int]] = [(block, None, {}, 0)]
    ancestors = Ancestors()
    while pending:
        value, key, holder, depth = pending.pop()
        if isinstance(value, str):
            if key in _ENCODED:
                if _declared_text(holder):
                    pieces.append(_decoded(value, key, holder))
            elif value.strip():
                pieces.append(value)
        elif isinstance(value, (Mapping, list, tuple)):
            if key == "json":
                try:
                    pieces.append(json.dumps(value, ensure_ascii=False, default=str))
                    continue
                except RecursionError:  # deeper than the encoder goes: its text, walked as the rest
                    key = None
            if not ancestors.enter(value, depth):
                continue
            if isinstance(value, Mapping):
                pending += reversed([(item, str(name), value, depth + 1) for name, item in value.items() if name not in _NOT_TEXT])
            else:
                pending += reversed([(item, key, holder, depth + 1) for item in value])
        elif key == "json" and value is not None:
            pieces.append(json.dumps(value, default=str))
    return pieces


def _declared_text(holder: Mapping[str, Any]) -> bool:
    """Data a block declares as text (`text/*`, JSON, XML, or an Anthropic `text` source) is
    read by the model as text; anything else (images, PDFs, audio) is not judged as text."""
    return holder.get("type") == "text" or text_media(holder.get("mime_type") or holder.get("media_type") or "")


def _decoded(value: str, key: str, holder: Mapping[str, Any]) -> str:
    if key == "data" and holder.get("type") == "text":
        return value
    decoded = base64_text(value)
    return value if decoded is None else decoded


def command_messages(result: Any, call_id: str, key: str = "messages") -> tuple[list[BaseMessage], int | None] | None:
    """The messages a tool's `Command` adds to the conversation under `key` (the state's
    messages key), and the index of the ToolMessage answering `call_id` among them (None when
    there is none: a Command sent to the parent graph need not answer); None when it adds no
    messages."""
    messages = update_messages(result, key) if isinstance(result, Command) else None
    if not messages:
        return None
    index = next((i for i, m in enumerate(messages) if isinstance(m, ToolMessage) and m.tool_call_id == call_id), None)
    return messages, index


def sent_messages(command: Command, key: str = "messages") -> list[BaseMessage]:
    """The messages a Command's `goto` hands a node in a `Send` (under `key` of its state):
    read by that node, a model among them, as if they were the conversation."""
    goto = command.goto if isinstance(command.goto, (list, tuple)) else [command.goto]
    found: list[BaseMessage] = []
    for send in goto:
        arg = send.arg if isinstance(send, Send) else None
        raw = arg.get(key) if isinstance(arg, Mapping) else None
        if raw:
            found += convert_to_messages(raw if isinstance(raw, list) else [raw])
    return found


_ROLES = frozenset({"user", "human", "ai", "assistant", "system", "developer", "tool", "function"})


def _pairs(update: Any, key: str = "messages") -> list[tuple[str, Any]] | None:
    """A Command's update as (key, value) pairs; None for the bare list of messages a ToolNode
    given a list of messages takes (which may be `(role, text)` tuples, told apart from pairs
    by their roles)."""
    if isinstance(update, Mapping):
        return list(update.items())
    if not isinstance(update, (list, tuple)):
        return None
    if not all(isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str) for p in update):
        return None
    keys = {name for name, _ in update}
    return None if keys and key not in keys and keys <= _ROLES else list(update)


def update_pairs(command: Command, key: str = "messages") -> list[tuple[str, Any]] | None:
    """A Command's update as the (key, value) pairs LangGraph writes: a mapping, pairs, or an
    object with annotated fields (a dataclass, a pydantic model: what a state schema of that
    kind takes); None for a bare list of messages (see `_pairs`)."""
    update = command.update
    if update is None or isinstance(update, (Mapping, list, tuple)):
        return _pairs(update, key)
    return list(command._update_as_tuples())


def update_messages(command: Command, key: str = "messages") -> list[BaseMessage] | None:
    """The messages a Command's state update adds under `key`, as messages (they may be given
    as dicts)."""
    update = command.update
    pairs = update_pairs(command, key)
    if pairs is None:
        raw = list(update) if isinstance(update, (list, tuple)) else None
    else:
        raw = next((value for name, value in pairs if name == key), None)
    if raw is None:
        return None
    return convert_to_messages(raw if isinstance(raw, list) else [raw])


def other_writes(command: Command, key: str = "messages") -> list[BaseMessage]:
    """Everything else a Command writes that a model may be shown: each other key of its
    update (a prompt middleware or a node can put any state key in front of the model) and of
    the state its `Send`s hand on, as a message of its text."""
    pairs = [(name, value) for name, value in update_pairs(command, key) or [] if name != key]
    goto = command.goto if isinstance(command.goto, (list, tuple)) else [command.goto]
    for send in goto:
        arg = send.arg if isinstance(send, Send) else None
        if isinstance(arg, Mapping):
            pairs += [(str(name), value) for name, value in arg.items() if name != key]
        elif arg is not None:
            pairs.append((str(send.node), arg))
    return [HumanMessage(content=f"{name}: {_value_text(value)}") for name, value in pairs]


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, BaseMessage):
        return message_text(value.content)
    try:
        return json.dumps(value, ensure_ascii=False, default=lambda o: message_text(o.content) if isinstance(o, BaseMessage) else str(o))
    except (ValueError, RecursionError):  # a value that holds itself: its text as Python prints it
        return repr(value)


def command_reads(command: Command, key: str = "messages") -> list[BaseMessage]:
    """All a Command hands on that a model may read: its messages, those its Sends carry, and
    the text of everything else it writes (`other_writes`)."""
    return [*(update_messages(command, key) or []), *sent_messages(command, key), *other_writes(command, key)]


def with_command_messages(result: Command, messages: list[BaseMessage], key: str = "messages") -> Command:
    """`result` with the messages it adds under `key` replaced, every other part of it kept."""
    update = result.update
    if isinstance(update, Mapping):
        return dataclasses.replace(result, update={**update, key: messages})
    pairs = update_pairs(result, key)
    if pairs is None:
        return dataclasses.replace(result, update=messages)
    return dataclasses.replace(result, update=[(n, messages if n == key else v) for n, v in pairs])


def read_as_one(messages: Sequence[BaseMessage], index: int | None, call: ToolCall) -> ToolMessage:
    """What the model reads of a tool's answer, as the one ToolMessage a moderation judges:
    a Command can add messages beside its ToolMessage (or, sent to the parent graph, none
    answering the call), and each is read by the model."""
    answer = messages[index] if index is not None else None
    if isinstance(answer, ToolMessage) and len(messages) == 1:
        return answer
    text = "\n".join(message_text(m.content) for m in messages)
    if isinstance(answer, ToolMessage):
        return answer.model_copy(update={"content": text})
    return ToolMessage(content=text, tool_call_id=call.id, name=call.name)


def result_text(output: Any) -> tuple[str, bool]:
    """The text and error status of what a tool returned, as a callback sees it: a
    ToolMessage, a Command (all it hands on: `command_reads`), a list of those, or a raw value."""
    if isinstance(output, list) and any(isinstance(item, (BaseMessage, Command)) for item in output):
        read = [result_text(item) for item in output]
        return "\n".join(text for text, _ in read), any(failed for _, failed in read)
    if isinstance(output, Command):
        messages = command_reads(output)
        failed = any(isinstance(m, ToolMessage) and m.status == "error" for m in messages)
        return "\n".join(message_text(m.content) for m in messages), failed
    content = getattr(output, "content", output)
    return message_text(content), getattr(output, "status", None) == "error"


def error_text(error: BaseException) -> str:
    """All a handler outside the guard may show the model of an exception: its repr (a
    ToolNode's `Error: {e!r}`), its str (a retry middleware's), its notes, and the same of the
    exceptions it was raised from or during."""
    pieces: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < 16:
        seen.add(id(current))
        for show in (repr, str):
            try:
                pieces.append(show(current))
            except Exception as failed:  # noqa: BLE001 - a broken __str__ still leaves its type
                pieces.append(f"{type(current).__name__} (not printable: {type(failed).__name__})")
        pieces += [str(note) for note in getattr(current, "__notes__", None) or []]
        current = current.__cause__ or current.__context__
    return "\n".join(pieces)


def call_id(call: Mapping[str, Any], index: int) -> str:
    """Providers occasionally omit ids; a positional stand-in keeps calls distinct. `index` is
    the place in its turn of the first call identical to it (`first_same`)."""
    return str(call.get("id") or f"{call.get('name', 'tool')}#{index}")


def first_same(calls: Sequence[Mapping[str, Any]], call: Mapping[str, Any]) -> int | None:
    """Where the first call identical to `call` (`same_call`) is in its turn, None where none
    is. Calls without ids are named by this place, so identical ones share a name: at the tool
    step nothing tells them apart, so the guard refuses them as calls that share an id rather
    than run both on one call's decision (or one approval)."""
    return next((place for place, candidate in enumerate(calls) if same_call(candidate, call)), None)


def to_tool_calls(calls: Sequence[Mapping[str, Any]]) -> list[ToolCall]:
    """A model turn's calls, those without ids named by `first_same`."""
    return [to_tool_call(call, index if call.get("id") else first_same(calls, call) or 0) for index, call in enumerate(calls)]


def call_args(call: Mapping[str, Any]) -> dict[str, Any] | str:
    """A LangChain tool call's arguments as a `ToolCall` holds them. Arguments nested deeper
    than `MAX_ARGUMENT_DEPTH` are refused, as `from_openai_messages` refuses them: the judge's
    prompt, the audit record and the records kept in the graph's state are each written by a
    walk that recurses, and past a few hundred levels one of them raised RecursionError out of
    the agent with the call undecided."""
    args = call.get("args")
    if isinstance(args, (dict, list)) and nesting_depth(args, MAX_ARGUMENT_DEPTH) > MAX_ARGUMENT_DEPTH:
        name = call.get("name")
        raise TrajectoryError(None, f"the arguments of tool call {name!r} are nested more than {MAX_ARGUMENT_DEPTH} deep")
    if not isinstance(args, (dict, str)):
        args = {} if args is None else str(args)
    return args


def to_tool_call(call: Mapping[str, Any], index: int = 0) -> ToolCall:
    return ToolCall(id=call_id(call, index), name=str(call.get("name") or ""), args=call_args(call))


Step = SystemStep | UserStep | AssistantStep | ToolStep


def to_step(message: BaseMessage) -> Step | None:
    """The judge's step for a message. Every turn converts the whole conversation again, so a
    message with text content or a list of blocks is converted once per distinct value
    (`_STEPS`): the key is all that the step is made of, and a message changed in any way is
    converted anew."""
    key = _step_key(message)
    if key is None:
        return _converted(message)
    step = _STEPS.get(key)
    if step is None:
        step = _from_key(key)
        _STEPS.put(key, step, 1)
    return step


def _earlier_step(message: BaseMessage) -> Step | None:
    """`to_step` for a message of an earlier turn, found by the message object while every
    field its step is made of (`_WATCHED`) holds the value it held, and content that is not
    text still freezes as it did (`_BY_MESSAGE`): a turn then reads only its new messages, and
    the judge finds their blocks by the same step objects."""
    watched = _watched(message)
    seen = _BY_MESSAGE.get(message)
    # the very field values, not equal ones: `{"n": 1} == {"n": True}`, yet each renders as itself
    if seen is not None and all(map(operator.is_, seen[0], watched)) and _unchanged(watched[0], seen[2]):
        return seen[1]
    return _remembered(message, watched)


def _unchanged(content: Any, frozen: bytes | None) -> bool:
    """Whether content found by identity still reads as when its step was made: text cannot
    change in place; a list of blocks can, and stands while it freezes to the same bytes."""
    return isinstance(content, str) or (frozen is not None and _frozen(content) == frozen)


def _frozen(content: Any) -> bytes | None:
    """Content that is not text (a list of blocks, as Anthropic models and MCP tools send) as
    bytes that differ wherever the content differs in any way, types included (`1`, `True` and
    `1.0` read alike to `==`, not to the judge), written at C speed. None for content with
    objects marshal does not write (other types, subclasses), which is read every turn."""
    try:
        return marshal.dumps(content, MARSHAL_VERSION)
    except ValueError:
        return None


def _latest_step(message: BaseMessage) -> Step | None:
    """`to_step`, read whole (the latest turn's calls may be pending), and remembered for the
    turns after, where the message is an earlier one (`_earlier_step`)."""
    return _remembered(message, _watched(message))


def _remembered(message: BaseMessage, watched: tuple[Any, ...]) -> Step | None:
    step = to_step(message)
    content = watched[0]
    if step is not None:
        if isinstance(content, str):
            _BY_MESSAGE.put(message, (watched, step, None))
        elif (frozen := _frozen(content)) is not None:
            _BY_MESSAGE.put(message, (watched, step, frozen))
    return step


_BY_MESSAGE: IdentityMemo[tuple[tuple[Any, ...], Step, bytes | None]] = IdentityMemo()
"""Steps by message object, with the field values they were made from and, for content that
is not text, that content frozen (`_frozen`). A message's fields given new values, or its
blocks edited in place, are converted anew; a tool call's arguments edited in place inside an
earlier turn's message are not seen again (that call ran as it was judged: `SealedTool`),
and the latest assistant turn, whose calls may be pending, is always read whole."""

_CALLS, _RESULT, _OTHER = range(3)
"""The kinds of message whose steps are made of more than their content: a model's turn, a
tool's result, and any other class (a system or user message's step is its content alone)."""
_KIND_FIELDS = (("tool_calls",), ("tool_call_id", "name", "status"), ("role", "type"))
"""Each kind's fields besides its content that its step is made of (`_step_key`, `_converted`)."""
_BY_IDENTITY = (("tool_calls",), (), ())
"""Those matched by identity (`{"n": 1} == {"n": True}`, yet each renders as itself); the
others hold strings (or None), where an equal one renders the same."""
_WATCHED = ("content", *dict.fromkeys(name for names in _KIND_FIELDS for name in names))
"""Every field a message's step is made of, whatever its kind."""
_FIELD_VALUES = operator.attrgetter("__dict__")
"""A message's field values (pydantic keeps them in the instance dictionary): a field a
message class does not have reads as None there, without pydantic's missing-attribute path."""


def _watched(message: BaseMessage) -> tuple[Any, ...]:
    return tuple(map(_FIELD_VALUES(message).get, _WATCHED))


def _from_key(key: tuple[Any, ...]) -> Step:
    """A step made from its key alone: it owns every object in it (the arguments are parsed
    from the key's JSON), so nothing that edits the message later reaches the cached step."""
    kind, text = key[0], key[1]
    if kind == "system":
        return SystemStep(content=text)
    if kind == "user":
        return UserStep(content=text)
    if kind == "assistant":
        calls = to_tool_calls(json.loads(key[2]))
        return AssistantStep(content=text, tool_calls=calls)
    return ToolStep(tool_call_id=key[2], name=key[3], content=text, is_error=key[4])


_CALLS_KEY = json.JSONEncoder(sort_keys=True, ensure_ascii=False)
"""Built once: `json.dumps` with any option builds a new encoder per call."""


def _step_key(message: BaseMessage) -> tuple[Any, ...] | None:
    content = message.content
    if type(content) is not str:  # a subclass may claim to equal a text `_STEPS` holds
        if not isinstance(content, list):
            return None
        content = message_text(content)  # all of a list of blocks that its step is made of
    if isinstance(message, SystemMessage):
        return ("system", content)
    if isinstance(message, HumanMessage):
        return ("user", content)
    if isinstance(message, AIMessage):
        try:
            calls = _CALLS_KEY.encode(message.tool_calls)
        except (TypeError, ValueError, RecursionError):  # not JSON, or too deep to write: converted as they are
            return None
        return ("assistant", content, calls)
    if isinstance(message, ToolMessage):
        return ("tool", content, message.tool_call_id, message.name, message.status == "error")
    return None


_STEPS: Lru[Step] = Lru(8192)
"""Steps by `_step_key`: steps are values that nothing edits in place, so one may stand in
every trajectory the message is part of."""


def _converted(message: BaseMessage) -> Step | None:
    text = message_text(message.content)
    if isinstance(message, SystemMessage):
        return SystemStep(content=text)
    if isinstance(message, HumanMessage):
        return UserStep(content=text)
    if isinstance(message, AIMessage):
        calls = to_tool_calls(message.tool_calls)
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
    """Messages of types the judge cannot use (removals, function messages) are skipped. The
    latest assistant turn and what follows it, whose calls may be pending, are read whole;
    the earlier turns of a conversation converted before are taken from that conversion
    (`_reused`), so a turn costs what it adds."""
    messages = tuple(messages)
    try:
        stored = tuple(map(_FIELD_VALUES, messages))
    except AttributeError:  # an entry that is no message object (`_as_messages`)
        messages = _as_messages(messages)
        stored = tuple(map(_FIELD_VALUES, messages))
    latest = next((i for i in range(len(messages) - 1, -1, -1) if isinstance(messages[i], AIMessage)), len(messages))
    before = _CONVERSIONS.get(conversation_id) if conversation_id is not None else None
    size = min(len(before.messages), latest) if before is not None else 0
    # the very messages converted before, or equal ones: of the same types, so of the same kinds
    same = before is not None and size > 0 and before.messages[:size] == messages[:size]
    fields = _Fields.read(messages, stored, before.fields if same else None, size if same else 0)  # type: ignore[union-attr]
    reused = _reused(before, fields, size) if same else 0  # type: ignore[arg-type]
    converted = [
        *(before.steps[:reused] if before is not None else ()),
        *map(_earlier_step, messages[reused:latest]),
        *map(_latest_step, messages[max(reused, latest) :]),
    ]
    if conversation_id is not None:
        _CONVERSIONS.put(conversation_id, _conversion(before, reused, messages, fields, converted), len(messages) + 1)
    steps = list(filter(_IS_STEP, converted))
    # every step is one this module made (validated as it was made): the list need not be again
    return Trajectory.model_construct(steps=steps, conversation_id=conversation_id, harm=harm, environment=environment, truncated=False)


_IS_STEP = functools.partial(operator.is_not, None)


def _as_messages(entries: tuple[Any, ...]) -> tuple[BaseMessage, ...]:
    """A state kept without the `add_messages` reducer holds messages as they were written:
    dicts (`{"role": "user", "content": ...}`), `(role, text)` pairs, strings, which the model
    and a ToolNode read as messages. They are judged as the messages they are read as; an entry
    that reads as none is refused by its place."""
    converted: list[BaseMessage] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, BaseMessage):
            converted.append(entry)
            continue
        try:
            [message] = convert_to_messages([entry])
        except (ValueError, TypeError, NotImplementedError):
            raise TrajectoryError(index, f"a {type(entry).__name__} that is not a message") from None
        converted.append(message)
    return tuple(converted)


_KINDS: dict[type, int | None] = {}


def _kind(cls: type) -> int | None:
    """A message class's kind, None for a system or user message: in `_step_key`'s order."""
    try:
        return _KINDS[cls]
    except KeyError:
        pass
    if issubclass(cls, (SystemMessage, HumanMessage)):
        kind: int | None = None
    elif issubclass(cls, AIMessage):
        kind = _CALLS
    else:
        kind = _RESULT if issubclass(cls, ToolMessage) else _OTHER
    _KINDS[cls] = kind
    return kind


@dataclasses.dataclass(frozen=True)
class _Fields:
    """Every field the steps of a conversation's messages are made of, read for all of them at
    once (at C speed): each message's content, and each kind's own fields for the messages of
    that kind only (`indexes[kind]`, in order; `values[kind][field]` aligned with them), so a
    turn reads a model's turn for two fields and a tool's result for four instead of six each."""

    content: tuple[Any, ...]
    indexes: tuple[tuple[int, ...], ...]
    values: tuple[tuple[tuple[Any, ...], ...], ...]

    @classmethod
    def read(
        cls, messages: tuple[BaseMessage, ...], stored: tuple[dict[str, Any], ...], before: _Fields | None, size: int
    ) -> _Fields:
        """The fields of `messages` (their instance dictionaries `stored`); the kinds of the
        first `size` are `before`'s (the same messages, or equal ones, converted before)."""
        added: tuple[list[int], ...] = ([], [], [])
        for index in range(size, len(messages)):
            kind = _kind(type(messages[index]))
            if kind is not None:
                added[kind].append(index)
        if before is None:
            indexes = tuple(map(tuple, added))
        else:
            indexes = tuple(old[: bisect.bisect_left(old, size)] + tuple(new) for old, new in zip(before.indexes, added))
        values = tuple(
            tuple(tuple(map(dict.get, holders, repeat(name))) for name in names)
            for holders, names in zip((tuple(map(stored.__getitem__, kind)) for kind in indexes), _KIND_FIELDS)
        )
        return cls(tuple(map(dict.get, stored, repeat("content"))), indexes, values)


@dataclasses.dataclass(frozen=True)
class _Conversion:
    messages: tuple[BaseMessage, ...]
    fields: _Fields
    steps: list[Step | None]
    reusable: int
    """How many leading messages a later turn may take over: each has text content, or
    content that was frozen (`_frozen`) when its step was made."""
    frozen_at: tuple[int, ...]
    """The indexes of the messages among those whose content is not text, in order,"""
    frozen: tuple[bytes, ...]
    """and their contents frozen (`_frozen`)."""


def _conversion(
    before: _Conversion | None, reused: int, messages: tuple[BaseMessage, ...], fields: _Fields,
    steps: list[Step | None],
) -> _Conversion:
    """The conversion to keep for the next turn: the prefix taken over keeps its frozen
    contents (`_reused` checked them); the messages read this turn add theirs, as
    `_remembered` froze them, up to the first whose content could not be."""
    frozen_at: list[int] = []
    frozen: list[bytes] = []
    if before is not None:
        kept = bisect.bisect_left(before.frozen_at, reused)
        frozen_at, frozen = list(before.frozen_at[:kept]), list(before.frozen[:kept])
    reusable = len(messages)
    for index in range(reused, len(messages)):
        content = fields.content[index]
        if isinstance(content, str):
            continue
        seen = _BY_MESSAGE.get(messages[index])
        # the entry this conversion's step came from (a warm-up thread may have put another)
        if seen is None or seen[2] is None or seen[0][0] is not content or seen[1] is not steps[index]:
            reusable = index
            break
        frozen_at.append(index)
        frozen.append(seen[2])
    return _Conversion(messages, fields, steps, reusable, tuple(frozen_at), tuple(frozen))


_CONVERSIONS: Lru[_Conversion] = Lru(1 << 15)
"""The latest conversion of each conversation, bounded by the messages held (the messages are
held so that their identities stay theirs)."""


def _reused(before: _Conversion, fields: _Fields, size: int) -> int:
    """How many leading messages (the first `size`, all before the latest assistant turn, which
    the caller found to be the messages converted before: the very objects, as a conversation's
    state keeps them, or equal ones) still have every field their step is made of as it was,
    and content that is text or a list of blocks that still freezes as it did: their steps
    stand (`_BY_MESSAGE`'s rule, checked for the whole prefix at C speed). Content and tool
    calls are matched by identity, the string fields by a tuple comparison (identical objects
    at once, others by value)."""
    old = before.fields
    # the very content objects: text as it was; lists of blocks frozen as they were
    if before.reusable < size or not all(map(operator.is_, old.content[:size], fields.content[:size])):
        return 0
    for indexes, was, now, names, identical in zip(old.indexes, old.values, fields.values, _KIND_FIELDS, _BY_IDENTITY):
        count = bisect.bisect_left(indexes, size)
        for name, before_values, values in zip(names, was, now):
            if name in identical:
                if not all(map(operator.is_, before_values[:count], values[:count])):
                    return 0
            elif before_values[:count] != values[:count]:
                return 0
    count = bisect.bisect_left(before.frozen_at, size)
    if count:
        try:
            now_frozen = tuple(map(marshal.dumps, map(fields.content.__getitem__, before.frozen_at[:count]), repeat(MARSHAL_VERSION)))
        except ValueError:  # an object marshal does not write, put in place since
            return 0
        if now_frozen != before.frozen[:count]:
            return 0
    return size


def with_calls(trajectory: Trajectory, calls: list[ToolCall]) -> Trajectory:
    """The trajectory as the judge must see it for `calls`: only those calls pending. Calls
    that are not in the last assistant step (rewritten by other middleware, edited by a
    reviewer) replace that step's calls, so the judge sees exactly what would run."""
    for index in range(len(trajectory.steps) - 1, -1, -1):
        step = trajectory.steps[index]
        if isinstance(step, AssistantStep):
            if index == len(trajectory.steps) - 1 and same_calls(step.tool_calls, calls):
                return trajectory  # already exactly that (the judge then knows the step by its object)
            steps = list(trajectory.steps[:index]) + [step.model_copy(update={"tool_calls": list(calls)})]
            return trajectory.model_copy(update={"steps": steps})
    return trajectory.model_copy(update={"steps": [*trajectory.steps, AssistantStep(tool_calls=list(calls))]})


def same_calls(left: Sequence[ToolCall | None], right: Sequence[ToolCall]) -> bool:
    """The very calls, or calls whose arguments are the same JSON: not `==`, to which
    `{"n": 1}` and `{"n": true}` are one."""
    return len(left) == len(right) and all(
        a is b or (a is not None and a.id == b.id and a.name == b.name and args_digest(a.args) == args_digest(b.args))
        for a, b in zip(left, right)
    )


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


def turn_records(state: Any, key: str, seal: RecordSeal) -> TurnRecords | None:
    """The stored records of the current turn that the guard itself wrote (their MAC
    verifies) and that no later turn closed; anything else (a forged record, a closed turn's,
    an older format) reads as none, and those calls are judged again."""
    raw = state.get(key) if isinstance(state, Mapping) else getattr(state, key, None)
    if not isinstance(raw, Mapping) or "turn_id" not in raw:
        return None
    stored = TurnRecords.from_state(raw, seal)
    return stored if stored is not None and not stored.closed else None


def started_tool(serialized: Mapping[str, Any] | None, input_str: str, inputs: Any, extra: Mapping[str, Any]) -> tuple[str, Any]:
    """The tool name and arguments an `on_tool_start` callback is given: `inputs` when
    LangChain passes them, else the input string, parsed when it is a JSON object. One whose
    keys repeat is judged as the string it is, which is what the tool is handed: parsed, only
    the last of each key would be judged. Lone surrogates become U+FFFD, as the converters
    make them (`cleaned`): the decision must be writable to the audit log."""
    name = (serialized or {}).get("name") or extra.get("name") or "tool"
    if inputs is not None:
        return name, cleaned(inputs, "tool input")
    try:
        parsed = parse_json(input_str)
    except (TypeError, ValueError):
        return name, cleaned(input_str, "tool input")
    return name, cleaned(parsed if isinstance(parsed, dict) else input_str, "tool input")


def injected_left_out(asked: Any, started: Any, digest: str) -> bool:
    """Whether a started tool's `inputs` (`started`, whose `args_digest` is `digest`) are the
    model's arguments `asked` less some keys: LangChain leaves the values of `InjectedToolArg`
    parameters out of `inputs`, yet a tool run on the model's call as written is handed the
    model's values for them (a ToolNode strips them first; a callback cannot tell which)."""
    return (
        isinstance(asked, dict)
        and isinstance(started, dict)
        and started.keys() < asked.keys()
        and args_digest({key: asked[key] for key in started}) == digest
    )


def refusal_text(name: str, why: str) -> str:
    return (
        f"soda-guard refused to run the tool call `{name}`: {why}. "
        "The tool was not executed. Continue without it, or explain to the user why this cannot be done."
    )
