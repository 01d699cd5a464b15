"""The upstream and the systems under test: their configurations, commands and versions.

Every system under test is a caching forwarder on 127.0.0.1:<port> in front of the same
upstream, configured for at least 650,000 cached answers (the memory scenario fills
100,000), forwarding over TCP where it can (dnsmasq cannot: it forwards UDP queries over
UDP). The systems that can forward over TLS too (dnsproxy, Unbound) have a TLS variant
(:meth:`System.over_tls`) for the tls scenario, forwarding to the upstream's TLS port
(a certificate made for it with ``openssl``). Nothing here reaches beyond loopback: the
upstream refuses every name outside its two zones, and dnsdist's security poll (a DNS
lookup of a public name) is switched off.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from benchmarks.procs import HOST, HarnessError, run_bounded, which

ROOT = Path(__file__).resolve().parent.parent
CACHE_ENTRIES = 650_000
TLS_NAME = "dot.bench.test"  # the name in the upstream's TLS certificate


@dataclass(frozen=True)
class Command:
    argv: list[str]
    env: dict[str, str]


@dataclass(frozen=True)
class TlsPort:
    """The upstream's DNS-over-TLS port, and the certificate that lets clients check it."""

    port: int
    cert: Path  # self-signed for TLS_NAME: the CA file of the clients too
    key: Path


@dataclass(frozen=True)
class Target:
    """Where a system under test forwards: the upstream's port, over TCP (or UDP), or its
    TLS port when ``tls`` is set."""

    port: int
    tls: TlsPort | None = None


Make = Callable[[Path, int, Target], Command]  # (workdir, port, where to forward)


@dataclass(frozen=True)
class System:
    """One caching forwarder under test."""

    key: str
    label: str
    binary: str  # executable looked up on PATH (and sbin)
    package: str  # Debian package that provides it, for the "not installed" note
    upstream_transport: str
    make: Make
    get_version: Callable[[], str]
    tls_transport: str | None = None  # how its TLS variant forwards; None: it has none
    tls: bool = False  # this is the TLS variant
    default: bool = True  # measured when no --systems are named (make bench)

    def missing(self) -> str | None:
        """Why this system cannot run here, or None."""
        if which(self.binary) is None:
            return f"{self.binary} not installed (apt-get install {self.package})"
        return None

    def over_tls(self) -> System:
        """The variant of this system that forwards to the upstream's TLS port."""
        assert self.tls_transport is not None
        return replace(
            self,
            key=f"{self.key}-tls",
            label=f"{self.label} over TLS",
            upstream_transport=self.tls_transport,
            tls=True,
        )

    def command(self, workdir: Path, port: int, target: Target) -> Command:
        workdir.mkdir(parents=True, exist_ok=True)
        if self.tls and target.tls is None:
            raise HarnessError(f"{self.label}: the upstream has no TLS port")
        return self.make(workdir, port, target if self.tls else Target(target.port))


def make_certificate(directory: Path) -> tuple[Path, Path] | None:
    """A self-signed ECDSA P-256 certificate for TLS_NAME and its key, made with openssl;
    None when openssl is not installed."""
    openssl = which("openssl")
    if openssl is None:
        return None
    cert, key = directory / "tls-cert.pem", directory / "tls-key.pem"
    out = run_bounded(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt"),
            *("ec_paramgen_curve:prime256v1", "-nodes", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert), "-subj", f"/CN={TLS_NAME}"),
            *("-addext", f"subjectAltName=DNS:{TLS_NAME}"),
        ],
        30.0,
    )
    if out.returncode != 0:
        raise HarnessError(f"openssl req failed: {out.stderr.decode(errors='replace')}")
    return cert, key


# -- dnsproxy
#
# Two builds of the same sources: the compiled one (the query-path modules compiled with
# mypyc, as the container image ships them; `make bench` builds them in place, see the
# Makefile) from the checkout itself, and the pure-Python one from a copy of the sources
# without the compiled modules (what `pip install` gives).


def dnsproxy_build(root: Path) -> str:
    """Which build ``python -m dnsproxy`` runs with ``root`` first on the path: ``mypyc``,
    ``no`` (pure Python) or ``partial`` (see ``dnsproxy.compiled``)."""
    out = run_bounded(
        [sys.executable, "-P", "-c", "import dnsproxy; print(dnsproxy.compiled())"],
        60.0,
        env={"PYTHONPATH": str(root)},
    )
    return out.stdout.decode().strip() or f"unknown ({out.stderr.decode()[-200:]})"


def pure_sources(directory: Path) -> Path:
    """A copy of dnsproxy's sources without compiled modules, under ``directory``; the
    path to put first on PYTHONPATH."""
    target = directory / "dnsproxy"
    if not target.exists():
        shutil.copytree(
            ROOT / "dnsproxy",
            target,
            symlinks=True,
            ignore=shutil.ignore_patterns("*.so", "__pycache__"),
        )
    return directory


PURE_DIR = Path(tempfile.gettempdir()) / f"dnsproxy-bench-pure-{os.getpid()}"


def _dnsproxy(loop: str, *, pure: bool = False) -> Make:
    def make(workdir: Path, port: int, target: Target) -> Command:
        if target.tls is None:
            upstream = f'"tcp://{HOST}:{target.port}"'
        else:
            address = f"tls://{HOST}:{target.tls.port}#{TLS_NAME}"
            upstream = f'{{address: "{address}", ca_file: "{target.tls.cert}"}}'
        conf = workdir / "dnsproxy.yaml"
        conf.write_text(
            "\n".join(
                [
                    f'listen: ["{HOST}:{port}"]',
                    "http_listen: null",
                    f"cache: {{max_entries: {CACHE_ENTRIES}}}",
                    "zones:",
                    '  - zone: "."',
                    f"    upstreams: [{upstream}]",
                    "log: {level: warning}",
                    "",
                ]
            )
        )
        # -P: not the working directory first on the path, PYTHONPATH decides.
        argv = [sys.executable, "-P", "-m", "dnsproxy", "--config", str(conf)]
        root = pure_sources(PURE_DIR) if pure else ROOT
        return Command(argv, {"DNSPROXY_LOOP": loop, "PYTHONPATH": str(root)})

    return make


def _dnsproxy_version(pure: bool = False) -> Callable[[], str]:
    def get() -> str:
        import dnsproxy

        try:
            uv = importlib.metadata.version("uvloop")
        except importlib.metadata.PackageNotFoundError:
            uv = "missing"
        py = ".".join(map(str, sys.version_info[:3]))
        build = dnsproxy_build(pure_sources(PURE_DIR) if pure else ROOT)
        kind = {"mypyc": "compiled with mypyc", "no": "pure Python"}.get(build, build)
        return f"dnsproxy {dnsproxy.__version__} ({kind}; Python {py}, uvloop {uv})"

    return get


# -- dnsmasq


def _dnsmasq(workdir: Path, port: int, target: Target) -> Command:
    argv = [
        which("dnsmasq") or "dnsmasq",
        "--no-daemon",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        f"--port={port}",
        f"--listen-address={HOST}",
        "--bind-interfaces",
        f"--server={HOST}#{target.port}",
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


def upstream_conf(workdir: Path, port: int, zones: Path, tls: TlsPort | None = None) -> Path:
    """Unbound answering only from ``zones`` (local-data) and refusing everything else, so
    that it never recurses; also over TLS on ``tls.port`` when given. unbound-control on a
    Unix socket reads its query counters."""
    tls_lines = (
        [
            f"  interface: {HOST}@{tls.port}",
            f"  tls-port: {tls.port}",
            f'  tls-service-key: "{tls.key}"',
            f'  tls-service-pem: "{tls.cert}"',
        ]
        if tls is not None
        else []
    )
    lines = [
        *_unbound_common(workdir, port),
        *tls_lines,
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


def _unbound_forwarder(workdir: Path, port: int, target: Target) -> Command:
    if target.tls is None:
        upstream = [f"  forward-addr: {HOST}@{target.port}", "  forward-tcp-upstream: yes"]
        tls = ["  tcp-upstream: yes"]
    else:
        # The name after '#' is what Unbound checks in the certificate.
        upstream = [
            f"  forward-addr: {HOST}@{target.tls.port}#{TLS_NAME}",
            "  forward-tls-upstream: yes",
        ]
        tls = [f'  tls-cert-bundle: "{target.tls.cert}"']
    # As NLnet Labs' "Howto Optimise" says for a busy cache: one thread per core it gets
    # (one here), slabs a power of 2 near the thread count, the RRset cache twice the
    # message cache and large enough for every answer of a run, 4 MB socket buffers,
    # SO_REUSEPORT; prefetch as its documentation recommends for a busy cache (dnsproxy
    # prefetches by default too).
    lines = [
        *_unbound_common(workdir, port),
        "  outgoing-num-tcp: 256",
        "  msg-cache-size: 256m",
        "  rrset-cache-size: 512m",
        "  msg-cache-slabs: 1",
        "  rrset-cache-slabs: 1",
        "  infra-cache-slabs: 1",
        "  key-cache-slabs: 1",
        "  so-reuseport: yes",
        "  so-rcvbuf: 4m",
        "  so-sndbuf: 4m",
        "  prefetch: yes",
        # The upstream is on 127.0.0.1, which Unbound refuses to query by default.
        "  do-not-query-localhost: no",
        # test. is one of Unbound's built-in local zones; bench.test must be forwarded.
        '  local-zone: "test." nodefault',
        *tls,
        "forward-zone:",
        '  name: "."',
        *upstream,
        "",
    ]
    conf = workdir / "unbound.conf"
    conf.write_text("\n".join(lines))
    return Command([which("unbound") or "unbound", "-d", "-c", str(conf)], {})


# -- dnsdist


def _dnsdist(workdir: Path, port: int, target: Target) -> Command:
    lines = [
        # Otherwise dnsdist looks up <version>.security-status.secpoll.powerdns.com through
        # the system resolver: traffic off this machine.
        'setSecurityPollSuffix("")',
        f'setLocal("{HOST}:{port}")',
        'setACL({"127.0.0.0/8"})',
        f'newServer{{address="{HOST}:{target.port}", tcpOnly=true, checkName="ready.bench.test."}}',
        # The packet cache as dnsdist's caching guide sets it up (its options spelled
        # out, values as the guide gives them); one UDP thread for the one local bind,
        # which is what one core can use (its tuning guide).
        f'getPool(""):setCache(newPacketCache({CACHE_ENTRIES + 50_000}, '
        "{maxTTL=86400, minTTL=0, temporaryFailureTTL=60, staleTTL=60, dontAge=false}))",
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
            "dnsproxy (compiled, uvloop)",
            sys.executable,
            "python3",
            "TCP (pipelined)",
            _dnsproxy("uvloop"),
            _dnsproxy_version(),
            tls_transport="TLS (pipelined, sessions resumed)",
        ),
        System(
            "dnsproxy-pure",
            "dnsproxy (pure Python, uvloop)",
            sys.executable,
            "python3",
            "TCP (pipelined)",
            _dnsproxy("uvloop", pure=True),
            _dnsproxy_version(pure=True),
        ),
        System(
            "dnsproxy-asyncio",
            "dnsproxy (compiled, asyncio)",
            sys.executable,
            "python3",
            "TCP (pipelined)",
            _dnsproxy("asyncio"),
            _dnsproxy_version(),
            default=False,
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
            tls_transport="TLS (forward-tls-upstream)",
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
