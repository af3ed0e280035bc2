"""A judge without a model: regexes over what the agent is about to do.

Meant as a cascade's first stage, where a pattern that is certain (a tool that must never run,
a read-only tool) settles the call for nothing and everything else goes on to a model judge.
"""

from __future__ import annotations

import json
import time
from typing import Sequence

import regex

from soda_guard.converters import scalars
from soda_guard.judges.base import JSON_TEXT
from soda_guard.offload import off_loop
from soda_guard.patterns import compile_pattern, found
from soda_guard.policy import KeywordsConfig
from soda_guard.trajectory import AssistantStep, SystemStep, ToolStep, Trajectory, UserStep
from soda_guard.verdict import Label, Verdict


AT_ONCE_MAX_CHARS = 16384
"""The most text a screen reads on the event loop; more goes to a worker thread."""

AT_ONCE_MAX_S = 0.005
r"""The longest a screen runs on the event loop: a pattern that backtracks on what the agent
sent (`curl\s.*\s\|`) is stopped there and screened again on a worker thread."""


class KeywordsRunner:
    """Answers score 1 (unsafe) on an `unsafe` pattern, 0 (safe) where every call screened
    matches a `safe` one and no unsafe one matches, 0.5 (controversial) otherwise.

    A safe answer is about what will run: each call is screened on its own (name, then JSON
    arguments), so a read-only call beside a transfer settles nothing, and a message's text,
    which the attacker writes, never makes a call safe (`match: all` widens what the `unsafe`
    patterns read, not the `safe` ones). Without a call, nothing is safe."""

    kind = "keywords"
    model_id = "keywords"
    inline = True

    def __init__(self, name: str, config: KeywordsConfig) -> None:
        self.name = name
        self.config = config
        self._unsafe = [compile_pattern(pattern) for pattern in config.unsafe]
        self._safe = [compile_pattern(pattern) for pattern in config.safe]

    def texts(self, trajectory: Trajectory) -> tuple[list[str], list[str], bool]:
        """(what the `unsafe` patterns read, each call's own text for the `safe` ones, whether
        the conversation came cut). The `unsafe` ones also read the arguments' text as the tool
        gets it: in JSON a tab is `\\t`, which `rm\\s+-rf` does not match."""
        calls = trajectory.pending_tool_calls() or [
            call for step in trajectory.steps if isinstance(step, AssistantStep) for call in step.tool_calls
        ]
        encoded = [(call, call.args if isinstance(call.args, str) else JSON_TEXT.encode(call.args)) for call in calls]
        own = [f"{call.name} {text}" for call, text in encoded]
        if self.config.match == "all":
            read = ["\n".join(_step_text(step) for step in trajectory.steps)]
            shown = [call for step in trajectory.steps if isinstance(step, AssistantStep) for call in step.tool_calls]
            encoded = [(call, call.args if isinstance(call.args, str) else JSON_TEXT.encode(call.args)) for call in shown]
        else:
            read = list(own)
        read += ["\n".join(_strings(_as_read(call.args))) for call, text in encoded if "\\" in text]
        return read, own, trajectory.truncated

    def verdict(self, trajectory: Trajectory, deadline: float | None = None) -> Verdict:
        """Raises TimeoutError where the patterns are still searching at `deadline`
        (`time.monotonic`): the guard's `on_error` then decides, as for any judge."""
        start = time.perf_counter()
        return self._verdict(self.texts(trajectory), start, deadline)

    def _verdict(self, texts: tuple[list[str], list[str], bool], start: float, deadline: float | None) -> Verdict:
        read, calls, truncated = texts

        def within(pattern: regex.Pattern[str], text: str) -> bool:
            return found(pattern, text, None if deadline is None else max(0.0, deadline - time.monotonic()))

        hit = next((pattern.pattern for pattern in self._unsafe for text in read if within(pattern, text)), None)
        if hit is not None:
            label, score, reason = Label.UNSAFE, 1.0, f"matches unsafe pattern {hit!r}"
        else:
            hits = [next((pattern.pattern for pattern in self._safe if within(pattern, text)), None) for text in calls]
            matched = list(dict.fromkeys(hit for hit in hits if hit is not None))
            if calls and None not in hits:
                label, score, reason = Label.SAFE, 0.0, f"matches safe pattern {' / '.join(matched)!r}"
            else:
                label, score, reason = Label.CONTROVERSIAL, 0.5, "not every call matches a safe pattern" if matched else "no pattern matches"
        return Verdict(
            label=label,
            score=score,
            reason=reason,
            judge=self.name,
            kind=self.kind,
            model=self.model_id,
            latency_ms=(time.perf_counter() - start) * 1000.0,
            truncated=truncated,  # a cut conversation's verdict says so, whoever judged it
        )

    def verdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]:
        return [self.verdict(trajectory, deadline) for trajectory in trajectories]

    def at_once(self, trajectories: Sequence[Trajectory]) -> bool:
        """Whether `verdicts` is a small job: a `calls` screen over a few KB of calls, which
        the async path then runs in the caller's task (a cascade's screen too) rather than
        paying a thread hop for microseconds of regex. `match: all` reads every message."""
        return self._texts_at_once(trajectories) is not None

    def _texts_at_once(self, trajectories: Sequence[Trajectory]) -> list[tuple[list[str], list[str], bool]] | None:
        """The texts a small job screens (`at_once`), read once; None where it is not one."""
        if self.config.match == "all":
            return None
        texts, left = [], AT_ONCE_MAX_CHARS
        for trajectory in trajectories:
            texts.append(self.texts(trajectory))
            left -= sum(map(len, texts[-1][0]))
            if left < 0:
                return None
        return texts

    async def averdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]:
        texts = self._texts_at_once(trajectories)
        if texts is not None:
            on_loop = time.monotonic() + AT_ONCE_MAX_S
            try:
                return [self._verdict(text, time.perf_counter(), on_loop if deadline is None else min(deadline, on_loop)) for text in texts]
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
        return await off_loop(self.verdicts, trajectories, deadline)

    def warm(self) -> None:
        """Nothing to load."""


def _step_text(step: SystemStep | UserStep | AssistantStep | ToolStep) -> str:
    if isinstance(step, AssistantStep):
        calls = " ".join(f"{call.name} {JSON_TEXT.encode(call.args)}" for call in step.tool_calls)
        return f"{step.content} {calls}".strip()
    return step.content or ""


def _as_read(args: object) -> object:
    """Arguments kept as raw text (JSON repeating a key, or not an object) as a tool's JSON
    parser reads them, every value of a repeated key kept (parsers differ on which one wins);
    text that is not JSON has no escapes to read."""
    if not isinstance(args, str):
        return args
    try:
        return json.loads(args, object_pairs_hook=lambda pairs: [part for pair in pairs for part in pair])
    except (ValueError, RecursionError):
        return None


def _strings(value: object) -> list[str]:
    """The keys and strings inside a call's arguments, as the tool reads them."""
    return [item for item in scalars(value, keys=True) if isinstance(item, str)]
