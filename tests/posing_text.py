"""Text that hashes and compares as another text: what a cache keyed by text must not be
fooled by (LangChain makes message content plain `str`; code can still put a subclass past it)."""

from __future__ import annotations


class Posing(str):
    def __new__(cls, text: str, posing_as: str) -> Posing:
        made = super().__new__(cls, text)
        made.posing_as = posing_as  # type: ignore[attr-defined]
        return made

    def __hash__(self) -> int:
        return hash(self.posing_as)  # type: ignore[attr-defined]

    def __eq__(self, other: object) -> bool:
        return True
