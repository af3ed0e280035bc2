"""Errors a user can catch by kind: each says what was wrong and where."""

from __future__ import annotations


class SodaGuardError(Exception):
    """Base class of every error this package raises on purpose."""


class TrajectoryError(SodaGuardError, ValueError):
    """Input that cannot be turned into a Trajectory; names the message index and the problem."""

    def __init__(self, index: int | None, problem: str) -> None:
        self.index = index
        self.problem = problem
        where = f"message {index}" if index is not None else "input"
        super().__init__(f"{where}: {problem}")


class PolicyError(SodaGuardError, ValueError):
    """A policy file or object that does not validate; the message names the offending key."""


class ModelLoadError(SodaGuardError):
    """A judge model that could not be loaded (absent, no network, wrong folder)."""


class JudgeError(SodaGuardError):
    """A judge that failed to produce a verdict (crash, timeout, unusable output)."""


class AuditError(SodaGuardError):
    """An audit sink that could not record decisions: its lock was held past the check's
    deadline, the disk is full, the database is locked. Names the sink and the cause."""


class MissingExtraError(ModelLoadError, ImportError):
    """A feature whose libraries come with an optional install (`soda-guard[local]`,
    `soda-guard[eval]`) that this environment lacks; the message names the extra. A
    ModelLoadError, so a guard whose local judge cannot import torch ends in `on_error` and the
    command line prints one line, like any judge that cannot load."""
