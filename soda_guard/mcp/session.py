"""One MCP client session as the guard sees it: the calls it forwarded with their results,
the context the client sent, and the judgment of each new `tools/call`.

Transport-neutral (plain JSON-RPC dicts in, decisions out), so the stdio relay and the HTTP
front judge alike, and alike with the LangChain middleware: the trajectory is built from the
same steps (`soda_guard.trajectory`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Mapping

from soda_guard.converters import MAX_ARGUMENT_DEPTH, base64_text, from_openai_messages, has_lone_surrogate, nesting_depth, text_media
from soda_guard.errors import SodaGuardError
from soda_guard.guard import Guard
from soda_guard.mcp.annotations import from_wire
from soda_guard.review import review_event
from soda_guard.trajectory import AssistantStep, Step, ToolCall, ToolStep, Trajectory
from soda_guard.verdict import Action, Decision, Review

#: the `_meta` key of a `tools/call` under which a client may send what the judge should know:
#: `{"messages": [OpenAI chat messages: the user's request and recent turns], "session": "id"}`
CONTEXT_KEY = "soda-guard/context"
#: requests other than `tools/call` whose answers a client hands to its model: moderated, where
#: the policy moderates tool results, as the results of calls named by the method
READS = frozenset({"resources/read", "prompts/get", "tasks/result"})
#: the `_meta` key of the text a server gives the model while a task it created runs (MCP 2025-11-25)
IMMEDIATE_RESPONSE_KEY = "io.modelcontextprotocol/model-immediate-response"


class ContextError(SodaGuardError):
    """The client's `_meta` context is not readable: the call is answered with an MCP error."""


@dataclass
class ProxySession:
    """`steps`: the client's latest context, then the calls forwarded since with their
    results, the latest `max_calls` of them (the judge clips a long middle anyway, and an
    unbounded session would make every judgment slower than the last). Calls run
    concurrently, so each is judged on the steps as they stand when it arrives."""

    guard: Guard
    server: str | None
    session_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    annotations: dict[str, dict[str, bool] | None] = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    max_calls: int = 32
    _context_steps: int = 0

    def learn_tools(self, result: Any) -> None:
        """Remember each listed tool's declared annotations (a `tools/list` result, any page)."""
        tools = result.get("tools") if isinstance(result, Mapping) else None
        for tool in tools if isinstance(tools, list) else []:
            if isinstance(tool, Mapping) and isinstance(tool.get("name"), str):
                declared = tool.get("annotations")
                self.annotations[tool["name"]] = from_wire(declared if isinstance(declared, Mapping) else None)

    def call_of(self, request_id: Any, params: Mapping[str, Any]) -> ToolCall:
        """The call a `tools/call` asks for, taking in the context its `_meta` carries."""
        name = params.get("name")
        if not isinstance(name, str):
            raise ContextError("tools/call params.name must be a string")
        arguments = params.get("arguments")
        if arguments is not None and not isinstance(arguments, dict):
            raise ContextError("tools/call params.arguments must be an object")
        if arguments and has_lone_surrogate(arguments):
            raise ContextError("tools/call params.arguments hold a lone surrogate (\\ud800-\\udfff alone), which is no text")
        if arguments and nesting_depth(arguments, MAX_ARGUMENT_DEPTH) > MAX_ARGUMENT_DEPTH:
            # the adapters' limit (`converters.call_args`): past it no decision holding the call
            # can be written, and a block no audit record holds is a verdict lost
            raise ContextError(f"tools/call params.arguments are nested more than {MAX_ARGUMENT_DEPTH} deep")
        meta = params.get("_meta")
        if meta is not None and not isinstance(meta, Mapping):
            raise ContextError("tools/call params._meta must be an object")
        if meta is not None and CONTEXT_KEY in meta:
            self._take_context(meta[CONTEXT_KEY])
        return ToolCall(
            id=f"mcp-{request_id}",
            name=name,
            args=arguments or {},
            server=self.server,
            annotations=self.annotations.get(name),
        )

    def read_call(self, request_id: Any, method: str, params: Any) -> ToolCall:
        """A request in `READS` as the call the policy's `tool_results.tools` can name
        (`resources/read`, ...), its params (without `_meta`) as the arguments."""
        args = {key: value for key, value in params.items() if key != "_meta"} if isinstance(params, Mapping) else {}
        try:
            return ToolCall(id=f"mcp-{request_id}", name=method, args=args, server=self.server)
        except ValueError:  # arguments no trajectory holds (a lone surrogate): the method alone
            return ToolCall(id=f"mcp-{request_id}", name=method, server=self.server)

    def _take_context(self, context: Any) -> None:
        if not isinstance(context, Mapping):
            raise ContextError(f"_meta[{CONTEXT_KEY!r}] must be an object")
        unknown = set(context) - {"messages", "session"}
        if unknown:
            raise ContextError(f"_meta[{CONTEXT_KEY!r}]: unknown keys {sorted(unknown)}")
        session = context.get("session")
        if session is not None:
            if not isinstance(session, str) or not session:
                raise ContextError(f"_meta[{CONTEXT_KEY!r}].session must be a non-empty string")
            self.session_id = session
        if "messages" in context:
            try:
                self.steps = list(from_openai_messages(context["messages"]).steps)
                self._context_steps = len(self.steps)
            except SodaGuardError as error:
                raise ContextError(f"_meta[{CONTEXT_KEY!r}].messages: {error}") from None

    def trajectory(self, call: ToolCall) -> Trajectory:
        return Trajectory(steps=[*self.steps, AssistantStep(tool_calls=[call])], conversation_id=self.session_id)

    async def decide(self, call: ToolCall) -> Decision:
        """Never raises: a guard that cannot decide (an audit sink down under an allow) ends in
        a block that says why."""
        try:
            return (await self.guard.acheck_tool_calls(self.trajectory(call)))[0]
        except Exception as error:
            return self._failed(call, "mcp-proxy", f"the guard could not decide: {type(error).__name__}: {error}")

    async def reviewed(self, escalation: Decision, approved: bool | None, how: str) -> Decision:
        """The person's answer (None: none came) as an audit record; what it returns is what
        may be acted on."""
        review = Review(type="approve" if approved else "reject", answers=escalation.decision_id, message=how)
        event = review_event(escalation, review, runs=bool(approved), ran_call=None, why=how)
        try:
            policy = self.guard.policy
            return await self.guard.arecord_review(event, policy.outcome(policy.rule_named(escalation.rule), "on_error"))
        except Exception as error:
            return event.model_copy(update={"action": Action.BLOCK, "why": f"{how}; not recorded: {error}"})

    def record(self, call: ToolCall, result: Any, *, error: str | None = None) -> None:
        """A forwarded call and what came back, for the judgments of later calls."""
        self.steps.append(AssistantStep(tool_calls=[call]))
        self.steps.append(self.result_step(call, result, error=error))
        calls = self.steps[self._context_steps :]
        if len(calls) > 2 * self.max_calls:
            self.steps = self.steps[: self._context_steps] + calls[-2 * self.max_calls :]

    @staticmethod
    def result_step(call: ToolCall, result: Any, *, error: str | None = None) -> ToolStep:
        is_error = bool(result.get("isError")) if isinstance(result, Mapping) else False
        return ToolStep(tool_call_id=call.id, name=call.name, content=result_text(result), is_error=is_error, error=error)

    async def moderate(self, call: ToolCall, result: Any) -> Decision | None:
        """The policy's tool-result moderation of a forwarded call's result (None: not asked)."""
        if self.guard.policy.tool_results is None:
            return None
        steps = [*self.steps, AssistantStep(tool_calls=[call]), self.result_step(call, result)]
        view = Trajectory(steps=steps, conversation_id=self.session_id)
        try:
            return await self.guard.acheck_tool_result(view)
        except Exception as error:
            return self._failed(call, "tool_results", f"the guard could not moderate the result: {type(error).__name__}: {error}")

    def _failed(self, call: ToolCall, rule: str, why: str) -> Decision:
        """A block standing in for a decision the guard could not make, so nothing runs unrecorded."""
        return Decision(action=Action.BLOCK, rule=rule, why=why, tool_call=call, conversation_id=self.session_id)


def result_text(result: Any) -> str:
    """What a `CallToolResult` says, as the judge reads tool output: its text blocks, a
    `[type]` marker for any other block, and its structured content (a client may read that
    alone: FastMCP's `.data`). The answers in `READS` are read alike: a resource's `contents`
    and a prompt's `messages` (each a content block)."""
    if not isinstance(result, Mapping):
        return ""
    pieces = [_block_text(block) for block in _listed(result.get("content"))]
    pieces += [_block_text({"type": "resource", "resource": item}) for item in _listed(result.get("contents"))]
    if isinstance(result.get("description"), str) and "messages" in result:  # a prompt's
        pieces.append(result["description"])
    pieces += [_block_text(message.get("content")) for message in _listed(result.get("messages")) if isinstance(message, Mapping)]
    if result.get("structuredContent") is not None:  # read by clients beside (or instead of) the text
        pieces.append(json.dumps(result["structuredContent"], ensure_ascii=False, default=str))
    task, meta = result.get("task"), result.get("_meta")
    if isinstance(task, Mapping) and isinstance(task.get("statusMessage"), str):
        pieces.append(task["statusMessage"])
    if isinstance(meta, Mapping) and isinstance(meta.get(IMMEDIATE_RESPONSE_KEY), str):  # a task's text for the model
        pieces.append(meta[IMMEDIATE_RESPONSE_KEY])
    return "\n".join(piece for piece in pieces if piece is not None)


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _block_text(block: Any) -> str | None:
    if not isinstance(block, Mapping):
        return None
    text = block.get("text")
    if block.get("type") == "text" and isinstance(text, str):
        return text
    if block.get("type") == "resource" and isinstance(block.get("resource"), Mapping):
        return _resource_text(block["resource"])
    if block.get("type") == "resource_link":  # a client shows the model its name and description
        return " ".join(str(block[key]) for key in ("name", "title", "description", "uri") if isinstance(block.get(key), str)) or "[resource_link]"
    return f"[{block.get('type', 'block')}]"


def _resource_text(resource: Mapping[str, Any]) -> str:
    """A resource's text; a text resource sent as a base64 blob is text too."""
    text, blob = resource.get("text"), resource.get("blob")
    if isinstance(text, str):
        return text
    decoded = base64_text(blob) if isinstance(blob, str) and text_media(resource.get("mimeType")) else None
    return "[resource]" if decoded is None else decoded


def error_result(error: Any) -> dict[str, Any]:
    """A JSON-RPC error (`{"message", "data"}`) as the tool result a client makes of it: its
    message and data, which a client hands its model as the tool's error."""
    if isinstance(error, dict):
        parts = [str(error.get("message", "")), *([json.dumps(error["data"], ensure_ascii=False, default=str)] if "data" in error else [])]
        text = "\n".join(part for part in parts if part)
    else:
        text = json.dumps(error, ensure_ascii=False, default=str)
    return {"content": [{"type": "text", "text": text}], "isError": True}


def refusal_result(call: ToolCall, decision: Decision) -> dict[str, Any]:
    """The `CallToolResult` a refused call gets: `isError`, the reason, and the decision id."""
    text = (
        f"soda-guard refused to run the tool call `{call.qualified_name}` ({decision.action.value}): {decision.why}. "
        "The tool was not executed."
    )
    return {
        "content": [{"type": "text", "text": text}],
        "isError": True,
        "_meta": {"soda-guard/decision": {"id": decision.decision_id, "action": decision.action.value, "rule": decision.rule}},
    }
