"""Prometheus metrics, health and readiness over HTTP.

Each component counts in plain integers on its hot path and turns them into metric
families when Prometheus scrapes, through a ``collect()`` of its own: the server
(``DnsServer``), the cache, the forwarder (with one source per upstream server under it),
the node manager. :class:`StatsCollector` only gathers the families of the sources it is
given, so counting costs nothing extra per query and this module knows no component. The
HTTP endpoint is prometheus-client's WSGI app plus ``/health`` and ``/ready``, served from
a thread so that a scrape never competes with the event loop for a turn.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import selectors
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import dnslib
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from dnsproxy import __version__, compiled

__all__ = [
    "BuildInfo",
    "HttpEndpoint",
    "MetricSource",
    "StatsCollector",
    "buckets",
    "by_reason",
    "labelled",
    "qtype_name",
    "rcode_name",
]

log = logging.getLogger(__name__)


class MetricSource(Protocol):
    """Anything that turns its counters into metric families at scrape time."""

    def collect(self) -> Iterable[Metric]: ...


class StatsCollector:
    """A prometheus-client collector over a list of :class:`MetricSource`.

    Families of the same name from several sources (one sample per upstream server, each
    from its own source) are exported as one family. ``sources`` may be changed between
    scrapes, e.g. to swap in a new component on reload.
    """

    def __init__(self, sources: Sequence[MetricSource]) -> None:
        self.sources = list(sources)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        for source in list(self.sources):
            for family in source.collect():
                seen = families.get(family.name)
                if seen is None:
                    families[family.name] = family
                else:
                    seen.samples.extend(family.samples)
        return iter(families.values())


class BuildInfo:
    """``dnsproxy_build_info``: version and runtime, as a source. ``compiled`` says whether
    the query paths run compiled with mypyc (``mypyc``) or as pure Python (``no``)."""

    def __init__(self, loop_name: str) -> None:
        self.loop_name = loop_name
        self.compiled = compiled()

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "dnsproxy_build_info",
            "dnsproxy version and runtime.",
            labels=["version", "python", "loop", "compiled"],
        )
        info.add_metric([__version__, platform.python_version(), self.loop_name, self.compiled], 1)
        yield info


def qtype_name(qtype: int) -> str:
    """The label value for a query type: its mnemonic, or ``TYPEnnn``."""
    name = dnslib.QTYPE.get(qtype, None)
    return str(name) if name is not None else f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    """The label value for a response code: its mnemonic, or ``RCODEnnn``."""
    name = dnslib.RCODE.get(rcode, None)
    return str(name) if name is not None else f"RCODE{rcode}"


def by_reason(name: str, doc: str, table: dict[str, int]) -> CounterMetricFamily:
    """A counter family with one sample per ``reason`` in ``table``."""
    m = CounterMetricFamily(name, doc, labels=["reason"])
    for reason, count in table.copy().items():
        m.add_metric([reason], count)
    return m


def labelled(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    value: str,
    count: float,
) -> Metric:
    """A counter or gauge family with the one sample ``{label="value"} count``."""
    m = family(name, doc, labels=[label])
    m.add_metric([value], count)
    return m


def buckets(bounds: Sequence[float], counts: Sequence[int]) -> list[tuple[str, float]]:
    """Histogram buckets in prometheus-client's form from per-bucket ``counts``
    (one more than ``bounds``: the last is +Inf)."""
    cumulative = list(accumulate(counts))
    out = [(str(float(bound)), float(n)) for bound, n in zip(bounds, cumulative, strict=False)]
    out.append(("+Inf", float(cumulative[-1])))
    return out


class _HttpServer(ThreadingWSGIServer):
    def server_bind(self) -> None:
        # HTTPServer.server_bind asks socket.getfqdn(): a reverse DNS lookup at start-up,
        # which on a node whose resolver is this very proxy would wait on itself.
        socketserver.TCPServer.server_bind(self)
        self.name_self()

    def name_self(self) -> None:
        """What server_bind sets besides binding (also for a socket taken over)."""
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
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        ready: Callable[[], bool],
        sock: socket.socket | None = None,
        problem: Callable[[], str | None] | None = None,
    ) -> None:
        """Bind ``host:port``, or serve the listening ``sock`` taken over from the instance
        this one replaces. ``problem`` may name a reason for /health to fail besides a
        stalled event loop. Raises OSError naming the address when it cannot be bound."""
        self._metrics = make_wsgi_app(registry)
        self._ready = ready
        self._problem = problem
        self.heartbeat = time.monotonic()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (_HttpServer,), {"address_family": family})
        try:
            server = server_class((host, port), _QuietHandler, bind_and_activate=sock is None)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(exc.errno, f"cannot bind HTTP {where}: {exc.strerror}") from None
        if sock is not None:
            server.socket.close()
            server.socket = sock
            server.server_address = sock.getsockname()
            server.name_self()
        # Non-blocking accept: during a handover both instances poll the same socket, and
        # the one that loses the race for a connection must not block in accept() (it is
        # told EAGAIN, which socketserver ignores). Accepted connections are blocking.
        server.socket.setblocking(False)
        server.set_app(self._app)
        self._server: WSGIServer = server
        self.socket: socket.socket = server.socket
        self.port: int = self._server.server_port
        # socketserver's serve_forever polls for shutdown twice a second, which made a
        # stop (and so a restart without handover) up to half a second longer: the
        # thread waits on the listening socket and on this pair, and stop() wakes it.
        self._wake_read, self._wake_write = socket.socketpair()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="dnsproxy-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the listening socket; returns once the server thread
        has ended (at once, or after the request it is accepting)."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_write.send(b"\0")
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._server.server_close()
        self._wake_read.close()
        self._wake_write.close()

    def _serve(self) -> None:
        server = self._server
        with selectors.DefaultSelector() as selector:
            selector.register(server.socket, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is server.socket and not self._stopping:
                        # The socket is non-blocking, so this accepts what is there (or
                        # nothing, when the other instance of a handover took it) and
                        # hands the connection to a thread of its own.
                        server.handle_request()

    def beat(self) -> None:
        self.heartbeat = time.monotonic()

    def _app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/health":
            problem = None if self._problem is None else self._problem()
            if time.monotonic() - self.heartbeat >= self.STALL_S:
                problem = "event loop stalled"
            body = b"ok\n" if problem is None else f"{problem}\n".encode()
            return _plain(start_response, problem is None, body)
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
