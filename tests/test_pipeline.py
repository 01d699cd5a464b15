"""The sans-IO pipelined upstream connection, driven with scripted bytes and a fake clock.

No sockets and no event loop: each test feeds :class:`PipelinedConnection` what a server
would send and the time it is, and checks what it would write, deliver and retire.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterable

import dns.message
import dns.rcode
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from dnsproxy.framing import MAX_FRAME, frame
from dnsproxy.pipeline import (
    ConnectionLost,
    PendingQuery,
    PipelinedConnection,
    UpstreamBusy,
    UpstreamStats,
    UpstreamTimeout,
)
from dnsproxy.wire import HEADER_LEN, question_end


def make_query(name: str, deadline: float) -> PendingQuery:
    wire = dns.message.make_query(name, "A", use_edns=0).to_wire()
    return PendingQuery(wire, wire[HEADER_LEN : question_end(wire)], deadline)


def reply_frame(query: PendingQuery, qid: int | None = None, *, qr: bool = True) -> bytes:
    """What a server writes back for ``query`` (with ``qid`` on the wire)."""
    msg = dns.message.from_wire(query.wire)
    msg.id = query.qid if qid is None else qid
    wire = bytearray(dns.message.make_response(msg).to_wire())
    if not qr:
        wire[2] &= 0x7F
    return frame(bytes(wire))


def scripted(*ids: int) -> Callable[[int], int]:
    """An ID source that draws ``ids`` in order."""
    it = iter(ids)
    return lambda bits: next(it)


def sent_ids(data: bytes) -> list[int]:
    out = []
    off = 0
    while off < len(data):
        length, qid = struct.unpack_from(">HH", data, off)
        out.append(qid)
        off += 2 + length
    return out


def connection(now: float = 0.0, **kw: object) -> PipelinedConnection[PendingQuery]:
    conn: PipelinedConnection[PendingQuery] = PipelinedConnection(now, **kw)  # type: ignore[arg-type]
    conn.connected(now)
    return conn


def test_pipelined_queries_answered_out_of_order_in_one_chunk() -> None:
    conn = connection(ids=scripted(0x1111, 0x2222, 0x3333))
    queries = [make_query(f"q{i}.example.", 1.0) for i in range(3)]
    for q in queries:
        conn.send(q, 0.0)
    written = conn.data_to_send()
    assert sent_ids(written) == [0x1111, 0x2222, 0x3333]
    assert conn.data_to_send() == b"", "each frame is handed out once"
    # The message after the ID is the caller's, byte for byte.
    assert written[4 : 2 + len(queries[0].wire)] == queries[0].wire[2:]
    done = conn.receive(reply_frame(queries[2]) + reply_frame(queries[0]), 0.1)
    assert done == [queries[2], queries[0]]
    assert all(q.error is None and q.reply[:2] == q.qid.to_bytes(2, "big") for q in done)
    assert list(conn.pending.values()) == [queries[1]]
    assert conn.stats.inflight == 1


def test_replies_that_match_nothing_are_dropped_and_counted() -> None:
    conn = connection(ids=scripted(5))
    q = make_query("www.example.", 1.0)
    conn.send(q, 0.0)
    other = make_query("evil.example.", 1.0)
    other.qid = 5
    stray = [
        reply_frame(q, qid=6),  # wrong ID
        reply_frame(other),  # our ID, another question
        reply_frame(q, qr=False),  # not a response
    ]
    assert conn.receive(b"".join(stray), 0.1) == []
    assert conn.stats.bad_replies == 3
    assert conn.receive(reply_frame(q), 0.2) == [q]


def test_id_of_a_timed_out_query_is_not_reused() -> None:
    conn = connection(ids=scripted(7, 3, 7, 7, 9))
    first = make_query("slow.example.", 1.0)
    conn.send(first, 0.0)
    fast = make_query("fast.example.", 1.0)
    conn.send(fast, 0.0)
    assert conn.receive(reply_frame(fast), 0.1) == [fast]  # the peer is alive
    assert conn.timer() == 1.0
    assert conn.handle_timer(1.0) == [first]
    assert isinstance(first.error, UpstreamTimeout)
    assert 7 in conn.expired_ids
    second = make_query("next.example.", 3.0)
    conn.send(second, 1.5)
    assert second.qid == 9, "ID 7 stays reserved after its query timed out"
    # The late reply to the first query is not taken for anything.
    assert conn.receive(reply_frame(first, qid=7), 1.6) == []
    assert conn.stats.bad_replies == 1
    assert conn.receive(reply_frame(second), 1.7) == [second]


def test_reply_after_its_deadline_is_dropped() -> None:
    conn = connection(ids=scripted(1, 2))
    late = make_query("late.example.", 1.0)
    ontime = make_query("ontime.example.", 5.0)
    conn.send(late, 0.0)
    conn.send(ontime, 0.0)
    conn.receive(reply_frame(ontime), 0.5)  # something answered: the peer is alive
    assert conn.handle_timer(1.0) == [late]
    assert conn.receive(reply_frame(late), 1.2) == []
    assert late.reply == b""
    assert conn.stats.bad_replies == 1
    assert not conn.retired, "a timeout after an answer does not retire the connection"


def test_timeout_with_nothing_answered_since_retires() -> None:
    conn = connection(ids=scripted(1, 2, 3))
    a = make_query("a.example.", 1.0)
    b = make_query("b.example.", 2.0)
    conn.send(a, 0.0)
    conn.send(b, 0.5)
    conn.handle_timer(1.0)
    assert conn.retired and not conn.closed, "b is still in flight"
    assert not conn.accepting
    with pytest.raises(UpstreamBusy):
        conn.send(make_query("c.example.", 3.0), 1.1)
    # b's reply still counts; then the drained connection is closed.
    assert conn.receive(reply_frame(b), 1.5) == [b]
    assert conn.closed
    assert conn.timer() is None


def test_retired_by_age_and_closed_once_drained() -> None:
    conn = connection(10.0, ids=scripted(1, 2), max_age_s=30.0)
    q = make_query("www.example.", 41.0)
    conn.send(q, 39.0)
    assert conn.timer() == 40.0  # the age comes before the query's deadline
    assert conn.handle_timer(40.0) == []
    assert conn.retired and not conn.closed
    assert conn.timer() == 41.0
    assert conn.receive(reply_frame(q), 40.5) == [q]
    assert conn.closed


def test_too_many_timed_out_ids_retire() -> None:
    conn = connection(ids=scripted(*range(1, 20)), max_expired_ids=3)
    keep = make_query("keep.example.", 100.0)
    conn.send(keep, 0.0)
    for i in range(4):
        q = make_query(f"t{i}.example.", 1.0 + i)
        conn.send(q, float(i))
        # Each timeout follows an answer, so only the count of reserved IDs matters.
        other = make_query(f"ok{i}.example.", 50.0)
        conn.send(other, float(i))
        conn.receive(reply_frame(other), float(i) + 0.5)
        assert conn.handle_timer(1.0 + i) == [q]
        assert conn.retired == (i == 3)


def test_idle_connection_closes() -> None:
    conn = connection(ids=scripted(1), idle_timeout_s=5.0, max_age_s=100.0)
    q = make_query("www.example.", 1.0)
    conn.send(q, 0.0)
    conn.receive(reply_frame(q), 0.2)
    assert conn.timer() == 5.2
    conn.handle_timer(5.0)
    assert not conn.closed
    conn.handle_timer(5.2)
    assert conn.closed


def test_reset_mid_pipeline_retries_each_query_once() -> None:
    """RFC 7766 §6.2.1: queries in flight when the server closes go once more elsewhere."""
    first = connection(ids=scripted(1, 2, 3))
    queries = [make_query(f"q{i}.example.", 2.0) for i in range(3)]
    for q in queries:
        first.send(q, 0.0)
    assert first.receive(reply_frame(queries[1]), 0.1) == [queries[1]]
    lost = first.connection_lost(0.2)
    assert lost == [queries[0], queries[2]]
    assert all(isinstance(q.error, ConnectionLost) for q in lost)
    assert first.closed and first.stats.inflight == 0
    second = connection(0.2, ids=scripted(1, 2))
    for q in lost:
        assert q.retry(0.2)
        second.send(q, 0.2)
    # The second connection goes down too: no third try.
    assert second.connection_lost(0.3) == lost
    assert [q.retry(0.3) for q in lost] == [False, False]


def test_no_retry_past_the_deadline() -> None:
    conn = connection(ids=scripted(1))
    q = make_query("www.example.", 1.0)
    conn.send(q, 0.0)
    (lost,) = conn.connection_lost(1.0)
    assert not lost.retry(1.0)


def test_bad_framing_delivers_what_came_before_and_fails_the_rest() -> None:
    conn = connection(ids=scripted(1, 2))
    a = make_query("a.example.", 1.0)
    b = make_query("b.example.", 1.0)
    conn.send(a, 0.0)
    conn.send(b, 0.0)
    done = conn.receive(reply_frame(a) + b"\x00\x05hello", 0.1)
    assert done == [a, b]
    assert a.error is None and isinstance(b.error, ConnectionLost)
    assert conn.closed
    assert conn.stats.bad_replies == 1


def test_cancelled_query_is_not_written_and_frees_its_id() -> None:
    conn = connection(ids=scripted(4, 4))
    gone = make_query("gone.example.", 1.0)
    conn.send(gone, 0.0)
    conn.cancel(gone, 0.0)
    assert conn.data_to_send() == b""
    again = make_query("again.example.", 1.0)
    conn.send(again, 0.0)
    assert again.qid == 4
    assert sent_ids(conn.data_to_send()) == [4]


def test_frames_wait_for_the_transport() -> None:
    conn: PipelinedConnection[PendingQuery] = PipelinedConnection(0.0, ids=scripted(1))
    q = make_query("www.example.", 1.0)
    conn.send(q, 0.0)  # still connecting: queued
    conn.connected(0.05)
    assert sent_ids(conn.data_to_send()) == [1]


def test_close_fails_everything_in_flight() -> None:
    stats = UpstreamStats()
    conn = connection(stats=stats, ids=scripted(1, 2))
    queries = [make_query(f"q{i}.example.", 1.0) for i in range(2)]
    for q in queries:
        conn.send(q, 0.0)
    assert conn.close(UpstreamBusy, "shutting down") == queries
    assert all(isinstance(q.error, UpstreamBusy) for q in queries)
    assert stats.inflight == 0
    assert conn.close(UpstreamBusy, "again") == []


# --------------------------------------------------------------------------------------
# Hypothesis: any sequence of events keeps the connection's promises.


class PipelineMachine(RuleBasedStateMachine):
    """Random sends, replies (split anywhere), late replies, timeouts, cancels and resets.

    A tiny ID space (8 IDs, at most 3 in flight, retirement after 3 reserved IDs) makes
    collisions between new, in-flight and timed-out IDs common.
    """

    queries = Bundle("queries")

    @initialize(seed=st.integers(min_value=0, max_value=2**32))
    def start(self, seed: int) -> None:
        rng = random.Random(seed)
        self.now = 0.0
        self.conn: PipelinedConnection[PendingQuery] = PipelinedConnection(
            self.now,
            max_inflight=3,
            max_expired_ids=3,
            max_age_s=50.0,
            idle_timeout_s=20.0,
            ids=lambda bits: rng.randrange(8),
        )
        self.conn.connected(self.now)
        self.count = 0
        self.completions: dict[int, int] = {}  # id(query) -> times it was finished
        self.cancelled: set[int] = set()
        self.sent: list[PendingQuery] = []
        self.stream = b""  # what the server has written and we have not read yet
        self.timed_out: set[int] = set()  # IDs of queries that timed out, by our account

    def finish(self, done: Iterable[PendingQuery]) -> None:
        for q in done:
            assert id(q) not in self.cancelled, "a cancelled query came back"
            self.completions[id(q)] = self.completions.get(id(q), 0) + 1
            assert (q.error is None) != (q.reply == b"")
            if isinstance(q.error, UpstreamTimeout):
                self.timed_out.add(q.qid)

    @precondition(lambda self: self.conn.accepting)
    @rule(target=queries, timeout=st.floats(min_value=0.1, max_value=5.0))
    def send(self, timeout: float) -> PendingQuery:
        self.count += 1
        q = make_query(f"n{self.count}.example.", self.now + timeout)
        self.conn.send(q, self.now)
        assert q.qid not in self.timed_out, "a new query drew the ID of one that timed out"
        self.sent.append(q)
        self.completions[id(q)] = 0
        return q

    @rule(q=queries)
    def server_answers(self, q: PendingQuery) -> None:
        # The server answers whatever it was sent, even long after our deadline.
        if q.qid >= 0:
            self.stream += reply_frame(q)

    @rule(q=queries, wrong=st.integers(min_value=0, max_value=7))
    def server_answers_wrong_id(self, q: PendingQuery, wrong: int) -> None:
        if q.qid >= 0:
            self.stream += reply_frame(q, qid=wrong)

    @rule(n=st.integers(min_value=1, max_value=200))
    def bytes_arrive(self, n: int) -> None:
        chunk, self.stream = self.stream[:n], self.stream[n:]
        if chunk:
            self.finish(self.conn.receive(chunk, self.now))

    @rule(dt=st.floats(min_value=0.0, max_value=3.0))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        when = self.conn.timer()
        if when is not None and when <= self.now:
            self.finish(self.conn.handle_timer(self.now))

    @rule(q=queries)
    def waiter_gives_up(self, q: PendingQuery) -> None:
        if self.completions.get(id(q)) == 0 and id(q) not in self.cancelled:
            self.cancelled.add(id(q))
            self.conn.cancel(q, self.now)

    @rule()
    def reset(self) -> None:
        self.finish(self.conn.connection_lost(self.now))

    @invariant()
    def ids_unique_and_tables_bounded(self) -> None:
        if not hasattr(self, "conn"):
            return
        pending = self.conn.pending
        assert all(q.qid == qid for qid, q in pending.items())
        assert len(pending) <= 3
        assert len(self.conn.expired_ids) <= 3 + 3
        assert not (set(pending) & self.timed_out)
        assert self.conn.expired_ids == self.timed_out or self.conn.closed
        assert self.conn.stats.inflight == len(pending)
        assert self.conn._reader.buffered < MAX_FRAME
        for q in pending.values():
            assert self.completions[id(q)] == 0 and id(q) not in self.cancelled

    @invariant()
    def each_query_finished_at_most_once(self) -> None:
        if hasattr(self, "conn"):
            assert all(n <= 1 for n in self.completions.values())

    @invariant()
    def accepted_replies_answer_their_question(self) -> None:
        if not hasattr(self, "conn"):
            return
        for q in self.sent:
            if q.reply:
                assert q.reply[HEADER_LEN : HEADER_LEN + len(q.question)] == q.question

    def teardown(self) -> None:
        if not hasattr(self, "conn"):
            return
        self.finish(self.conn.close(UpstreamBusy, "end of test"))
        # Every query finished exactly once, or was given up by its waiter.
        for q in self.sent:
            expected = 0 if id(q) in self.cancelled else 1
            assert self.completions[id(q)] == expected


PipelineMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=40)
test_pipeline_state_machine = PipelineMachine.TestCase


def test_rcode_is_not_the_connection_s_business() -> None:
    """A SERVFAIL reply is a valid reply: the connection delivers it like any other."""
    conn = connection(ids=scripted(3))
    q = make_query("www.example.", 1.0)
    conn.send(q, 0.0)
    msg = dns.message.from_wire(q.wire)
    msg.id = 3
    servfail = dns.message.make_response(msg)
    servfail.set_rcode(dns.rcode.SERVFAIL)
    assert conn.receive(frame(servfail.to_wire()), 0.1) == [q]
