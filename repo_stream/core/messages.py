"""The errors of CAR framing and of the MST walk, built in one place for both implementations.

The pure-Python reference and the C core (:mod:`repo_stream._native`) raise the same error class
with the same message for the same input: both build their exceptions with these functions (the
C core calls them by name when it fails, which is rare, so their cost does not matter). Each
returns the exception; the caller raises it.

Messages say what was wrong and where: a byte offset into the CAR for framing, a CID (base32, or
hex when it is not a valid CID) for blocks, a key for MST entries and records.
"""

from __future__ import annotations

from ..errors import (
    BlockTooLargeError,
    CarHeaderError,
    CidError,
    CidMismatchError,
    DepthLimitError,
    DiskError,
    EmptyNodeError,
    EmptyRootError,
    InvalidKeyError,
    KeyAbsentError,
    KeyEncodingError,
    KeyExistsError,
    KeyOrderError,
    LayerMismatchError,
    MissingBlockError,
    NodeDecodeError,
    PrefixError,
    ProcessorError,
    RecordDecodeError,
    RepoStreamError,
    SubtreeLayerError,
    TruncatedCarError,
    UnknownSubtreeError,
    VarintError,
)
from .cid import cid_str
from .mst import MAX_KEY_BYTES

# --- CAR framing (spec: IPLD CARv1) ------------------------------------------------------------


def varint_too_long(offset: int) -> RepoStreamError:
    return VarintError(f"varint at byte {offset} is longer than 9 bytes")


def varint_not_minimal(offset: int) -> RepoStreamError:
    return VarintError(f"varint at byte {offset} is not minimally encoded")


def header_length_zero() -> RepoStreamError:
    return CarHeaderError("CAR header at byte 0 has length 0")


def header_too_large(length: int, limit: int) -> RepoStreamError:
    return BlockTooLargeError(f"CAR header declares {length} bytes, over the {limit}-byte block limit")


def empty_input() -> RepoStreamError:
    return TruncatedCarError("empty input: no CAR header")


def truncated_header(bytes_read: int) -> RepoStreamError:
    return TruncatedCarError(f"input ends inside the CAR header (after {bytes_read} bytes)")


def truncated_section(offset: int, left: int) -> RepoStreamError:
    return TruncatedCarError(f"input ends inside the section at byte {offset} ({left} bytes left over)")


def section_too_large(offset: int, length: int, limit: int) -> RepoStreamError:
    return BlockTooLargeError(f"section at byte {offset} declares {length} bytes, over the {limit}-byte block limit")


def block_too_large(cid: bytes, offset: int, size: int, limit: int) -> RepoStreamError:
    return BlockTooLargeError(f"block {cid_str(cid)} at byte {offset} is {size} bytes, over the {limit}-byte block limit")


def empty_section(offset: int) -> RepoStreamError:
    return CidError(f"section at byte {offset} is empty: no CID")


def cid_bad(offset: int, detail: str) -> RepoStreamError:
    """A CID at byte ``offset`` that cannot be parsed; ``detail`` says how."""
    return CidError(f"CID at byte {offset}: {detail}")


def cid_mismatch(cid: bytes) -> RepoStreamError:
    return CidMismatchError(f"block {cid_str(cid)}: its bytes do not hash to its CID")


def cid_not_sha256(cid: bytes) -> RepoStreamError:
    return CidMismatchError(f"block {cid_str(cid)}: CID does not use sha2-256, cannot verify it")


# --- the MST walk (spec: atproto repository, "Merkle Search Tree") -----------------------------


def key_order(key: str, last: str) -> RepoStreamError:
    return KeyOrderError(f"key {key!r} does not follow {last!r}")


def depth_limit(cid: bytes, depth: int, limit: int) -> RepoStreamError:
    return DepthLimitError(f"MST node {cid_str(cid)} is nested {depth} deep, over the limit of {limit}")


def missing_node(cid: bytes) -> RepoStreamError:
    return MissingBlockError(f"MST node {cid_str(cid)} is not in the CAR")


def not_a_node(cid: bytes) -> RepoStreamError:
    return NodeDecodeError(f"block {cid_str(cid)} is linked as an MST node but is not one")


def node_link_codec(cid: bytes) -> RepoStreamError:
    return NodeDecodeError(f"MST node link {cid_str(cid)} is not a CIDv1 with the dag-cbor codec (0x71)")


def node_decode(cid: bytes, detail: str) -> RepoStreamError:
    """A block that does not decode as an MST node ``{e: [{p, k, v, t}], l}``; ``detail`` says how."""
    return NodeDecodeError(f"MST node {cid_str(cid)}: {detail}")


def empty_node(cid: bytes) -> RepoStreamError:
    return EmptyNodeError(f"MST node {cid_str(cid)} has no entries and no left subtree")


def empty_root(cid: bytes) -> RepoStreamError:
    return EmptyRootError(f"root MST node {cid_str(cid)} has no entries, only a left subtree")


def left_at_layer0(cid: bytes) -> RepoStreamError:
    return SubtreeLayerError(f"MST node {cid_str(cid)} at layer 0 has a left subtree")


def subtree_at_layer0(cid: bytes, key: str) -> RepoStreamError:
    return SubtreeLayerError(f"MST node {cid_str(cid)} at layer 0 has a subtree after key {key!r}")


def wrong_layer(cid: bytes, layer: int, expected: int) -> RepoStreamError:
    return SubtreeLayerError(f"MST node {cid_str(cid)} holds layer-{layer} keys but sits where layer {expected} belongs")


def prefix_outside(cid: bytes, p: int, prev: bytes) -> RepoStreamError:
    return PrefixError(f"MST node {cid_str(cid)}: prefix length {p} is outside the previous key {prev!r}")


def prefix_not_maximal(cid: bytes, key: bytes, p: int, prev: bytes) -> RepoStreamError:
    return PrefixError(f"MST node {cid_str(cid)}: key {key!r} shares more than p={p} bytes with {prev!r}")


def layer_mismatch(cid: bytes, key: bytes, key_layer: int, layer: int) -> RepoStreamError:
    return LayerMismatchError(f"MST node {cid_str(cid)}: key {key!r} is on layer {key_layer}, the node's other keys on {layer}")


def key_too_long(cid: bytes, size: int) -> RepoStreamError:
    return InvalidKeyError(f"MST key of {size} bytes in node {cid_str(cid)} is over {MAX_KEY_BYTES} bytes")


def key_not_utf8(cid: bytes, key: bytes) -> RepoStreamError:
    return KeyEncodingError(f"MST key {key!r} in node {cid_str(cid)} is not UTF-8")


def invalid_key(cid: bytes, key: str) -> RepoStreamError:
    return InvalidKeyError(f"MST key {key!r} in node {cid_str(cid)} is not a valid collection/rkey path")


# --- turning record CIDs into values (the block store side) -------------------------------------


def missing_record(cid: bytes, key: str) -> RepoStreamError:
    return MissingBlockError(f"record block {cid_str(cid)} for key {key!r} is not in the CAR")


def codec_failed(cid: bytes, exc: BaseException) -> RepoStreamError:
    error = DiskError(f"the codec cannot encode the processed value of block {cid_str(cid)} for the spill store: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def stored_value_undecodable(cid: bytes, exc: BaseException) -> RepoStreamError:
    error = DiskError(f"stored value of block {cid_str(cid)} cannot be decoded: {exc}")
    error.__cause__ = exc
    return error


def processor_failed(key: str, cid: bytes, exc: BaseException) -> RepoStreamError:
    error = ProcessorError(f"block processor failed on record {key!r} ({cid_str(cid)}): {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def store_corrupt(where: str, offset: int) -> RepoStreamError:
    return DiskError(f"spill store damaged: {where} does not read back as sorted entries at byte {offset}")


# --- record values (spec: IPLD DAG-CBOR, "Strictness"; atproto data model) ---------------------


def record_not_dagcbor(size: int, offset: int, detail: str) -> RepoStreamError:
    return RecordDecodeError(f"record block of {size} bytes is not one well-formed DAG-CBOR item: {detail} (at byte {offset})")


# --- partial trees and their edits (repo_stream.sync.partial, .edit, .invert) ---------------------


def unknown_subtree(cid: bytes, layer: int) -> RepoStreamError:
    """The node ``cid`` (of ``layer``, -1 for the root) is not in the CAR slice."""
    if layer < 0:
        return UnknownSubtreeError(f"MST root node {cid_str(cid)} is not in the CAR slice", cid=cid)
    return UnknownSubtreeError(f"MST node {cid_str(cid)} (layer {layer}) is not in the CAR slice", cid=cid)


def partial_too_deep(cid: bytes, layer: int, limit: int) -> RepoStreamError:
    return DepthLimitError(f"MST root {cid_str(cid)} is on layer {layer}: the tree would nest {layer + 1} deep, over the limit of {limit}")


def key_exists(key: bytes, splitting: bool) -> RepoStreamError:
    where = " (found while splitting)" if splitting else ""
    return KeyExistsError(f"key {key.decode('utf-8', 'replace')!r} is already in the MST{where}")


def key_absent(key: bytes) -> RepoStreamError:
    return KeyAbsentError(f"key {key.decode('utf-8', 'replace')!r} is not in the MST")


def inverse_mismatch(action: str, path: str, held: bytes, named: bytes) -> RepoStreamError:
    """Undoing ``action`` of ``path`` found ``held`` where the op names ``named``."""
    cls = KeyExistsError if action == "create" else KeyAbsentError
    return cls(f"{action} of {path!r}: the tree holds {cid_str(held)}, not {cid_str(named)}")
