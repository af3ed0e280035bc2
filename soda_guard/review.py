"""A person's answer to an escalated decision, and the audit event that records it.

The audit trail must tell what finally ran: an escalate decision alone says only that a person
was asked. Each answer becomes a `Decision` of its own (rule `review`) that names the decision
it answers, so every sink (JSONL, SQLite, OpenTelemetry, traces) records it without a second
record type.
"""

from __future__ import annotations

import hashlib
from typing import get_args

from soda_guard.trajectory import ToolCall
from soda_guard.verdict import Action, Decision, Review, ReviewType

REVIEW_TYPES: tuple[ReviewType, ...] = get_args(ReviewType)


def review_event(escalation: Decision, review: Review, *, runs: bool, ran_call: ToolCall | None, why: str) -> Decision:
    """The review as an audit record. Its id is derived from the escalation and the answer,
    so a node that re-runs after a crash writes the same record again instead of a second
    review (SQLite replaces it; JSONL readers can drop the repeat)."""
    digest = hashlib.sha256(
        f"{escalation.decision_id}|{review.model_dump_json(exclude={'timestamp'})}".encode()
    ).hexdigest()[:32]
    return Decision(
        decision_id=digest,
        timestamp=review.timestamp,
        action=Action.ALLOW if runs else Action.BLOCK,
        rule="review",
        why=why,
        tool_call=ran_call if ran_call is not None else escalation.tool_call,
        verdict=None,
        conversation_id=escalation.conversation_id,
        review=review,
    )
