"""What a decision is bound to: the exact tool call it judged.

A tool-call id alone names nothing: providers number calls per turn, traces reuse and omit
ids, and middleware can rewrite arguments after a turn was judged. A stored verdict or a
reviewer's answer therefore applies to a call only when the conversation, the turn, the id,
the tool and the arguments all match; anything else is a new call and is judged again.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from soda_guard.hashing import sha256_hex


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
"""Built once: `json.dumps` with any option builds a new encoder per call."""


def args_digest(args: Any) -> str:
    """A canonical hash of tool arguments: key order does not matter, any other change does.
    Raw-string arguments (not valid JSON) hash differently from any object."""
    if isinstance(args, str):
        canonical = "s:" + args
    else:
        canonical = "j:" + _CANONICAL.encode(args)
    return sha256_hex(canonical.encode("utf-8", "surrogatepass"))


class CallBinding(BaseModel):
    """The identity of one tool call: where it was asked for and exactly what it asks."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    thread_id: str | None
    turn_id: str
    call_id: str
    tool: str
    args_digest: str

    @classmethod
    def of(cls, *, thread_id: str | None, turn_id: str, call_id: str, tool: str, args: Any) -> CallBinding:
        return cls(thread_id=thread_id, turn_id=turn_id, call_id=call_id, tool=tool, args_digest=args_digest(args))
