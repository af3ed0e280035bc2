"""Where a judge's weights come from, answered without torch: a missing folder or a missing
extra is reported in a second, before the libraries that take seconds to import are loaded."""

from __future__ import annotations

import os
from pathlib import Path

from soda_guard.errors import ModelLoadError


def looks_like_path(model: str) -> bool:
    return model.startswith((".", "/", "~")) or os.sep in model.strip("/").replace("/", "", 1) or Path(model).exists()


def load_error(model: str, cause: BaseException | str) -> ModelLoadError:
    """A library missing from the install is named as such: advising a weights download for it
    (as a missing `accelerate` once was) sends the user the wrong way."""
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if isinstance(cause, ImportError):
        return ModelLoadError(
            f"cannot load judge model {model!r}: a library it needs is missing ({detail}); "
            "reinstall with the local extra: pip install 'soda-guard[local]'"
        )
    return ModelLoadError(
        f"cannot load judge model {model!r} ({detail}). Download the weights where the network "
        f"allows it (e.g. `hf download {model if not looks_like_path(model) else 'ORG/NAME'}"
        " --local-dir DIR`) and point at the folder instead: --model DIR, or `model: DIR` in the policy."
    )


def check_local_folder(model: str) -> None:
    path = Path(model).expanduser()
    if looks_like_path(model) and not (path.is_dir() and (path / "config.json").is_file()):
        reason = "no such folder" if not path.exists() else "folder has no config.json"
        raise load_error(model, FileNotFoundError(reason))
