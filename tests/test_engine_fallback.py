"""A model the engine's own Qwen3 step does not reproduce (here: a GELU MLP) is judged through
the model's own forward over a transformers cache: the engine keeps prefix reuse and batching,
and writes what `model.generate` writes, with the same scores."""

from __future__ import annotations

from pathlib import Path

import pytest

from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.engine import qwen3_step
from soda_guard.engine.model_step import ModelStep
from soda_guard.engine.naive import naive_generate
from soda_guard.testing import make_tiny_judge, shared_tokenizer_dir
from test_engine_backend import LATE, judgment


@pytest.fixture(scope="module")
def gelu_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_judge(tmp_path_factory.mktemp("gelu-judge"), tokenizer_dir=shared_tokenizer_dir(), seed=5,
                           hidden_act="gelu_pytorch_tanh")


def test_an_unsupported_model_falls_back_to_its_own_forward_and_matches_generate(gelu_judge: Path) -> None:
    backend = TransformersBackend(str(gelu_judge), device="cpu", dtype="float32", max_wait_ms=30.0)
    try:
        assert not qwen3_step.supports(backend.model)
        assert isinstance(backend.engine.forward, ModelStep)
        requests = [judgment("alice", 1), judgment("bob", 2, LATE, 12), judgment("alice", 2), judgment("carol", 0, max_new_tokens=4)]
        ours = backend.generate(requests[:2]) + backend.generate(requests[2:])  # the second batch reuses alice's prefix
        for request, got in zip(requests, ours, strict=True):
            want = naive_generate(backend.model, backend.tokenizer, request)
            assert got.text == want.text and got.generated_tokens == want.generated_tokens
            assert (got.score is None) == (want.score is None)
            if want.score is not None:
                assert got.score == pytest.approx(want.score, abs=1e-4)
        assert backend.stats.prefilled_tokens < backend.stats.prompt_tokens
    finally:
        backend.close()
