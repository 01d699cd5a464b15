"""Client side: UDP and TCP listeners, framing, ACL, limits and the cache-hit fast path.

A cache hit is answered inside ``datagram_received``/``data_received``: the question is
walked with byte operations, the stored reply is rendered for this client and sent, with
no task, no await, no lock and no log. Only misses go to the forwarder.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dnsproxy import native_extension, wire
from dnsproxy.cache import Cache, Entry
from dnsproxy.config_types import Config, HostPort, IPNetwork
from dnsproxy.forwarder import Forwarder
from dnsproxy.framing import NEVER, FrameError, FrameReader, frame
from dnsproxy.metrics import buckets, by_reason, qtype_name, rcode_name
from dnsproxy.resolution import LatencyHistogram
from dnsproxy.upstream import hold_writes, release_writes

log: Final = logging.getLogger(__name__)
qlog: Final = logging.getLogger("dnsproxy.query")

_TCP_MAX_REPLY: Final = 65535
_TCP_BACKLOG: Final = 1024
_UDP_BATCH: Final = 64  # datagrams read per wake-up before other work gets a turn
_UDP_MAX_QUERY: Final = 4096  # a longer datagram is cut here and then fails validation
# Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS; the generic value, as on x86-64 and arm64,
# which the socket module does not name): each datagram carries the time the kernel
# queued it, so the listener can see how long its oldest datagram has waited.
_SO_TIMESTAMPNS: Final = 35
_TIMESPEC: Final = struct.Struct("@qq")
_CMSG_SPACE: Final = socket.CMSG_SPACE(_TIMESPEC.size)
# A reply not sent for these is counted as udp_send_buffer_full, for others udp_send_error.
_BUFFER_FULL: Final = frozenset((errno.EAGAIN, errno.ENOBUFS))
_JOIN: Final = b"".join
# Shedding starts once the queue has stayed older than limits.shed_after_s this long (a
# standing queue, not a stall that a batch or two clears: a GC pause, a handover); after
# that, while the listener keeps meeting old queues, it sheds from the first batch.
_SHED_STANDING_S: Final = 0.02
_SHED_MEMORY_S: Final = 1.0
_ACL_MEMO_MAX: Final = 4096
_MEMO_MAX_QUERY: Final = 512  # longer queries are validated every time instead of remembered
_SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux only; 33 there
# Client-facing request duration buckets, seconds: CoreDNS's (0.25 ms doubling to 8.192 s),
# so that quantiles compare with those of coredns_dns_request_duration_seconds.
REQUEST_DURATION_BUCKETS: Final = tuple(0.00025 * 2**i for i in range(16))
REQUEST_DURATION_HELP: Final = (
    "Time from a query's arrival to its answer, seconds. A forwarded query is timed on its "
    "own; UDP queries answered from the cache in one socket read batch are each recorded "
    "with the batch's duration, an upper bound on their own (time queued in the socket "
    "before the batch is not seen)."
)
# A TCP frame still incomplete this long after its first byte came is abandoned and the
# connection closed. A query fits in one segment and RFC 7766 §8 asks clients to write
# the length and the message together, so only a stalled or hostile client takes
# seconds; well under tcp_idle_timeout_s, so half-sent queries cannot hold client slots.
_PARTIAL_FRAME_S: Final = 2.0


class ServerStats:
    """Plain counters written on the hot path and read by the metrics collector."""

    __slots__ = (
        "dropped",
        "hits_by_kind",
        "invalid",
        "misses",
        "rcodes",
        "refused_acl",
        "tcp_clients",
        "tcp_qtypes",
        "tcp_requests",
        "udp_qtypes",
        "udp_requests",
    )

    def __init__(self) -> None:
        self.udp_requests = 0
        self.tcp_requests = 0
        # Cache hits by the entry's kind (cache.KIND_NAMES: success, denial, servfail).
        self.hits_by_kind = [0, 0, 0]
        self.misses = 0
        self.refused_acl = 0
        self.tcp_clients = 0
        # Valid queries by type and transport (one list each, so that the pair per type
        # is exact for coredns_dns_requests_total{proto,type} at no cost per query).
        self.udp_qtypes = [0] * 65536
        self.tcp_qtypes = [0] * 65536
        self.rcodes = [0] * 4096
        # Packets we did not answer, and queries answered with FORMERR/NOTIMP/BADVERS,
        # by reason. Keys come from a fixed set of reasons, so both stay small.
        self.dropped: dict[str, int] = {}
        self.invalid: dict[str, int] = {}

    @property
    def hits(self) -> int:
        """Queries answered from the cache."""
        return sum(self.hits_by_kind)

    @property
    def qtypes(self) -> list[int]:
        """Valid queries by type, both transports (a new list, for scrapes)."""
        return [u + t for u, t in zip(self.udp_qtypes, self.tcp_qtypes, strict=True)]


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


def _count(table: dict[str, int], reason: str, n: int = 1) -> None:
    table[reason] = table.get(reason, 0) + n


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
        # A UDP socket whose oldest datagram has waited this long is falling behind: the
        # misses read from it are shed (answered SERVFAIL, or stale, by the forwarder)
        # until its queue is shorter, so that the queue, where cache hits wait too, stays
        # about this short. NEVER: never shed.
        self.shed_after_s = config.limits.shed_after_s or NEVER
        self.log_queries = config.log.queries
        # Client-facing request durations. UDP queries answered in a read batch are each
        # recorded with that batch's duration (see _UdpListener._readable); a forwarded query
        # with the time from its arrival to its answer.
        self.durations = LatencyHistogram(REQUEST_DURATION_BUCKETS)
        self.closing = False
        # Validated queries by their bytes after the ID: a repeated query (same name,
        # case, flags and OPT; only the ID differs) skips validation entirely.
        # parse_query never reads the ID, so the memo is exact. Cleared when full.
        self.memo: dict[bytes, Parsed] = {}
        self.memo_max = max(1024, config.cache_max_entries)
        # The clock entries are aged by (a test pins it to compare two paths' replies).
        self.clock: Callable[[], float] = time.monotonic
        self.memo_get: Callable[[bytes], Parsed | None]
        self.store_get: Callable[[bytes], Entry | None]
        self.touch: Callable[[bytes], None]
        self.bind()

    def bind(self) -> None:
        """Keep the bound methods the UDP fast path calls, once per memo and cache instead
        of once per read batch (each is an attribute lookup and a new object); again
        whenever ``memo`` or ``cache`` is replaced."""
        self.memo_get = self.memo.get
        self.store_get = self.cache.store.get
        self.touch = self.cache.store.move_to_end

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
        deliver: Callable[[Any, bytes, bytes, int, int, float, Entry], None],
    ) -> bool:
        """Answer a query the UDP fast path did not (or a TCP one); True when forwarded.

        Validation, ACL, cache lookup, refusals, each answered with ``send(reply, peer)``;
        a miss goes to the forwarder, which calls ``deliver(peer, key, data, qend, edns,
        started, entry)`` once with the outcome (``started``: when the query arrived).
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
            stats.tcp_qtypes[qtype] += 1
        else:
            stats.udp_requests += 1
            stats.udp_qtypes[qtype] += 1
        if self.acl is not None and not self.acl[peer[0]]:
            send(self.refuse(data, qend, edns), peer)
            return False
        now = self.clock()
        entry = self.cache.get(key, now)
        if entry is not None:
            stats.hits_by_kind[entry.kind] += 1
            stats.rcodes[entry.rcode] += 1
            limit = _TCP_MAX_REPLY if tcp else wire.udp_limit(edns, self.max_udp)
            send(entry.answer(data, qend, edns, now, limit, self.opts), peer)
            if parsed is None:
                self.remember(data, key, qend, edns, qtype)
            if tcp:
                # UDP hits are recorded per read batch by the listener.
                self.durations.observe(self.clock() - now)
            if self.log_queries:
                proto = "tcp" if tcp else "udp"
                self.log_query(peer, proto, key, entry.rcode, self.clock() - now)
            return False
        stats.misses += 1
        if qtype in wire.NOT_FORWARDED:
            rcode, reason = wire.NOT_FORWARDED[qtype]
            if reason is not None:
                _count(stats.invalid, reason)
            stats.rcodes[rcode] += 1
            send(wire.error_reply(data, rcode, qend, edns, self.max_udp), peer)
            return False
        deliver_miss = partial(deliver, peer, key, data, qend, edns, now)
        self.forwarder.submit(key, data, qend, deliver_miss, now)
        return True

    def delivered(
        self,
        peer: Any,
        tcp: bool,
        key: bytes,
        data: bytes,
        qend: int,
        edns: int,
        started: float,
        entry: Entry,
    ) -> bytes:
        """The reply to a miss that arrived at ``started`` and whose resolution ended with
        ``entry``, counted, timed and logged."""
        self.stats.rcodes[entry.rcode] += 1
        limit = _TCP_MAX_REPLY if tcp else wire.udp_limit(edns, self.max_udp)
        now = self.clock()
        reply = entry.answer_once(data, qend, edns, now, limit, self.opts)
        self.durations.observe(now - started)
        if self.log_queries:
            upstream = self.forwarder.answering
            proto = "tcp" if tcp else "udp"
            self.log_query(peer, proto, key, entry.rcode, now - started, upstream, hit=False)
        return reply

    def log_query(
        self,
        peer: Any,
        proto: str,
        key: bytes,
        rcode: int,
        duration_s: float,
        upstream: str | None = None,
        *,
        hit: bool = True,
    ) -> None:
        """One ``dnsproxy.query`` line: logfmt-like text, and the same as fields
        (``record.fields``) for the JSON format. ``upstream``: the server that answered a
        miss (None for a hit, or a miss answered without one, such as a refusal)."""
        try:
            name = wire.read_name(key, 0)
        except wire.WireError:
            name = "?"
        fields = {
            "client": peer[0] if isinstance(peer, tuple) else str(peer),
            "proto": proto,
            "name": name,
            "type": qtype_name(wire.key_qtype(key)),
            "rcode": rcode_name(rcode),
            "cache": "hit" if hit else "miss",
            "upstream": upstream,
            "duration_s": round(duration_s, 6),
        }
        qlog.info(
            "client=%s proto=%s name=%s type=%s rcode=%s cache=%s upstream=%s duration_ms=%.3f",
            fields["client"],
            proto,
            name,
            fields["type"],
            fields["rcode"],
            fields["cache"],
            upstream or "-",
            duration_s * 1000,
            extra={"fields": fields},
        )


class _UdpListener:
    """One UDP socket, read with ``add_reader`` and drained in batches.

    A plain non-blocking socket instead of a DatagramProtocol: one loop wake-up reads up
    to ``_UDP_BATCH`` datagrams and answers the hits among them together at the end of
    the batch. With the compiled build's ``dnsproxy._udpio`` the batch is one
    ``recvmmsg`` and its hits one ``sendmmsg`` (two system calls per batch instead of
    two per query, and no exception for the empty socket that ends a batch); the
    pure-Python build reads with ``recvfrom`` and writes with ``sendto`` the same way.
    """

    def __init__(self, handler: _Handler, sock: socket.socket) -> None:
        self.h = handler
        self.stats = handler.stats
        self.sock = sock
        self.closed = False
        self.label = str(_local(sock))
        _set_receive_buffer(sock, handler.config.limits.udp_rcvbuf, self.label)
        # When the last batch found the socket empty (the start of that batch); since when
        # the queue has stayed older than shed_after_s; until when it sheds at once.
        self.empty_at = time.monotonic()
        self.old_since = NEVER
        self.shedding_until = -NEVER
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            self.timestamps = True
        except OSError:
            self.timestamps = False  # then the time since the socket was last empty
        # Reading and writing: by file descriptor through _udpio, else the socket's methods.
        # Only while the listener is open (close() closes the socket, whose number the
        # system may then give to another).
        self.recv: Callable[[int], list[tuple[bytes, Any]]]
        self.send_many: Callable[[list[bytes], list[Any]], tuple[int, int] | None]
        self.send_one: Callable[[bytes, Any], int]
        fd = sock.fileno()
        if _UDPIO is not None:
            self.recv = partial(_UDPIO.recv_batch, fd)
            self.send_many = partial(_UDPIO.send_batch, fd)
            self.send_one = partial(_UDPIO.send_to, fd)
        else:
            self.recv = partial(_recv_batch, sock.recvfrom)
            self.send_many = partial(_send_batch, sock.sendto)
            self.send_one = partial(_send_to, sock.sendto)
        asyncio.get_running_loop().add_reader(fd, self._readable)

    def pause(self) -> None:
        """Stop reading; the socket stays open for answers to queries already read."""
        if not self.closed:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()

    def _readable(self) -> None:
        h = self.h
        stats = self.stats
        memo_get = h.memo_get
        store_get = h.store_get
        touch = h.touch
        monotonic = h.clock
        join = _JOIN
        splice = _SPLICE
        acl = h.acl
        qtypes = stats.udp_qtypes
        rcodes = stats.rcodes
        hits = stats.hits_by_kind
        # One clock read per batch: ages are in whole seconds and a batch takes
        # well under a millisecond.
        now = monotonic()
        # Shedding is decided per batch, for the misses read in it (the hits in it are
        # answered all the same), from how long the oldest datagram in the socket has
        # waited: nothing can have waited longer than the time since the socket was last
        # read empty, and only when that is longer is it looked at (_shed). The
        # forwarder's flag is set for this batch only (TCP misses are never shed).
        forwarder = h.forwarder
        shed = now - self.empty_at > h.shed_after_s and self._shed(now)
        try:
            batch = self.recv(_UDP_BATCH)
        except OSError:
            # An ICMP error for an earlier reply surfaces here; the socket is fine, and
            # the event loop calls again while datagrams wait.
            _count(stats.dropped, "udp_recv_error")
            return
        if len(batch) < _UDP_BATCH:
            self.empty_at = now  # read empty: fewer than asked for were there
        if h.closing:
            if batch:
                _count(stats.dropped, "shutting_down", len(batch))
            return
        forwarder.overloaded = shed
        # Queries answered in this batch, not forwarded, go in the duration histogram at
        # the end, each with the whole batch's duration: an upper bound on its own time in
        # dnsproxy, for one more clock read per batch instead of two per query.
        answered = stats.udp_requests - stats.misses
        # The hits' replies, sent together once the batch is read; the misses' queries
        # go upstream then too (one write per connection: upstream.hold_writes).
        replies: list[bytes] = []
        to: list[Any] = []
        hold_writes()
        try:
            for data, addr in batch:
                parsed = memo_get(data[2:])
                if parsed is not None:
                    key, qend, edns, limit, hi, ti, mode, qtype = parsed
                    entry = store_get(key)
                    if (
                        entry is not None
                        and entry.expires_at > now
                        and (acl is None or acl[addr[0]])
                    ):
                        touch(key)
                        stats.udp_requests += 1
                        hits[entry.kind] += 1
                        entry.hits += 1
                        qtypes[qtype] += 1
                        rcodes[entry.rcode] += 1
                        age = int(now - entry.stored_at)
                        prepared = (
                            entry.prepared if entry.age == age else entry.prepare(age, qend, h.opts)
                        )
                        head = prepared[hi]
                        if mode == 0 or (mode == 1 and not head[1] & 0x20):
                            if splice is not None:
                                reply = splice(data, head, qend, prepared[ti])
                            else:
                                reply = join((data[:2], head, data[12:qend], prepared[ti]))
                            if len(reply) > limit:
                                reply = entry.truncate(reply, qend, edns, limit)
                        else:
                            reply = wire.splice(prepared, data, qend, edns)
                            if len(reply) > limit:
                                reply = entry.truncate(reply, qend, edns, limit)
                        replies.append(reply)
                        to.append(addr)
                        if h.log_queries:
                            h.log_query(addr, "udp", key, entry.rcode, monotonic() - now)
                        continue
                try:
                    h.serve(data, parsed, addr, False, self.send, self._deliver)
                except Exception:
                    # A bug must cost one query, not the rest of the batch or the listener.
                    _count(stats.dropped, "internal_error")
                    log.exception("query from %s failed", addr)
        finally:
            release_writes()
        if replies:
            failed = self.send_many(replies, to)
            if failed is not None:
                full, other = failed
                if full:
                    _count(stats.dropped, "udp_send_buffer_full", full)
                if other:
                    _count(stats.dropped, "udp_send_error", other)
        if shed:
            forwarder.overloaded = False
        answered = stats.udp_requests - stats.misses - answered
        if answered:
            h.durations.observe_many(monotonic() - now, answered)

    def _shed(self, now: float) -> bool:
        """Shed this batch's misses? Yes when the oldest datagram is older than
        shed_after_s and has stayed so for _SHED_STANDING_S, or shedding went on less
        than _SHED_MEMORY_S ago."""
        if self._queued_s(now) <= self.h.shed_after_s:
            self.old_since = NEVER
            return False
        if self.old_since == NEVER or self.empty_at >= self.old_since:
            self.old_since = now  # the queue was empty (or young) in between: a new episode
        if now < self.shedding_until or now - self.old_since >= _SHED_STANDING_S:
            self.shedding_until = self.h.forwarder.shedding_until = now + _SHED_MEMORY_S
            return True
        return False

    def _queued_s(self, now: float) -> float:
        """How long the oldest datagram in the socket has waited there (0 if none)."""
        if not self.timestamps:
            return now - self.empty_at
        try:
            _, ancillary, _, _ = self.sock.recvmsg(1, _CMSG_SPACE, socket.MSG_PEEK)
        except OSError:
            return 0.0
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                sec, nsec = _TIMESPEC.unpack_from(data)
                queued_at: float = sec + nsec * 1e-9  # the wall clock, as time.time()
                return time.time() - queued_at
        return 0.0

    def send(self, reply: bytes, addr: Any) -> None:
        if self.closed:
            _count(self.stats.dropped, "listener_closed")
            return
        error = self.send_one(reply, addr)
        if error:
            full = error in _BUFFER_FULL
            _count(self.stats.dropped, "udp_send_buffer_full" if full else "udp_send_error")

    def _deliver(
        self,
        addr: Any,
        key: bytes,
        data: bytes,
        qend: int,
        edns: int,
        started: float,
        entry: Entry,
    ) -> None:
        if self.closed:
            _count(self.stats.dropped, "listener_closed")
            return
        self.send(self.h.delivered(addr, False, key, data, qend, edns, started, entry), addr)


def _load_udpio() -> Any:
    """The compiled build's ``dnsproxy._udpio`` (batched reads and writes), or None (also
    when it was built for other batch limits than this module's)."""
    module: Any = native_extension("_udpio")
    if module is None:
        return None
    if module.SIZE_MAX != _UDP_MAX_QUERY or module.BATCH_MAX < _UDP_BATCH:
        log.warning("dnsproxy._udpio does not match this build; reading with recvfrom")
        return None
    return module


# Any: the module or None; its functions are typed where the listener keeps them.
_UDPIO: Final[Any] = _load_udpio()
# query[:2] + head + query[12:qend] + tail in one allocation, or None (then a join).
_SPLICE: Final[Callable[[bytes, bytes, int, bytes], bytes] | None] = (
    None if _UDPIO is None else _UDPIO.splice
)


def _recv_batch(
    recvfrom: Callable[[int], tuple[bytes, Any]], count: int
) -> list[tuple[bytes, Any]]:
    """_udpio.recv_batch with the socket's own method: up to ``count`` datagrams."""
    batch: list[tuple[bytes, Any]] = []
    for _ in range(count):
        try:
            batch.append(recvfrom(_UDP_MAX_QUERY))
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            if batch:
                break  # the error comes again at the next read, as with recvmmsg
            raise
    return batch


def _send_to(sendto: Callable[[bytes, Any], int], reply: bytes, addr: Any) -> int:
    """_udpio.send_to with the socket's own method: 0 when sent, else the errno."""
    try:
        sendto(reply, addr)
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def _send_batch(
    sendto: Callable[[bytes, Any], int], replies: list[bytes], addrs: list[Any]
) -> tuple[int, int] | None:
    """_udpio.send_batch with the socket's own method: None when all were sent, else
    how many were not for a full send buffer and for other errors."""
    full = other = 0
    for reply, addr in zip(replies, addrs, strict=True):
        error = _send_to(sendto, reply, addr)
        if error:
            if error in _BUFFER_FULL:
                full += 1
            else:
                other += 1
    return (full, other) if full or other else None


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
                if label is not None:  # an address's sockets (workers) add up
                    drops[label] = drops.get(label, 0) + int(fields[-1])
    return drops


def udp_receive_drops(socks: Iterable[socket.socket]) -> dict[str, int]:
    """Kernel drops at the UDP sockets ``socks``, by the address they are bound to (the
    members of a group added up); for a scrape."""
    return _read_udp_drops({os.fstat(s.fileno()).st_ino: str(_local(s)) for s in socks})


def udp_drops_family(drops: dict[str, int]) -> CounterMetricFamily:
    """``dnsproxy_udp_receive_drops_total{listener}`` from :func:`udp_receive_drops`."""
    family = CounterMetricFamily(
        "dnsproxy_udp_receive_drops",
        "Queries the kernel dropped at a UDP listener's socket (receive buffer full).",
        labels=["listener"],
    )
    for listener, count in drops.items():
        family.add_metric([listener], count)
    return family


class _ClientConnection(asyncio.Protocol):
    """One client's TCP connection: framing, the pipelining limit, idle and stall deadlines.

    Holds one of the server's client slots (bounded in all and per source address) from
    accept until the connection ends; it ends, and frees the slot, as soon as the client
    closes or resets (answers still to come for it are then dropped and counted), when
    idle for ``tcp_idle_timeout_s``, or when a frame stays incomplete for
    :data:`_PARTIAL_FRAME_S`.
    """

    def __init__(self, handler: _Handler, server: DnsServer) -> None:
        self.h = handler
        self.server = server
        self.stats = handler.stats
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.queued: deque[bytes] = deque()  # whole frames waiting for a pipelining slot
        self.pending = 0
        self.paused = False  # reading paused (pipelining limit or full write buffer)
        self.write_paused = False
        self.processing = False
        self.closed = False
        self.last_activity = time.monotonic()
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = NEVER
        self.peer: Any = None
        self.max_pipelined = handler.config.limits.max_pipelined_per_client
        self.idle_s = handler.config.limits.tcp_idle_timeout_s

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        # None when the socket was reset before we looked; the ACL then refuses it.
        self.peer = transport.get_extra_info("peername") or ("", 0)
        refused = "shutting_down" if self.h.closing else self.server.take_slot(self)
        if refused is not None:
            _count(self.stats.dropped, refused)
            self.closed = True
            self.transport.abort()
            return
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        # A reset by the client, or the end of a close: either way the connection is over.
        self._end()

    def eof_received(self) -> bool:
        # The client closed its side: whatever it sent (a length prefix, half a query,
        # queries not yet answered), it frees its slot now rather than at a timeout.
        self.close()
        return False

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._end()
            self.transport.close()  # what was already written still goes out

    def _end(self) -> None:
        """The connection is over: free the slot, count the input it leaves unread."""
        self.closed = True
        self.server.free_slot(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.queued:
            _count(self.stats.dropped, "tcp_client_gone", len(self.queued))
            self.queued.clear()
        if self.reader.buffered:
            _count(self.stats.dropped, "tcp_partial_frame")
            self.reader = FrameReader()

    # -- deadlines

    def _due(self) -> float:
        """When the connection is due to close unless something happens first."""
        idle_since = self.last_activity if self.pending == 0 else NEVER
        partial_s = NEVER if self.paused else _PARTIAL_FRAME_S
        return self.reader.expiry(idle_since, self.idle_s, partial_s)

    def _arm(self) -> None:
        # One timer per connection. While queries are pending nothing is due; the timer
        # then looks again after idle_s rather than being moved on every answer.
        loop = asyncio.get_running_loop()
        now = loop.time()
        when = min(self._due(), now + self.idle_s)
        if self.timer is not None:
            self.timer.cancel()
        self.timer_at = when
        self.timer = loop.call_at(max(when, now + 0.05), self._expire)

    def _expire(self) -> None:
        self.timer = None
        if self.closed:
            return
        if self._due() <= time.monotonic():
            self.close()
            return
        self._arm()

    # -- reading

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        now = time.monotonic()
        self.last_activity = now
        try:
            self.queued.extend(self.reader.feed(data, now))
        except FrameError as exc:
            # Not a DNS message: the framing is lost and cannot be resynchronised.
            _count(self.stats.dropped, "tcp_bad_frame")
            self.queued.extend(exc.frames)
            self._process()
            self.reader = FrameReader()  # the bad frame is counted above, not as partial
            self.close()
            return
        self._process()
        if self.reader.partial_since + _PARTIAL_FRAME_S < self.timer_at and not self.closed:
            self._arm()  # a frame began to arrive: its deadline comes before the timer

    def _process(self) -> None:
        """Handle every whole frame, unless this client already has enough pending.

        Reading pauses while the client has ``max_pipelined`` queries unanswered or our
        replies pile up in the write buffer (a client that sends but does not read), so
        neither its queries nor our replies can grow without bound.
        """
        if self.processing:
            return  # an answer delivered from inside the loop below; it goes on by itself
        self.processing = True
        try:
            queued = self.queued
            while queued and self.pending < self.max_pipelined and not self.write_paused:
                self._handle(queued.popleft())
                if self.closed:
                    return
        finally:
            self.processing = False
        self._flow()

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
            # The incomplete frame waited on us, not on the client: its clock restarts.
            self.reader.resume(time.monotonic())
            transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._process()

    # -- answering

    def _send(self, reply: bytes, peer: Any = None) -> None:
        assert self.transport is not None
        self.transport.write(frame(reply))

    def _handle(self, data: bytes) -> None:
        h = self.h
        # Counted before serve(): the answer to a miss may be delivered before it returns.
        self.pending += 1
        if not h.serve(data, h.memo.get(data[2:]), self.peer, True, self._send, self._deliver):
            self.pending -= 1

    def _deliver(
        self,
        peer: Any,
        key: bytes,
        data: bytes,
        qend: int,
        edns: int,
        started: float,
        entry: Entry,
    ) -> None:
        self.pending -= 1
        if self.closed:
            _count(self.stats.dropped, "tcp_client_gone")
            return
        self.last_activity = time.monotonic()
        self._send(self.h.delivered(self.peer, True, key, data, qend, edns, started, entry))
        # Frames held back by the pipelining limit may now be handled.
        self._process()


@dataclass(slots=True)
class _Listener:
    """A UDP and a TCP socket of one listen address, and what serves them (an address has
    several when it was taken over from an instance with workers, see :func:`bind_group`)."""

    udp: _UdpListener
    tcp: asyncio.Server
    tcp_sock: socket.socket  # kept for its file descriptor, which a handover passes on


class DnsServer:
    """Every listener of one process; start binds (or adopts) them all or none."""

    def __init__(self, config: Config, cache: Cache, forwarder: Forwarder) -> None:
        self.handler = _Handler(config, cache, forwarder)
        self.stats = self.handler.stats
        self.connections: set[_ClientConnection] = set()  # those holding a client slot
        self._per_source: dict[str, int] = {}  # client slots held, by source address
        self._max_tcp_clients = config.limits.max_tcp_clients
        self._max_per_source = config.limits.max_tcp_clients_per_source
        self._listeners: dict[HostPort, list[_Listener]] = {}  # by configured address
        # Listeners taken out of service (a reload dropped their address) that still send
        # the answers to queries they read before (see remove_listeners).
        self._retired: list[_Listener] = []
        # Where inherited sockets come from, for the log: a handover, or a supervisor.
        self.inherited_from = "taken over"

    def take_slot(self, conn: _ClientConnection) -> str | None:
        """Give ``conn`` a client slot; None, or the reason (a drop counter) it gets none."""
        if len(self.connections) >= self._max_tcp_clients:
            return "tcp_client_limit"
        source = conn.peer[0]
        held = self._per_source.get(source, 0)
        if held >= self._max_per_source:
            return "tcp_source_limit"
        self._per_source[source] = held + 1
        self.connections.add(conn)
        self.stats.tcp_clients = len(self.connections)
        return None

    def free_slot(self, conn: _ClientConnection) -> None:
        """Give back the slot ``conn`` holds, if it holds one."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.stats.tcp_clients = len(self.connections)
            source = conn.peer[0]
            held = self._per_source.pop(source, 1) - 1
            if held > 0:
                self._per_source[source] = held

    def collect(self) -> Iterator[Metric]:
        """The client side's metric families, from :class:`ServerStats`."""
        s = self.stats
        m = CounterMetricFamily("dnsproxy_requests", "Valid queries received.", labels=["proto"])
        m.add_metric(["udp"], s.udp_requests)
        m.add_metric(["tcp"], s.tcp_requests)
        yield m
        m = CounterMetricFamily(
            "dnsproxy_requests_by_type", "Valid queries by type.", labels=["type"]
        )
        qtypes = s.qtypes
        for qtype in range(len(qtypes)):
            if qtypes[qtype]:
                m.add_metric([qtype_name(qtype)], qtypes[qtype])
        yield m
        m = CounterMetricFamily("dnsproxy_responses", "Responses sent, by rcode.", labels=["rcode"])
        rcodes = s.rcodes
        for rcode in range(len(rcodes)):
            if rcodes[rcode]:
                m.add_metric([rcode_name(rcode)], rcodes[rcode])
        yield m
        yield by_reason(
            "dnsproxy_dropped", "Packets dropped without a reply, by reason.", s.dropped
        )
        yield udp_drops_family(self.udp_receive_drops())
        yield by_reason(
            "dnsproxy_invalid_queries",
            "Queries answered with FORMERR, NOTIMP or BADVERS, by reason.",
            s.invalid,
        )
        yield CounterMetricFamily(
            "dnsproxy_acl_refused", "Queries refused by the source ACL.", value=s.refused_acl
        )
        yield GaugeMetricFamily(
            "dnsproxy_tcp_clients", "Open client TCP connections.", s.tcp_clients
        )
        yield CounterMetricFamily(
            "dnsproxy_cache_hits", "Queries answered from the cache.", value=s.hits
        )
        yield CounterMetricFamily(
            "dnsproxy_cache_misses", "Queries not answered from the cache.", value=s.misses
        )
        durations = self.handler.durations
        h = HistogramMetricFamily("dnsproxy_request_duration_seconds", REQUEST_DURATION_HELP)
        h.add_metric([], buckets(durations.bounds, durations.counts.copy()), durations.total_s)
        yield h

    @property
    def bound(self) -> list[HostPort]:
        """The addresses served, with port 0 of the config resolved to the real port."""
        return [_local(pairs[0].udp.sock) for pairs in self._listeners.values()]

    async def start(self, inherited: Inherited | None = None) -> list[HostPort]:
        """Serve every configured address: adopt (and take out of ``inherited``) the
        sockets from a handover that match one, bind the others. All or none: raises
        OSError naming the address that could not be bound, with nothing left open."""
        try:
            await self.add_listeners(self.handler.config.listen, inherited)
        except BaseException:
            await self.close()
            raise
        return self.bound

    async def add_listeners(
        self, addresses: Iterable[HostPort], inherited: Inherited | None = None
    ) -> list[HostPort]:
        """Start serving ``addresses`` (those not served yet); the ones added.

        All or none: when one cannot be bound, the ones this call added are closed again
        and OSError names the address.
        """
        loop = asyncio.get_running_loop()
        added: list[HostPort] = []
        try:
            for hp in addresses:
                if hp in self._listeners:
                    continue
                self._listeners[hp] = await self._listen(loop, hp, inherited or {})
                added.append(hp)
        except BaseException:
            for hp in added:
                for listener in self._listeners.pop(hp):
                    self._close_listener(listener)
            raise
        return added

    def remove_listeners(self, addresses: Iterable[HostPort]) -> Callable[[], None]:
        """Stop reading and accepting on ``addresses``; their UDP sockets stay open for the
        answers still in flight. Returns what closes them, once those are out."""
        removed: list[_Listener] = []
        for hp in addresses:
            pairs = self._listeners.pop(hp, [])
            removed += pairs
            if pairs:
                log.info("stopped listening on %s", _local(pairs[0].udp.sock))
        return self._retire(removed)

    async def adopt(self, inherited: Inherited) -> list[_Listener]:
        """Read the sockets of ``inherited`` too, beside this server's own for the same
        addresses (a sibling worker's, while it restarts; see :mod:`dnsproxy.workers`).
        Sockets of addresses not served here, or not paired, are closed. Returns the
        listeners added, for :meth:`release`."""
        loop = asyncio.get_running_loop()
        adopted: list[_Listener] = []
        for hp, pairs in self._listeners.items():
            udps, tcps = inherited.get(("udp", hp), []), inherited.get(("tcp", hp), [])
            if udps and len(udps) == len(tcps):
                added = await self._listen(loop, hp, inherited)
                pairs.extend(added)
                adopted.extend(added)
        for socks in inherited.values():
            for sock in socks:
                sock.close()
        inherited.clear()
        return adopted

    def release(self, listeners: list[_Listener], close_after_s: float) -> None:
        """Stop reading and accepting on ``listeners`` (from :meth:`adopt`); close them
        ``close_after_s`` later, when the answers to what they read are out."""
        for pairs in self._listeners.values():
            pairs[:] = [listener for listener in pairs if listener not in listeners]
        asyncio.get_running_loop().call_later(close_after_s, self._retire(listeners))

    def _retire(self, listeners: list[_Listener]) -> Callable[[], None]:
        """Stop reading and accepting on ``listeners`` (already out of ``_listeners``);
        their UDP sockets stay open for the answers still in flight. Returns what closes
        them, once those are out (a shutdown closes them too, whichever comes first)."""
        for listener in listeners:
            listener.udp.pause()
            listener.tcp.close()
        self._retired += listeners

        def close() -> None:
            for listener in listeners:
                if listener in self._retired:
                    self._retired.remove(listener)
                    self._close_listener(listener)

        return close

    async def _listen(
        self, loop: asyncio.AbstractEventLoop, hp: HostPort, inherited: Inherited
    ) -> list[_Listener]:
        udps = inherited.pop(("udp", hp), [])
        tcps = inherited.pop(("tcp", hp), [])
        adopted = bool(udps) and len(udps) == len(tcps)
        if not adopted:
            # Unpaired sockets (never sent, but cheap to allow) are bound afresh.
            for sock in (*udps, *tcps):
                sock.close()
            udp, tcp = _bind_pair(hp)
            udps, tcps = [udp], [tcp]
        pairs: list[_Listener] = []
        try:
            for udp, tcp in zip(udps, tcps, strict=True):
                server = await loop.create_server(
                    lambda: _ClientConnection(self.handler, self), sock=tcp, backlog=_TCP_BACKLOG
                )
                pairs.append(_Listener(_UdpListener(self.handler, udp), server, tcp))
        except BaseException:
            for listener in pairs:
                self._close_listener(listener)
            for sock in (*udps[len(pairs) :], *tcps[len(pairs) :]):
                sock.close()
            raise
        how = f", {self.inherited_from}" if adopted else ""
        if len(pairs) > 1:
            how += f", {len(pairs)} sockets of one SO_REUSEPORT group"
        log.info("listening on %s (udp, tcp%s)", _local(udps[0]), how)
        return pairs

    def sockets(self) -> dict[tuple[str, HostPort], list[socket.socket]]:
        """The listening sockets by kind and bound address, for a handover."""
        out: dict[tuple[str, HostPort], list[socket.socket]] = {}
        for pairs in self._listeners.values():
            hp = _local(pairs[0].udp.sock)
            out["udp", hp] = [listener.udp.sock for listener in pairs]
            out["tcp", hp] = [listener.tcp_sock for listener in pairs]
        return out

    def reconfigure(self, config: Config, cache: Cache, forwarder: Forwarder) -> None:
        """Serve with a reloaded ``config``, its ``cache`` and ``forwarder`` from the next
        query on (the fast path reads them once per batch).

        Listeners are not touched (see :meth:`add_listeners`/:meth:`remove_listeners`);
        TCP clients already connected keep their pipelining and idle limits; the client
        slot limits apply to new connections.
        """
        self._max_tcp_clients = config.limits.max_tcp_clients
        self._max_per_source = config.limits.max_tcp_clients_per_source
        h = self.handler
        rcvbuf = config.limits.udp_rcvbuf
        if rcvbuf != h.config.limits.udp_rcvbuf:
            for pairs in self._listeners.values():
                for listener in pairs:
                    _set_receive_buffer(listener.udp.sock, rcvbuf, listener.udp.label)
        h.config = config
        h.cache = cache
        h.forwarder = forwarder
        h.acl = Acl(config.allow) if config.allow else None
        h.max_udp = config.limits.udp_payload_size
        h.shed_after_s = config.limits.shed_after_s or NEVER
        opts = wire.client_opts(h.max_udp)
        if opts != h.opts:
            h.opts = opts
            # Replies prepared with the old OPT records are prepared again at next use.
            for entry in cache.store.values():
                entry.age = -1
        h.log_queries = config.log.queries
        # Memoized queries carry a reply limit from the old udp_payload_size.
        h.memo = {}
        h.memo_max = max(1024, config.cache_max_entries)
        h.bind()

    def pause(self) -> None:
        """Stop reading UDP and accepting TCP, keeping the sockets: after a handover the
        new instance reads what is queued. Answers still in flight go out as usual."""
        for pairs in self._listeners.values():
            for listener in pairs:
                listener.udp.pause()
                listener.tcp.close()

    def udp_receive_drops(self) -> dict[str, int]:
        """Kernel drops at each UDP listener's socket, by listener; for a scrape."""
        listeners = [*(x for pairs in self._listeners.values() for x in pairs), *self._retired]
        return udp_receive_drops(x.udp.sock for x in listeners if not x.udp.closed)

    def stop_listening(self) -> None:
        """Refuse new queries and connections; replies still in flight go out."""
        self.handler.closing = True
        for pairs in self._listeners.values():
            for listener in pairs:
                listener.tcp.close()

    def _close_listener(self, listener: _Listener) -> None:
        listener.tcp.close()
        listener.udp.close()

    async def close(self) -> None:
        self.handler.closing = True
        listeners = [*(lr for pairs in self._listeners.values() for lr in pairs), *self._retired]
        for listener in listeners:
            listener.tcp.close()
        for conn in list(self.connections):
            conn.close()
        for listener in listeners:
            listener.udp.close()
        for listener in listeners:
            await listener.tcp.wait_closed()
        self._listeners.clear()
        self._retired.clear()


# Listening sockets handed over between instances (or from a supervisor to its workers), by
# kind ("udp", "tcp", "http") and the address they are bound to: one each, or the members of
# an SO_REUSEPORT group. A listener that adopts them takes them out of the mapping.
Inherited = dict[tuple[str, HostPort], list[socket.socket]]


def _local(sock: socket.socket) -> HostPort:
    addr = sock.getsockname()
    return HostPort(addr[0], addr[1])


def _bind_pair(hp: HostPort) -> tuple[socket.socket, socket.socket]:
    """A UDP and a listening TCP socket on ``hp``; port 0 picks one free for both."""
    family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
    for _ in range(20):
        udp = _socket(family, socket.SOCK_DGRAM, hp, "UDP")
        port = udp.getsockname()[1]
        try:
            tcp = _socket(family, socket.SOCK_STREAM, HostPort(hp.host, port), "TCP")
        except OSError:
            udp.close()
            if hp.port:
                raise
            continue
        return udp, tcp
    raise OSError(f"could not bind UDP and TCP to one port on {hp.host}")


def bind_group(
    hp: HostPort, count: int, udps: list[socket.socket], tcps: list[socket.socket]
) -> tuple[list[socket.socket], list[socket.socket]]:
    """UDP and listening TCP sockets on ``hp`` in one SO_REUSEPORT group, ``count`` of each
    where the kernel allows it; the kernel spreads datagrams and connections over a group's
    members by a hash of the client's address and port.

    ``udps`` and ``tcps`` are the members already there (taken over, possibly a single
    pair bound without SO_REUSEPORT, which joins the group); with none, the first pair is
    bound as a single process binds it, so that an address in use is refused as always
    and port 0 resolved, and the others join it. Where the kernel refuses a new member the
    group stays as it is and a warning says its sockets are shared. Returns the members;
    raises OSError naming the address when the first pair cannot be bound.
    """
    if not udps or len(udps) != len(tcps):
        for sock in (*udps, *tcps):
            sock.close()
        udp, tcp = _bind_pair(hp)
        udps, tcps = [udp], [tcp]
    where = _local(udps[0])
    family = udps[0].family
    while len(udps) < count:
        try:
            for sock in (*udps, *tcps):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            udp = _socket(family, socket.SOCK_DGRAM, where, "UDP", reuseport=True)
            try:
                tcp = _socket(family, socket.SOCK_STREAM, where, "TCP", reuseport=True)
            except OSError:
                udp.close()
                raise
        except OSError as exc:
            log.warning(
                "%s: no more SO_REUSEPORT members (%s); its %d socket pair(s) are shared",
                where,
                exc,
                len(udps),
            )
            break
        udps.append(udp)
        tcps.append(tcp)
    return udps, tcps


def _socket(
    family: int, kind: int, hp: HostPort, name: str, *, reuseport: bool = False
) -> socket.socket:
    sock = socket.socket(family, kind)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
        sock.bind((hp.host, hp.port))
        if kind == socket.SOCK_STREAM:
            sock.listen(_TCP_BACKLOG)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot bind {name} {hp}: {exc.strerror}") from None
    except BaseException:
        sock.close()
        raise
    return sock
