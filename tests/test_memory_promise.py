"""The memory limit is a promise (issue 19, items 10 and 11), on both implementations.

Item 10: prefix compression lets an entry of ~23 bytes stand for a key of ~823; the walk keeps an
expanded node as compressed as the node and builds each key only as its record is emitted. Here
the walk's own allocations while it expands such a node and emits its first record are traced
(``tracemalloc`` sees the reference's objects and the C core's ``PyMem`` buffers) and bounded by a
small multiple of the node's bytes; spelling the keys out cost ~75 times them. The peak RSS
figures are benchmarks/walk_memory.py's.

Item 11: processed values are counted at what they cost as Python objects (see
``repo_stream.core.blocks.value_size``); benchmarks/value_memory.py measures peak RSS against limits.
"""

from __future__ import annotations

import hashlib
import sys
import tracemalloc
from typing import Any

import cbor2
import pytest

from repo_stream import DiskBuilder, DriverBuilder, MemoryDriver, NeedDisk
from repo_stream.core import implementation
from repo_stream.core.blocks import value_size
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.records import decode_record, record_json
from repo_stream.records.writer import build_mst, car_bytes, encode_commit

pytestmark = pytest.mark.anyio

DID = "did:plc:memorymemorymemorymemory"
COLLECTION = ".".join(["a" * 63] * 4 + ["b" * 57])  # a valid NSID of 313 characters
RECORD = cbor2.dumps({"$type": "app.bsky.feed.like", "n": 1})
RECORD_CID = b"\x01\x55\x00\x00"  # CIDv1, raw, identity multihash of nothing: 4 bytes in each entry


def layer_of(key: bytes) -> int:
    return (256 - int.from_bytes(hashlib.sha256(key).digest(), "big").bit_length()) >> 1


def long_keys(layer: int, count: int, tag: str) -> list[str]:
    """``count`` increasing keys of ~823 bytes on MST ``layer``, differing in their last bytes."""
    head = f"{COLLECTION}/{'r' * 500}{tag}"
    out = []
    i = 0
    while len(out) < count:
        key = f"{head}{i:08d}"
        if layer_of(key.encode()) == layer:
            out.append(key)
        i += 1
    return out


def long_key_car(keys: list[str]) -> tuple[bytes, int]:
    """A repo CAR of ``keys``, every record the same small block; and its biggest node's size."""
    record_cid = RECORD_CID
    root, nodes = build_mst([(key.encode(), record_cid) for key in sorted(keys)])
    commit = encode_commit(DID, root, "3kaaaaaaaaaaa")
    car = car_bytes([dag_cbor_cid(commit)], [(dag_cbor_cid(commit), commit), *nodes.items(), (record_cid, RECORD)])
    return car, max(len(block) for block in nodes.values())


ONE_NODE = long_keys(0, 4000, "a")
# Layer-1 keys after them: a root on layer 1 whose left subtree is the 4,000-key node, and whose
# entries hang layer-0 subtrees of long keys too.
UPPER = long_keys(1, 40, "b")
BETWEEN = long_keys(0, 400, "c")


async def test_a_node_of_long_keys_is_expanded_within_a_few_times_its_bytes() -> None:
    car, node_bytes = long_key_car(ONE_NODE)
    assert node_bytes < 100_000 and len(ONE_NODE[0]) == 823  # ~23 bytes an entry, 823 a key
    driver = await DriverBuilder().with_mem_limit_mb(64).with_block_processor(len).load_car(car)
    assert isinstance(driver, MemoryDriver)
    tracemalloc.start()
    try:
        first = await driver.next_chunk(1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first == [(ONE_NODE[0], len(RECORD))]
    # Spelled out, the keys alone are 4,000 x 823 bytes = 38 x the node (~75 x with their copies).
    assert peak < 32 * node_bytes, f"walk allocated {peak:,} bytes for a node of {node_bytes:,}"
    rest = [item async for item in driver]
    assert [key for key, _ in rest] == ONE_NODE[1:]


@pytest.mark.parametrize("collections", [None, [COLLECTION], ["a.b.c"]])
@pytest.mark.parametrize("spilled", [False, True])
async def test_long_keys_on_two_layers_walk_exactly(collections: list[str] | None, spilled: bool) -> None:
    keys = ONE_NODE[:2000] + UPPER + BETWEEN
    car, _ = long_key_car(keys)
    builder = DriverBuilder().with_collections(collections).with_mem_limit_mb(0.0001 if spilled else 64)
    loaded = await builder.load_car(car)
    if spilled:
        assert isinstance(loaded, NeedDisk)
        async with await DiskBuilder().open() as store:
            _, disk = await loaded.finish_loading(store)
            got = [item async for item in disk]
    else:
        assert isinstance(loaded, MemoryDriver)
        got = [item async for item in loaded]
    want = [] if collections == ["a.b.c"] else sorted(keys)
    assert [key for key, _ in got] == want
    assert all(value == RECORD for _, value in got)


# --- item 11: processed values are counted at what they cost -----------------------------------


def real_records(n: int) -> list[bytes]:
    """``n`` distinct records of the shapes a real repo holds (posts with facets and embeds, likes,
    follows, reposts), from the project's generator."""
    from repo_stream.records.generate import generate_records

    out = [block for _key, block in generate_records(n, seed=7)]
    assert len(set(out)) == n
    return out


@pytest.mark.parametrize("process", [decode_record, record_json], ids=["decode_record", "record_json"])
async def test_processed_values_are_counted_at_what_they_cost(process: Any) -> None:
    """The table's count for N records processed into containers covers the memory they really
    take (traced), and is not wildly more; counting each block's length covered a fifth of it."""
    blocks = real_records(2000)
    impl = implementation.backend()
    table = impl.BlockTable(b"\x01\x71no root", process, cbor2.dumps)
    cids = [dag_cbor_cid(block) for block in blocks]
    before = table.used
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for cid, block in zip(cids, blocks, strict=True):
            table.add(cid, block)
        traced = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    counted = table.used - before
    raw = sum(len(block) for block in blocks)
    assert len(table) == len(blocks)
    # The values alone (the C table keeps CIDs in an arena tracemalloc does not see).
    values = sum(value_size(process(block)) for block in blocks)
    assert values > 3 * raw  # a decoded record costs several times its block
    assert counted >= values
    assert counted >= 0.9 * traced, f"counted {counted:,} bytes for {traced:,} allocated"
    assert counted <= 3 * traced + 200 * len(blocks)


def test_value_size_counts_every_object_of_a_container() -> None:
    assert value_size(12345) == value_size(None) == value_size(1.5) == 8
    assert value_size(b"abc") == value_size("abc") == 3
    text = "x" * 100
    inner = [text, 7]
    value = {"a": inner, "b": (None,)}
    objects = [value, "a", inner, text, 7, "b", (None,), None]
    assert value_size(value) == sum(sys.getsizeof(o) for o in objects)
    deep: Any = []
    for _ in range(100_000):  # far deeper than the recursion limit: counted without recursing
        deep = [deep]
    assert value_size(deep) == 100_000 * sys.getsizeof([[]]) + sys.getsizeof([])
