"""The guard engine: pending tool calls in, one policy `Decision` per call out.

Sync and async paths share all planning and deciding; they differ only in how the judge is
awaited and how its deadline is enforced. A judge that fails, times out or answers garbage ends
in the policy's `on_error` action with the cause recorded: never a silent allow.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import queue
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Callable

from soda_guard.audit import AuditSink, JsonlAuditSink, SqliteAuditSink
from soda_guard.backends.base import Backend
from soda_guard.judges.confusables import build_tables
from soda_guard.judges.cascade import CascadeRunner, Runner, Stage
from soda_guard.judges.keywords import KeywordsRunner
from soda_guard.ids import new_id
from soda_guard.judging import JudgeRunner, make_backend, make_judge
from soda_guard.errors import AuditError, JudgeError, ModelLoadError, TrajectoryError
from soda_guard.mcp.catalog import ToolCatalog
from soda_guard.offload import off_loop
from soda_guard.policy import CascadeConfig, KeywordsConfig, Outcomes, Policy, Rule
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep, Trajectory
from soda_guard.verdict import Action, Decision, Label, Verdict


#: the least time an audit write may wait for other writers, even when the judge used the whole
#: deadline: they hold the log for the milliseconds of one write, and a judgment that timed out
#: must still be recorded
AUDIT_MIN_WAIT_S = 0.25

CarryOut = Callable[[Decision], Decision]
"""What a caller will actually do with a decision, as the decision to audit."""


@dataclass
class _Item:
    call: ToolCall | None
    rule_name: str
    rule: Outcomes | None
    judge: str | None
    view: Trajectory
    refusal: str | None = None
    condition: str | None = None
    candidates: list[tuple[str, Rule, str, str]] = field(default_factory=list)
    """Rules with a `verdict` condition read before `rule`: (name, rule, what held before
    judging, judge)."""

    def judges(self) -> list[str]:
        names = [judge for *_, judge in self.candidates]
        if self.judge is not None:
            names.append(self.judge)
        return list(dict.fromkeys(names))


_judge_threads: weakref.WeakSet[JudgeThreads] = weakref.WeakSet()


_guards: weakref.WeakSet[Guard] = weakref.WeakSet()


def _after_fork() -> None:
    for threads in list(_judge_threads):
        threads._start_empty()
    for guard in list(_guards):
        if not guard.judge_threads.closed:  # a closed guard stays closed: its warm-ups return None
            guard._warmer = _warm_up_thread()


def _submit_load(threads: JudgeThreads, load: Callable[[], Any], name: str) -> concurrent.futures.Future[Any]:
    return threads.submit(load, key=name)


def _warm_up_thread() -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="soda-guard-warm-up")


os.register_at_fork(after_in_child=_after_fork)


class JudgeThreads:
    """Daemon threads for sync judge calls, grown on demand so that a call never queues behind
    a hung one: there is always a free thread for every call in flight, up to `limit` per judge
    (`key`), so a hung judge takes its own share and never another's; past it a call is refused
    at once (and fails closed) instead of waiting. Idle threads exit after
    `idle_s`, so a burst does not leave threads behind, and daemon threads do not keep a
    process alive on a judge that never returns."""

    def __init__(self, limit: int = 64, idle_s: float = 30.0) -> None:
        self.limit = limit
        self.idle_s = idle_s
        self._closed = False
        self._start_empty()
        _judge_threads.add(self)

    def _start_empty(self) -> None:
        """No threads and nothing in flight; also what a forked child has (`_after_fork`): the
        parent's threads are not copied, and counted as there they would start none."""
        self._tasks: queue.SimpleQueue[tuple[concurrent.futures.Future[Any], Callable[[], Any], str | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._busy = 0
        self._busy_by: Counter[str | None] = Counter()
        self._threads = 0

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def threads(self) -> int:
        return self._threads

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn: Callable[[], Any], key: str | None = None) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise JudgeError("the guard is closed")
            if self._busy_by[key] >= self.limit:
                raise JudgeError(f"{self._busy_by[key]} judge calls still running (limit {self.limit}); is the judge hung?")
            self._busy += 1
            self._busy_by[key] += 1
            self._tasks.put((future, fn, key))
            if self._threads < self._busy:
                self._threads += 1
                threading.Thread(target=self._work, name="soda-guard-judge", daemon=True).start()
        return future

    def _work(self) -> None:
        while True:
            try:
                future, fn, key = self._tasks.get(timeout=self.idle_s)
            except queue.Empty:
                with self._lock:
                    if self._threads > self._busy or self._closed:
                        self._threads -= 1
                        return
                continue
            result: Any = None
            failure: BaseException | None = None
            if future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except Exception as error:
                    failure = error
                except BaseException as error:  # a judge must not take the worker (or the caller) down
                    failure = JudgeError(f"judge raised {type(error).__name__}: {error}")
            # free this thread before waking the caller, whose next call may then reuse it
            with self._lock:
                self._busy -= 1
                self._busy_by[key] -= 1
            if failure is not None:
                future.set_exception(failure)
            elif not future.cancelled():
                future.set_result(result)

    def close(self) -> None:
        with self._lock:
            self._closed = True


class Guard:
    """Holds the policy, the loaded judges and the audit sinks; safe to share across threads
    and asyncio tasks."""

    def __init__(
        self,
        policy: Policy,
        *,
        backends: Mapping[str, Backend] | None = None,
        sinks: Sequence[AuditSink] | None = None,
        max_judge_threads: int = 64,
    ) -> None:
        self.policy = policy
        self._backends: dict[str, Backend] = dict(backends or {})
        self._made: list[Backend] = []
        self._runners: dict[str, Runner] = {}
        self._warmable: tuple[int, tuple[Runner, ...]] | None = None
        self._load_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self.sinks: list[AuditSink] = list(sinks or [])
        if policy.audit.jsonl is not None:
            self.sinks.append(JsonlAuditSink(policy.audit.jsonl, fsync=policy.audit.fsync))
        if policy.audit.sqlite is not None:
            self.sinks.append(SqliteAuditSink(policy.audit.sqlite, fsync=policy.audit.fsync))
        self.judge_threads = JudgeThreads(limit=max_judge_threads)
        #: MCP tools the adapters registered: calls to them are judged as `server:tool`
        self.tools = ToolCatalog()
        self._warmer = _warm_up_thread()
        _guards.add(self)
        self._in_use = policy.judges_in_use()
        # a judge whose backend was handed in has nothing to load: made now, so that an
        # instant backend answers even a judge's first check on the caller's thread (one that
        # cannot be made fails as before, in the first check that needs it)
        for name in self._in_use:
            if name in self._backends and not isinstance(policy.judges[name], CascadeConfig):
                try:
                    self.runner(name)
                except Exception:
                    continue

    @classmethod
    def from_yaml_file(cls, path: str | Path, **kwargs: object) -> Guard:
        return cls(Policy.from_yaml_file(path), **kwargs)  # type: ignore[arg-type]

    def runner(self, judge_name: str) -> Runner:
        """Judges and their models load on first use, once, even under concurrent first calls;
        a slow load holds up only calls to that judge, never the loaded ones."""
        loaded = self._runners.get(judge_name)
        if loaded is not None:
            return loaded
        with self._lock:
            load_lock = self._load_locks.setdefault(judge_name, threading.Lock())
        with load_lock:
            if judge_name not in self._runners:
                config = self.policy.judges[judge_name]
                if isinstance(config, CascadeConfig):
                    submit = functools.partial(_submit_load, self.judge_threads)
                    stages = [
                        Stage(name, self.policy.judges[name].kind, self.policy.judges[name].model, self.runner, submit=submit)
                        for name in config.stages
                    ]
                    self._runners[judge_name] = CascadeRunner(judge_name, config, stages)
                    return self._runners[judge_name]
                if isinstance(config, KeywordsConfig):
                    self._runners[judge_name] = KeywordsRunner(judge_name, config)
                    return self._runners[judge_name]
                backend = self._backends.get(judge_name)
                if backend is None:
                    # a judge without its own deadline is held to the check's, even where no
                    # judgment brings one (a warm-up)
                    backend = make_backend(config.model_copy(update={"timeout_s": self.policy.judge_timeout_s(judge_name)}))
                    self._backends[judge_name] = backend
                    self._made.append(backend)
                self._runners[judge_name] = JudgeRunner(
                    make_judge(judge_name, config, self.policy), backend, max_new_tokens=config.max_new_tokens
                )
            return self._runners[judge_name]

    def load(self) -> None:
        """Load every judge the policy can reach and warm each with one short judgment, before
        traffic and outside any deadline. Without it the first check of each judge loads the
        model inside its own `timeout_s` (a 4B model on CPU takes far longer) and fails in
        `on_error`; with it a judge that cannot load fails here, loudly, once. The tables that
        read look-alike delimiters in text outside ASCII are built here too.
        Raises ModelLoadError naming the judge."""
        build_tables()
        for name in self.policy.judges_in_use():
            try:
                runner = self.runner(name)
            except ModelLoadError:
                raise
            except Exception as error:
                raise ModelLoadError(f"judge {name!r} could not be loaded: {type(error).__name__}: {error}") from error
            runner.warm()

    async def aload(self) -> None:
        """`load` on a worker thread: loading weights takes seconds to minutes, which must not
        stall the caller's event loop."""
        await asyncio.to_thread(self.load)

    def warm_up(self, conversation: Trajectory | Callable[[], Trajectory]) -> concurrent.futures.Future[Any] | None:
        """Start warming the judges for the next tool calls of `conversation` (the trajectory,
        or a function that builds it, so converting it is not the caller's cost either) while
        the agent's model is still thinking: every loaded judge whose backend can prefill gets
        the prompt up to the coming action, so the judgment then prefills only the action.
        Returns at once: the work runs on the guard's warm-up thread and each backend's own
        worker, and a newer warm-up of the same conversation supersedes an older one still
        queued. A warm-up changes no verdict (the prefix cache holds the keys and values the
        judgment would compute) and its failure only costs the time it would have saved. The
        future is for tests and benchmarks; None when no judge can be warmed."""
        runners = self.warmable()
        if not runners:
            return None
        try:
            return self._warmer.submit(_warm, runners, conversation)
        except RuntimeError:  # closed
            return None

    def warmable(self) -> tuple[Runner, ...]:
        """The loaded judges a warm-up would prefill (those whose backend can): none means a
        warm-up does nothing, and a caller need not even build the conversation. Asked before
        every model call; read again only once another judge has loaded (judges are only
        ever added, and a runner keeps its backend)."""
        loaded = len(self._runners)
        known = self._warmable
        if known is not None and known[0] == loaded:
            return known[1]
        found = tuple(
            runner for name in self._in_use
            if (runner := self._runners.get(name)) is not None and callable(getattr(getattr(runner, "backend", None), "prefill", None))
        )
        self._warmable = (loaded, found)
        return found

    async def awarm_up(self, conversation: Trajectory | Callable[[], Trajectory]) -> concurrent.futures.Future[Any] | None:
        """`warm_up` from async code: it only queues work, so nothing is awaited."""
        return self.warm_up(conversation)

    def _plan(self, trajectory: Trajectory, context: Trajectory | None = None) -> list[_Item]:
        """Calls that share an id within one turn are refused unjudged: a decision is bound to
        its call by id (among other things), and two calls under one id could each be run on
        the other's decision by anything downstream that goes by id. `context`: the
        conversation the rules' conditions read, where the judge is shown less of the turn."""
        trajectory = self.tools.describe(trajectory)
        # the conditions read earlier calls' servers too (`limit` on `bank:*`)
        context = trajectory if context is None else self.tools.describe(context)
        pending = trajectory.pending_tool_calls()
        counts = Counter(call.id for call in pending)
        items = []
        for call in pending:
            if counts[call.id] > 1:
                why = f"{counts[call.id]} tool calls of this turn share the id {call.id!r}; ids must be unique for a decision to be bound to its call"
                items.append(_Item(call, "binding", None, None, trajectory, refusal=why))
                continue
            route = self.policy.route(call, context)
            rule = route.rule
            judge = None if rule is not None and rule.action is not None else self.policy.outcome(rule, "judge")
            candidates = [(name, cand, held, self.policy.outcome(cand, "judge")) for name, cand, held in route.candidates]
            view = trajectory.with_only_pending_call(call.id) if len(pending) > 1 else trajectory
            items.append(_Item(call, route.name, rule, judge, view, condition=route.condition, candidates=candidates))
        return items

    def _whole(self, trajectory: Trajectory) -> list[_Item]:
        return [_Item(None, "defaults", None, self.policy.defaults.judge, self.tools.describe(trajectory))]

    def _tool_result_items(self, trajectory: Trajectory) -> list[_Item]:
        """The latest tool result, judged only when the policy opts in and its tool matches."""
        moderation = self.policy.tool_results
        last = trajectory.steps[-1] if trajectory.steps else None
        if not isinstance(last, ToolStep):
            raise TrajectoryError(len(trajectory.steps) - 1, "the last step is not a tool result")
        if moderation is None:
            return []
        # the server of the call it answers, for `server:tool` patterns
        trajectory = self.tools.describe(trajectory)
        answered = next(
            (c for step in reversed(trajectory.steps) if isinstance(step, AssistantStep) for c in step.tool_calls if c.id == last.tool_call_id),
            None,
        ) if last.tool_call_id else None
        name = last.name or (answered.name if answered is not None else "")
        server_tool = answered.server_tool if answered is not None and answered.name == name else None
        call = self.tools.stamp(ToolCall(id=last.tool_call_id or "", name=name, server=answered.server if answered is not None else None, server_tool=server_tool))
        if not moderation.matches(call):
            return []
        return [_Item(call, "tool_results", moderation, moderation.judge, trajectory)]

    def _decide(self, item: _Item, verdicts: Mapping[str, Verdict], conversation_id: str | None) -> Decision:
        """The first candidate whose verdict condition holds decides; a candidate whose judge
        failed cannot be read and decides too, with its `on_error`. Otherwise the item's own
        rule (or the defaults) does."""
        for name, rule, held, judge in item.candidates:
            verdict = verdicts.get(judge)
            base = {"rule": name, "tool_call": item.call, "verdict": verdict, "conversation_id": conversation_id}
            untrusted = verdict is not None and verdict.truncated and self.policy.outcome(rule, "on_truncated") == "error"
            if verdict is None or verdict.failed or untrusted:
                cause = (
                    "no judge is configured"
                    if verdict is None
                    else f"judge failed: {verdict.error}"
                    if verdict.failed
                    else "the judge prompt was truncated and on_truncated is error"
                )
                why = f"{name}: its verdict condition cannot be read ({cause})"
                return self._decision(base, self.policy.outcome(rule, "on_error"), why, held or None)
            said = rule.when.after_judging(verdict, _label(verdict, self.policy.outcome(rule, "threshold"))) if rule.when is not None else None
            if said:
                condition = "; ".join(part for part in (held, said) if part)
                if rule.action is not None:
                    return self._decision(base, rule.action, f"{name} sets {rule.action.value}: {said}", condition)
                return self._judged(name, rule, verdict, base, condition, item.view.truncated)
        verdict = verdicts.get(item.judge) if item.judge is not None else None
        base = {"rule": item.rule_name, "tool_call": item.call, "verdict": verdict, "conversation_id": conversation_id}
        if item.refusal is not None:
            return self._decision(base, Action.BLOCK, item.refusal, None)
        fixed = getattr(item.rule, "action", None)
        if fixed is not None:
            why = f"{item.rule_name} sets {fixed.value} without judging"
            return self._decision(base, fixed, why + (f": {item.condition}" if item.condition else ""), item.condition)
        return self._judged(item.rule_name, item.rule, verdict, base, item.condition, item.view.truncated)

    @staticmethod
    def _decision(base: dict[str, Any], action: Action, why: str, condition: str | None) -> Decision:
        verdict = base["verdict"]
        stage = verdict.settled_by if verdict is not None else None
        # every field is given (the factory-made ones too): pydantic-core checks them, with the
        # call and the verdict passed through as the instances they are, faster than
        # `model_construct` fills in what is missing
        return Decision(
            decision_id=new_id(), timestamp=time.time(), action=action, why=why, condition=condition, stage=stage,
            **base,
        )

    def _judged(
        self, rule_name: str, rule: Outcomes | None, verdict: Verdict | None, base: dict[str, Any], condition: str | None,
        view_truncated: bool = False,
    ) -> Decision:
        def outcome(field: str) -> Action:
            return self.policy.outcome(rule, field)

        def decided(action: Action, why: str) -> Decision:
            return self._decision(base, action, why, condition)

        if verdict is None:
            return decided(outcome("on_error"), "no judge is configured for this call")
        if verdict.failed:
            return decided(outcome("on_error"), f"judge failed: {verdict.error}")
        if verdict.truncated and self.policy.outcome(rule, "on_truncated") == "error":
            cut = "the conversation reached the guard already cut" if view_truncated else "the judge prompt was truncated to fit its budget"
            return decided(outcome("on_error"), f"{cut} and on_truncated is error")
        threshold = outcome("threshold")
        label = _label(verdict, threshold)
        why = f"{verdict.judge} said {verdict.label.value}"
        if threshold is not None and verdict.score is not None:
            why += f" with score {verdict.score:.3f} {'>=' if verdict.score >= threshold else '<'} threshold {threshold}"
        if verdict.settled_by is not None:
            why += f" (cascade settled by {verdict.settled_by})"
        if condition:
            why += f"; {rule_name}: {condition}"
        action = outcome({Label.SAFE: "on_safe", Label.UNSAFE: "on_unsafe", Label.CONTROVERSIAL: "on_controversial"}[label])
        return decided(action, why)

    def _groups(self, items: list[_Item]) -> dict[str, list[int]]:
        """Judge name → the items it judges; an item with verdict-conditioned candidates may
        need more than one judge, each judging it once."""
        groups: dict[str, list[int]] = {}
        for index, item in enumerate(items):
            for judge in item.judges():
                groups.setdefault(judge, []).append(index)
        return groups

    def _failure_verdicts(self, judge_name: str, count: int, error: BaseException, start: float) -> list[Verdict]:
        if isinstance(error, (TimeoutError, concurrent.futures.TimeoutError, asyncio.TimeoutError)):
            message = f"judge timed out after {self.policy.defaults.timeout_s}s"
        elif isinstance(error, JudgeError):
            message = str(error)
        else:
            message = f"judge raised {type(error).__name__}: {error}"
        config = self.policy.judges[judge_name]
        runner = self._runners.get(judge_name)
        verdict = Verdict(
            label=None,
            judge=judge_name,
            kind=config.kind,
            model=runner.model_id if runner is not None else config.model,
            latency_ms=(time.perf_counter() - start) * 1000.0,
            error=message,
        )
        return [verdict.model_copy() for _ in range(count)]

    def _checked(self, judge_name: str, count: int, results: Any, start: float) -> list[Verdict]:
        """A judge that answers for the wrong number of calls (or not with verdicts) is a failed
        judge, not a partial answer: `zip` would silently leave calls undecided."""
        if not isinstance(results, list) or len(results) != count or not all(isinstance(v, Verdict) for v in results):
            size = len(results) if isinstance(results, list) else type(results).__name__
            return self._failure_verdicts(judge_name, count, JudgeError(f"judge returned {size} verdicts for {count} calls"), start)
        return results

    def _judge_group(self, judge_name: str, views: list[Trajectory], start: float, deadline: float) -> list[Verdict]:
        try:
            runner = self.runner(judge_name)
        except Exception as error:  # a model that cannot load is a judge failure too
            return self._load_failure(judge_name, len(views), error, start)
        return runner.verdicts(views, deadline)

    async def _ajudge_group(self, judge_name: str, views: list[Trajectory], start: float, deadline: float) -> list[Verdict]:
        if self.judge_threads.closed:  # as the sync path's submit refuses: nothing is judged, nothing restarted
            raise JudgeError("the guard is closed")
        runner = self._runners.get(judge_name)
        if runner is None:
            loading = self.judge_threads.submit(lambda: self.runner(judge_name), key=judge_name)
            try:
                runner = await asyncio.wrap_future(loading)
            except Exception as error:
                return self._load_failure(judge_name, len(views), error, start)
        try:
            return await runner.averdicts(views, deadline)
        except (Exception, asyncio.CancelledError):
            raise
        except BaseException as error:  # SystemExit from a judge would otherwise stop the event loop
            raise JudgeError(f"judge raised {type(error).__name__}: {error}") from None

    def _finish(self, items: list[_Item], verdicts: dict[int, dict[str, Verdict]], conversation_id: str | None) -> list[Decision]:
        return [self._decide(item, verdicts.get(index, {}), conversation_id) for index, item in enumerate(items)]

    def _run_sync(self, items: list[_Item], conversation_id: str | None, carry_out: CarryOut | None = None) -> list[Decision]:
        """Every judge group starts at once and all share one deadline counted from submission,
        so the call returns within `timeout_s` however many judges it needs or hang."""
        start = time.perf_counter()
        deadline = start + self.policy.defaults.timeout_s
        # the same deadline on the clock the backends and the audit sinks read
        submitted_at = time.monotonic()
        monotonic_deadline = submitted_at + self.policy.defaults.timeout_s
        submitted: list[tuple[str, list[int], concurrent.futures.Future[Any] | _Answered | BaseException]] = []
        for judge_name, indexes in self._groups(items).items():
            views = [items[i].view for i in indexes]
            judge_deadline = self._judge_deadline(judge_name, submitted_at)
            runner = self._runners.get(judge_name)
            if runner is not None and getattr(runner, "inline", False) and not self.judge_threads.closed:
                submitted.append((judge_name, indexes, _inline(lambda: runner.verdicts(views, judge_deadline))))
                continue
            try:
                future: concurrent.futures.Future[Any] | BaseException = self.judge_threads.submit(
                    lambda name=judge_name, views=views, at=judge_deadline: self._judge_group(name, views, start, at),  # type: ignore[misc]
                    key=judge_name,
                )
            except JudgeError as error:
                future = error
            submitted.append((judge_name, indexes, future))
        verdicts: dict[int, dict[str, Verdict]] = {}
        for judge_name, indexes, future in submitted:
            try:
                if isinstance(future, BaseException):
                    raise future
                answered = future.value if isinstance(future, _Answered) else future.result(timeout=max(0.0, deadline - time.perf_counter()))
                results = self._checked(judge_name, len(indexes), answered, start)
            except Exception as error:
                results = self._failure_verdicts(judge_name, len(indexes), error, start)
            for index, verdict in zip(indexes, results):
                verdicts.setdefault(index, {})[judge_name] = verdict
        decisions = _carried(self._finish(items, verdicts, conversation_id), carry_out)
        return self._audit(decisions, monotonic_deadline, self._on_error(items))

    async def _run_async(self, items: list[_Item], conversation_id: str | None, carry_out: CarryOut | None = None) -> list[Decision]:
        """`asyncio.wait` rather than `wait_for`: a judge coroutine that swallows its
        cancellation must not hold the caller past the deadline. A judge whose answer is a
        small job that waits on nothing (`JudgeRunner.at_once`) is called here instead, as the
        sync path calls an inline judge: a task and a timed wait cost more than its judgment."""
        start = time.perf_counter()
        submitted_at = time.monotonic()
        monotonic_deadline = submitted_at + self.policy.defaults.timeout_s
        groups = list(self._groups(items).items())
        answered: dict[str, _Answered | BaseException] = {}
        tasks: dict[str, asyncio.Future[list[Verdict]]] = {}
        for name, indexes in groups:
            views = [items[i].view for i in indexes]
            deadline = self._judge_deadline(name, submitted_at)
            runner = self._runners.get(name)
            at_once = getattr(runner, "at_once", None)
            if at_once is not None and not self.judge_threads.closed and at_once(views):
                answered[name] = _inline(lambda: runner.verdicts(views, deadline))  # type: ignore[union-attr]
            else:
                tasks[name] = asyncio.ensure_future(self._ajudge_group(name, views, start, deadline))
        if tasks:
            try:
                await asyncio.wait(tasks.values(), timeout=self.policy.defaults.timeout_s)
            finally:
                for task in tasks.values():
                    if not task.done():
                        task.cancel()
                        task.add_done_callback(_consume)
        verdicts: dict[int, dict[str, Verdict]] = {}
        for judge_name, indexes in groups:
            try:
                found = answered.get(judge_name)
                if isinstance(found, BaseException):
                    raise found
                if found is not None:
                    answer = found.value
                else:
                    task = tasks[judge_name]
                    if not task.done() or task.cancelled():
                        raise TimeoutError
                    answer = task.result()
                results = self._checked(judge_name, len(indexes), answer, start)
            except Exception as error:
                results = self._failure_verdicts(judge_name, len(indexes), error, start)
            for index, verdict in zip(indexes, results):
                verdicts.setdefault(index, {})[judge_name] = verdict
        decisions = _carried(self._finish(items, verdicts, conversation_id), carry_out)
        if self.sinks:
            if self._audits_at_once():
                return self._audit(decisions, monotonic_deadline, self._on_error(items))
            decisions = await off_loop(self._audit, decisions, monotonic_deadline, self._on_error(items))
        return decisions

    def _audits_at_once(self) -> bool:
        """Whether every sink writes without waiting (`instant`, as an OpenTelemetry sink with
        no SDK does): the audit is then done in the caller's task rather than on a thread."""
        return all(getattr(sink, "instant", False) is True for sink in self.sinks)

    def _judge_deadline(self, judge_name: str, submitted_at: float) -> float:
        """The check's deadline, shortened by the judge's own `timeout_s` where it sets one:
        what every backend is held to (`GenerationRequest.deadline`)."""
        if judge_name not in self.policy.judges:
            return submitted_at + self.policy.defaults.timeout_s
        return submitted_at + self.policy.judge_timeout_s(judge_name)

    def _load_failure(self, judge_name: str, count: int, error: Exception, start: float) -> list[Verdict]:
        return self._failure_verdicts(judge_name, count, JudgeError(f"judge could not be loaded: {error}"), start)

    def _on_error(self, items: list[_Item]) -> list[Action]:
        return [self.policy.outcome(item.rule, "on_error") for item in items]

    def _write(self, decisions: list[Decision], deadline: float | None) -> None:
        """Every sink is written, even after one fails (a full JSONL volume must not keep the
        records from SQLite); the first failure is raised once all have been tried."""
        failure: Exception | None = None
        for sink in self.sinks:
            try:
                sink.write(decisions, deadline=deadline)
            except Exception as error:
                failure = failure or error
        if failure is not None:
            raise failure

    def _audit(
        self, decisions: list[Decision], deadline: float | None = None, on_error: Sequence[Action] | None = None
    ) -> list[Decision]:
        """Every decision goes to the sinks through here, and what comes back is what the caller
        may act on. A sink that fails or waits past `deadline` (time.monotonic, the check's
        own; `AUDIT_MIN_WAIT_S` at least) turns the decisions into their `on_error` actions
        (`on_error`, one per decision; the default's otherwise; never looser than the decision
        itself), which say why and get one more
        try at every sink; those are returned even if unrecorded, unless they would let a tool
        run: then `AuditError` is raised instead, since an unrecorded allow is never returned."""
        if not self.sinks:
            return decisions
        try:
            self._write(decisions, None if deadline is None else max(deadline, time.monotonic() + AUDIT_MIN_WAIT_S))
            return decisions
        except Exception as error:
            cause = error
        actions = list(on_error) if on_error is not None else [self.policy.defaults.on_error] * len(decisions)
        # an audit outage never loosens what was decided: `on_error: allow` keeps a block a block
        fallback = [_audit_failed(decision, max(action, decision.action, key=lambda a: a.strictness), cause) for decision, action in zip(decisions, actions)]
        try:
            self._write(fallback, time.monotonic())
        except Exception as error:
            if any(decision.allowed for decision in fallback):
                raise AuditError(f"decisions could not be recorded ({cause}), nor their on_error allow ({error})") from error
            where = "" if len(self.sinks) == 1 else " by every sink"
            note = f"; this decision is not recorded either{where}: {type(error).__name__}: {error}"
            fallback = [decision.model_copy(update={"why": decision.why + note}) for decision in fallback]
        return fallback

    def check_tool_calls(
        self, trajectory: Trajectory, *, carry_out: CarryOut | None = None, context: Trajectory | None = None
    ) -> list[Decision]:
        """One Decision per pending tool call, in the order of the calls. `carry_out` turns each
        decision into what the caller will actually do with it (an adapter that cannot ask a
        person blocks an escalation) before it is audited, so the record is what happened.
        `context`: the whole conversation the rules' conditions (`after`, `limit`, ...) read
        where `trajectory` shows the judge only some of a turn's calls (those judged again
        once others of the turn ran): the others still ran before them."""
        return self._run_sync(self._plan(trajectory, context), trajectory.conversation_id, carry_out)

    async def acheck_tool_calls(
        self, trajectory: Trajectory, *, carry_out: CarryOut | None = None, context: Trajectory | None = None
    ) -> list[Decision]:
        items = await off_loop(self._plan, trajectory, context) if self.policy.scans_results else self._plan(trajectory, context)
        return await self._run_async(items, trajectory.conversation_id, carry_out)

    def check(self, trajectory: Trajectory) -> Decision:
        """Judge a whole trajectory (no particular pending call), under the defaults."""
        return self._run_sync(self._whole(trajectory), trajectory.conversation_id)[0]

    async def acheck(self, trajectory: Trajectory) -> Decision:
        return (await self._run_async(self._whole(trajectory), trajectory.conversation_id))[0]

    def check_tool_result(self, trajectory: Trajectory) -> Decision | None:
        """Moderate the tool result that ends `trajectory`; None when the policy does not ask
        for it (no `tool_results` section, or the tool is not listed there)."""
        items = self._tool_result_items(trajectory)
        return self._run_sync(items, trajectory.conversation_id, _withheld_unreviewed)[0] if items else None

    async def acheck_tool_result(self, trajectory: Trajectory) -> Decision | None:
        items = self._tool_result_items(trajectory)
        return (await self._run_async(items, trajectory.conversation_id, _withheld_unreviewed))[0] if items else None

    def record_review(self, event: Decision, on_error: Action | None = None) -> Decision:
        """Write a decision made outside a check (a reviewer's answer,
        `soda_guard.review.review_event`; the stream monitor's) to every sink, so the audit
        trail shows what finally ran, not only that a person was asked. What comes back
        is what may be acted on: an answer that could not be recorded becomes `on_error` (the
        rule's the decision was made under; the policy's by default), like any decision."""
        fallback = None if on_error is None else [on_error]
        return self._audit([event], time.monotonic() + self.policy.defaults.timeout_s, fallback)[0]

    async def arecord_review(self, event: Decision, on_error: Action | None = None) -> Decision:
        if not self.sinks or self._audits_at_once():
            return self.record_review(event, on_error)
        return await off_loop(self.record_review, event, on_error)

    def close(self) -> None:
        """Refuse new judge calls and stop the backends this guard made (judgments in hand are
        dropped at the engine's next step, HTTP ones end by their deadline); backends passed in
        belong to the caller. Not calling it is safe too: the engine's worker is joined at
        interpreter exit, and threads stuck in a hung judge are daemons."""
        self.judge_threads.close()
        self._warmer.shutdown(wait=False, cancel_futures=True)
        close_each(self._made)
        close_each(self.sinks)

    async def aclose(self) -> None:
        """`close` off the event loop: joining a worker can take a decode step."""
        await asyncio.to_thread(self.close)

    def __enter__(self) -> Guard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Guard:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def close_each(things: Sequence[object]) -> None:
    """Close whatever of `things` can be closed (backends and sinks need not be)."""
    for thing in things:
        closer = getattr(thing, "close", None)
        if callable(closer):
            closer()


@dataclass(frozen=True)
class _Answered:
    """What an inline judge answered (checked later like a judge thread's result)."""

    value: Any


def _inline(judge: Callable[[], list[Verdict]]) -> _Answered | BaseException:
    """An inline judge's answer (`Runner.inline`), or what it raised, as a judge thread's
    future would give either, without the future."""
    try:
        return _Answered(judge())
    except Exception as error:
        return error
    except KeyboardInterrupt:  # the caller's own Ctrl-C, which a judge thread would never see
        raise
    except BaseException as error:  # as on a judge thread: a judge must not take the caller down
        return JudgeError(f"judge raised {type(error).__name__}: {error}")


def unasked(decision: Decision, because: str = "escalated where no reviewer can be asked, so blocked") -> Decision:
    """An escalation where no person can be asked (a call rewritten inside the guard, a tool
    run inside a tool, a callback that can only stop a run, AutoMode, a tool result) is carried
    out as a block, and recorded as what happened, `because` saying why."""
    if decision.action is not Action.ESCALATE:
        return decision
    return decision.model_copy(update={"action": Action.BLOCK, "why": f"{decision.why}; {because}"})


_withheld_unreviewed = functools.partial(
    unasked, because="a tool result cannot wait for review without running the tool again, so it is withheld"
)
"""A tool result cannot wait for a reviewer (the tool has run; asking would mean running it
again once answered): an escalated result is withheld, audited as the block it is."""


def _carried(decisions: list[Decision], carry_out: CarryOut | None) -> list[Decision]:
    return decisions if carry_out is None else [carry_out(decision) for decision in decisions]


def _audit_failed(decision: Decision, action: Action, cause: Exception) -> Decision:
    """A new record, not an edit: a sink that did record `decision` keeps it, and this one,
    written after it, names it as replaced."""
    why = (
        f"audit sink unavailable ({type(cause).__name__}: {cause}); on_error replaces decision "
        f"{decision.decision_id} ({decision.action.value}: {decision.why})"
    )
    return decision.model_copy(update={"decision_id": new_id(), "timestamp": time.time(), "action": action, "why": why})


def _warm(runners: Sequence[JudgeRunner], conversation: Trajectory | Callable[[], Trajectory]) -> list[object]:
    """On the warm-up thread: the trajectory built, and each judge's prefill queued."""
    trajectory = conversation() if callable(conversation) else conversation
    return [runner.prefill(trajectory) for runner in runners]


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a late judge task's outcome so it is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()


def _label(verdict: Verdict, threshold: float | None) -> Label:
    """The label the policy reads: with a `threshold`, a score at or above it is unsafe and one
    below it not, whatever the generated label (a rule's verdict condition reads it too)."""
    label = verdict.label
    if threshold is None or verdict.score is None:
        return label  # type: ignore[return-value]
    if verdict.score >= threshold:
        return Label.UNSAFE
    return Label.SAFE if label is Label.UNSAFE else label  # type: ignore[return-value]
