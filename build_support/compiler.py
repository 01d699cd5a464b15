"""Whether this machine can make the compiled build: ``python build_support/compiler.py``.

Exits 0, printing nothing, when the C compiler that Python's build configuration names
and Python's headers are both present; otherwise exits 1 and prints why (one line), so
that ``make test`` can say why it skipped the compiled build.
"""

from __future__ import annotations

import shlex
import shutil
import sys
import sysconfig
from pathlib import Path


def missing() -> str:
    """What the compiled build lacks here (empty when nothing is missing)."""
    # The compiler setuptools will call: CC from the build configuration (on Debian
    # x86_64-linux-gnu-gcc, which the gcc package provides), else plain cc.
    cc = shlex.split(sysconfig.get_config_var("CC") or "cc")[0]
    if shutil.which(cc) is None:
        return f"no C compiler ({cc} not found; Debian: apt-get install gcc)"
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        return f"no Python headers ({header} not found; Debian: apt-get install python3-dev)"
    return ""


if __name__ == "__main__":
    reason = missing()
    if reason:
        print(reason)
    sys.exit(1 if reason else 0)
