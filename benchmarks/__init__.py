"""Benchmark suite: dnsproxy against dnsmasq, Unbound and dnsdist on one machine, in one run.

``python -m benchmarks`` (``make bench``) starts an Unbound upstream serving a generated zone
on loopback, then each system under test as a caching forwarder in front of it, pinned to one
CPU core, and drives it with ``dnsperf`` pinned to the other core. Results go to
``benchmarks/results/<name>.json``, ``benchmarks/RESULTS.md`` and a PNG plot. ``--smoke``
(``make bench-smoke``) runs the same code on a tiny zone for about a second per step, so
that CI notices when the harness rots. Nothing here is part of ``make test``.
"""

from __future__ import annotations
