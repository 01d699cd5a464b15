"""``dnsproxy import-corefile``: a NodeLocal DNSCache (CoreDNS) Corefile to dnsproxy YAML.

Two parts, both without I/O: :func:`parse` reads the Corefile grammar (server blocks with
their keys, directives with arguments and nested blocks, quoted tokens, ``#`` comments,
``{$VAR}`` environment placeholders) into :class:`ServerBlock` records with line numbers;
:func:`convert` maps the directives node-cache's Corefile uses onto dnsproxy keys and
renders YAML with one comment per mapped directive. A directive or option without a
dnsproxy equivalent is reported with its line number, never dropped: the whole import is
refused (exit status 2) with every such problem listed.

node-cache's ``__PILLAR__`` words are understood as node-cache understands them:
``__PILLAR__CLUSTER__DNS__`` becomes ``${KUBE_DNS_UPSTREAM_SERVICE_HOST}`` (node-cache fills
it at run time from the kube-dns-upstream Service; dnsproxy expands the variable at start),
``__PILLAR__UPSTREAM__SERVERS__`` becomes ``tcp://resolv.conf`` (the node's nameservers,
over the forward's transport), and the words an operator
substitutes (``__PILLAR__LOCAL__DNS__``, ``__PILLAR__DNS__DOMAIN__``,
``__PILLAR__DNS__SERVER__``) take the values of the command's flags.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dnsproxy.errors import DnsproxyError

EXIT_REFUSED = 2

DEFAULT_LOCAL_IP = "169.254.20.10"
DEFAULT_CLUSTER_DOMAIN = "cluster.local"
_UPSTREAM_SERVICE_VAR = "${KUBE_DNS_UPSTREAM_SERVICE_HOST}"
_DNS_PORT = 53
_DOT_PORT = 853  # forward's default port for tls:// targets
_PROBE_INTERVAL_S = 0.5  # dnsproxy probes a server marked down this often
_MAX_FAILS = 2  # and marks it down after this many failures in a row
_DEFAULT_CAPACITY = 9984  # CoreDNS cache's default capacity per kind
_MAX_SERVFAIL_TTL_S = 300
_DEFAULT_STALE_S = 3600.0  # serve_stale's default DURATION
_MAX_STALE_S = 604800  # the bound of dnsproxy's max_stale_s
_PREFETCH_PERCENT = 10  # dnsproxy refreshes in the last tenth of the TTL (CoreDNS's default)


class CorefileError(DnsproxyError):
    """The Corefile cannot be imported; ``problems`` holds ``"line N: reason"`` strings."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


# --- the grammar ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    line: int
    quoted: bool = False


@dataclass(frozen=True, slots=True)
class Directive:
    """One directive line: its name, its arguments and its nested block (sub-directives)."""

    name: str
    args: tuple[Token, ...]
    block: tuple[Directive, ...]
    line: int


@dataclass(frozen=True, slots=True)
class ServerBlock:
    keys: tuple[Token, ...]
    directives: tuple[Directive, ...]
    line: int


_ENV_RE = re.compile(r"\{\$([A-Za-z_][A-Za-z0-9_]*)\}|\{%([A-Za-z_][A-Za-z0-9_]*)%\}")


def tokenize(text: str, env: Mapping[str, str]) -> list[Token]:
    """Split Corefile text into tokens with their line numbers.

    Whitespace separates tokens; ``"..."`` quotes (with ``\\"`` escapes) may hold spaces
    and newlines; ``#`` at the start of a token comments out the rest of the line.
    ``{$VAR}`` (and ``{%VAR%}``) placeholders are replaced from ``env`` inside unquoted
    and quoted tokens alike, as CoreDNS does; an unset variable becomes ``${VAR}`` so that
    dnsproxy expands it when it starts. Raises CorefileError for an unterminated quote.
    """
    tokens: list[Token] = []
    i, line, n = 0, 1, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
            i += 1
        elif c.isspace():
            i += 1
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == '"':
            start_line = line
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise CorefileError([f"line {start_line}: unterminated quoted string"])
                c = text[i]
                if c == "\\" and i + 1 < n and text[i + 1] in '"\\':
                    buf.append(text[i + 1])
                    i += 2
                    continue
                if c == '"':
                    i += 1
                    break
                if c == "\n":
                    line += 1
                buf.append(c)
                i += 1
            tokens.append(Token(_expand("".join(buf), env), start_line, quoted=True))
        else:
            start = i
            while i < n and not text[i].isspace():
                i += 1
            tokens.append(Token(_expand(text[start:i], env), line))
    return tokens


def _expand(text: str, env: Mapping[str, str]) -> str:
    def substitute(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        value = env.get(name)
        return value if value is not None else "${" + name + "}"

    return _ENV_RE.sub(substitute, text)


def parse(text: str, env: Mapping[str, str] | None = None) -> list[ServerBlock]:
    """The server blocks of a Corefile. Raises CorefileError with line numbers for
    unbalanced braces, a block without keys, and snippets or ``import`` (not supported)."""
    tokens = tokenize(text, os.environ if env is None else env)
    blocks: list[ServerBlock] = []
    pos = 0
    while pos < len(tokens):
        keys: list[Token] = []
        while pos < len(tokens) and not _is_open(tokens[pos]):
            tok = tokens[pos]
            if not tok.quoted and tok.text == "}":
                raise CorefileError([f"line {tok.line}: '}}' without a block to close"])
            # "a.example:53, b.example:53": keys may be separated by commas too.
            keys.extend(Token(part, tok.line) for part in tok.text.split(",") if part)
            pos += 1
        if pos >= len(tokens):
            where = keys[0].line if keys else 1
            raise CorefileError([f"line {where}: server block keys without '{{ ... }}'"])
        open_tok = tokens[pos]
        if not keys:
            raise CorefileError([f"line {open_tok.line}: '{{' without server block keys"])
        first = keys[0]
        if first.text.startswith("(") and first.text.endswith(")"):
            raise CorefileError(
                [f"line {first.line}: snippets ({first.text}) and import are not supported"]
            )
        directives, pos = _block(tokens, pos + 1, open_tok.line)
        blocks.append(ServerBlock(tuple(keys), tuple(directives), first.line))
    return blocks


def _is_open(tok: Token) -> bool:
    return not tok.quoted and tok.text == "{"


def _is_close(tok: Token) -> bool:
    return not tok.quoted and tok.text == "}"


def _block(tokens: list[Token], pos: int, open_line: int) -> tuple[list[Directive], int]:
    """Directives from ``pos`` to the matching ``}``; returns them and the position after it.

    A directive is the tokens of one line; a ``{`` ending the line opens its sub-block.
    """
    directives: list[Directive] = []
    while True:
        if pos >= len(tokens):
            raise CorefileError([f"line {open_line}: '{{' is never closed"])
        tok = tokens[pos]
        if _is_close(tok):
            return directives, pos + 1
        if _is_open(tok):
            raise CorefileError([f"line {tok.line}: '{{' without a directive before it"])
        name, line = tok, tok.line
        pos += 1
        args: list[Token] = []
        sub: list[Directive] = []
        while pos < len(tokens) and tokens[pos].line == line:
            nxt = tokens[pos]
            if _is_close(nxt):
                break
            if _is_open(nxt):
                sub, pos = _block(tokens, pos + 1, nxt.line)
                break
            args.append(nxt)
            pos += 1
        if name.text == "import":
            raise CorefileError([f"line {line}: import and snippets are not supported"])
        directives.append(Directive(name.text, tuple(args), tuple(sub), line))


# --- the mapping ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pillars:
    """Values for node-cache's ``__PILLAR__`` words that an operator substitutes."""

    local_ip: str = DEFAULT_LOCAL_IP
    cluster_domain: str = DEFAULT_CLUSTER_DOMAIN
    dns_server: str | None = None  # the kube-dns ClusterIP (transparent mode), or none


# forward's ``tls [CERT KEY CA]`` option: which dnsproxy keys its arguments fill, by count.
_TLS_ARGS: dict[int, tuple[str, ...]] = {
    0: (),
    1: ("ca_file",),
    2: ("client_cert_file", "client_key_file"),
    3: ("client_cert_file", "client_key_file", "ca_file"),
}


@dataclass
class _Zone:
    names: list[str]
    line: int
    upstreams: list[str | dict[str, str]] = field(default_factory=list)
    upstream_note: str = ""
    tls_name: str | None = None  # forward's tls_servername
    tls_files: dict[str, str] = field(default_factory=dict)  # from its tls option
    tls_lines: list[int] = field(default_factory=list)  # of both
    policy: str = "random"  # CoreDNS forward's default
    policy_note: str = "CoreDNS forward's default policy"
    cache: dict[str, int] = field(default_factory=dict)
    cache_note: str = ""


class _Importer:
    def __init__(self, pillars: Pillars) -> None:
        self.pillars = pillars
        self.problems: list[str] = []
        self.zones: list[_Zone] = []
        self.seen_zones: dict[str, int] = {}
        self.listen: dict[str, list[int]] = {}  # "ADDR:PORT" -> lines
        self.listen_sets: list[tuple[int, tuple[str, ...]]] = []
        self.dropped_dns_server: list[int] = []
        self.health: tuple[str, int] | None = None
        self.lameduck_s: float | None = None
        self.prometheus: tuple[str, list[int]] | None = None
        self.log_lines: list[int] = []
        self.notes: dict[str, list[int]] = {}  # directives mapped to nothing, and why
        self.capacity: tuple[int, int] | None = None
        self.prefetch: tuple[int, int, str] | None = None  # min_hits, line, note
        self.globals: dict[str, tuple[float, int, str]] = {}  # key -> value, line, note

    def problem(self, line: int, reason: str) -> None:
        self.problems.append(f"line {line}: {reason}")

    def note(self, text: str, line: int) -> None:
        self.notes.setdefault(text, []).append(line)

    def pillar(self, tok: Token) -> str | None:
        """The token with node-cache's words replaced; None for a dropped DNS__SERVER."""
        text = tok.text
        if "__PILLAR__DNS__SERVER__" in text:
            if self.pillars.dns_server is None:
                return None
            text = text.replace("__PILLAR__DNS__SERVER__", self.pillars.dns_server)
        text = text.replace("__PILLAR__LOCAL__DNS__", self.pillars.local_ip)
        text = text.replace("__PILLAR__DNS__DOMAIN__", self.pillars.cluster_domain)
        text = text.replace("__PILLAR__CLUSTER__DNS__", _UPSTREAM_SERVICE_VAR)
        if "__PILLAR__" in text:
            word = re.search(r"__PILLAR__\w*?__(?=\W|$)", text)
            shown = word[0] if word else text
            if shown != "__PILLAR__UPSTREAM__SERVERS__":
                self.problem(tok.line, f"unknown node-cache word {shown}")
        return text

    # -- server blocks

    def block(self, block: ServerBlock) -> None:
        names: list[str] = []
        ports: set[int] = set()
        for key in block.keys:
            parsed = self.block_key(key)
            if parsed is not None:
                names.append(parsed[0])
                ports.add(parsed[1])
        if len(ports) > 1:
            self.problem(block.line, "one server block on several ports is not supported")
        port = min(ports) if ports else _DNS_PORT
        zone = _Zone(names, block.line)
        binds: list[str] = []
        bind_lines: list[int] = []
        has_forward = has_cache = False
        for d in block.directives:
            handler = getattr(self, "d_" + d.name, None)
            if d.name == "bind":
                binds += self.bind(d)
                bind_lines.append(d.line)
            elif d.name == "forward":
                has_forward = True
                self.forward(d, zone)
            elif d.name == "cache":
                has_cache = True
                self.cache(d, zone)
            elif handler is not None:
                handler(d)
            else:
                self.problem(d.line, f"directive '{d.name}' has no dnsproxy equivalent")
        if not has_forward:
            self.problem(block.line, f"server block {' '.join(names)} has no forward directive")
        if not has_cache:
            # CoreDNS caches nothing for a block without the cache plugin.
            zone.cache = {"max_ttl_s": 0, "denial_max_ttl_s": 0, "servfail_ttl_s": 0}
            zone.cache_note = "no cache directive in the block: nothing cached for this zone"
        addresses = binds or ["0.0.0.0", "::"]
        listen = tuple(sorted(_host_port(a, port) for a in addresses))
        for hp in listen:
            self.listen.setdefault(hp, []).extend(bind_lines or [block.line])
        self.listen_sets.append((block.line, listen))
        for name in names:
            if name in self.seen_zones:
                self.problem(block.line, f"zone {name} also served at line {self.seen_zones[name]}")
            self.seen_zones[name] = block.line
        self.zones.append(zone)

    def block_key(self, key: Token) -> tuple[str, int] | None:
        text = self.pillar(key) or ""
        scheme, sep, rest = text.partition("://")
        if sep:
            if scheme != "dns":
                self.problem(key.line, f"server block {text}: only dns:// is supported")
                return None
            text = rest
        host, _, port_text = text.rpartition(":")
        if not host:
            host, port_text = text, str(_DNS_PORT)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            self.problem(key.line, f"server block key {key.text}: bad port")
            return None
        if "/" in host:
            self.problem(key.line, f"server block key {key.text}: CIDR zones are not supported")
            return None
        zone = host.lower().rstrip(".") or "."
        return zone, int(port_text)

    def bind(self, d: Directive) -> list[str]:
        if d.block:
            self.problem(d.line, "bind with a block (except) is not supported")
        out: list[str] = []
        for tok in d.args:
            text = self.pillar(tok)
            if text is None:
                self.dropped_dns_server.append(tok.line)
                continue
            try:
                out.append(str(ipaddress.ip_address(text)))
            except ValueError:
                if text.startswith("${"):
                    out.append(text)
                else:
                    self.problem(tok.line, f"bind {text}: only IP addresses are supported")
        if not d.args:
            self.problem(d.line, "bind needs an address")
        return out

    # -- forward

    def forward(self, d: Directive, zone: _Zone) -> None:
        if zone.upstreams:
            self.problem(d.line, "a second forward in one server block is not supported")
            return
        if len(d.args) < 2:
            self.problem(d.line, "forward needs FROM and at least one TO")
            return
        origin = (self.pillar(d.args[0]) or "").lower().rstrip(".") or "."
        if origin != "." and origin not in zone.names:
            self.problem(d.line, f"forward {origin}: only '.' or the block's own zone")
        transport = "tcp"
        options = {o.name for o in d.block}
        if "prefer_udp" in options and "force_tcp" in options:
            self.problem(d.line, "forward with both force_tcp and prefer_udp")
        for o in d.block:
            self.forward_option(o, zone)
        where = f"forward (line {d.line})"
        if "prefer_udp" in options:
            transport = "udp"
            zone.upstream_note = f"{where}, prefer_udp: UDP, retried over TCP when truncated"
        elif "force_tcp" in options:
            zone.upstream_note = f"{where}, force_tcp: TCP, dnsproxy's default"
        else:
            zone.upstream_note = (
                f"{where}: TCP (CoreDNS would use the client's transport; TCP avoids the "
                "conntrack race)"
            )
        tls = [t for t in d.args[1:] if t.text.lower().startswith("tls://")]
        if len(tls) == len(d.args) - 1:
            zone.upstream_note = f"{where}: {self.tls_note(zone)}"
        elif tls:
            zone.upstream_note += f"; tls://: {self.tls_note(zone)}"
        elif zone.tls_lines:
            self.problem(zone.tls_lines[0], "tls options without a tls:// upstream to apply to")
        for tok in d.args[1:]:
            text = self.pillar(tok) or ""
            if tok in tls:
                zone.upstreams += self.tls_upstream(text, zone, tok.line)
            else:
                zone.upstreams += self.upstream(text, transport, tok.line)

    def upstream(self, text: str, transport: str, line: int) -> list[str | dict[str, str]]:
        if text == "__PILLAR__UPSTREAM__SERVERS__":
            text = "/etc/resolv.conf"  # what node-cache substitutes: the node's nameservers
        if text.startswith("/"):
            # The scheme, as plain resolv.conf would be dnsproxy's auto transport.
            file = "" if text == "/etc/resolv.conf" else f":{text}"
            return [f"{transport}://resolv.conf{file}"]
        if text.lower().startswith("dns://"):
            text = text[len("dns://") :]
        elif "://" in text:
            self.problem(line, f"forward to {text}: unsupported scheme")
            return []
        if text.startswith("${"):
            return [text] if transport == "tcp" else [f"udp://{text}"]
        found = self.target(text, line)
        if found is None:
            return []
        shown, port = found
        if port is None and transport == "tcp":
            return [shown.strip("[]")]
        return [f"{transport}://{shown}:{port or _DNS_PORT}"]

    def tls_upstream(self, text: str, zone: _Zone, line: int) -> list[str | dict[str, str]]:
        found = self.target(text[len("tls://") :], line)
        if found is None:
            return []
        shown, port = found
        # Without tls_servername, CoreDNS checks the certificate for the IP address.
        address = f"tls://{shown}:{port or _DOT_PORT}#{zone.tls_name or shown.strip('[]')}"
        return [{"address": address, **zone.tls_files}] if zone.tls_files else [address]

    def tls_note(self, zone: _Zone) -> str:
        name = (
            "tls_servername: the name checked in the certificate"
            if zone.tls_name
            else "no tls_servername: the certificate must hold the IP address, as CoreDNS checks"
        )
        files = f"tls: {', '.join(zone.tls_files)}" if zone.tls_files else "the system's CAs"
        lines = f" (lines {_lines(zone.tls_lines)})" if zone.tls_lines else ""
        return f"DNS over TLS ({name}; {files}){lines}"

    def target(self, text: str, line: int) -> tuple[str, str | None] | None:
        """The ``HOST[:PORT]`` of a forward target: the IP address as a URL writes it
        (IPv6 in brackets) and the port as written, or None (reported)."""
        host, port = text, None
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else None
        elif text.count(":") == 1:
            host, port = text.split(":")
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            self.problem(line, f"forward to {text}: an IP address (or a resolv.conf path)")
            return None
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
            self.problem(line, f"forward to {text}: bad port")
            return None
        return (f"[{addr}]" if addr.version == 6 else str(addr)), port

    def forward_option(self, o: Directive, zone: _Zone) -> None:
        args = [a.text for a in o.args]
        if o.name in ("force_tcp", "prefer_udp"):
            if args:
                self.problem(o.line, f"{o.name} takes no arguments")
        elif o.name == "policy":
            if args and args[0] in ("random", "round_robin", "sequential") and len(args) == 1:
                zone.policy, zone.policy_note = args[0], f"policy {args[0]} (line {o.line})"
            else:
                self.problem(o.line, f"policy {' '.join(args)}: not random/round_robin/sequential")
        elif o.name == "max_fails":
            if args != [str(_MAX_FAILS)]:
                self.problem(
                    o.line, f"max_fails {' '.join(args)}: dnsproxy marks a server down after 2"
                )
        elif o.name == "health_check":
            seconds = _duration(args[0]) if args else None
            if len(args) != 1 or seconds != _PROBE_INTERVAL_S:
                self.problem(
                    o.line, f"health_check {' '.join(args)}: dnsproxy probes every 0.5s, . IN NS"
                )
        elif o.name == "expire":
            self.set_global("upstream.idle_timeout_s", o, "expire: idle pooled connections close")
        elif o.name == "max_concurrent":
            self.set_global("limits.max_inflight", o, "max_concurrent (SERVFAIL beyond it)")
        elif o.name == "tls_servername":
            if len(args) != 1:
                self.problem(o.line, "tls_servername needs one name")
            else:
                zone.tls_name = args[0]
                zone.tls_lines.append(o.line)
        elif o.name == "tls":
            keys = _TLS_ARGS.get(len(args))
            if keys is None:
                self.problem(o.line, "tls takes at most three files: CERT KEY CA")
            else:
                zone.tls_files = dict(zip(keys, args, strict=True))
                zone.tls_lines.append(o.line)
        else:
            self.problem(o.line, f"forward option '{o.name}' has no dnsproxy equivalent")

    def set_global(self, key: str, o: Directive, note: str) -> None:
        args = [a.text for a in o.args]
        value: float | None = None
        if len(args) == 1:
            value = _duration(args[0]) if key.endswith("_s") else _integer(args[0])
        if value is None or value <= 0:
            self.problem(o.line, f"{o.name} {' '.join(args)}: needs one positive value")
            return
        old = self.globals.get(key)
        if old is not None and old[0] != value:
            self.problem(o.line, f"{o.name} differs from line {old[1]}: dnsproxy has one {key}")
            return
        self.globals[key] = (value, o.line, f"{note} (line {o.line})")

    # -- cache

    def cache(self, d: Directive, zone: _Zone) -> None:
        args = [a.text for a in d.args]
        ttl = _integer(args[0]) if args else None
        if args and ttl is None:
            self.problem(d.line, f"cache {args[0]}: TTL must be whole seconds")
        if len(args) > 1:
            extra = [(self.pillar(a) or "").lower().rstrip(".") or "." for a in d.args[1:]]
            if any(z not in zone.names for z in extra):
                self.problem(d.line, "cache for zones other than the block's own is not supported")
        if ttl is not None:
            zone.cache["max_ttl_s"] = ttl
            zone.cache["denial_max_ttl_s"] = ttl
        zone.cache_note = f"cache (line {d.line}): TTL caps for this zone"
        capacity = 0
        for o in d.block:
            sub = [a.text for a in o.args]
            if o.name in ("success", "denial"):
                numbers = [_integer(a) for a in sub]
                if not 1 <= len(sub) <= 3 or any(n is None or n < 0 for n in numbers):
                    self.problem(o.line, f"{o.name} {' '.join(sub)}: CAPACITY [TTL [MINTTL]]")
                    continue
                capacity = max(capacity, numbers[0] or 0)
                if len(numbers) > 1:
                    key = "max_ttl_s" if o.name == "success" else "denial_max_ttl_s"
                    zone.cache[key] = numbers[1] or 0
                if len(numbers) > 2:
                    if o.name == "denial":
                        self.problem(o.line, "denial MINTTL: dnsproxy's min_ttl_s is for answers")
                    else:
                        zone.cache["min_ttl_s"] = numbers[2] or 0
            elif o.name == "servfail":
                seconds = _duration(sub[0]) if len(sub) == 1 else None
                if seconds is None or seconds != int(seconds) or seconds > _MAX_SERVFAIL_TTL_S:
                    self.problem(o.line, f"servfail {' '.join(sub)}: whole seconds up to 300")
                else:
                    zone.cache["servfail_ttl_s"] = int(seconds)
            elif o.name == "prefetch":
                self.cache_prefetch(o)
            elif o.name == "serve_stale":
                self.cache_serve_stale(o, zone)
            else:
                self.problem(o.line, f"cache option '{o.name}' has no dnsproxy equivalent")
        capacity = capacity or _DEFAULT_CAPACITY
        if self.capacity is None or capacity > self.capacity[0]:
            self.capacity = (capacity, d.line)

    def cache_prefetch(self, o: Directive) -> None:
        """``prefetch AMOUNT [[DURATION] [PERCENTAGE%]]`` -> ``cache.prefetch.min_hits``."""
        args = [a.text for a in o.args]
        amount = _integer(args[0]) if args else None
        rest = args[1:]
        percent = rest.pop() if rest and rest[-1].endswith("%") else None
        window = rest.pop(0) if rest else None
        if amount is None or amount < 1 or rest or (window and _duration(window) is None):
            self.problem(o.line, f"prefetch {' '.join(args)}: AMOUNT [[DURATION] [PERCENTAGE%]]")
            return
        if percent is not None and percent != f"{_PREFETCH_PERCENT}%":
            self.problem(
                o.line,
                f"prefetch {percent}: dnsproxy refreshes in the last {_PREFETCH_PERCENT}% of the "
                "TTL",
            )
            return
        if self.prefetch is not None and self.prefetch[0] != amount:
            self.problem(
                o.line,
                f"prefetch {amount} differs from line {self.prefetch[1]}: dnsproxy has one "
                "cache.prefetch.min_hits",
            )
            return
        # CoreDNS counts AMOUNT queries with no gap of DURATION (1m) between them; dnsproxy
        # counts the hits in the entry's lifetime, which is at most the zone's TTL cap.
        if self.prefetch is not None:
            return  # the same amount as an earlier block: its line is named
        gap = f"; CoreDNS's gap of {window} is not checked" if window else ""
        self.prefetch = (
            amount,
            o.line,
            f"prefetch (line {o.line}): entries with {amount} hits in their lifetime are "
            f"refreshed in the last {_PREFETCH_PERCENT}% of their TTL, in every zone{gap}",
        )

    def cache_serve_stale(self, o: Directive, zone: _Zone) -> None:
        """``serve_stale [DURATION] [REFRESH_MODE]`` -> the zone's ``max_stale_s``."""
        args = [a.text for a in o.args]
        mode = args.pop() if args and args[-1] in ("immediate", "verify") else "immediate"
        seconds = _duration(args[0]) if len(args) == 1 else _DEFAULT_STALE_S
        if len(args) > 1 or seconds is None or seconds != int(seconds) or seconds > _MAX_STALE_S:
            self.problem(
                o.line,
                f"serve_stale {' '.join(a.text for a in o.args)}: [DURATION] [immediate|verify], "
                f"whole seconds up to {_MAX_STALE_S}",
            )
            return
        zone.cache["max_stale_s"] = int(seconds)
        # dnsproxy asks the upstream first and answers stale when that fails or takes
        # longer than cache.serve_stale.answer_after_s: verify's order. immediate's stale
        # answer before any asking is not done; the refresh is asked at once either way.
        how = "as verify" if mode == "verify" else "immediate is done as verify"
        zone.cache_note += (
            f"; serve_stale (line {o.line}): expired answers up to {int(seconds)} s past "
            f"their TTL when the upstreams fail or take cache.serve_stale.answer_after_s "
            f"({how}: asked first)"
        )

    # -- directives that map to top-level keys or to nothing

    def d_health(self, d: Directive) -> None:
        addr = self.pillar(d.args[0]) if d.args else ":8080"
        if len(d.args) > 1 or addr is None:
            self.problem(d.line, "health takes one address")
            return
        hp = self.address(addr, d.line, "health")
        if hp is None:
            return
        if self.health is not None and self.health[0] != hp:
            self.problem(d.line, f"health differs from line {self.health[1]}")
            return
        self.health = (hp, d.line)
        for o in d.block:
            seconds = _duration(o.args[0].text) if o.name == "lameduck" and o.args else None
            if seconds is None:
                self.problem(o.line, f"health option '{o.name}' has no dnsproxy equivalent")
            else:
                self.lameduck_s = seconds

    def d_prometheus(self, d: Directive) -> None:
        addr = self.pillar(d.args[0]) if d.args else "localhost:9153"
        if len(d.args) > 1 or d.block or addr is None:
            self.problem(d.line, "prometheus takes one address")
            return
        hp = self.address(addr.replace("localhost", "127.0.0.1"), d.line, "prometheus")
        if hp is None:
            return
        if self.prometheus is None:
            self.prometheus = (hp, [])
        elif self.prometheus[0] != hp:
            self.problem(d.line, f"prometheus address differs from line {self.prometheus[1][0]}")
            return
        self.prometheus[1].append(d.line)

    def d_log(self, d: Directive) -> None:
        if d.args or d.block:
            self.problem(d.line, "log with names, a format or classes is not supported")
        self.log_lines.append(d.line)

    def d_errors(self, d: Directive) -> None:
        if d.args or d.block:
            self.problem(d.line, "errors with options is not supported")
        self.note("errors: dnsproxy logs upstream failures at warning level itself", d.line)

    def d_reload(self, d: Directive) -> None:
        self.note(
            "reload: dnsproxy reloads a changed file by itself (watched every "
            "reload.watch_interval_s, and on SIGHUP)",
            d.line,
        )

    def d_loop(self, d: Directive) -> None:
        self.note(
            "loop: dnsproxy refuses, at start and in check-config, an upstream that is its own "
            "listen address",
            d.line,
        )

    def address(self, text: str, line: int, what: str) -> str | None:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            self.problem(line, f"{what} {text}: needs [ADDR]:PORT")
            return None
        host = host.strip("[]") or "0.0.0.0"
        try:
            return _host_port(str(ipaddress.ip_address(host)), int(port))
        except ValueError:
            self.problem(line, f"{what} {text}: only IP addresses are supported")
            return None

    # -- the result

    def check_listen(self) -> None:
        sets = {listen for _, listen in self.listen_sets}
        if len(sets) > 1:
            lines = ", ".join(str(line) for line, _ in self.listen_sets)
            self.problem(
                self.listen_sets[0][0],
                f"server blocks bind different addresses or ports (blocks at lines {lines}); "
                "dnsproxy serves every zone on every listen address",
            )

    def render(self, source: str) -> str:
        out = _Yaml()
        out.comment(f"Imported from {source} by `dnsproxy import-corefile`; each key names")
        out.comment("the Corefile line it comes from. Check it: dnsproxy check-config FILE")
        out.blank()
        listen = sorted(self.listen)
        lines = sorted({line for hp in listen for line in self.listen[hp]})
        out.comment(f"bind and server block ports (lines {_lines(lines)})")
        if self.dropped_dns_server:
            out.comment(
                "__PILLAR__DNS__SERVER__ left out: link-local mode, as node-cache with kube-proxy "
                "in IPVS mode (import with --dns-server IP to also answer the kube-dns ClusterIP)"
            )
        out.key("listen", listen)
        if self.prometheus is not None:
            hp, prom_lines = self.prometheus
            out.blank()
            out.comment(f"prometheus (lines {_lines(prom_lines)})")
            out.key("http_listen", hp)
            out.comment("and under CoreDNS's metric names, so dashboards and alerts keep working")
            out.key("metrics", {"coredns_names": True})
        else:
            out.blank()
            out.comment("no prometheus directive")
            out.key("http_listen", None)
        if self.health is not None:
            hp, line = self.health
            out.blank()
            out.comment(f"health (line {line}): /health and /ready")
            out.key("health_listen", hp)
        out.blank()
        out.comment("CoreDNS answers every source (no acl plugin in the Corefile)")
        out.key("acl", {"allow": []})
        if self.capacity is not None:
            capacity, line = self.capacity
            out.blank()
            out.comment(
                f"cache capacity (line {line}): the largest one written, for one LRU cache "
                "that all zones share"
            )
            cache: dict[str, object] = {"max_entries": capacity}
            if self.prefetch is not None:
                min_hits, _line, note = self.prefetch
                out.comment(note)
                cache["prefetch"] = {"min_hits": min_hits}
            out.key("cache", cache)
        for key, (value, _line, note) in sorted(self.globals.items()):
            section, name = key.split(".")
            out.blank()
            out.comment(note)
            out.key(section, {name: value})
        out.blank()
        out.comment("server blocks, by longest zone suffix")
        out.raw("zones:")
        for zone in self.zones:
            for name in zone.names:
                out.raw(f"  - # server block at line {zone.line}")
                out.raw(f"    zone: {_scalar(name)}")
                out.raw(f"    # {zone.upstream_note}")
                out.raw(f"    upstreams: {_flow(zone.upstreams)}")
                out.raw(f"    # {zone.policy_note}")
                out.raw(f"    policy: {zone.policy}")
                if zone.cache:
                    out.raw(f"    # {zone.cache_note}")
                    out.raw(f"    cache: {_flow(zone.cache)}")
        if self.log_lines:
            out.blank()
            out.comment(f"log (lines {_lines(self.log_lines)}): one line per query")
            out.key("log", {"queries": True})
        if self.lameduck_s is not None:
            out.blank()
            out.comment("health lameduck: /ready is 503 this long after SIGTERM, still serving")
            out.key("shutdown", {"lameduck_s": self.lameduck_s})
        local = [hp for hp in listen if hp.endswith(f":{_DNS_PORT}") and _specific(hp)]
        if local:
            out.blank()
            out.comment("node-cache's role: the bind addresses on the nodelocaldns interface,")
            out.comment("NOTRACK/ACCEPT rules for them (node-cache's -localip, -setupiptables)")
            node: dict[str, object] = {"interface": "nodelocaldns"}
            if self.health is not None:
                node["health_port"] = int(self.health[0].rpartition(":")[2])
            if any(_UPSTREAM_SERVICE_VAR in z.upstreams for z in self.zones):
                # As config/nodelocal.yaml: a killed instance's link-local IP goes there.
                out.comment("fail-safe: while no dnsproxy holds a local IP, its queries go to")
                out.comment("kube-dns-upstream (nftables rules; see config/nodelocal.yaml)")
                node["fallback_ip"] = _UPSTREAM_SERVICE_VAR
            out.key("node", node)
        for text, note_lines in self.notes.items():
            out.comment(f"{text} (lines {_lines(note_lines)})")
        return out.text()


def convert(blocks: Sequence[ServerBlock], source: str, pillars: Pillars | None = None) -> str:
    """dnsproxy YAML for the server blocks, with a comment per mapped directive.

    Raises CorefileError listing every directive or option that has no equivalent.
    """
    imp = _Importer(pillars or Pillars())
    if not blocks:
        raise CorefileError(["line 1: no server blocks"])
    for block in blocks:
        imp.block(block)
    imp.check_listen()
    if imp.problems:
        raise CorefileError(imp.problems)
    return imp.render(source)


# --- rendering helpers ------------------------------------------------------------------


class _Yaml:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def comment(self, text: str) -> None:
        self.lines.append(f"# {text}")

    def blank(self) -> None:
        self.lines.append("")

    def raw(self, text: str) -> None:
        self.lines.append(text)

    def key(self, name: str, value: object) -> None:
        if isinstance(value, dict):
            self.lines.append(f"{name}:")
            for k, v in value.items():
                self.lines.append(f"  {k}: {_flow(v)}")
        elif isinstance(value, list):
            self.lines.append(f"{name}: {_flow(value)}")
        else:
            self.lines.append(f"{name}: {_scalar(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _scalar(value: object) -> str:
    # JSON scalars are YAML scalars; strings are always quoted.
    return json.dumps(value)


def _flow(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    return _scalar(value)


def _lines(lines: Sequence[int]) -> str:
    return ", ".join(str(n) for n in sorted(set(lines)))


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("${") else f"{host}:{port}"


def _specific(hp: str) -> bool:
    host = hp.rpartition(":")[0].strip("[]")
    if host.startswith("${"):
        return True
    return not ipaddress.ip_address(host).is_unspecified


def _integer(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() else None


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _duration(text: str) -> float | None:
    """Seconds in a Go duration (``500ms``, ``10s``, ``1m30s``); a bare number is seconds."""
    if _integer(text) is not None:
        return float(text)
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            return None
        total += float(m[1]) * _UNIT_S[m[2]]
        pos = m.end()
    return total if pos == len(text) and pos else None


# --- the command ------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """``dnsproxy import-corefile FILE``: print the YAML, or the problems and exit 2."""
    parser = argparse.ArgumentParser(
        prog="dnsproxy import-corefile",
        description="Print the dnsproxy configuration equivalent to a NodeLocal DNSCache "
        "(CoreDNS) Corefile, with a comment per mapped directive. Exit 2, naming each line, "
        "when a directive or option has no equivalent.",
    )
    parser.add_argument("file", metavar="FILE", help="the Corefile ('-' reads standard input)")
    parser.add_argument(
        "--local-ip",
        default=DEFAULT_LOCAL_IP,
        help=f"value of __PILLAR__LOCAL__DNS__ (default {DEFAULT_LOCAL_IP})",
    )
    parser.add_argument(
        "--cluster-domain",
        default=DEFAULT_CLUSTER_DOMAIN,
        help=f"value of __PILLAR__DNS__DOMAIN__ (default {DEFAULT_CLUSTER_DOMAIN})",
    )
    parser.add_argument(
        "--dns-server",
        metavar="IP",
        help="value of __PILLAR__DNS__SERVER__, the kube-dns ClusterIP (transparent mode); "
        "without it the word is left out of bind (link-local mode)",
    )
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_REFUSED
    try:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            with open(args.file, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"{args.file}: cannot read: {e}", file=sys.stderr)
        return EXIT_REFUSED
    pillars = Pillars(args.local_ip, args.cluster_domain, args.dns_server)
    try:
        sys.stdout.write(convert(parse(text), args.file, pillars))
    except CorefileError as e:
        for problem in e.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return EXIT_REFUSED
    return 0
