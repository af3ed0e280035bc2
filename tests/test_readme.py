"""Every README code block runs as written. Python and shell blocks are complete programs, run
in a temp folder (holding a copy of `examples/`, the sample inputs), twice in the same folder
(what a reader does who tries a block again), with the printed output compared where the README
shows it (`prints` and a block or an inline value right after). A block that cannot run on its
own (it needs model weights, a GPU server, minutes) is marked `<!-- fragment: why -->` on the
line before it; YAML blocks are policies and must load."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from soda_guard import Policy

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\n", re.DOTALL | re.MULTILINE)
FRAGMENT = re.compile(r"<!-- fragment: (.+?) -->\n\s*\Z")
PRINTS = re.compile(r"\A\nprints(?:\n\n```\n(.*?)```| `(.*?)`)", re.DOTALL)
RUNNABLE = {"python": "python", "bash": "shell", "sh": "shell"}


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    fragment: str | None
    expected: str | None

    @property
    def name(self) -> str:
        return f"L{self.line}-{self.language}"


def blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        fragment = FRAGMENT.search(before[-300:])
        prints = PRINTS.match(text[match.end():])
        expected = None if prints is None else (prints.group(1) or prints.group(2)).strip()
        found.append(Block(match.group(1), match.group(2), before.count("\n") + 1, fragment and fragment.group(1), expected))
    return found


def runnable() -> list[Block]:
    chosen = [block for block in blocks() if block.language in RUNNABLE and block.fragment is None]
    assert len(chosen) >= 5, "the README lost its runnable blocks"
    return chosen


def test_every_code_block_is_known() -> None:
    """A block in another language would be neither run nor checked."""
    unknown = [block.name for block in blocks() if block.language not in {*RUNNABLE, "yaml", "json", ""}]
    assert not unknown, f"README blocks in a language this test does not run: {unknown}"


def run(block: Block, folder: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    command = [sys.executable, "-c", block.code] if RUNNABLE[block.language] == "python" else ["bash", "-euo", "pipefail", "-c", block.code]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.parametrize("block", runnable(), ids=lambda block: block.name)
def test_readme_block_runs_twice_and_prints_what_the_readme_says(block: Block, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    for attempt in ("first", "second"):
        result = run(block, tmp_path)
        assert result.returncode == 0, f"{attempt} run of the block at README line {block.line}:\n{result.stderr}"
        if block.expected is not None:
            assert result.stdout.strip() == block.expected, f"{attempt} run printed:\n{result.stdout}"


@pytest.mark.parametrize("block", [b for b in blocks() if b.language == "yaml"], ids=lambda block: block.name)
def test_readme_policies_load(block: Block) -> None:
    Policy.from_yaml(block.code)


def test_fragments_say_why() -> None:
    """`<!-- fragment -->` without a reason would let any block opt out silently."""
    text = README.read_text(encoding="utf-8")
    assert text.count("<!-- fragment") == sum(block.fragment is not None for block in blocks())


def test_every_json_block_is_json() -> None:
    """A configuration a user copies (an MCP client's, a request's `_meta`) must parse."""
    import json

    found = [block for block in blocks() if block.language == "json"]
    assert found
    for block in found:
        json.loads(block.code)
