"""The configuration as frozen dataclasses: what every component is built from.

No I/O and no YAML: ``cache``, ``forwarder``, ``upstream``, ``server`` and ``node`` import
these types without pulling in the loader. ``config_schema`` validates a document into them
(its table says which key fills which field, and takes each default from here);
``config`` reads the files. Units are in the names (``_s`` seconds).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# "auto": TCP, and UDP for a server that closes or refuses TCP while it answers over UDP.
Transport = Literal["tcp", "udp", "tls", "auto"]
TlsVersion = Literal["1.2", "1.3"]
Policy = Literal["sequential", "random", "round_robin"]
RulesBackend = Literal["iptables", "nftables", "auto", "none"]
WhenReplaced = Literal["exit", "wait"]


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str  # an IP address literal, without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """How a ``tls://`` upstream is checked, and what we present to it (RFC 7858)."""

    # Sent as SNI and checked in the server's certificate; None only with insecure.
    server_name: str | None = None
    ca_file: str | None = None  # PEM bundle of the CAs trusted for it; None: the system's
    client_cert_file: str | None = None  # mutual TLS: our certificate chain (PEM) ...
    client_key_file: str | None = None  # ... and its key, when not in client_cert_file
    min_version: TlsVersion = "1.2"
    insecure: bool = False  # no certificate check at all (logged loudly)


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    transport: Transport
    host: str  # an IP address literal, without brackets
    port: int = 53
    tls: TlsConfig | None = None  # set exactly when transport is "tls"

    @property
    def label(self) -> str:
        """How logs and metrics name the server: ``tls://HOST:PORT#NAME`` for TLS."""
        label = f"{self.transport}://{HostPort(self.host, self.port)}"
        name = self.tls.server_name if self.tls is not None else None
        return label if name is None else f"{label}#{name}"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    min_ttl_s: int = 0
    max_ttl_s: int = 86400
    denial_max_ttl_s: int = 1800
    servfail_ttl_s: int = 5  # 0 disables SERVFAIL caching; at most 300 (RFC 2308 §7.1)
    # How long past its TTL an answer may still be served when the upstreams fail
    # (RFC 8767 serve-stale); 0 disables. Per zone: an evicted pod must not live on long.
    max_stale_s: int = 3600


@dataclass(frozen=True, slots=True)
class ServeStaleConfig:
    """When an expired answer is served (RFC 8767); how long, per zone: ``max_stale_s``."""

    # The client-response timer: a client waiting this long for the refresh of an expired
    # name gets the stale answer, while the refresh goes on. Below glibc's 5 s retry.
    answer_after_s: float = 1.8
    # EDE 3 "Stale Answer" (RFC 8914) in the OPT of a stale reply to an EDNS client.
    ede: bool = True


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    """Refreshing popular entries before they expire."""

    # Cache hits an entry needs in its lifetime to be refreshed in the last tenth of its
    # TTL; 0 turns prefetch off.
    min_hits: int = 2
    max_inflight: int = 100  # refreshes under way at once; more wait for expiry


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    zone: str  # lowercase, absolute with trailing dot; "." is the root
    upstreams: tuple[UpstreamConfig, ...]
    policy: Policy = "sequential"
    try_timeout_s: float = 1.0  # one attempt at one upstream server
    deadline_s: float = 2.0  # whole query, all attempts; then SERVFAIL
    cache: CachePolicy = field(default_factory=CachePolicy)


@dataclass(frozen=True, slots=True)
class UpstreamPoolConfig:
    tcp_connections: int = 2  # persistent connections per upstream server
    # Pipelined queries on one connection; tcp_connections times this must carry
    # limits.max_inflight, so that the pool never refuses a query the forwarder admitted.
    max_inflight_per_connection: int = 500
    connect_timeout_s: float = 1.0
    connection_max_age_s: float = 30.0  # rotate so traffic spreads over the pods
    idle_timeout_s: float = 30.0  # close a connection unused this long


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_tcp_clients: int = 1024
    tcp_idle_timeout_s: float = 10.0
    max_pipelined_per_client: int = 100
    # Distinct queries waiting for an upstream: the one limit on misses in flight (beyond
    # it, SERVFAIL at once). Prefetches count too.
    max_inflight: int = 1000
    max_waiters_per_query: int = 1000  # clients coalesced onto one upstream query
    udp_payload_size: int = 1232  # largest UDP reply we send and advertise to clients
    max_tcp_clients_per_source: int = 256  # so that one address cannot take every slot
    # A UDP listener whose oldest queued datagram has waited this long (for 20 ms on end)
    # sheds the misses it reads (SERVFAIL, or stale) until the queue is shorter; 0 never.
    shed_after_s: float = 0.003
    # Receive buffer of each UDP listener, bytes (0: the kernel's default). 4 MiB holds
    # about 10,000 queued queries: a burst of a tenth of a second at full speed.
    udp_rcvbuf: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # debug, info, warning, error
    format: Literal["text", "json"] = "text"
    queries: bool = False  # one line per query (off the hot path only when off)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The NodeLocal DNSCache role: local addresses on an interface, NOTRACK/ACCEPT rules."""

    local_ips: tuple[str, ...]  # IP literals, IPv4 and IPv6 mixed; each served on port 53
    interface: str = "nodelocaldns"  # created as a dummy link; "lo" when dummy is missing
    setup_interface: bool = True  # False: something else puts the addresses in place
    rules: RulesBackend = "auto"
    sync_interval_s: float = 60.0  # verify and re-add addresses and rules this often
    teardown: bool = True  # remove rules and addresses at exit
    health_port: int | None = None  # TCP port the health rules cover; None: no such rules
    # Fail-safe: NOTRACK a query only while a socket is bound to its local IP, so that a
    # killed proxy's rules stop applying and a ClusterIP falls back to kube-proxy's DNAT.
    fallback: bool = True
    # Where queries to the local IPs of its family go while no socket holds them (the
    # kube-dns-upstream ClusterIP); None: no such rules. nftables backend only.
    fallback_ip: str | None = None


@dataclass(frozen=True, slots=True)
class HandoverConfig:
    """Zero-loss replacement of a running instance through a Unix socket (dnsproxy.handover)."""

    path: str | None = None  # the Unix socket; None: no handover, bind as usual
    timeout_s: float = 3.0  # wait for each message of the other instance at most this long
    cache: bool = True  # the cache travels too (a bounded snapshot)
    # What a replaced instance does once its in-flight queries are answered: exit, or wait
    # for its SIGTERM without serving (a container that exits by itself is restarted).
    when_replaced: WhenReplaced = "exit"


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[HostPort, ...]
    zones: tuple[ZoneConfig, ...]
    http_listen: HostPort | None = None
    # A second endpoint with the same paths, for a liveness probe on the link-local
    # address while metrics stay on http_listen (NodeLocal: :8080 health, :9253 metrics).
    health_listen: HostPort | None = None
    allow: tuple[IPNetwork, ...] = ()  # empty means every source is allowed
    cache_max_entries: int = 10000
    cache: CachePolicy = field(default_factory=CachePolicy)
    cache_serve_stale: ServeStaleConfig = field(default_factory=ServeStaleConfig)
    cache_prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)
    upstream: UpstreamPoolConfig = field(default_factory=UpstreamPoolConfig)
    limits: ServerLimits = field(default_factory=ServerLimits)
    log: LogConfig = field(default_factory=LogConfig)
    # At start, a random-name probe to every upstream must not come back here.
    loop_check: bool = True
    shutdown_grace_s: float = 5.0  # bound on finishing in-flight queries at exit
    # After SIGTERM, /ready is 503 but queries are still served for this long.
    shutdown_lameduck_s: float = 0.0
    node: NodeConfig | None = None
    handover: HandoverConfig = field(default_factory=HandoverConfig)
    # Poll the config file this often and reload when it changed; 0 disables the watch.
    reload_watch_interval_s: float = 5.0
    # Also export the metric names of CoreDNS and node-cache (coredns_*), so that existing
    # NodeLocal DNSCache dashboards and alerts keep working.
    metrics_coredns_names: bool = False
    # Processes answering queries: 1 is one process; N > 1 a supervisor and N workers,
    # each with its own cache, reading the listeners' SO_REUSEPORT groups (dnsproxy.workers).
    workers: int = 1
