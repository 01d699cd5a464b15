"""The container image, run the way a kubelet runs the rendered DaemonSet.

``make image`` builds ``localhost/dnsproxy:latest`` (``.ci/run`` does it before ``make
test``). These tests take everything about the container from what ``kubectl kustomize``
renders: image, args and env (with the Service variables a kubelet adds, ``$(VAR)``
expanded), the ConfigMap as files at its ``mountPath``, the hostPath volumes (stand-ins
made under the test's directory, created as their ``type`` says), the security context
(user, capabilities added, read-only root, no privilege escalation), the probes and the
grace period. The node is the ``node`` namespace of ``netns.py`` (``--network ns:``, as
hostNetwork), dnsmasq in the ``upstream`` namespace is CoreDNS behind kube-dns-upstream and
the node's resolver, and glibc in the ``pod`` namespace is the client. Only the cluster
value that must differ here is changed, in its one place: the kube-dns ClusterIP, to the
simulated one (169.254.30.10) the topology DNATs to CoreDNS.

Skipped with the reason when not root, when podman or kubectl is missing, or when no image
built from this tree exists (then run ``make image``); under ``CI=true`` a missing or stale
image is a failure instead, since ``.ci/run`` builds it. Every container is removed, also
when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest
from fakeupstream import FakeUpstream, zone_handler
from kube import ROOT, Container, container, copy_tree, render, set_values
from netns import (
    CLUSTER_IP,
    LOCAL_IP,
    UPSTREAM_IP,
    Topology,
    tool,
    topology,
    wait_for,
)
from test_node_netns import (
    EXTERNAL_IP,
    FALLBACK_RULES_PER_IP,
    KUBERNETES_IP,
    RULES_PER_IP,
    Upstream,
    getent,
    local_addresses,
    our_rules,
)
from test_process import RECORDS, free_port, http_get, metric_value

import dnsproxy

sys.path.insert(0, str(ROOT / "deploy"))
import source_digest

CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
MAX_IMAGE_BYTES = 250 * 1000 * 1000
START_TIMEOUT_S = 30.0
HEALTH_RULES_PER_IP = 2  # the liveness probe's port, both directions


def podman(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (.ci/run builds the image with `make image`)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    """The image `make image` built from this tree."""
    if os.geteuid() != 0:
        pytest.skip("the image tests need root (podman, network namespaces)")
    if shutil.which("podman") is None:
        _unavailable("podman not installed (apt-get install podman runc)")
    name = "localhost/dnsproxy:latest"
    found = podman("image", "inspect", name, check=False)
    if not found.strip() or found.strip() == "[]":
        _unavailable(f"no image {name}: run make image")
    labels = json.loads(found)[0]["Config"]["Labels"]
    if labels.get("dev.dnsproxy.source-digest") != source_digest.digest():
        _unavailable(f"{name} was built from other sources: run make image")
    return name


@contextlib.contextmanager
def running(name: str, argv: list[str]) -> Iterator[str]:
    """``podman run -d ARGV`` as container NAME, removed on the way out."""
    podman("rm", "--force", "--ignore", name, check=False)
    try:
        podman("run", "--detach", "--name", name, *argv, timeout=120)
        yield name
    finally:
        podman("rm", "--force", "--ignore", "--time", "0", name, check=False)


# -- facts about the image


def test_image_is_small_debian_python_with_the_node_tools(image: str) -> None:
    info = json.loads(podman("image", "inspect", image))[0]
    assert info["Size"] < MAX_IMAGE_BYTES, f"{info['Size']} bytes"
    config = info["Config"]
    assert config["Entrypoint"] == ["dnsproxy"]
    assert config["User"] not in ("", "0", "root", "0:0")
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == dnsproxy.__version__
    assert "org.opencontainers.image.source" in labels
    probe = (
        "import os, shutil, subprocess, sys; "
        "real = os.path.realpath(sys.executable); print(real); "
        "print(subprocess.run(['dpkg', '-S', real], capture_output=True, text=True).stdout); "
        "print(*[shutil.which(t) or '-' for t in "
        "('iptables', 'ip6tables', 'nft', 'ip', 'gcc', 'cc', 'pip', 'pip3')])"
    )
    out = podman("run", "--rm", "--entrypoint", "/opt/dnsproxy/bin/python", image, "-c", probe)
    executable, package, _, tools = out.splitlines()
    # Debian's interpreter, which Debian builds with PGO and LTO (see the README), under
    # the virtualenv dnsproxy is installed in.
    assert executable.startswith("/usr/bin/python3.")
    assert package.startswith("python3.11-minimal") or package.startswith("python3."), package
    iptables, ip6tables, nft, ip, gcc, cc, pip, pip3 = tools.split()
    assert "-" not in (iptables, ip6tables, nft, ip)
    assert (gcc, cc, pip, pip3) == ("-", "-", "-", "-")  # no compiler, no pip
    version = podman("run", "--rm", image, "--version").strip()
    assert version == f"dnsproxy {dnsproxy.__version__}"


async def test_image_runs_standalone_as_a_non_root_user(image: str) -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        port, http = free_port(), free_port()
        argv = [
            "--network", "host", image,
            "--listen", f"127.0.0.1:{port}", "--http-listen", f"127.0.0.1:{http}",
            "--upstream", f"tcp://127.0.0.1:{fake.port}",
        ]  # fmt: skip
        with running(f"dnsproxy-test-{os.getpid()}-standalone", argv) as name:
            url = f"http://127.0.0.1:{http}"
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                try:
                    if http_get(url + "/ready", timeout=1)[0] == 200:
                        break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(podman("logs", name, check=False))
                await asyncio.sleep(0.1)
            query = dns.message.make_query("www.example.", "A")
            reply = await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=5)
            assert [str(r) for rrset in reply.answer for r in rrset] == ["169.254.1.1"]
            users = podman("top", name, "user", "huser").split()[2:]
            assert users and all(u not in ("root", "0") for u in users), users
            _, text = http_get(url + "/metrics")
            assert metric_value(text, "dnsproxy_cache_misses_total") == 1
            podman("stop", "--time", "10", name)
            state = json.loads(podman("inspect", name))[0]["State"]
            assert state["ExitCode"] == 0, podman("logs", name, check=False)


# -- the DaemonSet on a node


class Node:
    """The rendered DaemonSet's container started on the topology's node by podman."""

    def __init__(self, topo: Topology, c: Container, tmp_path: Path, image: str) -> None:
        self.topo, self.c = topo, c
        self.name = f"dnsproxy-test-{os.getpid()}-{topo.tag}"
        self.env = c.env({"kube-dns-upstream": UPSTREAM_IP})
        self.argv = self._argv(tmp_path, image)

    def _argv(self, tmp_path: Path, image: str) -> list[str]:
        c = self.c
        assert c.spec["image"] == image, "the manifests name another image than make image"
        assert c.pod["hostNetwork"] is True
        argv = ["--network", f"ns:/run/netns/{self.topo.node.name}"]
        sc = c.spec.get("securityContext", {})
        argv += ["--user", f"{sc.get('runAsUser', 0)}:{sc.get('runAsGroup', 0)}"]
        for cap in sc.get("capabilities", {}).get("add", []):
            argv += ["--cap-add", cap]
        if sc.get("readOnlyRootFilesystem"):
            argv.append("--read-only")
        if sc.get("allowPrivilegeEscalation") is False:
            argv += ["--security-opt", "no-new-privileges"]
        for key, value in self.env.items():
            argv += ["--env", f"{key}={value}"]
        host = tmp_path / "host"  # stands for the node's filesystem
        for name, mount in c.mounts().items():
            if "configMap" in mount:
                source = c.write_configmap(tmp_path / "configmaps" / name)
            else:
                path = mount["hostPath"]
                source = host / path["path"].lstrip("/")
                if path["type"] == "DirectoryOrCreate":
                    source.mkdir(parents=True, exist_ok=True)
                elif path["type"] == "FileOrCreate":
                    source.parent.mkdir(parents=True, exist_ok=True)
                    source.touch()
                else:
                    raise AssertionError(f"hostPath type {path['type']} not expected")
            ro = ":ro" if mount.get("readOnly") else ""
            argv += ["--volume", f"{source}:{mount['mountPath']}{ro}"]
        # dnsPolicy Default: the pod gets the node's resolv.conf, here the upstream's address.
        assert c.pod["dnsPolicy"] == "Default"
        resolv = host / "etc" / "resolv.conf"
        resolv.parent.mkdir(parents=True, exist_ok=True)
        resolv.write_text(f"nameserver {UPSTREAM_IP}\n")
        argv += ["--volume", f"{resolv}:/etc/resolv.conf:ro"]
        return [*argv, image, *c.args(self.env)]

    def probe(self, which: str) -> int | None:
        """The manifest's own probe, as the kubelet on the node performs it."""
        get = self.c.spec[which]["httpGet"]
        url = f"http://{get['host']}:{get['port']}{get['path']}"
        timeout = float(self.c.spec[which].get("timeoutSeconds", 1))
        try:
            return self.topo.node.call(lambda: http_get(url, timeout=timeout)[0])
        except OSError:
            return None

    def logs(self) -> str:
        return podman("logs", self.name, check=False, timeout=30)

    def state(self) -> dict[str, object]:
        state: dict[str, object] = json.loads(podman("inspect", self.name))[0]["State"]
        return state

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.state()["Status"] != "running":
                raise AssertionError(f"container stopped:\n{self.logs()}")
            return self.probe("readinessProbe") == 200

        try:
            wait_for(ready, START_TIMEOUT_S, "the readiness probe", interval=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Topology, Upstream]]:
    tool("getent", "libc-bin")
    with topology() as topo:
        upstream = Upstream(topo, tmp_path)
        try:
            yield topo, upstream
        finally:
            upstream.close()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlay", ["link-local", "transparent"])
def test_rendered_daemonset_runs_on_a_node(
    image: str, node: tuple[Topology, Upstream], tmp_path: Path, overlay: str
) -> None:
    topo, upstream = node
    root = copy_tree(tmp_path / "tree")
    # The one value this topology needs: its simulated kube-dns ClusterIP.
    set_values(root, kubeDNSServiceIP=CLUSTER_IP)
    c = container(render(root / "deploy" / "kubernetes" / "overlays" / overlay))
    n = Node(topo, c, tmp_path, image)
    pod_server = CLUSTER_IP if overlay == "transparent" else LOCAL_IP
    local_ips = [LOCAL_IP, CLUSTER_IP] if overlay == "transparent" else [LOCAL_IP]
    topo.set_pod_nameserver(pod_server)
    with running(n.name, n.argv):
        n.wait_ready()
        assert n.probe("livenessProbe") == 200
        rules = our_rules(topo)
        # The image's iptables is the nf_tables variant, so `auto` picks nftables, with the
        # fail-safe's rewrite to kube-dns-upstream (fallback_ip) for each local IP too.
        nft = topo.node.run("nft", "list", "table", "inet", "dnsproxy", check=False)
        assert nft.returncode == 0, "the node role did not choose nftables"
        per_ip = RULES_PER_IP + HEALTH_RULES_PER_IP + FALLBACK_RULES_PER_IP
        assert len(rules) == per_ip * len(local_ips), rules
        for ip in local_ips:
            assert sum(ip in r for r in rules) >= RULES_PER_IP + HEALTH_RULES_PER_IP
            assert ip in local_addresses(topo)
        upstream.zero()

        out = getent(topo, "kubernetes.default")
        assert f"{KUBERNETES_IP}   STREAM kubernetes.default.svc.cluster.local" in out
        assert EXTERNAL_IP in getent(topo, "example.test")
        # Answered by the container over TCP to CoreDNS, never by CoreDNS to the pod.
        assert upstream.packets()["udp"] == 0 and upstream.packets()["tcp"] > 0
        assert "from 169.254.50.2" not in upstream.log

        _, text = topo.node.call(lambda: http_get("http://127.0.0.1:9253/metrics"))
        assert metric_value(text, "coredns_dns_requests_total" + '{proto="udp",type="A"}') >= 2
        assert metric_value(text, "dnsproxy_node_rules_present") == len(rules)
        assert metric_value(text, "dnsproxy_request_duration_seconds_count") >= 4
        users = podman("top", n.name, "user").split()[1:]
        assert users == ["root"] * len(users), users  # runAsUser 0, for NET_ADMIN

        # SIGTERM as the kubelet sends it: not ready at once, still alive and answering
        # through lameduck, then gone within the grace period, exit 0.
        grace = float(c.pod["terminationGracePeriodSeconds"])
        stopped_at = time.monotonic()
        podman("kill", "--signal", "TERM", n.name)
        wait_for(lambda: n.probe("readinessProbe") == 503, 5.0, "readiness 503 after SIGTERM")
        assert n.probe("livenessProbe") == 200
        assert EXTERNAL_IP in getent(topo, "example.test")
        podman("wait", n.name, timeout=grace + 10)
        assert time.monotonic() - stopped_at < grace, "the kubelet would have killed it"
        state = n.state()
        assert state["ExitCode"] == 0, n.logs()
        assert not state["OOMKilled"]

    # The node is left as it was: no rule, no address, no interface.
    assert our_rules(topo) == []
    addresses = local_addresses(topo)
    assert all(ip not in addresses for ip in local_ips)
    assert "nodelocaldns" not in topo.node.run("ip", "link").stdout
    if overlay == "transparent":
        # The ClusterIP is kube-dns again (kube-proxy's DNAT), as NodeLocal DNSCache promises.
        assert EXTERNAL_IP in getent(topo, "example.test")
