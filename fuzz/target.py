"""The fuzz target: one input through the C core and through the pure-Python reference.

Driven synchronously through the sans-IO seam (no event loop), so a run costs microseconds. The
first byte of an input chooses the settings (verification, a processor, record CIDs, a memory
limit that makes the load stop and drain rows as spilling does, the size of each feed); the rest
is the CAR. The processor is ``len`` or, when bit 2 of the input's length is set, each
implementation's ``transcode_json`` (DAG-CBOR to JSON text). The rest is also handed to both
``transcode_json`` as one record block: the same text, or the same error and message. Both implementations must give the same records, or the same error class and message
(for ``NodeDecodeError``, the message up to the CID). Anything but a ``RepoStreamError`` is a bug.
"""

from __future__ import annotations

from typing import Any

import cbor2

from repo_stream.core import car, implementation, runs
from repo_stream.core.blocks import NOT_A_NODE, ROW_PLAIN, ROW_RAW, DiskRecords
from repo_stream.core.commit import decode_commit
from repo_stream.errors import MissingBlockError, NodeDecodeError, RepoStreamError
from repo_stream.records.json_text import transcode_json_reference

LIMITS = [1 << 40, 300, 3000, 30000]
COLLECTIONS = [None, None, frozenset({"app.bsky.feed.like"}), frozenset({"app.bsky.graph.follow", "com.example.thing"})]
FEEDS = [1, 7, 64, 1000, 4096, 65536, 1 << 20, 3]


class RunLookup:
    """The look-up a disk store gives the walker, over runs the implementation under test packed
    (``take_run``, as the drivers spill), merged (fed in pieces of 1 to 4096 bytes) and searches
    through its index, with the runs in memory instead of SQLite."""

    def __init__(self, impl: Any, packed: list[bytes], large: dict[int, bytes], piece: int) -> None:
        self.large = large
        merge = impl.RunMerge(len(packed), 64, True)
        at = [0] * len(packed)
        out: list[list[bytes]] = [[], []]
        while (got := merge.step(4096)) is not None:
            if type(got) is int:
                merge.feed(got, packed[got][at[got] : at[got] + piece])
                at[got] += piece
            else:
                out[got[0]].append(got[1])
        self.nodes, self.values = merge.index()
        for index, pieces in zip((self.nodes, self.values), out, strict=True):
            merged = b"".join(pieces)
            index.attach([merged[i : i + 1000] for i in range(0, len(merged), 1000)], 1000)

    def _row(self, row: Any) -> Any:
        if row is not None and row[0] & runs.LARGE:
            return runs.large_value(row[0], self.large[row[1]])
        return row

    def node(self, cid: bytes) -> Any:
        row = self.nodes.get(cid)
        if row is None:
            row = self._row(self.values.get(cid))
        if row is None:
            return None
        return row[1] if row[0] == ROW_RAW else NOT_A_NODE

    def prefetch(self, cids: list[bytes]) -> None:
        assert all(type(c) is bytes for c in cids)

    def fetch_many(self, cids: list[bytes]) -> tuple[list[tuple[int, Any] | None], bool]:
        rows, _n_large, _n_plain = self.values.get_many(cids)
        rows = [self._row(self.nodes.get(cid) if row is None else row) for cid, row in zip(cids, rows, strict=True)]
        return rows, all(row is not None and row[0] == ROW_PLAIN for row in rows)


def run(name: str, data: bytes, options: int) -> tuple[Any, ...]:
    impl = implementation.PYTHON if name == "python" else implementation.C
    assert impl is not None
    verify = bool(options & 1)
    process = (impl.transcode_json if (len(data) >> 2) & 1 else len) if options & 2 else None
    record_cids = bool(options & 4)
    limit = LIMITS[(options >> 3) & 3]
    feed = FEEDS[(options >> 5) & 7]
    collections = COLLECTIONS[(len(data) + options) & 3]
    parser = impl.CarParser(64 * 1024, verify)
    pos = 0
    out: list[Any] = []

    def fill() -> bool:
        nonlocal pos
        if pos >= len(data):
            return False
        n = max(parser.want, feed)
        parser.feed(data[pos : pos + n])
        pos += n
        return True

    try:
        while (raw := parser.read_header()) is None:
            if not fill():
                parser.finish()
        roots = car.decode_header(raw, parser.offset - len(raw))
        root = roots[0]
        table = impl.BlockTable(root, process, cbor2.dumps)
        packed: list[bytes] = []
        large: dict[int, bytes] = {}
        commit = None
        data_cid = b""
        while True:
            stopped = parser.load_into(table, limit)
            if commit is None and (block := table.raw_block(root)) is not None:
                commit, data_cid = decode_commit(block, root, strict=verify)
            if stopped and table.used < limit:
                continue  # stopped just after the commit block, decoded above
            if stopped or packed:
                while True:
                    run, apart, _size = table.take_run(limit // 2 or 1, len(large) + 1)
                    if not run:
                        break
                    packed.append(run)
                    large.update(apart)
                if stopped:
                    continue
            if not fill():
                parser.finish()
                break
        if commit is None:
            raise MissingBlockError("no commit")
        if packed:
            lookup = DiskRecords(RunLookup(impl, packed, large, FEEDS[options & 7] % 4096 or 1), process, cbor2.loads)
            walker = impl.Walker(data_cid, lookup, lookup, max_depth=32, strict=verify, record_cids=record_cids, collections=collections)
        else:
            walker = impl.Walker(data_cid, table, table, max_depth=32, strict=verify, record_cids=record_cids, collections=collections)
        while (chunk := walker.next_chunk(50)) is not None:
            out.extend(chunk)
        return ("records", out, walker.nodes_visited)
    except RepoStreamError as exc:
        message = str(exc)
        if isinstance(exc, NodeDecodeError):
            message = message.split(": ", 1)[0]
        return ("error", type(exc).__name__, message, out)


def transcode(fn: Any, block: bytes) -> tuple[str, str]:
    try:
        return ("text", fn(block))
    except RepoStreamError as exc:
        return ("error", f"{type(exc).__name__}: {exc}")


def fuzz_one(data: bytes) -> None:
    """Run ``data`` through both implementations; raise AssertionError if they differ."""
    if not data:
        return
    assert implementation.C is not None
    c_text = transcode(implementation.C.transcode_json, data[1:])
    python_text = transcode(transcode_json_reference, data[1:])
    if c_text != python_text:
        raise AssertionError(f"transcode_json differs:\n  C {c_text!r:.2000}\n  Python {python_text!r:.2000}")
    options, car_bytes = data[0], data[1:]
    c = run("c", car_bytes, options)
    python = run("python", car_bytes, options)
    if c != python:
        raise AssertionError(f"C core and reference differ (options {options:#x}):\n  C {c!r:.2000}\n  Python {python!r:.2000}")
