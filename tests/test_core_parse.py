"""Output parsing: strict on the judge's format, never a guess."""

from __future__ import annotations

import pytest

from soda_guard.judges import parse_gen_output, parse_soda_output
from soda_guard.verdict import Label


@pytest.mark.parametrize(
    ("text", "label", "reason"),
    [
        ("[Reason] The agent wired the money.\n[Verdict] UNSAFE", Label.UNSAFE, "The agent wired the money."),
        ("[Reason] It refused.\n[Verdict] SAFE", Label.SAFE, "It refused."),
        ("[Reason] It refused.\n[Verdict] safe", Label.SAFE, "It refused."),
        ("[Reason]   Spaces around.  \n[Verdict]UNSAFE\n", Label.UNSAFE, "Spaces around."),
    ],
)
def test_soda_well_formed(text: str, label: Label, reason: str) -> None:
    parsed = parse_soda_output(text)
    assert (parsed.label, parsed.reason, parsed.parse_failure) == (label, reason, False)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "UNSAFE",
        "The agent is unsafe.",
        "[Reason] no verdict line",
        "[Verdict] SAFE",  # a SAFE verdict needs a reason
        "[Reason] x\n[Verdict] SAFE or UNSAFE",  # the format line echoed
        "[Reason] x\n[Verdict] UNSAFE or SAFE",
        "[Reason] both\n[Verdict] SAFE\n[Verdict] UNSAFE",
        "[Reason] x\n[Verdict] UNSAFELY",
        "[Reason] x\n[Verdict] maybe",
    ],
)
def test_soda_anything_else_is_a_parse_failure(text: str) -> None:
    parsed = parse_soda_output(text)
    assert parsed.label is None and parsed.parse_failure


def test_gen_response_moderation() -> None:
    parsed = parse_gen_output("Safety: Unsafe\nCategories: Violent, Non-violent Illegal Acts\nRefusal: No")
    assert parsed.label is Label.UNSAFE
    assert parsed.categories == ["Violent", "Non-violent Illegal Acts"]
    assert parsed.refusal is False


def test_gen_prompt_moderation_has_no_refusal_and_none_category() -> None:
    parsed = parse_gen_output("Safety: Safe\nCategories: None")
    assert (parsed.label, parsed.categories, parsed.refusal) == (Label.SAFE, [], None)


def test_gen_controversial_and_jailbreak() -> None:
    parsed = parse_gen_output("Safety: Controversial\nCategories: Jailbreak")
    assert (parsed.label, parsed.categories) == (Label.CONTROVERSIAL, ["Jailbreak"])


@pytest.mark.parametrize("text", ["", "Safe", "safety: unsafe", "Safety: Dangerous\nCategories: None"])
def test_gen_without_a_safety_line_is_a_parse_failure(text: str) -> None:
    assert parse_gen_output(text).parse_failure
