"""Identifiers for the guard's records, made without a system call.

`uuid.uuid4()` reads `os.urandom`, which releases the GIL for the `getrandom` call: on a busy
agent (LangGraph saves checkpoints on a background thread) getting it back can wait for a whole
switch interval, milliseconds per decision. A decision id needs to be unique, not secret, so it
is a random per-process prefix and a counter; the prefix is drawn again in a forked child.
Anything that must not be guessed (a prompt's sentinel, a review question's nonce) keeps
`uuid4`.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import uuid

_prefix = secrets.token_hex(8)
_count = itertools.count()
_random = random.Random(secrets.randbits(128))


def _after_fork() -> None:
    global _prefix, _count
    _prefix = secrets.token_hex(8)
    _count = itertools.count()
    _random.seed(secrets.randbits(128))


os.register_at_fork(after_in_child=_after_fork)


def new_id() -> str:
    """32 hex characters, unique per process and across processes."""
    return f"{_prefix}{next(_count):016x}"


def new_run_id() -> uuid.UUID:
    """A version-4 UUID for a LangChain run, drawn from a per-process generator."""
    return uuid.UUID(int=_random.getrandbits(128), version=4)
