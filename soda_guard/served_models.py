"""What an OpenAI-compatible judge server says it serves (`GET /models`), so a policy whose
`model:` names something else is told both names instead of a bare refusal. `transformers
serve`, for one, names a model by the absolute path of its folder."""

from __future__ import annotations

import json
import time
from typing import Any

from soda_guard.backends.deadline_http import DeadlineClient

MAX_LISTING_BYTES = 1 << 20
"""The most of a model listing read: a server that never ends one must not fill memory."""


class ServedModelsError(Exception):
    """The server could not be asked or gave no usable model list; the message says why."""


def served_models(base_url: str, *, headers: dict[str, str] | None = None, timeout_s: float = 5.0) -> list[str]:
    """The whole exchange ends by `timeout_s` (a server trickling its reply a byte at a time
    held it for as long as it liked), and reads at most `MAX_LISTING_BYTES`."""
    url = f"{base_url.rstrip('/')}/models"
    client = DeadlineClient(max_connections=1, max_body_bytes=MAX_LISTING_BYTES, headers=headers)
    try:
        reply = client.get(url, until=time.monotonic() + timeout_s)
    except Exception as error:  # noqa: BLE001 - whatever failed, the message names it
        raise ServedModelsError(f"{url}: {type(error).__name__}: {error or 'no answer'}") from error
    finally:
        client.close()
    return model_ids(url, reply.status, reply.body)


def model_ids(url: str, status: int, body: bytes) -> list[str]:
    """The ids in a `GET /models` reply (`status`, `body`), or why there are none."""
    text = body.decode("utf-8", errors="replace")
    if status != 200:
        raise ServedModelsError(f"{url}: HTTP {status}: {text[:200]}")
    try:
        data: Any = json.loads(body)
        return [str(entry["id"]) for entry in data["data"]]
    except (ValueError, KeyError, TypeError) as error:
        raise ServedModelsError(f"{url}: not a model list: {text[:200]!r}") from error


def mismatch(model: str, served: list[str]) -> str | None:
    """The sentence naming both names, or None when the server does serve `model`."""
    if model in served:
        return None
    return f"the policy's model {model!r} is not served there; it serves {served}: set `model:` to one of them"
