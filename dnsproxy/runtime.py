"""What every dnsproxy process sets up before it serves: the event loop, logging, the GC.

Shared by a single process, a supervisor and its workers (:mod:`dnsproxy.app`,
:mod:`dnsproxy.workers`).
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("dnsproxy")


class _JsonFormatter(logging.Formatter):
    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        # Structured lines (the per-query log) carry their values as fields of their own.
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        return json.dumps(out, separators=(",", ":"))


def setup_logging(level: str, fmt: str, worker: int | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``text`` or ``json``); a worker's lines say
    which worker wrote them (``worker`` field, or ``[worker N]`` after the logger name)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter(worker))
    else:
        who = "" if worker is None else f" [worker {worker}]"
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s %(name)s{who}: %(message)s")
        )
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
