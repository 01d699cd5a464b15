"""DNS over TLS upstreams against an in-process TLS server with certificates made here.

The fake upstream serves DNS over TLS with a certificate of the test CA (``certs.Pki``);
each test builds a ``tls://`` upstream the way the configuration would and checks what a
user would see: answers, connections and handshakes, refused certificates with their
reason in the log and the metrics, no query ever sent without TLS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from certs import Pki
from conftest import RECORDS, running, wait_for
from fakeupstream import Close, Delay, FakeUpstream, first_then, zone_handler

from dnsproxy.config import (
    Config,
    HostPort,
    TlsConfig,
    UpstreamConfig,
    UpstreamPoolConfig,
    ZoneConfig,
)
from dnsproxy.upstream import TlsUpstream, UpstreamError, UpstreamTimeout, make_upstream

NAME = "dot.test"
MakeTls = Callable[..., TlsUpstream]


def query(name: str = "www.example.", rdtype: str = "A") -> bytes:
    return dns.message.make_query(name, rdtype).to_wire()


def addresses(reply: bytes) -> list[str]:
    return [rd.to_text() for rrset in dns.message.from_wire(reply).answer for rd in rrset]


def tls_config(
    fake: FakeUpstream, pki: Pki, name: str | None = NAME, **settings: Any
) -> UpstreamConfig:
    settings.setdefault("ca_file", str(pki.ca))
    return UpstreamConfig("tls", fake.host, fake.port, TlsConfig(server_name=name, **settings))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def make(pki: Pki) -> AsyncIterator[MakeTls]:
    made: list[TlsUpstream] = []

    def factory(fake: FakeUpstream, name: str | None = NAME, **kw: Any) -> TlsUpstream:
        settings = {k: kw.pop(k) for k in list(kw) if k in TlsConfig.__dataclass_fields__}
        upstream = make_upstream(tls_config(fake, pki, name, **settings), UpstreamPoolConfig(**kw))
        assert isinstance(upstream, TlsUpstream)
        made.append(upstream)
        return upstream

    yield factory
    for upstream in made:
        await upstream.close()


async def test_queries_resolve_over_tls_on_a_few_connections(pki: Pki, make: MakeTls) -> None:
    base = zone_handler(RECORDS)
    context = pki.server_context(NAME)
    # Replies come back late and out of order, so that the queries pile up in flight.
    async with FakeUpstream(lambda m, t: Delay(0.05, base(m, t)), tls=context) as fake:
        up = make(fake)
        replies = await asyncio.gather(*(up.query(query(), 5.0) for _ in range(100)))
        assert all(addresses(r) == ["169.254.1.1"] for r in replies)
        assert {transport for transport, _ in fake.queries} == {"tls"}
        assert len(fake.queries) == 100
        # 100 concurrent queries share the pool's two connections: two handshakes.
        assert fake.tcp_connections == up.stats.connects == 2
        assert up.tls_stats.handshakes == 2
        assert up.stats.replies == 100 and up.stats.inflight == 0


@pytest.mark.parametrize(
    ("kind", "reason", "logged"),
    [
        ("wrong_name", "name_mismatch", "Hostname mismatch, certificate is not valid for"),
        ("expired", "expired", "certificate has expired"),
        ("self_signed", "untrusted", "self-signed certificate"),
    ],
)
async def test_refused_certificates_are_logged_counted_and_never_bypassed(
    pki: Pki, make: MakeTls, caplog: pytest.LogCaptureFixture, kind: str, reason: str, logged: str
) -> None:
    name = "other.test" if kind == "wrong_name" else NAME
    flags = {"expired": kind == "expired", "self_signed": kind == "self_signed"}
    async with FakeUpstream(zone_handler(RECORDS), tls=pki.server_context(name, **flags)) as fake:
        up = make(fake)
        with (
            caplog.at_level(logging.WARNING, logger="dnsproxy.upstream"),
            pytest.raises(UpstreamError) as info,
        ):
            await up.query(query(), 2.0)
        assert not isinstance(info.value, UpstreamTimeout)
        assert logged in str(info.value)
        [record] = [r for r in caplog.records if "certificate verification failed" in r.message]
        assert record.message.startswith(f"{up.label}: certificate verification failed: ")
        assert logged in record.message
        assert up.tls_stats.failures[reason] == 1
        assert sum(up.tls_stats.failures.values()) == 1
        assert up.tls_stats.handshakes == up.stats.connects == 0
        assert up.stats.connect_failures == 1
        # Nothing reached the server: no handshake completed, no query went without TLS.
        assert fake.tcp_connections == 0 and fake.queries == []


async def test_server_dropping_the_connection_mid_pipeline_is_retried_once(
    pki: Pki, make: MakeTls
) -> None:
    closes_first = first_then([Close()], zone_handler(RECORDS))
    async with FakeUpstream(closes_first, tls=pki.server_context(NAME)) as fake:
        up = make(fake)
        reply = await up.query(query(), 2.0)
        assert addresses(reply) == ["169.254.1.1"]
        assert up.stats.retries == 1 and up.stats.failures == 0
        assert fake.tcp_connections == 2
    async with FakeUpstream(lambda m, t: Close(), tls=pki.server_context(NAME)) as fake:
        up = make(fake)
        with pytest.raises(UpstreamError):
            await up.query(query(), 2.0)
        assert up.stats.retries == 1 and up.stats.failures == 1
        assert len(fake.queries) == 2


async def test_a_new_connection_resumes_the_last_session(pki: Pki, make: MakeTls) -> None:
    async with FakeUpstream(zone_handler(RECORDS), tls=pki.server_context(NAME)) as fake:
        up = make(fake, connection_max_age_s=0.05, tcp_connections=1)
        for _ in range(3):
            await up.query(query(), 2.0)
            # Retired by age once its query is done: the next query opens a new one.
            assert await wait_for(lambda: up.stats.open_connections == 0)
        assert up.tls_stats.handshakes == fake.tcp_connections == 3
        assert up.tls_stats.resumed == fake.tls_resumed == 2


async def test_mutual_tls(pki: Pki, make: MakeTls) -> None:
    context = pki.server_context(NAME)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(pki.ca)
    cert, key = pki.leaf("client.test", client=True)
    async with FakeUpstream(zone_handler(RECORDS), tls=context) as fake:
        up = make(fake, client_cert_file=str(cert), client_key_file=str(key))
        assert addresses(await up.query(query(), 2.0)) == ["169.254.1.1"]
        # Without a client certificate the server ends the connection after the
        # handshake (TLS 1.3 sends the client's certificate last), and never reads the
        # query.
        anonymous = make(fake)
        with pytest.raises(UpstreamError):
            await anonymous.query(query(), 2.0)
        assert anonymous.failure.startswith("closes connections without answering")
        assert len(fake.queries) == 1


async def test_insecure_accepts_any_certificate_and_says_so(
    pki: Pki, make: MakeTls, caplog: pytest.LogCaptureFixture
) -> None:
    context = pki.server_context("somewhere.else", self_signed=True)
    async with FakeUpstream(zone_handler(RECORDS), tls=context) as fake:
        with caplog.at_level(logging.WARNING, logger="dnsproxy.upstream"):
            up = make(fake, name=None, insecure=True)
        assert any("NOT checked" in r.message for r in caplog.records)
        assert addresses(await up.query(query(), 2.0)) == ["169.254.1.1"]


async def test_no_tls_server_is_a_failed_connection_not_plain_dns(pki: Pki, make: MakeTls) -> None:
    # A plain TCP DNS server where TLS is expected reads the TLS hello as the start of a
    # (very long) DNS message and waits for the rest: no handshake, and no query in clear.
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        up = make(fake, connect_timeout_s=0.2)
        with pytest.raises(UpstreamError):
            await up.query(query(), 2.0)
        assert up.failure == "completes no TLS handshake within 0.2s"
        assert up.stats.connect_failures == 1
        assert fake.queries == []


def _config(upstream: UpstreamConfig) -> Config:
    zone = ZoneConfig(zone=".", upstreams=(upstream,), try_timeout_s=1.0, deadline_s=2.0)
    return Config(listen=(HostPort("127.0.0.1", 0),), zones=(zone,))


async def test_proxy_marks_a_server_with_a_bad_certificate_down(pki: Pki) -> None:
    context = pki.server_context(NAME, expired=True)
    async with (
        FakeUpstream(zone_handler(RECORDS), tls=context) as fake,
        running(_config(tls_config(fake, pki))) as app,
    ):
        port = app.listen[0].port
        reply = await dns.asyncquery.udp(
            dns.message.make_query("www.example.", "A"), "127.0.0.1", port=port, timeout=5
        )
        assert reply.rcode() == dns.rcode.SERVFAIL
        server = next(iter(app.forwarder.servers.values()))
        assert await wait_for(lambda: not server.up)
        upstream = server.upstream
        assert isinstance(upstream, TlsUpstream)
        assert upstream.tls_stats.failures["expired"] >= 1
        assert fake.queries == []
