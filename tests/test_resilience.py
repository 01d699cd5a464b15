"""Serve-stale, prefetch, upstream health, the limit on queries in flight and loop
detection, end to end: dnspython as the client, dnsproxy in-process, a scripted fake
upstream that can answer, stay silent, answer late, reset a connection or go away.

The real-component versions (Unbound stopped for a minute, a name with TTL 3 asked 20
times a second, dnsmasq forwarding back) are in ``test_resilience_real.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import RECORDS, make_config, running, wait_for
from fakeupstream import Action, Close, Delay, Drop, FakeUpstream, zone_handler
from test_process import free_port
from test_reload import app_from, doc_for, write

from dnsproxy.app import App
from dnsproxy.cache import STALE_TTL_S
from dnsproxy.config import (
    CachePolicy,
    ConfigError,
    PrefetchConfig,
    ServerLimits,
    ServeStaleConfig,
    UpstreamConfig,
    ZoneConfig,
    parse_config,
)
from dnsproxy.forwarder import LoopError

NEW = {("www.example.", "A"): ["169.254.1.2"]}  # what the upstream says after a change


async def ask(app: App, name: str = "www.example.", edns: bool = True) -> dns.message.Message:
    hp = app.listen[0]
    q = dns.message.make_query(name, "A", use_edns=0 if edns else False)
    return await dns.asyncquery.udp(q, hp.host, port=hp.port, timeout=5)


def address(response: dns.message.Message) -> str:
    assert response.rcode() == dns.rcode.NOERROR, dns.rcode.to_text(response.rcode())
    return str(response.answer[0][0])


def ttl(response: dns.message.Message) -> int:
    return int(response.answer[0].ttl)


def stale(response: dns.message.Message) -> bool:
    """Served stale: TTL 30 and EDE 3 "Stale Answer" (the client sent EDNS)."""
    codes = [o.code for o in response.options if isinstance(o, dns.edns.EDEOption)]
    return ttl(response) == STALE_TTL_S and codes == [3]


def asked(fake: FakeUpstream, name: str = "www.example.") -> int:
    return sum(1 for _, q in fake.queries if q.question[0].name.to_text().lower() == name)


def config_for(fake: FakeUpstream, **kw: Any) -> Any:
    stale_config = kw.pop("serve_stale", ServeStaleConfig())
    config = make_config(fake.port, **kw)
    return dataclasses.replace(config, cache_serve_stale=stale_config)


class SlowsDown:
    """A fake upstream's handler: ``RECORDS`` with TTL 1 at once, and once ``slow`` is
    set, ``then`` (the same records by default) ``delay_s`` late."""

    def __init__(self, delay_s: float, then: dict[tuple[str, str], list[str]] = RECORDS) -> None:
        self.slow = False
        self.delay_s = delay_s
        self.now = zone_handler(RECORDS, ttl=1)
        self.then = zone_handler(then, ttl=1)

    def __call__(self, query: dns.message.Message, transport: str) -> Action:
        if self.slow:
            return Delay(self.delay_s, self.then(query, transport))
        return self.now(query, transport)


async def expire(seconds: float = 1.1) -> None:
    """Wait for entries with TTL 1 to expire (the clock is the subject here)."""
    await asyncio.sleep(seconds)


async def test_an_expired_name_is_served_stale_when_the_upstream_is_gone() -> None:
    fake = FakeUpstream(zone_handler(RECORDS, ttl=1))
    await fake.start()
    try:
        async with running(config_for(fake)) as app:
            assert address(await ask(app)) == "169.254.1.1"
            await fake.stop()  # connections are refused from now on
            await expire()
            first = await ask(app)
            assert address(first) == "169.254.1.1" and stale(first)
            plain = await ask(app, edns=False)
            assert address(plain) == "169.254.1.1" and ttl(plain) == STALE_TTL_S
            assert plain.edns < 0
            # The refresh failed: for 30 s the name is answered stale without asking.
            upstream = app.forwarder.servers[f"tcp://127.0.0.1:{fake.port}"].upstream
            queries = upstream.stats.queries
            for _ in range(5):
                assert stale(await ask(app))
            assert upstream.stats.queries == queries
            assert app.forwarder.stats.stale_served == 7
            # A name never cached gets SERVFAIL.
            missing = await ask(app, "mail.example.")
            assert missing.rcode() == dns.rcode.SERVFAIL
    finally:
        await fake.stop()


async def test_stale_answers_end_at_the_zone_maximum_staleness() -> None:
    fake = FakeUpstream(zone_handler(RECORDS, ttl=1))
    await fake.start()
    try:
        policy = CachePolicy(max_stale_s=2)
        async with running(config_for(fake, cache=policy)) as app:
            await ask(app)
            await fake.stop()
            await expire()
            assert stale(await ask(app))
            await expire(2.0)  # 3.1 s after it was cached: 1 s TTL, 2 s of staleness
            assert (await ask(app)).rcode() == dns.rcode.SERVFAIL
    finally:
        await fake.stop()


async def test_the_client_response_timer_answers_stale_while_the_refresh_goes_on() -> None:
    handler = SlowsDown(1.0, then=NEW)
    async with FakeUpstream(handler) as fake:
        config = config_for(
            fake,
            try_timeout_s=3.0,
            deadline_s=3.0,
            serve_stale=ServeStaleConfig(answer_after_s=0.3),
        )
        async with running(config) as app:
            assert address(await ask(app)) == "169.254.1.1"
            handler.slow = True
            await expire()
            # The upstream takes 1 s: the client gets the old address from the timer...
            first = await ask(app)
            assert address(first) == "169.254.1.1" and stale(first)
            # ... and the refresh, still under way, then brings the new one.
            async with asyncio.timeout(5):
                while address(response := await ask(app)) != "169.254.1.2":
                    assert stale(response)
                    await asyncio.sleep(0.05)
            assert not stale(response)
            assert asked(fake) == 2
            assert app.forwarder.stats.servfail_sent == 0


async def test_a_held_name_is_asked_again_as_soon_as_its_server_answers() -> None:
    answer = zone_handler(RECORDS, ttl=1)
    later = zone_handler(NEW, ttl=1)
    phase = {"state": "up"}

    def handler(query: dns.message.Message, transport: str) -> Action:
        if phase["state"] == "silent":
            return Drop()
        return (answer if phase["state"] == "up" else later)(query, transport)

    async with FakeUpstream(handler) as fake:
        config = config_for(fake, try_timeout_s=0.2, deadline_s=0.5)
        async with running(config) as app:
            server = app.forwarder.servers[f"tcp://127.0.0.1:{fake.port}"]
            await ask(app)
            phase["state"] = "silent"
            await expire()
            assert stale(await ask(app))  # two tries timed out: stale, server down
            assert not server.up
            assert asked(fake) == 3
            assert stale(await ask(app))
            assert asked(fake) == 3, "held: not asked again"
            phase["state"] = "back"
            # A probe finds the server answering; the held name is refreshed at once.
            assert await wait_for(lambda: server.up, 5.0)
            assert address(await ask(app)) == "169.254.1.2"


async def test_ede_is_left_out_when_turned_off() -> None:
    fake = FakeUpstream(zone_handler(RECORDS, ttl=1))
    await fake.start()
    try:
        config = config_for(fake, serve_stale=ServeStaleConfig(ede=False))
        async with running(config) as app:
            await ask(app)
            await fake.stop()
            await expire()
            response = await ask(app)
            assert address(response) == "169.254.1.1" and ttl(response) == STALE_TTL_S
            assert response.options == ()
    finally:
        await fake.stop()


async def test_prefetch_refreshes_popular_names_before_they_expire_and_only_those() -> None:
    async with FakeUpstream(zone_handler(RECORDS, ttl=2)) as fake:
        config = dataclasses.replace(
            make_config(fake.port), cache_prefetch=PrefetchConfig(min_hits=3)
        )
        async with running(config) as app:
            assert address(await ask(app, "mail.example.")) == "169.254.1.2"  # asked once
            for _ in range(40):  # 10 a second for 4 s: two TTLs over
                assert address(await ask(app)) == "169.254.1.1"
                await asyncio.sleep(0.1)
            stats = app.server.stats
            assert stats.misses == 2, "only the first query of each name was a miss"
            assert asked(fake) >= 3, "refreshed in the background"
            assert app.forwarder.stats.prefetches == asked(fake) - 1
            assert asked(fake, "mail.example.") == 1, "asked once: not popular"


async def test_one_limit_on_queries_in_flight_beyond_it_servfail_at_once() -> None:
    answer = zone_handler(RECORDS)

    def slow(query: dns.message.Message, transport: str) -> Action:
        return Delay(0.5, answer(query, transport))

    async with FakeUpstream(slow) as fake:
        config = make_config(fake.port, limits=ServerLimits(max_inflight=3))
        async with running(config) as app:
            names = [f"n{i}.example." for i in range(5)]
            responses = await asyncio.gather(*(ask(app, name) for name in names))
            rcodes = sorted(r.rcode() for r in responses)
            assert rcodes == [dns.rcode.SERVFAIL] * 2 + [dns.rcode.NXDOMAIN] * 3
            assert app.forwarder.stats.inflight_rejects == 2
            upstream = app.forwarder.servers[f"tcp://127.0.0.1:{fake.port}"].upstream
            assert upstream.stats.pool_full == 0


def test_the_pool_must_carry_the_limit_on_queries_in_flight() -> None:
    zones = [{"zone": ".", "upstreams": ["127.0.0.1"]}]
    config = parse_config({"zones": zones}, env={})
    pool = config.upstream
    assert pool.tcp_connections * pool.max_inflight_per_connection >= config.limits.max_inflight
    # Raising the limit alone sizes the pool to carry it...
    raised_limit = parse_config({"zones": zones, "limits": {"max_inflight": 5000}}, env={})
    assert raised_limit.upstream.max_inflight_per_connection == 2500
    # ... but a pool set too small for it is refused.
    with pytest.raises(ConfigError) as raised:
        parse_config({"zones": zones, "upstream": {"max_inflight_per_connection": 100}}, env={})
    assert raised.value.problems == [
        "upstream.max_inflight_per_connection: the pool of 2 connections of 100 queries each "
        "carries 200 queries, fewer than limits.max_inflight (1000): raise "
        "upstream.tcp_connections or max_inflight_per_connection, or lower "
        "limits.max_inflight (every query admitted must find room in the pool)"
    ]


async def test_a_connection_reset_with_queries_in_flight_does_not_mark_the_server_down() -> None:
    answer = zone_handler(RECORDS)
    reset = {"done": False}

    def handler(query: dns.message.Message, transport: str) -> Action:
        if query.question[0].name.to_text() == "reset.example." and not reset["done"]:
            reset["done"] = True
            return Delay(0.1, Close())
        return Delay(0.3, answer(query, transport))

    async with FakeUpstream(handler) as fake, running(make_config(fake.port)) as app:
        names = ["reset.example.", *(f"n{i}.example." for i in range(10))]
        responses = await asyncio.gather(*(ask(app, name) for name in names))
        assert [r.rcode() for r in responses] == [dns.rcode.NXDOMAIN] * len(names)
        server = app.forwarder.servers[f"tcp://127.0.0.1:{fake.port}"]
        assert reset["done"] and server.upstream.stats.retries >= 1
        assert server.up and server.fails == 0
        assert app.forwarder.stats.servfail_sent == 0


async def test_a_zone_whose_upstream_forwards_back_is_refused_at_start() -> None:
    """The looping upstream relays every query to the proxy; the other one answers."""
    holder: dict[str, App] = {}
    relayed_to: list[int] = []

    async def relay(query: dns.message.Message, transport: str) -> Action:
        hp = holder["app"].listen[0]
        relayed_to.append(hp.port)
        return await dns.asyncquery.udp(query, hp.host, port=hp.port, timeout=3)

    async with (
        FakeUpstream(zone_handler(RECORDS)) as good,
        FakeUpstream(relay) as looping,  # type: ignore[arg-type]
    ):
        config = make_config(good.port, loop_check=True)
        loop_zone = ZoneConfig("loop.example.", (UpstreamConfig("tcp", "127.0.0.1", looping.port),))
        config = dataclasses.replace(config, zones=(*config.zones, loop_zone))
        app = holder["app"] = App(config)
        with pytest.raises(LoopError) as raised:
            await app.start()
        assert raised.value.problems == [
            f"zone loop.example.: upstream tcp://127.0.0.1:{looping.port} sends queries back "
            f"to this proxy (a probe for {looping.queries[0][1].question[0].name} HINFO came "
            "back): a forwarding loop"
        ]
        assert app.forwarder.stats.loop_probes_back == 1
        # The zone's own probe went to the good upstream, which answered: no loop there.
        assert [q.question[0].rdtype for _, q in good.queries] == [dns.rdatatype.HINFO]
        # Nothing is left listening: the port is free again.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", relayed_to[0]))


async def test_no_loop_starts_as_usual() -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, loop_check=True)
        async with running(config) as app:
            assert address(await ask(app)) == "169.254.1.1"
            assert app.forwarder.stats.loop_probes_back == 0
    kinds = [q.question[0].rdtype for _, q in fake.queries]
    assert kinds == [dns.rdatatype.HINFO, dns.rdatatype.A]


async def test_a_reload_to_a_looping_configuration_is_refused_and_the_old_one_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()

    async def relay(query: dns.message.Message, transport: str) -> Action:
        return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=3)

    path = tmp_path / "dnsproxy.yaml"
    async with (
        FakeUpstream(zone_handler(RECORDS)) as good,
        FakeUpstream(relay) as looping,  # type: ignore[arg-type]
    ):
        write(path, doc_for(good.port, [f"127.0.0.1:{port}"]))
        async with app_from(path) as app:
            doc = doc_for(good.port, [f"127.0.0.1:{port}"])
            loop_zone = {"zone": "loop.example", "upstreams": [f"127.0.0.1:{looping.port}"]}
            doc["zones"].append(loop_zone)
            write(path, doc)
            assert not await app.reload("test")
            assert app.reload_failures == 1
            assert address(await ask(app)) == "169.254.1.1"
            assert [z.zone for z in app.config.zones] == ["."]
    assert (
        f"reload (test) refused: zone loop.example.: upstream tcp://127.0.0.1:{looping.port} "
        "sends queries back to this proxy" in caplog.text
    )


async def test_questions_abandoned_at_shutdown_get_their_stale_answer() -> None:
    handler = SlowsDown(5.0)
    async with FakeUpstream(handler) as fake:
        config = config_for(
            fake,
            try_timeout_s=9.0,
            deadline_s=9.0,
            serve_stale=ServeStaleConfig(answer_after_s=9.0),
        )
        async with running(config) as app:
            await ask(app)
            handler.slow = True
            await expire()
            pending = asyncio.ensure_future(ask(app))
            assert await wait_for(lambda: app.forwarder.inflight == 1, 5.0)
            assert app.forwarder.abandon() == 1
            response = await pending
    assert address(response) == "169.254.1.1" and stale(response)
