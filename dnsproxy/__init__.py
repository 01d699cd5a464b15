"""dnsproxy: a node-local caching DNS forwarder."""

from __future__ import annotations

import importlib
from importlib.machinery import ExtensionFileLoader

# The one place the version is written: pyproject.toml reads it for the package metadata,
# and `dnsproxy --version` and the dnsproxy_build_info metric show it.
__version__ = "0.1.0"

# The modules of the query paths, which the compiled build (DNSPROXY_MYPYC=1, setup.py)
# compiles with mypyc; everywhere else the same source runs as pure Python.
NATIVE_MODULES = (
    "wire",
    "cache",
    "framing",
    "pipeline",
    "resolution",
    "upstream",
    "forwarder",
    "server",
)
# C extensions of the compiled build (setup.py): batched UDP reads and writes.
NATIVE_EXTENSIONS = ("_udpio",)


def _extension(name: str) -> bool:
    """Whether ``dnsproxy.<name>`` is importable and loaded from a compiled extension."""
    try:
        module = importlib.import_module(f"dnsproxy.{name}")
    except ImportError:
        return False
    return isinstance(module.__loader__, ExtensionFileLoader)


def compiled() -> str:
    """Which build of the query-path modules this process runs: ``"mypyc"`` when every
    module of ``NATIVE_MODULES`` was loaded from its compiled extension and the C
    extensions of ``NATIVE_EXTENSIONS`` are there, ``"no"`` when none is (pure Python),
    ``"partial"`` otherwise (a broken or half-rebuilt install). Imports the modules."""
    loaded = [_extension(name) for name in (*NATIVE_MODULES, *NATIVE_EXTENSIONS)]
    return "mypyc" if all(loaded) else "no" if not any(loaded) else "partial"
