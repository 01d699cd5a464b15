"""Configuration files and command-line flags to a Config.

:func:`load_config` reads a YAML file (or takes the built-in defaults), lays the
command-line flags (:class:`Overrides`) over the document, each in place of the key it
replaces, and validates the result against the table in :mod:`dnsproxy.config_schema`.
Every problem is reported with its key path, or with the flag that gave the value
(``zones[1].upstreams[0]: port 70000 out of range``, ``--upstream[1]: ...``); all problems
are collected before refusing, so one run of ``check-config`` shows them all.

The types live in :mod:`dnsproxy.config_types` (no YAML there); they are re-exported here,
as are the schema's public names, so ``from dnsproxy.config import Config`` keeps working.
No I/O beyond reading the files it is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import yaml

from dnsproxy.config_schema import (
    DEFAULT_RESOLV_CONF,
    BadValue,
    ConfigError,
    Flag,
    Problems,
    expand,
    normalize_zone,
    parse_resolv_conf,
    parse_upstream,
    read_upstream,
    validate,
    wrong_shape,
)
from dnsproxy.config_types import (
    CachePolicy,
    Config,
    HandoverConfig,
    HostPort,
    IPNetwork,
    LogConfig,
    NodeConfig,
    Policy,
    PrefetchConfig,
    RulesBackend,
    ServerLimits,
    ServeStaleConfig,
    TlsConfig,
    Transport,
    UpstreamConfig,
    UpstreamPoolConfig,
    ZoneConfig,
)

__all__ = [
    "DEFAULT_RESOLV_CONF",
    "CachePolicy",
    "Config",
    "ConfigError",
    "HandoverConfig",
    "HostPort",
    "IPNetwork",
    "LogConfig",
    "NodeConfig",
    "Overrides",
    "Policy",
    "PrefetchConfig",
    "RulesBackend",
    "ServeStaleConfig",
    "ServerLimits",
    "TlsConfig",
    "Transport",
    "UpstreamConfig",
    "UpstreamPoolConfig",
    "ZoneConfig",
    "load_config",
    "parse_config",
    "parse_resolv_conf",
    "parse_upstream",
]

# The document used when no file is given: every default, forwarding to resolv.conf.
_BUILT_IN: dict[str, Any] = {"zones": [{"zone": ".", "upstreams": ["resolv.conf"]}]}


def _flag(name: str, key: str | None, default: Any = None, *, split: bool = False) -> Any:
    return field(default=default, metadata={"flag": name, "key": key, "split": split})


@dataclass(frozen=True, slots=True)
class Overrides:
    """Command-line flags; each one given replaces the key it names in the document.

    A field's metadata holds the flag's name (what problems are reported under) and the
    key path it replaces; a tuple flag is a list, named ``--flag[i]`` entry by entry
    (``split``: each may be a comma list). Giving a node flag turns the node role on, as
    a ``node:`` section does.
    """

    listen: tuple[str, ...] = _flag("--listen", "listen", ())  # replaces the whole list
    # "[ZONE=]UPSTREAM": replaces that zone's upstreams (see _lay_upstreams).
    upstreams: tuple[str, ...] = _flag("--upstream", None, ())
    http_listen: str | None = _flag("--http-listen", "http_listen")  # "none" disables
    log_level: str | None = _flag("--log-level", "log.level")
    log_format: str | None = _flag("--log-format", "log.format")
    health_listen: str | None = _flag("--health-listen", "health_listen")  # "none" disables
    lameduck: str | None = _flag("--lameduck", "shutdown.lameduck_s")  # seconds, as typed
    workers: str | None = _flag("--workers", "workers")  # a count, as typed
    # Comma lists as node-cache's -localip takes them: "169.254.20.10,169.254.25.10".
    local_ips: tuple[str, ...] = _flag("--local-ip", "node.local_ips", (), split=True)
    interface: str | None = _flag("--interface", "node.interface")
    setup_interface: bool | None = _flag("--setup-interface", "node.setup_interface")
    rules: str | None = _flag("--rules", "node.rules")
    sync_interval: str | None = _flag("--sync-interval", "node.sync_interval_s")
    teardown: bool | None = _flag("--teardown", "node.teardown")
    health_port: str | None = _flag("--health-port", "node.health_port")  # "none": no rules


def parse_config(
    data: object,
    *,
    env: Mapping[str, str],
    base: str = "<config>",
    overrides: Overrides | None = None,
) -> Config:
    """Lay ``overrides`` over a YAML-loaded document, validate it and build the Config.

    ``base`` names where ``data`` came from (the file's path): it becomes the
    ConfigError's ``source``, and a relative ``resolv.conf:PATH`` is read relative to its
    directory. Every problem found is collected before ConfigError is raised.
    """
    problems = Problems()
    if overrides is not None:
        data = _lay_over(data, overrides, env, problems)
    return validate(data, env=env, base=base, problems=problems)


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
        data: object = _BUILT_IN
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


# --- flags laid over the document ---------------------------------------------------------


def _lay_over(
    data: object, overrides: Overrides, env: Mapping[str, str], problems: Problems
) -> object:
    """A copy of ``data`` with each flag given in place of the key it replaces."""
    if data is None:  # an empty file
        data = {}
    if not isinstance(data, dict):
        return data  # refused as a whole by validation
    doc = dict(data)
    for spec in fields(Overrides):
        value = getattr(overrides, spec.name)
        name, key = spec.metadata["flag"], spec.metadata["key"]
        if value is None or value == () or key is None:
            continue
        if isinstance(value, tuple):
            texts = [p for t in value for p in t.split(",")] if spec.metadata["split"] else value
            value = [Flag(f"{name}[{i}]", text) for i, text in enumerate(texts)]
        else:
            value = Flag(name, value)
        section, _, rest = key.rpartition(".")
        if section:
            _section(doc, section, problems)[rest] = value
        else:
            doc[key] = value
    _lay_upstreams(doc, overrides.upstreams, env, problems)
    return doc


def _section(doc: dict[Any, Any], name: str, problems: Problems) -> dict[Any, Any]:
    """A copy of top-level section ``name``, put in its place for flags to go into."""
    inner = doc.get(name)
    if inner is None:  # left out or empty: "node:" and a node flag both turn the role on
        inner = {}
    elif not isinstance(inner, dict):
        # Reported here, as validation would, so that the flag is still read.
        problems.add(name, wrong_shape(name, inner))
        inner = {}
    section: dict[Any, Any] = dict(inner)
    doc[name] = section
    return section


def _lay_upstreams(
    doc: dict[Any, Any], flags: tuple[str, ...], env: Mapping[str, str], problems: Problems
) -> None:
    """Each ``--upstream [ZONE=]UPSTREAM`` replaces the upstreams of its zone (default
    ``.``); a zone the file lacks is added with every other key at its default.

    A flag that cannot be read replaces nothing; its problems are listed where the zones
    are, in the order of the flags.
    """
    groups: dict[str, list[Flag]] = {}
    for i, text in enumerate(flags):
        name = f"--upstream[{i}]"
        problems.place(name, "zones")
        zone_text, sep, spec = text.partition("=")
        if not sep:
            zone_text, spec = ".", text
        try:
            zone = normalize_zone(zone_text)
            read_upstream(spec, "")  # read again, as the zone's entry, by validation
        except BadValue as e:
            problems.add(name, str(e))
            continue
        groups.setdefault(zone, []).append(Flag(name, spec))
    zones = doc.get("zones")
    if not groups:
        return
    if not isinstance(zones, list | None):
        problems.add("zones", wrong_shape("zones", zones))  # as in _section
        zones = None
    zones = list(zones or ())
    for i, entry in enumerate(zones):
        named = _zone_of(entry, env)
        if named is not None and named in groups:
            # The file's upstreams are not read at all: they may name a host that only
            # exists where the file is deployed (an unset ${VAR}, a missing resolv.conf).
            zones[i] = {**entry, "upstreams": groups.pop(named)}
    zones += [{"zone": name, "upstreams": group} for name, group in groups.items()]
    doc["zones"] = zones


def _zone_of(entry: object, env: Mapping[str, str]) -> str | None:
    """The zone a file entry names, or None where validation will report a problem."""
    text = entry.get("zone") if isinstance(entry, dict) else None
    if not isinstance(text, str):
        return None
    text, reasons = expand(text, env)
    try:
        return None if reasons else normalize_zone(text)
    except BadValue:
        return None


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
