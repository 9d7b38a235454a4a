"""The store sinks (repo_stream.backfill.stores) against real stores: DuckDB files, Parquet
files and a PostgreSQL server started here (initdb + pg_ctl on a Unix socket in a temporary
folder). Each backfill is checked against references the sinks do not make: the samples'
``NAME.dump.jsonl`` and the generated repos' own records."""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest

from repo_stream.backfill import BackfillResult, backfill, open_sink
from repo_stream.records.generate import default_did, generate_records, generate_repo_car, repo_rev
from repo_stream.records.values import record_json
from repo_stream.records.writer import build_repo_car

from .conftest import new_database, sample_path

duckdb = pytest.importorskip("duckdb")
pytest.importorskip("pyarrow")

KINDS = ["duckdb", "parquet", "postgresql"]
Row = tuple[str, str, str, str, str, Any]  # did, collection, rkey, cid, rev, value (decoded JSON)


# --- stores: an --out value and a reader of what landed --------------------------------------


class Store:
    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind = kind
        if kind == "duckdb":
            self.out = f"duckdb:{tmp_path / 'records.duckdb'}"
        elif kind == "parquet":
            self.out = f"parquet:{tmp_path / 'parquet'}"
        else:
            self.dsn = new_database(request.getfixturevalue("postgres_server"))
            self.out = f"postgresql:{self.dsn}"

    def query(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        """Run ``sql`` over ``records`` (and ``repos``, not for Parquet)."""
        if self.kind == "postgresql":
            import psycopg

            with psycopg.connect(self.dsn) as conn:
                return [tuple(r) for r in conn.execute(sql.replace("?", "%s"), params or []).fetchall()]
        if self.kind == "duckdb":
            conn = duckdb.connect(self.out.removeprefix("duckdb:"), read_only=True)
        else:
            conn = duckdb.connect()
            files = glob.glob(os.path.join(self.out.removeprefix("parquet:"), "*", "*.parquet"))
            if not files:
                return [] if "count" not in sql else [(0,)]
            conn.execute(f"CREATE VIEW records AS SELECT * FROM read_parquet({files!r})")
        try:
            return conn.execute(sql, params or []).fetchall()
        finally:
            conn.close()

    def rows(self) -> list[Row]:
        rows = self.query("SELECT did, collection, rkey, cid, rev, CAST(value AS VARCHAR) FROM records")
        if self.kind == "postgresql":
            return [(*r[:5], r[5] if not isinstance(r[5], str) else json.loads(r[5])) for r in rows]
        return [(*r[:5], json.loads(r[5])) for r in rows]

    def repos(self) -> dict[str, tuple[str, str]]:
        if self.kind == "parquet":
            return {}
        return {did: (rev, status) for did, rev, status in self.query("SELECT did, rev, status FROM repos")}

    def leftovers(self) -> list[str]:
        if self.kind != "parquet":
            return []
        return glob.glob(os.path.join(self.out.removeprefix("parquet:"), "*", "*.part"))


@pytest.fixture(params=KINDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path, request)


# --- references -----------------------------------------------------------------------------


def cid_of(block: bytes) -> str:
    """CIDv1 dag-cbor sha2-256 in base32, from hashlib and base64 alone."""
    raw = bytes([0x01, 0x71, 0x12, 0x20]) + hashlib.sha256(block).digest()
    return "b" + base64.b32encode(raw).decode("ascii").lower().rstrip("=")


def generated_rows(n: int, seed: int) -> list[Row]:
    did, rev = default_did(seed), repo_rev(seed)
    return [(did, *key.split("/", 1), cid_of(block), rev, record_json(block)) for key, block in generate_records(n, seed=seed)]


def sample_rows(name: str) -> list[Row]:
    meta = json.loads(sample_path(f"{name}.json").read_text())
    did, rev = meta["did"], meta["rev"]
    rows: list[Row] = []
    for line in sample_path(f"{name}.dump.jsonl").read_text(encoding="utf-8").splitlines():
        item = json.loads(line)
        rows.append((did, *item["key"].split("/", 1), item["cid"], rev, item["value"]))
    return rows


async def run_backfill(sources: list[str], out: str, batch_rows: int | None = None, **options: Any) -> list[BackfillResult]:
    sink: Any = open_sink(out)
    if batch_rows is not None and hasattr(sink, "_pending"):  # inserts before the repo's end
        sink = type(sink)(out.split(":", 1)[1], batch_rows=batch_rows)
    try:
        async with aclosing(backfill(sources, sink=sink, **options)) as results:
            return [r async for r in results]
    finally:
        close = getattr(sink, "close", None)
        if close is not None:
            close()


def canonical(row: Row) -> str:
    """A row as text, its value's keys sorted (jsonb keeps its own key order)."""
    return json.dumps([*row[:5], row[5]], sort_keys=True, ensure_ascii=False)


def check_store(store: Store, expected: list[Row]) -> None:
    """The store holds exactly ``expected``: count, per collection, each row, one by key."""
    assert store.query("SELECT count(*) FROM records") == [(len(expected),)]
    per_collection = dict(store.query("SELECT collection, count(*) FROM records GROUP BY collection"))
    assert per_collection == dict(Counter(r[1] for r in expected))
    got = store.rows()
    assert len(got) == len(expected)
    assert sorted(map(canonical, got)) == sorted(map(canonical, expected))
    if expected:
        one = expected[len(expected) // 2]
        found = store.query("SELECT cid, rev FROM records WHERE did = ? AND collection = ? AND rkey = ?", list(one[:3]))
        assert found == [(one[3], one[4])]
    assert store.leftovers() == []


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_backfill_of_samples_and_generated_repos_equals_the_references(store: Store, tmp_path: Path) -> None:
    sources = [str(sample_path(f"{name}.car")) for name in ("signed-k256", "signed-p256", "empty")]
    expected = sample_rows("signed-k256") + sample_rows("signed-p256")
    for seed, n in ((1, 1), (2, 700), (3, 2500)):
        path = tmp_path / f"gen{seed}.car"
        generate_repo_car(path, n, seed=seed)
        sources.append(str(path))
        expected += generated_rows(n, seed)
    results = await run_backfill(sources, store.out, mem_limit_mb=0.05)  # some spill: disk workers too
    assert [r.error for r in results] == [None] * len(sources)
    assert any(r.spilled for r in results)
    check_store(store, expected)
    if store.kind != "parquet":
        repos = store.repos()
        assert len(repos) == len(sources) and set(repos.values()) >= {(sample_rows("signed-k256")[0][4], "active")}
        assert repos[default_did(3)] == (repo_rev(3), "active")
    # Again, no checkpoint: every repo replaced, nothing doubled.
    results = await run_backfill(sources, store.out)
    assert [r.error for r in results] == [None] * len(sources)
    check_store(store, expected)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_new_version_replaces_a_repo_and_a_bad_record_fails_it_whole(store: Store, tmp_path: Path) -> None:
    did, keep = default_did(7), default_did(8)
    generate_repo_car(tmp_path / "other.car", 50, seed=8)
    first = list(generate_records(1500, seed=7))
    build_repo_car(first, did=did, rev="3aaaaaaaaaa22", path=tmp_path / "v1.car")
    await run_backfill([str(tmp_path / "v1.car"), str(tmp_path / "other.car")], store.out)
    second = first[200:900]  # records deleted at both ends
    build_repo_car(second, did=did, rev="3aaaaaaaaab22", path=tmp_path / "v2.car")
    results = await run_backfill([str(tmp_path / "v2.car")], store.out)
    assert results[0].error is None
    want = [(did, *k.split("/", 1), cid_of(b), "3aaaaaaaaab22", record_json(b)) for k, b in second] + generated_rows(50, 8)
    check_store(store, want)

    # v3: v1's records, the last in key order (after a first chunk went in) not DAG-CBOR (an indefinite-length list).
    bad = [*first]
    last = max(range(len(bad)), key=lambda i: bad[i][0])
    bad[last] = (bad[last][0], b"\x9f\x01\xff")
    build_repo_car(bad, did=did, rev="3aaaaaaaaac22", path=tmp_path / "v3.car")
    results = await run_backfill([str(tmp_path / "v3.car")], store.out, batch_rows=300)
    assert results[0].records > 1024 and results[0].error is not None
    assert results[0].error.startswith("RecordDecodeError") and did in results[0].error
    check_store(store, want)  # v2 whole, nothing of v3
    if store.kind != "parquet":
        assert store.repos() == {did: ("3aaaaaaaaab22", "active"), keep: (repo_rev(8), "active")}


@pytest.fixture(scope="module")
def kill_repos(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], list[Row]]:
    folder = tmp_path_factory.mktemp("kill")
    paths, rows = [], []
    for seed in range(100, 116):
        path = folder / f"r{seed}.car"
        generate_repo_car(path, 3000, seed=seed)
        paths.append(str(path))
        rows += generated_rows(3000, seed)
    return paths, rows


def test_kill_9_mid_run_then_resume_leaves_every_row_once(store: Store, tmp_path: Path, kill_repos: tuple[list[str], list[Row]]) -> None:
    paths, expected = kill_repos
    listing = tmp_path / "repos.txt"
    listing.write_text("\n".join(paths) + "\n")
    command = [sys.executable, "-m", "repo_stream", "backfill", "--repos", str(listing), "--out", store.out,
               "--json", "--memory-workers", "2"]  # fmt: skip
    if store.kind != "postgresql":  # PostgreSQL: the checkpoint is in the database, with the rows
        command += ["--checkpoint", str(tmp_path / "run.db")]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    printed = [json.loads(child.stdout.readline()) for _ in range(3)]
    child.send_signal(signal.SIGKILL)
    child.wait(30)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert all(p["error"] is None for p in printed)
    done = {p["did"] for p in printed}
    landed = {did for (did,) in store.query("SELECT DISTINCT did FROM records")}
    assert done <= landed and len(landed) < len(paths)  # killed mid-run: the recorded repos are in
    counts = dict(store.query("SELECT did, count(*) FROM records GROUP BY did"))
    assert all(counts[did] == 3000 for did in done)  # a recorded repo is whole
    if store.kind == "parquet":  # files are atomic, not repos: every file there is complete and right
        assert {canonical(r) for r in store.rows()} <= {canonical(r) for r in expected}
    else:  # a transaction per repo: every repo in the store is whole
        assert set(counts.values()) <= {3000}

    rerun = subprocess.run(command, check=False, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    lines = [json.loads(line) for line in rerun.stdout.splitlines()]
    assert len(lines) == len(paths) and all(r["error"] is None for r in lines)
    assert {r["did"] for r in lines if r["skipped"]} >= done
    assert store.query("SELECT count(*) FROM (SELECT DISTINCT did, collection, rkey FROM records) AS k") == [(len(expected),)]
    check_store(store, expected)
    if store.kind == "postgresql":
        assert not list(tmp_path.glob("*.db"))
        recorded = store.query("SELECT source, outcome, records FROM backfill_checkpoint")
        assert sorted(recorded) == sorted((path, "ok", 3000) for path in paths)


def test_cli_rejects_an_empty_store_path(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from repo_stream.cli import main

    listing = tmp_path / "repos.txt"
    listing.write_text(str(sample_path("tiny.car")) + "\n")
    assert main(["backfill", "--repos", str(listing), "--out", "duckdb:"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --out duckdb:: duckdb: needs a path or DSN after the colon"]


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_parquet_raw_values_are_the_blocks(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    generate_repo_car(tmp_path / "g.car", 400, seed=5)
    results = await run_backfill([str(tmp_path / "g.car")], f"parquet:{tmp_path / 'out'}", mem_limit_mb=64)
    assert results[0].error is None
    sink = open_sink(f"parquet:{tmp_path / 'raw'}", raw=True)
    async with aclosing(backfill([str(tmp_path / "g.car")], sink=sink)) as run:
        assert [r.error async for r in run] == [None]
    files = sorted(glob.glob(str(tmp_path / "raw" / "*" / "*.parquet")))
    got = {}
    for file in files:
        table = pq.read_table(file)
        meta = pq.ParquetFile(file).metadata
        assert meta.row_group(0).column(5).compression == "ZSTD"
        for row in table.to_pylist():
            got[f"{row['collection']}/{row['rkey']}"] = row["value"]
    assert got == dict(generate_records(400, seed=5))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_postgresql_key_columns_sort_in_atproto_key_order(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """did, collection and rkey are COLLATE "C": ORDER BY gives the repo's key order (bytewise,
    as the MST sorts), whatever the database's locale, and the primary key compares bytes."""
    import psycopg

    dsn = new_database(request.getfixturevalue("postgres_server"))
    blocks = [block for _, block in generate_records(8, seed=9)]
    # rkeys a locale's collation orders otherwise (case, punctuation): bytewise they are sorted so
    rkeys = ["A1", "Zz", "a-b", "a.b", "aB", "a_b", "a~b", "b"]
    records = sorted((f"app.bsky.feed.like/{rkey}", block) for rkey, block in zip(rkeys, blocks, strict=True))
    build_repo_car(records, did=default_did(3), rev=repo_rev(3), path=tmp_path / "k.car")
    results = await run_backfill([str(tmp_path / "k.car")], f"postgresql:{dsn}")
    assert results[0].error is None
    with psycopg.connect(dsn) as conn:
        collations = conn.execute(
            "SELECT column_name, collation_name FROM information_schema.columns WHERE table_name = 'records' "
            "AND column_name IN ('did', 'collection', 'rkey') ORDER BY column_name"
        ).fetchall()
        ordered = [r[0] for r in conn.execute("SELECT rkey FROM records ORDER BY did, collection, rkey").fetchall()]
    assert collations == [("collection", "C"), ("did", "C"), ("rkey", "C")]
    assert ordered == rkeys


# --- the walker's Arrow batches (RepoSink's write_batch) against the tuple chunks --------------


class Way:
    """A store sink seen by the backfill through one of its two ways in: ``"batches"`` (its
    ``write_batch``, counted) or ``"tuples"`` (its ``__call__`` alone, ``write_batch`` hidden)."""

    def __init__(self, sink: Any, way: str) -> None:
        self.sink, self.way = sink, way
        self.keyed_by_did = True
        self.batches = self.chunks = 0
        if way == "batches":
            self.batch_values = sink.batch_values
            self.batch_rows = sink.batch_rows

    async def __call__(self, source: str, commit: Any, items: list[Any]) -> None:
        self.chunks += 1
        await self.sink(source, commit, items)

    def __getattr__(self, name: str) -> Any:
        if name == "write_batch" and self.way == "batches":

            async def write_batch(source: str, commit: Any, batch: Any) -> None:
                self.batches += 1
                await self.sink.write_batch(source, commit, batch)

            return write_batch
        raise AttributeError(name)

    async def finish(self, source: str, commit: Any, error: BaseException | None) -> None:
        await self.sink.finish(source, commit, error)


async def run_way(store: Store, way: str, sources: list[str], batch_rows: int, **options: Any) -> tuple[list[BackfillResult], Way]:
    sink = type(open_sink(store.out))(store.out.split(":", 1)[1], batch_rows=batch_rows)
    wrapped = Way(sink, way)
    try:
        async with aclosing(backfill(sources, sink=wrapped, **options)) as results:
            return [r async for r in results], wrapped
    finally:
        sink.close()


@pytest.fixture(params=KINDS)
def batch_store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    return Store(request.param, tmp_path, request)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("way", ["batches", "tuples"])
@pytest.mark.parametrize("mem_limit_mb", [1024, 0.05], ids=["in-memory", "spilled"])
async def test_batches_and_tuples_give_the_reference_rows(batch_store: Store, tmp_path: Path, way: str, mem_limit_mb: float) -> None:
    sources = [str(sample_path(f"{name}.car")) for name in ("signed-k256", "empty")]
    expected = sample_rows("signed-k256")
    sizes = {}
    for seed, n in ((21, 1), (22, 700), (23, 2500)):
        path = tmp_path / f"gen{seed}.car"
        generate_repo_car(path, n, seed=seed)
        sources.append(str(path))
        expected += generated_rows(n, seed)
        sizes[default_did(seed)] = (n, sum(len(block) for _, block in generate_records(n, seed=seed)))
    results, wrapped = await run_way(batch_store, way, sources, 300, mem_limit_mb=mem_limit_mb)
    assert [r.error for r in results] == [None] * len(sources)
    assert any(r.spilled for r in results) == (mem_limit_mb < 1)
    # records and record_bytes (the blocks' lengths) as the reference has them, either way in
    for result in results:
        if result.did in sizes:
            assert (result.records, result.record_bytes) == sizes[result.did]
    if way == "batches":  # 2500 records in batches of 300: 9 batches, and no tuple chunk
        assert wrapped.chunks == 0 and wrapped.batches >= 9 + 3 + 1
    else:
        assert wrapped.batches == 0 and wrapped.chunks >= 3
    check_store(batch_store, expected)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("way", ["batches", "tuples"])
@pytest.mark.parametrize("mem_limit_mb", [1024, 0.05], ids=["in-memory", "spilled"])
async def test_a_bad_record_mid_repo_writes_nothing_of_it_either_way(batch_store: Store, tmp_path: Path, way: str, mem_limit_mb: float) -> None:
    did = default_did(31)
    records = list(generate_records(3000, seed=31))
    good = sorted(records)[:1]  # the repo's earlier version: one record
    build_repo_car(good, did=did, rev="3aaaaaaaaaa22", path=tmp_path / "v1.car")
    generate_repo_car(tmp_path / "other.car", 40, seed=32)
    results, _ = await run_way(batch_store, way, [str(tmp_path / "v1.car"), str(tmp_path / "other.car")], 250, mem_limit_mb=mem_limit_mb)
    assert [r.error for r in results] == [None, None]
    want = [(did, *k.split("/", 1), cid_of(b), "3aaaaaaaaaa22", record_json(b)) for k, b in good] + generated_rows(40, 32)
    check_store(batch_store, want)
    # v2: a record in the middle in key order (after several batches went in) is not DAG-CBOR.
    bad = sorted(records)
    bad[1700] = (bad[1700][0], b"\xa1\x01\x02")  # a map with an integer key: not atproto's data model
    build_repo_car(bad, did=did, rev="3aaaaaaaaab22", path=tmp_path / "v2.car")
    results, wrapped = await run_way(batch_store, way, [str(tmp_path / "v2.car")], 250, mem_limit_mb=mem_limit_mb)
    assert results[0].error is not None and results[0].error.startswith("RecordDecodeError"), results[0].error
    assert did in results[0].error
    assert results[0].spilled == (mem_limit_mb < 1)
    assert (wrapped.batches if way == "batches" else wrapped.chunks) >= 2  # some of it reached the sink first
    check_store(batch_store, want)  # v1 whole, nothing of v2
    if batch_store.kind == "duckdb":
        assert batch_store.repos()[did] == ("3aaaaaaaaaa22", "active")
