"""Chat-template rendering and tokenisation in which message content can never become a control
token.

A tool result that contains the text `<|im_end|>` must reach the judge as those characters, not
as the end-of-turn token, or the content could close its own block and forge a new one. When no
content holds a special-token string (the normal case) the whole prompt is tokenised at once,
exactly as the judge's authors did; otherwise the template's own text and the content are
tokenised separately and content gets `split_special_tokens=True`.

Every tokenizer call of this package goes through `tokenize`, under one lock: a fast tokenizer
implements `split_special_tokens=True` by flipping shared state (`encode_special_tokens`) for the
length of the call, so a concurrent call on another thread could read `<|im_end|>` typed in a
tool result as the control token, or a template's own `<|im_end|>` as text.
"""

from __future__ import annotations

import threading
import uuid
from typing import Any

_TOKENIZER_LOCK = threading.Lock()


def tokenize(tokenizer: Any, text: str, *, split_special: bool = False, **kwargs: Any) -> Any:
    """`tokenizer(text, add_special_tokens=False, ...)`, safe to call from several threads."""
    with _TOKENIZER_LOCK:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=split_special, **kwargs)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def special_token_strings(tokenizer: Any) -> list[str]:
    specials = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if getattr(token, "special", False):
            specials.add(str(token))
    return sorted((s for s in specials if s), key=len, reverse=True)


def _contains_special(text: str, specials: list[str]) -> bool:
    return any(special in text for special in specials)


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    specials = special_token_strings(tokenizer)
    if not any(_contains_special(m.get("content", ""), specials) for m in messages):
        prompt = render_chat(tokenizer, messages, add_generation_prompt)
        return list(tokenize(tokenizer, prompt)["input_ids"])
    sentinel = f"SODAGUARD{uuid.uuid4().hex}"
    masked = [{**m, "content": f"{sentinel}{i}{sentinel}"} for i, m in enumerate(messages)]
    template_text = render_chat(tokenizer, masked, add_generation_prompt)
    ids: list[int] = []
    pieces = template_text.split(sentinel)
    # pieces alternate: template text, message index, template text, message index, ...
    for position, piece in enumerate(pieces):
        if position % 2 == 1:
            content = messages[int(piece)].get("content", "")
            ids.extend(tokenize(tokenizer, content, split_special=True)["input_ids"])
        elif piece:
            ids.extend(tokenize(tokenizer, piece)["input_ids"])
    return ids


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE spells each byte as one printable character; this maps them back so a
    token's exact bytes can be reported even when it is a fragment of a UTF-8 character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in chars:
            chars[byte] = chr(256 + extra)
            extra += 1
    return {char: byte for byte, char in chars.items()}


_BYTE_DECODER = _byte_decoder()


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if token_id in tokenizer.all_special_ids or not isinstance(piece, str):
        return tokenizer.decode([token_id]).encode("utf-8")
    if all(char in _BYTE_DECODER for char in piece):
        return bytes(_BYTE_DECODER[char] for char in piece)
    return tokenizer.decode([token_id]).encode("utf-8")
