"""dnsproxy's lifecycle as an operator drives it, with real processes under a steady load.

A replacement through the handover socket, signals a process manager may send, a reload by
SIGHUP and by a ConfigMap-style file swap. The load is ``benchmarks/load.py``: a UDP client
that sends at a fixed rate and accounts for every query, so "0 unanswered" means that each
query sent got its answer. Latency figures are printed (``pytest -s``), never asserted.
The fake upstream runs in a thread of its own, so that these tests are plain functions
that run once (the processes under test use uvloop, as in production).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.query
import dns.rcode
import pytest
from fakeupstream import Delay, FakeUpstream, SyncHandler, zone_handler
from test_process import HOST, DnsProxyProcess, free_port, http_get, metric_value

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.load import UdpLoad, make_query  # noqa: E402

CACHED = [f"n{i}.example." for i in range(50)]
RECORDS = {(name, "A"): [f"169.254.3.{i}"] for i, name in enumerate(CACHED)}
MISS_DELAY_S = 0.03  # upstream answers to misses take this long: some are always in flight


def upstream_handler(
    records: dict[tuple[str, str], list[str]] | None = None,
) -> Callable[[dns.message.Message, str], object]:
    """Answers RECORDS at once and every other name (NXDOMAIN) after MISS_DELAY_S."""
    answer: SyncHandler = zone_handler(records or RECORDS)

    def handler(query: dns.message.Message, transport: str) -> object:
        if query.question[0].name.to_text().startswith("m"):
            return Delay(MISS_DELAY_S, answer(query, transport))
        return answer(query, transport)

    return handler


@contextlib.contextmanager
def upstream(handler: Callable[[dns.message.Message, str], object]) -> Iterator[FakeUpstream]:
    """A FakeUpstream serving from a thread with its own event loop."""
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        async with FakeUpstream(handler) as fake:  # type: ignore[arg-type]
            box["fake"], box["loop"], box["stop"] = (
                fake,
                asyncio.get_running_loop(),
                asyncio.Event(),
            )
            ready.set()
            await box["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(main()), name="fake-upstream", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise AssertionError("the fake upstream did not start")
    try:
        yield box["fake"]
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(10)


def names_asked(fake: FakeUpstream, prefix: str) -> int:
    return sum(1 for _, q in list(fake.queries) if q.question[0].name.to_text().startswith(prefix))


def write_config(path: Path, upstream_port: int, **extra: Any) -> None:
    doc = {
        "zones": [{"zone": ".", "upstreams": [f"tcp://{HOST}:{upstream_port}"]}],
        "handover": {"path": str(path.parent / "handover.sock")},
        "shutdown": {"grace_s": 2},
        **extra,
    }
    path.write_text(json.dumps(doc))  # JSON is YAML


def warm(port: int, names: list[str]) -> None:
    for name in names:
        reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port, timeout=5)
        assert reply.rcode() == dns.rcode.NOERROR


def mixed_queries(count: int) -> list[bytes]:
    """Cached names, and one unique (uncached, slowly answered) name in every twenty."""
    return [
        make_query(f"m{i}.example.") if i % 20 == 0 else make_query(CACHED[i % len(CACHED)])
        for i in range(count)
    ]


def started(proxy: DnsProxyProcess) -> DnsProxyProcess:
    proxy.wait_ready()
    return proxy


def took_over(proxy: DnsProxyProcess, timeout_s: float = 15.0) -> DnsProxyProcess:
    """Wait until a successor says it serves (its /ready is no sign: the port is shared)."""
    deadline = time.monotonic() + timeout_s
    while "ready (uvloop loop)" not in proxy.stderr:
        if proxy.proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the successor did not become ready:\n{proxy.stderr}")
        time.sleep(0.05)
    return proxy


def ask(port: int, name: str) -> str:
    reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port, timeout=5)
    return reply.answer[0][0].to_text() if reply.answer else dns.rcode.to_text(reply.rcode())


# -- handover


def test_three_replacements_under_load_lose_no_query(tmp_path: Path) -> None:
    qps, duration_s = 1000, 12.0
    config = tmp_path / "dnsproxy.yaml"
    port, http_port = free_port(), free_port()
    procs: list[DnsProxyProcess] = []
    with upstream(upstream_handler()) as fake:
        write_config(config, fake.port)
        try:
            procs.append(
                started(
                    DnsProxyProcess(
                        tmp_path, "--config", str(config), port=port, http_port=http_port
                    )
                )
            )
            warm(port, CACHED)
            load = UdpLoad(
                HOST, port, mixed_queries(int(qps * duration_s)), qps, duration_s
            ).start()
            try:
                for at in (2.0, 5.0, 8.0):
                    while load.elapsed() < at:
                        time.sleep(0.05)
                    old = procs[-1]
                    new = DnsProxyProcess(
                        tmp_path, "--config", str(config), port=port, http_port=http_port
                    )
                    procs.append(new)
                    took_over(new)
                    assert old.wait_exit(15) == 0, old.stderr
            finally:
                result = load.join()
            _, metrics = http_get(procs[-1].url + "/metrics")
        finally:
            for proc in procs:
                proc.close()
        cached_asked = names_asked(fake, "n")
    print(f"\nhandover x3 at {qps} QPS: {result.summary()}")
    assert result.sent == int(qps * duration_s)
    assert result.unanswered == 0, f"unanswered at {result.unanswered_at[:20]}"
    assert set(result.rcodes) <= {dns.rcode.NOERROR, dns.rcode.NXDOMAIN}
    # The cache travelled: no cached name was ever asked upstream again.
    assert cached_asked == len(CACHED)
    assert metric_value(metrics, 'dnsproxy_start_info{how="handover"}') == 1
    assert metric_value(metrics, "dnsproxy_handover_cache_entries") >= len(CACHED)
    for old in procs[:-1]:
        assert "replaced by pid" in old.stderr and "Traceback" not in old.stderr
    for new in procs[1:]:
        assert "handover: took over the listeners of pid" in new.stderr


def test_replaced_instance_waits_for_sigterm_when_told_to(tmp_path: Path) -> None:
    config = tmp_path / "dnsproxy.yaml"
    port, http_port = free_port(), free_port()
    with upstream(upstream_handler()) as fake:
        write_config(config, fake.port, handover={
            "path": str(tmp_path / "handover.sock"), "when_replaced": "wait"})  # fmt: skip
        args = ("--config", str(config))
        old = started(DnsProxyProcess(tmp_path, *args, port=port, http_port=http_port))
        new = DnsProxyProcess(tmp_path, *args, port=port, http_port=http_port)
        try:
            took_over(new)
            deadline = time.monotonic() + 10
            while "waiting for SIGTERM" not in old.stderr and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "waiting for SIGTERM (handover.when_replaced: wait)" in old.stderr
            assert old.proc.poll() is None  # a container that exits would be restarted
            old.proc.send_signal(signal.SIGTERM)
            assert old.wait_exit(5) == 0
            assert ask(port, CACHED[0]) == "169.254.3.0"  # the successor serves
            # The successor owns the handover path: a third instance takes over from it.
            third = took_over(DnsProxyProcess(tmp_path, *args, port=port, http_port=http_port))
            third.close()
        finally:
            new.close()
            old.close()
    assert "lameduck" not in old.stderr and "signal received, shutting down" in old.stderr
    assert "took over the listeners of pid" in third.stderr


# -- signals


def test_signals_a_process_manager_may_send(tmp_path: Path) -> None:
    config = tmp_path / "dnsproxy.yaml"
    with upstream(upstream_handler()) as fake:
        write_config(config, fake.port, reload={"watch_interval_s": 0})
        proxy = started(DnsProxyProcess(tmp_path, "--config", str(config)))
        try:
            warm(proxy.port, CACHED[:3])
            for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE):
                proxy.proc.send_signal(sig)
            proxy.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while "reload (SIGHUP)" not in proxy.stderr and time.monotonic() < deadline:
                time.sleep(0.05)
            assert proxy.proc.poll() is None, proxy.stderr
            assert ask(proxy.port, CACHED[1]) == "169.254.3.1"
            proxy.proc.send_signal(signal.SIGQUIT)
            code = proxy.wait_exit()
        finally:
            proxy.close()
    log = proxy.stderr
    assert code == 0, log
    state = next(line for line in log.splitlines() if "state: pid" in line)
    assert f"listeners {HOST}:{proxy.port} http {HOST}:{proxy.http_port}" in state
    assert "cache 3/10000 entries (success 3, denial 0, servfail 0)" in state
    assert f"upstreams tcp://{HOST}:{fake.port} up (" in state
    assert "SIGUSR2 ignored" in log and "SIGALRM ignored" in log
    assert "configuration" in log and "unchanged" in log  # SIGHUP: the same file again
    assert "SIGQUIT received" in log and "stopped" in log.splitlines()[-1]
    assert "Traceback" not in log


# -- reload


def test_sighup_reload_under_load_then_a_bad_file(tmp_path: Path) -> None:
    qps, duration_s = 800, 10.0
    config = tmp_path / "dnsproxy.yaml"
    other = {**RECORDS, ("probe.example.", "A"): ["169.254.4.4"]}
    with upstream(upstream_handler()) as first, upstream(upstream_handler(other)) as second:
        write_config(config, first.port, reload={"watch_interval_s": 0})
        proxy = started(DnsProxyProcess(tmp_path, "--config", str(config)))
        try:
            warm(proxy.port, CACHED)
            load = UdpLoad(
                HOST, proxy.port, mixed_queries(int(qps * duration_s)), qps, duration_s
            ).start()
            try:
                while load.elapsed() < 3:
                    time.sleep(0.05)
                write_config(config, second.port, reload={"watch_interval_s": 0},
                             limits={"max_inflight": 5000})  # fmt: skip
                proxy.proc.send_signal(signal.SIGHUP)
                while load.elapsed() < 6:
                    time.sleep(0.05)
                probe = ask(proxy.port, "probe.example.")
                config.write_text("zones: [{zone: ., upstreams: [nonsense]}]\n")
                proxy.proc.send_signal(signal.SIGHUP)
            finally:
                result = load.join()
            after_bad = ask(proxy.port, "probe.example.")
            _, metrics = http_get(proxy.url + "/metrics")
        finally:
            proxy.close()
    print(f"\nSIGHUP reload at {qps} QPS: {result.summary()}")
    assert result.unanswered == 0, f"unanswered at {result.unanswered_at[:20]}"
    assert probe == "169.254.4.4"  # the new upstream answers after the reload
    assert after_bad == "169.254.4.4"  # the refused file changed nothing
    assert metric_value(metrics, "dnsproxy_reloads_total") == 1
    assert metric_value(metrics, "dnsproxy_reload_failures_total") == 1
    assert "zones[0].upstreams[0]: 'nonsense' is a hostname" in proxy.stderr


def test_configmap_symlink_swap_is_picked_up_by_the_file_watch(tmp_path: Path) -> None:
    mount = tmp_path / "config"
    mount.mkdir()
    other = {**RECORDS, ("probe.example.", "A"): ["169.254.4.4"]}
    with upstream(upstream_handler()) as first, upstream(upstream_handler(other)) as second:
        for version, fake in (("..2024_01_01_a", first), ("..2024_01_01_b", second)):
            (mount / version).mkdir()
            write_config(mount / version / "dnsproxy.yaml", fake.port,
                         reload={"watch_interval_s": 0.2},
                         handover={"path": str(tmp_path / "handover.sock")})  # fmt: skip
        (mount / "..data").symlink_to("..2024_01_01_a")
        (mount / "dnsproxy.yaml").symlink_to("..data/dnsproxy.yaml")
        proxy = started(DnsProxyProcess(tmp_path, "--config", str(mount / "dnsproxy.yaml")))
        try:
            before = ask(proxy.port, "probe.example.")
            (mount / "..data_tmp").symlink_to("..2024_01_01_b")
            os.rename(mount / "..data_tmp", mount / "..data")  # the kubelet's atomic swap
            deadline = time.monotonic() + 15
            reloads = 0.0
            while reloads < 1 and time.monotonic() < deadline:
                time.sleep(0.1)
                reloads = metric_value(
                    http_get(proxy.url + "/metrics")[1], "dnsproxy_reloads_total"
                )
            after = ask(proxy.port, "probe.example.")
        finally:
            proxy.close()
    assert before == "NXDOMAIN"
    assert reloads == 1, proxy.stderr
    assert after == "169.254.4.4"
    assert "reloaded (config file changed)" in proxy.stderr


@pytest.fixture(autouse=True)
def _no_stray_socket(tmp_path: Path) -> Iterator[None]:
    yield
    # Every instance removed its handover socket, or left it to a successor that did.
    assert not (tmp_path / "handover.sock").exists()
