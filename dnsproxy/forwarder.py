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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dnsproxy import wire
from dnsproxy.cache import Cache, Entry, make_entry, servfail_entry
from dnsproxy.config import Config, UpstreamConfig, ZoneConfig
from dnsproxy.upstream import Upstream, UpstreamError, UpstreamTimeout, make_upstream

log = logging.getLogger(__name__)

Deliver = Callable[[Entry], None]

# A server that failed this many times in a row is marked down: tried only after the
# healthy ones, and probed with ". IN NS" every _PROBE_INTERVAL_S until it answers.
_MAX_FAILS = 2
_PROBE_INTERVAL_S = 0.5
_PROBE_TIMEOUT_S = 1.0
_PROBE_QUERY = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(slots=True)
class ForwarderStats:
    upstream_misses: int = 0  # distinct upstream resolutions started
    coalesced: int = 0  # clients that joined a resolution already in flight
    nxdomain_hits: int = 0  # answered by an NXDOMAIN cached for another type of the name
    inflight_rejects: int = 0  # max_inflight reached: SERVFAIL
    waiter_rejects: int = 0  # max_waiters_per_query reached: SERVFAIL
    no_zone: int = 0  # name outside every configured zone: REFUSED
    servfail_sent: int = 0  # resolutions that ended without a usable reply
    bad_replies: int = 0  # replies that failed the wire walk


class LatencyHistogram:
    """Upstream reply latency in buckets: plain ints, exported at scrape time.

    prometheus_client's Histogram takes a lock and does several calls per observation;
    this one is only touched from the event loop thread, so a list of ints will do.
    """

    __slots__ = ("counts", "total_s")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)  # the last one is +Inf
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total_s += seconds


@dataclass(slots=True)
class _Server:
    """Health of one upstream server, shared by every zone that uses it."""

    upstream: Upstream
    latency: LatencyHistogram
    fails: int = 0
    probe: asyncio.Task[None] | None = None
    probe_failures: int = 0

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
        policy = self.config.policy
        if policy == "random":
            servers = random.sample(servers, len(servers))
        elif policy == "round_robin":
            i = self.next_index % len(servers)
            self.next_index = i + 1
            servers = servers[i:] + servers[:i]
        healthy = [s for s in servers if s.up]
        if len(healthy) == len(servers):
            return servers
        return healthy + [s for s in servers if not s.up]


class _Pending:
    __slots__ = ("task", "waiters")

    def __init__(self, deliver: Deliver) -> None:
        self.waiters = [deliver]
        self.task: asyncio.Task[None] | None = None


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
        self._inflight: dict[bytes, _Pending] = {}

    def _server(self, config: UpstreamConfig) -> _Server:
        server = self.servers.get(config.label)
        if server is None:
            up = make_upstream(config, self._config.upstream)
            self.upstreams[config.label] = up
            server = self.servers[config.label] = _Server(up, LatencyHistogram())
        return server

    def _failed(self, server: _Server) -> None:
        server.fails += 1
        if server.fails == _MAX_FAILS and server.probe is None:
            log.warning("upstream %s marked down; probing it", server.upstream.label)
            server.probe = asyncio.get_running_loop().create_task(self._probe(server))

    async def _probe(self, server: _Server) -> None:
        """Ask ". IN NS" until the server answers, then mark it up again."""
        up = server.upstream
        try:
            while not server.up:
                try:
                    reply = await up.query(_PROBE_QUERY, _PROBE_TIMEOUT_S)
                    wire.inspect_response(reply)
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
        for suffix in wire.label_suffixes(qname):
            zone = zones.get(suffix)
            if zone is not None:
                return zone
        return None

    def submit(self, key: bytes, query: bytes, qend: int, deliver: Deliver) -> None:
        """Resolve the question of ``query`` (a cache miss) and call ``deliver`` once."""
        pending = self._inflight.get(key)
        if pending is not None:
            if len(pending.waiters) >= self._max_waiters:
                self.stats.waiter_rejects += 1
                deliver(self._synth(query, qend, key, wire.SERVFAIL))
                return
            self.stats.coalesced += 1
            pending.waiters.append(deliver)
            return
        now = time.monotonic()
        nx = self._cache.get_nxdomain(key, now)
        if nx is not None:
            self.stats.nxdomain_hits += 1
            deliver(nx)
            return
        zone = self.zone_for(key[:-5])
        if zone is None:
            self.stats.no_zone += 1
            deliver(self._synth(query, qend, key, wire.REFUSED))
            return
        if len(self._inflight) >= self._max_inflight:
            self.stats.inflight_rejects += 1
            deliver(self._synth(query, qend, key, wire.SERVFAIL))
            return
        self.stats.upstream_misses += 1
        pending = _Pending(deliver)
        self._inflight[key] = pending
        pending.task = asyncio.get_running_loop().create_task(
            self._run(key, query[wire.HEADER_LEN : qend], zone, pending)
        )

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
        return Entry(body, (), (), time.monotonic(), 0, 2, rcode)

    async def _run(self, key: bytes, question: bytes, zone: _Zone, pending: _Pending) -> None:
        try:
            entry = await self._resolve(key, question, zone)
        except Exception:
            log.exception("resolution of %s failed", _describe(question))
            entry = self._synth(b"\x00" * wire.HEADER_LEN + question, 12 + len(question), key, 2)
        finally:
            del self._inflight[key]
        for deliver in pending.waiters:
            try:
                deliver(entry)
            except Exception:
                log.exception("delivering an answer failed")

    async def _resolve(self, key: bytes, question: bytes, zone: _Zone) -> Entry:
        do, cd = wire.key_flags(key)
        query = wire.upstream_query(question, cd, do)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + zone.config.deadline_s
        policy = zone.config.cache
        last: wire.ResponseInfo | None = None
        for server in _attempts(zone):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            up = server.upstream
            started = loop.time()
            try:
                reply = await up.query(query, min(zone.config.try_timeout_s, remaining))
            except UpstreamTimeout:
                self._failed(server)
                continue
            except UpstreamError as exc:
                log.debug("upstream %s failed: %s", up.label, exc)
                self._failed(server)
                continue
            server.latency.observe(loop.time() - started)
            try:
                info = wire.inspect_response(reply)
            except wire.WireError as exc:
                self.stats.bad_replies += 1
                log.debug("malformed reply from %s: %s", up.label, exc)
                self._failed(server)
                continue
            server.fails = 0
            if info.rcode in (wire.SERVFAIL, wire.REFUSED):
                # Another server of the group may do better; keep this one as a fallback.
                last = info
                continue
            now = time.monotonic()
            entry, cacheable = make_entry(info, policy, now)
            if cacheable:
                self._cache.put(key, entry, now)
            return entry
        self.stats.servfail_sent += 1
        now = time.monotonic()
        if last is not None:
            entry, cacheable = make_entry(last, policy, now)
        else:
            body = wire.synth_body(question, wire.SERVFAIL, cd)
            entry, cacheable = servfail_entry(body, (), (), policy, now), policy.servfail_ttl_s > 0
        if cacheable:
            self._cache.put(key, entry, now)
        return entry

    async def close(self) -> None:
        tasks = [p.task for p in self._inflight.values() if p.task is not None]
        tasks += [s.probe for s in self.servers.values() if s.probe is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for up in self.upstreams.values():
            await up.close()

    async def drain(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight (True) or ``timeout_s`` passes (False)."""
        tasks = [p.task for p in self._inflight.values() if p.task is not None]
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout_s)
        return not pending


def _attempts(zone: _Zone) -> Iterator[_Server]:
    """Servers to try in order: every server once, and at least two tries in all."""
    order = zone.order()
    total = max(2, len(order))
    for i in range(total):
        yield order[i % len(order)]


def _describe(question: bytes) -> str:
    try:
        return wire.read_name(question, 0)
    except wire.WireError:
        return repr(question)
