"""Serve-stale, prefetch, recovery, counters across a reload and loop detection with
real components.

Unbound is the upstream (a static zone ``test.``, every other name REFUSED), dnsproxy
runs as a process, dnspython is the client. Unbound is stopped for a minute and started
again on the same port (fresh answers within 2 s of its return); a name with TTL 3 is
asked 20 times a second; a reload keeps an upstream whose counters must go on; dnsmasq,
set to forward everything to dnsproxy, is given to it as its upstream (with one and two
workers, and to a successor taking over a running instance); one dnsproxy forwards to
another. Each test is bounded in queries and time; the outage test takes a little over a
minute.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.exception
import dns.message
import dns.query
import dns.rcode
import pytest
from conftest import dnsproxy_cmd
from test_process import HOST, DnsProxyProcess, dnsproxy_process, free_port, metric_value
from test_real import SOA, metrics, start_dnsmasq, start_unbound

from dnsproxy.cache import STALE_TTL_S

LOCAL = [
    f"test. 300 IN SOA {SOA}",
    "www.test. 300 IN A 169.254.1.1",  # the readiness probe of start_unbound
    "short.test. 5 IN A 169.254.5.5",  # expires early in the outage
    "long.test. 600 IN A 169.254.6.6",  # live throughout
    "pod.cluster.test. 5 IN A 169.254.7.7",  # in a zone with a 20 s staleness cap
    "pf.test. 3 IN A 169.254.3.3",  # the prefetch test's name
]
CAP_S = 20
OUTAGE_S = 60.0


def ask(port: int, name: str, timeout: float = 3.0) -> dns.message.Message:
    """A UDP query with EDNS; ``timeout`` bounds the wait (no retry)."""
    query = dns.message.make_query(name, "A", use_edns=0)
    return dns.query.udp(query, HOST, port=port, timeout=timeout)


def address(response: dns.message.Message) -> str | None:
    if response.rcode() != dns.rcode.NOERROR or not response.answer:
        return None
    return str(response.answer[0][0])


def is_stale(response: dns.message.Message) -> bool:
    codes = [o.code for o in response.options if isinstance(o, dns.edns.EDEOption)]
    return codes == [3] and response.answer[0].ttl == STALE_TTL_S


def proxy_config(tmp_path: Path, upstream_port: int) -> Path:
    config = tmp_path / "dnsproxy.yaml"
    config.write_text(
        "zones:\n"
        "  - zone: .\n"
        f'    upstreams: ["tcp://{HOST}:{upstream_port}"]\n'
        "  - zone: cluster.test\n"
        f'    upstreams: ["tcp://{HOST}:{upstream_port}"]\n'
        f"    cache: {{max_stale_s: {CAP_S}}}\n"
    )
    return config


@contextlib.contextmanager
def proxy_in_front(tmp_path: Path, upstream_port: int) -> Iterator[DnsProxyProcess]:
    config = proxy_config(tmp_path, upstream_port)
    with dnsproxy_process(tmp_path, "--config", str(config)) as proxy:
        yield proxy


def test_upstream_down_for_a_minute_cached_names_answer_stale_within_the_cap(
    tmp_path: Path,
) -> None:
    port = free_port()
    with contextlib.ExitStack() as running:
        # The proxy starts once Unbound answers and outlives it.
        with start_unbound(tmp_path / "unbound-1", port=port, local_data=LOCAL):
            proxy = running.enter_context(proxy_in_front(tmp_path, port))
            assert address(ask(proxy.port, "short.test.")) == "169.254.5.5"
            assert address(ask(proxy.port, "long.test.")) == "169.254.6.6"
            assert address(ask(proxy.port, "pod.cluster.test.")) == "169.254.7.7"
            cached_at = time.monotonic()
        # Unbound has exited: connections to its port are refused.
        down_at = time.monotonic()
        stale_seen = servfail_slowest = 0.0
        capped = {"stale": 0, "servfail": 0}
        stale_answers = 0
        i = 0
        while (now := time.monotonic()) < down_at + OUTAGE_S:
            age = now - cached_at
            short = ask(proxy.port, "short.test.")
            assert address(short) == "169.254.5.5", short
            if age > 5.5:
                assert is_stale(short), short
                stale_seen = now - down_at
            long = ask(proxy.port, "long.test.")
            assert address(long) == "169.254.6.6" and not is_stale(long), long
            pod = ask(proxy.port, "pod.cluster.test.")
            stale_answers += is_stale(short) + (pod.rcode() == 0 and is_stale(pod))
            if 5.5 < age < 5 + CAP_S - 0.5:
                assert address(pod) == "169.254.7.7" and is_stale(pod), pod
                capped["stale"] += 1
            elif age > 5 + CAP_S + 0.5:
                assert pod.rcode() == dns.rcode.SERVFAIL, pod
                capped["servfail"] += 1
            # A name never cached: SERVFAIL, within the deadline (2 s; the client waits 3).
            started = time.monotonic()
            new = ask(proxy.port, f"new-{i}.test.")
            servfail_slowest = max(servfail_slowest, time.monotonic() - started)
            assert new.rcode() == dns.rcode.SERVFAIL, new
            i += 1
            time.sleep(0.5)
        assert stale_seen > OUTAGE_S - 1, "stale answers went on for the whole outage"
        assert capped["stale"] > 10 and capped["servfail"] > 10
        page = metrics(proxy)
        assert metric_value(page, "dnsproxy_cache_served_stale_total") == stale_answers

        # Unbound is back on the same port (it accepts connections from back_at on);
        # the cached names are fresh again once the proxy sees it answering. After a
        # minute of refused connections the pool's reconnect backoff is at its 4 s cap,
        # but the health probe is not held behind it (nor are the queries after the
        # probe's reply): fresh within 2 s of the return.
        with start_unbound(tmp_path / "unbound-2", port=port, local_data=LOCAL):
            back_at = time.monotonic()
            fresh_after = None
            while time.monotonic() < back_at + 10.0:
                response = ask(proxy.port, "short.test.")
                if not is_stale(response):
                    fresh_after = time.monotonic() - back_at
                    break
                time.sleep(0.05)
            assert fresh_after is not None, "still stale 10 s after the upstream returned"
            assert address(response) == "169.254.5.5" and response.answer[0].ttl <= 5
            assert fresh_after < 2.0, f"fresh only {fresh_after:.2f} s after the return"
            # Past its staleness cap the pod name got SERVFAIL, which is cached for
            # cache.servfail_ttl_s (5 s): it answers again once that has run out.
            pod_back = time.monotonic() + 10.0
            while address(ask(proxy.port, "pod.cluster.test.")) != "169.254.7.7":
                assert time.monotonic() < pod_back, "the capped name did not come back"
                time.sleep(0.1)
            print(
                f"\nstale answers until {stale_seen:.0f} s into the outage; SERVFAIL for "
                f"uncached names in at most {servfail_slowest * 1000:.0f} ms; fresh "
                f"{fresh_after:.2f} s after the upstream returned"
            )


def test_prefetch_keeps_a_ttl_3_name_asked_20_times_a_second_from_ever_missing(
    tmp_path: Path,
) -> None:
    with (
        start_unbound(tmp_path / "unbound", local_data=LOCAL) as unbound,
        proxy_in_front(tmp_path, unbound.port) as proxy,
    ):
        before = metrics(proxy)
        end = time.monotonic() + 15.0
        asked = 0
        while time.monotonic() < end:
            response = ask(proxy.port, "pf.test.")
            assert address(response) == "169.254.3.3" and response.answer[0].ttl <= 3
            asked += 1
            time.sleep(0.05)
        after = metrics(proxy)

    def delta(name: str) -> float:
        return metric_value(after, name) - metric_value(before, name)

    assert asked >= 200
    assert delta("dnsproxy_cache_misses_total") == 1, "only the first query missed"
    assert delta("dnsproxy_cache_hits_total") == asked - 1
    assert delta("dnsproxy_cache_prefetch_total") >= 4  # about one per 2 s of the 15
    print(f"\n{asked} queries, 1 miss, {delta('dnsproxy_cache_prefetch_total'):.0f} prefetches")


@pytest.mark.parametrize("workers", [1, 2])
def test_upstream_counters_go_on_across_a_reload_for_a_server_still_configured(
    tmp_path: Path, workers: int
) -> None:
    # A Prometheus counter that goes back to 0 for the same labels reads as a reset:
    # rate() then shows a spike or a gap on every reload. The server stays, so must they.
    with start_unbound(tmp_path / "unbound", local_data=LOCAL) as unbound:
        label = f"tcp://{HOST}:{unbound.port}"
        config = tmp_path / "dnsproxy.yaml"

        def write(max_entries: int) -> None:
            config.write_text(
                f"workers: {workers}\n"
                "reload: {watch_interval_s: 0}\n"
                f"cache: {{max_entries: {max_entries}}}\n"
                f'zones: [{{zone: ., upstreams: ["{label}"]}}]\n'
            )

        write(10000)
        with dnsproxy_process(tmp_path, "--config", str(config)) as proxy:
            for i in range(5):
                assert ask(proxy.port, f"miss-{i}.test.").rcode() == dns.rcode.NXDOMAIN
            before = metrics(proxy)
            write(5000)
            proxy.proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10.0
            while metric_value(after := metrics(proxy), "dnsproxy_reloads_total") < 1:
                assert time.monotonic() < deadline, proxy.stderr
                time.sleep(0.05)
            assert ask(proxy.port, "miss-after.test.").rcode() == dns.rcode.NXDOMAIN
            later = metrics(proxy)
    per_server = [
        f'dnsproxy_upstream_{name}{{upstream="{label}"}}'
        for name in ("queries_total", "replies_total", "request_duration_seconds_count")
    ]
    for sample in per_server:
        assert metric_value(before, sample) >= 5, sample
        assert metric_value(after, sample) == metric_value(before, sample), sample
        assert metric_value(later, sample) == metric_value(before, sample) + 1, sample
    connects = f'dnsproxy_upstream_connects_total{{upstream="{label}"}}'
    assert metric_value(after, connects) >= metric_value(before, connects) >= 1


@pytest.mark.parametrize("workers", [1, 2])
def test_an_upstream_that_forwards_back_is_a_loop_and_the_config_is_refused(
    tmp_path: Path, workers: int
) -> None:
    proxy_port = free_port()
    # dnsmasq answers dm.test itself and forwards everything else to dnsproxy. With
    # workers, the probe comes back to whichever worker the kernel picks.
    with start_dnsmasq(tmp_path, f"--server={HOST}#{proxy_port}") as port:
        result = dnsproxy_cmd(
            *("--listen", f"{HOST}:{proxy_port}", "--http-listen", "none"),
            *("--upstream", f"tcp://{HOST}:{port}", "--workers", str(workers)),
        )
    assert result.returncode == 2, result.stderr
    assert (
        f"refusing the configuration: zone .: upstream tcp://{HOST}:{port} sends queries "
        "back to this proxy" in result.stderr
    ), result.stderr
    assert "Traceback" not in result.stderr


def test_a_successor_whose_upstream_loops_is_refused_and_the_running_instance_serves(
    tmp_path: Path,
) -> None:
    # The successor takes the running instance's sockets, and checks its own upstreams
    # before it tells the old one to stop: both read the sockets then, so its probe comes
    # back to either (dnsmasq forwards everything to their shared port).
    sock = tmp_path / "handover.sock"
    with start_unbound(tmp_path / "unbound", local_data=LOCAL) as unbound:
        old_config = tmp_path / "old.yaml"
        old_config.write_text(
            f'handover: {{path: "{sock}"}}\n'
            f'zones: [{{zone: ., upstreams: ["tcp://{HOST}:{unbound.port}"]}}]\n'
        )
        with dnsproxy_process(tmp_path, "--config", str(old_config)) as old:
            assert address(ask(old.port, "long.test.")) == "169.254.6.6"
            with start_dnsmasq(tmp_path, f"--server={HOST}#{old.port}") as looping:
                new_config = tmp_path / "new.yaml"
                new_config.write_text(
                    f'handover: {{path: "{sock}"}}\n'
                    f'zones: [{{zone: ., upstreams: ["tcp://{HOST}:{looping}"]}}]\n'
                )
                result = dnsproxy_cmd(
                    *("--config", str(new_config), "--listen", f"{HOST}:{old.port}"),
                    *("--http-listen", f"{HOST}:{old.http_port}"),
                )
            assert result.returncode == 2, result.stderr
            assert "handover: took over" not in result.stderr  # it never said "taken"
            assert (
                f"refusing the configuration: zone .: upstream tcp://{HOST}:{looping} sends "
                "queries back to this proxy" in result.stderr
            ), result.stderr
            # The running instance was never told to stop: it serves, its upstream too.
            assert old.proc.poll() is None
            assert address(ask(old.port, "short.test.")) == "169.254.5.5"
            assert "replaced by pid" not in old.stderr


def test_a_dnsproxy_forwarding_to_another_dnsproxy_is_no_loop(tmp_path: Path) -> None:
    # A probe of the first proxy reaches the second, which does not know its first label
    # and forwards it as any other name: a chain, not a loop.
    with (
        start_unbound(tmp_path / "unbound", local_data=LOCAL) as unbound,
        dnsproxy_process(tmp_path, "--upstream", f"tcp://{HOST}:{unbound.port}") as second,
        dnsproxy_process(tmp_path, "--upstream", f"tcp://{HOST}:{second.port}") as first,
    ):
        assert address(ask(first.port, "long.test.")) == "169.254.6.6"
        back = 'dnsproxy_forward_rejects_total{reason="loop"}'
        assert metric_value(metrics(first), back) == metric_value(metrics(second), back) == 0
