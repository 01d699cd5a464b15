"""Cache misses: zones, coalescing, and the asyncio side of resolution and health checks.

Each distinct question in flight (by cache key) is one :class:`_Question`; every client
asking the same question meanwhile is added to its waiters and answered from the same
result, an entry that is always there in the end (a real reply, or a synthesized
SERVFAIL/REFUSED), never silence. Which server to try, for how long, what a reply means and
each server's health are decided by the sans-IO machines of :mod:`dnsproxy.resolution`;
this module feeds them the clock and the upstreams' outcomes and carries out what they
ask. A miss costs no task and no coroutine: each try hands the query to an upstream with
:meth:`~dnsproxy.upstream.Upstream.send`, whose callback finishes the question or starts
the next try. Probes of a server marked down are sent from a timer, with no task either.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dnsproxy import wire
from dnsproxy.cache import SERVFAIL, Cache, Entry
from dnsproxy.config_types import Config, UpstreamConfig
from dnsproxy.metrics import buckets, by_reason, labelled
from dnsproxy.resolution import (
    LATENCY_BUCKETS,
    PROBE_TIMEOUT_S,
    Resolution,
    ServerState,
    Zone,
)
from dnsproxy.upstream import Request, Upstream, UpstreamBusy, UpstreamError, make_upstream

__all__ = ["Deliver", "Forwarder", "ForwarderStats"]

log = logging.getLogger(__name__)

Deliver = Callable[[Entry], None]


@dataclass(slots=True)
class ForwarderStats:
    coalesced: int = 0  # clients that joined a resolution already in flight
    nxdomain_hits: int = 0  # answered by an NXDOMAIN cached for another type of the name
    inflight_rejects: int = 0  # max_inflight reached: SERVFAIL
    waiter_rejects: int = 0  # max_waiters_per_query reached: SERVFAIL
    no_zone: int = 0  # name outside every configured zone: REFUSED
    servfail_sent: int = 0  # resolutions that ended without a usable reply
    bad_replies: int = 0  # replies that failed the wire walk


class _Server(ServerState):
    """A server's sans-IO state, with the upstream that reaches it and its probe's timer."""

    __slots__ = ("probe_request", "probe_timer", "upstream")

    def __init__(self, upstream: Upstream) -> None:
        ServerState.__init__(self, upstream.label)
        self.upstream = upstream
        self.probe_timer: asyncio.TimerHandle | None = None
        self.probe_request: Request | None = None

    def collect(self) -> Iterator[Metric]:
        """This server's families: its upstream's counters, its health, its latency."""
        label = self.label
        yield from self.upstream.collect()
        yield labelled(
            GaugeMetricFamily,
            "dnsproxy_upstream_up",
            "1 while the upstream server is healthy, 0 while it is marked down and probed.",
            "upstream",
            label,
            1 if self.up else 0,
        )
        yield labelled(
            CounterMetricFamily,
            "dnsproxy_upstream_healthcheck_failures",
            "Failed health probes of a server marked down.",
            "upstream",
            label,
            self.probe_failures,
        )
        latency = HistogramMetricFamily(
            "dnsproxy_upstream_request_duration_seconds",
            "Time from sending a query to an upstream server to its valid reply.",
            labels=["upstream"],
        )
        histogram = self.latency
        latency.add_metric(
            [label], buckets(LATENCY_BUCKETS, histogram.counts.copy()), histogram.total_s
        )
        yield latency


class _Question(Resolution[_Server]):
    """One distinct question on its way upstream, and the clients waiting for it."""

    __slots__ = ("done", "request", "waiters")

    waiters: list[Deliver]
    request: Request | None  # the try in flight
    done: bool


class Forwarder:
    """Resolves cache misses through the configured zones' upstreams.

    Used by the server (:meth:`submit`) and the app (:meth:`drain`, :meth:`abandon`,
    :meth:`close`, :attr:`inflight`); :meth:`collect` is its metrics source.
    """

    def __init__(self, config: Config, cache: Cache) -> None:
        self._config = config
        self._cache = cache
        self._max_inflight = config.limits.max_inflight
        self._max_waiters = config.limits.max_waiters_per_query
        self.stats = ForwarderStats()
        self.upstreams: dict[str, Upstream] = {}
        self.servers: dict[str, _Server] = {}
        self._zones: dict[bytes, Zone[_Server]] = {}
        for zone in config.zones:
            servers = [self._server(u) for u in zone.upstreams]
            self._zones[wire.name_to_wire(zone.zone)] = Zone(zone, servers)
        self._only_zone = self._zones.get(b"\x00") if len(self._zones) == 1 else None
        self._inflight: dict[bytes, _Question] = {}
        # The upstream whose reply (or failure) is being delivered, for the query log
        # lines written inside the deliver callbacks; None outside a delivery. Kept only
        # when queries are logged.
        self.answering: str | None = None
        self._log_queries = config.log.queries
        # The running loop, taken at the first miss: asyncio.get_running_loop() makes a
        # getpid() system call on every use (its fork check), several per miss.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _server(self, config: UpstreamConfig) -> _Server:
        server = self.servers.get(config.label)
        if server is None:
            up = make_upstream(config, self._config.upstream)
            self.upstreams[config.label] = up
            server = self.servers[config.label] = _Server(up)
        return server

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def collect(self) -> Iterator[Metric]:
        """The forwarder's metric families, then those of every upstream server."""
        f = self.stats
        yield CounterMetricFamily(
            "dnsproxy_coalesced",
            "Queries that joined an identical upstream query already in flight.",
            value=f.coalesced,
        )
        yield CounterMetricFamily(
            "dnsproxy_nxdomain_name_hits",
            "Misses answered by an NXDOMAIN cached for another type of the same name.",
            value=f.nxdomain_hits,
        )
        yield GaugeMetricFamily(
            "dnsproxy_inflight", "Distinct queries waiting for an upstream.", self.inflight
        )
        yield by_reason(
            "dnsproxy_forward_rejects",
            "Misses not forwarded, by reason (answered SERVFAIL or REFUSED).",
            {
                "max_inflight": f.inflight_rejects,
                "max_waiters": f.waiter_rejects,
                "no_zone": f.no_zone,
            },
        )
        yield CounterMetricFamily(
            "dnsproxy_upstream_servfail",
            "Resolutions that ended without a usable upstream reply (SERVFAIL sent).",
            value=f.servfail_sent,
        )
        for server in list(self.servers.values()):
            yield from server.collect()

    def zone_for(self, qname: bytes) -> Zone[_Server] | None:
        """Longest configured zone that contains the lowercased wire ``qname``."""
        zones = self._zones
        i = 0
        while True:
            zone = zones.get(qname[i:])
            if zone is not None:
                return zone
            length = qname[i]
            if length == 0:
                return None
            i += length + 1

    def submit(
        self, key: bytes, query: bytes, qend: int, deliver: Deliver, now: float = -1.0
    ) -> None:
        """Resolve the question of ``query`` (a cache miss) and call ``deliver`` once.

        ``now``: the monotonic clock, when the caller has just read it.
        """
        pending = self._inflight.get(key)
        if pending is not None:
            if len(pending.waiters) >= self._max_waiters:
                self.stats.waiter_rejects += 1
                deliver(self._synth(query, qend, key, wire.SERVFAIL))
                return
            self.stats.coalesced += 1
            pending.waiters.append(deliver)
            return
        if now < 0:
            now = time.monotonic()
        nx = self._cache.get_nxdomain(key, now)
        if nx is not None:
            self.stats.nxdomain_hits += 1
            deliver(nx)
            return
        # With only the root zone configured every name is in it: no suffix walk.
        zone = self._only_zone or self.zone_for(wire.key_qname(key))
        if zone is None:
            self.stats.no_zone += 1
            deliver(self._synth(query, qend, key, wire.REFUSED))
            return
        if len(self._inflight) >= self._max_inflight:
            self.stats.inflight_rejects += 1
            deliver(self._synth(query, qend, key, wire.SERVFAIL))
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        q = _Question(key, query[wire.HEADER_LEN : qend], zone, now)
        q.waiters = [deliver]
        q.request = None
        q.done = False
        self._inflight[key] = q
        self._next(q, now)

    async def resolve(self, key: bytes, query: bytes, qend: int) -> Entry:
        """Awaitable form of :meth:`submit`; cancelling it never cancels other waiters."""
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()

        def deliver(entry: Entry) -> None:
            if not future.done():
                future.set_result(entry)

        self.submit(key, query, qend, deliver)
        return await future

    def _synth(self, query: bytes, qend: int, key: bytes, rcode: int) -> Entry:
        body = wire.synth_body(query[wire.HEADER_LEN : qend], rcode, wire.key_flags(key)[1])
        return Entry(body, (), (), time.monotonic(), 0, SERVFAIL, rcode)

    def _next(self, q: _Question, now: float) -> None:
        """Start the next try, or finish when tries or time have run out."""
        server = q.next_try(now)
        if server is None:
            self._finish(q, self._failure(q, now))
            return
        q.request = server.upstream.send(
            q.query, q.timeout_s, partial(self._reply, q), q.question, now
        )

    def _reply(self, q: _Question, reply: bytes | None, error: UpstreamError | None) -> None:
        if q.done:
            return
        loop = self._loop  # set by the submit that started this question
        assert loop is not None
        now = loop.time()
        try:
            if reply is None:
                server = q.server
                assert server is not None
                log.debug("upstream %s failed: %s", server.label, error)
                if q.failed(isinstance(error, UpstreamBusy), now):
                    self._marked_down(server)
                self._next(q, now)
                return
            try:
                outcome = q.answered(reply, now)
            except wire.WireError as exc:
                server = q.server
                assert server is not None
                self.stats.bad_replies += 1
                log.debug("malformed reply from %s: %s", server.label, exc)
                if q.failed(False, now):
                    self._marked_down(server)
                self._next(q, now)
                return
            if outcome is None:
                self._next(q, now)
                return
            entry, cacheable = outcome
            if cacheable:
                self._cache.put(q.key, entry, now)
        except Exception:
            # A bug here must not leave clients waiting for ever.
            log.exception("resolution of %s failed", _describe(q.question))
            entry = self._servfail(q)
        self._finish(q, entry)

    def _failure(self, q: _Question, now: float) -> Entry:
        self.stats.servfail_sent += 1
        entry, cacheable = q.failure(now)
        if cacheable:
            self._cache.put(q.key, entry, now)
        return entry

    def _servfail(self, q: _Question) -> Entry:
        """A SERVFAIL to ``q``'s question, never cached."""
        query = b"\x00" * wire.HEADER_LEN + q.question
        return self._synth(query, len(query), q.key, wire.SERVFAIL)

    def _finish(self, q: _Question, entry: Entry) -> None:
        q.done = True
        q.request = None
        inflight = self._inflight
        if inflight.get(q.key) is q:
            del inflight[q.key]
        log_queries = self._log_queries
        if log_queries:
            self.answering = q.server.label if q.server is not None else None
        for deliver in q.waiters:
            try:
                deliver(entry)
            except Exception:
                log.exception("delivering an answer failed")
        if log_queries:
            self.answering = None

    # -- health probes

    def _marked_down(self, server: _Server) -> None:
        log.warning("upstream %s marked down; probing it", server.label)
        self._arm_probe(server)

    def _arm_probe(self, server: _Server) -> None:
        when = server.timer()
        if when is None or server.probe_timer is not None or self._closed:
            return
        loop = self._loop
        assert loop is not None
        server.probe_timer = loop.call_at(when, self._probe, server)

    def _probe(self, server: _Server) -> None:
        server.probe_timer = None
        loop = self._loop
        assert loop is not None
        probe = server.handle_timer(loop.time())
        if probe is None:
            self._arm_probe(server)  # the timer fired a little early, or the server is up
            return
        server.probe_request = server.upstream.send(
            probe, PROBE_TIMEOUT_S, partial(self._probed, server)
        )

    def _probed(self, server: _Server, reply: bytes | None, error: UpstreamError | None) -> None:
        server.probe_request = None
        loop = self._loop
        if self._closed or loop is None:
            return
        if server.probed(reply, loop.time()):
            log.warning("upstream %s answers again; marked up", server.label)
        self._arm_probe(server)

    # -- lifecycle

    def abandon(self) -> int:
        """Answer every question still in flight with SERVFAIL; how many there were.

        For the end of a shutdown, once the grace period is over: a client told
        SERVFAIL retries elsewhere at once, one left unanswered waits out its timeout.
        """
        pending = list(self._inflight.values())
        for q in pending:
            if q.request is not None:
                q.request.cancel()
            self.stats.servfail_sent += 1
            self._finish(q, self._servfail(q))
        return len(pending)

    async def close(self) -> None:
        """Forget every question in flight (unanswered), stop probing, close upstreams."""
        self._closed = True
        for q in list(self._inflight.values()):
            q.done = True
            if q.request is not None:
                q.request.cancel()
        self._inflight.clear()
        for server in self.servers.values():
            if server.probe_timer is not None:
                server.probe_timer.cancel()
                server.probe_timer = None
            if server.probe_request is not None:
                server.probe_request.cancel()
                server.probe_request = None
        for up in self.upstreams.values():
            await up.close()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight (True) or ``timeout_s`` passes (False)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while self._inflight:
            if loop.time() >= end:
                return False
            await asyncio.sleep(0.01)
        return True


def _describe(question: bytes) -> str:
    try:
        return wire.read_name(question, 0)
    except wire.WireError:
        return repr(question)
