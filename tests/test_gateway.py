"""The S3 gateway, end to end: a real gateway process over a real cluster
(PostgreSQL, six nodes), driven by real S3 clients (boto3, the AWS CLI,
s3cmd) and checked through a FUSE mount of the same filesystem.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import unquote_plus

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

import cluster as cl
from chunkfs.meta.maintenance import SESSION_GRACE_S
from hosts import make_certificates

MIB = 1 << 20


@dataclass(frozen=True)
class Key:
    """An access key: its id and secret."""

    key_id: str
    secret: str


@dataclass(frozen=True)
class Gateway:
    """A running gateway and the keys made for the tests: ``admin`` acts as
    root, ``user`` as uid/gid 1000.
    """

    process: cl.GatewayProcess
    dsn: str
    admin: Key
    user: Key

    @property
    def url(self) -> str:
        return self.process.url


def add_key(dsn: str, uid: int, gid: int) -> Key:
    made = cl.chunkfs_json(
        "gateway", "key", "add", dsn, "--uid", str(uid), "--gid", str(gid), "--json"
    )
    return Key(made["access_key_id"], made["secret"])


@pytest.fixture(scope="module")
def gateway(cluster: cl.Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    log_path = tmp_path_factory.mktemp("gateway") / "gateway.log"
    process = cl.GatewayProcess(cluster.dsn, log_path).start()
    try:
        yield Gateway(
            process, cluster.dsn, add_key(cluster.dsn, 0, 0), add_key(cluster.dsn, 1000, 1000)
        )
    finally:
        assert process.stop() == 0
        text = log_path.read_text()
        assert "Traceback" not in text, text[-3000:]


def client(gw: Gateway, key: Key | None = None, *, verify: str | None = None, **config: Any) -> Any:
    """A boto3 S3 client of the gateway, path-style, no retries (``verify``:
    the CA file for an HTTPS gateway).
    """
    key = key or gw.admin
    return boto3.client(
        "s3",
        endpoint_url=gw.url,
        aws_access_key_id=key.key_id,
        aws_secret_access_key=key.secret,
        region_name="us-east-1",
        verify=verify,
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config),
    )


def error_code(call: Any, *args: Any, **kwargs: Any) -> str:
    """The S3 error code a boto3 call fails with."""
    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    return str(caught.value.response["Error"]["Code"])


@pytest.fixture
def s3(gateway: Gateway) -> Any:
    return client(gateway)


@pytest.fixture
def bucket(s3: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new bucket, emptied and removed afterwards."""
    name = (
        "b-"
        + request.node.name.lower().replace("_", "-")[:40].strip("-")
        + "-"
        + os.urandom(3).hex()
    )
    s3.create_bucket(Bucket=name)
    yield name
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=name):
        for o in page.get("Contents", []):
            s3.delete_object(Bucket=name, Key=o["Key"])
    s3.delete_bucket(Bucket=name)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# ------------------------------------------------------------------ buckets


def test_bucket_lifecycle(gateway: Gateway, s3: Any) -> None:
    name = "life-" + os.urandom(4).hex()
    assert error_code(s3.head_bucket, Bucket=name) == "404"
    s3.create_bucket(Bucket=name)
    assert name in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    s3.head_bucket(Bucket=name)
    assert s3.get_bucket_location(Bucket=name).get("LocationConstraint") in (None, "")
    assert error_code(s3.create_bucket, Bucket=name) == "BucketAlreadyOwnedByYou"
    s3.put_object(Bucket=name, Key="x", Body=b"1")
    assert error_code(s3.delete_bucket, Bucket=name) == "BucketNotEmpty"
    s3.delete_object(Bucket=name, Key="x")
    s3.delete_bucket(Bucket=name)
    assert error_code(s3.head_bucket, Bucket=name) == "404"
    assert error_code(s3.list_objects_v2, Bucket=name) == "NoSuchBucket"
    for bad in ("Not_Valid", "192.168.5.123", "a.-b", "ab", "-ab"):
        assert error_code(s3.create_bucket, Bucket=bad) == "InvalidBucketName"


# ------------------------------------------------------------------ objects


def test_put_get_head_with_metadata(s3: Any, bucket: str) -> None:
    data = os.urandom(3 * MIB + 17)
    put = s3.put_object(
        Bucket=bucket, Key="dir/sub/blob.bin", Body=data, ContentType="application/x-test",
        Metadata={"colour": "blue"}, CacheControl="no-cache",
    )  # fmt: skip
    assert put["ETag"] == f'"{md5_hex(data)}"'
    got = s3.get_object(Bucket=bucket, Key="dir/sub/blob.bin")
    assert got["Body"].read() == data
    assert got["ContentType"] == "application/x-test"
    assert got["Metadata"] == {"colour": "blue"}
    assert got["CacheControl"] == "no-cache"
    assert got["ETag"] == put["ETag"]
    head = s3.head_object(Bucket=bucket, Key="dir/sub/blob.bin")
    assert head["ContentLength"] == len(data)
    assert error_code(s3.get_object, Bucket=bucket, Key="dir/missing") == "NoSuchKey"
    assert error_code(s3.head_object, Bucket=bucket, Key="dir/missing") == "404"
    empty = s3.put_object(Bucket=bucket, Key="empty", Body=b"")
    assert empty["ETag"] == f'"{md5_hex(b"")}"'
    assert s3.get_object(Bucket=bucket, Key="empty")["Body"].read() == b""


def test_overwrite_and_content_md5(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="k", Body=b"old")
    s3.put_object(Bucket=bucket, Key="k", Body=b"new bytes")
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"new bytes"
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    assert (
        error_code(s3.put_object, Bucket=bucket, Key="k", Body=b"third", ContentMD5=wrong)
        == "BadDigest"
    )
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"new bytes"
    right = base64.b64encode(hashlib.md5(b"third").digest()).decode()
    s3.put_object(Bucket=bucket, Key="k", Body=b"third", ContentMD5=right)
    assert s3.get_object(Bucket=bucket, Key="k")["Body"].read() == b"third"


def test_ranges_and_conditions(s3: Any, bucket: str) -> None:
    data = os.urandom(100_000)
    etag = s3.put_object(Bucket=bucket, Key="r", Body=data)["ETag"]
    part = s3.get_object(Bucket=bucket, Key="r", Range="bytes=10-19")
    assert part["Body"].read() == data[10:20]
    assert part["ContentRange"] == f"bytes 10-19/{len(data)}"
    assert s3.get_object(Bucket=bucket, Key="r", Range="bytes=-5")["Body"].read() == data[-5:]
    assert (
        s3.get_object(Bucket=bucket, Key="r", Range="bytes=99990-")["Body"].read() == data[99990:]
    )
    assert (
        error_code(s3.get_object, Bucket=bucket, Key="r", Range="bytes=200000-") == "InvalidRange"
    )
    assert s3.get_object(Bucket=bucket, Key="r", IfMatch=etag)["Body"].read() == data
    assert error_code(s3.get_object, Bucket=bucket, Key="r", IfMatch='"0"') == "PreconditionFailed"
    assert error_code(s3.get_object, Bucket=bucket, Key="r", IfNoneMatch=etag) == "304"
    modified = s3.head_object(Bucket=bucket, Key="r")["LastModified"]
    assert error_code(s3.get_object, Bucket=bucket, Key="r", IfModifiedSince=modified) == "304"
    before = modified.replace(year=modified.year - 1)
    assert (
        error_code(s3.get_object, Bucket=bucket, Key="r", IfUnmodifiedSince=before)
        == "PreconditionFailed"
    )
    assert s3.get_object(Bucket=bucket, Key="r", IfModifiedSince=before)["Body"].read() == data
    over = s3.get_object(
        Bucket=bucket,
        Key="r",
        ResponseContentType="text/plain",
        ResponseContentDisposition="attachment",
    )
    assert over["ContentType"] == "text/plain" and over["ContentDisposition"] == "attachment"


def test_delete_and_delete_objects(s3: Any, bucket: str) -> None:
    for key in ("a/1", "a/2", "a/b/3", "top"):
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    s3.delete_object(Bucket=bucket, Key="a/b/3")
    s3.delete_object(Bucket=bucket, Key="never-there")  # S3 answers 204 all the same
    listed = s3.list_objects_v2(Bucket=bucket, Delimiter="/", Prefix="a/")
    assert [p["Prefix"] for p in listed.get("CommonPrefixes", [])] == []  # a/b/ left empty: gone
    done = s3.delete_objects(
        Bucket=bucket, Delete={"Objects": [{"Key": "a/1"}, {"Key": "a/2"}, {"Key": "nope"}]}
    )
    assert sorted(d["Key"] for d in done["Deleted"]) == ["a/1", "a/2", "nope"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]] == ["top"]


def test_a_key_cannot_put_a_file_where_a_directory_is(s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="d/f", Body=b"x")
    assert error_code(s3.put_object, Bucket=bucket, Key="d", Body=b"y") == "ObjectConflict"
    assert error_code(s3.put_object, Bucket=bucket, Key="d/f/g", Body=b"y") == "ObjectConflict"
    assert error_code(s3.put_object, Bucket=bucket, Key="a//b", Body=b"y") == "InvalidArgument"
    assert s3.get_object(Bucket=bucket, Key="d/f")["Body"].read() == b"x"


# ------------------------------------------------------------------ listing


def test_listing(s3: Any, bucket: str) -> None:
    keys = sorted(
        ["a-b", "a/x", "a/y/z", "a0", "b/c", "b/d/e", "c", "é/ü", "sp ace/k+ey"], key=str.encode
    )
    assert keys[:4] == ["a-b", "a/x", "a/y/z", "a0"]  # S3 order: by UTF-8 bytes
    for key in keys:
        s3.put_object(Bucket=bucket, Key=key, Body=key.encode())
    whole = s3.list_objects_v2(Bucket=bucket)
    assert [o["Key"] for o in whole["Contents"]] == keys
    assert whole["KeyCount"] == len(keys) and not whole["IsTruncated"]
    assert {o["ETag"] for o in whole["Contents"]} == {f'"{md5_hex(k.encode())}"' for k in keys}
    rolled = s3.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [o["Key"] for o in rolled["Contents"]] == ["a-b", "a0", "c"]
    assert [p["Prefix"] for p in rolled["CommonPrefixes"]] == ["a/", "b/", "sp ace/", "é/"]
    inner = s3.list_objects_v2(Bucket=bucket, Delimiter="/", Prefix="b/")
    assert [o["Key"] for o in inner["Contents"]] == ["b/c"]
    assert [p["Prefix"] for p in inner["CommonPrefixes"]] == ["b/d/"]
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="a")["Contents"]] == keys[:4]
    assert [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, StartAfter="b/c")["Contents"]
    ] == keys[keys.index("b/c") + 1 :]
    pages = list(
        s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 2}
        )
    )
    assert [o["Key"] for p in pages for o in p["Contents"]] == keys
    assert len(pages) == 5
    v1 = list(
        s3.get_paginator("list_objects").paginate(Bucket=bucket, PaginationConfig={"PageSize": 3})
    )
    assert [o["Key"] for p in v1 for o in p["Contents"]] == keys
    encoded = s3.list_objects_v2(Bucket=bucket, EncodingType="url", Prefix="sp")
    assert [unquote_plus(o["Key"]) for o in encoded["Contents"]] == ["sp ace/k+ey"]
    assert "%2B" in encoded["Contents"][0]["Key"]
    none = s3.list_objects_v2(Bucket=bucket, MaxKeys=0)
    assert none["KeyCount"] == 0 and not none["IsTruncated"]
    owner = s3.list_objects_v2(Bucket=bucket, FetchOwner=True, MaxKeys=1)
    assert owner["Contents"][0]["Owner"]["ID"] == "0" and owner["IsTruncated"]


# ------------------------------------------------------------ both doors


def test_objects_and_files_are_the_same(
    gateway: Gateway, s3: Any, bucket: str, mounted: cl.Mount
) -> None:
    data = os.urandom(2 * MIB + 5)
    s3.put_object(
        Bucket=bucket, Key="in/s3.bin", Body=data, ContentType="image/png", Metadata={"k": "v"}
    )
    path = Path(mounted.path) / bucket / "in" / "s3.bin"
    assert path.read_bytes() == data
    assert os.getxattr(path, "user.mime_type") == b"image/png"
    assert os.getxattr(path, "user.k") == b"v"
    info = cl.chunkfs_json("info", str(path), "--json")
    assert len(info["chunks"]) == 6
    mine = os.urandom(700_000)
    (Path(mounted.path) / bucket / "in" / "mount.bin").write_bytes(mine)
    os.setxattr(Path(mounted.path) / bucket / "in" / "mount.bin", "user.origin", b"mount")
    got = s3.get_object(Bucket=bucket, Key="in/mount.bin")
    assert got["Body"].read() == mine
    assert got["ETag"] == f'"{md5_hex(mine)}"'
    assert got["Metadata"] == {"origin": "mount"}
    listed = s3.list_objects_v2(Bucket=bucket, Prefix="in/")
    assert {o["Key"]: o["ETag"] for o in listed["Contents"]} == {
        "in/mount.bin": f'"{md5_hex(mine)}"', "in/s3.bin": f'"{md5_hex(data)}"',
    }  # fmt: skip
    # A change through the mount changes the ETag the next request sees.
    with open(Path(mounted.path) / bucket / "in" / "mount.bin", "r+b") as f:
        f.write(b"CHANGED")
    changed = b"CHANGED" + mine[7:]
    assert s3.head_object(Bucket=bucket, Key="in/mount.bin")["ETag"] == f'"{md5_hex(changed)}"'


def cluster_token(cluster: cl.Cluster) -> str:
    return str(cl.run_sql(cluster.dsn, "SELECT cluster_token FROM settings")[0][0]["cluster_token"])


def holders(cluster: cl.Cluster, chunk_hex: str) -> int:
    """How many of the cluster's nodes hold the chunk (HEAD on each)."""
    count = 0
    for node in cluster.nodes:
        request = urllib.request.Request(
            f"{node.url}/v1/chunks/{chunk_hex}", method="HEAD",
            headers={"Authorization": f"Bearer {cluster_token(cluster)}"},
        )  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=10):
                count += 1
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
    return count


def node_received(cluster: cl.Cluster) -> float:
    """Body bytes the cluster's nodes have received so far."""
    return cl.node_body_bytes([n.url for n in cluster.nodes], cluster_token(cluster))


def test_copy_object_shares_chunks(
    cluster: cl.Cluster, s3: Any, bucket: str, mounted: cl.Mount
) -> None:
    data = os.urandom(3 * MIB)
    etag = s3.put_object(Bucket=bucket, Key="src", Body=data, Metadata={"a": "1"})["ETag"]
    before = node_received(cluster)
    copied = s3.copy_object(
        Bucket=bucket, Key="dst/copy", CopySource={"Bucket": bucket, "Key": "src"}
    )
    assert node_received(cluster) - before < 64 * 1024  # metadata only: no chunk went to a node
    assert copied["CopyObjectResult"]["ETag"] == etag
    got = s3.get_object(Bucket=bucket, Key="dst/copy")
    assert got["Body"].read() == data and got["Metadata"] == {"a": "1"}
    chunks = [
        [
            c["sha256"]
            for c in cl.chunkfs_json("info", str(Path(mounted.path) / bucket / k), "--json")[
                "chunks"
            ]
        ]
        for k in ("src", "dst/copy")
    ]
    assert chunks[0] == chunks[1]
    s3.copy_object(
        Bucket=bucket, Key="dst/replaced", CopySource=f"{bucket}/src", MetadataDirective="REPLACE",
        Metadata={"b": "2"}, ContentType="text/x-new",
    )  # fmt: skip
    head = s3.head_object(Bucket=bucket, Key="dst/replaced")
    assert head["Metadata"] == {"b": "2"} and head["ContentType"] == "text/x-new"
    assert (
        error_code(s3.copy_object, Bucket=bucket, Key="src", CopySource=f"{bucket}/src")
        == "InvalidRequest"
    )
    assert (
        error_code(s3.copy_object, Bucket=bucket, Key="x", CopySource=f"{bucket}/missing")
        == "NoSuchKey"
    )
    assert (
        error_code(
            s3.copy_object,
            Bucket=bucket,
            Key="x",
            CopySource=f"{bucket}/src",
            CopySourceIfMatch='"0"',
        )
        == "PreconditionFailed"
    )


# ---------------------------------------------------------------- multipart


def test_multipart_upload(cluster: cl.Cluster, s3: Any, bucket: str, mounted: cl.Mount) -> None:
    parts = [os.urandom(5 * MIB), os.urandom(6 * MIB + 123), os.urandom(1000)]
    up = s3.create_multipart_upload(Bucket=bucket, Key="big/object", ContentType="video/x-test")
    uid = up["UploadId"]
    assert [u["UploadId"] for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])] == [
        uid
    ]
    tags = [
        s3.upload_part(Bucket=bucket, Key="big/object", UploadId=uid, PartNumber=n + 1, Body=p)[
            "ETag"
        ]
        for n, p in enumerate(parts)
    ]
    assert tags == [f'"{md5_hex(p)}"' for p in parts]
    listed = s3.list_parts(Bucket=bucket, Key="big/object", UploadId=uid)["Parts"]
    assert [(p["PartNumber"], p["Size"], p["ETag"]) for p in listed] == [
        (n + 1, len(p), tags[n]) for n, p in enumerate(parts)
    ]
    # The object is not there before completion.
    assert error_code(s3.head_object, Bucket=bucket, Key="big/object") == "404"
    wanted = [{"PartNumber": n + 1, "ETag": t} for n, t in enumerate(tags)]
    assert error_code(
        s3.complete_multipart_upload, Bucket=bucket, Key="big/object", UploadId=uid,
        MultipartUpload={"Parts": wanted[::-1]},
    ) == "InvalidPartOrder"  # fmt: skip
    assert error_code(
        s3.complete_multipart_upload, Bucket=bucket, Key="big/object", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": '"00"'}]},
    ) == "InvalidPart"  # fmt: skip
    assert error_code(
        s3.complete_multipart_upload, Bucket=bucket, Key="big/object", UploadId=uid,
        MultipartUpload={"Parts": [wanted[2], {"PartNumber": 4, "ETag": tags[2]}]},
    ) == "InvalidPart"  # fmt: skip
    done = s3.complete_multipart_upload(
        Bucket=bucket, Key="big/object", UploadId=uid, MultipartUpload={"Parts": wanted}
    )
    combined = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest()
    assert done["ETag"] == f'"{combined}-3"'
    got = s3.get_object(Bucket=bucket, Key="big/object")
    assert got["Body"].read() == b"".join(parts)
    assert got["ETag"] == done["ETag"] and got["ContentType"] == "video/x-test"
    assert (Path(mounted.path) / bucket / "big" / "object").read_bytes() == b"".join(parts)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="big/")["Contents"][0]["ETag"] == done["ETag"]
    assert (
        error_code(s3.list_parts, Bucket=bucket, Key="big/object", UploadId=uid) == "NoSuchUpload"
    )
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    again = s3.complete_multipart_upload(  # a client that did not see the answer asks again
        Bucket=bucket, Key="big/object", UploadId=uid, MultipartUpload={"Parts": wanted}
    )
    assert again["ETag"] == done["ETag"]


def test_multipart_small_parts_copy_and_abort(s3: Any, bucket: str) -> None:
    source = os.urandom(7 * MIB)
    s3.put_object(Bucket=bucket, Key="source", Body=source)
    uid = s3.create_multipart_upload(Bucket=bucket, Key="m")["UploadId"]
    t1 = s3.upload_part(Bucket=bucket, Key="m", UploadId=uid, PartNumber=1, Body=b"x" * 100)["ETag"]
    t2 = s3.upload_part(Bucket=bucket, Key="m", UploadId=uid, PartNumber=2, Body=b"y" * 100)["ETag"]
    assert error_code(
        s3.complete_multipart_upload, Bucket=bucket, Key="m", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": t1}, {"PartNumber": 2, "ETag": t2}]},
    ) == "EntityTooSmall"  # fmt: skip
    copied = s3.upload_part_copy(
        Bucket=bucket, Key="m", UploadId=uid, PartNumber=1, CopySource=f"{bucket}/source",
        CopySourceRange=f"bytes=0-{6 * MIB - 1}",
    )["CopyPartResult"]["ETag"]  # fmt: skip
    assert copied == f'"{md5_hex(source[: 6 * MIB])}"'
    assert error_code(
        s3.upload_part_copy, Bucket=bucket, Key="m", UploadId=uid, PartNumber=3,
        CopySource=f"{bucket}/source", CopySourceRange=f"bytes=0-{7 * MIB}",
    ) == "InvalidRange"  # fmt: skip
    s3.complete_multipart_upload(
        Bucket=bucket, Key="m", UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": copied}, {"PartNumber": 2, "ETag": t2}]},
    )  # fmt: skip
    assert s3.get_object(Bucket=bucket, Key="m")["Body"].read() == source[: 6 * MIB] + b"y" * 100
    aborted = s3.create_multipart_upload(Bucket=bucket, Key="gone")["UploadId"]
    s3.upload_part(Bucket=bucket, Key="gone", UploadId=aborted, PartNumber=1, Body=b"z")
    s3.abort_multipart_upload(Bucket=bucket, Key="gone", UploadId=aborted)
    assert error_code(s3.list_parts, Bucket=bucket, Key="gone", UploadId=aborted) == "NoSuchUpload"
    assert error_code(
        s3.upload_part, Bucket=bucket, Key="gone", UploadId=aborted, PartNumber=2, Body=b"z"
    ) == "NoSuchUpload"  # fmt: skip
    assert error_code(s3.head_object, Bucket=bucket, Key="gone") == "404"


def test_expired_uploads_are_collected_by_gc(cluster: cl.Cluster, tmp_path: Path) -> None:
    """Parts of an upload nobody completes are chunks on the nodes until its
    session expires; then gc deletes them.
    """
    short = cl.GatewayProcess(
        cluster.dsn, tmp_path / "gw.log", extra_args=["--upload-ttl", "2"]
    ).start()
    try:
        gw = Gateway(
            short, cluster.dsn, add_key(cluster.dsn, 0, 0), add_key(cluster.dsn, 1000, 1000)
        )
        s3 = client(gw)
        name = "expiry-" + os.urandom(3).hex()
        s3.create_bucket(Bucket=name)
        uid = s3.create_multipart_upload(Bucket=name, Key="k")["UploadId"]
        s3.upload_part(Bucket=name, Key="k", UploadId=uid, PartNumber=1, Body=os.urandom(3 * MIB))
        rows = cl.run_sql(
            cluster.dsn,
            f"SELECT encode(piece_ids[1], 'hex') AS id FROM multipart_parts WHERE upload_id = '{uid}'",
        )[0]
        piece = rows[0]["id"]
        assert holders(cluster, piece) == 2  # on R nodes while the upload lives
        cl.run_chunkfs("gc", cluster.dsn)
        assert holders(cluster, piece) == 2  # gc spares what a live upload protects
        time.sleep(3)
        assert error_code(s3.list_parts, Bucket=name, Key="k", UploadId=uid) == "NoSuchUpload"
        cl.run_chunkfs("gc", cluster.dsn)
        assert holders(cluster, piece) == 2  # within gc's grace after the expiry
        cl.run_sql(  # as if the grace had passed
            cluster.dsn,
            "UPDATE upload_sessions SET expires_at = now() - "
            f"make_interval(secs => {SESSION_GRACE_S + 1}) "
            f"WHERE session_id IN (SELECT session_id FROM multipart_uploads "
            f"WHERE upload_id = '{uid}')",
        )
        cl.run_chunkfs("gc", cluster.dsn)
        assert holders(cluster, piece) == 0
        left = cl.run_sql(
            cluster.dsn, f"SELECT count(*) AS n FROM multipart_uploads WHERE upload_id = '{uid}'"
        )
        assert left[0][0]["n"] == 0
        s3.delete_bucket(Bucket=name)
    finally:
        assert short.stop() == 0


# ---------------------------------------------------------- authentication


def test_presigned_urls(gateway: Gateway, bucket: str) -> None:
    s3 = client(gateway, signature_version="s3v4")
    s3.put_object(Bucket=bucket, Key="shared file", Body=b"for anyone with the link")
    url = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "shared file"}, ExpiresIn=60
    )
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.read() == b"for anyone with the link"
    put_url = s3.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "uploaded"}, ExpiresIn=60
    )
    request = urllib.request.Request(put_url, data=b"via a presigned PUT", method="PUT")
    with urllib.request.urlopen(request, timeout=10) as resp:
        assert resp.status == 200
    assert s3.get_object(Bucket=bucket, Key="uploaded")["Body"].read() == b"via a presigned PUT"
    short = s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "shared file"}, ExpiresIn=1
    )
    time.sleep(2)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(short, timeout=10)
    assert caught.value.code == 403 and b"<Code>AccessDenied</Code>" in caught.value.read()
    legacy = client(gateway).generate_presigned_url(  # Signature Version 2: refused
        "get_object", Params={"Bucket": bucket, "Key": "shared file"}, ExpiresIn=60
    )
    assert "AWSAccessKeyId=" in legacy
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(legacy, timeout=10)
    assert caught.value.code == 400 and b"Signature Version 4" in caught.value.read()
    tampered = url.replace("shared%20file", "uploaded")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(tampered, timeout=10)
    assert caught.value.code == 403 and b"SignatureDoesNotMatch" in caught.value.read()


def test_bad_credentials_and_anonymous_requests(gateway: Gateway, bucket: str) -> None:
    wrong = client(gateway, Key(gateway.admin.key_id, "x" * 40))
    assert error_code(wrong.list_objects_v2, Bucket=bucket) == "SignatureDoesNotMatch"
    unknown = client(gateway, Key("AKIAUNKNOWNUNKNOWN00", "x" * 40))
    assert error_code(unknown.list_objects_v2, Bucket=bucket) == "InvalidAccessKeyId"
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{gateway.url}/{bucket}", timeout=10)
    assert caught.value.code == 403


def test_a_skewed_clock_is_refused(gateway: Gateway, bucket: str) -> None:
    late = datetime.datetime.now(datetime.UTC) - datetime.timedelta(hours=1)
    s3 = client(gateway)
    with mock.patch("botocore.auth.get_current_datetime", return_value=late):
        assert error_code(s3.list_objects_v2, Bucket=bucket) == "RequestTimeTooSkewed"


def test_removed_keys_stop_working(gateway: Gateway, bucket: str) -> None:
    key = add_key(gateway.dsn, 0, 0)
    s3 = client(gateway, key)
    s3.list_objects_v2(Bucket=bucket)
    listed = cl.chunkfs_json("gateway", "key", "list", gateway.dsn, "--json")
    assert key.key_id in [k["access_key_id"] for k in listed]
    assert "secret" not in json.dumps(listed)
    cl.run_chunkfs("gateway", "key", "remove", gateway.dsn, key.key_id)
    time.sleep(6)  # the gateway trusts a key it read for 5 s
    assert error_code(s3.list_objects_v2, Bucket=bucket) == "InvalidAccessKeyId"
    failed = cl.run_chunkfs("gateway", "key", "remove", gateway.dsn, key.key_id, check=False)
    assert failed.returncode != 0 and "no access key" in failed.stderr


def test_permissions_are_the_files(
    gateway: Gateway, s3: Any, bucket: str, mounted: cl.Mount
) -> None:
    user = client(gateway, gateway.user)
    s3.put_object(Bucket=bucket, Key="public", Body=b"readable")
    s3.put_object(Bucket=bucket, Key="private", Body=b"secret")
    os.chmod(Path(mounted.path) / bucket / "private", 0o600)
    assert user.get_object(Bucket=bucket, Key="public")["Body"].read() == b"readable"
    assert error_code(user.get_object, Bucket=bucket, Key="private") == "AccessDenied"
    assert error_code(user.put_object, Bucket=bucket, Key="mine", Body=b"x") == "AccessDenied"
    assert error_code(user.delete_object, Bucket=bucket, Key="public") == "AccessDenied"
    assert error_code(user.create_bucket, Bucket="user-" + os.urandom(3).hex()) == "AccessDenied"
    os.mkdir(Path(mounted.path) / bucket / "shared")
    os.chown(Path(mounted.path) / bucket / "shared", 1000, 1000)
    user.put_object(Bucket=bucket, Key="shared/by-user", Body=b"mine")
    time.sleep(1.1)  # a mount trusts the names of a directory it just made for 1 s
    st = os.stat(Path(mounted.path) / bucket / "shared" / "by-user")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    assert s3.get_object(Bucket=bucket, Key="public")["Body"].read() == b"readable"


# -------------------------------------------------------------- bad input


def raw_request(
    gw: Gateway,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    send: bytes | None = None,
) -> tuple[int, bytes]:
    """Send a request signed by botocore (UNSIGNED-PAYLOAD) over a raw
    socket, with ``send`` as the bytes actually sent after the head (default
    ``body``); return the status and body of the answer.
    """
    request = AWSRequest(method=method, url=gw.url + path, data=body, headers=headers)
    request.headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
    S3SigV4Auth(Credentials(gw.admin.key_id, gw.admin.secret), "s3", "us-east-1").add_auth(request)
    head = f"{method} {path} HTTP/1.1\r\nHost: {gw.url.split('//')[1]}\r\nContent-Length: {len(body)}\r\n"
    head += (
        "".join(f"{k}: {v}\r\n" for k, v in request.headers.items()) + "Connection: close\r\n\r\n"
    )
    with socket.create_connection(tuple(gw.url.split("//")[1].split(":")), timeout=20) as sock:  # type: ignore[arg-type]
        sock.sendall(head.encode() + (body if send is None else send))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def test_a_body_shorter_than_its_length_leaves_nothing(
    gateway: Gateway, s3: Any, bucket: str, mounted: cl.Mount
) -> None:
    body = os.urandom(300_000)
    status, answer = raw_request(
        gateway, "PUT", f"/{bucket}/cut/short", body, {}, send=body[:100_000]
    )
    # The connection ends mid-body: the server answers 400 (IncompleteBody,
    # or the HTTP layer's own 400 when it sees the end first).
    assert status == 400 and (answer == b"" or b"IncompleteBody" in answer)
    assert error_code(s3.head_object, Bucket=bucket, Key="cut/short") == "404"
    assert not (Path(mounted.path) / bucket / "cut").exists()
    staged = list((Path(mounted.path) / ".chunkfs-gateway").iterdir())
    assert staged == []


def test_a_body_without_a_length(gateway: Gateway, s3: Any, bucket: str) -> None:
    """Transfer-Encoding: chunked, as HTTP/1.1 allows, instead of a length."""
    host, port = gateway.url.split("//")[1].split(":")
    request = AWSRequest(
        method="PUT", url=f"{gateway.url}/{bucket}/streamed", data=b"no length given",
        headers={"Transfer-Encoding": "chunked"},
    )  # fmt: skip
    S3SigV4Auth(
        Credentials(gateway.admin.key_id, gateway.admin.secret), "s3", "us-east-1"
    ).add_auth(request)
    conn = http.client.HTTPConnection(host, int(port), timeout=20)
    conn.request("PUT", f"/{bucket}/streamed", body=iter([b"no ", b"length ", b"given"]),
                 headers=dict(request.headers.items()), encode_chunked=True)  # fmt: skip
    answer = conn.getresponse()
    assert answer.status == 200, answer.read()
    conn.close()
    assert s3.get_object(Bucket=bucket, Key="streamed")["Body"].read() == b"no length given"


def test_additional_checksums(gateway: Gateway, s3: Any, bucket: str) -> None:
    for algorithm in ("CRC32", "SHA1", "SHA256"):
        s3.put_object(
            Bucket=bucket, Key=f"sum/{algorithm}", Body=b"checked", ChecksumAlgorithm=algorithm
        )
        assert s3.get_object(Bucket=bucket, Key=f"sum/{algorithm}")["Body"].read() == b"checked"
    other = base64.b64encode(zlib.crc32(b"other").to_bytes(4, "big")).decode()
    status, answer = raw_request(
        gateway, "PUT", f"/{bucket}/sum/bad", b"data", {"x-amz-checksum-crc32": other}
    )
    assert status == 400 and b"BadDigest" in answer
    assert error_code(s3.head_object, Bucket=bucket, Key="sum/bad") == "404"
    status, answer = raw_request(
        gateway, "PUT", f"/{bucket}/sum/c", b"data", {"x-amz-checksum-crc32c": "AAAAAA=="}
    )
    assert status == 400 and b"CRC32C is not supported" in answer


def test_malformed_xml_changes_nothing(gateway: Gateway, s3: Any, bucket: str) -> None:
    s3.put_object(Bucket=bucket, Key="keep", Body=b"k")
    bad = b"<Delete><Object><Key>keep</Key></Object"
    md5 = base64.b64encode(hashlib.md5(bad).digest()).decode()
    status, answer = raw_request(gateway, "POST", f"/{bucket}?delete", bad, {"Content-MD5": md5})
    assert status == 400 and b"MalformedXML" in answer
    entity = b'<!DOCTYPE d [<!ENTITY e "keep">]><Delete><Object><Key>&e;</Key></Object></Delete>'
    md5 = base64.b64encode(hashlib.md5(entity).digest()).decode()
    status, answer = raw_request(gateway, "POST", f"/{bucket}?delete", entity, {"Content-MD5": md5})
    assert status == 400 and b"MalformedXML" in answer
    uid = s3.create_multipart_upload(Bucket=bucket, Key="mp")["UploadId"]
    status, answer = raw_request(gateway, "POST", f"/{bucket}/mp?uploadId={uid}", b"<Complete", {})
    assert status == 400 and b"MalformedXML" in answer
    assert s3.get_object(Bucket=bucket, Key="keep")["Body"].read() == b"k"
    s3.abort_multipart_upload(Bucket=bucket, Key="mp", UploadId=uid)


def test_signed_aws_chunked_upload(gateway: Gateway, s3: Any, bucket: str) -> None:
    """A streaming upload (STREAMING-AWS4-HMAC-SHA256-PAYLOAD), signed chunk
    by chunk as AWS's documentation describes; a chunk with a wrong
    signature fails the upload and stores nothing.
    """
    data = [os.urandom(65536), os.urandom(65536), os.urandom(1000)]
    now = datetime.datetime.now(datetime.UTC)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    scope = f"{day}/us-east-1/s3/aws4_request"

    def hmac_sha256(key: bytes, text: str) -> bytes:
        return hmac.new(key, text.encode(), hashlib.sha256).digest()

    key = f"AWS4{gateway.admin.secret}".encode()
    for part in (day, "us-east-1", "s3", "aws4_request"):
        key = hmac_sha256(key, part)

    def upload(name: str, corrupt: bool) -> tuple[int, bytes]:
        host = gateway.url.split("//")[1]
        pieces = [*data, b""]
        frames_len = sum(len(f"{len(p):x};chunk-signature=") + 64 + 4 + len(p) for p in pieces)
        headers = {
            "host": host, "content-encoding": "aws-chunked", "content-length": str(frames_len),
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "x-amz-date": amz_date,
            "x-amz-decoded-content-length": str(sum(map(len, data))),
        }  # fmt: skip
        names = sorted(headers)
        canonical = "\n".join(
            ["PUT", f"/{bucket}/{name}", "", *(f"{n}:{headers[n]}" for n in names), "", ";".join(names),
             headers["x-amz-content-sha256"]]
        )  # fmt: skip
        to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
        previous = hmac_sha256(key, to_sign).hex()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={gateway.admin.key_id}/{scope}, "
            f"SignedHeaders={';'.join(names)}, Signature={previous}"
        )
        body = b""
        for i, piece in enumerate(pieces):
            text = "\n".join([
                "AWS4-HMAC-SHA256-PAYLOAD", amz_date, scope, previous,
                hashlib.sha256(b"").hexdigest(), hashlib.sha256(piece).hexdigest(),
            ])  # fmt: skip
            previous = hmac_sha256(key, text).hex()
            signature = "0" * 64 if corrupt and i == 1 else previous
            body += f"{len(piece):x};chunk-signature={signature}\r\n".encode() + piece + b"\r\n"
        head = f"PUT /{bucket}/{name} HTTP/1.1\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        with socket.create_connection(
            (host.split(":")[0], int(host.split(":")[1])), timeout=20
        ) as sock:
            sock.sendall(head.encode() + b"Connection: close\r\n\r\n" + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return int(answer.split(b" ", 2)[1]), answer

    status, answer = upload("streamed", corrupt=False)
    assert status == 200, answer
    got = s3.get_object(Bucket=bucket, Key="streamed")
    assert got["Body"].read() == b"".join(data)
    assert got["ETag"] == f'"{md5_hex(b"".join(data))}"'
    assert "ContentEncoding" not in got  # aws-chunked is the transfer's, not the object's
    status, answer = upload("forged", corrupt=True)
    assert status == 403 and b"SignatureDoesNotMatch" in answer
    assert error_code(s3.head_object, Bucket=bucket, Key="forged") == "404"


# ------------------------------------------------------------ CLI clients


def cli_env(gw: Gateway, home: Path) -> dict[str, str]:
    return {
        **os.environ, "HOME": str(home), "AWS_ACCESS_KEY_ID": gw.admin.key_id,
        "AWS_SECRET_ACCESS_KEY": gw.admin.secret, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-creds"),
    }  # fmt: skip


def run_tool(argv: list[str], env: dict[str, str]) -> str:
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL
    )
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def tool(name: str) -> str:
    """A client installed beside this Python (the test dependencies' ``aws``, ``s3cmd``)."""
    return str(Path(sys.executable).with_name(name))


def a_tree(root: Path) -> Path:
    """A small tree of files of assorted sizes (one over the CLI's multipart threshold)."""
    src = root / "tree"
    for i in range(20):
        d = src / f"d{i % 4}" / ("deep" if i % 3 == 0 else "")
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.dat").write_bytes(os.urandom(1 + i * 997))
    (src / "large.bin").write_bytes(os.urandom(9 * MIB + 3))
    return src


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_aws_cli_copies_and_syncs(gateway: Gateway, s3: Any, bucket: str, tmp_path: Path) -> None:
    src, env = a_tree(tmp_path), cli_env(gateway, tmp_path)
    aws = [tool("aws"), "--endpoint-url", gateway.url, "s3"]
    run_tool([*aws, "cp", str(src), f"s3://{bucket}/copied/", "--recursive"], env)
    back = tmp_path / "back"
    run_tool([*aws, "cp", f"s3://{bucket}/copied/", str(back), "--recursive"], env)
    assert files_of(back) == files_of(src)
    first = run_tool([*aws, "sync", str(src), f"s3://{bucket}/synced/"], env)
    assert first.count("upload:") == len(files_of(src))
    second = run_tool([*aws, "sync", str(src), f"s3://{bucket}/synced/"], env)
    assert second.strip() == ""  # an unchanged tree copies nothing
    (src / "d1" / "f1.dat").write_bytes(b"changed")
    third = run_tool([*aws, "sync", str(src), f"s3://{bucket}/synced/"], env)
    assert third.count("upload:") == 1
    listing = run_tool([*aws, "ls", f"s3://{bucket}/synced/", "--recursive"], env)
    assert len(listing.strip().splitlines()) == len(files_of(src))
    run_tool([*aws, "rm", f"s3://{bucket}/", "--recursive"], env)
    assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0


def test_s3cmd(gateway: Gateway, bucket: str, tmp_path: Path) -> None:
    src, env = a_tree(tmp_path), cli_env(gateway, tmp_path)
    host = gateway.url.split("//")[1]
    config = tmp_path / "s3cfg"
    config.write_text(
        f"[default]\naccess_key = {gateway.admin.key_id}\nsecret_key = {gateway.admin.secret}\n"
        f"host_base = {host}\nhost_bucket = {host}\nuse_https = False\nbucket_location = us-east-1\n"
        "signature_v2 = False\n"
    )
    s3cmd = [tool("s3cmd"), "-c", str(config)]
    run_tool([*s3cmd, "put", str(src / "large.bin"), f"s3://{bucket}/one/large.bin"], env)
    run_tool([*s3cmd, "get", f"s3://{bucket}/one/large.bin", str(tmp_path / "large.copy")], env)
    assert (tmp_path / "large.copy").read_bytes() == (src / "large.bin").read_bytes()
    run_tool([*s3cmd, "sync", f"{src}/", f"s3://{bucket}/tree/"], env)
    again = run_tool([*s3cmd, "sync", f"{src}/", f"s3://{bucket}/tree/"], env)
    assert "upload:" not in again
    listed = run_tool([*s3cmd, "ls", "--recursive", f"s3://{bucket}/tree/"], env)
    assert len(listed.strip().splitlines()) == len(files_of(src))
    run_tool([*s3cmd, "del", "--recursive", "--force", f"s3://{bucket}/"], env)
    assert run_tool([*s3cmd, "ls", f"s3://{bucket}/"], env).strip() == ""


# ----------------------------------------------------------------- serving


def test_tls_virtual_hosts_and_metrics(
    cluster: cl.Cluster, gateway: Gateway, tmp_path: Path
) -> None:
    """HTTPS with a certificate the client checks, bucket.DOMAIN addressing,
    and the metrics of what was served.
    """
    certs = make_certificates(tmp_path, {"gateway": cl.HOST})
    cert, key = certs.certs["gateway"]
    process = cl.GatewayProcess(
        cluster.dsn, tmp_path / "gw.log", ca_file=str(certs.ca),
        extra_args=["--tls-cert", str(cert), "--tls-key", str(key), "--domain", "s3.test"],
    ).start()  # fmt: skip
    try:
        gw = Gateway(process, cluster.dsn, gateway.admin, gateway.user)
        s3 = client(gw, verify=str(certs.ca))
        name = "tls-" + os.urandom(3).hex()
        s3.create_bucket(Bucket=name)
        s3.put_object(Bucket=name, Key="over/tls", Body=b"private bytes")
        assert s3.get_object(Bucket=name, Key="over/tls")["Body"].read() == b"private bytes"
        untrusting = client(gw)  # the system's CAs: this certificate is not among them
        with pytest.raises(Exception, match=r"certificate verify failed|SSL"):
            untrusting.list_buckets()
        # Virtual-hosted: the bucket in the Host header.
        virtual = f"{name}.s3.test:{process.port}"
        request = AWSRequest(
            method="GET",
            url=f"https://{virtual}/over/tls",
            headers={"x-amz-content-sha256": "UNSIGNED-PAYLOAD"},
        )
        S3SigV4Auth(Credentials(gw.admin.key_id, gw.admin.secret), "s3", "us-east-1").add_auth(
            request
        )
        tls = ssl.create_default_context(cafile=str(certs.ca))
        conn = http.client.HTTPSConnection(cl.HOST, process.port, context=tls, timeout=20)
        conn.request("GET", "/over/tls", headers={**dict(request.headers.items()), "Host": virtual})
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (200, b"private bytes")
        conn.close()
        s3.delete_object(Bucket=name, Key="over/tls")
        s3.delete_bucket(Bucket=name)
        with urllib.request.urlopen(process.url + "/-/metrics", timeout=10, context=tls) as resp:
            text = resp.read().decode()
        assert 'chunkfs_s3_requests_total{operation="PutObject",status="200"} 1.0' in text
        assert 'chunkfs_s3_requests_total{operation="GetObject",status="200"} 2.0' in text
        assert "chunkfs_s3_received_bytes_total 13.0" in text
    finally:
        assert process.stop() == 0


def test_the_gateway_command_fails_in_one_line(cluster: cl.Cluster, gateway: Gateway) -> None:
    busy = cl.run_chunkfs(
        "gateway", cluster.dsn, "--listen", f"{cl.HOST}:{gateway.process.port}", check=False
    )
    assert busy.returncode != 0
    assert busy.stderr.strip().splitlines() == [busy.stderr.strip().splitlines()[-1]]
    assert "cannot listen" in busy.stderr
    nowhere = cl.run_chunkfs(
        "gateway", "postgresql://nobody@127.0.0.1:1/none", "--listen", f"{cl.HOST}:0", check=False
    )
    assert nowhere.returncode != 0 and "chunkfs: error:" in nowhere.stderr
    bad = cl.run_chunkfs(
        "gateway", "key", "add", cluster.dsn, "--uid", "-1", "--gid", "0", check=False
    )
    assert bad.returncode != 0


def test_closed_connections_free_their_place(
    cluster: cl.Cluster, gateway: Gateway, tmp_path: Path
) -> None:
    """A client that closes its idle keep-alive connection gives its place
    among --max-connections back at once (not when the keep-alive timer fires).
    """
    process = cl.GatewayProcess(
        cluster.dsn, tmp_path / "gw.log", extra_args=["--max-connections", "10"]
    ).start()
    try:
        gw = Gateway(process, cluster.dsn, gateway.admin, gateway.user)
        for _ in range(25):
            s3 = client(gw)
            s3.list_buckets()
            time.sleep(0.02)  # the connection goes idle, then the client closes it
            s3.close()
        time.sleep(0.5)
        client(gw).list_buckets()  # would be reset while ten closed ones held every place
    finally:
        assert process.stop() == 0
