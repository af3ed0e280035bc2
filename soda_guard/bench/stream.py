"""Per-token cost of stream moderation: our KV-cached `GuardStream.feed` against re-running
the model over the whole sequence for every token, which is what the authors' streaming API
does (their issue #22). Both run in this process on the same random model, so the ratio is
the cache's effect alone; on CPU the tiny shape stands in for the real one. A further row sets
concurrent streams sharing batched steps against the same streams fed one after another."""

from __future__ import annotations

import threading
import time
from typing import Callable

import torch

from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from soda_guard.bench.report import BenchSection
from soda_guard.judges.stream import Qwen3GuardStream, tiny_stream_config
from soda_guard.stream_monitor import StreamMonitor
from soda_guard.testing import byte_tokenizer
from soda_guard.trajectory import Trajectory, UserStep

LENGTHS = (256, 1024, 2048, 4096)
CONCURRENT_STREAMS = 4
GPU_LENGTHS = (256, 1024, 2048, 4096)
CONCURRENT_STREAMS = 4
QWEN3_4B_SHAPE = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1_000_000.0)
"""Qwen3-4B's published decoder shape; `guard_inner_size` is not documented and stays the tiny
default, which is negligible next to the decoder."""


def _seconds_per_call(call: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    call()
    sync()
    started = time.perf_counter()
    for _ in range(repeats):
        call()
    sync()
    return (time.perf_counter() - started) / repeats


def _cached_per_token(monitor: StreamMonitor, length: int, tokens: int, sync: Callable[[], None]) -> float:
    """Seconds per single-token `feed` once the stream already holds `length` tokens."""
    vocab = monitor.model.config.vocab_size
    generator = torch.Generator().manual_seed(length)
    stream = monitor.open(Trajectory(steps=[UserStep(content="benchmark")]))
    stream.feed(torch.randint(0, 256, (length - stream.prompt_tokens,), generator=generator).tolist())
    ids = iter(torch.randint(0, min(vocab, 256), (tokens + 1,), generator=generator).tolist())
    seconds = _seconds_per_call(lambda: stream.feed(next(ids)), tokens, sync)
    stream.close()
    return seconds


def _concurrent_per_token(monitor: StreamMonitor, streams: int, length: int, tokens: int) -> tuple[float, float]:
    """Seconds per token for `streams` streams of `length` tokens fed one token at a time: one
    after another from one thread (every step a batch of one; the baseline), and each from its
    own thread at once, when the monitor batches their steps. The two alternate three times and
    the best of each counts, which keeps a busy machine's noise out of their ratio."""
    generator = torch.Generator().manual_seed(streams)
    opened = [monitor.open(Trajectory(steps=[UserStep(content=f"benchmark {i}")])) for i in range(streams)]
    for stream in opened:
        stream.feed(torch.randint(0, 256, (length - stream.prompt_tokens,), generator=generator).tolist())

    def separate() -> None:
        for token in range(tokens):
            for stream in opened:
                stream.feed(token)

    def batched() -> None:
        threads = [threading.Thread(target=lambda s=stream: [s.feed(token) for token in range(tokens)]) for stream in opened]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    best = [float("inf"), float("inf")]
    for _ in range(3):
        for slot, run in enumerate((separate, batched)):
            started = time.perf_counter()
            run()
            best[slot] = min(best[slot], (time.perf_counter() - started) / (streams * tokens))
    for stream in opened:
        stream.close()
    return best[0], best[1]


def _concurrent_row(monitor: StreamMonitor, device: str, model: str, length: int, tokens: int) -> dict[str, object]:
    separate, batched = _concurrent_per_token(monitor, CONCURRENT_STREAMS, length, tokens)
    return {"device": device, "model": model, "tokens": length, "streams": CONCURRENT_STREAMS,
            "separate ms/token": separate * 1e3, "batched ms/token": batched * 1e3, "speedup": separate / batched}


def _recompute_per_token(model: Qwen3GuardStream, length: int, repeats: int, device: torch.device,
                         sync: Callable[[], None]) -> float:
    ids = torch.randint(0, 256, (1, length), device=device)

    def forward() -> None:
        with torch.inference_mode():
            model(ids)

    return _seconds_per_call(forward, repeats, sync)


def _cpu_rows(quick: bool) -> tuple[list[dict[str, object]], dict[str, float | str | None]]:
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    model = Qwen3GuardStream(tiny_stream_config(len(tokenizer))).eval()
    monitor = StreamMonitor(model, tokenizer, model_name="tiny-random-cpu")
    rows: list[dict[str, object]] = []
    figures: dict[str, float | str | None] = {}
    for length in LENGTHS:
        ours = _cached_per_token(monitor, length, 16 if quick else 64, lambda: None)
        baseline = _recompute_per_token(model, length, 2 if quick else 8, torch.device("cpu"), lambda: None)
        speedup = baseline / ours
        rows.append({"device": "cpu", "model": "tiny (2 layers, hidden 64)", "tokens": length,
                     "ours ms/token": ours * 1e3, "recompute ms/token": baseline * 1e3, "speedup": speedup})
        figures[f"stream_ms_per_token_{length}"] = ours * 1e3
        figures[f"stream_recompute_ms_per_token_{length}"] = baseline * 1e3
        figures[f"stream_speedup_{length}"] = speedup
    figures["stream_speedup_2k"] = figures["stream_speedup_2048"]
    rows.append(_concurrent_row(monitor, "cpu", "tiny (2 layers, hidden 64)", 1024, 16 if quick else 64))
    figures[f"stream_batched_speedup_{CONCURRENT_STREAMS}_streams"] = rows[-1]["speedup"]
    return rows, figures


def _gpu_rows(quick: bool) -> tuple[list[dict[str, object]], dict[str, float | str | None]]:
    """The 4B shape with random bf16 weights: latency does not depend on the weights' values,
    so this measures what the real checkpoint would cost per token."""
    device = torch.device("cuda")
    tokenizer = byte_tokenizer()
    config = tiny_stream_config(len(tokenizer), **QWEN3_4B_SHAPE)
    with torch.device("meta"):
        model = Qwen3GuardStream(config)
    model.to_empty(device=device)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.02)
        for name, module in model.named_modules():
            if name.endswith("norm") or name.endswith("layernorm"):
                module.weight.fill_(1.0)
    model = model.to(torch.bfloat16).eval()
    with torch.device(device):
        model.model.rotary_emb = Qwen3RotaryEmbedding(config)
    monitor = StreamMonitor(model, tokenizer, model_name="qwen3-4b-shape-random")
    rows: list[dict[str, object]] = []
    figures: dict[str, float | str | None] = {}
    for length in GPU_LENGTHS:
        ours = _cached_per_token(monitor, length, 16 if quick else 64, torch.cuda.synchronize)
        baseline = _recompute_per_token(model, length, 4 if quick else 16, device, torch.cuda.synchronize)
        rows.append({"device": torch.cuda.get_device_name(), "model": "Qwen3-4B shape, bf16", "tokens": length,
                     "ours ms/token": ours * 1e3, "recompute ms/token": baseline * 1e3, "speedup": baseline / ours})
        figures[f"stream_gpu_4b_ms_per_token_{length}"] = ours * 1e3
    rows.append(_concurrent_row(monitor, torch.cuda.get_device_name(), "Qwen3-4B shape, bf16", 2048, 16 if quick else 64))
    figures[f"stream_gpu_4b_batched_speedup_{CONCURRENT_STREAMS}_streams"] = rows[-1]["speedup"]
    del model, monitor
    torch.cuda.empty_cache()
    return rows, figures


def run(quick: bool) -> BenchSection:
    rows, figures = _cpu_rows(quick)
    if torch.cuda.is_available():
        gpu_rows, gpu_figures = _gpu_rows(quick)
        rows += gpu_rows
        figures.update(gpu_figures)
    else:
        figures["stream_gpu_4b_ms_per_token_2048"] = None
        figures["stream_gpu_note"] = "not measured: no CUDA GPU on this machine"
    return BenchSection(title="Stream moderation: per-token cost, KV cache vs. full recompute", rows=rows, figures=figures)
