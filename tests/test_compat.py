"""The metrics around the core ones: client request durations, process metrics, the CoreDNS /
node-cache names behind ``metrics.coredns_names``, and per-query log lines as JSON fields.

dnsproxy runs in-process in front of the fake upstream (or as a real process for the log
format); dnspython asks; ``/metrics`` is read over HTTP and parsed with prometheus-client's
own text parser, so what is checked is what a Prometheus server would scrape.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import platform
import urllib.request
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from conftest import proxy_with
from fakeupstream import FakeUpstream, zone_handler
from prometheus_client.parser import text_string_to_metric_families
from test_process import RECORDS as PROCESS_RECORDS
from test_process import async_dnsproxy_process, running_loop_name

import dnsproxy
from dnsproxy.app import App

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# (sample name, label names) of the CoreDNS names without the node role; with it,
# coredns_nodecache_setup_errors_total{errortype} too (test_deploy_image.py, node tests).
COREDNS_CONTRACT = {
    ("coredns_build_info", ("goversion", "revision", "version")),
    ("coredns_cache_entries", ("type",)),
    ("coredns_cache_hits_total", ("type",)),
    ("coredns_cache_misses_total", ()),
    ("coredns_cache_prefetch_total", ()),
    ("coredns_cache_served_stale_total", ()),
    ("coredns_dns_request_duration_seconds_bucket", ("le",)),
    ("coredns_dns_request_duration_seconds_count", ()),
    ("coredns_dns_request_duration_seconds_sum", ()),
    ("coredns_dns_requests_total", ("proto", "type")),
    ("coredns_dns_responses_total", ("rcode",)),
    ("coredns_forward_healthcheck_failures_total", ("to",)),
    ("coredns_forward_max_concurrent_rejects_total", ()),
    ("coredns_forward_request_duration_seconds_bucket", ("le", "to")),
    ("coredns_forward_request_duration_seconds_count", ("to",)),
    ("coredns_forward_request_duration_seconds_sum", ("to",)),
    ("coredns_forward_requests_total", ("to",)),
    ("coredns_forward_responses_total", ("rcode", "to")),
}


async def scrape(app: App) -> Samples:
    """Every sample of ``/metrics``, keyed by (sample name, labels)."""
    assert app.http is not None
    url = f"http://127.0.0.1:{app.http.port}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    text = await asyncio.to_thread(get)
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not exported; have {sorted(n for n, _ in samples)}"
    return samples[key]


async def ask(app: App, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    hp = app.listen[0]
    q = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(q, hp.host, port=hp.port, timeout=5)
    return await dns.asyncquery.udp(q, hp.host, port=hp.port, timeout=5)


async def traffic(app: App) -> None:
    """3 UDP A (1 miss, 2 hits), 2 UDP NXDOMAIN AAAA (miss, denial hit), 2 TCP MX (miss, hit)."""
    for _ in range(3):
        await ask(app, "www.example.")
    for _ in range(2):
        reply = await ask(app, "nothere.example.", "AAAA")
        assert reply.rcode() == dns.rcode.NXDOMAIN
    for _ in range(2):
        await ask(app, "example.", "MX", tcp=True)


async def test_coredns_names_count_what_clients_asked() -> None:
    async with proxy_with(http=True, metrics_coredns_names=True) as (app, fake):
        await traffic(app)
        s = await scrape(app)
    to = f"127.0.0.1:{fake.port}"
    assert value(s, "coredns_dns_requests_total", proto="udp", type="A") == 3
    assert value(s, "coredns_dns_requests_total", proto="udp", type="AAAA") == 2
    assert value(s, "coredns_dns_requests_total", proto="tcp", type="MX") == 2
    assert value(s, "coredns_dns_responses_total", rcode="NOERROR") == 5
    assert value(s, "coredns_dns_responses_total", rcode="NXDOMAIN") == 2
    assert value(s, "coredns_cache_hits_total", type="success") == 3
    assert value(s, "coredns_cache_hits_total", type="denial") == 1
    assert value(s, "coredns_cache_misses_total") == 3
    assert value(s, "coredns_cache_entries", type="success") == 2
    # The NXDOMAIN is held for its question and for its name (RFC 2308 §5): two entries.
    assert value(s, "coredns_cache_entries", type="denial") == 2
    assert value(s, "dnsproxy_cache_entries", type="denial") == 2
    assert value(s, "coredns_forward_requests_total", to=to) == 3
    assert value(s, "coredns_forward_responses_total", rcode="NOERROR", to=to) == 2
    assert value(s, "coredns_forward_responses_total", rcode="NXDOMAIN", to=to) == 1
    assert value(s, "coredns_forward_healthcheck_failures_total", to=to) == 0
    assert value(s, "coredns_forward_request_duration_seconds_count", to=to) == 3
    build = {"version": dnsproxy.__version__, "goversion": platform.python_version()}
    assert value(s, "coredns_build_info", revision="dnsproxy", **build) == 1
    # Every answered query is in the client-facing histogram, under both names.
    for name in ("coredns_dns_request_duration_seconds", "dnsproxy_request_duration_seconds"):
        assert value(s, f"{name}_count") == 7
        assert value(s, f"{name}_bucket", le="+Inf") == 7
        assert 0 < value(s, f"{name}_sum") < 7 * 2.0
        # Cumulative buckets: CoreDNS's bounds, never decreasing.
        bounds = sorted(
            (float(dict(labels)["le"]), v) for (n, labels), v in s.items() if n == f"{name}_bucket"
        )
        assert bounds[0][0] == 0.00025 and bounds[-2][0] == 8.192
        assert all(a[1] <= b[1] for a, b in itertools.pairwise(bounds))
    # No node role here: node-cache's setup error counter only comes with it.
    coredns = {(n, tuple(sorted(k for k, _ in labels))) for n, labels in s if "coredns_" in n}
    assert coredns == COREDNS_CONTRACT


async def test_coredns_names_only_when_asked_for() -> None:
    async with proxy_with(http=True) as (app, _fake):
        await ask(app, "www.example.")
        s = await scrape(app)
    assert not [n for n, _ in s if n.startswith("coredns_")]
    assert value(s, "dnsproxy_request_duration_seconds_count") == 1
    assert value(s, "process_resident_memory_bytes") > 1_000_000
    assert value(s, "process_open_fds") > 0


async def test_every_query_answered_in_a_read_batch_is_timed() -> None:
    """Queries sent at once are read in batches: each answered one is in the histogram."""
    async with proxy_with(http=True) as (app, _fake):
        await ask(app, "www.example.")  # cached now
        hp = app.listen[0]
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _Collector(20), remote_addr=(hp.host, hp.port)
        )
        try:
            for i in range(20):
                q = dns.message.make_query("www.example.", "A", id=i + 1)
                transport.sendto(q.to_wire())
            await asyncio.wait_for(protocol.done, 5)
        finally:
            transport.close()
        s = await scrape(app)
    assert value(s, "dnsproxy_request_duration_seconds_count") == 21
    assert value(s, "dnsproxy_cache_hits_total") == 20


class _Collector(asyncio.DatagramProtocol):
    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.expected -= 1
        if self.expected == 0 and not self.done.done():
            self.done.set_result(None)


async def test_query_log_json_lines_carry_fields(tmp_path: Path) -> None:
    async with FakeUpstream(zone_handler(PROCESS_RECORDS)) as fake:
        config = tmp_path / "c.yaml"
        config.write_text(
            json.dumps(
                {
                    "zones": [{"zone": ".", "upstreams": [f"127.0.0.1:{fake.port}"]}],
                    "log": {"format": "json", "queries": True},
                }
            )
        )
        async with async_dnsproxy_process(
            tmp_path, "--config", str(config), loop=running_loop_name()
        ) as proxy:
            for proto in ("udp", "udp", "tcp"):
                q = dns.message.make_query("www.example.", "AAAA")
                if proto == "udp":
                    await dns.asyncquery.udp(q, "127.0.0.1", port=proxy.port, timeout=5)
                else:
                    await dns.asyncquery.tcp(q, "127.0.0.1", port=proxy.port, timeout=5)
            lines: list[dict[str, object]] = []

            def logged() -> bool:
                lines[:] = [
                    json.loads(line)
                    for line in proxy.stderr.splitlines()
                    if '"logger":"dnsproxy.query"' in line
                ]
                return len(lines) == 3

            for _ in range(100):
                if logged():
                    break
                await asyncio.sleep(0.05)
            assert len(lines) == 3, proxy.stderr
    miss, hit, tcp = lines
    assert miss["client"] == "127.0.0.1" and miss["proto"] == "udp"
    assert miss["name"] == "www.example." and miss["type"] == "AAAA"
    assert miss["rcode"] == "NOERROR" and miss["cache"] == "miss"
    assert miss["upstream"] == f"tcp://127.0.0.1:{fake.port}"
    assert hit["cache"] == "hit" and hit["upstream"] is None
    assert tcp["proto"] == "tcp" and tcp["cache"] == "hit"
    for line in lines:
        assert isinstance(line["duration_s"], float) and 0 <= line["duration_s"] < 2
        assert line["level"] == "info"


@pytest.mark.parametrize("flag", ["true", "false"])
def test_coredns_names_setting_is_validated(flag: str, tmp_path: Path) -> None:
    from dnsproxy.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    zones = 'zones: [{zone: ".", upstreams: ["127.0.0.1:53"]}]\n'
    path.write_text(f"{zones}metrics:\n  coredns_names: {flag}\n")
    assert load_config(str(path)).metrics_coredns_names is (flag == "true")
    path.write_text(f"{zones}metrics: {{coredns: 1}}\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert "metrics.coredns: unknown key (did you mean 'coredns_names'?)" in str(e.value)
