"""``python -m benchmarks``: run scenarios against the systems, write JSON, Markdown, PNG.

    python -m benchmarks                      # everything (make bench)
    python -m benchmarks --scenario hits --systems dnsproxy-uvloop dnsmasq
    python -m benchmarks --smoke              # a few seconds per system (make bench-smoke)
    python -m benchmarks --report benchmarks/results/full.json   # redo .md and .png

Exit status: 0 when every requested measurement produced a figure; 1 when one failed (the
files are still written); 2 for a usage error or a missing required tool (dnsperf,
unbound), except in smoke mode outside CI, where a missing tool is a skip (status 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import Any

from benchmarks import dnsperf, report, zone
from benchmarks.procs import HarnessError, Procs, pin, which
from benchmarks.scenarios import SCENARIOS, Bench, Settings, machine_cpu_seconds, say
from benchmarks.systems import BASELINE, PURE_DIR, SYSTEMS, unbound_version

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SUT_CPU, CLIENT_CPU = 0, 1
# Saturating load: one dnsperf thread, several source ports, enough queries in flight to
# keep a one-core server busy without overflowing its socket buffer.
THROUGHPUT = dnsperf.Load(clients=4, threads=1, outstanding=200)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default all")
    p.add_argument("--systems", nargs="+", choices=list(SYSTEMS), help="default: all installed")
    p.add_argument("--smoke", action="store_true", help="tiny zone, 1-second runs (CI)")
    p.add_argument("--duration", type=float, help="seconds per throughput run (default 10; 1)")
    p.add_argument("--repeats", type=int, help="runs per throughput figure (default 3; 1)")
    p.add_argument("--clients", type=int, default=THROUGHPUT.clients, help="dnsperf -c")
    p.add_argument("--threads", type=int, default=THROUGHPUT.threads, help="dnsperf -T")
    p.add_argument("--outstanding", type=int, default=THROUGHPUT.outstanding, help="dnsperf -q")
    p.add_argument("--latency-qps", type=int, default=20_000, help="offered load, scenario 3")
    p.add_argument("--cost-qps", type=int, default=20_000, help="offered load, cost scenario")
    p.add_argument("--cost-duration", type=float, help="seconds per cost run (default 6; 1)")
    p.add_argument("--name", help="results name (default: full, partial or smoke)")
    p.add_argument("--out-dir", type=Path, help="default benchmarks/results (smoke: a temp dir)")
    p.add_argument("--profile", type=Path, metavar="DIR", help="py-spy dnsproxy in hits/miss")
    p.add_argument(
        "--wait-quiet",
        type=float,
        metavar="LOAD",
        help="first wait (at most 30 min) for a 1-minute load average below LOAD and "
        "under 0.1 cores of hypervisor steal",
    )
    p.add_argument(
        "--max-steal",
        type=float,
        default=0.1,
        metavar="CORES",
        help="redo a run (twice at most) if the hypervisor took more CPU than this meanwhile",
    )
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs, logs and data")
    p.add_argument("--report", type=Path, metavar="JSON", help="only rebuild .md/.png from JSON")
    return p.parse_args(argv)


def _terminate(signum: int, frame: FrameType | None) -> None:
    # An exception, so that every finally block on the way out kills its processes.
    say(f"signal {signal.Signals(signum).name}: stopping every process started")
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.report is not None:
        data = json.loads(args.report.read_text())
        write_outputs(data, args.report.resolve().parent)
        return 0
    # Also SIGINT: a shell starts background jobs with it ignored, and then Python would
    # not turn it into KeyboardInterrupt.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _terminate)
    ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    for tool, hint in (
        ("dnsperf", "apt-get install dnsperf"),
        ("unbound", "apt-get install unbound"),
    ):
        if which(tool) is None:
            msg = f"benchmarks: {tool} is not installed ({hint})"
            if args.smoke and not ci:
                print(f"{msg}; smoke run skipped", file=sys.stderr)
                return 0
            print(f"{msg}{'; required under CI' if ci else ''}", file=sys.stderr)
            return 2
    return run(args)


def wait_quiet(limit: float, max_wait_s: float = 1800.0, steal_limit: float = 0.1) -> None:
    """Wait (at most ``max_wait_s``) until the 1-minute load average is below ``limit``
    and the hypervisor's steal, with every CPU busy, is below ``steal_limit`` cores."""
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        load = os.getloadavg()[0]
        steal = _steal_under_load()
        if load < limit and steal < steal_limit:
            say(f"quiet: load average {load:.2f}, steal {steal:.2f} cores")
            return
        say(f"load average {load:.2f} (< {limit}?), steal {steal:.2f} cores: waiting")
        time.sleep(20)
    say("still not quiet; running anyway")


def _steal_under_load(seconds: float = 5.0) -> float:
    """Steal (cores) while every CPU is kept busy for ``seconds``: an idle virtual machine
    asks the hypervisor for nothing, so only a busy one shows what it would be refused."""
    spin = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end: pass"
    steal0 = machine_cpu_seconds()[2]
    start = time.monotonic()
    spinners = [
        subprocess.Popen([*pin(cpu), sys.executable, "-c", spin])
        for cpu in range(os.cpu_count() or 1)
    ]
    for p in spinners:
        try:
            p.wait(timeout=seconds + 10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return (machine_cpu_seconds()[2] - steal0) / (time.monotonic() - start)


def run(args: argparse.Namespace) -> int:
    smoke: bool = args.smoke
    if args.wait_quiet is not None:
        wait_quiet(args.wait_quiet)
    sizes = zone.SMOKE if smoke else zone.FULL
    scenarios = list(dict.fromkeys(args.scenario or SCENARIOS))
    full = not smoke and scenarios == list(SCENARIOS) and not args.systems
    mode = "smoke" if smoke else "full" if full else "partial"
    name = args.name or mode
    notes: list[str] = []
    pinned = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset")
    if not pinned:
        notes.append("processes not pinned to CPUs (--no-pin, fewer than 2 CPUs or no taskset)")
    duration_s = args.duration or (1.0 if smoke else 10.0)
    settings = Settings(
        duration_s=duration_s,
        repeats=args.repeats or (1 if smoke else 3),
        latency_qps=args.latency_qps,
        latency_duration_s=duration_s,
        cost_qps=args.cost_qps,
        cost_duration_s=args.cost_duration or (1.0 if smoke else 6.0),
        startup_repeats=1 if smoke else 5,
        sut_cpu=SUT_CPU if pinned else None,
        client_cpu=CLIENT_CPU if pinned else None,
        upstream_cpu=CLIENT_CPU if pinned else None,
        throughput=dnsperf.Load(args.clients, args.threads, args.outstanding),
        settle_s=0.3 if smoke else 1.0,
        max_steal=args.max_steal,
        steal_retries=0 if smoke else 2,
        profile_dir=args.profile.resolve() if args.profile else None,
    )
    systems_info: dict[str, Any] = {}
    chosen = []
    for key in args.systems or [k for k, s in SYSTEMS.items() if s.default]:
        system = SYSTEMS[key]
        missing = system.missing()
        systems_info[key] = {
            "label": system.label,
            "version": "missing" if missing else system.get_version(),
            "upstream_transport": system.upstream_transport
            + (f"; tls scenario: {system.tls_transport}" if system.tls_transport else ""),
        }
        if missing:
            systems_info[key]["skipped"] = missing
            notes.append(f"{system.label} skipped: {missing}")
            say(f"{system.label} skipped: {missing}")
        else:
            chosen.append(system)
    if BASELINE not in [s.key for s in chosen]:
        notes.append("dnsproxy (uvloop) not in this run: no ratios")

    out_dir: Path = args.out_dir or (
        Path(tempfile.mkdtemp(prefix="dnsproxy-bench-out-")) if smoke else RESULTS
    )
    workdir = Path(tempfile.mkdtemp(prefix="dnsproxy-bench-"))
    data: dict[str, Any] = {
        "name": name,
        "mode": mode,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": shlex.join(["python", "-m", "benchmarks", *(sys.argv[1:])]),
        "load": {"before": list(os.getloadavg())},
        "machine": report.machine(),
        "dnsperf_version": dnsperf.version(),
        "upstream_version": unbound_version(),
        "systems": systems_info,
        "sizes": asdict(sizes),
        "settings": _settings_json(settings),
        "scenarios": {},
        "notes": notes,
    }
    failed = False
    try:
        t0 = time.monotonic()
        say(f"generating data in {workdir} ({'smoke' if smoke else 'full'} sizes)")
        files = zone.generate(workdir / "data", sizes)
        data["mix"] = _mix_stats(files.mix)
        with Procs() as procs:
            bench = Bench(procs, workdir, files, sizes, settings, chosen, notes)
            say("starting the upstream (unbound)")
            up = bench.start_upstream()
            say(f"upstream answering on port {up.port} after {time.monotonic() - t0:.1f}s")
            for scenario in scenarios:
                data["load"][scenario] = os.getloadavg()[0]
                say(f"scenario {scenario} (load average {data['load'][scenario]:.2f})")
                result = getattr(bench, scenario)()
                data["scenarios"][scenario] = result
                items = (
                    [(f"{w} {k}", r) for w, rs in result.items() for k, r in rs.items()]
                    if scenario == "cost"
                    else list(result.items())
                )
                for key, r in items:
                    if "error" in r:
                        failed = True
                        say(f"  {key}: ERROR {r['error']}")
                    elif scenario not in ("hits", "miss", "mix", "latency", "tls", "cost"):
                        say(f"  {key}: {_brief(r)}")
    except HarnessError as e:
        failed = True
        notes.append(f"harness error: {e}")
        say(f"ERROR: {e}")
    finally:
        shutil.rmtree(PURE_DIR, ignore_errors=True)
        data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
        data["load"]["after"] = list(os.getloadavg())
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            say(f"work directory kept: {workdir}")
    json_path = write_outputs(data, out_dir)
    if smoke:
        status = check_smoke(json_path, [s.key for s in chosen], "hits" in scenarios)
        if status == 0 and args.out_dir is None:
            shutil.rmtree(out_dir, ignore_errors=True)
        return status or int(failed)
    return int(failed)


def _settings_json(s: Settings) -> dict[str, Any]:
    out = {k: v for k, v in vars(s).items() if not isinstance(v, dnsperf.Load | Path)}
    for key in ("throughput", "warm", "fill"):
        out[key] = vars(getattr(s, key))
    out["profile_dir"] = str(s.profile_dir) if s.profile_dir else None
    return out


def _mix_stats(path: Path) -> dict[str, Any]:
    lines = path.read_text().splitlines()
    nx = sum(1 for line in lines if zone.CLUSTER in line and not zone.exists(line.split()[0]))
    return {"zipf_s": zone.ZIPF_S, "queries": len(lines), "nxdomain_share": nx / len(lines)}


def _brief(r: dict[str, Any]) -> str:
    """One line for a memory or start-up result (the others say their own as they run)."""
    keys = ("idle_rss_kib", "full_rss_kib", "bytes_per_entry", "median_ms")
    return ", ".join(f"{k}={r[k]}" for k in keys if k in r)


def write_outputs(data: dict[str, Any], out_dir: Path) -> Path:
    """The JSON, the PNG and the Markdown of a run into ``out_dir``, and the README's
    benchmark paragraph as ``<name>-headline.md``. A full run into benchmarks/results
    instead rewrites the generated block of benchmarks/RESULTS.md and the headline block
    of README.md (report.splice_block), keeping the notes around them."""
    name = data["name"]
    json_path = out_dir / f"{name}.json"
    png_path = out_dir / f"{name}.png"
    in_place = data["mode"] == "full" and out_dir == RESULTS
    md_path = HERE / "RESULTS.md" if in_place else out_dir / f"{name}.md"
    skipped = report.plot(data, png_path)
    if skipped:
        data["notes"] = [*data["notes"], skipped]
        say(skipped)
    report.write_json(data, json_path)

    def rel(p: Path) -> str:
        try:
            return str(p.relative_to(md_path.parent))
        except ValueError:
            return str(p)

    text = report.markdown(data, rel(json_path), None if skipped else rel(png_path), not in_place)
    headline = report.headline(data)
    written = [json_path, md_path]
    if in_place:
        md_path.write_text(report.splice_block(md_path.read_text(), report.RESULTS_BLOCK, text))
        readme = HERE.parent / "README.md"
        readme.write_text(report.splice_block(readme.read_text(), report.README_BLOCK, headline))
        written.append(readme)
    else:
        md_path.write_text(text)
        headline_path = out_dir / f"{name}-headline.md"
        headline_path.write_text(headline + "\n")
        written.append(headline_path)
    if not skipped:
        written.append(png_path)
    say(f"wrote {', '.join(map(str, written))}")
    say(f"goals: {report.goals_summary(data)}")
    return json_path


def check_smoke(json_path: Path, chosen_keys: list[str], with_hits: bool) -> int:
    """The smoke run's assertion: its JSON exists and every system answered cache hits."""
    try:
        data = json.loads(json_path.read_text())
        if not with_hits:
            print(f"bench-smoke: ok, {json_path} (no hits scenario to check)")
            return 0
        hits = data["scenarios"]["hits"]
        bad = [k for k in chosen_keys if not hits.get(k, {}).get("qps", 0) > 0]
    except (OSError, ValueError, KeyError) as e:
        print(f"bench-smoke: FAILED, no usable results in {json_path}: {e}", file=sys.stderr)
        return 1
    if bad or not chosen_keys:
        print(f"bench-smoke: FAILED, no cache-hit QPS for {bad or 'any system'}", file=sys.stderr)
        return 1
    figures = ", ".join(f"{k} {hits[k]['qps']:,.0f}" for k in chosen_keys)
    print(f"bench-smoke: ok, {json_path}: cache-hit QPS {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
