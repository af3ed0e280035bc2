"""The guard proxy as its own process, with a scripted judge in place of a model:

    python tests/mcp_proxy_scripted.py POLICY UNSAFE_REGEX [--judge-delay S] [--server-timeout S] -- COMMAND...

The judge ("soda") says UNSAFE when the rendered call matches UNSAFE_REGEX.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

# an MCP client starts this with a bare environment (no PYTHONPATH): the proxy under test is
# the checkout's, not whichever one the environment's editable install points at
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from soda_guard import Guard, Policy, ScriptedBackend  # noqa: E402
from soda_guard.backends.scripted import keyword_responder  # noqa: E402
from soda_guard.mcp.pipes import DEFAULT_MAX_MESSAGE_BYTES  # noqa: E402
from soda_guard.mcp.relay import RelayOptions, serve_stdio  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("policy")
    parser.add_argument("unsafe")
    parser.add_argument("--judge-delay", type=float, default=0.0)
    parser.add_argument("--server-timeout", type=float, default=300.0)
    parser.add_argument("--server", default=None)
    parser.add_argument("--max-message-bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    backend = ScriptedBackend(keyword_responder([args.unsafe]), delay_s=args.judge_delay)
    guard = Guard(Policy.from_yaml_file(args.policy), backends={"soda": backend})
    options = RelayOptions(
        server_name=args.server,
        server_timeout_s=args.server_timeout,
        review_timeout_s=10.0,
        max_message_bytes=args.max_message_bytes,
    )
    try:
        return asyncio.run(serve_stdio(guard, command, options))
    finally:
        guard.close()


if __name__ == "__main__":
    sys.exit(main())
