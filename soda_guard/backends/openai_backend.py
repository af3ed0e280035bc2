"""A judge served elsewhere (vLLM, SGLang, any OpenAI-compatible server), reached over HTTP.

The request is the judge's exact messages, greedy, with token logprobs so the verdict score is
read the way the in-process backend reads it: at the token that follows the judge's marker, the
probability of the unsafe label's first tokens over that of every label's first tokens. A server
that returns no logprobs still gets a usable score from the label it wrote, and the result says
so (`score_source="label"`), so a threshold is never silently applied to a made-up number.

Every judgment of every caller (sync or async, any thread, any event loop) runs on one of
`max_concurrency` worker threads per server sharing one keep-alive connection pool: one
concurrency bound and one view of the servers' health serve a whole process, and no caller's
event loop is blocked or needed. No server may hold more than `max_concurrency` judgments at
once, so a hanging server holds its own share of the workers and never the good servers'. Sync rather than `httpx.AsyncClient` on a private loop: on loopback that round trip
was 2.45 ms against 1.6 ms (benchmarks/RESULTS.md), and the worker pool bounds concurrency by
itself. The judgment's deadline (the request's own, shortened by `timeout_s`) bounds every
network operation of every attempt (`deadline_http`), so a hanging or trickling server frees its
worker when the deadline passes, and a caller that stops waiting earlier aborts the request.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import httpcore

from soda_guard.backends.deadline_http import CONNECTION_LOST, Aborted, BodyTooLarge, DeadlineClient, Reply
from soda_guard.backends.prefill import LatestPerKey
from soda_guard.backends.server_pool import Server, ServerPool
from soda_guard.backends.waiting import await_all, wait_all
from soda_guard.errors import JudgeError
from soda_guard.generation import GenerationRequest, GenerationResult, ScoreSpec
from soda_guard.policy import DEFAULT_MAX_RESPONSE_BYTES, MAX_TIMEOUT_S
from soda_guard.score import decode_pieces, label_token, label_value
from soda_guard.served_models import mismatch, model_ids

#: the most alternatives OpenAI's API (and vLLM's default `--max-logprobs`) allows per token
MAX_TOP_LOGPROBS = 20

#: the longest look at `GET /models` after a refusal (within the judgment's deadline too)
MODEL_NOTE_MAX_S = 2.0

#: how long a caller waits past the deadline for the worker's own account of the timeout (which
#: names the last failure) before reporting a bare timeout
DEADLINE_GRACE_S = 0.25


_started: weakref.WeakSet[OpenAIBackend] = weakref.WeakSet()
_exit_hook = threading.Lock()
_exit_hook_set = False


def _abandon_all() -> None:
    for backend in list(_started):
        backend.abandon_pending()


def _after_fork() -> None:
    for backend in list(_started):
        backend.forget_parent()


os.register_at_fork(after_in_child=_after_fork)


def _on_exit() -> None:
    """At interpreter exit, before the executors' own hook joins their workers, abandon every
    judgment still pending, so the workers end within a read slice instead of at a deadline up
    to an hour away. `threading._register_atexit` is what `concurrent.futures` itself uses to
    join its workers; its hooks run last-registered first, and this one is registered after
    that module's (plain `atexit` would run after the join)."""
    global _exit_hook_set
    with _exit_hook:
        if not _exit_hook_set:
            register = getattr(threading, "_register_atexit", None)
            if register is not None:
                register(_abandon_all)
            _exit_hook_set = True


class _Retryable(Exception):
    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OpenAIBackend:
    """Judge servers speaking `POST /v1/chat/completions`.

    A judgment ends by its request's `deadline` (the guard's check deadline), and at the latest
    `timeout_s` after the call, queueing for a worker and every retry included: `timeout_s` can
    only shorten the caller's deadline. `max_concurrency` is per server.
    Retries (with jittered exponential backoff, or the server's `Retry-After`) happen only where
    sending the same judgment again can help: the connection failed or dropped, 429, or 5xx.
    Judging has no side effects, so a request lost with a dying server is safe to resend to
    another. Any other failure raises `JudgeError` at once, naming the server and the cause;
    so does a reply longer than `max_response_bytes`, without reading the rest of it, and a
    reply whose `model` is not the judge's (`_check_model`).
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        base_urls: Sequence[str] | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        timeout_s: float = 30.0,
        max_concurrency: int = 16,
        retries: int = 2,
        top_logprobs: int = MAX_TOP_LOGPROBS,
        backoff_s: float = 0.05,
        cooldown_s: float = 5.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        warm_up: bool = False,
        reply_models: Sequence[str] = (),
    ) -> None:
        urls = list(base_urls or []) + ([base_url] if base_url else [])
        if not urls:
            raise ValueError("OpenAIBackend needs base_url or base_urls")
        if max_concurrency < 1 or retries < 0 or max_response_bytes < 1:
            raise ValueError("max_concurrency must be >= 1, retries >= 0 and max_response_bytes >= 1")
        if not 0 < timeout_s <= MAX_TIMEOUT_S:  # also false for nan
            raise ValueError(f"timeout_s must be within (0, {MAX_TIMEOUT_S:g}], not {timeout_s!r}")
        if not (0 <= backoff_s <= MAX_TIMEOUT_S and 0 <= cooldown_s <= MAX_TIMEOUT_S):
            raise ValueError(f"backoff_s and cooldown_s must be within [0, {MAX_TIMEOUT_S:g}]")
        if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be within 0..{MAX_TOP_LOGPROBS}")
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if api_key is None:
                raise JudgeError(f"the judge server's API key variable {api_key_env!r} (api_key_env) is not set")
        self.model_id = model
        # `transformers serve` answers a Hub id asked without a revision as `id@main`
        self.judge_names = frozenset({model, *reply_models, *([] if "@" in model else [f"{model}@main"])})
        """The names a reply's `model` may give and still be the judge's."""
        self.timeout_s = timeout_s
        self.warm_up = warm_up
        self._warming = LatestPerKey()
        self.max_concurrency = max_concurrency
        self.retries = retries
        self.top_logprobs = top_logprobs
        self.backoff_s = backoff_s
        self.max_response_bytes = max_response_bytes
        self.pool = ServerPool(urls, cooldown_s=cooldown_s, max_outstanding=max_concurrency)
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._lock = threading.Lock()
        self._warm_lock = threading.Lock()
        self._client: DeadlineClient | None = None
        self._workers: ThreadPoolExecutor | None = None
        self._in_flight = 0
        self._pending: dict[Future[GenerationResult], GenerationRequest] = {}
        self.max_overrun_s = 0.0
        """The longest any worker has gone on past its judgment's deadline: what `timeout_s`
        fails to bound (scheduling only, when the deadlines hold)."""

    def forget_parent(self) -> None:
        """In a forked child: the parent's workers do not exist here, its keep-alive sockets
        are the parent's too (two processes reading one connection would take each other's
        replies), and its counts of work in flight are not this process's. Rebuilt on first use."""
        self._lock, self._warm_lock = threading.Lock(), threading.Lock()
        self._client, self._workers = None, None
        self._in_flight = 0
        self._pending = {}
        self._warming = LatestPerKey()
        self.pool.forget_outstanding()

    @property
    def in_flight(self) -> int:
        """Judgments occupying a worker now; `max_concurrency` of them means a new one queues."""
        return self._in_flight

    def _ensure(self) -> tuple[DeadlineClient, ThreadPoolExecutor]:
        """Started on first use and again after `close`, so a closed backend can be reused."""
        with self._lock:
            if self._client is None or self._workers is None:
                # per server, so that every worker holding a server at its cap leaves the others theirs
                workers = self.max_concurrency * len(self.pool.servers)
                self._client = DeadlineClient(max_connections=workers, max_body_bytes=self.max_response_bytes, headers=self._headers)
                self._workers = ThreadPoolExecutor(workers, thread_name_prefix=f"soda-guard-http-{self.model_id}")
                _started.add(self)
                _on_exit()
            return self._client, self._workers

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": request.messages,
            "temperature": 0,
            "max_tokens": request.max_new_tokens,
        }
        if request.score is not None and self.top_logprobs:
            body["logprobs"] = True
            body["top_logprobs"] = self.top_logprobs
        return body

    def _send(self, client: DeadlineClient, server: Server, body: dict[str, Any], deadline: float, request: GenerationRequest) -> Any:
        url = f"{server.base_url}/chat/completions"
        try:
            response = client.post_json(url, body, until=deadline, abort=request.cancelled)
        except Aborted as error:
            raise JudgeError(f"judgment abandoned by its caller while waiting on {url}") from error
        except CONNECTION_LOST as error:
            self.pool.failed(server)
            if isinstance(error, httpcore.ConnectTimeout) and time.monotonic() >= deadline:
                raise TimeoutError(f"{url}: {type(error).__name__} (connect, name lookup or TLS handshake)") from error
            raise _Retryable(f"{url}: {type(error).__name__}: {error or 'connection lost'}") from error
        except httpcore.TimeoutException as error:
            if not isinstance(error, httpcore.PoolTimeout):  # no answer by the deadline: the next ones go elsewhere
                self.pool.failed(server)
            raise TimeoutError(f"{url}: {type(error).__name__}") from error
        except BodyTooLarge as error:
            raise JudgeError(f"judge server {url} failed: {error}") from error
        except httpcore.ConnectionNotAvailable as error:
            raise _Retryable(f"{url}: {type(error).__name__}") from error
        except (httpcore.ProtocolError, httpcore.NetworkError, httpcore.UnsupportedProtocol, httpcore.ProxyError) as error:
            raise JudgeError(f"judge server {url} failed: {type(error).__name__}: {error}") from error
        if response.status != 200:
            detail = f"{url}: HTTP {response.status}: {_text(response)[:300]}"
            if response.status == 429:
                raise _Retryable(detail, retry_after=_retry_after(response))
            if response.status >= 500:
                self.pool.failed(server)
                raise _Retryable(detail)
            raise JudgeError(f"judge server refused the request: {detail}{self._model_note(client, server, deadline, request)}")
        self.pool.succeeded(server)
        try:
            payload = json.loads(response.body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
            raise JudgeError(f"judge server {url} returned a body that is not JSON (or nested past reading): {_text(response)[:300]!r}") from error
        if isinstance(payload, dict):  # anything else is no chat completion, as parse_completion says
            self._check_model(payload.get("model"), server, url)
        return payload

    def _check_model(self, answered: Any, server: Server, url: str) -> None:
        """A reply is the judge's only where its `model` says so: a URL that reaches a server of
        another model (a misconfiguration, a load balancer's pool, a hostile proxy) would have
        a chat model's "[Verdict] SAFE" taken as the judge's verdict. A reply naming no model
        cannot say so either. The server is then failing as a judge, and cools down like one."""
        if isinstance(answered, str) and answered in self.judge_names:
            return
        self.pool.failed(server)
        said = f"as model {answered[:200]!r}" if isinstance(answered, str) else "without naming its model"
        raise JudgeError(
            f"judge server {url} answered {said}, not as the judge's model {self.model_id!r}: its answer is not "
            "the judge's verdict (if that server does serve the judge under that name, list it in `reply_models`)"
        )

    def _model_note(self, client: DeadlineClient, server: Server, deadline: float, request: GenerationRequest) -> str:
        """A refused request most often names a model the server does not serve; one look at
        `GET /models`, within the judgment's own deadline, abort and size limit (a server that
        refuses may trickle this reply too), turns that into both names."""
        url = f"{server.base_url}/models"
        try:
            reply = client.get(url, until=min(deadline, time.monotonic() + MODEL_NOTE_MAX_S), abort=request.cancelled)
            served = model_ids(url, reply.status, reply.body)
        except Exception:  # the note is a courtesy: whatever keeps it from being read, the refusal stands
            return ""
        note = mismatch(self.model_id, served)
        return f" ({note})" if note else ""

    def _judge(self, client: DeadlineClient, request: GenerationRequest, deadline: float, budget: float) -> GenerationResult:
        """One judgment on a worker thread, retries included, ending by `deadline` (monotonic);
        `budget` is the seconds it was given, for the message."""
        started = time.monotonic()
        with self._lock:
            self._in_flight += 1
        try:
            if request.cancelled.is_set():
                raise JudgeError("judgment abandoned by its caller before it was sent")
            return self._attempts(client, request, deadline, budget)
        finally:
            overrun = time.monotonic() - max(started, deadline)
            with self._lock:
                self._in_flight -= 1
                self.max_overrun_s = max(self.max_overrun_s, overrun)

    def _attempts(self, client: DeadlineClient, request: GenerationRequest, deadline: float, budget: float) -> GenerationResult:
        body = self.body(request)
        attempts = 0
        last: _Retryable | None = None
        avoid: Server | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timed_out(budget, attempts, last)
            attempts += 1
            server = self.pool.checkout(request.cache_key, avoid=avoid)
            try:
                payload = self._send(client, server, body, deadline, request)
            except _Retryable as error:
                last, avoid = error, server
                if attempts > self.retries:
                    raise JudgeError(f"judge server failed after {attempts} attempts; last: {error}") from error.__cause__
                left = deadline - time.monotonic()
                if error.retry_after is not None and error.retry_after >= left:
                    raise JudgeError(
                        f"judge server asks to retry after {error.retry_after:g}s, past the judgment's deadline "
                        f"({max(left, 0.0):.3f}s left): {error}"
                    ) from error.__cause__
                if request.cancelled.wait(self._backoff(attempts, error.retry_after, left)):
                    raise JudgeError(f"judgment abandoned by its caller; last: {error}") from None
                continue
            except TimeoutError as error:
                raise self._timed_out(budget, attempts, last) from error
            finally:
                self.pool.checkin(server)
            return parse_completion(payload, request.score, where=server.base_url)

    def _timed_out(self, budget: float, attempts: int | None, last: _Retryable | None) -> JudgeError:
        """`attempts` is None where the caller stopped waiting for a worker still sending."""
        if attempts is None:
            return JudgeError(f"judgment timed out after {round(budget, 3)}s (no answer from the worker by then)")
        cause = f"; last: {last}" if last is not None else ""
        return JudgeError(f"judgment timed out after {round(budget, 3)}s ({attempts} attempt(s){cause})")

    def _backoff(self, attempt: int, retry_after: float | None, remaining: float) -> float:
        delay = retry_after if retry_after is not None else self.backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
        return max(0.0, min(delay, remaining))

    def prefill(self, request: GenerationRequest) -> Future[Any] | None:
        """With `warm_up` on, fire and forget one request for the conversation so far with
        `max_tokens: 1`, which a server with prefix caching (vLLM, SGLang) keeps, so that the
        judgment that follows prefills only what is new; the server is the one the
        conversation sticks to. Never waited for, never retried, its failure ignored; sent only
        while judgments and warm-ups together hold under half the workers, so warm-ups never
        leave a judgment waiting for one; an older warm-up of the conversation still queued is
        cancelled, and so is one its judgment arrives before. None when not sent."""
        if not self.warm_up or request.cache_key is None:
            return None
        client, workers = self._ensure()
        body = {"model": self.model_id, "messages": request.messages, "temperature": 0, "max_tokens": 1}
        with self._warm_lock:  # counted and registered at once: concurrent warm-ups see each other
            busy = self._in_flight + len(self._warming)  # judgments and warm-ups holding or awaiting a worker
            if (busy + 1) * 2 > self.max_concurrency:  # with this one, at most half the workers (none of one)
                return None
            future = workers.submit(self._warm, client, request, body, time.monotonic() + self.timeout_s)
            self._warming.replace(request.cache_key, future)
        return future

    def _warm(self, client: DeadlineClient, request: GenerationRequest, body: dict[str, Any], deadline: float) -> None:
        server = self.pool.checkout(request.cache_key)
        try:
            self._send(client, server, body, deadline, request)
        except Exception:  # noqa: BLE001 - a failed warm-up only leaves the judgment to prefill it all
            pass
        finally:
            self.pool.checkin(server)

    def _deadline(self, request: GenerationRequest, now: float) -> float:
        own = now + self.timeout_s
        return own if request.deadline is None else min(own, request.deadline)

    def _submit(self, requests: Sequence[GenerationRequest]) -> tuple[list[Future[GenerationResult]], float, float]:
        now = time.monotonic()
        deadlines = [self._deadline(request, now) for request in requests]
        client, workers = self._ensure()
        for request in requests:  # the judgment prefills what a warm-up still queued would have
            if request.cache_key is not None:
                self._warming.cancel(request.cache_key)
        futures = [
            workers.submit(self._judge, client, request, at, at - now) for request, at in zip(requests, deadlines)
        ]
        with self._lock:
            self._pending.update(zip(futures, requests))
        for future in futures:
            future.add_done_callback(self._settled)
        last = max(deadlines, default=now)
        return futures, last, last - now

    def _settled(self, future: Future[GenerationResult]) -> None:
        with self._lock:
            self._pending.pop(future, None)

    def abandon_pending(self) -> None:
        """Abandon every judgment queued or in flight (their callers get `JudgeError`)."""
        with self._lock:
            pending = list(self._pending.values())
        for request in pending:
            request.abandon()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """All or nothing: the first failure abandons the batch's other judgments (queued ones
        never start, sent ones are aborted), since the caller applies its failure action to the
        whole batch anyway."""
        futures, deadline, budget = self._submit(requests)
        try:
            return wait_all(futures, requests, deadline + DEADLINE_GRACE_S)
        except TimeoutError:
            raise self._timed_out(budget, None, None) from None

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Cancelling the awaiting task abandons the judgments the same way."""
        futures, deadline, budget = self._submit(requests)
        try:
            return await await_all(futures, requests, deadline + DEADLINE_GRACE_S)
        except TimeoutError:
            raise self._timed_out(budget, None, None) from None

    def close(self) -> None:
        """Waits for judgments in flight, then closes the connections; idempotent."""
        with self._lock:
            client, workers = self._client, self._workers
            self._client = self._workers = None
        if workers is not None:
            workers.shutdown(wait=True, cancel_futures=True)
        if client is not None:
            client.close()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> OpenAIBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _text(response: Reply) -> str:
    return response.body.decode("utf-8", errors="replace")


def _retry_after(response: Reply) -> float | None:
    value = response.headers.get("retry-after")
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) else None


def parse_completion(payload: Any, spec: ScoreSpec | None, *, where: str = "judge server") -> GenerationResult:
    """A chat-completion body → GenerationResult; anything not shaped like one is a JudgeError,
    because a guessed verdict is worse than a reported failure."""
    try:
        choice = payload["choices"][0]
        text = choice["message"].get("content") or ""
        if not isinstance(text, str):
            raise TypeError(f"message content is {type(text).__name__}")
        logprobs = choice.get("logprobs") or {}
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        usage = payload.get("usage") or {}
        usage = usage if isinstance(usage, dict) else {}  # advisory counts: a malformed one is dropped
    except (KeyError, IndexError, TypeError, AttributeError) as error:
        raise JudgeError(f"{where} returned JSON that is not a chat completion: {str(payload)[:300]}") from error
    score, source = None, None
    if spec is not None:
        if content:
            try:
                score, source = score_from_logprobs(content, spec), "logprobs"
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                raise JudgeError(f"{where} returned malformed logprobs: {error}") from error
        else:
            score, source = score_from_label(text, spec), "label"
    return GenerationResult(
        text=text,
        score=score,
        prompt_tokens=usage.get("prompt_tokens"),
        generated_tokens=usage.get("completion_tokens"),
        score_source=source if score is not None else None,
        finish_reason=choice.get("finish_reason") if isinstance(choice.get("finish_reason"), str) else None,
    )


def _token_bytes(entry: dict[str, Any]) -> bytes:
    """Servers give each token's exact bytes where its text alone would be a partial UTF-8
    character; the bytes are what concatenate back into the generated text."""
    raw = entry.get("bytes")
    if isinstance(raw, list):
        return bytes(raw)
    return str(entry["token"]).encode("utf-8")


def verdict_index(content: Sequence[dict[str, Any]], spec: ScoreSpec) -> tuple[int, bool] | None:
    """Index of the returned token that carries the label the judge's parser accepted, and
    whether the text before it ends in whitespace: the rule every backend applies
    (`soda_guard.score.label_token`), on the returned tokens' exact bytes."""
    return label_token(decode_pieces(_token_bytes(entry) for entry in content), spec)


def _label_side(token: bytes, positive: Sequence[bytes], negative: Sequence[bytes], any_case: bool) -> int:
    """+1 / -1 when the token can begin only a positive / only a negative label, else 0.

    Without the server's tokenizer the label words' first tokens are not known by id; a
    returned token that is a non-empty prefix of a label word is one of them (in any casing
    when the parser accepts any: each casing is its own token, and all are summed). A token
    that could begin either side (a lone space) says nothing, as in the in-process rule."""
    if not token:
        return 0
    if any_case:
        token = token.lower()
    pos = any(word.startswith(token) for word in positive)
    neg = any(word.startswith(token) for word in negative)
    return (1 if pos else 0) - (1 if neg else 0)


def score_from_logprobs(content: Sequence[dict[str, Any]], spec: ScoreSpec) -> float | None:
    position = verdict_index(content, spec)
    if position is None:
        return None
    index, ends_in_space = position
    lead = "" if ends_in_space else " "
    fold = str.lower if spec.any_case else str
    positive = [fold(lead + w).encode("utf-8") for w in spec.positive]
    negative = [fold(lead + w).encode("utf-8") for w in spec.negative]
    entry = content[index]
    alternatives = list(entry.get("top_logprobs") or []) or [entry]
    seen: set[bytes] = set()
    mass = {1: 0.0, -1: 0.0}
    for alternative in alternatives:
        token = _token_bytes(alternative)
        side = _label_side(token, positive, negative, spec.any_case)
        if side and token not in seen:
            seen.add(token)
            mass[side] += _probability(alternative["logprob"])
    total = mass[1] + mass[-1]
    return mass[1] / total if total > 0 else None


def _probability(logprob: Any) -> float:
    value = float(logprob)
    if math.isnan(value) or value > 1e-6:
        raise ValueError(f"logprob {logprob!r} is not a log-probability")
    return math.exp(value)


def score_from_label(text: str, spec: ScoreSpec) -> float | None:
    """1.0 / 0.0 from the label the parser accepted; None when there is none."""
    return label_value(text, spec)
