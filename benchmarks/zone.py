"""Generated data: the upstream's zones and the dnsperf query files of every scenario.

The upstream (Unbound, authoritative from ``local-data`` only, refusing everything else)
serves two zones:

- ``bench.test.``: hosts ``h<i>.bench.test`` with one A and one AAAA each, TTL 3600;
  any other name is NXDOMAIN, other types NODATA (negative TTL 30 from the SOA).
- ``cluster.local.``: Kubernetes-style services with TTL 5 and SOA minimum 5, as CoreDNS
  serves them: ``svc<j>.app.svc.cluster.local`` (the client pod's own namespace ``app``)
  and ``svc<j>.ns<k>.svc.cluster.local`` (other namespaces).

Record data uses only 169.254.0.0/16 and 2001:db8::/32. Query files are dnsperf's
``name type`` lines; every file is made with a fixed seed, so runs are comparable.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ZONE = "bench.test"
CLUSTER = "cluster.local"
POD_NAMESPACE = "app"
OTHER_NAMESPACES = 20
SEARCH = (f"{POD_NAMESPACE}.svc.{CLUSTER}", f"svc.{CLUSTER}", CLUSTER)  # ndots:5 search list
HOST_TTL_S = 3600
NEGATIVE_TTL_S = 30
CLUSTER_TTL_S = 5  # CoreDNS kubernetes plugin default TTL and SOA minimum
ZIPF_S = 1.0
SEED = 20240601


@dataclass(frozen=True)
class Sizes:
    """How much data a run generates."""

    hosts: int  # h<i>.bench.test names in the upstream zone (A + AAAA each)
    services: int  # services per kind (own namespace, other namespaces) in cluster.local
    hit_names: int  # warm names of the cache-hit scenarios
    miss_questions: int  # unique questions available to one miss-path run
    fill_entries: int  # distinct answers cached for the memory scenario
    mix_lookups: int  # application lookups (each several queries) in the mix file


FULL = Sizes(
    hosts=300_000,
    services=5_000,
    hit_names=1_000,
    miss_questions=600_000,
    fill_entries=100_000,
    mix_lookups=50_000,
)
SMOKE = Sizes(
    hosts=2_000,
    services=200,
    hit_names=1_000,
    miss_questions=20_000,
    fill_entries=2_000,
    mix_lookups=2_000,
)


@dataclass(frozen=True)
class Files:
    """Paths of the generated files."""

    local_data: Path  # Unbound server-clause lines with the zones
    hits: Path
    miss: Path
    fill: Path
    mix: Path
    probe_name: str  # answered by the upstream (NXDOMAIN): readiness and start-up probes
    upstream_probe_name: str  # a name with an A record: the upstream has loaded its zones


def host(i: int) -> str:
    return f"h{i}.{ZONE}"


def _v4(i: int, base: int = 0) -> str:
    return f"169.254.{base + (i >> 8 & 0x3F)}.{i & 0xFF}"


def _v6(i: int, net: int = 0) -> str:
    return f"2001:db8:{net:x}::{i >> 16:x}:{i & 0xFFFF:x}"


def _soa(zone: str, ttl: int, minimum: int) -> str:
    return f"{zone}. {ttl} IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 {minimum}"


def _local_data(sizes: Sizes) -> list[str]:
    lines = [
        f'local-zone: "{ZONE}." static',
        f'local-zone: "{CLUSTER}." static',
        f"local-data: '{_soa(ZONE, 3600, NEGATIVE_TTL_S)}'",
        f"local-data: '{_soa(CLUSTER, CLUSTER_TTL_S, CLUSTER_TTL_S)}'",
    ]
    for i in range(sizes.hosts):
        lines.append(f"local-data: '{host(i)}. {HOST_TTL_S} IN A {_v4(i)}'")
        lines.append(f"local-data: '{host(i)}. {HOST_TTL_S} IN AAAA {_v6(i)}'")
    for j in range(sizes.services):
        for name, net in ((_own_service(j), 1), (_other_service(j), 2)):
            fqdn = f"{name}.{CLUSTER}"
            lines.append(f"local-data: '{fqdn}. {CLUSTER_TTL_S} IN A {_v4(j, 64 * net)}'")
            lines.append(f"local-data: '{fqdn}. {CLUSTER_TTL_S} IN AAAA {_v6(j, net)}'")
    return lines


def _own_service(j: int) -> str:
    return f"svc{j}.{POD_NAMESPACE}.svc"


def _other_service(j: int) -> str:
    return f"svc{j}.ns{j % OTHER_NAMESPACES}.svc"


def _write(path: Path, lines: Iterable[str]) -> None:
    with path.open("w") as f:
        for line in lines:
            f.write(line)
            f.write("\n")


def miss_questions(sizes: Sizes) -> Iterator[str]:
    """Unique questions, answers first: every host's A, then AAAA, then NODATA types, then
    NXDOMAIN names (``nx<i>.bench.test``), up to ``sizes.miss_questions``."""
    n = sizes.hosts
    answers = (f"{host(i)} {t}" for t in ("A", "AAAA", "MX", "TXT") for i in range(n))
    nxdomain = (f"nx{i}.{ZONE} A" for i in itertools.count())
    return itertools.islice(itertools.chain(answers, nxdomain), sizes.miss_questions)


def lookup_queries(name: str) -> list[str]:
    """The queries glibc sends for ``name`` with ``search <SEARCH>`` and ``ndots:5``: each
    search-list candidate in turn (A and AAAA in parallel), stopping at the first that
    exists, then the name as given if none did."""
    out: list[str] = []
    for suffix in SEARCH:
        candidate = f"{name}.{suffix}"
        out += [f"{candidate} A", f"{candidate} AAAA"]
        if exists(candidate):
            return out
    return [*out, f"{name} A", f"{name} AAAA"]


def exists(fqdn: str) -> bool:
    # Only the two service shapes exist in cluster.local; this mirrors _local_data.
    labels = fqdn.split(".")
    if not fqdn.endswith(f".svc.{CLUSTER}") or len(labels) != 5 or not labels[0][3:].isdigit():
        return False
    j = int(labels[0][3:])
    return labels[1] == POD_NAMESPACE or labels[1] == f"ns{j % OTHER_NAMESPACES}"


def mix_population(sizes: Sizes) -> list[str]:
    """The names applications look up, most popular first (ranks shuffled by a fixed seed):
    a third own-namespace services (``svc<j>``: first candidate exists), a third
    other-namespace services (``svc<j>.ns<k>``: second candidate), a third external names
    (``h<i>.bench.test``: three NXDOMAIN candidates, then the name itself)."""
    names = [f"svc{j}" for j in range(sizes.services)]
    names += [f"svc{j}.ns{j % OTHER_NAMESPACES}" for j in range(sizes.services)]
    names += [host(i) for i in range(sizes.services)]
    random.Random(SEED).shuffle(names)
    return names


def mix_queries(sizes: Sizes) -> list[str]:
    """Zipf-distributed lookups (exponent ZIPF_S), each expanded by :func:`lookup_queries`."""
    population = mix_population(sizes)
    weights = list(
        itertools.accumulate(1.0 / (rank**ZIPF_S) for rank in range(1, 1 + len(population)))
    )
    rng = random.Random(SEED + 1)
    lookups = rng.choices(population, cum_weights=weights, k=sizes.mix_lookups)
    return [q for name in lookups for q in lookup_queries(name)]


def generate(directory: Path, sizes: Sizes) -> Files:
    directory.mkdir(parents=True, exist_ok=True)
    files = Files(
        local_data=directory / "zones.conf",
        hits=directory / "hits.txt",
        miss=directory / "miss.txt",
        fill=directory / "fill.txt",
        mix=directory / "mix.txt",
        probe_name=f"ready.{ZONE}",
        upstream_probe_name=host(0),
    )
    _write(files.local_data, [f"  {line}" for line in _local_data(sizes)])
    _write(files.hits, [f"{host(i)} A" for i in range(sizes.hit_names)])
    _write(files.miss, miss_questions(sizes))
    _write(files.fill, [f"{host(i)} A" for i in range(min(sizes.fill_entries, sizes.hosts))])
    _write(files.mix, mix_queries(sizes))
    return files
