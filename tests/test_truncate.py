"""UDP replies that do not fit the client's size: :func:`dnsproxy.wire.truncate`.

A truncated reply keeps the header and question, then the longest prefix of the records
in wire order that fits beside our OPT record (kept when the client sent one): whole
records only, never a CNAME/DNAME chain cut short, never additional records once an
authority record is gone. TC is set when an answer or authority record is left out.

Every reply is read back with dnspython, one record per RRset so that the wire order
shows; the expected record counts are worked out from record sizes in the comments. They
are also what CoreDNS (``dns.Msg.Truncate``, whole records in order) keeps for these
answers, since each owner name here is already a two-byte compression pointer.
"""

from __future__ import annotations

import itertools
import struct

import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest
from dnsmsg import rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_wire import qwire, response

from dnsproxy import wire

MAX_UDP = 1232
SOA = "ns1.example. hostmaster.example. 2024010101 3600 600 86400 60"


def client(name: str, rdtype: str = "A", payload: int | None = None, do: bool = False) -> bytes:
    """A client's query: no EDNS when ``payload`` is None, else EDNS with that size."""
    if payload is None:
        return qwire(name, rdtype)
    return qwire(name, rdtype, edns=True, payload=payload, do=do)


def to_wire(msg: dns.message.Message) -> bytes:
    """``msg`` as an upstream sends it. Once per test: dnspython shuffles the records of
    each RRset on every to_wire, and a cut is compared with the whole of the same bytes."""
    return msg.to_wire(max_size=65535)


def render(
    upstream: bytes, query: bytes, max_udp: int = MAX_UDP, limit: int | None = None
) -> tuple[bytes, bytes, int]:
    """(the whole reply, the reply as sent over UDP, the UDP limit) for ``query``."""
    info = wire.inspect_response(upstream)
    _, qend, edns = wire.parse_query(query)
    if limit is None:
        limit = wire.udp_limit(edns, max_udp)
    opts = wire.client_opts(max_udp)
    args = (info.body, info.ttl_offsets, info.ttls, 0, query, qend, edns)
    return wire.render(*args, 0, opts), wire.render(*args, limit, opts), limit


def records(data: bytes) -> dict[str, list[str]]:
    """Each section's records as text, one per record, in wire order (OPT left out)."""
    msg = dns.message.from_wire(data, one_rr_per_rrset=True)
    return {
        "answer": [rr.to_text() for rr in msg.answer],
        "authority": [rr.to_text() for rr in msg.authority],
        "additional": [rr.to_text() for rr in msg.additional],
    }


def tc(data: bytes) -> bool:
    return bool(dns.message.from_wire(data).flags & dns.flags.TC)


def forty() -> dns.message.Message:
    addrs = [f"169.254.3.{i}" for i in range(1, 41)]
    return response("forty.example.", "A", [rrset("forty.example.", 300, "A", *addrs)])


def big_txt() -> dns.message.Message:
    # 16 records of one 255-character string each: RDATA 256 bytes, 268 per record with
    # the owner pointer and fixed fields; 4,317 bytes in all.
    strings = [f'"{i:02d}{"x" * 253}"' for i in range(16)]
    return response("txt.example.", "TXT", [rrset("txt.example.", 300, "TXT", *strings)])


ANSWERS = {"forty": forty, "txt": big_txt}

# (answer, client's EDNS size or None, limits.udp_payload_size, records kept)
# forty.example. A: header 12 + question 19 = 31 bytes, 16 per A record, 11 for our OPT.
#   no EDNS: 31 + 16k <= 512 -> 30.  EDNS 512: 31 + 16k + 11 <= 512 -> 29.
#   EDNS 1232 (and 4096, capped at our 1232): 31 + 640 + 11 = 682 fits -> all 40.
# txt.example. TXT: header 12 + question 17 = 29 bytes, 268 per record.
#   no EDNS and EDNS 512: one record (29 + 536 > 512).  1232: 29 + 11 + 268k <= 1232 -> 4;
#   a client offering 4096 gets our 1232 -> 4; with our limit raised to 4096 -> 15 of 16.
SIZES = [
    ("forty", None, MAX_UDP, 30),
    ("forty", 512, MAX_UDP, 29),
    ("forty", 1232, MAX_UDP, 40),
    ("forty", 4096, MAX_UDP, 40),
    ("txt", None, MAX_UDP, 1),
    ("txt", 512, MAX_UDP, 1),
    ("txt", 1232, MAX_UDP, 4),
    ("txt", 4096, MAX_UDP, 4),
    ("txt", 4096, 4096, 15),
]


@pytest.mark.parametrize("do", [False, True], ids=["plain", "do"])
@pytest.mark.parametrize(("answer", "payload", "max_udp", "kept"), SIZES, ids=str)
def test_keeps_the_whole_records_that_fit(
    answer: str, payload: int | None, max_udp: int, kept: int, do: bool
) -> None:
    upstream = ANSWERS[answer]()
    name = upstream.question[0].name.to_text()
    rdtype = dns.rdatatype.to_text(upstream.question[0].rdtype)
    query = client(name.upper(), rdtype, payload, do=do and payload is not None)
    full, sent, limit = render(to_wire(upstream), query, max_udp)

    assert limit == (512 if payload is None else min(payload, max_udp))
    assert len(sent) <= limit
    msg = dns.message.from_wire(sent)
    whole = records(full)["answer"]
    got = records(sent)["answer"]
    assert len(got) == kept
    assert got == whole[:kept]
    assert bool(msg.flags & dns.flags.TC) == (kept < len(whole))
    assert msg.question[0].name.to_text() == name.upper()
    assert msg.id == dns.message.from_wire(query).id
    if payload is None:
        assert msg.edns == -1
    else:
        assert msg.edns == 0
        assert msg.payload == max_udp  # what we advertise, whatever the client offered
        assert bool(msg.ednsflags & dns.flags.DO) == do


def test_a_single_record_longer_than_the_limit_leaves_no_answer() -> None:
    # One TXT record of twelve 250-character strings: about 3 KB, more than 1232.
    strings = " ".join(f'"{i:02d}{"y" * 248}"' for i in range(12))
    upstream = response("one.example.", "TXT", [rrset("one.example.", 300, "TXT", strings)])
    upstream_wire = to_wire(upstream)
    full, sent, _ = render(upstream_wire, client("one.example.", "TXT", 1232))
    assert len(full) > 3000
    msg = dns.message.from_wire(sent)
    assert msg.flags & dns.flags.TC
    assert msg.answer == msg.authority == msg.additional == []
    assert msg.edns == 0
    assert struct.unpack_from(">HHH", sent, 6) == (0, 0, 1)  # only our OPT


def test_a_cname_chain_is_kept_ahead_of_the_addresses_that_fit() -> None:
    # www CNAME a, a CNAME b (16 bytes each, the names compressed), then 40 A records of b.
    # 29 + 2 * 16 + 16k <= 512 -> the chain and 28 addresses.
    addrs = [f"169.254.3.{i}" for i in range(1, 41)]
    upstream = response(
        "www.example.",
        "A",
        [
            rrset("www.example.", 300, "CNAME", "a.example."),
            rrset("a.example.", 300, "CNAME", "b.example."),
            rrset("b.example.", 300, "A", *addrs),
        ],
    )
    upstream_wire = to_wire(upstream)
    full, sent, _ = render(upstream_wire, client("www.example."))
    got = records(sent)["answer"]
    assert tc(sent)
    assert got == records(full)["answer"][:30]
    assert [r.split()[3] for r in got[:2]] == ["CNAME", "CNAME"]
    assert len(got) == 2 + 28


def _long_chain(count: int) -> list[dns.rrset.RRset]:
    names = ["www.example."] + [f"{'c' * 60}{i}.example." for i in range(count)]
    chain = [rrset(a, 300, "CNAME", b) for a, b in itertools.pairwise(names)]
    return [*chain, rrset(names[-1], 300, "A", "169.254.3.1")]


def test_a_chain_that_does_not_fit_leaves_no_answer_rather_than_part_of_it() -> None:
    # Eight CNAMEs with 61-character first labels: about 600 bytes of chain. A prefix
    # that fits would hold some of the CNAMEs and none of the address: nothing is kept.
    upstream = response("www.example.", "A", _long_chain(8))
    upstream_wire = to_wire(upstream)
    full, sent, _ = render(upstream_wire, client("www.example."))
    assert len(records(full)["answer"]) == 9
    assert len(full) > 512
    assert tc(sent)
    assert records(sent)["answer"] == []


def test_a_chain_out_of_order_is_all_or_nothing() -> None:
    # The target's addresses come before the CNAME that leads to them: no prefix of
    # these records short of the whole is an answer.
    addrs = [f"169.254.3.{i}" for i in range(1, 41)]
    upstream = response(
        "www.example.",
        "A",
        [
            rrset("b.example.", 300, "A", *addrs),
            rrset("www.example.", 300, "CNAME", "b.example."),
        ],
    )
    upstream_wire = to_wire(upstream)
    full, sent, _ = render(upstream_wire, client("www.example."))
    assert records(full)["answer"][-1].split()[3] == "CNAME"
    assert tc(sent)
    assert records(sent)["answer"] == []
    # With room for all of it, it goes out whole.
    _, whole, _ = render(upstream_wire, client("www.example.", payload=1232))
    assert not tc(whole)
    assert records(whole)["answer"] == records(full)["answer"]


def test_negative_answer_behind_a_chain_keeps_the_chain_and_sets_tc() -> None:
    # NXDOMAIN at the end of a chain whose CNAMEs fit, with an SOA too long to follow.
    long_soa = f"{'m' * 60}.example. {'h' * 60}.example. 1 3600 600 86400 60"
    upstream = response(
        "www.example.",
        "A",
        _long_chain(5)[:-1],
        authority=[rrset("example.", 300, "SOA", long_soa)],
        rcode=dns.rcode.NXDOMAIN,
    )
    upstream_wire = to_wire(upstream)
    full, sent, _ = render(upstream_wire, client("www.example."))
    assert len(full) > 512
    msg = dns.message.from_wire(sent)
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.flags & dns.flags.TC  # the SOA is part of the answer (RFC 2308): retry
    assert records(sent) == {"answer": records(full)["answer"], "authority": [], "additional": []}


def test_negative_answer_keeps_its_soa_first() -> None:
    # A DNSSEC-style denial for a client with EDNS 512: the SOA and as many NSEC records
    # as fit, in order.
    nsecs = [
        rrset(f"{'n' * 50}{i}.example.", 300, "NSEC", f"{'n' * 50}{i + 1}.example. A RRSIG NSEC")
        for i in range(8)
    ]
    upstream = response(
        "nope.example.",
        "A",
        authority=[rrset("example.", 300, "SOA", SOA), *nsecs],
        rcode=dns.rcode.NXDOMAIN,
        do=True,
    )
    upstream_wire = to_wire(upstream)
    full, sent, _ = render(upstream_wire, client("nope.example.", payload=512, do=True))
    assert len(full) > 512
    whole = records(full)["authority"]
    got = records(sent)["authority"]
    assert tc(sent)
    assert got[0].split()[3] == "SOA"
    assert 1 < len(got) < len(whole)
    assert got == whole[: len(got)]
    assert len(sent) <= 512


def _referral_like() -> dns.message.Message:
    # An answer, four NS records in the authority section and their addresses in the
    # additional one, whose owner names dnspython compresses against the NS RDATA.
    ns_names = [f"{'s' * 40}{i}.example." for i in range(4)]
    return response(
        "www.example.",
        "A",
        [rrset("www.example.", 300, "A", *(f"169.254.3.{i}" for i in range(1, 21)))],
        authority=[rrset("example.", 300, "NS", *ns_names)],
        additional=[rrset(n, 300, "A", f"169.254.4.{i}") for i, n in enumerate(ns_names)],
    )


def _first_additional_owner_pointer(data: bytes) -> tuple[int, int]:
    """(offset of the first additional record, target of its owner's pointer)."""
    msg = dns.message.from_wire(data, one_rr_per_rrset=True)
    off = data.index(b"\x00", wire.HEADER_LEN) + 5  # after the question
    for _ in range(len(msg.answer) + len(msg.authority)):
        off = wire.name_end(data, off)
        off += 10 + struct.unpack_from(">H", data, off + 8)[0]
    assert data[off] >= 0xC0, "the first additional owner is a compression pointer"
    return off, struct.unpack_from(">H", data, off)[0] & 0x3FFF


def test_additional_records_are_never_kept_without_the_authority_they_point_into() -> None:
    upstream = _referral_like()
    upstream_wire = to_wire(upstream)
    full, _, _ = render(upstream_wire, client("www.example."), limit=0)
    additional_at, target = _first_additional_owner_pointer(full)
    authority_at = 29 + 20 * 16
    assert authority_at <= target < additional_at  # the fixture points into authority

    # Cutting the authority section away and keeping the additional one would leave
    # that pointer aimed at removed bytes: the cut keeps a prefix instead.
    half_authority = authority_at + 60
    full, sent, _ = render(upstream_wire, client("www.example."), limit=half_authority)
    got = records(sent)
    assert tc(sent)
    assert got["answer"] == records(full)["answer"]
    assert len(got["authority"]) < 4
    assert got["additional"] == []


def test_dropping_only_additional_records_leaves_tc_clear() -> None:
    upstream = _referral_like()
    upstream_wire = to_wire(upstream)
    full, _, _ = render(upstream_wire, client("www.example."), limit=0)
    additional_at, _ = _first_additional_owner_pointer(full)
    # Room for everything up to the first two of the four additional records.
    limit = additional_at + 2 * 16
    _, sent, _ = render(upstream_wire, client("www.example."), limit=limit)
    got, whole = records(sent), records(full)
    assert len(full) > limit
    assert not tc(sent)  # RFC 2181 §9: the answer is complete
    assert got["answer"] == whole["answer"]
    assert got["authority"] == whole["authority"]
    assert got["additional"] == whole["additional"][:2]  # owners resolve as in the whole


# --------------------------------------------------------------------------------------
# Hypothesis: any reply, any client size


@st.composite
def replies(draw: st.DrawFn) -> dns.message.Message:
    qname = "www.example."
    chain_len = draw(st.integers(0, 3))
    names = [qname] + [f"{'c' * draw(st.integers(1, 60))}{i}.example." for i in range(chain_len)]
    answer = [rrset(a, 300, "CNAME", b) for a, b in itertools.pairwise(names)]
    kind = draw(st.sampled_from(["A", "TXT", "nxdomain"]))
    authority: list[dns.rrset.RRset] = []
    additional: list[dns.rrset.RRset] = []
    rcode = dns.rcode.NOERROR
    if kind == "A":
        count = draw(st.integers(1, 80))
        answer.append(
            rrset(names[-1], 300, "A", *(f"169.254.{i // 250}.{i % 250}" for i in range(count)))
        )
    elif kind == "TXT":
        sizes = draw(st.lists(st.integers(1, 252), min_size=1, max_size=12))
        answer.append(
            rrset(names[-1], 300, "TXT", *(f'"{i:03d}{"t" * s}"' for i, s in enumerate(sizes)))
        )
    else:
        rcode = dns.rcode.NXDOMAIN
        authority.append(rrset("example.", 300, "SOA", SOA))
    ns_count = draw(st.integers(0, 6))
    if ns_count:
        ns_names = [f"{'s' * draw(st.integers(1, 50))}{i}.example." for i in range(ns_count)]
        authority.append(rrset("example.", 300, "NS", *ns_names))
        glue = draw(st.integers(0, ns_count))
        additional.extend(
            rrset(n, 300, "A", f"169.254.9.{i}") for i, n in enumerate(ns_names[:glue])
        )
    return response(qname, "A", answer, authority, additional, rcode=rcode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    upstream=replies(),
    payload=st.one_of(st.none(), st.integers(0, 65535)),
    max_udp=st.integers(512, 4096),
    do=st.booleans(),
)
def test_every_cut_reply_parses_fits_and_keeps_a_prefix(
    upstream: dns.message.Message, payload: int | None, max_udp: int, do: bool
) -> None:
    query = client("WwW.eXaMpLe.", "A", payload, do=do and payload is not None)
    full, sent, limit = render(to_wire(upstream), query, max_udp)
    if len(full) <= limit:
        assert sent == full
        return
    assert len(sent) <= limit
    msg = dns.message.from_wire(sent)  # parses: no pointer into removed bytes
    got, whole = records(sent), records(full)
    for section in got:
        assert got[section] == whole[section][: len(got[section])], section
    if got["authority"]:
        assert got["answer"] == whole["answer"]
    if got["additional"]:
        assert got["authority"] == whole["authority"]
    lost_required = len(got["answer"]) + len(got["authority"]) < len(whole["answer"]) + len(
        whole["authority"]
    )
    assert bool(msg.flags & dns.flags.TC) == lost_required
    chain = [r for r in whole["answer"] if r.split()[3] == "CNAME"]
    if got["answer"]:
        assert got["answer"][: len(chain)] == chain
    assert msg.rcode() == dns.message.from_wire(full).rcode()
    assert msg.question[0].name.to_text() == "WwW.eXaMpLe."
    assert (msg.edns == 0) == (payload is not None)
    if payload is not None:
        assert msg.payload == max_udp
        assert bool(msg.ednsflags & dns.flags.DO) == do
