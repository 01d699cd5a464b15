"""Sans-IO tests of ``dnsproxy.wire``.

Fixtures are built and results are read back with dnspython (and, where dnspython refuses
to build something malformed, with hand-written bytes), so no assertion depends only on
bytes our own code produced.
"""

from __future__ import annotations

import string
import struct
from collections.abc import Callable, Sequence

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.update
import pytest
from dnsmsg import reply_to, rrset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnsproxy import wire

CLIENT_ID = 0xBEEF
UPSTREAM_ID = 0x1111
DO = 1 << 16

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------
# Builders (dnspython for well-formed messages, struct for malformed ones)


def query(
    name: str,
    rdtype: str | int = "A",
    *,
    edns: bool = False,
    do: bool = False,
    cd: bool = False,
    payload: int = 1232,
    version: int = 0,
    options: Sequence[dns.edns.Option] = (),
    qid: int = CLIENT_ID,
    rd: bool = True,
) -> dns.message.QueryMessage:
    use_edns = edns or do or bool(options)
    q = dns.message.make_query(
        name,
        dns.rdatatype.RdataType.make(rdtype),
        use_edns=version if use_edns else False,
        want_dnssec=do,
        payload=payload if use_edns else None,
        options=list(options) if use_edns else None,
        id=qid,
        flags=dns.flags.RD if rd else 0,
    )
    if cd:
        q.flags |= dns.flags.CD
    return q


def qwire(name: str, rdtype: str | int = "A", **kw: object) -> bytes:
    return query(name, rdtype, **kw).to_wire()  # type: ignore[arg-type]


def raw_header(
    qid: int = CLIENT_ID,
    flags: int = 0x0100,
    qd: int = 1,
    an: int = 0,
    ns: int = 0,
    ar: int = 0,
) -> bytes:
    return struct.pack(">HHHHHH", qid, flags, qd, an, ns, ar)


def raw_name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


def raw_rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = 1) -> bytes:
    return owner + struct.pack(">HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def raw_opt(payload: int = 1232, ttl: int = 0, rdata: bytes = b"") -> bytes:
    return raw_rr(b"\x00", wire.TYPE_OPT, ttl, rdata, rclass=payload)


def pointer(offset: int) -> bytes:
    return bytes([0xC0 | (offset >> 8), offset & 0xFF])


# The question "www.example. A IN", uncompressed, as upstream replies built by hand carry it.
WWW_A_QUESTION = raw_name(b"www", b"example") + struct.pack(">HH", 1, 1)


def name_wire(name: str) -> bytes:
    """Uncompressed wire form of ``name``, case preserved (dnspython)."""
    data = dns.name.from_text(name).to_wire()
    assert data is not None
    return data


def response(
    qname: str,
    rdtype: str,
    answer: Sequence[dns.rrset.RRset] = (),
    authority: Sequence[dns.rrset.RRset] = (),
    additional: Sequence[dns.rrset.RRset] = (),
    *,
    rcode: int = dns.rcode.NOERROR,
    edns: bool = True,
    do: bool = False,
    aa: bool = False,
) -> dns.message.Message:
    """An upstream reply as dnspython would send it (ID UPSTREAM_ID, optional OPT)."""
    q = query(qname, rdtype, edns=edns, do=do, qid=UPSTREAM_ID)
    flags = dns.flags.AA if aa else 0
    r = reply_to(q, answer, authority, additional, rcode=rcode, flags=flags)
    if edns:
        r.use_edns(0, dns.flags.DO if do else 0, 4096)
    return r


SOA = "ns1.example. hostmaster.example. 2024010101 3600 600 86400 60"


def fixture_replies() -> dict[str, dns.message.Message]:
    return {
        "a_opt": response(
            "www.example.",
            "A",
            [rrset("www.example.", 300, "A", "169.254.2.1", "169.254.2.2")],
            do=True,
            aa=True,
        ),
        "cname_chain": response(
            "www.example.",
            "A",
            [
                rrset("www.example.", 3600, "CNAME", "a.example."),
                rrset("a.example.", 60, "CNAME", "b.example."),
                rrset("b.example.", 300, "A", "169.254.2.7"),
            ],
        ),
        "mx": response(
            "www.example.",
            "MX",
            [rrset("www.example.", 300, "MX", "10 mail.www.example.", "20 mx2.example.")],
            [rrset("example.", 7200, "NS", "ns1.example.")],
            [
                rrset("mail.www.example.", 120, "A", "169.254.2.25"),
                rrset("ns1.example.", 50, "AAAA", "2001:db8::53"),
            ],
        ),
        "txt": response(
            "www.example.",
            "TXT",
            [rrset("www.example.", 200, "TXT", '"v=spf1 -all"', '"hello" "world"')],
            edns=False,
        ),
        "srv": response(
            "_sip._tcp.example.",
            "SRV",
            [rrset("_sip._tcp.example.", 100, "SRV", "10 5 5060 sip.example.")],
            additional=[rrset("sip.example.", 80, "A", "169.254.2.60")],
        ),
        "nxdomain": response(
            "nope.example.",
            "A",
            authority=[rrset("example.", 900, "SOA", SOA)],
            rcode=dns.rcode.NXDOMAIN,
        ),
        "nodata": response(
            "www.example.",
            "AAAA",
            authority=[rrset("example.", 900, "SOA", SOA)],
        ),
    }


FIXTURES = fixture_replies()


def zero_x20(name: str) -> str:
    """A 0x20-style mixed-case spelling of ``name`` that differs from it."""
    return "".join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(name))


def parse(data: bytes) -> dns.message.Message:
    return dns.message.from_wire(data)


def arcount(data: bytes) -> int:
    return int(struct.unpack_from(">H", data, 10)[0])


def all_rrsets(msg: dns.message.Message) -> list[tuple[str, dns.rrset.RRset]]:
    return [
        (section, rr)
        for section, rrs in (
            ("answer", msg.answer),
            ("authority", msg.authority),
            ("additional", msg.additional),
        )
        for rr in rrs
    ]


def rejected(data: bytes) -> tuple[wire.BadQuery, dns.message.Message]:
    """What ``parse_query`` raises for ``data``, and the error reply built from it as
    dnspython reads it."""
    with pytest.raises(wire.BadQuery) as exc:
        wire.parse_query(data)
    err = exc.value
    assert err.rcode is not None
    return err, parse(wire.error_reply(data, err.rcode, err.qend, err.edns, 1232))


# --------------------------------------------------------------------------------------
# parse_query: keys


def test_key_is_case_insensitive_and_documented_layout() -> None:
    k1, qend1, _ = wire.parse_query(qwire("WwW.ExAmple."))
    k2, qend2, _ = wire.parse_query(qwire("www.example."))
    assert k1 == k2
    assert qend1 == qend2 == wire.HEADER_LEN + len(b"\x03www\x07example\x00") + 4
    expected = name_wire("www.example.") + struct.pack(">HH", 1, 1) + b"\x00"
    assert k1 == expected


@pytest.mark.parametrize(
    ("other", "what"),
    [
        ({"rdtype": "AAAA"}, "qtype"),
        ({"do": True}, "DO bit"),
        ({"cd": True}, "CD bit"),
        ({"name": "www.example.org."}, "name"),
    ],
)
def test_key_differs(other: dict[str, object], what: str) -> None:
    base = wire.parse_query(qwire("www.example.", "A", edns=True))[0]
    kw: dict[str, object] = {"rdtype": "A", "edns": True, **other}
    name = str(kw.pop("name", "www.example."))
    changed = wire.parse_query(qwire(name, **kw))[0]  # type: ignore[arg-type]
    assert changed != base, what


def test_key_same_with_and_without_edns_when_do_clear() -> None:
    # Only DO (and CD) matter, not whether an OPT is present.
    plain = wire.parse_query(qwire("www.example."))[0]
    with_opt = wire.parse_query(qwire("www.example.", edns=True, payload=4096))[0]
    assert plain == with_opt


def test_key_flags_round_trip() -> None:
    for do in (False, True):
        for cd in (False, True):
            key = wire.parse_query(qwire("x.example.", "TXT", do=do, cd=cd))[0]
            assert wire.key_flags(key) == (do, cd)
            assert wire.key_qtype(key) == dns.rdatatype.TXT
            assert wire.key_qname(key) == name_wire("x.example.")


def test_upstream_query_carries_the_clients_question_do_and_cd() -> None:
    # What goes upstream for a miss: the client's question bytes (0x20 case kept), RD,
    # CD as the client asked, and our OPT with DO as the client asked.
    for do in (False, True):
        for cd in (False, True):
            data = qwire("wWw.Example.", "AAAA", do=do, cd=cd)
            key, qend, _ = wire.parse_query(data)
            sent = dns.message.from_wire(wire.upstream_query(key, data[12:qend]))
            assert sent.id == 0
            assert str(sent.question[0].name) == "wWw.Example."
            assert sent.question[0].rdtype == dns.rdatatype.AAAA
            assert bool(sent.flags & dns.flags.RD)
            assert bool(sent.flags & dns.flags.CD) == cd
            assert sent.edns == 0 and sent.payload == 1232
            assert bool(sent.ednsflags & dns.flags.DO) == do


def test_additional_record_that_is_not_opt_does_not_set_do() -> None:
    # A query with ARCOUNT=1 whose record is not an OPT (e.g. a stray glue record or
    # TSIG) has no EDNS and no DO bit: it must share the plain query's cache entry,
    # else a non-DNSSEC client is answered from (and fills) the DO=1 entry.
    q = query("www.example.")
    q.additional.append(rrset("glue.example.", 300, "A", "169.254.2.1"))
    data = q.to_wire()
    assert arcount(data) == 1
    key, _, edns = wire.parse_query(data)
    assert edns == -1
    assert wire.key_flags(key) == (False, False)
    assert key == wire.parse_query(qwire("www.example."))[0]


# --------------------------------------------------------------------------------------
# parse_query: EDNS


def test_edns_absent_is_minus_one() -> None:
    assert wire.parse_query(qwire("www.example."))[2] == -1


@pytest.mark.parametrize(
    ("payload", "do", "expected"),
    [
        (1232, False, 1232),
        (4096, True, 4096 | DO),
        (100, False, 512),
        (100, True, 512 | DO),
        (512, False, 512),
        (65535, False, 65535),
    ],
)
def test_edns_payload_and_do(payload: int, do: bool, expected: int) -> None:
    assert wire.parse_query(qwire("www.example.", edns=True, do=do, payload=payload))[2] == expected


def test_edns_with_options_still_parsed() -> None:
    cookie = dns.edns.CookieOption(b"\x01" * 8, b"")
    data = qwire("www.example.", do=True, payload=1400, options=[cookie])
    assert wire.parse_query(data)[2] == 1400 | DO


def test_two_opt_records_formerr() -> None:
    data = bytearray(qwire("www.example.", edns=True))
    data += raw_opt()
    data[10:12] = struct.pack(">H", 2)
    with pytest.raises(wire.BadQuery) as exc:
        wire.parse_query(bytes(data))
    assert exc.value.rcode == wire.FORMERR


def test_edns_version_1_badvers() -> None:
    data = qwire("www.example.", edns=True, version=1, payload=2048)
    err, reply = rejected(data)
    assert err.rcode == wire.BADVERS == dns.rcode.BADVERS
    assert err.qend == len(data) - 11
    assert err.edns == 2048
    assert reply.id == CLIENT_ID
    assert reply.rcode() == dns.rcode.BADVERS
    assert reply.edns == 0
    assert reply.flags & dns.flags.QR
    assert reply.question[0].name == dns.name.from_text("www.example.")


# --------------------------------------------------------------------------------------
# parse_query: rejected queries and their error replies


def test_qr_set_is_dropped() -> None:
    data = response("www.example.", "A", [rrset("www.example.", 1, "A", "169.254.2.1")]).to_wire()
    with pytest.raises(wire.BadQuery) as exc:
        wire.parse_query(data)
    assert exc.value.rcode is None


def test_short_packet_dropped() -> None:
    with pytest.raises(wire.BadQuery) as exc:
        wire.parse_query(b"\x12\x34\x01\x00")
    assert exc.value.rcode is None


def test_qdcount_zero_formerr() -> None:
    data = raw_header(qd=0)
    err, reply = rejected(data)
    assert err.rcode == wire.FORMERR
    assert reply.id == CLIENT_ID
    assert reply.rcode() == dns.rcode.FORMERR
    assert reply.question == []


def test_qdcount_two_formerr() -> None:
    q = query("www.example.")
    q.question.append(
        dns.rrset.RRset(dns.name.from_text("b.example."), dns.rdataclass.IN, dns.rdatatype.AAAA)
    )
    data = q.to_wire()
    assert struct.unpack_from(">H", data, 4)[0] == 2
    err, reply = rejected(data)
    assert err.rcode == wire.FORMERR
    assert reply.id == CLIENT_ID
    assert reply.rcode() == dns.rcode.FORMERR
    assert reply.flags & dns.flags.QR


def test_opcode_notify_notimp() -> None:
    q = query("example.", "SOA")
    q.set_opcode(dns.opcode.NOTIFY)
    data = q.to_wire()
    err, reply = rejected(data)
    assert err.rcode == wire.NOTIMP
    assert reply.id == CLIENT_ID
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.opcode() == dns.opcode.NOTIFY
    assert reply.question[0].name == dns.name.from_text("example.")
    assert reply.question[0].rdtype == dns.rdatatype.SOA


def test_opcode_update_notimp() -> None:
    u = dns.update.UpdateMessage("example.", id=CLIENT_ID)
    u.add("www", 300, "A", "169.254.2.1")
    data = u.to_wire()
    err, reply = rejected(data)
    assert err.rcode == wire.NOTIMP
    assert reply.id == CLIENT_ID
    assert reply.rcode() == dns.rcode.NOTIMP
    assert reply.opcode() == dns.opcode.UPDATE


@pytest.mark.parametrize("rcode", [wire.SERVFAIL, wire.REFUSED, wire.FORMERR, wire.NOTIMP])
@pytest.mark.parametrize("edns", [False, True])
def test_error_reply_echoes_question_and_id(rcode: int, edns: bool) -> None:
    data = qwire("WwW.ExAmple.", "AAAA", edns=edns, do=edns, cd=True)
    _, qend, e = wire.parse_query(data)
    reply = parse(wire.error_reply(data, rcode, qend, e, 1232))
    assert reply.id == CLIENT_ID
    assert reply.rcode() == rcode
    assert reply.flags & dns.flags.QR
    assert reply.flags & dns.flags.RD
    assert reply.flags & dns.flags.CD
    assert reply.question[0].name.to_text() == "WwW.ExAmple."
    assert reply.question[0].rdtype == dns.rdatatype.AAAA
    assert reply.answer == reply.authority == reply.additional == []
    if edns:
        assert reply.edns == 0
        assert reply.payload == 1232
        assert reply.ednsflags & dns.flags.DO
    else:
        assert reply.edns == -1


# Meta-types (RFC 6895 §3.1) that Unbound 1.17 answers with FORMERR rather than look up.
META_QTYPES = [41, 128, 200, 248, 249, 250, 253, 254]


@pytest.mark.parametrize("qtype", META_QTYPES)
def test_meta_qtypes_are_answered_formerr_not_forwarded(qtype: int) -> None:
    key, _, _ = wire.parse_query(qwire("www.example.", qtype))  # a well-formed query
    assert wire.NOT_FORWARDED[wire.key_qtype(key)] == (wire.FORMERR, "meta_qtype")


@pytest.mark.parametrize("qtype", ["AXFR", "IXFR"])
def test_zone_transfers_are_refused_not_forwarded(qtype: str) -> None:
    key, _, _ = wire.parse_query(qwire("example.", qtype))
    assert wire.NOT_FORWARDED[wire.key_qtype(key)] == (wire.REFUSED, None)


@pytest.mark.parametrize("qtype", ["ANY", "A", "TXT", 127, 255, 256, 65280])
def test_data_types_are_forwarded(qtype: str | int) -> None:
    key, _, _ = wire.parse_query(qwire("www.example.", qtype))
    assert wire.key_qtype(key) not in wire.NOT_FORWARDED


@pytest.mark.parametrize(
    ("rcode", "ra"),
    [
        (wire.FORMERR, False),
        (wire.NOTIMP, False),
        (wire.REFUSED, False),
        (wire.BADVERS, True),
    ],
)
def test_error_replies_set_ra_only_with_badvers(rcode: int, ra: bool) -> None:
    # As Unbound 1.17 answers (tests/test_real.py compares the two).
    data = qwire("www.example.", edns=True)
    _, qend, edns = wire.parse_query(data)
    reply = parse(wire.error_reply(data, rcode, qend, edns, 1232))
    assert bool(reply.flags & dns.flags.RA) == ra
    assert reply.rcode() == rcode


@pytest.mark.parametrize("size", [512, 1400, 4096])
def test_error_reply_advertises_the_size_given(size: int) -> None:
    data = qwire("www.example.", edns=True)
    _, qend, edns = wire.parse_query(data)
    assert parse(wire.error_reply(data, wire.REFUSED, qend, edns, size)).payload == size


@pytest.mark.parametrize("size", [512, 1400, 4096])
def test_rendered_reply_advertises_the_servers_size(size: int) -> None:
    _, out = _render(
        _big_answer(), qwire("big.example.", edns=True, payload=65000), 0, 0, wire.client_opts(size)
    )
    assert parse(out).payload == size


def test_upstream_query_advertises_1232_whatever_the_client_side_size() -> None:
    key, qend, _ = wire.parse_query(qwire("www.example.", do=True))
    data = qwire("www.example.")
    sent = parse(wire.upstream_query(key, data[wire.HEADER_LEN : qend]))
    assert sent.payload == wire.UPSTREAM_UDP_PAYLOAD == 1232
    assert sent.ednsflags & dns.flags.DO


def _with_authority_record(data: bytes) -> bytes:
    """``data`` (a one-question query without records) plus an authority record, so the
    non-fast path of the parser is exercised."""
    buf = bytearray(data) + raw_rr(b"\x00", 1, 0, b"\x00\x00\x00\x00")
    buf[8:10] = b"\x00\x01"
    return bytes(buf)


BAD_QUESTIONS = {
    "label_64": raw_name(b"a" * 64),
    "label_type_01": b"\x41" + b"a" * 65 + b"\x00",
    "name_256": raw_name(*([b"a" * 63] * 3), b"b" * 62),
    "name_321": raw_name(*([b"a" * 63] * 5)),
    "pointer_only": pointer(12),
    "pointer_after_label": b"\x03www" + pointer(12),
}


@pytest.mark.parametrize("fast", [True, False], ids=["plain", "with_authority"])
@pytest.mark.parametrize("name", list(BAD_QUESTIONS), ids=list(BAD_QUESTIONS))
def test_bad_question_name_formerr(name: str, fast: bool) -> None:
    data = raw_header() + BAD_QUESTIONS[name] + struct.pack(">HH", 1, 1)
    if not fast:
        data = _with_authority_record(data)
    with pytest.raises(wire.BadQuery) as exc:
        wire.parse_query(data)
    assert exc.value.rcode == wire.FORMERR


def test_bad_question_sizes_are_what_they_claim() -> None:
    assert len(BAD_QUESTIONS["name_256"]) == 256
    assert len(raw_name(*([b"a" * 63] * 3), b"b" * 61)) == 255


def test_name_of_255_octets_accepted() -> None:
    name = ".".join(["a" * 63] * 3 + ["b" * 61]) + "."
    assert len(name_wire(name)) == 255
    for data in (qwire(name), _with_authority_record(qwire(name))):
        key, qend, _ = wire.parse_query(data)
        assert qend == wire.HEADER_LEN + 255 + 4
        assert key[:-5] == name_wire(name)


QUERY_SAMPLES = {
    "plain": qwire("www.example."),
    "edns_do_cookie": qwire(
        "WwW.ExAmple.", "AAAA", do=True, options=[dns.edns.CookieOption(b"\x02" * 8, b"")]
    ),
    "cd_txt": qwire("_dmarc.example.", "TXT", cd=True, edns=True),
    "with_authority": _with_authority_record(qwire("www.example.")),
}


@pytest.mark.parametrize("sample", list(QUERY_SAMPLES))
def test_every_prefix_of_a_real_query_is_rejected_cleanly(sample: str) -> None:
    data = QUERY_SAMPLES[sample]
    wire.parse_query(data)  # the whole query is fine
    for i in range(len(data)):
        with pytest.raises(wire.BadQuery) as exc:
            wire.parse_query(data[:i])
        # Too short for a header: silence; anything longer gets FORMERR.
        assert exc.value.rcode == (None if i < wire.HEADER_LEN else wire.FORMERR), i


# --------------------------------------------------------------------------------------
# inspect_response + render


def _render(
    upstream: bytes,
    client: bytes,
    age: int,
    limit: int = 0,
    opts: wire.Opts = wire.DEFAULT_OPTS,
) -> tuple[wire.ResponseInfo, bytes]:
    info = wire.inspect_response(upstream)
    _, qend, edns = wire.parse_query(client)
    out = wire.render(info.body, info.ttl_offsets, info.ttls, age, client, qend, edns, limit, opts)
    return info, out


def _client_for(msg: dns.message.Message, **kw: object) -> tuple[str, bytes]:
    qname = zero_x20(msg.question[0].name.to_text())
    rdtype = msg.question[0].rdtype
    return qname, qwire(qname, rdtype, **kw)


CLIENTS: dict[str, dict[str, object]] = {
    "no_edns": {},
    "edns": {"edns": True, "payload": 4096},
    "edns_do": {"do": True, "payload": 1400},
}


@pytest.mark.parametrize("age", [0, 1, 55, 100, 899, 5000])
@pytest.mark.parametrize("client_kind", list(CLIENTS))
@pytest.mark.parametrize("fixture", list(FIXTURES))
def test_render_fixture(fixture: str, client_kind: str, age: int) -> None:
    upstream_msg = FIXTURES[fixture]
    upstream = upstream_msg.to_wire()
    original = parse(upstream)
    qname, client = _client_for(upstream_msg, **CLIENTS[client_kind])
    client_edns = bool(CLIENTS[client_kind])
    client_do = bool(CLIENTS[client_kind].get("do"))

    info, out = _render(upstream, client, age)

    # The stored body never carries the upstream's OPT.
    body = parse(info.body)
    assert body.edns == -1
    assert arcount(info.body) == sum(len(rr) for rr in original.additional)

    msg = parse(out)
    assert msg.id == CLIENT_ID
    assert msg.question[0].name.to_text() == qname  # exact 0x20 case
    assert msg.question[0].rdtype == original.question[0].rdtype
    assert msg.rcode() == original.rcode()
    assert msg.flags & dns.flags.QR
    assert not msg.flags & dns.flags.TC
    assert not msg.flags & dns.flags.AA  # a cached answer is not authoritative
    assert msg.answer == original.answer
    assert msg.authority == original.authority
    assert msg.additional == original.additional
    for (section, got), (_, want) in zip(all_rrsets(msg), all_rrsets(original), strict=True):
        assert got.ttl == max(0, want.ttl - age), (section, got.name)

    if client_edns:
        assert msg.edns == 0
        assert msg.payload == 1232
        assert bool(msg.ednsflags & dns.flags.DO) == client_do
        assert not msg.options
        assert arcount(out) == arcount(info.body) + 1
    else:
        assert msg.edns == -1
        assert arcount(out) == arcount(info.body)


def test_render_does_not_replay_upstream_opt_options() -> None:
    r = response("www.example.", "A", [rrset("www.example.", 60, "A", "169.254.2.1")], do=True)
    r.use_edns(
        0,
        dns.flags.DO,
        4096,
        options=[dns.edns.GenericOption(dns.edns.OptionType.NSID, b"upstream-nsid")],
    )
    _, out = _render(r.to_wire(), qwire("www.example.", edns=True), 0)
    msg = parse(out)
    assert msg.edns == 0
    assert not msg.options
    assert msg.payload == 1232
    assert not msg.ednsflags & dns.flags.DO
    assert b"upstream-nsid" not in out


def test_render_splices_rd() -> None:
    upstream = FIXTURES["a_opt"].to_wire()
    _, out = _render(upstream, qwire("www.example.", rd=False), 0)
    assert not parse(out).flags & dns.flags.RD
    _, out = _render(upstream, qwire("www.example.", rd=True), 0)
    assert parse(out).flags & dns.flags.RD


@pytest.mark.parametrize(
    ("client", "ad_kept"),
    [
        ({}, False),
        ({"edns": True}, False),
        ({"do": True}, True),
    ],
    ids=["no_edns", "edns_no_do", "edns_do"],
)
def test_render_clears_ad_for_clients_without_ad_or_do(
    client: dict[str, object], ad_kept: bool
) -> None:
    # RFC 6840 §5.8 and render()'s docstring: AD only for clients that set AD or DO.
    r = FIXTURES["a_opt"]
    r = dns.message.from_wire(r.to_wire())
    r.flags |= dns.flags.AD
    _, out = _render(r.to_wire(), qwire("www.example.", **client), 0)  # type: ignore[arg-type]
    assert bool(parse(out).flags & dns.flags.AD) == ad_kept


def test_opt_in_middle_of_additional_is_removed() -> None:
    hdr = raw_header(UPSTREAM_ID, 0x8180, 1, 1, 0, 3)
    ans = raw_rr(pointer(12), 1, 300, bytes([169, 254, 2, 1]))
    add1 = raw_rr(raw_name(b"ns1", b"example"), 1, 200, bytes([169, 254, 2, 53]))
    opt = raw_opt(4096, 0x8000, b"\x00\x03\x00\x04nsid")
    add2 = raw_rr(raw_name(b"ns2", b"example"), 28, 100, bytes(15) + b"\x01")
    upstream = hdr + WWW_A_QUESTION + ans + add1 + opt + add2
    assert parse(upstream).edns == 0  # dnspython accepts OPT in the middle

    info, out = _render(upstream, qwire("WWW.example."), 30)
    assert arcount(info.body) == 2
    assert parse(info.body).edns == -1
    msg = parse(out)
    assert msg.edns == -1
    assert arcount(out) == 2
    assert msg.answer[0].ttl == 270
    got = {(rr.name.to_text(), rr.rdtype, rr.ttl) for rr in msg.additional}
    assert got == {("ns1.example.", 1, 170), ("ns2.example.", 28, 70)}


def test_opt_in_middle_with_later_compression_pointer() -> None:
    # The record after the OPT compresses its owner against a name that also follows
    # the OPT. Removing the OPT shifts that name, so the pointer must still resolve to
    # ns1.example. (dnspython itself sees ns1.example. twice in the upstream reply).
    hdr = raw_header(UPSTREAM_ID, 0x8180, 1, 1, 0, 3)
    ans = raw_rr(pointer(12), 1, 300, bytes([169, 254, 2, 1]))
    opt = raw_opt(4096)
    before = hdr + WWW_A_QUESTION + ans + opt
    ns1_at = len(before)
    add1 = raw_rr(b"\x03ns1" + pointer(16), 1, 300, bytes([169, 254, 2, 53]))
    add2 = raw_rr(pointer(ns1_at), 28, 300, bytes(15) + b"\x01")
    upstream = before + add1 + add2
    names = [rr.name.to_text() for rr in parse(upstream).additional]
    assert names == ["ns1.example.", "ns1.example."]

    _, out = _render(upstream, qwire("WWW.example."), 10)
    msg = parse(out)
    got = sorted((rr.name.to_text(), rr.rdtype) for rr in msg.additional)
    assert got == [("ns1.example.", 1), ("ns1.example.", 28)]


def test_ttl_with_top_bit_reads_as_zero() -> None:
    hdr = raw_header(UPSTREAM_ID, 0x8180, 1, 2, 1, 0)
    a1 = raw_rr(pointer(12), 1, 0x80000000, bytes([169, 254, 2, 1]))
    a2 = raw_rr(pointer(12), 1, 0xFFFFFFFF, bytes([169, 254, 2, 2]))
    soa_rdata = (
        raw_name(b"ns1", b"example")
        + raw_name(b"h", b"example")
        + struct.pack(">IIIII", 1, 2, 3, 4, 0x80000005)
    )
    ns = raw_rr(pointer(16), wire.TYPE_SOA, 0x7FFFFFFF, soa_rdata)
    upstream = hdr + WWW_A_QUESTION + a1 + a2 + ns
    parse(upstream)  # well-formed for dnspython
    info = wire.inspect_response(upstream)
    assert info.ttls == (0, 0, 0x7FFFFFFF)
    assert info.soa_minimum == 0
    _, out = _render(upstream, qwire("www.example."), 5)
    msg = parse(out)
    assert msg.answer[0].ttl == 0
    assert msg.authority[0].ttl == 0x7FFFFFFF - 5


def _big_answer(n: int = 60) -> bytes:
    addrs = [f"169.254.2.{i}" for i in range(1, n + 1)]
    return response("big.example.", "A", [rrset("big.example.", 300, "A", *addrs)]).to_wire()


@pytest.mark.parametrize("client", [{}, {"edns": True}, {"do": True}], ids=str)
def test_large_answer_truncated_at_limit(client: dict[str, object]) -> None:
    data = qwire("BiG.eXample.", **client)  # type: ignore[arg-type]
    _, out = _render(_big_answer(), data, 10, 512)
    assert len(out) <= 512
    msg = parse(out)
    assert msg.flags & dns.flags.TC
    assert msg.id == CLIENT_ID
    # Whole records (16 bytes each after 29 of header and question) beside our OPT
    # (11 bytes) when the client sent one; test_truncate.py has the rest.
    assert len(msg.answer[0]) == (29 if client else 30)
    assert msg.authority == msg.additional == []
    assert msg.question[0].name.to_text() == "BiG.eXample."
    assert msg.question[0].rdtype == dns.rdatatype.A
    if client:
        assert msg.edns == 0
        assert bool(msg.ednsflags & dns.flags.DO) == bool(client.get("do"))
    else:
        assert msg.edns == -1


def test_large_answer_not_truncated_without_limit() -> None:
    _, out = _render(_big_answer(), qwire("big.example."), 10, 0)
    assert len(out) > 512
    msg = parse(out)
    assert not msg.flags & dns.flags.TC
    assert len(msg.answer[0]) == 60
    assert msg.answer[0].ttl == 290


def test_answer_that_fits_limit_not_truncated() -> None:
    upstream = FIXTURES["a_opt"].to_wire()
    _, out = _render(upstream, qwire("www.example."), 0, 512)
    assert not parse(out).flags & dns.flags.TC


def test_udp_limit() -> None:
    assert wire.udp_limit(-1, 1232) == 512
    assert wire.udp_limit(4096 | DO, 1232) == 1232
    assert wire.udp_limit(800, 1232) == 800


def test_inspect_response_flags_and_counts() -> None:
    info = wire.inspect_response(FIXTURES["nxdomain"].to_wire())
    assert info.rcode == wire.NXDOMAIN
    assert info.ancount == 0
    assert info.soa_index == 0
    assert info.soa_minimum == 60
    assert info.ttls == (900,)
    assert not info.truncated
    tc = dns.message.from_wire(FIXTURES["a_opt"].to_wire())
    tc.flags |= dns.flags.TC
    assert wire.inspect_response(tc.to_wire()).truncated


# --------------------------------------------------------------------------------------
# reply_matches


def _upstream_question(data: bytes) -> tuple[bytes, bytes]:
    _, qend, _ = wire.parse_query(data)
    return data[0:2], data[wire.HEADER_LEN : qend]


def test_reply_matches() -> None:
    sent = query("www.example.", "A", edns=True, qid=0x4242)
    qid, question = _upstream_question(sent.to_wire())
    good = dns.message.make_response(sent)
    assert wire.reply_matches(good.to_wire(), qid, question)

    upper = dns.message.make_response(query("WWW.EXAMPLE.", "A", edns=True, qid=0x4242))
    assert wire.reply_matches(upper.to_wire(), qid, question)

    wrong_id = dns.message.make_response(query("www.example.", "A", qid=0x4243))
    assert not wire.reply_matches(wrong_id.to_wire(), qid, question)

    assert not wire.reply_matches(sent.to_wire(), qid, question)  # QR=0

    other_type = dns.message.make_response(query("www.example.", "AAAA", qid=0x4242))
    assert not wire.reply_matches(other_type.to_wire(), qid, question)

    other_name = dns.message.make_response(query("www.example.org.", "A", qid=0x4242))
    assert not wire.reply_matches(other_name.to_wire(), qid, question)

    shorter = dns.message.make_response(query("ww.example.", "A", qid=0x4242))
    assert not wire.reply_matches(shorter.to_wire(), qid, question)

    assert not wire.reply_matches(good.to_wire()[:20], qid, question)


def test_reply_matches_qtype_is_not_case_folded() -> None:
    # Only the name is case-insensitive: qtype 65 (HTTPS, 0x0041 = "A") and qtype 97
    # (0x0061 = "a") are different questions.
    sent = query("svc.example.", dns.rdatatype.HTTPS, qid=0x4242)
    qid, question = _upstream_question(sent.to_wire())
    other = dns.message.make_response(query("svc.example.", 97, qid=0x4242))
    assert not wire.reply_matches(other.to_wire(), qid, question)


# --------------------------------------------------------------------------------------
# Compression pointers


def test_read_name_pointer_loop() -> None:
    self_loop = bytes(12) + pointer(12)
    two_loop = bytes(12) + pointer(14) + pointer(12)
    for data in (self_loop, two_loop):
        with pytest.raises(wire.WireError):
            wire.read_name(data, 12)


def test_read_name_follows_pointers_and_escapes() -> None:
    data = bytes(12) + raw_name(b"Www", b"exa.mple") + b"\x03foo" + pointer(16)
    assert wire.read_name(data, 12) == "Www.exa\\.mple."
    assert wire.read_name(data, 12 + 14) == "foo.exa\\.mple."


def _reply_with_answer(owner: bytes, rtype: int = 1, rdata: bytes = b"\xa9\xfe\x02\x01") -> bytes:
    hdr = raw_header(UPSTREAM_ID, 0x8180, 1, 1, 0, 0)
    return hdr + WWW_A_QUESTION + raw_rr(owner, rtype, 300, rdata)


ANSWER_AT = wire.HEADER_LEN + len(WWW_A_QUESTION)


def _cname_self_loop() -> bytes:
    rdata_at = ANSWER_AT + 2 + 10
    return _reply_with_answer(pointer(12), 5, pointer(rdata_at))


def _loop_through_rdata() -> bytes:
    # Record 1's A rdata holds a pointer to record 2's owner; record 2's owner points
    # back into record 1's rdata: a loop made only of "backward-looking" name starts.
    hdr = raw_header(UPSTREAM_ID, 0x8180, 1, 2, 0, 0)
    rdata_at = ANSWER_AT + 2 + 10
    second_owner_at = rdata_at + 4
    rr1 = raw_rr(pointer(12), 1, 300, pointer(second_owner_at) + b"\x00\x00")
    rr2 = raw_rr(pointer(rdata_at), 1, 300, b"\xa9\xfe\x02\x02")
    return hdr + WWW_A_QUESTION + rr1 + rr2


MALFORMED_POINTERS: dict[str, Callable[[], bytes]] = {
    "owner_self_pointer": lambda: _reply_with_answer(pointer(ANSWER_AT)),
    "owner_forward_pointer": lambda: _reply_with_answer(pointer(ANSWER_AT + 20)),
    "question_self_pointer": lambda: raw_header(UPSTREAM_ID, 0x8180) + pointer(12) + b"\0\1\0\1",
    "question_forward_pointer": lambda: (
        raw_header(UPSTREAM_ID, 0x8180) + pointer(18) + b"\0\1\0\1" + raw_name(b"a")
    ),
    "cname_target_self_loop": _cname_self_loop,
    "loop_through_rdata": _loop_through_rdata,
}


@pytest.mark.timeout(5)
@pytest.mark.parametrize("case", list(MALFORMED_POINTERS))
def test_inspect_response_rejects_pointer_loops_and_forward_pointers(case: str) -> None:
    data = MALFORMED_POINTERS[case]()
    # dnspython, a real client, rejects every one of these.
    with pytest.raises(dns.exception.FormError):
        parse(data)
    with pytest.raises(wire.WireError):
        wire.inspect_response(data)


# --------------------------------------------------------------------------------------
# Hypothesis


@st.composite
def mutated(draw: st.DrawFn, bases: Sequence[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(bases)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(("flip", "set", "insert", "delete", "cut")))
        if op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=3))
            continue
        if not data:
            continue
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[i] = draw(st.sampled_from((0x00, 0x01, 0x3F, 0x40, 0x80, 0xC0, 0xFF)))
        elif op == "delete":
            del data[i]
        else:
            del data[i:]
    return bytes(data)


def _check_parse_query(data: bytes) -> None:
    try:
        key, qend, edns = wire.parse_query(data)
    except wire.BadQuery as exc:
        assert exc.rcode in (None, wire.FORMERR, wire.NOTIMP, wire.BADVERS)
        assert 0 <= exc.qend <= len(data)
        if exc.rcode is not None:
            # An error reply can always be built and read by a real client. (dnspython
            # refuses UPDATE messages whose zone is not of type SOA, so skip those.)
            raw = wire.error_reply(data, exc.rcode, exc.qend, exc.edns, 1232)
            assert raw[:2] == data[:2]
            if (data[2] >> 3) & 0x0F != dns.opcode.UPDATE:
                assert parse(raw).rcode() == exc.rcode
        return
    assert wire.HEADER_LEN < qend <= len(data)
    assert key[:-1] == data[wire.HEADER_LEN : qend - 4].lower() + data[qend - 4 : qend]
    assert key[-1] in (0, 1, 2, 3)
    assert edns == -1 or edns & 0xFFFF >= 512
    assert edns < 1 << 17


QUERY_BASES = [
    *QUERY_SAMPLES.values(),
    qwire("a.b.c.example.", "SRV", do=True, payload=512),
    qwire(".", "NS"),
]


@FUZZ
@given(st.binary(max_size=600))
def test_parse_query_arbitrary_bytes(data: bytes) -> None:
    _check_parse_query(data)


@FUZZ
@given(st.binary(min_size=12, max_size=64).map(lambda b: b"\x12\x34\x01\x00\x00\x01" + b[6:]))
def test_parse_query_arbitrary_one_question(data: bytes) -> None:
    _check_parse_query(data)


@FUZZ
@given(mutated(QUERY_BASES))
def test_parse_query_mutated(data: bytes) -> None:
    _check_parse_query(data)


def _check_inspect(data: bytes) -> None:
    try:
        info = wire.inspect_response(data)
    except wire.WireError:
        return
    assert len(info.ttl_offsets) == len(info.ttls)
    assert 0 <= info.authority_end <= len(info.ttls)
    assert -1 <= info.soa_index < max(info.authority_end, 0) or info.soa_index == -1
    for off, ttl in zip(info.ttl_offsets, info.ttls, strict=True):
        assert off >= wire.HEADER_LEN and off + 4 <= len(info.body)
        assert 0 <= ttl <= wire.TTL_MAX
    assert 0 <= info.soa_minimum <= wire.TTL_MAX
    # Aging the stored body must never fail either.
    aged = wire.with_ttls(info.body, info.ttl_offsets, tuple(max(0, t - 1) for t in info.ttls))
    assert len(aged) == len(info.body)


RESPONSE_BASES = [m.to_wire() for m in FIXTURES.values()]


@FUZZ
@given(st.binary(max_size=600))
def test_inspect_response_arbitrary_bytes(data: bytes) -> None:
    _check_inspect(data)


@FUZZ
@given(
    st.tuples(
        st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3), st.binary()
    ).map(lambda t: struct.pack(">HHHHHH", 1, 0x8180, *t[:4]) + t[4])
)
def test_inspect_response_arbitrary_small_counts(data: bytes) -> None:
    _check_inspect(data)


@FUZZ
@given(mutated(RESPONSE_BASES))
def test_inspect_response_mutated(data: bytes) -> None:
    _check_inspect(data)


LABEL = st.text(alphabet=string.ascii_letters + string.digits + "-", min_size=1, max_size=40)
NAMES = st.lists(LABEL, min_size=1, max_size=4).map(lambda labels: ".".join(labels) + ".")

RDATA = {
    "A": lambda n: ["169.254.2.1", "169.254.2.2"],
    "AAAA": lambda n: ["2001:db8::1"],
    "TXT": lambda n: ['"some text"'],
    "MX": lambda n: [f"10 mail.{n}", "20 mx.example."],
    "CNAME": lambda n: [f"target.{n}"],
    "SRV": lambda n: [f"0 5 53 srv.{n}"],
    "NS": lambda n: [f"ns1.{n}", f"ns2.{n}"],
    "PTR": lambda n: ["ptr.example."],
}


def _mixed_case(name: str, flips: list[bool]) -> str:
    return "".join((c.swapcase() if flips[i % len(flips)] else c) for i, c in enumerate(name))


@ROUND_TRIP
@given(
    name=NAMES,
    flips=st.lists(st.booleans(), min_size=1, max_size=8),
    rdtype=st.sampled_from(sorted(RDATA)),
    ttl=st.integers(0, wire.TTL_MAX),
    age=st.integers(0, 1 << 20),
    edns=st.booleans(),
    do=st.booleans(),
    cd=st.booleans(),
)
def test_round_trip(
    name: str,
    flips: list[bool],
    rdtype: str,
    ttl: int,
    age: int,
    edns: bool,
    do: bool,
    cd: bool,
) -> None:
    client_name = _mixed_case(name, flips)
    client = qwire(client_name, rdtype, edns=edns, do=do, cd=cd)
    key, qend, client_edns = wire.parse_query(client)
    lower_key = wire.parse_query(qwire(name.lower(), rdtype, edns=edns, do=do, cd=cd))[0]
    assert key == lower_key
    assert key[:-5] == name_wire(name.lower())
    assert wire.key_flags(key) == (do, cd)

    # The upstream saw the first client's spelling; this client spelled it differently.
    upstream_msg = response(
        name.upper(),
        rdtype,
        [rrset(name.upper(), ttl, rdtype, *RDATA[rdtype](name))],
        additional=[rrset(f"extra.{name}", ttl // 2, "A", "169.254.2.9")],
        do=do,
    )
    info = wire.inspect_response(upstream_msg.to_wire())
    out = wire.render(
        info.body, info.ttl_offsets, info.ttls, age, client, qend, client_edns, 0, wire.DEFAULT_OPTS
    )
    msg = parse(out)
    assert msg.id == CLIENT_ID
    assert msg.question[0].name.to_text() == client_name
    assert msg.answer == upstream_msg.answer
    assert msg.additional == upstream_msg.additional
    assert msg.answer[0].ttl == max(0, ttl - age)
    assert msg.additional[0].ttl == max(0, ttl // 2 - age)
    assert (msg.edns >= 0) == (edns or do)
    if msg.edns >= 0:
        assert bool(msg.ednsflags & dns.flags.DO) == do
