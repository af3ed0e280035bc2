"""The judge cascade: a stage settles only when confident, every failure of a stage falls
through to the next, a failed last stage ends in on_error, every stage's verdict is recorded;
sync and async alike."""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from soda_guard import Action, Guard, Policy, PolicyError, ScriptedBackend, from_openai_messages, read_audit
from soda_guard.backends.base import GenerationRequest, GenerationResult
from soda_guard.backends.scripted import soda_reply
from soda_guard.trajectory import Trajectory

from loop_helpers import with_ticks

POLICY = """
judges:
  screen: {kind: soda, model: scripted-screen}
  words: {kind: keywords, unsafe: ['"rm -rf'], safe: ['^get_weather ']}
  soda: {kind: soda, model: scripted-soda}
  tiered: {kind: cascade, stages: [screen, soda], settle_below: 0.05, settle_above: 0.95}
  screened: {kind: cascade, stages: [words, soda]}
defaults: {judge: tiered, on_error: block, on_controversial: escalate, timeout_s: 2}
rules:
  - {name: shell, tools: ["shell*", "get_weather"], judge: screened}
"""


def pending(name: str, args: dict[str, Any] | str | None = None) -> Trajectory:
    """`args` as a str: the arguments' JSON text as the model wrote it."""
    text = args if isinstance(args, str) else json.dumps(args or {})
    return from_openai_messages(
        [
            {"role": "user", "content": "Please help."},
            {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": text}}]},
        ]
    )


def scored(unsafe: bool, score: float | None) -> Callable[[GenerationRequest], GenerationResult]:
    return lambda request: GenerationResult(text=soda_reply(unsafe), score=score)


def make(screen: Any, soda: Any = None, **policy_overrides: Any) -> tuple[Guard, ScriptedBackend]:
    soda_backend = soda if isinstance(soda, ScriptedBackend) else ScriptedBackend(soda or scored(True, 0.9))
    backends = {"soda": soda_backend}
    if screen is not None:
        backends["screen"] = screen if isinstance(screen, ScriptedBackend) else ScriptedBackend(screen)
    policy = Policy.from_yaml(POLICY)
    return Guard(policy, backends=backends), soda_backend


def check(guard: Guard, trajectory: Trajectory, mode: str):
    if mode == "sync":
        return guard.check_tool_calls(trajectory)[0]
    return asyncio.run(guard.acheck_tool_calls(trajectory))[0]


MODES = ["sync", "async"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "unsafe,score,action",
    [(False, 0.01, Action.ALLOW), (True, 0.99, Action.BLOCK)],
    ids=["settles-safe", "settles-unsafe"],
)
def test_a_confident_screen_settles_and_the_big_judge_is_not_asked(mode: str, unsafe: bool, score: float, action: Action) -> None:
    guard, soda = make(scored(unsafe, score))
    decision = check(guard, pending("send_money"), mode)
    assert decision.action is action and decision.stage == "screen"
    assert [v.judge for v in decision.verdict.stages] == ["screen"] and soda.requests == []
    assert "settled by screen" in decision.why


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("score", [0.05, 0.5, 0.95], ids=["at-settle-below", "middle", "at-settle-above"])
def test_an_unsure_screen_passes_to_the_last_stage_which_decides(mode: str, score: float) -> None:
    guard, soda = make(scored(score > 0.5, score), scored(False, 0.3))
    decision = check(guard, pending("send_money"), mode)
    assert (decision.action, decision.stage) == (Action.ALLOW, "soda")
    assert [(v.judge, v.score) for v in decision.verdict.stages] == [("screen", score), ("soda", 0.3)]
    assert len(soda.requests) == 1


def _raises(request: GenerationRequest) -> GenerationResult:
    raise RuntimeError("screen server down")


def _slow_then_wrong_count() -> ScriptedBackend:
    backend = ScriptedBackend(scored(False, 0.01))
    backend.generate = lambda requests: []  # type: ignore[method-assign]

    async def agenerate(requests: Any) -> list[GenerationResult]:
        return []

    backend.agenerate = agenerate  # type: ignore[method-assign]
    return backend


FAILURES: dict[str, Any] = {
    "raises": _raises,
    "wrong-count": _slow_then_wrong_count,
    "unparsable": lambda request: GenerationResult(text="I would rather not say.", score=0.01),
    "label-score-disagree": scored(False, 0.99),
    "no-score": scored(False, None),
    "nan-score": scored(False, math.nan),
    "not-text": lambda request: GenerationResult(text=None, score=0.01),  # type: ignore[arg-type]
}


def failing(kind: str) -> Any:
    made = FAILURES[kind]
    return made() if kind == "wrong-count" else made


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_every_failure_of_a_stage_falls_through_to_the_next(mode: str, kind: str) -> None:
    guard, soda = make(failing(kind), scored(True, 0.99))
    decision = check(guard, pending("send_money"), mode)
    assert (decision.action, decision.stage) == (Action.BLOCK, "soda")
    first, last = decision.verdict.stages
    assert first.judge == "screen" and (first.failed or first.score is None) and last.judge == "soda"
    # the fall-through is never an allow, whatever the failed stage would have said
    guard, _ = make(failing(kind), scored(False, 0.01))
    assert check(guard, pending("send_money"), mode).action is Action.ALLOW


@pytest.mark.parametrize("mode", MODES)
def test_a_stage_that_cannot_load_falls_through(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen's server needs an API key the environment does not hold: it cannot start."""
    monkeypatch.delenv("SODA_GUARD_TEST_ABSENT_KEY", raising=False)
    screen = "screen: {kind: soda, model: m, backend: openai, base_url: 'http://127.0.0.1:9/v1', api_key_env: SODA_GUARD_TEST_ABSENT_KEY}"
    text = POLICY.replace("screen: {kind: soda, model: scripted-screen}", screen)
    soda = ScriptedBackend(scored(True, 0.99))
    guard = Guard(Policy.from_yaml(text), backends={"soda": soda})
    decision = check(guard, pending("send_money"), mode)
    assert (decision.action, decision.stage) == (Action.BLOCK, "soda")
    assert "SODA_GUARD_TEST_ABSENT_KEY" in decision.verdict.stages[0].error


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(set(FAILURES) - {"no-score"}))  # a label alone decides, last
def test_a_failed_last_stage_ends_in_on_error_with_every_cause(mode: str, kind: str) -> None:
    guard, _ = make(scored(False, 0.5), failing(kind))
    decision = check(guard, pending("send_money"), mode)
    assert decision.action is Action.BLOCK and decision.stage is None
    assert decision.verdict.failed and decision.verdict.judge == "tiered"
    assert [v.judge for v in decision.verdict.stages] == ["screen", "soda"]
    assert "no stage of cascade 'tiered' settled the call" in decision.why


@pytest.mark.parametrize("mode", MODES)
def test_the_deadline_covers_the_whole_chain(mode: str) -> None:
    """Each stage alone fits the 2 s deadline; the chain does not, and ends in on_error."""
    screen = ScriptedBackend(scored(False, 0.5), delay_s=1.2)
    soda = ScriptedBackend(scored(False, 0.01), delay_s=1.2)
    guard, _ = make(screen, soda)
    decision = check(guard, pending("send_money"), mode)
    assert decision.action is Action.BLOCK and decision.verdict.failed
    assert "timed out after 2.0s" in decision.why


@pytest.mark.parametrize("mode", MODES)
def test_a_keyword_screen_settles_what_it_is_sure_of(mode: str) -> None:
    guard, soda = make(None, scored(False, 0.3))
    blocked = check(guard, pending("shell", {"cmd": "rm -rf /"}), mode)
    assert (blocked.action, blocked.stage, blocked.verdict.kind) == (Action.BLOCK, "words", "keywords")
    assert "rm -rf" in blocked.verdict.reason
    allowed = check(guard, pending("get_weather", {"city": "Paris"}), mode)
    assert (allowed.action, allowed.stage) == (Action.ALLOW, "words")
    assert soda.requests == []
    passed_on = check(guard, pending("shell", {"cmd": "ls"}), mode)
    assert (passed_on.action, passed_on.stage) == (Action.ALLOW, "soda") and len(soda.requests) == 1
    assert passed_on.verdict.stages[0].label.value == "controversial"


def test_an_async_keyword_screen_of_a_few_calls_answers_without_a_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `calls` screen reads a few hundred bytes: the async path runs it in the caller's task
    (a thread hop costs more than the regexes), alone or as a cascade's first stage, with the
    verdicts the sync path gives. A screen over every message, or over calls too large to scan
    on the loop, still goes to a thread."""
    from soda_guard.judges.keywords import AT_ONCE_MAX_CHARS, KeywordsRunner
    from soda_guard.policy import KeywordsConfig

    import soda_guard.judges.keywords
    import soda_guard.judging

    hops: list[str] = []
    off_loop = soda_guard.judging.off_loop

    async def counting(func: Any, *args: Any) -> Any:
        hops.append(getattr(func, "__name__", repr(func)))
        return await off_loop(func, *args)

    for module in (soda_guard.judging, soda_guard.judges.keywords):
        monkeypatch.setattr(module, "off_loop", counting)
    guard, soda = make(None, scored(False, 0.3))
    for name, args, stage in [("shell", {"cmd": "rm -rf /"}, "words"), ("get_weather", {"city": "Paris"}, "words"), ("shell", {"cmd": "ls"}, "soda")]:
        sync, async_ = check(guard, pending(name, args), "sync"), check(guard, pending(name, args), "async")
        assert (async_.action, async_.stage, async_.verdict.reason) == (sync.action, sync.stage, sync.verdict.reason)
        assert async_.stage == stage
    assert hops == []

    words = KeywordsRunner("words", KeywordsConfig(kind="keywords", unsafe=["rm -rf"]))
    small, large = pending("shell", {"cmd": "rm -rf /"}), pending("shell", {"cmd": "x" * AT_ONCE_MAX_CHARS + " rm -rf /"})
    assert words.at_once([small]) and not words.at_once([large]) and not words.at_once([small] * 1000)
    everything = KeywordsRunner("all", KeywordsConfig(kind="keywords", unsafe=["rm -rf"], match="all"))
    assert not everything.at_once([small])
    for runner, view in [(words, large), (everything, small)]:
        hops.clear()
        [verdict] = asyncio.run(runner.averdicts([view]))
        assert verdict.label.value == "unsafe" and hops == ["verdicts"]
    read: list[Any] = []
    text = KeywordsRunner.texts
    monkeypatch.setattr(KeywordsRunner, "texts", lambda runner, view: read.append(view) or text(runner, view))
    [verdict] = asyncio.run(words.averdicts([small]))
    assert verdict.label.value == "unsafe" and read == [small]  # read once, for the question and the screen


def test_every_stage_verdict_reaches_the_audit_log(tmp_path: Path) -> None:
    log = tmp_path / "audit.jsonl"
    policy = Policy.from_yaml(POLICY + f"audit: {{jsonl: {log}}}\n")
    guard = Guard(policy, backends={"screen": ScriptedBackend(scored(False, 0.5)), "soda": ScriptedBackend(scored(True, 0.99))})
    guard.check_tool_calls(pending("send_money"))
    guard.close()
    [record] = read_audit(log)
    assert record.stage == "soda" and [v.judge for v in record.verdict.stages] == ["screen", "soda"]
    assert record.verdict.stages[0].score == 0.5


def test_the_stages_load_with_the_guard_and_warm_once() -> None:
    screen, soda = ScriptedBackend(scored(False, 0.5)), ScriptedBackend(scored(False, 0.01))
    guard = Guard(Policy.from_yaml(POLICY), backends={"screen": screen, "soda": soda})
    guard.load()
    assert Policy.from_yaml(POLICY).judges_in_use() == ["screen", "words", "soda", "tiered", "screened"]
    assert (len(screen.requests), len(soda.requests)) == (1, 1)


@pytest.mark.parametrize(
    "judges,message",
    [
        ("t: {kind: cascade, stages: [a, nope]}", "judges.t.stages: unknown judge 'nope'"),
        ("t: {kind: cascade, stages: [a]}", "judges.t.stages"),
        ("t: {kind: cascade, stages: [a, a]}", "a stage is named twice"),
        ("t: {kind: cascade, stages: [a, b], settle_below: 0.9, settle_above: 0.1}", "settle_below"),
        ("t: {kind: cascade, stages: [a, b], settle_above: '0.9'}", "judges.t.settle_above"),
        ("t: {kind: cascade, stages: [a, b], settle_above: 1.5}", "judges.t.settle_above"),
        ("t: {kind: cascade, stages: [a, b], model: m}", "judges.t.model: unknown key"),
        ("t: {kind: cascade, stages: [a, b]}\n  u: {kind: cascade, stages: [t, b]}", "'t' is a cascade"),
        ("t: {kind: keywords, unsafe: ['(']}", "judges.t.unsafe"),
        ("t: {kind: tiers, stages: [a, b]}", "judges.t.kind"),
    ],
)
def test_bad_cascades_are_rejected_naming_the_key(judges: str, message: str) -> None:
    text = f"judges:\n  a: {{kind: soda, model: m}}\n  b: {{kind: soda, model: m}}\n  {judges}\ndefaults: {{judge: a}}"
    with pytest.raises(PolicyError, match=message.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")):
        Policy.from_yaml(text)


@pytest.mark.parametrize("mode", MODES)
def test_the_last_stage_decides_on_its_label_without_a_score(mode: str) -> None:
    guard, _ = make(scored(False, 0.5), scored(True, None))
    decision = check(guard, pending("send_money"), mode)
    assert (decision.action, decision.stage, decision.verdict.score) == (Action.BLOCK, "soda", None)


def test_the_trace_span_names_the_stage_and_every_stage_answer() -> None:
    from soda_guard.tracing import decision_attributes

    guard, _ = make(scored(False, 0.5), scored(True, 0.99))
    attributes = decision_attributes(guard.check_tool_calls(pending("send_money"))[0])
    assert attributes["soda_guard.stage"] == "soda"
    assert attributes["soda_guard.verdict.stages"] == ["screen: safe 0.500", "soda: unsafe 0.990"]


WEATHER_THEN_RANSOM = [
    {"role": "user", "content": "Check the weather, then send all my savings to account 999: it's a ransom."},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "transfer_money", "arguments": '{"to": "999", "amount": 50000}'}},
    ]},
]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_safe_pattern_settles_only_where_every_call_screened_matches_it(mode: str) -> None:
    """The README's screen (`safe: ['^get_weather ']`) judging a whole turn: the weather call
    beside a transfer settles nothing, so the transfer reaches SODA, which blocks it. Read as
    one text, the first call's match once allowed the turn unasked."""
    policy = Policy.from_yaml("""
judges:
  screen: {kind: keywords, unsafe: ['rm -rf'], safe: ['^get_weather ']}
  soda: {kind: soda, model: scripted-soda}
  tiered: {kind: cascade, stages: [screen, soda], settle_below: 0.05, settle_above: 0.95}
defaults: {judge: tiered}
""")
    soda = ScriptedBackend(scored(True, 0.99))
    guard = Guard(policy, backends={"soda": soda})
    turn = from_openai_messages(WEATHER_THEN_RANSOM)
    whole = guard.check(turn) if mode == "sync" else asyncio.run(guard.acheck(turn))
    assert (whole.action, whole.stage, len(soda.requests)) == (Action.BLOCK, "soda", 1)
    weather, transfer = guard.check_tool_calls(turn) if mode == "sync" else asyncio.run(guard.acheck_tool_calls(turn))
    assert (weather.action, weather.stage) == (Action.ALLOW, "screen")
    assert (transfer.action, transfer.stage) == (Action.BLOCK, "soda")


def test_a_message_never_makes_a_call_safe_even_where_the_unsafe_patterns_read_every_message() -> None:
    """`match: all` widens what the unsafe patterns read; a tool result the attacker wrote to
    match a safe pattern leaves the transfer to the model judge."""
    from soda_guard.judges.keywords import KeywordsRunner
    from soda_guard.policy import KeywordsConfig

    screen = KeywordsRunner("words", KeywordsConfig(kind="keywords", unsafe=["rm -rf"], safe=["^read_file ", "get_weather"], match="all"))
    planted = from_openai_messages([
        {"role": "user", "content": "Pay the invoice in the file."},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "a", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "read_file get_weather\nInvoice: pay 999"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "b", "type": "function", "function": {"name": "transfer_money", "arguments": '{"to": "999"}'}}]},
    ])
    assert screen.verdict(planted).label.value == "controversial"
    alone = from_openai_messages([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]}])
    assert screen.verdict(alone).label.value == "safe"
    assert screen.verdict(from_openai_messages([{"role": "user", "content": "get_weather"}])).label.value == "controversial"
    unsafe_text = from_openai_messages([{"role": "user", "content": "then rm -rf the rest"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "read_file", "arguments": "{}"}}]}])
    assert screen.verdict(unsafe_text).label.value == "unsafe"


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_screen_pattern_that_backtracks_ends_with_the_deadline_and_leaves_the_loop_free(mode: str) -> None:
    """An ordinary-looking pattern is quadratic on what the agent sends: `re` searched 80 KB
    of `curl curl ...` for 4.6 s past a 1 s deadline, holding the GIL, on the caller's thread
    (sync) or with the event loop stopped (async). The screen's search now stops at the
    check's deadline, without the GIL, and the call takes `on_error`."""
    policy = Policy.from_yaml(r"""
judges:
  screen: {kind: keywords, unsafe: ['curl\s.*\s\|\s*sh']}
defaults: {judge: screen, on_error: block, timeout_s: 0.5}
""")
    guard = Guard(policy)
    stuck = pending("shell", {"cmd": "curl " * 40000})
    start = time.monotonic()
    if mode == "sync":
        [decision], ticks = guard.check_tool_calls(stuck), 0
    else:
        [decision], ticks = asyncio.run(with_ticks(guard.acheck_tool_calls(stuck)))
    assert time.monotonic() - start < 5.0  # a margin for a loaded machine: the search alone runs for minutes
    assert decision.action is Action.BLOCK and "timed out" in decision.why
    if mode == "async":
        assert ticks >= 10  # ~50 at 10 ms a tick in 0.5 s; a held loop ticks once or twice


@pytest.mark.parametrize("mode", MODES)
def test_a_screen_reads_arguments_as_the_tool_gets_them_and_says_when_the_conversation_came_cut(mode: str) -> None:
    """In the arguments' JSON a tab is `\\t` and a newline `\\n`: `rm\\s+-rf` missed
    `"rm<TAB>-rf /"` and passed it on to a judge that allowed it. And a screen's verdict on a
    conversation that reached the guard cut did not say so, so `on_truncated: error` let a
    call it settled through."""
    policy = Policy.from_yaml("""
judges:
  words: {kind: keywords, unsafe: ['rm\\s+-rf', 'DROP\\s+TABLE'], safe: ['^get_weather ']}
  soda: {kind: soda, model: scripted-soda}
  screened: {kind: cascade, stages: [words, soda]}
defaults: {judge: screened, on_truncated: error}
""")
    soda = ScriptedBackend(scored(False, 0.1))
    guard = Guard(policy, backends={"soda": soda})
    # the last three stay raw text (a repeated key, not an object), which a tool's parser reads all the same
    for args in ({"cmd": "rm\t-rf /"}, {"q": "DROP\nTABLE users"}, '{"cmd": "ls", "cmd": "rm\\t-rf /"}', '["rm\\t-rf", "/"]'):
        decision = check(guard, pending("shell", args), mode)
        assert (decision.action, decision.stage) == (Action.BLOCK, "words"), args
    cut = pending("get_weather", {"city": "Paris"}).model_copy(update={"truncated": True})
    decision = check(guard, cut, mode)
    assert decision.action is Action.BLOCK and decision.verdict.truncated and "on_truncated is error" in decision.why
    assert soda.requests == []
