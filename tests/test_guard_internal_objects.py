"""Decisions and verdicts are built without re-validating what is already typed: what comes
from outside (a backend's result) is still checked once, and the records are unchanged."""

from __future__ import annotations

import pytest

from soda_guard import Decision, Guard, Policy, ScriptedBackend, from_openai_messages
from soda_guard.backends.base import GenerationResult
from soda_guard.backends.scripted import soda_reply
from soda_guard.verdict import Action

CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}}
TRAJECTORY = from_openai_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [CALL]}], conversation_id="t")
POLICY = {"judges": {"soda": {"kind": "soda", "model": "scripted"}}}


@pytest.mark.parametrize("tokens", ["12", -1, True, 1.5])
def test_a_token_count_that_is_not_a_count_fails_the_judgment(tokens: object) -> None:
    backend = ScriptedBackend(lambda request: GenerationResult(text=soda_reply(False), prompt_tokens=tokens))  # type: ignore[arg-type]
    decision = Guard(Policy.from_dict(POLICY), backends={"soda": backend}).check_tool_calls(TRAJECTORY)[0]
    assert decision.action is Action.BLOCK and "not a count" in (decision.verdict.error or "")


def test_a_decision_survives_its_audit_round_trip_unchanged() -> None:
    backend = ScriptedBackend(lambda request: GenerationResult(text=soda_reply(True), score=0.9, prompt_tokens=7, generated_tokens=3))
    decision = Guard(Policy.from_dict(POLICY), backends={"soda": backend}).check_tool_calls(TRAJECTORY)[0]
    again = Decision.model_validate_json(decision.model_dump_json())
    assert again == decision and again.model_dump_json() == decision.model_dump_json()
    assert decision.action is Action.BLOCK and decision.verdict.score == 0.9 and decision.verdict.prompt_tokens == 7
