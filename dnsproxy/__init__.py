"""dnsproxy: a node-local caching DNS forwarder."""

from __future__ import annotations

__version__ = "0.1.0"
