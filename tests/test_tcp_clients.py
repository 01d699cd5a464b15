"""TCP clients cannot hold client slots they abandoned, nor take them all from one address.

dnspython and raw sockets as clients of an in-process dnsproxy on loopback, in front of
the fake upstream. Waits are bounded polls, never latency assertions.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import dns.asyncquery
import dns.message
import dns.rcode
from conftest import RECORDS, proxy_with, wait_for
from fakeupstream import Delay, zone_handler

from dnsproxy.app import App
from dnsproxy.config import ServerLimits

ANSWER = zone_handler(RECORDS)


def slow_for_some(query: dns.message.Message, transport: str) -> object:
    """Answers at once, except names starting with "slow" (after 1 s)."""
    answer = ANSWER(query, transport)
    if query.question[0].name.to_text().startswith("slow"):
        return Delay(1.0, answer)
    return answer


def framed(name: str) -> bytes:
    wire = dns.message.make_query(name, "A").to_wire()
    return struct.pack(">H", len(wire)) + wire


async def abandon(host: str, port: int, payload: bytes, reset: bool) -> None:
    """Connect, send ``payload``, and close (with a reset if ``reset``)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (host, port))
        if payload:
            await loop.sock_sendall(sock, payload)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


async def ask_tcp(app: App, name: str) -> dns.message.Message:
    hp = app.listen[0]
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.tcp(query, hp.host, port=hp.port, timeout=10)


async def test_abandoned_clients_free_their_slots_at_once() -> None:
    # More clients than max_tcp_clients (1024), each gone after sending a lone length
    # prefix, half a query, or a query still unanswered; some reset, some close.
    payloads = [b"\x00\x20", framed("www.example.")[:9], framed("slow.example.")]
    async with proxy_with(slow_for_some) as (app, _fake):
        hp = app.listen[0]
        for batch in range(11):
            await asyncio.gather(
                *(
                    abandon(hp.host, hp.port, payloads[i % 3], reset=i % 2 == 1)
                    for i in range(batch * 100, batch * 100 + 100)
                )
            )
        # A legitimate client is served right away, not after some timeout.
        reply = await asyncio.wait_for(ask_tcp(app, "www.example."), 10)
        assert reply.rcode() == dns.rcode.NOERROR
        assert reply.answer[0][0].to_text() == "169.254.1.1"
        stats = app.server.stats
        assert await wait_for(lambda: stats.tcp_clients == 0, 5.0)
        assert "tcp_client_limit" not in stats.dropped
        assert stats.dropped.get("tcp_partial_frame", 0) > 0
        # Answers to clients that left with a query unanswered are dropped and counted.
        assert await wait_for(lambda: stats.dropped.get("tcp_client_gone", 0) > 0, 5.0)


async def test_client_with_unanswered_queries_frees_its_slot_when_it_closes() -> None:
    async with proxy_with(slow_for_some, try_timeout_s=5, deadline_s=5) as (app, _fake):
        hp = app.listen[0]
        _reader, writer = await asyncio.open_connection(hp.host, hp.port)
        writer.write(framed("slow.example."))
        await writer.drain()
        stats = app.server.stats
        assert await wait_for(lambda: app.forwarder.inflight == 1, 10.0)
        assert stats.tcp_clients == 1
        writer.close()
        await writer.wait_closed()
        # Freed while the upstream is still working on the query (it takes 1 s).
        assert await wait_for(lambda: stats.tcp_clients == 0, 10.0)
        assert app.forwarder.inflight == 1
        assert await wait_for(lambda: app.forwarder.inflight == 0, 10.0)
        assert await wait_for(lambda: stats.dropped.get("tcp_client_gone", 0) == 1, 10.0)


async def test_a_frame_left_incomplete_is_abandoned_long_before_the_idle_timeout() -> None:
    limits = ServerLimits(tcp_idle_timeout_s=120)
    async with proxy_with(limits=limits) as (app, _fake):
        hp = app.listen[0]
        reader, writer = await asyncio.open_connection(hp.host, hp.port)
        writer.write(framed("www.example.")[:5])  # and then nothing, but stay connected
        await writer.drain()
        # The server closes it: EOF well within the bound, far from the 120 s idle timeout.
        assert await asyncio.wait_for(reader.read(), 30) == b""
        writer.close()
        stats = app.server.stats
        assert await wait_for(lambda: stats.tcp_clients == 0, 10.0)
        assert stats.dropped.get("tcp_partial_frame") == 1


async def test_whole_queries_keep_an_open_connection_alive() -> None:
    """The stall deadline is for half-sent frames only: pipelining in pieces still works."""
    async with proxy_with() as (app, _fake):
        hp = app.listen[0]
        reader, writer = await asyncio.open_connection(hp.host, hp.port)
        query = framed("www.example.")
        writer.write(query[:7])
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(query[7:])
        await writer.drain()
        size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
        reply = dns.message.from_wire(await reader.readexactly(size))
        assert reply.answer[0][0].to_text() == "169.254.1.1"
        writer.close()
        await writer.wait_closed()


async def test_client_slots_are_bounded_per_source_address() -> None:
    limits = ServerLimits(max_tcp_clients=10, max_tcp_clients_per_source=2)
    async with proxy_with(limits=limits) as (app, _fake):
        hp = app.listen[0]
        held = [await asyncio.open_connection(hp.host, hp.port) for _ in range(2)]
        stats = app.server.stats
        assert await wait_for(lambda: stats.tcp_clients == 2, 10.0)
        # A third connection from the same address is refused at once...
        reader, writer = await asyncio.open_connection(hp.host, hp.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        assert stats.dropped.get("tcp_source_limit") == 1
        # ...while another address still gets a slot and an answer.
        reader, writer = await asyncio.open_connection(
            hp.host, hp.port, local_addr=("127.0.0.2", 0)
        )
        writer.write(framed("www.example."))
        size = struct.unpack(">H", await asyncio.wait_for(reader.readexactly(2), 10))[0]
        reply = dns.message.from_wire(await reader.readexactly(size))
        assert reply.rcode() == dns.rcode.NOERROR
        assert stats.tcp_clients == 3
        writer.close()
        # Once the address closes one of its connections, it may open another.
        held[0][1].close()
        assert await wait_for(lambda: stats.tcp_clients == 1, 10.0)
        reply = await ask_tcp(app, "www.example.")
        assert reply.rcode() == dns.rcode.NOERROR
        for _, w in held[1:]:
            w.close()
        assert await wait_for(lambda: stats.tcp_clients == 0, 10.0)
