"""DNS over TLS against a real server: Unbound from Debian with ``tls-port``.

Unbound serves the test zone of ``test_real`` (refusing every other name) on a plain port,
for its own readiness probe, and on a TLS port with a certificate of a test CA made here
(``certs.Pki``). dnsproxy runs as a process in front of the TLS port, configured as a user
would (the mapping form of an upstream, with ``ca_file``). Unbound's statistics say how
the queries reached it: ``num.query.tls`` (TLS, counted in ``num.query.tcp`` too) and
``num.query.tls.resume`` (queries on resumed TLS sessions).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from certs import Pki
from test_process import DnsProxyProcess, async_dnsproxy_process, dnsproxy_process, free_port
from test_real import Unbound, dig, metrics, start_unbound

NAME = "dot.test"


@dataclass
class DotServer:
    unbound: Unbound
    tls_port: int
    pki: Pki

    def counts(self) -> dict[str, float]:
        """Queries so far: total, over TLS, over plain TCP, over UDP, on resumed sessions."""
        s = self.unbound.stats()
        total, tcp, tls_ = s["total.num.queries"], s["num.query.tcp"], s["num.query.tls"]
        return {
            "total": total,
            "tls": tls_,
            "plain_tcp": tcp - tls_,
            "udp": total - tcp,
            "resumed": s["num.query.tls.resume"],
        }


@contextlib.contextmanager
def start_dot(directory: Path, pki: Pki, **kind: bool) -> Iterator[DotServer]:
    cert, key = pki.leaf(NAME, **kind)
    tls_port = free_port()
    extra = [
        f"interface: 127.0.0.1@{tls_port}",
        f"tls-port: {tls_port}",
        f'tls-service-key: "{key}"',
        f'tls-service-pem: "{cert}"',
    ]
    with start_unbound(directory, extra) as unbound:
        yield DotServer(unbound, tls_port, pki)


def proxy_config(directory: Path, server: DotServer, name: str = NAME, *extra: str) -> Path:
    """A configuration forwarding everything to ``server`` over TLS."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "dot.yaml"
    path.write_text(
        "\n".join(
            [
                *extra,
                "zones:",
                '  - zone: "."',
                "    upstreams:",
                f'      - address: "tls://127.0.0.1:{server.tls_port}"',
                f"        tls_server_name: {name}",
                f'        ca_file: "{server.pki.ca}"',
                "",
            ]
        )
    )
    return path


def metric_sum(proxy: DnsProxyProcess, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in metrics(proxy).splitlines():
        if not line.startswith(name + "{"):
            continue
        key, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def dot(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DotServer]:
    with start_dot(tmp_path_factory.mktemp("unbound-dot"), pki) as server:
        yield server


def test_queries_resolve_over_tls_and_nothing_goes_in_the_clear(
    dot: DotServer, tmp_path: Path
) -> None:
    with dnsproxy_process(tmp_path, "--config", str(proxy_config(tmp_path, dot))) as proxy:
        before = dot.counts()
        assert dig(proxy.port, "www.test", "A", "+short") == "169.254.1.1\n"
        assert dig(proxy.port, "www.test", "AAAA", "+tcp", "+short") == "2001:db8::1\n"
        assert dig(proxy.port, "test", "MX", "+short") == "10 mail.test.\n"
        assert "status: NXDOMAIN" in dig(proxy.port, "absent.test", "A")
        after = dot.counts()
        assert after["tls"] - before["tls"] == 4
        assert after["total"] - before["total"] == 4
        assert after["plain_tcp"] == before["plain_tcp"]
        assert after["udp"] == before["udp"]
        assert metric_sum(proxy, "dnsproxy_upstream_tls_handshakes_total") == 1
        assert metric_sum(proxy, "dnsproxy_upstream_transport", transport="tls") == 1


async def test_a_hundred_concurrent_misses_share_a_few_tls_connections(
    dot: DotServer, tmp_path: Path
) -> None:
    path = proxy_config(tmp_path, dot)
    async with async_dnsproxy_process(tmp_path, "--config", str(path)) as proxy:
        before = await asyncio.to_thread(dot.counts)
        queries = [dns.message.make_query(f"miss-{i}.test", "A") for i in range(100)]
        replies = await asyncio.gather(
            *(dns.asyncquery.udp(q, "127.0.0.1", port=proxy.port, timeout=5) for q in queries)
        )
        assert {r.rcode() for r in replies} == {dns.rcode.NXDOMAIN}
        after = await asyncio.to_thread(dot.counts)
        assert after["tls"] - before["tls"] == 100
        handshakes = await asyncio.to_thread(
            metric_sum, proxy, "dnsproxy_upstream_tls_handshakes_total"
        )
        # The pool keeps two connections (upstream.tcp_connections): two handshakes.
        assert 1 <= handshakes <= 2


def test_a_new_connection_resumes_the_tls_session(dot: DotServer, tmp_path: Path) -> None:
    # Connections are rotated quickly, so that every query after the first needs a new
    # one; each resumes the session of the one before.
    path = proxy_config(tmp_path, dot, NAME, "upstream: {connection_max_age_s: 0.2}")
    with dnsproxy_process(tmp_path, "--config", str(path)) as proxy:
        before = dot.counts()
        for i in range(4):
            assert "status: NXDOMAIN" in dig(proxy.port, f"resume-{i}.test", "A")
            for _ in range(100):  # wait until the connection is retired and closed
                if metric_sum(proxy, "dnsproxy_upstream_open_connections") == 0:
                    break
                time.sleep(0.05)
        after = dot.counts()
        resumed = metric_sum(proxy, "dnsproxy_upstream_tls_handshakes_total", resumed="true")
        assert metric_sum(proxy, "dnsproxy_upstream_tls_handshakes_total") == 4
        assert resumed == 3
        assert after["resumed"] - before["resumed"] == 3  # Unbound saw the same


@pytest.mark.parametrize(
    ("kind", "reason", "logged"),
    [
        ("wrong_name", "name_mismatch", "Hostname mismatch, certificate is not valid for"),
        ("expired", "expired", "certificate has expired"),
        ("self_signed", "untrusted", "self-signed certificate"),
    ],
)
def test_refused_certificates_are_logged_counted_and_the_server_marked_down(
    pki: Pki, tmp_path: Path, kind: str, reason: str, logged: str
) -> None:
    flags = {"expired": kind == "expired", "self_signed": kind == "self_signed"}
    name = "wrong.test" if kind == "wrong_name" else NAME
    with start_dot(tmp_path / "unbound", pki, **flags) as server:
        path = proxy_config(tmp_path / "proxy", server, name)
        with dnsproxy_process(tmp_path, "--config", str(path)) as proxy:
            before = server.counts()
            out = dig(proxy.port, "www.test", "A")
            assert "status: SERVFAIL" in out, out
            assert server.counts()["total"] == before["total"]  # nothing reached Unbound
            assert metric_sum(proxy, "dnsproxy_upstream_tls_failures_total", reason=reason) >= 1
            assert metric_sum(proxy, "dnsproxy_upstream_up") == 0
            label = f"tls://127.0.0.1:{server.tls_port}#{name}"
            assert f"{label}: certificate verification failed: " in proxy.stderr
            assert logged in proxy.stderr
