"""CID verification mode: block hashes, and the strict DAG-CBOR check of the commit."""

from __future__ import annotations

import cbor2
import pytest

from repo_stream import CommitError, DriverBuilder, MemoryDriver
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.records.writer import build_mst, car_bytes, link

from .helpers import DID, REV, record

pytestmark = pytest.mark.anyio


def car_with_commit_encoded(canonical: bool) -> tuple[bytes, list[tuple[str, bytes]]]:
    posts = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(3)]
    root, nodes = build_mst(sorted((k.encode(), dag_cbor_cid(b)) for k, b in posts))
    fields = {"did": DID, "version": 3, "data": link(root), "rev": REV, "prev": None, "sig": b"\x01" * 64}
    if canonical:
        commit = cbor2.dumps(fields, canonical=True)
    else:  # the same map, keys in insertion order: valid CBOR, not canonical DAG-CBOR
        commit = cbor2.dumps(fields)
        assert commit != cbor2.dumps(fields, canonical=True)
    cid = dag_cbor_cid(commit)
    blocks = [(cid, commit), *nodes.items(), *((dag_cbor_cid(b), b) for _, b in posts)]
    return car_bytes([cid], blocks), posts


async def test_non_canonical_commit_is_refused_only_when_verifying() -> None:
    car, posts = car_with_commit_encoded(canonical=False)
    driver = await DriverBuilder().load_car(car)
    assert isinstance(driver, MemoryDriver)
    assert [r async for r in driver] == posts
    with pytest.raises(CommitError, match="not canonical DAG-CBOR") as info:
        await DriverBuilder().with_verify_cids(True).load_car(car)
    assert type(info.value) is CommitError


async def test_canonical_commit_passes_verification() -> None:
    car, posts = car_with_commit_encoded(canonical=True)
    driver = await DriverBuilder().with_verify_cids(True).load_car(car)
    assert isinstance(driver, MemoryDriver)
    assert driver.commit.sig == b"\x01" * 64
    assert [r async for r in driver] == posts
