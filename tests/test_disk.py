"""The SQLite spill store: limits, reuse, cleanup."""

from __future__ import annotations

import anyio
import pytest

from repo_stream import DiskBuilder, DiskError, DriverBuilder, NeedDisk

from .helpers import record, repo_car

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


async def test_temporary_store_is_removed_on_close(big_car: bytes) -> None:
    store = await DiskBuilder().open()
    folder = store.path.parent
    _, driver = await (await spill(big_car)).finish_loading(store)
    assert await driver.next_chunk(5) is not None
    assert store.path.exists()
    await store.close()
    await store.close()  # twice is fine
    assert not folder.exists()


async def test_closed_store_is_refused(big_car: bytes) -> None:
    store = await DiskBuilder().open()
    await store.close()
    with pytest.raises(DiskError, match="is closed"):
        await (await spill(big_car)).finish_loading(store)


async def test_spilled_walk_keeps_memory_bounded(big_car: bytes, monkeypatch) -> None:
    """While finishing, the block table never holds more than the limit (checked before every drain)."""
    from repo_stream import drivers

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
