"""Loading a judge the ordinary way (`from_pretrained` of a hub id or a folder), with an error a
user can act on instead of a traceback when the weights are not there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from soda_guard.errors import ModelLoadError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16") from None


def _looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1) or Path(model).exists()


def load_error(model: str, cause: BaseException) -> ModelLoadError:
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return ModelLoadError(
        f"cannot load judge model {model!r} ({detail}). Download the weights where the network "
        f"allows it (e.g. `huggingface-cli download {model if not _looks_like_path(model) else 'ORG/NAME'}"
        " --local-dir DIR`) and point at the folder instead: --model DIR, or `model: DIR` in the policy."
    )


def check_local_folder(model: str) -> None:
    path = Path(model).expanduser()
    if _looks_like_path(model) and not (path.is_dir() and (path / "config.json").is_file()):
        reason = "no such folder" if not path.exists() else "folder has no config.json"
        raise load_error(model, FileNotFoundError(reason))


def load_tokenizer(model: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    check_local_folder(model)
    try:
        return AutoTokenizer.from_pretrained(str(Path(model).expanduser()) if _looks_like_path(model) else model, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise load_error(model, error) from error


def load_causal_lm(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    check_local_folder(model)
    source = str(Path(model).expanduser()) if _looks_like_path(model) else model
    try:
        # straight onto the device in the final dtype: no float32 copy in host memory first, and
        # no second copy to the GPU (seconds for a 4B model, all of them before the first judgment)
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device)
    except (OSError, ValueError, ImportError) as error:
        raise load_error(model, error) from error
    return loaded.eval()
