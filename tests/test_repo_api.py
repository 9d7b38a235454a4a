"""The high-level API: open_repo, Record, get_record, and the synchronous iter_records /
get_record_sync, on every kind of source, in memory and spilled, on asyncio and trio.

Expected records are the ones each test builds (keys, blocks, CIDs computed with the project's
writer helpers from the test's own data) or the signed samples' reference dumps, never a walk by
the code under test.
"""

from __future__ import annotations

import gc
import json
import os
import threading
from pathlib import Path
from typing import Any

import anyio
import cbor2
import pytest

import repo_stream
from repo_stream import (
    CarError,
    InvalidKeyError,
    ProcessorError,
    Record,
    RecordDecodeError,
    SignatureError,
    get_record,
    get_record_sync,
    iter_records,
    open_repo,
)
from repo_stream.core.cid import cid_str, dag_cbor_cid

from .conftest import sample_path
from .helpers import DID, REV, repo_car

COLLECTIONS = ["app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.graph.follow"]


def _value(collection: str, i: int) -> dict[str, Any]:
    return {"$type": collection, "text": f"record {i} " + "x" * (i % 50), "n": i}


def _records(n: int) -> list[tuple[str, bytes, dict[str, Any]]]:
    """(key, block, value) of ``n`` records over three collections, in key order."""
    out = []
    for i in range(n):
        collection = COLLECTIONS[i % 3]
        value = _value(collection, i)
        out.append((f"{collection}/3k{i:011d}", cbor2.dumps(value, canonical=True), value))
    return sorted(out)


RECORDS = _records(300)
CAR = repo_car([(key, block) for key, block, _ in RECORDS])
#: Below the CAR's blocks (~30 KB): the repo spills.
SPILL_MB = 8 / 1024


def expected(records: list[tuple[str, bytes, dict[str, Any]]] = RECORDS, **kw: Any) -> list[Record[Any]]:
    values = kw.get("values", "json")
    out = []
    for key, block, value in records:
        collection, _, rkey = key.partition("/")
        shown = {"json": value, "raw": block, "python": value}.get(values, None) if isinstance(values, str) else values(block)
        out.append(Record(key, collection, rkey, cid_str(dag_cbor_cid(block)), shown))
    return out


@pytest.fixture
def spill_dir(tmp_path: Path) -> Path:
    path = tmp_path / "spill"
    path.mkdir()
    return path


@pytest.mark.anyio
@pytest.mark.parametrize("spilled", [False, True])
@pytest.mark.parametrize("values", ["json", "raw", "python", len])
async def test_open_repo_gives_every_record_in_memory_and_spilled(spilled: bool, values: Any, spill_dir: Path) -> None:
    limit = SPILL_MB if spilled else 64
    async with open_repo(CAR, values=values, mem_limit_mb=limit, spill_dir=spill_dir) as repo:
        assert (repo.did, repo.rev, repo.spilled) == (DID, REV, spilled)
        assert repo.commit.did == DID
        assert repo.source is None and not repo.signature_verified
        got = [record async for record in repo]
    assert got == expected(values=values)
    assert os.listdir(spill_dir) == []


@pytest.mark.anyio
async def test_records_are_named_tuples_with_typed_fields() -> None:
    async with open_repo(CAR, values="raw") as repo:
        first = (await repo.next_chunk(1) or [None])[0]
    assert isinstance(first, Record) and isinstance(first, tuple)
    key, collection, rkey, cid, value = first
    assert (key, collection, rkey) == (RECORDS[0][0], "app.bsky.feed.like", RECORDS[0][0].partition("/")[2])
    assert cid == cid_str(dag_cbor_cid(RECORDS[0][1])) and value == RECORDS[0][1]


@pytest.mark.anyio
async def test_record_cids_false_leaves_cid_none() -> None:
    async with open_repo(CAR, values="raw", record_cids=False) as repo:
        got = [record async for record in repo]
    assert got == [record._replace(cid=None) for record in expected(values="raw")]


@pytest.mark.anyio
async def test_collections_select_records(spill_dir: Path) -> None:
    for limit in (64, SPILL_MB):
        async with open_repo(CAR, collections=["app.bsky.feed.post"], mem_limit_mb=limit, spill_dir=spill_dir) as repo:
            got = [record async for record in repo]
        assert got == [r for r in expected() if r.collection == "app.bsky.feed.post"]
        assert len(got) == 100


@pytest.mark.anyio
async def test_every_kind_of_source(tmp_path: Path) -> None:
    path = tmp_path / "repo.car"
    path.write_bytes(CAR)

    async def chunks() -> Any:
        for at in range(0, len(CAR), 1000):
            yield CAR[at : at + 1000]

    async with await anyio.open_file(path, "rb") as async_file:
        with open(path, "rb") as plain_file:
            sources: list[Any] = [str(path), path, CAR, bytearray(CAR), memoryview(CAR), plain_file, async_file, chunks()]
            for source in sources:
                async with open_repo(source, values="raw") as repo:
                    assert [r async for r in repo] == expected(values="raw"), type(source)


@pytest.mark.anyio
async def test_a_record_that_is_not_a_map_is_a_processor_error() -> None:
    blocks = [("app.bsky.feed.post/3kaaaaaaaaaaa", cbor2.dumps(["a", "list"]))]
    car = repo_car(blocks)
    for values in ("json", "python"):
        async with open_repo(car, values=values) as repo:
            with pytest.raises(ProcessorError, match=r"app\.bsky\.feed\.post/3kaaaaaaaaaaa") as info:
                await repo.next_chunk()
        assert isinstance(info.value.__cause__, RecordDecodeError)
        assert "not a map" in str(info.value.__cause__)
    async with open_repo(car, values="raw") as repo:  # raw values are not decoded
        assert [r.value async for r in repo] == [blocks[0][1]]


@pytest.mark.anyio
async def test_errors_surface_on_entering() -> None:
    with pytest.raises(CarError):
        async with open_repo(CAR[: len(CAR) // 2] + b"\xff" * 10):
            pass
    with pytest.raises(ValueError, match="values must be"):
        open_repo(CAR, values="yaml")  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="not a collection NSID"):
        open_repo(CAR, collections=["not an nsid"])
    with pytest.raises(SignatureError):
        open_repo(CAR, verify=True, signing_key="did:key:z")


@pytest.mark.anyio
async def test_cancelled_while_spilled_leaves_no_file(spill_dir: Path) -> None:
    with anyio.move_on_after(5) as scope:
        async with open_repo(CAR, mem_limit_mb=SPILL_MB, spill_dir=spill_dir) as repo:
            assert repo.spilled
            await repo.next_chunk(10)
            scope.cancel()
            await anyio.sleep(1)
    assert scope.cancelled_caught
    assert os.listdir(spill_dir) == []


@pytest.mark.anyio
async def test_open_repo_cannot_be_entered_twice() -> None:
    opener = open_repo(CAR)
    async with opener:
        with pytest.raises(RuntimeError, match="already entered"):
            async with opener:
                pass


@pytest.mark.anyio
async def test_get_record() -> None:
    key = RECORDS[123][0]
    record = await get_record(CAR, key)
    assert record == expected()[123]
    assert (await get_record(CAR, key, values="raw")) == expected(values="raw")[123]
    assert await get_record(CAR, "app.bsky.feed.post/nosuchrkey") is None
    assert await get_record(CAR, "com.example.none/self") is None
    for bad in ("notakey", "app.bsky.feed.post/", "/x", "app.bsky.feed.post/a/b"):
        with pytest.raises(InvalidKeyError):
            await get_record(CAR, bad)


def test_iter_records_without_an_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "repo.car"
    path.write_bytes(CAR)
    assert list(iter_records(str(path))) == expected()
    assert list(iter_records(path, values="raw", collections=["app.bsky.graph.follow"])) == [
        r for r in expected(values="raw") if r.collection == "app.bsky.graph.follow"
    ]
    assert get_record_sync(path, RECORDS[5][0]) == expected()[5]
    assert get_record_sync(path, "app.bsky.feed.post/none") is None
    with pytest.raises(InvalidKeyError):
        get_record_sync(path, "notakey")


def test_iter_records_checks_options_before_iterating() -> None:
    with pytest.raises(ValueError, match="not a collection NSID"):
        iter_records(CAR, collections=["bad nsid"])


def test_iter_records_errors_raise_in_the_caller() -> None:
    with pytest.raises(CarError):
        list(iter_records(CAR[:100]))


def _portal_threads() -> int:
    return sum(1 for t in threading.enumerate() if t is not threading.current_thread() and t.daemon is False)


def test_breaking_out_of_iter_records_stops_the_walk_and_cleans_up(spill_dir: Path) -> None:
    before = _portal_threads()
    records = iter_records(CAR, mem_limit_mb=SPILL_MB, spill_dir=spill_dir)
    for i, record in enumerate(records):
        assert record == expected()[i]
        if i == 10:
            break
    records.close()
    assert os.listdir(spill_dir) == []
    assert _portal_threads() == before
    # Dropped without close: garbage collection closes it.
    dropped = iter_records(CAR, mem_limit_mb=SPILL_MB, spill_dir=spill_dir)
    next(dropped)
    del dropped
    gc.collect()
    assert os.listdir(spill_dir) == []
    assert _portal_threads() == before


@pytest.mark.anyio
async def test_iter_records_inside_a_running_event_loop() -> None:
    """As in a notebook: a plain for loop while an event loop runs in this thread."""
    assert sum(1 for _ in iter_records(CAR)) == len(RECORDS)
    assert get_record_sync(CAR, RECORDS[0][0]) == expected()[0]


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["signed-k256", "signed-p256"])
async def test_signed_samples_verify_with_their_key_and_match_their_dump(name: str) -> None:
    car = sample_path(f"{name}.car")
    meta = json.loads(sample_path(f"{name}.json").read_text())
    other = json.loads(sample_path(("signed-p256" if name == "signed-k256" else "signed-k256") + ".json").read_text())
    dump = [json.loads(line) for line in sample_path(f"{name}.dump.jsonl").read_text().splitlines()]
    for limit in (64, 16 / 1024):
        async with open_repo(car, verify=True, signing_key=meta["signing_key"], mem_limit_mb=limit) as repo:
            assert repo.signature_verified and repo.did == meta["did"] and repo.rev == meta["rev"]
            assert repo.spilled == (limit < 1)
            got = [{"key": r.key, "cid": r.cid, "value": r.value} async for r in repo]
        assert got == dump
    with pytest.raises(SignatureError, match="does not verify"):
        async with open_repo(car, verify=True, signing_key=other["signing_key"]):
            pass
    async with open_repo(car, signing_key=other["signing_key"]) as repo:  # verify=False: not checked
        assert not repo.signature_verified


def test_the_default_limit_spills_a_repo_over_64_mib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CAR over the default 64 MiB spills by itself, gives every record, and leaves nothing in TMPDIR."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    big = [(f"app.bsky.feed.post/3k{i:011d}", cbor2.dumps({"$type": "app.bsky.feed.post", "i": i, "pad": os.urandom(6000)})) for i in range(11_500)]
    path = tmp_path / "big.car"
    path.write_bytes(repo_car(big))
    assert path.stat().st_size > 64 * 2**20
    count = 0
    keys = []
    for record in iter_records(path, values="raw", record_cids=False):
        count += 1
        if count % 1000 == 1:
            keys.append(record.key)
    assert count == len(big)
    assert keys == [big[i][0] for i in range(0, len(big), 1000)]
    assert os.listdir(tmp) == []
    assert repo_stream.DEFAULT_MEM_LIMIT_MB == 64

    async def spills() -> bool:
        async with open_repo(path, values="raw") as repo:
            return repo.spilled

    assert anyio.run(spills)
    assert os.listdir(tmp) == []


def test_the_walk_refuses_a_record_type_that_is_not_a_tuple_subclass() -> None:
    from repo_stream.core import implementation

    impl = implementation.backend()
    table = impl.BlockTable(b"\x01", None, None)
    for bad in (int, dict, "Record", object()):
        with pytest.raises(TypeError, match="record_type must be a tuple subclass"):
            impl.Walker(b"\x01", table, table, record_type=bad)
