"""The filesystem core: what every front end (the FUSE mount, a script, a
test) drives. ``fs`` holds the operations and their POSIX rules,
``handles`` the open files and reads, ``writer`` the commit, ``caches``
the one cache type for what the core trusts for a while.
"""

from .fs import ROOT, Caller, Created, FileSystem, Opened, StatFs, open_filesystem, permitted

__all__ = [
    "ROOT",
    "Caller",
    "Created",
    "FileSystem",
    "Opened",
    "StatFs",
    "open_filesystem",
    "permitted",
]
