"""Spreading judgments over servers: least outstanding, cool-down, per-conversation stickiness,
and the concurrency bound under load."""

from __future__ import annotations

import asyncio
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from soda_guard.backends.base import GenerationRequest
from soda_guard.backends.openai_backend import OpenAIBackend
from soda_guard.backends.scripted import ScriptedBackend, soda_reply
from soda_guard.backends.server_pool import ServerPool
from soda_guard.judges.soda import SodaJudge
from soda_guard.testing.server import LoopbackServer, create_app


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_least_outstanding_server_is_chosen() -> None:
    pool = ServerPool(["http://a/v1", "http://b/v1", "http://c/v1"])
    a, b, c = pool.servers
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 2
    assert pool.choose(None) is b
    b.outstanding = 5
    assert pool.choose(None) is c


def test_ties_rotate_so_one_at_a_time_traffic_still_spreads() -> None:
    pool = ServerPool(["http://a/v1", "http://b/v1"])
    chosen = Counter(pool.choose(f"conversation-{n}").base_url for n in range(10))
    assert chosen == {"http://a/v1": 5, "http://b/v1": 5}


def test_failed_server_is_skipped_until_its_cool_down_ends() -> None:
    clock = FakeClock()
    pool = ServerPool(["http://a/v1", "http://b/v1"], cooldown_s=5.0, clock=clock)
    a, b = pool.servers
    pool.failed(a)
    assert all(pool.choose(None) is b for _ in range(4))
    clock.now += 5.0
    assert {pool.choose(None).base_url for _ in range(4)} == {"http://a/v1", "http://b/v1"}


def test_when_every_server_is_cooling_down_the_first_to_return_is_tried() -> None:
    clock = FakeClock()
    pool = ServerPool(["http://a/v1", "http://b/v1"], cooldown_s=5.0, clock=clock)
    a, b = pool.servers
    pool.failed(b)
    clock.now += 1.0
    pool.failed(a)
    assert pool.choose("k") is b and pool.choose(None, avoid=b) is b


def test_a_conversation_sticks_to_its_server_and_moves_when_it_fails() -> None:
    clock = FakeClock()
    pool = ServerPool(["http://a/v1", "http://b/v1"], cooldown_s=5.0, clock=clock)
    home = pool.choose("conv")
    for server in pool.servers:
        server.outstanding = 0 if server is not home else 10
    assert pool.choose("conv") is home
    pool.failed(home)
    moved = pool.choose("conv")
    assert moved is not home
    clock.now += 10.0
    assert pool.choose("conv") is moved


def test_sticky_table_is_bounded() -> None:
    pool = ServerPool(["http://a/v1", "http://b/v1"], max_sticky=3)
    for n in range(10):
        pool.choose(f"c{n}")
    assert len(pool._sticky) == 3


def _echo(request: GenerationRequest) -> str:
    return soda_reply(False, request.messages[-1]["content"])


def _request(n: int, key: str | None = None) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": f"judgment-{n}"}], score=SodaJudge.score_spec, cache_key=key)


def _ids(server: LoopbackServer) -> list[str]:
    return [body["messages"][-1]["content"] for body in server.app.state.stats.bodies]


def test_same_conversation_goes_to_the_same_server_over_http() -> None:
    with LoopbackServer(create_app(ScriptedBackend(_echo), model_id="m")) as first, LoopbackServer(
        create_app(ScriptedBackend(_echo), model_id="m")
    ) as second:
        with OpenAIBackend("m", base_urls=[first.base_url, second.base_url]) as client:
            for turn in range(3):
                for conversation in range(6):
                    client.generate([_request(conversation * 10 + turn, key=f"conv-{conversation}")])
    homes: dict[int, set[str]] = {}
    for name, server in (("first", first), ("second", second)):
        for judged in _ids(server):
            homes.setdefault(int(judged.split("-")[1]) // 10, set()).add(name)
    assert set(homes) == set(range(6))
    assert all(len(servers) == 1 for servers in homes.values())
    assert {next(iter(s)) for s in homes.values()} == {"first", "second"}


@pytest.mark.parametrize("batched", [True, False])
async def test_200_concurrent_judgments_respect_max_concurrency_and_lose_nothing(batched: bool) -> None:
    app = create_app(ScriptedBackend(_echo, delay_s=0.005), model_id="m")
    requests = [_request(n, key=f"conv-{n % 13}") for n in range(200)]
    with LoopbackServer(app) as server:
        async with OpenAIBackend("m", base_url=server.base_url, max_concurrency=8, timeout_s=30) as client:
            if batched:
                answers = await client.agenerate(requests)
            else:
                answers = [batch[0] for batch in await asyncio.gather(*(client.agenerate([r]) for r in requests))]
    stats = app.state.stats
    assert stats.peak_in_flight <= 8
    assert stats.served == 200 and sorted(_ids(server)) == sorted(f"judgment-{n}" for n in range(200))
    assert [a.text for a in answers] == [soda_reply(False, f"judgment-{n}") for n in range(200)]


def test_sync_callers_from_many_threads_share_one_bound() -> None:
    app = create_app(ScriptedBackend(_echo, delay_s=0.005), model_id="m")
    with LoopbackServer(app) as server, OpenAIBackend("m", base_url=server.base_url, max_concurrency=3) as client:
        with ThreadPoolExecutor(max_workers=12) as threads:
            answers = list(threads.map(lambda n: client.generate([_request(n)])[0].text, range(60)))
    assert app.state.stats.peak_in_flight <= 3
    assert answers == [soda_reply(False, f"judgment-{n}") for n in range(60)]
