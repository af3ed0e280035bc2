"""Moderating a LangChain model's output while it streams (Qwen3Guard-Stream).

    monitor = StreamMonitor.load("Qwen/Qwen3Guard-Stream-4B")
    handler = AsyncStreamGuardCallbackHandler(monitor, policy)   # StreamGuardCallbackHandler for sync runs
    async for event in agent.astream_events(inputs, config={"callbacks": [handler]}): ...

Each model run opens its own `GuardStream` on the run's input messages; streamed text and
streamed tool-call arguments are fed as they arrive. When the debouncing rule flags the
stream, the policy's outcome for the verdict decides: `block` or `escalate` raise
`StreamFlaggedError` from the callback, which LangChain propagates out of the model's stream
and so stops generation (nobody can approve a half-written answer, hence escalate stops too);
`log` logs and lets it continue; `allow` only records the decision. Every decision goes to the
policy's audit sinks (a `Guard`'s, when the handler is given the agent's guard) before it is
acted on, as the guard's own are.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
from langchain_core.messages import BaseMessage
from langchain_core.outputs import Generation, LLMResult

from soda_guard._extras import needs_extra
from soda_guard.errors import SodaGuardError
from soda_guard.guard import Guard
from soda_guard.integrations._convert import message_text, to_trajectory
from soda_guard.offload import off_loop
from soda_guard.policy import Policy
from soda_guard.trajectory import ToolCall, Trajectory, UserStep
from soda_guard.verdict import Action, Decision, Label, Verdict

with needs_extra("soda_guard.integrations.streaming (the Qwen3Guard-Stream monitor)"):
    from soda_guard.stream_monitor import GuardStream, StreamMonitor, TokenVerdict

__all__ = ["AssistantTextRenderer", "AsyncStreamGuardCallbackHandler", "StreamFlaggedError", "StreamGuardCallbackHandler"]

logger = logging.getLogger("soda_guard.stream")

_OUTCOME_FIELD = {Label.UNSAFE: "on_unsafe", Label.CONTROVERSIAL: "on_controversial"}


class StreamFlaggedError(SodaGuardError):
    """A streamed response was flagged and the policy stops it. `decision.verdict` holds the
    flagging token's level and category; `partial_text` is the assistant text fed to the
    monitor up to the flag (tool calls in their `<tool_call>` form)."""

    def __init__(self, decision: Decision, partial_text: str) -> None:
        self.decision = decision
        self.verdict: Verdict = decision.verdict  # type: ignore[assignment]
        self.partial_text = partial_text
        super().__init__(f"stream stopped ({decision.action.value}): {decision.why}")


class AssistantTextRenderer:
    """Rebuilds the assistant turn's text from streamed pieces the way `render_assistant`
    writes a finished one (content, then each call as Qwen's `<tool_call>` block), so the
    monitor reads streamed tool calls in the form the judge saw in training."""

    def __init__(self) -> None:
        self.written = False
        self.call_index: int | None = None
        self.call_id: str | None = None
        self.call_open = False
        self.call_has_args = False
        self.length = 0
        """Characters of text written so far."""
        self.spans: list[tuple[int, Any]] = []
        """Where each call's block begins in the text, and the call it belongs to; None for
        content that streamed while a call was open (Anthropic's `[tool_use, text]`, a v3 text
        block after a call's), which is the content's, not the call's: its flags take the
        defaults, not the call's rule. A later piece of that call goes back to the call."""
        self.call_key: Any = None
        """The open call's key (`spans` may end in content)."""
        self.names: dict[Any, str] = {}
        """Each call's tool name as far as it has streamed (a name may come late or in pieces)."""
        self.named: set[Any] = set()
        """The calls whose name is whole: their arguments began, or the call closed. Before
        that, `sh` may be the start of `shell`."""

    def content(self, text: str) -> str:
        if text and self.spans and self.spans[-1][1] is not None:
            self.spans.append((self.length, None))
        self.written = self.written or bool(text)
        self.length += len(text)
        return text

    def tool_call_chunk(self, chunk: dict[str, Any]) -> str:
        index, name, args, call_id = chunk.get("index"), chunk.get("name"), chunk.get("args") or "", chunk.get("id")
        text = ""
        # servers that number every call 0 tell calls apart by id alone, as LangChain does
        reused = self.call_open and index == self.call_index and bool(call_id and self.call_id and call_id != self.call_id)
        starts = not self.call_open or (index is not None and index != self.call_index) or (index is None and name) or reused
        if starts:
            key = ("unindexed", len(self.spans)) if index is None else (index, call_id) if reused else index
            text = self._close() + ("\n" if self.written else "")
            self.spans.append((self.length + len(text), key))
            if name:
                self.names[key] = self.names.get(key, "") + name
            text += '<tool_call>\n{"name": ' + json.dumps(name or "", ensure_ascii=False) + ', "arguments": '
            self.call_open, self.call_index, self.call_id, self.call_has_args = True, index, call_id or None, False
            self.call_key = key
            self.written = True
        else:
            self.call_id = self.call_id or call_id or None  # an id that came late
            if self.spans[-1][1] is None:  # the open call goes on after content that streamed within it
                self.spans.append((self.length, self.call_key))
            if name:  # the rest of a name that began in an earlier chunk, or a name that came late
                self.names[self.call_key] = self.names.get(self.call_key, "") + name
        self.call_has_args = self.call_has_args or bool(args)
        if args:
            self.named.add(self.call_key)
        text += args
        self.length += len(text)
        return text

    def finish(self) -> str:
        """Close an open call block (an argument-less call gets `{}` as a finished one does)."""
        text = self._close()
        self.length += len(text)
        return text

    def has_call(self, index: Any) -> bool:
        """Whether a call of this index was written (a protocol event's block index)."""
        return any(key is not None and (key == index or (isinstance(key, tuple) and key[0] == index)) for _, key in self.spans)

    def tool_at(self, end: int) -> tuple[bool, str]:
        """(whether the text ending at `end` is in a call, that call's tool name once whole, else
        ""): the text before any call is the content, whichever calls come after it, and so is
        text that streamed after a call began."""
        key = next((key for start, key in reversed(self.spans) if start < end), None)
        return (False, "") if key is None else (True, self.names.get(key, "") if key in self.named else "")

    def _close(self) -> str:
        if not self.call_open:
            return ""
        self.call_open = False
        self.named.add(self.call_key)
        return ("" if self.call_has_args else "{}") + "}\n</tool_call>"


@dataclass
class _Run:
    stream: GuardStream
    trajectory: Trajectory
    """What the run answers: another candidate response to it is judged on a stream of its own."""
    renderer: AssistantTextRenderer = field(default_factory=AssistantTextRenderer)
    text: list[str] = field(default_factory=list)
    stopped: StreamFlaggedError | None = None
    """The policy stopped the run: nothing more is fed, and each later token or event of the run
    raises the stop again. LangChain only logs what an async handler raises through its sync
    callback manager, which `astream_events(version="v3")` hands a provider's sync `_stream` on a
    worker thread: a stop taken on a token that stream reported itself was lost, and the rest
    streamed unjudged (a run fed by its tokens reads none of its events). The run's next event,
    awaited on the loop, carries the stop."""
    acted: int = 0
    """How many of the stream's flags have been decided."""
    source: str | None = None
    """`tokens` or `events`: which callback feeds this run (`_StreamGuard.event`)."""
    last: float = field(default_factory=time.monotonic)
    """When it was opened or last fed (`IDLE_RUN_S`)."""
    idle: bool = False
    """Its stream was closed for idling; `text` holds what it was fed, to open it again."""
    taken: dict[Any, int] = field(default_factory=dict)
    """The strictness of the outcome taken, by where it was flagged (the text, or a call):
    a later flag there is enforced only when stricter, so a logged flag does not end the
    monitoring of what follows."""


IDLE_RUN_S = 600.0
"""A run neither fed nor ended for this long has its stream closed, which frees the monitor's
key/value cache of its whole prompt: LangChain sends neither an end nor an error for a run whose
caller's task was cancelled while the model waited (a timeout, a client gone), and each such run
held its cache for good. Should it stream or end after all, its stream is opened again and fed
what it was fed before, so nothing it says goes unjudged."""


class _StreamGuard:
    """One handler's state and logic, whichever callback API (sync or async) drives it."""

    def __init__(self, monitor: StreamMonitor, policy: Policy | Guard | None, conversation_id: str | None) -> None:
        self.monitor = monitor
        # the agent's guard shares its sinks (one writer per audit file) and its MCP tool catalog
        self.guard = policy if isinstance(policy, Guard) else Guard(policy or Policy())
        self.policy = self.guard.policy
        self.conversation_id = conversation_id
        self.decisions: list[Decision] = []
        self.runs: dict[UUID, _Run] = {}
        self._lock = threading.Lock()

    def open_chat(self, run_id: UUID, messages: list[BaseMessage]) -> None:
        self._open(run_id, to_trajectory(messages, conversation_id=self.conversation_id))

    def open_prompt(self, run_id: UUID, prompt: str) -> None:
        self._open(run_id, Trajectory(steps=[UserStep(content=prompt)], conversation_id=self.conversation_id))

    def token(self, run_id: UUID, token: str, chunk: Any) -> None:
        run = self._running(run_id)
        if run is None or run.source == "events":
            return
        self._awake(run)
        run.source = "tokens"
        message = getattr(chunk, "message", None)
        tool_chunks = list(getattr(message, "tool_call_chunks", None) or [])
        # a chunk of content blocks (Anthropic's, `output_version="v1"`) comes as their list:
        # their text, as a finished message's is read (its calls come as `tool_call_chunks`)
        said = token if isinstance(token, str) else message_text([b for b in token if not (isinstance(b, dict) and "call" in str(b.get("type")))])
        self._feed(run, run.renderer.content(said) + "".join(run.renderer.tool_call_chunk(dict(c)) for c in tool_chunks))

    def event(self, run_id: UUID, event: Mapping[str, Any]) -> None:
        """A protocol event of `stream_events(version="v3")`, which LangChain fires in place of
        `on_llm_new_token` (the text reached the consumer unmonitored until the run ended) unless
        the provider's own stream calls that too: a run is fed by whichever of the two comes
        first, never by both. Text and reasoning deltas are read as their chunks are, a tool call
        block as its `tool_call_chunks`."""
        run = self._running(run_id)
        if run is None or run.source == "tokens":
            return
        kind, index = event.get("event"), event.get("index")
        content = event.get("content") if kind == "content-block-start" else None
        delta = event.get("delta") if kind == "content-block-delta" else None
        if kind == "content-block-finish":
            content = event.get("content")
        if isinstance(content, Mapping) and content.get("type") == "tool_call_chunk":
            chunk = {"index": index, "id": content.get("id"), "name": content.get("name"), "args": content.get("args") or ""}
            text = run.renderer.tool_call_chunk(chunk)
        elif (kind == "content-block-finish" and isinstance(content, Mapping)
              and content.get("type") in ("tool_call", "invalid_tool_call") and not run.renderer.has_call(index)):
            # a call that came whole (a provider's finished block, a cached response replayed)
            # and was never fed as chunks: as its finished block says it, in one piece
            args = content.get("args")
            whole = args if isinstance(args, str) else json.dumps(args if args is not None else {}, ensure_ascii=False)
            text = run.renderer.tool_call_chunk({"index": index, "id": content.get("id"), "name": content.get("name"), "args": whole})
        elif isinstance(delta, Mapping) and delta.get("type") == "tool-call-delta":
            text = run.renderer.tool_call_chunk({"index": index, "args": delta.get("args") or ""})
        elif isinstance(delta, Mapping) and delta.get("type") in ("text-delta", "reasoning-delta"):
            block = {"type": "text", "text": delta.get("text")} if delta["type"] == "text-delta" else {"type": "reasoning", "reasoning": delta.get("reasoning")}
            text = run.renderer.content(message_text([block]))
        else:
            return
        self._awake(run)
        run.source = "events"
        self._feed(run, text)

    def _running(self, run_id: UUID) -> _Run | None:
        """The run (None where it is not monitored); one the policy stopped raises its stop again."""
        run = self.runs.get(run_id)
        if run is not None and run.stopped is not None:
            raise run.stopped
        return run

    def monitoring(self) -> int:
        """Runs open and not stopped. A stopped run is kept, its stream closed, only to raise
        its stop again until LangChain ends it, which `astream_events(version="v3")` does after
        the consumer already has the error."""
        with self._lock:
            return sum(run.stopped is None for run in self.runs.values())

    def end(self, run_id: UUID, response: LLMResult | None = None) -> None:
        with self._lock:
            run = self.runs.pop(run_id, None)
        if run is None:
            return
        try:
            self._awake(run)
            if run.stopped is None and not run.text and response is not None:
                self._unstreamed(run, response)
            else:
                self._finish(run)
        finally:
            run.stream.close()

    def _finish(self, run: _Run) -> None:
        """The text held back for its word to go on, judged once the run ends, however it ends:
        the consumer has read it already."""
        if run.stopped is not None:
            return
        tail = run.renderer.finish()
        run.text.append(tail)
        run.stream.feed(tail)
        run.stream.finish()
        self._enforce(run)

    def _feed(self, run: _Run, text: str) -> None:
        """`text` to the run's stream, kept to open it again after idling, and every flag it
        raised decided."""
        run.text.append(text)
        run.stream.feed(text)
        self._enforce(run)

    def _unstreamed(self, run: _Run, response: LLMResult) -> None:
        """Nothing was streamed (`invoke`, `disable_streaming`, a model without `_stream`): each
        candidate response (`n` > 1 returns several) whole, as it would have streamed, before
        anyone reads it; each answers the same request, so each other than the first on a
        stream of its own."""
        candidates = [generation for generations in response.generations for generation in generations]
        for number, generation in enumerate(candidates):
            each = run if number == 0 else _Run(self.monitor.open(run.trajectory), run.trajectory)
            try:
                self._whole(each, generation)
                self._finish(each)
            finally:
                if each is not run:
                    each.stream.close()

    def _whole(self, run: _Run, generation: Generation) -> None:
        message = getattr(generation, "message", None)
        text = message_text(message.content) if message is not None else getattr(generation, "text", "")
        pieces = [run.renderer.content(text)]
        for index, call in enumerate(getattr(message, "tool_calls", None) or []):
            args = json.dumps(call.get("args") or {}, ensure_ascii=False)
            pieces.append(run.renderer.tool_call_chunk({"index": index, "name": call.get("name"), "args": args}))
        whole = "".join(pieces)
        if whole:
            self._feed(run, whole)

    def error(self, run_id: UUID) -> None:
        with self._lock:
            run = self.runs.pop(run_id, None)
        if run is None:
            return
        try:
            self._awake(run)
            self._finish(run)
        except StreamFlaggedError:
            pass  # the run is over, stopped by its own error, which goes on; the decision is recorded
        finally:
            run.stream.close()

    def _open(self, run_id: UUID, trajectory: Trajectory) -> None:
        if trajectory.latest_user_index() is None:
            return
        stream = self.monitor.open(trajectory)
        with self._lock:
            idle = [run for run in self.runs.values() if not run.idle and time.monotonic() - run.last > IDLE_RUN_S]
            self.runs[run_id] = _Run(stream, trajectory)
        for run in idle:
            run.idle = True
            run.stream.close()

    def _awake(self, run: _Run) -> None:
        """A run closed for idling, opened again where it was: its stream fed what it was fed
        (its flags were decided then), so what it says next is judged in its context."""
        run.last = time.monotonic()
        if not run.idle or run.stopped is not None:
            return
        run.stream = self.monitor.open(run.trajectory)
        for text in run.text:
            run.stream.feed(text)
        run.acted, run.idle = len(run.stream.flags), False

    def _enforce(self, run: _Run) -> None:
        """Each flag not decided yet, in order, at its own place: one feed may carry several (a
        chunk of words, a whole call, a response that was not streamed), and a lenient outcome
        for the first must not hide a stricter one after it."""
        while run.acted < len(run.stream.flags):
            run.acted += 1
            self._decide(run, run.stream.flags[run.acted - 1])

    def _decide(self, run: _Run, flagged: TokenVerdict) -> None:
        verdict = run.stream.verdict(flagged)
        # the flagged token's place, not the latest call's: text held back to the next word can
        # be judged only once a call's name has arrived, and is the content's, under the defaults;
        # the stream places it in the characters it was fed, which are the renderer's
        in_call, tool = run.renderer.tool_at(flagged.end)
        # a rule whose conditions read the call's arguments or thread may apply or not, and a
        # call whose name has not streamed yet may be any tool's: the strictest that may apply
        candidates = self.policy.rules_for(self._known(tool)) if in_call else [("defaults", None)]
        field = _OUTCOME_FIELD[flagged.risk.label]
        rule_name, action = max(((name, self.policy.outcome(rule, field)) for name, rule in candidates), key=lambda named: named[1].strictness)
        on_error = max((self.policy.outcome(rule, "on_error") for _, rule in candidates), key=lambda each: each.strictness)
        where = (in_call, tool)
        if where in run.taken and action.strictness <= run.taken[where]:
            return  # already carried out there, as strictly
        run.taken[where] = action.strictness
        # recorded before it is acted on; one that cannot be recorded comes back as its rules' on_error
        decision = self.guard.record_review(Decision(
            action=action,
            rule=rule_name,
            why=f"streamed response flagged {flagged.risk.label.value} ({flagged.category}) at token {flagged.index}",
            verdict=verdict,
            conversation_id=self.conversation_id,
        ), on_error)
        self.decisions.append(decision)
        if decision.action in (Action.BLOCK, Action.ESCALATE):
            run.stopped = StreamFlaggedError(decision, "".join(run.text))
            run.stream.close()
            raise run.stopped
        if decision.action == Action.LOG:
            logger.warning("%s", decision.why)

    def _known(self, tool: str) -> ToolCall | str | None:
        """The call as far as it is known: a tool the guard's catalog holds is that MCP server's;
        any other name may be any server's, or none's (`Policy.rules_for`)."""
        if not tool:
            return None
        return self.guard.tools.stamp(ToolCall(id="", name=tool)) if tool in self.guard.tools else tool


class _Handler:
    """What both handlers share: the state, and what a user reads back from it."""

    raise_error = True
    run_inline = True

    def __init__(self, monitor: StreamMonitor, policy: Policy | Guard | None = None, *, conversation_id: str | None = None) -> None:
        """`policy`: the policy, or the agent's `Guard` (its audit sinks and its MCP tools)."""
        self._guard = _StreamGuard(monitor, policy, conversation_id)

    @property
    def decisions(self) -> list[Decision]:
        """Every decision taken on a flagged stream, in order."""
        return self._guard.decisions

    @property
    def active_runs(self) -> int:
        """Model runs being monitored now; 0 once every run has ended, failed or been stopped."""
        return self._guard.monitoring()


class StreamGuardCallbackHandler(_Handler, BaseCallbackHandler):
    """Feeds every streamed chat-model run to a `StreamMonitor` and enforces the policy.

    `raise_error` makes LangChain re-raise `StreamFlaggedError` instead of logging it;
    `run_inline` keeps the handler in the caller's thread, so tokens are fed in order and the
    error surfaces in the caller. In async runs that thread is the event loop's, which each
    token's model step then holds: use `AsyncStreamGuardCallbackHandler` there."""

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any) -> None:
        self._guard.open_chat(run_id, messages[0])

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        self._guard.open_prompt(run_id, prompts[0])

    def on_llm_new_token(self, token: str, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        self._guard.token(run_id, token, chunk)

    def on_stream_event(self, event: Any, *, run_id: UUID, **kwargs: Any) -> None:
        self._guard.event(run_id, event)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._guard.end(run_id, response)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._guard.error(run_id)


class AsyncStreamGuardCallbackHandler(_Handler, AsyncCallbackHandler):
    """`StreamGuardCallbackHandler` for `astream` / `astream_events` runs: each callback awaits
    its work (tokenising, the monitor's model step) on a worker thread, so the event loop stays
    free while tokens are still fed one after another, in order."""

    async def on_chat_model_start(
        self, serialized: dict[str, Any], messages: list[list[BaseMessage]], *, run_id: UUID, **kwargs: Any
    ) -> None:
        await off_loop(self._guard.open_chat, run_id, messages[0])

    async def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID, **kwargs: Any) -> None:
        await off_loop(self._guard.open_prompt, run_id, prompts[0])

    async def on_llm_new_token(self, token: str, *, chunk: Any = None, run_id: UUID, **kwargs: Any) -> None:
        await off_loop(self._guard.token, run_id, token, chunk)

    async def on_stream_event(self, event: Any, *, run_id: UUID, **kwargs: Any) -> None:
        await off_loop(self._guard.event, run_id, event)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        await off_loop(self._guard.end, run_id, response)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        await off_loop(self._guard.error, run_id)
