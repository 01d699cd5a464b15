"""The metrics contract: every exported family, sample name and label set.

Dashboards, alerts and the README name these series, so a refactoring of who counts what
must not rename, retype or relabel any of them. The scenario below makes every family
carry samples (a hit, misses, NXDOMAIN, a TCP query, a dropped datagram, a dead upstream
beside a live one), and the exported set is compared with the contract.
"""

from __future__ import annotations

import asyncio
import socket

import dns.asyncquery
import dns.message
from conftest import RECORDS, make_config, running
from fakeupstream import FakeUpstream, zone_handler

from dnsproxy.config import TlsConfig, UpstreamConfig

# (family, type, sample name, label names) as exported since the first release.
CONTRACT = {
    ("dnsproxy_acl_refused", "counter", "dnsproxy_acl_refused_total", ()),
    (
        "dnsproxy_build_info",
        "gauge",
        "dnsproxy_build_info",
        ("compiled", "loop", "python", "version"),
    ),
    ("dnsproxy_cache_bytes", "gauge", "dnsproxy_cache_bytes", ()),
    ("dnsproxy_cache_capacity", "gauge", "dnsproxy_cache_capacity", ()),
    ("dnsproxy_cache_prefetch", "counter", "dnsproxy_cache_prefetch_total", ()),
    ("dnsproxy_cache_prefetch_skipped", "counter", "dnsproxy_cache_prefetch_skipped_total", ()),
    ("dnsproxy_cache_served_stale", "counter", "dnsproxy_cache_served_stale_total", ()),
    ("dnsproxy_cache_entries", "gauge", "dnsproxy_cache_entries", ("type",)),
    ("dnsproxy_cache_evictions", "counter", "dnsproxy_cache_evictions_total", ()),
    ("dnsproxy_cache_hits", "counter", "dnsproxy_cache_hits_total", ()),
    ("dnsproxy_cache_misses", "counter", "dnsproxy_cache_misses_total", ()),
    ("dnsproxy_coalesced", "counter", "dnsproxy_coalesced_total", ()),
    ("dnsproxy_config_info", "gauge", "dnsproxy_config_info", ("hash",)),
    (
        "dnsproxy_config_loaded_timestamp_seconds",
        "gauge",
        "dnsproxy_config_loaded_timestamp_seconds",
        (),
    ),
    ("dnsproxy_handover_cache_entries", "gauge", "dnsproxy_handover_cache_entries", ()),
    ("dnsproxy_reload_failures", "counter", "dnsproxy_reload_failures_total", ()),
    ("dnsproxy_reloads", "counter", "dnsproxy_reloads_total", ()),
    ("dnsproxy_start_info", "gauge", "dnsproxy_start_info", ("how",)),
    ("dnsproxy_dropped", "counter", "dnsproxy_dropped_total", ("reason",)),
    ("dnsproxy_forward_rejects", "counter", "dnsproxy_forward_rejects_total", ("reason",)),
    ("dnsproxy_inflight", "gauge", "dnsproxy_inflight", ()),
    ("dnsproxy_nxdomain_name_hits", "counter", "dnsproxy_nxdomain_name_hits_total", ()),
    ("dnsproxy_requests", "counter", "dnsproxy_requests_total", ("proto",)),
    ("dnsproxy_requests_by_type", "counter", "dnsproxy_requests_by_type_total", ("type",)),
    ("dnsproxy_responses", "counter", "dnsproxy_responses_total", ("rcode",)),
    ("dnsproxy_tcp_clients", "gauge", "dnsproxy_tcp_clients", ()),
    ("dnsproxy_udp_receive_drops", "counter", "dnsproxy_udp_receive_drops_total", ("listener",)),
    *(
        (f"dnsproxy_upstream_{name}", "counter", f"dnsproxy_upstream_{name}_total", ("upstream",))
        for name in (
            "bad_replies",
            "connect_failures",
            "connects",
            "failures",
            "healthcheck_failures",
            "pool_full",
            "queries",
            "replies",
            "retries",
            "tc_fallbacks",
            "timeouts",
        )
    ),
    ("dnsproxy_upstream_inflight", "gauge", "dnsproxy_upstream_inflight", ("upstream",)),
    (
        "dnsproxy_upstream_open_connections",
        "gauge",
        "dnsproxy_upstream_open_connections",
        ("upstream",),
    ),
    ("dnsproxy_upstream_up", "gauge", "dnsproxy_upstream_up", ("upstream",)),
    (
        "dnsproxy_upstream_transport",
        "gauge",
        "dnsproxy_upstream_transport",
        ("transport", "upstream"),
    ),
    (
        "dnsproxy_upstream_tls_handshakes",
        "counter",
        "dnsproxy_upstream_tls_handshakes_total",
        ("resumed", "upstream"),
    ),
    (
        "dnsproxy_upstream_tls_failures",
        "counter",
        "dnsproxy_upstream_tls_failures_total",
        ("reason", "upstream"),
    ),
    ("dnsproxy_upstream_servfail", "counter", "dnsproxy_upstream_servfail_total", ()),
    *(
        ("dnsproxy_upstream_request_duration_seconds", "histogram", name, labels)
        for name, labels in (
            ("dnsproxy_upstream_request_duration_seconds_bucket", ("le", "upstream")),
            ("dnsproxy_upstream_request_duration_seconds_count", ("upstream",)),
            ("dnsproxy_upstream_request_duration_seconds_sum", ("upstream",)),
        )
    ),
    # The client-facing request duration (the dashboard's latency panel).
    *(
        ("dnsproxy_request_duration_seconds", "histogram", name, labels)
        for name, labels in (
            ("dnsproxy_request_duration_seconds_bucket", ("le",)),
            ("dnsproxy_request_duration_seconds_count", ()),
            ("dnsproxy_request_duration_seconds_sum", ()),
        )
    ),
    # prometheus-client's process collector (the dashboard's memory panel).
    ("process_cpu_seconds", "counter", "process_cpu_seconds_total", ()),
    *(
        (name, "gauge", name, ())
        for name in (
            "process_max_fds",
            "process_open_fds",
            "process_resident_memory_bytes",
            "process_start_time_seconds",
            "process_virtual_memory_bytes",
        )
    ),
}


async def test_exported_names_and_labels_are_the_contract() -> None:
    with socket.socket() as closed:  # a port nothing listens on: the dead upstream
        closed.bind(("127.0.0.1", 0))
        dead_port = closed.getsockname()[1]
    async with FakeUpstream(zone_handler(RECORDS)) as good:
        dead = UpstreamConfig("tcp", "127.0.0.1", dead_port)
        # Never reached (the first server answers); it brings the TLS families.
        tls = UpstreamConfig("tls", "127.0.0.1", dead_port, TlsConfig(server_name="dot.test"))
        config = make_config(good.port, extra_upstreams=(dead, tls))
        async with running(config) as app:
            host, port = app.listen[0].host, app.listen[0].port
            for name in ("www.example.", "www.example.", "nope.example."):
                query = dns.message.make_query(name, "A")
                await dns.asyncquery.udp(query, host, port=port, timeout=5)
            query = dns.message.make_query("www.example.", "AAAA")
            await dns.asyncquery.tcp(query, host, port=port, timeout=5)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.sendto(b"\x00", (host, port))  # too short: dropped and counted
            for _ in range(200):
                if app.server.stats.dropped:
                    break
                await asyncio.sleep(0.01)
            families = list(app.registry.collect())
    exported = {
        (family.name, family.type, sample.name, tuple(sorted(sample.labels)))
        for family in families
        for sample in family.samples
    }
    assert exported == CONTRACT
    # One family per name: a name exported twice is a broken exposition.
    names = [family.name for family in families]
    assert len(names) == len(set(names))
    upstreams = {
        sample.labels["upstream"]
        for family in families
        if family.name == "dnsproxy_upstream_queries"
        for sample in family.samples
    }
    assert upstreams == {
        f"tcp://127.0.0.1:{good.port}",
        f"tcp://127.0.0.1:{dead_port}",
        f"tls://127.0.0.1:{dead_port}#dot.test",
    }
