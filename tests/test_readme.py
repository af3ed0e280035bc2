"""The README's runnable snippets (those it shows output for) run and print what it says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPET = re.compile(r"```python\n(.*?)```\n\nprints(?:\n\n```\n(.*?)```| `(.*?)`)", re.DOTALL)


def snippets() -> list[tuple[str, str]]:
    found = [(code, (block or inline).strip()) for code, block, inline in SNIPPET.findall(README.read_text(encoding="utf-8"))]
    assert len(found) >= 2, "the README lost its runnable snippets"
    return found


@pytest.mark.parametrize(("code", "expected"), snippets(), ids=lambda value: value.splitlines()[0][:40])
def test_readme_snippet_prints_what_the_readme_says(code: str, expected: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
