"""The MCP example runs offline end to end: the real `soda-guard mcp-proxy` command in front of
the example server, and `langchain.mcp` tools in a guarded agent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mcp_guarded.py"


def test_mcp_example_blocks_deletions_both_ways(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "proxy read_file: buy milk" in lines
    assert any(line.startswith("proxy delete_file: isError - soda-guard refused") for line in lines)
    assert lines[-2:] == ["agent read_file: success", "agent delete_file: error"]
