"""Command line: build the Config from a file and flags, then run; or check a file.

``dnsproxy [--config FILE] [flags]`` runs the proxy; ``dnsproxy check-config FILE``
validates a file and prints every problem with its key path; ``dnsproxy node-setup
--dry-run --config FILE`` prints the interface commands and the rules (iptables commands or
nftables ruleset) the node role would apply; ``dnsproxy print-config [NAME]`` prints a
configuration file shipped in the package (``--path``: where it is); ``dnsproxy
import-corefile FILE`` prints the configuration equivalent to a NodeLocal DNSCache Corefile
(see :mod:`dnsproxy.corefile`). Exit status 2 means the configuration (or the command line)
is wrong.
"""

from __future__ import annotations

import argparse
import importlib.resources
import sys
from dataclasses import fields
from typing import Any

from dnsproxy import __version__
from dnsproxy.config import Config, ConfigError, Overrides, load_config

EXIT_CONFIG = 2  # the same status argparse uses for a bad command line

# The files shipped in the package (dnsproxy/data, a link to the repository's config/).
SHIPPED = {
    "default": "dnsproxy.yaml",
    "nodelocal": "nodelocal.yaml",
    "schema": "dnsproxy.schema.json",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dnsproxy`` console script and ``python -m dnsproxy``."""
    args = sys.argv[1:] if argv is None else argv
    # A separate parser keeps the subcommand's FILE from clashing with the run flags.
    if args and args[0] == "check-config":
        return _check_config(args[1:])
    if args and args[0] == "node-setup":
        return _node_setup(args[1:])
    if args and args[0] == "print-config":
        return _print_config(args[1:])
    if args and args[0] == "worker":
        # Internal: a worker process of a supervisor (workers: N), started by it.
        from dnsproxy.workers import worker_main

        return worker_main(args[1:])
    if args and args[0] == "import-corefile":
        from dnsproxy.corefile import main as import_corefile

        return import_corefile(args[1:])
    return _run(args)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dnsproxy",
        description="Node-local caching DNS forwarder. "
        "Subcommands: 'dnsproxy check-config FILE' validates a configuration file; "
        "'dnsproxy node-setup --dry-run --config FILE' prints the node rules it would apply; "
        "'dnsproxy print-config [default|nodelocal|schema]' prints a shipped file; "
        "'dnsproxy import-corefile FILE' converts a NodeLocal DNSCache Corefile.",
    )
    parser.add_argument("--version", action="version", version=f"dnsproxy {__version__}")
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="YAML configuration file (default: built-in: listen on 127.0.0.1:5353 and "
        "[::1]:5353, forward everything to the nameservers of /etc/resolv.conf over TCP)",
    )
    parser.add_argument(
        "--listen",
        metavar="ADDR:PORT",
        action="append",
        default=[],
        help="DNS listen address, UDP and TCP; repeatable; replaces the file's listen list",
    )
    parser.add_argument(
        "--upstream",
        metavar="[ZONE=]UPSTREAM",
        action="append",
        default=[],
        help="upstream for ZONE (default '.'): HOST[:PORT], tcp://HOST:PORT, udp://HOST:PORT, "
        "resolv.conf[:PATH]; repeatable; replaces that zone's upstreams in the file",
    )
    parser.add_argument(
        "--http-listen",
        metavar="ADDR:PORT|none",
        help="address for /metrics, /health, /ready; 'none' disables",
    )
    parser.add_argument(
        "--health-listen",
        metavar="ADDR:PORT|none",
        help="second endpoint for /health and /ready (e.g. the link-local IP:8080)",
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    parser.add_argument("--log-format", metavar="FORMAT", help="text or json")
    parser.add_argument(
        "--lameduck",
        metavar="SECONDS",
        help="after SIGTERM, /ready is 503 while queries are still served this long",
    )
    parser.add_argument(
        "--workers",
        metavar="N",
        help="processes answering queries, each with its own cache (default 1: one "
        "process; N > 1: a supervisor and N workers sharing the listeners)",
    )
    _add_node_flags(parser)
    parsed = _parse(parser, argv)
    if isinstance(parsed, int):
        return parsed
    overrides = _overrides(parsed)
    config = _load(parsed.config, overrides)
    if config is None:
        return EXIT_CONFIG
    # Imported late: checking a file or printing the version must not pay for (or
    # depend on) the event loop and network stack.
    from dnsproxy.app import run

    # The file and flags again: a reload (SIGHUP, or the file changed) reads them anew.
    return run(config, parsed.config, overrides)


def _check_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dnsproxy check-config",
        description="Validate a configuration file; print every problem with its key path.",
    )
    parser.add_argument("file", metavar="FILE", help="YAML configuration file")
    parsed = _parse(parser, argv)
    if isinstance(parsed, int):
        return parsed
    config = _load(parsed.file, None)
    if config is None:
        return EXIT_CONFIG
    print(f"{parsed.file}: ok")
    print(_summary(config))
    return 0


def _print_config(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dnsproxy print-config",
        description="Print a configuration file shipped with dnsproxy, to start your own from.",
    )
    parser.add_argument(
        "name",
        nargs="?",
        default="default",
        choices=list(SHIPPED),
        help="default: every key with its default and comment (what 'make run' uses); "
        "nodelocal: the Kubernetes node cache; schema: the JSON Schema for editors",
    )
    parser.add_argument(
        "--path", action="store_true", help="print where the installed file is instead"
    )
    parsed = _parse(parser, argv)
    if isinstance(parsed, int):
        return parsed
    shipped = importlib.resources.files("dnsproxy") / "data" / SHIPPED[parsed.name]
    if parsed.path:
        print(shipped)
    else:
        sys.stdout.write(shipped.read_text(encoding="utf-8"))
    return 0


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "node (NodeLocal DNSCache role)",
        "Each flag replaces its key in the file's node: section; any of them turns the role on.",
    )
    group.add_argument(
        "--local-ip",
        metavar="IP[,IP]",
        action="append",
        default=[],
        help="local IP to put on the interface and cover with rules; repeatable, comma "
        "lists accepted; IPv4 and IPv6 together (default: the listen addresses on port 53)",
    )
    group.add_argument(
        "--interface", metavar="NAME", help="dummy interface for the IPs (nodelocaldns)"
    )
    group.add_argument(
        "--setup-interface",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="create the interface and add the IPs (default: on)",
    )
    group.add_argument(
        "--rules", metavar="BACKEND", help="iptables, nftables, auto (default) or none"
    )
    group.add_argument(
        "--sync-interval", metavar="SECONDS", help="verify and re-add rules this often (60)"
    )
    group.add_argument(
        "--teardown",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="remove rules and addresses at exit (default: on)",
    )
    group.add_argument(
        "--health-port",
        metavar="PORT|none",
        help="TCP port the health rules cover (default: the health_listen port)",
    )


def _overrides(parsed: argparse.Namespace) -> Overrides:
    """The flags given, by the name each has in Overrides' metadata (``--local-ip`` is
    argparse's ``local_ip``); a subcommand without a flag leaves it unset."""
    given: dict[str, Any] = {}
    for spec in fields(Overrides):
        value = getattr(parsed, spec.metadata["flag"][2:].replace("-", "_"), None)
        if value is not None:
            given[spec.name] = tuple(value) if isinstance(value, list) else value
    return Overrides(**given)


def _node_setup(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dnsproxy node-setup",
        description="Print the commands (iptables backend) or the ruleset (nftables) that "
        "the node role applies on a fresh node, as a shell script to review.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print, do not apply (required: the running proxy applies them itself, "
        "after its listeners are bound)",
    )
    parser.add_argument("-c", "--config", metavar="FILE", help="YAML configuration file")
    parser.add_argument(
        "--listen",
        metavar="ADDR:PORT",
        action="append",
        default=[],
        help="as for running: replaces the file's listen list",
    )
    _add_node_flags(parser)
    parsed = _parse(parser, argv)
    if isinstance(parsed, int):
        return parsed
    if not parsed.dry_run:
        print(
            "dnsproxy node-setup: only --dry-run is supported: the proxy installs the rules "
            "itself once its listeners are bound, so rules never point at nothing",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    config = _load(parsed.config, _overrides(parsed))
    if config is None:
        return EXIT_CONFIG
    if config.node is None:
        print(
            "dnsproxy node-setup: the configuration has no node: section and no node flag "
            "was given; nothing to set up",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    from dnsproxy.node import NodeError, detect_backend, plan

    try:
        backend = detect_backend(config.node.rules)
    except NodeError as e:
        print(f"dnsproxy node-setup: {e}", file=sys.stderr)
        return EXIT_CONFIG
    sys.stdout.write(plan(config.node, backend))
    return 0


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    # argparse exits for --help, --version and usage errors; main() returns a status instead.
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_CONFIG


def _load(path: str | None, overrides: Overrides | None) -> Config | None:
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        for line in e.lines():
            print(line, file=sys.stderr)
        return None


def _summary(config: Config) -> str:
    listen = ", ".join(str(hp) for hp in config.listen)
    zones = ", ".join(f"{z.zone} -> {' '.join(u.label for u in z.upstreams)}" for z in config.zones)
    text = f"listen: {listen}; zones: {zones}; workers: {config.workers}"
    node = config.node
    if node is not None:
        interface = node.interface if node.setup_interface else "not managed"
        text += (
            f"; node: {', '.join(node.local_ips)} on {interface}, rules {node.rules}, "
            f"sync {node.sync_interval_s:g}s, teardown {'on' if node.teardown else 'off'}"
        )
    return text
