"""Random-subdomain flood: do cached names stay fast while misses arrive faster than
they can be resolved?

    python -m benchmarks.flood                         # dnsproxy and Unbound, 300k names
    python -m benchmarks.flood --systems dnsproxy --names 60000 --json out.json

For each system, started afresh in front of one upstream (Unbound, answering NXDOMAIN
for every name under ``flood.test`` and an A record for the side client's name):

1. its miss capacity: dnsperf asks unique names as fast as they are answered, for a few
   seconds (answers per second);
2. a fresh start, the side client's name cached, the resident size read;
3. the flood: ``--names`` unique names at ``--factor`` times dnsproxy's miss capacity
   (the same rate for every system, so that they face the same flood), while the side
   client asks its cached name every 10 ms and times each answer; then the resident
   size again, and for dnsproxy what it shed and how full its cache is.

The side client sends on schedule whatever happened to the previous query (an answer
later than 2 s counts as lost). It runs unpinned and, where allowed, at a higher
priority, so that its own scheduling delay is not what it measures. dnsproxy runs on
CPU 0; dnsperf and the upstream on CPU 1. Everything is on 127.0.0.1, every load bounded
by its name count and a kill timeout. Writes ``benchmarks/results/flood.json`` and
``flood.md`` unless ``--json`` names another file (then no Markdown).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import select
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import dnsperf
from benchmarks.procs import (
    HOST,
    HarnessError,
    Procs,
    build_query,
    free_port,
    reply_rcode,
    rss_kib,
    wait_answering,
    which,
)
from benchmarks.systems import ROOT, SYSTEMS, Target, upstream_conf

HERE = Path(__file__).resolve().parent
SUT_CPU, CLIENT_CPU = 0, 1
SIDE_NAME = "side.flood.test"
SIDE_INTERVAL_S = 0.01
SIDE_TIMEOUT_S = 2.0
CAPACITY = dnsperf.Load(clients=4, threads=1, outstanding=200)


def say(msg: str) -> None:
    print(f"[flood {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the side client


def side_client(port: int, name: str, duration_s: float, out: Path) -> None:
    """Ask ``name`` every 10 ms for ``duration_s``; write the latencies and losses."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    except OSError:
        pass  # not root: measured at the normal priority
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((HOST, port))
    sock.setblocking(False)
    pending: dict[int, float] = {}  # query id -> when sent
    latencies: list[float] = []
    other_rcodes: dict[int, int] = {}
    lost = sent = 0
    start = time.monotonic()
    next_send = start
    end = start + duration_s
    while True:
        now = time.monotonic()
        for qid, sent_at in list(pending.items()):
            if now - sent_at > SIDE_TIMEOUT_S:
                del pending[qid]
                lost += 1
        if now >= end and not pending:
            break
        if now >= next_send and now < end:
            qid = secrets.randbelow(65536)
            while qid in pending:
                qid = secrets.randbelow(65536)
            try:
                sock.send(build_query(name, "A", qid))
                pending[qid] = now
            except OSError:
                lost += 1
            sent += 1
            next_send += SIDE_INTERVAL_S
            continue
        wait = max(0.0, min(next_send if now < end else now + 0.05, now + 0.05) - now)
        readable, _, _ = select.select([sock], [], [], wait)
        if not readable:
            continue
        while True:
            try:
                reply = sock.recv(4096)
            except BlockingIOError:
                break
            received = time.monotonic()
            qid = int.from_bytes(reply[:2], "big") if len(reply) >= 2 else -1
            asked_at = pending.pop(qid, -1.0)
            if asked_at < 0:
                continue  # a late reply to a query already counted as lost
            rcode = reply_rcode(reply, qid)
            if rcode == 0:
                latencies.append(received - asked_at)
            else:
                other_rcodes[rcode or -1] = other_rcodes.get(rcode or -1, 0) + 1
    sock.close()
    out.write_text(
        json.dumps(
            {
                "sent": sent,
                "answered": len(latencies),
                "lost": lost,
                "errors": other_rcodes,
                "latencies_s": latencies,
            }
        )
    )


# -- the flood


def flood_sender(port: int, rate: int, count: int, tag: str, out: Path) -> None:
    """Send ``count`` unique names at ``rate`` per second, evenly: each millisecond its
    share, from 4 sockets (source ports) in turn, never waiting for answers; count the
    answers by rcode, and those that never came (within 1 s of the last send)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.connect((HOST, port))
        sock.setblocking(False)
    rcodes: dict[int, int] = {}
    received = 0

    def drain() -> None:
        nonlocal received
        for sock in socks:
            while True:
                try:
                    reply = sock.recv(4096)
                except (BlockingIOError, InterruptedError):
                    break
                if len(reply) >= 4:
                    received += 1
                    rcodes[reply[3] & 15] = rcodes.get(reply[3] & 15, 0) + 1

    start = time.monotonic()
    sent = send_errors = 0
    while sent < count:
        due = min(count, int((time.monotonic() - start) * rate) + 1)
        while sent < due:
            try:
                socks[sent & 3].send(build_query(f"{tag}-{sent}.flood.test", "A", sent & 0xFFFF))
            except OSError:
                send_errors += 1
            sent += 1
        drain()
        time.sleep(0.001)
    elapsed = time.monotonic() - start
    end = time.monotonic() + 1.0
    while time.monotonic() < end and received < sent:
        drain()
        time.sleep(0.005)
    names = {0: "NOERROR", 2: "SERVFAIL", 3: "NXDOMAIN", 5: "REFUSED"}
    out.write_text(
        json.dumps(
            {
                "sent": sent,
                "send_errors": send_errors,
                "completed": received,
                "lost": sent - received,
                "rcodes": {names.get(k, str(k)): v for k, v in rcodes.items()},
                "seconds": round(elapsed, 3),
                "qps": round(sent / elapsed, 1),
            }
        )
    )


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# -- systems


def _dnsproxy_conf(
    workdir: Path, port: int, http_port: int, upstream_port: int, args: argparse.Namespace
) -> Path:
    conf = workdir / "dnsproxy.yaml"
    limits = [f"shed_after_s: {args.shed_after}"] if args.shed_after is not None else []
    if args.max_inflight:
        limits.append(f"max_inflight: {args.max_inflight}")
    conf.write_text(
        "\n".join(
            [
                f'listen: ["{HOST}:{port}"]',
                f'http_listen: "{HOST}:{http_port}"',
                f"cache: {{max_entries: {args.cache_entries}}}",
                f"limits: {{{', '.join(limits)}}}",
                "zones:",
                '  - zone: "."',
                f'    upstreams: ["tcp://{HOST}:{upstream_port}"]',
                "log: {level: warning}",
                "",
            ]
        )
    )
    return conf


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    port: int
    http_port: int | None
    log: Path


def start_system(
    procs: Procs, key: str, workdir: Path, upstream_port: int, args: argparse.Namespace
) -> Running:
    port = free_port()
    log = workdir / f"{key}.log"
    cpu = None if args.no_pin else SUT_CPU
    if key == "dnsproxy":
        http_port = free_port()
        conf = _dnsproxy_conf(workdir, port, http_port, upstream_port, args)
        argv = [sys.executable, "-m", "dnsproxy", "--config", str(conf)]
        env = {"PYTHONPATH": str(ROOT)}
        proc = procs.start(argv, log, cpu=cpu, env=env)
    else:
        http_port = None
        command = SYSTEMS[key].command(workdir / key, port, Target(upstream_port))
        proc = procs.start(command.argv, log, cpu=cpu, env=command.env)
    wait_answering(port, SIDE_NAME, proc, 30.0, key, log)
    return Running(proc, port, http_port, log)


def metrics(run: Running) -> dict[str, float]:
    """dnsproxy's /metrics as {sample: value}; {} for the other systems."""
    if run.http_port is None:
        return {}
    with urllib.request.urlopen(f"http://{HOST}:{run.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            sample, _, value = line.rpartition(" ")
            out[sample] = float(value)
    return out


# -- the run


def names_file(path: Path, count: int, tag: str) -> Path:
    with path.open("w") as f:
        for i in range(count):
            f.write(f"{tag}-{i}.flood.test A\n")
    return path


def measure_capacity(
    procs: Procs, key: str, workdir: Path, upstream_port: int, args: argparse.Namespace
) -> float:
    run = start_system(procs, key, workdir, upstream_port, args)
    try:
        count = int(args.capacity_s * 60_000)
        names = names_file(workdir / f"capacity-{key}.txt", count, f"c{secrets.token_hex(4)}")
        result = dnsperf.run(
            run.port,
            names,
            CAPACITY,
            cpu=None if args.no_pin else CLIENT_CPU,
            duration_s=args.capacity_s,
            max_runs=1,
            interval=True,
        )
        return result.ok_qps
    finally:
        procs.stop(run.proc)


def flood_one(
    procs: Procs,
    key: str,
    workdir: Path,
    upstream_port: int,
    rate: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    run = start_system(procs, key, workdir, upstream_port, args)
    try:
        time.sleep(1.0)  # settle before reading the idle size
        rss_idle = rss_kib(run.proc.pid)
        duration = args.names / rate
        side_out = workdir / f"side-{key}.json"
        side = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.flood",
                "--side",
                str(run.port),
                f"{duration + 1.0:.3f}",
                str(side_out),
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.5)  # the side client's baseline before the flood starts
            flood_out = workdir / f"flood-{key}.json"
            argv = [sys.executable, "-m", "benchmarks.flood", "--flood", str(run.port)]
            argv += [str(rate), str(args.names), f"f{secrets.token_hex(4)}", str(flood_out)]
            if not args.no_pin:
                argv = ["taskset", "-c", str(CLIENT_CPU), *argv]
            subprocess.run(
                argv, cwd=ROOT, stdin=subprocess.DEVNULL, timeout=duration + 60.0, check=True
            )
            flood = json.loads(flood_out.read_text())
            side.wait(timeout=duration + 30.0)
        finally:
            if side.poll() is None:
                side.kill()
                side.wait()
        rss_after = rss_kib(run.proc.pid)
        m = metrics(run)
        side_result = json.loads(side_out.read_text())
    finally:
        procs.stop(run.proc)
    lat = side_result.pop("latencies_s")
    out: dict[str, Any] = {
        "system": key,
        "offered_qps": rate,
        "flood": flood,
        "side": {
            **side_result,
            "p50_ms": round(percentile(lat, 0.5) * 1e3, 3),
            "p90_ms": round(percentile(lat, 0.9) * 1e3, 3),
            "p99_ms": round(percentile(lat, 0.99) * 1e3, 3),
            "max_ms": round(max(lat, default=float("nan")) * 1e3, 3),
            "mean_ms": round(statistics.fmean(lat) * 1e3, 3) if lat else None,
        },
        "rss_idle_mib": round(rss_idle / 1024, 1),
        "rss_after_mib": round(rss_after / 1024, 1),
    }
    if m:
        out["dnsproxy"] = {
            "shed_overload": m.get('dnsproxy_forward_rejects_total{reason="overload"}', 0.0),
            "shed_max_inflight": m.get(
                'dnsproxy_forward_rejects_total{reason="max_inflight"}', 0.0
            ),
            "cache_entries": sum(
                v for k, v in m.items() if k.startswith("dnsproxy_cache_entries{")
            ),
            "cache_capacity": m.get("dnsproxy_cache_capacity", 0.0),
            "cache_bytes_mib": round(m.get("dnsproxy_cache_bytes", 0.0) / 2**20, 1),
            "dropped": {k: v for k, v in m.items() if k.startswith("dnsproxy_dropped_total{")},
        }
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Random-subdomain flood",
        "",
        f"`{result['command']}` on {result['machine']}. {result['names']:,} unique names "
        f"under `flood.test` (NXDOMAIN from the upstream) at {result['rate']:,} queries/s, "
        f"{result['factor']:g} x dnsproxy's miss capacity ({result['capacity_qps']:,.0f} "
        "answers/s, measured first), while a side client asks one cached name every "
        "10 ms (lost: no answer within 2 s).",
        "",
        "| system | side p50 | side p90 | side p99 | side max | side lost | flood answered | "
        "flood SERVFAIL | flood lost | RSS idle → after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["systems"]:
        s, f = r["side"], r["flood"]
        lines.append(
            f"| {r['system']} | {s['p50_ms']:.1f} ms | {s['p90_ms']:.1f} ms | "
            f"{s['p99_ms']:.1f} ms | {s['max_ms']:.0f} ms | {s['lost']} of {s['sent']} | "
            f"{f['completed']:,} | {f['rcodes'].get('SERVFAIL', 0):,} | {f['lost']:,} | "
            f"{r['rss_idle_mib']} → {r['rss_after_mib']} MiB |"
        )
    for r in result["systems"]:
        d = r.get("dnsproxy")
        if d:
            lines += [
                "",
                f"dnsproxy shed {d['shed_overload']:,.0f} misses while the queue in its "
                "socket stood older than `limits.shed_after_s` "
                f'(`dnsproxy_forward_rejects_total{{reason="overload"}}`) and '
                f"{d['shed_max_inflight']:,.0f} at `limits.max_inflight`; its cache held "
                f"{d['cache_entries']:,.0f} of {d['cache_capacity']:,.0f} entries "
                f"({d['cache_bytes_mib']} MiB of reply bytes, bounded by 64 MiB) when the "
                "flood ended.",
            ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.flood", description=__doc__.split("\n")[0]
    )
    p.add_argument(
        "--systems", nargs="+", default=["dnsproxy", "unbound"], choices=["dnsproxy", "unbound"]
    )
    p.add_argument("--names", type=int, default=300_000, help="unique names in the flood")
    p.add_argument("--factor", type=float, default=2.0, help="flood rate / miss capacity")
    p.add_argument("--rate", type=int, default=0, help="flood rate, queries/s (0: measured)")
    p.add_argument("--capacity-s", type=float, default=5.0, help="seconds of capacity run")
    p.add_argument("--cache-entries", type=int, default=10_000, help="dnsproxy cache.max_entries")
    p.add_argument("--max-inflight", type=int, help="dnsproxy limits.max_inflight")
    p.add_argument("--shed-after", type=float, help="dnsproxy limits.shed_after_s")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--json", type=Path, help="write the results here (and no Markdown)")
    p.add_argument("--side", nargs=3, metavar=("PORT", "SECONDS", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--flood", nargs=5, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.side:
        side_client(int(args.side[0]), SIDE_NAME, float(args.side[1]), Path(args.side[2]))
        return 0
    if args.flood:
        port, rate, count, tag, out = args.flood
        flood_sender(int(port), int(rate), int(count), tag, Path(out))
        return 0
    for tool in ("dnsperf", "unbound", *(["taskset"] if not args.no_pin else [])):
        if which(tool) is None:
            print(f"needs {tool} (apt-get install dnsperf unbound util-linux)", file=sys.stderr)
            return 2
    with tempfile.TemporaryDirectory(prefix="dnsproxy-flood-") as tmp, Procs() as procs:
        workdir = Path(tmp)
        zones = workdir / "zones.conf"
        zones.write_text(
            '  local-zone: "flood.test." static\n'
            "  local-data: 'flood.test. 3600 IN SOA ns.flood.test. h.flood.test. 1 3600 600 "
            "86400 3600'\n"
            f"  local-data: '{SIDE_NAME}. 3600 IN A 169.254.1.1'\n"
        )
        upstream_port = free_port()
        conf = upstream_conf(workdir, upstream_port, zones)
        log = workdir / "upstream.log"
        upstream = procs.start(
            [which("unbound") or "unbound", "-d", "-c", str(conf)],
            log,
            cpu=None if args.no_pin else SUT_CPU,
        )
        wait_answering(upstream_port, SIDE_NAME, upstream, 30.0, "upstream", log)
        rate = args.rate
        capacity = 0.0
        if not rate:
            capacity = measure_capacity(procs, "dnsproxy", workdir, upstream_port, args)
            rate = int(capacity * args.factor)
            say(f"dnsproxy miss capacity {capacity:,.0f}/s: flood at {rate:,}/s")
        results = []
        for key in args.systems:
            say(f"{key}: {args.names:,} names at {rate:,}/s")
            r = flood_one(procs, key, workdir, upstream_port, rate, args)
            s = r["side"]
            say(
                f"{key}: side p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, lost {s['lost']} "
                f"of {s['sent']}; RSS {r['rss_idle_mib']} -> {r['rss_after_mib']} MiB"
            )
            results.append(r)
    result = {
        "command": " ".join(["python -m benchmarks.flood", *argv]),
        "machine": f"{os.cpu_count()} CPUs, Linux {os.uname().release}",
        "names": args.names,
        "rate": rate,
        "factor": args.factor,
        "capacity_qps": capacity,
        "systems": results,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    else:
        out = HERE / "results"
        out.mkdir(exist_ok=True)
        (out / "flood.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "flood.md").write_text(markdown(result))
        print(markdown(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except HarnessError as exc:
        print(f"flood: {exc}", file=sys.stderr)
        sys.exit(1)
