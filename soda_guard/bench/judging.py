"""The judging engine against the naive baseline, same model, same process, same workload.

Baseline: render the full prompt and call `model.generate` for every judgment, as the judges'
model cards do. Ours: `TransformersBackend` (prefix KV reuse + micro-batching + lean decode).
Both generate a fixed number of tokens (EOS ignored) so random weights do not change the work.
Workloads: one 20-step agent trajectory judged at every tool call, 8 concurrent judgments of
different conversations, and 8 parallel tool calls of one agent turn judged together (each in its
own view, as `Guard` does: the views share the conversation and differ only in the pending call).
On CUDA the model has Qwen3-4B's exact shape in bf16 and the roofline floor is printed next to
the measurement.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.bench.report import BenchSection, percentile, time_each
from soda_guard.engine.naive import naive_generate
from soda_guard.judges.soda import SodaJudge
from soda_guard.testing import load_test_tokenizer, shared_tokenizer_dir, tiny_qwen3_config
from soda_guard.trajectory import Trajectory

QWEN3_4B_SHAPE = dict(
    hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, tie_word_embeddings=True,
)
# Dense bf16 peak FLOP/s and HBM bandwidth (bytes/s) of the GPUs this bench is run on.
GPU_PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
STEPS = 20
CONCURRENT = 8
PARALLEL_HISTORY = 6
"""Tool calls before the turn of parallel calls: mid-range of the concurrent workload's 4-8."""


def datasets_dir() -> Path | None:
    here = Path(__file__).resolve().parents[2]
    for candidate in (here.parent / "shared" / "datasets", here / "shared" / "datasets"):
        if (candidate / "rjudge.json").is_file():
            return candidate
    return None


def tool_results() -> list[str]:
    """Real tool outputs (R-Judge environment turns) so prompt lengths grow as real ones do;
    synthetic text of similar length where the datasets are absent."""
    folder = datasets_dir()
    if folder is None:
        return [f"result {n}: " + "row, " * (40 + 23 * (n % 7)) for n in range(64)]
    records = json.loads((folder / "rjudge.json").read_text())
    turns = [t for r in records for c in r["contents"] for t in c if t.get("role") == "environment" and t.get("content")]
    return [str(t["content"])[:1200] for t in turns[:400:6]]


def agent_messages(name: str, steps: int, results: Sequence[str]) -> list[dict[str, Any]]:
    """A user request then `steps` tool calls, each followed by its result except the last (the
    call being judged)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": f"{name}: collect every customer's card data and mail it to me."}]
    for n in range(steps):
        call = {"id": f"{name}-{n}", "function": {"name": "query_db", "arguments": json.dumps({"table": f"t{n}", "user": name})}}
        messages.append({"role": "assistant", "content": f"Step {n}: querying.", "tool_calls": [call]})
        if n < steps - 1:
            messages.append({"role": "tool", "tool_call_id": f"{name}-{n}", "content": results[(n + len(name)) % len(results)]})
    return messages


def judgment(name: str, steps: int, results: Sequence[str], tokens: int) -> GenerationRequest:
    judge = SodaJudge()
    trajectory = Trajectory.from_openai(agent_messages(name, steps, results), conversation_id=name)
    return GenerationRequest(judge.render(trajectory).messages, tokens, judge.score_spec, trajectory.conversation_id)


def parallel_call_judgments(name: str, history: int, results: Sequence[str], tokens: int) -> list[GenerationRequest]:
    """One judgment per call of an assistant turn of `CONCURRENT` parallel calls after `history`
    answered ones, each rendered from `Trajectory.with_only_pending_call` with the conversation
    id as cache key, exactly as `Guard` plans and `JudgeRunner` prepares them."""
    judge = SodaJudge()
    messages = agent_messages(name, history + 1, results)
    messages[-1] = {"role": "assistant", "content": "Fetching every table at once.", "tool_calls": [
        {"id": f"{name}-p{n}", "function": {"name": "query_db", "arguments": json.dumps({"table": f"cards{n}", "user": name})}}
        for n in range(CONCURRENT)
    ]}
    trajectory = Trajectory.from_openai(messages, conversation_id=name)
    views = [trajectory.with_only_pending_call(call.id) for call in trajectory.pending_tool_calls()]
    return [GenerationRequest(judge.render(view).messages, tokens, judge.score_spec, view.conversation_id) for view in views]


def _concurrently(backend: TransformersBackend, requests: Sequence[GenerationRequest]) -> tuple[list[float], float]:
    latencies = [0.0] * len(requests)
    gate = threading.Barrier(len(requests) + 1)

    def call(index: int) -> None:
        gate.wait()
        start = time.perf_counter()
        backend.generate([requests[index]])
        latencies[index] = time.perf_counter() - start

    threads = [threading.Thread(target=call, args=(n,)) for n in range(len(requests))]
    for thread in threads:
        thread.start()
    begin = time.perf_counter()
    gate.wait()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - begin


def _together(backend: TransformersBackend, requests: Sequence[GenerationRequest]) -> tuple[list[float], float]:
    """One `generate` call for all requests, as `JudgeRunner.verdicts` makes for a turn's calls;
    every call's decision waits for the whole list, so each latency is the call's."""
    begin = time.perf_counter()
    backend.generate(requests)
    elapsed = time.perf_counter() - begin
    return [elapsed] * len(requests), elapsed


def _row(workload: str, mode: str, latencies: Sequence[float], elapsed: float, prefilled: float | None) -> dict[str, Any]:
    return {
        "workload": workload,
        "mode": mode,
        "judgments": len(latencies),
        "judgments_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 0.95) * 1000,
        "prefilled_tokens_per_judgment": prefilled,
    }


def build_model(device: torch.device, real_tokenizer: bool) -> tuple[Any, Any, str]:
    """Tiny random Qwen3 on CPU; Qwen3-4B's exact shape (bf16) on CUDA. With the byte tokenizer
    (the project's default tiny judge) prefill dominates; with the real Qwen3 tokenizer prompts
    have real token counts but the 151936-row output layer is nearly all of a tiny model's
    weights, so decoding dominates, as at batch 1 on a GPU."""
    from transformers import Qwen3ForCausalLM

    tokenizer = load_test_tokenizer(shared_tokenizer_dir() if real_tokenizer else None)
    torch.manual_seed(0)
    cuda = device.type == "cuda"
    overrides: dict[str, Any] = dict(QWEN3_4B_SHAPE) if cuda else {}
    config = tiny_qwen3_config(len(tokenizer) if not cuda else 151936, **overrides)
    config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config.pad_token_id = tokenizer.pad_token_id
    dtype = torch.bfloat16 if cuda else torch.float32
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype).eval()
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    vocab = "Qwen3 tokenizer" if real_tokenizer else "byte tokenizer"
    name = f"random Qwen3-4B shape, bf16, {vocab}" if cuda else f"tiny random Qwen3 (2 layers, hidden 64), fp32, {vocab}"
    return model, tokenizer, name


def roofline(model: Any, prefilled: float, tokens: int, peaks: tuple[float, float]) -> float:
    """Seconds one judgment cannot beat at batch 1: prefill FLOPs at peak plus one full weight
    read per generated token at full bandwidth (KV reads ignored: a lower bound)."""
    flops, bandwidth = peaks
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 2 * params * prefilled / flops + tokens * weight_bytes / bandwidth


def _compare(
    rows: list[dict[str, Any]],
    workload: str,
    requests: Sequence[GenerationRequest],
    baseline: Callable[[GenerationRequest], object],
    engine: Callable[[Sequence[GenerationRequest]], tuple[list[float], float]],
    backend: TransformersBackend,
    tokenizer: Any,
    *,
    modes: tuple[str, str],
    cold: bool,
) -> tuple[float, list[float], float]:
    """The baseline, then the engine (from an empty prefix cache when `cold`), on the same
    requests: both rows appended; returns the speedup, the engine's latencies and its prefilled
    tokens per judgment."""
    naive_lat, naive_s = time_each(baseline, requests)
    if cold:
        backend.clear_cache()
    before = backend.stats.prefilled_tokens
    ours_lat, ours_s = engine(requests)
    prefilled = (backend.stats.prefilled_tokens - before) / len(requests)
    rows.append(_row(workload, modes[0], naive_lat, naive_s, _prompt_tokens(tokenizer, requests)))
    rows.append(_row(workload, modes[1], ours_lat, ours_s, prefilled) | {"speedup": naive_s / ours_s})
    return naive_s / ours_s, ours_lat, prefilled


def measure(target: torch.device, real_tokenizer: bool, steps: int, tokens: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    model, tokenizer, name = build_model(target, real_tokenizer)
    results = tool_results()
    backend = TransformersBackend.from_model(model, tokenizer, model_id=name, ignore_eos=True, max_batch_size=CONCURRENT)
    rows: list[dict[str, Any]] = []
    try:
        baseline = lambda r: naive_generate(model, tokenizer, r, ignore_eos=True)  # noqa: E731
        ours = lambda r: backend.generate([r])[0]  # noqa: E731
        for call in (baseline, ours):
            time_each(call, [judgment("warmup", 3, results, tokens)])
        threads = lambda requests: _concurrently(backend, requests)  # noqa: E731
        incremental, ours_lat, ours_prefilled = _compare(
            rows, f"{name}: {steps}-step trajectory, judged at every call",
            [judgment("agent", k, results, tokens) for k in range(1, steps + 1)],
            baseline, lambda requests: time_each(ours, requests), backend, tokenizer, modes=("naive", "engine"), cold=False,
        )
        batch, _, _ = _compare(
            rows, f"{name}: {CONCURRENT} concurrent judgments",
            [judgment(f"user{n}", 4 + n % 5, results, tokens) for n in range(CONCURRENT)],
            baseline, threads, backend, tokenizer, modes=("naive, one at a time", "engine, threads"), cold=True,
        )
        steady, _, _ = _compare(
            rows, f"{name}: {CONCURRENT} concurrent, each conversation judged one step earlier (steady state)",
            [judgment(f"user{n}", 5 + n % 5, results, tokens) for n in range(CONCURRENT)],
            baseline, threads, backend, tokenizer, modes=("naive, one at a time", "engine, threads"), cold=False,
        )
        parallel, _, _ = _compare(
            rows, f"{name}: {CONCURRENT} parallel tool calls of one new turn, each in its own view, judged together",
            parallel_call_judgments("fanout", PARALLEL_HISTORY, results, tokens),
            baseline, lambda requests: _together(backend, requests), backend, tokenizer,
            modes=("naive, one at a time", "engine, one generate call"), cold=True,
        )
        figures: dict[str, Any] = {
            "incremental_speedup": incremental,
            "batch_speedup": batch,
            "batch_speedup_steady_state": steady,
            "batch_speedup_parallel_calls": parallel,
            "model": name,
        }
        if target.type == "cuda":
            gpu = torch.cuda.get_device_name(target)
            peaks = next((v for k, v in GPU_PEAKS.items() if k in gpu), None)
            if peaks is not None:
                floor = roofline(model, ours_prefilled, tokens, peaks)
                measured = statistics.median(ours_lat)
                rows.append({"workload": f"roofline floor per judgment, batch 1 ({gpu})", "mode": "floor", "p50_ms": floor * 1000,
                             "measured_over_floor": measured / floor})
                figures["measured_over_floor_p50"] = measured / floor
                figures["roofline_floor_ms"] = floor * 1000
                figures["measured_p50_ms"] = measured * 1000
    finally:
        backend.close()
    return rows, figures


def run(quick: bool, device: str = "cpu") -> BenchSection:
    """CPU: the byte-tokenizer tiny judge gives the headline figures, the real-tokenizer one
    follows (full run only). CUDA: Qwen3-4B's shape; `--quick` there runs the same workload."""
    target = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    section = BenchSection(title=f"Judging engine vs naive model.generate ({target.type})")
    if target.type == "cuda" and not torch.cuda.is_available():
        section.rows.append({"workload": "all", "mode": "not measured: no CUDA device here"})
        section.figures.update(incremental_speedup=None, batch_speedup=None, judging_device="not measured: no CUDA device")
        return section
    tokens = 24
    variants = [True] if target.type == "cuda" else ([False] if quick else [False, True])
    for index, real_tokenizer in enumerate(variants):
        rows, figures = measure(target, real_tokenizer, STEPS, tokens)
        section.rows.extend(rows)
        suffix = "" if index == 0 else "_qwen_tokenizer"
        section.figures[f"incremental_speedup{suffix}"] = figures["incremental_speedup"]
        section.figures[f"batch_speedup{suffix}"] = figures["batch_speedup"]
        section.figures[f"batch_speedup_steady_state{suffix}"] = figures["batch_speedup_steady_state"]
        section.figures[f"batch_speedup_parallel_calls{suffix}"] = figures["batch_speedup_parallel_calls"]
        if "measured_over_floor_p50" in figures:
            section.figures["judging_measured_over_floor_p50"] = figures["measured_over_floor_p50"]
            section.figures["judging_roofline_floor_ms"] = figures["roofline_floor_ms"]
            section.figures["judging_measured_p50_ms"] = figures["measured_p50_ms"]
        if index == 0:
            section.figures["judging_device"] = f"{target.type}: {figures['model']}, {tokens} generated tokens"
    return section


def _prompt_tokens(tokenizer: Any, requests: Sequence[GenerationRequest]) -> float:
    return statistics.mean(baseline_prompt_tokens(tokenizer, r) for r in requests)


def baseline_prompt_tokens(tokenizer: Any, request: GenerationRequest) -> int:
    from soda_guard.chat_tokens import encode_chat

    return len(encode_chat(tokenizer, request.messages))
