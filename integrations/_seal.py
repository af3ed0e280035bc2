"""The tool object a guarded call runs: what reaches it is what was judged.

Middleware listed after the guard (inside its `wrap_tool_call`) gets the call after the guard
decided and can still rewrite it; a tool can run other tools in its body. Neither passes
through the guard's `wrap_tool_call` again, so the guard hands down a `SealedTool` in the
request's place of the tool: it judges the call as it actually reaches the tool (name of the
tool object, arguments as rewritten), and attaches a callback handler to the tool's run that
judges every tool run nested inside it before that tool's body starts.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Mapping
from typing import Any, Callable

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler, BaseCallbackManager, CallbackManager
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel

from soda_guard.binding import args_digest
from soda_guard.errors import SodaGuardError
from soda_guard.ids import new_run_id
from soda_guard.judges.incremental import IdentityMemo
from soda_guard.trajectory import ToolCall
from soda_guard.verdict import Decision

from soda_guard.integrations._convert import refusal_text, started_tool

Check = Callable[[ToolCall], Decision]


class NestedCallStopped(SodaGuardError):
    """Raised into a tool's body where it runs another tool the policy does not let run (a
    nested call cannot wait for a reviewer, so escalate stops it too)."""

    def __init__(self, decision: Decision, outer: str) -> None:
        self.decision = decision
        name = decision.tool_call.name if decision.tool_call else "tool"
        super().__init__(f"soda-guard stopped `{name}`, run inside `{outer}` ({decision.action.value}): {decision.why}")


class _ToolRunsOnly:
    """What the seal's handlers share: `raise_error` makes LangChain raise a refusal where the
    nested tool starts, before its body, and only tool runs are dispatched to them (their
    events go by `ignore_agent`)."""

    raise_error = True
    ignore_llm = ignore_retry = ignore_retriever = ignore_chat_model = ignore_custom_event = ignore_chain = True


class _Nested(_ToolRunsOnly, BaseCallbackHandler):
    """Judges each tool run that starts inside the sealed tool's run (the sealed run itself
    excepted). LangChain runs this sync handler off the event loop on async paths."""

    def __init__(self, outer_run: uuid.UUID, outer: str, check: Check, sealed: Callable[[str, Any], bool]) -> None:
        self.outer_run = outer_run
        self.outer = outer
        self.check = check
        self.sealed = sealed
        self.stopped: Decision | None = None
        self._lock = threading.Lock()

    def started(self, serialized: dict[str, Any], input_str: str, run_id: uuid.UUID, inputs: Any, extra: dict[str, Any]) -> ToolCall | None:
        """The call a tool run starts, None for the sealed run itself: the run under the id
        the sealed tool was handed, starting the call as judged. A tool that passes the config
        it was given on to another tool hands that tool its run id too, so the id alone
        would let the other tool through unjudged."""
        name, args = started_tool(serialized, input_str, inputs, extra)
        if run_id == self.outer_run and self.sealed(name, args):
            return None
        return ToolCall(id=extra.get("tool_call_id") or str(run_id), name=name, args=args)

    def decided(self, decision: Decision) -> None:
        if not decision.allowed:
            with self._lock:
                self.stopped = self.stopped or decision
            raise NestedCallStopped(decision, self.outer)

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: uuid.UUID,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        call = self.started(serialized, input_str, run_id, inputs, kwargs)
        if call is not None:
            self.decided(self.check(call))


class _Gate(_ToolRunsOnly, AsyncCallbackHandler):
    """The sealed run's own handler on the async path, in place of `_Nested` (which its
    children still inherit): LangChain awaits an inline async handler in the caller's task,
    where it runs a sync one on an executor thread, two thread hops for every tool call. It
    judges what `_Nested` would of a tool started on the sealed run's own callbacks (a tool
    that hands the config it was given to another tool) and lets the sealed run itself pass.
    A sync callback manager built from that config runs this coroutine on a loop of its own,
    after the event, and only logs what it raises: on any loop but the sealed run's,
    `_SyncGate` judges and this passes (only the sealed run's loop writes `passed`)."""

    run_inline = True

    def __init__(self, nested: _Nested, acheck: Callable[[ToolCall], Any]) -> None:
        self.nested = nested
        self.acheck = acheck
        self.loop = asyncio.get_running_loop()
        self.passed: Any = _NONE
        """The event (its `serialized`, one object per event) this gate let through last,
        read by `_SyncGate` right after it on the same event, so that it is judged once."""
        self.sync = _SyncGate(self)

    async def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: uuid.UUID,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if asyncio.get_running_loop() is not self.loop:
            return
        call = self.nested.started(serialized, input_str, run_id, inputs, kwargs)
        if call is not None:
            self.nested.decided(await self.acheck(call))
        self.passed = serialized


class _SyncGate(_ToolRunsOnly, BaseCallbackHandler):
    """`_Gate`'s twin among the sealed run's own handlers, for a sync callback manager built
    from the config the tool's body was handed (a sync `invoke` of another tool, on the loop
    or on a thread): it judges there and raises before the nested tool's body starts, which
    `_Gate`'s coroutine cannot. On the async manager it runs inline right after `_Gate`, with
    no await between, and passes the event `_Gate` judged (a constant cost per event)."""

    run_inline = True

    def __init__(self, gate: _Gate) -> None:
        self.gate = gate

    def on_tool_start(
        self,
        serialized: dict[str, Any],
        input_str: str,
        *,
        run_id: uuid.UUID,
        inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if self.gate.passed is serialized:
            self.gate.passed = _NONE
            return
        self.gate.nested.on_tool_start(serialized, input_str, run_id=run_id, inputs=inputs, **kwargs)


_NONE = object()


class SealedTool:
    """Stands in for `tool` in the request the guard passes down. `sealed` is the call the
    guard let run; a call that reaches the tool in any other shape is judged (`check`) and
    refused unless the policy lets it run as is. `refused` holds the decision that stopped the
    call or a tool nested in it, for the call's record. Every other attribute is the tool's."""

    def __init__(
        self, tool: BaseTool, sealed: ToolCall, check: Check, acheck: Callable[[ToolCall], Any], digest: str | None = None,
        *, once: bool = False,
    ) -> None:
        self._tool = tool
        self._sealed = sealed
        self._check = check
        self._acheck = acheck
        self._once = once
        """A reviewer's answer licenses one run: a retry inside the guard (retry middleware
        listed after it) is judged again, as a call no person can be asked about."""
        self._runs = 0
        self.refused: Decision | None = None
        self.refusal: ToolMessage | None = None
        """The refusal given in the tool's place, where the call or a tool nested in it was
        stopped: what the model reads, whatever the tool's body made of the stop."""
        # the judged arguments' digest (`digest`: the binding's, what the judge saw), else as
        # they are now, before anything inside the guard runs: the dict is shared with the
        # model's call and the request, and may be edited in place
        self._expected = {digest or args_digest(sealed.args)}
        if isinstance(sealed.args, Mapping) and _injected(tool):
            self._expected.add(args_digest(_model_args(tool, sealed.args)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tool, name)

    def _arrived(self, input: Any) -> ToolCall | None:
        """The call as it reaches the tool, where it is not the call as judged: another tool,
        or arguments whose digest is not the judged ones' as they were when the call was sealed
        (or those less the arguments the ToolNode injects). None where it is that call."""
        raw = input.get("args", {}) if isinstance(input, Mapping) and input.get("type") == "tool_call" else input
        args = self._model_args(raw)
        if self._judged_as(self._tool.name, args):
            return None
        call_id = input.get("id") if isinstance(input, Mapping) else None
        return ToolCall(id=call_id or self._sealed.id, name=self._tool.name, args=args)

    def _refusal(self, decision: Decision, call: ToolCall, input: Any) -> ToolMessage:
        self.refused = decision
        changed = "run again on a reviewer's answer for one run" if self._runs > 1 and self._once else "changed after it was judged"
        why = f"the call was {changed}, and as it would run: {decision.why}"
        self.refusal = ToolMessage(
            content=refusal_text(call.name, why), tool_call_id=_call_id(input, self._sealed), name=call.name, status="error"
        )
        return self.refusal

    def _stopped(self, handler: _Nested, error: NestedCallStopped, input: Any) -> ToolMessage:
        self.refused = handler.stopped or error.decision
        self.refusal = ToolMessage(
            content=refusal_text(self._tool.name, str(error)),
            tool_call_id=_call_id(input, self._sealed), name=self._tool.name, status="error",
        )
        return self.refusal

    def _returned(self, handler: _Nested, result: Any, input: Any) -> Any:
        """What the tool returned, unless a nested call was stopped inside it: a body that
        caught the stop and went on answers with what the policy did not let run."""
        if handler.stopped is not None:
            return self._stopped(handler, NestedCallStopped(handler.stopped, self._tool.name), input)
        return result

    def _config(self, config: Any, handler: _Nested, gate: _Gate | None = None) -> dict[str, Any]:
        """The tool's config with `handler` on its callbacks, inherited by every run inside
        it; with `gate`, the sealed run's own events go to `gate` (and its sync twin, next to
        it) instead of `handler`."""
        config = dict(config or {})
        callbacks = config.get("callbacks")
        if isinstance(callbacks, BaseCallbackManager):
            manager = callbacks.copy()
        else:  # a list is handlers and inherited handlers at once
            manager = CallbackManager(handlers=list(callbacks or []), inheritable_handlers=list(callbacks or []))
        if gate is None:
            manager.add_handler(handler, inherit=True)
        else:
            manager.add_handler(gate, inherit=False)
            manager.add_handler(gate.sync, inherit=False)
            manager.inheritable_handlers.append(handler)
        return {**config, "callbacks": manager, "run_id": handler.outer_run}

    def _nested(self) -> _Nested:
        return _Nested(new_run_id(), self._tool.name, self._check, self._is_sealed)

    def _model_args(self, raw: Any) -> Any:
        return _model_args(self._tool, raw) if isinstance(raw, Mapping) else str(raw)

    def _is_sealed(self, name: str, args: Any) -> bool:
        """Whether a run of the tool `name` with `args` (less any injected ones) is the call
        as judged."""
        return self._judged_as(name, self._model_args(args))

    def _judged_as(self, name: str, model_args: Any) -> bool:
        """`_is_sealed` for arguments already less the injected ones: the judged arguments as
        they were when the call was sealed."""
        return name == self._tool.name == self._sealed.name and args_digest(model_args) in self._expected

    def _again(self, input: Any) -> ToolCall | None:
        """The call as it arrives, where it must be judged: changed since it was judged, or
        run once more on a reviewer's answer for one run."""
        self._runs += 1
        call = self._arrived(input)
        if call is None and self._once and self._runs > 1:
            call = ToolCall(id=_call_id(input, self._sealed), name=self._sealed.name, args=self._sealed.args)
        return call

    def invoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        call = self._again(input)
        if call is not None:
            decision = self._check(call)
            if not decision.allowed:
                return self._refusal(decision, call, input)
            self._expected.add(args_digest(call.args))  # judged as it runs: its own run is not a nested one
        handler = self._nested()
        try:
            result = self._tool.invoke(input, self._config(config, handler), **kwargs)
        except NestedCallStopped as error:
            return self._stopped(handler, error, input)
        return self._returned(handler, result, input)

    async def ainvoke(self, input: Any, config: Any = None, **kwargs: Any) -> Any:
        call = self._again(input)
        if call is not None:
            decision = await self._acheck(call)
            if not decision.allowed:
                return self._refusal(decision, call, input)
            self._expected.add(args_digest(call.args))
        handler = self._nested()
        try:
            gate = _Gate(handler, self._acheck) if _dispatches_async(self._tool) else None
            result = await self._tool.ainvoke(input, self._config(config, handler, gate), **kwargs)
        except NestedCallStopped as error:
            return self._stopped(handler, error, input)
        return self._returned(handler, result, input)


def _dispatches_async(tool: BaseTool) -> bool:
    """Whether `ainvoke` sends every event of the tool's own run through LangChain's async
    callback manager, where `_Gate` is awaited: a coroutine `StructuredTool` (an MCP tool, an
    `async def` tool) as LangChain runs it. A sync one runs `invoke` on a thread, where the
    manager is sync and would only run `_Gate`'s coroutine on a loop of its own, its refusal
    logged rather than raised; a tool of any other class may do either."""
    kind = type(tool)
    return (
        isinstance(tool, StructuredTool) and tool.coroutine is not None
        and kind.ainvoke is StructuredTool.ainvoke and kind.arun is BaseTool.arun
    )


def _model_args(tool: BaseTool, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments the model controls: those the ToolNode injects (state, store, runtime:
    in the tool's input schema but not in the schema shown to the model) are left out."""
    injected = _injected(tool)
    return {key: value for key, value in args.items() if key not in injected}


def _injected(tool: BaseTool) -> frozenset[str]:
    """The names of the arguments the ToolNode injects into `tool`, read once per tool and
    schema (LangChain builds the model's schema anew at every read)."""
    schema = tool.args_schema
    known = _INJECTED.get(tool)
    if known is not None and known[0] is schema:
        return known[1]
    try:
        full, shown = tool.get_input_schema(), tool.tool_call_schema
    except Exception:
        injected: frozenset[str] = frozenset()
    else:
        shown_fields = getattr(shown, "model_fields", None) if isinstance(shown, type) and issubclass(shown, BaseModel) else None
        injected = frozenset() if shown_fields is None else frozenset(getattr(full, "model_fields", {})) - frozenset(shown_fields)
    _INJECTED.put(tool, (schema, injected))
    return injected


_INJECTED: IdentityMemo[tuple[Any, frozenset[str]]] = IdentityMemo()


def _call_id(input: Any, sealed: ToolCall) -> str:
    found = input.get("id") if isinstance(input, Mapping) else None
    return str(found or sealed.id)
