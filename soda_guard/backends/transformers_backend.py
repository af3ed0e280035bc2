"""In-process judge on transformers: greedy decoding with the tokenizer's own chat template, the
way the judges' authors ran them, plus the verdict score read from the logits.

Judgments go through `soda_guard.engine`: the KV cache of each conversation's last judged
prompt is reused (an agent's trajectory only grows, so only the new tokens are prefilled) and
concurrent judgments share one forward batch. Greedy text and scores are those of a plain
`model.generate` per request (tests/test_engine_*.py hold the two side by side).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import Future, InvalidStateError
from typing import Any, Sequence

from soda_guard.backends.waiting import await_all, wait_all
from soda_guard.backends.prefill import LatestPerKey
from soda_guard.engine.batcher import MicroBatcher
from soda_guard.engine.decode import Engine, EngineStats, Job, WarmUpCut
from soda_guard.generation import GenerationRequest, GenerationResult
from soda_guard.loading import load_causal_lm, load_tokenizer, resolve_device, resolve_dtype
from soda_guard.offload import off_loop


class TransformersBackend:
    """One loaded model shared by every judgment.

    Keyword options (prefix reuse, batching and compile leave every output as it was; the other
    three change what is generated):
    - `prefix_cache_tokens`: LRU budget, in prompt tokens, for prefix keys/values reused across
      batches (32768 is about 4.7 GB for Qwen3-4B in bfloat16); a longer conversation keeps its
      first that many; 0 turns reuse off (rows of one batch, such as a turn's parallel calls,
      still share their prefix).
    - `max_batch_size`, `max_wait_ms`: how many concurrent judgments one forward takes and how
      long the first of them waits for company.
    - `stop_at_verdict`: end a row once `<marker> <label>` is written (SODA: `[Verdict] X`;
      Qwen3Guard: `Safety: X`, so its categories and refusal lines are not produced).
    - `verdict_only`: no generation at all: the engine writes the marker itself and reads
      P(unsafe) from one forward pass. Faster, but off the judge's trained output format (the
      reason is skipped, the text says so), hence opt-in.
    - `ignore_eos`: never stop on end-of-turn; benchmarks use it so random weights do not change
      the amount of work.
    - `compile_decode`: torch.compile the decode step (a win only where kernel launches
      dominate, i.e. on a GPU; see benchmarks/RESULTS.md).
    - `timeout_s`: the deadline of a request that brings none (`GenerationRequest.deadline`),
      so no caller waits on the engine without one.
    """

    def __init__(
        self,
        model: str,
        *,
        device: str = "auto",
        dtype: str = "auto",
        **options: Any,
    ) -> None:
        self.model_id = model
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(model)
        self.model = load_causal_lm(model, self.device, self.dtype)
        self._start(**options)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, model_id: str, **options: Any) -> TransformersBackend:
        """A backend around a model already in memory (benchmarks build one from a config)."""
        backend = cls.__new__(cls)
        backend.model_id = model_id
        backend.model, backend.tokenizer = model, tokenizer
        backend.device, backend.dtype = next(model.parameters()).device, model.dtype
        backend._start(**options)
        return backend

    def _start(
        self,
        *,
        prefix_cache_tokens: int = 32768,
        max_batch_size: int = 8,
        max_wait_ms: float = 2.0,
        stop_at_verdict: bool = False,
        verdict_only: bool = False,
        ignore_eos: bool = False,
        compile_decode: bool = False,
        timeout_s: float = 300.0,
    ) -> None:
        self.timeout_s = timeout_s
        self._warming = LatestPerKey()
        self.engine = Engine(
            self.model,
            self.tokenizer,
            self.device,
            prefix_cache_tokens=prefix_cache_tokens,
            stop_at_verdict=stop_at_verdict,
            verdict_only=verdict_only,
            ignore_eos=ignore_eos,
            compile_decode=compile_decode,
            judgments_waiting=self._judgments_waiting,
        )
        self._batcher: MicroBatcher[Job, GenerationResult] = MicroBatcher(
            self.engine.run,
            max_batch_size=max_batch_size,
            max_wait_s=max_wait_ms / 1000.0,
            expired=lambda job: job.expired(time.monotonic()),
            abandon=lambda job: job.request.abandon(),
            urgent=lambda job: not job.request.prefill_only,
        )

    def _judgments_waiting(self) -> bool:
        """Whether judgments are queued for the engine: a warm-up in hand stops for them."""
        return self._batcher.urgent_pending > 0

    def prefill(self, request: GenerationRequest) -> Future[GenerationResult] | None:
        """Fire and forget: queue a prefill-only job that leaves the request's keys and values
        in the prefix cache, so the judgment that follows prefills only what is new. The
        caller (the guard's warm-up thread) waits for nothing; an older warm-up of the same
        conversation still queued is cancelled, and none is queued behind judgments waiting
        for the model (it would only hold them up); one running stops at its next chunk for
        judgments that arrive (`Engine._warm`). The result changes no verdict: the cache holds
        the keys and values the judgment would compute. None when not queued: no conversation
        key, no prefix cache, or judgments waiting."""
        if request.cache_key is None or self.engine.cache is None or self._judgments_waiting():
            return None
        job = self.engine.job(dataclasses.replace(self._with_deadline(request), prefill_only=True, max_new_tokens=1))
        warm_up: Future[GenerationResult] = Future()
        self._warming.replace(request.cache_key, warm_up)
        self._follow(job, warm_up, self._batcher.submit([job])[0])
        return warm_up

    def _follow(self, job: Job, warm_up: Future[GenerationResult], queued: Future[GenerationResult]) -> None:
        """`queued` runs `job` on behalf of `warm_up`, which stays pending until the job has
        prefilled the whole prompt or failed, so that a newer warm-up or the conversation's
        judgment can still cancel it: the job is then dropped if still queued, or stopped at
        its next chunk's end if running. One the engine cut for waiting judgments is queued
        again, behind them, and goes on from where it stopped."""
        warm_up.add_done_callback(lambda outer: _drop(queued, job) if outer.cancelled() else None)
        queued.add_done_callback(lambda inner: self._warm_up_ended(job, warm_up, inner))

    def _warm_up_ended(self, job: Job, warm_up: Future[GenerationResult], queued: Future[GenerationResult]) -> None:
        if warm_up.done():  # cancelled: superseded, or its judgment came
            return
        if queued.cancelled():  # the batcher closing
            warm_up.cancel()
            return
        error = queued.exception()
        try:
            if isinstance(error, WarmUpCut) and not job.expired(time.monotonic()):
                again = self._batcher.requeue(job)  # on the worker's thread: this is its answer's callback
                if again is None:
                    warm_up.cancel()
                else:
                    self._follow(job, warm_up, again)
            elif error is not None:
                warm_up.set_exception(error)
            else:
                warm_up.set_result(queued.result())
        except InvalidStateError:  # cancelled meanwhile
            pass

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    def clear_cache(self) -> None:
        if self.engine.cache is not None:
            self.engine.cache.clear()

    def close(self) -> None:
        """Drops the judgments in hand at the next step and joins the worker; idempotent."""
        self._batcher.close()

    def _with_deadline(self, request: GenerationRequest) -> GenerationRequest:
        if request.deadline is not None:
            return request
        return dataclasses.replace(request, deadline=time.monotonic() + self.timeout_s)

    def _submit(self, requests: Sequence[GenerationRequest]) -> tuple[list[Future[GenerationResult]], float]:
        jobs = [self.engine.job(self._with_deadline(request)) for request in requests]
        for request in requests:
            if request.cache_key is not None:
                self._warming.cancel(request.cache_key)
        deadline = max((job.request.deadline for job in jobs if job.request.deadline is not None), default=time.monotonic())
        return self._batcher.submit(jobs), deadline

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Whatever ends the wait abandons the judgments still running (`waiting`)."""
        futures, deadline = self._submit(requests)
        return wait_all(futures, requests, deadline)

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Cancelling the awaiting task drops its rows at the engine's next step."""
        # tokenising a long prompt takes milliseconds: not on the caller's event loop
        try:
            futures, deadline = await off_loop(self._submit, requests)
        except asyncio.CancelledError:
            # the submission goes on in its thread and queues the jobs, which nobody awaits now:
            # the engine drops them (they share the requests' cancel flag) instead of decoding
            for request in requests:
                request.abandon()
            raise
        return await await_all(futures, requests, deadline)


def _drop(queued: Future[GenerationResult], job: Job) -> None:
    queued.cancel()
    job.request.abandon()
