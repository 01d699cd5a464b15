"""Node integration (the NodeLocal DNSCache role): local addresses and NOTRACK/ACCEPT rules.

Per local IP the rules of node-cache: queries to the IP on port 53 (UDP and TCP) and the
replies from it skip conntrack (raw table NOTRACK) and pass the filter table (ACCEPT); queries
the host itself sends, and the liveness probe on the health port, skip conntrack too. Without
conntrack there is no UDP insert race, and in transparent mode (the kube-dns ClusterIP as a
local IP) kube-proxy's DNAT never applies, so pods reach this cache instead of CoreDNS.

Fail-safe (``node.fallback``, on by default): the NOTRACK of arriving queries matches only
while a socket is bound to the local IP itself (``-m socket --nowildcard``; nft ``socket
wildcard 0``, for TCP ``socket transparent 0``, see :meth:`Rule.nft_line`), so when the
proxy dies without teardown its rules stop applying at once: a ClusterIP is kube-proxy's
again, and ``node.fallback_ip`` (nftables only) sends queries for a link-local IP to the
cluster DNS by a stateless rewrite between conntrack and kube-proxy's DNAT. The node's own
queries pass OUTPUT, where the kernel has no receiving socket to look up: that rule stays
unconditional. The first sync reports rules a previous instance left.

Each rules backend implements :class:`RulesBackend` (``plan``, ``sync``, ``remove``,
``check_tools``); :class:`NodeManager` drives whichever the configuration chose:

- ``iptables`` (``ip6tables`` for IPv6): every rule carries a unique comment; a rule is
  present when one line of ``iptables -S CHAIN`` carries its comment, inserted with ``-I``
  only when none does, and extra copies are deleted. Listing by comment rather than asking
  ``-C`` is deliberate: ``-C`` has given false "missing" answers (kubernetes/dns#568), which
  is how node-cache piled up duplicates. ``-w`` waits for the xtables lock, bounded.
- ``nftables``: one table of our own, ``inet dnsproxy``, with raw-priority chains for NOTRACK
  and filter chains for ACCEPT, replaced atomically by one ``nft -f -`` transaction and
  deleted on teardown; verified by listing it and comparing the rule comments.
- ``none``: something else owns the rules; only the addresses are managed.

``auto`` picks nftables when ``nft`` exists and the ``iptables`` in use is nf_tables-based (or
absent), and iptables otherwise (a legacy-iptables host keeps its firewall there, and an
ACCEPT only overrides a DROP of the same chain).

The interface: a ``dummy`` link (``nodelocaldns``) holding each local IP as /32 or /128;
where the kernel has no dummy links the addresses go on ``lo`` and a warning says so.

Every command runs as a subprocess with a timeout (``asyncio.create_subprocess_exec``), so
a slow xtables lock never blocks the event loop that serves queries. Failures are counted by
type in :class:`NodeStats` and retried at the next sync; they never stop the proxy.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from dnsproxy.config_types import NodeConfig
from dnsproxy.errors import DnsproxyError

log = logging.getLogger(__name__)

Backend = Literal["iptables", "nftables", "none"]

# The label values of dnsproxy_node_setup_errors_total, all exported from the start (at 0)
# so that an alert on rate() sees the series before the first error.
ERROR_TYPES = ("iptables", "iptables_lock", "nftables", "interface_add", "interface_check")

NFT_TABLE = "dnsproxy"  # in family inet: one table for IPv4 and IPv6
DNS_PORT = 53
XTABLES_WAIT_S = 5  # iptables -w: how long to wait for the xtables lock
_IPTABLES_TIMEOUT_S = XTABLES_WAIT_S + 5.0  # iptables gives up on the lock first
_COMMAND_TIMEOUT_S = 5.0
_MAX_DELETES = 50  # bound on removing copies of one rule at teardown
# Tools live in sbin, which a container's PATH may lack; PATH still comes first so that an
# operator (or a test) can put a wrapper in front.
_SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
_COMMENT_RE = re.compile(r'comment "([^"]*)"')


class NodeError(DnsproxyError):
    """The node role cannot start (a tool is missing, the interface cannot be made)."""


@dataclass(frozen=True, slots=True)
class CommandResult:
    rc: int  # -1 when the command timed out, 127 when it was not found
    stdout: str
    stderr: str

    @property
    def message(self) -> str:
        text = (self.stderr or self.stdout).strip().replace("\n", " | ")
        return text[:300] or f"exit status {self.rc}"


# A command runner: argv, optional stdin text, timeout. Tests pass a fake.
Runner = Callable[[Sequence[str], str | None, float], Awaitable[CommandResult]]


def find_tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


async def run_command(argv: Sequence[str], stdin: str | None, timeout_s: float) -> CommandResult:
    """Run one command off the event loop; never raises for the command's own failures."""
    exe = find_tool(argv[0])
    if exe is None:
        return CommandResult(127, "", f"{argv[0]}: command not found")
    # English messages: "Unknown device type" and the xtables lock text are matched below.
    env = {**os.environ, "LC_ALL": "C"}
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *argv[1:],
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
    except OSError as exc:
        return CommandResult(126, "", f"{argv[0]}: {exc.strerror or exc}")
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(stdin.encode() if stdin is not None else None), timeout_s
        )
    except BaseException as exc:
        # Timed out, or the caller was cancelled (shutdown): do not leave it running.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(proc.wait(), 2.0)
        if isinstance(exc, TimeoutError):
            return CommandResult(-1, "", f"{argv[0]}: timed out after {timeout_s:g}s")
        raise
    assert proc.returncode is not None
    return CommandResult(
        proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")
    )


# --- the rules (pure) --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule, rendered either as an iptables command or as an nft rule line.

    ``REWRITE`` and ``DNAT`` are the two halves of the link-local fallback (nft only): a
    new connection to ``ip`` that no socket took is sent to ``to`` instead.
    """

    ip: str
    table: Literal["raw", "filter", "mangle", "nat"]
    chain: Literal["PREROUTING", "INPUT", "OUTPUT"]
    proto: Literal["tcp", "udp"]
    direction: Literal["dst", "src"]  # -d IP --dport PORT, or -s IP --sport PORT
    port: int
    target: Literal["NOTRACK", "ACCEPT", "REWRITE", "DNAT"]
    comment: str  # unique per rule: how a rule is found again in a listing
    bound: bool = False  # match only while a socket is bound to ip:port itself
    to: str = ""  # REWRITE and DNAT: the fallback address

    @property
    def ipv6(self) -> bool:
        return ":" in self.ip

    @property
    def iptables(self) -> str:
        return "ip6tables" if self.ipv6 else "iptables"

    def spec(self) -> list[str]:
        """The match and target, as given to ``-I`` and ``-D`` (NOTRACK and ACCEPT only)."""
        addr, port = ("-d", "--dport") if self.direction == "dst" else ("-s", "--sport")
        # --nowildcard: a socket on 0.0.0.0:53 (someone else's) does not count as ours.
        bound = ("-m", "socket", "--nowildcard") if self.bound else ()
        return [
            *("-p", self.proto, addr, self.ip, port, str(self.port), *bound),
            *("-m", "comment", "--comment", self.comment, "-j", self.target),
        ]

    def iptables_argv(self, op: Literal["-I", "-D"]) -> list[str]:
        wait = ("-w", str(XTABLES_WAIT_S))
        return [self.iptables, *wait, "-t", self.table, op, self.chain, *self.spec()]

    def nft_line(self) -> str:
        family = "ip6" if self.ipv6 else "ip"
        comment = f'comment "{self.comment}"'
        if self.target == "REWRITE":
            # Stateless, after conntrack has recorded the original destination and before
            # the DNAT hooks: kube-proxy's DNAT of `to` then applies, and its reverse
            # gives replies the local IP back as their source.
            return (
                f"{family} daddr {self.ip} {self.proto} dport {self.port} ct state new "
                f"{family} daddr set {self.to} {comment}"
            )
        if self.target == "DNAT":
            # Only connections rewritten above that no earlier DNAT (kube-proxy) bound: a
            # `to` that is a local address (IPVS) or an endpoint needs the binding here.
            return (
                f"{family} daddr {self.to} {self.proto} dport {self.port} "
                f"ct original {family} daddr {self.ip} dnat {family} to {self.to} {comment}"
            )
        addr = "daddr" if self.direction == "dst" else "saddr"
        port = "dport" if self.direction == "dst" else "sport"
        bound = ""
        if self.bound and self.proto == "tcp":
            # nft's `socket wildcard` matches full sockets only, not a connection still in
            # its handshake (a request socket): the handshake's last ACK would be tracked,
            # rewritten to the fallback (or DNATed by kube-proxy) and the connection reset.
            # `socket transparent 0` is true of every ordinary socket, request ones too; it
            # also counts someone else's TCP listener on 0.0.0.0:53. iptables' --nowildcard
            # matches request sockets as they are.
            bound = "socket transparent 0 "
        elif self.bound:
            bound = "socket wildcard 0 "
        verdict = "notrack" if self.target == "NOTRACK" else "accept"
        return (
            f"{family} {addr} {self.ip} {self.proto} {port} {self.port} {bound}{verdict} {comment}"
        )


def build_rules(
    local_ips: Iterable[str],
    health_port: int | None,
    *,
    when_bound: bool = False,
    fallback_ip: str | None = None,
) -> list[Rule]:
    """node-cache's rules (REFERENCE.md §2): ten per IP for port 53, two for the health port.

    ``when_bound`` (``node.fallback``) makes the NOTRACK of arriving queries conditional on
    a socket bound to the local IP, so that while none is (a killed proxy, a restart) the
    queries are tracked and kube-proxy's DNAT of a ClusterIP applies again. ``fallback_ip``
    adds two rules per IP of its family and protocol that send such queries there.
    """
    rules: list[Rule] = []
    protos: tuple[Literal["tcp", "udp"], ...] = ("tcp", "udp")
    for ip in local_ips:
        for p in protos:
            where = f"{ip} {p}/{DNS_PORT}"
            bound = " while bound" if when_bound else ""
            rules += [
                Rule(ip, "raw", "PREROUTING", p, "dst", DNS_PORT, "NOTRACK",
                     f"dnsproxy: notrack queries to {where}{bound}", bound=when_bound),
                Rule(ip, "filter", "INPUT", p, "dst", DNS_PORT, "ACCEPT",
                     f"dnsproxy: accept queries to {where}"),
                Rule(ip, "raw", "OUTPUT", p, "src", DNS_PORT, "NOTRACK",
                     f"dnsproxy: notrack replies from {where}"),
                Rule(ip, "filter", "OUTPUT", p, "src", DNS_PORT, "ACCEPT",
                     f"dnsproxy: accept replies from {where}"),
                # Queries from the host itself (hostNetwork pods) leave through OUTPUT,
                # where the kernel cannot look up the receiving socket: unconditional.
                Rule(ip, "raw", "OUTPUT", p, "dst", DNS_PORT, "NOTRACK",
                     f"dnsproxy: notrack local queries to {where}"),
            ]  # fmt: skip
            if fallback_ip is not None and (":" in fallback_ip) == (":" in ip):
                rules += [
                    Rule(ip, "mangle", "PREROUTING", p, "dst", DNS_PORT, "REWRITE",
                         f"dnsproxy: fallback of {where} to {fallback_ip}", to=fallback_ip),
                    Rule(ip, "nat", "PREROUTING", p, "dst", DNS_PORT, "DNAT",
                         f"dnsproxy: fallback nat of {where} to {fallback_ip}", to=fallback_ip),
                ]  # fmt: skip
        if health_port is not None:
            where = f"{ip} tcp/{health_port}"
            # kubelet's liveness probe runs on the host: both directions pass OUTPUT.
            rules += [
                Rule(ip, "raw", "OUTPUT", "tcp", "dst", health_port, "NOTRACK",
                     f"dnsproxy: notrack health probes to {where}"),
                Rule(ip, "raw", "OUTPUT", "tcp", "src", health_port, "NOTRACK",
                     f"dnsproxy: notrack health replies from {where}"),
            ]  # fmt: skip
    return rules


def config_rules(config: NodeConfig) -> list[Rule]:
    """:func:`build_rules` for a node configuration."""
    return build_rules(
        config.local_ips,
        config.health_port,
        when_bound=config.fallback,
        fallback_ip=config.fallback_ip if config.fallback else None,
    )


# nft chain per (iptables table, chain): name, type, hook, priority. The raw-priority chains
# run before conntrack (-200), which is what lets notrack keep packets out of it (and out of
# kube-proxy's DNAT); the fallback runs between conntrack and kube-proxy's DNAT (-100), and
# its nat half after it.
_NFT_CHAINS: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("raw", "PREROUTING"): ("raw_prerouting", "filter", "prerouting", "raw"),
    ("raw", "OUTPUT"): ("raw_output", "filter", "output", "raw"),
    ("filter", "INPUT"): ("filter_input", "filter", "input", "filter"),
    ("filter", "OUTPUT"): ("filter_output", "filter", "output", "filter"),
    ("mangle", "PREROUTING"): ("fallback", "filter", "prerouting", "mangle"),
    ("nat", "PREROUTING"): ("fallback_nat", "nat", "prerouting", "dstnat + 10"),
}


def nft_ruleset(rules: Sequence[Rule]) -> str:
    """The ``nft -f -`` input that replaces our table in one transaction.

    ``add`` then ``delete`` makes the delete valid whether or not the table exists, so the
    same text both installs and repairs, atomically: the kernel never sees half a table.
    """
    lines = [
        f"add table inet {NFT_TABLE}",
        f"delete table inet {NFT_TABLE}",
        f"table inet {NFT_TABLE} {{",
    ]
    for key, (name, kind, hook, priority) in _NFT_CHAINS.items():
        chain_rules = [r for r in rules if (r.table, r.chain) == key]
        if not chain_rules:
            continue
        lines.append(f"\tchain {name} {{")
        lines.append(f"\t\ttype {kind} hook {hook} priority {priority}; policy accept;")
        lines += [f"\t\t{r.nft_line()}" for r in chain_rules]
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def iptables_rule_lines(listing: str) -> list[tuple[str, list[str]]]:
    """(comment, words) of each commented rule line of ``iptables -S CHAIN`` output.

    The words after ``-A`` are the rule's spec as iptables prints it, which ``-D CHAIN``
    accepts as it is: how a rule we no longer build is deleted.
    """
    found: list[tuple[str, list[str]]] = []
    for line in listing.splitlines():
        if not line.startswith("-A "):
            continue
        try:
            words = shlex.split(line)
        except ValueError:
            continue
        for i, word in enumerate(words[:-1]):
            if word == "--comment":
                found.append((words[i + 1], words[1:]))
                break
    return found


def iptables_comments(listing: str) -> list[str]:
    """The ``--comment`` of each rule line of ``iptables -S CHAIN`` output."""
    return [comment for comment, _ in iptables_rule_lines(listing)]


def nft_comments(listing: str) -> list[str]:
    """The comment of each rule in ``nft list table`` output."""
    return _COMMENT_RE.findall(listing)


def choose_backend(
    wanted: str, nft: str | None, iptables: str | None, iptables_version: str
) -> Backend:
    """Resolve ``auto``; ``iptables_version`` is the output of ``iptables -V``.

    nftables when ``nft`` exists and iptables is nf_tables-based or absent: the rules then
    live where the host's own iptables-nft rules live, as one atomic table, and no xtables
    lock is taken (kubernetes/dns#292). A legacy iptables means the host's firewall is in
    the legacy tables, where our ACCEPT must sit to take effect before its DROP.
    """
    if wanted == "iptables":
        return "iptables"
    if wanted == "nftables":
        return "nftables"
    if wanted == "none":
        return "none"
    if nft is not None and (iptables is None or "nf_tables" in iptables_version):
        return "nftables"
    if iptables is not None:
        return "iptables"
    raise NodeError(
        "node.rules is auto but neither nft nor iptables is installed "
        "(install nftables or iptables, or set node.rules: none)"
    )


def detect_backend(wanted: str) -> Backend:
    """:func:`choose_backend` for this machine (blocking; for start-up and the CLI)."""
    if wanted != "auto":
        return choose_backend(wanted, None, None, "")
    nft, iptables = find_tool("nft"), find_tool("iptables")
    version = ""
    if iptables is not None:
        try:
            out = subprocess.run(
                [iptables, "-V"], capture_output=True, text=True, timeout=5, check=False
            )
            version = out.stdout + out.stderr
        except (OSError, subprocess.TimeoutExpired):
            pass
    return choose_backend(wanted, nft, iptables, version)


def _addr_cmd(op: str, ip: str, device: str) -> list[str]:
    if ":" in ip:
        # nodad: a tentative (DAD) address cannot be bound, and the bind comes right after.
        tail = ["nodad"] if op == "add" else []
        return ["ip", "-6", "addr", op, f"{ip}/128", "dev", device, *tail]
    return ["ip", "addr", op, f"{ip}/32", "dev", device]


def _no_fallback(backend: Backend, config: NodeConfig) -> str:
    return (
        f"node.fallback_ip {config.fallback_ip} is not applied: the {backend} backend cannot "
        "rewrite a destination between conntrack and kube-proxy's DNAT (nftables can)"
    )


def plan(config: NodeConfig, backend: Backend) -> str:
    """What setup applies on a fresh node, as a shell script an operator can review."""
    rules = rules_backend(backend, config_rules(config))
    chosen = f"{backend} (auto, on this machine)" if config.rules == "auto" else backend
    lines = [f"# dnsproxy node setup: rules {chosen}, local IPs {', '.join(config.local_ips)}"]
    if config.fallback and backend != "none":
        lines.append(
            "# fail-safe: queries arriving for a local IP skip conntrack only while a socket "
            "is bound to it"
        )
        if rules.unsupported:
            lines.append(f"# {_no_fallback(backend, config)}")
    if config.setup_interface:
        name = config.interface
        lines.append("# (where the kernel has no dummy links, the addresses go on lo instead)")
        lines.append(shlex.join(["ip", "link", "add", name, "type", "dummy"]))
        lines.append(shlex.join(["ip", "link", "set", name, "up"]))
        lines += [shlex.join(_addr_cmd("add", ip, name)) for ip in config.local_ips]
    lines += rules.plan()
    return "\n".join(lines) + "\n"


# --- the running part -------------------------------------------------------------------


@dataclass
class NodeStats:
    """Plain counters read by :class:`NodeCollector` at scrape time."""

    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_TYPES, 0))
    rules_readded: int = 0
    addresses_readded: int = 0
    syncs: int = 0  # completed syncs, successful or not
    rules_present: int = 0  # our rules in place after the last sync
    rules_left_over: int = 0  # our rules found at the first sync: a previous instance's


def _kind_missing(result: CommandResult) -> bool:
    text = result.stderr.lower()
    return "unknown device type" in text or "not supported" in text


def _iptables_error(result: CommandResult) -> str:
    # "Another app is currently holding the xtables lock. Stopped waiting after 5s." The exit
    # status (4, RESOURCE_PROBLEM) is shared with other failures, so the text decides.
    return "iptables_lock" if "xtables lock" in result.stderr.lower() else "iptables"


class _Commands:
    """Runs the node's commands for the manager and its rules backend; counts failures."""

    def __init__(self, runner: Runner, stats: NodeStats) -> None:
        self._run = runner
        self._stats = stats

    async def __call__(self, argv: Sequence[str], stdin: str | None = None) -> CommandResult:
        timeout = (
            _IPTABLES_TIMEOUT_S if argv[0] in ("iptables", "ip6tables") else _COMMAND_TIMEOUT_S
        )
        return await self._run(list(argv), stdin, timeout)

    def error(self, kind: str, what: str, result: CommandResult) -> None:
        """Count a failed command under ``kind`` (a label of the errors metric) and log it."""
        self._stats.errors[kind] = self._stats.errors.get(kind, 0) + 1
        log.warning("node setup: %s failed (%s): %s", what, kind, result.message)


@dataclass(frozen=True, slots=True)
class RulesStatus:
    """What one sync of the rules found and did."""

    ok: bool  # every rule is in place afterwards
    present: int  # our rules in place afterwards
    added: tuple[str, ...] = ()  # comments of the rules that were missing and were put back
    # Rules of ours for our IPs that were in place before this sync changed anything,
    # including ones this configuration no longer builds (which the sync removed).
    found: int = 0


class RulesBackend(abc.ABC):
    """One way of putting a list of :class:`Rule` in place; :class:`NodeManager` drives it.

    ``plan`` is pure; ``sync`` and ``remove`` run their commands through the runner they
    are given, which counts and logs every failure, so they never raise for one.
    """

    name: ClassVar[Backend]

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = [r for r in rules if self.supports(r)]
        self.unsupported = [r for r in rules if not self.supports(r)]
        self._ips = {r.ip for r in rules}

    def supports(self, rule: Rule) -> bool:
        """Whether this backend can express ``rule``; the others are left out."""
        return True

    def ours(self, comment: str) -> bool:
        """Whether a listed rule's comment marks one of our rules for one of our IPs."""
        return comment.startswith("dnsproxy: ") and any(
            f" {ip} " in f" {comment} " for ip in self._ips
        )

    @abc.abstractmethod
    def tools(self) -> list[str]:
        """The commands this backend runs."""

    def check_tools(self) -> list[str]:
        """The commands this backend runs that are not installed here."""
        return [tool for tool in self.tools() if find_tool(tool) is None]

    @abc.abstractmethod
    def plan(self) -> list[str]:
        """Shell lines that install the rules on a fresh node."""

    @abc.abstractmethod
    async def sync(self, run: _Commands) -> RulesStatus:
        """Verify the rules, add what is missing, remove extra copies."""

    @abc.abstractmethod
    async def remove(self, run: _Commands) -> None:
        """Delete every rule (and every copy of one)."""


class NoRules(RulesBackend):
    """``none``: something else owns the rules."""

    name = "none"

    def __init__(self, rules: Sequence[Rule]) -> None:
        super().__init__([])

    def tools(self) -> list[str]:
        return []

    def plan(self) -> list[str]:
        return []

    async def sync(self, run: _Commands) -> RulesStatus:
        return RulesStatus(ok=True, present=0)

    async def remove(self, run: _Commands) -> None:
        return None


class IptablesRules(RulesBackend):
    """``iptables``/``ip6tables``: rules found again by comment, inserted one by one."""

    name = "iptables"

    def supports(self, rule: Rule) -> bool:
        # iptables has no stateless rewrite to run between conntrack and kube-proxy's DNAT.
        return rule.target in ("NOTRACK", "ACCEPT")

    def tools(self) -> list[str]:
        return sorted({r.iptables for r in self.rules})

    def plan(self) -> list[str]:
        return [shlex.join(r.iptables_argv("-I")) for r in self.rules]

    async def sync(self, run: _Commands) -> RulesStatus:
        ok = True
        present = found = 0
        added: list[str] = []
        current = {r.comment for r in self.rules}
        wait = ["-w", str(XTABLES_WAIT_S)]
        chains = sorted({(r.iptables, r.table, r.chain) for r in self.rules})
        for tool, table, chain in chains:
            listing = await run([tool, *wait, "-t", table, "-S", chain])
            if listing.rc != 0:
                run.error(_iptables_error(listing), f"{tool} -t {table} -S {chain}", listing)
                ok = False
                continue
            lines = iptables_rule_lines(listing.stdout)
            found += sum(1 for comment, _ in lines if self.ours(comment))
            for comment, spec in lines:
                if comment in current or not self.ours(comment):
                    continue
                # Ours but no longer built (an older version, fallback switched, another
                # health port): it would keep doing what this configuration does not ask.
                result = await run([tool, *wait, "-t", table, "-D", *spec])
                if result.rc != 0:
                    run.error(_iptables_error(result), f"deleting old rule '{comment}'", result)
                    ok = False
            counts = Counter(comment for comment, _ in lines)
            for rule in self.rules:
                if (rule.iptables, rule.table, rule.chain) != (tool, table, chain):
                    continue
                copies = counts[rule.comment]
                if copies == 0:
                    result = await run(rule.iptables_argv("-I"))
                    if result.rc != 0:
                        run.error(_iptables_error(result), f"inserting '{rule.comment}'", result)
                        ok = False
                        continue
                    added.append(rule.comment)
                for _ in range(copies - 1):
                    # Someone (or an old bug) added a copy: keep exactly one.
                    result = await run(rule.iptables_argv("-D"))
                    if result.rc != 0:
                        run.error(
                            _iptables_error(result), f"deleting a copy of '{rule.comment}'", result
                        )
                        ok = False
                        break
                present += 1
        return RulesStatus(ok, present, tuple(added), found)

    async def remove(self, run: _Commands) -> None:
        for rule in self.rules:
            for _ in range(_MAX_DELETES):  # every copy, as node-cache does
                result = await run(rule.iptables_argv("-D"))
                if result.rc == 0:
                    continue
                # "Bad rule (does a matching rule exist in that chain?)": none left.
                if "does a matching rule exist" not in result.stderr:
                    run.error(_iptables_error(result), f"deleting '{rule.comment}'", result)
                break


class NftRules(RulesBackend):
    """``nftables``: table ``inet dnsproxy``, replaced whole by one transaction."""

    name = "nftables"

    def tools(self) -> list[str]:
        return ["nft"]

    def plan(self) -> list[str]:
        return ["nft -f - <<'EOF'", nft_ruleset(self.rules).rstrip("\n"), "EOF"]

    async def sync(self, run: _Commands) -> RulesStatus:
        listing = await run(["nft", "list", "table", "inet", NFT_TABLE])
        counts = Counter(nft_comments(listing.stdout) if listing.rc == 0 else [])
        found = sum(n for comment, n in counts.items() if self.ours(comment))
        missing = [r.comment for r in self.rules if counts[r.comment] == 0]
        present = len(self.rules) - len(missing)
        # Anything else in the table (a rule this configuration no longer builds, a copy)
        # is replaced away with the rest.
        if not missing and sum(counts.values()) == present:
            return RulesStatus(ok=True, present=present, found=found)
        result = await run(["nft", "-f", "-"], nft_ruleset(self.rules))
        if result.rc != 0:
            run.error("nftables", f"applying table inet {NFT_TABLE}", result)
            return RulesStatus(ok=False, present=present, found=found)
        return RulesStatus(True, len(self.rules), tuple(missing), found)

    async def remove(self, run: _Commands) -> None:
        result = await run(["nft", "delete", "table", "inet", NFT_TABLE])
        if result.rc != 0 and "no such file" not in result.stderr.lower():
            run.error("nftables", f"deleting table inet {NFT_TABLE}", result)


_BACKENDS: dict[str, type[RulesBackend]] = {
    cls.name: cls for cls in (IptablesRules, NftRules, NoRules)
}


def rules_backend(backend: Backend, rules: Sequence[Rule]) -> RulesBackend:
    """The implementation of ``backend`` (``auto`` already resolved) for ``rules``."""
    return _BACKENDS[backend](rules)


class NodeManager:
    """Installs, verifies, re-adds and removes the local addresses and the rules."""

    def __init__(self, config: NodeConfig, backend: Backend, runner: Runner = run_command) -> None:
        self.config = config
        self.backend = backend
        self.stats = NodeStats()
        self._rules = rules_backend(backend, config_rules(config))
        self._cmd = _Commands(runner, self.stats)
        if self._rules.unsupported:
            log.warning(
                "node: %s; queries to %s have no fallback while no socket holds them",
                _no_fallback(backend, config),
                ", ".join(sorted({r.ip for r in self._rules.unsupported})),
            )
        self._device: str | None = None  # where the addresses go: the link, or lo
        self._installed = False  # after the first full install, additions are re-adds

    @property
    def device(self) -> str | None:
        return self._device

    def check_tools(self) -> None:
        """Refuse to start when a command the configuration needs is missing.

        Raises :class:`NodeError` naming every missing command.
        """
        missing = [] if not self.config.setup_interface or find_tool("ip") else ["ip"]
        missing += self._rules.check_tools()
        if missing:
            raise NodeError(
                f"node setup needs {', '.join(missing)}, not found in PATH or sbin "
                f"(rules backend {self.backend})"
            )

    # -- interface --

    async def setup_interface(self) -> None:
        """Put the addresses in place before the listeners bind (a bind needs them)."""
        if not self.config.setup_interface:
            return
        if not await self._sync_interface():
            raise NodeError(
                f"cannot put {', '.join(self.config.local_ips)} on {self.config.interface} "
                "(see the warnings above)"
            )

    async def _ensure_device(self) -> bool:
        name = self.config.interface
        if self._device == "lo" and name != "lo":
            return True  # decided once: this kernel has no dummy links
        shown = await self._cmd(["ip", "-j", "link", "show", "dev", name])
        if shown.rc == 0:
            self._device = name
            return await self._ensure_up(name, shown.stdout)
        added = await self._cmd(["ip", "link", "add", name, "type", "dummy"])
        if added.rc == 0:
            self._device = name
            shown = await self._cmd(["ip", "-j", "link", "show", "dev", name])
            return await self._ensure_up(name, shown.stdout)
        if _kind_missing(added):
            log.warning(
                "this kernel has no dummy links (%s); putting the local addresses on lo "
                "instead of %s",
                added.message,
                name,
            )
            self._device = "lo"
            shown = await self._cmd(["ip", "-j", "link", "show", "dev", "lo"])
            return await self._ensure_up("lo", shown.stdout)
        self._cmd.error("interface_add", f"creating {name}", added)
        return False

    async def _ensure_up(self, device: str, shown: str) -> bool:
        try:
            links = json.loads(shown or "[]")
            up = bool(links) and "UP" in links[0].get("flags", [])
        except (ValueError, AttributeError, IndexError, TypeError):
            up = False
        if up:
            return True
        result = await self._cmd(["ip", "link", "set", device, "up"])
        if result.rc != 0:
            self._cmd.error("interface_add", f"bringing {device} up", result)
            return False
        return True

    async def _addresses(self, device: str) -> set[str] | None:
        shown = await self._cmd(["ip", "-j", "addr", "show", "dev", device])
        if shown.rc != 0:
            return None
        found: set[str] = set()
        try:
            for link in json.loads(shown.stdout or "[]"):
                for info in link.get("addr_info", []):
                    found.add(str(ipaddress.ip_address(info["local"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            # Unreadable output: treat every address as missing; adding one that exists
            # is answered "File exists", which the caller tolerates.
            return set()
        return found

    async def _sync_interface(self) -> bool:
        if not await self._ensure_device():
            return False
        assert self._device is not None
        present = await self._addresses(self._device)
        if present is None and self._device != "lo":
            # The link vanished (deleted by hand): make it again, then look once more.
            if not await self._ensure_device():
                return False
            present = await self._addresses(self._device)
        if present is None:
            self._cmd.error(
                "interface_check",
                f"listing addresses of {self._device}",
                CommandResult(1, "", "ip addr show failed"),
            )
            return False
        ok = True
        for ip in self.config.local_ips:
            if ip in present:
                continue
            result = await self._cmd(_addr_cmd("add", ip, self._device))
            if result.rc != 0 and "exists" not in result.stderr.lower():
                self._cmd.error("interface_add", f"adding {ip} to {self._device}", result)
                ok = False
                continue
            if self._installed:
                self.stats.addresses_readded += 1
                log.warning("node: %s was missing from %s; added it again", ip, self._device)
        return ok

    async def _remove_interface(self) -> None:
        device = self._device
        if device is None:
            return
        if device == self.config.interface and device != "lo":
            shown = await self._cmd(["ip", "-j", "-d", "link", "show", "dev", device])
            kind = ""
            with contextlib.suppress(ValueError, IndexError, AttributeError, TypeError):
                kind = json.loads(shown.stdout)[0].get("linkinfo", {}).get("info_kind", "")
            if kind == "dummy":
                result = await self._cmd(["ip", "link", "del", device])
                if result.rc != 0 and shown.rc == 0:
                    self._cmd.error("interface_add", f"deleting {device}", result)
                return
        for ip in self.config.local_ips:
            result = await self._cmd(_addr_cmd("del", ip, device))
            text = result.stderr.lower()
            if result.rc != 0 and "cannot assign" not in text and "cannot find" not in text:
                self._cmd.error("interface_add", f"removing {ip} from {device}", result)

    # -- the cycle --

    async def sync(self) -> bool:
        """Verify everything; add what is missing. True when all is in place."""
        ok = True
        if self.config.setup_interface:
            ok = await self._sync_interface()
        status = await self._rules.sync(self._cmd)
        self.stats.rules_present = status.present
        if self.stats.syncs == 0:
            self._report_left_over(status.found)
        if self._installed and status.added:
            self.stats.rules_readded += len(status.added)
            log.warning(
                "node: %d %s rule(s) were missing; added them again: %s",
                len(status.added),
                self.backend,
                "; ".join(status.added),
            )
        ok = status.ok and ok
        self.stats.syncs += 1
        if ok and not self._installed:
            self._installed = True
            log.info(
                "node: %s on %s, %d %s rules in place",
                ", ".join(self.config.local_ips),
                self._device or "(not managed)",
                status.present,
                self.backend,
            )
        return ok

    def _report_left_over(self, found: int) -> None:
        self.stats.rules_left_over = found
        if found:
            log.warning(
                "node: %d of our rules were in place at start, left by an instance that "
                "stopped without teardown (killed, OOM-killed, or node.teardown off); "
                "adopting them",
                found,
            )
        elif self.backend != "none":
            log.info("node: no rules of a previous instance found (it stopped cleanly)")

    async def teardown(self, *, rules: bool = True) -> None:
        """Remove the rules first (so a ClusterIP falls back to kube-proxy), then addresses."""
        errors = sum(self.stats.errors.values())
        if rules:
            await self._rules.remove(self._cmd)
        if self.config.setup_interface:
            await self._remove_interface()
        if sum(self.stats.errors.values()) == errors:
            log.info("node: rules and addresses removed")
        else:
            log.warning("node: teardown incomplete (see the warnings above)")


class NodeCollector:
    """Exports :class:`NodeStats` at scrape time (registered by the app)."""

    def __init__(self, stats: NodeStats) -> None:
        self.stats = stats

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        m = CounterMetricFamily(
            "dnsproxy_node_setup_errors",
            "Failed node setup commands, by type (like coredns_nodecache_setup_errors_total).",
            labels=["errortype"],
        )
        for kind, count in s.errors.copy().items():
            m.add_metric([kind], count)
        yield m
        yield CounterMetricFamily(
            "dnsproxy_node_rules_readded",
            "Rules found missing by a sync and added again.",
            value=s.rules_readded,
        )
        yield CounterMetricFamily(
            "dnsproxy_node_addresses_readded",
            "Local addresses found missing by a sync and added again.",
            value=s.addresses_readded,
        )
        yield CounterMetricFamily(
            "dnsproxy_node_syncs", "Completed verify-and-repair cycles.", value=s.syncs
        )
        yield GaugeMetricFamily(
            "dnsproxy_node_rules_left_over",
            "Our rules found in place at start, left by an instance that stopped without "
            "teardown (killed, OOM-killed, or teardown off); 0 after a clean stop.",
            value=s.rules_left_over,
        )
        yield GaugeMetricFamily(
            "dnsproxy_node_rules_present",
            "Our rules in place after the last sync.",
            value=s.rules_present,
        )
