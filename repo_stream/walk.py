"""Ordered, iterative walk of an atproto Merkle Search Tree.

Spec: atproto repository, "Merkle Search Tree" (https://atproto.com/specs/repository). A node is
``{l: CID|null, e: [{p: int, k: bytes, v: CID, t: CID|null}, ...]}``; the walk is depth-first,
left to right (``l``, then each entry's record followed by its ``t`` subtree), so records come out
in strictly increasing key order. It uses an explicit stack, never recursion.

Checked on the way (each rule has its own :class:`~repo_stream.errors.MstError` subclass):

- keys strictly increasing (:class:`KeyOrderError`), UTF-8 (:class:`KeyEncodingError`), valid
  ``collection/rkey`` paths of at most 1024 bytes (:class:`InvalidKeyError`);
- ``p`` within the previous key and compression maximal (:class:`PrefixError`);
- every key of a node on the node's layer (:class:`LayerMismatchError`); every subtree exactly one
  layer below its parent, none below layer 0 (:class:`SubtreeLayerError`);
- no node without entries and without ``l`` except the root of an empty repo
  (:class:`EmptyNodeError`); a root with an ``l`` has entries (:class:`EmptyRootError`);
- nesting at most ``max_depth`` nodes (:class:`DepthLimitError`);
- blocks present (:class:`MissingBlockError`) and decodable as nodes (:class:`NodeDecodeError`).

Because every subtree sits exactly one layer lower, no block can be visited twice along one path:
a node that links to itself (a forged CID) fails the layer rule instead of looping.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Callable
from typing import Any, Generic, Protocol, TypeVar

import cbor2

from .cid import cid_str
from .dagcbor import DagCborError, StrictDecoder, link_cid
from .errors import (
    DepthLimitError,
    EmptyNodeError,
    EmptyRootError,
    InvalidKeyError,
    KeyEncodingError,
    KeyOrderError,
    LayerMismatchError,
    MissingBlockError,
    NodeDecodeError,
    PrefixError,
    ProcessorError,
    RepoStreamError,
    SubtreeLayerError,
)
from .mst import MAX_KEY_BYTES, is_valid_collection

__all__ = ["DEFAULT_MAX_DEPTH", "BlockLookup", "Walker", "NOT_A_NODE"]

T = TypeVar("T")

#: Default limit on nested MST nodes. A legal tree is as deep as its root's layer + 1, and a key of
#: layer 32 needs 64 leading zero bits of sha256: no real repo comes near.
DEFAULT_MAX_DEPTH = 32

#: Returned by :meth:`BlockLookup.node` for a block that is present but was processed at load
#: time because it cannot be an MST node.
NOT_A_NODE: Any = object()
_MISSING: Any = object()

_CBORTag = cbor2.CBORTag
_sha256 = hashlib.sha256
_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,512}")
# Repos hold a handful of collections: remember the verdicts (bounded, so hostile keys cannot grow it).
_valid_collection = functools.lru_cache(maxsize=1024)(is_valid_collection)


class BlockLookup(Protocol):
    """Where the walker finds blocks (a dict in memory, SQLite on disk).

    A lookup may also have ``prefetch(cids: list[bytes]) -> None``: the walker then calls it
    with the record and subtree CIDs of each node it expands, so a store can fetch them in one go.
    """

    def node(self, cid: bytes) -> bytes | None | Any:
        """Raw bytes of a block kept raw; ``None`` if absent; :data:`NOT_A_NODE` if processed."""

    def processed(self, cid: bytes, default: Any) -> Any:
        """The processed value of a block processed at load time, else ``default``."""

    def raw(self, cid: bytes) -> bytes | None:
        """The bytes of a block kept raw (still to be processed), else ``None``."""


class Walker(Generic[T]):
    """An in-order MST walk that yields records in chunks and can be resumed.

    Args:
        root: raw CID bytes of the root MST node (the commit's ``data``).
        process: the block processor applied to raw record blocks when emitted, or ``None`` to emit
            raw bytes.
        max_depth: the deepest node nesting accepted (root is depth 1).
        strict_tags: refuse every CBOR tag but 42 in nodes (see :mod:`repo_stream.dagcbor`);
            the drivers set it with ``with_verify_cids``.

    After an error the walker stays failed: every later :meth:`next_chunk` raises the same error.
    """

    __slots__ = ("_stack", "_last", "_process", "_max_depth", "_failed", "_decoder", "records")

    def __init__(
        self,
        root: bytes,
        process: Callable[[bytes], T] | None = None,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        strict_tags: bool = False,
    ) -> None:
        # Stack items: (0, cid, expected_layer or -1 for the root, depth) for nodes,
        #              (1, key: str, cid) for records.
        self._stack: list[tuple] = [(0, root, -1, 1)]
        self._last = ""
        self._process = process
        self._max_depth = max_depth
        self._failed: RepoStreamError | None = None
        self._decoder = StrictDecoder(max_depth=8, all_tags=strict_tags)
        #: Records emitted so far.
        self.records = 0

    @property
    def done(self) -> bool:
        """True once every record has been emitted."""
        return not self._stack

    def abandon(self) -> None:
        """Stop the walk: later :meth:`next_chunk` calls return ``None``."""
        self._stack.clear()

    def next_chunk(self, n: int, blocks: BlockLookup) -> list[tuple[str, T]] | None:
        """Emit up to ``n`` (``n`` >= 1) further ``(key, value)`` records; ``None`` when the walk is over.

        Raises:
            MstError subclasses, MissingBlockError, ProcessorError (see the module docstring).
        """
        if self._failed is not None:
            raise self._failed
        if n < 1:
            raise ValueError(f"chunk size must be at least 1, got {n}")
        try:
            out = self._step(n, blocks)
        except RepoStreamError as exc:
            self._failed = exc
            raise
        if not out and not self._stack:
            return None
        self.records += len(out)
        return out

    def _step(self, n: int, blocks: BlockLookup) -> list[tuple[str, Any]]:
        stack = self._stack
        pop = stack.pop
        out: list[tuple[str, Any]] = []
        emit = out.append
        last = self._last
        process = self._process
        get_node = blocks.node
        get_processed = blocks.processed
        get_raw = blocks.raw
        missing = _MISSING
        prefetch = getattr(blocks, "prefetch", None)
        while stack and len(out) < n:
            item = pop()
            if item[0] == 1:
                _, key, cid = item
                if key <= last:
                    raise KeyOrderError(f"key {key!r} does not follow {last!r}")
                value = get_processed(cid, missing)
                if value is missing:
                    value = get_raw(cid)
                    if value is None:
                        raise MissingBlockError(f"record block {cid_str(cid)} for key {key!r} is not in the CAR")
                    if process is not None:
                        try:
                            value = process(value)
                        except Exception as exc:
                            raise ProcessorError(
                                f"block processor failed on record {key!r} ({cid_str(cid)}): {type(exc).__name__}: {exc}"
                            ) from exc
                emit((key, value))
                last = key
                continue
            _, cid, expected, depth = item
            if depth > self._max_depth:
                raise DepthLimitError(f"MST node {cid_str(cid)} is nested {depth} deep, over the limit of {self._max_depth}")
            block = get_node(cid)
            if block is None:
                raise MissingBlockError(f"MST node {cid_str(cid)} is not in the CAR")
            if block is NOT_A_NODE:
                raise NodeDecodeError(f"block {cid_str(cid)} is linked as an MST node but is not one")
            children = self._expand(cid, block, expected, depth, stack, prefetch is not None)
            if children:
                prefetch(children)
        self._last = last
        return out

    def _expand(self, cid: bytes, block: bytes, expected: int, depth: int, stack: list[tuple], want_children: bool) -> list[bytes] | None:
        """Decode one node, check its rules and push its subtrees and records (reversed).

        Returns the CIDs it pushed (records and subtrees) if ``want_children``, for stores that
        fetch in batches.
        """
        try:
            node = self._decoder.decode(block)
        except DagCborError as exc:
            raise NodeDecodeError(f"MST node {cid_str(cid)} is not valid DAG-CBOR: {exc}") from exc
        if type(node) is not dict or len(node) != 2 or "e" not in node or "l" not in node:
            raise NodeDecodeError(f"MST node {cid_str(cid)} is not a map of exactly 'e' and 'l'")
        entries = node["e"]
        left_raw = node["l"]
        if type(entries) is not list:
            raise NodeDecodeError(f"MST node {cid_str(cid)}: 'e' is not a list")
        left = None
        if left_raw is not None:
            left = link_cid(left_raw)
            if left is None:
                raise NodeDecodeError(f"MST node {cid_str(cid)}: 'l' is neither a CID link nor null")
        is_root = expected < 0
        if not entries:
            if left is None:
                if is_root:
                    return None  # the empty repo
                raise EmptyNodeError(f"MST node {cid_str(cid)} has no entries and no left subtree")
            if is_root:
                raise EmptyRootError(f"root MST node {cid_str(cid)} has no entries, only a left subtree")
            if expected == 0:
                raise SubtreeLayerError(f"MST node {cid_str(cid)} at layer 0 has a left subtree")
            stack.append((0, left, expected - 1, depth + 1))
            return [left] if want_children else None

        # Rebuild keys and check prefixes, layers and syntax; collect the items in walk order.
        items: list[tuple] = []
        append = items.append
        prev = b""
        layer = -1
        child = expected - 1
        last_collection = None
        for entry in entries:
            if type(entry) is not dict or len(entry) != 4:
                raise NodeDecodeError(f"MST node {cid_str(cid)}: an entry is not a map of exactly p, k, v, t")
            try:
                p = entry["p"]
                k = entry["k"]
                v = entry["v"]
                t = entry["t"]
            except KeyError as exc:
                raise NodeDecodeError(f"MST node {cid_str(cid)}: an entry lacks field {exc.args[0]!r}") from None
            if type(p) is not int or type(k) is not bytes:
                raise NodeDecodeError(f"MST node {cid_str(cid)}: entry 'p' must be an int and 'k' bytes")
            if p:
                if p < 0 or p > len(prev):
                    raise PrefixError(f"MST node {cid_str(cid)}: prefix length {p} is outside the previous key {prev!r}")
                key = prev[:p] + k
            else:
                key = k
            if p < len(prev) and k and k[0] == prev[p]:
                raise PrefixError(
                    f"MST node {cid_str(cid)}: key {key!r} shares more than p={p} bytes with {prev!r}"
                )
            if type(v) is _CBORTag and v.tag == 42 and type(v.value) is bytes and len(v.value) > 1 and v.value[0] == 0:
                vcid = v.value[1:]
            else:
                raise NodeDecodeError(f"MST node {cid_str(cid)}: entry 'v' of key {key!r} is not a CID link")
            digest = _sha256(key).digest()
            top = int.from_bytes(digest[:8], "big")
            key_layer = (64 - top.bit_length()) >> 1 if top else (256 - int.from_bytes(digest, "big").bit_length()) >> 1
            if key_layer != layer:
                if layer >= 0:
                    raise LayerMismatchError(
                        f"MST node {cid_str(cid)}: key {key!r} is on layer {key_layer}, the node's other keys on {layer}"
                    )
                layer = key_layer
                if is_root:
                    child = layer - 1
            if len(key) > MAX_KEY_BYTES:
                raise InvalidKeyError(f"MST key of {len(key)} bytes in node {cid_str(cid)} is over {MAX_KEY_BYTES} bytes")
            try:
                skey = key.decode()
            except UnicodeDecodeError:
                raise KeyEncodingError(f"MST key {key!r} in node {cid_str(cid)} is not UTF-8") from None
            collection, slash, rkey = skey.partition("/")
            if collection != last_collection:
                if not (slash and _valid_collection(collection)):
                    raise InvalidKeyError(f"MST key {skey!r} in node {cid_str(cid)} is not a valid collection/rkey path")
                last_collection = collection
            if not _RKEY_RE.fullmatch(rkey) or rkey == "." or rkey == "..":
                raise InvalidKeyError(f"MST key {skey!r} in node {cid_str(cid)} is not a valid collection/rkey path")
            append((1, skey, vcid))
            if t is not None:
                if type(t) is _CBORTag and t.tag == 42 and type(t.value) is bytes and len(t.value) > 1 and t.value[0] == 0:
                    tcid = t.value[1:]
                else:
                    raise NodeDecodeError(f"MST node {cid_str(cid)}: entry 't' of key {key!r} is neither a CID link nor null")
                if child < 0:
                    raise SubtreeLayerError(f"MST node {cid_str(cid)} at layer 0 has a subtree after key {skey!r}")
                append((0, tcid, child, depth + 1))
            prev = key
        if layer != expected and not is_root:  # after the loop, so a mixed node reports the mix
            raise SubtreeLayerError(
                f"MST node {cid_str(cid)} holds layer-{layer} keys but sits where layer {expected} belongs"
            )
        if left is not None:
            if child < 0:
                raise SubtreeLayerError(f"MST node {cid_str(cid)} at layer 0 has a left subtree")
            stack.extend(items[::-1])
            stack.append((0, left, child, depth + 1))  # walked first: on top
            items.append(stack[-1])
        else:
            stack.extend(items[::-1])
        if not want_children:
            return None
        return [item[1] if item[0] == 0 else item[2] for item in items]
