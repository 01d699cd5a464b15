"""Metric families beside the core ones: client request durations, process metrics, and the
CoreDNS / NodeLocal DNSCache names (``metrics.coredns_names``).

Everything here reads counters the components already keep (``ServerStats``, the
forwarder's per-server state, the cache, ``NodeStats``) at scrape time; nothing is counted
twice and nothing is added to the query paths. The CoreDNS names carry the labels their
dashboards group by where dnsproxy knows the value (``proto``, ``type``, ``rcode``, ``to``,
``errortype``); labels it cannot fill honestly (``server``, ``zone``, ``view``,
``family``) are left out, so a ``sum by (zone)`` yields one series instead of made-up ones.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from dnsproxy import __version__
from dnsproxy.cache import NEGATIVE, POSITIVE, SERVFAIL
from dnsproxy.config import HostPort
from dnsproxy.names import qtype_name, rcode_name

if TYPE_CHECKING:
    from dnsproxy.app import App

_DURATION_HELP = (
    "Time from a query's arrival to its answer, seconds. A forwarded query is timed on its "
    "own; UDP queries answered from the cache in one socket read batch are each recorded "
    "with the batch's duration, an upper bound on their own (time queued in the socket "
    "before the batch is not seen)."
)


def register_extra_collectors(app: App) -> None:
    """Add this module's collectors to ``app.registry``: the request duration histogram
    and process metrics always, the CoreDNS names when ``metrics.coredns_names`` is on."""
    ProcessCollector(registry=app.registry)
    app.registry.register(RequestDurationCollector(app))
    if app.config.metrics_coredns_names:
        app.registry.register(CoreDnsCollector(app))


class RequestDurationCollector:
    """``dnsproxy_request_duration_seconds``: the client-facing latency histogram."""

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        durations = self.app.server.handler.durations
        m = HistogramMetricFamily("dnsproxy_request_duration_seconds", _DURATION_HELP)
        m.add_metric([], durations.cumulative(), durations.total_s)
        yield m


class CoreDnsCollector:
    """The metric names of CoreDNS and node-cache, read from dnsproxy's own counters.

    SERVFAIL entries count as ``denial``, where CoreDNS's cache keeps them too.
    """

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        app = self.app
        s = app.server.stats

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

        durations = app.server.handler.durations
        h = HistogramMetricFamily("coredns_dns_request_duration_seconds", _DURATION_HELP)
        h.add_metric([], durations.cumulative(), durations.total_s)
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
        kinds = app.cache.by_kind.copy()
        g = GaugeMetricFamily("coredns_cache_entries", "Cached entries, by type.", labels=["type"])
        g.add_metric(["success"], kinds[POSITIVE])
        g.add_metric(["denial"], kinds[NEGATIVE] + kinds[SERVFAIL])
        yield g

        yield from self._forward()

        yield CounterMetricFamily(
            "coredns_forward_max_concurrent_rejects",
            "Misses answered SERVFAIL because limits.max_inflight queries were in flight.",
            value=app.forwarder.stats.inflight_rejects,
        )

        node = app.node
        if node is not None:
            m = CounterMetricFamily(
                "coredns_nodecache_setup_errors",
                "Failed node setup commands, by type.",
                labels=["errortype"],
            )
            for kind, count in node.stats.errors.copy().items():
                m.add_metric([kind], count)
            yield m

    def _forward(self) -> Iterator[Metric]:
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
        for server in self.app.forwarder.servers.values():
            upstream = server.upstream
            to = str(HostPort(upstream.config.host, upstream.config.port))
            requests.add_metric([to], upstream.stats.queries)
            for rcode, n in enumerate(server.rcodes.copy()):
                if n:
                    responses.add_metric([rcode_name(rcode), to], n)
            failures.add_metric([to], server.probe_failures)
            latency.add_metric([to], server.latency.cumulative(), server.latency.total_s)
        yield requests
        yield responses
        yield failures
        yield latency
