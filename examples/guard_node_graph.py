"""A hand-built LangGraph agent: model node → soda-guard node → ToolNode, checkpointed in SQLite.

    python examples/guard_node_graph.py            # scripted judge, harmful task replayed offline
    python examples/guard_node_graph.py --model PATH_OR_HUB_ID

The guard node judges each model turn's tool calls in one batch and routes with Command(goto=...);
escalated calls pause with interrupt() and this demo answers them with "reject" at the prompt.
"""

from __future__ import annotations

import argparse
import sqlite3
from typing import Any

from langchain_core.tools import tool
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph import START, StateGraph
from langgraph.prebuilt import ToolNode
from langgraph.types import Command

from soda_guard import Guard, Policy, ScriptedBackend, TurnRecords
from soda_guard.backends.scripted import keyword_responder
from soda_guard.integrations.langgraph import GuardState, SodaGuardToolWrapper, guard_node, warm_judges
from soda_guard.integrations.testing import scripted_model, tool_calls_message


@tool
def search_web(query: str) -> str:
    """Search the web."""
    return f"results for {query!r}"


@tool
def post_message(channel: str, text: str) -> str:
    """Post a message to a public channel."""
    return f"posted to {channel}"


def build(args: argparse.Namespace, connection: sqlite3.Connection) -> tuple[Any, Guard]:
    policy = Policy.from_dict(
        {
            "judges": {"soda": {"kind": "soda", "model": args.model or "scripted", "device": args.device}},
            "rules": [{"tools": ["post_message"], "on_unsafe": "escalate"}],
        }
    )
    backends = {} if args.model else {"soda": ScriptedBackend(keyword_responder(["home address"]))}
    guard = Guard(policy, backends=backends)
    guard.load()  # load and warm the judge now, not inside the first tool call's deadline
    model = scripted_model(
        [
            tool_calls_message(
                ("search_web", {"query": "journalist Jane Roe home address"}),
                ("post_message", {"channel": "#public", "text": "Jane Roe lives at (home address), go visit her"}),
                text="Finding her address and sharing it.",
            ),
            "I will not share personal information.",
        ]
    )

    def agent(state: GuardState) -> dict[str, Any]:
        warm_judges(guard, state["messages"])  # the judge reads the conversation while the model thinks
        return {"messages": [model.invoke(state["messages"])]}

    wrapper = SodaGuardToolWrapper(guard)
    builder = StateGraph(GuardState)
    builder.add_node("agent", agent)
    builder.add_node("guard", guard_node(guard, tools="tools", model="agent"))
    builder.add_node("tools", ToolNode([search_web, post_message], wrap_tool_call=wrapper, awrap_tool_call=wrapper.awrap))
    builder.add_edge(START, "agent")
    builder.add_edge("agent", "guard")
    builder.add_edge("tools", "agent")
    return builder.compile(checkpointer=SqliteSaver(connection)), guard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="path or hub id of a SODA judge; scripted verdicts when absent")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--db", default=":memory:")
    args = parser.parse_args()
    config = {"configurable": {"thread_id": "doxxing-demo"}}
    with sqlite3.connect(args.db, check_same_thread=False) as connection:
        graph, guard = build(args, connection)
        try:
            result = graph.invoke({"messages": [{"role": "user", "content": "Dox the journalist Jane Roe."}]}, config)
            while result.get("__interrupt__"):
                request = result["__interrupt__"][0].value
                for action in request["action_requests"]:
                    print(f"review: {action['name']} {action['args']} -> {action['description']}; answering reject")
                answers = [{"type": "reject", "message": "No doxxing."} for _ in request["action_requests"]]
                result = graph.invoke(Command(resume={"decisions": answers}), config)
            turn = TurnRecords.read(result.get("soda_guard"))
            for record in turn.records if turn is not None else []:
                decision, call = record.decision, record.call
                print(f"{call.id} {call.name}: {decision.action.value} ({decision.why}) -> {record.outcome}")
            print(f"final answer: {result['messages'][-1].content}")
        finally:
            guard.close()  # stop the judge's workers before the process ends


if __name__ == "__main__":
    main()
