"""Wiring and lifecycle: build the parts from a Config, start in order, stop cleanly.

Start: put the node's local addresses in place (a listener cannot bind to an address the
host lacks), bind every listener (all or nothing), start the HTTP endpoints, install the
node rules, report ready. The rules come only after the listeners: a NOTRACK rule on the
kube-dns ClusterIP with nothing listening would take DNS away from the node's pods, while
an address alone changes nothing for them. Every ``sync_interval_s`` the addresses and
rules are verified and whatever is missing is added again.

Stop (SIGTERM/SIGINT): report not ready, keep serving for ``shutdown_lameduck_s`` (a second
signal cuts it short), remove the rules and then the addresses (unless ``node.teardown`` is
off), stop taking queries, let in-flight queries finish within ``shutdown_grace_s``, close
upstream connections, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
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
from dnsproxy.config_types import Config, HostPort
from dnsproxy.forwarder import Forwarder, LoopError
from dnsproxy.metrics import BuildInfo, HttpEndpoint, StatsCollector
from dnsproxy.node import NodeCollector, NodeError, NodeManager, detect_backend
from dnsproxy.server import DnsServer

log = logging.getLogger("dnsproxy")

_HEARTBEAT_S = 0.5


class App:
    """One running dnsproxy: cache, forwarder, listeners, HTTP endpoints, node setup."""

    def __init__(self, config: Config, loop_name: str = "asyncio") -> None:
        self.config = config
        self.loop_name = loop_name
        self.cache = Cache(config.cache_max_entries)
        self.forwarder = Forwarder(config, self.cache)
        self.server = DnsServer(config, self.cache, self.forwarder)
        self.registry = CollectorRegistry(auto_describe=False)
        self.metrics = StatsCollector(
            [BuildInfo(loop_name), self.server, self.cache, self.forwarder]
        )
        self.registry.register(self.metrics)
        self.http: HttpEndpoint | None = None
        self.health: HttpEndpoint | None = None
        self.node: NodeManager | None = None
        self.ready = False
        self._beat: asyncio.TimerHandle | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._hurry: asyncio.Event | None = None

    @property
    def listen(self) -> list[HostPort]:
        """Addresses actually bound (port 0 in the config resolved to the real port)."""
        return self.server.bound

    async def start(self) -> None:
        node_config = self.config.node
        if node_config is not None:
            # Resolving "auto" runs `iptables -V` once; nothing is being served yet.
            self.node = NodeManager(node_config, detect_backend(node_config.rules))
            self.node.check_tools()
            self.metrics.sources.append(NodeCollector(self.node.stats))
            try:
                await self.node.setup_interface()
            except NodeError:
                if node_config.teardown:
                    await self.node.teardown(rules=False)
                raise
        try:
            await self.server.start()
            self.http = self._endpoint(self.config.http_listen, "/metrics /health /ready")
            self.health = self._endpoint(self.config.health_listen, "/health /ready /metrics")
            await self.check_loops(self.forwarder)
        except BaseException:
            await self.server.close()
            await self.forwarder.close()
            if self.http is not None:
                self.http.stop()
            if self.node is not None and node_config is not None and node_config.teardown:
                await self.node.teardown(rules=False)
            raise
        self._heartbeat()
        if self.node is None:
            self._set_ready()
            return
        if await self.node.sync():
            self._set_ready()
        else:
            log.warning("node rules not in place yet; not ready until a sync succeeds")
        self._sync_task = asyncio.create_task(self._sync_loop(), name="dnsproxy-node-sync")

    async def check_loops(self, forwarder: Forwarder) -> None:
        """Raise :class:`LoopError` when ``forwarder``'s upstreams send a probe back here.

        For a configuration about to be served: at start ``forwarder`` is the one being
        started; for a reload, the new one (probes coming back reach the running one).
        Takes an upstream's reply time, or its zone's deadline_s for one that does not
        answer. Nothing when the configuration turns ``loop_check`` off.
        """
        if not forwarder.config.loop_check:
            return
        problems = await forwarder.find_loops(listening=self.forwarder)
        if problems:
            raise LoopError(problems)

    def _endpoint(self, hp: HostPort | None, paths: str) -> HttpEndpoint | None:
        if hp is None:
            return None
        endpoint = HttpEndpoint(hp.host, hp.port, self.registry, lambda: self.ready)
        endpoint.start()
        log.info("http endpoint on %s (%s)", HostPort(hp.host, endpoint.port), paths)
        return endpoint

    def _set_ready(self) -> None:
        if self._stopping:
            return
        self.ready = True
        log.info("dnsproxy %s ready (%s loop)", __version__, self.loop_name)

    async def _sync_loop(self) -> None:
        assert self.node is not None
        interval = self.node.config.sync_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                ok = await self.node.sync()
            except Exception:
                # A bug in one sync must not end the repairs for the life of the process.
                log.exception("node sync failed")
                continue
            if ok and not self.ready:
                self._set_ready()

    def _heartbeat(self) -> None:
        endpoints = [e for e in (self.http, self.health) if e is not None]
        for endpoint in endpoints:
            endpoint.beat()
        if endpoints:
            self._beat = asyncio.get_running_loop().call_later(_HEARTBEAT_S, self._heartbeat)

    def hurry(self) -> None:
        """Cut the lameduck period short (a second SIGTERM)."""
        if self._hurry is not None:
            self._hurry.set()

    async def stop(self) -> None:
        self.ready = False
        self._stopping = True
        lameduck = self.config.shutdown_lameduck_s
        if lameduck > 0:
            # Not ready, still serving: whatever watches /ready moves traffic away first.
            log.info("lameduck: /ready is 503, serving for %.1fs more", lameduck)
            self._hurry = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), lameduck)
        if self._sync_task is not None:
            self._sync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sync_task
        if self.node is not None:
            if self.node.config.teardown:
                await self.node.teardown()
            else:
                log.info("node teardown is off: rules and addresses stay in place")
        self.server.stop_listening()
        grace = self.config.shutdown_grace_s
        if not await self.forwarder.drain(grace):
            abandoned = self.forwarder.abandon()
            log.warning(
                "%d questions still in flight after %.1fs: answered SERVFAIL", abandoned, grace
            )
        await self.server.close()
        await self.forwarder.close()
        if self._beat is not None:
            self._beat.cancel()
        for endpoint in (self.http, self.health):
            if endpoint is not None:
                endpoint.stop()
        log.info("stopped")

    async def serve_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal() -> None:
            if stop.is_set():
                self.hurry()
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
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


def tune_gc() -> None:
    """Keep the cyclic garbage collector off the query path.

    Every miss allocates a handful of container objects, and with the default
    thresholds a collection runs every few hundred misses, each one walking every
    cache entry: 15 % of a miss-path profile. Objects alive at start-up are frozen out
    of collection, and young-generation collections happen 70 times less often; the
    query path makes few reference cycles, so memory stays bounded all the same.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


async def _serve(config: Config, loop_name: str) -> None:
    tune_gc()
    await App(config, loop_name).serve_until_signal()


def run(config: Config) -> int:
    """Run until SIGTERM/SIGINT; the exit code for the process."""
    setup_logging(config.log.level, config.log.format)
    name, factory = loop_factory()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(_serve(config, name))
    except LoopError as exc:
        for problem in exc.problems:
            log.error("refusing the configuration: %s", problem)
        return 2  # as for any configuration refused
    except (OSError, NodeError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
