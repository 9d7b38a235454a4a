"""Arrow record batches (repo_stream.read.arrow): driver.next_batch and Repo.batches, the C core's
buffers (Arrow C Data Interface) against pyarrow's own constructors and the records' walk."""

from __future__ import annotations

from typing import Any

import pytest

pa = pytest.importorskip("pyarrow", reason="pyarrow (the arrow extra) is not installed")

from repo_stream import DriverBuilder, open_repo  # noqa: E402
from repo_stream.read.arrow import _python_batch, record_batch, schema  # noqa: E402
from repo_stream.records.generate import generate_repo_car  # noqa: E402
from repo_stream.records.json_text import json_text_processor  # noqa: E402

from .conftest import sample_path  # noqa: E402


def car_bytes(tmp_path: Any, n: int) -> bytes:
    path = tmp_path / "repo.car"
    generate_repo_car(path, n, seed=5)
    return bytes(path.read_bytes())


async def walk_items(car: bytes, json_text: bool) -> list[tuple[str, str, Any]]:
    builder: DriverBuilder[Any] = DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True)
    if json_text:
        builder = builder.with_block_processor(json_text_processor())
    driver = await builder.load_car(car)
    return [item async for item in driver]


def as_rows(batches: list[Any]) -> list[tuple[str, str, str, str, Any]]:
    table = pa.Table.from_batches(batches)
    d = table.to_pydict()
    return list(zip(d["key"], d["collection"], d["rkey"], d["cid"], d["value"], strict=True))


@pytest.mark.anyio
@pytest.mark.parametrize("json_text", [False, True])
async def test_next_batch_equals_the_walk(tmp_path: Any, json_text: bool, anyio_backend: str) -> None:
    car = car_bytes(tmp_path, 2500)
    items = await walk_items(car, json_text)
    builder: DriverBuilder[Any] = DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True)
    if json_text:
        builder = builder.with_block_processor(json_text_processor())
    driver = await builder.load_car(car)
    batches = []
    while (batch := await driver.next_batch(1000)) is not None:
        batch.validate(full=True)
        assert batch.schema.equals(schema(json_text))
        batches.append(batch)
    assert [b.num_rows for b in batches] == [1000, 1000, 500]
    want = [(k, k.partition("/")[0], k.partition("/")[2], c, v) for k, c, v in items]
    assert as_rows(batches) == want
    assert len(want) == 2500


@pytest.mark.anyio
async def test_repo_batches_on_a_sample(anyio_backend: str) -> None:
    path = sample_path("little.car")
    async with open_repo(path, values="raw") as repo:
        raw = [b async for b in repo.batches(100)]
    async with open_repo(path, values="json_text") as repo:
        text = [b async for b in repo.batches(100)]
    async with open_repo(path, values="raw") as repo:
        records = [r async for r in repo]
    assert sum(b.num_rows for b in raw) == len(records) == 278
    assert as_rows(raw) == [(r.key, r.collection, r.rkey, r.cid, r.value) for r in records]
    t = pa.Table.from_batches(text)
    assert t.column("key").to_pylist() == [r.key for r in records]
    assert t.schema.field("value").type == pa.utf8()


def test_c_batch_equals_pyarrow_constructors() -> None:
    chunk = [("a.b/1", "bafy1", b"\x01\x02"), ("a.b/22", "bafy2", b""), ("a.b.c/x", "c3", b"zz"), ("a.bc/y", "c4", b"\x00")]
    for json_values in (False, True):
        items = [(k, c, v.hex() + "é") for k, c, v in chunk] if json_values else chunk
        c = record_batch(items, json_values)
        c.validate(full=True)
        assert c.equals(_python_batch(items, json_values))
        assert c.column("collection").dictionary.to_pylist() == ["a.b", "a.b.c", "a.bc"]
    assert record_batch([], False).num_rows == 0


def test_bad_items_are_type_errors() -> None:
    with pytest.raises(TypeError):
        record_batch([("a/1", "c", "text")], False)
    with pytest.raises(TypeError):
        record_batch([("a/1", "c", b"bytes")], True)
    with pytest.raises(TypeError):
        record_batch([("a/1", b"c", b"x")], False)  # type: ignore[list-item]


@pytest.mark.anyio
async def test_batches_of_records_equal_the_records() -> None:
    """open_repo's walk gives Records (five fields): their batches hold the same columns."""
    async with open_repo("fixtures/repo-2000-shuffled.car", values="raw") as repo:
        records = [r async for r in repo]
    batch = record_batch(list(records), json_values=False)
    assert batch.column("key").to_pylist() == [r.key for r in records]
    assert batch.column("collection").to_pylist() == [r.collection for r in records]
    assert batch.column("rkey").to_pylist() == [r.rkey for r in records]
    assert batch.column("cid").to_pylist() == [r.cid for r in records]
    assert batch.column("value").to_pylist() == [r.value for r in records]
