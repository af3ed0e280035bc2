"""Shared pieces of the MCP tests: the example server, the proxy started with a scripted judge,
and a policy file."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mcp import StdioServerParameters

ROOT = Path(__file__).resolve().parent.parent
SERVER = [sys.executable, str(ROOT / "examples" / "mcp_files_server.py")]
LAUNCHER = str(Path(__file__).resolve().parent / "mcp_proxy_scripted.py")

POLICY: dict[str, Any] = {
    "version": 1,
    "judges": {"soda": {"kind": "soda", "model": "scripted"}},
    "defaults": {"timeout_s": 5},
    "rules": [
        {"name": "reads", "when": {"annotations": {"readOnly": True}}, "action": "allow"},
        {"name": "destructive", "tools": ["files:delete_*"], "on_unsafe": "block", "on_controversial": "escalate"},
    ],
}


def write_policy(tmp_path: Path, policy: dict[str, Any] | None = None, **extra: Any) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(json.dumps({**(policy or POLICY), **extra}))
    return path


def proxied(policy: Path, unsafe: str = "delete_file", *options: str) -> StdioServerParameters:
    """The example server behind the proxy, judged by a scripted judge (UNSAFE on `unsafe`)."""
    return StdioServerParameters(command=sys.executable, args=[LAUNCHER, *options, str(policy), unsafe, "--", *SERVER])


def direct() -> StdioServerParameters:
    return StdioServerParameters(command=SERVER[0], args=SERVER[1:])
