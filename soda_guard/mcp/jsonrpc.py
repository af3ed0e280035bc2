"""JSON-RPC lines as the proxy reads and writes them."""

from __future__ import annotations

import json
from typing import Any

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
#: the MCP SDKs' code for a request that timed out
REQUEST_TIMEOUT = -32001


class DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Parsers disagree on `{"method": "ping", "method": "tools/call"}` (first or last wins):
    a message the server could read otherwise than the proxy is refused, not relayed."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise DuplicateKey("duplicate keys in a JSON object")
    return found


def parse(raw: bytes) -> Any:
    return json.loads(raw, object_pairs_hook=_no_duplicates)


def error(request_id: Any, code: int, message: str) -> bytes:
    return line({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})


def line(message: Any) -> bytes:
    text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode() + b"\n"
    except UnicodeEncodeError:  # a lone surrogate, which UTF-8 cannot carry: escaped, as JSON can
        return json.dumps(message, separators=(",", ":")).encode() + b"\n"
