"""Small builders and walkers shared by the tests."""

from __future__ import annotations

from typing import Any

import cbor2

from repo_stream import DiskBuilder, DriverBuilder, NeedDisk
from repo_stream.cid import dag_cbor_cid
from repo_stream.writer import build_mst, car_bytes, encode_commit

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
