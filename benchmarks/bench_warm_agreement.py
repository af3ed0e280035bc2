"""How often the prompt a warm-up prefills is the one the judgment then sends, up to the
action, on conversations past the judge's budget: there the judge leaves out as much of the
history as the action's length requires, so a warm-up rendered with a stand-in of another
length may leave out a message more or less, and a prefix cache serves the judgment only up
to that first difference (the rest is prefilled again). Compares the stand-in `Guard.warm_up`
renders (`awaiting_action`: a copy of the latest assistant turn) with an empty assistant turn,
in the same process on the same conversations: an agent reading results of a few hundred to
several thousand characters, with actions of varying length.

    python benchmarks/bench_warm_agreement.py [--turns 200] [--seeds 3] [--judge soda|gen]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

from soda_guard.judges.base import Judge
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge
from soda_guard.judges.soda import SodaJudge
from soda_guard.judging import awaiting_action
from soda_guard.trajectory import AssistantStep, ToolCall, ToolStep, Trajectory, UserStep

RESULT_SIZES = ((200, 600), (500, 4000), (2000, 12000))
TOOLS = ("read_email", "search_contacts", "send_money")
SAYS = ("", "Checking.", "Let me look at the next one before I pay anything.")


def _empty(trajectory: Trajectory) -> Trajectory:
    return trajectory.model_copy(update={"steps": [*trajectory.steps, AssistantStep()]})


def _history(rendered: object, judge: Judge) -> object:
    """The judged prompt up to the action: SODA's text before the last assistant block,
    Qwen3Guard-Gen's messages before the last."""
    messages = rendered.messages  # type: ignore[attr-defined]
    if isinstance(judge, SodaJudge):
        text = messages[-1]["content"]
        return text[: text.rindex("[ASSISTANT]\n")]
    return messages[:-1]


def agreement(make: Callable[[], Judge], sizes: tuple[int, int], turns: int, seed: int) -> tuple[int, int, int]:
    """(turns past the budget, of them those where the empty stand-in's prompt agrees with the
    judgment's up to the action, those where `awaiting_action`'s does)."""
    rnd = random.Random(seed)
    judge, empty_judge = make(), make()
    steps: list = [UserStep(content="Summarise my inbox and pay the bills that are due.")]
    past = empty = latest = 0
    for turn in range(turns):
        name = rnd.choice(TOOLS)
        action = AssistantStep(content=rnd.choice(SAYS), tool_calls=[ToolCall(id=f"c{turn}", name=name, args={"id": turn, "note": "x" * rnd.randint(0, 300)})])
        conversation = Trajectory(steps=list(steps), conversation_id="agreement")
        warm = judge.render(awaiting_action(conversation))
        warm_empty = empty_judge.render(_empty(conversation))
        judged = judge.render(Trajectory(steps=[*steps, action], conversation_id="agreement"))
        if judged.truncated:
            past += 1
            history = _history(judged, judge)
            latest += _history(warm, judge) == history
            empty += _history(warm_empty, judge) == history
        steps += [action, ToolStep(tool_call_id=f"c{turn}", name=name, content="Amount due: 10 EUR\n" * (rnd.randint(*sizes) // 19))]
    return past, empty, latest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--judge", choices=("soda", "gen"), default="soda")
    arguments = parser.parse_args()
    make = SodaJudge if arguments.judge == "soda" else (lambda: Qwen3GuardGenJudge(mode="response"))
    print(f"{'tool results (chars)':>21} {'turns past budget':>18} {'empty stand-in':>15} {'latest action':>14}")
    for sizes in RESULT_SIZES:
        past = empty = latest = 0
        for seed in range(arguments.seeds):
            counts = agreement(make, sizes, arguments.turns, seed)
            past, empty, latest = past + counts[0], empty + counts[1], latest + counts[2]
        shares = f"{empty / past:>15.2f} {latest / past:>14.2f}" if past else f"{'-':>15} {'-':>14}"
        print(f"{f'{sizes[0]}-{sizes[1]}':>21} {past:>18} {shares}")


if __name__ == "__main__":
    main()
