"""Cache misses: zone selection, coalescing, upstream choice and failover, deadlines.

One task per distinct cache key in flight; every client asking the same question while it
runs is added as a waiter and answered from the same result. The outcome is always an
entry (a real reply, or a synthesized SERVFAIL/REFUSED), never silence.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from dnsproxy import wire
from dnsproxy.cache import SERVFAIL, Cache, Entry, make_entry, servfail_entry
from dnsproxy.config import Config, UpstreamConfig, ZoneConfig
from dnsproxy.upstream import Request, Upstream, UpstreamBusy, UpstreamError, make_upstream

log = logging.getLogger(__name__)

Deliver = Callable[[Entry], None]

# A server that failed this many times in a row is marked down: tried only after the
# healthy ones, and probed with ". IN NS" every _PROBE_INTERVAL_S until it answers.
_MAX_FAILS = 2
_PROBE_INTERVAL_S = 0.5
_PROBE_TIMEOUT_S = 1.0
_PROBE_QUERY = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01"

# Upstream rcodes that mean "this server could not answer": try the next one, and if
# none does better, the client gets SERVFAIL (never a FORMERR for its valid query).
_TRY_NEXT_RCODES = frozenset((wire.FORMERR, wire.SERVFAIL, wire.NOTIMP, wire.REFUSED))

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class ForwarderStats:
    coalesced: int = 0  # clients that joined a resolution already in flight
    nxdomain_hits: int = 0  # answered by an NXDOMAIN cached for another type of the name
    inflight_rejects: int = 0  # max_inflight reached: SERVFAIL
    waiter_rejects: int = 0  # max_waiters_per_query reached: SERVFAIL
    no_zone: int = 0  # name outside every configured zone: REFUSED
    servfail_sent: int = 0  # resolutions that ended without a usable reply
    bad_replies: int = 0  # replies that failed the wire walk


class LatencyHistogram:
    """Latency in buckets (upper bounds ``bounds``): plain ints, exported at scrape time.

    prometheus_client's Histogram takes a lock and does several calls per observation;
    this one is only touched from the event loop thread, so a list of ints will do.
    """

    __slots__ = ("bounds", "counts", "total_s")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.total_s += seconds

    def observe_many(self, seconds: float, n: int) -> None:
        """Record ``n`` observations of the same duration (one batch of queries)."""
        self.counts[bisect_left(self.bounds, seconds)] += n
        self.total_s += seconds * n

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus histograms expose them, ``+Inf`` last."""
        # One copy, so that a scrape from the HTTP thread sees consistent buckets.
        counts = self.counts.copy()
        out: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self.bounds, counts, strict=False):
            total += n
            out.append((str(float(bound)), float(total)))
        out.append(("+Inf", float(total + counts[-1])))
        return out


@dataclass(slots=True)
class _Server:
    """Health of one upstream server, shared by every zone that uses it."""

    upstream: Upstream
    latency: LatencyHistogram
    fails: int = 0
    probe: asyncio.Task[None] | None = None
    probe_failures: int = 0
    # Valid replies by rcode (the header's 4 bits).
    rcodes: list[int] = field(default_factory=lambda: [0] * 16)

    @property
    def up(self) -> bool:
        return self.fails < _MAX_FAILS


@dataclass(slots=True)
class _Zone:
    config: ZoneConfig
    servers: list[_Server]
    next_index: int = 0

    def order(self) -> list[_Server]:
        servers = self.servers
        if len(servers) == 1:
            return servers
        policy = self.config.policy
        if policy == "random":
            servers = random.sample(servers, len(servers))
        elif policy == "round_robin":
            i = self.next_index % len(servers)
            self.next_index = i + 1
            servers = servers[i:] + servers[:i]
        if all(s.fails < _MAX_FAILS for s in servers):
            return servers
        return [s for s in servers if s.up] + [s for s in servers if not s.up]


class _Resolution:
    """One distinct question on its way upstream, and the clients waiting for it.

    Driven by callbacks, not a task: each attempt hands the query to an upstream with
    :meth:`Upstream.send`, whose callback either finishes the resolution or starts the
    next attempt. A miss then costs no task, no coroutine and no extra loop turn.
    """

    __slots__ = (
        "attempt",
        "deadline",
        "done",
        "key",
        "last",
        "local_failure",
        "order",
        "query",
        "question",
        "request",
        "server",
        "started",
        "waiters",
        "zone",
    )

    def __init__(self, key: bytes, question: bytes, zone: _Zone, deliver: Deliver) -> None:
        self.key = key
        self.question = question
        self.zone = zone
        self.waiters = [deliver]
        self.query = wire.upstream_query(key, question)
        self.order = zone.order()
        self.attempt = 0
        self.deadline = 0.0
        self.last: wire.ResponseInfo | None = None
        self.server: _Server | None = None
        self.started = 0.0
        self.request: Request | None = None
        self.done = False
        self.local_failure = False


class Forwarder:
    def __init__(self, config: Config, cache: Cache) -> None:
        self._config = config
        self._cache = cache
        self._max_inflight = config.limits.max_inflight
        self._max_waiters = config.limits.max_waiters_per_query
        self.stats = ForwarderStats()
        self.upstreams: dict[str, Upstream] = {}
        self.servers: dict[str, _Server] = {}
        self._zones: dict[bytes, _Zone] = {}
        for zone in config.zones:
            servers = [self._server(u) for u in zone.upstreams]
            self._zones[wire.name_to_wire(zone.zone)] = _Zone(zone, servers)
        self._only_zone = self._zones.get(b"\x00") if len(self._zones) == 1 else None
        # The upstream whose reply (or failure) is being delivered, for the query log
        # lines written inside the deliver callbacks; None outside a delivery. Kept only
        # when queries are logged.
        self.answering: str | None = None
        self._log_queries = config.log.queries
        self._inflight: dict[bytes, _Resolution] = {}
        # The running loop, taken at the first miss: asyncio.get_running_loop() makes a
        # getpid() system call on every use (its fork check), several per miss.
        self._loop: asyncio.AbstractEventLoop | None = None

    def _server(self, config: UpstreamConfig) -> _Server:
        server = self.servers.get(config.label)
        if server is None:
            up = make_upstream(config, self._config.upstream)
            self.upstreams[config.label] = up
            server = self.servers[config.label] = _Server(up, LatencyHistogram())
        return server

    def _failed(self, server: _Server) -> None:
        server.fails += 1
        if server.fails >= _MAX_FAILS and server.probe is None:
            log.warning("upstream %s marked down; probing it", server.upstream.label)
            server.probe = asyncio.get_running_loop().create_task(self._probe(server))

    async def _probe(self, server: _Server) -> None:
        """Ask ". IN NS" until the server answers, then mark it up again."""
        up = server.upstream
        try:
            while not server.up:
                try:
                    reply = await up.query(_PROBE_QUERY, _PROBE_TIMEOUT_S)
                    if wire.inspect_response(reply).rcode in _TRY_NEXT_RCODES:
                        raise wire.WireError("probe answered with an error rcode")
                except (UpstreamError, wire.WireError):
                    server.probe_failures += 1
                    await asyncio.sleep(_PROBE_INTERVAL_S)
                    continue
                server.fails = 0
                log.warning("upstream %s answers again; marked up", up.label)
        finally:
            server.probe = None

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def zone_for(self, qname: bytes) -> _Zone | None:
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
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        resolution = _Resolution(key, query[wire.HEADER_LEN : qend], zone, deliver)
        resolution.deadline = loop.time() + zone.config.deadline_s
        self._inflight[key] = resolution
        self._next(resolution)

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

    def _next(self, r: _Resolution) -> None:
        """Start the next attempt, or finish when attempts or time have run out."""
        order = r.order
        # Every server once, and at least two tries in all, within the deadline.
        if r.attempt < 2 or r.attempt < len(order):
            loop = self._loop  # set by the submit that started this resolution
            assert loop is not None
            now = loop.time()
            remaining = r.deadline - now
            if remaining > 0:
                server = order[r.attempt % len(order)]
                r.attempt += 1
                r.server = server
                r.started = now
                timeout = r.zone.config.try_timeout_s
                if remaining < timeout:
                    timeout = remaining
                r.request = server.upstream.send(
                    r.query, timeout, partial(self._reply, r), r.question
                )
                return
        self._finish(r, self._failure(r))

    def _reply(self, r: _Resolution, reply: bytes | None, error: UpstreamError | None) -> None:
        if r.done:
            return
        try:
            server = r.server
            assert server is not None
            if error is not None or reply is None:
                log.debug("upstream %s failed: %s", server.upstream.label, error)
                if isinstance(error, UpstreamBusy):
                    r.local_failure = True  # our pool, not the server: its health stands
                else:
                    self._failed(server)
                self._next(r)
                return
            loop = self._loop
            assert loop is not None
            server.latency.observe(loop.time() - r.started)
            try:
                # The upstream checked that the reply's question is ours.
                info = wire.inspect_response(reply, wire.HEADER_LEN + len(r.question))
            except wire.WireError as exc:
                self.stats.bad_replies += 1
                log.debug("malformed reply from %s: %s", server.upstream.label, exc)
                self._failed(server)
                self._next(r)
                return
            server.fails = 0
            server.rcodes[info.rcode] += 1
            if info.rcode in _TRY_NEXT_RCODES:
                # Another server of the group may do better; keep this one as a fallback.
                r.last = info
                self._next(r)
                return
            now = time.monotonic()
            entry, cacheable = make_entry(info, r.zone.config.cache, now)
            if cacheable:
                self._cache.put(r.key, entry, now)
        except Exception:
            # A bug here must not leave clients waiting for ever.
            log.exception("resolution of %s failed", _describe(r.question))
            entry = self._servfail(r)
        self._finish(r, entry)

    def _servfail(self, r: _Resolution) -> Entry:
        """A SERVFAIL to ``r``'s question, never cached."""
        query = b"\x00" * wire.HEADER_LEN + r.question
        return self._synth(query, len(query), r.key, wire.SERVFAIL)

    def abandon(self) -> int:
        """Answer every question still in flight with SERVFAIL; how many there were.

        For the end of a shutdown, once the grace period is over: a client told
        SERVFAIL retries elsewhere at once, one left unanswered waits out its timeout.
        """
        pending = list(self._inflight.values())
        for r in pending:
            if r.request is not None:
                r.request.cancel()
            self.stats.servfail_sent += 1
            self._finish(r, self._servfail(r))
        return len(pending)

    def _failure(self, r: _Resolution) -> Entry:
        """The answer when no server gave a usable one: the last SERVFAIL/REFUSED or ours."""
        self.stats.servfail_sent += 1
        policy = r.zone.config.cache
        now = time.monotonic()
        if r.last is not None and r.last.rcode in (wire.SERVFAIL, wire.REFUSED):
            entry, cacheable = make_entry(r.last, policy, now)
        else:
            # Our own SERVFAIL: upstream FORMERR/NOTIMP to a valid query is our problem to
            # report, not the client's. Cached like an upstream SERVFAIL so that a dead
            # upstream is not asked again for every retry, unless the cause was local.
            cd = wire.key_flags(r.key)[1]
            body = wire.synth_body(r.question, wire.SERVFAIL, cd)
            entry = servfail_entry(body, (), (), policy, now)
            cacheable = policy.servfail_ttl_s > 0 and not r.local_failure
        if cacheable:
            self._cache.put(r.key, entry, now)
        return entry

    def _finish(self, r: _Resolution, entry: Entry) -> None:
        r.done = True
        r.request = None
        inflight = self._inflight
        if inflight.get(r.key) is r:
            del inflight[r.key]
        log_queries = self._log_queries
        if log_queries:
            self.answering = r.server.upstream.label if r.server is not None else None
        for deliver in r.waiters:
            try:
                deliver(entry)
            except Exception:
                log.exception("delivering an answer failed")
        if log_queries:
            self.answering = None

    async def close(self) -> None:
        for r in list(self._inflight.values()):
            r.done = True
            if r.request is not None:
                r.request.cancel()
        self._inflight.clear()
        probes = [s.probe for s in self.servers.values() if s.probe is not None]
        for task in probes:
            task.cancel()
        if probes:
            await asyncio.gather(*probes, return_exceptions=True)
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
