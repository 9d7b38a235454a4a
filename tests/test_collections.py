"""``DriverBuilder.with_collections``: only the chosen collections' records, and fewer MST nodes.

Expected figures come from ``fixtures/expected.json`` (written by the generator, not by the
reader); the filtered records must equal the full walk's records of those collections, in memory
and spilled, on both implementations.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from repo_stream import DiskBuilder, DriverBuilder, NeedDisk

ROOT = Path(__file__).resolve().parents[1]
CAR = (ROOT / "fixtures" / "repo-2000-shuffled.car").read_bytes()
EXPECTED = json.loads((ROOT / "fixtures" / "expected.json").read_text())["repo-2000-shuffled.car"]

pytestmark = pytest.mark.anyio


async def _walk(collections: Any, *, spilled: bool = False) -> tuple[list[tuple[str, Any]], int]:
    builder: DriverBuilder[Any] = DriverBuilder().with_block_processor(len).with_collections(collections)
    if not spilled:
        driver = await builder.with_mem_limit_mb(256).load_car(CAR)
        assert not isinstance(driver, NeedDisk)
        return [r async for r in driver], driver.nodes_visited
    driver = await builder.with_mem_limit_mb(0.05).load_car(CAR)
    assert isinstance(driver, NeedDisk)
    async with await DiskBuilder().open() as store:
        _, disk = await driver.finish_loading(store)
        return [r async for r in disk], disk.nodes_visited


@pytest.mark.parametrize("spilled", [False, True], ids=["memory", "spilled"])
@pytest.mark.parametrize(
    "wanted",
    [
        ["app.bsky.actor.profile"],
        ["app.bsky.feed.like"],
        ["app.bsky.graph.follow", "app.bsky.feed.repost"],
        ["sh.tangled.feed.star", "app.bsky.actor.profile", "pub.leaflet.document"],
        ["com.example.absent"],
        ["app.bsky.feed"],  # a prefix of real collections is another collection: nothing
    ],
)
async def test_filtered_walk_is_the_full_walk_restricted(wanted: list[str], spilled: bool) -> None:
    full, full_nodes = await _walk(None, spilled=spilled)
    assert len(full) == EXPECTED["records"]
    got, nodes = await _walk(wanted, spilled=spilled)
    assert got == [(k, v) for k, v in full if k.partition("/")[0] in wanted]
    assert len(got) == sum(EXPECTED["collections"].get(c, 0) for c in wanted)
    assert 1 <= nodes <= full_nodes


async def test_a_small_collection_reads_few_nodes() -> None:
    _, full_nodes = await _walk(None)
    profile, nodes = await _walk(["app.bsky.actor.profile"])
    assert [k for k, _ in profile] == ["app.bsky.actor.profile/self"]
    # One path from the root down to the key, plus its neighbours' subtrees at most.
    assert nodes * 10 < full_nodes, (nodes, full_nodes)


async def test_all_collections_visit_every_node() -> None:
    full, full_nodes = await _walk(None)
    every, nodes = await _walk(list(EXPECTED["collections"]))
    assert every == full
    assert nodes == full_nodes


def test_names_must_be_nsids() -> None:
    with pytest.raises(ValueError, match=r"not a collection NSID: 'app\.bsky'"):
        DriverBuilder().with_collections(["app.bsky", "app.bsky.feed.post"])
    assert DriverBuilder().with_collections(None)._collections is None
