"""A real musl client (the libc of Alpine pods) resolves a large answer through dnsproxy.

musl before 1.2.4 (Alpine 3.17 and older) sends its queries without EDNS and never retries
over TCP: a truncated UDP reply is all it gets, and it uses whatever records that reply
holds. Debian's musl-tools ships musl 1.2.3, which behaves so. A small C program calling
``getaddrinfo`` is built with ``musl-gcc -static`` into the test's temporary directory and
run in a network namespace of this test's own, whose ``resolv.conf``
(``/etc/netns/<ns>/resolv.conf``, bind-mounted by ``ip netns exec``) names dnsproxy.
Unbound stands in for the upstream, holding a name with 40 addresses and refusing every
other name. Everything lives on that namespace's loopback, on 169.254.53.0/24 addresses,
and is removed afterwards, also when the test fails.

Needs root (namespaces), ``ip``, ``musl-gcc`` and ``unbound``; skipped with the reason
otherwise. ``.ci/run`` installs them.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_real import SBIN_PATH, stop, tool, unbound_server_lines

ROOT = Path(__file__).resolve().parent.parent
PROXY_IP, UPSTREAM_IP = "169.254.53.1", "169.254.53.2"
NAME = "many.test"
ADDRESSES = [f"169.254.54.{i}" for i in range(1, 41)]
START_TIMEOUT_S = 15.0

RESOLVE_C = r"""
#include <arpa/inet.h>
#include <netdb.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

/* Print every address getaddrinfo finds for argv[1], one a line, as an application would
   see them; the error text and exit status 2 when it finds none. */
int main(int argc, char **argv) {
    struct addrinfo hints, *res, *p;
    char text[INET6_ADDRSTRLEN];
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(argc > 1 ? argv[1] : "", NULL, &hints, &res);
    if (rc != 0) {
        fprintf(stderr, "%s\n", gai_strerror(rc));
        return 2;
    }
    for (p = res; p; p = p->ai_next) {
        const void *addr = p->ai_family == AF_INET
            ? (const void *)&((struct sockaddr_in *)p->ai_addr)->sin_addr
            : (const void *)&((struct sockaddr_in6 *)p->ai_addr)->sin6_addr;
        printf("%s\n", inet_ntop(p->ai_family, addr, text, sizeof text));
    }
    freeaddrinfo(res);
    return 0;
}
"""

_counter = itertools.count()


def run(argv: list[str], timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": SBIN_PATH, "LC_ALL": "C"}
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def must(argv: list[str]) -> str:
    result = run(argv)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stdout}{result.stderr}"
    return result.stdout


def musl_version() -> tuple[int, int, int]:
    """The version of the installed musl, from its dynamic loader's banner."""
    for loader in sorted(glob.glob("/lib/ld-musl-*.so.1")):
        banner = run([loader]).stderr
        match = re.search(r"Version (\d+)\.(\d+)\.(\d+)", banner)
        if match:
            major, minor, patch = (int(g) for g in match.groups())
            return major, minor, patch
    pytest.skip("musl's version is unknown (no /lib/ld-musl-*.so.1 prints it)")


def build_resolver(musl_gcc: str, directory: Path) -> Path:
    source = directory / "resolve.c"
    binary = directory / "resolve"
    source.write_text(RESOLVE_C)
    must([musl_gcc, "-static", "-O1", "-o", str(binary), str(source)])
    return binary


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    """A fresh network namespace with both addresses on its loopback and a resolv.conf
    naming dnsproxy; removed on the way out, with every process left in it."""
    name = f"dnsp-musl-{os.getpid()}-{next(_counter)}"
    etc = Path("/etc/netns") / name
    etc_existed = etc.parent.exists()
    try:
        must(["ip", "netns", "add", name])
        must(["ip", "-n", name, "link", "set", "lo", "up"])
        for ip in (PROXY_IP, UPSTREAM_IP):
            must(["ip", "-n", name, "addr", "add", f"{ip}/32", "dev", "lo"])
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(f"nameserver {PROXY_IP}\n")
        yield name
    finally:
        for pid in run(["ip", "netns", "pids", name]).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run(["ip", "netns", "delete", name])
        shutil.rmtree(etc, ignore_errors=True)
        if not etc_existed:
            with contextlib.suppress(OSError):
                etc.parent.rmdir()


@contextlib.contextmanager
def process(ns: str, argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` run in namespace ``ns`` with its output in ``log``; stopped on the way out."""
    out = log.open("wb")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, *argv],
        cwd=ROOT,
        env={**os.environ, "PATH": SBIN_PATH},
        stdin=subprocess.DEVNULL,
        stdout=out,
        stderr=out,
    )
    try:
        yield proc
    finally:
        stop(proc, out)


def wait_for_line(proc: subprocess.Popen[bytes], log: Path, pattern: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not re.search(pattern, log.read_text(errors="replace")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"no {pattern!r} (exit {proc.poll()}):\n{log.read_text()}")
        time.sleep(0.05)


def unbound_conf(directory: Path) -> str:
    lines = [
        *unbound_server_lines(directory),
        f"  interface: {UPSTREAM_IP}",
        "  port: 53",
        "  access-control: 169.254.0.0/16 allow",
        "  do-ip6: no",
        '  module-config: "iterator"',
        '  local-zone: "." refuse',  # never recurses: only the zone below exists
        '  local-zone: "test." static',
        "  local-data: 'test. 300 IN SOA ns.test. hostmaster.test. 1 3600 600 86400 60'",
        *(f"  local-data: '{NAME}. 300 IN A {ip}'" for ip in ADDRESSES),
    ]
    return "\n".join(lines) + "\n"


def proxy_conf() -> str:
    return (
        f'listen: ["{PROXY_IP}:53"]\n'
        "http_listen: null\n"
        "acl: {allow: []}\n"
        f'zones: [{{zone: ".", upstreams: ["tcp://{UPSTREAM_IP}:53"]}}]\n'
        "log: {level: info, queries: true}\n"
    )


def test_musl_resolves_a_name_with_40_addresses_through_dnsproxy(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the musl client test needs root (a network namespace)")
    tool("ip", "iproute2")
    musl_gcc = tool("musl-gcc", "musl-tools")
    unbound = tool("unbound", "unbound")
    version = musl_version()
    resolve = build_resolver(musl_gcc, tmp_path)
    (tmp_path / "unbound.conf").write_text(unbound_conf(tmp_path))
    (tmp_path / "dnsproxy.yaml").write_text(proxy_conf())
    upstream_log, proxy_log = tmp_path / "unbound.log", tmp_path / "dnsproxy.log"

    with (
        namespace() as ns,
        process(ns, [unbound, "-d", "-c", str(tmp_path / "unbound.conf")], upstream_log) as up,
    ):
        wait_for_line(up, upstream_log, "start of service")
        argv = [sys.executable, "-m", "dnsproxy", "--config", str(tmp_path / "dnsproxy.yaml")]
        with process(ns, argv, proxy_log) as proxy:
            wait_for_line(proxy, proxy_log, rf"listening on {re.escape(PROXY_IP)}:53")
            result = run(["ip", "netns", "exec", ns, str(resolve), NAME])
            log = proxy_log.read_text(errors="replace")

    assert result.returncode == 0, f"musl: {result.stderr}\ndnsproxy:\n{log}"
    got = result.stdout.split()
    assert got, "no address"
    assert set(got) <= set(ADDRESSES)
    # The query log: one line per query, "proto=udp name=many.test. type=A ...".
    queries = re.findall(rf"proto=(udp|tcp) name={re.escape(NAME)}\. type=(\w+) ", log)
    assert ("udp", "A") in queries, log
    if version < (1, 2, 4):
        # musl 1.2.3 (Debian's): no EDNS, so a 512-byte reply holding 30 of the 40
        # records (12 + 15 bytes of header and question, 16 per record), and no retry
        # over TCP. Before dnsproxy kept whole records it got TC and no record at all,
        # and getaddrinfo said "Name does not resolve".
        assert len(got) == 30, got
        assert not [q for q in queries if q[0] == "tcp"], log
    else:
        # musl 1.2.4 and later retry over TCP and get every address.
        assert sorted(got) == sorted(ADDRESSES)
