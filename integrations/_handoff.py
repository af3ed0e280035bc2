"""A turn whose calls were all simply allowed, handed from the model step to the tool step in
memory rather than through graph state.

Writing the turn's records into state costs a command, a channel write and a checkpoint of
that channel at every model turn: more than the judgment of an instant judge. A simply
allowed call needs nothing that must survive the process: if its record is not here when the
tool step runs (another process or worker, a crash, a retry, a replay), the call is judged
again, which can only cost time. Turns with anything else to keep (a block, a log, an
escalation, a review) still go to graph state, signed, as before.

A record is taken once: the call it was made for runs on it at most once, and a call that is
made pending again (its result removed through `update_state`) is judged again. A record is
found only by its exact binding (thread, turn, call id, tool, arguments) and by the
time-travel replay it was made in, so a replay uses only what it judged itself.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from soda_guard.binding import CallBinding
from soda_guard.records import CallRecord, TurnRecords


Key = tuple[str | None, str, str, str, str]
"""A binding's parts, in `CallBinding`'s order: the tool step finds a record by them before
(and without) building its own binding."""


def key_of(binding: CallBinding) -> Key:
    return (binding.thread_id, binding.turn_id, binding.call_id, binding.tool, binding.args_digest)


class TurnHandoff:
    """Records of simply allowed turns by (replay, binding), bounded by the records held: a
    turn whose tool step never comes (the run stopped in between, a thread abandoned at a
    breakpoint) is evicted with the oldest. Only calls between their model step and their tool
    step are held, so the bound is on concurrency, not on history; a record evicted before its
    tool step only makes that step judge its turn again."""

    def __init__(self, max_records: int = 1 << 12) -> None:
        self.max_records = max_records
        self._records: OrderedDict[tuple[str | None, Key], CallRecord] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def takes(turn: TurnRecords) -> bool:
        """Whether `turn` can be handed over: every call simply allowed (`CallRecord.simply_allowed`)."""
        return bool(turn.records) and all(record.simply_allowed for record in turn.records)

    def put(self, turn: TurnRecords, replay: str | None) -> None:
        with self._lock:
            for record in turn.records:
                self._records[(replay, key_of(record.binding))] = record
            while len(self._records) > self.max_records:
                self._records.popitem(last=False)

    def take(self, key: Key, replay: str | None) -> CallRecord | None:
        if not self._records:
            return None
        with self._lock:
            return self._records.pop((replay, key), None)
