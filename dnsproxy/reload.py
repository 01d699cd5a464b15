"""Live reload: what a new configuration may change in a running instance, and how.

No I/O apart from reading a file's status (no sockets, no event loop, no clock): the
running :class:`dnsproxy.app.App` loads and validates the file, asks here what cannot
change without a restart, which cached entries lost their meaning, and whether the file
changed since it was read.

A reload applies the whole new configuration or nothing. Restart-only settings (the node
role's addresses, interface and rules backend, the handover path, the number of workers)
are refused with a reason, so that the running configuration is always one file, never a mix.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator

from dnsproxy import wire
from dnsproxy.cache import Cache, Entry
from dnsproxy.config_types import Config, UpstreamConfig

FileSignature = tuple[str, int, int, int, int]

# The node settings that say which addresses and rules exist: a reload would have to move
# them. sync_interval_s and teardown take effect on reload.
_NODE_RESTART_ONLY = (
    "local_ips",
    "interface",
    "setup_interface",
    "rules",
    "health_port",
    "fallback",
    "fallback_ip",
)


def config_hash(config: Config) -> str:
    """A short stable digest of a configuration (after flags and ${VAR} expansion)."""
    return hashlib.sha256(repr(config).encode()).hexdigest()[:16]


def restart_only(old: Config, new: Config) -> list[str]:
    """One ``"key: reason"`` line per setting that differs and a reload cannot apply."""
    problems: list[str] = []
    if (old.node is None) != (new.node is None):
        state = "on" if new.node is not None else "off"
        problems.append(f"node: turning the node role {state} needs a restart")
    elif old.node is not None and new.node is not None:
        for key in _NODE_RESTART_ONLY:
            before, after = getattr(old.node, key), getattr(new.node, key)
            if before != after:
                problems.append(
                    f"node.{key}: changing it ({_show(before)} -> {_show(after)}) needs a "
                    "restart (the node's addresses and rules would have to move)"
                )
    if old.workers != new.workers:
        problems.append(
            f"workers: changing it ({old.workers} -> {new.workers}) needs a restart (a "
            "handover to an instance started with the new value loses no query)"
        )
    if old.handover.path != new.handover.path:
        problems.append(
            f"handover.path: changing it ({_show(old.handover.path)} -> "
            f"{_show(new.handover.path)}) needs a restart (a successor looks at the old one)"
        )
    return problems


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return "null" if value is None else str(value)


Routes = dict[bytes, tuple[UpstreamConfig, ...]]


def _routes(config: Config) -> Routes:
    routes = {wire.name_to_wire(zone.zone): zone.upstreams for zone in config.zones}
    # A zone whose upstreams are those its parent zone would use routes nothing differently.
    return {
        name: upstreams
        for name, upstreams in routes.items()
        if name == b"\x00" or _route(routes, name[name[0] + 1 :]) != upstreams
    }


def _route(routes: Routes, name: bytes) -> tuple[UpstreamConfig, ...] | None:
    i = 0
    while i < len(name):
        found = routes.get(name[i:])
        if found is not None:
            return found
        if name[i] == 0:
            return None
        i += name[i] + 1
    return None


def key_name(key: bytes) -> bytes:
    """The wire name a cache key starts with (question keys and NXDOMAIN aliases alike)."""
    i = 0
    while i < len(key) and key[i]:
        i += key[i] + 1
    return key[: i + 1]


def is_question_key(key: bytes) -> bool:
    """True for a question key (name, type, class, flags); False for the NXDOMAIN alias
    (name, class, flags), which Cache.put files by itself next to its question key."""
    return len(key) - len(key_name(key)) == 5


def route_changed(old: Config, new: Config) -> Callable[[bytes], bool] | None:
    """A test for cache keys whose name is now sent to other upstreams, or None when no
    name is (the usual reload: every cached entry keeps its meaning).

    A cached answer stands for "what these upstreams say about this question"; when the
    zone that routes its name changes upstreams (a zone added, removed or pointed
    elsewhere), the entry no longer means that and is dropped. A change of policy,
    timeouts or TTL limits leaves every entry as it is (TTL limits apply to new entries).
    """
    before, after = _routes(old), _routes(new)
    if before == after:
        return None

    def changed(key: bytes) -> bool:
        name = key_name(key)
        return _route(before, name) != _route(after, name)

    return changed


def kept_entries(cache: Cache, drop: Callable[[bytes], bool]) -> Iterator[tuple[bytes, Entry]]:
    """The entries of ``cache`` that ``drop`` keeps, least recently used first: put into
    a new cache in this order, they rebuild the LRU order. NXDOMAIN aliases are left out
    (Cache.put files them again next to their question)."""
    for key, entry in list(cache.store.items()):
        if is_question_key(key) and not drop(key):
            yield key, entry


def file_signature(path: str) -> FileSignature | None:
    """What changes when a file is rewritten or replaced, also through symlinks.

    A Kubernetes ConfigMap volume replaces the file by swapping the ``..data`` symlink to
    a new directory: the resolved path and inode change even when size and time do not.
    None when the file cannot be read (gone for a moment while being replaced).
    """
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
