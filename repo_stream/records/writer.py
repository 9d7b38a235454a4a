"""Write atproto repository CAR files: canonical MSTs, commits, and raw CAR framing.

This module is the write side of repo-stream, used by tests and benchmarks to produce repos the
reader must accept (:func:`build_repo_car`) and to hand-craft hostile ones (:func:`encode_node`,
:func:`encode_commit`, :func:`write_car`, ...). Nothing here validates more than it says: the
low-level helpers encode whatever they are given.

CIDs are raw ``bytes`` throughout (see :mod:`repo_stream.core.cid`); blocks are DAG-CBOR ``bytes``.

Specs:

* atproto repository (https://atproto.com/specs/repository): "Commit Objects", "Merkle Search
  Tree" (MST structure, key layers, prefix compression), "CAR File Serialization".
* IPLD CAR v1 (https://ipld.io/specs/transport/car/carv1/): ``varint(len(header)) + header`` then
  sections ``varint(len(cid) + len(block)) + cid + block``.
* DAG-CBOR (https://ipld.io/specs/codecs/dag-cbor/spec/): canonical map key order (shorter keys
  first, then bytewise), links as CBOR tag 42 over ``0x00 + cid``.

Block order of :func:`build_repo_car` with ``order="preorder"``: the commit, then the MST in
depth-first pre-order as an in-order walker consumes it. For a node: the node block, then its
``l`` subtree, then for each entry in turn the entry's record block followed by the entry's ``t``
subtree. Records therefore appear in increasing key order, and each node appears immediately
before the first block of its subtree. A block (record, node or commit) whose CID was already
written is skipped, so a record shared by several keys appears once, at its first key.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO

import cbor2

from ..core.cid import dag_cbor_cid, to_cid
from ..core.commit import Commit, encode_commit, encode_unsigned_commit
from ..core.dagcbor import HEADS, encode_head, encode_link
from ..core.mst import is_valid_key, key_layer
from ..errors import InvalidKeyError, KeyOrderError

__all__ = [
    "ORDERS",
    "encode_varint",
    "link",
    "encode_node",
    "encode_unsigned_commit",
    "encode_commit",
    "encode_car_header",
    "write_car",
    "car_bytes",
    "build_mst",
    "build_repo_car",
]

#: The block orders :func:`build_repo_car` accepts.
ORDERS = ("preorder", "shuffled", "reverse")

# --------------------------------------------------------------------------------------------
# Low-level encoding
# --------------------------------------------------------------------------------------------


def encode_varint(n: int) -> bytes:
    """Encode ``n`` as a minimal unsigned LEB128 varint (the CAR v1 length prefix).

    Args:
        n: a non-negative ``int`` (no upper bound; the CAR spec itself allows at most 2**63 - 1).

    Returns:
        7 bits per byte, least significant group first, high bit set on all but the last byte.

    Raises:
        TypeError: ``n`` is not an ``int`` (``bool`` included).
        ValueError: ``n`` is negative.
    """
    if type(n) is not int:
        raise TypeError(f"varint must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"varint must be non-negative, got {n}")
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def link(cid: bytes) -> cbor2.CBORTag:
    """Return the DAG-CBOR link to ``cid``: CBOR tag 42 over the bytes ``b"\\x00" + cid``.

    Args:
        cid: raw CID bytes (not checked).

    Spec: DAG-CBOR, "Links".
    """
    return cbor2.CBORTag(42, b"\x00" + bytes(cid))


_head = encode_head


def _int(n: int) -> bytes:
    """Return the CBOR encoding of the integer ``n`` (major type 0 or 1; |n| < 2**64)."""
    return _head(0, n) if n >= 0 else _head(1, -1 - n)


# Precomputed encodings for the common case of 36-byte CIDs and small integers.
_SMALL_INT = HEADS[0]
_BYTES_HEAD = HEADS[2]
_ARRAY_HEAD = HEADS[4]
_link_bytes = encode_link


def encode_node(left: bytes | None, entries: Iterable[tuple[int, bytes, bytes, bytes | None]]) -> bytes:
    """Encode an MST node exactly as given, in canonical DAG-CBOR; no validation at all.

    The result is the map ``{"e": [{"k": k, "p": p, "t": link(t) | null, "v": link(v)}, ...],
    "l": link(left) | null}`` with keys in canonical order (``e`` < ``l``; ``k`` < ``p`` < ``t``
    < ``v``), which is what :func:`cbor2.dumps` with ``canonical=True`` produces for the same
    value. Prefix compression is the caller's business: ``k`` is written as given.

    Args:
        left: raw CID of the left subtree, or ``None`` for null.
        entries: ``(p, k, v, t)`` tuples: ``p`` the shared-prefix length (any ``int``, even
            negative or too large), ``k`` the key suffix bytes, ``v`` the record's raw CID, ``t``
            the right subtree's raw CID or ``None``.

    Returns:
        The node block bytes; its CID is :func:`repo_stream.core.cid.dag_cbor_cid` of them.

    Spec: atproto repository, "MST Structure" (node and entry fields).
    """
    entries = list(entries)
    n = len(entries)
    out = [b"\xa2\x61e", _ARRAY_HEAD[n] if n < 256 else _head(4, n)]
    for p, k, v, t in entries:
        k = bytes(k)
        lk = len(k)
        out.append(b"\xa4\x61k")
        out.append(_BYTES_HEAD[lk] if lk < 256 else _head(2, lk))
        out.append(k)
        out.append(b"\x61p")
        out.append(_SMALL_INT[p] if 0 <= p < 256 else _int(p))
        out.append(b"\x61t")
        out.append(b"\xf6" if t is None else _link_bytes(bytes(t)))
        out.append(b"\x61v")
        out.append(_link_bytes(bytes(v)))
    out.append(b"\x61l")
    out.append(b"\xf6" if left is None else _link_bytes(bytes(left)))
    return b"".join(out)


def encode_car_header(roots: Iterable[bytes]) -> bytes:
    """Encode the CAR v1 header block ``{"roots": [link, ...], "version": 1}`` (no length prefix).

    Args:
        roots: raw root CIDs, in order (zero roots is encoded as given).

    Spec: IPLD CAR v1, "Header".
    """
    return cbor2.dumps({"roots": [link(r) for r in roots], "version": 1}, canonical=True)


def write_car(out: Any, roots: Iterable[bytes], blocks: Iterable[tuple[bytes, bytes]]) -> int:
    """Write a CAR v1 stream: header, then one section per ``(cid, block)`` in the given order.

    Nothing is checked or deduplicated: a CID need not match its block, blocks may repeat.

    Args:
        out: a binary file object with ``.write``, or a filesystem path (``str`` / ``PathLike``)
            which is created or truncated.
        roots: raw root CIDs for the header.
        blocks: ``(cid, block)`` pairs of bytes; consumed lazily, one at a time.

    Returns:
        The number of bytes written.

    Raises:
        OSError: the file cannot be opened or written.

    Spec: IPLD CAR v1, "Format Description"; atproto repository, "CAR File Serialization".
    """
    if not hasattr(out, "write"):
        with open(os.fspath(out), "wb") as fh:
            return write_car(fh, roots, blocks)
    header = encode_car_header(roots)
    write = out.write
    write(encode_varint(len(header)))
    write(header)
    total = len(encode_varint(len(header))) + len(header)
    for cid, block in blocks:
        n = len(cid) + len(block)
        prefix = encode_varint(n)
        write(prefix)
        write(cid)
        write(block)
        total += len(prefix) + n
    return total


def car_bytes(roots: Iterable[bytes], blocks: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Return the CAR v1 bytes :func:`write_car` would write for ``roots`` and ``blocks``."""
    buf = io.BytesIO()
    write_car(buf, roots, blocks)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------
# MST construction
# --------------------------------------------------------------------------------------------


def _common_prefix(a: bytes, b: bytes) -> int:
    """Return the length in bytes of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    x = int.from_bytes(a[:n], "big") ^ int.from_bytes(b[:n], "big")
    if not x:
        return n
    return n - 1 - ((x.bit_length() - 1) >> 3)


def _encode_compressed(left: bytes | None, entries: list[list[Any]]) -> bytes:
    """Encode a node from full-key entries ``[key, v, t]``, compressing keys maximally."""
    prev = b""
    items = []
    for key, v, t in entries:
        p = _common_prefix(prev, key)
        items.append((p, key[p:], v, t))
        prev = key
    return encode_node(left, items)


def _build(
    pairs: Iterable[tuple[bytes, bytes]], layer_of: Callable[[bytes], int]
) -> tuple[bytes, dict[bytes, bytes], list[tuple[int, bytes]], int]:
    """Build the canonical MST in one pass over strictly increasing ``(key, cid)`` pairs.

    One open node is kept per layer. A key of layer L first closes the open nodes of layers
    0..L-1 (each closed node, if it has entries or a left subtree, is encoded and hung on the
    node one layer up: as ``t`` of its last entry, or as ``l`` if it has no entry yet), then
    becomes the last entry of the open layer-L node. At the end all layers below the top are
    closed the same way and the top node is the root.

    Returns ``(root_cid, nodes, starts, count)``: ``nodes`` maps node CIDs to blocks, ``starts``
    lists ``(index of the smallest key in the node's subtree, cid)`` for every node in the order
    nodes were closed (children before parents; the root last, with start 0 even when empty),
    and ``count`` is the number of pairs.
    """
    nodes: dict[bytes, bytes] = {}
    starts: list[tuple[int, bytes]] = []
    lefts: list[bytes | None] = []
    entries: list[list[list[Any]]] = []
    first: list[int | None] = []  # index of the smallest key under each open node

    def close(layer: int) -> None:
        ents = entries[layer]
        left = lefts[layer]
        if not ents and left is None:
            return
        block = _encode_compressed(left, ents)
        cid = dag_cbor_cid(block)
        nodes[cid] = block
        start = first[layer]
        starts.append((start, cid))  # type: ignore[arg-type]
        up = layer + 1
        if entries[up]:
            entries[up][-1][2] = cid
        else:
            lefts[up] = cid
        if first[up] is None:
            first[up] = start
        entries[layer] = []
        lefts[layer] = None
        first[layer] = None

    prev: bytes | None = None
    i = -1
    for i, (key, cid) in enumerate(pairs):
        if prev is not None and key <= prev:
            if key == prev:
                raise KeyOrderError(f"duplicate key {key.decode('utf-8', 'replace')!r}")
            raise KeyOrderError(
                f"keys not strictly increasing: {key.decode('utf-8', 'replace')!r} "
                f"after {prev.decode('utf-8', 'replace')!r}"
            )
        prev = key
        layer = layer_of(key)
        if layer < 0:
            raise ValueError(f"layer of key {key!r} is negative ({layer})")
        while len(entries) <= layer:
            lefts.append(None)
            entries.append([])
            first.append(None)
        for below in range(layer):
            close(below)
        entries[layer].append([key, cid, None])
        if first[layer] is None:
            first[layer] = i
    count = i + 1
    if not entries:  # the empty repo: one node with no entries and no left subtree
        block = encode_node(None, [])
        root = dag_cbor_cid(block)
        nodes[root] = block
        starts.append((0, root))
        return root, nodes, starts, 0
    top = len(entries) - 1
    for below in range(top):
        close(below)
    block = _encode_compressed(lefts[top], entries[top])
    root = dag_cbor_cid(block)
    nodes[root] = block
    starts.append((0, root))
    return root, nodes, starts, count


def build_mst(
    sorted_pairs: Iterable[tuple[bytes, bytes]], *, layer_of: Callable[[bytes], int] = key_layer
) -> tuple[bytes, dict[bytes, bytes]]:
    """Build the canonical Merkle Search Tree over ``(key, record CID)`` pairs, in memory.

    The tree is the unique one the spec defines: the root holds the keys of the highest layer
    present; the keys of lower layers between two consecutive layer-L keys (or before the first,
    after the last) form a subtree node of layer L-1 hung from ``t`` of the entry to their left
    (or from ``l``), which exists with no entries and only ``l`` if it holds no layer-(L-1) key;
    empty ranges are null links. Keys are prefix-compressed maximally against the previous key
    in the same node. No pairs give the single empty node ``{"e": [], "l": null}``.

    Key syntax is not checked, so this can build trees over invalid keys for hostile tests.

    Args:
        sorted_pairs: ``(key, cid)``: full UTF-8 key bytes in strictly increasing bytewise order,
            and the raw CID of the key's record.
        layer_of: the layer function, :func:`repo_stream.core.mst.key_layer` by default (leading zero
            bits of sha256(key) // 2). Pass another to build trees with wrong layers.

    Returns:
        ``(root_cid, nodes)``: the raw CID of the root node, and every node block by raw CID.

    Raises:
        KeyOrderError: two keys are equal ("duplicate key ...") or out of order.
        ValueError: ``layer_of`` returned a negative layer.

    Spec: atproto repository, "Merkle Search Tree".
    """
    root, nodes, _, _ = _build(sorted_pairs, layer_of)
    return root, nodes


# --------------------------------------------------------------------------------------------
# Whole repos
# --------------------------------------------------------------------------------------------


def build_repo_car(
    records: Iterable[tuple[str, bytes]],
    *,
    did: str,
    rev: str,
    path: Any,
    order: str = "preorder",
    seed: Any = 0,
    sign: Callable[[bytes], bytes] | None = None,
) -> Commit:
    """Write a complete repo CAR for ``records``: commit, canonical MST and record blocks.

    Records are streamed: each record block is hashed and appended to an anonymous temporary
    spool file as it arrives (a block already seen, by CID, is not stored again), and only the
    keys, CIDs and MST node blocks stay in memory. The spool is removed before returning, also
    on error. The output is opened only once all records are read and the tree is built, so a
    bad key leaves no output file behind.

    Args:
        records: ``(key, record_block)`` pairs in any order: ``key`` a repo path
            ``"<collection>/<rkey>"``, ``record_block`` the record's DAG-CBOR bytes (bytes-like;
            not decoded or checked). The same block may serve several keys.
        did: the commit's ``did`` (not checked).
        rev: the commit's ``rev`` (not checked).
        path: where to write: a filesystem path (``str`` / ``PathLike``, created or truncated)
            or a binary file object with ``.write`` (left open).
        order: the order of the blocks after the CAR header, each block written once:
            ``"preorder"``: the commit, then depth-first pre-order (see the module docstring:
            node, its ``l`` subtree, then per entry its record and its ``t`` subtree);
            ``"shuffled"``: the preorder blocks permuted by ``random.Random(seed).shuffle``;
            ``"reverse"``: the preorder blocks reversed (the commit last).
        seed: the seed for ``"shuffled"`` (anything :class:`random.Random` accepts).
        sign: optional callable given the unsigned commit bytes
            (:func:`encode_unsigned_commit`) and returning the signature bytes; without it
            ``sig`` is ``b""``.

    Returns:
        The :class:`~repo_stream.core.commit.Commit` written (version 3, ``prev`` None); its CID is
        the CAR's only root.

    Raises:
        InvalidKeyError: a key is not a ``str`` or not a valid repo path (the key is named).
        KeyOrderError: a key occurs twice ("duplicate key ...").
        ValueError: ``order`` is not one of :data:`ORDERS`, or a record block is 4 GiB or more.
        TypeError: a record block is not bytes-like, or ``sign`` returned something else.
        OSError: writing the spool or the output failed.

    Spec: atproto repository, "Repository Structure", "Commit Objects", "CAR File
    Serialization".
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    with tempfile.TemporaryFile(prefix="repo-stream-spool-") as spool:
        where, pairs = _spool_records(records, spool)
        # The tree and the commit.
        pairs.sort()
        root, nodes, starts, count = _build(pairs, key_layer)
        record_cids = [cid for _, cid in pairs]
        del pairs
        sig, commit_block = _commit_block(did, root, rev, sign)
        commit_cid = dag_cbor_cid(commit_block)
        sequence = _block_order(commit_cid, nodes, starts, record_cids, count, where)
        del starts, record_cids
        if order == "shuffled":
            random.Random(seed).shuffle(sequence)
        elif order == "reverse":
            sequence.reverse()
        write_car(path, [commit_cid], _blocks(sequence, commit_cid, commit_block, nodes, where, spool))

    return Commit(did=did, version=3, data=to_cid(root), rev=rev, prev=None, sig=sig, block=commit_block)


def _spool_records(records: Iterable[tuple[str, bytes]], spool: BinaryIO) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """Check each record's key and block, append each distinct block (by CID) to ``spool``.

    Returns:
        ``where``: record CID -> ``offset << 32 | length`` of its block in the spool; and the
        ``(UTF-8 key, record CID)`` pairs in the order given.

    Raises:
        InvalidKeyError, TypeError, ValueError: as :func:`build_repo_car`.
    """
    where: dict[bytes, int] = {}
    pairs: list[tuple[bytes, bytes]] = []
    offset = 0
    swrite = spool.write
    for key, block in records:
        if type(key) is not str:
            raise InvalidKeyError(f"invalid repo key {key!r}: keys must be str, not {type(key).__name__}")
        if not is_valid_key(key):
            raise InvalidKeyError(f"invalid repo key {key!r}: not <collection NSID>/<record key> of <= 1024 bytes")
        if type(block) is not bytes:
            if not isinstance(block, (bytearray, memoryview)):
                raise TypeError(f"record block for {key!r} must be bytes, got {type(block).__name__}")
            block = bytes(block)
        cid = dag_cbor_cid(block)
        if cid not in where:
            size = len(block)
            if size >= 1 << 32:
                raise ValueError(f"record block for {key!r} is {size} bytes; at most 4 GiB - 1 is supported")
            where[cid] = offset << 32 | size
            swrite(block)
            offset += size
        pairs.append((key.encode("utf-8"), cid))
    spool.flush()
    return where, pairs


def _commit_block(did: str, root: bytes, rev: str, sign: Callable[[bytes], bytes] | None) -> tuple[bytes, bytes]:
    """The commit's signature (``sign`` of the unsigned commit, or ``b""``) and its block.

    Raises:
        TypeError: ``sign`` returned something other than bytes.
    """
    unsigned = encode_unsigned_commit(did, root, rev)
    sig = b""
    if sign is not None:
        sig = sign(unsigned)
        if not isinstance(sig, (bytes, bytearray, memoryview)):
            raise TypeError(f"sign() must return bytes, got {type(sig).__name__}")
        sig = bytes(sig)
    return sig, encode_commit(did, root, rev, None, sig)


def _block_order(
    commit_cid: bytes,
    nodes: dict[bytes, bytes],
    starts: list[tuple[int, bytes]],
    record_cids: list[bytes],
    count: int,
    where: dict[bytes, int],
) -> list[bytes]:
    """The CIDs of the CAR's blocks in pre-order: the commit, then each node right before the
    first block of its subtree, i.e. before the record of its smallest key (``starts``: ``(index
    of that key, node CID)`` as the nodes were closed, child first; nodes sharing a key come
    parent first). Node CIDs are distinct by construction; a record is placed at its first key
    only (its ``where`` value is bitwise-inverted to mark it placed), and never if it is
    byte-identical to a node or the commit. ``starts`` is reordered in place."""
    starts.reverse()
    starts.sort(key=lambda s: s[0])  # stable: keeps parent-before-child within one start
    sequence: list[bytes] = [commit_cid]
    append = sequence.append
    j = 0
    nstarts = len(starts)
    for i in range(count):
        while j < nstarts and starts[j][0] == i:
            append(starts[j][1])
            j += 1
        cid = record_cids[i]
        packed = where[cid]
        if packed >= 0:
            where[cid] = ~packed
            if cid not in nodes and cid != commit_cid:
                append(cid)
    while j < nstarts:  # only the empty repo's root
        append(starts[j][1])
        j += 1
    return sequence


def _blocks(
    sequence: list[bytes], commit_cid: bytes, commit_block: bytes, nodes: dict[bytes, bytes], where: dict[bytes, int], spool: BinaryIO
) -> Iterator[tuple[bytes, bytes]]:
    """``(CID, block)`` for each CID of ``sequence``, record blocks read back from ``spool`` (at
    the places :func:`_block_order` marked in ``where``).

    Raises:
        OSError: the spool reads short.
    """
    fd = spool.fileno()

    def read_spool(off: int, length: int) -> bytes:
        if hasattr(os, "pread"):
            data = os.pread(fd, length, off)
        else:  # pragma: no cover - platforms without pread
            spool.seek(off)
            data = spool.read(length)
        if len(data) != length:
            raise OSError(f"spool file short read at offset {off}: {len(data)} of {length} bytes")
        return data

    for cid in sequence:
        if cid == commit_cid:
            yield cid, commit_block
        elif cid in nodes:
            yield cid, nodes[cid]
        else:
            packed = ~where[cid]
            yield cid, read_spool(packed >> 32, packed & 0xFFFFFFFF)
