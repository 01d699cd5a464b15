"""Restarts under load: queries lost and the longest gap, dnsproxy against its peers.

    python -m benchmarks.restart                 # every system, 3,000 QPS for 20 s, 3 restarts
    python -m benchmarks.restart --systems dnsproxy-handover unbound --qps 1000

Each system runs as a caching forwarder on 127.0.0.1 in front of the same upstream (Unbound
answering 1,000 names from ``local-data`` and refusing everything else). Once every name is
cached, ``benchmarks/load.py`` asks them in turn at a steady rate and accounts for every
query; meanwhile the system is replaced three times:

- ``dnsproxy-handover``: a second dnsproxy with the same configuration is started; it
  takes the sockets and the cache over from the running one, which exits by itself;
- ``dnsproxy-restart``, ``unbound``, ``dnsmasq``: SIGTERM, and a new process started as
  soon as the old one has exited (so as soon as it can bind), as an operator's restart.

Writes ``results/restart.json`` and ``results/restart.md`` (the table in the README's
Reliability section). Not part of ``make test``: the figures depend on the machine. Every
process runs in its own group and is killed at the end, also on an error; all traffic
stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.load import SLOW_S, LoadResult, UdpLoad, make_query
from benchmarks.procs import HOST, HarnessError, Procs, free_port, query, wait_answering, which
from benchmarks.scenarios import say
from benchmarks.systems import SYSTEMS, Target, upstream_conf

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
NAMES = [f"r{i}.restart.test" for i in range(1000)]
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Way:
    """One system and how it is restarted."""

    key: str
    label: str
    how: str  # the restart, for the table
    handover: bool  # replaced by a successor (else SIGTERM, then a new process)
    system: str  # the key in benchmarks.systems.SYSTEMS


_RESTART = "SIGTERM, start when exited"
WAYS = {
    w.key: w
    for w in (
        Way(
            "dnsproxy-handover",
            "dnsproxy, handover",
            "start a 2nd instance",
            True,
            "dnsproxy-uvloop",
        ),
        Way("dnsproxy-restart", "dnsproxy, no handover", _RESTART, False, "dnsproxy-uvloop"),
        Way("unbound", "Unbound", _RESTART, False, "unbound"),
        Way("dnsmasq", "dnsmasq", _RESTART, False, "dnsmasq"),
    )
}


def zone_file(workdir: Path) -> Path:
    lines = ['local-zone: "restart.test." static']
    lines += [
        f"local-data: '{n}. 3600 IN A 169.254.{i // 256}.{i % 256}'" for i, n in enumerate(NAMES)
    ]
    path = workdir / "restart-zone.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def dnsproxy_command(workdir: Path, port: int, upstream_port: int, handover: bool) -> list[str]:
    conf = workdir / "dnsproxy.yaml"
    doc = {
        "listen": [f"{HOST}:{port}"],
        # As deployed: with the metrics endpoint, which a handover passes on too.
        "http_listen": f"{HOST}:{free_port()}",
        "zones": [{"zone": ".", "upstreams": [f"tcp://{HOST}:{upstream_port}"]}],
        "log": {"level": "info"},
        "handover": {"path": str(workdir / "handover.sock") if handover else None},
    }
    conf.write_text(json.dumps(doc))
    return [sys.executable, "-m", "dnsproxy", "--config", str(conf)]


def run_way(
    way: Way, procs: Procs, workdir: Path, upstream_port: int, qps: int, duration_s: float,
    restarts: int,
) -> dict[str, object]:  # fmt: skip
    port = free_port()
    wdir = workdir / way.key
    wdir.mkdir()
    if way.system.startswith("dnsproxy"):
        argv, env = (
            dnsproxy_command(wdir, port, upstream_port, way.handover),
            {"PYTHONPATH": str(HERE.parent)},
        )
    else:
        cmd = SYSTEMS[way.system].command(wdir, port, Target(upstream_port))
        argv, env = cmd.argv, cmd.env
    log = wdir / "server.log"

    def start() -> subprocess.Popen[bytes]:
        return procs.start(argv, log, env=env)

    proc = start()
    wait_answering(port, NAMES[0], proc, START_TIMEOUT_S, way.label, log)
    for name in NAMES:  # warm: every name cached before the load
        if query(port, name) != 0:
            raise HarnessError(f"{way.label} did not answer {name}")
    load = UdpLoad(HOST, port, [make_query(n) for n in NAMES], qps, duration_s).start()
    switches: list[tuple[float, float]] = []  # (began, took), seconds into the load
    try:
        for k in range(restarts):
            at = duration_s * (k + 1) / (restarts + 1)
            while load.elapsed() < at:
                time.sleep(0.01)
            began = load.elapsed()
            if way.handover:
                new = start()
                _wait_exit(proc, START_TIMEOUT_S, way.label)
                procs.stop(proc)
            else:
                procs.stop(proc)  # SIGTERM, wait for the exit
                new = start()
                wait_answering(port, NAMES[0], new, START_TIMEOUT_S, way.label, log)
            switches.append((began, load.elapsed() - began))
            proc = new
    finally:
        result = load.join()
        procs.stop(proc)
    say(f"{way.label}: {result.summary()}")
    return _figures(way, qps, duration_s, restarts, result, switches)


def _wait_exit(proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"{what}: the replaced instance did not exit") from None


def _figures(
    way: Way,
    qps: int,
    duration_s: float,
    restarts: int,
    r: LoadResult,
    switches: list[tuple[float, float]],
) -> dict[str, object]:
    # A slow answer is the switch's doing when its query was sent while the switch ran
    # or within a second after it; elsewhere it is the machine's noise.
    windows = [(began, began + took + 1.0) for began, took in switches]
    return {
        "system": way.key,
        "label": way.label,
        "restart": way.how,
        "qps": qps,
        "duration_s": duration_s,
        "restarts": restarts,
        "sent": r.sent,
        "answered": r.answered,
        "lost": r.unanswered,
        "slow": r.slow,
        "slow_at_switch": r.slow_within(windows),
        "longest_gap_ms": round(1000 * r.longest_gap_s, 1),
        "gap_at_s": round(r.gap_at_s, 2),
        "p99_ms": round(r.percentile_ms(99), 2),
        "max_ms": round(1000 * max(r.latencies_s, default=0.0), 1),
        "switches_s": [[round(b, 2), round(t, 2)] for b, t in switches],
    }


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| system | restart | queries | lost | longest gap "
        "| answers > 100 ms (at a switch) | p99 | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['restart']} | {r['sent']:,} | {r['lost']:,} "
            f"| {r['longest_gap_ms']} ms | {r['slow']:,} ({r['slow_at_switch']:,}) "
            f"| {r['p99_ms']} ms | {r['max_ms']} ms |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.restart", description=__doc__.split("\n")[0]
    )
    p.add_argument("--systems", nargs="+", choices=list(WAYS), default=list(WAYS))
    p.add_argument("--qps", type=int, default=3000)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per system")
    p.add_argument("--restarts", type=int, default=3)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if which("unbound") is None:
        print("needs unbound (apt-get install unbound) as the upstream", file=sys.stderr)
        return 2
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="dnsproxy-restart-") as tmp, Procs() as procs:
        workdir = Path(tmp)
        up_port = free_port()
        conf = upstream_conf(workdir, up_port, zone_file(workdir))
        upstream = procs.start(
            [which("unbound") or "unbound", "-d", "-c", str(conf)], workdir / "upstream.log"
        )
        wait_answering(
            up_port, NAMES[0], upstream, START_TIMEOUT_S, "upstream", workdir / "upstream.log"
        )
        for key in args.systems:
            way = WAYS[key]
            missing = SYSTEMS[way.system].missing()
            if missing:
                say(f"{way.label}: skipped, {missing}")
                continue
            say(f"{way.label}: {args.qps} QPS for {args.duration:g} s, {args.restarts} restarts")
            rows.append(
                run_way(way, procs, workdir, up_port, args.qps, args.duration, args.restarts)
            )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "restart.json").write_text(
        json.dumps({"slow_s": SLOW_S, "runs": rows}, indent=1)
    )
    text = table(rows)
    (args.out_dir / "restart.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
