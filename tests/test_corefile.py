"""``dnsproxy import-corefile``: the Corefile grammar, the mapping, the refusals, and the
imported configuration serving the same zones on a node.

``NODELOCAL_COREFILE`` is the Corefile of NodeLocal DNSCache's manifest
(kubernetes/kubernetes, cluster/addons/dns/nodelocaldns/nodelocaldns.yaml, Apache-2.0, the
``node-local-dns`` ConfigMap), the input a migrating operator has; it is substituted the
two ways the Kubernetes documentation's ``sed`` lines do (kube-proxy in iptables mode:
``__PILLAR__DNS__SERVER__`` is the kube-dns ClusterIP; IPVS mode: ``__PILLAR__CLUSTER__DNS__``
is, and ``__PILLAR__DNS__SERVER__`` stays in ``bind``). The netns test (root) runs the
imported file in the node namespace of ``netns.py`` with dnsmasq standing in for CoreDNS on
169.254.60.2 and for the node's resolver on 2001:db8:60::2, and checks from dnsmasq's query
log that each zone reached the server its Corefile block named.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
from certs import Pki
from conftest import ROOT, dnsproxy_cmd, stop_process
from netns import (
    CLUSTER_IP,
    LOCAL_IP,
    NODE_UP_IP,
    NODE_UP_IP6,
    UPSTREAM_IP,
    UPSTREAM_IP6,
    Topology,
    tool,
    topology,
    wait_for,
)
from test_node_netns import our_rules, proxy

from dnsproxy.config import TlsConfig, UpstreamConfig, load_config
from dnsproxy.corefile import CorefileError, Pillars, convert, parse, tokenize

NODELOCAL_COREFILE = """\
__PILLAR__DNS__DOMAIN__:53 {
    errors
    cache {
            success 9984 30
            denial 9984 5
    }
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__CLUSTER__DNS__ {
            force_tcp
    }
    prometheus :9253
    health __PILLAR__LOCAL__DNS__:8080
    }
in-addr.arpa:53 {
    errors
    cache 30
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__CLUSTER__DNS__ {
            force_tcp
    }
    prometheus :9253
    }
ip6.arpa:53 {
    errors
    cache 30
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__CLUSTER__DNS__ {
            force_tcp
    }
    prometheus :9253
    }
.:53 {
    errors
    cache 30
    reload
    loop
    bind __PILLAR__LOCAL__DNS__ __PILLAR__DNS__SERVER__
    forward . __PILLAR__UPSTREAM__SERVERS__
    prometheus :9253
    }
"""

ZONES = ["cluster.local.", "in-addr.arpa.", "ip6.arpa.", "."]
KUBE_DNS = "10.96.0.10"  # a typical kube-dns ClusterIP, as text only: never sent to


def substitute(text: str, **words: str) -> str:
    """What the documentation's ``sed`` does to the Corefile."""
    for word, value in words.items():
        text = text.replace(f"__PILLAR__{word}__", value)
    return text


def iptables_mode(cluster_ip: str = KUBE_DNS) -> str:
    """node-cache's own words (CLUSTER__DNS, UPSTREAM__SERVERS) left for it to fill."""
    return substitute(
        NODELOCAL_COREFILE, LOCAL__DNS=LOCAL_IP, DNS__DOMAIN="cluster.local", DNS__SERVER=cluster_ip
    )


def ipvs_mode(cluster_ip: str = KUBE_DNS) -> str:
    """The kube-dns ClusterIP as the upstream; DNS__SERVER left in bind."""
    return substitute(
        NODELOCAL_COREFILE,
        LOCAL__DNS=LOCAL_IP,
        DNS__DOMAIN="cluster.local",
        CLUSTER__DNS=cluster_ip,
    )


CUSTOMISED = """\
# A cluster's own edits: a stub domain, bigger cache, UDP to a legacy server, query log.
cluster.local:53 in-addr.arpa:53 ip6.arpa:53 {
    errors
    cache 30 {
        success 20000 60 10
        denial 5000 15
        servfail 3s
    }
    bind 169.254.20.10
    forward . {$KUBE_DNS_UPSTREAM_SERVICE_HOST} {
        force_tcp
        max_concurrent 2000
        expire 20s
    }
    prometheus :9253
    health 169.254.20.10:8080 {
        lameduck 4s
    }
    log
}
corp.example:53 {
    bind 169.254.20.10
    cache 120
    forward . [2001:db8:60::2]:53 "169.254.60.2" {
        prefer_udp
        policy sequential
        max_fails 2
        health_check 500ms
    }
}
.:53 {
    bind 169.254.20.10
    cache 30
    forward . /etc/resolv.conf
}
"""


def run_import(tmp_path: Path, text: str, *flags: str, env: dict[str, str] | None = None) -> str:
    corefile = tmp_path / "Corefile"
    corefile.write_text(text)
    result = dnsproxy_cmd("import-corefile", str(corefile), *flags, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = tmp_path / "imported.yaml"
    out.write_text(result.stdout)
    return str(out)


def check_config(path: str, **env: str) -> subprocess.CompletedProcess[str]:
    return dnsproxy_cmd("check-config", path, env={"PATH": "/usr/bin:/bin", **env})


# -- the grammar


def test_tokens_quotes_comments_and_environment() -> None:
    text = 'a "b c" # comment\n  d{$HOME_X}e "q\\"uote"\n{$UNSET_X}'
    tokens = tokenize(text, {"HOME_X": "-x-"})
    assert [(t.text, t.line) for t in tokens] == [
        ("a", 1),
        ("b c", 1),
        ("d-x-e", 2),
        ('q"uote', 2),
        ("${UNSET_X}", 3),  # left for dnsproxy to expand when it starts
    ]


def test_blocks_directives_and_nested_blocks() -> None:
    blocks = parse("a.example:53, b.example:53 {\n  forward . 1.2.3.4 {\n force_tcp\n }\n"
                   "  errors\n}\n.:53 {\n cache 30\n}\n", {})  # fmt: skip
    assert [[k.text for k in b.keys] for b in blocks] == [
        ["a.example:53", "b.example:53"],
        [".:53"],
    ]
    forward, errors = blocks[0].directives
    assert forward.name == "forward" and [a.text for a in forward.args] == [".", "1.2.3.4"]
    assert [(d.name, d.line) for d in forward.block] == [("force_tcp", 3)]
    assert (errors.name, errors.line) == ("errors", 5)
    assert blocks[1].directives[0].args[0].text == "30"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (".:53 {\n  errors\n", "line 1: '{' is never closed"),
        (".:53 {\n}\n}\n", "line 3: '}' without a block to close"),
        (".:53\n", "line 1: server block keys without '{ ... }'"),
        ('.:53 {\n forward . "1.2.3.4\n', "line 2: unterminated quoted string"),
        ("(common) {\n errors\n}\n", "line 1: snippets ((common)) and import"),
        (".:53 {\n import common\n}\n", "line 2: import and snippets are not supported"),
    ],
)
def test_grammar_errors_name_the_line(text: str, message: str) -> None:
    with pytest.raises(CorefileError) as e:
        parse(text, {})
    assert message in str(e.value)


# -- the mapping


@pytest.mark.parametrize("mode", ["pillars", "iptables", "ipvs"])
def test_nodelocal_corefile_gives_a_config_check_config_accepts(tmp_path: Path, mode: str) -> None:
    text = {"pillars": NODELOCAL_COREFILE, "iptables": iptables_mode(), "ipvs": ipvs_mode()}[mode]
    path = run_import(tmp_path, text)
    result = check_config(path, KUBE_DNS_UPSTREAM_SERVICE_HOST="169.254.25.10")
    assert result.returncode == 0, result.stderr
    config = load_config(path, env={"KUBE_DNS_UPSTREAM_SERVICE_HOST": "169.254.25.10"})
    assert [z.zone for z in config.zones] == ZONES
    listen = [str(hp) for hp in config.listen]
    assert listen == ([f"{KUBE_DNS}:53", f"{LOCAL_IP}:53"] if mode == "iptables" else
                      [f"{LOCAL_IP}:53"])  # fmt: skip
    assert config.node is not None and sorted(config.node.local_ips) == sorted(
        hp.host for hp in config.listen
    )
    # The fail-safe goes to the kube-dns-upstream Service, as in config/nodelocal.yaml.
    # (IPVS mode's upstream is the ClusterIP itself, written in the file: no Service var.)
    assert config.node.fallback_ip == (None if mode == "ipvs" else "169.254.25.10")
    assert str(config.health_listen) == f"{LOCAL_IP}:8080"
    assert str(config.http_listen) == "0.0.0.0:9253"
    assert config.metrics_coredns_names is True
    assert config.allow == ()
    cluster, inaddr, _ip6, root = config.zones
    cluster_upstream = KUBE_DNS if mode == "ipvs" else "169.254.25.10"
    assert [u.label for u in cluster.upstreams] == [f"tcp://{cluster_upstream}:53"]
    assert (cluster.cache.max_ttl_s, cluster.cache.denial_max_ttl_s) == (30, 5)
    assert (inaddr.cache.max_ttl_s, inaddr.cache.denial_max_ttl_s) == (30, 30)
    assert all(u.transport == "tcp" for u in root.upstreams)
    assert config.cache_max_entries == 9984
    text_out = Path(path).read_text()
    # One comment per mapped directive, naming its line.
    for fragment in ("forward (line 10), force_tcp", "cache (line 3)", "health (line 14)",
                     "prometheus (lines 13, ", "reload: ", "loop: ", "errors: "):  # fmt: skip
        assert fragment in text_out, fragment
    if mode == "ipvs":
        assert "__PILLAR__DNS__SERVER__ left out: link-local mode" in text_out


def test_transparent_flag_answers_the_cluster_ip_too(tmp_path: Path) -> None:
    path = run_import(tmp_path, NODELOCAL_COREFILE, "--dns-server", KUBE_DNS)
    config = load_config(path, env={"KUBE_DNS_UPSTREAM_SERVICE_HOST": "169.254.25.10"})
    assert [str(hp) for hp in config.listen] == [f"{KUBE_DNS}:53", f"{LOCAL_IP}:53"]


def test_customised_corefile(tmp_path: Path) -> None:
    path = run_import(tmp_path, CUSTOMISED, env={"PATH": "/usr/bin:/bin"})
    env = {"KUBE_DNS_UPSTREAM_SERVICE_HOST": UPSTREAM_IP}
    assert check_config(path, **env).returncode == 0
    config = load_config(path, env=env)
    assert [z.zone for z in config.zones] == [*ZONES[:3], "corp.example.", "."]
    cluster = config.zones[0]
    assert [u.label for u in cluster.upstreams] == [f"tcp://{UPSTREAM_IP}:53"]
    assert cluster.cache.min_ttl_s == 10 and cluster.cache.max_ttl_s == 60
    assert cluster.cache.denial_max_ttl_s == 15 and cluster.cache.servfail_ttl_s == 3
    corp = config.zones[3]
    assert [u.label for u in corp.upstreams] == [
        f"udp://[{UPSTREAM_IP6}]:53",
        f"udp://{UPSTREAM_IP}:53",
    ]
    assert corp.policy == "sequential" and corp.cache.max_ttl_s == 120
    assert config.cache_max_entries == 20000
    assert config.limits.max_inflight == 2000
    assert config.upstream.idle_timeout_s == 20
    assert config.shutdown_lameduck_s == 4
    assert config.log.queries is True


def test_prefetch_and_serve_stale_map_to_their_dnsproxy_keys(tmp_path: Path) -> None:
    text = (
        "cluster.local:53 {\n"
        "    bind 169.254.20.10\n"
        "    cache 30 {\n"
        "        prefetch 5 10m 10%\n"
        "        serve_stale 5m verify\n"
        "    }\n"
        "    forward . 169.254.25.10\n"
        "}\n"
        ".:53 {\n"
        "    bind 169.254.20.10\n"
        "    cache 30 {\n"
        "        prefetch 5\n"
        "        serve_stale\n"
        "    }\n"
        "    forward . 169.254.25.11\n"
        "}\n"
    )
    path = run_import(tmp_path, text)
    assert check_config(path).returncode == 0
    config = load_config(path)
    cluster, root = config.zones
    assert cluster.cache.max_stale_s == 300  # serve_stale 5m
    assert root.cache.max_stale_s == 3600  # serve_stale's default DURATION, 1h
    assert config.cache_prefetch.min_hits == 5  # popular: AMOUNT hits
    out = Path(path).read_text()
    assert "prefetch (line 4): entries with 5 hits in their lifetime" in out
    assert "CoreDNS's gap of 10m is not checked" in out
    assert "serve_stale (line 5): expired answers up to 300 s past their TTL" in out
    assert "serve_stale (line 13): expired answers up to 3600 s" in out
    assert "immediate is done as verify" in out


def test_prefetch_amounts_that_differ_between_blocks_are_refused(tmp_path: Path) -> None:
    text = (
        "a.example:53 {\n    cache 30 {\n        prefetch 5\n    }\n"
        "    forward . 169.254.25.10\n}\n"
        ".:53 {\n    cache 30 {\n        prefetch 3\n    }\n    forward . 169.254.25.11\n}\n"
    )
    corefile = tmp_path / "Corefile"
    corefile.write_text(text)
    result = dnsproxy_cmd("import-corefile", str(corefile))
    assert result.returncode == 2 and result.stdout == ""
    assert (
        "line 9: prefetch 3 differs from line 3: dnsproxy has one cache.prefetch.min_hits"
        in result.stderr
    ), result.stderr


@pytest.mark.parametrize(
    ("edit", "line", "reason"),
    [
        ("    hosts /etc/hosts\n", 4, "directive 'hosts' has no dnsproxy equivalent"),
        ("    rewrite name a b\n", 4, "directive 'rewrite' has no dnsproxy equivalent"),
        (
            "    forward . tls://dns.example {\n        tls_servername dns.example\n    }\n",
            4,
            "forward to dns.example: an IP address",
        ),
        (
            "    forward . tls://169.254.1.1 {\n        tls a b c d\n    }\n",
            5,
            "tls takes at most three files: CERT KEY CA",
        ),
        (
            "    forward . 169.254.1.1 {\n        tls_servername dns.example\n    }\n",
            5,
            "tls options without a tls:// upstream to apply to",
        ),
        (
            "    cache 30 {\n        keepttl\n    }\n",
            5,
            "cache option 'keepttl' has no dnsproxy equivalent",
        ),
        (
            "    cache 30 {\n        prefetch 10 1m 20%\n    }\n",
            5,
            "prefetch 20%: dnsproxy refreshes in the last 10% of the TTL",
        ),
        (
            "    cache 30 {\n        prefetch often\n    }\n",
            5,
            "prefetch often: AMOUNT [[DURATION] [PERCENTAGE%]]",
        ),
        (
            "    cache 30 {\n        serve_stale 1h later\n    }\n",
            5,
            "serve_stale 1h later: [DURATION] [immediate|verify]",
        ),
        (
            "    forward . 169.254.1.1 {\n        max_fails 3\n    }\n",
            5,
            "max_fails 3: dnsproxy marks a server down after 2",
        ),
        (
            "    forward . 169.254.1.1 {\n        except a.example\n    }\n",
            5,
            "forward option 'except'",
        ),
        ("    log . {\n        class denial\n    }\n", 4, "log with names, a format or classes"),
        ("    forward . example.net\n", 4, "forward to example.net: an IP address"),
    ],
)
def test_unmappable_directives_are_refused_with_their_line(
    tmp_path: Path, edit: str, line: int, reason: str
) -> None:
    text = "# stub\n.:53 {\n    bind 169.254.20.10\n" + edit + "    cache 30\n}\n"
    if "forward" not in edit:
        text = text.replace("    cache 30\n}", "    cache 30\n    forward . 169.254.1.1\n}")
    corefile = tmp_path / "Corefile"
    corefile.write_text(text)
    result = dnsproxy_cmd("import-corefile", str(corefile))
    assert result.returncode == 2
    assert result.stdout == ""  # nothing half-imported
    assert f"{corefile}: line {line}: {reason}" in result.stderr, result.stderr


def test_forward_over_tls_maps_to_tls_upstreams(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    cert, key = pki.leaf("node.test", client=True)
    text = (
        ".:53 {\n    bind 169.254.20.10\n"
        "    forward . tls://169.254.1.1 tls://[2001:db8::53]:8853 {\n"
        "        tls_servername dns.example\n"
        f"        tls {cert} {key} {pki.ca}\n"
        "    }\n}\n"
        "corp.example:53 {\n    bind 169.254.20.10\n    forward . tls://169.254.1.2\n}\n"
    )
    path = run_import(tmp_path, text)
    assert check_config(path).returncode == 0, check_config(path).stderr
    root, corp = load_config(path, env={}).zones
    files = {"ca_file": str(pki.ca), "client_cert_file": str(cert), "client_key_file": str(key)}
    assert root.upstreams == (
        UpstreamConfig("tls", "169.254.1.1", 853, TlsConfig("dns.example", **files)),
        UpstreamConfig("tls", "2001:db8::53", 8853, TlsConfig("dns.example", **files)),
    )
    # Without tls_servername CoreDNS checks the certificate for the IP address; so does
    # the import, with the system's CAs.
    assert corp.upstreams == (UpstreamConfig("tls", "169.254.1.2", 853, TlsConfig("169.254.1.2")),)
    text_out = Path(path).read_text()
    assert "forward (line 3): DNS over TLS (tls_servername: the name checked in the " in text_out
    assert "no tls_servername: the certificate must hold the IP address" in text_out


def test_every_problem_is_listed_at_once() -> None:
    text = ".:53 {\n hosts\n forward . 169.254.1.1 {\n  tls_servername x\n }\n template IN A\n}\n"
    with pytest.raises(CorefileError) as e:
        convert(parse(text, {}), "Corefile")
    assert [p.split(":")[0] for p in e.value.problems] == ["line 2", "line 4", "line 6"]


def test_blocks_binding_different_addresses_are_refused() -> None:
    text = "a.example:53 {\n bind 169.254.20.10\n forward . 169.254.1.1\n}\n" \
           ".:53 {\n bind 169.254.20.11\n forward . 169.254.1.1\n}\n"  # fmt: skip
    with pytest.raises(CorefileError) as e:
        convert(parse(text, {}), "Corefile", Pillars())
    assert "bind different addresses or ports" in str(e.value)


def test_unreadable_file_and_usage(tmp_path: Path) -> None:
    result = dnsproxy_cmd("import-corefile", str(tmp_path / "missing"))
    assert result.returncode == 2 and "cannot read" in result.stderr
    assert dnsproxy_cmd("import-corefile").returncode == 2


# -- on a node (root)


class _Dnsmasq:
    """dnsmasq on the upstream namespace's IPv4 and IPv6 addresses, logging every query.

    Answers for cluster.local and corp.example and a PTR; refuses nothing else it knows
    of (--no-resolv: never recurses off the machine).
    """

    def __init__(self, topo: Topology, tmp_path: Path) -> None:
        self.log_path = tmp_path / "dnsmasq.log"
        self._log = self.log_path.open("wb")
        argv = [
            tool("dnsmasq", "dnsmasq-base"), "--keep-in-foreground", "--user=root",
            "--conf-file=/dev/null", f"--pid-file={tmp_path / 'dnsmasq.pid'}", "--no-resolv",
            "--no-hosts", "--port=53", f"--listen-address={UPSTREAM_IP}",
            f"--listen-address={UPSTREAM_IP6}", "--bind-interfaces", "--log-queries",
            "--log-facility=-", "--local-ttl=60",
            "--address=/kubernetes.default.svc.cluster.local/169.254.100.1",
            "--address=/www.corp.example/169.254.100.3",
            "--address=/example.test/169.254.100.2",
            "--ptr-record=1.100.254.169.in-addr.arpa,kubernetes.default.svc.cluster.local",
            "--local=/cluster.local/", "--local=/corp.example/", "--local=/test/",
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            topo.upstream.exec_argv(argv), stdout=self._log, stderr=self._log
        )
        query = dns.message.make_query("example.test.", "A")
        wait_for(lambda: self._answers(topo, query), 15.0, "dnsmasq to answer", interval=0.1)

    def _answers(self, topo: Topology, query: dns.message.Message) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"dnsmasq exited:\n{self.log}")
        try:
            topo.node.call(lambda: dns.query.udp(query, UPSTREAM_IP, timeout=0.5))
        except (OSError, dns.exception.DNSException):
            return False
        return True

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        stop_process(self.proc)
        self._log.close()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[tuple[Topology, _Dnsmasq]]:
    with topology() as topo:
        upstream = _Dnsmasq(topo, tmp_path)
        try:
            yield topo, upstream
        finally:
            upstream.close()


def ask(topo: Topology, name: str, rdtype: str) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    return topo.pod.call(lambda: dns.query.udp(query, LOCAL_IP, timeout=3))


@pytest.mark.parametrize("source", ["iptables", "ipvs", "customised"])
def test_imported_config_serves_the_same_zones_on_a_node(
    node: tuple[Topology, _Dnsmasq], tmp_path: Path, source: str
) -> None:
    topo, upstream = node
    # The node's resolver (the "." zone) is the upstream's IPv6 address, the cluster zones'
    # Service its IPv4 one: dnsmasq's log then says which block's forward a query took.
    topo.set_resolv_conf(topo.node, f"nameserver {UPSTREAM_IP6}\n")
    text = {
        "iptables": iptables_mode(cluster_ip=CLUSTER_IP),
        "ipvs": ipvs_mode(cluster_ip=UPSTREAM_IP),
        "customised": CUSTOMISED,
    }[source]
    path = run_import(tmp_path, text, env={"PATH": "/usr/bin:/bin"})
    env = {"KUBE_DNS_UPSTREAM_SERVICE_HOST": UPSTREAM_IP}
    args = ("--config", path, "--http-listen", "127.0.0.1:9253", "--lameduck", "0")
    with proxy(topo, tmp_path, *args, env=env) as p:
        p.wait_ready()
        assert our_rules(topo), "the node role installed no rules"
        reply = ask(topo, "kubernetes.default.svc.cluster.local.", "A")
        assert str(reply.answer[0][0]) == "169.254.100.1"
        reply = ask(topo, "1.100.254.169.in-addr.arpa.", "PTR")
        assert str(reply.answer[0][0]) == "kubernetes.default.svc.cluster.local."
        reply = ask(topo, "example.test.", "A")
        assert str(reply.answer[0][0]) == "169.254.100.2"
        log = upstream.log
        assert f"query[A] kubernetes.default.svc.cluster.local from {NODE_UP_IP}" in log
        assert f"query[PTR] 1.100.254.169.in-addr.arpa from {NODE_UP_IP}" in log
        assert f"query[A] example.test from {NODE_UP_IP6}" in log
        if source == "customised":
            reply = ask(topo, "www.corp.example.", "A")
            assert str(reply.answer[0][0]) == "169.254.100.3"
            assert f"query[A] www.corp.example from {NODE_UP_IP6}" in upstream.log
        if source == "iptables":
            transparent = dns.message.make_query("example.test.", "A")
            reply = topo.pod.call(lambda: dns.query.udp(transparent, CLUSTER_IP, timeout=3))
            assert reply.rcode() == dns.rcode.NOERROR and reply.answer
        p.terminate()
        assert p.wait_exit() == 0, p.stderr
    assert our_rules(topo) == []


def test_module_help_lists_the_subcommand() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dnsproxy", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "import-corefile" in result.stdout
