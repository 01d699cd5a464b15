"""The upstream and the systems under test: their configurations, commands and versions.

Every system under test is a caching forwarder on 127.0.0.1:<port> in front of the same
upstream, configured for at least 450,000 cached answers (the memory scenario fills
100,000), forwarding over TCP where it can (dnsmasq cannot: it forwards UDP queries over
UDP). Nothing here reaches beyond loopback: the upstream refuses every name outside its
two zones, and dnsdist's security poll (a DNS lookup of a public name) is switched off.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.procs import HOST, run_bounded, which

ROOT = Path(__file__).resolve().parent.parent
CACHE_ENTRIES = 450_000


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class System:
    """One caching forwarder under test."""

    key: str
    label: str
    binary: str  # executable looked up on PATH (and sbin)
    package: str  # Debian package that provides it, for the "not installed" note
    upstream_transport: str
    make: Callable[[Path, int, int], Command]  # (workdir, port, upstream port)
    get_version: Callable[[], str]

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        if which(self.binary) is None:
            return f"{self.binary} not installed (apt-get install {self.package})"
        return None

    def command(self, workdir: Path, port: int, upstream_port: int) -> Command:
        workdir.mkdir(parents=True, exist_ok=True)
        return self.make(workdir, port, upstream_port)


# -- dnsproxy


def _dnsproxy(loop: str) -> Callable[[Path, int, int], Command]:
    def make(workdir: Path, port: int, upstream_port: int) -> Command:
        conf = workdir / "dnsproxy.yaml"
        conf.write_text(
            "\n".join(
                [
                    f'listen: ["{HOST}:{port}"]',
                    "http_listen: null",
                    f"cache: {{max_entries: {CACHE_ENTRIES}}}",
                    "zones:",
                    '  - zone: "."',
                    f'    upstreams: ["tcp://{HOST}:{upstream_port}"]',
                    "log: {level: warning}",
                    "",
                ]
            )
        )
        argv = [sys.executable, "-m", "dnsproxy", "--config", str(conf)]
        return Command(argv, {"DNSPROXY_LOOP": loop, "PYTHONPATH": str(ROOT)})

    return make


def _dnsproxy_version() -> str:
    import dnsproxy

    try:
        uv = importlib.metadata.version("uvloop")
    except importlib.metadata.PackageNotFoundError:
        uv = "missing"
    py = ".".join(map(str, sys.version_info[:3]))
    return f"dnsproxy {dnsproxy.__version__} (Python {py}, uvloop {uv})"


# -- dnsmasq


def _dnsmasq(workdir: Path, port: int, upstream_port: int) -> Command:
    argv = [
        which("dnsmasq") or "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--port={port}",
        f"--listen-address={HOST}",
        "--bind-interfaces",
        f"--server={HOST}#{upstream_port}",
        f"--cache-size={CACHE_ENTRIES}",
        # Default 150 concurrent forwarded queries would turn the miss scenario into a
        # test of that limit rather than of the forwarding path.
        "--dns-forward-max=10000",
        f"--pid-file={workdir / 'dnsmasq.pid'}",
        "--log-facility=-",
    ]
    return Command(argv, {})


def _first_line_version(argv: list[str], pattern: str, prefix: str) -> Callable[[], str]:
    def get() -> str:
        path = which(argv[0])
        if path is None:
            return "missing"
        out = run_bounded([path, *argv[1:]], 10.0)
        m = re.search(pattern.encode(), out.stdout + out.stderr)
        return f"{prefix} {m.group(1).decode()}" if m else f"{prefix} (unknown version)"

    return get


# -- Unbound, as the upstream and as a forwarder


def _unbound_common(workdir: Path, port: int) -> list[str]:
    return [
        "server:",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{workdir}"',
        f'  pidfile: "{workdir / "unbound.pid"}"',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 0",
        "  num-threads: 1",
        f"  interface: {HOST}@{port}",
        f"  port: {port}",
        "  access-control: 127.0.0.0/8 allow",
        "  do-ip6: no",
        '  module-config: "iterator"',
        "  num-queries-per-thread: 4096",
        "  incoming-num-tcp: 1024",
    ]


def upstream_conf(workdir: Path, port: int, zones: Path) -> Path:
    """Unbound answering only from ``zones`` (local-data) and refusing everything else, so
    that it never recurses. unbound-control on a Unix socket reads its query counters."""
    lines = [
        *_unbound_common(workdir, port),
        "  so-rcvbuf: 4m",
        "  so-sndbuf: 4m",
        '  local-zone: "." refuse',
        f'  include: "{zones}"',
        "remote-control:",
        "  control-enable: yes",
        f'  control-interface: "{workdir / "unbound.ctl"}"',
        "",
    ]
    conf = workdir / "upstream.conf"
    conf.write_text("\n".join(lines))
    return conf


def _unbound_forwarder(workdir: Path, port: int, upstream_port: int) -> Command:
    lines = [
        *_unbound_common(workdir, port),
        "  outgoing-num-tcp: 256",
        "  msg-cache-size: 256m",
        "  rrset-cache-size: 512m",
        # The upstream is on 127.0.0.1, which Unbound refuses to query by default.
        "  do-not-query-localhost: no",
        # test. is one of Unbound's built-in local zones; bench.test must be forwarded.
        '  local-zone: "test." nodefault',
        "  tcp-upstream: yes",
        "forward-zone:",
        '  name: "."',
        f"  forward-addr: {HOST}@{upstream_port}",
        "  forward-tcp-upstream: yes",
        "",
    ]
    conf = workdir / "unbound.conf"
    conf.write_text("\n".join(lines))
    return Command([which("unbound") or "unbound", "-d", "-c", str(conf)], {})


# -- dnsdist


def _dnsdist(workdir: Path, port: int, upstream_port: int) -> Command:
    lines = [
        # Otherwise dnsdist looks up <version>.security-status.secpoll.powerdns.com through
        # the system resolver: traffic off this machine.
        'setSecurityPollSuffix("")',
        f'setLocal("{HOST}:{port}")',
        'setACL({"127.0.0.0/8"})',
        f'newServer{{address="{HOST}:{upstream_port}", tcpOnly=true, '
        'checkName="ready.bench.test."}',
        f'getPool(""):setCache(newPacketCache({CACHE_ENTRIES + 50_000}))',
        "",
    ]
    conf = workdir / "dnsdist.conf"
    conf.write_text("\n".join(lines))
    argv = [which("dnsdist") or "dnsdist", "--supervised", "--disable-syslog", "-C", str(conf)]
    return Command(argv, {})


SYSTEMS: dict[str, System] = {
    s.key: s
    for s in [
        System(
            "dnsproxy-uvloop",
            "dnsproxy (uvloop)",
            sys.executable,
            "python3",
            "TCP (pipelined)",
            _dnsproxy("uvloop"),
            _dnsproxy_version,
        ),
        System(
            "dnsproxy-asyncio",
            "dnsproxy (asyncio)",
            sys.executable,
            "python3",
            "TCP (pipelined)",
            _dnsproxy("asyncio"),
            _dnsproxy_version,
        ),
        System(
            "dnsmasq",
            "dnsmasq",
            "dnsmasq",
            "dnsmasq-base",
            "UDP (cannot forward UDP queries over TCP)",
            _dnsmasq,
            _first_line_version(["dnsmasq", "--version"], r"version (\S+)", "dnsmasq"),
        ),
        System(
            "unbound",
            "Unbound (forwarder)",
            "unbound",
            "unbound",
            "TCP (tcp-upstream)",
            _unbound_forwarder,
            _first_line_version(["unbound", "-V"], r"Version (\S+)", "unbound"),
        ),
        System(
            "dnsdist",
            "dnsdist",
            "dnsdist",
            "dnsdist",
            "TCP (tcpOnly backend)",
            _dnsdist,
            _first_line_version(["dnsdist", "--version"], r"dnsdist (\S+)", "dnsdist"),
        ),
    ]
}
BASELINE = "dnsproxy-uvloop"


def unbound_version() -> str:
    """Version of the upstream, which is the same program as the ``unbound`` system."""
    return SYSTEMS["unbound"].get_version()
