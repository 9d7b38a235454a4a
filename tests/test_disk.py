"""The SQLite spill store: limits, reuse, cleanup, kill -9, forged and repeated CIDs, look-ups."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from repo_stream import DiskBuilder, DiskError, DriverBuilder, NeedDisk
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.core.walk import NOT_A_NODE
from repo_stream.records.writer import build_mst, car_bytes, encode_commit
from repo_stream.spill.store import APPLICATION_ID, DiskStore

from .helpers import DID, REV, record, repo_car, sqlite_temp_files

pytestmark = pytest.mark.anyio

POSTS = [(f"app.bsky.feed.post/3k{i:011d}", record("z" * 900 + str(i))) for i in range(1500)]  # ~1.4 MB


@pytest.fixture(scope="module")
def big_car() -> bytes:
    return repo_car(POSTS, order="reverse")


async def spill(car: bytes, limit_mb: float = 0.1) -> NeedDisk:
    driver = await DriverBuilder().with_mem_limit_mb(limit_mb).with_block_processor(len).load_car(car)
    assert isinstance(driver, NeedDisk)
    return driver


async def test_max_stored_mb_is_enforced(big_car: bytes) -> None:
    async with await DiskBuilder().with_max_stored_mb(1).open() as store:
        driver = await DriverBuilder().with_mem_limit_mb(0.1).load_car(big_car)  # raw blocks: ~1.4 MB
        assert isinstance(driver, NeedDisk)
        with pytest.raises(DiskError, match="over its limit of 1 MiB"):
            await driver.finish_loading(store)
        assert store.stored_bytes <= 1024 * 1024


async def test_store_is_reused_after_reset(big_car: bytes, tmp_path) -> None:
    path = tmp_path / "spill.db"
    expected = [(key, len(block)) for key, block in POSTS]
    async with await DiskBuilder().with_cache_size_mb(4).open(path) as store:
        for _ in range(2):
            commit, driver = await (await spill(big_car)).finish_loading(store)
            assert [r async for r in driver] == expected
            assert commit.rev == "3kaaaaaaaaaaa"
            store = await driver.reset_store()
            assert store.stored_bytes == 0
    assert store.closed
    assert path.exists()  # a store opened at a path leaves its file to its owner


async def test_closing_a_database_hands_memory_back(big_car: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    # SQLite's page cache is freed in a worker thread's arena, which glibc keeps: the store trims
    # the heap each time it closes a database (a reset closes one too).
    from repo_stream.core import implementation

    implementation.trim_memory()  # the real one runs (the C core's malloc_trim, or nothing)
    trims: list[int] = []
    monkeypatch.setattr(implementation, "trim_memory", lambda: trims.append(1))
    async with await DiskBuilder().open() as store:
        _, driver = await (await spill(big_car)).finish_loading(store)
        assert len([r async for r in driver]) == len(POSTS)
        assert trims == []
        store = await driver.reset_store()
        assert trims == [1]
    assert trims == [1, 1]


async def test_temporary_store_files_have_no_name_and_go_on_close(big_car: bytes) -> None:
    before = sqlite_temp_files()
    store = await DiskBuilder().with_cache_size_mb(1).open()
    assert store.path is None
    driver = await DriverBuilder().with_mem_limit_mb(0.1).load_car(big_car)  # raw blocks: ~1.4 MB
    assert isinstance(driver, NeedDisk)
    _, disk = await driver.finish_loading(store)
    assert await disk.next_chunk(5) is not None
    files = {name: size for name, size in sqlite_temp_files().items() if name not in before}
    # Over the 1 MiB cache, so SQLite wrote to files, each unlinked already.
    assert sum(files.values()) > 1024 * 1024
    assert files and all(name.endswith(" (deleted)") for name in files)
    await store.close()
    await store.close()  # twice is fine
    assert not sqlite_temp_files().keys() - before.keys()


async def test_closed_store_is_refused(big_car: bytes) -> None:
    store = await DiskBuilder().open()
    await store.close()
    with pytest.raises(DiskError, match="is closed"):
        await (await spill(big_car)).finish_loading(store)


async def test_spilled_walk_keeps_memory_bounded(big_car: bytes, monkeypatch) -> None:
    """While finishing, the block table never holds more than the limit (checked before every drain)."""
    from repo_stream.read import drivers

    driver = await spill(big_car, limit_mb=0.05)
    peaks = []
    real_drain = drivers._drain

    async def watched(store, table, batch):
        peaks.append(table.used)
        await real_drain(store, table, batch)

    monkeypatch.setattr(drivers, "_drain", watched)
    async with await DiskBuilder().open() as store:
        _, disk = await driver.finish_loading(store)
        assert len([r async for r in disk]) == len(POSTS)
    limit = int(0.05 * 1024 * 1024)
    assert len(peaks) > 3
    assert max(peaks) < limit + 2048  # one block of slack past the limit


async def test_walk_chunks_are_one_thread_hop_each(big_car: bytes, monkeypatch) -> None:
    async with await DiskBuilder().open() as store:
        _, driver = await (await spill(big_car)).finish_loading(store)
        hops = 0
        real = anyio.to_thread.run_sync

        async def counting(*args, **kwargs):
            nonlocal hops
            hops += 1
            return await real(*args, **kwargs)

        monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
        records = []
        while (chunk := await driver.next_chunk(500)) is not None:
            records.extend(chunk)
        assert len(records) == 1500
        assert hops == 3  # 3 chunks of 500; the end is known without a hop


# --------------------------------------------------------------------------------------------
# kill -9: a temporary store leaves nothing; a store at a path can be opened again
# --------------------------------------------------------------------------------------------

#: Run in a child process: spill argv[1] (a CAR file) into a store (at the path argv[3], or
#: temporary, in the folder argv[4] if given) with a 1 MiB cache, print "ready" at the point
#: argv[2] names, then carry on or wait to be killed.
_SPILLER = """
import sys, anyio
from repo_stream import DiskBuilder, DriverBuilder, NeedDisk
from repo_stream.spill.store import DiskStore

car = open(sys.argv[1], "rb").read()
point = sys.argv[2]
path = sys.argv[3] or None
directory = sys.argv[4] or None

put = DiskStore.put_run_sync
def put_and_tell(self, run, large, size):
    put(self, run, large, size)
    if point == "writing" and self.stored_bytes > 2_000_000:
        print("ready", flush=True)  # and go on writing: the kill lands in some later batch
DiskStore.put_run_sync = put_and_tell

async def source():
    for i in range(0, len(car), 65536):
        if point == "loading" and i >= len(car) * 3 // 4:
            print("ready", flush=True)
            await anyio.sleep_forever()
        yield car[i : i + 65536]

async def main():
    driver = await DriverBuilder().with_mem_limit_mb(0.5).load_car(source())
    assert isinstance(driver, NeedDisk)
    store = await DiskBuilder().with_cache_size_mb(1).open(path, directory=directory)
    _, disk = await driver.finish_loading(store)
    await disk.next_chunk(10)
    print("ready", flush=True)
    await anyio.sleep_forever()

anyio.run(main)
"""

#: ~6 MB of records in shuffled-like (reverse) order: several times the 1 MiB cache.
KILL_POSTS = [(f"app.bsky.feed.post/3k{i:011d}", record("k" * 2000 + str(i))) for i in range(3000)]


@pytest.fixture(scope="module")
def kill_car(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("car") / "repo.car"
    path.write_bytes(repo_car(KILL_POSTS, order="reverse"))
    return path


def _spill_then_kill(car: Path, point: str, tmpdir: Path, path: Path | None = None, directory: Path | None = None) -> dict[str, int]:
    """Run the spiller until it says ready, SIGKILL it; return the SQLite temp files it had open."""
    tmpdir.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(tmpdir), "SQLITE_TMPDIR": str(tmpdir)}
    child = subprocess.Popen(
        [sys.executable, "-c", _SPILLER, str(car), point, str(path or ""), str(directory or "")],
        stdout=subprocess.PIPE, env=env,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n", "the spiller failed before it was ready"
        open_files = sqlite_temp_files(child.pid)
        assert os.listdir(tmpdir) == []  # files it has open there have no names
        if directory is not None:
            assert os.listdir(directory) == []
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    return open_files


@pytest.mark.parametrize("point", ["loading", "writing", "walking"])
def test_temporary_store_leaves_nothing_after_kill_9(kill_car: Path, tmp_path: Path, point: str) -> None:
    tmpdir = tmp_path / "tmp"
    open_files = _spill_then_kill(kill_car, point, tmpdir)
    # The spill really was on disk in TMPDIR (beyond the cache), in files unlinked already ...
    assert sum(open_files.values()) > 1024 * 1024  # more than the 1 MiB page cache holds
    assert all(name.startswith(str(tmpdir)) and name.endswith(" (deleted)") for name in open_files)
    # ... so nothing is left after the kill.
    assert os.listdir(tmpdir) == []


@pytest.mark.parametrize("point", ["writing", "walking"])
def test_temporary_store_in_a_directory_leaves_nothing_after_kill_9(kill_car: Path, tmp_path: Path, point: str) -> None:
    spill = tmp_path / "spill"
    spill.mkdir()
    open_files = _spill_then_kill(kill_car, point, tmp_path / "tmp", directory=spill)
    # The store was in the folder given, unlinked already ...
    in_spill = {name: size for name, size in open_files.items() if name.startswith(f"{spill}/repo-stream-")}
    assert len(in_spill) == 1 and all(name.endswith(" (deleted)") for name in in_spill)
    assert sum(in_spill.values()) > 1024 * 1024  # more than the 1 MiB page cache holds
    # ... so nothing is left after the kill.
    assert os.listdir(spill) == [] and os.listdir(tmp_path / "tmp") == []


async def test_temporary_store_in_a_directory(tmp_path: Path, big_car: bytes) -> None:
    with pytest.raises(ValueError, match="not both"):
        await DiskBuilder().open(tmp_path / "x.db", directory=tmp_path)
    with pytest.raises(DiskError, match=r"\(temporary, in .*missing\): cannot make its file"):
        await DiskBuilder().open(directory=tmp_path / "missing")
    async with await DiskBuilder().open(directory=tmp_path) as store:
        assert store.name == f"(temporary, in {tmp_path})" and store.path is None
        _, driver = await (await spill(big_car)).finish_loading(store)
        assert [r async for r in driver] == [(key, len(block)) for key, block in sorted(POSTS)]
        assert os.listdir(tmp_path) == []
        assert len([t for t in sqlite_temp_files() if t.startswith(f"{tmp_path}/repo-stream-")]) == 1
        store = await driver.reset_store()  # a new file, the old one closed
        assert len([t for t in sqlite_temp_files() if t.startswith(f"{tmp_path}/repo-stream-")]) == 1
    assert [t for t in sqlite_temp_files() if t.startswith(f"{tmp_path}/")] == []


@pytest.mark.anyio
@pytest.mark.parametrize("point", ["loading", "writing"])
async def test_store_at_a_path_works_again_after_kill_9(kill_car: Path, tmp_path: Path, point: str) -> None:
    path = tmp_path / "spill.db"
    _spill_then_kill(kill_car, point, tmp_path / "tmp", path)
    assert path.exists()
    async with await DiskBuilder().open(path) as store:  # a file left mid-write is started afresh
        assert store.stored_bytes == 0
        driver = await DriverBuilder().with_mem_limit_mb(0.5).load_car(kill_car.read_bytes())
        assert isinstance(driver, NeedDisk)
        _, disk = await driver.finish_loading(store)
        assert [r async for r in disk] == sorted(KILL_POSTS)
    assert path.exists()
    assert os.listdir(tmp_path / "tmp") == []


# --------------------------------------------------------------------------------------------
# A store at a path: its own file only
# --------------------------------------------------------------------------------------------


async def test_store_refuses_to_overwrite_a_file_that_is_not_a_store(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"my notes")
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE mine (x)")
        conn.execute("INSERT INTO mine VALUES (42)")
    conn.close()
    before = other.read_bytes()
    for path in (text, other):
        with pytest.raises(DiskError, match="not a repo-stream spill store; refusing to overwrite it"):
            await DiskBuilder().open(path)
    assert text.read_bytes() == b"my notes"
    assert other.read_bytes() == before


async def test_store_file_is_marked_and_started_afresh(tmp_path: Path, big_car: bytes) -> None:
    path = tmp_path / "spill.db"
    path.touch()  # an empty file is taken
    async with await DiskBuilder().open(path) as store:
        _, driver = await (await spill(big_car)).finish_loading(store)
        assert len([r async for r in driver]) == len(POSTS)
    header = path.read_bytes()[:100]
    assert int.from_bytes(header[68:72], "big") == APPLICATION_ID
    old_cid = dag_cbor_cid(POSTS[0][1])
    async with await DiskBuilder().open(path) as store:
        assert store.stored_bytes == 0
        assert await store._run(store.lookup(bytes).fetch_many, [old_cid]) == ([None], False)


# --------------------------------------------------------------------------------------------
# Forged and repeated CIDs
# --------------------------------------------------------------------------------------------

TAIL = bytes.fromhex("00c0ffee00c0ffee")


def forged(block: bytes) -> bytes:
    """A CID for ``block`` that ends in TAIL (every forged CID shares its last 8 bytes)."""
    return dag_cbor_cid(block)[:-8] + TAIL


def raw_codec(cid: bytes) -> bytes:
    """The raw-codec (0x55) CID with the same sha2-256 digest as the dag-cbor ``cid``."""
    return b"\x01\x55" + cid[2:]


async def test_forged_and_repeated_cids_in_the_store() -> None:
    a, b, c = (forged(x) for x in (b"a", b"b", b"c"))
    d = dag_cbor_cid(b"d")
    d_raw = raw_codec(d)
    async with await DiskBuilder().open() as store:
        # Forged CIDs within a batch and across batches, and repeated CIDs (the first block wins).
        await store._run(store.put_batch_sync, [(a, 0, b"A"), (d_raw, 2, 7), (b, 2, "B")], 10)
        await store._run(store.put_batch_sync, [(c, 1, b"\x43"), (a, 0, b"A again"), (d, 0, b"D"), (b, 2, "B again")], 10)
        lookup = store.lookup(lambda data: data.decode())
        asked = [c, d, a, dag_cbor_cid(b"absent"), d_raw, b, c]
        expected = [(1, b"\x43"), (0, b"D"), (0, b"A"), None, (2, 7), (2, "B"), (1, b"\x43")]
        assert await store._run(lookup.fetch_many, asked) == (expected, False)
        assert await store._run(lookup.fetch_many, [d_raw, b]) == ([(2, 7), (2, "B")], True)

        def nodes() -> list[object]:
            return [lookup.node(a), lookup.node(b), lookup.node(c), lookup.node(d_raw), lookup.node(d), lookup.node(TAIL)]

        assert await store._run(nodes) == [b"A", NOT_A_NODE, NOT_A_NODE, NOT_A_NODE, b"D", None]


async def test_every_kind_of_value_reads_back() -> None:
    cids = [dag_cbor_cid(b"%d" % i) for i in range(10)]
    values = [-(2**63), 2**63 - 1, 0.5, float("inf"), "", "h\u00e9 \U0001f600", b"", b"\x00\xff", None, "x" * 9000]
    async with await DiskBuilder().open() as store:
        await store._run(store.put_batch_sync, [(cid, 2, v) for cid, v in zip(cids, values, strict=True)], 1)
        lookup = store.lookup(bytes)
        rows, all_plain = await store._run(lookup.fetch_many, cids)
        assert all_plain and [row[1] for row in rows] == values
        assert [type(row[1]) for row in rows] == [type(v) for v in values]


@pytest.mark.parametrize(
    "row, message",
    [
        ((b"\x01q", 2, {"not": "storable"}), "a value of type dict cannot be stored as it is"),
        ((b"\x01q", 2, 2**63), "does not fit in 64 bits"),
        ((b"\x01q", 2, True), "a value of type bool cannot be stored as it is"),
        ((b"\x01q", 0, "text"), "a row of kind 0 holds bytes, not str"),
        ((b"\x01q", 3, b""), "row kind 3 is not 0, 1 or 2"),
        ((b"", 0, b""), "a CID of 0 bytes cannot be stored"),
        ((b"x" * 256, 0, b""), "a CID of 256 bytes cannot be stored"),
        ((b"\x01q", 2, "\ud800"), "surrogates not allowed"),
    ],
)
async def test_rows_that_cannot_be_stored(impl: str, row: tuple[bytes, int, object], message: str) -> None:
    async with await DiskBuilder().open() as store:
        with pytest.raises(DiskError, match=f"SQLite spill store \\(temporary, in [^)]+\\): cannot store a row: .*{message}"):
            await store._run(store.put_batch_sync, [row], 1)


async def test_walk_finds_blocks_whose_keys_collide() -> None:
    """Every record CID forged onto one key, and a raw-codec block, first in the CAR, under a node's digest."""
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"collide {i}")) for i in range(300)]
    root, nodes = build_mst(sorted((key.encode(), forged(block)) for key, block in posts))
    commit = encode_commit(DID, root, REV)
    decoys = [(raw_codec(cid), b"decoy %d" % i) for i, cid in enumerate(nodes)]
    blocks = [(dag_cbor_cid(commit), commit), *decoys, *nodes.items(), *[(forged(b), b) for _, b in reversed(posts)]]
    car = car_bytes([dag_cbor_cid(commit)], blocks)
    driver = await DriverBuilder().with_mem_limit_mb(0.001).load_car(car)
    assert isinstance(driver, NeedDisk)
    async with await DiskBuilder().open() as store:
        _, disk = await driver.finish_loading(store)
        assert [r async for r in disk] == sorted(posts)


# --------------------------------------------------------------------------------------------
# Look-ups
# --------------------------------------------------------------------------------------------


async def test_fetch_many_in_order_across_runs(impl: str) -> None:
    cids = [dag_cbor_cid(b"%d" % i) for i in range(700)]
    async with await DiskBuilder().open() as store:
        for part in range(7):  # seven runs, merged before the first look-up
            rows = [(cid, 2, i) for i, cid in enumerate(cids) if i % 7 and i % 7 == part]
            await store._run(store.put_batch_sync, rows, 100 * 44)
        lookup = store.lookup(bytes)
        asked = cids[::-1] + cids[:5]
        rows, all_plain = await store._run(lookup.fetch_many, asked)
        assert rows == [None if cids.index(cid) % 7 == 0 else (2, cids.index(cid)) for cid in asked] and not all_plain


async def test_large_rows_are_stored_apart(impl: str) -> None:
    big, small, text = dag_cbor_cid(b"big"), dag_cbor_cid(b"small"), dag_cbor_cid(b"text")
    async with await DiskBuilder().open() as store:
        await store._run(store.put_batch_sync, [(big, 0, b"x" * 100_000), (small, 0, b"y"), (text, 2, "\u00e9" * 9000)], 118_100)
        assert await store._run(lambda: store._conn.execute("SELECT count(*) FROM large").fetchone()) == (2,)
        lookup = store.lookup(bytes)
        assert await store._run(lambda: (lookup.node(big), lookup.node(small), lookup.node(text))) == (b"x" * 100_000, b"y", NOT_A_NODE)
        assert await store._run(lookup.fetch_many, [text, big]) == ([(2, "\u00e9" * 9000), (0, b"x" * 100_000)], False)


async def test_rows_stored_after_a_walk_started_are_found(impl: str) -> None:
    one, two = dag_cbor_cid(b"1"), dag_cbor_cid(b"2")
    async with await DiskBuilder().open() as store:
        await store._run(store.put_batch_sync, [(one, 2, 1)], 40)
        lookup = store.lookup(bytes)
        assert await store._run(lookup.fetch_many, [one, two]) == ([(2, 1), None], False)
        await store._run(store.put_batch_sync, [(two, 2, 2), (one, 2, 99)], 80)
        assert await store._run(lookup.fetch_many, [one, two]) == ([(2, 1), (2, 2)], True)


async def test_merge_in_levels_keeps_the_first_block(impl: str) -> None:
    """More runs than one merge holds (a 1 MiB cache merges 8 at a time): merged in levels."""
    cids = [dag_cbor_cid(b"%d" % i) for i in range(3000)]
    async with await DiskBuilder().with_cache_size_mb(1).open() as store:
        for part in range(30):  # each CID in three runs; its first value is part // 10 == 0
            rows = [(cid, 2, part) for i, cid in enumerate(cids) if i % 10 == part % 10]
            await store._run(store.put_batch_sync, rows, 1)
        lookup = store.lookup(bytes)
        rows, all_plain = await store._run(lookup.fetch_many, cids)
        assert all_plain and rows == [(2, i % 10) for i in range(3000)]
        tables = await store._run(lambda: store._conn.execute("SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM merged)").fetchone())
        assert sorted(tables) == [0, 1]  # every merged run's rows deleted; the last merge in one segment


async def test_a_failed_batch_needs_a_reset() -> None:
    cid = dag_cbor_cid(b"1")
    async with await DiskBuilder().open() as store:
        with pytest.raises(DiskError, match="cannot store a row"):  # refused before anything is written
            await store._run(store.put_batch_sync, [(cid, 2, {"not": "storable"})], 40)
        assert store.stored_bytes == 0
        with pytest.raises(DiskError, match="Error binding parameter"):  # fails half-way through its writes
            await store._run(store.put_run_sync, b"", [(1, {"not": "bytes"})], 40)
        assert store.stored_bytes == 40  # so that finish_loading resets it before use
        with pytest.raises(DiskError, match=r"an earlier write failed; reset\(\) the store"):
            await store._run(store.put_batch_sync, [(cid, 2, 1)], 40)
        await store.reset()
        await store._run(store.put_batch_sync, [(cid, 2, 1)], 40)
        assert await store._run(store.lookup(bytes).fetch_many, [cid]) == ([(2, 1)], True)


async def test_temporary_store_reports_its_name_in_errors(big_car: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SQLITE_TMPDIR", str(tmp_path))  # a full disk must name the folder it fills
    store = await DiskBuilder().open()
    await store.close()
    assert isinstance(store, DiskStore) and store.name == f"(temporary, in {tmp_path})"
    with pytest.raises(DiskError, match=rf"SQLite spill store \(temporary, in {re.escape(str(tmp_path))}\) is closed"):
        await store.reset()


async def test_temporary_store_where_sqlite_keeps_temporary_databases_in_memory(big_car: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """There the store names its own files, and unlinks them as soon as SQLite has opened them."""
    import repo_stream.spill.store

    monkeypatch.setattr(repo_stream.spill.store, "TEMPORARY_IN_MEMORY", True)
    before = sqlite_temp_files()
    async with await DiskBuilder().with_cache_size_mb(1).open() as store:
        for _ in range(2):  # and again after a reset
            driver = await DriverBuilder().with_mem_limit_mb(0.1).load_car(big_car)
            assert isinstance(driver, NeedDisk)
            _, disk = await driver.finish_loading(store)
            assert [r async for r in disk] == sorted(POSTS)
            files = {name: size for name, size in sqlite_temp_files().items() if name not in before}
            ours = [name for name in files if "/repo-stream-" in name]
            assert len(ours) == 1  # the store
            assert sum(files[name] for name in ours) > 1024 * 1024
            assert all(name.endswith(" (deleted)") for name in files)
            store = await disk.reset_store()
    assert not sqlite_temp_files().keys() - before.keys()


async def test_many_forged_cids_are_all_found(impl: str) -> None:
    cids = [forged(b"%d" % i) for i in range(2000)]
    async with await DiskBuilder().open() as store:
        await store._run(store.put_batch_sync, [(cid, 2, i) for i, cid in enumerate(cids[:1000])], 44_000)
        await store._run(store.put_batch_sync, [(cid, 2, i) for i, cid in enumerate(cids[1000:], 1000)], 44_000)
        lookup = store.lookup(bytes)
        with anyio.fail_after(60):
            assert await store._run(lookup.fetch_many, cids[::-1]) == ([(2, i) for i in reversed(range(2000))], True)
            assert await store._run(lambda: [lookup.node(cid) for cid in cids]) == [NOT_A_NODE] * 2000


async def test_look_ups_on_a_closed_store_say_so() -> None:
    cid = dag_cbor_cid(b"1")
    store = await DiskBuilder().open()
    await store._run(store.put_batch_sync, [(cid, 2, 1)], 40)
    lookup = store.lookup(bytes)
    await store.close()
    with pytest.raises(DiskError, match=r"SQLite spill store \(temporary, in [^)]+\) is closed"):
        lookup.fetch_many([cid])
    with pytest.raises(DiskError, match=r"SQLite spill store \(temporary, in [^)]+\) is closed"):
        lookup.node(cid)


@pytest.mark.parametrize("node_first", [True, False])
async def test_first_block_wins_between_nodes_and_the_rest(impl: str, node_first: bool) -> None:
    """A CID stored first as a block shaped like a node and later as something else (or the other
    way round: only a CAR with wrong CIDs does that) keeps its first block, in either merged run."""
    cid = dag_cbor_cid(b"twice")
    node = b"\xa2ae\x80al\xf6"
    batches = [[(cid, 0, node)], [(cid, 2, 5)]]
    async with await DiskBuilder().open() as store:
        for rows in batches if node_first else batches[::-1]:
            await store._run(store.put_batch_sync, rows, 10)
        lookup = store.lookup(bytes)
        found = await store._run(lambda: (lookup.node(cid), lookup.fetch_many([cid])))
        assert found == ((node, ([(0, node)], False)) if node_first else (NOT_A_NODE, ([(2, 5)], True)))


async def test_merged_runs_in_many_segments(big_car: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """Look-ups that fall in any segment of a merged run, or across two."""
    import repo_stream.spill.store

    monkeypatch.setattr(repo_stream.spill.store, "_segment_size", lambda total: 10_000)
    async with await DiskBuilder().open() as store:
        _, driver = await (await spill(big_car)).finish_loading(store)
        assert [r async for r in driver] == [(key, len(block)) for key, block in sorted(POSTS)]
        assert sum(len(run) for run in store._merged) > 10  # ~200 KB: the nodes, and a length per record
