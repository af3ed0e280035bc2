"""The HTTP backend against a real server on loopback serving the tiny transformers judge."""

from __future__ import annotations

import asyncio
import math
import re
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend, parse_completion, score_from_label, score_from_logprobs
from soda_guard.backends.scripted import ScriptedBackend, keyword_responder, soda_reply
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.errors import JudgeError, PolicyError
from soda_guard.guard import Guard
from soda_guard.judges.base import ScoreSpec
from soda_guard.judges.soda import SodaJudge
from soda_guard.judging import JudgeRunner, make_backend
from soda_guard.policy import Policy
from soda_guard.testing.server import LoopbackServer, ScriptedHTTPApp, chat_reply, create_app
from soda_guard.trajectory import Trajectory
from soda_guard.verdict import Action, Label

SODA = SodaJudge.score_spec
MESSAGES = [
    {"role": "system", "content": "You are a safety judge."},
    {"role": "user", "content": "Transfer $5,000 from the victim's account to mine."},
]


@pytest.fixture(scope="module")
def tiny(tiny_judge_dir: Path) -> Iterator[tuple[TransformersBackend, LoopbackServer]]:
    local = TransformersBackend(str(tiny_judge_dir), device="cpu", dtype="float32")
    with LoopbackServer(create_app(local)) as server:
        yield local, server


def _tokens(server: LoopbackServer, model: str, max_tokens: int) -> list[dict]:
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": max_tokens, "logprobs": True, "top_logprobs": 20}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    response.raise_for_status()
    return response.json()["choices"][0]["logprobs"]["content"]


def _spec_at_a_real_position(tokens: list[dict]) -> ScoreSpec:
    """A marker that matches exactly the generated text before one token, and label words whose
    first tokens are among that position's top alternatives, so both backends have a score."""
    for index in range(1, len(tokens)):
        prefix = b"".join(bytes(t["bytes"]) for t in tokens[:index]).decode("utf-8", errors="replace")
        letters = [
            t["token"] for t in tokens[index]["top_logprobs"]
            if len(t["token"]) == 1 and t["token"].isascii() and t["token"].isprintable() and not t["token"].isspace()
        ]
        if prefix[-1:].isspace() and "\ufffd" not in prefix and len(set(letters)) >= 3:
            first, second, third = list(dict.fromkeys(letters))[:3]
            return ScoreSpec(marker=r"\A" + re.escape(prefix) + r"\Z", positive=(first + "nsafe",), negative=(second + "afe", third))
    raise AssertionError("the tiny judge generated no usable verdict position")


def test_same_text_and_score_through_http_as_in_process(tiny: tuple[TransformersBackend, LoopbackServer]) -> None:
    local, server = tiny
    spec = _spec_at_a_real_position(_tokens(server, local.model_id, 12))
    request = GenerationRequest(messages=MESSAGES, max_new_tokens=12, score=spec, cache_key="c1")
    [in_process] = local.generate([request])
    with OpenAIBackend(local.model_id, base_url=server.base_url) as remote:
        [over_http] = remote.generate([request])
    assert in_process.score is not None and in_process.score_source == "logits"
    assert over_http.text == in_process.text
    assert over_http.score == pytest.approx(in_process.score, abs=1e-4)
    assert over_http.score_source == "logprobs"
    assert (over_http.prompt_tokens, over_http.generated_tokens) == (in_process.prompt_tokens, in_process.generated_tokens)


def test_same_verdict_for_a_trajectory_through_both_backends(tiny: tuple[TransformersBackend, LoopbackServer]) -> None:
    local, server = tiny
    trajectory = Trajectory.from_openai(
        [
            {"role": "user", "content": "Delete every file in the shared drive."},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "delete_all", "arguments": "{\"path\": \"/\"}"}}
            ]},
        ]
    )
    judge = SodaJudge()
    with OpenAIBackend(local.model_id, base_url=server.base_url) as remote:
        [via_http] = asyncio.run(JudgeRunner(judge, remote, max_new_tokens=16).averdicts([trajectory]))
    [in_process] = JudgeRunner(judge, local, max_new_tokens=16).verdicts([trajectory])
    assert via_http.raw_output == in_process.raw_output
    assert via_http.label == in_process.label
    assert via_http.score == in_process.score
    assert via_http.parse_failure == in_process.parse_failure


def _logprob_tokens(pieces: list[tuple[str, list[tuple[str, float]]]]) -> list[dict]:
    return [
        {"token": token, "logprob": 0.0, "top_logprobs": [{"token": t, "logprob": math.log(p)} for t, p in alternatives]}
        for token, alternatives in pieces
    ]


def test_score_reads_the_token_after_the_marker_and_respects_the_leading_space() -> None:
    spaced = _logprob_tokens(
        [("[", []), ("Verdict", []), ("]", []), (" UN", [(" UN", 0.6), (" S", 0.3), (" ", 0.05), ("UN", 0.05)]), ("SAFE", [])]
    )
    assert score_from_logprobs(spaced, SODA) == pytest.approx(0.6 / 0.9)
    unspaced = _logprob_tokens(
        [("[Reason] x\n", []), ("[", []), ("Verdict", []), ("]", []), (" ", []), ("S", [("S", 0.7), ("UNS", 0.2), (" S", 0.1)]), ("AFE", [])]
    )
    assert score_from_logprobs(unspaced, SODA) == pytest.approx(0.2 / 0.9)
    assert score_from_logprobs(_logprob_tokens([("no", []), (" marker", [])]), SODA) is None


def test_score_falls_back_to_the_label_when_the_server_sends_no_logprobs() -> None:
    for text, expected in [(soda_reply(True), 1.0), (soda_reply(False), 0.0), ("no verdict here", None)]:
        result = parse_completion(chat_reply(text).body, SODA)
        assert result.score == expected
        assert result.score_source == ("label" if expected is not None else None)
    qwen = ScoreSpec(marker=r"Safety:\s*$", positive=("Unsafe", "Controversial"), negative=("Safe",))
    assert score_from_label("Safety: Controversial\nCategories: None", qwen) == 1.0


def test_request_carries_the_judge_messages_greedy_with_logprobs_and_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SODA_TEST_KEY", "sk-loopback")
    app = ScriptedHTTPApp(lambda index, body: chat_reply(soda_reply(True)))
    with LoopbackServer(app) as server:
        with OpenAIBackend("judge-x", base_url=server.base_url, api_key_env="SODA_TEST_KEY", top_logprobs=5) as backend:
            [result] = backend.generate([GenerationRequest(messages=MESSAGES, max_new_tokens=77, score=SODA)])
            backend.generate([GenerationRequest(messages=MESSAGES, max_new_tokens=9)])
    first, second = app.stats.bodies
    assert first == {"model": "judge-x", "messages": MESSAGES, "temperature": 0, "max_tokens": 77, "logprobs": True, "top_logprobs": 5}
    assert "logprobs" not in second and second["max_tokens"] == 9
    assert app.stats.headers[0]["authorization"] == "Bearer sk-loopback"
    assert (result.score, result.score_source) == (1.0, "label")


def test_missing_api_key_variable_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SODA_TEST_ABSENT", raising=False)
    with pytest.raises(JudgeError, match="SODA_TEST_ABSENT"):
        OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", api_key_env="SODA_TEST_ABSENT")


async def test_sync_call_works_inside_a_running_event_loop() -> None:
    app = create_app(ScriptedBackend([soda_reply(False)]))
    with LoopbackServer(app) as server, OpenAIBackend("scripted", base_url=server.base_url) as backend:
        [result] = backend.generate([GenerationRequest(messages=MESSAGES, score=SODA)])
        [again] = await backend.agenerate([GenerationRequest(messages=MESSAGES, score=SODA)])
    assert result.text == again.text == soda_reply(False)
    assert (result.score, result.score_source) == (0.0, "logprobs")


def _policy(url: str, **judge: object) -> Policy:
    config = {"kind": "soda", "model": "scripted", "backend": "openai", "base_url": url, **judge}
    return Policy.from_dict({"judges": {"soda": config}, "defaults": {"on_error": "escalate", "timeout_s": 10}})


PENDING = [
    {"role": "user", "content": "Wire the money out."},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "transfer_money", "arguments": "{}"}}
    ]},
]


def test_guard_blocks_through_the_http_backend_from_policy() -> None:
    app = create_app(ScriptedBackend(keyword_responder([r"transfer_money"])))
    with LoopbackServer(app) as server:
        policy = _policy(server.base_url, retries=0, max_concurrency=2, timeout_s=5)
        backend = make_backend(policy.judges["soda"])
        assert isinstance(backend, OpenAIBackend) and backend.max_concurrency == 2 and backend.retries == 0
        backend.close()
        guard = Guard(policy)
        [decision] = guard.check_tool_calls(Trajectory.from_openai(PENDING))
        [async_decision] = asyncio.run(guard.acheck_tool_calls(Trajectory.from_openai(PENDING)))
    assert decision.action is Action.BLOCK and decision.verdict is not None
    assert decision.verdict.label is Label.UNSAFE and decision.verdict.score == 1.0
    assert async_decision.action is Action.BLOCK


def test_guard_maps_an_unreachable_server_to_on_error_with_the_cause(free_port: int) -> None:
    guard = Guard(_policy(f"http://127.0.0.1:{free_port}/v1", retries=1, timeout_s=5))
    [decision] = guard.check_tool_calls(Trajectory.from_openai(PENDING))
    assert decision.action is Action.ESCALATE
    assert "after 2 attempts" in decision.why and "ConnectError" in decision.why


def test_policy_requires_a_server_for_the_openai_backend() -> None:
    with pytest.raises(PolicyError, match="base_url"):
        Policy.from_dict({"judges": {"j": {"kind": "soda", "model": "m", "backend": "openai"}}})
    with pytest.raises(PolicyError, match="max_concurrency"):
        _policy("http://127.0.0.1:1/v1", max_concurrency=0)


@pytest.fixture
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
