"""The configuration's schema: one table of every key, and what is generated from it.

``DOCUMENT`` (below the readers) lists each section and key with its reader (type and
bounds), default and help text. From it come:

- validation (:func:`validate`): a loaded document, with command-line flags already laid
  over it as :class:`Flag` values, to a :class:`~dnsproxy.config_types.Config`. Every
  problem names its key path, or the flag that gave the value
  (``zones[1].upstreams[0]: port 70000 out of range``, ``--sync-interval: ...``); all of
  them are collected before :class:`ConfigError` is raised and shown in document order.
  Checks that involve more than one key (timeouts, TTL bounds, duplicates, loops, the node's
  local IPs) are separate passes (``CHECKS``) after every key has been read.
- the keys the shipped configuration files must document (:func:`documented_keys`);
- a JSON Schema for editors (:func:`json_schema`, published as
  ``config/dnsproxy.schema.json``).

No YAML here (``config`` reads the files) and no I/O beyond the resolv.conf an upstream
entry names.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, cast

from dnsproxy import tls
from dnsproxy.config_types import (
    CachePolicy,
    Config,
    HandoverConfig,
    HostPort,
    LogConfig,
    NodeConfig,
    PrefetchConfig,
    ServerLimits,
    ServeStaleConfig,
    TlsConfig,
    Transport,
    UpstreamConfig,
    UpstreamPoolConfig,
    ZoneConfig,
)
from dnsproxy.errors import DnsproxyError

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
_MAX_TTL_S = 604800  # one week, the RFC 8767 ceiling on stale data and a sane cap on any TTL
_MAX_SERVFAIL_TTL_S = 300  # RFC 2308 §7.1: SERVFAIL must not be cached longer than 5 minutes
_DNS_PORT = 53  # the port the node rules cover, so the one a local IP must be served on
_MAX_PIPELINED = 65535  # queries in flight on one connection: their IDs are 16 bits
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL
_MAX_WORKERS = 256  # far more than any node has cores; a typo of 10000 is refused

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # IFNAMSIZ - 1; no '/', ':' or spaces
_VAR_RE = re.compile(r"\$\{([^}]*)\}")
_VAR_BODY_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?", re.DOTALL)
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]*[A-Za-z][A-Za-z0-9_.-]*")
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_PATH_TAIL_RE = re.compile(r"(\.[^.\[\]]+|\[\d+\])$")


class ConfigError(DnsproxyError):
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


class BadValue(DnsproxyError):
    """A reason without a key path; the caller knows the path and adds it."""


class _Text(str):
    """Text from outside the YAML: a ``${VAR}`` expansion or a command-line flag.

    Environment variables and flags can only carry text, so ``max_entries:
    ${CACHE_SIZE:-10000}`` and ``--sync-interval 5`` must still work; only such strings
    are converted to numbers, so a quoted ``"100"`` typed into the file stays the type
    error it is.
    """


class _FlagText(_Text):
    """Text typed on the command line: a relative path in it is relative to the CWD."""


@dataclass(frozen=True, slots=True)
class Flag:
    """A value given by a command-line flag, laid over the document in place of a key's.

    ``name`` is what a problem with the value is reported under (``--sync-interval``,
    ``--upstream[1]``); ``value`` is the flag's text, or a bool for ``--[no-]`` flags.
    Flag values are taken literally: the shell has expanded them already.
    """

    name: str
    value: str | bool


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


INVALID: Any = _Marker("INVALID")  # a reader's answer for a value it reported
_FROM_TARGET: Any = _Marker("FROM_TARGET")  # the default is the target dataclass field's
OFF: Any = _Marker("OFF")  # a section left out is None (a role not taken), not its defaults


# --- problems ----------------------------------------------------------------------------


class Problems:
    """The problems found in one document, shown in document order.

    Each key's path is marked as it is reached (:meth:`visit`), so a problem that a later
    pass finds (a loop, a duplicate) is still listed where its key is, and a flag's
    problem where the key it replaces is.
    """

    def __init__(self) -> None:
        self._found: list[tuple[str, str]] = []  # (shown path, reason)
        self._order: dict[str, int] = {}
        self._placed: dict[str, tuple[str, int]] = {}

    def __bool__(self) -> bool:
        return bool(self._found)

    def __len__(self) -> int:
        return len(self._found)

    def visit(self, path: str) -> None:
        self._order.setdefault(path, len(self._order))

    def place(self, path: str, at: str) -> None:
        """List problems of ``path`` (a flag) where ``at`` is reached, in the order placed."""
        self._placed[path] = (at, len(self._placed))

    def add(self, path: str, reason: str) -> None:
        self._found.append((path, reason))

    def lines(self) -> list[str]:
        return [f"{path}: {reason}" for path, reason in sorted(self._found, key=self._rank)]

    def _rank(self, problem: tuple[str, str]) -> tuple[int, float]:
        place, after = problem[0], math.inf
        if place in self._placed:
            place, after = self._placed[place]
        while place not in self._order:
            parent = _PATH_TAIL_RE.sub("", place)
            if parent == place:
                return len(self._order), after
            place = parent
        return self._order[place], after


@dataclass(slots=True)
class Fields:
    """A section as read: every key's value (the document's, else its default)."""

    section: Section
    values: dict[str, Any] = field(default_factory=dict)
    given: dict[str, str] = field(default_factory=dict)  # key -> path (or flag) it came from
    failed: set[str] = field(default_factory=set)  # keys whose value was refused

    def build(self) -> Any:
        """The section's ``target`` dataclass from these values."""
        assert self.section.target is not None
        return self.section.target(**{k: _plain(v) for k, v in self.values.items()})


Item = tuple[str, Any]  # (path or flag name, value) of one list entry


def _plain(value: Any) -> Any:
    if isinstance(value, Fields):
        return value.build()
    if isinstance(value, list):
        return tuple(v for _, v in value)
    return value


class _Context:
    """What reading one document needs: the environment, the file's directory, the
    problems so far and the document read so far (for defaults taken from other keys)."""

    def __init__(self, env: Mapping[str, str], base_dir: str, problems: Problems) -> None:
        self.env = env
        self.base_dir = base_dir
        self.problems = problems
        self.root: Fields | None = None

    def problem(self, path: str, reason: str) -> None:
        self.problems.add(path, reason)

    def read(self, raw: object, path: str) -> Item | None:
        """The path to report under and the value of ``raw``: a Flag's name and text, or
        ``path`` and ``raw`` with ``${VAR}`` expanded. None when expansion failed."""
        if isinstance(raw, Flag):
            self.problems.visit(raw.name)
            value = raw.value
            return raw.name, _FlagText(value) if isinstance(value, str) else value
        self.problems.visit(path)
        if not isinstance(raw, str) or "$" not in raw:
            return path, raw
        text, reasons = expand(raw, self.env)
        for reason in reasons:
            self.problem(path, reason)
        return None if reasons else (path, text)

    def top(self, key: str) -> Any:
        """The value of top-level ``key`` (read already: it comes earlier in the table)."""
        assert self.root is not None
        return self.root.values[key]


def expand(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """``text`` with each ``${VAR}`` and ``${VAR:-default}`` replaced from ``env``.

    The default applies when VAR is unset or empty. Returns the text (a ``_Text`` when
    anything was replaced) and one reason per reference that could not be expanded.
    """
    reasons: list[str] = []

    def substitute(m: re.Match[str]) -> str:
        body = _VAR_BODY_RE.fullmatch(m[1])
        if body is None:
            reasons.append(f"invalid variable reference '{m[0]}'")
            return ""
        name, default = body[1], body[2]
        found = env.get(name)
        if found is not None and (found or default is None):
            return found
        if default is not None:
            return default
        reasons.append(f"environment variable {name} is not set")
        return ""

    result = _VAR_RE.sub(substitute, text)
    if not reasons and "${" in _VAR_RE.sub("", text):
        reasons.append("unterminated '${' (write ${NAME} or ${NAME:-default})")
    return (_Text(result) if result != text else result), reasons


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


def _to_number(value: _Text) -> object:
    text = value.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return value


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# --- scalar forms (also used by the command line's --upstream) --------------------------


def parse_resolv_conf(text: str) -> list[str]:
    """The ``nameserver`` addresses of a resolv.conf, in order, without duplicates.

    Like glibc, entries that are not IP addresses are skipped; an IPv6 zone (``%eth0``)
    is dropped because upstream connections name the address only.
    """
    found: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0]
        words = line.split()
        if len(words) < 2 or words[0] != "nameserver":
            continue
        try:
            addr = str(ipaddress.ip_address(words[1].split("%", 1)[0]))
        except ValueError:
            continue
        if addr not in found:
            found.append(addr)
    return found


def parse_upstream(text: str, path: str, *, base_dir: str = "") -> list[UpstreamConfig]:
    """Parse one upstream spec; ``resolv.conf`` forms yield one upstream per nameserver.

    Forms: ``HOST``, ``HOST:PORT`` and ``tcp://HOST[:PORT]`` (TCP), ``udp://HOST[:PORT]``,
    ``auto://HOST[:PORT]`` (TCP, or UDP for a server that does not answer over TCP), port
    53 when absent; ``tls://HOST[:PORT]#NAME`` (DNS over TLS, port 853, NAME checked in
    the certificate); ``resolv.conf`` and ``resolv.conf:PATH`` (every nameserver of the
    file, relative to ``base_dir``; auto unless a scheme says otherwise, as in
    ``tcp://resolv.conf``). IPv6 goes in brackets when a port follows. Raises ConfigError
    with ``path`` on failure.
    """
    try:
        return read_upstream(text, base_dir)
    except BadValue as e:
        raise ConfigError([f"{path}: {e}"]) from None


_DEFAULT_PORTS: dict[str, int] = {"tcp": 53, "udp": 53, "auto": 53, "tls": 853}


def read_upstream(text: str, base_dir: str, *, name_required: bool = True) -> list[UpstreamConfig]:
    """:func:`parse_upstream`, raising BadValue with the reason alone. ``name_required``:
    a ``tls://`` address must carry its ``#NAME`` (the mapping form may give it apart)."""
    text = text.strip()
    if not text:
        raise BadValue("empty upstream")
    transport: Transport | None = None
    body = text
    scheme = _SCHEME_RE.fullmatch(text)
    if scheme:
        name = scheme[1].lower()
        if name not in _DEFAULT_PORTS:
            raise BadValue(
                f"unsupported scheme '{name}://' in '{text}' (use tcp://, udp://, tls:// or auto://)"
            )
        transport = cast(Transport, name)
        body = scheme[2]
    if body == "resolv.conf" or body.startswith("resolv.conf:"):
        if transport == "tls":
            raise BadValue(
                "tls:// cannot take resolv.conf: each TLS server needs its name, so list "
                "them as tls://HOST#NAME"
            )
        file = body[len("resolv.conf:") :] if ":" in body else DEFAULT_RESOLV_CONF
        if not file:
            raise BadValue("'resolv.conf:' needs a file name after the ':'")
        # auto: the resolvers of a machine are not always reachable over TCP.
        found = _read_resolv_conf(file, base_dir)
        return [UpstreamConfig(transport or "auto", addr, 53) for addr in found]
    body, hash_, server_name = body.partition("#")
    if hash_ and transport != "tls":
        raise BadValue(f"'#{server_name}' in '{text}': a server name only goes with tls://")
    host, port = _split_host_port(body)
    addr = _ip_literal(host)
    transport = transport or "tcp"
    number = _DEFAULT_PORTS[transport] if port is None else _port(port, 1)
    if transport != "tls":
        return [UpstreamConfig(transport, addr, number)]
    if not hash_ and name_required:
        raise BadValue(
            f"'{text}' needs the server's name after '#' (tls://{HostPort(addr, number)}"
            "#dns.example): it is sent as SNI and checked in the server's certificate"
        )
    name = _server_name(server_name) if hash_ else None
    return [UpstreamConfig(transport, addr, number, TlsConfig(server_name=name))]


def _server_name(text: str) -> str:
    """A TLS server name: a domain name (lowercase, no trailing dot) or an IP address."""
    name = text.strip().lower().removesuffix(".")
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise BadValue(f"'{text}' is not a valid server name")
    if any(len(label) > 63 for label in labels):
        raise BadValue(f"'{text}' has a label longer than 63 characters")
    return name


def _read_resolv_conf(file: str, base_dir: str) -> list[str]:
    full = os.path.join(base_dir, file)
    try:
        with open(full, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise BadValue(f"cannot read {full}: {e.strerror or e}") from None
    addrs = parse_resolv_conf(text)
    if not addrs:
        raise BadValue(f"{full} has no nameserver lines with an IP address")
    return addrs


def _split_host_port(text: str) -> tuple[str, str | None]:
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise BadValue(f"'{text}' is missing the closing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if ":" not in host:
            raise BadValue(f"'{text}': brackets are only for IPv6 addresses")
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise BadValue(f"'{text}' is not of the form [ADDR]:PORT")
        return host, rest[1:]
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, port
    # Several colons: a bare IPv6 address; its port, if any, would need brackets.
    return text, None


def _ip_literal(host: str) -> str:
    if not host:
        raise BadValue("missing IP address")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _HOSTNAME_RE.fullmatch(host):
        # Names are never resolved: the proxy is what resolves them, so it would ask itself.
        raise BadValue(f"'{host}' is a hostname; an IP address is required here")
    raise BadValue(f"'{host}' is not a valid IP address")


def _port(text: str, lowest: int) -> int:
    if not (text.isascii() and text.isdigit()):
        raise BadValue(f"port '{text}' is not a number")
    port = int(text)
    if not lowest <= port <= 65535:
        raise BadValue(f"port {port} out of range ({lowest}-65535)")
    return port


def _listen_addr(text: str) -> HostPort:
    # Port 0 is allowed so that tests can bind an ephemeral port.
    host, port = _split_host_port(text.strip())
    if host.isascii() and host.isdigit():
        raise BadValue(f"'{text}' needs an address too (ADDR:PORT, e.g. 127.0.0.1:{host})")
    addr = _ip_literal(host)
    if port is None:
        form = "[ADDR]:PORT" if ":" in addr else "ADDR:PORT"
        raise BadValue(f"'{text}' needs a port ({form})")
    return HostPort(addr, _port(port, 0))


def normalize_zone(text: str) -> str:
    """``text`` as a zone name: lowercase, absolute (trailing dot); raises on a bad name."""
    name = text.strip().lower()
    if name == ".":
        return name
    body = name[:-1] if name.endswith(".") else name
    if not body:
        raise BadValue("empty zone name (use '.' for the root)")
    if len(body) > 253 or not all(_LABEL_RE.fullmatch(label) for label in body.split(".")):
        raise BadValue(f"'{text}' is not a valid domain name")
    if any(len(label) > 63 for label in body.split(".")):
        raise BadValue(f"'{text}' has a label longer than 63 characters")
    return body + "."


# --- readers: one per kind of value ------------------------------------------------------
#
# A reader checks one (already ${VAR}-expanded) value and returns what goes into the
# Config, or reports the problem at the path it is given and returns INVALID. ``schema``
# is its JSON Schema, which allows a ${VAR} string wherever a number or boolean goes.

_ENV_REF: dict[str, Any] = {"$ref": "#/$defs/env"}


def _or_env(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, _ENV_REF]}


def _any_case(words: tuple[str, ...]) -> str:
    def one(word: str) -> str:
        return "".join(f"[{c}{c.upper()}]" if c.isalpha() else re.escape(c) for c in word)

    return r"^\s*(" + "|".join(one(w) for w in words) + r")\s*$"


class Reader:
    """Base of every reader; a scalar reader implements :meth:`parse`."""

    expands = True  # scalar values may carry ${VAR}; lists and mappings are walked instead

    def read(self, ctx: _Context, path: str, value: object) -> Any:
        try:
            return self.parse(value, ctx)
        except BadValue as e:
            ctx.problem(path, str(e))
            return INVALID

    def parse(self, value: object, ctx: _Context) -> Any:
        """The checked value; raises ``BadValue`` with the reason otherwise."""
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        return {"type": "string"}


@dataclass(frozen=True)
class Integer(Reader):
    lo: int
    hi: int | None = None

    def parse(self, value: object, ctx: _Context) -> int:
        if isinstance(value, _Text):
            value = _to_number(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < self.lo
            or (self.hi is not None and value > self.hi)
        ):
            bound = f">= {self.lo}" if self.hi is None else f">= {self.lo} and <= {self.hi}"
            raise BadValue(f"must be an integer {bound} (got {_show(value)})")
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer", "minimum": self.lo}
        if self.hi is not None:
            out["maximum"] = self.hi
        return _or_env(out)


@dataclass(frozen=True)
class Seconds(Reader):
    zero_ok: bool = False

    def parse(self, value: object, ctx: _Context) -> float:
        if isinstance(value, _Text):
            value = _to_number(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (value == 0 and not self.zero_ok)
        ):
            bound = ">= 0" if self.zero_ok else "> 0"
            raise BadValue(f"must be a number of seconds {bound} (got {_show(value)})")
        return float(value)

    def schema(self) -> dict[str, Any]:
        bound = "minimum" if self.zero_ok else "exclusiveMinimum"
        return _or_env({"type": "number", bound: 0})


@dataclass(frozen=True)
class Boolean(Reader):
    def parse(self, value: object, ctx: _Context) -> bool:
        if isinstance(value, _Text) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise BadValue(f"must be true or false (got {_show(value)})")
        return value

    def schema(self) -> dict[str, Any]:
        return _or_env({"type": "boolean"})


@dataclass(frozen=True)
class Choice(Reader):
    """One of a few words, in any case."""

    choices: tuple[str, ...]

    def parse(self, value: object, ctx: _Context) -> str:
        if isinstance(value, str) and value.strip().lower() in self.choices:
            return value.strip().lower()
        raise BadValue(f"must be one of {', '.join(self.choices)} (got {_show(value)})")

    def schema(self) -> dict[str, Any]:
        any_case = {"type": "string", "pattern": _any_case(self.choices)}
        return {"anyOf": [{"enum": list(self.choices)}, any_case, _ENV_REF]}


@dataclass(frozen=True)
class ListenAddress(Reader):
    """``ADDR:PORT`` (IPv6 in brackets); port 0 picks a free port."""

    def parse(self, value: object, ctx: _Context) -> HostPort:
        return _listen_addr(str(value))


@dataclass(frozen=True)
class Endpoint(Reader):
    """An optional ``ADDR:PORT``: null or ``none`` turn it off."""

    def parse(self, value: object, ctx: _Context) -> HostPort | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadValue(f"must be ADDR:PORT or null (got {_show(value)})")
        if value.strip().lower() == "none":
            return None
        return _listen_addr(value)

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "null"]}


@dataclass(frozen=True)
class Network(Reader):
    """A CIDR network; a bare IP is a /32 or /128."""

    def parse(self, value: object, ctx: _Context) -> Any:
        text = str(value)
        try:
            return ipaddress.ip_network(text.strip())
        except ValueError:
            pass
        try:
            net = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise BadValue(f"'{text}' is not an IP address or CIDR network") from None
        raise BadValue(f"'{text}' has host bits set (did you mean {net}?)")


@dataclass(frozen=True)
class UpstreamAddress(Reader):
    """An upstream in one of its string forms; ``resolv.conf`` forms stand for several
    servers. ``name_required``: a ``tls://`` address must carry its ``#NAME``."""

    name_required: bool = True

    def parse(self, value: object, ctx: _Context) -> list[UpstreamConfig]:
        if not isinstance(value, str):
            raise BadValue(f"must be an upstream address string (got {_show(value)})")
        base_dir = "" if isinstance(value, _FlagText) else ctx.base_dir
        return read_upstream(value, base_dir, name_required=self.name_required)


@dataclass(frozen=True)
class UpstreamSpec(Reader):
    """One entry of a zone's upstreams: a string (:class:`UpstreamAddress`), or a mapping
    (``mapping``: ``address`` and the keys that only fit in a mapping, the TLS ones)."""

    mapping: Section
    expands = True  # a string entry may carry ${VAR}; a mapping's keys are expanded one by one

    def read(self, ctx: _Context, path: str, value: object) -> Any:
        if isinstance(value, dict):
            before = len(ctx.problems)
            entry = self.mapping.read(ctx, path, value)
            return _upstream_mapping(ctx, entry, path, len(ctx.problems) > before)
        return UpstreamAddress().read(ctx, path, value)

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "string"}, self.mapping.schema()]}


def _upstream_mapping(ctx: _Context, entry: Fields, path: str, bad: bool) -> Any:
    """The upstreams of a mapping entry, once its keys fit together (TLS keys only for a
    ``tls://`` address, a server name unless ``insecure``, files that TLS can use);
    ``bad``: reading its keys found problems already."""
    before = len(ctx.problems)
    v = entry.values
    found: list[UpstreamConfig] | None = v["address"]
    if not found:
        return INVALID  # reported
    given = entry.given
    tls_keys = [k.name for k in _TLS_KEYS if k.name in given]
    first = found[0]
    if first.transport != "tls":
        for key in tls_keys:
            ctx.problem(given[key], f"only for tls:// upstreams (the address is {first.label})")
        return INVALID if tls_keys else found
    in_address = first.tls.server_name if first.tls is not None else None
    name: str | None = v["tls_server_name"]
    if name is not None and in_address is not None and name != in_address:
        ctx.problem(
            given["tls_server_name"],
            f"'{name}' differs from the name in address ('#{in_address}'); give it once",
        )
    name = name or in_address
    insecure: bool = v["insecure"]
    if name is None and not insecure and "insecure" not in entry.failed:
        ctx.problem(
            given["address"],
            "a tls:// upstream needs the server's name, checked in its certificate: "
            "tls_server_name, or '#NAME' after the address (or insecure: true)",
        )
    if v["client_key_file"] is not None and v["client_cert_file"] is None:
        ctx.problem(given["client_key_file"], "needs client_cert_file (the certificate)")
    if bad or len(ctx.problems) > before:
        return INVALID  # a file check on top of other problems would only add noise
    settings = TlsConfig(
        server_name=name,
        ca_file=v["ca_file"],
        client_cert_file=v["client_cert_file"],
        client_key_file=v["client_key_file"],
        min_version=v["tls_min_version"],
        insecure=insecure,
    )
    try:
        tls.client_context(settings)  # what start-up does: the files must be usable
    except tls.TlsSetupError as exc:
        ctx.problem(given.get(exc.key, path), exc.reason)
        return INVALID
    return [dataclasses.replace(first, tls=settings)]


@dataclass(frozen=True)
class ServerName(Reader):
    """A TLS server name (SNI, checked in the certificate), or null."""

    def parse(self, value: object, ctx: _Context) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadValue(f"must be a server name (got {_show(value)})")
        return _server_name(value)

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "null"]}


@dataclass(frozen=True)
class OptionalFile(Reader):
    """A file name, relative to the configuration file's directory, or null."""

    def parse(self, value: object, ctx: _Context) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise BadValue(f"must be a file name (got {_show(value)})")
        return os.path.join(ctx.base_dir, value.strip())

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "null"]}


@dataclass(frozen=True)
class TlsVersion(Reader):
    """The oldest TLS version accepted: 1.2 or 1.3 (a YAML number or a string)."""

    def parse(self, value: object, ctx: _Context) -> str:
        text = str(value).strip() if isinstance(value, str | float) else None
        if text not in ("1.2", "1.3"):
            raise BadValue(f"must be 1.2 or 1.3 (got {_show(value)})")
        return text

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [{"enum": ["1.2", "1.3", 1.2, 1.3]}, _ENV_REF]}


@dataclass(frozen=True)
class ZoneName(Reader):
    def parse(self, value: object, ctx: _Context) -> str:
        if not isinstance(value, str):
            raise BadValue(f"must be a domain name string (got {_show(value)})")
        return normalize_zone(value)


@dataclass(frozen=True)
class InterfaceName(Reader):
    def parse(self, value: object, ctx: _Context) -> str:
        if not isinstance(value, str) or not _IFNAME_RE.fullmatch(value) or value in (".", ".."):
            raise BadValue(
                "must be an interface name of 1-15 letters, digits, '_', '.' or '-' "
                f"(got {_show(value)})"
            )
        return str(value)

    def schema(self) -> dict[str, Any]:
        return _or_env({"type": "string", "pattern": f"^{_IFNAME_RE.pattern}$"})


@dataclass(frozen=True)
class OptionalPort(Reader):
    """A TCP/UDP port 1-65535, or null (or ``none``) for no port."""

    def parse(self, value: object, ctx: _Context) -> int | None:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        if isinstance(value, _Text):
            value = _to_number(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            raise BadValue(f"must be a port 1-65535 or null (got {_show(value)})")
        return value

    def schema(self) -> dict[str, Any]:
        port = {"type": "integer", "minimum": 1, "maximum": 65535}
        return {"anyOf": [port, {"type": "null"}, {"const": "none"}, _ENV_REF]}


@dataclass(frozen=True)
class OptionalIp(Reader):
    """An IP address literal, or null."""

    def parse(self, value: object, ctx: _Context) -> str | None:
        if value is None:
            return None
        try:
            return str(ipaddress.ip_address(str(value).strip()))
        except ValueError:
            raise BadValue(f"{_show(value)} is not an IP address") from None

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "string"}, {"type": "null"}]}


@dataclass(frozen=True)
class UnixPath(Reader):
    """An absolute path for a Unix socket (at most 107 bytes: sun_path), or null."""

    def parse(self, value: object, ctx: _Context) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str) or not value.startswith("/"):
            raise BadValue(f"must be an absolute file path or null (got {_show(value)})")
        if len(os.fsencode(value)) > _MAX_UNIX_PATH:
            raise BadValue(f"a Unix socket path is at most {_MAX_UNIX_PATH} bytes long")
        return str(value)

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [{"type": "string", "pattern": "^[/$]"}, {"type": "null"}]}


@dataclass(frozen=True)
class LocalIp(Reader):
    """A unicast IP address the node role puts on its interface."""

    def parse(self, value: object, ctx: _Context) -> str:
        text = str(value)
        try:
            addr = ipaddress.ip_address(text.strip())
        except ValueError:
            raise BadValue(f"'{text}' is not an IP address") from None
        if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
            raise BadValue(f"{addr} cannot be a local DNS address (use a unicast IP)")
        return str(addr)


@dataclass(frozen=True)
class ListOf(Reader):
    """A list whose entries are each read by ``item``; bad entries are reported and left
    out. The value is a list of (path, value), so that later checks can name an entry."""

    item: Reader
    empty: str | None = None  # the problem an empty list is; None: empty is fine
    shape: str = "a list of strings"  # named when the value is not a list
    item_shape: str = "a string"  # named when an entry is not of item_type
    item_type: type | tuple[type, ...] = str
    null_is_empty: bool = False
    flatten: bool = False  # the item reader returns a list: one entry per element
    expands = False

    def read(self, ctx: _Context, path: str, value: object) -> list[Item]:
        if value is None and self.null_is_empty:
            value = []
        if not isinstance(value, list):
            ctx.problem(path, f"must be {self.shape} (got {_show(value)})")
            return []
        if not value and self.empty:
            ctx.problem(path, self.empty)
        out: list[Item] = []
        for i, raw in enumerate(value):
            item_path = f"{path}[{i}]"
            if self.item.expands:
                found = ctx.read(raw, item_path)
            else:
                ctx.problems.visit(item_path)
                found = item_path, raw
            if found is None:
                continue
            item_path, item = found
            if not isinstance(item, self.item_type):
                ctx.problem(item_path, f"must be {self.item_shape} (got {_show(item)})")
                continue
            result = self.item.read(ctx, item_path, item)
            if result is INVALID:
                continue
            if self.flatten:
                out.extend((item_path, one) for one in result)
            else:
                out.append((item_path, result))
        return out

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.item.schema()}
        if self.empty:
            out["minItems"] = 1
        return out


@dataclass(frozen=True)
class Derived:
    """A default computed from keys read before this one: ``compute(ctx, path)`` returns
    the value to read, as it would be written in the file, or reports why there is none
    and returns INVALID. The key's help text says what it is."""

    compute: Callable[[_Context, str], object]


@dataclass(frozen=True)
class Key:
    """One key of a section: its name, reader, help text and default.

    ``default`` is the value used when the key is left out, as it would be written in the
    file; left unset, it is the section's ``target`` dataclass field of the same name (a
    section key: ``{}``, all defaults). ``required`` is the problem a missing key is.
    ``role="node"`` marks keys of the Kubernetes node role, documented in
    config/nodelocal.yaml instead of config/dnsproxy.yaml.
    """

    name: str
    reader: Reader
    help: str
    default: Any = _FROM_TARGET
    required: str | None = None
    role: str = "proxy"


@dataclass(frozen=True)
class Section(Reader):
    """A mapping of known keys; an unknown key is a problem ("did you mean ...")."""

    keys: tuple[Key, ...]
    target: type | None = None  # the dataclass built from the values, key name = field name
    hints: Mapping[str, str] = field(default_factory=dict)  # reasons for a known mistake
    inherit: str | None = None  # keys left out take this top-level section's values
    nullable: bool = True  # "cache:" with nothing under it means all defaults
    expands = False

    def read(self, ctx: _Context, path: str, value: object) -> Fields:
        if value is None and self.nullable:
            value = {}
        if not isinstance(value, dict):
            ctx.problem(path, f"must be a mapping (got {_show(value)})")
            value = {}
        names = [k.name for k in self.keys]
        for unknown in (k for k in value if k not in names):
            reason = "unknown key"
            close = difflib.get_close_matches(str(unknown), names, n=1)
            if unknown in self.hints:
                reason += f" ({self.hints[unknown]})"
            elif close:
                reason += f" (did you mean '{close[0]}'?)"
            ctx.problems.visit(_join(path, str(unknown)))
            ctx.problem(_join(path, str(unknown)), reason)
        out = Fields(self)
        if ctx.root is None:
            ctx.root = out
        for key in self.keys:
            key_path = _join(path, key.name)
            ctx.problems.visit(key_path)
            result = INVALID
            if key.name in value:
                raw = value[key.name]
                found = ctx.read(raw, key_path) if key.reader.expands else (key_path, raw)
                out.given[key.name] = found[0] if found else key_path
                if found is not None:
                    result = key.reader.read(ctx, *found)
                if result is INVALID:
                    out.failed.add(key.name)
            elif key.required:
                ctx.problem(key_path, key.required)
                out.failed.add(key.name)
            if result is INVALID and not key.required:
                # Left out, or refused: the default, so that the checks can go on.
                result = self._default(ctx, key, key_path)
            if result is INVALID:  # no value: later checks see no entries, or None
                result = [] if isinstance(key.reader, ListOf) else None
            out.values[key.name] = result
        return out

    def _default(self, ctx: _Context, key: Key, path: str) -> Any:
        if self.inherit is not None:
            default = ctx.top(self.inherit).values[key.name]
        else:
            default = self.default_of(key)
            if default is OFF:
                return None
            if isinstance(default, Derived):
                default = default.compute(ctx, path)
                if default is INVALID:  # it said why
                    return INVALID
        return key.reader.read(ctx, path, default)

    def default_of(self, key: Key) -> Any:
        """``key``'s default as written in a file (OFF, or a Derived); None if required."""
        if key.required:
            return None
        if key.default is not _FROM_TARGET:
            return key.default
        if isinstance(key.reader, Section):
            return {}
        return _field_default(self.target, key.name)

    def schema(self) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for key in self.keys:
            entry: dict[str, Any] = {"description": key.help}
            default = None if self.inherit else self.default_of(key)
            static = not isinstance(key.reader, Section) and not isinstance(default, Derived)
            if static and default not in (None, OFF):
                entry["default"] = default
            properties[key.name] = {**entry, **key.reader.schema()}
        out: dict[str, Any] = {
            "type": ["object", "null"] if self.nullable else "object",
            "properties": properties,
            "additionalProperties": False,
        }
        required = [k.name for k in self.keys if k.required]
        if required:
            out["required"] = required
        return out


def _field_default(target: type | None, name: str) -> Any:
    if target is None or not is_dataclass(target):
        raise TypeError(f"key {name!r} has no default and its section no target dataclass")
    spec = {f.name: f for f in fields(target)}[name]
    if spec.default is not MISSING:
        return spec.default
    raise TypeError(f"{target.__name__}.{name} has no default: give the key one")


# --- defaults that depend on other keys --------------------------------------------------


def _local_ips_from_listen(ctx: _Context, path: str) -> object:
    # The specific addresses the proxy listens on at port 53.
    listen: list[HostPort] = [hp for _, hp in ctx.top("listen")]
    found: list[str] = []
    for hp in listen:
        addr = ipaddress.ip_address(hp.host)
        usable = hp.port == _DNS_PORT and not addr.is_unspecified and not addr.is_loopback
        if usable and hp.host not in found:
            found.append(hp.host)
    if not found:
        if listen:  # else listen has its own problem
            ctx.problem(
                path,
                "required: no listen address on port 53 to take them from "
                '(e.g. listen: ["169.254.20.10:53"])',
            )
        return INVALID
    return found


def _health_port_from_health_listen(ctx: _Context, path: str) -> object:
    # The liveness probe goes to health_listen, so by default its port is the one the
    # rules must keep out of conntrack.
    health: HostPort | None = ctx.top("health_listen")
    return None if health is None else health.port


# --- the table -----------------------------------------------------------------------------
#
# Adding a key is one entry in the section it belongs to:
#
#     Key("name_s", Seconds(), "What it does; its unit and bounds."),
#
# In a section with a ``target`` dataclass (upstream, limits, log, node, a zone) add the
# field, with its default, to that dataclass in config_types.py: the default and the
# value's way into the Config come from there. A key at the top level or in acl, cache
# or shutdown needs its line in ``_build`` too. A check that involves other keys is a
# function in CHECKS (below). A command-line flag for it is a field of config.Overrides
# naming the key, and its argparse argument in cli.py. Then describe the key in
# config/dnsproxy.yaml (role="node": config/nodelocal.yaml) and run `make schema`; tests
# fail until both are done.

_LISTEN_DEFAULT = ["127.0.0.1:5353", "[::1]:5353"]
# Loopback only: a file that forgets the acl section must not make an open resolver.
_ALLOW_DEFAULT = ["127.0.0.0/8", "::1/128"]


def _ttl(name: str, hi: int, help: str) -> Key:
    return Key(name, Integer(0, hi), help)


# The cache keys a zone's cache section may override (the top cache section's values are
# their defaults).
_TTL_KEYS = (
    _ttl(
        "min_ttl_s",
        _MAX_TTL_S,
        "Lowest TTL, seconds, an answer is cached for (raises shorter upstream TTLs); "
        "<= max_ttl_s. 0 respects the upstream's TTL.",
    ),
    _ttl(
        "max_ttl_s",
        _MAX_TTL_S,
        "Highest TTL, seconds, a positive answer is cached for (lowers longer upstream TTLs).",
    ),
    _ttl(
        "denial_max_ttl_s",
        _MAX_TTL_S,
        "Highest TTL, seconds, for NXDOMAIN and NODATA answers, whose TTL comes from the "
        "SOA minimum (RFC 2308).",
    ),
    _ttl(
        "servfail_ttl_s",
        _MAX_SERVFAIL_TTL_S,
        "How long, seconds, an upstream failure (SERVFAIL) is remembered, so that a dead "
        "upstream is not asked again for every retry; 0 disables (RFC 2308 §7.1: <= 300).",
    ),
    _ttl(
        "max_stale_s",
        _MAX_TTL_S,
        "How long past its TTL an answer may still be served, with TTL 30, when the "
        "upstreams fail or are slow (RFC 8767 serve-stale), seconds; 0 disables.",
    ),
)

_GLOBAL_ONLY = "the cache is shared; set {} in the top cache section"

_TLS_KEYS = (
    Key(
        "tls_server_name",
        ServerName(),
        "TLS: the server's name, sent as SNI and checked in its certificate; the same as "
        "'#NAME' after the address. Required for tls:// unless insecure.",
        default=None,
    ),
    Key(
        "ca_file",
        OptionalFile(),
        "TLS: PEM file of the CAs that may sign the server's certificate, relative to this "
        "file; null: the system's CA store.",
        default=None,
    ),
    Key(
        "client_cert_file",
        OptionalFile(),
        "TLS, mutual: PEM file with our certificate chain (and its key, unless "
        "client_key_file), shown to a server that asks for one; null: none.",
        default=None,
    ),
    Key(
        "client_key_file",
        OptionalFile(),
        "TLS, mutual: PEM file with the private key of client_cert_file; null: in that file.",
        default=None,
    ),
    Key(
        "tls_min_version",
        TlsVersion(),
        "TLS: the oldest version accepted, 1.2 or 1.3.",
        default=_field_default(TlsConfig, "min_version"),
    ),
    Key(
        "insecure",
        Boolean(),
        "TLS: do not check the server's certificate at all, so anyone on the path can "
        "answer in its name; logged loudly at start. Tests only.",
        default=_field_default(TlsConfig, "insecure"),
    ),
)

_UPSTREAM = UpstreamSpec(
    Section(
        nullable=False,
        keys=(
            Key(
                "address",
                UpstreamAddress(name_required=False),
                "The server in one of the string forms (tls://HOST[:PORT][#NAME] for the "
                "TLS keys).",
                required="required (the server, e.g. 'tls://HOST#NAME')",
            ),
            *_TLS_KEYS,
        ),
    )
)

_ZONE = Section(
    target=ZoneConfig,
    nullable=False,
    keys=(
        Key(
            "zone",
            ZoneName(),
            "The domain, case-insensitive, with or without the trailing dot; '.' is the root "
            "(every name).",
            required="required (the domain this entry forwards, '.' for all)",
        ),
        Key(
            "upstreams",
            ListOf(
                _UPSTREAM,
                empty="at least one upstream is required",
                flatten=True,
                item_shape="an address string or a mapping with address",
                item_type=(str, dict),
            ),
            "Servers to forward to: 'HOST' or 'HOST:PORT' (TCP, port 53 by default), "
            "'tcp://HOST[:PORT]', 'udp://HOST[:PORT]', 'auto://HOST[:PORT]' (TCP, or UDP for a "
            "server that does not answer over TCP), 'tls://HOST[:PORT]#NAME' (DNS over TLS, "
            "port 853, NAME checked in the certificate), 'resolv.conf' (every nameserver of "
            "/etc/resolv.conf, auto) or 'resolv.conf:PATH' (relative to the file), a scheme "
            "in front to choose the transport ('tcp://resolv.conf'); or a mapping with "
            "address and TLS keys. Hosts are IP addresses; IPv6 in brackets before a port.",
            required="at least one upstream is required",
        ),
        Key(
            "policy",
            Choice(("sequential", "random", "round_robin")),
            "How a server is chosen among the healthy ones: sequential (first listed "
            "first), random or round_robin.",
        ),
        Key(
            "try_timeout_s",
            Seconds(),
            "Time one attempt at one server may take before the next is tried, seconds; "
            "<= deadline_s.",
        ),
        Key(
            "deadline_s",
            Seconds(),
            "Time a query may take in total, over all attempts, before the client gets "
            "SERVFAIL, seconds. Keep it under the client's own timeout (5 s for glibc).",
        ),
        Key(
            "cache",
            Section(
                _TTL_KEYS,
                target=CachePolicy,
                inherit="cache",
                hints={
                    name: _GLOBAL_ONLY.format(name)
                    for name in ("max_entries", "serve_stale", "prefetch")
                },
            ),
            "Overrides of the top cache section's TTL keys for this zone only "
            "(min_ttl_s, max_ttl_s, denial_max_ttl_s, servfail_ttl_s, max_stale_s).",
        ),
    ),
)

DOCUMENT = Section(
    nullable=False,
    keys=(
        Key(
            "listen",
            ListOf(ListenAddress(), empty="at least one ADDR:PORT is required"),
            "DNS listen addresses, ADDR:PORT, each served over UDP and TCP; IPv6 in "
            "brackets. Port 0 picks a free port.",
            default=_LISTEN_DEFAULT,
        ),
        Key(
            "http_listen",
            Endpoint(),
            "HTTP endpoint for /metrics, /health and /ready, ADDR:PORT; null or 'none' "
            "disables it.",
            default="127.0.0.1:9253",
        ),
        Key(
            "health_listen",
            Endpoint(),
            "A second HTTP endpoint with the same paths, for a liveness probe on the "
            "link-local address, ADDR:PORT or null. Its port is the default node.health_port.",
            default=None,
            role="node",
        ),
        Key(
            "workers",
            Integer(1, _MAX_WORKERS),
            "Processes answering queries, each with its own cache. 1: one process; N > 1: a "
            "supervisor (listeners, HTTP, node role, reload, handover) and N worker "
            "processes reading the listeners, each its own SO_REUSEPORT socket; a worker "
            "that dies is restarted. More than the node's cores gains nothing. A restart "
            "(or a handover) changes it, a reload does not.",
            default=_field_default(Config, "workers"),
        ),
        Key(
            "acl",
            Section(
                (
                    Key(
                        "allow",
                        ListOf(Network()),
                        "Client source networks allowed to query, as CIDRs (a bare IP is a "
                        "/32 or /128); others get REFUSED. [] allows every source.",
                        default=_ALLOW_DEFAULT,
                    ),
                )
            ),
            "Who may query the proxy.",
        ),
        Key(
            "cache",
            Section(
                (
                    Key(
                        "max_entries",
                        Integer(1),
                        "Most replies kept at once; the least recently used go first.",
                        default=_field_default(Config, "cache_max_entries"),
                    ),
                    *_TTL_KEYS,
                    Key(
                        "serve_stale",
                        Section(
                            target=ServeStaleConfig,
                            keys=(
                                Key(
                                    "answer_after_s",
                                    Seconds(),
                                    "A client waiting this long for the refresh of an expired "
                                    "name gets the stale answer while the refresh goes on "
                                    "(RFC 8767's client-response timer), seconds.",
                                ),
                                Key(
                                    "ede",
                                    Boolean(),
                                    "Mark a stale reply to an EDNS client with Extended DNS "
                                    'Error 3 "Stale Answer" (RFC 8914).',
                                ),
                            ),
                        ),
                        "Serving expired answers when the upstreams fail (RFC 8767); how "
                        "long past the TTL is max_stale_s, per zone.",
                    ),
                    Key(
                        "prefetch",
                        Section(
                            target=PrefetchConfig,
                            keys=(
                                Key(
                                    "min_hits",
                                    Integer(0),
                                    "Cache hits an entry needs in its lifetime to be refreshed "
                                    "in the last tenth of its TTL; 0 turns prefetch off.",
                                ),
                                Key(
                                    "max_inflight",
                                    Integer(1),
                                    "Refreshes under way at once; an entry due beyond it "
                                    "waits for its expiry.",
                                ),
                            ),
                        ),
                        "Refreshing popular entries before they expire.",
                    ),
                ),
                target=CachePolicy,
            ),
            "The answer cache, shared by all zones; its TTL keys are the defaults a zone's "
            "cache section may override.",
        ),
        Key(
            "upstream",
            Section(
                target=UpstreamPoolConfig,
                keys=(
                    Key(
                        "tcp_connections",
                        Integer(1),
                        "Persistent TCP connections kept per upstream server.",
                    ),
                    Key(
                        "max_inflight_per_connection",
                        # Query IDs are 16 bits and allocated per connection.
                        Integer(1, _MAX_PIPELINED),
                        "Queries in flight at once on one connection (RFC 7766 "
                        "pipelining); query IDs are 16 bits. tcp_connections times this "
                        "must be at least limits.max_inflight; left out, it is 500 or as "
                        "many as that takes.",
                    ),
                    Key(
                        "connect_timeout_s",
                        Seconds(),
                        "Time allowed to establish one TCP connection, seconds.",
                    ),
                    Key(
                        "connection_max_age_s",
                        Seconds(),
                        "A connection is replaced after this age, seconds, so that traffic "
                        "spreads over the pods behind a Service ClusterIP.",
                    ),
                    Key(
                        "idle_timeout_s",
                        Seconds(),
                        "A connection unused this long is closed, seconds.",
                    ),
                ),
            ),
            "Connection pool towards each upstream server (TCP).",
        ),
        Key(
            "limits",
            Section(
                target=ServerLimits,
                keys=(
                    Key(
                        "max_tcp_clients",
                        Integer(1),
                        "TCP client connections served at once; more are refused.",
                    ),
                    Key(
                        "max_tcp_clients_per_source",
                        Integer(1),
                        "TCP client connections from one source address at once, so that "
                        "one address cannot take every slot; more from it are refused.",
                    ),
                    Key(
                        "tcp_idle_timeout_s",
                        Seconds(),
                        "A TCP client connection idle this long is closed, seconds.",
                    ),
                    Key(
                        "max_pipelined_per_client",
                        Integer(1),
                        "Queries one TCP client may have outstanding at once.",
                    ),
                    Key(
                        "max_inflight",
                        Integer(1),
                        "Distinct queries waiting for an upstream at once (prefetches "
                        "included), the one limit on misses in flight; beyond it clients "
                        "get SERVFAIL at once.",
                    ),
                    Key(
                        "max_waiters_per_query",
                        Integer(1),
                        "Clients waiting on one identical in-flight query; beyond it "
                        "clients get SERVFAIL.",
                    ),
                    Key(
                        "shed_after_s",
                        Seconds(zero_ok=True),
                        "A UDP listener whose oldest queued query has waited this long, for "
                        "20 ms on end, is overloaded: the misses it reads get SERVFAIL (or a "
                        "stale answer) at once instead of being forwarded, until its queue is "
                        "shorter again, so that cache hits keep their latency; seconds, 0 "
                        "never sheds.",
                    ),
                    Key(
                        "udp_payload_size",
                        Integer(512, 4096),
                        "Largest UDP reply sent to a client and the EDNS buffer size "
                        "advertised in our replies, bytes; a client offering more gets at "
                        "most this. Longer replies keep the whole records that fit, with "
                        "TC=1. Queries sent upstream keep advertising 1232.",
                    ),
                    Key(
                        "udp_rcvbuf",
                        Integer(0, 1 << 30),
                        "Receive buffer of each UDP listener, bytes (0: the kernel's "
                        "default); set past net.core.rmem_max when running with "
                        "CAP_NET_ADMIN. Queries dropped while it is full are counted.",
                    ),
                ),
            ),
            "Protection of the proxy against its clients.",
        ),
        Key(
            "zones",
            ListOf(
                _ZONE,
                empty="at least one zone is required (usually '.' for all names)",
                shape="a list of zones",
                item_shape="a mapping with zone and upstreams",
                item_type=dict,
                null_is_empty=True,
            ),
            "Where queries are forwarded, by domain: the zone with the longest suffix "
            "matching the name; a name outside every zone is REFUSED. No zone twice.",
            required="at least one zone is required (usually '.' for all names)",
        ),
        Key(
            "loop_check",
            Boolean(),
            "At start and before a reload, send <loop id>.<random>.<zone> HINFO to every "
            "upstream of every zone and refuse the configuration (exit 2 at start, naming the "
            "zone and upstream) if one comes back to this instance (any of its workers, or the "
            "instance it takes over from): a forwarding loop.",
            default=_field_default(Config, "loop_check"),
        ),
        Key(
            "log",
            Section(
                target=LogConfig,
                keys=(
                    Key(
                        "level",
                        Choice(("debug", "info", "warning", "error")),
                        "Least severe messages written.",
                    ),
                    Key(
                        "format",
                        Choice(("text", "json")),
                        "text (for people) or json (one object per line, for collectors).",
                    ),
                    Key(
                        "queries",
                        Boolean(),
                        "One log line per query (costly; for debugging).",
                    ),
                ),
            ),
            "Logging to stderr.",
        ),
        Key(
            "metrics",
            Section(
                (
                    Key(
                        "coredns_names",
                        Boolean(),
                        "Also export the CoreDNS / NodeLocal DNSCache metric names "
                        "(coredns_dns_requests_total, coredns_cache_hits_total, ...) with "
                        "their labels, so that dashboards and alerts written for node-cache "
                        "keep working.",
                        default=_field_default(Config, "metrics_coredns_names"),
                    ),
                )
            ),
            "What /metrics exports besides the dnsproxy_* families.",
        ),
        Key(
            "shutdown",
            Section(
                (
                    Key(
                        "grace_s",
                        Seconds(zero_ok=True),
                        "On SIGTERM/SIGINT, time given to in-flight queries to finish, "
                        "seconds; those still unanswered then get SERVFAIL.",
                        default=_field_default(Config, "shutdown_grace_s"),
                    ),
                    Key(
                        "lameduck_s",
                        Seconds(zero_ok=True),
                        "After SIGTERM, /ready is 503 while queries are still answered for "
                        "this long, seconds; a second SIGTERM cuts it short.",
                        default=_field_default(Config, "shutdown_lameduck_s"),
                        role="node",
                    ),
                )
            ),
            "Stopping.",
        ),
        Key(
            "node",
            Section(
                target=NodeConfig,
                keys=(
                    Key(
                        "local_ips",
                        ListOf(LocalIp(), empty="at least one IP address is required"),
                        "IPs (IPv4 and IPv6 together) put on the interface and covered by "
                        "the rules; each must be listened on at port 53. Default: the "
                        "listen addresses on port 53.",
                        default=Derived(_local_ips_from_listen),
                    ),
                    Key(
                        "interface",
                        InterfaceName(),
                        "Interface for the local IPs, created as a dummy link when missing "
                        "(lo where the kernel has no dummy links).",
                    ),
                    Key(
                        "setup_interface",
                        Boolean(),
                        "Create the interface and add the IPs (false: something else does).",
                    ),
                    Key(
                        "rules",
                        Choice(("iptables", "nftables", "auto", "none")),
                        "Rules backend; auto: nftables when nft is installed and iptables is "
                        "the nf_tables variant or absent, else iptables; none: something "
                        "else owns the rules.",
                    ),
                    Key(
                        "sync_interval_s",
                        Seconds(),
                        "Verify the addresses and rules this often and add back whatever is "
                        "missing, seconds.",
                    ),
                    Key(
                        "teardown",
                        Boolean(),
                        "Remove the rules, then the addresses, at exit.",
                    ),
                    Key(
                        "health_port",
                        OptionalPort(),
                        "TCP port of the liveness probe, kept out of conntrack like DNS; "
                        "null: no such rules. Default: the port of health_listen.",
                        default=Derived(_health_port_from_health_listen),
                    ),
                    Key(
                        "fallback",
                        Boolean(),
                        "Fail-safe: NOTRACK a query only while a socket is bound to its "
                        "local IP, so that a killed proxy's rules stop applying and a "
                        "ClusterIP falls back to kube-proxy's DNAT.",
                    ),
                    Key(
                        "fallback_ip",
                        OptionalIp(),
                        "Where queries to the local IPs of its family go while no socket "
                        "holds them (the kube-dns-upstream ClusterIP); null: no such rules. "
                        "nftables backend only.",
                    ),
                ),
            ),
            "The NodeLocal DNSCache role: local IPs on an interface, NOTRACK and ACCEPT "
            "rules for them. The section's presence (even empty) turns the role on.",
            default=OFF,
            role="node",
        ),
        Key(
            "handover",
            Section(
                target=HandoverConfig,
                keys=(
                    Key(
                        "path",
                        UnixPath(),
                        "Unix socket on which the running instance waits for its successor, "
                        "which takes over its listening sockets and cache; an absolute path "
                        "of at most 107 bytes, its directory created (0700) when missing. "
                        "null: no handover.",
                    ),
                    Key(
                        "timeout_s",
                        Seconds(),
                        "Longest wait for each message of the other instance, seconds; one "
                        "that does not answer in time is left alone and this one binds.",
                    ),
                    Key(
                        "cache",
                        Boolean(),
                        "The cache travels too, as a snapshot bounded by cache.max_entries "
                        "and 64 MiB, each entry keeping its remaining TTL.",
                    ),
                    Key(
                        "when_replaced",
                        Choice(("exit", "wait")),
                        "What the replaced instance does once its in-flight queries are "
                        "answered: exit, or wait (serving nothing) until SIGTERM, as a "
                        "Kubernetes container must (the kubelet restarts one that exits).",
                    ),
                ),
            ),
            "Zero-loss replacement of a running instance (an upgrade, a restart by hand).",
        ),
        Key(
            "reload",
            Section(
                (
                    Key(
                        "watch_interval_s",
                        Seconds(zero_ok=True),
                        "Check the config file this often for a change (also through "
                        "symlinks, as a ConfigMap volume swaps its ..data link), seconds; 0 "
                        "disables the check (SIGHUP still reloads).",
                        default=_field_default(Config, "reload_watch_interval_s"),
                    ),
                )
            ),
            "Live reload: SIGHUP, or a change of the config file, reloads it.",
        ),
    ),
)


# --- checks across keys ------------------------------------------------------------------
#
# Each runs after every key has been read, on the values read (those refused are left
# out of lists, or in ``failed`` for single keys). A check that removes an entry (a
# duplicate) does so before the checks after it look.


def _zones(doc: Fields) -> list[Item]:
    zones: list[Item] = doc.values["zones"]
    return zones


def _listen_duplicates(ctx: _Context, doc: Fields) -> None:
    first: dict[HostPort, str] = {}
    kept: list[Item] = []
    for path, hp in doc.values["listen"]:
        if hp in first and hp.port != 0:
            ctx.problem(path, f"{hp} is listed twice (also {first[hp]})")
            continue
        first.setdefault(hp, path)
        kept.append((path, hp))
    doc.values["listen"] = kept


def _zone_duplicates(ctx: _Context, doc: Fields) -> None:
    seen: dict[str, str] = {}
    for path, zone in _zones(doc):
        if "zone" in zone.failed or "zone" not in zone.given:
            continue
        name = zone.values["zone"]
        if name in seen:
            ctx.problem(zone.given["zone"], f"duplicate zone '{name}' (also {seen[name]})")
        else:
            seen[name] = path


def _upstream_duplicates(ctx: _Context, doc: Fields) -> None:
    # A server listed twice would be tried twice in a row by the sequential policy. Zones
    # share a server's connections, so it has one set of TLS settings.
    first: dict[str, Item] = {}
    for _, zone in _zones(doc):
        kept: list[Item] = []
        for path, upstream in zone.values["upstreams"]:
            also = next((p for p, u in kept if u == upstream), None)
            seen = first.setdefault(upstream.label, (path, upstream))
            if also is not None:
                ctx.problem(path, f"{upstream.label} is listed twice (also {also})")
            elif seen[1] != upstream:
                ctx.problem(
                    path, f"{upstream.label} has other TLS settings at {seen[0]}; give it one set"
                )
            else:
                kept.append((path, upstream))
        zone.values["upstreams"] = kept


def _timeouts(ctx: _Context, doc: Fields) -> None:
    for _, zone in _zones(doc):
        if zone.failed & {"try_timeout_s", "deadline_s"}:
            continue
        try_s, deadline_s = zone.values["try_timeout_s"], zone.values["deadline_s"]
        if try_s > deadline_s:
            key = "try_timeout_s" if "try_timeout_s" in zone.given else "deadline_s"
            path = zone.given.get(key, key)
            ctx.problem(path, f"try_timeout_s ({try_s:g}) must be <= deadline_s ({deadline_s:g})")


def _ttl_bounds(ctx: _Context, doc: Fields) -> None:
    ttl_names = {k.name for k in _TTL_KEYS}
    for cache in (doc.values["cache"], *(zone.values["cache"] for _, zone in _zones(doc))):
        # A zone that sets neither bound inherits a pair already checked globally.
        touched = "min_ttl_s" in cache.given or "max_ttl_s" in cache.given
        if not touched or cache.failed & ttl_names:
            continue
        low, high = cache.values["min_ttl_s"], cache.values["max_ttl_s"]
        if low > high:
            key = "min_ttl_s" if "min_ttl_s" in cache.given else "max_ttl_s"
            ctx.problem(cache.given[key], f"min_ttl_s ({low}) must be <= max_ttl_s ({high})")


def _pool_capacity(ctx: _Context, doc: Fields) -> None:
    # One limit on queries in flight: a query the forwarder admitted must find room in the
    # pool of whichever server it goes to, or the pool would be a second, hidden limit.
    pool: Fields = doc.values["upstream"]
    limits: Fields = doc.values["limits"]
    if pool.failed & {"tcp_connections", "max_inflight_per_connection"} or (
        "max_inflight" in limits.failed
    ):
        return
    connections = pool.values["tcp_connections"]
    per_connection = pool.values["max_inflight_per_connection"]
    inflight = limits.values["max_inflight"]
    if connections * per_connection >= inflight:
        return
    if "max_inflight_per_connection" not in pool.given:
        # Left to its default: sized to carry the limit, so that raising the limit alone
        # is enough.
        needed = -(-inflight // connections)
        if needed <= _MAX_PIPELINED:
            pool.values["max_inflight_per_connection"] = needed
            return
    given = [key for key in ("max_inflight_per_connection", "tcp_connections") if key in pool.given]
    path = (
        pool.given[given[0]] if given else limits.given.get("max_inflight", "limits.max_inflight")
    )
    ctx.problem(
        path,
        f"the pool of {connections} connections of {per_connection} queries each carries "
        f"{connections * per_connection} queries, fewer than limits.max_inflight ({inflight}): "
        "raise upstream.tcp_connections or max_inflight_per_connection, or lower "
        "limits.max_inflight (every query admitted must find room in the pool)",
    )


def _loops(ctx: _Context, doc: Fields) -> None:
    listen: list[HostPort] = [hp for _, hp in doc.values["listen"]]
    for _, zone in _zones(doc):
        for path, upstream in zone.values["upstreams"]:
            addr = ipaddress.ip_address(upstream.host)
            for hp in listen:
                ours = ipaddress.ip_address(hp.host)
                if hp.port == upstream.port and (
                    ours == addr or (ours.is_unspecified and addr.is_loopback)
                ):
                    ctx.problem(
                        path,
                        f"{upstream.label} is this proxy's own listen address {hp} "
                        "(queries would loop)",
                    )
                    break


def _local_ips(ctx: _Context, doc: Fields) -> None:
    node: Fields | None = doc.values["node"]
    if node is None:
        return
    listen: list[HostPort] = [hp for _, hp in doc.values["listen"]]
    kept: list[Item] = []
    for path, ip in node.values["local_ips"]:
        addr = ipaddress.ip_address(ip)
        if any(ip == other for _, other in kept):
            ctx.problem(path, f"{addr} is listed twice")
        elif not any(_serves(hp, addr) for hp in listen):
            ctx.problem(
                path,
                f"nothing listens on {HostPort(ip, _DNS_PORT)}: add it to listen (the rules "
                "would send queries to an address no listener serves)",
            )
        else:
            kept.append((path, ip))
    node.values["local_ips"] = kept


def _fallback(ctx: _Context, doc: Fields) -> None:
    node: Fields | None = doc.values["node"]
    if node is None or "fallback" in node.failed:
        return
    listen: list[HostPort] = [hp for _, hp in doc.values["listen"]]
    local_ips = [ip for _, ip in node.values["local_ips"]]
    fallback: bool = node.values["fallback"]
    if fallback:
        # The fail-safe rules look for a socket bound to the address itself: a wildcard
        # listener never counts, so every query would go to the fallback instead of here.
        for ip in local_ips:
            addr = ipaddress.ip_address(ip)
            if not any(
                hp.port == _DNS_PORT and ipaddress.ip_address(hp.host) == addr for hp in listen
            ):
                ctx.problem(
                    "node.fallback",
                    f"{ip} is served only by a wildcard listener; the fail-safe rules need "
                    f"a socket bound to the address: add {HostPort(ip, _DNS_PORT)} to listen "
                    "(or set fallback: false)",
                )
    ip = node.values["fallback_ip"]
    if ip is None or "fallback_ip" in node.failed:
        return
    path = node.given.get("fallback_ip", "node.fallback_ip")
    target = ipaddress.ip_address(ip)
    reason = None
    if not fallback:
        reason = "needs fallback: true"
    elif ip in local_ips:
        reason = (
            f"{target} is a local IP: queries would come back here (use the "
            "kube-dns-upstream ClusterIP)"
        )
    elif target.is_unspecified or target.is_loopback or target.is_multicast:
        reason = f"{target} cannot take DNS queries (use a unicast IP)"
    elif not any(ipaddress.ip_address(local).version == target.version for local in local_ips):
        reason = f"no local IP is IPv{target.version} like {target}"
    if reason is not None:
        ctx.problem(path, reason)
        node.values["fallback_ip"] = None


def _serves(hp: HostPort, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if hp.port != _DNS_PORT:
        return False
    ours = ipaddress.ip_address(hp.host)
    # Listeners bind IPv6 sockets V6ONLY, so "::" does not serve IPv4.
    return ours == addr or (ours.is_unspecified and ours.version == addr.version)


CHECKS: tuple[Callable[[_Context, Fields], None], ...] = (
    _listen_duplicates,
    _zone_duplicates,
    _upstream_duplicates,
    _timeouts,
    _ttl_bounds,
    _pool_capacity,
    _loops,
    _local_ips,
    _fallback,
)


# --- validation ----------------------------------------------------------------------------


def validate(data: object, *, env: Mapping[str, str], base: str, problems: Problems) -> Config:
    """The Config for a loaded document, checked against the table (the work of
    :func:`dnsproxy.config.parse_config`, once it has laid the flags over ``data``;
    ``problems`` holds what that found). Raises ConfigError with every problem, in
    document order."""
    ctx = _Context(env, "" if base.startswith("<") else os.path.dirname(base), problems)
    if data is None:  # an empty file
        data = {}
    if not isinstance(data, dict):
        problems.add("(top level)", f"must be a mapping of keys (got {_show(data)})")
        raise ConfigError(problems.lines(), source=base)
    doc = DOCUMENT.read(ctx, "", data)
    for check in CHECKS:
        check(ctx, doc)
    if problems:
        raise ConfigError(problems.lines(), source=base)
    return _build(doc)


def _build(doc: Fields) -> Config:
    v = doc.values
    cache: Fields = v["cache"]
    shutdown: Fields = v["shutdown"]
    node: Fields | None = v["node"]
    return Config(
        listen=_plain(v["listen"]),
        zones=tuple(zone.build() for _, zone in v["zones"]),
        http_listen=v["http_listen"],
        health_listen=v["health_listen"],
        allow=_plain(v["acl"].values["allow"]),
        cache_max_entries=cache.values["max_entries"],
        cache=CachePolicy(**{k.name: cache.values[k.name] for k in _TTL_KEYS}),
        cache_serve_stale=cache.values["serve_stale"].build(),
        cache_prefetch=cache.values["prefetch"].build(),
        upstream=v["upstream"].build(),
        limits=v["limits"].build(),
        log=v["log"].build(),
        loop_check=v["loop_check"],
        shutdown_grace_s=shutdown.values["grace_s"],
        shutdown_lameduck_s=shutdown.values["lameduck_s"],
        node=None if node is None else node.build(),
        handover=v["handover"].build(),
        reload_watch_interval_s=v["reload"].values["watch_interval_s"],
        metrics_coredns_names=v["metrics"].values["coredns_names"],
        workers=v["workers"],
    )


def wrong_shape(path: str, value: object) -> str:
    """The problem ``value`` is as the section or list at top-level ``path``, worded as
    validation words it (for flags laid over a document that has no place for them)."""
    reader = next(k.reader for k in DOCUMENT.keys if k.name == path)
    shape = reader.shape if isinstance(reader, ListOf) else "a mapping"
    return f"must be {shape} (got {_show(value)})"


# --- what else the table gives -------------------------------------------------------------


def _walk(
    section: Section, prefix: str = "", role: str = "proxy", repeated: bool = False
) -> Iterator[tuple[str, str, bool]]:
    """(path, role, repeated) of every key: ``repeated`` for the keys of a section that
    takes another's (a zone's cache), which are described once, where they come from."""
    for key in section.keys:
        path = _join(prefix, key.name)
        key_role = role if key.role == "proxy" else key.role
        yield path, key_role, repeated
        inner = key.reader
        item = inner.item if isinstance(inner, ListOf) else None
        if isinstance(item, UpstreamSpec):
            item = item.mapping
        if isinstance(item, Section):
            yield from _walk(item, path + "[]", key_role, repeated)
        elif isinstance(inner, Section):
            yield from _walk(inner, path, key_role, repeated or inner.inherit is not None)


def all_keys() -> list[str]:
    """Every key path the table knows (``zones[].cache.min_ttl_s`` for list entries)."""
    return [path for path, _, _ in _walk(DOCUMENT)]


def documented_keys(role: str = "proxy") -> list[str]:
    """The key paths a shipped file must describe: ``proxy`` ones in config/dnsproxy.yaml,
    ``node`` ones in config/nodelocal.yaml; a zone's cache section as a whole."""
    return [
        path for path, key_role, repeated in _walk(DOCUMENT) if key_role == role and not repeated
    ]


def json_schema() -> dict[str, Any]:
    """A JSON Schema (draft 2020-12) of the configuration file, for editors."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "dnsproxy configuration",
        "description": "Generated from the table of keys in dnsproxy/config_schema.py "
        "(make schema). Any string may use ${VAR} or ${VAR:-default}.",
        **DOCUMENT.schema(),
        "$defs": {
            "env": {
                "description": "A ${VAR} or ${VAR:-default} reference, expanded from the "
                "environment (a number or boolean may come from a variable too).",
                "type": "string",
                "pattern": r"\$\{",
            }
        },
    }


def schema_text() -> str:
    """:func:`json_schema` as published in config/dnsproxy.schema.json."""
    return json.dumps(json_schema(), indent=2, ensure_ascii=False) + "\n"
