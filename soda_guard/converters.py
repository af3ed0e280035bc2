"""Conversions from other conversation formats into `Trajectory`.

OpenAI chat messages are what most agent stacks can export; the R-Judge / AgentHarm record
format is what the public labeled datasets use. Both are parsed strictly where the format is
defined and leniently (keeping the raw text) where real data is messy.

Every input is first copied by `cleaned`, without recursion: nesting deeper than
`MAX_INPUT_DEPTH` is refused with `TrajectoryError` (it would exhaust Python's recursion later,
in rendering or in the decision's JSON), and lone surrogates (`"\ud800"`, which JSON allows but
UTF-8 cannot carry, so a decision holding one could not be recorded) become U+FFFD. The action
parser's patterns run on the stripped text with no two adjacent repeats that can match the same
characters, so their cost is linear in the action's length.
"""

from __future__ import annotations

import ast
import base64
import binascii
import json
import re
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticSerializationError

from soda_guard.errors import TrajectoryError
from soda_guard.mcp.jsonrpc import parse as parse_json
from soda_guard.trajectory import (
    AssistantStep,
    SystemStep,
    ToolCall,
    ToolStep,
    Trajectory,
    UserStep,
)

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}
_MEDIA_PARTS = {"image_url", "input_image", "image", "input_audio", "file"}
MAX_ARGUMENT_DEPTH = 200
"""Deeper arguments are refused: rendering them (JSON) would recurse past Python's limit."""
MAX_INPUT_DEPTH = MAX_ARGUMENT_DEPTH + 10
"""A whole input: arguments at their limit plus the levels of the message structure above them."""
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text(value: str) -> str:
    return _SURROGATE.sub("\ufffd", value)


def text_media(kind: Any) -> bool:
    """Whether data of this MIME type is text a model reads as text (`text/*`, JSON, XML,
    YAML), not an image, a PDF or audio."""
    return isinstance(kind, str) and (kind.startswith("text/") or kind.endswith(("json", "xml", "yaml")))


def base64_text(value: str) -> str | None:
    """Base64 data as the UTF-8 text it carries (undecodable bytes replaced); None where it is
    no base64."""
    try:
        return base64.b64decode(value, validate=False).decode("utf-8", errors="replace")
    except (ValueError, binascii.Error):
        return None


def model_json(model: BaseModel, **options: Any) -> str:
    """`model.model_dump_json(**options)`, with any lone surrogate in it written as U+FFFD
    rather than failing: an audit record or a stored call record must be written whatever a
    tool's arguments held (a provider's JSON escape can spell a lone surrogate, which UTF-8
    cannot)."""
    try:
        return model.model_dump_json(**options)
    except PydanticSerializationError:
        return type(model).model_validate(cleaned(model.model_dump(), "record")).model_dump_json(**options)


def has_lone_surrogate(value: Any) -> bool:
    """Whether a JSON value holds a lone surrogate in a string or a key: no Unicode text, and
    nothing the audit log (UTF-8) can write."""
    return _SURROGATE.search(json.dumps(value, ensure_ascii=False)) is not None


def cleaned(value: Any, what: str) -> Any:
    """A copy of `value` (dicts, lists and tuples copied, strings and keys with lone surrogates
    replaced), built with an explicit stack; TrajectoryError past `MAX_INPUT_DEPTH`."""
    if isinstance(value, str):
        return _text(value)
    if not isinstance(value, (dict, list, tuple)):
        return value
    root: Any = {} if isinstance(value, dict) else []
    stack: list[tuple[Any, Any, int]] = [(value, root, 1)]
    while stack:
        source, target, depth = stack.pop()
        if depth > MAX_INPUT_DEPTH:
            raise TrajectoryError(None, f"{what} is nested more than {MAX_INPUT_DEPTH} deep")
        pairs = source.items() if isinstance(source, dict) else enumerate(source)
        for key, child in pairs:
            if isinstance(child, str):
                copy: Any = _text(child)
            elif isinstance(child, (dict, list, tuple)):
                copy = {} if isinstance(child, dict) else []
                stack.append((child, copy, depth + 1))
            else:
                copy = child
            if isinstance(target, dict):
                target[_text(key) if isinstance(key, str) else key] = copy
            else:
                target.append(copy)
    return root


def _text_content(content: Any, index: int) -> str:
    """OpenAI `content` may be null, a string, or a list of typed parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        pieces: list[str] = []
        for part_index, part in enumerate(content):
            if isinstance(part, str):
                pieces.append(part)
            elif isinstance(part, dict):
                if isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif isinstance(part.get("type"), str) and part["type"] in _MEDIA_PARTS:
                    pieces.append(f"[{part['type']}]")
                else:
                    raise TrajectoryError(
                        index, f"content part {part_index} has no text and an unknown type {part.get('type')!r}"
                    )
            else:
                raise TrajectoryError(index, f"content part {part_index} is a {type(part).__name__}, not an object")
        return "\n".join(pieces)
    raise TrajectoryError(index, f"content must be a string, a list of parts or null, not {type(content).__name__}")


class Ancestors:
    """The containers (dicts, lists) a depth-first walk with an explicit stack is inside. A recursive
    walk stopped at a value that holds itself (with RecursionError); a walk with a stack would
    go round it forever, so it walks such a value once (only Python code builds one: parsed
    JSON never holds itself)."""

    __slots__ = ("_path", "_ids")

    def __init__(self) -> None:
        self._path: list[int] = []
        self._ids: set[int] = set()

    def enter(self, value: object, depth: int) -> bool:
        """Whether to walk into `value`, met with `depth` containers above it: not where it is
        one of them. Each container enters and leaves once, so a walk stays linear."""
        path, ids = self._path, self._ids
        while len(path) > depth:
            ids.discard(path.pop())
        if id(value) in ids:
            return False
        path.append(id(value))
        ids.add(id(value))
        return True


def scalars(value: Any, *, keys: bool = False) -> list[Any]:
    """Every value inside `value` that is no dict or list, in order, and with `keys` each dict
    key (as text) before its value. Walked with an explicit stack: arguments some hundreds of
    levels deep (valid JSON, which `Guard`, a tool and the MCP proxy take as it comes) exhausted
    a recursive walk, and the check raised RecursionError with the call undecided."""
    found: list[Any] = []
    pending: list[tuple[Any, int]] = [(value, 0)]
    ancestors = Ancestors()
    while pending:
        item, depth = pending.pop()
        if not isinstance(item, (dict, list)):
            found.append(item)
        elif ancestors.enter(item, depth):
            if isinstance(item, list):
                pending += [(child, depth + 1) for child in reversed(item)]
            elif keys:
                pending += reversed([(part, depth + 1) for key, child in item.items() for part in (str(key), child)])
            else:
                pending += [(child, depth + 1) for child in reversed(item.values())]
    return found


def nesting_depth(value: Any, limit: int) -> int:
    """Nesting depth of lists and dicts, counted without recursion, stopping past `limit`."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _parse_arguments(raw: Any, index: int) -> dict[str, Any] | str:
    if raw is None or raw == "":
        return {}
    if isinstance(raw, str):
        try:
            # repeated keys are read as the text they are: parsers disagree on which one wins
            # (Python's the last, others the first), so a value could run that no judge saw
            parsed = parse_json(raw)
        except ValueError:
            return raw
        except RecursionError:
            raise TrajectoryError(index, "tool-call arguments are nested too deeply") from None
        if not isinstance(parsed, dict):
            return raw
        raw = parsed
    if not isinstance(raw, dict):
        return str(raw)
    if nesting_depth(raw, MAX_ARGUMENT_DEPTH) > MAX_ARGUMENT_DEPTH:
        raise TrajectoryError(index, f"tool-call arguments are nested more than {MAX_ARGUMENT_DEPTH} deep")
    if not all(isinstance(key, str) for key in raw):
        raise TrajectoryError(index, "tool-call argument names must be strings")
    return cleaned(raw, "tool-call arguments")  # JSON escapes can spell lone surrogates


def _openai_tool_calls(raw_calls: Any, index: int) -> list[ToolCall]:
    if raw_calls is None:
        return []
    if not isinstance(raw_calls, list):
        raise TrajectoryError(index, "tool_calls must be a list")
    calls = []
    for call_index, raw in enumerate(raw_calls):
        if not isinstance(raw, dict):
            raise TrajectoryError(index, f"tool_calls[{call_index}] is not an object")
        function = raw.get("function", raw)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise TrajectoryError(index, f"tool_calls[{call_index}] has no function name")
        call_id = raw.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise TrajectoryError(index, f"tool_calls[{call_index}].id must be a string, not {type(call_id).__name__}")
        args = function.get("arguments", function.get("args"))
        calls.append(ToolCall(id=call_id or f"call_{index}_{call_index}", name=function["name"], args=_parse_arguments(args, index)))
    return calls


def _legacy_call(legacy: Any, index: int) -> list[ToolCall]:
    """The pre-`tool_calls` `function_call` field."""
    if legacy is None:
        return []
    if not isinstance(legacy, dict) or not isinstance(legacy.get("name"), str) or not legacy["name"]:
        raise TrajectoryError(index, "function_call must be an object with a string name")
    return [ToolCall(id=f"call_{index}", name=legacy["name"], args=_parse_arguments(legacy.get("arguments"), index))]


def _optional_text(message: dict[str, Any], key: str, index: int) -> str | None:
    value = message.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TrajectoryError(index, f"{key} must be a string, not {type(value).__name__}")
    return value


def _tool_step(
    message: dict[str, Any], index: int, content: str, open_calls: list[ToolCall], names: dict[str, str]
) -> ToolStep:
    """A tool result, placed on the call it answers: by id when it has one, otherwise the
    oldest call of the last assistant turn still waiting (Cohere and Gemini exports, and
    text-only logs, carry no ids), otherwise kept unplaced: the judge still sees it."""
    raw_id = message.get("tool_call_id")
    if raw_id is not None and not isinstance(raw_id, str):
        raise TrajectoryError(index, f"tool_call_id must be a string, not {type(raw_id).__name__}")
    call_id = raw_id or None
    if call_id is not None:
        call = next((c for c in open_calls if c.id == call_id), None)
    else:
        call = open_calls[0] if open_calls else None
    if call is not None:
        open_calls.remove(call)
        call_id = call.id
    error = _optional_text(message, "error", index)
    return ToolStep(
        tool_call_id=call_id,
        name=_optional_text(message, "name", index) or (call.name if call else names.get(call_id or "")),
        content=None if message.get("content") is None else content,
        is_error=error is not None or message.get("status") == "error" or message.get("is_error") is True,
        error=error,
    )


def from_openai_messages(
    messages: list[dict[str, Any]],
    *,
    harm: str | None = None,
    environment: str | None = None,
    conversation_id: str | None = None,
) -> Trajectory:
    """Convert OpenAI chat-completions messages; raise TrajectoryError naming the bad message."""
    if not isinstance(messages, list):
        raise TrajectoryError(None, f"messages must be a list, not {type(messages).__name__}")
    if not messages:
        raise TrajectoryError(None, "messages is empty: there is no conversation to judge")
    for field, value in (("harm", harm), ("environment", environment), ("conversation_id", conversation_id)):
        if value is not None and not isinstance(value, str):
            raise TrajectoryError(None, f"{field} must be a string, not {type(value).__name__}")
    messages = cleaned(messages, "messages")
    harm, environment, conversation_id = (None if v is None else _text(v) for v in (harm, environment, conversation_id))
    steps: list[Any] = []
    open_calls: list[ToolCall] = []
    names: dict[str, str] = {}
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TrajectoryError(index, f"expected an object, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise TrajectoryError(index, f"unknown role {role!r}")
        content = _text_content(message.get("content"), index)
        if role in {"system", "developer"}:
            steps.append(SystemStep(content=content))
        elif role == "user":
            steps.append(UserStep(content=content))
        elif role == "assistant":
            calls = _openai_tool_calls(message.get("tool_calls"), index) + _legacy_call(message.get("function_call"), index)
            open_calls = list(calls)
            names.update({call.id: call.name for call in calls})
            steps.append(AssistantStep(content=content, tool_calls=calls))
        else:
            steps.append(_tool_step(message, index, content, open_calls, names))
    return Trajectory(steps=steps, harm=harm, environment=environment, conversation_id=conversation_id)


_NAME = r"[A-Za-z_][\w.\-]*"
# matched against the stripped action (`parse_action`): no leading or trailing whitespace to allow for
_BRACE_ACTION = re.compile(rf"({_NAME})\s*(\{{.*\}})", re.DOTALL)
_INPUT_ACTION = re.compile(rf"({_NAME})[^\S\n]*\n\s*Action Input:(.*)", re.DOTALL)
_CALL_ACTION = re.compile(rf"({_NAME})\((.*)\)", re.DOTALL)
_UNCLOSED_CALL_ACTION = re.compile(rf"({_NAME})\((\s*\w+\s*=.*)", re.DOTALL)
_COLON_ACTION = re.compile(rf"({_NAME}):\s*(\{{.*\}})", re.DOTALL)
_WRAPPED_ACTION = re.compile(rf"\{{\s*({_NAME})\s*:\s*(\{{.*?\}})\s*\}}?", re.DOTALL)
_FENCED_ACTION = re.compile(r"```([A-Za-z]\w*)[ \t]*\n(.*)```", re.DOTALL)
_GUI_ACTION = re.compile(r"([A-Za-z]+)\s+(<[^<>\n]+>(?:\s*<[^<>\n]+>)*)")


def _parse_dict_literal(text: str) -> dict[str, Any] | None:
    """Agent logs hold JSON or Python-literal dicts; try both, never eval code."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value = parse(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, dict):
            return value
    return None


def _parse_call_kwargs(text: str) -> dict[str, Any] | None:
    """`Name(key='v', n=2)` style actions, parsed as a Python call expression of literals."""
    try:
        node = ast.parse(f"f({text})", mode="eval").body
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    if not isinstance(node, ast.Call) or node.args:
        return None
    kwargs: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            return None
        try:
            kwargs[keyword.arg] = ast.literal_eval(keyword.value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return kwargs


def _command_action(action: str) -> tuple[str, dict[str, Any] | str] | None:
    """AutoGPT logs: `"command": {"name": ..., "args": {...}}` cut out of a JSON object, with
    or without the object's closing brace."""
    text = action.strip()
    if not text.startswith('"command"'):
        return None
    for candidate in ("{" + text, "{" + text + "}"):
        try:
            command = json.loads(candidate).get("command")
        except (ValueError, RecursionError):
            continue
        if isinstance(command, dict) and isinstance(command.get("name"), str):
            args = command.get("args", {})
            return command["name"], args if isinstance(args, dict) else json.dumps(args, ensure_ascii=False)
    return None


def parse_action(action: str) -> tuple[str, dict[str, Any] | str] | None:
    """Parse one agent action string into (tool name, args); args stay the raw text when the
    name is clear but the arguments are not a dict. None when it is not a tool call at all
    (a final answer or prose stays text).

    Shapes seen in the shared datasets: `Name{...}`, `Name: {...}`, `{Name: {...}}` (its last
    brace sometimes lost),
    `Name\nAction Input: {...}`, `Name(k=v)` (also with arguments that are not Python, or
    without its closing parenthesis), AutoGPT's `"command": {...}`, shell commands in
    a fenced block (the fence's language names the tool) and app-GUI actions such as
    `click <Settings><Wi-Fi>`."""
    action = action.strip()
    for pattern in (_INPUT_ACTION, _BRACE_ACTION, _COLON_ACTION, _WRAPPED_ACTION):
        match = pattern.fullmatch(action)
        if match:
            name, raw_args = match.group(1), match.group(2).strip()
            parsed = _parse_dict_literal(raw_args)
            return name, parsed if parsed is not None else raw_args
    closed = _CALL_ACTION.fullmatch(action)
    match = closed or _UNCLOSED_CALL_ACTION.fullmatch(action)
    if match:
        raw_args = match.group(2) if closed else match.group(2).rstrip()
        kwargs = _parse_call_kwargs(raw_args)
        return match.group(1), kwargs if kwargs is not None else raw_args
    command = _command_action(action)
    if command is not None:
        return command
    match = _FENCED_ACTION.fullmatch(action)
    if match:
        return match.group(1), {"command": match.group(2).strip()}
    match = _GUI_ACTION.fullmatch(action)
    if match:
        return match.group(1), match.group(2)
    return None


def _agent_step(turn: dict[str, Any], call_id: str, index: int) -> AssistantStep:
    thought = turn.get("thought") or ""
    if not isinstance(thought, str):
        raise TrajectoryError(index, "agent 'thought' must be a string")
    action = turn.get("action")
    if action is None or action == "":
        return AssistantStep(content=thought)
    if not isinstance(action, str):
        raise TrajectoryError(index, "agent 'action' must be a string")
    parsed = parse_action(action)
    if parsed is None:
        return AssistantStep(content="\n".join(piece for piece in (thought, action) if piece))
    name, args = parsed
    if isinstance(args, dict) and nesting_depth(args, MAX_ARGUMENT_DEPTH) > MAX_ARGUMENT_DEPTH:
        raise TrajectoryError(index, f"agent action arguments are nested more than {MAX_ARGUMENT_DEPTH} deep")
    args = cleaned(args, "agent action arguments")
    if name == "Complete" and isinstance(args, dict) and "response" in args:
        final = str(args["response"])
        return AssistantStep(content="\n".join(piece for piece in (thought, final) if piece))
    return AssistantStep(content=thought, tool_calls=[ToolCall(id=call_id, name=name, args=args)])


def from_agent_record(record: dict[str, Any]) -> Trajectory:
    """Convert an R-Judge / AgentHarm record (see shared/datasets/README.md).

    Turns are numbered across all conversations of the record so an error names one place.
    """
    if not isinstance(record, dict):
        raise TrajectoryError(None, f"record must be an object, not {type(record).__name__}")
    record = cleaned(record, "record")
    record_id = record.get("id")
    if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, (str, int))):
        raise TrajectoryError(None, f"record id must be a string or an integer, not {type(record_id).__name__}")
    contents = record.get("contents")
    if not isinstance(contents, list) or not contents:
        raise TrajectoryError(None, "record has no 'contents' list")
    steps: list[Any] = []
    profile = record.get("profile")
    if isinstance(profile, str) and profile:
        steps.append(SystemStep(content=profile))
    index = 0
    last_call: ToolCall | None = None
    for conversation in contents:
        if not isinstance(conversation, list):
            raise TrajectoryError(index, "each entry of 'contents' must be a list of turns")
        for turn in conversation:
            if not isinstance(turn, dict):
                raise TrajectoryError(index, f"turn is a {type(turn).__name__}, not an object")
            role = turn.get("role")
            if role == "user":
                content = turn.get("content")
                if content is not None and not isinstance(content, str):
                    raise TrajectoryError(index, "user turn 'content' must be a string or null")
                steps.append(UserStep(content=content or ""))
            elif role == "agent":
                step = _agent_step(turn, f"call_{index}", index)
                last_call = step.tool_calls[0] if step.tool_calls else None
                steps.append(step)
            elif role == "environment":
                content = turn.get("content")
                if content is not None and not isinstance(content, str):
                    content = json.dumps(content, ensure_ascii=False)
                steps.append(
                    ToolStep(
                        tool_call_id=last_call.id if last_call else None,
                        name=last_call.name if last_call else None,
                        content=content,
                    )
                )
                last_call = None
            else:
                raise TrajectoryError(index, f"unknown turn role {role!r}")
            index += 1
    scenario = record.get("scenario")
    return Trajectory(
        steps=steps,
        environment=scenario if isinstance(scenario, str) and scenario else None,
        conversation_id=str(record_id) if record_id is not None else None,
    )
