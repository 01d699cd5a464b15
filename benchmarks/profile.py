"""py-spy profiles of a running dnsproxy, reduced to where the time goes (file:line, %).

``record`` samples a process with ``py-spy record -f raw`` (collapsed stacks, one line per
distinct stack with its sample count) while a load runs; ``aggregate`` sums the samples by
leaf frame (self time) and by every dnsproxy frame on the stack (inclusive time).
``python -m benchmarks.profile FILE`` prints the same tables for a saved raw file.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.procs import pin

TOP = 20
# Frames on every stack (start-up and the event loop's run): no information in "inclusive".
_ROOTS = ("dnsproxy/__main__.py", "dnsproxy/cli.py", "run (dnsproxy/app.py")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def record(
    pid: int,
    out: Path,
    load: Callable[[], dict[str, Any]],
    *,
    duration_s: float,
    cpu: int | None,
) -> dict[str, Any]:
    """Sample ``pid`` for ``duration_s`` at 1 kHz while ``load()`` runs."""
    tool = py_spy()
    if tool is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [tool, "record", "-p", str(pid), "-d", f"{max(1, round(duration_s))}", "-r", "1000"]
    argv += ["-f", "raw", "-o", str(out), "--nonblocking"]
    spy = subprocess.Popen(
        [*pin(cpu), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        summary = load()
        _, err = spy.communicate(timeout=duration_s + 30)
    finally:
        if spy.poll() is None:
            spy.send_signal(signal.SIGKILL)
            spy.communicate()
    if not out.exists():
        return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-500:]}"}
    return {"raw": str(out), "run_while_sampled": summary, **aggregate(out.read_text())}


def _parse(text: str) -> list[tuple[list[str], int]]:
    stacks = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m.group("file")
    for marker in ("/dnsproxy/", "/site-packages/", "/lib/python3"):
        if marker in path:
            path = path[path.index(marker) + 1 :]
            break
    line = f":{m.group('line')}" if m.group("line") else ""
    return f"{m.group('func')} ({path}{line})"


def aggregate(text: str, top: int = TOP) -> dict[str, Any]:
    """Self time by leaf frame and inclusive time by dnsproxy frame, as % of samples."""
    stacks = _parse(text)
    total = sum(c for _, c in stacks)
    if total == 0:
        return {"samples": 0, "leaf": [], "inclusive": []}
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    idle = 0
    for frames, count in stacks:
        # A stack of only process/thread labels means "not in Python code" (idle in C).
        py = [f for f in frames if _FRAME.match(f.strip())]
        leaf[_short(py[-1]) if py else "(no Python frame: idle or in C)"] += count
        if not py:
            idle += count
        for f in dict.fromkeys(_short(f) for f in py if "dnsproxy/" in f):
            if not any(root in f for root in _ROOTS):
                inclusive[f] += count

    def table(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * c / total, 1)] for name, c in counter.most_common(top)]

    return {"samples": total, "leaf": table(leaf), "inclusive": table(inclusive)}


def main(argv: list[str]) -> int:
    for name in argv:
        result = aggregate(Path(name).read_text())
        print(f"{name}: {result['samples']} samples")
        for title in ("leaf", "inclusive"):
            print(f"  {title}:")
            for frame, pct in result[title]:
                print(f"    {pct:5.1f}%  {frame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
