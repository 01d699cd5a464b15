"""An in-process fake DNS server for tests: UDP and TCP on one port, scripted per query.

The handler sees each parsed query and the transport it came on, and says what to do:
reply with a message or raw bytes, stay silent, close the connection, reply later, or any
sequence of these. TCP queries are handled as they arrive, so delayed replies overtake
nothing and answers go out in whatever order the delays produce (RFC 7766 pipelining).

Usage::

    async with FakeUpstream(zone_handler({("www.example.", "A"): ["169.254.1.1"]})) as fake:
        ...  # send to (fake.host, fake.port); inspect fake.queries, fake.tcp_connections
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, TypeAlias, cast

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

__all__ = [
    "Action",
    "Close",
    "Delay",
    "Drop",
    "FakeUpstream",
    "Handler",
    "Raw",
    "SyncHandler",
    "first_then",
    "zone_handler",
]

log = logging.getLogger(__name__)

_U16 = struct.Struct(">H")


@dataclass(frozen=True)
class Drop:
    """Send nothing."""


@dataclass(frozen=True)
class Close:
    """TCP: close the connection without replying. UDP: the same as :class:`Drop`."""


@dataclass(frozen=True)
class Delay:
    """Carry out ``action`` after ``seconds``, without holding up other queries."""

    seconds: float
    action: Action


@dataclass(frozen=True)
class Raw:
    """TCP: ``data`` written to the stream as is, with no length prefix (framing tests).

    UDP: one datagram, the same as returning ``bytes``.
    """

    data: bytes


# A list or tuple of actions carries them out in order (e.g. a forged reply, then the
# real one); ``bytes`` is one DNS message sent exactly as given (length-prefixed on TCP).
Action: TypeAlias = "dns.message.Message | bytes | Drop | Close | Delay | Raw | Sequence[Action]"
Handler: TypeAlias = Callable[[dns.message.Message, str], "Action | Awaitable[Action]"]
# What zone_handler returns: a Handler whose result can be wrapped in Delay or a list.
SyncHandler: TypeAlias = Callable[[dns.message.Message, str], Action]


class _Channel(Protocol):
    name: str

    def send(self, message: bytes) -> None: ...

    def send_raw(self, data: bytes) -> None: ...

    def close(self) -> None: ...


def zone_handler(
    records: dict[tuple[str, str], list[str]],
    ttl: int = 300,
    soa_minimum: int = 60,
    zone: str = "example.",
) -> SyncHandler:
    """Answer from ``records``: ``{(name, rdtype text): [rdata text, ...]}``.

    Names are matched case-insensitively (relative names are taken as absolute). A known
    name asked for another type gets NODATA, an unknown name NXDOMAIN; both carry the
    zone's SOA (TTL ``ttl``, MINIMUM ``soa_minimum``) in the authority section. EDNS is
    answered as :func:`dns.message.make_response` does, with the DO bit echoed.
    """
    table: dict[tuple[str, str], list[str]] = {}
    for (name, rdtype), rdatas in records.items():
        absolute = name.lower() if name.endswith(".") else name.lower() + "."
        table[(absolute, rdtype.upper())] = list(rdatas)
    names = {name for name, _ in table}
    origin = dns.name.from_text(zone)
    soa = dns.rrset.from_text(
        origin,
        ttl,
        dns.rdataclass.IN,
        dns.rdatatype.SOA,
        f"ns.{origin} hostmaster.{origin} 1 3600 600 86400 {soa_minimum}",
    )

    def handler(query: dns.message.Message, transport: str) -> Action:
        response = dns.message.make_response(query)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response
        response.flags |= dns.flags.AA
        if query.edns >= 0 and query.ednsflags & dns.flags.DO:
            response.ednsflags |= dns.flags.DO  # make_response keeps EDNS but not DO
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        rdatas = table.get((name, rdtype))
        if rdatas:
            response.answer.append(
                dns.rrset.from_text_list(question.name, ttl, question.rdclass, rdtype, rdatas)
            )
        else:
            if name not in names:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(soa)
        return response

    return handler


def first_then(firsts: Sequence[Action], then: SyncHandler) -> SyncHandler:
    """A handler that answers the first queries with ``firsts``, one each, then as ``then``."""
    calls = 0

    def handler(query: dns.message.Message, transport: str) -> Action:
        nonlocal calls
        calls += 1
        return firsts[calls - 1] if calls <= len(firsts) else then(query, transport)

    return handler


class FakeUpstream:
    """DNS server on ``host`` (127.0.0.1 by default), UDP and TCP on the same port.

    With ``tls`` (a server context) the stream side is DNS over TLS instead of TCP, and
    its queries are seen as transport ``"tls"``.
    """

    def __init__(
        self,
        handler: Handler | None = None,
        host: str = "127.0.0.1",
        tls: ssl.SSLContext | None = None,
        port: int = 0,
    ) -> None:
        self.handler: Handler = handler if handler is not None else zone_handler({})
        self.host = host
        self.tls = tls
        self.port = port  # 0: a free one, chosen at start
        self.queries: list[tuple[str, dns.message.Message]] = []
        self.udp_sources: list[tuple[str | int, ...]] = []  # source address of each UDP query
        self.tcp_connections = 0  # accepted so far (over TLS: handshakes completed)
        self.tls_resumed = 0  # of those, TLS handshakes that resumed a session
        self.malformed = 0  # undecodable messages, bad framing, replies sent to us
        self.handler_errors = 0  # handlers that raised (the query gets no reply)
        self._udp: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self._tcp: set[asyncio.Transport] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> FakeUpstream:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        last: OSError | None = None
        # The UDP port the OS picks may be taken for TCP; a few tries settle it.
        for _ in range(20 if self.port == 0 else 1):
            udp, _ = await loop.create_datagram_endpoint(
                lambda: _UdpServer(self), local_addr=(self.host, self.port)
            )
            port = udp.get_extra_info("sockname")[1]
            try:
                server = await loop.create_server(
                    lambda: _TcpServer(self), self.host, port, ssl=self.tls
                )
            except OSError as exc:
                last = exc
                udp.close()
                continue
            self._udp = udp
            self._server = server
            self.port = port
            return
        raise RuntimeError(f"no port free for both UDP and TCP on {self.host}: {last}")

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            self._server.close()
        for transport in list(self._tcp):
            transport.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop ends

    async def stop_tcp(self) -> None:
        """Stop listening on TCP, so that connecting is refused; UDP goes on."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def close_tcp_connections(self) -> None:
        """Close every accepted TCP connection, as a server's idle timeout would."""
        for transport in list(self._tcp):
            transport.close()

    # -- dispatch

    def _received(self, data: bytes, channel: _Channel) -> None:
        try:
            query = dns.message.from_wire(data)
        except (dns.exception.DNSException, ValueError, IndexError):
            self.malformed += 1
            return
        if query.flags & dns.flags.QR:
            self.malformed += 1
            return
        self.queries.append((channel.name, query))
        try:
            result = self.handler(query, channel.name)
        except Exception:
            self.handler_errors += 1
            log.exception("fake upstream handler failed")
            return
        if inspect.isawaitable(result):
            self._spawn(self._await_then_do(result, channel))
        else:
            self._do(result, channel)

    def _spawn(self, coro: Awaitable[None]) -> None:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await_then_do(self, result: Awaitable[Action], channel: _Channel) -> None:
        try:
            action = await result
        except Exception:
            self.handler_errors += 1
            log.exception("fake upstream handler failed")
            return
        self._do(action, channel)

    async def _later(self, seconds: float, action: Action, channel: _Channel) -> None:
        await asyncio.sleep(seconds)
        self._do(action, channel)

    def _do(self, action: Action, channel: _Channel) -> None:
        if isinstance(action, dns.message.Message):
            channel.send(action.to_wire())
        elif isinstance(action, bytes | bytearray | memoryview):
            channel.send(bytes(action))
        elif isinstance(action, Raw):
            channel.send_raw(action.data)
        elif isinstance(action, Drop):
            pass
        elif isinstance(action, Close):
            channel.close()
        elif isinstance(action, Delay):
            self._spawn(self._later(action.seconds, action.action, channel))
        elif isinstance(action, list | tuple):
            for item in action:
                self._do(item, channel)
        else:
            raise TypeError(f"unknown fake upstream action {action!r}")


class _UdpReply:
    name = "udp"

    def __init__(self, transport: asyncio.DatagramTransport, addr: tuple[str | int, ...]) -> None:
        self._transport = transport
        self._addr = addr

    def send(self, message: bytes) -> None:
        if not self._transport.is_closing():
            self._transport.sendto(message, self._addr)

    def send_raw(self, data: bytes) -> None:
        self.send(data)

    def close(self) -> None:
        pass


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, fake: FakeUpstream) -> None:
        self._fake = fake
        self._transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: neither 3.11's nor uvloop's UDP transport subclasses it.
        self._transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self._transport is not None:
            self._fake.udp_sources.append(addr)
            self._fake._received(data, _UdpReply(self._transport, addr))

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors for replies to clients that have gone away


class _TcpServer(asyncio.Protocol):
    def __init__(self, fake: FakeUpstream) -> None:
        self.name = "tcp" if fake.tls is None else "tls"
        self._fake = fake
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)
        self._fake.tcp_connections += 1
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.session_reused:
            self._fake.tls_resumed += 1
        self._fake._tcp.add(self._transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._fake._tcp.discard(self._transport)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        # Bounded: a frame is at most 2 + 65535 bytes and complete ones are consumed.
        while len(buf) >= 2:
            length = _U16.unpack_from(buf)[0]
            if length == 0:
                self._fake.malformed += 1
                self.close()
                return
            if len(buf) < 2 + length:
                return
            message = bytes(buf[2 : 2 + length])
            del buf[: 2 + length]
            self._fake._received(message, self)
            if self._transport is None or self._transport.is_closing():
                return  # a Close action: later pipelined queries were never read

    def send(self, message: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_U16.pack(len(message)) + message)

    def send_raw(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
