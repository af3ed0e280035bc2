"""What an HTTP judge failure tells the user: an empty reply says it was empty and why the
server stopped, a model the server does not serve is named next to what it does serve, and a
reply from a model other than the judge is no verdict."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Callable

import pytest

from soda_guard import Action, Decision, Guard, Policy, from_openai_messages
from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend
from soda_guard.errors import JudgeError
from soda_guard.judges.soda import SodaJudge
from soda_guard.testing.server import LoopbackServer, Reply, ScriptedHTTPApp

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "judge this"}], max_new_tokens=16, score=SodaJudge.score_spec)


def empty_choice(finish_reason: str) -> Reply:
    choice = {"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": finish_reason}
    return Reply(body={"object": "chat.completion", "choices": [choice], "usage": {"prompt_tokens": 9, "completion_tokens": 0}})


@pytest.mark.parametrize("finish_reason", ["length", "stop"])
def test_an_empty_reply_is_reported_as_empty_with_the_finish_reason(finish_reason: str) -> None:
    app = ScriptedHTTPApp(lambda i, body: empty_choice(finish_reason))
    with LoopbackServer(app) as server:
        policy = Policy.from_dict({
            "judges": {"soda": {"kind": "soda", "model": "m", "backend": "openai", "base_url": server.base_url, "retries": 0}},
            "defaults": {"on_error": "block"},
        })
        guard = Guard(policy)
        try:
            decision = guard.check(from_openai_messages([{"role": "user", "content": "hello"}]))
        finally:
            guard.close()
    assert decision.action is Action.BLOCK and decision.verdict is not None
    cause = decision.verdict.error or ""
    assert "empty" in cause and finish_reason in cause and "could not be parsed" not in cause, cause


def safe_as(model: Any) -> Reply:
    """A chat completion that says SAFE, from `model` (bytes: a reply naming no model)."""
    choice = {"index": 0, "message": {"role": "assistant", "content": "[Reason] Fine.\n[Verdict] SAFE"}, "finish_reason": "stop"}
    body = {"model": model, "object": "chat.completion", "choices": [choice]}
    return Reply(body=body if model is not None else json.dumps({k: v for k, v in body.items() if k != "model"}).encode())


def judged(mode: str, base_url: str, model: str, reply_models: list[str] | None = None) -> Decision:
    judge = {"kind": "soda", "model": model, "backend": "openai", "base_url": base_url, "retries": 0}
    guard = Guard(Policy.from_dict({"judges": {"soda": judge | ({"reply_models": reply_models} if reply_models else {})}, "defaults": {"on_error": "block"}}))
    call = from_openai_messages([{"role": "user", "content": "hello"}])
    try:
        return guard.check(call) if mode == "sync" else asyncio.run(guard.acheck(call))
    finally:
        guard.close()


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("answered", "said"),
    [("general-chat-8b", "as model 'general-chat-8b'"), (None, "without naming its model"), (["soda-judge"], "without naming its model")],
)
def test_a_reply_from_another_model_is_not_the_judges_verdict(mode: str, answered: Any, said: str) -> None:
    """A judge URL that reaches a server of another model (misconfigured, a load balancer's
    pool, a hostile proxy): its chat model says SAFE, and that SAFE was the judge's verdict."""
    app = ScriptedHTTPApp(lambda i, body: safe_as(answered))
    with LoopbackServer(app) as server:
        decision = judged(mode, server.base_url, "soda-judge")
    assert decision.action is Action.BLOCK and decision.verdict is not None
    cause = decision.verdict.error or ""
    assert said in cause and "'soda-judge'" in cause and "reply_models" in cause, cause


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(
    ("model", "reply_models", "answered"),
    [
        ("soda-judge", None, "soda-judge"),  # vLLM and SGLang, asked for the name they serve
        ("cesun/SODA-Agent-Safety-Judge", None, "cesun/SODA-Agent-Safety-Judge@main"),  # `transformers serve`, a Hub id
        ("judge", ["soda-judge"], "soda-judge"),  # vLLM `--served-model-name soda-judge judge`: the first name
    ],
)
def test_the_names_a_judges_own_server_answers_with_are_the_judges(mode: str, model: str, reply_models: list[str] | None, answered: str) -> None:
    with LoopbackServer(ScriptedHTTPApp(lambda i, body: safe_as(answered))) as server:
        decision = judged(mode, server.base_url, model, reply_models)
    assert decision.action is Action.ALLOW, decision.why


def test_a_server_answering_as_another_model_cools_down_and_the_judges_server_judges() -> None:
    wrong = ScriptedHTTPApp(lambda i, body: safe_as("general-chat-8b"))
    right = ScriptedHTTPApp(lambda i, body: safe_as("soda-judge"))
    with LoopbackServer(wrong) as bad, LoopbackServer(right) as good:
        with OpenAIBackend("soda-judge", base_urls=[bad.base_url, good.base_url], retries=0, cooldown_s=600.0) as client:
            outcomes = []
            for _ in range(4):
                try:
                    outcomes.append(client.generate([REQUEST])[0].score)
                except JudgeError as error:
                    outcomes.append(str(error))
    assert wrong.stats.served == 1 and right.stats.served == 3, outcomes
    assert sum(isinstance(outcome, str) and "general-chat-8b" in outcome for outcome in outcomes) == 1, outcomes


class VllmLikeApp:
    """Refuses an unknown model the way vLLM does (404 naming only the requested name) and
    lists what it serves at GET /v1/models."""

    def __init__(self, served: str) -> None:
        self.served = served

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/v1/models":
            status, body = 200, {"object": "list", "data": [{"id": self.served, "object": "model"}]}
        else:
            while (await receive()).get("more_body"):
                pass
            status, body = 404, {"error": {"message": "The model `judge` does not exist.", "code": 404}}
        payload = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def test_a_model_name_mismatch_names_both_names() -> None:
    served = "/models/SODA-Agent-Safety-Judge"  # how `transformers serve` names a folder's model
    with LoopbackServer(VllmLikeApp(served)) as server, OpenAIBackend("judge", base_url=server.base_url, retries=0) as client:
        with pytest.raises(JudgeError) as raised:
            client.generate([REQUEST])
    message = str(raised.value)
    assert "HTTP 404" in message and "'judge'" in message and served in message, message


class TricklingModelsApp:
    """Refuses every judgment (404), then answers the model listing the guard asks for next
    one byte every 50 ms for a minute: a read never times out."""

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
            for _ in range(1200):
                await send({"type": "http.response.body", "body": b" ", "more_body": True})
                try:
                    if (await asyncio.wait_for(receive(), timeout=0.05)).get("type") == "http.disconnect":
                        return
                except asyncio.TimeoutError:
                    pass
            await send({"type": "http.response.body", "body": b"{}"})
            return
        while (await receive()).get("more_body"):
            pass
        payload = b'{"error": {"message": "The model `judge` does not exist."}}'
        await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_model_listing_after_a_refusal_ends_with_the_judgments_deadline(mode: str) -> None:
    """The look at `GET /models` that names both models after a refusal once had a timeout per
    read only: a server trickling it held the worker (and `close`, and the process's exit)
    for as long as it liked. It now ends with the judgment's deadline, and the worker is free."""
    server = LoopbackServer(TricklingModelsApp()).start()
    try:
        with OpenAIBackend("judge", base_url=server.base_url, retries=0, timeout_s=1.0) as client:
            start = time.monotonic()
            with pytest.raises(JudgeError, match="HTTP 404"):
                client.generate([REQUEST]) if mode == "sync" else asyncio.run(client.agenerate([REQUEST]))
            until = time.monotonic() + 10.0  # a margin for a loaded machine; the server goes on for 60 s
            while client.in_flight and time.monotonic() < until:
                time.sleep(0.01)
            assert client.in_flight == 0 and time.monotonic() - start < 10.0
    finally:
        server.kill()


def test_the_doctors_model_listing_ends_by_its_timeout() -> None:
    """`soda-guard doctor`'s look at `GET /models` had a timeout per read only: a server
    trickling the listing held the command for as long as it liked (a minute here)."""
    from soda_guard.served_models import ServedModelsError, served_models

    server = LoopbackServer(TricklingModelsApp()).start()
    try:
        start = time.monotonic()
        with pytest.raises(ServedModelsError, match="Timeout"):
            served_models(server.base_url, timeout_s=0.5)
        assert time.monotonic() - start < 10.0  # a margin for a loaded machine; the server goes on for 60 s
    finally:
        server.kill()
