"""Handover in the node role, as root in network namespaces: nothing on the node moves.

The topology, the dnsmasq upstream and the proxy runner come from ``test_node_netns.py``
(``netns.py`` builds the namespaces). A DaemonSet's surge pod is played by a second
``python -m dnsproxy`` in the same node namespace with the same configuration: it takes
the listening sockets over while a pod keeps asking, the first instance is then stopped
as Kubernetes would (SIGTERM), and the link-local address and every rule stay where they
are throughout; the same with ``workers: 2`` on the taking side and one of its workers
killed meanwhile. Skipped with the reason when not root or when a tool is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from netns import LOCAL_IP, Topology, wait_for
from test_node_netns import (
    EXTERNAL_IP,
    METRICS_URL,
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
from test_workers import alive, worker_pids

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


@contextlib.contextmanager
def running(
    topo: Topology, tmp_path: Path, backend: str
) -> Iterator[tuple[str, Proxy, list[str], str]]:
    """The first instance, ready, with example.test cached: its configuration, the
    proxy, its rules and the device holding the local IP."""
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
        yield config, old, rules, device


def test_surge_pod_takes_over_while_a_pod_resolves_and_nothing_on_the_node_moves(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    with running(topo, tmp_path, backend) as (config, old, rules, device):
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


def test_two_workers_take_over_survive_a_worker_kill_and_tear_down_as_one_process(
    topo: Topology, upstream: Upstream, tmp_path: Path, backend: str
) -> None:
    """``workers: 2`` in the node role: the surge pod (2 workers) takes over from a single
    process, one of its workers is killed and restarted, then it stops as Kubernetes
    stops it; the address and every rule stay put until that SIGTERM tears them down."""
    with running(topo, tmp_path, backend) as (config, old, rules, device):
        queries = [make_query("example.test.")]
        load = topo.pod.call(
            lambda: UdpLoad(LOCAL_IP, 53, queries, qps=200, duration_s=10.0, sockets=16)
        )
        load.start()
        try:
            while load.elapsed() < 2:
                time.sleep(0.05)
            with proxy(topo, tmp_path / "new", "--config", config, "--workers", "2") as new:
                logged(new, "handover: took over the listeners of pid")
                logged(new, "ready (uvloop loop) with 2 workers")
                logged(old, "waiting for SIGTERM (handover.when_replaced: wait)")
                stop(old)
                assert sorted(our_rules(topo)) == rules
                while load.elapsed() < 5:
                    time.sleep(0.05)
                pids = worker_pids(new.proc.pid)
                os.kill(pids[1], signal.SIGKILL)
                logged(new, "worker 1 restarted as pid")
                assert sorted(our_rules(topo)) == rules
                assert local_addresses(topo).get(LOCAL_IP) == device
                assert new.status(METRICS_URL + "/ready") == 200
                result = load.join()
                assert EXTERNAL_IP in getent(topo, "example.test")
                metrics = new.get(METRICS_URL + "/metrics")[1]
                stop(new)
                assert not any(alive(pid) for pid in pids.values())
        finally:
            load.stop()
    print(f"\nnode, 1 -> 2 workers, kill -9 of one ({backend}), 200 QPS: {result.summary()}")
    assert result.sent == 2000
    # A query the killed worker had read and not yet answered dies with it; at this rate
    # it is rarely one. What waited in its socket was answered by its replacement.
    assert result.unanswered <= 1, f"unanswered at {result.unanswered_at[:20]}"
    assert 'dnsproxy_worker_restarts_total{worker="1"} 1.0' in metrics
    assert f"{RULES_PER_IP} {backend} rules in place" in new.stderr  # its own sync
    assert "node: rules and addresses removed" in new.stderr  # SIGTERM tears down
    assert our_rules(topo) == []
    assert LOCAL_IP not in local_addresses(topo)
