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
- blocks present (:class:`MissingBlockError`) and decodable as nodes (:class:`NodeDecodeError`):
  a node is decoded whole before any rule is checked on it; it must be exactly one DAG-CBOR map
  ``{e, l}`` with entries exactly ``{p, k, v, t}``, no map key repeated, no tag but 42, and be
  reached through a CIDv1 with the dag-cbor codec (0x71). With ``strict`` (``with_verify_cids``)
  it must also be canonical DAG-CBOR (minimal integers and lengths, map keys in canonical order).

The walker only needs MST nodes (:class:`~repo_stream.core.blocks.NodeLookup`) and emits
``(key, record CID)`` pairs; a :class:`~repo_stream.core.blocks.RecordValues` store turns each chunk of
pairs into the items the user gets. The C core (:mod:`repo_stream._native`) has a walker with the
same behaviour, the same errors and the same messages (both build them with
:mod:`repo_stream.core.messages`).

Because every subtree sits exactly one layer lower, no block can be visited twice along one path:
a node that links to itself (a forged CID) fails the layer rule instead of looping.

**Memory.** Prefix compression lets an entry of ~22 bytes stand for a key of ~830, so the walk
keeps an expanded node on its stack as compressed as the node itself (a :class:`_Frame`: the
entries' ``k`` suffixes, ``v`` and ``t`` CIDs joined, ``p`` in an array) and builds each key again
only when its record is emitted: the stack costs about the bytes of the nodes on the current path,
which the store has counted, never their keys spelled out.
"""

from __future__ import annotations

import functools
import hashlib
import re
from array import array
from collections.abc import Callable, Iterator
from itertools import accumulate
from typing import Any

import cbor2

from ..errors import RepoStreamError
from . import messages
from .blocks import NOT_A_NODE, MemoryBlocks, NodeLookup, RecordValues
from .dagcbor import DagCborError, StrictDecoder
from .mst import MAX_KEY_BYTES, is_valid_collection

__all__ = ["ARROW_ROW_BYTES", "DEFAULT_MAX_DEPTH", "STORE_WINDOW", "BatchColumns", "Walker", "decode_node", "node_keys"]

#: Default limit on nested MST nodes. A legal tree is as deep as its root's layer + 1, and a key of
#: layer 32 needs 64 leading zero bits of sha256: no real repo comes near.
DEFAULT_MAX_DEPTH = 32

_sha256 = hashlib.sha256
_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,512}")
# Repos hold a handful of collections: remember the verdicts (bounded, so hostile keys cannot grow it).
_valid_collection = functools.lru_cache(maxsize=1024)(is_valid_collection)
_DAG_CBOR_V1 = b"\x01\x71"
_NODE_KEYS = ["e", "l"]
_ENTRY_KEYS = ["k", "p", "t", "v"]
_CBORTag = cbor2.CBORTag


def _head(n: int) -> int:
    """Bytes of a minimal CBOR head carrying the argument ``n`` (>= 0)."""
    return 1 if n < 24 else 2 if n < 0x100 else 3 if n < 0x10000 else 5 if n < 0x100000000 else 9


def _link(value: Any) -> bytes | None:
    """The tag-42 value bytes (``0x00`` + CID) of a DAG-CBOR link, or ``None`` if it is not one."""
    if type(value) is _CBORTag and value.tag == 42:
        raw = value.value
        if type(raw) is bytes and len(raw) > 1 and raw[0] == 0:
            return raw
    return None


def decode_node(cid: bytes, block: bytes, decoder: StrictDecoder, strict: bool) -> tuple[bytes | None, list[tuple[int, bytes, bytes, bytes | None]]]:
    """Decode an MST node block into ``(left CID or None, [(p, k, v CID, t CID or None), ...])``.

    Spec: atproto repository, "MST structure": ``{l: CID|null, e: [{p: int, k: bytes, v: CID,
    t: CID|null}]}``. Only the structure is checked here; the tree rules are the walker's.

    Raises:
        NodeDecodeError: not one DAG-CBOR item; not exactly that structure; a map key repeated;
            a tag other than 42; with ``strict``, not canonical DAG-CBOR. The message is the one
            :func:`node_problem` gives (the C core's, word for word).
    """
    try:
        node = decoder.decode(block)
    except DagCborError as exc:
        raise _node_error(cid, block, strict, f"not valid DAG-CBOR: {exc}") from exc
    if type(node) is not dict or len(node) != 2 or "e" not in node or "l" not in node:
        raise _node_error(cid, block, strict, "not a map of exactly 'e' and 'l'")
    entries = node["e"]
    if type(entries) is not list:
        raise _node_error(cid, block, strict, "'e' is not a list")
    left_raw = node["l"]
    size = 6 + _head(len(entries))  # a2, 61 65, the array head, 61 6c, null
    left = None
    if left_raw is not None:
        link = _link(left_raw)
        if link is None:
            raise _node_error(cid, block, strict, "'l' is neither a CID link nor null")
        size += 1 + _head(len(link)) + len(link)  # d8 2a and the byte string, less the null counted
        left = link[1:]
    out: list[tuple[int, bytes, bytes, bytes | None]] = []
    append = out.append
    in_order = True
    for i, entry in enumerate(entries):
        entries[i] = None  # each decoded map goes as its tuple comes: not both for the whole node
        if type(entry) is not dict or len(entry) != 4:
            raise _node_error(cid, block, strict, f"entry {i} is not a map of exactly p, k, v, t")
        try:
            p = entry["p"]
            k = entry["k"]
            v = _link(entry["v"])
            t = entry["t"]
        except KeyError:
            raise _node_error(cid, block, strict, f"entry {i} is not a map of exactly p, k, v, t") from None
        if type(p) is not int or type(k) is not bytes:
            raise _node_error(cid, block, strict, f"entry {i}: 'p' must be an int and 'k' bytes")
        if v is None:
            raise _node_error(cid, block, strict, f"entry {i}: 'v' is not a CID link")
        # a4, four 1-byte text keys, p, k, v (d8 2a + bytes), t (null)
        size += 10 + _head(p if p >= 0 else -1 - p) + _head(len(k)) + len(k) + 2 + _head(len(v)) + len(v)
        if t is not None:
            link = _link(t)
            if link is None:
                raise _node_error(cid, block, strict, f"entry {i}: 't' is neither a CID link nor null")
            size += 1 + _head(len(link)) + len(link)
            t = link[1:]
        if strict and in_order:
            in_order = list(entry) == _ENTRY_KEYS
        append((p, k, v[1:], t))
    if size != len(block) or (strict and not (in_order and list(node) == _NODE_KEYS)):
        # Longer than its canonical form: repeated keys, foreign tags or (allowed unless strict)
        # non-minimal integers; or (strict) keys out of order.
        problem = node_problem(block, strict)
        if problem is not None or strict:
            raise messages.node_decode(cid, problem or _NOT_CANONICAL)
    return left, out


def node_keys(
    cid: bytes, entries: list[tuple[int, bytes, bytes, bytes | None]], expected: int, check_keys: bool = True
) -> Iterator[tuple[bytes, int]]:
    """Rebuild and check the keys of a decoded MST node (``entries`` as :func:`decode_node`
    gives them) one by one, yielding each full key with the node's layer (its first key's).

    The rules of every entry, in this order (the C core's ``rs_node_key``, word for word): ``p``
    within the previous key (:class:`PrefixError`), compression maximal (:class:`PrefixError`),
    the key on the layer of the node's first key (:class:`LayerMismatchError`), at most 1024
    bytes (:class:`InvalidKeyError`), UTF-8 (:class:`KeyEncodingError`), with ``check_keys`` a
    valid ``collection/rkey`` path (:class:`InvalidKeyError`), no ``t`` subtree when the node's subtrees would be below
    layer 0 (:class:`SubtreeLayerError`). ``expected`` is the node's layer, -1 for a root (whose
    layer is its keys'). The node-wide rules (its layer, its ``l``, key order) are the caller's:
    the walker and :class:`repo_stream.sync.partial.PartialTree` check them differently.

    Spec: atproto repository, "Merkle Search Tree".
    """
    prev = b""
    layer = -1
    child = expected - 1
    last_collection = None
    for p, k, _vcid, tcid in entries:
        if p:
            if p < 0 or p > len(prev):
                raise messages.prefix_outside(cid, p, prev)
            key = prev[:p] + k
        else:
            key = k
        if p < len(prev) and k and k[0] == prev[p]:
            raise messages.prefix_not_maximal(cid, key, p, prev)
        digest = _sha256(key).digest()
        top = int.from_bytes(digest[:8], "big")
        key_layer = (64 - top.bit_length()) >> 1 if top else (256 - int.from_bytes(digest, "big").bit_length()) >> 1
        if key_layer != layer:
            if layer >= 0:
                raise messages.layer_mismatch(cid, key, key_layer, layer)
            layer = key_layer
            if expected < 0:
                child = layer - 1
        if len(key) > MAX_KEY_BYTES:
            raise messages.key_too_long(cid, len(key))
        try:
            skey = key.decode()
        except UnicodeDecodeError:
            raise messages.key_not_utf8(cid, key) from None
        if check_keys:
            collection, slash, rkey = skey.partition("/")
            if collection != last_collection:
                if not (slash and _valid_collection(collection)):
                    raise messages.invalid_key(cid, skey)
                last_collection = collection
            if not _RKEY_RE.fullmatch(rkey) or rkey == "." or rkey == "..":
                raise messages.invalid_key(cid, skey)
        if tcid is not None and child < 0:
            raise messages.subtree_at_layer0(cid, skey)
        yield key, layer
        prev = key


_NOT_CANONICAL = "not canonical DAG-CBOR (minimal integers and lengths, sorted map keys, no repeated key)"


def _node_error(cid: bytes, block: bytes, strict: bool, fallback: str) -> RepoStreamError:
    """The NodeDecodeError for ``block``: :func:`node_problem`'s detail, or ``fallback``."""
    return messages.node_decode(cid, node_problem(block, strict) or fallback)


def _cbor_head(block: bytes, pos: int) -> tuple[int, int, bool, int] | None:
    """``(major type, argument, minimal, next position)`` of the CBOR head at ``pos``, or ``None``
    if the bytes end first or the additional information is reserved (28-30) or indefinite (31)."""
    if pos >= len(block):
        return None
    first = block[pos]
    info = first & 0x1F
    if info < 24:
        return first >> 5, info, True, pos + 1
    if info > 27:
        return None
    width = 1 << (info - 24)
    if len(block) - pos - 1 < width:
        return None
    arg = int.from_bytes(block[pos + 1 : pos + 1 + width], "big")
    return first >> 5, arg, arg >= (24, 0x100, 0x10000, 0x100000000)[info - 24], pos + 1 + width


def node_problem(block: bytes, strict: bool) -> str | None:
    """What is wrong with MST node ``block``, found reading it front to back, or ``None``.

    The slow path of :func:`decode_node`, run only for a block that fails the fast decode or is
    longer than its canonical form: it reads the node as the C core does (``decode_node`` in
    native/walk.c), so that both say the same first problem in the same words. Without
    ``strict``, non-minimal heads are accepted; with it they are "not canonical".
    """
    end = len(block)
    pos = 0
    noncanon = False

    def expect(major: int) -> int | None:
        nonlocal pos, noncanon
        head = _cbor_head(block, pos)
        if head is None or head[0] != major:
            return None
        if not head[2] and strict:
            noncanon = True
            return None
        pos = head[3]
        return head[1]

    def text_key() -> int:
        nonlocal pos
        n = expect(3)
        if n != 1 or pos >= end:
            return -1
        pos += 1
        return block[pos - 1]

    def link() -> bool:
        nonlocal pos
        if expect(6) != 42:
            return False
        n = expect(2)
        if n is None or n < 2 or n > end - pos or block[pos] != 0:
            return False
        pos += n
        return True

    def why(detail: str) -> str:
        return _NOT_CANONICAL if noncanon else detail

    if expect(5) != 2:
        return why("not a map of exactly 'e' and 'l'")
    got: set[int] = set()
    for i in range(2):
        key = text_key()
        if key not in (0x65, 0x6C):  # e, l
            return why("not a map of exactly 'e' and 'l'")
        if key in got:
            return "map key 'e' or 'l' is repeated"
        if strict and i == 0 and key != 0x65:
            return _NOT_CANONICAL
        got.add(key)
        if key == 0x65:
            entries = expect(4)
            if entries is None:
                return why("'e' is not a list")
            if entries > end - pos:
                return "'e' claims more entries than there are bytes"
            for j in range(entries):
                if expect(5) != 4:
                    return why(f"entry {j} is not a map of exactly p, k, v, t")
                seen: set[int] = set()
                previous = 0
                for _ in range(4):
                    field = text_key()
                    if field not in (0x6B, 0x70, 0x74, 0x76):  # k, p, t, v
                        return why(f"entry {j} is not a map of exactly p, k, v, t")
                    if field in seen:
                        return f"entry {j} repeats a map key"
                    if strict and field <= previous:
                        return _NOT_CANONICAL
                    previous = field
                    seen.add(field)
                    if field == 0x70:  # p: an unsigned or negative int, read without expect()
                        head = _cbor_head(block, pos)
                        if head is None or head[0] not in (0, 1):
                            return f"entry {j}: 'p' must be an int and 'k' bytes"
                        if not head[2] and strict:
                            return _NOT_CANONICAL
                        pos = head[3]
                    elif field == 0x6B:
                        n = expect(2)
                        if n is None or n > end - pos:
                            return why(f"entry {j}: 'p' must be an int and 'k' bytes")
                        pos += n
                    elif field == 0x76:
                        if not link():
                            return why(f"entry {j}: 'v' is not a CID link")
                    elif pos < end and block[pos] == 0xF6:
                        pos += 1
                    elif not link():
                        return why(f"entry {j}: 't' is neither a CID link nor null")
        elif pos < end and block[pos] == 0xF6:
            pos += 1
        elif not link():
            return why("'l' is neither a CID link nor null")
    if pos != end:
        return "bytes after the node's CBOR item"
    return None


#: A node of more entries than this is kept on the stack joined into a few bytes objects (see
#: :class:`_Frame`); a smaller one (nearly every node) as its decoded entries, at most this many
#: entries' objects per level, as that is quicker to build.
_SMALL_NODE = 64


class _Frame:
    """An expanded node on the walk's stack, kept compressed (see the module docstring).

    ``entry(i)`` is entry ``i``'s ``(p, k, v, t)``, ``t`` empty for no subtree (or one dropped by the
    collection filter); its key is the previous key's first ``p`` bytes, then ``k``. A small node
    keeps its decoded entries; a big one its ``k`` suffixes, ``v`` and ``t`` CIDs joined into one
    bytes object each (``ks[koff[i]:koff[i + 1]]``...) and its ``p`` in an array: about the node's
    own size. ``left`` is the left subtree still to walk (None once pushed, or if dropped). ``i``
    is the next entry, ``key`` the last key built (entry ``i - 1``'s, or while ``subtree`` is set,
    entry ``i``'s, whose subtree is next).
    """

    __slots__ = ("entries", "ts", "ks", "koff", "ps", "vs", "voff", "toff", "n", "i", "key", "subtree", "left", "child", "depth", "lo", "hi")

    def __init__(
        self,
        entries: list[tuple[int, bytes, bytes, bytes | None]],
        ts: list[bytes],
        left: bytes | None,
        child: int,
        depth: int,
        lo: bytes | None,
        hi: bytes | None,
    ) -> None:
        self.n = len(entries)
        if self.n <= _SMALL_NODE:
            self.entries: list[tuple[int, bytes, bytes, bytes | None]] | None = entries
            self.ts: list[bytes] | bytes = ts
        else:
            self.entries = None
            self.ks = b"".join([k for _p, k, _v, _t in entries])
            self.vs = b"".join([v for _p, _k, v, _t in entries])
            self.ts = b"".join(ts)
            self.ps = array("H", [p for p, _k, _v, _t in entries])  # checked: at most MAX_KEY_BYTES
            self.koff = _offsets([len(k) for _p, k, _v, _t in entries])
            self.voff = _offsets([len(v) for _p, _k, v, _t in entries])
            self.toff = _offsets([len(t) for t in ts])
        self.i = 0
        self.key = b""
        self.subtree = False
        self.left = left
        self.child = child
        self.depth = depth
        self.lo = lo
        self.hi = hi

    def entry(self, i: int) -> tuple[int, bytes, bytes, bytes]:
        """Entry ``i``'s ``(p, k, v, t)`` (``t`` empty: no subtree to walk)."""
        if self.entries is not None:
            p, k, v, _t = self.entries[i]
            return p, k, v, self.ts[i]  # type: ignore[return-value]
        koff, voff, toff = self.koff, self.voff, self.toff
        return self.ps[i], self.ks[koff[i] : koff[i + 1]], self.vs[voff[i] : voff[i + 1]], self.ts[toff[i] : toff[i + 1]]  # type: ignore[return-value]


def _offsets(lengths: list[int]) -> array[int]:
    """Start offsets of pieces of these lengths laid end to end, and the end: ``len + 1`` items."""
    out = array("Q", [0])
    out.extend(accumulate(lengths))
    return out


#: Bytes a batch counts per record on top of its data (its offsets and collection index).
ARROW_ROW_BYTES = 16
#: next_batch over a store other than the in-memory table: records walked (and their values
#: fetched in one call) at a time.
STORE_WINDOW = 64


class BatchColumns:
    """A record batch's columns as lists (:meth:`Walker.next_batch`): ``keys``, ``rkeys``,
    ``cids`` (CID texts), ``values`` (``bytes``, or ``str`` JSON text), and the collection column
    dictionary-encoded: ``collections`` (each collection once, in order) and ``indices`` (one
    per record, into ``collections``)."""

    __slots__ = ("keys", "rkeys", "cids", "values", "collections", "indices")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.rkeys: list[str] = []
        self.cids: list[str] = []
        self.values: list[bytes | str] = []
        self.collections: list[str] = []
        self.indices: list[int] = []


class Walker:
    """An in-order MST walk that emits records in chunks and can be resumed.

    Args:
        root: raw CID bytes of the root MST node (the commit's ``data``).
        nodes: where MST nodes are found (a :class:`~repo_stream.core.blocks.NodeLookup`).
        values: the store that turns ``(key, record CID)`` pairs into items
            (:class:`~repo_stream.core.blocks.RecordValues`); ``None`` to emit the pairs.
        max_depth: the deepest node nesting accepted (root is depth 1).
        strict: refuse nodes that are not canonical DAG-CBOR (the drivers set it with
            ``with_verify_cids``).
        record_cids: passed to ``values``: items are ``(key, cid_text, value)``.
        record_type: passed to ``values``: items are ``record_type(key, collection, rkey,
            cid_text or None, value)`` (:func:`repo_stream.core.blocks.make_item`).
        collections: emit only the records of these collections (NSIDs), and skip every subtree
            whose key range cannot hold one of their keys; ``None`` for all.

    After an error the walker stays failed: every later :meth:`next_chunk` raises the same error.
    """

    __slots__ = (
        "_stack", "_last", "_nodes", "_values", "_max_depth", "_strict", "_record_cids", "_record_type", "_failed", "_decoder",
        "_collections", "_ranges", "records", "value_bytes", "nodes_visited", "_carry", "_carry_at",
    )

    def __init__(
        self,
        root: bytes,
        nodes: NodeLookup,
        values: RecordValues | None = None,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        strict: bool = False,
        record_cids: bool = False,
        collections: frozenset[str] | None = None,
        record_type: type | None = None,
    ) -> None:
        if record_type is not None and not (isinstance(record_type, type) and issubclass(record_type, tuple)):
            raise TypeError("record_type must be a tuple subclass (a NamedTuple of five fields) or None")
        # Stack items: (0, cid, expected_layer or -1 for the root, depth, lo, hi) for nodes still
        #              to expand, where lo < every key of the subtree < hi (bytes, or None for
        #              no bound); a _Frame for an expanded node, its records and subtrees.
        self._stack: list[tuple[Any, ...] | _Frame] = [(0, root, -1, 1, None, None)]
        self._collections = collections
        # Keys of collection C are exactly those with C + "/" <= key < C + "0" ("0" follows "/").
        self._ranges = None if collections is None else [(c.encode() + b"/", c.encode() + b"0") for c in sorted(collections)]
        #: MST nodes expanded so far.
        self.nodes_visited = 0
        self._last = ""
        self._nodes = nodes
        self._values = values
        self._max_depth = max_depth
        self._strict = strict
        self._record_cids = record_cids
        self._record_type = record_type
        self._failed: RepoStreamError | None = None
        self._decoder = StrictDecoder(max_depth=8, all_tags=True)  # nodes allow no tag but 42
        #: Records emitted so far.
        self.records = 0
        #: Bytes of the values :meth:`next_batch` took so far: each record block's length before
        #: any transcoding (a ``str`` value's UTF-8 length).
        self.value_bytes = 0
        # next_batch over a store other than MemoryBlocks: a window's records not yet in a batch.
        self._carry: list[tuple[tuple[str, bytes], tuple[Any, ...]]] = []
        self._carry_at = 0

    @property
    def done(self) -> bool:
        """True once every record has been emitted."""
        return not self._stack and self._carry_at >= len(self._carry)

    def abandon(self) -> None:
        """Stop the walk: later :meth:`next_chunk` calls return ``None``."""
        self._stack.clear()
        self._carry = []

    def next_chunk(self, n: int) -> list[tuple[Any, ...]] | None:
        """Emit up to ``n`` (``n`` >= 1) further records; ``None`` when the walk is over.

        Items are what the ``values`` store makes of the ``(key, record CID)`` pairs, or the pairs.

        Raises:
            MstError subclasses, MissingBlockError, ProcessorError (see the module docstring).
        """
        if self._failed is not None:
            raise self._failed
        if n < 1:
            raise ValueError(f"chunk size must be at least 1, got {n}")
        if self._carry_at < len(self._carry):
            raise RuntimeError("next_chunk after next_batch: finish the walk with next_batch")
        try:
            pairs = self._step(n)
            out = pairs if self._values is None else self._values.values(pairs, self._record_cids, self._record_type)
        except RepoStreamError as exc:
            self._failed = exc
            raise
        if not out and not self._stack:
            return None
        self.records += len(out)
        return out

    def next_batch(self, n: int, value_kind: int, max_bytes: int) -> BatchColumns | bytes | None:
        """Up to ``n`` further records as the columns of an Arrow record batch; ``None`` when the
        walk is over (the reference of the C core's ``Walker.next_batch``, which gives the Arrow
        C Data Interface capsules of the same batch; :mod:`repo_stream.read.arrow` makes a
        ``pyarrow.RecordBatch`` of either).

        Over the in-memory table (:class:`~repo_stream.core.blocks.MemoryBlocks`, the C core's
        ``BlockTable``) records are walked one at a time, each value resolved as it comes
        (errors in record order); over another store (the disk's) :data:`STORE_WINDOW` at a time
        (at most as many as the batch still wants), their values fetched in one call (a window's
        walk errors first), the window's rest carried over to the next batch (:attr:`done`
        counts it; :meth:`next_chunk` refuses to run while it is there). The batch ends after
        ``n`` records or after the record that brings its bytes to ``max_bytes``: the UTF-8
        bytes of its keys, rkeys, CID texts and values, plus :data:`ARROW_ROW_BYTES` per record
        (the C core's count, exactly).

        Args:
            n: the most records (>= 1).
            value_kind: 0, values are the record blocks (``bytes``); 1, their atproto JSON text:
                a ``str`` value (the JSON text processor's) as it is, a ``bytes`` value
                transcoded (:func:`repo_stream.records.json_text.transcode_json`; a failure is a
                :class:`~repo_stream.errors.ProcessorError`, as with the transcoder as processor);
                2, the records as ``repo-stream dump``'s JSON lines, one ``bytes`` (UTF-8) of
                ``{"key":"<key>","cid":"<cid>","value":<JSON text>}\n`` each, instead of
                columns; the budget then counts the lines' bytes alone.
            max_bytes: the batch's byte budget (>= 1).

        Raises:
            TypeError: a value is neither (``value_kind`` 1: ``str`` nor) ``bytes``; the walker
                has no ``values`` store.
            ValueError: ``n``, ``value_kind`` or ``max_bytes`` out of range.
            MstError subclasses, MissingBlockError, ProcessorError (module docstring).
        """
        if self._failed is not None:
            raise self._failed
        if n < 1:
            raise ValueError(f"batch size must be at least 1, got {n}")
        if max_bytes < 1:
            raise ValueError(f"a batch's byte budget must be at least 1, got {max_bytes}")
        if value_kind not in (0, 1, 2):
            raise ValueError(f"value_kind is 0 (raw blocks), 1 (JSON text) or 2 (JSON lines), got {value_kind}")
        if self._values is None:
            raise TypeError("next_batch needs a store of record values (the walker's values)")
        columns = BatchColumns()
        try:
            self._fill(columns, n, value_kind, max_bytes)
        except RepoStreamError as exc:
            self._failed = exc
            raise
        if not columns.keys and self.done:
            return None
        self.records += len(columns.keys)
        if value_kind == 2:
            return "".join(columns.values).encode()  # type: ignore[arg-type]
        return columns

    def _fill(self, c: BatchColumns, n: int, value_kind: int, max_bytes: int) -> None:
        values = self._values
        assert values is not None
        transcode: Callable[[bytes], str] | None = None
        used = 0
        last = None
        in_table = isinstance(values, MemoryBlocks)
        while len(c.keys) < n and used < max_bytes:
            if in_table:  # one record at a time: errors in record order
                pairs = self._step(1)
                if not pairs:
                    return
                ((key, cid),) = pairs
                ((_key, text, value),) = values.values(pairs, True, None)
            else:  # another store (the disk's): a window of records walked, then their values fetched
                if self._carry_at >= len(self._carry):
                    self._carry = []
                    self._carry_at = 0
                    pairs = self._step(min(n - len(c.keys), STORE_WINDOW))
                    if not pairs:
                        return
                    self._carry = list(zip(pairs, values.values(pairs, True, None), strict=True))
                (key, cid), (_key, text, value) = self._carry[self._carry_at]
                self._carry_at += 1
            taken = len(value) if type(value) is bytes else len(value.encode()) if type(value) is str else 0
            if value_kind >= 1 and type(value) is bytes:
                if transcode is None:
                    from ..records.json_text import _python_transcode_json  # records imports core: lazily

                    transcode = _python_transcode_json
                try:
                    value = transcode(value)
                except Exception as exc:
                    raise messages.processor_failed(key, cid, exc) from exc
            elif not (type(value) is bytes or (value_kind >= 1 and type(value) is str)):
                raise TypeError(
                    f"next_batch: the value of record {key!r} is {type(value).__name__}, not {'str or bytes' if value_kind else 'bytes'}"
                )
            self.value_bytes += taken
            if value_kind == 2:  # the JSON line (key and CID text need no escaping: module docstring of read.arrow)
                line = f'{{"key":"{key}","cid":"{text}","value":{value}}}\n'
                c.keys.append(key)
                c.values.append(line)
                used += len(line.encode())
                continue
            collection, _, rkey = key.partition("/")
            if collection != last:
                c.collections.append(collection)
                last = collection
            c.indices.append(len(c.collections) - 1)
            c.keys.append(key)
            c.rkeys.append(rkey)
            c.cids.append(text)
            c.values.append(value)
            used += 2 * len(key) - len(collection) - 1 + len(text) + (len(value) if type(value) is bytes else len(value.encode())) + ARROW_ROW_BYTES

    def _step(self, n: int) -> list[tuple[Any, ...]]:
        stack = self._stack
        pop = stack.pop
        out: list[tuple[Any, ...]] = []
        emit = out.append
        last = self._last
        get_node = self._nodes.node
        prefetch = getattr(self._nodes, "prefetch", None)
        wanted = self._collections
        while stack and len(out) < n:
            item = stack[-1]
            if type(item) is _Frame:
                f = item
                if f.left is not None:  # walked first
                    left, f.left = f.left, None
                    stack.append((0, left, f.child, f.depth + 1, f.lo, f.entry(0)[1]))
                    continue
                i = f.i
                p, k, v, t = f.entry(i)
                if f.subtree:  # entry i's subtree, between its key and the next
                    f.subtree = False
                    f.i = i + 1
                    if f.i == f.n:
                        pop()
                        hi = f.hi
                    else:
                        np, nk, _v, _t = f.entry(i + 1)
                        hi = f.key[:np] + nk
                    stack.append((0, t, f.child, f.depth + 1, f.key, hi))
                    continue
                key = f.key[:p] + k if p else k
                f.key = key
                if t:
                    f.subtree = True
                else:
                    f.i = i + 1
                    if f.i == f.n:
                        pop()
                skey = key.decode()
                if skey <= last:
                    raise messages.key_order(skey, last)
                if wanted is None or skey.partition("/")[0] in wanted:
                    emit((skey, v))
                last = skey
                continue
            pop()
            assert type(item) is tuple
            _, cid, expected, depth, lo, hi = item
            if depth > self._max_depth:
                raise messages.depth_limit(cid, depth, self._max_depth)
            if cid[:2] != _DAG_CBOR_V1:
                raise messages.node_link_codec(cid)
            block = get_node(cid)
            if block is None:
                raise messages.missing_node(cid)
            if block is NOT_A_NODE:
                raise messages.not_a_node(cid)
            self.nodes_visited += 1
            children = self._expand(cid, block, expected, depth, lo, hi, stack)
            if children and prefetch is not None:
                prefetch(children)
        self._last = last
        return out

    def _may_hold(self, lo: bytes | None, hi: bytes | None) -> bool:
        """Whether keys strictly between ``lo`` and ``hi`` can belong to a wanted collection."""
        ranges = self._ranges
        if ranges is None:
            return True
        return any((hi is None or hi > first) and (lo is None or lo < end) for first, end in ranges)

    def _expand(
        self, cid: bytes, block: bytes, expected: int, depth: int, lo: bytes | None, hi: bytes | None, stack: list[tuple[Any, ...] | _Frame]
    ) -> list[bytes] | None:
        """Decode one node, check its rules and push it as a :class:`_Frame` (or, for a node with
        only a left subtree, that subtree).

        Subtrees whose key range cannot hold a wanted collection are dropped. Returns the subtree
        CIDs kept (the entries', then the left one), for stores that fetch in batches.
        """
        left, entries = decode_node(cid, block, self._decoder, self._strict)
        is_root = expected < 0
        if not entries:
            if left is None:
                if is_root:
                    return None  # the empty repo
                raise messages.empty_node(cid)
            if is_root:
                raise messages.empty_root(cid)
            if expected == 0:
                raise messages.left_at_layer0(cid)
            if not self._may_hold(lo, hi):
                return None
            stack.append((0, left, expected - 1, depth + 1, lo, hi))
            return [left]

        # Rebuild keys and check prefixes, layers and syntax, keeping only the last key built: a
        # node's keys spelled out can be ~40x its bytes. With a filter, a subtree is dropped (its
        # CID left empty) when the keys around it rule out every wanted collection.
        filtered = self._ranges is not None
        may_hold = self._may_hold
        ts: list[bytes] = []
        first_key = b""
        prev = b""
        layer = -1
        for i, ((_p, _k, _vcid, tcid), (key, node_layer)) in enumerate(zip(entries, node_keys(cid, entries, expected), strict=True)):
            layer = node_layer
            if i == 0:
                first_key = key
            elif filtered and ts[-1] and not may_hold(prev, key):
                ts[-1] = b""
            ts.append(tcid or b"")
            prev = key
        child = layer - 1 if is_root else expected - 1
        if layer != expected and not is_root:  # after the loop, so a mixed node reports the mix
            raise messages.wrong_layer(cid, layer, expected)
        if left is not None and child < 0:
            raise messages.left_at_layer0(cid)
        if filtered and ts[-1] and not may_hold(prev, hi):
            ts[-1] = b""
        subtrees = [t for t in ts if t]
        keep_left = left is not None and may_hold(lo, first_key)
        stack.append(_Frame(entries, ts, left if keep_left else None, child, depth, lo, hi))
        if keep_left:
            assert left is not None
            subtrees.append(left)
        return subtrees
