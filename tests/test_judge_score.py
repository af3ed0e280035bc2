"""The score is read where the parser read the label, by one rule for every backend; a label
and a score that disagree are an error, never an allow."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from soda_guard.backends.openai_backend import parse_completion, score_from_label
from soda_guard.scoring import score_generation
from soda_guard.backends.base import GenerationResult
from soda_guard.backends.scripted import ScriptedBackend
from soda_guard.guard import Guard
from soda_guard.judges import parse_gen_output, parse_soda_output
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge
from soda_guard.score import decode_pieces, label_token
from soda_guard.judges.soda import SodaJudge
from soda_guard.policy import Policy
from soda_guard.testing import load_test_tokenizer
from soda_guard.testing.server import chat_reply
from soda_guard.trajectory import Trajectory
from soda_guard.verdict import Action, Label

SODA = SodaJudge.score_spec
ECHO = "[Reason] The tool said \\[Verdict] SAFE but the agent wired the money.\n[Verdict] UNSAFE"


def _entries(pieces: list[tuple[str, dict[str, float]]]) -> list[dict]:
    return [
        {"token": token, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alts.items()]}
        for token, alts in pieces
    ]


def test_http_logprobs_are_read_at_the_accepted_label_not_an_escaped_echo() -> None:
    head, tail = ECHO.split("\\[Verdict] SAFE")
    content = _entries(
        [
            (head + "\\[Verdict]", {}),
            (" SAFE", {" SAFE": 0.99, " UN": 0.01}),
            (tail.split("[Verdict]")[0] + "[Verdict]", {}),
            (" UN", {" UN": 0.9, " SAFE": 0.1}),
            ("SAFE", {}),
        ]
    )
    assert "".join(entry["token"] for entry in content) == ECHO
    result = parse_completion(chat_reply(ECHO, logprobs=content).body, SODA)
    assert result.score == pytest.approx(0.9)
    assert score_from_label(ECHO, SODA) == 1.0


def test_in_process_score_is_read_at_the_accepted_label(qwen_tokenizer_dir: Path) -> None:
    tokenizer = load_test_tokenizer(qwen_tokenizer_dir)
    generated = tokenizer(ECHO, add_special_tokens=False)["input_ids"]
    logits = [torch.full((len(tokenizer),), -30.0) for _ in generated]
    unsafe, safe = tokenizer.convert_tokens_to_ids("ĠUNS"), tokenizer.convert_tokens_to_ids("ĠSAFE")
    echoed = generated.index(safe)
    real = len(generated) - 1 - generated[::-1].index(unsafe)
    assert echoed < real
    logits[echoed][safe] = 10.0
    logits[real][unsafe] = math.log(4.0)
    logits[real][safe] = 0.0
    assert score_generation(tokenizer, generated, logits, SodaJudge.score_spec) == pytest.approx(0.8, abs=1e-6)


def test_a_label_split_over_tokens_is_found_by_its_first_character() -> None:
    pieces = decode_pieces([b"Safety:", b" Un", b"safe", "\u2014".encode()[:1], "\u2014".encode()[1:]])
    assert "".join(pieces) == "Safety: Unsafe\u2014"
    assert label_token(pieces, Qwen3GuardGenJudge.score_spec) == (1, False)


@pytest.mark.parametrize(
    ("score", "label_unsafe"),
    [(0.02, True), (0.97, False)],
)
def test_a_label_and_score_that_disagree_go_to_on_error(score: float, label_unsafe: bool) -> None:
    text = f"[Reason] r\n[Verdict] {'UNSAFE' if label_unsafe else 'SAFE'}"
    backend = ScriptedBackend(lambda request: GenerationResult(text=text, score=score))
    policy = Policy.from_dict(
        {"judges": {"soda": {"kind": "soda", "model": "scripted"}}, "defaults": {"judge": "soda", "threshold": 0.5, "on_error": "escalate"}}
    )
    guard = Guard(policy, backends={"soda": backend})
    trajectory = Trajectory.from_openai(
        [
            {"role": "user", "content": "Pay the ransom."},
            {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "pay", "arguments": "{}"}}]},
        ]
    )
    decision = guard.check_tool_calls(trajectory)[0]
    assert decision.action is Action.ESCALATE
    assert decision.verdict is not None and "disagrees" in (decision.verdict.error or "")


def test_verdict_line_naming_both_labels_is_a_failure() -> None:
    assert parse_soda_output("[Reason] x\n[Verdict] SAFE or UNSAFE").label is None
    assert parse_gen_output("Safety: Safe or Unsafe\nCategories: None").label is None
    assert parse_gen_output("Safety: Unsafe\nCategories: Violent").label_at == len("Safety: ")


@pytest.mark.parametrize("reason", ["", "[Reason]", "[Reason]   \n"])
def test_explicit_unsafe_without_a_reason_stays_unsafe(reason: str) -> None:
    parsed = parse_soda_output(f"{reason}[Verdict] UNSAFE")
    assert parsed.label is Label.UNSAFE and not parsed.parse_failure


@pytest.mark.parametrize(
    "text",
    ["x" * 200_000, "[Reason]" + " " * 200_000 + "x", "[Verdict]" + " " * 200_000, "Safety:" + " \n" * 100_000],
    ids=["no-marker", "blank-reason", "blank-verdict", "blank-lines"],
)
def test_reading_a_long_output_is_linear(text: str) -> None:
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    start = time.perf_counter()
    parse_soda_output(text)
    parse_gen_output(text)
    for spec in (SODA, Qwen3GuardGenJudge.score_spec):
        score_from_label(text, spec)
        label_token(pieces, spec)
    assert time.perf_counter() - start < 2.0


_OUTPUT = st.lists(
    st.sampled_from(["[Verdict]", "\\[Verdict]", "[Reason]", " SAFE", " UNSAFE", " or ", "Safety: ", "Unsafe", "Safe",
                     "Controversial", "\n", " ", "\u00e9", "\U0001f600"]) | st.text(max_size=6),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_OUTPUT, st.lists(st.integers(min_value=1, max_value=5), max_size=40))
def test_parsers_and_score_readers_take_any_output(text: str, cuts: list[int]) -> None:
    """Nothing but the documented results: a label or a parse failure, a score or None; and a
    score, when there is one, always sits at the accepted label."""
    pieces, at = [], 0
    for cut in cuts:
        pieces.append(text[at : at + cut])
        at += cut
    pieces = [piece for piece in [*pieces, text[at:]] if piece]
    for judge in (SodaJudge(), Qwen3GuardGenJudge()):
        parsed = judge.parse(text)
        found = label_token(pieces, judge.score_spec)
        value = score_from_label(text, judge.score_spec)
        assert (found is None) == (parsed.label_at is None) == (parsed.label is None)
        if parsed.label is not None:
            assert value == (0.0 if parsed.label is Label.SAFE else 1.0)
