"""A steady UDP query load that accounts for every query: answered or not, and how fast.

dnsperf reports totals; a restart needs more: which queries went unanswered, when, and the
longest stretch without any answer. :class:`UdpLoad` sends at a fixed rate from several
sockets (each with its own 16-bit ID space, so IDs never repeat within a run of up to
65,536 queries per socket), one thread sending on schedule, one receiving, and keeps the
send and answer time of each query. Bounded: the run ends after ``duration_s`` and the
stragglers get ``timeout_s`` more; nothing is sent anywhere but the target address.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

_ID = struct.Struct("!H")
SLOW_S = 0.1  # an answer slower than this counts as slow


def make_query(name: str, qtype: int = 1) -> bytes:
    """A query for ``name`` (RD set, no EDNS) with ID 0, to be stamped per send."""
    wire = b"".join(bytes([len(label)]) + label.encode() for label in name.strip(".").split("."))
    return (
        b"\x00\x00\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00"
        + wire
        + b"\x00"
        + struct.pack("!HH", qtype, 1)
    )


@dataclass
class LoadResult:
    sent: int = 0
    answered: int = 0  # within timeout_s, with a matching ID
    rcodes: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    answered_sent_at: list[float] = field(default_factory=list)  # from the start, per latency
    unanswered_at: list[float] = field(default_factory=list)  # send times, from the start
    longest_gap_s: float = 0.0  # longest outage (see UdpLoad.join); 0 when none was lost
    gap_at_s: float = 0.0  # when that gap began, from the start

    @property
    def unanswered(self) -> int:
        return self.sent - self.answered

    @property
    def slow(self) -> int:
        return sum(1 for lat in self.latencies_s if lat > SLOW_S)

    def slow_within(self, windows: list[tuple[float, float]]) -> int:
        """Slow answers to queries sent within one of ``windows`` (seconds from the start)."""
        return sum(
            1
            for lat, at in zip(self.latencies_s, self.answered_sent_at, strict=True)
            if lat > SLOW_S and any(lo <= at <= hi for lo, hi in windows)
        )

    def percentile_ms(self, p: float) -> float:
        if not self.latencies_s:
            return 0.0
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    def summary(self) -> str:
        worst = 1000 * max(self.latencies_s, default=0.0)
        return (
            f"{self.sent} sent, {self.answered} answered, {self.unanswered} unanswered, "
            f"{self.slow} slower than {SLOW_S * 1000:.0f} ms; latency p50 "
            f"{self.percentile_ms(50):.2f} ms, p99 {self.percentile_ms(99):.2f} ms, max "
            f"{worst:.1f} ms; longest gap {1000 * self.longest_gap_s:.1f} ms "
            f"(at {self.gap_at_s:.2f} s); rcodes {dict(sorted(self.rcodes.items()))}"
        )


class UdpLoad:
    """``qps`` queries a second for ``duration_s`` to ``host:port``, cycling ``queries``."""

    def __init__(
        self,
        host: str,
        port: int,
        queries: list[bytes],
        qps: float,
        duration_s: float,
        sockets: int = 8,
        timeout_s: float = 2.0,
    ) -> None:
        if not queries:
            raise ValueError("no queries to send")
        self.target = (host, port)
        self.queries = queries
        self.qps = qps
        self.duration_s = duration_s
        self.timeout_s = timeout_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(sockets)]
        for sock in self.socks:
            # Sockets belong to the network namespace of the thread that makes them.
            sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
            sock.setblocking(False)
        total = int(qps * duration_s)
        if total > 65536 * sockets:
            raise ValueError("more queries than IDs: use more sockets")
        self.sent_at = [0.0] * total
        self.answered_at = [0.0] * total
        self.rcode = [-1] * total
        self.start_time = 0.0
        self.sent = 0
        self._done_sending = threading.Event()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, name="load-send", daemon=True),
            threading.Thread(target=self._receive, name="load-receive", daemon=True),
        ]

    def start(self) -> UdpLoad:
        self.start_time = time.monotonic()
        for thread in self._threads:
            thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self.start_time

    def _send(self) -> None:
        socks, queries, n_socks = self.socks, self.queries, len(self.socks)
        total = len(self.sent_at)
        interval = 1.0 / self.qps
        try:
            for i in range(total):
                due = self.start_time + i * interval
                delay = due - time.monotonic()
                if delay > 0.0005:
                    time.sleep(delay)
                if self._stop.is_set():
                    break
                query = queries[i % len(queries)]
                data = _ID.pack((i // n_socks) & 0xFFFF) + query[2:]
                # Recorded before sending: the answer may be read before sendto returns.
                self.sent_at[i] = time.monotonic()
                self.sent = i + 1
                try:
                    socks[i % n_socks].sendto(data, self.target)
                except OSError:
                    pass  # unanswered, and counted as such
        finally:
            self._done_sending.set()

    def _receive(self) -> None:
        selector = selectors.DefaultSelector()
        for index, sock in enumerate(self.socks):
            selector.register(sock, selectors.EVENT_READ, index)
        n_socks = len(self.socks)
        deadline: float | None = None
        while not self._stop.is_set():
            if deadline is None and self._done_sending.is_set():
                deadline = time.monotonic() + self.timeout_s
            if deadline is not None and time.monotonic() > deadline:
                break
            for key, _ in selector.select(0.05):
                sock = self.socks[key.data]
                while True:
                    try:
                        data = sock.recv(4096)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        continue
                    now = time.monotonic()
                    if len(data) < 12 or not data[2] & 0x80:
                        continue
                    qid = _ID.unpack_from(data)[0]
                    # The most recent send with this ID from this socket.
                    base = qid * n_socks + key.data
                    wrap = 65536 * n_socks
                    i = base + ((self.sent - 1 - base) // wrap) * wrap if self.sent > base else base
                    if (
                        0 <= i < self.sent
                        and not self.answered_at[i]
                        and now - self.sent_at[i] <= self.timeout_s
                    ):
                        self.answered_at[i] = now
                        self.rcode[i] = data[3] & 0x0F
        selector.close()

    def stop(self) -> None:
        """End early (for clean-up on a failure)."""
        self._stop.set()

    def join(self) -> LoadResult:
        """Wait for the run and its stragglers; the figures."""
        for thread in self._threads:
            thread.join(self.duration_s + self.timeout_s + 30)
        for sock in self.socks:
            sock.close()
        result = LoadResult(sent=self.sent)
        for i in range(self.sent):
            if self.answered_at[i]:
                result.answered += 1
                result.rcodes[self.rcode[i]] += 1
                result.latencies_s.append(self.answered_at[i] - self.sent_at[i])
                result.answered_sent_at.append(self.sent_at[i] - self.start_time)
            else:
                result.unanswered_at.append(self.sent_at[i] - self.start_time)
        # The longest outage: a run of unanswered queries lasts from the send of the last
        # answered query before it to the send of the first answered one after it (to
        # the end of the run plus the timeout if none is). Pauses of the sender, and
        # slow answers, are not outages (the latencies show those).
        last_ok = self.sent_at[0] if self.sent else 0.0
        lost = False
        for i in range(self.sent):
            if not self.answered_at[i]:
                lost = True
                continue
            if lost and self.sent_at[i] - last_ok > result.longest_gap_s:
                result.longest_gap_s = self.sent_at[i] - last_ok
                result.gap_at_s = last_ok - self.start_time
            last_ok, lost = self.sent_at[i], False
        if lost:
            span = self.sent_at[self.sent - 1] - last_ok + self.timeout_s
            if span > result.longest_gap_s:
                result.longest_gap_s, result.gap_at_s = span, last_ok - self.start_time
        return result
