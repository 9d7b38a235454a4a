"""Verifying ``#commit`` and ``#sync`` events of the firehose on their own (sync 1.1).

Spec: atproto sync, "Commit Validation" (https://atproto.com/specs/sync; proposal 0006, "Sync
v1.1"); lexicon ``com.atproto.sync.subscribeRepos``. :func:`verify_commit` checks, in order
(each failed rule raises its own :class:`~repo_stream.errors.CommitVerifyError` subclass naming
the DID, rev, key or CID):

1. the message decodes (header ``#commit``, body fields of the right types:
   :class:`MalformedEventError`); at most 200 ops (:class:`TooManyOpsError`); ``blocks`` at most
   2,000,000 bytes and not ``tooBig`` (:class:`BlocksTooLargeError`);
2. each op well formed (:class:`InvalidOpError`), no path twice (:class:`DuplicateOpPathError`),
   updates and deletes carry ``prev`` when the event has ``prevData`` (:class:`OpPrevMissingError`);
3. ``blocks`` is a CAR whose blocks hash to their CIDs (:class:`MalformedCarError`), its root is
   the event's ``commit`` (:class:`CommitNotRootError`), the commit block is in it
   (:class:`MissingCommitBlockError`) and is a v3 commit in canonical DAG-CBOR
   (:class:`MalformedCommitError`); its ``did`` is ``repo`` (:class:`CommitDidMismatchError`)
   and its ``rev`` the event's (:class:`RevMismatchError`);
4. ``rev`` is a TID (:class:`InvalidRevError`), not more than ``max_clock_skew`` seconds ahead of
   the clock (:class:`FutureRevError`), and above the held rev (:class:`StaleRevError`);
5. the signature verifies with ``key`` (:class:`CommitSignatureError`);
6. with ``prevData``: in the new tree each create's and update's path holds its ``cid``
   (:class:`OpCidMismatchError`) and each delete's path nothing (:class:`DeletedKeyPresentError`);
   creates' and updates' record blocks are present (:class:`MissingRecordBlockError`) and valid
   (:class:`MalformedRecordError`); inverting the ops gives ``prevData``
   (:class:`InversionMismatchError`: the tree changes keys no op names, or a ``prev`` is not
   what the old tree held); any node these need must be in the CAR
   (:class:`MissingProofBlockError`) and obey the MST rules (:class:`MalformedTreeError`);
   without ``prevData``: :class:`MissingPrevDataError` unless ``require_prev_data=False``, when
   the commit is accepted on its signature alone (``result.inverted`` is False);
7. continuity, last: with ``prev`` (the state held), ``since`` must be ``prev.rev`` and
   ``prevData`` ``prev.data``, else :class:`~repo_stream.errors.OutOfSyncError`, whose
   ``.result`` is the commit verified on its own (refetch the repo).

With the C core, a message of the usual shape (the known ``#commit`` fields only, in canonical
DAG-CBOR; well-formed ops; a CAR with the usual one-root header whose blocks all have dag-cbor
sha2-256 CIDs and hash to them; a commit block of the six usual fields whose did and rev are the
event's) is read in one C pass (``_native.commit_event``: the frame, the ops, the CAR and its
CID checks, the commit, and step 6's tree work over the CAR's bytes in place, its errors kept as
values and raised here in the order of the checks). Any other message, and every one without the
C core, goes the reference way below (:func:`_read_event`), which gives its result or its error:
the C pass accepts only messages the reference accepts, with the same values (tested on both,
and fuzzed).
"""

from __future__ import annotations

import re
import time as _time
from base64 import b32decode
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Generic, NamedTuple, TypeVar, overload

from cbrrr import CID as _CbrrrCID
from cbrrr import _cbrrr
from cbrrr import encode_dag_cbor as _cbrrr_encode

from ..core import implementation
from ..core.car import DEFAULT_MAX_BLOCK_SIZE
from ..core.cid import cid_str, cid_text, is_plain_cid
from ..core.commit import Commit, decode_commit
from ..core.mst import is_valid_key
from ..core.walk import DEFAULT_MAX_DEPTH
from ..errors import (
    BlocksTooLargeError,
    CarError,
    CidMismatchError,
    CommitDidMismatchError,
    CommitError,
    CommitNotRootError,
    CommitSignatureError,
    DeletedKeyPresentError,
    DuplicateOpPathError,
    EventDecodeError,
    FutureRevError,
    InvalidOpError,
    InvalidRevError,
    InversionMismatchError,
    MalformedCarError,
    MalformedCommitError,
    MalformedEventError,
    MalformedRecordError,
    MalformedTreeError,
    MissingCommitBlockError,
    MissingPrevDataError,
    MissingProofBlockError,
    MissingRecordBlockError,
    MstError,
    OpCidMismatchError,
    OpPrevMissingError,
    OutOfSyncError,
    RepoStreamError,
    RevMismatchError,
    SignatureError,
    StaleRevError,
    TooManyOpsError,
    UnknownSubtreeError,
)
from ..records.values import JsonValue, Link, record_json
from .events import DEFAULT_MAX_MESSAGE_BYTES, decode_frame
from .invert import _CODES, ACTIONS, Op, lookup_and_invert
from .partial import read_car_slice

try:
    from .. import _native
except ImportError:  # the C core is not built: the reference runs
    _native = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from ..crypto.didkey import PublicKey
    from ..crypto.signature import VerifyingKey

__all__ = [
    "MAX_BLOCKS_BYTES",
    "MAX_OPS",
    "DEFAULT_MAX_CLOCK_SKEW",
    "RepoState",
    "VerifiedCommit",
    "VerifiedOp",
    "VerifiedSync",
    "parse_cid",
    "tid_timestamp",
    "verify_commit",
    "verify_sync",
]

#: The most ops a ``#commit`` may carry.
MAX_OPS: Final = 200
#: The most bytes a ``#commit``'s ``blocks`` may hold.
MAX_BLOCKS_BYTES: Final = 2_000_000
#: How far (seconds) a commit's rev may be ahead of the local clock by default.
DEFAULT_MAX_CLOCK_SKEW: Final = 300.0

V = TypeVar("V")
_TID_RE: Final = re.compile(r"[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}")
# base32-sortable digits to those int(..., 32) reads, the same values
_S32_TO_B32: Final = str.maketrans("234567abcdefghijklmnopqrstuvwxyz", "0123456789abcdefghijklmnopqrstuv")


def tid_timestamp(tid: str) -> int | None:
    """The microseconds since the Unix epoch in a TID, or ``None`` if ``tid`` is not a valid TID
    (13 characters of base32-sortable, the first one of ``234567abcdefghij``).

    Spec: atproto record key, "Record Key Type: tid".
    """
    if type(tid) is not str or len(tid) != 13 or not _TID_RE.fullmatch(tid):
        return None
    return int(tid.translate(_S32_TO_B32), 32) >> 10


def parse_cid(value: object) -> bytes:
    """The raw bytes of a CID given as a :class:`~repo_stream.records.values.Link` (or any cbrrr
    ``CID``), a multiformats ``CID``, a CID string (base32 ``b...`` or any multibase multiformats
    reads), a CBOR tag 42, or raw bytes.

    Raises:
        ValueError: not a CID.
    """
    raw = getattr(value, "cid_bytes", None)
    if isinstance(raw, bytes):
        return raw
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        if value[:1] == "b" and len(value) < 200:
            try:
                text = value[1:].upper()
                return b32decode(text + "=" * (-len(text) % 8))
            except ValueError:
                pass
        from multiformats import CID

        try:
            return bytes(CID.decode(value))
        except Exception as exc:
            raise ValueError(f"not a CID: {value[:100]!r}: {exc}") from None
    tag = getattr(value, "tag", None)
    if tag == 42 and isinstance(getattr(value, "value", None), bytes) and value.value[:1] == b"\x00":  # type: ignore[attr-defined]
        return bytes(value.value[1:])  # type: ignore[attr-defined]
    if hasattr(value, "__bytes__") and type(value).__name__ == "CID":
        return bytes(value)
    raise ValueError(f"not a CID: {type(value).__name__}")


class RepoState(NamedTuple):
    """The state held for a repo: its last verified ``rev`` and MST root ``data`` (a CID string,
    a multiformats ``CID``, a :class:`~repo_stream.records.values.Link` or raw bytes)."""

    rev: str
    data: object


class VerifiedOp(NamedTuple, Generic[V]):
    """One op of a verified commit (a named tuple: cheap to make, one per op).

    Attributes:
        action: ``"create"``, ``"update"`` or ``"delete"``.
        path: the repo key ``collection/rkey``.
        cid: the record CID after the commit (``None`` for a delete); ``str()`` is base32.
        prev: the record CID before it (``None`` for a create, or when the event has none).
        value: the record processed (``record_json`` by default) for creates and updates.
        block: the record block (DAG-CBOR bytes) for creates and updates.
    """

    action: str
    path: str
    cid: Link | None
    prev: Link | None
    value: V | None
    block: bytes | None

    @property
    def collection(self) -> str:
        """The NSID before the ``/``."""
        return self.path.partition("/")[0]

    @property
    def rkey(self) -> str:
        """The record key after the ``/``."""
        return self.path.partition("/")[2]


# VerifiedOp(*fields) without the named tuple's Python __new__ (the same tuple, made in C)
_new_op: Callable[[type[VerifiedOp[Any]], tuple[Any, ...]], VerifiedOp[Any]] = tuple.__new__


@dataclass(frozen=True, slots=True)
class VerifiedCommit(Generic[V]):
    """A ``#commit`` event verified by :func:`verify_commit`.

    Attributes:
        did: the account (``repo``). rev: the commit's rev (a TID). since: the previous rev
        the event names, or ``None``. data: the new MST root. commit: the commit's CID.
        prev_data: the MST root before the commit (``prevData``), or ``None``.
        inverted: True when inversion reproduced ``prev_data`` (False: accepted on the
        signature alone, ``require_prev_data=False``). ops: the ops, in the event's order.
        seq and time: the event's, when given.
    """

    did: str
    rev: str
    since: str | None
    data: Link
    commit: Link
    prev_data: Link | None
    inverted: bool
    ops: tuple[VerifiedOp[V], ...]
    seq: int | None
    time: str | None

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values (CIDs as base32 strings)."""
        return {
            "did": self.did,
            "rev": self.rev,
            "since": self.since,
            "data": str(self.data),
            "commit": str(self.commit),
            "prevData": None if self.prev_data is None else str(self.prev_data),
            "inverted": self.inverted,
            "seq": self.seq,
            "time": self.time,
            "ops": [
                {
                    "action": op.action,
                    "path": op.path,
                    "cid": None if op.cid is None else str(op.cid),
                    "prev": None if op.prev is None else str(op.prev),
                    "value": op.value,
                }
                for op in self.ops
            ],
        }


_COMMIT_SLOTS: Final = tuple(getattr(VerifiedCommit, name).__set__ for name in VerifiedCommit.__slots__)


def _verified_commit(
    did: str, rev: str, since: str | None, data: Link, commit: Link, prev_data: Link | None, inverted: bool,
    ops: tuple[VerifiedOp[Any], ...], seq: int | None, time: str | None,
) -> VerifiedCommit[Any]:
    """``VerifiedCommit(...)`` with its slots set directly: the same object, without the frozen
    dataclass's ``__init__`` (one ``object.__setattr__`` call per field: ~1.4 us a commit, this
    ~0.6 us)."""
    result: VerifiedCommit[Any] = object.__new__(VerifiedCommit)
    s_did, s_rev, s_since, s_data, s_commit, s_prev_data, s_inverted, s_ops, s_seq, s_time = _COMMIT_SLOTS
    s_did(result, did)
    s_rev(result, rev)
    s_since(result, since)
    s_data(result, data)
    s_commit(result, commit)
    s_prev_data(result, prev_data)
    s_inverted(result, inverted)
    s_ops(result, ops)
    s_seq(result, seq)
    s_time(result, time)
    return result


@dataclass(frozen=True, slots=True)
class VerifiedSync:
    """A ``#sync`` event verified by :func:`verify_sync`: ``did``, ``rev``, ``data`` (the MST
    root), ``commit`` (the commit's CID), and the event's ``seq`` and ``time`` when given."""

    did: str
    rev: str
    data: Link
    commit: Link
    seq: int | None
    time: str | None

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values (CIDs as base32 strings)."""
        return {"did": self.did, "rev": self.rev, "data": str(self.data), "commit": str(self.commit), "seq": self.seq, "time": self.time}


# ------------------------------------------------------------------------------------ helpers


def _body(message: object, kind: str, max_bytes: int) -> Mapping[str, object]:
    if isinstance(message, (bytes, bytearray, memoryview)):
        try:
            frame = decode_frame(message, max_bytes=max_bytes)
        except EventDecodeError as exc:
            raise MalformedEventError(str(exc)) from exc
        if frame.type != kind:
            raise MalformedEventError(f"subscribeRepos message of type {frame.type[:100]!r}, expected {kind!r}")
        return frame.body
    if isinstance(message, Mapping):
        return message
    raise MalformedEventError(f"a {kind} event must be the message bytes or a decoded body map, not {type(message).__name__}")


def _field(body: Mapping[str, object], name: str, kind: type, what: str, *, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if type(value) is not kind:
        got = "missing" if name not in body else f"a {type(value).__name__}"
        raise MalformedEventError(f"{what}: field {name!r} should be a {kind.__name__}, got {got}")
    return value


_verifying_key: list[Callable[[str | PublicKey | VerifyingKey], VerifyingKey]] = []


def _cid_field(value: object, what: str) -> bytes:
    try:
        return parse_cid(value)
    except ValueError as exc:
        raise MalformedEventError(f"{what}: {exc}") from None


def _verifier(key: str | PublicKey | VerifyingKey, did: str, rev: str) -> VerifyingKey:
    if not _verifying_key:
        from ..crypto.signature import verifying_key  # imports cryptography: on first use

        _verifying_key.append(verifying_key)
    try:
        return _verifying_key[0](key)
    except SignatureError as exc:
        raise CommitSignatureError(f"commit of {did} at rev {rev}: {exc}", did=did, rev=rev) from exc


_cbrrr_decode_c: Callable[[bytes, type[_CbrrrCID], bool], tuple[Any, int]] = _cbrrr.decode_dag_cbor
_COMMIT_KEYS: Final = frozenset(("did", "version", "data", "rev", "prev", "sig"))


def _fast_commit(block: bytes, commit_cid: bytes) -> tuple[Commit, bytes, bytes] | None:
    """``(commit, data CID, unsigned bytes)`` of a commit block that is canonical DAG-CBOR with
    exactly the six fields of a version 3 commit of the usual types, decoded once (cbrrr, C);
    ``None`` for anything else, which :func:`decode_commit` then decodes or refuses with its
    own error. The result is what ``decode_commit(block, cid, strict=True)`` and
    ``Commit.unsigned_bytes()`` give (tested on every generated commit and fuzzed)."""
    try:
        obj, length = _cbrrr_decode_c(block, _CbrrrCID, False)  # cbrrr's C decoder (not its wrapper)
        if length != len(block) or type(obj) is not dict or obj.keys() != _COMMIT_KEYS or _cbrrr_encode(obj) != block:
            return None
    except Exception:
        return None
    did, version, data, rev, prev, sig = obj["did"], obj["version"], obj["data"], obj["rev"], obj["prev"], obj["sig"]
    if type(did) is not str or type(version) is not int or version != 3 or type(rev) is not str or type(sig) is not bytes:
        return None
    if type(data) is not _CbrrrCID or not (prev is None or type(prev) is _CbrrrCID):
        return None
    data_bytes = data.cid_bytes
    prev_bytes = None if prev is None else prev.cid_bytes
    if not is_plain_cid(data_bytes) or not (prev_bytes is None or is_plain_cid(prev_bytes)):
        return None
    del obj["sig"]
    unsigned = _cbrrr_encode(obj)
    return Commit._read(did, version, data_bytes, rev, prev_bytes, sig, bytes(block)), data_bytes, unsigned


def _load_commit(
    blocks_bytes: bytes, commit_cid: bytes | None, did: str, rev: str | None, where: str
) -> tuple[dict[bytes, bytes], Commit, bytes, bytes, bytes | None]:
    """Parse the CAR, find and decode the commit (``commit_cid``, or the CAR's root when
    ``None``); check it is the root and names ``did``. Returns the blocks, the commit, its data
    CID, its CID and the bytes its signature signs (None: ask the commit)."""
    try:
        roots, blocks = read_car_slice(blocks_bytes)
    except (CarError, CidMismatchError) as exc:
        raise MalformedCarError(f"{where}: blocks: {exc}", did=did, rev=rev) from exc
    if commit_cid is None:
        commit_cid = roots[0]
    if roots[0] != commit_cid:
        raise CommitNotRootError(f"{where}: the CAR's root is {cid_str(roots[0])}, not the commit {cid_str(commit_cid)}", did=did, rev=rev)
    block = blocks.get(commit_cid)
    if block is None:
        raise MissingCommitBlockError(f"{where}: the commit block {cid_str(commit_cid)} is not in the CAR", did=did, rev=rev)
    fast = _fast_commit(block, commit_cid)
    unsigned: bytes | None = None
    if fast is not None:
        commit, data, unsigned = fast
    else:
        try:
            commit, data = decode_commit(block, commit_cid, strict=True)
        except CommitError as exc:
            raise MalformedCommitError(f"{where}: {exc}", did=did, rev=rev) from exc
    if commit.did != did:
        raise CommitDidMismatchError(f"{where}: the commit {cid_str(commit_cid)} is for {commit.did[:200]!r}", did=did, rev=rev)
    if rev is not None and commit.rev != rev:
        raise RevMismatchError(f"{where}: the commit's rev is {commit.rev[:100]!r}", did=did, rev=rev)
    return blocks, commit, data, commit_cid, unsigned


def _check_signature(sig: bytes, unsigned: bytes, commit_cid: bytes, verifier: VerifyingKey, where: str, did: str, rev: str) -> None:
    try:
        verifier.verify(unsigned, sig, where=where)
        return
    except SignatureError:
        pass
    try:  # the message names the commit's CID: made only for a failure (base32 costs ~7 us)
        verifier.verify(unsigned, sig, where=f"{where}: commit {cid_str(commit_cid)}")
    except SignatureError as exc:
        raise CommitSignatureError(str(exc), did=did, rev=rev) from exc
    raise AssertionError("unreachable: a signature check failed once and passed again")  # pragma: no cover


# ------------------------------------------------------------------------------------ #commit


@overload
def verify_commit(
    message: bytes | bytearray | memoryview | Mapping[str, object],
    *,
    key: str | PublicKey | VerifyingKey,
    prev: RepoState | None = None,
    require_prev_data: bool = True,
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    now: float | None = None,
    check_keys: bool = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> VerifiedCommit[JsonValue]: ...


@overload
def verify_commit(
    message: bytes | bytearray | memoryview | Mapping[str, object],
    *,
    key: str | PublicKey | VerifyingKey,
    prev: RepoState | None = None,
    require_prev_data: bool = True,
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    now: float | None = None,
    check_keys: bool = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    process: Callable[[bytes], V],
) -> VerifiedCommit[V]: ...


def verify_commit(
    message: bytes | bytearray | memoryview | Mapping[str, object],
    *,
    key: str | PublicKey | VerifyingKey,
    prev: RepoState | None = None,
    require_prev_data: bool = True,
    max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
    now: float | None = None,
    check_keys: bool = True,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    process: Callable[[bytes], Any] = record_json,
) -> VerifiedCommit[Any]:
    """Verify a ``#commit`` event on its own, and its continuity with ``prev``.

    Args:
        message: the raw subscribeRepos message (header + body bytes, as received over the
            WebSocket) or a decoded body map (links as ``Link``/cbrrr ``CID``, multiformats
            ``CID``, CID strings or tag 42).
        key: the account's signing key: a did:key string (parsed once and cached), a
            ``cryptography`` public key or a :class:`~repo_stream.crypto.signature.VerifyingKey`.
        prev: the state held for the repo, or ``None`` (no continuity check).
        require_prev_data: refuse events without ``prevData`` (:class:`MissingPrevDataError`);
            False accepts them on the signature alone (``result.inverted`` is False).
        max_clock_skew: seconds the rev's timestamp may be ahead of ``now``.
        now: the local clock, seconds since the Unix epoch (default ``time.time()``).
        check_keys: require op paths and tree keys to be valid ``collection/rkey`` paths.
        max_message_bytes: refuse longer raw messages.
        process: turns each create's and update's record block into ``op.value``
            (default :func:`~repo_stream.records.values.record_json`; any block processor).

    Returns:
        The :class:`VerifiedCommit` (``.did``, ``.rev``, ``.data``, ``.commit``, ``.ops``...).

    Raises:
        CommitVerifyError: one subclass per rule (module docstring): a broken, forged or stale
            commit.
        OutOfSyncError: valid on its own but ``since`` or ``prevData`` differ from ``prev``;
            ``.result`` is the :class:`VerifiedCommit`.

    Spec: atproto sync, "Commit Validation"; lexicon com.atproto.sync.subscribeRepos#commit.
    """
    fast = None
    if _native is not None and type(message) is bytes and len(message) <= max_message_bytes and implementation.backend().name == "c":
        # The usual message read in one pass in C; None for any other, which the reference reads.
        fast = _native.commit_event(message, check_keys, Link, MAX_OPS, MAX_BLOCKS_BYTES, DEFAULT_MAX_BLOCK_SIZE, DEFAULT_MAX_DEPTH)
    commit: Commit | None = None
    tree: tuple[list[bytes | RepoStreamError | None], bytes | RepoStreamError | None] | None = None
    stamp: int | None
    if fast is not None:
        # blocks: only the records the ops name; tree: the tree work of step 6, done in the same
        # pass (over the CAR's bytes in place), its errors as values, raised below in order.
        did, rev, since, commit_value, prev_data_value, seq, when, items, blocks, data, sig, unsigned, tree, stamp = fast
        where = f"#commit of {did} at rev {rev}"
        commit_cid = commit_value.cid_bytes
        prev_data = None if prev_data_value is None else prev_data_value.cid_bytes
        if prev_data is None and require_prev_data:
            raise MissingPrevDataError(f"{where}: no prevData (the PDS predates sync 1.1); pass require_prev_data=False to accept it on its signature alone", did=did, rev=rev)
    else:
        did, rev, where, since, commit_value, commit_cid, prev_data_value, prev_data, seq, when, items, blocks, data, commit, unsigned = _read_event(
            message, require_prev_data, check_keys, max_message_bytes
        )
        sig = commit.sig
        stamp = tid_timestamp(rev)

    # 4. The rev (its TID's timestamp: read by the C pass, as tid_timestamp reads it).
    if stamp is None:
        raise InvalidRevError(f"{where}: rev {rev!r} is not a valid TID", did=did, rev=rev)
    clock = _time.time() if now is None else now
    if stamp / 1e6 > clock + max_clock_skew:
        raise FutureRevError(
            f"{where}: rev {rev!r} is {stamp / 1e6 - clock:.0f} s ahead of the clock (at most {max_clock_skew:g} s allowed)", did=did, rev=rev
        )
    if prev is not None and not rev > prev.rev:
        raise StaleRevError(f"{where}: rev {rev!r} does not follow the held rev {prev.rev[:100]!r} (replayed or older)", did=did, rev=rev)

    # 5. The signature.
    if unsigned is None:
        assert commit is not None
        unsigned = commit.unsigned_bytes()
    _check_signature(sig, unsigned, commit_cid, _verifier(key, did, rev), where, did, rev)

    # 6. The ops against the new tree, and inversion.
    verified: list[VerifiedOp[Any]] = []
    inverted = False
    helds: list[bytes | RepoStreamError | None] = []
    got: bytes | RepoStreamError | None = None
    if prev_data is not None:
        # The tree's whole work at once (in C when the C core is in use); its errors come back
        # as values, raised below in the order the checks come. The ops passed the checks the
        # reference's lookup_and_invert makes of them (above), so C is called directly.
        if tree is not None:
            helds, got = tree
        elif _native is not None and type(blocks) is dict and implementation.backend().name == "c":
            keys = [item[2] for item in items]
            helds, got = _native.lookup_and_invert(
                data, blocks, keys, [(_CODES[a], p, k, c, v) for a, p, k, c, v, _, _ in items], check_keys, DEFAULT_MAX_DEPTH
            )
        else:
            keys = [item[2] for item in items]
            helds, got = lookup_and_invert(data, blocks, keys, [Op(a, p, c, v) for a, p, _, c, v, _, _ in items], check_keys=check_keys)
    try:
        for i, (action, path, _, cid, op_prev, cid_link, prev_link) in enumerate(items):
            value: Any = None
            block: bytes | None = None
            if prev_data is not None:
                held = helds[i]
                if type(held) is not bytes and isinstance(held, RepoStreamError):
                    raise held
                if action == "delete":
                    if held is not None:
                        raise DeletedKeyPresentError(f"{where}: deleted path {path!r} still holds {cid_str(held)}", did=did, rev=rev)
                elif held != cid:
                    assert cid is not None
                    found = "nothing" if held is None else cid_str(held)
                    raise OpCidMismatchError(f"{where}: {action} of {path!r} names {cid_str(cid)} but the tree holds {found}", did=did, rev=rev)
            if cid is not None:
                block = blocks.get(cid)
                if block is None:
                    if prev_data is not None:
                        raise MissingRecordBlockError(f"{where}: record block {cid_str(cid)} of {path!r} is not in the CAR", did=did, rev=rev)
                else:
                    try:
                        value = process(block)
                    except Exception as exc:
                        raise MalformedRecordError(f"{where}: record {cid_str(cid)} of {path!r}: {exc}", did=did, rev=rev) from exc
                if cid_link is None:
                    cid_link = Link(cid)
            if prev_link is None and op_prev is not None:
                prev_link = Link(op_prev)
            verified.append(_new_op(VerifiedOp, (action, path, cid_link, prev_link, value, block)))
        if prev_data is not None:
            if isinstance(got, RepoStreamError):
                raise got
            assert got is not None
            if got != prev_data:
                raise InversionMismatchError(
                    f"{where}: inverting the ops gives {cid_str(got)}, not prevData {cid_str(prev_data)}:"
                    " the tree changes keys no op names, or an op's prev is not what the old tree held",
                    did=did,
                    rev=rev,
                )
            inverted = True
    except UnknownSubtreeError as exc:
        raise MissingProofBlockError(f"{where}: a proof block is missing: {exc}", cid=exc.cid, did=did, rev=rev) from exc
    except MstError as exc:
        raise MalformedTreeError(f"{where}: {exc}", did=did, rev=rev) from exc

    result: VerifiedCommit[Any] = _verified_commit(
        did,
        rev,
        since,
        Link(data),
        commit_value if type(commit_value) is Link else Link(commit_cid),
        None if prev_data is None else prev_data_value if type(prev_data_value) is Link else Link(prev_data),
        inverted,
        tuple(verified),
        seq,
        when,
    )

    # 7. Continuity.
    if prev is not None:
        try:
            held_data = parse_cid(prev.data)
        except ValueError as exc:
            raise ValueError(f"RepoState.data: {exc}") from None
        if since != prev.rev:
            raise OutOfSyncError(f"{where}: since is {since!r} but the held rev is {prev.rev!r}: refetch the repo", result=result)
        if prev_data is not None and prev_data != held_data:
            raise OutOfSyncError(
                f"{where}: prevData is {cid_text(prev_data)} but the held data is {cid_str(held_data)}: refetch the repo", result=result
            )
    return result


_Item = tuple[str, str, bytes, bytes | None, bytes | None, Link | None, Link | None]


def _read_event(
    message: bytes | bytearray | memoryview | Mapping[str, object], require_prev_data: bool, check_keys: bool, max_message_bytes: int
) -> tuple[str, str, str, str | None, object, bytes, object, bytes | None, int | None, str | None, list[_Item], dict[bytes, bytes], bytes, Commit, bytes | None]:
    """Steps 1 to 3 of :func:`verify_commit` (the reference): the message, its ops, its CAR and its
    commit. Returns ``(did, rev, where, since, commit value, commit CID, prevData value, prevData
    CID, seq, time, items, blocks, data CID, commit, the bytes its signature signs or None: ask the
    commit)``; raises the rule's error."""
    body = _body(message, "#commit", max_message_bytes)
    did = _field(body, "repo", str, "#commit event")
    did = did[:2048]
    rev = _field(body, "rev", str, f"#commit of {did}")[:200]
    where = f"#commit of {did} at rev {rev}"
    try:
        since = _field(body, "since", str, where, optional=True)
        blocks_bytes = _field(body, "blocks", bytes, where)
        raw_ops = _field(body, "ops", list, where)
        commit_value = body.get("commit")
        prev_data_value = body.get("prevData")
        # Links decoded from the message are used as they are (their bytes checked when made).
        commit_cid = commit_value.cid_bytes if type(commit_value) is Link else _cid_field(commit_value, f"{where}: field 'commit'")
        if prev_data_value is None:
            prev_data = None
        elif type(prev_data_value) is Link:
            prev_data = prev_data_value.cid_bytes
        else:
            prev_data = _cid_field(prev_data_value, f"{where}: field 'prevData'")
        seq = body.get("seq")
        seq = seq if type(seq) is int else None
        when = body.get("time")
        when = when if type(when) is str else None
    except MalformedEventError as exc:
        exc.did, exc.rev = did, rev
        raise
    if body.get("tooBig") is True:
        raise BlocksTooLargeError(f"{where}: the event says tooBig (its blocks were left out)", did=did, rev=rev)
    if len(raw_ops) > MAX_OPS:
        raise TooManyOpsError(f"{where}: {len(raw_ops)} ops, over the limit of {MAX_OPS}", did=did, rev=rev)
    if len(blocks_bytes) > MAX_BLOCKS_BYTES:
        raise BlocksTooLargeError(f"{where}: blocks of {len(blocks_bytes)} bytes, over the limit of {MAX_BLOCKS_BYTES}", did=did, rev=rev)
    if prev_data is None and require_prev_data:
        raise MissingPrevDataError(f"{where}: no prevData (the PDS predates sync 1.1); pass require_prev_data=False to accept it on its signature alone", did=did, rev=rev)

    # 2. The ops. Each is kept as (action, path, key, cid, prev, cid link, prev link): links
    # decoded from the message (Link) are reused for the result, not parsed and made again.
    items: list[_Item] = []
    seen: set[str] = set()
    valid_key = is_valid_key if check_keys else None
    for i, raw in enumerate(raw_ops):
        if type(raw) is not dict:
            raise InvalidOpError(f"{where}: op {i} is a {type(raw).__name__}, not a map", did=did, rev=rev)
        action = raw.get("action")
        path = raw.get("path")
        if type(path) is not str or (valid_key is not None and not valid_key(path)) or len(path) > 1024:
            raise InvalidOpError(f"{where}: op {i} has path {str(path)[:200]!r}, not a valid repo key", did=did, rev=rev)
        if type(action) is not str or action not in ACTIONS:
            raise InvalidOpError(f"{where}: op {i} ({path!r}) has action {str(action)[:50]!r}, not create, update or delete", did=did, rev=rev)
        try:
            op_key = path.encode()
        except UnicodeEncodeError:
            raise InvalidOpError(f"{where}: op {i} has path {path[:200]!r}, not a valid repo key", did=did, rev=rev) from None
        if path in seen:
            raise DuplicateOpPathError(f"{where}: path {path!r} is named by more than one op", did=did, rev=rev)
        seen.add(path)
        cid_link, cid = _op_link(raw.get("cid"), where, i, action, path, "cid", did, rev)
        prev_link, op_prev = _op_link(raw.get("prev"), where, i, action, path, "prev", did, rev)
        if action == "delete":
            if cid is not None:
                raise InvalidOpError(f"{where}: delete of {path!r} has a cid ({cid_str(cid)}); a delete's cid is null", did=did, rev=rev)
        elif cid is None:
            raise InvalidOpError(f"{where}: {action} of {path!r} has no cid", did=did, rev=rev)
        if action == "create":
            if op_prev is not None:
                raise InvalidOpError(f"{where}: create of {path!r} has a prev ({cid_str(op_prev)}): the key was there already", did=did, rev=rev)
        elif op_prev is None and prev_data is not None:
            raise OpPrevMissingError(f"{where}: {action} of {path!r} has no prev: a {action} of a key that was not there", did=did, rev=rev)
        items.append((action, path, op_key, cid, op_prev, cid_link, prev_link))

    # 3. The CAR and the commit.
    blocks, commit, data, _, unsigned = _load_commit(blocks_bytes, commit_cid, did, rev, where)
    return did, rev, where, since, commit_value, commit_cid, prev_data_value, prev_data, seq, when, items, blocks, data, commit, unsigned


def _op_link(
    value: object, where: str, i: int, action: str, path: str, field: str, did: str, rev: str
) -> tuple[Link | None, bytes | None]:
    """An op's ``cid`` or ``prev`` field: ``(the Link as given or None, its raw CID or None)``.

    Raises:
        InvalidOpError: the field is neither null nor a CID (see :func:`_op_cid`).
    """
    if value is None:
        return None, None
    if type(value) is Link:
        return value, value.cid_bytes
    return None, _op_cid(value, f"{where}: op {i} ({action} {path!r}) field '{field}'", did, rev)


def _op_cid(value: object, what: str, did: str, rev: str) -> bytes:
    try:
        return parse_cid(value)
    except ValueError as exc:
        raise InvalidOpError(f"{what}: {exc}", did=did, rev=rev) from None


# ------------------------------------------------------------------------------------ #sync


def verify_sync(
    message: bytes | bytearray | memoryview | Mapping[str, object],
    *,
    key: str | PublicKey | VerifyingKey,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> VerifiedSync:
    """Verify a ``#sync`` event: its CAR holds the commit as its root, the commit's ``did`` is the
    event's and its signature verifies with ``key``.

    Args:
        message: the raw subscribeRepos message or a decoded ``#sync`` body.
        key: as for :func:`verify_commit`.
        max_message_bytes: refuse longer raw messages.

    Returns:
        A :class:`VerifiedSync` (``.did``, ``.rev``, ``.data``, ``.commit``).

    Raises:
        CommitVerifyError: :class:`MalformedEventError`, :class:`BlocksTooLargeError`,
            :class:`MalformedCarError`, :class:`MissingCommitBlockError`,
            :class:`MalformedCommitError`, :class:`CommitDidMismatchError`,
            :class:`RevMismatchError`, :class:`InvalidRevError`, :class:`CommitSignatureError`.

    Spec: atproto sync, "Commit Validation"; lexicon com.atproto.sync.subscribeRepos#sync.
    """
    body = _body(message, "#sync", max_message_bytes)
    did = _field(body, "did", str, "#sync event")[:2048]
    rev = _field(body, "rev", str, f"#sync of {did}")[:200]
    where = f"#sync of {did} at rev {rev}"
    try:
        blocks_bytes = _field(body, "blocks", bytes, where)
    except MalformedEventError as exc:
        exc.did, exc.rev = did, rev
        raise
    if len(blocks_bytes) > MAX_BLOCKS_BYTES:
        raise BlocksTooLargeError(f"{where}: blocks of {len(blocks_bytes)} bytes, over the limit of {MAX_BLOCKS_BYTES}", did=did, rev=rev)
    _, commit, data, commit_cid, unsigned = _load_commit(blocks_bytes, None, did, rev, where)
    if tid_timestamp(rev) is None:
        raise InvalidRevError(f"{where}: rev {rev!r} is not a valid TID", did=did, rev=rev)
    _check_signature(commit.sig, commit.unsigned_bytes() if unsigned is None else unsigned, commit_cid, _verifier(key, did, rev), where, did, rev)
    seq = body.get("seq")
    when = body.get("time")
    return VerifiedSync(did, rev, Link(data), Link(commit_cid), seq if type(seq) is int else None, when if type(when) is str else None)
