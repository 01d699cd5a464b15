"""Several processes answering queries (``workers: N``): a supervisor and its workers.

With ``workers: 1`` none of this runs: one process does everything (:mod:`dnsproxy.app`
with an :class:`~dnsproxy.engine.Engine`). With N > 1 the process started is the
supervisor: :class:`dnsproxy.app.App` with a :class:`WorkerPool` where a single process
has its engine. It keeps what exists once per node: the listening sockets, the HTTP
endpoints, the node role, the handover listener, the configuration (reading, validation,
the file watch) and the signals. Each worker is a ``python -m dnsproxy worker`` process
running an Engine: its own cache, forwarder and upstream connections.

Sockets. Every listen address is bound as N UDP and N TCP sockets of one SO_REUSEPORT
group (:func:`dnsproxy.server.bind_group`) and worker i reads member i: the kernel hashes
a client's address and port to one member, so a datagram wakes one worker, where one
socket read by N processes would wake them all. The supervisor keeps every member open
and never reads one. When a worker dies its members stay in the group (the kernel goes
on hashing its clients to them) with what is queued in them: the supervisor hands them
at once to a serving sibling, which reads them beside its own until the replacement,
given the same sockets, serves, and then stops. So its clients wait milliseconds, not
the restart, and nothing queued is lost however small the socket buffers. Sockets taken
over from an instance with another number of workers are shared out: more members than
workers, some worker reads several; fewer, the group grows when the kernel lets it, else
workers share a member.

A worker that dies is restarted at once, or after a back-off (0.1 s doubling to 5 s)
when it had not been serving for 10 s, with a copy of a sibling's cache; counted in
``dnsproxy_worker_restarts_total``, its exit status logged. A worker whose event loop
stops answering the supervisor's pings for 5 s is killed and restarted. When no worker
has served for 30 s the supervisor gives up and exits 1 without node teardown, as a
killed process would, so that the node's fail-safe rules send queries to CoreDNS.

Control channel: a Unix socket pair per worker, framed as the handover's (a JSON header,
a payload, descriptors alongside: :class:`dnsproxy.handover.Channel`). The supervisor
asks, the worker answers ``reply`` with the request's ``id`` (and ``error`` on failure)::

    prepare   {index}, pickle of {config, cache, cache_time, loop_id} -> {restored}
    start     {sockets: [[kind, host, port]...]} + descriptors  -> {pid}
    ping                                                        -> {}
    metrics                                                     -> JSON families
    snapshot  {max_entries, max_bytes}                          -> {entries} + payload
    reload    {sockets}, pickle of the config + descriptors     -> {detail}
    adopt     {of, sockets} + descriptors (a dead sibling's)    -> {}
    release   {of}                                              -> {}
    pause, stop_listening                                       -> {}
    drain                                                       -> {abandoned}
    close                                                       -> {}, then it exits 0

A worker ignores the signals a process manager sends (SIGTERM, SIGINT, SIGHUP, ...):
systemd signals every process of a unit, a terminal's Ctrl-C the whole process group,
and the supervisor's order (lameduck, node teardown, then drain) must hold. It exits when
told to close, or as soon as its channel closes (the supervisor is gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dnsproxy import handover
from dnsproxy.cache import DEFAULT_MAX_BYTES
from dnsproxy.config_types import Config, HostPort
from dnsproxy.engine import Engine
from dnsproxy.errors import DnsproxyError
from dnsproxy.runtime import loop_factory, setup_logging, tune_gc
from dnsproxy.server import Inherited, bind_group, udp_drops_family, udp_receive_drops

log = logging.getLogger("dnsproxy")

_MAX_PAYLOAD = 256 << 20  # a cache snapshot (at most 64 MiB) with a configuration
_START_TIMEOUT_S = 60.0  # start-up and cache restore of a worker on a loaded machine
_REQUEST_TIMEOUT_S = 30.0  # a reload (cache rebuilt), a snapshot, a drain within its grace
_METRICS_TIMEOUT_S = 2.0  # a scrape waits this long for a worker, then uses its last figures
_PING_EVERY_S = 1.0
_STALL_S = 5.0  # a worker whose event loop has not answered a ping this long is killed
_BACKOFF_MIN_S = 0.1
_BACKOFF_MAX_S = 5.0
_STABLE_S = 10.0  # a worker that served this long is restarted at once
_GIVE_UP_S = 30.0  # no worker serving this long: exit, and let the fail-safe take over
_EXIT_WAIT_S = 10.0  # a closed worker that has not exited by then is killed
# Worker processes ignore what a process manager or a terminal sends to every process.
_WORKER_IGNORES = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGALRM,
    signal.SIGPIPE,
)
# Gauges that are not summed over the workers: each worker reports the same fact (its
# own start, its own file limit) or a state where one worker's view is not the node's.
# Families the supervisor exports for the whole instance from its own view, in place of the
# workers': the kernel's drops at each socket are counted once per socket, which a worker
# reading a dead sibling's socket (or the replacement reading it again) would not be.
_SUPERVISOR_ONLY = frozenset({"dnsproxy_udp_receive_drops"})
_MIN_GAUGES = frozenset({"process_start_time_seconds", "process_max_fds", "dnsproxy_upstream_up"})


class WorkerError(DnsproxyError):
    """A worker did not start, did not answer, or answered with an error."""


def members(group_size: int, workers: int, index: int) -> list[int]:
    """The members of an SO_REUSEPORT group of ``group_size`` sockets that worker ``index``
    of ``workers`` reads: every ``workers``-th from its own index when the group is at
    least as large, else the one it shares with others."""
    if group_size >= workers:
        return list(range(index, group_size, workers))
    return [index % group_size]


# -- metric families as they travel from a worker to the supervisor

SampleKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(slots=True)
class Family:
    """One metric family in a form that travels as JSON and merges sample by sample."""

    name: str
    type: str
    help: str
    samples: dict[SampleKey, float] = field(default_factory=dict)

    @classmethod
    def of(cls, metric: Metric) -> Family:
        out = cls(metric.name, metric.type, metric.documentation)
        for sample in metric.samples:
            out.samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
        return out

    def encode(self) -> list[Any]:
        samples = [[name, dict(labels), value] for (name, labels), value in self.samples.items()]
        return [self.name, self.type, self.help, samples]

    @classmethod
    def decode(cls, item: Any) -> Family:
        name, kind, doc, samples = item
        out = cls(str(name), str(kind), str(doc))
        for sample, labels, value in samples:
            out.samples[str(sample), tuple(sorted(labels.items()))] = float(value)
        return out

    def metric(self) -> Metric:
        out = Metric(self.name, self.help, self.type)
        for (name, labels), value in self.samples.items():
            out.add_sample(name, dict(labels), value)
        return out

    @property
    def accumulates(self) -> bool:
        """Counters and histograms: summed, and carried over a worker's restart."""
        return self.type in ("counter", "histogram", "summary", "gaugehistogram")


def merge(sources: Iterable[Iterable[Family]]) -> list[Family]:
    """One family per name over every source (the supervisor, each worker, the totals of
    workers that ended): counters and histograms summed sample by sample, gauges summed
    except the ``*_info`` ones (one sample per label set), timestamps (the latest) and
    those of :data:`_MIN_GAUGES` (the least: ``dnsproxy_upstream_up`` is 1 only while
    every worker sees the server up)."""
    merged: dict[str, Family] = {}
    for families in sources:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = Family(family.name, family.type, family.help)
                into = merged[family.name]
            combine = _combiner(family)
            for key, value in family.samples.items():
                seen = into.samples.get(key)
                into.samples[key] = value if seen is None else combine(seen, value)
    return list(merged.values())


def _combiner(family: Family) -> Callable[[float, float], float]:
    if family.accumulates:
        return _add
    if family.type == "info" or family.name.endswith("_info") or family.name in _MIN_GAUGES:
        return min
    if family.name.endswith("_timestamp_seconds"):
        return max
    return _add


def _add(a: float, b: float) -> float:
    return a + b


def _carry(totals: dict[str, Family], families: Iterable[Family]) -> None:
    """Add the counters and histograms of a worker that ended to ``totals``, so that the
    sums exported stay monotonic across its restart."""
    for family in families:
        if not family.accumulates:
            continue
        into = totals.setdefault(family.name, Family(family.name, family.type, family.help))
        for key, value in family.samples.items():
            into.samples[key] = into.samples.get(key, 0.0) + value


# -- the supervisor side


class _Link:
    """The supervisor's end of one worker's control channel: requests and their replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.channel = handover.Channel(sock)
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[handover.Message]] = {}
        self._send_lock = asyncio.Lock()
        self.closed = False
        self._reader = asyncio.create_task(self._read(), name="dnsproxy-worker-link")

    async def _read(self) -> None:
        try:
            while True:
                message = await self.channel.recv(_MAX_PAYLOAD)
                waiter = self._waiting.pop(message.header.get("id", -1), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(message)
        except (OSError, handover.HandoverError):
            pass
        finally:
            self.closed = True
            for waiter in self._waiting.values():
                if not waiter.done():
                    waiter.set_exception(WorkerError("its control channel closed"))
            self._waiting.clear()

    async def ask(
        self,
        kind: str,
        fields: dict[str, Any] | None = None,
        payload: bytes = b"",
        fds: list[int] | None = None,
        timeout_s: float = _REQUEST_TIMEOUT_S,
    ) -> handover.Message:
        """Send a request and wait for its reply; WorkerError when the worker is gone,
        times out or answers with an error."""
        if self.closed:
            raise WorkerError("its control channel is closed")
        ident = next(self._ids)
        waiter: asyncio.Future[handover.Message] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = waiter
        try:
            async with self._send_lock:
                await self.channel.send(kind, {**(fields or {}), "id": ident}, payload, fds)
            async with asyncio.timeout(timeout_s):
                message = await waiter
        except TimeoutError:
            raise WorkerError(f"no answer to {kind} within {timeout_s:g}s") from None
        except OSError as exc:
            raise WorkerError(f"{kind}: {exc}") from None
        finally:
            self._waiting.pop(ident, None)
        error = message.header.get("error")
        if error is not None:
            raise WorkerError(f"{kind}: {error}")
        return message

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self.channel.close()


@dataclass(eq=False)
class _Slot:
    """Worker ``index``: its current process, and what outlives the process."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    link: _Link | None = None
    serving: bool = False
    serving_since: float = 0.0
    restarts: int = 0
    backoff_s: float = 0.0
    families: list[Family] = field(default_factory=list)  # at the last scrape
    carried: dict[str, Family] = field(default_factory=dict)  # counters of ended processes
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    # The sibling reading this worker's sockets while it restarts (see _adopt).
    adoption: asyncio.Task[_Slot | None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0


@dataclass(slots=True)
class _Group:
    """The sockets of one listen address: ``udp[i]`` and ``tcp[i]`` are members of the
    address's SO_REUSEPORT groups."""

    udp: list[socket.socket]
    tcp: list[socket.socket]

    def close(self) -> None:
        for sock in (*self.udp, *self.tcp):
            sock.close()


class WorkerPool:
    """N worker processes answering the queries of one instance, behind the supervisor
    (a :class:`dnsproxy.engine.Serving`)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.count = config.workers
        self._slots = [_Slot(i) for i in range(self.count)]
        self._groups: dict[HostPort, _Group] = {}  # by configured address
        self._pending: dict[HostPort, _Group] = {}  # bound by a reload, not yet applied
        self._lock = asyncio.Lock()  # restarts, reloads and the stop, one at a time
        self._stopping = False
        self._started = False
        self._none_since = 0.0
        self._failed = asyncio.Event()
        self.failure = ""
        self._process = ProcessCollector(registry=None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._merged: list[Metric] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        # Given to every worker's forwarder: a loop probe coming back to any worker is
        # recognised there (see Forwarder.find_loops).
        self.loop_id = secrets.token_hex(8)

    # -- what the lifecycle asks

    @property
    def bound(self) -> list[HostPort]:
        return [_local(group.udp[0]) for group in self._groups.values()]

    @property
    def serving(self) -> bool:
        return all(slot.serving for slot in self._slots)

    def problem(self) -> str | None:
        """Why /health should fail: no worker serves (one restarting is not a problem)."""
        if any(slot.serving for slot in self._slots):
            return None
        return f"none of the {self.count} workers is serving"

    async def failed(self) -> str:
        """Wait until the pool gives up (no worker served for 30 s); the reason."""
        await self._failed.wait()
        return self.failure

    async def start(self, inherited: Inherited, snapshot: bytes | None, taken_at: float) -> int:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        try:
            # Every worker builds its engine and restores the cache first, so that the
            # sockets are read as soon as they are handed over: a member added to a group
            # taken over gets its share of the traffic from the moment it is bound.
            restored = await _all(self._prepare(slot, snapshot, taken_at) for slot in self._slots)
            for hp in self.config.listen:
                udps = inherited.pop(("udp", hp), [])
                tcps = inherited.pop(("tcp", hp), [])
                self._groups[hp] = _Group(*bind_group(hp, self.count, udps, tcps))
            await _all(self._start(slot) for slot in self._slots)
        except BaseException:
            await self.close()
            raise
        self._started = True
        shapes = ", ".join(f"{hp} x{len(g.udp)}" for hp, g in self._groups.items())
        log.info(
            "%d workers serving (pids %s); sockets per address: %s",
            self.count,
            " ".join(str(slot.pid) for slot in self._slots),
            shapes,
        )
        self._spawn(self._watch_all(), "dnsproxy-workers-watch")
        return int(restored[0])

    def sockets(self) -> handover.Sockets:
        out: handover.Sockets = {}
        for group in self._groups.values():
            hp = _local(group.udp[0])
            out["udp", hp] = list(group.udp)
            out["tcp", hp] = list(group.tcp)
        return out

    async def snapshot(self, max_entries: int, max_bytes: int) -> tuple[bytes, int]:
        """The workers' caches, each bounded by its share of ``max_bytes``, one after the
        other: a name cached by several workers travels more than once and the last copy
        wins, and each worker holds the names of its own clients."""
        serving = [slot for slot in self._slots if slot.serving]
        share = max_bytes // max(1, len(serving))
        asked = [self._snapshot_of(slot, max_entries, share) for slot in serving]
        parts = await asyncio.gather(*asked)
        return b"".join(p for p, _ in parts), sum(n for _, n in parts)

    async def _snapshot_of(
        self, slot: _Slot, max_entries: int, max_bytes: int
    ) -> tuple[bytes, int]:
        if slot.link is None:
            return b"", 0
        try:
            reply = await slot.link.ask(
                "snapshot", {"max_entries": max_entries, "max_bytes": max_bytes}
            )
        except WorkerError as exc:
            log.warning("worker %d: no cache snapshot (%s)", slot.index, exc)
            return b"", 0
        return reply.payload, int(reply.header.get("entries", 0))

    async def pause(self) -> None:
        await self._tell_all("pause")

    async def stop_listening(self) -> None:
        await self._tell_all("stop_listening")

    async def _tell_all(
        self, kind: str, timeout_s: float = _REQUEST_TIMEOUT_S
    ) -> list[handover.Message | None]:
        """Ask every serving worker; no restart from here on. None for a worker that
        did not answer (it has died: what it held is gone with it)."""
        async with self._lock:
            self._stopping = True
            asked = (self._ask(slot, kind, timeout_s) for slot in self._slots)
            return await asyncio.gather(*asked)

    async def _ask(
        self, slot: _Slot, kind: str, timeout_s: float = _REQUEST_TIMEOUT_S
    ) -> handover.Message | None:
        if not slot.serving or slot.link is None:
            return None
        try:
            return await slot.link.ask(kind, timeout_s=timeout_s)
        except WorkerError as exc:
            log.warning("worker %d: %s", slot.index, exc)
            return None

    async def drain(self) -> int:
        # A worker's own questions, then those of forwarders a reload replaced: each
        # bounded by the grace.
        replies = await self._tell_all("drain", 2 * self.config.shutdown_grace_s + 30)
        return sum(int(r.header.get("abandoned", 0)) for r in replies if r is not None)

    async def close(self) -> None:
        """Close every worker (each closes its engine and exits), then the sockets."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(self._close(slot) for slot in self._slots))
        for group in (*self._groups.values(), *self._pending.values()):
            group.close()
        self._groups.clear()
        self._pending.clear()

    async def _close(self, slot: _Slot) -> None:
        proc = slot.proc
        if slot.serving:
            await self._ask(slot, "close")  # then it exits by itself
        else:
            self._kill(slot)  # starting, or restarting: it serves nothing yet
        if slot.adoption is not None:
            slot.adoption.cancel()
        slot.serving = False
        for task in list(slot.tasks):
            task.cancel()
        if proc is not None and proc.returncode is None:
            try:
                await asyncio.wait_for(proc.wait(), _EXIT_WAIT_S)
            except TimeoutError:
                log.warning("worker %d (pid %d) did not exit; killed", slot.index, proc.pid)
                proc.kill()
                await proc.wait()
        if slot.link is not None:
            await slot.link.close()

    async def add_listeners(self, old: Config, new: Config) -> Callable[[], None]:
        try:
            for hp in new.listen:
                if hp not in old.listen and hp not in self._pending:
                    self._pending[hp] = _Group(*bind_group(hp, self.count, [], []))
        except OSError:
            self._drop_pending()
            raise
        return self._drop_pending

    def _drop_pending(self) -> None:
        for group in self._pending.values():
            group.close()
        self._pending.clear()

    async def apply(self, new: Config) -> str:
        async with self._lock:
            old = self.config
            self._groups.update(self._pending)
            added, self._pending = self._pending, {}
            removed = [self._groups.pop(hp) for hp in old.listen if hp not in new.listen]
            self.config = new
            payload = pickle.dumps(new)
            asked = []
            for slot in self._slots:
                header, fds = self._sockets_for(slot, added)
                asked.append(self._reload(slot, header, payload, fds))
            details = await asyncio.gather(*asked)
            # Each worker holds its own descriptors of what it still answers on.
            for group in removed:
                group.close()
        applied = [f"worker {i}: {d}" for i, d in enumerate(details) if d is not None]
        return "; ".join(applied) or "no worker serving"

    async def _reload(
        self, slot: _Slot, header: list[list[Any]], payload: bytes, fds: list[int]
    ) -> str | None:
        if not slot.serving or slot.link is None:
            return None
        try:
            reply = await slot.link.ask("reload", {"sockets": header}, payload, fds)
        except WorkerError as exc:
            # Its restart starts it with the configuration just applied.
            log.error("worker %d did not apply the reload (%s); restarting it", slot.index, exc)
            self._kill(slot)
            return None
        return str(reply.header.get("detail", ""))

    # -- metrics

    def collect(self) -> Iterator[Metric]:
        """The whole instance's families: the workers' merged with the supervisor's own
        process figures, and the per-worker ones. Called from the HTTP endpoint's thread
        (a scrape), it first asks every worker for its figures on the event loop; on the
        loop itself (SIGUSR1) the caller has done so with :meth:`refresh`."""
        loop = self._loop
        if loop is None:
            return iter(())
        if threading.get_ident() == self._loop_thread:
            return iter(self._families())
        try:
            future = asyncio.run_coroutine_threadsafe(self._collected(), loop)
            self._merged = future.result(_METRICS_TIMEOUT_S * 2)
        except (TimeoutError, RuntimeError):
            pass  # the loop is busy or stopping: the figures of the last scrape
        return iter(self._merged)

    async def _collected(self) -> list[Metric]:
        await self.refresh()
        return self._families()

    async def refresh(self) -> None:
        await asyncio.gather(*(self._scrape(slot) for slot in self._slots if slot.serving))

    async def _scrape(self, slot: _Slot) -> None:
        if slot.link is None:
            return
        try:
            reply = await slot.link.ask("metrics", timeout_s=_METRICS_TIMEOUT_S)
            families = [Family.decode(item) for item in json.loads(reply.payload)]
            slot.families = [f for f in families if f.name not in _SUPERVISOR_ONLY]
        except (WorkerError, ValueError, TypeError) as exc:
            log.debug("worker %d: metrics not read (%s); its last figures stand", slot.index, exc)

    def _families(self) -> list[Metric]:
        own = [Family.of(m) for m in self._process.collect()]
        members = [sock for group in self._groups.values() for sock in group.udp]
        own.append(Family.of(udp_drops_family(udp_receive_drops(members))))
        sources: list[Iterable[Family]] = [own]
        for slot in self._slots:
            if slot.serving:
                sources.append(slot.families)
            sources.append(slot.carried.values())
        out = [family.metric() for family in merge(sources)]
        out.extend(self._per_worker())
        return out

    def _per_worker(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "dnsproxy_workers", "Worker processes configured (workers).", value=self.count
        )
        up = GaugeMetricFamily(
            "dnsproxy_worker_up",
            "1 while the worker serves, 0 while it restarts.",
            labels=["worker"],
        )
        restarts = CounterMetricFamily(
            "dnsproxy_worker_restarts",
            "Times the worker was restarted after it died or stopped answering.",
            labels=["worker"],
        )
        requests = CounterMetricFamily(
            "dnsproxy_worker_requests",
            "Valid queries the worker received (how the kernel spreads clients).",
            labels=["worker"],
        )
        for slot in self._slots:
            label = [str(slot.index)]
            up.add_metric(label, 1 if slot.serving else 0)
            restarts.add_metric(label, slot.restarts)
            sources = [*(slot.families if slot.serving else []), *slot.carried.values()]
            count = sum(
                value
                for family in sources
                if family.name == "dnsproxy_requests"
                for value in family.samples.values()
            )
            requests.add_metric(label, count)
        yield up
        yield restarts
        yield requests

    def summary(self) -> list[str]:
        serving = sum(slot.serving for slot in self._slots)
        pids = " ".join(f"{slot.index}:{slot.pid if slot.serving else '-'}" for slot in self._slots)
        restarts = sum(slot.restarts for slot in self._slots)
        return [f"workers {serving}/{self.count} serving (pids {pids}), {restarts} restarts"]

    # -- one worker's life

    async def _prepare(self, slot: _Slot, snapshot: bytes | None, taken_at: float) -> int:
        """Start worker ``slot``'s process and have it build its engine; entries restored."""
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "dnsproxy", "worker", str(slot.index), str(child.fileno())),
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        slot.proc, slot.link = proc, _Link(parent)
        self._slot_task(slot, self._exited(slot, proc, slot.link), "dnsproxy-worker-exit")
        state = {
            "config": self.config,
            "cache": snapshot,
            "cache_time": taken_at,
            "loop_id": self.loop_id,
        }
        reply = await slot.link.ask(
            "prepare", {"index": slot.index}, pickle.dumps(state), timeout_s=_START_TIMEOUT_S
        )
        return int(reply.header.get("restored", 0))

    async def _start(self, slot: _Slot) -> None:
        """Hand worker ``slot`` its sockets: it serves from here on."""
        assert slot.link is not None
        header, fds = self._sockets_for(slot, self._groups)
        await slot.link.ask("start", {"sockets": header}, fds=fds, timeout_s=_START_TIMEOUT_S)
        slot.serving = True
        slot.serving_since = time.monotonic()
        self._slot_task(slot, self._watchdog(slot, slot.link), "dnsproxy-worker-watchdog")

    def _sockets_for(
        self, slot: _Slot, groups: dict[HostPort, _Group]
    ) -> tuple[list[list[Any]], list[int]]:
        """The members of ``groups`` worker ``slot`` reads, described (kind and configured
        address, as its engine looks them up) and as descriptors."""
        header: list[list[Any]] = []
        fds: list[int] = []
        for hp, group in groups.items():
            for i in members(len(group.udp), self.count, slot.index):
                for kind, sock in (("udp", group.udp[i]), ("tcp", group.tcp[i])):
                    header.append([kind, hp.host, hp.port])
                    fds.append(sock.fileno())
        return header, fds

    async def _exited(self, slot: _Slot, proc: asyncio.subprocess.Process, link: _Link) -> None:
        """Wait for the process to end; restart it unless the pool is stopping."""
        status = await proc.wait()
        await link.close()
        served_s = time.monotonic() - slot.serving_since if slot.serving else 0.0
        slot.serving = False
        _carry(slot.carried, slot.families)
        slot.families = []
        for task in list(slot.tasks):
            if task is not asyncio.current_task():
                task.cancel()
        if self._stopping or not self._started or slot.proc is not proc:
            return  # stopping, or a failed start that start() reports itself
        slot.restarts += 1
        if served_s >= _STABLE_S:
            slot.backoff_s = 0.0
        else:
            _back_off(slot)
        log.error(
            "worker %d (pid %d) exited with %s after serving %.1fs; restarting it%s "
            "(restart %d); the other workers go on serving",
            slot.index,
            proc.pid,
            _status(status),
            served_s,
            f" in {slot.backoff_s:.1f}s" if slot.backoff_s else "",
            slot.restarts,
        )
        if _unadopted(slot):
            slot.adoption = asyncio.create_task(self._adopt(slot), name="dnsproxy-worker-adopt")
        self._spawn(self._restart(slot, proc.pid), f"dnsproxy-worker-{slot.index}-restart")

    async def _adopt(self, slot: _Slot) -> _Slot | None:
        """Have a serving sibling read ``slot``'s sockets until its replacement does, so
        that its clients wait milliseconds rather than the restart, and no more than a
        socket buffer of their queries waits at all. The sibling, or None."""
        sibling = next((s for s in self._slots if s.serving and s.link is not None), None)
        if sibling is None or sibling.link is None:
            return None
        header, fds = self._sockets_for(slot, self._groups)
        try:
            await sibling.link.ask("adopt", {"of": slot.index, "sockets": header}, fds=fds)
        except WorkerError as exc:
            log.warning("worker %d could not read worker %d's sockets: %s", sibling.index,
                        slot.index, exc)  # fmt: skip
            return None
        return sibling

    async def _release(self, slot: _Slot) -> None:
        """``slot``'s replacement reads its sockets: the sibling stops reading them."""
        adoption, slot.adoption = slot.adoption, None
        sibling = await adoption if adoption is not None else None
        if sibling is not None and sibling.serving and sibling.link is not None:
            with contextlib.suppress(WorkerError):
                await sibling.link.ask("release", {"of": slot.index})

    async def _restart(self, slot: _Slot, old_pid: int) -> None:
        await asyncio.sleep(slot.backoff_s)
        began = time.monotonic()
        async with self._lock:
            if self._stopping:
                return
            try:
                sibling = next((s for s in self._slots if s.serving), None)
                snapshot, entries = b"", 0
                taken_at = time.time()  # before: the entries' ages then err on the old side
                if sibling is not None:
                    limits = (self.config.cache_max_entries, DEFAULT_MAX_BYTES)
                    snapshot, entries = await self._snapshot_of(sibling, *limits)
                await self._prepare(slot, snapshot or None, taken_at)
                await self._start(slot)
                await self._release(slot)
            except (OSError, WorkerError) as exc:
                log.error("worker %d did not start again: %s", slot.index, exc)
                if slot.pid != old_pid:
                    self._kill(slot)  # its exit brings the next try, after a longer back-off
                else:  # no process was started
                    _back_off(slot)
                    self._spawn(self._restart(slot, old_pid), f"dnsproxy-worker-{slot.index}")
                return
        log.info(
            "worker %d restarted as pid %d (was %d) in %.2fs, with %d cache entries of worker %s",
            slot.index,
            slot.pid,
            old_pid,
            time.monotonic() - began,
            entries,
            sibling.index if sibling is not None else "-",
        )

    async def _watchdog(self, slot: _Slot, link: _Link) -> None:
        """Ping the worker; kill it when its event loop has not answered for _STALL_S."""
        while True:
            await asyncio.sleep(_PING_EVERY_S)
            try:
                await link.ask("ping", timeout_s=_STALL_S)
            except WorkerError as exc:
                if link.closed:
                    return  # it has died; _exited restarts it
                log.error("worker %d (pid %d) stalled (%s); killing it", slot.index, slot.pid, exc)
                self._kill(slot)
                return

    async def _watch_all(self) -> None:
        """Give up when no worker has served for _GIVE_UP_S (see the module's docstring)."""
        while not self._stopping:
            await asyncio.sleep(_PING_EVERY_S)
            if any(slot.serving for slot in self._slots):
                self._none_since = 0.0
                continue
            now = time.monotonic()
            self._none_since = self._none_since or now
            if now - self._none_since >= _GIVE_UP_S:
                self.failure = f"no worker has served for {_GIVE_UP_S:g}s"
                self._failed.set()
                return

    def _kill(self, slot: _Slot) -> None:
        if slot.proc is not None and slot.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                slot.proc.kill()

    def _slot_task(self, slot: _Slot, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        slot.tasks.add(task)
        task.add_done_callback(slot.tasks.discard)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _unadopted(slot: _Slot) -> bool:
    """Whether no sibling reads ``slot``'s sockets (one still does after a failed
    restart, until a replacement serves)."""
    adoption = slot.adoption
    if adoption is None:
        return True
    if not adoption.done():
        return False
    sibling = None if adoption.cancelled() else adoption.result()
    return sibling is None or not sibling.serving


def _back_off(slot: _Slot) -> None:
    """Wait longer before the next start of a worker that did not serve for long."""
    slot.backoff_s = min(_BACKOFF_MAX_S, max(_BACKOFF_MIN_S, slot.backoff_s * 2))


async def _all(coros: Iterable[Awaitable[Any]]) -> list[Any]:
    """Await every one of ``coros``, then raise the first exception, if any: none is left
    running behind a failure (a worker process half started)."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def _local(sock: socket.socket) -> HostPort:
    host, port = sock.getsockname()[:2]
    return HostPort(host, port)


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


# -- the worker side


class _Worker:
    """One worker process: an engine, driven by the supervisor's requests."""

    def __init__(self, index: int, channel: handover.Channel) -> None:
        self.index = index
        self.channel = channel
        self.engine: Engine | None = None
        # Listeners of a sibling's sockets read while it restarts, by its index.
        self._adopted: dict[int, list[Any]] = {}
        self._process = ProcessCollector(registry=None)
        self._send_lock = asyncio.Lock()
        # Requests that change the engine run one at a time, in the order sent.
        self._state_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = asyncio.Event()

    async def run(self) -> int:
        """Serve requests until told to close (0) or the supervisor is gone (1)."""
        reader = asyncio.create_task(self._read(), name="dnsproxy-worker-requests")
        closed = asyncio.create_task(self._closed.wait())
        await asyncio.wait((reader, closed), return_when=asyncio.FIRST_COMPLETED)
        reader.cancel()
        closed.cancel()
        if self._closed.is_set():
            return 0
        log.warning("the supervisor is gone; exiting")
        if self.engine is not None:
            await self.engine.close()
        return 1

    async def _read(self) -> None:
        with contextlib.suppress(OSError, handover.HandoverError):
            while True:
                message = await self.channel.recv(_MAX_PAYLOAD)
                task = asyncio.create_task(self._handle(message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: handover.Message) -> None:
        fields: dict[str, Any] = {}
        payload = b""
        try:
            if message.kind in ("ping", "metrics", "snapshot"):
                payload, fields = await self._look(message)
            else:
                async with self._state_lock:
                    fields = await self._change(message)
        except Exception as exc:
            log.exception("%s failed", message.kind)
            fields = {"error": str(exc) or type(exc).__name__}
        finally:
            for fd in message.fds:  # those not taken into a socket
                with contextlib.suppress(OSError):
                    os.close(fd)
        async with self._send_lock:
            with contextlib.suppress(OSError):
                await self.channel.send(
                    "reply", {**fields, "id": message.header.get("id")}, payload
                )
        if message.kind == "close":
            self._closed.set()

    async def _look(self, message: handover.Message) -> tuple[bytes, dict[str, Any]]:
        engine = self.engine
        if message.kind == "metrics":
            families = [*(engine.collect() if engine is not None else ()), *self._process.collect()]
            return json.dumps([Family.of(m).encode() for m in families]).encode(), {}
        if message.kind == "snapshot" and engine is not None:
            header = message.header
            payload, count = await engine.snapshot(
                int(header.get("max_entries", 0)), int(header.get("max_bytes", 0))
            )
            return payload, {"entries": count}
        return b"", {}

    async def _change(self, message: handover.Message) -> dict[str, Any]:
        kind = message.kind
        if kind == "prepare":
            state = pickle.loads(message.payload)
            config: Config = state["config"]
            setup_logging(config.log.level, config.log.format, worker=self.index)
            self.engine = Engine(config, loop_id=state.get("loop_id"))
            self.engine.server.inherited_from = "from the supervisor"
            restored = 0
            if state["cache"] is not None:
                restored = await self.engine.restore(state["cache"], state["cache_time"])
            return {"restored": restored}
        engine = self.engine
        if engine is None:
            raise WorkerError(f"{kind} before prepare")
        if kind == "start":
            await engine.start(self._sockets(message), None, 0.0)
            return {"pid": os.getpid()}
        if kind == "reload":
            new: Config = pickle.loads(message.payload)
            old = engine.config
            await engine.add_listeners(old, new, self._sockets(message))
            if (new.log.level, new.log.format) != (old.log.level, old.log.format):
                setup_logging(new.log.level, new.log.format, worker=self.index)
            return {"detail": await engine.apply(new)}
        if kind == "adopt":
            of = int(message.header["of"])
            self._release(engine, of)
            self._adopted[of] = await engine.server.adopt(self._sockets(message))
            log.info("reading the sockets of worker %d too while it restarts", of)
        elif kind == "release":
            self._release(engine, int(message.header["of"]))
        elif kind == "pause":
            await engine.pause()
        elif kind == "stop_listening":
            await engine.stop_listening()
        elif kind == "drain":
            return {"abandoned": await engine.drain()}
        elif kind == "close":
            await engine.close()
        else:
            raise WorkerError(f"unknown request {kind!r}")
        return {}

    def _release(self, engine: Engine, of: int) -> None:
        """Stop reading worker ``of``'s sockets; close them once the answers to what was
        read from them are out (the longest a question may take)."""
        listeners = self._adopted.pop(of, None)
        if listeners:
            longest = max(zone.deadline_s for zone in engine.config.zones)
            engine.server.release(listeners, longest + 1.0)

    @staticmethod
    def _sockets(message: handover.Message) -> Inherited:
        """The sockets a request carries, by kind and configured address."""
        described = message.header.get("sockets", [])
        if len(described) != len(message.fds):
            raise WorkerError("the socket list does not match the descriptors received")
        out: Inherited = {}
        for kind, host, port in described:
            sock = socket.socket(fileno=message.fds.pop(0))
            out.setdefault((str(kind), HostPort(str(host), int(port))), []).append(sock)
        return out


def worker_main(argv: list[str]) -> int:
    """``dnsproxy worker INDEX FD``: run worker INDEX on the control channel FD (started
    by its supervisor, never by hand); the exit status."""
    if len(argv) != 2 or not all(arg.isdigit() for arg in argv):
        print(
            "dnsproxy worker: started by the supervisor (workers: N), not by hand", file=sys.stderr
        )
        return 2
    for sig in _WORKER_IGNORES:
        signal.signal(sig, signal.SIG_IGN)
    index, fd = int(argv[0]), int(argv[1])
    setup_logging("info", "text", worker=index)
    _, factory = loop_factory()

    async def work() -> int:
        tune_gc()
        return await _Worker(index, handover.Channel(socket.socket(fileno=fd))).run()

    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(work())
