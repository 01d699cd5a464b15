"""Sans-IO tests of ``dnsproxy.cache``: TTL policy of entries and the bounded LRU store.

Upstream replies are built with dnspython, walked by ``wire.inspect_response`` as the
forwarder does, and what a client would receive is read back with dnspython.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache as memoize

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
from dnsmsg import reply_to, rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from dnsproxy import cache, wire
from dnsproxy.cache import Cache, Entry, make_entry
from dnsproxy.config import CachePolicy

NOW = 1000.0
CLIENT_ID = 0x5A5A
SOA = "ns1.example. hostmaster.example. 2024010101 3600 600 86400 {minimum}"


# --------------------------------------------------------------------------------------
# Helpers


def soa(ttl: int, minimum: int, owner: str = "example.") -> dns.rrset.RRset:
    return rrset(owner, ttl, "SOA", SOA.format(minimum=minimum))


def upstream_reply(
    qname: str,
    rdtype: str,
    answer: Sequence[dns.rrset.RRset] = (),
    authority: Sequence[dns.rrset.RRset] = (),
    additional: Sequence[dns.rrset.RRset] = (),
    *,
    rcode: int = dns.rcode.NOERROR,
    tc: bool = False,
) -> bytes:
    q = dns.message.make_query(qname, rdtype, use_edns=0, id=0)
    flags = dns.flags.TC if tc else 0
    return reply_to(q, answer, authority, additional, rcode=rcode, flags=flags).to_wire()


def build(
    policy: CachePolicy,
    qname: str,
    rdtype: str,
    answer: Sequence[dns.rrset.RRset] = (),
    authority: Sequence[dns.rrset.RRset] = (),
    additional: Sequence[dns.rrset.RRset] = (),
    *,
    rcode: int = dns.rcode.NOERROR,
    tc: bool = False,
    now: float = NOW,
) -> tuple[Entry, bool]:
    data = upstream_reply(qname, rdtype, answer, authority, additional, rcode=rcode, tc=tc)
    return make_entry(wire.inspect_response(data), policy, now)


def client_query(qname: str, rdtype: str = "A", *, edns: bool = False) -> bytes:
    return dns.message.make_query(
        qname, rdtype, use_edns=0 if edns else False, id=CLIENT_ID
    ).to_wire()


@memoize
def key_of(qname: str, rdtype: str = "A") -> bytes:
    return wire.parse_query(client_query(qname, rdtype))[0]


def seen_by_client(
    entry: Entry, qname: str, rdtype: str, now: float, *, edns: bool = False
) -> dns.message.Message:
    data = client_query(qname, rdtype, edns=edns)
    _, qend, e = wire.parse_query(data)
    return dns.message.from_wire(entry.answer(data, qend, e, now, 0, wire.DEFAULT_OPTS))


def ttl_s(entry: Entry, now: float = NOW) -> float:
    return entry.expires_at - now


def plain_entry(kind: int, ttl: int = 300, now: float = NOW, rcode: int = -1) -> Entry:
    if rcode < 0:
        rcode = {cache.POSITIVE: 0, cache.NEGATIVE: 3, cache.SERVFAIL: 2}[kind]
    body = wire.synth_body(b"\x01x\x00\x00\x01\x00\x01", rcode, False)
    return Entry(body, (), (), now, ttl, kind, rcode)


def recount(c: Cache) -> list[int]:
    counts = [0, 0, 0]
    for entry in c.store.values():
        counts[entry.kind] += 1
    return counts


# --------------------------------------------------------------------------------------
# make_entry: positive answers


def test_positive_ttl_is_min_over_answer_and_authority() -> None:
    entry, cacheable = build(
        CachePolicy(),
        "www.example.",
        "A",
        [rrset("www.example.", 300, "A", "169.254.1.1")],
        [rrset("example.", 120, "NS", "ns1.example.")],
        [rrset("ns1.example.", 30, "A", "169.254.1.53")],  # additional does not count
    )
    assert cacheable
    assert entry.kind == cache.POSITIVE
    assert ttl_s(entry) == 120
    msg = seen_by_client(entry, "WWW.example.", "A", NOW)
    assert [rr.ttl for rr in msg.answer + msg.authority + msg.additional] == [300, 120, 30]
    aged = seen_by_client(entry, "www.example.", "A", NOW + 100)
    assert [rr.ttl for rr in aged.answer + aged.authority + aged.additional] == [200, 20, 0]


def test_cname_chain_ttl_is_min_of_chain() -> None:
    entry, cacheable = build(
        CachePolicy(),
        "www.example.",
        "A",
        [
            rrset("www.example.", 3600, "CNAME", "a.example."),
            rrset("a.example.", 45, "CNAME", "b.example."),
            rrset("b.example.", 300, "A", "169.254.1.7"),
        ],
    )
    assert cacheable
    assert ttl_s(entry) == 45


def test_positive_ttl_clamped_to_max() -> None:
    policy = CachePolicy(max_ttl_s=100)
    entry, cacheable = build(
        policy,
        "www.example.",
        "A",
        [rrset("www.example.", 86400, "A", "169.254.1.1")],
        additional=[rrset("x.example.", 30, "A", "169.254.1.2")],
    )
    assert cacheable
    assert ttl_s(entry) == 100
    msg = seen_by_client(entry, "www.example.", "A", NOW)
    assert msg.answer[0].ttl == 100  # the client is never told more than we keep it
    assert msg.additional[0].ttl == 30
    assert seen_by_client(entry, "www.example.", "A", NOW + 40).answer[0].ttl == 60


def test_positive_ttl_clamped_to_min() -> None:
    policy = CachePolicy(min_ttl_s=60)
    entry, cacheable = build(
        policy, "www.example.", "A", [rrset("www.example.", 10, "A", "169.254.1.1")]
    )
    assert cacheable
    assert ttl_s(entry) == 60
    assert seen_by_client(entry, "www.example.", "A", NOW).answer[0].ttl == 60


@pytest.mark.parametrize("policy", [CachePolicy(), CachePolicy(min_ttl_s=60)], ids=str)
def test_ttl_zero_answer_not_cacheable(policy: CachePolicy) -> None:
    _, cacheable = build(
        policy, "www.example.", "A", [rrset("www.example.", 0, "A", "169.254.1.1")]
    )
    assert not cacheable


def test_ttl_zero_in_authority_not_cacheable() -> None:
    _, cacheable = build(
        CachePolicy(),
        "www.example.",
        "A",
        [rrset("www.example.", 300, "A", "169.254.1.1")],
        [rrset("example.", 0, "NS", "ns1.example.")],
    )
    assert not cacheable


def test_top_bit_ttl_is_zero_for_client_and_not_cached() -> None:
    data = bytearray(
        upstream_reply("www.example.", "A", [rrset("www.example.", 300, "A", "169.254.1.1")])
    )
    ttl_at = data.index(b"\x00\x00\x01\x2c\x00\x04")
    data[ttl_at : ttl_at + 4] = b"\x80\x00\x00\x00"
    entry, cacheable = make_entry(wire.inspect_response(bytes(data)), CachePolicy(), NOW)
    assert not cacheable
    assert seen_by_client(entry, "www.example.", "A", NOW).answer[0].ttl == 0


def test_soa_query_answer_is_positive() -> None:
    entry, cacheable = build(CachePolicy(), "example.", "SOA", [soa(600, 30)])
    assert cacheable
    assert entry.kind == cache.POSITIVE
    assert ttl_s(entry) == 600


def test_truncated_reply_not_cacheable() -> None:
    _, cacheable = build(
        CachePolicy(),
        "www.example.",
        "A",
        [rrset("www.example.", 300, "A", "169.254.1.1")],
        tc=True,
    )
    assert not cacheable


# --------------------------------------------------------------------------------------
# make_entry: negative answers (RFC 2308)


@pytest.mark.parametrize(
    ("soa_ttl", "minimum", "denial_max", "expected"),
    [
        (3600, 60, 1800, 60),  # SOA MINIMUM smaller
        (30, 600, 1800, 30),  # SOA TTL smaller
        (7200, 7200, 1800, 1800),  # capped
        (900, 900, 300, 300),
    ],
)
@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR], ids=["nx", "nodata"])
def test_negative_ttl(
    soa_ttl: int, minimum: int, denial_max: int, expected: int, rcode: int
) -> None:
    policy = CachePolicy(denial_max_ttl_s=denial_max)
    entry, cacheable = build(
        policy, "nope.example.", "A", authority=[soa(soa_ttl, minimum)], rcode=rcode
    )
    assert cacheable
    assert entry.kind == cache.NEGATIVE
    assert entry.rcode == rcode
    assert ttl_s(entry) == expected
    msg = seen_by_client(entry, "NoPe.example.", "A", NOW)
    assert msg.rcode() == rcode
    assert msg.answer == []
    assert msg.authority[0].rdtype == dns.rdatatype.SOA
    assert msg.authority[0].ttl == expected  # the SOA's TTL says how long to keep the denial
    later = seen_by_client(entry, "nope.example.", "A", NOW + 10)
    assert later.authority[0].ttl == expected - 10


def test_negative_with_cname_in_answer() -> None:
    entry, cacheable = build(
        CachePolicy(),
        "www.example.",
        "A",
        [rrset("www.example.", 600, "CNAME", "gone.example.")],
        [soa(900, 120)],
        rcode=dns.rcode.NXDOMAIN,
    )
    assert cacheable
    assert entry.kind == cache.NEGATIVE
    assert ttl_s(entry) == 120
    msg = seen_by_client(entry, "www.example.", "A", NOW)
    assert msg.answer[0].ttl <= 120


@pytest.mark.parametrize("rcode", [dns.rcode.NXDOMAIN, dns.rcode.NOERROR], ids=["nx", "nodata"])
def test_negative_without_soa_not_cacheable(rcode: int) -> None:
    _, cacheable = build(
        CachePolicy(),
        "nope.example.",
        "A",
        authority=[rrset("example.", 300, "NS", "ns1.example.")],
        rcode=rcode,
    )
    assert not cacheable


def test_negative_soa_ttl_zero_not_cacheable() -> None:
    _, cacheable = build(
        CachePolicy(min_ttl_s=30), "nope.example.", "A", authority=[soa(0, 300)], rcode=3
    )
    assert not cacheable


def test_truncated_negative_not_cacheable() -> None:
    _, cacheable = build(
        CachePolicy(), "nope.example.", "A", authority=[soa(300, 300)], rcode=3, tc=True
    )
    assert not cacheable


# --------------------------------------------------------------------------------------
# make_entry: errors


def test_servfail_cached_for_servfail_ttl() -> None:
    entry, cacheable = build(
        CachePolicy(servfail_ttl_s=5), "www.example.", "A", rcode=dns.rcode.SERVFAIL
    )
    assert cacheable
    assert entry.kind == cache.SERVFAIL
    assert ttl_s(entry) == 5
    assert seen_by_client(entry, "www.example.", "A", NOW + 1).rcode() == dns.rcode.SERVFAIL


def test_servfail_not_cached_when_disabled() -> None:
    entry, cacheable = build(
        CachePolicy(servfail_ttl_s=0), "www.example.", "A", rcode=dns.rcode.SERVFAIL
    )
    assert not cacheable
    assert seen_by_client(entry, "www.example.", "A", NOW).rcode() == dns.rcode.SERVFAIL


@pytest.mark.parametrize("rcode", [dns.rcode.REFUSED, dns.rcode.NOTIMP, dns.rcode.FORMERR])
def test_other_errors_not_cacheable(rcode: int) -> None:
    entry, cacheable = build(CachePolicy(), "www.example.", "A", rcode=rcode)
    assert not cacheable
    msg = seen_by_client(entry, "www.example.", "A", NOW)
    assert msg.rcode() == rcode
    assert msg.id == CLIENT_ID


# --------------------------------------------------------------------------------------
# Cache


def test_get_respects_expiry() -> None:
    c = Cache(10)
    entry, _ = build(
        CachePolicy(), "www.example.", "A", [rrset("www.example.", 300, "A", "169.254.1.1")]
    )
    key = key_of("www.example.")
    assert c.put(key, entry, NOW)
    assert c.get(key, NOW) is entry
    assert c.get(key_of("WWW.EXAMPLE."), NOW + 299.9) is entry  # case-insensitive key
    assert c.get(key, NOW + 300) is None
    assert c.get(key, NOW + 10_000) is None
    assert c.get(key_of("www.example.", "AAAA"), NOW) is None


def test_lru_evicts_least_recently_used() -> None:
    c = Cache(3)
    keys = [key_of(f"n{i}.example.") for i in range(4)]
    for k in keys[:3]:
        assert c.put(k, plain_entry(cache.POSITIVE), NOW)
    assert c.get(keys[0], NOW) is not None  # n0 is now the most recently used
    c.put(keys[3], plain_entry(cache.POSITIVE), NOW)
    assert len(c) == 3
    assert c.evictions == 1
    assert c.get(keys[1], NOW) is None  # least recently used went first
    for k in (keys[0], keys[2], keys[3]):
        assert c.get(k, NOW) is not None
    assert c.by_kind == recount(c) == [3, 0, 0]


def test_replace_does_not_evict_or_double_count() -> None:
    c = Cache(2)
    k = key_of("a.example.")
    c.put(k, plain_entry(cache.POSITIVE), NOW)
    c.put(k, plain_entry(cache.POSITIVE), NOW)
    c.put(k, plain_entry(cache.NEGATIVE, rcode=0), NOW)
    assert len(c) == 1
    assert c.evictions == 0
    assert c.by_kind == recount(c) == [0, 1, 0]


def test_by_kind_through_replace_and_eviction() -> None:
    c = Cache(3)
    a, b, d, e = (key_of(f"{n}.example.") for n in "abde")
    c.put(a, plain_entry(cache.POSITIVE), NOW)
    c.put(b, plain_entry(cache.SERVFAIL), NOW)
    c.put(d, plain_entry(cache.NEGATIVE, rcode=0), NOW)
    assert c.by_kind == recount(c) == [1, 1, 1]
    c.put(b, plain_entry(cache.POSITIVE), NOW)  # replace SERVFAIL by an answer
    assert c.by_kind == recount(c) == [2, 1, 0]
    c.put(e, plain_entry(cache.SERVFAIL), NOW)  # evicts a (least recently used)
    assert c.evictions == 1
    assert c.get(a, NOW) is None
    assert c.by_kind == recount(c) == [1, 1, 1]
    c.clear()
    assert len(c) == 0
    assert c.by_kind == [0, 0, 0]


def test_servfail_does_not_replace_live_answer() -> None:
    c = Cache(10)
    k = key_of("www.example.")
    good = plain_entry(cache.POSITIVE, ttl=300)
    assert c.put(k, good, NOW)
    assert not c.put(k, plain_entry(cache.SERVFAIL, ttl=5, now=NOW + 10), NOW + 10)
    assert c.get(k, NOW + 10) is good
    assert c.by_kind == recount(c) == [1, 0, 0]


def test_servfail_does_not_replace_live_denial() -> None:
    c = Cache(10)
    k = key_of("www.example.")
    denial = plain_entry(cache.NEGATIVE, ttl=300, rcode=0)
    assert c.put(k, denial, NOW)
    assert not c.put(k, plain_entry(cache.SERVFAIL, ttl=5), NOW + 1)
    assert c.get(k, NOW + 1) is denial


def test_servfail_replaces_expired_answer() -> None:
    c = Cache(10)
    k = key_of("www.example.")
    assert c.put(k, plain_entry(cache.POSITIVE, ttl=300), NOW)
    later = NOW + 301
    sf = plain_entry(cache.SERVFAIL, ttl=5, now=later)
    assert c.put(k, sf, later)
    assert c.get(k, later) is sf
    assert c.get(k, later + 5) is None
    assert c.by_kind == recount(c) == [0, 0, 1]


def test_answer_replaces_servfail() -> None:
    c = Cache(10)
    k = key_of("www.example.")
    c.put(k, plain_entry(cache.SERVFAIL, ttl=5), NOW)
    good = plain_entry(cache.POSITIVE, ttl=300, now=NOW + 1)
    assert c.put(k, good, NOW + 1)
    assert c.get(k, NOW + 1) is good


def test_nxdomain_answers_every_type_of_the_name() -> None:
    c = Cache(10)
    entry, cacheable = build(
        CachePolicy(),
        "nope.example.",
        "A",
        authority=[soa(900, 60)],
        rcode=dns.rcode.NXDOMAIN,
    )
    assert cacheable
    assert c.put(key_of("nope.example.", "A"), entry, NOW)

    aaaa = key_of("NoPe.Example.", "AAAA")
    assert c.get(aaaa, NOW) is None  # no entry for the AAAA question itself
    nx = c.get_nxdomain(aaaa, NOW)
    assert nx is entry
    assert c.get_nxdomain(key_of("nope.example.", "MX"), NOW) is entry
    assert c.get_nxdomain(key_of("other.example.", "AAAA"), NOW) is None
    assert c.get_nxdomain(key_of("sub.nope.example.", "AAAA"), NOW) is None
    assert c.get_nxdomain(aaaa, NOW + 60) is None  # expires with the denial

    # What the AAAA client receives: its own question, NXDOMAIN, the SOA.
    msg = seen_by_client(nx, "NoPe.Example.", "AAAA", NOW + 5, edns=True)
    assert msg.id == CLIENT_ID
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.question[0].name.to_text() == "NoPe.Example."
    assert msg.question[0].rdtype == dns.rdatatype.AAAA
    assert msg.authority[0].rdtype == dns.rdatatype.SOA
    assert msg.authority[0].ttl == 55
    assert c.by_kind == recount(c)


def test_nodata_does_not_answer_other_types() -> None:
    c = Cache(10)
    entry, cacheable = build(CachePolicy(), "www.example.", "AAAA", authority=[soa(900, 60)])
    assert cacheable
    c.put(key_of("www.example.", "AAAA"), entry, NOW)
    assert c.get(key_of("www.example.", "AAAA"), NOW) is entry
    assert c.get_nxdomain(key_of("www.example.", "A"), NOW) is None


def test_positive_answer_does_not_answer_nxdomain_lookup() -> None:
    c = Cache(10)
    c.put(key_of("www.example."), plain_entry(cache.POSITIVE), NOW)
    assert c.get_nxdomain(key_of("www.example.", "AAAA"), NOW) is None


# --------------------------------------------------------------------------------------
# by_kind under arbitrary operation sequences

OPS = st.lists(
    st.tuples(
        st.sampled_from(("put", "get", "get_nx")),
        st.integers(0, 5),  # name
        st.sampled_from(("A", "AAAA")),
        st.sampled_from(
            ((cache.POSITIVE, 0), (cache.NEGATIVE, 3), (cache.NEGATIVE, 0), (cache.SERVFAIL, 2))
        ),
        st.integers(0, 3),  # ttl
        st.integers(0, 2),  # clock step
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(max_entries=st.integers(1, 6), ops=OPS)
def test_by_kind_matches_store(
    max_entries: int, ops: list[tuple[str, int, str, tuple[int, int], int, int]]
) -> None:
    c = Cache(max_entries)
    now = NOW
    for op, name, rdtype, (kind, rcode), ttl, step in ops:
        now += step
        key = key_of(f"n{name}.example.", rdtype)
        if op == "put":
            c.put(key, plain_entry(kind, ttl=ttl, now=now, rcode=rcode), now)
        elif op == "get":
            got = c.get(key, now)
            assert got is None or got.expires_at > now
        else:
            got = c.get_nxdomain(key, now)
            assert got is None or got.rcode == wire.NXDOMAIN
        assert len(c) <= max_entries
        assert c.by_kind == recount(c)
        assert all(n >= 0 for n in c.by_kind)


def test_nodata_behind_cname_uses_negative_ttl() -> None:
    # RFC 2308 §2.2/§5: a NOERROR reply whose answer is only a CNAME chain and whose
    # authority holds the target zone's SOA is a NODATA for the target; the denial may
    # be kept for min(SOA TTL, SOA MINIMUM) = 60 s, not for the SOA record's own TTL.
    entry, cacheable = build(
        CachePolicy(),
        "www.example.",
        "AAAA",
        [rrset("www.example.", 3600, "CNAME", "host.example.")],
        [soa(3600, 60)],
    )
    assert cacheable
    assert ttl_s(entry) == 60
    msg = seen_by_client(entry, "www.example.", "AAAA", NOW)
    assert msg.authority[0].ttl <= 60


# --------------------------------------------------------------------------------------
# Entry.answer: per-client splicing of a shared entry


def test_answer_is_per_client_within_the_same_second() -> None:
    entry, _ = build(
        CachePolicy(), "www.example.", "A", [rrset("www.example.", 300, "A", "169.254.1.1")]
    )

    def ask(name: str, qid: int, edns: bool, do: bool, now: float) -> dns.message.Message:
        q = dns.message.make_query(
            name, "A", use_edns=0 if edns else False, want_dnssec=do, id=qid
        ).to_wire()
        _, qend, e = wire.parse_query(q)
        return dns.message.from_wire(entry.answer(q, qend, e, now, 0, wire.DEFAULT_OPTS))

    first = ask("www.example.", 1, False, False, NOW + 5.0)
    second = ask("WwW.eXaMpLe.", 2, True, True, NOW + 5.5)
    third = ask("WWW.EXAMPLE.", 3, True, False, NOW + 5.9)
    fourth = ask("www.example.", 4, False, False, NOW + 6.0)
    assert [m.id for m in (first, second, third, fourth)] == [1, 2, 3, 4]
    assert second.question[0].name.to_text() == "WwW.eXaMpLe."
    assert third.question[0].name.to_text() == "WWW.EXAMPLE."
    assert (first.edns, second.edns, third.edns, fourth.edns) == (-1, 0, 0, -1)
    assert second.ednsflags & dns.flags.DO
    assert not third.ednsflags & dns.flags.DO
    assert [m.answer[0].ttl for m in (first, second, third, fourth)] == [295, 295, 295, 294]


def test_answer_truncates_for_small_udp_limit() -> None:
    addrs = [f"169.254.3.{i}" for i in range(1, 61)]
    entry, cacheable = build(
        CachePolicy(), "big.example.", "A", [rrset("big.example.", 300, "A", *addrs)]
    )
    assert cacheable
    q = client_query("BIG.example.")
    _, qend, e = wire.parse_query(q)
    small = dns.message.from_wire(entry.answer(q, qend, e, NOW, 512, wire.DEFAULT_OPTS))
    assert small.flags & dns.flags.TC
    # Header 12 + question 17, then 16 bytes per A record: 30 whole records fit in 512.
    assert len(small.answer[0]) == 30
    assert small.question[0].name.to_text() == "BIG.example."
    full = dns.message.from_wire(entry.answer(q, qend, e, NOW, 0, wire.DEFAULT_OPTS))
    assert not full.flags & dns.flags.TC
    assert len(full.answer[0]) == 60
    assert list(small.answer[0]) == list(full.answer[0])[:30]


def test_truncated_answers_reuse_the_cut_per_size() -> None:
    # The cut depends on the entry and the client's size only: later clients (other IDs,
    # spellings, DO, ages) get the same records as a cut worked out afresh for them.
    addrs = [f"169.254.3.{i}" for i in range(1, 61)]
    entry, _ = build(CachePolicy(), "big.example.", "A", [rrset("big.example.", 300, "A", *addrs)])
    asked = []
    for i, (name, payload, do) in enumerate(
        [("big.example.", 0, False), ("BIG.example.", 0, False), ("bIg.ExAmPlE.", 512, True)] * 2
        + [("big.example.", 700, False), ("big.example.", 512, False)]
    ):
        q = dns.message.make_query(
            name, "A", use_edns=0 if payload else False, payload=payload, want_dnssec=do, id=i
        ).to_wire()
        _, qend, e = wire.parse_query(q)
        limit = wire.udp_limit(e, 1232)
        now = NOW + i * 0.7
        got = entry.answer(q, qend, e, now, limit, wire.DEFAULT_OPTS)
        fresh = wire.render(
            entry.body,
            entry.offsets,
            entry.ttls,
            int(now - NOW),
            q,
            qend,
            e,
            limit,
            wire.DEFAULT_OPTS,
        )
        assert got == fresh
        msg = dns.message.from_wire(got)
        assert msg.id == i and msg.question[0].name.to_text() == name
        asked.append(len(msg.answer[0]))
    # 12 + 17 bytes of header and question, 16 per record, 11 for our OPT.
    assert asked == [30, 30, 29, 30, 30, 29, 41, 29]
    assert entry.cuts is not None and sorted(entry.cuts) == [501, 512, 689]


def test_cuts_kept_per_entry_are_bounded() -> None:
    addrs = [f"169.254.3.{i}" for i in range(1, 71)]
    entry, _ = build(CachePolicy(), "big.example.", "A", [rrset("big.example.", 300, "A", *addrs)])
    for payload in range(600, 1200, 20):  # 30 different client sizes
        q = dns.message.make_query("big.example.", "A", use_edns=0, payload=payload).to_wire()
        _, qend, e = wire.parse_query(q)
        msg = dns.message.from_wire(entry.answer(q, qend, e, NOW, payload, wire.DEFAULT_OPTS))
        assert len(msg.answer[0]) == min(70, (payload - 40) // 16)
    assert entry.cuts is not None and len(entry.cuts) == 8
