"""A highly available PostgreSQL to try chunkfs on: three PostgreSQL
instances under Patroni over a three-member etcd cluster, synchronous
replication, all on 127.0.0.1 (``tests/patroni.py``, with the settings
README.md documents for a real deployment).

Prints the DSN that lists the three hosts (for ``chunkfs mkfs``, mounts,
nodes, the gateway) and each member's address, REST API, data directory,
Patroni configuration (for ``patronictl -c``) and postmaster pid at start
(after a failover, a member's ``DATA/postmaster.pid`` has the current one),
and the ``patronictl`` commands for this cluster, then
serves until Ctrl-C or SIGTERM (or ``--for SECONDS``), and stops and
removes everything it started. Exit status: 0 stopped as asked, 2 the
cluster did not come up.

Run it through ``scripts/pg-ha``, which installs what is missing first.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cluster as cl
from patroni import PATRONI_BIN, PatroniCluster


class _Stop(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--database", default="chunkfs", help="database to create (chunkfs)")
    parser.add_argument("--for", dest="seconds", type=float, help="stop after SECONDS")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    args = parser.parse_args()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    ha = PatroniCluster()
    try:
        try:
            ha.start()
            cl.run_sql(ha.dsn, f'CREATE DATABASE "{args.database}"')
        except cl.ClusterError as exc:
            print(f"pg-ha: {exc}", file=sys.stderr)
            return 2
        roles = ha.roles()
        members: list[dict[str, Any]] = [
            {
                "name": m.name,
                "postgres": f"{m.address}:{m.pg_port}",
                "rest_api": m.api_url,
                "etcd": m.etcd_url,
                "role": roles.get(m.name, "?"),
                "data_dir": str(m.data_dir),
                "patroni_config": str(m.config_path),
                "postmaster_pid": m.postmaster_pid(),
            }
            for m in ha.members
        ]
        dsn = ha.dsn_for(args.database)
        if args.json:
            described = {
                "dsn": dsn,
                "scope": ha.scope,
                "patronictl": str(PATRONI_BIN / "patronictl"),
                "members": members,
            }
            print(json.dumps(described, indent=1), flush=True)
        else:
            print(f"DSN: {dsn}")
            for m in members:
                print(
                    f"{m['name']}: {m['role']:24} postgres {m['postgres']}  "
                    f"api {m['rest_api']}  pid {m['postmaster_pid']}\n"
                    f"     data {m['data_dir']}  config {m['patroni_config']}"
                )
            ctl = f"{PATRONI_BIN / 'patronictl'} -c {members[0]['patroni_config']}"
            print(f"{ctl} list")
            print(f"{ctl} switchover {ha.scope} --leader NAME --candidate NAME --force")
            print("Ctrl-C stops it.", flush=True)
        deadline = time.monotonic() + args.seconds if args.seconds else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.5)
        return 0
    except _Stop:
        return 0
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ha.stop()


if __name__ == "__main__":
    sys.exit(main())
