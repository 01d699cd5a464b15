"""The compiled build: with DNSPROXY_MYPYC=1 the query-path modules are compiled with mypyc.

Everything about the package is declared in pyproject.toml; this file only adds the
extension modules when asked. Without DNSPROXY_MYPYC (or with 0) the build is the
pure-Python wheel that runs anywhere Python 3.11 does: what `pip install` gives. With
DNSPROXY_MYPYC=1 the modules named in ``dnsproxy.NATIVE_MODULES`` are compiled into one
shared library inside the package (``dnsproxy/_native__mypyc*.so``) plus one small
extension per module, plus the C extension ``dnsproxy._udpio`` (batched UDP system calls,
see dnsproxy/_udpio.c), and the wheel is tagged for this interpreter and platform. That needs
a C compiler, Python's headers (Debian: gcc, python3-dev) and mypy, which type-checks the
modules against the runtime dependencies (so those must be importable at build time:
``build_support/backend.py`` adds them to the build requirements).
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).resolve().parent


def native_modules() -> list[str]:
    """``dnsproxy.NATIVE_MODULES``, read without importing the package."""
    tree = ast.parse((HERE / "dnsproxy" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "NATIVE_MODULES" for t in targets):
                assert node.value is not None
                return list(ast.literal_eval(node.value))
    raise SystemExit("dnsproxy/__init__.py does not define NATIVE_MODULES")


def compiled() -> bool:
    """Whether DNSPROXY_MYPYC asks for the compiled build (1/true/yes; 0/false/no/unset)."""
    value = os.environ.get("DNSPROXY_MYPYC", "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise SystemExit(f"DNSPROXY_MYPYC={value!r}: expected 1 (compile with mypyc) or 0")


def ext_modules() -> list[object]:
    # While the build backend only lists the build requirements (mypy among them, not
    # installed yet in an isolated build), there is nothing to compile.
    if not compiled() or os.environ.get("DNSPROXY_BUILD_REQUIREMENTS_ONLY"):
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        raise SystemExit(
            "DNSPROXY_MYPYC=1 needs mypy (which provides mypyc) where the build runs: "
            "pip install mypy, or build with build isolation"
        ) from None
    paths = [f"dnsproxy/{name}.py" for name in native_modules()]
    # One group, named inside the package: its shared library is dnsproxy/_native__mypyc,
    # installed and removed with the package (mypyc's default is a top-level module named
    # by a hash). One group also lets calls between the compiled modules be native calls.
    native = list(mypycify(paths, opt_level="3", group_name="dnsproxy._native"))
    # Batched UDP reads and writes for the listeners (recvmmsg/sendmmsg, which Python's
    # socket module does not offer); Linux only, and only in the compiled build, which
    # needs the C compiler anyway: dnsproxy.server falls back to the socket's methods.
    udpio = Extension(
        "dnsproxy._udpio", ["dnsproxy/_udpio.c"], extra_compile_args=["-O2", "-Wall"]
    )
    return [*native, udpio]


setup(ext_modules=ext_modules())
