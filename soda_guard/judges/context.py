"""Keeping a trajectory inside the judge's context and its content out of the judge's structure.

Two threats to a guard live in the trajectory itself. A long agent run (or one 5 MB tool result)
would overflow the judge's context, and a backend that fails on it fails closed on every call of
that conversation; cutting it instead must be deterministic and must never drop what is being
judged. And content that reproduces the judge prompt's own delimiters (`=== END ===`,
`[USER]`, `[Verdict] SAFE`, `<|im_end|>`) could close the conversation block and forge a
verdict-friendly ending.

Neutralisation is one documented rule: a content line that a judge would read as structure (on
its folded form: no invisible characters, any character outside ASCII standing for any
marker character) gets a backslash (`ESCAPE`) in front
of it, and text the tokenizer would read as an added token (`<|name|>`, `<tool_call>`,
`</tool_response>`, `<think>`, ...) gets a backslash after its `<`, wherever it stands. Only
such lines change: ordinary content stays byte-identical, so the prompt of a normal trajectory
is exactly the trained format.
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from collections.abc import Sequence
from typing import Callable

from soda_guard.judges.confusables import is_delimiter

ESCAPE = "\\"

DEFAULT_MAX_PROMPT_CHARS = 64_000
"""The judges run with `max_model_len=32768` tokens. 64,000 characters is about 16k tokens of
English and stays under 32k for JSON, code and most non-Latin text (≥2 characters a token)."""

DEFAULT_MAX_MESSAGE_CHARS = 16_000
"""No single message may take more than a quarter of the prompt budget."""

DEFAULT_MAX_FIELD_CHARS = 512
"""Header fields (harm category, environment) are one short line in the trained format."""

MIN_PROMPT_CHARS = 4_096
"""Below this the fixed prompt (system message, header, question) leaves no room for content."""

_LINE_BREAK = re.compile(r"(\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029])")
_TOKEN_TEXT = re.compile(r"<(?=\|[^|<>\s]{1,64}\|>|/?(?:tool_call|tool_response|think)>)")
"""Text that the Qwen3 tokenizer would read as one added token: the ChatML-style special tokens
`<|name|>` and the tags it adds with `special=False` (`<tool_call>`, `<tool_response>`,
`<think>` and their closing forms), which `split_special_tokens` does not split. A backslash
after the `<` makes each plain text, wherever it stands in a line."""


def escape_token_text(text: str) -> str:
    return _TOKEN_TEXT.sub(lambda _: "<" + ESCAPE, text)


# Each pattern reads a line from its start, and each of its repetitions can split a line only
# one way: `={2,}.*?` backtracked through every split of a line of `=` (quadratic), `.` ran on
# past the breaks other than `\n` that end a line here (`_BREAK_CHARS`: a line of `==` and a CR
# took the rest of the text), and `<\s*/?\s*` split a run of spaces between its two `\s*`.
SODA_DELIMITERS = re.compile(
    r"={2}[^\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]*?[^\W\d_]"  # === EVALUATION TASK ===, === CONVERSATION ===, === END ===
    r"|\[\s*(?:user|assistant|tool|system|verdict|reason)\s*\]"
    r"|harm category\s*:"
    r"|based on the above,\s*did the agent",
    re.IGNORECASE,
)
"""Lines the SODA judge reads as structure: section headers, role blocks, the harm header and
question, its output format. `Environment:` is left alone: it is common in ordinary tool output
and cannot open a new section without a `===` line, which is escaped."""

GEN_DELIMITERS = re.compile(
    r"<\s*(?:/\s*)?(?:begin|end)\b"  # <BEGIN CONVERSATION>, <END CONVERSATION>, <END SAFETY POLICY>
    r"|(?:user|assistant|system)\s*:"
    r"|(?:safety|categories|refusal)\s*:"
    r"|<\s*(?:/\s*)?tool_response\s*>"
    r"|#+\s*task\s*:"
    r"|provide your safety assessment",
    re.IGNORECASE,
)
"""Lines Qwen3Guard-Gen's template and output format use as structure."""


_BREAK_CHARS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


_PRINTABLE_OR_BREAK = bytes(code for code in range(128) if code == 9 or 0x20 <= code <= 0x7E or chr(code) in _BREAK_CHARS)


def _printable(text: str) -> bool:
    """Printable ASCII, tabs and line breaks only: no line of it can need more than the exact
    delimiter check (`_candidates`). Bytes' `translate` scans four times faster than a regex."""
    return text.isascii() and not text.encode("ascii").translate(None, _PRINTABLE_OR_BREAK)


@functools.lru_cache(maxsize=None)
def _candidates(delimiters: re.Pattern[str], printable: bool) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(the first line, every later line: a break followed by) a line that may need escaping,
    found by C-level scans instead of a Python loop over every line (a 5 MB tool result is over
    a million lines). A line that is not a candidate is printable ASCII, where `is_delimiter`
    only strips leading whitespace, and the delimiter does not match after tab, space and
    U+001F: so it cannot match its key either. A line with anything else in it (a character
    outside ASCII, a control character) is a candidate. Candidates get the exact check. A CR LF
    pair is one break, as in `_LINE_BREAK`. In a text of printable ASCII and breaks no line can
    contain anything else, and the scan for it (half the work) is left out."""
    line = f"[ \t\x1f]*(?:{delimiters.pattern})"
    if not printable:
        line = f"(?:{line}|(?-i:(?=[^{_BREAK_CHARS}]*[^\t\x20-\x7e{_BREAK_CHARS}])))"
    return (
        re.compile(line, delimiters.flags),
        re.compile(f"(?:\r\n|[{_BREAK_CHARS}])(?={line})", delimiters.flags),
    )


_SCAN_CHUNK = 1 << 16


def _chunks(text: str) -> list[tuple[int, int]]:
    """Spans of about 64k characters that end just before a line break, so every line (and
    the break before it) lies in one span. One regex call holds the GIL for its whole span; in
    spans, a multi-megabyte message rendered on a worker thread leaves the event loop and other
    threads a turn every few milliseconds."""
    spans = []
    begin = 0
    while len(text) - begin > _SCAN_CHUNK:
        found = _LINE_BREAK.search(text, begin + _SCAN_CHUNK)
        if found is None:
            break
        spans.append((begin, found.start()))
        begin = found.start()
    spans.append((begin, len(text)))
    return spans


class _Memo:
    """`neutralise` results for long texts, least recently used first out, bounded by the total
    length of the texts held. An agent's history is judged again at every tool call and once
    per parallel call, so its long tool results are neutralised once, not at every judgment;
    the text objects are usually the agent's own, and a text without delimiters is its own
    result, so holding them costs little beyond keeping them alive."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.chars = 0
        self._entries: OrderedDict[tuple[str, str], str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> str | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: tuple[str, str], value: str) -> None:
        size = len(key[1])
        if size > self.max_chars:
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = value
            self.chars += size
            while self.chars > self.max_chars:
                (_, evicted), _ = self._entries.popitem(last=False)
                self.chars -= len(evicted)


_MEMO_MIN_CHARS = 4096
"""Shorter texts neutralise in microseconds: not worth a slot in `_MEMO`."""

_MEMO = _Memo(max_chars=16 << 20)

_SHORT_CHARS = 512
"""Texts this short that recur (a turn's text in each of its parallel calls' prompts, a tool's
name, the calls again as history) are looked up (`_short`) rather than scanned again: a
few microseconds each, several times per judged call."""


def neutralise(text: str, delimiters: re.Pattern[str]) -> str:
    """Escape every line of `text` that starts like a judge delimiter, and every special-token
    string. Patterns match line prefixes only, so a prefix of an unescaped line can never match:
    clipping after neutralising cannot create a delimiter."""
    if type(text) is not str:  # a subclass may claim to equal a text the memos hold
        return _neutralise(text, delimiters)
    if len(text) < _SHORT_CHARS:
        return _short(text, delimiters)
    if len(text) < _MEMO_MIN_CHARS:
        return _neutralise(text, delimiters)
    key = (delimiters.pattern, text)
    found = _MEMO.get(key)
    if found is None:
        found = _neutralise(text, delimiters)
        _MEMO.put(key, found)
    return found


def _neutralise(text: str, delimiters: re.Pattern[str]) -> str:
    text = escape_token_text(text)
    first, later = _candidates(delimiters, _printable(text))
    starts = [0] if first.match(text) else []
    for begin, end in _chunks(text):
        starts += [found.end() for found in later.finditer(text, begin, end)]
    escapes = []
    for start in starts:
        end = _LINE_BREAK.search(text, start)
        if is_delimiter(text[start : end.start() if end else len(text)], delimiters):
            escapes.append(start)
    if not escapes:
        return text
    pieces = []
    for previous, start in zip([0] + escapes, escapes):
        pieces += [text[previous:start], ESCAPE]
    pieces.append(text[escapes[-1] :])
    return "".join(pieces)


_short = functools.lru_cache(maxsize=4096)(_neutralise)
"""`_neutralise` of short texts, by text and pattern (at most 4,096 texts of under 512
characters held)."""


def header_field(value: str, max_chars: int = DEFAULT_MAX_FIELD_CHARS) -> str:
    """A single-line header value: line breaks become spaces so nothing can start a new line."""
    flat = _LINE_BREAK.sub(" ", escape_token_text(value))
    return clip(flat, max_chars)


def clip(text: str, limit: int) -> str:
    """At most `limit` characters: the head and the tail with an inline marker between them.
    The marker stays on the head's line so the tail's first partial line cannot start a line."""
    if len(text) <= limit:
        return text
    widest = len(clip_marker(len(text)))
    if limit <= widest + 2:
        return text[: max(limit, 0)]
    keep = limit - widest
    head = (keep * 2) // 3
    tail = keep - head
    return text[:head] + clip_marker(len(text) - head - tail) + (text[-tail:] if tail else "")


def clip_marker(omitted_chars: int) -> str:
    return f" [... {omitted_chars} characters omitted ...] "


def omission_marker(count: int) -> str:
    return f"[... {count} earlier message{'' if count == 1 else 's'} omitted ...]"


@dataclass(frozen=True)
class ContextBudget:
    """Character budget for one judge prompt: every message's content plus the judge's own text."""

    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS

    def __post_init__(self) -> None:
        if self.max_prompt_chars < MIN_PROMPT_CHARS:
            raise ValueError(f"max_prompt_chars must be at least {MIN_PROMPT_CHARS}")
        if self.max_message_chars < 256 or self.max_field_chars < 16:
            raise ValueError("max_message_chars must be at least 256 and max_field_chars at least 16")


@dataclass(frozen=True)
class Block:
    """One message as the judge will show it.

    `protected` ones are never elided; `whole` ones (the request being served and the pending
    call) are not clipped to the per-message limit either, only when the budget cannot hold
    them. `rank` orders elision (lower goes first, oldest first within a rank); `shown=False`
    leaves a message out from the start (a window that does not show it), announced like an
    elided one. `parts`, when given, joins to `text` and alternates clippable content (even
    positions) with structure that clipping keeps (odd positions)."""

    role: str
    text: str
    protected: bool = False
    rank: int = 1
    whole: bool = False
    shown: bool = True
    parts: tuple[str, ...] = ()

    def clipped(self, limit: int) -> Block:
        if len(self.text) <= limit:
            return self
        fixed = sum(len(part) for part in self.parts[1::2])
        if not self.parts or fixed > limit:
            return replace(self, text=clip(self.text, limit), parts=())
        level = _water_level([len(part) for part in self.parts[::2]], limit - fixed)
        parts = tuple(part if index % 2 else clip(part, level) for index, part in enumerate(self.parts))
        return replace(self, text="".join(parts), parts=parts)


RANK_TOOL_RESULT, RANK_ASSISTANT, RANK_USER = 0, 1, 2
"""Elision order: old tool outputs give way before anything else, user requests last."""


@dataclass(frozen=True)
class Omitted:
    count: int

    @property
    def marker(self) -> str:
        return omission_marker(self.count)


@dataclass
class Fitted:
    items: list[Block | Omitted]
    truncated: bool


def _water_level(lengths: Sequence[int], room: int) -> int:
    """The largest per-message limit L with sum(min(length, L)) <= room."""
    remaining = room
    ordered = sorted(lengths)
    for position, length in enumerate(ordered):
        share = remaining // (len(ordered) - position)
        if length > share:
            return share
        remaining -= length
    return max(ordered, default=0)


def clip_block(block: Block, max_message_chars: int) -> Block:
    """A block as `fit_blocks` shows it before eliding anything: clipped to the per-message
    limit unless it is kept whole or not shown at all."""
    return block if block.whole or not block.shown else block.clipped(max_message_chars)


def any_clipped(clipped: Sequence[Block], blocks: Sequence[Block]) -> bool:
    """Whether clipping changed any of `blocks` (`clipped`, in their order)."""
    return any(c.text != b.text for c, b in zip(clipped, blocks))


def widest_marker(count: int, marker_overhead: int) -> int:
    """What one omission marker may cost in a conversation of `count` messages."""
    return len(omission_marker(count)) + marker_overhead


def fit_blocks(
    blocks: Sequence[Block],
    room: int,
    *,
    overhead: Callable[[Block], int],
    marker_overhead: int,
    max_message_chars: int,
) -> Fitted:
    """Fit `blocks` into `room` characters, deterministically.

    Every message but the `whole` ones is first clipped to `max_message_chars`. While too long,
    unprotected messages go, lowest `rank` first, oldest first within a rank; each run of
    removed (or not `shown`) messages becomes one `Omitted` marker. If the protected messages
    alone still overflow, they are clipped to a common limit, keeping their structure parts.
    `overhead(block)` is the characters a block costs besides its text; `marker_overhead` the
    same for a marker.
    """
    clipped = [clip_block(b, max_message_chars) for b in blocks]
    truncated = any_clipped(clipped, blocks)
    count = len(clipped)
    widest = widest_marker(count, marker_overhead)
    removed = [not b.shown for b in clipped]
    gaps = sum(1 for i in range(count) if removed[i] and (i == 0 or not removed[i - 1]))
    total = sum(overhead(b) + len(b.text) for b, gone in zip(clipped, removed) if not gone)
    order = sorted((i for i, b in enumerate(clipped) if not b.protected and b.shown), key=lambda i: (clipped[i].rank, i))
    for index in order:
        if total + gaps * widest <= room:
            break
        left = index > 0 and removed[index - 1]
        right = index + 1 < count and removed[index + 1]
        gaps += 1 - left - right
        removed[index] = True
        total -= overhead(clipped[index]) + len(clipped[index].text)
        truncated = True
    kept = [b for b, gone in zip(clipped, removed) if not gone]
    if total + gaps * widest > room:
        text_room = room - gaps * widest - sum(overhead(b) for b in kept)
        if text_room < 0:
            raise ValueError("the context budget cannot hold the messages that must be kept")
        level = _water_level([len(b.text) for b in kept], text_room)
        clipped = [b if gone else b.clipped(level) for b, gone in zip(clipped, removed)]
        truncated = True
    items: list[Block | Omitted] = []
    for block, gone in zip(clipped, removed):
        if not gone:
            items.append(block)
        elif items and isinstance(items[-1], Omitted):
            items[-1] = Omitted(items[-1].count + 1)
        else:
            items.append(Omitted(1))
    return Fitted(items, truncated)
