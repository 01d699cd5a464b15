"""Prometheus metrics, health and readiness over HTTP.

The hot path only increments plain integers (``ServerStats``, ``ForwarderStats``,
``UpstreamStats``, the cache's counters). A custom collector turns them into metric
families when Prometheus scrapes, so counting costs nothing extra per query. The HTTP
endpoint is prometheus-client's WSGI app plus ``/health`` and ``/ready``, served from a
thread so that a scrape never competes with the event loop for a turn.
"""

from __future__ import annotations

import logging
import platform
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import dnslib
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import ThreadingWSGIServer

from dnsproxy import __version__
from dnsproxy.cache import KIND_NAMES
from dnsproxy.forwarder import LATENCY_BUCKETS

if TYPE_CHECKING:
    from dnsproxy.app import App

log = logging.getLogger(__name__)


def _qtype_name(qtype: int) -> str:
    name = dnslib.QTYPE.get(qtype, None)
    return str(name) if name is not None else f"TYPE{qtype}"


def _rcode_name(rcode: int) -> str:
    name = dnslib.RCODE.get(rcode, None)
    return str(name) if name is not None else f"RCODE{rcode}"


class StatsCollector:
    """Reads the plain counters of a running :class:`App` at scrape time."""

    def __init__(self, app: App) -> None:
        self.app = app

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        app = self.app
        s = app.server.stats
        f = app.forwarder.stats
        cache = app.cache

        info = GaugeMetricFamily(
            "dnsproxy_build_info",
            "dnsproxy version and runtime.",
            labels=["version", "python", "loop"],
        )
        info.add_metric([__version__, platform.python_version(), app.loop_name], 1)
        yield info

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
                m.add_metric([_qtype_name(qtype)], qtypes[qtype])
        yield m

        m = CounterMetricFamily("dnsproxy_responses", "Responses sent, by rcode.", labels=["rcode"])
        rcodes = s.rcodes
        for rcode in range(len(rcodes)):
            if rcodes[rcode]:
                m.add_metric([_rcode_name(rcode)], rcodes[rcode])
        yield m

        yield _by_reason(
            "dnsproxy_dropped", "Packets dropped without a reply, by reason.", s.dropped
        )
        udp_drops = CounterMetricFamily(
            "dnsproxy_udp_receive_drops",
            "Queries the kernel dropped at a UDP listener's socket (receive buffer full).",
            labels=["listener"],
        )
        for listener, count in app.server.udp_receive_drops().items():
            udp_drops.add_metric([listener], count)
        yield udp_drops
        yield _by_reason(
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
        entries = GaugeMetricFamily(
            "dnsproxy_cache_entries", "Cached entries, by kind.", labels=["type"]
        )
        for kind, count in zip(KIND_NAMES, cache.by_kind, strict=True):
            entries.add_metric([kind], count)
        yield entries
        yield GaugeMetricFamily(
            "dnsproxy_cache_capacity", "Maximum cached entries.", value=cache.max_entries
        )
        yield GaugeMetricFamily(
            "dnsproxy_cache_bytes",
            "Reply bytes held by the cache (bounded by 64 MiB besides the entry count).",
            value=cache.bytes,
        )
        yield CounterMetricFamily(
            "dnsproxy_cache_evictions", "Entries evicted to make room (LRU).", value=cache.evictions
        )

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
            "dnsproxy_inflight", "Distinct queries waiting for an upstream.", app.forwarder.inflight
        )
        yield _by_reason(
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

        per_upstream = (
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
        families = {
            name: CounterMetricFamily(f"dnsproxy_upstream_{name}", doc, labels=["upstream"])
            for name, doc in per_upstream
        }
        gauges = {
            "open_connections": GaugeMetricFamily(
                "dnsproxy_upstream_open_connections",
                "Open connections to the upstream server.",
                labels=["upstream"],
            ),
            "inflight": GaugeMetricFamily(
                "dnsproxy_upstream_inflight",
                "Queries sent to the upstream server and not yet answered.",
                labels=["upstream"],
            ),
        }
        up_gauge = GaugeMetricFamily(
            "dnsproxy_upstream_up",
            "1 while the upstream server is healthy, 0 while it is marked down and probed.",
            labels=["upstream"],
        )
        probes = CounterMetricFamily(
            "dnsproxy_upstream_healthcheck_failures",
            "Failed health probes of a server marked down.",
            labels=["upstream"],
        )
        for label, server in app.forwarder.servers.items():
            stats = server.upstream.stats
            for name, _ in per_upstream:
                families[name].add_metric([label], getattr(stats, name, 0))
            for name, gauge in gauges.items():
                gauge.add_metric([label], getattr(stats, name, 0))
            up_gauge.add_metric([label], 1 if server.up else 0)
            probes.add_metric([label], server.probe_failures)
        yield from families.values()
        yield from gauges.values()
        yield up_gauge
        yield probes
        latency = HistogramMetricFamily(
            "dnsproxy_upstream_request_duration_seconds",
            "Time from sending a query to an upstream server to its valid reply.",
            labels=["upstream"],
        )
        for label, server in app.forwarder.servers.items():
            counts = server.latency.counts.copy()
            cumulative = list(accumulate(counts))
            buckets = [
                (str(float(bound)), float(n))
                for bound, n in zip(LATENCY_BUCKETS, cumulative, strict=False)
            ]
            buckets.append(("+Inf", float(cumulative[-1])))
            latency.add_metric([label], buckets, server.latency.total_s)
        yield latency


def _by_reason(name: str, doc: str, table: dict[str, int]) -> CounterMetricFamily:
    m = CounterMetricFamily(name, doc, labels=["reason"])
    for reason, count in table.copy().items():
        m.add_metric([reason], count)
    return m


class _HttpServer(ThreadingWSGIServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn(): a reverse DNS lookup at start-up,
        # which on a node whose resolver is this very proxy would wait on itself.
        socketserver.TCPServer.server_bind(self)
        self.server_name = str(self.server_address[0])
        self.server_port = int(self.server_address[1])
        self.setup_environ()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class HttpEndpoint:
    """``/metrics``, ``/health`` (event loop responsive) and ``/ready`` on one port."""

    # /health fails when the event loop has not ticked for this long.
    STALL_S = 2.0

    def __init__(
        self, host: str, port: int, registry: CollectorRegistry, ready: Callable[[], bool]
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._ready = ready
        self.heartbeat = time.monotonic()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_HttpServer,), {"address_family": family})
        try:
            self._server: WSGIServer = make_server(
                host, port, self._app, server_class=server_class, handler_class=_QuietHandler
            )
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(exc.errno, f"cannot bind HTTP {where}: {exc.strerror}") from None
        self.port: int = self._server.server_port
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="dnsproxy-http", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            ok = time.monotonic() - self.heartbeat < self.STALL_S
            return _plain(start_response, ok, b"ok\n" if ok else b"event loop stalled\n")
        if path == "/ready":
            ok = self._ready()
            return _plain(start_response, ok, b"ready\n" if ok else b"not ready\n")
        if path == "/metrics":
            result: Iterable[bytes] = self._metrics(environ, start_response)
            return result
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics, /health or /ready\n"]


def _plain(start_response: Callable[..., Any], ok: bool, body: bytes) -> list[bytes]:
    status = "200 OK" if ok else "503 Service Unavailable"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
