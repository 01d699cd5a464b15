"""What clients see at the edges, end to end with dnspython against dnsproxy in-process:
large answers cut to the client's size, the advertised EDNS size, meta-type queries, RA on
error replies, and the UDP listeners' receive buffer and kernel drop counter.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import urllib.request
from pathlib import Path

import dns.asyncquery
import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdatatype
import pytest
from conftest import dnsproxy_cmd, proxy_with
from fakeupstream import Action, Drop, FakeUpstream, SyncHandler, zone_handler
from test_process import free_port
from test_reload import HOST, app_from, doc_for, write

from dnsproxy.app import App
from dnsproxy.config import ServerLimits

MANY = [f"169.254.{i // 200}.{i % 200 + 1}" for i in range(100)]


def addr(app: App) -> tuple[str, int]:
    hp = app.listen[0]
    return hp.host, hp.port


def many_handler() -> SyncHandler:
    """The RECORDS-style zone with many.example. holding 100 A records (about 1.6 KB),
    sent whole whatever size our upstream query advertised (as over TCP)."""
    inner = zone_handler({("many.example.", "A"): MANY})

    def handler(query: dns.message.Message, transport: str) -> Action:
        reply = inner(query, transport)
        assert isinstance(reply, dns.message.Message)
        return reply.to_wire(max_size=65535)

    return handler


async def udp(app: App, query: dns.message.Message) -> dns.message.Message:
    host, port = addr(app)
    return await dns.asyncquery.udp(query, host, port=port, timeout=5, raise_on_truncation=False)


@pytest.mark.parametrize(
    ("payload", "max_udp", "kept"),
    [
        # many.example. A: 12 + 18 bytes of header and question, 16 per record, 11 of OPT.
        (None, 1232, 30),  # no EDNS: 512 bytes
        (4096, 1232, 74),  # at most our 1232: (1232 - 41) // 16
        (4096, 1400, 84),  # (1400 - 41) // 16
        (1300, 1400, 78),  # the client's own size when smaller: (1300 - 41) // 16
        (4096, 4096, 100),  # it all fits
    ],
)
async def test_udp_answer_fits_the_smaller_of_the_two_sizes(
    payload: int | None, max_udp: int, kept: int
) -> None:
    limits = ServerLimits(udp_payload_size=max_udp)
    async with proxy_with(many_handler(), limits=limits) as (app, fake):
        q = dns.message.make_query(
            "many.example.", "A", use_edns=0 if payload else False, payload=payload or 0
        )
        first = await udp(app, q)  # a miss, answered from the upstream's reply
        hit = await udp(app, q)  # a hit, validated and remembered
        fast = await udp(app, q)  # a hit on the fast path, recognised by its bytes
        host, port = addr(app)
        whole = await dns.asyncquery.tcp(q, host, port=port, timeout=5)
    assert len(whole.answer[0]) == 100
    for reply in (first, hit, fast):
        assert len(reply.to_wire()) <= (512 if payload is None else min(payload, max_udp))
        assert len(reply.answer[0]) == kept
        assert list(reply.answer[0]) == list(whole.answer[0])[:kept]
        assert bool(reply.flags & dns.flags.TC) == (kept < 100)
        if payload is not None:
            assert reply.payload == max_udp
    # The upstream is asked with our fixed 1232 whatever limits.udp_payload_size says.
    assert [q.payload for _, q in fake.queries] == [1232]


async def test_opt_type_query_gets_formerr_at_once() -> None:
    # The upstream drops everything: a forwarded query would end in SERVFAIL after the
    # deadline, so FORMERR proves it was answered without forwarding.
    async with proxy_with(lambda q, t: Drop(), deadline_s=30, try_timeout_s=30) as (app, fake):
        for edns in (False, 0):
            q = dns.message.make_query("www.example.", dns.rdatatype.OPT, use_edns=edns)
            reply = await udp(app, q)
            assert reply.rcode() == dns.rcode.FORMERR
            assert not reply.flags & dns.flags.RA
            assert reply.question[0].rdtype == dns.rdatatype.OPT
            assert reply.edns == (0 if edns is not False else -1)
        stats = app.server.stats
    assert fake.queries == []
    assert stats.invalid == {"meta_qtype": 2}


async def test_refusals_and_errors_carry_no_ra_but_badvers_does() -> None:
    import ipaddress

    async with proxy_with() as (app, _fake):
        host, port = addr(app)
        notify = dns.message.make_query("www.example.", "SOA")
        notify.set_opcode(dns.opcode.NOTIFY)
        notimp = await udp(app, notify)
        axfr = await dns.asyncquery.tcp(
            dns.message.make_query("example.", "AXFR"), host, port=port, timeout=5
        )
        ixfr = await udp(app, dns.message.make_query("example.", "IXFR"))
        badvers = await udp(app, dns.message.make_query("www.example.", "A", use_edns=1))
    nets = (ipaddress.ip_network("169.254.0.0/16"),)
    async with proxy_with(allow=nets) as (app, _fake):
        acl = await udp(app, dns.message.make_query("www.example.", "A"))
    assert badvers.rcode() == dns.rcode.BADVERS and badvers.flags & dns.flags.RA
    for reply, rcode in (
        (notimp, dns.rcode.NOTIMP),
        (axfr, dns.rcode.REFUSED),
        (ixfr, dns.rcode.REFUSED),
        (acl, dns.rcode.REFUSED),
    ):
        assert reply.rcode() == rcode
        assert not reply.flags & dns.flags.RA, reply


# --------------------------------------------------------------------------------------
# The UDP listener's receive buffer and the kernel's drops


def _listener_socket(app: App) -> socket.socket:
    (sock,) = [
        sock for (kind, _), socks in app.server.sockets().items() if kind == "udp" for sock in socks
    ]
    return sock


async def test_receive_buffer_setting_is_applied_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="dnsproxy.server")
    size = 1 << 20
    async with proxy_with(limits=ServerLimits(udp_rcvbuf=size)) as (app, _fake):
        granted = _listener_socket(app).getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    logged = [r.getMessage() for r in caplog.records if "receive buffer" in r.getMessage()]
    assert len(logged) == 1, logged
    assert re.search(rf"\b{granted} bytes\b", logged[0]), logged
    with open("/proc/sys/net/core/rmem_max") as f:
        rmem_max = int(f.read())
    forced = granted == 2 * size
    # Linux doubles what is set; SO_RCVBUFFORCE (root) passes net.core.rmem_max.
    assert forced or granted == 2 * min(size, rmem_max)
    if not forced:
        assert "raise net.core.rmem_max" in logged[0]


async def test_receive_buffer_zero_keeps_the_kernel_default() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
        default = fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    async with proxy_with(limits=ServerLimits(udp_rcvbuf=0)) as (app, _fake):
        assert _listener_socket(app).getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == default


def _scrape(app: App) -> str:
    assert app.http is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{app.http.port}/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def _drops(text: str, listener: str) -> float:
    sample = f'dnsproxy_udp_receive_drops_total{{listener="{listener}"}}'
    values = [
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(sample)
    ]
    assert len(values) == 1, f"{sample} not in /metrics"
    return values[0]


async def test_queries_dropped_at_a_full_socket_are_counted() -> None:
    # The smallest buffer the kernel allows holds a handful of queries. The event loop
    # is held by the sending loop below (no await in it), as a busy or stalled process
    # would be, so the listener reads nothing while 2,000 queries arrive.
    flood = 2000
    async with proxy_with(limits=ServerLimits(udp_rcvbuf=1024), http=True) as (app, _fake):
        host, port = addr(app)
        listener = f"{host}:{port}"
        before = _drops(await asyncio.to_thread(_scrape, app), listener)
        query = dns.message.make_query("www.example.", "A").to_wire()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(flood):
                sender.sendto(query, (host, port))
        text = await asyncio.to_thread(_scrape, app)
        # Whatever was queued is served once the loop runs again.
        reply = await udp(app, dns.message.make_query("www.example.", "A"))
    dropped = _drops(text, listener) - before
    assert 0 < dropped <= flood
    assert reply.rcode() == dns.rcode.NOERROR


def test_udp_rcvbuf_is_checked_with_its_key_path(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text('zones: [{zone: ".", upstreams: ["127.0.0.1"]}]\nlimits: {udp_rcvbuf: -1}\n')
    result = dnsproxy_cmd("check-config", str(config))
    assert result.returncode == 2
    assert "limits.udp_rcvbuf" in result.stdout + result.stderr


async def test_a_reload_changes_the_advertised_size_and_the_receive_buffer_at_once(
    tmp_path: Path,
) -> None:
    # The answer is cached and its per-second preparation made before the reload: the
    # first hit after it already carries the new size, and the open listener's buffer
    # is set again.
    path = tmp_path / "dnsproxy.yaml"
    port = free_port()
    query = dns.message.make_query("many.example.", "A", use_edns=0, payload=4096)
    async with FakeUpstream(many_handler()) as fake:
        write(path, doc_for(fake.port, [f"{HOST}:{port}"], limits={"udp_rcvbuf": 1 << 20}))
        async with app_from(path) as app:
            before = await dns.asyncquery.udp(query, HOST, port=port, timeout=5)
            await dns.asyncquery.udp(query, HOST, port=port, timeout=5)  # prepared now
            buffer_before = _listener_socket(app).getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
            limits = {"udp_payload_size": 1400, "udp_rcvbuf": 1 << 19}
            write(path, doc_for(fake.port, [f"{HOST}:{port}"], limits=limits))
            assert await app.reload("test")
            after = await dns.asyncquery.udp(
                query, HOST, port=port, timeout=5, raise_on_truncation=False
            )
            buffer_after = _listener_socket(app).getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # The answer after the reload came from the cache (the others are the loop probes
    # sent at start and before the reload was applied).
    asked = [q.question[0].rdtype for _, q in fake.queries]
    assert asked.count(dns.rdatatype.HINFO) == 2 and len(asked) == 3
    assert before.payload == 1232 and len(before.answer[0]) == 74
    assert after.payload == 1400 and len(after.answer[0]) == 84  # (1400 - 41) // 16
    assert buffer_before != buffer_after
