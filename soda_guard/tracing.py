"""OpenTelemetry export of decisions: one span per judgment, the verdict as span attributes.

It is an audit sink (`Guard(sinks=[OpenTelemetrySink()])`) rather than a wrapper around the
judge so every entry point (middleware, graph node, callbacks, CLI) is traced by the same code.
Only `opentelemetry-api` is used: without a configured SDK the spans are no-ops and cost nothing.
"""

from __future__ import annotations

import json
import time
from typing import Any, Sequence

from opentelemetry import trace

from soda_guard.verdict import Decision

SPAN_NAME = "soda_guard.judgment"


def decision_attributes(decision: Decision) -> dict[str, Any]:
    """Flat, OTel-legal attributes (no None values, only scalars and string lists)."""
    attributes: dict[str, Any] = {
        "soda_guard.decision_id": decision.decision_id,
        "soda_guard.action": decision.action.value,
        "soda_guard.rule": decision.rule,
        "soda_guard.why": decision.why,
        "soda_guard.conversation_id": decision.conversation_id,
        "soda_guard.condition": decision.condition,
        "soda_guard.stage": decision.stage,
    }
    if decision.tool_call is not None:
        attributes["soda_guard.tool.name"] = decision.tool_call.name
        attributes["soda_guard.tool.call_id"] = decision.tool_call.id
        if decision.tool_call.server is not None:
            attributes["soda_guard.tool.server"] = decision.tool_call.server
    verdict = decision.verdict
    if verdict is not None:
        attributes.update(
            {
                "soda_guard.verdict.label": verdict.label.value if verdict.label is not None else "failed",
                "soda_guard.verdict.score": verdict.score,
                "soda_guard.verdict.reason": verdict.reason,
                "soda_guard.verdict.categories": list(verdict.categories),
                "soda_guard.verdict.judge": verdict.judge,
                "soda_guard.verdict.kind": verdict.kind,
                "soda_guard.verdict.model": verdict.model,
                "soda_guard.verdict.latency_ms": verdict.latency_ms,
                "soda_guard.verdict.parse_failure": verdict.parse_failure,
                "soda_guard.verdict.error": verdict.error,
                "soda_guard.verdict.truncated": verdict.truncated,
            }
        )
        if verdict.stages:
            attributes["soda_guard.verdict.stages"] = [
                f"{stage.judge}: {stage.label.value if stage.label is not None else 'failed'}"
                + (f" {stage.score:.3f}" if stage.score is not None else "")
                for stage in verdict.stages
            ]
    review = decision.review
    if review is not None:
        attributes.update(
            {
                "soda_guard.review.type": review.type,
                "soda_guard.review.answers": review.answers,
                "soda_guard.review.message": review.message,
                "soda_guard.review.args": None if review.args is None else json.dumps(review.args, default=str),
                "soda_guard.review.edit_decision_id": review.edit_decision_id,
            }
        )
    return {key: value for key, value in attributes.items() if value is not None}


class OpenTelemetrySink:
    """Emits a span per decision, back-dated to cover the judge's latency, so a trace viewer
    shows where the guard spent time and what it decided, under the caller's current span."""

    def __init__(self, tracer_provider: trace.TracerProvider | None = None) -> None:
        self._provider = tracer_provider
        self._tracer = trace.get_tracer("soda_guard", tracer_provider=tracer_provider)

    @property
    def instant(self) -> bool:
        """Whether nothing would record the spans: no SDK (the API's proxy or no-op provider,
        as given or as the global one is now). `write` then returns at once, and an async
        check need not hand it to a thread. Read at every write: an SDK configured later is
        used from then on."""
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        return isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))

    def write(self, decisions: Sequence[Decision], *, deadline: float | None = None) -> None:
        """`deadline` is not used: ending a span hands it to the provider's span processor."""
        if self.instant:
            return
        now_ns = time.time_ns()
        for decision in decisions:
            latency_ms = decision.verdict.latency_ms if decision.verdict is not None else 0.0
            start_ns = min(now_ns, int(decision.timestamp * 1e9) - int(latency_ms * 1e6))
            span = self._tracer.start_span(SPAN_NAME, start_time=start_ns, attributes=decision_attributes(decision))
            if decision.verdict is not None and decision.verdict.failed:
                span.set_status(trace.Status(trace.StatusCode.ERROR, decision.verdict.error or "judge failed"))
            span.end(end_time=max(start_ns, now_ns))
