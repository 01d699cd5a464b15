"""Print a digest of the sources an image is built from (dnsproxy/, pyproject.toml,
setup.py and the build backend, deploy/Dockerfile), so that the image test can tell an
image built from this tree from a stale one. Standard library only: `make image` runs it
before any virtualenv exists."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("dnsproxy", "pyproject.toml", "setup.py", "build_support", "deploy/Dockerfile")
SOURCES = ("*.py", "*.c")  # in the directories: Python, and the C extension's source


def digest(root: Path = ROOT) -> str:
    """sha256 over each source file's path and content, in path order."""
    h = hashlib.sha256()
    files: list[Path] = []
    for part in PARTS:
        path = root / part
        if path.is_dir():
            files += sorted(f for pattern in SOURCES for f in path.rglob(pattern))
        else:
            files.append(path)
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


if __name__ == "__main__":
    sys.stdout.write(digest() + "\n")
