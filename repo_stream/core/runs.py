"""Sorted runs: the spill store's format for blocks, their merge, and the index a walk searches.

This is the pure-Python reference; ``repo_stream._native`` has the same three pieces in C
(``pack_run``, ``RunMerge``, ``RunIndex``), byte for byte the same format.

A **run** is a sequence of entries sorted by CID (as bytes compare: byte by byte, a shorter CID
before a longer one that it starts), each CID at most once. An entry is::

    u8  cid_len      1..255
    u8  kind         0 raw block, 1 codec-encoded value, 2 int (int64), 3 float, 4 str, 5 bytes,
                     6 None; plus 0x80 if the payload is in the store's ``large`` table
    u32 payload_len  little-endian
    cid_len bytes    the CID
    payload          raw or encoded bytes; int: 8 bytes little-endian two's complement; float:
                     8 bytes IEEE 754 little-endian; str: UTF-8; None: nothing; with 0x80: the
                     ``large`` row's id, 8 bytes little-endian

Kinds 2 to 6 are the spill rows' :data:`~repo_stream.core.blocks.ROW_PLAIN` values. A payload longer
than :data:`LARGE_PAYLOAD` bytes is stored apart, in its own SQLite row, so that an entry (and
what a merge holds of each run) stays small whatever the blocks.

Loading writes one run per batch of spill rows (:func:`pack_run`); before the first look-up the
runs are merged into one (:class:`RunMerge`), in bounded memory, keeping the first-loaded entry of
a CID that is in several runs; the merge records an index point (the offset and CID of an entry)
about every ``index_every`` bytes (:class:`RunIndex`), so a look-up reads one short range of the
merged run and scans it.
"""

from __future__ import annotations

import heapq
import struct
from bisect import bisect_right
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

from . import messages

__all__ = ["HEAD", "LARGE", "LARGE_PAYLOAD", "RunIndex", "RunMerge", "pack_run"]

#: Payloads longer than this many bytes go to the store's ``large`` table.
LARGE_PAYLOAD = 8192
#: The kind bit of an entry whose payload is a ``large`` row id.
LARGE = 0x80
#: Bytes of an entry's head (cid_len, kind, payload_len).
HEAD = 6
_KIND_RAW, _KIND_ENCODED, _KIND_INT, _KIND_FLOAT, _KIND_STR, _KIND_BYTES, _KIND_NONE = range(7)
_head = struct.Struct("<BBI")
_i64 = struct.Struct("<q")
_f64 = struct.Struct("<d")
_u64 = struct.Struct("<Q")
_INT64 = 1 << 63


def _payload(cid: bytes, kind: int, data: Any) -> tuple[int, bytes]:
    """The entry kind and payload of one spill row.

    Raises:
        TypeError, ValueError: the row is not a spill row that can be stored.
    """
    if kind == 0 or kind == 1:
        if type(data) is not bytes:
            raise TypeError(f"block {cid.hex()}: a row of kind {kind} holds bytes, not {type(data).__name__}")
        return kind, data
    if kind != 2:
        raise ValueError(f"block {cid.hex()}: row kind {kind!r} is not 0, 1 or 2")
    t = type(data)
    if t is int:
        if not -_INT64 <= data < _INT64:
            raise ValueError(f"block {cid.hex()}: the int {data} does not fit in 64 bits")
        return _KIND_INT, _i64.pack(data)
    if t is float:
        return _KIND_FLOAT, _f64.pack(data)
    if t is str:
        return _KIND_STR, data.encode()
    if t is bytes:
        return _KIND_BYTES, data
    if data is None:
        return _KIND_NONE, b""
    raise TypeError(f"block {cid.hex()}: a value of type {t.__name__} cannot be stored as it is")


def pack_run(rows: Sequence[tuple[bytes, int, Any]], next_large: int) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Pack spill rows ``(cid, kind, data)`` into one run.

    A CID repeated in ``rows`` keeps its first row. Payloads over :data:`LARGE_PAYLOAD` bytes are
    numbered from ``next_large`` (in CID order) and returned apart, for the store's ``large`` table.

    Returns:
        ``(run, large)``: the run's bytes and the ``(id, payload)`` pairs stored apart.

    Raises:
        TypeError, ValueError: a row is not a spill row (kind 0/1 with bytes, kind 2 with an int in
            64 bits, a float, a str that encodes to UTF-8, bytes or None), or its CID is empty or
            longer than 255 bytes.
    """
    for row in rows:
        if type(row) is not tuple or len(row) != 3 or type(row[0]) is not bytes:
            raise TypeError("a spill row is a tuple (cid: bytes, kind: int, data)")
        if not 0 < len(row[0]) <= 255:
            raise ValueError(f"a CID of {len(row[0])} bytes cannot be stored (1 to 255)")
    entries = [(cid, *_payload(cid, kind, data)) for cid, kind, data in rows]
    entries.sort(key=itemgetter(0))  # stable: a repeated CID keeps its first row
    out = bytearray()
    large: list[tuple[int, bytes]] = []
    last = None
    for cid, kind, payload in entries:
        if cid == last:
            continue
        last = cid
        if len(payload) > LARGE_PAYLOAD:
            large.append((next_large, payload))
            kind |= LARGE
            payload = _u64.pack(next_large)
            next_large += 1
        out += _head.pack(len(cid), kind, len(payload))
        out += cid
        out += payload
    return bytes(out), large


def _entry_end(buf: bytes | bytearray, pos: int, where: str) -> int:
    """The end of the entry at ``buf[pos]``, or -1 if ``buf`` does not hold all of it yet.

    Raises:
        DiskError: the head is not a valid entry head.
    """
    if len(buf) - pos < HEAD:
        return -1
    cid_len, kind, size = _head.unpack_from(buf, pos)
    base = kind & ~LARGE
    if cid_len == 0 or base > _KIND_NONE or size > LARGE_PAYLOAD or (kind & LARGE and size != 8):
        raise messages.store_corrupt(where, pos)
    end = pos + HEAD + cid_len + size
    return end if end <= len(buf) else -1


class _Input:
    __slots__ = ("buf", "pos", "ended")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.pos = 0
        self.ended = False


class _Output:
    """One output of a merge: its pending bytes and its index points."""

    __slots__ = ("buf", "written", "every", "next_point", "points", "offsets")

    def __init__(self, every: int) -> None:
        self.buf = bytearray()
        self.written = 0
        self.every = every
        self.next_point = 0
        self.points: list[bytes] = []
        self.offsets: list[int] = []

    def add(self, cid: bytes, entry: bytes | bytearray) -> None:
        offset = self.written + len(self.buf)
        if self.every and (not self.offsets or offset >= self.next_point):
            self.offsets.append(offset)
            self.points.append(cid)
            self.next_point = offset + self.every
        self.buf += entry

    def take(self) -> bytes:
        data = bytes(self.buf)
        self.written += len(data)
        self.buf.clear()
        return data


def is_node_entry(entry: bytes | bytearray) -> bool:
    """Whether a run entry is a raw block that starts like an MST node (``{e: [...``)."""
    payload = entry[HEAD + entry[0] :]
    return entry[1] == _KIND_RAW and len(payload) > 3 and payload[:3] == b"\xa2ae" and payload[3] & 0xE0 == 0x80


class RunMerge:
    """Merges ``n`` runs into one, fed a piece at a time (sans-IO, in bounded memory).

    Usage::

        merge = RunMerge(n, index_every)
        while (out := merge.step(out_max)) is not None:
            if isinstance(out, int):
                merge.feed(out, next piece of run `out`, b"" at its end)
            else:
                write(out)
        index = merge.index()

    Runs are given in load order: an entry whose CID is in several runs is kept from the lowest
    numbered. Each run holds at most what was fed and not yet merged: a piece and one entry.

    With ``split``, the merged entries go to two runs: 0, the raw blocks shaped like MST nodes
    (:func:`is_node_entry`), and 1, every other entry; :meth:`step` then gives ``(output, bytes)``
    and :meth:`index` a pair of indexes. A CID is in one of them only.

    Args:
        n: the number of runs.
        index_every: record an index point about every this many output bytes (0: none).
        split: merge into two runs, MST nodes and the rest.
    """

    def __init__(self, n: int, index_every: int = 0, split: bool = False) -> None:
        if n < 0 or index_every < 0:
            raise ValueError("RunMerge needs n >= 0 and index_every >= 0")
        self._in = [_Input() for _ in range(n)]
        self._pending = list(range(n - 1, -1, -1))  # runs whose next entry is not in memory yet
        self._heap: list[tuple[bytes, int]] = []
        self._outs = [_Output(index_every) for _ in range(2 if split else 1)]
        self._split = split
        self._last: bytes | None = None
        self._every = index_every

    def feed(self, i: int, data: bytes) -> None:
        """Append ``data`` to run ``i`` (``b""``: run ``i`` has no more).

        Raises:
            IndexError: there is no run ``i``. ValueError: run ``i`` has ended already.
        """
        run = self._in[i]
        if run.ended:
            raise ValueError(f"run {i} has ended")
        if not data:
            run.ended = True
            return
        if run.pos:
            del run.buf[: run.pos]
            run.pos = 0
        run.buf += data

    def _head_cid(self, i: int) -> bytes | None:
        """Run ``i``'s next CID if its whole entry is in memory; ``None`` if more must be fed."""
        run = self._in[i]
        if _entry_end(run.buf, run.pos, f"run {i}") < 0:
            if run.ended and len(run.buf) > run.pos:
                raise messages.store_corrupt(f"run {i}", run.pos)
            return None
        cid_len = run.buf[run.pos]
        return bytes(run.buf[run.pos + HEAD : run.pos + HEAD + cid_len])

    def _ready(self, out_max: int) -> bytes | tuple[int, bytes] | None:
        for number, out in enumerate(self._outs):
            if len(out.buf) >= out_max:
                return (number, out.take()) if self._split else out.take()
        return None

    def step(self, out_max: int) -> bytes | tuple[int, bytes] | int | None:
        """Merge until ``out_max`` bytes of an output are ready or a run must be fed.

        Returns:
            The next output bytes (``(output, bytes)`` with ``split``); or the number of the run
            to :meth:`feed` next; or ``None`` once every run has ended and all the output was
            returned.

        Raises:
            DiskError: a run holds something that is not an entry.
        """
        out_max = max(out_max, 1)
        pending = self._pending
        heap = self._heap
        while pending:
            i = pending[-1]
            cid = self._head_cid(i)
            if cid is not None:
                heapq.heappush(heap, (cid, i))
            elif not self._in[i].ended:
                return i
            pending.pop()
        while heap:
            ready = self._ready(out_max)
            if ready is not None:
                return ready
            cid, i = heapq.heappop(heap)
            run = self._in[i]
            end = _entry_end(run.buf, run.pos, f"run {i}")
            if cid != self._last:
                self._last = cid
                entry = run.buf[run.pos : end]
                self._outs[0 if not self._split or is_node_entry(entry) else 1].add(cid, entry)
            run.pos = end
            nxt = self._head_cid(i)
            if nxt is not None:
                heapq.heappush(heap, (nxt, i))
            elif not run.ended:
                pending.append(i)
                return i
        return self._ready(1)

    def index(self) -> RunIndex | tuple[RunIndex, RunIndex]:
        """The index of the merged run (a pair with ``split``), once :meth:`step` has returned ``None``.

        Raises:
            ValueError: the merge is not over, or was made with ``index_every=0``.
        """
        if self._pending or self._heap or any(out.buf for out in self._outs) or (not self._every and self._in):
            raise ValueError("the merge is not over, or keeps no index")
        indexes = [RunIndex(out.points, out.offsets, out.written) for out in self._outs]
        return (indexes[0], indexes[1]) if self._split else indexes[0]


class RunIndex:
    """Finds entries in a merged run, by its index points (made by :class:`RunMerge`).

    The run itself is read through :meth:`attach`: a list of segments (bytes, or SQLite ``Blob``
    handles: anything sliced into bytes), each ``segment_size`` bytes but the last.
    """

    def __init__(self, points: list[bytes], offsets: list[int], total: int) -> None:
        self._points = points
        self._offsets = offsets
        #: The merged run's length, bytes.
        self.total = total
        self._segments: list[Any] = []
        self._segment_size = 1

    def __len__(self) -> int:
        """The number of index points."""
        return len(self._points)

    def attach(self, segments: list[Any], segment_size: int) -> None:
        """Read the run from ``segments`` (each ``segment_size`` bytes but the last) from now on."""
        if segment_size < 1:
            raise ValueError("segment_size must be at least 1")
        self._segments = list(segments)
        self._segment_size = segment_size

    def _read(self, start: int, end: int) -> bytes:
        size = self._segment_size
        segments = self._segments
        parts = []
        pos = start
        while pos < end:
            seg, at = divmod(pos, size)
            if seg >= len(segments):
                break
            n = min(end - pos, size - at)
            parts.append(segments[seg][at : at + n])
            pos += n
        data = b"".join(parts)
        if len(data) != end - start:
            raise messages.store_corrupt("the merged run", start)
        return data

    def _find(self, cid: bytes) -> tuple[int, Any] | None:
        i = bisect_right(self._points, cid) - 1
        if i < 0:
            return None
        start = self._offsets[i]
        end = self._offsets[i + 1] if i + 1 < len(self._offsets) else self.total
        data = self._read(start, end)
        pos = 0
        while pos < len(data):
            stop = _entry_end(data, pos, "the merged run")
            if stop < 0:
                raise messages.store_corrupt("the merged run", start + pos)
            cid_len, kind, _size = _head.unpack_from(data, pos)
            here = data[pos + HEAD : pos + HEAD + cid_len]
            if here == cid:
                return _value(kind, data[pos + HEAD + cid_len : stop], start + pos)
            if here > cid:
                return None
            pos = stop
        return None

    def get(self, cid: bytes) -> tuple[int, Any] | None:
        """``(kind, data)`` of ``cid``'s entry, or ``None``: kind 0 (raw bytes), 1 (encoded bytes),
        2 (a plain value), or ``0x80 | entry kind`` with data the ``large`` row's id.

        Raises:
            DiskError: the run does not read back as entries.
        """
        return self._find(cid)

    def get_many(self, cids: list[bytes]) -> tuple[list[tuple[int, Any] | None], int, int]:
        """:meth:`get` of each CID, in order; how many of them are ``large`` ids; how many plain values (kind 2)."""
        out = [self._find(cid) for cid in cids]
        kinds = [row[0] for row in out if row is not None]
        return out, sum(1 for kind in kinds if kind & LARGE), kinds.count(2)


def _value(kind: int, payload: bytes, offset: int) -> tuple[int, Any]:
    if kind & LARGE:
        return kind, _u64.unpack(payload)[0]
    if kind <= _KIND_ENCODED:
        return kind, payload
    if kind == _KIND_INT and len(payload) == 8:
        return 2, _i64.unpack(payload)[0]
    if kind == _KIND_FLOAT and len(payload) == 8:
        return 2, _f64.unpack(payload)[0]
    if kind == _KIND_STR:
        try:
            return 2, payload.decode()
        except UnicodeDecodeError:
            raise messages.store_corrupt("the merged run", offset) from None
    if kind == _KIND_BYTES:
        return 2, payload
    if kind == _KIND_NONE and not payload:
        return 2, None
    raise messages.store_corrupt("the merged run", offset)


def large_value(kind: int, data: bytes) -> tuple[int, Any]:
    """``(kind, data)`` of a ``large`` row's ``data`` for an entry of ``kind`` (with :data:`LARGE`).

    Raises:
        DiskError: the data does not decode as that kind.
    """
    base = kind & ~LARGE
    if base <= _KIND_ENCODED:
        return base, data
    if base == _KIND_STR:
        try:
            return 2, data.decode()
        except UnicodeDecodeError:
            raise messages.store_corrupt("a large row", 0) from None
    if base == _KIND_BYTES:
        return 2, data
    raise messages.store_corrupt("a large row", 0)
