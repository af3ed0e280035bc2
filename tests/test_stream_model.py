"""Qwen3Guard-Stream loading: real weight names, single and sharded safetensors, no remote code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from soda_guard.errors import ModelLoadError
from soda_guard.judges.stream import (
    INDEX_FILE,
    Qwen3GuardStream,
    load_stream_model,
    make_tiny_stream_guard,
    save_stream_checkpoint,
)

HEAD_NAMES = {
    f"{prefix}{name}.weight"
    for prefix in ("", "query_")
    for name in ("risk_level_category_pre", "risk_level_category_layernorm", "risk_level_head", "category_head")
}


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_stream_guard(tmp_path_factory.mktemp("stream-guard"))


def _reference(folder: Path) -> Qwen3GuardStream:
    """The saved weights put into a normally constructed module, bypassing the loader."""
    from soda_guard.judges.stream import stream_config

    model = Qwen3GuardStream(stream_config(json.loads((folder / "config.json").read_text())))
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def test_checkpoint_uses_public_names(stream_dir: Path) -> None:
    names = set(load_file(str(stream_dir / "model.safetensors")))
    assert HEAD_NAMES <= names
    assert all(name.startswith("model.") for name in names - HEAD_NAMES)
    config = json.loads((stream_dir / "config.json").read_text())
    assert (config["num_risk_level"], config["num_category"], config["num_query_risk_level"], config["num_query_category"]) == (3, 8, 3, 9)


def test_loaded_model_matches_saved_weights(stream_dir: Path) -> None:
    loaded = load_stream_model(str(stream_dir), device="cpu")
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.inference_mode():
        response, query = loaded(ids)
        expected_response, expected_query = _reference(stream_dir)(ids)
    torch.testing.assert_close(response.risk, expected_response.risk)
    torch.testing.assert_close(query.category, expected_query.category)


def test_sharded_checkpoint_loads(stream_dir: Path, tmp_path: Path) -> None:
    sharded = save_stream_checkpoint(_reference(stream_dir), tmp_path / "sharded", max_shard_size=40_000)
    index = json.loads((sharded / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (sharded / "model.safetensors").exists()
    loaded = load_stream_model(str(sharded), device="cpu")
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(loaded(ids)[0].risk, _reference(stream_dir)(ids)[0].risk)


def _copy_with_state(source: Path, target: Path, edit) -> Path:
    target.mkdir()
    (target / "config.json").write_text((source / "config.json").read_text())
    state = load_file(str(source / "model.safetensors"))
    edit(state)
    save_file(state, str(target / "model.safetensors"))
    return target


def test_missing_weights_are_named(stream_dir: Path, tmp_path: Path) -> None:
    def drop(state: dict) -> None:
        del state["query_category_head.weight"], state["model.layers.1.mlp.up_proj.weight"]

    folder = _copy_with_state(stream_dir, tmp_path / "missing", drop)
    with pytest.raises(ModelLoadError, match=r"missing 2: model\.layers\.1\.mlp\.up_proj\.weight, query_category_head\.weight"):
        load_stream_model(str(folder), device="cpu")


def test_unexpected_weights_are_named(stream_dir: Path, tmp_path: Path) -> None:
    def add(state: dict) -> None:
        state["lm_head.weight"] = torch.zeros(2, 2)

    folder = _copy_with_state(stream_dir, tmp_path / "extra", add)
    with pytest.raises(ModelLoadError, match=r"unexpected 1: lm_head\.weight") as caught:
        load_stream_model(str(folder), device="cpu")
    assert "missing" not in str(caught.value)


def test_wrong_shapes_are_named(stream_dir: Path, tmp_path: Path) -> None:
    def shrink(state: dict) -> None:
        state["risk_level_head.weight"] = state["risk_level_head.weight"][:2].clone()

    folder = _copy_with_state(stream_dir, tmp_path / "shape", shrink)
    with pytest.raises(ModelLoadError, match=r"risk_level_head\.weight \(2, 32\) != \(3, 32\)"):
        load_stream_model(str(folder), device="cpu")


def test_generation_config_is_not_a_stream_checkpoint(tiny_judge_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="missing guard_inner_size"):
        load_stream_model(str(tiny_judge_dir), device="cpu")


def test_absent_folder_and_hub_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    with pytest.raises(ModelLoadError, match="no such folder"):
        load_stream_model(str(tmp_path / "nowhere"), device="cpu")

    def unavailable(repo_id: str, **kwargs: object) -> str:
        raise LocalEntryNotFoundError(f"{repo_id} is not cached and the hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unavailable)
    with pytest.raises(ModelLoadError, match=r"Qwen/Qwen3Guard-Stream-4B.*`hf download Qwen/Qwen3Guard-Stream-4B"):
        load_stream_model("Qwen/Qwen3Guard-Stream-4B", device="cpu")


def test_hub_id_resolves_to_cached_snapshot(stream_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls: list[dict] = []

    def cached(repo_id: str, **kwargs: object) -> str:
        calls.append({"repo_id": repo_id, **kwargs})
        return str(stream_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    loaded = load_stream_model("Qwen/Qwen3Guard-Stream-0.6B", device="cpu")
    assert calls[0]["repo_id"] == "Qwen/Qwen3Guard-Stream-0.6B" and calls[0]["local_files_only"] is True
    assert loaded.name_or_path == "Qwen/Qwen3Guard-Stream-0.6B"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_loads_bf16_on_gpu(stream_dir: Path) -> None:
    loaded = load_stream_model(str(stream_dir))
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert loaded.model.rotary_emb.inv_freq.device.type == "cuda"
    with torch.inference_mode():
        assert loaded(torch.tensor([[1, 2]], device="cuda"))[0].risk.shape == (1, 2, 3)
