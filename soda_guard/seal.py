"""Authentication of the records the guard keeps in graph state.

Graph state is writable by more than the guard: `update_state`, any node, a forked
checkpoint. A record there that says a call was allowed or approved would let that call run
unjudged if it were taken at its word, so each record carries an HMAC-SHA256 over its whole
content (binding, decision, review, outcome, arguments that run) under a key only the guard
holds, and a record that does not verify is ignored: its call is judged (and reviewed) again.
The tag is the MAC's first 128 bits (as HMAC-SHA-256-128 of RFC 4868): forging one takes
about 2**128 tries, and the graph stores it again at every step.

The key comes from the policy (`records.key`), else from the environment variable the policy
names (`records.key_env`, default `SODA_GUARD_STATE_KEY`), else from a random key made once per
process: records written by another process (a restart, another worker) then do not verify,
and their calls are judged again, an escalation asked again.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from soda_guard.hashing import Hmac
from soda_guard.policy import Policy

MAC_KEY = "mac"
RECORD_KEY = "record"

_PROCESS_KEY = secrets.token_bytes(32)
_REMEMBERED = 1024
_TAG_HEX = 32


class RecordSeal:
    """Signs and verifies one record's JSON (`CallRecord` as stored in state). The MAC is
    over the JSON text itself, which is stored as text: verifying it needs no parse and no
    canonical form, and only a record that verifies is parsed."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a state-record key needs at least 16 bytes")
        self._hmac = Hmac(key)
        self.key_id = self._hmac.hex(b"soda-guard key id")[:32]
        """Names the key without showing it: what is shared between the guards that can read
        each other's records."""
        self._signed: OrderedDict[int, tuple[dict[str, Any], list[Any], Any]] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_policy(cls, policy: Policy) -> RecordSeal:
        configured = policy.records.key
        if configured is not None:
            return cls(configured.get_secret_value().encode())
        from_env = os.environ.get(policy.records.key_env, "")
        if from_env:
            return cls(from_env.encode())
        return cls(_PROCESS_KEY)

    def _mac(self, record: str, turn: str) -> str:
        # `turn` is JSON, which escapes every newline: the separator cannot be forged
        return self._hmac.hex(f"{turn}\n{record}".encode("utf-8", "surrogatepass"))[:_TAG_HEX]

    def remember(self, stored: dict[str, Any], turn: Any) -> None:
        """Note that this process signed `stored` (a turn's state form) for `turn`, the typed
        records it holds: the graph hands the same object to the next node, which then need
        not verify and parse it again (`recall`)."""
        with self._lock:
            self._signed[id(stored)] = (stored, _parts(stored), turn)
            self._signed.move_to_end(id(stored))
            while len(self._signed) > _REMEMBERED:
                self._signed.popitem(last=False)

    def recall(self, stored: Any) -> Any:
        """The typed records `remember` noted for this very object, if nothing in it was
        replaced or edited since (every part is compared with what was signed: the record
        texts and MACs are strings, so an edit in place of a record's dict shows as another
        text; the parts are kept alive so that an identity is never reused); None otherwise,
        and the caller verifies it."""
        with self._lock:
            found = self._signed.get(id(stored))
        if found is None or found[0] is not stored:
            return None
        # identical parts compare at C speed; a part replaced by an equal value reads the same
        if _parts(stored) != found[1]:
            return None
        return found[2]

    def sign(self, record: str, turn: str) -> dict[str, str]:
        """`record` (its JSON) with its MAC, which also covers `turn` (the JSON of the fields of
        the turn the record is stored with), so neither can be moved to or changed in another
        turn's records."""
        return {RECORD_KEY: record, MAC_KEY: self._mac(record, turn)}

    def verified(self, stored: Any, turn: str) -> str | None:
        """The record's JSON when the MAC is the guard's, else None."""
        if not isinstance(stored, Mapping):
            return None
        record, mac = stored.get(RECORD_KEY), stored.get(MAC_KEY)
        if not isinstance(record, str) or not isinstance(mac, str):
            return None
        return record if hmac.compare_digest(self._mac(record, turn), mac) else None


def _parts(stored: Mapping[str, Any]) -> list[Any]:
    """Every object of a state form that what it says depends on: the header's values, the
    records list, each record's dict, text and MAC."""
    records = stored.get("records")
    parts: list[Any] = [stored.get(name) for name in ("thread_id", "turn_id", "replay", "closed")]
    parts.append(records)
    for record in records if isinstance(records, list) else []:
        parts.append(record)
        if isinstance(record, Mapping):
            parts += [record.get(RECORD_KEY), record.get(MAC_KEY)]
    parts.append(len(stored))
    return parts
