"""SHA-256 and HMAC-SHA256 that never give up the GIL.

CPython's hashlib releases the GIL while it hashes 2 KiB or more at once, and its one-shot
`hmac.digest` always does. On an agent whose framework saves checkpoints on a background
thread, a thread that lets go of the GIL waits up to a switch interval (5 ms) to get it back:
more than the hashing costs by orders of magnitude. Fed in pieces under that size, the same
hashes keep the GIL for the few microseconds they take.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

_PIECE = 2047
"""Below hashlib's `HASHLIB_GIL_MINSIZE` (2048): an update this small keeps the GIL."""


def _fed(hasher: Any, data: bytes) -> Any:
    for start in range(0, len(data), _PIECE):
        hasher.update(data[start : start + _PIECE])
    return hasher


def sha256_hex(data: bytes) -> str:
    return _fed(hashlib.sha256(), data).hexdigest()


class Hmac:
    """HMAC-SHA256 under one key: the keyed state is set up once and copied per message."""

    def __init__(self, key: bytes) -> None:
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def hex(self, data: bytes) -> str:
        return _fed(self._keyed.copy(), data).hexdigest()
