"""MCP tools guarded two ways, offline: the example server (`mcp_files_server.py`) behind the
stand-alone `soda-guard mcp-proxy`, driven by the `mcp` SDK's client, and the same server's
tools loaded with `langchain.mcp` into an agent under `SodaGuardMiddleware` (a scripted model
and a scripted judge stand in for real ones).

    python examples/mcp_guarded.py
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import warnings
from pathlib import Path

from fastmcp.client.transports import StdioTransport
from langchain.agents import create_agent
from langchain_core._api import LangChainBetaWarning
from langchain_core.messages import ToolMessage
from mcp import Client, StdioServerParameters

from soda_guard import Guard, Policy, ScriptedBackend
from soda_guard.backends.scripted import keyword_responder
from soda_guard.integrations.langchain import SodaGuardMiddleware
from soda_guard.integrations.testing import scripted_model, tool_calls_message

with warnings.catch_warnings():
    warnings.simplefilter("ignore", LangChainBetaWarning)
    from langchain.mcp import MCPAdapter

SERVER = [sys.executable, str(Path(__file__).resolve().parent / "mcp_files_server.py")]

# No judge needed: read-only tools run, the files server's deletions are blocked.
PROXY_POLICY = """
version: 1
rules:
  - {name: reads, when: {annotations: {readOnly: true}}, action: allow}
  - {name: no-deletes, tools: ["files:delete_*"], action: block}
mcp:
  servers:
    files:            # pinned: what the server declares about these tools is not trusted
      annotations:
        "read_file": {readOnly: true}
        "ran": {readOnly: true}
"""

# With a judge: deletions are judged, and escalated when the judge says unsafe.
AGENT_POLICY = """
version: 1
judges:
  soda: {kind: soda, model: scripted}
rules:
  - {name: reads, when: {annotations: {readOnly: true}}, action: allow}
  - {name: destructive, when: {annotations: {destructive: true}}, on_unsafe: block}
"""


async def through_the_proxy(policy: Path) -> None:
    proxy = StdioServerParameters(
        command=sys.executable,
        args=["-m", "soda_guard", "mcp-proxy", "--policy", str(policy), "--server", "files", "--", *SERVER],
    )
    async with Client(proxy) as client:
        tools = await client.list_tools()
        print("proxy lists:", ", ".join(tool.name for tool in tools.tools))
        read = await client.call_tool("read_file", {"path": "notes.txt"})
        print("proxy read_file:", "error" if read.is_error else read.content[0].text)
        deleted = await client.call_tool("delete_file", {"path": "notes.txt"})
        print("proxy delete_file:", "isError" if deleted.is_error else "ran", "-", deleted.content[0].text[:60])


async def in_an_agent() -> None:
    guard = Guard(Policy.from_yaml(AGENT_POLICY), backends={"soda": ScriptedBackend(keyword_responder(["files:delete_file"]))})
    async with MCPAdapter(StdioTransport(command=SERVER[0], args=SERVER[1:])) as adapter:
        tools = await adapter.list_tools()
        model = scripted_model(
            [tool_calls_message(("read_file", {"path": "notes.txt"}), ("delete_file", {"path": "notes.txt"})), "Done."]
        )
        agent = create_agent(model, tools, middleware=[SodaGuardMiddleware(guard, otel=False)])
        result = await agent.ainvoke({"messages": [{"role": "user", "content": "Tidy up my files."}]})
    for message in result["messages"]:
        if isinstance(message, ToolMessage):
            print(f"agent {message.name}: {message.status}")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        policy = Path(tmp) / "proxy-policy.yaml"
        policy.write_text(PROXY_POLICY)
        await through_the_proxy(policy)
    await in_an_agent()


if __name__ == "__main__":
    asyncio.run(main())
