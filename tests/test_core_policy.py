"""Policy loading and validation: the issue's example must load; typos must not."""

from __future__ import annotations

from pathlib import Path

import pytest

from soda_guard import Action, Policy, PolicyError

EXAMPLE = """
version: 1
judges:
  soda: {kind: soda, model: cesun/SODA-Agent-Safety-Judge, backend: transformers, device: auto}
defaults: {judge: soda, on_unsafe: block, on_controversial: escalate, on_error: block, timeout_s: 10}
rules:
  - {tools: ["read_*"], action: allow}
  - {tools: ["transfer_*"], on_unsafe: escalate, threshold: 0.3}
audit: {jsonl: verdicts.jsonl}
"""


def test_example_policy_loads_from_text_and_file(tmp_path: Path) -> None:
    policy = Policy.from_yaml(EXAMPLE)
    path = tmp_path / "policy.yaml"
    path.write_text(EXAMPLE)
    assert Policy.from_yaml_file(path) == policy == Policy.from_yaml_file(str(path)) == Policy.from_yaml(path)
    assert policy.judges["soda"].model == "cesun/SODA-Agent-Safety-Judge"
    assert policy.audit.jsonl == Path("verdicts.jsonl")


def test_first_matching_rule_wins_and_overrides_fall_back_to_defaults() -> None:
    policy = Policy.from_yaml(EXAMPLE)
    name, rule = policy.rule_for("read_file")
    assert (name, rule.action) == ("rules[0]", Action.ALLOW)
    name, rule = policy.rule_for("transfer_funds")
    assert name == "rules[1]"
    assert policy.outcome(rule, "on_unsafe") is Action.ESCALATE
    assert policy.outcome(rule, "on_error") is Action.BLOCK
    assert policy.outcome(rule, "threshold") == 0.3
    assert policy.rule_for("delete_everything") == ("defaults", None)


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("version: 1\ndefualts: {}", "defualts: unknown key"),
        ("version: 1\njudges: {s: {kind: soda, model: m, devise: cpu}}", "judges.s.devise: unknown key"),
        ("version: 1\njudges: {s: {kind: llama, model: m}}", "judges.s.kind"),
        ("version: 1\ndefaults: {on_unsafe: explode}", "defaults.on_unsafe"),
        ("version: 1\nrules: [{tools: [x], threshold: 1.5}]", "rules.0.threshold"),
        ("version: 1\nrules: [{tools: []}]", "rules.0.tools"),
        ("version: 2\n", "version"),
        ("version: 1\njudges: {s: {kind: soda, model: m}}\ndefaults: {judge: other}", "defaults.judge: unknown judge 'other'"),
        ("version: 1\ndefaults: {timeout_s: 0}", "defaults.timeout_s"),
        ("- just a\n- list", "must be a mapping"),
        ("version: 1\n  bad: [indent", "invalid YAML"),
    ],
)
def test_bad_policies_are_rejected_naming_the_key(yaml_text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[").replace(".", r"\.")):
        Policy.from_yaml(yaml_text)


def test_single_judge_becomes_the_default_judge() -> None:
    policy = Policy.from_yaml("version: 1\njudges: {only: {kind: qwen3guard, model: m}}")
    assert policy.defaults.judge == "only"


def test_missing_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="policy file not found"):
        Policy.from_yaml_file(tmp_path / "absent.yaml")
    with pytest.raises(PolicyError, match="policy file not found"):
        Policy.from_yaml(tmp_path / "absent.yaml")


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e300", "1.0e300", "3601", "0"])
@pytest.mark.parametrize("where", ["defaults", "judge"])
def test_deadlines_must_be_finite_and_at_most_an_hour(value: str, where: str) -> None:
    """An infinite deadline blocks the sync path at once (OverflowError in the wait) and lets the
    async path wait forever on a hung judge: it is a policy error naming the key."""
    if where == "defaults":
        text, key = f"version: 1\ndefaults: {{timeout_s: {value}}}", "defaults.timeout_s"
    else:
        text, key = f"version: 1\njudges: {{s: {{kind: soda, model: m, timeout_s: {value}}}}}", "judges.s.timeout_s"
    with pytest.raises(PolicyError, match=key):
        Policy.from_yaml(text)


def test_deadlines_up_to_an_hour_are_accepted() -> None:
    policy = Policy.from_yaml("version: 1\njudges: {s: {kind: soda, model: m, timeout_s: 3600}}\ndefaults: {timeout_s: 3600}")
    assert (policy.judges["s"].timeout_s, policy.defaults.timeout_s) == (3600.0, 3600.0)
    policy = Policy.from_yaml("version: 1\njudges: {s: {kind: soda, model: m, timeout_s: 0.05}}\ndefaults: {timeout_s: 0.05}")
    assert (policy.judges["s"].timeout_s, policy.defaults.timeout_s) == (0.05, 0.05)


@pytest.mark.parametrize("value", ["100", "1e12"])
def test_the_reply_size_cap_is_bounded(value: str) -> None:
    with pytest.raises(PolicyError, match="judges.s.max_response_bytes"):
        Policy.from_yaml(f"version: 1\njudges: {{s: {{kind: soda, model: m, max_response_bytes: {value}}}}}")


def test_one_line_yaml_text_is_text_not_a_file_name() -> None:
    policy = Policy.from_yaml("judges: {only: {kind: soda, model: m}}")
    assert policy.judges["only"].model == "m"


def test_a_file_name_given_as_text_points_at_from_yaml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "policy.yaml").write_text(EXAMPLE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyError, match=r"use Policy\.from_yaml_file\('policy\.yaml'\)"):
        Policy.from_yaml("policy.yaml")


@pytest.mark.parametrize(
    ("yaml_text", "key", "lines"),
    [
        ("version: 1\njudges:\n  s: {kind: soda, model: a}\n  s: {kind: soda, model: b}\n", "'s'", (4, 3)),
        ("version: 1\ndefaults: {on_unsafe: block}\nrules: []\ndefaults: {on_unsafe: allow}\n", "'defaults'", (4, 2)),
        ("rules:\n  - tools: [x]\n    on_unsafe: escalate\n    on_unsafe: allow\n", "'on_unsafe'", (4, 3)),
    ],
)
def test_duplicate_keys_are_rejected_naming_the_key_and_both_lines(yaml_text: str, key: str, lines: tuple[int, int]) -> None:
    with pytest.raises(PolicyError, match=f"duplicate key {key} on line {lines[0]} \\(first on line {lines[1]}\\)"):
        Policy.from_yaml(yaml_text)


def test_duplicate_keys_in_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text("version: 1\nversion: 1\n")
    with pytest.raises(PolicyError, match=f"{path.name}: invalid YAML: duplicate key 'version' on line 2"):
        Policy.from_yaml_file(path)


SODA = {"soda": {"kind": "soda", "model": "m"}}
QWEN = {"qwen": {"kind": "qwen3guard", "model": "q"}}
SCREEN = {"screen": {"kind": "keywords", "unsafe": ["delete"]}}


@pytest.mark.parametrize(
    ("data", "escalates"),
    [
        ({"judges": SODA}, False),
        ({"judges": QWEN}, True),
        ({"judges": SODA, "rules": [{"tools": ["transfer_*"], "action": "escalate"}]}, True),
        ({"judges": SODA, "defaults": {"on_unsafe": "escalate"}}, True),
        ({"judges": SODA, "defaults": {"on_error": "escalate"}}, True),
        ({"judges": SODA, "rules": [{"tools": ["transfer_*"], "on_safe": "escalate"}]}, True),
        ({"judges": {**SODA, **QWEN}, "defaults": {"judge": "soda"}, "rules": [{"tools": ["x"], "judge": "qwen"}]}, True),
        ({"judges": {**SCREEN, **SODA, "both": {"kind": "cascade", "stages": ["screen", "soda"]}}, "defaults": {"judge": "both"}}, True),
        ({"judges": SODA, "defaults": {"on_controversial": "escalate"}}, False),
        ({"judges": SODA, "rules": [{"tools": ["x"], "on_controversial": "escalate"}]}, False),
        ({"judges": SODA, "rules": [{"tools": ["read_*"], "action": "allow", "on_unsafe": "escalate"}]}, False),
        ({"judges": {**SODA, **QWEN}, "defaults": {"judge": "soda"}, "rules": [{"tools": ["x"], "judge": "qwen", "action": "block"}]}, False),
        ({"judges": QWEN, "defaults": {"on_controversial": "block"}}, False),
    ],
    ids=[
        "soda-defaults", "qwen3guard-defaults", "rule-action-escalate", "on_unsafe-escalate", "on_error-escalate",
        "rule-on_safe-escalate", "a-rule-judged-by-qwen3guard", "cascade-with-a-keywords-stage",
        "soda-on_controversial-escalate", "soda-rule-on_controversial-escalate", "unjudged-rule-on_unsafe-escalate",
        "qwen3guard-only-on-an-unjudged-rule", "qwen3guard-on_controversial-block",
    ],
)
def test_can_escalate_says_whether_any_call_can_reach_a_reviewer(data: dict, escalates: bool) -> None:
    """Adapters skip the durable bookkeeping a review pause needs (a LangGraph task per model
    turn) when this is False: a False for a policy that can escalate would lose a judged turn
    on resume, a True for one that cannot only costs time. SODA answers only SAFE or UNSAFE; a
    qwen3guard or keywords judge (also as a cascade stage) may answer controversial."""
    assert Policy.from_dict(data).can_escalate() is escalates
