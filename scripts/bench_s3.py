"""The S3 workloads of ``scripts/bench --gateway``: the same requests, from
the same boto3 clients, to chunkfs's gateway and to SeaweedFS's ``weed s3``.

1. ``s3_put_big`` / ``s3_get_big``: ``upload_file`` / ``download_file`` of
   the big input file as one object (boto3's transfer manager: 8 MiB parts,
   10 at once, as ``aws s3 cp`` does) (MiB/s); the GET after the page cache
   is dropped (the gateway keeps no content cache: every byte comes from the
   nodes);
2. ``s3_put_small`` / ``s3_get_small``: PUT then GET of the small input
   files (2,000 of 4 KiB by default), ``CONCURRENCY`` requests at once
   (objects/s).

Every object is deleted and the bucket removed at the end of a run.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

MiB = 1 << 20
CONCURRENCY = 8
UNITS = {
    "s3_put_big": ("MiB/s", True),
    "s3_get_big": ("MiB/s", True),
    "s3_put_small": ("objects/s", True),
    "s3_get_small": ("objects/s", True),
}


@dataclass(frozen=True)
class Endpoint:
    """An S3 endpoint and the access key the benchmark uses there."""

    url: str
    key_id: str
    secret: str

    def client(self) -> Any:
        """A boto3 client (path-style, a connection per concurrent request)."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.key_id,
            aws_secret_access_key=self.secret,
            region_name="us-east-1",
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                max_pool_connections=CONCURRENCY + 2,
            ),
        )


def _files(tree: Path) -> list[Path]:
    return sorted(p for p in tree.rglob("*") if p.is_file())


def one_run(
    endpoint: Endpoint,
    big: Path,
    small_tree: Path,
    scratch: Path,
    drop_caches: Callable[[], None],
    put: Callable[[str, float], None],
) -> None:
    """Every S3 workload once at ``endpoint``; ``put(figure, value)`` records
    each figure. ``scratch`` takes the downloaded copy (removed after).
    """
    s3 = endpoint.client()
    bucket = f"bench-{os.urandom(4).hex()}"
    s3.create_bucket(Bucket=bucket)
    try:
        size = big.stat().st_size
        transfer = TransferConfig(multipart_chunksize=8 * MiB, max_concurrency=10)
        drop_caches()
        t0 = time.perf_counter()
        s3.upload_file(str(big), bucket, "big", Config=transfer)
        put("s3_put_big", size / MiB / (time.perf_counter() - t0))
        copy = scratch / "big.download"
        drop_caches()
        t0 = time.perf_counter()
        s3.download_file(bucket, "big", str(copy), Config=transfer)
        put("s3_get_big", size / MiB / (time.perf_counter() - t0))
        copy.unlink()
        small = _files(small_tree)
        keys = [str(p.relative_to(small_tree)) for p in small]
        payloads = [p.read_bytes() for p in small]

        def put_one(i: int) -> None:
            s3.put_object(Bucket=bucket, Key=keys[i], Body=payloads[i])

        def get_one(i: int) -> bytes:
            return bytes(s3.get_object(Bucket=bucket, Key=keys[i])["Body"].read())

        with concurrent.futures.ThreadPoolExecutor(CONCURRENCY) as pool:
            t0 = time.perf_counter()
            list(pool.map(put_one, range(len(keys))))
            put("s3_put_small", len(keys) / (time.perf_counter() - t0))
            drop_caches()
            t0 = time.perf_counter()
            got = list(pool.map(get_one, range(len(keys))))
            put("s3_get_small", len(keys) / (time.perf_counter() - t0))
        if got != payloads:
            raise RuntimeError(f"{endpoint.url}: small objects read back differ")
    finally:
        _empty(s3, bucket)


def _empty(s3: Any, bucket: str) -> None:
    """Delete every object of ``bucket``, then the bucket."""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
    s3.delete_bucket(Bucket=bucket)


def weed_identities(key_id: str, secret: str) -> dict[str, Any]:
    """``weed s3 -config``'s identities: one admin with this key."""
    return {
        "identities": [
            {
                "name": "bench",
                "credentials": [{"accessKey": key_id, "secretKey": secret}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
