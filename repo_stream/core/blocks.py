"""The block store: the in-memory block table, its memory accounting, the spill row format, and
the look-up protocol between the walker and the store.

The walker (:mod:`repo_stream.core.walk`, or the C core's) needs only MST nodes, through
:class:`NodeLookup`, and emits ``(key, record CID)`` pairs. Turning a record CID into the value
the user gets (the processed value, the raw bytes, a processor error, a missing block) is the
store's job, through :class:`RecordValues`: :class:`MemoryBlocks` here (the pure-Python
reference), ``_native.BlockTable`` in the C core, and :class:`DiskRecords` over the SQLite store.

**Block processor.** A block that cannot be an MST node (it does not start like the DAG-CBOR map
``{e: [...], l: ...}``) is processed as it is loaded, and only the processed value is kept. A
block that could be a node (and the commit) is kept raw and processed only if the walk emits it
as a record. An exception from the processor is kept back (the raw block is kept instead) and
raised as :class:`~repo_stream.errors.ProcessorError` only if that block is emitted as a record.

**Memory accounting** (the reference): a kept block counts its raw length, or its processed
value's size (:func:`value_size`: 8 for a number or None, ``len`` for bytes/str, and for a
container, such as a decoded record, what it costs as Python objects: ~4-5x its block), plus
:data:`BLOCK_OVERHEAD` bytes. The C core counts the real bytes of its table, and the same
container sizes.
A processed value that is not plain is encoded with the codec only when it is spilled (once);
a codec failure is a :class:`~repo_stream.errors.DiskError`.

**Spill rows** are ``(cid, kind, data)``: :data:`ROW_RAW` (raw block bytes), :data:`ROW_ENCODED`
(a processed value encoded by the codec), :data:`ROW_PLAIN` (a processed value SQLite holds as it
is: int in 64 bits, float, str, bytes, None).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, Protocol

from . import messages
from .cid import cid_text
from .runs import pack_run

__all__ = [
    "BLOCK_OVERHEAD",
    "NOT_A_NODE",
    "ROW_ENCODED",
    "ROW_PLAIN",
    "ROW_RAW",
    "DiskRecords",
    "MemoryBlocks",
    "NodeLookup",
    "RecordValues",
    "is_node_shaped",
    "plain_row",
    "resolve",
    "value_size",
]

#: Bytes counted per kept block on top of its data: the dict slot, the CID key and object headers.
BLOCK_OVERHEAD = 160
#: Returned by :meth:`NodeLookup.node` for a block that is present but was processed at load
#: time because it cannot be an MST node.
NOT_A_NODE: Any = type("NotANode", (), {"__repr__": lambda self: "NOT_A_NODE", "__slots__": ()})()
ROW_RAW = 0
ROW_ENCODED = 1
ROW_PLAIN = 2
_INT64 = 1 << 63  # SQLite integers are signed 64-bit
# Every MST node starts with map(2), text(1) "e", then an array header (major type 4).
_NODE_START = b"\xa2ae"
_MISSING: Any = object()
_getsizeof = sys.getsizeof


def value_size(value: Any) -> int:
    """The bytes a processed value is counted for against the memory limit.

    8 for a number or None, the length of bytes or str; for anything else, what it costs as
    Python objects: ``sys.getsizeof`` of every object it holds, through dicts (keys and values),
    lists and tuples (a decoded record is ~4-5x its block; counting the block's length, as before,
    let ``dump --mem-limit-mb 64`` reach ~300 MB). Iterative: a deep value does not recurse. An
    object of another type counts its own ``getsizeof`` only.
    """
    t = type(value)
    if t is int or t is bool or t is float or value is None:
        return 8
    if t is bytes or t is str:
        return len(value)
    total = 0
    stack = [value]
    pop = stack.pop
    push = stack.extend
    while stack:
        v = pop()
        total += _getsizeof(v)
        t = type(v)
        if t is dict:
            push(v)
            push(v.values())
        elif t is list or t is tuple:
            push(v)
    return total


def is_node_shaped(block: bytes) -> bool:
    """Whether ``block`` starts like an MST node (``{e: [...`` in DAG-CBOR), so it is kept raw."""
    return block.startswith(_NODE_START) and len(block) > 3 and block[3] & 0xE0 == 0x80


def plain_row(value: Any) -> bool:
    """Whether a processed value goes to SQLite as it is (:data:`ROW_PLAIN`), not encoded."""
    t = type(value)
    return (t is int and -_INT64 <= value < _INT64) or t is float or value is None or t is bytes or t is str


class NodeLookup(Protocol):
    """What the walker asks the store. A store may also have ``prefetch(cids: list[bytes])``,
    which the walker calls with the subtree CIDs of each node it expands."""

    def node(self, cid: bytes) -> Any:
        """The raw bytes of a block kept raw; ``None`` if absent; :data:`NOT_A_NODE` if processed."""


class RecordValues(Protocol):
    """Turns the walker's ``(key, record CID)`` pairs into the items the user gets."""

    def values(self, pairs: list[tuple[str, bytes]], record_cids: bool, record_type: type | None = None) -> list[tuple[Any, ...]]:
        """``(key, value)`` per pair, or ``(key, cid_text, value)`` with ``record_cids``; with a
        ``record_type``, ``record_type(key, collection, rkey, cid_text or None, value)`` (see
        :func:`make_item`).

        Raises:
            MissingBlockError: a record block is absent. ProcessorError: the processor failed.
        """


class MemoryBlocks:
    """The in-memory block table of the pure-Python reference.

    Args:
        root: raw CID of the commit (the CAR's first root), always kept raw.
        process: the block processor, or ``None`` to keep and emit raw bytes.
        encode: the codec's encoder, for spill rows of processed values that are not plain.
    """

    __slots__ = ("root", "process", "encode", "raw", "processed", "used")

    def __init__(self, root: bytes, process: Callable[[bytes], Any] | None, encode: Callable[[Any], bytes]) -> None:
        self.root = root
        self.process = process
        self.encode = encode
        self.raw: dict[bytes, bytes] = {}
        self.processed: dict[bytes, Any] = {}
        #: Bytes counted so far (see the module docstring).
        self.used = 0

    def __len__(self) -> int:
        return len(self.raw) + len(self.processed)

    def add(self, cid: bytes, block: bytes) -> None:
        """Keep ``block`` (processed if it cannot be a node); a repeated CID keeps its first block."""
        raw = self.raw
        processed = self.processed
        if cid in raw or cid in processed:
            return
        process = self.process
        if process is None or is_node_shaped(block) or cid == self.root:
            raw[cid] = block
            self.used += len(block) + BLOCK_OVERHEAD
            return
        try:
            value = process(block)
        except Exception:
            raw[cid] = block  # processed again, and the error raised, only if emitted
            self.used += len(block) + BLOCK_OVERHEAD
            return
        processed[cid] = value
        self.used += value_size(value) + BLOCK_OVERHEAD

    def raw_block(self, cid: bytes) -> bytes | None:
        """The raw bytes kept for ``cid`` (the commit's, say), else ``None``."""
        return self.raw.get(cid)

    def take_rows(self, max_bytes: int) -> tuple[list[tuple[bytes, int, Any]], int]:
        """Remove and return up to about ``max_bytes`` of blocks as spill rows, with their byte count.

        Returns an empty list once the table is empty; ``used`` is 0 then.
        """
        raw = self.raw
        processed = self.processed
        rows: list[tuple[bytes, int, Any]] = []
        size = 0
        while raw and size < max_bytes:
            cid, block = raw.popitem()
            rows.append((cid, ROW_RAW, block))
            size += len(cid) + len(block)
        while processed and size < max_bytes:
            cid, value = processed.popitem()
            if plain_row(value):
                rows.append((cid, ROW_PLAIN, value))
                size += len(cid) + (len(value) if type(value) in (bytes, str) else 8)
            else:
                try:
                    data = self.encode(value)
                except Exception as exc:
                    raise messages.codec_failed(cid, exc) from exc
                rows.append((cid, ROW_ENCODED, data))
                size += len(cid) + len(data)
        if not raw and not processed:
            self.used = 0
        return rows, size

    def take_run(self, max_bytes: int, next_large: int) -> tuple[bytes, list[tuple[int, bytes]], int]:
        """:meth:`take_rows`, packed into one sorted run (:func:`repo_stream.core.runs.pack_run`).

        Returns:
            ``(run, large, size)``: the run, its payloads stored apart (numbered from
            ``next_large``), and the rows' byte count; an empty run once the table is empty.

        Raises:
            DiskError: the codec failed. ValueError: a processed str is not valid UTF-8.
        """
        rows, size = self.take_rows(max_bytes)
        run, large = pack_run(rows, next_large)
        return run, large, size

    def clear(self) -> None:
        """Drop every block."""
        self.raw.clear()
        self.processed.clear()
        self.used = 0

    # --- NodeLookup ---------------------------------------------------------------------------

    def node(self, cid: bytes) -> Any:
        block = self.raw.get(cid)
        if block is None and cid in self.processed:
            return NOT_A_NODE
        return block

    # --- RecordValues -------------------------------------------------------------------------

    def values(self, pairs: list[tuple[str, bytes]], record_cids: bool, record_type: type | None = None) -> list[tuple[Any, ...]]:
        return resolve(pairs, self.processed.get, self.raw.get, self.process, record_cids, record_type)


class DiskRecords:
    """:class:`NodeLookup` and :class:`RecordValues` over a SQLite store's look-up (runs in its thread).

    Args:
        lookup: the store's look-up (``DiskStore.lookup``): ``node`` and ``fetch_many`` (one
            call per chunk of records, not one per record), which gives ``(rows, all_plain)``.
        process: the block processor, or ``None``.
        decode: the codec's decoder, for values stored encoded.
    """

    __slots__ = ("_lookup", "_process", "_decode", "node")

    def __init__(self, lookup: Any, process: Callable[[bytes], Any] | None, decode: Callable[[bytes], Any]) -> None:
        self._lookup = lookup
        self._process = process
        self._decode = decode
        self.node = lookup.node

    def values(self, pairs: list[tuple[str, bytes]], record_cids: bool, record_type: type | None = None) -> list[tuple[Any, ...]]:
        rows, all_plain = self._lookup.fetch_many([cid for _key, cid in pairs])
        if all_plain and not record_cids and record_type is None:  # the usual case with a processor such as len
            return [(key, row[1]) for (key, _cid), row in zip(pairs, rows, strict=True)]
        process = self._process
        decode = self._decode
        out: list[tuple[Any, ...]] = []
        append = out.append
        for (key, cid), row in zip(pairs, rows, strict=True):
            if row is None:
                raise messages.missing_record(cid, key)
            kind, value = row
            if kind == ROW_ENCODED:
                try:
                    value = decode(value)
                except Exception as exc:
                    raise messages.stored_value_undecodable(cid, exc) from exc
            elif kind == ROW_RAW and process is not None:
                try:
                    value = process(value)
                except Exception as exc:
                    raise messages.processor_failed(key, cid, exc) from exc
            append(make_item(key, cid, value, record_cids, record_type))
        return out


def make_item(key: str, cid: bytes, value: Any, record_cids: bool, record_type: type | None) -> tuple[Any, ...]:
    """One walk item: ``(key, value)``; ``(key, cid_text, value)`` with ``record_cids``; or with a
    ``record_type`` (a tuple subclass of five fields, such as :class:`repo_stream.Record`)
    ``record_type(key, collection, rkey, cid_text or None, value)``, the key split at its first
    ``/``."""
    if record_type is not None:
        collection, _, rkey = key.partition("/")
        return tuple.__new__(record_type, (key, collection, rkey, cid_text(cid) if record_cids else None, value))
    return (key, cid_text(cid), value) if record_cids else (key, value)


def resolve(
    pairs: list[tuple[str, bytes]],
    get_processed: Callable[[bytes, Any], Any],
    get_raw: Callable[[bytes], bytes | None],
    process: Callable[[bytes], Any] | None,
    record_cids: bool,
    record_type: type | None = None,
) -> list[tuple[Any, ...]]:
    """Turn ``(key, record CID)`` pairs into items, in order: the processed value kept for the CID,
    else its raw block through ``process`` (or as it is), as ``(key, value)`` or, with
    ``record_cids``, ``(key, cid_text, value)``.

    Raises:
        MissingBlockError: a record block is absent. ProcessorError: ``process`` raised.
    """
    missing = _MISSING
    out: list[tuple[Any, ...]] = []
    append = out.append
    for key, cid in pairs:
        value = get_processed(cid, missing)
        if value is missing:
            value = get_raw(cid)
            if value is None:
                raise messages.missing_record(cid, key)
            if process is not None:
                try:
                    value = process(value)
                except Exception as exc:
                    raise messages.processor_failed(key, cid, exc) from exc
        append(make_item(key, cid, value, record_cids, record_type))
    return out
