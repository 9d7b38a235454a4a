"""Every error repo-stream raises.

All of them derive from :class:`RepoStreamError`, so an indexer can catch that one class around a
whole repo. Each message says what was wrong and where: a byte offset into the CAR for framing
errors, a CID for blocks, a key for MST entries and records.

The hierarchy::

    RepoStreamError
    ├── SourceError            the byte source itself failed (the cause is chained)
    ├── CarError               CAR v1 framing (spec: IPLD CARv1)
    │   ├── TruncatedCarError
    │   ├── VarintError
    │   ├── BlockTooLargeError
    │   ├── CidError
    │   └── CarHeaderError
    ├── CidMismatchError       a block's bytes do not hash to its CID (``with_verify_cids``)
    ├── MissingBlockError      a block the walk needs is not in the CAR
    ├── CommitError            the signed commit object is malformed
    ├── MstError               Merkle Search Tree rules (spec: atproto repository, "MST structure")
    │   ├── NodeDecodeError        not a well-formed MST node
    │   ├── KeyOrderError          keys not strictly increasing
    │   ├── KeyEncodingError       key bytes are not UTF-8
    │   ├── InvalidKeyError        key is not a valid repo path (collection/rkey)
    │   ├── PrefixError            ``p`` beyond the previous key, or compression not maximal
    │   ├── LayerMismatchError     a key's sha256 layer differs from its node's
    │   ├── SubtreeLayerError      a subtree is not exactly one layer below its parent
    │   ├── EmptyNodeError         a non-root node with no entries and no ``l``
    │   ├── EmptyRootError         a root with no entries but an ``l`` subtree
    │   └── DepthLimitError        nesting deeper than the configured maximum
    ├── RecordDecodeError      a record block is not one well-formed DAG-CBOR item (records.py)
    ├── SignatureError         the commit signature does not verify, or the key is unusable
    ├── ProcessorError         the block processor raised on an emitted record
    ├── DiskError              the SQLite spill store failed or would grow past its limit
    ├── IdentityError          a DID, handle or at:// URI is malformed or does not resolve
    │                          (spec: atproto DID, handle)
    ├── FetchError             fetching a repo (com.atproto.sync.getRepo) over HTTP failed
    │   └── UnsupportedMethodError the host does not serve the XRPC method (404, 501, MethodNotImplemented)
    ├── SinkError              a store sink (DuckDB, Parquet, PostgreSQL) cannot open or write
    │   (sync 1.1, repo_stream.sync:)
    ├── UnknownSubtreeError    (also a MissingBlockError) a partial MST needs a block it lacks
    ├── MstEditError           (also an MstError) an edit of a partial MST cannot be made
    │   ├── KeyExistsError         inserting a key the tree holds
    │   └── KeyAbsentError         updating or deleting a key the tree does not hold
    ├── EventDecodeError       a subscribeRepos message is not a well-formed frame / body
    │   └── ErrorFrameError        an error frame (op -1: FutureCursor, ConsumerTooSlow, ...)
    ├── RecordProofError       a getRecord proof CAR does not prove the record (or its absence)
    ├── OutOfSyncError         a valid commit that does not follow the held state (refetch)
    ├── CommitVerifyError      a #commit / #sync event is broken, forged or stale (one subclass
    │                          per rule of sync 1.1 commit validation, listed below)
    └── FirehoseError          (repo_stream.firehose) the subscribeRepos WebSocket failed: connect,
        │                      handshake, TLS, deadline, closed, a message over the size cap
        └── SeqOrderError          an event's seq is not above the previous one, or jumps past it
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for the annotation only: errors imports nothing of the package at run time
    from .sync.verify import VerifiedCommit

__all__ = [
    "RepoStreamError",
    "SourceError",
    "CarError",
    "TruncatedCarError",
    "VarintError",
    "BlockTooLargeError",
    "CidError",
    "CarHeaderError",
    "CidMismatchError",
    "MissingBlockError",
    "CommitError",
    "MstError",
    "NodeDecodeError",
    "KeyOrderError",
    "KeyEncodingError",
    "InvalidKeyError",
    "PrefixError",
    "LayerMismatchError",
    "SubtreeLayerError",
    "EmptyNodeError",
    "EmptyRootError",
    "DepthLimitError",
    "RecordDecodeError",
    "SignatureError",
    "ProcessorError",
    "DiskError",
    "IdentityError",
    "FetchError",
    "UnsupportedMethodError",
    "SinkError",
    "UnknownSubtreeError",
    "MstEditError",
    "KeyExistsError",
    "KeyAbsentError",
    "EventDecodeError",
    "ErrorFrameError",
    "RecordProofError",
    "OutOfSyncError",
    "CommitVerifyError",
    "MalformedEventError",
    "MalformedCarError",
    "MissingCommitBlockError",
    "CommitNotRootError",
    "MalformedCommitError",
    "CommitDidMismatchError",
    "RevMismatchError",
    "CommitSignatureError",
    "InvalidRevError",
    "StaleRevError",
    "FutureRevError",
    "TooManyOpsError",
    "BlocksTooLargeError",
    "InvalidOpError",
    "DuplicateOpPathError",
    "OpCidMismatchError",
    "DeletedKeyPresentError",
    "OpPrevMissingError",
    "MissingRecordBlockError",
    "MalformedRecordError",
    "MalformedTreeError",
    "MissingProofBlockError",
    "MissingPrevDataError",
    "InversionMismatchError",
    "FirehoseError",
    "SeqOrderError",
]


class RepoStreamError(Exception):
    """Base class of every error raised by repo-stream."""


class SourceError(RepoStreamError):
    """The byte source raised while being read, or returned something that is not bytes.

    The source's own exception is chained as ``__cause__``.
    """


class CarError(RepoStreamError):
    """The input is not a well-formed CAR v1 stream."""


class TruncatedCarError(CarError):
    """The input ended inside the header, a section's length, its CID or its block."""


class VarintError(CarError):
    """An unsigned LEB128 varint is overlong (not minimal), longer than 9 bytes, or too large."""


class BlockTooLargeError(CarError):
    """A section declares a length above the configured maximum block size.

    Raised before any memory is allocated for the section.
    """


class CidError(CarError):
    """A section's CID cannot be parsed, or its multihash runs past the end of its section."""


class CarHeaderError(CarError):
    """The CAR header is not a DAG-CBOR map ``{version: 1, roots: [CID, ...]}`` with a root."""


class CidMismatchError(RepoStreamError):
    """A block's bytes do not hash to the digest in its CID (only checked with verification on)."""


class MissingBlockError(RepoStreamError):
    """A block the walk needs (the commit, an MST node or a record) is absent from the CAR."""


class CommitError(RepoStreamError):
    """The commit block is not a valid atproto v3 commit object."""


class MstError(RepoStreamError):
    """The Merkle Search Tree breaks a rule of the atproto repository spec."""


class NodeDecodeError(MstError):
    """A block reached as an MST node is not a DAG-CBOR map ``{l: CID|null, e: [{p, k, v, t}]}``."""


class KeyOrderError(MstError):
    """MST keys are not strictly increasing in walk order."""


class KeyEncodingError(MstError):
    """An MST key is not valid UTF-8."""


class InvalidKeyError(MstError):
    """An MST key is not a valid repo path ``<collection NSID>/<record key>`` of at most 1024 bytes."""


class PrefixError(MstError):
    """An entry's prefix length ``p`` exceeds the previous key, or the compression is not maximal."""


class LayerMismatchError(MstError):
    """A key's layer (leading zero bits of sha256(key) // 2) differs from its node's layer."""


class SubtreeLayerError(MstError):
    """A subtree is not exactly one layer below its parent (or sits below layer 0)."""


class EmptyNodeError(MstError):
    """A node other than the root of an empty repo has neither entries nor a left subtree."""


class EmptyRootError(MstError):
    """The root node has no entries but does have a left subtree (the tree was not trimmed)."""


class DepthLimitError(MstError):
    """Nodes are nested deeper than the walker's configured maximum depth."""


class RecordDecodeError(RepoStreamError):
    """A record block is not one well-formed DAG-CBOR item, or has no atproto JSON form.

    Raised by the processors of :mod:`repo_stream.records` (the drivers wrap it in
    :class:`ProcessorError`, naming the key and CID). The decoder's own exception is ``__cause__``.
    """


class SignatureError(RepoStreamError):
    """A commit signature does not verify with the given key, or the key cannot be used.

    Raised by :meth:`repo_stream.Commit.verify_signature` (wrong key, tampered commit, high-S or
    malformed signature) and :mod:`repo_stream.crypto.didkey` (a did:key that cannot be parsed). The
    message names the DID and the commit, or the key.
    """


class ProcessorError(RepoStreamError):
    """The block processor raised on a record that was emitted; the original is ``__cause__``."""


class DiskError(RepoStreamError):
    """The SQLite spill store failed, or storing more would pass ``max_stored_mb``."""


class SinkError(RepoStreamError):
    """A store sink (DuckDB, Parquet, PostgreSQL) cannot open or write its store, or its extra is
    not installed; the message names the store and the DID. The store's own error is ``__cause__``."""


class IdentityError(RepoStreamError):
    """A DID, handle or ``at://`` URI is malformed, or resolving it failed.

    Raised for bad syntax (spec: atproto.com/specs/did, /specs/handle), an unsupported DID method,
    a handle that resolves by neither DNS nor HTTPS, a DID document that cannot be fetched or is
    malformed, or a document that lacks what is needed (the PDS, for fetching). The message names
    the DID or handle and, for network failures, the URL or DNS name and the HTTP status.
    """


class FetchError(RepoStreamError):
    """Fetching a repo CAR over HTTP failed: an HTTP error status, a connection failure or timeout
    (after the configured retries), a body past the size cap, or a body cut off part-way.

    Attributes: ``url`` (str), ``did`` (str or None), ``status`` (the HTTP status, or None when no
    response came), ``retry_after`` (seconds the server asked to wait, or None), ``xrpc_error``
    (the XRPC ``error`` name of an error answer, e.g. ``"RecordNotFound"``, or None).
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        did: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        xrpc_error: str | None = None,
    ) -> None:
        super().__init__(message)
        self.url = url
        self.did = did
        self.status = status
        self.retry_after = retry_after
        self.xrpc_error = xrpc_error


class UnsupportedMethodError(FetchError):
    """The host does not serve the XRPC method asked for: HTTP 404 or 501, or an XRPC
    ``MethodNotImplemented`` (or ``MethodNotFound``) error, e.g. a PDS asked for
    ``com.atproto.sync.listReposByCollection``, which relays and collection directories serve.
    Attributes as :class:`FetchError`, and ``method`` (the NSID of the method)."""

    def __init__(self, message: str, *, method: str, url: str | None = None, status: int | None = None, xrpc_error: str | None = None) -> None:
        super().__init__(message, url=url, status=status, xrpc_error=xrpc_error)
        self.method = method


# --- sync 1.1 (repo_stream.sync) ----------------------------------------------------------------


class UnknownSubtreeError(MissingBlockError):
    """A partial MST (a CAR slice) needs a node whose block it does not hold.

    Raised only when an operation reaches into that subtree: a lookup or ``walk_slice`` over its
    key range, or an edit that must split or merge it. Attributes: ``cid`` (raw CID bytes of the
    absent node).
    """

    def __init__(self, message: str, *, cid: bytes) -> None:
        super().__init__(message)
        self.cid = cid


class MstEditError(MstError):
    """An insert, update or delete on a partial MST cannot be made as asked."""


class KeyExistsError(MstEditError):
    """Inserting a key the tree already holds."""


class KeyAbsentError(MstEditError):
    """Updating or deleting a key the tree does not hold."""


class EventDecodeError(RepoStreamError):
    """A ``com.atproto.sync.subscribeRepos`` message is not a header + body pair of DAG-CBOR maps
    of the expected shape, is an error frame (``op: -1``), or is over the size limit."""


class ErrorFrameError(EventDecodeError):
    """An error frame (header ``op: -1``, body ``{error, message?}``; spec: atproto event streams,
    "Framing"): the server ends the stream. Lexicon errors of subscribeRepos: ``FutureCursor``
    (the cursor is ahead of the server's sequence), ``ConsumerTooSlow`` (the consumer fell too far
    behind). Attributes: ``error`` (the error name, str) and ``text`` (the message, or None)."""

    def __init__(self, message: str, *, error: str = "", text: str | None = None) -> None:
        super().__init__(message)
        self.error = error
        self.text = text


class RecordProofError(RepoStreamError):
    """A record proof (a ``com.atproto.sync.getRecord`` CAR) does not prove what it should: a
    block is missing from the path, the commit is not signed by the key or not for the DID, or
    the path leads elsewhere. The message names the DID, key and CID."""


class OutOfSyncError(RepoStreamError):
    """A commit that is valid on its own (signature, and inversion to its own ``prevData``) but
    does not follow the state held for the repo (``since`` or ``prevData`` differ from it).

    The consumer should refetch the repo. ``result`` holds the commit as verified on its own
    (a :class:`~repo_stream.sync.verify.VerifiedCommit`).
    """

    def __init__(self, message: str, *, result: VerifiedCommit[Any]) -> None:
        super().__init__(message)
        self.result = result


class CommitVerifyError(RepoStreamError):
    """A ``#commit`` or ``#sync`` event is broken, forged or stale (spec: atproto sync,
    "Commit Validation"). One subclass per rule; the message names the DID, rev, key or CID.

    Attributes: ``did`` and ``rev`` of the event when known, else ``None``.
    """

    def __init__(self, message: str, *, did: str | None = None, rev: str | None = None) -> None:
        super().__init__(message)
        self.did = did
        self.rev = rev


class MalformedEventError(CommitVerifyError):
    """The event body lacks a field or has one of the wrong type (``repo``, ``rev``, ``blocks``,
    ``ops``, ``commit``...), or the message is not a frame of the expected kind."""


class MalformedCarError(CommitVerifyError):
    """``blocks`` is not a well-formed CAR v1 (framing, header), or a block does not hash to its
    CID. The CAR error is ``__cause__``."""


class MissingCommitBlockError(CommitVerifyError):
    """The commit block is not in the event's CAR."""


class CommitNotRootError(CommitVerifyError):
    """The event's ``commit`` CID is not the (first) root of its CAR."""


class MalformedCommitError(CommitVerifyError):
    """The commit block is not a valid v3 commit object in canonical DAG-CBOR."""


class CommitDidMismatchError(CommitVerifyError):
    """The commit's ``did`` is not the event's ``repo`` (``did`` for ``#sync``)."""


class RevMismatchError(CommitVerifyError):
    """The event's ``rev`` is not the commit's ``rev``."""


class CommitSignatureError(CommitVerifyError):
    """The commit's signature does not verify with the account's key (or the key is unusable)."""


class InvalidRevError(CommitVerifyError):
    """The commit's ``rev`` is not a valid TID (spec: atproto record key, "TID")."""


class StaleRevError(CommitVerifyError):
    """The commit's ``rev`` is not greater than the rev held for the repo: replayed or older."""


class FutureRevError(CommitVerifyError):
    """The commit's ``rev`` (a TID, a timestamp) is further ahead of the local clock than the
    allowed skew."""


class TooManyOpsError(CommitVerifyError):
    """The event has more than 200 ops."""


class BlocksTooLargeError(CommitVerifyError):
    """The event's ``blocks`` CAR is over 2,000,000 bytes (or the event says ``tooBig``)."""


class InvalidOpError(CommitVerifyError):
    """An op is malformed: unknown ``action``, a ``path`` that is no valid repo key, a create or
    update without ``cid``, a delete with one, or a create with a ``prev``."""


class DuplicateOpPathError(CommitVerifyError):
    """Two ops of one commit name the same path."""


class OpCidMismatchError(CommitVerifyError):
    """A create's or update's ``cid`` is not what the new tree holds at its path."""


class DeletedKeyPresentError(CommitVerifyError):
    """A delete's path is still in the new tree."""


class OpPrevMissingError(CommitVerifyError):
    """An update or delete has no ``prev`` (the CID the old tree held) though the event has
    ``prevData``: an update or delete of a key that was not there."""


class MissingRecordBlockError(CommitVerifyError):
    """A create's or update's record block is not in the event's CAR."""


class MalformedRecordError(CommitVerifyError):
    """A create's or update's record block is not a valid record (the processor refused it)."""


class MalformedTreeError(CommitVerifyError):
    """The new tree's nodes in the CAR break an MST rule; the :class:`MstError` is ``__cause__``."""


class MissingProofBlockError(CommitVerifyError):
    """Checking an op or inverting it needs an MST node the event's CAR does not hold (a missing
    proof block). ``cid`` is the absent node's raw CID."""

    def __init__(self, message: str, *, cid: bytes, did: str | None = None, rev: str | None = None) -> None:
        super().__init__(message, did=did, rev=rev)
        self.cid = cid


class MissingPrevDataError(CommitVerifyError):
    """The event has no ``prevData`` and the caller requires it (``require_prev_data=True``)."""


class InversionMismatchError(CommitVerifyError):
    """Inverting the ops on the new tree does not give ``prevData``: the tree changes keys no op
    names, or an op's ``prev`` is not what the old tree held."""


# --- the firehose (repo_stream.firehose) --------------------------------------------------------


class FirehoseError(RepoStreamError):
    """The ``com.atproto.sync.subscribeRepos`` WebSocket failed: the TCP connection or TLS, the
    HTTP upgrade (a status other than 101), the connect or read deadline, a close by the server, or
    a message over the size cap. The message names the URL. Attributes: ``url`` (str), ``status``
    (the HTTP status of a refused upgrade, else None)."""

    def __init__(self, message: str, *, url: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.status = status


class SeqOrderError(FirehoseError):
    """An event's ``seq`` is not above the previous event's (backwards or repeated), or jumps past
    ``previous + 1`` (a gap). Reported, not raised, by the firehose client. Attributes:
    ``previous`` and ``seq`` (ints)."""

    def __init__(self, message: str, *, url: str = "", previous: int, seq: int) -> None:
        super().__init__(message, url=url)
        self.previous = previous
        self.seq = seq
