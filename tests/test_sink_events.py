"""The sinks' sync events (EventSink: apply, set_status) against real stores, the PostgreSQL
sink's retry after a connection loss, and the C core's bulk builders (Arrow value column
transcoded in place, PostgreSQL binary COPY rows) against their pure-Python references.

Each store's final records are compared with a reference dict the test keeps itself (key ->
block, rev), never with what the sink wrote."""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from repo_stream.backfill import open_sink
from repo_stream.backfill.sinks import RecordOp
from repo_stream.errors import RecordDecodeError, SinkError
from repo_stream.records.generate import generate_records
from repo_stream.records.json_text import transcode_json_reference
from repo_stream.records.values import record_json
from repo_stream.records.writer import build_repo_car

from .conftest import new_database
from .test_stores import Store, canonical, cid_of, run_backfill

duckdb = pytest.importorskip("duckdb")
pytest.importorskip("pyarrow")

EVENT_KINDS = ["duckdb", "parquet", "postgresql", "jsonl"]
DID = "did:plc:eventsinkeventsinkabcdef"


class EventStore(Store):
    """test_stores' Store, plus JSONL, and the Parquet and JSONL readers of the sync events."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        if kind == "jsonl":
            self.kind = kind
            self.out = f"jsonl:{tmp_path / 'jsonl'}"
        else:
            super().__init__(kind, tmp_path, request)

    def state(self) -> dict[str, tuple[str, str | None, Any]]:
        """key -> (cid, rev or None for JSONL, decoded JSON value): the store's current records."""
        if self.kind == "jsonl":
            folder = self.out.removeprefix("jsonl:")
            got: dict[str, tuple[str, str | None, Any]] = {}
            base = os.path.join(folder, DID + ".jsonl")
            if os.path.exists(base):
                for line in Path(base).read_text(encoding="utf-8").splitlines():
                    item = json.loads(line)
                    got[item["key"]] = (item["cid"], None, item["value"])
            events = os.path.join(folder, DID + ".events.jsonl")
            if os.path.exists(events):
                for line in Path(events).read_text(encoding="utf-8").splitlines():
                    event = json.loads(line)
                    for op in event.get("ops", []):
                        if op["action"] == "delete":
                            got.pop(op["key"], None)
                        else:
                            got[op["key"]] = (op["cid"], None, op["value"])
            return got
        if self.kind == "parquet":
            folder = self.out.removeprefix("parquet:")
            conn = duckdb.connect()
            base = glob.glob(os.path.join(folder, "*", "*.parquet"))
            changes = glob.glob(os.path.join(folder, "_sync", "changes", "*", "*.parquet"))
            repos = glob.glob(os.path.join(folder, "_sync", "repos", "*.parquet"))
            parts = []
            if base:
                parts.append(f"SELECT did, collection, rkey, cid, rev, value, 'create' AS action FROM read_parquet({base!r})")
            if changes and repos:
                parts.append(
                    f"SELECT c.did, collection, rkey, cid, c.rev, value, action FROM read_parquet({changes!r}) c "
                    f"JOIN read_parquet({repos!r}) r ON c.did = r.did WHERE c.rev > r.base_rev"
                )
            if not parts:
                return {}
            rows = conn.execute(
                f"SELECT collection, rkey, cid, rev, value FROM ({' UNION ALL '.join(parts)}) "
                "QUALIFY row_number() OVER (PARTITION BY did, collection, rkey ORDER BY rev DESC) = 1 AND action <> 'delete'"
            ).fetchall()
            conn.close()
            return {f"{c}/{r}": (cid, rev, json.loads(v)) for c, r, cid, rev, v in rows}
        rows = self.rows()
        assert {r[0] for r in rows} <= {DID}
        keys = [f"{r[1]}/{r[2]}" for r in rows]
        assert len(keys) == len(set(keys))  # no duplicate
        return {f"{r[1]}/{r[2]}": (r[3], r[4], r[5]) for r in rows}

    def repo_row(self) -> tuple[str | None, str | None, str | None]:
        """(rev, data, status) of the repo, from the store's repos table or state file."""
        if self.kind == "jsonl":
            return (None, None, None)
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            row = pq.read_table(os.path.join(self.out.removeprefix("parquet:"), "_sync", "repos", DID + ".parquet")).to_pylist()[0]
            return (row["rev"], row["data"], row["status"])
        rows = self.query("SELECT rev, data, status FROM repos WHERE did = ?", [DID])
        assert len(rows) == 1
        return rows[0]  # type: ignore[return-value]


class Reference:
    """The repo as the test knows it: key -> (block, rev of the write)."""

    def __init__(self, records: list[tuple[str, bytes]], rev: str) -> None:
        self.records = {key: (block, rev) for key, block in records}

    def apply(self, rev: str, ops: list[RecordOp]) -> None:
        for op in ops:
            key = f"{op.collection}/{op.rkey}"
            if op.action == "delete":
                self.records.pop(key, None)
            else:
                assert op.value is not None
                self.records[key] = (op.value, rev)

    def expected(self, with_rev: bool) -> dict[str, tuple[str, str | None, Any]]:
        return {key: (cid_of(block), rev if with_rev else None, record_json(block)) for key, (block, rev) in self.records.items()}


def op(action: str, key: str, block: bytes | None = None) -> RecordOp:
    collection, _, rkey = key.partition("/")
    return RecordOp(action, collection, rkey, None if block is None else cid_of(block), block)


def check(store: EventStore, reference: Reference, sink: Any = None) -> None:
    if store.kind == "duckdb" and sink is not None:
        sink.close()  # DuckDB: one configuration per file in a process; the sink opens it again when next used
    got = store.state()
    want = reference.expected(store.kind != "jsonl")
    assert len(got) == len(want)
    assert sorted(got) == sorted(want)
    for key in want:  # jsonb keeps its own key order: compare decoded values
        assert got[key][:2] == want[key][:2], key
        assert json.dumps(got[key][2], sort_keys=True) == json.dumps(want[key][2], sort_keys=True), key


@pytest.fixture(params=EVENT_KINDS)
def event_store(request: pytest.FixtureRequest, tmp_path: Path) -> EventStore:
    return EventStore(request.param, tmp_path, request)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sync_events_then_a_resync_leave_exactly_the_final_repo(event_store: EventStore, tmp_path: Path) -> None:
    store = event_store
    first = list(generate_records(400, seed=21, did=DID))
    build_repo_car(first, did=DID, rev="3aaaaaaaaaa22", path=tmp_path / "v1.car")
    results = await run_backfill([str(tmp_path / "v1.car")], store.out)
    assert results[0].error is None
    reference = Reference(first, "3aaaaaaaaaa22")
    check(store, reference)

    fresh = iter(generate_records(200, seed=22, did=DID))
    keys = sorted(reference.records)
    sink: Any = open_sink(store.out)
    try:
        # A commit: 5 creates, 5 updates, 5 deletes.
        created = [next(fresh) for _ in range(5)]
        ops1 = [op("create", k, b) for k, b in created]
        ops1 += [op("update", k, next(fresh)[1]) for k in keys[10:15]]
        ops1 += [op("delete", k) for k in keys[100:105]]
        await sink.apply(DID, "3aaaaaaaaab22", "bafydata1", ops1)
        reference.apply("3aaaaaaaaab22", ops1)
        check(store, reference, sink)

        # A second: deletes and updates of the records the first created, an update of a key
        # updated before, and a create then delete of one key (the last op wins).
        transient = next(fresh)
        ops2 = [op("delete", created[0][0]), op("update", created[1][0], next(fresh)[1]), op("update", keys[10], next(fresh)[1])]
        ops2 += [op("create", transient[0], transient[1]), op("delete", transient[0])]
        await sink.apply(DID, "3aaaaaaaaac22", "bafydata2", ops2)
        reference.apply("3aaaaaaaaac22", ops2)
        check(store, reference, sink)
        if store.kind != "jsonl":
            assert store.repo_row() == ("3aaaaaaaaac22", "bafydata2", "active")

        await sink.set_status(DID, "takendown")
        if store.kind == "duckdb":
            sink.close()
        if store.kind != "jsonl":
            assert store.repo_row() == ("3aaaaaaaaac22", "bafydata2", "takendown")
        else:
            events = Path(store.out.removeprefix("jsonl:"), DID + ".events.jsonl").read_text().splitlines()
            assert json.loads(events[-1]) == {"status": "takendown"}
        with pytest.raises(SinkError, match="status 'gone' is not one of"):
            await sink.set_status(DID, "gone")

        # A commit with a block that is not DAG-CBOR: nothing of it applied.
        bad = [op("create", next(fresh)[0], next(fresh)[1]), op("create", "app.bsky.feed.post/3zzzzzzzzzz22", b"\x9f\x01\xff")]
        with pytest.raises(RecordDecodeError):
            await sink.apply(DID, "3aaaaaaaaad22", "bafybad", bad)
        check(store, reference, sink)
    finally:
        close = getattr(sink, "close", None)
        if close is not None:
            close()

    # A resync: the repo's whole new version as a backfill (records changed on both sides).
    second = [(k, b) for k, b in sorted((k, b) for k, (b, _) in reference.records.items())][30:] + [next(fresh) for _ in range(20)]
    second = sorted(dict(second).items())
    build_repo_car(second, did=DID, rev="3aaaaaaaaae22", path=tmp_path / "v2.car")
    results = await run_backfill([str(tmp_path / "v2.car")], store.out)
    assert results[0].error is None
    reference = Reference(second, "3aaaaaaaaae22")
    check(store, reference, sink)
    if store.kind != "jsonl":
        rev, _, status = store.repo_row()
        assert (rev, status) == ("3aaaaaaaaae22", "active")

    # And a commit after the resync.
    sink = open_sink(store.out)
    try:
        key0 = sorted(reference.records)[0]
        ops3 = [op("update", key0, next(fresh)[1]), op("delete", sorted(reference.records)[1])]
        await sink.apply(DID, "3aaaaaaaaaf22", "bafydata3", ops3)
        reference.apply("3aaaaaaaaaf22", ops3)
        check(store, reference, sink)
    finally:
        close = getattr(sink, "close", None)
        if close is not None:
            close()


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("kind", ["duckdb", "postgresql"])
async def test_the_cursor_commits_with_the_event(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = EventStore(kind, tmp_path, request)
    sink: Any = open_sink(store.out)
    try:
        assert await sink.load_cursor("relay.example") is None
        block = next(iter(generate_records(1, seed=30, did=DID)))
        await sink.apply(DID, "3aaaaaaaaab22", "bafy1", [op("create", block[0], block[1])], cursor=("relay.example", 41))
        await sink.set_status(DID, "deactivated", cursor=("relay.example", 42))
        with pytest.raises(RecordDecodeError):
            await sink.apply(DID, "3aaaaaaaaac22", "bafy2", [op("create", "a.b.c/x", b"\xff")], cursor=("relay.example", 43))
        assert await sink.load_cursor("relay.example") == 42
        assert await sink.load_cursor("other") is None
    finally:
        sink.close()


# --- PostgreSQL: connection loss mid-run ------------------------------------------------------


def _terminating_sink(dsn: str, kill_copies: set[int], kill_commit: bool, retries: int = 5) -> Any:
    """A PostgresSink whose backend is terminated (pg_terminate_backend from another connection)
    just before the given COPYs (1-based, counting replays too) and before its first commit (the
    checkpoint's connection too, then)."""
    import psycopg

    from repo_stream.backfill.stores import PostgresSink

    class Terminating(PostgresSink):
        copies = 0
        kills = 0
        commits = 0

        def _kill(self, conn: Any) -> None:
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [conn.info.backend_pid])
            type(self).kills += 1

        def _copy(self, conn: Any, payload: bytes, merge: bool = False) -> None:
            type(self).copies += 1
            if type(self).copies in kill_copies:
                self._kill(conn)
            super()._copy(conn, payload, merge)

        def _end(self, repo: Any, did: str, commit: Any, source: str = "") -> None:
            if commit is not None and kill_commit and type(self).commits == 0 and repo.conn is not None:
                self._kill(repo.conn)
                with psycopg.connect(dsn, autocommit=True) as admin:  # and the checkpoint's connection
                    killed = admin.execute(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'repo-stream-checkpoint' AND datname = current_database()"
                    ).fetchone()
                    assert killed == (1,)
            type(self).commits += 1
            super()._end(repo, did, commit, source)

    return Terminating(dsn, batch_rows=500, retries=retries, backoff=0.01)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_postgresql_connection_loss_mid_run_retries_without_duplicates_or_losses(
    postgres_server: str, tmp_path: Path
) -> None:
    from contextlib import aclosing

    from repo_stream.backfill import backfill

    from .test_stores import generated_rows

    dsn = new_database(postgres_server)
    from repo_stream.records.generate import generate_repo_car

    paths = []
    for seed in (40, 41):
        generate_repo_car(tmp_path / f"r{seed}.car", 3000, seed=seed)
        paths.append(str(tmp_path / f"r{seed}.car"))
    sink = _terminating_sink(dsn, kill_copies={3, 8}, kill_commit=True)
    try:
        async with aclosing(backfill(paths, sink=sink, checkpoint=sink.checkpoint(), memory_workers=1)) as run:
            results = [r async for r in run]
    finally:
        sink.close()
    assert [r.error for r in results] == [None, None]
    assert type(sink).kills == 3  # two COPYs and a commit lost their connection, and were redone
    store = Store.__new__(Store)
    store.kind, store.dsn, store.out = "postgresql", dsn, f"postgresql:{dsn}"
    expected = generated_rows(3000, 40) + generated_rows(3000, 41)
    assert store.query("SELECT count(*), count(DISTINCT (did, collection, rkey)) FROM records") == [(6000, 6000)]
    assert sorted(map(canonical, store.rows())) == sorted(map(canonical, expected))
    assert sorted(store.query("SELECT source, outcome, records FROM backfill_checkpoint")) == sorted((p, "ok", 3000) for p in paths)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_postgresql_retries_are_bounded_and_a_lost_repo_leaves_nothing(postgres_server: str, tmp_path: Path) -> None:
    from repo_stream.records.generate import generate_repo_car

    dsn = new_database(postgres_server)
    generate_repo_car(tmp_path / "r.car", 3000, seed=42)
    from contextlib import aclosing

    from repo_stream.backfill import backfill

    sink = _terminating_sink(dsn, kill_copies=set(range(2, 100)), kill_commit=False, retries=2)
    try:
        async with aclosing(backfill([str(tmp_path / "r.car")], sink=sink)) as run:
            results = [r async for r in run]
    finally:
        sink.close()
    assert results[0].error is not None and results[0].error.startswith("SinkError")
    assert "(after 2 reconnections)" in results[0].error
    import psycopg

    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM records").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM repos").fetchone() == (0,)


# --- the C core's bulk builders against the references ------------------------------------------


def _items(n: int, seed: int) -> list[tuple[str, str, bytes]]:
    return sorted((key, cid_of(block), block) for key, block in generate_records(n, seed=seed, did=DID))


def test_arrow_batch_transcodes_values_as_the_reference() -> None:
    from repo_stream.read.arrow import record_batch

    items = _items(3000, 50)
    batch = record_batch(items, json_values=False, transcode=True)
    assert batch.column("value").to_pylist() == [transcode_json_reference(b) for _, _, b in items]
    assert batch.column("key").to_pylist() == [k for k, _, _ in items]
    assert batch.column("rkey").to_pylist() == [k.split("/", 1)[1] for k, _, _ in items]
    assert batch.column("collection").cast("string").to_pylist() == [k.split("/", 1)[0] for k, _, _ in items]
    assert batch.column("cid").to_pylist() == [c for _, c, _ in items]
    empty = record_batch([], json_values=False, transcode=True)
    assert empty.num_rows == 0 and str(empty.schema.field("value").type) == "string"
    bad = [*items[:10], ("app.bsky.feed.post/zz", "bafy", b"\xa1\x61a\x01\x61a\x02")]
    with pytest.raises(RecordDecodeError, match="record block of 7 bytes") as caught:
        record_batch(bad, json_values=False, transcode=True)
    with pytest.raises(RecordDecodeError) as reference:
        transcode_json_reference(bad[-1][2])
    assert str(caught.value) == str(reference.value)
    with pytest.raises(TypeError):
        record_batch([("a/b", "c", "text")], json_values=False, transcode=True)


def _parse_copy_rows(rows: bytes) -> list[list[bytes]]:
    """The binary COPY rows, read back by the format's rules (a reader independent of both builders)."""
    out, at = [], 0
    while at < len(rows):
        (count,) = struct.unpack_from(">h", rows, at)
        at += 2
        fields = []
        for _ in range(count):
            (size,) = struct.unpack_from(">i", rows, at)
            at += 4
            fields.append(rows[at : at + size])
            at += size
        out.append(fields)
    return out


@pytest.mark.parametrize("jsonb", [True, False])
def test_pg_copy_rows_are_the_binary_format_of_the_records(jsonb: bool) -> None:
    from repo_stream.backfill.stores import _pg_copy_rows_reference, pg_copy_rows

    items = _items(2000, 51)
    rows = pg_copy_rows(items, DID, "3aaaaaaaaaa22", jsonb)
    assert rows == _pg_copy_rows_reference(items, DID, "3aaaaaaaaaa22", jsonb)
    parsed = _parse_copy_rows(rows)
    assert len(parsed) == len(items)
    for (key, cid, block), fields in zip(items, parsed, strict=True):
        collection, rkey = key.split("/", 1)
        value = b"\x01" + transcode_json_reference(block).encode() if jsonb else block
        assert fields == [DID.encode(), collection.encode(), rkey.encode(), cid.encode(), b"3aaaaaaaaaa22", value]
    assert pg_copy_rows([], DID, "r", jsonb) == b""
    bad = [("app.bsky.feed.post/zz", "bafy", b"\x9f\x01\xff")]
    if jsonb:
        with pytest.raises(RecordDecodeError, match=f"^{DID}: record block of 3 bytes"):
            pg_copy_rows(bad, DID, "r", jsonb)
    else:
        assert _parse_copy_rows(pg_copy_rows(bad, DID, "r", jsonb))[0][5] == b"\x9f\x01\xff"
    with pytest.raises(TypeError):
        pg_copy_rows([("a/b", "c", "not bytes")], DID, "r", jsonb)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="has no '/'"):
        pg_copy_rows([("ab", "c", b"\xa0")], DID, "r", jsonb)


@pytest.mark.parametrize("jsonb", [True, False])
def test_pg_copy_batch_gives_the_rows_of_pg_copy_rows(jsonb: bool) -> None:
    """The rows made with pyarrow's kernels from a walker-shaped batch are pg_copy_rows' bytes,
    read back field by field too; slices, an empty batch and the wrong value type."""
    from repo_stream.backfill.stores import pg_copy_batch, pg_copy_rows
    from repo_stream.read.arrow import record_batch

    items = _items(2000, 52)
    items[7] = (items[7][0], items[7][1], _items(1, 53)[0][2])
    batch = record_batch(items, json_values=False, transcode=jsonb)
    rev = "3aaaaaaaaaa2é"  # non-ASCII: lengths are bytes
    rows = bytes(pg_copy_batch(batch, DID, rev, jsonb))
    assert rows == pg_copy_rows(items, DID, rev, jsonb)
    parsed = _parse_copy_rows(rows)
    assert len(parsed) == len(items)
    for (key, cid, block), fields in zip(items, parsed, strict=True):
        collection, rkey = key.split("/", 1)
        value = b"\x01" + transcode_json_reference(block).encode() if jsonb else block
        assert fields == [DID.encode(), collection.encode(), rkey.encode(), cid.encode(), rev.encode(), value]
    part = batch.slice(300, 500)
    assert bytes(pg_copy_batch(part, DID, rev, jsonb)) == pg_copy_rows(items[300:800], DID, rev, jsonb)
    assert bytes(pg_copy_batch(batch.slice(0, 0), DID, rev, jsonb)) == b""
    with pytest.raises(TypeError, match="pg_copy_batch: value is"):
        pg_copy_batch(record_batch(items[:3], json_values=False, transcode=not jsonb), DID, rev, jsonb)
