"""MCP support: tool annotations in the policy, and the guard proxy in front of an MCP server.

The proxy speaks JSON-RPC itself and needs no MCP package; `soda-guard[mcp]` adds the SDKs
the HTTP front and the LangChain adapter (`soda_guard.integrations.mcp`) use.
"""
