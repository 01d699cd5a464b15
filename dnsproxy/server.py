"""Client side: UDP and TCP listeners, framing, ACL, limits and the cache-hit fast path.

A cache hit is answered inside ``datagram_received``/``data_received``: the question is
walked with byte operations, the stored reply is rendered for this client and sent, with
no task, no await, no lock and no log. Only misses go to the forwarder.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any, cast

from dnsproxy import wire
from dnsproxy.cache import Cache, Entry
from dnsproxy.config import Config, HostPort, IPNetwork
from dnsproxy.forwarder import Forwarder

log = logging.getLogger(__name__)
qlog = logging.getLogger("dnsproxy.query")

_TCP_MAX_REPLY = 65535
_UDP_BATCH = 64  # datagrams read per wake-up before other work gets a turn
_UDP_MAX_QUERY = 4096  # a longer datagram is cut here and then fails validation
_ACL_MEMO_MAX = 4096
_MEMO_MAX_QUERY = 512  # longer queries are validated every time instead of remembered
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux only; 33 there


class ServerStats:
    """Plain counters written on the hot path and read by the metrics collector."""

    __slots__ = (
        "dropped",
        "hits",
        "invalid",
        "misses",
        "qtypes",
        "rcodes",
        "refused_acl",
        "tcp_clients",
        "tcp_requests",
        "udp_requests",
    )

    def __init__(self) -> None:
        self.udp_requests = 0
        self.tcp_requests = 0
        self.hits = 0
        self.misses = 0
        self.refused_acl = 0
        self.tcp_clients = 0
        self.qtypes = [0] * 65536
        self.rcodes = [0] * 4096
        # Packets we did not answer, and queries answered with FORMERR/NOTIMP/BADVERS,
        # by reason. Keys come from a fixed set of reasons, so both stay small.
        self.dropped: dict[str, int] = {}
        self.invalid: dict[str, int] = {}


class Acl(dict[str, bool]):
    """Source-address allow list: ``acl[host]`` is the verdict for an address.

    A dict of the verdicts seen so far (bounded; cleared when full), so that a lookup
    per packet is a plain dict read; an address not in it is checked by __missing__.
    """

    def __init__(self, networks: tuple[IPNetwork, ...]) -> None:
        super().__init__()
        self._networks = networks

    def __missing__(self, host: str) -> bool:
        ok = self._check(host)
        if len(self) >= _ACL_MEMO_MAX:
            self.clear()
        self[host] = ok
        return ok

    def _check(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self._networks)


# A validated query: cache key, end of question, EDNS (see wire.parse_query), UDP reply
# limit, wire.plan of it, and its qtype for the per-type counter.
Parsed = tuple[bytes, int, int, int, int, int, int, int]


def _count(table: dict[str, int], reason: str) -> None:
    table[reason] = table.get(reason, 0) + 1


class _Handler:
    """State shared by the UDP and TCP protocols of one server."""

    def __init__(self, config: Config, cache: Cache, forwarder: Forwarder) -> None:
        self.config = config
        self.cache = cache
        self.forwarder = forwarder
        self.stats = ServerStats()
        self.acl: Acl | None = Acl(config.allow) if config.allow else None
        self.max_udp = config.limits.udp_payload_size
        self.opts = wire.client_opts(self.max_udp)
        self.log_queries = config.log.queries
        self.closing = False
        # Validated queries by their bytes after the ID: a repeated query (same name,
        # case, flags and OPT; only the ID differs) skips validation entirely.
        # parse_query never reads the ID, so the memo is exact. Cleared when full.
        self.memo: dict[bytes, Parsed] = {}
        self.memo_max = max(1024, config.cache_max_entries)

    def remember(self, data: bytes, key: bytes, qend: int, edns: int, qtype: int) -> None:
        """Memoize a query that was just answered from the cache, for its repeats.

        Only cache hits are remembered (a name asked once costs no memo entry) and
        only ordinary-sized queries, so the memo is bounded in bytes as in entries.
        """
        if len(data) <= _MEMO_MAX_QUERY:
            memo = self.memo
            if len(memo) >= self.memo_max:
                memo.clear()
            hi, ti, mode = wire.plan(data, edns)
            limit = wire.udp_limit(edns, self.max_udp)
            memo[data[2:]] = (key, qend, edns, limit, hi, ti, mode, qtype)

    def bad_query(self, data: bytes, exc: wire.BadQuery) -> bytes | None:
        """Error reply for a query that failed validation, or None to drop it."""
        if exc.rcode is None:
            _count(self.stats.dropped, exc.reason)
            return None
        _count(self.stats.invalid, exc.reason)
        self.stats.rcodes[exc.rcode] += 1
        return wire.error_reply(data, exc.rcode, exc.qend, exc.edns, self.max_udp)

    def refuse(self, data: bytes, qend: int, edns: int) -> bytes:
        self.stats.refused_acl += 1
        self.stats.rcodes[wire.REFUSED] += 1
        return wire.error_reply(data, wire.REFUSED, qend, edns, self.max_udp)

    def serve(
        self,
        data: bytes,
        parsed: Parsed | None,
        peer: Any,
        tcp: bool,
        send: Callable[[bytes, Any], None],
        deliver: Callable[[Any, bytes, bytes, int, int, Entry], None],
    ) -> bool:
        """Answer a query the UDP fast path did not (or a TCP one); True when forwarded.

        Validation, ACL, cache lookup, refusals, each answered with ``send(reply, peer)``;
        a miss goes to the forwarder, which calls ``deliver(peer, key, data, qend, edns,
        entry)`` once with the outcome.
        """
        stats = self.stats
        if parsed is None:
            try:
                key, qend, edns = wire.parse_query(data)
            except wire.BadQuery as exc:
                reply = self.bad_query(data, exc)
                if reply is not None:
                    send(reply, peer)
                return False
            qtype = wire.key_qtype(key)
        else:
            key, qend, edns, _limit, _hi, _ti, _mode, qtype = parsed
        if tcp:
            stats.tcp_requests += 1
        else:
            stats.udp_requests += 1
        stats.qtypes[qtype] += 1
        if self.acl is not None and not self.acl[peer[0]]:
            send(self.refuse(data, qend, edns), peer)
            return False
        now = time.monotonic()
        entry = self.cache.get(key, now)
        if entry is not None:
            stats.hits += 1
            stats.rcodes[entry.rcode] += 1
            limit = _TCP_MAX_REPLY if tcp else wire.udp_limit(edns, self.max_udp)
            send(entry.answer(data, qend, edns, now, limit, self.opts), peer)
            if parsed is None:
                self.remember(data, key, qend, edns, qtype)
            if self.log_queries:
                self.log_query(peer, "tcp" if tcp else "udp", key, entry.rcode, "cache")
            return False
        stats.misses += 1
        if qtype in wire.NOT_FORWARDED:
            rcode, reason = wire.NOT_FORWARDED[qtype]
            if reason is not None:
                _count(stats.invalid, reason)
            stats.rcodes[rcode] += 1
            send(wire.error_reply(data, rcode, qend, edns, self.max_udp), peer)
            return False
        self.forwarder.submit(key, data, qend, partial(deliver, peer, key, data, qend, edns), now)
        return True

    def delivered(
        self, peer: Any, tcp: bool, key: bytes, data: bytes, qend: int, edns: int, entry: Entry
    ) -> bytes:
        """The reply to a miss whose resolution ended with ``entry``, counted and logged."""
        self.stats.rcodes[entry.rcode] += 1
        limit = _TCP_MAX_REPLY if tcp else wire.udp_limit(edns, self.max_udp)
        reply = entry.answer_once(data, qend, edns, time.monotonic(), limit, self.opts)
        if self.log_queries:
            self.log_query(peer, "tcp" if tcp else "udp", key, entry.rcode, "upstream")
        return reply

    def log_query(self, peer: Any, proto: str, key: bytes, rcode: int, source: str) -> None:
        try:
            name = wire.read_name(key, 0)
        except wire.WireError:
            name = "?"
        qlog.info(
            "%s %s %s type=%d rcode=%d %s",
            peer[0] if isinstance(peer, tuple) else peer,
            proto,
            name,
            wire.key_qtype(key),
            rcode,
            source,
        )


class _UdpListener:
    """One UDP socket, read with ``add_reader`` and drained in batches.

    A plain non-blocking socket instead of a DatagramProtocol: one loop wake-up reads up
    to ``_UDP_BATCH`` datagrams and answers hits with a direct ``sendto``, which on this
    path is worth about a third more queries per second than a transport callback per
    datagram, on uvloop and on the stock loop alike.
    """

    def __init__(self, handler: _Handler, sock: socket.socket) -> None:
        self.h = handler
        self.stats = handler.stats
        self.sock = sock
        self.closed = False
        host, port = sock.getsockname()[:2]
        self.label = str(HostPort(host, port))
        # The key of this socket in /proc/net/udp{,6}, where the kernel counts its drops.
        self.inode = os.fstat(sock.fileno()).st_ino
        _set_receive_buffer(sock, handler.config.limits.udp_rcvbuf, self.label)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()

    def _readable(self) -> None:
        h = self.h
        stats = self.stats
        recvfrom = self.sock.recvfrom
        sendto = self.sock.sendto
        memo_get = h.memo.get
        store_get = h.cache.store.get
        touch = h.cache.store.move_to_end
        monotonic = time.monotonic
        join = b"".join
        acl = h.acl
        qtypes = stats.qtypes
        rcodes = stats.rcodes
        # One clock read per batch: ages are in whole seconds and a batch takes
        # well under a millisecond.
        now = monotonic()
        for _ in range(_UDP_BATCH):
            try:
                data, addr = recvfrom(_UDP_MAX_QUERY)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # ICMP errors for earlier replies surface here; the socket is fine.
                _count(stats.dropped, "udp_recv_error")
                continue
            if h.closing:
                _count(stats.dropped, "shutting_down")
                continue
            parsed = memo_get(data[2:])
            if parsed is not None:
                key, qend, edns, limit, hi, ti, mode, qtype = parsed
                entry = store_get(key)
                if entry is not None and entry.expires_at > now and (acl is None or acl[addr[0]]):
                    touch(key)
                    stats.udp_requests += 1
                    stats.hits += 1
                    qtypes[qtype] += 1
                    rcodes[entry.rcode] += 1
                    age = int(now - entry.stored_at)
                    prepared = (
                        entry.prepared if entry.age == age else entry.prepare(age, qend, h.opts)
                    )
                    head = prepared[hi]
                    if mode == 0 or (mode == 1 and not head[1] & 0x20):
                        reply = join((data[:2], head, data[12:qend], prepared[ti]))
                        if len(reply) > limit:
                            reply = entry.truncate(reply, qend, edns, limit)
                    else:
                        reply = wire.splice(prepared, data, qend, edns)
                        if len(reply) > limit:
                            reply = entry.truncate(reply, qend, edns, limit)
                    try:
                        sendto(reply, addr)
                    except OSError as exc:
                        self._send_failed(exc)
                    if h.log_queries:
                        h.log_query(addr, "udp", key, entry.rcode, "cache")
                    continue
            try:
                h.serve(data, parsed, addr, False, self.send, self._deliver)
            except Exception:
                # A bug must cost one query, not the rest of the batch or the listener.
                _count(stats.dropped, "internal_error")
                log.exception("query from %s failed", addr)

    def _send_failed(self, exc: OSError) -> None:
        if isinstance(exc, BlockingIOError | InterruptedError):
            _count(self.stats.dropped, "udp_send_buffer_full")
        else:
            _count(self.stats.dropped, "udp_send_error")

    def send(self, reply: bytes, addr: Any) -> None:
        try:
            self.sock.sendto(reply, addr)
        except OSError as exc:
            self._send_failed(exc)

    def _deliver(
        self, addr: Any, key: bytes, data: bytes, qend: int, edns: int, entry: Entry
    ) -> None:
        if self.closed:
            _count(self.stats.dropped, "listener_closed")
            return
        self.send(self.h.delivered(addr, False, key, data, qend, edns, entry), addr)


def _set_receive_buffer(sock: socket.socket, size: int, label: str) -> None:
    """Ask for a ``size``-byte receive buffer on ``sock`` (0: keep the kernel's default)
    and log what the kernel granted, as getsockopt reports it.

    SO_RCVBUFFORCE first, which works with CAP_NET_ADMIN (root, or the node DaemonSet)
    whatever ``net.core.rmem_max`` says, then plain SO_RCVBUF, which the kernel caps at
    ``net.core.rmem_max``: Unbound's ``so-rcvbuf`` likewise passes the cap as root. Linux
    doubles the value set, to count its own bookkeeping per datagram, and getsockopt
    reports the doubled figure: each small query takes about 830 bytes of it.
    """
    if size:
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
            except OSError as exc:
                log.warning("udp %s: cannot set the receive buffer: %s", label, exc)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # INFO either way: a capped buffer is the usual case for an unprivileged `make run`.
    if size and granted < 2 * size:
        log.info(
            "udp %s: receive buffer %d bytes as the kernel counts it, not the %d that "
            "limits.udp_rcvbuf %d would give: net.core.rmem_max caps it; raise that sysctl "
            "or run with CAP_NET_ADMIN",
            label,
            granted,
            2 * size,
            size,
        )
    else:
        log.info("udp %s: receive buffer %d bytes as the kernel counts it", label, granted)


def _read_udp_drops(inodes: dict[int, str]) -> dict[str, int]:
    """Datagrams the kernel dropped at each of our UDP sockets (full receive buffer).

    ``inodes`` maps socket inodes to listener labels. Reads the ``drops`` column of
    ``/proc/net/udp`` and ``/proc/net/udp6`` (this process's network namespace), one
    line per UDP socket of the namespace: work for a scrape, never for the query path.
    A table that cannot be read (not Linux) gives no figures.
    """
    drops: dict[str, int] = {}
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as f:
                lines = f.readlines()
        except OSError:
            continue
        for line in lines[1:]:
            fields = line.split()
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            if len(fields) >= 13:
                label = inodes.get(int(fields[9]))
                if label is not None:
                    drops[label] = int(fields[-1])
    return drops


class _TcpConnection(asyncio.Protocol):
    def __init__(self, handler: _Handler, server: DnsServer) -> None:
        self.h = handler
        self.server = server
        self.stats = handler.stats
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending = 0
        self.paused = False  # reading paused (pipelining limit or full write buffer)
        self.write_paused = False
        self.processing = False
        self.eof = False
        self.closed = False
        self.last_activity = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.peer: Any = None
        self.max_pipelined = handler.config.limits.max_pipelined_per_client
        self.idle_s = handler.config.limits.tcp_idle_timeout_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        # None when the socket was reset before we looked; the ACL then refuses it.
        self.peer = transport.get_extra_info("peername") or ("", 0)
        stats = self.stats
        if stats.tcp_clients >= self.h.config.limits.max_tcp_clients or self.h.closing:
            _count(stats.dropped, "tcp_client_limit" if not self.h.closing else "shutting_down")
            self.closed = True
            self.transport.abort()
            return
        stats.tcp_clients += 1
        self.server.connections.add(self)
        self.timer = asyncio.get_running_loop().call_later(self.idle_s, self._idle_check)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None and self in self.server.connections:
            self.server.connections.discard(self)
            self.stats.tcp_clients -= 1
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _idle_check(self) -> None:
        idle = time.monotonic() - self.last_activity
        if self.pending == 0 and idle >= self.idle_s:
            self.close()
            return
        delay = self.idle_s - idle if self.pending == 0 else self.idle_s
        self.timer = asyncio.get_running_loop().call_later(max(delay, 0.05), self._idle_check)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = time.monotonic()
        self.buf += data
        self._process()

    def _process(self) -> None:
        """Handle every complete frame, unless this client already has enough pending.

        Reading pauses while the client has ``max_pipelined`` queries unanswered or our
        replies pile up in the write buffer (a client that sends but does not read), so
        neither its queries nor our replies can grow without bound.
        """
        if self.processing:
            return  # an answer delivered from inside the loop below; it goes on by itself
        self.processing = True
        try:
            self._frames()
        finally:
            self.processing = False
        if not self.closed:
            self._flow()

    def _frames(self) -> None:
        buf = self.buf
        while len(buf) >= 2 and self.pending < self.max_pipelined and not self.write_paused:
            size = (buf[0] << 8) | buf[1]
            if size < wire.HEADER_LEN:
                _count(self.stats.dropped, "tcp_bad_frame")
                self.close()
                return
            if len(buf) < size + 2:
                break
            msg = bytes(memoryview(buf)[2 : size + 2])
            del buf[: size + 2]
            self._handle(msg)
            if self.closed:
                return

    def _flow(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        hold = self.pending >= self.max_pipelined or self.write_paused
        if hold and not self.paused:
            self.paused = True
            transport.pause_reading()
        elif not hold and self.paused:
            self.paused = False
            transport.resume_reading()
        if self.eof and self.pending == 0 and len(self.buf) < 2:
            # The client half-closed and has every answer it asked for.
            self.close()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._process()

    def eof_received(self) -> bool:
        # Keep our side open: answers to queries already received still go out.
        self.eof = True
        self._flow()
        return True

    def _send(self, reply: bytes, peer: Any = None) -> None:
        assert self.transport is not None
        self.transport.write(len(reply).to_bytes(2, "big") + reply)

    def _handle(self, data: bytes) -> None:
        h = self.h
        # Counted before serve(): the answer to a miss may be delivered before it returns.
        self.pending += 1
        if not h.serve(data, h.memo.get(data[2:]), self.peer, True, self._send, self._deliver):
            self.pending -= 1

    def _deliver(
        self, peer: Any, key: bytes, data: bytes, qend: int, edns: int, entry: Entry
    ) -> None:
        self.pending -= 1
        if self.closed:
            _count(self.stats.dropped, "tcp_client_gone")
            return
        self.last_activity = time.monotonic()
        self._send(self.h.delivered(self.peer, True, key, data, qend, edns, entry))
        # Frames held back by the pipelining limit may now be handled.
        self._process()


class DnsServer:
    """Every listener of one process; start binds them all or none."""

    def __init__(self, config: Config, cache: Cache, forwarder: Forwarder) -> None:
        self.handler = _Handler(config, cache, forwarder)
        self.stats = self.handler.stats
        self.connections: set[_TcpConnection] = set()
        self._udp: list[_UdpListener] = []
        self._tcp: list[asyncio.Server] = []
        self.bound: list[HostPort] = []

    async def start(self) -> list[HostPort]:
        loop = asyncio.get_running_loop()
        try:
            for hp in self.handler.config.listen:
                self.bound.append(await self._bind(loop, hp))
        except BaseException:
            await self.close()
            raise
        return self.bound

    async def _bind(self, loop: asyncio.AbstractEventLoop, hp: HostPort) -> HostPort:
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        # Port 0 (tests): take the kernel's UDP port and bind TCP to the same number.
        for _ in range(20):
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.setblocking(False)
                sock.bind((hp.host, hp.port))
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot bind UDP {hp}: {exc.strerror}") from None
            except BaseException:
                sock.close()
                raise
            port = sock.getsockname()[1]
            try:
                server = await loop.create_server(
                    lambda: _TcpConnection(self.handler, self),
                    hp.host,
                    port,
                    family=family,
                    reuse_address=True,
                    backlog=1024,
                )
            except OSError:
                sock.close()
                if hp.port:
                    raise
                continue
            self._udp.append(_UdpListener(self.handler, sock))
            self._tcp.append(server)
            log.info("listening on %s (udp, tcp)", HostPort(hp.host, port))
            return HostPort(hp.host, port)
        raise OSError(f"could not bind UDP and TCP to one port on {hp.host}")

    def udp_receive_drops(self) -> dict[str, int]:
        """Kernel drops at each UDP listener's socket, by listener; for a scrape."""
        return _read_udp_drops({u.inode: u.label for u in list(self._udp) if not u.closed})

    def stop_listening(self) -> None:
        """Refuse new queries and connections; replies still in flight go out."""
        self.handler.closing = True
        for server in self._tcp:
            server.close()

    async def close(self) -> None:
        self.handler.closing = True
        for server in self._tcp:
            server.close()
        for conn in list(self.connections):
            conn.close()
        for listener in self._udp:
            listener.close()
        for server in self._tcp:
            await server.wait_closed()
        self._udp.clear()
        self._tcp.clear()
