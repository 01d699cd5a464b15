"""Byte-level DNS: the parts of RFC 1035/6891 the proxy needs, with no parsing library.

Everything here is a pure function over ``bytes``: the question walk and cache key for
incoming queries, the bounded walk of upstream replies (TTL offsets, minimum TTL, SOA,
OPT removal), rendering a stored reply for one client (ID and question splice, TTL aging,
OPT rebuilt, truncation) and the small synthesized messages (errors, upstream queries).
No sockets, no clocks: ``now`` is always an argument.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import dnslib

from dnsproxy import native_extension
from dnsproxy.errors import DnsproxyError

HEADER_LEN: Final = 12

# Response codes.
NOERROR: Final = 0
FORMERR: Final = 1
SERVFAIL: Final = 2
NXDOMAIN: Final = 3
NOTIMP: Final = 4
REFUSED: Final = 5
BADVERS: Final = 16

# Record types the proxy treats specially.
TYPE_SOA: Final = 6
TYPE_OPT: Final = 41
TYPE_IXFR: Final = 251
TYPE_AXFR: Final = 252

CLASS_IN: Final = 1

# Header flag bits (byte 2 and byte 3 of the header).
_QR: Final = 0x80
_AA: Final = 0x04
_NOT_AA: Final = ~_AA & 0xFF
_TC: Final = 0x02
_RD: Final = 0x01
_RA: Final = 0x80
_AD: Final = 0x20
_CD: Final = 0x10

MAX_NAME_LEN: Final = 255
MIN_UDP_PAYLOAD: Final = 512
TTL_MAX: Final = 0x7FFFFFFF

_U16: Final = struct.Struct(">H")
_U32: Final = struct.Struct(">I")
_RR_FIXED: Final = struct.Struct(">HHIH")  # type, class, ttl, rdlength
_COUNTS_FIXED: Final = struct.Struct(">HHHH")  # QDCOUNT, ANCOUNT, NSCOUNT, ARCOUNT
_pack_u32_into: Final = _U32.pack_into
# Typed as what they return, not struct's tuple[Any, ...]: compiled, the fields are then
# native integers rather than objects compared and converted at every use.
_unpack_rr: Final[Callable[[bytes, int], tuple[int, int, int, int]]] = _RR_FIXED.unpack_from
_COUNTS: Final[Callable[[bytes, int], tuple[int, int, int, int]]] = _COUNTS_FIXED.unpack_from
_COUNTS_PACK: Final = struct.Struct(">HHH").pack_into  # ANCOUNT, NSCOUNT, ARCOUNT
_new_tuple: Final = tuple.__new__
_BYTE: Final = tuple(bytes((i,)) for i in range(256))  # each one-octet bytes object

# Cache-key suffix bytes, indexed by (DO | CD << 1).
_KEY_FLAGS: Final = (b"\x00", b"\x01", b"\x02", b"\x03")


class WireError(DnsproxyError, ValueError):
    """A message that cannot be walked safely (truncated, bad label, bad pointer)."""


class BadQuery(DnsproxyError):
    """A query that gets an error reply (``rcode``) or, when ``rcode`` is None, no reply.

    ``qend`` is the end of the question when it could be read (so the reply can echo
    it), else 0. ``edns`` follows the encoding of :func:`parse_query`. ``reason`` names
    the drop counter when the packet is dropped or answered with FORMERR.
    """

    def __init__(self, rcode: int | None, reason: str, qend: int = 0, edns: int = -1) -> None:
        super().__init__(reason)
        self.rcode = rcode
        self.reason = reason
        self.qend = qend
        self.edns = edns


# --------------------------------------------------------------------------------------
# Names and questions


def read_name(data: bytes, off: int) -> str:
    """Decode the name at ``off`` to text (following pointers, with a jump limit).

    Off the hot path: used for logs and zone selection of configured names.
    """
    labels: list[str] = []
    jumps = 0
    total = 0
    n = len(data)
    while True:
        if off >= n:
            raise WireError("name runs past the end of the message")
        length = data[off]
        if length == 0:
            break
        if length & 0xC0 == 0xC0:
            if off + 2 > n:
                raise WireError("truncated compression pointer")
            jumps += 1
            if jumps > 64:
                raise WireError("compression pointer loop")
            off = ((length & 0x3F) << 8) | data[off + 1]
            continue
        if length & 0xC0:
            raise WireError("unsupported label type")
        label = data[off + 1 : off + 1 + length]
        if len(label) != length:
            raise WireError("label runs past the end of the message")
        total += length + 1
        if total > MAX_NAME_LEN:
            raise WireError("name longer than 255 octets")
        labels.append(_label_text(label))
        off += length + 1
    return ".".join(labels) + "." if labels else "."


def _label_text(label: bytes) -> str:
    out = []
    for b in label:
        if b in (0x2E, 0x5C):  # '.' and '\\' are escaped, as in master files
            out.append("\\" + chr(b))
        elif 0x21 <= b <= 0x7E:
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return "".join(out)


def name_to_wire(name: str) -> bytes:
    """Text name (``"cluster.local"``, ``"."``) to lowercased uncompressed wire form."""
    name = name.strip()
    if name in ("", "."):
        return b"\x00"
    if name.endswith("."):
        name = name[:-1]
    out = bytearray()
    for label in name.split("."):
        raw = label.lower().encode("ascii")
        if not raw or len(raw) > 63:
            raise ValueError(f"invalid label {label!r} in {name!r}")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) > MAX_NAME_LEN:
        raise ValueError(f"name {name!r} longer than 255 octets")
    return bytes(out)


def question_end(data: bytes, off: int = HEADER_LEN) -> int:
    """End of the uncompressed question (name, type, class) starting at ``off``."""
    n = len(data)
    i = off
    while True:
        if i >= n:
            raise WireError("question name runs past the end of the message")
        length = data[i]
        if length == 0:
            break
        if length > 63:
            raise WireError("bad label in question name")
        i += length + 1
    if i + 1 - off > MAX_NAME_LEN:
        raise WireError("question name longer than 255 octets")
    end = i + 5
    if end > n:
        raise WireError("question runs past the end of the message")
    return end


# --------------------------------------------------------------------------------------
# Queries


def parse_query(data: bytes) -> tuple[bytes, int, int]:
    """Validate a client query and return ``(key, qend, edns)``.

    ``key`` is the cache key: lowercased qname wire, qtype, qclass, one byte of DO | CD<<1.
    ``qend`` is the offset just past the question. ``edns`` is -1 when the client sent
    no OPT, else its UDP payload size (at least 512) with the DO bit at ``1 << 16``.

    Raises :class:`BadQuery` for anything that must not be looked up.
    """
    n = len(data)
    if n < HEADER_LEN:
        raise BadQuery(None, "short")
    b2 = data[2]
    if b2 & _QR:
        raise BadQuery(None, "not_a_query")
    i = HEADER_LEN
    if data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return _parse_query_slow(data)
    try:
        while True:
            length = data[i]
            if length == 0:
                break
            if length > 63:
                raise BadQuery(FORMERR, "bad_name")
            i += length + 1
    except IndexError:
        raise BadQuery(FORMERR, "truncated") from None
    qend = i + 5
    if qend > n:
        raise BadQuery(FORMERR, "truncated")
    if i + 1 - HEADER_LEN > MAX_NAME_LEN:
        raise BadQuery(FORMERR, "bad_name")
    if b2 & 0x78:
        raise BadQuery(NOTIMP, "opcode", qend)
    if data[11] == 1 and not data[10] and n >= qend + 11 and data[qend] == 0:
        # One additional record with the root name: the usual OPT, read in place.
        rtype, rclass, ttl, rdlen = _unpack_rr(data, qend + 1)
        if qend + 11 + rdlen > n:
            raise BadQuery(FORMERR, "truncated", qend)
        edns = _opt_edns(rclass, ttl, qend) if rtype == TYPE_OPT else -1
    elif data[10] or data[11]:
        edns = _parse_query_additional(data, qend, (data[10] << 8) | data[11])
    else:
        edns = -1
    return _cache_key(data, qend, edns), qend, edns


def _cache_key(data: bytes, qend: int, edns: int) -> bytes:
    """Lowercased qname, qtype and qclass of a checked question, then DO | CD << 1."""
    flags = (((edns >> 16) & 1) if edns >= 0 else 0) | ((data[3] & _CD) >> 3)
    return data[HEADER_LEN : qend - 4].lower() + data[qend - 4 : qend] + _KEY_FLAGS[flags]


def _opt_edns(rclass: int, ttl: int, qend: int) -> int:
    """The ``edns`` value of a client's OPT record from its CLASS (payload size) and
    TTL (version, DO) fields; BADVERS for a version other than 0."""
    size = rclass if rclass >= MIN_UDP_PAYLOAD else MIN_UDP_PAYLOAD
    edns = size | ((ttl >> 15) & 1) << 16
    if (ttl >> 16) & 0xFF:
        raise BadQuery(BADVERS, "badvers", qend, edns)
    return edns


def _parse_query_slow(data: bytes) -> tuple[bytes, int, int]:
    """Queries with QDCOUNT != 1 or records in the answer/authority sections."""
    qdcount = _U16.unpack_from(data, 4)[0]
    opcode_bad = bool(data[2] & 0x78)
    if qdcount != 1:
        qend = 0
        if qdcount > 1:
            try:
                qend = question_end(data)
            except WireError:
                qend = 0
        if opcode_bad:
            raise BadQuery(NOTIMP, "opcode", qend)
        raise BadQuery(FORMERR, "qdcount", 0)
    try:
        qend = question_end(data)
    except WireError:
        raise BadQuery(FORMERR, "truncated") from None
    if opcode_bad:
        raise BadQuery(NOTIMP, "opcode", qend)
    off = qend
    try:
        for _ in range(_U16.unpack_from(data, 6)[0] + _U16.unpack_from(data, 8)[0]):
            off = _skip_rr(data, off)
    except WireError:
        raise BadQuery(FORMERR, "truncated", qend) from None
    arcount = _U16.unpack_from(data, 10)[0]
    edns = _parse_query_additional(data, qend, arcount, off) if arcount else -1
    return _cache_key(data, qend, edns), qend, edns


def _skip_rr(data: bytes, off: int) -> int:
    off = name_end(data, off)
    if off + 10 > len(data):
        raise WireError("record header runs past the end of the message")
    rdlen = (data[off + 8] << 8) | data[off + 9]
    off += 10 + rdlen
    if off > len(data):
        raise WireError("record data runs past the end of the message")
    return off


def _parse_query_additional(data: bytes, qend: int, arcount: int, off: int = -1) -> int:
    """Find the client's OPT record; return the ``edns`` value (-1 without OPT)."""
    if off < 0:
        off = qend
    edns = -1
    n = len(data)
    for _ in range(arcount):
        start = off
        try:
            off = name_end(data, off)
        except WireError:
            raise BadQuery(FORMERR, "truncated", qend, edns) from None
        if off + 10 > n:
            raise BadQuery(FORMERR, "truncated", qend, edns)
        rtype, rclass, ttl, rdlen = _unpack_rr(data, off)
        off += 10 + rdlen
        if off > n:
            raise BadQuery(FORMERR, "truncated", qend, edns)
        if rtype != TYPE_OPT:
            continue
        if edns >= 0:
            raise BadQuery(FORMERR, "multiple_opt", qend, edns)
        if data[start] != 0:
            raise BadQuery(FORMERR, "bad_opt", qend)
        edns = _opt_edns(rclass, ttl, qend)
    return edns


# Query types answered at once instead of forwarded, with the rcode and the reason they
# are counted under (None: not an invalid query). Zone transfers are REFUSED. The types
# below 256 that are not data (RFC 6895 §3.1: OPT, TKEY, TSIG, MAILB, MAILA and the
# unassigned meta range 128..248) get FORMERR, as from Unbound: no upstream can answer
# one, so forwarding it only earns a late error. The server looks a query's type up
# here only after a cache miss (such a type is never cached), so cache hits pay nothing.
NOT_FORWARDED: Final[dict[int, tuple[int, str | None]]] = {
    TYPE_AXFR: (REFUSED, None),
    TYPE_IXFR: (REFUSED, None),
    **{t: (FORMERR, "meta_qtype") for t in (TYPE_OPT, 249, 250, 253, 254, *range(128, 249))},
}


# --------------------------------------------------------------------------------------
# Replies from upstream


class ResponseInfo(NamedTuple):
    """What the cache needs to know about an upstream reply, from one bounded walk.

    A NamedTuple, not a dataclass: one is built per upstream reply and tuple creation
    is several times cheaper than a frozen dataclass __init__.

    ``body`` is the reply with any OPT record removed (ARCOUNT adjusted) and AA cleared;
    ``ttl_offsets``/``ttls`` list every TTL field in ``body`` and its value (top-bit
    values read as 0), one per record in wire order, so the offsets locate the records
    too (:func:`plan_cut`); the first ``authority_end`` of them belong to the answer and
    authority sections.
    """

    body: bytes
    rcode: int
    truncated: bool
    ancount: int
    ttl_offsets: tuple[int, ...]
    ttls: tuple[int, ...]
    authority_end: int
    soa_index: int  # index into ttl_offsets of the first authority SOA, or -1
    soa_minimum: int
    # The answer section holds a record of the asked type (or the type is CNAME/ANY); a
    # NOERROR reply with answers but not this is NODATA behind a CNAME (RFC 2308 §2.2).
    answers_qtype: bool = True
    # Found on the walk so that the cache needs no min()/max() passes: the lowest TTL of
    # the answer and authority sections (0 when both are empty), and the lowest and
    # highest of all ``ttls`` (0 when there are none).
    span_min: int = 0
    ttl_low: int = 0
    ttl_high: int = 0


# Types whose RDATA starts (after a fixed prefix) with a domain name that may be
# compressed: the walk checks those names too, so a reply that a client could not parse
# is never cached. Value: bytes before the name.
_RDATA_NAME_AT: Final = {2: 0, 5: 0, 12: 0, 39: 0, 15: 2, 33: 6}
_NAME_IN_RDATA: Final = frozenset((*_RDATA_NAME_AT, TYPE_SOA))
TYPE_CNAME: Final = 5
TYPE_DNAME: Final = 39
TYPE_ANY: Final = 255
# Answer records that lead from the question's name to another (a chain to keep whole).
_CHAIN_TYPES: Final = (TYPE_CNAME, TYPE_DNAME)


def _check_rdata_names(data: bytes, rtype: int, rdata: int, end: int) -> None:
    """The domain names inside the RDATA of a record of ``rtype`` must walk cleanly."""
    if rtype == TYPE_SOA:
        # MNAME, RNAME, then five 32-bit fields.
        if name_end(data, name_end(data, rdata)) + 20 != end:
            raise WireError("malformed SOA record")
        return
    skip = _RDATA_NAME_AT[rtype]
    if end - rdata <= skip or name_end(data, rdata + skip) > end:
        raise WireError("malformed name in record data")


def name_end(data: bytes, off: int) -> int:
    """End of the name at ``off``, following compression pointers to check the whole name.

    Every pointer must point strictly before itself, which makes loops impossible
    whatever the bytes say, and the expanded name must fit in 255 octets.
    """
    n = len(data)
    end = -1
    total = 0
    jumps = 0
    while True:
        if off >= n:
            raise WireError("name runs past the end of the message")
        length = data[off]
        if length == 0:
            return end if end >= 0 else off + 1
        if length >= 0xC0:
            # A name has at most 127 labels, so more jumps than that is a crafted chain
            # meant to make this walk slow.
            jumps += 1
            if off + 1 >= n or jumps > 127:
                raise WireError("truncated compression pointer or pointer chain")
            target = ((length & 0x3F) << 8) | data[off + 1]
            if target >= off:
                raise WireError("compression pointer does not point backwards")
            if end < 0:
                end = off + 2
            off = target
            continue
        if length & 0xC0:
            raise WireError("unsupported label type")
        total += length + 1
        if total > MAX_NAME_LEN:
            raise WireError("name longer than 255 octets")
        off += length + 1


# ResponseInfo's fields as a plain tuple, in its order. Compiled, a function returns a
# tuple of fixed length unboxed (no object at all) and its caller takes it apart
# natively, where a NamedTuple is built by a generic call and unpacked item by item.
ResponseFields = tuple[
    bytes, int, bool, int, tuple[int, ...], tuple[int, ...], int, int, int, bool, int, int, int
]


def inspect_response(data: bytes, qend: int = 0) -> ResponseInfo:
    """Walk an upstream reply once; raise :class:`WireError` when it is malformed.

    ``qend`` > 0 says the reply's single question ends there and was already checked
    against the query we sent (:func:`reply_matches`), so the walk starts after it.
    ``data`` must be ``bytes``: the returned body may be ``data`` itself.
    """
    return _new_tuple(ResponseInfo, walk_response(data, qend))


def walk_response(data: bytes, qend: int = 0) -> ResponseFields:
    """:func:`inspect_response` with its result as a plain tuple, for the miss path."""
    n = len(data)
    if n < HEADER_LEN:
        raise WireError("reply shorter than a header")
    qdcount, ancount, nscount, arcount = _COUNTS(data, 4)
    if qend:
        off = qend
        qtype = (data[qend - 4] << 8) | data[qend - 3]
    else:
        off = HEADER_LEN
        qtype = -1
        for _ in range(qdcount):
            off = name_end(data, off) + 4
            if off > n:
                raise WireError("question runs past the end of the message")
            if qtype < 0:
                qtype = (data[off - 4] << 8) | data[off - 3]
    # Owner names are nearly always a pointer to the question name at offset 12, which
    # the walk above (or reply_matches) has just checked: no need to walk it again.
    pointer_12 = 0xC0 if qtype >= 0 else -1
    answers_qtype = qtype in (TYPE_CNAME, TYPE_ANY) or ancount == 0
    offsets: list[int] = []
    ttls: list[int] = []
    top_bit: list[int] = []  # TTLs with the top bit set: sent on as 0 (RFC 2181 §8)
    soa_index = -1
    soa_minimum = 0
    opt_start = opt_end = -1
    authority_end = 0
    span_min = low = TTL_MAX + 1
    high = -1
    answer_authority = ancount + nscount
    for index in range(answer_authority + arcount):
        start = off
        try:
            c = data[off]
            if c == pointer_12 and data[off + 1] == 12:
                off += 2
            elif c == 0:
                off += 1
                if data[off + 1] == TYPE_OPT and data[off] == 0:
                    # The OPT record (every upstream reply has ours): only its place and
                    # length matter, so no unpacking of its fixed fields.
                    if index < answer_authority or opt_start >= 0:
                        raise WireError("misplaced or repeated OPT record")
                    opt_start = start
                    off = opt_end = off + 10 + ((data[off + 8] << 8) | data[off + 9])
                    if off > n:
                        raise WireError("record data runs past the end of the message")
                    continue
            else:
                off = name_end(data, off)
            rtype, _rclass, ttl, rdlen = _unpack_rr(data, off)
        except (IndexError, struct.error):
            raise WireError("record runs past the end of the message") from None
        off += 10
        end = off + rdlen
        if end > n:
            raise WireError("record data runs past the end of the message")
        if rtype == TYPE_OPT:
            if index < answer_authority or opt_start >= 0 or data[start] != 0:
                raise WireError("misplaced or repeated OPT record")
            opt_start, opt_end = start, end
        else:
            if ttl > TTL_MAX:
                ttl = 0
                top_bit.append(off - 6)
            if rtype == qtype and index < ancount:
                answers_qtype = True
            if rtype in _NAME_IN_RDATA:
                _check_rdata_names(data, rtype, off, end)
                if rtype == TYPE_SOA and soa_index < 0 and ancount <= index < answer_authority:
                    soa_index = len(offsets)
                    soa_minimum = _U32.unpack_from(data, end - 4)[0]
                    if soa_minimum > TTL_MAX:
                        soa_minimum = 0
            offsets.append(off - 6)
            ttls.append(ttl)
            if ttl < low:
                low = ttl
            if ttl > high:
                high = ttl
            if ttl < span_min and index < answer_authority:
                span_min = ttl
        if index + 1 == answer_authority:
            authority_end = len(offsets)
        off = end
    if opt_start >= 0:
        if opt_end != n:
            # OPT before other records: cutting it out would shift the targets of later
            # compression pointers, so re-encode the message without it (rare; off the
            # hot path).
            return walk_response(_without_opt(data))
        # Cut off at the OPT record, ARCOUNT one less (a record was there, so no borrow
        # past 0) and AA cleared, in one join of slices and one-octet objects: no
        # bytearray to make, edit and copy again.
        arcount -= 1
        flags = data[2] & _NOT_AA
        a_hi = _BYTE[arcount >> 8]
        a_lo = _BYTE[arcount & 0xFF]
        body = b"".join((data[:2], _BYTE[flags], data[3:10], a_hi, a_lo, data[12:opt_start]))
    elif data[2] & _AA:
        body = b"".join((data[:2], _BYTE[data[2] & _NOT_AA], data[3:]))
    else:
        body = data
    if top_bit:
        # The offsets are the same in body: only an OPT record at the very end was cut.
        edit = bytearray(body)
        for off in top_bit:
            _pack_u32_into(edit, off, 0)
        body = bytes(edit)
    return (
        body,
        data[3] & 0x0F,
        bool(data[2] & _TC),
        ancount,
        tuple(offsets),
        tuple(ttls),
        authority_end,
        soa_index,
        soa_minimum,
        answers_qtype,
        span_min if authority_end else 0,
        low if high >= 0 else 0,
        high if high >= 0 else 0,
    )


def _without_opt(data: bytes) -> bytes:
    try:
        record = dnslib.DNSRecord.parse(data)
    except Exception as exc:  # dnslib raises several types for bad input
        raise WireError(f"unparseable reply: {exc}") from None
    record.ar = [rr for rr in record.ar if rr.rtype != TYPE_OPT]
    packed = bytes(record.pack())  # dnslib packs into a bytearray
    if len(packed) >= len(data):
        raise WireError("re-encoding the reply did not remove its OPT record")
    return packed


def with_ttls(body: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...]) -> bytes:
    """``body`` with the TTL at each offset replaced by the matching value."""
    buf = bytearray(body)
    for off, ttl in zip(offsets, ttls, strict=True):
        _pack_u32_into(buf, off, ttl)
    return bytes(buf)


def reply_matches(reply: bytes, query_id: bytes, question: bytes) -> bool:
    """RFC 5452 acceptance: QR set, our ID, exactly our question (case-insensitive).

    ``query_id`` empty skips the ID check, for a caller that found the query by its ID.
    """
    if len(reply) < HEADER_LEN + len(question) or not reply[2] & _QR:
        return False
    if reply[4] or reply[5] != 1 or (query_id and not reply.startswith(query_id)):
        return False
    name_end_ = HEADER_LEN + len(question) - 4
    if reply[HEADER_LEN : name_end_ + 4] == question:
        return True  # the question echoed byte for byte, as servers do
    return (
        reply[HEADER_LEN:name_end_].lower() == question[:-4].lower()
        and reply[name_end_ : name_end_ + 4] == question[-4:]
    )


# --------------------------------------------------------------------------------------
# Rendering for a client

# EDNS UDP payload sizes. Our replies advertise DEFAULT_UDP_PAYLOAD to clients unless
# ``limits.udp_payload_size`` says otherwise (DNS flag day 2020). The queries we send
# upstream always advertise UPSTREAM_UDP_PAYLOAD: the setting is about the hop to the
# clients (often within one host), while the upstream hop is another network path, where
# 1232 keeps UDP replies unfragmented; over TCP, the default upstream transport, the size
# limits nothing.
DEFAULT_UDP_PAYLOAD: Final = 1232
UPSTREAM_UDP_PAYLOAD: Final = 1232


def opt_record(udp_size: int, do: bool, ext_rcode: int = 0) -> bytes:
    """Our OPT record: root name, type 41, payload ``udp_size``, extended rcode
    ``ext_rcode``, version 0, DO as given, no options (always ``_OPT_LEN`` bytes)."""
    return (
        b"\x00\x00\x29"
        + _U16.pack(udp_size)
        + _U32.pack((ext_rcode << 24) | (0x8000 if do else 0))
        + b"\x00\x00"
    )


_OPT_LEN: Final = 11

# The OPT records appended to replies for EDNS clients, without and with DO: built once
# per server from its advertised size (:func:`client_opts`).
Opts = tuple[bytes, bytes]


def client_opts(udp_size: int) -> Opts:
    """Our OPT records advertising ``udp_size``, for DO clear and DO set."""
    return opt_record(udp_size, False), opt_record(udp_size, True)


DEFAULT_OPTS: Final = client_opts(DEFAULT_UDP_PAYLOAD)

# EDNS option 15, Extended DNS Error (RFC 8914), INFO-CODE 3 "Stale Answer", no text.
EDE_STALE: Final = b"\x00\x0f\x00\x02\x00\x03"


def with_ede_stale(opts: Opts) -> Opts:
    """``opts`` (:func:`client_opts`) carrying EDE 3 "Stale Answer", for a stale reply.
    Longer than ``_OPT_LEN``: not for replies that :func:`truncate` cuts."""
    plain, do = opts
    rdata = _U16.pack(len(EDE_STALE)) + EDE_STALE
    return plain[:-2] + rdata, do[:-2] + rdata


def aged(body: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], age: int) -> bytes:
    """``body`` with every TTL lowered by ``age`` seconds, never below 0."""
    if age <= 0:
        return body
    buf = bytearray(body)
    # No strict=: mypyc compiles a plain zip of two tuples into an indexed loop, and a call
    # with a keyword argument into a generic call and an iterator (offsets and ttls come
    # from the same walk, equally long).
    for off, ttl in zip(offsets, ttls):  # noqa: B905
        ttl -= age
        _pack_u32_into(buf, off, ttl if ttl > 0 else 0)
    return bytes(buf)


# A stored reply cut for splicing: header bytes 2..12 without and with our OPT counted,
# and everything after the question without OPT, with our OPT, with our OPT and DO.
Prepared = tuple[bytes, bytes, bytes, bytes, bytes]


def prepare(body: bytes, qend: int, opts: Opts) -> Prepared:
    """Cut an (aged) stored reply once so each client costs only a splice; ``opts``
    are the server's OPT records (:func:`client_opts`)."""
    plain, do = opts
    head = body[2:HEADER_LEN]
    arcount = ((head[8] << 8) | head[9]) + 1
    head_opt = head[:8] + bytes((arcount >> 8, arcount & 0xFF))
    tail = body[qend:]
    return head, head_opt, tail, tail + plain, tail + do


# The compiled build's C extension (its aged_prepare), or None.
_UDPIO: Final[Any] = native_extension("_udpio")
_NATIVE_AGED_PREPARE: Final[Callable[..., Prepared] | None] = (
    None if _UDPIO is None else _UDPIO.aged_prepare
)


def aged_prepare(
    body: bytes, offsets: tuple[int, ...], ttls: tuple[int, ...], age: int, qend: int, opts: Opts
) -> Prepared:
    """``prepare(aged(body, offsets, ttls, age), qend, opts)``: in C, in one pass and with
    no intermediate copy, where the compiled build has it (each cached entry asked for is
    re-cut once a second it is asked; in the Kubernetes mix, with its 5 s TTLs, that was
    9 % of a query)."""
    native = _NATIVE_AGED_PREPARE
    if native is not None:
        return native(body, offsets, ttls, age, qend, opts[0], opts[1])
    return prepare(aged(body, offsets, ttls, age), qend, opts)


def splice(prepared: Prepared, query: bytes, qend: int, edns: int) -> bytes:
    """A prepared reply answered to ``query``, whole (the caller cuts it to the client's
    size: :func:`truncate`).

    Takes the client's ID, question bytes (so 0x20 case is echoed) and RD bit; appends
    our OPT (DO echoed) when the client sent one; clears AD for a client that set
    neither AD nor DO (RFC 6840 §5.8).
    """
    if edns < 0:
        head = prepared[0]
        tail = prepared[2]
        keep_ad = query[3] & _AD
    elif edns & 0x10000:
        head = prepared[1]
        tail = prepared[4]
        keep_ad = 1
    else:
        head = prepared[1]
        tail = prepared[3]
        keep_ad = query[3] & _AD
    if not query[2] & _RD or (head[1] & _AD and not keep_ad):
        fixed = bytearray(head)
        fixed[0] = (fixed[0] & 0xFE) | (query[2] & _RD)
        if not keep_ad:
            fixed[1] &= ~_AD & 0xFF
        head = bytes(fixed)
    return b"".join((query[:2], head, query[HEADER_LEN:qend], tail))


# How a query picks from a Prepared reply: (head index, tail index, mode). Mode 0: the
# concatenation is the answer; 1: so is it unless the stored reply has AD set (the client
# asked for neither AD nor DO); 2: the client cleared RD, use :func:`splice`.
Plan = tuple[int, int, int]


def plan(query: bytes, edns: int) -> Plan:
    """What :func:`splice` would pick for ``query``, so a memo of it can skip the checks."""
    if query[2] & _RD == 0:
        return (0, 2, 2) if edns < 0 else (1, 4 if edns & 0x10000 else 3, 2)
    if edns < 0:
        return 0, 2, 0 if query[3] & _AD else 1
    if edns & 0x10000:
        return 1, 4, 0
    return 1, 3, 0 if query[3] & _AD else 1


def render(
    body: bytes,
    offsets: tuple[int, ...],
    ttls: tuple[int, ...],
    age: int,
    query: bytes,
    qend: int,
    edns: int,
    limit: int,
    opts: Opts,
) -> bytes:
    """Stored reply ``body`` aged by ``age`` seconds and answered to ``query`` in one go,
    cut to ``limit`` bytes when ``limit`` > 0 and it is longer (:func:`truncate`).

    The cache keeps the result of :func:`prepare` per entry and second instead; this is
    the same transformation for one-off replies.
    """
    body = aged(body, offsets, ttls, age)
    # Only the cut this client needs, in every slot splice might read.
    if edns < 0:
        head = body[2:HEADER_LEN]
        tail = body[qend:]
    else:
        arcount = ((body[10] << 8) | body[11]) + 1
        head = body[2:10] + bytes((arcount >> 8, arcount & 0xFF))
        tail = body[qend:] + opts[1 if edns & 0x10000 else 0]
    out = splice((head, head, tail, tail, tail), query, qend, edns)
    if limit and len(out) > limit:
        return truncate(out, qend, edns, offsets, limit)
    return out


# Where a rendered reply is cut for one size: the end of the records kept, the header's
# new ANCOUNT, NSCOUNT and ARCOUNT (without our OPT), and whether TC is set. The same for
# every client of one stored reply, so the cache keeps it per entry and size.
Cut = tuple[int, int, int, int, bool]


def cut_room(limit: int, edns: int) -> int:
    """Bytes a reply of at most ``limit`` has for header, question and records."""
    return limit - _OPT_LEN if edns >= 0 else limit


def plan_cut(reply: bytes, qend: int, offsets: tuple[int, ...], room: int) -> Cut:
    """Where to cut a rendered ``reply`` so that it fits in ``room`` bytes plus our OPT.

    ``offsets`` are the TTL offsets of the reply's records, in order (the stored entry's:
    the client's question has the stored one's length). Each locates its record's
    RDLENGTH and so its end, so no name is walked and nothing is parsed.

    What is kept: the header and question, then the longest prefix of the records in
    wire order (answer, authority, additional) that fits. Only a prefix is safe:
    compression pointers point backwards, so no kept record can point into a removed
    one, whereas keeping additional records after dropping authority ones could leave a
    pointer aimed at the removed bytes. A prefix that would end inside the answer's
    CNAME/DNAME chain keeps no answer record at all (a chain cut short answers nothing).
    TC is set when an answer or authority record is left out; losing only additional
    records leaves the answer complete and TC clear (RFC 2181 §9).
    """
    end = qend
    kept = 0
    for off in offsets:
        record_end = off + 6 + ((reply[off + 4] << 8) | reply[off + 5])
        if record_end > room:
            break
        end = record_end
        kept += 1
    an = (reply[6] << 8) | reply[7]
    if 0 < kept < an:
        for off in offsets[kept:an]:
            if not reply[off - 4] and reply[off - 3] in _CHAIN_TYPES:
                kept = 0
                end = qend
                break
    ns = (reply[8] << 8) | reply[9]
    kept_an = kept if kept < an else an
    rest = kept - kept_an
    kept_ns = rest if rest < ns else ns
    return end, kept_an, kept_ns, rest - kept_ns, kept < an + ns


def apply_cut(reply: bytes, cut: Cut, edns: int) -> bytes:
    """``reply`` cut as :func:`plan_cut` said, our OPT kept for an EDNS client."""
    end, an, ns, ar, tc = cut
    out = bytearray(reply[:end])
    if tc:
        out[2] |= _TC
    if edns >= 0:
        _COUNTS_PACK(out, 6, an, ns, ar + 1)
        out += reply[-_OPT_LEN:]
    else:
        _COUNTS_PACK(out, 6, an, ns, ar)
    return bytes(out)


def truncate(reply: bytes, qend: int, edns: int, offsets: tuple[int, ...], limit: int) -> bytes:
    """A rendered ``reply`` longer than ``limit`` cut to fit, keeping whole records
    (:func:`plan_cut` says which); ``offsets`` are its records' TTL offsets."""
    return apply_cut(reply, plan_cut(reply, qend, offsets, cut_room(limit, edns)), edns)


def udp_limit(edns: int, max_udp: int) -> int:
    """Largest UDP reply the client accepts: 512 without EDNS, else its size capped."""
    if edns < 0:
        return MIN_UDP_PAYLOAD
    size = edns & 0xFFFF
    return size if size < max_udp else max_udp


def error_reply(query: bytes, rcode: int, qend: int, edns: int, udp_size: int) -> bytes:
    """Reply with ``rcode`` to ``query``, echoing the question when ``qend`` is known and
    adding our OPT (advertising ``udp_size``) for an EDNS client or an extended rcode."""
    head = bytearray(query[:HEADER_LEN])
    head[2] = _QR | (query[2] & 0x79)  # keep opcode and RD
    # RA only with BADVERS, as Unbound 1.17 answers: the other errors (FORMERR, NOTIMP
    # for an opcode, REFUSED for a zone transfer or a source outside the ACL) turn the
    # query away before any recursion is offered for it.
    head[3] = (_RA if rcode == BADVERS else 0) | (query[3] & _CD) | (rcode & 0x0F)
    if qend:
        head[4:12] = b"\x00\x01\x00\x00\x00\x00\x00\x00"
        head += query[HEADER_LEN:qend]
    else:
        head[4:12] = b"\x00\x00\x00\x00\x00\x00\x00\x00"
    if edns >= 0 or rcode > 15:
        head[11] = 1
        head += opt_record(udp_size, bool(edns >= 0 and edns & 0x10000), rcode >> 4)
    return bytes(head)


def synth_body(question: bytes, rcode: int, cd: bool) -> bytes:
    """A stored-form reply (ID 0, no OPT) with ``rcode`` and only the question."""
    flags = (_QR | _RD) << 8 | _RA | (_CD if cd else 0) | rcode
    return b"\x00\x00" + _U16.pack(flags) + b"\x00\x01\x00\x00\x00\x00\x00\x00" + question


# The fixed parts of the query sent upstream, for each key flag byte (DO | CD << 1): the
# header (ID 0, RD, CD as asked, one question, one additional) and our OPT (DO as asked).
_UPSTREAM_HEAD: Final = tuple(
    b"\x00\x00" + _U16.pack(_RD << 8 | (_CD if f & 2 else 0)) + b"\x00\x01\x00\x00\x00\x00\x00\x01"
    for f in range(4)
)
_UPSTREAM_OPT: Final = tuple(opt_record(UPSTREAM_UDP_PAYLOAD, bool(f & 1)) for f in range(4))


def upstream_query(key: bytes, question: bytes) -> bytes:
    """The query sent upstream for cache ``key`` and its ``question`` section."""
    f = key[-1]
    return _UPSTREAM_HEAD[f] + question + _UPSTREAM_OPT[f]


def key_flags(key: bytes) -> tuple[bool, bool]:
    """``(do, cd)`` from a cache key."""
    b = key[-1]
    return bool(b & 1), bool(b & 2)


def key_qtype(key: bytes) -> int:
    return (key[-5] << 8) | key[-4]


def key_qname(key: bytes) -> bytes:
    return key[:-5]
