"""dnsproxy as a user runs it: a real process, its flags, signals, logs and exit codes.

Each test starts ``python -m dnsproxy`` with ``subprocess.Popen`` on free loopback ports,
sends DNS with dnspython to it and reads its HTTP endpoint, stderr and exit status. The
upstream is always on 127.0.0.1: a :class:`FakeUpstream` in the test's event loop, or a free
port nobody listens on when the test sends no query.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import dnsproxy_cmd
from fakeupstream import Delay, FakeUpstream, zone_handler

import dnsproxy

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 10.0

_serial = itertools.count()

RECORDS: dict[tuple[str, str], list[str]] = {
    ("www.example.", "A"): ["169.254.1.1"],
    ("www.example.", "AAAA"): ["2001:db8::1"],
}


# -- helpers shared with test_real.py


def free_port(host: str = HOST) -> int:
    """A port free for both UDP and TCP on ``host`` right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no port free for both UDP and TCP on {host}")


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """Status and body of a GET; HTTP errors are results, connection errors raise."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric_value(text: str, sample: str) -> float:
    """The value of one sample line (``name`` or ``name{labels}``) of a Prometheus page."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == sample:
            return float(value)
    raise AssertionError(f"{sample} not in /metrics")


class DnsProxyProcess:
    """``python -m dnsproxy`` on free loopback ports; stderr goes to a file for inspection."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        loop: str | None = None,
        port: int | None = None,
        http_port: int | None = None,
    ) -> None:
        # Given ports: a successor of a running instance, which takes over its sockets.
        self.port = port or free_port()
        self.http_port = http_port or free_port()
        cmd = [
            *(sys.executable, "-m", "dnsproxy", "--log-level", "info"),
            *("--listen", f"{HOST}:{self.port}", "--http-listen", f"{HOST}:{self.http_port}"),
            *args,
        ]
        env = dict(os.environ)
        if loop is not None:
            env["DNSPROXY_LOOP"] = loop
        self.stderr_path = tmp_path / f"dnsproxy-{self.port}-{next(_serial)}.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
        )

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def is_ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"dnsproxy exited with {self.proc.returncode} before it was ready:\n{self.stderr}"
            )
        try:
            return http_get(self.url + "/ready", timeout=0.5)[0] == 200
        except OSError:
            return False

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.is_ready():
                return
            time.sleep(0.02)
        raise AssertionError(f"dnsproxy not ready after {START_TIMEOUT_S}s:\n{self.stderr}")

    async def await_ready(self) -> None:
        """:meth:`wait_ready` that leaves the event loop (and a fake upstream in it) running."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if await asyncio.to_thread(self.is_ready):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"dnsproxy not ready after {START_TIMEOUT_S}s:\n{self.stderr}")

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        return self.proc.wait(timeout=timeout)

    async def await_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"dnsproxy still running {timeout}s after the signal")
            await asyncio.sleep(0.02)
        return self.proc.returncode

    def close(self) -> None:
        """Stop the process if it still runs: SIGTERM, then SIGKILL. Always safe to call."""
        try:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=EXIT_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=EXIT_TIMEOUT_S)
        finally:
            self._stderr.close()


@contextlib.contextmanager
def dnsproxy_process(
    tmp_path: Path, *args: str, loop: str | None = None
) -> Iterator[DnsProxyProcess]:
    """A started and ready dnsproxy, stopped on the way out also when the test fails."""
    proxy = DnsProxyProcess(tmp_path, *args, loop=loop)
    try:
        proxy.wait_ready()
        yield proxy
    finally:
        proxy.close()


@contextlib.asynccontextmanager
async def async_dnsproxy_process(
    tmp_path: Path, *args: str, loop: str | None = None
) -> AsyncIterator[DnsProxyProcess]:
    """:func:`dnsproxy_process` for async tests: the event loop keeps running meanwhile."""
    proxy = DnsProxyProcess(tmp_path, *args, loop=loop)
    try:
        await proxy.await_ready()
        yield proxy
    finally:
        await asyncio.to_thread(proxy.close)


# -- helpers for this file


def running_loop_name() -> str:
    """The loop the test runs on, so the process under test runs on the same kind."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


async def ask(
    port: int, name: str, rdtype: str = "A", proto: str = "udp", timeout: float = 5.0
) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if proto == "tcp":
        return await dns.asyncquery.tcp(query, HOST, port=port, timeout=timeout)
    return await dns.asyncquery.udp(query, HOST, port=port, timeout=timeout)


def answers(response: dns.message.Message) -> list[str]:
    return sorted(rd.to_text() for rrset in response.answer for rd in rrset)


def client_queries(fake: FakeUpstream) -> list[dns.message.Message]:
    """The queries ``fake`` received, without the loop probe dnsproxy sends at start."""
    return [q for _, q in fake.queries if q.question[0].rdtype != dns.rdatatype.HINFO]


# -- version


def test_version_from_python_module() -> None:
    result = dnsproxy_cmd("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"dnsproxy {dnsproxy.__version__}\n"


def test_version_from_console_script() -> None:
    script = Path(sys.executable).with_name("dnsproxy")
    if not script.exists():
        found = shutil.which("dnsproxy")
        if found is None:
            pytest.skip("console script 'dnsproxy' not installed (pip install -e .)")
        script = Path(found)
    result = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"dnsproxy {dnsproxy.__version__}\n"


# -- serving


async def test_answers_queries_and_serves_health_ready_metrics(tmp_path: Path) -> None:
    loop = running_loop_name()
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        upstream = f"tcp://{HOST}:{fake.port}"
        async with async_dnsproxy_process(tmp_path, "--upstream", upstream, loop=loop) as proxy:
            udp = await ask(proxy.port, "www.example.", "A")
            tcp = await ask(proxy.port, "www.example.", "AAAA", proto="tcp")
            missing = await ask(proxy.port, "nothere.example.")
            ready = await asyncio.to_thread(http_get, proxy.url + "/ready")
            health = await asyncio.to_thread(http_get, proxy.url + "/health")
            status, metrics = await asyncio.to_thread(http_get, proxy.url + "/metrics")

    assert answers(udp) == ["169.254.1.1"]
    assert answers(tcp) == ["2001:db8::1"]
    assert missing.rcode() == dns.rcode.NXDOMAIN
    assert ready == (200, "ready\n")
    assert health == (200, "ok\n")
    assert status == 200
    build_info = (
        f'dnsproxy_build_info{{compiled="{dnsproxy.compiled()}",loop="{loop}",'
        f'python="{".".join(map(str, sys.version_info[:3]))}",version="{dnsproxy.__version__}"}}'
    )
    assert metric_value(metrics, build_info) == 1.0
    assert metric_value(metrics, 'dnsproxy_requests_total{proto="udp"}') == 2.0
    assert metric_value(metrics, 'dnsproxy_requests_total{proto="tcp"}') == 1.0
    # The three queries, and the loop probe sent at start.
    assert metric_value(metrics, f'dnsproxy_upstream_queries_total{{upstream="{upstream}"}}') == 4
    assert [q.question[0].rdtype for _, q in fake.queries].count(dns.rdatatype.HINFO) == 1
    # The default transport towards the upstream is TCP, whatever the client used.
    assert [transport for transport, _ in fake.queries] == ["tcp"] * 4


@pytest.mark.parametrize("proto", ["udp", "tcp"])
async def test_sigterm_finishes_inflight_query_then_exits_0(tmp_path: Path, proto: str) -> None:
    async with FakeUpstream() as fake:
        answer = zone_handler(RECORDS)
        fake.handler = lambda query, transport: Delay(1.0, answer(query, transport))
        # The default try timeout is 1 s: give the slow upstream room for one try.
        config = tmp_path / "slow-upstream.yaml"
        config.write_text(
            "zones:\n"
            "  - zone: .\n"
            f'    upstreams: ["tcp://{HOST}:{fake.port}"]\n'
            "    try_timeout_s: 3\n"
            "    deadline_s: 3\n"
            "shutdown:\n"
            "  grace_s: 5\n"
        )
        async with async_dnsproxy_process(
            tmp_path, "--config", str(config), loop=running_loop_name()
        ) as proxy:
            pending = asyncio.create_task(ask(proxy.port, "www.example.", proto=proto))
            for _ in range(250):  # until the proxy has forwarded it: at most 5 s
                if client_queries(fake) or pending.done():
                    break
                await asyncio.sleep(0.02)
            assert client_queries(fake), "the query never reached the upstream"
            signalled = time.monotonic()
            proxy.proc.send_signal(signal.SIGTERM)

            # While it drains: not ready, and no new connections taken.
            not_ready = refused = False
            for _ in range(100):  # at most ~2 s; the drain lasts ~1 s
                if proxy.proc.poll() is not None or pending.done():
                    break
                with contextlib.suppress(OSError):
                    not_ready = not_ready or (
                        await asyncio.to_thread(http_get, proxy.url + "/ready", 0.5)
                    ) == (503, "not ready\n")
                if not_ready and not refused:
                    try:
                        _, writer = await asyncio.open_connection(HOST, proxy.port)
                        writer.close()
                    except ConnectionRefusedError:
                        refused = True
                if not_ready and refused:
                    break
                await asyncio.sleep(0.02)

            response = await asyncio.wait_for(pending, timeout=5)
            code = await proxy.await_exit()
            elapsed = time.monotonic() - signalled

    assert answers(response) == ["169.254.1.1"], "the in-flight query lost its answer"
    assert len(client_queries(fake)) == 1
    assert code == 0, proxy.stderr
    assert elapsed < 5.0  # the 1 s delay plus shutdown, well under the 5 s grace
    assert not_ready, "/ready did not turn 503 during the shutdown"
    assert refused, "new TCP connections still accepted during the shutdown"
    log = proxy.stderr
    assert "signal received, shutting down" in log
    assert "stopped" in log.splitlines()[-1]
    assert "Traceback" not in log


def test_sigint_exits_0(tmp_path: Path) -> None:
    # Nothing listens on the upstream port, and no query is sent: no traffic at all.
    with dnsproxy_process(tmp_path, "--upstream", f"tcp://{HOST}:{free_port()}") as proxy:
        proxy.proc.send_signal(signal.SIGINT)
        code = proxy.wait_exit()
        log = proxy.stderr
    assert code == 0, log
    assert "signal received, shutting down" in log
    assert "KeyboardInterrupt" not in log
    assert "Traceback" not in log


def test_json_log_format(tmp_path: Path) -> None:
    upstream = f"tcp://{HOST}:{free_port()}"
    with dnsproxy_process(tmp_path, "--upstream", upstream, "--log-format", "json") as proxy:
        proxy.proc.send_signal(signal.SIGTERM)
        assert proxy.wait_exit() == 0
        lines = proxy.stderr.splitlines()
    assert lines
    records = [json.loads(line) for line in lines]
    for record in records:
        assert {"level", "msg"} <= record.keys(), record
        assert record["level"] in {"debug", "info", "warning", "error"}
    messages = [record["msg"] for record in records]
    assert any(msg.startswith(f"listening on {HOST}:{proxy.port}") for msg in messages), messages
    assert any("ready" in msg for msg in messages), messages
    assert "signal received, shutting down" in messages


# -- start-up failures


def test_bad_config_key_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(
        f'listen: ["{HOST}:{free_port()}"]\n'
        "cache:\n"
        "  max_tll_s: 60\n"
        "zones:\n"
        "  - zone: .\n"
        f'    upstreams: ["{HOST}:{free_port()}"]\n'
    )
    result = dnsproxy_cmd("--config", str(config), "--http-listen", "none")
    assert result.returncode == 2
    assert "cache.max_tll_s" in result.stderr
    assert "unknown key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("taken", ["udp", "tcp", "http"])
def test_address_in_use_exits_nonzero_with_a_clear_message(tmp_path: Path, taken: str) -> None:
    port = free_port()
    kind = socket.SOCK_DGRAM if taken == "udp" else socket.SOCK_STREAM
    with socket.socket(socket.AF_INET, kind) as holder:
        holder.bind((HOST, port))
        if kind == socket.SOCK_STREAM:
            holder.listen()
        dns_port = port if taken != "http" else free_port()
        http_port = port if taken == "http" else free_port()
        result = dnsproxy_cmd(
            "--listen",
            f"{HOST}:{dns_port}",
            "--http-listen",
            f"{HOST}:{http_port}",
            "--upstream",
            f"tcp://{HOST}:{free_port()}",
        )
    assert result.returncode not in (0, None)
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot start" in last, result.stderr
    assert "in use" in last, result.stderr
    # With several listen addresses and the HTTP one, the user must be told which is taken.
    assert f"{HOST}:{port}" in last or f"'{HOST}', {port}" in last, (
        f"the {taken} address {HOST}:{port} is not named: {last!r}"
    )


# -- the shipped configuration


async def test_shipped_config_with_flag_overrides(tmp_path: Path) -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        upstream = f"tcp://{HOST}:{fake.port}"
        async with async_dnsproxy_process(
            tmp_path,
            "--config",
            str(ROOT / "config" / "dnsproxy.yaml"),
            "--upstream",
            upstream,
            loop=running_loop_name(),
        ) as proxy:
            response = await ask(proxy.port, "www.example.")
            _, metrics = await asyncio.to_thread(http_get, proxy.url + "/metrics")
    assert answers(response) == ["169.254.1.1"]
    assert [transport for transport, _ in fake.queries] == ["tcp"] * 2  # and the loop probe
    # --upstream replaced the file's resolv.conf upstream: the fake is the only upstream.
    upstream_lines = [
        line for line in metrics.splitlines() if line.startswith("dnsproxy_upstream_queries_total{")
    ]
    assert upstream_lines == [f'dnsproxy_upstream_queries_total{{upstream="{upstream}"}} 2.0']
    # The file's [::1]:5353 listener was replaced by --listen (port 5353 may be anyone's).
    assert f"listening on {HOST}:{proxy.port}" in proxy.stderr
    assert ":5353" not in proxy.stderr
