"""setuptools' build backend, plus what the compiled build needs when DNSPROXY_MYPYC=1.

mypyc type-checks the modules it compiles, so a compiled build (``setup.py``) needs mypy
and every runtime dependency it imports (their type information) in the build
environment. This adds them to the build requirements only then, so that
``DNSPROXY_MYPYC=1 pip install .`` works with pip's build isolation, while the default
pure-Python build needs setuptools alone.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403 (the backend's other hooks, unchanged)

# mypyc's own version: the compiled build was tested with mypy 2.4.
MYPYC_REQUIRES = ["mypy>=2.4", "types-PyYAML"]
# Set while setuptools runs setup.py only to list the build requirements (setup.py reads it).
REQUIREMENTS_ONLY = "DNSPROXY_BUILD_REQUIREMENTS_ONLY"


def _extra() -> list[str]:
    if os.environ.get("DNSPROXY_MYPYC", "").strip().lower() not in ("1", "true", "yes"):
        return []
    project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    return [*MYPYC_REQUIRES, *project["project"]["dependencies"]]


@contextlib.contextmanager
def _listing_requirements() -> Iterator[None]:
    """setuptools runs setup.py to list the build requirements, before they are installed:
    this tells setup.py not to import mypyc yet (``REQUIREMENTS_ONLY``)."""
    os.environ[REQUIREMENTS_ONLY] = "1"
    try:
        yield
    finally:
        del os.environ[REQUIREMENTS_ONLY]


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    with _listing_requirements():
        return [*_setuptools.get_requires_for_build_wheel(config_settings), *_extra()]


def get_requires_for_build_editable(config_settings: dict[str, Any] | None = None) -> list[str]:
    with _listing_requirements():
        return [*_setuptools.get_requires_for_build_editable(config_settings), *_extra()]
