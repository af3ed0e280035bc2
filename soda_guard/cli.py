"""The `soda-guard` command line: dry-run prompts, judge a conversation, and the subcommands
the other modules register (bench, eval).

Exit codes are part of the interface so shell pipelines can gate on them: 0 allow, 1 block or
escalate, 2 usage or load error.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from soda_guard.bench.cli import register as register_bench
from soda_guard.eval.cli import register as register_eval
from soda_guard.mcp.cli import register as register_mcp
from soda_guard.converters import from_openai_messages
from soda_guard.errors import ModelLoadError, PolicyError, TrajectoryError
from soda_guard.guard import Guard
from soda_guard.explain import register as register_explain
from soda_guard.judges.base import Judge
from soda_guard.judges.qwen3guard_gen import Qwen3GuardGenJudge
from soda_guard.judges.soda import SodaJudge
from soda_guard.policy import Policy, resolve_policy
from soda_guard.trajectory import Trajectory

app = typer.Typer(
    add_completion=False,
    # plain click help: typer's rich panels label every flag `<bool>` (`--help <bool>` included)
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Guard tool-calling agents with local safety judges. Exit codes: 0 allow, 1 block or escalate, 2 usage or load error.",
)

def _print_version(value: bool) -> None:
    if value:
        from soda_guard import __version__

        typer.echo(f"soda-guard {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version, help="print the version and exit"),
) -> None:
    """Guard tool-calling agents with local safety judges."""


class JudgeKind(str, Enum):
    soda = "soda"
    qwen3guard = "qwen3guard"


class Window(str, Enum):
    latest = "latest"
    history = "history"
    full = "full"


class Mode(str, Enum):
    prompt = "prompt"
    response = "response"
    tool_result = "tool_result"


WindowOption = typer.Option(
    Window.history,
    "--window",
    help="latest: from the latest user request on; history: plus earlier requests and tool outputs; full: everything",
)
# without --policy a judge kind (checked by resolve_policy); with one, any judge name it declares
POLICY_JUDGE_METAVAR = "<soda|qwen3guard|NAME>"
POLICY_JUDGE_HELP = "default soda; with --policy: NAME, a judge it declares (default: its default judge)"


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


def make_cli_judge(kind: JudgeKind, window: Window, mode: Mode, harm: str | None, environment: str | None) -> Judge:
    if kind is JudgeKind.soda:
        return SodaJudge(window=window.value, harm=harm, environment=environment)
    return Qwen3GuardGenJudge(mode=mode.value)


@app.command()
def prompt(
    file: str = typer.Argument(..., help="conversation JSON (or - for stdin)"),
    judge: JudgeKind = typer.Option(JudgeKind.soda, "--judge", help="the judge whose prompt to print"),
    window: Window = WindowOption,
    mode: Mode = typer.Option(Mode.response, "--mode", help="qwen3guard: what is judged"),
    harm: Optional[str] = typer.Option(None, help="harm category when the file gives none"),
    environment: Optional[str] = typer.Option(None, help="environment name when the file gives none"),
) -> None:
    """Print the exact chat messages the judge would receive, as a JSON list."""
    trajectory = read_conversation(file)
    try:
        rendered = make_cli_judge(judge, window, mode, harm, environment).render(trajectory)
    except TrajectoryError as error:
        raise fail(str(error)) from None
    typer.echo(json.dumps(rendered.messages, ensure_ascii=False, indent=2))


def _policy_for(
    policy_path: str | None, judge: str | None, model: str | None, window: Window, device: str
) -> tuple[Policy, str]:
    try:
        return resolve_policy(policy_path, judge, model, window=window.value, device=device)
    except PolicyError as error:
        raise fail(str(error)) from None


@app.command("judge")
def judge_command(
    file: str = typer.Argument(..., help="conversation JSON (or - for stdin)"),
    model: Optional[str] = typer.Option(None, "--model", help="hub id or local folder of the judge"),
    judge: Optional[str] = typer.Option(None, "--judge", metavar=POLICY_JUDGE_METAVAR, help=POLICY_JUDGE_HELP),
    policy: Optional[str] = typer.Option(None, "--policy", help="policy YAML"),
    window: Window = WindowOption,
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1, ..."),
) -> None:
    """Judge the conversation's pending tool calls (or the whole conversation when none is pending) and print the decisions as JSON."""
    trajectory = read_conversation(file)
    loaded_policy, _ = _policy_for(policy, judge, model, window, device)
    guard = Guard(loaded_policy)
    try:
        guard.load()
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


@app.command("check")
def check_command(
    policy: str = typer.Argument(..., help="policy YAML"),
    load: bool = typer.Option(False, "--load", help="also load each judge and judge a warm-up turn (seconds to minutes)"),
) -> None:
    """Check a set-up before traffic: the policy, each judge it uses (local folder and libraries,
    device; or each server, reachable and serving that model name), the audit paths. Exit 0
    when all hold, 1 when one does not, 2 when the policy cannot be read."""
    from soda_guard.doctor import check_policy

    try:
        loaded = Policy.from_yaml_file(policy)
    except PolicyError as error:
        raise fail(str(error)) from None
    findings = check_policy(loaded, load=load)
    for finding in findings:
        typer.echo(finding.line())
    raise typer.Exit(0 if all(finding.ok for finding in findings) else 1)


policy_app = typer.Typer(help="The policy format: its JSON schema and its reference table.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("schema")
def policy_schema() -> None:
    """Print the policy's JSON schema (for editors validating policy YAML)."""
    from soda_guard.policy_reference import schema

    typer.echo(json.dumps(schema(), indent=2))


@policy_app.command("reference")
def policy_reference() -> None:
    """Print the policy reference table (docs/policy-reference.md) generated from the models."""
    from soda_guard.policy_reference import reference

    typer.echo(reference(), nl=False)


register_bench(app)
register_eval(app)
register_explain(app)
register_mcp(app)


def quiet_libraries() -> None:
    """Deprecation notices, advice and progress bars from torch, transformers and the hub client
    speak to soda-guard's developers, not to its users: the command's output is decisions and
    errors. Set before those libraries are imported; `-W` / PYTHONWARNINGS still win."""
    if not sys.warnoptions:
        warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main() -> None:
    quiet_libraries()
    app(prog_name="soda-guard")
