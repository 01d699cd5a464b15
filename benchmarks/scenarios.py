"""The seven scenarios, run system by system against one shared upstream.

Each measurement starts the system under test afresh (an empty cache, a fresh process)
pinned to ``sut_cpu``; dnsperf and the upstream run on ``client_cpu``. Repetitions go
round-robin over the systems, so that a slow minute on the machine hurts them all alike;
figures are medians over the repetitions and every run's raw numbers are kept.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import dnsperf
from benchmarks.procs import (
    HarnessError,
    Procs,
    free_port,
    log_tail,
    rss_kib,
    run_bounded,
    time_to_first_answer,
    wait_answering,
    which,
)
from benchmarks.systems import System, Target, TlsPort, make_certificate, upstream_conf
from benchmarks.zone import Files, Sizes

SCENARIOS = ("hits", "miss", "latency", "mix", "cost", "memory", "startup", "tls")
# What the cost scenario offers: a fixed load, below every system's capacity for each
# workload, so that the figure is what a query costs, not how fast a system can go.
COST_WORKLOADS = ("hits", "miss", "mix")
# A run whose share of error replies (not NOERROR or NXDOMAIN) or of lost queries exceeds
# these is flagged: its figure is shown but neither compared nor counted in a goal.
FLAG_ERROR_SHARE = 0.001
FLAG_LOST_SHARE = 0.01
# A fixed-load run that answered less than this share of what was offered is flagged too.
FLAG_SUSTAINED_SHARE = 0.97


def say(msg: str) -> None:
    """Progress on stderr: a full run takes minutes."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


START_TIMEOUT_S = 30.0
# Gentle loads that must lose nothing: warming the hit names, filling the memory scenario.
WARM = dnsperf.Load(clients=1, threads=1, outstanding=20)
FILL = dnsperf.Load(clients=1, threads=1, outstanding=50)


@dataclass(frozen=True)
class Settings:
    duration_s: float  # one throughput run (hits, miss, mix)
    repeats: int  # runs per system (hits, miss, mix, latency); the median is reported
    latency_qps: int  # offered load of the latency scenario
    latency_duration_s: float
    cost_qps: int  # offered load of the cost scenario
    cost_duration_s: float
    startup_repeats: int
    sut_cpu: int | None
    client_cpu: int | None
    upstream_cpu: int | None
    throughput: dnsperf.Load  # dnsperf load for the saturating runs
    warm: dnsperf.Load = WARM
    fill: dnsperf.Load = FILL
    settle_s: float = 1.0  # pause before reading an idle or a filled RSS
    max_steal: float = 0.1  # cores the hypervisor may take during a run before it is redone
    steal_retries: int = 2
    profile_dir: Path | None = None  # py-spy profiles of dnsproxy (hits, miss) when set


@dataclass
class Upstream:
    port: int
    conf: Path
    proc: subprocess.Popen[bytes]
    tls: TlsPort | None  # None: no openssl to make it a certificate

    def queries(self) -> int | None:
        """Queries the upstream has answered so far (unbound-control), or None."""
        control = which("unbound-control")
        if control is None:
            return None
        out = run_bounded([control, "-c", str(self.conf), "stats_noreset"], 10.0)
        m = re.search(rb"^total\.num\.queries=(\d+)", out.stdout, re.M)
        return int(m.group(1)) if m else None


@dataclass
class Running:
    system: System
    port: int
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Bench:
    procs: Procs
    workdir: Path
    files: Files
    sizes: Sizes
    settings: Settings
    systems: list[System]
    notes: list[str] = field(default_factory=list)
    upstream: Upstream | None = None
    _starts: int = 0

    # -- processes

    def start_upstream(self) -> Upstream:
        unbound = which("unbound")
        if unbound is None:
            raise HarnessError("unbound is not installed: apt-get install unbound (the upstream)")
        directory = self.workdir / "upstream"
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        made = make_certificate(directory)
        tls = None if made is None else TlsPort(free_port(), *made)
        if tls is None:
            self.notes.append("openssl is not installed: no TLS port upstream, no tls scenario")
        conf = upstream_conf(directory, port, self.files.local_data, tls)
        log = directory / "unbound.log"
        proc = self.procs.start(
            [unbound, "-d", "-c", str(conf)], log, cpu=self.settings.upstream_cpu
        )
        wait_answering(port, self.files.upstream_probe_name, proc, 120.0, "upstream unbound", log)
        self.upstream = Upstream(port, conf, proc, tls)
        return self.upstream

    def _upstream(self) -> Upstream:
        if self.upstream is None:
            raise HarnessError("upstream not started")
        return self.upstream

    def _spawn(self, system: System) -> tuple[Running, float]:
        """A fresh instance of ``system`` in a directory of its own, pinned to the server
        core, not yet answering; and the monotonic time just before it was spawned."""
        self._starts += 1
        directory = self.workdir / f"{system.key}-{self._starts}"
        port = free_port()
        up = self._upstream()
        cmd = system.command(directory, port, Target(up.port, up.tls))
        log = directory / "stderr.log"
        start = time.monotonic()
        proc = self.procs.start(cmd.argv, log, cpu=self.settings.sut_cpu, env=cmd.env)
        return Running(system, port, proc, log), start

    @contextlib.contextmanager
    def running(self, system: System) -> Iterator[Running]:
        """The system started afresh and answering; stopped (with its group) afterwards."""
        run, _ = self._spawn(system)
        try:
            wait_answering(
                run.port, self.files.probe_name, run.proc, START_TIMEOUT_S, system.label, run.log
            )
            yield run
        finally:
            status = self.procs.stop(run.proc)
            if status not in (0, -15, 143, None):
                tail = log_tail(run.log, 500).strip()
                self.notes.append(f"{system.label} exited with status {status}: {tail}")

    def perf(self, run: Running, datafile: Path, load: dnsperf.Load, **kw: Any) -> dnsperf.Result:
        return dnsperf.run(run.port, datafile, load, cpu=self.settings.client_cpu, **kw)

    def warm(self, run: Running, datafile: Path, expected: int) -> dnsperf.Result:
        """Ask every name once; a second pass if a reply went missing (a busy CI box)."""
        r = self.perf(run, datafile, self.settings.warm, max_runs=1)
        if r.ok < expected:
            r = self.perf(run, datafile, self.settings.warm, max_runs=1)
        if r.ok < expected:
            raise HarnessError(
                f"{run.system.label}: warm-up answered {r.ok} of {expected} ({r.rcodes}, "
                f"lost {r.lost})"
            )
        return r

    # -- scenarios

    def _perf_cpu(
        self,
        run: Running,
        datafile: Path,
        load: dnsperf.Load,
        *,
        upstream: Upstream | None,
        **kw: Any,
    ) -> tuple[dnsperf.Result, dict[str, float]]:
        """A dnsperf run and how busy the machine was meanwhile, in cores (CPU seconds per
        second of run: 1.0 = one full core): the server (``server_cpu``); with ``upstream``,
        the upstream (``upstream_cpu``) and softirq (``softirq_cpu``, mostly this run's own
        loopback packets), without it the upstream counts among the rest; the rest of the
        machine beyond the harness and its children (``other_cpu``: the noise this run had
        to live with); and what the hypervisor took from this virtual machine (steal)."""
        sut0 = cpu_seconds(run.proc.pid)
        up0 = cpu_seconds(upstream.proc.pid) if upstream is not None else 0.0
        (busy0, soft0, steal0), own0 = machine_cpu_seconds(), own_cpu_seconds()
        r = self.perf(run, datafile, load, **kw)
        (busy1, soft1, steal1), own1 = machine_cpu_seconds(), own_cpu_seconds()
        sut = cpu_seconds(run.proc.pid) - sut0
        up = cpu_seconds(upstream.proc.pid) - up0 if upstream is not None else 0.0

        def cores(seconds: float) -> float:
            return round(seconds / r.runtime_s, 3)

        # Key order as the JSON has always had it.
        cpu = {"server_cpu": cores(sut)}
        if upstream is not None:
            cpu["upstream_cpu"] = cores(up)
        cpu["other_cpu"] = cores(max(0.0, busy1 - busy0 - (sut + up + (own1 - own0))))
        if upstream is not None:
            cpu["softirq_cpu"] = cores(soft1 - soft0)
        cpu["steal_cpu"] = cores(steal1 - steal0)
        return r, cpu

    def _timed(self, run: Running, datafile: Path, **kw: Any) -> dict[str, Any]:
        """One saturating dnsperf run; also what reached the upstream and how busy the
        machine was (:meth:`_perf_cpu`)."""
        up = self._upstream()
        q0 = up.queries()
        r, cpu = self._perf_cpu(
            run, datafile, self.settings.throughput, upstream=up, interval=True, **kw
        )
        q1 = up.queries()
        out: dict[str, Any] = {**r.summary(), **cpu}
        if q0 is not None and q1 is not None:
            out["upstream_queries"] = q1 - q0
            if r.completed:
                out["hit_ratio"] = round(1 - (q1 - q0) / r.completed, 4)
        return out

    def hits(self) -> dict[str, Any]:
        def one(run: Running) -> dict[str, Any]:
            self.warm(run, self.files.hits, self.sizes.hit_names)
            return self._timed(run, self.files.hits, duration_s=self.settings.duration_s)

        results = self._repeated(one, "ok_qps")
        self._profile_dnsproxy(results, self.files.hits, "hits", warm=True)
        return results

    def miss(self) -> dict[str, Any]:
        results = self._repeated(self._misses, "ok_qps")
        self._profile_dnsproxy(results, self.files.miss, "miss", warm=False)
        return results

    def _misses(self, run: Running) -> dict[str, Any]:
        """One run of unique questions on a fresh instance: every answer forwarded. A run
        that used up the questions in less than half its time is flagged: too short a
        run to be a figure (dnsperf's ``-n 1`` never repeats a question)."""
        duration_s = self.settings.duration_s
        r = self._timed(run, self.files.miss, duration_s=duration_s, max_runs=1)
        if r["sent"] >= self.sizes.miss_questions and r["runtime_s"] < duration_s / 2:
            r.setdefault("flags", []).append(
                f"ran out of unique questions after {r['runtime_s']:.1f} s"
            )
        return r

    def tls(self) -> dict[str, Any]:
        """The miss scenario over TCP and over TLS for every system that can forward over
        TLS, the two variants round-robin in the same loop: ``{"tcp": ..., "tls": ...}``
        per system, each as :meth:`_repeated` gives it."""
        capable = [s for s in self.systems if s.tls_transport is not None]
        if self._upstream().tls is None:
            return {s.key: {"error": "the upstream has no TLS port (no openssl)"} for s in capable}

        pairs = [variant for s in capable for variant in (s, s.over_tls())]
        results = self._repeated(self._misses, "ok_qps", pairs)
        out: dict[str, Any] = {}
        for s in capable:
            tcp, tls = results[s.key], results[f"{s.key}-tls"]
            out[s.key] = {"tcp": tcp, "tls": tls}
            error = tcp.get("error") or tls.get("error")
            if error:
                out[s.key]["error"] = error
        return out

    def latency(self) -> dict[str, Any]:
        """Per-query latencies at a fixed offered load, ``repeats`` runs round-robin; the
        figures (and the curve) of the run with the median p99 are reported."""
        s = self.settings
        load = dnsperf.Load(clients=1, threads=1, outstanding=2000, max_qps=s.latency_qps)

        def one(run: Running) -> dict[str, Any]:
            self.warm(run, self.files.hits, self.sizes.hit_names)
            lines = self.workdir / f"latency-{run.system.key}.txt"
            r, cpu = self._perf_cpu(
                run,
                self.files.hits,
                load,
                upstream=None,
                duration_s=s.latency_duration_s,
                per_query=lines,
            )
            lines.unlink(missing_ok=True)
            return {**latency_figures(r.latencies_s), **r.summary(), **cpu}

        def brief(f: dict[str, Any]) -> str:
            return (
                f"p50 {f.get('p50_ms')} ms, p99 {f.get('p99_ms')} ms, p99.9 {f.get('p999_ms')} ms"
            )

        runs, errors = self._round_robin(one, brief)
        out: dict[str, Any] = {}
        for system in self.systems:
            rs = [r for r in runs[system.key] if r.get("n")]
            if system.key in errors or not rs:
                out[system.key] = {"error": errors.get(system.key, "no latencies")}
                continue
            rs.sort(key=lambda r: r["p99_ms"])
            chosen = dict(rs[(len(rs) - 1) // 2])
            chosen["offered_qps"] = s.latency_qps
            chosen["p99_runs_ms"] = [r["p99_ms"] for r in rs]
            chosen["p999_runs_ms"] = [r["p999_ms"] for r in rs]
            chosen["other_cpu_runs"] = [r["other_cpu"] for r in rs]
            chosen["steal_cpu_runs"] = [r["steal_cpu"] for r in rs]
            out[system.key] = chosen
        return out

    def mix(self) -> dict[str, Any]:
        def one(run: Running) -> dict[str, Any]:
            return self._timed(run, self.files.mix, duration_s=self.settings.duration_s)

        return self._repeated(one, "ok_qps")

    def cost(self) -> dict[str, Any]:
        """CPU time per answered query at a fixed offered load (``cost_qps``), for cache
        hits (warm names), misses (unique questions) and the mix (cold start): the
        server's CPU seconds per million answers, read from /proc around each run, so a
        noisy machine moves it far less than a throughput figure. Each workload's
        systems round-robin, ``repeats`` runs, medians; ``{workload: {system: ...}}``."""
        s = self.settings
        load = dnsperf.Load(clients=4, threads=1, outstanding=500, max_qps=s.cost_qps)
        files = {"hits": self.files.hits, "miss": self.files.miss, "mix": self.files.mix}
        out: dict[str, Any] = {}
        for workload in COST_WORKLOADS:

            def one(run: Running, workload: str = workload) -> dict[str, Any]:
                if workload == "hits":
                    self.warm(run, self.files.hits, self.sizes.hit_names)
                r, cpu = self._perf_cpu(
                    run,
                    files[workload],
                    load,
                    upstream=self._upstream(),
                    duration_s=s.cost_duration_s,
                    max_runs=1 if workload == "miss" else None,
                    interval=True,
                )
                cpu_s = cpu["server_cpu"] * r.runtime_s
                out = {**r.summary(), **cpu, "server_cpu_s": round(cpu_s, 3)}
                out["cpu_s_per_million"] = round(cpu_s / r.ok * 1e6, 2) if r.ok else None
                sustained = r.ok_qps / s.cost_qps
                if sustained < FLAG_SUSTAINED_SHARE:
                    out["flags"] = [f"answered {sustained:.0%} of the offered {s.cost_qps:,} QPS"]
                return out

            def brief(r: dict[str, Any]) -> str:
                return (
                    f"{r['cpu_s_per_million']} CPU s per million, {r['ok_qps']:,.0f} QPS "
                    f"answered, {r['rcodes']}"
                )

            say(f" {workload} at {s.cost_qps:,} QPS offered")
            runs, errors = self._round_robin(one, brief)
            out[workload] = {}
            for system in self.systems:
                rs = [r for r in runs[system.key] if r.get("cpu_s_per_million") is not None]
                if system.key in errors or not rs:
                    out[workload][system.key] = {"error": errors.get(system.key, "no answers")}
                    continue
                values = [r["cpu_s_per_million"] for r in rs]
                out[workload][system.key] = {
                    "cpu_s_per_million": round(statistics.median(values), 2),
                    "min": min(values),
                    "max": max(values),
                    "ok_qps": round(statistics.median(r["ok_qps"] for r in rs), 1),
                    "offered_qps": s.cost_qps,
                    "lost": sum(r["lost"] for r in rs),
                    "other_cpu": statistics.median(r["other_cpu"] for r in rs),
                    "steal_cpu": statistics.median(r["steal_cpu"] for r in rs),
                    "runs": rs,
                    **_flagged(rs),
                }
        return out

    def memory(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for system in self.systems:
            try:
                with self.running(system) as run:
                    time.sleep(self.settings.settle_s)
                    idle = rss_kib(run.proc.pid)
                    r = self.perf(run, self.files.fill, self.settings.fill, max_runs=1)
                    time.sleep(self.settings.settle_s)
                    full = rss_kib(run.proc.pid)
                entries = r.rcodes.get("NOERROR", 0)
                out[system.key] = {
                    "idle_rss_kib": idle,
                    "full_rss_kib": full,
                    "entries": entries,
                    "bytes_per_entry": round((full - idle) * 1024 / entries, 1)
                    if entries
                    else None,
                    "fill": r.summary(),
                }
            except HarnessError as e:
                out[system.key] = {"error": str(e)}
        return out

    def startup(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for system in self.systems:
            times: list[float] = []
            try:
                for _ in range(self.settings.startup_repeats):
                    times.append(self._start_once(system))
                out[system.key] = {
                    "median_ms": round(statistics.median(times) * 1e3, 2),
                    "runs_ms": [round(t * 1e3, 2) for t in times],
                }
            except HarnessError as e:
                out[system.key] = {"error": str(e)}
        return out

    def _start_once(self, system: System) -> float:
        run, start = self._spawn(system)
        try:
            return time_to_first_answer(
                run.port, self.files.probe_name, start, run.proc, START_TIMEOUT_S
            )
        except HarnessError as e:
            raise HarnessError(f"{system.label}: {e}\n{log_tail(run.log, 1000)}") from None
        finally:
            self.procs.stop(run.proc)

    # -- helpers

    def _measure(
        self,
        system: System,
        one: Callable[[Running], dict[str, Any]],
        brief: Callable[[dict[str, Any]], str],
    ) -> dict[str, Any]:
        """``one`` on a fresh instance of ``system``. A run during which the hypervisor
        took more than ``max_steal`` cores from this virtual machine measured the host's
        other tenants as much as the system: it is set aside (kept in the results under
        ``set_aside``) and redone, at most ``steal_retries`` times."""
        set_aside: list[dict[str, Any]] = []
        while True:
            with self.running(system) as run:
                r = one(run)
            steal = r.get("steal_cpu", 0.0)
            if steal <= self.settings.max_steal or len(set_aside) >= self.settings.steal_retries:
                break
            say(f"  {system.label}: {brief(r)}; steal {steal:.2f} cores: set aside, again")
            set_aside.append({k: v for k, v in r.items() if k != "curve"})
        if set_aside:
            r["set_aside"] = set_aside
        say(f"  {system.label}: {brief(r)} (steal {steal:.2f})")
        return r

    def _round_robin(
        self,
        one: Callable[[Running], dict[str, Any]],
        brief: Callable[[dict[str, Any]], str],
        systems: list[System] | None = None,
    ) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
        """``one`` on a fresh instance of every system (:meth:`_measure`; ``systems``, by
        default those of the run), round-robin, ``repeats`` times: each system's results,
        and the error of each system that failed (it is not run again)."""
        systems = self.systems if systems is None else systems
        runs: dict[str, list[dict[str, Any]]] = {s.key: [] for s in systems}
        errors: dict[str, str] = {}
        for _ in range(self.settings.repeats):
            for system in systems:
                if system.key in errors:
                    continue
                try:
                    runs[system.key].append(self._measure(system, one, brief))
                except HarnessError as e:
                    errors[system.key] = str(e)
                    say(f"  {system.label}: ERROR {e}")
        return runs, errors

    def _repeated(
        self,
        one: Callable[[Running], dict[str, Any]],
        key: str,
        systems: list[System] | None = None,
    ) -> dict[str, Any]:
        """``one`` on a fresh instance of every system (of ``systems`` when given),
        round-robin, ``repeats`` times; the median of ``key`` (and of the average latency)
        over the runs."""

        def brief(r: dict[str, Any]) -> str:
            return (
                f"{r[key]:,.0f} QPS, avg {r['avg_latency_ms']:.3f} ms, "
                f"lost {r['lost']}, {r['rcodes']}"
            )

        systems = self.systems if systems is None else systems
        runs, errors = self._round_robin(one, brief, systems)
        out: dict[str, Any] = {}
        for system in systems:
            rs = runs[system.key]
            if system.key in errors or not rs:
                out[system.key] = {"error": errors.get(system.key, "no run")}
                continue
            out[system.key] = {
                "qps": round(statistics.median(r[key] for r in rs), 1),
                "qps_min": min(r[key] for r in rs),
                "qps_max": max(r[key] for r in rs),
                "avg_latency_ms": round(statistics.median(r["avg_latency_ms"] for r in rs), 4),
                "lost": sum(r["lost"] for r in rs),
                "runs": rs,
            }
            out[system.key].update(_flagged(rs))
            for extra in (
                "hit_ratio",
                "server_cpu",
                "upstream_cpu",
                "other_cpu",
                "softirq_cpu",
                "steal_cpu",
            ):
                values = [r[extra] for r in rs if extra in r]
                if values:
                    out[system.key][extra] = statistics.median(values)
        return out

    def _profile_dnsproxy(
        self, results: dict[str, Any], datafile: Path, name: str, *, warm: bool
    ) -> None:
        """With ``--profile``: one extra run (not counted) per dnsproxy variant on a fresh
        process, with py-spy sampling it; where the time went goes into the results."""
        directory = self.settings.profile_dir
        if directory is None:
            return
        from benchmarks.profile import record

        for system in self.systems:
            if not system.key.startswith("dnsproxy") or "error" in results[system.key]:
                continue
            say(f"  profiling {system.label} ({name})")
            with self.running(system) as run:
                if warm:
                    self.warm(run, datafile, self.sizes.hit_names)
                results[system.key]["profile"] = record(
                    run.proc.pid,
                    directory / f"{name}-{system.key}.txt",
                    lambda: self.perf(
                        run,
                        datafile,
                        self.settings.throughput,
                        duration_s=self.settings.duration_s,
                        max_runs=None if warm else 1,
                    ).summary(),
                    duration_s=self.settings.duration_s,
                    cpu=self.settings.client_cpu,
                )


def _flagged(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"flagged": [reasons]}`` when a run answered with errors, lost queries, ran
    out of questions or did not sustain a fixed load (each run's own ``flags``); else {}.
    A flagged figure is shown, not compared or counted in a goal."""
    reasons: list[str] = []
    for r in runs:
        reasons += r.get("flags", [])
        completed = r.get("completed", 0)
        errors = completed - sum(r.get("rcodes", {}).get(c, 0) for c in ("NOERROR", "NXDOMAIN"))
        if completed and errors > FLAG_ERROR_SHARE * completed:
            other = {k: v for k, v in r["rcodes"].items() if k not in ("NOERROR", "NXDOMAIN")}
            reasons.append(f"answered with errors: {other} of {completed:,} replies")
        sent = r.get("sent", 0)
        if sent and r.get("lost", 0) > FLAG_LOST_SHARE * sent:
            reasons.append(f"lost {r['lost']:,} of {sent:,} queries")
    return {"flagged": list(dict.fromkeys(reasons))} if reasons else {}


def machine_cpu_seconds() -> tuple[float, float, float]:
    """CPU time of all CPUs so far (/proc/stat): user + nice + system, softirq, steal."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    tick = os.sysconf("SC_CLK_TCK")
    return sum(fields[0:3]) / tick, fields[6] / tick, fields[7] / tick


def own_cpu_seconds() -> float:
    """CPU time of the harness and of its children waited for (dnsperf, unbound-control)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def latency_figures(latencies_s: list[float]) -> dict[str, Any]:
    """Percentiles (nearest rank) and a compact quantile curve for the plot."""
    if not latencies_s:
        return {"n": 0}
    xs = sorted(latencies_s)
    n = len(xs)

    def q(p: float) -> float:
        return round(xs[min(n - 1, max(0, math.ceil(p * n) - 1))] * 1e3, 4)

    # Quantiles evenly spaced in "nines" (0, 0.9, 0.99, ...) up to the data's resolution.
    top = math.log10(n)
    curve = []
    steps = 120
    for i in range(steps + 1):
        nines = top * i / steps
        p = 1 - 10 ** (-nines)
        curve.append([round(p, 7), q(p)])
    return {
        "n": n,
        "p50_ms": q(0.50),
        "p90_ms": q(0.90),
        "p99_ms": q(0.99),
        "p999_ms": q(0.999),
        "max_ms": round(xs[-1] * 1e3, 4),
        "curve": curve,
    }
