"""Running dnsperf (pinned to the client core) and reading its summary and per-query lines."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.procs import HOST, HarnessError, run_bounded, which

INSTALL_HINT = "dnsperf is not installed: apt-get install dnsperf (Debian/Ubuntu package)"
# Time dnsperf may take beyond its -l limit: loading the file, -t for the last replies.
SLACK_S = 60.0


@dataclass(frozen=True)
class Load:
    """How dnsperf offers queries: ``-c`` clients (source ports), ``-T`` threads, ``-q``
    queries outstanding at most, ``-Q`` rate limit (0: as fast as answers come back)."""

    clients: int = 1
    threads: int = 1
    outstanding: int = 100
    max_qps: int = 0

    def args(self) -> list[str]:
        out = ["-c", str(self.clients), "-T", str(self.threads), "-q", str(self.outstanding)]
        if self.max_qps:
            out += ["-Q", str(self.max_qps)]
        return out


@dataclass
class Result:
    """dnsperf's summary of one run, plus the per-query latencies when asked for."""

    argv: list[str]
    sent: int = 0
    completed: int = 0
    lost: int = 0
    rcodes: dict[str, int] = field(default_factory=dict)
    runtime_s: float = 0.0
    qps: float = 0.0
    avg_latency_s: float = 0.0
    min_latency_s: float = 0.0
    max_latency_s: float = 0.0
    stddev_latency_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    interval_qps: list[float] = field(default_factory=list)  # -S 1: each second's rate

    @property
    def ok(self) -> int:
        """Replies that are answers (NOERROR, NXDOMAIN), not failures (SERVFAIL, REFUSED)."""
        return self.rcodes.get("NOERROR", 0) + self.rcodes.get("NXDOMAIN", 0)

    @property
    def ok_qps(self) -> float:
        """Answers per second while dnsperf was sending: the mean of its per-second rates
        (scaled to the answers' share of replies). dnsperf's own run time also counts the
        wait for the last replies, up to -t seconds when some are lost at the end, which
        would penalise a system for a handful of drops; without interval figures (runs
        under two seconds) it is the fallback."""
        if len(self.interval_qps) >= 2 and self.completed:
            return statistics.fmean(self.interval_qps) * self.ok / self.completed
        return self.ok / self.runtime_s if self.runtime_s > 0 else 0.0

    def summary(self) -> dict[str, object]:
        return {
            "argv": " ".join(self.argv),
            "sent": self.sent,
            "completed": self.completed,
            "lost": self.lost,
            "rcodes": self.rcodes,
            "runtime_s": round(self.runtime_s, 6),
            "qps": round(self.qps, 1),
            "ok_qps": round(self.ok_qps, 1),
            "avg_latency_ms": round(self.avg_latency_s * 1e3, 4),
            "min_latency_ms": round(self.min_latency_s * 1e3, 4),
            "max_latency_ms": round(self.max_latency_s * 1e3, 4),
            "stddev_latency_ms": round(self.stddev_latency_s * 1e3, 4),
            "interval_qps": [round(x) for x in self.interval_qps],
        }


def binary() -> str | None:
    return which("dnsperf")


def version() -> str:
    path = binary()
    if path is None:
        return "missing"
    out = run_bounded([path, "-h"], 10.0)
    m = re.search(rb"Version (\S+)", out.stdout + out.stderr)
    return f"dnsperf {m.group(1).decode()}" if m else "dnsperf (unknown version)"


def run(
    port: int,
    datafile: Path,
    load: Load,
    *,
    cpu: int | None,
    duration_s: float | None = None,
    max_runs: int | None = None,
    timeout_s: float = 2.0,
    per_query: Path | None = None,
    interval: bool = False,
) -> Result:
    """Run dnsperf against 127.0.0.1:port; bounded by ``-l`` and/or ``-n`` and a kill
    timeout. ``per_query`` keeps dnsperf's ``-v`` output there and parses the latencies."""
    path = binary()
    if path is None:
        raise HarnessError(INSTALL_HINT)
    if duration_s is None and max_runs is None:
        raise ValueError("dnsperf needs a time limit or a run count")
    argv = [path, "-s", HOST, "-p", str(port), "-d", str(datafile), "-t", str(timeout_s)]
    argv += load.args()
    if duration_s is not None:
        argv += ["-l", f"{duration_s:g}"]
    if max_runs is not None:
        argv += ["-n", str(max_runs)]
    if per_query is not None:
        argv.append("-v")
    if interval:
        argv += ["-S", "1"]
    # Without -l the run length depends on the file; a generous bound still applies.
    bound = (duration_s if duration_s is not None else 300.0) + timeout_s + SLACK_S
    done = run_bounded(argv, bound, cpu=cpu, stdout=per_query)
    text = (per_query.read_text() if per_query is not None else done.stdout.decode()) + (
        done.stderr.decode(errors="replace")
    )
    if done.returncode != 0:
        raise HarnessError(f"dnsperf failed (exit {done.returncode}): {text[-1500:]}")
    result = parse(text)
    result.argv = argv
    return result


_NUM = r"([0-9.]+)"
_INTERVAL = re.compile(r"^\d+\.\d+: ([0-9.]+)$")


def parse(text: str) -> Result:
    """Parse dnsperf's output (summary, and ``> RCODE name type latency`` lines of -v)."""
    r = Result(argv=[])
    latencies: list[float] = []
    for line in text.splitlines():
        if line.startswith("> "):
            parts = line.split()
            if len(parts) >= 5:
                try:
                    latencies.append(float(parts[-1]))
                except ValueError:
                    pass
            continue
        s = line.strip()
        if m := _INTERVAL.match(s):
            r.interval_qps.append(float(m.group(1)))
        elif m := re.match(r"Queries sent:\s+(\d+)", s):
            r.sent = int(m.group(1))
        elif m := re.match(r"Queries completed:\s+(\d+)", s):
            r.completed = int(m.group(1))
        elif m := re.match(r"Queries lost:\s+(\d+)", s):
            r.lost = int(m.group(1))
        elif s.startswith("Response codes:"):
            for code, count in re.findall(r"([A-Z]+) (\d+) \(", s):
                r.rcodes[code] = int(count)
        elif m := re.match(r"Run time \(s\):\s+" + _NUM, s):
            r.runtime_s = float(m.group(1))
        elif m := re.match(r"Queries per second:\s+" + _NUM, s):
            r.qps = float(m.group(1))
        elif m := re.match(
            r"Average Latency \(s\):\s+" + _NUM + r" \(min " + _NUM + r", max " + _NUM, s
        ):
            r.avg_latency_s, r.min_latency_s, r.max_latency_s = map(float, m.groups())
        elif m := re.match(r"Latency StdDev \(s\):\s+" + _NUM, s):
            r.stddev_latency_s = float(m.group(1))
    r.latencies_s = latencies
    if r.runtime_s <= 0:
        raise HarnessError("dnsperf printed no statistics:\n" + text[-1500:])
    return r
