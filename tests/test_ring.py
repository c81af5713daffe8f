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


# Three zones (hosts) of two nodes each, as the multi-host tests run them.
ZONES = {n: f"zone{i // 2}" for i, n in enumerate(SIX)}


@settings(max_examples=300)
@given(key=st.binary(min_size=32, max_size=32), alive=st.sets(st.sampled_from(SIX), min_size=1))
def test_replicas_go_to_distinct_zones_while_enough_zones_live(key, alive):
    r = ring_of(SIX)
    owners = r.owners(ring.key_position(key), 2, alive, ZONES)
    zones_alive = {ZONES[n] for n in alive}
    assert len(set(owners)) == len(owners) == min(2, len(alive))
    assert len({ZONES[n] for n in owners}) == min(2, len(zones_alive))
    # Every live node is still in the full preference list, zones first.
    full = r.owners(ring.key_position(key), None, alive, ZONES)
    assert sorted(full) == sorted(alive) and full[:2] == owners


def test_with_three_zones_of_two_no_chunk_has_both_replicas_in_one_zone_and_spread_is_even():
    r = ring_of(SIX)
    counts = {n: 0 for n in SIX}
    for key in KEYS:
        owners = r.owners(ring.key_position(key), 2, None, ZONES)
        assert ZONES[owners[0]] != ZONES[owners[1]]
        for n in owners:
            counts[n] += 1
    share = 2 * len(KEYS) / 6
    for node, n in counts.items():
        assert 0.75 * share <= n <= 1.25 * share, (node, n, share)


def test_adding_a_zone_moves_about_a_share_of_replicas_and_only_onto_it():
    new_zone = [f"{i:016x}" for i in (7, 8)]
    zones = {**ZONES, **{n: "zone3" for n in new_zone}}
    before, after = ring_of(SIX), ring_of([*SIX, *new_zone])
    moved = 0
    for key in KEYS:
        pos = ring.key_position(key)
        old = set(before.owners(pos, 2, None, ZONES))
        new = set(after.owners(pos, 2, None, zones))
        assert new - old <= set(new_zone)  # replicas move onto the new zone only
        moved += len(new - old)
    # R = 2 of 4 zones: the new zone holds about half the keys, one replica each.
    assert abs(moved / (2 * len(KEYS)) - 1 / 4) < 0.04, moved / (2 * len(KEYS))


def test_two_hundred_nodes_in_twenty_zones_spread_evenly_and_a_new_zone_takes_its_share():
    nodes = [f"{i:016x}" for i in range(1, 201)]
    zones = {n: f"z{i % 20}" for i, n in enumerate(nodes)}
    r = ring_of(nodes)
    counts = dict.fromkeys(nodes, 0)
    keys = KEYS[:20_000]
    for key in keys:
        owners = r.owners(ring.key_position(key), 2, None, zones)
        assert zones[owners[0]] != zones[owners[1]]
        for n in owners:
            counts[n] += 1
    share = 2 * len(keys) / len(nodes)
    # 200 replicas per node on average: the ring's own spread is about ±9 %.
    assert max(counts.values()) < 1.5 * share and min(counts.values()) > 0.5 * share
