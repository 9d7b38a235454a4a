"""The signed repo commit object, and the check of its signature.

Spec: atproto repository, "Commit Objects" (https://atproto.com/specs/repository): a DAG-CBOR map
``{did: str, version: 3, data: CID, rev: str, prev: CID | null, sig: bytes}``; ``sig`` signs the
SHA-256 of the canonical DAG-CBOR of that map without ``sig`` (atproto cryptography spec).

**Extra fields.** The spec lists those six fields; a commit block may carry more (a later
version, or a PDS adding its own). The reference implementation signs and verifies "the commit
object without ``sig``", so extra fields are signed too. :func:`decode_commit` therefore keeps
the raw block in :attr:`Commit.block`, and :meth:`Commit.verify_signature` re-encodes the
dataclass's five fields together with the block's extra fields (if any): a commit whose extra
fields were added or changed after signing does not verify, and neither does one whose
dataclass fields were changed (``dataclasses.replace``). Without extra fields the unsigned
bytes are exactly :func:`encode_unsigned_commit` of the fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import cbor2

from ..errors import CommitError, SignatureError
from .cid import cid_str, dag_cbor_cid, is_plain_cid, to_cid
from .dagcbor import DagCborError, StrictDecoder, link_cid

if TYPE_CHECKING:  # imported when used: multiformats, cryptography and cbrrr cost ~0.15 s at start-up
    from multiformats import CID

    from ..crypto.didkey import PublicKey
    from ..crypto.signature import VerifyingKey

#: The fields of a v3 commit.
COMMIT_FIELDS: Final = frozenset({"did", "version", "data", "rev", "prev", "sig"})

__all__ = ["COMMIT_FIELDS", "Commit", "decode_commit", "encode_commit", "encode_unsigned_commit"]


@dataclass(frozen=True)
class Commit:
    """A repo commit, with CIDs as multiformats ``CID`` objects (``str(cid)`` is base32).

    A commit read from a CAR makes :attr:`data` and :attr:`prev` on first use (multiformats takes
    ~70 ms to import, and a walk needs neither); :attr:`data_bytes` is the raw CID at no cost.

    Attributes:
        did: the account DID, e.g. ``"did:plc:..."``.
        version: the repo format version; always 3 here.
        data: CID of the root MST node.
        rev: the revision, a TID string.
        prev: CID of the previous commit, or ``None`` (usual in v3 repos).
        sig: the signature bytes over the unsigned commit (not checked by the walk; see
            :meth:`verify_signature`).
        block: the commit block as read (``b""`` for a commit built by hand), kept so that
            :meth:`verify_signature` covers fields beyond the six above (module docstring).
            Not part of ``repr`` or equality.
    """

    did: str
    version: int
    data: CID
    rev: str
    prev: CID | None
    sig: bytes
    block: bytes = field(default=b"", repr=False, compare=False)

    @classmethod
    def _read(cls, did: str, version: int, data: bytes, rev: str, prev: bytes | None, sig: bytes, block: bytes) -> Commit:
        """A commit whose ``data`` and ``prev`` (raw CIDs, each valid: see :func:`is_plain_cid`)
        become ``CID`` objects on first use, in :meth:`__getattr__`."""
        self = object.__new__(cls)
        for name, value in (("did", did), ("version", version), ("rev", rev), ("sig", sig), ("block", block)):
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_raw_data", data)
        object.__setattr__(self, "_raw_prev", prev)
        return self

    def __getattr__(self, name: str) -> Any:
        """Make ``data`` or ``prev`` of a commit made by :meth:`_read` (only called while unset)."""
        key = f"_raw_{name}"
        if name not in ("data", "prev") or key not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        raw: bytes | None = self.__dict__[key]
        value = None if raw is None else to_cid(raw)
        object.__setattr__(self, name, value)
        return value

    @property
    def data_bytes(self) -> bytes:
        """:attr:`data` as raw binary CID bytes (for a commit read from a CAR, without making the ``CID``)."""
        raw = self.__dict__.get("_raw_data")
        return bytes(self.data) if raw is None else raw

    @property
    def cid(self) -> CID:
        """The commit's CID (dag-cbor, sha2-256) computed from :attr:`block`, or from the
        fields encoded canonically when there is no block."""
        block = self.block or encode_commit(self.did, self.data_bytes, self.rev, self._prev_bytes(), self.sig, self.version)
        return to_cid(dag_cbor_cid(block))

    def _prev_bytes(self) -> bytes | None:
        if "_raw_prev" in self.__dict__ and "prev" not in self.__dict__:
            raw: bytes | None = self.__dict__["_raw_prev"]
            return raw
        return None if self.prev is None else bytes(self.prev)

    def unsigned_bytes(self) -> bytes:
        """The bytes :attr:`sig` signs: the canonical DAG-CBOR of the commit without ``sig``.

        The five fields of this object (``did``, ``version``, ``data``, ``rev``, ``prev``), plus
        any extra fields of :attr:`block` when it is canonical DAG-CBOR (module docstring). A
        block that is not canonical cannot be what was signed field for field (the signer
        encodes canonically), so then only the five fields count.

        Spec: atproto repository, "Commit Objects"; atproto cryptography.
        """
        if self.block:
            try:
                import cbrrr

                obj = cbrrr.decode_dag_cbor(self.block)
            except ValueError:
                obj = None
            if isinstance(obj, dict) and not COMMIT_FIELDS.issuperset(obj):
                unsigned = {key: value for key, value in obj.items() if key != "sig"}
                prev = self._prev_bytes()
                unsigned.update(
                    did=self.did,
                    version=self.version,
                    data=cbrrr.CID(self.data_bytes),
                    rev=self.rev,
                    prev=None if prev is None else cbrrr.CID(prev),
                )
                return cbrrr.encode_dag_cbor(unsigned)
        return encode_unsigned_commit(self.did, self.data_bytes, self.rev, self._prev_bytes(), self.version)

    def verify_signature(self, key: str | PublicKey | VerifyingKey) -> None:
        """Check :attr:`sig` against ``key``; return ``None`` if the commit is signed by it.

        Args:
            key: the account's signing key: a did:key string (``"did:key:zQ3s..."`` for
                secp256k1, ``"did:key:zDn..."`` for P-256) or a ``cryptography``
                ``EllipticCurvePublicKey`` on one of those curves, or a
                :class:`~repo_stream.crypto.signature.VerifyingKey`. For an account it is the
                ``#atproto`` verification method of its DID document.

        Raises:
            SignatureError: the key cannot be parsed or is on another curve; ``sig`` is not a
                64-byte compact signature, is high-S, or does not verify over
                :meth:`unsigned_bytes` (a wrong key or a changed commit). The message names
                the commit's CID and DID, and the key.

        Spec: atproto repository, "Commit Objects"; atproto cryptography (ECDSA over SHA-256,
        low-S, compact signatures).
        """
        from ..crypto.signature import verifying_key

        where = f"commit {self.cid} of {self.did}"
        try:
            verifier = verifying_key(key)
        except SignatureError as exc:
            raise SignatureError(f"{where}: {exc}") from exc
        verifier.verify(self.unsigned_bytes(), self.sig, where=where)


def decode_commit(block: bytes, cid: bytes, *, strict: bool = False) -> tuple[Commit, bytes]:
    """Decode a commit block; return the :class:`Commit` and the raw bytes of its ``data`` CID.

    Args:
        block: the commit block's DAG-CBOR bytes.
        cid: the commit's raw CID bytes, for error messages.
        strict: also require canonical DAG-CBOR (minimal integers and lengths, sorted map keys,
            64-bit floats: the block must re-encode to itself with cbrrr), as a signed commit is.

    Raises:
        CommitError: not a CBOR map, a field missing or of the wrong type, ``version`` != 3, or
            (strict) not canonical DAG-CBOR.
    """
    where = f"commit {cid_str(cid)}"
    if strict:
        # Canonical when cbrrr's canonical encoding of what it decodes gives the same bytes back
        # (cbrrr imports in ~15 ms; the dag-cbor package, which checks as it decodes, in ~90 ms).
        import cbrrr

        try:
            raw = bytes(block)
            canonical = cbrrr.encode_dag_cbor(cbrrr.decode_dag_cbor(raw)) == raw
        except Exception as exc:
            first = str(exc).splitlines()[-1].strip() if str(exc) else type(exc).__name__
            raise CommitError(f"{where}: not canonical DAG-CBOR: {first}") from exc
        if not canonical:
            raise CommitError(f"{where}: not canonical DAG-CBOR (minimal integers and lengths, sorted map keys, 64-bit floats)")
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
    if is_plain_cid(data) and (prev is None or is_plain_cid(prev)):
        return Commit._read(obj["did"], obj["version"], data, obj["rev"], prev, obj["sig"], bytes(block)), data
    try:
        commit = Commit(
            did=obj["did"],
            version=obj["version"],
            data=to_cid(data),
            rev=obj["rev"],
            prev=to_cid(prev) if prev is not None else None,
            sig=obj["sig"],
            block=bytes(block),
        )
    except Exception as exc:
        raise CommitError(f"{where}: {exc}") from exc
    return commit, data


def _commit_map(did: str, data_cid: bytes, rev: str, prev: bytes | None, version: int) -> dict[str, Any]:
    return {
        "did": did,
        "version": version,
        "data": cbor2.CBORTag(42, b"\x00" + bytes(data_cid)),
        "rev": rev,
        "prev": None if prev is None else cbor2.CBORTag(42, b"\x00" + bytes(prev)),
    }


def encode_unsigned_commit(did: str, data_cid: bytes, rev: str, prev: bytes | None = None, version: int = 3) -> bytes:
    """Encode the unsigned commit ``{did, version, data, rev, prev}`` (no ``sig`` field).

    These are the bytes an atproto signing key signs (sha-256 then ECDSA, low-S).

    Args:
        did: the account DID string (not checked).
        data_cid: raw CID of the MST root node.
        rev: the revision string, normally a TID (not checked).
        prev: raw CID of the previous commit, or ``None`` (encoded as null).
        version: the ``version`` field; any value is encoded as given.

    Returns:
        Canonical DAG-CBOR bytes, keys in the order did, rev, data, prev, version.

    Spec: atproto repository, "Commit Objects".
    """
    return cbor2.dumps(_commit_map(did, data_cid, rev, prev, version), canonical=True)


def encode_commit(
    did: str, data_cid: bytes, rev: str, prev: bytes | None = None, sig: bytes = b"", version: int = 3
) -> bytes:
    """Encode a signed commit ``{did, version, data, rev, prev, sig}`` in canonical DAG-CBOR.

    No validation: any ``version``, an empty or bogus ``sig``, any strings are encoded as given.

    Args:
        did: the account DID string.
        data_cid: raw CID of the MST root node (written as a link).
        rev: the revision string.
        prev: raw CID of the previous commit, or ``None`` (encoded as null).
        sig: signature bytes (encoded as a CBOR byte string).
        version: the ``version`` field, 3 for current repos.

    Returns:
        The commit block bytes, keys in the order did, rev, sig, data, prev, version.

    Spec: atproto repository, "Commit Objects".
    """
    obj = _commit_map(did, data_cid, rev, prev, version)
    obj["sig"] = bytes(sig)
    return cbor2.dumps(obj, canonical=True)
