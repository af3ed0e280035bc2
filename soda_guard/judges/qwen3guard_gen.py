"""Qwen3Guard-Gen (`Qwen/Qwen3Guard-Gen-0.6B|4B|8B`).

Its chat template holds the whole instruction and picks the task from the last message's role,
and it renders only string user/assistant content: agent actions must be turned into text first
(shared/reference/judges.md §2).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Hashable, Literal, Sequence

from soda_guard.errors import TrajectoryError
from soda_guard.judges.base import (
    JSON_TEXT,
    Judge,
    LineOpenings,
    ParsedOutput,
    RenderedPrompt,
    ScoreSpec,
    assistant_parts,
    last_index,
    step_roles,
    text_size,
    tool_result_text,
)
from soda_guard.judges.context import (
    GEN_DELIMITERS,
    RANK_ASSISTANT,
    RANK_TOOL_RESULT,
    RANK_USER,
    Block,
    ContextBudget,
    Omitted,
    fit_blocks,
    neutralise,
    omission_marker,
)
from soda_guard.judges.elision import Pieces
from soda_guard.judges.incremental import BlockMemo, HistoryMemo, Lru, PreparedHistory, continues
from soda_guard.trajectory import AssistantStep, SystemStep, ToolStep, Trajectory, UserStep, exact_steps
from soda_guard.verdict import Label

QWEN3GUARD_GEN_MODEL_ID = "Qwen/Qwen3Guard-Gen-4B"

Mode = Literal["prompt", "response", "tool_result"]

CATEGORIES = (
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
    "Jailbreak",
    "None",
)

_SAFETY = re.compile(r"(?<!\\)Safety: (Safe|Unsafe|Controversial)\b")
_LABEL_WORD = re.compile(r"\b(?:Safe|Unsafe|Controversial)\b")
_REFUSAL = re.compile(r"Refusal: (Yes|No)")
_CATEGORY = re.compile("|".join(re.escape(name) for name in CATEGORIES))
_CATEGORIES_LINE = re.compile(r"^Categories:(.*)$", re.MULTILINE)
_LABELS = {"Safe": Label.SAFE, "Unsafe": Label.UNSAFE, "Controversial": Label.CONTROVERSIAL}


def wrap_tool_response(content: str) -> str:
    """How Qwen agents feed tool results back: a user turn wrapping the result."""
    return f"<tool_response>\n{content}\n</tool_response>"


_TOOL_WRAPPER = len(wrap_tool_response(""))


def _neutralised(text: str) -> str:
    return neutralise(text, GEN_DELIMITERS)


def _as_block(step: SystemStep | UserStep | AssistantStep | ToolStep, protected: bool, whole: bool = False) -> Block:
    if isinstance(step, SystemStep):
        return Block("system", _neutralised(step.content), protected, RANK_USER, whole)
    if isinstance(step, AssistantStep):
        parts = assistant_parts(step, _neutralised)
        return Block("assistant", "".join(parts), protected, RANK_ASSISTANT, whole, parts=parts)
    if isinstance(step, ToolStep):
        return Block("tool", _neutralised(tool_result_text(step)), protected, RANK_TOOL_RESULT)
    return Block("user", _neutralised(step.content), protected, RANK_USER, whole)


def _overhead(block: Block) -> int:
    """What a block costs besides its text: a tool result's wrapper."""
    return _TOOL_WRAPPER if block.role == "tool" else 0


def _base_block(step: SystemStep | UserStep | AssistantStep | ToolStep) -> Block:
    return _as_block(step, False)


def _as_message(item: Block, prefix: str) -> dict[str, str]:
    if item.role == "tool":
        return {"role": "user", "content": prefix + wrap_tool_response(item.text)}
    return {"role": item.role, "content": prefix + item.text}


def _message(item: Block) -> dict[str, str]:
    return _as_message(item, "")


def _block_key(step: SystemStep | UserStep | AssistantStep | ToolStep) -> Hashable:
    """What a step's block is rendered from, and nothing else: equal keys render equally."""
    if isinstance(step, AssistantStep):
        return ("assistant", step.content, tuple((call.qualified_name, type(call.args), JSON_TEXT.encode(call.args)) for call in step.tool_calls))
    if isinstance(step, ToolStep):
        return ("tool", tool_result_text(step))
    return (step.role, step.content)


def _after(block: Block, count: int) -> dict[str, str]:
    return _as_message(block, omission_marker(count) + "\n")


def _kept(pieces: list[dict[str, str] | str]) -> list[dict[str, str]]:
    return list(filter(None, pieces))  # type: ignore[arg-type]


def _joined(parts: list[list[dict[str, str]]], trailing: int) -> tuple[list[dict[str, str]], str]:
    return list(itertools.chain.from_iterable(parts)), omission_marker(trailing) + "\n" if trailing else ""


_PIECES = Pieces(_message, lambda count: "", _kept, _joined, _after)
"""`_messages` as one piece per block: a kept message's dict, the marker of a run before it
at the start of its content, "" for a left-out one; and the marker still waiting when a run
ends the history."""


def _messages(items: Sequence[Block | Omitted], prefix: str = "") -> tuple[list[dict[str, str]], str]:
    """The items as template messages, an elided run announced at the start of the next kept
    message; with the marker still waiting for its message."""
    messages = []
    for item in items:
        if isinstance(item, Omitted):
            prefix = item.marker + "\n"
        else:
            messages.append(_as_message(item, prefix))
            prefix = ""
    return messages, prefix


def _window(trajectory: Trajectory, mode: Mode) -> tuple[list[SystemStep | UserStep | AssistantStep | ToolStep], int, int | None]:
    """(the messages shown, the request's index among them, the judged action's)."""
    return _window_parts(trajectory, mode)[:3]  # type: ignore[return-value]


def _window_parts(trajectory: Trajectory, mode: Mode) -> tuple[list[SystemStep | UserStep | AssistantStep | ToolStep], int, int | None, int]:
    """`_window`, and the index among the trajectory's steps of the message moderated (the
    window's last; the window is the steps before it as they are where no later system message
    was left out); found by the steps' roles at C speed: a guard asks at every call, across the
    whole conversation."""
    steps = trajectory.steps
    roles = step_roles(steps)
    start = last_index(roles, "user")
    if start is None:
        raise TrajectoryError(None, "Qwen3Guard needs a user message to moderate against")
    end = start
    if mode != "prompt":
        target = _TARGET[mode]
        found = last_index(roles, target)
        if found is None or found < start:
            raise TrajectoryError(None, f"no {target} message to moderate in {mode} mode")
        end = found
    try:
        roles.index("system", 1, end + 1)
    except ValueError:  # no later system message to leave out: the window is a slice
        window, shown, request = steps[: end + 1], roles[: end + 1], start
    else:
        kept = [0, *(index for index in range(1, end + 1) if roles[index] != "system")]
        window, shown, request = [steps[index] for index in kept], [roles[index] for index in kept], kept.index(start)
    action = last_index(shown, "assistant")
    return window, request, action if action is not None and action >= request else None, end


_TARGET = {"response": "assistant", "tool_result": "tool"}
"""The role of the message each mode moderates after the request."""


@dataclass(frozen=True)
class _Window:
    """What a conversation's last render showed before the message moderated: its steps
    (held, so that a later trajectory is known to continue them by the identity of its first
    steps), the request's and the action's indexes, the history prepared, and the trajectory's
    steps before the message moderated where system messages left out of the window make them
    differ from `steps` (`ShownWhole`'s source)."""

    steps: list[SystemStep | UserStep | AssistantStep | ToolStep]
    request: int
    action: int | None
    prepared: PreparedHistory
    source: list[SystemStep | UserStep | AssistantStep | ToolStep] | None = None


def fit_gen_messages(
    trajectory: Trajectory, mode: Mode, budget: ContextBudget | None = None
) -> tuple[list[dict[str, str]], bool]:
    """Messages for the model's own template, as its authors' pipeline passes a conversation:
    a leading system message and every earlier turn included, up to the message moderated (the
    latest user request in `prompt` mode, the last assistant turn after it in `response` mode,
    the last tool result after it in `tool_result` mode). Content is neutralised; beyond
    `budget` (content characters; the template's fixed text is on top) the oldest messages give
    way first, tool outputs before turns, and the request and the action being judged stay.
    An elided run of messages is announced at the start of the next kept message, which keeps
    the role sequence the template reads. Later system messages are left out, as the template
    leaves them out."""
    budget = budget or ContextBudget()
    window, request, action = _window(trajectory, mode)
    keep = {request, action, len(window) - 1}
    blocks = [_as_block(step, index in keep, index in (request, action)) for index, step in enumerate(window)]
    fitted = fit_blocks(
        blocks,
        budget.max_prompt_chars,
        overhead=_overhead,
        marker_overhead=1,
        max_message_chars=budget.max_message_chars,
    )
    return _messages(fitted.items)[0], fitted.truncated


def render_gen_messages(trajectory: Trajectory, mode: Mode, budget: ContextBudget | None = None) -> list[dict[str, str]]:
    """Messages for the model's own template; the last message decides what is moderated."""
    return fit_gen_messages(trajectory, mode, budget)[0]


def parse_gen_output(text: str) -> ParsedOutput:
    """A label only from exactly one consistent `Safety:` value: output that echoes content
    with a second, different one, or a `Safety:` line naming more than one label, is a parse
    failure, never the first value found. `Safety: Safe` inside a line is a quote
    (`LineOpenings`) and counts for nothing."""
    labels: set[str] = set()
    first: int | None = None
    opens_line = LineOpenings(text)
    for match in _SAFETY.finditer(text):
        if match.group(1) == "Safe" and not opens_line(match.start()):
            continue
        line_end = text.find("\n", match.end())
        if _LABEL_WORD.search(text, match.end(), line_end if line_end >= 0 else len(text)):
            labels.add("")
            break
        labels.add(match.group(1))
        first = match.start(1) if first is None else first
    refusal = _REFUSAL.search(text)
    categories: list[str] = []
    line = _CATEGORIES_LINE.search(text)
    if line:
        categories = [name for name in _CATEGORY.findall(line.group(1)) if name != "None"]
    single = len(labels) == 1 and "" not in labels
    return ParsedOutput(
        label=_LABELS[labels.pop()] if single else None,
        categories=categories,
        refusal=(refusal.group(1) == "Yes") if refusal else None,
        label_at=first if single else None,
    )


def locate_gen_label(text: str) -> int | None:
    return parse_gen_output(text).label_at


class Qwen3GuardGenJudge(Judge):
    kind = "qwen3guard"
    score_spec = ScoreSpec(
        marker=r"Safety:\s*$", positive=("Unsafe", "Controversial"), negative=("Safe",), locate=locate_gen_label
    )

    def __init__(self, name: str | None = None, *, mode: Mode = "response", budget: ContextBudget | None = None) -> None:
        super().__init__(name)
        self.mode: Mode = mode
        self.budget = budget or ContextBudget()
        self._blocks: BlockMemo[SystemStep | UserStep | AssistantStep | ToolStep] = BlockMemo(_block_key, _base_block)
        self._histories = HistoryMemo()
        self._latest: Lru[_Window] = Lru(8 << 20)
        """Each conversation's last window (`_continued`), by id."""

    def _blocks_of(self, steps: Sequence[SystemStep | UserStep | AssistantStep | ToolStep], keep: tuple[int | None, ...], start: int = 0) -> list[Block]:
        """The blocks of `steps` (the window's from index `start` on), the kept ones (indexes
        in `keep`, which may lie past `steps`) protected: only those differ from the defaults,
        so only those are looked at."""
        blocks = list(map(self._blocks.get, steps))
        for index in set(keep):
            if index is not None and start <= index < start + len(steps):
                blocks[index - start] = self._kept(steps[index - start], index, keep)
        return blocks

    def _kept(self, step: SystemStep | UserStep | AssistantStep | ToolStep, index: int, keep: tuple[int | None, ...]) -> Block:
        """A kept step's block: protected, and whole unless it is a tool result (the request
        and the action are never clipped)."""
        whole = index in keep[:2] and not isinstance(step, ToolStep)
        return self._blocks.flagged(self._blocks.get(step), protected=True, whole=whole)

    def _prepare(self, history: list[SystemStep | UserStep | AssistantStep | ToolStep], keep: tuple[int | None, ...], count: int) -> PreparedHistory:
        return PreparedHistory(
            self._blocks_of(history, keep), count, overhead=_overhead, marker_overhead=1, max_message_chars=self.budget.max_message_chars
        )

    def _extend(self, history: list[SystemStep | UserStep | AssistantStep | ToolStep], keep: tuple[int | None, ...], count: int, base: PreparedHistory, base_shape: object) -> PreparedHistory | None:
        """The next turn's history from the previous one's: with the same request, only the
        previous action's flags and the new action's can differ, and the new messages are added."""
        _, base_request, base_action = base_shape  # type: ignore[misc]
        if base_request != keep[0]:
            return None
        size = len(base.blocks)
        changed = {}
        for index in {base_action, keep[1]}:
            if index is not None and index < size:
                block = self._blocks_of([history[index]], keep, start=index)[0]
                if block is not base.blocks[index]:
                    changed[index] = block
        return base.extended(changed, self._blocks_of(history[size:], keep, start=size), count)

    def fit(self, trajectory: Trajectory) -> tuple[list[dict[str, str]], bool]:
        """`fit_gen_messages`, message for message, from blocks rendered once per message and a
        history fitted once per turn and extended turn by turn (`incremental`)."""
        found = self._continued(trajectory)
        if found is None:
            window, request, action, end = _window_parts(trajectory, self.mode)
            last = len(window) - 1
            keep: tuple[int | None, ...] = (request, action, last)
            history, tail = window[:last], window[last]
            source = None if end == last else trajectory.steps[:end]
            rememberable = exact_steps(history if source is None else source)
            prepared = self._histories.get(
                history,
                (self.mode, request, action),
                lambda: self._prepare(history, keep, len(window)),
                lambda base, shape: self._extend(history, keep, len(window), base, shape),
            )
        else:
            history, tail, keep, prepared, source = found
            rememberable = True
        stop = prepared.stop([self._kept(tail, len(history), keep)], self.budget.max_prompt_chars)
        if stop is None:  # the kept messages overflow: clipped to a common level, uncached
            return fit_gen_messages(trajectory, self.mode, self.budget)
        if rememberable and history and self.mode != "prompt":
            weight = 64 * (len(history) + len(source or ()))
            self._latest.put(trajectory.conversation_id, _Window(history, keep[0], keep[1], prepared, source), weight)  # type: ignore[arg-type]
        removals, shown, truncated = stop
        # the history's message dicts are shared by the turn's prompts and the later turns'
        # (`Elision` carries them over): read, never edited
        earlier, prefix = prepared.joined(removals, _PIECES)
        return [*earlier, *_messages(shown, prefix)[0]], truncated

    def _continued(
        self, trajectory: Trajectory
    ) -> tuple[list[SystemStep | UserStep | AssistantStep | ToolStep], SystemStep | UserStep | AssistantStep | ToolStep, tuple[int | None, ...], PreparedHistory, list[SystemStep | UserStep | AssistantStep | ToolStep] | None] | None:
        """(history, message moderated, kept indexes, history prepared, the steps it was read
        from where they differ from it) for a conversation that continues the window its last
        render showed with no new request or system message: the roles of the new steps alone
        are read, the turn's other calls share the prepared history, the next turn extends it.
        None where that does not hold (`fit` then finds the window in the whole conversation)."""
        record = self._latest.get(trajectory.conversation_id) if self.mode != "prompt" else None
        if record is None:
            return None
        source = record.steps if record.source is None else record.source
        if not continues(source, trajectory.steps):
            return None
        new = trajectory.steps[len(source) :]
        roles = step_roles(new)
        if "user" in roles or "system" in roles:
            return None
        found = last_index(roles, _TARGET[self.mode])
        if found is None:
            return None
        size = len(record.steps)  # the window is the record's history, then `new`
        newest = last_index(roles[: found + 1], "assistant")
        action = record.action if newest is None else size + newest
        keep = (record.request, action, size + found)
        if found == 0:  # the same history; the message moderated is where it was, so is the action
            return record.steps, new[0], keep, record.prepared, record.source
        history = [*record.steps, *new[:found]]
        prepared = self._extend(history, keep, size + found + 1, record.prepared, (self.mode, record.request, record.action))
        later = None if record.source is None else [*record.source, *new[:found]]
        return None if prepared is None else (history, new[found], keep, prepared, later)

    def renders_at_once(self, trajectories: Sequence[Trajectory]) -> bool:
        """As `SodaJudge.renders_at_once`: only a few new messages on known blocks."""
        try:
            windows = [_window(trajectory, self.mode)[0] for trajectory in trajectories]
        except TrajectoryError:
            return False
        return self._blocks.all_seen(windows, text_size)

    def render(self, trajectory: Trajectory) -> RenderedPrompt:
        messages, truncated = self.fit(trajectory)
        return RenderedPrompt(messages=messages, truncated=truncated)

    def parse(self, text: str) -> ParsedOutput:
        return parse_gen_output(text)
