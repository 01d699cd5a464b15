"""dnsproxy: a node-local caching DNS forwarder."""

from __future__ import annotations

# The one place the version is written: pyproject.toml reads it for the package metadata,
# and `dnsproxy --version` and the dnsproxy_build_info metric show it.
__version__ = "0.1.0"
