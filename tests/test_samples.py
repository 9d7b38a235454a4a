"""Real repo CARs from ../shared/car-samples walk to the figures in that folder's README.

The expected numbers below are copied from ../shared/car-samples/README.md (counted by others,
not by this code).
"""

from __future__ import annotations

import itertools

import anyio
import pytest

from repo_stream import DiskBuilder, DriverBuilder, MemoryDriver, NeedDisk

from .conftest import sample_path

pytestmark = pytest.mark.anyio

# file -> (records, sum of record block lengths, has app.bsky.actor.profile/self)
EXPECTED = {
    "empty.car": (0, 0, False),
    "tiny.car": (8, 2071, True),
    "little.car": (278, 246960, True),
}


async def walk(data: bytes, mem_limit_mb: float, processor=None):
    """Return (driver kind, commit, [(key, value)]) for a whole walk of ``data``."""
    builder = DriverBuilder().with_mem_limit_mb(mem_limit_mb)
    if processor is not None:
        builder = builder.with_block_processor(processor)
    driver = await builder.load_car(data)
    kind = type(driver).__name__
    if isinstance(driver, NeedDisk):
        async with await DiskBuilder().open() as store:
            commit, disk = await driver.finish_loading(store)
            records = [record async for record in disk]
            return kind, commit, records
    assert isinstance(driver, MemoryDriver)
    return kind, driver.commit, [record async for record in driver]


@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_sample_counts_in_memory_and_spilled(name: str) -> None:
    data = sample_path(name).read_bytes()
    count, total, has_profile = EXPECTED[name]

    kind, commit, records = await walk(data, 64, len)
    assert kind == "MemoryDriver"
    assert len(records) == count
    assert sum(size for _, size in records) == total
    assert ("app.bsky.actor.profile/self" in dict(records)) is has_profile
    keys = [key for key, _ in records]
    assert all(a < b for a, b in itertools.pairwise(keys)), "keys must be strictly increasing"

    # A limit far below the CAR's size forces a spill (except for the 329-byte empty repo).
    spilled_kind, spilled_commit, spilled = await walk(data, 0.0001, len)
    assert spilled_kind == "NeedDisk"
    assert spilled == records
    assert spilled_commit == commit


@pytest.mark.parametrize("name", ["tiny.car", "little.car"])
async def test_sample_raw_values_identical_in_both_modes(name: str) -> None:
    data = sample_path(name).read_bytes()
    _, _, in_memory = await walk(data, 64)
    _, _, on_disk = await walk(data, 0.0001)
    assert on_disk == in_memory
    assert all(type(value) is bytes for _, value in in_memory)
    assert sum(len(value) for _, value in in_memory) == EXPECTED[name][1]


async def test_sample_streamed_in_small_reads() -> None:
    path = sample_path("little.car")
    async with await anyio.open_file(path, "rb") as f:
        driver = await DriverBuilder().with_read_size(1000).with_block_processor(len).load_car(f)
        assert isinstance(driver, MemoryDriver)
        records = [r async for r in driver]
    assert len(records) == 278
    assert sum(v for _, v in records) == 246960
    assert driver.bytes_read == 285929
