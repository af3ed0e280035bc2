"""Where in a judge's output the verdict score is read: the one rule every backend applies.

A score read anywhere but at the label the parser accepted can contradict the verdict: an
output that echoes an escaped `\\[Verdict] SAFE` before its real `[Verdict] UNSAFE` would get the
first label's probability, and a policy threshold would turn UNSAFE into allow. So a judge's
`ScoreSpec.locate` is its parser's answer to "where does the accepted label start", and the
score is read at the generated token that holds that character. Backends differ only in what
they hold for that token (logits, returned logprobs, or just the text).

Everything here is linear in the output's length: a judge that rambles for its whole token
budget must not cost the guard seconds of CPU after it has answered.
"""

from __future__ import annotations

import codecs
import re
from functools import lru_cache
from itertools import accumulate
from typing import Iterable, Sequence

from soda_guard.generation import ScoreSpec


def decode_pieces(chunks: Iterable[bytes]) -> list[str]:
    """Each token's share of the decoded text: a character split across tokens belongs to the
    token that completes it, so the pieces join to exactly the decoded output."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(chunk) for chunk in chunks]
    tail = decoder.decode(b"", final=True)
    if tail:
        if pieces:
            pieces[-1] += tail
        else:
            pieces.append(tail)
    return pieces


@lru_cache(maxsize=32)
def _marker(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _by_marker(pieces: Sequence[str], spec: ScoreSpec) -> tuple[int, bool] | None:
    """For specs without a parser (custom and test specs): the last token boundary of the first
    run of boundaries whose prefix matches `spec.marker`."""
    marker = _marker(spec.marker)
    found: tuple[int, bool] | None = None
    prefix = ""
    for index, piece in enumerate(pieces):
        if marker.search(prefix):
            found = (index, prefix[-1:].isspace())
        elif found is not None:
            break
        prefix += piece
    return found


def label_token(pieces: Sequence[str], spec: ScoreSpec) -> tuple[int, bool] | None:
    """The index of the token holding the first character of the label the judge's parser
    accepted, and whether the text before that token ends in whitespace (so the label word was
    spelled without a leading space). None when the parser accepted no label."""
    if spec.locate is None:
        return _by_marker(pieces, spec)
    text = "".join(pieces)
    at = spec.locate(text)
    if at is None:
        return None
    ends = list(accumulate(len(piece) for piece in pieces))
    for index, end in enumerate(ends):
        if end > at:
            start = end - len(pieces[index])
            return index, text[start - 1 : start].isspace()
    return None


def label_value(text: str, spec: ScoreSpec) -> float | None:
    """1.0 / 0.0 from the label word itself, for a backend that returned no probabilities."""
    if spec.locate is not None:
        at = spec.locate(text)
        rest = text[at:] if at is not None else None
    else:
        found = label_token(list(text), spec)
        rest = text[found[0] :].lstrip() if found is not None else None
    if rest is None:
        return None
    words = [(word, 1.0) for word in spec.positive] + [(word, 0.0) for word in spec.negative]
    for word, value in sorted(words, key=lambda item: len(item[0]), reverse=True):
        if rest[: len(word)].casefold() == word.casefold():  # the SODA parser reads `Unsafe` too
            return value
    return None
