"""The command line helps itself: `--version`, `check` (a set-up validated before traffic, with
exit codes) and `policy schema` / `policy reference`; errors that need no model are reported
before torch is imported (checked by what the interpreter imported, not by timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from soda_guard import __version__
from soda_guard.backends.scripted import ScriptedBackend, keyword_responder
from soda_guard.policy_reference import COMMAND, reference
from soda_guard.testing.server import LoopbackServer, create_app

ROOT = Path(__file__).resolve().parents[1]

# runs the CLI in a fresh interpreter and reports, after it exits, whether torch was imported
CLI = """
import sys
from soda_guard.cli import main
sys.argv = ["soda-guard", *sys.argv[1:]]
try:
    main()
finally:
    print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", file=sys.stderr)
"""


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def write_policy(folder: Path, judges: str, audit: str = "") -> Path:
    path = folder / "policy.yaml"
    path.write_text(f"version: 1\njudges:\n{judges}\n{audit}", encoding="utf-8")
    return path


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    done = cli("--version", cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"soda-guard {__version__}"
    assert "NO-TORCH" in done.stderr


def test_check_reports_a_missing_folder_and_an_unwritable_audit_path_before_torch(tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path, f"  soda: {{kind: soda, model: {tmp_path / 'no-such-judge'}}}", f"audit: {{jsonl: {tmp_path / 'gone' / 'a.jsonl'}}}\n"
    )
    done = cli("check", str(policy), cwd=tmp_path)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ok") and "judges in use: soda" in lines[0]
    assert any(line.startswith("FAIL  judge soda:") and "no such folder" in line for line in lines), lines
    assert any(line.startswith("FAIL  audit jsonl:") and "does not exist" in line for line in lines), lines
    assert "NO-TORCH" in done.stderr


def test_check_refuses_a_bad_policy_in_one_line_with_exit_2_before_torch(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "  soda: {kind: soda, model: m, temperature: 0.5}")
    done = cli("check", str(policy), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith("soda-guard:") and "temperature: unknown key" in done.stderr
    assert "NO-TORCH" in done.stderr


def test_judge_with_a_missing_folder_fails_before_torch(tmp_path: Path) -> None:
    conversation = tmp_path / "c.json"
    conversation.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    done = cli("judge", str(conversation), "--model", str(tmp_path / "absent"), cwd=tmp_path)
    assert done.returncode == 2 and "no such folder" in done.stderr
    assert "NO-TORCH" in done.stderr


def test_check_passes_a_local_judge_folder_and_loads_it_on_request(tmp_path: Path, tiny_judge_dir: Path) -> None:
    policy = write_policy(
        tmp_path, f"  soda: {{kind: soda, model: {tiny_judge_dir}, device: cpu}}", f"audit: {{jsonl: {tmp_path / 'a.jsonl'}}}\n"
    )
    done = cli("check", str(policy), "--load", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert all(line.startswith("ok") for line in done.stdout.splitlines()), done.stdout
    assert "device cpu" in done.stdout and "loaded and judged" in done.stdout and "is writable" in done.stdout
    assert not (tmp_path / "a.jsonl").exists()  # checking creates nothing


def test_check_refuses_a_device_this_machine_lacks(tmp_path: Path, tiny_judge_dir: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    policy = write_policy(tmp_path, f"  soda: {{kind: soda, model: {tiny_judge_dir}, device: cuda}}")
    done = cli("check", str(policy), cwd=tmp_path)
    assert done.returncode == 1 and "FAIL  judge soda: device 'cuda'" in done.stdout


@pytest.mark.parametrize("policy_model", ["soda-judge", "/srv/judges/soda"])
def test_check_asks_an_http_judge_what_it_serves_and_names_both_names(tmp_path: Path, policy_model: str) -> None:
    app = create_app(ScriptedBackend(keyword_responder(["x"])), model_id="/srv/judges/soda")
    with LoopbackServer(app) as server:
        policy = write_policy(tmp_path, f"  soda: {{kind: soda, model: {policy_model}, backend: openai, base_url: '{server.base_url}'}}")
        done = cli("check", str(policy), cwd=tmp_path)
    if policy_model == "/srv/judges/soda":
        assert done.returncode == 0, done.stdout
        assert f"{server.base_url}: serves '/srv/judges/soda'" in done.stdout
    else:
        assert done.returncode == 1
        line = next(line for line in done.stdout.splitlines() if line.startswith("FAIL"))
        assert "'soda-judge'" in line and "/srv/judges/soda" in line
    assert "NO-TORCH" in done.stderr


def test_check_reports_an_unreachable_server(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    policy = write_policy(tmp_path, f"  soda: {{kind: soda, model: m, backend: openai, base_url: 'http://127.0.0.1:{port}/v1'}}")
    done = cli("check", str(policy), cwd=tmp_path)
    assert done.returncode == 1 and "FAIL  judge soda: server cannot be asked" in done.stdout and "ConnectError" in done.stdout


def test_policy_schema_is_the_models_json_schema(tmp_path: Path) -> None:
    done = cli("policy", "schema", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    schema = json.loads(done.stdout)
    judge = schema["$defs"]["JudgeConfig"]["properties"]
    assert judge["max_new_tokens"]["default"] == 128 and judge["retries"]["description"]
    assert "NO-TORCH" in done.stderr


def test_the_committed_policy_reference_is_current() -> None:
    committed = (ROOT / "docs" / "policy-reference.md").read_text(encoding="utf-8")
    assert committed == reference(), f"docs/policy-reference.md is stale: run `{COMMAND}`"


def test_the_reference_documents_every_field_with_its_default() -> None:
    from soda_guard.policy_reference import SECTIONS

    table = reference()
    for where, model in SECTIONS:
        for name in model.model_fields:
            rows = [line for line in table.split(f"## `{where}`")[1].split("\n## ")[0].splitlines() if line.startswith(f"| `{name}` |")]
            assert len(rows) == 1, (where, name)
            cells = [cell.strip() for cell in rows[0].strip("|").split(" | ")]
            assert cells[2] and cells[3], (where, name, rows[0])


def test_the_stream_monitor_without_torch_names_the_extra(tmp_path: Path) -> None:
    from test_light_install import run_without_extras

    done = run_without_extras("from soda_guard.stream_monitor import StreamMonitor", tmp_path=tmp_path)
    assert done.returncode != 0
    assert "the stream monitor (soda_guard.stream_monitor) needs torch, which is not installed: pip install 'soda-guard[local]'" in done.stderr
