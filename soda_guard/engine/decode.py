"""Batched greedy judging on a transformers causal LM: prefix-reusing prefill, a lean decode loop
that stops each row as soon as it can, and the verdict score read on the fly.

Each row is prefilled alone on top of its cached prefix; rows are then left-padded into one
decode batch whose pads are masked out and whose position ids count only real tokens. Rotary
positions are baked into cached keys, so moving them to another column changes nothing. Cached
tensors are never written: `DynamicCache` concatenates into new tensors during prefill and the
decode batch is a copy, in buffers that each step writes in place (`kv_buffer`). For Qwen3 the
decode step skips `transformers`' per-call machinery (`qwen3_step`), with the same logits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache

from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.chat_tokens import encode_chat, tokenize
from soda_guard.backends.scoring import label_tokens, score_from_logits, verdict_position
from soda_guard.engine import qwen3_step
from soda_guard.engine.kv_buffer import in_place_cache
from soda_guard.engine.prefix_cache import CachedPrefix, PrefixCache, common_prefix
from soda_guard.errors import JudgeError
from soda_guard.judges.base import ScoreSpec

VERDICT_ONLY_REASON = "[Reason] not generated (verdict-only mode)"
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


def _verdict_done(spec: ScoreSpec) -> re.Pattern[str]:
    body = re.sub(r"\$$", "", spec.marker)
    labels = "|".join(re.escape(word) for word in sorted(spec.positive + spec.negative, key=len, reverse=True))
    return re.compile(f"(?:{body})\\s*(?:{labels})$")


@dataclass
class Job:
    request: GenerationRequest
    ids: torch.Tensor
    prompt_tokens: int
    """The chat prompt's length; `ids` also holds the marker that verdict-only mode writes."""

    @property
    def key(self) -> object:
        return self.request.cache_key if self.request.cache_key is not None else ("prompt", hash(tuple(self.ids.tolist())))


@dataclass
class _Row:
    """Decode state of one request: tokens so far and the logits at each position right after
    a score marker (`verdicts`, by token index); the parser later says which one holds the label."""

    job: Job
    generated: list[int] = field(default_factory=list)
    verdicts: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class EngineStats:
    judgments: int = 0
    batches: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0


class Engine:
    """Runs batches of judgments; not re-entrant (one batch at a time, from the batcher's thread)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device,
        *,
        prefix_cache_bytes: int = 1 << 30,
        stop_at_verdict: bool = False,
        verdict_only: bool = False,
        ignore_eos: bool = False,
        compile_decode: bool = False,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes > 0 else None
        self.stop_at_verdict = stop_at_verdict
        self.verdict_only = verdict_only
        self.ignore_eos = ignore_eos
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos[0]
        self.stats = EngineStats()
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        if compile_decode and device.type != "cuda":
            raise ValueError("compile_decode needs a CUDA device")
        self._decode_forward = torch.compile(model, dynamic=True) if compile_decode else model
        lean = qwen3_step.LeanQwen3(model) if qwen3_step.supports(model) else None
        self._lean_step = None if compile_decode else lean
        self._split_prefill = lean if qwen3_step.supports_split_prefill(model) else None

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
    def run(self, jobs: Sequence[Job], answer: Callable[[int, GenerationResult], None]) -> None:
        """Judge `jobs` as one batch, calling `answer(index, result)` as soon as each row ends."""
        self.stats.batches += 1
        self.stats.judgments += len(jobs)
        logits, caches = self._prefill(jobs)
        if self.verdict_only:
            for index, job in enumerate(jobs):
                answer(index, self._verdict_only_result(job, logits[index]))
            return
        cache, mask, positions = self._decode_batch(jobs, caches)
        self._decode(jobs, logits, cache, mask, positions, answer)

    def _prefill(self, jobs: Sequence[Job]) -> tuple[torch.Tensor, list[DynamicCache]]:
        """Prefill each row on its own (prefill is compute-bound, so batching it gains little and
        padding long prompts costs a lot). Rows go in order and each may build on any earlier row
        of the batch, so the parallel calls of one turn (views that differ only in the pending
        call) prefill their shared prefix once, whether or not the prefix cache is on or has room
        for it."""
        rows: list[tuple[torch.Tensor, DynamicCache]] = []
        for job in jobs:
            rows.append(self._prefill_one(job, [(earlier.ids, cache) for earlier, (_, cache) in zip(jobs, rows)]))
        return torch.cat([row_logits for row_logits, _ in rows]), [cache for _, cache in rows]

    def _decode_batch(
        self, jobs: Sequence[Job], caches: Sequence[DynamicCache]
    ) -> tuple[Cache, torch.Tensor, torch.Tensor]:
        """Left-pad the prefilled rows into one decode batch whose cache and mask already have
        room for every token still to generate."""
        lengths = [len(job.ids) for job in jobs]
        longest = max(lengths)
        capacity = longest + max(job.request.max_new_tokens for job in jobs)
        positions = torch.tensor(lengths, device=self.device) - 1
        mask = torch.zeros((len(jobs), capacity), dtype=torch.long, device=self.device)
        for row, length in enumerate(lengths):
            mask[row, longest - length : longest] = 1
        layers = []
        for layer in range(len(caches[0].layers)):
            buffers = []
            for kind in ("keys", "values"):
                first = getattr(caches[0].layers[layer], kind)
                # Zeros, not empty: pad columns are masked, but a NaN there would still reach
                # the output through its zero attention weight.
                buffer = first.new_zeros((len(jobs), first.shape[1], capacity, first.shape[3]))
                for row, cache in enumerate(caches):
                    buffer[row, :, longest - lengths[row] : longest] = getattr(cache.layers[layer], kind)[0]
                buffers.append(buffer)
            layers.append((buffers[0], buffers[1]))
        return in_place_cache(layers, longest), mask, positions

    def _prefill_one(
        self, job: Job, batch: Sequence[tuple[torch.Tensor, DynamicCache]]
    ) -> tuple[torch.Tensor, DynamicCache]:
        """Prefill `job` on top of the longest prefix held by the prefix cache or by a row of
        `batch` (ids, cache) already prefilled in this batch."""
        reused, entry = self.cache.lookup(job.key, job.ids) if self.cache else (0, None)
        layers = None if entry is None else [(k[None], v[None]) for k, v in entry.layers]
        for ids, earlier in batch:
            shared = min(common_prefix(ids, job.ids), len(job.ids) - 1)
            if shared > reused:
                reused, layers = shared, [(layer.keys, layer.values) for layer in earlier.layers]
        self.stats.prompt_tokens += len(job.ids)
        self.stats.prefilled_tokens += len(job.ids) - reused
        cache = DynamicCache()
        if layers is not None and reused:
            cache = DynamicCache(ddp_cache_data=[(k[:, :, :reused], v[:, :, :reused]) for k, v in layers])
        tokens = job.ids[None, reused:].to(self.device)
        if reused and self._split_prefill is not None:
            logits = self._split_prefill.prefill_on_prefix(tokens, reused, cache)
        else:
            logits = self.model(
                input_ids=tokens,
                position_ids=torch.arange(reused, len(job.ids), device=self.device)[None],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            ).logits[:, -1]
        if self.cache is not None:
            stored = tuple((layer.keys[0], layer.values[0]) for layer in cache.layers)
            self.cache.store(job.key, CachedPrefix(job.ids, stored))
        return logits.float(), cache

    def _decode(
        self,
        jobs: Sequence[Job],
        logits: torch.Tensor,
        cache: Cache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        answer: Callable[[int, GenerationResult], None],
    ) -> None:
        rows = [_Row(job) for job in jobs]
        active = list(range(len(jobs)))
        length = cache.get_seq_length()
        padded = not bool(mask[:, :length].all())
        eos = torch.tensor(self.eos, device=self.device)
        while True:
            if self.ignore_eos:
                logits[:, eos] = float("-inf")
            tokens = logits.argmax(dim=-1)
            keep = []
            for slot, (index, token) in enumerate(zip(active, tokens.tolist())):
                row = rows[index]
                if token in self.eos and not self.ignore_eos:
                    answer(index, self._result(row))
                    continue
                self._track_verdict(row, logits[slot])
                row.generated.append(token)
                if len(row.generated) >= row.job.request.max_new_tokens or self._verdict_complete(row):
                    answer(index, self._result(row))
                    continue
                keep.append(slot)
            if not keep:
                return
            if len(keep) < len(active):
                selected = torch.tensor(keep, device=self.device)
                cache.batch_select_indices(selected)
                mask, positions, tokens = mask[selected], positions[selected], tokens[selected]
                active = [active[slot] for slot in keep]
                padded = not bool(mask[:, :length].all())
            mask[:, length] = 1
            length += 1
            positions = positions + 1
            logits = self._step(tokens[:, None], positions[:, None], cache, mask[:, :length], padded)

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: Cache, mask: torch.Tensor, padded: bool
    ) -> torch.Tensor:
        """Next-token logits of every row; the lean Qwen3 step where it reproduces the model."""
        if self._lean_step is not None:
            return self._lean_step.decode_step(tokens, positions, cache, mask if padded else None).float()
        output = self._decode_forward(
            input_ids=tokens, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        return output.logits[:, -1].float()

    def _track_verdict(self, row: _Row, logits: torch.Tensor) -> None:
        """Keep the logits of every step right after a score marker (an echoed, escaped marker
        comes before the real one), without holding every step's logits; at most
        `MAX_VERDICT_POSITIONS`, beyond which a label gets no score rather than a wrong one."""
        spec = row.job.request.score
        if spec is None or len(row.verdicts) >= MAX_VERDICT_POSITIONS:
            return
        prefix = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        if re.search(spec.marker, prefix):
            row.verdicts[len(row.generated)] = logits.clone()

    def _verdict_complete(self, row: _Row) -> bool:
        spec = row.job.request.score
        if not self.stop_at_verdict or spec is None or not row.verdicts:
            return False
        text = self.tokenizer.decode(row.generated, skip_special_tokens=True)
        return bool(_verdict_done(spec).search(text))

    def _result(self, row: _Row) -> GenerationResult:
        spec = row.job.request.score
        score = None
        position = verdict_position(self.tokenizer, row.generated, spec) if spec is not None and row.verdicts else None
        if spec is not None and position is not None and position[0] in row.verdicts:
            index, ends_in_space = position
            score = score_from_logits(row.verdicts[index], label_tokens(self.tokenizer, spec, with_space=not ends_in_space))
        return GenerationResult(
            text=self.tokenizer.decode(row.generated, skip_special_tokens=True),
            score=score,
            prompt_tokens=row.job.prompt_tokens,
            generated_tokens=len(row.generated),
            score_source="logits" if score is not None else None,
        )

    def _verdict_only_result(self, job: Job, logits: torch.Tensor) -> GenerationResult:
        """P(unsafe) at the position right after the marker the engine wrote itself; the label is
        the likelier side's likelier word. Off the judge's trained format: the reason is skipped."""
        spec = job.request.score
        assert spec is not None
        literal = marker_literal(spec)
        with_space = not literal[-1:].isspace()
        score = score_from_logits(logits, label_tokens(self.tokenizer, spec, with_space=with_space))
        probs = torch.softmax(logits, dim=-1)
        side = spec.positive if score is not None and score >= 0.5 else spec.negative
        prefix = " " if with_space else ""
        word = max(side, key=lambda w: float(probs[tokenize(self.tokenizer, prefix + w)["input_ids"][0]]))
        return GenerationResult(
            text=f"{VERDICT_ONLY_REASON}\n{literal} {word}",
            score=score,
            prompt_tokens=job.prompt_tokens,
            generated_tokens=0,
            score_source="verdict_only" if score is not None else None,
        )
