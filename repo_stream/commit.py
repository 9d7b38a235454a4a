"""The signed repo commit object.

Spec: atproto repository, "Commit Objects" (https://atproto.com/specs/repository): a DAG-CBOR map
``{did: str, version: 3, data: CID, rev: str, prev: CID | null, sig: bytes}``.
"""

from __future__ import annotations

from dataclasses import dataclass

import dag_cbor
from multiformats import CID

from .cid import cid_str, to_cid
from .dagcbor import DagCborError, StrictDecoder, link_cid
from .errors import CommitError

__all__ = ["Commit", "decode_commit"]


@dataclass(frozen=True, slots=True)
class Commit:
    """A repo commit, with CIDs as multiformats ``CID`` objects (``str(cid)`` is base32).

    Attributes:
        did: the account DID, e.g. ``"did:plc:..."``.
        version: the repo format version; always 3 here.
        data: CID of the root MST node.
        rev: the revision, a TID string.
        prev: CID of the previous commit, or ``None`` (usual in v3 repos).
        sig: the signature bytes over the unsigned commit (not checked by the walk).
    """

    did: str
    version: int
    data: CID
    rev: str
    prev: CID | None
    sig: bytes


def decode_commit(block: bytes, cid: bytes, *, strict: bool = False) -> tuple[Commit, bytes]:
    """Decode a commit block; return the :class:`Commit` and the raw bytes of its ``data`` CID.

    Args:
        block: the commit block's DAG-CBOR bytes.
        cid: the commit's raw CID bytes, for error messages.
        strict: also require canonical DAG-CBOR (checked with the ``dag-cbor`` package: minimal
            integers, sorted map keys, no floats where ints belong...), as a signed commit is.

    Raises:
        CommitError: not a CBOR map, a field missing or of the wrong type, ``version`` != 3, or
            (strict) not canonical DAG-CBOR.
    """
    where = f"commit {cid_str(cid)}"
    if strict:
        try:
            dag_cbor.decode(block)
        except Exception as exc:
            first = str(exc).splitlines()[-1].strip() if str(exc) else type(exc).__name__
            raise CommitError(f"{where}: not canonical DAG-CBOR: {first}") from exc
    try:
        obj = StrictDecoder(max_depth=16).decode(block)
    except DagCborError as exc:
        raise CommitError(f"{where}: not valid DAG-CBOR: {exc}") from exc
    if not isinstance(obj, dict):
        raise CommitError(f"{where}: expected a map, got {type(obj).__name__}")
    for name, kind in (("did", str), ("version", int), ("rev", str), ("sig", bytes)):
        if name not in obj:
            raise CommitError(f"{where}: field {name!r} is missing")
        if type(obj[name]) is not kind:
            raise CommitError(f"{where}: field {name!r} should be {kind.__name__}, got {type(obj[name]).__name__}")
    if obj["version"] != 3:
        raise CommitError(f"{where}: version is {obj['version']}, only 3 is supported")
    if "data" not in obj:
        raise CommitError(f"{where}: field 'data' is missing")
    data = link_cid(obj["data"])
    if data is None:
        raise CommitError(f"{where}: field 'data' should be a CID link, got {obj['data']!r:.80}")
    if "prev" not in obj:
        raise CommitError(f"{where}: field 'prev' is missing")
    prev = None
    if obj["prev"] is not None:
        prev = link_cid(obj["prev"])
        if prev is None:
            raise CommitError(f"{where}: field 'prev' should be a CID link or null, got {obj['prev']!r:.80}")
    try:
        commit = Commit(
            did=obj["did"],
            version=obj["version"],
            data=to_cid(data),
            rev=obj["rev"],
            prev=to_cid(prev) if prev is not None else None,
            sig=obj["sig"],
        )
    except Exception as exc:
        raise CommitError(f"{where}: {exc}") from exc
    return commit, data
