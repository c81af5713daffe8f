"""Signature Version 4 checks against signatures made by botocore (the AWS
SDK's own signer) and against the worked example of AWS's chunked-upload
documentation.
"""

from __future__ import annotations

import datetime
import hashlib
from unittest import mock

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from chunkfs.gateway import sigv4
from chunkfs.gateway.app import parse_query
from chunkfs.gateway.errors import S3Error

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
CREDENTIALS = Credentials("AKIAIOSFODNN7EXAMPLE", SECRET)


def _botocore_signed(
    method: str, url: str, headers: dict[str, str], *, presign: bool = False
) -> AWSRequest:
    request = AWSRequest(method=method, url=url, headers=headers, data=b"")
    signer = (
        S3SigV4QueryAuth(CREDENTIALS, "s3", "us-east-1", expires=300)
        if presign
        else S3SigV4Auth(CREDENTIALS, "s3", "us-east-1")
    )
    signer.add_auth(request)
    return request


def _check(request: AWSRequest, secret: str = SECRET) -> sigv4.Signed:
    """Verify a request the way the gateway does; return what it claimed."""
    url, method = request.url, request.method
    assert url is not None and method is not None
    raw_path, _, raw_query = url.partition("://")[2].partition("/")[2].partition("?")
    headers = {k.lower(): v for k, v in request.headers.items()}
    headers["host"] = url.split("/")[2]
    query = parse_query(raw_query)
    signed = sigv4.parse(headers, query)
    assert signed is not None
    key = sigv4.signing_key(secret, signed.scope)
    sigv4.check_request(key, signed, method, "/" + raw_path, query, headers)
    return signed


@pytest.mark.parametrize(
    "path",
    [
        "/bucket/plain.txt",
        "/bucket/with%20space/and%2Bplus",
        "/bucket/%C3%A9t%C3%A9/%7Etilde",
        "/bucket",
    ],
)
def test_header_signatures_made_by_botocore_verify(path: str) -> None:
    url = f"http://127.0.0.1:9000{path}?list-type=2&prefix=a%2Fb&delimiter=%2F"
    request = _botocore_signed("GET", url, {"x-amz-content-sha256": sigv4.UNSIGNED})
    signed = _check(request)
    assert signed.scope.access_key_id == "AKIAIOSFODNN7EXAMPLE"
    assert signed.expires_s is None


def test_a_wrong_secret_or_changed_request_does_not_verify() -> None:
    request = _botocore_signed(
        "GET", "http://127.0.0.1:9000/b/k", {"x-amz-content-sha256": sigv4.UNSIGNED}
    )
    with pytest.raises(S3Error) as caught:
        _check(request, secret="another secret")
    assert caught.value.code == "SignatureDoesNotMatch"
    request.url = "http://127.0.0.1:9000/b/other"
    with pytest.raises(S3Error) as caught:
        _check(request)
    assert caught.value.code == "SignatureDoesNotMatch"


def test_presigned_urls_verify_and_expire() -> None:
    request = _botocore_signed("GET", "http://127.0.0.1:9000/b/some%20key", {}, presign=True)
    signed = _check(request)
    assert signed.expires_s == 300
    issued = sigv4.epoch_of(signed.amz_date)
    sigv4.check_time(signed, issued + 299)
    with pytest.raises(S3Error) as caught:
        sigv4.check_time(signed, issued + 301)
    assert caught.value.code == "AccessDenied"


def test_a_request_from_a_skewed_clock_is_refused() -> None:
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    with mock.patch("botocore.auth.get_current_datetime", return_value=past):
        request = _botocore_signed("GET", "http://h/b/k", {"x-amz-content-sha256": sigv4.UNSIGNED})
    signed = _check(request)
    with pytest.raises(S3Error) as caught:
        sigv4.check_time(signed, past.timestamp() + 16 * 60)
    assert caught.value.code == "RequestTimeTooSkewed"
    sigv4.check_time(signed, past.timestamp() + 14 * 60)


def test_malformed_authorization_is_refused() -> None:
    headers = {
        "authorization": "AWS4-HMAC-SHA256 Credential=x",
        "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
    }
    with pytest.raises(S3Error) as caught:
        sigv4.parse(headers, [])
    assert caught.value.code == "AuthorizationHeaderMalformed"
    assert sigv4.parse({}, []) is None


def test_the_chunked_upload_example_of_the_aws_documentation() -> None:
    """AWS's "Example: PUT Object" of the chunked upload (sigv4-streaming):
    its seed signature and the signatures of its three chunks.
    """
    headers = {
        "host": "s3.amazonaws.com",
        "x-amz-date": "20130524T000000Z",
        "x-amz-storage-class": "REDUCED_REDUNDANCY",
        "content-encoding": "aws-chunked",
        "x-amz-decoded-content-length": "66560",
        "content-length": "66824",
        "x-amz-content-sha256": sigv4.STREAMING,
        "authorization": (
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,"
            "SignedHeaders=content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
            "x-amz-decoded-content-length;x-amz-storage-class,"
            "Signature=4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9"
        ),
    }
    signed = sigv4.parse(headers, [])
    assert signed is not None and signed.streaming
    key = sigv4.signing_key(SECRET, signed.scope)
    canonical = sigv4.canonical_request(
        "PUT", "/examplebucket/chunkObject.txt", [], headers, signed
    )
    sigv4.verify(sigv4.request_signature(key, signed, canonical), signed.signature)
    chain = sigv4.ChunkSigner(key, signed, signed.signature)
    for data, signature in [
        (b"a" * 65536, "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"),
        (b"a" * 1024, "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"),
        (b"", "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"),
    ]:
        chain.check_chunk_digest(hashlib.sha256(data).hexdigest(), signature)
    with pytest.raises(S3Error):
        sigv4.ChunkSigner(key, signed, signed.signature).check_chunk_digest(
            hashlib.sha256(b"b" * 65536).hexdigest(),
            "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
        )
