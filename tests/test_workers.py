"""``workers: N``: a supervisor and N worker processes, as a user runs them.

Real processes on loopback (``python -m dnsproxy --workers N``), the fake upstream of the
lifecycle tests in a thread, dnspython and ``benchmarks/load.py`` as clients. Which worker
serves a client is the kernel's choice (a hash of the client's address and port over the
SO_REUSEPORT group), so the tests ask from many sockets and read the per-worker counters
to know. The sans-IO parts (which sockets a worker reads, how metric families merge) are
tested first with plain values.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest
from test_lifecycle import (
    CACHED,
    MISS_DELAY_S,
    RECORDS,
    mixed_queries,
    took_over,
    upstream,
    upstream_handler,
    warm,
    write_config,
)
from test_process import HOST, DnsProxyProcess, free_port, http_get, metric_value

from dnsproxy import workers
from dnsproxy.workers import Family, members, merge

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.load import UdpLoad, make_query  # noqa: E402

WAIT_S = 30.0


# -- sans-IO


def test_each_member_of_a_group_is_read_by_one_worker_and_each_worker_reads_one() -> None:
    assert [members(2, 2, i) for i in range(2)] == [[0], [1]]
    # Taken over from an instance with more workers: some read two.
    assert [members(3, 2, i) for i in range(2)] == [[0, 2], [1]]
    # From one with fewer, where the group could not grow: they share.
    assert [members(1, 3, i) for i in range(3)] == [[0], [0], [0]]
    assert [members(2, 3, i) for i in range(3)] == [[0], [1], [0]]


def family(name: str, kind: str, *samples: tuple[str, dict[str, str], float]) -> Family:
    out = Family(name, kind, "help")
    for sample, labels, value in samples:
        out.samples[sample, tuple(sorted(labels.items()))] = value
    return out


def test_merged_families_sum_counters_and_gauges_but_not_facts() -> None:
    worker = [
        family("dnsproxy_requests", "counter", ("dnsproxy_requests_total", {"proto": "udp"}, 5)),
        family("dnsproxy_cache_entries", "gauge", ("dnsproxy_cache_entries", {"type": "a"}, 3)),
        family("dnsproxy_upstream_up", "gauge", ("dnsproxy_upstream_up", {"upstream": "u"}, 1)),
        family("dnsproxy_build_info", "gauge", ("dnsproxy_build_info", {"version": "1"}, 1)),
        family("x_timestamp_seconds", "gauge", ("x_timestamp_seconds", {}, 100)),
        family(
            "d",
            "histogram",
            ("d_bucket", {"le": "0.1"}, 2),
            ("d_count", {}, 2),
            ("d_sum", {}, 0.1),
        ),
    ]
    other = [
        family("dnsproxy_requests", "counter", ("dnsproxy_requests_total", {"proto": "udp"}, 7)),
        family("dnsproxy_cache_entries", "gauge", ("dnsproxy_cache_entries", {"type": "a"}, 4)),
        family("dnsproxy_upstream_up", "gauge", ("dnsproxy_upstream_up", {"upstream": "u"}, 0)),
        family("dnsproxy_build_info", "gauge", ("dnsproxy_build_info", {"version": "1"}, 1)),
        family("x_timestamp_seconds", "gauge", ("x_timestamp_seconds", {}, 200)),
        family(
            "d",
            "histogram",
            ("d_bucket", {"le": "0.1"}, 1),
            ("d_count", {}, 1),
            ("d_sum", {}, 0.05),
        ),
    ]
    merged = {f.name: f.samples for f in merge([worker, other])}
    assert merged["dnsproxy_requests"] == {("dnsproxy_requests_total", (("proto", "udp"),)): 12}
    assert merged["dnsproxy_cache_entries"] == {("dnsproxy_cache_entries", (("type", "a"),)): 7}
    # Up only while every worker sees the server up; an info sample once, not twice.
    assert merged["dnsproxy_upstream_up"] == {("dnsproxy_upstream_up", (("upstream", "u"),)): 0}
    assert merged["dnsproxy_build_info"] == {("dnsproxy_build_info", (("version", "1"),)): 1}
    assert merged["x_timestamp_seconds"] == {("x_timestamp_seconds", ()): 200}
    assert merged["d"][("d_bucket", (("le", "0.1"),))] == 3
    assert merged["d"][("d_sum", ())] == pytest.approx(0.15)


def test_families_travel_as_json_and_back() -> None:
    original = family("c", "counter", ("c_total", {"a": "1", "b": "2"}, 3.5))
    again = Family.decode(original.encode())
    assert again == original
    metric = again.metric()
    assert (metric.name, metric.type) == ("c", "counter")
    assert [(s.name, s.labels, s.value) for s in metric.samples] == [
        ("c_total", {"a": "1", "b": "2"}, 3.5)
    ]


# -- helpers for the processes


def worker_pids(supervisor: int) -> dict[int, int]:
    """Worker index -> pid of the supervisor's worker processes, from /proc."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == supervisor and b"worker" in argv:
            found[int(argv[argv.index(b"worker") + 1])] = int(entry)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def metrics(proxy: DnsProxyProcess) -> str:
    status, text = http_get(proxy.url + "/metrics", timeout=10)
    assert status == 200
    return text


def per_worker(text: str, count: int) -> list[float]:
    return [
        metric_value(text, f'dnsproxy_worker_requests_total{{worker="{i}"}}') for i in range(count)
    ]


def wait_until(condition: Callable[[], bool], what: str, proxy: DnsProxyProcess) -> None:
    """Poll ``condition`` (bounded by WAIT_S); fail with the proxy's log if it never holds."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline or proxy.proc.poll() is not None:
            raise AssertionError(f"{what} did not happen:\n{proxy.stderr}")
        time.sleep(0.05)


def ask_from_new_sockets(port: int, name: str, count: int) -> list[str]:
    """``count`` queries for ``name``, each from a socket of its own (a new source port,
    so the kernel spreads them over the workers); the answers."""
    out = []
    for _ in range(count):
        reply = dns.query.udp(dns.message.make_query(name, "A"), HOST, port=port, timeout=5)
        out.append(
            reply.answer[0][0].to_text() if reply.answer else dns.rcode.to_text(reply.rcode())
        )
    return out


def which_worker(proxy: DnsProxyProcess, sock: socket.socket, count: int) -> int:
    """The worker the kernel sends ``sock``'s queries to: one query, and the per-worker
    counters before and after."""
    before = per_worker(metrics(proxy), count)
    sock.sendto(b"\xfe\xfe" + make_query(CACHED[0])[2:], (HOST, proxy.port))
    ready, _, _ = select.select([sock], [], [], 5)
    assert ready, "no answer to the probe"
    sock.recv(4096)
    after = per_worker(metrics(proxy), count)
    (index,) = [i for i in range(count) if after[i] != before[i]]
    return index


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[DnsProxyProcess]:
    """``workers: 2`` in front of the lifecycle tests' upstream, ready."""
    with upstream(upstream_handler()) as fake:
        config = tmp_path / "dnsproxy.yaml"
        write_config(config, fake.port, workers=2, reload={"watch_interval_s": 0})
        proxy = DnsProxyProcess(tmp_path, "--config", str(config))
        try:
            proxy.wait_ready()
            yield proxy
        finally:
            proxy.close()


# -- N = 2


def test_two_workers_answer_share_the_clients_and_metrics_add_up(
    two_workers: DnsProxyProcess,
) -> None:
    proxy = two_workers
    pids = worker_pids(proxy.proc.pid)
    assert sorted(pids) == [0, 1], proxy.stderr
    warm(proxy.port, CACHED[:5])
    answers = ask_from_new_sockets(proxy.port, CACHED[1], 64)
    assert answers == ["169.254.3.1"] * 64
    text = metrics(proxy)
    total = metric_value(text, 'dnsproxy_requests_total{proto="udp"}')
    assert total == 5 + 64
    shares = per_worker(text, 2)
    assert sum(shares) == total
    assert min(shares) > 0, f"one worker got every client: {shares}"
    hits = metric_value(text, "dnsproxy_cache_hits_total")
    misses = metric_value(text, "dnsproxy_cache_misses_total")
    assert hits + misses == total
    # Each worker has its own cache: the warm-up went to one of them or both.
    assert metric_value(text, 'dnsproxy_cache_entries{type="success"}') >= 5
    assert metric_value(text, "dnsproxy_cache_capacity") == 2 * 10000
    assert metric_value(text, "dnsproxy_workers") == 2
    assert metric_value(text, 'dnsproxy_worker_up{worker="1"}') == 1
    # One build_info sample for the instance, however many processes there are.
    assert text.count("dnsproxy_build_info{") == 1
    assert metric_value(text, "process_resident_memory_bytes") > 0
    # Counted by the supervisor, once per socket: none dropped at this rate.
    drops = f'dnsproxy_udp_receive_drops_total{{listener="{HOST}:{proxy.port}"}}'
    assert metric_value(text, drops) == 0
    for path in ("/ready", "/health"):
        assert http_get(proxy.url + path)[0] == 200

    proxy.proc.send_signal(signal.SIGUSR1)
    wait_until(lambda: "state: pid" in proxy.stderr, "the SIGUSR1 state line", proxy)
    state = next(line for line in proxy.stderr.splitlines() if "state: pid" in line)
    assert f"queries udp {int(total)} tcp 0" in state
    assert f"workers 2/2 serving (pids 0:{pids[0]} 1:{pids[1]}), 0 restarts" in state

    # A worker ignores the signals a process manager sends to every process.
    os.kill(pids[0], signal.SIGTERM)
    os.kill(pids[1], signal.SIGHUP)
    assert ask_from_new_sockets(proxy.port, CACHED[2], 8) == ["169.254.3.2"] * 8
    assert worker_pids(proxy.proc.pid) == pids
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.wait_exit() == 0, proxy.stderr
    assert not any(alive(pid) for pid in pids.values())
    assert "stopped" in proxy.stderr.splitlines()[-1]
    assert "Traceback" not in proxy.stderr


def test_sigterm_with_two_workers_answers_what_is_in_flight_then_exits(
    two_workers: DnsProxyProcess,
) -> None:
    proxy = two_workers
    pids = worker_pids(proxy.proc.pid)
    # Misses the upstream answers after MISS_DELAY_S, from sockets of their own.
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
    try:
        for i, sock in enumerate(socks):
            sock.sendto(make_query(f"m-drain-{i}.example."), (HOST, proxy.port))
        wait_until(
            lambda: metric_value(metrics(proxy), "dnsproxy_inflight") > 0,
            "queries in flight",
            proxy,
        )
        proxy.proc.send_signal(signal.SIGTERM)
        rcodes = []
        for sock in socks:
            ready, _, _ = select.select([sock], [], [], 10)
            assert ready, f"a query in flight at SIGTERM went unanswered:\n{proxy.stderr}"
            rcodes.append(sock.recv(4096)[3] & 0x0F)
    finally:
        for sock in socks:
            sock.close()
    assert set(rcodes) == {dns.rcode.NXDOMAIN}  # the upstream's answer, not SERVFAIL
    assert proxy.wait_exit() == 0, proxy.stderr
    assert not any(alive(pid) for pid in pids.values())
    assert "questions still in flight" not in proxy.stderr
    assert MISS_DELAY_S < 1


def test_kill_9_of_a_worker_under_load_restarts_it_while_the_other_answers(
    two_workers: DnsProxyProcess,
) -> None:
    proxy = two_workers
    qps, duration_s = 800, 8.0
    warm(proxy.port, CACHED)
    load = UdpLoad(
        HOST,
        proxy.port,
        [make_query(CACHED[i % len(CACHED)]) for i in range(int(qps * duration_s))],
        qps,
        duration_s,
        sockets=16,
        timeout_s=5.0,
    )
    # Which worker the kernel hashes each of the load's sockets to.
    owner = [which_worker(proxy, sock, 2) for sock in load.socks]
    if len(set(owner)) < 2:
        pytest.skip(f"the kernel hashed all 16 client sockets to one worker: {owner}")
    pids = worker_pids(proxy.proc.pid)
    victim = owner[0]
    load.start()
    try:
        while load.elapsed() < 2.5:
            time.sleep(0.02)
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = load.elapsed()
        wait_until(
            lambda: (
                worker_pids(proxy.proc.pid).get(victim) not in (None, pids[victim])
                and metric_value(metrics(proxy), f'dnsproxy_worker_up{{worker="{victim}"}}') == 1
            ),
            "the worker's restart",
            proxy,
        )
        restarted_seen_at = load.elapsed()
    finally:
        result = load.join()
    text = metrics(proxy)

    def share(worker: int) -> list[int]:
        return [i for i in range(load.sent) if owner[i % len(load.socks)] == worker]

    survivor, dead = share(1 - victim), share(victim)
    lost_survivor = [i for i in survivor if not load.answered_at[i]]
    lost_dead = [i for i in dead if not load.answered_at[i]]
    # The survivor's clients were answered while the other worker was down (and, through
    # the survivor, the killed worker's too: nothing was lost, but that is not asserted,
    # since a query the killed worker had read and not answered died with it).
    during = [
        i for i in survivor if killed_at < load.sent_at[i] - load.start_time < restarted_seen_at
    ]
    print(
        f"\nkill -9 of worker {victim} at {killed_at:.2f}s, seen restarted at "
        f"{restarted_seen_at:.2f}s: {result.summary()}; lost: {len(lost_survivor)} of the "
        f"survivor's {len(survivor)}, {len(lost_dead)} of the killed worker's {len(dead)}"
    )
    assert result.sent == int(qps * duration_s)
    assert lost_survivor == []
    assert during and all(load.answered_at[i] for i in during)
    # What the killed worker had read and not answered died with it (one read batch at
    # most); what waited in its socket was read by the survivor, then its replacement.
    assert len(lost_dead) <= 64
    assert metric_value(text, f'dnsproxy_worker_restarts_total{{worker="{victim}"}}') == 1
    assert metric_value(text, f'dnsproxy_worker_restarts_total{{worker="{1 - victim}"}}') == 0
    assert f"worker {victim} (pid {pids[victim]}) exited with signal SIGKILL" in proxy.stderr
    assert f"worker {victim} restarted as pid" in proxy.stderr
    # Meanwhile the survivor read the killed worker's sockets too.
    assert f"[worker {1 - victim}]: reading the sockets of worker {victim} too" in proxy.stderr
    # The replacement started with a copy of its sibling's cache.
    restart = next(line for line in proxy.stderr.splitlines() if "restarted as pid" in line)
    assert int(restart.split(" with ")[1].split()[0]) >= len(CACHED), restart
    # The counters lost nothing the killed worker had counted by the last scrape.
    assert metric_value(text, 'dnsproxy_requests_total{proto="udp"}') >= len(survivor)


def test_reload_reaches_every_worker_and_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    other = {**RECORDS, ("probe.example.", "A"): ["169.254.4.4"]}
    config = tmp_path / "dnsproxy.yaml"
    with upstream(upstream_handler()) as first, upstream(upstream_handler(other)) as second:
        write_config(config, first.port, workers=2, reload={"watch_interval_s": 0})
        proxy = DnsProxyProcess(tmp_path, "--config", str(config))
        try:
            proxy.wait_ready()
            before = ask_from_new_sockets(proxy.port, "probe.example.", 16)
            write_config(config, second.port, workers=2, reload={"watch_interval_s": 0})
            proxy.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: metric_value(metrics(proxy), "dnsproxy_reloads_total") == 1,
                "the reload",
                proxy,
            )
            after = ask_from_new_sockets(proxy.port, "probe.example.", 32)
            shares = per_worker(metrics(proxy), 2)
            write_config(config, second.port, workers=3, reload={"watch_interval_s": 0})
            proxy.proc.send_signal(signal.SIGHUP)
            wait_until(
                lambda: metric_value(metrics(proxy), "dnsproxy_reload_failures_total") == 1,
                "the refusal",
                proxy,
            )
            refused = ask_from_new_sockets(proxy.port, "probe.example.", 8)
        finally:
            proxy.close()
    assert set(before) == {"NXDOMAIN"}
    assert min(shares) > 0
    assert after == ["169.254.4.4"] * 32  # every worker asks the new upstream
    assert refused == ["169.254.4.4"] * 8
    assert "workers: changing it (2 -> 3) needs a restart" in proxy.stderr
    reloaded = next(line for line in proxy.stderr.splitlines() if "reloaded (SIGHUP)" in line)
    # Both workers applied it; each dropped what it had cached from the old upstream.
    assert reloaded.count("cached entries of names with other upstreams now dropped") == 2
    assert "; worker 1: " in reloaded, reloaded


def test_handover_from_two_workers_to_one_and_back_under_load_loses_nothing(
    tmp_path: Path,
) -> None:
    qps, duration_s = 1000, 10.0
    config = tmp_path / "dnsproxy.yaml"
    port, http_port = free_port(), free_port()
    procs: list[DnsProxyProcess] = []
    with upstream(upstream_handler()) as fake:
        write_config(config, fake.port, workers=2)

        def instance(*flags: str) -> DnsProxyProcess:
            proc = DnsProxyProcess(
                tmp_path, "--config", str(config), *flags, port=port, http_port=http_port
            )
            procs.append(proc)
            return proc

        try:
            instance().wait_ready()
            warm(port, CACHED)
            load = UdpLoad(
                HOST, port, mixed_queries(int(qps * duration_s)), qps, duration_s, sockets=16
            ).start()
            try:
                for at, flags in ((2.5, ("--workers", "1")), (6.0, ("--workers", "2"))):
                    while load.elapsed() < at:
                        time.sleep(0.05)
                    old = procs[-1]
                    took_over(instance(*flags))
                    assert old.wait_exit(20) == 0, old.stderr
            finally:
                result = load.join()
            text = metrics(procs[-1])
            last_pids = worker_pids(procs[-1].proc.pid)
        finally:
            for proc in procs:
                proc.close()
    print(f"\nhandover 2 -> 1 -> 2 workers at {qps} QPS: {result.summary()}")
    assert result.sent == int(qps * duration_s)
    assert result.unanswered == 0, f"unanswered at {result.unanswered_at[:20]}"
    assert set(result.rcodes) <= {dns.rcode.NOERROR, dns.rcode.NXDOMAIN}
    assert sorted(last_pids) == [0, 1]
    assert metric_value(text, 'dnsproxy_start_info{how="handover"}') == 1
    assert metric_value(text, "dnsproxy_handover_cache_entries") >= len(CACHED)
    # The single instance read both sockets of the group it was handed, and its
    # successor gave each of its workers one of them.
    assert "2 sockets of one SO_REUSEPORT group" in procs[1].stderr
    assert "sockets per address: 127.0.0.1" in procs[2].stderr
    assert f"{port} x2" in procs[2].stderr
    for old in procs[:-1]:
        assert "replaced by pid" in old.stderr and "Traceback" not in old.stderr


def test_a_successor_that_takes_one_socket_per_address_is_refused(tmp_path: Path) -> None:
    """An older dnsproxy (no ``groups`` in its hello) would keep one socket of a group and
    close the others with what is queued in them: the instance with workers refuses it."""
    from dnsproxy import handover
    from dnsproxy.config_types import HostPort

    async def main() -> str:
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        ours, theirs = socket.socketpair()
        try:
            offer = handover.Offer({("udp", HostPort(HOST, 53)): [a, b]}, None)
            old_side = handover.Channel(ours)
            new_side = handover.Channel(theirs)
            await new_side.send("hello", {"protocol": handover.PROTOCOL, "pid": 1})
            given = await handover.give(old_side, 5, lambda: offer, 5)
            assert given is False
            reply = await new_side.recv()
            assert reply.kind == "refuse"
            return str(reply.header["reason"])
        finally:
            for sock in (a, b, ours, theirs):
                sock.close()

    reason = asyncio.run(main())
    assert "with 2 sockets (workers)" in reason


def test_worker_subcommand_is_not_for_people() -> None:
    assert workers.worker_main(["x"]) == 2


async def test_the_pool_gives_up_when_no_worker_has_served_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every worker down (dying again at each start): the supervisor must exit, as a
    killed process would, rather than hold the sockets that the node's fail-safe rules
    look for. Driven here with the pool's clock shortened and no process started."""
    from dnsproxy.config_types import Config, HostPort, UpstreamConfig, ZoneConfig

    monkeypatch.setattr(workers, "_GIVE_UP_S", 0.3)
    monkeypatch.setattr(workers, "_PING_EVERY_S", 0.02)
    zone = ZoneConfig(".", (UpstreamConfig("tcp", HOST, 53),))
    pool = workers.WorkerPool(Config((HostPort(HOST, 0),), (zone,), workers=2))
    pool._started = True
    watch = asyncio.ensure_future(pool._watch_all())
    pool._slots[0].serving = True  # one worker serving: no reason to give up
    await asyncio.sleep(0.5)
    assert not watch.done()
    pool._slots[0].serving = False
    reason = await asyncio.wait_for(pool.failed(), 5)
    assert reason == "no worker has served for 0.3s"
    assert pool.problem() == "none of the 2 workers is serving"


def test_a_stalled_worker_is_killed_and_restarted(
    two_workers: DnsProxyProcess,
) -> None:
    proxy = two_workers
    pids = worker_pids(proxy.proc.pid)
    os.kill(pids[1], signal.SIGSTOP)  # its event loop stops answering, its process lives
    try:
        wait_until(
            lambda: metric_value(metrics(proxy), 'dnsproxy_worker_restarts_total{worker="1"}') == 1,
            "the stalled worker's restart",
            proxy,
        )
        wait_until(
            lambda: metric_value(metrics(proxy), 'dnsproxy_worker_up{worker="1"}') == 1,
            "the replacement",
            proxy,
        )
    finally:
        if alive(pids[1]):
            os.kill(pids[1], signal.SIGKILL)
    assert f"worker 1 (pid {pids[1]}) stalled" in proxy.stderr
    assert f"worker 1 (pid {pids[1]}) exited with signal SIGKILL" in proxy.stderr
    assert ask_from_new_sockets(proxy.port, CACHED[3], 16) == ["169.254.3.3"] * 16
