"""End to end: dnspython as the client, dnsproxy in-process, a scripted fake upstream."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
import urllib.request

import dns.asyncquery
import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from conftest import RECORDS, make_config, proxy_with
from fakeupstream import Close, Delay, Drop, FakeUpstream, zone_handler

from dnsproxy.app import App
from dnsproxy.cache import SERVFAIL as KIND_SERVFAIL
from dnsproxy.config import CachePolicy, ServerLimits


def addr(app: App) -> tuple[str, int]:
    hp = app.listen[0]
    return hp.host, hp.port


async def ask_udp(app: App, name: str, rdtype: str = "A", **kw: object) -> dns.message.Message:
    host, port = addr(app)
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    return await dns.asyncquery.udp(q, host, port=port, timeout=5, ignore_trailing=False)


async def ask_tcp(app: App, name: str, rdtype: str = "A", **kw: object) -> dns.message.Message:
    host, port = addr(app)
    q = dns.message.make_query(name, rdtype, **kw)  # type: ignore[arg-type]
    return await dns.asyncquery.tcp(q, host, port=port, timeout=5)


def upstream_questions(fake: object) -> list[tuple[str, str]]:
    return [
        (q.question[0].name.to_text().lower(), dns.rdatatype.to_text(q.question[0].rdtype))
        for _, q in fake.queries  # type: ignore[attr-defined]
    ]


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("www.example.", "A"),
        ("www.example.", "AAAA"),
        ("example.", "MX"),
        ("example.", "TXT"),
        ("_http._tcp.example.", "SRV"),
        ("1.1.254.169.in-addr.arpa.", "PTR"),
        ("alias.example.", "CNAME"),
    ],
)
async def test_answers_every_record_type_and_then_from_cache(name: str, rdtype: str) -> None:
    async with proxy_with() as (app, fake):
        first = await ask_udp(app, name, rdtype)
        second = await ask_tcp(app, name, rdtype)
    assert first.rcode() == dns.rcode.NOERROR
    want = sorted(RECORDS[(name, rdtype)])
    for reply in (first, second):
        (rrset,) = reply.answer
        assert rrset.rdtype == dns.rdatatype.from_text(rdtype)
        assert sorted(r.to_text() for r in rrset) == want
    assert upstream_questions(fake) == [(name, rdtype)], "second query must be a cache hit"
    assert app.server.stats.hits == 1


async def test_cname_chain_is_forwarded_and_cached_whole() -> None:
    def handler(query: dns.message.Message, transport: str) -> dns.message.Message:
        r = dns.message.make_response(query)
        r.answer.append(dns.rrset.from_text("a.example.", 120, "IN", "CNAME", "b.example."))
        r.answer.append(dns.rrset.from_text("b.example.", 60, "IN", "CNAME", "c.example."))
        r.answer.append(dns.rrset.from_text("c.example.", 300, "IN", "A", "169.254.3.3"))
        return r

    async with proxy_with(handler) as (app, fake):
        first = await ask_udp(app, "a.example.")
        second = await ask_udp(app, "a.example.")
    for reply in (first, second):
        assert [rr.rdtype for rr in reply.answer] == [
            dns.rdatatype.CNAME,
            dns.rdatatype.CNAME,
            dns.rdatatype.A,
        ]
    assert len(fake.queries) == 1
    # Each record keeps its own TTL (clamped only by policy), not the chain's minimum.
    ttls = [rr.ttl for rr in second.answer]
    assert ttls[0] <= 120
    assert ttls[2] > 200


async def test_cache_hit_ttl_goes_down() -> None:
    async with proxy_with() as (app, fake):
        first = await ask_udp(app, "www.example.")
        await asyncio.sleep(2.1)
        second = await ask_udp(app, "www.example.")
    assert first.answer[0].ttl == 300
    assert 290 <= second.answer[0].ttl <= 298
    assert len(fake.queries) == 1


async def test_ttl_clamped_by_max_ttl() -> None:
    policy = CachePolicy(max_ttl_s=30)
    async with proxy_with(cache=policy) as (app, _fake):
        reply = await ask_udp(app, "www.example.")
    assert reply.answer[0].ttl == 30


async def test_nxdomain_cached_with_soa_minimum_and_answers_other_types() -> None:
    async with proxy_with(zone_handler(RECORDS, ttl=300, soa_minimum=60)) as (app, fake):
        first = await ask_udp(app, "nope.example.")
        second = await ask_udp(app, "NOPE.example.")
        other_type = await ask_udp(app, "nope.example.", "AAAA")
    assert first.rcode() == dns.rcode.NXDOMAIN
    assert second.rcode() == dns.rcode.NXDOMAIN
    assert other_type.rcode() == dns.rcode.NXDOMAIN
    soa = second.authority[0]
    assert soa.rdtype == dns.rdatatype.SOA
    assert soa.ttl <= 60, "negative TTL is min(SOA TTL, SOA MINIMUM)"
    assert len(fake.queries) == 1, "NXDOMAIN covers every type of the name (RFC 2308 §5)"


async def test_nodata_cached_per_type_and_capped_by_denial_max() -> None:
    policy = CachePolicy(denial_max_ttl_s=5)
    async with proxy_with(cache=policy) as (app, fake):
        first = await ask_udp(app, "www.example.", "MX")
        second = await ask_udp(app, "www.example.", "MX")
        other = await ask_udp(app, "www.example.", "TXT")
    assert first.rcode() == dns.rcode.NOERROR and not first.answer
    assert second.authority[0].ttl <= 5
    assert other.rcode() == dns.rcode.NOERROR
    assert upstream_questions(fake) == [("www.example.", "MX"), ("www.example.", "TXT")]


async def test_client_case_and_do_bit_are_echoed() -> None:
    async with proxy_with() as (app, fake):
        await ask_udp(app, "www.example.", use_edns=0, want_dnssec=True)
        reply = await ask_udp(app, "wWw.ExAmPlE.", use_edns=0, want_dnssec=True)
        plain = await ask_udp(app, "WWW.EXAMPLE.")
    assert reply.question[0].name.to_text() == "wWw.ExAmPlE."
    assert reply.ednsflags & dns.flags.DO
    assert reply.payload == 1232
    assert plain.edns < 0, "no OPT for a client that sent none"
    assert plain.question[0].name.to_text() == "WWW.EXAMPLE."
    # DO is part of the cache key: the plain query was a separate upstream query.
    assert len(fake.queries) == 2
    assert fake.queries[0][1].ednsflags & dns.flags.DO


async def test_big_answer_truncated_over_udp_whole_over_tcp() -> None:
    async with proxy_with() as (app, fake):
        host, port = addr(app)
        q = dns.message.make_query("big.example.", "A")
        udp = await dns.asyncquery.udp(q, host, port=port, timeout=5, raise_on_truncation=False)
        tcp = await ask_tcp(app, "big.example.")
        edns_udp = await dns.asyncquery.udp(
            dns.message.make_query("big.example.", "A", use_edns=0, payload=4096),
            host,
            port=port,
            timeout=5,
        )
    assert udp.flags & dns.flags.TC
    # The whole records that fit in 512 bytes (12 + 17 + 16 per record), in order.
    assert list(udp.answer[0]) == list(tcp.answer[0])[:30]
    assert udp.question[0].name.to_text() == "big.example."
    assert not tcp.flags & dns.flags.TC
    assert len(tcp.answer[0]) == 60
    # 60 A records fit in the 1232 bytes we allow over UDP with EDNS.
    assert len(edns_udp.answer[0]) == 60
    assert len(fake.queries) == 1


async def test_pipelined_tcp_client_gets_every_answer() -> None:
    names = [f"n{i}.example." for i in range(40)]
    records = {(n, "A"): [f"169.254.4.{i + 1}"] for i, n in enumerate(names)}

    def handler(query: dns.message.Message, transport: str) -> object:
        # Random delays make the upstream answer out of order.
        return Delay(random.uniform(0, 0.05), zone_handler(records)(query, transport))  # type: ignore[arg-type]

    async with proxy_with(handler) as (app, _fake):  # type: ignore[arg-type]
        host, port = addr(app)
        reader, writer = await asyncio.open_connection(host, port)
        wanted = {}
        blob = b""
        for i, name in enumerate(names * 2):  # the second round partly hits the cache
            q = dns.message.make_query(name, "A")
            q.id = i
            wanted[i] = name
            w = q.to_wire()
            blob += struct.pack(">H", len(w)) + w
        writer.write(blob)  # every query in one write
        await writer.drain()
        got = {}
        async with asyncio.timeout(10):
            while len(got) < len(wanted):
                size = struct.unpack(">H", await reader.readexactly(2))[0]
                reply = dns.message.from_wire(await reader.readexactly(size))
                got[reply.id] = reply
        writer.close()
    for i, name in wanted.items():
        reply = got[i]
        assert reply.question[0].name.to_text() == name
        index = names.index(name)
        assert reply.answer[0][0].to_text() == f"169.254.4.{index + 1}"


async def test_silent_upstream_gives_servfail_within_deadline() -> None:
    async with proxy_with(lambda q, t: Drop(), deadline_s=0.6, try_timeout_s=0.3) as (app, _):
        started = time.monotonic()
        reply = await ask_udp(app, "www.example.")
        elapsed = time.monotonic() - started
    assert reply.rcode() == dns.rcode.SERVFAIL
    # Far below the 5 s a glibc client waits before retrying.
    assert elapsed < 3.0


async def test_shutdown_answers_questions_still_in_flight_with_servfail() -> None:
    # The upstream never answers and the deadline is far off: when the shutdown grace
    # runs out, the waiting client gets SERVFAIL (and retries elsewhere) rather than
    # silence and its own multi-second timeout.
    async with FakeUpstream(lambda q, t: Drop()) as fake:
        config = make_config(fake.port, deadline_s=20, try_timeout_s=20, shutdown_grace_s=0.2)
        app = App(config)
        await app.start()
        try:
            asking = asyncio.create_task(ask_udp(app, "www.example."))
            for _ in range(300):
                if app.forwarder.inflight:
                    break
                await asyncio.sleep(0.01)
            assert app.forwarder.inflight == 1
        finally:
            await app.stop()
        reply = await asking
    assert reply.rcode() == dns.rcode.SERVFAIL
    assert app.forwarder.inflight == 0


async def test_servfail_cached_briefly_but_never_over_a_good_answer() -> None:
    answer = zone_handler(RECORDS)
    mode = {"drop": True}

    def handler(query: dns.message.Message, transport: str) -> object:
        return Drop() if mode["drop"] else answer(query, transport)

    policy = CachePolicy(servfail_ttl_s=1)
    async with proxy_with(handler, cache=policy, deadline_s=0.4, try_timeout_s=0.2) as (  # type: ignore[arg-type]
        app,
        _,
    ):
        assert (await ask_udp(app, "www.example.")).rcode() == dns.rcode.SERVFAIL
        assert app.cache.by_kind[KIND_SERVFAIL] == 1
        mode["drop"] = False
        # Still cached SERVFAIL within its 1 s, then a real answer.
        assert (await ask_udp(app, "www.example.")).rcode() == dns.rcode.SERVFAIL
        await asyncio.sleep(1.1)
        assert (await ask_udp(app, "www.example.")).rcode() == dns.rcode.NOERROR


async def test_upstream_closing_connection_mid_flight_still_answers() -> None:
    answer = zone_handler(RECORDS)
    calls = {"n": 0}

    def handler(query: dns.message.Message, transport: str) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            return Close()
        return answer(query, transport)

    async with proxy_with(handler) as (app, fake):  # type: ignore[arg-type]
        reply = await ask_udp(app, "www.example.")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer[0][0].to_text() == "169.254.1.1"
    assert fake.tcp_connections >= 2


async def test_concurrent_identical_misses_make_one_upstream_query() -> None:
    answer = zone_handler(RECORDS)

    def handler(query: dns.message.Message, transport: str) -> object:
        return Delay(0.3, answer(query, transport))

    async with proxy_with(handler) as (app, fake):  # type: ignore[arg-type]
        replies = await asyncio.gather(*(ask_udp(app, "www.example.") for _ in range(100)))
    assert all(r.rcode() == dns.rcode.NOERROR and r.answer for r in replies)
    assert len(fake.queries) == 1
    assert app.forwarder.stats.coalesced == 99


async def test_cancelled_waiter_does_not_cancel_the_others() -> None:
    answer = zone_handler(RECORDS)

    def handler(query: dns.message.Message, transport: str) -> object:
        return Delay(0.3, answer(query, transport))

    async with proxy_with(handler) as (app, _fake):  # type: ignore[arg-type]
        q = dns.message.make_query("www.example.", "A").to_wire()
        from dnsproxy import wire

        key, qend, _ = wire.parse_query(q)
        first = asyncio.ensure_future(app.forwarder.resolve(key, q, qend))
        second = asyncio.ensure_future(app.forwarder.resolve(key, q, qend))
        await asyncio.sleep(0.05)
        first.cancel()
        entry = await asyncio.wait_for(second, 5)
    assert entry.rcode == 0
    assert first.cancelled()


async def test_protocol_errors() -> None:
    async with proxy_with() as (app, fake):
        host, port = addr(app)
        two = dns.message.make_query("www.example.", "A")
        two.question.append(two.question[0])
        formerr = await dns.asyncquery.udp(two, host, port=port, timeout=5)
        notify = dns.message.make_query("www.example.", "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        notimp = await dns.asyncquery.udp(notify, host, port=port, timeout=5)
        v1 = dns.message.make_query("www.example.", "A", use_edns=1)
        badvers = await dns.asyncquery.udp(v1, host, port=port, timeout=5)
        axfr = await ask_tcp(app, "example.", "AXFR")
    assert formerr.rcode() == dns.rcode.FORMERR
    assert notimp.rcode() == dns.rcode.NOTIMP
    assert badvers.rcode() == dns.rcode.BADVERS
    assert axfr.rcode() == dns.rcode.REFUSED
    assert fake.queries == []


async def test_acl_refuses_other_sources() -> None:
    import ipaddress

    nets = (ipaddress.ip_network("169.254.0.0/16"),)
    async with proxy_with(allow=nets) as (app, fake):
        reply = await ask_udp(app, "www.example.")
    assert reply.rcode() == dns.rcode.REFUSED
    assert fake.queries == []
    assert app.server.stats.refused_acl == 1


async def test_garbage_is_dropped_and_counted_and_service_goes_on() -> None:
    rng = random.Random(1234)
    valid = dns.message.make_query("www.example.", "A").to_wire()
    async with proxy_with() as (app, _fake):
        host, port = addr(app)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        for i in range(3000):
            if i % 2:
                pkt = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 80)))
            else:
                mutated = bytearray(valid)
                for _ in range(rng.randint(1, 4)):
                    mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
                pkt = bytes(mutated[: rng.randint(0, len(mutated))])
            try:
                sock.sendto(pkt, (host, port))
            except BlockingIOError:
                await asyncio.sleep(0.001)
            if i % 200 == 0:
                await asyncio.sleep(0)
        sock.close()
        await asyncio.sleep(0.2)
        reply = await ask_udp(app, "www.example.")
        stats = app.server.stats
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer[0][0].to_text() == "169.254.1.1"
    assert sum(stats.dropped.values()) + sum(stats.invalid.values()) > 500


async def test_tcp_client_limit_and_idle_timeout() -> None:
    limits = ServerLimits(max_tcp_clients=2, tcp_idle_timeout_s=0.5)
    async with proxy_with(limits=limits) as (app, _fake):
        host, port = addr(app)
        conns = [await asyncio.open_connection(host, port) for _ in range(3)]
        await asyncio.sleep(0.1)
        # The third connection was refused: reading gives EOF at once.
        assert await asyncio.wait_for(conns[2][0].read(), 2) == b""
        assert app.server.stats.tcp_clients == 2
        # The idle ones are closed by the server after the idle timeout.
        assert await asyncio.wait_for(conns[0][0].read(), 3) == b""
        for _, w in conns:
            w.close()
        await asyncio.sleep(0.1)
        assert app.server.stats.tcp_clients == 0


async def test_metrics_health_and_ready_endpoints() -> None:
    async with proxy_with(http=True) as (app, _fake):
        await ask_udp(app, "www.example.")
        await ask_udp(app, "www.example.")
        await ask_udp(app, "nothere.example.")
        assert app.http is not None
        base = f"http://127.0.0.1:{app.http.port}"

        def fetch(path: str) -> tuple[int, str]:
            try:
                with urllib.request.urlopen(base + path, timeout=5) as r:
                    return r.status, r.read().decode()
            except urllib.error.HTTPError as e:
                return e.code, e.read().decode()

        status, text = await asyncio.to_thread(fetch, "/metrics")
        assert (await asyncio.to_thread(fetch, "/health"))[0] == 200
        assert (await asyncio.to_thread(fetch, "/ready"))[0] == 200
    assert status == 200
    lines = set(text.splitlines())
    assert 'dnsproxy_requests_total{proto="udp"} 3.0' in lines
    assert "dnsproxy_cache_hits_total 1.0" in lines
    assert "dnsproxy_cache_misses_total 2.0" in lines
    assert 'dnsproxy_responses_total{rcode="NXDOMAIN"} 1.0' in lines
    assert 'dnsproxy_requests_by_type_total{type="A"} 3.0' in lines
    assert 'dnsproxy_cache_entries{type="success"} 1.0' in lines
    assert any(line.startswith("dnsproxy_upstream_queries_total{upstream=") for line in lines)
    assert any(
        line.startswith("dnsproxy_upstream_request_duration_seconds_bucket") for line in lines
    )
    assert any(line.startswith("dnsproxy_build_info{") for line in lines)


async def test_stopping_frees_the_http_port_with_its_thread_ended() -> None:
    # The endpoint's thread once woke only twice a second to see that it should stop,
    # which made every stop without handover up to half a second longer. Now stop()
    # wakes it: when the instance has stopped, the thread has ended (its select() waits
    # with no timeout, so only the wake-up ends it) and a successor binds the port.
    async with proxy_with(http=True) as (app, _fake):
        assert app.http is not None
        port = app.http.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            assert r.status == 200
        started = time.monotonic()
    print(f"\nstop, HTTP endpoint included: {(time.monotonic() - started) * 1000:.0f} ms")
    assert not [t for t in threading.enumerate() if t.name == "dnsproxy-http"]
    with socket.socket() as successor:
        successor.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        successor.bind(("127.0.0.1", port))


async def test_lru_eviction_bounded_and_counted() -> None:
    records = {(f"e{i}.example.", "A"): [f"169.254.5.{i + 1}"] for i in range(20)}
    async with proxy_with(zone_handler(records), cache_max_entries=5) as (app, _fake):
        for i in range(20):
            await ask_udp(app, f"e{i}.example.")
        assert len(app.cache) == 5
        assert app.cache.evictions == 15


async def test_failover_to_second_upstream() -> None:
    from conftest import make_config, running
    from fakeupstream import FakeUpstream

    from dnsproxy.config import UpstreamConfig

    # A port nothing listens on: the first server refuses connections.
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    async with FakeUpstream(zone_handler(RECORDS)) as good:
        second = UpstreamConfig("tcp", "127.0.0.1", good.port)
        config = make_config(closed_port, extra_upstreams=(second,), try_timeout_s=0.5)
        async with running(config) as app:
            started = time.monotonic()
            reply = await ask_udp(app, "www.example.")
            elapsed = time.monotonic() - started
    assert reply.rcode() == dns.rcode.NOERROR
    assert elapsed < 1.5, "a refused connection fails over without waiting for a timeout"
    assert len(good.queries) == 1


async def test_dead_upstream_marked_down_probed_and_restored() -> None:
    from conftest import make_config, running
    from fakeupstream import FakeUpstream

    from dnsproxy.config import UpstreamConfig

    answer = zone_handler(RECORDS)
    first_alive = {"yes": False}

    def first(query: dns.message.Message, transport: str) -> object:
        return answer(query, transport) if first_alive["yes"] else Drop()

    async with (
        FakeUpstream(first) as primary,  # type: ignore[arg-type]
        FakeUpstream(answer) as backup,
    ):
        config = make_config(
            primary.port,
            extra_upstreams=(UpstreamConfig("tcp", "127.0.0.1", backup.port),),
            try_timeout_s=0.3,
            cache=CachePolicy(max_ttl_s=0, min_ttl_s=0),
        )
        async with running(config) as app:
            label = f"tcp://127.0.0.1:{primary.port}"
            server = app.forwarder.servers[label]
            # Two timeouts mark the primary down; each query still gets its answer.
            for name in ("www.example.", "mail.example."):
                assert (await ask_udp(app, name)).rcode() == dns.rcode.NOERROR
            assert not server.up
            # While down, queries go straight to the backup: the primary is not even asked.
            before = len(primary.queries)
            assert (await ask_udp(app, "example.", "MX")).rcode() == dns.rcode.NOERROR
            asked = [q for _, q in primary.queries[before:] if q.question[0].rdtype != 2]
            assert asked == []
            # The primary recovers; the ". NS" probe notices and it takes traffic again.
            first_alive["yes"] = True
            async with asyncio.timeout(5):
                while not server.up:
                    await asyncio.sleep(0.05)
            before = len(primary.queries)
            assert (await ask_udp(app, "example.", "TXT")).rcode() == dns.rcode.NOERROR
            assert len(primary.queries) == before + 1
    probes = [q for _, q in primary.queries if q.question[0].rdtype == dns.rdatatype.NS]
    assert probes and probes[0].question[0].name == dns.name.root


async def test_health_turns_503_while_the_event_loop_is_stalled() -> None:
    async with proxy_with(http=True) as (app, _fake):
        assert app.http is not None
        url = f"http://127.0.0.1:{app.http.port}/health"

        def status() -> int:
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return int(e.code)

        assert await asyncio.to_thread(status) == 200
        probe = asyncio.ensure_future(asyncio.to_thread(lambda: (time.sleep(2.6), status())[1]))
        await asyncio.sleep(0.1)
        time.sleep(4.0)  # block the loop, as a runaway computation would
        assert await probe == 503
        await asyncio.sleep(0.7)  # the heartbeat ticks again
        assert await asyncio.to_thread(status) == 200


async def test_log_queries_writes_one_line_per_query(caplog: pytest.LogCaptureFixture) -> None:
    from dnsproxy.config import LogConfig

    caplog.set_level("INFO", logger="dnsproxy.query")
    async with proxy_with(log=LogConfig(queries=True)) as (app, _fake):
        await ask_udp(app, "www.example.")
        await ask_udp(app, "www.example.")
        await ask_tcp(app, "nothere.example.", "AAAA")
    records = [r for r in caplog.records if r.name == "dnsproxy.query"]
    assert len(records) == 3
    upstream = f"tcp://127.0.0.1:{_fake.port}"
    first, second, third = (getattr(r, "fields", None) for r in records)
    assert first is not None and second is not None and third is not None
    assert first["name"] == "www.example." and first["type"] == "A"
    assert first["cache"] == "miss" and first["upstream"] == upstream
    assert first["rcode"] == "NOERROR" and first["proto"] == "udp"
    assert second["cache"] == "hit" and second["upstream"] is None
    assert third["proto"] == "tcp" and third["rcode"] == "NXDOMAIN" and third["type"] == "AAAA"
    assert first["client"] == "127.0.0.1"
    assert all(0 <= f["duration_s"] < 2 for f in (first, second, third))
    # The text form says the same in words.
    text = records[2].getMessage()
    assert "proto=tcp" in text and "rcode=NXDOMAIN" in text and f"upstream={upstream}" in text


async def test_no_query_lines_by_default(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    async with proxy_with() as (app, _fake):
        await ask_udp(app, "www.example.")
    assert not [r for r in caplog.records if r.name == "dnsproxy.query"]


async def test_tcp_garbage_closes_that_connection_only() -> None:
    rng = random.Random(99)
    async with proxy_with() as (app, _fake):
        host, port = addr(app)
        for _ in range(50):
            _reader, writer = await asyncio.open_connection(host, port)
            size = rng.randint(0, 40)
            writer.write(struct.pack(">H", size) + bytes(rng.getrandbits(8) for _ in range(size)))
            await writer.drain()
            writer.close()
        good = await ask_tcp(app, "www.example.")
        stats = app.server.stats
    assert good.rcode() == dns.rcode.NOERROR
    assert sum(stats.dropped.values()) + sum(stats.invalid.values()) >= 25
