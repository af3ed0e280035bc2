"""Loading a judge the ordinary way (`from_pretrained` of a hub id or a folder), with an error a
user can act on instead of a traceback when the weights are not there."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import torch

from soda_guard.errors import ModelLoadError
from soda_guard.model_source import check_local_folder, load_error, looks_like_path


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


HUB_PROBE_TIMEOUT_S = 3.0
HUB_UNREACHABLE = "the hub cannot be reached and the model is not in the local cache"


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One bounded request to the hub's endpoint. Without it a machine with no network spends
    over a minute in the hub client's retries (a dozen warning lines) before the same error;
    with it, a hub id that is not cached fails in seconds. Any HTTP answer counts as reachable;
    the thread bounds a name lookup that hangs, which httpx's timeout does not cover."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    answered = threading.Event()

    def probe() -> None:
        try:
            httpx.head(constants.ENDPOINT, timeout=timeout_s)
        except httpx.HTTPError:
            return
        answered.set()

    threading.Thread(target=probe, name="soda-guard-hub-probe", daemon=True).start()
    return answered.wait(timeout_s + 0.5)


def _source(model: str) -> tuple[str, dict[str, Any]]:
    """Where `from_pretrained` reads the model, and whether it may use the network: a folder as
    is; a hub id from the local cache only when the hub cannot be reached."""
    if looks_like_path(model):
        return str(Path(model).expanduser()), {}
    return model, ({} if hub_reachable() else {"local_files_only": True})


def load_tokenizer(model: str, **kwargs: Any) -> Any:
    from transformers import AutoTokenizer

    check_local_folder(model)
    source, hub = _source(model)
    try:
        return AutoTokenizer.from_pretrained(source, **hub, **kwargs)
    except (OSError, ValueError, ImportError) as error:
        raise load_error(model, HUB_UNREACHABLE if hub else error) from error


def load_causal_lm(model: str, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    check_local_folder(model)
    source, hub = _source(model)
    try:
        # straight onto the device in the final dtype: no float32 copy in host memory first, and
        # no second copy to the GPU (seconds for a 4B model, all of them before the first judgment).
        # No hub kernels (on by default from transformers 5.25): they replace layers with code
        # fetched at run time, which the engine's own Qwen3 step neither runs nor may download.
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map=device, use_kernels=False, **hub)
    except (OSError, ValueError, ImportError) as error:
        raise load_error(model, HUB_UNREACHABLE if hub else error) from error
    return loaded.eval()
