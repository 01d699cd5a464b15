"""The sans-IO resolution machine: failover order, deadlines, what replies mean, health.

Driven with a fake clock and dnspython-built replies; no sockets, no event loop.
"""

from __future__ import annotations

import random

import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnsmsg import reply_to, rrset

from dnsproxy import wire
from dnsproxy.cache import NEGATIVE, POSITIVE, SERVFAIL
from dnsproxy.config import CachePolicy, Policy, UpstreamConfig, ZoneConfig
from dnsproxy.resolution import (
    MAX_FAILS,
    PROBE_INTERVAL_S,
    PROBE_MAX_INTERVAL_S,
    PROBE_QUERY,
    Resolution,
    ServerState,
    Zone,
)


def zone(
    n: int = 3,
    policy: Policy = "sequential",
    try_timeout_s: float = 1.0,
    deadline_s: float = 2.0,
    seed: int = 0,
) -> Zone[ServerState]:
    upstreams = tuple(UpstreamConfig("tcp", f"169.254.0.{i + 1}") for i in range(n))
    config = ZoneConfig(".", upstreams, policy, try_timeout_s, deadline_s, CachePolicy())
    servers = [ServerState(u.label) for u in upstreams]
    return Zone(config, servers, random.Random(seed))


def question(name: str = "www.example.", rdtype: str = "A") -> tuple[bytes, bytes]:
    """(cache key, question section) of a plain query."""
    q = dns.message.make_query(name, rdtype, use_edns=0).to_wire()
    key, qend, _ = wire.parse_query(q)
    return key, q[wire.HEADER_LEN : qend]


def resolution(z: Zone[ServerState], now: float = 0.0) -> Resolution[ServerState]:
    key, q = question()
    return Resolution(key, q, z, now)


def reply(r: Resolution[ServerState], rcode: int = dns.rcode.NOERROR) -> bytes:
    """The server's reply to the query ``r`` sends upstream."""
    query = dns.message.from_wire(r.wire)
    if rcode == dns.rcode.NOERROR:
        answer = [rrset("www.example.", 300, "A", "169.254.1.1")]
        return reply_to(query, answer).to_wire()
    return reply_to(query, rcode=rcode).to_wire()


def labels(servers: list[ServerState]) -> list[str]:
    return [s.label.split(".")[-1].split(":")[0] for s in servers]


def tried(r: Resolution[ServerState], now: float = 0.0) -> list[str]:
    """Fail every try until the resolution gives up; the servers asked, in order."""
    asked = []
    while (server := r.next_try(now)) is not None:
        asked.append(server)
        r.failed(False, now)
    return labels(asked)


def test_sequential_tries_every_server_in_order() -> None:
    assert tried(resolution(zone(3))) == ["1", "2", "3"]


def test_one_server_gets_two_tries() -> None:
    assert tried(resolution(zone(1))) == ["1", "1"]


def test_round_robin_starts_each_question_at_the_next_server() -> None:
    z = zone(3, "round_robin")
    firsts = [labels(resolution(z).order)[0] for _ in range(4)]
    assert firsts == ["1", "2", "3", "1"]
    assert labels(resolution(z).order) == ["2", "3", "1"]


def test_random_policy_is_a_permutation_drawn_from_the_zone_rng() -> None:
    z = zone(4, "random", seed=7)
    orders = [labels(resolution(z).order) for _ in range(20)]
    assert all(sorted(o) == ["1", "2", "3", "4"] for o in orders)
    assert len({tuple(o) for o in orders}) > 1
    expected = random.Random(7)
    assert orders[0] == labels(expected.sample(zone(4).servers, 4))


@pytest.mark.parametrize("policy", ["sequential", "random", "round_robin"])
def test_servers_marked_down_go_last_under_every_policy(policy: Policy) -> None:
    z = zone(3, policy)
    down = z.servers[0]
    for _ in range(MAX_FAILS):
        down.failed(0.0)
    for _ in range(6):
        order = resolution(z).order
        assert order[-1] is down
        assert sorted(labels(order)) == ["1", "2", "3"]


def test_each_try_is_bounded_by_the_try_timeout_and_the_deadline() -> None:
    r = resolution(zone(3, try_timeout_s=1.0, deadline_s=2.5), now=10.0)
    assert r.ends_at == 12.5
    assert r.next_try(10.0) is not None and r.timeout_s == 1.0
    r.failed(False, 11.0)
    assert r.next_try(11.0) is not None and r.timeout_s == 1.0
    r.failed(False, 12.0)
    assert r.next_try(12.0) is not None and r.timeout_s == 0.5, "only what is left"
    r.failed(False, 12.5)
    assert r.next_try(12.5) is None


def test_no_try_once_the_deadline_has_passed() -> None:
    r = resolution(zone(3, deadline_s=2.0))
    assert r.next_try(0.0) is not None
    r.failed(False, 2.0)
    assert r.next_try(2.0) is None, "servers are left, time is not"


def test_an_answer_ends_the_resolution_with_a_cacheable_entry() -> None:
    r = resolution(zone(2))
    server = r.next_try(0.0)
    assert server is not None
    server.fails = 1
    outcome = r.answered(reply(r), 0.25)
    assert outcome is not None
    entry, cacheable = outcome
    assert cacheable and entry.kind == POSITIVE and entry.rcode == dns.rcode.NOERROR
    assert server.fails == 0
    assert sum(server.latency.counts) == 1 and server.latency.total_s == 0.25


def test_nxdomain_is_an_answer_too() -> None:
    r = resolution(zone(2))
    r.next_try(0.0)
    query = dns.message.from_wire(r.wire)
    soa = rrset("example.", 300, "SOA", "ns.example. h.example. 1 2 3 4 60")
    nx = reply_to(query, authority=[soa], rcode=dns.rcode.NXDOMAIN).to_wire()
    outcome = r.answered(nx, 0.1)
    assert outcome is not None and outcome[0].kind == NEGATIVE


@pytest.mark.parametrize("rcode", [dns.rcode.SERVFAIL, dns.rcode.REFUSED])
def test_error_rcode_tries_the_next_server_and_is_the_fallback(rcode: int) -> None:
    r = resolution(zone(2))
    first = r.next_try(0.0)
    assert first is not None
    assert r.answered(reply(r, rcode), 0.1) is None
    assert first.up and first.fails == 0, "a server that answers is alive"
    assert r.next_try(0.1) is not None
    r.failed(False, 1.1)
    assert r.next_try(1.1) is None
    entry, cacheable = r.failure(1.1)
    assert entry.rcode == rcode and entry.kind == SERVFAIL
    assert cacheable == (rcode == dns.rcode.SERVFAIL)


@pytest.mark.parametrize("rcode", [dns.rcode.FORMERR, dns.rcode.NOTIMP])
def test_formerr_or_notimp_from_upstream_becomes_our_servfail(rcode: int) -> None:
    r = resolution(zone(1))
    r.next_try(0.0)
    assert r.answered(reply(r, rcode), 0.1) is None
    r.next_try(0.1)
    r.failed(False, 1.1)
    entry, cacheable = r.failure(1.1)
    assert entry.rcode == dns.rcode.SERVFAIL and cacheable
    msg = dns.message.from_wire(entry.body)
    assert msg.question[0].name.to_text() == "www.example."


def test_malformed_reply_raises_for_the_caller_to_count_as_a_failure() -> None:
    r = resolution(zone(2))
    r.next_try(0.0)
    with pytest.raises(wire.WireError):
        r.answered(reply(r)[:-5], 0.1)  # the answer record cut short


def test_local_failure_spares_the_server_and_is_not_cached() -> None:
    r = resolution(zone(1))
    server = r.next_try(0.0)
    assert server is not None
    assert not r.failed(True, 0.0)
    assert server.fails == 0
    r.next_try(0.0)
    r.failed(True, 0.0)
    entry, cacheable = r.failure(0.0)
    assert entry.rcode == dns.rcode.SERVFAIL and not cacheable


def test_health_down_probed_with_backoff_and_up_again_on_any_rcode() -> None:
    server = ServerState("tcp://169.254.0.1:53", random.Random(3))
    assert server.up and server.timer() is None
    assert not server.failed(1.0)
    assert server.failed(2.0), "the second failure in a row marks it down"
    assert not server.up
    first = server.timer()
    assert first is not None and 2.0 + PROBE_INTERVAL_S / 2 <= first <= 2.0 + PROBE_INTERVAL_S
    assert not server.failed(2.1), "already down: no second probe schedule"
    assert server.timer() == first
    assert server.handle_timer(first - 0.01) is None, "not due yet"
    assert server.handle_timer(first) == PROBE_QUERY
    assert server.timer() is None, "one probe out at a time"
    # No reply: probed again, each interval twice the last (drawn from its upper half),
    # up to PROBE_MAX_INTERVAL_S.
    now = first
    intervals = []
    for _ in range(8):
        assert not server.probed(None, now)
        due = server.timer()
        assert due is not None
        intervals.append(due - now)
        assert server.handle_timer(due) == PROBE_QUERY
        now = due
    assert server.probe_failures == 8
    bounds = [min(PROBE_INTERVAL_S * 2 ** (i + 1), PROBE_MAX_INTERVAL_S) for i in range(8)]
    assert all(b / 2 <= got <= b for got, b in zip(intervals, bounds, strict=True)), intervals
    assert len({round(i, 6) for i in intervals[-4:]}) == 4, "jittered, not in lockstep"
    # A REFUSED reply to the probe is a well-formed reply: the server is serving.
    probe = dns.message.from_wire(PROBE_QUERY)
    refused = reply_to(probe, rcode=dns.rcode.REFUSED).to_wire()
    assert server.probed(refused, now + 0.1)
    assert server.up and server.timer() is None and server.recovered_at == now + 0.1
    # Down again later: the backoff starts over from PROBE_INTERVAL_S.
    server.failed(now + 1)
    assert server.failed(now + 2)
    again = server.timer()
    assert again is not None and again - (now + 2) <= PROBE_INTERVAL_S


def test_a_malformed_probe_reply_or_none_is_a_failed_probe_a_local_one_is_not() -> None:
    server = ServerState("tcp://169.254.0.1:53")
    server.failed(0.0)
    server.failed(0.0)
    server.handle_timer(1.0)
    assert not server.probed(PROBE_QUERY[:-3], 1.0)  # cut short: not well formed
    assert server.probe_failures == 1 and not server.up
    server.handle_timer(10.0)
    assert not server.probed(None, 10.0, local=True)
    assert server.probe_failures == 1, "a probe our own pool refused says nothing"
    assert server.timer() is not None


def test_a_failure_does_not_count_when_the_server_answered_since_the_try_was_sent() -> None:
    z = zone(1)
    server = z.servers[0]
    slow = resolution(z, now=0.0)
    assert slow.next_try(0.0) is server
    quick = resolution(z, now=0.5)
    assert quick.next_try(0.5) is server
    assert quick.answered(reply(quick), 0.6) is not None
    # The first try times out after the server answered the second: it is serving.
    assert not slow.failed(False, 1.0)
    assert not slow.failed(False, 1.0)
    assert server.fails == 0 and server.up
    # Tries sent after its last reply that fail do count.
    late = resolution(z, now=2.0)
    late.next_try(2.0)
    late.failed(False, 3.0)
    late.next_try(3.0)
    assert late.failed(False, 4.0)
    assert not server.up


def test_a_real_answer_marks_a_down_server_up_and_cancels_its_probe() -> None:
    z = zone(1)
    server = z.servers[0]
    server.failed(0.0)
    server.failed(0.0)
    assert not server.up
    r = resolution(z)
    r.next_try(0.0)
    assert r.answered(reply(r), 0.1) is not None
    assert server.up
    assert server.handle_timer(0.5) is None
    assert server.timer() is None


def test_probe_query_is_root_ns() -> None:
    probe = dns.message.from_wire(PROBE_QUERY)
    assert probe.question[0].name == dns.name.root
    assert probe.question[0].rdtype == dns.rdatatype.NS
