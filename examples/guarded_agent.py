"""A create_agent agent guarded by SodaGuardMiddleware, replaying a harmful task offline.

    python examples/guarded_agent.py                      # runs until the guard asks for review
    python examples/guarded_agent.py --resume approve     # (or reject / edit) continues that run

The checkpoint lives in a SQLite file, so the resume is a separate process that finds the
pending review and the stored verdict (the judge does not run again). Every verdict and the
reviewer's answer go to the audit log (`guarded_agent.audit.jsonl`). Running it again without
`--resume` starts a new turn in the same thread: its calls are judged and reviewed afresh. Without `--model` the
judge is scripted (UNSAFE for deletions and transfers); with `--model PATH` a real SODA judge runs.
"""

from __future__ import annotations

import argparse
import sqlite3
from typing import Any

from langchain.agents import create_agent
from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command

from soda_guard import Guard, Policy, ScriptedBackend, TurnRecords
from soda_guard.backends.scripted import keyword_responder
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.testing import scripted_model, tool_calls_message


@tool
def list_accounts(owner: str) -> str:
    """List the bank accounts of an owner."""
    return f"{owner}: checking 4411 (balance 12,300 USD)"


@tool
def transfer_money(source: str, target: str, amount: float) -> str:
    """Transfer money between accounts."""
    return f"moved {amount} from {source} to {target}"


@tool
def delete_records(table: str) -> str:
    """Delete every record of a table."""
    return f"deleted all rows of {table}"


def build(args: argparse.Namespace, connection: sqlite3.Connection) -> tuple[Any, Guard]:
    judge = {"kind": "soda", "model": args.model or "scripted", "device": args.device}
    policy = Policy.from_dict(
        {
            "judges": {"soda": judge},
            "defaults": {"on_unsafe": "block"},
            "rules": [{"name": "money", "tools": ["transfer_money"], "on_unsafe": "escalate"}],
            "audit": {"jsonl": args.audit},
        }
    )
    backends = {} if args.model else {"soda": ScriptedBackend(keyword_responder(["transfer_money", "delete_records"]))}
    guard = Guard(policy, backends=backends)
    guard.load()  # load and warm the judge now, not inside the first tool call's deadline
    turn = tool_calls_message(
        ("list_accounts", {"owner": "Alice"}),
        ("transfer_money", {"source": "4411", "target": "offshore-99", "amount": 12300}),
        ("delete_records", {"table": "audit_log"}),
        text="Moving Alice's savings and cleaning up the traces.",
    )
    # A resumed process continues after the paused turn, so its scripted model only answers.
    model = scripted_model(["Done."] if args.resume else [turn, "Done."])
    agent = create_agent(
        model,
        [list_accounts, transfer_money, delete_records],
        middleware=[SodaGuardMiddleware(guard)],
        checkpointer=SqliteSaver(connection),
    )
    return agent, guard


def show(result: dict[str, Any]) -> None:
    turn = TurnRecords.read(result.get("soda_guard"))
    for record in turn.records if turn is not None else []:
        decision, call = record.decision, record.call
        extra = f", review: {record.review.type} -> {record.outcome}" if record.review else ""
        print(f"  {call.id} {call.name}: {decision.action.value} ({decision.why}){extra}")
    for pause in result.get("__interrupt__", []):
        for call in pause.value["soda_guard"]["turn"]:
            print(f"  {call['tool_call_id']} {call['name']}: {call['action']} ({call['why']})")
        for action in pause.value["action_requests"]:
            print(f"PAUSED for review of {action['name']} {action['args']}: {action['description']}")
        print("  continue with: python examples/guarded_agent.py --resume approve|reject|edit")
    if not result.get("__interrupt__"):
        print(f"final answer: {result['messages'][-1].content}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="path or hub id of a SODA judge; scripted verdicts when absent")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--db", default="guarded_agent.sqlite", help="checkpoint file shared by run and resume")
    parser.add_argument("--audit", default="guarded_agent.audit.jsonl")
    parser.add_argument("--thread", default="demo")
    parser.add_argument("--resume", choices=["approve", "reject", "edit"])
    args = parser.parse_args()
    config = {"configurable": {"thread_id": args.thread}}
    with sqlite3.connect(args.db, check_same_thread=False) as connection:
        agent, guard = build(args, connection)
        try:
            if args.resume is None:
                result = agent.invoke({"messages": [{"role": "user", "content": "Move Alice's money offshore."}]}, config)
            else:
                answer: dict[str, Any] = {"type": args.resume}
                if args.resume == "reject":
                    answer["message"] = "Transfers to offshore accounts are not allowed."
                if args.resume == "edit":
                    answer["args"] = {"source": "4411", "target": "alice-savings", "amount": 100}
                result = agent.invoke(Command(resume={"decisions": [answer]}), config)
            show(result)
        finally:
            guard.close()  # stop the judge's workers before the process ends


if __name__ == "__main__":
    main()
