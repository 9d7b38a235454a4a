"""Partial Merkle Search Trees: the part of a repo's MST that a CAR slice holds.

A ``#commit`` event's blocks, or a ``com.atproto.sync.getRecord`` answer, hold only some of a
repo's MST nodes. :class:`PartialTree` keeps the nodes present, decoded and checked with the same
strict DAG-CBOR and the same rules (and error classes and messages) as the walker
(:mod:`repo_stream.core.walk`), and keeps every link to an absent block as an *unknown subtree*:
not an error until an operation needs it, then :class:`~repo_stream.errors.UnknownSubtreeError`
naming its CID.

Spec: atproto repository, "Merkle Search Tree" (https://atproto.com/specs/repository); atproto
sync, "Commit Validation" (https://atproto.com/specs/sync).

Nodes are decoded lazily, when an operation first reaches them (by cbrrr, which accepts only
canonical DAG-CBOR: a signed tree's nodes are canonical), and each is checked on the way:
its entries (prefix compression, UTF-8, key syntax unless ``check_keys=False``), every key on the
node's layer, the node exactly one layer below its parent, keys strictly increasing and inside the
range its parent gives it. Everything here is iterative (explicit paths and stacks): the input
cannot drive recursion, and a tree is at most as deep as its root's layer + 1 (bounded by
``max_depth``).

Edits (:mod:`repo_stream.sync.edit`) change nodes in place and mark the changed ones; :meth:`root`
re-encodes them (canonical DAG-CBOR, maximal prefix compression) and returns the new root CID.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Final, NamedTuple

from cbrrr import _cbrrr

from ..core import implementation, messages
from ..core.car import DEFAULT_MAX_BLOCK_SIZE, decode_header
from ..core.cid import dag_cbor_cid
from ..core.dagcbor import HEADS, LINK36_HEAD, StrictDecoder, encode_head, encode_link
from ..core.walk import DEFAULT_MAX_DEPTH, decode_node, node_keys

try:
    from .. import _native
except ImportError:  # the C core is not built: the reference runs
    _native = None  # type: ignore[assignment]

__all__ = [
    "CarSlice",
    "Node",
    "PartialTree",
    "SliceEntry",
    "decode_node_strict",
    "encode_node",
    "encode_tree_node",
    "key_layer_of",
    "load_node",
    "read_car_slice",
]

_sha256 = hashlib.sha256
_DAG_CBOR_V1: Final = b"\x01\x71"
_LINK36: Final = LINK36_HEAD
_EMPTY_NODE: Final = b"\xa2\x61e\x80\x61l\xf6"  # {"e": [], "l": null}


def key_layer_of(key: bytes) -> int:
    """The MST layer of ``key`` (leading zero bits of sha256(key), halved), as the walker computes it."""
    digest = _sha256(key).digest()
    top = int.from_bytes(digest[:8], "big")
    if top:
        return (64 - top.bit_length()) >> 1
    return (256 - int.from_bytes(digest, "big").bit_length()) >> 1


class Node:
    """One MST node of a :class:`PartialTree`, decoded (internal to :mod:`repo_stream.sync`).

    ``kids`` has ``len(keys) + 1`` slots: ``kids[0]`` is ``l``, ``kids[i + 1]`` the ``t`` of entry
    ``i``. A slot is ``None`` (no subtree), ``bytes`` (the raw CID of a subtree not decoded yet,
    whose block may be absent) or a :class:`Node`. ``cid`` is the node's CID while it is
    unchanged, ``None`` once an edit changed it. ``layer`` is -1 only for the empty tree's root.
    """

    __slots__ = ("layer", "keys", "vals", "kids", "cid")

    def __init__(self, layer: int, keys: list[bytes], vals: list[bytes], kids: list[Node | bytes | None], cid: bytes | None = None) -> None:
        self.layer = layer
        self.keys = keys
        self.vals = vals
        self.kids = kids
        self.cid = cid


class SliceEntry(NamedTuple):
    """A record found by :meth:`PartialTree.walk_slice`: its key, its raw record CID and its
    record block (``None`` when the slice does not hold it)."""

    key: str
    cid: bytes
    block: bytes | None


def _prefix_len(a: bytes, b: bytes) -> int:
    """Bytes ``a`` and ``b`` share at their start (XOR of the common length, as integers)."""
    n = min(len(a), len(b))
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    if not x:
        return n
    return n - 1 - ((x.bit_length() - 1) >> 3)


class _Cid(bytes):
    """A CID link's bytes as cbrrr decodes it (told apart from byte strings by its type)."""

    __slots__ = ()


_NODE_FIELDS: Final = frozenset(("e", "l"))
_ENTRY_FIELDS: Final = frozenset(("k", "p", "t", "v"))
_decode_cbor: Callable[[bytes, type[_Cid], bool], tuple[object, int]] = _cbrrr.decode_dag_cbor


def decode_node_strict(cid: bytes, block: bytes) -> tuple[bytes | None, list[tuple[int, bytes, bytes, bytes | None]]]:
    """Decode an MST node block, which must be canonical DAG-CBOR, into ``(left, [(p, k, v, t)])``
    (CIDs as raw bytes): what :func:`repo_stream.core.walk.decode_node` with ``strict`` gives,
    with the same errors and messages (so those of the C core's node decoder).

    cbrrr decodes it first (C, iterative, every length checked; canonical only); a node it
    refuses, or that is not exactly ``{e: [{p: int, k: bytes, v: CID, t: CID | null}], l: CID |
    null}``, goes to the walker's strict decoder, which says what is wrong (or, for a node cbrrr
    alone refuses, decodes it).

    Raises:
        NodeDecodeError: not one canonical DAG-CBOR item, or not that structure.
    """
    try:
        node, length = _decode_cbor(block, _Cid, False)
    except Exception:
        return _decode_slow(cid, block)
    if length != len(block) or type(node) is not dict or node.keys() != _NODE_FIELDS:
        return _decode_slow(cid, block)
    entries = node["e"]
    left = node["l"]
    if type(entries) is not list or (left is not None and type(left) is not _Cid):
        return _decode_slow(cid, block)
    out: list[tuple[int, bytes, bytes, bytes | None]] = []
    for entry in entries:
        if type(entry) is not dict or entry.keys() != _ENTRY_FIELDS:
            return _decode_slow(cid, block)
        p = entry["p"]
        k = entry["k"]
        v = entry["v"]
        t = entry["t"]
        if type(p) is not int or type(k) is not bytes or type(v) is not _Cid or (t is not None and type(t) is not _Cid):
            return _decode_slow(cid, block)
        out.append((p, k, bytes(v), None if t is None else bytes(t)))
    return (None if left is None else bytes(left)), out


def _decode_slow(cid: bytes, block: bytes) -> tuple[bytes | None, list[tuple[int, bytes, bytes, bytes | None]]]:
    return decode_node(cid, block, StrictDecoder(max_depth=8), True)


_link = encode_link
_cbor_head_slow = encode_head
_HEADS: Final = HEADS


def _cbor_head(major: int, n: int) -> bytes:
    return _HEADS[major][n] if n < 256 and major in _HEADS else encode_head(major, n)


def encode_tree_node(left: bytes | None, keys: list[bytes], vals: list[bytes], rights: list[bytes | None]) -> bytes:
    """Encode an MST node in canonical DAG-CBOR with maximal prefix compression.

    Args:
        left: the raw CID of ``l`` or ``None``.
        keys: the entries' full keys, strictly increasing.
        vals: the entries' record CIDs.
        rights: each entry's ``t`` subtree CID or ``None``.

    Returns:
        The node block (the same bytes :func:`repo_stream.records.writer.build_mst` makes).

    Spec: atproto repository, "MST Structure".
    """
    out = [b"\xa2\x61e", _cbor_head(4, len(keys))]
    append = out.append
    prev = b""
    small_int = _HEADS[0]
    bytes_head = _HEADS[2]
    link36 = _LINK36
    for key, val, right in zip(keys, vals, rights, strict=True):
        p = _prefix_len(prev, key) if prev else 0
        suffix = key[p:]
        n = len(suffix)
        append(b"\xa4\x61k")
        append(bytes_head[n] if n < 256 else _cbor_head_slow(2, n))
        append(suffix)
        append(b"\x61p")
        append(small_int[p] if p < 256 else _cbor_head_slow(0, p))
        append(b"\x61t")
        append(b"\xf6" if right is None else link36 + right if len(right) == 36 else _link(right))
        append(b"\x61v")
        append(link36 + val if len(val) == 36 else _link(val))
        prev = key
    append(b"\x61l")
    append(b"\xf6" if left is None else _link(left))
    return b"".join(out)


def load_node(
    cid: bytes, block: bytes, expected: int, lo: bytes | None, hi: bytes | None, check_keys: bool
) -> tuple[int, list[bytes], list[bytes], list[Node | bytes | None]]:
    """Decode and check one MST node of a partial tree: ``(layer, keys, vals, kids)``.

    The reference of the C core's ``load_node`` (same results, same errors and messages).

    Args:
        cid: the node's raw CID (named in errors).
        block: its bytes.
        expected: its layer, or -1 for the root (-1 is also the layer returned for the empty
            root ``{e: [], l: null}``).
        lo, hi: its keys must lie strictly between them (``None``: unbounded).
        check_keys: require valid ``collection/rkey`` keys.

    Returns:
        The node's layer, its full keys (strictly increasing), its record CIDs, and its
        ``len(keys) + 1`` subtree links (``kids[0]`` is ``l``; ``None`` for none), raw CIDs.

    Raises:
        NodeDecodeError: see :func:`decode_node_strict`. PrefixError, LayerMismatchError,
        InvalidKeyError, KeyEncodingError, SubtreeLayerError: see
        :func:`repo_stream.core.walk.node_keys`. EmptyNodeError, EmptyRootError, KeyOrderError,
        SubtreeLayerError: the node's own rules.

    Spec: atproto repository, "Merkle Search Tree".
    """
    left, entries = decode_node_strict(cid, block)
    is_root = expected < 0
    if not entries:
        if left is None:
            if is_root:
                return -1, [], [], [None]  # the empty repo
            raise messages.empty_node(cid)
        if is_root:
            raise messages.empty_root(cid)
        if expected == 0:
            raise messages.left_at_layer0(cid)
        return expected, [], [], [left]
    keys: list[bytes] = []
    vals: list[bytes] = []
    kids: list[Node | bytes | None] = [left]
    layer = -1
    for (_p, _k, vcid, tcid), (key, node_layer) in zip(entries, node_keys(cid, entries, expected, check_keys), strict=True):
        layer = node_layer
        if keys and key <= keys[-1]:
            raise messages.key_order(key.decode(), keys[-1].decode())
        keys.append(key)
        vals.append(vcid)
        kids.append(tcid)
    if layer != expected and not is_root:
        raise messages.wrong_layer(cid, layer, expected)
    if left is not None and layer == 0:
        raise messages.left_at_layer0(cid)
    if lo is not None and keys[0] <= lo:
        raise messages.key_order(keys[0].decode(), lo.decode("utf-8", "replace"))
    if hi is not None and keys[-1] >= hi:
        raise messages.key_order(hi.decode("utf-8", "replace"), keys[-1].decode())
    return layer, keys, vals, kids


def encode_node(left: bytes | None, keys: list[bytes], vals: list[bytes], rights: list[bytes | None]) -> tuple[bytes, bytes]:
    """:func:`encode_tree_node` and its CID: ``(raw CID, block)`` (the reference of the C core's
    ``encode_node``). Raises ValueError when the lists' lengths differ."""
    block = encode_tree_node(left, keys, vals, rights)
    return dag_cbor_cid(block), block


class PartialTree:
    """An MST of which only some nodes are known: lookups, range walks and (with
    :mod:`repo_stream.sync.edit`) edits that need only the nodes on their paths.

    Args:
        root: the raw CID of the root node (a commit's ``data``).
        blocks: the blocks available, by raw CID (the CAR slice's). Blocks are not hash-checked
            here: give blocks from a CAR parsed with CID verification (the sync functions do).
        check_keys: also require every key to be a valid ``collection/rkey`` repo path, as the
            walker does (the interop fixtures' keys such as ``A0/374913`` are not).
        max_depth: the deepest node nesting accepted (the walker's default, 32).

    Raises (from every method that reads nodes): :class:`~repo_stream.errors.UnknownSubtreeError`
    when the operation needs an absent node; the walker's :class:`~repo_stream.errors.MstError`
    subclasses when a node breaks a rule; :class:`~repo_stream.errors.DepthLimitError`.
    """

    __slots__ = ("_blocks", "_check_keys", "_max_depth", "_root", "_root_cid", "_load_node", "_encode_node", "nodes_loaded", "added")

    def __init__(self, root: bytes, blocks: Mapping[bytes, bytes], *, check_keys: bool = True, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._blocks = blocks
        self._check_keys = check_keys
        self._max_depth = max_depth
        self._root_cid = root
        self._root: Node | None = None
        native = implementation.backend().name == "c" and _native is not None
        self._load_node: Callable[[bytes, bytes, int, bytes | None, bytes | None, bool], tuple[int, list[bytes], list[bytes], list[Node | bytes | None]]] = (
            _native.load_node if native else load_node
        )
        self._encode_node: Callable[[bytes | None, list[bytes], list[bytes], list[bytes | None]], tuple[bytes, bytes]] = (
            _native.encode_node if native else encode_node
        )
        #: MST nodes decoded so far.
        self.nodes_loaded = 0
        #: Node blocks made by :meth:`root` since the tree was loaded, by raw CID.
        self.added: dict[bytes, bytes] = {}

    # ------------------------------------------------------------------------------ loading

    @property
    def check_keys(self) -> bool:
        """Whether keys must be valid repo paths (see the class docstring)."""
        return self._check_keys

    def root_node(self) -> Node:
        """The root :class:`Node`, decoded (and checked) on first use."""
        node = self._root
        if node is None:
            node = self._root = self._load(self._root_cid, -1, None, None, 1)
            if node.layer + 1 > self._max_depth:
                raise messages.partial_too_deep(self._root_cid, node.layer, self._max_depth)
        return node

    def set_root_node(self, node: Node) -> None:
        """Replace the root (used by the edits)."""
        self._root = node

    def kid(self, node: Node, i: int, lo: bytes | None, hi: bytes | None) -> Node | None:
        """The subtree in slot ``i`` of ``node`` (decoding it if needed), or ``None``.

        ``lo`` and ``hi`` bound ``node``'s own keys (``None``: unbounded); the subtree's keys must
        lie strictly between its neighbours in ``node``.
        """
        kid = node.kids[i]
        if kid is None or type(kid) is Node:
            return kid
        assert isinstance(kid, bytes)
        keys = node.keys
        loaded = self._load(kid, node.layer - 1, keys[i - 1] if i else lo, keys[i] if i < len(keys) else hi, 0)
        node.kids[i] = loaded
        return loaded

    def _load(self, cid: bytes, expected: int, lo: bytes | None, hi: bytes | None, depth: int) -> Node:
        """Decode and check the node ``cid`` (``expected`` layer, or -1 for the root)."""
        if cid[:2] != _DAG_CBOR_V1:
            raise messages.node_link_codec(cid)
        block = self._blocks.get(cid)
        if block is None:
            raise messages.unknown_subtree(cid, expected)
        layer, keys, vals, kids = self._load_node(cid, block, expected, lo, hi, self._check_keys)
        self.nodes_loaded += 1
        return Node(layer, keys, vals, kids, cid)

    # ------------------------------------------------------------------------------ reading

    def get(self, key: str) -> bytes | None:
        """The raw record CID the tree holds at ``key``, or ``None`` if it holds none (a proven
        absence: the nodes down to ``key``'s layer are enough to know).

        Raises:
            UnknownSubtreeError: a node on the path to ``key`` is not in the slice.
        """
        return self.get_bytes(key.encode())

    def get_bytes(self, key: bytes) -> bytes | None:
        """:meth:`get` for a key given as UTF-8 bytes."""
        node: Node | None = self.root_node()
        layer = key_layer_of(key)
        lo: bytes | None = None
        hi: bytes | None = None
        while node is not None:
            if node.layer < layer:
                return None
            keys = node.keys
            i = bisect_left(keys, key)
            if i < len(keys) and keys[i] == key:
                return node.vals[i]
            if node.layer == layer:
                return None
            child = self.kid(node, i, lo, hi)
            if i:
                lo = keys[i - 1]
            if i < len(keys):
                hi = keys[i]
            node = child
        return None

    def path_cids(self, key: bytes) -> list[bytes]:
        """The CIDs of the (unchanged) nodes :meth:`get_bytes` reads for ``key``, root first."""
        out: list[bytes] = []
        node: Node | None = self.root_node()
        layer = key_layer_of(key)
        lo: bytes | None = None
        hi: bytes | None = None
        while node is not None:
            if node.cid is not None:
                out.append(node.cid)
            if node.layer <= layer:
                break
            keys = node.keys
            i = bisect_left(keys, key)
            child = self.kid(node, i, lo, hi)
            if i:
                lo = keys[i - 1]
            if i < len(keys):
                hi = keys[i]
            node = child
        return out

    def walk_slice(self, start: str | None = None, end: str | None = None) -> Iterator[SliceEntry]:
        """Yield the records with ``start <= key < end`` in key order (``None``: unbounded).

        Each comes with its raw CID and its block when the slice holds it. Subtrees whose key
        range lies outside ``[start, end)`` are never read; an unknown subtree inside it raises.

        Raises:
            UnknownSubtreeError: the range reaches into a subtree whose node is absent.
        """
        lo_key = None if start is None else start.encode()
        hi_key = None if end is None else end.encode()
        root = self.root_node()
        # Stack items: (node, lo, hi) to expand, or (key, cid, None) to emit.
        stack: list[tuple[Node | bytes, bytes | None, bytes | None]] = [(root, None, None)]
        blocks = self._blocks
        while stack:
            top, first, second = stack.pop()
            if not isinstance(top, Node):
                assert first is not None
                yield SliceEntry(top.decode(), first, blocks.get(first))
                continue
            node, nlo, nhi = top, first, second
            keys = node.keys
            pushed: list[tuple[Node | bytes, bytes | None, bytes | None]] = []
            for i in range(len(keys) + 1):
                sub_lo = keys[i - 1] if i else nlo
                sub_hi = keys[i] if i < len(keys) else nhi
                # The subtree holds keys strictly between sub_lo and sub_hi.
                if node.kids[i] is not None and (hi_key is None or sub_lo is None or sub_lo < hi_key) and (
                    lo_key is None or sub_hi is None or sub_hi > lo_key
                ):
                    child = self.kid(node, i, nlo, nhi)
                    if child is not None:
                        pushed.append((child, sub_lo, sub_hi))
                if i < len(keys):
                    key = keys[i]
                    if (lo_key is None or key >= lo_key) and (hi_key is None or key < hi_key):
                        pushed.append((key, node.vals[i], None))
            stack.extend(reversed(pushed))

    # ------------------------------------------------------------------------------ encoding

    def root(self) -> bytes:
        """The raw CID of the root node, re-encoding the nodes edits changed (iteratively).

        The new node blocks are kept in :attr:`added`.
        """
        root = self._root
        if root is None:
            return self._root_cid
        if root.cid is not None:
            return root.cid
        added = self.added
        encode = self._encode_node
        # Post-order over changed nodes: (node, children done?)
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if node.cid is not None:
                continue
            if not ready:
                stack.append((node, True))
                for kid in node.kids:
                    if type(kid) is Node and kid.cid is None:
                        stack.append((kid, False))
                continue
            links: list[bytes | None] = []
            for kid in node.kids:
                if kid is None or type(kid) is bytes:
                    links.append(kid)
                else:
                    assert isinstance(kid, Node) and kid.cid is not None
                    links.append(kid.cid)
            if node.layer < 0:
                block = _EMPTY_NODE
                cid = dag_cbor_cid(block)
            else:
                cid, block = encode(links[0], node.keys, node.vals, links[1:])
            added[cid] = block
            node.cid = cid
        assert root.cid is not None
        return root.cid

    def block(self, cid: bytes) -> bytes | None:
        """The block ``cid`` from the slice or from the nodes :meth:`root` made, or ``None``."""
        got = self._blocks.get(cid)
        return got if got is not None else self.added.get(cid)


class CarSlice(NamedTuple):
    """The blocks of a CAR that may hold only part of a repo: its roots and blocks, by raw CID."""

    roots: list[bytes]
    blocks: dict[bytes, bytes]


def read_car_slice(car: bytes, *, max_block_size: int = DEFAULT_MAX_BLOCK_SIZE, verify_cids: bool = True) -> CarSlice:
    """Parse a whole CAR held in memory (a ``#commit``'s ``blocks``, a getRecord answer), checking
    every block against its CID, with the implementation in use (the C core or the reference).

    Args:
        car: the CAR v1 bytes.
        max_block_size: the largest block accepted, in bytes.
        verify_cids: check every block against its CID (sha2-256); False only for trusted
            bytes or to measure decoding alone.

    Returns:
        A :class:`CarSlice`; a CID given twice keeps its first block (both hash to it).

    Raises:
        CarError: a framing or header error (its subclasses), as the CAR parser raises them.
        CidMismatchError: a block does not hash to its CID.

    Spec: IPLD CAR v1; atproto repository, "CAR File Serialization".
    """
    parser = implementation.backend().CarParser(max_block_size, verify_cids)
    parser.feed(bytes(car))
    raw = parser.read_header()
    if raw is None:
        parser.finish()  # raises: the input ends inside the header
        raise AssertionError("unreachable")  # pragma: no cover
    roots = decode_header(raw, parser.offset - len(raw))
    blocks: dict[bytes, bytes] = {}
    parser.sections_into(blocks)
    parser.finish()
    return CarSlice(roots, blocks)
