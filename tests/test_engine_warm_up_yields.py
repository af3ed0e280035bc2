"""A warm-up is optional work and must not hold a judgment back by more than a chunk of its
prompt. The engine runs a batch's judgments before its warm-ups, prefills a warm-up in chunks
and stops at a chunk's end once a judgment waits, keeping what it prefilled; the backend queues
the cut warm-up again behind the judgments, where it goes on from there, and cancels a
conversation's queued warm-up when a newer one or the conversation's judgment comes."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from soda_guard import SodaJudge, from_openai_messages
from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.engine.decode import Engine, WarmUpCut
from soda_guard.judging import awaiting_action
from soda_guard.testing import make_tiny_judge
from soda_guard.trajectory import AssistantStep, ToolCall, Trajectory

CHUNK = 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_judge(tmp_path_factory.mktemp("yield-judge"), seed=3, initializer_range=0.3)


@pytest.fixture
def backend(model_dir: Path) -> Iterator[TransformersBackend]:
    made = TransformersBackend(str(model_dir), device="cpu", dtype="float32", max_wait_ms=0.0)
    made.engine.warm_up_chunk_tokens = CHUNK
    yield made
    made.close()


def _conversation(tag: str) -> Trajectory:
    return from_openai_messages(
        [
            {"role": "user", "content": f"{tag}: tidy the shared drive."},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"name": "list_files", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "a", "content": "report.pdf (2 MB)\n" * 12},
        ],
        conversation_id=tag,
    )


def _warm_up(tag: str) -> GenerationRequest:
    return GenerationRequest(SodaJudge().render(awaiting_action(_conversation(tag))).messages, 1, cache_key=tag, prefill_only=True)


def _judgment(tag: str) -> GenerationRequest:
    conversation = _conversation(tag)
    action = AssistantStep(content="Deleting.", tool_calls=[ToolCall(id="b", name="delete_file", args={"path": "/share"})])
    judged = conversation.model_copy(update={"steps": [*conversation.steps, action]})
    return GenerationRequest(SodaJudge().render(judged).messages, 8, cache_key=tag)


def _unwarmed_text(backend: TransformersBackend, request: GenerationRequest) -> str:
    engine = Engine(backend.model, backend.tokenizer, backend.device)
    answers: dict[int, Any] = {}
    engine.run([engine.job(request)], answers.__setitem__)
    return answers[0].text


class _Prefills:
    """Records the length of every prefill forward the engine makes, and holds the first one
    until released (so that other work can be queued while the engine is busy)."""

    def __init__(self, engine: Engine) -> None:
        self.lengths: list[int] = []
        self.inside, self.release = threading.Event(), threading.Event()
        self._prefill = engine.forward.prefill
        engine.forward.prefill = self  # type: ignore[method-assign]

    def __call__(self, tokens: torch.Tensor, cache: Any, stop: Any = None) -> torch.Tensor:
        self.lengths.append(tokens.shape[1])
        if not self.inside.is_set():
            self.inside.set()
            assert self.release.wait(30)
        return self._prefill(tokens, cache, stop)


def _until(condition: Any) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_warm_up_stops_at_a_chunk_end_once_a_judgment_waits_and_goes_on_from_there(backend: TransformersBackend) -> None:
    asked = iter([False, False, True])  # before starting, after the first chunk, after the second
    engine = Engine(backend.model, backend.tokenizer, backend.device, warm_up_chunk_tokens=CHUNK, judgments_waiting=lambda: next(asked, False))
    warm_up = engine.job(_warm_up("a"))
    answers: dict[int, Any] = {}
    engine.run([warm_up], answers.__setitem__)
    assert isinstance(answers[0], WarmUpCut)
    assert engine.stats.prefilled_tokens == 2 * CHUNK and engine.stats.warm_ups_cut == 1
    assert engine.cache is not None and engine.cache.lookup("a", warm_up.ids)[0] == 2 * CHUNK  # kept
    engine.run([warm_up], answers.__setitem__)  # queued again
    assert isinstance(answers[0], GenerationResult)
    assert engine.stats.prefilled_tokens == len(warm_up.ids)  # nothing prefilled twice
    assert engine.stats.prompt_tokens == len(warm_up.ids) and engine.stats.judgments == 1  # one warm-up, counted once
    judgment = _judgment("a")
    job = engine.job(judgment)
    before = engine.stats.prefilled_tokens
    engine.run([job], answers.__setitem__)
    assert engine.stats.prefilled_tokens - before < len(job.ids) / 4
    assert answers[0].text == _unwarmed_text(backend, judgment)


def test_a_warm_up_abandoned_while_it_runs_stops_at_the_next_chunk_s_end(backend: TransformersBackend) -> None:
    """Closing the backend (or the warm-up's deadline) stops it within a chunk, not after its
    whole prompt: `close` joins the engine's thread."""
    engine = Engine(backend.model, backend.tokenizer, backend.device, warm_up_chunk_tokens=CHUNK)
    warm_up = engine.job(_warm_up("a"))
    prefill = engine.forward.prefill

    def abandoned_during_the_first_chunk(tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        warm_up.request.abandon()
        return prefill(tokens, cache)

    engine.forward.prefill = abandoned_during_the_first_chunk  # type: ignore[method-assign]
    answers: dict[int, Any] = {}
    engine.run([warm_up], answers.__setitem__)
    assert isinstance(answers[0], TimeoutError)
    assert engine.stats.prefilled_tokens == CHUNK and engine.stats.abandoned == 1


def test_a_warm_up_that_finds_judgments_waiting_prefills_nothing(backend: TransformersBackend) -> None:
    engine = Engine(backend.model, backend.tokenizer, backend.device, judgments_waiting=lambda: True)
    answers: dict[int, Any] = {}
    engine.run([engine.job(_warm_up("a"))], answers.__setitem__)
    assert isinstance(answers[0], WarmUpCut) and engine.stats.prefilled_tokens == 0


def test_a_batch_runs_its_judgments_before_its_warm_ups(backend: TransformersBackend) -> None:
    engine = Engine(backend.model, backend.tokenizer, backend.device)
    order: list[int] = []
    engine.run([engine.job(_warm_up("a")), engine.job(_judgment("b"))], lambda index, _: order.append(index))
    assert order == [1, 0]


def test_a_judgment_arriving_during_a_warm_up_waits_for_one_chunk_then_the_warm_up_goes_on(backend: TransformersBackend) -> None:
    prefills = _Prefills(backend.engine)
    warm_up = backend.prefill(_warm_up("a"))
    assert warm_up is not None and prefills.inside.wait(30)  # the warm-up's first chunk in hand
    judgment = _judgment("b")
    with ThreadPoolExecutor(1) as pool:
        judged = pool.submit(backend.generate, [judgment])
        _until(lambda: backend._batcher.urgent_pending == 1)
        prefills.release.set()
        (result,) = judged.result(timeout=60)
    assert warm_up.result(timeout=60).generated_tokens == 0  # queued again, and finished
    warm_ids = backend.engine.job(_warm_up("a")).ids
    judged_ids = backend.engine.job(judgment).ids
    # one chunk of the warm-up, the whole judgment, then the rest of the warm-up from where it
    # stopped (less the judge's header, which the judgment's prompt shares and left cached)
    assert prefills.lengths[:2] == [CHUNK, len(judged_ids)]
    assert 0 < sum(prefills.lengths[2:]) <= len(warm_ids) - CHUNK
    assert backend.engine.cache is not None and backend.engine.cache.lookup("a", warm_ids)[0] == len(warm_ids) - 1
    assert backend.stats.warm_ups_cut == 1
    assert result.text == _unwarmed_text(backend, judgment)


def test_the_conversation_s_judgment_cancels_its_queued_warm_up(backend: TransformersBackend) -> None:
    prefills = _Prefills(backend.engine)
    with ThreadPoolExecutor(2) as pool:
        busy = pool.submit(backend.generate, [_judgment("x")])  # holds the engine
        assert prefills.inside.wait(30)
        warm_up = backend.prefill(_warm_up("a"))
        assert warm_up is not None
        judged = pool.submit(backend.generate, [_judgment("a")])
        _until(lambda: backend._batcher.urgent_pending == 1)
        assert warm_up.cancelled()
        prefills.release.set()
        busy.result(timeout=60)
        judged.result(timeout=60)
    assert len(prefills.lengths) == 2 and backend.stats.judgments == 2  # the warm-up never ran


def test_a_newer_warm_up_cancels_the_older_one_s_queued_job(backend: TransformersBackend) -> None:
    prefills = _Prefills(backend.engine)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(backend.generate, [_judgment("x")])
        assert prefills.inside.wait(30)
        older = backend.prefill(_warm_up("a"))
        newer = backend.prefill(GenerationRequest(_judgment("a").messages, 1, cache_key="a", prefill_only=True))
        assert older is not None and newer is not None and older.cancelled()
        prefills.release.set()
        busy.result(timeout=60)
    newer.result(timeout=60)
    assert backend.stats.judgments == 2  # the judgment holding the engine, the newer warm-up


def test_a_running_warm_up_superseded_by_a_newer_one_stops_at_its_next_chunk_s_end(backend: TransformersBackend) -> None:
    prefills = _Prefills(backend.engine)
    older = backend.prefill(_warm_up("a"))
    assert older is not None and prefills.inside.wait(30)  # its first chunk in hand
    newer = backend.prefill(GenerationRequest(_judgment("a").messages, 1, cache_key="a", prefill_only=True))
    assert newer is not None and older.cancelled()
    prefills.release.set()
    newer.result(timeout=60)
    assert backend.engine.stats.abandoned == 1  # the older one, after its first chunk
    newer_ids = backend.engine.job(_judgment("a")).ids
    assert sum(prefills.lengths) == len(newer_ids)  # the newer one went on from the older one's chunk
