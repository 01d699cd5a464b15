"""Command line: build the Config from a file and flags, then run; or check a file.

``dnsproxy [--config FILE] [flags]`` runs the proxy; ``dnsproxy check-config FILE``
validates a file and prints every problem with its key path. Exit status 2 means the
configuration (or the command line) is wrong.
"""

from __future__ import annotations

import argparse
import sys

from dnsproxy import __version__
from dnsproxy.config import Config, ConfigError, Overrides, load_config

EXIT_CONFIG = 2  # the same status argparse uses for a bad command line


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dnsproxy`` console script and ``python -m dnsproxy``."""
    args = sys.argv[1:] if argv is None else argv
    # A separate parser keeps the subcommand's FILE from clashing with the run flags.
    if args and args[0] == "check-config":
        return _check_config(args[1:])
    return _run(args)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="dnsproxy",
        description="Node-local caching DNS forwarder. "
        "Subcommand: 'dnsproxy check-config FILE' validates a configuration file.",
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
    parser.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    parser.add_argument("--log-format", metavar="FORMAT", help="text or json")
    parsed = _parse(parser, argv)
    if isinstance(parsed, int):
        return parsed
    overrides = Overrides(
        listen=tuple(parsed.listen),
        upstreams=tuple(parsed.upstream),
        http_listen=parsed.http_listen,
        log_level=parsed.log_level,
        log_format=parsed.log_format,
    )
    config = _load(parsed.config, overrides)
    if config is None:
        return EXIT_CONFIG
    # Imported late: checking a file or printing the version must not pay for (or
    # depend on) the event loop and network stack.
    from dnsproxy.app import run

    return run(config)


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
    return f"listen: {listen}; zones: {zones}"
