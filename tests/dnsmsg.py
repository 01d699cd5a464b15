"""dnspython builders of upstream replies, shared by the sans-IO tests.

``test_wire.py`` and ``test_cache.py`` each make the query in their own way (IDs, EDNS)
and fill in the reply with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import dns.message
import dns.rcode
import dns.rrset


def rrset(name: str, ttl: int, rdtype: str, *rdatas: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, ttl, "IN", rdtype, *rdatas)


def reply_to(
    query: dns.message.Message,
    answer: Sequence[dns.rrset.RRset] = (),
    authority: Sequence[dns.rrset.RRset] = (),
    additional: Sequence[dns.rrset.RRset] = (),
    *,
    rcode: int = dns.rcode.NOERROR,
    flags: int = 0,
) -> dns.message.Message:
    """The reply to ``query`` as an upstream sends it: RA, ``rcode``, the header ``flags``
    given (AA, TC) and the three sections."""
    r = dns.message.make_response(query, recursion_available=True)
    r.set_rcode(dns.rcode.Rcode.make(rcode))
    r.flags |= flags
    r.answer.extend(answer)
    r.authority.extend(authority)
    r.additional.extend(additional)
    return r
