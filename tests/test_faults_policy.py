"""Issue 22: the policy is strictly typed and every bad input, however large or deep, is a
PolicyError with a bounded message."""

from __future__ import annotations


import pytest

from soda_guard.errors import PolicyError
from soda_guard.policy import MAX_POLICY_BYTES, MAX_RULES, Policy

JUDGE = "judges: {s: {kind: soda, model: m}}\n"


@pytest.mark.parametrize(
    "text, key",
    [
        ("defaults: {threshold: true}", "defaults.threshold"),
        ("rules: [{tools: [x], threshold: yes}]", "rules.0.threshold"),
        ("defaults: {timeout_s: true}", "defaults.timeout_s"),
        ("defaults: {timeout_s: '10'}", "defaults.timeout_s"),
        ("review: {hold_turn: 'no'}", "review.hold_turn"),
        ("review: {hold_turn: 1}", "review.hold_turn"),
        ("judges: {s: {kind: soda, model: m, retries: true}}", "judges.s.retries"),
        ("judges: {s: {kind: soda, model: m, max_new_tokens: '64'}}", "judges.s.max_new_tokens"),
        ("judges: {s: {kind: soda, model: m, verdict_only: 'true'}}", "judges.s.verdict_only"),
        ("judges: {s: {kind: soda, model: m, warm_up: 'yes'}}", "judges.s.warm_up"),
        ("judges: {s: {kind: soda, model: m, max_concurrency: 2.0}}", "judges.s.max_concurrency"),
        ("version: true", "version"),
    ],
)
def test_booleans_are_not_numbers_and_strings_are_not_either(text: str, key: str) -> None:
    body = text if text.startswith("judges") else JUDGE + text
    with pytest.raises(PolicyError, match=key.replace(".", r"\.")):
        Policy.from_yaml(body)


def test_a_threshold_of_true_cannot_turn_unsafe_into_allow() -> None:
    with pytest.raises(PolicyError, match="threshold"):
        Policy.from_dict({"judges": {"s": {"kind": "soda", "model": "m"}}, "defaults": {"threshold": True}})


def test_integers_still_serve_as_seconds_and_probabilities() -> None:
    policy = Policy.from_yaml(JUDGE + "defaults: {timeout_s: 10, threshold: 1}")
    assert (policy.defaults.timeout_s, policy.defaults.threshold) == (10.0, 1.0)


@pytest.mark.parametrize("word", ["off", "'off'", '"off"'])
def test_fsync_off_works_as_documented_unquoted_or_quoted(word: str) -> None:
    assert Policy.from_yaml(f"audit: {{fsync: {word}}}").audit.fsync == "off"


def test_fsync_on_is_still_refused() -> None:
    with pytest.raises(PolicyError, match="audit.fsync"):
        Policy.from_yaml("audit: {fsync: on}")


def test_a_judge_deadline_longer_than_the_check_is_refused_naming_both() -> None:
    with pytest.raises(PolicyError, match=r"judges\.s\.timeout_s \(30s\).*defaults\.timeout_s \(10s\)"):
        Policy.from_yaml("judges: {s: {kind: soda, model: m, timeout_s: 30}}\ndefaults: {timeout_s: 10}")


def test_a_judge_without_a_deadline_inherits_the_checks() -> None:
    policy = Policy.from_yaml(JUDGE + "defaults: {timeout_s: 2}")
    assert policy.judges["s"].timeout_s is None
    assert policy.judge_timeout_s("s") == 2.0
    shorter = Policy.from_yaml("judges: {s: {kind: soda, model: m, timeout_s: 0.5}}\ndefaults: {timeout_s: 2}")
    assert shorter.judge_timeout_s("s") == 0.5


@pytest.mark.parametrize("opening, closing", [("[", "]"), ("{a: ", "}")])
def test_deep_yaml_nesting_is_a_policy_error(opening: str, closing: str) -> None:
    with pytest.raises(PolicyError, match="nested too deeply|invalid YAML"):
        Policy.from_yaml(opening * 20_000 + closing * 20_000)


def test_deeply_nested_data_is_a_policy_error() -> None:
    data: object = "x"
    for _ in range(5_000):
        data = [data]
    with pytest.raises(PolicyError):
        Policy.from_dict({"rules": [{"tools": data}]})


def test_oversized_text_is_refused_without_echoing_it() -> None:
    text = "x" * (MAX_POLICY_BYTES + 1)
    with pytest.raises(PolicyError, match="over the limit") as raised:
        Policy.from_yaml(text)
    assert len(str(raised.value)) < 300


def test_a_large_single_value_is_not_echoed_in_full() -> None:
    text = "y" * (MAX_POLICY_BYTES // 2)
    with pytest.raises(PolicyError, match="single value") as raised:
        Policy.from_yaml(text)
    assert len(str(raised.value)) < 400


def test_an_oversized_policy_file_is_refused_before_reading(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "big.yaml"
    path.write_text("#" * (MAX_POLICY_BYTES + 10))
    with pytest.raises(PolicyError, match="over the limit"):
        Policy.from_yaml_file(path)


def test_a_huge_key_is_cut_in_the_message() -> None:
    with pytest.raises(PolicyError) as raised:
        Policy.from_dict({"judges": {"k" * 100_000: {"kind": "nope", "model": "m"}}})
    assert len(str(raised.value)) < 1_000


def test_100k_rules_are_refused_by_the_documented_cap_before_validation() -> None:
    rules = [{"tools": [f"t{i}"], "action": "allow"} for i in range(100_000)]
    with pytest.raises(PolicyError, match=f"over the limit of {MAX_RULES}"):
        Policy.from_dict({"rules": rules})


def test_a_policy_at_the_rule_cap_loads() -> None:
    rules = [{"tools": [f"t{i}"], "action": "allow"} for i in range(MAX_RULES)]
    assert len(Policy.from_dict({"rules": rules}).rules) == MAX_RULES


@pytest.mark.parametrize("value", [b"bytes", 3, None])
def test_yaml_text_of_the_wrong_type_is_a_policy_error(value: object) -> None:
    with pytest.raises(PolicyError):
        Policy.from_yaml(value)  # type: ignore[arg-type]
