"""Configuration parsing and validation: every form, every error path with its key path."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any, cast

import jsonschema
import pytest
import yaml
from certs import Pki
from conftest import dnsproxy_cmd, undocumented_keys

from dnsproxy.config import (
    CachePolicy,
    Config,
    ConfigError,
    HandoverConfig,
    HostPort,
    LogConfig,
    Overrides,
    PrefetchConfig,
    ServerLimits,
    ServeStaleConfig,
    TlsConfig,
    UpstreamConfig,
    UpstreamPoolConfig,
    load_config,
    parse_config,
    parse_resolv_conf,
    parse_upstream,
)
from dnsproxy.config_schema import all_keys, documented_keys, json_schema, schema_text

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "dnsproxy.yaml"
NODELOCAL = SHIPPED.with_name("nodelocal.yaml")
SCHEMA = SHIPPED.with_name("dnsproxy.schema.json")
UPSTREAM = "127.0.0.1:5300"


def base_doc() -> dict[str, Any]:
    """A small valid document that tests mutate; upstreams never depend on the host."""
    return {
        "listen": ["127.0.0.1:5353"],
        "zones": [{"zone": ".", "upstreams": [UPSTREAM]}],
    }


def parse(doc: object, env: dict[str, str] | None = None, **kw: Any) -> Config:
    return parse_config(doc, env=env or {}, **kw)


def problems(doc: object, env: dict[str, str] | None = None, **kw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(doc, env, **kw)
    return info.value.problems


def tcp(host: str, port: int = 53) -> UpstreamConfig:
    return UpstreamConfig("tcp", host, port)


def tls(host: str, port: int, name: str | None, **settings: Any) -> UpstreamConfig:
    return UpstreamConfig("tls", host, port, TlsConfig(server_name=name, **settings))


# --- upstream forms ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", tcp("127.0.0.1")),
        ("127.0.0.1:5300", tcp("127.0.0.1", 5300)),
        ("  127.0.0.1:5300  ", tcp("127.0.0.1", 5300)),
        ("tcp://127.0.0.1:5300", tcp("127.0.0.1", 5300)),
        ("tcp://127.0.0.1", tcp("127.0.0.1")),
        ("udp://127.0.0.1:5300", UpstreamConfig("udp", "127.0.0.1", 5300)),
        ("UDP://169.254.20.10", UpstreamConfig("udp", "169.254.20.10", 53)),
        ("[2001:db8::1]:53", tcp("2001:db8::1")),
        ("[2001:db8::1]:5300", tcp("2001:db8::1", 5300)),
        ("[::1]", tcp("::1")),
        ("tcp://[::1]:5300", tcp("::1", 5300)),
        ("udp://[2001:db8::53]:5300", UpstreamConfig("udp", "2001:db8::53", 5300)),
        ("2001:db8::1", tcp("2001:db8::1")),
        ("2001:DB8:0:0::1", tcp("2001:db8::1")),
        ("127.0.0.1:65535", tcp("127.0.0.1", 65535)),
        ("127.0.0.1:1", tcp("127.0.0.1", 1)),
        ("auto://169.254.0.53", UpstreamConfig("auto", "169.254.0.53", 53)),
        ("auto://[2001:db8::53]:5300", UpstreamConfig("auto", "2001:db8::53", 5300)),
        ("tls://169.254.0.53#dns.example", tls("169.254.0.53", 853, "dns.example")),
        ("TLS://169.254.0.53:8853#DNS.Example.", tls("169.254.0.53", 8853, "dns.example")),
        ("tls://[2001:db8::53]#dns.example", tls("2001:db8::53", 853, "dns.example")),
        ("tls://[2001:db8::53]:853#2001:db8::53", tls("2001:db8::53", 853, "2001:db8::53")),
    ],
)
def test_upstream_forms(text: str, expected: UpstreamConfig) -> None:
    assert parse_upstream(text, "zones[0].upstreams[0]") == [expected]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1:70000", "port 70000 out of range"),
        ("127.0.0.1:0", "port 0 out of range"),
        ("127.0.0.1:dns", "port 'dns' is not a number"),
        ("127.0.0.1:", "port '' is not a number"),
        ("kube-dns.kube-system.svc.cluster.local", "is a hostname; an IP address is required"),
        ("tcp://localhost:53", "'localhost' is a hostname"),
        ("127.0.0.256", "'127.0.0.256' is not a valid IP address"),
        ("https://127.0.0.1:443", "unsupported scheme 'https://'"),
        ("tls://127.0.0.1:853", "needs the server's name after '#' (tls://127.0.0.1:853#"),
        ("tls://127.0.0.1#", "'' is not a valid server name"),
        ("tls://127.0.0.1#bad..name", "'bad..name' is not a valid server name"),
        ("tcp://127.0.0.1#dns.example", "a server name only goes with tls://"),
        ("127.0.0.1#dns.example", "a server name only goes with tls://"),
        ("tls://resolv.conf", "tls:// cannot take resolv.conf"),
        ("[::1:53", "missing the closing ']'"),
        ("[::1]53", "not of the form [ADDR]:PORT"),
        ("[127.0.0.1]:53", "brackets are only for IPv6"),
        ("", "empty upstream"),
        ("udp://", "missing IP address"),
        ("resolv.conf:", "needs a file name"),
    ],
)
def test_upstream_errors_name_the_path(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_upstream(text, "zones[1].upstreams[0]")
    [problem] = info.value.problems
    assert problem.startswith("zones[1].upstreams[0]: ")
    assert reason in problem


RESOLV_CONF = """\
# written by a DHCP client
search svc.cluster.local cluster.local
options ndots:5 timeout:1
nameserver 127.0.0.53   # systemd-resolved
;nameserver 169.254.0.99
nameserver ::1
nameserver 2001:db8::53%eth0
nameserver not-an-address
nameserver 127.0.0.53
nameserver
  nameserver 169.254.20.10
"""


def test_parse_resolv_conf_keeps_order_skips_comments_and_zones() -> None:
    assert parse_resolv_conf(RESOLV_CONF) == [
        "127.0.0.53",
        "::1",
        "2001:db8::53",
        "169.254.20.10",
    ]


def test_parse_resolv_conf_without_nameservers() -> None:
    assert parse_resolv_conf("search example.org\noptions ndots:1\n# nameserver 127.0.0.1\n") == []


def test_upstream_resolv_conf_file_gives_one_auto_upstream_per_nameserver(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(RESOLV_CONF)
    servers = ["127.0.0.53", "::1", "2001:db8::53", "169.254.20.10"]
    assert parse_upstream(f"resolv.conf:{path}", "x") == [
        UpstreamConfig("auto", host) for host in servers
    ]
    # A scheme in front chooses the transport, as the node configuration does with tcp.
    for transport in ("tcp", "udp", "auto"):
        assert parse_upstream(f"{transport}://resolv.conf:{path}", "x") == [
            UpstreamConfig(transport, host)
            for host in servers  # type: ignore[arg-type]
        ]


def test_upstream_resolv_conf_without_nameservers_is_a_problem(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text("search example.org\n")
    with pytest.raises(ConfigError) as info:
        parse_upstream(f"resolv.conf:{path}", "zones[0].upstreams[0]")
    assert info.value.problems == [
        f"zones[0].upstreams[0]: {path} has no nameserver lines with an IP address"
    ]


def test_upstream_resolv_conf_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.conf"
    with pytest.raises(ConfigError) as info:
        parse_upstream(f"resolv.conf:{path}", "zones[0].upstreams[2]")
    [problem] = info.value.problems
    assert problem.startswith(f"zones[0].upstreams[2]: cannot read {path}")


def test_relative_resolv_conf_is_read_next_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "upstream.conf").write_text("nameserver 127.0.0.2\n")
    cfg = tmp_path / "dnsproxy.yaml"
    cfg.write_text("zones:\n  - zone: .\n    upstreams: ['resolv.conf:upstream.conf']\n")
    config = load_config(str(cfg), env={})
    assert config.zones[0].upstreams == (UpstreamConfig("auto", "127.0.0.2"),)


def test_default_resolv_conf_is_etc_resolv_conf() -> None:
    # Whatever this host has, the built-in "." zone must mirror /etc/resolv.conf exactly.
    try:
        expected = parse_resolv_conf(Path("/etc/resolv.conf").read_text())
    except OSError:
        expected = []
    if expected:
        config = load_config(None, env={})
        assert [u.host for u in config.zones[0].upstreams] == expected
        assert {u.transport for u in config.zones[0].upstreams} == {"auto"}
    else:
        with pytest.raises(ConfigError) as info:
            load_config(None, env={})
        assert "/etc/resolv.conf" in str(info.value)


# --- environment expansion --------------------------------------------------------------


def test_env_variable_is_expanded_in_strings() -> None:
    doc = base_doc()
    doc["zones"].append(
        {
            "zone": "${CLUSTER_DOMAIN}",
            "upstreams": ["${KUBE_DNS_UPSTREAM_SERVICE_HOST}:${KUBE_DNS_UPSTREAM_SERVICE_PORT}"],
        }
    )
    doc["listen"] = ["${NODE_IP}:53"]
    env = {
        "CLUSTER_DOMAIN": "cluster.local",
        "KUBE_DNS_UPSTREAM_SERVICE_HOST": "169.254.0.10",
        "KUBE_DNS_UPSTREAM_SERVICE_PORT": "5353",
        "NODE_IP": "169.254.20.10",
    }
    config = parse(doc, env)
    assert config.listen == (HostPort("169.254.20.10", 53),)
    assert config.zones[1].zone == "cluster.local."
    assert config.zones[1].upstreams == (tcp("169.254.0.10", 5353),)


def test_env_default_applies_when_unset_or_empty_and_loses_to_a_value() -> None:
    doc = base_doc()
    doc["listen"] = ["${ADDR:-127.0.0.1}:${PORT:-5353}", "${ADDR6:-[::1]}:5353"]
    assert parse(doc, {}).listen == (HostPort("127.0.0.1", 5353), HostPort("::1", 5353))
    assert parse(doc, {"PORT": "", "ADDR6": "[::1]"}).listen[0] == HostPort("127.0.0.1", 5353)
    assert parse(doc, {"ADDR": "127.0.0.9", "PORT": "53"}).listen[0] == HostPort("127.0.0.9", 53)


def test_unset_env_variable_is_reported_with_key_path() -> None:
    doc = base_doc()
    doc["zones"][0]["upstreams"] = [UPSTREAM, "${KUBE_DNS_UPSTREAM_SERVICE_HOST}"]
    assert problems(doc) == [
        "zones[0].upstreams[1]: environment variable KUBE_DNS_UPSTREAM_SERVICE_HOST is not set"
    ]


def test_numbers_and_booleans_may_come_from_env() -> None:
    doc = base_doc()
    doc["cache"] = {"max_entries": "${CACHE_SIZE:-500}", "max_ttl_s": "${MAX_TTL}"}
    doc["upstream"] = {"connect_timeout_s": "${CONNECT_S}"}
    doc["log"] = {"queries": "${LOG_QUERIES}"}
    config = parse(doc, {"MAX_TTL": "600", "CONNECT_S": "0.5", "LOG_QUERIES": "true"})
    assert config.cache_max_entries == 500
    assert config.cache.max_ttl_s == 600
    assert config.upstream.connect_timeout_s == 0.5
    assert config.log.queries is True


def test_env_number_is_still_range_checked() -> None:
    doc = base_doc()
    doc["cache"] = {"max_ttl_s": "${MAX_TTL}"}
    assert problems(doc, {"MAX_TTL": "lots"}) == [
        "cache.max_ttl_s: must be an integer >= 0 and <= 604800 (got 'lots')"
    ]


def test_quoted_number_written_in_the_file_is_a_type_error() -> None:
    doc = base_doc()
    doc["cache"] = {"max_entries": "500"}
    assert problems(doc) == ["cache.max_entries: must be an integer >= 1 (got '500')"]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("${1BAD}", "invalid variable reference '${1BAD}'"),
        ("${}", "invalid variable reference '${}'"),
        ("${ADDR", "unterminated '${'"),
    ],
)
def test_malformed_env_reference(text: str, reason: str) -> None:
    doc = base_doc()
    doc["listen"] = [text]
    [problem] = problems(doc, {"ADDR": "127.0.0.1:53"})
    assert problem.startswith(f"listen[0]: {reason}")


# --- every error path names its key ------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: object) -> Mutation:
    """A mutation setting ``a.b[0].c`` style ``path`` in the base document."""
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)

    def mutate(doc: dict[str, Any]) -> None:
        node: Any = doc
        for part, following in zip(parts, [*parts[1:], None], strict=True):
            key: Any = int(part[1:-1]) if part.startswith("[") else part
            if following is None:
                node[key] = value
            else:
                if isinstance(node, dict) and key not in node:
                    node[key] = {}
                node = node[key]

    return mutate


def _delete(key: str) -> Mutation:
    return lambda doc: doc.pop(key)


def _zone(**entry: object) -> Mutation:
    return lambda doc: doc["zones"].append(entry)


ERROR_CASES: list[tuple[Mutation, str]] = [
    # top level
    (_set("zone", []), "zone: unknown key (did you mean 'zones'?)"),
    (_set("threads", 2), "threads: unknown key"),
    (_set("workers", 0), "workers: must be an integer >= 1 and <= 256 (got 0)"),
    # listen
    (_set("listen", ["127.0.0.1"]), "listen[0]: '127.0.0.1' needs a port (ADDR:PORT)"),
    (_set("listen", ["::1"]), "listen[0]: '::1' needs a port ([ADDR]:PORT)"),
    (_set("listen", ["127.0.0.1:53", "[::1]"]), "listen[1]: '[::1]' needs a port ([ADDR]:PORT)"),
    (_set("listen", ["localhost:53"]), "listen[0]: 'localhost' is a hostname"),
    (_set("listen", ["127.0.0.1:65536"]), "listen[0]: port 65536 out of range (0-65535)"),
    (_set("listen", "127.0.0.1:53"), "listen: must be a list of strings"),
    (_set("listen", []), "listen: at least one ADDR:PORT is required"),
    (_set("listen", [5353]), "listen[0]: must be a string (got 5353)"),
    (
        _set("listen", ["127.0.0.1:53", "127.0.0.1:53"]),
        "listen[1]: 127.0.0.1:53 is listed twice (also listen[0])",
    ),
    # http_listen
    (_set("http_listen", "127.0.0.1"), "http_listen: '127.0.0.1' needs a port"),
    (_set("http_listen", 9253), "http_listen: must be ADDR:PORT or null (got 9253)"),
    # acl
    (_set("acl", []), "acl: must be a mapping (got a list)"),
    (_set("acl.allow", ["loopback"]), "acl.allow[0]: 'loopback' is not an IP address or CIDR"),
    (
        _set("acl.allow", ["::1/128", "127.0.0.1/8"]),
        "acl.allow[1]: '127.0.0.1/8' has host bits set (did you mean 127.0.0.0/8?)",
    ),
    (_set("acl.allow", "127.0.0.0/8"), "acl.allow: must be a list of strings"),
    (_set("acl.deny", []), "acl.deny: unknown key"),
    # cache
    (_set("cache.max_ttl_s", -1), "cache.max_ttl_s: must be an integer >= 0"),
    (_set("cache.max_ttl_s", 604801), "cache.max_ttl_s: must be an integer >= 0 and <= 604800"),
    (_set("cache.max_ttl_s", 1.5), "cache.max_ttl_s: must be an integer >= 0"),
    (_set("cache.max_ttl_s", True), "cache.max_ttl_s: must be an integer >= 0"),
    (_set("cache.max_tll_s", 5), "cache.max_tll_s: unknown key (did you mean 'max_ttl_s'?)"),
    (_set("cache.min_ttl_s", None), "cache.min_ttl_s: must be an integer >= 0 and <= 604800"),
    (_set("cache.denial_max_ttl_s", -5), "cache.denial_max_ttl_s: must be an integer >= 0"),
    (_set("cache.servfail_ttl_s", 301), "cache.servfail_ttl_s: must be an integer >= 0 and <= 300"),
    (_set("cache.max_entries", 0), "cache.max_entries: must be an integer >= 1 (got 0)"),
    (_set("cache", [1]), "cache: must be a mapping"),
    # upstream pool
    (_set("upstream.tcp_connections", 0), "upstream.tcp_connections: must be an integer >= 1"),
    (
        _set("upstream.max_inflight_per_connection", 65536),
        "upstream.max_inflight_per_connection: must be an integer >= 1 and <= 65535",
    ),
    (_set("upstream.connect_timeout_s", 0), "upstream.connect_timeout_s: must be a number"),
    (_set("upstream.connect_timeout_s", -1.0), "upstream.connect_timeout_s: must be a number"),
    (_set("upstream.connect_timeout_s", "fast"), "upstream.connect_timeout_s: must be a number"),
    (_set("upstream.connect_timeout_s", float("inf")), "upstream.connect_timeout_s: must be"),
    (_set("upstream.connection_max_age_s", False), "upstream.connection_max_age_s: must be"),
    (
        _set("upstream.idle_timeout_s", 0),
        "upstream.idle_timeout_s: must be a number of seconds > 0",
    ),
    (_set("upstream.tcp_conections", 2), "upstream.tcp_conections: unknown key"),
    # limits
    (_set("limits.udp_payload_size", 511), "limits.udp_payload_size: must be an integer >= 512"),
    (_set("limits.udp_payload_size", 4097), "limits.udp_payload_size: must be an integer >= 512"),
    (_set("limits.max_tcp_clients", 0), "limits.max_tcp_clients: must be an integer >= 1"),
    (_set("limits.tcp_idle_timeout_s", 0), "limits.tcp_idle_timeout_s: must be a number"),
    (_set("limits.max_pipelined_per_client", 0), "limits.max_pipelined_per_client: must be an"),
    (_set("limits.max_inflight", -1), "limits.max_inflight: must be an integer >= 1"),
    (_set("limits.max_waiters_per_query", 0), "limits.max_waiters_per_query: must be an integer"),
    # zones
    (_delete("zones"), "zones: at least one zone is required"),
    (_set("zones", []), "zones: at least one zone is required"),
    (_set("zones", {"zone": "."}), "zones: must be a list of zones (got a mapping)"),
    (_set("zones[0]", "."), "zones[0]: must be a mapping with zone and upstreams"),
    (_set("zones[0]", {"upstreams": [UPSTREAM]}), "zones[0].zone: required"),
    (_set("zones[0].zone", "bad..name"), "zones[0].zone: 'bad..name' is not a valid domain name"),
    (_set("zones[0].zone", "-bad.org"), "zones[0].zone: '-bad.org' is not a valid domain name"),
    (_set("zones[0].zone", ""), "zones[0].zone: empty zone name"),
    (_set("zones[0].zone", "a" * 64 + ".org"), "zones[0].zone: '" + "a" * 64),
    (_set("zones[0].zone", 5), "zones[0].zone: must be a domain name string (got 5)"),
    (_set("zones[0].upstreams", []), "zones[0].upstreams: at least one upstream is required"),
    (_set("zones[0]", {"zone": "."}), "zones[0].upstreams: at least one upstream is required"),
    (_set("zones[0].upstreams", UPSTREAM), "zones[0].upstreams: must be a list of strings"),
    (_set("zones[0].upstreams[0]", "127.0.0.1:70000"), "zones[0].upstreams[0]: port 70000 out"),
    (
        _set("zones[0].upstreams[0]", 53),
        "zones[0].upstreams[0]: must be an address string or a mapping with address (got 53)",
    ),
    (_set("zones[0].policy", "fastest"), "zones[0].policy: must be one of sequential, random"),
    (_set("zones[0].try_timeout_s", 0), "zones[0].try_timeout_s: must be a number of seconds > 0"),
    (_set("zones[0].try_timeout_s", 3), "zones[0].try_timeout_s: try_timeout_s (3) must be <="),
    (_set("zones[0].deadline_s", 0.5), "zones[0].deadline_s: try_timeout_s (1) must be <="),
    (_set("zones[0].deadline_s", "soon"), "zones[0].deadline_s: must be a number"),
    (_set("zones[0].cache.max_entries", 5), "zones[0].cache.max_entries: unknown key"),
    (_set("zones[0].cache.servfail_ttl_s", 301), "zones[0].cache.servfail_ttl_s: must be an"),
    (
        _set("zones[0].cache.min_ttl_s", 90000),
        "zones[0].cache.min_ttl_s: min_ttl_s (90000) must be <= max_ttl_s (86400)",
    ),
    (_set("zones[0].cache", "none"), "zones[0].cache: must be a mapping"),
    (_set("zones[0].upstream", [UPSTREAM]), "zones[0].upstream: unknown key (did you mean"),
    (
        _zone(zone=".", upstreams=["127.0.0.2"]),
        "zones[1].zone: duplicate zone '.' (also zones[0])",
    ),
    (
        _set("zones[0].upstreams", [UPSTREAM, "tcp://" + UPSTREAM]),
        "zones[0].upstreams[1]: tcp://127.0.0.1:5300 is listed twice (also zones[0].upstreams[0])",
    ),
    (
        _set("zones[0].upstreams", ["127.0.0.1:5353"]),
        "zones[0].upstreams[0]: tcp://127.0.0.1:5353 is this proxy's own listen address",
    ),
    # log and shutdown
    (_set("log.level", "loud"), "log.level: must be one of debug, info, warning, error"),
    (_set("log.format", "xml"), "log.format: must be one of text, json (got 'xml')"),
    (_set("log.queries", "yes"), "log.queries: must be true or false (got 'yes')"),
    (_set("shutdown.grace_s", -1), "shutdown.grace_s: must be a number of seconds >= 0"),
    (_set("shutdown.grace", 1), "shutdown.grace: unknown key (did you mean 'grace_s'?)"),
]


@pytest.mark.parametrize(("mutate", "expected"), ERROR_CASES)
def test_every_error_names_its_key_path(mutate: Mutation, expected: str) -> None:
    doc = base_doc()
    mutate(doc)
    found = problems(doc)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_duplicate_zone_after_normalization() -> None:
    doc = base_doc()
    doc["zones"] += [
        {"zone": "cluster.local.", "upstreams": ["127.0.0.2"]},
        {"zone": "Cluster.Local", "upstreams": ["127.0.0.3"]},
    ]
    assert problems(doc) == ["zones[2].zone: duplicate zone 'cluster.local.' (also zones[1])"]


def test_wildcard_listen_loops_to_loopback_upstream() -> None:
    doc = base_doc()
    doc["listen"] = ["[::]:5353"]
    doc["zones"][0]["upstreams"] = ["[::1]:5353"]
    assert problems(doc) == [
        "zones[0].upstreams[0]: tcp://[::1]:5353 is this proxy's own listen address "
        "[::]:5353 (queries would loop)"
    ]


def test_problems_are_listed_in_document_order_whichever_check_finds_them() -> None:
    # A loop and a duplicate are found after every key has been read, and still listed
    # at their entry, before the problems of the keys that follow it.
    doc = base_doc()
    doc["zones"][0].update(
        upstreams=["127.0.0.1:5353", "kube-dns", "127.0.0.2", "127.0.0.2"], policy="fastest"
    )
    doc["log"] = {"level": "loud"}
    assert problems(doc) == [
        "zones[0].upstreams[0]: tcp://127.0.0.1:5353 is this proxy's own listen address "
        "127.0.0.1:5353 (queries would loop)",
        "zones[0].upstreams[1]: 'kube-dns' is a hostname; an IP address is required here",
        "zones[0].upstreams[3]: tcp://127.0.0.2:53 is listed twice (also zones[0].upstreams[2])",
        "zones[0].policy: must be one of sequential, random, round_robin (got 'fastest')",
        "log.level: must be one of debug, info, warning, error (got 'loud')",
    ]


def test_document_that_is_not_a_mapping() -> None:
    assert problems(["listen"]) == ["(top level): must be a mapping of keys (got a list)"]


def test_many_problems_are_reported_together() -> None:
    doc = base_doc()
    doc["listen"] = ["127.0.0.1"]
    doc["cache"] = {"max_tll_s": 60, "servfail_ttl_s": 600}
    doc["zones"].append({"zone": "cluster.local", "upstreams": ["127.0.0.1:70000", "kube-dns"]})
    doc["log"] = {"level": "verbose"}
    assert problems(doc, {}) == [
        "listen[0]: '127.0.0.1' needs a port (ADDR:PORT)",
        "cache.max_tll_s: unknown key (did you mean 'max_ttl_s'?)",
        "cache.servfail_ttl_s: must be an integer >= 0 and <= 300 (got 600)",
        "zones[1].upstreams[0]: port 70000 out of range (1-65535)",
        "zones[1].upstreams[1]: 'kube-dns' is a hostname; an IP address is required here",
        "log.level: must be one of debug, info, warning, error (got 'verbose')",
    ]


def test_config_error_message_names_the_source() -> None:
    doc = base_doc()
    doc["listen"] = ["127.0.0.1"]
    with pytest.raises(ConfigError) as info:
        parse(doc, base="site.yaml", overrides=Overrides(upstreams=("127.0.0.1:70000",)))
    assert info.value.source == "site.yaml"
    assert info.value.lines() == [
        "site.yaml: listen[0]: '127.0.0.1' needs a port (ADDR:PORT)",
        "--upstream[0]: port 70000 out of range (1-65535)",
    ]
    assert str(info.value) == "\n".join(info.value.lines())


# --- values and defaults ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "normalized"),
    [
        (".", "."),
        ("cluster.local", "cluster.local."),
        ("cluster.local.", "cluster.local."),
        ("Cluster.LOCAL", "cluster.local."),
        (" example.org ", "example.org."),
        ("254.169.in-addr.arpa", "254.169.in-addr.arpa."),
        ("_tcp.example.org", "_tcp.example.org."),
    ],
)
def test_zone_names_are_normalized(written: str, normalized: str) -> None:
    doc = base_doc()
    doc["zones"][0]["zone"] = written
    assert parse(doc).zones[0].zone == normalized


def test_minimal_document_takes_every_default() -> None:
    config = parse({"zones": [{"zone": ".", "upstreams": [UPSTREAM]}]})
    assert config.listen == (HostPort("127.0.0.1", 5353), HostPort("::1", 5353))
    assert config.http_listen == HostPort("127.0.0.1", 9253)
    assert config.allow == (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.cache_max_entries == 10000
    assert config.cache == CachePolicy()
    assert config.upstream == UpstreamPoolConfig()
    assert config.limits == ServerLimits()
    assert config.log == LogConfig()
    assert config.shutdown_grace_s == 5.0
    assert config.handover == HandoverConfig()
    assert config.reload_watch_interval_s == 5.0
    [zone] = config.zones
    assert (zone.policy, zone.try_timeout_s, zone.deadline_s) == ("sequential", 1.0, 2.0)
    assert zone.upstreams == (tcp("127.0.0.1", 5300),)


def test_empty_sections_mean_defaults() -> None:
    doc = base_doc()
    doc.update(cache=None, upstream={}, limits=None, log={}, shutdown={})
    doc["zones"][0]["cache"] = {}
    config = parse(doc)
    assert config.cache == CachePolicy()
    assert config.zones[0].cache == CachePolicy()


def test_every_value_is_read() -> None:
    doc = base_doc()
    doc.update(
        listen=["169.254.20.10:53", "[2001:db8::10]:53", "127.0.0.1:0"],
        http_listen="[::1]:9300",
        acl={"allow": ["169.254.0.0/16", "2001:db8::/32", "127.0.0.1", "::1"]},
        cache={
            "max_entries": 50,
            "min_ttl_s": 5,
            "max_ttl_s": 600,
            "denial_max_ttl_s": 60,
            "servfail_ttl_s": 0,
        },
        upstream={
            "tcp_connections": 4,
            "max_inflight_per_connection": 500,
            "connect_timeout_s": 0.25,
            "connection_max_age_s": 120,
            "idle_timeout_s": 15,
        },
        limits={
            "max_tcp_clients": 10,
            "tcp_idle_timeout_s": 2.5,
            "max_pipelined_per_client": 7,
            "max_inflight": 99,
            "max_waiters_per_query": 3,
            "udp_payload_size": 512,
        },
        log={"level": "WARNING", "format": "json", "queries": True},
        shutdown={"grace_s": 0},
    )
    doc["zones"][0].update(policy="round_robin", try_timeout_s=0.5, deadline_s=1.5)
    config = parse(doc)
    assert config.listen == (
        HostPort("169.254.20.10", 53),
        HostPort("2001:db8::10", 53),
        HostPort("127.0.0.1", 0),
    )
    assert config.http_listen == HostPort("::1", 9300)
    assert [str(n) for n in config.allow] == [
        "169.254.0.0/16",
        "2001:db8::/32",
        "127.0.0.1/32",
        "::1/128",
    ]
    assert config.cache_max_entries == 50
    assert config.cache == CachePolicy(5, 600, 60, 0)
    assert config.upstream == UpstreamPoolConfig(4, 500, 0.25, 120.0, 15.0)
    assert config.limits == ServerLimits(10, 2.5, 7, 99, 3, 512)
    assert config.log == LogConfig("warning", "json", True)
    assert config.shutdown_grace_s == 0.0
    zone = config.zones[0]
    assert (zone.policy, zone.try_timeout_s, zone.deadline_s) == ("round_robin", 0.5, 1.5)
    assert isinstance(config.upstream.connection_max_age_s, float)


def test_empty_allow_list_allows_everyone() -> None:
    doc = base_doc()
    doc["acl"] = {"allow": []}
    assert parse(doc).allow == ()


@pytest.mark.parametrize("value", [None, "none", "NONE", "${METRICS:-none}"])
def test_http_listen_can_be_disabled(value: object) -> None:
    doc = base_doc()
    doc["http_listen"] = value
    assert parse(doc).http_listen is None


def test_zone_cache_overrides_merge_over_the_global_section() -> None:
    doc = base_doc()
    doc["cache"] = {"max_ttl_s": 600, "servfail_ttl_s": 2}
    doc["zones"].append(
        {"zone": "cluster.local", "upstreams": ["127.0.0.2"], "cache": {"min_ttl_s": 30}}
    )
    config = parse(doc)
    assert config.cache == CachePolicy(min_ttl_s=0, max_ttl_s=600, servfail_ttl_s=2)
    assert config.zones[0].cache == config.cache
    assert config.zones[1].cache == CachePolicy(min_ttl_s=30, max_ttl_s=600, servfail_ttl_s=2)


def test_zones_without_root_are_allowed() -> None:
    config = parse({"zones": [{"zone": "cluster.local", "upstreams": ["127.0.0.2"]}]})
    assert [z.zone for z in config.zones] == ["cluster.local."]


def test_same_server_may_serve_two_zones_and_both_transports() -> None:
    doc = base_doc()
    doc["zones"][0]["upstreams"] = [UPSTREAM, "udp://" + UPSTREAM]
    doc["zones"].append({"zone": "cluster.local", "upstreams": [UPSTREAM]})
    config = parse(doc)
    assert config.zones[0].upstreams == (
        tcp("127.0.0.1", 5300),
        UpstreamConfig("udp", "127.0.0.1", 5300),
    )
    assert config.zones[1].upstreams == (tcp("127.0.0.1", 5300),)


# --- TLS upstreams: the mapping form -----------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def tls_doc(*entries: object) -> dict[str, Any]:
    doc = base_doc()
    doc["zones"][0]["upstreams"] = list(entries)
    return doc


def test_tls_mapping_reads_every_key_with_files_next_to_the_config_file(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = pki.leaf("client.test", client=True)
    entry = {
        "address": "tls://[2001:db8::53]:8853",
        "tls_server_name": "DNS.Example.",
        "ca_file": pki.ca.name,
        "client_cert_file": str(cert),
        "client_key_file": str(key),
        "tls_min_version": 1.3,
    }
    config = parse(tls_doc(entry, "tls://169.254.0.53#dns.example"), base=str(pki.ca))
    assert config.zones[0].upstreams == (
        tls(
            "2001:db8::53",
            8853,
            "dns.example",
            ca_file=str(pki.ca),  # relative to the configuration file
            client_cert_file=str(cert),
            client_key_file=str(key),
            min_version="1.3",
        ),
        tls("169.254.0.53", 853, "dns.example"),
    )
    assert config.zones[0].upstreams[0].label == "tls://[2001:db8::53]:8853#dns.example"
    # The name may come with the address instead, and a mapping may hold any address.
    config = parse(tls_doc({"address": "tls://169.254.0.53#dns.example", "tls_min_version": "1.2"}))
    assert config.zones[0].upstreams == (tls("169.254.0.53", 853, "dns.example"),)
    config = parse(tls_doc({"address": "tls://169.254.0.53", "insecure": True}))
    assert config.zones[0].upstreams == (tls("169.254.0.53", 853, None, insecure=True),)
    config = parse(tls_doc({"address": "udp://169.254.0.53"}))
    assert config.zones[0].upstreams == (UpstreamConfig("udp", "169.254.0.53"),)


def test_tls_mapping_problems_name_their_keys(pki: Pki, tmp_path: Path) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    _, key = pki.leaf("client.test", client=True)
    other_cert, _ = pki.leaf("other.test", client=True)
    doc = tls_doc(
        {"address": "tls://169.254.0.1"},
        {"address": "tls://169.254.0.2#a.test", "ca_file": str(tmp_path / "absent.pem")},
        {"address": "tls://169.254.0.3#a.test", "ca_file": str(not_pem)},
        {
            "address": "tls://169.254.0.4#a.test",
            "client_cert_file": str(other_cert),
            "client_key_file": str(key),
        },
        {"address": "tls://169.254.0.5#a.test", "client_key_file": str(key)},
        {"address": "tcp://169.254.0.6", "tls_server_name": "a.test", "insecure": False},
        {"address": "tls://169.254.0.7#a.test", "tls_server_name": "b.test"},
        {"address": "tls://169.254.0.8#a.test", "tls_min_version": 1.1, "ca_file": 5},
        {"address": "tls://169.254.0.9#a.test", "tls_servername": "a.test"},
        {"tls_server_name": "a.test"},
        {"address": ["tls://169.254.0.10#a.test"]},
    )
    assert problems(doc) == [
        "zones[0].upstreams[0].address: a tls:// upstream needs the server's name, checked in "
        "its certificate: tls_server_name, or '#NAME' after the address (or insecure: true)",
        f"zones[0].upstreams[1].ca_file: cannot read {tmp_path / 'absent.pem'}: No such file "
        "or directory",
        f"zones[0].upstreams[2].ca_file: {not_pem}: no PEM certificate in it",
        f"zones[0].upstreams[3].client_cert_file: {other_cert} with the key in {key}: not a "
        "PEM certificate and its private key",
        "zones[0].upstreams[4].client_key_file: needs client_cert_file (the certificate)",
        "zones[0].upstreams[5].tls_server_name: only for tls:// upstreams (the address is "
        "tcp://169.254.0.6:53)",
        "zones[0].upstreams[5].insecure: only for tls:// upstreams (the address is "
        "tcp://169.254.0.6:53)",
        "zones[0].upstreams[6].tls_server_name: 'b.test' differs from the name in address "
        "('#a.test'); give it once",
        "zones[0].upstreams[7].ca_file: must be a file name (got 5)",
        "zones[0].upstreams[7].tls_min_version: must be 1.2 or 1.3 (got 1.1)",
        "zones[0].upstreams[8].tls_servername: unknown key (did you mean 'tls_server_name'?)",
        "zones[0].upstreams[9].address: required (the server, e.g. 'tls://HOST#NAME')",
        "zones[0].upstreams[10].address: must be an upstream address string (got a list)",
    ]


def test_a_tls_server_has_one_set_of_settings(pki: Pki) -> None:
    doc = tls_doc("tls://169.254.0.53#dns.example")
    doc["zones"].append(
        {
            "zone": "cluster.local",
            "upstreams": [{"address": "tls://169.254.0.53#dns.example", "ca_file": str(pki.ca)}],
        }
    )
    assert problems(doc) == [
        "zones[1].upstreams[0]: tls://169.254.0.53:853#dns.example has other TLS settings at "
        "zones[0].upstreams[0]; give it one set"
    ]
    doc["zones"][1]["upstreams"] = ["tls://169.254.0.53#dns.example"]
    assert parse(doc).zones[1].upstreams == (tls("169.254.0.53", 853, "dns.example"),)


def test_tls_mapping_keys_may_come_from_the_environment(pki: Pki) -> None:
    entry = {"address": "${DOT}", "ca_file": "${CA}", "insecure": "${INSECURE:-false}"}
    config = parse(tls_doc(entry), {"DOT": "tls://169.254.0.53#dns.example", "CA": str(pki.ca)})
    assert config.zones[0].upstreams == (
        tls("169.254.0.53", 853, "dns.example", ca_file=str(pki.ca)),
    )


def test_check_config_refuses_an_unreadable_tls_file(tmp_path: Path) -> None:
    path = tmp_path / "dot.yaml"
    path.write_text(
        "zones:\n  - zone: .\n    upstreams:\n"
        "      - {address: 'tls://169.254.0.53#dns.example', ca_file: corp-ca.pem}\n"
    )
    result = dnsproxy_cmd("check-config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"{path}: zones[0].upstreams[0].ca_file: cannot read {tmp_path / 'corp-ca.pem'}: "
        "No such file or directory"
    )


# --- overrides --------------------------------------------------------------------------


def file_doc() -> dict[str, Any]:
    doc = base_doc()
    doc["listen"] = ["127.0.0.1:5353", "[::1]:5353"]
    doc["zones"].append(
        {
            "zone": "cluster.local",
            "upstreams": ["127.0.0.10:5300"],
            "policy": "random",
            "deadline_s": 1.5,
        }
    )
    return doc


def test_listen_flags_replace_the_file_list() -> None:
    config = parse(file_doc(), overrides=Overrides(listen=("127.0.0.2:53",)))
    assert config.listen == (HostPort("127.0.0.2", 53),)


def test_listen_flags_replace_even_a_broken_file_list() -> None:
    doc = file_doc()
    doc["listen"] = ["${NODE_IP}:53"]
    config = parse(doc, overrides=Overrides(listen=("127.0.0.2:53", "[::1]:53")))
    assert config.listen == (HostPort("127.0.0.2", 53), HostPort("::1", 53))


def test_upstream_flag_without_zone_replaces_root_only() -> None:
    config = parse(file_doc(), overrides=Overrides(upstreams=("127.0.0.2", "udp://[::1]:5300")))
    root, cluster = config.zones
    assert root.zone == "."
    assert root.upstreams == (tcp("127.0.0.2"), UpstreamConfig("udp", "::1", 5300))
    assert cluster.upstreams == (tcp("127.0.0.10", 5300),)


def test_upstream_flag_keeps_the_zone_settings_of_the_file() -> None:
    doc = file_doc()
    doc["zones"][1]["upstreams"] = ["${KUBE_DNS_UPSTREAM_SERVICE_HOST}"]  # unset: replaced
    config = parse(doc, overrides=Overrides(upstreams=("Cluster.Local=127.0.0.3:5300",)))
    cluster = config.zones[1]
    assert cluster.zone == "cluster.local."
    assert cluster.upstreams == (tcp("127.0.0.3", 5300),)
    assert (cluster.policy, cluster.deadline_s) == ("random", 1.5)


def test_upstream_flag_adds_a_missing_zone_with_defaults() -> None:
    doc = file_doc()
    doc["cache"] = {"max_ttl_s": 300}
    flags = ("example.org.=127.0.0.4", "example.org=127.0.0.5:5300", "127.0.0.6")
    config = parse(doc, overrides=Overrides(upstreams=flags))
    assert [z.zone for z in config.zones] == [".", "cluster.local.", "example.org."]
    added = config.zones[2]
    assert added.upstreams == (tcp("127.0.0.4"), tcp("127.0.0.5", 5300))
    assert (added.policy, added.try_timeout_s, added.deadline_s) == ("sequential", 1.0, 2.0)
    assert added.cache == CachePolicy(max_ttl_s=300)
    assert config.zones[0].upstreams == (tcp("127.0.0.6"),)


def test_upstream_flags_supply_zones_to_a_file_without_any() -> None:
    config = parse({}, overrides=Overrides(upstreams=("127.0.0.2",)))
    assert [(z.zone, z.upstreams) for z in config.zones] == [(".", (tcp("127.0.0.2"),))]


def test_other_flags_override_their_keys() -> None:
    doc = file_doc()
    doc["http_listen"] = "127.0.0.1:9253"
    doc["log"] = {"level": "info", "format": "text", "queries": True}
    config = parse(
        doc,
        overrides=Overrides(http_listen="[::1]:9300", log_level="DEBUG", log_format="json"),
    )
    assert config.http_listen == HostPort("::1", 9300)
    assert config.log == LogConfig("debug", "json", True)
    assert parse(doc, overrides=Overrides(http_listen="none")).http_listen is None


def test_flag_errors_name_the_flag() -> None:
    overrides = Overrides(
        listen=("127.0.0.1:53", "127.0.0.1"),
        upstreams=("127.0.0.2", "cluster..local=127.0.0.3", "cluster.local=kube-dns"),
        http_listen="9253",
        log_level="loud",
        log_format="xml",
    )
    assert problems(file_doc(), overrides=overrides) == [
        "--listen[1]: '127.0.0.1' needs a port (ADDR:PORT)",
        "--http-listen: '9253' needs an address too (ADDR:PORT, e.g. 127.0.0.1:9253)",
        "--upstream[1]: 'cluster..local' is not a valid domain name",
        "--upstream[2]: 'kube-dns' is a hostname; an IP address is required here",
        "--log-level: must be one of debug, info, warning, error (got 'loud')",
        "--log-format: must be one of text, json (got 'xml')",
    ]


def test_flag_values_are_taken_literally() -> None:
    # The shell (or Kubernetes' $(VAR)) has expanded a flag already; ${...} left in one
    # is not a reference to expand again.
    overrides = Overrides(rules="${RULES}", listen=("169.254.20.10:53",))
    assert problems(base_doc(), {"RULES": "iptables"}, overrides=overrides) == [
        "--rules: must be one of iptables, nftables, auto, none (got '${RULES}')"
    ]


def test_flag_for_a_section_that_is_not_a_mapping_is_still_read() -> None:
    doc = base_doc()
    doc["log"] = "verbose"
    assert problems(doc, overrides=Overrides(log_level="loud")) == [
        "log: must be a mapping (got 'verbose')",
        "--log-level: must be one of debug, info, warning, error (got 'loud')",
    ]


def test_a_bad_upstream_flag_replaces_nothing() -> None:
    doc = file_doc()
    doc["zones"][1]["upstreams"] = ["${KUBE_DNS_UPSTREAM_SERVICE_HOST}"]
    overrides = Overrides(upstreams=("127.0.0.2", "cluster.local=kube-dns"))
    # The zone keeps its own upstreams, so they are read (and their problem shown).
    assert problems(doc, overrides=overrides) == [
        "--upstream[1]: 'kube-dns' is a hostname; an IP address is required here",
        "zones[1].upstreams[0]: environment variable KUBE_DNS_UPSTREAM_SERVICE_HOST is not set",
    ]


def test_every_flag_names_a_key_of_the_table() -> None:
    keys = set(all_keys())
    for spec in fields(Overrides):
        flag, key = spec.metadata["flag"], spec.metadata["key"]
        assert flag.startswith("--")
        assert key is None or key in keys, (flag, key)


def test_built_in_defaults_with_an_upstream_flag() -> None:
    config = load_config(None, Overrides(upstreams=("127.0.0.2:5300",)), env={})
    assert config.listen == (HostPort("127.0.0.1", 5353), HostPort("::1", 5353))
    assert config.http_listen == HostPort("127.0.0.1", 9253)
    assert [str(n) for n in config.allow] == ["127.0.0.0/8", "::1/128"]
    assert [(z.zone, z.upstreams) for z in config.zones] == [(".", (tcp("127.0.0.2", 5300),))]


# --- files ------------------------------------------------------------------------------


def test_load_config_reads_yaml_and_env(tmp_path: Path) -> None:
    path = tmp_path / "dnsproxy.yaml"
    path.write_text(
        "listen: ['${ADDR}:5353']\n"
        "zones:\n"
        "  - zone: cluster.local\n"
        "    upstreams: ['tcp://[::1]:5300']\n"
    )
    config = load_config(str(path), env={"ADDR": "127.0.0.1"})
    assert config.listen == (HostPort("127.0.0.1", 5353),)
    assert config.zones[0].upstreams == (tcp("::1", 5300),)


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listen: ['127.0.0.1:53']\nzones:\n  - zone: .\n   upstreams: [x]\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    [line] = info.value.lines()
    assert line.startswith(f"{path}: invalid YAML at line 4, column ")


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "twice.yaml"
    path.write_text("cache:\n  max_ttl_s: 60\ncache:\n  min_ttl_s: 5\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.lines() == [
        f"{path}: invalid YAML at line 3, column 1: duplicate key 'cache' "
        "(while reading a mapping at line 1)"
    ]


def test_yaml_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "zones:\n"
        "  - &base {zone: ., upstreams: ['127.0.0.2'], deadline_s: 1.5}\n"
        "  - <<: *base\n"
        "    zone: cluster.local\n"
    )
    config = load_config(str(path), env={})
    assert [(z.zone, z.deadline_s) for z in config.zones] == [(".", 1.5), ("cluster.local.", 1.5)]


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.lines() == [f"{path}: cannot read: No such file or directory"]


def test_empty_file_needs_zones(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing yet\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env={})
    assert info.value.problems == [
        "zones: at least one zone is required (usually '.' for all names)"
    ]


# --- the shipped configuration ----------------------------------------------------------


def test_shipped_config_is_valid() -> None:
    # "." reads this host's /etc/resolv.conf, which a test cannot rely on; the flag
    # replaces exactly that and everything else in the file is still validated.
    config = load_config(str(SHIPPED), Overrides(upstreams=("127.0.0.2",)), env={})
    assert config.listen == (HostPort("127.0.0.1", 5353), HostPort("::1", 5353))
    assert config.http_listen == HostPort("127.0.0.1", 9253)
    assert [str(n) for n in config.allow] == ["127.0.0.0/8", "::1/128"]
    assert [z.zone for z in config.zones] == ["."]
    raw = yaml.safe_load(SHIPPED.read_text())
    assert raw["zones"][0]["upstreams"] == [{"address": "resolv.conf"}]
    # The file spells out every default, so its values are the defaults.
    assert config.cache == CachePolicy()
    assert config.cache_max_entries == Config.__dataclass_fields__["cache_max_entries"].default
    assert config.upstream == UpstreamPoolConfig()
    assert config.limits == ServerLimits()
    assert config.log == LogConfig()
    assert config.shutdown_grace_s == 5.0
    assert config.handover == HandoverConfig()
    assert config.reload_watch_interval_s == 5.0
    assert config.metrics_coredns_names is False
    assert config.workers == 1


def test_shipped_config_lists_every_key() -> None:
    raw = yaml.safe_load(SHIPPED.read_text())
    assert set(raw) == {
        "listen",
        "http_listen",
        "workers",
        "acl",
        "cache",
        "upstream",
        "limits",
        "zones",
        "loop_check",
        "log",
        "shutdown",
        "handover",
        "reload",
        "metrics",
    }
    assert set(raw["metrics"]) == {"coredns_names"}
    assert set(raw["acl"]) == {"allow"}
    assert set(raw["cache"]) == {
        "max_entries",
        "serve_stale",
        "prefetch",
        *(f.name for f in fields(CachePolicy)),
    }
    assert set(raw["cache"]["serve_stale"]) == {f.name for f in fields(ServeStaleConfig)}
    assert set(raw["cache"]["prefetch"]) == {f.name for f in fields(PrefetchConfig)}
    assert set(raw["upstream"]) == {f.name for f in fields(UpstreamPoolConfig)}
    assert set(raw["limits"]) == {f.name for f in fields(ServerLimits)}
    assert set(raw["log"]) == {f.name for f in fields(LogConfig)}
    assert set(raw["shutdown"]) == {"grace_s"}
    assert set(raw["zones"][0]) == {
        "zone",
        "upstreams",
        "policy",
        "try_timeout_s",
        "deadline_s",
        "cache",
    }


def test_shipped_config_comments_every_key() -> None:
    assert undocumented_keys(SHIPPED) == []


# Key lines: "key:", "- key:" (a list entry), "# key:" (a key left commented out, written
# with one space after the '#'; prose and examples in comments indent further or start
# with a capital).
_YAML_LINE = re.compile(
    r"(?P<indent> *)(?P<item>- )?(?P<hash># )?(?P<key>[a-z_][a-z0-9_]*:(\s|$))?"
)


def file_keys(path: Path) -> dict[str, bool]:
    """The key paths a YAML file writes out, as the table names them (``zones[].zone``),
    commented-out ones included, each with whether a comment is on the line right above."""
    lines = path.read_text().splitlines()
    open_: list[tuple[int, str]] = []  # (column, path) of the keys and list entries open
    found: dict[str, bool] = {}
    for i, line in enumerate(lines):
        m = _YAML_LINE.match(line)
        assert m is not None
        column = len(m["indent"])
        if m["item"]:  # a list entry opens under the key above it
            while open_ and open_[-1][0] >= column:
                open_.pop()
            open_.append((column, (open_[-1][1] if open_ else "") + "[]"))
            column += 2
        if not m["key"] or (m["hash"] and m["item"]):
            continue
        while open_ and open_[-1][0] >= column:
            open_.pop()
        name = m["key"].split(":")[0]
        key_path = f"{open_[-1][1]}.{name}" if open_ else name
        above = lines[i - 1].strip() if i else ""
        found[key_path] = above.startswith("#") or (not m["item"] and above.startswith("- #"))
        open_.append((column, key_path))
    return found


def test_shipped_config_documents_exactly_the_keys_of_the_table() -> None:
    # Each key once, in the table's order, with its comment right above it; the keys of
    # the Kubernetes node role are described in nodelocal.yaml instead.
    found = file_keys(SHIPPED)
    assert list(found) == documented_keys("proxy")
    assert [k for k, commented in found.items() if not commented] == []


def test_nodelocal_config_documents_the_node_role_keys() -> None:
    found = file_keys(NODELOCAL)
    node_keys = documented_keys("node")
    assert [k for k in found if k in node_keys] == node_keys
    assert [k for k in found if k not in all_keys()] == []
    assert [k for k, commented in found.items() if not commented] == []
    # node.local_ips is left commented out: its default follows listen.
    assert "local_ips" not in yaml.safe_load(NODELOCAL.read_text())["node"]


def test_file_keys_sees_what_a_file_lacks_or_adds(tmp_path: Path) -> None:
    path = tmp_path / "doc.yaml"
    path.write_text(
        "# About the file.\n# Default: ignored prose.\nlisten: []\nzones:\n"
        "  - # The zone.\n    zone: .\n    upstreams: [x]\ncache:\n"
        "  # A key left out.\n  # max_entries: 5\n  typo_s: 1\n"
    )
    assert file_keys(path) == {
        "listen": True,
        "zones": False,
        "zones[].zone": True,
        "zones[].upstreams": False,
        "cache": False,
        "cache.max_entries": True,
        "cache.typo_s": True,
    }


def test_published_schema_is_what_the_table_generates() -> None:
    # `make schema` writes it; this fails until it is run after a key changes.
    assert SCHEMA.read_text(encoding="utf-8") == schema_text()


def schema_problems(doc: object) -> list[str]:
    validator = jsonschema.Draft202012Validator(json_schema())
    return [e.message for e in validator.iter_errors(doc)]


def test_shipped_configs_validate_against_the_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(SCHEMA.read_text()))
    for path in (SHIPPED, NODELOCAL):
        assert schema_problems(yaml.safe_load(path.read_text())) == [], path


def test_schema_takes_what_dnsproxy_takes_and_refuses_what_it_refuses() -> None:
    good = base_doc()
    good["listen"] = ["169.254.20.10:53"]
    good["log"] = {"level": "WARNING", "queries": "${LOG_QUERIES:-false}"}
    good["cache"] = {"max_entries": "${CACHE_SIZE}", "max_ttl_s": 600}
    good["node"] = {"health_port": "none", "interface": "dnsp0", "sync_interval_s": 1.5}
    good["zones"][0]["cache"] = {"min_ttl_s": 5}
    good["zones"][0]["upstreams"].append(
        {"address": "tls://169.254.0.53", "tls_server_name": "a.test", "tls_min_version": 1.3}
    )
    env = {"CACHE_SIZE": "500"}
    parse(good, env)
    assert schema_problems(good) == []
    for key, value in [
        ("cache.max_tll_s", 5),
        ("cache.max_ttl_s", 604801),
        ("log.level", "loud"),
        ("upstream.connect_timeout_s", 0),
        ("limits.udp_payload_size", 511),
        ("node.interface", "a/b"),
        ("node.health_port", 70000),
        ("zones[0].policy", "fastest"),
        ("zones[0].cache.max_entries", 5),
        ("zones[0].upstreams[0]", {"address": "tls://169.254.0.53#a.test", "insecure": "no"}),
        ("zones[0].upstreams[0]", {"address": "tls://169.254.0.53#a.test", "cafile": "x"}),
        ("zones[0].upstreams[0]", {"tls_server_name": "a.test"}),
        ("zones[0].upstreams[0]", 53),
        ("acl", []),
    ]:
        bad = base_doc()
        _set(key, value)(bad)
        with pytest.raises(ConfigError):
            parse(bad, env)
        assert schema_problems(bad) != [], key
    assert schema_problems(cast(dict[str, Any], {"listen": ["127.0.0.1:53"]})) == [
        "'zones' is a required property"
    ]


# --- the modules ------------------------------------------------------------------------


def test_components_import_the_config_types_without_yaml() -> None:
    # The sans-IO cache (and every component built from a Config) must not pull in the
    # file loader: the types live in config_types, which imports no YAML.
    code = (
        "import sys\n"
        "import dnsproxy.cache, dnsproxy.forwarder, dnsproxy.upstream, dnsproxy.server\n"
        "import dnsproxy.node\n"
        "assert 'yaml' not in sys.modules, 'yaml was imported'\n"
        "import dnsproxy.config\n"
        "assert 'yaml' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_config_still_exports_every_name_it_did() -> None:
    import dnsproxy.config
    import dnsproxy.config_types

    for name in (
        "CachePolicy",
        "Config",
        "HostPort",
        "IPNetwork",
        "LogConfig",
        "NodeConfig",
        "Policy",
        "RulesBackend",
        "ServerLimits",
        "TlsConfig",
        "Transport",
        "UpstreamConfig",
        "UpstreamPoolConfig",
        "ZoneConfig",
    ):
        assert getattr(dnsproxy.config, name) is getattr(dnsproxy.config_types, name)
    for name in (
        "ConfigError",
        "DEFAULT_RESOLV_CONF",
        "Overrides",
        "load_config",
        "parse_config",
        "parse_resolv_conf",
        "parse_upstream",
    ):
        assert hasattr(dnsproxy.config, name)
