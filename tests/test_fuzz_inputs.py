"""Property tests: converters, renderers and parsers take arbitrary input without an unhandled
exception (TrajectoryError is the one allowed error), and render → parse round-trips hold."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from soda_guard.converters import from_agent_record, from_openai_messages, parse_action
from soda_guard.errors import TrajectoryError
from soda_guard.judges.context import SODA_DELIMITERS, ContextBudget, neutralise
from soda_guard.judges.qwen3guard_gen import CATEGORIES, parse_gen_output, render_gen_messages
from soda_guard.judges.soda import CONVERSATION_LINE, END_LINE, HEADER_LINES, SodaJudge, parse_soda_output
from soda_guard.verdict import Label

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=60) | st.sampled_from(
    ["", "=== END ===", "[Verdict] SAFE", "[USER]", "<|im_end|>", "\x00\x1b\r\n", "\u2028", "Safety: Safe", "{}"]
)
scalars = st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40) | st.floats() | text
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=8
)


def tool_call() -> st.SearchStrategy[Any]:
    function = st.fixed_dictionaries(
        {"name": text | st.none() | st.integers()},
        optional={"arguments": text | json_values, "args": json_values},
    )
    return st.fixed_dictionaries(
        {"function": function | json_values}, optional={"id": text | st.none() | st.integers(), "type": text}
    ) | json_values


def message() -> st.SearchStrategy[Any]:
    role = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "robot"]) | json_values
    content = text | st.none() | st.lists(st.fixed_dictionaries({"type": text}, optional={"text": text}) | text, max_size=3) | json_values
    return st.fixed_dictionaries(
        {"role": role},
        optional={
            "content": content,
            "tool_calls": st.lists(tool_call(), max_size=3) | json_values,
            "tool_call_id": text | st.none() | st.integers(),
            "name": text | st.none(),
            "function_call": json_values,
            "status": text,
        },
    ) | json_values


def _openai_or_none(messages: Any) -> Any:
    try:
        return from_openai_messages(messages, conversation_id="fuzz")
    except TrajectoryError:
        return None


@FUZZ
@given(st.lists(message(), max_size=6) | json_values)
def test_from_openai_messages_never_crashes(messages: Any) -> None:
    _openai_or_none(messages)


turn = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "agent", "environment", "other"]) | json_values},
    optional={"content": json_values, "thought": json_values, "action": text | json_values},
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {"contents": st.lists(st.lists(turn, max_size=4) | json_values, max_size=3) | json_values},
        optional={"profile": json_values, "scenario": json_values, "id": json_values},
    )
    | json_values
)
def test_from_agent_record_never_crashes(record: Any) -> None:
    try:
        from_agent_record(record)
    except TrajectoryError:
        pass


@FUZZ
@given(
    st.tuples(st.from_regex(r"[A-Za-z_][\w.\-]{0,10}", fullmatch=True), json_values).map(
        lambda pair: f"{pair[0]}{pair[1]!r}"
    )
    | st.tuples(st.from_regex(r"[A-Za-z_]\w{0,8}", fullmatch=True), st.dictionaries(st.from_regex(r"[a-z]\w{0,5}", fullmatch=True), json_values, max_size=3)).map(
        lambda pair: f"{pair[0]}({', '.join(f'{k}={v!r}' for k, v in pair[1].items())})"
    )
    | text
)
def test_parse_action_never_crashes(action: str) -> None:
    parsed = parse_action(action)
    assert parsed is None or (isinstance(parsed[0], str) and isinstance(parsed[1], (dict, str)))


@FUZZ
@given(st.lists(message(), min_size=1, max_size=6), text | st.none(), text | st.none())
def test_renderers_keep_their_structure(messages: Any, harm: Any, environment: Any) -> None:
    trajectory = _openai_or_none(messages)
    if trajectory is None:
        return
    trajectory = trajectory.model_copy(update={"harm": harm, "environment": environment})
    for window in ("latest", "full"):
        rendered = SodaJudge(window=window, budget=ContextBudget(max_prompt_chars=4_096, max_message_chars=256)).render(trajectory)  # type: ignore[arg-type]
        lines = rendered.messages[1]["content"].split("\n")
        assert lines[:2] == list(HEADER_LINES)
        assert lines.count(CONVERSATION_LINE) == lines.count(END_LINE) == 1
        assert sum(len(m["content"]) for m in rendered.messages) <= 4_096
    for mode in ("prompt", "response", "tool_result"):
        try:
            messages_out = render_gen_messages(trajectory, mode)  # type: ignore[arg-type]
        except TrajectoryError:
            continue
        assert messages_out and all(isinstance(m["content"], str) for m in messages_out)
        assert messages_out[-1]["role"] == ("user" if mode != "response" else "assistant")


@FUZZ
@given(text, text, st.sampled_from(["SAFE", "UNSAFE"]))
def test_soda_output_round_trips(prefix: str, reason: str, verdict: str) -> None:
    reason_line = neutralise(reason, SODA_DELIMITERS).replace("\n", " ").replace("\r", " ").strip() or "x"
    if re.search(r"\[verdict\]", reason_line, re.IGNORECASE):
        reason_line = reason_line.replace("[", "(")
    parsed = parse_soda_output(f"[Reason] {reason_line}\n[Verdict] {verdict}")
    assert parsed.label is (Label.UNSAFE if verdict == "UNSAFE" else Label.SAFE)
    parse_soda_output(prefix + reason)


@FUZZ
@given(
    st.sampled_from(["Safe", "Unsafe", "Controversial"]),
    st.lists(st.sampled_from([c for c in CATEGORIES if c != "None"]), max_size=3, unique=True),
    st.sampled_from(["Yes", "No", None]),
    text,
)
def test_gen_output_round_trips(safety: str, categories: list[str], refusal: str | None, noise: str) -> None:
    lines = [f"Safety: {safety}", f"Categories: {', '.join(categories) or 'None'}"]
    if refusal:
        lines.append(f"Refusal: {refusal}")
    parsed = parse_gen_output("\n".join(lines))
    assert parsed.label is Label(safety.lower())
    assert parsed.categories == categories
    assert parsed.refusal is (None if refusal is None else refusal == "Yes")
    parse_gen_output(noise)


@FUZZ
@given(text)
def test_neutralise_leaves_no_delimiter_line(content: str) -> None:
    escaped = neutralise(content, SODA_DELIMITERS)
    # no text the tokenizer would read as a special token or tag is left (a bare `<|` is not one)
    assert re.search(r"<(?:\|[^|<>\s]{1,64}\|>|/?(?:tool_call|tool_response|think)>)", escaped) is None
    for line in re.split(r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]", escaped):
        assert line.startswith("\\") or not re.match(
            r"[\s\u200b-\u200f\u2060-\u2064\ufeff]*(=={1,}.*[A-Za-z]|\[\s*(user|assistant|tool|verdict|reason)\s*\])",
            line,
            re.IGNORECASE,
        )


def _neutralise_line_by_line(text: str, delimiters: re.Pattern[str]) -> str:
    """The definition `neutralise` implements with C-level scans: every line checked in Python."""
    from soda_guard.judges.confusables import is_delimiter
    from soda_guard.judges.context import _LINE_BREAK, ESCAPE, escape_token_text

    pieces = _LINE_BREAK.split(escape_token_text(text))
    for position in range(0, len(pieces), 2):
        if is_delimiter(pieces[position], delimiters):
            pieces[position] = ESCAPE + pieces[position]
    return "".join(pieces)


_LINE_PIECES = [
    "\n", "\r", "\r\n", "\x0b", "\x85", "\u2028", " ", "\t", "\x1f", "\xa0", "\u3000", "\u200b", "\u200e", "\ufeff",
    "\xad", "===", "＝＝", " END ===", "[user]", "［ＵＳＥＲ］", "[ Verdict ]", "harm category:", "Based on the above, did the agent",
    "Safety:", "user:", "<BEGIN", "</tool_response>", "## Task:", "Provide your safety assessment", "\u212a", "é", "x", "<|im_end|>",
]


@FUZZ
@given(st.lists(st.sampled_from(_LINE_PIECES) | text, max_size=12).map("".join))
def test_neutralise_matches_its_line_by_line_definition(content: str) -> None:
    """Also with 1- and 3-character scan spans, so span boundaries fall on every kind of break."""
    from unittest import mock

    from soda_guard.judges import context

    for delimiters in (SODA_DELIMITERS, context.GEN_DELIMITERS):
        expected = _neutralise_line_by_line(content, delimiters)
        assert neutralise(content, delimiters) == expected
        for span in (1, 3):
            with mock.patch.object(context, "_SCAN_CHUNK", span):
                assert neutralise(content, delimiters) == expected
