"""Mounting: option parsing, the checks before a mount, daemonizing, and the
trio main that runs the FUSE session until unmount.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyfuse3
import trio

from .. import errors
from ..core.fs import open_filesystem
from ..metrics import SPOOL_BYTES, parse_address
from ..metrics import serve as serve_metrics
from ..nodeclient import tls_context
from ..pg import redact_dsn
from .inodes import KernelCache
from .operations import Operations

log = logging.getLogger(__name__)
# How far the kernel reads ahead on a mount (KiB): one FUSE request's worth.
READ_AHEAD_KIB = 1024
# How long the mount waits at most for its first request to be answered.
SETTLE_TIMEOUT_S = 10.0

# mount(8) options handed on to the kernel as they are.
_KERNEL_FLAGS = frozenset(
    {
        "rw",
        "ro",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
        "async",
        "sync",
        "dirsync",
        "atime",
        "noatime",
        "diratime",
        "nodiratime",
        "relatime",
        "norelatime",
        "strictatime",
        "lazytime",
        "nolazytime",
    }
)
# mount(8) and fstab options that only mean something to mount(8) itself.
_IGNORED = frozenset({"defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail"})


@dataclass
class MountOptions:
    """Parsed ``-o`` options.

    ``fuse`` holds what goes to libfuse; times are seconds.
    """

    allow_other: bool
    default_permissions: bool = True
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    node_timeout: float = 30.0
    pg_timeout: float = 30.0
    cache_dir: str | None = None
    node_ca: str | None = None
    metrics: str | None = None
    cache_size_mib: int = 10240
    log_file: str | None = None
    debug: bool = False
    fuse: set[str] = field(default_factory=set)

    def fuse_options(self, dsn: str) -> set[str]:
        """The option set for ``pyfuse3.init``; the DSN shows without its password."""
        # libfuse splits options at commas, which a DSN listing several
        # hosts has; a backslash keeps one in the value.
        fsname = redact_dsn(dsn).replace("\\", "\\\\").replace(",", "\\,")
        opts = {f"fsname={fsname}", "subtype=chunkfs", *self.fuse}
        if self.allow_other:
            opts.add("allow_other")
        if self.default_permissions:
            opts.add("default_permissions")
        return opts


def parse_options(values: list[str], *, is_root: bool) -> MountOptions:
    """Parse ``-o`` values (each a comma-separated list).

    chunkfs options: ``allow_other`` / ``noallow_other`` (default: on when
    mounted by root), ``default_permissions`` / ``nodefault_permissions``
    (default on), ``entry_timeout=S``, ``attr_timeout=S``, ``node_timeout=S``,
    ``pg_timeout=S``, ``cache_dir=PATH``, ``cache_size=MiB`` (0: no content
    cache), ``node_ca=PATH`` (the CA of ``https://`` nodes),
    ``metrics=HOST:PORT`` (serve Prometheus metrics there), ``log=PATH``,
    ``debug``. mount(8)'s
    generic flags go to the kernel; fstab-only ones are ignored. Raises
    ``ConfigError`` naming the first unknown or malformed option.
    """
    opts = MountOptions(allow_other=is_root)
    floats = {"entry_timeout", "attr_timeout", "node_timeout", "pg_timeout"}
    for value in values:
        for item in filter(None, value.split(",")):
            key, sep, arg = item.partition("=")
            if key in floats and sep:
                try:
                    number = float(arg)
                except ValueError:
                    number = -1.0
                if number < 0:
                    raise errors.ConfigError(f"mount option {key} needs a number of seconds >= 0")
                setattr(opts, key, number)
            elif key == "cache_size" and sep:
                if not arg.isdigit():
                    raise errors.ConfigError(
                        "mount option cache_size needs a whole number of MiB >= 0"
                    )
                opts.cache_size_mib = int(arg)
            elif key in ("cache_dir", "log", "node_ca", "metrics") and sep and arg:
                try:  # a CA file or an address that cannot be used fails the mount now
                    if key == "node_ca":
                        tls_context(arg)
                    elif key == "metrics":
                        parse_address(arg)
                except errors.ConfigError as exc:
                    raise errors.ConfigError(f"mount option {key}: {exc}") from None
                setattr(opts, "log_file" if key == "log" else key, arg)
            elif item in ("allow_other", "noallow_other"):
                opts.allow_other = item == "allow_other"
            elif item in ("default_permissions", "nodefault_permissions"):
                opts.default_permissions = item == "default_permissions"
            elif item == "debug":
                opts.debug = True
            elif item in _KERNEL_FLAGS:
                opts.fuse.add(item)
            elif (
                item in _IGNORED or key.startswith("x-") or key in ("comment", "fsname", "subtype")
            ):
                continue
            else:
                raise errors.ConfigError(f"unknown mount option: {item}")
    return opts


def check_mountpoint(path: str) -> str:
    """Return the absolute path of an empty directory. Raises ``ConfigError``."""
    p = Path(path)
    if not p.is_dir():
        raise errors.ConfigError(f"mount point {path} is not a directory")
    if any(p.iterdir()):
        raise errors.ConfigError(f"mount point {path} is not empty")
    return str(p.resolve())


def default_cache_dir(dsn: str, mountpoint: str) -> str:
    """Where a mount keeps its spools, content cache and log unless told:
    ``BASE/FS/MOUNT`` under /var/cache/chunkfs for root, else
    ~/.cache/chunkfs, with ``FS`` and ``MOUNT`` hashes of the DSN (its
    password left out) and the mount point, so that every mount on a machine
    has a cache of its own, and finds it again when mounted again.
    """
    if os.geteuid() == 0:
        base = "/var/cache/chunkfs"
    else:
        home = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
        base = os.path.join(home, "chunkfs")
    return os.path.join(base, _short_hash(redact_dsn(dsn)), _short_hash(mountpoint))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


async def serve(dsn: str, mountpoint: str, opts: MountOptions, ready: Callable[[], None]) -> None:
    """Mount and serve until unmounted or signalled (SIGTERM, SIGINT, SIGHUP).

    ``ready`` is called once the kernel has the mount and answers on it. Raises
    ``ChunkfsError`` when the filesystem cannot be mounted.
    """
    cache_dir = opts.cache_dir or default_cache_dir(dsn, mountpoint)
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    kernel = KernelCache()
    async with open_filesystem(
        dsn,
        cache_dir,
        attr_ttl=opts.attr_timeout,
        entry_ttl=opts.entry_timeout,
        cache_bytes=opts.cache_size_mib << 20,
        node_timeout=opts.node_timeout,
        pg_timeout=opts.pg_timeout,
        node_tls=tls_context(opts.node_ca),
        on_commit=kernel.gave_pages,  # the kernel's pages hold what was just committed
    ) as fs:
        ops = Operations(
            fs, kernel, entry_timeout=opts.entry_timeout, attr_timeout=opts.attr_timeout
        )
        where = str(await trio.Path(mountpoint).resolve())  # once mounted, this would ask us
        if opts.metrics:  # before the mount: a busy address fails it
            SPOOL_BYTES.set_function(fs.files.spool_bytes)
            recorded = serve_metrics(opts.metrics, where)
        try:
            pyfuse3.init(ops, mountpoint, opts.fuse_options(dsn))
        except RuntimeError as exc:
            raise errors.ConfigError(f"cannot mount on {mountpoint}: {exc}") from None

        async def settle() -> None:
            # The kernel lowers read-ahead to what the INIT reply offers when
            # it gets that reply, which pyfuse3.main sends first, and a file
            # keeps the read-ahead it was opened with. A stat of the root is
            # answered only after INIT: set it then, and only then say ready.
            with trio.move_on_after(SETTLE_TIMEOUT_S):
                with contextlib.suppress(OSError):
                    await trio.to_thread.run_sync(os.stat, where, abandon_on_cancel=True)
            set_read_ahead(where, READ_AHEAD_KIB)
            ready()

        signalled = False
        try:
            async with trio.open_nursery() as nursery:

                async def on_signal() -> None:
                    nonlocal signalled
                    with trio.open_signal_receiver(
                        signal.SIGTERM, signal.SIGINT, signal.SIGHUP
                    ) as sigs:
                        async for sig in sigs:
                            log.info("signal %d: unmounting", sig)
                            signalled = True
                            pyfuse3.terminate()
                            return

                nursery.start_soon(on_signal)
                nursery.start_soon(fs.run_purger)
                nursery.start_soon(fs.scans.run)
                nursery.start_soon(settle)
                await pyfuse3.main()
                nursery.cancel_scope.cancel()
        finally:
            pyfuse3.close(unmount=signalled)
            if opts.metrics:
                recorded.unlink(missing_ok=True)


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Let the kernel read ahead ``kib`` KiB on the mount at ``mountpoint``
    (a resolved path, not looked up: the mount may not serve yet), through
    its bdi's ``read_ahead_kb``, so that a sequential reader's FUSE reads
    come in requests of up to that size, not 128 KiB (measured, cold 512 MiB
    ``cat``: 167-283 -> 314-332 MiB/s). Needs root; otherwise the default stays.
    """
    want = mountpoint
    try:
        with open("/proc/self/mountinfo") as mountinfo:
            for line in mountinfo:
                fields = line.split()
                if fields[4].replace("\\040", " ") == want:
                    with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as f:
                        f.write(f"{kib}\n")
    except OSError as exc:
        log.debug("read-ahead of %s left as it was: %s", mountpoint, exc)


def setup_logging(opts: MountOptions, cache_dir: str, *, to_stderr: bool) -> None:
    """Log to ``log=`` (or ``cache_dir``'s mount.log) or, in the foreground, stderr."""
    level = logging.DEBUG if opts.debug else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if to_stderr and not opts.log_file:
        logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
        return
    path = opts.log_file or os.path.join(cache_dir, "mount.log")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    logging.basicConfig(level=level, format=fmt, filename=path)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def mount(dsn: str, mountpoint: str, opts: MountOptions, *, foreground: bool) -> None:
    """Mount ``dsn`` on ``mountpoint``. In the background form, return once the
    mount is ready (the filesystem keeps running in a detached child).
    Raises ``ChunkfsError`` with a one-line message when it cannot mount.
    """
    mountpoint = check_mountpoint(mountpoint)
    cache_dir = opts.cache_dir or default_cache_dir(dsn, mountpoint)
    opts = replace(opts, cache_dir=cache_dir)
    if foreground:
        setup_logging(opts, cache_dir, to_stderr=True)
        with errors.unwrapped():
            trio.run(serve, dsn, mountpoint, opts, lambda: None)
        return
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: detach, serve, and report readiness through the pipe
        os.close(read_fd)
        _run_daemon(dsn, mountpoint, opts, cache_dir, write_fd)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message != "ok":
        os.waitpid(pid, 0)
        raise errors.ChunkfsError(
            message or "the filesystem process died before the mount was ready"
        )


def _run_daemon(
    dsn: str, mountpoint: str, opts: MountOptions, cache_dir: str, write_fd: int
) -> None:
    os.setsid()
    os.chdir("/")
    status = 1

    def ready() -> None:
        os.write(write_fd, b"ok")
        os.close(write_fd)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)

    try:
        setup_logging(opts, cache_dir, to_stderr=False)
        trio.run(serve, dsn, mountpoint, opts, ready)
        status = 0
    except BaseException as exc:
        cause = errors.leaf(exc)
        if isinstance(cause, errors.ChunkfsError):
            log.error("mount failed: %s", cause)
            _report(write_fd, str(cause))
        else:
            log.exception("mount failed")
            _report(write_fd, f"mount failed: {cause!r}")
    finally:
        os._exit(status)


def _report(write_fd: int, message: str) -> None:
    try:
        os.write(write_fd, message.encode())
        os.close(write_fd)
    except OSError:
        pass  # the parent already has its answer
