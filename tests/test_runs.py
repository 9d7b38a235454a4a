"""The spill store's sorted runs: packing, merging and searching, the C core against the reference.

Hypothesis makes batches of spill rows (CIDs that repeat within and across batches, share their
first bytes, differ only in length; every kind of value; payloads past the 8 KiB stored apart),
packs them with both implementations, merges them fed in pieces of every size, and searches the
result. Both must write the same bytes and find, for every CID, the first row stored. Damaged runs
must give the same ``DiskError`` from both.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_stream import DiskError
from repo_stream.core import implementation, runs

pytestmark = pytest.mark.skipif("c" not in implementation.available() and not os.environ.get("CI"), reason="the C core is not built here")

EXAMPLES = int(os.environ.get("REPO_STREAM_FUZZ_EXAMPLES", "300"))
NODE = b"\xa2ae\x80"  # how every MST node starts: {e: [...
IMPLS = ("c", "python")


@pytest.fixture(params=["both"], autouse=True)
def impl(request: pytest.FixtureRequest) -> str:
    """Overrides the per-implementation fixture: these tests use both implementations at once."""
    return str(request.param)


def backend(name: str) -> Any:
    found = implementation.C if name == "c" else implementation.PYTHON
    assert found is not None
    return found


# CIDs from a small alphabet, so that they repeat, share prefixes and differ only in length.
cids = st.binary(min_size=1, max_size=40).map(lambda tail: b"\x01q" + tail[:38]) | st.sampled_from([b"\x01", b"\x01q", b"\x01q\x00"])
plain = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.binary(max_size=30),
    st.none(),
    st.sampled_from(["\u00e9" * 5000, b"\x00" * 9000]),
)
raw = st.one_of(st.binary(max_size=60), st.binary(max_size=60).map(lambda b: NODE + b), st.sampled_from([b"x" * 8193, NODE + b"y" * 9000]))
rows = st.one_of(st.tuples(cids, st.sampled_from([0, 1]), raw), st.tuples(cids, st.just(2), plain))
batches = st.lists(st.lists(rows, max_size=40), min_size=1, max_size=6)


def merge(name: str, packed: list[bytes], every: int, piece: int, split: bool) -> tuple[list[Any], Any]:
    """Merge ``packed`` runs with ``name``'s RunMerge, fed ``piece`` bytes at a time: (what step gave, index)."""
    merger = backend(name).RunMerge(len(packed), every, split)
    at = [0] * len(packed)
    got: list[Any] = []
    while (out := merger.step(300)) is not None:
        if type(out) is int:
            merger.feed(out, packed[out][at[out] : at[out] + piece])
            at[out] += piece
        else:
            got.append(out)
    return got, merger.index() if every else None


def first_rows(batches: list[list[tuple[bytes, int, Any]]]) -> dict[bytes, tuple[int, Any]]:
    """Each CID's first row, as a look-up gives it: kind 0 and 1 as they are, every plain value as kind 2."""
    first: dict[bytes, tuple[int, Any]] = {}
    for batch in batches:
        for cid, kind, data in batch:
            first.setdefault(cid, (kind, data))
    return first


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batches, every=st.sampled_from([0, 1, 64, 1024]), piece=st.sampled_from([1, 5, 64, 65536]), segment=st.sampled_from([1, 7, 1000, 1 << 30]))
def test_both_pack_merge_and_find_the_same(batches: list[list[tuple[bytes, int, Any]]], every: int, piece: int, segment: int) -> None:
    packed: dict[str, list[bytes]] = {}
    large: dict[int, bytes] = {}
    for name in IMPLS:
        packed[name], next_large = [], 1
        for batch in batches:
            run, apart = backend(name).pack_run(batch, next_large)
            packed[name].append(run)
            next_large += len(apart)
            large.update(apart)
    assert packed["c"] == packed["python"]
    for split in (False, True):
        merged = {name: merge(name, packed[name], every, piece, split) for name in IMPLS}
        assert merged["c"][0] == merged["python"][0]
    if not every:
        # No index: the merged runs must be the bytes an indexed merge writes, which are checked
        # against the rows below.
        unindexed = [b"".join(data for number, data in merged["python"][0] if number == k) for k in (0, 1)]
        every = 64
        merged = {name: merge(name, packed[name], every, piece, True) for name in IMPLS}
    else:
        unindexed = None
    pieces, indexes = merged["python"]
    c_indexes = merged["c"][1]
    joined = [b"".join(data for number, data in pieces if number == k) for k in (0, 1)]
    assert unindexed is None or unindexed == joined
    for k in (0, 1):
        for index in (indexes[k], c_indexes[k]):
            index.attach([joined[k][i : i + segment] for i in range(0, len(joined[k]), segment)] or [b""], segment)
            assert index.total == len(joined[k])
    expected = first_rows(batches)
    asked = [*expected, b"\x01q\xff\xff", b"\x00"]
    for k in (0, 1):
        assert indexes[k].get_many(asked) == c_indexes[k].get_many(asked)
    for cid in asked:
        found = [index.get(cid) for index in (*indexes, *c_indexes)]
        assert found[:2] == found[2:]
        assert found[0] is None or found[1] is None  # a CID is in one of the two merged runs
        row = found[0] if found[0] is not None else found[1]
        if row is not None and row[0] & runs.LARGE:
            row = runs.large_value(row[0], large[row[1]])
        if cid not in expected:
            assert row is None
            continue
        kind, data = expected[cid]
        assert row == ((kind, data) if kind < 2 else (2, data))
        is_node = kind == 0 and data.startswith(NODE) and len(data) <= runs.LARGE_PAYLOAD
        assert (found[0] is not None) == is_node


@pytest.mark.parametrize(
    "damage",
    [
        b"\x00\x00\x00\x00\x00\x00",  # a zero CID length
        b"\x02\x09\x00\x00\x00\x00ab",  # kind 9
        b"\x02\x00\x01\x21\x00\x00ab",  # a payload over 8 KiB inline
        b"\x02\x80\x04\x00\x00\x00abcdef",  # a large id of 4 bytes, not 8
        b"\x02\x00\x05\x00\x00\x00ab",  # ends inside its payload
        b"\x02\x00",  # ends inside its head
    ],
)
def test_damaged_runs_give_the_same_disk_error(damage: bytes) -> None:
    good, _ = runs.pack_run([(b"\x01q\x01", 2, 5)], 1)
    errors = []
    for name in IMPLS:
        with pytest.raises(DiskError, match="spill store damaged: run 1 does not read back as sorted entries at byte") as caught:
            merge(name, [good, damage], 0, 3, False)
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


@pytest.mark.parametrize("name", IMPLS)
def test_damaged_merged_run_gives_a_disk_error(name: str) -> None:
    packed, _ = runs.pack_run([(b"\x01q\x01", 2, 5), (b"\x01q\x02", 2, "x")], 1)
    _, index = merge(name, [packed], 1, 64, False)
    index.attach([packed[:-3]], 1 << 20)  # shorter than the index says
    with pytest.raises(DiskError, match="spill store damaged: the merged run does not read back"):
        index.get(b"\x01q\x02")
    index.attach([packed.replace(b"\x04\x01\x00", b"\x04\x09\x00")], 1 << 20)  # a str entry's kind made 9
    with pytest.raises(DiskError, match="spill store damaged"):
        index.get(b"\x01q\x02")


@pytest.mark.parametrize("name", IMPLS)
def test_merge_api_misuse(name: str) -> None:
    merger = backend(name).RunMerge(1, 64)
    with pytest.raises(ValueError, match="not over"):
        merger.index()
    with pytest.raises(IndexError):
        merger.feed(1, b"x")
    merger.feed(0, b"")
    with pytest.raises(ValueError, match="run 0 has ended"):
        merger.feed(0, b"x")
    assert merger.step(10) is None
    index = merger.index()
    assert len(index) == 0 and index.get(b"\x01q") is None
