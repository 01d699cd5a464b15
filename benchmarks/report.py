"""Results out: the JSON record of a run, its Markdown tables, and the PNG plot.

Everything in the Markdown and the plot is computed from the JSON alone, so
``python -m benchmarks --report results/NAME.json`` rebuilds them without running again.
Every ratio compares two figures of the same run: the system's and dnsproxy (uvloop)'s.
"""

# ruff: noqa: RUF001  (the Markdown and the plot use typographic signs on purpose)
from __future__ import annotations

import json
import math
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.scenarios import COST_WORKLOADS
from benchmarks.systems import BASELINE, CACHE_ENTRIES

TARGETS = {
    "hits_qps": 100_000,
    "hits_vs_dnsmasq": 0.5,
    "miss_qps": 25_000,
    "p99_ms": 1.0,
    "bytes_per_entry": 1024,
    "idle_rss_mib": 40,
    "startup_ms": 1000,
}


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    distro = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "os": distro,
        "python": platform.python_version(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n")


# -- Markdown


def _fmt(x: Any, digits: int = 0) -> str:
    if x is None:
        return "–"
    if isinstance(x, float | int):
        return f"{x:,.{digits}f}"
    return str(x)


def _noise(r: dict[str, Any]) -> str:
    """Other processes' CPU and the hypervisor's steal during the run(s), in cores."""
    if "other_cpu" not in r:
        return "–"
    return f"{r['other_cpu']:.2f} / {r.get('steal_cpu', 0):.2f}"


def _ratio(value: Any, base: Any) -> str:
    if not isinstance(value, int | float) or not isinstance(base, int | float) or not base:
        return "–"
    return f"{value / base:.2f}×"


class _Doc:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.lines: list[str] = []
        self.systems: dict[str, Any] = data["systems"]

    def label(self, key: str) -> str:
        return str(self.systems[key]["label"])

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(
        self,
        scenario: str,
        headers: list[str],
        row: Callable[[str, dict[str, Any], dict[str, Any]], list[str]],
    ) -> None:
        results: dict[str, Any] = self.data["scenarios"].get(scenario, {})
        base = results.get(BASELINE, {})
        self.add("| " + " | ".join(["system", *headers]) + " |")
        self.add("|" + "---|" * (len(headers) + 1))
        for key, r in results.items():
            if "error" in r:
                err = str(r["error"]).splitlines()[0][:160]
                self.add(f"| {self.label(key)} | error: {err} |" + " |" * (len(headers) - 1))
            else:
                label = self.label(key) + (" ⚑" if r.get("flagged") else "")
                self.add("| " + " | ".join([label, *row(key, r, base)]) + " |")
        self.add("")
        self.flags(results)

    def flags(self, results: dict[str, Any]) -> None:
        """The reasons of every flagged system of a table, under it."""
        for key, r in results.items():
            if r.get("flagged"):
                self.add(f"⚑ {self.label(key)}, flagged (not counted): {'; '.join(r['flagged'])}.")
        if any(r.get("flagged") for r in results.values()):
            self.add("")


def _targets(data: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    sc = data["scenarios"]
    dp = {name: sc.get(name, {}).get(BASELINE, {}) for name in sc}
    rows: list[tuple[str, str, str, bool | None]] = []

    def add(name: str, target: str, value: Any, ok: Callable[[float], bool], fmt: str) -> None:
        if isinstance(value, int | float):
            rows.append((name, target, fmt.format(value), ok(value)))
        else:
            rows.append((name, target, "not measured", None))

    hits = dp.get("hits", {}).get("qps")
    add("cache hits", "≥ 100,000 QPS", hits, lambda v: v >= TARGETS["hits_qps"], "{:,.0f} QPS")
    dnsmasq = sc.get("hits", {}).get("dnsmasq", {}).get("qps")
    ratio = hits / dnsmasq if isinstance(hits, int | float) and dnsmasq else None
    add("cache hits vs dnsmasq", "≥ 0.5 × dnsmasq", ratio, lambda v: v >= 0.5, "{:.2f} ×")
    add(
        "miss path over TCP",
        "≥ 25,000 QPS",
        dp.get("miss", {}).get("qps"),
        lambda v: v >= TARGETS["miss_qps"],
        "{:,.0f} QPS",
    )
    offered = dp.get("latency", {}).get("offered_qps", 20000)
    add(
        f"p99, hits at {offered:,} QPS offered",
        "< 1 ms",
        dp.get("latency", {}).get("p99_ms"),
        lambda v: v < TARGETS["p99_ms"],
        "{:.3f} ms",
    )
    mem = dp.get("memory", {})
    entries = mem.get("entries", 0)
    add(
        f"memory per cached entry ({entries:,} entries)",
        "< 1 KB (1,024 B)",
        mem.get("bytes_per_entry"),
        lambda v: v < TARGETS["bytes_per_entry"],
        "{:,.0f} B",
    )
    idle = mem.get("idle_rss_kib")
    add(
        "idle resident size",
        "< 40 MB",
        idle / 1024 if isinstance(idle, int) else None,
        lambda v: v < TARGETS["idle_rss_mib"],
        "{:.1f} MiB",
    )
    add(
        "start-up to first answer",
        "< 1 s",
        dp.get("startup", {}).get("median_ms"),
        lambda v: v < TARGETS["startup_ms"],
        "{:,.0f} ms",
    )
    return rows


def _counted(r: dict[str, Any] | None, key: str) -> float | None:
    """``r[key]`` when ``r`` is a result that counts (no error, not flagged), else None."""
    if not r or "error" in r or r.get("flagged"):
        return None
    value = r.get(key)
    return float(value) if isinstance(value, int | float) else None


class Goal(NamedTuple):
    """One goal of one core, as a run measured it (see :func:`goals`)."""

    goal: str
    required: str
    compiled: str  # dnsproxy's figure over the peer's, compiled build
    pure: str  # the same for the pure-Python build
    met: bool | None  # None: not measured (a figure missing, failed or flagged)
    gap: str  # how far from the goal when not met (a dash when met)


def _gap(ratio: float | None, need: float, at_least: bool) -> str:
    if ratio is None:
        return "not measured (a figure is missing, failed or flagged)"
    if at_least:
        return (
            "–"
            if ratio >= need
            else f"needs {(need / ratio - 1) * 100:.0f} % more to reach {need:.1f} ×"
        )
    return "–" if ratio <= need else f"{(ratio / need - 1) * 100:.0f} % over {need:.1f} ×"


def goals(data: dict[str, Any]) -> list[Goal]:
    """The goals for one core: ratios of the same run, dnsproxy's figure over the peer's;
    a flagged or failed figure is not counted. The goal is the compiled build's (what the
    image ships); the pure-Python build's ratio is shown beside it."""
    sc = data["scenarios"]
    rows: list[Goal] = []

    def ratio(results: dict[str, Any], key: str, peer: float | None, who: str) -> float | None:
        mine = _counted(results.get(who), key)
        return mine / peer if mine is not None and peer else None

    def add(goal: str, need_text: str, results: dict[str, Any], key: str, peer: float | None,
            need: float, at_least: bool) -> None:  # fmt: skip
        compiled, pure = (ratio(results, key, peer, who) for who in (BASELINE, "dnsproxy-pure"))
        met = None if compiled is None else compiled >= need if at_least else compiled <= need
        rows.append(
            Goal(
                goal,
                need_text,
                "–" if compiled is None else f"{compiled:.2f} ×",
                "–" if pure is None else f"{pure:.2f} ×",
                met,
                _gap(compiled, need, at_least),
            )
        )

    hits = sc.get("hits", {})
    fastest = max(
        (v for v in (_counted(hits.get(p), "qps") for p in ("unbound", "dnsdist")) if v),
        default=None,
    )
    add("cache hits", "≥ 1.0 × the faster of Unbound and dnsdist", hits, "qps", fastest,
        1.0, True)  # fmt: skip
    for scenario, label, need in (("miss", "misses over TCP", 1.5), ("mix", "Kubernetes mix", 1.2)):
        results = sc.get(scenario, {})
        add(label, f"≥ {need} × Unbound", results, "qps", _counted(results.get("unbound"), "qps"),
            need, True)  # fmt: skip
    for workload, label in (("hits", "hits"), ("miss", "misses"), ("mix", "mix")):
        results = sc.get("cost", {}).get(workload, {})
        unbound = _counted(results.get("unbound"), "cpu_s_per_million")
        offered = next(
            (r["offered_qps"] for r in results.values() if "offered_qps" in r),
            data["settings"].get("cost_qps", 20_000),
        )
        add(f"CPU per query at {offered:,} QPS offered, {label}", "≤ 1.0 × Unbound's",
            results, "cpu_s_per_million", unbound, 1.0, False)  # fmt: skip
    return rows


def goals_summary(data: dict[str, Any]) -> str:
    """One sentence: how many goals the run met, and each one missed with its gap."""
    rows = goals(data)
    met = [g for g in rows if g.met]
    missed = [f"{g.goal} {g.compiled} ({g.gap})" for g in rows if g.met is False]
    unmeasured = [g.goal for g in rows if g.met is None]
    text = f"{len(met)} of {len(rows)} goals met"
    if missed:
        text += "; missed: " + "; ".join(missed)
    if unmeasured:
        text += "; not measured: " + ", ".join(unmeasured)
    return text + "."


def _qps_k(r: dict[str, Any] | None) -> str:
    value = _counted(r, "qps")
    return "–" if value is None else f"{value / 1000:.0f}k QPS"


def _times(r: dict[str, Any] | None, peer: dict[str, Any] | None, key: str = "qps") -> str:
    mine, theirs = _counted(r, key), _counted(peer, key)
    return "–" if mine is None or not theirs else f"{mine / theirs:.2f}"


def _pure(results: dict[str, Any]) -> str:
    pure = results.get("dnsproxy-pure")
    return "" if pure is None else f"pure Python {_qps_k(pure)}"


def headline(data: dict[str, Any]) -> str:
    """The README's benchmark paragraph from one run: its date and command, the compiled
    build's figures against the peers (pure Python's beside them) and the goals."""
    sc = data["scenarios"]
    label = data["systems"].get(BASELINE, {}).get("label", BASELINE)

    def of(scenario: str, key: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = sc.get(scenario, {}).get(key)
        return result

    parts: list[str] = []
    hits, miss, mix = (sc.get(name, {}) for name in ("hits", "miss", "mix"))
    if hits:
        peers = ", ".join(
            f"{_times(hits.get(BASELINE), hits.get(p))} × {peer}"
            for p, peer in (("unbound", "Unbound"), ("dnsdist", "dnsdist"), ("dnsmasq", "dnsmasq"))
            if p in hits
        )
        extra = "; ".join(x for x in (peers, _pure(hits)) if x)
        parts.append(f"cache hits {_qps_k(hits.get(BASELINE))}" + (f" ({extra})" if extra else ""))
    if miss:
        parts.append(
            f"cache misses forwarded over TCP {_qps_k(miss.get(BASELINE))} "
            f"({_times(miss.get(BASELINE), miss.get('unbound'))} × Unbound"
            + (f"; {_pure(miss)})" if _pure(miss) else ")")
        )
    if mix:
        parts.append(
            "the Kubernetes mix (Zipf names, `ndots:5` NXDOMAIN bursts, 5 s TTLs) at "
            f"{_times(mix.get(BASELINE), mix.get('unbound'))} × Unbound"
        )
    cost = sc.get("cost", {})
    if cost:
        offered = data["settings"].get("cost_qps", 20_000)
        figures = []
        for workload, what in (("hits", "hit"), ("miss", "miss"), ("mix", "mix query")):
            mine = _counted(cost.get(workload, {}).get(BASELINE), "cpu_s_per_million")
            theirs = _counted(cost.get(workload, {}).get("unbound"), "cpu_s_per_million")
            if mine is not None:
                figures.append(
                    f"{mine:.1f} µs per {what}"
                    + (f" (Unbound {theirs:.1f})" if theirs is not None else "")
                )
        if figures:
            parts.append(f"CPU at {offered:,} QPS offered: " + ", ".join(figures))
    p99 = _counted(of("latency", BASELINE), "p99_ms")
    if p99 is not None:
        parts.append(f"p99 {p99:.2f} ms at {data['settings'].get('latency_qps', 20_000):,} QPS")
    mem = of("memory", BASELINE) or {}
    if isinstance(mem.get("bytes_per_entry"), int | float):
        unbound = (of("memory", "unbound") or {}).get("bytes_per_entry")
        parts.append(
            f"{mem['bytes_per_entry']:,.0f} bytes per cached entry"
            + (f" (Unbound {unbound:,.0f})" if isinstance(unbound, int | float) else "")
        )
    if isinstance(mem.get("idle_rss_kib"), int | float):
        parts.append(f"idle {mem['idle_rss_kib'] / 1024:.0f} MiB")
    startup = (of("startup", BASELINE) or {}).get("median_ms")
    if isinstance(startup, int | float):
        parts.append(f"start-up {startup / 1000:.2f} s")
    return (
        "Benchmarks ([benchmarks/RESULTS.md](benchmarks/RESULTS.md); one server core, dnsperf "
        f"on the other, same-run ratios; figures of {label}): "
        + "; ".join(parts)
        + f". {goals_summary(data)} From the run of {data['started']}: `{data['command']}` "
        "(`make bench` reproduces it)."
    )


# The parts of RESULTS.md and README.md that a full run rewrites: between a line
# `<!-- begin NAME ... -->` and a line `<!-- end NAME -->`; everything else is kept.
RESULTS_BLOCK = "generated-results"
README_BLOCK = "benchmark-headline"


def splice_block(text: str, name: str, body: str) -> str:
    """``text`` with the lines between its ``name`` markers replaced by ``body``; raises
    ValueError when the markers are missing."""
    lines = text.splitlines(keepends=True)
    begin = next((i for i, x in enumerate(lines) if x.startswith(f"<!-- begin {name}")), None)
    end = next((i for i, x in enumerate(lines) if x.startswith(f"<!-- end {name}")), None)
    if begin is None or end is None or end < begin:
        raise ValueError(f"no <!-- begin {name} --> ... <!-- end {name} --> lines")
    return "".join([*lines[: begin + 1], body.rstrip("\n") + "\n", *lines[end:]])


def _scenario_loads(data: dict[str, Any]) -> str:
    loads = [f"{k} {v:.2f}" for k, v in data["load"].items() if k not in ("before", "after")]
    if not loads:
        return ""
    return (
        f"; at the start of each scenario: {', '.join(loads)} (these count the benchmark's "
        "own processes, about 2 while it saturates both cores)"
    )


def _other_cpu(data: dict[str, Any]) -> str:
    runs = [
        run
        for results in data["scenarios"].values()
        for r in results.values()
        for run in r.get("runs", [])
        if "other_cpu" in run
    ]
    if not runs:
        return ""

    def spread(key: str) -> str:
        values = sorted(run.get(key, 0.0) for run in runs)
        return f"median {values[len(values) // 2]:.2f}, highest {values[-1]:.2f}"

    set_aside = sum(
        len(run.get("set_aside", []))
        for results in data["scenarios"].values()
        for r in results.values()
        for run in [*r.get("runs", []), r]
    )
    limit = data["settings"].get("max_steal")
    redo = (
        f" A run during which steal exceeded {limit} cores was set aside and redone (at most "
        f"twice; the set-aside figures stay in the JSON): {set_aside} runs were."
        if limit is not None and data["settings"].get("steal_retries")
        else ""
    )
    return (
        f"During the {len(runs)} timed throughput runs kept, processes other than the "
        f"benchmark's used {spread('other_cpu')} cores (/proc/stat less the benchmark's own "
        f"processes), and the hypervisor took (steal) {spread('steal_cpu')} cores of this "
        f"virtual machine.{redo}"
    )


def markdown(data: dict[str, Any], json_rel: str, png_rel: str | None, title: bool = True) -> str:
    """The Markdown report of a run; ``title``: with the document's title (without, for
    the generated block of RESULTS.md, under its own title and notes)."""
    d = _Doc(data)
    m = data["machine"]
    st = data["settings"]
    if title:
        d.add("# dnsproxy benchmark results", "")
    d.add(
        f"Run `{data['name']}` of {data['started']} ({data['mode']} mode), raw figures in "
        f"[`{json_rel}`]({json_rel})" + (f", plot [`{png_rel}`]({png_rel})." if png_rel else "."),
        "",
        "Reproduce: `make bench` (all scenarios, every installed system; about 13 minutes on "
        "a quiet machine), "
        "or one scenario: `.venv/bin/python -m benchmarks --scenario hits "
        "--systems dnsproxy-uvloop dnsmasq`. Command of this run: "
        f"`{data['command']}`.",
        "",
        f"Machine: {m['cpu_model']}, {m['nproc']} CPUs, {m['memory_gib']} GiB, "
        f"Linux {m['kernel']}, {m['os']}, Python {m['python']}. Load average (1 min) "
        f"before the run {data['load']['before'][0]:.2f}, after {data['load']['after'][0]:.2f}"
        + _scenario_loads(data)
        + ". "
        + _other_cpu(data),
        "",
        f"Pinning: each system under test on CPU {st['sut_cpu']} (`taskset -c`), dnsperf on "
        f"CPU {st['client_cpu']}, the upstream (Unbound, 1 thread, authoritative "
        f"local-data: {data['sizes']['hosts']:,} hosts × A + AAAA in bench.test, "
        f"{2 * data['sizes']['services']:,} services in cluster.local) on CPU "
        f"{st['upstream_cpu']}, so that the server core does only the system's own work.",
        "",
    )
    d.add("| system | version | upstream transport |", "|---|---|---|")
    for s in data["systems"].values():
        status = s["version"] if not s.get("skipped") else f"skipped: {s['skipped']}"
        d.add(f"| {s['label']} | {status} | {s['upstream_transport']} |")
    d.add("", f"Load generator: {data['dnsperf_version']}.", "")

    d.add(
        "## Goals: one core, same run",
        "",
        "dnsproxy's figure over the peer's, for the compiled build (what the container "
        "image ships; the goal applies to it) and the pure-Python one (what `pip install` "
        "gives). A peer's figure that is flagged (errors, lost queries, questions run out, "
        "a fixed load not sustained) is not counted.",
        "",
        "| goal | required | dnsproxy (compiled) | pure Python | met | gap |",
        "|---|---|---|---|---|---|",
    )
    for g in goals(data):
        met = "–" if g.met is None else "yes" if g.met else "NO"
        d.add(f"| {g.goal} | {g.required} | {g.compiled} | {g.pure} | {met} | {g.gap} |")
    d.add("", goals_summary(data), "")
    d.add("## Targets (dnsproxy compiled, uvloop, same run)", "")
    d.add("| target | required | measured | met |", "|---|---|---|---|")
    for name, target, value, ok in _targets(data):
        d.add(f"| {name} | {target} | {value} | {'–' if ok is None else 'yes' if ok else 'NO'} |")
    d.add("")

    load = st["throughput"]
    perf = f"`dnsperf -c {load['clients']} -T {load['threads']} -q {load['outstanding']}`"
    dur = st["duration_s"]
    reps = st["repeats"]
    sizes = data["sizes"]

    def qps_table(
        scenario: str,
        qps_header: str,
        headers: list[str],
        extra: Callable[[dict[str, Any]], list[str]],
    ) -> None:
        """A throughput scenario's table (results of ``Bench._repeated``): the columns every
        one of them has, then ``headers`` filled by ``extra``."""

        def row(key: str, r: dict[str, Any], base: dict[str, Any]) -> list[str]:
            return [
                _fmt(r["qps"]),
                "flagged" if r.get("flagged") else _ratio(r["qps"], base.get("qps")),
                f"{_fmt(r['qps_min'])}–{_fmt(r['qps_max'])}",
                _fmt(r["avg_latency_ms"], 3),
                _fmt(r["lost"]),
                *extra(r),
            ]

        common = [qps_header, "× dnsproxy", "min–max", "avg latency ms", "lost"]
        d.table(scenario, [*common, *headers], row)

    d.add(
        "## 1. Cache hits",
        "",
        f"{sizes['hit_names']:,} names (A), warmed first, then {perf} for {dur:g} s; median "
        f"of {reps} runs, each on a fresh process. QPS counts NOERROR/NXDOMAIN answers only. "
        "`upstream q.` is what reached the upstream during the timed run (0: all hits; "
        "dnsdist's health check asks once a second). `CPU` is the server's CPU time per "
        "second of run: under 1.00 with a saturating load, something else ran on the "
        "server core or the system waited on something other than its CPU. `other / steal`: "
        "CPU that every other process on this machine used meanwhile, and CPU time the "
        "hypervisor took from this virtual machine (steal), in cores (0 / 0 = quiet).",
        "",
    )
    qps_table(
        "hits",
        "QPS",
        ["upstream q.", "CPU", "other / steal"],
        lambda r: [
            _fmt(r["runs"][0].get("upstream_queries")),
            _fmt(r.get("server_cpu"), 2),
            _noise(r),
        ],
    )
    d.add(
        "## 2. Miss path",
        "",
        f"Every question unique: {sizes['miss_questions']:,} questions (each host's A, then "
        f"AAAA), never repeated in a run, {perf} on a fresh process until they are used up "
        f"or {dur:g} s have passed; median of {reps} runs. Each answer is a cache miss "
        "forwarded to the upstream (transport in the table above). The question count stays "
        f"below every system's cache capacity ({CACHE_ENTRIES:,} or more), so that the figure is "
        "the "
        "forwarding path's and not the eviction policy's: dnsmasq, for one, slows to about "
        "2,000 QPS once its cache is full of unexpired answers. `CPU` is the server's CPU "
        "time per second of run (1.00 = its core saturated), `upstream CPU` the upstream's, "
        "which shares the client core with dnsperf.",
        "",
    )
    qps_table(
        "miss",
        "answered QPS",
        ["CPU", "upstream CPU", "other / steal", "rcodes (run 1)"],
        lambda r: [
            _fmt(r.get("server_cpu"), 2),
            _fmt(r.get("upstream_cpu"), 2),
            _noise(r),
            ", ".join(f"{k} {v:,}" for k, v in r["runs"][0]["rcodes"].items()),
        ],
    )
    lat = st["latency_qps"]
    d.add(
        f"## 3. Latency of cache hits at {lat:,} QPS offered",
        "",
        f"The warm names of scenario 1 at a fixed `dnsperf -Q {lat}` for "
        f"{st['latency_duration_s']:g} s; percentiles (nearest rank) of every query's latency "
        "from dnsperf's per-query output (`-v`, microsecond resolution). Latency as dnsperf "
        "sees it: it includes dnsperf's own send and receive path. "
        f"{reps} runs per system, round-robin; the table shows the run with the median p99 "
        "(every run's p99 in the last column), since a tail this short is easily moved by "
        "anything else that runs on the machine for a few milliseconds.",
        "",
    )

    def lat_row(key: str, r: dict[str, Any], base: dict[str, Any]) -> list[str]:
        return [
            _fmt(r["qps"]),
            _fmt(r.get("p50_ms"), 3),
            _fmt(r.get("p90_ms"), 3),
            _fmt(r.get("p99_ms"), 3),
            _ratio(r.get("p99_ms"), base.get("p99_ms")),
            _fmt(r.get("p999_ms"), 3),
            _fmt(r.get("max_ms"), 3),
            _fmt(r["lost"]),
            _noise(r),
            ", ".join(_fmt(x, 3) for x in r.get("p99_runs_ms", [])),
        ]

    d.table(
        "latency",
        [
            "achieved QPS",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "p99 × dnsproxy",
            "p99.9 ms",
            "max ms",
            "lost",
            "other / steal",
            "p99 of each run",
        ],
        lat_row,
    )
    d.add(
        "## 4. Realistic mix (Kubernetes pod)",
        "",
        f"{sizes['mix_lookups']:,} application lookups drawn from a Zipf distribution "
        f"(s = {data['mix']['zipf_s']}) over {3 * sizes['services']:,} names, each expanded as "
        "glibc does with `search app.svc.cluster.local svc.cluster.local cluster.local` and "
        "`ndots:5`: A and AAAA in pairs for each candidate until one exists. A third of the "
        "names are services of the pod's own namespace (found at the first candidate), a "
        "third services of other namespaces (one NXDOMAIN pair first), a third external "
        "names (three NXDOMAIN pairs first); "
        f"{data['mix']['queries']:,} queries, {data['mix']['nxdomain_share']:.0%} of them "
        "NXDOMAIN by construction. cluster.local answers have TTL 5 s and negative TTL 5 s "
        "(as CoreDNS serves them), so entries expire during the run. Cold cache at the start, "
        f"{perf} for {dur:g} s, median of {reps} runs. Hit ratio = 1 − upstream queries ÷ "
        "answered queries.",
        "",
    )
    qps_table(
        "mix",
        "QPS",
        ["hit ratio", "CPU", "other / steal"],
        lambda r: [_fmt(r.get("hit_ratio"), 3), _fmt(r.get("server_cpu"), 2), _noise(r)],
    )
    cost = data["scenarios"].get("cost", {})
    if cost:
        offered = st.get("cost_qps", 20_000)
        d.add(
            f"## 4b. Cost at a fixed load: CPU per query at {offered:,} QPS offered",
            "",
            f"dnsperf offers {offered:,} QPS (`-Q {offered}`, 4 source ports) for "
            f"{st.get('cost_duration_s', 0):g} s: the warm names of scenario 1 (hits), unique "
            "questions of scenario 2 on a fresh process (misses), the mix of scenario 4 from a "
            "cold start (mix). The figure is the server's CPU time (user + system, /proc) "
            "during the run per million answered queries: what a query costs when the "
            "system is not saturated, which a noisy machine moves far less than a "
            f"throughput figure. Median of {reps} runs, round-robin, each on a fresh "
            "process; a run that answered less than 97 % of the offered load is flagged.",
            "",
            "| system | hits CPU s / M | × dnsproxy | misses CPU s / M | × dnsproxy | mix CPU s "
            "/ M | × dnsproxy | answered QPS (h / m / mix) | min–max (h; m; mix) "
            "| other / steal (mix) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        )
        keys = list(dict.fromkeys(k for rs in cost.values() for k in rs))
        flagged: dict[str, Any] = {}
        for key in keys:
            cells: list[str] = []
            answered: list[str] = []
            spread: list[str] = []
            for workload in COST_WORKLOADS:
                r = cost.get(workload, {}).get(key, {})
                base = cost.get(workload, {}).get(BASELINE, {})
                if "cpu_s_per_million" not in r:
                    err = str(r.get("error", "not run")).splitlines()[0][:60]
                    cells += [f"error: {err}", "–"]
                    answered.append("–")
                    spread.append("–")
                    continue
                mark = " ⚑" if r.get("flagged") else ""
                if mark:
                    flagged[f"{key} ({workload})"] = r
                cells += [
                    _fmt(r["cpu_s_per_million"], 1) + mark,
                    _ratio(r["cpu_s_per_million"], base.get("cpu_s_per_million")),
                ]
                answered.append(_fmt(r["ok_qps"]))
                spread.append(f"{_fmt(r['min'], 1)}–{_fmt(r['max'], 1)}")
            mix = cost.get("mix", {}).get(key, {})
            d.add(
                f"| {d.label(key)} | "
                + " | ".join([*cells, " / ".join(answered), "; ".join(spread), _noise(mix)])
                + " |"
            )
        d.add("")
        for name, r in flagged.items():
            key, workload = name.split(" ", 1)
            d.add(f"⚑ {d.label(key)} {workload}, flagged (not counted): {'; '.join(r['flagged'])}.")
        if flagged:
            d.add("")
    d.add(
        "## 5. Memory",
        "",
        "Resident size (VmRSS of the process group, /proc) one second after start-up, and one "
        f"second after caching {sizes['fill_entries']:,} distinct answers (A records, one "
        "query each). Bytes per entry = (full − idle) ÷ answers cached. dnsmasq and dnsdist "
        f"allocate their whole cache (sized {CACHE_ENTRIES:,} and {CACHE_ENTRIES + 50_000:,}) at "
        "start, so their idle "
        "figure holds most of it; compare the full figures too. Unbound stores each answer "
        "twice (message and RRset caches).",
        "",
    )

    def mem_row(key: str, r: dict[str, Any], base: dict[str, Any]) -> list[str]:
        return [
            _fmt(r["idle_rss_kib"] / 1024, 1),
            _ratio(r["idle_rss_kib"], base.get("idle_rss_kib")),
            _fmt(r["full_rss_kib"] / 1024, 1),
            _ratio(r["full_rss_kib"], base.get("full_rss_kib")),
            _fmt(r["entries"]),
            _fmt(r["bytes_per_entry"]),
            _ratio(r["bytes_per_entry"], base.get("bytes_per_entry")),
        ]

    d.table(
        "memory",
        ["idle MiB", "× dnsproxy", "full MiB", "× dnsproxy", "entries", "B/entry", "× dnsproxy"],
        mem_row,
    )
    d.add(
        "## 6. Start-up",
        "",
        "From just before the process is spawned to the first answered UDP query (a name "
        "forwarded to the upstream, so the first upstream connection is included), polled "
        f"every 5 ms; median of {st['startup_repeats']} starts.",
        "",
    )
    d.table(
        "startup",
        ["median ms", "× dnsproxy", "runs ms"],
        lambda k, r, b: [
            _fmt(r["median_ms"], 1),
            _ratio(r["median_ms"], b.get("median_ms")),
            ", ".join(_fmt(x, 1) for x in r["runs_ms"]),
        ],
    )
    d.add(
        "## 7. Misses over TLS",
        "",
        "The miss scenario (2) again for the systems that can forward over TLS, once "
        "forwarding over TCP and once over TLS (DNS over TLS to the upstream's `tls-port`, "
        "an ECDSA P-256 certificate checked against its name), the two variants round-robin "
        f"in one loop; median of {reps} runs each. dnsproxy keeps its two pipelined "
        "connections and resumes TLS sessions; Unbound uses `forward-tls-upstream: yes`.",
        "",
    )
    tls_rows = data["scenarios"].get("tls", {})
    base_tls = tls_rows.get(BASELINE, {}).get("tls", {})
    d.add(
        "| system | TCP QPS | TLS QPS | TLS ÷ TCP | TLS × dnsproxy | min–max TCP; TLS "
        "| avg latency ms TCP; TLS | CPU TCP; TLS | upstream CPU TCP; TLS | other / steal TLS |",
        "|---|---|---|---|---|---|---|---|---|---|",
    )
    for key, r in tls_rows.items():
        if "error" in r:
            d.add(f"| {d.label(key)} | error: {str(r['error']).splitlines()[0][:160]} |" + " |" * 8)
            continue
        tcp, tls = r["tcp"], r["tls"]
        d.add(
            "| "
            + " | ".join(
                [
                    d.label(key),
                    _fmt(tcp["qps"]),
                    _fmt(tls["qps"]),
                    _ratio(tls["qps"], tcp["qps"]),
                    _ratio(tls["qps"], base_tls.get("qps")),
                    f"{_fmt(tcp['qps_min'])}–{_fmt(tcp['qps_max'])}; "
                    f"{_fmt(tls['qps_min'])}–{_fmt(tls['qps_max'])}",
                    f"{_fmt(tcp['avg_latency_ms'], 3)}; {_fmt(tls['avg_latency_ms'], 3)}",
                    f"{_fmt(tcp.get('server_cpu'), 2)}; {_fmt(tls.get('server_cpu'), 2)}",
                    f"{_fmt(tcp.get('upstream_cpu'), 2)}; {_fmt(tls.get('upstream_cpu'), 2)}",
                    _noise(tls),
                ]
            )
            + " |"
        )
    d.add("")
    profiles = [
        (scenario, key, r["profile"])
        for scenario, results in data["scenarios"].items()
        for key, r in results.items()
        if isinstance(r.get("profile"), dict) and r["profile"].get("leaf")
    ]
    if profiles:
        d.add(
            "## Where dnsproxy's time goes (py-spy)",
            "",
            "An extra run per scenario, not counted above, sampled at 1 kHz with "
            "`py-spy record -f raw --nonblocking`, as shares of the samples taken while the "
            "process was on CPU: self time by leaf frame (file:line), and inclusive time of "
            "each dnsproxy frame (time spent in it and in what it called).",
            "",
        )
        for scenario, key, prof in profiles:
            d.add(f"{scenario}, {d.label(key)} ({prof['samples']:,} samples):", "")
            d.add("| self | leaf frame | | inclusive | dnsproxy frame on the stack |")
            d.add("|---|---|---|---|---|")
            leaf, incl = prof["leaf"][:12], prof.get("inclusive", [])[:12]
            for i in range(max(len(leaf), len(incl))):
                a = f"{leaf[i][1]:.1f}% | `{leaf[i][0]}`" if i < len(leaf) else " | "
                b = f"{incl[i][1]:.1f}% | `{incl[i][0]}`" if i < len(incl) else " | "
                d.add(f"| {a} | | {b} |")
            d.add("")
    if data.get("notes"):
        d.add("## Notes", "")
        for note in data["notes"]:
            d.add(f"- {note}")
        d.add("")
    return "\n".join(d.lines)


# -- plot


def plot(data: dict[str, Any], path: Path) -> str | None:
    """Latency percentile curves (scenario 3) and throughput bars; None or why skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter
    except ImportError:
        return "matplotlib is not installed (make bench installs it): no plot"
    labels = {k: v["label"] for k, v in data["systems"].items()}
    sc = data["scenarios"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    lat = sc.get("latency", {})
    max_nines = 1.0
    for key, r in lat.items():
        if "curve" not in r:
            continue
        xs = [_nines(p) for p, _ in r["curve"]]
        ys = [ms * 1000 for _, ms in r["curve"]]
        max_nines = max(max_nines, xs[-1])
        ax1.plot(xs, ys, label=f"{labels[key]} (p99 {r['p99_ms'] * 1000:.0f} µs)", linewidth=2)
    if max_nines <= 1.0:
        ax1.text(0.5, 0.5, "latency scenario not in this run", ha="center", transform=ax1.transAxes)
    ticks = [(0, "0%"), (1, "90%"), (2, "99%"), (3, "99.9%"), (4, "99.99%"), (5, "99.999%")]
    ticks = [t for t in ticks if t[0] <= max_nines + 0.01]
    ax1.xaxis.set_major_locator(FixedLocator([t[0] for t in ticks]))
    ax1.set_xticklabels([t[1] for t in ticks])
    if max_nines > 1.0:
        ax1.set_yscale("log")
    ax1.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax1.set_xlabel("percentile")
    ax1.set_ylabel("latency (µs, log scale)")
    offered = data["settings"]["latency_qps"]
    ax1.set_title(f"Cache-hit latency at {offered:,} QPS offered (dnsperf -Q, per query)")
    ax1.grid(True, which="both", alpha=0.3)
    ax1.axhline(1000, color="red", linestyle="--", linewidth=1, label="1 ms (p99 target)")
    ax1.legend(fontsize=8)

    groups = [("hits", "cache hits"), ("miss", "miss path"), ("mix", "k8s mix")]
    keys = list(labels)
    width = 0.8 / max(1, len(keys))
    for i, key in enumerate(keys):
        values = [sc.get(g, {}).get(key, {}).get("qps", 0) / 1000 for g, _ in groups]
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(groups))]
        ax2.bar(xs, values, width, label=labels[key])
    ax2.set_xticks(range(len(groups)))
    ax2.set_xticklabels([g[1] for g in groups])
    ax2.set_ylabel("thousand queries per second (one server core)")
    ax2.set_title("Throughput (median of runs)")
    ax2.grid(True, axis="y", alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(f"dnsproxy benchmark {data['name']} — {data['machine']['cpu_model']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _nines(p: float) -> float:
    return -math.log10(max(1e-9, 1 - p))
