"""`soda-guard explain`: which rule, condition, judge and cascade stages a conversation's
pending calls would hit, worked out from the policy alone; no judge model is loaded or asked.

A keyword screen is the one exception: it has no model, so its answer is shown as what it is,
the cascade's first word, computed here for free.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from soda_guard.errors import PolicyError
from soda_guard.judges.keywords import KeywordsRunner
from soda_guard.policy import CascadeConfig, KeywordsConfig, Policy
from soda_guard.trajectory import ToolCall, Trajectory


def explain(policy: Policy, trajectory: Trajectory) -> list[dict[str, Any]]:
    """One entry per pending call (one for the whole conversation when none is pending)."""
    calls = trajectory.pending_tool_calls()
    if not calls:
        return [{"tool_call": None, "rule": "defaults", "condition": None, "action": None, **_judge(policy, policy.defaults.judge, trajectory)}]
    return [_call(policy, call, trajectory) for call in calls]


def _call(policy: Policy, call: ToolCall, trajectory: Trajectory) -> dict[str, Any]:
    route = policy.route(call, trajectory)
    view = trajectory.with_only_pending_call(call.id) if len(trajectory.pending_tool_calls()) > 1 else trajectory
    candidates = []
    for name, rule, held in route.candidates:
        judge = policy.outcome(rule, "judge")
        verdict = rule.when.verdict if rule.when is not None else None
        candidates.append(
            {
                "rule": name,
                "condition": held or None,
                "applies_if": verdict.model_dump(mode="json", exclude_none=True) if verdict is not None else None,
                "action": rule.action.value if rule.action is not None else None,
                **_judge(policy, judge, view),
            }
        )
    fixed = route.rule.action if route.rule is not None else None
    judge = None if fixed is not None else policy.outcome(route.rule, "judge")
    entry: dict[str, Any] = {
        "tool_call": call.model_dump(mode="json"),
        "rule": route.name,
        "condition": route.condition,
        "action": fixed.value if fixed is not None else None,
        **_judge(policy, judge, view),
    }
    if candidates:
        entry["read_first"] = candidates
    return entry


def _judge(policy: Policy, name: str | None, view: Trajectory) -> dict[str, Any]:
    if name is None:
        return {"judge": None}
    config = policy.judges.get(name)
    if not isinstance(config, CascadeConfig):
        return {"judge": name, **_screen(name, config, view)}
    stages = [{"judge": stage, "kind": policy.judges[stage].kind, **_screen(stage, policy.judges[stage], view)} for stage in config.stages]
    return {
        "judge": name,
        "cascade": {"settle_below": config.settle_below, "settle_above": config.settle_above, "stages": stages},
        "stage": _settling_stage(config, stages),
    }


def _screen(name: str, config: Any, view: Trajectory) -> dict[str, Any]:
    if not isinstance(config, KeywordsConfig):
        return {}
    verdict = KeywordsRunner(name, config).verdict(view)
    return {"keywords": {"label": verdict.label.value if verdict.label else None, "score": verdict.score, "reason": verdict.reason}}


def _settling_stage(config: CascadeConfig, stages: list[dict[str, Any]]) -> str | None:
    """The stage known to settle without a model: a keyword screen's confident answer; None
    when a model stage has to be asked first."""
    for stage in stages:
        screen = stage.get("keywords")
        if screen is None:
            return None
        if screen["score"] < config.settle_below or screen["score"] > config.settle_above:
            return str(stage["judge"])
    return None


def register(app: typer.Typer) -> None:
    from soda_guard.cli import fail, read_conversation

    @app.command("explain")
    def explain_command(
        file: str = typer.Argument(..., help="conversation JSON (or - for stdin)"),
        policy: str = typer.Option(..., "--policy", help="policy YAML"),
    ) -> None:
        """Print, as JSON, the rule, condition, judge and cascade stages each pending call would hit, without running a judge."""
        trajectory = read_conversation(file)
        try:
            loaded = Policy.from_yaml_file(policy)
        except PolicyError as error:
            raise fail(str(error)) from None
        typer.echo(json.dumps({"explain": explain(loaded, trajectory)}, ensure_ascii=False, indent=2))


__all__ = ["explain", "register"]
