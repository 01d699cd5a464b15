"""Sans-IO tests of serve-stale (RFC 8767) and prefetch bookkeeping.

The cache's side (which entries are due for a refresh, the stale copy and its EDE option),
the zone's (which expired entries may be served, when a failed name is asked again) and
the resolution's (the client-response timer, the stale answer when every try failed).
Replies are built with dnspython and what a client receives is read back with it.
"""

from __future__ import annotations

import random

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest
from dnsmsg import reply_to, rrset

from dnsproxy import wire
from dnsproxy.cache import NEGATIVE, POSITIVE, SERVFAIL, STALE_TTL_S, Cache, Entry, make_entry
from dnsproxy.config import CachePolicy, ServeStaleConfig, UpstreamConfig, ZoneConfig
from dnsproxy.resolution import Resolution, ServerState, Zone

NOW = 1000.0


def query(name: str = "www.example.", edns: bool = True) -> bytes:
    return dns.message.make_query(name, "A", use_edns=0 if edns else False, id=7).to_wire()


def entry_for(ttl: int, now: float = NOW, rcode: int = dns.rcode.NOERROR) -> Entry:
    q = dns.message.make_query("www.example.", "A", use_edns=0, id=0)
    if rcode == dns.rcode.NOERROR:
        r = reply_to(q, [rrset("www.example.", ttl, "A", "169.254.1.1")])
    else:
        r = reply_to(q, rcode=rcode)
    policy = CachePolicy(servfail_ttl_s=ttl)
    return make_entry(wire.inspect_response(r.to_wire()), policy, now)[0]


def key() -> bytes:
    return wire.parse_query(query())[0]


def seen(entry: Entry, now: float, edns: bool = True) -> dns.message.Message:
    data = query(edns=edns)
    _, qend, e = wire.parse_query(data)
    return dns.message.from_wire(entry.answer_once(data, qend, e, now, 0, wire.DEFAULT_OPTS))


def ede_codes(message: dns.message.Message) -> list[int]:
    return [o.code for o in message.options if isinstance(o, dns.edns.EDEOption)]


def zone(
    max_stale_s: int = 3600, answer_after_s: float = 1.8, ede: bool = True
) -> Zone[ServerState]:
    upstream = UpstreamConfig("tcp", "169.254.0.1")
    config = ZoneConfig(".", (upstream,), cache=CachePolicy(max_stale_s=max_stale_s))
    return Zone(
        config,
        [ServerState(upstream.label)],
        random.Random(0),
        ServeStaleConfig(answer_after_s=answer_after_s, ede=ede),
    )


def resolution(z: Zone[ServerState], stale: Entry | None, now: float) -> Resolution[ServerState]:
    q = query(edns=False)
    k, qend, _ = wire.parse_query(q)
    return Resolution(k, q[wire.HEADER_LEN : qend], z, now, stale)


# --------------------------------------------------------------------------------------
# Prefetch: which entries are due, and when


class Due:
    """Collects what the cache reports due, as the forwarder's hook would."""

    def __init__(self, cache: Cache) -> None:
        self.entries: list[Entry] = []
        cache.on_due = self.entries.append


@pytest.mark.parametrize(
    ("ttl", "due_age"), [(1, 0), (2, 1), (3, 2), (10, 9), (30, 27), (300, 270)]
)
def test_an_entry_is_due_in_the_last_tenth_of_its_ttl_at_least_its_last_second(
    ttl: int, due_age: int
) -> None:
    c = Cache(10)
    c.prefetch_min_hits = 1
    due = Due(c)
    e = entry_for(ttl)
    c.put(key(), e, NOW)
    e.hits = 5
    if due_age:
        e.prepare(due_age - 1, len(query()), wire.DEFAULT_OPTS)
    assert due.entries == []
    e.prepare(due_age, len(query()), wire.DEFAULT_OPTS)
    assert due.entries == [e] and e.key == key()


def test_due_once_and_only_when_popular_enough() -> None:
    c = Cache(10)
    c.prefetch_min_hits = 3
    due = Due(c)
    e = entry_for(30)
    c.put(key(), e, NOW)
    qend = len(query())
    e.hits = 2
    e.prepare(27, qend, wire.DEFAULT_OPTS)
    assert due.entries == [], "two hits: not popular enough yet"
    e.hits = 3
    e.prepare(28, qend, wire.DEFAULT_OPTS)
    assert due.entries == [e], "looked at again at the next second's cut"
    e.prepare(29, qend, wire.DEFAULT_OPTS)
    assert due.entries == [e], "one refresh per entry"


def test_hits_are_counted_by_the_general_hit_path() -> None:
    e = entry_for(30)
    data = query()
    _, qend, edns = wire.parse_query(data)
    for _ in range(3):
        e.answer(data, qend, edns, NOW, 0, wire.DEFAULT_OPTS)
    assert e.hits == 3


def test_servfail_entries_and_prefetch_off_are_never_due() -> None:
    c = Cache(10)
    due = Due(c)
    off = entry_for(30)
    c.put(key(), off, NOW)
    off.hits = 100
    off.prepare(29, len(query()), wire.DEFAULT_OPTS)
    c.prefetch_min_hits = 1
    failed = entry_for(5, rcode=dns.rcode.SERVFAIL)
    assert failed.kind == SERVFAIL
    c.put(b"other", failed, NOW)
    failed.hits = 100
    failed.prepare(4, len(query()), wire.DEFAULT_OPTS)
    assert due.entries == []


# --------------------------------------------------------------------------------------
# The stale answer


def test_stale_copy_has_ttl_30_and_ede_3_for_edns_clients() -> None:
    e = entry_for(5)
    stale = e.stale_copy(NOW + 100, ede=True)
    msg = seen(stale, NOW + 100)
    assert msg.rcode() == dns.rcode.NOERROR
    assert [rr.ttl for rr in msg.answer] == [STALE_TTL_S]
    assert msg.answer[0][0].to_text() == "169.254.1.1"
    assert ede_codes(msg) == [3]
    plain = seen(stale, NOW + 100, edns=False)
    assert plain.edns < 0 and [rr.ttl for rr in plain.answer] == [STALE_TTL_S]
    assert ede_codes(seen(e.stale_copy(NOW + 100, ede=False), NOW + 100)) == []
    assert e.ttls == (5,), "the cached entry itself is not changed"


def test_a_stale_answer_cut_to_the_client_size_drops_the_option_not_records() -> None:
    q = dns.message.make_query("big.example.", "A", use_edns=0, id=0)
    addresses = [f"169.254.2.{i}" for i in range(1, 61)]  # about 1 KB
    r = reply_to(q, [rrset("big.example.", 5, "A", *addresses)])
    big = make_entry(wire.inspect_response(r.to_wire()), CachePolicy(), NOW)[0]
    stale = big.stale_copy(NOW + 100, ede=True)
    data = dns.message.make_query("big.example.", "A", use_edns=0, payload=512).to_wire()
    _, qend, edns = wire.parse_query(data)
    cut = stale.answer_once(data, qend, edns, NOW + 100, 512, wire.DEFAULT_OPTS)
    assert len(cut) <= 512
    msg = dns.message.from_wire(cut)
    assert msg.flags & dns.flags.TC and msg.edns == 0 and ede_codes(msg) == []
    assert 0 < len(msg.answer[0]) < 60 and msg.answer[0].ttl == STALE_TTL_S
    whole = dns.message.from_wire(
        stale.answer_once(data, qend, edns, NOW + 100, 0, wire.DEFAULT_OPTS)
    )
    assert len(whole.answer[0]) == 60 and ede_codes(whole) == [3]


# --------------------------------------------------------------------------------------
# The zone: which expired entries, and when to ask again


def test_stale_candidates_are_expired_entries_within_the_zone_cap() -> None:
    z = zone(max_stale_s=300)
    e = entry_for(5)
    assert z.stale_candidate(e, NOW + 1) is None, "still live"
    assert z.stale_candidate(e, NOW + 5) is e
    assert z.stale_candidate(e, NOW + 304.9) is e
    assert z.stale_candidate(e, NOW + 305) is None, "past the maximum staleness"
    assert z.stale_candidate(None, NOW) is None
    assert z.stale_candidate(entry_for(5, rcode=dns.rcode.SERVFAIL), NOW + 6) is None
    assert zone(max_stale_s=0).stale_candidate(e, NOW + 5) is None, "0 turns it off"


def test_nxdomain_is_served_stale_too() -> None:
    q = dns.message.make_query("nx.example.", "A", use_edns=0, id=0)
    soa = rrset("example.", 60, "SOA", "ns.example. h.example. 1 2 3 4 60")
    r = reply_to(q, authority=[soa], rcode=dns.rcode.NXDOMAIN)
    e = make_entry(wire.inspect_response(r.to_wire()), CachePolicy(), NOW)[0]
    assert e.kind == NEGATIVE
    assert zone().stale_candidate(e, NOW + 61) is e


def test_a_failed_name_is_held_30_s_unless_a_server_comes_back() -> None:
    z = zone()
    e = entry_for(5)
    assert not z.stale_held(e, NOW + 10), "never failed: ask upstream"
    e.failed_at = NOW + 10
    assert z.stale_held(e, NOW + 10)
    assert z.stale_held(e, NOW + 39.9)
    assert not z.stale_held(e, NOW + 40), "the 30 s recheck timer ran out"
    z.servers[0].recovered_at = NOW + 12
    assert not z.stale_held(e, NOW + 13), "its server was marked up since: ask again"


# --------------------------------------------------------------------------------------
# The resolution: timer and failure


def test_the_client_response_timer_hands_out_the_stale_answer_and_tries_go_on() -> None:
    z = zone(answer_after_s=1.8)
    e = entry_for(5)
    r = resolution(z, e, NOW + 60)
    assert r.timer() == NOW + 61.8
    server = r.next_try(NOW + 60)
    assert server is not None
    assert r.handle_timer(NOW + 61.7) is None, "not due yet"
    stale = r.handle_timer(NOW + 61.8)
    assert stale is not None and stale.ttls == (STALE_TTL_S,)
    assert r.timer() is None and r.handle_timer(NOW + 62) is None, "once"
    # The refresh still counts: a fresh answer ends the resolution as usual.
    upstream = dns.message.from_wire(r.wire)
    fresh = reply_to(upstream, [rrset("www.example.", 5, "A", "169.254.1.2")]).to_wire()
    outcome = r.answered(fresh, NOW + 62.5)
    assert outcome is not None and outcome[1] and outcome[0].kind == POSITIVE


def test_no_timer_without_a_stale_entry() -> None:
    assert resolution(zone(), None, NOW).timer() is None


def test_when_every_try_fails_the_answer_is_stale_not_cached_and_the_name_held() -> None:
    z = zone()
    e = entry_for(5)
    r = resolution(z, e, NOW + 60)
    while r.next_try(NOW + 60) is not None:
        r.failed(False, NOW + 60)
    stale, cacheable = r.failure(NOW + 60.5)
    assert not cacheable and stale.ttls == (STALE_TTL_S,) and stale.rcode == dns.rcode.NOERROR
    assert e.failed_at == NOW + 60.5
    assert z.stale_held(e, NOW + 61)


def test_an_upstream_servfail_gives_way_to_the_stale_answer() -> None:
    z = zone()
    r = resolution(z, entry_for(5), NOW + 60)
    r.next_try(NOW + 60)
    upstream = dns.message.from_wire(r.wire)
    servfail = reply_to(upstream, rcode=dns.rcode.SERVFAIL).to_wire()
    assert r.answered(servfail, NOW + 60.1) is None
    r.next_try(NOW + 60.1)
    assert r.answered(servfail, NOW + 60.2) is None
    assert r.next_try(NOW + 60.2) is None
    stale, cacheable = r.failure(NOW + 60.2)
    assert stale.rcode == dns.rcode.NOERROR and not cacheable


def test_the_refresh_age_comes_from_the_lifetime_the_entry_has_when_stored() -> None:
    """As for entries restored from a handover snapshot: built, then given their expiry."""
    c = Cache(10)
    c.prefetch_min_hits = 1
    e = entry_for(0)
    e.expires_at = e.stored_at + 30
    c.put(key(), e, NOW)
    assert e.refresh_age == 27
