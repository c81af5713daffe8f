"""scripts/bench end to end, at a tiny size: it sets up a real cluster and a
mount, runs every workload on a local directory and on chunkfs, and prints
and writes every figure and ratio (the figures themselves are not judged).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


def test_bench_runs_every_workload_on_local_and_chunkfs(tmp_path, fuse_ready):
    tree = tmp_path / "tree"
    for d in range(3):
        (tree / f"d{d}").mkdir(parents=True)
        for i in range(5):
            (tree / f"d{d}" / f"f{i}.h").write_text(f"/* {d} {i} */\n" * (i + 1))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--runs",
            "1",
            "--size-mib",
            "8",
            "--fio-mib",
            "8",
            "--dirs",
            "2",
            "--files",
            "10",
            "--tree",
            str(tree),
            "--workdir",
            str(tmp_path),
            "--json",
            str(out),
            "--stress-seconds",
            "3",
            "--stress-settle",
            "0",
            "--stress-max-file-mib",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    workloads = {
        "write",
        "read_warm",
        "read",
        "randread_warm_iops",
        "randread_iops",
        "randread_p50",
        "randread_p99",
        "cp_small",
        "rsync_small",
        "ls_lR",
        "find",
        "rm_rf",
        "cp_tree",
        "diff_tree_warm",
        "diff_tree",
    }
    for target in ("local", "chunkfs"):
        figures = report["figures"][target]
        assert workloads <= set(figures), set(figures)
        assert all(figures[w] > 0 for w in workloads), figures
    chunkfs = report["figures"]["chunkfs"]
    assert chunkfs["write_rss"] > 0  # the mount was sampled
    assert chunkfs["write_cpu_per_gib"] > 0 and chunkfs["read_cpu_per_gib"] > 0
    for figure in ("cp_small_cpu_ms", "cp_small_db_cpu_ms", "cp_tree_cpu_ms", "cp_tree_db_cpu_ms"):
        assert chunkfs[figure] > 0, (figure, chunkfs)
    # Each file of R = 2 reaches two nodes; its create and its commit are
    # statements of their own.
    assert 2 <= chunkfs["node_requests_per_file"] < 20, chunkfs
    assert 2 <= chunkfs["pg_round_trips_per_file"] < 20, chunkfs
    for target in ("local", "chunkfs"):
        figures = report["figures"][target]
        assert figures["stress_ops"] > 0, figures
        assert figures["stress_errors"] == 0, figures
    assert chunkfs["stress_nodes_in_mib"] > 0, chunkfs
    assert chunkfs["stress_nodes_disk_mib"] > 0, chunkfs
    assert chunkfs["stress_nodes_disk_after_gc_mib"] <= chunkfs["stress_nodes_disk_mib"], chunkfs
    assert set(report["ratios"]) >= workloads
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("chunkfs ")]
    assert {fields[1] for fields in lines} >= workloads
    assert not list(tmp_path.glob("chunkfs-bench-*")), "the bench left its temp dir"
