"""Zero-loss handover in-process: two Apps in one event loop, a Unix socket between them.

The sans-IO part (the cache snapshot) is tested with a fixed clock; the conversation with
two real Apps on a loopback port and a fake upstream, and against peers that misbehave on
purpose (another protocol version, silence, a stale socket file, nothing in common).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import socket
import struct
import time
from pathlib import Path

import dns.asyncquery
import dns.message
import dns.rcode
import pytest
from conftest import RECORDS, make_config, running
from fakeupstream import Delay, FakeUpstream, zone_handler
from test_process import free_port

from dnsproxy import handover, wire
from dnsproxy.app import App
from dnsproxy.cache import NEGATIVE, POSITIVE, Cache, Entry
from dnsproxy.config import (
    Config,
    ConfigError,
    HandoverConfig,
    HostPort,
    Overrides,
    load_config,
    parse_config,
)

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


# -- the cache snapshot (sans-IO)


def key_of(name: str, qtype: int = 1) -> bytes:
    return wire.name_to_wire(name) + struct.pack("!HHB", qtype, 1, 0)


def entry(body: bytes, stored_at: float, ttl_s: int, kind: int = POSITIVE, rcode: int = 0) -> Entry:
    return Entry(body, (20, 40), (ttl_s, ttl_s), stored_at, ttl_s, kind, rcode)


def body_of(n: int) -> bytes:
    return bytes([n % 256]) * 60


async def test_snapshot_keeps_lru_order_ages_and_remaining_ttls() -> None:
    cache = Cache(100)
    for i in range(5):
        cache.put(key_of(f"n{i}.example."), entry(body_of(i), 900.0 + i, 300), 900.0 + i)
    cache.get(key_of("n0.example."), 950.0)  # most recently used now
    payload, count = await handover.encode_cache(cache, 1000.0, 100, 1 << 20)
    assert count == 5

    decoded = list(handover.decode_cache(payload, 5000.0))
    assert [k for k, _ in decoded] == [key_of(f"n{i}.example.") for i in (1, 2, 3, 4, 0)]
    for key, restored in decoded:
        original = cache.store[key]
        assert restored.body == original.body
        assert (restored.offsets, restored.ttls) == (original.offsets, original.ttls)
        # Same age and lifetime on the new clock: the remaining TTL is unchanged.
        assert restored.stored_at == pytest.approx(4000.0 + original.stored_at)
        assert restored.expires_at - 5000.0 == pytest.approx(original.expires_at - 1000.0)

    fresh = Cache(100)
    restored_count = await handover.restore_cache(fresh, payload, time.time(), 5000.0)
    assert restored_count == 5
    assert list(fresh.store) == [k for k, _ in decoded]  # the LRU order survives


async def test_snapshot_is_bounded_in_entries_and_bytes_and_skips_expired() -> None:
    cache = Cache(100)
    for i in range(10):
        cache.put(key_of(f"n{i}.example."), entry(body_of(i), 900.0, 300), 900.0)
    cache.put(key_of("old.example."), entry(body_of(99), 100.0, 300), 100.0)  # expired at 400

    payload, count = await handover.encode_cache(cache, 1000.0, 3, 1 << 20)
    assert count == 3
    names = [k for k, _ in handover.decode_cache(payload, 1000.0)]
    assert names == [key_of(f"n{i}.example.") for i in (7, 8, 9)]  # the most recent three

    one, _ = await handover.encode_cache(cache, 1000.0, 100, 1 << 20)
    per_entry = len(one) // 10
    payload, count = await handover.encode_cache(cache, 1000.0, 100, per_entry * 4)
    assert count == 4
    assert len(payload) <= per_entry * 4
    assert key_of("old.example.") not in dict(handover.decode_cache(one, 1000.0))


async def test_snapshot_carries_bare_nxdomain_once_and_refiles_its_alias() -> None:
    header = b"\x00\x00\x81\x83\x00\x01\x00\x00\x00\x01\x00\x00"  # NXDOMAIN, no answers
    cache = Cache(100)
    nx = Entry(header + b"\x00" * 40, (30,), (600,), 900.0, 600, NEGATIVE, wire.NXDOMAIN)
    cache.put(key_of("gone.example."), nx, 900.0)
    assert len(cache) == 2  # the question and the name-wide alias (RFC 2308 §5)
    payload, count = await handover.encode_cache(cache, 1000.0, 100, 1 << 20)
    assert count == 1
    fresh = Cache(100)
    await handover.restore_cache(fresh, payload, time.time(), 1000.0)
    assert fresh.get_nxdomain(key_of("gone.example.", 28), 1000.0) is not None


def test_malformed_snapshot_is_an_error_not_a_crash() -> None:
    with pytest.raises(handover.HandoverError):
        list(handover.decode_cache(b"\x00\x05\x00\x10\x00\x01\x00", 0.0))
    good = struct.pack("!HHHBHdd", 3, 2, 1, 0, 0, 1.0, 10.0) + b"abc" + b"zz"
    with pytest.raises(handover.HandoverError):
        list(handover.decode_cache(good, 0.0))  # its TTL offsets are missing


# -- two instances


def handover_config(fake_port: int, port: int, path: Path, **changes: object) -> Config:
    config = make_config(fake_port, shutdown_grace_s=3.0)
    return dataclasses.replace(
        config,
        listen=(HostPort(HOST, port),),
        http_listen=HostPort(HOST, free_port()),
        handover=HandoverConfig(path=str(path), timeout_s=2.0),
        **changes,  # type: ignore[arg-type]
    )


async def ask(port: int, name: str, rdtype: str = "A", tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, rdtype)
    if tcp:
        return await dns.asyncquery.tcp(query, HOST, port=port, timeout=5)
    return await dns.asyncquery.udp(query, HOST, port=port, timeout=5)


def upstream_names(fake: FakeUpstream) -> list[str]:
    return [q.question[0].name.to_text().lower() for _, q in fake.queries]


async def test_successor_takes_sockets_cache_and_the_old_one_finishes_in_flight(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    answer = zone_handler(RECORDS)

    def handler(query: dns.message.Message, transport: str) -> object:
        if query.question[0].name.to_text().startswith("slow."):
            return Delay(0.5, answer(query, transport))
        return answer(query, transport)

    port, kept, dropped, added = free_port(), free_port(), free_port(), free_port()
    async with FakeUpstream(handler) as fake:  # type: ignore[arg-type]
        path = tmp_path / "handover.sock"
        old_config = handover_config(fake.port, port, path)
        old_config = dataclasses.replace(
            old_config, listen=(*old_config.listen, HostPort(HOST, kept), HostPort(HOST, dropped))
        )
        new_config = dataclasses.replace(
            old_config,
            listen=(HostPort(HOST, port), HostPort(HOST, kept), HostPort(HOST, added)),
        )
        async with running(old_config) as old:
            http = old.http
            assert http is not None
            first = await ask(port, "www.example.")
            asked_at = time.monotonic()
            await asyncio.sleep(1.1)  # so that the TTL the successor shows has aged
            slow = asyncio.ensure_future(ask(port, "slow.example."))
            while "slow.example." not in upstream_names(fake):
                await asyncio.sleep(0.01)
            async with running(new_config) as new:
                moved = await ask(port, "www.example.")
                elapsed = time.monotonic() - asked_at
                on_kept = await ask(kept, "www.example.", tcp=True)
                on_added = await ask(added, "www.example.")
                late = await asyncio.wait_for(slow, 5)
                await asyncio.wait_for(old.replaced.wait(), 5)
                status = await asyncio.to_thread(
                    _get, f"http://{HOST}:{http.port}/metrics"
                )  # the endpoint's address too, now served by the successor
                started_by, entries = new.started_by, new.handover_entries
                # The old instance closed what the new configuration dropped.
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
                    probe.bind((HOST, dropped))

    assert started_by == "handover"
    assert entries >= 1
    assert first.answer[0].ttl == 300
    # Served from the cache that came along, its TTL aged by the time since it was stored.
    assert 300 - elapsed - 1 <= moved.answer[0].ttl <= 299
    assert upstream_names(fake).count("www.example.") == 1
    assert [r.to_text() for r in on_kept.answer[0]] == ["169.254.1.1"]
    assert [r.to_text() for r in on_added.answer[0]] == ["169.254.1.1"]
    assert late.rcode() == dns.rcode.NXDOMAIN  # the old instance's in-flight query, answered
    assert upstream_names(fake).count("slow.example.") == 1
    assert status.startswith("200") and 'dnsproxy_start_info{how="handover"}' in status
    log = caplog.text
    assert "taken over" in log
    assert f"tcp {HostPort(HOST, dropped)} is not in this configuration; closed" in log
    assert "answered its in-flight queries (0 abandoned)" in log


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return f"{r.status} {r.read().decode()}"


async def test_successor_of_another_protocol_is_refused_and_the_old_one_serves_on(
    tmp_path: Path,
) -> None:
    port = free_port()
    path = tmp_path / "handover.sock"
    async with (
        FakeUpstream(zone_handler(RECORDS)) as fake,
        running(handover_config(fake.port, port, path)) as app,
    ):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await asyncio.get_running_loop().sock_connect(sock, str(path))
        channel = handover.Channel(sock)
        await channel.send("hello", {"protocol": 99, "version": "9.9", "pid": 1})
        reply = await asyncio.wait_for(channel.recv(), 5)
        channel.close()
        answered = await ask(port, "www.example.")
        replaced = app.replaced.is_set()
    assert reply.kind == "refuse"
    assert reply.header["reason"] == (
        "handover protocol 99 is not supported (this instance speaks 1)"
    )
    assert reply.header["protocol"] == handover.PROTOCOL
    assert not reply.fds
    assert not replaced
    assert [r.to_text() for r in answered.answer[0]] == ["169.254.1.1"]


async def fake_old(path: Path, reply: dict[str, object] | None) -> asyncio.Task[None]:
    """A Unix socket on ``path`` that answers the first message with ``reply`` (or never)."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    server.setblocking(False)

    async def run() -> None:
        try:
            conn, _ = await asyncio.get_running_loop().sock_accept(server)
            channel = handover.Channel(conn)
            await channel.recv()
            if reply is not None:
                await channel.send(str(reply["type"]), reply)
            await asyncio.sleep(30)
            channel.close()
        finally:
            server.close()

    return asyncio.ensure_future(run())


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        (
            {"type": "hello", "protocol": 2, "version": "2.0", "pid": 7},
            "pid 7 (dnsproxy 2.0) speaks handover protocol 2, this instance 1",
        ),
        (
            {"type": "refuse", "reason": "busy", "protocol": 1, "version": "0", "pid": 7},
            "refused by pid 7 (dnsproxy 0): busy",
        ),
        (None, "did not answer within 0.3s"),
    ],
    ids=["other-version", "refused", "silent"],
)
async def test_no_handover_from_a_peer_that_cannot_give_one_binds_as_usual(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, reply: dict[str, object] | None, reason: str
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "handover.sock"
    peer = await fake_old(path, reply)
    try:
        async with FakeUpstream(zone_handler(RECORDS)) as fake:
            config = handover_config(fake.port, free_port(), path)
            config = dataclasses.replace(
                config, handover=dataclasses.replace(config.handover, timeout_s=0.3)
            )
            async with running(config) as app:
                answered = await ask(app.listen[0].port, "www.example.")
                how = app.started_by
    finally:
        peer.cancel()
    assert how == "bind"
    assert [r.to_text() for r in answered.answer[0]] == ["169.254.1.1"]
    assert reason in caplog.text
    assert "binding the listeners" in caplog.text


async def test_stale_socket_file_or_none_at_all_binds_as_usual(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "handover.sock"
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = handover_config(fake.port, free_port(), path)
        async with running(config) as first:
            how_first = first.started_by
        # A stale file, as a killed instance leaves it: bound once, nobody listening.
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(path))
        stale.close()
        async with running(config) as second:
            how_second = second.started_by
            assert path.exists()  # its own socket now
        assert not path.exists()  # removed at a clean exit
    assert (how_first, how_second) == ("bind", "bind")
    assert "no running instance (" in caplog.text and "does not exist" in caplog.text
    assert f"no running instance (nothing listens on {path})" in caplog.text


async def test_successor_with_no_listener_in_common_declines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "handover.sock"
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        first = handover_config(fake.port, free_port(), path)
        other = dataclasses.replace(first, listen=(HostPort(HOST, free_port()),), http_listen=None)
        async with running(first) as old, running(other) as new:
            answered_old = await ask(old.listen[0].port, "www.example.")
            answered_new = await ask(new.listen[0].port, "www.example.")
            states = (old.replaced.is_set(), new.started_by)
    assert states == (False, "bind")
    assert answered_old.answer and answered_new.answer
    assert "serves none of this configuration's listen addresses" in caplog.text
    assert "declined: none of its DNS listeners is in the new configuration" in caplog.text


async def test_frames_carry_descriptors_to_the_message_that_announces_them() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender, receiver = handover.Channel(left), handover.Channel(right)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))

    async def send() -> None:
        await sender.send("cache", {"n": 1}, b"x" * 300_000)  # more than a socket buffer
        await sender.send("sockets", {"sockets": []}, fds=[udp.fileno()])
        await sender.send("big", {}, b"abc")

    sending = asyncio.ensure_future(send())
    try:
        first = await asyncio.wait_for(receiver.recv(1 << 20), 10)
        second = await asyncio.wait_for(receiver.recv(), 10)
        with pytest.raises(handover.HandoverError, match="payload of 3 bytes"):
            await asyncio.wait_for(receiver.recv(max_payload=2), 10)
        await asyncio.wait_for(sending, 10)
    finally:
        sending.cancel()
        sender.close()
        receiver.close()
    assert (first.kind, len(first.payload), first.fds) == ("cache", 300_000, [])
    assert second.kind == "sockets" and len(second.fds) == 1
    received = socket.socket(fileno=second.fds[0])
    try:
        assert received.getsockname() == udp.getsockname()
    finally:
        received.close()
        udp.close()
    assert json.loads(json.dumps(second.header))["fds"] == 1


# -- configuration


def test_handover_and_reload_keys_are_checked_with_their_key_paths() -> None:
    doc: dict[str, object] = {
        "zones": [{"zone": ".", "upstreams": ["127.0.0.1:5300"]}],
        "handover": {
            "path": "run/handover.sock",
            "timeout_s": 0,
            "cache": "yes",
            "when_replaced": "linger",
            "pth": 1,
        },
        "reload": {"watch_interval_s": -1},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={})
    assert info.value.problems == [
        "handover.pth: unknown key (did you mean 'path'?)",
        "handover.path: must be an absolute file path or null (got 'run/handover.sock')",
        "handover.timeout_s: must be a number of seconds > 0 (got 0)",
        "handover.cache: must be true or false (got 'yes')",
        "handover.when_replaced: must be one of exit, wait (got 'linger')",
        "reload.watch_interval_s: must be a number of seconds >= 0 (got -1)",
    ]
    doc["handover"] = {"path": "/" + "x" * 107}
    doc["reload"] = {}
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={})
    assert info.value.problems == ["handover.path: a Unix socket path is at most 107 bytes long"]
    doc["handover"] = {"path": "${RUN:-/run}/dnsproxy/h.sock", "when_replaced": "wait"}
    doc["reload"] = {"watch_interval_s": 0}
    config = parse_config(doc, env={})
    assert config.handover == HandoverConfig(path="/run/dnsproxy/h.sock", when_replaced="wait")
    assert config.reload_watch_interval_s == 0.0


def test_shipped_nodelocal_config_hands_over_through_the_host_directory() -> None:
    env = {"KUBE_DNS_UPSTREAM_SERVICE_HOST": "169.254.0.10"}
    nodelocal = ROOT / "config" / "nodelocal.yaml"
    config = load_config(str(nodelocal), Overrides(upstreams=("169.254.0.11",)), env=env)
    assert config.handover == HandoverConfig(
        path="/run/dnsproxy/handover.sock", when_replaced="wait"
    )
    assert config.reload_watch_interval_s == 5.0


async def test_successor_may_take_over_during_the_lameduck_and_nothing_is_torn_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    port = free_port()
    async with FakeUpstream(zone_handler(RECORDS)) as fake:
        config = dataclasses.replace(
            handover_config(fake.port, port, tmp_path / "handover.sock"), shutdown_lameduck_s=30.0
        )
        old = App(config)
        await old.start()
        stopping = asyncio.ensure_future(old.stop())  # SIGTERM: lameduck, still serving
        try:
            await asyncio.sleep(0.1)
            assert not old.ready
            async with running(dataclasses.replace(config, shutdown_lameduck_s=0.0)) as new:
                # The lameduck of 30 s ends as soon as the successor serves.
                await asyncio.wait_for(stopping, 10)
                answered = await ask(port, "www.example.")
                how = new.started_by
        finally:
            stopping.cancel()
    assert how == "handover"
    assert [r.to_text() for r in answered.answer[0]] == ["169.254.1.1"]
    assert "lameduck: /ready is 503" in caplog.text
    assert "replaced by pid" in caplog.text
