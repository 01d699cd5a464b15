"""Sans-IO state of one pipelined connection to an upstream DNS server (RFC 7766).

:class:`PipelinedConnection` holds what a connection carrying many queries at once must
get right, and nothing else: a random ID per query that is unique among those in flight
and those that timed out here (a late reply must never be taken for the answer to a
newer query that drew the same ID, RFC 5452), the table of queries in flight, the length
framing, reply matching by ID and question, per-query deadlines, and retirement — by age,
after too many timed-out IDs, or after a timeout with nothing at all answered since the
query went out (a peer that vanished without a reset). It reads no clock and touches no
socket: every call takes ``now``, the bytes to write are handed out by
:meth:`~PipelinedConnection.data_to_send`, and :meth:`~PipelinedConnection.timer` says when
:meth:`~PipelinedConnection.handle_timer` is next due. It does not care whether the bytes
travel over TCP or TLS. The asyncio adapter is ``upstream._UpstreamConnection``.

Queries finish through the lists these calls return: each :class:`PendingQuery` in them
has either ``reply`` (the validated reply; its ID is the one on the wire) or ``error``.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Generic, Protocol, TypeVar

from dnsproxy.errors import DnsproxyError
from dnsproxy.framing import NEVER, FrameError, FrameReader
from dnsproxy.wire import reply_matches

__all__ = [
    "CLOSED",
    "MAX_EXPIRED_IDS",
    "MAX_IDS",
    "OPEN",
    "OPENING",
    "RETIRED",
    "ConnectionLost",
    "PendingQuery",
    "PipelinedConnection",
    "QueryOwner",
    "Request",
    "UpstreamBusy",
    "UpstreamError",
    "UpstreamStats",
    "UpstreamTimeout",
]

MAX_EXPIRED_IDS: Final = 1024  # a connection with more timed-out IDs than this is retired
MAX_IDS: Final = 0xFFFF - MAX_EXPIRED_IDS - 1  # in-flight cap: a free ID always exists

_LEN_ID: Final = struct.Struct(">HH")  # length prefix followed by the message ID

# Connection states, in the only order they can follow.
OPENING: Final = 0  # queries are queued; no transport yet
OPEN: Final = 1
RETIRED: Final = 2  # takes no new queries; closes once the ones in flight are done
CLOSED: Final = 3  # the adapter closes its transport (if any) and forgets the connection


class UpstreamError(DnsproxyError):
    """The upstream could not answer: connect refused or reset, closed, pool full, etc."""


class UpstreamTimeout(UpstreamError):
    """No valid reply within the query's time budget."""


class UpstreamBusy(UpstreamError):
    """Not sent: our own pool is full or closed. Says nothing about the server's health."""


class ConnectionLost(UpstreamError):
    """The peer closed (or garbled) a connection with the query in flight.

    RFC 7766 §6.2.1: a client retries once when a reused connection was closed by the
    server, which happens routinely when the server's idle timeout beats ours; see
    :meth:`PendingQuery.retry`.
    """


@dataclass(slots=True)
class UpstreamStats:
    """Counters of one upstream server; plain ints so the hot path only increments."""

    queries: int = 0
    replies: int = 0
    timeouts: int = 0
    failures: int = 0  # errors other than timeouts, pool_full included
    bad_replies: int = 0  # dropped: wrong ID / question / not QR / malformed / unsolicited
    connects: int = 0
    connect_failures: int = 0
    retries: int = 0
    tc_fallbacks: int = 0
    pool_full: int = 0  # every connection at max in-flight and the pool at its size
    # Gauges, kept up to date as connections open and queries come and go.
    open_connections: int = 0
    inflight: int = 0


class Request(Protocol):
    """A query handed to an upstream; ``cancel()`` forgets it."""

    def cancel(self) -> None: ...


class QueryOwner(Protocol):
    """The pool that sent a query, which forgets it when the query is cancelled."""

    def cancel_query(self, query: PendingQuery) -> None: ...


class PendingQuery:
    """One query on its way upstream, and who is told its outcome.

    ``wire`` is the query (its ID is replaced on the wire), ``question`` its question
    section, ``deadline`` the time by which it must be answered. The connection sets
    ``qid`` and ``conn`` when it takes the query, and ``reply`` or ``error`` when it is done
    with it. ``retried`` says whether it already moved to a second connection. The pool
    that sends it keeps its own marks here too: ``owner``, ``finished`` (its outcome was
    told, or it was cancelled) and ``then`` (the request that took over when its
    connection failed).

    The outcome goes to :meth:`upstream_done`, once per send, which a subclass says what
    to do with: so the forwarder's resolution of a question is the query of all its
    tries, one object, told by a direct call (compiled) rather than through a callback
    object per try; :class:`dnsproxy.upstream.Callback` calls a function instead.
    """

    __slots__ = (
        "conn",
        "deadline",
        "error",
        "finished",
        "owner",
        "qid",
        "question",
        "replies_seen",
        "reply",
        "retried",
        "then",
        "wire",
    )

    def __init__(self, wire: bytes, question: bytes, deadline: float) -> None:
        self.wire = wire
        self.question = question
        self.deadline = deadline
        self.conn: PipelinedConnection[Any] | None = None
        self.qid = -1
        self.replies_seen = 0
        self.reply = b""
        self.error: UpstreamError | None = None
        self.retried = False
        self.owner: QueryOwner | None = None
        self.finished = False
        self.then: Request | None = None

    def upstream_done(self, reply: bytes | None, error: UpstreamError | None, now: float) -> None:
        """The outcome: ``(reply, None, now)`` with the validated reply, or ``(None, error,
        now)``; ``now`` is the loop's clock, which the teller has just read."""
        raise NotImplementedError

    def cancel(self) -> None:
        """Forget the query: its outcome is not told (or, past a fallback, the request
        that took over is cancelled)."""
        if not self.finished:
            self.finished = True
            owner = self.owner
            if self.conn is not None and owner is not None:
                owner.cancel_query(self)
        elif self.then is not None:
            self.then.cancel()

    def retry(self, now: float) -> bool:
        """After :class:`ConnectionLost`: may the query go to another connection?

        Once, and only while its deadline has not passed (RFC 7766 §6.2.1). True means
        the caller sends it again; its ``error`` is cleared for that.
        """
        if self.retried or now >= self.deadline:
            return False
        self.retried = True
        self.error = None
        return True


Q = TypeVar("Q", bound=PendingQuery)


class PipelinedConnection(Generic[Q]):
    """The state of one connection carrying many queries at once; see the module doc.

    ``label`` names the server in error messages; ``stats`` is the server's counters
    (``inflight`` and ``bad_replies`` are kept here). ``ids(16)`` draws a random ID:
    over TCP or TLS the ID only demultiplexes (spoofing a reply would take the
    stream's sequence numbers), so a fast generator will do; tests script it.
    """

    __slots__ = (
        "_expired",
        "_idle_s",
        "_idle_since",
        "_ids",
        "_label",
        "_max_expired",
        "_outgoing",
        "_reader",
        "_replies",
        "_retire_at",
        "max_inflight",
        "pending",
        "state",
        "stats",
    )

    def __init__(
        self,
        now: float,
        *,
        label: str = "upstream",
        stats: UpstreamStats | None = None,
        max_inflight: int = 100,
        max_age_s: float = 30.0,
        idle_timeout_s: float = 30.0,
        max_expired_ids: int = MAX_EXPIRED_IDS,
        ids: Callable[[int], int] = random.getrandbits,
    ) -> None:
        self._label = label
        self.stats = stats if stats is not None else UpstreamStats()
        self.max_inflight = min(max(1, max_inflight), MAX_IDS)
        self._max_expired = min(max_expired_ids, MAX_EXPIRED_IDS)
        self._ids = ids
        self.state = OPENING
        self.pending: dict[int, Q] = {}
        self._expired: set[int] = set()  # IDs of queries that timed out here
        self._outgoing: list[tuple[Q, bytes]] = []  # frames not yet handed out
        self._reader = FrameReader()
        self._replies = 0  # valid replies so far
        self._idle_since = now
        self._idle_s = idle_timeout_s
        self._retire_at = now + max_age_s

    # -- state

    @property
    def accepting(self) -> bool:
        """True while the connection takes new queries (opening or open, not full)."""
        return self.state <= OPEN and len(self.pending) < self.max_inflight

    @property
    def retired(self) -> bool:
        """True once the connection takes no new queries (retired or closed)."""
        return self.state >= RETIRED

    @property
    def closed(self) -> bool:
        """True once the adapter should close its transport and forget the connection."""
        return self.state == CLOSED

    @property
    def replies(self) -> int:
        """Valid replies received on this connection so far."""
        return self._replies

    @property
    def expired_ids(self) -> frozenset[int]:
        """IDs reserved here because their queries timed out."""
        return frozenset(self._expired)

    def timer(self) -> float | None:
        """When :meth:`handle_timer` is next due, or None (closed)."""
        if self.state == CLOSED:
            return None
        when = self._retire_at if self.state < RETIRED else NEVER
        pending = self.pending
        if pending:
            first = min(query.deadline for query in pending.values())
        else:
            first = self._reader.expiry(self._idle_since, self._idle_s, NEVER)
        return first if first < when else when

    # -- events

    def connected(self, now: float) -> None:
        """The transport is up: queued frames may now be written."""
        if self.state == OPENING:
            self.state = OPEN

    def send(self, query: Q, now: float) -> None:
        """Take ``query``: give it an ID and queue its frame (see :meth:`data_to_send`).

        Raises :class:`UpstreamBusy` when the connection does not accept queries (see
        :attr:`accepting`): the caller picks connections, so this is a bug guard.
        """
        pending = self.pending
        if self.state > OPEN or len(pending) >= self.max_inflight:
            raise UpstreamBusy(f"{self._label}: connection is not taking queries")
        expired = self._expired
        ids = self._ids
        qid = ids(16)
        # Terminates: in-flight plus reserved IDs stay below the ID space (MAX_IDS, and a
        # connection with more than MAX_EXPIRED_IDS reserved ones takes no queries).
        while qid in pending or qid in expired:
            qid = ids(16)
        query.conn = self
        query.qid = qid
        query.replies_seen = self._replies
        pending[qid] = query
        self.stats.inflight += 1
        wire = query.wire
        # Length prefix and message in one piece (RFC 7766 §8): no segment carries half.
        self._outgoing.append((query, _LEN_ID.pack(len(wire), qid) + wire[2:]))

    def data_to_send(self) -> bytes:
        """The frames queued since the last call, minus those of queries gone meanwhile.

        Frames queued together are written together: a burst of misses costs one write
        per connection, not one per query.
        """
        outgoing = self._outgoing
        if not outgoing:
            return b""
        self._outgoing = []
        pending = self.pending
        if len(outgoing) == 1:  # below saturation, the usual case: no list, no join
            query, frame = outgoing[0]
            return frame if pending.get(query.qid) is query else b""
        return b"".join([frame for query, frame in outgoing if pending.get(query.qid) is query])

    def receive(self, data: bytes, now: float) -> list[Q]:
        """Bytes from the server: the queries they answer, each with ``reply`` set.

        A reply is taken only when QR is set and its ID and question (case-insensitive)
        match a query in flight here; anything else is dropped and counted in
        ``bad_replies``. Bytes that break the framing close the connection: the queries
        still in flight then come back too, failed with :class:`ConnectionLost`.
        """
        try:
            frames = self._reader.feed(data, now)
        except FrameError as exc:
            self.stats.bad_replies += 1
            done = self._match(exc.frames, now)
            return done + self.close(ConnectionLost, "bad framing from server")
        return self._match(frames, now)

    def _match(self, frames: list[bytes], now: float) -> list[Q]:
        pending = self.pending
        done: list[Q] = []
        for reply in frames:
            qid = (reply[0] << 8) | reply[1]
            query = pending.get(qid)
            # The ID was matched by the lookup; b"" skips reply_matches' own ID check.
            if query is None or not reply_matches(reply, b"", query.question):
                self.stats.bad_replies += 1
                continue
            del pending[qid]
            query.reply = reply
            done.append(query)
        if done:
            self._replies += len(done)
            self.stats.inflight -= len(done)
            if not pending:
                self._drained(now)
        return done

    def cancel(self, query: Q, now: float) -> None:
        """Forget ``query`` (its waiter gave up); its ID is free for reuse at once."""
        pending = self.pending
        if pending.get(query.qid) is query:
            del pending[query.qid]
            self.stats.inflight -= 1
            if not pending:
                self._drained(now)

    def handle_timer(self, now: float) -> list[Q]:
        """Apply every deadline due at ``now``: the queries that timed out (``error`` set).

        Also retires the connection at its maximum age, and closes it when idle for
        ``idle_timeout_s``.
        """
        state = self.state
        if state == CLOSED:
            return []
        if state < RETIRED and now >= self._retire_at:
            self.retire()
        pending = self.pending
        late = [query for query in pending.values() if query.deadline <= now]
        for query in late:
            del pending[query.qid]
            # The ID stays reserved here: a late reply to it must not be taken for the
            # answer to a newer query that drew the same ID (RFC 5452).
            self._expired.add(query.qid)
            # One instance per query: a shared exception would collect every waiter's
            # traceback and keep their frames alive.
            query.error = UpstreamTimeout(f"{self._label}: timed out")
            if query.replies_seen == self._replies:
                # Nothing at all came back since this query went out: the peer is
                # probably gone without a reset (a deleted pod); stop feeding it.
                self.retire()
        if late:
            self.stats.inflight -= len(late)
            if len(self._expired) > self._max_expired:
                self.retire()
            if not pending:
                self._drained(now)
        elif (
            not pending
            and self.state < RETIRED
            and self._reader.expiry(self._idle_since, self._idle_s, NEVER) <= now
        ):
            self.state = CLOSED
        return late

    def retire(self) -> None:
        """Take no new queries; close once the ones in flight are done."""
        if self.state < RETIRED:
            self.state = RETIRED if self.pending else CLOSED

    def close(self, error: type[UpstreamError], reason: str) -> list[Q]:
        """Close now: the queries in flight, each failed with ``error(reason)``."""
        if self.state == CLOSED:
            return []
        self.state = CLOSED
        self._outgoing = []
        pending = self.pending
        failed = list(pending.values())
        pending.clear()
        self.stats.inflight -= len(failed)
        message = f"{self._label}: {reason}"
        for query in failed:
            query.error = error(message)
        return failed

    def connection_lost(self, now: float) -> list[Q]:
        """The transport went away: the queries in flight, failed with ConnectionLost."""
        return self.close(ConnectionLost, "connection closed by peer")

    def _drained(self, now: float) -> None:
        self._idle_since = now
        if self.state == RETIRED:
            self.state = CLOSED
