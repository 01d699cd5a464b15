"""Shared fixtures: a dnsproxy App in-process on loopback port 0, in front of a fake upstream.

Also the helpers more than one test module uses: ``python -m dnsproxy`` run to completion,
and the check that a shipped YAML file comments every key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop
from fakeupstream import FakeUpstream, Handler, zone_handler

from dnsproxy.app import App
from dnsproxy.config import (
    CachePolicy,
    Config,
    HostPort,
    ServerLimits,
    UpstreamConfig,
    ZoneConfig,
)

ROOT = Path(__file__).resolve().parent.parent


def _stale_compiled_modules() -> list[str]:
    """Compiled modules left in the checkout (``make compiled``) that are older than a
    source: Python would import them and test code that no longer exists."""
    built = sorted((ROOT / "dnsproxy").glob("*.so"))
    if not built:
        return []
    oldest = min(p.stat().st_mtime for p in built)
    return [p.name for p in sorted((ROOT / "dnsproxy").glob("*.py")) if p.stat().st_mtime > oldest]


if _stale_compiled_modules():
    pytest.exit(
        "dnsproxy/*.so (the compiled build) is older than "
        f"{', '.join(_stale_compiled_modules())}: run `make compiled` to rebuild it, or "
        "`make pure` to remove it (`make test` does one or the other)",
        returncode=2,
    )

RECORDS: dict[tuple[str, str], list[str]] = {
    ("www.example.", "A"): ["169.254.1.1"],
    ("www.example.", "AAAA"): ["2001:db8::1"],
    ("example.", "MX"): ["10 mail.example."],
    ("example.", "TXT"): ['"v=spf1 -all"', '"hello world"'],
    ("_http._tcp.example.", "SRV"): ["0 5 80 www.example."],
    ("1.1.254.169.in-addr.arpa.", "PTR"): ["www.example."],
    ("alias.example.", "CNAME"): ["www.example."],
    ("big.example.", "A"): [f"169.254.2.{i}" for i in range(1, 61)],
    ("mail.example.", "A"): ["169.254.1.2"],
}


def make_config(
    upstream_port: int,
    *,
    transport: str = "tcp",
    cache: CachePolicy | None = None,
    deadline_s: float = 2.0,
    try_timeout_s: float = 1.0,
    extra_upstreams: tuple[UpstreamConfig, ...] = (),
    limits: ServerLimits | None = None,
    http: bool = False,
    **overrides: Any,
) -> Config:
    policy = cache or CachePolicy()
    zone = ZoneConfig(
        zone=".",
        upstreams=(UpstreamConfig(transport, "127.0.0.1", upstream_port), *extra_upstreams),  # type: ignore[arg-type]
        try_timeout_s=try_timeout_s,
        deadline_s=deadline_s,
        cache=policy,
    )
    config = Config(
        listen=(HostPort("127.0.0.1", 0),),
        zones=(zone,),
        http_listen=HostPort("127.0.0.1", 0) if http else None,
        cache=policy,
        limits=limits or ServerLimits(),
        # The loop probe would be one more query at the fake upstream; tests/test_loop.py
        # checks it.
        loop_check=False,
    )
    return dataclasses.replace(config, **overrides)


@asynccontextmanager
async def running(config: Config) -> AsyncIterator[App]:
    app = App(config)
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


@asynccontextmanager
async def proxy_with(
    handler: Handler | None = None, **config_args: Any
) -> AsyncIterator[tuple[App, FakeUpstream]]:
    """A fake upstream serving ``handler`` (default: the RECORDS zone) and a proxy before it."""
    async with FakeUpstream(handler or zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, **config_args)
        async with running(config) as app:
            yield app, fake


async def wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    """Poll ``condition`` every 10 ms for up to ``timeout_s``; its last value."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def dnsproxy_cmd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m dnsproxy ARGS`` run to completion from the repository root, no stdin."""
    return subprocess.run(
        [sys.executable, "-m", "dnsproxy", *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; safe to repeat."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout_s)


def undocumented_keys(yaml_file: Path) -> list[str]:
    """The key lines of ``yaml_file`` with no comment on the line right above them."""
    lines = yaml_file.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if re.match(r"\s*(- )?[a-z_]+:", line):
            before = lines[i - 1].strip() if i else ""
            if not before.startswith(("#", "- #")):
                undocumented.append(line.strip())
    return undocumented


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on the stock loop and on uvloop (the production default)."""
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def records() -> dict[tuple[str, str], list[str]]:
    return RECORDS
