"""Names for humans: DNS record types and rcodes as metric labels and log fields show them.

The query paths keep bare ints; these are looked up only when a metric is scraped or a
query line is logged.
"""

from __future__ import annotations

import dnslib


def qtype_name(qtype: int) -> str:
    """``"A"``, ``"AAAA"``, ... for a record type number; ``"TYPE65280"`` for an unknown one."""
    name = dnslib.QTYPE.get(qtype, None)
    return str(name) if name is not None else f"TYPE{qtype}"


def rcode_name(rcode: int) -> str:
    """``"NOERROR"``, ``"NXDOMAIN"``, ... for an rcode; ``"RCODE23"`` for an unknown one."""
    name = dnslib.RCODE.get(rcode, None)
    return str(name) if name is not None else f"RCODE{rcode}"
