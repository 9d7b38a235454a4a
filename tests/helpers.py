"""Small builders and walkers shared by the tests."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import anyio
import cbor2
import pytest

from repo_stream import DiskBuilder, DriverBuilder, MemoryDriver, NeedDisk
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.records.writer import build_mst, car_bytes, encode_commit

DID = "did:plc:testtesttesttesttesttest"
REV = "3kaaaaaaaaaaa"


def record(text: str, kind: str = "app.bsky.feed.post") -> bytes:
    """A small DAG-CBOR record block."""
    return cbor2.dumps({"$type": kind, "text": text, "createdAt": "2024-01-01T00:00:00Z"}, canonical=True)


def repo_car(records: list[tuple[str, bytes]], extra_blocks: list[tuple[bytes, bytes]] = (), order: str = "preorder") -> bytes:
    """A canonical repo CAR of ``records`` (key, block), with ``extra_blocks`` appended unreferenced."""
    pairs = sorted((key.encode(), dag_cbor_cid(block)) for key, block in records)
    root, nodes = build_mst(pairs)
    commit = encode_commit(DID, root, REV)
    blocks = [(dag_cbor_cid(commit), commit), *nodes.items()]
    seen = set()
    for _, block in records:
        cid = dag_cbor_cid(block)
        if cid not in seen:
            seen.add(cid)
            blocks.append((cid, block))
    blocks.extend(extra_blocks)
    if order == "reverse":
        blocks.reverse()
    return car_bytes([dag_cbor_cid(commit)], blocks)


async def walk_both(car: bytes, builder: DriverBuilder[Any] | None = None) -> tuple[list, list]:
    """Walk ``car`` in memory and spilled (a 100-byte limit); return both record lists.

    The builder's settings (processor, codec, ...) are used for both walks.
    """
    builder = builder or DriverBuilder()
    builder.with_mem_limit_mb(1024)
    memory = await builder.load_car(car)
    assert not isinstance(memory, NeedDisk)
    in_memory = [r async for r in memory]
    builder.with_mem_limit_mb(100 / 1024 / 1024)
    spill = await builder.load_car(car)
    assert isinstance(spill, NeedDisk)
    async with await DiskBuilder().open() as store:
        _, disk = await spill.finish_loading(store)
        on_disk = [r async for r in disk]
    return in_memory, on_disk


Configure = Callable[[DriverBuilder[Any]], DriverBuilder[Any]]


async def walk(
    mode: str,
    car: bytes,
    configure: Configure | None = None,
    *,
    limit_mb: float = 0.0001,
    read_size: int | None = None,
    timeout: float = 20,
) -> list[tuple[str, Any]]:
    """All records of ``car``, walked in memory (``mode="memory"``) or spilled to disk
    (``"spilled"``, at ``limit_mb``, which must make it spill); errors propagate from loading,
    finishing the load, or walking. A walk that loops is cut off after ``timeout`` seconds."""
    builder: DriverBuilder[Any] = DriverBuilder()
    if configure is not None:
        builder = configure(builder)
    with anyio.fail_after(timeout):
        if mode == "memory":
            driver = await builder.load_car(car)
            assert isinstance(driver, MemoryDriver)
            return [r async for r in driver]
        assert mode == "spilled"
        builder = builder.with_mem_limit_mb(limit_mb)
        if read_size is not None:
            builder = builder.with_read_size(read_size)
        spill = await builder.load_car(car)
        assert isinstance(spill, NeedDisk), "a spilled walk must spill"
        async with await DiskBuilder().open() as store:
            _commit, disk = await spill.finish_loading(store)
            return [r async for r in disk]


async def walk_error(mode: str, car: bytes, cls: type[Exception], configure: Configure | None = None, **options: Any) -> Exception:
    """Walk ``car`` (see :func:`walk`) and check it fails with exactly ``cls``; return the error."""
    with pytest.raises(cls) as info:
        await walk(mode, car, configure, **options)
    assert type(info.value) is cls, f"expected exactly {cls.__name__}, got {type(info.value).__name__}: {info.value}"
    return info.value


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """A test-side LEB128 reader, independent of repo_stream.core.car: ``(value, next_pos)``."""
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def sqlite_temp_files(pid: int | str = "self") -> dict[str, int]:
    """SQLite temporary files (``etilqs_*``, or the store's own ``repo-stream-*``) process ``pid`` has open: ``{fd target: size in bytes}``.

    An unlinked file's target ends with `` (deleted)``. Linux only: skips the test elsewhere.
    """
    fd_dir = f"/proc/{pid}/fd"
    if not os.path.isdir(fd_dir):
        pytest.skip("needs /proc/<pid>/fd (Linux)")
    found = {}
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            if "etilqs_" in target or "/repo-stream-" in target:
                found[target] = os.stat(f"{fd_dir}/{fd}").st_size
        except OSError:  # closed meanwhile
            continue
    return found
