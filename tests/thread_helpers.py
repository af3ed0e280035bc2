"""Threads run at once, switching often: for tests of state that threads share."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable


def run_interleaved(targets: list[Callable[[], None]], switch_interval: float = 1e-5) -> None:
    """Run each target on a thread of its own, all at once, the interpreter switching between
    them every `switch_interval` seconds instead of every 5 ms, so that a race between a check
    and what it guards has many chances to show; then wait for all of them."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(switch_interval)
    try:
        threads = [threading.Thread(target=target) for target in targets]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
