"""CIDs as raw bytes, and their conversion to multiformats ``CID`` objects at the API edge.

Inside repo-stream a CID is always the ``bytes`` of its binary form (for repo blocks: CIDv1,
dag-cbor ``0x71``, sha2-256, 36 bytes). Building a multiformats ``CID`` costs ~100 us, more than
parsing a whole block, so that only happens for the few CIDs a user sees (the commit's fields).

Spec: multiformats CID (https://github.com/multiformats/cid), atproto data model, "Link and CID
formats".
"""

from __future__ import annotations

import hashlib
from base64 import b32encode as _b32encode
from typing import TYPE_CHECKING

from ..errors import CidError

if TYPE_CHECKING:  # imported on first use: multiformats takes ~70 ms to import
    from multiformats import CID

__all__ = ["DAG_CBOR_SHA256_PREFIX", "RAW_SHA256_PREFIX", "cid_str", "cid_text", "dag_cbor_cid", "is_plain_cid", "to_cid"]

#: The first 4 bytes of every CIDv1 dag-cbor sha2-256 CID: version 1, codec 0x71, hash 0x12, length 32.
DAG_CBOR_SHA256_PREFIX = b"\x01\x71\x12\x20"
#: The first 4 bytes of a CIDv1 raw-codec (0x55) sha2-256 CID, as used for blobs.
RAW_SHA256_PREFIX = b"\x01\x55\x12\x20"


def dag_cbor_cid(block: bytes) -> bytes:
    """Return the 36-byte CIDv1 (dag-cbor, sha2-256) of ``block``, as raw bytes."""
    return DAG_CBOR_SHA256_PREFIX + hashlib.sha256(block).digest()


def is_plain_cid(raw: bytes) -> bool:
    """Whether ``raw`` is the usual repo CID (v1, dag-cbor, sha2-256, 36 bytes): valid without a look."""
    return len(raw) == 36 and raw[:4] == DAG_CBOR_SHA256_PREFIX


def to_cid(raw: bytes) -> CID:
    """Convert raw CID bytes to a multiformats ``CID`` whose ``str()`` is the usual base32 form.

    Raises:
        CidError: ``raw`` is not a valid binary CID.
    """
    from multiformats import CID

    try:
        return CID.decode(bytes(raw)).set(base="base32")
    except Exception as exc:  # multiformats raises assorted ValueError/KeyError subclasses
        raise CidError(f"invalid CID bytes {bytes(raw).hex()}: {exc}") from exc


def cid_str(raw: bytes) -> str:
    """Return a printable form of raw CID bytes for error messages: base32 when valid, else hex."""
    if is_plain_cid(raw):
        return cid_text(raw)
    from multiformats import CID

    try:
        return str(CID.decode(bytes(raw)).set(base="base32"))
    except Exception:
        return "0x" + bytes(raw).hex()


def cid_text(raw: bytes) -> str:
    """Return the usual string form of raw CID bytes: multibase base32 (``bafy...``) for CIDv1.

    CIDv0 gives its base58btc form (``Qm...``), bytes that are no CID ``0x`` + hex. This is the
    record CID emitted with ``DriverBuilder.with_record_cids``.
    """
    if raw[:1] == b"\x01":
        return "b" + _b32encode(raw).decode("ascii").lower().rstrip("=")
    from multiformats import CID

    try:
        return str(CID.decode(bytes(raw)))
    except Exception:
        return "0x" + bytes(raw).hex()
