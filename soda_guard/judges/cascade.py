"""A judge cascade: cheap judges first, the expensive one only for what they cannot settle.

A stage settles a call when its score is confidently on one side (below `settle_below`, above
`settle_above`); anything else passes the call on: a score in between, a label without a
score, and every kind of failure (an exception, a timeout, the wrong number of answers, an
unparsable answer). The last stage always decides, and when it fails the cascade's verdict is
a failed one, so the policy's `on_error` applies: a failing stage can never turn into an allow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from soda_guard.errors import JudgeError, ModelLoadError
from soda_guard.offload import off_loop
from soda_guard.policy import CascadeConfig
from soda_guard.trajectory import Trajectory
from soda_guard.verdict import Label, Verdict


class Runner(Protocol):
    """What the guard asks of a judge: verdicts for a batch of trajectories."""

    @property
    def model_id(self) -> str: ...

    @property
    def inline(self) -> bool:
        """Answers at once on the caller's thread, waiting on nothing (a regex screen, a
        scripted reply): the guard then calls it there instead of handing the call to one of
        its judge threads, a hop that costs more than such a judgment. Any judge that could
        wait (a model, a server) says False and keeps the hop that bounds it by the deadline."""
        ...

    def verdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]: ...

    async def averdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]: ...

    def warm(self) -> None: ...


@dataclass
class Stage:
    """A stage's judge, loaded on first use: a judge that cannot load is a failed stage, and
    the call goes on to the next one."""

    name: str
    kind: str
    model: str
    load: Callable[[str], Runner]
    runner: Runner | None = None
    submit: Callable[[Callable[[], Runner], str], concurrent.futures.Future[Runner]] | None = None
    """Where an async check loads it: the guard's judge threads (`JudgeThreads.submit`)."""

    def get(self) -> Runner:
        if self.runner is None:
            self.runner = self.load(self.name)
        return self.runner

    async def aget(self) -> Runner:
        """Loaded on the guard's threads for this judge: a model load has no bound, and the
        checks waiting for it must hold this judge's share of threads, not the pool every
        check's render and audit write need (they waited past their own deadlines there)."""
        if self.runner is not None:
            return self.runner
        if self.submit is None:
            return await off_loop(self.get)
        return await asyncio.wrap_future(self.submit(self.get, self.name))


class CascadeRunner:
    def __init__(self, name: str, config: CascadeConfig, stages: Sequence[Stage]) -> None:
        self.name = name
        self.config = config
        self.stages = list(stages)
        self.model_id = config.model

    @property
    def inline(self) -> bool:
        return all(stage.runner is not None and getattr(stage.runner, "inline", False) for stage in self.stages)

    def settles(self, verdict: Verdict) -> bool:
        return (
            not verdict.failed
            and verdict.score is not None
            and (verdict.score < self.config.settle_below or verdict.score > self.config.settle_above)
        )

    def settled_label(self, verdict: Verdict) -> Verdict:
        """A score past a bound settles the call as what the bound says (unsafe above
        `settle_above`, safe below `settle_below`), whatever label the stage wrote: a confident
        Qwen3Guard `Controversial` (its score counts Controversial with Unsafe) settled as
        unsafe must be decided as unsafe, not by the policy's `on_controversial`."""
        assert verdict.score is not None
        label = Label.UNSAFE if verdict.score > self.config.settle_above else Label.SAFE
        return verdict if verdict.label is label else verdict.model_copy(update={"label": label})

    def warm(self) -> None:
        """Load every stage (each is a judge of the policy, warmed by the guard on its own)."""
        for stage in self.stages:
            stage.get()

    def verdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]:
        chain = _Chain(self, len(trajectories), deadline)
        for stage in range(len(self.stages)):
            todo = chain.todo(stage)
            if todo:
                chain.take(stage, todo, self._ask(stage, [trajectories[i] for i in todo], deadline))
        return chain.finish()

    async def averdicts(self, trajectories: Sequence[Trajectory], deadline: float | None = None) -> list[Verdict]:
        chain = _Chain(self, len(trajectories), deadline)
        for stage in range(len(self.stages)):
            todo = chain.todo(stage)
            if todo:
                chain.take(stage, todo, await self._aask(stage, [trajectories[i] for i in todo], deadline))
        return chain.finish()

    def _ask(self, stage: int, views: list[Trajectory], deadline: float | None) -> list[Verdict]:
        start = time.perf_counter()
        try:
            return self._checked(stage, self.stages[stage].get().verdicts(views, deadline), len(views), start)
        except Exception as error:
            return [self.failure(stage, _cause(error), start)] * len(views)

    async def _aask(self, stage: int, views: list[Trajectory], deadline: float | None) -> list[Verdict]:
        start = time.perf_counter()
        try:
            runner = await self.stages[stage].aget()
            return self._checked(stage, await runner.averdicts(views, deadline), len(views), start)
        except Exception as error:
            return [self.failure(stage, _cause(error), start)] * len(views)

    def _checked(self, stage: int, results: object, count: int, start: float) -> list[Verdict]:
        if isinstance(results, list) and len(results) == count and all(isinstance(v, Verdict) for v in results):
            return results
        size = len(results) if isinstance(results, list) else type(results).__name__
        return [self.failure(stage, f"judge returned {size} verdicts for {count} calls", start)] * count

    def failure(self, stage: int, error: str, start: float) -> Verdict:
        judge = self.stages[stage]
        model = judge.runner.model_id if judge.runner is not None else judge.model
        latency_ms = (time.perf_counter() - start) * 1000.0
        return Verdict(label=None, judge=judge.name, kind=judge.kind, model=model, latency_ms=latency_ms, error=error)


def _cause(error: Exception) -> str:
    if isinstance(error, ModelLoadError):
        return f"judge could not be loaded: {error}"
    return str(error) if isinstance(error, JudgeError) else f"judge raised {type(error).__name__}: {error}"


class _Chain:
    """Which calls are still open after each stage, and every stage's verdict on each."""

    def __init__(self, cascade: CascadeRunner, count: int, deadline: float | None) -> None:
        self.cascade = cascade
        self.deadline = deadline
        self.asked: list[list[Verdict]] = [[] for _ in range(count)]
        self.settled: list[Verdict | None] = [None] * count

    def todo(self, stage: int) -> list[int]:
        """The calls no earlier stage settled; past the deadline none is asked any more (the
        cascade's verdict on them is then a failure, and the policy's `on_error` applies)."""
        open_ = [i for i, verdict in enumerate(self.settled) if verdict is None]
        if stage > 0 and open_ and self.deadline is not None and time.monotonic() >= self.deadline:
            start = time.perf_counter()
            late = self.cascade.failure(stage, "the deadline passed before this stage was asked", start)
            for i in open_:
                self.asked[i].append(late)
            return []
        return open_

    def take(self, stage: int, todo: list[int], verdicts: list[Verdict]) -> None:
        last = stage == len(self.cascade.stages) - 1
        for i, verdict in zip(todo, verdicts):
            self.asked[i].append(verdict)
            if verdict.failed:
                continue
            if self.cascade.settles(verdict):
                self.settled[i] = self.cascade.settled_label(verdict)
            elif last:
                self.settled[i] = verdict

    def finish(self) -> list[Verdict]:
        out = []
        for asked, settled in zip(self.asked, self.settled):
            latency = sum(verdict.latency_ms for verdict in asked)
            if settled is not None:
                out.append(settled.model_copy(update={"settled_by": settled.judge, "stages": asked, "latency_ms": latency}))
                continue
            causes = "; ".join(f"{v.judge}: {v.error}" for v in asked if v.failed) or "no stage answered"
            out.append(
                Verdict(
                    label=None,
                    judge=self.cascade.name,
                    kind="cascade",
                    model=self.cascade.model_id,
                    latency_ms=latency,
                    error=f"no stage of cascade {self.cascade.name!r} settled the call ({causes})",
                    stages=asked,
                )
            )
        return out
