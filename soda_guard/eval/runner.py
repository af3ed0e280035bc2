"""Judging a labeled dataset exactly as the guard would, but batched.

The guard decides one trajectory at a time; an evaluation wants one backend call per batch of
records. Each batch therefore runs the real `Guard` twice over a replay backend: the first pass
only records which requests the guard would send (so rules, routing to judges and parallel-call
splitting stay the guard's own), those requests go to the real backend in one call per judge,
and the second pass replays the answers so the guard turns them into its own decisions. The
numbers are then what `Guard.check` / `Guard.check_tool_calls` would have produced.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from soda_guard.backends.base import Backend, GenerationRequest, GenerationResult
from soda_guard.errors import JudgeError
from soda_guard.eval.dataset import Dataset, EvalRecord
from soda_guard.eval.metrics import BLOCKING_ACTIONS, first_step, judge_prediction
from soda_guard.eval.results import EvalError, ResultsWriter
from soda_guard.guard import Guard, close_each
from soda_guard.judging import JudgeRunner, make_backend, make_judge
from soda_guard.policy import AuditConfig, CascadeConfig, JudgeConfig, Policy
from soda_guard.trajectory import AssistantStep, Trajectory
from soda_guard.verdict import Decision, Verdict

MODES = ("whole", "per-step")


def _key(request: GenerationRequest) -> str:
    return json.dumps([request.messages, request.max_new_tokens], ensure_ascii=False)


class _Replay:
    """Stands in for a judge's backend inside the guard: remembers what it is asked, answers
    what the real backend has already answered for the current batch."""

    def __init__(self, config: JudgeConfig) -> None:
        self.config = config
        self.real: Backend | None = None
        self.asked: dict[str, GenerationRequest] = {}
        self.answers: dict[str, GenerationResult | Exception] = {}
        self.batch_ms: float | None = None
        """Wall time of this batch's backend call: what each of its judgments waited."""
        self.batch_requests = 0

    @property
    def amortised_ms(self) -> float | None:
        """The batch's time shared by its judgments: what one judgment costs this judge, the
        measure a cascade saves on (a record it settles early never reaches the later stages)."""
        return self.batch_ms / self.batch_requests if self.batch_ms is not None and self.batch_requests else None

    @property
    def model_id(self) -> str:
        return self.real.model_id if self.real is not None else self.config.model

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for request in requests:
            key = _key(request)
            answer = self.answers.get(key)
            if answer is None:
                self.asked.setdefault(key, request)
                results.append(GenerationResult(text=""))
            elif isinstance(answer, Exception):
                raise answer
            else:
                results.append(answer)
        return results

    async def agenerate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        return self.generate(requests)


def _size(results: object) -> str:
    return str(len(results)) if isinstance(results, list) else type(results).__name__


def step_views(trajectory: Trajectory) -> list[Trajectory]:
    """What the guard sees before each tool call at run time: the trajectory cut right after
    each assistant step that asks for tools."""
    return [
        trajectory.model_copy(update={"steps": trajectory.steps[: index + 1]})
        for index, step in enumerate(trajectory.steps)
        if isinstance(step, AssistantStep) and step.tool_calls
    ]


@dataclass
class EvalRun:
    """What `run_eval` did: the results of every record of the dataset (resumed ones included)
    and how many it judged itself."""

    results: list[dict[str, Any]]
    judged_now: int
    resumed: int
    wall_s: float
    settings: dict[str, Any] = field(default_factory=dict)


def _judgment(decision: Decision, step: int | None, latency_ms: float | None, replays: Mapping[str, _Replay]) -> dict[str, Any]:
    verdict = decision.verdict
    judgment = {
        "step": step,
        "tool": decision.tool_call.name if decision.tool_call else None,
        "action": decision.action.value,
        "rule": decision.rule,
        "judged": verdict is not None,
        "label": verdict.label.value if verdict is not None and verdict.label is not None else None,
        "score": verdict.score if verdict is not None else None,
        "parse_failure": bool(verdict is not None and verdict.parse_failure),
        "error": verdict.error if verdict is not None and not verdict.parse_failure else None,
        "latency_ms": latency_ms if verdict is not None else None,
        "prompt_tokens": verdict.prompt_tokens if verdict is not None else None,
        "generated_tokens": verdict.generated_tokens if verdict is not None else None,
        "raw_output": verdict.raw_output if verdict is not None else None,
    }
    if verdict is not None and verdict.stages:
        judgment["stage"] = decision.stage
        judgment["stages"] = [_stage(stage, replays) for stage in verdict.stages]
    return judgment


def _stage(verdict: Verdict, replays: Mapping[str, _Replay]) -> dict[str, Any]:
    """One cascade stage's answer; its latency is its judge's amortised batch time (a model
    stage) or its own (a keyword screen, which runs in the guard)."""
    replay = replays.get(verdict.judge)
    latency = replay.amortised_ms if replay is not None and replay.real is not None else verdict.latency_ms
    return {
        "judge": verdict.judge,
        "kind": verdict.kind,
        "label": verdict.label.value if verdict.label is not None else None,
        "score": verdict.score,
        "failed": verdict.failed,
        "latency_ms": latency,
    }


def _record_result(record: EvalRecord, mode: str, judgments: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    scores = [j["score"] for j in judgments if j["score"] is not None]
    first_blocked = first_step(judgments, blocked=True)
    return {
        "id": record.id,
        "source": record.source,
        "label": record.label,
        "mode": mode,
        "prediction": judge_prediction(judgments),
        "score": max(scores) if scores else None,
        "blocked": any(j["action"] in BLOCKING_ACTIONS for j in judgments),
        "first_blocked_step": first_blocked,
        "first_flagged_step": first_step(judgments, blocked=False),
        "tool_call_steps": steps,
        "judgments": judgments,
    }


class _Evaluator:
    def __init__(self, policy: Policy, mode: str, backends: Mapping[str, Backend]) -> None:
        self.policy = policy
        self.replays = {name: _Replay(config) for name, config in policy.judges.items() if isinstance(config, JudgeConfig)}
        self.overrides = dict(backends)
        self.guard = Guard(policy, backends=self.replays)  # type: ignore[arg-type]
        alone = last_stage_policy(policy)
        # a cascade is measured against its last judge alone, on the same records and answers
        self.alone = Guard(alone, backends=self.replays) if alone is not None else None  # type: ignore[arg-type]
        self.mode = mode
        self._made: list[Backend] = []

    def load(self) -> None:
        """Every judge the policy reaches gets its real backend now, and the ones made here a
        warm-up judgment, as `Guard.load` does: a judge that cannot load fails the run before
        any result is written, and the first batch's latency is not the model's load. Backends
        passed in are the caller's, already loaded."""
        for name in self.policy.judges_in_use():
            replay = self.replays.get(name)
            if replay is None:  # a cascade or a keyword screen: no model of its own
                continue
            if name in self.overrides:
                replay.real = self.overrides[name]
                continue
            replay.real = make_backend(replay.config)
            self._made.append(replay.real)
            JudgeRunner(make_judge(name, replay.config, self.policy), replay.real, max_new_tokens=replay.config.max_new_tokens).warm()

    def _decide(self, trajectory: Trajectory, guard: Guard | None = None) -> list[list[Decision]]:
        guard = guard or self.guard
        if self.mode == "whole":
            return [[guard.check(trajectory)]]
        return [guard.check_tool_calls(view) for view in step_views(trajectory)]

    def _judgments(self, per_step: list[list[Decision]]) -> list[dict[str, Any]]:
        return [
            _judgment(decision, None if self.mode == "whole" else number, self._latency(decision), self.replays)
            for number, decisions in enumerate(per_step, start=1)
            for decision in decisions
        ]

    def _ask_backends(self) -> None:
        for name, replay in self.replays.items():
            if not replay.asked:
                continue
            if replay.real is None:
                raise EvalError(f"judge {name!r} was asked before it was loaded")
            requests = list(replay.asked.values())
            start = time.perf_counter()
            results: list[GenerationResult] | list[Exception]
            try:
                results = replay.real.generate(requests)
                if not isinstance(results, list) or len(results) != len(requests):
                    raise JudgeError(f"backend returned {_size(results)} results for {len(requests)} requests")
            except Exception as error:  # the guard turns it into each judgment's on_error
                results = [error] * len(requests)
            latency_ms = (time.perf_counter() - start) * 1000.0
            replay.answers.update(zip(replay.asked, results))
            replay.batch_ms = latency_ms
            replay.batch_requests = len(requests)
            replay.asked.clear()

    def batch(self, records: Sequence[EvalRecord]) -> list[dict[str, Any]]:
        for replay in self.replays.values():
            replay.answers.clear()
            replay.asked.clear()
            replay.batch_ms = None
            replay.batch_requests = 0
        for record in records:
            self._decide(record.trajectory)
            if self.alone is not None:
                self._decide(record.trajectory, self.alone)
        self._ask_backends()
        results = []
        for record in records:
            steps = len(step_views(record.trajectory))
            result = _record_result(record, self.mode, self._judgments(self._decide(record.trajectory)), steps)
            if self.alone is not None:
                alone = _record_result(record, self.mode, self._judgments(self._decide(record.trajectory, self.alone)), steps)
                result["last_judge_alone"] = {key: alone[key] for key in ("prediction", "score", "blocked")}
            results.append(result)
        return results

    def _latency(self, decision: Decision) -> float | None:
        replay = self.replays.get(decision.verdict.judge) if decision.verdict is not None else None
        return replay.batch_ms if replay is not None else None

    def close(self) -> None:
        """The backends made here stop too (see `Guard.close`); the caller's stay open."""
        self.guard.close()
        if self.alone is not None:
            self.alone.close()
        close_each(self._made)


def last_stage_policy(policy: Policy) -> Policy | None:
    """The policy with every cascade replaced by its last stage (None when it has none): what
    the cascade is measured against."""
    last = {name: config.stages[-1] for name, config in policy.judges.items() if isinstance(config, CascadeConfig)}
    if not last:
        return None
    data = policy.model_dump(mode="python", exclude_unset=True, by_alias=True)
    data["defaults"] = {**data.get("defaults", {}), "judge": last.get(policy.defaults.judge or "", policy.defaults.judge)}
    for rule in data.get("rules", []):
        if rule.get("judge") in last:
            rule["judge"] = last[rule["judge"]]
    if data.get("tool_results") and data["tool_results"]["judge"] in last:
        data["tool_results"]["judge"] = last[data["tool_results"]["judge"]]
    return Policy.model_validate(data)


def _chunks(records: Sequence[EvalRecord], size: int) -> Iterator[list[EvalRecord]]:
    for start in range(0, len(records), size):
        yield list(records[start : start + size])


def run_eval(
    dataset: Dataset,
    policy: Policy,
    out: Path,
    *,
    mode: str = "whole",
    batch_size: int = 8,
    resume: bool = False,
    backends: Mapping[str, Backend] | None = None,
    settings: Mapping[str, Any] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalRun:
    """Judge every record not already in `out`/results.jsonl, appending each batch's results as
    it finishes. `backends` replaces the backend of the named judges (tests, a shared server).
    `on_progress(done, total)` is called once up front and after each batch."""
    if mode not in MODES:
        raise EvalError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if batch_size < 1:
        raise EvalError("batch size must be at least 1")
    policy = policy.model_copy(update={"audit": AuditConfig()})  # never into a production audit log
    run_settings = {"mode": mode, "policy": policy.model_dump(mode="json"), **(settings or {})}
    evaluator = _Evaluator(policy, mode, backends or {})
    try:
        evaluator.load()
    except BaseException:
        evaluator.close()
        raise
    writer = ResultsWriter(out, run_settings, resume=resume)
    start = time.perf_counter()
    wanted = {record.id for record in dataset.records}
    done = writer.done_ids & wanted
    todo = [record for record in dataset.records if record.id not in done]
    judged = 0
    try:
        if on_progress:
            on_progress(len(done), len(wanted))
        for chunk in _chunks(todo, batch_size):
            writer.write(evaluator.batch(chunk))
            judged += len(chunk)
            if on_progress:
                on_progress(len(done) + judged, len(wanted))
    finally:
        writer.close()
        evaluator.close()
    by_id = {result["id"]: result for result in writer.done}
    ordered = [by_id[record.id] for record in dataset.records if record.id in by_id]
    return EvalRun(ordered, judged, len(done), time.perf_counter() - start, run_settings)
