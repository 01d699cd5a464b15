"""Live reload in-process: what may change, what the cache keeps, and a refused file.

The sans-IO helpers of ``dnsproxy.reload`` with plain Configs; then an App reading a real
file, reloaded after the file was rewritten, with two fake upstreams to tell which one a
name went to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import dns.asyncquery
import dns.message
import pytest
from conftest import make_config
from fakeupstream import Delay, FakeUpstream, zone_handler
from prometheus_client import generate_latest
from test_process import free_port

from dnsproxy import reload, wire
from dnsproxy.app import App
from dnsproxy.cache import POSITIVE, Cache, Entry
from dnsproxy.config import (
    HandoverConfig,
    NodeConfig,
    UpstreamConfig,
    ZoneConfig,
    load_config,
)

HOST = "127.0.0.1"


def key_of(name: str, qtype: int = 1) -> bytes:
    return wire.name_to_wire(name) + struct.pack("!HHB", qtype, 1, 0)


# -- sans-IO


def test_restart_only_settings_are_named_and_others_are_not() -> None:
    base = make_config(53)
    node = NodeConfig(local_ips=("169.254.20.10",))
    assert reload.restart_only(base, dataclasses.replace(base, shutdown_grace_s=1.0)) == []
    with_node = dataclasses.replace(base, node=node)
    assert reload.restart_only(base, with_node) == [
        "node: turning the node role on needs a restart"
    ]
    moved = dataclasses.replace(with_node, node=dataclasses.replace(node, interface="other0"))
    assert reload.restart_only(with_node, moved) == [
        "node.interface: changing it (nodelocaldns -> other0) needs a restart "
        "(the node's addresses and rules would have to move)"
    ]
    tuned = dataclasses.replace(
        with_node, node=dataclasses.replace(node, sync_interval_s=5.0, teardown=False)
    )
    assert reload.restart_only(with_node, tuned) == []
    assert reload.restart_only(base, dataclasses.replace(base, workers=4)) == [
        "workers: changing it (1 -> 4) needs a restart (a handover to an instance started "
        "with the new value loses no query)"
    ]
    elsewhere = dataclasses.replace(base, handover=HandoverConfig(path="/run/x.sock"))
    (problem,) = reload.restart_only(base, elsewhere)
    assert problem.startswith("handover.path: changing it (null -> /run/x.sock) needs a restart")


def test_only_names_routed_to_other_upstreams_lose_their_cache_entries() -> None:
    base = make_config(5300)
    root = base.zones[0]
    corp = ZoneConfig("corp.example.", (UpstreamConfig("tcp", "127.0.0.2", 53),))
    with_corp = dataclasses.replace(base, zones=(root, corp))
    ttl_only = dataclasses.replace(
        base, cache=dataclasses.replace(base.cache, max_ttl_s=30), limits=base.limits
    )
    assert reload.route_changed(base, ttl_only) is None
    changed = reload.route_changed(base, with_corp)
    assert changed is not None
    assert changed(key_of("www.corp.example."))
    assert changed(key_of("corp.example.", 28))
    assert not changed(key_of("www.example."))
    assert not changed(key_of("notcorp.example."))
    # A new zone sent to the same upstreams as before changes no meaning.
    same = dataclasses.replace(corp, upstreams=root.upstreams)
    assert reload.route_changed(base, dataclasses.replace(base, zones=(root, same))) is None


def test_kept_entries_keep_the_lru_order_and_leave_out_what_is_dropped() -> None:
    cache = Cache(10)
    for name in ("a.example.", "b.corp.example.", "c.example."):
        cache.put(key_of(name), Entry(b"x" * 40, (), (), 100.0, 60, POSITIVE, 0), 100.0)
    cache.get(key_of("a.example."), 101.0)
    kept = reload.kept_entries(cache, lambda key: b"\x04corp" in key)
    assert [key for key, _ in kept] == [key_of("c.example."), key_of("a.example.")]


def test_file_signature_sees_a_configmap_symlink_swap(tmp_path: Path) -> None:
    for version in ("..2024_a", "..2024_b"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "dnsproxy.yaml").write_text("zones: []\n")  # same size
        os.utime(tmp_path / version / "dnsproxy.yaml", (1_700_000_000, 1_700_000_000))
    (tmp_path / "..data").symlink_to("..2024_a")
    (tmp_path / "dnsproxy.yaml").symlink_to("..data/dnsproxy.yaml")
    path = str(tmp_path / "dnsproxy.yaml")
    before = reload.file_signature(path)
    assert before is not None
    _swap(tmp_path, "..2024_b")
    after = reload.file_signature(path)
    assert after is not None and after != before
    assert after[0].endswith("..2024_b/dnsproxy.yaml")
    assert reload.file_signature(str(tmp_path / "missing.yaml")) is None


def _swap(directory: Path, target: str) -> None:
    """What the kubelet does for a ConfigMap update: a new ..data link renamed over the old."""
    (directory / "..data_tmp").symlink_to(target)
    os.rename(directory / "..data_tmp", directory / "..data")


# -- an App and its file


def write(path: Path, doc: dict[str, Any]) -> None:
    path.write_text(json.dumps(doc))  # JSON is YAML


def doc_for(upstream_port: int, listen: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "listen": listen,
        "http_listen": None,
        "zones": [{"zone": ".", "upstreams": [f"tcp://{HOST}:{upstream_port}"]}],
        "reload": {"watch_interval_s": 0},
        "shutdown": {"grace_s": 3},
        **extra,
    }


@asynccontextmanager
async def app_from(path: Path) -> AsyncIterator[App]:
    app = App(load_config(str(path)), config_path=str(path))
    await app.start()
    try:
        yield app
    finally:
        await app.stop()


async def ask(port: int, name: str) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    return await dns.asyncquery.udp(query, HOST, port=port, timeout=5)


def first_answer(reply: dns.message.Message) -> str:
    return reply.answer[0][0].to_text() if reply.answer else ""


def asked(fake: FakeUpstream, name: str) -> int:
    return sum(1 for _, q in fake.queries if q.question[0].name.to_text().lower() == name)


async def test_reload_switches_upstreams_without_losing_the_query_in_flight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    one = zone_handler(
        {("www.example.", "A"): ["169.254.1.1"], ("slow.example.", "A"): ["169.254.9.1"]}
    )

    def slow_one(query: dns.message.Message, transport: str) -> object:
        if query.question[0].name.to_text() == "slow.example.":
            return Delay(0.5, one(query, transport))
        return one(query, transport)

    two = zone_handler(
        {("www.example.", "A"): ["169.254.2.2"], ("new.example.", "A"): ["169.254.2.3"]}
    )
    path = tmp_path / "dnsproxy.yaml"
    port, added = free_port(), free_port()
    async with FakeUpstream(slow_one) as first, FakeUpstream(two) as second:  # type: ignore[arg-type]
        write(path, doc_for(first.port, [f"{HOST}:{port}"]))
        async with app_from(path) as app:
            before = first_answer(await ask(port, "www.example."))
            hash_before = app.config_hash
            slow = asyncio.ensure_future(ask(port, "slow.example."))
            while not asked(first, "slow.example."):
                await asyncio.sleep(0.01)
            write(path, doc_for(second.port, [f"{HOST}:{port}", f"{HOST}:{added}"]))
            assert await app.reload("test")
            late = first_answer(await asyncio.wait_for(slow, 5))
            after = first_answer(await ask(port, "www.example."))
            new_name = first_answer(await ask(added, "new.example."))
            counts = (app.reloads, app.reload_failures, app.config_hash != hash_before)
    assert before == "169.254.1.1"
    assert late == "169.254.9.1"  # answered by the old upstream, after the switch
    # "." now goes elsewhere: the cached answer from the old upstream was dropped.
    assert after == "169.254.2.2"
    assert new_name == "169.254.2.3"
    assert counts == (1, 0, True)
    assert "1 cached entries of names with other upstreams now dropped" in caplog.text
    assert "listeners 1 added, 0 removed" in caplog.text


async def test_reload_of_limits_keeps_the_cache_and_drops_a_removed_listener(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "dnsproxy.yaml"
    port, gone = free_port(), free_port()
    async with FakeUpstream(zone_handler({("www.example.", "A"): ["169.254.1.1"]})) as fake:
        write(path, doc_for(fake.port, [f"{HOST}:{port}", f"{HOST}:{gone}"]))
        async with app_from(path) as app:
            await ask(port, "www.example.")
            write(
                path,
                doc_for(
                    fake.port,
                    [f"{HOST}:{port}"],
                    limits={"max_inflight": 50},
                    cache={"max_entries": 500, "max_ttl_s": 10},
                ),
            )
            assert await app.reload("test")
            again = await ask(port, "www.example.")
            capacity = app.cache.max_entries
            # Nothing serves the removed address any more: it can be bound again.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                probe.bind((HOST, gone))
    assert asked(fake, "www.example.") == 1  # the second answer came from the kept cache
    assert again.answer[0].ttl > 10  # the entry keeps the TTL it was stored with
    assert capacity == 500
    assert "cache kept (1 entries)" in caplog.text
    assert f"stopped listening on {HOST}:{gone}" in caplog.text


async def test_bad_or_restart_only_file_is_refused_and_the_running_one_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "dnsproxy.yaml"
    port = free_port()
    async with FakeUpstream(zone_handler({("www.example.", "A"): ["169.254.1.1"]})) as fake:
        write(path, doc_for(fake.port, [f"{HOST}:{port}"]))
        async with app_from(path) as app:
            running = app.config
            path.write_text(
                "listen: ['127.0.0.1:70000']\nzones:\n  - zone: .\n    upstreams: []\n"
                "cache: {max_tll_s: 3}\n"
            )
            bad = await app.reload("test")
            write(
                path,
                doc_for(fake.port, [f"{HOST}:{port}"], handover={"path": str(tmp_path / "h")}),
            )
            restart = await app.reload("test")
            # A new listener whose address is taken: refused too, nothing half applied.
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
                holder.bind((HOST, 0))
                taken = holder.getsockname()[1]
                write(path, doc_for(fake.port, [f"{HOST}:{port}", f"{HOST}:{taken}"]))
                in_use = await app.reload("test")
            answer = first_answer(await ask(port, "www.example."))
            state = (app.config is running, app.reloads, app.reload_failures)
    assert (bad, restart, in_use) == (False, False, False)
    assert state == (True, 0, 3)
    assert answer == "169.254.1.1"
    log = caplog.text
    assert "listen[0]: port 70000 out of range" in log
    assert "zones[0].upstreams: at least one upstream is required" in log
    assert "cache.max_tll_s: unknown key (did you mean 'max_ttl_s'?)" in log
    assert "handover.path: changing it (null -> " in log
    assert f"cannot bind UDP {HOST}:{taken}" in log
    assert log.count("still running configuration") == 3


async def test_reload_moves_the_coredns_names_to_the_new_upstreams(tmp_path: Path) -> None:
    path = tmp_path / "dnsproxy.yaml"
    port = free_port()
    records = zone_handler({("www.example.", "A"): ["169.254.1.1"]})
    async with FakeUpstream(records) as first, FakeUpstream(records) as second:
        write(path, doc_for(first.port, [f"{HOST}:{port}"]))
        async with app_from(path) as app:
            off = generate_latest(app.registry).decode()
            write(path, doc_for(second.port, [f"{HOST}:{port}"], metrics={"coredns_names": True}))
            assert await app.reload("test")
            await ask(port, "www.example.")
            on = generate_latest(app.registry).decode()
    assert "coredns_forward_requests_total" not in off
    new_label = f'to="{HOST}:{second.port}"'
    assert f"coredns_forward_requests_total{{{new_label}}} 1.0" in on
    assert f'to="{HOST}:{first.port}"' not in on
