"""Reading the Kubernetes manifests as a kubelet would: render, pick the DaemonSet's
container, build its environment (Service variables included) and expand ``$(VAR)`` in its
arguments, lay its ConfigMap out as files.

Rendering is ``kubectl kustomize`` (skipped with the reason where kubectl is missing). A
test that needs its own cluster values copies the tree with :func:`copy_tree` and edits
``deploy/kubernetes/cluster/values.yaml`` there, as an operator does.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("transparent", "link-local")
VALUES = Path("deploy") / "kubernetes" / "cluster" / "values.yaml"

Obj = dict[str, Any]


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("kubectl not installed (it renders the kustomizations: kubectl kustomize)")
    return path


def render(directory: Path) -> list[Obj]:
    """Every object ``kubectl kustomize DIRECTORY`` renders."""
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {directory}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def copy_tree(dest: Path) -> Path:
    """A copy of the repository parts the manifests read (deploy/, config/); its root."""
    for part in ("deploy", "config"):
        shutil.copytree(ROOT / part, dest / part)
    return dest


def set_values(root: Path, **values: str) -> None:
    """Edit the one place of cluster values in a copied tree, as an operator does."""
    path = root / VALUES
    doc = yaml.safe_load(path.read_text())
    for key, value in values.items():
        assert key in doc["data"], f"{key} is not a cluster value"
        doc["data"][key] = value
    path.write_text(yaml.safe_dump(doc))


def only(objs: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [
        o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} rendered"
    return found[0]


@dataclass
class Container:
    """The DaemonSet's one container, as a kubelet would start it on a node."""

    daemonset: Obj
    spec: Obj
    configmap: Obj
    services: list[Obj]

    @property
    def pod(self) -> Obj:
        return dict(self.daemonset["spec"]["template"]["spec"])

    def env(self, service_hosts: dict[str, str]) -> dict[str, str]:
        """The container's environment: Service variables for ``service_hosts`` (name ->
        the ClusterIP the API server would have assigned), then the declared ``env``."""
        out: dict[str, str] = {}
        for svc in self.services:
            name = svc["metadata"]["name"]
            if name in service_hosts:
                prefix = name.upper().replace("-", "_")
                out[f"{prefix}_SERVICE_HOST"] = service_hosts[name]
                out[f"{prefix}_SERVICE_PORT"] = str(svc["spec"]["ports"][0]["port"])
        for item in self.spec.get("env", []):
            out[item["name"]] = expand(str(item["value"]), out)
        return out

    def args(self, env: dict[str, str]) -> list[str]:
        return [expand(a, env) for a in self.spec.get("args", [])]

    def mounts(self) -> dict[str, Obj]:
        """Volume name -> the volume, for each mount, with ``mountPath`` added."""
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        return {
            m["name"]: {**volumes[m["name"]], "mountPath": m["mountPath"], **m}
            for m in self.spec.get("volumeMounts", [])
        }

    def config_mount_path(self) -> str:
        for mount in self.mounts().values():
            if "configMap" in mount:
                assert mount["configMap"]["name"] == self.configmap["metadata"]["name"]
                return str(mount["mountPath"])
        raise AssertionError("no ConfigMap volume mounted")

    def write_configmap(self, directory: Path) -> Path:
        """The ConfigMap's keys as files in ``directory`` (its mount's contents)."""
        directory.mkdir(parents=True, exist_ok=True)
        for key, text in self.configmap["data"].items():
            (directory / key).write_text(text)
        return directory

    def node_config(self) -> Obj:
        """The dnsproxy configuration the ConfigMap carries, parsed (variables unexpanded)."""
        (text,) = self.configmap["data"].values()
        doc: Obj = yaml.safe_load(text)
        return doc


def container(objs: list[Obj]) -> Container:
    ds = only(objs, "DaemonSet")
    (spec,) = ds["spec"]["template"]["spec"]["containers"]
    volumes = ds["spec"]["template"]["spec"]["volumes"]
    cm_name = next(v["configMap"]["name"] for v in volumes if "configMap" in v)
    configmap = only(objs, "ConfigMap", cm_name)
    services = [o for o in objs if o["kind"] == "Service"]
    return Container(ds, spec, configmap, services)


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables replaced, others left as they are."""
    return _VAR_REF.sub(lambda m: env.get(m[1], m[0]), text)
