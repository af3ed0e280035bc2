"""The engine against the naive baseline (`model.generate` per judgment): same greedy text, same
scores, whatever the cache and the batching did. The tiny model uses a wide weight init so its
greedy text varies; a score marker that matches early text forces a score on every request."""

from __future__ import annotations

import asyncio
import functools
import threading
from pathlib import Path
from typing import Iterator

import pytest
import torch
from transformers import DynamicCache, Qwen3ForCausalLM

from soda_guard import SodaJudge, from_openai_messages
from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.engine import qwen3_step
from soda_guard.engine.decode import Engine, marker_literal
from soda_guard.engine.kv import KVCache, KVLayer
from soda_guard.engine.naive import naive_generate
from soda_guard.engine.prefix_cache import BLOCK, CachedPrefix, PrefixCache, common_prefix
from soda_guard.judges.base import ScoreSpec
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge
from soda_guard.judges.soda import parse_soda_output
from soda_guard.testing import make_tiny_judge, shared_tokenizer_dir, tiny_qwen3_config

EARLY = ScoreSpec(marker=r"^[\s\S]{2,30}$", positive=("UNSAFE", "harm"), negative=("SAFE", "ok"))
LATE = ScoreSpec(marker=r"[\s\S]{6}$", positive=("UNSAFE",), negative=("SAFE",))


@pytest.fixture(scope="module", params=["qwen", "bytes"])
def model_dir(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """Every engine test runs with the real Qwen3 tokenizer (where the fixture exists) and with
    the in-process byte tokenizer (everywhere, so an outside contributor runs them too)."""
    tokenizer_dir = None
    if request.param == "qwen":
        tokenizer_dir = shared_tokenizer_dir()
        if tokenizer_dir is None:
            pytest.skip("real Qwen3 tokenizer fixture (../shared/fixtures/qwen3-tokenizer) not present")
    return make_tiny_judge(tmp_path_factory.mktemp("engine-judge"), tokenizer_dir=tokenizer_dir, seed=3, initializer_range=0.3)


@pytest.fixture
def backend(model_dir: Path) -> Iterator[TransformersBackend]:
    made = TransformersBackend(str(model_dir), device="cpu", dtype="float32", max_wait_ms=50.0)
    yield made
    made.close()


def conversation(name: str, steps: int) -> list[dict[str, object]]:
    messages: list[dict[str, object]] = [{"role": "user", "content": f"{name}: move every file of the shared drive to my USB stick."}]
    for n in range(steps):
        messages.append({"role": "assistant", "content": f"Step {n}.", "tool_calls": [
            {"id": f"{name}{n}", "function": {"name": "copy_file", "arguments": f'{{"path": "/share/{name}/{n}.pdf"}}'}}
        ]})
        messages.append({"role": "tool", "tool_call_id": f"{name}{n}", "content": f"copied {n} ({n * 37 % 11} MB) from {name}"})
    messages.append({"role": "assistant", "content": "Last one.", "tool_calls": [
        {"id": f"{name}x", "function": {"name": "delete_file", "arguments": '{"path": "/share"}'}}
    ]})
    return messages


def judgment(name: str, steps: int, spec: ScoreSpec = EARLY, max_new_tokens: int = 10, key: str | None = None) -> GenerationRequest:
    trajectory = from_openai_messages(conversation(name, steps))
    return GenerationRequest(SodaJudge().render(trajectory).messages, max_new_tokens, spec, key if key is not None else name)


def parallel_call_requests(name: str, steps: int, tools: tuple[str, ...]) -> list[GenerationRequest]:
    """One judgment per call of a turn of parallel calls, each in its own view sharing the
    conversation id as cache key, as `Guard` plans them. Tool names start with different letters
    so every two views part at the same token."""
    messages = conversation(name, steps)
    messages[-1] = {"role": "assistant", "content": "All at once.", "tool_calls": [
        {"id": f"{name}-{tool}", "function": {"name": tool, "arguments": f'{{"path": "/share/{name}"}}'}} for tool in tools
    ]}
    trajectory = from_openai_messages(messages, conversation_id=name)
    views = [trajectory.with_only_pending_call(call.id) for call in trajectory.pending_tool_calls()]
    return [GenerationRequest(SodaJudge().render(view).messages, 10, EARLY, view.conversation_id) for view in views]


def assert_same(ours: list[GenerationResult], reference: list[GenerationResult]) -> None:
    """Same text and token counts; the same score to 1e-4, or none on both sides (the byte
    tokenizer cannot score: see `test_scores_are_read_wherever_the_labels_differ_at_their_first_token`)."""
    for got, want in zip(ours, reference, strict=True):
        assert (got.text, got.generated_tokens, got.prompt_tokens) == (want.text, want.generated_tokens, want.prompt_tokens)
        if want.score is None:
            assert got.score is None
        else:
            assert got.score == pytest.approx(want.score, abs=1e-4)


def tokenizer_kind(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["model_dir"])


def test_scores_are_read_wherever_the_labels_differ_at_their_first_token(
    backend: TransformersBackend, request: pytest.FixtureRequest
) -> None:
    """With the Qwen3 tokenizer every request of these tests gets a score, so `assert_same`
    compares scores there. With the byte tokenizer " UNSAFE" and " SAFE" both start with the
    token " ", so no score can be read and both sides must say so rather than guess."""
    requests = [judgment(name, steps) for name, steps in (("alice", 1), ("bob", 3), ("carol", 5))]
    scores = [result.score for result in naive(backend, requests)]
    if tokenizer_kind(request) == "qwen":
        assert all(score is not None for score in scores)
    else:
        assert scores == [None, None, None]


def naive(backend: TransformersBackend, requests: list[GenerationRequest]) -> list[GenerationResult]:
    return [naive_generate(backend.model, backend.tokenizer, r) for r in requests]


def test_greedy_text_varies_so_equality_means_something(backend: TransformersBackend) -> None:
    texts = {r.text for r in naive(backend, [judgment("alice", 0), judgment("bob", 1)])}
    assert len(texts) == 2 and all(len(set(text)) > 3 for text in texts)


def test_incremental_judgments_reuse_the_prefix_and_match_the_baseline(backend: TransformersBackend) -> None:
    requests = [judgment("alice", steps, LATE if steps % 2 else EARLY) for steps in range(5)]
    ours = [backend.generate([r])[0] for r in requests]
    assert_same(ours, naive(backend, requests))
    stats = backend.stats
    assert stats.prefilled_tokens < stats.prompt_tokens / 2
    assert len(backend.engine.cache or ()) == 1


def test_mixed_batch_of_hits_misses_and_lengths_matches_the_baseline(backend: TransformersBackend) -> None:
    backend.generate([judgment("alice", 1), judgment("bob", 3)])
    mixed = [judgment("alice", 2), judgment("bob", 3), judgment("carol", 0, LATE, 14), judgment("dave", 6, max_new_tokens=5)]
    assert_same(backend.generate(mixed), naive(backend, mixed))
    assert backend.stats.batches == 2


@pytest.mark.parametrize("prefix_cache_tokens", [32768, 0])
def test_parallel_calls_in_one_batch_prefill_their_shared_prefix_once(model_dir: Path, prefix_cache_tokens: int) -> None:
    """With the prefix cache off too: rows of one batch build on each other regardless."""
    made = TransformersBackend(
        str(model_dir), device="cpu", dtype="float32", max_wait_ms=50.0, prefix_cache_tokens=prefix_cache_tokens
    )
    try:
        requests = parallel_call_requests("alice", 3, ("copy_file", "delete_file", "move_file", "wipe_disk"))
        ids = [made.engine.job(r).ids for r in requests]
        shared = min(common_prefix(ids[0], other) for other in ids[1:])
        assert all(len(row) - shared > 10 for row in ids) and shared > 3 * max(len(row) - shared for row in ids)
        ours = made.generate(requests)
        assert made.stats.batches == 1
        assert made.stats.prefilled_tokens == shared + sum(len(row) - shared for row in ids)
        assert_same(ours, naive(made, requests))
    finally:
        made.close()


def test_evictions_keep_results_and_the_budget(model_dir: Path) -> None:
    requests = [judgment(name, steps) for steps in (1, 2) for name in ("alice", "bob", "carol")]
    probe = TransformersBackend(str(model_dir), device="cpu", dtype="float32", prefix_cache_tokens=0)
    longest = max(len(probe.engine.job(r).ids) for r in requests)
    probe.close()
    # room for two of the three conversations' prompts, not three
    small = TransformersBackend(str(model_dir), device="cpu", dtype="float32", prefix_cache_tokens=int(2.5 * longest))
    try:
        ours = [small.generate([r])[0] for r in requests]
        cache = small.engine.cache
        assert cache is not None and 0 < len(cache) < 3 and cache.tokens <= cache.max_tokens
        assert_same(ours, naive(small, requests))
    finally:
        small.close()


def test_a_conversation_longer_than_the_budget_keeps_its_head_and_reuses_it(model_dir: Path) -> None:
    requests = [judgment("alice", steps) for steps in (6, 7)]
    budget = 100
    small = TransformersBackend(str(model_dir), device="cpu", dtype="float32", prefix_cache_tokens=budget)
    try:
        assert len(small.engine.job(requests[0]).ids) > 2 * budget
        first = small.generate([requests[0]])
        cache = small.engine.cache
        assert cache is not None and len(cache) == 1 and cache.tokens == budget
        before = small.stats.prefilled_tokens
        second = small.generate([requests[1]])
        assert small.stats.prefilled_tokens - before == len(small.engine.job(requests[1]).ids) - budget
        assert_same(first + second, naive(small, requests))
    finally:
        small.close()


def test_a_lookup_checks_two_entries_however_many_are_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """The own key, then the entry sharing the most whole blocks (found by hash), not a scan."""
    from soda_guard.engine import prefix_cache

    header = torch.arange(2 * BLOCK)
    cache = PrefixCache(max_tokens=10**6)
    for n in range(2000):
        ids = torch.cat([header, torch.tensor([1000 + n, 7, 8])])
        cache.store(f"c{n}", CachedPrefix(ids, ((torch.zeros(1, len(ids), 1), torch.zeros(1, len(ids), 1)),)))
    calls = []
    real = prefix_cache.common_prefix
    monkeypatch.setattr(prefix_cache, "common_prefix", lambda a, b: calls.append(1) or real(a, b))
    assert cache.lookup("c5", torch.cat([header, torch.tensor([1005, 7, 8, 9])]))[0] == 2 * BLOCK + 3
    assert cache.lookup("new", torch.cat([header, torch.tensor([5, 5])]))[0] == 2 * BLOCK
    assert cache.lookup("other", torch.tensor([1, 2, 3]))[0] == 0
    assert len(calls) <= 4


def test_a_reused_key_never_leaks_another_conversations_state(backend: TransformersBackend) -> None:
    first = judgment("alice", 4, key="shared")
    other = judgment("mallory", 4, key="shared")
    backend.generate([first])
    assert_same(backend.generate([other]), naive(backend, [other]))
    assert_same(backend.generate([first]), naive(backend, [first]))


def test_concurrent_threads_and_asyncio_tasks_are_batched_and_answered_each(backend: TransformersBackend) -> None:
    requests = [judgment(f"user{n}", n % 4, EARLY if n % 2 else LATE) for n in range(8)]
    results: dict[int, GenerationResult] = {}
    start = threading.Barrier(4)

    def call(n: int) -> None:
        start.wait()
        results[n] = backend.generate([requests[n]])[0]

    async def tasks() -> list[list[GenerationResult]]:
        return await asyncio.gather(*(backend.agenerate([r]) for r in requests[4:]))

    threads = [threading.Thread(target=call, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n, answer in enumerate(asyncio.run(tasks())):
        results[4 + n] = answer[0]
    assert_same([results[n] for n in range(8)], naive(backend, requests))
    assert backend.stats.batches < backend.stats.judgments


def test_prefill_logits_equal_a_full_forward(backend: TransformersBackend) -> None:
    engine = Engine(backend.model, backend.tokenizer, backend.device)
    engine.run([engine.job(judgment("alice", 1)), engine.job(judgment("bob", 0))], lambda i, r: None)
    jobs = [engine.job(r) for r in (judgment("alice", 3), judgment("bob", 0), judgment("carol", 2))]
    logits = torch.inference_mode()(engine._prefill)(jobs, lambda i, r: None)[1]
    with torch.inference_mode():
        for row, job in enumerate(jobs):
            full = backend.model(input_ids=job.ids[None]).logits[0, -1].float()
            assert torch.allclose(logits[row], full, atol=1e-4)
    assert engine.stats.prefilled_tokens < engine.stats.prompt_tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("products", ["as built", "F.linear", "oneDNN"])
def test_lean_qwen3_step_gives_the_models_logits_and_grows_the_buffers_in_place(
    backend: TransformersBackend, padded: bool, dtype: torch.dtype, products: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `F.linear` for its products the step is the model's arithmetic to the bit; a float32
    step on CPU multiplies by its weights of `ONEDNN_MIN_WEIGHT` elements or more with oneDNN
    (`row_products`; "oneDNN": by all of them), equal to float rounding."""
    import copy

    model = backend.model if dtype == torch.float32 else copy.deepcopy(backend.model).to(dtype)
    assert qwen3_step.supports(model)
    config = model.config
    torch.manual_seed(0)
    length, shape = 40, (3, config.num_key_value_heads, 44, config.head_dim)
    layers = [(torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)) for _ in range(config.num_hidden_layers)]
    mask = torch.ones((3, length + 1), dtype=torch.long)
    if padded:
        mask[1, :9] = 0
    tokens = torch.randint(0, 200, (3, 1))
    positions = mask.sum(dim=1, keepdim=True) - 1
    lean = qwen3_step.LeanQwen3(model)
    if products == "F.linear":
        lean.row_product = torch.nn.functional.linear
    elif products == "oneDNN":
        monkeypatch.setattr(qwen3_step, "ONEDNN_MIN_WEIGHT", 0)
    available = qwen3_step.row_products(torch.ones(4, 4)) is not torch.nn.functional.linear  # this torch's op answers as F.linear
    onednn = dtype == torch.float32 and products != "F.linear" and available
    big = any(p.dim() == 2 and p.numel() >= qwen3_step.ONEDNN_MIN_WEIGHT for p in model.parameters())
    exact = not (onednn and big)
    assert (lean.row_product is torch.nn.functional.linear) == (not onednn)
    with torch.inference_mode():
        theirs_cache = DynamicCache()
        for index, (k, v) in enumerate(layers):
            theirs_cache.update(k[:, :, :length].clone(), v[:, :, :length].clone(), index)
        theirs = model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=theirs_cache, use_cache=True)
        ours_cache = KVCache([KVLayer(k.clone(), v.clone(), length) for k, v in layers])
        buffers = [layer.keys.data_ptr() for layer in ours_cache.layers]
        ours = lean.decode_step(tokens, positions, ours_cache, mask if padded else None)
    same = torch.equal if exact else functools.partial(torch.allclose, rtol=1e-5, atol=1e-5)
    assert ours.dtype == dtype and same(ours, theirs.logits[:, -1])
    if products == "oneDNN" and onednn:  # rounding, not a different step: MKL's products differ in the last bits
        assert not torch.equal(ours, theirs.logits[:, -1])
    for mine, reference, address in zip(ours_cache.layers, theirs_cache.layers, buffers):
        assert mine.keys.shape[2] == length + 1 and same(mine.keys, reference.keys)
        assert mine.keys.data_ptr() == address


@pytest.mark.parametrize("answer", ["raises", "wrong", "absent"])
def test_row_products_fall_back_to_f_linear_where_onednn_does_not_answer_as_it(
    monkeypatch: pytest.MonkeyPatch, answer: str
) -> None:
    """oneDNN's linear is a private op of torch: a torch without it, or one whose op fails or
    computes something else, decodes with `F.linear` rather than with wrong products."""
    from types import SimpleNamespace

    def raises(*args: object) -> torch.Tensor:
        raise RuntimeError("no kernel")

    def wrong(x: torch.Tensor, weight: torch.Tensor, *args: object) -> torch.Tensor:
        return torch.nn.functional.linear(x, weight) + 1e-3

    ops = SimpleNamespace() if answer == "absent" else SimpleNamespace(_linear_pointwise=raises if answer == "raises" else wrong)
    weight = torch.randn(64, 32)
    monkeypatch.setattr(torch.ops, "mkldnn", ops)
    assert qwen3_step.row_products(weight) is torch.nn.functional.linear
    assert qwen3_step.row_products(weight.to(torch.bfloat16)) is torch.nn.functional.linear


@pytest.mark.parametrize(("start", "new"), [(0, 300), (120, 180), (1, 299), (299, 1)])
def test_prefill_on_a_cached_prefix_matches_the_model_in_float32(start: int, new: int) -> None:
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(tiny_qwen3_config(256, initializer_range=0.3)).eval()
    ids = torch.randint(0, 256, (1, start + new))
    with torch.inference_mode():
        whole = DynamicCache()
        reference = model(input_ids=ids, cache=whole, use_cache=True).logits[:, -1]
        lean = qwen3_step.LeanQwen3(model)
        kv = lean.new_cache(1, start + new)
        if start:
            lean.prefill(ids[:, :start], kv)
        ours = lean.prefill(ids[:, start:], kv)
    assert torch.allclose(ours, reference, atol=1e-5)
    for mine, theirs in zip(kv.layers, whole.layers):
        assert mine.keys.shape == theirs.keys.shape == (1, model.config.num_key_value_heads, start + new, model.config.head_dim)
        assert torch.allclose(mine.keys, theirs.keys, atol=1e-5) and torch.allclose(mine.values, theirs.values, atol=1e-5)


@pytest.mark.parametrize(("start", "new"), [(0, 300), (120, 180), (600, 40), (30, 500)])
def test_prefill_in_bfloat16_is_the_models_own_arithmetic(start: int, new: int) -> None:
    """In bfloat16 the prefill on a prefix is bit for bit the model's own with its cache (which
    need not equal its whole-prompt forward: that is `generate`'s own cache-vs-no-cache gap)."""
    torch.manual_seed(start)
    model = Qwen3ForCausalLM(tiny_qwen3_config(256, initializer_range=0.3)).eval().to(torch.bfloat16)
    ids = torch.randint(0, 256, (1, start + new))
    with torch.inference_mode():
        cache = DynamicCache()
        if start:
            model(input_ids=ids[:, :start], cache=cache, use_cache=True)
        split = model(input_ids=ids[:, start:], cache=cache, use_cache=True).logits[:, -1]
        lean = qwen3_step.LeanQwen3(model)
        kv = lean.new_cache(1, start + new)
        if start:
            lean.prefill(ids[:, :start], kv)
        ours = lean.prefill(ids[:, start:], kv)
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, split)
    for mine, theirs in zip(kv.layers, cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)


def test_verdict_only_reads_the_score_after_the_written_marker(
    model_dir: Path, backend: TransformersBackend, request: pytest.FixtureRequest
) -> None:
    if tokenizer_kind(request) == "bytes":
        pytest.skip("needs labels that differ at their first token, which byte tokens do not")
    fast = TransformersBackend(str(model_dir), device="cpu", dtype="float32", verdict_only=True)
    try:
        requests = [judgment(name, 2, SodaJudge.score_spec) for name in ("alice", "bob")]
        results = fast.generate(requests)
    finally:
        fast.close()
    with torch.inference_mode():
        for req, result in zip(requests, results):
            ids = backend.engine.job(req).ids.tolist() + backend.tokenizer("[Verdict]", add_special_tokens=False)["input_ids"]
            probs = torch.softmax(backend.model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
            # the SODA parser reads any casing, so every casing's first token counts
            first = {word: backend.tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0]
                     for word in ("UNSAFE", "Unsafe", "unsafe", "SAFE", "Safe", "safe")}
            unsafe_ids = {first[w] for w in ("UNSAFE", "Unsafe", "unsafe")}
            safe_ids = {first[w] for w in ("SAFE", "Safe", "safe")}
            unsafe = probs[sorted(unsafe_ids - safe_ids)].sum()
            safe = probs[sorted(safe_ids - unsafe_ids)].sum()
            assert result.score == pytest.approx(float(unsafe / (unsafe + safe)), abs=1e-4)
            parsed = parse_soda_output(result.text)
            assert parsed.label is not None and (parsed.label.value.upper() == "UNSAFE") == (result.score >= 0.5)
            assert result.generated_tokens == 0 and result.score_source == "verdict_only"


def test_marker_literals_of_both_judges() -> None:
    assert marker_literal(SodaJudge.score_spec) == "[Verdict]"
    assert marker_literal(Qwen3GuardGenJudge.score_spec) == "Safety:"
    with pytest.raises(ValueError, match="not a plain literal"):
        marker_literal(ScoreSpec(marker=r"(a|b)$", positive=("x",), negative=("y",)))


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
])
def test_compiled_decode_matches_eager(model_dir: Path, request: pytest.FixtureRequest, device: str) -> None:
    """`compile_decode` runs wherever torch.compile does (on CPU in every run; GPU speed is its
    point)."""
    if tokenizer_kind(request) == "qwen":
        pytest.skip("one tokenizer is enough: compiling is slow")
    eager = TransformersBackend(str(model_dir), device=device, dtype="float32")
    compiled = TransformersBackend(str(model_dir), device=device, dtype="float32", compile_decode=True)
    try:
        requests = [judgment("alice", 2, max_new_tokens=6), judgment("bob", 1, max_new_tokens=6)]
        try:
            ours = compiled.generate(requests)
        except Exception as error:  # no C++ toolchain for inductor; any other failure is ours
            if not any(word in f"{type(error).__name__}: {error}" for word in ("InvalidCxxCompiler", "CppCompileError", "C++ compiler")):
                raise
            pytest.skip(f"torch.compile cannot run here: {error}")
        assert_same(ours, eager.generate(requests))
    finally:
        eager.close()
        compiled.close()
