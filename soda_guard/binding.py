"""What a decision is bound to: the exact tool call it judged.

A tool-call id alone names nothing: providers number calls per turn, traces reuse and omit
ids, and middleware can rewrite arguments after a turn was judged. A stored verdict or a
reviewer's answer therefore applies to a call only when the conversation, the turn, the id,
the tool and the arguments all match; anything else is a new call and is judged again.
"""

from __future__ import annotations

import json
import marshal
from typing import Any

from pydantic import BaseModel, ConfigDict

from soda_guard.hashing import sha256_hex


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=repr)
"""Built once: `json.dumps` with any option builds a new encoder per call."""


def args_digest(args: Any) -> str:
    """A canonical hash of tool arguments: key order does not matter, any other change does.
    Raw-string arguments (not valid JSON) hash differently from any object.

    One call's arguments are digested several times on their way to the tool (its binding,
    the record's lookup, the sealed tool, the tool's own run): small ones are looked up by
    their `marshal` bytes, which differ wherever the arguments differ in any way, types
    included (`1`, `True` and `1.0` compare equal, not alike), and are written at C speed."""
    if isinstance(args, str):
        return _digest("s:" + args)
    try:
        frozen = marshal.dumps(args, MARSHAL_VERSION)
    except ValueError:  # an object marshal does not write (other types, subclasses)
        return _object_digest(args)
    if len(frozen) > _MEMO_MAX_BYTES:
        return _object_digest(args)
    found = _DIGESTS.get(frozen)
    if found is None:
        found = _object_digest(args)
        if len(_DIGESTS) >= _MEMO_ENTRIES:
            _DIGESTS.clear()
        _DIGESTS[frozen] = found
    return found


def _object_digest(args: Any) -> str:
    return _digest("j:" + _CANONICAL.encode(args))


def _digest(canonical: str) -> str:
    return sha256_hex(canonical.encode("utf-8", "surrogatepass"))


MARSHAL_VERSION = 2
"""The `marshal` version the caches that tell values apart by their bytes write: the newest
that writes no back-references, whose use depends on reference counts."""
_MEMO_MAX_BYTES = 2048
_MEMO_ENTRIES = 4096
_DIGESTS: dict[bytes, str] = {}
"""Digests of recent small arguments by their `marshal` bytes (at most 8 MiB of keys)."""


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
