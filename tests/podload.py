"""A bounded DNS query load from inside a pod's network namespace, by two real clients.

Run as ``ip netns exec POD python podload.py ...`` so that glibc reads the pod's resolv.conf
(``ip netns exec`` bind-mounts ``/etc/netns/POD/resolv.conf``):

- ``glibc``: ``getaddrinfo(NAME)`` in a loop, with the resolv.conf's search list, ``ndots``
  and glibc's own timeout and attempts (5 s and 2 unless the file says otherwise);
- ``dnspython``: an ``A`` query over UDP to ``--server``, 1 s per try, up to 3 tries, as a
  stub resolver would.

A query has failed when the client gave up (or got another address than ``--expect``).
Each client records its failures and the longest time between two answered queries (the
gap a user of that client would see). Both run until ``--stop-file`` appears, or for
``--max-s`` at most, pausing ``--interval-s`` between queries; the counts go to ``--status``
as JSON every 0.1 s and once more at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dns.exception
import dns.message
import dns.query

_TRIES = 3
_TRY_TIMEOUT_S = 1.0
_MAX_ERRORS = 10  # kept per client, for the failure message


@dataclass
class ClientStats:
    ok: int = 0
    failed: int = 0
    longest_gap_s: float = 0.0  # between two answered queries
    slowest_s: float = 0.0  # one query, retries included
    errors: list[str] = field(default_factory=list)
    _last_ok: float | None = None

    def record(self, started: float, error: str | None) -> None:
        now = time.monotonic()
        self.slowest_s = max(self.slowest_s, now - started)
        if error is None:
            if self._last_ok is not None:
                self.longest_gap_s = max(self.longest_gap_s, now - self._last_ok)
            self._last_ok = now
            self.ok += 1
        else:
            self.failed += 1
            if len(self.errors) < _MAX_ERRORS:
                self.errors.append(f"{time.time():.3f} {error}")


def glibc_query(name: str, expect: str) -> str | None:
    try:
        # AF_UNSPEC: A and AAAA from one socket at once, as applications ask.
        infos = socket.getaddrinfo(name, 53, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        return f"getaddrinfo: {exc}"
    found = {str(info[4][0]) for info in infos}
    return None if expect in found else f"getaddrinfo: {sorted(found)}"


def dnspython_query(server: str, name: str, expect: str) -> str | None:
    query = dns.message.make_query(name, "A")
    error = ""
    for _ in range(_TRIES):
        try:
            reply = dns.query.udp(query, server, timeout=_TRY_TIMEOUT_S)
        except (dns.exception.DNSException, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            continue
        if any(rr.to_text() == expect for rrset in reply.answer for rr in rrset):
            return None
        error = f"rcode {reply.rcode()}: {[rrset.to_text() for rrset in reply.answer]}"
    return f"dnspython: {error}"


def loop(
    stats: ClientStats, ask: Callable[[], str | None], stop: threading.Event, interval_s: float
) -> None:
    while not stop.is_set():
        started = time.monotonic()
        stats.record(started, ask())
        stop.wait(interval_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True, help="the pod's nameserver (dnspython)")
    parser.add_argument("--glibc-name", required=True)
    parser.add_argument("--name", required=True, help="the dnspython client's FQDN")
    parser.add_argument("--expect", required=True, help="the address both names resolve to")
    parser.add_argument("--glibc-expect", help="the glibc name's address (default: --expect)")
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--status", type=Path, required=True)
    parser.add_argument("--interval-s", type=float, default=0.01)
    parser.add_argument("--max-s", type=float, default=60.0)
    args = parser.parse_args()

    clients = {"glibc": ClientStats(), "dnspython": ClientStats()}
    glibc_expect = args.glibc_expect or args.expect
    asks: dict[str, Callable[[], str | None]] = {
        "glibc": lambda: glibc_query(args.glibc_name, glibc_expect),
        "dnspython": lambda: dnspython_query(args.server, args.name, args.expect),
    }
    stop = threading.Event()
    threads = [
        threading.Thread(target=loop, args=(clients[n], asks[n], stop, args.interval_s), name=n)
        for n in clients
    ]
    for thread in threads:
        thread.start()

    def write_status(done: bool) -> None:
        doc = {
            "done": done,
            **{
                n: {k: v for k, v in asdict(c).items() if not k.startswith("_")}
                for n, c in clients.items()
            },
        }
        tmp = args.status.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, args.status)

    deadline = time.monotonic() + args.max_s
    while not args.stop_file.exists() and time.monotonic() < deadline:
        write_status(False)
        time.sleep(0.1)
    stop.set()
    for thread in threads:
        # The slowest a query can take: glibc's 2 attempts of 5 s for each of its names.
        thread.join(30.0)
    write_status(True)


if __name__ == "__main__":
    main()
