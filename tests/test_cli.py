"""The command line as a user runs it: check-config, --version, and flag errors."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import dnsproxy_cmd

import dnsproxy
from dnsproxy.cli import main

GOOD = """\
listen: ["127.0.0.1:5353", "[::1]:5353"]
zones:
  - zone: .
    upstreams: ["127.0.0.1:5300"]
  - zone: cluster.local
    upstreams: ["${KUBE_DNS_UPSTREAM_SERVICE_HOST:-169.254.0.10}", "udp://[::1]:5301"]
"""

BAD = """\
listen: ["127.0.0.1"]
cache:
  max_tll_s: 60
zones:
  - zone: .
    upstreams: ["127.0.0.1:70000"]
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_check_config_good_file(tmp_path: Path) -> None:
    path = write(tmp_path, "good.yaml", GOOD)
    result = dnsproxy_cmd("check-config", path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    ok, summary = result.stdout.splitlines()
    assert ok == f"{path}: ok"
    assert "127.0.0.1:5353, [::1]:5353" in summary
    assert ". -> tcp://127.0.0.1:5300" in summary
    assert "cluster.local. -> tcp://169.254.0.10:53 udp://[::1]:5301" in summary
    assert summary.endswith("; workers: 1")


def test_check_config_bad_file_lists_every_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    result = dnsproxy_cmd("check-config", path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f"{path}: listen[0]: '127.0.0.1' needs a port (ADDR:PORT)",
        f"{path}: cache.max_tll_s: unknown key (did you mean 'max_ttl_s'?)",
        f"{path}: zones[0].upstreams[0]: port 70000 out of range (1-65535)",
    ]


def test_check_config_reads_the_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "env.yaml",
        "zones:\n  - zone: .\n    upstreams: ['${KUBE_DNS_UPSTREAM_SERVICE_HOST}:5300']\n",
    )
    env = {k: v for k, v in os.environ.items() if k != "KUBE_DNS_UPSTREAM_SERVICE_HOST"}
    unset = dnsproxy_cmd("check-config", path, env=env)
    assert unset.returncode == 2
    assert unset.stderr.strip() == (
        f"{path}: zones[0].upstreams[0]: "
        "environment variable KUBE_DNS_UPSTREAM_SERVICE_HOST is not set"
    )
    env["KUBE_DNS_UPSTREAM_SERVICE_HOST"] = "169.254.0.10"
    set_ = dnsproxy_cmd("check-config", path, env=env)
    assert set_.returncode == 0, set_.stderr
    assert "tcp://169.254.0.10:5300" in set_.stdout


def test_check_config_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yaml", "zones:\n  - zone: [.\n")
    result = dnsproxy_cmd("check-config", path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}: invalid YAML at line 3")


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "absent.yaml")
    assert main(["check-config", path]) == 2
    assert capsys.readouterr().err == f"{path}: cannot read: No such file or directory\n"


def test_check_config_needs_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config"]) == 2
    assert "FILE" in capsys.readouterr().err


def test_version() -> None:
    result = dnsproxy_cmd("--version")
    assert result.returncode == 0
    assert result.stdout == "dnsproxy 0.1.0\n"
    assert dnsproxy.__version__ == "0.1.0"


def test_help_returns_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--listen", "--upstream", "--http-listen", "--log-level"):
        assert flag in out
    assert main(["check-config", "--help"]) == 0


def test_unknown_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--listn", "127.0.0.1:53"]) == 2
    assert "unrecognized arguments" in capsys.readouterr().err


def test_bad_flags_exit_2_naming_each_flag(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(
        [
            "--listen",
            "127.0.0.1",
            "--upstream",
            "127.0.0.2:5300",
            "--upstream",
            "cluster.local=kube-dns",
            "--log-format",
            "xml",
        ]
    )
    assert status == 2
    assert capsys.readouterr().err.splitlines() == [
        "--listen[0]: '127.0.0.1' needs a port (ADDR:PORT)",
        "--upstream[1]: 'kube-dns' is a hostname; an IP address is required here",
        "--log-format: must be one of text, json (got 'xml')",
    ]


def test_config_file_errors_are_prefixed_with_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "bad.yaml", BAD)
    # The flag fixes the upstream problem; the other two remain, named by file.
    assert main(["--config", path, "--upstream", "127.0.0.1:5300"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: listen[0]: '127.0.0.1' needs a port (ADDR:PORT)",
        f"{path}: cache.max_tll_s: unknown key (did you mean 'max_ttl_s'?)",
    ]


def test_every_flag_reaches_its_key(capsys: pytest.CaptureFixture[str]) -> None:
    # Each flag given a bad value: each problem names the flag that carried it.
    bad = {
        "--listen": "127.0.0.1",
        "--upstream": "kube-dns",
        "--http-listen": "9253",
        "--health-listen": "9254",
        "--log-level": "loud",
        "--log-format": "xml",
        "--lameduck": "-1",
        "--workers": "two",
        "--local-ip": "bogus",
        "--interface": "a/b",
        "--rules": "ipchains",
        "--sync-interval": "0",
        "--health-port": "http",
    }
    argv = [part for flag, value in bad.items() for part in (flag, value)]
    assert main(argv) == 2
    shown = {line.split(":")[0].split("[")[0] for line in capsys.readouterr().err.splitlines()}
    assert shown == set(bad)
