"""What opening an upstream connection costs: TCP, a full TLS handshake, a resumed one.

    .venv/bin/python -m benchmarks.handshake [--connections N]

Starts Unbound on loopback (pinned to CPU 1) answering one local name over TCP and over
TLS (a self-signed ECDSA P-256 certificate made with ``openssl``), then, pinned to CPU 0,
opens N connections one after the other, each carrying one query, the way dnsproxy's pool
opens them: ``loop.create_connection`` with the client context of :mod:`dnsproxy.tls`
(certificate and name checked), :func:`dnsproxy.tls.quick_ack` after the first write
(once more without it, to show why), and for "resumed" the previous connection's session
(what :class:`dnsproxy.tls.ClientContext` does for the pool). Then the same number of
queries on one kept connection, TCP and TLS. For the stock asyncio loop and uvloop, it
prints the
median wall time per connection and the client's CPU time per connection (the process's
user + system time, so Unbound's work is not in it), as Markdown. Nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

from benchmarks.procs import HOST, Procs, free_port, wait_answering, which
from benchmarks.systems import TLS_NAME, make_certificate
from dnsproxy.config_types import TlsConfig
from dnsproxy.tls import client_context, quick_ack

NAME = "hs.bench.test"
# A query for NAME, A, ID 0x1234, RD, length-prefixed as on a stream.
_QNAME = b"".join(bytes([len(p)]) + p.encode() for p in NAME.split(".")) + b"\x00"
_QUERY = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + _QNAME + b"\x00\x01\x00\x01"
FRAME = struct.pack(">H", len(_QUERY)) + _QUERY


class _OneReply(asyncio.Protocol):
    """Collects length-prefixed replies; ``done`` resolves at each complete one."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buf = b""
        self.done: asyncio.Future[None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) >= 2 and len(self.buf) >= 2 + struct.unpack(">H", self.buf[:2])[0]:
            self.buf = b""
            if not self.done.done():
                self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"closed: {exc!r}"))


async def _measure(
    mode: str, port: int, tls_port: int, cert: Path, n: int, acks: bool = True
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    context = client_context(TlsConfig(server_name=TLS_NAME, ca_file=str(cert)))
    walls: list[float] = []
    resumed = 0
    cpu0 = time.process_time()
    if mode.startswith("kept"):
        proto = _OneReply(loop)
        if mode == "kept-tcp":
            transport, _ = await loop.create_connection(lambda: proto, HOST, port)
        else:
            transport, _ = await loop.create_connection(
                lambda: proto, HOST, tls_port, ssl=context, server_hostname=TLS_NAME
            )
        cpu0 = time.process_time()  # the queries only, not the connection
        for _ in range(n):
            proto.done = loop.create_future()
            start = time.perf_counter()
            transport.write(FRAME)
            await proto.done
            walls.append(time.perf_counter() - start)
        transport.close()
    for _ in range(0 if mode.startswith("kept") else n):
        proto = _OneReply(loop)
        start = time.perf_counter()
        if mode == "tcp":
            transport, _ = await loop.create_connection(lambda: proto, HOST, port)  # noqa: B023
        else:
            transport, _ = await loop.create_connection(
                lambda: proto,  # noqa: B023
                HOST,
                tls_port,
                ssl=context,
                server_hostname=TLS_NAME,
            )
        transport.write(FRAME)
        if mode != "tcp" and acks:
            quick_ack(transport)  # as dnsproxy's pool does after its first write
        await proto.done
        walls.append(time.perf_counter() - start)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            resumed += ssl_object.session_reused
            if mode == "tls-resumed":
                context.session = ssl_object.session
        transport.close()
        await asyncio.sleep(0)
    cpu = time.process_time() - cpu0
    return {
        "wall_ms": statistics.median(walls) * 1e3,
        "cpu_ms": cpu / n * 1e3,
        "resumed": resumed,
    }


def _unbound_conf(directory: Path, port: int, tls_port: int, cert: Path, key: Path) -> Path:
    conf = directory / "unbound.conf"
    conf.write_text(
        "\n".join(
            [
                "server:",
                "  do-daemonize: no",
                '  username: ""',
                '  chroot: ""',
                f'  directory: "{directory}"',
                '  pidfile: ""',
                "  use-syslog: no",
                '  logfile: ""',
                "  verbosity: 0",
                "  num-threads: 1",
                f"  interface: {HOST}@{port}",
                f"  interface: {HOST}@{tls_port}",
                f"  port: {port}",
                f"  tls-port: {tls_port}",
                f'  tls-service-key: "{key}"',
                f'  tls-service-pem: "{cert}"',
                "  do-ip6: no",
                '  local-zone: "." refuse',
                f'  local-zone: "{NAME}." static',
                f'  local-data: "{NAME}. 3600 IN A 169.254.1.1"',
                "",
            ]
        )
    )
    return conf


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.handshake", description=__doc__)
    p.add_argument("--connections", type=int, default=2000, help="per loop and mode")
    args = p.parse_args(argv)
    unbound = which("unbound")
    if unbound is None or which("openssl") is None:
        print("needs unbound and openssl (apt-get install unbound openssl)", file=sys.stderr)
        return 2
    pinned = (os.cpu_count() or 1) >= 2
    with tempfile.TemporaryDirectory(prefix="dnsproxy-hs-") as tmp, Procs() as procs:
        directory = Path(tmp)
        made = make_certificate(directory)
        assert made is not None
        cert, key = made
        port, tls_port = free_port(), free_port()
        log = directory / "unbound.log"
        proc = procs.start(
            [unbound, "-d", "-c", str(_unbound_conf(directory, port, tls_port, cert, key))],
            log,
            cpu=1 if pinned else None,
        )
        wait_answering(port, NAME, proc, 30.0, "unbound", log)
        if pinned:
            os.sched_setaffinity(0, {0})
        loops: dict[str, Callable[[Coroutine[Any, Any, dict[str, Any]]], dict[str, Any]]] = {
            "asyncio": asyncio.run,
            "uvloop": uvloop.run,
        }
        modes = [
            ("tcp", True, "new TCP connection + query"),
            ("tls-full", False, "new TLS connection, full handshake + query, no quick ACK"),
            ("tls-full", True, "new TLS connection, full handshake + query"),
            ("tls-resumed", True, "new TLS connection, resumed session + query"),
            ("kept-tcp", True, "query on a kept TCP connection"),
            ("kept-tls", True, "query on a kept TLS connection"),
        ]
        print(f"{args.connections} connections (or queries) each, medians; client on CPU 0\n")
        print("| loop | what | wall ms | client CPU ms | resumed |")
        print("|---|---|---|---|---|")
        for loop_name, run in loops.items():
            for mode, acks, what in modes:
                r = run(_measure(mode, port, tls_port, cert, args.connections, acks))
                print(
                    f"| {loop_name} | {what} | {r['wall_ms']:.3f} | {r['cpu_ms']:.3f} "
                    f"| {r['resumed']} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
