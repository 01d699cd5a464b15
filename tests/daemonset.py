"""The rendered DaemonSet's container, run on a node by podman as a kubelet would run it.

Shared by the image test (``test_deploy_image.py``: one pod, its probes, SIGTERM) and the
rolling-update test (``test_deploy_rollout.py``: a surge pod beside it). Everything about
the container comes from what ``kubectl kustomize`` renders: image, args and env (with the
Service variables a kubelet adds, ``$(VAR)`` expanded), the ConfigMap as files at its
``mountPath``, the hostPath volumes (stand-ins made under the test's directory, created as
their ``type`` says, the same directory for every pod of the node), the security context
(user, capabilities added, read-only root, no privilege escalation), the probes and the
grace period. The node is the ``node`` namespace of ``netns.py`` (``--network ns:``, as
hostNetwork); dnsmasq in the ``upstream`` namespace is CoreDNS behind kube-dns-upstream
and the node's resolver. Only the cluster value that must differ here is changed, in its
one place: the kube-dns ClusterIP, to the simulated one (169.254.30.10) the topology DNATs
to CoreDNS.

The :func:`image` fixture skips with the reason when not root, when podman is missing, or
when no image built from this tree exists (then run ``make image``); under ``CI=true`` a
missing or stale image is a failure instead, since ``.ci/run`` builds it. Every container
is removed, also when a test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from kube import ROOT, Container, container, copy_tree, render, set_values
from netns import CLUSTER_IP, LOCAL_IP, UPSTREAM_IP, Topology, tool, topology, wait_for
from test_node_netns import FALLBACK_RULES_PER_IP, RULES_PER_IP, Upstream
from test_process import http_get

sys.path.insert(0, str(ROOT / "deploy"))
import source_digest

CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
IMAGE = "localhost/dnsproxy:latest"
START_TIMEOUT_S = 30.0
HEALTH_RULES_PER_IP = 2  # the liveness probe's port, both directions
# Each local IP: port 53, the health port, and the fail-safe's rewrite to kube-dns-upstream
# (fallback_ip; the image's iptables is the nf_tables variant, so `auto` picks nftables).
NODE_RULES_PER_IP = RULES_PER_IP + HEALTH_RULES_PER_IP + FALLBACK_RULES_PER_IP


def podman(*args: str, check: bool = True, timeout: float = 60.0) -> str:
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def container_logs(name: str, *options: str) -> str:
    """What container NAME wrote, stdout and stderr (dnsproxy logs to stderr, which
    ``podman logs`` replays on its own stderr)."""
    env = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(CONTAINERS_CONF))}
    result = subprocess.run(
        ["podman", "logs", *options, name],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
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
    found = podman("image", "inspect", IMAGE, check=False)
    if not found.strip() or found.strip() == "[]":
        _unavailable(f"no image {IMAGE}: run make image")
    labels = json.loads(found)[0]["Config"]["Labels"]
    if labels.get("dev.dnsproxy.source-digest") != source_digest.digest():
        _unavailable(f"{IMAGE} was built from other sources: run make image")
    return IMAGE


@contextlib.contextmanager
def running(name: str, argv: list[str]) -> Iterator[str]:
    """``podman run -d ARGV`` as container NAME, removed on the way out."""
    podman("rm", "--force", "--ignore", name, check=False)
    try:
        podman("run", "--detach", "--name", name, *argv, timeout=120)
        yield name
    finally:
        podman("rm", "--force", "--ignore", "--time", "0", name, check=False)


def rendered(tmp_path: Path, overlay: str) -> Container:
    """The DaemonSet's container of ``overlay``, with the topology's kube-dns ClusterIP."""
    root = copy_tree(tmp_path / "tree")
    # The one value this topology needs: its simulated kube-dns ClusterIP.
    set_values(root, kubeDNSServiceIP=CLUSTER_IP)
    return container(render(root / "deploy" / "kubernetes" / "overlays" / overlay))


def pod_server(overlay: str) -> str:
    """The nameserver pods use in ``overlay``: kube-dns's ClusterIP or the link-local IP."""
    return CLUSTER_IP if overlay == "transparent" else LOCAL_IP


def local_ips(overlay: str) -> list[str]:
    """The addresses the node role puts on the node (and covers with rules) in ``overlay``."""
    return [LOCAL_IP, CLUSTER_IP] if overlay == "transparent" else [LOCAL_IP]


class Pod:
    """The rendered DaemonSet's container started on the topology's node by podman.

    Pods of one test share ``tmp_path / "host"``, the node's filesystem, so that their
    hostPath volumes are the same directories, as on a real node.
    """

    def __init__(
        self, topo: Topology, c: Container, tmp_path: Path, image: str, pod: str = "pod"
    ) -> None:
        self.topo, self.c = topo, c
        self.name = f"dnsproxy-test-{os.getpid()}-{topo.tag}-{pod}"
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
        """The manifest's own probe, as the kubelet on the node performs it: the status, or
        None when the connection failed or timed out."""
        get = self.c.spec[which]["httpGet"]
        url = f"http://{get['host']}:{get['port']}{get['path']}"
        timeout = float(self.c.spec[which].get("timeoutSeconds", 1))
        try:
            return self.topo.node.call(lambda: http_get(url, timeout=timeout)[0])
        except OSError:
            return None

    def logs(self, *options: str) -> str:
        """The container's log (``options``: of ``podman logs``)."""
        return container_logs(self.name, *options)

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

    def wait_logged(self, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
        def seen() -> bool:
            logs = self.logs()
            if text in logs:
                return True
            if self.state()["Status"] != "running":
                raise AssertionError(f"container stopped before {text!r}:\n{logs}")
            return False

        try:
            wait_for(seen, timeout_s, repr(text), interval=0.1)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Topology, Upstream]]:
    """A node/pod/upstream topology with dnsmasq as CoreDNS; glibc's getent is needed."""
    tool("getent", "libc-bin")
    with topology() as topo:
        upstream = Upstream(topo, tmp_path)
        try:
            yield topo, upstream
        finally:
            upstream.close()
