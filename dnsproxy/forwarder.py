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

Besides: serving expired entries stale (RFC 8767) when the refresh fails, when the
client-response timer runs out first (one loop timer for every question, since they all
wait the same time), or while the name's refresh recheck timer holds; refreshing popular
entries before they expire (prefetch: a question with no waiters, started when the cache
reports an entry due); admitting or shedding each miss (:meth:`Forwarder.submit` is the
one place: beyond ``limits.max_inflight`` or while the listeners report a backlog, a
miss gets SERVFAIL at once, or its stale answer); and finding forwarding loops
(:meth:`Forwarder.find_loops`).

The interface to the upstreams is :meth:`~dnsproxy.upstream.Upstream.send` and the error
its callback gets: :class:`~dnsproxy.upstream.UpstreamBusy` (not sent, for a reason on
our side) says nothing about the server; any other error is a failed try at it. However
a pool connects, backs off or retries, health here depends on nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dnsproxy import wire
from dnsproxy.cache import SERVFAIL, Cache, Entry
from dnsproxy.config_types import Config, UpstreamConfig
from dnsproxy.errors import DnsproxyError
from dnsproxy.metrics import buckets, by_reason, labelled
from dnsproxy.resolution import (
    LATENCY_BUCKETS,
    PROBE_TIMEOUT_S,
    Resolution,
    ServerState,
    Zone,
)
from dnsproxy.upstream import (
    Callback,
    Request,
    Upstream,
    UpstreamBusy,
    UpstreamError,
    make_upstream,
)

__all__ = ["Deliver", "Forwarder", "ForwarderStats", "LoopError"]

log: Final = logging.getLogger(__name__)

Deliver = Callable[[Entry], None]

_TYPE_HINFO: Final = 13  # what a loop probe asks, as CoreDNS's loop plugin does
# A loop probe is "<loop id>.<random>.<zone> HINFO". Every process of one instance shares
# its loop id (workers, and a successor that took over the listeners), so whichever of
# them a probe comes back to answers it with this record, TTL 0, and the prober finds the
# record in the reply its upstream relays: a loop. Another dnsproxy further up, with an
# id of its own, forwards the probe as any name (a chain of proxies is no loop).
_LOOP_RDATA = b"\x08dnsproxy\x04loop"
_LOOP_RECORD = (
    b"\xc0\x0c"  # the question's name
    + _TYPE_HINFO.to_bytes(2, "big")
    + b"\x00\x01\x00\x00\x00\x00"  # IN, TTL 0
    + len(_LOOP_RDATA).to_bytes(2, "big")
    + _LOOP_RDATA
)


class LoopError(DnsproxyError):
    """Queries sent to an upstream come back to this proxy; ``problems`` says where."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(slots=True)
class ForwarderStats:
    coalesced: int = 0  # clients that joined a resolution already in flight
    nxdomain_hits: int = 0  # answered by an NXDOMAIN cached for another type of the name
    inflight_rejects: int = 0  # max_inflight reached: SERVFAIL
    overload_rejects: int = 0  # shed while the listeners fall behind: SERVFAIL
    waiter_rejects: int = 0  # max_waiters_per_query reached: SERVFAIL
    no_zone: int = 0  # name outside every configured zone: REFUSED
    servfail_sent: int = 0  # resolutions that ended without a usable reply
    bad_replies: int = 0  # replies that failed the wire walk
    stale_served: int = 0  # answers from expired entries (RFC 8767)
    prefetches: int = 0  # refreshes of popular entries started before their expiry
    prefetch_skipped: int = 0  # due but not refreshed: too many at once, or overloaded
    loop_probes_back: int = 0  # loop probes that came back to this proxy


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
    """One distinct question on its way upstream, and the clients waiting for it; the
    query of its tries (one object per question, none per try)."""

    __slots__ = ("done", "forwarder", "prefetch", "request", "stale_answer", "waiters")

    forwarder: Forwarder
    waiters: list[Deliver]
    request: Request | None  # the try in flight
    done: bool
    prefetch: bool  # a refresh nobody waits for
    stale_answer: Entry | None  # sent at the client-response timer; later joiners get it too

    def __init__(
        self,
        forwarder: Forwarder,
        key: bytes,
        question: bytes,
        zone: Zone[_Server],
        now: float,
        waiters: list[Deliver],
        *,
        prefetch: bool = False,
        stale: Entry | None = None,
    ) -> None:
        Resolution.__init__(self, key, question, zone, now, stale)
        self.forwarder = forwarder
        self.waiters = waiters
        self.request = None
        self.done = False
        self.prefetch = prefetch
        self.stale_answer = None

    def upstream_done(self, reply: bytes | None, error: UpstreamError | None, now: float) -> None:
        """The outcome of the try in flight: the answer for the waiters (cached when it
        may be), or the next try. Here rather than in the forwarder: one call less per
        reply."""
        if self.done:
            return
        f = self.forwarder
        try:
            if reply is None:
                server = self.server
                assert server is not None
                log.debug("upstream %s failed: %s", server.label, error)
                if self.failed(isinstance(error, UpstreamBusy), now):
                    f._marked_down(server)
                f._next(self, now)
                return
            try:
                outcome = self.answered(reply, now)
            except wire.WireError as exc:
                server = self.server
                assert server is not None
                f.stats.bad_replies += 1
                log.debug("malformed reply from %s: %s", server.label, exc)
                if self.failed(False, now):
                    f._marked_down(server)
                f._next(self, now)
                return
            if outcome is None:
                f._next(self, now)
                return
            entry, cacheable = outcome
            if cacheable:
                f._cache.put(self.key, entry, now)
        except Exception:
            # A bug here must not leave clients waiting for ever.
            log.exception("resolution of %s failed", _describe(self.question))
            entry = f._servfail(self)
        f._finish(self, entry)


class Forwarder:
    """Resolves cache misses through the configured zones' upstreams.

    Used by the server (:meth:`submit`) and the app (:meth:`drain`, :meth:`abandon`,
    :meth:`close`, :attr:`inflight`); :meth:`collect` is its metrics source.
    """

    def __init__(
        self,
        config: Config,
        cache: Cache,
        replacing: Forwarder | None = None,
        loop_id: str | None = None,
    ) -> None:
        """``replacing``: the forwarder this one takes over from on a reload; the servers
        both have go on counting in its counters (see :meth:`_server`), and its loop id
        stays. ``loop_id``: otherwise the instance's (see :attr:`loop_id`); a new one when
        None."""
        self.config = config
        self._cache = cache
        self._max_inflight = config.limits.max_inflight
        self._max_waiters = config.limits.max_waiters_per_query
        self.stats = ForwarderStats()
        self.upstreams: dict[str, Upstream] = {}
        self.servers: dict[str, _Server] = {}
        self._zones: dict[bytes, Zone[_Server]] = {}
        stale = config.cache_serve_stale
        self._ede = stale.ede
        before = replacing.servers if replacing is not None else {}
        for zone in config.zones:
            servers = [self._server(u, before.get(u.label)) for u in zone.upstreams]
            self._zones[wire.name_to_wire(zone.zone)] = Zone(zone, servers, stale=stale)
        self._only_zone = self._zones.get(b"\x00") if len(self._zones) == 1 else None
        self._inflight: dict[bytes, _Question] = {}
        # Set by a UDP listener for the batch it reads while its queue is too old: the
        # misses of that batch are shed. shedding_until (monotonic) is when the last
        # listener that shed stops shedding at once; prefetch waits for it.
        self.overloaded = False
        self.shedding_until = -1.0
        # Questions with a stale answer ready, in the order their client-response timers
        # run out (they all wait the same time): one loop timer serves them all.
        self._stale_due: OrderedDict[bytes, _Question] = OrderedDict()
        self._stale_timer: asyncio.TimerHandle | None = None
        # Prefetch: entries the cache reported due, refreshed at the next loop turn.
        self._prefetch_max = config.cache_prefetch.max_inflight
        self._prefetching = 0
        self._due: list[Entry] = []
        self._due_handle: asyncio.Handle | None = None
        cache.prefetch_min_hits = config.cache_prefetch.min_hits
        cache.on_due = self._refresh_due
        if replacing is not None:
            loop_id = replacing.loop_id
        self.loop_id = loop_id or secrets.token_hex(8)
        # The upstream whose reply (or failure) is being delivered, for the query log
        # lines written inside the deliver callbacks; None outside a delivery. Kept only
        # when queries are logged.
        self.answering: str | None = None
        self._log_queries = config.log.queries
        # The running loop, taken at the first miss: asyncio.get_running_loop() makes a
        # getpid() system call on every use (its fork check), several per miss.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _server(self, config: UpstreamConfig, before: _Server | None) -> _Server:
        server = self.servers.get(config.label)
        if server is None:
            # A server the replaced forwarder had keeps its counters (a Prometheus counter
            # must not go back for the same labels); its health starts afresh.
            previous = before.upstream if before is not None else None
            up = make_upstream(config, self.config.upstream, previous)
            self.upstreams[config.label] = up
            server = self.servers[config.label] = _Server(up)
            if before is not None:
                server.count_on(before)
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
            "Misses not forwarded, by reason (answered SERVFAIL, or stale where an expired "
            "answer is at hand; REFUSED for no_zone; loop: a loop probe that came back, answered "
            "with the loop record).",
            {
                "max_inflight": f.inflight_rejects,
                "overload": f.overload_rejects,
                "max_waiters": f.waiter_rejects,
                "no_zone": f.no_zone,
                "loop": f.loop_probes_back,
            },
        )
        yield CounterMetricFamily(
            "dnsproxy_upstream_servfail",
            "Resolutions that ended without a usable upstream reply (SERVFAIL sent).",
            value=f.servfail_sent,
        )
        yield CounterMetricFamily(
            "dnsproxy_cache_served_stale",
            "Answers served from expired entries (RFC 8767), with TTL 30.",
            value=f.stale_served,
        )
        yield CounterMetricFamily(
            "dnsproxy_cache_prefetch",
            "Refreshes of popular entries started in the last tenth of their TTL.",
            value=f.prefetches,
        )
        yield CounterMetricFamily(
            "dnsproxy_cache_prefetch_skipped",
            "Entries due for a refresh and left to expire: too many refreshes at once, "
            "queries in flight at their limit, or the listeners falling behind.",
            value=f.prefetch_skipped,
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
        stats = self.stats
        pending = self._inflight.get(key)
        if pending is not None:
            if pending.stale_answer is not None:
                # Its client-response timer has run out: no more waiting for the refresh.
                stats.stale_served += 1
                deliver(pending.stale_answer)
                return
            if len(pending.waiters) >= self._max_waiters:
                stats.waiter_rejects += 1
                deliver(self._synth(query, qend, key, wire.SERVFAIL))
                return
            stats.coalesced += 1
            pending.waiters.append(deliver)
            return
        if now < 0:
            now = time.monotonic()
        cache = self._cache
        nx = cache.get_nxdomain(key, now)
        if nx is not None:
            stats.nxdomain_hits += 1
            deliver(nx)
            return
        # A loop probe asks HINFO (the low byte of the key's qtype), which clients hardly
        # do: one index and compare per miss, and the prefix test only for those.
        if key[-4] == 13 and key.startswith(self._loop_prefix):
            self.stats.loop_probes_back += 1
            deliver(self._came_back(query, qend, key))
            return
        # With only the root zone configured every name is in it: no suffix walk.
        zone = self._only_zone or self.zone_for(wire.key_qname(key))
        if zone is None:
            stats.no_zone += 1
            deliver(self._synth(query, qend, key, wire.REFUSED))
            return
        stale = cache.store.get(key)  # a miss: expired or absent
        if stale is not None:
            stale = zone.stale_candidate(stale, now)
            if stale is not None and zone.stale_held(stale, now):
                # Its refresh failed less than 30 s ago: answer stale, do not ask again.
                cache.store.move_to_end(key)
                stats.stale_served += 1
                deliver(stale.stale_copy(now, self._ede))
                return
        if self.overloaded or len(self._inflight) >= self._max_inflight:
            # Shed before any work upstream: a stale answer if there is one, else SERVFAIL
            # (not cached), which a client acts on at once; see the README on overload.
            if self.overloaded:
                stats.overload_rejects += 1
            else:
                stats.inflight_rejects += 1
            if stale is not None:
                stats.stale_served += 1
                deliver(stale.stale_copy(now, self._ede))
            else:
                deliver(self._synth(query, qend, key, wire.SERVFAIL))
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        q = _Question(self, key, query[wire.HEADER_LEN : qend], zone, now, [deliver], stale=stale)
        self._inflight[key] = q
        if stale is not None:
            self._stale_due[key] = q
            if self._stale_timer is None:
                self._arm_stale(q.stale_at)
        self._next(q, now)

    async def resolve(self, key: bytes, query: bytes, qend: int) -> Entry:
        """Awaitable form of :meth:`submit`; cancelling it never cancels other waiters."""
        future: asyncio.Future[Entry] = asyncio.get_running_loop().create_future()

        def deliver(entry: Entry) -> None:
            if not future.done():
                future.set_result(entry)

        self.submit(key, query, qend, deliver)
        return await future

    @property
    def loop_id(self) -> str:
        """The first label of this instance's loop probes (16 hex digits), shared by all
        its processes: any of them answers a probe of another as one of its own."""
        return self._loop_prefix[1:].decode()

    @loop_id.setter
    def loop_id(self, value: str) -> None:
        self._loop_prefix = b"\x10" + value.lower().encode()

    def _came_back(self, query: bytes, qend: int, key: bytes) -> Entry:
        """The answer to a loop probe that came back: the marking record, not cached."""
        body = self._synth(query, qend, key, wire.NOERROR).body
        body = body[:6] + b"\x00\x01" + body[8:] + _LOOP_RECORD
        return Entry(body, (), (), time.monotonic(), 0, SERVFAIL, wire.NOERROR)

    def _synth(self, query: bytes, qend: int, key: bytes, rcode: int) -> Entry:
        body = wire.synth_body(query[wire.HEADER_LEN : qend], rcode, wire.key_flags(key)[1])
        return Entry(body, (), (), time.monotonic(), 0, SERVFAIL, rcode)

    def _next(self, q: _Question, now: float) -> None:
        """Start the next try, or finish when tries or time have run out."""
        server = q.next_try(now)
        if server is None:
            self._finish(q, self._failure(q, now))
            return
        q.request = server.upstream.send(q, q.timeout_s, now)

    def _failure(self, q: _Question, now: float) -> Entry:
        entry, cacheable = q.failure(now)
        if q.stale is not None:
            self.stats.stale_served += len(q.waiters)
        elif not q.prefetch:
            self.stats.servfail_sent += 1
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
        key = q.key
        if inflight.get(key) is q:
            del inflight[key]
        if q.stale is not None and self._stale_due.get(key) is q:
            del self._stale_due[key]
        if q.prefetch:
            self._prefetching -= 1
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
            if server.up:
                # A real query's reply marked it up since (not logged on the reply path).
                log.warning("upstream %s answers queries again; marked up", server.label)
            self._arm_probe(server)  # the timer fired a little early, or the server is up
            return
        server.probe_request = server.upstream.probe(
            Callback(probe, partial(self._probed, server)), PROBE_TIMEOUT_S
        )

    def _probed(self, server: _Server, reply: bytes | None, error: UpstreamError | None) -> None:
        server.probe_request = None
        loop = self._loop
        if self._closed or loop is None:
            return
        if server.probed(reply, loop.time(), isinstance(error, UpstreamBusy)):
            log.warning("upstream %s answers again; marked up", server.label)
        self._arm_probe(server)

    # -- serve-stale: the client-response timer

    def _arm_stale(self, when: float) -> None:
        loop = self._loop
        assert loop is not None
        self._stale_timer = loop.call_at(when, self._stale_timers)

    def _stale_timers(self) -> None:
        """Hand the stale answer to the waiters of every question whose timer ran out."""
        self._stale_timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        due = self._stale_due
        while due:
            key, q = next(iter(due.items()))
            when = q.timer()
            if when is not None and when > now:
                self._arm_stale(when)
                return
            del due[key]
            entry = q.handle_timer(now)
            if entry is None or q.done:
                continue
            q.stale_answer = entry
            waiters, q.waiters = q.waiters, []
            self.stats.stale_served += len(waiters)
            for deliver in waiters:
                try:
                    deliver(entry)
                except Exception:
                    log.exception("delivering an answer failed")

    # -- prefetch

    def _refresh_due(self, entry: Entry) -> None:
        """The cache's report that ``entry`` is popular and near its expiry (from the hit
        path: only noted here, refreshed at the next turn of the loop)."""
        self._due.append(entry)
        if self._due_handle is None and not self._closed:
            if self._loop is None:  # no miss yet: the entries came with a handover
                self._loop = asyncio.get_running_loop()
            self._due_handle = self._loop.call_soon(self._prefetch)

    def _prefetch(self) -> None:
        self._due_handle = None
        due, self._due = self._due, []
        now = time.monotonic()
        store = self._cache.store
        for entry in due:
            key = entry.key
            if store.get(key) is not entry or entry.expires_at <= now or key in self._inflight:
                continue  # replaced, expired or being asked already: nothing to refresh
            if (
                self._prefetching >= self._prefetch_max
                or len(self._inflight) >= self._max_inflight
                or now < self.shedding_until
            ):
                self.stats.prefetch_skipped += 1
                continue
            zone = self._only_zone or self.zone_for(wire.key_qname(key))
            if zone is None:
                continue
            body = entry.body
            try:
                question = body[wire.HEADER_LEN : wire.question_end(body)]
            except wire.WireError:
                continue
            q = _Question(self, key, question, zone, now, [], prefetch=True)
            self._inflight[key] = q
            self._prefetching += 1
            self.stats.prefetches += 1
            self._next(q, now)

    # -- loop detection

    async def find_loops(self) -> list[str]:
        """Send ``<loop id>.<random>.<zone> HINFO`` to every upstream of every zone, as
        CoreDNS's ``loop`` plugin does, and see whether it comes back to this instance.

        A probe that reaches any process of the instance (this one, a worker, the
        instance it is taking over from) is answered with the loop record, which comes
        back in the upstream's reply. Each probe waits for its upstream's answer (or the
        zone's ``deadline_s``). Returns one problem line per zone and upstream that loops,
        naming both; an upstream that does not answer is not a loop (it may be down for
        now).
        """
        probes: list[tuple[str, str, bytes]] = []
        sends = []
        for zone in self._zones.values():
            suffix = wire.name_to_wire(zone.config.zone)
            for server in zone.servers:
                qname = self._loop_prefix + b"\x10" + secrets.token_hex(8).encode() + suffix
                probes.append((zone.config.zone, server.label, qname))
                query = (
                    secrets.token_bytes(2)
                    + b"\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
                    + qname
                    + _TYPE_HINFO.to_bytes(2, "big")
                    + b"\x00\x01"
                )
                sends.append(server.upstream.query(query, zone.config.deadline_s))
        replies = await asyncio.gather(*sends, return_exceptions=True)
        return [
            f"zone {zone}: upstream {label} sends queries back to this proxy "
            f"(a probe for {wire.read_name(qname, 0)} HINFO came back): a forwarding loop"
            for (zone, label, qname), reply in zip(probes, replies, strict=True)
            if isinstance(reply, bytes) and _LOOP_RDATA in reply
        ]

    # -- lifecycle

    def abandon(self) -> int:
        """Answer every question still in flight with SERVFAIL (or its stale answer); how
        many there were.

        For the end of a shutdown, once the grace period is over: a client told
        SERVFAIL retries elsewhere at once, one left unanswered waits out its timeout.
        """
        pending = list(self._inflight.values())
        for q in pending:
            if q.request is not None:
                q.request.cancel()
            if q.stale is not None:
                self.stats.stale_served += len(q.waiters)
                self._finish(q, q.stale.stale_copy(time.monotonic(), self._ede))
                continue
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
        self._stale_due.clear()
        for handle in (self._stale_timer, self._due_handle):
            if handle is not None:
                handle.cancel()
        self._stale_timer = self._due_handle = None
        self._due.clear()
        if self._cache.on_due == self._refresh_due:
            self._cache.on_due = None
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
