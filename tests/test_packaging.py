"""What a pip user gets: the license, one version everywhere, the shipped configs in the wheel."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT, dnsproxy_cmd, proxy_with

import dnsproxy
from dnsproxy.cli import SHIPPED

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CONFIG = ROOT / "config"


def test_license_file_is_the_license_pyproject_names() -> None:
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, appendix included


def test_version_is_written_once_and_agrees_everywhere() -> None:
    assert PYPROJECT["project"]["dynamic"] == ["version"]
    assert "version" not in PYPROJECT["project"]
    installed = importlib.metadata.version("dnsproxy")
    # A mismatch means the installed metadata is stale: `make venv` reinstalls.
    assert installed == dnsproxy.__version__
    result = dnsproxy_cmd("--version")
    assert result.stdout == f"dnsproxy {installed}\n"


async def test_build_info_metric_shows_the_package_version() -> None:
    async with proxy_with(http=True) as (app, _fake):
        assert app.http is not None
        url = f"http://127.0.0.1:{app.http.port}/metrics"

        def fetch() -> str:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())

        text = await asyncio.to_thread(fetch)
    [line] = [x for x in text.splitlines() if x.startswith("dnsproxy_build_info{")]
    version = re.search(r'version="([^"]*)"', line)
    assert version is not None
    assert version[1] == importlib.metadata.version("dnsproxy")
    compiled = re.search(r'compiled="([^"]*)"', line)
    assert compiled is not None
    assert compiled[1] == dnsproxy.compiled()
    # `make test` says which build it asked for; the label must name that one, so a
    # compiled run cannot pass on pure-Python modules (or the reverse).
    expected = os.environ.get("DNSPROXY_EXPECT_BUILD")
    if expected:
        assert compiled[1] == expected


@pytest.mark.parametrize(("name", "file"), sorted(SHIPPED.items()))
def test_print_config_prints_the_shipped_file(name: str, file: str) -> None:
    result = dnsproxy_cmd("print-config", name)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (CONFIG / file).read_text()
    where = dnsproxy_cmd("print-config", "--path", name)
    assert Path(where.stdout.strip()).read_text() == (CONFIG / file).read_text()


def test_print_config_default_and_unknown_names() -> None:
    assert dnsproxy_cmd("print-config").stdout == (CONFIG / "dnsproxy.yaml").read_text()
    bad = dnsproxy_cmd("print-config", "corefile")
    assert bad.returncode == 2
    assert "invalid choice" in bad.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a copy of the sources (so no build files land in the tree)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "setup.py", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(CONFIG, src / "config")
    shutil.copytree(ROOT / "build_support", src / "build_support")
    # The pure-Python wheel, whichever build the checkout has in place.
    ignore = shutil.ignore_patterns("__pycache__", "*.so")
    shutil.copytree(ROOT / "dnsproxy", src / "dnsproxy", symlinks=True, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the test extra installs setuptools, so no network is needed.
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*build, "--quiet", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "DNSPROXY_MYPYC": "0"},
    )
    assert result.returncode == 0, result.stderr
    [built] = out.glob("dnsproxy-*.whl")
    return built


def test_wheel_without_the_option_is_pure_python(wheel: Path) -> None:
    # What `pip install` gives where no compiler is: one wheel for every platform.
    assert wheel.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert not [n for n in names if n.endswith(".so")]
    assert {f"dnsproxy/{m}.py" for m in dnsproxy.NATIVE_MODULES} <= set(names)


def test_wheel_carries_the_configs_license_and_version(wheel: Path) -> None:
    version = dnsproxy.__version__
    assert wheel.name.startswith(f"dnsproxy-{version}-")
    with zipfile.ZipFile(wheel) as z:
        for file in SHIPPED.values():
            assert z.read(f"dnsproxy/data/{file}") == (CONFIG / file).read_bytes()
        info = f"dnsproxy-{version}.dist-info"
        assert z.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        metadata = z.read(f"{info}/METADATA").decode()
    assert f"\nVersion: {version}\n" in metadata
    assert "\nLicense-Expression: Apache-2.0\n" in metadata


def test_installed_wheel_prints_its_configs(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    subprocess.run([*install, "--target", str(target), str(wheel)], check=True, capture_output=True)
    # From another directory, with the installed copy first on the path: the checkout's
    # dnsproxy/ must not be the one imported.
    result = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "print-config", "--path", "nodelocal"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    path = Path(result.stdout.strip())
    assert path.is_relative_to(target)
    assert path.read_text() == (CONFIG / "nodelocal.yaml").read_text()


def test_compiled_build_check_says_what_is_missing(tmp_path: Path) -> None:
    # What `make test` prints when it skips the compiled build (an error under CI=true).
    check = [sys.executable, str(ROOT / "build_support" / "compiler.py")]
    no_tools = subprocess.run(
        check, capture_output=True, text=True, timeout=30, check=False, env={"PATH": str(tmp_path)}
    )
    assert no_tools.returncode == 1
    assert no_tools.stdout.startswith("no C compiler (")
    assert "apt-get install gcc" in no_tools.stdout
    here = subprocess.run(check, capture_output=True, text=True, timeout=30, check=False)
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed here (CI installs it)")
    assert (here.returncode, here.stdout) == (0, ""), here.stdout
