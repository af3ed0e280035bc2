"""`soda-guard mcp-proxy`: the guard proxy in front of an MCP server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Optional

import typer

from soda_guard.errors import ModelLoadError, PolicyError
from soda_guard.guard import Guard
from soda_guard.mcp.pipes import DEFAULT_MAX_MESSAGE_BYTES
from soda_guard.mcp.relay import RelayOptions, serve_stdio
from soda_guard.policy import Policy
from soda_guard.tracing import OpenTelemetrySink


def register(app: typer.Typer) -> None:
    @app.command(
        "mcp-proxy",
        context_settings={"allow_interspersed_args": False},
        help="Start an MCP server (the COMMAND after --) and serve its tools to an MCP client on stdio "
        "(or streamable HTTP with --http), judging every tools/call before it is forwarded.",
    )
    def mcp_proxy(
        command: list[str] = typer.Argument(..., help="the MCP server's command line, after --"),
        policy: Path = typer.Option(..., "--policy", help="policy YAML"),
        server: Optional[str] = typer.Option(None, "--server", help="the name the policy knows this server by (default: the name the server gives itself)"),
        http: Optional[str] = typer.Option(None, "--http", help="serve streamable HTTP on HOST:PORT instead of stdio"),
        server_timeout: float = typer.Option(300.0, "--server-timeout", min=0.001, help="seconds a forwarded request may wait for the server"),
        review_timeout: float = typer.Option(300.0, "--review-timeout", min=0.001, help="seconds an escalation waits for the user's answer"),
        max_message_bytes: int = typer.Option(DEFAULT_MAX_MESSAGE_BYTES, "--max-message-bytes", min=1024, help="longest client message accepted"),
        no_load: bool = typer.Option(False, "--no-load", help="load the judges on first use instead of before serving"),
    ) -> None:
        try:
            guard = Guard(Policy.from_yaml_file(policy), sinks=[OpenTelemetrySink()])
            if not no_load:
                guard.load()
        except (PolicyError, ModelLoadError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        options = RelayOptions(
            server_name=server,
            server_timeout_s=server_timeout,
            review_timeout_s=review_timeout,
            max_message_bytes=max_message_bytes,
        )
        try:
            if http is not None:
                from soda_guard.mcp.http import serve_http

                code = serve_http(guard, command, http, options)
            else:
                code = asyncio.run(serve_stdio(guard, command, options))
        except KeyboardInterrupt:
            code = 0
        finally:
            guard.close()
        raise typer.Exit(code)
