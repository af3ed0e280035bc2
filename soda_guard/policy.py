"""The declarative policy: which judge looks at which tool, and what each verdict means.

Everything a user declares is a strict pydantic model (unknown keys are errors, not silently
ignored: a typo in a security policy must not turn a rule off) and loads from YAML.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soda_guard.errors import PolicyError
from soda_guard.verdict import Action


#: the longest deadline a policy may declare: an hour is far past any useful judgment, and a
#: bound keeps `inf`, `nan` and `1e300` (which block forever or overflow a wait) out of the guard
MAX_TIMEOUT_S = 3600.0

Seconds = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, allow_inf_nan=False)]

#: a judge's answer is a few hundred bytes; a body past this is a broken or hostile server
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JudgeConfig(_Strict):
    kind: Literal["soda", "qwen3guard"]
    model: str
    backend: Literal["transformers", "openai"] = "transformers"
    device: str = "auto"
    dtype: str = "auto"
    base_url: str | None = None
    """`backend: openai`: the server's API root, e.g. http://127.0.0.1:8000/v1."""
    base_urls: list[str] = Field(default_factory=list)
    """Several servers: least-loaded first, a conversation sticks to one (prefix cache hits)."""
    api_key_env: str | None = None
    """Name of the environment variable holding the server's API key; never the key itself."""
    timeout_s: Seconds = 30.0
    """Deadline of one judgment over HTTP, queueing and retries included."""
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, ge=1024, le=64 << 20)
    """`backend: openai`: a reply body longer than this fails the judgment instead of being read."""
    max_concurrency: int = Field(default=16, ge=1)
    retries: int = Field(default=2, ge=0, le=10)
    max_new_tokens: int = Field(default=128, ge=1, le=4096)
    stop_at_verdict: bool = False
    """`backend: transformers`: stop generating once the verdict label is written (Qwen3Guard: no categories)."""
    verdict_only: bool = False
    """`backend: transformers`: no reason, P(unsafe) from one forward pass; faster, off the trained format."""
    window: Literal["latest", "history", "full"] = "history"
    """soda: `latest` shows the latest request onward, `history` adds earlier requests and tool
    outputs (the default: +0.35% prompt tokens on the shared datasets), `full` everything."""
    mode: Literal["prompt", "response", "tool_result"] = "response"
    harm: str | None = None
    environment: str | None = None
    max_prompt_chars: int = Field(default=64_000, ge=4_096)
    """Whole judge prompt, in characters; the trajectory's middle is elided beyond it."""
    max_message_chars: int = Field(default=16_000, ge=256)
    """One message (a huge tool result) is clipped beyond this, head and tail kept."""
    warm_up: bool = False
    """`backend: openai`: while the agent's model runs, send the server the conversation so far
    (`max_tokens: 1`) so that its prefix cache holds it when the judgment comes. Off by
    default: it costs a request per model call. (`backend: transformers` always warms: a
    prefill-only job into its own prefix cache.)"""

    @model_validator(mode="after")
    def _server_named(self) -> JudgeConfig:
        if self.backend == "openai" and not (self.base_url or self.base_urls):
            raise ValueError("backend openai needs base_url or base_urls")
        return self


class Outcomes(_Strict):
    """What each verdict maps to; shared by the defaults and the per-rule overrides."""

    on_safe: Action | None = None
    on_unsafe: Action | None = None
    on_controversial: Action | None = None
    on_error: Action | None = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    on_truncated: Literal["judge", "error"] | None = None
    """`error`: a verdict on a prompt that had to be cut (`Verdict.truncated`) is not trusted
    and the call takes `on_error`; `judge` (the default) uses the verdict."""


class Defaults(Outcomes):
    judge: str | None = None
    on_safe: Action = Action.ALLOW
    on_unsafe: Action = Action.BLOCK
    on_controversial: Action = Action.ESCALATE
    on_error: Action = Action.BLOCK
    on_truncated: Literal["judge", "error"] = "judge"
    timeout_s: Seconds = 10.0


class Rule(Outcomes):
    """First matching rule wins. `action` short-circuits: the call is not judged at all."""

    name: str | None = None
    tools: list[str] = Field(min_length=1)
    action: Action | None = None
    judge: str | None = None

    def matches(self, tool_name: str) -> bool:
        return any(fnmatch.fnmatchcase(tool_name, pattern) for pattern in self.tools)


class ReviewPolicy(_Strict):
    """How an escalation waits for its reviewer. `hold_turn` (the default, as LangChain's
    HumanInTheLoopMiddleware does) asks once per model turn, before any call of that turn
    runs; false runs the turn's allowed calls first and asks per escalated call."""

    hold_turn: bool = True


class ToolResultPolicy(Outcomes):
    """Opt-in moderation of what tools return (indirect prompt injection → `Jailbreak`), run
    after a tool executes and before its result reaches the model."""

    judge: str
    tools: list[str] = Field(default_factory=lambda: ["*"])

    def matches(self, tool_name: str) -> bool:
        return any(fnmatch.fnmatchcase(tool_name, pattern) for pattern in self.tools)


class AuditConfig(_Strict):
    jsonl: Path | None = None
    fsync: Literal["decision", "batch", "off"] = "decision"
    """`decision` (and `batch`, the same): every record fsynced before its decision is returned,
    one fsync shared by concurrent checks; `off`: written before return (survives a crashed
    process, not a power cut)."""
    sqlite: Path | None = None


class Policy(_Strict):
    version: Literal[1] = 1
    judges: dict[str, JudgeConfig] = Field(default_factory=dict)
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule] = Field(default_factory=list)
    audit: AuditConfig = Field(default_factory=AuditConfig)
    tool_results: ToolResultPolicy | None = None
    review: ReviewPolicy = Field(default_factory=ReviewPolicy)
    harm: str | None = None
    environment: str | None = None

    @model_validator(mode="after")
    def _judges_exist(self) -> Policy:
        if self.defaults.judge is None and len(self.judges) == 1:
            self.defaults.judge = next(iter(self.judges))
        names = [("defaults.judge", self.defaults.judge)]
        names += [(f"rules[{i}].judge", rule.judge) for i, rule in enumerate(self.rules)]
        if self.tool_results is not None:
            names.append(("tool_results.judge", self.tool_results.judge))
        for where, name in names:
            if name is not None and name not in self.judges:
                raise ValueError(f"{where}: unknown judge {name!r} (declared: {sorted(self.judges) or 'none'})")
        needs_judge = any(rule.action is None for rule in self.rules) or not self.rules
        if needs_judge and self.judges and self.defaults.judge is None:
            raise ValueError("defaults.judge: required when more than one judge is declared")
        return self

    def judges_in_use(self) -> list[str]:
        """The declared judges some check can reach, in declaration order: the default one
        (whole trajectories and tools no rule matches), each judging rule's, and tool-result
        moderation's. A judge declared but unreachable is not worth loading."""
        used = {self.defaults.judge}
        used.update(rule.judge or self.defaults.judge for rule in self.rules if rule.action is None)
        if self.tool_results is not None:
            used.add(self.tool_results.judge)
        return [name for name in self.judges if name in used]

    def rule_for(self, tool_name: str) -> tuple[str, Rule | None]:
        for index, rule in enumerate(self.rules):
            if rule.matches(tool_name):
                return rule.name or f"rules[{index}]", rule
        return "defaults", None

    def outcome(self, rule: Outcomes | None, field: str) -> Any:
        value = getattr(rule, field) if rule is not None else None
        return value if value is not None else getattr(self.defaults, field)

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: the policy must be a mapping, not {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise PolicyError(_describe(error, source)) from None

    @classmethod
    def from_yaml(cls, text: str | Path) -> Policy:
        """YAML text. A `str` is always text, never a file name: guessing by its shape made
        `from_yaml("judges: {...}")` fail as a missing file. A `Path` still loads that file, as
        before, and text that is a lone string (an old caller's file name) gets an error pointing
        at `from_yaml_file`."""
        if isinstance(text, Path):
            return cls.from_yaml_file(text)
        data = _parse_yaml(text, "policy")
        if isinstance(data, str):
            raise PolicyError(
                f"policy: the YAML text {text.strip()!r} is a single value, not a policy; "
                f"to load a file use Policy.from_yaml_file({text.strip()!r})"
            )
        return cls.from_dict(data, source="policy")

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> Policy:
        path = Path(path)
        if not path.is_file():
            raise PolicyError(f"policy file not found: {path}")
        try:
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


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise PolicyError(f"{source}: invalid YAML: {error}") from None


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
        policy.judges[name] = policy.judges[name].model_copy(update={"model": model})
    policy.defaults.judge = name
    return policy, name


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(root)"
        if problem["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        else:
            lines.append(f"{key}: {problem['msg']}")
    return f"{source}: " + "; ".join(lines)
