"""The policy's regular expressions, run on what the agent sends (a keywords screen's
`unsafe`/`safe`, a rule's `args: {regex: ...}`).

`re`'s syntax (`regex.V0`) on the `regex` engine, whose searches take a timeout and let go of
the GIL: the pattern is the policy's, the text the agent's, and a search that backtracks on it
must neither outlive the check's deadline nor stop every other thread. Validated with the very
engine that runs it.
"""

from __future__ import annotations

import regex


def compile_pattern(pattern: str) -> regex.Pattern[str]:
    return regex.compile(pattern, flags=regex.V0)


def checked_pattern(pattern: str) -> str:
    """`pattern` as a policy declares it, or a ValueError naming it (a pydantic validator's)."""
    try:
        compile_pattern(pattern)
    except regex.error as error:
        raise ValueError(f"invalid regex {pattern!r}: {error}") from None
    return pattern


def found(pattern: regex.Pattern[str], text: str, timeout_s: float | None) -> bool:
    """Whether `pattern` occurs in `text`; raises TimeoutError past `timeout_s` seconds."""
    return pattern.search(text, timeout=timeout_s, concurrent=True) is not None
