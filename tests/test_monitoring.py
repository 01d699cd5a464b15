"""The Grafana dashboard and the alerts against a live ``/metrics``, and the queries of a
NodeLocal DNSCache dashboard against dnsproxy's CoreDNS names.

Two dnsproxy instances run in-process with the node role (rules ``none``, no interface, so
no root is needed) and the CoreDNS names on: a healthy one in front of the fake upstream and
a broken one whose upstream refuses connections. The name check reads their ``/metrics``.
The evaluation runs a real Prometheus (Debian's ``prometheus`` package; skipped with the
reason where it is missing) scraping both every second, and asks it each query.

``NODELOCAL_DASHBOARD_QUERIES`` are the PromQL expressions of Gardener's NodeLocalDNS
dashboard (gardener/gardener, pkg/component/observability/plutono/dashboards/shoot/owners/
worker/dns/node-local-dns-dashboard.json at commit 956dfd5c582c, Apache-2.0), a dashboard
written for node-cache's metrics; only the expressions are taken, with Grafana's variables
(``$pod``, ``$__rate_interval``, ``$__interval``) left in to be substituted here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import pytest
import yaml
from conftest import RECORDS, ROOT, make_config, running, stop_process
from fakeupstream import FakeUpstream, zone_handler
from prometheus_client.parser import text_string_to_metric_families
from test_process import free_port, http_get

from dnsproxy.app import App
from dnsproxy.config import NodeConfig

MONITORING = ROOT / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "prometheusrule.yaml"
# Series Prometheus itself records for every target; not dnsproxy's to export.
PROMETHEUS_OWN = {"up"}

NODELOCAL_DASHBOARD_QUERIES = [
    'sum(rate(coredns_dns_request_duration_seconds_count{pod=~"$pod"}[$__rate_interval])) by (type)',  # noqa: E501
    'sum(rate(coredns_dns_request_duration_seconds_count{pod=~"$pod"}[$__rate_interval])) by (proto)',  # noqa: E501
    'sum(rate(coredns_dns_request_duration_seconds_count{pod=~"$pod"}[$__rate_interval])) by (zone)',  # noqa: E501
    'sum(rate(coredns_dns_requests_total{pod=~"$pod"}[$__rate_interval])) by (type)',
    'sum(rate(coredns_dns_requests_total{pod=~"$pod"}[$__rate_interval])) by (proto)',
    'sum(rate(coredns_dns_requests_total{pod=~"$pod"}[$__rate_interval])) by (zone)',
    'rate(coredns_dns_responses_total{pod=~"$pod"}[$__rate_interval])',
    'sum(coredns_dns_responses_total{pod=~"$pod"} - coredns_dns_responses_total{pod=~"$pod"} offset $__interval) by (rcode)',  # noqa: E501
    'histogram_quantile(0.99,sum(rate(coredns_dns_request_duration_seconds_bucket{pod=~"$pod"}[$__rate_interval])) by (le,type))',  # noqa: E501
    'sum by (le) (rate(coredns_dns_request_duration_seconds_bucket{pod=~"$pod"}[$__rate_interval]))',  # noqa: E501
    'rate(coredns_cache_hits_total{pod=~"$pod"}[$__rate_interval])',
    'rate(coredns_cache_misses_total{pod=~"$pod"}[$__rate_interval])',
    'sum(coredns_cache_hits_total{pod=~"$pod"} - coredns_cache_hits_total{pod=~"$pod"} offset $__interval)',  # noqa: E501
    'sum(coredns_cache_misses_total{pod=~"$pod"} - coredns_cache_misses_total{pod=~"$pod"} offset $__interval)',  # noqa: E501
    'sum(coredns_cache_entries{pod=~"$pod"}) by (type)',
    'sum(coredns_forward_requests_total{pod=~"$pod"} - coredns_forward_requests_total{pod=~"$pod"} offset $__interval) by (to)',  # noqa: E501
    'sum(rate(coredns_forward_requests_total{pod=~"$pod"}[$__rate_interval])) by (to)',
    'sum(coredns_forward_responses_total{pod=~"$pod"} - coredns_forward_responses_total{pod=~"$pod"} offset $__interval) by (to,rcode)',  # noqa: E501
    'rate(coredns_forward_responses_total{pod=~"$pod"}[$__rate_interval])',
    'sum(rate(coredns_nodecache_setup_errors_total{pod=~"$pod"}[$__rate_interval])) by (errortype)',
]  # fmt: skip
# Its template variable: label_values(coredns_build_info, pod).
NODELOCAL_VARIABLE_METRIC = "coredns_build_info"


# -- reading PromQL


_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
    "and", "or", "unless", "inf", "nan", "le",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed)."""
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # ranges
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    text = re.sub(r"\b\d[\w.]*", "", text)  # numbers and durations
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[m.end() :].lstrip()
        if following.startswith("(") or m[0] in _KEYWORDS:
            continue
        names.add(m[0])
    return names


def test_metric_names_reads_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, upstream) (rate(a_bucket{job=~"$job"}[5m])))'
        " / on (instance) group_left b_total offset 5m > bool 0 and c"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}


def dashboard_queries() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 13
    return exprs


def dashboard_variable_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    out = set()
    for var in doc["templating"]["list"]:
        query = var.get("query")
        if isinstance(query, dict):
            m = re.match(r"label_values\((\w+)", query["query"])
            assert m, query
            out.add(m[1])
    return out


def rule_queries() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    assert doc["kind"] == "PrometheusRule"
    return {r["alert"]: r["expr"] for g in doc["spec"]["groups"] for r in g["rules"]}


# -- live dnsproxy instances


NODE = NodeConfig(local_ips=("169.254.20.10",), setup_interface=False, rules="none")


@asynccontextmanager
async def instances() -> AsyncIterator[tuple[App, App]]:
    """A healthy and a broken dnsproxy, both with the node role and the CoreDNS names."""
    dead = free_port()  # nothing listens: every connection is refused
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        healthy = make_config(fake.port, http=True, metrics_coredns_names=True, node=NODE)
        broken = dataclasses.replace(
            make_config(dead, http=True, metrics_coredns_names=True, node=NODE),
            cache=dataclasses.replace(healthy.cache, servfail_ttl_s=0),
        )
        async with running(healthy) as good, running(broken) as bad:
            yield good, bad


async def ask(app: App, name: str, rdtype: str = "A", tcp: bool = False) -> None:
    hp = app.listen[0]
    q = dns.message.make_query(name, rdtype)
    if tcp:
        await dns.asyncquery.tcp(q, hp.host, port=hp.port, timeout=5)
    else:
        await dns.asyncquery.udp(q, hp.host, port=hp.port, timeout=5)


async def traffic(good: App, bad: App) -> None:
    for _ in range(5):
        await ask(good, "www.example.")
        await ask(good, "www.example.", "AAAA", tcp=True)
        await ask(good, "nothere.example.")
    for i in range(4):
        await ask(bad, f"n{i}.example.")  # SERVFAIL; the upstream is marked down
    # A response sent to the server is dropped (and counted), as stray replies are.
    stray = dns.message.make_response(dns.message.make_query("www.example.", "A")).to_wire()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, remote_addr=(good.listen[0].host, good.listen[0].port)
    )
    transport.sendto(stray)
    transport.close()


_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}


async def keep_asking(app: App, count: int) -> None:
    for i in range(count):
        await ask(app, f"again{i}.example.")
        await asyncio.sleep(0.1)


async def sample_names(app: App) -> set[str]:
    """The sample names ``/metrics`` exports, also of families with no series yet."""
    assert app.http is not None
    _, text = await asyncio.to_thread(http_get, f"http://127.0.0.1:{app.http.port}/metrics")
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


async def test_dashboard_and_alerts_use_only_exported_metrics() -> None:
    async with instances() as (good, bad):
        await traffic(good, bad)
        exported = await sample_names(good) | await sample_names(bad)
    used: dict[str, set[str]] = {}
    for expr in [*dashboard_queries(), *rule_queries().values()]:
        for name in metric_names(expr):
            used.setdefault(name, set()).add(expr)
    for name in dashboard_variable_metrics():
        used.setdefault(name, set()).add("(template variable)")
    assert "dnsproxy_request_duration_seconds_bucket" in used  # the client latency panel
    missing = {n: e for n, e in used.items() if n not in exported and n not in PROMETHEUS_OWN}
    assert not missing, missing
    # And every CoreDNS name the NodeLocal dashboard reads is exported too.
    nodelocal = set().union(*(metric_names(q) for q in NODELOCAL_DASHBOARD_QUERIES))
    assert nodelocal | {NODELOCAL_VARIABLE_METRIC} <= exported


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (apt-get install prometheus)")
    doc = yaml.safe_load(RULES.read_text())
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": doc["spec"]["groups"]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rule_queries())} rules found" in result.stdout


# -- a real Prometheus


class Prometheus:
    def __init__(self, tmp_path: Path, targets: dict[str, int]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.skip("prometheus not installed (apt-get install prometheus)")
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "dnsproxy-metrics",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"pod": pod}}
                        for pod, port in targets.items()
                    ],
                }
            ],
        }
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log_path = tmp_path / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        status, body = http_get(url, timeout=10)
        doc = json.loads(body)
        assert status == 200 and doc["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = doc["data"]["result"]
        return result

    async def wait(self, what: str, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{self.log_path.read_text()}")
            try:
                if await asyncio.to_thread(predicate):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.2)

    def close(self) -> None:
        stop_process(self.proc, 10.0)
        self._log.close()


def grafana(expr: str, pod: str = ".*") -> str:
    """Grafana's variables as a dashboard over the last minute would fill them."""
    return (
        expr.replace("$__rate_interval", "1m")
        .replace("$__interval", "2s")
        .replace('"$pod"', f'"{pod}"')
        .replace('"$job"', '".*"')
        .replace('"$instance"', '".*"')
    )


def values(result: list[dict[str, Any]]) -> list[float]:
    return [float(r["value"][1]) for r in result]


@pytest.mark.timeout(180)
async def test_queries_evaluate_on_live_metrics(tmp_path: Path) -> None:
    async with instances() as (good, bad):
        assert good.http is not None and bad.http is not None
        failing: asyncio.Future[None] | None = None
        prom = Prometheus(
            tmp_path, {"dnsproxy-good": good.http.port, "dnsproxy-bad": bad.http.port}
        )
        try:

            def scraped_twice() -> bool:
                counts = values(prom.query("count_over_time(up[1m])"))
                return len(counts) == 2 and min(counts) >= 2

            await prom.wait("two scrapes of both targets", scraped_twice)
            await traffic(good, bad)
            # Counters must grow between scrapes for rate() to see them: the broken instance
            # keeps failing while Prometheus scrapes (bounded: at most 300 queries).
            failing = asyncio.ensure_future(keep_asking(bad, 300))
            scrapes_after = time.monotonic()
            await prom.wait(
                "scrapes after the traffic",
                lambda: (
                    values(prom.query('dnsproxy_cache_hits_total{pod="dnsproxy-good"}')) == [12.0]
                ),
            )
            await asyncio.sleep(max(0.0, 4.0 - (time.monotonic() - scrapes_after)))

            # A NodeLocal DNSCache dashboard's queries, on dnsproxy's CoreDNS names.
            for query in NODELOCAL_DASHBOARD_QUERIES:
                result = await asyncio.to_thread(prom.query, grafana(query))
                assert result, f"no series for {query}"
            hits = values(prom.query(grafana(NODELOCAL_DASHBOARD_QUERIES[10], "dnsproxy-good")))
            assert hits and all(v > 0 for v in hits)
            p99 = values(prom.query(grafana(NODELOCAL_DASHBOARD_QUERIES[8], "dnsproxy-good")))
            assert p99 and all(math.isfinite(v) and 0 < v < 2 for v in p99), p99
            pods = {r["metric"]["pod"] for r in prom.query(NODELOCAL_VARIABLE_METRIC)}
            assert pods == {"dnsproxy-good", "dnsproxy-bad"}

            # Our own dashboard: every query has series.
            for query in dashboard_queries():
                assert await asyncio.to_thread(prom.query, grafana(query)), query

            # The alerts: the broken instance and only it.
            rules = rule_queries()
            firing = {
                alert: {r["metric"].get("instance") for r in prom.query(expr)}
                for alert, expr in rules.items()
            }
            bad_instance = f"127.0.0.1:{bad.http.port}"
            assert firing["DnsproxyNoUpstreamUp"] == {bad_instance}
            assert firing["DnsproxyServfailRatioHigh"] == {bad_instance}
            assert firing["DnsproxyInstanceDown"] == set()
            assert firing["DnsproxyNodeSetupErrors"] == set()
            assert firing["DnsproxyCacheHitRatioCollapse"] == set()  # too little traffic
        finally:
            if failing is not None:
                failing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await failing
            prom.close()
