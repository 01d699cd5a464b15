"""Configuration: YAML and command-line flags to frozen dataclasses, with validation.

Every problem is reported with its key path (``zones[1].upstreams[0]: port 70000 out of
range``); all problems are collected before refusing, so one run of ``check-config``
shows them all. No I/O beyond reading the files it is given.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

import yaml

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

Transport = Literal["tcp", "udp"]
Policy = Literal["sequential", "random", "round_robin"]
RulesBackend = Literal["iptables", "nftables", "auto", "none"]


class ConfigError(Exception):
    """Invalid configuration; ``problems`` holds one ``"key.path: reason"`` per problem."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = problems
        self.source = source  # the file the problems are in, when there is one
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        """The problems as shown to a user: those from the file prefixed with its name."""
        if self.source is None:
            return list(self.problems)
        return [p if p.startswith("--") else f"{self.source}: {p}" for p in self.problems]


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str  # an IP address literal, without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    transport: Transport
    host: str  # an IP address literal, without brackets
    port: int = 53

    @property
    def label(self) -> str:
        return f"{self.transport}://{HostPort(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class CachePolicy:
    min_ttl_s: int = 0
    max_ttl_s: int = 86400
    denial_max_ttl_s: int = 1800
    servfail_ttl_s: int = 5  # 0 disables SERVFAIL caching; at most 300 (RFC 2308 §7.1)


@dataclass(frozen=True, slots=True)
class ZoneConfig:
    zone: str  # lowercase, absolute with trailing dot; "." is the root
    upstreams: tuple[UpstreamConfig, ...]
    policy: Policy = "sequential"
    try_timeout_s: float = 1.0  # one attempt at one upstream server
    deadline_s: float = 2.0  # whole query, all attempts; then SERVFAIL
    cache: CachePolicy = field(default_factory=CachePolicy)


@dataclass(frozen=True, slots=True)
class UpstreamPoolConfig:
    tcp_connections: int = 2  # persistent connections per upstream server
    max_inflight_per_connection: int = 100  # pipelined queries on one connection
    connect_timeout_s: float = 1.0
    connection_max_age_s: float = 30.0  # rotate so traffic spreads over the pods
    idle_timeout_s: float = 30.0  # close a connection unused this long


@dataclass(frozen=True, slots=True)
class ServerLimits:
    max_tcp_clients: int = 1024
    tcp_idle_timeout_s: float = 10.0
    max_pipelined_per_client: int = 100
    max_inflight: int = 10000  # distinct queries waiting for an upstream
    max_waiters_per_query: int = 1000  # clients coalesced onto one upstream query
    udp_payload_size: int = 1232  # largest UDP reply we send and advertise to clients
    # Receive buffer of each UDP listener, bytes (0: the kernel's default). 4 MiB holds
    # about 10,000 queued queries: a burst of a tenth of a second at full speed.
    udp_rcvbuf: int = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"  # debug, info, warning, error
    format: Literal["text", "json"] = "text"
    queries: bool = False  # one line per query (off the hot path only when off)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """The NodeLocal DNSCache role: local addresses on an interface, NOTRACK/ACCEPT rules."""

    local_ips: tuple[str, ...]  # IP literals, IPv4 and IPv6 mixed; each served on port 53
    interface: str = "nodelocaldns"  # created as a dummy link; "lo" when dummy is missing
    setup_interface: bool = True  # False: something else puts the addresses in place
    rules: RulesBackend = "auto"
    sync_interval_s: float = 60.0  # verify and re-add addresses and rules this often
    teardown: bool = True  # remove rules and addresses at exit
    health_port: int | None = None  # TCP port the health rules cover; None: no such rules


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[HostPort, ...]
    zones: tuple[ZoneConfig, ...]
    http_listen: HostPort | None = None
    # A second endpoint with the same paths, for a liveness probe on the link-local
    # address while metrics stay on http_listen (NodeLocal: :8080 health, :9253 metrics).
    health_listen: HostPort | None = None
    allow: tuple[IPNetwork, ...] = ()  # empty means every source is allowed
    cache_max_entries: int = 10000
    cache: CachePolicy = field(default_factory=CachePolicy)
    upstream: UpstreamPoolConfig = field(default_factory=UpstreamPoolConfig)
    limits: ServerLimits = field(default_factory=ServerLimits)
    log: LogConfig = field(default_factory=LogConfig)
    shutdown_grace_s: float = 5.0  # bound on finishing in-flight queries at exit
    # After SIGTERM, /ready is 503 but queries are still served for this long.
    shutdown_lameduck_s: float = 0.0
    node: NodeConfig | None = None


# --- parsing and validation -------------------------------------------------------------

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
_DEFAULT_LISTEN = ("127.0.0.1:5353", "[::1]:5353")
_DEFAULT_HTTP_LISTEN = "127.0.0.1:9253"
# Loopback only: a file that forgets the acl section must not make an open resolver.
_DEFAULT_ALLOW = ("127.0.0.0/8", "::1/128")
_MAX_TTL_S = 604800  # one week, the RFC 8767 ceiling on stale data and a sane cap on any TTL
_MAX_SERVFAIL_TTL_S = 300  # RFC 2308 §7.1: SERVFAIL must not be cached longer than 5 minutes

_TOP_KEYS = (
    "listen",
    "http_listen",
    "health_listen",
    "acl",
    "cache",
    "upstream",
    "limits",
    "zones",
    "log",
    "shutdown",
    "node",
)
_TTL_KEYS = ("min_ttl_s", "max_ttl_s", "denial_max_ttl_s", "servfail_ttl_s")
_ZONE_KEYS = ("zone", "upstreams", "policy", "try_timeout_s", "deadline_s", "cache")
# The one cache key a zone cannot set: the cache is shared, so its size is too.
_ZONE_CACHE_HINTS = {"max_entries": "the cache is shared; set max_entries in the top cache section"}
_POLICIES = ("sequential", "random", "round_robin")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_LOG_FORMATS = ("text", "json")
_NODE_KEYS = tuple(f.name for f in fields(NodeConfig))
_RULES_BACKENDS = ("iptables", "nftables", "auto", "none")
_DNS_PORT = 53  # the port the node rules cover, so the one a local IP must be served on
_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ - 1; no '/', ':' or spaces

_VAR_RE = re.compile(r"\$\{([^}]*)\}")
_VAR_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]*[A-Za-z][A-Za-z0-9_.-]*")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line flags; each one given replaces the matching part of the file."""

    listen: tuple[str, ...] = ()  # replaces the file's whole listen list
    upstreams: tuple[str, ...] = ()  # "[ZONE=]UPSTREAM"; replaces that zone's upstreams
    http_listen: str | None = None  # "none" disables; None keeps the file's value
    log_level: str | None = None
    log_format: str | None = None
    health_listen: str | None = None  # "none" disables
    lameduck: str | None = None  # seconds, as typed
    # Node flags: giving any of them turns the node role on even without a node: section.
    local_ips: tuple[str, ...] = ()  # each may be a comma list, like node-cache's -localip
    interface: str | None = None
    setup_interface: bool | None = None
    rules: str | None = None
    sync_interval: str | None = None  # seconds, as typed
    teardown: bool | None = None
    health_port: str | None = None  # "none" disables the health rules

    @property
    def any_node(self) -> bool:
        return bool(self.local_ips) or any(
            v is not None
            for v in (
                self.interface,
                self.setup_interface,
                self.rules,
                self.sync_interval,
                self.teardown,
                self.health_port,
            )
        )


class _Invalid(ValueError):
    """A reason without a key path; the caller knows the path and adds it."""


class _EnvStr(str):
    """A string that came out of ``${VAR}`` expansion.

    Environment variables can only carry text, so ``max_entries: ${CACHE_SIZE:-10000}``
    must still work; only such strings are converted to numbers, so a quoted ``"100"``
    typed into the file stays the type error it is.
    """

    __slots__ = ()


class _Stop(Exception):
    """Nothing more can be checked; the problems gathered so far are the answer."""


class _Failed:
    """Marks a value whose expansion failed (already reported)."""


_FAILED = _Failed()


def parse_resolv_conf(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order, without duplicates.

    Like glibc, entries that are not IP addresses are skipped; an IPv6 zone (``%eth0``)
    is dropped because upstream connections name the address only.
    """
    found: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0]
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            addr = str(ipaddress.ip_address(fields[1].split("%", 1)[0]))
        except ValueError:
            continue
        if addr not in found:
            found.append(addr)
    return found


def parse_upstream(text: str, path: str, *, base_dir: str = "") -> list[UpstreamConfig]:
    """Parse one upstream spec; ``resolv.conf`` forms yield one upstream per nameserver.

    Forms: ``tcp://HOST:PORT``, ``udp://HOST:PORT``, ``HOST``, ``HOST:PORT`` (TCP, port 53
    when absent), ``resolv.conf`` and ``resolv.conf:PATH`` (relative to ``base_dir``).
    IPv6 goes in brackets when a port follows. Raises ConfigError with ``path`` on failure.
    """
    try:
        return _upstreams_from(text, base_dir)
    except _Invalid as e:
        raise ConfigError([f"{path}: {e}"]) from None


def parse_config(
    data: object,
    *,
    env: Mapping[str, str],
    base: str = "<config>",
    overrides: Overrides | None = None,
) -> Config:
    """Validate a YAML-loaded document and build the Config.

    ``base`` names where ``data`` came from (the file's path): it becomes the
    ConfigError's ``source``, and a relative ``resolv.conf:PATH`` is read relative to its
    directory. Every problem found is collected before ConfigError is raised.
    """
    reader = _Reader(env, base)
    try:
        return reader.config(data, overrides or Overrides())
    except _Stop:
        pass
    raise ConfigError(reader.problems, source=base)


def load_config(
    path: str | None,
    overrides: Overrides | None = None,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Read ``path`` (or the built-in defaults when None), apply ``overrides``, validate.

    The ConfigError raised carries ``source=path`` (or ``<built-in defaults>``) so that
    its messages can name the file.
    """
    env = os.environ if env is None else env
    if path is None:
        source = "<built-in defaults>"
        data: object = {"zones": [{"zone": ".", "upstreams": ["resolv.conf"]}]}
    else:
        source = path
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError([f"cannot read: {reason}"], source=path) from None
        try:
            data = yaml.load(text, Loader=_Loader)  # safe: _Loader is a SafeLoader
        except yaml.YAMLError as e:
            raise ConfigError([_yaml_problem(e)], source=path) from None
    return parse_config(data, env=env, base=source, overrides=overrides)


# --- YAML -------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last value silently, which hides a second ``cache:`` section.
    """


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[str] = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str":
            key = key_node.value
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"duplicate key '{key}'",
                    key_node.start_mark,
                )
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        text = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
        if e.context:
            text += f" ({e.context}"
            if e.context_mark is not None:
                text += f" at line {e.context_mark.line + 1}"
            text += ")"
        return text
    return f"invalid YAML: {e}"


# --- scalar forms -----------------------------------------------------------------------


def _upstreams_from(text: str, base_dir: str) -> list[UpstreamConfig]:
    text = text.strip()
    if not text:
        raise _Invalid("empty upstream")
    if text == "resolv.conf" or text.startswith("resolv.conf:"):
        file = text[len("resolv.conf:") :] if ":" in text else DEFAULT_RESOLV_CONF
        if not file:
            raise _Invalid("'resolv.conf:' needs a file name after the ':'")
        return [UpstreamConfig("tcp", addr, 53) for addr in _read_resolv_conf(file, base_dir)]
    transport: Transport = "tcp"
    scheme = _SCHEME_RE.fullmatch(text)
    if scheme:
        name = scheme[1].lower()
        if name not in ("tcp", "udp"):
            raise _Invalid(f"unsupported scheme '{name}://' in '{text}' (use tcp:// or udp://)")
        transport = "udp" if name == "udp" else "tcp"
        text = scheme[2]
    host, port = _split_host_port(text)
    addr = _ip_literal(host)
    return [UpstreamConfig(transport, addr, 53 if port is None else _port(port, 1))]


def _read_resolv_conf(file: str, base_dir: str) -> list[str]:
    full = os.path.join(base_dir, file)
    try:
        with open(full, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise _Invalid(f"cannot read {full}: {e.strerror or e}") from None
    addrs = parse_resolv_conf(text)
    if not addrs:
        raise _Invalid(f"{full} has no nameserver lines with an IP address")
    return addrs


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise _Invalid(f"'{text}' is missing the closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise _Invalid(f"'{text}': brackets are only for IPv6 addresses")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise _Invalid(f"'{text}' is not of the form [ADDR]:PORT")
        return host, rest[1:]
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    # Several colons: a bare IPv6 address; its port, if any, would need brackets.
    return text, None


def _ip_literal(host: str) -> str:
    if not host:
        raise _Invalid("missing IP address")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _HOSTNAME_RE.fullmatch(host):
        # Names are never resolved: the proxy is what resolves them, so it would ask itself.
        raise _Invalid(f"'{host}' is a hostname; an IP address is required here")
    raise _Invalid(f"'{host}' is not a valid IP address")


def _port(text: str, lowest: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise _Invalid(f"port '{text}' is not a number")
    port = int(text)
    if not lowest <= port <= 65535:
        raise _Invalid(f"port {port} out of range ({lowest}-65535)")
    return port


def _listen_addr(text: str) -> HostPort:
    # Port 0 is allowed so that tests can bind an ephemeral port.
    host, port = _split_host_port(text.strip())
    if host.isascii() and host.isdigit():
        raise _Invalid(f"'{text}' needs an address too (ADDR:PORT, e.g. 127.0.0.1:{host})")
    addr = _ip_literal(host)
    if port is None:
        form = "[ADDR]:PORT" if ":" in addr else "ADDR:PORT"
        raise _Invalid(f"'{text}' needs a port ({form})")
    return HostPort(addr, _port(port, 0))


def _normalize_zone(text: str) -> str:
    name = text.strip().lower()
    if name == ".":
        return name
    body = name[:-1] if name.endswith(".") else name
    if not body:
        raise _Invalid("empty zone name (use '.' for the root)")
    if len(body) > 253 or not all(_LABEL_RE.fullmatch(label) for label in body.split(".")):
        raise _Invalid(f"'{text}' is not a valid domain name")
    if any(len(label) > 63 for label in body.split(".")):
        raise _Invalid(f"'{text}' has a label longer than 63 characters")
    return body + "."


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(str(value))
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return str(value)


def _to_number(value: _EnvStr) -> object:
    text = value.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return value


# --- the validator ----------------------------------------------------------------------


class _Reader:
    """Reads one document, recording problems and substituting defaults so it can go on."""

    def __init__(self, env: Mapping[str, str], base: str) -> None:
        self.env = env
        self.base_dir = "" if base.startswith("<") else os.path.dirname(base)
        self.problems: list[str] = []

    def problem(self, path: str, reason: str) -> None:
        self.problems.append(f"{path}: {reason}")

    # -- generic readers --

    def expand(self, value: object, path: str) -> object:
        if not isinstance(value, str) or "$" not in value:
            return value
        ok = True

        def substitute(m: re.Match[str]) -> str:
            nonlocal ok
            body = _VAR_BODY_RE.fullmatch(m[1])
            if body is None:
                self.problem(path, f"invalid variable reference '{m[0]}'")
                ok = False
                return ""
            name, default = body[1], body[2]
            found = self.env.get(name)
            if found is not None and (found or default is None):
                return found
            if default is not None:
                return default
            self.problem(path, f"environment variable {name} is not set")
            ok = False
            return ""

        result = _VAR_RE.sub(substitute, value)
        if ok and "${" in _VAR_RE.sub("", value):
            self.problem(path, "unterminated '${' (write ${NAME} or ${NAME:-default})")
            ok = False
        if not ok:
            return _FAILED
        return _EnvStr(result) if result != value else result

    def unknown_keys(
        self,
        mapping: dict[Any, Any],
        prefix: str,
        keys: Sequence[str],
        hints: Mapping[str, str] | None = None,
    ) -> None:
        for key in mapping:
            if key in keys:
                continue
            reason = "unknown key"
            close = difflib.get_close_matches(str(key), keys, n=1)
            if hints and key in hints:
                reason += f" ({hints[key]})"
            elif close:
                reason += f" (did you mean '{close[0]}'?)"
            self.problem(_join(prefix, str(key)), reason)

    def section(
        self,
        parent: dict[Any, Any],
        key: str,
        prefix: str,
        keys: Sequence[str],
        hints: Mapping[str, str] | None = None,
    ) -> dict[Any, Any]:
        path = _join(prefix, key)
        value = parent.get(key)
        if value is None:  # "cache:" with nothing under it means "all defaults"
            return {}
        if not isinstance(value, dict):
            self.problem(path, f"must be a mapping (got {_show(value)})")
            return {}
        self.unknown_keys(value, path, keys, hints)
        return value

    def value(self, m: dict[Any, Any], key: str, prefix: str) -> tuple[str, object] | None:
        """(path, expanded value) of ``key`` in ``m``; None when it is absent or its
        ${VAR} expansion failed (already reported)."""
        if key not in m:
            return None
        path = _join(prefix, key)
        value = self.expand(m[key], path)
        return None if value is _FAILED else (path, value)

    def number(self, m: dict[Any, Any], key: str, prefix: str) -> tuple[str, object] | None:
        """:meth:`value`, with text from a ${VAR} read as a number where it is one."""
        found = self.value(m, key, prefix)
        if found is not None and isinstance(found[1], _EnvStr):
            return found[0], _to_number(found[1])
        return found

    def integer(
        self, m: dict[Any, Any], key: str, prefix: str, default: int, lo: int, hi: int | None
    ) -> int:
        found = self.number(m, key, prefix)
        if found is None:
            return default
        path, value = found
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < lo
            or (hi is not None and value > hi)
        ):
            bound = f">= {lo}" if hi is None else f">= {lo} and <= {hi}"
            self.problem(path, f"must be an integer {bound} (got {_show(value)})")
            return default
        return value

    def seconds(
        self, m: dict[Any, Any], key: str, prefix: str, default: float, *, zero_ok: bool = False
    ) -> float:
        found = self.number(m, key, prefix)
        if found is None:
            return default
        path, value = found
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not zero_ok)
        ):
            bound = ">= 0" if zero_ok else "> 0"
            self.problem(path, f"must be a number of seconds {bound} (got {_show(value)})")
            return default
        return float(value)

    def boolean(self, m: dict[Any, Any], key: str, prefix: str, default: bool) -> bool:
        found = self.value(m, key, prefix)
        if found is None:
            return default
        path, value = found
        if isinstance(value, _EnvStr) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            self.problem(path, f"must be true or false (got {_show(value)})")
            return default
        return value

    def choice(self, value: object, path: str, choices: Sequence[str], default: str) -> str:
        value = self.expand(value, path)
        if value is _FAILED:
            return default
        if isinstance(value, str) and value.strip().lower() in choices:
            return value.strip().lower()
        self.problem(path, f"must be one of {', '.join(choices)} (got {_show(value)})")
        return default

    def strings(self, m: dict[Any, Any], key: str, prefix: str) -> list[tuple[str, str]]:
        """(path, expanded text) for each entry of a list of strings; bad entries dropped."""
        path = _join(prefix, key)
        value = m[key]
        if not isinstance(value, list):
            self.problem(path, f"must be a list of strings (got {_show(value)})")
            return []
        out: list[tuple[str, str]] = []
        for i, item in enumerate(value):
            item_path = f"{path}[{i}]"
            text = self.expand(item, item_path)
            if text is _FAILED:
                continue
            if not isinstance(text, str):
                self.problem(item_path, f"must be a string (got {_show(text)})")
                continue
            out.append((item_path, str(text)))
        return out

    # -- the document --

    def config(self, data: object, overrides: Overrides) -> Config:
        if data is None:  # an empty file
            data = {}
        if not isinstance(data, dict):
            self.problem("(top level)", f"must be a mapping of keys (got {_show(data)})")
            raise _Stop
        self.unknown_keys(data, "", _TOP_KEYS)

        listen = self.listen(data, overrides.listen)
        http_listen = self.endpoint(
            data, "http_listen", overrides.http_listen, _DEFAULT_HTTP_LISTEN
        )
        health_listen = self.endpoint(data, "health_listen", overrides.health_listen, None)
        allow = self.allow(self.section(data, "acl", "", ("allow",)))

        cache = self.section(data, "cache", "", ("max_entries", *_TTL_KEYS))
        max_entries = self.integer(cache, "max_entries", "cache", 10000, 1, None)
        policy = self.cache_policy(cache, "cache", CachePolicy())

        pool_keys = tuple(f.name for f in fields(UpstreamPoolConfig))
        pool = self.pool(self.section(data, "upstream", "", pool_keys))
        limit_keys = tuple(f.name for f in fields(ServerLimits))
        limits = self.limits(self.section(data, "limits", "", limit_keys))
        zones = self.zones(data, policy, overrides.upstreams, listen)
        log = self.log(self.section(data, "log", "", ("level", "format", "queries")), overrides)
        shutdown = self.section(data, "shutdown", "", ("grace_s", "lameduck_s"))
        grace_s = self.seconds(shutdown, "grace_s", "shutdown", 5.0, zero_ok=True)
        if overrides.lameduck is not None:
            flag = {"--lameduck": _EnvStr(overrides.lameduck)}
            lameduck_s = self.seconds(flag, "--lameduck", "", 0.0, zero_ok=True)
        else:
            lameduck_s = self.seconds(shutdown, "lameduck_s", "shutdown", 0.0, zero_ok=True)
        node = self.node(data, overrides, listen, health_listen)

        if self.problems:
            raise _Stop
        return Config(
            listen=listen,
            zones=zones,
            http_listen=http_listen,
            health_listen=health_listen,
            allow=allow,
            cache_max_entries=max_entries,
            cache=policy,
            upstream=pool,
            limits=limits,
            log=log,
            shutdown_grace_s=grace_s,
            shutdown_lameduck_s=lameduck_s,
            node=node,
        )

    def listen(self, data: dict[Any, Any], flags: tuple[str, ...]) -> tuple[HostPort, ...]:
        if flags:
            entries = [(f"--listen[{i}]", text) for i, text in enumerate(flags)]
        elif "listen" in data:
            entries = self.strings(data, "listen", "")
            if isinstance(data["listen"], list) and not data["listen"]:
                self.problem("listen", "at least one ADDR:PORT is required")
        else:
            entries = [(f"listen[{i}]", text) for i, text in enumerate(_DEFAULT_LISTEN)]
        result: list[HostPort] = []
        first: dict[HostPort, str] = {}
        for path, text in entries:
            try:
                hp = _listen_addr(text)
            except _Invalid as e:
                self.problem(path, str(e))
                continue
            if hp in first and hp.port != 0:
                self.problem(path, f"{hp} is listed twice (also {first[hp]})")
                continue
            first.setdefault(hp, path)
            result.append(hp)
        return tuple(result)

    def endpoint(
        self, data: dict[Any, Any], key: str, flag: str | None, default: str | None
    ) -> HostPort | None:
        """An optional ADDR:PORT (``http_listen``, ``health_listen``) from its flag or key."""
        value: object
        if flag is not None:
            path, value = "--" + key.replace("_", "-"), flag
        elif key in data:
            path, value = key, self.expand(data[key], key)
        else:
            return None if default is None else _listen_addr(default)
        if value is None or value is _FAILED:
            return None
        if not isinstance(value, str):
            self.problem(path, f"must be ADDR:PORT or null (got {_show(value)})")
            return None
        if value.strip().lower() == "none":
            return None
        try:
            return _listen_addr(value)
        except _Invalid as e:
            self.problem(path, str(e))
            return None

    def allow(self, acl: dict[Any, Any]) -> tuple[IPNetwork, ...]:
        entries = (
            self.strings(acl, "allow", "acl")
            if "allow" in acl
            else [(f"acl.allow[{i}]", text) for i, text in enumerate(_DEFAULT_ALLOW)]
        )
        result: list[IPNetwork] = []
        for path, text in entries:
            try:
                result.append(ipaddress.ip_network(text.strip()))
            except ValueError:
                try:
                    net = ipaddress.ip_network(text.strip(), strict=False)
                except ValueError:
                    self.problem(path, f"'{text}' is not an IP address or CIDR network")
                else:
                    self.problem(path, f"'{text}' has host bits set (did you mean {net}?)")
        return tuple(result)

    def cache_policy(self, m: dict[Any, Any], prefix: str, base: CachePolicy) -> CachePolicy:
        before = len(self.problems)
        policy = CachePolicy(
            min_ttl_s=self.integer(m, "min_ttl_s", prefix, base.min_ttl_s, 0, _MAX_TTL_S),
            max_ttl_s=self.integer(m, "max_ttl_s", prefix, base.max_ttl_s, 0, _MAX_TTL_S),
            denial_max_ttl_s=self.integer(
                m, "denial_max_ttl_s", prefix, base.denial_max_ttl_s, 0, _MAX_TTL_S
            ),
            servfail_ttl_s=self.integer(
                m, "servfail_ttl_s", prefix, base.servfail_ttl_s, 0, _MAX_SERVFAIL_TTL_S
            ),
        )
        # A zone that sets neither bound inherits a pair already checked globally.
        touched = "min_ttl_s" in m or "max_ttl_s" in m
        if len(self.problems) == before and touched and policy.min_ttl_s > policy.max_ttl_s:
            key = "min_ttl_s" if "min_ttl_s" in m else "max_ttl_s"
            self.problem(
                _join(prefix, key),
                f"min_ttl_s ({policy.min_ttl_s}) must be <= max_ttl_s ({policy.max_ttl_s})",
            )
        return policy

    def pool(self, m: dict[Any, Any]) -> UpstreamPoolConfig:
        d = UpstreamPoolConfig()
        p = "upstream"
        return UpstreamPoolConfig(
            tcp_connections=self.integer(m, "tcp_connections", p, d.tcp_connections, 1, None),
            # Query IDs are 16 bits and allocated per connection.
            max_inflight_per_connection=self.integer(
                m, "max_inflight_per_connection", p, d.max_inflight_per_connection, 1, 65535
            ),
            connect_timeout_s=self.seconds(m, "connect_timeout_s", p, d.connect_timeout_s),
            connection_max_age_s=self.seconds(m, "connection_max_age_s", p, d.connection_max_age_s),
            idle_timeout_s=self.seconds(m, "idle_timeout_s", p, d.idle_timeout_s),
        )

    def limits(self, m: dict[Any, Any]) -> ServerLimits:
        d = ServerLimits()
        p = "limits"
        return ServerLimits(
            max_tcp_clients=self.integer(m, "max_tcp_clients", p, d.max_tcp_clients, 1, None),
            tcp_idle_timeout_s=self.seconds(m, "tcp_idle_timeout_s", p, d.tcp_idle_timeout_s),
            max_pipelined_per_client=self.integer(
                m, "max_pipelined_per_client", p, d.max_pipelined_per_client, 1, None
            ),
            max_inflight=self.integer(m, "max_inflight", p, d.max_inflight, 1, None),
            max_waiters_per_query=self.integer(
                m, "max_waiters_per_query", p, d.max_waiters_per_query, 1, None
            ),
            udp_payload_size=self.integer(m, "udp_payload_size", p, d.udp_payload_size, 512, 4096),
            udp_rcvbuf=self.integer(m, "udp_rcvbuf", p, d.udp_rcvbuf, 0, 1 << 30),
        )

    def log(self, m: dict[Any, Any], overrides: Overrides) -> LogConfig:
        d = LogConfig()
        if overrides.log_level is not None:
            level = self.choice(overrides.log_level, "--log-level", _LOG_LEVELS, d.level)
        elif "level" in m:
            level = self.choice(m["level"], "log.level", _LOG_LEVELS, d.level)
        else:
            level = d.level
        if overrides.log_format is not None:
            fmt = self.choice(overrides.log_format, "--log-format", _LOG_FORMATS, d.format)
        elif "format" in m:
            fmt = self.choice(m["format"], "log.format", _LOG_FORMATS, d.format)
        else:
            fmt = d.format
        return LogConfig(
            level=level,
            format="json" if fmt == "json" else "text",
            queries=self.boolean(m, "queries", "log", d.queries),
        )

    # -- the node role --

    def node(
        self,
        data: dict[Any, Any],
        overrides: Overrides,
        listen: tuple[HostPort, ...],
        health_listen: HostPort | None,
    ) -> NodeConfig | None:
        # The key's presence turns the role on, even as "node:" with nothing under it.
        if "node" not in data and not overrides.any_node:
            return None
        m = self.section(data, "node", "", _NODE_KEYS)
        d = NodeConfig(local_ips=())
        local_ips = self.local_ips(m, overrides.local_ips, listen)

        interface = d.interface
        if overrides.interface is not None:
            interface = self.interface_name(overrides.interface, "--interface", d.interface)
        elif "interface" in m:
            interface = self.interface_name(m["interface"], "node.interface", d.interface)

        rules: str = d.rules
        if overrides.rules is not None:
            rules = self.choice(overrides.rules, "--rules", _RULES_BACKENDS, d.rules)
        elif "rules" in m:
            rules = self.choice(m["rules"], "node.rules", _RULES_BACKENDS, d.rules)

        if overrides.sync_interval is not None:
            flag = {"--sync-interval": _EnvStr(overrides.sync_interval)}
            sync_s = self.seconds(flag, "--sync-interval", "", d.sync_interval_s)
        else:
            sync_s = self.seconds(m, "sync_interval_s", "node", d.sync_interval_s)

        setup = overrides.setup_interface
        if setup is None:
            setup = self.boolean(m, "setup_interface", "node", d.setup_interface)
        teardown = overrides.teardown
        if teardown is None:
            teardown = self.boolean(m, "teardown", "node", d.teardown)

        # The liveness probe goes to health_listen, so by default its port is the one the
        # rules must keep out of conntrack.
        default_port = health_listen.port if health_listen is not None else None
        if overrides.health_port is not None:
            health_port = self.optional_port(
                {"--health-port": _EnvStr(overrides.health_port)}, "--health-port", default_port
            )
        elif "health_port" in m:
            health_port = self.optional_port(m, "node.health_port", default_port, key="health_port")
        else:
            health_port = default_port

        return NodeConfig(
            local_ips=local_ips,
            interface=interface,
            setup_interface=setup,
            rules=cast(RulesBackend, rules),
            sync_interval_s=sync_s,
            teardown=teardown,
            health_port=health_port,
        )

    def local_ips(
        self, m: dict[Any, Any], flags: tuple[str, ...], listen: tuple[HostPort, ...]
    ) -> tuple[str, ...]:
        entries: list[tuple[str, str]]
        if flags:
            # Comma lists as node-cache's -localip takes them: "169.254.20.10,169.254.25.10".
            entries = []
            for text in flags:
                for part in text.split(","):
                    entries.append((f"--local-ip[{len(entries)}]", part))
        elif "local_ips" in m:
            entries = self.strings(m, "local_ips", "node")
            if isinstance(m["local_ips"], list) and not m["local_ips"]:
                self.problem("node.local_ips", "at least one IP address is required")
        else:
            # Default: the specific addresses the proxy listens on at port 53.
            found = [
                hp.host
                for hp in listen
                if hp.port == _DNS_PORT
                and not ipaddress.ip_address(hp.host).is_unspecified
                and not ipaddress.ip_address(hp.host).is_loopback
            ]
            if not found and listen:
                self.problem(
                    "node.local_ips",
                    "required: no listen address on port 53 to take them from "
                    '(e.g. listen: ["169.254.20.10:53"])',
                )
            entries = [(f"node.local_ips[{i}]", host) for i, host in enumerate(found)]
        result: list[str] = []
        for path, text in entries:
            try:
                addr = ipaddress.ip_address(text.strip())
            except ValueError:
                self.problem(path, f"'{text}' is not an IP address")
                continue
            if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
                self.problem(path, f"{addr} cannot be a local DNS address (use a unicast IP)")
                continue
            if str(addr) in result:
                self.problem(path, f"{addr} is listed twice")
                continue
            if not any(self.serves(hp, addr) for hp in listen):
                hp = HostPort(str(addr), _DNS_PORT)
                self.problem(
                    path,
                    f"nothing listens on {hp}: add it to listen (the rules would send "
                    "queries to an address no listener serves)",
                )
                continue
            result.append(str(addr))
        return tuple(result)

    @staticmethod
    def serves(hp: HostPort, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if hp.port != _DNS_PORT:
            return False
        ours = ipaddress.ip_address(hp.host)
        # Listeners bind IPv6 sockets V6ONLY, so "::" does not serve IPv4.
        return ours == addr or (ours.is_unspecified and ours.version == addr.version)

    def interface_name(self, value: object, path: str, default: str) -> str:
        value = self.expand(value, path)
        if value is _FAILED:
            return default
        if not isinstance(value, str) or not _IFNAME_RE.fullmatch(value) or value in (".", ".."):
            self.problem(
                path,
                "must be an interface name of 1-15 letters, digits, '_', '.' or '-' "
                f"(got {_show(value)})",
            )
            return default
        return str(value)

    def optional_port(
        self, m: dict[Any, Any], path: str, default: int | None, *, key: str | None = None
    ) -> int | None:
        value = self.expand(m[key or path], path)
        if value is _FAILED:
            return default
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        if isinstance(value, _EnvStr):
            value = _to_number(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.problem(path, f"must be a port 1-65535 or null (got {_show(value)})")
            return default
        return value

    # -- zones --

    def zones(
        self,
        data: dict[Any, Any],
        cache: CachePolicy,
        flags: tuple[str, ...],
        listen: tuple[HostPort, ...],
    ) -> tuple[ZoneConfig, ...]:
        groups = self.flag_groups(flags)
        raw = data.get("zones")
        items: list[Any] = []
        if raw is not None and not isinstance(raw, list):
            self.problem("zones", f"must be a list of zones (got {_show(raw)})")
        elif raw is not None:
            items = raw
        built: list[tuple[ZoneConfig, list[tuple[str, UpstreamConfig]]]] = []
        seen: dict[str, str] = {}
        for i, item in enumerate(items):
            prefix = f"zones[{i}]"
            if not isinstance(item, dict):
                self.problem(
                    prefix, f"must be a mapping with zone and upstreams (got {_show(item)})"
                )
                continue
            self.unknown_keys(item, prefix, _ZONE_KEYS)
            name = self.zone_name(item, prefix)
            if name is not None and name in seen:
                self.problem(f"{prefix}.zone", f"duplicate zone '{name}' (also {seen[name]})")
                name = None
            if name is not None:
                seen[name] = prefix
            # Upstreams replaced by a flag are not read: the file may name a host that only
            # exists where it is deployed (an unset ${VAR}, a missing resolv.conf).
            if name is not None and name in groups:
                upstreams = groups.pop(name)
            else:
                upstreams = self.zone_upstreams(item, prefix)
            zone = self.zone_settings(item, prefix, name or ".", cache, upstreams)
            built.append((zone, upstreams))
        for name, upstreams in groups.items():
            zone = ZoneConfig(zone=name, upstreams=tuple(u for _, u in upstreams), cache=cache)
            built.append((zone, upstreams))
        if not built and (raw is None or raw == []):
            self.problem("zones", "at least one zone is required (usually '.' for all names)")
        for _, upstreams in built:
            self.check_loops(upstreams, listen)
        return tuple(zone for zone, _ in built)

    def flag_groups(self, flags: tuple[str, ...]) -> dict[str, list[tuple[str, UpstreamConfig]]]:
        groups: dict[str, list[tuple[str, UpstreamConfig]]] = {}
        for i, text in enumerate(flags):
            path = f"--upstream[{i}]"
            zone_text, sep, spec = text.partition("=")
            if not sep:
                zone_text, spec = ".", text
            try:
                zone = _normalize_zone(zone_text)
                upstreams = _upstreams_from(spec, "")
            except _Invalid as e:
                self.problem(path, str(e))
                continue
            group = groups.setdefault(zone, [])
            self.add_upstreams(group, path, upstreams)
        return groups

    def zone_name(self, item: dict[Any, Any], prefix: str) -> str | None:
        path = f"{prefix}.zone"
        if "zone" not in item:
            self.problem(path, "required (the domain this entry forwards, '.' for all)")
            return None
        value = self.expand(item["zone"], path)
        if value is _FAILED:
            return None
        if not isinstance(value, str):
            self.problem(path, f"must be a domain name string (got {_show(value)})")
            return None
        try:
            return _normalize_zone(value)
        except _Invalid as e:
            self.problem(path, str(e))
            return None

    def zone_upstreams(self, item: dict[Any, Any], prefix: str) -> list[tuple[str, UpstreamConfig]]:
        path = f"{prefix}.upstreams"
        if "upstreams" not in item or item["upstreams"] == []:
            self.problem(path, "at least one upstream is required")
            return []
        result: list[tuple[str, UpstreamConfig]] = []
        for item_path, text in self.strings(item, "upstreams", prefix):
            try:
                upstreams = _upstreams_from(text, self.base_dir)
            except _Invalid as e:
                self.problem(item_path, str(e))
                continue
            self.add_upstreams(result, item_path, upstreams)
        return result

    def add_upstreams(
        self,
        into: list[tuple[str, UpstreamConfig]],
        path: str,
        upstreams: list[UpstreamConfig],
    ) -> None:
        # A server listed twice would be tried twice in a row by the sequential policy.
        for upstream in upstreams:
            also = next((p for p, u in into if u == upstream), None)
            if also is not None:
                self.problem(path, f"{upstream.label} is listed twice (also {also})")
            else:
                into.append((path, upstream))

    def zone_settings(
        self,
        item: dict[Any, Any],
        prefix: str,
        name: str,
        cache: CachePolicy,
        upstreams: list[tuple[str, UpstreamConfig]],
    ) -> ZoneConfig:
        d = ZoneConfig(zone=name, upstreams=())
        policy = d.policy
        if "policy" in item:
            policy = cast(
                Policy, self.choice(item["policy"], f"{prefix}.policy", _POLICIES, policy)
            )
        before = len(self.problems)
        try_s = self.seconds(item, "try_timeout_s", prefix, d.try_timeout_s)
        deadline_s = self.seconds(item, "deadline_s", prefix, d.deadline_s)
        if len(self.problems) == before and try_s > deadline_s:
            key = "try_timeout_s" if "try_timeout_s" in item else "deadline_s"
            self.problem(
                f"{prefix}.{key}",
                f"try_timeout_s ({try_s:g}) must be <= deadline_s ({deadline_s:g})",
            )
        overrides = self.section(item, "cache", prefix, _TTL_KEYS, _ZONE_CACHE_HINTS)
        return ZoneConfig(
            zone=name,
            upstreams=tuple(u for _, u in upstreams),
            policy=policy,
            try_timeout_s=try_s,
            deadline_s=deadline_s,
            cache=self.cache_policy(overrides, f"{prefix}.cache", cache),
        )

    def check_loops(
        self, upstreams: list[tuple[str, UpstreamConfig]], listen: tuple[HostPort, ...]
    ) -> None:
        for path, upstream in upstreams:
            addr = ipaddress.ip_address(upstream.host)
            for hp in listen:
                if hp.port != upstream.port:
                    continue
                ours = ipaddress.ip_address(hp.host)
                if ours == addr or (ours.is_unspecified and addr.is_loopback):
                    self.problem(
                        path,
                        f"{upstream.label} is this proxy's own listen address {hp} "
                        "(queries would loop)",
                    )
                    break
