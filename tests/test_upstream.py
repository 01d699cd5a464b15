"""Upstream transports against the in-process fake server on loopback, port 0."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from conftest import wait_for
from fakeupstream import (
    Action,
    Close,
    Delay,
    Drop,
    FakeUpstream,
    Raw,
    SyncHandler,
    first_then,
    zone_handler,
)

from dnsproxy.config import Transport, UpstreamConfig, UpstreamPoolConfig
from dnsproxy.upstream import (
    AutoUpstream,
    Callback,
    TcpUpstream,
    UdpUpstream,
    Upstream,
    UpstreamDown,
    UpstreamError,
    UpstreamTimeout,
    make_upstream,
)

RECORDS = {
    ("www.example.", "A"): ["169.254.1.1"],
    ("www.example.", "AAAA"): ["2001:db8::1"],
    **{(f"h{i}.example.", "A"): [f"169.254.{i // 250}.{i % 250 + 1}"] for i in range(300)},
}

MakeUpstream = Callable[..., Upstream]
TRANSPORTS: tuple[Transport, ...] = ("tcp", "udp")


class _Address:
    """Stands in for a FakeUpstream where nothing (or nothing useful) listens."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port


def query(name: str, rdtype: str = "A", qid: int = 0x1234) -> bytes:
    msg = dns.message.make_query(name, rdtype, use_edns=0)
    msg.id = qid
    return msg.to_wire()


def addresses(reply: bytes) -> list[str]:
    msg = dns.message.from_wire(reply)
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


def frame(message: bytes) -> bytes:
    return struct.pack(">H", len(message)) + message


def first_then_zone(first: Action) -> SyncHandler:
    """A handler that answers the first query with ``first`` and every later one from RECORDS."""
    return first_then([first], zone_handler(RECORDS))


@pytest.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(zone_handler(RECORDS)) as server:
        yield server


@pytest.fixture
async def make() -> AsyncIterator[MakeUpstream]:
    made: list[Upstream] = []

    def factory(
        server: FakeUpstream | _Address, transport: Transport = "tcp", **pool: Any
    ) -> Upstream:
        config = UpstreamConfig(transport, server.host, server.port)
        upstream = make_upstream(config, UpstreamPoolConfig(**pool))
        made.append(upstream)
        return upstream

    yield factory
    for upstream in made:
        await upstream.close()


# --------------------------------------------------------------------------------------
# TCP


async def test_tcp_reply_carries_original_id(fake: FakeUpstream, make: MakeUpstream) -> None:
    up = make(fake)
    assert isinstance(up, TcpUpstream)
    reply = await up.query(query("www.example.", qid=0xBEEF), 2.0)
    assert reply[:2] == b"\xbe\xef"
    assert addresses(reply) == ["169.254.1.1"]
    assert fake.queries[0][0] == "tcp"
    assert up.stats.queries == up.stats.replies == up.stats.connects == 1
    assert up.stats.inflight == 0
    assert up.stats.open_connections == 1
    # A second query reuses the connection.
    reply = await up.query(query("www.example.", "AAAA", qid=0), 2.0)
    assert reply[:2] == b"\x00\x00"
    assert addresses(reply) == ["2001:db8::1"]
    assert fake.tcp_connections == 1


async def test_tcp_negative_answers_pass_through(fake: FakeUpstream, make: MakeUpstream) -> None:
    up = make(fake)
    nx = dns.message.from_wire(await up.query(query("nope.example."), 2.0))
    assert nx.rcode() == dns.rcode.NXDOMAIN
    assert nx.authority[0].rdtype == dns.rdatatype.SOA
    nodata = dns.message.from_wire(await up.query(query("www.example.", "MX"), 2.0))
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0][0].minimum == 60


async def test_tcp_pipelining_out_of_order(make: MakeUpstream) -> None:
    rng = random.Random(7)
    base = zone_handler(RECORDS)

    def handler(msg: dns.message.Message, transport: str) -> Any:
        return Delay(rng.uniform(0.0, 0.05), base(msg, transport))

    async with FakeUpstream(handler) as server:
        up = make(server)
        names = [f"h{i}.example." for i in range(200)]
        replies = await asyncio.gather(
            *(up.query(query(name, qid=i), 5.0) for i, name in enumerate(names))
        )
        for i, reply in enumerate(replies):
            assert struct.unpack(">H", reply[:2])[0] == i
            msg = dns.message.from_wire(reply)
            assert msg.question[0].name.to_text() == names[i]
            assert addresses(reply) == [f"169.254.{i // 250}.{i % 250 + 1}"]
        assert server.tcp_connections <= 2
        assert up.stats.replies == 200
        assert up.stats.bad_replies == 0
        assert up.stats.inflight == 0
        assert len(server.queries) == 200
        # IDs on the wire are fresh and never repeat within a connection's in-flight set.
        assert len({m.id for _, m in server.queries}) > 150


async def test_tcp_pool_full_fails_fast(make: MakeUpstream) -> None:
    base = zone_handler(RECORDS)
    async with FakeUpstream(lambda m, t: Delay(0.2, base(m, t))) as server:
        up = make(server, tcp_connections=1, max_inflight_per_connection=2)
        tasks = [asyncio.ensure_future(up.query(query("www.example."), 2.0)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(UpstreamError) as info:
            await up.query(query("www.example."), 2.0)
        assert not isinstance(info.value, UpstreamTimeout)
        assert up.stats.pool_full == 1
        assert all(addresses(r) == ["169.254.1.1"] for r in await asyncio.gather(*tasks))


async def test_forged_replies_are_dropped(make: MakeUpstream) -> None:
    """Wrong ID, wrong question and QR=0 replies are ignored; the real one is accepted."""
    base = zone_handler(RECORDS)

    def handler(msg: dns.message.Message, transport: str) -> Any:
        good = base(msg, transport)
        assert isinstance(good, dns.message.Message)
        wrong_id = dns.message.make_response(msg)
        wrong_id.id = (msg.id + 1) & 0xFFFF
        wrong_question = dns.message.make_response(dns.message.make_query("evil.example.", "A"))
        wrong_question.id = msg.id
        not_response = bytearray(good.to_wire())
        not_response[2] &= 0x7F
        return [wrong_id, wrong_question, bytes(not_response), good]

    async with FakeUpstream(handler) as server:
        for transport in TRANSPORTS:
            up = make(server, transport)
            reply = await up.query(query("www.example."), 2.0)
            assert addresses(reply) == ["169.254.1.1"]
            assert up.stats.bad_replies == 3
            assert up.stats.replies == 1


async def test_question_match_ignores_case(make: MakeUpstream) -> None:
    def handler(msg: dns.message.Message, transport: str) -> Any:
        upper = dns.message.make_query(msg.question[0].name.to_text().upper(), "A")
        upper.id = msg.id
        return dns.message.make_response(upper)

    async with FakeUpstream(handler) as server:
        up = make(server)
        await up.query(query("www.Example."), 2.0)
        assert up.stats.bad_replies == 0


async def test_framing_split_and_coalesced(make: MakeUpstream) -> None:
    """Replies arrive byte by byte, and several frames arrive in one segment."""

    def handler(msg: dns.message.Message, transport: str) -> Any:
        good = frame(dns.message.make_response(msg).to_wire())
        stray = dns.message.make_response(msg)
        stray.id = (msg.id + 1) & 0xFFFF
        if msg.question[0].name.to_text() == "split.example.":
            return [Delay(0.01 * i, Raw(good[i : i + 1])) for i in range(len(good))]
        return Raw(frame(stray.to_wire()) + good + frame(stray.to_wire()))

    async with FakeUpstream(handler) as server:
        up = make(server)
        r1, r2 = await asyncio.gather(
            up.query(query("split.example.", qid=1), 3.0),
            up.query(query("joined.example.", qid=2), 3.0),
        )
        assert dns.message.from_wire(r1).question[0].name.to_text() == "split.example."
        assert dns.message.from_wire(r2).question[0].name.to_text() == "joined.example."
        assert up.stats.bad_replies == 2
        assert server.tcp_connections <= 2


async def test_garbage_framing_closes_connection_and_retries(make: MakeUpstream) -> None:
    async with FakeUpstream(first_then_zone(Raw(b"\x00\x05hello"))) as server:
        up = make(server)
        reply = await up.query(query("www.example."), 2.0)
        assert addresses(reply) == ["169.254.1.1"]
        assert up.stats.bad_replies == 1
        assert up.stats.retries == 1
        assert server.tcp_connections == 2


async def test_server_close_midflight_is_retried(make: MakeUpstream) -> None:
    async with FakeUpstream(first_then_zone(Close())) as server:
        up = make(server)
        reply = await up.query(query("www.example."), 2.0)
        assert addresses(reply) == ["169.254.1.1"]
        assert up.stats.retries == 1
        assert up.stats.failures == 0
        assert server.tcp_connections == 2


async def test_server_closing_every_time_fails_after_one_retry(make: MakeUpstream) -> None:
    async with FakeUpstream(lambda m, t: Close()) as server:
        up = make(server)
        started = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await up.query(query("www.example."), 3.0)
        assert not isinstance(info.value, UpstreamTimeout)
        assert time.monotonic() - started < 1.5
        assert up.stats.retries == 1
        assert up.stats.failures == 1
        assert len(server.queries) == 2


async def test_idle_close_by_server_then_retry(make: MakeUpstream) -> None:
    """The server drops an idle connection (its idle timeout beat ours): next query works."""
    async with FakeUpstream(zone_handler(RECORDS)) as server:
        up = make(server)
        await up.query(query("www.example."), 2.0)
        server.close_tcp_connections()
        assert await wait_for(lambda: up.stats.open_connections == 0)
        reply = await up.query(query("www.example."), 2.0)
        assert addresses(reply) == ["169.254.1.1"]
        assert server.tcp_connections == 2


async def test_silent_server_times_out(make: MakeUpstream) -> None:
    async with FakeUpstream(lambda m, t: Drop()) as server:
        up = make(server)
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await up.query(query("www.example."), 0.2)
        assert time.monotonic() - started < 1.0
        assert up.stats.timeouts == 1
        assert up.stats.inflight == 0
        # Nothing came back at all, so the connection is presumed dead and replaced.
        with pytest.raises(UpstreamTimeout):
            await up.query(query("www.example."), 0.2)
        assert server.tcp_connections == 2


async def test_late_reply_after_timeout_is_dropped(make: MakeUpstream) -> None:
    base = zone_handler(RECORDS)

    def handler(msg: dns.message.Message, transport: str) -> Any:
        slow = msg.question[0].name.to_text() == "h1.example."
        return Delay(0.4 if slow else 0.02, base(msg, transport))

    async with FakeUpstream(handler) as server:
        up = make(server, tcp_connections=1)
        slow, fast = await asyncio.gather(
            up.query(query("h1.example."), 0.15),
            up.query(query("h2.example."), 2.0),
            return_exceptions=True,
        )
        assert isinstance(slow, UpstreamTimeout)
        assert isinstance(fast, bytes)
        assert await wait_for(lambda: up.stats.bad_replies == 1)
        # The connection that saw answers stays in use.
        await up.query(query("www.example."), 2.0)
        assert server.tcp_connections == 1


async def test_cancelled_query_releases_its_id(make: MakeUpstream) -> None:
    async with FakeUpstream(lambda m, t: Drop()) as server:
        up = make(server)
        task = asyncio.ensure_future(up.query(query("www.example."), 5.0))
        assert await wait_for(lambda: len(server.queries) == 1)
        assert up.stats.inflight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert up.stats.inflight == 0
        # Cancelled in the same loop turn as its connection failed under it.
        assert isinstance(up, TcpUpstream)
        task = asyncio.ensure_future(up.query(query("www.example."), 5.0))
        assert await wait_for(lambda: len(server.queries) == 2)
        up._active[0].close()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert up.stats.inflight == 0


async def test_connection_refused_fails_fast(make: MakeUpstream) -> None:
    # A bound socket that does not listen holds the port and answers SYN with RST.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        up = make(_Address("127.0.0.1", port))
        started = time.monotonic()
        with pytest.raises(UpstreamError) as info:
            await up.query(query("www.example."), 3.0)
        assert not isinstance(info.value, UpstreamTimeout)
        assert time.monotonic() - started < 1.0
        assert up.stats.connect_failures == 1
        assert up.stats.failures == 1
        assert up.stats.open_connections == 0


async def test_connection_rotates_after_max_age(fake: FakeUpstream, make: MakeUpstream) -> None:
    up = make(fake, connection_max_age_s=0.2)
    await up.query(query("www.example."), 2.0)
    await up.query(query("www.example."), 2.0)
    assert fake.tcp_connections == 1
    await asyncio.sleep(0.3)
    await up.query(query("www.example."), 2.0)
    assert fake.tcp_connections == 2
    assert up.stats.open_connections == 1  # the old one was closed once drained


async def test_old_connection_drains_before_closing(make: MakeUpstream) -> None:
    base = zone_handler(RECORDS)
    async with FakeUpstream(lambda m, t: Delay(0.3, base(m, t))) as server:
        up = make(server, connection_max_age_s=0.1, tcp_connections=1)
        first = asyncio.ensure_future(up.query(query("www.example."), 2.0))
        await asyncio.sleep(0.15)  # the first connection is now too old for new queries
        second = await up.query(query("www.example."), 2.0)
        assert addresses(await first) == addresses(second) == ["169.254.1.1"]
        assert server.tcp_connections == 2
        assert up.stats.retries == 0


async def test_idle_connection_is_closed(fake: FakeUpstream, make: MakeUpstream) -> None:
    up = make(fake, idle_timeout_s=0.1)
    await up.query(query("www.example."), 2.0)
    assert up.stats.open_connections == 1
    assert await wait_for(lambda: up.stats.open_connections == 0)
    await up.query(query("www.example."), 2.0)
    assert fake.tcp_connections == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_close_fails_inflight_queries(make: MakeUpstream, transport: Transport) -> None:
    async with FakeUpstream(lambda m, t: Drop()) as server:
        up = make(server, transport)
        task = asyncio.ensure_future(up.query(query("www.example."), 5.0))
        assert await wait_for(lambda: len(server.queries) == 1)
        started = time.monotonic()
        await up.close()
        with pytest.raises(UpstreamError) as info:
            await task
        assert not isinstance(info.value, UpstreamTimeout)
        assert time.monotonic() - started < 1.0
        assert up.stats.open_connections == up.stats.inflight == 0
        with pytest.raises(UpstreamError):
            await up.query(query("www.example."), 1.0)


async def test_malformed_query_is_refused(fake: FakeUpstream, make: MakeUpstream) -> None:
    for transport in TRANSPORTS:
        up = make(fake, transport)
        with pytest.raises(UpstreamError):
            await up.query(b"\x00\x01\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x03ww", 1.0)
    assert fake.queries == []


async def test_frame_parser_any_chunking(make: MakeUpstream) -> None:
    """Feed a stream of replies to one connection in chunks of every small size."""
    async with FakeUpstream(lambda m, t: Drop()) as server:
        up = make(server, tcp_connections=1)
        assert isinstance(up, TcpUpstream)
        for round_, chunk in enumerate((1, 2, 3, 5, 13, 64, 4096)):
            names = [f"h{i}.example." for i in range(5)]
            tasks = [asyncio.ensure_future(up.query(query(n), 5.0)) for n in names]
            sent = 5 * (round_ + 1)
            assert await wait_for(lambda: len(server.queries) == sent)  # noqa: B023
            conn = up._active[0]
            stream = b""
            for qid, entry in list(conn.pipeline.pending.items()):
                name, _ = dns.name.from_wire(entry.question, 0)
                msg = dns.message.make_query(name, "A")
                msg.id = qid
                stream += frame(dns.message.make_response(msg).to_wire())
            for off in range(0, len(stream), chunk):
                conn.data_received(stream[off : off + chunk])
            replies = await asyncio.gather(*tasks)
            assert [dns.message.from_wire(r).question[0].name.to_text() for r in replies] == names
        assert up.stats.bad_replies == 0


# --------------------------------------------------------------------------------------
# UDP


async def test_udp_query(fake: FakeUpstream, make: MakeUpstream) -> None:
    up = make(fake, "udp")
    assert isinstance(up, UdpUpstream)
    reply = await up.query(query("www.example.", qid=0x4242), 2.0)
    assert reply[:2] == b"\x42\x42"
    assert addresses(reply) == ["169.254.1.1"]
    assert [t for t, _ in fake.queries] == ["udp"]
    assert fake.tcp_connections == 0
    assert up.stats.replies == 1 and up.stats.inflight == 0


async def test_udp_truncated_falls_back_to_tcp(make: MakeUpstream) -> None:
    base = zone_handler(RECORDS)

    def handler(msg: dns.message.Message, transport: str) -> Any:
        if transport == "udp":
            truncated = dns.message.make_response(msg)
            truncated.flags |= dns.flags.TC
            return truncated
        return base(msg, transport)

    async with FakeUpstream(handler) as server:
        up = make(server, "udp")
        reply = await up.query(query("www.example.", qid=7), 2.0)
        assert reply[:2] == b"\x00\x07"
        assert not reply[2] & 0x02
        assert addresses(reply) == ["169.254.1.1"]
        assert [t for t, _ in server.queries] == ["udp", "tcp"]
        assert up.stats.tc_fallbacks == 1
        assert up.stats.replies == 1


async def test_udp_timeout(make: MakeUpstream) -> None:
    async with FakeUpstream(lambda m, t: Drop()) as server:
        up = make(server, "udp")
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await up.query(query("www.example."), 0.2)
        assert time.monotonic() - started < 1.0
        assert up.stats.timeouts == 1 and up.stats.inflight == 0


async def test_udp_port_unreachable_fails_fast(make: MakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    up = make(_Address("127.0.0.1", port), "udp")
    started = time.monotonic()
    with pytest.raises(UpstreamError):
        await up.query(query("www.example."), 2.0)
    # ICMP port unreachable normally ends it at once; a timeout is allowed where it is lost.
    assert time.monotonic() - started < 3.0


# --------------------------------------------------------------------------------------
# IPv6 and the fake itself


def _ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
async def test_ipv6(make: MakeUpstream) -> None:
    async with FakeUpstream(zone_handler(RECORDS), host="::1") as server:
        for transport in TRANSPORTS:
            up = make(server, transport)
            assert up.label.startswith(f"{transport}://[::1]:")
            reply = await up.query(query("www.example.", "AAAA"), 2.0)
            assert addresses(reply) == ["2001:db8::1"]
        assert [t for t, _ in server.queries] == ["tcp", "udp"]


async def test_fake_survives_malformed_input(fake: FakeUpstream, make: MakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(b"\x01\x02garbage", (fake.host, fake.port))
    reader, writer = await asyncio.open_connection(fake.host, fake.port)
    writer.write(frame(b"\xff" * 20))
    writer.write(b"\x00\x00")  # zero-length frame: the fake closes the connection
    await writer.drain()
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    assert await wait_for(lambda: fake.malformed == 3)
    up = make(fake)
    assert addresses(await up.query(query("www.example."), 2.0)) == ["169.254.1.1"]


async def test_fake_async_handler_and_echoed_edns(make: MakeUpstream) -> None:
    base = zone_handler(RECORDS)

    async def handler(msg: dns.message.Message, transport: str) -> Any:
        await asyncio.sleep(0.01)
        return base(msg, transport)

    async with FakeUpstream(handler) as server:
        up = make(server)
        wire = dns.message.make_query("www.example.", "A", want_dnssec=True).to_wire()
        reply = dns.message.from_wire(await up.query(wire, 2.0))
        assert reply.edns == 0 and reply.ednsflags & dns.flags.DO
        assert reply.flags & dns.flags.AA


# --------------------------------------------------------------------------------------
# Reconnect backoff


def close_first(count: int) -> SyncHandler:
    """A handler that closes the connection of the first ``count`` queries, then answers."""
    return first_then([Close()] * count, zone_handler(RECORDS))


async def test_a_server_closing_every_connection_is_not_reconnected_in_a_tight_loop(
    make: MakeUpstream,
) -> None:
    # Seen with a resolver that accepts TCP and closes at once: 44 connects for 22 queries.
    async with FakeUpstream(lambda m, t: Close()) as server:
        up = make(server)
        errors = []
        for _ in range(22):
            with pytest.raises(UpstreamError) as info:
                await up.query(query("www.example."), 2.0)
            errors.append(info.value)
        # The first query and its one retry connect; the others come during the backoff
        # (a third connect only if the machine stalled for longer than it).
        assert server.tcp_connections <= 3
        assert up.stats.connects == server.tcp_connections
        last = errors[-1]
        assert isinstance(last, UpstreamDown)
        assert "connections failed in a row (last: closes connections without answering)" in str(
            last
        )
        # Once the backoff is over, a query connects again.
        before = server.tcp_connections
        for _ in range(100):
            with pytest.raises(UpstreamError):
                await up.query(query("www.example."), 2.0)
            if server.tcp_connections > before:
                break
            await asyncio.sleep(0.05)
        assert server.tcp_connections == before + 1


async def test_refused_connections_back_off_too(make: MakeUpstream) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connects are refused
        up = make(_Address("127.0.0.1", sock.getsockname()[1]))
        assert isinstance(up, TcpUpstream)
        for _ in range(10):
            with pytest.raises(UpstreamError):
                await up.query(query("www.example."), 2.0)
        assert up.stats.connect_failures <= 3
        assert up.failure == "refuses connections"


async def test_a_reply_ends_the_backoff(make: MakeUpstream) -> None:
    async with FakeUpstream(close_first(2)) as server:
        up = make(server)
        assert isinstance(up, TcpUpstream)
        with pytest.raises(UpstreamError):
            await up.query(query("www.example."), 2.0)  # closed, and closed on its retry
        assert up.failed_connections == 2
        reply = None
        for _ in range(100):
            try:
                reply = await up.query(query("www.example."), 2.0)
                break
            except UpstreamDown:
                await asyncio.sleep(0.05)
        assert reply is not None and addresses(reply) == ["169.254.1.1"]
        assert up.failed_connections == 0
        # A later failure starts from the first step again: its retry goes out at once.
        server.handler = close_first(1)
        assert addresses(await up.query(query("h1.example."), 2.0)) == ["169.254.0.2"]


async def test_a_probe_connects_during_the_backoff_and_its_reply_lets_queries_connect(
    make: MakeUpstream,
) -> None:
    # After an outage the pool may wait up to BACKOFF_MAX_S before it connects again; the
    # health probe must not wait with it, or a server that is back is seen only seconds
    # later and clients keep getting stale answers meanwhile.
    async with FakeUpstream(close_first(2)) as server:
        up = make(server)
        assert isinstance(up, TcpUpstream)
        with pytest.raises(UpstreamError):
            await up.query(query("www.example."), 2.0)  # closed, and closed on its retry
        with pytest.raises(UpstreamDown):
            await up.query(query("www.example."), 2.0)  # the pool backs off ...
        outcome: asyncio.Future[tuple[bytes | None, UpstreamError | None]]
        outcome = asyncio.get_running_loop().create_future()
        up.probe(Callback(query("."), lambda reply, error: outcome.set_result((reply, error))), 2.0)
        reply, error = await outcome  # ... but the probe connects at once
        assert error is None and reply is not None
        assert server.tcp_connections == 3 and up.failed_connections == 0
        # The backoff is over: the next query is answered without waiting.
        assert addresses(await up.query(query("h1.example."), 2.0)) == ["169.254.0.2"]


async def test_an_idle_connection_closed_by_the_server_is_no_failure(
    fake: FakeUpstream, make: MakeUpstream
) -> None:
    up = make(fake)
    assert isinstance(up, TcpUpstream)
    await up.query(query("www.example."), 2.0)
    fake.close_tcp_connections()
    assert await wait_for(lambda: up.stats.open_connections == 0)
    assert up.failed_connections == 0


# --------------------------------------------------------------------------------------
# auto: TCP, or UDP for a server that does not answer over TCP


def udp_only(tcp_action: Action) -> SyncHandler:
    """Answers from RECORDS over UDP; over TCP does ``tcp_action`` instead."""
    base = zone_handler(RECORDS)
    return lambda msg, transport: tcp_action if transport == "tcp" else base(msg, transport)


async def test_auto_uses_udp_for_a_server_that_closes_tcp(
    make: MakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    async with FakeUpstream(udp_only(Close())) as server:
        up = make(server, "auto")
        assert isinstance(up, AutoUpstream)
        with caplog.at_level(logging.WARNING, logger="dnsproxy.upstream"):
            # The first query is answered, over UDP, within its own time.
            reply = await up.query(query("www.example.", qid=0x4321), 1.0)
            assert reply[:2] == b"\x43\x21"
            assert addresses(reply) == ["169.254.1.1"]
            assert up.transports() == {"tcp": 0, "udp": 1}
            connects = server.tcp_connections
            assert connects == 2  # the query and its retry
            for i in range(20):
                reply = await up.query(query(f"h{i}.example."), 1.0)
                assert addresses(reply) == [f"169.254.0.{i + 1}"]
        assert server.tcp_connections == connects  # nothing more over TCP
        where = f"{server.host}:{server.port}"
        assert [r.message for r in caplog.records] == [
            f"{where} closes connections without answering over TCP but answers over UDP: "
            f"using UDP for it (write udp://{where} to silence this, or fix the server's "
            "TCP); TCP is tried again every 60s"
        ]
        # UDP as UdpUpstream sends it: a fresh source port and a random ID per query.
        udp = [m for transport, m in server.queries if transport == "udp"]
        assert len(udp) == 21
        assert len({source[1] for source in server.udp_sources}) >= 19
        assert len({m.id for m in udp}) >= 19
        families = {f.name: f for f in up.collect()}
        assert {
            s.labels["transport"]: s.value for s in families["dnsproxy_upstream_transport"].samples
        } == {"tcp": 0, "udp": 1}
        assert families["dnsproxy_upstream_queries"].samples[0].labels == {"upstream": up.label}


async def test_auto_uses_udp_for_a_server_that_refuses_tcp(make: MakeUpstream) -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as server:
        await server.stop_tcp()
        up = make(server, "auto")
        assert isinstance(up, AutoUpstream)
        assert addresses(await up.query(query("www.example."), 1.0)) == ["169.254.1.1"]
        assert up.using_udp
        assert up.tcp.failure == "refuses connections"


async def test_auto_stays_on_tcp_for_a_server_that_speaks_it(make: MakeUpstream) -> None:
    # The first TCP query gets no answer in time.
    async with FakeUpstream(first_then([Drop()], zone_handler(RECORDS))) as server:
        up = make(server, "auto")
        assert isinstance(up, AutoUpstream)
        # A timeout over TCP says the server is slow, not that TCP is broken.
        with pytest.raises(UpstreamTimeout):
            await up.query(query("h1.example."), 0.2)
        for i in range(5):
            await up.query(query(f"h{i}.example."), 1.0)
        assert {transport for transport, _ in server.queries} == {"tcp"}
        assert up.transports() == {"tcp": 1, "udp": 0}


async def test_auto_goes_back_to_tcp_when_it_answers_again(
    make: MakeUpstream, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("dnsproxy.upstream.TCP_RECHECK_S", 0.05)
    async with FakeUpstream(udp_only(Close())) as server:
        up = make(server, "auto")
        assert isinstance(up, AutoUpstream)
        await up.query(query("www.example."), 1.0)
        assert up.using_udp
        server.handler = zone_handler(RECORDS)  # the resolver's TCP is fixed
        with caplog.at_level(logging.WARNING, logger="dnsproxy.upstream"):
            for _ in range(100):
                await up.query(query("www.example."), 1.0)  # answered over UDP meanwhile
                if not up.using_udp:
                    break
                await asyncio.sleep(0.05)
        assert up.transports() == {"tcp": 1, "udp": 0}
        assert f"{server.host}:{server.port} answers over TCP again: using TCP for it" in [
            r.message for r in caplog.records
        ]
        before = len(server.queries)
        await up.query(query("h7.example."), 1.0)
        assert [transport for transport, _ in server.queries[before:]] == ["tcp"]


async def test_auto_fails_when_neither_transport_answers(make: MakeUpstream) -> None:
    async with FakeUpstream(lambda m, t: Close() if t == "tcp" else Drop()) as server:
        up = make(server, "auto")
        assert isinstance(up, AutoUpstream)
        with pytest.raises(UpstreamTimeout):
            await up.query(query("www.example."), 0.3)
        assert not up.using_udp
