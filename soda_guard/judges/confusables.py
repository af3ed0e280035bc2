"""Characters that let a line look like a judge delimiter without spelling one.

A model reads `[Ver\u200bdict]`, `[АSSISTANT]` (Cyrillic А), `[ᴠᴇʀᴅɪᴄᴛ]` and `【Verdict】` much
as it reads the real markers, so delimiters are detected on a folded form of each line. NFKC
maps width and compatibility variants (`［ＵＳＥＲ］`, `＝`); characters drawn as nothing are
removed; and every character still outside ASCII may stand for any letter of a marker if it
is a letter (or looks like one), and for any punctuation otherwise. The rule is complete by
construction: a hand-picked table of look-alikes always missed a script
(Lisu, Cherokee, small capitals, Canadian syllabics). A line of ordinary non-ASCII text gets a
backslash only where it has a marker's shape (`[Итог]` has `[USER]`'s), which the judge reads as
text; ASCII lines are checked exactly as before.
"""

from __future__ import annotations

import functools
import re
import unicodedata

_BLANK_FILLERS = "\u115f\u1160\u3164\uffa0\u2800\u180e\u034f"
"""Hangul fillers, the braille blank, the Mongolian vowel separator and the combining grapheme
joiner: not format characters, yet drawn as nothing."""

_PLANES = (range(0x20000), range(0xE0000, 0xE1000))
"""Where format, combining and enclosing marks live (the BMP, the SMP, tags and variation
selectors); scanning only these keeps building the class to a fraction of a second."""


def _character_class(points: list[int]) -> str:
    ranges: list[list[int]] = []
    for point in sorted(points):
        if ranges and ranges[-1][1] == point - 1:
            ranges[-1][1] = point
        else:
            ranges.append([point, point])
    return "".join(re.escape(chr(low)) + ("-" + re.escape(chr(high)) if high > low else "") for low, high in ranges)


@functools.cache
def _invisible() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(BMP, astral) invisible characters. Kept apart because `re` tests a BMP class with a
    bitmap but an astral one range by range: one class for both made every scan two orders of
    magnitude slower, and astral characters are rare enough to be looked for first."""
    points = {cp for plane in _PLANES for cp in plane if unicodedata.category(chr(cp)) in ("Cf", "Mn", "Me")}
    points |= {ord(char) for char in _BLANK_FILLERS}
    bmp = [cp for cp in points if cp <= 0xFFFF]
    astral = [cp for cp in points if cp > 0xFFFF]
    return re.compile(f"[{_character_class(bmp)}]+"), re.compile(f"[{_character_class(astral)}]+")


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def strip_invisible(text: str) -> str:
    bmp, astral = _invisible()
    text = bmp.sub("", text)
    return astral.sub("", text) if _ASTRAL.search(text) else text


LETTER = "\u01c2"
"""What a character outside ASCII that may be read as a letter becomes: itself a letter (`\\w`,
`[^\\W\\d_]`), which the shaped patterns accept wherever a marker has a letter."""

MARK = "\u00a6"
"""What any other character outside ASCII becomes: not a word character and not a space,
accepted wherever a marker has punctuation (`[`, `=`, `:`, `<`, ...)."""


def _ascii_look_alikes(char: str) -> set[str]:
    """The ASCII characters Unicode's confusables data (`confusable_homoglyphs`) says `char` can
    be mistaken for, through any chain of confusables."""
    from confusable_homoglyphs.confusables import confusables_data

    seen, todo, found = {char}, [char], set()
    while todo:
        for entry in confusables_data.get(todo.pop(), ()):
            other = entry.get("c", "")
            if len(other) != 1 or other in seen:
                continue
            seen.add(other)
            if other.isascii():
                found.add(other)
            else:
                todo.append(other)
    return found


class _Folding(dict[int, str]):
    """`str.translate` table, filled on first sight of each character: the first lookup of a
    character costs a Python call, every later one is a C-level dict hit."""

    def __missing__(self, point: int) -> str:
        char = chr(point)
        if char.isascii():
            folded = char
        else:
            looks = _ascii_look_alikes(char)
            letter_like = unicodedata.category(char)[0] in "LM"
            if any(look.isalpha() for look in looks) or (letter_like and not looks):
                folded = LETTER
            elif letter_like:  # a letter drawn as punctuation: Canadian syllabics `ᐸ`, Lisu `ꓽ`
                folded = min(looks)
            else:
                folded = MARK
        self[point] = folded
        return folded


_FOLDING = _Folding()
_META = frozenset("\\.^$*+?{}[]|()")


def _shaped_source(source: str) -> str:
    """`source` with every literal letter also accepting `LETTER` and every other literal
    character `MARK`. Character classes, groups, quantifiers and escapes such as `\\s`, `\\b`
    are kept: `LETTER` is a word character and `MARK` is not, so they hold as they would for
    the ASCII characters they stand for."""
    out: list[str] = []
    index = 0
    while index < len(source):
        char = source[index]
        if char == "\\":
            escaped = source[index + 1]
            out.append(source[index : index + 2] if escaped.isalnum() else _literal(escaped))
            index += 2
        elif char == "[":
            end = source.index("]", index + 2 if source[index + 1 : index + 2] in ("^", "]") else index + 1)
            out.append(source[index : end + 1])
            index = end + 1
        elif char == "(" and source[index + 1 : index + 2] == "?":
            end = source.index(":", index)
            out.append(source[index : end + 1])
            index = end + 1
        elif char == "{" and re.match(r"\{\d*,?\d*\}", source[index:]):
            end = source.index("}", index)
            out.append(source[index : end + 1])
            index = end + 1
        elif char in _META:
            out.append(char)
            index += 1
        else:
            out.append(_literal(char))
            index += 1
    return "".join(out)


def _literal(char: str) -> str:
    return f"[{re.escape(char)}{LETTER if char.isalpha() else MARK}]"


@functools.lru_cache(maxsize=None)
def shaped(delimiters: re.Pattern[str]) -> re.Pattern[str]:
    """The delimiter pattern as a shape: it matches a folded line wherever some choice of ASCII
    letters for its `LETTER`s and ASCII punctuation for its `MARK`s would match `delimiters`."""
    return re.compile(_shaped_source(delimiters.pattern), delimiters.flags)


def delimiter_key(line: str) -> str:
    """The folded form of a line that shaped delimiter patterns are matched on: no invisible
    characters, NFKC applied (full-width and compatibility forms become ASCII), and every
    character still outside ASCII a `LETTER` (any letter, or a character Unicode's confusables
    data says looks like an ASCII letter, such as `∪`), the ASCII punctuation a letter is
    confusable with (`ᐸ` is `<`), or a `MARK` (any other symbol or punctuation). A look-alike
    from any script (Cyrillic, Cherokee, Lisu, small capitals, Canadian syllabics) thereby
    counts as whatever the marker needs there, with no table of look-alikes to fall behind."""
    if line.isascii():
        return line.lstrip()
    visible = strip_invisible(line).lstrip()
    normal = unicodedata.normalize("NFKC", visible)
    if normal != visible:  # a compatibility decomposition can bring back a combining mark
        normal = strip_invisible(normal).lstrip()
    return normal.translate(_FOLDING)


def is_delimiter(line: str, delimiters: re.Pattern[str]) -> bool:
    """Whether a judge could read `line` as the structure `delimiters` describes: spelled
    exactly, through invisible characters, or through characters outside ASCII."""
    return shaped(delimiters).match(delimiter_key(line)) is not None
