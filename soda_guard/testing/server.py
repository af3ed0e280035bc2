"""An OpenAI chat-completions server over any Backend, on loopback, for tests and benchmarks.

It exists so the HTTP backend is tested against a real socket, a real HTTP stack and a real
model rather than a mock: `create_app` serves a backend (a transformers judge gets true token
logprobs from its own logits), `ScriptedHTTPApp` answers from a script to inject faults, and
`LoopbackServer` runs either under uvicorn on 127.0.0.1 in a thread, including a `kill()` that
drops every open connection the way a crashing server would. It is not a serving engine: use
vLLM or SGLang for that. It needs FastAPI and uvicorn, which the runtime does not: install the
`testing` extra (`pip install soda-guard[testing]`); `python -m soda_guard.testing.server` runs it.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from soda_guard._extras import needs_extra

with needs_extra("soda_guard.testing.server (the loopback judge server)"):
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

from soda_guard.backends.base import Backend, GenerationRequest
from soda_guard.chat_tokens import token_bytes

MAX_TOP_LOGPROBS = 20
LOOPBACK = "127.0.0.1"


@dataclass
class ServerStats:
    """What a test asserts about the traffic a server saw."""

    served: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    def enter(self, body: dict[str, Any], headers: dict[str, str]) -> int:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        self.bodies.append(body)
        self.headers.append(headers)
        self.served += 1
        return self.served - 1

    def leave(self) -> None:
        self.in_flight -= 1


@dataclass
class Completion:
    text: str
    tokens: list[dict[str, Any]] | None
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str


def _entry(token: bytes, logprob: float) -> dict[str, Any]:
    return {"token": token.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(token)}


class ModelCompleter:
    """Greedy decoding straight on a transformers backend's model and tokenizer, keeping the
    per-step logits that `TransformersBackend.generate` does not expose. It decodes the way that
    backend does (same chat encoding, same stop tokens), which is exactly what the parity test
    between the two backends checks."""

    def __init__(self, backend: Any) -> None:
        self.model = backend.model
        self.tokenizer = backend.tokenizer
        self.device = getattr(backend, "device", "cpu")
        self._lock = threading.Lock()

    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.convert_tokens_to_ids("<|im_end|>"), self.tokenizer.eos_token_id}
        configured = self.model.generation_config.eos_token_id
        ids.update(configured if isinstance(configured, list) else [configured])
        return sorted(i for i in ids if isinstance(i, int) and i >= 0)

    def complete(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int | None) -> Completion:
        import torch

        from soda_guard.chat_tokens import encode_chat

        with self._lock, torch.inference_mode():
            prompt_ids = encode_chat(self.tokenizer, messages)
            input_ids = torch.tensor([prompt_ids], device=self.device)
            eos = self._eos_ids()
            output: Any = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                eos_token_id=eos,
                pad_token_id=self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos[0],
                output_logits=True,
                return_dict_in_generate=True,
            )
        generated = output.sequences[0, len(prompt_ids) :].tolist()
        finish = "length"
        while generated and generated[-1] in eos:
            generated.pop()
            finish = "stop"
        tokens = None
        if top_logprobs is not None:
            tokens = []
            for step, token_id in enumerate(generated):
                logprobs = torch.log_softmax(output.logits[step][0].float(), dim=-1)
                entry = _entry(token_bytes(self.tokenizer, token_id), float(logprobs[token_id]))
                values, ids = torch.topk(logprobs, k=min(top_logprobs, logprobs.shape[-1]))
                entry["top_logprobs"] = [
                    _entry(token_bytes(self.tokenizer, int(i)), float(v)) for v, i in zip(values, ids)
                ]
                tokens.append(entry)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return Completion(text, tokens, len(prompt_ids), len(generated), finish)


_WORDS = re.compile(r"\s+|\w+|[^\w\s]")


async def _backend_completion(
    backend: Backend, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int | None
) -> Completion:
    """A backend without a model (the scripted one) has no distribution: its words are
    reported as tokens the model was certain of."""
    result = (await backend.agenerate([GenerationRequest(messages=messages, max_new_tokens=max_tokens)]))[0]
    tokens = None
    if top_logprobs is not None:
        tokens = []
        for word in _WORDS.findall(result.text):
            entry = _entry(word.encode("utf-8"), 0.0)
            entry["top_logprobs"] = [_entry(word.encode("utf-8"), 0.0)][:top_logprobs]
            tokens.append(entry)
    generated = result.generated_tokens if result.generated_tokens is not None else len(_WORDS.findall(result.text))
    return Completion(result.text, tokens, result.prompt_tokens or 0, generated, "stop")


class BadRequest(Exception):
    pass


def _validated(body: Any) -> tuple[list[dict[str, str]], int, int | None]:
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise BadRequest("messages must be a non-empty list of {role, content} with string content")
    if body.get("temperature", 1) != 0:
        raise BadRequest("this server decodes greedily only: temperature must be 0")
    max_tokens = body.get("max_tokens", 128)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest("max_tokens must be a positive integer")
    top: int | None = None
    if body.get("logprobs"):
        top = body.get("top_logprobs", 0)
        if not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"top_logprobs must be an integer within 0..{MAX_TOP_LOGPROBS}")
    return [{"role": m["role"], "content": m["content"]} for m in messages], max_tokens, top


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def create_app(backend: Backend, *, model_id: str | None = None) -> FastAPI:
    """`POST /v1/chat/completions` (greedy, optional logprobs) and `GET /v1/models` over
    `backend`; `app.state.stats` counts the traffic."""
    app = FastAPI()
    served_model = model_id or backend.model_id
    stats = ServerStats()
    app.state.stats = stats
    completer = ModelCompleter(backend) if hasattr(backend, "model") and hasattr(backend, "tokenizer") else None

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": served_model, "object": "model", "owned_by": "soda-guard"}]}

    async def chat_completions(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
            messages, max_tokens, top = _validated(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "the body is not valid JSON")
        except BadRequest as error:
            return _error(400, str(error))
        if body.get("model") != served_model:
            return _error(404, f"model {body.get('model')!r} is not served here (serving {served_model!r})")
        stats.enter(body, dict(request.headers))
        try:
            if completer is not None:
                done = await asyncio.to_thread(completer.complete, messages, max_tokens, top)
            else:
                done = await _backend_completion(backend, messages, max_tokens, top)
        finally:
            stats.leave()
        generated = done.generated_tokens
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": served_model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": done.text},
                        "logprobs": {"content": done.tokens} if done.tokens is not None else None,
                        "finish_reason": done.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": generated,
                    "total_tokens": done.prompt_tokens + generated,
                },
            }
        )

    # a plain Starlette route: FastAPI's parameter resolution is per-request cost that a
    # benchmark of the client would otherwise charge to the client
    app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


@dataclass
class Reply:
    """One scripted answer: a status, a body (a dict is sent as JSON, naming the model the
    request asked for unless it names its own; bytes as they are), how long to wait before
    answering, and `trickle_s`: send the body one byte at a time this far apart (a server that
    never trips a read timeout), until it is sent or the client hangs up."""

    status: int = 200
    body: dict[str, Any] | bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    trickle_s: float = 0.0


def chat_reply(text: str, *, logprobs: list[dict[str, Any]] | None = None) -> Reply:
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    return Reply(body={"object": "chat.completion", "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})


Script = Callable[[int, dict[str, Any]], Reply | Awaitable[Reply]]


class ScriptedHTTPApp:
    """A bare ASGI app that answers request number n (from 0) with `script(n, body)`, for
    injecting the faults a real server produces: errors, slowness, rate limits, bad bodies."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.stats = ServerStats()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] != "POST":  # the script answers completions; a model listing finds none
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = {"unparsed": raw.decode("utf-8", errors="replace")}
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        index = self.stats.enter(body, headers)
        try:
            reply = self.script(index, body)
            if not isinstance(reply, Reply):
                reply = await reply
            if reply.delay_s:
                await asyncio.sleep(reply.delay_s)
        finally:
            self.stats.leave()
        payload = json.dumps({"model": body.get("model"), **reply.body}).encode() if isinstance(reply.body, dict) else reply.body
        content_type = "application/json" if isinstance(reply.body, dict) else "text/plain"
        header_list = [(b"content-type", content_type.encode()), (b"content-length", str(len(payload)).encode())]
        header_list += [(k.encode(), v.encode()) for k, v in reply.headers.items()]
        await send({"type": "http.response.start", "status": reply.status, "headers": header_list})
        if reply.trickle_s:
            await _trickle(payload, reply.trickle_s, receive, send)
        else:
            await send({"type": "http.response.body", "body": payload})


async def _trickle(payload: bytes, every_s: float, receive: Callable[..., Any], send: Callable[..., Any]) -> None:
    """Waiting for the client's disconnect is the pause between bytes, so a trickle stops as
    soon as the client gives up instead of holding the server's shutdown."""
    for index in range(len(payload)):
        last = index == len(payload) - 1
        await send({"type": "http.response.body", "body": payload[index : index + 1], "more_body": not last})
        if last:
            return
        try:
            message = await asyncio.wait_for(receive(), timeout=every_s)
        except asyncio.TimeoutError:
            continue
        if message.get("type") == "http.disconnect":
            return


class LoopbackServer:
    """uvicorn on 127.0.0.1 at a free port, in a daemon thread; `stop()` shuts down cleanly,
    `kill()` closes the listening socket and resets every open connection at once."""

    def __init__(self, app: Any, *, start_timeout_s: float = 10.0) -> None:
        self.app = app
        self.start_timeout_s = start_timeout_s
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: without it the response's headers and body, written
        # separately, meet Nagle and delayed ACK and every small reply waits ~40 ms
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.bind((LOOPBACK, 0))
        self.port: int = self._sock.getsockname()[1]
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", loop="asyncio", http="h11")
        self.server = uvicorn.Server(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/v1"

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.server.serve(sockets=[self._sock])

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name=f"loopback-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"loopback server on port {self.port} did not start")
            time.sleep(0.005)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=self.start_timeout_s)

    def kill(self) -> None:
        def drop_everything() -> None:
            for listener in self.server.servers:
                listener.close()
            for connection in list(self.server.server_state.connections):
                transport = getattr(connection, "transport", None)
                if transport is not None:
                    transport.abort()
            self.server.force_exit = True
            self.server.should_exit = True

        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(drop_everything)
        self.stop()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """`python -m soda_guard.testing.server [--model DIR]`: serve on a free loopback port in its
    own process (so a benchmark's client and server do not share one GIL), print
    `port <n>` once listening, and exit when stdin closes."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", help="a transformers judge folder; default: a scripted SODA judge")
    parser.add_argument("--unsafe", default=r"transfer_money", help="scripted judge: regex that makes a call UNSAFE")
    args = parser.parse_args(argv)
    if args.model:
        from soda_guard.backends.transformers_backend import TransformersBackend

        backend: Backend = TransformersBackend(args.model, device="cpu", dtype="float32")
    else:
        from soda_guard.backends.scripted import ScriptedBackend, keyword_responder

        backend = ScriptedBackend(keyword_responder([args.unsafe]))
    server = LoopbackServer(create_app(backend)).start()
    print(f"port {server.port}", flush=True)
    sys.stdin.read()
    server.stop()


if __name__ == "__main__":
    main()
