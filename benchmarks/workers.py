"""``python -m benchmarks.workers``: what ``workers: N`` buys on this machine, measured.

Not part of ``make bench``. On a 2-core machine the load generator needs a core of its
own to saturate even one dnsproxy worker, so two workers cannot show their throughput
here; what can be measured honestly is the cost per query (CPU seconds of every dnsproxy
process, supervisor included, per answered query) at a fixed offered load, where the
machine is not saturated, next to the throughput when it is, with the share of the two
cores that dnsperf, the upstream and the rest of the machine took. Four parts:

1. ``hits``: 1,000 cached names; dnsperf at ``--rate`` QPS (cost per query), then as fast
   as it gets answers (throughput). ``miss``: unique questions forwarded over TCP to a
   local Unbound; dnsperf at ``--miss-rate`` QPS, then saturated. Each for every value
   of ``--workers``, ``--repeats`` times round-robin, a fresh dnsproxy per run; medians.
2. ``restart``: ``workers: 2`` under a steady load of cached names (``benchmarks/load.py``,
   which accounts for every query), worker 0 killed with SIGKILL: what its clients and
   the other worker's clients lost, how long its replacement took.
3. ``sharing``: why each worker reads a socket of its own. Two reader processes answer
   datagrams (a minimal echo, so that only the socket handling differs) from one shared
   socket, then each from its own member of an SO_REUSEPORT group; CPU and wake-ups per
   datagram at a fixed rate.

Every process runs unpinned (two workers need both cores), is killed when the run ends,
and talks to 127.0.0.1 only. Writes ``results/workers.json`` and ``results/workers.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import dnsperf, zone
from benchmarks.__main__ import _terminate, wait_quiet
from benchmarks.load import UdpLoad, make_query
from benchmarks.procs import HOST, HarnessError, Procs, free_port, wait_answering, which
from benchmarks.scenarios import cpu_seconds, machine_cpu_seconds, own_cpu_seconds, say
from benchmarks.systems import ROOT, upstream_conf

HERE = Path(__file__).resolve().parent
SIZES = zone.Sizes(
    hosts=100_000,  # A, AAAA, MX, TXT of each: 400,000 unique questions for the misses
    services=10,
    hit_names=1_000,
    miss_questions=400_000,
    fill_entries=10,
    mix_lookups=10,
)
# The saturating load: one dnsperf thread (it is the bottleneck either way, see the
# report), 16 source ports so that the kernel's hash spreads them over the workers.
SATURATE = dnsperf.Load(clients=16, threads=1, outstanding=400)
WARM = dnsperf.Load(clients=16, threads=1, outstanding=20)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers", description=__doc__)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--duration", type=float, default=8.0, help="seconds per dnsperf run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rate", type=int, default=20_000, help="fixed offered QPS, hits")
    p.add_argument("--miss-rate", type=int, default=5_000, help="fixed offered QPS, misses")
    p.add_argument("--restart-qps", type=int, nargs="+", default=[2_000, 5_000])
    p.add_argument("--part", action="append", choices=["hits", "miss", "restart", "sharing"])
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    p.add_argument(
        "--wait-quiet",
        type=float,
        metavar="LOAD",
        help="first wait (at most 30 min) for a quiet machine, as python -m benchmarks does",
    )
    return p.parse_args(argv)


# -- processes


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and of its children (a supervisor and its workers)."""
    return cpu_seconds(pid) + sum(cpu_seconds(child) for child in children(pid))


def children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def ctx_switches(pid: int) -> int:
    """Voluntary context switches of ``pid`` so far: each one a sleep, so a wake-up."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


class Bench:
    def __init__(self, procs: Procs, workdir: Path, files: zone.Files, args: Any) -> None:
        self.procs = procs
        self.workdir = workdir
        self.files = files
        self.args = args
        self.upstream_port = 0
        self.upstream_pid = 0
        self.starts = 0

    def start_upstream(self) -> None:
        unbound = which("unbound")
        if unbound is None:
            raise HarnessError("unbound is not installed: apt-get install unbound")
        directory = self.workdir / "upstream"
        directory.mkdir(parents=True, exist_ok=True)
        self.upstream_port = free_port()
        conf = upstream_conf(directory, self.upstream_port, self.files.local_data)
        log = directory / "unbound.log"
        proc = self.procs.start([unbound, "-d", "-c", str(conf)], log)
        wait_answering(
            self.upstream_port, self.files.upstream_probe_name, proc, 120, "upstream", log
        )
        self.upstream_pid = proc.pid

    @contextmanager
    def dnsproxy(
        self, workers: int, http_port: int | None = None
    ) -> Iterator[tuple[int, subprocess.Popen[bytes], Path]]:
        self.starts += 1
        directory = self.workdir / f"dnsproxy-{self.starts}"
        directory.mkdir(parents=True)
        port = free_port()
        conf = directory / "dnsproxy.yaml"
        conf.write_text(
            json.dumps(
                {
                    "listen": [f"{HOST}:{port}"],
                    "http_listen": f"{HOST}:{http_port}" if http_port else None,
                    "workers": workers,
                    "cache": {"max_entries": 450_000},
                    "zones": [{"zone": ".", "upstreams": [f"tcp://{HOST}:{self.upstream_port}"]}],
                    # info: the supervisor's restart lines (restart part only: no query log)
                    "log": {"level": "info" if http_port else "warning"},
                }
            )
        )
        log = directory / "stderr.log"
        proc = self.procs.start(
            [sys.executable, "-m", "dnsproxy", "--config", str(conf)],
            log,
            env={"PYTHONPATH": str(ROOT)},
        )
        try:
            wait_answering(port, self.files.probe_name, proc, 60, "dnsproxy", log)
            # The probe reached one worker; wait until every worker serves.
            deadline = time.monotonic() + 30
            while len(children(proc.pid)) < (workers if workers > 1 else 0):
                if time.monotonic() > deadline:
                    raise HarnessError(f"{workers} workers did not start")
                time.sleep(0.05)
            yield port, proc, log
        finally:
            self.procs.stop(proc)

    def measured(
        self, port: int, proxy: int, datafile: Path, load: dnsperf.Load, **kw: Any
    ) -> dict[str, Any]:
        """One dnsperf run and the CPU every party used meanwhile, in cores."""
        p0, u0, d0 = tree_cpu(proxy), cpu_seconds(self.upstream_pid), own_cpu_seconds()
        (busy0, _, steal0) = machine_cpu_seconds()
        r = dnsperf.run(port, datafile, load, cpu=None, interval=True, **kw)
        (busy1, _, steal1) = machine_cpu_seconds()
        p1, u1, d1 = tree_cpu(proxy), cpu_seconds(self.upstream_pid), own_cpu_seconds()
        seconds = r.runtime_s
        cpu = {"dnsproxy": p1 - p0, "dnsperf": d1 - d0, "upstream": u1 - u0}
        cpu["other"] = max(0.0, busy1 - busy0 - sum(cpu.values()))
        out: dict[str, Any] = {
            "ok_qps": round(r.ok_qps),
            "answered": r.ok,
            "lost": r.lost,
            "rcodes": r.rcodes,
            "runtime_s": round(seconds, 3),
            "steal_cores": round((steal1 - steal0) / seconds, 3),
        }
        for who, used in cpu.items():
            out[f"{who}_cores"] = round(used / seconds, 3)
        if r.ok:
            out["dnsproxy_us_per_query"] = round(1e6 * cpu["dnsproxy"] / r.ok, 2)
            out["dnsperf_us_per_query"] = round(1e6 * cpu["dnsperf"] / r.ok, 2)
        return out

    # -- hits and misses

    def hits(self, workers: int) -> dict[str, Any]:
        with self.dnsproxy(workers) as (port, proc, _):
            # Every worker has its own cache: warm until every one holds every name.
            for _ in range(6):
                dnsperf.run(port, self.files.hits, WARM, cpu=None, max_runs=1)
            fixed = self.measured(
                port,
                proc.pid,
                self.files.hits,
                dnsperf.Load(clients=16, threads=1, outstanding=200, max_qps=self.args.rate),
                duration_s=self.args.duration,
            )
            full = self.measured(
                port, proc.pid, self.files.hits, SATURATE, duration_s=self.args.duration
            )
        return {"fixed": fixed, "saturated": full}

    def miss(self, workers: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        rate = dnsperf.Load(clients=16, threads=1, outstanding=400, max_qps=self.args.miss_rate)
        for key, load in (("fixed", rate), ("saturated", SATURATE)):
            with self.dnsproxy(workers) as (port, proc, _):  # an empty cache each time
                out[key] = self.measured(
                    port,
                    proc.pid,
                    self.files.miss,
                    load,
                    duration_s=self.args.duration,
                    max_runs=1,
                )
        return out

    # -- a worker killed under load

    def restart(self, qps: int) -> dict[str, Any]:
        http_port = free_port()
        with self.dnsproxy(2, http_port) as (port, proc, log):
            names = [f"{zone.host(i)}." for i in range(200)]
            for _ in range(4):
                for name in names:
                    ask(port, name)
            duration_s, kill_at = 10.0, 4.0
            queries = [make_query(names[i % len(names)]) for i in range(int(qps * duration_s))]
            load = UdpLoad(HOST, port, queries, qps, duration_s, sockets=16, timeout_s=2.0)
            owner = [which_worker(port, http_port, sock) for sock in load.socks]
            workers = {int(argv_worker(pid)): pid for pid in children(proc.pid)}
            load.start()
            while load.elapsed() < kill_at:
                time.sleep(0.01)
            os.kill(workers[0], signal.SIGKILL)
            killed = load.elapsed()
            result = load.join()
            text = log.read_text(errors="replace")
        restarted = [line for line in text.splitlines() if "restarted as pid" in line]
        took = float(restarted[0].split(") in ")[1].split("s,")[0]) if restarted else None
        shares: dict[str, Any] = {}
        for worker in (0, 1):
            idx = [i for i in range(load.sent) if owner[i % len(load.socks)] == worker]
            lat = sorted(
                load.answered_at[i] - load.sent_at[i]
                for i in idx
                if load.answered_at[i] and load.sent_at[i] - load.start_time >= killed - 0.01
            )
            shares["killed" if worker == 0 else "other"] = {
                "sockets": owner.count(worker),
                "sent": len(idx),
                "lost": sum(1 for i in idx if not load.answered_at[i]),
                "max_latency_ms_after_kill": round(1e3 * lat[-1], 1) if lat else None,
            }
        return {
            "qps": qps,
            "sent": result.sent,
            "lost": result.unanswered,
            "restart_s": took,
            "shares": shares,
            "summary": result.summary(),
        }

    # -- one socket shared, or one each

    def sharing(self, mode: str, rate: int) -> dict[str, Any]:
        port = free_port()
        shared = None
        if mode == "shared":
            shared = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            shared.bind((HOST, port))
        readers = []
        log = self.workdir / f"echo-{mode}.log"
        try:
            for _ in range(2):
                fd = shared.fileno() if shared is not None else -1
                readers.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "benchmarks.workers", "--echo", str(port), str(fd)],
                        cwd=ROOT,
                        pass_fds=(fd,) if fd >= 0 else (),
                        stdin=subprocess.DEVNULL,
                        stderr=log.open("ab"),
                        start_new_session=True,
                    )
                )
            time.sleep(1.0)  # both import uvloop and start reading
            load = dnsperf.Load(clients=16, threads=1, outstanding=200, max_qps=rate)
            c0 = [cpu_seconds(reader.pid) for reader in readers]
            w0 = [ctx_switches(reader.pid) for reader in readers]
            r = dnsperf.run(port, self.files.hits, load, cpu=None, duration_s=self.args.duration)
            c1 = [cpu_seconds(reader.pid) for reader in readers]
            w1 = [ctx_switches(reader.pid) for reader in readers]
        finally:
            for reader in readers:
                reader.kill()
                reader.wait()
            if shared is not None:
                shared.close()
        answered = max(1, r.completed)
        used = [b - a for a, b in zip(c0, c1, strict=True)]
        return {
            "mode": mode,
            "offered_qps": rate,
            "answered": r.completed,
            "qps": round(r.qps),
            "us_per_datagram": round(1e6 * sum(used) / answered, 2),
            "wakeups_per_datagram": round((sum(w1) - sum(w0)) / answered, 3),
            "cpu_share": [round(u / max(sum(used), 1e-9), 2) for u in used],
        }


def argv_worker(pid: int) -> str:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return argv[argv.index(b"worker") + 1].decode()


def ask(port: int, name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(2)
        sock.sendto(make_query(name), (HOST, port))
        sock.recv(4096)


def which_worker(port: int, http_port: int, sock: socket.socket) -> int:
    """The worker the kernel sends ``sock``'s datagrams to: the one whose request counter
    (dnsproxy_worker_requests_total) moves when ``sock`` sends a query."""
    before = worker_requests(http_port)
    sock.sendto(b"\xff\xfe" + make_query(f"{zone.host(0)}.")[2:], (HOST, port))
    if not select.select([sock], [], [], 5)[0]:
        raise HarnessError("no answer to a probe")
    sock.recv(4096)
    after = worker_requests(http_port)
    (moved,) = [i for i in after if after[i] != before[i]]
    return moved


def worker_requests(http_port: int) -> dict[int, float]:
    with urllib.request.urlopen(f"http://{HOST}:{http_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("dnsproxy_worker_requests_total{"):
            out[int(line.split('"')[1])] = float(line.rsplit(" ", 1)[1])
    return out


def echo(port: int, fd: int) -> None:
    """A reader process of the sharing part: answer every datagram (QR set) read from the
    shared socket ``fd``, or from a member of its own SO_REUSEPORT group on ``port``,
    in batches from the event loop as dnsproxy's listener does."""
    import asyncio

    import uvloop

    if fd >= 0:
        sock = socket.socket(fileno=fd)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((HOST, port))
    sock.setblocking(False)

    def readable() -> None:
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(4096)
            except BlockingIOError:
                return
            sock.sendto(data[:2] + bytes([data[2] | 0x80]) + data[3:], addr)

    async def main() -> None:
        asyncio.get_running_loop().add_reader(sock.fileno(), readable)
        await asyncio.sleep(3600)

    uvloop.run(main())


# -- the report


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 2) if values else float("nan")


def markdown(results: dict[str, Any], command: str) -> str:
    out = [
        "# workers: N on this machine",
        "",
        f"Run of {results['date']}: `{command}`; {results['machine']}. Medians of "
        f"{results['repeats']} runs; `cores` are CPU seconds per second of run (2.0 = the "
        "whole machine); `µs/query` is CPU time of every dnsproxy process (the supervisor "
        "and its workers) per answered query; dnsperf and Unbound ran on the same two cores.",
        "",
    ]
    for part in ("hits", "miss"):
        if part not in results:
            continue
        out += [
            f"## {part}",
            "",
            "| workers | load | answered QPS | dnsproxy µs/query | dnsproxy cores | "
            "dnsperf cores | dnsperf µs/query | Unbound cores | other cores | steal |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for workers, runs in results[part].items():
            for load in ("fixed", "saturated"):
                rs = [r[load] for r in runs]
                out.append(
                    f"| {workers} | {load} | {median_of(rs, 'ok_qps'):,.0f} | "
                    f"{median_of(rs, 'dnsproxy_us_per_query')} | "
                    f"{median_of(rs, 'dnsproxy_cores')} | {median_of(rs, 'dnsperf_cores')} | "
                    f"{median_of(rs, 'dnsperf_us_per_query')} | "
                    f"{median_of(rs, 'upstream_cores')} | {median_of(rs, 'other_cores')} | "
                    f"{median_of(rs, 'steal_cores')} |"
                )
        out.append("")
    if "restart" in results:
        out += [
            "## kill -9 of one of 2 workers under load",
            "",
            "| offered QPS | lost (killed worker's clients) | lost (other worker's) | "
            "restart | slowest answer to the killed worker's clients after the kill |",
            "|---|---|---|---|---|",
        ]
        for r in results["restart"]:
            k, o = r["shares"]["killed"], r["shares"]["other"]
            out.append(
                f"| {r['qps']:,} | {k['lost']} of {k['sent']:,} | {o['lost']} of {o['sent']:,} | "
                f"{r['restart_s']} s | {k['max_latency_ms_after_kill']} ms |"
            )
        out.append("")
    if "sharing" in results:
        out += [
            "## one socket read by 2 processes, or one each",
            "",
            "| sockets | offered QPS | answered QPS | reader CPU µs/datagram | "
            "wake-ups/datagram | CPU share of each reader |",
            "|---|---|---|---|---|---|",
        ]
        for r in results["sharing"]:
            out.append(
                f"| {r['mode']} | {r['offered_qps']:,} | {r['qps']:,} | {r['us_per_datagram']} | "
                f"{r['wakeups_per_datagram']} | {' / '.join(map(str, r['cpu_share']))} |"
            )
        out.append("")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--echo"]:
        echo(int(argv[1]), int(argv[2]))
        return 0
    args = parse_args(argv)
    # An exception on SIGTERM, so that every process started is killed on the way out.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    if dnsperf.binary() is None:
        print(dnsperf.INSTALL_HINT, file=sys.stderr)
        return 2
    parts = args.part or ["hits", "miss", "restart", "sharing"]
    if args.wait_quiet is not None:
        wait_quiet(args.wait_quiet)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python "
        f"{platform.python_version()}",
        "repeats": args.repeats,
        "load_before": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory(prefix="dnsproxy-workers-") as tmp, Procs() as procs:
        workdir = Path(tmp)
        say("generating data")
        files = zone.generate(workdir / "data", SIZES)
        bench = Bench(procs, workdir, files, args)
        say("starting the upstream")
        bench.start_upstream()
        for part in ("hits", "miss"):
            if part not in parts:
                continue
            results[part] = {str(n): [] for n in args.workers}
            for repeat in range(args.repeats):
                for n in args.workers:
                    say(f"{part}, workers {n}, run {repeat + 1}")
                    results[part][str(n)].append(getattr(bench, part)(n))
        if "restart" in parts:
            results["restart"] = []
            for qps in args.restart_qps:
                say(f"restart at {qps} QPS")
                results["restart"].append(bench.restart(qps))
        if "sharing" in parts:
            results["sharing"] = []
            for rate in (2_000, args.rate):
                for mode in ("shared", "reuseport"):
                    say(f"sharing: {mode} at {rate} QPS")
                    results["sharing"].append(bench.sharing(mode, rate))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "workers.json").write_text(json.dumps(results, indent=1) + "\n")
    command = "python -m benchmarks.workers " + " ".join(argv)
    (args.out_dir / "workers.md").write_text(markdown(results, command.strip()) + "\n")
    say(f"wrote {args.out_dir / 'workers.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
