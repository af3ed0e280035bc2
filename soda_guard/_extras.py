"""Which optional install brings which library: the base install (policy, guard, integrations,
HTTP backend) runs without torch, transformers and matplotlib, and a feature that needs them says
which extra to install instead of ending in a bare ModuleNotFoundError."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from soda_guard.errors import MissingExtraError

EXTRA_OF = {
    "torch": "local",
    "transformers": "local",
    "safetensors": "local",
    "huggingface_hub": "local",
    "tokenizers": "local",
    "matplotlib": "eval",
    "numpy": "eval",
    "fastapi": "testing",
    "uvicorn": "testing",
}


@contextmanager
def needs_extra(feature: str) -> Iterator[None]:
    """Turns the import of an optional library inside the block into a MissingExtraError naming
    the extra; any other ModuleNotFoundError (a real bug) passes through unchanged."""
    try:
        yield
    except ModuleNotFoundError as error:
        library = (error.name or "").partition(".")[0]
        extra = EXTRA_OF.get(library)
        if extra is None:
            raise
        raise MissingExtraError(
            f"{feature} needs {library}, which is not installed: pip install 'soda-guard[{extra}]'"
        ) from None
