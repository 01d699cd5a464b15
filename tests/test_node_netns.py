"""The node role for real, as root, in network namespaces, with glibc as the client.

Each test builds the topology of ``netns.py`` (a pod, a node running dnsproxy with real
iptables or nftables rules, an upstream namespace whose dnsmasq stands in for CoreDNS and
for an external resolver), runs ``python -m dnsproxy`` inside the node namespace, and
removes everything afterwards, also when it fails. Skipped with the reason when not root or
when a tool is missing; ``.ci/run`` installs them all.

The upstream counts what reaches it with two ACCEPT rules (UDP and TCP port 53) whose packet
counters say which transport the proxy used; dnsmasq's query log says which names.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.query
import pytest
from netns import (
    CLUSTER_IP,
    LOCAL_IP,
    LOCAL_IP6,
    NODE_POD_IP,
    NODE_POD_IP6,
    POD_IP,
    SBIN_PATH,
    UPSTREAM_IP,
    NetNs,
    PodLoad,
    Topology,
    tool,
    topology,
    wait_for,
)
from test_process import http_get, metric_value

ROOT = Path(__file__).resolve().parent.parent
NODELOCAL = ROOT / "config" / "nodelocal.yaml"
KUBERNETES_IP = "169.254.100.1"  # kubernetes.default.svc.cluster.local in the upstream
EXTERNAL_IP, EXTERNAL_IP6 = "169.254.100.2", "2001:db8:100::2"  # example.test
METRICS_URL = "http://127.0.0.1:9253"
START_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 15.0
RULES_PER_IP = 10  # port 53; the health port adds 2 when health_listen is set
FALLBACK_RULES_PER_IP = 4  # with fallback_ip: a rewrite and a nat rule, for UDP and TCP

BACKENDS = ["iptables", "nftables"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "nftables":
        tool("nft", "nftables")
    return str(request.param)


@pytest.fixture
def topo() -> Iterator[Topology]:
    with topology() as t:
        yield t


# -- the upstream: dnsmasq plus counters


class Upstream:
    """dnsmasq as CoreDNS on ``address`` in ``ns`` (the upstream namespace by default)."""

    def __init__(
        self,
        topo: Topology,
        tmp_path: Path,
        ns: NetNs | None = None,
        address: str = UPSTREAM_IP,
        example_ip: str = EXTERNAL_IP,
    ) -> None:
        binary = tool("dnsmasq", "dnsmasq-base")
        self.topo = topo
        self.log_path = tmp_path / f"dnsmasq-{address}.log"
        ns = ns or topo.upstream
        self.ns = ns
        for proto in ("udp", "tcp"):
            ns.run("iptables", "-w", "5", "-A", "INPUT", "-p", proto, "--dport", "53",
                   "-j", "ACCEPT")  # fmt: skip
        self._log = self.log_path.open("wb")
        # --keep-in-foreground, not --no-daemon: in debug mode dnsmasq serves one TCP
        # connection at a time, which would stall the proxy's second pooled connection.
        argv = [
            binary,
            "--keep-in-foreground",
            "--user=root",
            "--conf-file=/dev/null",
            f"--pid-file={tmp_path / f'dnsmasq-{address}.pid'}",
            "--no-resolv",
            "--no-hosts",
            "--port=53",
            f"--listen-address={address}",
            "--bind-interfaces",
            "--log-queries",
            "--log-facility=-",
            "--local-ttl=60",  # dnsmasq's own answers have TTL 0 otherwise: never cached
            f"--address=/kubernetes.default.svc.cluster.local/{KUBERNETES_IP}",
            f"--address=/example.test/{example_ip}",
            f"--address=/example.test/{EXTERNAL_IP6}",
            # Every other name in these zones is NXDOMAIN, as CoreDNS answers for a search
            # suffix that does not exist (REFUSED would stop glibc's search list).
            "--local=/cluster.local/",
            "--local=/test/",
        ]
        self.proc = subprocess.Popen(
            ns.exec_argv(argv), stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        query = dns.message.make_query("example.test.", "A")

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"dnsmasq exited:\n{self.log}")
            try:
                topo.node.call(lambda: dns.query.tcp(query, address, timeout=0.5))
            except (OSError, dns.exception.DNSException):
                return False
            return True

        wait_for(answers, START_TIMEOUT_S, "dnsmasq to answer")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def packets(self) -> dict[str, int]:
        """Packets received on port 53 since the last :meth:`zero`, by protocol."""
        out = self.ns.run("iptables", "-w", "5", "-L", "INPUT", "-n", "-v", "-x").stdout
        counts = {"udp": 0, "tcp": 0}
        names = {"udp": "udp", "17": "udp", "tcp": "tcp", "6": "tcp"}  # -n prints numbers
        for line in out.splitlines():
            words = line.split()
            if len(words) > 3 and words[2] == "ACCEPT" and words[3] in names:
                counts[names[words[3]]] += int(words[0])
        return counts

    def zero(self) -> None:
        self.ns.run("iptables", "-w", "5", "-Z", "INPUT")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture
def upstream(topo: Topology, tmp_path: Path) -> Iterator[Upstream]:
    up = Upstream(topo, tmp_path)
    try:
        yield up
    finally:
        up.close()


# -- the proxy under test


class Proxy:
    """``python -m dnsproxy`` inside the node namespace; stderr kept for failure messages."""

    def __init__(
        self,
        topo: Topology,
        tmp_path: Path,
        *args: str,
        env: dict[str, str] | None = None,
        path_prefix: str | None = None,
        name: str = "dnsproxy",
    ) -> None:
        self.topo = topo
        self.stderr_path = tmp_path / f"{name}.stderr"
        self._stderr = self.stderr_path.open("wb")
        full_env = {**os.environ, "PATH": SBIN_PATH, **(env or {})}
        if path_prefix is not None:
            full_env["PATH"] = f"{path_prefix}{os.pathsep}{full_env['PATH']}"
        # `ip netns exec` execs the command, so this pid is dnsproxy's own (for SIGTERM).
        argv = [sys.executable, "-m", "dnsproxy", *args]
        self.proc = subprocess.Popen(
            topo.node.exec_argv(argv),
            cwd=ROOT,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def get(self, url: str) -> tuple[int, str]:
        return self.topo.node.call(lambda: http_get(url))

    def status(self, url: str) -> int | None:
        try:
            return self.get(url)[0]
        except OSError:
            return None

    def metric(self, sample: str) -> float:
        _, text = self.get(METRICS_URL + "/metrics")
        return metric_value(text, sample)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"dnsproxy exited with {self.proc.returncode}:\n{self.stderr}")

    def wait_ready(self) -> None:
        def ready() -> bool:
            self.alive()
            return self.status(METRICS_URL + "/ready") == 200

        try:
            wait_for(ready, START_TIMEOUT_S, "dnsproxy /ready")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.stderr}") from None

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"dnsproxy still running {timeout}s after SIGTERM") from None

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(timeout=EXIT_TIMEOUT_S)
        finally:
            self._stderr.close()


@contextlib.contextmanager
def proxy(
    topo: Topology,
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    path_prefix: str | None = None,
    name: str = "dnsproxy",
) -> Iterator[Proxy]:
    p = Proxy(topo, tmp_path, *args, env=env, path_prefix=path_prefix, name=name)
    try:
        yield p
    finally:
        p.close()


def write_config(
    tmp_path: Path,
    backend: str,
    *,
    listen: list[str],
    sync_s: float = 60,
    teardown: bool = True,
    lameduck_s: float = 0,
    health: bool = False,
    fallback_ip: str | None = None,
) -> str:
    """A node config forwarding every zone to the upstream over TCP."""
    doc = {
        "listen": listen,
        "http_listen": "127.0.0.1:9253",
        "health_listen": f"{LOCAL_IP}:8080" if health else None,
        "acl": {"allow": []},
        "zones": [
            {
                "zone": "cluster.local",
                "upstreams": [UPSTREAM_IP],
                "cache": {"max_ttl_s": 30, "denial_max_ttl_s": 5},
            },
            {"zone": ".", "upstreams": [UPSTREAM_IP]},
        ],
        "shutdown": {"grace_s": 1, "lameduck_s": lameduck_s},
        "node": {
            "rules": backend,
            "sync_interval_s": sync_s,
            "teardown": teardown,
            "fallback_ip": fallback_ip,
        },
    }
    path = tmp_path / "node.yaml"
    path.write_text(json.dumps(doc))  # JSON is YAML
    return str(path)


# -- observing the node namespace


def our_rules(topo: Topology) -> list[str]:
    """Comments of every dnsproxy rule in the node namespace, in both backends, with copies."""
    found: list[str] = []
    for binary in ("iptables", "ip6tables"):
        for table in ("raw", "filter"):
            out = topo.node.run(binary, "-w", "5", "-t", table, "-S").stdout
            found += re.findall(r'--comment "(dnsproxy:[^"]*)"', out)
    listing = topo.node.run("nft", "list", "table", "inet", "dnsproxy", check=False)
    if listing.returncode == 0:
        found += re.findall(r'comment "(dnsproxy:[^"]*)"', listing.stdout)
    return found


def local_addresses(topo: Topology) -> dict[str, str]:
    """Every address in the node namespace -> the device holding it."""
    links = json.loads(topo.node.run("ip", "-j", "addr", "show").stdout)
    return {a["local"]: link["ifname"] for link in links for a in link.get("addr_info", [])}


def conntrack_entries(topo: Topology, family: str, dst: str) -> list[str]:
    out = topo.node.run("conntrack", "-L", "-f", family, "-d", dst, check=False)
    return [line for line in out.stdout.splitlines() if line.strip()]


def poke(topo: Topology, addr: str) -> None:
    """A UDP datagram from the pod to ADDR:53, where nothing answers (a conntrack control)."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET

    def send() -> None:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.sendto(dns.message.make_query("poke.example.test.", "A").to_wire(), (addr, 53))

    topo.pod.call(send)


def getent(topo: Topology, name: str) -> str:
    result = topo.pod.run("getent", "ahosts", name, check=False, timeout=20)
    assert result.returncode == 0, f"getent ahosts {name} failed ({result.returncode})"
    return result.stdout


def ask(topo: Topology, server: str, name: str = "example.test.") -> str:
    query = dns.message.make_query(name, "A")
    reply = topo.pod.call(lambda: dns.query.udp(query, server, timeout=2))
    return str(reply.answer[0][0]) if reply.answer else ""


def stop(p: Proxy) -> None:
    p.terminate()
    assert p.wait_exit() == 0, p.stderr


# -- the tests


def test_glibc_pod_resolves_through_the_shipped_config_without_conntrack(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    tool("getent", "libc-bin")
    tool("conntrack", "conntrack")
    # "." of the shipped file is the node's resolv.conf (ip netns exec bind-mounts this one).
    topo.set_resolv_conf(topo.node, f"nameserver {UPSTREAM_IP}\n")
    env = {"KUBE_DNS_UPSTREAM_SERVICE_HOST": UPSTREAM_IP}
    args = ("--config", str(NODELOCAL), "--rules", backend, "--lameduck", "0")
    with proxy(topo, tmp_path, *args, env=env) as p:
        p.wait_ready()
        # With the health port 8080, and the fallback of fallback_ip (nftables only).
        fallback = FALLBACK_RULES_PER_IP if backend == "nftables" else 0
        assert len(our_rules(topo)) == RULES_PER_IP + 2 + fallback
        device = local_addresses(topo).get(LOCAL_IP)
        assert device in ("nodelocaldns", "lo")
        if device == "lo":  # this kernel has no dummy links: the fallback, and it says so
            assert "no dummy links" in p.stderr
        assert p.status(f"http://{LOCAL_IP}:8080/health") == 200
        upstream.zero()  # start-up resolved the endpoint's own name over UDP (getfqdn)

        out = getent(topo, "kubernetes.default")
        assert f"{KUBERNETES_IP}   STREAM kubernetes.default.svc.cluster.local" in out
        assert EXTERNAL_IP in getent(topo, "example.test")
        code = (
            "import socket; print(sorted({a[4][0] for a in "
            "socket.getaddrinfo('kubernetes.default', 443, type=socket.SOCK_STREAM)}))"
        )
        result = topo.pod.run(sys.executable, "-c", code)
        assert result.stdout.strip() == f"['{KUBERNETES_IP}']"
        # TCP too (a truncated answer's retry): its handshake must skip conntrack as well.
        query = dns.message.make_query("example.test.", "A")
        reply = topo.pod.call(lambda: dns.query.tcp(query, LOCAL_IP, timeout=5))
        assert [str(r) for rrset in reply.answer for r in rrset] == [EXTERNAL_IP]

        # ndots:5 tried the first search suffix first, and it reached the upstream from the
        # node's address: through the proxy.
        log = upstream.log
        assert "query[A] kubernetes.default.default.svc.cluster.local from 169.254.60.1" in log
        assert "from 169.254.50.2" not in log  # never straight from the pod
        assert p.metric('dnsproxy_requests_total{proto="udp"}') >= 6
        assert p.metric("dnsproxy_cache_hits_total") >= 1  # getaddrinfo after getent

        # No conntrack entry for the client traffic, while conntrack is on (the control).
        poke(topo, NODE_POD_IP)
        assert conntrack_entries(topo, "ipv4", NODE_POD_IP), "conntrack is not tracking"
        assert conntrack_entries(topo, "ipv4", LOCAL_IP) == []
        assert topo.node.run("conntrack", "-L", "-s", LOCAL_IP, check=False).stdout == ""

        packets = upstream.packets()
        assert packets["udp"] == 0, packets
        assert packets["tcp"] > 0, packets

        stop(p)
    assert our_rules(topo) == []
    assert LOCAL_IP not in local_addresses(topo)
    assert "nodelocaldns" not in topo.node.run("ip", "link").stdout


def test_transparent_cluster_ip_is_answered_then_falls_back(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    tool("getent", "libc-bin")
    topo.set_pod_nameserver(CLUSTER_IP)  # the pod keeps kube-dns in its resolv.conf
    config = write_config(tmp_path, backend, listen=[f"{LOCAL_IP}:53", f"{CLUSTER_IP}:53"])
    with proxy(topo, tmp_path, "--config", config) as p:
        p.wait_ready()
        assert len(our_rules(topo)) == 2 * RULES_PER_IP
        upstream.zero()
        before = p.metric('dnsproxy_requests_total{proto="udp"}')
        assert EXTERNAL_IP in getent(topo, "example.test")
        assert p.metric('dnsproxy_requests_total{proto="udp"}') > before
        # NOTRACK kept kube-proxy's DNAT away: nothing from the pod reached the upstream.
        assert upstream.packets()["udp"] == 0
        stop(p)
    assert our_rules(topo) == []
    assert CLUSTER_IP not in local_addresses(topo)
    # After a clean shutdown the ClusterIP is kube-dns again, through the DNAT.
    upstream.zero()
    assert EXTERNAL_IP in getent(topo, "example.test")
    assert upstream.packets()["udp"] > 0
    assert "from 169.254.50.2" in upstream.log


def test_teardown_off_leaves_rules_and_addresses(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    config = write_config(tmp_path, backend, listen=[f"{LOCAL_IP}:53"], teardown=False)
    with proxy(topo, tmp_path, "--config", config) as p:
        p.wait_ready()
        assert ask(topo, LOCAL_IP) == EXTERNAL_IP
        stop(p)
    assert len(our_rules(topo)) == RULES_PER_IP
    assert LOCAL_IP in local_addresses(topo)
    # (the namespace's deletion removes them)


BOUND_UDP_SPEC = ("-p", "udp", "-d", LOCAL_IP, "--dport", "53", "-m", "socket", "--nowildcard")


def _delete_one_rule(topo: Topology, backend: str) -> str:
    comment = f"dnsproxy: notrack queries to {LOCAL_IP} udp/53 while bound"
    if backend == "iptables":
        topo.node.run("iptables", "-w", "5", "-t", "raw", "-D", "PREROUTING", *BOUND_UDP_SPEC,
                      "-m", "comment", "--comment", comment, "-j", "NOTRACK")  # fmt: skip
    else:
        listing = topo.node.run("nft", "-a", "list", "table", "inet", "dnsproxy").stdout
        handle = re.search(rf'comment "{re.escape(comment)}" # handle (\d+)', listing)
        assert handle is not None, listing
        topo.node.run("nft", "delete", "rule", "inet", "dnsproxy", "raw_prerouting",
                      "handle", handle[1])  # fmt: skip
    assert comment not in our_rules(topo)
    return comment


def test_sync_adds_back_what_was_deleted_and_never_duplicates(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    config = write_config(tmp_path, backend, listen=[f"{LOCAL_IP}:53"], sync_s=1)
    with proxy(topo, tmp_path, "--config", config) as p:
        p.wait_ready()
        comment = _delete_one_rule(topo, backend)
        device = local_addresses(topo)[LOCAL_IP]
        topo.node.run("ip", "addr", "del", f"{LOCAL_IP}/32", "dev", device)
        started = time.monotonic()
        wait_for(
            lambda: comment in our_rules(topo) and LOCAL_IP in local_addresses(topo),
            4.0,  # one interval (1 s), the sync's own commands, slack for a loaded CI host
            "the rule and the address to be back",
        )
        assert time.monotonic() - started < 3.5
        assert p.metric("dnsproxy_node_rules_readded_total") >= 1
        assert p.metric("dnsproxy_node_addresses_readded_total") == 1
        assert ask(topo, LOCAL_IP) == EXTERNAL_IP  # the listener serves the re-added address

        if backend == "iptables":
            # A copy added by someone else is removed again.
            topo.node.run("iptables", "-w", "5", "-t", "raw", "-A", "PREROUTING",
                          *BOUND_UDP_SPEC, "-m", "comment", "--comment", comment,
                          "-j", "NOTRACK")  # fmt: skip
            assert our_rules(topo).count(comment) == 2
        syncs = p.metric("dnsproxy_node_syncs_total")
        wait_for(
            lambda: p.metric("dnsproxy_node_syncs_total") >= syncs + 4,
            8.0,
            "four more syncs",
            interval=0.2,
        )
        rules = our_rules(topo)
        assert len(rules) == RULES_PER_IP
        assert len(set(rules)) == RULES_PER_IP
        assert (
            sum(
                p.metric(f'dnsproxy_node_setup_errors_total{{errortype="{kind}"}}')
                for kind in ("iptables", "iptables_lock", "nftables", "interface_add")
            )
            == 0
        )
        stop(p)
    assert our_rules(topo) == []


def _slow_tool_dir(tmp_path: Path, name: str, delay_s: float) -> str:
    """A directory whose NAME sleeps before its first run, then runs the real one."""
    real = tool(name, "iptables" if "tables" in name else "nftables")
    directory = tmp_path / "slow-bin"
    directory.mkdir(exist_ok=True)
    marker = tmp_path / f"{name}.slowed"
    script = directory / name
    script.write_text(
        "#!/bin/sh\n"
        f'if [ ! -e "{marker}" ]; then touch "{marker}"; sleep {delay_s}; fi\n'
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    return str(directory)


def test_ready_only_with_rules_and_not_during_lameduck(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    config = write_config(tmp_path, backend, listen=[f"{LOCAL_IP}:53"], lameduck_s=2.0, health=True)
    slow = _slow_tool_dir(tmp_path, "iptables" if backend == "iptables" else "nft", 2.0)
    health = f"http://{LOCAL_IP}:8080"
    with proxy(topo, tmp_path, "--config", config, path_prefix=slow) as p:
        # While the rules command is slow: queries answered, /health 200, /ready 503.
        seen: list[tuple[int | None, int | None]] = []

        def answered_before_ready() -> bool:
            p.alive()
            try:
                answer = ask(topo, LOCAL_IP)
            except (OSError, dns.exception.DNSException):
                return False
            seen.append((p.status(health + "/ready"), p.status(health + "/health")))
            return answer == EXTERNAL_IP

        wait_for(answered_before_ready, START_TIMEOUT_S, "an answer before the rules")
        assert seen[-1] == (503, 200), (seen, p.stderr)
        assert our_rules(topo) == []
        p.wait_ready()
        assert len(our_rules(topo)) == RULES_PER_IP + 2

        p.terminate()
        wait_for(lambda: p.status(health + "/ready") == 503, 2.0, "/ready 503 after SIGTERM")
        assert p.status(health + "/health") == 200
        assert ask(topo, LOCAL_IP) == EXTERNAL_IP  # lameduck: still serving
        assert len(our_rules(topo)) == RULES_PER_IP + 2
        assert p.proc.poll() is None
        assert p.wait_exit() == 0, p.stderr
    assert our_rules(topo) == []
    assert LOCAL_IP not in local_addresses(topo)


def test_ipv6_local_address_serves_glibc_in_the_same_process(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    tool("getent", "libc-bin")
    tool("conntrack", "conntrack")
    topo.set_pod_nameserver(LOCAL_IP6)
    config = write_config(tmp_path, backend, listen=[f"{LOCAL_IP}:53", f"[{LOCAL_IP6}]:53"])
    with proxy(topo, tmp_path, "--config", config) as p:
        p.wait_ready()
        rules = our_rules(topo)
        assert len(rules) == 2 * RULES_PER_IP
        assert sum(LOCAL_IP6 in r for r in rules) == RULES_PER_IP
        assert LOCAL_IP6 in local_addresses(topo)
        out = getent(topo, "kubernetes.default")
        assert f"{KUBERNETES_IP}   STREAM kubernetes.default.svc.cluster.local" in out
        out = getent(topo, "example.test")
        assert EXTERNAL_IP6 in out and EXTERNAL_IP in out
        assert p.metric('dnsproxy_requests_total{proto="udp"}') >= 4
        poke(topo, NODE_POD_IP6)
        assert conntrack_entries(topo, "ipv6", NODE_POD_IP6), "conntrack is not tracking"
        assert conntrack_entries(topo, "ipv6", LOCAL_IP6) == []
        stop(p)
    assert our_rules(topo) == []
    addresses = local_addresses(topo)
    assert LOCAL_IP6 not in addresses and LOCAL_IP not in addresses


# -- the fail-safe: what pods see when dnsproxy dies without teardown

PINNED_PORT = 20053  # a pod's UDP flow from one source port, as a long-lived stub keeps it
IPVS_IP = "169.254.40.10"  # a ClusterIP as IPVS makes it: an address of the node itself
IPVS_EXAMPLE_IP = "169.254.100.4"  # what the CoreDNS behind it answers for example.test

# (backend, mode): the modes where a fallback applies. Link-local with iptables has none
# (test_iptables_link_local_ip_has_no_fallback_and_says_so).
FAILSAFE_CASES = [
    ("iptables", "transparent"),
    ("nftables", "transparent"),
    ("nftables", "link-local"),
]


def failsafe_setup(
    topo: Topology, tmp_path: Path, backend: str, mode: str, *, teardown: bool = True
) -> tuple[str, str]:
    """(the pod's nameserver, the config file) for ``mode``.

    Transparent: the pod asks the ClusterIP, which is also a local IP; no fallback_ip, so
    the fallback is kube-proxy's own DNAT. Link-local: the pod asks 169.254.20.10, whose
    fallback_ip is the ClusterIP (standing in for kube-dns-upstream's), which kube-proxy
    (iptables mode) translates.
    """
    if backend == "nftables":
        tool("nft", "nftables")
    tool("conntrack", "conntrack")
    transparent = mode == "transparent"
    server = CLUSTER_IP if transparent else LOCAL_IP
    topo.set_pod_nameserver(server)
    listen = [f"{LOCAL_IP}:53", *([f"{CLUSTER_IP}:53"] if transparent else [])]
    fallback_ip = None if transparent else CLUSTER_IP
    config = write_config(tmp_path, backend, listen=listen, fallback_ip=fallback_ip,
                          teardown=teardown)  # fmt: skip
    return server, config


def start_load(topo: Topology, tmp_path: Path, server: str) -> PodLoad:
    return PodLoad(
        topo,
        tmp_path,
        server=server,
        glibc_name="kubernetes.default",  # through the search list, as pods ask
        name="kubernetes.default.svc.cluster.local.",
        expect=KUBERNETES_IP,
    )


def ask_from(topo: Topology, server: str, port: int) -> str:
    """A query from the pod's fixed source ``port``: one UDP flow for conntrack."""
    query = dns.message.make_query("example.test.", "A")
    reply = topo.pod.call(
        lambda: dns.query.udp(query, server, timeout=2, source=POD_IP, source_port=port)
    )
    return str(reply.answer[0][0]) if reply.answer else ""


def flow_entries(topo: Topology, sport: int) -> list[str]:
    out = topo.node.run("conntrack", "-L", "-p", "udp", "--sport", str(sport), check=False)
    return [line for line in out.stdout.splitlines() if line.strip()]


def node_answer(topo: Topology, server: str) -> str | None:
    """A query sent by the node itself (as a hostNetwork pod's), or None without an answer."""
    query = dns.message.make_query("example.test.", "A")
    try:
        reply = topo.node.call(lambda: dns.query.udp(query, server, timeout=1.5))
    except (OSError, dns.exception.DNSException):
        return None
    return str(reply.answer[0][0]) if reply.answer else ""


def assert_no_failed_query(what: str, result: dict[str, Any]) -> None:
    """Print the figures (pytest -s shows them), then check that no client gave up."""
    clients = ("glibc", "dnspython")
    line = f"{what}: " + "; ".join(
        f"{c}: {result[c]['ok']} answered, {result[c]['failed']} failed, longest gap "
        f"{result[c]['longest_gap_s'] * 1000:.0f} ms"
        for c in clients
    )
    print(line)
    assert all(result[c]["failed"] == 0 for c in clients), (line, result)


@pytest.mark.parametrize(("rules", "mode"), FAILSAFE_CASES)
def test_kill_9_under_load_falls_back_to_coredns_then_the_next_instance_takes_over(
    topo: Topology, upstream: Upstream, tmp_path: Path, rules: str, mode: str
) -> None:
    server, config = failsafe_setup(topo, tmp_path, rules, mode)
    with proxy(topo, tmp_path, "--config", config, name="first") as first:
        first.wait_ready()
        installed = len(our_rules(topo))
        assert first.metric("dnsproxy_node_rules_left_over") == 0
        assert "no rules of a previous instance found" in first.stderr
        upstream.zero()
        load = start_load(topo, tmp_path, server)
        try:
            load.wait_answered(30, START_TIMEOUT_S, "while dnsproxy runs")
            # Alive: every query went through the proxy, none through conntrack.
            assert upstream.packets()["udp"] == 0
            assert conntrack_entries(topo, "ipv4", server) == []
            assert node_answer(topo, server) == EXTERNAL_IP  # the node's own query too

            first.proc.kill()  # SIGKILL: no teardown, as an OOM kill
            first.proc.wait(timeout=EXIT_TIMEOUT_S)
            load.wait_answered(50, 30.0, "after kill -9")
            # CoreDNS answered the pods directly, through kube-proxy's DNAT.
            assert upstream.packets()["udp"] > 0
            assert len(our_rules(topo)) == installed  # the rules and address stayed
            assert server in local_addresses(topo)
            # The limit: the node's own queries cannot be made conditional (OUTPUT).
            assert node_answer(topo, server) is None
            # A flow answered by CoreDNS leaves a conntrack entry behind.
            assert ask_from(topo, server, PINNED_PORT) == EXTERNAL_IP
            assert flow_entries(topo, PINNED_PORT)

            with proxy(topo, tmp_path, "--config", config, name="second") as second:
                second.wait_ready()
                assert second.metric("dnsproxy_node_rules_left_over") == installed
                assert f"{installed} of our rules were in place at start" in second.stderr
                assert len(our_rules(topo)) == installed  # adopted, not duplicated
                before = second.metric('dnsproxy_requests_total{proto="udp"}')
                upstream.zero()
                load.wait_answered(50, 30.0, "after the restart")
                # The pinned flow moves back too: NOTRACK comes before conntrack's lookup,
                # so the entry made during the fallback does not matter (no flush needed).
                assert flow_entries(topo, PINNED_PORT)
                assert ask_from(topo, server, PINNED_PORT) == EXTERNAL_IP
                assert upstream.packets()["udp"] == 0
                assert second.metric('dnsproxy_requests_total{proto="udp"}') > before + 50
                assert node_answer(topo, server) == EXTERNAL_IP
                result = load.stop()
                stop(second)
        finally:
            load.close()
    assert_no_failed_query(f"kill -9 then restart, {rules}, {mode}", result)
    assert our_rules(topo) == []


@pytest.mark.parametrize(
    ("rules", "mode", "teardown"),
    [
        ("iptables", "transparent", True),
        ("nftables", "transparent", True),
        ("nftables", "link-local", False),
    ],
)
def test_sigterm_then_start_restart_loses_no_query(
    topo: Topology, upstream: Upstream, tmp_path: Path, rules: str, mode: str, teardown: bool
) -> None:
    """No handover: the old instance stops, the new one starts; CoreDNS answers the gap."""
    server, config = failsafe_setup(topo, tmp_path, rules, mode, teardown=teardown)
    with proxy(topo, tmp_path, "--config", config, name="first") as first:
        first.wait_ready()
        load = start_load(topo, tmp_path, server)
        try:
            load.wait_answered(30, START_TIMEOUT_S, "while dnsproxy runs")
            upstream.zero()
            stop(first)
            # No instance runs: CoreDNS answers the pods.
            load.wait_answered(20, 30.0, "while no instance runs")
            assert upstream.packets()["udp"] > 0
            # The node's own queries: through kube-proxy once the rules are gone, unanswered
            # while the unconditional OUTPUT rule stays (teardown off).
            assert node_answer(topo, server) == (EXTERNAL_IP if teardown else None)
            with proxy(topo, tmp_path, "--config", config, name="second") as second:
                second.wait_ready()
                load.wait_answered(50, 30.0, "after the restart")
                result = load.stop()
                stop(second)
        finally:
            load.close()
    assert_no_failed_query(f"SIGTERM then start, {rules}, {mode}, teardown {teardown}", result)


@pytest.mark.parametrize("target", ["endpoint", "local address"])
def test_link_local_fallback_to_an_address_kube_proxy_does_not_translate(
    topo: Topology, upstream: Upstream, tmp_path: Path, target: str
) -> None:
    """fallback_ip need not be a ClusterIP kube-proxy DNATs: an endpoint, or an address of
    the node itself as IPVS makes every ClusterIP (this kernel may lack IPVS: a dnsmasq
    bound to such an address stands in for the virtual server)."""
    tool("nft", "nftables")
    tool("getent", "libc-bin")
    topo.set_pod_nameserver(LOCAL_IP)
    expected = EXTERNAL_IP
    local: Upstream | None = None
    if target == "local address":
        topo.node.run("ip", "addr", "add", f"{IPVS_IP}/32", "dev", "lo")
        local = Upstream(topo, tmp_path, topo.node, IPVS_IP, example_ip=IPVS_EXAMPLE_IP)
        expected = IPVS_EXAMPLE_IP
    try:
        fallback_ip = UPSTREAM_IP if local is None else IPVS_IP
        config = write_config(tmp_path, "nftables", listen=[f"{LOCAL_IP}:53"],
                              fallback_ip=fallback_ip)  # fmt: skip
        with proxy(topo, tmp_path, "--config", config) as p:
            p.wait_ready()
            assert ask(topo, LOCAL_IP) == EXTERNAL_IP
            p.proc.kill()
            p.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert ask(topo, LOCAL_IP) == expected
        assert expected in getent(topo, "example.test")
    finally:
        if local is not None:
            local.close()


def test_iptables_link_local_ip_has_no_fallback_and_says_so(
    topo: Topology, upstream: Upstream, tmp_path: Path
) -> None:
    """The documented limit: iptables cannot rewrite before kube-proxy's DNAT."""
    config = write_config(tmp_path, "iptables", listen=[f"{LOCAL_IP}:53"],
                          fallback_ip=CLUSTER_IP)  # fmt: skip
    with proxy(topo, tmp_path, "--config", config) as p:
        p.wait_ready()
        assert "the iptables backend cannot rewrite" in p.stderr
        assert len(our_rules(topo)) == RULES_PER_IP
        assert ask(topo, LOCAL_IP) == EXTERNAL_IP
        p.proc.kill()
        p.proc.wait(timeout=EXIT_TIMEOUT_S)
    with pytest.raises(dns.exception.Timeout):
        ask(topo, LOCAL_IP)
