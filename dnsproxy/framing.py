"""DNS messages over a byte stream: the 2-octet length prefix of RFC 1035 §4.2.2.

Sans-IO. :class:`FrameReader` turns whatever chunks a TCP (or TLS) transport delivers into
whole messages and holds the incomplete tail; the client side (``server.py``) and the
upstream side (``pipeline.py``) both read through it, and both ask it when an idle or
stalled stream is due to be closed (:meth:`FrameReader.expiry`).
"""

from __future__ import annotations

from typing import Final

from dnsproxy.wire import HEADER_LEN, WireError

__all__ = ["MAX_FRAME", "NEVER", "FrameError", "FrameReader", "frame"]

MAX_FRAME: Final = 2 + 0xFFFF  # length prefix plus the longest message it can announce
NEVER: Final = float("inf")


class FrameError(WireError):
    """A length prefix too short for a DNS header: the framing is lost for good.

    A byte stream cannot be resynchronised after that, so the connection must be
    closed. ``frames`` holds the whole messages that came before the bad prefix.
    """

    def __init__(self, length: int, frames: list[bytes]) -> None:
        super().__init__(f"frame length {length} is shorter than a DNS header")
        self.frames = frames


def frame(message: bytes) -> bytes:
    """``message`` with its length prefix, to be written in one piece (RFC 7766 §8)."""
    return len(message).to_bytes(2, "big") + message


class FrameReader:
    """Splits a byte stream into DNS messages.

    Holds at most one incomplete frame (fewer than :data:`MAX_FRAME` bytes): every whole
    message is handed out as soon as its last byte arrives.
    """

    __slots__ = ("_buf", "_need", "partial_since")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 2  # bytes _buf must hold before its first frame can be complete
        # When the bytes of the incomplete frame held began to arrive; NEVER if none.
        self.partial_since = NEVER

    @property
    def buffered(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes, now: float) -> list[bytes]:
        """Take the next chunk of the stream; return the messages it completes, in order.

        ``now`` dates the start of an incomplete frame (see :meth:`expiry`). Raises
        :class:`FrameError` on a length prefix below 12; the reader is then unusable.
        """
        buf = self._buf
        held = bool(buf)
        if held:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        n = len(data)
        off = 0
        frames: list[bytes] = []
        while True:
            if n - off < 2:
                self._need = 2
                break
            length = (data[off] << 8) | data[off + 1]
            if length < HEADER_LEN:
                raise FrameError(length, frames)
            end = off + 2 + length
            if end > n:
                self._need = 2 + length
                break
            frames.append(data[off + 2 : end])
            off = end
        if off < n:
            buf += memoryview(data)[off:]
            if off or not held:
                self.partial_since = now  # a new frame began in this chunk
        else:
            self.partial_since = NEVER
        return frames

    def resume(self, now: float) -> None:
        """Reading was paused by the receiver: an incomplete frame is dated from now."""
        if self._buf:
            self.partial_since = now

    def expiry(self, idle_since: float, idle_s: float, partial_s: float) -> float:
        """When the stream is due to be closed if nothing more arrives.

        ``idle_s`` after ``idle_since`` (pass :data:`NEVER` while the stream has work in
        progress), or ``partial_s`` after an incomplete frame began to arrive, whichever
        comes first; :data:`NEVER` when neither applies.
        """
        idle = idle_since + idle_s
        partial = self.partial_since + partial_s
        return partial if partial < idle else idle
