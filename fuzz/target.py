"""The fuzz target: one input through the C core and through the pure-Python reference.

Driven synchronously through the sans-IO seam (no event loop), so a run costs microseconds. The
first byte of an input chooses the settings (verification, a processor, record CIDs, a memory
limit that makes the load stop and drain rows as spilling does, the size of each feed); the rest
is the CAR. The processor is ``len`` or, when bit 2 of the input's length is set, each
implementation's ``transcode_json`` (DAG-CBOR to JSON text). The rest is also handed to both
``transcode_json`` as one record block: the same text, or the same error and message. Both implementations must give the same records, or the same error class and message
(for ``NodeDecodeError``, the message up to the CID). Anything but a ``RepoStreamError`` is a bug.

Inputs starting with :data:`SYNC_MAGIC` (``ff 53``) go to :func:`sync_one` instead: the sync
1.1 decoders (subscribeRepos messages, CAR slices and partial trees, record proofs).
"""

from __future__ import annotations

from typing import Any

import cbor2

from repo_stream import Record
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
    # Bit 4 of the input's length: walk with next_batch (Arrow columns or, by bit 5 and 6, JSON
    # lines), values raw or JSON text, the batch's byte budget 1, 700 or 1 GiB.
    batch = bool((len(data) >> 4) & 1)
    process = (impl.transcode_json if (len(data) >> 2) & 1 or batch else len) if options & 2 else None
    kind = ((len(data) >> 5) & 3) % 3
    if batch and kind == 0:
        process = None  # raw Arrow values are the blocks: the driver refuses them with a processor
    budget = (1, 700, 1 << 30)[len(data) % 3]
    record_cids = bool(options & 4)
    record_type = Record if (len(data) >> 3) & 1 else None  # open_repo's walk: Records made by the walk
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
            walker = impl.Walker(
                data_cid, lookup, lookup, max_depth=32, strict=verify, record_cids=record_cids, collections=collections, record_type=record_type
            )
        else:
            walker = impl.Walker(
                data_cid, table, table, max_depth=32, strict=verify, record_cids=record_cids, collections=collections, record_type=record_type
            )
        if batch:
            while (result := walker.next_batch(50, kind, budget)) is not None:
                out.append(result if kind == 2 else _columns(result, kind == 1))
            return ("batches", out, walker.nodes_visited)
        while (chunk := walker.next_chunk(50)) is not None:
            out.extend(chunk)
        return ("records", out, walker.nodes_visited, {type(item).__name__ for item in out})
    except RepoStreamError as exc:
        message = str(exc)
        if isinstance(exc, NodeDecodeError):
            message = message.split(": ", 1)[0]
        return ("error", type(exc).__name__, message, out)


def _columns(result: Any, json_values: bool) -> Any:
    """A walker's batch (the C core's capsules, the reference's columns) as Python lists."""
    from repo_stream.read.arrow import from_walker

    batch = from_walker(result, json_values)
    batch.validate(full=True)
    return batch.to_pydict()


def transcode(fn: Any, block: bytes) -> tuple[str, str]:
    try:
        return ("text", fn(block))
    except RepoStreamError as exc:
        return ("error", f"{type(exc).__name__}: {exc}")


def bulk_one(block: bytes, expected: tuple[str, str]) -> None:
    """The block (between two good ones) through the C core's bulk transcoders, PostgreSQL COPY
    rows (against the reference) and an Arrow value column (against ``transcode_json``)."""
    from repo_stream import _native
    from repo_stream.backfill.stores import _pg_copy_rows_reference

    items = [("a.b.c/1", "bafy1", b"\xa0"), ("a.b.c/2", "bafy2", block), ("a.b.d/3", "bafy3", b"\xa1\x61a\x01")]
    c_rows = transcode(lambda _: _native.pg_copy_rows(items, "did:x:y", "3rev", True).hex(), block)
    python_rows = transcode(lambda _: _pg_copy_rows_reference(items, "did:x:y", "3rev", True).hex(), block)
    if c_rows != python_rows:
        raise AssertionError(f"pg_copy_rows differs:\n  C {c_rows!r:.2000}\n  Python {python_rows!r:.2000}")
    try:
        import pyarrow
    except ImportError:
        return
    from repo_stream.read.arrow import _Capsules

    def column(_: bytes) -> str:
        batch = pyarrow.record_batch(_Capsules(_native.arrow_batch(items, 2)))
        values: list[str] = batch.column(4).to_pylist()
        return values[1]

    got = transcode(column, block)
    if got != expected:
        raise AssertionError(f"arrow_batch value_kind 2 differs from transcode_json:\n  {got!r:.2000}\n  {expected!r:.2000}")


def fuzz_one(data: bytes) -> None:
    """Run ``data`` through both implementations; raise AssertionError if they differ."""
    if not data:
        return
    if data[:2] == SYNC_MAGIC:
        sync_one(data[2:])
        return
    assert implementation.C is not None
    c_text = transcode(implementation.C.transcode_json, data[1:])
    python_text = transcode(transcode_json_reference, data[1:])
    if c_text != python_text:
        raise AssertionError(f"transcode_json differs:\n  C {c_text!r:.2000}\n  Python {python_text!r:.2000}")
    bulk_one(data[1:], c_text)
    options, car_bytes = data[0], data[1:]
    c = run("c", car_bytes, options)
    python = run("python", car_bytes, options)
    if c != python:
        raise AssertionError(f"C core and reference differ (options {options:#x}):\n  C {c!r:.2000}\n  Python {python!r:.2000}")


# --- sync 1.1: subscribeRepos frames, CAR slices and partial trees, record proofs -------------

SYNC_MAGIC = b"\xffS"
"""Inputs starting with these two bytes go to :func:`sync_one`; the next byte picks the target."""
SYNC_DID = "did:plc:fuzzfuzzfuzzfuzzfuzzfuzz"
SYNC_KEYS = ["app.bsky.feed.like/3k00000000007", "app.bsky.feed.post/3kaaaaaaaaaaa", "com.example.thing/zzz", "a.b.c/"]


def _any_key() -> Any:
    """A key whose ``verify`` accepts every signature, so that mutated commits reach the tree
    checks (the fuzzer cannot forge a signature; the signature code is tested elsewhere)."""
    from repo_stream.crypto.signature import VerifyingKey

    class AnyKey(VerifyingKey):
        __slots__ = ()

        def verify(self, data: bytes, sig: bytes, *, where: str = "signature") -> None:
            return None

    return AnyKey.__new__(AnyKey)


_ANY_KEY: Any = None


def _outcome(fn: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except RepoStreamError as exc:
        message = str(exc)
        if isinstance(exc, NodeDecodeError):
            message = message.split(": ", 1)[0]
        return ("error", type(exc).__name__, message)


def _slice_and_tree(data: bytes, verify: bool) -> Any:
    from repo_stream.sync.partial import PartialTree, read_car_slice

    roots, blocks = read_car_slice(data, verify_cids=verify)
    root = roots[0]
    block = blocks.get(root)
    if block is not None:
        from repo_stream.sync.verify import _fast_commit

        fast = _fast_commit(block, root)
        try:
            commit, data = decode_commit(block, root, strict=True)
        except RepoStreamError:
            assert fast is None, "verify's single decode accepted a commit decode_commit refuses"
        else:
            if fast is not None:  # the single decode must give what decode_commit gives
                got, got_data, unsigned = fast
                assert (got.did, got.version, got.rev, got.sig, got.block, got_data) == (
                    commit.did, commit.version, commit.rev, commit.sig, commit.block, data,
                ), "verify's single decode differs from decode_commit"  # fmt: skip
                assert got.prev == commit.prev and unsigned == commit.unsigned_bytes(), "unsigned bytes differ"
            root = data
    tree = PartialTree(root, blocks)
    out: list[Any] = []
    for key in SYNC_KEYS:
        out.append(_outcome(lambda key=key: tree.get(key)))
    out.append(_outcome(lambda: [tuple(entry) for entry in tree.walk_slice()]))
    out.append(_outcome(lambda: list(tree.walk_slice("app.bsky.feed.like", "app.bsky.feed.post"))))
    return sorted(blocks.items()), out


def _proof(data: bytes, key: str) -> Any:
    from repo_stream.sync.proof import verify_record_proof

    proven = verify_record_proof(data, SYNC_DID, key, _ANY_KEY, process=len)
    return None if proven is None else (bytes(proven.cid), proven.value, proven.rev)


def _frame(data: bytes) -> Any:
    from repo_stream.sync.events import decode_frame
    from repo_stream.sync.verify import verify_commit, verify_sync

    decoded = _outcome(lambda: decode_frame(data))
    frame = decoded[1] if decoded[0] == "ok" else None
    result: list[Any] = [decoded if frame is None else [frame.type, sorted(frame.body)]]
    if frame is None or frame.type == "#commit":
        # verify_commit reads the usual message in one C pass (native/event.c) and any other with
        # the reference (also those decode_frame refuses): both implementations must agree, with
        # each setting.
        result.append(_outcome(lambda: repr(verify_commit(data, key=_ANY_KEY, require_prev_data=False))))
        result.append(_outcome(lambda: repr(verify_commit(data, key=_ANY_KEY, check_keys=len(data) % 2 == 0))))
    elif frame.type == "#sync":
        result.append(_outcome(lambda: repr(verify_sync(data, key=_ANY_KEY))))
    result.append(_raw_commit(data))
    return result


def _raw_commit(data: bytes) -> Any:
    """The firehose's raw_commits reading (C: ``_native.commit_peek``, native/event.c): a message it
    reads without decoding must decode, to the same values; any other gives what decoding gives."""
    from repo_stream.firehose.items import RawCommit, parse_message

    raw = _outcome(lambda: parse_message(data, max_bytes=5 << 20, raw_commits=True))
    decoded = _outcome(lambda: parse_message(data, max_bytes=5 << 20))
    if raw[0] == "ok" and type(raw[1]) is RawCommit:
        assert decoded[0] == "ok", (raw, decoded)
        r, e = raw[1], decoded[1]
        ops = [(op.get("action"), op.get("path")) for op in e.body["ops"]]
        assert (r.type, r.seq, r.did, r.time, r.rev, r.ops, r.message) == (e.type, e.seq, e.did, e.time, e.body.get("rev"), ops, e.message)
    else:
        assert raw == decoded, (raw, decoded)
    return decoded if decoded[0] != "ok" else ("ok", repr(decoded[1]))


def _comparable(value: Any) -> Any:
    if isinstance(value, RepoStreamError):
        return ("error", type(value).__name__, str(value), getattr(value, "cid", None))
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _node(data: bytes) -> Any:
    """An MST node block through the partial tree's node loader (the C core's ``load_node`` or
    the reference): byte 0 picks the expected layer (-1 to 4), the key check and a lower bound."""
    from repo_stream.core.cid import dag_cbor_cid
    from repo_stream.sync.partial import load_node

    if not data:
        return None
    first, block = data[0], data[1:]
    args = (dag_cbor_cid(block), block, first % 6 - 1, SYNC_KEYS[0].encode() if first & 0x40 else None, None, bool(first & 0x80))
    if implementation.backend().name == "c":
        from repo_stream import _native

        return _native.load_node(*args)
    return load_node(*args)


def _invert(data: bytes) -> Any:
    """A CAR slice as a commit's new tree: :data:`SYNC_KEYS` looked up, then ops on them undone
    (their actions and CIDs picked by the input's length, from the slice's own CIDs)."""
    import importlib

    from repo_stream.sync.invert import Op
    from repo_stream.sync.partial import read_car_slice

    lookup_and_invert = importlib.import_module("repo_stream.sync.invert").lookup_and_invert
    roots, blocks = read_car_slice(data, verify_cids=False)
    cids = sorted(blocks) or roots
    ops = []
    for i, key in enumerate(SYNC_KEYS):
        action = ("create", "update", "delete")[(len(data) >> i) % 3]
        cid, prev = cids[i % len(cids)], cids[(i + 1) % len(cids)]
        ops.append(Op(action, key, None if action == "delete" else cid, None if action == "create" else prev))
    held, inverted = lookup_and_invert(roots[0], blocks, [key.encode() for key in SYNC_KEYS], ops, check_keys=bool(len(data) & 1))
    return _comparable(held), _comparable(inverted)


def sync_one(data: bytes) -> None:
    """One sync input (after :data:`SYNC_MAGIC`): byte 0 picks the target, the rest is its input,
    run on both implementations: ``0``: a subscribeRepos message (``decode_frame``, then
    ``verify_commit``/``verify_sync`` with a key that accepts any signature); ``1``/``2``: a CAR
    slice (``read_car_slice`` with/without CID checks) loaded as a partial tree, looked up and
    walked; ``3``: a record proof (``verify_record_proof`` for one of :data:`SYNC_KEYS`, the key
    chosen by the length); ``4``: an MST node block (the partial tree's node loader); ``5``: a CAR
    slice as a commit's new tree, keys looked up and ops undone (``lookup_and_invert``). Both
    implementations must agree; anything but a RepoStreamError is a bug."""
    global _ANY_KEY
    if not data:
        return
    if _ANY_KEY is None:
        _ANY_KEY = _any_key()
    which, rest = data[0] % 6, data[1:]
    results = []
    for name in ("c", "python"):
        implementation.use(name)
        try:
            if which == 0:
                results.append(_outcome(lambda: _frame(rest)))
            elif which in (1, 2):
                results.append(_outcome(lambda: _slice_and_tree(rest, which == 1)))
            elif which == 3:
                results.append(_outcome(lambda: _proof(rest, SYNC_KEYS[len(rest) % len(SYNC_KEYS)])))
            elif which == 4:
                results.append(_outcome(lambda: _node(rest)))
            else:
                results.append(_outcome(lambda: _invert(rest)))
        finally:
            implementation.use("c")
    if results[0] != results[1]:
        raise AssertionError(f"sync target {which}: C core and reference differ:\n  C {results[0]!r:.2000}\n  Python {results[1]!r:.2000}")
