"""Time from the agent model's response to the guard's decision, with and without warming the
judge while the model thinks (`Guard.warm_up`), on conversations whose last tool result is
500, 2,000 and 8,000 tokens.

Both runs have judged the conversation's earlier turn already (its prompt is in the prefix
cache, as in a real agent loop); then a long tool result arrives. Without warming the judgment
prefills the tool result and the action; with warming (done while the model "thinks", waited
for here so the measurement starts when the model has answered) only the action. A small random
Qwen3 on CPU (4 layers, hidden 512, byte tokens by default), greedy, 24 new tokens (a SODA reason
and verdict are about that long in Qwen3's tokens); runs alternate cold and warm, each on a fresh conversation, and the median is
printed with the ratio warm/cold and the tokens each judgment had to prefill.

The last two columns are the floor no warm-up can go under: the same judgment asked of the
backend again once its whole prompt is cached (one token to prefill, then the 24 steps that
write the verdict), and that floor over cold. What warming leaves above the floor is the
action and the prompt's closing lines, which come with the model's response.

`--tokenizer qwen3-cut` counts tokens as the SODA judge does: Qwen3's own tokenizer cut to its
first 2,000 merges (`soda_guard.testing.cut_tokenizer`, from the shared fixture), so a tool
result of 2,000 tokens is about 2,600 bytes of it and the action and closing lines are 85 tokens,
not 219 (Qwen3 itself: 63); byte tokens understate what warming saves, since the action is the
part it cannot remove. The model is the same but for its 2,282-row output layer.

`--device cuda` (what `benchmarks/gpu.sh` runs) judges with a random model of Qwen3-4B's shape
in bfloat16 and, where the shared fixture is present, the real Qwen3 tokenizer: on a GPU the 24
decode steps are most of a judgment, and this says how much of it warming still removes.

Then a judgment of one conversation arriving while the judge prefills a warm-up of another's
8,000-token tool result (`--behind`): the warm-up stops at its next 512-token chunk for it,
against a warm-up prefilled in one piece (as before it was cut), alternating.

    python benchmarks/bench_warmup.py [--repeat 3] [--sizes 500,2000,8000] [--behind 8000] [--device cpu|cuda]
                                      [--tokenizer bytes|qwen3-cut]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from transformers import Qwen3ForCausalLM

from soda_guard import Guard, Policy, from_openai_messages
from soda_guard.backends.transformers_backend import TransformersBackend
from soda_guard.bench.judging import build_model
from soda_guard.testing import cut_tokenizer, load_test_tokenizer, shared_tokenizer_dir, tiny_qwen3_config
from soda_guard.trajectory import AssistantStep, ToolCall, Trajectory

SIZES = (500, 2000, 8000)
CUT_MERGES = 2000
"""Qwen3's merges `--tokenizer qwen3-cut` keeps."""
ARRIVAL_S = 0.05
"""How long into the other conversation's warm-up the judgment arrives (`--behind`)."""


def tool_result(tokenizer: Any, tokens: int) -> str:
    line = "2026-11-03 transfer 1,250.00 EUR to DE89 3704 0044 0532 0130 00 approved\n"
    per_line = len(tokenizer(line, add_special_tokens=False)["input_ids"])
    return line * max(1, tokens // per_line)


def conversation(tag: str, result: str) -> tuple[Trajectory, Trajectory, Trajectory]:
    """(the earlier turn, judged before, the history when the model is called, the history
    with the model's new action)."""
    messages: list[dict[str, Any]] = [
        # the tag first: a conversation shares no tokens with the earlier ones, whose cache
        # entries would otherwise serve it (the prefix cache is shared across conversations)
        {"role": "user", "content": f"[{tag}] Reconcile last month's transfers and pay what is still open."},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "a", "function": {"name": "list_transfers", "arguments": '{"month": "2026-11"}'}}]},
    ]
    earlier = from_openai_messages(messages, conversation_id=tag)
    history = from_openai_messages([*messages, {"role": "tool", "tool_call_id": "a", "content": result}], conversation_id=tag)
    action = AssistantStep(content="Paying the open one.", tool_calls=[ToolCall(id="b", name="send_money", args={"iban": "DE89", "amount": 1250})])
    return earlier, history, history.model_copy(update={"steps": [*history.steps, action]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="last tool results in tokens, comma-separated")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--behind", type=int, default=8000, help="tool result of the warm-up another judgment arrives behind, in tokens (0: skip)")
    parser.add_argument("--tokenizer", choices=("bytes", "qwen3-cut"), default="bytes", help="on CPU: byte tokens, or Qwen3's cut to its first merges")
    arguments = parser.parse_args()
    repeat = arguments.repeat
    model, tokenizer = _model(arguments.device, arguments.tokenizer)
    backend = TransformersBackend.from_model(model, tokenizer, model_id="tiny-bench", ignore_eos=True, max_wait_ms=0.0)
    policy = Policy.from_dict({"judges": {"soda": {"kind": "soda", "model": "tiny-bench", "max_new_tokens": 24}}, "defaults": {"timeout_s": 120}})
    guard = Guard(policy, backends={"soda": backend})
    guard.load()
    print(f"{'last tool result':>17} {'cold ms':>9} {'warm ms':>9} {'warm/cold':>10} {'prefilled cold':>15} {'prefilled warm':>15}"
          f" {'floor ms':>9} {'floor/cold':>11}")
    for size in map(int, arguments.sizes.split(",")):
        result = tool_result(tokenizer, size)
        times: dict[bool, list[float]] = {False: [], True: []}
        prefilled: dict[bool, list[int]] = {False: [], True: []}
        floors: list[float] = []
        for run in range(repeat * 2):
            warm = run % 2 == 1
            earlier, history, judged = conversation(f"{size}-{run}", result)
            guard.check(earlier)  # the previous judgment of this conversation
            if warm:
                _warmed(guard.warm_up(history))
            before = backend.stats.prefilled_tokens
            start = time.perf_counter()
            decision = guard.check_tool_calls(judged)[0]
            times[warm].append((time.perf_counter() - start) * 1000.0)
            prefilled[warm].append(backend.stats.prefilled_tokens - before)
            # random weights write no verdict: what must hold is that the whole output was made
            assert decision.verdict is not None and decision.verdict.generated_tokens == 24, decision.why
            if warm:
                request = guard.runner("soda").prepare(judged)[1]
                start = time.perf_counter()
                backend.generate([request])
                floors.append((time.perf_counter() - start) * 1000.0)
        cold, warm_ms = statistics.median(times[False]), statistics.median(times[True])
        tokens = f"{statistics.median(prefilled[False]):>15.0f} {statistics.median(prefilled[True]):>15.0f}"
        floor = statistics.median(floors)
        print(f"{size:>11} tokens {cold:>9.1f} {warm_ms:>9.1f} {warm_ms / cold:>10.3f} {tokens} {floor:>9.1f} {floor / cold:>11.3f}")
    if arguments.behind:
        _behind_a_warm_up(guard, backend, tokenizer, arguments.behind, repeat)
    guard.close()
    backend.close()


def _warmed(started: Any) -> None:
    """Wait for a warm-up (`Guard.warm_up`'s future) to be over, rendered and prefilled."""
    assert started is not None
    for queued in started.result():
        if queued is not None:
            queued.result()


def _behind_a_warm_up(guard: Guard, backend: TransformersBackend, tokenizer: Any, size: int, repeat: int) -> None:
    """A judgment of one conversation arriving while the judge prefills a warm-up of another
    conversation's long tool result (`size` tokens), `ARRIVAL_S` after it began: the warm-up
    stops at its next chunk's end
    (`Engine._warm`), against a warm-up prefilled in one piece, as it was before, alternating.
    The judged conversation was warmed already, so its judgment alone would take the "warm ms"
    of the table above."""
    result, short = tool_result(tokenizer, size), tool_result(tokenizer, 500)
    chunk = backend.engine.warm_up_chunk_tokens
    times: dict[bool, list[float]] = {False: [], True: []}
    for run in range(repeat * 2):
        cut = run % 2 == 1
        backend.engine.warm_up_chunk_tokens = chunk if cut else len(result) * 8
        other_earlier, other_history, _ = conversation(f"other-{size}-{run}", result)
        earlier, history, judged = conversation(f"judged-{size}-{run}", short)
        guard.check(other_earlier)
        guard.check(earlier)
        _warmed(guard.warm_up(history))
        batches = backend.stats.batches
        started = guard.warm_up(other_history)  # the other agent's model is thinking
        while backend.stats.batches == batches:  # until that warm-up is in the engine's hands
            time.sleep(0.0005)
        time.sleep(ARRIVAL_S)
        start = time.perf_counter()
        guard.check_tool_calls(judged)
        times[cut].append((time.perf_counter() - start) * 1000.0)
        _warmed(started)
    whole, cut_ms = statistics.median(times[False]), statistics.median(times[True])
    print(f"a judgment arriving during another conversation's warm-up of {size} tokens: "
          f"{whole:.1f} ms behind a warm-up in one piece, {cut_ms:.1f} ms behind one cut at {chunk}-token chunks ({cut_ms / whole:.2f}x)")
    backend.engine.warm_up_chunk_tokens = chunk


def _model(device: str, kind: str = "bytes") -> tuple[Any, Any]:
    if device == "cuda":
        model, tokenizer, name = build_model(torch.device("cuda"), real_tokenizer=shared_tokenizer_dir() is not None)
        print(f"{torch.cuda.get_device_name()}: {name}")
        return model, tokenizer
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    if kind == "bytes":
        tokenizer = load_test_tokenizer()  # bytes: a small vocabulary, so the output layer does not hide the prefill
    else:
        folder = shared_tokenizer_dir()
        if folder is None:
            raise SystemExit("--tokenizer qwen3-cut needs the Qwen3 tokenizer fixture (../shared/fixtures/qwen3-tokenizer)")
        tokenizer = cut_tokenizer(folder, CUT_MERGES)
    config = tiny_qwen3_config(len(tokenizer), hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8, head_dim=64)
    return Qwen3ForCausalLM(config).eval(), tokenizer


if __name__ == "__main__":
    main()
