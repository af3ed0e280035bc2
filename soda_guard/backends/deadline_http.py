"""HTTP requests that end by an absolute deadline whatever the server does, and read a bounded body.

httpx's timeouts are per operation: a server that sends one byte every half second never trips
a read timeout and holds the calling thread as long as it likes. Closing the response from a
timer does not help either: a read already blocked on the socket keeps waiting for its own
timeout (measured: a close at 0.5 s freed the thread at the 10 s read timeout). So every
operation of a request (connect, TLS handshake, each write, each read, the wait for a pooled
connection) gets what is left of the request's deadline as its timeout: the last one ends when
the deadline passes and the thread is free again. This uses httpcore's public network-backend
interface (httpcore is the engine under httpx), wrapping its default sync backend rather than
touching sockets.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import httpcore

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("soda_guard_http_deadline", default=None)

#: what a failed request raises when the cause is the connection, not the server's answer
CONNECTION_LOST = (httpcore.ConnectError, httpcore.ConnectTimeout, httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)


class BodyTooLarge(Exception):
    """The server's reply is longer than the client agreed to read."""


@contextlib.contextmanager
def deadline(at: float) -> Iterator[None]:
    """Every network operation of this thread inside the block ends by `at` (time.monotonic)."""
    token = _deadline.set(at)
    try:
        yield
    finally:
        _deadline.reset(token)


def _left(timeout: float | None, expired: type[httpcore.TimeoutException]) -> float | None:
    at = _deadline.get()
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise expired("the request's deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, stream: httpcore.NetworkStream) -> None:
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _left(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.NetworkStream:
        return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)))

    def get_extra_info(self, info: str) -> Any:
        return self._stream.get_extra_info(info)


class DeadlineNetwork(httpcore.NetworkBackend):
    """httpcore's sync backend with every operation cut off at the calling thread's deadline."""

    def __init__(self, backend: httpcore.NetworkBackend | None = None) -> None:
        self._backend = backend or httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._backend.connect_tcp(host, port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options)
        return _DeadlineStream(stream)

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        return _DeadlineStream(self._backend.connect_unix_socket(path, _left(timeout, httpcore.ConnectTimeout), socket_options))

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


class DeadlineClient:
    """One keep-alive connection pool shared by threads; each request ends by its own deadline
    and reads at most `max_body_bytes` of the reply, so neither a slow nor an endless reply can
    hold a thread or fill memory."""

    def __init__(self, *, max_connections: int, max_body_bytes: int, headers: dict[str, str] | None = None) -> None:
        self.max_body_bytes = max_body_bytes
        self._headers = [(b"content-type", b"application/json")]
        self._headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self._pool = httpcore.ConnectionPool(
            max_connections=max_connections, max_keepalive_connections=max_connections, network_backend=DeadlineNetwork()
        )

    def post_json(self, url: str, body: Any, *, until: float) -> Reply:
        """Raises httpcore's errors (a timeout once `until`, time.monotonic, passes) and
        `BodyTooLarge`."""
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        with deadline(until):
            left = _left(None, httpcore.PoolTimeout)
            extensions = {"timeout": {"pool": left}}
            with self._pool.stream("POST", url, headers=self._headers, content=content, extensions=extensions) as response:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                return Reply(response.status, headers, self._read(response, headers))

    def _read(self, response: httpcore.Response, headers: dict[str, str]) -> bytes:
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise BodyTooLarge(f"the reply declares {declared} bytes, over the {self.max_body_bytes}-byte limit")
        chunks: list[bytes] = []
        size = 0
        for chunk in response.iter_stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge(f"the reply is longer than the {self.max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._pool.close()
