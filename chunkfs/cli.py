"""The ``chunkfs`` command line.

Every command prints a one-line ``chunkfs: error: ...`` on standard error
and exits non-zero (1; 2 for a usage error) on bad input or an unreachable
cluster. ``chunkfs DSN MOUNTPOINT -o OPTS``
(the form mount(8) uses through mount.fuse3) means ``chunkfs mount``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import trio

from . import errors
from .meta import Meta
from .pg import open_database, redact_dsn

T = TypeVar("T")
GIB = 1 << 30


def _run(fn: Callable[..., Awaitable[T]], *args: Any) -> T:
    """Run a trio function, turning chunkfs errors into a one-line exit."""
    try:
        with errors.unwrapped():
            return trio.run(fn, *args)
    except errors.ChunkfsError as exc:
        raise click.ClickException(str(exc)) from None


async def _with_meta(dsn: str, fn: Callable[[Meta], Awaitable[T]]) -> T:
    async with open_database(dsn, max_size=2) as db:
        return await fn(Meta(db))


def _dsn_option(required: bool = True) -> Callable[[Any], Any]:
    return click.argument("dsn", envvar="CHUNKFS_DSN", required=required)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chunkfs")
def cli() -> None:
    """chunkfs: a FUSE filesystem with metadata in PostgreSQL and file data in
    six SHA-256 chunks on storage nodes. DSN may also come from CHUNKFS_DSN.
    """


@cli.command()
@_dsn_option()
@click.option(
    "--replicas",
    default=2,
    show_default=True,
    type=click.IntRange(1, 16),
    help="Copies of every chunk, each on a distinct node.",
)
@click.option(
    "--max-file-size",
    default=10 * GIB,
    show_default=True,
    type=click.IntRange(1),
    help="Largest file in bytes (EFBIG past it).",
)
@click.option(
    "--upload-ttl",
    default=3600,
    show_default=True,
    type=click.IntRange(1),
    help="Seconds before gc may collect what an unfinished upload pushed.",
)
def mkfs(dsn: str, replicas: int, max_file_size: int, upload_ttl: int) -> None:
    """Create a filesystem in DSN's database (safe to run twice)."""

    async def body(meta: Meta) -> bool:
        return await meta.registry.mkfs(
            replicas=replicas,
            max_file_size=max_file_size,
            upload_ttl_s=upload_ttl,
            uid=os.getuid(),
            gid=os.getgid(),
        )

    made = _run(_with_meta, dsn, body)
    click.echo("created a new filesystem" if made else "filesystem already exists; settings kept")


@cli.group(invoke_without_command=True)
@click.option("--dsn", envvar="CHUNKFS_DSN", help="PostgreSQL DSN of the cluster.")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), help="Where the node keeps its chunks and id."
)
@click.option(
    "--listen",
    default="127.0.0.1:7070",
    show_default=True,
    help="HOST:PORT to serve on (0.0.0.0 or [::]: every interface, with --advertise).",
)
@click.option(
    "--advertise",
    metavar="URL",
    help="http(s)://HOST:PORT other hosts reach this node at (default: the listen address).",
)
@click.option(
    "--zone",
    help="Failure domain: replicas of a chunk go to distinct zones (default: this host's name).",
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve HTTPS: certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The certificate's key (PEM).")
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=512,
    show_default=True,
    help="Connections served at once; more are closed.",
)
@click.option(
    "--capacity",
    type=click.IntRange(1),
    default=None,
    help="Cap on stored bytes (default: the disk's size).",
)
@click.option(
    "--reclaim-interval",
    type=click.FloatRange(0),
    default=10.0,
    show_default=True,
    help="Seconds between passes that delete the chunks nothing needs (0: only `chunkfs gc`).",
)
@click.pass_context
def node(
    ctx: click.Context,
    dsn: str | None,
    data_dir: str | None,
    listen: str,
    advertise: str | None,
    zone: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    max_connections: int,
    capacity: int | None,
    reclaim_interval: float,
) -> None:
    """Run one storage node until SIGTERM (node --dsn DSN --data-dir DIR), or
    manage the nodes (node drain / node remove).
    """
    if ctx.invoked_subcommand is not None:
        return
    from .node.server import NodeOptions, run_node
    from .wire import parse_host_port

    if not dsn or not data_dir:
        raise click.UsageError("a storage node needs --dsn and --data-dir")
    try:
        host, port = parse_host_port(listen, "--listen")
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    options = NodeOptions(
        host=host,
        port=port,
        advertise=advertise,
        zone=zone,
        tls_cert=tls_cert,
        tls_key=tls_key,
        capacity_bytes=capacity,
        reclaim_interval=reclaim_interval,
        max_connections=max_connections,
    )
    try:
        run_node(dsn, data_dir, options)
    except errors.ChunkfsError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@_dsn_option()
@click.argument("mountpoint")
@click.option("-f", "--foreground", is_flag=True, help="Stay in the foreground.")
@click.option("-o", "options", multiple=True, metavar="OPT[,OPT...]", help="Mount options.")
def mount(dsn: str, mountpoint: str, foreground: bool, options: tuple[str, ...]) -> None:
    """Mount the filesystem at MOUNTPOINT (returns once it is ready, unless -f)."""
    from .fuse.mount import mount as do_mount
    from .fuse.mount import parse_options

    try:
        opts = parse_options(list(options), is_root=os.geteuid() == 0)
        do_mount(dsn, mountpoint, opts, foreground=foreground)
    except errors.ChunkfsError as exc:
        raise click.ClickException(str(exc)) from None


class _ServeByDefault(click.Group):
    """A group whose first argument, when it names no subcommand, starts
    the ``serve`` subcommand (``chunkfs gateway DSN ...``).
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Click's parsing, with ``serve`` put first when no subcommand is named."""
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["serve", *args]
        return super().parse_args(ctx, args)


@cli.group(cls=_ServeByDefault)
def gateway() -> None:
    """Serve the filesystem over S3 (gateway DSN --listen HOST:PORT, the
    same as gateway serve DSN ...; its options: gateway serve --help), or
    manage its access keys (gateway key add / list / remove).
    """


@gateway.command()
@_dsn_option()
@click.option(
    "--listen", default="127.0.0.1:9000", show_default=True, help="HOST:PORT to serve on."
)
@click.option("--tls-cert", type=click.Path(dir_okay=False), help="Serve HTTPS: certificate (PEM).")
@click.option("--tls-key", type=click.Path(dir_okay=False), help="The certificate's key (PEM).")
@click.option(
    "--region", default="us-east-1", show_default=True, help="The region clients sign for."
)
@click.option("--domain", help="Also take virtual-hosted requests (BUCKET.DOMAIN).")
@click.option(
    "--upload-ttl",
    type=click.FloatRange(1),
    default=24 * 3600,
    show_default=True,
    help="Seconds a multipart upload lives past its last part.",
)
@click.option(
    "--max-connections", type=click.IntRange(1), default=512, show_default=True,
    help="Connections served at once; more are closed.",
)  # fmt: skip
@click.option("--spool-dir", type=click.Path(file_okay=False), help="Where uploads are spooled.")
def serve(
    dsn: str,
    listen: str,
    tls_cert: str | None,
    tls_key: str | None,
    region: str,
    domain: str | None,
    upload_ttl: float,
    max_connections: int,
    spool_dir: str | None,
) -> None:
    """Serve S3 until SIGTERM: buckets are the root's directories."""
    from .gateway.server import GatewayOptions, run_gateway
    from .wire import parse_host_port

    try:
        host, port = parse_host_port(listen, "--listen")
        run_gateway(
            dsn,
            GatewayOptions(
                host=host, port=port, tls_cert=tls_cert, tls_key=tls_key, region=region,
                domain=domain, upload_ttl_s=upload_ttl, max_connections=max_connections,
                spool_dir=spool_dir,
            ),
        )  # fmt: skip
    except (ValueError, errors.ChunkfsError) as exc:
        raise click.ClickException(str(exc)) from None


@gateway.group()
def key() -> None:
    """The gateway's access keys: each acts as a uid/gid."""


@key.command("add")
@_dsn_option()
@click.option("--uid", type=click.IntRange(0), required=True, help="User id requests act as.")
@click.option("--gid", type=click.IntRange(0), required=True, help="Group id requests act as.")
@click.option("--name", default="", help="A label for the key.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def key_add(dsn: str, uid: int, gid: int, name: str, as_json: bool) -> None:
    """Make an access key; print its id and secret (shown only now)."""
    made = _run(_with_meta, dsn, lambda meta: meta.objects.add_key(uid, gid, name))
    if as_json:
        click.echo(json.dumps({"access_key_id": made.access_key_id, "secret": made.secret}))
        return
    click.echo(f"access key id      {made.access_key_id}")
    click.echo(f"secret access key  {made.secret}")


@key.command("list")
@_dsn_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def key_list(dsn: str, as_json: bool) -> None:
    """List the access keys (not their secrets)."""
    keys = _run(_with_meta, dsn, lambda meta: meta.objects.keys())
    rows = [
        {"access_key_id": k.access_key_id, "uid": k.uid, "gid": k.gid, "name": k.name,
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(k.created_s))}
        for k in keys
    ]  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(f"{'access key id':20}  {'uid':>8}  {'gid':>8}  {'created':20}  name")
    for r in rows:
        click.echo(
            f"{r['access_key_id']:20}  {r['uid']:>8}  {r['gid']:>8}  {r['created']:20}  {r['name']}"
        )


@key.command("remove")
@_dsn_option()
@click.argument("access_key_id")
def key_remove(dsn: str, access_key_id: str) -> None:
    """Remove an access key: requests signed with it fail from then on."""
    _run(_with_meta, dsn, lambda meta: meta.objects.remove_key(access_key_id))
    click.echo(f"removed {access_key_id}")


@cli.command()
@_dsn_option()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(dsn: str, as_json: bool) -> None:
    """Show the storage nodes: zone, heartbeat age, space, chunk counts, URL."""
    from .admin.stats import cluster_status

    report = _run(_with_meta, dsn, cluster_status)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    s = report["settings"]
    click.echo(
        f"replicas {s['replicas']}, max file size {s['max_file_size']} bytes, "
        f"{report['files']} files, {report['bytes']} bytes"
    )
    zone_width = max([4, *(len(n["zone"]) for n in report["nodes"])])
    click.echo(
        f"{'node':16}  {'zone':{zone_width}}  {'status':15}  {'heartbeat':>9}  {'used':>14}  "
        f"{'free':>16}  {'chunks':>8}  url"
    )
    for n in report["nodes"]:
        state = n["status"] + (",draining" if n["draining"] else "")
        click.echo(
            f"{n['id']:16}  {n['zone']:{zone_width}}  {state:15}  {n['heartbeat_age_s']:8.1f}s  "
            f"{n['used_bytes']:>14}  {n['free_bytes']:>16}  {n['chunks']:>8}  {n['url']}"
        )


@cli.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=True))
@click.option(
    "--dsn",
    envvar="CHUNKFS_DSN",
    default=None,
    help="DSN (default: the one the mount holding PATH was made with).",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: str, dsn: str | None, as_json: bool) -> None:
    """Show a file's inode, size, digest and its six chunks with their nodes."""
    from .admin.stats import file_info, mount_dsn

    try:
        dsn = dsn or mount_dsn(path)
    except errors.ChunkfsError as exc:
        raise click.ClickException(str(exc)) from None
    ino = os.lstat(path).st_ino
    report = _run(_with_meta, dsn, lambda meta: file_info(meta, ino))
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(f"inode {report['ino']}  size {report['size']}  version {report['version']}")
    click.echo(f"digest {report['digest']}")
    for c in report["chunks"]:
        where = "a hole (zeros, stored nowhere)" if c["hole"] else "on " + ", ".join(c["nodes"])
        click.echo(
            f"  chunk {c['index']}  offset {c['offset']:>12}  length {c['length']:>12}  "
            f"{(c['sha256'] or '-')[:16]}…  {where}"
        )


_STATS_COLUMNS = (
    ("fuse/s", "fuse_per_s"),
    ("fuse ms", "fuse_ms"),
    ("err/s", "errors_per_s"),
    ("pg/s", "pg_per_s"),
    ("node/s", "node_per_s"),
    ("fail/s", "node_failures_per_s"),
    ("up MiB/s", "up_mib_s"),
    ("down MiB/s", "down_mib_s"),
    ("commit/s", "commits_per_s"),
    ("commit ms", "commit_ms"),
    ("cache hit%", "cache_hit_pct"),
    ("spool MiB", "spool_mib"),
)


@cli.command()
@click.argument("mountpoint", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--interval", default=1.0, show_default=True, type=click.FloatRange(0.1), help="Seconds."
)
@click.option("--count", type=click.IntRange(1), help="Lines to print (default: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def stats(mountpoint: str, interval: float, count: int | None, as_json: bool) -> None:
    """What the mount at MOUNTPOINT does, every --interval seconds: FUSE
    requests and their latency, PostgreSQL round trips, node requests and
    bytes, commits, content-cache hits, spool size (the mount needs
    -o metrics=HOST:PORT).
    """
    import time

    from .admin.stats import mount_rates, sample_mount
    from .metrics import mount_address

    try:
        address = mount_address(mountpoint)
        before = sample_mount(address)
        for line in range(count or 1 << 62):
            time.sleep(interval)
            after = sample_mount(address)
            rates = mount_rates(before, after)
            before = after
            if as_json:
                click.echo(json.dumps(rates))
                continue
            if line % 20 == 0:
                click.echo("  ".join(f"{title:>10}" for title, _ in _STATS_COLUMNS) + "  top")
            cells = ["-" if rates[key] is None else rates[key] for _, key in _STATS_COLUMNS]
            top = " ".join(f"{op}:{rate:g}" for op, rate in rates["top"].items())
            click.echo("  ".join(f"{c:>10}" for c in cells) + f"  {top}")
    except errors.ChunkfsError as exc:
        raise click.ClickException(str(exc)) from None


@cli.command()
@_dsn_option()
def gc(dsn: str) -> None:
    """Remove expired upload sessions and chunks nothing references."""
    from .admin.gc import collect

    report = _run(_with_meta, dsn, collect)
    click.echo(
        f"upload sessions closed or expired {report.sessions}, chunks deleted {report.deleted}, "
        f"kept {report.kept}, nodes unreachable {report.unreachable}"
    )
    if report.unreachable:
        sys.exit(1)


def _progress(label: str) -> Any:
    """A progress bar on standard error when it is a terminal (tqdm), else none."""
    from tqdm import tqdm

    return tqdm(desc=label, unit=" chunks", disable=None, leave=False, file=sys.stderr)


@cli.command()
@_dsn_option()
@click.option("--verify", is_flag=True, help="Also read and hash every replica.")
@click.option("--limit", default=50, show_default=True, help="Problems printed at most.")
def fsck(dsn: str, verify: bool, limit: int) -> None:
    """Check the metadata invariants and every replica; exit 1 on a problem."""
    from .admin.fsck import check

    with _progress("fsck") as bar:
        report = _run(_with_meta, dsn, lambda meta: check(meta, verify=verify, progress=bar))
    for line in report.warnings[:limit]:
        click.echo(f"warning: {line}")
    for line in report.problems[:limit]:
        click.echo(f"problem: {line}")
    if len(report.problems) > limit:
        click.echo(f"... and {len(report.problems) - limit} more problems")
    click.echo(
        f"{report.inodes} files, {report.objects} chunk objects, {report.replicas} good replicas"
        f"{' (hashed)' if verify else ''}; {report.under_replicated} under-replicated, "
        f"{report.lost} lost, {report.zone_shared} sharing a zone, {report.over_replicated} "
        f"over-replicated; {len(report.problems)} problems, {len(report.warnings)} warnings: "
        + ("clean" if report.clean else "NOT clean (see chunkfs repair)")
    )
    if not report.clean:
        sys.exit(1)


def _move(verb: str, dsn: str, fn: Callable[..., Awaitable[Any]]) -> None:
    """Run repair / rebalance with a progress bar, print the summary, exit 1 if not ok."""
    with _progress(verb) as bar:
        report = _run(_with_meta, dsn, lambda meta: fn(meta, progress=bar))
    _move_summary(verb, report)


def _move_summary(verb: str, report: Any) -> None:
    click.echo(
        f"{verb}: {report.objects} chunk objects, {report.copied} replicas copied, "
        f"{report.dropped} dropped; {report.short} still under-replicated, {report.lost} lost, "
        f"{report.unlisted} nodes unreachable"
    )
    if not report.ok:
        sys.exit(1)


@cli.command()
@_dsn_option()
def repair(dsn: str) -> None:
    """Bring every chunk back to R good replicas (reads and hashes every replica)."""
    from .admin.replicas import repair as do_repair

    _move("repair", dsn, do_repair)


@cli.command()
@_dsn_option()
def rebalance(dsn: str) -> None:
    """Move replicas to their ring owners after nodes joined or left."""
    from .admin.replicas import rebalance as do_rebalance

    _move("rebalance", dsn, do_rebalance)


@node.command()
@_dsn_option()
@click.argument("node_id", required=False)
@click.option("--zone", help="Drain every node of this zone.")
def drain(dsn: str, node_id: str | None, zone: str | None) -> None:
    """Move every replica off NODE_ID (or off every node of --zone) so that
    it can be removed.
    """
    from .admin.replicas import drain as do_drain

    if (node_id is None) == (zone is None):
        raise click.UsageError("give a NODE_ID or --zone, not both")

    async def body(meta: Meta) -> Any:
        if node_id is not None:
            nodes = [node_id]
        else:
            nodes = [n.node_id for n in await meta.registry.nodes() if n.zone == zone]
            if not nodes:
                raise errors.NotFound(f"no storage node in zone {zone}")
        return nodes, await do_drain(meta, nodes, progress=bar)

    with _progress("drain") as bar:
        drained, report = _run(_with_meta, dsn, body)
    names = ", ".join(drained)
    if report.left:
        click.echo(f"nodes {names} still hold {report.left} chunk replicas files use")
    _move_summary("drain", report)
    if report.left:
        sys.exit(1)
    click.echo(f"drained {names}: `chunkfs node remove` may remove them")


@node.command()
@_dsn_option()
@click.argument("node_id")
@click.option("--force", is_flag=True, help="Remove a live node that was not drained.")
def remove(dsn: str, node_id: str, force: bool) -> None:
    """Unregister NODE_ID (refused while it is live and not drained, unless
    --force, and while it holds the only copy of a chunk). Stop its process
    afterwards: a restart would register it again.
    """
    short = _run(_with_meta, dsn, lambda meta: meta.registry.remove_node(node_id, force=force))
    click.echo(f"node {node_id} removed; stop its process")
    if short:
        click.echo(
            f"warning: {short} chunks have fewer than R replicas now: run `chunkfs repair` "
            f"(or `chunkfs node drain` before removing a node)"
        )


@node.command()
@_dsn_option()
@click.argument("node_id")
def undrain(dsn: str, node_id: str) -> None:
    """Let NODE_ID take new replicas again (undoes `node drain`)."""
    _run(_with_meta, dsn, lambda meta: meta.registry.set_draining(node_id, False))
    click.echo(f"node {node_id} takes new replicas again (`chunkfs rebalance` moves some back)")


def _hide_passwords(args: list[str]) -> None:
    """Keep a password given in a DSN out of the process title (``ps``,
    /proc/PID/cmdline): better still, give it in PGPASSFILE or PGPASSWORD.
    """
    shown = [redact_dsn(a) for a in args]
    if shown != args:
        from setproctitle import setproctitle

        setproctitle(" ".join(["chunkfs", *shown]))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``chunkfs`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    _hide_passwords(args)
    # mount(8) runs "chunkfs DSN MOUNTPOINT -o OPTS": that is a mount.
    if args and args[0] not in cli.commands and not args[0].startswith("-"):
        args.insert(0, "mount")
    try:
        cli.main(args=args, prog_name="chunkfs", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("chunkfs: error: aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"chunkfs: error: {exc.format_message()}", err=True)
        sys.exit(exc.exit_code)
