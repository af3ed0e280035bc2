"""Qwen3Guard-Stream (`Qwen/Qwen3Guard-Stream-0.6B|4B|8B`) as a native module.

The authors ship the model as remote code that no longer loads on transformers 5, so the model
is rebuilt here from transformers' own `Qwen3Model` plus the four response and four query head
layers, under exactly the names the public checkpoints use, and the safetensors are read
directly. Head layout and label order: shared/reference/judges.md §3.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import Qwen3Config
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model, Qwen3RMSNorm, Qwen3RotaryEmbedding

from soda_guard.errors import ModelLoadError
from soda_guard.loading import (
    HUB_UNREACHABLE,
    looks_like_path,
    hub_reachable,
    load_error,
    resolve_device,
    resolve_dtype,
)

QWEN3GUARD_STREAM_MODEL_ID = "Qwen/Qwen3Guard-Stream-4B"

RISK_LEVELS = ("Safe", "Unsafe", "Controversial")
RESPONSE_CATEGORIES = (
    "Violent",
    "Sexual Content or Sexual Acts",
    "Suicide & Self-Harm",
    "Politically Sensitive Topics",
    "PII",
    "Copyright Violation",
    "Non-violent Illegal Acts",
    "Unethical Acts",
)
QUERY_CATEGORIES = RESPONSE_CATEGORIES + ("Jailbreak",)

GUARD_FIELDS = ("guard_inner_size", "num_risk_level", "num_category", "num_query_risk_level", "num_query_category")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]


@dataclass
class HeadLogits:
    risk: torch.Tensor
    category: torch.Tensor


class Qwen3GuardStream(nn.Module):
    """Qwen3 backbone (`model.*`) with per-token response heads and query heads."""

    def __init__(self, config: Qwen3Config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        inner, eps = config.guard_inner_size, config.rms_norm_eps
        self.risk_level_category_pre = nn.Linear(config.hidden_size, inner, bias=False)
        self.risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.risk_level_head = nn.Linear(inner, config.num_risk_level, bias=False)
        self.category_head = nn.Linear(inner, config.num_category, bias=False)
        self.query_risk_level_category_pre = nn.Linear(config.hidden_size, inner, bias=False)
        self.query_risk_level_category_layernorm = Qwen3RMSNorm(inner, eps=eps)
        self.query_risk_level_head = nn.Linear(inner, config.num_query_risk_level, bias=False)
        self.query_category_head = nn.Linear(inner, config.num_query_category, bias=False)

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states of a whole sequence through the `transformers` backbone (the
        stream monitor runs the same weights incrementally, `soda_guard.engine.qwen3_step`)."""
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state

    def response_logits(self, hidden: torch.Tensor) -> HeadLogits:
        features = self.risk_level_category_layernorm(self.risk_level_category_pre(hidden))
        return HeadLogits(self.risk_level_head(features), self.category_head(features))

    def query_logits(self, hidden: torch.Tensor) -> HeadLogits:
        features = self.query_risk_level_category_layernorm(self.query_risk_level_category_pre(hidden))
        return HeadLogits(self.query_risk_level_head(features), self.query_category_head(features))

    def forward(self, input_ids: torch.Tensor) -> tuple[HeadLogits, HeadLogits]:
        """Both heads at every position of a whole sequence, with no cache: the reference the
        incremental path must match, and the authors' per-token recompute baseline."""
        hidden = self.hidden_states(input_ids)
        return self.response_logits(hidden), self.query_logits(hidden)


def stream_config(raw: dict[str, Any], source: str = "config.json") -> Qwen3Config:
    """A plain `Qwen3Config` carrying the guard fields; the checkpoint's `auto_map` and
    architecture name (which point at remote code) are dropped rather than trusted."""
    missing = [name for name in GUARD_FIELDS if name not in raw]
    if missing:
        raise ModelLoadError(f"{source} is not a Qwen3Guard-Stream config: missing {', '.join(missing)}")
    values = {k: v for k, v in raw.items() if k not in ("auto_map", "architectures", "model_type", "transformers_version")}
    config = Qwen3Config(**values)
    config._attn_implementation = "sdpa"
    return config


def _weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        absent = [path.name for path in files if not path.is_file()]
        if absent:
            raise ModelLoadError(f"{folder}: shards named in {INDEX_FILE} are missing: {', '.join(absent)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    found = sorted(folder.glob("*.safetensors"))
    if not found:
        raise ModelLoadError(f"{folder}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE})")
    return found


def resolve_checkpoint(model: str) -> Path:
    """A local folder as is; a hub id through the local Hugging Face cache first, then a
    download, so an offline machine with a cached copy works and one without gets a clear
    error instead of a network traceback."""
    from huggingface_hub import snapshot_download

    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not (folder / "config.json").is_file():
            raise load_error(model, FileNotFoundError("no such folder" if not folder.exists() else "folder has no config.json"))
        return folder
    errors: list[BaseException] = []
    for local_only in (True, False):
        if not local_only and not hub_reachable():
            raise load_error(model, HUB_UNREACHABLE) from errors[-1]
        try:
            return Path(snapshot_download(model, allow_patterns=HUB_PATTERNS, local_files_only=local_only))
        except Exception as error:  # huggingface_hub raises many unrelated types for "not there"
            errors.append(error)
    raise load_error(model, errors[-1]) from errors[-1]


def load_state(model: Qwen3GuardStream, folder: Path, dtype: torch.dtype, device: torch.device) -> None:
    state: dict[str, torch.Tensor] = {}
    for path in _weight_files(folder):
        state.update(load_file(str(path), device="cpu"))
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {', '.join(missing[:20])}" if missing else "",
                 f"unexpected {len(unexpected)}: {', '.join(unexpected[:20])}" if unexpected else ""]
        raise ModelLoadError(f"{folder} is not a Qwen3Guard-Stream checkpoint ({'; '.join(p for p in parts if p)})")
    shapes = model.state_dict()
    wrong = [f"{name} {tuple(state[name].shape)} != {tuple(shapes[name].shape)}" for name in sorted(expected) if state[name].shape != shapes[name].shape]
    if wrong:
        raise ModelLoadError(f"{folder}: weights do not match config.json: {'; '.join(wrong[:10])}")
    model.load_state_dict({name: tensor.to(device=device, dtype=dtype) for name, tensor in state.items()}, assign=True)


def load_stream_model(model: str = QWEN3GUARD_STREAM_MODEL_ID, device: str = "auto", dtype: str = "auto") -> Qwen3GuardStream:
    """Load a Qwen3Guard-Stream checkpoint without remote code: bf16 on GPU, fp32 on CPU.

    The module is built on the meta device so a 4B/8B model is never randomly initialised
    only to be overwritten; the rotary table (a computed buffer, not in the checkpoint) is
    then rebuilt on the real device."""
    folder = resolve_checkpoint(model)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise load_error(model, error) from error
    config = stream_config(raw, str(folder / "config.json"))
    with torch.device("meta"):
        guard = Qwen3GuardStream(config)
    load_state(guard, folder, torch_dtype, target)
    with torch.device(target):
        guard.model.rotary_emb = Qwen3RotaryEmbedding(config)
    guard.name_or_path = model
    return guard.eval()


def save_stream_checkpoint(guard: Qwen3GuardStream, folder: str | Path, max_shard_size: int | None = None) -> Path:
    """Write `config.json` plus safetensors under the public checkpoint's names, split into
    shards with an index when `max_shard_size` (bytes) is given: the layout `load_stream_model`
    reads, so a converted or fine-tuned model round-trips."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    raw = guard.config.to_dict()
    raw["architectures"] = ["Qwen3ForGuardModel"]
    (folder / "config.json").write_text(json.dumps(raw, indent=2, default=str))
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in guard.state_dict().items()}
    if max_shard_size is None:
        save_file(state, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return folder
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder


def tiny_stream_config(vocab_size: int, **overrides: Any) -> Qwen3Config:
    """A 2-layer shape for tests and CPU benchmarks with the real head sizes."""
    from soda_guard.testing import tiny_qwen3_config

    values: dict[str, Any] = dict(guard_inner_size=32, num_risk_level=len(RISK_LEVELS), num_category=len(RESPONSE_CATEGORIES),
                                  num_query_risk_level=len(RISK_LEVELS), num_query_category=len(QUERY_CATEGORIES))
    values.update(overrides)
    config = tiny_qwen3_config(vocab_size, **values)
    config._attn_implementation = "sdpa"
    return config


def make_tiny_stream_guard(path: str | Path, *, tokenizer_dir: str | Path | None = None, seed: int = 0,
                           max_shard_size: int | None = None, **config: Any) -> Path:
    """Save a random Qwen3Guard-Stream (real weight names) plus tokenizer into `path`: its
    verdicts mean nothing, the loading and streaming path it exercises is the real one."""
    from soda_guard.testing import load_test_tokenizer

    tokenizer = load_test_tokenizer(tokenizer_dir)
    torch.manual_seed(seed)
    guard = Qwen3GuardStream(tiny_stream_config(len(tokenizer), **config))
    save_stream_checkpoint(guard, path, max_shard_size)
    tokenizer.save_pretrained(path)
    return Path(path)
