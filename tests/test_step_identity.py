"""`same_start`: a judge's proof that a conversation continues the history it last rendered
holds the very step objects, not equal ones, at the cost of a list comparison."""

from __future__ import annotations

import threading

import pytest

from soda_guard import trajectory
from soda_guard.judges.incremental import continues
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge, fit_gen_messages
from soda_guard.judges.soda import SodaJudge, _pick, conversation_steps, fit_conversation
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep, Trajectory, UserStep, exact_steps, same_start


def _steps(count: int) -> list[UserStep | AssistantStep | ToolStep]:
    steps: list[UserStep | AssistantStep | ToolStep] = [UserStep(content="Pay the bills.")]
    for index in range(count):
        steps.append(AssistantStep(tool_calls=[ToolCall(id=f"c{index}", name="read", args={"flag": 1, "n": index})]))
        steps.append(ToolStep(tool_call_id=f"c{index}", content=f"bill {index}"))
    return steps


def test_the_very_steps_start_the_list() -> None:
    steps = _steps(20)
    assert same_start(steps[:10], steps)
    assert same_start([], steps)
    assert same_start(steps, list(steps))
    assert not same_start(steps, steps[:10])


@pytest.mark.parametrize("at", [0, 7, 19])
def test_a_step_that_only_compares_equal_is_a_mismatch(at: int) -> None:
    """`{"flag": True}` equals `{"flag": 1}` and renders as `true`: equality is not enough."""
    steps = _steps(10)
    swapped = list(steps)
    old = steps[at]
    if isinstance(old, AssistantStep):
        call = old.tool_calls[0]
        swapped[at] = old.model_copy(update={"tool_calls": [call.model_copy(update={"args": {**call.args, "flag": True}})]})
    else:
        swapped[at] = old.model_copy()
    assert swapped[at] == old and swapped[at] is not old
    assert not same_start(steps[:20], swapped)
    assert not continues(steps[:20], swapped)


def test_a_different_step_or_another_object_is_a_mismatch() -> None:
    steps = _steps(5)

    class Agreeable:
        """Equal to anything and after anything: it must not pass for a step."""

        def __eq__(self, other: object) -> bool:
            return True

        def __ge__(self, other: object) -> bool:
            return True

        __hash__ = object.__hash__

    for stranger in (ToolStep(content="other"), UserStep(content="Pay the bills."), Agreeable(), None, 1):
        changed = list(steps)
        changed[3] = stranger  # type: ignore[call-overload]
        assert not same_start(steps[:5], changed)


def test_a_step_subclass_may_not_compare_by_its_own_rule() -> None:
    with pytest.raises(TypeError, match="may not define __eq__"):

        class _Lenient(UserStep):
            def __eq__(self, other: object) -> bool:
                return True


def test_steps_compared_by_another_thread_meanwhile_compare_by_value() -> None:
    """Only the thread running the comparison takes a step comparison for a mismatch (a
    switch between threads may fall just before or after the list comparison)."""
    seen: list[bool] = []
    trajectory._COMPARING.active = True
    try:
        thread = threading.Thread(target=lambda: seen.append(UserStep(content="a") == UserStep(content="a")))
        thread.start()
        thread.join()
        with pytest.raises(trajectory._Distinct):
            _ = UserStep(content="a") == UserStep(content="a")
    finally:
        trajectory._COMPARING.active = False
    assert seen == [True]
    assert UserStep(content="a") == UserStep(content="a")


def test_only_plain_lists_are_compared() -> None:
    """A list subclass's own comparison (reflected first) would decide instead of the steps'."""
    steps = _steps(3)

    class Agreeing(list):  # type: ignore[type-arg]
        def __ge__(self, other: object) -> bool:
            return True

    changed = Agreeing(steps)
    changed[2] = ToolStep(content="other")
    assert not same_start(steps[:4], changed)
    assert not same_start(Agreeing(steps[:4]), steps)
    assert same_start(steps[:4], list(steps))


def test_a_fresh_copy_of_a_long_history_is_told_apart_without_comparing_values() -> None:
    """A conversation converted again into new step objects (equal ones) is a mismatch found
    at its first step, not after comparing every step's fields."""

    class Probe:
        compared = 0

        def __eq__(self, other: object) -> bool:
            Probe.compared += 1
            return isinstance(other, Probe)

        __hash__ = object.__hash__

    def history() -> list[AssistantStep]:
        return [AssistantStep(tool_calls=[ToolCall(id=f"c{index}", name="read", args={"probe": Probe()})]) for index in range(500)]

    earlier, fresh = history(), history()
    assert fresh == earlier and Probe.compared == 500
    Probe.compared = 0
    assert not same_start(earlier, [*fresh, UserStep(content="next")])
    assert Probe.compared == 0


def test_only_steps_of_the_step_classes_exactly_are_a_record() -> None:
    class Request(UserStep):
        """A caller's own step type: compared by `_StepModel`'s rule, yet kept out of records."""

    assert exact_steps(_steps(3))
    assert not exact_steps([*_steps(3), Request(content="x")])
    steps = _steps(3)
    assert not continues(steps[:4], [*steps, Request(content="x")])


@pytest.mark.parametrize("kind", ["soda", "gen"])
def test_a_history_holding_a_step_subclass_is_rendered_whole_every_turn(kind: str) -> None:
    """A record is made only of steps of the exact classes; a history with another kind is
    not remembered, so each turn renders it from the steps (equal to the reference)."""

    class Request(UserStep):
        pass

    judge = SodaJudge() if kind == "soda" else Qwen3GuardGenJudge(mode="response")
    steps: list[object] = [Request(content="Pay the bills.")]
    for index in range(6):
        steps += [AssistantStep(tool_calls=[ToolCall(id=f"c{index}", name="pay", args={"n": index})]), ToolStep(tool_call_id=f"c{index}", content=f"paid {index}")]
        trajectory = Trajectory.model_construct(steps=[*steps, AssistantStep(tool_calls=[ToolCall(id="x", name="pay", args={"all": True})])], conversation_id="run")
        if isinstance(judge, SodaJudge):
            harm = _pick(None, None)[0]
            expected = fit_conversation(conversation_steps(trajectory, judge.window), harm, harm, judge.budget, judge.window)[0]
            assert judge.render(trajectory).messages[1]["content"] == expected
            assert judge._shown.get("run") is None
        else:
            assert judge.fit(trajectory) == fit_gen_messages(trajectory, "response", judge.budget)
            assert judge._latest.get("run") is None
