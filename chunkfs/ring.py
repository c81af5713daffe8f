"""The consistent-hash ring that places chunk objects on storage nodes.

Each storage node owns ``VNODES_PER_NODE`` points (virtual nodes) on a 64-bit
ring; a key is owned by the first distinct nodes met walking clockwise from
the key's position (Karger et al., "Consistent Hashing and Random Trees",
STOC 1997; virtual nodes as in Amazon's Dynamo, SOSP 2007). Pure logic, no I/O.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

VNODES_PER_NODE = 150
_SPAN = 1 << 64


def position(data: bytes) -> int:
    """Ring position of ``data``: the first 8 bytes of its SHA-256, unsigned."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big")


def key_position(chunk_id: bytes) -> int:
    """Ring position of a chunk object, from its 32-byte SHA-256 id.

    The id is already a uniform hash, so its first 8 bytes are used as is.
    """
    if len(chunk_id) != 32:
        raise ValueError("chunk id must be 32 bytes")
    return int.from_bytes(chunk_id[:8], "big")


def file_position(ino: int) -> int:
    """Ring position of the small chunks of file ``ino``: they are placed
    together, so that writing or reading a small file takes one request per
    replica node rather than one per chunk.
    """
    return position(b"inode:%d" % ino)


def vnode_positions(node_id: str, count: int = VNODES_PER_NODE) -> list[int]:
    """The ``count`` ring positions (unsigned 64-bit ints) owned by ``node_id``."""
    return [position(f"{node_id}#{i}".encode()) for i in range(count)]


def to_signed(pos: int) -> int:
    """Map an unsigned 64-bit position to PostgreSQL's signed bigint."""
    return pos - _SPAN if pos >= 1 << 63 else pos


def to_unsigned(value: int) -> int:
    """Inverse of ``to_signed``."""
    return value + _SPAN if value < 0 else value


@dataclass(frozen=True)
class Vnode:
    """One point of the ring: an unsigned 64-bit position owned by a node."""

    position: int
    node_id: str


class Ring:
    """An immutable ring built from vnodes.

    ``owners`` costs O(log V) for the lookup plus the clockwise walk, which
    ends after R distinct nodes (V: number of vnodes).
    """

    def __init__(self, vnodes: Iterable[Vnode]) -> None:
        points = sorted((v.position, v.node_id) for v in vnodes)
        self._positions = [p for p, _ in points]
        self._nodes = [n for _, n in points]
        self.node_ids = frozenset(self._nodes)

    def __len__(self) -> int:
        return len(self._positions)

    def walk(self, pos: int) -> Iterator[str]:
        """Every distinct node, in clockwise order starting at ``pos``."""
        n = len(self._positions)
        if not n:
            return
        start = bisect.bisect_left(self._positions, pos)
        seen: set[str] = set()
        for i in range(n):
            node = self._nodes[(start + i) % n]
            if node not in seen:
                seen.add(node)
                yield node
                if len(seen) == len(self.node_ids):
                    return

    def owners(
        self,
        pos: int,
        count: int | None,
        eligible: Collection[str] | None = None,
        zones: Mapping[str, str] | None = None,
    ) -> list[str]:
        """The first ``count`` distinct nodes clockwise from ring position
        ``pos`` (all of them for None), passing over those not in
        ``eligible`` (when given), so the next node on the ring takes their
        place. Fewer when fewer nodes qualify. With ``count`` None the nodes
        past the first R are where a writer goes when an owner fails.

        With ``zones`` (node id -> failure domain; a node missing from it is
        a zone of its own), the first node met of each zone comes first, in
        ring order, and the nodes of zones already chosen after them: R
        owners lie in R distinct zones whenever R zones qualify. A new zone
        then takes a key's replica only from the last of its owners, so
        adding a zone moves replicas onto it alone (the rack-aware
        preference list of Dynamo, SOSP 2007, section 4.6).
        """
        firsts: list[str] = []
        rest: list[str] = []
        taken: set[str] = set()
        candidates = self.node_ids if eligible is None else self.node_ids & set(eligible)
        zone_count = len({zones.get(n, n) for n in candidates}) if zones else len(candidates)
        for node in self.walk(pos):
            if node not in candidates:
                continue
            zone = zones.get(node, node) if zones else node
            if zone in taken:
                rest.append(node)
            else:
                taken.add(zone)
                firsts.append(node)
            if count is not None and (
                len(firsts) == count
                or (len(taken) == zone_count and len(firsts) + len(rest) >= count)
            ):
                break
        chosen = firsts + rest
        return chosen if count is None else chosen[:count]
