"""Characters that let a line look like a judge delimiter without spelling one.

A model reads `[Ver\u200bdict]`, `[АSSISTANT]` (Cyrillic А) and `【Verdict】` much as it reads the
real markers, so delimiters are detected on a folded form of each line. NFKC already maps width
and compatibility variants (`［ＵＳＥＲ］`, `＝`); what it leaves is here: characters drawn as
nothing, and a small table of letters and brackets that look like the ASCII ones the judges'
delimiters use. The table only needs to cover those delimiters' characters, not all of Unicode.
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


_LOOK_ALIKES = {
    "[": "\u3010\u3014\u3016\u3018\u301a\u2e22\u27e6\u2045",
    "]": "\u3011\u3015\u3017\u3019\u301b\u2e23\u27e7\u2046",
    "=": "\u30a0\u2550\ua78a\u268c\u2261",
    "<": "\u2039\u276c\u3008\u27e8",
    ">": "\u203a\u276d\u3009\u27e9",
    ":": "\u0589\u05c3\u2236\ua789\u02d0",
    "A": "\u0391\u0410\u13aa",
    "B": "\u0392\u0412",
    "C": "\u03f9\u0421",
    "D": "\u13a0",
    "E": "\u0395\u0415",
    "H": "\u0397\u041d",
    "I": "\u0399\u0406\u04c0",
    "K": "\u039a\u041a",
    "M": "\u039c\u041c",
    "N": "\u039d",
    "O": "\u039f\u041e",
    "P": "\u03a1\u0420",
    "R": "\u13a1",
    "S": "\u0405",
    "T": "\u03a4\u0422",
    "X": "\u03a7\u0425",
    "Y": "\u03a5\u04ae",
    "a": "\u0430\u0251",
    "c": "\u0441\u03f2",
    "d": "\u0501",
    "e": "\u0435",
    "g": "\u0261",
    "h": "\u04bb",
    "i": "\u0456\u0269",
    "j": "\u0458",
    "k": "\u03ba",
    "n": "\u0578",
    "o": "\u03bf\u043e",
    "p": "\u0440\u03c1",
    "r": "\u0433",
    "s": "\u0455",
    "t": "\u03c4",
    "u": "\u03c5\u057d",
    "v": "\u03bd\u0475",
    "x": "\u0445",
    "y": "\u0443",
}

_FOLD = {look: ascii_char for ascii_char, looks in _LOOK_ALIKES.items() for look in looks}
_FOLDABLE = re.compile("[" + re.escape("".join(_FOLD)) + "]")


def fold(text: str) -> str:
    """Look-alikes to their ASCII letters; the regex only stops where there is one to fold."""
    return _FOLDABLE.sub(lambda found: _FOLD[found.group()], text)


def delimiter_key(line: str) -> str:
    """The form of a line that delimiter patterns are matched on."""
    if line.isascii():
        return line.lstrip()
    visible = strip_invisible(line).lstrip()
    normal = unicodedata.normalize("NFKC", visible)
    if normal != visible:  # a compatibility decomposition can bring back a combining mark
        normal = strip_invisible(normal).lstrip()
    return fold(normal)

