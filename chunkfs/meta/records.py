"""The records the metadata engine hands out and takes, and the limits they obey.

Pure data, no I/O: every module above ``chunkfs.meta`` speaks in these.
Inode numbers are ``Ino`` ints, chunk ids are 32-byte SHA-256 digests,
sizes are bytes, times are nanoseconds since the epoch, and ring positions
are unsigned 64-bit ints.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType

from ..layout import HOLE

Ino = NewType("Ino", int)
ROOT_INO = Ino(1)
NAME_MAX = 255  # bytes in a name, as on ext4
SYMLINK_MAX = 4095  # bytes in a symlink's target
LINK_MAX = 65000  # hard links per inode, as on ext4
XATTR_VALUE_MAX = 65536  # bytes in an extended attribute's value
# A node is live while its last heartbeat is younger than this (seconds),
# not counting a time when no node could send one (see HEARTBEAT_QUIET_S).
HEARTBEAT_TIMEOUT_S = 15.0
# No heartbeat from any node for this long (seconds) means PostgreSQL is
# unreachable (a failover, an outage): heartbeat ages stop growing until
# one comes, and that time is left out of them after. Nodes send one every
# 3 s by default.
HEARTBEAT_QUIET_S = 5.0

# The file type bits of a mode and the types, for SQL built with f-strings.
S_IFMT = 0o170000
S_IFDIR = stat.S_IFDIR
S_IFREG = stat.S_IFREG


def now_ns() -> int:
    """The wall clock in nanoseconds since the epoch."""
    return time.time_ns()


@dataclass(frozen=True)
class Settings:
    """Cluster-wide settings fixed at mkfs: replica count R, the largest
    file (bytes), the token nodes require, the upload sessions' TTL (s),
    and the cluster's id (32 hex digits), which nodes record in their data
    directory.
    """

    replicas: int
    max_file_size: int
    cluster_token: str
    upload_ttl_s: int
    cluster_id: str


@dataclass(frozen=True)
class NodeInfo:
    """A storage node as registered: ids, the URL it advertises (``https``
    when it speaks TLS), its zone (failure domain), space in bytes,
    heartbeat age in seconds.
    """

    node_id: str
    base_url: str
    status: str
    capacity_bytes: int
    used_bytes: int
    free_bytes: int
    chunk_count: int
    heartbeat_age_s: float
    draining: bool = False
    zone: str = ""

    @property
    def live(self) -> bool:
        """True while the node runs and its heartbeat is fresh."""
        return self.status == "active" and self.heartbeat_age_s < HEARTBEAT_TIMEOUT_S

    @property
    def writable(self) -> bool:
        """True when new replicas may go to the node: live and not draining."""
        return self.live and not self.draining


ATTR_FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "size", "rdev",
    "atime_ns", "mtime_ns", "ctime_ns", "version",
)  # fmt: skip
# The columns of ``inodes`` an ``Attrs`` is read from, bare and as ``i.``.
ATTR_COLUMNS = ", ".join(ATTR_FIELDS)
ATTR_COLUMNS_I = ", ".join(f"i.{c}" for c in ATTR_FIELDS)


@dataclass(frozen=True)
class Attrs:
    """An inode's attributes as stored (sizes in bytes, times in ns);
    ``version`` counts the commits of its content.
    """

    ino: Ino
    mode: int
    uid: int
    gid: int
    nlink: int
    size: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    version: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Attrs:
        """The attributes in a row holding the ``ATTR_FIELDS`` columns."""
        return cls(**{f: row[f] for f in ATTR_FIELDS})

    @property
    def is_dir(self) -> bool:
        """Whether the inode is a directory."""
        return stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        """Whether the inode is a regular file."""
        return stat.S_ISREG(self.mode)


@dataclass(frozen=True)
class DirEntry:
    """One name in a directory, its inode's attributes, its readdir cookie
    (increasing in the order entries are listed) and the inode's extended
    attributes (name -> value).
    """

    name: bytes
    attrs: Attrs
    cookie: int
    xattrs: Mapping[bytes, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Renamed:
    """What a rename changed. ``moved``: the inode that took the new name,
    when it is not a directory (None for a directory, an exchange or a
    rename onto the same inode, whose changes reach further or nowhere).
    ``replaced``: the inode whose name was taken over, as it is afterwards
    (nlink 0: it lost its last name, the caller purges it when unused).
    """

    moved: Ino | None
    replaced: Attrs | None


@dataclass(frozen=True)
class ChunkRef:
    """One chunk of a file version: its extent (index 0..5, offset and
    length in bytes), object id, the nodes holding it, the SHA-256 of each
    1 MiB block concatenated (chunks over one block only), and the ring
    position its replicas were placed from. A hole (zeros only, stored
    nowhere) has the id ``layout.HOLE`` and no nodes.
    """

    index: int
    offset: int
    length: int
    chunk_id: bytes
    nodes: tuple[str, ...]
    blocks: bytes | None = None
    position: int = 0

    @property
    def end(self) -> int:
        """The file offset just past the chunk (bytes)."""
        return self.offset + self.length

    @property
    def hole(self) -> bool:
        """Whether the chunk is a hole: zeros, stored on no node."""
        return self.chunk_id == HOLE


@dataclass(frozen=True)
class ChunkMap:
    """A file's committed version: ``chunks`` is empty for an empty file."""

    ino: Ino
    version: int
    size: int
    sha256: bytes | None
    chunks: tuple[ChunkRef, ...]


@dataclass(frozen=True)
class UploadSession:
    """An open upload session; the chunks among those it protects that
    committed files already hold on at least R nodes (``reusable``:
    ``{chunk_id: holders}``), which need no upload; and once pushed, the
    nodes that took each of the others (``placed``).
    """

    session_id: int
    reusable: dict[bytes, tuple[str, ...]] = field(default_factory=dict)
    placed: Mapping[bytes, Sequence[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class FsStats:
    """What statfs reports: the live nodes' space divided by the replica
    count (bytes), and the number of inodes.
    """

    capacity_bytes: int
    free_bytes: int
    inodes: int


@dataclass(frozen=True)
class FileTotals:
    """How many regular files there are and the bytes in them."""

    files: int
    bytes: int


@dataclass(frozen=True)
class UsedObject:
    """A chunk object some file uses: its id, length (bytes), ring position
    and the nodes recorded as holding it.
    """

    chunk_id: bytes
    length: int
    position: int
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class InodeProblem:
    """A metadata invariant that does not hold for an inode; ``serious``
    is False for what a running mount explains (an inode unlinked while open).
    """

    ino: int
    what: str
    serious: bool


@dataclass(frozen=True)
class AccessKey:
    """An S3 access key of the gateway: its id and secret, the uid and gid
    its requests act as, a label, and when it was made (seconds since the epoch).
    """

    access_key_id: str
    secret: str
    uid: int
    gid: int
    name: str
    created_s: float


@dataclass(frozen=True)
class ETag:
    """A file's S3 ETag (quoted, as sent) and the content version it describes."""

    version: int
    etag: str


@dataclass(frozen=True)
class MultipartUpload:
    """An S3 multipart upload in progress: its id, its upload session, the
    bucket and key (UTF-8) it will make, who started it, the headers the
    object gets (lower-case name -> value) and when it began (seconds
    since the epoch).
    """

    upload_id: str
    session_id: int
    bucket: str
    key: str
    uid: int
    gid: int
    headers: Mapping[str, str]
    created_s: float


@dataclass(frozen=True)
class Part:
    """One part of a multipart upload: its number (1..10000), size in bytes,
    MD5, when it was uploaded (seconds since the epoch) and its bytes as
    ``pieces``: chunk objects in order, each a ``ChunkRef`` whose offset is
    within the part.
    """

    number: int
    size: int
    md5: bytes
    modified_s: float
    pieces: tuple[ChunkRef, ...]
