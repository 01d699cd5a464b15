"""`make run` on a machine whose resolver does not speak TCP: the auto transport.

Some resolvers (home routers, some cloud and corporate ones) accept a TCP connection and
close it without answering, or refuse it, while they answer over UDP. The shipped
configuration forwards to the nameservers of resolv.conf with the auto transport, so
dnsproxy answers through such a resolver from the first query on. Here the resolver is a
fake on a loopback address at port 53 (resolv.conf has no ports), and dnsproxy runs as
`make run` runs it: ``--config config/dnsproxy.yaml``, with ``--upstream`` pointing the
``.`` zone at a resolv.conf naming the fake, and free ports to listen on.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from fakeupstream import Action, Close, FakeUpstream, zone_handler
from test_process import DnsProxyProcess, async_dnsproxy_process, http_get, metric_value

RECORDS = {
    ("www.example.", "A"): ["169.254.1.1"],
    **{(f"h{i}.example.", "A"): [f"169.254.3.{i + 1}"] for i in range(30)},
}


def closes_tcp(msg: dns.message.Message, transport: str) -> Action:
    return Close() if transport == "tcp" else zone_handler(RECORDS)(msg, transport)


@pytest.fixture
async def resolver() -> AsyncIterator[FakeUpstream]:
    """The fake resolver on a loopback address of its own, port 53."""
    host = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
    fake = FakeUpstream(closes_tcp, host=host, port=53)
    try:
        await fake.start()
    except PermissionError:
        pytest.skip("binding port 53 needs root (or CAP_NET_BIND_SERVICE)")
    except OSError as exc:
        pytest.skip(f"cannot bind {host}:53: {exc}")
    try:
        yield fake
    finally:
        await fake.stop()


def make_run(
    resolver: FakeUpstream, tmp_path: Path, scheme: str = ""
) -> AbstractAsyncContextManager[DnsProxyProcess]:
    """dnsproxy as `make run` starts it, with a resolv.conf naming ``resolver`` (read with
    the transport ``scheme`` when given)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {resolver.host}\n")
    upstream = f"{scheme}resolv.conf:{resolv}"
    return async_dnsproxy_process(
        tmp_path, "--config", "config/dnsproxy.yaml", "--upstream", upstream
    )


async def test_make_run_answers_through_a_resolver_that_closes_tcp(
    resolver: FakeUpstream, tmp_path: Path
) -> None:
    async with make_run(resolver, tmp_path) as proxy:
        # The first query is answered: the zone's deadline (2 s) would have made it a
        # SERVFAIL otherwise.
        first = dns.message.make_query("www.example.", "A")
        reply = await dns.asyncquery.udp(first, "127.0.0.1", port=proxy.port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [rd.to_text() for rrset in reply.answer for rd in rrset] == ["169.254.1.1"]
        for i in range(21):
            query = dns.message.make_query(f"h{i}.example.", "A")
            reply = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=5)
            assert [rd.to_text() for rrset in reply.answer for rd in rrset] == [
                f"169.254.3.{i + 1}"
            ]
        # Two TCP connections (the first query's, and its one retry), then UDP only. The
        # first query is the loop check's probe at start; the 22 queries then all go over
        # UDP.
        assert resolver.tcp_connections == 2
        assert [t for t, _ in resolver.queries].count("udp") == 1 + 22
        _, page = http_get(proxy.url + "/metrics")
        label = f"auto://{resolver.host}:53"
        sample = f'dnsproxy_upstream_transport{{transport="%s",upstream="{label}"}}'
        assert metric_value(page, sample % "udp") == 1
        assert metric_value(page, sample % "tcp") == 0
        assert metric_value(page, f'dnsproxy_upstream_up{{upstream="{label}"}}') == 1
        stderr = proxy.stderr
        line = (
            f"{resolver.host}:53 closes connections without answering over TCP but answers "
            f"over UDP: using UDP for it (write udp://{resolver.host}:53 to silence this, or "
            "fix the server's TCP); TCP is tried again every 60s"
        )
        assert stderr.count(line) == 1, stderr


async def test_explicit_tcp_stays_tcp_only(resolver: FakeUpstream, tmp_path: Path) -> None:
    async with make_run(resolver, tmp_path, "tcp://") as proxy:
        query = dns.message.make_query("www.example.", "A")
        reply = await dns.asyncquery.udp(query, "127.0.0.1", port=proxy.port, timeout=5)
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert {t for t, _ in resolver.queries} == {"tcp"}
        # Two tries at the one server, each a connection and its retry at most, and the
        # pool backs off instead of reconnecting for every try.
        assert 2 <= resolver.tcp_connections <= 3
