"""Wiring and lifecycle: build the parts from a Config, start in order, stop cleanly.

Start: bind every listener (all or nothing), start the HTTP endpoint, report ready.
Stop (SIGTERM/SIGINT): report not ready, stop taking queries, let in-flight queries
finish within ``shutdown_grace_s``, close upstream connections, exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from dnsproxy import __version__
from dnsproxy.cache import Cache
from dnsproxy.config import Config, HostPort
from dnsproxy.forwarder import Forwarder
from dnsproxy.metrics import HttpEndpoint, StatsCollector
from dnsproxy.server import DnsServer

log = logging.getLogger("dnsproxy")

_HEARTBEAT_S = 0.5


class App:
    """One running dnsproxy: cache, forwarder, listeners and the HTTP endpoint."""

    def __init__(self, config: Config, loop_name: str = "asyncio") -> None:
        self.config = config
        self.loop_name = loop_name
        self.cache = Cache(config.cache_max_entries)
        self.forwarder = Forwarder(config, self.cache)
        self.server = DnsServer(config, self.cache, self.forwarder)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(self))
        self.http: HttpEndpoint | None = None
        self.ready = False
        self._beat: asyncio.TimerHandle | None = None

    @property
    def listen(self) -> list[HostPort]:
        """Addresses actually bound (port 0 in the config resolved to the real port)."""
        return self.server.bound

    async def start(self) -> None:
        await self.server.start()
        if self.config.http_listen is not None:
            hp = self.config.http_listen
            try:
                self.http = HttpEndpoint(hp.host, hp.port, self.registry, lambda: self.ready)
            except OSError:
                await self.server.close()
                raise
            self.http.start()
            log.info(
                "http endpoint on %s (/metrics /health /ready)", HostPort(hp.host, self.http.port)
            )
            self._heartbeat()
        self.ready = True
        log.info("dnsproxy %s ready (%s loop)", __version__, self.loop_name)

    def _heartbeat(self) -> None:
        if self.http is not None:
            self.http.beat()
            self._beat = asyncio.get_running_loop().call_later(_HEARTBEAT_S, self._heartbeat)

    async def stop(self) -> None:
        self.ready = False
        self.server.stop_listening()
        grace = self.config.shutdown_grace_s
        if not await self.forwarder.drain(grace):
            log.warning("in-flight queries still unanswered after %.1fs; exiting anyway", grace)
        await self.server.close()
        await self.forwarder.close()
        if self._beat is not None:
            self._beat.cancel()
        if self.http is not None:
            self.http.stop()
        log.info("stopped")

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        log.info("signal received, shutting down")
        await self.stop()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def loop_factory() -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """uvloop unless ``DNSPROXY_LOOP=asyncio`` asks for the stock loop."""
    if os.environ.get("DNSPROXY_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop

            return "uvloop", uvloop.new_event_loop
        except ImportError:
            log.warning("uvloop is not installed; using the stock asyncio loop")
    return "asyncio", asyncio.new_event_loop


async def _serve(config: Config, loop_name: str) -> None:
    await App(config, loop_name).serve_until_signal()


def run(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the process."""
    setup_logging(config.log.level, config.log.format)
    name, factory = loop_factory()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(config, name))
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
