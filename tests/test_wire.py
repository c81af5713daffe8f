"""Tests of chunkfs.wire: chunk ids in wire form and the batch framing (pure)."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chunkfs.wire import (
    BatchEntry,
    MalformedBatch,
    decode_batch,
    encode_batch,
    id_from_hex,
    id_to_hex,
    is_valid_id,
)

digests = st.binary(min_size=32, max_size=32)
entries = st.builds(BatchEntry, digests.map(bytes.hex), st.binary(max_size=300))
batches = st.lists(entries, max_size=8)

GOOD = hashlib.sha256(b"x").hexdigest()
BAD_IDS = [GOOD.upper(), GOOD[:-1], GOOD + "0", "g" * 64, "../" + GOOD[3:], "", " " + GOOD[1:]]


def frame(chunk_id: bytes, length: int, data: bytes) -> bytes:
    """One entry built by hand, as the protocol describes it."""
    return chunk_id + length.to_bytes(8, "big") + data


def boundaries(batch: list[BatchEntry]) -> list[int]:
    """The byte offsets where entries start, and the end."""
    offsets = [0]
    for e in batch:
        offsets.append(offsets[-1] + 72 + len(e.data))
    return offsets


# ------------------------------------------------------------------ ids


@given(digests)
def test_id_round_trip(digest: bytes) -> None:
    text = id_to_hex(digest)
    assert is_valid_id(text) and text == text.lower() and len(text) == 64
    assert id_from_hex(text) == digest


@pytest.mark.parametrize("size", [0, 31, 33, 64])
def test_id_to_hex_wants_32_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="32-byte"):
        id_to_hex(bytes(size))


@pytest.mark.parametrize("bad", BAD_IDS)
def test_malformed_ids_are_rejected(bad: str) -> None:
    assert not is_valid_id(bad)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        id_from_hex(bad)


@given(st.text(max_size=70))
def test_only_64_lowercase_hex_digits_are_ids(text: str) -> None:
    expected = len(text) == 64 and all(c in "0123456789abcdef" for c in text)
    assert is_valid_id(text) is expected


# ------------------------------------------------------------- framing


def test_encoding_is_the_documented_framing() -> None:
    one, two = b"first chunk", b""
    body = encode_batch([BatchEntry(hashlib.sha256(one).hexdigest(), one), BatchEntry(GOOD, two)])
    expected = frame(hashlib.sha256(one).hexdigest().encode(), len(one), one) + frame(
        GOOD.encode(), 0, b""
    )
    assert body == expected
    assert encode_batch([]) == b"" and decode_batch(b"") == []


@given(batches)
def test_round_trip(batch: list[BatchEntry]) -> None:
    body = encode_batch(batch)
    assert len(body) == boundaries(batch)[-1]
    assert decode_batch(body) == batch


@given(batches.filter(bool), st.data())
def test_every_cut_inside_an_entry_is_rejected(
    batch: list[BatchEntry], data: st.DataObject
) -> None:
    body = encode_batch(batch)
    cut = data.draw(st.integers(0, len(body) - 1), label="cut")
    ends = boundaries(batch)
    if cut in ends:  # a cut between entries is a shorter, valid batch
        assert decode_batch(body[:cut]) == batch[: ends.index(cut)]
    else:
        with pytest.raises(MalformedBatch):
            decode_batch(body[:cut])


@pytest.mark.parametrize("size", [1, 63, 64, 71])
def test_truncated_header_is_rejected(size: int) -> None:
    whole = frame(GOOD.encode(), 1, b"x")
    with pytest.raises(MalformedBatch, match="truncated batch entry header"):
        decode_batch(whole + whole[:size])


@pytest.mark.parametrize("declared", [5, 2**64 - 1])
def test_length_past_the_end_is_rejected(declared: int) -> None:
    with pytest.raises(MalformedBatch, match="runs past the end"):
        decode_batch(frame(GOOD.encode(), declared, b"four"))


@pytest.mark.parametrize("bad", [b.encode() for b in BAD_IDS if len(b) == 64] + [b"\xff" * 64])
def test_bad_id_in_body_is_rejected(bad: bytes) -> None:
    body = frame(GOOD.encode(), 1, b"x") + frame(bad, 1, b"y")
    with pytest.raises(MalformedBatch, match="bad chunk id in batch at byte 73"):
        decode_batch(body)


@pytest.mark.parametrize("bad", BAD_IDS)
def test_encoding_refuses_a_bad_id(bad: str) -> None:
    with pytest.raises(ValueError, match="bad chunk id"):
        encode_batch([BatchEntry(GOOD, b"x"), BatchEntry(bad, b"y")])
