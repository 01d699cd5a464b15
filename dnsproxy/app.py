"""Wiring and lifecycle: build the parts from a Config, start in order, hand over, reload,
stop cleanly.

What answers the queries is a :class:`~dnsproxy.engine.Serving`: an
:class:`~dnsproxy.engine.Engine` in this process (``workers: 1``), or, with ``workers: N``,
a :class:`~dnsproxy.workers.WorkerPool` of N worker processes, this one being their
supervisor. Everything below is the same for both.

Start: put the node's local addresses in place (a listener cannot bind to an address the
host lacks), take the listening sockets over from a running instance (``handover.path``,
see :mod:`dnsproxy.handover`) or bind them, start the HTTP endpoints, install the node
rules, report ready. The rules come only after the listeners: a NOTRACK rule on the
kube-dns ClusterIP with nothing listening would take DNS away from the node's pods, while
an address alone changes nothing for them. Every ``sync_interval_s`` the addresses and
rules are verified and whatever is missing is added again.

Replaced by a successor: stop reading and accepting (it reads the same sockets now),
answer what is in flight, leave rules and addresses in place, then exit or wait for
SIGTERM (``handover.when_replaced``).

Reload (SIGHUP, or the config file changed): validate the new file; apply all of it or
nothing (see :mod:`dnsproxy.reload`).

Stop (SIGTERM/SIGINT/SIGQUIT): report not ready, keep serving for ``shutdown_lameduck_s``
(a second signal cuts it short; a successor may still take over meanwhile), remove the
rules and then the addresses (unless ``node.teardown`` is off), stop taking queries, let
in-flight queries finish within ``shutdown_grace_s``, close upstream connections, exit 0.

Signals: SIGTERM, SIGINT and SIGQUIT stop; SIGHUP reloads; SIGUSR1 logs a state summary;
SIGUSR2 and SIGALRM are logged and ignored; SIGPIPE is ignored (a write to a closed
socket is an error on that socket, not the end of the process).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dnsproxy import __version__, compiled, handover
from dnsproxy import reload as reloading
from dnsproxy.cache import DEFAULT_MAX_BYTES, Cache
from dnsproxy.compat import NodeCacheNames
from dnsproxy.config import ConfigError, Overrides, load_config
from dnsproxy.config_types import Config, HostPort
from dnsproxy.engine import Engine, Serving
from dnsproxy.forwarder import Forwarder, LoopError
from dnsproxy.metrics import BuildInfo, HttpEndpoint, StatsCollector
from dnsproxy.node import NodeCollector, NodeError, NodeManager, detect_backend
from dnsproxy.runtime import loop_factory, setup_logging, tune_gc
from dnsproxy.server import DnsServer, Inherited
from dnsproxy.workers import WorkerError, WorkerPool

log = logging.getLogger("dnsproxy")

_HEARTBEAT_S = 0.5
# How long a replaced instance waits for its successor to confirm that it serves the
# sockets. It keeps serving meanwhile, so a long wait costs nothing; a successor that
# dies closes the connection and ends the wait at once.
_TAKEN_TIMEOUT_S = 60.0
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
# Signals with no meaning here whose default action would end the process.
_IGNORED_SIGNALS = (signal.SIGUSR2, signal.SIGALRM)
_KINDS = ("success", "denial", "servfail")  # cache entry kinds, as dnsproxy_cache_entries says


class App:
    """One running dnsproxy: what answers queries, HTTP endpoints, node setup, lifecycle.

    ``serving`` answers the queries: by default an :class:`Engine` in this process (cache,
    forwarder, DNS listeners); a supervisor passes its
    :class:`~dnsproxy.workers.WorkerPool`, whose process metrics then include the
    workers'. ``config_path`` and ``overrides`` are what ``config`` was loaded from: a
    reload reads them again (None: the built-in defaults plus the flags).
    """

    def __init__(
        self,
        config: Config,
        loop_name: str = "asyncio",
        config_path: str | None = None,
        overrides: Overrides | None = None,
        serving: Serving | None = None,
    ) -> None:
        self.config = config
        self.loop_name = loop_name
        self.config_path = config_path
        self._overrides = overrides
        self.engine: Serving = serving if serving is not None else Engine(config)
        self.registry = CollectorRegistry(auto_describe=False)
        self.metrics = StatsCollector([BuildInfo(loop_name), self.engine, _Lifecycle(self)])
        self.registry.register(self.metrics)
        if serving is None:
            ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, ...
        self.http: HttpEndpoint | None = None
        self.health: HttpEndpoint | None = None
        self.node: NodeManager | None = None
        self.ready = False
        self.started_at = time.time()
        # Reloads
        self.config_hash = reloading.config_hash(config)
        self.config_loaded_at = time.time()
        self.reloads = 0
        self.reload_failures = 0
        self._file_seen = reloading.file_signature(config_path) if config_path else None
        self._reload_lock = asyncio.Lock()
        # Handover: how this instance got its listeners, and whether it was replaced.
        self.started_by = "bind"
        self.handover_entries = 0
        self.handed_over = False
        self.replaced = asyncio.Event()
        self._handover: handover.Listener | None = None
        self._handover_lock = asyncio.Lock()
        self._beat: asyncio.TimerHandle | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._handover_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()  # reloads, drains, waits: referenced
        self._stopping = False
        self._tearing_down = False
        self._hurry: asyncio.Event | None = None

    @property
    def listen(self) -> list[HostPort]:
        """Addresses actually bound (port 0 in the config resolved to the real port)."""
        return self.engine.bound

    # The parts of a single-process instance, as tests and tools look at them.

    @property
    def local(self) -> Engine:
        assert isinstance(self.engine, Engine), "the queries are answered by worker processes"
        return self.engine

    @property
    def server(self) -> DnsServer:
        return self.local.server

    @property
    def cache(self) -> Cache:
        return self.local.cache

    @property
    def forwarder(self) -> Forwarder:
        return self.local.forwarder

    # -- start

    async def start(self) -> None:
        node_config = self.config.node
        if node_config is not None:
            # Resolving "auto" runs `iptables -V` once; nothing is being served yet.
            self.node = NodeManager(node_config, detect_backend(node_config.rules))
            self.node.check_tools()
            self.metrics.sources.append(NodeCollector(self.node.stats))
            self._node_cache_names(self.config)
        taken = await self._take_over()
        inherited: Inherited = taken.sockets if taken is not None else {}
        try:
            if self.node is not None:
                # Taken over: the addresses are there (the sockets are bound to them), and
                # this verifies it; otherwise a listener cannot bind without them.
                await self.node.setup_interface()
            snapshot = None
            if taken is not None:
                snapshot, taken.cache = taken.cache, None
                if taken.loop_id:
                    self.engine.loop_id = taken.loop_id
            self.handover_entries = await self.engine.start(
                inherited, snapshot, taken.cache_time if taken is not None else 0.0
            )
            self.http = self._endpoint(
                self.config.http_listen, "/metrics /health /ready", inherited
            )
            self.health = self._endpoint(
                self.config.health_listen, "/health /ready /metrics", inherited
            )
            # Before the old instance is told to stop: a loop refuses this configuration
            # and the old one goes on serving. A probe may come back to either; both know
            # its first label (the old one's, taken over above).
            await self.check_loops(self.config, starting=True)
        except BaseException:
            if taken is not None:
                taken.close()  # the running instance goes on serving, addresses and all
            await self.engine.close()
            if self.http is not None:
                self.http.stop()
            if taken is None and self.node is not None and self.node.config.teardown:
                await self.node.teardown(rules=False)
            raise
        if taken is not None:
            await self._confirm(taken)
        self._heartbeat()
        self._listen_for_successor()
        self._start_watch()
        if self.node is None:
            self._set_ready()
            return
        if await self.node.sync():
            self._set_ready()
        else:
            log.warning("node rules not in place yet; not ready until a sync succeeds")
        self._sync_task = asyncio.create_task(self._sync_loop(), name="dnsproxy-node-sync")

    async def check_loops(self, config: Config, *, starting: bool = False) -> None:
        """Raise :class:`LoopError` when an upstream of ``config`` sends a probe back to
        this instance's listeners (see :meth:`Forwarder.find_loops`).

        For a configuration about to be served in this process: ``starting``, through the
        forwarder that starts (its pools then hold a connection to each upstream, and an
        ``auto`` one has found its transport); otherwise (a reload, or the workers'
        configuration), through a forwarder of its own, with a cache of its own so that
        nothing of the running one changes. A probe that comes back is answered by
        whichever process reads it, this one, a worker or the instance handing over.
        Takes an upstream's reply time, or its zone's deadline_s for one that does not
        answer. Nothing when ``config`` turns ``loop_check`` off.
        """
        if not config.loop_check:
            return
        engine = self.engine
        running = engine.forwarder if isinstance(engine, Engine) else None
        if starting and running is not None:
            prober = running
        else:
            prober = Forwarder(config, Cache(1), loop_id=engine.loop_id)
        try:
            problems = await prober.find_loops()
        finally:
            if prober is not running:
                await prober.close()
        if problems:
            raise LoopError(problems)

    async def _take_over(self) -> handover.Taken | None:
        """The running instance's sockets (and cache), or None: bind as usual."""
        settings = self.config.handover
        if settings.path is None:
            return None
        bounds = (self.config.cache_max_entries, DEFAULT_MAX_BYTES) if settings.cache else None
        result = await handover.take_over(settings.path, settings.timeout_s, bounds)
        if isinstance(result, str):
            log.info("handover: %s; binding the listeners", result)
            return None
        if not any(("udp", hp) in result.sockets for hp in self.config.listen):
            offered = ", ".join(f"{kind} {hp}" for kind, hp in result.sockets)
            log.warning(
                "handover: %s serves none of this configuration's listen addresses "
                "(it offers %s); declined, binding the listeners",
                result.peer,
                offered,
            )
            await result.decline("none of its DNS listeners is in the new configuration")
            return None
        return result

    async def _confirm(self, taken: handover.Taken) -> None:
        """Close what the new configuration does not serve, then tell the old one to stop."""
        for (kind, hp), socks in taken.sockets.items():
            log.info("handover: %s %s is not in this configuration; closed", kind, hp)
            for sock in socks:
                sock.close()
        taken.sockets.clear()
        self.started_by = "handover"
        try:
            await taken.confirm()
        except (OSError, handover.HandoverError) as exc:
            # We serve the sockets either way; the old one may serve them too until it ends.
            log.warning("handover: could not tell %s that it is replaced: %s", taken.peer, exc)
            taken.close()
            return
        log.info(
            "handover: took over the listeners of %s%s",
            taken.peer,
            f" with {self.handover_entries} cache entries" if self.config.handover.cache else "",
        )
        wait = self.config.shutdown_grace_s + self.config.handover.timeout_s
        self._spawn(self._old_done(taken, wait), "dnsproxy-handover-done")

    async def _old_done(self, taken: handover.Taken, wait_s: float) -> None:
        done = await taken.wait_done(wait_s)
        if done is None:
            log.warning("handover: %s did not say it finished within %.1fs", taken.peer, wait_s)
        else:
            log.info(
                "handover: %s answered its in-flight queries (%s abandoned) and stopped",
                taken.peer,
                done.get("abandoned", "?"),
            )

    def _node_cache_names(self, config: Config) -> None:
        """Export node-cache's name for the node's counters, or stop, as
        ``metrics.coredns_names`` says (the engine does the same for the CoreDNS names)."""
        sources = self.metrics.sources
        present = [source for source in sources if isinstance(source, NodeCacheNames)]
        if config.metrics_coredns_names and not present and self.node is not None:
            sources.append(NodeCacheNames(self.node))
        elif not config.metrics_coredns_names:
            for source in present:
                sources.remove(source)

    def _endpoint(
        self, hp: HostPort | None, paths: str, inherited: Inherited | None = None
    ) -> HttpEndpoint | None:
        if hp is None:
            return None
        sock = None
        if inherited:
            socks = inherited.pop(("http", hp), [])
            for extra in socks[1:]:  # an HTTP endpoint is one socket; never sent otherwise
                extra.close()
            sock = socks[0] if socks else None
        endpoint = HttpEndpoint(
            hp.host, hp.port, self.registry, self.is_ready, sock, problem=self.engine.problem
        )
        endpoint.start()
        how = ", taken over" if sock is not None else ""
        log.info("http endpoint on %s (%s%s)", HostPort(hp.host, endpoint.port), paths, how)
        return endpoint

    def is_ready(self) -> bool:
        """What /ready says: listeners and node rules in place, every worker serving, not
        stopping."""
        return self.ready and self.engine.serving

    def _set_ready(self) -> None:
        if self._stopping or self.handed_over:
            return
        self.ready = True
        workers = self.config.workers
        log.info(
            "dnsproxy %s ready (%s loop)%s; query paths %s",
            __version__,
            self.loop_name,
            f" with {workers} workers" if workers > 1 else "",
            "compiled with mypyc" if compiled() == "mypyc" else "in pure Python",
        )

    async def _sync_loop(self) -> None:
        assert self.node is not None
        while True:
            await asyncio.sleep(self.node.config.sync_interval_s)
            try:
                ok = await self.node.sync()
            except Exception:
                # A bug in one sync must not end the repairs for the life of the process.
                log.exception("node sync failed")
                continue
            if ok and not self.ready:
                self._set_ready()

    def _heartbeat(self) -> None:
        # Also without endpoints: a reload may add one.
        for endpoint in (self.http, self.health):
            if endpoint is not None:
                endpoint.beat()
        self._beat = asyncio.get_running_loop().call_later(_HEARTBEAT_S, self._heartbeat)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- being replaced

    def _listen_for_successor(self) -> None:
        path = self.config.handover.path
        if path is None:
            return
        try:
            self._handover = handover.Listener(path)
        except OSError as exc:
            log.error(
                "handover: cannot listen on %s (%s); a successor will not find this instance",
                path,
                exc.strerror or exc,
            )
            return
        self._handover_task = asyncio.create_task(
            handover.serve(self._handover, self._successor), name="dnsproxy-handover"
        )

    async def _successor(self, channel: handover.Channel, pid: int) -> bool:
        """Hand over to the instance ``pid`` on ``channel``; True once replaced."""
        settings = self.config.handover
        # A reload under way finishes first: what is offered is then what is served.
        async with self._handover_lock, self._reload_lock:
            try:
                given = await handover.give(
                    channel, settings.timeout_s, self._offer, _TAKEN_TIMEOUT_S
                )
            except (OSError, handover.HandoverError, TimeoutError) as exc:
                log.warning("handover to pid %d failed: %s; still serving", pid, exc or "timeout")
                given = False
            if not given:
                channel.close()
                return False
            self.handed_over = True
        await self._retire(channel, pid)
        return True

    def _offer(self) -> handover.Offer | str:
        if self._tearing_down:
            return "this instance is shutting down (removing its node rules)"
        sockets = self.engine.sockets()
        for endpoint in (self.http, self.health):
            if endpoint is not None:
                host, port = endpoint.socket.getsockname()[:2]
                sockets["http", HostPort(host, port)] = [endpoint.socket]
        snapshot = self.engine.snapshot if self.config.handover.cache else None
        return handover.Offer(sockets, snapshot, self.engine.loop_id)

    async def _retire(self, channel: handover.Channel, pid: int) -> None:
        """The successor serves the sockets: stop reading, answer what is in flight."""
        await self.engine.pause()
        if self._hurry is not None:
            self._hurry.set()  # a lameduck in progress has nothing left to wait for
        for task in (self._sync_task, self._watch_task):
            if task is not None:
                task.cancel()
        if self._handover is not None:
            # The successor renames its own socket over the path: leave the path alone.
            self._handover.close(unlink=False)
        # The endpoints stop off the event loop while the drain goes on; they still
        # answer /ready 200 meanwhile, which is true of the address: it is served.
        endpoints = asyncio.ensure_future(self._stop_endpoints())
        abandoned = await self.engine.drain()
        await endpoints
        self.ready = False
        with contextlib.suppress(OSError, handover.HandoverError):
            await channel.send("done", {"abandoned": abandoned})
        channel.close()
        await self.engine.close()
        mode = self.config.handover.when_replaced
        log.info(
            "replaced by pid %d; node rules and addresses left to it; %s",
            pid,
            "exiting" if mode == "exit" else "waiting for SIGTERM (handover.when_replaced: wait)",
        )
        self.replaced.set()

    async def _stop_endpoints(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        endpoints = [e for e in (self.http, self.health) if e is not None]
        self.http = self.health = None
        await asyncio.gather(*(_stopped(e) for e in endpoints))

    # -- reload

    def request_reload(self, why: str) -> None:
        """Reload in the background (from a signal handler)."""
        self._spawn(self.reload(why), "dnsproxy-reload")

    async def reload(self, why: str) -> bool:
        """Load the configuration again and apply it; False when refused.

        Refused, with every problem logged and counted, when the file is invalid, a
        restart-only setting changed or a new listener cannot be bound: the running
        configuration then stays as it was, entirely.
        """
        async with self._reload_lock:
            if self._stopping or self.handed_over:
                log.info("reload (%s) skipped: this instance is stopping", why)
                return False
            if self.config_path is not None:
                self._file_seen = reloading.file_signature(self.config_path)
            try:
                # Off the event loop: reading and validating take milliseconds of queries.
                new = await asyncio.to_thread(load_config, self.config_path, self._overrides)
            except ConfigError as exc:
                return self._refuse(why, exc.lines())
            problems = reloading.restart_only(self.config, new)
            if problems:
                return self._refuse(why, problems)
            try:
                await self.check_loops(new)
            except LoopError as exc:
                return self._refuse(why, exc.problems)
            try:
                await self._apply(new, why)
            except OSError as exc:
                return self._refuse(why, [str(exc)])
            self.reloads += 1
            return True

    def _refuse(self, why: str, problems: Iterable[str]) -> bool:
        self.reload_failures += 1
        for problem in problems:
            log.error("reload (%s) refused: %s", why, problem)
        log.error("reload (%s) refused; still running configuration %s", why, self.config_hash)
        return False

    async def _apply(self, new: Config, why: str) -> None:
        old = self.config
        if new == old:
            log.info("reload (%s): configuration %s unchanged", why, self.config_hash)
            return
        # What can fail comes first, undone on failure: nothing has changed yet then.
        undo_listeners = await self.engine.add_listeners(old, new)
        endpoints: list[HttpEndpoint] = []
        try:
            http, health = self.http, self.health
            if new.http_listen != old.http_listen:
                http = self._endpoint(new.http_listen, "/metrics /health /ready")
                endpoints += [e for e in (http,) if e is not None]
            if new.health_listen != old.health_listen:
                health = self._endpoint(new.health_listen, "/health /ready /metrics")
                endpoints += [e for e in (health,) if e is not None]
        except OSError:
            for endpoint in endpoints:
                self._spawn(_stopped(endpoint), "dnsproxy-endpoint-stop")
            undo_listeners()
            raise
        # From here on nothing fails.
        cache = await self.engine.apply(new)
        self._node_cache_names(new)
        for before_ep, after_ep in ((self.http, http), (self.health, health)):
            if before_ep is not None and before_ep is not after_ep:
                self._spawn(_stopped(before_ep), "dnsproxy-endpoint-stop")
        self.http, self.health = http, health
        if (new.log.level, new.log.format) != (old.log.level, old.log.format):
            setup_logging(new.log.level, new.log.format)
        if self.node is not None and new.node is not None:
            self.node.config = new.node  # only sync_interval_s and teardown may differ
        self.config = new
        before_hash, self.config_hash = self.config_hash, reloading.config_hash(new)
        self.config_loaded_at = time.time()
        self._start_watch()
        log.info(
            "reloaded (%s): configuration %s (was %s); listeners %d added, %d removed; %s",
            why,
            self.config_hash,
            before_hash,
            sum(1 for hp in new.listen if hp not in old.listen),
            sum(1 for hp in old.listen if hp not in new.listen),
            cache,
        )

    def _start_watch(self) -> None:
        running = self._watch_task is not None and not self._watch_task.done()
        if self.config_path is None or running or self.config.reload_watch_interval_s <= 0:
            return
        self._watch_task = asyncio.create_task(self._watch(), name="dnsproxy-config-watch")

    async def _watch(self) -> None:
        """Poll the config file; reload when it changed (also a ConfigMap symlink swap)."""
        assert self.config_path is not None
        while True:
            interval = self.config.reload_watch_interval_s
            if interval <= 0:
                return
            await asyncio.sleep(interval)
            seen = reloading.file_signature(self.config_path)
            if seen is not None and seen != self._file_seen:
                await self.reload("config file changed")

    # -- state

    def state_summary(self) -> str:
        """One line on what this instance is doing (logged on SIGUSR1)."""
        values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in self.registry.collect():
            for sample in family.samples:
                values[sample.name, tuple(sorted(sample.labels.items()))] = sample.value

        def value(name: str, **labels: str) -> int:
            return int(values.get((name, tuple(sorted(labels.items()))), 0))

        upstreams = []
        for (name, labels), up in sorted(values.items()):
            if name == "dnsproxy_upstream_up":
                label = dict(labels)["upstream"]
                upstreams.append(
                    f"{label} {'up' if up else 'DOWN'} "
                    f"({value('dnsproxy_upstream_open_connections', upstream=label)} conns, "
                    f"{value('dnsproxy_upstream_inflight', upstream=label)} in flight)"
                )
        listeners = [str(hp) for hp in self.engine.bound]
        listeners += [
            f"http {HostPort(*e.socket.getsockname()[:2])}"
            for e in (self.http, self.health)
            if e is not None
        ]
        kinds = ", ".join(f"{kind} {value('dnsproxy_cache_entries', type=kind)}" for kind in _KINDS)
        parts = [
            f"pid {os.getpid()}, up {time.time() - self.started_at:.0f}s, "
            f"{'ready' if self.ready else 'not ready'}, started by {self.started_by}",
            f"config {self.config_hash} ({self.reloads} reloads, {self.reload_failures} refused)",
            f"listeners {' '.join(listeners) or 'none'}",
            f"cache {sum(value('dnsproxy_cache_entries', type=k) for k in _KINDS)}/"
            f"{value('dnsproxy_cache_capacity')} entries ({kinds}), "
            f"{value('dnsproxy_cache_bytes')} bytes",
            f"queries udp {value('dnsproxy_requests_total', proto='udp')} "
            f"tcp {value('dnsproxy_requests_total', proto='tcp')}, "
            f"hits {value('dnsproxy_cache_hits_total')}, "
            f"misses {value('dnsproxy_cache_misses_total')}",
            f"in flight {value('dnsproxy_inflight')}, tcp clients {value('dnsproxy_tcp_clients')}",
            f"upstreams {'; '.join(upstreams) or 'none'}",
            *self.engine.summary(),
        ]
        if self.node is not None:
            parts.append(
                f"node {self.node.backend} rules present {value('dnsproxy_node_rules_present')}"
            )
        return "state: " + "; ".join(parts)

    async def _log_state(self) -> None:
        await self.engine.refresh()
        log.info("%s", self.state_summary())

    # -- stop

    def hurry(self) -> None:
        """Cut the lameduck period short (a second SIGTERM)."""
        if self._hurry is not None:
            self._hurry.set()

    async def stop(self) -> None:
        self.ready = False
        self._stopping = True
        lameduck = self.config.shutdown_lameduck_s
        if lameduck > 0 and not self.handed_over:
            # Not ready, still serving: whatever watches /ready moves traffic away first. A
            # successor may still take over meanwhile (then nothing is torn down).
            log.info("lameduck: /ready is 503, serving for %.1fs more", lameduck)
            self._hurry = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), lameduck)
        async with self._reload_lock:
            pass  # a reload under way ends first; none starts any more (_stopping)
        async with self._handover_lock:
            # A handover conversation has ended either way; none can start from here on.
            self._tearing_down = not self.handed_over
        if self.handed_over:
            await self.replaced.wait()
            await self._cancel_periodic()
            await self._finish_tasks()
            log.info("stopped")
            return
        if self._handover is not None:
            self._handover.close()
        await self._cancel_periodic()
        if self.node is not None:
            if self.node.config.teardown:
                await self.node.teardown()
            else:
                log.info("node teardown is off: rules and addresses stay in place")
        await self.engine.stop_listening()
        await self.engine.drain()
        await self.engine.close()
        await self._stop_endpoints()
        await self._finish_tasks()
        log.info("stopped")

    async def _cancel_periodic(self) -> None:
        periodic = [self._sync_task, self._watch_task, self._handover_task]
        periodic += [t for t in self._tasks if t.get_name() == "dnsproxy-handover-done"]
        for task in periodic:
            if task is not None:
                task.cancel()
        for task in periodic:
            if task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _finish_tasks(self) -> None:
        """The bounded tasks left (drains, endpoint stops) finish before the loop ends."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def serve_until_signal(self) -> int:
        """Start, serve until a stop signal or a successor, stop; the exit status (1 when
        serving failed for good, see :meth:`abort`)."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_stop(sig: signal.Signals) -> None:
            log.info("%s received", sig.name)
            if stop.is_set():
                self.hurry()
            stop.set()

        def on_ignored(sig: signal.Signals) -> None:
            log.info("%s ignored (SIGHUP reloads, SIGUSR1 logs the state, SIGTERM stops)", sig.name)

        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, on_stop, sig)
        for sig in _IGNORED_SIGNALS:
            loop.add_signal_handler(sig, on_ignored, sig)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload, "SIGHUP")
        loop.add_signal_handler(
            signal.SIGUSR1, lambda: self._spawn(self._log_state(), "dnsproxy-state")
        )
        await self.start()
        stopped = asyncio.ensure_future(stop.wait())
        replaced = asyncio.ensure_future(self.replaced.wait())
        failed = asyncio.ensure_future(self.engine.failed())
        try:
            await asyncio.wait((stopped, replaced, failed), return_when=asyncio.FIRST_COMPLETED)
            if failed.done() and not stop.is_set() and not self.handed_over:
                await self.abort(failed.result())
                return 1
            if not stop.is_set() and self.config.handover.when_replaced == "wait":
                await stopped
        finally:
            for waiting in (stopped, replaced, failed):
                waiting.cancel()
        if stop.is_set():
            log.info("signal received, shutting down")
        await self.stop()
        return 0

    async def abort(self, why: str) -> None:
        """Stop as a killed process would, node rules and addresses left in place (their
        fail-safe then sends the node's queries to CoreDNS), for a failure that serving
        cannot get over (every worker dying again and again)."""
        log.error("%s; exiting, node rules and addresses left in place", why)
        self.ready = False
        self._stopping = True
        if self._handover is not None:
            self._handover.close()
        await self._cancel_periodic()
        await self.engine.close()
        await self._stop_endpoints()
        await self._finish_tasks()


async def _stopped(endpoint: HttpEndpoint) -> None:
    """Stop ``endpoint`` off the event loop (it joins the endpoint's server thread)."""
    await asyncio.to_thread(endpoint.stop)


class _Lifecycle:
    """Reload and handover figures of a running :class:`App`, as a metric source."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        yield CounterMetricFamily(
            "dnsproxy_reloads",
            "Configuration reloads applied (SIGHUP or a changed file).",
            value=app.reloads,
        )
        yield CounterMetricFamily(
            "dnsproxy_reload_failures",
            "Reloads refused (invalid file, restart-only change, address in use); "
            "the running configuration stayed.",
            value=app.reload_failures,
        )
        info = GaugeMetricFamily(
            "dnsproxy_config_info", "Digest of the configuration in use.", labels=["hash"]
        )
        info.add_metric([app.config_hash], 1)
        yield info
        yield GaugeMetricFamily(
            "dnsproxy_config_loaded_timestamp_seconds",
            "When the configuration in use was loaded (Unix time).",
            value=app.config_loaded_at,
        )
        start = GaugeMetricFamily(
            "dnsproxy_start_info",
            "How this instance got its listeners: handover (from the instance it replaced) "
            "or bind.",
            labels=["how"],
        )
        start.add_metric([app.started_by], 1)
        yield start
        yield GaugeMetricFamily(
            "dnsproxy_handover_cache_entries",
            "Cache entries received from the replaced instance at start.",
            value=app.handover_entries,
        )


async def _serve(
    config: Config, loop_name: str, path: str | None, overrides: Overrides | None
) -> int:
    tune_gc()
    # workers: N > 1 makes this process the supervisor of N workers (dnsproxy.workers).
    pool = WorkerPool(config) if config.workers > 1 else None
    return await App(config, loop_name, path, overrides, pool).serve_until_signal()


def run(config: Config, path: str | None = None, overrides: Overrides | None = None) -> int:
    """Run until stopped or replaced; the exit code for the process.

    ``path`` and ``overrides`` are what ``config`` was loaded from, read again on reload.
    """
    # Until the event loop's handlers are in place, a reload or status signal must not
    # end the process by its default action; SIGPIPE stays ignored for good (as Python
    # sets it): a write to a closed socket is an error on that socket only.
    for sig in (signal.SIGHUP, signal.SIGUSR1, *_IGNORED_SIGNALS, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    setup_logging(config.log.level, config.log.format)
    name, factory = loop_factory()
    try:
        with asyncio.Runner(loop_factory=factory) as runner:
            return runner.run(_serve(config, name, path, overrides))
    except LoopError as exc:
        for problem in exc.problems:
            log.error("refusing the configuration: %s", problem)
        return 2  # as for any configuration refused
    except (OSError, NodeError, WorkerError) as exc:
        log.error("cannot start: %s", exc)
        return 1
