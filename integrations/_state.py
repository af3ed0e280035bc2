"""The guard's records in graph state: which of them a node may use, and how they are stored.

A record is used only where it was made for: signed by the guard (`soda_guard.seal`),   not closed by
a later model turn, and, in a time-travel replay, made in that replay. Anything
else is ignored and its calls are judged (and reviewed) again.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from collections.abc import Mapping, Sequence
from typing import Any, Generator

from langchain_core.messages import BaseMessage

from langgraph.config import get_config
from langgraph._internal._constants import CONF, CONFIG_KEY_CALL, CONFIG_KEY_CHECKPOINT_ID, CONFIG_KEY_REPLAY_STATE

from soda_guard.records import TurnRecords
from soda_guard.seal import RecordSeal

from soda_guard.integrations._convert import last_turn, turn_id, turn_records


def replay_of() -> str | None:
    """The checkpoint a time-travel replay started from; None in any other run. LangGraph
    re-runs the steps after that checkpoint, so records in the forked state were made for steps
    that already ran once. A replay is `invoke` at an earlier `checkpoint_id` (LangGraph marks
    it in the run's config), or a resume (`Command(resume=...)`) addressed at a checkpoint the
    thread has moved past (`_superseded_resume`)."""
    try:
        configurable = get_config().get("configurable") or {}
    except RuntimeError:
        return None
    replay = configurable.get(CONFIG_KEY_REPLAY_STATE)
    if replay is not None:
        return str(getattr(replay, "checkpoint_id", None) or "replay")
    return _superseded_resume(configurable)


def _superseded_resume(configurable: Mapping[str, Any]) -> str | None:
    """The checkpoint a resume addressed, where the thread had moved past it when the run
    started: LangGraph re-runs the tasks that finished there as in a replay, but marks none in
    the config. Its run loop decides that once, as the run starts (a resume at the thread's own
    latest checkpoint, as LangGraph Studio sends, is no replay, even after the run has moved on),
    and every task holds the loop through `CONFIG_KEY_CALL` (a partial of its `accept_push`).
    A loop that addresses a checkpoint but does not tell whether it was moved past is taken to
    replay it."""
    loop = _run_loop(configurable.get(CONFIG_KEY_CALL))
    addressed = (getattr(loop, "config", None) or {}).get(CONF, {}).get(CONFIG_KEY_CHECKPOINT_ID)
    if not addressed or not getattr(loop, "_addressed_checkpoint_superseded", True):
        return None
    return str(addressed)


def _run_loop(call: Any) -> Any:
    """The loop behind a task's `CONFIG_KEY_CALL`: a partial of its `accept_push`, or a function
    around one (a node added with `timeout=` runs under a scope that wraps it in a closure,
    where it was not found, and such a node's resume at a moved-past checkpoint passed as none)."""
    for _ in range(_MAX_WRAPPERS):
        keywords = getattr(call, "keywords", None)
        if isinstance(keywords, Mapping):
            return getattr(keywords.get("schedule_task"), "__self__", None)
        inner = [cell.cell_contents for cell in getattr(call, "__closure__", None) or () if _filled(cell)]
        call = next((value for value in inner if isinstance(value, functools.partial)), None) or next(
            (value for value in inner if inspect.isfunction(value)), None
        )
        if call is None:
            return None
    return None


_MAX_WRAPPERS = 4
"""How many functions around the loop's partial are looked through."""


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


@dataclass(frozen=True)
class Replayed:
    """Record, durably (a LangGraph task), whether this node first ran in a time-travel
    replay (`replay`, from `replay_of`); sent back is what its first run recorded, so a node
    that pauses in a replay and is resumed (a plain run) still does not use the records the
    forked state brought along."""

    replay: str | None


def stored_turn(state: Any, key: str, seal: RecordSeal) -> Generator[Replayed, Any, TurnRecords | None]:
    """The turn's records in `state` that this node may use (see `turn_records`). Whether
    the node runs in a replay is recorded only when there are records to use: the parallel
    calls of one `ToolNode` run share one task counter, and a task per call would race. A
    replay's records, too, are those it wrote itself (`TurnRecords.for_replay`)."""
    stored = turn_records(state, key, seal)
    if stored is None:
        return None
    replay = (yield Replayed(replay_of())).replay
    return stored.for_replay(replay)


def state_form(turn: TurnRecords, seal: RecordSeal) -> dict[str, Any]:
    """`turn` as stored in graph state: signed, and marked with the replay it was made in."""
    return turn.model_copy(update={"replay": replay_of()}).for_state(seal)


def closing(stored: TurnRecords | None, messages: Sequence[BaseMessage]) -> TurnRecords | None:
    """The stored records, closed, when the latest model turn is another one and has no
    pending calls: left open, they would stay usable in the state after their calls ran, and
    a call made pending again (its result removed through `update_state`) would run again
    unjudged on them. None when there is nothing to close."""
    located = last_turn(messages)
    if stored is None or stored.closed or located is None or turn_id(located[1], located[0]) == stored.turn_id:
        return None
    return stored.close()
