"""Rule conditions (`when:`): what a call must look like, and what must have happened earlier in
its thread, for a rule to apply.

Every condition reads only what the guard already holds (the pending call and the thread's
trajectory, or the rule's verdict), is compiled once when the policy loads, and never raises on
what an agent sends: a path that is missing or a value of the wrong type simply does not match.
`When` holds each condition in its own optional field and evaluates whichever are set, so a new
condition is one more field with a `holds` method.
"""

from __future__ import annotations

import fnmatch
import json
import math
import operator
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any, Callable, Literal, Union

import regex
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    RootModel,
    SerializerFunctionWrapHandler,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_serializer,
    model_validator,
)

from soda_guard.converters import scalars
from soda_guard.mcp.annotations import AnnotationCondition
from soda_guard.mcp.jsonrpc import parse as parse_json
from soda_guard.patterns import checked_pattern, compile_pattern, found
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep, Trajectory
from soda_guard.verdict import Label, Verdict

if TYPE_CHECKING:
    from soda_guard.policy import Rule

ToolMatch = Callable[[ToolCall], bool]

Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr, None]
Probability = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]

#: what `lookup` returns for a path that is not there (None is a value an argument can hold)
_MISSING = object()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Globs:
    """Shell globs compiled into one regex, so matching a tool name is one call on the hot
    path; equal when their patterns are (policies compare by value)."""

    pattern: re.Pattern[str] | None

    def __call__(self, name: str) -> bool:
        return self.pattern is not None and self.pattern.match(name) is not None


def compile_globs(patterns: list[str]) -> Globs:
    if not patterns:
        return Globs(None)
    return Globs(re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in patterns)))


@dataclass(frozen=True)
class ToolGlobs:
    """Globs of tools: a pattern with a `:` is matched against `server:tool` (an MCP tool's
    qualified name), one without against the bare tool name, whichever server provides it
    (the agent's name for it, or the server's where the two differ)."""

    plain: Globs
    qualified: Globs

    def __call__(self, call: ToolCall) -> bool:
        return (
            self.plain(call.name)
            or (call.server_tool is not None and self.plain(call.server_tool))
            or self.qualified(call.qualified_name)
        )


def tool_globs(patterns: list[str]) -> ToolGlobs:
    return ToolGlobs(compile_globs([p for p in patterns if ":" not in p]), compile_globs([p for p in patterns if ":" in p]))


@dataclass
class CallContext:
    """The pending call and what its thread did before it. Computed lazily and once per call,
    however many rules read it."""

    call: ToolCall
    trajectory: Trajectory

    @cached_property
    def _turn(self) -> int:
        """Index of the assistant step that holds the pending call."""
        for index in range(len(self.trajectory.steps) - 1, -1, -1):
            step = self.trajectory.steps[index]
            if isinstance(step, AssistantStep) and any(call.id == self.call.id for call in step.tool_calls):
                return index
        return len(self.trajectory.steps)

    @cached_property
    def earlier_calls(self) -> list[ToolCall]:
        """Calls of earlier turns: the thread's history before this call's turn."""
        return [call for step in self.trajectory.steps[: self._turn] if isinstance(step, AssistantStep) for call in step.tool_calls]

    @cached_property
    def answered_ids(self) -> set[str]:
        return {step.tool_call_id for step in self.trajectory.steps[: self._turn] if isinstance(step, ToolStep) and step.tool_call_id}

    @cached_property
    def unbound_results(self) -> list[ToolCall]:
        """Earlier results that answer no call by id but name their tool (a provider that omits
        ids), as calls of that tool on this call's server: each is one run of that tool, though
        no call id says which. A result that names neither (an environment's observation) is
        no run of anything."""
        return [
            self._named(step.name)
            for step in self.trajectory.steps[: self._turn]
            if isinstance(step, ToolStep) and not step.tool_call_id and step.name
        ]

    def _named(self, name: str) -> ToolCall:
        return ToolCall(id="", name=name, server=self.call.server)

    @cached_property
    def siblings_before(self) -> list[ToolCall]:
        """Calls of the same turn that come before this one: they run before it too."""
        if self._turn >= len(self.trajectory.steps):
            return []
        step = self.trajectory.steps[self._turn]
        assert isinstance(step, AssistantStep)
        before = []
        for call in step.tool_calls:
            if call.id == self.call.id:
                break
            before.append(call)
        return before

    @cached_property
    def tool_results(self) -> list[tuple[ToolCall, str]]:
        """(the call, whitespace-normalised text) of every earlier tool result: the call it
        answers by id, else a call of the tool it names on this call's server."""
        calls = {call.id: call for call in self.earlier_calls}
        results = []
        for step in self.trajectory.steps[: self._turn]:
            if isinstance(step, ToolStep) and step.content:
                call = calls.get(step.tool_call_id or "")
                if call is None or (step.name and step.name != call.name):
                    call = self._named(step.name or "")
                results.append((call, normalise_space(step.content)))
        return results


def normalise_space(text: str) -> str:
    return " ".join(text.split())


def lookup(value: Any, path: tuple[str, ...]) -> Any:
    """The value at a dotted path in a call's arguments, `_MISSING` when any step is absent or
    not a container (digits index lists). A string on the way that holds a JSON object or
    array is read as it: an MCP server (the Python SDK's `pre_parse_json`) and tools that
    validate hand the tool the object, so `payment.amount` is not walked around by sending
    `payment` as text."""
    for part in path:
        if isinstance(value, str) and value.lstrip()[:1] in ("{", "["):
            try:
                value = parse_json(value)
            except (ValueError, RecursionError):
                return _MISSING
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_number(value: Any) -> float | int | None:
    """A number, or a string that reads as one (`"5000"`, `" +5_000 "`, `"0005e3"`, `"1e309"`,
    which a Decimal field takes as 1E+309): what a tool that validates its arguments
    (pydantic's lax mode, a LangChain tool) runs with, so `gt: 1000` is not walked around by
    quoting or padding the amount. Whole numbers are read exactly, past a float's 2**53.
    Anything else (NaN, which no bound holds for, among it) is no number."""
    if _is_number(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:  # not a whole number, or past int's 4,300-digit limit: a float
            pass
        try:
            number = float(value)
        except ValueError:
            return None
        return None if math.isnan(number) else number
    return None


_LAX_BOOLS = {"0": False, "off": False, "f": False, "false": False, "n": False, "no": False,
              "1": True, "on": True, "t": True, "true": True, "y": True, "yes": True}
"""The strings pydantic's lax mode reads as a bool (case and surrounding spaces aside)."""


def _lax(value: Any, like: Any) -> Any:
    """`value` as a tool validating it in lax mode (pydantic's default) reads it for a field of
    `like`'s type: `"false"`, `"no"` and `0` are False for a bool field, `"666"` is 666 for a
    number; `_MISSING` where it would not read it so."""
    if isinstance(like, bool):
        if isinstance(value, str):
            return _LAX_BOOLS.get(value.strip().lower(), _MISSING)
        if _is_number(value) and value in (0, 1):
            return bool(value)
    elif _is_number(like) and isinstance(value, str):
        number = _as_number(value)
        return _MISSING if number is None else number
    return _MISSING


def _same(left: Any, right: Any) -> bool:
    """Equality without Python's `True == 1` and `1 == 1.0`-across-kinds surprises: a bool
    equals only a bool, a number only a number, a string only a string; or a value the tool
    would read as `right` (`_lax`): `"false"` is `eq: false`, since the tool runs with False."""
    if _is_number(left) and _is_number(right):
        return bool(left == right)
    if type(left) is type(right):
        return bool(left == right)
    coerced = _lax(left, right)
    return coerced is not _MISSING and _same(coerced, right)


def _path(text: str) -> tuple[str, ...]:
    parts = tuple(text.split("."))
    if not all(parts):
        raise ValueError(f"{text!r}: a dotted path has no empty parts")
    return parts


class ArgTest(_Strict):
    """Comparisons on one argument; every one given must hold. A missing argument, or a value
    whose type does not fit the comparison (a word for `gt`, a number for `glob`), does not
    match; a string that reads as a number is one for `gt`, `ge`, `lt` and `le`."""

    eq: Scalar = None
    ne: Scalar = None
    gt: Number | None = None
    ge: Number | None = None
    lt: Number | None = None
    le: Number | None = None
    in_: list[Scalar] | None = Field(default=None, alias="in")
    not_in: list[Scalar] | None = None
    glob: StrictStr | None = None
    regex: StrictStr | None = None
    _regex: regex.Pattern[str] | None = PrivateAttr(default=None)
    _glob: re.Pattern[str] | None = PrivateAttr(default=None)
    _bounds: list[tuple[Callable[[Any, Any], bool], float]] = PrivateAttr(default_factory=list)
    # `in_` too: what `model_dump()` writes without `by_alias` loads back
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            checked_pattern(value)
        return value

    @model_validator(mode="after")
    def _any_comparison(self) -> ArgTest:
        if not self.model_fields_set:
            raise ValueError("give at least one comparison (eq, ne, gt, ge, lt, le, in, not_in, glob, regex)")
        return self

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the comparisons given: `eq: null` compares with null, so a dump that wrote every
        unset `eq` and `ne` as null loaded back as a rule that matched nothing (a block rule
        stored and reloaded let every call through)."""
        given = {key for name in self.model_fields_set for key in (name, type(self).model_fields[name].alias)}
        return {key: value for key, value in handler(self).items() if key in given}

    def model_post_init(self, context: Any) -> None:
        if self.regex is not None:
            self._regex = compile_pattern(self.regex)
        if self.glob is not None:
            self._glob = re.compile(fnmatch.translate(self.glob))
        compare = ((operator.gt, self.gt), (operator.ge, self.ge), (operator.lt, self.lt), (operator.le, self.le))
        self._bounds = [(test, bound) for test, bound in compare if bound is not None]

    def holds(self, value: Any) -> bool:
        if value is _MISSING:
            return False
        given = self.model_fields_set
        if "eq" in given and not _same(value, self.eq):
            return False
        if "ne" in given and (not _comparable(value, self.ne) or _same(value, self.ne)):
            return False
        if self._bounds:
            number = _as_number(value)
            if number is None or not all(test(number, bound) for test, bound in self._bounds):
                return False
        if self.in_ is not None and not (_is_scalar(value) and any(_same(value, member) for member in self.in_)):
            return False
        if self.not_in is not None and not (_is_scalar(value) and not any(_same(value, member) for member in self.not_in)):
            return False
        if self._glob is not None and not (isinstance(value, str) and self._glob.match(value)):
            return False
        if self._regex is not None and not (isinstance(value, str) and _searched(self._regex, value)):
            return False
        return True

    def describe(self) -> str:
        shown = self.model_dump(exclude_unset=True, by_alias=True)
        return " ".join(f"{op} {json.dumps(_plain(operand), ensure_ascii=False)}" for op, operand in shown.items())


REGEX_TIMEOUT_S = 0.05
"""The longest an argument's `regex` is searched for: the pattern is the policy's, the text the
agent's, and a pattern that backtracks on it must not hold the check (or, without the GIL it
lets go of, every other thread). A search not done by then does not match, as a value the
condition cannot read does not: the next rule, by default the judge, decides."""


def _searched(pattern: regex.Pattern[str], value: str) -> bool:
    try:
        return found(pattern, value, REGEX_TIMEOUT_S)
    except TimeoutError:
        return False


def _plain(operand: Any) -> Any:
    """A bound the policy wrote as 1000 reads back as 1000, not 1000.0."""
    if isinstance(operand, float) and operand.is_integer():
        return int(operand)
    return operand


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _comparable(value: Any, operand: Any) -> bool:
    """`ne` needs a value of the operand's kind: a list is not `ne "x"`, it is the wrong type
    (`ne: null` asks for any scalar that is not null)."""
    if operand is None:
        return _is_scalar(value)
    if _is_number(value) and _is_number(operand):
        return True
    return type(value) is type(operand) or _lax(value, operand) is not _MISSING


class Args(RootModel[dict[str, ArgTest]]):
    """`args: {path: {op: operand}}` on the pending call's arguments (`recipient.email`)."""

    model_config = ConfigDict(frozen=True)
    _paths: list[tuple[tuple[str, ...], str, ArgTest]] = PrivateAttr(default_factory=list)

    @field_validator("root")
    @classmethod
    def _paths_valid(cls, value: dict[str, ArgTest]) -> dict[str, ArgTest]:
        if not value:
            raise ValueError("name at least one argument")
        for name in value:
            _path(name)
        return value

    def model_post_init(self, context: Any) -> None:
        self._paths = [(_path(name), name, test) for name, test in self.root.items()]

    def holds(self, context: CallContext, rule_tools: ToolMatch) -> str | None:
        args = context.call.args
        if not isinstance(args, dict):  # arguments that were not valid JSON have no paths
            return None
        for path, name, test in self._paths:
            if not test.holds(lookup(args, path)):
                return None
        return "; ".join(f"args.{name} {test.describe()}" for _, name, test in self._paths)


class FlowsFrom(_Strict):
    """Text returned by an earlier matching tool appears verbatim (at least `min_chars`, after
    whitespace normalisation) in the named argument: data read by one tool leaving through
    another."""

    tools: list[StrictStr] = Field(min_length=1)
    into: StrictStr = "args"
    min_chars: StrictInt = Field(default=20, ge=4, le=10_000)
    _match: ToolMatch = PrivateAttr()
    _into: tuple[str, ...] = PrivateAttr()

    @field_validator("into")
    @classmethod
    def _under_args(cls, value: str) -> str:
        if value != "args" and not value.startswith("args."):
            raise ValueError(f"{value!r}: name an argument as args.NAME (or args for all of them)")
        _path(value)
        return value

    def model_post_init(self, context: Any) -> None:
        self._match = tool_globs(self.tools)
        self._into = _path(self.into)[1:]

    def holds(self, context: CallContext, rule_tools: ToolMatch) -> str | None:
        args = context.call.args
        if not isinstance(args, dict):
            return None
        value = lookup(args, self._into)
        if value is _MISSING:
            return None
        target = normalise_space(" ".join(_strings(value)))
        if len(target) < self.min_chars:
            return None
        runs = SharedRuns(target, self.min_chars)
        for call, text in context.tool_results:
            if self._match(call) and runs.found_in(text):
                return f"flows_from: text returned by {call.qualified_name} appears in {self.into}"
        return None


class SharedRuns:
    """Whether a text shares a verbatim run of at least `size` characters with `target`, in
    time linear in the text. Any such run covers a whole `probe`-long window of the text that
    starts at a multiple of `stride` (probe + stride - 1 = size), so only those windows are
    looked up among the target's probes, and each hit is extended both ways to see whether the
    run reaches `size`. Extensions are budgeted: text built to hit many probes without a full
    run (a periodic one) would otherwise cost probes x positions; past the budget the answer is
    yes, the side that does not let data out unseen."""

    def __init__(self, target: str, size: int, budget: int = 20_000) -> None:
        self.target = target
        self.size = size
        self.stride = max(1, size // 2)
        self.probe = size - self.stride + 1
        self.budget = budget
        self.index: dict[str, list[int]] = {}
        for i in range(len(target) - self.probe + 1):
            self.index.setdefault(target[i : i + self.probe], []).append(i)

    def found_in(self, text: str) -> bool:
        probe, index = self.probe, self.index
        for start in range(0, len(text) - probe + 1, self.stride):
            positions = index.get(text[start : start + probe])
            if positions is None:
                continue
            for position in positions:
                self.budget -= 1
                if self.budget < 0 or self._run(text, start, position) >= self.size:
                    return True
        return False

    def _run(self, text: str, start: int, position: int) -> int:
        """Length of the common run through text[start:] == target[position:] (a probe long)."""
        target, size = self.target, self.size
        left = 0
        while left < size and left < start and left < position and text[start - left - 1] == target[position - left - 1]:
            left += 1
        right = self.probe
        while left + right < size and start + right < len(text) and position + right < len(target) and text[start + right] == target[position + right]:
            right += 1
        return left + right


def _strings(value: Any) -> list[str]:
    """Every scalar inside a value, as text, in order: an argument may nest what it carries."""
    return [item if isinstance(item, str) else json.dumps(item) for item in scalars(value)]


class After(RootModel[Annotated[list[StrictStr], Field(min_length=1)]]):
    """`after: [globs]`: an earlier call of this thread (an earlier turn) matched one of them."""

    model_config = ConfigDict(frozen=True)
    _match: ToolMatch = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._match = tool_globs(self.root)

    def holds(self, context: CallContext, rule_tools: ToolMatch) -> str | None:
        for call in context.earlier_calls:
            if self._match(call):
                return f"after: {call.qualified_name} ran earlier in this thread"
        return None


class Limit(_Strict):
    """The thread already ran `calls` calls matching the rule's tools (earlier turns, answered,
    plus the ones before this in its own turn); this one would exceed it. An earlier result
    that answers no call by id but names a tool counts as a run of that tool."""

    calls: StrictInt = Field(ge=0)
    per: Literal["thread"] = "thread"

    def holds(self, context: CallContext, rule_tools: ToolMatch) -> str | None:
        ran = sum(1 for call in context.earlier_calls if call.id in context.answered_ids and rule_tools(call))
        ran += sum(1 for call in context.unbound_results if rule_tools(call))
        ran += sum(1 for call in context.siblings_before if rule_tools(call))
        if ran >= self.calls:
            return f"limit: {ran} matching calls already in this thread (limit {self.calls})"
        return None


class ScoreRange(_Strict):
    gt: Probability | None = None
    ge: Probability | None = None
    lt: Probability | None = None
    le: Probability | None = None

    @model_validator(mode="after")
    def _any_bound(self) -> ScoreRange:
        if not self.model_fields_set:
            raise ValueError("give at least one bound (gt, ge, lt, le): a range without one holds for every score")
        return self


class VerdictTest(_Strict):
    """What the rule's judge said: any of `labels`, a score in range, any of `categories`
    (Qwen3Guard's, compared case-insensitively). A failed judgment matches nothing here; the
    guard takes the rule's `on_error` instead."""

    labels: list[Label] | None = Field(default=None, min_length=1)
    score: ScoreRange | None = None
    categories: list[StrictStr] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _any_test(self) -> VerdictTest:
        if not self.model_fields_set:
            raise ValueError("give labels, score or categories")
        return self

    def holds_for(self, verdict: Verdict, label: Label | None = None) -> str | None:
        """`label`: the verdict's label as the policy reads it (its threshold applied)."""
        if verdict.failed:
            return None
        label = verdict.label if label is None else label
        held = []
        if self.labels is not None:
            if label not in self.labels:
                return None
            held.append(f"label {label.value}")  # type: ignore[union-attr]
        if self.score is not None:
            score = verdict.score
            bounds = self.score
            if score is None or not (
                (bounds.gt is None or score > bounds.gt)
                and (bounds.ge is None or score >= bounds.ge)
                and (bounds.lt is None or score < bounds.lt)
                and (bounds.le is None or score <= bounds.le)
            ):
                return None
            held.append(f"score {score:.3f}")
        if self.categories is not None:
            wanted = {category.casefold() for category in self.categories}
            found = [category for category in verdict.categories if category.casefold() in wanted]
            if not found:
                return None
            held.append(f"categories {', '.join(found)}")
        return f"verdict: {'; '.join(held)}"


class When(_Strict):
    """A rule's conditions; all that are given must hold. `verdict` is read after judging,
    the others before (a rule whose other conditions fail is not judged for). Another
    condition is one more optional field whose model has `holds(context, rule_tools) -> str |
    None`; fields are read in declaration order, so the cheap ones come first and a failing
    one spares the costly `flows_from` scan."""

    annotations: AnnotationCondition | None = None
    """The MCP tool's effective annotations (`mcp.servers` pins, else what the server
    declared); read with the tool's name (`Rule.matches`), not here."""
    args: Args | None = None
    after: After | None = None
    limit: Limit | None = None
    flows_from: FlowsFrom | None = None
    verdict: VerdictTest | None = None

    @model_validator(mode="after")
    def _any_condition(self) -> When:
        if not self.model_fields_set:
            raise ValueError("give at least one condition")
        return self

    @property
    def needs_verdict(self) -> bool:
        return self.verdict is not None

    @property
    def needs_context(self) -> bool:
        """Whether reading it takes the thread or the verdict, not only the call."""
        return any(getattr(self, name) is not None for name in type(self).model_fields if name != "annotations")

    def before_judging(self, context: CallContext, rule_tools: ToolMatch) -> str | None:
        """What held, in words, or None when a condition does not hold. Every optional field
        but `verdict` is a condition with `holds(context, rule_tools)`."""
        held = []
        for name in type(self).model_fields:
            condition = getattr(self, name)
            if condition is None or name in ("verdict", "annotations"):
                continue
            said = condition.holds(context, rule_tools)
            if said is None:
                return None
            held.append(said)
        return "; ".join(held)

    def after_judging(self, verdict: Verdict, label: Label | None = None) -> str | None:
        return self.verdict.holds_for(verdict, label) if self.verdict is not None else ""


@dataclass
class Route:
    """Where a pending call goes: rules whose verdict conditions are read after judging, in
    order, then the rule that applies when none of them holds (None: the defaults)."""

    candidates: list[tuple[str, Rule, str]] = field(default_factory=list)
    """(rule name, rule, what held before judging) of each rule with a `verdict` condition."""
    name: str = "defaults"
    rule: Rule | None = None
    condition: str | None = None
