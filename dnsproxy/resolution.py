"""Sans-IO resolution of a cache miss: which server to ask, for how long, what came back.

- :class:`ServerState`: one upstream server as the resolutions see it — consecutive
  failures, marked down after :data:`MAX_FAILS`, the probe schedule while down (each probe
  is a "please send this" output of :meth:`ServerState.handle_timer`), reply latency.
  Health reflects real service: any well-formed reply (a probe's or a real query's, of
  any rcode) means alive, and a failed try does not count against a server that answered
  anything since that try was sent.
- :class:`Zone`: the servers of one zone in the order its policy asks for, healthy first,
  and which expired entries it may serve stale (RFC 8767).
- :class:`Resolution`: the tries of one question — every server once and at least two
  tries in all, each bounded by the zone's ``try_timeout_s`` and all by its
  ``deadline_s`` — and the entry it ends with; for an expired name, the stale answer
  when no server answers, or the client-response timer (:meth:`Resolution.timer`) runs
  out first.

Nothing here reads a clock, sleeps or touches a socket: ``now`` comes in, and what to send
and when a timer is due go out. The forwarder (``forwarder.py``) is the asyncio adapter:
it coalesces identical questions, hands each try to an upstream, feeds the outcome back,
and sends the probes. The per-try deadline is enforced by the upstream connection's
own timer (one per connection), so a try costs no timer of its own here.
"""

from __future__ import annotations

import random
from typing import Final, Generic, TypeVar

from dnsproxy import wire
from dnsproxy.cache import SERVFAIL, STALE_TTL_S, Entry, make_entry, servfail_entry
from dnsproxy.config_types import ServeStaleConfig, ZoneConfig
from dnsproxy.framing import NEVER
from dnsproxy.pipeline import PendingQuery

__all__ = [
    "LATENCY_BUCKETS",
    "MAX_FAILS",
    "PROBE_INTERVAL_S",
    "PROBE_MAX_INTERVAL_S",
    "PROBE_QUERY",
    "PROBE_TIMEOUT_S",
    "LatencyHistogram",
    "Resolution",
    "ServerState",
    "Zone",
]

# A server that failed this many tries in a row, with no reply to anything meanwhile, is
# marked down: tried only after the healthy ones, and probed with ". IN NS" until it
# answers. Probes back off exponentially from PROBE_INTERVAL_S to PROBE_MAX_INTERVAL_S,
# each interval drawn from its upper half at random so that many nodes that lost the
# same server do not probe it in step. The longest interval bounds how late a server
# that comes back is seen: its first probe is never held behind the connection pool's
# reconnect backoff (Upstream.probe), so cached names are fresh again within it plus a
# round trip, well inside 2 s of the server's return.
MAX_FAILS: Final = 2
PROBE_INTERVAL_S: Final = 0.5
PROBE_MAX_INTERVAL_S: Final = 1.5
PROBE_TIMEOUT_S: Final = 1.0
PROBE_QUERY: Final = b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x01"

# Upstream rcodes that mean "this server could not answer": try the next one, and if
# none does better, the client gets SERVFAIL (never a FORMERR for its valid query).
TRY_NEXT_RCODES: Final = frozenset((wire.FORMERR, wire.SERVFAIL, wire.NOTIMP, wire.REFUSED))

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def _bucket(bounds: tuple[float, ...], seconds: float) -> int:
    """``bisect_left(bounds, seconds)``, by hand: most durations fall in the first bucket
    or two, and the compiled build runs this loop on unboxed floats, where bisect is a
    generic call with an object comparison per step (1,300 instructions a call)."""
    i = 0
    for bound in bounds:
        if seconds <= bound:
            break
        i += 1
    return i


class LatencyHistogram:
    """Latency in buckets (upper bounds ``bounds``): plain ints, exported at scrape time.

    prometheus_client's Histogram takes a lock and does several calls per observation;
    this one is only touched from the event loop thread, so a list of ints will do.
    """

    __slots__ = ("bounds", "counts", "total_s")

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[_bucket(self.bounds, seconds)] += 1
        self.total_s += seconds

    def observe_many(self, seconds: float, n: int) -> None:
        """Record ``n`` observations of the same duration (one batch of queries)."""
        self.counts[_bucket(self.bounds, seconds)] += n
        self.total_s += seconds * n


class ServerState:
    """Health and latency of one upstream server, shared by every zone that uses it.

    Down after :data:`MAX_FAILS` failed tries in a row, counting only tries the server
    answered nothing at all after (:meth:`failed`): a server that answers other queries
    is serving, whatever happened to one of them. Any well-formed reply, whatever its
    rcode, means alive (:meth:`succeeded`): a server that says REFUSED or SERVFAIL is
    still there and still serving its other names. While down it is probed:
    :meth:`timer` says when the next probe is due, :meth:`handle_timer` hands out the
    probe query to send (with :data:`PROBE_TIMEOUT_S`), and :meth:`probed` takes its
    outcome. ``rng`` draws the probe intervals' jitter (tests seed it).
    """

    __slots__ = (
        "fails",
        "label",
        "last_reply",
        "latency",
        "probe_at",
        "probe_failures",
        "probe_interval",
        "probing",
        "rcodes",
        "recovered_at",
        "rng",
    )

    def __init__(self, label: str, rng: random.Random | None = None) -> None:
        self.label = label
        self.fails = 0
        self.latency = LatencyHistogram()
        self.rcodes = [0] * 16  # well-formed replies by rcode (the header's 4 bits)
        self.last_reply = -NEVER  # when the server last sent a well-formed reply
        self.recovered_at = -NEVER  # when it was last marked up after being down
        self.probe_at = NEVER  # when the next probe is due
        self.probe_interval = PROBE_INTERVAL_S  # the next interval's upper bound
        self.probing = False  # a probe is out
        self.probe_failures = 0
        self.rng = rng or random.Random()

    @property
    def up(self) -> bool:
        return self.fails < MAX_FAILS

    def count_on(self, older: ServerState) -> None:
        """Go on with the counters of ``older``, the state of the same server that this
        one replaces (a reload): its latency histogram, replies by rcode and failed
        probes. Its health is not taken: the new configuration starts it afresh."""
        self.latency = older.latency
        self.rcodes = older.rcodes
        self.probe_failures = older.probe_failures

    def failed(self, now: float, sent_at: float = NEVER) -> bool:
        """A try sent at ``sent_at`` got no well-formed reply (timeout, connection
        refused or lost for good, malformed reply). It counts towards marking the
        server down only if the server has not replied to anything since ``sent_at``.

        True when this marks the server down: probing starts, and :meth:`timer` is due.
        """
        if self.last_reply >= sent_at:
            return False
        self.fails += 1
        if self.fails >= MAX_FAILS and self.probe_at == NEVER and not self.probing:
            self.probe_interval = PROBE_INTERVAL_S
            self._next_probe(now)
            return True
        return False

    def succeeded(self, now: float) -> bool:
        """A well-formed reply came, to a real query or a probe. True: up again."""
        self.last_reply = now
        if self.fails < MAX_FAILS:
            self.fails = 0
            return False
        self.fails = 0
        self.recovered_at = now
        self.probe_at = NEVER
        return True

    def timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or None."""
        return None if self.probe_at == NEVER else self.probe_at

    def handle_timer(self, now: float) -> bytes | None:
        """The probe to send now, or None (not due, or the server is up again)."""
        if now < self.probe_at:
            return None
        self.probe_at = NEVER
        if self.up:
            return None
        self.probing = True
        return PROBE_QUERY

    def probed(self, reply: bytes | None, now: float, local: bool = False) -> bool:
        """The outcome of the probe sent: its reply (any rcode, checked to be well
        formed), or ``None`` for none. ``local``: it could not be sent for a reason on
        our side (a full pool), which is not held against the server. True: up again."""
        self.probing = False
        if reply is not None:
            try:
                wire.inspect_response(reply)
            except wire.WireError:
                pass
            else:
                return self.succeeded(now)
        if not local:
            self.probe_failures += 1
        if not self.up:
            self._next_probe(now)
        return False

    def _next_probe(self, now: float) -> None:
        interval = self.probe_interval
        self.probe_at = now + interval * (0.5 + 0.5 * self.rng.random())
        self.probe_interval = min(interval * 2, PROBE_MAX_INTERVAL_S)


S = TypeVar("S", bound=ServerState)


class Zone(Generic[S]):
    """A configured zone and its servers; :meth:`order` applies the policy.

    ``rng`` draws the order of the ``random`` policy (tests seed it). ``stale`` says when
    an expired answer is served (the zone's ``cache.max_stale_s`` says how long).
    """

    __slots__ = (
        "cache_policy",
        "config",
        "deadline_s",
        "max_stale_s",
        "next_index",
        "rng",
        "servers",
        "stale",
        "try_timeout_s",
    )

    def __init__(
        self,
        config: ZoneConfig,
        servers: list[S],
        rng: random.Random | None = None,
        stale: ServeStaleConfig | None = None,
    ) -> None:
        self.config = config
        self.servers = servers
        self.next_index = 0
        self.rng = rng or random.Random()
        self.stale = stale or ServeStaleConfig()
        self.max_stale_s = config.cache.max_stale_s
        # Read for every miss: attributes of this class, not of the config's dataclasses
        # (compiled, a direct field read instead of an attribute lookup by name).
        self.deadline_s = config.deadline_s
        self.try_timeout_s = config.try_timeout_s
        self.cache_policy = config.cache

    def stale_candidate(self, entry: Entry | None, now: float) -> Entry | None:
        """``entry`` when it is expired but within the zone's maximum staleness, so that
        it may be served stale should the refresh fail; else None."""
        if entry is None or entry.kind == SERVFAIL:
            return None
        expires_at = entry.expires_at
        if expires_at <= now < expires_at + self.max_stale_s:
            return entry
        return None

    def stale_held(self, entry: Entry, now: float) -> bool:
        """Is ``entry`` (a stale candidate) to be served stale without asking upstream?

        For :data:`~dnsproxy.cache.STALE_TTL_S` after its refresh failed (RFC 8767's
        failure recheck timer), unless a server of the zone has been marked up since:
        then the name is worth asking again at once.
        """
        failed_at = entry.failed_at
        if now >= failed_at + STALE_TTL_S:
            return False
        return all(server.recovered_at <= failed_at for server in self.servers)

    def order(self) -> list[S]:
        """The servers in the order to try them: by policy, and servers that are down last."""
        servers = self.servers
        if len(servers) == 1:
            return servers
        policy = self.config.policy
        if policy == "random":
            servers = self.rng.sample(servers, len(servers))
        elif policy == "round_robin":
            i = self.next_index % len(servers)
            self.next_index = i + 1
            servers = servers[i:] + servers[:i]
        if all(s.fails < MAX_FAILS for s in servers):
            return servers
        return [s for s in servers if s.up] + [s for s in servers if not s.up]


class Resolution(PendingQuery, Generic[S]):
    """The tries of one question at its zone's servers.

    :meth:`next_try` names the server to ask next (and sets ``timeout_s``), or None when
    tries or time have run out; :meth:`failed` or :meth:`answered` take the outcome of
    that try; :meth:`failure` is the answer when no server gave a usable one; ``ends_at``
    is when the last try must end.

    It is also the query its tries send (a :class:`~dnsproxy.pipeline.PendingQuery`:
    ``wire``, the query for the upstream, and ``question``, the question's section): one
    object for a question and all its tries; the asyncio adapter says what to do with
    each outcome (:meth:`~dnsproxy.pipeline.PendingQuery.upstream_done`).
    """

    __slots__ = (
        "attempt",
        "ends_at",
        "key",
        "last",
        "local_failure",
        "order",
        "server",
        "stale",
        "stale_at",
        "started",
        "timeout_s",
        "zone",
    )

    def __init__(
        self, key: bytes, question: bytes, zone: Zone[S], now: float, stale: Entry | None = None
    ) -> None:
        PendingQuery.__init__(self, wire.upstream_query(key, question), question, NEVER)
        self.key = key
        self.zone = zone
        self.order = zone.order()
        self.attempt = 0
        self.ends_at = now + zone.deadline_s
        self.server: S | None = None
        self.started = 0.0
        self.timeout_s = 0.0
        # The last SERVFAIL/REFUSED/... reply (wire.walk_response's fields).
        self.last: wire.ResponseFields | None = None
        self.local_failure = False  # a try failed on our side (pool full), not the server
        # The expired entry (see Zone.stale_candidate) the waiters get if no fresh answer
        # comes, and when (the client-response timer) they get it anyway.
        self.stale = stale
        self.stale_at = NEVER if stale is None else now + zone.stale.answer_after_s

    def timer(self) -> float | None:
        """When :meth:`handle_timer` is due (the client-response timer), or None."""
        return None if self.stale_at == NEVER else self.stale_at

    def handle_timer(self, now: float) -> Entry | None:
        """The stale answer for the clients waiting so far, or None (not due, or none).

        The tries go on: a fresh answer still replaces the cached entry.
        """
        stale = self.stale
        if stale is None or now < self.stale_at:
            return None
        self.stale_at = NEVER
        return stale.stale_copy(now, self.zone.stale.ede)

    def next_try(self, now: float) -> S | None:
        """The server to send :attr:`query` to, with ``timeout_s`` for it; None: done."""
        order = self.order
        attempt = self.attempt
        # Every server once, and at least two tries in all, within the deadline.
        if attempt < 2 or attempt < len(order):
            remaining = self.ends_at - now
            if remaining > 0:
                server = order[attempt % len(order)]
                self.attempt = attempt + 1
                self.server = server
                self.started = now
                timeout = self.zone.try_timeout_s
                self.timeout_s = timeout if timeout < remaining else remaining
                return server
        return None

    def failed(self, local: bool, now: float) -> bool:
        """The try got no reply. ``local``: the cause was on our side (a full pool), which
        says nothing about the server. True when this marked the server down."""
        if local:
            self.local_failure = True
            return False
        server = self.server
        assert server is not None
        return server.failed(now, self.started)

    def answered(self, reply: bytes, now: float) -> tuple[Entry, bool] | None:
        """The try got ``reply`` (matched to our question by the upstream).

        The entry to answer with and whether it may be cached, or None to try the next
        server (an error rcode; kept for :meth:`failure`). Raises :class:`wire.WireError`
        for a malformed reply, to be taken as a failed try (:meth:`failed`).
        """
        server = self.server
        assert server is not None
        server.latency.observe(now - self.started)
        # The upstream checked that the reply's question is ours.
        info = wire.walk_response(reply, wire.HEADER_LEN + len(self.question))
        # Well formed, whatever the rcode: the server is serving.
        server.last_reply = now
        if server.fails:
            server.succeeded(now)
        rcode = info[1]  # ResponseInfo.rcode
        server.rcodes[rcode] += 1
        if rcode in TRY_NEXT_RCODES:
            # Another server of the group may do better; keep this one as a fallback.
            self.last = info
            return None
        return make_entry(info, self.zone.cache_policy, now)

    def failure(self, now: float) -> tuple[Entry, bool]:
        """The answer when no server gave a usable one: the stale entry if there is one
        (marked as failed now, for the recheck timer; see :meth:`Zone.stale_held`), else
        the last SERVFAIL/REFUSED or ours.

        Our own SERVFAIL (an upstream FORMERR/NOTIMP to a valid query is ours to report,
        not the client's) is cached like an upstream SERVFAIL, so that a dead upstream is
        not asked again for every retry, unless the cause was local.
        """
        stale = self.stale
        if stale is not None:
            stale.failed_at = now
            return stale.stale_copy(now, self.zone.stale.ede), False
        policy = self.zone.cache_policy
        last = self.last
        if last is not None and last[1] in (wire.SERVFAIL, wire.REFUSED):  # its rcode
            return make_entry(last, policy, now)
        cd = wire.key_flags(self.key)[1]
        body = wire.synth_body(self.question, wire.SERVFAIL, cd)
        entry = servfail_entry(body, (), (), policy, now)
        return entry, policy.servfail_ttl_s > 0 and not self.local_failure
