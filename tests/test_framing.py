"""FrameReader: a stream of length-prefixed DNS messages, however it is chunked."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dnsproxy.framing import MAX_FRAME, NEVER, FrameError, FrameReader, frame

messages = st.lists(st.binary(min_size=12, max_size=300), max_size=12)


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(stream)) for c in cuts})
    edges = [0, *points, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


@given(messages, st.lists(st.integers(min_value=0, max_value=4000), max_size=30))
def test_any_chunking_gives_the_same_messages(msgs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frame(m) for m in msgs)
    reader = FrameReader()
    got: list[bytes] = []
    for i, chunk in enumerate(chunked(stream, cuts)):
        got += reader.feed(chunk, float(i))
        # Only ever the tail of one frame is held, and only while it is incomplete.
        assert reader.buffered < MAX_FRAME
        assert (reader.partial_since != NEVER) == (reader.buffered > 0)
    assert got == msgs
    assert reader.buffered == 0


@given(st.integers(min_value=1, max_value=3000))
def test_a_byte_at_a_time(seed: int) -> None:
    msgs = [bytes([seed % 251]) * (12 + seed % 50), b"\x01" * 12]
    stream = b"".join(frame(m) for m in msgs)
    reader = FrameReader()
    got = [m for i in range(len(stream)) for m in reader.feed(stream[i : i + 1], 0.0)]
    assert got == msgs


@given(
    messages,
    st.integers(min_value=0, max_value=11),
    st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
)
def test_bad_length_is_refused_after_the_good_frames(
    msgs: list[bytes], bad: int, cuts: list[int]
) -> None:
    stream = b"".join(frame(m) for m in msgs) + bad.to_bytes(2, "big") + b"\x00" * 20
    reader = FrameReader()
    got: list[bytes] = []
    with pytest.raises(FrameError) as info:
        for chunk in chunked(stream, cuts):
            got += reader.feed(chunk, 0.0)
    # Every whole message before the bad prefix was handed out, none after.
    assert got + info.value.frames == msgs


def test_partial_frame_is_dated_from_its_first_byte() -> None:
    reader = FrameReader()
    whole = frame(b"\x00" * 20)
    assert reader.feed(whole[:1], 5.0) == []
    assert reader.partial_since == 5.0
    assert reader.feed(whole[1:10], 6.0) == []
    assert reader.partial_since == 5.0, "the same frame is still arriving"
    # The rest of it and the start of the next one: the next one is dated now.
    assert reader.feed(whole[10:] + whole[:3], 7.0) == [b"\x00" * 20]
    assert reader.partial_since == 7.0
    assert reader.feed(whole[3:], 8.0) == [b"\x00" * 20]
    assert reader.partial_since == NEVER


def test_expiry_is_the_earlier_of_idle_and_partial() -> None:
    reader = FrameReader()
    assert reader.expiry(100.0, 10.0, 2.0) == 110.0
    assert reader.expiry(NEVER, 10.0, 2.0) == NEVER
    reader.feed(b"\x00", 103.0)  # half a length prefix
    assert reader.expiry(100.0, 10.0, 2.0) == 105.0
    assert reader.expiry(NEVER, 10.0, 2.0) == 105.0
    assert reader.expiry(100.0, 10.0, NEVER) == 110.0
