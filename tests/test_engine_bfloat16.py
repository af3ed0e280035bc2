"""The engine in bfloat16, the dtype a judge runs in on a GPU, against `model.generate` on the
same prompts: with prefix reuse, batching and eviction it must write what `generate` writes as
often as `generate` agrees with itself (with its cache vs without), and score within 1e-2.
Also: judging raises no warning at all (deprecated `transformers` arguments included)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch

from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.engine.naive import naive_generate
from soda_guard.testing import make_tiny_judge, shared_tokenizer_dir
from test_engine_backend import EARLY, LATE, judgment


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:
    """The real Qwen3 tokenizer (scores are then read on every request): the scenarios' texts
    were chosen with it, and a byte tokenizer makes other bfloat16 near-ties, so without the
    fixture these comparisons skip instead of comparing something else."""
    return make_tiny_judge(tmp_path_factory.mktemp("bf16-judge"), tokenizer_dir=qwen_tokenizer_dir, seed=3,
                           initializer_range=0.3)


@pytest.fixture(scope="module")
def any_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Qwen3 tokenizer where present, else the byte one: warnings do not depend on it."""
    return make_tiny_judge(tmp_path_factory.mktemp("bf16-any"), tokenizer_dir=shared_tokenizer_dir(), seed=3)


def reference(backend: TransformersBackend, requests: list[GenerationRequest], *, use_cache: bool) -> list[GenerationResult]:
    config = backend.model.generation_config
    saved = config.use_cache
    config.use_cache = use_cache
    try:
        return [naive_generate(backend.model, backend.tokenizer, r) for r in requests]
    finally:
        config.use_cache = saved


def assert_faithful(backend: TransformersBackend, requests: list[GenerationRequest], ours: list[GenerationResult]) -> None:
    cached = reference(backend, requests, use_cache=True)
    uncached = reference(backend, requests, use_cache=False)
    ours_differ = sum(o.text != g.text for o, g in zip(ours, cached, strict=True))
    generate_differs = sum(c.text != u.text for c, u in zip(cached, uncached, strict=True))
    assert ours_differ <= generate_differs, f"{ours_differ} of {len(ours)} texts differ from generate's (its own gap: {generate_differs})"
    for got, want in zip(ours, cached):
        if got.text == want.text:
            assert got.generated_tokens == want.generated_tokens
            assert (got.score is None) == (want.score is None)
            if want.score is not None:
                assert got.score == pytest.approx(want.score, abs=1e-2)


def sequential(backend: TransformersBackend, requests: list[GenerationRequest]) -> list[GenerationResult]:
    return [backend.generate([r])[0] for r in requests]


def concurrent(backend: TransformersBackend, requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Half from threads, half from asyncio tasks, so they share batches of mixed lengths."""
    half = len(requests) // 2
    results: dict[int, GenerationResult] = {}
    start = threading.Barrier(half)

    def call(n: int) -> None:
        start.wait()
        results[n] = backend.generate([requests[n]])[0]

    threads = [threading.Thread(target=call, args=(n,)) for n in range(half)]
    for thread in threads:
        thread.start()

    async def tasks() -> list[list[GenerationResult]]:
        return await asyncio.gather(*(backend.agenerate([r]) for r in requests[half:]))

    for n, answer in enumerate(asyncio.run(tasks())):
        results[half + n] = answer[0]
    for thread in threads:
        thread.join()
    return [results[n] for n in range(len(requests))]


SCENARIOS: dict[str, tuple[dict[str, int], Callable[[], list[GenerationRequest]], Callable[..., list[GenerationResult]]]] = {
    # one conversation growing: every judgment after the first is a prefix-cache hit
    "hits": ({}, lambda: [judgment("alice", steps, EARLY, 16) for steps in range(8)], sequential),
    # new conversations, misses, in one mixed-length batch with hits
    "mixed-batch": ({}, lambda: [judgment("alice", 1), judgment("bob", 3), judgment("alice", 2), judgment("carol", 0, LATE, 14),
                                 judgment("dave", 6, max_new_tokens=5), judgment("bob", 4)], lambda b, r: b.generate(r)),
    # a cache with room for about one conversation: entries keep being evicted and truncated
    "evictions": ({"prefix_cache_tokens": 300}, lambda: [judgment(name, steps) for steps in (1, 2, 3) for name in ("alice", "bob")],
                  sequential),
    "concurrent": ({}, lambda: [judgment(f"user{n}", n % 4, EARLY if n % 2 else LATE) for n in range(8)], concurrent),
}


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_bfloat16_judging_writes_what_generate_writes(model_dir: Path, scenario: str, device: str) -> None:
    options, make_requests, run = SCENARIOS[scenario]
    backend = TransformersBackend(str(model_dir), device=device, dtype="bfloat16", max_wait_ms=50.0, **options)
    try:
        requests = make_requests()
        ours = run(backend, requests)
        assert_faithful(backend, requests, ours)
        assert backend.stats.prefilled_tokens < backend.stats.prompt_tokens
    finally:
        backend.close()


def test_judging_raises_no_warning(any_model_dir: Path) -> None:
    """Run with every warning an error, in the engine's thread too (the filter is global)."""
    backend = TransformersBackend(str(any_model_dir), device="cpu", dtype="float32", max_wait_ms=20.0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            requests = [judgment("alice", 1), judgment("bob", 0), dataclasses.replace(judgment("alice", 2), max_new_tokens=4)]
            backend.generate(requests[:2])
            asyncio.run(backend.agenerate(requests[2:]))
    finally:
        backend.close()
