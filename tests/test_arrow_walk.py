"""Arrow batches written by the walker itself (``Walker.next_batch``, behind ``driver.next_batch``):
the same records as the tuple walk, exactly (keys, collections, rkeys, CIDs, values), on generated
repos and on the real samples, in memory and spilled, raw and as JSON text, on both
implementations (the ``impl`` fixture); the byte budget that ends a batch; errors in record order.
The C core's and the reference's batches are compared with each other in tests/test_differential.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow (the arrow extra) is not installed")

from repo_stream import DiskBuilder, DriverBuilder, NeedDisk  # noqa: E402
from repo_stream.core.cid import dag_cbor_cid  # noqa: E402
from repo_stream.core.walk import ARROW_ROW_BYTES  # noqa: E402
from repo_stream.errors import ProcessorError, RecordDecodeError  # noqa: E402
from repo_stream.records.generate import generate_repo_car  # noqa: E402
from repo_stream.records.json_text import json_text_processor  # noqa: E402
from repo_stream.records.values import record_json  # noqa: E402
from repo_stream.records.writer import build_repo_car  # noqa: E402

from .conftest import SAMPLES, sample_path  # noqa: E402

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def generated(tmp_path: Path, n: int, seed: int = 3, profile: str = "default") -> bytes:
    path = tmp_path / f"repo-{n}-{seed}.car"
    generate_repo_car(path, n, seed=seed, profile=profile)
    return path.read_bytes()


async def walk_records(car: bytes) -> list[tuple[str, str, bytes]]:
    """The tuple walk: (key, CID text, raw block) of every record, in memory."""
    driver = await DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True).load_car(car)
    assert not isinstance(driver, NeedDisk)
    return [item async for item in driver]


def expected_rows(records: list[tuple[str, str, bytes]], json_text: bool) -> list[tuple[str, str, str, str, Any]]:
    """The batch rows a walk's records must give; JSON text by json.dumps of record_json (not by
    the transcoder under test)."""
    return [
        (k, k.partition("/")[0], k.partition("/")[2], c, _dumps(record_json(v)) if json_text else v) for k, c, v in records
    ]


def rows(batches: list[Any]) -> list[tuple[str, str, str, str, Any]]:
    out: list[tuple[str, str, str, str, Any]] = []
    for batch in batches:
        d = batch.to_pydict()
        out += zip(d["key"], d["collection"], d["rkey"], d["cid"], d["value"], strict=True)
    return out


def batch_bytes(batch: Any) -> int:
    """The bytes a batch counts against its budget, from its columns: keys, rkeys, CID texts and
    values in UTF-8, and ARROW_ROW_BYTES a row."""
    d = batch.to_pydict()
    total = 0
    for key, rkey, cid, value in zip(d["key"], d["rkey"], d["cid"], d["value"], strict=True):
        total += len(key.encode()) + len(rkey.encode()) + len(cid.encode()) + len(value if isinstance(value, bytes) else value.encode())
    return total + ARROW_ROW_BYTES * batch.num_rows


async def batches_of(car: bytes, *, mode: str, values: str | None, processor: bool, n: int, mem_limit_mb: float = 4096) -> list[Any]:
    builder: Any = DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_record_cids(True)
    if processor:
        builder = builder.with_block_processor(json_text_processor())
    json_text = values == "json_text" or (values is None and processor)
    out = []
    if mode == "memory":
        driver = await builder.load_car(car)
        assert not isinstance(driver, NeedDisk)
        while (batch := await driver.next_batch(n, values=values)) is not None:
            out.append(batch)
    else:
        driver = await builder.load_car(car)
        assert isinstance(driver, NeedDisk)
        async with await DiskBuilder().open() as store:
            _commit, disk = await driver.finish_loading(store)
            while (batch := await disk.next_batch(n, values=values)) is not None:
                out.append(batch)
    for batch in out:
        batch.validate(full=True)
        assert batch.schema.field("value").type == (pa.utf8() if json_text else pa.binary())
        assert batch.schema.field("collection").type == pa.dictionary(pa.int32(), pa.utf8())
        assert batch.num_rows > 0
    return out


# (values, processor): raw blocks; JSON text made by the batch's walk; JSON text kept by the processor
KINDS = [("raw", False), ("json_text", False), (None, True)]


@pytest.mark.anyio
@pytest.mark.parametrize(("values", "processor"), KINDS)
async def test_batches_equal_the_walk_in_memory(tmp_path: Path, values: str | None, processor: bool, anyio_backend: str) -> None:
    car = generated(tmp_path, 2500)
    want = expected_rows(await walk_records(car), json_text=values != "raw")
    got = await batches_of(car, mode="memory", values=values, processor=processor, n=1000)
    assert [b.num_rows for b in got] == [1000, 1000, 500]
    assert rows(got) == want
    assert len(want) == 2500


@pytest.mark.anyio
@pytest.mark.parametrize(("values", "processor"), KINDS)
async def test_batches_equal_the_walk_spilled(tmp_path: Path, values: str | None, processor: bool, anyio_backend: str) -> None:
    """Spilled at a 1 MiB limit: a batch also ends at 1 MiB of rows (the memory limit)."""
    car = generated(tmp_path, 6000, profile="default")
    assert len(car) > 2 * 1024 * 1024
    want = expected_rows(await walk_records(car), json_text=values != "raw")
    got = await batches_of(car, mode="spilled", values=values, processor=processor, n=5000, mem_limit_mb=1)
    assert rows(got) == want
    budget = 1024 * 1024
    for batch in got[:-1]:  # each ends at n rows, or after the row that brings it to the budget
        size = batch_bytes(batch)
        assert batch.num_rows == 5000 or (size >= budget and size - batch_bytes(batch.slice(batch.num_rows - 1)) < budget)
    assert any(b.num_rows < 5000 for b in got[:-1])  # the budget did end some


@pytest.mark.anyio
@pytest.mark.parametrize("json_text", [False, True])
async def test_the_byte_budget_ends_a_batch_in_memory(tmp_path: Path, json_text: bool, anyio_backend: str) -> None:
    """The walker's own budget (the driver passes the memory limit): each batch ends after the
    row that brings its bytes to it; one row over a budget smaller than a row."""
    from repo_stream.read.arrow import from_walker

    car = generated(tmp_path, 3000, seed=8)
    records = await walk_records(car)
    for budget in (1, 5000, 200_000):
        driver: Any = await DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True).load_car(car)
        got = []
        while (result := await driver._walk_batch(100000, int(json_text), budget)) is not None:
            got.append(from_walker(result, json_text))
        assert rows(got) == expected_rows(records, json_text)
        for batch in got[:-1]:
            size = batch_bytes(batch)
            assert size >= budget > size - batch_bytes(batch.slice(batch.num_rows - 1))
        if budget == 1:
            assert {b.num_rows for b in got} == {1}
        else:
            assert batch_bytes(got[-1]) - batch_bytes(got[-1].slice(got[-1].num_rows - 1)) < budget


def sample_names() -> list[str]:
    return sorted(p.name for p in SAMPLES.glob("*.car")) if SAMPLES.is_dir() else ["little.car"]


@pytest.mark.anyio
@pytest.mark.parametrize("name", sample_names())
async def test_samples(name: str, anyio_backend: str) -> None:
    car = sample_path(name).read_bytes()
    records = await walk_records(car)
    for values in ("raw", "json_text"):
        got = await batches_of(car, mode="memory", values=values, processor=False, n=97)
        assert rows(got) == expected_rows(records, json_text=values == "json_text")
    dump = sample_path(name).with_suffix(".dump.jsonl")
    if dump.is_file():  # the reference implementation's JSON of each record (made without repo-stream)
        lines = [json.loads(line) for line in dump.read_text().splitlines()]
        text = rows(await batches_of(car, mode="memory", values="json_text", processor=False, n=1000))
        assert [(k, c, json.loads(v)) for k, _coll, _rkey, c, v in text] == [(d["key"], d["cid"], d["value"]) for d in lines]


@pytest.mark.anyio
async def test_samples_spilled(anyio_backend: str) -> None:
    car = sample_path("little.car").read_bytes()
    records = await walk_records(car)
    for values in ("raw", "json_text"):
        got = await batches_of(car, mode="spilled", values=values, processor=False, n=50, mem_limit_mb=0.05)
        assert rows(got) == expected_rows(records, json_text=values == "json_text")
        assert sum(b.num_rows for b in got) == 278


def car_with_a_bad_record(tmp_path: Path) -> tuple[bytes, str, bytes]:
    """A repo whose second record is not DAG-CBOR (a float 16-bit head): (CAR, its key, its CID)."""
    bad = b"\xa1\x61a\xf9\x3c\x00"
    records = [
        ("app.bsky.feed.like/a1", b"\xa1\x61a\x01"),
        ("app.bsky.feed.like/a2", bad),
        ("app.bsky.feed.like/a3", b"\xa1\x61a\x03"),
    ]
    path = tmp_path / "bad.car"
    build_repo_car(records, did="did:plc:arrowtest", rev="3kaaaaaaaaa22", path=path)
    return path.read_bytes(), "app.bsky.feed.like/a2", dag_cbor_cid(bad)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["memory", "spilled"])
async def test_a_record_that_is_not_dagcbor(tmp_path: Path, mode: str, anyio_backend: str) -> None:
    """JSON text of a bad record: ProcessorError (its cause the RecordDecodeError), as the
    transcoder as a block processor gives; raw values pass it as it is."""
    car, key, _cid = car_with_a_bad_record(tmp_path)
    limit = 4096 if mode == "memory" else 0.0001
    with pytest.raises(ProcessorError) as info:
        await batches_of(car, mode=mode, values="json_text", processor=False, n=10, mem_limit_mb=limit)
    assert key in str(info.value)
    assert isinstance(info.value.__cause__, RecordDecodeError)
    assert str(info.value.__cause__).endswith("a CBOR simple value or float DAG-CBOR does not allow (at byte 3)")
    raw = await batches_of(car, mode=mode, values="raw", processor=False, n=10, mem_limit_mb=limit)
    assert rows(raw)[1][4] == b"\xa1\x61a\xf9\x3c\x00"


@pytest.mark.anyio
async def test_the_walker_stays_failed(tmp_path: Path, anyio_backend: str) -> None:
    car, _key, _cid = car_with_a_bad_record(tmp_path)
    driver = await DriverBuilder().with_record_cids(True).load_car(car)
    assert not isinstance(driver, NeedDisk)
    with pytest.raises(ProcessorError) as first:
        await driver.next_batch(10, values="json_text")
    with pytest.raises(ProcessorError) as again:
        await driver.next_batch(10, values="raw")
    assert str(again.value) == str(first.value)


@pytest.mark.anyio
async def test_bad_requests(tmp_path: Path, anyio_backend: str) -> None:
    car = generated(tmp_path, 10)
    driver: Any = await DriverBuilder().load_car(car)
    with pytest.raises(TypeError, match="record CIDs"):
        await driver.next_batch(10)
    driver = await DriverBuilder().with_record_cids(True).with_block_processor(json_text_processor()).load_car(car)
    with pytest.raises(TypeError, match="without a block processor"):
        await driver.next_batch(10, values="raw")
    with pytest.raises(ValueError, match="values must be"):
        await driver.next_batch(10, values="json")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least 1"):
        await driver.next_batch(0)
    driver = await DriverBuilder().with_record_cids(True).with_block_processor(len).load_car(car)
    with pytest.raises(TypeError, match="needs a driver without a block processor"):
        await driver.next_batch(10, values="raw")


@pytest.mark.anyio
async def test_other_processors_keep_the_item_path(tmp_path: Path, anyio_backend: str) -> None:
    """A processor that makes str values (not the transcoder): the walk's items, as before."""
    car = generated(tmp_path, 300)
    records = await walk_records(car)
    driver: Any = await DriverBuilder().with_record_cids(True).with_block_processor(bytes.hex).load_car(car)
    got = []
    while (batch := await driver.next_batch(128)) is not None:
        got.append(batch)
    assert rows(got) == [(k, k.partition("/")[0], k.partition("/")[2], c, v.hex()) for k, c, v in records]


@pytest.mark.anyio
async def test_collections_filter(tmp_path: Path, anyio_backend: str) -> None:
    car = generated(tmp_path, 1500, seed=4)
    records = [r for r in await walk_records(car) if r[0].startswith(("app.bsky.feed.like/", "app.bsky.graph.follow/"))]
    assert records
    driver: Any = (
        await DriverBuilder().with_record_cids(True).with_collections(["app.bsky.feed.like", "app.bsky.graph.follow"]).load_car(car)
    )
    got = []
    while (batch := await driver.next_batch(200, values="json_text")) is not None:
        got.append(batch)
    assert rows(got) == expected_rows(records, json_text=True)
    assert pa.Table.from_batches(got).column("collection").unique().to_pylist() == ["app.bsky.feed.like", "app.bsky.graph.follow"]


# --- dump's JSON lines (driver.next_json_lines: the walker's value_kind 2) ------------------------


async def json_lines(car: bytes, *, mem_limit_mb: float, n: int, processor: bool = False) -> list[bytes]:
    builder: Any = DriverBuilder().with_mem_limit_mb(mem_limit_mb)
    if processor:
        builder = builder.with_block_processor(json_text_processor())
    driver = await builder.load_car(car)
    out = []
    if isinstance(driver, NeedDisk):
        async with await DiskBuilder().open() as store:
            _commit, disk = await driver.finish_loading(store)
            while (lines := await disk.next_json_lines(n)) is not None:
                out.append(lines)
    else:
        while (lines := await driver.next_json_lines(n)) is not None:
            out.append(lines)
    return out


@pytest.mark.anyio
@pytest.mark.parametrize(("mem_limit_mb", "processor"), [(4096, False), (4096, True), (1, False), (1, True)])
async def test_json_lines_are_the_dump_of_each_record(tmp_path: Path, mem_limit_mb: float, processor: bool, anyio_backend: str) -> None:
    """Each line is json.dumps of {key, cid, value: record_json(block)} (the old dump's line)."""
    car = generated(tmp_path, 6000, seed=6)
    records = await walk_records(car)
    chunks = await json_lines(car, mem_limit_mb=mem_limit_mb, n=4000, processor=processor)
    want = [_dumps({"key": k, "cid": c, "value": record_json(v)}) + "\n" for k, c, v in records]
    assert b"".join(chunks) == "".join(want).encode()
    budget = int(mem_limit_mb * 2**20)
    for chunk in chunks[:-1]:  # 4000 lines, or the line that brings the chunk to the budget (the memory limit)
        assert chunk.endswith(b"\n")
        before_last = len(chunk[:-1].rpartition(b"\n")[0]) + 1
        assert chunk.count(b"\n") == 4000 or len(chunk) >= budget > before_last
    if mem_limit_mb == 1:
        assert any(chunk.count(b"\n") < 4000 for chunk in chunks[:-1])


@pytest.mark.anyio
async def test_json_lines_of_the_samples(anyio_backend: str) -> None:
    for name in ("signed-k256.car", "signed-p256.car"):
        path = sample_path(name)
        got = b"".join(await json_lines(path.read_bytes(), mem_limit_mb=64, n=64)).decode().splitlines()
        want = path.with_suffix(".dump.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in got] == [json.loads(line) for line in want]


@pytest.mark.anyio
async def test_json_lines_bad_record_and_processor(tmp_path: Path, anyio_backend: str) -> None:
    car, key, _cid = car_with_a_bad_record(tmp_path)
    with pytest.raises(ProcessorError, match=key):
        await json_lines(car, mem_limit_mb=64, n=10)
    driver: Any = await DriverBuilder().with_block_processor(len).load_car(car)
    with pytest.raises(TypeError, match="without a block processor"):
        await driver.next_json_lines(10)


@pytest.mark.anyio
async def test_spilled_windows_carry_over(tmp_path: Path, anyio_backend: str) -> None:
    """Over the disk store records are walked a window at a time: a batch that ends inside a
    window leaves the rest for the next batch (done is False meanwhile), and next_chunk refuses
    to run past them."""
    car = generated(tmp_path, 300, seed=2)
    records = await walk_records(car)
    driver: Any = await DriverBuilder().with_mem_limit_mb(0.0001).with_record_cids(True).load_car(car)
    assert isinstance(driver, NeedDisk)
    async with await DiskBuilder().open() as store:
        _commit, disk = await driver.finish_loading(store)
        first = await disk.next_batch(10)
        assert first.num_rows == 1  # the budget (the 104-byte memory limit): one record a batch
        assert not disk._walker.done
        with pytest.raises(RuntimeError, match="next_chunk after next_batch"):
            await disk.next_chunk(10)
        rest = [first]
        while (batch := await disk.next_batch(10)) is not None:
            rest.append(batch)
        assert disk._walker.done
    assert rows(rest) == expected_rows(records, json_text=False)


@pytest.mark.anyio
@pytest.mark.parametrize(("values", "processor"), KINDS)
@pytest.mark.parametrize("mode", ["memory", "spilled"])
async def test_batch_value_bytes_counts_the_values_taken(tmp_path: Path, values: str | None, processor: bool, mode: str, anyio_backend: str) -> None:
    """driver.batch_value_bytes: the blocks' lengths (before transcoding), a str value's UTF-8
    length (the processor's JSON text), over the batches so far; JSON lines too."""
    car = generated(tmp_path, 3000)
    records = await walk_records(car)
    if processor:
        want = [len(_dumps(record_json(v)).encode()) for _, _, v in records]
    else:
        want = [len(v) for _, _, v in records]
    builder: Any = DriverBuilder().with_mem_limit_mb(1 if mode == "spilled" else 4096).with_record_cids(True)
    if processor:
        builder = builder.with_block_processor(json_text_processor())
    for lines in (False, True):
        driver = await builder.load_car(car)
        store = None
        if mode == "spilled":
            assert isinstance(driver, NeedDisk)
            store = await DiskBuilder().open()
            _commit, driver = await driver.finish_loading(store)
        try:
            assert driver.batch_value_bytes == 0
            seen = 0
            while True:
                got = await (driver.next_json_lines(700) if lines else driver.next_batch(700, values=values))
                if got is None:
                    break
                seen += got.count(b"\n") if lines else got.num_rows
                assert driver.batch_value_bytes == sum(want[:seen])
            assert seen == 3000 and driver.batch_value_bytes == sum(want)
        finally:
            if store is not None:
                await store.close()
