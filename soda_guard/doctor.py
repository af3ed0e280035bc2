"""`soda-guard check`: is this policy ready for traffic, answered before the first request.

Each finding is one line a person can act on. The cheap checks (the policy itself, a judge's
folder, the libraries an install brings, the audit paths, an HTTP judge's model list) run first
and need neither torch nor a model, so a bad set-up is reported in about a second; the device
is resolved with torch only when everything before it holds, and loading the weights (a real
warm-up judgment) happens only when asked for.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from soda_guard.errors import ModelLoadError, SodaGuardError
from soda_guard.model_source import check_local_folder, looks_like_path
from soda_guard.policy import JudgeConfig, Policy
from soda_guard.served_models import ServedModelsError, mismatch, served_models

#: the libraries a `backend: transformers` judge imports, and the install that brings them
LOCAL_LIBRARIES = ("torch", "transformers", "safetensors", "accelerate")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
#: an HTTP judge's server gets this long to list its models
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Finding:
    ok: bool
    subject: str
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.subject}: {self.detail}"


def _missing_libraries() -> list[str]:
    return [name for name in LOCAL_LIBRARIES if importlib.util.find_spec(name) is None]


def _folder_findings(subject: str, model: str) -> Iterator[Finding]:
    try:
        check_local_folder(model)
    except ModelLoadError as error:
        yield Finding(False, subject, str(error))
        return
    if not looks_like_path(model):
        yield Finding(True, subject, f"hub id {model!r}: read from the hub or its local cache when loaded (--load tries it)")
        return
    folder = Path(model).expanduser()
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        yield Finding(False, subject, f"{folder}/config.json cannot be read: {error}")
        return
    weights = sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if not weights or not has_tokenizer:
        missing = [what for what, there in (("weights", weights), ("tokenizer", has_tokenizer)) if not there]
        yield Finding(False, subject, f"{folder} has no {' and no '.join(missing)} files")
        return
    yield Finding(True, subject, f"local folder {folder} ({model_type}, {len(weights)} weight file(s), tokenizer)")


def _device_finding(subject: str, config: JudgeConfig) -> Finding:
    from soda_guard.loading import resolve_device

    import torch

    try:
        device = resolve_device(config.device)
    except (RuntimeError, ValueError) as error:
        return Finding(False, subject, f"device {config.device!r}: {error}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return Finding(False, subject, f"device {config.device!r}: this torch sees no CUDA GPU")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            return Finding(False, subject, f"device {config.device!r}: only {torch.cuda.device_count()} GPU(s)")
        return Finding(True, subject, f"device {device} ({torch.cuda.get_device_name(index)})")
    return Finding(True, subject, f"device {device} (torch {torch.__version__})")


def _local_findings(name: str, config: JudgeConfig) -> Iterator[Finding]:
    subject = f"judge {name}"
    folder = list(_folder_findings(subject, config.model))
    yield from folder
    missing = _missing_libraries()
    if missing:
        yield Finding(False, subject, f"backend transformers needs {', '.join(missing)}: pip install 'soda-guard[local]'")
        return
    if all(finding.ok for finding in folder):
        yield _device_finding(subject, config)


def _http_findings(name: str, config: JudgeConfig) -> Iterator[Finding]:
    subject = f"judge {name}"
    headers: dict[str, str] = {}
    if config.api_key_env is not None:
        key = os.environ.get(config.api_key_env)
        if key is None:
            yield Finding(False, subject, f"the API key variable {config.api_key_env!r} (api_key_env) is not set")
            return
        headers["Authorization"] = f"Bearer {key}"
    for url in [*config.base_urls, *([config.base_url] if config.base_url else [])]:
        try:
            served = served_models(url, headers=headers, timeout_s=min(PROBE_TIMEOUT_S, config.timeout_s or PROBE_TIMEOUT_S))
        except ServedModelsError as error:
            yield Finding(False, subject, f"server cannot be asked what it serves: {error}")
            continue
        problem = mismatch(config.model, served)
        yield Finding(problem is None, subject, f"{url}: {problem or f'serves {config.model!r}'}")


def _writable(path: Path) -> str | None:
    """Why `path` cannot be appended to, or None; nothing is created."""
    path = path.expanduser()
    if path.is_dir():
        return "is a folder"
    if path.exists():
        return None if os.access(path, os.W_OK) else "is not writable"
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        return f"its folder {parent} does not exist"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"its folder {parent} is not writable"


def _audit_findings(policy: Policy) -> Iterator[Finding]:
    for kind, path in (("jsonl", policy.audit.jsonl), ("sqlite", policy.audit.sqlite)):
        if path is None:
            continue
        problem = _writable(path)
        yield Finding(problem is None, f"audit {kind}", f"{path} {problem or 'is writable'}")


def check_policy(policy: Policy, *, load: bool = False) -> list[Finding]:
    """Every finding for `policy`; `load` also loads each judge in use and judges once."""
    in_use = policy.judges_in_use()
    findings = [Finding(True, "policy", f"valid; judges in use: {', '.join(in_use) or 'none'}")]
    for name in in_use:
        config = policy.judges[name]
        if not isinstance(config, JudgeConfig):  # a cascade (its stages are in use too) or a keyword screen
            findings.append(Finding(True, f"judge {name}", f"{config.kind}: {config.model}, no model of its own"))
            continue
        judge_findings = list(_http_findings(name, config) if config.backend == "openai" else _local_findings(name, config))
        findings += judge_findings
        if load and all(finding.ok for finding in judge_findings):
            findings.append(_load_finding(policy, name))
    findings += _audit_findings(policy)
    return findings


def _load_finding(policy: Policy, name: str) -> Finding:
    from soda_guard.guard import Guard

    guard = Guard(Policy(judges={name: policy.judges[name]}))
    try:
        guard.load()
    except (SodaGuardError, OSError) as error:
        return Finding(False, f"judge {name}", f"loading failed: {error}")
    finally:
        guard.close()
    return Finding(True, f"judge {name}", "loaded and judged a warm-up turn")
