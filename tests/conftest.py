"""Shared fixtures: tiny random judge models saved to disk and loaded through the real path."""

from __future__ import annotations

import os

# The suite is offline by contract: a hub id that is not on disk must fail at once, not after
# the hub client's network retries (set before transformers / huggingface_hub are imported).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from soda_guard.testing import make_tiny_judge, shared_tokenizer_dir  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def qwen_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer fixture; tests that need it skip where it is absent."""
    found = shared_tokenizer_dir()
    if found is None:
        pytest.skip("real Qwen3 tokenizer fixture (../shared/fixtures/qwen3-tokenizer) not present")
    return found


@pytest.fixture(scope="session")
def tiny_judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Qwen3 judge with the in-process byte tokenizer (needs no files)."""
    return make_tiny_judge(tmp_path_factory.mktemp("tiny-judge-bytes"))


@pytest.fixture(scope="session")
def tiny_qwen_judge_dir(tmp_path_factory: pytest.TempPathFactory, qwen_tokenizer_dir: Path) -> Path:
    """A random 2-layer Qwen3 judge with the real Qwen3 tokenizer."""
    return make_tiny_judge(tmp_path_factory.mktemp("tiny-judge-qwen"), tokenizer_dir=qwen_tokenizer_dir)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not (DATASETS / "rjudge.json").is_file():
        pytest.skip("shared datasets (../shared/datasets) not present")
    return DATASETS


@pytest.fixture(scope="session")
def gen_chat_template() -> str:
    """The Qwen3Guard-Gen chat template (reference copy); tests that need it skip where absent."""
    path = DATASETS.parent / "fixtures" / "qwen3guard-gen-template" / "chat_template.jinja"
    if not path.is_file():
        pytest.skip("Qwen3Guard-Gen template fixture (../shared/fixtures/qwen3guard-gen-template) not present")
    return path.read_text()
