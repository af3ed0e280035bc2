"""`soda-guard mcp-proxy --http HOST:PORT`: the guard proxy serving streamable HTTP, on
FastMCP's proxy server (sessions, SSE and elicitation come with it) with the judging in its
`on_call_tool` middleware. Unlike the stdio relay, FastMCP re-serialises what it passes on:
lists, resources and prompts arrive equal in content, not byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import uuid
from collections import OrderedDict
from typing import Any, Iterator, Sequence

from fastmcp.client.transports import StdioTransport
from fastmcp.server import create_proxy
from fastmcp.server.dependencies import fastmcp_request_ctx
from fastmcp.server.middleware import Middleware
from fastmcp.tools.base import ToolResult
from mcp.shared.exceptions import MCPError
from mcp.types import TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from soda_guard.guard import Guard
from soda_guard.mcp.jsonrpc import INTERNAL_ERROR, REQUEST_TIMEOUT
from soda_guard.mcp.relay import RelayOptions
from soda_guard.mcp.session import CONTEXT_KEY, ContextError, ProxySession, error_result, refusal_result
from soda_guard.verdict import Action, Decision

#: sessions kept at once; the least recently used one is forgotten past it
MAX_SESSIONS = 1024


class GuardMiddleware(Middleware):
    """Judges each `tools/call` in the session its `_meta` context names (else the client's, see
    `_unnamed`), before FastMCP forwards it to the server, and moderates what comes back (with
    resources and prompts read) where the policy moderates tool results."""

    def __init__(self, guard: Guard, options: RelayOptions) -> None:
        self.guard = guard
        self.options = options
        self._sessions: OrderedDict[str, ProxySession] = OrderedDict()
        # the session of requests no MCP session holds: one id per proxy, as on stdio
        self._shared = uuid.uuid4().hex

    def _unnamed(self, ctx: Any) -> str:
        """The session of a client that names none in `_meta`: a handshake-era client's is its
        HTTP session. A 2026-07-28 client has none (FastMCP gives each of its requests a new
        id), and nothing else tells one unauthenticated client from another: keyed by that id,
        every call was judged in a new, empty session (no `limit`, `after` or `flows_from`
        held, the judge saw no earlier call) that pushed a real one out of the cache. Its
        calls share the proxy's one session instead."""
        try:
            request = ctx.request_context
            if request is None or request.protocol_version in MODERN_PROTOCOL_VERSIONS:
                return self._shared
            return ctx.session_id
        except Exception:  # no request context (no context at all): no session either
            return self._shared

    def _session(self, key: str) -> ProxySession:
        session = self._sessions.pop(key, None) or ProxySession(self.guard, self.options.server_name or "mcp", session_id=key)
        self._sessions[key] = session
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)
        return session

    async def on_call_tool(self, context: Any, call_next: Any) -> Any:
        ctx = context.fastmcp_context
        params = context.message
        meta = _meta(params, ctx)
        named = meta.get(CONTEXT_KEY, {}).get("session") if isinstance(meta.get(CONTEXT_KEY), dict) else None
        session = self._session(named if isinstance(named, str) and named else self._unnamed(ctx))
        tool = await ctx.fastmcp.get_tool(params.name) if ctx is not None else None
        if tool is not None and tool.annotations is not None:
            session.learn_tools({"tools": [{"name": params.name, "annotations": tool.annotations.model_dump(by_alias=True, exclude_none=True)}]})
        raw = {"name": params.name, "arguments": params.arguments or {}, **({"_meta": meta} if meta else {})}
        try:
            call = session.call_of(_request_id(ctx), raw)
        except ContextError as error:
            return _refused(str(error))
        decision = await session.decide(call)
        if decision.action is Action.ESCALATE:
            decision = await self._ask(session, ctx, decision)
        if not decision.allowed:
            return _as_tool_result(refusal_result(call, decision))
        try:
            with _without_context():
                result = await asyncio.wait_for(call_next(context), self.options.server_timeout_s)
        except asyncio.TimeoutError:
            session.record(call, None, error="timed out")
            return _refused(f"the MCP server did not answer within {self.options.server_timeout_s}s")
        except Exception as error:  # the server's error: a client hands its message to the model
            moderation = await session.moderate(call, _error_answer(error))
            if moderation is not None and not moderation.allowed:
                why = f"soda-guard withheld the error of `{call.qualified_name}` ({moderation.action.value}): {moderation.why}."
                session.record(call, None, error=why)
                return _refused(why)
            session.record(call, None, error=str(error)[:2000])
            raise
        answered = {
            "content": [block.model_dump(by_alias=True, exclude_none=True) for block in result.content],
            "isError": bool(getattr(result, "is_error", False)),
        }
        structured = getattr(result, "structured_content", None)
        if structured is not None:  # read by clients beside the text (FastMCP's `.data`)
            answered["structuredContent"] = structured
        moderation = await session.moderate(call, answered)
        if moderation is not None and not moderation.allowed:
            refused = refusal_result(call, moderation)
            refused["content"][0]["text"] = f"soda-guard withheld the result of `{call.qualified_name}` ({moderation.action.value}): {moderation.why}."
            session.record(call, refused)
            return _as_tool_result(refused)
        session.record(call, answered)
        return result

    async def on_read_resource(self, context: Any, call_next: Any) -> Any:
        uri = str(context.message.uri)
        result = await self._answer(context, call_next, "resources/read", {"uri": uri})
        await self._moderate_read(context, "resources/read", {"uri": uri}, result.to_mcp_result(uri))
        return result

    async def on_get_prompt(self, context: Any, call_next: Any) -> Any:
        params = {"name": context.message.name, "arguments": context.message.arguments or {}}
        result = await self._answer(context, call_next, "prompts/get", params)
        await self._moderate_read(context, "prompts/get", params, result.to_mcp_prompt_result())
        return result

    async def _answer(self, context: Any, call_next: Any, method: str, params: dict[str, Any]) -> Any:
        try:
            return await asyncio.wait_for(call_next(context), self.options.server_timeout_s)
        except asyncio.TimeoutError:
            raise MCPError(REQUEST_TIMEOUT, f"the MCP server did not answer within {self.options.server_timeout_s}s") from None
        except Exception as error:  # the server's error, whose message the client may show its model
            await self._moderate_read(context, method, params, _error_answer(error))
            raise

    async def _moderate_read(self, context: Any, method: str, params: dict[str, Any], answer: Any) -> None:
        """What a client hands its model besides tool results (`READS`), moderated as the
        stdio relay does; withheld, the client gets an error."""
        if self.guard.policy.tool_results is None:
            return
        ctx = context.fastmcp_context
        session = self._session(self._unnamed(ctx))
        read = session.read_call(_request_id(ctx), method, params)
        answer = answer if isinstance(answer, dict) else answer.model_dump(by_alias=True, exclude_none=True, mode="json")
        moderation = await session.moderate(read, answer)
        if moderation is not None and not moderation.allowed:
            raise MCPError(INTERNAL_ERROR, f"soda-guard withheld the answer to {method} ({moderation.action.value}): {moderation.why}.")

    async def _ask(self, session: ProxySession, ctx: Any, decision: Decision) -> Decision:
        call = decision.tool_call
        question = f"soda-guard asks before running `{call.qualified_name if call else 'tool'}`: {decision.why}. Approve?"
        try:
            answer = await asyncio.wait_for(ctx.elicit(question, response_type=bool), self.options.review_timeout_s)
        except Exception as error:  # no elicitation support, a client error, no answer in time
            why = f"{decision.why}; escalated, and the user could not be asked ({type(error).__name__}: {error})"
            return decision.model_copy(update={"action": Action.BLOCK, "why": why})
        approved = getattr(answer, "action", None) == "accept" and getattr(answer, "data", None) is True
        how = "approved by the user through MCP elicitation" if approved else f"not approved through MCP elicitation ({getattr(answer, 'action', answer)})"
        return await session.reviewed(decision, approved, how)


def _meta(params: Any, ctx: Any) -> dict[str, Any]:
    meta = getattr(params, "meta", None)
    if meta is None and ctx is not None and ctx.request_context is not None:
        meta = getattr(ctx.request_context, "meta", None)
    if meta is None:
        return {}
    return meta if isinstance(meta, dict) else dict(getattr(meta, "model_extra", None) or {})


@contextlib.contextmanager
def _without_context() -> Iterator[None]:
    """The call as the server gets it: what the client told the judge (`_meta`'s context, the
    user's conversation) is the judge's, not the server's. FastMCP's proxy forwards the `_meta`
    of the request context it bound, so the call goes on under a copy without it."""
    request = fastmcp_request_ctx.get()
    if request is None or not request.meta or CONTEXT_KEY not in request.meta:
        yield
        return
    rest = {key: value for key, value in request.meta.items() if key != CONTEXT_KEY}
    token = fastmcp_request_ctx.set(dataclasses.replace(request, meta=rest or None))
    try:
        yield
    finally:
        fastmcp_request_ctx.reset(token)


def _request_id(ctx: Any) -> str:
    try:
        return ctx.request_id
    except Exception:
        return "http"


def _error_answer(error: BaseException) -> dict[str, Any]:
    """A server's error (an `MCPError` carries its JSON-RPC data) as the result a client makes of it."""
    data = getattr(getattr(error, "error", None), "data", None)
    return error_result({"message": str(error), **({"data": data} if data is not None else {})})


def _refused(text: str) -> ToolResult:
    return ToolResult(content=[TextContent(type="text", text=f"soda-guard refused the call: {text}")], is_error=True)


def _as_tool_result(result: dict[str, Any]) -> ToolResult:
    return ToolResult(content=[TextContent(type="text", text=result["content"][0]["text"])], meta=result["_meta"], is_error=True)


def serve_http(guard: Guard, command: Sequence[str], address: str, options: RelayOptions) -> int:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"--http takes HOST:PORT, not {address!r}")
    proxy = create_proxy(StdioTransport(command=command[0], args=list(command[1:])), name=options.server_name or "soda-guard")
    proxy.add_middleware(GuardMiddleware(guard, options))
    # SIGTERM's default action would end the process without a shutdown, leaving the server
    # it started running; as an interrupt the server is closed on the way out
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        proxy.run(transport="http", host=host, port=int(port), show_banner=False)
    except KeyboardInterrupt:
        pass
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
