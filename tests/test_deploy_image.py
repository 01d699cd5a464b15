"""The container image, run the way a kubelet runs the rendered DaemonSet.

``make image`` builds ``localhost/dnsproxy:latest`` (``.ci/run`` does it before ``make
test``). ``daemonset.py`` runs the rendered DaemonSet's container spec with podman on a
node namespace (it says what is taken from the manifests); glibc in the ``pod`` namespace
is the client. Skipped with the reason when not root, when podman or kubectl is missing, or
when no image built from this tree exists (then run ``make image``); under ``CI=true`` a
missing or stale image is a failure instead. Every container is removed, also when a test
fails. The rolling update (a surge pod beside this one) is ``test_deploy_rollout.py``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import dns.asyncquery
import dns.message
import pytest
from daemonset import (
    HEALTH_RULES_PER_IP,
    NODE_RULES_PER_IP,
    START_TIMEOUT_S,
    Pod,
    container_logs,
    local_ips,
    pod_server,
    podman,
    rendered,
    running,
)

# Fixtures, which pytest finds by name in this module.
from daemonset import image as image
from daemonset import node as node
from fakeupstream import FakeUpstream, zone_handler
from netns import Topology, wait_for
from test_node_netns import (
    EXTERNAL_IP,
    KUBERNETES_IP,
    RULES_PER_IP,
    Upstream,
    getent,
    local_addresses,
    our_rules,
)
from test_process import RECORDS, free_port, http_get, metric_value

import dnsproxy

MAX_IMAGE_BYTES = 250 * 1000 * 1000


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
    # The query paths compiled with mypyc (`make wheels` builds that wheel), their
    # runtime library inside the package: nothing of dnsproxy's lands beside it.
    probe = (
        "import dnsproxy, pathlib, site; print(dnsproxy.compiled()); "
        "top = pathlib.Path(site.getsitepackages()[0]); "
        "print(*sorted(p.name for p in top.glob('*mypyc*')) or ['-']); "
        "print(*sorted(p.name for p in (top / 'dnsproxy').glob('*mypyc*')))"
    )
    out = podman("run", "--rm", "--entrypoint", "/opt/dnsproxy/bin/python", image, "-c", probe)
    build, top_level, inside = out.splitlines()
    assert build == "mypyc"
    assert top_level == "-"
    assert inside.startswith("_native__mypyc.cpython-311-")


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
                    raise AssertionError(container_logs(name))
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
            assert state["ExitCode"] == 0, container_logs(name)


# -- the DaemonSet on a node


@pytest.mark.timeout(300)
@pytest.mark.parametrize("overlay", ["link-local", "transparent"])
def test_rendered_daemonset_runs_on_a_node(
    image: str, node: tuple[Topology, Upstream], tmp_path: Path, overlay: str
) -> None:
    topo, upstream = node
    c = rendered(tmp_path, overlay)
    n = Pod(topo, c, tmp_path, image)
    ips = local_ips(overlay)
    topo.set_pod_nameserver(pod_server(overlay))
    with running(n.name, n.argv):
        n.wait_ready()
        assert n.probe("livenessProbe") == 200
        rules = our_rules(topo)
        # The image's iptables is the nf_tables variant, so `auto` picks nftables, with the
        # fail-safe's rewrite to kube-dns-upstream (fallback_ip) for each local IP too.
        nft = topo.node.run("nft", "list", "table", "inet", "dnsproxy", check=False)
        assert nft.returncode == 0, "the node role did not choose nftables"
        assert len(rules) == NODE_RULES_PER_IP * len(ips), rules
        for ip in ips:
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
    assert all(ip not in addresses for ip in ips)
    assert "nodelocaldns" not in topo.node.run("ip", "link").stdout
    if overlay == "transparent":
        # The ClusterIP is kube-dns again (kube-proxy's DNAT), as NodeLocal DNSCache promises.
        assert EXTERNAL_IP in getent(topo, "example.test")
