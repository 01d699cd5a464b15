"""Entry point for ``python -m dnsproxy``."""

from __future__ import annotations

from dnsproxy.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
