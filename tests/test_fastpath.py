"""The inlined UDP cache-hit fast path answers byte for byte as the general path does.

``server._UdpListener._readable`` answers a repeated query (recognised by its bytes after
the ID) from the cache with an inlined copy of what ``_Handler.serve`` and
:func:`dnsproxy.wire.splice` do, because that is what makes hits fast. Over a corpus of
queries (EDNS or not, DO, CD, AD, RD clear, 0x20 case, answers too big for the client)
and cached replies (positive, big, CNAME chain, NXDOMAIN, NODATA, SERVFAIL, AD set), the
first copy of each query takes the general path and the second, identical copy the fast
path, through a real UDP socket; both replies must be the same bytes. The server's clock
is pinned so that both see the same entry ages.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket

import dns.flags
import dns.message
import dns.rcode
import pytest
from conftest import make_config, running
from dnsmsg import reply_to, rrset

from dnsproxy import wire
from dnsproxy.cache import make_entry
from dnsproxy.config import CachePolicy

NOW = 10_000.0  # the server's pinned clock
SOA = rrset("example.", 300, "SOA", "ns.example. hostmaster.example. 1 2 3 4 60")

# name -> (reply builder for the query sent upstream, age of the entry in seconds)
REPLIES = {
    "www.example.": (lambda q: reply_to(q, [rrset("www.example.", 300, "A", "169.254.1.1")]), 0),
    "big.example.": (
        lambda q: reply_to(
            q, [rrset("big.example.", 120, "A", *(f"169.254.2.{i}" for i in range(1, 61)))]
        ),
        7,
    ),
    "alias.example.": (
        lambda q: reply_to(
            q,
            [
                rrset("alias.example.", 60, "CNAME", "www.example."),
                rrset("www.example.", 300, "A", "169.254.1.1"),
            ],
        ),
        3,
    ),
    "nope.example.": (lambda q: reply_to(q, authority=[SOA], rcode=dns.rcode.NXDOMAIN), 2),
    "empty.example.": (lambda q: reply_to(q, authority=[SOA]), 1),
    "broken.example.": (lambda q: reply_to(q, rcode=dns.rcode.SERVFAIL), 1),
    "signed.example.": (
        lambda q: reply_to(q, [rrset("signed.example.", 300, "A", "169.254.1.9")], flags=0x20),
        0,
    ),
}


def mixed_case(name: str, seed: int) -> str:
    """``name`` in a 0x20 pattern of upper and lower case."""
    return "".join(c.upper() if (seed >> (i % 8)) & 1 else c for i, c in enumerate(name))


def queries() -> list[bytes]:
    out = []
    combos = itertools.product(
        REPLIES,
        (None, 512, 1232, 4096),  # no EDNS, or the client's UDP size
        (False, True),  # DO
        (False, True),  # CD
        (False, True),  # AD
        (True, False),  # RD
    )
    for i, (name, size, do, cd, ad, rd) in enumerate(combos):
        if do and size is None:
            continue
        asked = mixed_case(name, i)
        q = dns.message.make_query(
            asked,
            "A",
            use_edns=size is not None,
            payload=size or 512,
            want_dnssec=do,
        )
        q.id = i
        if cd:
            q.flags |= dns.flags.CD
        if ad:
            q.flags |= dns.flags.AD
        if not rd:
            q.flags &= ~dns.flags.RD
        out.append(q.to_wire())
    return out


def fill(cache: object, corpus: list[bytes]) -> None:
    """Cache the reply to every corpus query's key, as the miss path would."""
    policy = CachePolicy()
    for data in corpus:
        key, qend, _ = wire.parse_query(data)
        question = data[wire.HEADER_LEN : qend]
        name = dns.message.from_wire(data).question[0].name.to_text().lower()
        build, age = REPLIES[name]
        upstream = dns.message.from_wire(wire.upstream_query(key, question))
        info = wire.inspect_response(build(upstream).to_wire())
        entry, cacheable = make_entry(info, policy, NOW - age)
        assert cacheable
        cache.put(key, entry, NOW - age)  # type: ignore[attr-defined]


@pytest.mark.parametrize("acl", [False, True])
async def test_fast_path_replies_equal_general_path_replies(acl: bool) -> None:
    corpus = queries()
    allow = (ipaddress.ip_network("127.0.0.0/8"),) if acl else ()
    # No upstream is ever asked: port 9 on loopback, every query is a hit.
    config = make_config(9, allow=allow, cache_max_entries=10 * len(corpus))
    async with running(config) as app:
        fill(app.cache, corpus)
        handler = app.server.handler
        handler.clock = lambda: NOW
        hp = app.listen[0]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            sock.connect((hp.host, hp.port))

            async def ask(data: bytes) -> bytes:
                await loop.sock_sendall(sock, data)
                return await asyncio.wait_for(loop.sock_recv(sock, 65535), 10)

            compared = truncated = 0
            for data in corpus:
                assert data[2:] not in handler.memo
                general = await ask(data)
                assert data[2:] in handler.memo, "a hit is remembered for the fast path"
                fast = await ask(data)
                assert fast == general, dns.message.from_wire(data).to_text()
                compared += 1
                truncated += bool(general[2] & 0x02)
        stats = app.server.stats
    assert compared == len(corpus) > 300
    assert truncated > 10, "answers too big for the client are in the corpus"
    assert stats.hits == 2 * len(corpus) and stats.misses == 0
