"""The package layering of issue 16: the engine depends on torch, transformers and shared leaf
modules (request/result types, chat tokens, the score rule and scoring), never on `backends`, `judges` or the
guard; judges never import backends or the engine; and no two of `engine`, `backends`,
`judges` import each other both ways. Read from the source, so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import soda_guard

ROOT = Path(soda_guard.__file__).parent
LEAVES = {"soda_guard.generation", "soda_guard.chat_tokens", "soda_guard.score", "soda_guard.scoring", "soda_guard.errors"}


def imports_of(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
    return {name for name in found if name.startswith("soda_guard")}


def test_the_engine_imports_only_itself_and_the_shared_leaves() -> None:
    outside = {name for name in imports_of("engine") if not name.startswith("soda_guard.engine")}
    assert outside <= LEAVES, outside - LEAVES


def test_judges_import_neither_backends_nor_the_engine() -> None:
    bad = {name for name in imports_of("judges") if name.startswith(("soda_guard.backends", "soda_guard.engine"))}
    assert not bad


def test_no_import_cycle_between_engine_backends_and_judges() -> None:
    packages = ("engine", "backends", "judges")
    edges = {(a, b) for a in packages for b in packages if a != b and any(n.startswith(f"soda_guard.{b}") for n in imports_of(a))}
    assert not {(a, b) for a, b in edges if (b, a) in edges}, edges


def test_the_leaves_import_no_package_of_the_project() -> None:
    for leaf in LEAVES:
        path = ROOT / (leaf.split(".")[1] + ".py")
        modules = {node.module for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom) and node.module}
        assert not {m for m in modules if m.startswith(("soda_guard.backends", "soda_guard.engine", "soda_guard.judges"))}, leaf
