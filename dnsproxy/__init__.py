"""dnsproxy: a node-local caching DNS forwarder."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.machinery import ExtensionFileLoader, PathFinder
from types import ModuleType

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


def native_extension(name: str) -> ModuleType | None:
    """The C extension ``dnsproxy.<name>`` from this package's own directory, or None.

    Looked up in the package's directory only: an editable install's import hook would
    otherwise hand a copy of the pure-Python sources (a benchmark's, say) the checkout's
    compiled extension."""
    full = f"{__name__}.{name}"
    module = sys.modules.get(full)
    if module is None:
        spec = PathFinder.find_spec(full, __path__)
        if spec is None or not isinstance(spec.loader, ExtensionFileLoader):
            return None
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return module


def _extension(name: str) -> bool:
    """Whether ``dnsproxy.<name>`` is importable and loaded from a compiled extension."""
    if name in NATIVE_EXTENSIONS:
        return native_extension(name) is not None
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
