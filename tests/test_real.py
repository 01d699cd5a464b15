"""Real components: dig and kdig as clients, Unbound (and dnsmasq) as the upstream.

Unbound serves a static local zone ``test.`` on a free loopback port and refuses every
other name, so nothing here ever recurses to the internet; dnsproxy runs as a process in
front of it. Unbound's own statistics (``unbound-control stats_noreset``) tell which
transport the proxy used towards it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import dns.exception
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from test_process import HOST, DnsProxyProcess, dnsproxy_process, free_port, metric_value

SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
START_TIMEOUT_S = 10.0

BIG = [f"169.254.2.{i}" for i in range(1, 61)]  # 60 A records: about 1 KB, over 512 bytes
SOA = "ns.test. hostmaster.test. 1 3600 600 86400 60"
LOCAL_DATA = [
    f"test. 300 IN SOA {SOA}",
    "www.test. 300 IN A 169.254.1.1",
    "www.test. 300 IN AAAA 2001:db8::1",
    "test. 300 IN MX 10 mail.test.",
    "mail.test. 300 IN A 169.254.1.2",
    'test. 300 IN TXT "v=spf1 -all"',
    "_http._tcp.test. 300 IN SRV 0 5 80 www.test.",
    "alias.test. 300 IN CNAME www.test.",
    "cached.test. 300 IN A 169.254.1.3",
    "tcp-only.test. 300 IN A 169.254.1.4",
    "1.1.254.169.in-addr.arpa. 300 IN PTR www.test.",
    f"254.169.in-addr.arpa. 300 IN SOA {SOA}",
    *(f"big.test. 300 IN A {ip}" for ip in BIG),
]

# (dig arguments, the +short answer lines in any order)
ANSWERS: list[tuple[list[str], list[str]]] = [
    (["www.test", "A"], ["169.254.1.1"]),
    (["www.test", "AAAA"], ["2001:db8::1"]),
    (["test", "MX"], ["10 mail.test."]),
    (["test", "TXT"], ['"v=spf1 -all"']),
    (["_http._tcp.test", "SRV"], ["0 5 80 www.test."]),
    (["1.1.254.169.in-addr.arpa", "PTR"], ["www.test."]),
    (["alias.test", "CNAME"], ["www.test."]),
    (["big.test", "A"], BIG),
]


def tool(name: str, package: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        pytest.skip(f"{name} not installed (apt-get install {package})")
    return path


def stop(proc: subprocess.Popen[bytes], log: IO[bytes]) -> None:
    """SIGTERM ``proc`` if it still runs (SIGKILL after 5 s), then close its log file."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    log.close()


# -- Unbound


@dataclass
class Unbound:
    port: int
    conf: Path
    control: str

    def stats(self) -> dict[str, float]:
        out = subprocess.run(
            [self.control, "-c", str(self.conf), "stats_noreset"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        return {k: float(v) for k, _, v in (line.partition("=") for line in out.splitlines())}

    def queries(self) -> tuple[float, float, float]:
        """(total, tcp, udp) queries received so far.

        Unbound reports no ``num.query.udp``: every query not over TCP came over UDP here
        (no TLS or HTTPS listener is configured).
        """
        s = self.stats()
        total, tcp = s["total.num.queries"], s["num.query.tcp"]
        return total, tcp, total - tcp


def unbound_server_lines(directory: Path) -> list[str]:
    """The start of the ``server:`` clause every test's Unbound shares: in the
    foreground, as the user that starts it, its files in ``directory``, one thread."""
    return [
        "server:",
        "  do-daemonize: no",
        '  username: ""',
        '  chroot: ""',
        f'  directory: "{directory}"',
        f'  pidfile: "{directory / "unbound.pid"}"',
        "  use-syslog: no",
        '  logfile: ""',
        "  verbosity: 1",
        "  num-threads: 1",
    ]


def unbound_conf(
    directory: Path,
    port: int,
    extra: Sequence[str] = (),
    local_data: Sequence[str] = LOCAL_DATA,
) -> str:
    """Unbound's configuration; ``extra``: more lines of its server section."""
    lines = [
        *unbound_server_lines(directory),
        f"  interface: 127.0.0.1@{port}",
        f"  port: {port}",
        "  access-control: 127.0.0.0/8 allow",
        "  do-ip6: no",
        '  module-config: "iterator"',
        "  extended-statistics: yes",
        "  statistics-cumulative: yes",
        # Everything outside the zones below is REFUSED: Unbound never recurses.
        '  local-zone: "." refuse',
        '  local-zone: "test." static',
        '  local-zone: "254.169.in-addr.arpa." static',
        *(f"  local-data: '{rr}'" for rr in local_data),
        *(f"  {line}" for line in extra),
        "remote-control:",
        "  control-enable: yes",
        f'  control-interface: "{directory / "unbound.ctl"}"',
    ]
    return "\n".join(lines) + "\n"


def tcp_probe(port: int) -> bool:
    """Unbound answers a TCP query for www.test (TCP so as not to add to its UDP count)."""
    query = dns.message.make_query("www.test.", "A")
    try:
        response = dns.query.tcp(query, HOST, port=port, timeout=0.5)
    except (OSError, dns.exception.Timeout):
        return False
    return response.rcode() == dns.rcode.NOERROR and bool(response.answer)


@contextlib.contextmanager
def start_unbound(
    directory: Path,
    extra: Sequence[str] = (),
    *,
    port: int = 0,
    local_data: Sequence[str] = LOCAL_DATA,
) -> Iterator[Unbound]:
    """Unbound serving ``local_data`` (zones ``test.`` and ``254.169.in-addr.arpa.``) on
    ``port`` (a free one when 0), stopped on the way out; ``extra``: more server lines."""
    binary = tool("unbound", "unbound")
    control = tool("unbound-control", "unbound")
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = directory / "unbound.conf"
    conf.write_text(unbound_conf(directory, port, extra, local_data))
    log = (directory / "unbound.log").open("wb")
    proc = subprocess.Popen(
        [binary, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not tcp_probe(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"unbound did not start (exit {proc.poll()}):\n"
                    + (directory / "unbound.log").read_text(errors="replace")
                )
            time.sleep(0.02)
        yield Unbound(port, conf, control)
    finally:
        stop(proc, log)


def start_proxy(
    directory: Path, upstream: str
) -> contextlib.AbstractContextManager[DnsProxyProcess]:
    directory.mkdir(parents=True, exist_ok=True)
    return dnsproxy_process(directory, "--upstream", upstream)


@pytest.fixture(scope="module")
def unbound(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Unbound]:
    with start_unbound(tmp_path_factory.mktemp("unbound")) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(unbound: Unbound, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsProxyProcess]:
    """dnsproxy in front of Unbound over TCP, the default transport."""
    with start_proxy(tmp_path_factory.mktemp("proxy"), f"tcp://{HOST}:{unbound.port}") as p:
        yield p


# -- clients


def run_client(binary: str, port: int, *args: str) -> str:
    result = subprocess.run(
        [binary, f"@{HOST}", "-p", str(port), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=15,
        check=False,
    )
    assert result.returncode == 0, f"{binary} {args}: {result.stdout}{result.stderr}"
    return result.stdout


def dig(port: int, *args: str) -> str:
    return run_client(tool("dig", "dnsutils"), port, *args, "+time=2", "+tries=1")


def kdig(port: int, *args: str) -> str:
    return run_client(tool("kdig", "knot-dnsutils"), port, *args, "+timeout=2", "+retry=0")


def metrics(proxy: DnsProxyProcess) -> str:
    with urllib.request.urlopen(proxy.url + "/metrics", timeout=5) as r:
        text: str = r.read().decode()
    return text


def header_flags(output: str) -> set[str]:
    """The header flags of dig's (';; flags: qr rd ra;') or kdig's (';; Flags: ...') output."""
    match = re.search(r"^;; [Ff]lags: ([a-z ]*);", output, re.MULTILINE)
    assert match, output
    return set(match.group(1).split())


# -- tests


@pytest.mark.parametrize("client", ["dig", "kdig"])
@pytest.mark.parametrize(("question", "expected"), ANSWERS, ids=[" ".join(q) for q, _ in ANSWERS])
def test_answers_each_type_over_udp_and_tcp(
    proxy: DnsProxyProcess, client: str, question: list[str], expected: list[str]
) -> None:
    ask = dig if client == "dig" else kdig
    # kdig, unlike dig, sends no EDNS by default: without it big.test does not fit in UDP.
    edns = ["+edns"] if client == "kdig" else []
    udp = ask(proxy.port, *question, *edns, "+notcp", "+short")
    tcp = ask(proxy.port, *question, "+tcp", "+short")
    assert sorted(udp.splitlines()) == sorted(expected)
    assert sorted(tcp.splitlines()) == sorted(expected)


def test_nxdomain_and_nodata_carry_the_soa(proxy: DnsProxyProcess) -> None:
    soa = re.compile(r"^test\.\s+\d+\s+IN\s+SOA\s+" + re.escape(SOA) + "$", re.MULTILINE)
    for out in (dig(proxy.port, "nothere.test", "A"), kdig(proxy.port, "nothere.test", "A")):
        assert re.search(r"status: NXDOMAIN", out), out
        authority = out.split("AUTHORITY SECTION:")[1]
        assert soa.search(authority), out
    nodata = dig(proxy.port, "www.test", "MX")
    assert "status: NOERROR" in nodata
    assert "ANSWER: 0," in nodata
    assert soa.search(nodata.split("AUTHORITY SECTION:")[1]), nodata


def test_big_answer_truncated_over_udp_without_edns_whole_over_tcp(proxy: DnsProxyProcess) -> None:
    truncated = dig(proxy.port, "big.test", "A", "+noedns", "+ignore")
    assert "tc" in header_flags(truncated), truncated
    truncated = kdig(proxy.port, "big.test", "A", "+noedns", "+notcp", "+ignore")
    assert "tc" in header_flags(truncated), truncated
    # The whole records that fit in 512 bytes: 12 + 14 of header and question, 16 each.
    kept = dig(proxy.port, "big.test", "A", "+noedns", "+ignore", "+short").split()
    assert len(kept) == 30 and set(kept) <= set(BIG), kept
    whole = dig(proxy.port, "big.test", "A", "+noedns", "+tcp", "+short")
    assert sorted(whole.splitlines()) == sorted(BIG)
    # Without +ignore dig itself retries over TCP after the TC reply, as resolvers do.
    retried = dig(proxy.port, "big.test", "A", "+noedns", "+short")
    assert sorted(retried.splitlines()) == sorted(BIG)


def test_dnssec_ok_bit_is_echoed(proxy: DnsProxyProcess) -> None:
    out = dig(proxy.port, "www.test", "A", "+dnssec")
    assert "; EDNS: version: 0, flags: do;" in out, out
    plain = dig(proxy.port, "www.test", "A")
    assert "; EDNS: version: 0, flags:;" in plain, plain


def test_0x20_mixed_case_is_echoed_in_the_question(proxy: DnsProxyProcess) -> None:
    for name in ("WwW.TeSt.", "wWw.tEsT."):  # the second is a cache hit of the first
        out = dig(proxy.port, name, "A")
        assert re.search(rf"^;{re.escape(name)}\s+IN\s+A$", out, re.MULTILINE), out
        assert re.search(r"\sIN\s+A\s+169\.254\.1\.1$", out, re.MULTILINE), out


def test_second_query_is_a_cache_hit(proxy: DnsProxyProcess, unbound: Unbound) -> None:
    hits0 = metric_value(metrics(proxy), "dnsproxy_cache_hits_total")
    total0, _, _ = unbound.queries()
    assert dig(proxy.port, "cached.test", "A", "+short") == "169.254.1.3\n"
    hits1 = metric_value(metrics(proxy), "dnsproxy_cache_hits_total")
    total1, _, _ = unbound.queries()
    assert (hits1, total1) == (hits0, total0 + 1)  # a miss, forwarded once
    assert kdig(proxy.port, "cached.test", "A", "+short") == "169.254.1.3\n"
    hits2 = metric_value(metrics(proxy), "dnsproxy_cache_hits_total")
    total2, _, _ = unbound.queries()
    assert (hits2, total2) == (hits1 + 1, total1)  # a hit: Unbound was not asked


def test_upstream_receives_tcp_only(proxy: DnsProxyProcess, unbound: Unbound) -> None:
    before = metrics(proxy)
    # A mix of client transports, with names the cache has not seen so each is forwarded.
    dig(proxy.port, "tcp-only.test", "A", "+short")
    dig(proxy.port, "tcp-only.test", "AAAA", "+tcp", "+short")
    kdig(proxy.port, "tcp-only.test", "MX", "+notcp", "+short")
    kdig(proxy.port, "tcp-only.test", "TXT", "+tcp", "+short")
    dig(proxy.port, "absent-1.test", "A", "+short")
    kdig(proxy.port, "absent-2.test", "A", "+tcp", "+short")
    after = metrics(proxy)
    for proto in ("udp", "tcp"):
        sample = f'dnsproxy_requests_total{{proto="{proto}"}}'
        assert metric_value(after, sample) - metric_value(before, sample) == 3
    total, tcp, udp = unbound.queries()
    assert total >= 6
    assert tcp == total
    assert udp == 0


def test_udp_upstream_is_seen_as_udp(tmp_path: Path) -> None:
    """The counterpart of the test above: the check does see UDP when the proxy uses it."""
    with (
        start_unbound(tmp_path / "unbound") as unbound,
        start_proxy(tmp_path / "proxy", f"udp://{HOST}:{unbound.port}") as proxy,
    ):
        assert dig(proxy.port, "www.test", "A", "+tcp", "+short") == "169.254.1.1\n"
        assert dig(proxy.port, "test", "MX", "+short") == "10 mail.test.\n"
        total, tcp, udp = unbound.queries()
    assert udp == 3  # the two queries and the loop probe sent at start
    assert tcp == total - 3 == 1  # only the TCP readiness probe of start_unbound


def _odd_queries() -> list[tuple[str, bytes, bool]]:
    """Queries a forwarder answers itself, without looking anything up: (label, wire,
    over TCP). NOTIFY is left out: Unbound takes it for its own zones (REFUSED), where
    dnsproxy has none and answers NOTIMP like any other opcode it does not serve."""
    cases: list[tuple[str, bytes, bool]] = []
    for edns in (False, 0):
        tag = "edns" if edns is not False else "plain"
        for opcode in (1, 2, 3, 5, 6, 15):
            q = dns.message.make_query("www.test.", "A", use_edns=edns)
            q.set_opcode(dns.opcode.Opcode(opcode))
            cases.append((f"opcode {opcode} {tag}", q.to_wire(), False))
        for meta in (41, 128, 200, 248, 249, 250, 253, 254):
            q = dns.message.make_query("www.test.", dns.rdatatype.RdataType(meta), use_edns=edns)
            cases.append((f"qtype {meta} {tag}", q.to_wire(), False))
        for transfer, tcp in (("AXFR", True), ("AXFR", False), ("IXFR", False)):
            q = dns.message.make_query("test.", transfer, use_edns=edns)
            cases.append((f"{transfer} {'tcp' if tcp else 'udp'} {tag}", q.to_wire(), tcp))
        two = bytearray(dns.message.make_query("www.test.", "A", use_edns=edns).to_wire())
        question = two[12 : 12 + len(b"\x03www\x04test\x00") + 4]
        two[5] = 2
        cases.append((f"qdcount 2 {tag}", bytes(two[:12] + question + two[12:]), False))
    v1 = dns.message.make_query("www.test.", "A", use_edns=1)
    cases.append(("edns version 1", v1.to_wire(), False))
    return cases


def _exchange(port: int, data: bytes, tcp: bool) -> bytes:
    if tcp:
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(len(data).to_bytes(2, "big") + data)
            reply = b""
            while len(reply) < 2 or len(reply) < 2 + int.from_bytes(reply[:2], "big"):
                chunk = s.recv(65535)
                assert chunk, "connection closed before the reply"
                reply += chunk
            return reply[2:]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(5)
        s.sendto(data, (HOST, port))
        return s.recv(65535)


def _verdict(reply: bytes) -> dict[str, int]:
    """The header fields a client acts on, read from the bytes (dnspython refuses some
    of these replies, e.g. UPDATE ones), plus the extended rcode from the OPT record."""
    ext = 0
    with contextlib.suppress(dns.exception.DNSException):
        ext = dns.message.from_wire(reply).rcode() >> 4
    return {
        "qr": reply[2] >> 7,
        "opcode": (reply[2] >> 3) & 0x0F,
        "ra": reply[3] >> 7,
        "rcode": (ext << 4) | (reply[3] & 0x0F),
    }


def test_answers_what_unbound_answers_to_queries_it_turns_away(
    proxy: DnsProxyProcess, tmp_path: Path
) -> None:
    """Differential test against Unbound 1.17: the same rcode and the same RA bit (clear
    on FORMERR, NOTIMP and REFUSED, set on BADVERS) for every query neither looks up.
    Unbound runs on its own here, so its query counts stay the module's."""
    with start_unbound(tmp_path / "unbound") as own:
        theirs = {
            label: _verdict(_exchange(own.port, data, tcp)) for label, data, tcp in _odd_queries()
        }
    ours = {
        label: _verdict(_exchange(proxy.port, data, tcp)) for label, data, tcp in _odd_queries()
    }
    assert ours == theirs
    assert {v["rcode"] for v in ours.values()} == {1, 4, 5, 16}  # every kind was tried


@contextlib.contextmanager
def start_dnsmasq(directory: Path, *args: str, port: int = 0) -> Iterator[int]:
    """dnsmasq on ``port`` (a free one when 0) answering dm.test (169.254.9.9) itself, with
    no upstream servers (every other name REFUSED) unless ``args`` give one; yields its
    port and stops it on the way out."""
    binary = tool("dnsmasq", "dnsmasq-base")
    port = port or free_port()
    log = (directory / "dnsmasq.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--port={port}",
            f"--listen-address={HOST}",
            "--bind-interfaces",
            f"--pid-file={directory / 'dnsmasq.pid'}",
            "--address=/dm.test/169.254.9.9",
            "--log-facility=-",
            *args,
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
    )
    try:
        query = dns.message.make_query("dm.test.", "A")
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                dns.query.tcp(query, HOST, port=port, timeout=0.5)
                break
            except (OSError, dns.exception.Timeout):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        "dnsmasq did not start:\n" + (directory / "dnsmasq.log").read_text()
                    ) from None
                time.sleep(0.02)
        yield port
    finally:
        stop(proc, log)


def test_dnsmasq_as_upstream(tmp_path: Path) -> None:
    with (
        start_dnsmasq(tmp_path) as port,
        start_proxy(tmp_path / "proxy", f"tcp://{HOST}:{port}") as proxy,
    ):
        assert dig(proxy.port, "dm.test", "A", "+short") == "169.254.9.9\n"
        assert kdig(proxy.port, "dm.test", "A", "+tcp", "+short") == "169.254.9.9\n"
        assert "status: REFUSED" in dig(proxy.port, "elsewhere.example", "A")
