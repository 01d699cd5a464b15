"""What answers queries in one process: the cache, the forwarder and the DNS listeners.

A single-process instance (``workers: 1``) has one :class:`Engine`, driven by
:class:`dnsproxy.app.App`. With ``workers: N`` each worker process has one, driven by
its supervisor over a control channel (:mod:`dnsproxy.workers`), and the supervisor's
:class:`~dnsproxy.workers.WorkerPool` stands where the engine stands in a single
process: both are a :class:`Serving`, the part of an instance that the lifecycle
(start, handover, reload, stop) drives, so that the lifecycle is written once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client.core import Metric

from dnsproxy import handover
from dnsproxy import reload as reloading
from dnsproxy.cache import Cache
from dnsproxy.compat import CoreDnsNames
from dnsproxy.config_types import Config, HostPort
from dnsproxy.forwarder import Forwarder
from dnsproxy.server import DnsServer, Inherited

log = logging.getLogger("dnsproxy")

_YIELD_EVERY = 2048  # cache entries copied on reload between two turns of the event loop


class Serving(Protocol):
    """The query-answering part of an instance, as the lifecycle drives it."""

    @property
    def bound(self) -> list[HostPort]:
        """Addresses served (port 0 of the configuration resolved)."""
        ...

    @property
    def serving(self) -> bool:
        """Every part reads its listeners (a worker restarting makes this False)."""
        ...

    async def start(self, inherited: Inherited, snapshot: bytes | None, taken_at: float) -> int:
        """Serve the configured addresses, adopting ``inherited`` sockets (a handover) and
        binding the rest, the cache filled from ``snapshot`` first (taken at wall clock
        ``taken_at``); how many entries were restored. Raises OSError when an address
        cannot be bound, with nothing left open."""
        ...

    def sockets(self) -> handover.Sockets:
        """The DNS listening sockets, for a successor."""
        ...

    @property
    def loop_id(self) -> str:
        """The first label of this instance's loop probes, which every process that
        answers its queries recognises (see ``Forwarder.find_loops``); set before
        :meth:`start` to take over the id of the instance handing over."""
        ...

    @loop_id.setter
    def loop_id(self, value: str) -> None: ...

    async def snapshot(self, max_entries: int, max_bytes: int) -> tuple[bytes, int]:
        """The cache as a handover snapshot (see :func:`handover.encode_cache`)."""
        ...

    async def pause(self) -> None:
        """Stop reading and accepting, keeping the sockets (a successor reads them)."""
        ...

    async def stop_listening(self) -> None:
        """Refuse new queries and connections; answers in flight still go out."""
        ...

    async def drain(self) -> int:
        """Let the questions in flight finish within the grace; how many were abandoned."""
        ...

    async def close(self) -> None:
        """Close listeners and upstream connections; nothing is served after this."""
        ...

    async def add_listeners(self, old: Config, new: Config) -> Callable[[], None]:
        """First step of a reload: bind the addresses only ``new`` has. Returns what
        undoes it; raises OSError (nothing bound then) when one cannot be bound."""
        ...

    async def apply(self, new: Config) -> str:
        """Second step of a reload, which cannot fail: serve with ``new``. Returns what
        happened to the cache, for the log."""
        ...

    def collect(self) -> Iterator[Metric]:
        """The metric families of the cache, forwarder and listeners."""
        ...

    async def refresh(self) -> None:
        """Bring :meth:`collect` up to date when it is called from the event loop."""
        ...

    def summary(self) -> list[str]:
        """Parts of the SIGUSR1 state line that the metric families do not carry."""
        ...

    def problem(self) -> str | None:
        """Why /health should fail besides a stalled event loop, or None."""
        ...

    async def failed(self) -> str:
        """Wait until serving has failed for good (the instance must exit); why."""
        ...


class Engine:
    """The cache, the forwarder and the DNS listeners of one process (a :class:`Serving`).

    A reload builds a new forwarder (and, when routes changed, a new cache) and swaps
    them in; the replaced forwarder answers what it has in flight, then closes.
    """

    def __init__(self, config: Config, loop_id: str | None = None) -> None:
        self.config = config
        self.cache = Cache(config.cache_max_entries)
        self.forwarder = Forwarder(config, self.cache, loop_id=loop_id)
        self.server = DnsServer(config, self.cache, self.forwarder)
        self._coredns: CoreDnsNames | None = None
        self._coredns_names(config)
        self._drains: set[asyncio.Task[None]] = set()

    @property
    def bound(self) -> list[HostPort]:
        return self.server.bound

    @property
    def serving(self) -> bool:
        return True

    @property
    def loop_id(self) -> str:
        return self.forwarder.loop_id

    @loop_id.setter
    def loop_id(self, value: str) -> None:
        self.forwarder.loop_id = value

    def _coredns_names(self, config: Config) -> None:
        if config.metrics_coredns_names and self._coredns is None:
            self._coredns = CoreDnsNames(self.server, lambda: (self.cache, self.forwarder))
        elif not config.metrics_coredns_names:
            self._coredns = None

    async def start(self, inherited: Inherited, snapshot: bytes | None, taken_at: float) -> int:
        # The cache first: the first queries are then hits, not misses.
        restored = 0 if snapshot is None else await self.restore(snapshot, taken_at)
        await self.server.start(inherited)
        return restored

    async def restore(self, snapshot: bytes, taken_at: float) -> int:
        """Fill the cache from a handover snapshot taken at wall clock ``taken_at``; how
        many entries were restored."""
        return await handover.restore_cache(self.cache, snapshot, taken_at, time.monotonic())

    def sockets(self) -> handover.Sockets:
        return self.server.sockets()

    async def snapshot(self, max_entries: int, max_bytes: int) -> tuple[bytes, int]:
        return await handover.encode_cache(self.cache, time.monotonic(), max_entries, max_bytes)

    async def pause(self) -> None:
        self.server.pause()

    async def stop_listening(self) -> None:
        self.server.stop_listening()

    async def drain(self) -> int:
        abandoned = await self._drain(self.forwarder)
        if self._drains:
            await asyncio.gather(*self._drains, return_exceptions=True)
        return abandoned

    async def _drain(self, forwarder: Forwarder) -> int:
        grace = self.config.shutdown_grace_s
        if await forwarder.drain(grace):
            return 0
        abandoned = forwarder.abandon()
        log.warning("%d questions still in flight after %.1fs: answered SERVFAIL", abandoned, grace)
        return abandoned

    async def close(self) -> None:
        await self.server.close()
        await self.forwarder.close()
        self.cache.clear()  # nothing reads it any more

    async def add_listeners(
        self, old: Config, new: Config, inherited: Inherited | None = None
    ) -> Callable[[], None]:
        added = await self.server.add_listeners(
            (hp for hp in new.listen if hp not in old.listen), inherited
        )
        return lambda: self.server.remove_listeners(added)()

    async def apply(self, new: Config) -> str:
        old = self.config
        cache = self.cache
        detail = f"cache kept ({len(cache)} entries)"
        changed = reloading.route_changed(old, new)
        if changed is not None:
            before = len(cache)
            cache = await _rebuilt(cache, new.cache_max_entries, changed)
            dropped = before - len(cache)
            detail = f"{dropped} cached entries of names with other upstreams now dropped"
        cache.max_entries = new.cache_max_entries
        previous = self.forwarder
        forwarder = Forwarder(new, cache, replacing=previous)
        self.server.reconfigure(new, cache, forwarder)
        self.cache, self.forwarder = cache, forwarder
        self.config = new
        self._coredns_names(new)
        removed = [hp for hp in old.listen if hp not in new.listen]
        close_removed = self.server.remove_listeners(removed)
        task = asyncio.create_task(
            self._retire(previous, close_removed), name="dnsproxy-reload-drain"
        )
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        return detail

    async def _retire(self, forwarder: Forwarder, close_removed: Callable[[], None]) -> None:
        """The replaced forwarder answers its in-flight questions, then closes; then so do
        the listeners the reload removed (they carried some of those answers)."""
        try:
            await self._drain(forwarder)
            await forwarder.close()
        finally:
            close_removed()

    def collect(self) -> Iterator[Metric]:
        yield from self.server.collect()
        yield from self.cache.collect()
        yield from self.forwarder.collect()
        if self._coredns is not None:
            yield from self._coredns.collect()

    async def refresh(self) -> None:
        return None

    def summary(self) -> list[str]:
        return []

    def problem(self) -> str | None:
        return None

    async def failed(self) -> str:
        await asyncio.get_running_loop().create_future()  # never: this process serves
        return ""


async def _rebuilt(cache: Cache, max_entries: int, drop: Callable[[bytes], bool]) -> Cache:
    """A new cache with the entries of ``cache`` that ``drop`` keeps, in LRU order.

    Built aside, with a turn for the event loop every few thousand entries (the old cache
    serves meanwhile), then swapped in by the caller; the replaced forwarder's late
    answers then land in the old one, never in this.
    """
    fresh = Cache(max_entries, cache.max_bytes)
    for i, (key, entry) in enumerate(reloading.kept_entries(cache, drop), 1):
        fresh.put(key, entry, entry.stored_at)
        if i % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return fresh
