"""Zero-loss handover: a new instance takes over the running one's listening sockets.

The running instance listens on a Unix socket (``handover.path``). A new one, once its own
configuration is parsed and valid, connects and receives the very same listening sockets
(UDP and TCP of every DNS address, the HTTP endpoints) as SCM_RIGHTS file descriptors, and
optionally a bounded snapshot of the cache. It starts reading them at once; datagrams and
connections already queued in them are read by whichever instance reads next, so none is
lost. Then it says ``taken``: the old instance stops reading and accepting, answers what it
has in flight on the shared sockets, says ``done`` and leaves rules and addresses alone.

The conversation (protocol version 1); every message is one frame, see :class:`Channel`::

    new -> old  hello    {protocol, version, pid, cache: {max_entries, max_bytes} | null,
                          groups: true}
    old -> new  hello    {protocol, version, pid, loop_id}   or   refuse {reason}
    old -> new  cache    {format, entries, time} + payload      (only when asked and enabled)
    old -> new  sockets  {sockets: [{kind, addr}], fds} + the descriptors
    new -> old  taken    {}    (or decline {reason}: nothing it serves is among them)
    old -> new  done     {abandoned}   once the old one's in-flight queries are answered

``loop_id`` (absent from older instances) is the first label of the old instance's loop
probes: the new one takes it, so that a probe of either that comes back to the other
while both read the sockets is recognised (see ``Forwarder.find_loops``).

Versions must match exactly; a mismatch is refused with both numbers named and the new
instance starts as usual. Frames stay the same in every version, so that a refusal can
always be read.

An instance with ``workers: N`` serves each address with N sockets of one SO_REUSEPORT
group (see :mod:`dnsproxy.workers`): ``sockets`` then names an address once per socket.
A successor says it takes that with ``groups: true`` in its hello; one that does not (an
older dnsproxy, which would keep one socket and close the others with what is queued in
them) is refused by an instance that has more than one socket for an address.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from dnsproxy import __version__
from dnsproxy.cache import Cache, Entry
from dnsproxy.config_types import HostPort
from dnsproxy.errors import DnsproxyError
from dnsproxy.reload import is_question_key

log = logging.getLogger(__name__)

PROTOCOL = 1
CACHE_FORMAT = 1

_FRAME = struct.Struct("!II")  # header length, payload length
_MAX_HEADER = 1 << 20
_MAX_FDS = 256  # far more listeners than any configuration has
_READ_SIZE = 256 * 1024
# One cached entry in a snapshot: key length, body length, TTL count, kind, rcode, age and
# lifetime (seconds, as floats: the entry's stored_at is kept to the fraction).
_ENTRY = struct.Struct("!HHHBHdd")
_YIELD_EVERY = 2048  # entries encoded or decoded between two turns of the event loop

# Listening sockets by kind ("udp", "tcp", "http") and the address they are bound to: one
# each, or the members of an SO_REUSEPORT group (workers).
Sockets = dict[tuple[str, HostPort], list[socket.socket]]
# (max entries, max bytes) -> a cache snapshot payload and its number of entries.
Snapshot = Callable[[int, int], Awaitable[tuple[bytes, int]]]


class HandoverError(DnsproxyError):
    """The other instance broke the protocol, refused, closed or did not answer in time."""


@dataclass(slots=True)
class Message:
    kind: str
    header: dict[str, Any]
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)


class Channel:
    """Frames over a connected Unix stream socket, with file descriptors alongside.

    A frame is ``!II`` (JSON header length, payload length), the UTF-8 JSON header (its
    ``type`` names the message) and the payload. Descriptors are sent with the frame's
    first bytes; the kernel delivers them with a read that may also hold the tail of the
    frame before, so they are pooled as they come and handed to the message whose header
    announces them (``"fds": N``).
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._loop = asyncio.get_running_loop()
        self._buf = bytearray()
        self._fds: list[int] = []

    async def send(
        self,
        kind: str,
        fields: Mapping[str, Any] | None = None,
        payload: bytes = b"",
        fds: list[int] | None = None,
    ) -> None:
        header = dict(fields or {})
        header["type"] = kind
        if fds:
            header["fds"] = len(fds)
        head = json.dumps(header, separators=(",", ":")).encode()
        frame = _FRAME.pack(len(head), len(payload)) + head
        if fds:
            sent = await self._send_fds(frame, fds)
            frame = frame[sent:]
        if frame:
            await self._loop.sock_sendall(self.sock, frame)
        if payload:
            await self._loop.sock_sendall(self.sock, payload)

    async def _send_fds(self, data: bytes, fds: list[int]) -> int:
        while True:
            try:
                return socket.send_fds(self.sock, [data], fds)
            except (BlockingIOError, InterruptedError):
                await self._ready(writable=True)

    async def recv(self, max_payload: int = 0) -> Message:
        """The next message; HandoverError when the peer closes or breaks the framing."""
        head_len, payload_len = _FRAME.unpack(await self._read(_FRAME.size))
        if head_len > _MAX_HEADER:
            raise HandoverError(f"message header of {head_len} bytes (at most {_MAX_HEADER})")
        if payload_len > max_payload:
            raise HandoverError(f"message payload of {payload_len} bytes (at most {max_payload})")
        try:
            header = json.loads(await self._read(head_len))
        except ValueError as exc:
            raise HandoverError(f"unreadable message header: {exc}") from None
        if not isinstance(header, dict) or not isinstance(header.get("type"), str):
            raise HandoverError("message header without a type")
        payload = await self._read(payload_len) if payload_len else b""
        wanted = header.get("fds", 0)
        if not isinstance(wanted, int) or wanted < 0 or wanted > _MAX_FDS:
            raise HandoverError(f"bad descriptor count {wanted!r}")
        while len(self._fds) < wanted:
            await self._fill()  # the descriptors ride on bytes already read; never expected
        fds, self._fds = self._fds[:wanted], self._fds[wanted:]
        return Message(header["type"], header, payload, fds)

    async def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            await self._fill()
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def _fill(self) -> None:
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(
                    self.sock, _READ_SIZE, _MAX_FDS, socket.MSG_CMSG_CLOEXEC
                )
                break
            except (BlockingIOError, InterruptedError):
                await self._ready(writable=False)
        self._fds += fds
        if flags & socket.MSG_CTRUNC:
            raise HandoverError("file descriptors were cut off in transit")
        if not data:
            raise HandoverError("the other instance closed the connection")
        self._buf += data

    async def _ready(self, writable: bool) -> None:
        waiter: asyncio.Future[None] = self._loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        fd = self.sock.fileno()
        if writable:
            self._loop.add_writer(fd, wake)
        else:
            self._loop.add_reader(fd, wake)
        try:
            await waiter
        finally:
            if writable:
                self._loop.remove_writer(fd)
            else:
                self._loop.remove_reader(fd)

    def close(self) -> None:
        """Close the connection and every descriptor received but not claimed."""
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()
        self.sock.close()


# -- the cache snapshot (sans-IO apart from the turns it gives the event loop)


async def encode_cache(
    cache: Cache, now: float, max_entries: int, max_bytes: int
) -> tuple[bytes, int]:
    """The live entries of ``cache``, most recently used first, as a snapshot payload.

    At most ``max_entries`` entries and ``max_bytes`` bytes; the payload lists them from
    least to most recently used, so that inserting them in order rebuilds the LRU order.
    Each entry carries its age and lifetime, so the remaining TTLs stay exact. Gives the
    event loop a turn every few thousand entries (the instance still serves meanwhile).
    Returns the payload and the number of entries in it.
    """
    items = list(cache.store.items())  # one C-level copy: the store may change meanwhile
    chosen: list[bytes] = []
    size = 0
    for done, (key, entry) in enumerate(reversed(items), 1):
        if len(chosen) >= max_entries:
            break
        if done % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
        if entry.expires_at <= now or not is_question_key(key):
            continue
        ttls = entry.ttls
        record = b"".join(
            (
                _ENTRY.pack(
                    len(key),
                    len(entry.body),
                    len(ttls),
                    entry.kind,
                    entry.rcode,
                    now - entry.stored_at,
                    entry.expires_at - entry.stored_at,
                ),
                key,
                entry.body,
                struct.pack(f"!{len(ttls)}H{len(ttls)}I", *entry.offsets, *ttls),
            )
        )
        if size + len(record) > max_bytes:
            break
        size += len(record)
        chosen.append(record)
    chosen.reverse()
    return b"".join(chosen), len(chosen)


def decode_cache(payload: bytes, now: float) -> Iterator[tuple[bytes, Entry]]:
    """The (key, entry) pairs of a snapshot, least recently used first, their ages
    counted from ``now``. Raises HandoverError when the payload is malformed."""
    off = 0
    end = len(payload)
    try:
        while off < end:
            key_len, body_len, count, kind, rcode, age_s, life_s = _ENTRY.unpack_from(payload, off)
            off += _ENTRY.size
            key = payload[off : off + key_len]
            off += key_len
            body = payload[off : off + body_len]
            off += body_len
            numbers = struct.unpack_from(f"!{count}H{count}I", payload, off)
            off += count * 6
            if off > end or kind > 2 or not key:
                raise HandoverError("cache snapshot: entry runs past the end or is malformed")
            entry = Entry(body, numbers[:count], numbers[count:], now - age_s, 0, kind, rcode)
            entry.expires_at = entry.stored_at + life_s
            yield key, entry
    except struct.error as exc:
        raise HandoverError(f"cache snapshot: {exc}") from None


async def restore_cache(cache: Cache, payload: bytes, snapshot_time: float, now: float) -> int:
    """Put a snapshot's live entries into ``cache``; how many were restored.

    ``snapshot_time`` is the wall clock when the sender took it: the time the transfer
    took is added to every age, so the TTLs shown to clients stay right.
    """
    elapsed = max(0.0, time.time() - snapshot_time)
    restored = 0
    for i, (key, entry) in enumerate(decode_cache(payload, now - elapsed), 1):
        if entry.expires_at > now:
            cache.put(key, entry, now)
            restored += 1
        if i % _YIELD_EVERY == 0:
            await asyncio.sleep(0)
    return restored


# -- the instance being replaced


@dataclass(slots=True)
class Offer:
    """What a running instance hands over, gathered when a successor asks."""

    sockets: Sockets
    snapshot: Snapshot | None  # None: the cache does not travel (handover.cache is off)
    loop_id: str = ""  # the first label of this instance's loop probes


async def give(
    channel: Channel,
    timeout_s: float,
    offer: Callable[[], Offer | str],
    taken_timeout_s: float,
) -> bool:
    """Answer a successor on ``channel``; True once it has said ``taken``.

    ``offer`` returns what to hand over, or a reason to refuse (e.g. shutting down). False
    when the successor declined, spoke another version or went away: the caller then goes
    on serving as if nothing happened. Raises HandoverError (or TimeoutError) when the
    successor breaks the protocol or stops answering.
    """
    async with asyncio.timeout(timeout_s):
        hello = await channel.recv()
    if hello.kind != "hello":
        raise HandoverError(f"expected hello, got {hello.kind}")
    theirs = hello.header.get("protocol")
    peer = f"pid {hello.header.get('pid')} (dnsproxy {hello.header.get('version')})"
    if theirs != PROTOCOL:
        reason = f"handover protocol {theirs} is not supported (this instance speaks {PROTOCOL})"
        log.warning("handover: refused %s: %s", peer, reason)
        await channel.send("refuse", {"reason": reason, **_hello()})
        return False
    what = offer()
    if not isinstance(what, str) and not hello.header.get("groups"):
        grouped = [(key, len(socks)) for key, socks in what.sockets.items() if len(socks) > 1]
        if grouped:
            (kind, hp), count = grouped[0]
            what = (
                f"this instance serves {kind} {hp} with {count} sockets (workers) and the "
                "successor takes one per address: upgrade it, or stop this instance first"
            )
    if isinstance(what, str):
        log.warning("handover: refused %s: %s", peer, what)
        await channel.send("refuse", {"reason": what, **_hello()})
        return False
    await channel.send("hello", {**_hello(), "loop_id": what.loop_id})
    wanted = hello.header.get("cache")
    if what.snapshot is not None and isinstance(wanted, dict):
        max_entries = _bounded(wanted.get("max_entries"), 1 << 24)
        max_bytes = _bounded(wanted.get("max_bytes"), 1 << 32)
        taken_at = time.time()
        payload, count = await what.snapshot(max_entries, max_bytes)
        fields = {"format": CACHE_FORMAT, "entries": count, "time": taken_at}
        await channel.send("cache", fields, payload)
        log.info("handover: sent %d cache entries (%d bytes) to %s", count, len(payload), peer)
    described = [
        {"kind": kind, "addr": str(hp)} for (kind, hp), socks in what.sockets.items() for _ in socks
    ]
    fds = [sock.fileno() for socks in what.sockets.values() for sock in socks]
    await channel.send("sockets", {"sockets": described}, fds=fds)
    async with asyncio.timeout(taken_timeout_s):
        answer = await channel.recv()
    if answer.kind == "decline":
        log.warning("handover: %s declined: %s", peer, answer.header.get("reason"))
        return False
    if answer.kind != "taken":
        raise HandoverError(f"expected taken, got {answer.kind}")
    log.info("handover: %s serves the %d sockets now; stopping", peer, len(fds))
    return True


def _bounded(value: object, ceiling: int) -> int:
    return min(value, ceiling) if isinstance(value, int) and value >= 0 else 0


def _hello() -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": __version__, "pid": os.getpid()}


# -- the new instance


@dataclass(slots=True)
class Taken:
    """Sockets (and cache) received from the running instance, before ``taken`` is said."""

    channel: Channel
    peer: str  # "pid N (dnsproxy V)", for logs
    sockets: Sockets
    cache: bytes | None
    cache_time: float
    loop_id: str = ""  # the old instance's, or "" (an older version, or none sent)

    async def confirm(self) -> None:
        """Tell the old instance that this one reads the sockets now: it stops."""
        await self.channel.send("taken")

    async def decline(self, reason: str) -> None:
        with contextlib.suppress(OSError, HandoverError):
            await self.channel.send("decline", {"reason": reason})
        self.close()

    async def wait_done(self, timeout_s: float) -> dict[str, Any] | None:
        """The old instance's ``done`` (its in-flight queries answered), or None."""
        try:
            async with asyncio.timeout(timeout_s):
                message = await self.channel.recv()
        except (OSError, HandoverError, TimeoutError):
            return None
        finally:
            self.close()
        return message.header if message.kind == "done" else None

    def close(self) -> None:
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()
        self.channel.close()


async def take_over(
    path: str, timeout_s: float, cache_bounds: tuple[int, int] | None
) -> Taken | str:
    """Ask the instance listening on ``path`` for its sockets (and cache).

    ``cache_bounds`` is (max entries, max bytes) of the snapshot wanted, None for none.
    Returns what was received, or why nothing was (no instance, refused, timed out...):
    the caller then binds as usual and logs the reason.
    """
    loop = asyncio.get_running_loop()
    if not os.path.exists(path):
        return f"no running instance ({path} does not exist)"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, path)
    except (ConnectionRefusedError, FileNotFoundError):
        sock.close()
        return f"no running instance (nothing listens on {path})"
    except TimeoutError:
        sock.close()
        return f"the instance at {path} did not accept within {timeout_s:g}s"
    except OSError as exc:
        sock.close()
        return f"cannot connect to {path}: {exc.strerror or exc}"
    channel = Channel(sock)
    try:
        return await _receive(channel, timeout_s, cache_bounds)
    except TimeoutError:
        channel.close()
        return f"the instance at {path} did not answer within {timeout_s:g}s"
    except (OSError, HandoverError) as exc:
        channel.close()
        return f"handover from {path} failed: {exc}"


async def _receive(
    channel: Channel, timeout_s: float, cache_bounds: tuple[int, int] | None
) -> Taken | str:
    hello = {**_hello(), "groups": True}
    if cache_bounds is not None:
        hello["cache"] = {"max_entries": cache_bounds[0], "max_bytes": cache_bounds[1]}
    await channel.send("hello", hello)
    async with asyncio.timeout(timeout_s):
        reply = await channel.recv()
    peer = f"pid {reply.header.get('pid')} (dnsproxy {reply.header.get('version')})"
    if reply.kind == "refuse":
        channel.close()
        return f"refused by {peer}: {reply.header.get('reason')}"
    if reply.kind != "hello" or reply.header.get("protocol") != PROTOCOL:
        channel.close()
        theirs = reply.header.get("protocol")
        return f"{peer} speaks handover protocol {theirs}, this instance {PROTOCOL}"
    cache: bytes | None = None
    cache_time = 0.0
    max_payload = cache_bounds[1] if cache_bounds is not None else 0
    async with asyncio.timeout(timeout_s):
        message = await channel.recv(max_payload)
    if message.kind == "cache":
        if message.header.get("format") == CACHE_FORMAT:
            cache = message.payload
            cache_time = float(message.header.get("time", 0.0))
        else:
            log.warning("handover: cache snapshot format %s unknown; starting cold",
                        message.header.get("format"))  # fmt: skip
        async with asyncio.timeout(timeout_s):
            message = await channel.recv()
    if message.kind != "sockets":
        raise HandoverError(f"expected sockets, got {message.kind}")
    sockets = _sockets(message)
    loop_id = reply.header.get("loop_id")
    if not isinstance(loop_id, str) or not _LOOP_ID.fullmatch(loop_id):
        loop_id = ""
    return Taken(channel, peer, sockets, cache, cache_time, loop_id)


_LOOP_ID = re.compile(r"[0-9a-f]{16}")
_KINDS = {"udp": socket.SOCK_DGRAM, "tcp": socket.SOCK_STREAM, "http": socket.SOCK_STREAM}


def _sockets(message: Message) -> Sockets:
    """The announced sockets from their descriptors, each checked against its announcement."""
    described = message.header.get("sockets")
    pending = list(message.fds)
    opened: list[socket.socket] = []
    out: Sockets = {}
    try:
        if not isinstance(described, list) or len(described) != len(pending):
            raise HandoverError("the socket list does not match the descriptors received")
        for item in described:
            sock = socket.socket(fileno=pending.pop(0))
            opened.append(sock)
            kind, hp = _describe(item)
            name = sock.getsockname()
            if sock.type != _KINDS[kind] or (name[0], name[1]) != (hp.host, hp.port):
                raise HandoverError(f"the descriptor for {kind} {hp} is a socket on {name}")
            out.setdefault((kind, hp), []).append(sock)
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    finally:
        for fd in pending:
            with contextlib.suppress(OSError):
                os.close(fd)
    return out


def _describe(item: object) -> tuple[str, HostPort]:
    if not isinstance(item, dict) or item.get("kind") not in _KINDS:
        raise HandoverError(f"bad socket description {item!r}")
    addr = str(item.get("addr", ""))
    host, _, port = addr.rpartition(":")
    host = host.strip("[]")
    if not port.isdigit() or not host:
        raise HandoverError(f"bad socket address {addr!r}")
    return str(item["kind"]), HostPort(host, int(port))


# -- the listening side


class Listener:
    """The Unix socket on ``path`` that successors connect to.

    Bound under a temporary name and renamed over ``path``, so a successor never finds the
    path missing while one instance replaces another; only owner access (0600). At close
    the path is removed only while it is still ours (a successor has renamed its own over
    it by then).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        temporary = f"{path}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(temporary)
            os.chmod(temporary, 0o600)
            sock.listen(4)
            sock.setblocking(False)
            os.rename(temporary, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        self.sock = sock
        self._inode = os.stat(path).st_ino

    async def accept(self) -> tuple[Channel, int, int]:
        """The next successor: its channel, pid and uid (from SO_PEERCRED)."""
        loop = asyncio.get_running_loop()
        conn, _ = await loop.sock_accept(self.sock)
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _gid = struct.unpack("3i", creds)
        return Channel(conn), pid, uid

    def close(self, unlink: bool = True) -> None:
        """Stop listening; remove the path (``unlink``) unless another instance's socket
        is there now."""
        if self.sock.fileno() < 0:
            return
        self.sock.close()
        if unlink:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)


async def serve(listener: Listener, handle: Callable[[Channel, int], Awaitable[bool]]) -> None:
    """Accept successors one at a time until ``handle`` reports a completed handover.

    ``handle`` owns the channel it is given (and closes it).

    Connections from another user (other than root) are closed at once: whoever gets the
    sockets can answer every DNS query of the host.
    """
    own = os.getuid()
    while True:
        channel, pid, uid = await listener.accept()
        if uid not in (own, 0):
            log.warning("handover: refused a connection from uid %d (pid %d)", uid, pid)
            channel.close()
            continue
        if await handle(channel, pid):
            return
