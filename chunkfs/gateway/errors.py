"""S3's errors: each code with its HTTP status, and the one from a chunkfs error.

The codes and statuses are those of Amazon S3's error reference
(https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html).
"""

from __future__ import annotations

from .. import errors

# code -> (HTTP status, default message)
CODES: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "Access Denied"),
    "AuthorizationHeaderMalformed": (400, "The authorization header is malformed."),
    "AuthorizationQueryParametersError": (400, "The query parameters that sign the request are malformed."),
    "BadDigest": (400, "The Content-MD5 you specified did not match what we received."),
    "BucketAlreadyOwnedByYou": (409, "Your previous request to create the named bucket succeeded and you already own it."),
    "BucketAlreadyExists": (409, "The requested bucket name is not available."),
    "BucketNotEmpty": (409, "The bucket you tried to delete is not empty."),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed object size."),
    "EntityTooSmall": (400, "Your proposed upload is smaller than the minimum allowed object size."),
    "IncompleteBody": (400, "You did not provide the number of bytes specified by the Content-Length HTTP header."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "InvalidAccessKeyId": (403, "The AWS Access Key Id you provided does not exist in our records."),
    "InvalidArgument": (400, "Invalid Argument"),
    "InvalidBucketName": (400, "The specified bucket is not valid."),
    "InvalidDigest": (400, "The Content-MD5 you specified is not valid."),
    "InvalidPart": (400, "One or more of the specified parts could not be found."),
    "InvalidPartOrder": (400, "The list of parts was not in ascending order."),
    "InvalidRange": (416, "The requested range is not satisfiable"),
    "InvalidRequest": (400, "Invalid Request"),
    "KeyTooLongError": (400, "Your key is too long."),
    "MalformedXML": (400, "The XML you provided was not well-formed or did not validate against our published schema."),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "MissingContentLength": (411, "You must provide the Content-Length HTTP header."),
    "NoSuchBucket": (404, "The specified bucket does not exist."),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (404, "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed."),
    "NotImplemented": (501, "A header you provided implies functionality that is not implemented."),
    "PreconditionFailed": (412, "At least one of the preconditions you specified did not hold."),
    "RequestTimeTooSkewed": (403, "The difference between the request time and the current time is too large."),
    "ServiceUnavailable": (503, "Reduce your request rate."),
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the signature you provided. Check your key and signing method."),
    "XAmzContentSHA256Mismatch": (400, "The provided 'x-amz-content-sha256' header does not match what was computed."),
    "ObjectConflict": (409, "The key names a directory where a file is needed, or a file where a directory is."),
}  # fmt: skip


class S3Error(Exception):
    """An S3 error response: its ``code`` (a key of ``CODES``), HTTP
    ``status``, a message, and extra elements for the XML body.
    """

    def __init__(self, code: str, message: str | None = None, **extra: str) -> None:
        status, default = CODES[code]
        super().__init__(message or default)
        self.code = code
        self.status = status
        self.message = message or default
        self.extra = extra


def from_chunkfs(exc: errors.ChunkfsError) -> S3Error:
    """The S3 error for a filesystem error (a 5xx for what the client
    cannot fix: storage or metadata unavailable).
    """
    if isinstance(exc, errors.NotPermitted):
        return S3Error("AccessDenied")
    if isinstance(exc, errors.FileTooLarge):
        return S3Error("EntityTooLarge", str(exc))
    if isinstance(exc, errors.NameTooLong):
        return S3Error("KeyTooLongError", str(exc))
    if isinstance(exc, errors.NotADirectory | errors.IsADirectory | errors.Exists):
        return S3Error("ObjectConflict", str(exc))
    if isinstance(exc, errors.NoSpace):
        return S3Error("ServiceUnavailable", "no room left on the storage nodes")
    if isinstance(exc, errors.MetadataUnavailable | errors.StorageError):
        return S3Error("ServiceUnavailable", str(exc))
    return S3Error("InternalError", str(exc))
