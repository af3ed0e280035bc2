"""The stdio guard proxy: a JSON-RPC relay between one MCP client and the server it starts.

Every line passes through byte for byte (lists, resources, prompts, notifications, progress,
the server's own requests) except `tools/call`: that is judged first and, unless the policy
lets it run, answered here with an `isError` result and never forwarded; an allowed one is
forwarded as parsed and judged. Where the policy moderates tool results, the answers a client
hands its model (a call's result, `READS`) are moderated before they go back. A message with duplicate keys is refused: parsers differ on
which one wins, and the server must not read a method or a tool the proxy did not see. A relay rather than
an SDK proxy because an SDK proxy re-serialises what it passes on (server info, `_meta`,
URIs); a relay cannot change what it does not touch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from soda_guard.binding import args_digest
from soda_guard.guard import Guard
from soda_guard.mcp import jsonrpc
from soda_guard.mcp.jsonrpc import INTERNAL_ERROR, INVALID_PARAMS, INVALID_REQUEST, PARSE_ERROR, REQUEST_TIMEOUT, DuplicateKey, parse
from soda_guard.mcp.pipes import DEFAULT_MAX_MESSAGE_BYTES, TooLong, lines, start_server, stop_server
from soda_guard.mcp.session import CONTEXT_KEY, READS, ContextError, ProxySession, error_result, refusal_result, result_text
from soda_guard.trajectory import ToolCall
from soda_guard.verdict import Action, Decision

#: ids of the proxy's own requests to the client (elicitation): a prefix no SDK numbers with
OWN_ID_PREFIX = "soda-guard-"
#: the key of the proxy's approval question in a 2026-07-28 `input_required` result
APPROVAL_KEY = "soda-guard/approval"
MODERN_VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_KEY = "io.modelcontextprotocol/serverInfo"
APPROVAL_SCHEMA = {
    "type": "object",
    "properties": {"approve": {"type": "boolean", "title": "Run this tool call"}},
    "required": ["approve"],
}

Write = Callable[[bytes], Awaitable[None]]

REMEMBERED = 1024
"""Cancelled calls and task ids held at most (the latest): neither grows without bound."""


def _remember(held: dict[Any, Any], key: Any, value: Any) -> None:
    held[key] = value
    while len(held) > REMEMBERED:
        del held[next(iter(held))]


@dataclass
class RelayOptions:
    server_name: str | None = None
    """The name the policy knows the server by; the server's own `serverInfo.name` otherwise."""
    server_timeout_s: float = 300.0
    """A forwarded request unanswered this long gets an error, and the server a cancellation."""
    review_timeout_s: float = 300.0
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


@dataclass
class _Forwarded:
    method: str
    call: ToolCall | None = None
    done: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    task: bool = False
    """A call the client asked the server to run as a task (its answer is the task, not the result)."""


class Relay:
    """One client session: `client_lines` (what the client sent, line by line) in, `to_client`
    out, `server` the started process."""

    def __init__(self, guard: Guard, server: asyncio.subprocess.Process, to_client: Write, options: RelayOptions) -> None:
        self.guard = guard
        self.server = server
        self.options = options
        self.session = ProxySession(guard, options.server_name)
        self._to_client = to_client
        self._client_lock = asyncio.Lock()
        self._server_lock = asyncio.Lock()
        self._forwarded: dict[Any, _Forwarded] = {}
        self._judging: dict[Any, asyncio.Task[None]] = {}
        self._asked: dict[str, asyncio.Future[Any]] = {}
        self._escalated: dict[str, Decision] = {}
        self._elicits = False
        self._server_gone = False
        self._tasks: dict[str, ToolCall] = {}
        """Calls the server runs as tasks (MCP 2025-11-25), by task id: their results come in
        answers to `tasks/result`."""
        self._cancelled: dict[Any, None] = {}
        """Calls the client cancelled after they were forwarded (the latest `REMEMBERED`)."""

    async def send_client(self, data: bytes) -> None:
        async with self._client_lock:
            await self._to_client(data)

    async def send_server(self, data: bytes) -> None:
        if self._server_gone or self.server.stdin is None:
            raise ConnectionError("the MCP server has exited")
        async with self._server_lock:
            self.server.stdin.write(data)
            await self.server.stdin.drain()

    # client → server

    async def from_client(self, raw: bytes) -> None:
        if len(raw) > self.options.max_message_bytes:
            await self.send_client(jsonrpc.error(None, INVALID_REQUEST, f"message of {len(raw)} bytes exceeds the proxy's limit of {self.options.max_message_bytes}"))
            return
        if not raw.strip():
            return
        try:
            message = parse(raw)
        except DuplicateKey as error:
            await self.send_client(jsonrpc.error(None, INVALID_REQUEST, str(error)))
            return
        except (ValueError, RecursionError) as error:
            await self.send_client(jsonrpc.error(None, PARSE_ERROR, f"parse error: {type(error).__name__}: {error}"))
            return
        if isinstance(message, list):
            await self.send_client(jsonrpc.error(None, INVALID_REQUEST, "JSON-RPC batches are not supported by the guard proxy"))
            return
        if not isinstance(message, dict):
            await self.send_client(jsonrpc.error(None, INVALID_REQUEST, "a JSON-RPC message must be an object"))
            return
        method = message.get("method")
        request_id = message.get("id")
        if method is not None and not isinstance(method, str):
            await self.send_client(jsonrpc.error(request_id if _valid_id(request_id) else None, INVALID_REQUEST, "a JSON-RPC method is a string"))
            return
        if "id" in message and not _valid_id(request_id):
            await self.send_client(jsonrpc.error(None, INVALID_REQUEST, "a JSON-RPC id is a string or a number"))
            return
        if method is None:
            if isinstance(request_id, str) and request_id in self._asked:
                self._asked.pop(request_id).set_result(message)
                return
            await self._forward(raw)
            return
        if "id" in message and self._in_use(request_id):
            # answers are matched to requests by id: two in progress under one id (or under two
            # spellings a client reads as one) could have a call's result go out as the other's
            # answer, past its moderation
            await self.send_client(jsonrpc.error(request_id, INVALID_REQUEST, f"request id {request_id!r} is already in use by a request in progress"))
            return
        if method == "tools/call":
            if "id" not in message:
                return  # a call sent as a notification cannot be answered, and is not run unjudged
            task = asyncio.ensure_future(self._guarded_call(message))
            self._judging[_key(request_id)] = task
            task.add_done_callback(lambda done: self._settled(_key(request_id), done))
            return
        if method == "notifications/cancelled":
            params = message.get("params")
            target = params.get("requestId") if isinstance(params, dict) else None
            forwarded = self._forwarded.get(_key(target))
            if forwarded is not None:
                # the server is told (below) and owes no answer now: stop waiting for one, and
                # an answer it sends all the same goes nowhere (it would pass unmoderated)
                del self._forwarded[_key(target)]
                _remember(self._cancelled, _key(target), None)
                if forwarded.method == "tools/call" and forwarded.call is not None:
                    self.session.record(forwarded.call, None, error="cancelled by the client")
                if not forwarded.done.done():
                    forwarded.done.set_result(None)
            else:
                judging = self._judging.get(_key(target))
                if judging is not None:
                    judging.cancel()  # still being judged: the server never saw it
                    return
        if method == "initialize":
            params = message.get("params")
            capabilities = params.get("capabilities") if isinstance(params, dict) else None
            self._elicits = isinstance(capabilities, dict) and isinstance(capabilities.get("elicitation"), dict)
        if "id" in message:
            self._forwarded[_key(request_id)] = self._tracked(method, request_id, message.get("params"))
        await self._forward(raw, request_id if "id" in message else None)

    def _tracked(self, method: str, request_id: Any, params: Any) -> _Forwarded:
        """Every forwarded request is held until answered, so no other request can take its id.
        A task-augmented call's result comes back in an answer to `tasks/result`, moderated as
        that call's; and where the policy moderates tool results, so is every other answer a
        client hands to its model (a resource's contents, a prompt's messages, the result of a
        task the proxy did not see created) as a call of that method."""
        if method == "tasks/result":
            task = params.get("taskId") if isinstance(params, dict) else None
            call = self._tasks.get(task) if isinstance(task, str) else None
            if call is not None:
                return _Forwarded("tools/call", call)
        if method in READS and self.guard.policy.tool_results is not None:
            return _Forwarded(method, self.session.read_call(request_id, method, params))
        return _Forwarded(method)

    def _settled(self, key: Any, task: asyncio.Task[None] | None = None) -> None:
        """A call's id is free again once it is answered, though its task ends a step later;
        a task that ends after its id was taken again leaves the new call's entry alone."""
        if task is None or self._judging.get(key) is task:
            self._judging.pop(key, None)

    def _in_use(self, request_id: Any) -> bool:
        held = [*self._forwarded, *self._judging]
        if _key(request_id) in held:
            return True
        number = _number(request_id)
        return number is not None and any(_number(_unkey(key)) == number for key in held)

    async def _forward(self, raw: bytes, request_id: Any = None) -> None:
        try:
            await self.send_server(raw if raw.endswith(b"\n") else raw + b"\n")
        except (ConnectionError, OSError) as error:
            self._forwarded.pop(_key(request_id), None)
            if request_id is not None:
                await self.send_client(jsonrpc.error(request_id, INTERNAL_ERROR, f"the MCP server is not running: {error}"))

    async def _guarded_call(self, message: dict[str, Any]) -> None:
        """The call is forwarded as the proxy parsed and judged it (serialised again), never as
        raw bytes another parser might read differently."""
        request_id = message["id"]
        params = message.get("params")
        try:
            if not isinstance(params, dict):
                raise ContextError("tools/call params must be an object")
            await self._server_named()
            call = self.session.call_of(request_id, params)
        except ContextError as error:
            await self.send_client(jsonrpc.error(request_id, INVALID_PARAMS, str(error)))
            return
        escalation = self._escalated.pop(params.get("requestState"), None) if isinstance(params.get("requestState"), str) else None
        if escalation is not None:
            decision = await self._answered(escalation, call, params)
            message = {**message, "params": {k: v for k, v in params.items() if k not in ("requestState", "inputResponses")}}
        else:
            decision = await self.session.decide(call)
            if decision.action is Action.ESCALATE:
                if _modern(params) and _elicits(params):
                    await self._ask_modern(request_id, decision)
                    return
                decision = await self._escalate(decision)
        if not decision.allowed:
            refused = refusal_result(call, decision)
            if _modern(params):
                refused["resultType"] = "complete"
            await self.send_client(jsonrpc.line({"jsonrpc": "2.0", "id": request_id, "result": refused}))
            return
        await self._forward_call(request_id, call, jsonrpc.line(_without_context(message)), isinstance(params.get("task"), dict))

    async def _server_named(self) -> None:
        """The policy's rules name servers (`files:delete_*`, `server:`), so a call is judged
        only once the server is known by name: `--server`, or its answer to `initialize` or
        `server/discover`, waited for when one is on its way (a client need not wait for it
        before calling). A call judged before would miss every rule scoped to the server."""
        if self.session.server is not None:
            return
        naming = [forwarded.done for forwarded in self._forwarded.values() if forwarded.method in ("initialize", "server/discover")]
        if naming:
            await asyncio.wait(naming, timeout=self.options.server_timeout_s)
        if self.session.server is None:
            raise ContextError(
                "soda-guard does not know this MCP server's name yet (it gives it in its answer to initialize or "
                "server/discover), and the policy's rules go by it; call after either, or run the proxy with --server NAME"
            )

    async def _forward_call(self, request_id: Any, call: ToolCall, raw: bytes, task: bool = False) -> None:
        forwarded = _Forwarded("tools/call", call, task=task)
        self._forwarded[_key(request_id)] = forwarded
        await self._forward(raw, request_id)
        try:
            await asyncio.wait_for(asyncio.shield(forwarded.done), self.options.server_timeout_s)
        except asyncio.TimeoutError:
            if self._forwarded.pop(_key(request_id), None) is None:
                return
            self.session.record(call, None, error="timed out")
            with contextlib.suppress(ConnectionError, OSError):
                cancel = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": request_id, "reason": "timed out"}}
                await self.send_server(jsonrpc.line(cancel))
            await self.send_client(jsonrpc.error(request_id, REQUEST_TIMEOUT, f"the MCP server did not answer within {self.options.server_timeout_s}s"))

    @staticmethod
    def _question(decision: Decision) -> str:
        call = decision.tool_call
        shown = json.dumps(call.args if call else {}, ensure_ascii=False)[:2000]
        return f"soda-guard asks before running `{call.qualified_name if call else 'tool'}` with {shown}: {decision.why}. Approve?"

    async def _ask_modern(self, request_id: Any, decision: Decision) -> None:
        """2026-07-28: the question goes back as an `input_required` result; the client asks
        the person and retries the call with the answer and this `requestState`."""
        state = uuid.uuid4().hex
        self._escalated[state] = decision
        question = {"method": "elicitation/create", "params": {"mode": "form", "message": self._question(decision), "requestedSchema": APPROVAL_SCHEMA}}
        result = {"resultType": "input_required", "inputRequests": {APPROVAL_KEY: question}, "requestState": state}
        await self.send_client(jsonrpc.line({"jsonrpc": "2.0", "id": request_id, "result": result}))

    async def _answered(self, escalation: Decision, call: ToolCall, params: dict[str, Any]) -> Decision:
        """The retried call with the person's answer. The answer covers the escalated call
        only: a retry with other arguments is refused, not run on it."""
        escalated = escalation.tool_call
        # by digest, not ==: to Python `1 == 1.0 == True`, and {"n": 1} was asked about, not {"n": true}
        if escalated is None or escalated.name != call.name or args_digest(escalated.args) != args_digest(call.args):
            return await self.session.reviewed(escalation, False, "the retried call is not the call the user was asked about")
        responses = params.get("inputResponses")
        answer = responses.get(APPROVAL_KEY) if isinstance(responses, dict) else None
        return await self.session.reviewed(escalation, approves(answer), how(answer))

    async def _escalate(self, decision: Decision) -> Decision:
        """Handshake-era clients: ask through an `elicitation/create` request (approve or
        reject; no edit). A client that cannot be asked, or no answer in time, blocks."""
        if not self._elicits:
            return decision.model_copy(update={"action": Action.BLOCK, "why": decision.why + "; escalated, and the client does not support elicitation"})
        own_id = f"{OWN_ID_PREFIX}{uuid.uuid4().hex}"
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._asked[own_id] = answer
        params = {"message": self._question(decision), "requestedSchema": APPROVAL_SCHEMA}
        try:
            await self.send_client(jsonrpc.line({"jsonrpc": "2.0", "id": own_id, "method": "elicitation/create", "params": params}))
            reply = await asyncio.wait_for(answer, self.options.review_timeout_s)
        except asyncio.TimeoutError:
            return await self.session.reviewed(decision, None, f"no answer to the escalation within {self.options.review_timeout_s}s")
        finally:
            self._asked.pop(own_id, None)
        result = reply.get("result") if isinstance(reply, dict) else None
        return await self.session.reviewed(decision, approves(result), how(result if result is not None else reply))

    # server → client

    async def from_server(self, raw: bytes) -> None:
        try:
            message = parse(raw)
        except (ValueError, RecursionError):
            if self.guard.policy.tool_results is not None:
                return  # it might be a result the client would read otherwise than the moderation
            message = None
        # a request or a notification names its method; anything else with an id is read by
        # an SDK as an answer (`"method": null` beside a result is one), and so is one with a
        # `result` or an `error` beside a method: the `mcp` SDK reads it as the answer to that
        # id, so it is matched and moderated as one (its method dropped) or goes nowhere
        if not isinstance(message, dict) or "id" not in message or (isinstance(message.get("method"), str) and not _answers(message)):
            await self.send_client(raw if raw.endswith(b"\n") else raw + b"\n")
            return
        key = self._answered_key(message.get("id"))
        if key in self._cancelled:
            del self._cancelled[key]
            return
        forwarded = self._forwarded.pop(key, None)
        if forwarded is None:
            # every request the client sent is held until answered: this answers none of them
            # (a call still being judged, which the server never got; an id spelled so that a
            # client reads it as another's), and would reach the client unmoderated
            return
        if key != _key(message.get("id")) or "method" in message:  # answered as the client will read it
            message = {k: v for k, v in message.items() if k != "method"} | {"id": _unkey(key)}
            raw = jsonrpc.line(message)
        result = message.get("result")
        if forwarded.method in ("initialize", "server/discover") and isinstance(result, dict) and self.session.server is None:
            meta = result.get("_meta")
            info = result.get("serverInfo") or (meta.get(SERVER_INFO_KEY) if isinstance(meta, dict) else None)
            if isinstance(info, dict) and isinstance(info.get("name"), str):
                self.session.server = info["name"]
        elif forwarded.method == "tools/list":
            self.session.learn_tools(result)
        elif forwarded.method == "tools/call" and forwarded.call is not None:
            raw = await self._finished_call(forwarded, message, raw)
            self._settled(key)
        elif forwarded.call is not None:
            raw = await self._finished_read(forwarded.call, message, raw)
        if not forwarded.done.done():
            forwarded.done.set_result(None)
        await self.send_client(raw if raw.endswith(b"\n") else raw + b"\n")

    def _answered_key(self, answer_id: Any) -> Any:
        """The key of the request an answer's id answers. An SDK client reads `"7"`, `" 7"`,
        `"+7"` or `7.0` as 7 (and 7 as `"7"`): an answer under any such spelling of a
        forwarded request's id is that request's, moderated, and goes out under its id."""
        key = _key(answer_id)
        if key in self._forwarded or key in self._cancelled:
            return key
        loose = _number(answer_id)
        if loose is None:
            return key
        return next((known for known in [*self._forwarded, *self._cancelled] if _number(_unkey(known)) == loose), key)

    async def _finished_call(self, forwarded: _Forwarded, message: dict[str, Any], raw: bytes) -> bytes:
        call = forwarded.call
        assert call is not None
        result, error = message.get("result"), message.get("error")
        task = result.get("task") if isinstance(result, dict) else None
        if forwarded.task and isinstance(task, dict) and isinstance(task.get("taskId"), str) and "content" not in result:
            _remember(self._tasks, task["taskId"], call)  # run as a task: its result is read from `tasks/result`
            if not result_text(result):
                return raw  # nothing in it for a model to read yet
        read = _answer_read(message)
        moderation = await self.session.moderate(call, read) if read is not None else None
        error_text = None if error is None else error_result(error)["content"][0]["text"][:2000]
        if moderation is None or moderation.allowed:
            if not isinstance(task, dict) or not forwarded.task:
                self.session.record(call, result if isinstance(result, dict) and error is None else None, error=error_text or (None if isinstance(result, dict) else "no result"))
            # a moderated result goes on as it was read and judged
            return raw if moderation is None else jsonrpc.line(message)
        if not isinstance(result, dict):  # a JSON-RPC error: a client hands its message to the model
            code = error.get("code") if isinstance(error, dict) and type(error.get("code")) is int else INTERNAL_ERROR
            why = f"soda-guard withheld the error of `{call.qualified_name}` ({moderation.action.value}): {moderation.why}."
            self.session.record(call, None, error=why)
            return jsonrpc.line({"jsonrpc": "2.0", "id": message["id"], "error": {"code": code, "message": why}})
        refused = refusal_result(call, moderation)
        if "resultType" in result:
            refused["resultType"] = result["resultType"]
        refused["content"][0]["text"] = f"soda-guard withheld the result of `{call.qualified_name}` ({moderation.action.value}): {moderation.why}."
        # what the client got, not what was withheld, is what later calls are judged after
        self.session.record(call, refused)
        return jsonrpc.line({"jsonrpc": "2.0", "id": message["id"], "result": refused})

    async def _finished_read(self, read: ToolCall, message: dict[str, Any], raw: bytes) -> bytes:
        """The answer to a `resources/read`, `prompts/get` or unknown task's `tasks/result`:
        moderated as a result, withheld with an error. Not a step of the agent's, so the
        session's trajectory does not take it in."""
        answer = _answer_read(message)
        if answer is None:
            return raw
        moderation = await self.session.moderate(read, answer)
        if moderation is None or moderation.allowed:
            return raw if moderation is None else jsonrpc.line(message)
        why = f"soda-guard withheld the answer to {read.name} ({moderation.action.value}): {moderation.why}."
        return jsonrpc.line({"jsonrpc": "2.0", "id": message["id"], "error": {"code": INTERNAL_ERROR, "message": why}})

    async def server_gone(self) -> None:
        """The server closed its output (exited or crashed): every request it still owed gets
        an error now, instead of a client waiting forever."""
        self._server_gone = True
        pending = list(self._forwarded.items())
        self._forwarded.clear()
        for request_id, forwarded in pending:
            if forwarded.call is not None:
                self.session.record(forwarded.call, None, error="the MCP server exited")
            if not forwarded.done.done():
                forwarded.done.set_result(None)
            await self.send_client(jsonrpc.error(_unkey(request_id), INTERNAL_ERROR, "the MCP server exited before answering"))

    async def close(self) -> None:
        for task in list(self._judging.values()):
            task.cancel()
        await asyncio.gather(*self._judging.values(), return_exceptions=True)


def _answers(message: dict[str, Any]) -> bool:
    """Whether some client reads the message as an answer: by its `result` or `error` key."""
    return "result" in message or "error" in message


def _answer_read(message: dict[str, Any]) -> dict[str, Any] | None:
    """What a client may read of an answer, as a result: its result, and the message and data
    of an error beside or instead of it (SDKs differ on which one wins when both come)."""
    result, error = message.get("result"), message.get("error")
    if error is None:
        return result if isinstance(result, dict) else None
    read = dict(result) if isinstance(result, dict) else {}
    blocks = read.get("content")
    read["content"] = [*(blocks if isinstance(blocks, list) else []), *error_result(error)["content"]]
    read.setdefault("isError", True)
    return read


def _modern(params: dict[str, Any]) -> bool:
    meta = params.get("_meta")
    return isinstance(meta, dict) and MODERN_VERSION_KEY in meta


def _elicits(params: dict[str, Any]) -> bool:
    meta = params.get("_meta")
    capabilities = meta.get(CAPABILITIES_KEY) if isinstance(meta, dict) else None
    return isinstance(capabilities, dict) and isinstance(capabilities.get("elicitation"), dict)


def approves(answer: Any) -> bool:
    """Only an accepted form whose `approve` is true: decline, cancel, an error or anything
    malformed is a rejection."""
    return (
        isinstance(answer, dict)
        and answer.get("action") == "accept"
        and isinstance(answer.get("content"), dict)
        and answer["content"].get("approve") is True
    )


def how(answer: Any) -> str:
    if approves(answer):
        return "approved by the user through MCP elicitation"
    return f"not approved through MCP elicitation ({json.dumps(answer, default=str)[:200]})"


def _key(request_id: Any) -> Any:
    """JSON-RPC ids are strings or numbers; 1 and "1" are different requests, but 1 and 1.0
    are one number: a JavaScript client reads both as 1, so a server that answers 1.0 must
    not have its answer pass as no call's (and skip the result's moderation). Any other
    value (a list, an object) keys as its JSON text: it can name no request, and must not
    stop the proxy."""
    if type(request_id) is float and request_id.is_integer():
        return ("int", int(request_id))
    if not _valid_id(request_id):
        return ("invalid", json.dumps(request_id, default=str, sort_keys=True))
    return (type(request_id).__name__, request_id)


def _valid_id(request_id: Any) -> bool:
    return request_id is None or (isinstance(request_id, (str, int, float)) and not isinstance(request_id, bool))


def _number(request_id: Any) -> int | None:
    """The whole number an SDK client may read an id as (`"7"`, `" +7 "`, `"0_7"`, `7.0`)."""
    if isinstance(request_id, bool):
        return None
    if isinstance(request_id, int):
        return request_id
    if isinstance(request_id, float):
        return int(request_id) if request_id.is_integer() else None
    if isinstance(request_id, str) and len(request_id) <= 64:
        try:
            return int(request_id)
        except ValueError:
            try:
                number = float(request_id)
            except ValueError:
                return None
            return int(number) if number.is_integer() else None
    return None


def _without_context(message: dict[str, Any]) -> dict[str, Any]:
    """The call as the server gets it: what the client told the judge (`_meta`'s context, the
    user's conversation) is the judge's, not the server's."""
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict) or CONTEXT_KEY not in meta:
        return message
    rest = {key: value for key, value in meta.items() if key != CONTEXT_KEY}
    params = {key: value for key, value in params.items() if key != "_meta"} | ({"_meta": rest} if rest else {})  # type: ignore[union-attr]
    return {**message, "params": params}


def _unkey(key: Any) -> Any:
    return key[1]


async def relay(
    guard: Guard,
    command: Sequence[str],
    client_in: asyncio.StreamReader,
    to_client: Write,
    options: RelayOptions | None = None,
) -> int:
    """Serve one client until it disconnects or the server exits; the server is stopped either
    way. Returns the server's exit status (0 when the proxy stopped it)."""
    options = options or RelayOptions()
    server = await start_server(command)
    proxy = Relay(guard, server, to_client, options)
    assert server.stdout is not None

    async def pump_client() -> None:
        async for line in lines(client_in):
            if isinstance(line, TooLong):
                await proxy.send_client(jsonrpc.error(None, INVALID_REQUEST, f"message of {line.size} bytes exceeds the proxy's limit of {options.max_message_bytes}"))  # type: ignore[attr-defined]
                continue
            await proxy.from_client(line)

    async def pump_server() -> None:
        async for line in lines(server.stdout):  # type: ignore[arg-type]
            if isinstance(line, TooLong):
                continue
            await proxy.from_server(line)
        await proxy.server_gone()

    client_task = asyncio.ensure_future(pump_client())
    server_task = asyncio.ensure_future(pump_server())
    server_ended_first = False
    try:
        await asyncio.wait([client_task, server_task], return_when=asyncio.FIRST_COMPLETED)
        server_ended_first = server_task.done() and not client_task.done()
        if client_task.done() and not server_task.done():
            # the client is gone: what is still being judged is never forwarded
            await proxy.close()
    finally:
        for task in (client_task, server_task):
            task.cancel()
        await asyncio.gather(client_task, server_task, return_exceptions=True)
        await proxy.close()
        await stop_server(server)
    for task in (client_task, server_task):
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return (server.returncode or 0) if server_ended_first else 0


async def serve_stdio(guard: Guard, command: Sequence[str], options: RelayOptions | None = None) -> int:
    """The proxy on this process's stdin and stdout."""
    options = options or RelayOptions()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=options.max_message_bytes + 1)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, sys.stdout.buffer)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    # SIGTERM (how clients end a stdio server that outlives its stdin) stops the proxy the
    # same way a closed stdin does: the server it started is stopped too
    task = asyncio.current_task()
    terminated = asyncio.Event()

    def terminate() -> None:
        terminated.set()
        if task is not None:
            task.cancel()

    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await relay(guard, command, reader, write, options)
    except asyncio.CancelledError:
        if terminated.is_set():
            return 0
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
