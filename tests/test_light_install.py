"""The base install (policy, guard, integrations, HTTP backend, CLI `prompt` / `judge` with
`backend: openai`) runs without torch, transformers, numpy and matplotlib, and a feature that
needs them fails with one line naming the extra.

Each check runs in a fresh interpreter whose import system refuses those libraries, as a venv
without the extras would: this suite's own environment has them all installed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPTIONAL = ("torch", "transformers", "safetensors", "matplotlib", "numpy")

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys

    class Refuse(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in {OPTIONAL!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    """
)


def run_without_extras(code: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "light.py"
    script.write_text(BLOCKER + textwrap.dedent(code), encoding="utf-8")
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_base_modules_import_without_the_optional_libraries(tmp_path: Path) -> None:
    done = run_without_extras(
        """
        import sys
        import soda_guard, soda_guard.cli, soda_guard.policy, soda_guard.guard
        import soda_guard.backends.openai_backend, soda_guard.eval
        import soda_guard.integrations.langchain, soda_guard.integrations.langgraph
        print(sorted(m for m in sys.modules if m.partition(".")[0] in OPTIONAL))
        """.replace("OPTIONAL", repr(OPTIONAL)),
        tmp_path=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_blocker_does_refuse_them(tmp_path: Path) -> None:
    """Guards the test above against passing because the blocker never fires."""
    done = run_without_extras("import torch", tmp_path=tmp_path)
    assert done.returncode != 0 and "No module named 'torch'" in done.stderr


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CLI = """
import sys
from soda_guard.cli import main
sys.argv = ["soda-guard", *sys.argv[1:]]
main()
"""


def test_cli_prompt_and_judge_with_an_http_judge_run_without_them(tmp_path: Path) -> None:
    conversation = tmp_path / "c.json"
    conversation.write_text(
        json.dumps(
            [
                {"role": "user", "content": "Pay the invoice."},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "pay", "arguments": "{}"}}]},
            ]
        )
    )
    prompt = run_without_extras(CLI, "prompt", str(conversation), tmp_path=tmp_path)
    assert prompt.returncode == 0, prompt.stderr
    assert json.loads(prompt.stdout)[0]["role"] == "system"

    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\njudges:\n  soda: {kind: soda, model: judge, backend: openai, "
        f"base_url: 'http://127.0.0.1:{_closed_port()}/v1', retries: 0, timeout_s: 5}}\n"
        "defaults: {on_error: log}\n"
    )
    judged = run_without_extras(CLI, "judge", str(conversation), "--policy", str(policy), tmp_path=tmp_path)
    # the judge is loaded and warmed before judging: the HTTP backend ran and named the server
    assert judged.returncode == 2, judged.stderr
    assert "failed its warm-up judgment" in judged.stderr and "127.0.0.1" in judged.stderr


@pytest.mark.parametrize(
    ("args", "extra", "library"),
    [
        (["judge", "CONV", "--model", "some/judge"], "local", "torch"),
        (["bench", "--quick", "--section", "judging"], "local", "torch"),
        (["eval", "CONV", "--model", "some/judge"], "eval", "numpy"),
    ],
)
def test_a_feature_that_needs_an_extra_says_which_in_one_line(tmp_path: Path, args: list[str], extra: str, library: str) -> None:
    conversation = tmp_path / "c.json"
    conversation.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "label": 0}))
    args = [str(conversation) if a == "CONV" else a for a in args]
    done = run_without_extras(CLI, *args, tmp_path=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"needs {library}, which is not installed: pip install 'soda-guard[{extra}]'" in lines[0]
