"""One exception root: every error dnsproxy raises on purpose is a DnsproxyError."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import pytest

import dnsproxy
from dnsproxy import wire
from dnsproxy.config import ConfigError, load_config
from dnsproxy.errors import DnsproxyError


def test_every_exception_class_of_the_package_derives_from_the_root() -> None:
    found = []
    for info in pkgutil.iter_modules(dnsproxy.__path__):
        module = importlib.import_module(f"dnsproxy.{info.name}")
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__ == module.__name__
            ):
                found.append(obj)
                assert issubclass(obj, DnsproxyError), obj
    names = {cls.__name__ for cls in found}
    assert {"ConfigError", "WireError", "BadQuery", "UpstreamError", "NodeError"} <= names


def test_the_root_catches_errors_of_every_layer(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: 5\n")
    with pytest.raises(DnsproxyError) as info:
        load_config(str(bad), env={})
    assert isinstance(info.value, ConfigError)
    with pytest.raises(DnsproxyError):
        wire.parse_query(b"\x00\x01")  # shorter than a header
    with pytest.raises(DnsproxyError):
        wire.inspect_response(b"\x00" * 5)


def test_wire_error_is_still_a_value_error() -> None:
    # Callers that predate the root catch it as ValueError.
    assert issubclass(wire.WireError, ValueError)
