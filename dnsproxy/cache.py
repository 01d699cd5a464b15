"""Packet cache: stored replies keyed by question, with TTL policy and a bounded size.

Sans-IO: every method that needs the time takes ``now`` (seconds, monotonic). Entries
hold the reply in stored form (no OPT, AA clear, TTLs already clamped; the ID is whatever
the upstream exchange used, since every answer gets the client's) together with the
offsets of its TTL fields, so a hit is answered by splicing (:func:`dnsproxy.wire.splice`)
without parsing. The TTL offsets also locate every record, so a reply too long for a UDP
client is cut to whole records without parsing either (:func:`dnsproxy.wire.truncate`).
The store is an LRU bounded by entry count and bytes; evictions are counted.

Expired entries stay in the store (still bounded by the LRU) so that the forwarder can
serve them stale when a refresh fails (RFC 8767, :meth:`Entry.stale_copy`). Prefetch
bookkeeping rides on the hit path at the price of one increment per hit
(``Entry.hits``); whether an entry has entered the last tenth of its TTL is checked where
the hit path already re-cuts the entry once a second (:meth:`Entry.prepare`), and a due
entry is handed to ``Cache.on_due`` (the forwarder) once in its lifetime.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dnsproxy import wire
from dnsproxy.config_types import CachePolicy

# Bound on reply bytes in the cache besides the entry count, so that big answers (TXT,
# many records) cannot grow memory past what max_entries suggests.
DEFAULT_MAX_BYTES: Final = 64 * 1024 * 1024

# Distinct client sizes whose cut an entry keeps (512 without EDNS, the usual EDNS sizes
# less our OPT, capped at limits.udp_payload_size); others are worked out each time.
_MAX_CUTS: Final = 8

POSITIVE: Final = 0
NEGATIVE: Final = 1
SERVFAIL: Final = 2
KIND_NAMES: Final = ("success", "denial", "servfail")

# TTL of every record in a stale answer (RFC 8767 §4 recommends 30 s), and the failure
# recheck timer: a name whose refresh failed is served stale without asking again for
# this long (unless one of its servers comes back meanwhile).
STALE_TTL_S: Final = 30
# An age no entry reaches: the refresh age of an entry not due for prefetch.
_NEVER_AGE: Final = 1 << 62
_NEVER_FAILED: Final = -float("inf")


class Entry:
    """One cached reply. Immutable by convention once stored, apart from the prefetch
    and serve-stale bookkeeping."""

    key: bytes

    __slots__ = (
        "age",
        "body",
        "cuts",
        "expires_at",
        "failed_at",
        "hits",
        "key",
        "kind",
        "offsets",
        "owner",
        "prepared",
        "rcode",
        "refresh_age",
        "stored_at",
        "ttls",
    )

    def __init__(
        self,
        body: bytes,
        offsets: tuple[int, ...],
        ttls: tuple[int, ...],
        stored_at: float,
        ttl_s: int,
        kind: int,
        rcode: int,
    ) -> None:
        self.body = body
        self.offsets = offsets
        self.ttls = ttls
        self.stored_at = stored_at
        self.expires_at = stored_at + ttl_s
        self.kind = kind
        self.rcode = rcode
        # The reply cut for splicing at ``age`` seconds old; redone once a second at
        # most, so a popular entry costs each client only a splice.
        self.age = -1
        self.prepared: wire.Prepared = (b"", b"", b"", b"", b"")
        # Cuts for clients whose UDP size the reply exceeds, by room (see truncate).
        self.cuts: dict[int, wire.Cut] | None = None
        # self.key, the key the entry is cached under, is set by Cache.put with owner.
        self.hits = 0  # cache hits, counted by the hit paths (prefetch wants popular ones)
        # From this age on (whole seconds) a refresh is due; set by Cache.put, with the
        # entry's key and the cache that holds it (owner), when that cache prefetches.
        self.refresh_age = _NEVER_AGE
        self.owner: Cache | None = None
        # When a refresh of this (expired) entry last failed and it was served stale.
        self.failed_at = _NEVER_FAILED

    def prepare(self, age: int, qend: int, opts: wire.Opts) -> wire.Prepared:
        """Prepare the reply for splicing at ``age`` seconds old, with the server's OPT
        records ``opts``; kept until the age changes (the hit path does this once a second
        at most). Entering the last tenth of the TTL, see whether a refresh is due."""
        self.age = age
        self.prepared = wire.aged_prepare(self.body, self.offsets, self.ttls, age, qend, opts)
        if age >= self.refresh_age:
            self._refresh_due()
        return self.prepared

    def _refresh_due(self) -> None:
        owner = self.owner
        if owner is not None and self.hits >= owner.prefetch_min_hits:
            self.refresh_age = _NEVER_AGE  # one refresh per entry
            owner.refresh_due(self)
        # Else not popular enough yet: looked at again at the next second's cut, if any.

    def answer(
        self, query: bytes, qend: int, edns: int, now: float, limit: int, opts: wire.Opts
    ) -> bytes:
        """This entry answered to ``query`` (see :func:`wire.splice`), for a cache hit:
        cut to ``limit`` bytes when ``limit`` > 0 and it is longer; ``opts`` are the
        server's OPT records (:func:`wire.client_opts`)."""
        self.hits += 1
        age = int(now - self.stored_at)
        prepared = self.prepared if age == self.age else self.prepare(age, qend, opts)
        out = wire.splice(prepared, query, qend, edns)
        if limit and len(out) > limit:
            return self.truncate(out, qend, edns, limit)
        return out

    def answer_once(
        self, query: bytes, qend: int, edns: int, now: float, limit: int, opts: wire.Opts
    ) -> bytes:
        """Like :meth:`answer` without keeping the prepared reply, for a miss's answer:
        most entries are answered from upstream once and never hit, and the prepared
        reply is about 400 bytes."""
        age = int(now - self.stored_at)
        if age != self.age:
            return wire.render(
                self.body, self.offsets, self.ttls, age, query, qend, edns, limit, opts
            )
        out = wire.splice(self.prepared, query, qend, edns)
        if limit and len(out) > limit:
            return self.truncate(out, qend, edns, limit)
        return out

    def truncate(self, reply: bytes, qend: int, edns: int, limit: int) -> bytes:
        """``reply`` (this entry answered to a client) cut to fit in ``limit`` bytes
        (:func:`wire.truncate`). The cut depends only on the entry and the size, so it
        is worked out once per size and kept: a client that cannot retry over TCP asks
        again and again, and then only the slicing is repeated."""
        room = wire.cut_room(limit, edns)
        cuts = self.cuts
        if cuts is None:
            cuts = self.cuts = {}
        cut = cuts.get(room)
        if cut is None:
            cut = wire.plan_cut(reply, qend, self.offsets, room)
            if len(cuts) < _MAX_CUTS:
                cuts[room] = cut
        return wire.apply_cut(reply, cut, edns)

    def stale_copy(self, now: float, ede: bool) -> Entry:
        """This (expired) entry as a stale answer: every TTL 30, and with ``ede`` an
        Extended DNS Error "Stale Answer" for EDNS clients. Not for the cache."""
        ttls = (STALE_TTL_S,) * len(self.ttls)
        body = wire.with_ttls(self.body, self.offsets, ttls)
        cls = _StaleEntry if ede else Entry
        return cls(body, self.offsets, ttls, now, STALE_TTL_S, self.kind, self.rcode)


class _StaleEntry(Entry):
    """A stale answer whose OPT record carries EDE 3 (RFC 8914) for an EDNS client."""

    __slots__ = ()

    def answer_once(
        self, query: bytes, qend: int, edns: int, now: float, limit: int, opts: wire.Opts
    ) -> bytes:
        age = int(now - self.stored_at)
        args = (self.body, self.offsets, self.ttls, age, query, qend, edns)
        reply = wire.render(*args, 0, wire.with_ede_stale(opts))
        if limit and len(reply) > limit:
            # Cut to the client's size without the option (a cut keeps our plain OPT):
            # its TCP retry gets the whole reply, option and all.
            return wire.render(*args, limit, opts)
        return reply


def _clamped(ttls: tuple[int, ...], low: int, high: int) -> tuple[int, ...]:
    return tuple(low if t < low else high if t > high else t for t in ttls)


def make_entry(info: wire.ResponseFields, policy: CachePolicy, now: float) -> tuple[Entry, bool]:
    """Build the entry for an upstream reply (a :class:`wire.ResponseInfo`, or the plain
    tuple of :func:`wire.walk_response`); the flag says whether it may be cached.

    An uncacheable reply (TC set, TTL 0, negative without SOA, an rcode we do not cache)
    still gets an entry so every waiting client is answered from the same code path.
    """
    # One unpacking instead of a dozen attribute reads: this runs for every miss.
    (
        body,
        rcode,
        truncated,
        ancount,
        offsets,
        ttls,
        authority_end,
        soa_index,
        soa_minimum,
        answers_qtype,
        span_min,
        ttl_low,
        ttl_high,
    ) = info
    if rcode == wire.NOERROR and ancount and (answers_qtype or soa_index < 0):
        kind = POSITIVE
        low, high = policy.min_ttl_s, policy.max_ttl_s
        within = low <= ttl_low and ttl_high <= high
        if within and not truncated:
            # Every TTL within the policy (the usual case): the reply is stored as is.
            return Entry(body, offsets, ttls, now, span_min, kind, rcode), span_min > 0
        base = ttls if within else _clamped(ttls, low, high)
        cacheable = span_min > 0
    elif (rcode == wire.NXDOMAIN or rcode == wire.NOERROR) and soa_index >= 0:
        # RFC 2308 §5: the negative TTL is min(SOA TTL, SOA MINIMUM). Comparisons
        # rather than min() and max(), and one list for the TTLs: in the Kubernetes mix
        # most misses are NXDOMAINs (the search list's), so this runs for them.
        kind = NEGATIVE
        denial_max = policy.denial_max_ttl_s
        neg = ttls[soa_index]
        if soa_minimum < neg:
            neg = soa_minimum
        if denial_max < neg:
            neg = denial_max
        cacheable = neg > 0
        floor = policy.min_ttl_s
        if denial_max < floor:
            floor = denial_max
        if neg < floor:
            neg = floor
        # Every TTL at most the negative one, and the SOA's that one.
        base = tuple([neg if t > neg or i == soa_index else t for i, t in enumerate(ttls)])
    elif rcode == wire.SERVFAIL:
        return servfail_entry(body, offsets, ttls, policy, now), (
            policy.servfail_ttl_s > 0 and not truncated
        )
    else:
        kind = NEGATIVE if rcode in (wire.NOERROR, wire.NXDOMAIN) else SERVFAIL
        base = ttls
        cacheable = False
    if truncated:
        cacheable = False
    base_span = base[:authority_end]
    ttl_s = min(base_span) if base_span else 0
    if base != ttls:
        body = wire.with_ttls(body, offsets, base)
    return Entry(body, offsets, base, now, ttl_s, kind, rcode), cacheable and ttl_s > 0


def servfail_entry(
    body: bytes,
    offsets: tuple[int, ...],
    ttls: tuple[int, ...],
    policy: CachePolicy,
    now: float,
) -> Entry:
    return Entry(body, offsets, ttls, now, policy.servfail_ttl_s, SERVFAIL, wire.SERVFAIL)


def nxdomain_key(key: bytes) -> bytes:
    """Key under which an NXDOMAIN answers every type of the name (RFC 2308 §5).

    Name + class + flags, without the type: a question key always has five bytes after
    its (self-delimiting) name and this one three, so the two key spaces cannot collide.
    """
    return key[:-5] + key[-3:]


class Cache:
    """Bounded LRU packet cache with per-kind entry counts and eviction counting.

    The store is an ``OrderedDict`` used as an LRU (``move_to_end`` on use,
    ``popitem(last=False)`` to evict). The server's fast path reads ``store`` directly.
    """

    def __init__(self, max_entries: int, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.store: OrderedDict[bytes, Entry] = OrderedDict()
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0  # reply bytes held, counting the per-client cuts (see _footprint)
        self.evictions = 0
        self.by_kind = [0, 0, 0]
        # Prefetch, set by whoever carries the refreshes out (the forwarder): entries
        # stored from now on with at least this many hits when they enter the last tenth
        # of their TTL are handed to on_due, once each; 0 turns prefetch off.
        self.prefetch_min_hits = 0
        self.on_due: Callable[[Entry], None] | None = None

    def __len__(self) -> int:
        return len(self.store)

    def get(self, key: bytes, now: float) -> Entry | None:
        """The live entry for ``key`` (marking it recently used), or None."""
        entry = self.store.get(key)
        if entry is None or entry.expires_at <= now:
            return None
        self.store.move_to_end(key)
        return entry

    def get_nxdomain(self, key: bytes, now: float) -> Entry | None:
        """A live bare NXDOMAIN for the name of question ``key``, whatever its type."""
        return self.get(nxdomain_key(key), now)

    def put(self, key: bytes, entry: Entry, now: float) -> bool:
        """Store ``entry``; a SERVFAIL never replaces a live answer. True if stored."""
        if entry.kind == SERVFAIL:
            old = self.store.get(key)
            if old is not None and old.kind != SERVFAIL and old.expires_at > now:
                return False
        elif self.prefetch_min_hits:
            # The last tenth of the TTL, in the whole seconds the hit path ages by, and at
            # least the last second: a TTL of 3 is due from age 2, one of 30 from 27.
            ttl_s = int(entry.expires_at - entry.stored_at)
            entry.refresh_age = ttl_s - (ttl_s + 9) // 10
            entry.key = key
            entry.owner = self
        self._set(key, entry)
        if entry.rcode == wire.NXDOMAIN and entry.body[6:8] == b"\x00\x00":
            # Only a bare NXDOMAIN is about the name itself; behind a CNAME it is
            # about the chain's target.
            self._set(nxdomain_key(key), entry)
        return True

    def _set(self, key: bytes, entry: Entry) -> None:
        store = self.store
        old = store.pop(key, None)
        if old is not None:
            self.by_kind[old.kind] -= 1
            self.bytes -= _footprint(old)
        store[key] = entry
        self.by_kind[entry.kind] += 1
        self.bytes += _footprint(entry)
        while len(store) > self.max_entries or (self.bytes > self.max_bytes and len(store) > 1):
            _, evicted = store.popitem(last=False)
            self.evictions += 1
            self.by_kind[evicted.kind] -= 1
            self.bytes -= _footprint(evicted)

    def refresh_due(self, entry: Entry) -> None:
        """``entry`` entered the last tenth of its TTL popular enough: hand it on."""
        if self.on_due is not None and self.prefetch_min_hits:
            self.on_due(entry)

    def clear(self) -> None:
        self.store.clear()
        self.by_kind = [0, 0, 0]
        self.bytes = 0

    def collect(self) -> Iterator[Metric]:
        """The cache's metric families, from its counters (read at scrape time)."""
        entries = GaugeMetricFamily(
            "dnsproxy_cache_entries", "Cached entries, by kind.", labels=["type"]
        )
        for kind, count in zip(KIND_NAMES, list(self.by_kind), strict=True):
            entries.add_metric([kind], count)
        yield entries
        yield GaugeMetricFamily(
            "dnsproxy_cache_capacity", "Maximum cached entries.", value=self.max_entries
        )
        yield GaugeMetricFamily(
            "dnsproxy_cache_bytes",
            "Reply bytes held by the cache (bounded by 64 MiB besides the entry count).",
            value=self.bytes,
        )
        yield CounterMetricFamily(
            "dnsproxy_cache_evictions", "Entries evicted to make room (LRU).", value=self.evictions
        )


def _footprint(entry: Entry) -> int:
    """Bytes an entry may hold: its body and, once answered, three prepared tails."""
    return 4 * len(entry.body)
