"""The root of dnsproxy's own exceptions.

As in dnspython (everything derives from ``dns.exception.DNSException``), every error
dnsproxy raises on purpose derives from :class:`DnsproxyError`, subclassed by the layer that
raises it: ``config.ConfigError``, ``wire.WireError`` and ``wire.BadQuery``,
``upstream.UpstreamError`` (and its timeout and busy kinds), ``node.NodeError``,
``corefile.CorefileError``. So
``except DnsproxyError`` catches dnsproxy's errors and nothing else: a bug's ``TypeError``
still surfaces.
"""

from __future__ import annotations


class DnsproxyError(Exception):
    """Base class of every exception dnsproxy defines."""
