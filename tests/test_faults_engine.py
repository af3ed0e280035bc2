"""Issue 22, in-process engine: a cancelled check drops its rows at the next decode step, and
the process exits cleanly (exit code 0, no "terminate called") without `close()` while the
engine is decoding. Outcomes and exit codes only, no wall-clock asserts."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from soda_guard import SodaJudge, from_openai_messages
from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.testing import make_tiny_judge

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_judge(tmp_path_factory.mktemp("fault-judge"), seed=5)


def long_request(deadline: float) -> GenerationRequest:
    trajectory = from_openai_messages([{"role": "user", "content": "delete every backup"}])
    return GenerationRequest(SodaJudge().render(trajectory).messages, 20_000, None, "long", deadline)


def wait_for(condition, within_s: float = 30.0) -> bool:  # type: ignore[no-untyped-def]
    until = time.monotonic() + within_s
    while not condition() and time.monotonic() < until:
        time.sleep(0.005)
    return bool(condition())


def test_a_cancelled_async_judgment_is_dropped_at_the_next_step(model_dir: Path) -> None:
    """Before: the engine went on decoding until the judgment's own deadline (here 10 min)."""
    backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32", ignore_eos=True)

    async def scenario() -> None:
        task = asyncio.ensure_future(backend.agenerate([long_request(time.monotonic() + 600)]))
        assert await asyncio.to_thread(wait_for, lambda: backend.stats.row_steps > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(scenario())
        assert wait_for(lambda: backend.stats.abandoned == 1)
        steps = backend.stats.row_steps
        assert wait_for(lambda: False, within_s=0.2) is False and backend.stats.row_steps == steps
    finally:
        backend.close()


def test_close_drops_the_batch_in_hand(model_dir: Path) -> None:
    backend = TransformersBackend(str(model_dir), device="cpu", dtype="float32", ignore_eos=True)
    futures, _ = backend._submit([long_request(time.monotonic() + 600)])
    assert wait_for(lambda: backend.stats.row_steps > 0)
    backend.close()
    assert isinstance(futures[0].exception(timeout=0), TimeoutError) and backend.stats.abandoned == 1


EXIT_WITHOUT_CLOSE = """
import sys, time
from soda_guard import SodaJudge, from_openai_messages
from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.transformers_backend import TransformersBackend
backend = TransformersBackend(sys.argv[1], device="cpu", dtype="float32", ignore_eos=True)
messages = SodaJudge().render(from_openai_messages([{"role": "user", "content": "x"}])).messages
futures, _ = backend._submit([GenerationRequest(messages, 20_000, None, "k", time.monotonic() + 600)])
while backend.stats.row_steps == 0:
    time.sleep(0.001)
print("exiting mid-decode", flush=True)
"""


@pytest.mark.parametrize("attempt", range(2))
def test_the_process_exits_cleanly_mid_decode_without_close(model_dir: Path, attempt: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITHOUT_CLOSE, str(model_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "exiting mid-decode" in done.stdout and "terminate called" not in done.stderr
