"""The declarative policy: which judge looks at which tool, and what each verdict means.

Everything a user declares is a strict pydantic model (unknown keys are errors, not silently
ignored: a typo in a security policy must not turn a rule off) and loads from YAML.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, SecretStr, StrictFloat, StrictStr, ValidationError, field_validator, model_validator

from soda_guard.conditions import CallContext, Route, ToolGlobs, When, tool_globs
from soda_guard.errors import PolicyError
from soda_guard.patterns import checked_pattern
from soda_guard.mcp.annotations import McpPolicy, effective
from soda_guard.mcp.annotations import matches as annotations_match
from soda_guard.trajectory import ToolCall, Trajectory
from soda_guard.verdict import Action, ReviewType


#: the longest deadline a policy may declare: an hour is far past any useful judgment, and a
#: bound keeps `inf`, `nan` and `1e300` (which block forever or overflow a wait) out of the guard
MAX_TIMEOUT_S = 3600.0

#: strict numbers and booleans: YAML `true` is not 1.0 (`threshold: true` would turn a 0.97 UNSAFE
#: verdict into allow) and a quoted '10' is a typo worth an error, not a number
Seconds = Annotated[float, Field(strict=True, gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]
Probability = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]
Flag = Annotated[bool, Field(strict=True)]

#: the longest policy text read: a policy is a few kilobytes; past this it is refused before
#: parsing, without echoing it
MAX_POLICY_BYTES = 256 * 1024
#: the most rules a policy may hold: `rule_for` tries them in order on every call
MAX_RULES = 10_000
#: how much of a bad value an error message shows
_SHOWN_CHARS = 80


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not the boolean {value}")
    return value


def _strict_int(**constraints: Any) -> Any:
    return Annotated[int, Field(strict=True, **constraints)]

#: a judge's answer is a few hundred bytes; a body past this is a broken or hostile server
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20


class _Strict(BaseModel):
    # the field docstrings become descriptions: the JSON schema and docs/policy-reference.md
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class JudgeConfig(_Strict):
    kind: Literal["soda", "qwen3guard"]
    """Which prompt format and parser: the SODA judge or Qwen3Guard-Gen."""
    model: str
    """A hub id or a local folder (`backend: transformers`); the served model name (`backend: openai`)."""
    backend: Literal["transformers", "openai"] = "transformers"
    """`transformers`: in process (`[local]` extra); `openai`: an OpenAI-compatible server."""
    device: str = "auto"
    """`backend: transformers`: `auto` (a GPU when torch sees one), `cpu`, `cuda`, `cuda:1`, ..."""
    dtype: str = "auto"
    """`backend: transformers`: `auto` (bfloat16 on a GPU, float32 on CPU), `float32`, `bfloat16`, `float16`."""
    base_url: str | None = None
    """`backend: openai`: the server's API root, e.g. http://127.0.0.1:8000/v1."""
    base_urls: list[str] = Field(default_factory=list)
    """Several servers: least-loaded first, a conversation sticks to one (prefix cache hits)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the server's API key; never the key itself."""
    timeout_s: Seconds | None = None
    """Deadline of one judgment, queueing and retries included; unset, it is the check's
    (`defaults.timeout_s`), which it may shorten but never extend."""
    max_response_bytes: _strict_int(ge=1024, le=64 << 20) = DEFAULT_MAX_RESPONSE_BYTES
    """`backend: openai`: a reply body longer than this fails the judgment instead of being read."""
    max_concurrency: _strict_int(ge=1, le=1024) = 16
    """`backend: openai`: judgments in flight at once per server."""
    retries: _strict_int(ge=0, le=10) = 2
    """`backend: openai`: resends after a connection failure, 429 or 5xx, within the deadline."""
    max_new_tokens: _strict_int(ge=1, le=4096) = 128
    """Most tokens the judge writes per judgment (reason and verdict)."""
    stop_at_verdict: Flag = False
    """`backend: transformers`: stop generating once the verdict's own line is written (a line opening with
    the marker and ending after the label; Qwen3Guard: no categories)."""
    verdict_only: Flag = False
    """`backend: transformers`: no reason, P(unsafe) from one forward pass; faster, off the trained format."""
    window: Literal["latest", "history", "full"] = "history"
    """soda: `latest` shows the latest request onward, `history` adds earlier requests and tool
    outputs (the default: +0.35% prompt tokens on the shared datasets), `full` everything."""
    mode: Literal["prompt", "response", "tool_result"] = "response"
    """qwen3guard: what is moderated: the user's prompt, the agent's response (its pending call), or a tool result."""
    harm: str | None = None
    """soda: the harm category shown when the trajectory gives none (before the policy's)."""
    environment: str | None = None
    """soda: the environment name shown when the trajectory gives none (before the policy's)."""
    max_prompt_chars: _strict_int(ge=4_096) = 64_000
    """Whole judge prompt, in characters; the trajectory's middle is elided beyond it."""
    max_message_chars: _strict_int(ge=256) = 16_000
    """One message (a huge tool result) is clipped beyond this, head and tail kept."""
    reply_models: list[StrictStr] = Field(default_factory=list)
    """`backend: openai`: names besides `model` that a reply's `model` field may give and still
    be the judge's answer: vLLM answers with the first of its `--served-model-name`s whichever
    was asked for, and a proxy may rewrite the name. A reply that names any other model, or none,
    fails the judgment (`on_error`): a server of another model must not have its words taken as
    the judge's. `transformers serve`'s `<model>@main` for a Hub id is accepted without this."""
    warm_up: Flag = False
    """`backend: openai`: while the agent's model runs, send the server the conversation so far
    (`max_tokens: 1`) so that its prefix cache holds it when the judgment comes. Off by
    default: it costs a request per model call. (`backend: transformers` always warms: a
    prefill-only job into its own prefix cache.)"""

    @model_validator(mode="after")
    def _server_named(self) -> JudgeConfig:
        if self.backend == "openai" and not (self.base_url or self.base_urls):
            raise ValueError("backend openai needs base_url or base_urls")
        return self


class KeywordsConfig(_Strict):
    """A judge without a model: regexes over what the agent is about to do. Meant as a
    cascade's first stage (a screen), it answers score 1 (unsafe) when an `unsafe` pattern
    matches, else 0 (safe) when every call screened matches a `safe` one, else 0.5
    (controversial: a cascade passes the call on)."""

    kind: Literal["keywords"]
    """A screen by regular expressions, no model."""
    unsafe: list[StrictStr] = Field(default_factory=list)
    """Regexes: any match scores the call 1 (unsafe)."""
    safe: list[StrictStr] = Field(default_factory=list)
    """Regexes: with no unsafe match, the calls score 0 (safe) where each call's own text (its
    name, a space, its JSON arguments) matches one; never a message's text."""
    match: Literal["calls", "all"] = "calls"
    """What the `unsafe` patterns read. `calls`: the pending calls' names and arguments (every
    call shown, when none is pending); `all`: every message of the trajectory."""

    @field_validator("unsafe", "safe")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            checked_pattern(pattern)
        return patterns

    @property
    def model(self) -> str:
        return "keywords"


class CascadeConfig(_Strict):
    """Judges asked in turn: a stage whose score is below `settle_below` or above
    `settle_above` settles the call, any other answer (a failure, a label without a score, a
    score in between) passes it to the next stage, and the last stage always decides."""

    kind: Literal["cascade"]
    """Judges asked in turn, cheapest first."""
    stages: list[StrictStr] = Field(min_length=2)
    """Names of declared judges, in the order they are asked; the last always decides."""
    settle_below: StrictFloat = Field(default=0.05, ge=0.0, le=1.0)
    """A stage's score below it settles the call as safe."""
    settle_above: StrictFloat = Field(default=0.95, ge=0.0, le=1.0)
    """A stage's score above it settles the call as unsafe."""

    @model_validator(mode="after")
    def _ordered(self) -> CascadeConfig:
        if self.settle_below >= self.settle_above:
            raise ValueError(f"settle_below ({self.settle_below}) must be below settle_above ({self.settle_above})")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError("a stage is named twice")
        return self

    @property
    def model(self) -> str:
        return f"cascade({', '.join(self.stages)})"


JUDGE_KINDS = ("soda", "qwen3guard", "keywords", "cascade")

AnyJudgeConfig = Annotated[Union[JudgeConfig, KeywordsConfig, CascadeConfig], Field(discriminator="kind")]


class Outcomes(_Strict):
    """What each verdict maps to; shared by the defaults and the per-rule overrides."""

    on_safe: Action | None = None
    """Action for a SAFE verdict."""
    on_unsafe: Action | None = None
    """Action for an UNSAFE verdict (or a score at or above `threshold`)."""
    on_controversial: Action | None = None
    """Action for Qwen3Guard's Controversial."""
    on_error: Action | None = None
    """Action when judging fails: an exception, a timeout, a model that cannot load, output the parser rejects."""
    threshold: Probability | None = None
    """A score (P(unsafe)) at or above it counts as unsafe, below it as safe, whatever the label."""
    on_truncated: Literal["judge", "error"] | None = None
    """`error`: a verdict on a prompt that had to be cut (`Verdict.truncated`) is not trusted
    and the call takes `on_error`; `judge` (the default) uses the verdict."""


class Defaults(Outcomes):
    judge: str | None = None
    """The judge of whole trajectories and of tools no rule names; optional with one judge."""
    on_safe: Action = Action.ALLOW
    on_unsafe: Action = Action.BLOCK
    on_controversial: Action = Action.ESCALATE
    on_error: Action = Action.BLOCK
    on_truncated: Literal["judge", "error"] = "judge"
    timeout_s: Seconds = 10.0
    """Deadline of one check (its judgments and audit write); a judge's own `timeout_s` may shorten it, and one above it is refused."""


class Rule(Outcomes):
    """First matching rule wins. `action` short-circuits: the call is not judged at all.
    A rule matches a call when every key it sets matches: `tools` (absent: every tool),
    `server` (a glob over the MCP server's name; no MCP tool matches it otherwise) and `when`."""

    name: str | None = None
    """Recorded in each decision instead of `rules[N]`."""
    tools: list[str] | None = Field(default=None, min_length=1)
    """Glob patterns of tool names (`read_*`), or of `server:tool` for MCP tools; absent: every tool."""
    server: str | None = None
    """A glob over the MCP server's name; a call that comes from no MCP server never matches it."""
    action: Action | None = None
    """Decide without judging: `allow`, `block`, `escalate` or `log`. With a `verdict`
    condition the call is judged, and `action` applies when it holds."""
    judge: str | None = None
    """This rule's judge instead of the default one."""
    when: When | None = None
    """Conditions beyond the tool name; all must hold (see Conditions in the README)."""
    allowed_decisions: list[ReviewType] | None = Field(default=None, min_length=1)
    """What a reviewer may answer for these tools' escalations (the review config of each
    action request); default: approve, edit, reject, respond. Another answer is refused."""
    description: str | None = None
    """Shown to the reviewer for these tools' escalations in place of soda-guard's text
    (the judge's reason stays in the request's `soda_guard` key)."""
    _match: ToolGlobs = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._match = tool_globs(self.tools or [])

    def matches(self, call: ToolCall | str, annotations: Mapping[str, bool] | None = None) -> bool:
        """Tools, server and MCP annotations (`annotations`: the call's effective ones, which
        `Policy.route` resolves from the pins); the other conditions are `when`'s to read."""
        call = call if isinstance(call, ToolCall) else ToolCall(id="", name=call)
        if self.tools is not None and not self._match(call):
            return False
        if self.server is not None and (call.server is None or not fnmatch.fnmatchcase(call.server, self.server)):
            return False
        if self.when is not None and self.when.annotations is not None:
            return annotations_match(self.when.annotations, annotations)
        return True

    def matches_tool(self, call: ToolCall) -> bool:
        """Whether an earlier call counts as one of this rule's tools (`limit`)."""
        return self.tools is None or self._match(call)

    @property
    def is_judged(self) -> bool:
        """Whether a call this rule applies to is judged: always with a verdict condition."""
        return self.action is None or (self.when is not None and self.when.needs_verdict)


RESERVED_RULE_NAMES = frozenset({"defaults", "binding", "review", "review_refused", "tool_results", "mcp-proxy"})
"""What decisions not made by a policy rule name as their rule; `rules[N]` names unnamed rules."""


def rule_label(index: int, rule: Rule) -> str:
    """How a decision names the rule at `index` of the policy's rules: its `name`, else `rules[N]`."""
    return rule.name or f"rules[{index}]"


class ReviewPolicy(_Strict):
    """How an escalation waits for its reviewer. `hold_turn` (the default, as LangChain's
    HumanInTheLoopMiddleware does) asks once per model turn, before any call of that turn
    runs; false runs the turn's allowed calls first and asks per escalated call."""

    hold_turn: Flag = True
    """Ask once per model turn before any of its calls runs; false runs the allowed calls first."""
    interrupt_mode: Literal["batched", "per_call"] = "batched"
    """As `HumanInTheLoopMiddleware`'s: `batched` asks one `HITLRequest` per question, answered
    with an `HITLResponse` (`{"decisions": [...]}`, one per action request); `per_call` asks one
    `ToolApprovalRequest` per escalated call, in order, each answered with one decision."""


class RecordsPolicy(_Strict):
    """The key that authenticates the records the guard keeps in graph state
    (`soda_guard.seal`): `key` itself, else the environment variable named by `key_env`, else
    a random key per process (records then do not survive a restart: their calls are judged
    again, escalations asked again). Give every worker of a deployment the same key."""

    key: SecretStr | None = Field(default=None, min_length=16)
    """The HMAC key itself (at least 16 characters); prefer `key_env` to keep it out of the file."""
    key_env: str = "SODA_GUARD_STATE_KEY"
    """The environment variable holding the key, read when `key` is not set."""


class ToolResultPolicy(Outcomes):
    """Opt-in moderation of what tools return (indirect prompt injection → `Jailbreak`), run
    after a tool executes and before its result reaches the model."""

    judge: str
    """The judge that moderates results (a `qwen3guard` judge, `mode: tool_result`)."""
    tools: list[str] = Field(default_factory=lambda: ["*"], min_length=1)
    """Glob patterns of the tools whose results are moderated (`server:tool` for MCP tools)."""
    _match: ToolGlobs = PrivateAttr()

    def model_post_init(self, context: Any) -> None:
        self._match = tool_globs(self.tools)

    def matches(self, tool: ToolCall | str) -> bool:
        return self._match(tool if isinstance(tool, ToolCall) else ToolCall(id="", name=tool))


class AuditConfig(_Strict):
    jsonl: Path | None = None
    """Append every decision to this JSON-lines file."""
    fsync: Literal["decision", "batch", "off"] = "decision"
    """`decision` (and `batch`, the same): every record fsynced before its decision is returned,
    one fsync shared by concurrent checks; `off`: written before return (survives a crashed
    process, not a power cut)."""
    sqlite: Path | None = None
    """Also write every decision to this SQLite database."""

    @field_validator("fsync", mode="before")
    @classmethod
    def _off_unquoted(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted `off` (and `no`, `false`) as the boolean false; the
        documented word must work as written."""
        return "off" if value is False else value


class Policy(_Strict):
    version: Annotated[Literal[1], BeforeValidator(_not_bool)] = 1
    """The policy format's version."""
    judges: dict[str, AnyJudgeConfig] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule] = Field(default_factory=list)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    tool_results: ToolResultPolicy | None = None
    review: ReviewPolicy = Field(default_factory=ReviewPolicy)
    records: RecordsPolicy = Field(default_factory=RecordsPolicy)
    harm: str | None = None
    """SODA's harm category where neither the trajectory nor the judge gives one (else `unspecified`)."""
    environment: str | None = None
    """SODA's environment name where neither the trajectory nor the judge gives one (else `unspecified`)."""
    mcp: McpPolicy = Field(default_factory=McpPolicy)
    """Per-server pinned MCP tool annotations (`soda_guard.mcp.annotations`)."""

    @model_validator(mode="after")
    def _judges_exist(self) -> Policy:
        named_default = self.defaults.judge is not None
        if self.defaults.judge is None and len(self.judges) == 1:
            self.defaults.judge = next(iter(self.judges))
        names = [("defaults.judge", self.defaults.judge)]
        names += [(f"rules[{i}].judge", rule.judge) for i, rule in enumerate(self.rules)]
        if self.tool_results is not None:
            names.append(("tool_results.judge", self.tool_results.judge))
        for where, name in names:
            if name is not None and name not in self.judges:
                raise ValueError(f"{where}: unknown judge {name!r} (declared: {sorted(self.judges) or 'none'})")
        self._judges_read_what_they_judge(named_default)
        self._rule_names_unique()
        for name, config in self.judges.items():
            if isinstance(config, CascadeConfig):
                for stage in config.stages:
                    if stage not in self.judges:
                        raise ValueError(f"judges.{name}.stages: unknown judge {stage!r} (declared: {sorted(self.judges)})")
                    if isinstance(self.judges[stage], CascadeConfig):
                        raise ValueError(f"judges.{name}.stages: {stage!r} is a cascade; stages are single judges")
        for index, rule in enumerate(self.rules):
            if rule.when is not None and rule.when.needs_verdict and self.outcome(rule, "judge") is None:
                raise ValueError(f"rules[{index}].when.verdict: a verdict condition needs a judge (declare one, or name it in judge:)")
        needs_judge = any(rule.is_judged for rule in self.rules) or not self.rules
        if needs_judge and self.judges and self.defaults.judge is None:
            raise ValueError("defaults.judge: required when more than one judge is declared")
        check = self.defaults.timeout_s
        for name, judge in self.judges.items():
            own = getattr(judge, "timeout_s", None)
            if own is not None and own > check:
                raise ValueError(
                    f"judges.{name}.timeout_s ({own:g}s) is longer than the check's "
                    f"defaults.timeout_s ({check:g}s): a judge's deadline can only shorten the check's"
                )
        return self

    def _judges_read_what_they_judge(self, named_default: bool) -> None:
        """A judge that cannot see what it is asked about answers as if it were harmless: a
        Qwen3Guard judge in `response` or `prompt` mode moderating results ends its prompt
        before the result (every result reads Safe; SODA shows the turn, the result too), one
        in `tool_result` mode judging calls reads the result before the call, never the call,
        and a screen's `safe` patterns settle a result by the call's name before a stage after
        it reads the result. Refused here rather
        than found out from an attack that got through. A policy declaring one judge, for
        results, judges calls with it by default (as it always has: the call is held back when
        the result before it is flagged); naming it for calls is refused."""
        def stages(name: str) -> list[tuple[str, Any]]:
            config = self.judges.get(name)
            if isinstance(config, CascadeConfig):
                return [(stage, self.judges.get(stage)) for stage in config.stages]
            return [(name, config)]

        if self.tool_results is not None:
            chain = stages(self.tool_results.judge)
            for position, (name, config) in enumerate(chain, 1):
                if isinstance(config, JudgeConfig) and config.kind == "qwen3guard" and config.mode != "tool_result":
                    raise ValueError(
                        f"tool_results.judge: {name!r} has mode: {config.mode}, whose prompt ends before the result "
                        "(give it mode: tool_result)"
                    )
                if isinstance(config, KeywordsConfig) and config.match != "all":
                    raise ValueError(f"tool_results.judge: the keywords screen {name!r} reads only calls (give it match: all)")
                if isinstance(config, KeywordsConfig) and config.safe and position < len(chain):
                    raise ValueError(
                        f"tool_results.judge: the keywords screen {name!r} would settle a result as safe by its call's "
                        "name and arguments, which `safe` patterns read, and the next stage would never read it"
                    )
        callers = [("defaults.judge", self.defaults.judge)] if named_default else []
        callers += [(f"rules[{i}].judge", rule.judge) for i, rule in enumerate(self.rules) if rule.is_judged and rule.judge is not None]
        for where, judge in callers:
            for name, config in stages(judge) if judge is not None else []:
                if isinstance(config, JudgeConfig) and config.kind == "qwen3guard" and config.mode == "tool_result":
                    raise ValueError(
                        f"{where}: {name!r} has mode: tool_result, which moderates the latest tool result, not the "
                        "pending call (judge calls with another judge, e.g. mode: response)"
                    )

    def _rule_names_unique(self) -> None:
        """A decision names its rule, and a review reads that rule's `allowed_decisions` by the
        name: two rules of one name would let a reject-only escalation be approved under the
        other's, and a name the guard uses itself would be read as that."""
        seen: set[str] = set()
        for index, rule in enumerate(self.rules):
            if rule.name is None:
                continue
            if rule.name in seen:
                raise ValueError(f"rules[{index}].name: {rule.name!r} names an earlier rule too; rule names must be unique")
            if rule.name in RESERVED_RULE_NAMES or re.fullmatch(r"rules\[\d+\]", rule.name):
                raise ValueError(f"rules[{index}].name: {rule.name!r} is a name decisions use for something else")
            seen.add(rule.name)

    def judge_timeout_s(self, name: str) -> float:
        """The deadline of one judgment by judge `name`: its own `timeout_s`, else the check's."""
        own = getattr(self.judges[name], "timeout_s", None)
        return own if own is not None else self.defaults.timeout_s

    def judges_in_use(self) -> list[str]:
        """The declared judges some check can reach, in declaration order: the default one
        (whole trajectories and tools no rule matches), each judging rule's, tool-result
        moderation's, and the stages of any of them that is a cascade. A judge declared but
        unreachable is not worth loading."""
        used = {self.defaults.judge}
        used.update(rule.judge or self.defaults.judge for rule in self.rules if rule.is_judged)
        if self.tool_results is not None:
            used.add(self.tool_results.judge)
        for name in list(used):
            config = self.judges.get(name) if name is not None else None
            if isinstance(config, CascadeConfig):
                used.update(config.stages)
        return [name for name in self.judges if name in used]

    @property
    def scans_results(self) -> bool:
        """Whether routing a call reads earlier tool results (`flows_from`): tens of
        milliseconds on a thread with megabytes of them, which an event loop should not wait."""
        return any(rule.when is not None and rule.when.flows_from is not None for rule in self.rules)

    def rule_for(self, tool: ToolCall | str) -> tuple[str, Rule | None]:
        """The first rule whose tools, server and annotations match and that has no other
        condition: what applies when only the call is known, not its thread (a response still
        streaming). A rule with thread or verdict conditions cannot be read without them
        (`route` does that), and applying it unread could turn a narrow exception into the
        rule for every call of the tool."""
        call = tool if isinstance(tool, ToolCall) else ToolCall(id="", name=tool)
        annotations = effective(call.server, call.tool_name, call.annotations, self.mcp)
        for index, rule in enumerate(self.rules):
            if (rule.when is None or not rule.when.needs_context) and rule.matches(call, annotations):
                return rule_label(index, rule), rule
        return "defaults", None

    def rules_for(self, tool: ToolCall | str | None) -> list[tuple[str, Rule | None]]:
        """Every rule that may apply to a call known only by its tool (a response still
        streaming): those whose tools, server and annotations match, up to the first that has no
        other condition (`rule_for`'s), or the defaults; for a call whose tool is not known yet
        (None), every rule and the defaults. A tool known by its name alone (str) may be any MCP
        server's or none: a rule that names a server, a `server:tool` pattern whose tool part
        matches the name, or annotations may apply too, and does not end the search. Which of
        them applies depends on what is not known yet, so a caller takes the strictest."""
        if tool is None:
            return [*((rule_label(index, rule), rule) for index, rule in enumerate(self.rules)), ("defaults", None)]
        call = tool if isinstance(tool, ToolCall) else ToolCall(id="", name=tool)
        annotations = effective(call.server, call.tool_name, call.annotations, self.mcp)
        found: list[tuple[str, Rule | None]] = []
        for index, rule in enumerate(self.rules):
            if rule.matches(call, annotations):
                found.append((rule_label(index, rule), rule))
                if rule.when is None or not rule.when.needs_context:
                    return found
            elif isinstance(tool, str) and (rule.tools is None or any(fnmatch.fnmatchcase(tool, pattern.rpartition(":")[2]) for pattern in rule.tools)):
                found.append((rule_label(index, rule), rule))  # its server or annotations may hold
        return [*found, ("defaults", None)]

    def route(self, call: ToolCall, trajectory: Trajectory) -> Route:
        """Which rule a pending call hits. Rules are read in order: one whose tools or
        conditions before judging do not hold is skipped; one with a `verdict` condition
        becomes a candidate read after judging and the search goes on; the first other one
        that holds ends it (the defaults when none does)."""
        context = CallContext(call, trajectory)
        annotations = effective(call.server, call.tool_name, call.annotations, self.mcp)
        route = Route()
        for index, rule in enumerate(self.rules):
            if not rule.matches(call, annotations):
                continue
            held = "" if rule.when is None else rule.when.before_judging(context, rule.matches_tool)
            if held is None:
                continue
            name = rule_label(index, rule)
            if rule.when is not None and rule.when.needs_verdict:
                route.candidates.append((name, rule, held))
                continue
            route.name, route.rule, route.condition = name, rule, held or None
            return route
        return route

    def rule_named(self, name: str | None) -> Rule | None:
        """The rule a decision names (`Decision.rule`: its `name`, else `rules[N]`); None for
        the defaults and the guard's own refusals. What a reviewer may answer is the rule's
        that escalated the call, conditions and all, not the first rule for the tool's name."""
        for index, rule in enumerate(self.rules):
            if name == rule_label(index, rule):
                return rule
        return None

    def outcome(self, rule: Outcomes | None, field: str) -> Any:
        value = getattr(rule, field) if rule is not None else None
        return value if value is not None else getattr(self.defaults, field)

    def can_escalate(self) -> bool:
        """Whether any tool call can be escalated to a reviewer under this policy. Where none
        can, no graph node ever pauses for one, and adapters skip the durable bookkeeping a
        pause needs (a LangGraph task per judgment). Judged conservatively: a rule's judge that
        cannot be told apart counts as one that may answer controversial."""
        for rule in [None, *self.rules]:
            if rule is not None and rule.action is Action.ESCALATE:
                return True
            if rule is not None and not rule.is_judged:
                continue
            fields = ["on_safe", "on_unsafe", "on_error"]
            if self._may_be_controversial(rule.judge if rule is not None and rule.judge else self.defaults.judge):
                fields.append("on_controversial")
            if any(self.outcome(rule, field) is Action.ESCALATE for field in fields):
                return True
        return False

    def _may_be_controversial(self, judge: str | None) -> bool:
        """Only a SODA judge answers strictly SAFE or UNSAFE; a cascade answers what its stages do."""
        configs = [self.judges[judge]] if judge in self.judges else list(self.judges.values())
        for config in configs:
            if isinstance(config, CascadeConfig):
                if any(stage not in self.judges or self._may_be_controversial(stage) for stage in config.stages):
                    return True
            elif config.kind != "soda":
                return True
        return False

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: the policy must be a mapping, not {type(data).__name__}")
        rules = data.get("rules")
        if isinstance(rules, list) and len(rules) > MAX_RULES:
            raise PolicyError(f"{source}: rules: {len(rules)} rules, over the limit of {MAX_RULES}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise PolicyError(_describe(error, source)) from None
        except RecursionError:
            raise PolicyError(f"{source}: the policy is nested too deeply") from None

    @classmethod
    def from_yaml(cls, text: str | Path) -> Policy:
        """YAML text. A `str` is always text, never a file name: guessing by its shape made
        `from_yaml("judges: {...}")` fail as a missing file. A `Path` still loads that file, as
        before, and text that is a lone string (an old caller's file name) gets an error pointing
        at `from_yaml_file`."""
        if isinstance(text, Path):
            return cls.from_yaml_file(text)
        if not isinstance(text, str):
            raise PolicyError(f"policy: YAML text must be a str or a Path, not {type(text).__name__}")
        data = _parse_yaml(text, "policy")
        if isinstance(data, str):
            shown = _shown(text.strip())
            raise PolicyError(
                f"policy: the YAML text {shown} is a single value, not a policy; "
                f"to load a file use Policy.from_yaml_file({shown})"
            )
        return cls.from_dict(data, source="policy")

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        try:
            size = path.stat().st_size
            if size > MAX_POLICY_BYTES:
                raise PolicyError(f"{path}: the policy is {size} bytes, over the limit of {MAX_POLICY_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PolicyError(f"{path}: cannot read the policy: {error}") from None
        return cls.from_dict(_parse_yaml(text, str(path)), source=str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys without a word; in a policy the first one (say a
    rule's `on_unsafe: block`) would silently stop applying."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"duplicate key {key!r} on line {key_node.start_mark.line + 1} "
                        f"(first on line {first.start_mark.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


_CORE_TAGS = {f"tag:yaml.org,2002:{kind}" for kind in ("bool", "int", "float", "timestamp")}
# YAML 1.2's core schema, not PyYAML's 1.1: there `off`, `no` (Norway's code) and `y` are
# False or True, `0123` is 83, `12:30` is 750 and `2026-01-02` a date, each silently changing
# what a rule compares with; here they stay the text they are unless quoted otherwise
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, pattern) for tag, pattern in resolvers if tag not in _CORE_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$"), list("-+0123456789")
)
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _core_int(loader: yaml.SafeLoader, node: yaml.Node) -> int:
    text = str(loader.construct_scalar(node))  # type: ignore[arg-type]
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text, 10)  # `0123` is 123, not octal


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _core_int)


def _shown(text: str) -> str:
    """`text` quoted for an error message, cut to its first characters: a megabyte of it once
    came back twice in one message."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} characters)"


def _parse_yaml(text: str, source: str) -> Any:
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_POLICY_BYTES:
        raise PolicyError(f"{source}: the policy is {size} bytes, over the limit of {MAX_POLICY_BYTES} bytes")
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
        _refuse_empty(data, source)
    except yaml.YAMLError as error:
        raise PolicyError(f"{source}: invalid YAML: {error}") from None
    except RecursionError:
        raise PolicyError(f"{source}: invalid YAML: nested too deeply") from None
    return data


NULL_MEANS_NULL = frozenset({"eq", "ne"})
"""The keys where YAML's null is a value to compare with (`eq: null`)."""


def _refuse_empty(data: Any, path: str) -> None:
    """A key written with nothing after it (`lt:`, a template's unset variable) reads as
    null, which a model takes for the key left out: `lt:` made "allow small transfers" allow
    every transfer, `action:` turned a block into a judgment, `allowed_decisions:` let a
    reviewer approve a reject-only escalation, `tool_results:` turned moderation off. In
    policy text it is refused; a dict built in code (`model_dump()` writes unset keys as None)
    means what pydantic reads it as."""
    if isinstance(data, dict):
        for key, value in data.items():
            where = f"{path}.{key}" if path else str(key)
            if value is None and key not in NULL_MEANS_NULL:
                raise PolicyError(f"{where}: empty; give a value or leave the key out")
            _refuse_empty(value, where)
    elif isinstance(data, list):
        for index, item in enumerate(data):
            _refuse_empty(item, f"{path}[{index}]")


def resolve_policy(
    policy_path: str | Path | None,
    judge: str | None,
    model: str | None,
    *,
    window: Literal["latest", "history", "full"] = "history",
    device: str = "auto",
) -> tuple[Policy, str]:
    """The policy a command line runs and the judge it uses: a one-judge policy built from
    `judge` (default soda) and `model`, or the YAML file with `judge` (default: its default
    judge; a name it does not declare is an error, not a silent fall-back) made the default and
    `model` overriding that judge's weights."""
    if policy_path is None:
        if model is None:
            raise PolicyError("--model is required without --policy")
        judge = judge or "soda"
        if judge not in ("soda", "qwen3guard"):
            raise PolicyError(f"unknown judge {judge!r}: use soda or qwen3guard")
        config = JudgeConfig(kind=judge, model=model, window=window, device=device)  # type: ignore[arg-type]
        return Policy(judges={judge: config}), judge
    policy = Policy.from_yaml_file(policy_path)
    if judge is not None and judge not in policy.judges:
        raise PolicyError(f"judge {judge!r} is not declared in {policy_path} (it declares {', '.join(policy.judges) or 'none'})")
    name = judge or policy.defaults.judge
    if name is None:
        if len(policy.judges) != 1:
            raise PolicyError(f"{policy_path} declares {len(policy.judges)} judges and no default one: pick one with --judge")
        name = next(iter(policy.judges))
    if model is not None:
        config = policy.judges[name]
        if not isinstance(config, JudgeConfig):
            raise PolicyError(f"--model: judge {name!r} is a {config.kind} judge, which has no weights to replace")
        policy.judges[name] = config.model_copy(update={"model": model})
    policy.defaults.judge = name
    return policy, name


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for problem in error.errors():
        loc = list(problem["loc"])
        if len(loc) > 2 and loc[0] == "judges" and loc[2] in JUDGE_KINDS:  # the union's tag, not a key
            del loc[2]
        if problem["type"] in ("union_tag_invalid", "union_tag_not_found"):
            loc.append("kind")
        key = ".".join(str(part)[:_SHOWN_CHARS] for part in loc) or "(root)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {problem['msg']}")
    return f"{source}: " + "; ".join(lines)
