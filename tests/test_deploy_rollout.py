"""A DaemonSet rolling update on one node, as ``maxSurge: 1, maxUnavailable: 0`` runs it.

Pod A, the rendered DaemonSet's container (``daemonset.py`` runs it with podman on a node
namespace), serves the node; a pod keeps asking over UDP and TCP, cached and uncached
names; pod B, the surge pod (the same spec and hostPath volumes, another container), starts
beside it and must take A's listening sockets over through the handover socket on the
shared ``/run/dnsproxy`` hostPath, the DNS ports and the probe and metrics ports alike, and
become ready by its own readiness probe. Then A is deleted as the kubelet deletes it:
SIGTERM, and it must exit 0 within ``terminationGracePeriodSeconds`` without removing the
rules or addresses B now relies on. Meanwhile the node's rules and addresses are watched:
one set, always there. Finally B is deleted and the node must be clean.

Skipped with the reason where the image tests skip (not root, no podman, kubectl or image;
under ``CI=true`` a missing image fails). Bounded: 2,000 UDP and at most 100 TCP queries
over 10 s per overlay; every container is removed, also when the test fails.
"""

from __future__ import annotations

import itertools
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import pytest
from daemonset import (
    NODE_RULES_PER_IP,
    Pod,
    local_ips,
    pod_server,
    podman,
    rendered,
    running,
)

# Fixtures, which pytest finds by name in this module.
from daemonset import image as image
from daemonset import node as node
from kube import OVERLAYS, ROOT, Container
from netns import Topology, wait_for
from test_node_netns import (
    EXTERNAL_IP,
    KUBERNETES_IP,
    Upstream,
    getent,
    local_addresses,
    our_rules,
)
from test_process import http_get, metric_value

from dnsproxy.config import load_config

sys.path.insert(0, str(ROOT))
from benchmarks.load import UdpLoad, make_query

QPS = 200
LOAD_S = 10.0
SURGE_AFTER_S = 1.0  # of load before pod B is started
TCP_INTERVAL_S = 0.1
TCP_MAX = 100
WATCH_INTERVAL_S = 0.1
# Asked once, through pod A only, before pod B starts: B can answer it only from A's cache.
WARM_NAME = "warm.example.test."
CACHED = [
    make_query("example.test."),
    make_query("kubernetes.default.svc.cluster.local."),
    make_query("example.test.", 28),
]


def udp_queries(count: int) -> list[bytes]:
    """``count`` queries: three cached names, and every fourth a name asked only once (a
    miss each: an external name, or a cluster name that does not exist, NXDOMAIN)."""
    out = []
    for i in range(count):
        if i % 4 != 3:
            out.append(CACHED[i % len(CACHED)])
        elif i % 8 == 3:
            out.append(make_query(f"u{i}.example.test."))
        else:
            out.append(make_query(f"u{i}.default.svc.cluster.local."))
    return out


@dataclass
class TcpLoad:
    """One TCP query every ``TCP_INTERVAL_S`` on a new connection, cached and uncached
    names in turn, until stopped or ``TCP_MAX`` sent; each answered (any rcode) or not."""

    server: str
    sent: int = 0
    answered: int = 0
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set() and self.sent < TCP_MAX:
            name = "example.test." if self.sent % 2 else f"t{self.sent}.example.test."
            self.sent += 1
            try:
                dns.query.tcp(dns.message.make_query(name, "A"), self.server, timeout=2.0)
                self.answered += 1
            except (OSError, dns.exception.DNSException) as exc:
                self.failures.append(f"{time.time():.3f} {name}: {type(exc).__name__} {exc}")
            self.stop.wait(TCP_INTERVAL_S)


class Watch:
    """``sample()`` every ``interval_s`` in a thread until stopped; what it returns, when
    not None, is a problem kept with its time."""

    def __init__(self, sample: Callable[[], str | None], interval_s: float) -> None:
        self.sample, self.interval_s = sample, interval_s
        self.samples = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            problem = self.sample()
            self.samples += 1
            if problem is not None:
                self.problems.append(f"{time.time():.3f} {problem}")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


def _timestamp(text: str) -> datetime:
    """A podman timestamp (nanoseconds, ``Z`` or an offset) as an aware datetime."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d*", r"\1", text.replace("Z", "+00:00")))


def logged_at(pod: Pod, text: str) -> datetime:
    """When the container first logged a line containing ``text`` (podman's timestamp)."""
    for line in pod.logs("--timestamps").splitlines():
        if text in line:
            return _timestamp(line.split()[0])
    raise AssertionError(f"{text!r} not logged by {pod.name}:\n{pod.logs()}")


def started_at(pod: Pod) -> datetime:
    """When the container's process started (podman's State.StartedAt)."""
    return _timestamp(str(pod.state()["StartedAt"]))


def cache_goes_along(c: Container, tmp_path: Path, pod: Pod) -> bool:
    """Whether the ConfigMap, as the pod reads it, hands the cache over (``handover.cache``,
    on unless set off); and that it sets the handover a DaemonSet needs."""
    path = c.write_configmap(tmp_path / "check") / "nodelocal.yaml"
    config = load_config(str(path), env=pod.env)
    assert config.handover.path == "/run/dnsproxy/handover.sock"
    assert c.mounts()["handover"]["mountPath"] == "/run/dnsproxy"
    assert config.handover.when_replaced == "wait"
    return config.handover.cache


@pytest.mark.timeout(240)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rolling_update_surge_pod_takes_over_and_no_query_is_lost(
    image: str, node: tuple[Topology, Upstream], tmp_path: Path, overlay: str
) -> None:
    topo, upstream = node
    c = rendered(tmp_path, overlay)
    strategy = c.daemonset["spec"]["updateStrategy"]
    assert strategy == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    old, new = Pod(topo, c, tmp_path, image, "a"), Pod(topo, c, tmp_path, image, "b")
    with_cache = cache_goes_along(c, tmp_path, old)
    grace_s = float(c.pod["terminationGracePeriodSeconds"])
    server, ips = pod_server(overlay), local_ips(overlay)
    topo.set_pod_nameserver(server)

    with running(old.name, old.argv):
        old.wait_ready()
        rules = sorted(our_rules(topo))
        assert len(rules) == NODE_RULES_PER_IP * len(ips), rules
        devices = {ip: local_addresses(topo).get(ip) for ip in ips}
        assert all(devices.values()), devices
        warm = dns.message.make_query(WARM_NAME, "A")
        topo.pod.call(lambda: dns.query.udp(warm, server, timeout=5))

        def node_state() -> str | None:
            now = sorted(our_rules(topo))
            if now != rules:
                return f"rules {now}"
            addresses = local_addresses(topo)
            moved = {ip: addresses.get(ip) for ip in ips if addresses.get(ip) != devices[ip]}
            return f"addresses {moved}" if moved else None

        def liveness() -> str | None:
            status = new.probe("livenessProbe")  # the same address and port as A's
            return None if status == 200 else f"liveness {status}"

        readiness: list[tuple[float, int | None]] = []

        def record_readiness() -> str | None:
            readiness.append((time.monotonic(), new.probe("readinessProbe")))
            return None

        load = topo.pod.call(
            lambda: UdpLoad(server, 53, udp_queries(int(QPS * LOAD_S)), QPS, LOAD_S)
        )
        tcp = TcpLoad(server)
        watches = [Watch(node_state, WATCH_INTERVAL_S), Watch(liveness, 0.25)]
        watches.append(Watch(record_readiness, 0.25))
        load.start()
        tcp_thread = threading.Thread(
            target=topo.pod.call, args=(tcp.run,), kwargs={"timeout": LOAD_S + 30}, daemon=True
        )
        tcp_thread.start()
        try:
            wait_for(lambda: load.elapsed() >= SURGE_AFTER_S, 10, "the load to run")
            with running(new.name, new.argv):
                surge_started = time.monotonic()
                new.wait_logged("handover: took over the listeners of")
                old.wait_logged("waiting for SIGTERM (handover.when_replaced: wait)")
                # A has closed its HTTP endpoints: the probe reaches B alone now.
                new.wait_ready()
                new_ready = time.monotonic()
                # The kubelet deletes A once B is ready (maxUnavailable: 0).
                podman("kill", "--signal", "TERM", old.name)
                podman("wait", old.name, timeout=grace_s + 10)
                old_gone = time.monotonic()
                state = old.state()
                assert state["ExitCode"] == 0, old.logs()
                assert old_gone - new_ready < grace_s, "the kubelet would have killed pod A"
                result = load.join()
                tcp.stop.set()
                tcp_thread.join(30)
                for watch in watches:
                    watch.stop()
                assert old_gone - load.start_time < LOAD_S, "the switch ended after the load"

                # B answers, from the cache A handed over: WARM_NAME reaches the upstream
                # once in all (through A).
                reply = topo.pod.call(lambda: dns.query.udp(warm, server, timeout=5))
                assert [str(r) for rrset in reply.answer for r in rrset] == [EXTERNAL_IP]
                assert EXTERNAL_IP in getent(topo, "example.test")
                assert KUBERNETES_IP in getent(topo, "kubernetes.default")
                asked = upstream.log.count(f"query[A] {WARM_NAME.rstrip('.')} from")
                assert asked == (1 if with_cache else 2), upstream.log[-2000:]
                _, text = topo.node.call(lambda: http_get("http://127.0.0.1:9253/metrics"))
                assert metric_value(text, 'dnsproxy_start_info{how="handover"}') == 1
                entries = metric_value(text, "dnsproxy_handover_cache_entries")
                assert (entries > 0) == with_cache, entries
                assert sorted(our_rules(topo)) == rules

                # Then B is deleted too (as by an uninstall): it tears the node down.
                podman("kill", "--signal", "TERM", new.name)
                podman("wait", new.name, timeout=grace_s + 10)
                assert new.state()["ExitCode"] == 0, new.logs()
                old_logs, new_logs = old.logs(), new.logs()
                switch = {
                    "surge container started -> took over": (
                        logged_at(new, "handover: took over") - started_at(new)
                    ).total_seconds(),
                    "took over -> A stopped reading": (
                        logged_at(old, "replaced by pid") - logged_at(new, "handover: took over")
                    ).total_seconds(),
                    "podman run B -> B ready (probe)": new_ready - surge_started,
                    "SIGTERM A -> A exited": old_gone - new_ready,
                }
        finally:
            load.stop()
            tcp.stop.set()
            for watch in watches:
                watch.stop()

    print(f"\nrolling update ({overlay}), {QPS} QPS UDP for {LOAD_S:.0f} s: {result.summary()}")
    print(f"TCP: {tcp.sent} sent, {tcp.answered} answered")
    print("switch: " + ", ".join(f"{k} {v:.3f} s" for k, v in switch.items()))
    print(f"readiness during the rollout: {summarise(readiness)}")
    assert result.sent == int(QPS * LOAD_S)
    assert result.unanswered == 0, f"unanswered at {result.unanswered_at[:20]} s"
    assert tcp.sent > 0 and tcp.answered == tcp.sent, tcp.failures
    for watch in watches[:2]:
        assert watch.samples >= 10, "the node was hardly watched"
        assert watch.problems == [], watch.problems[:10]
    # The probe answers 200 before B starts and once B is ready; in between the socket is
    # shared, and B's endpoint says 503 until B's rules check is done (see the README).
    outside = [st for t, st in readiness if t < surge_started or t > new_ready]
    assert len(outside) >= 10 and set(outside) == {200}, summarise(readiness)
    # B bound nothing itself: the DNS, probe and metrics sockets are A's.
    assert "Address already in use" not in new_logs
    for ip in ips:
        assert f"listening on {ip}:53 (udp, tcp, " in new_logs, new_logs
    endpoints = re.findall(r"http endpoint on (\S+) \(([^)]*)\)", new_logs)
    assert len(endpoints) == 2 and all(how.endswith("taken over") for _, how in endpoints)
    # A left everything to B; B's SIGTERM removed it all.
    assert "node: rules and addresses removed" not in old_logs
    assert "node rules and addresses left to it" in old_logs
    assert "node: rules and addresses removed" in new_logs
    assert our_rules(topo) == []
    addresses = local_addresses(topo)
    assert all(ip not in addresses for ip in ips)
    assert "nodelocaldns" not in topo.node.run("ip", "link").stdout


def summarise(samples: list[tuple[float, int | None]]) -> str:
    """Runs of equal probe results: ``200 x12, 503 x1, 200 x30``."""
    statuses = (status for _, status in samples)
    return ", ".join(f"{s} x{len(list(run))}" for s, run in itertools.groupby(statuses))
