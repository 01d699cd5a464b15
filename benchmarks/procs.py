"""Processes and probes: start pinned processes in their own groups, kill them all, ask DNS.

Every process the harness starts goes through :class:`Procs`, which puts it in a new
session (so its whole group can be signalled) and kills what is left when the ``with``
block ends, also on an exception or Ctrl-C. DNS probes are plain UDP on 127.0.0.1 with
bounded retries; nothing here talks to any other address.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

HOST = "127.0.0.1"
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
STOP_TIMEOUT_S = 5.0

QTYPES = {"A": 1, "NS": 2, "SOA": 6, "MX": 15, "TXT": 16, "AAAA": 28}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


class HarnessError(RuntimeError):
    """Something the harness itself needs did not work (a tool, a start, a probe)."""


def which(name: str) -> str | None:
    """Path of an executable, looking in the sbin directories too."""
    return shutil.which(name, path=SBIN_PATH)


def free_port() -> int:
    """A loopback port free for both UDP and TCP right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((HOST, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((HOST, port))
                except OSError:
                    continue
                return port
    raise HarnessError("no loopback port free for both UDP and TCP")


def pin(cpu: int | None) -> list[str]:
    """Command prefix that pins a process (and its threads) to one CPU, or none."""
    return [] if cpu is None else ["taskset", "-c", str(cpu)]


class Procs:
    """Owner of every process the harness starts; stops them all on exit."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        argv: Sequence[str],
        log: Path,
        *,
        cpu: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` pinned to ``cpu`` in a new process group; stderr (and stdout
        unless ``stdout`` names another file) go to ``log``."""
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        err = log.open("ab")
        out = stdout.open("wb") if stdout is not None else err
        try:
            proc = subprocess.Popen(
                [*pin(cpu), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=full_env,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            err.close()
            if out is not err:
                out.close()
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> int | None:
        """SIGTERM the process group, SIGKILL it if it lingers; the exit status."""
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
        # Children the leader left behind (dnsmasq forks for TCP clients) go too.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        for proc in list(reversed(self._procs)):
            try:
                self.stop(proc)
            except (OSError, subprocess.SubprocessError):
                pass


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_bounded(
    argv: Sequence[str],
    timeout_s: float,
    *,
    cpu: int | None = None,
    stdout: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a command to completion in its own group, killed if it exceeds ``timeout_s``;
    ``env`` is added to this process's environment."""
    out = stdout.open("wb") if stdout is not None else subprocess.PIPE
    try:
        proc = subprocess.Popen(
            [*pin(cpu), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, **env} if env is not None else None,
        )
        try:
            data, err = proc.communicate(timeout=timeout_s)
        except BaseException:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    finally:
        if stdout is not None and not isinstance(out, int):
            out.close()
    return subprocess.CompletedProcess(proc.args, proc.returncode, data or b"", err or b"")


# -- DNS over UDP, just enough to probe


def build_query(name: str, qtype: str, qid: int) -> bytes:
    """A recursion-desired query for ``name``/``qtype`` with id ``qid``, no EDNS."""
    qname = b"".join(
        bytes([len(label)]) + label.encode("ascii") for label in name.rstrip(".").split(".")
    )
    return (
        struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
        + qname
        + b"\0"
        + struct.pack("!HH", QTYPES[qtype], 1)
    )


def reply_rcode(reply: bytes, qid: int) -> int | None:
    """The rcode of ``reply`` if it is a response to query ``qid``, else None."""
    if len(reply) < 12:
        return None
    rid = int.from_bytes(reply[0:2], "big")
    flags = int.from_bytes(reply[2:4], "big")
    if rid != qid or not flags & 0x8000:
        return None
    return flags & 0x000F


def query(port: int, name: str, qtype: str = "A", timeout_s: float = 1.0) -> int | None:
    """One UDP query to 127.0.0.1:port; the reply's rcode, or None (no answer in time)."""
    qid = secrets.randbelow(65536)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.connect((HOST, port))
            sock.send(build_query(name, qtype, qid))
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                rcode = reply_rcode(sock.recv(4096), qid)
                if rcode is not None:
                    return rcode
        except OSError:
            return None
    return None


def time_to_first_answer(
    port: int,
    name: str,
    start: float,
    proc: subprocess.Popen[bytes],
    timeout_s: float,
    attempt_s: float = 0.005,
) -> float:
    """Seconds from ``start`` (a monotonic time) until 127.0.0.1:port answers ``name``.

    Tight but bounded: one query at a time, each waiting ``attempt_s``; refused sends (no
    socket bound yet) retry after 0.5 ms. Raises HarnessError after ``timeout_s`` or when
    the process exits.
    """
    deadline = start + timeout_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((HOST, port))
        sock.settimeout(attempt_s)
        while True:
            now = time.monotonic()
            if now > deadline:
                raise HarnessError(f"no answer on port {port} within {timeout_s:.0f}s")
            if proc.poll() is not None:
                raise HarnessError(f"exited with status {proc.returncode} before answering")
            qid = secrets.randbelow(65536)
            try:
                sock.send(build_query(name, "A", qid))
                attempt_end = time.monotonic() + attempt_s
                while time.monotonic() < attempt_end:
                    if reply_rcode(sock.recv(4096), qid) is not None:
                        return time.monotonic() - start
            except TimeoutError:
                continue
            except ConnectionRefusedError:
                time.sleep(0.0005)


def wait_answering(
    port: int, name: str, proc: subprocess.Popen[bytes], timeout_s: float, what: str, log: Path
) -> float:
    """Like :func:`time_to_first_answer` from now, with the process log in the error."""
    try:
        return time_to_first_answer(port, name, time.monotonic(), proc, timeout_s, 0.05)
    except HarnessError as e:
        raise HarnessError(f"{what} did not start: {e}\n{log_tail(log, 2000)}") from None


def log_tail(log: Path, chars: int) -> str:
    """The last ``chars`` characters of a process log, or "" if there is none."""
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""


# -- memory


def rss_kib(pid: int) -> int:
    """Resident size in KiB of every process in ``pid``'s process group (VmRSS summed)."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            # Field 5 (pgrp) comes after the parenthesised command name.
            pgrp = int(stat.rsplit(")", 1)[1].split()[2])
            if pgrp != pid:
                continue
            for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return total
