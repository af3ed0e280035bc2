"""Choosing which of several judge servers gets the next request.

A conversation goes back to the server that judged it last, because every later judgment of
that conversation repeats its prefix and only that server holds the prefix in its KV cache. A
new conversation (or one without a key) goes to the server with the fewest requests in flight.
A server that failed is passed over for a cool-down, not removed: it is tried again afterwards,
and when every server is cooling down the one that comes back first is still tried rather than
failing a judgment without sending it anywhere. A server holding `max_outstanding` requests is
not chosen while another that is up has room, even for a conversation stuck to it: a hanging
one fills its own share and the others keep theirs.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence


@dataclass
class Server:
    base_url: str
    outstanding: int = 0
    down_until: float = 0.0
    failures: int = 0

    def available(self, now: float) -> bool:
        return self.down_until <= now


class ServerPool:
    """Thread-safe: the backend's worker threads choose, check out and report on servers at once."""

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        cooldown_s: float = 5.0,
        max_sticky: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
        max_outstanding: int | None = None,
    ) -> None:
        if not base_urls:
            raise ValueError("at least one base_url is required")
        self.servers = [Server(url.rstrip("/")) for url in base_urls]
        self.cooldown_s = cooldown_s
        self._sticky: OrderedDict[str, Server] = OrderedDict()
        self._max_sticky = max_sticky
        self._clock = clock
        self.max_outstanding = max_outstanding
        self._turn = 0
        self._lock = threading.RLock()

    def forget_outstanding(self) -> None:
        """A forked child's requests in flight are none of its parent's."""
        self._lock = threading.RLock()
        for server in self.servers:
            server.outstanding = 0

    def checkout(self, cache_key: str | None, avoid: Server | None = None) -> Server:
        """`choose` and count the request as in flight on the chosen server, in one step, so two
        threads choosing at once see each other's load."""
        with self._lock:
            server = self.choose(cache_key, avoid)
            server.outstanding += 1
            return server

    def checkin(self, server: Server) -> None:
        with self._lock:
            server.outstanding -= 1

    def choose(self, cache_key: str | None, avoid: Server | None = None) -> Server:
        """`avoid` is the server that just failed this same judgment: a retry goes elsewhere
        when anywhere else is available."""
        with self._lock:
            return self._choose(cache_key, avoid)

    def _choose(self, cache_key: str | None, avoid: Server | None) -> Server:
        now = self._clock()
        cap = self.max_outstanding
        up = [s for s in self.servers if s.available(now)] or [min(self.servers, key=lambda s: s.down_until)]
        room = [s for s in up if cap is None or s.outstanding < cap] or up
        candidates = [s for s in room if s is not avoid] or room
        if cache_key is not None:
            sticky = self._sticky.get(cache_key)
            if sticky is not None and sticky in candidates:
                self._sticky.move_to_end(cache_key)
                return sticky
        # ties rotate, so conversations that arrive one at a time still spread over the servers
        self._turn += 1
        count = len(self.servers)
        chosen = min(candidates, key=lambda s: (s.outstanding, (self.servers.index(s) - self._turn) % count))
        if cache_key is not None:
            self._sticky[cache_key] = chosen
            self._sticky.move_to_end(cache_key)
            while len(self._sticky) > self._max_sticky:
                self._sticky.popitem(last=False)
        return chosen

    def failed(self, server: Server) -> None:
        with self._lock:
            server.failures += 1
            server.down_until = self._clock() + self.cooldown_s

    def succeeded(self, server: Server) -> None:
        with self._lock:
            server.failures = 0
            server.down_until = 0.0
