"""Token-by-token moderation of an assistant's output while it is generated (Qwen3Guard-Stream).

`StreamMonitor.open(trajectory)` prefills the conversation once and keeps the KV cache; every
`feed` then runs only the new tokens against that cache, so a token costs one decoder step
(plus attention over the cache) instead of a forward over the whole sequence, which is what
the authors' streaming API does. A stream is flagged by the debouncing rule of the Qwen3Guard
report (§4.4): two consecutive Unsafe tokens, or two consecutive Controversial ones.

Text arrives in arbitrary chunks, but the judge must see the tokens the whole text tokenises
to. `TextTokenBuffer` feeds only tokens that later text can no longer change and holds back
the rest until more text or `finish()` arrives.

Streams that feed at about the same time (several agents, several LangChain runs on different
threads or event-loop workers) share forward passes: `StepBatcher` runs all their pending tokens
in one batched step, each row over its own cache, so the weights are read once per step rather
than once per stream.
"""

from __future__ import annotations

import re
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Sequence

from soda_guard._extras import needs_extra

with needs_extra("the stream monitor (soda_guard.stream_monitor)"):
    import torch

from soda_guard.chat_tokens import encode_chat, special_token_strings, tokenize
from soda_guard.engine.kv import KVCache
from soda_guard.engine.qwen3_step import LeanQwen3
from soda_guard.judges.base import render_assistant, tool_result_text
from soda_guard.judges.confusables import STREAM_SAFE_RUN, begins_with_mark, build_tables
from soda_guard.judges.context import escape_token_text
from soda_guard.judges.qwen3guard_gen import wrap_tool_response
from soda_guard.judges.stream import QUERY_CATEGORIES, RESPONSE_CATEGORIES, Qwen3GuardStream
from soda_guard.trajectory import AssistantStep, SystemStep, ToolStep, Trajectory, UserStep
from soda_guard.verdict import Label, Verdict


class RiskLevel(IntEnum):
    SAFE = 0
    UNSAFE = 1
    CONTROVERSIAL = 2

    @property
    def label(self) -> Label:
        return (Label.SAFE, Label.UNSAFE, Label.CONTROVERSIAL)[self]


@dataclass(frozen=True)
class TokenVerdict:
    """The response heads at one assistant token. `index` counts fed tokens from 0."""

    index: int
    token_id: int
    risk: RiskLevel
    category: str
    risk_probs: tuple[float, ...]
    category_probs: tuple[float, ...]
    end: int = 0
    """Where the token ends in the text fed to the stream, counted in that text's characters
    as fed (a token fed as an id, where the text fed before it ends). A caller places a flag
    among its own pieces of that text (the content, a tool call) by this, not by the length
    of what the tokens decode to: the tokenizer composes the text first (NFC writes `e` +
    U+0301 as one character, U+0958 as two), so that length drifts from the text's by a
    character for each such one before the token."""


@dataclass(frozen=True)
class QueryVerdict:
    """The query heads at the `<|im_end|>` closing the latest user turn."""

    risk: RiskLevel
    category: str
    risk_probs: tuple[float, ...]
    category_probs: tuple[float, ...]


@dataclass
class Debouncer:
    """Flags on the second of two consecutive tokens at the same non-safe level; the first flag
    and its category (that second token's) then stay the stream's, whatever follows. The rule
    is armed again after each flag and every flag is kept in `flags`: a caller that lets a
    flagged stream go on (a logged flag) must still see a stricter one later in the same feed."""

    previous: RiskLevel | None = None
    flagged: TokenVerdict | None = None
    flags: list[TokenVerdict] = field(default_factory=list)

    def update(self, verdict: TokenVerdict) -> bool:
        """True exactly when this token flags (the first flag or a later one)."""
        repeated = verdict.risk != RiskLevel.SAFE and verdict.risk == self.previous
        self.previous = None if repeated else verdict.risk
        if not repeated:
            return False
        self.flags.append(verdict)
        self.flagged = self.flagged or verdict
        return True


HELD_MAX_TOKENS = 4
"""The most tokens a stream holds back for the word they end in to go on (a word is one to
three tokens; a run of Chinese is one word of a token per character or two)."""


class TextTokenBuffer:
    """Incremental tokenisation that equals tokenising the concatenated text at once (for words
    of up to `HELD_MAX_TOKENS` tokens; a longer one is fed on, its text the same).

    Only the last pre-token ("word") of the pending text can still change when text is
    appended (the pre-tokenizer's regex has no look-behind, so earlier splits are final), and
    so can a tail that might grow into an added token such as `<tool_call>`. Everything before
    both is emitted; the rest waits. Content never becomes a special token
    (`split_special_tokens`), as in `chat_tokens`."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.pending = ""
        self.added = [token for token in _added_token_strings(tokenizer) if token]
        self.fed = 0
        """Characters of the text pushed that the tokens returned so far cover: all before `pending`."""
        self.ends: list[int] = []
        """Where each token the latest `push`, `finish` or `tokens` returned ends in the text
        pushed, as `TokenVerdict.end` counts: from the tokenizer's offsets, which point into the
        text as it was pushed, before the tokenizer normalised it."""

    def push(self, text: str) -> list[int]:
        self.ends = []
        self.pending += text
        # a character split into its UTF-16 halves across chunks (a proxy slicing text by JS
        # string length) waits here for its second half
        ready = self.pending[:-1] if "\ud800" <= self.pending[-1:] <= "\udbff" else self.pending
        if not ready:
            return []
        clean, pairs = _well_formed(ready)
        encoding = tokenize(self.tokenizer, clean, split_special=True, return_offsets_mapping=True)
        ids, offsets, words = encoding["input_ids"], encoding["offset_mapping"], encoding.word_ids()
        limit = len(clean) - self._added_prefix_tail()
        hold = next(i for i, (word, (_, end)) in enumerate(zip(words, offsets)) if word == words[-1] or end > limit)
        while hold and words[hold - 1] == words[hold]:
            hold -= 1
        if len(ids) - hold > HELD_MAX_TOKENS:
            # a "word" that does not end (text without spaces: Chinese, Japanese, glued words)
            # would wait for the end of the run: all but its last token go on now, at the cost
            # of a rare merge across that point that tokenising it whole would make
            hold = max(hold, next((i for i, (_, end) in enumerate(offsets) if end > limit), len(ids)) - 1)
        # never inside a character: NFC writes some as two words (U+0958 as U+0915 U+093C), and
        # the character's first word fed now would be fed again with the rest, still pending;
        # nor before a mark, which normalising reads with the characters before it
        while hold and (offsets[hold - 1][1] > offsets[hold][0] or _read_with_before(clean, offsets[hold][0])):
            hold -= 1
        if hold == 0:
            return []
        return self._take(ids[:hold], [_as_pushed(start, pairs) for start, _ in offsets[:hold]], _as_pushed(offsets[hold][0], pairs))

    def finish(self) -> list[int]:
        """The held-back tail, at the end of the text."""
        self.ends = []
        if not self.pending:
            return []
        clean, pairs = _well_formed(self.pending)
        encoding = tokenize(self.tokenizer, clean, split_special=True, return_offsets_mapping=True)
        return self._take(encoding["input_ids"], [_as_pushed(start, pairs) for start, _ in encoding["offset_mapping"]], len(self.pending))

    def _take(self, ids: Sequence[int], starts: list[int], length: int) -> list[int]:
        """`ids`, the tokens of the first `length` characters pending, which they leave. Each
        token ends where the next begins and the last at `length`, not at its own offsets' end:
        a character the tokenizer composed (`e` + U+0301) has offsets covering its first
        code point only, and a token holding part of a character ends before it."""
        self.ends = [self.fed + start for start in starts[1:]] + [self.fed + length]
        self.fed += length
        self.pending = self.pending[length:]
        return list(ids)

    def tokens(self, ids: Sequence[int]) -> list[int]:
        """Tokens fed as ids, which have no text: each ends where the text pushed before it does."""
        self.ends = [self.fed] * len(ids)
        return list(ids)

    def _added_prefix_tail(self) -> int:
        longest = 0
        for token in self.added:
            for size in range(min(len(token) - 1, len(self.pending)), longest, -1):
                if self.pending.endswith(token[:size]):
                    longest = size
                    break
        return longest


_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _well_formed(text: str) -> tuple[str, list[int]]:
    """`text` as a tokenizer takes it, which refuses any UTF-16 surrogate with a TypeError (the
    stream died with no decision): a pair of halves as the character they make, a lone half as
    U+FFFD. And where, in the result, each pair stood: a character shorter there than in
    `text`, whose positions the tokens are placed in (`_as_pushed`)."""
    if not _SURROGATE.search(text):
        return text, []
    pairs: list[int] = []

    def joined(pair: re.Match[str]) -> str:
        pairs.append(pair.start() - len(pairs))
        return pair.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le")

    return _SURROGATE.sub("\ufffd", _SURROGATE_PAIR.sub(joined, text)), pairs


def _as_pushed(position: int, pairs: list[int]) -> int:
    """A position in `_well_formed`'s text, in the text as pushed: one more for each pair before it."""
    return position + bisect_left(pairs, position)


def _read_with_before(text: str, at: int) -> bool:
    """Whether normalising may read `text[at]` with the characters before it, so that text cut
    right before it would tokenise otherwise than whole: NFC composes a mark with what precedes
    it (U+0344 is U+0308 U+0301, and `a` U+0308 is `ä`: cut there, the held U+0344 stayed two
    marks) and sorts a run of marks (U+0F73 U+0F73 is U+0F71 U+0F71 U+0F72 U+0F72: cut there,
    a mark was lost). A character whose decomposition begins with a mark (NFKD, as a tokenizer
    may compose NFKC) goes with the character before it, but a run of more than
    `STREAM_SAFE_RUN` (Unicode's stream-safe limit, which no writing reaches) may be cut, its
    marks then read in another order: held whole, its text would reach the reader unjudged."""
    if text[at] < "\u0300" or not begins_with_mark(text[at]):
        return False
    return at < STREAM_SAFE_RUN or not all(begins_with_mark(char) for char in text[at - STREAM_SAFE_RUN:at])


def _added_token_strings(tokenizer: Any) -> list[str]:
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = set(special_token_strings(tokenizer))
    return [str(token) for token in decoder.values() if str(token) not in specials]


def conversation_messages(trajectory: Trajectory) -> list[dict[str, str]]:
    """Plain-text chat messages as Qwen agents see them: tool calls inside the assistant text,
    tool results as `<tool_response>` user turns (the template's own tool rendering). What the
    content says never becomes one of those tags (`escape_token_text`): a tool result closing
    its own `<tool_response>` would place text outside it in the judge's context."""
    messages = []
    for step in trajectory.steps:
        if isinstance(step, SystemStep):
            messages.append({"role": "system", "content": escape_token_text(step.content)})
        elif isinstance(step, UserStep):
            messages.append({"role": "user", "content": escape_token_text(step.content)})
        elif isinstance(step, AssistantStep):
            messages.append({"role": "assistant", "content": render_assistant(step, escape_token_text)})
        elif isinstance(step, ToolStep):
            messages.append({"role": "user", "content": wrap_tool_response(escape_token_text(tool_result_text(step)))})
    return messages


@dataclass
class PromptTokens:
    ids: list[int]
    query_end: int
    """Position of the `<|im_end|>` that closes the latest user request."""


def encode_stream_prompt(tokenizer: Any, trajectory: Trajectory) -> PromptTokens:
    """The conversation plus the header of the assistant turn about to be streamed, as the
    template renders it with no generation prompt (Qwen3's template then writes the empty
    think block of thinking-off mode); the streamed tokens continue right after it."""
    user_index = trajectory.latest_user_index()
    if user_index is None:
        raise ValueError("Qwen3Guard-Stream needs a user message before the response it moderates")
    # a lone surrogate (a JSON escape in a user's or a tool's text) the tokenizer refuses with a
    # TypeError: the stream could not be opened, and no decision was taken
    messages = [{**message, "content": _well_formed(message["content"])[0]} if isinstance(message.get("content"), str) else message
                for message in conversation_messages(trajectory)]
    marker = "SODAGUARDSTREAMEND"
    rendered = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": marker}], tokenize=False,
                                             add_generation_prompt=False, enable_thinking=False)
    closing = tokenize(tokenizer, rendered[rendered.index(marker) + len(marker):])["input_ids"]
    ids = encode_chat(tokenizer, messages + [{"role": "assistant", "content": ""}], add_generation_prompt=False)
    if closing and ids[-len(closing):] != closing:
        raise ValueError("chat template renders an empty assistant turn in an unexpected way")
    ids = ids[: len(ids) - len(closing)]
    user_turns = sum(1 for step in trajectory.steps[: user_index + 1] if isinstance(step, (UserStep, ToolStep)))
    return PromptTokens(ids, _query_end(tokenizer, ids, user_turns))


def _query_end(tokenizer: Any, ids: list[int], user_turns: int) -> int:
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    role = tokenize(tokenizer, "user")["input_ids"]
    seen = 0
    for position, token in enumerate(ids):
        if token == start and ids[position + 1 : position + 1 + len(role)] == role:
            seen += 1
            if seen == user_turns:
                return ids.index(end, position)
    raise ValueError("rendered conversation has no user turn")


def _probs(logits: torch.Tensor) -> list[list[float]]:
    return torch.softmax(logits.float(), dim=-1).tolist()


@dataclass(eq=False)
class _Step:
    """One stream's new tokens, waiting for a batched forward or taken into one."""

    ids: torch.Tensor
    cache: KVCache
    hidden: torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    def result(self) -> torch.Tensor:
        if self.error is not None:
            raise self.error
        if self.hidden is None:
            raise RuntimeError("the batched step ended without a result")
        return self.hidden


class StepBatcher:
    """Runs the pending tokens of every stream that feeds at about the same time in one forward.

    There is no worker thread and no collection window: a caller takes the turn when no forward
    is running and runs every pending stream's tokens, its own among them; callers that arrive
    meanwhile queue, and the next turn takes them all. Batches therefore form exactly when
    streams would otherwise wait for one another, and a lone stream waits for nobody. Every wait
    ends by `timeout_s`, and a failed forward is retried row by row, so a stream that errors
    fails alone and a slow or closed one cannot hold the others."""

    def __init__(self, forward: LeanQwen3, timeout_s: float) -> None:
        self.forward = forward
        self.timeout_s = timeout_s
        self._changed = threading.Condition()
        self._pending: list[_Step] = []
        self._busy = False

    def run(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final hidden states [new, hidden] of `ids` ([new]) continuing `cache` (one row).
        TimeoutError when this step is not done by the deadline; if the step was already
        running, it may still write `cache` afterwards."""
        step = _Step(ids, cache)
        deadline = time.monotonic() + self.timeout_s
        with self._changed:
            self._pending.append(step)
            while self._busy and not step.done:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if step in self._pending:
                        self._pending.remove(step)
                    raise TimeoutError(f"stream step not run within {self.timeout_s:g} s")
                self._changed.wait(remaining)
            if step.done:
                return step.result()
            batch, self._pending, self._busy = self._pending, [], True
        try:
            self._forward(batch)
        finally:
            with self._changed:
                for taken in batch:
                    taken.done = True
                self._busy = False
                self._changed.notify_all()
        return step.result()

    def _forward(self, batch: list[_Step]) -> None:
        lengths = [step.cache.length for step in batch]
        try:
            with torch.inference_mode():
                hidden = self.forward.extend_packed([(step.ids, step.cache) for step in batch])
                for step, rows in zip(batch, hidden):
                    step.hidden = self.forward.final_norm_of(rows)
        except Exception as error:
            for step, length in zip(batch, lengths):
                step.cache.truncate(length)
                step.hidden = None
            if len(batch) == 1:
                batch[0].error = error
            else:
                for step in batch:
                    self._forward([step])


class GuardStream:
    """One monitored assistant turn. Its cache is private, and a lock serialises its own calls,
    so any number of streams can run from different threads against one model; their steps
    are batched together by the monitor's `StepBatcher`."""

    def __init__(self, monitor: StreamMonitor, trajectory: Trajectory) -> None:
        self.monitor = monitor
        self.debouncer = Debouncer()
        self.buffer = TextTokenBuffer(monitor.tokenizer)
        self.verdicts: list[TokenVerdict] = []
        self.worst = 0.0
        """The highest P(unsafe) + P(controversial) of any token fed: kept as tokens come, since
        a verdict is built for every flag and a scan of every token per flag is quadratic."""
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        prompt = encode_stream_prompt(monitor.tokenizer, trajectory)
        self.prompt_tokens = len(prompt.ids)
        self.cache: KVCache | None = monitor.forward.new_cache(1, len(prompt.ids) + 256, growable=True)
        with torch.inference_mode():
            hidden = monitor.hidden(self._tensor(prompt.ids), self.cache)
            query = monitor.model.query_logits(hidden[prompt.query_end])
        risk_probs, category_probs = _probs(query.risk), _probs(query.category)
        self.query = QueryVerdict(
            RiskLevel(int(query.risk.argmax())), QUERY_CATEGORIES[int(query.category.argmax())],
            tuple(risk_probs), tuple(category_probs))

    @property
    def flagged(self) -> TokenVerdict | None:
        """The token that flagged the stream, or None while it is clean."""
        return self.debouncer.flagged

    @property
    def flags(self) -> list[TokenVerdict]:
        """Every token that flagged, in order, the debouncing rule armed again after each."""
        return self.debouncer.flags

    @property
    def closed(self) -> bool:
        return self.cache is None

    def feed(self, tokens: int | Sequence[int] | str) -> list[TokenVerdict]:
        """Append assistant tokens (ids, or text that is re-tokenised across calls) and return
        the verdict of each token actually fed; held-back text yields none until later. Ids
        come after the text fed before them, which is fed first, as it stands: they ran ahead
        of its held-back last word, which the monitor then read after them."""
        with self._lock:
            if isinstance(tokens, str):
                return self._run(self.buffer.push(tokens))
            held = self._run(self.buffer.finish())
            return held + self._run(self.buffer.tokens([tokens] if isinstance(tokens, int) else tokens))

    def finish(self) -> list[TokenVerdict]:
        """Feed the text still held back; call when the turn's text is complete."""
        with self._lock:
            return self._run(self.buffer.finish())

    def close(self) -> None:
        """Drop the KV cache (the only large state); the verdicts stay readable."""
        with self._lock:
            self.cache = None

    def __enter__(self) -> GuardStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verdict(self, flagged: TokenVerdict | None = None) -> Verdict:
        """The stream so far as a policy-ready verdict (Unsafe/Controversial once flagged, or
        as `flagged` says: one of the later `flags`)."""
        flagged = flagged or self.flagged
        return Verdict(
            label=flagged.risk.label if flagged else Label.SAFE,
            score=self.worst,
            categories=[flagged.category] if flagged else [],
            reason=f"token {flagged.index} was the second consecutive {flagged.risk.name.lower()} token" if flagged else None,
            judge=self.monitor.name,
            kind="qwen3guard_stream",
            model=self.monitor.model_name,
            latency_ms=(time.perf_counter() - self._started) * 1000.0,
            prompt_tokens=self.prompt_tokens,
            generated_tokens=len(self.verdicts),
        )

    def _tensor(self, ids: Sequence[int]) -> torch.Tensor:
        """Refuses ids outside the vocabulary here, where the error is this stream's alone (on
        CUDA an out-of-range embedding lookup would break the device for every stream)."""
        vocab = self.monitor.forward.embed.shape[0]
        if any(not 0 <= token < vocab for token in ids):
            raise ValueError(f"token id outside the guard's vocabulary of {vocab}")
        return torch.tensor(list(ids), dtype=torch.long, device=self.monitor.device)

    def _run(self, ids: list[int]) -> list[TokenVerdict]:
        """`ids` are what the buffer returned last, and `buffer.ends` holds where each ends."""
        if not ids:
            return []
        if self.cache is None:
            raise RuntimeError("stream is closed")
        tensor = self._tensor(ids)
        try:
            hidden = self.monitor.hidden(tensor, self.cache)
        except TimeoutError:
            self.cache = None  # a step still running may add tokens that get no verdict
            raise
        with torch.inference_mode():
            heads = self.monitor.model.response_logits(hidden)
        risks, categories = heads.risk.argmax(-1).tolist(), heads.category.argmax(-1).tolist()
        out = []
        for token, end, risk, category, risk_probs, category_probs in zip(
                ids, self.buffer.ends, risks, categories, _probs(heads.risk), _probs(heads.category), strict=True):
            verdict = TokenVerdict(len(self.verdicts), token, RiskLevel(risk), RESPONSE_CATEGORIES[category],
                                   tuple(risk_probs), tuple(category_probs), end)
            self.verdicts.append(verdict)
            self.worst = max(self.worst, risk_probs[1] + risk_probs[2])
            self.debouncer.update(verdict)
            out.append(verdict)
        return out


@dataclass
class StreamMonitor:
    """A loaded stream judge plus its tokenizer; opens any number of independent streams."""

    model: Qwen3GuardStream
    tokenizer: Any
    name: str = "qwen3guard-stream"
    model_name: str = field(default="")
    step_timeout_s: float = 120.0
    """The longest a stream's prefill or feed waits for its batched step, queueing included."""

    def __post_init__(self) -> None:
        self.model_name = self.model_name or str(getattr(self.model, "name_or_path", "qwen3guard-stream"))
        self.forward = LeanQwen3(self.model.model)
        self.batcher = StepBatcher(self.forward, self.step_timeout_s)
        build_tables()  # which characters a chunk of text is never cut before (`_read_with_before`), now, not in a stream

    def hidden(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Final hidden states [new, hidden] of `ids` ([new]) continuing `cache`, computed in a
        step shared with whichever other streams of this monitor are feeding at the time."""
        return self.batcher.run(ids, cache)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @classmethod
    def load(cls, model: str, device: str = "auto", dtype: str = "auto", name: str = "qwen3guard-stream") -> StreamMonitor:
        from soda_guard.judges.stream import load_stream_model, resolve_checkpoint
        from soda_guard.loading import load_tokenizer

        guard = load_stream_model(model, device, dtype)
        return cls(guard, load_tokenizer(str(resolve_checkpoint(model))), name=name, model_name=model)

    def open(self, trajectory: Trajectory) -> GuardStream:
        return GuardStream(self, trajectory)
