"""S3's XML bodies: the documents the gateway answers with, and the ones
clients send (parsed with defusedxml: no entities, no external references).

A document is built from nested ``(tag, value)`` pairs: a value is text
(str, int, bool) or a list of pairs (child elements); None leaves the
element out.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass

from defusedxml import DefusedXmlException
from defusedxml import ElementTree as SafeET

from .errors import S3Error

NAMESPACE = "http://s3.amazonaws.com/doc/2006-03-01/"
# The largest request document read (bytes): a DeleteObjects of 1,000
# keys of 1,024 bytes fits.
BODY_MAX = 2 << 20

Value = str | int | bool | None | list["Node"]
Node = tuple[str, Value]


def _fill(parent: ET.Element, children: Sequence[Node]) -> None:
    for tag, value in children:
        if value is None:
            continue
        child = ET.SubElement(parent, tag)
        if isinstance(value, list):
            _fill(child, value)
        elif isinstance(value, bool):
            child.text = "true" if value else "false"
        else:
            child.text = str(value)


def document(root: str, children: Sequence[Node], text: str | None = None) -> bytes:
    """The XML document ``<root xmlns=S3>children</root>`` (or ``text``
    inside), with its declaration.
    """
    element = ET.Element(root, xmlns=NAMESPACE)
    element.text = text
    _fill(element, children)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(element)


def error(exc: S3Error, resource: str, request_id: str) -> bytes:
    """The ``<Error>`` body of an S3 error (no namespace, as S3 sends it)."""
    element = ET.Element("Error")
    _fill(
        element,
        [("Code", exc.code), ("Message", exc.message), *exc.extra.items(),
         ("Resource", resource), ("RequestId", request_id)],
    )  # fmt: skip
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(element)


def timestamp(seconds: float) -> str:
    """An S3 timestamp (ISO 8601 in UTC, milliseconds)."""
    ms = int(seconds * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{ms:03d}Z"


def _parse(body: bytes, root: str) -> ET.Element:
    """The root element of a client's document, which must be ``root``
    (in S3's namespace or none). Raises ``MalformedXML``.
    """
    try:
        element = SafeET.fromstring(body)
    except (ET.ParseError, DefusedXmlException):
        raise S3Error("MalformedXML") from None
    if _local(element.tag) != root:
        raise S3Error("MalformedXML")
    return element


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _children(element: ET.Element, tag: str) -> list[ET.Element]:
    return [c for c in element if _local(c.tag) == tag]


def _text(element: ET.Element, tag: str) -> str | None:
    found = _children(element, tag)
    return None if not found else (found[0].text or "")


@dataclass(frozen=True)
class CompletedPart:
    """A part a CompleteMultipartUpload names: its number and ETag."""

    number: int
    etag: str


def completed_parts(body: bytes) -> list[CompletedPart]:
    """The parts of a ``<CompleteMultipartUpload>`` document, in the order
    given. Raises ``MalformedXML``.
    """
    parts = []
    for p in _children(_parse(body, "CompleteMultipartUpload"), "Part"):
        number, etag = _text(p, "PartNumber"), _text(p, "ETag")
        if number is None or etag is None or not number.strip().isdigit():
            raise S3Error("MalformedXML")
        parts.append(CompletedPart(int(number), etag.strip()))
    if not parts:
        raise S3Error("MalformedXML", "a CompleteMultipartUpload must name at least one part")
    return parts


@dataclass(frozen=True)
class DeleteRequest:
    """A DeleteObjects request: the keys, and whether only errors are reported."""

    keys: list[str]
    quiet: bool


def delete_request(body: bytes) -> DeleteRequest:
    """The keys of a ``<Delete>`` document (1 to 1,000). Raises ``MalformedXML``."""
    root = _parse(body, "Delete")
    keys = []
    for o in _children(root, "Object"):
        key = _text(o, "Key")
        if not key:
            raise S3Error("MalformedXML")
        keys.append(key)
    if not 1 <= len(keys) <= 1000:
        raise S3Error("MalformedXML", "a Delete must name 1 to 1,000 keys")
    return DeleteRequest(keys, (_text(root, "Quiet") or "").strip().lower() == "true")


def location_constraint(body: bytes) -> str | None:
    """The region a ``<CreateBucketConfiguration>`` asks for (None: none).
    Raises ``MalformedXML``.
    """
    if not body.strip():
        return None
    return _text(_parse(body, "CreateBucketConfiguration"), "LocationConstraint")
