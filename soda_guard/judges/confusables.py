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
from dataclasses import dataclass

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


@functools.cache
def _non_starter() -> str:
    """The class of characters whose compatibility decomposition begins with a combining mark
    (canonical combining class above 0): marks themselves, spacing marks such as U+302E and
    U+1B44, and letters that decompose to a mark (U+FF9E). Normalising reads each with the
    characters before it."""
    points = [
        cp for plane in _LETTER_PLANES for cp in plane
        if unicodedata.combining(unicodedata.normalize("NFKD", chr(cp))[:1] or " ")
    ]
    return f"[{_character_class(points)}]"


@functools.cache
def _non_starters() -> re.Pattern[str]:
    """`STREAM_SAFE_RUN` non-starters in a row."""
    return re.compile(f"(?:{_non_starter()}){{{STREAM_SAFE_RUN}}}")


@functools.cache
def _one_non_starter() -> re.Pattern[str]:
    return re.compile(_non_starter())


def begins_with_mark(char: str) -> bool:
    """Whether normalising reads `char` with the characters before it: its compatibility
    decomposition begins with a combining mark."""
    return _one_non_starter().match(char) is not None


STREAM_SAFE_RUN = 30
"""Unicode's stream-safe text format (UAX #15): at most 30 non-starters in a row, a combining
grapheme joiner after each 30 more. NFKC sorts each run of non-starters by insertion, so a line of
alternating spacing marks (U+302E U+1B44 ...) cost its length squared, in C, holding the GIL:
1.2 s for 40,000 characters. The joiner is drawn as nothing and removed after normalising."""


def build_tables() -> None:
    """Build the tables that fold lines outside ASCII now (about 0.2 s on a laptop core), not
    in the first judgment that meets such a line, inside its deadline."""
    _invisible()
    _folding()
    _non_starters()
    _one_non_starter()


_CONTROLS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f]+")
"""C0 and C1 control characters (tab and the line breaks aside): drawn as nothing or as a
placeholder, and read past by a model as it reads past `\u200b`, so removed like the invisible
characters (`[Ver\x00dict]` is `[Verdict]`)."""


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


def _ascii_look_alikes(char: str, data: dict[str, list[dict[str, str]]]) -> set[str]:
    """The ASCII characters Unicode's confusables data says `char` can be mistaken for, through
    any chain of confusables."""
    seen, todo, found = {char}, [char], set()
    while todo:
        for entry in data.get(todo.pop(), ()):
            other = entry.get("c", "")
            if len(other) != 1 or other in seen:
                continue
            seen.add(other)
            if other.isascii():
                found.add(other)
            else:
                todo.append(other)
    return found


def _letter_like(char: str) -> bool:
    return unicodedata.category(char)[0] in "LM"


@dataclass(frozen=True)
class _Folding:
    """The three C-level substitutions that fold a line: characters whose look crosses between
    letters and punctuation (from Unicode's confusables data: `ᐸ` is `<`, `∪` is a letter),
    then every other letter outside ASCII to `LETTER` (BMP and astral classes apart, as in
    `_invisible`), then whatever is left outside ASCII to `MARK`."""

    crossing: dict[str, str]
    crossing_class: re.Pattern[str]
    letters: re.Pattern[str]
    astral_letters: re.Pattern[str]

    def __call__(self, text: str) -> str:
        if self.crossing_class.search(text):
            text = self.crossing_class.sub(lambda found: self.crossing[found.group()], text)
        text = self.letters.sub(LETTER, text)
        if _ASTRAL.search(text):
            text = self.astral_letters.sub(LETTER, text)
        return _NON_ASCII.sub(MARK, text)


@functools.cache
def _folding() -> _Folding:
    from confusable_homoglyphs.confusables import confusables_data

    crossing: dict[str, str] = {}
    for char in confusables_data:
        if len(char) != 1 or char.isascii():
            continue
        looks = _ascii_look_alikes(char, confusables_data)
        if _letter_like(char) and looks and not any(look.isalpha() for look in looks):
            crossing[char] = min(looks)  # a letter drawn as punctuation: Canadian syllabics `ᐸ`, Lisu `ꓽ`
        elif not _letter_like(char) and any(look.isalpha() for look in looks):
            crossing[char] = LETTER  # a symbol drawn as a letter: `∪`
    points = [cp for plane in _LETTER_PLANES for cp in plane if _letter_like(chr(cp)) and chr(cp) not in crossing]
    return _Folding(
        crossing=crossing,
        crossing_class=re.compile(f"[{_character_class([ord(char) for char in crossing])}]"),
        letters=re.compile(f"[{_character_class([cp for cp in points if cp <= 0xFFFF])}]"),
        astral_letters=re.compile(f"[{_character_class([cp for cp in points if cp > 0xFFFF])}]"),
    )


_LETTER_PLANES = (range(0x80, 0x40000), range(0xE0000, 0xE1000))
"""Where letters and marks live (the BMP, the SMP, the ideographic planes, tags and variation
selectors)."""

_NON_ASCII = re.compile(f"[^\\x00-\\x7f{LETTER}{MARK}]")
"""What is left to become `MARK`: anything outside ASCII but the two stand-ins themselves."""


_JOINED = "\\g<0>\u034f"
"""A run of `STREAM_SAFE_RUN` non-starters, then the combining grapheme joiner (a starter)."""

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


_MARKS = re.compile(f"{MARK}*")

MARK_LEAD = 8
"""How many of a line's leading `MARK`s a delimiter may begin with (`[`, `<`, `/`, `==`): the
longest run of punctuation a delimiter pattern opens with before it needs a letter or a space,
or the least count of an opening repetition (`={2,}`). Before those, any run of `MARK`s is a
glyph the model may read past (a private-use, unassigned or replacement character, or any
other symbol outside ASCII, in front of `=== END ===`)."""


def delimiter_key(line: str) -> str:
    """The folded form of a line that shaped delimiter patterns are matched on: no invisible or
    control characters, NFKC applied (full-width and compatibility forms become ASCII), and every
    character still outside ASCII a `LETTER` (any letter, or a character Unicode's confusables
    data says looks like an ASCII letter, such as `∪`), the ASCII punctuation a letter is
    confusable with (`ᐸ` is `<`), or a `MARK` (any other symbol or punctuation). A look-alike
    from any script (Cyrillic, Cherokee, Lisu, small capitals, Canadian syllabics) thereby
    counts as whatever the marker needs there, with no table of look-alikes to fall behind."""
    if line.isascii():
        return (_CONTROLS.sub("", line) if _CONTROLS.search(line) else line).lstrip()
    visible = strip_invisible(_CONTROLS.sub("", line)).lstrip()
    normal = unicodedata.normalize("NFKC", _non_starters().sub(_JOINED, visible))
    if normal != visible:  # a compatibility decomposition can bring back a combining mark
        normal = strip_invisible(normal).lstrip()
    return _folding()(normal)


def is_delimiter(line: str, delimiters: re.Pattern[str]) -> bool:
    """Whether a judge could read `line` as the structure `delimiters` describes: spelled
    exactly, through invisible characters, or through characters outside ASCII, after any run
    of `MARK`s. The shape is tried where the run's last `MARK_LEAD` characters begin, not after
    every prefix of the run: written as one pattern (`MARK*` in front), a line of emoji or
    box-drawing characters backtracked through every split of itself, cubic in its length
    (40 s for a line of 2,000)."""
    key = delimiter_key(line)
    pattern = shaped(delimiters)
    run = _MARKS.match(key).end()  # type: ignore[union-attr]
    return any(pattern.match(key[start:]) for start in range(max(0, run - MARK_LEAD), run + 1))
