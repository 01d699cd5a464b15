"""Talking to one upstream DNS server: pipelined TCP and TLS connection pools, UDP, auto.

:class:`TcpUpstream` keeps a few long-lived connections to one server and multiplexes many
queries over each (RFC 7766 pipelining). What one connection must get right — random IDs
unique on it, the table of queries in flight, framing, reply matching by ID and question
(RFC 5452), deadlines, retirement — is the sans-IO :class:`~dnsproxy.pipeline.PipelinedConnection`;
:class:`_UpstreamConnection` only moves bytes between it and a transport and arms the one
timer it asks for. The pool here picks a connection for each query, opens new ones, and
sends a query again, once, when the server closed its connection under it (RFC 7766
§6.2.1). Connections are rotated after a maximum age, so that the load behind a Service
ClusterIP spreads over its pods, and closed when idle. Connections that keep failing
(refused, timed out, refused by TLS, closed before answering anything) are not reopened
in a tight loop: new ones wait out a growing backoff, and queries meanwhile fail at once
with :class:`UpstreamDown`.

:class:`TlsUpstream` is the same pool over TLS (DNS over TLS, RFC 7858): only the way a
connection is opened differs (an SSL context from :mod:`dnsproxy.tls`, the configured
name as SNI and checked in the certificate, the last TLS session resumed), so pipelining,
matching, deadlines and retirement are the same code.

:class:`UdpUpstream` sends each query from a fresh connected socket (OS-chosen random source
port, random ID) and repeats a truncated answer over TCP. :class:`AutoUpstream` is TCP for
a server that speaks TCP, and UDP for one that closes or refuses TCP connections while it
answers over UDP (some home routers and resolvers do), trying TCP again now and then.

All hand back the reply (or an :class:`UpstreamError`) through a callback, or with the
caller's ID restored from :meth:`Upstream.query`; they never return a reply that failed
validation. Counters are plain integers in :class:`UpstreamStats`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, cast

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from . import tls
from .config_types import HostPort, UpstreamConfig, UpstreamPoolConfig
from .framing import NEVER
from .metrics import labelled
from .pipeline import (
    MAX_IDS,
    OPEN,
    ConnectionLost,
    PendingQuery,
    PipelinedConnection,
    Request,
    UpstreamBusy,
    UpstreamError,
    UpstreamStats,
    UpstreamTimeout,
)
from .resolution import PROBE_QUERY, PROBE_TIMEOUT_S
from .wire import HEADER_LEN, WireError, question_end, reply_matches

__all__ = [
    "AutoUpstream",
    "Callback",
    "Done",
    "PendingQuery",
    "Request",
    "TcpUpstream",
    "TlsStats",
    "TlsUpstream",
    "UdpUpstream",
    "Upstream",
    "UpstreamBusy",
    "UpstreamDown",
    "UpstreamError",
    "UpstreamStats",
    "UpstreamTimeout",
    "make_upstream",
]

log: Final = logging.getLogger(__name__)

_ID: Final = struct.Struct(">H")
_TC: Final = 0x02
_MAX_MESSAGE: Final = 0xFFFF

# Over TCP the ID only demultiplexes (spoofing would need the TCP sequence numbers), so the
# fast Mersenne Twister is enough. Over UDP the ID is half of the defence against forged
# replies (RFC 5452), so it comes from the OS.
_tcp_id: Final = random.getrandbits
_udp_id: Final = random.SystemRandom().getrandbits

# Reconnect backoff of a pool whose connections keep failing: the first failure in a row
# costs nothing (the query's one retry goes out at once), each further one doubles the
# wait before the next connection, from BACKOFF_FIRST_S up to BACKOFF_MAX_S.
BACKOFF_FIRST_S = 0.25
BACKOFF_MAX_S = 4.0
# An auto upstream that fell back to UDP tries TCP again this often (with a probe, while
# queries keep going over UDP).
TCP_RECHECK_S = 60.0
# A TLS failure is logged when its reason changes, and otherwise at most this often.
_TLS_LOG_EVERY_S = 60.0


# The metric families of every upstream server, by UpstreamStats field.
_COUNTERS = (
    ("queries", "Queries sent to the upstream server."),
    ("replies", "Valid replies received from the upstream server."),
    ("failures", "Queries that failed for a reason other than a timeout."),
    ("timeouts", "Queries that got no valid reply in time."),
    ("bad_replies", "Replies dropped: wrong ID or question, malformed, unsolicited."),
    ("connects", "Connections opened to the upstream server."),
    ("connect_failures", "Failed connection attempts."),
    ("retries", "Queries retried after the server closed a connection."),
    ("tc_fallbacks", "Truncated UDP replies retried over TCP."),
    ("pool_full", "Queries refused because every pooled connection was full."),
)
_GAUGES = (
    ("open_connections", "Open connections to the upstream server."),
    ("inflight", "Queries sent to the upstream server and not yet answered."),
)


# A function told the outcome of a query (see Callback). The reply's ID is whatever went
# on the wire (:meth:`Upstream.query` restores the caller's); everything after the ID is
# the server's.
Done = Callable[[bytes | None, UpstreamError | None], None]


class Callback(PendingQuery):
    """The query ``wire`` (its ``question`` when the caller has it), whose outcome is
    handed to ``done`` (without the time)."""

    __slots__ = ("done",)

    def __init__(self, wire: bytes, done: Done, question: bytes = b"") -> None:
        PendingQuery.__init__(self, wire, question, NEVER)
        self.done = done

    def upstream_done(self, reply: bytes | None, error: UpstreamError | None, now: float) -> None:
        self.done(reply, error)


class UpstreamDown(UpstreamError):
    """Not sent: connections to the server keep failing and the pool waits before the next.

    Unlike :class:`UpstreamBusy` this says something about the server: it counts as a
    failed try.
    """


class _Finished:
    """The request of a query that failed before it was sent."""

    __slots__ = ()

    def cancel(self) -> None:
        pass


class Upstream:
    """One upstream server. Subclasses implement :meth:`send` and :meth:`close`."""

    config: UpstreamConfig
    label: str
    stats: UpstreamStats

    def __init__(
        self, config: UpstreamConfig, label: str = "", stats: UpstreamStats | None = None
    ) -> None:
        # ``label`` and ``stats``: those of an upstream this one works for (auto's TCP
        # and UDP halves count as the auto upstream).
        self.config = config
        self.label = label or config.label
        self.stats = stats if stats is not None else UpstreamStats()

    def send(self, query: PendingQuery, timeout_s: float, now: float = -1.0) -> Request:
        """Send ``query`` (its ``wire``, within ``timeout_s``); its
        :meth:`~PendingQuery.upstream_done` is told the outcome once. Returns what
        cancels it (over TCP, ``query`` itself: a miss costs no object here).

        The callback form is what the forwarder uses: a miss then costs no task and no
        coroutine, and the answer goes to the clients from ``data_received`` directly.
        The outcome may be told before ``send`` returns (closed upstream, full pool).
        ``query.question``, when not empty, must be ``wire``'s question section (the
        caller has it already; otherwise it is found by walking ``wire``). A query is
        sent again (its next try) only once its outcome was told. ``now``: the monotonic
        clock when the caller has just read it (the loop's clock otherwise).
        """
        raise NotImplementedError

    def probe(self, query: PendingQuery, timeout_s: float) -> Request:
        """Send the health probe ``query`` as :meth:`send` does, but never held behind a
        reconnect backoff: the probe is how a server that comes back is seen at once."""
        return self.send(query, timeout_s)

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

        request = self.send(Callback(wire, done), timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            request.cancel()
            raise

    async def close(self) -> None:
        """Close every socket and fail the queries in flight."""
        raise NotImplementedError

    def transports(self) -> dict[str, int]:
        """The transports this upstream can use, 1 for the one in use and 0 for others."""
        return {self.config.transport: 1}

    def collect(self) -> Iterator[Metric]:
        """This server's counters and gauges, labelled ``upstream``."""
        stats = self.stats
        label = self.label
        for name, doc in _COUNTERS:
            value = getattr(stats, name)
            yield labelled(
                CounterMetricFamily, f"dnsproxy_upstream_{name}", doc, "upstream", label, value
            )
        for name, doc in _GAUGES:
            value = getattr(stats, name)
            yield labelled(
                GaugeMetricFamily, f"dnsproxy_upstream_{name}", doc, "upstream", label, value
            )
        transport = GaugeMetricFamily(
            "dnsproxy_upstream_transport",
            "1 for the transport queries to the upstream server go over (auto: tcp or udp).",
            labels=["upstream", "transport"],
        )
        for name, value in self.transports().items():
            transport.add_metric([label, name], value)
        yield transport

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label}>"


def make_upstream(
    config: UpstreamConfig, pool: UpstreamPoolConfig, counting_on: Upstream | None = None
) -> Upstream:
    """The upstream for ``config``'s transport; raises ValueError for an unknown one.

    ``counting_on``: the upstream of the same label that this one replaces (a reload),
    whose counters it goes on counting in: a Prometheus counter must not go back to 0
    for a server that is still configured. Both count in them while the replaced one
    drains, so the gauges (connections, queries in flight) are the server's totals.
    """
    kinds: dict[str, type[TcpUpstream] | type[UdpUpstream] | type[AutoUpstream]] = {
        "tcp": TcpUpstream,
        "tls": TlsUpstream,
        "udp": UdpUpstream,
        "auto": AutoUpstream,
    }
    kind = kinds.get(config.transport)
    if kind is None:
        raise ValueError(f"unsupported upstream transport {config.transport!r}")
    if counting_on is None or counting_on.label != config.label:
        return kind(config, pool)
    upstream = kind(config, pool, stats=counting_on.stats)
    if isinstance(upstream, TlsUpstream) and isinstance(counting_on, TlsUpstream):
        upstream.tls_stats = counting_on.tls_stats
    return upstream


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


class TcpUpstream(Upstream):
    """A pool of pipelined TCP connections to one server.

    Connections open lazily: a query goes to the least-loaded connection, and a new one
    is opened (and given the query, which is written as soon as it connects) while every
    existing connection has something in flight and the pool is below its size. When every
    connection is at ``max_inflight_per_connection`` the query fails at once with
    :class:`UpstreamBusy`, counted in ``pool_full``: waiting would be a hidden queue, and
    the forwarder can use another server or answer SERVFAIL instead.

    Retired connections (see :mod:`dnsproxy.pipeline`) take no new queries and close once
    drained; they do not count against the pool size meanwhile.

    A refused connect fails its queries at once. Connections that fail in a row (refused,
    timed out, refused by TLS, or closed by the server before it answered anything) put
    the pool in a backoff: no new connection before :data:`BACKOFF_FIRST_S`, doubling up
    to :data:`BACKOFF_MAX_S`, and a query that would need one fails at once with
    :class:`UpstreamDown`. A reply ends the backoff, and a health probe (:meth:`probe`)
    is never held behind it: the first reply after an outage is usually the probe's, and
    the next query connects at once. Whether the server counts as down is the
    forwarder's decision, from the failures it sees.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        pool: UpstreamPoolConfig,
        label: str = "",
        stats: UpstreamStats | None = None,
    ) -> None:
        super().__init__(config, label, stats)
        self.pool = pool
        self._size = max(1, pool.tcp_connections)
        self._max_inflight = min(max(1, pool.max_inflight_per_connection), MAX_IDS)
        self._active: list[_UpstreamConnection] = []  # take new queries; includes connecting
        self._draining: set[_UpstreamConnection] = set()  # retired, waiting for their replies
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.failed_connections = 0  # in a row; a reply resets it
        self.failure = ""  # how the last connection failed, for logs
        self._retry_at = 0.0  # no new connection before this (loop time)
        # Given a request whose connection failed (neither a timeout nor our own limits)
        # and the time, another way to send it, which tells it the outcome; or None. Auto's
        # way to UDP; the success path never looks at it.
        self.fallback: Callable[[PendingQuery, float], Request | None] | None = None

    def send(self, query: PendingQuery, timeout_s: float, now: float = -1.0) -> Request:
        self.stats.queries += 1
        loop = self._loop
        if loop is None:
            # Kept: asyncio.get_running_loop() costs a getpid() system call per use.
            loop = self._loop = asyncio.get_running_loop()
        if now < 0:
            now = loop.time()
        if not query.question:
            try:
                query.question = _question(query.wire)
            except UpstreamError as exc:
                self.stats.failures += 1
                query.upstream_done(None, exc, now)
                return _Finished()
        # A new try of the query: what the last one left is reset.
        query.deadline = now + timeout_s
        query.owner = self
        query.conn = None
        query.error = None
        query.retried = False
        query.finished = False
        query.then = None
        self._dispatch(query, now)
        return query

    def probe(self, query: PendingQuery, timeout_s: float) -> Request:
        # The backoff is lifted for this one send only: the probe opens a connection
        # now if it needs one; queries meanwhile share that connection, and its outcome
        # (a reply ends the backoff, a failure extends it) decides what comes next.
        retry_at, self._retry_at = self._retry_at, 0.0
        try:
            return self.send(query, timeout_s)
        finally:
            self._retry_at = retry_at

    def _dispatch(self, request: PendingQuery, now: float) -> None:
        if self._closed:
            self._fail(request, UpstreamBusy(f"{self.label}: upstream closed"), now)
            return
        conn = self._pick(now)
        if conn is None:
            if len(self._active) < self._size:  # it would have opened one: backing off
                wait_s = self._retry_at - now
                error: UpstreamError = UpstreamDown(
                    f"{self.label}: {self.failed_connections} connections failed in a row "
                    f"(last: {self.failure}); next attempt in {wait_s:.2f}s"
                )
            else:
                self.stats.pool_full += 1
                error = UpstreamBusy(f"{self.label}: every connection is at its in-flight limit")
            self._fail(request, error, now)
            return
        conn.send(request, now)

    def _complete(self, request: PendingQuery, now: float) -> None:
        """A connection is done with ``request``: its reply, or an error."""
        if request.finished:
            return  # cancelled meanwhile
        error = request.error
        if error is None:
            request.finished = True
            self.stats.replies += 1
            if self.failed_connections:
                self._connection_worked()
            request.upstream_done(request.reply, None, now)
        elif type(error) is ConnectionLost and request.retry(now):
            self.stats.retries += 1
            self._dispatch(request, now)
        else:
            self._fail(request, error, now)

    def _fail(self, request: PendingQuery, error: UpstreamError, now: float) -> None:
        if request.finished:
            return
        request.finished = True
        if isinstance(error, UpstreamTimeout):
            self.stats.timeouts += 1
        else:
            self.stats.failures += 1
            fallback = self.fallback
            if fallback is not None and not isinstance(error, UpstreamBusy):
                request.then = fallback(request, now)
                if request.then is not None:
                    return  # the fallback tells request
        request.upstream_done(None, error, now)

    def cancel_query(self, request: PendingQuery) -> None:
        """Forget ``request`` (cancelled) on the connection that has it."""
        pipeline = request.conn
        for conn in (*self._active, *self._draining):
            if conn.pipeline is pipeline:
                conn.cancel(request)
                return

    def _pick(self, now: float) -> _UpstreamConnection | None:
        best = None
        best_load = self._max_inflight
        for conn in self._active:
            load = len(conn.pipeline.pending)
            if load < best_load:
                best = conn
                best_load = load
        if (
            (best is None or best_load > 0)
            and len(self._active) < self._size
            and now >= self._retry_at
        ):
            return self._open(now)
        return best

    def _open(self, now: float) -> _UpstreamConnection:
        loop = self._loop
        assert loop is not None
        conn = self._new_connection(loop, now)
        self._active.append(conn)
        task = loop.create_task(self._connect(conn))
        conn.connect_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return conn

    async def _connect(self, conn: _UpstreamConnection) -> None:
        loop = conn.loop
        try:
            async with asyncio.timeout(self.pool.connect_timeout_s):
                await self._open_transport(conn)
        except Exception as exc:  # OSError, TimeoutError; anything else must not kill the pool
            self.stats.connect_failures += 1
            log.debug("%s: connect failed: %r", self.label, exc)
            self.connection_failed(self.describe_failure(exc), loop.time())
            conn.close(UpstreamError, f"connect failed: {exc!r}")

    def _new_connection(self, loop: asyncio.AbstractEventLoop, now: float) -> _UpstreamConnection:
        return _UpstreamConnection(self, loop, now)

    async def _open_transport(self, conn: _UpstreamConnection) -> None:
        """Connect ``conn`` (its ``connection_made`` runs once the transport is up)."""
        await conn.loop.create_connection(lambda: conn, self.config.host, self.config.port)

    def describe_failure(self, exc: BaseException | None) -> str:
        """How a connection failed, as a log line says it after the server's name:
        ``exc`` from the connect, or from a connection lost with nothing answered (None:
        the server closed it)."""
        if exc is None:
            return "closes connections without answering"
        if isinstance(exc, TimeoutError):
            return f"accepts no connection within {self.pool.connect_timeout_s:g}s"
        if isinstance(exc, ConnectionRefusedError):
            return "refuses connections"
        return f"fails connections ({exc!r})"

    def connection_failed(self, reason: str, now: float) -> None:
        """A connection failed (``reason`` says how): one more in a row; backoff."""
        self.failed_connections += 1
        self.failure = reason
        if self.failed_connections > 1:
            wait_s = BACKOFF_FIRST_S * 2 ** min(self.failed_connections - 2, 8)
            self._retry_at = now + min(wait_s, BACKOFF_MAX_S)

    def _connection_worked(self) -> None:
        self.failed_connections = 0
        self._retry_at = 0.0

    def _retire(self, conn: _UpstreamConnection) -> None:
        try:
            self._active.remove(conn)
        except ValueError:
            return
        self._draining.add(conn)

    def _forget(self, conn: _UpstreamConnection) -> None:
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


class _WriteBatch:
    """Upstream connections with frames queued while a client read batch runs (see
    :func:`hold_writes`): written when it ends instead of from a loop callback each."""

    def __init__(self) -> None:
        self.open = False
        self.connections: list[_UpstreamConnection] = []


_WRITES: Final = _WriteBatch()


def hold_writes() -> None:
    """Queue upstream writes until :func:`release_writes`, which the caller must call
    (a UDP listener around one read batch). Below saturation a batch holds one or two
    misses, and a loop callback per miss to write its query costs more than the write."""
    _WRITES.open = True


def release_writes() -> None:
    """Write what was queued since :func:`hold_writes`, one write per connection."""
    batch = _WRITES
    batch.open = False
    if batch.connections:
        connections = batch.connections
        batch.connections = []
        for conn in connections:
            conn._flush()


class _UpstreamConnection(asyncio.Protocol):
    """The asyncio side of one pipelined upstream connection.

    Moves bytes between a transport and its :class:`PipelinedConnection`, arms the one
    timer the pipeline asks for, and tells the pool about what the pipeline finished.
    Frames queued in one loop iteration (or one client read batch) go out in one write.
    """

    def __init__(self, owner: TcpUpstream, loop: asyncio.AbstractEventLoop, now: float) -> None:
        self.owner = owner
        self.loop = loop
        self.stats = owner.stats
        pool = owner.pool
        self.pipeline: PipelinedConnection[PendingQuery] = PipelinedConnection(
            now,
            label=owner.label,
            stats=owner.stats,
            max_inflight=owner._max_inflight,
            max_age_s=pool.connection_max_age_s,
            idle_timeout_s=pool.idle_timeout_s,
            ids=_tcp_id,
        )
        self.connect_task: asyncio.Task[None] | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self._transport: asyncio.Transport | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._held = False  # in _WRITES.connections: written when the read batch ends
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = NEVER  # when _timer fires; never later than pipeline.timer()
        self._down = False  # forgotten by the pool; the transport is closing or gone
        self._arm()

    # -- from the pool

    def send(self, request: PendingQuery, now: float) -> None:
        self.pipeline.send(request, now)
        if self._transport is not None and self._flush_handle is None and not self._held:
            if _WRITES.open:
                self._held = True
                _WRITES.connections.append(self)
            else:
                self._flush_handle = self.loop.call_soon(self._flush)
        if request.deadline < self._timer_at:
            # A new query can only bring the pipeline's timer forward to its deadline.
            self._arm_at(request.deadline)

    def cancel(self, request: PendingQuery) -> None:
        self.pipeline.cancel(request, self.loop.time())
        self._settle()

    def close(
        self, error: type[UpstreamError] = UpstreamError, reason: str = "connection closed"
    ) -> None:
        failed = self.pipeline.close(error, reason)
        self._shutdown()
        self._finish(failed)

    # -- timer

    def _arm(self) -> None:
        when = self.pipeline.timer()
        if when is None:
            self._arm_at(NEVER)  # closed
        elif when < self._timer_at:
            self._arm_at(when)
        # Else the timer armed fires no later than needed: it is left as it is, finds
        # nothing due and is armed again then. Moving it later at once would cost a
        # cancel and a new loop timer each time the connection drains, which below
        # saturation is once per miss, and again at the next query (its deadline is
        # sooner than the idle timeout).

    def _arm_at(self, when: float) -> None:
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when != NEVER:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = NEVER
        failed = self.pipeline.handle_timer(self.loop.time())
        self._settle()
        self._finish(failed)

    # -- state changes

    def _settle(self) -> None:
        """Act on the pipeline's state: leave the pool when retired, close when closed."""
        pipeline = self.pipeline
        if pipeline.closed:
            self._shutdown()
            return
        if pipeline.retired:
            self.owner._retire(self)
        self._arm()

    def _finish(self, requests: list[PendingQuery]) -> None:
        # After _settle: a retry or a new query from a callback must see the pool as it
        # now is, without this connection if it is retired or closed.
        if requests:
            now = self.loop.time()
            complete = self.owner._complete
            for request in requests:
                complete(request, now)

    def _shutdown(self) -> None:
        if self._down:
            return
        self._down = True
        self.owner._forget(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = NEVER
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._transport is not None:
            self._transport.close()
        else:
            task = self.connect_task
            if task is not None and task is not asyncio.current_task():
                task.cancel()
            if not self.lost.done():
                self.lost.set_result(None)

    # -- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # cast, not isinstance: uvloop's transports do not subclass asyncio.Transport.
        transport = cast(asyncio.Transport, transport)
        self.stats.open_connections += 1
        self.stats.connects += 1
        if self._down:
            transport.close()
            return
        self._transport = transport
        self.pipeline.connected(self.loop.time())
        self._flush()

    def _flush(self) -> None:
        self._flush_handle = None
        self._held = False
        if self._transport is not None and not self._down:
            data = self.pipeline.data_to_send()
            if data:
                self._transport.write(data)

    def data_received(self, data: bytes) -> None:
        pipeline = self.pipeline
        now = self.loop.time()
        done = pipeline.receive(data, now)
        if not pipeline.pending or pipeline.state != OPEN:
            # Drained (the idle timer may be due sooner), retired or closed.
            self._settle()
        owner = self.owner  # its method called directly: compiled, a native call
        for request in done:
            owner._complete(request, now)

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost fails what is in flight

    def connection_lost(self, exc: Exception | None) -> None:
        self.stats.open_connections -= 1
        if not self.lost.done():
            self.lost.set_result(None)
        now = self.loop.time()
        pipeline = self.pipeline
        failed = pipeline.connection_lost(now)
        if failed and not pipeline.replies:
            # Closed by the server with queries in flight and nothing answered: a failure
            # of the server (an idle connection it closes is not), which backs off.
            owner = self.owner
            owner.connection_failed(owner.describe_failure(exc), now)
        self._shutdown()
        if failed:
            label = self.owner.label
            log.debug("%s: connection lost with %d in flight: %r", label, len(failed), exc)
        self._finish(failed)


# --------------------------------------------------------------------------------------
# TLS


@dataclass(slots=True)
class TlsStats:
    """TLS counters of one upstream server."""

    handshakes: int = 0  # completed, resumed ones included
    resumed: int = 0  # handshakes that resumed an earlier session
    failures: dict[str, int] = field(default_factory=lambda: dict.fromkeys(tls.REASONS, 0))


class TlsUpstream(TcpUpstream):
    """A pool of pipelined connections over TLS to one server (RFC 7858).

    The same pool as :class:`TcpUpstream`; a connection is a TLS connection checked
    against the configured CAs and name (see :mod:`dnsproxy.tls`). A refused certificate
    or handshake is a failed connection like a refused connect (counted by reason,
    logged, backed off), never a reason to talk to the server without TLS. Each new
    connection resumes the session of the last one, so that rotating connections after
    ``connection_max_age_s`` costs an abbreviated handshake.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        pool: UpstreamPoolConfig,
        label: str = "",
        stats: UpstreamStats | None = None,
    ) -> None:
        super().__init__(config, pool, label, stats)
        if config.tls is None:
            raise ValueError(f"{self.label}: a tls upstream needs its TLS settings")
        settings = config.tls
        self.tls_stats = TlsStats()
        self._server_name = settings.server_name
        self._context: tls.ClientContext | None = None
        self._setup_error: tls.TlsSetupError | None = None
        self._logged = ("", -_TLS_LOG_EVERY_S)  # the TLS failure last logged, and when
        try:
            self._context = tls.client_context(settings)
        except tls.TlsSetupError as exc:
            # check-config read these files; they changed since. Fail every query, loudly.
            self._setup_error = exc
            log.error("%s: cannot set up TLS: %s: %s", self.label, exc.key, exc.reason)
        if settings.insecure:
            log.warning(
                "%s: insecure: true, so the server's certificate is NOT checked: anyone on "
                "the path can answer in its name",
                self.label,
            )

    def _new_connection(self, loop: asyncio.AbstractEventLoop, now: float) -> _UpstreamConnection:
        return _TlsConnection(self, loop, now)

    async def _open_transport(self, conn: _UpstreamConnection) -> None:
        if self._setup_error is not None:
            raise self._setup_error
        await conn.loop.create_connection(
            lambda: conn,
            self.config.host,
            self.config.port,
            ssl=self._context,
            server_hostname=self._server_name or "",  # "": insecure without a name
        )

    def describe_failure(self, exc: BaseException | None) -> str:
        if isinstance(exc, tls.TlsSetupError):
            return f"cannot set up TLS ({exc.key}: {exc.reason})"
        if exc is None:
            # TLS 1.3 sends the client's certificate after the server's handshake is
            # done: a server that refuses it ends the connection only now.
            return "closes connections without answering after the TLS handshake"
        if isinstance(exc, TimeoutError):
            return f"completes no TLS handshake within {self.pool.connect_timeout_s:g}s"
        found = tls.failure(exc)
        if found is None:
            return super().describe_failure(exc)
        reason, text = found
        self.tls_stats.failures[reason] += 1
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        if reason != self._logged[0] or now - self._logged[1] >= _TLS_LOG_EVERY_S:
            self._logged = (reason, now)
            log.warning(
                "%s: %s; connection refused, the server counts as failing "
                "(queries never go to it without TLS)",
                self.label,
                text,
            )
        return text

    def handshake_done(self, transport: asyncio.BaseTransport) -> None:
        """A connection finished its handshake: count it."""
        self.tls_stats.handshakes += 1
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.session_reused:
            self.tls_stats.resumed += 1
        self._logged = ("", self._logged[1])  # the next failure is news

    def save_session(self, transport: asyncio.BaseTransport) -> None:
        """Keep the session of ``transport`` for the next connection to resume."""
        ssl_object = transport.get_extra_info("ssl_object")
        session = ssl_object.session if ssl_object is not None else None
        if session is not None and self._context is not None:
            self._context.session = session

    def collect(self) -> Iterator[Metric]:
        """The pool's families, and the handshakes and TLS failures by reason."""
        yield from super().collect()
        label = self.label
        stats = self.tls_stats
        handshakes = CounterMetricFamily(
            "dnsproxy_upstream_tls_handshakes",
            "TLS handshakes completed with the upstream server; resumed: an earlier session "
            "was resumed (no certificate exchange).",
            labels=["upstream", "resumed"],
        )
        handshakes.add_metric([label, "false"], stats.handshakes - stats.resumed)
        handshakes.add_metric([label, "true"], stats.resumed)
        yield handshakes
        failures = CounterMetricFamily(
            "dnsproxy_upstream_tls_failures",
            "TLS connections to the upstream server refused, by reason (expired, "
            "not_yet_valid, name_mismatch, untrusted, invalid: the certificate; handshake: "
            "anything else).",
            labels=["upstream", "reason"],
        )
        for reason, count in stats.failures.copy().items():
            failures.add_metric([label, reason], count)
        yield failures


class _TlsConnection(_UpstreamConnection):
    """One pipelined connection over TLS: counts its handshake and, once the server has
    answered (by then it has sent its session tickets), hands its session to the pool."""

    def __init__(self, owner: TlsUpstream, loop: asyncio.AbstractEventLoop, now: float) -> None:
        super().__init__(owner, loop, now)
        # Its own name for the pool: a subclass may not narrow an attribute's type when
        # compiled with mypyc.
        self.tls_owner = owner
        self._session_saved = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called once the handshake is done; a failed one ends the connect instead.
        self.tls_owner.handshake_done(transport)
        super().connection_made(transport)  # writes the queries that waited for it
        tls.quick_ack(transport)

    def data_received(self, data: bytes) -> None:
        if not self._session_saved and self._transport is not None:
            self._session_saved = True
            self.tls_owner.save_session(self._transport)
        super().data_received(data)


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


class _UdpRequest:
    """One query through a UDP upstream: a task of its own."""

    __slots__ = ("finished", "task", "waiter")

    def __init__(
        self, owner: UdpUpstream, coro: Coroutine[Any, Any, bytes], waiter: PendingQuery
    ) -> None:
        self.finished = False
        self.waiter = waiter
        self.task = asyncio.get_running_loop().create_task(coro)
        owner._tasks.add(self.task)
        self.task.add_done_callback(owner._tasks.discard)
        self.task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[bytes]) -> None:
        if self.finished or task.cancelled():
            return
        self.finished = True
        error = task.exception()
        now = task.get_loop().time()
        if error is None:
            self.waiter.upstream_done(task.result(), None, now)
        elif isinstance(error, UpstreamError):
            self.waiter.upstream_done(None, error, now)
        else:
            failed = UpstreamError(f"UDP query failed: {error!r}")
            self.waiter.upstream_done(None, failed, now)

    def cancel(self) -> None:
        self.finished = True
        self.task.cancel()


class UdpUpstream(Upstream):
    """Plain UDP, one fresh socket per query; TC=1 answers are fetched again over TCP."""

    def __init__(
        self,
        config: UpstreamConfig,
        pool: UpstreamPoolConfig,
        label: str = "",
        stats: UpstreamStats | None = None,
    ) -> None:
        super().__init__(config, label, stats)
        self.pool = pool
        self._tcp: TcpUpstream | None = None
        self._waiting: set[asyncio.Future[bytes]] = set()  # so close() can fail them
        self._tasks: set[asyncio.Task[bytes]] = set()
        self._closed = False

    def send(self, query: PendingQuery, timeout_s: float, now: float = -1.0) -> Request:
        # UDP is opt-in and not the hot path: one task per query keeps it simple.
        return _UdpRequest(self, self._query(query.wire, timeout_s), query)

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


# --------------------------------------------------------------------------------------
# auto: TCP, or UDP for a server that does not speak TCP


class AutoUpstream(Upstream):
    """TCP to a server that speaks it; UDP to one that refuses or closes TCP connections
    while it answers over UDP (some home routers and resolvers do).

    While on TCP, a query whose TCP connection failed (refused, closed before an answer,
    or the pool backing off after such failures) is sent over UDP with the rest of its
    time; when UDP answers and the pool's own connections have been failing, the server
    is switched to UDP, with one log line saying why. A slow server (a TCP timeout) is
    not a reason to switch. On UDP, queries go out as :class:`UdpUpstream` sends them (a
    fresh socket with an OS-chosen source port and a random ID each, truncated replies
    fetched over TCP), and every :data:`TCP_RECHECK_S` a probe goes over TCP: when it is
    answered the server is back on TCP.

    Both halves count as this upstream (its label and counters);
    ``dnsproxy_upstream_transport`` says which one is in use.
    """

    def __init__(
        self, config: UpstreamConfig, pool: UpstreamPoolConfig, stats: UpstreamStats | None = None
    ) -> None:
        super().__init__(config, stats=stats)
        tcp = UpstreamConfig("tcp", config.host, config.port)
        self.tcp = TcpUpstream(tcp, pool, self.label, self.stats)
        self.tcp.fallback = self._udp_instead
        udp = UpstreamConfig("udp", config.host, config.port)
        self.udp = UdpUpstream(udp, pool, self.label, self.stats)
        self.using_udp = False
        self._recheck_at = NEVER  # when to probe TCP again (on UDP)
        self._recheck: Request | None = None  # the probe out, for close()
        self._rechecking = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def time(self) -> float:
        """The loop's clock."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    def send(self, query: PendingQuery, timeout_s: float, now: float = -1.0) -> Request:
        if not self.using_udp:
            return self.tcp.send(query, timeout_s, now)
        if now < 0:
            now = self.time()
        if now >= self._recheck_at and not self._rechecking:
            self._recheck_tcp(now)
        return self.udp.send(query, timeout_s, now)

    def probe(self, query: PendingQuery, timeout_s: float) -> Request:
        if not self.using_udp:
            return self.tcp.probe(query, timeout_s)
        return self.send(query, timeout_s)

    def transports(self) -> dict[str, int]:
        return {"tcp": 0, "udp": 1} if self.using_udp else {"tcp": 1, "udp": 0}

    def _udp_instead(self, request: PendingQuery, now: float) -> Request | None:
        """The TCP connection of ``request`` failed: send it over UDP with the time left.
        Not once on UDP: then the TCP pool carries only the probe, which must fail."""
        remaining = request.deadline - now
        if self.using_udp or remaining <= 0:
            return None
        over_udp = Callback(request.wire, partial(self._over_udp, request), request.question)
        return self.udp.send(over_udp, remaining, now)

    def _over_udp(
        self, waiter: PendingQuery, reply: bytes | None, error: UpstreamError | None
    ) -> None:
        if reply is not None:
            self._answered_over_udp()
        waiter.upstream_done(reply, error, self.time())

    def _answered_over_udp(self) -> None:
        """A query that failed over TCP was answered over UDP."""
        tcp = self.tcp
        if self.using_udp or not tcp.failed_connections:
            return  # a connection lost once under a query is no verdict on TCP
        self.using_udp = True
        self._recheck_at = self.time() + TCP_RECHECK_S
        where = HostPort(self.config.host, self.config.port)
        log.warning(
            "%s %s over TCP but answers over UDP: using UDP for it (write udp://%s to "
            "silence this, or fix the server's TCP); TCP is tried again every %gs",
            where,
            tcp.failure,
            where,
            TCP_RECHECK_S,
        )

    def _recheck_tcp(self, now: float) -> None:
        self._recheck_at = now + TCP_RECHECK_S
        self._rechecking = True
        request = self.tcp.probe(Callback(PROBE_QUERY, self._rechecked), PROBE_TIMEOUT_S)
        if self._rechecking:  # else it already failed
            self._recheck = request

    def _rechecked(self, reply: bytes | None, error: UpstreamError | None) -> None:
        self._rechecking = False
        self._recheck = None
        if self._closed or not self.using_udp:
            return
        if reply is None:
            log.debug("%s: TCP still fails: %s", self.label, error)
            return
        self.using_udp = False
        log.warning(
            "%s answers over TCP again: using TCP for it",
            HostPort(self.config.host, self.config.port),
        )

    async def close(self) -> None:
        self._closed = True
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        await self.udp.close()
        await self.tcp.close()
