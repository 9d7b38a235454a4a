"""The block processor rule, processed-value codecs and the memory limit's accounting."""

from __future__ import annotations

import dataclasses

import cbor2
import pytest

from repo_stream import DiskBuilder, DriverBuilder, MemoryDriver, NeedDisk, ProcessorError
from repo_stream.core.cid import cid_str, dag_cbor_cid

from .helpers import record, repo_car, walk_both

pytestmark = pytest.mark.anyio

EMPTY_NODE = bytes.fromhex("a2616580616cf6")  # {"e": [], "l": null}


class Counting:
    """A processor that counts its calls and returns the block length."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, block: bytes) -> int:
        self.calls.append(block)
        return len(block)


async def test_node_shaped_record_is_kept_raw_and_processed_when_emitted() -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(5)]
    odd = ("com.example.thing/node-shaped", EMPTY_NODE)
    car = repo_car([*posts, odd])
    counting = Counting()
    driver = await DriverBuilder().with_block_processor(counting).load_car(car)
    assert isinstance(driver, MemoryDriver)
    # At load time: the five posts only (not the commit, not the MST nodes, not the node-shaped record).
    assert sorted(counting.calls) == sorted(block for _, block in posts)
    records = [r async for r in driver]
    assert records == sorted([(key, len(block)) for key, block in posts] + [(odd[0], 7)])
    assert counting.calls[-1] == EMPTY_NODE


async def test_processor_error_on_unemitted_block_is_never_raised() -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(3)]
    poison = cbor2.dumps({"$type": "poison"})
    car = repo_car(posts, extra_blocks=[(dag_cbor_cid(poison), poison)])

    def process(block: bytes) -> int:
        if block == poison:
            raise ValueError("poisoned")
        return len(block)

    in_memory, on_disk = await walk_both(car, DriverBuilder().with_block_processor(process))
    expected = [(key, len(block)) for key, block in posts]
    assert in_memory == expected
    assert on_disk == expected


@pytest.mark.parametrize("spilled", [False, True], ids=["memory", "disk"])
async def test_processor_error_on_emitted_record_names_key_and_cid(spilled: bool) -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(3)]
    bad_key, bad_block = posts[1]

    def process(block: bytes) -> int:
        if block == bad_block:
            raise ValueError("cannot handle this one")
        return len(block)

    car = repo_car(posts)
    builder = DriverBuilder().with_block_processor(process).with_mem_limit_mb(0.0001 if spilled else 64)
    driver = await builder.load_car(car)
    assert isinstance(driver, NeedDisk) is spilled
    async with await DiskBuilder().open() as store:
        if spilled:
            _, driver = await driver.finish_loading(store)
        first = await driver.next_chunk(1)
        assert first == [(posts[0][0], len(posts[0][1]))]
        with pytest.raises(ProcessorError) as info:
            await driver.next_chunk(10)
    assert type(info.value) is ProcessorError
    assert bad_key in str(info.value)
    assert cid_str(dag_cbor_cid(bad_block)) in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


async def test_processed_dicts_round_trip_through_disk() -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(20)]
    in_memory, on_disk = await walk_both(repo_car(posts), DriverBuilder().with_block_processor(cbor2.loads))
    assert in_memory == [(key, cbor2.loads(block)) for key, block in posts]
    assert on_disk == in_memory


@dataclasses.dataclass(frozen=True)
class Summary:
    kind: str
    size: int


def summarise(block: bytes) -> Summary:
    return Summary(cbor2.loads(block)["$type"], len(block))


async def test_custom_codec_for_other_value_types() -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(20)]
    encode = lambda s: f"{s.kind}|{s.size}".encode()  # noqa: E731
    decode = lambda b: Summary(b.decode().split("|")[0], int(b.decode().split("|")[1]))  # noqa: E731
    builder = DriverBuilder().with_block_processor(summarise).with_codec(encode, decode)
    in_memory, on_disk = await walk_both(repo_car(posts), builder)
    expected = [(key, Summary("app.bsky.feed.post", len(block))) for key, block in posts]
    assert in_memory == expected
    assert on_disk == expected


async def test_memory_limit_counts_processed_size_not_raw_size() -> None:
    # 300 records of ~1 KB: ~300 KB raw, but ~300 * (8 + overhead) bytes once processed by len.
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record("x" * 1000 + str(i))) for i in range(300)]
    car = repo_car(posts)
    limit_mb = 150_000 / 1024 / 1024
    assert isinstance(await DriverBuilder().with_mem_limit_mb(limit_mb).load_car(car), NeedDisk)
    driver = await DriverBuilder().with_mem_limit_mb(limit_mb).with_block_processor(len).load_car(car)
    assert isinstance(driver, MemoryDriver)
    assert [r async for r in driver] == [(key, len(block)) for key, block in posts]


async def test_need_disk_reports_commit_only_once_seen() -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record("y" * 500 + str(i))) for i in range(50)]
    forward = repo_car(posts)  # commit first
    backward = repo_car(posts, order="reverse")  # commit last
    limit = 2000 / 1024 / 1024
    early = await DriverBuilder().with_mem_limit_mb(limit).load_car(forward)
    late = await DriverBuilder().with_mem_limit_mb(limit).load_car(backward)
    assert isinstance(early, NeedDisk) and isinstance(late, NeedDisk)
    assert early.commit is not None and early.commit.did == "did:plc:testtesttesttesttesttest"
    assert late.commit is None
    assert str(early.commit_cid) == str(late.commit_cid)


@pytest.mark.parametrize(
    "process",
    [
        len,
        lambda b: b[:4],
        lambda b: b.hex(),
        lambda b: None,
        lambda b: 1.5,
        lambda b: True,
        lambda b: -(2**63),
        lambda b: 2**70 + len(b),
        lambda b: [len(b), b[:2]],
    ],
    ids=["int", "bytes", "str", "none", "float", "bool", "int64-min", "bigint", "list"],
)
async def test_processed_scalars_keep_their_type_on_disk(process) -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(10)]
    in_memory, on_disk = await walk_both(repo_car(posts), DriverBuilder().with_block_processor(process))
    expected = [(key, process(block)) for key, block in posts]
    assert in_memory == expected
    assert on_disk == expected
    assert [type(v) for _, v in on_disk] == [type(v) for _, v in expected]


async def test_spilled_container_values_are_encoded_once() -> None:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(200)]
    calls = []

    def encode(value: object) -> bytes:
        calls.append(value)
        return cbor2.dumps(value)

    builder = DriverBuilder().with_block_processor(cbor2.loads).with_codec(encode, cbor2.loads)
    driver = await builder.with_mem_limit_mb(0.0001).load_car(repo_car(posts))
    assert isinstance(driver, NeedDisk)
    async with await DiskBuilder().open() as store:
        _, disk = await driver.finish_loading(store)
        assert [r async for r in disk] == [(key, cbor2.loads(block)) for key, block in posts]
    assert len(calls) == len(posts)
