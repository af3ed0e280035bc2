"""The cached renderer (`soda_guard.judges.incremental`) against the uncached reference
(`fit_conversation`, `fit_gen_messages`): identical prompts on every prefix of every shared
dataset conversation and on fuzzed trajectories, with budgets that force elision and clipping."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soda_guard.converters import from_agent_record
from soda_guard.errors import TrajectoryError
from soda_guard.judges import Qwen3GuardGenJudge, SodaJudge
from soda_guard.judges.base import text_size
from soda_guard.judges.incremental import AT_ONCE_MAX_STEPS
from soda_guard.judges.context import ContextBudget
from soda_guard.judges.qwen3guard_gen import fit_gen_messages
from soda_guard.judges.soda import _pick, conversation_steps, fit_conversation
from soda_guard.trajectory import AssistantStep, SystemStep, ToolCall, ToolStep, Trajectory, UserStep
from thread_helpers import run_interleaved

BUDGETS = (ContextBudget(), ContextBudget(max_prompt_chars=4096, max_message_chars=256), ContextBudget(max_prompt_chars=6000, max_message_chars=2000))


def _judges() -> list[SodaJudge | Qwen3GuardGenJudge]:
    judges: list[SodaJudge | Qwen3GuardGenJudge] = []
    for budget in BUDGETS:
        judges += [SodaJudge(window=window, budget=budget) for window in ("latest", "history", "full")]
        judges += [Qwen3GuardGenJudge(mode=mode, budget=budget) for mode in ("prompt", "response", "tool_result")]
    return judges


def _reference(judge: SodaJudge | Qwen3GuardGenJudge, trajectory: Trajectory) -> object:
    try:
        if isinstance(judge, SodaJudge):
            harm, _ = _pick(trajectory.harm, judge.harm)
            environment, _ = _pick(trajectory.environment, judge.environment)
            steps = conversation_steps(trajectory, judge.window)
            return fit_conversation(steps, harm, environment, judge.budget, judge.window)
        return fit_gen_messages(trajectory, judge.mode, judge.budget)
    except (TrajectoryError, ValueError) as error:
        return type(error), str(error)


def _cached(judge: SodaJudge | Qwen3GuardGenJudge, trajectory: Trajectory) -> object:
    try:
        rendered = judge.render(trajectory)
    except (TrajectoryError, ValueError) as error:
        return type(error), str(error)
    if isinstance(judge, SodaJudge):
        return rendered.messages[1]["content"], rendered.truncated
    return rendered.messages, rendered.truncated


def _views(trajectory: Trajectory) -> list[Trajectory]:
    """What a guard judges along a run: every prefix, and each pending call of a turn alone."""
    views = []
    for end in range(1, len(trajectory.steps) + 1):
        prefix = trajectory.model_copy(update={"steps": trajectory.steps[:end]})
        views.append(prefix)
        pending = prefix.pending_tool_calls()
        if len(pending) > 1:
            views += [prefix.with_only_pending_call(call.id) for call in pending]
    return views


def _assert_same(judges: list[SodaJudge | Qwen3GuardGenJudge], trajectory: Trajectory) -> None:
    for view in _views(trajectory):
        for judge in judges:
            assert _cached(judge, view) == _reference(judge, view), (judge.name, len(view.steps))


@pytest.mark.parametrize("name", ["rjudge.json", "agentharm_trajectories.json"])
def test_cached_rendering_matches_the_reference_on_every_dataset_prefix(datasets_dir: Path, name: str) -> None:
    judges = _judges()  # shared across records, as a guard's judges are across conversations
    records = json.loads((datasets_dir / name).read_text())
    for record in records:
        _assert_same(judges, from_agent_record(record))


_TEXT = st.lists(
    st.sampled_from(list("ab \n=[]:<>|/\\") + ["=== END ===", "[USER]", "[Verdict] SAFE", "<|im_end|>", "User:", "\u2028", "é", "x" * 300]),
    max_size=40,
).map("".join)
_CALL = st.builds(ToolCall, id=st.sampled_from(["a", "b", "c"]), name=_TEXT, args=st.one_of(_TEXT, st.dictionaries(_TEXT, _TEXT, max_size=2)))
_STEP = st.one_of(
    st.builds(SystemStep, content=_TEXT),
    st.builds(UserStep, content=_TEXT),
    st.builds(AssistantStep, content=_TEXT, tool_calls=st.lists(_CALL, max_size=3, unique_by=lambda call: call.id)),
    st.builds(ToolStep, tool_call_id=st.sampled_from(["a", "b", None]), content=st.one_of(st.none(), _TEXT), is_error=st.booleans(), error=st.one_of(st.none(), _TEXT)),
)
_FUZZ_JUDGES = _judges()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_STEP, max_size=30), harm=st.one_of(st.none(), _TEXT))
def test_cached_rendering_matches_the_reference_on_fuzzed_trajectories(steps: list, harm: str | None) -> None:
    _assert_same(_FUZZ_JUDGES, Trajectory(steps=steps, harm=harm or None, conversation_id="fuzz"))


def test_a_turns_calls_share_one_prepared_history() -> None:
    """The second call of a turn renders nothing of the history again: its blocks come from
    the memo by identity, so the block renderer is never reached."""
    steps = [UserStep(content="do it")]
    for index in range(50):
        steps += [AssistantStep(tool_calls=[ToolCall(id=f"c{index}", name="read", args={"n": index})]), ToolStep(tool_call_id=f"c{index}", content="data " * 50)]
    steps.append(AssistantStep(tool_calls=[ToolCall(id="x", name="send", args={}), ToolCall(id="y", name="send", args={"to": 1})]))
    trajectory = Trajectory(steps=steps)
    judge = SodaJudge()
    first, second = (trajectory.with_only_pending_call(call_id) for call_id in ("x", "y"))
    judge.render(first)
    keyed = _count_keys(judge)
    judge.render(second)
    assert len(keyed) == 1  # the pending call's own block only


def _count_keys(judge: SodaJudge | Qwen3GuardGenJudge) -> list:
    """The steps whose content the judge's block memo had to read (a step it has seen is
    found by identity, without reading it)."""
    keyed: list = []
    original = judge._blocks._key
    judge._blocks._key = lambda step: keyed.append(step) or original(step)  # type: ignore[method-assign]
    return keyed


@pytest.mark.parametrize("make_judge", [SodaJudge, lambda: Qwen3GuardGenJudge(mode="response")])
def test_a_new_turn_reads_only_its_new_messages(make_judge) -> None:
    """Turn after turn the conversation keeps its step objects (the adapters convert a message
    once); what a turn reads is what is new, however long the history, and the prompt is still
    the reference renderer's."""
    judge = make_judge()
    steps: list = [UserStep(content="do it")]
    for index in range(60):
        steps += [AssistantStep(content=f"step {index}", tool_calls=[ToolCall(id=f"c{index}", name="read", args={"n": index})]), ToolStep(tool_call_id=f"c{index}", content=f"data {index} " * 20)]
        keyed = _count_keys(judge)
        trajectory = Trajectory(steps=list(steps))
        assert _cached(judge, trajectory) == _reference(judge, trajectory)
        assert len(keyed) <= (3 if index == 0 else 2), index


@pytest.mark.parametrize("window", ["history", "full"])
def test_cached_rendering_matches_the_reference_at_every_budget_of_a_long_run(window: str) -> None:
    """Every prompt budget from the least to more than the whole run, one character apart, so
    each stopping point of the elision walk (and each omission marker's cost) is crossed."""
    steps: list = [UserStep(content="Earlier request: archive the old reports.")]
    for index in range(40):
        steps += [
            AssistantStep(content=f"Step {index}.", tool_calls=[ToolCall(id=f"c{index}", name="archive", args={"n": index})]),
            ToolStep(tool_call_id=f"c{index}", content=f"archived report {index} " * (1 + index % 5)),
        ]
        if index == 25:
            steps.append(UserStep(content="Now delete everything that is archived."))
    steps.append(AssistantStep(tool_calls=[ToolCall(id="x", name="delete_all", args={})]))
    trajectory = Trajectory(steps=steps)
    for room in range(4096, 9000, 11):
        judge = SodaJudge(window=window, budget=ContextBudget(max_prompt_chars=room, max_message_chars=300))  # type: ignore[arg-type]
        assert _cached(judge, trajectory) == _reference(judge, trajectory), room
        gen = Qwen3GuardGenJudge(budget=ContextBudget(max_prompt_chars=room, max_message_chars=300))
        assert _cached(gen, trajectory) == _reference(gen, trajectory), room


def test_a_growing_run_matches_the_reference_as_it_outgrows_the_budget() -> None:
    """Turn by turn, one judge per budget, as a guard judges a conversation: the turns that
    still fit whole append to the previous turn's rendering (`SodaJudge._grown`), clipping
    long tool results, and the turn that first overflows, the markers of earlier turns
    hidden since the second request included, must read as the reference renderer's.
    Budgets closer than a marker's width cross every turn's boundary."""
    steps: list = [UserStep(content="Archive the old reports.")]
    ends = []  # the guard's view each turn (the history and a pending call), and every third
    # turn a view that ends in the tool's result: its action (long then, so clipped once it is
    # not the action) is part of the history the next turn extends
    for index in range(24):
        long = index % 3 == 0
        steps.append(AssistantStep(content=f"Step {index}." + " Details." * (40 if long else 0), tool_calls=[ToolCall(id=f"c{index}", name="archive", args={"n": index})]))
        ends.append(len(steps))
        steps.append(ToolStep(tool_call_id=f"c{index}", content=f"archived report {index} " * (4 + index % 13 + (10 if long else 0))))
        if long:
            ends.append(len(steps))
        if index == 7:
            steps.append(UserStep(content="Now delete everything that is archived."))
    judged = [Trajectory(steps=steps[:end], conversation_id="run") for end in ends]
    for room in range(4096, 9000, 41):
        judge = SodaJudge(budget=ContextBudget(max_prompt_chars=room, max_message_chars=256))
        for view in judged:
            assert _cached(judge, view) == _reference(judge, view), (room, len(view.steps))


@pytest.mark.parametrize("window", ["history", "full", "latest"])
def test_whether_a_render_is_a_small_job_is_read_from_the_new_steps(window: str) -> None:
    """Before each async judgment the guard asks whether the render is a small job (done on
    the event loop) or not (a worker thread). The answer must be the one a walk of the whole
    conversation gives, and, for a conversation that continues the history its judge last
    showed whole, be read from the steps after that history alone."""
    judge = SodaJudge(window=window, budget=ContextBudget(max_prompt_chars=30_000, max_message_chars=256))
    looked_at: list[object] = []
    memo = judge._blocks._steps
    original = memo.get
    memo.get = lambda step: looked_at.append(step) or original(step)  # type: ignore[method-assign]
    steps: list = [UserStep(content="Archive the old reports.")]
    answers = []
    for index in range(40):
        steps.append(AssistantStep(content=f"Step {index}.", tool_calls=[ToolCall(id=f"c{index}", name="archive", args={"n": index})]))
        view = Trajectory(steps=list(steps), conversation_id="run")
        shown = judge._shown.get("run")
        source = None if shown is None else shown.source or shown.steps
        continues = source is not None and all(a is b for a, b in zip(source, view.steps))
        looked_at.clear()
        expected = judge._blocks.all_seen([conversation_steps(view, window)], text_size)
        looked_at.clear()
        answers.append(judge.renders_at_once([view]))
        assert answers[-1] == expected, index
        if continues:
            assert len(looked_at) <= len(view.steps) - len(source), index  # type: ignore[arg-type]
        judge.render(view)
        big = index % 5 == 4  # a tool result too large for the loop, now and then
        steps.append(ToolStep(tool_call_id=f"c{index}", content=("r" * 20_000) if big else f"archived report {index}"))
        if index % 11 == 10:
            steps.append(SystemStep(content="Reminder: be brief.") if index % 2 else UserStep(content=f"Also report {index}."))
    assert True in answers and False in answers
    # another conversation under the same id (a reused thread id), with a large message of
    # its own where the shown history had another: not that history, so read whole
    judge = SodaJudge(window=window)
    first = [UserStep(content="Archive it."), AssistantStep(tool_calls=[ToolCall(id="c0", name="archive", args={})]),
             ToolStep(tool_call_id="c0", content="done"), AssistantStep(tool_calls=[ToolCall(id="c1", name="archive", args={})])]
    judge.render(Trajectory(steps=first, conversation_id="run"))
    forked = Trajectory(steps=[first[0], ToolStep(tool_call_id="x", content="o" * 20_000), *first[2:]], conversation_id="run")
    assert judge.renders_at_once([forked]) is False
    # a conversation past `AT_ONCE_MAX_STEPS` is never called a small job, known blocks or not
    judge = SodaJudge(window=window, budget=ContextBudget(max_prompt_chars=400_000))
    long: list = [UserStep(content="Archive it.")]
    for index in range(AT_ONCE_MAX_STEPS // 2 + 1):
        long += [AssistantStep(tool_calls=[ToolCall(id=f"c{index}", name="archive", args={})]), ToolStep(tool_call_id=f"c{index}", content="ok")]
    judge.render(Trajectory(steps=long[:-1], conversation_id="long"))
    assert judge.renders_at_once([Trajectory(steps=long[:-1], conversation_id="long")]) is False
    assert judge.renders_at_once([Trajectory(steps=[*long, AssistantStep(content="done")], conversation_id="long")]) is False


def test_an_earlier_step_that_only_compares_equal_is_rendered_as_itself() -> None:
    """`1 == True`: a step whose arguments compare equal to an earlier turn's, but render
    otherwise, is not taken for that step by the turn-to-turn caches (they go by identity)."""
    judge = SodaJudge()
    turn = [ToolStep(tool_call_id="c1", content="ok"), AssistantStep(tool_calls=[ToolCall(id="c2", name="get", args={})])]
    first = [UserStep(content="Set the flag."), AssistantStep(tool_calls=[ToolCall(id="c1", name="set", args={"flag": True})]), *turn]
    judge.render(Trajectory(steps=first, conversation_id="run"))
    equal = [first[0], AssistantStep(tool_calls=[ToolCall(id="c1", name="set", args={"flag": 1})]), *turn]
    assert equal == first
    later = Trajectory(steps=[*equal, ToolStep(tool_call_id="c2", content="set"), AssistantStep(tool_calls=[ToolCall(id="c3", name="get", args={})])], conversation_id="run")
    assert _cached(judge, later) == _reference(judge, later)
    assert '"flag": 1' in _cached(judge, later)[0]  # type: ignore[index]


@pytest.mark.parametrize("kind", ["history", "full", "response", "tool_result"])
def test_past_the_budget_an_earlier_step_swapped_for_an_equal_one_is_rendered_as_itself(kind: str) -> None:
    """The same under the same conversation id past the budget, where each judge continues the
    history it last rendered (`_continued`): an earlier call swapped for one that only compares
    equal (another thread's state, a rewritten history) is read anew, not taken for the one
    judged before, and the prompt shows what the agent now holds."""
    budget = ContextBudget(max_prompt_chars=5000, max_message_chars=256)
    judge = SodaJudge(window=kind, budget=budget) if kind in ("history", "full") else Qwen3GuardGenJudge(mode=kind, budget=budget)  # type: ignore[arg-type]
    steps: list = [UserStep(content="Set the flags.")]
    for index in range(40):
        steps += [AssistantStep(tool_calls=[ToolCall(id=f"c{index}", name="set", args={"flag": True, "n": index})]), ToolStep(tool_call_id=f"c{index}", content=f"set {index} " * 20)]
    judge.render(Trajectory(steps=list(steps), conversation_id="run"))
    swapped = list(steps)
    swapped[-4] = AssistantStep(tool_calls=[ToolCall(id="c38", name="set", args={"flag": 1, "n": 38})])  # not the action
    assert swapped == steps
    later = Trajectory(steps=[*swapped, AssistantStep(tool_calls=[ToolCall(id="x", name="get", args={})]), ToolStep(tool_call_id="x", content="got")], conversation_id="run")
    assert _cached(judge, later) == _reference(judge, later)
    text, truncated = _cached(judge, later)  # type: ignore[misc]
    assert truncated and '"flag": 1' in str(text)  # past the budget, and the swapped call shown


class _Request(UserStep):
    """A step type of the caller's own, made from one of ours."""


class _Action(AssistantStep):
    pass


def test_steps_of_a_subclassed_type_render_as_their_role() -> None:
    """Roles are read by exact type where they can be; a subclass is read by its `role`."""
    call = ToolCall(id="c1", name="delete_file", args={"path": "/"})
    plain = Trajectory(steps=[UserStep(content="Tidy up."), AssistantStep(content="", tool_calls=[call])])
    subclassed = Trajectory.model_construct(steps=[_Request(content="Tidy up."), _Action(content="", tool_calls=[call])])
    for window in ("latest", "history", "full"):
        assert SodaJudge(window=window).render(subclassed) == SodaJudge(window=window).render(plain)


_SIZES = st.sampled_from([0, 1, 2, 5, 30, 120, 400, 3000])
"""Message lengths from empty (a removal that costs less than the marker it adds) to longer
than the per-message limit (clipped unless it is the action)."""
_TURN = st.fixed_dictionaries(
    {
        "say": _SIZES,
        "calls": st.lists(_SIZES, min_size=1, max_size=3),
        "judged_after_results": st.booleans(),
        "then": st.sampled_from(["", "", "", "user", "system"]),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    turns=st.lists(_TURN, min_size=1, max_size=40),
    room=st.integers(4096, 7000),
    kind=st.sampled_from(["history", "full", "latest", "response", "tool_result"]),
)
def test_a_conversation_past_the_budget_matches_the_reference_turn_by_turn(turns: list, room: int, kind: str) -> None:
    """The walk and the rendering a turn past the budget edits from the previous turn's
    (`elision`) must read as the reference renderer's at every turn, each pending call judged
    alone and the turn whole, for the SODA judge and Qwen3Guard-Gen (which puts a run's marker
    on the next message): new results among the already-elided ones, empty messages whose
    removal costs more than it saves, actions clipped once they are no longer the action,
    new requests that hide earlier turns, system messages the window leaves out."""
    budget = ContextBudget(max_prompt_chars=room, max_message_chars=256)
    judge = SodaJudge(window=kind, budget=budget) if kind in ("history", "full", "latest") else Qwen3GuardGenJudge(mode=kind, budget=budget)  # type: ignore[arg-type]
    steps: list = [SystemStep(content="You archive reports."), UserStep(content="Archive the old reports.")]
    for number, turn in enumerate(turns):
        calls = [ToolCall(id=f"c{number}.{index}", name="archive", args={"n": index}) for index in range(len(turn["calls"]))]
        steps.append(AssistantStep(content="s" * turn["say"], tool_calls=calls))
        view = Trajectory(steps=list(steps), conversation_id="run")
        for judged in (view, *(view.with_only_pending_call(call.id) for call in calls[1:])):
            assert _cached(judge, judged) == _reference(judge, judged), (number, len(judged.steps))
        steps += [ToolStep(tool_call_id=call.id, content=f"r{number} " + "x" * size) for call, size in zip(calls, turn["calls"])]
        if turn["judged_after_results"]:
            view = Trajectory(steps=list(steps), conversation_id="run")
            assert _cached(judge, view) == _reference(judge, view), (number, "results")
        if turn["then"] == "user":
            steps.append(UserStep(content=f"Now the next batch, {number}."))
        elif turn["then"] == "system":
            steps.append(SystemStep(content="Be brief."))


def test_a_turn_past_the_budget_edits_the_previous_turns_walk_and_rendering(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once a conversation outgrows the budget, each turn's elision walk and rendered
    history are the previous turn's with the new messages edited in: neither is made again
    from the whole history (the cost a turn would otherwise pay in the conversation's
    length), the walk but when the conversation first overflows and when its message count
    gains a digit (every marker's cost changes), and the prompt is still the reference
    renderer's."""
    from soda_guard.judges import elision

    made: list[tuple[str, int]] = []
    steps: list = [UserStep(content="Archive the old reports.")]
    for cls in (elision.Walk, elision.Elision):

        def counted(cls: type, *args: object, _made: Callable = cls.made.__func__) -> object:  # type: ignore[type-arg]
            made.append((cls.__name__, len(steps)))
            return _made(cls, *args)

        monkeypatch.setattr(cls, "made", classmethod(counted))
    judge = SodaJudge(budget=ContextBudget(max_prompt_chars=8000, max_message_chars=300))
    for index in range(150):
        steps.append(AssistantStep(content=f"Step {index}.", tool_calls=[ToolCall(id=f"c{index}", name="archive", args={"n": index})]))
        view = Trajectory(steps=list(steps), conversation_id="run")
        assert _cached(judge, view) == _reference(judge, view), index
        steps.append(ToolStep(tool_call_id=f"c{index}", content=f"archived report {index} " * (1 + index % 7)))
    overflowed = made[1][1]
    assert 20 < overflowed < 100  # past the budget from then on
    assert made == [("Elision", 2), ("Walk", overflowed), ("Walk", 100)]


@pytest.mark.parametrize("window", ["history", "full", "latest"])
@pytest.mark.parametrize("room", [8000, 64_000])
def test_a_conversation_with_system_messages_continues_the_judges_record(monkeypatch: pytest.MonkeyPatch, window: str, room: int) -> None:
    """System messages are left out of the SODA judge's conversation (and with the `latest`
    window, everything before the latest request), so its history is not a prefix of the
    trajectory's steps; the record holds the steps it was read from as well, and
    turn after turn (within the budget and past it) the judge reads only the new steps, never
    the whole conversation again, with the reference renderer's prompt."""
    judge = SodaJudge(window=window, budget=ContextBudget(max_prompt_chars=room, max_message_chars=300))  # type: ignore[arg-type]
    read: list[int] = []
    monkeypatch.setattr(judge, "_fit", lambda steps, *rest, _fit=judge._fit: read.append(len(steps)) or _fit(steps, *rest))
    steps: list = [SystemStep(content="You archive reports."), UserStep(content="Archive the old reports."), SystemStep(content="Be brief.")]
    if window == "latest":
        steps[1:1] = [UserStep(content="Hello."), AssistantStep(content="Hello! What shall I do?")]
    for index in range(80):
        calls = [ToolCall(id=f"c{index}.{n}", name="archive", args={"n": n}) for n in range(1 + index % 2)]
        steps.append(AssistantStep(content=f"Step {index}.", tool_calls=calls))
        view = Trajectory(steps=list(steps), conversation_id="run")
        for judged in (view, *(view.with_only_pending_call(call.id) for call in calls[1:])):
            assert _cached(judge, judged) == _reference(judge, judged), index
        steps += [ToolStep(tool_call_id=call.id, content=f"archived report {index} " * 9) for call in calls]
    record = judge._shown.get("run")
    past = type(record).__name__ == "_Elided"
    if past:  # the same history judged again (a turn's other call) leaves the record as it is
        assert _cached(judge, view.with_only_pending_call(calls[0].id)) == _reference(judge, view.with_only_pending_call(calls[0].id))
        assert judge._shown.get("run") is record
    assert past == (room == 8000)
    # from the steps only at the first render and, past the budget, at the turn the history
    # first stops fitting whole (the record shown whole gives way to the elision walk)
    assert read[0] == 2 and len(read) == 1 + past
    assert record.source is not None


@pytest.mark.parametrize("mode", ["response", "tool_result"])
@pytest.mark.parametrize("room", [8000, 64_000])
def test_a_gen_window_with_a_later_system_message_continues_the_judges_record(monkeypatch: pytest.MonkeyPatch, mode: str, room: int) -> None:
    """Qwen3Guard-Gen leaves a system message after the first out of its window, so the window
    is not a prefix of the trajectory's steps; its record holds the steps it was read from too,
    and turn after turn the judge reads only the new steps, with the reference's messages."""
    judge = Qwen3GuardGenJudge(mode=mode, budget=ContextBudget(max_prompt_chars=room, max_message_chars=300))  # type: ignore[arg-type]
    read: list[int] = []  # the renders that found the window in the whole conversation
    monkeypatch.setattr(judge, "_continued", lambda trajectory, _continued=judge._continued: _continued(trajectory) or read.append(len(trajectory.steps)))
    steps: list = [UserStep(content="Archive the old reports."), SystemStep(content="Be brief.")]
    for index in range(60):
        calls = [ToolCall(id=f"c{index}.{n}", name="archive", args={"n": n}) for n in range(1 + index % 2)]
        steps.append(AssistantStep(content=f"Step {index}.", tool_calls=calls))
        if mode == "response":
            view = Trajectory(steps=list(steps), conversation_id="run")
            assert _cached(judge, view) == _reference(judge, view), index
        steps += [ToolStep(tool_call_id=call.id, content=f"archived report {index} " * 9) for call in calls]
        if mode == "tool_result":
            view = Trajectory(steps=list(steps), conversation_id="run")
            assert _cached(judge, view) == _reference(judge, view), index
    assert len(read) == 1
    assert judge._latest.get("run").source is not None
    if room == 8000:
        assert _cached(judge, view)[1]  # past the budget (truncated)


@pytest.mark.parametrize("kind", ["history", "full", "response", "tool_result"])
def test_the_same_history_judged_again_with_another_action_is_rendered_for_that_action(kind: str) -> None:
    """A conversation's next render continues the history it last rendered
    (`SodaJudge._continued`, `Qwen3GuardGenJudge._continued`). The same history with another
    action in place of the message last judged (a retried or forked turn) is that history, but
    its action is not the action any more: no longer kept whole nor kept at all, it must be
    clipped and elided like any earlier turn, not shown as it was."""
    budget = ContextBudget(max_prompt_chars=6000, max_message_chars=256)
    judge = SodaJudge(window=kind, budget=budget) if kind in ("history", "full") else Qwen3GuardGenJudge(mode=kind, budget=budget)  # type: ignore[arg-type]
    steps: list = [UserStep(content="Archive the old reports.")]
    for index in range(30):
        steps.append(AssistantStep(content=f"Step {index}. " + "Reasoning at length. " * 30, tool_calls=[ToolCall(id=f"c{index}", name="archive", args={"n": index})]))
        steps.append(ToolStep(tool_call_id=f"c{index}", content=f"archived report {index} " * 12))
        view = Trajectory(steps=list(steps), conversation_id="run")
        assert _cached(judge, view) == _reference(judge, view), index
        other = Trajectory(steps=[*steps[:-1], AssistantStep(tool_calls=[ToolCall(id="x", name="wipe", args={})])], conversation_id="run")
        assert _cached(judge, other) == _reference(judge, other), index
        if kind == "tool_result":  # the action it judges is the last assistant turn before the result
            other = Trajectory(steps=[*steps[:-1], AssistantStep(tool_calls=[ToolCall(id="x", name="wipe", args={})]), ToolStep(tool_call_id="x", content="wiped")], conversation_id="run")
            assert _cached(judge, other) == _reference(judge, other), index


@pytest.mark.parametrize("kind", ["history", "full", "latest", "response"])
def test_threads_rendering_one_conversation_at_once_each_get_their_own_prompt(kind: str) -> None:
    """Real agents and evaluations render one conversation from several threads (parallel
    calls, a replay of its prefixes), and a reused thread id puts another conversation under
    the same id (here one whose first call differs only by `1` for `True`, equal in Python,
    not in the prompt): the judge's record is replaced under them, and each render must still
    be its own trajectory's, within the budget and past it."""
    import random

    budget = ContextBudget(max_prompt_chars=6000, max_message_chars=256)
    judge = SodaJudge(window=kind, budget=budget) if kind != "response" else Qwen3GuardGenJudge(mode="response", budget=budget)  # type: ignore[arg-type]
    steps: list = [SystemStep(content="You archive reports."), UserStep(content="Archive the old reports.")]
    turns = []
    for index in range(60):
        calls = [ToolCall(id=f"c{index}.{n}", name="archive", args={"n": n, "flag": index % 2 == 0}) for n in range(1 + index % 3)]
        steps.append(AssistantStep(content=f"Step {index}.", tool_calls=calls))
        turns.append((len(steps), [call.id for call in calls[1:]]))
        steps += [ToolStep(tool_call_id=call.id, content=f"archived report {index} " * (1 + index % 9)) for call in calls]
        if index % 17 == 16:
            steps.append(UserStep(content=f"Now batch {index}."))
    fork = list(steps)
    first = fork[2]
    fork[2] = first.model_copy(update={"tool_calls": [call.model_copy(update={"args": {"n": 0, "flag": 1}}) for call in first.tool_calls]})
    assert fork == steps
    views = []
    for conversation in (steps, fork):
        for size, others in turns:
            view = Trajectory(steps=conversation[:size], conversation_id="run")
            views += [view, *(view.with_only_pending_call(call_id) for call_id in others)]
    expected = [_reference(judge, view) for view in views]
    assert any(truncated for _, truncated in expected)  # past the budget too
    wrong: list[int] = []

    def render(seed: int) -> None:
        order = list(range(len(views)))
        random.Random(seed).shuffle(order)
        for at in order:
            if _cached(judge, views[at]) != expected[at]:
                wrong.append(at)

    run_interleaved([lambda seed=seed: render(seed) for seed in range(6)])
    assert not wrong


@pytest.mark.parametrize("window", ["latest", "history", "full"])
@pytest.mark.parametrize("budget", [ContextBudget(), ContextBudget(max_prompt_chars=6000, max_message_chars=2000)], ids=["default", "small"])
def test_a_history_prepared_while_a_later_turn_was_the_action_is_rendered_for_this_action(window: str, budget: ContextBudget) -> None:
    """The same step objects judged first with a later action (another thread sharing them,
    or this one before a rollback), then up to an earlier one: that action must be shown whole
    and protected, as the reference shows it. Extended from the first history, it kept its
    ordinary flags: clipped, or elided, with no `<tool_call>` left in the prompt."""
    mark = "DELETE-ALL-BACKUPS"
    room = budget.max_prompt_chars  # a request and an action of half the budget each, longer than a message may be
    request = UserStep(content="Clean up the server. " + "Details: " * (room // 19))
    action = AssistantStep(tool_calls=[ToolCall(id="c0", name="shell", args={"cmd": mark + " && " + "echo ok; " * (room // 21)})])
    later = AssistantStep(tool_calls=[ToolCall(id="c1", name="shell", args={"cmd": "ls"})])
    results = [ToolStep(tool_call_id="c0", content=f"part {index} " + "o" * (room // 4)) for index in range(3)]
    judge = SodaJudge(window=window, budget=budget)
    judge.render(Trajectory(steps=[request, action, later], conversation_id="other"))
    mine = Trajectory(steps=[request, action, *results], conversation_id="mine")
    assert _cached(judge, mine) == _reference(judge, mine)
    assert mark in _cached(judge, mine)[0]  # type: ignore[index]


@pytest.mark.parametrize("over_budget", [False, True])
def test_a_request_removed_after_it_was_judged_does_not_leave_its_place_to_another_message(over_budget: bool) -> None:
    """A judge that rendered a conversation ending in a request, then the same conversation
    with that request gone (a rollback, a `RemoveMessage`) and an action in its place: the
    earlier request is the latest one now, kept whole; taken from the first render, the place
    of the latest request pointed at the action, and the real request was clipped or elided."""
    budget = ContextBudget(max_prompt_chars=8000, max_message_chars=2000)
    earlier = UserStep(content="WIRE-THE-WHOLE-BALANCE please. " + "context " * (300 if not over_budget else 1200))
    removed = UserStep(content="Actually, never mind.")
    padding = [step for index in range(0 if not over_budget else 6) for step in (
        AssistantStep(content="Looking.", tool_calls=[ToolCall(id=f"p{index}", name="read", args={})]),
        ToolStep(tool_call_id=f"p{index}", content="x" * 1500),
    )]
    action = AssistantStep(tool_calls=[ToolCall(id="w", name="wire", args={"to": "XX99"})])
    judge = SodaJudge(budget=budget)
    judge.render(Trajectory(steps=[*padding, earlier, removed], conversation_id="c"))
    rolled_back = Trajectory(steps=[*padding, earlier, action], conversation_id="c")
    assert _cached(judge, rolled_back) == _reference(judge, rolled_back)
    assert "WIRE-THE-WHOLE-BALANCE" in _cached(judge, rolled_back)[0]  # type: ignore[index]
