"""The node role without root: rules, backends, dry-run, config, and the lifecycle on a fake host.

:class:`FakeHost` answers the ``ip``, ``iptables``/``ip6tables`` and ``nft`` commands that
:class:`NodeManager` runs, from state a test can read and change (an operator deleting a
rule, a kernel without dummy links, a held xtables lock). The same manager runs against the
real tools in network namespaces in ``test_node_netns.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import pytest
from conftest import RECORDS, dnsproxy_cmd, make_config, undocumented_keys
from fakeupstream import FakeUpstream, zone_handler

import dnsproxy.app
import dnsproxy.node
from dnsproxy.app import App
from dnsproxy.cli import main
from dnsproxy.config import ConfigError, NodeConfig, Overrides, load_config, parse_config
from dnsproxy.node import (
    CommandResult,
    NodeCollector,
    NodeError,
    NodeManager,
    build_rules,
    choose_backend,
    iptables_comments,
    nft_comments,
    nft_ruleset,
    plan,
)

ROOT = Path(__file__).resolve().parent.parent
NODELOCAL = ROOT / "config" / "nodelocal.yaml"
IP4, IP6 = "169.254.20.10", "2001:db8::a"
CLUSTER_DNS = "169.254.25.10"  # the kube-dns-upstream ClusterIP, as fallback_ip
WAIT_S = 5.0


# --- a fake node ------------------------------------------------------------------------


@dataclass
class Link:
    kind: str
    up: bool = True
    addrs: list[str] = field(default_factory=list)


@dataclass
class FakeHost:
    dummy_supported: bool = True
    links: dict[str, Link] = field(default_factory=lambda: {"lo": Link("loopback")})
    # (tool, table, chain) -> rule specs (what follows the chain name), first rule first
    chains: dict[tuple[str, str, str], list[list[str]]] = field(default_factory=dict)
    nft_table: str | None = None
    calls: list[list[str]] = field(default_factory=list)
    # argv prefix -> the result returned instead of running it (a held lock, a failure)
    failures: dict[tuple[str, ...], CommandResult] = field(default_factory=dict)
    on_call: Callable[[list[str]], None] | None = None

    async def __call__(
        self, argv: Sequence[str], stdin: str | None, timeout_s: float
    ) -> CommandResult:
        args = list(argv)
        self.calls.append(args)
        if self.on_call is not None:
            self.on_call(args)
        for prefix, result in self.failures.items():
            if tuple(args[: len(prefix)]) == prefix:
                return result
        if args[0] == "ip":
            return self._ip(args[1:])
        if args[0] in ("iptables", "ip6tables"):
            return self._iptables(args[0], args[1:])
        if args[0] == "nft":
            return self._nft(args[1:], stdin)
        raise AssertionError(f"unexpected command {args}")

    def named(self, name: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == name]

    def rule_count(self) -> int:
        return sum(len(rules) for rules in self.chains.values())

    def _ip(self, args: list[str]) -> CommandResult:
        if args[:2] == ["-j", "-d"]:
            args = ["-j", *args[2:]]
        if args[:1] == ["-6"]:
            args = args[1:]
        missing = CommandResult(1, "", "Device does not exist.\n")
        match args:
            case ["-j", "link", "show", "dev", name]:
                if name not in self.links:
                    return missing
                link = self.links[name]
                info = {
                    "ifname": name,
                    "flags": ["UP"] if link.up else [],
                    "linkinfo": {"info_kind": link.kind},
                }
                return CommandResult(0, json.dumps([info]), "")
            case ["-j", "addr", "show", "dev", name]:
                if name not in self.links:
                    return missing
                addrs = [{"local": a.split("/")[0]} for a in self.links[name].addrs]
                return CommandResult(0, json.dumps([{"ifname": name, "addr_info": addrs}]), "")
            case ["link", "add", name, "type", "dummy"]:
                if not self.dummy_supported:
                    return CommandResult(2, "", "Error: Unknown device type.\n")
                self.links[name] = Link("dummy", up=False)
                return CommandResult(0, "", "")
            case ["link", "set", name, "up"]:
                self.links[name].up = True
                return CommandResult(0, "", "")
            case ["link", "del", name]:
                return CommandResult(0, "", "") if self.links.pop(name, None) else missing
            case ["addr", "add", addr, "dev", name, *_]:
                if addr in self.links[name].addrs:
                    return CommandResult(2, "", "RTNETLINK answers: File exists\n")
                self.links[name].addrs.append(addr)
                return CommandResult(0, "", "")
            case ["addr", "del", addr, "dev", name]:
                if name not in self.links or addr not in self.links[name].addrs:
                    return CommandResult(2, "", "RTNETLINK answers: Cannot assign address\n")
                self.links[name].addrs.remove(addr)
                return CommandResult(0, "", "")
        raise AssertionError(f"unexpected ip command {args}")

    def _iptables(self, tool: str, args: list[str]) -> CommandResult:
        assert args[:3] == ["-w", "5", "-t"], f"{tool} without -w 5: {args}"
        table, op, chain, spec = args[3], args[4], args[5], args[6:]
        rules = self.chains.setdefault((tool, table, chain), [])
        if op == "-S":
            lines = [f"-P {chain} ACCEPT"] + [f"-A {chain} {shlex.join(s)}" for s in rules]
            # iptables quotes with double quotes; shlex.join uses single ones.
            return CommandResult(0, "\n".join(lines).replace("'", '"') + "\n", "")
        assert "--comment" in spec, f"rule without a comment: {spec}"
        if op == "-I":
            rules.insert(0, spec)
            return CommandResult(0, "", "")
        if op == "-D" and spec in rules:
            rules.remove(spec)
            return CommandResult(0, "", "")
        if op == "-D":
            return CommandResult(1, "", "Bad rule (does a matching rule exist in that chain?).\n")
        raise AssertionError(f"unexpected {tool} command {args}")

    def _nft(self, args: list[str], stdin: str | None) -> CommandResult:
        missing = CommandResult(1, "", "Error: No such file or directory\n")
        if args == ["list", "table", "inet", "dnsproxy"]:
            return missing if self.nft_table is None else CommandResult(0, self.nft_table, "")
        if args == ["-f", "-"]:
            assert stdin is not None
            lines = stdin.splitlines()
            # One transaction that replaces the table whole, whether it exists or not.
            assert lines[:3] == [
                "add table inet dnsproxy",
                "delete table inet dnsproxy",
                "table inet dnsproxy {",
            ]
            self.nft_table = "\n".join(lines[2:]) + "\n"
            return CommandResult(0, "", "")
        if args == ["delete", "table", "inet", "dnsproxy"]:
            if self.nft_table is None:
                return missing
            self.nft_table = None
            return CommandResult(0, "", "")
        raise AssertionError(f"unexpected nft command {args}")


def node_config(**overrides: Any) -> NodeConfig:
    base = NodeConfig(local_ips=(IP4, IP6), rules="iptables", health_port=8080)
    return dataclasses.replace(base, **overrides)


LOCK = CommandResult(4, "", "Another app is currently holding the xtables lock. Stopped waiting.")


# --- the rules --------------------------------------------------------------------------


def test_rules_are_node_caches_twelve_per_ip_with_unique_comments() -> None:
    rules = build_rules([IP4, IP6], 8080)
    assert len(rules) == 24
    assert len({r.comment for r in rules}) == 24
    assert all(r.comment.startswith("dnsproxy: ") for r in rules)
    assert {r.iptables for r in rules if r.ip == IP6} == {"ip6tables"}
    assert {r.iptables for r in rules if r.ip == IP4} == {"iptables"}
    v4 = [(r.table, r.chain, r.proto, r.direction, r.port, r.target) for r in rules if r.ip == IP4]
    for proto in ("udp", "tcp"):
        assert ("raw", "PREROUTING", proto, "dst", 53, "NOTRACK") in v4
        assert ("filter", "INPUT", proto, "dst", 53, "ACCEPT") in v4
        assert ("raw", "OUTPUT", proto, "src", 53, "NOTRACK") in v4
        assert ("filter", "OUTPUT", proto, "src", 53, "ACCEPT") in v4
        assert ("raw", "OUTPUT", proto, "dst", 53, "NOTRACK") in v4
    assert ("raw", "OUTPUT", "tcp", "dst", 8080, "NOTRACK") in v4
    assert ("raw", "OUTPUT", "tcp", "src", 8080, "NOTRACK") in v4
    assert len(build_rules([IP4], None)) == 10


def test_iptables_argv_waits_for_the_lock_and_carries_the_comment() -> None:
    rule = build_rules([IP4], None)[0]
    assert rule.iptables_argv("-I") == [
        *("iptables", "-w", "5", "-t", "raw", "-I", "PREROUTING"),
        *("-p", "tcp", "-d", IP4, "--dport", "53"),
        *("-m", "comment", "--comment", f"dnsproxy: notrack queries to {IP4} tcp/53"),
        *("-j", "NOTRACK"),
    ]


def test_fail_safe_rules_match_queries_only_while_a_socket_is_bound() -> None:
    rules = build_rules([IP4, IP6], 8080, when_bound=True)
    assert len(rules) == 24 and len({r.comment for r in rules}) == 24
    bound = [r for r in rules if r.bound]
    # Only arriving queries: OUTPUT has no lookup of the receiving socket.
    assert {(r.table, r.chain, r.direction, r.target) for r in bound} == {
        ("raw", "PREROUTING", "dst", "NOTRACK")
    }
    assert len(bound) == 4
    udp4 = next(r for r in bound if r.ip == IP4 and r.proto == "udp")
    assert udp4.iptables_argv("-I") == [
        *("iptables", "-w", "5", "-t", "raw", "-I", "PREROUTING"),
        *("-p", "udp", "-d", IP4, "--dport", "53", "-m", "socket", "--nowildcard"),
        *("-m", "comment", "--comment", f"dnsproxy: notrack queries to {IP4} udp/53 while bound"),
        *("-j", "NOTRACK"),
    ]
    assert udp4.nft_line() == (
        f"ip daddr {IP4} udp dport 53 socket wildcard 0 notrack "
        f'comment "dnsproxy: notrack queries to {IP4} udp/53 while bound"'
    )
    # nft's wildcard key misses TCP handshakes in progress: TCP counts any socket.
    tcp4 = next(r for r in bound if r.ip == IP4 and r.proto == "tcp")
    assert " socket transparent 0 notrack " in tcp4.nft_line()


def test_fallback_rules_rewrite_new_connections_of_their_family_then_bind_them() -> None:
    rules = build_rules([IP4, IP6], None, when_bound=True, fallback_ip=CLUSTER_DNS)
    fallback = [r for r in rules if r.target in ("REWRITE", "DNAT")]
    assert {r.ip for r in fallback} == {IP4}  # the IPv6 local IP has no IPv6 fallback
    assert len(rules) == 20 + 4
    text = nft_ruleset(rules)
    assert "\tchain fallback {\n\t\ttype filter hook prerouting priority mangle;" in text
    assert "\tchain fallback_nat {\n\t\ttype nat hook prerouting priority dstnat + 10;" in text
    assert (
        f"ip daddr {IP4} udp dport 53 ct state new ip daddr set {CLUSTER_DNS} "
        f'comment "dnsproxy: fallback of {IP4} udp/53 to {CLUSTER_DNS}"'
    ) in text
    assert (
        f"ip daddr {CLUSTER_DNS} tcp dport 53 ct original ip daddr {IP4} dnat ip to {CLUSTER_DNS} "
        f'comment "dnsproxy: fallback nat of {IP4} tcp/53 to {CLUSTER_DNS}"'
    ) in text
    six = build_rules([IP6], None, when_bound=True, fallback_ip="2001:db8::53")
    assert "ct original ip6 daddr 2001:db8::a dnat ip6 to 2001:db8::53" in nft_ruleset(six)


def test_nft_ruleset_is_one_replacing_transaction_with_raw_and_filter_chains() -> None:
    text = nft_ruleset(build_rules([IP4, IP6], 8080))
    lines = text.splitlines()
    assert lines[:3] == [
        "add table inet dnsproxy",
        "delete table inet dnsproxy",
        "table inet dnsproxy {",
    ]
    assert "type filter hook prerouting priority raw; policy accept;" in text
    assert "type filter hook output priority raw; policy accept;" in text
    assert "type filter hook input priority filter; policy accept;" in text
    assert f'ip daddr {IP4} udp dport 53 notrack comment "dnsproxy: notrack queries to' in text
    assert f"ip6 saddr {IP6} tcp sport 53 accept" in text
    assert len(nft_comments(text)) == 24


def test_listing_parsers() -> None:
    listing = (
        "-P PREROUTING ACCEPT\n"
        '-A PREROUTING -d 169.254.20.10/32 -p udp -m udp --dport 53 -m comment --comment "dnsproxy: a b" -j NOTRACK\n'  # noqa: E501
        "-A PREROUTING -p tcp -j ACCEPT\n"
        "-A PREROUTING -m comment --comment plain -j ACCEPT\n"
    )
    assert iptables_comments(listing) == ["dnsproxy: a b", "plain"]
    nft = 'ip daddr 1.2.3.4 udp dport 53 notrack comment "x y" # handle 4\n accept comment "z"'
    assert nft_comments(nft) == ["x y", "z"]


@pytest.mark.parametrize(
    ("wanted", "nft", "iptables", "version", "expected"),
    [
        ("auto", "/usr/sbin/nft", "/usr/sbin/iptables", "iptables v1.8.9 (nf_tables)", "nftables"),
        ("auto", "/usr/sbin/nft", None, "", "nftables"),
        ("auto", "/usr/sbin/nft", "/usr/sbin/iptables", "iptables v1.8.9 (legacy)", "iptables"),
        ("auto", "/usr/sbin/nft", "/usr/sbin/iptables", "iptables v1.6.1", "iptables"),
        ("auto", None, "/usr/sbin/iptables", "iptables v1.8.9 (nf_tables)", "iptables"),
        ("iptables", "/usr/sbin/nft", None, "", "iptables"),
        ("nftables", None, "/usr/sbin/iptables", "", "nftables"),
        ("none", None, None, "", "none"),
    ],
)
def test_choose_backend(
    wanted: str, nft: str | None, iptables: str | None, version: str, expected: str
) -> None:
    assert choose_backend(wanted, nft, iptables, version) == expected


def test_choose_backend_auto_without_any_tool_says_what_to_do() -> None:
    with pytest.raises(NodeError, match="neither nft nor iptables"):
        choose_backend("auto", None, None, "")


def test_plan_iptables_is_the_exact_commands() -> None:
    config = NodeConfig(local_ips=(IP4,), rules="iptables", health_port=8080)
    lines = plan(config, "iptables").splitlines()
    commands = [line for line in lines if not line.startswith("#")]
    assert commands[:3] == [
        "ip link add nodelocaldns type dummy",
        "ip link set nodelocaldns up",
        f"ip addr add {IP4}/32 dev nodelocaldns",
    ]
    inserts = commands[3:]
    rules = build_rules([IP4], 8080, when_bound=True)
    assert inserts == [shlex.join(r.iptables_argv("-I")) for r in rules]
    assert len(inserts) == 12
    assert sum("-m socket --nowildcard" in line for line in inserts) == 2  # udp and tcp


def test_plan_iptables_says_the_fallback_ip_needs_nftables() -> None:
    config = NodeConfig(local_ips=(IP4,), rules="iptables", fallback_ip=CLUSTER_DNS)
    text = plan(config, "iptables")
    assert f"# node.fallback_ip {CLUSTER_DNS} is not applied: the iptables backend" in text
    assert CLUSTER_DNS not in text.split("# dnsproxy node setup", 1)[1].split("\n", 3)[3]
    assert len([line for line in text.splitlines() if line.startswith("iptables")]) == 10


def test_plan_nftables_is_the_ruleset_in_a_heredoc() -> None:
    config = NodeConfig(local_ips=(IP6,), setup_interface=False, rules="nftables")
    text = plan(config, "nftables")
    body = text.split("nft -f - <<'EOF'\n", 1)[1]
    assert body == nft_ruleset(build_rules([IP6], None, when_bound=True)) + "EOF\n"
    assert "ip link" not in text
    unconditional = dataclasses.replace(config, fallback=False)
    assert "socket" not in plan(unconditional, "nftables")
    assert "fail-safe" not in plan(unconditional, "nftables")


# --- NodeManager on a fake host ---------------------------------------------------------


async def test_install_from_scratch_then_a_sync_changes_nothing() -> None:
    host = FakeHost()
    node = NodeManager(node_config(), "iptables", host)
    await node.setup_interface()
    assert host.links["nodelocaldns"] == Link("dummy", up=True, addrs=[f"{IP4}/32", f"{IP6}/128"])
    assert ["ip", "-6", "addr", "add", f"{IP6}/128", "dev", "nodelocaldns", "nodad"] in host.calls
    assert await node.sync()
    assert host.rule_count() == 24
    assert node.stats.rules_readded == 0
    host.calls.clear()
    assert await node.sync()
    # Verifying is listing only: one -S per chain and family, nothing inserted.
    assert all("-S" in c for c in host.named("iptables") + host.named("ip6tables"))
    assert host.rule_count() == 24
    assert node.stats.rules_present == 24
    assert node.stats.syncs == 2


async def test_missing_rule_and_address_are_added_again_and_counted() -> None:
    host = FakeHost()
    node = NodeManager(node_config(), "iptables", host)
    await node.setup_interface()
    await node.sync()
    host.chains[("iptables", "raw", "PREROUTING")].pop()
    host.chains[("ip6tables", "filter", "INPUT")].pop()
    host.links["nodelocaldns"].addrs.remove(f"{IP4}/32")
    assert await node.sync()
    assert host.rule_count() == 24
    assert node.stats.rules_readded == 2
    assert node.stats.addresses_readded == 1
    assert f"{IP4}/32" in host.links["nodelocaldns"].addrs


async def test_duplicates_are_removed_down_to_one_copy() -> None:
    host = FakeHost()
    node = NodeManager(node_config(), "iptables", host)
    await node.sync()
    chain = host.chains[("iptables", "filter", "INPUT")]
    chain += [chain[0], chain[0]]
    assert await node.sync()
    assert host.rule_count() == 24
    for _ in range(5):
        await node.sync()
    assert host.rule_count() == 24


async def test_deleted_link_is_made_again() -> None:
    host = FakeHost()
    node = NodeManager(node_config(), "none", host)
    await node.setup_interface()
    await node.sync()
    del host.links["nodelocaldns"]
    assert await node.sync()
    assert host.links["nodelocaldns"].addrs == [f"{IP4}/32", f"{IP6}/128"]
    assert node.stats.addresses_readded == 2


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
async def test_rules_of_a_killed_instance_are_reported_and_adopted(
    backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    host = FakeHost()
    first = NodeManager(node_config(), backend, host)
    with caplog.at_level(logging.INFO, logger="dnsproxy.node"):
        assert await first.sync()
    assert first.stats.rules_left_over == 0
    assert "no rules of a previous instance found" in caplog.text
    # SIGKILL: no teardown. The next instance finds them, says so, and changes nothing.
    caplog.clear()
    calls = len(host.calls)
    second = NodeManager(node_config(), backend, host)
    with caplog.at_level(logging.WARNING, logger="dnsproxy.node"):
        assert await second.sync()
    assert second.stats.rules_left_over == 24
    assert "24 of our rules were in place at start" in caplog.text
    assert all(c[1:3] != ["-t", "raw"] or "-S" in c for c in host.calls[calls:])
    assert not any(c[:2] == ["nft", "-f"] for c in host.calls[calls:])
    assert second.stats.rules_readded == 0 and second.stats.rules_present == 24
    # The count is the start's: later syncs leave it alone.
    await second.teardown()
    assert await second.sync()
    assert second.stats.rules_left_over == 24


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
async def test_rules_no_longer_built_are_replaced(backend: str) -> None:
    """A node upgraded from unconditional rules (or with fallback switched) gets the new set."""
    host = FakeHost()
    old = NodeManager(node_config(fallback=False, health_port=9999), backend, host)
    assert await old.sync()
    # Someone else's rule for our IP, without our comment prefix, is left alone.
    host.chains.setdefault(("iptables", "raw", "PREROUTING"), []).append(
        ["-d", IP4, "-m", "comment", "--comment", f"cni: {IP4} ", "-j", "ACCEPT"]
    )
    new = NodeManager(node_config(), backend, host)
    assert await new.sync()
    assert new.stats.rules_left_over == 24
    if backend == "iptables":
        comments = [c for chain in host.chains.values() for c in iptables_comments(
            "\n".join(f"-A X {shlex.join(spec)}" for spec in chain))]  # fmt: skip
        assert f"cni: {IP4} " in comments
        comments.remove(f"cni: {IP4} ")
    else:
        assert host.nft_table is not None
        comments = nft_comments(host.nft_table)
    assert sorted(comments) == sorted(
        r.comment for r in build_rules([IP4, IP6], 8080, when_bound=True)
    )
    assert new.stats.rules_readded == 0
    await new.teardown()
    assert host.rule_count() == 1  # the cni rule
    assert host.nft_table is None


async def test_fallback_ip_is_installed_by_nftables_and_refused_by_iptables_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = FakeHost()
    nft = NodeManager(node_config(fallback_ip=CLUSTER_DNS), "nftables", host)
    assert await nft.sync()
    assert host.nft_table is not None
    assert f"ct original ip daddr {IP4} dnat ip to {CLUSTER_DNS}" in host.nft_table
    assert nft.stats.rules_present == 24 + 4
    with caplog.at_level(logging.WARNING, logger="dnsproxy.node"):
        ipt = NodeManager(node_config(fallback_ip=CLUSTER_DNS), "iptables", host)
    assert "the iptables backend cannot rewrite" in caplog.text and IP4 in caplog.text
    assert await ipt.sync()
    assert host.rule_count() == 24
    assert not any(CLUSTER_DNS in " ".join(c) for c in host.named("iptables"))


async def test_lock_timeout_is_counted_as_iptables_lock_and_retried() -> None:
    host = FakeHost(failures={("iptables",): LOCK})
    node = NodeManager(node_config(local_ips=(IP4,)), "iptables", host)
    assert not await node.sync()
    assert node.stats.errors["iptables_lock"] >= 1
    assert host.rule_count() == 0
    host.failures.clear()
    assert await node.sync()
    assert host.rule_count() == 12
    # The first complete install is not a re-add.
    assert node.stats.rules_readded == 0


async def test_other_iptables_failure_is_counted_as_iptables() -> None:
    bad = CommandResult(2, "", "iptables v1.8.9: can't initialize iptables table `raw'\n")
    host = FakeHost(failures={("iptables", "-w", "5", "-t", "raw"): bad})
    node = NodeManager(node_config(local_ips=(IP4,)), "iptables", host)
    assert not await node.sync()
    assert node.stats.errors["iptables"] >= 1
    assert node.stats.errors["iptables_lock"] == 0


async def test_without_dummy_links_the_addresses_go_on_lo_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    host = FakeHost(dummy_supported=False)
    node = NodeManager(node_config(), "none", host)
    with caplog.at_level(logging.WARNING, logger="dnsproxy.node"):
        await node.setup_interface()
    assert node.device == "lo"
    assert host.links["lo"].addrs == [f"{IP4}/32", f"{IP6}/128"]
    assert "no dummy links" in caplog.text and "lo" in caplog.text
    assert node.stats.errors["interface_add"] == 0
    await node.teardown()
    assert host.links["lo"].addrs == []
    assert "lo" in host.links


async def test_interface_failure_stops_the_start() -> None:
    denied = CommandResult(2, "", "RTNETLINK answers: Operation not permitted\n")
    host = FakeHost(failures={("ip", "link", "add"): denied})
    node = NodeManager(node_config(), "none", host)
    with pytest.raises(NodeError, match="cannot put"):
        await node.setup_interface()
    assert node.stats.errors["interface_add"] == 1


async def test_teardown_removes_every_copy_then_the_link() -> None:
    host = FakeHost()
    node = NodeManager(node_config(), "iptables", host)
    await node.setup_interface()
    await node.sync()
    chain = host.chains[("iptables", "raw", "PREROUTING")]
    chain.append(chain[0])  # a copy left by someone else: node-cache removes them all
    await node.teardown()
    assert host.rule_count() == 0
    assert "nodelocaldns" not in host.links
    assert sum(node.stats.errors.values()) == 0


async def test_existing_non_dummy_interface_keeps_living_after_teardown() -> None:
    host = FakeHost(links={"lo": Link("loopback"), "nodelocaldns": Link("bridge")})
    node = NodeManager(node_config(), "none", host)
    await node.setup_interface()
    await node.teardown()
    assert host.links["nodelocaldns"].addrs == []


async def test_setup_interface_off_touches_no_interface() -> None:
    host = FakeHost()
    node = NodeManager(node_config(setup_interface=False), "iptables", host)
    await node.setup_interface()
    await node.sync()
    await node.teardown()
    assert host.named("ip") == []


async def test_nftables_install_repair_and_teardown() -> None:
    host = FakeHost()
    node = NodeManager(node_config(), "nftables", host)
    assert await node.sync()
    assert host.nft_table is not None
    assert len(nft_comments(host.nft_table)) == 24
    applied = len([c for c in host.calls if c[:2] == ["nft", "-f"]])
    assert await node.sync()
    assert len([c for c in host.calls if c[:2] == ["nft", "-f"]]) == applied  # verify only
    # A rule deleted by hand: the whole table is replaced, the missing rule counted.
    lines = host.nft_table.splitlines()
    host.nft_table = "\n".join(line for line in lines if "accept queries to 169" not in line)
    assert await node.sync()
    assert node.stats.rules_readded == 2  # udp and tcp
    assert len(nft_comments(host.nft_table)) == 24
    host.nft_table = None  # the whole table deleted (nft flush ruleset)
    assert await node.sync()
    assert node.stats.rules_readded == 26
    await node.teardown()
    assert host.nft_table is None
    assert sum(node.stats.errors.values()) == 0


async def test_nftables_failure_is_counted() -> None:
    host = FakeHost(failures={("nft", "-f"): CommandResult(1, "", "Error: syntax error")})
    node = NodeManager(node_config(), "nftables", host)
    assert not await node.sync()
    assert node.stats.errors["nftables"] == 1


def test_check_tools_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dnsproxy.node, "find_tool", lambda name: None if name == "nft" else "/x")
    node = NodeManager(node_config(), "nftables", FakeHost())
    with pytest.raises(NodeError, match="needs nft"):
        node.check_tools()
    NodeManager(node_config(), "iptables", FakeHost()).check_tools()


async def test_collector_exports_every_error_type_and_the_counters() -> None:
    host = FakeHost(failures={("iptables",): LOCK})
    node = NodeManager(node_config(local_ips=(IP4,)), "iptables", host)
    await node.sync()
    families = {m.name: m for m in NodeCollector(node.stats).collect()}
    errors = {
        s.labels["errortype"]: s.value for s in families["dnsproxy_node_setup_errors"].samples
    }
    assert set(errors) == {
        "iptables",
        "iptables_lock",
        "nftables",
        "interface_add",
        "interface_check",
    }
    assert errors["iptables_lock"] >= 1
    assert "dnsproxy_node_rules_readded" in families
    assert "dnsproxy_node_rules_left_over" in families
    assert "dnsproxy_node_addresses_readded" in families


async def test_run_command_times_out_and_reports_missing_tools() -> None:
    result = await dnsproxy.node.run_command(["sleep", "5"], None, 0.2)
    assert result.rc == -1 and "timed out" in result.stderr
    result = await dnsproxy.node.run_command(["no-such-tool-dnsproxy"], None, 1.0)
    assert result.rc == 127
    result = await dnsproxy.node.run_command(["cat"], "hello", 5.0)
    assert (result.rc, result.stdout) == (0, "hello")


# --- the lifecycle in App, on a fake host -----------------------------------------------


@pytest.fixture
def fake_node(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    """App's NodeManager runs its commands on a FakeHost instead of this machine."""
    host = FakeHost()

    def manager(config: NodeConfig, backend: Any) -> NodeManager:
        return NodeManager(config, backend, host)

    monkeypatch.setattr(dnsproxy.app, "NodeManager", manager)
    monkeypatch.setattr(dnsproxy.node, "find_tool", lambda name: f"/usr/sbin/{name}")
    return host


async def ask(app: App, name: str = "www.example.") -> str:
    hp = app.listen[0]
    reply = await dns.asyncquery.udp(
        dns.message.make_query(name, "A"), hp.host, port=hp.port, timeout=2
    )
    return str(reply.answer[0][0]) if reply.answer else ""


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_app_order_addresses_bind_rules_ready(fake_node: FakeHost) -> None:
    seen: list[tuple[str, int, bool]] = []
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, node=node_config(sync_interval_s=0.05))
        app = App(config)
        fake_node.on_call = lambda argv: seen.append((argv[0], len(app.listen), app.ready))
        await app.start()
        try:
            first_ip = next(s for s in seen if s[0] == "ip")
            first_rule = next(s for s in seen if s[0] == "iptables")
            assert first_ip[1] == 0  # addresses before the bind needs them
            assert first_rule[1] == 1 and not first_rule[2]  # rules after the bind, not ready
            assert app.ready
            assert fake_node.rule_count() == 24
            assert await ask(app) == "169.254.1.1"
            # The sync loop repairs a rule deleted by hand.
            fake_node.chains[("iptables", "raw", "PREROUTING")].clear()
            node = app.node
            assert node is not None
            await wait_until(lambda: node.stats.rules_readded == 2, "re-added rules")
            assert fake_node.rule_count() == 24
        finally:
            await app.stop()
    assert fake_node.rule_count() == 0
    assert "nodelocaldns" not in fake_node.links


async def test_app_not_ready_until_the_rules_are_in(fake_node: FakeHost) -> None:
    fake_node.failures[("iptables",)] = LOCK
    fake_node.failures[("ip6tables",)] = LOCK
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, node=node_config(sync_interval_s=0.05))
        app = App(config)
        await app.start()
        try:
            assert not app.ready
            assert await ask(app) == "169.254.1.1"  # serving meanwhile
            fake_node.failures.clear()
            await wait_until(lambda: app.ready, "ready after the rules are in")
            assert fake_node.rule_count() == 24
        finally:
            await app.stop()


async def test_app_lameduck_keeps_serving_with_rules_then_tears_down(fake_node: FakeHost) -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, node=node_config(), shutdown_lameduck_s=0.5)
        app = App(config)
        await app.start()
        stopping = asyncio.create_task(app.stop())
        try:
            await asyncio.sleep(0.1)
            assert not app.ready
            assert not stopping.done()
            assert await ask(app) == "169.254.1.1"
            assert fake_node.rule_count() == 24
            assert fake_node.links["nodelocaldns"].addrs
        finally:
            await stopping
    assert fake_node.rule_count() == 0
    assert "nodelocaldns" not in fake_node.links


async def test_app_second_signal_cuts_lameduck_short(fake_node: FakeHost) -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, node=node_config(), shutdown_lameduck_s=30)
        app = App(config)
        await app.start()
        stopping = asyncio.create_task(app.stop())
        await asyncio.sleep(0.05)
        app.hurry()
        await asyncio.wait_for(stopping, 5)
    assert fake_node.rule_count() == 0


async def test_app_teardown_off_leaves_rules_and_addresses(fake_node: FakeHost) -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, node=node_config(teardown=False))
        app = App(config)
        await app.start()
        await app.stop()
    assert fake_node.rule_count() == 24
    assert fake_node.links["nodelocaldns"].addrs == [f"{IP4}/32", f"{IP6}/128"]


async def test_app_metrics_include_the_node_counters(fake_node: FakeHost) -> None:
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = make_config(fake.port, node=node_config(), http=True)
        app = App(config)
        await app.start()
        try:
            names = {m.name for m in app.registry.collect()}
        finally:
            await app.stop()
    assert {"dnsproxy_node_setup_errors", "dnsproxy_node_rules_readded"} <= names


async def test_app_health_listen_is_a_second_endpoint() -> None:
    import urllib.request

    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        from dnsproxy.config import HostPort

        config = make_config(fake.port, health_listen=HostPort("127.0.0.1", 0))
        app = App(config)
        await app.start()
        try:
            assert app.health is not None
            url = f"http://127.0.0.1:{app.health.port}"

            def get(path: str) -> int:
                with urllib.request.urlopen(url + path, timeout=2) as r:
                    return int(r.status)

            assert await asyncio.to_thread(get, "/health") == 200
            assert await asyncio.to_thread(get, "/ready") == 200
        finally:
            await app.stop()


# --- configuration ----------------------------------------------------------------------


def parse(doc: str, overrides: Overrides | None = None) -> Any:
    import yaml

    return parse_config(yaml.safe_load(doc), env={"UP": "169.254.0.10"}, overrides=overrides)


ZONES = "zones: [{zone: ., upstreams: ['${UP}']}]\n"


def problems(doc: str, overrides: Overrides | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(doc, overrides)
    return info.value.problems


def test_node_section_defaults_take_local_ips_from_listen() -> None:
    config = parse(
        "listen: ['169.254.20.10:53', '[2001:db8::a]:53', '127.0.0.1:5353']\n"
        "health_listen: '169.254.20.10:8080'\nnode: {}\n" + ZONES
    )
    assert config.node == NodeConfig(local_ips=(IP4, IP6), health_port=8080)
    assert config.health_listen is not None and config.health_listen.port == 8080
    assert config.shutdown_lameduck_s == 0.0


def test_no_node_section_means_no_node_role() -> None:
    assert parse("listen: ['169.254.20.10:53']\n" + ZONES).node is None


def test_node_section_every_key() -> None:
    config = parse(
        "listen: ['169.254.20.10:53', '169.254.30.10:53']\n"
        "shutdown: {lameduck_s: 2.5}\n"
        "node:\n"
        "  local_ips: ['169.254.20.10', '169.254.30.10']\n"
        "  interface: dnsp0\n"
        "  setup_interface: false\n"
        "  rules: NFTables\n"
        "  sync_interval_s: 1.5\n"
        "  teardown: false\n"
        "  health_port: null\n"
        "  fallback: true\n"
        "  fallback_ip: '${UP}'\n" + ZONES
    )
    assert config.node == NodeConfig(
        local_ips=(IP4, "169.254.30.10"),
        interface="dnsp0",
        setup_interface=False,
        rules="nftables",
        sync_interval_s=1.5,
        teardown=False,
        health_port=None,
        fallback=True,
        fallback_ip="169.254.0.10",
    )
    assert config.shutdown_lameduck_s == 2.5
    # Without the fail-safe, a wildcard listener may serve a local IP.
    config = parse(
        "listen: ['0.0.0.0:53']\nnode: {local_ips: ['169.254.20.10'], fallback: false}\n" + ZONES
    )
    assert config.node == NodeConfig(local_ips=(IP4,), fallback=False)


def test_fallback_problems_name_the_key_and_the_fix() -> None:
    found = problems(
        "listen: ['169.254.20.10:53', '0.0.0.0:53']\n"
        "node: {local_ips: ['169.254.20.10', '169.254.30.10'], fallback_ip: '169.254.20.10'}\n"
        + ZONES
    )
    assert found == [
        "node.fallback: 169.254.30.10 is served only by a wildcard listener; the fail-safe "
        "rules need a socket bound to the address: add 169.254.30.10:53 to listen (or set "
        "fallback: false)",
        "node.fallback_ip: 169.254.20.10 is a local IP: queries would come back here (use the "
        "kube-dns-upstream ClusterIP)",
    ]
    listen = "listen: ['169.254.20.10:53']\n"
    for node, problem in [
        ("{fallback_ip: kube-dns}", "'kube-dns' is not an IP address"),
        ("{fallback_ip: '2001:db8::53'}", "no local IP is IPv6 like 2001:db8::53"),
        ("{fallback_ip: '169.254.0.10', fallback: false}", "needs fallback: true"),
        ("{fallback_ip: '0.0.0.0'}", "0.0.0.0 cannot take DNS queries (use a unicast IP)"),
        ("{fallback_ip: '${NOPE}'}", "environment variable NOPE is not set"),
    ]:
        assert problems(f"{listen}node: {node}\n" + ZONES) == [f"node.fallback_ip: {problem}"]
    assert problems(f"{listen}node: {{fallback: maybe}}\n" + ZONES) == [
        "node.fallback: must be true or false (got 'maybe')"
    ]


def test_node_section_problems_all_reported_with_key_paths() -> None:
    found = problems(
        "listen: ['169.254.20.10:53', '[2001:db8::a]:5353']\n"
        "shutdown: {lameduck_s: -1}\n"
        "node:\n"
        "  local_ips: ['169.254.20.10', 'nodelocal', '2001:db8::a', '127.0.0.1', "
        "'169.254.20.10']\n"
        "  interface: 'a/b'\n"
        "  rules: ipchains\n"
        "  sync_interval_s: 0\n"
        "  teardown: maybe\n"
        "  health_port: 70000\n"
        "  sync_interval: 5\n" + ZONES
    )
    assert found == [
        "shutdown.lameduck_s: must be a number of seconds >= 0 (got -1)",
        "node.sync_interval: unknown key (did you mean 'sync_interval_s'?)",
        "node.local_ips[1]: 'nodelocal' is not an IP address",
        "node.local_ips[2]: nothing listens on [2001:db8::a]:53: add it to listen (the rules "
        "would send queries to an address no listener serves)",
        "node.local_ips[3]: 127.0.0.1 cannot be a local DNS address (use a unicast IP)",
        "node.local_ips[4]: 169.254.20.10 is listed twice",
        "node.interface: must be an interface name of 1-15 letters, digits, '_', '.' or '-' "
        "(got 'a/b')",
        "node.rules: must be one of iptables, nftables, auto, none (got 'ipchains')",
        "node.sync_interval_s: must be a number of seconds > 0 (got 0)",
        "node.teardown: must be true or false (got 'maybe')",
        "node.health_port: must be a port 1-65535 or null (got 70000)",
    ]


def test_node_without_a_port_53_listener_is_refused() -> None:
    assert problems("listen: ['127.0.0.1:5353']\nnode: {}\n" + ZONES) == [
        "node.local_ips: required: no listen address on port 53 to take them from "
        '(e.g. listen: ["169.254.20.10:53"])'
    ]


def test_node_flags_turn_the_role_on_and_replace_keys() -> None:
    overrides = Overrides(
        listen=("169.254.20.10:53", "169.254.30.10:53"),
        local_ips=("169.254.20.10,169.254.30.10",),
        rules="iptables",
        sync_interval="1",
        teardown=False,
        setup_interface=False,
        interface="lo",
        health_port="9999",
        lameduck="0.5",
        health_listen="169.254.20.10:8080",
    )
    config = parse(ZONES, overrides)
    assert config.node == NodeConfig(
        local_ips=(IP4, "169.254.30.10"),
        interface="lo",
        setup_interface=False,
        rules="iptables",
        sync_interval_s=1.0,
        teardown=False,
        health_port=9999,
    )
    assert config.shutdown_lameduck_s == 0.5


def test_node_flag_problems_name_the_flag() -> None:
    overrides = Overrides(
        listen=("169.254.20.10:53",),
        local_ips=("169.254.20.10,bogus",),
        rules="x",
        sync_interval="soon",
        health_port="http",
        lameduck="-2",
    )
    assert problems(ZONES, overrides) == [
        "--lameduck: must be a number of seconds >= 0 (got -2)",
        "--local-ip[1]: 'bogus' is not an IP address",
        "--rules: must be one of iptables, nftables, auto, none (got 'x')",
        "--sync-interval: must be a number of seconds > 0 (got 'soon')",
        "--health-port: must be a port 1-65535 or null (got 'http')",
    ]


def test_shipped_nodelocal_config() -> None:
    env = {"KUBE_DNS_UPSTREAM_SERVICE_HOST": "169.254.0.10"}
    config = load_config(str(NODELOCAL), Overrides(upstreams=("169.254.0.11",)), env=env)
    assert [hp.__str__() for hp in config.listen] == ["169.254.20.10:53"]
    assert str(config.http_listen) == "0.0.0.0:9253"
    assert str(config.health_listen) == "169.254.20.10:8080"
    assert config.allow == ()
    assert config.node == NodeConfig(
        local_ips=("169.254.20.10",), health_port=8080, fallback_ip="169.254.0.10"
    )
    assert config.shutdown_lameduck_s == 5.0
    zones = {z.zone: z for z in config.zones}
    assert list(zones) == ["cluster.local.", "in-addr.arpa.", "ip6.arpa.", "."]
    for name in ("cluster.local.", "in-addr.arpa.", "ip6.arpa."):
        zone = zones[name]
        assert [u.label for u in zone.upstreams] == ["tcp://169.254.0.10:53"]
        assert zone.cache.denial_max_ttl_s == 5
        assert zone.cache.max_ttl_s == 30
    assert zones["."].cache.max_ttl_s == 30
    assert all(u.transport == "tcp" for u in zones["."].upstreams)


def test_shipped_nodelocal_config_comments_every_key() -> None:
    assert undocumented_keys(NODELOCAL) == []


# --- the command line -------------------------------------------------------------------


def env_with(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "KUBE_DNS_UPSTREAM_SERVICE_HOST"}
    return {**env, **extra}


def test_check_config_accepts_nodelocal_with_the_variable_and_refuses_without() -> None:
    ok = dnsproxy_cmd(
        "check-config",
        str(NODELOCAL),
        env=env_with(KUBE_DNS_UPSTREAM_SERVICE_HOST="169.254.0.10"),
    )
    # "." reads this machine's /etc/resolv.conf: without one, only that problem may appear.
    if ok.returncode != 0 and "resolv.conf" in ok.stderr:
        pytest.skip(f"this machine's /etc/resolv.conf is unusable: {ok.stderr.strip()}")
    assert ok.returncode == 0, ok.stderr
    assert "cluster.local. -> tcp://169.254.0.10:53" in ok.stdout
    assert "node: 169.254.20.10 on nodelocaldns, rules auto, sync 60s, teardown on" in ok.stdout
    refused = dnsproxy_cmd("check-config", str(NODELOCAL), env=env_with())
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert (
        f"{NODELOCAL}: zones[0].upstreams[0]: environment variable "
        "KUBE_DNS_UPSTREAM_SERVICE_HOST is not set"
    ) in refused.stderr.splitlines()


def write_node_config(tmp_path: Path, rules: str) -> str:
    path = tmp_path / "node.yaml"
    path.write_text(
        "listen: ['169.254.20.10:53', '[2001:db8::a]:53']\n"
        "health_listen: '169.254.20.10:8080'\n"
        f"node: {{rules: {rules}}}\n"
        "zones: [{zone: ., upstreams: ['169.254.0.10']}]\n"
    )
    return str(path)


def test_node_setup_dry_run_iptables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_node_config(tmp_path, "iptables")
    assert main(["node-setup", "--dry-run", "--config", path]) == 0
    out = capsys.readouterr().out
    config = NodeConfig(local_ips=(IP4, IP6), rules="iptables", health_port=8080)
    assert out == plan(config, "iptables")
    commands = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(commands) == 2 + 2 + 24  # link add + up, two addresses, 12 rules per IP
    assert all(shlex.split(c)[0] in ("ip", "iptables", "ip6tables") for c in commands)


def test_node_setup_dry_run_nftables_via_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_node_config(tmp_path, "iptables")
    argv = [
        "node-setup",
        "--dry-run",
        "--config",
        path,
        "--rules",
        "nftables",
        "--no-setup-interface",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[2] == "nft -f - <<'EOF'"
    assert nft_ruleset(build_rules([IP4, IP6], 8080, when_bound=True)) in out
    assert out.endswith("}\nEOF\n")


def test_node_setup_needs_dry_run_and_a_node_section(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_node_config(tmp_path, "none")
    assert main(["node-setup", "--config", path]) == 2
    assert "only --dry-run" in capsys.readouterr().err
    plain = tmp_path / "plain.yaml"
    plain.write_text("zones: [{zone: ., upstreams: ['169.254.0.10']}]\n")
    assert main(["node-setup", "--dry-run", "--config", str(plain)]) == 2
    assert "no node: section" in capsys.readouterr().err


def test_node_setup_dry_run_runs_as_a_process(tmp_path: Path) -> None:
    path = write_node_config(tmp_path, "nftables")
    result = dnsproxy_cmd("node-setup", "--dry-run", "--config", path, env=env_with())
    assert result.returncode == 0, result.stderr
    assert "table inet dnsproxy {" in result.stdout


def test_help_lists_the_node_flags(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--local-ip",
        "--interface",
        "--setup-interface",
        "--rules",
        "--sync-interval",
        "--no-teardown",
        "--health-port",
        "--health-listen",
        "--lameduck",
    ):
        assert flag in out
    assert main(["node-setup", "--help"]) == 0
    assert "--dry-run" in capsys.readouterr().out
