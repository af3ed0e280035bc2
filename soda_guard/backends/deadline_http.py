"""HTTP requests that end by an absolute deadline whatever the server does, and read a bounded body.

httpx's timeouts are per operation: a server that sends one byte every half second never trips
a read timeout and holds the calling thread as long as it likes. Closing the response from a
timer does not help either: a read already blocked on the socket keeps waiting for its own
timeout (measured: a close at 0.5 s freed the thread at the 10 s read timeout). So every
operation of a request (connect, TLS handshake, each write, each read, the wait for a pooled
connection) gets what is left of the request's deadline as its timeout: the last one ends when
the deadline passes and the thread is free again. This uses httpcore's public network-backend
interface (httpcore is the engine under httpx), wrapping its default sync backend.

Three steps that a socket timeout alone does not bound are done here within the deadline too:
name resolution (`getaddrinfo` has no timeout: it runs on a daemon thread the request stops
waiting for, one per name at a time, so a name whose lookups hang holds one of the process's
`MAX_LOOKUPS` slots and the other names keep the rest), the TLS handshake (driven step by step
on a non-blocking socket, so a server that trickles its handshake is cut off like one that
trickles its reply) and a caller's abort (each read waits in short slices and gives up once the
request is abandoned). A stream whose start
fails is closed at once, and one SSL context serves every connection of a client.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import json
import os
import re
import select
import socket
import ssl
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import httpcore
from httpcore._backends.sync import SyncStream

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar("soda_guard_http_deadline", default=None)
_abort: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar("soda_guard_http_abort", default=None)

#: how often a read waiting on the server looks at its request's abort flag
ABORT_POLL_S = 0.05
#: names being looked up at once, process-wide; past it a new lookup waits (within its deadline)
MAX_LOOKUPS = 16
_lookups = threading.BoundedSemaphore(MAX_LOOKUPS)
_running: dict[tuple[str, int], Future[list[tuple[Any, ...]]]] = {}
"""The lookup under way for each (host, port): a caller of that name waits on it rather than
starting another."""
_running_lock = threading.Lock()


def _forget_parent_lookups() -> None:
    """A forked child has none of its parent's lookup threads: a lookup under way at the fork
    would never end there (its name could never be looked up again) and its slot never return."""
    global _lookups, _running_lock
    _lookups, _running_lock = threading.BoundedSemaphore(MAX_LOOKUPS), threading.Lock()
    _running.clear()


os.register_at_fork(after_in_child=_forget_parent_lookups)

#: what a failed request raises when the cause is the connection, not the server's answer
CONNECTION_LOST = (httpcore.ConnectError, httpcore.ConnectTimeout, httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)


class BodyTooLarge(Exception):
    """The server's reply is longer than the client agreed to read."""


class Aborted(httpcore.ReadTimeout):
    """The request was abandoned by its caller before its deadline."""


@contextlib.contextmanager
def deadline(at: float, abort: threading.Event | None = None) -> Iterator[None]:
    """Every network operation of this thread inside the block ends by `at` (time.monotonic),
    or soon after `abort` is set."""
    token, abort_token = _deadline.set(at), _abort.set(abort)
    try:
        yield
    finally:
        _deadline.reset(token)
        _abort.reset(abort_token)


def _aborted() -> bool:
    flag = _abort.get()
    return flag is not None and flag.is_set()


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
        self._reply = bytearray()
        """What was read since the last request was written: the reply to it, and anything after."""
        self._written = False

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = self._read(max_bytes, timeout)
        self._reply += data
        return data

    def _read(self, max_bytes: int, timeout: float | None) -> bytes:
        """In slices of `ABORT_POLL_S` while the request can be aborted: a recv that timed out
        has consumed nothing, so waiting again is safe."""
        while True:
            if _aborted():
                raise Aborted("the request was abandoned by its caller")
            left = _left(timeout, httpcore.ReadTimeout)
            if _abort.get() is None or (left is not None and left <= ABORT_POLL_S):
                return self._stream.read(max_bytes, left)
            try:
                return self._stream.read(max_bytes, ABORT_POLL_S)
            except httpcore.ReadTimeout:
                continue

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._reply.clear()
        self._written = True
        self._stream.write(buffer, _left(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None) -> httpcore.NetworkStream:
        """The handshake as a whole ends by the deadline; the socket is closed if it fails."""
        sock = self._stream.get_extra_info("socket")
        try:
            if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
                return _DeadlineStream(self._stream.start_tls(ssl_context, server_hostname, _left(timeout, httpcore.ConnectTimeout)))
            _left(timeout, httpcore.ConnectTimeout)
            tls = ssl_context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
        except BaseException:
            self.close()
            raise
        try:
            _handshake(tls, timeout)
        except BaseException:
            tls.close()
            raise
        return _DeadlineStream(SyncStream(tls))

    def get_extra_info(self, info: str) -> Any:
        """An idle connection the pool asks about (`is_readable`: has the server closed it?) is
        also done with when more came than one reply: a server or proxy that sent a stray second
        answer in the same write left it in the HTTP parser's buffer, where the next request on
        the connection would read it as its own (every later verdict one judgment late)."""
        if info == "is_readable" and self._written and _past_one_reply(self._reply):
            return True
        return self._stream.get_extra_info(info)


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS = re.compile(rb"HTTP/\d(?:\.\d)?[ \t]+(\d{3})")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]+)[^\r\n]*\r?\n")
_LINE_END = re.compile(rb"\r?\n")


def _past_one_reply(data: bytes | bytearray) -> bool:
    """Whether `data`, what a connection read for one request (asked only once the HTTP parser
    has read the whole reply), holds more than that reply: bytes after the end its
    `Content-Length` or chunked encoding gives, past any interim 1xx replies, with the bare-LF
    line ends a lenient parser accepts too. What cannot be read so counts as more: the
    connection is closed and the next judgment opens another, which costs a connect, where
    reading a stray reply costs a verdict."""
    if not data:  # nothing read for the request written: its reply came from an earlier read
        return True
    start = 0
    while True:
        head_end = _HEAD_END.search(data, start)
        status = _STATUS.match(data, start)
        if head_end is None or status is None:
            return True
        code, body = int(status.group(1)), head_end.end()
        if not 100 <= code < 200:
            break
        start = body
    head = b"\n" + bytes(data[start : head_end.start()]).replace(b"\r\n", b"\n").lower() + b"\n"
    if b"\ntransfer-encoding:" in head:
        if not re.search(rb"\ntransfer-encoding:[^\n]*chunked[ \t]*\n", head):
            return True
        while True:
            size = _CHUNK_SIZE.match(data, body)
            if size is None:
                return True
            length, body = int(size.group(1), 16), size.end()
            if length == 0:
                break
            after = _LINE_END.match(data, body + length)
            if after is None:
                return True
            body = after.end()
        trailers = _HEAD_END.search(b"\n" + bytes(data[body:]))  # no trailers: the empty line at once
        return trailers is None or len(data) != body + trailers.end() - 1
    if code in (204, 304):  # no body, whatever a Content-Length says
        return len(data) != body
    lengths = {value.strip() for line in re.findall(rb"\ncontent-length:([^\n]*)", head) for value in line.split(b",")}
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        return True
    return len(data) != body + int(next(iter(lengths)))


def _handshake(tls: ssl.SSLSocket, timeout: float | None) -> None:
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            readable, writable = [tls], []
        except ssl.SSLWantWriteError:
            readable, writable = [], [tls]
        except (ssl.SSLError, OSError) as error:
            raise httpcore.ConnectError(f"TLS handshake failed: {error}") from error
        if _aborted():
            raise Aborted("the request was abandoned by its caller")
        left = _left(timeout, httpcore.ConnectTimeout)
        select.select(readable, writable, [], min(left, ABORT_POLL_S) if left is not None else ABORT_POLL_S)
    tls.setblocking(True)


def resolve(host: str, port: int, timeout: float | None) -> list[tuple[Any, ...]]:
    """`getaddrinfo` within the deadline: on a daemon thread that the caller stops waiting for
    at the deadline (a lookup cannot be cancelled)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass  # a name, not an address
    else:
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 0, "", (host, port))]
    answer = _lookup(host, port, timeout)
    while True:
        if _aborted():
            raise Aborted("the request was abandoned by its caller")
        left = _left(timeout, httpcore.ConnectTimeout)
        try:
            return answer.result(timeout=min(left, ABORT_POLL_S) if left is not None else ABORT_POLL_S)
        except TimeoutError:
            continue
        except OSError as error:
            raise httpcore.ConnectError(f"cannot resolve {host!r}: {error}") from error


def _lookup(host: str, port: int, timeout: float | None) -> Future[list[tuple[Any, ...]]]:
    """The lookup of (`host`, `port`) under way, else a new one holding one of `MAX_LOOKUPS`
    slots until it ends. One per name: a name whose lookups hang (a dead DNS server for one
    judge) holds one slot however many of its callers time out and try again; were each to
    leave a hung lookup of its own, they would take every slot, and a judge at another host,
    whose lookups answer, would get none."""
    key = (host, port)
    with _running_lock:
        running = _running.get(key)
    if running is not None:
        return running
    left = _left(timeout, httpcore.ConnectTimeout)
    if not _lookups.acquire(timeout=left if left is not None else -1):
        raise httpcore.ConnectTimeout(f"no name lookup slot for {host!r} by the deadline")
    with _running_lock:
        running = _running.get(key)
        if running is not None:  # started while this caller waited for a slot
            _lookups.release()
            return running
        answer: Future[list[tuple[Any, ...]]] = Future()
        _running[key] = answer

    def look_up() -> None:
        try:
            answer.set_result(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as error:  # every caller waiting on it reports it
            answer.set_exception(error)
        finally:
            _ended()

    def _ended() -> None:
        with _running_lock:
            del _running[key]
        _lookups.release()

    try:
        threading.Thread(target=look_up, name="soda-guard-resolve", daemon=True).start()
    except BaseException as error:  # no thread (a pids limit, shutdown): the name must not wait on it for good
        answer.set_exception(error)
        _ended()
        raise
    return answer


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
        failure: Exception = httpcore.ConnectError(f"{host!r} resolved to no address")
        for *_, address in resolve(host, port, timeout):
            try:
                stream = self._backend.connect_tcp(
                    str(address[0]), port, _left(timeout, httpcore.ConnectTimeout), local_address, socket_options
                )
            except httpcore.ConnectError as error:
                failure = error
                continue
            return _DeadlineStream(stream)
        raise failure

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
        # one context for every connection: building one costs ~58 ms of CPU, outside any deadline
        self.ssl_context = httpcore.default_ssl_context()
        self._pool = httpcore.ConnectionPool(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            network_backend=DeadlineNetwork(),
            ssl_context=self.ssl_context,
        )

    def post_json(self, url: str, body: Any, *, until: float, abort: threading.Event | None = None) -> Reply:
        """Raises httpcore's errors (a timeout once `until`, time.monotonic, passes; `Aborted`
        soon after `abort` is set) and `BodyTooLarge`."""
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
        return self._request("POST", url, content, until, abort)

    def get(self, url: str, *, until: float, abort: threading.Event | None = None) -> Reply:
        """`post_json`'s bounds for a GET: the deadline, the abort and the size limit."""
        return self._request("GET", url, None, until, abort)

    def _request(self, method: str, url: str, content: bytes | None, until: float, abort: threading.Event | None) -> Reply:
        with deadline(until, abort):
            left = _left(None, httpcore.PoolTimeout)
            extensions = {"timeout": {"pool": left}}
            with self._pool.stream(method, url, headers=self._headers, content=content, extensions=extensions) as response:
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
