"""Batched greedy judging on a Qwen3 judge: prefix-reusing prefill, a decode loop that stops
each row as soon as it can, and the verdict score read on the fly.

Each row is prefilled alone on top of its cached prefix into a buffer of its own; rows are then
left-padded into one decode batch whose pads are masked out and whose position ids count only
real tokens. Rotary positions are baked into cached keys, so moving them to another column
changes nothing. Cached tensors are never written: a row's prefill buffer is only read after
its prefill, and the decode batch is a copy into buffers the engine allocates once and reuses
for every batch that fits (`kv`). Both forwards are `qwen3_step.LeanQwen3`, the one prefill and
one decode path, on public `transformers` API only (the model's weights and rotary module).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from soda_guard.chat_tokens import encode_chat, tokenize
from soda_guard.engine import qwen3_step
from soda_guard.engine.kv import KVCache
from soda_guard.engine.model_step import ModelStep
from soda_guard.engine.prefix_cache import CachedPrefix, PrefixCache, common_prefix
from soda_guard.errors import JudgeError
from soda_guard.generation import GenerationRequest, GenerationResult, ScoreSpec
from soda_guard.scoring import label_tokens, score_from_logits, verdict_position

VERDICT_ONLY_REASON = "[Reason] not generated (verdict-only mode)"
WARM_UP_CHUNK_TOKENS = 512
"""Tokens a warm-up prefills between two looks for waiting judgments: on a 4B judge about
10-20 ms of a GPU, on the benchmarks' small CPU model about 0.1 s."""
MAX_VERDICT_POSITIONS = 16
"""Marker positions whose logits a row keeps: a judge output echoes a few markers at most."""


def eos_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
    configured = model.generation_config.eos_token_id
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if isinstance(i, int) and i >= 0)


def marker_literal(spec: ScoreSpec) -> str:
    """The text a score marker regex stands for (`\\[Verdict\\]\\s*$` → `[Verdict]`), which
    verdict-only mode writes in the judge's place."""
    body = re.sub(r"(\\s\*)?\$$", "", spec.marker)
    literal = re.sub(r"\\(.)", r"\1", body)
    if not re.search(spec.marker, literal):
        raise ValueError(f"score marker {spec.marker!r} is not a plain literal; verdict-only mode cannot write it")
    return literal


VERDICT_WINDOW = 256
"""How far back from the output's end the stop rule looks for the verdict's line: a line
longer than this (a run of spaces) is not stopped at, and the judge goes on to its end."""


def _verdict_done(spec: ScoreSpec) -> re.Pattern[str]:
    """A verdict the judge wrote as its own: the marker opening a line and the label ending it.
    A marker anywhere (a reason quoting the `[Verdict] SAFE` a tool result planted) or a label
    the line goes on from (the format line echoed, `[Verdict] SAFE or UNSAFE`) is not one, and
    stopping there would leave the parser a quoted label as the only verdict."""
    body = re.sub(r"\$$", "", spec.marker)
    labels = "|".join(re.escape(word) for word in sorted(spec.positive + spec.negative, key=len, reverse=True))
    return re.compile(f"(?:\\A|\\n)[ \\t]*(?:{body})(?:{labels})[ \\t]*\\n")


@dataclass
class Job:
    request: GenerationRequest
    ids: torch.Tensor
    prompt_tokens: int
    """The chat prompt's length; `ids` also holds the marker that verdict-only mode writes."""
    runs: int = 0
    """Batches it has been in: a cut warm-up runs again, and counts in `EngineStats` once."""

    def expired(self, now: float) -> bool:
        """Past its deadline, or abandoned by its caller (`GenerationRequest.given_up`)."""
        return self.request.given_up(now)

    @property
    def key(self) -> object:
        return self.request.cache_key if self.request.cache_key is not None else ("prompt", hash(tuple(self.ids.tolist())))


@dataclass
class _Row:
    """Decode state of one request: tokens so far and the logits at each position right after
    a score marker (`verdicts`, by token index); the parser later says which one holds the label."""

    index: int
    job: Job
    generated: list[int] = field(default_factory=list)
    verdicts: dict[int, torch.Tensor] = field(default_factory=dict)
    text: str = ""
    """`decode(generated)`, kept up to date only while the stop rule or the score needs it."""
    clean: int = 0
    """How many leading tokens of `generated` decode to `clean_text` on their own: their text
    ends on a whole character, so what follows decodes independently of them."""
    clean_text: str = ""


@dataclass
class EngineStats:
    judgments: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0
    row_steps: int = 0
    """Decode steps summed over rows: the work a dropped row stops costing."""
    abandoned: int = 0
    """Rows dropped because their deadline passed (before prefill or between decode steps)."""
    warm_ups_cut: int = 0
    """Warm-ups stopped before the end of their prompt to let waiting judgments run."""


Answer = Callable[[int, "GenerationResult | BaseException"], None]


class WarmUpCut(Exception):
    """A warm-up stopped at a chunk's end to let waiting judgments run; what it prefilled is in
    the prefix cache, and queued again it goes on from there."""


def abandoned() -> TimeoutError:
    return TimeoutError("judgment abandoned: its deadline passed or its caller stopped waiting")


class Engine:
    """Runs batches of judgments; not re-entrant (one batch at a time, from the batcher's thread).
    Request deadlines are read against `clock` (`time.monotonic`, the clock `Guard` sets them
    on), so a test can drive it step by step."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        prefix_cache_tokens: int = 32768,
        stop_at_verdict: bool = False,
        verdict_only: bool = False,
        ignore_eos: bool = False,
        compile_decode: bool = False,
        warm_up_chunk_tokens: int = WARM_UP_CHUNK_TOKENS,
        judgments_waiting: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if warm_up_chunk_tokens < 1:
            raise ValueError("warm_up_chunk_tokens must be at least 1")
        self.clock = clock
        self.warm_up_chunk_tokens = warm_up_chunk_tokens
        self.judgments_waiting = judgments_waiting
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        # the engine's own Qwen3 step where it reproduces the model, else the model's forward
        self.forward: Any = qwen3_step.LeanQwen3(model, compiled=compile_decode) if qwen3_step.supports(model) else ModelStep(model)
        self.cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.stop_at_verdict = stop_at_verdict
        self.verdict_only = verdict_only
        self.ignore_eos = ignore_eos
        self.eos = eos_ids(model, tokenizer)
        self.stats = EngineStats()
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._step = torch.compile(self.forward.decode_step, dynamic=True) if compile_decode else self.forward.decode_step
        self._buffers: KVCache | None = None
        self._plain_decode = not getattr(tokenizer, "clean_up_tokenization_spaces", False)

    def job(self, request: GenerationRequest) -> Job:
        """Tokenise a request, refusing one the model cannot attend over: past its trained
        positions a judge still answers, but from positions it never saw, so the verdict would
        be noise (the prompt budget is in characters; this is the check in tokens)."""
        ids = encode_chat(self.tokenizer, request.messages)
        prompt_tokens = len(ids)
        if self.verdict_only:
            if request.score is None:
                raise ValueError("verdict-only mode needs a request with a score spec")
            ids += tokenize(self.tokenizer, marker_literal(request.score))["input_ids"]
        needed = len(ids) + (0 if self.verdict_only else request.max_new_tokens)
        if self.max_positions is not None and needed > self.max_positions:
            raise JudgeError(
                f"judge prompt of {prompt_tokens} tokens plus {needed - prompt_tokens} to generate exceeds the "
                f"model's {self.max_positions} positions; lower the judge's max_prompt_chars"
            )
        return Job(request, torch.tensor(ids, dtype=torch.long), prompt_tokens)

    @torch.inference_mode()
    def run(self, jobs: Sequence[Job], answer: Answer) -> None:
        """Judge `jobs` as one batch, calling `answer(index, result)` as soon as each row ends,
        or `answer(index, TimeoutError)` once its deadline has passed. Its judgments go first,
        its warm-ups (`prefill_only`) after them: a warm-up is optional work, and one of another
        conversation would only delay them (one of the same conversation saves a judgment
        nothing it would not prefill itself)."""
        self.stats.batches += 1
        self.stats.judgments += sum(not job.runs for job in jobs)
        for job in jobs:
            job.runs += 1
        judged = [index for index, job in enumerate(jobs) if not job.request.prefill_only]
        if judged:
            self._judge([jobs[index] for index in judged], lambda row, result: answer(judged[row], result))
        for index, job in enumerate(jobs):
            if job.request.prefill_only:
                answer(index, self._warm(job))

    def _judge(self, jobs: Sequence[Job], answer: Answer) -> None:
        indexes, logits, caches = self._prefill(jobs, answer)
        if not indexes:
            return
        live = [jobs[index] for index in indexes]
        if self.verdict_only:
            for row, (index, job) in enumerate(zip(indexes, live)):
                answer(index, self._verdict_only_result(job, logits[row]))
            return
        cache, mask, positions = self._decode_batch(live, caches)
        self._decode([_Row(index, job) for index, job in zip(indexes, live)], logits, cache, mask, positions, answer)

    def _prefill(self, jobs: Sequence[Job], answer: Answer) -> tuple[list[int], torch.Tensor, list[KVCache]]:
        """Prefill each live row on its own (prefill is compute-bound, so batching it gains little
        and padding long prompts costs a lot); a row whose deadline has passed, before its
        prefill or between two of its layers, is answered with `TimeoutError` and skipped. Rows
        go in order and each may build on any earlier row of the batch, so the parallel calls of
        one turn (views that differ only in the pending call) prefill their shared prefix once,
        whether or not the prefix cache is on or has room for it."""
        indexes: list[int] = []
        rows: list[tuple[torch.Tensor, KVCache]] = []
        for index, job in enumerate(jobs):
            if job.expired(self.clock()):
                self.stats.abandoned += 1
                answer(index, abandoned())
                continue
            earlier = [(jobs[i].ids, cache) for i, (_, cache) in zip(indexes, rows)]
            try:
                rows.append(self._prefill_one(job, earlier))
            except qwen3_step.Stopped:  # its deadline passed between two layers: nothing of it is kept
                self.stats.abandoned += 1
                answer(index, abandoned())
                continue
            indexes.append(index)
        if not rows:
            return [], torch.empty(0), []
        return indexes, torch.cat([row_logits for row_logits, _ in rows]), [cache for _, cache in rows]

    def _decode_batch(self, jobs: Sequence[Job], caches: Sequence[KVCache]) -> tuple[KVCache, torch.Tensor, torch.Tensor]:
        """Left-pad the prefilled rows into one decode batch whose buffers and mask already have
        room for every token still to generate."""
        lengths = [len(job.ids) for job in jobs]
        longest = max(lengths)
        capacity = longest + max(job.request.max_new_tokens for job in jobs)
        positions = torch.tensor(lengths, device=self.device) - 1
        mask = torch.zeros((len(jobs), capacity), dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            mask[row, longest - length : longest] = 1
        batch = self._batch_buffers(len(jobs), capacity)
        for target, sources in zip(batch.layers, zip(*(cache.layers for cache in caches))):
            for row, source in enumerate(sources):
                target.place(row, longest - lengths[row], source.keys[0], source.values[0])
            target.length = longest
        return batch, mask, positions

    def _batch_buffers(self, batch: int, capacity: int) -> KVCache:
        """Decode buffers for `batch` rows of `capacity` tokens: views into one allocation,
        replaced only when a batch does not fit, so steady traffic allocates nothing per batch
        and a step's buffers keep their addresses (what CUDA graphs need)."""
        held = self._buffers
        if held is None or held.batch < batch or held.capacity < capacity:
            rows = max(batch, held.batch if held else 0)
            columns = -(-max(capacity, held.capacity if held else 0) // 256) * 256
            self._buffers = held = self.forward.new_cache(rows, columns)
        return held.window(batch, capacity)

    def _prefill_one(self, job: Job, batch: Sequence[tuple[torch.Tensor, KVCache]]) -> tuple[torch.Tensor, KVCache]:
        """Prefill `job` on top of the longest prefix held by the prefix cache or by a row of
        `batch` (ids, cache) already prefilled in this batch, into a buffer of its own that the
        prefix cache then keeps as it is."""
        cache = self._row(job, batch)
        reused = cache.length
        # a prompt of thousands of tokens is seconds of work on a CPU: given up on, it stops at
        # the next layer instead of holding the batch (and the judgments queued behind it)
        logits = self.forward.prefill(job.ids[None, reused:].to(self.device), cache, lambda: job.expired(self.clock()))
        self.stats.prompt_tokens += len(job.ids)
        self.stats.prefilled_tokens += len(job.ids) - reused
        self._keep(job, cache)
        return logits.float(), cache

    def _warm(self, job: Job) -> GenerationResult | BaseException:
        """Prefill a warm-up's prompt into the prefix cache, `warm_up_chunk_tokens` at a time,
        and stop at a chunk's end once a judgment is waiting (`judgments_waiting`), keeping what
        is done (`WarmUpCut`): the warm-up holds a judgment back by one chunk at most, not by a
        whole long tool result, and what it got to is not prefilled again. It also stops at a
        chunk's end once it is abandoned (its deadline, the backend closing)."""
        done = GenerationResult(text="", prompt_tokens=job.prompt_tokens, generated_tokens=0)
        if self.cache is None and not job.expired(self.clock()):
            return done
        stopped = self._warm_up_stopped(job)  # the first look before the lookup, which reads the whole prompt
        if stopped is not None:
            return stopped
        cache = self._row(job, ())
        start = cache.length
        while cache.length < len(job.ids):
            if cache.length > start and (stopped := self._warm_up_stopped(job)) is not None:
                break
            end = min(cache.length + self.warm_up_chunk_tokens, len(job.ids))
            self.forward.prefill(job.ids[None, cache.length : end].to(self.device), cache)
        if job.runs == 1:
            self.stats.prompt_tokens += len(job.ids)
        self.stats.prefilled_tokens += cache.length - start
        if cache.length > start:
            self._keep(job, cache)
        return stopped or done

    def _warm_up_stopped(self, job: Job) -> BaseException | None:
        """Why a warm-up stops here, if it does: abandoned, or judgments waiting."""
        if job.expired(self.clock()):
            self.stats.abandoned += 1
            return abandoned()
        if self.judgments_waiting():
            self.stats.warm_ups_cut += 1
            return WarmUpCut()
        return None

    def _row(self, job: Job, batch: Sequence[tuple[torch.Tensor, KVCache]]) -> KVCache:
        """A buffer for `job`'s prompt holding the keys and values of its longest prefix found
        in the prefix cache or in a row of `batch`; at least one token is left to prefill."""
        reused, entry = self.cache.lookup(job.key, job.ids) if self.cache else (0, None)
        layers = None if entry is None else [(k[None], v[None]) for k, v in entry.layers]
        for ids, earlier in batch:
            shared = min(common_prefix(ids, job.ids), len(job.ids) - 1)
            if shared > reused:
                reused, layers = shared, [(layer.keys, layer.values) for layer in earlier.layers]
        cache = self.forward.new_cache(1, len(job.ids))
        if layers is not None and reused:
            for layer, (keys, values) in zip(cache.layers, layers):
                layer.append(keys[:, :, :reused], values[:, :, :reused])
        return cache

    def _keep(self, job: Job, cache: KVCache) -> None:
        """Store the prompt's prefix whose keys and values `cache` holds (its buffer, as it is,
        counted whole: not copied while a judgment waits for the worker)."""
        if self.cache is not None:
            stored = tuple((layer.keys[0], layer.values[0]) for layer in cache.layers)
            self.cache.store(job.key, CachedPrefix(job.ids[: cache.length], stored, held=cache.capacity))

    def _decode(
        self,
        rows: list[_Row],
        logits: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        answer: Answer,
    ) -> None:
        """Greedy steps over the batch; a row leaves it at its end or, checked between steps,
        once its deadline has passed (nobody reads its answer, and it would hold back the rest)."""
        active = list(rows)
        length = cache.length
        padded = not bool(mask[:, :length].all())
        eos = torch.tensor(self.eos, device=self.device)
        while True:
            if self.ignore_eos:
                logits[:, eos] = float("-inf")
            tokens = logits.argmax(dim=-1)
            now = self.clock()
            keep = []
            for slot, (row, token) in enumerate(zip(active, tokens.tolist())):
                if row.job.expired(now):
                    self.stats.abandoned += 1
                    answer(row.index, abandoned())
                    continue
                if token in self.eos and not self.ignore_eos:
                    answer(row.index, self._result(row))
                    continue
                self._track_verdict(row, logits[slot])
                row.generated.append(token)
                self._extend_text(row)
                if self._verdict_complete(row):
                    answer(row.index, self._result(row))
                    continue
                if len(row.generated) >= row.job.request.max_new_tokens:
                    answer(row.index, self._result(row, "length"))
                    continue
                keep.append(slot)
            if not keep:
                return
            if len(keep) < len(active):
                selected = torch.tensor(keep, device=self.device)
                cache.keep_rows(selected)
                mask, positions, tokens = mask[selected], positions[selected], tokens[selected]
                active = [active[slot] for slot in keep]
                padded = not bool(mask[:, :length].all())
            mask[:, length] = 1
            length += 1
            positions = positions + 1
            self.stats.row_steps += len(active)
            logits = self._step(tokens[:, None], positions[:, None], cache, mask[:, :length] if padded else None).float()

    def _track_verdict(self, row: _Row, logits: torch.Tensor) -> None:
        """Keep the logits of every step right after a score marker (an echoed, escaped marker
        comes before the real one), without holding every step's logits; at most
        `MAX_VERDICT_POSITIONS`, beyond which a label gets no score rather than a wrong one."""
        spec = row.job.request.score
        if spec is None or len(row.verdicts) >= MAX_VERDICT_POSITIONS:
            return
        if re.search(spec.marker, row.text):
            row.verdicts[len(row.generated)] = logits.clone()

    def _needs_text(self, row: _Row) -> bool:
        return row.job.request.score is not None and (self.stop_at_verdict or len(row.verdicts) < MAX_VERDICT_POSITIONS)

    def _extend_text(self, row: _Row) -> None:
        """Bring `row.text` up to `decode(row.generated)` by decoding only the tokens since the
        last whole character, not the whole output again (which made every step cost the
        length of the output so far). A tokenizer that rewrites spaces across tokens on decode
        (`clean_up_tokenization_spaces`) is decoded whole."""
        if not self._needs_text(row):
            return
        if not self._plain_decode:
            row.text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
            return
        tail = self.tokenizer.decode(row.generated[row.clean :], skip_special_tokens=True)
        row.text = row.clean_text + tail
        if not tail.endswith("\ufffd"):
            row.clean, row.clean_text = len(row.generated), row.text

    def _verdict_complete(self, row: _Row) -> bool:
        spec = row.job.request.score
        if not self.stop_at_verdict or spec is None or not row.verdicts:
            return False
        # over the output's last VERDICT_WINDOW characters, from a line start: a search over the
        # whole output after every token made a long run of spaces quadratic
        text = row.text
        return bool(_verdict_done(spec).search(text, max(0, text.rfind("\n", 0, max(0, len(text) - VERDICT_WINDOW)))))

    def _score(self, logits: torch.Tensor, spec: ScoreSpec, *, with_space: bool) -> float | None:
        """P(unsafe) from the logits at the label position: the engine's one call into the
        scoring rule (`soda_guard.scoring`), which every backend shares."""
        return score_from_logits(logits, label_tokens(self.tokenizer, spec, with_space=with_space))

    def _result(self, row: _Row, finish_reason: str = "stop") -> GenerationResult:
        """`finish_reason` as a server says it: `length` where the judge was cut at
        `max_new_tokens`, whose output may end before the verdict it was writing."""
        spec = row.job.request.score
        score = None
        position = verdict_position(self.tokenizer, row.generated, spec) if spec is not None and row.verdicts else None
        if spec is not None and position is not None and position[0] in row.verdicts:
            index, ends_in_space = position
            score = self._score(row.verdicts[index], spec, with_space=not ends_in_space)
        return GenerationResult(
            text=self.tokenizer.decode(row.generated, skip_special_tokens=True),
            score=score,
            prompt_tokens=row.job.prompt_tokens,
            generated_tokens=len(row.generated),
            score_source="logits" if score is not None else None,
            finish_reason=finish_reason,
        )

    def _verdict_only_result(self, job: Job, logits: torch.Tensor) -> GenerationResult:
        """P(unsafe) at the position right after the marker the engine wrote itself; the label is
        the likelier side's likelier word. Off the judge's trained format: the reason is skipped."""
        spec = job.request.score
        assert spec is not None
        literal = marker_literal(spec)
        with_space = not literal[-1:].isspace()
        score = self._score(logits, spec, with_space=with_space)
        if score is None:  # no label can be read off the logits: no label is written, and the parser fails it
            return GenerationResult(text=f"{VERDICT_ONLY_REASON}\n{literal}", prompt_tokens=job.prompt_tokens, generated_tokens=0)
        probs = torch.softmax(logits, dim=-1)
        side = spec.positive if score >= 0.5 else spec.negative
        prefix = " " if with_space else ""
        word = max(side, key=lambda w: float(probs[tokenize(self.tokenizer, prefix + w)["input_ids"][0]]))
        return GenerationResult(
            text=f"{VERDICT_ONLY_REASON}\n{literal} {word}",
            score=score,
            prompt_tokens=job.prompt_tokens,
            generated_tokens=0,
            score_source="verdict_only",
        )
