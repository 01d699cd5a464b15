"""The benchmark report's goals and the blocks a full run rewrites (benchmarks/report.py):
what the README's headline and RESULTS.md say about a run."""

# The report's own signs (the multiplication sign of a ratio, the en dash of a missing
# figure) are what these tests check.
# ruff: noqa: RUF001

from __future__ import annotations

import sys
from typing import Any

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT))  # the benchmarks package, beside dnsproxy in the checkout
from benchmarks import report


def result(qps: float, **extra: Any) -> dict[str, Any]:
    return {"qps": qps, **extra}


def cost(us: float, **extra: Any) -> dict[str, Any]:
    return {"cpu_s_per_million": us, "offered_qps": 20_000, **extra}


def run(scenarios: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "full",
        "started": "2026-12-01 08:00:00 +0000",
        "command": "python -m benchmarks --wait-quiet 0.5",
        "settings": {"cost_qps": 20_000, "latency_qps": 20_000},
        "systems": {"dnsproxy-uvloop": {"label": "dnsproxy (compiled, uvloop)"}},
        "scenarios": scenarios,
    }


def test_goals_say_met_or_the_gap() -> None:
    data = run(
        {
            "hits": {
                "dnsproxy-uvloop": result(120_000),
                "dnsproxy-pure": result(90_000),
                "unbound": result(100_000),
                "dnsdist": result(110_000),
            },
            "miss": {"dnsproxy-uvloop": result(36_000), "unbound": result(30_000)},
            # Unbound's mix figure is flagged: the goal cannot be judged from it.
            "mix": {
                "dnsproxy-uvloop": result(40_000),
                "unbound": result(30_000, flagged=["lost 2 % of the queries"]),
            },
            "cost": {
                "hits": {"dnsproxy-uvloop": cost(11.0), "unbound": cost(10.0)},
                "miss": {"dnsproxy-uvloop": cost(30.0), "unbound": cost(40.0)},
                "mix": {"dnsproxy-uvloop": cost(20.0)},
            },
        }
    )
    rows = {g.goal: g for g in report.goals(data)}
    hits = rows["cache hits"]
    # Against the faster peer, dnsdist: 120k / 110k.
    assert (hits.compiled, hits.pure, hits.met, hits.gap) == ("1.09 ×", "0.82 ×", True, "–")
    miss = rows["misses over TCP"]
    assert (miss.compiled, miss.met) == ("1.20 ×", False)
    assert miss.gap == "needs 25 % more to reach 1.5 ×"
    assert rows["Kubernetes mix"].met is None
    cost_hits = rows["CPU per query at 20,000 QPS offered, hits"]
    assert (cost_hits.compiled, cost_hits.met, cost_hits.gap) == (
        "1.10 ×",
        False,
        "10 % over 1.0 ×",
    )
    assert rows["CPU per query at 20,000 QPS offered, misses"].met is True
    assert rows["CPU per query at 20,000 QPS offered, mix"].met is None
    summary = report.goals_summary(data)
    assert summary.startswith("2 of 6 goals met; missed: misses over TCP 1.20 × (needs 25 %")
    assert "not measured: Kubernetes mix, CPU per query at 20,000 QPS offered, mix." in summary
    headline = report.headline(data)
    assert "cache hits 120k QPS (1.20 × Unbound, 1.09 × dnsdist; pure Python 90k QPS)" in headline
    assert "From the run of 2026-12-01 08:00:00 +0000: `python -m benchmarks" in headline


def test_a_full_run_rewrites_only_its_block() -> None:
    text = (
        "# Results\n\nNotes kept.\n"
        "<!-- begin generated-results: rewritten by a full run -->\nold figures\nmore\n"
        "<!-- end generated-results -->\nAfter.\n"
    )
    new = report.splice_block(text, report.RESULTS_BLOCK, "new figures\n\n")
    assert new == (
        "# Results\n\nNotes kept.\n"
        "<!-- begin generated-results: rewritten by a full run -->\nnew figures\n"
        "<!-- end generated-results -->\nAfter.\n"
    )
    with pytest.raises(ValueError, match="benchmark-headline"):
        report.splice_block(text, report.README_BLOCK, "x")


def test_readme_and_results_have_the_blocks() -> None:
    for path, name in ((ROOT / "README.md", report.README_BLOCK),
                       (ROOT / "benchmarks" / "RESULTS.md", report.RESULTS_BLOCK)):  # fmt: skip
        text = path.read_text()
        assert report.splice_block(text, name, "x") != text
