"""Batched UDP reads and writes: the compiled build's C extension (``dnsproxy._udpio``,
recvmmsg/sendmmsg) and the pure-Python build's socket-method fallback behave alike, and a
listener answers a burst of clients, each with its own reply, through them.

Each behaviour is checked against both implementations over real loopback sockets; the
C one is skipped (saying so) where the compiled build is not in place, and a compiled run
of `make test` fails if the listener does not use it.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import dns.message
import dns.rdatatype
import pytest
from conftest import proxy_with
from hypothesis import given
from hypothesis import strategies as st

import dnsproxy
from dnsproxy import server, wire


@dataclass
class Impl:
    """One implementation, called with a socket."""

    name: str
    module: Any  # dnsproxy._udpio, or None for the fallback

    def recv(self, sock: socket.socket, count: int) -> list[tuple[bytes, Any]]:
        if self.module is not None:
            return list(self.module.recv_batch(sock.fileno(), count))
        return server._recv_batch(sock.recvfrom, count)

    def send_batch(
        self, sock: socket.socket, replies: list[bytes], addrs: list[Any]
    ) -> tuple[int, int] | None:
        if self.module is not None:
            result: tuple[int, int] | None = self.module.send_batch(sock.fileno(), replies, addrs)
            return result
        return server._send_batch(sock.sendto, replies, addrs)

    def send_to(self, sock: socket.socket, reply: bytes, addr: Any) -> int:
        if self.module is not None:
            return int(self.module.send_to(sock.fileno(), reply, addr))
        return server._send_to(sock.sendto, reply, addr)


def _c_module() -> Any:
    return dnsproxy.native_extension("_udpio")


@pytest.fixture(params=["c", "python"])
def impl(request: pytest.FixtureRequest) -> Impl:
    if request.param == "python":
        return Impl("python", None)
    module = _c_module()
    if module is None:
        pytest.skip("dnsproxy._udpio is not built (the compiled build: make compiled)")
    return Impl("c", module)


def _udp(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.setblocking(False)
    return sock


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for sock in made:
        sock.close()


def _drain(sock: socket.socket, expected: int) -> list[bytes]:
    """What ``sock`` received, waiting up to 2 s for ``expected`` datagrams."""
    got: list[bytes] = []
    sock.settimeout(2.0)
    try:
        while len(got) < expected:
            got.append(sock.recv(65535))
    except TimeoutError:
        pass
    return got


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_reads_a_batch_with_the_senders_addresses(
    impl: Impl, sockets: list[socket.socket], family: socket.AddressFamily
) -> None:
    server_sock = _udp(family)
    clients = [_udp(family) for _ in range(3)]
    sockets += [server_sock, *clients]
    assert impl.recv(server_sock, 64) == []  # empty: no exception, nothing read
    for i, client in enumerate([*clients, clients[0]]):
        client.sendto(b"query %d" % i, server_sock.getsockname())
    batch = impl.recv(server_sock, 64)
    # Addresses as the socket module gives them: (host, port) or (host, port, flow, scope).
    expected = [(b"query %d" % i, c.getsockname()) for i, c in enumerate([*clients, clients[0]])]
    assert batch == expected
    assert impl.recv(server_sock, 64) == []


def test_ipv4_clients_of_a_dual_stack_socket(impl: Impl, sockets: list[socket.socket]) -> None:
    # An IPv4 client of an IPv6 listener that also takes IPv4 has an IPv4-mapped address,
    # as the socket module gives it, and a reply to it arrives.
    server_sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    server_sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    server_sock.bind(("::", 0))
    server_sock.setblocking(False)
    client = _udp()
    sockets += [server_sock, client]
    client.sendto(b"mapped", ("127.0.0.1", server_sock.getsockname()[1]))
    _drain_ready(server_sock)
    [(data, addr)] = impl.recv(server_sock, 64)
    assert data == b"mapped"
    assert addr == ("::ffff:127.0.0.1", client.getsockname()[1], 0, 0)
    assert impl.send_batch(server_sock, [b"back"], [addr]) is None
    assert _drain(client, 1) == [b"back"]


def test_a_datagram_without_an_address(impl: Impl, sockets: list[socket.socket]) -> None:
    # What recvfrom gives for a sender with no address (here a Unix datagram socket pair):
    # None, never the address of an earlier datagram.
    udp_server, udp_client = _udp(), _udp()
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    right.setblocking(False)
    sockets += [udp_server, udp_client, left, right]
    udp_client.sendto(b"first", udp_server.getsockname())
    _drain_ready(udp_server)
    assert impl.recv(udp_server, 64) == [(b"first", udp_client.getsockname())]
    left.send(b"unix")
    _drain_ready(right)
    [(data, addr)] = impl.recv(right, 64)
    assert data == b"unix"
    assert not addr  # None from the C extension, the socket module's None or ""


def _drain_ready(sock: socket.socket) -> None:
    """Wait (up to 2 s) until ``sock`` has a datagram to read."""
    select.select([sock], [], [], 2.0)


def test_reads_at_most_count_and_cuts_long_datagrams_as_recvfrom_does(
    impl: Impl, sockets: list[socket.socket]
) -> None:
    server_sock, client = _udp(), _udp()
    sockets += [server_sock, client]
    for i in range(70):
        client.sendto(b"%d" % i, server_sock.getsockname())
    client.sendto(b"x" * 5000, server_sock.getsockname())
    first = impl.recv(server_sock, 64)
    rest = impl.recv(server_sock, 64)
    assert [d for d, _ in first] == [b"%d" % i for i in range(64)]
    assert [d for d, _ in rest[:6]] == [b"%d" % i for i in range(64, 70)]
    # A datagram longer than a query can be is cut where the listener's recvfrom cuts it.
    assert rest[6][0] == b"x" * server._UDP_MAX_QUERY
    assert len(rest) == 7


def test_many_clients_each_keep_their_own_address(impl: Impl, sockets: list[socket.socket]) -> None:
    # More clients than the C extension keeps address tuples for (256), twice over: a
    # reused tuple must never be another client's.
    server_sock = _udp()
    clients = [_udp() for _ in range(300)]
    sockets += [server_sock, *clients]
    for _round in range(2):
        seen: list[tuple[bytes, Any]] = []
        for start in range(0, len(clients), 50):
            for i, client in enumerate(clients[start : start + 50], start):
                client.sendto(b"%d" % i, server_sock.getsockname())
            while len(seen) < start + 50:
                batch = impl.recv(server_sock, 64)
                assert batch, "datagrams sent on loopback were not there to read"
                seen += batch
        assert seen == [(b"%d" % i, c.getsockname()) for i, c in enumerate(clients)]
        # Replies to the addresses read (the C extension remembers the last 256 it sent
        # to, by identity): each client gets its own.
        for start in range(0, len(clients), 50):
            part = seen[start : start + 50]
            assert (
                impl.send_batch(server_sock, [b"re " + d for d, _ in part], [a for _, a in part])
                is None
            )
        for i, client in enumerate(clients):
            assert _drain(client, 1) == [b"re %d" % i]


def test_sends_each_reply_to_its_address_and_counts_failures(
    impl: Impl, sockets: list[socket.socket]
) -> None:
    server_sock = _udp()
    clients = [_udp() for _ in range(3)]
    sockets += [server_sock, *clients]
    replies = [b"reply %d" % i for i in range(3)]
    assert impl.send_batch(server_sock, replies, [c.getsockname() for c in clients]) is None
    assert [_drain(c, 1) for c in clients] == [[r] for r in replies]
    # A reply to port 0 fails (EINVAL); the replies around it still go out.
    addrs = [clients[0].getsockname(), ("127.0.0.1", 0), clients[2].getsockname()]
    assert impl.send_batch(server_sock, replies, addrs) == (0, 1)
    assert _drain(clients[0], 1) == [replies[0]]
    assert _drain(clients[2], 1) == [replies[2]]
    # More replies than one system call takes (64) all arrive, in order.
    many = [b"%d" % i for i in range(150)]
    assert impl.send_batch(server_sock, many, [clients[1].getsockname()] * 150) is None
    assert _drain(clients[1], 150) == many


def test_send_to_returns_the_errno(impl: Impl, sockets: list[socket.socket]) -> None:
    server_sock, client = _udp(socket.AF_INET6), _udp(socket.AF_INET6)
    sockets += [server_sock, client]
    assert impl.send_to(server_sock, b"one", client.getsockname()) == 0
    assert impl.send_to(server_sock, b"two", client.getsockname()[:2]) == 0
    assert _drain(client, 2) == [b"one", b"two"]
    too_big = b"x" * 70_000  # more than a datagram holds
    assert impl.send_to(server_sock, too_big, client.getsockname()) == errno.EMSGSIZE


def test_c_extension_refuses_bad_arguments_without_crashing(sockets: list[socket.socket]) -> None:
    module = _c_module()
    if module is None:
        pytest.skip("dnsproxy._udpio is not built (the compiled build: make compiled)")
    sock = _udp()
    sockets.append(sock)
    fd, addr = sock.fileno(), sock.getsockname()
    with pytest.raises(ValueError, match="count"):
        module.recv_batch(fd, 0)
    with pytest.raises(ValueError, match="count"):
        module.recv_batch(fd, module.BATCH_MAX + 1)
    with pytest.raises(ValueError):
        module.recv_batch(-1, 1)
    with pytest.raises(TypeError):
        module.recv_batch(fd)
    with pytest.raises(ValueError, match="as many"):
        module.send_batch(fd, [b"x"], [])
    with pytest.raises(TypeError, match="bytes"):
        module.send_batch(fd, ["text"], [addr])
    with pytest.raises(TypeError, match="bytes"):
        module.send_batch(fd, [bytearray(b"x")], [addr])
    with pytest.raises(TypeError):
        module.send_batch(fd, (b"x",), [addr])
    with pytest.raises(ValueError, match="numeric"):
        module.send_to(fd, b"x", ("localhost", 53))
    with pytest.raises(ValueError, match="NUL"):
        module.send_to(fd, b"x", ("127.0.0.1\x00junk", addr[1]))
    with pytest.raises(OverflowError, match="flowinfo"):
        module.send_to(fd, b"x", ("::1", 53, 1 << 20, 0))

    class Port(int):
        """An int subclass, whose conversion could run Python code mid-batch."""

    with pytest.raises(TypeError, match="int"):
        module.send_to(fd, b"x", ("127.0.0.1", Port(53)))
    # In a batch, an address it cannot send to is counted as failed and the rest go out.
    client = _udp()
    sockets.append(client)
    bad = [("127.0.0.1", Port(53)), ("localhost", 53), client.getsockname()]
    assert module.send_batch(fd, [b"a", b"b", b"c"], bad) == (0, 2)
    assert _drain(client, 1) == [b"c"]
    with pytest.raises(TypeError):
        module.send_to(fd, b"x", "127.0.0.1")
    with pytest.raises(OverflowError):
        module.send_to(fd, b"x", ("127.0.0.1", 70000))
    # A closed descriptor is an error, not a crash.
    spare = os.dup(fd)
    os.close(spare)
    with pytest.raises(OSError):
        module.recv_batch(spare, 1)
    assert module.send_to(spare, b"x", addr) == errno.EBADF


@given(
    query=st.binary(min_size=12, max_size=300),
    head=st.binary(max_size=20),
    tail=st.binary(max_size=600),
    data=st.data(),
)
def test_c_splice_is_the_join_it_replaces(
    query: bytes, head: bytes, tail: bytes, data: st.DataObject
) -> None:
    module = _c_module()
    if module is None:
        pytest.skip("dnsproxy._udpio is not built (the compiled build: make compiled)")
    qend = data.draw(st.integers(12, len(query)))
    expected = b"".join((query[:2], head, query[12:qend], tail))
    assert module.splice(query, head, qend, tail) == expected


@given(
    records=st.lists(st.tuples(st.binary(max_size=12), st.integers(0, 2**31 - 1)), max_size=8),
    question=st.binary(max_size=40),
    header=st.binary(min_size=12, max_size=12),
    age=st.integers(-5, 2**31),
    opts=st.tuples(st.binary(max_size=11), st.binary(max_size=11)),
)
def test_c_aged_prepare_is_the_python_it_replaces(
    records: list[tuple[bytes, int]],
    question: bytes,
    header: bytes,
    age: int,
    opts: tuple[bytes, bytes],
) -> None:
    # A stored reply: header, question, then records whose TTL fields are at known
    # offsets, each after some bytes of its own (name, type, class).
    module = _c_module()
    if module is None:
        pytest.skip("dnsproxy._udpio is not built (the compiled build: make compiled)")
    body = bytearray(header + question)
    qend = len(body)
    offsets, ttls = [], []
    for prefix, ttl in records:
        body += prefix
        offsets.append(len(body))
        body += ttl.to_bytes(4, "big") + b"\x00\x04\xa9\xfe\x01\x01"
        ttls.append(ttl)
    stored = bytes(body)
    expected = wire.prepare(wire.aged(stored, tuple(offsets), tuple(ttls), age), qend, opts)
    got = module.aged_prepare(stored, tuple(offsets), tuple(ttls), age, qend, *opts)
    assert got == expected


def test_c_aged_prepare_refuses_offsets_outside_the_reply() -> None:
    module = _c_module()
    if module is None:
        pytest.skip("dnsproxy._udpio is not built (the compiled build: make compiled)")
    body = bytes(12) + b"q" * 5 + bytes(10)
    with pytest.raises(ValueError, match="offset"):
        module.aged_prepare(body, (25,), (60,), 1, 17, b"", b"")  # past the end
    with pytest.raises(ValueError, match="offset"):
        module.aged_prepare(body, (-1,), (60,), 1, 17, b"", b"")
    with pytest.raises(ValueError):
        module.aged_prepare(body, (17,), (), 1, 17, b"", b"")


@given(data=st.data())
def test_c_aged_prepare_matches_for_a_ttl_offset_anywhere(data: st.DataObject) -> None:
    # As wire.aged on the whole reply, then cut: also for offsets the cache never makes
    # (in the question, in the header, across the question's end).
    module = _c_module()
    if module is None:
        pytest.skip("dnsproxy._udpio is not built (the compiled build: make compiled)")
    body = data.draw(st.binary(min_size=16, max_size=60))
    qend = data.draw(st.integers(12, len(body) + 8))  # past the end: an empty tail
    offsets = tuple(data.draw(st.lists(st.integers(0, len(body) - 4), max_size=4)))
    ttls = tuple(data.draw(st.integers(0, 2**31 - 1)) for _ in offsets)
    age = data.draw(st.integers(0, 2**31))
    opts = (b"\x00\x00\x29", b"\x00\x00\x29\x80")
    expected = wire.prepare(wire.aged(body, offsets, ttls, age), qend, opts)
    assert module.aged_prepare(body, offsets, ttls, age, qend, *opts) == expected


def test_c_splice_refuses_what_is_not_a_query() -> None:
    module = _c_module()
    if module is None:
        pytest.skip("dnsproxy._udpio is not built (the compiled build: make compiled)")
    with pytest.raises(ValueError, match="qend"):
        module.splice(b"\0" * 12, b"", 13, b"")
    with pytest.raises(ValueError, match="qend"):
        module.splice(b"\0" * 12, b"", 11, b"")
    with pytest.raises(TypeError):
        module.splice(bytearray(12), b"", 12, b"")


def test_listener_uses_the_build_asked_for() -> None:
    # `make test` says which build it asked for: a compiled run must batch through the C
    # extension, a pure-Python run must not need it.
    expected = os.environ.get("DNSPROXY_EXPECT_BUILD")
    if not expected:
        pytest.skip("DNSPROXY_EXPECT_BUILD is not set (make test sets it)")
    assert (server._UDPIO is not None) == (expected == "mypyc")


async def test_a_burst_of_clients_each_get_their_own_answer() -> None:
    # 200 clients ask at once, each a name of its own, twice (misses, then hits read in
    # batches and answered with one sendmmsg): every client gets exactly its own answer.
    async with proxy_with() as (app, _fake):
        [bound] = app.server.bound
        host, port = bound.host, bound.port
        loop = asyncio.get_running_loop()
        clients = [_udp() for _ in range(200)]
        try:
            for _round in range(2):
                queries = [
                    dns.message.make_query(
                        "www.example." if i % 2 else "mail.example.", dns.rdatatype.A
                    )
                    for i in range(len(clients))
                ]
                for client, query in zip(clients, queries, strict=True):
                    client.sendto(query.to_wire(), (host, port))
                replies = await asyncio.gather(
                    *(loop.sock_recv(client, 65535) for client in clients)
                )
                for i, (query, raw) in enumerate(zip(queries, replies, strict=True)):
                    reply = dns.message.from_wire(raw)
                    assert reply.id == query.id
                    assert str(reply.question[0].name) == str(query.question[0].name)
                    expected = "169.254.1.1" if i % 2 else "169.254.1.2"
                    assert [r.address for r in reply.answer[0]] == [expected]
        finally:
            for client in clients:
                client.close()
        assert app.server.stats.hits >= len(clients)
