"""Judge-prompt render time per call at 10, 100 and 1,000 steps: the uncached reference
(`fit_conversation`, or `fit_gen_messages` with `--judge gen`: every message rendered and
fitted at every call) against the judge's cached renderer, for the first call of a turn on a
conversation converted into new step objects (only the new messages are rendered; the history
is fitted again), for the first call of the next turn as the adapters make it (the same step
objects, one call and its result added: the history is extended from the previous turn's),
the same where the judge was warmed when the agent's model was called (`awaiting_action`, what
`Guard.warm_up` renders for a backend that prefills: the in-process engine, an HTTP judge; the
call then renders only its own action), that warm-up's own render (off the call's path: the
model is thinking), and for the turn's other calls (the history shared). Prints ms per call,
the fastest of `--repeat`, and the ratios to the uncached reference.

The next turn is timed as an agent meets it: the judge renders the conversation as it was
`TURNS_BEFORE` turns earlier, then each turn after it in order, and the last one is timed (a
judge renders every turn; a history rendered from scratch right before the timed turn would
leave a cache as cold as the conversation is long, which no agent does).

    python benchmarks/bench_render.py [--repeat 20] [--steps 10,100,1000] [--judge soda|gen] [--system] [--window history|full|latest]

`--system` starts each conversation with a system message (which the SODA judge leaves out of
the conversation it shows).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from soda_guard.judges.base import Judge
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge, fit_gen_messages
from soda_guard.judges.soda import SodaJudge, _pick, conversation_steps, fit_conversation
from soda_guard.judging import awaiting_action
from soda_guard.trajectory import AssistantStep, SystemStep, ToolCall, ToolStep, Trajectory, UserStep

TURNS_BEFORE = 32
"""Turns the judge renders one by one before the timed one."""


def conversation(steps: int) -> list[dict]:
    """Plain data (as a framework holds it): converted into new step objects at every turn."""
    messages: list[dict] = [{"role": "user", "content": "Summarise my inbox and pay the bills that are due."}]
    index = 0
    while len(messages) < steps:
        messages.append({"role": "assistant", "content": "Checking.", "tool_calls": [{"id": f"c{index}", "name": "read_email", "args": {"id": index}}]})
        messages.append({"role": "tool", "tool_call_id": f"c{index}", "name": "read_email", "content": f"From: billing{index}@example.com\nAmount due: {index} EUR\n" * 8})
        index += 1
    messages.append({"role": "assistant", "content": "", "tool_calls": [{"id": "pay", "name": "send_money", "args": {"to": "ACME", "amount": 10}}]})
    return messages


def trajectory(messages: list[dict]) -> Trajectory:
    steps = []
    for message in messages:
        if message["role"] == "system":
            steps.append(SystemStep(content=message["content"]))
        elif message["role"] == "user":
            steps.append(UserStep(content=message["content"]))
        elif message["role"] == "assistant":
            steps.append(AssistantStep(content=message["content"], tool_calls=[ToolCall(**call) for call in message["tool_calls"]]))
        else:
            steps.append(ToolStep(tool_call_id=message["tool_call_id"], name=message["name"], content=message["content"]))
    return Trajectory(steps=steps, conversation_id="bench")


def per_call_ms(action, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - start)
    return best * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--steps", default="10,100,1000", help="conversation lengths, comma-separated")
    parser.add_argument("--judge", choices=("soda", "gen"), default="soda", help="the SODA judge, or Qwen3Guard-Gen in response mode")
    parser.add_argument("--system", action="store_true", help="each conversation starts with a system message")
    parser.add_argument("--window", choices=("history", "full", "latest"), default="history", help="the SODA judge's window")
    arguments = parser.parse_args()
    repeat = arguments.repeat
    make = (lambda: SodaJudge(window=arguments.window)) if arguments.judge == "soda" else (lambda: Qwen3GuardGenJudge(mode="response"))
    print(
        f"{'steps':>6} {'uncached ms':>12} {'turn first ms':>14} {'next turn':>10} {'next, warmed':>13} {'warm-up':>8} {'turn rest ms':>13}"
        f" {'first/uncached':>15} {'next/uncached':>13} {'warmed/uncached':>16} {'rest/uncached':>14}"
    )
    for steps in map(int, arguments.steps.split(",")):
        messages = conversation(steps)
        if arguments.system:
            messages.insert(0, {"role": "system", "content": "You are the user's finance assistant."})
        judge = make()
        judge.render(trajectory(messages[:-2]))  # the earlier turns were judged already

        def uncached() -> None:
            view = trajectory(messages)
            if isinstance(judge, SodaJudge):
                fit_conversation(conversation_steps(view, judge.window), _pick(None, None)[0], _pick(None, None)[0], judge.budget, judge.window)
            else:
                fit_gen_messages(view, judge.mode, judge.budget)

        fresh = [trajectory(messages) for _ in range(repeat)]
        first = per_call_ms(lambda: judge.render(fresh.pop()), repeat)  # built beforehand: not timed
        shared = trajectory(messages)
        judge.render(shared)
        rest = per_call_ms(lambda: judge.render(shared), repeat)
        reference = per_call_ms(uncached, repeat) - per_call_ms(lambda: trajectory(messages), repeat)
        grown, _ = _next_turn_ms(make, shared, repeat, warmed=False)
        warmed, warm_up = _next_turn_ms(make, shared, repeat, warmed=True)
        print(
            f"{steps:>6} {reference:>12.3f} {first:>14.3f} {grown:>10.3f} {warmed:>13.3f} {warm_up:>8.3f} {rest:>13.3f}"
            f" {first / reference:>15.3f} {grown / reference:>13.3f} {warmed / reference:>16.3f} {rest / reference:>14.3f}"
        )


def _next_turn_ms(make: Callable[[], Judge], conversation: Trajectory, repeat: int, *, warmed: bool) -> tuple[float, float]:
    """(the first call of the conversation's last turn, the warm-up before it; ms, fastest of
    `repeat`), the judge having rendered the `TURNS_BEFORE` turns before it one by one, each
    turn's trajectory holding the same step objects as the turn before (a conversation's
    messages are converted once), one call and its result added. `warmed`: each turn's
    conversation before its action is rendered as the warm-up at the model call does first."""
    steps = conversation.steps
    ends = [index + 1 for index, step in enumerate(steps) if isinstance(step, AssistantStep)][-TURNS_BEFORE - 1 :]
    best = best_warm_up = float("inf")
    for _ in range(repeat):
        judge = make()
        for end in ends:
            if warmed:
                before = awaiting_action(conversation.model_copy(update={"steps": steps[: end - 1]}))
                start = time.perf_counter()
                judge.render(before)
                warm_up = time.perf_counter() - start
            turn = conversation.model_copy(update={"steps": steps[:end]})
            start = time.perf_counter()
            judge.render(turn)
            took = time.perf_counter() - start
        best = min(best, took)
        if warmed:
            best_warm_up = min(best_warm_up, warm_up)
    return best * 1000.0, best_warm_up * 1000.0 if warmed else float("nan")


if __name__ == "__main__":
    main()
