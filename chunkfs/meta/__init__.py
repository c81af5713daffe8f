"""The metadata engine: all of chunkfs's SQL, split by concern.

``Meta`` bundles one object per concern over a ``Database``: ``namespace``
(inodes, names, attributes, xattrs), ``content`` (chunk maps, upload
sessions, the commit), ``registry`` (settings, storage nodes, ring vnodes),
``maintenance`` (the queries of gc, fsck, repair and rebalance) and
``objects`` (the S3 gateway's access keys, ETags and multipart uploads). The
records they take and return are in ``chunkfs.meta.records``. Nothing here
knows of FUSE or HTTP.
"""

from __future__ import annotations

from ..pg import Database
from .content import Content
from .maintenance import Maintenance
from .namespace import Namespace, check_name
from .objects import Objects
from .records import (
    LINK_MAX,
    NAME_MAX,
    ROOT_INO,
    AccessKey,
    Attrs,
    ChunkMap,
    ChunkRef,
    DirEntry,
    ETag,
    FileTotals,
    FsStats,
    Ino,
    InodeProblem,
    MultipartUpload,
    NodeInfo,
    Part,
    Renamed,
    Settings,
    UploadSession,
    UsedObject,
    now_ns,
)
from .registry import SCHEMA_VERSION, Registry

__all__ = [
    "LINK_MAX",
    "NAME_MAX",
    "ROOT_INO",
    "SCHEMA_VERSION",
    "AccessKey",
    "Attrs",
    "ChunkMap",
    "ChunkRef",
    "Content",
    "DirEntry",
    "ETag",
    "FileTotals",
    "FsStats",
    "Ino",
    "InodeProblem",
    "Maintenance",
    "Meta",
    "MultipartUpload",
    "Namespace",
    "NodeInfo",
    "Objects",
    "Part",
    "Registry",
    "Renamed",
    "Settings",
    "UploadSession",
    "UsedObject",
    "check_name",
    "now_ns",
]


class Meta:
    """The metadata engine over one ``Database``: one object per concern."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.namespace = Namespace(db)
        self.content = Content(db)
        self.registry = Registry(db)
        self.maintenance = Maintenance(db)
        self.objects = Objects(db)

    async def sync(self) -> None:
        """Make every metadata change committed so far durable (fsync)."""
        await self.db.sync()
