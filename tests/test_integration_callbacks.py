"""SodaGuardCallbackHandler in a plain tool-calling loop, OpenTelemetry spans, and whether the
AutoMode decision model is offered."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from soda_guard.integrations import langchain as lc_integration
from soda_guard.integrations.langchain import SodaGuardCallbackHandler, ToolCallBlocked
from soda_guard.integrations.testing import scripted_model, tool_calls_message
from soda_guard.tracing import SPAN_NAME, OpenTelemetrySink

from integration_helpers import make_guard, make_tools, numbered


def loop(handler: SodaGuardCallbackHandler, replies: list[Any], ran: list[Any]) -> list[Any]:
    """A hand-written agent loop with no middleware: model, then each tool, until no calls."""
    model = scripted_model(replies)
    tools = {tool.name: tool for tool in make_tools(ran)}
    config = {"callbacks": [handler]}
    messages: list[Any] = [HumanMessage("Clean the disk.")]
    while True:
        reply = model.invoke(messages, config)
        messages.append(reply)
        if not reply.tool_calls:
            return messages
        for call in reply.tool_calls:
            try:
                messages.append(tools[call["name"]].invoke(call, config))
            except ToolCallBlocked as blocked:
                messages.append(ToolMessage(str(blocked), tool_call_id=call["id"], status="error"))


def test_callback_handler_stops_blocked_tool_before_it_runs() -> None:
    guard, backend = make_guard()
    handler = SodaGuardCallbackHandler(guard)
    ran: list[Any] = []
    calls = (("read_file", {"path": "a"}), ("delete_file", {"path": "/"}), ("send_email", {"to": "x"}))
    messages = loop(handler, [numbered(*calls), "done"], ran)
    assert [name for name, _ in ran] == ["read_file", "send_email"]
    assert backend.batches == [3]
    blocked = messages[3]
    assert blocked.status == "error" and "delete_file" in blocked.content
    assert [d.action.value for d in handler.decisions] == ["allow", "block", "allow"]
    assert [d.tool_call.id for d in handler.decisions] == ["call_0", "call_1", "call_2"]


def test_callback_handler_log_mode_only_records() -> None:
    guard, _ = make_guard()
    handler = SodaGuardCallbackHandler(guard, raise_error=False)
    ran: list[Any] = []
    loop(handler, [tool_calls_message(("delete_file", {"path": "/"})), "done"], ran)
    assert ran == [("delete_file", {"path": "/"})]
    assert handler.decisions[0].action.value == "block"
    assert handler.trajectory.steps[-2].content == "deleted /"


def test_callback_handler_raise_carries_decision_and_records_tool_errors() -> None:
    guard, _ = make_guard(unsafe=('"/"',))
    handler = SodaGuardCallbackHandler(guard)
    ran: list[Any] = []
    tools = {tool.name: tool for tool in make_tools(ran)}
    with pytest.raises(ToolCallBlocked) as caught:
        tools["delete_file"].invoke({"path": "/"}, {"callbacks": [handler]})
    assert caught.value.decision.action.value == "block" and ran == []
    assert handler.trajectory.steps[-1].is_error and "refused" in handler.trajectory.steps[-1].content
    handler = SodaGuardCallbackHandler(guard)
    assert tools["flaky"].invoke({"x": "1"}, {"callbacks": [handler]}) == "the service is down"
    assert handler.trajectory.steps[-1].content == "the service is down"
    assert tools["read_file"].invoke("{not json", {"callbacks": [handler]}) == "contents of {not json"
    assert handler.decisions[-1].tool_call.args == "{not json" and handler.decisions[-1].allowed
    assert [d.tool_call.name for d in handler.decisions] == ["flaky", "read_file"]


def test_opentelemetry_span_per_judgment() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    guard, _ = make_guard(sinks=[OpenTelemetrySink(provider)])
    handler = SodaGuardCallbackHandler(guard, raise_error=False, otel=True)
    ran: list[Any] = []
    loop(handler, [tool_calls_message(("read_file", {"path": "a"}), ("delete_file", {"path": "/"})), "done"], ran)
    spans = exporter.get_finished_spans()
    assert [span.name for span in spans] == [SPAN_NAME, SPAN_NAME]
    attributes = [dict(span.attributes) for span in spans]
    assert [a["soda_guard.action"] for a in attributes] == ["allow", "block"]
    assert attributes[1]["soda_guard.verdict.label"] == "unsafe"
    assert attributes[1]["soda_guard.tool.name"] == "delete_file"
    assert spans[0].start_time <= spans[0].end_time


def test_decision_model_is_offered_exactly_where_langchain_core_decisions_exists() -> None:
    has = importlib.util.find_spec("langchain_core.decisions") is not None
    assert lc_integration.HAS_DECISION_MODELS is has
    assert hasattr(lc_integration, "SodaGuardDecisionModel") is has
