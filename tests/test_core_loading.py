"""Loading errors a user can act on: a hub id that is not here fails at once when the hub cannot
be reached (no retry storm), and the advice names the command that exists today (`hf`)."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Iterator

import pytest
import torch

from soda_guard import loading
from soda_guard.errors import ModelLoadError


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def hub_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Points the hub client at a loopback address and lifts the suite's HF_HUB_OFFLINE."""
    from huggingface_hub import constants

    def point(endpoint: str) -> None:
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)

    yield point


class _Answer(BaseHTTPRequestHandler):
    def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        return


def test_probe_tells_an_answering_hub_from_a_closed_port(hub_at: Any) -> None:
    server = HTTPServer(("127.0.0.1", 0), _Answer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        hub_at(f"http://127.0.0.1:{server.server_port}")
        assert loading.hub_reachable(timeout_s=5) is True
    finally:
        server.shutdown()
        server.server_close()
    hub_at(f"http://127.0.0.1:{closed_port()}")
    assert loading.hub_reachable(timeout_s=5) is False


def test_offline_setting_skips_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(loading.httpx, "head", lambda *a, **k: pytest.fail("probed the hub while offline"))
    assert loading.hub_reachable() is False


@pytest.mark.parametrize("load", ["tokenizer", "model"])
def test_uncached_hub_id_with_the_hub_unreachable_asks_the_cache_only_and_says_hf_download(
    hub_at: Any, monkeypatch: pytest.MonkeyPatch, load: str
) -> None:
    import transformers

    hub_at(f"http://127.0.0.1:{closed_port()}")
    calls: list[dict[str, Any]] = []
    auto = transformers.AutoTokenizer if load == "tokenizer" else transformers.AutoModelForCausalLM
    real = auto.from_pretrained

    def spy(source: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(source, *args, **kwargs)

    monkeypatch.setattr(auto, "from_pretrained", spy)
    with pytest.raises(ModelLoadError) as caught:
        if load == "tokenizer":
            loading.load_tokenizer("acme/not-on-this-machine")
        else:
            loading.load_causal_lm("acme/not-on-this-machine", torch.device("cpu"), torch.float32)
    assert [call.get("local_files_only") for call in calls] == [True]
    message = str(caught.value)
    assert loading.HUB_UNREACHABLE in message
    assert "`hf download acme/not-on-this-machine --local-dir DIR`" in message
    assert "huggingface-cli" not in message and "\n" not in message


def test_a_reachable_hub_is_asked_as_usual(hub_at: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=loading.HUB_PROBE_TIMEOUT_S: True)
    assert loading._source("acme/judge") == ("acme/judge", {})
    monkeypatch.setattr(loading, "hub_reachable", lambda timeout_s=loading.HUB_PROBE_TIMEOUT_S: False)
    assert loading._source("acme/judge") == ("acme/judge", {"local_files_only": True})
