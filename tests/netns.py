"""Network-namespace topology for the node tests (DESIGN.md §6), and ways to act inside it.

Three namespaces joined by veth pairs, created fresh for each test and deleted afterwards
(also when the test fails), named ``dnsp-<pid>-<n>-{node,pod,up}`` so that parallel runs and
left-overs of a killed run never collide::

    pod 169.254.50.2 ──veth── 169.254.50.1 node 169.254.60.1 ──veth── 169.254.60.2 up
        2001:db8:50::2         2001:db8:50::1      2001:db8:60::1          2001:db8:60::2

The node namespace forwards between the two and holds what kube-proxy (iptables mode)
would: a DNAT of the simulated kube-dns ClusterIP 169.254.30.10 to the upstream, for pods
(nat PREROUTING) and for the node itself (nat OUTPUT), plus the common host-firewall rule
that drops conntrack-INVALID packets (which also turns conntrack on for both families, so
that "no conntrack entry" means something). The pod's resolv.conf
(``/etc/netns/<pod>/resolv.conf``, bind-mounted by ``ip netns exec``) is the Kubernetes one.

:class:`PodLoad` runs ``podload.py`` in the pod namespace: a bounded query load by glibc
and dnspython that counts failed queries and the longest gap between answers.

Addresses come only from 169.254.0.0/16 and 2001:db8::/32. Nothing here touches the host's
own namespace except the ``/etc/netns/<name>`` directories, which are removed too.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
ETC_NETNS = Path("/etc/netns")
RUN_NETNS = Path("/run/netns")
_CLONE_NEWNET = 0x40000000

LOCAL_IP = "169.254.20.10"  # the NodeLocal DNSCache convention
LOCAL_IP6 = "2001:db8:20::10"
CLUSTER_IP = "169.254.30.10"  # the simulated kube-dns Service, DNAT'ed to the upstream
NODE_POD_IP, POD_IP = "169.254.50.1", "169.254.50.2"
NODE_POD_IP6, POD_IP6 = "2001:db8:50::1", "2001:db8:50::2"
NODE_UP_IP, UPSTREAM_IP = "169.254.60.1", "169.254.60.2"
NODE_UP_IP6, UPSTREAM_IP6 = "2001:db8:60::1", "2001:db8:60::2"

POD_RESOLV_CONF = (
    "search default.svc.cluster.local svc.cluster.local cluster.local\n"
    "options ndots:5\n"
    "nameserver {nameserver}\n"
)

_counter = itertools.count()


def tool(name: str, package: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return path


def require_root_and_tools(*extra: tuple[str, str]) -> None:
    """Skip with the reason unless this runs as root with ip (and ``extra``) installed."""
    if os.geteuid() != 0:
        pytest.skip("node tests need root (network namespaces, iptables, nftables)")
    for name, package in (("ip", "iproute2"), *extra):
        tool(name, package)


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 15.0, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": SBIN_PATH, "LC_ALL": "C"}
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, env=env
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()}"
        )
    return result


_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class NetNs:
    name: str

    def exec_argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 15.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return run(self.exec_argv(argv), check=check, timeout=timeout, input=input)

    def call(self, fn: Callable[[], T], timeout: float = 20.0) -> T:
        """``fn()`` in a thread that has entered this namespace (sockets it opens stay there).

        setns(CLONE_NEWNET) changes only the calling thread, so the test's own thread never
        leaves the host namespace. No mount namespace is entered: for glibc's view of
        /etc/resolv.conf use :meth:`run` (``ip netns exec`` bind-mounts /etc/netns/NAME).
        """
        box: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                fd = os.open(RUN_NETNS / self.name, os.O_RDONLY)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns {self.name}: {os.strerror(err)}")
                finally:
                    os.close(fd)
                box.append(fn())
            except BaseException as exc:
                error.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{self.name}", daemon=True)
        thread.start()
        thread.join(timeout)
        if thread.is_alive():
            raise AssertionError(f"call in {self.name} still running after {timeout}s")
        if error:
            raise error[0]
        return box[0]


@dataclass
class Topology:
    node: NetNs
    pod: NetNs
    upstream: NetNs
    tag: str
    etc_dirs: list[Path] = field(default_factory=list)

    def set_resolv_conf(self, ns: NetNs, text: str) -> None:
        directory = ETC_NETNS / ns.name
        directory.mkdir(parents=True, exist_ok=True)
        if directory not in self.etc_dirs:
            self.etc_dirs.append(directory)
        (directory / "resolv.conf").write_text(text)

    def set_pod_nameserver(self, nameserver: str) -> None:
        self.set_resolv_conf(self.pod, POD_RESOLV_CONF.format(nameserver=nameserver))


def _build(topo: Topology) -> None:
    node, pod, up = topo.node, topo.pod, topo.upstream
    for ns in (node, pod, up):
        run(["ip", "netns", "add", ns.name])
        run(["ip", "-n", ns.name, "link", "set", "lo", "up"])
    # veths are created inside the namespaces, so no name is ever taken in the host's.
    run(["ip", "-n", node.name, "link", "add", "to-pod", "type", "veth",
         "peer", "name", "eth0", "netns", pod.name])  # fmt: skip
    run(["ip", "-n", node.name, "link", "add", "to-up", "type", "veth",
         "peer", "name", "eth0", "netns", up.name])  # fmt: skip
    links = (
        (node, "to-pod", NODE_POD_IP, NODE_POD_IP6),
        (pod, "eth0", POD_IP, POD_IP6),
        (node, "to-up", NODE_UP_IP, NODE_UP_IP6),
        (up, "eth0", UPSTREAM_IP, UPSTREAM_IP6),
    )
    for ns, dev, ip4, ip6 in links:
        run(["ip", "-n", ns.name, "addr", "add", f"{ip4}/30", "dev", dev])
        run(["ip", "-n", ns.name, "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad"])
        run(["ip", "-n", ns.name, "link", "set", dev, "up"])
    for ns, gw4, gw6 in ((pod, NODE_POD_IP, NODE_POD_IP6), (up, NODE_UP_IP, NODE_UP_IP6)):
        run(["ip", "-n", ns.name, "route", "add", "default", "via", gw4])
        run(["ip", "-n", ns.name, "-6", "route", "add", "default", "via", gw6])
    node.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    node.run("sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1")
    # kube-proxy (iptables mode) for the kube-dns Service: pods' packets and the node's own.
    for chain in ("PREROUTING", "OUTPUT"):
        for proto in ("udp", "tcp"):
            node.run("iptables", "-w", "5", "-t", "nat", "-A", chain, "-d", CLUSTER_IP,
                     "-p", proto, "--dport", "53", "-j", "DNAT",
                     "--to-destination", f"{UPSTREAM_IP}:53")  # fmt: skip
    # A node sends a ClusterIP to its default gateway, where kube-proxy's nat OUTPUT DNAT
    # then takes it; a route for this one address does that without making every other
    # address look routable from the node.
    node.run("ip", "route", "add", f"{CLUSTER_IP}/32", "via", UPSTREAM_IP)
    for binary in ("iptables", "ip6tables"):
        node.run(binary, "-w", "5", "-A", "INPUT", "-m", "conntrack",
                 "--ctstate", "INVALID", "-j", "DROP")  # fmt: skip
    topo.set_pod_nameserver(LOCAL_IP)


def _destroy(topo: Topology) -> list[str]:
    problems: list[str] = []
    for ns in (topo.pod, topo.upstream, topo.node):
        # Processes left inside would keep nothing alive (the namespace goes with its last
        # reference), but kill them so no test leaves one behind.
        pids = run(["ip", "netns", "pids", ns.name], check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        if (RUN_NETNS / ns.name).exists():
            result = run(["ip", "netns", "delete", ns.name], check=False)
            if result.returncode != 0:
                problems.append(f"ip netns delete {ns.name}: {result.stderr.strip()}")
    for directory in topo.etc_dirs:
        shutil.rmtree(directory, ignore_errors=True)
    return problems


@contextlib.contextmanager
def topology() -> Iterator[Topology]:
    """A fresh node/pod/upstream topology, removed on the way out whatever happens."""
    require_root_and_tools(("iptables", "iptables"), ("ip6tables", "iptables"))
    tag = f"dnsp-{os.getpid()}-{next(_counter)}"
    topo = Topology(NetNs(f"{tag}-node"), NetNs(f"{tag}-pod"), NetNs(f"{tag}-up"), tag)
    etc_existed = ETC_NETNS.exists()
    try:
        _build(topo)
        yield topo
    finally:
        problems = _destroy(topo)
        if not etc_existed:
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only if empty: another run may be using it
        assert not problems, problems


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until true; bounded in time (and so in count)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class PodLoad:
    """``podload.py`` in the pod namespace: glibc and dnspython asking in a loop, bounded.

    glibc asks ``glibc_name`` through the pod's resolv.conf; dnspython asks ``name`` of
    ``server``; both must get ``expect``. :meth:`stop` ends it and returns the counts.
    """

    def __init__(
        self,
        topo: Topology,
        tmp_path: Path,
        *,
        server: str,
        glibc_name: str,
        name: str,
        expect: str,
        max_s: float = 60.0,
    ) -> None:
        self.status_path = tmp_path / "podload.json"
        self.stop_path = tmp_path / "podload.stop"
        self.stop_path.unlink(missing_ok=True)
        self.status_path.unlink(missing_ok=True)
        script = Path(__file__).resolve().parent / "podload.py"
        argv = [sys.executable, str(script), "--server", server, "--glibc-name", glibc_name,
                "--name", name, "--expect", expect, "--stop-file", str(self.stop_path),
                "--status", str(self.status_path), "--max-s", str(max_s)]  # fmt: skip
        self._stderr = (tmp_path / "podload.stderr").open("wb")
        self.proc = subprocess.Popen(
            topo.pod.exec_argv(argv),
            env={**os.environ, "PATH": SBIN_PATH},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    def status(self) -> dict[str, Any]:
        try:
            doc: dict[str, Any] = json.loads(self.status_path.read_text())
        except (OSError, ValueError):  # not written yet
            doc = {}
        if self.proc.poll() is not None and not doc.get("done"):
            raise AssertionError(f"podload exited with {self.proc.returncode}")
        return doc

    def answered(self) -> int:
        """Queries answered so far by the client that has answered fewer."""
        doc = self.status()
        return min((doc.get(c, {}).get("ok", 0) for c in ("glibc", "dnspython")), default=0)

    def wait_answered(self, more: int, timeout: float, what: str) -> None:
        """Wait until each client has answered ``more`` queries beyond what it has now."""
        target = self.answered() + more
        wait_for(lambda: self.answered() >= target, timeout, f"{more} answers {what}", 0.05)

    def stop(self) -> dict[str, Any]:
        self.stop_path.touch()
        try:
            self.proc.wait(timeout=40)  # glibc's two 5 s attempts per name, at worst
        finally:
            self.close()
        doc = self.status()
        assert doc.get("done"), doc
        return doc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._stderr.close()
