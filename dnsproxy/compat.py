"""The CoreDNS / NodeLocal DNSCache metric names (``metrics.coredns_names``).

A metrics source like the components' own: it reads the counters the server, the cache,
the forwarder and the node manager already keep, at scrape time, so nothing is counted
twice and nothing is added to the query paths. The names carry the labels node-cache's
dashboards group by where dnsproxy knows the value (``proto``, ``type``, ``rcode``, ``to``,
``errortype``); labels it cannot fill honestly (``server``, ``zone``, ``view``, ``family``)
are left out, so a ``sum by (zone)`` yields one series instead of made-up ones.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dnsproxy import __version__
from dnsproxy.cache import NEGATIVE, POSITIVE, SERVFAIL, Cache
from dnsproxy.config import HostPort
from dnsproxy.forwarder import Forwarder
from dnsproxy.metrics import buckets, qtype_name, rcode_name
from dnsproxy.node import NodeManager
from dnsproxy.server import REQUEST_DURATION_HELP, DnsServer


class CoreDnsNames:
    """The metric names of CoreDNS, read from the counters of the part that answers
    queries (the node-cache names are :class:`NodeCacheNames`).

    SERVFAIL entries count as ``denial``, where CoreDNS's cache keeps them too. ``parts``
    gives the cache and forwarder in use (a reload replaces them).
    """

    def __init__(self, server: DnsServer, parts: Callable[[], tuple[Cache, Forwarder]]) -> None:
        self.server = server
        self.parts = parts

    def collect(self) -> Iterator[Metric]:
        """The coredns_* families."""
        s = self.server.stats
        cache, forwarder = self.parts()

        info = GaugeMetricFamily(
            "coredns_build_info",
            "dnsproxy's version (this is dnsproxy, exporting CoreDNS's metric names); "
            "goversion carries the Python version.",
            labels=["version", "revision", "goversion"],
        )
        info.add_metric([__version__, "dnsproxy", platform.python_version()], 1)
        yield info

        m = CounterMetricFamily(
            "coredns_dns_requests",
            "Valid queries received, by transport and type.",
            labels=["proto", "type"],
        )
        for proto, counts in (("udp", s.udp_qtypes), ("tcp", s.tcp_qtypes)):
            for qtype, n in enumerate(counts):
                if n:
                    m.add_metric([proto, qtype_name(qtype)], n)
        yield m

        m = CounterMetricFamily(
            "coredns_dns_responses", "Responses sent, by rcode.", labels=["rcode"]
        )
        for rcode, n in enumerate(s.rcodes):
            if n:
                m.add_metric([rcode_name(rcode)], n)
        yield m

        durations = self.server.handler.durations
        h = HistogramMetricFamily("coredns_dns_request_duration_seconds", REQUEST_DURATION_HELP)
        h.add_metric([], buckets(durations.bounds, durations.counts.copy()), durations.total_s)
        yield h

        hits = s.hits_by_kind.copy()
        m = CounterMetricFamily(
            "coredns_cache_hits",
            "Queries answered from the cache, by entry type.",
            labels=["type"],
        )
        m.add_metric(["success"], hits[POSITIVE])
        m.add_metric(["denial"], hits[NEGATIVE] + hits[SERVFAIL])
        yield m
        yield CounterMetricFamily(
            "coredns_cache_misses", "Queries not answered from the cache.", value=s.misses
        )
        kinds = cache.by_kind.copy()
        g = GaugeMetricFamily("coredns_cache_entries", "Cached entries, by type.", labels=["type"])
        g.add_metric(["success"], kinds[POSITIVE])
        g.add_metric(["denial"], kinds[NEGATIVE] + kinds[SERVFAIL])
        yield g

        yield CounterMetricFamily(
            "coredns_cache_served_stale",
            "Answers served from expired entries (RFC 8767).",
            value=forwarder.stats.stale_served,
        )
        yield CounterMetricFamily(
            "coredns_cache_prefetch",
            "Refreshes of popular entries before their expiry.",
            value=forwarder.stats.prefetches,
        )

        yield from self._forward(forwarder)
        yield CounterMetricFamily(
            "coredns_forward_max_concurrent_rejects",
            "Misses answered SERVFAIL because limits.max_inflight queries were in flight.",
            value=forwarder.stats.inflight_rejects,
        )

    def _forward(self, forwarder: Forwarder) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "coredns_forward_requests", "Queries sent to the upstream server.", labels=["to"]
        )
        responses = CounterMetricFamily(
            "coredns_forward_responses",
            "Valid replies from the upstream server, by rcode.",
            labels=["rcode", "to"],
        )
        failures = CounterMetricFamily(
            "coredns_forward_healthcheck_failures",
            "Failed health probes of the upstream server while it was marked down.",
            labels=["to"],
        )
        latency = HistogramMetricFamily(
            "coredns_forward_request_duration_seconds",
            "Time from sending a query to the upstream server to its valid reply, seconds.",
            labels=["to"],
        )
        for server in forwarder.servers.values():
            upstream = server.upstream
            to = str(HostPort(upstream.config.host, upstream.config.port))
            requests.add_metric([to], upstream.stats.queries)
            for rcode, n in enumerate(server.rcodes.copy()):
                if n:
                    responses.add_metric([rcode_name(rcode), to], n)
            failures.add_metric([to], server.probe_failures)
            hist = server.latency
            latency.add_metric([to], buckets(hist.bounds, hist.counts.copy()), hist.total_s)
        yield requests
        yield responses
        yield failures
        yield latency


class NodeCacheNames:
    """node-cache's own metric name, from the node manager's counters: kept apart from
    :class:`CoreDnsNames` because with ``workers: N`` the node role is the supervisor's
    while the workers answer the queries."""

    def __init__(self, node: NodeManager) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        """``coredns_nodecache_setup_errors_total{errortype}``."""
        m = CounterMetricFamily(
            "coredns_nodecache_setup_errors",
            "Failed node setup commands, by type.",
            labels=["errortype"],
        )
        for kind, count in self.node.stats.errors.copy().items():
            m.add_metric([kind], count)
        yield m
