"""The Kubernetes manifests without a cluster: every kustomization renders, every object
validates against the schemas of a current Kubernetes release, the DaemonSet is what the
README promises, its ConfigMap passes ``check-config`` with the environment the DaemonSet
gives it, and the cluster values set in one place reach every field that uses them.

Schemas: kubernetes-validate (PyPI), offline, at its latest bundled Kubernetes version.
The image itself is run from the rendered DaemonSet in ``test_deploy_image.py``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from conftest import dnsproxy_cmd
from kube import (
    KUBERNETES,
    OVERLAYS,
    ROOT,
    Container,
    container,
    copy_tree,
    only,
    render,
    set_values,
)

UPSTREAM_SERVICE = {"kube-dns-upstream": "169.254.25.10"}  # what the API server would assign
EXAMPLES = ROOT / "deploy" / "examples"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay: str) -> None:
    objs = render(KUBERNETES / "overlays" / overlay)
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    configmap = next(name for kind, name in kinds if kind == "ConfigMap")
    assert configmap.startswith("dnsproxy-config-")  # generated, with a content hash
    assert kinds == sorted(
        [
            ("ConfigMap", configmap),
            ("DaemonSet", "dnsproxy"),
            ("Service", "dnsproxy-metrics"),
            ("Service", "kube-dns-upstream"),
            ("ServiceAccount", "dnsproxy"),
        ]
    )
    version = kubernetes_validate.latest_version()
    for obj in objs:
        assert obj["metadata"]["namespace"] == "kube-system"
        kubernetes_validate.validate(obj, version, strict=True)


def test_base_renders_and_examples_validate() -> None:
    version = kubernetes_validate.latest_version()
    for obj in render(KUBERNETES / "base"):
        kubernetes_validate.validate(obj, version, strict=True)
    pod = yaml.safe_load((EXAMPLES / "pod-dnsconfig.yaml").read_text())
    kubernetes_validate.validate(pod, version, strict=True)
    assert pod["spec"]["dnsConfig"]["nameservers"] == ["169.254.20.10"]
    kubelet = yaml.safe_load((EXAMPLES / "kubelet-config.yaml").read_text())
    assert kubelet["kind"] == "KubeletConfiguration"  # not an API object: no schema to check
    assert kubelet["clusterDNS"] == ["169.254.20.10"]


def test_validation_catches_a_broken_object() -> None:
    """The control: the validator refuses what the API server would."""
    ds = only(render(KUBERNETES / "overlays" / "link-local"), "DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [1]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_daemonset_is_what_a_node_needs(overlay: str) -> None:
    c = container(render(KUBERNETES / "overlays" / overlay))
    pod = c.pod
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "Default"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    caps = c.spec["securityContext"]["capabilities"]
    assert caps == {"add": ["NET_ADMIN"]}
    assert c.spec["securityContext"].get("privileged") is not True
    # Zero-loss upgrades: a surge pod beside the old one, which only goes once it is ready;
    # no host ports, which would keep the surge pod off the node.
    strategy = c.daemonset["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "ports" not in c.spec
    mounts = c.mounts()
    assert mounts["handover"]["hostPath"] == {"path": "/run/dnsproxy", "type": "DirectoryOrCreate"}
    assert mounts["handover"]["mountPath"] == "/run/dnsproxy"
    assert mounts["xtables-lock"]["hostPath"]["path"] == "/run/xtables.lock"
    # The grace period outlasts what dnsproxy takes to stop.
    shutdown = c.node_config()["shutdown"]
    assert pod["terminationGracePeriodSeconds"] > shutdown["lameduck_s"] + shutdown["grace_s"]
    # Probes go to the health endpoint of the configuration the pod runs.
    env = c.env(UPSTREAM_SERVICE)
    health = env_expand(c.node_config()["health_listen"], env)
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = c.spec[probe]["httpGet"]
        assert f"{get['host']}:{get['port']}" == health
        assert get["path"] == path
    # Memory: request and limit as the README's arithmetic gives them.
    resources = c.spec["resources"]
    assert resources["requests"]["memory"] == "48Mi" and resources["limits"]["memory"] == "128Mi"
    assert "cpu" not in resources.get("limits", {})
    assert c.node_config()["cache"]["max_entries"] == 10000  # what the arithmetic assumed
    assert c.node_config()["metrics"]["coredns_names"] is True


def env_expand(text: str, env: dict[str, str]) -> str:
    """dnsproxy's own ``${VAR:-default}`` expansion, for reading the config in a test."""

    def sub(m: re.Match[str]) -> str:
        name, _, default = m[1].partition(":-")
        return env.get(name) or default

    return re.sub(r"\$\{([^}]*)\}", sub, text)


def _check(c: Container, tmp_path: Path) -> tuple[str, list[str], dict[str, str]]:
    """The ConfigMap laid out where the pod mounts it (under tmp_path), the args pointing
    there, and the pod's environment."""
    mount = c.config_mount_path()
    files = c.write_configmap(tmp_path / mount.lstrip("/"))
    env = c.env(UPSTREAM_SERVICE)
    args = [a.replace(mount, str(files)) for a in c.args(env)]
    config = args[args.index("--config") + 1]
    return config, args, env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_configmap_passes_check_config_with_the_pods_env(
    overlay: str, tmp_path: Path
) -> None:
    c = container(render(KUBERNETES / "overlays" / overlay))
    config, _args, env = _check(c, tmp_path)
    result = dnsproxy_cmd("check-config", config, env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    assert "cluster.local. -> tcp://169.254.25.10:53" in result.stdout
    # Without the Service variable (the Service created after the pods) it is refused.
    del env["KUBE_DNS_UPSTREAM_SERVICE_HOST"]
    result = dnsproxy_cmd("check-config", config, env=env)
    assert result.returncode == 2
    assert "KUBE_DNS_UPSTREAM_SERVICE_HOST is not set" in result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_command_line_covers_the_right_addresses(overlay: str, tmp_path: Path) -> None:
    """The container's args with the ConfigMap (node-setup --dry-run takes the same flags
    and validates the whole configuration): transparent mode also covers the ClusterIP."""
    if shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin") is None:
        pytest.skip("nft not installed (apt-get install nftables): node-setup picks a backend")
    c = container(render(KUBERNETES / "overlays" / overlay))
    _config, args, env = _check(c, tmp_path)
    result = dnsproxy_cmd(
        "node-setup",
        "--dry-run",
        *args,
        "--rules",
        "nftables",
        env={"PATH": "/usr/bin:/bin", **env},
    )
    assert result.returncode == 0, result.stderr
    assert "ip daddr 169.254.20.10 udp dport 53 notrack" in result.stdout
    has_cluster_ip = "ip daddr 10.96.0.10 udp dport 53 notrack" in result.stdout
    assert has_cluster_ip is (overlay == "transparent")


def test_cluster_values_are_set_in_one_place(tmp_path: Path) -> None:
    root = copy_tree(tmp_path / "tree")
    set_values(
        root, localIP="169.254.20.11", clusterDomain="k8s.example", kubeDNSServiceIP="169.254.30.10"
    )
    c = container(render(root / "deploy" / "kubernetes" / "overlays" / "transparent"))
    env = c.env(UPSTREAM_SERVICE)
    assert env["NODE_LOCAL_DNS_IP"] == "169.254.20.11"
    assert env["CLUSTER_DOMAIN"] == "k8s.example"
    assert c.args(env)[-4:] == ["--listen", "169.254.20.11:53", "--listen", "169.254.30.10:53"]
    assert c.spec["livenessProbe"]["httpGet"]["host"] == "169.254.20.11"
    assert c.spec["readinessProbe"]["httpGet"]["host"] == "169.254.20.11"
    config, _args, env = _check(c, tmp_path)
    result = dnsproxy_cmd("check-config", config, env={"PATH": "/usr/bin:/bin", **env})
    assert result.returncode == 0, result.stderr
    assert "listen: 169.254.20.11:53" in result.stdout
    assert "k8s.example. -> tcp://169.254.25.10:53" in result.stdout
    # The values object itself is never applied.
    assert not [o for o in render(root / "deploy" / "kubernetes" / "overlays" / "link-local")
                if o["metadata"]["name"] == "dnsproxy-cluster-values"]  # fmt: skip
    # And no cluster value is written anywhere else in the manifests.
    for path in (root / "deploy" / "kubernetes").rglob("*.yaml"):
        if path.name != "values.yaml":
            assert "__PILLAR__" not in path.read_text()
