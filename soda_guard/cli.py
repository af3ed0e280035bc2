"""The `soda-guard` command line: dry-run prompts, judge a conversation, and the subcommands
the other modules register (bench, eval).

Exit codes are part of the interface so shell pipelines can gate on them: 0 allow, 1 block or
escalate, 2 usage or load error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer

from soda_guard.bench.cli import register as register_bench
from soda_guard.eval.cli import register as register_eval
from soda_guard.converters import from_openai_messages
from soda_guard.errors import ModelLoadError, PolicyError, TrajectoryError
from soda_guard.guard import Guard
from soda_guard.judges.base import Judge
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge
from soda_guard.judges.soda import SodaJudge
from soda_guard.policy import Policy, resolve_policy
from soda_guard.trajectory import Trajectory

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Guard tool-calling agents with local safety judges. Exit codes: 0 allow, 1 block or escalate, 2 usage or load error.",
)

JudgeKind = typer.Option("soda", "--judge", help="soda or qwen3guard (with --policy: a judge name)")
Window = typer.Option(
    "history",
    "--window",
    help="latest: from the latest user request on; history: plus earlier requests and tool outputs; full: everything",
)


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"soda-guard: {message}", err=True)
    return typer.Exit(code)


def read_conversation(path: str) -> Trajectory:
    """FILE is `{"messages": [...], "harm"?, "environment"?}` or a bare list of messages."""
    try:
        raw = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        data: Any = json.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise fail(f"cannot read {path}: {error}") from None
    except RecursionError:
        raise fail(f"cannot read {path}: JSON nested too deeply") from None
    fields: dict[str, Any] = {}
    if isinstance(data, dict):
        fields = {key: data.get(key) for key in ("harm", "environment", "conversation_id")}
        data = data.get("messages")
    try:
        return from_openai_messages(data, **fields)
    except TrajectoryError as error:
        raise fail(f"{path}: {error}") from None


def make_cli_judge(kind: str, window: str, mode: str, harm: str | None, environment: str | None) -> Judge:
    if kind == "soda":
        return SodaJudge(window=window, harm=harm, environment=environment)  # type: ignore[arg-type]
    if kind == "qwen3guard":
        return Qwen3GuardGenJudge(mode=mode)  # type: ignore[arg-type]
    raise fail(f"unknown judge {kind!r}: use soda or qwen3guard")


@app.command()
def prompt(
    file: str = typer.Argument(..., help="conversation JSON (or - for stdin)"),
    judge: str = JudgeKind,
    window: str = Window,
    mode: str = typer.Option("response", help="qwen3guard: prompt, response or tool_result"),
    harm: Optional[str] = typer.Option(None, help="harm category when the file gives none"),
    environment: Optional[str] = typer.Option(None, help="environment name when the file gives none"),
) -> None:
    """Print the exact chat messages the judge would receive, as a JSON list."""
    if window not in ("latest", "history", "full"):
        raise fail(f"--window must be latest, history or full, not {window!r}")
    trajectory = read_conversation(file)
    try:
        rendered = make_cli_judge(judge, window, mode, harm, environment).render(trajectory)
    except TrajectoryError as error:
        raise fail(str(error)) from None
    typer.echo(json.dumps(rendered.messages, ensure_ascii=False, indent=2))


def _policy_for(
    policy_path: str | None, judge: str, model: str | None, window: str, device: str
) -> tuple[Policy, str]:
    try:
        return resolve_policy(policy_path, judge, model, window=window, device=device)  # type: ignore[arg-type]
    except PolicyError as error:
        raise fail(str(error)) from None


@app.command("judge")
def judge_command(
    file: str = typer.Argument(..., help="conversation JSON (or - for stdin)"),
    model: Optional[str] = typer.Option(None, "--model", help="hub id or local folder of the judge"),
    judge: str = JudgeKind,
    policy: Optional[str] = typer.Option(None, "--policy", help="policy YAML"),
    window: str = Window,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
) -> None:
    """Judge the conversation's pending tool calls (or the whole conversation when none is pending) and print the decisions as JSON."""
    trajectory = read_conversation(file)
    loaded_policy, name = _policy_for(policy, judge, model, window, device)
    guard = Guard(loaded_policy)
    try:
        guard.runner(name)
    except ModelLoadError as error:
        raise fail(str(error)) from None
    try:
        if trajectory.pending_tool_calls():
            decisions = guard.check_tool_calls(trajectory)
        else:
            decisions = [guard.check(trajectory)]
    finally:
        guard.close()
    typer.echo(json.dumps({"decisions": [d.model_dump(mode="json") for d in decisions]}, ensure_ascii=False, indent=2))
    raise typer.Exit(0 if all(d.allowed for d in decisions) else 1)


register_bench(app)
register_eval(app)


def main() -> None:
    app(prog_name="soda-guard")
