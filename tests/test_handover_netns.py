"""Handover in the node role, as root in network namespaces: nothing on the node moves.

The topology, the dnsmasq upstream and the proxy runner come from ``test_node_netns.py``
(``netns.py`` builds the namespaces). A DaemonSet's surge pod is played by a second
``python -m dnsproxy`` in the same node namespace with the same configuration: it takes
the listening sockets over while a pod keeps asking, the first instance is then stopped
as Kubernetes would (SIGTERM), and the link-local address and every rule stay where they
are throughout. Skipped with the reason when not root or when a tool is missing.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from netns import LOCAL_IP, Topology, wait_for
from test_node_netns import (
    EXTERNAL_IP,
    RULES_PER_IP,
    Proxy,
    Upstream,
    ask,
    getent,
    local_addresses,
    our_rules,
    proxy,
    stop,
    tool,
    write_config,
)

# Fixtures, which pytest finds by name in this module.
from test_node_netns import backend as backend
from test_node_netns import topo as topo
from test_node_netns import upstream as upstream

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.load import UdpLoad, make_query  # noqa: E402

START_TIMEOUT_S = 15.0


def node_config(tmp_path: Path, backend: str) -> str:
    """The node tests' configuration, plus the handover socket of a Kubernetes node."""
    path = Path(write_config(tmp_path, backend, listen=[f"{LOCAL_IP}:53"], lameduck_s=1))
    doc = json.loads(path.read_text())
    doc["handover"] = {"path": str(tmp_path / "run" / "handover.sock"), "when_replaced": "wait"}
    path.write_text(json.dumps(doc))
    return str(path)


def logged(p: Proxy, text: str, timeout_s: float = START_TIMEOUT_S) -> None:
    def seen() -> bool:
        p.alive()
        return text in p.stderr

    try:
        wait_for(seen, timeout_s, repr(text))
    except AssertionError as e:
        raise AssertionError(f"{e}\n{p.stderr}") from None


def test_surge_pod_takes_over_while_a_pod_resolves_and_nothing_on_the_node_moves(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    tool("getent", "libc-bin")
    config = node_config(tmp_path, backend)
    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    with proxy(topo, tmp_path / "old", "--config", config) as old:
        old.wait_ready()
        rules = sorted(our_rules(topo))
        assert len(rules) == RULES_PER_IP
        device = local_addresses(topo)[LOCAL_IP]
        assert ask(topo, LOCAL_IP) == EXTERNAL_IP  # cached from here on

        queries = [make_query("example.test.")]
        load = topo.pod.call(lambda: UdpLoad(LOCAL_IP, 53, queries, qps=200, duration_s=8.0))
        load.start()
        try:
            while load.elapsed() < 2:
                time.sleep(0.05)
            with proxy(topo, tmp_path / "new", "--config", config) as new:
                logged(new, "handover: took over the listeners of pid")
                logged(new, "ready (")
                logged(old, "waiting for SIGTERM (handover.when_replaced: wait)")
                assert sorted(our_rules(topo)) == rules
                # Kubernetes deletes the old pod once the new one is ready.
                stop(old)
                assert sorted(our_rules(topo)) == rules
                assert local_addresses(topo).get(LOCAL_IP) == device
                result = load.join()
                assert EXTERNAL_IP in getent(topo, "example.test")
                stop(new)
        finally:
            load.stop()
    print(f"\nnode handover ({backend}) at 200 QPS from a pod: {result.summary()}")
    assert result.sent == 1600
    assert result.unanswered == 0, f"unanswered at {result.unanswered_at[:20]}"
    assert "node: rules and addresses removed" not in old.stderr
    assert f"{RULES_PER_IP} {backend} rules in place" in new.stderr  # its own sync
    assert "node: rules and addresses removed" in new.stderr  # a plain SIGTERM tears down
    assert our_rules(topo) == []
    assert LOCAL_IP not in local_addresses(topo)
