"""The consistent-hash ring: balance, minimal movement, distinct owners."""

import hashlib
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from chunkfs import ring

SIX = [f"{i:016x}" for i in range(1, 7)]
KEYS = [hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(60_000)]


def ring_of(node_ids: list[str]) -> ring.Ring:
    """A ring with the standard vnodes of each node, as registration makes them."""
    return ring.Ring(ring.Vnode(p, n) for n in node_ids for p in ring.vnode_positions(n))


def test_each_node_has_150_vnodes():
    r = ring_of(SIX)
    assert len(r) == 6 * ring.VNODES_PER_NODE
    assert len(set(ring.vnode_positions(SIX[0]))) == 150


def test_keys_spread_evenly_over_six_nodes():
    r = ring_of(SIX)
    counts = {n: 0 for n in SIX}
    for key in KEYS:
        counts[r.owners(ring.key_position(key), 1)[0]] += 1
    share = len(KEYS) / 6
    for node, n in counts.items():
        assert 0.75 * share <= n <= 1.25 * share, (node, n, share)


def test_adding_a_seventh_node_moves_about_a_seventh_and_only_to_it():
    before = ring_of(SIX)
    new = f"{7:016x}"
    after = ring_of([*SIX, new])
    moved = 0
    for key in KEYS:
        pos = ring.key_position(key)
        old_owner, new_owner = before.owners(pos, 1)[0], after.owners(pos, 1)[0]
        if old_owner != new_owner:
            assert new_owner == new
            moved += 1
    assert abs(moved / len(KEYS) - 1 / 7) < 0.04, moved / len(KEYS)


@settings(max_examples=200)
@given(key=st.binary(min_size=32, max_size=32), count=st.integers(1, 8))
def test_owners_are_distinct_and_deterministic(key, count):
    r = ring_of(SIX)
    owners = r.owners(ring.key_position(key), count)
    assert len(owners) == min(count, 6)
    assert len(set(owners)) == len(owners)
    assert owners == ring_of(list(reversed(SIX))).owners(ring.key_position(key), count)


@given(key=st.binary(min_size=32, max_size=32))
def test_inactive_nodes_are_passed_over_by_the_next_on_the_ring(key):
    r = ring_of(SIX)
    full = r.owners(ring.key_position(key), 6)
    down = full[0]
    active = set(SIX) - {down}
    assert r.owners(ring.key_position(key), 2, active) == full[1:3]


def test_signed_round_trip():
    for pos in (0, 1, (1 << 63) - 1, 1 << 63, (1 << 64) - 1):
        assert ring.to_unsigned(ring.to_signed(pos)) == pos
        assert -(1 << 63) <= ring.to_signed(pos) < (1 << 63)


def test_key_must_be_a_sha256():
    try:
        ring.key_position(os.urandom(31))
    except ValueError:
        return
    raise AssertionError("a 31-byte key was accepted")


def test_files_spread_evenly_and_each_file_has_one_position():
    r = ring_of(SIX)
    counts = {n: 0 for n in SIX}
    for ino in range(2, 30_002):
        counts[r.owners(ring.file_position(ino), 1)[0]] += 1
    for node, n in counts.items():
        assert 0.75 * 5000 <= n <= 1.25 * 5000, (node, n)
    assert ring.file_position(7) == ring.file_position(7) != ring.file_position(8)
