"""Talking to one upstream DNS server: pipelined TCP connection pools and plain UDP.

:class:`TcpUpstream` keeps a few long-lived connections to one server and multiplexes many
queries over each (RFC 7766 pipelining). Every query gets a fresh random ID that is unique
on its connection; replies may come back in any order and are accepted only when QR is set
and the ID and the question match what was sent (RFC 5452); anything else is dropped and
counted. Connections are rotated after a maximum age, so that the load behind a Service
ClusterIP spreads over its pods, and closed when idle.

:class:`UdpUpstream` sends each query from a fresh connected socket (OS-chosen random source
port, random ID) and repeats a truncated answer over TCP.

Both return the reply with the caller's ID restored and raise :class:`UpstreamTimeout` or
:class:`UpstreamError`; they never return a reply that failed validation. Counters are plain
integers in :class:`UpstreamStats`, read by the metrics collector at scrape time.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, cast

from .config_types import UpstreamConfig, UpstreamPoolConfig
from .errors import DnsproxyError
from .wire import HEADER_LEN, WireError, question_end, reply_matches

__all__ = [
    "Done",
    "Request",
    "TcpUpstream",
    "UdpUpstream",
    "Upstream",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamStats",
    "UpstreamTimeout",
    "make_upstream",
]

log = logging.getLogger(__name__)

_LEN_ID = struct.Struct(">HH")  # TCP length prefix followed by the message ID
_ID = struct.Struct(">H")
_TC = 0x02
_MAX_MESSAGE = 0xFFFF
_MAX_EXPIRED_IDS = 1024  # a connection with this many timed-out IDs is retired
_MAX_IDS = 0xFFFF - _MAX_EXPIRED_IDS - 1  # in-flight cap: a free ID always exists
_NEVER = float("inf")

# Over TCP the ID only demultiplexes (spoofing would need the TCP sequence numbers), so the
# fast Mersenne Twister is enough. Over UDP the ID is half of the defence against forged
# replies (RFC 5452), so it comes from the OS.
_tcp_id = random.getrandbits
_udp_id = random.SystemRandom().getrandbits


class UpstreamError(DnsproxyError):
    """The upstream could not answer: connect refused or reset, closed, pool full, etc."""


class UpstreamTimeout(UpstreamError):
    """No valid reply within the query's time budget."""


class UpstreamBusy(UpstreamError):
    """Not sent: our own pool is full or closed. Says nothing about the server's health."""


class _ConnectionLost(UpstreamError):
    """The peer closed (or garbled) a connection with the query in flight.

    RFC 7766 §6.2.1: a client retries once when a reused connection was closed by the
    server, which happens routinely when the server's idle timeout beats ours.
    """


@dataclass(slots=True)
class UpstreamStats:
    """Counters of one upstream server; plain ints so the hot path only increments."""

    queries: int = 0
    replies: int = 0
    timeouts: int = 0
    failures: int = 0  # errors other than timeouts, pool_full included
    bad_replies: int = 0  # dropped: wrong ID / question / not QR / malformed / unsolicited
    connects: int = 0
    connect_failures: int = 0
    retries: int = 0
    tc_fallbacks: int = 0
    pool_full: int = 0  # every connection at max in-flight and the pool at its size
    # Gauges, kept up to date as connections open and queries come and go.
    open_connections: int = 0
    inflight: int = 0


# Called exactly once per request: ``(reply, None)`` with the validated reply, or
# ``(None, error)``. The reply's ID is whatever went on the wire (:meth:`Upstream.query`
# restores the caller's); everything after the ID is the server's.
Done = Callable[[bytes | None, UpstreamError | None], None]


class Request:
    """A query handed to :meth:`Upstream.send`; ``cancel()`` forgets it."""

    __slots__ = ("finished",)

    def __init__(self) -> None:
        self.finished = False

    def cancel(self) -> None:
        self.finished = True


class Upstream:
    """One upstream server. Subclasses implement :meth:`send` and :meth:`close`."""

    config: UpstreamConfig
    label: str
    stats: UpstreamStats

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.label = config.label
        self.stats = UpstreamStats()

    def send(self, wire: bytes, timeout_s: float, done: Done, question: bytes = b"") -> Request:
        """Send the query ``wire``; ``done`` is called once with the outcome.

        The callback form is what the forwarder uses: a miss then costs no task and no
        coroutine, and the answer goes to the clients from ``data_received`` directly.
        ``done`` may be called before ``send`` returns (closed upstream, full pool).
        ``question``, when given, must be ``wire``'s question section (the caller has
        it already; otherwise it is found by walking ``wire``).
        """
        raise NotImplementedError

    async def query(self, wire: bytes, timeout_s: float) -> bytes:
        """Send the query ``wire``; return the validated reply carrying ``wire``'s ID."""
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

        def done(reply: bytes | None, error: UpstreamError | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                assert reply is not None
                future.set_result(wire[:2] + reply[2:])

        request = self.send(wire, timeout_s, done)
        try:
            return await future
        except asyncio.CancelledError:
            request.cancel()
            raise

    async def close(self) -> None:
        """Close every socket and fail the queries in flight."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


def make_upstream(config: UpstreamConfig, pool: UpstreamPoolConfig) -> Upstream:
    if config.transport == "tcp":
        return TcpUpstream(config, pool)
    if config.transport == "udp":
        return UdpUpstream(config, pool)
    raise ValueError(f"unsupported upstream transport {config.transport!r}")


def _question(wire: bytes) -> bytes:
    """The question bytes of a query we are asked to send, or UpstreamError."""
    if len(wire) > _MAX_MESSAGE:
        raise UpstreamError("query longer than 65535 octets")
    try:
        return wire[HEADER_LEN : question_end(wire)]
    except WireError as exc:
        raise UpstreamError(f"malformed query: {exc}") from None


# --------------------------------------------------------------------------------------
# TCP


class _TcpRequest(Request):
    """One query through a TCP pool; it may move to a second connection once."""

    __slots__ = (
        "conn",
        "deadline",
        "done",
        "owner",
        "qid",
        "question",
        "replies_seen",
        "retried",
        "wire",
    )

    def __init__(
        self, owner: TcpUpstream, wire: bytes, question: bytes, deadline: float, done: Done
    ) -> None:
        super().__init__()
        self.owner = owner
        self.wire = wire
        self.question = question
        self.deadline = deadline
        self.done = done
        self.retried = False
        self.conn: _TcpConnection | None = None
        self.qid = -1
        self.replies_seen = 0

    def cancel(self) -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        # conn.pending, looked up now: _fail_all may have swapped the dict meanwhile.
        if conn is not None and conn.pending.get(self.qid) is self:
            conn._release(self.qid, self)


class TcpUpstream(Upstream):
    """A pool of pipelined TCP connections to one server.

    Connections open lazily: a query goes to the least-loaded connection, and a new one
    is opened (and given the query, which is written as soon as it connects) while every
    existing connection has something in flight and the pool is below its size. When every
    connection is at ``max_inflight_per_connection`` the query fails at once with
    :class:`UpstreamError`, counted in ``pool_full``: waiting would be a hidden queue, and
    the forwarder can use another server or answer SERVFAIL instead.

    Connections past ``connection_max_age_s``, or that let a query time out without
    answering anything since it was sent (likely a dead peer), take no new queries and
    close once drained; they do not count against the pool size meanwhile.

    There is no reconnect backoff here: a refused connect fails its queries at once, and
    the forwarder's health checks decide when the server is tried again.
    """

    def __init__(self, config: UpstreamConfig, pool: UpstreamPoolConfig) -> None:
        super().__init__(config)
        self.pool = pool
        self._size = max(1, pool.tcp_connections)
        self._max_inflight = min(max(1, pool.max_inflight_per_connection), _MAX_IDS)
        self._active: list[_TcpConnection] = []  # take new queries; includes connecting ones
        self._draining: set[_TcpConnection] = set()  # retired, waiting for their replies
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def send(self, wire: bytes, timeout_s: float, done: Done, question: bytes = b"") -> Request:
        self.stats.queries += 1
        loop = self._loop
        if loop is None:
            # Kept: asyncio.get_running_loop() costs a getpid() system call per use.
            loop = self._loop = asyncio.get_running_loop()
        if not question:
            try:
                question = _question(wire)
            except UpstreamError as exc:
                request = Request()
                request.finished = True
                self.stats.failures += 1
                done(None, exc)
                return request
        tcp_request = _TcpRequest(self, wire, question, loop.time() + timeout_s, done)
        self._dispatch(tcp_request, loop)
        return tcp_request

    def _dispatch(self, request: _TcpRequest, loop: asyncio.AbstractEventLoop) -> None:
        if self._closed:
            self._fail(request, UpstreamBusy(f"{self.label}: upstream closed"))
            return
        conn = self._pick(loop)
        if conn is None:
            self.stats.pool_full += 1
            self._fail(
                request, UpstreamBusy(f"{self.label}: every connection is at its in-flight limit")
            )
            return
        conn.add(request)

    def _succeed(self, request: _TcpRequest, reply: bytes) -> None:
        if request.finished:
            return
        request.finished = True
        self.stats.replies += 1
        request.done(reply, None)

    def _fail(self, request: _TcpRequest, error: UpstreamError) -> None:
        if request.finished:
            return
        request.finished = True
        if isinstance(error, UpstreamTimeout):
            self.stats.timeouts += 1
        else:
            self.stats.failures += 1
        request.done(None, error)

    def _lost(self, request: _TcpRequest, error: UpstreamError) -> None:
        """Its connection went away with the query in flight: retry once (RFC 7766)."""
        if request.finished:
            return
        loop = asyncio.get_running_loop()
        if request.retried or loop.time() >= request.deadline:
            self._fail(request, error)
            return
        request.retried = True
        self.stats.retries += 1
        self._dispatch(request, loop)

    def _pick(self, loop: asyncio.AbstractEventLoop) -> _TcpConnection | None:
        best = None
        best_load = self._max_inflight
        for conn in self._active:
            load = len(conn.pending)
            if load < best_load:
                best = conn
                best_load = load
        if (best is None or best_load > 0) and len(self._active) < self._size:
            return self._open(loop)
        return best

    def _open(self, loop: asyncio.AbstractEventLoop) -> _TcpConnection:
        conn = _TcpConnection(self, loop)
        self._active.append(conn)
        task = loop.create_task(self._connect(conn))
        conn.connect_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _connect(self, conn: _TcpConnection) -> None:
        loop = conn.loop
        try:
            async with asyncio.timeout(self.pool.connect_timeout_s):
                await loop.create_connection(lambda: conn, self.config.host, self.config.port)
        except Exception as exc:  # OSError, TimeoutError; anything else must not kill the pool
            self.stats.connect_failures += 1
            log.debug("%s: connect failed: %r", self.label, exc)
            conn.close(UpstreamError, f"connect failed: {exc!r}")

    def _retire(self, conn: _TcpConnection) -> None:
        try:
            self._active.remove(conn)
        except ValueError:
            return
        self._draining.add(conn)

    def _forget(self, conn: _TcpConnection) -> None:
        try:
            self._active.remove(conn)
        except ValueError:
            self._draining.discard(conn)

    async def close(self) -> None:
        self._closed = True
        conns = [*self._active, *self._draining]
        for conn in conns:
            conn.close(UpstreamError, "upstream closed")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        lost = [conn.lost for conn in conns if not conn.lost.done()]
        if lost:
            # connection_lost runs one loop iteration after transport.close(); waiting
            # for it means no transport outlives close(). Bounded in case a peer stalls.
            await asyncio.wait(lost, timeout=1.0)


class _TcpConnection(asyncio.Protocol):
    """One pipelined connection: ID allocation, framing, reply matching, timers.

    Query timeouts share one timer per connection, armed for the earliest deadline in
    flight: a query costs a dict entry, not a timer to start and cancel.
    """

    def __init__(self, owner: TcpUpstream, loop: asyncio.AbstractEventLoop) -> None:
        self.owner = owner
        self.loop = loop
        self.stats = owner.stats
        self.pending: dict[int, _TcpRequest] = {}
        self._expired: set[int] = set()  # IDs of queries that timed out here
        self.connect_task: asyncio.Task[None] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._backlog: list[tuple[int, bytes]] = []  # frames not yet written
        self._flush_handle: asyncio.Handle | None = None
        self._buf = bytearray()
        self._need = 2  # bytes the buffer must hold before a frame can be complete
        self._closed = False
        self._retired = False
        self._replies = 0
        self._idle_since = loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._deadline_at = _NEVER  # when _deadline_timer fires
        self._age_timer: asyncio.TimerHandle | None = loop.call_later(
            owner.pool.connection_max_age_s, self.retire
        )

    # -- queries

    def add(self, request: _TcpRequest) -> None:
        pending = self.pending
        expired = self._expired
        qid = _tcp_id(16)
        # Terminates: in-flight plus expired IDs stay below the ID space (see _on_timeout).
        while qid in pending or qid in expired:
            qid = _tcp_id(16)
        request.conn = self
        request.qid = qid
        request.replies_seen = self._replies
        if request.deadline < self._deadline_at:
            self._arm(request.deadline)
        pending[qid] = request
        self.stats.inflight += 1
        wire = request.wire
        # Length prefix and message in one write (RFC 7766 §8): no segment carries half.
        # Frames queued in one loop iteration go out in one write: a burst of misses
        # (a UDP batch) costs one syscall per connection instead of one per query.
        self._backlog.append((qid, _LEN_ID.pack(len(wire), qid) + wire[2:]))
        if self._transport is not None and self._flush_handle is None:
            self._flush_handle = self.loop.call_soon(self._flush)

    def _release(self, qid: int, request: _TcpRequest) -> None:
        del self.pending[qid]
        self.stats.inflight -= 1
        if not self.pending:
            self._idle_since = self.loop.time()
            if self._retired:
                self.close()

    def _arm(self, when: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._deadline_at = when
        self._deadline_timer = self.loop.call_at(when, self._expire)

    def _expire(self) -> None:
        """Time out every query past its deadline; re-arm for the earliest one left."""
        self._deadline_timer = None
        self._deadline_at = _NEVER
        now = self.loop.time()
        late = [(qid, r) for qid, r in self.pending.items() if r.deadline <= now]
        for qid, request in late:
            # Still the same query: a callback during this sweep may have cancelled it
            # and a new query may have drawn its ID.
            if self.pending.get(qid) is request:
                self._on_timeout(qid)
        if self.pending and not self._closed:
            self._arm(min(request.deadline for request in self.pending.values()))

    def _on_timeout(self, qid: int) -> None:
        request = self.pending.get(qid)
        if request is None:
            return
        self._release(qid, request)
        # The ID stays reserved on this connection: a late reply to it must not be taken
        # for the answer to a newer query that reused the ID (RFC 5452).
        self._expired.add(qid)
        if len(self._expired) > _MAX_EXPIRED_IDS:
            self.retire()
        self.owner._fail(request, UpstreamTimeout(f"{self.owner.label}: timed out"))
        if request.replies_seen == self._replies:
            # Nothing at all came back since this query went out: the peer is probably
            # gone without a reset (a deleted pod), so stop feeding this connection.
            self.retire()

    def retire(self) -> None:
        """Take no new queries; close once the ones in flight are done."""
        if self._age_timer is not None:
            self._age_timer.cancel()
            self._age_timer = None
        if self._closed or self._retired:
            return
        self._retired = True
        self.owner._retire(self)
        if not self.pending:
            self.close()

    # -- lifecycle

    def close(
        self, error: type[UpstreamError] = UpstreamError, reason: str = "connection closed"
    ) -> None:
        if self._closed:
            return
        self._closed = True
        self.owner._forget(self)
        self._cancel_timers()
        if self._transport is not None:
            self._transport.close()
        else:
            task = self.connect_task
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            if not self.lost.done():
                self.lost.set_result(None)
        self._fail_all(error, reason)

    def _cancel_timers(self) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
            self._deadline_at = _NEVER
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._age_timer is not None:
            self._age_timer.cancel()
            self._age_timer = None
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _fail_all(self, error: type[UpstreamError], reason: str) -> None:
        pending = self.pending
        if not pending:
            return
        self.pending = {}
        self.stats.inflight -= len(pending)
        message = f"{self.owner.label}: {reason}"
        owner = self.owner
        for request in pending.values():
            # One instance per waiter: a shared exception would collect every
            # waiter's traceback and keep their frames alive.
            if error is _ConnectionLost:
                owner._lost(request, error(message))
            else:
                owner._fail(request, error(message))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.stats.open_connections += 1
        self.stats.connects += 1
        if self._closed:
            transport.close()
            return
        self._transport = transport
        self._flush()
        self._idle_timer = self.loop.call_later(self.owner.pool.idle_timeout_s, self._idle_check)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._transport is None or self._closed:
            return
        pending = self.pending
        frames = [frame for qid, frame in self._backlog if qid in pending]
        self._backlog = []
        if frames:
            self._transport.write(b"".join(frames))

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open_connections -= 1
        if not self.lost.done():
            self.lost.set_result(None)
        if self._closed:
            return
        self._closed = True
        self.owner._forget(self)
        self._cancel_timers()
        if self.pending:
            log.debug(
                "%s: connection lost with %d in flight: %r",
                self.owner.label,
                len(self.pending),
                exc,
            )
        self._fail_all(_ConnectionLost, "connection closed by peer")

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost fails what is in flight

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self._closed:
            return
        idle_s = self.owner.pool.idle_timeout_s
        if self.pending:
            left = idle_s
        else:
            left = self._idle_since + idle_s - self.loop.time()
            if left <= 0:
                self.close()
                return
        # One timer per connection, re-armed lazily, rather than one per idle transition.
        self._idle_timer = self.loop.call_later(left, self._idle_check)

    # -- replies

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        n = len(data)
        off = 0
        while True:
            if n - off < 2:
                self._need = 2
                break
            length = (data[off] << 8) | data[off + 1]
            if length < HEADER_LEN:
                # Not a DNS message: the framing is lost and cannot be resynchronised.
                self.stats.bad_replies += 1
                self.close(_ConnectionLost, "bad framing from server")
                return
            end = off + 2 + length
            if end > n:
                self._need = 2 + length  # at most 65537, which bounds the buffer
                break
            self._on_reply(data[off + 2 : end])
            if self._closed:
                return
            off = end
        if off < n:
            buf += memoryview(data)[off:]

    def _on_reply(self, reply: bytes) -> None:
        qid = (reply[0] << 8) | reply[1]
        request = self.pending.get(qid)
        # The ID was matched by the lookup; b"" skips reply_matches' own ID check.
        if request is None or not reply_matches(reply, b"", request.question):
            self.stats.bad_replies += 1
            return
        self._replies += 1
        self._release(qid, request)
        self.owner._succeed(request, reply)


# --------------------------------------------------------------------------------------
# UDP


class _UdpExchange(asyncio.DatagramProtocol):
    """One query on its own connected socket; the kernel filters the source address."""

    def __init__(
        self, future: asyncio.Future[bytes], qid: bytes, question: bytes, stats: UpstreamStats
    ) -> None:
        self.future = future
        self.qid = qid
        self.question = question
        self.stats = stats

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        if self.future.done() or not reply_matches(data, self.qid, self.question):
            self.stats.bad_replies += 1
            return
        self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable arrives here on a connected socket: fail fast.
        if not self.future.done():
            self.future.set_exception(UpstreamError(f"UDP error: {exc!r}"))


def _expire(future: asyncio.Future[bytes], label: str) -> None:
    if not future.done():
        future.set_exception(UpstreamTimeout(f"{label}: timed out"))


class _UdpRequest(Request):
    __slots__ = ("done", "task")

    def __init__(self, owner: UdpUpstream, coro: Coroutine[Any, Any, bytes], done: Done) -> None:
        super().__init__()
        self.done = done
        self.task = asyncio.get_running_loop().create_task(coro)
        owner._tasks.add(self.task)
        self.task.add_done_callback(owner._tasks.discard)
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[bytes]) -> None:
        if self.finished or task.cancelled():
            return
        self.finished = True
        error = task.exception()
        if error is None:
            self.done(task.result(), None)
        elif isinstance(error, UpstreamError):
            self.done(None, error)
        else:
            self.done(None, UpstreamError(f"UDP query failed: {error!r}"))

    def cancel(self) -> None:
        self.finished = True
        self.task.cancel()


class UdpUpstream(Upstream):
    """Plain UDP, one fresh socket per query; TC=1 answers are fetched again over TCP."""

    def __init__(self, config: UpstreamConfig, pool: UpstreamPoolConfig) -> None:
        super().__init__(config)
        self.pool = pool
        self._tcp: TcpUpstream | None = None
        self._waiting: set[asyncio.Future[bytes]] = set()  # so close() can fail them
        self._tasks: set[asyncio.Task[bytes]] = set()
        self._closed = False

    def send(self, wire: bytes, timeout_s: float, done: Done, question: bytes = b"") -> Request:
        # UDP is opt-in and not the hot path: one task per query keeps it simple.
        return _UdpRequest(self, self._query(wire, timeout_s), done)

    async def _query(self, wire: bytes, timeout_s: float) -> bytes:
        stats = self.stats
        stats.queries += 1
        try:
            if self._closed:
                raise UpstreamError(f"{self.label}: upstream closed")
            question = _question(wire)
        except UpstreamError:
            stats.failures += 1
            raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        stats.inflight += 1
        try:
            reply = await self._exchange(loop, wire, question, deadline)
            if reply[2] & _TC:
                stats.tc_fallbacks += 1
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise UpstreamTimeout(f"{self.label}: no time left for the TCP retry")
                reply = await self._fallback().query(wire, remaining)
            else:
                reply = wire[:2] + reply[2:]
        except UpstreamTimeout:
            stats.timeouts += 1
            raise
        except UpstreamError:
            stats.failures += 1
            raise
        finally:
            stats.inflight -= 1
        stats.replies += 1
        return reply

    async def _exchange(
        self, loop: asyncio.AbstractEventLoop, wire: bytes, question: bytes, deadline: float
    ) -> bytes:
        qid = _ID.pack(_udp_id(16))
        future: asyncio.Future[bytes] = loop.create_future()
        protocol = _UdpExchange(future, qid, question, self.stats)
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: protocol, remote_addr=(self.config.host, self.config.port)
            )
        except OSError as exc:
            raise UpstreamError(f"{self.label}: UDP socket: {exc!r}") from None
        timer = loop.call_at(deadline, _expire, future, self.label)
        self._waiting.add(future)
        try:
            transport.sendto(qid + wire[2:])
            return await future
        finally:
            self._waiting.discard(future)
            timer.cancel()
            transport.close()

    def _fallback(self) -> TcpUpstream:
        if self._tcp is None:
            # Truncated answers are rare: one connection is plenty.
            self._tcp = TcpUpstream(
                UpstreamConfig("tcp", self.config.host, self.config.port),
                replace(self.pool, tcp_connections=1),
            )
        return self._tcp

    async def close(self) -> None:
        self._closed = True
        for future in self._waiting:
            if not future.done():
                future.set_exception(UpstreamError(f"{self.label}: upstream closed"))
        if self._tcp is not None:
            await self._tcp.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=1.0)
