"""Differential tests: the C core and the pure-Python reference on the same bytes.

Hypothesis mutates valid repo CARs (the mutations of ``tests/test_properties.py``, plus node
level ones: entries rewritten with other prefixes, keys, links and map shapes) and walks each
input with both implementations, in memory and spilled, with and without verification and with a
processor. They must give identical records, or the identical error class with the identical
message, compared in full (a node that does not decode names the same first problem in the same
words: the reference reads it as the C core does, in ``repo_stream.core.walk.node_problem``).
"""

from __future__ import annotations

import functools
import os
from base64 import b32encode
from typing import Any

import anyio
import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from repo_stream import DiskBuilder, DriverBuilder, NeedDisk, RepoStreamError
from repo_stream.core import implementation
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.records.writer import encode_varint

from .helpers import read_varint
from .test_properties import (
    BASES,
    DEFAULT_READ_SIZE,
    TIME_LIMIT,
    duplicated,
    flipped,
    fuzz_settings,
    removed,
    reordered,
    spliced,
    truncated,
)

EXAMPLES = int(os.environ.get("REPO_STREAM_FUZZ_EXAMPLES", "500"))

pytestmark = pytest.mark.skipif("c" not in implementation.available() and not os.environ.get("CI"), reason="the C core is not built here")


@pytest.fixture(params=["both"], autouse=True)
def impl(request: pytest.FixtureRequest) -> str:
    """Overrides the per-implementation fixture: these tests switch implementations themselves."""
    return str(request.param)


def _result(exc: RepoStreamError) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


COLLECTIONS = ["app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.graph.follow", "app.bsky.actor.profile", "com.example.none"]
collection_sets = st.one_of(st.none(), st.lists(st.sampled_from(COLLECTIONS), min_size=1, max_size=3, unique=True))


async def _walk(car: bytes, mode: str, verify: bool, read_size: int, use_len: bool, record_cids: bool, collections: Any) -> Any:
    builder: DriverBuilder[Any] = (
        DriverBuilder()
        .with_verify_cids(verify)
        .with_read_size(read_size)
        .with_record_cids(record_cids)
        .with_collections(collections)
    )
    if use_len:
        builder = builder.with_block_processor(len)
    out: list[Any] = []
    try:
        with anyio.fail_after(TIME_LIMIT):
            if mode == "memory":
                driver = await builder.load_car(car)
                assert not isinstance(driver, NeedDisk)
                async for item in driver:
                    out.append(item)
                return ("records", out, driver.nodes_visited)
            driver = await builder.with_mem_limit_mb(0.0001).load_car(car)
            if not isinstance(driver, NeedDisk):
                async for item in driver:
                    out.append(item)
                return ("records", out, driver.nodes_visited)
            async with await DiskBuilder().open() as store:
                _commit, disk = await driver.finish_loading(store)
                async for item in disk:
                    out.append(item)
                return ("records", out, disk.nodes_visited)
    except RepoStreamError as exc:
        # Records emitted before the error must agree too.
        return ("error", _result(exc), out)


def both(
    car: bytes,
    *,
    mode: str = "memory",
    verify: bool = False,
    read_size: int = DEFAULT_READ_SIZE,
    use_len: bool = False,
    record_cids: bool = False,
    collections: Any = None,
) -> Any:
    results = []
    before = implementation.backend().name
    try:
        for name in ("c", "python"):
            implementation.use(name)
            results.append(anyio.run(functools.partial(_walk, car, mode, verify, read_size, use_len, record_cids, collections), backend="asyncio"))
    finally:
        implementation.use(before)
    c, python = results
    assert c == python, f"C core {c!r:.600}\n  reference {python!r:.600}"
    return c


# --- node-level mutations: a node block rewritten, its CID recomputed -------------------------------


@st.composite
def node_rewritten(draw: st.DrawFn) -> bytes:
    """A base CAR with one MST node decoded, changed, re-encoded and re-linked by its new CID."""
    base = draw(st.sampled_from([b for b in BASES if b.records]))
    header, sections = base.parts
    blocks = []
    for section in sections:
        n, q = read_varint(section, 0)
        cid, block = section[q : q + 36], section[q + 36 : q + n]
        blocks.append((cid, block))
    nodes = [(i, c, b) for i, (c, b) in enumerate(blocks) if b.startswith(b"\xa2ae")]
    _i, old_cid, block = draw(st.sampled_from(nodes))
    node = cbor2.loads(block)
    kind = draw(st.sampled_from(["p", "k", "v", "t", "l", "drop", "swap", "extra-key", "wide-int"]))
    entries = node["e"]
    if entries:
        j = draw(st.integers(0, len(entries) - 1))
        entry = entries[j]
        if kind == "p":
            entry["p"] = draw(st.integers(-3, 600))
        elif kind == "k":
            entry["k"] = draw(st.binary(max_size=40)) if draw(st.booleans()) else entry["k"] + draw(st.binary(min_size=1, max_size=3))
        elif kind == "v":
            entry["v"] = draw(st.sampled_from([None, 5, b"x", cbor2.CBORTag(42, b"\x00" + dag_cbor_cid(b"nothing")), cbor2.CBORTag(42, b"\x00\x01\x55\x12\x20" + bytes(32))]))
        elif kind == "t":
            entry["t"] = draw(st.sampled_from([None, cbor2.CBORTag(42, b"\x00" + old_cid), cbor2.CBORTag(42, b"\x00" + dag_cbor_cid(b"gone"))]))
        elif kind == "drop":
            del entries[j]
        elif kind == "swap" and len(entries) > 1:
            k2 = draw(st.integers(0, len(entries) - 1))
            entries[j], entries[k2] = entries[k2], entries[j]
        elif kind == "extra-key":
            entry[draw(st.sampled_from(["x", "p2"]))] = 1
    if kind == "l":
        node["l"] = draw(st.sampled_from([None, cbor2.CBORTag(42, b"\x00" + old_cid), cbor2.CBORTag(42, b"\x00" + dag_cbor_cid(b"gone")), 7]))
    new = cbor2.dumps(node, canonical=True)
    if kind == "wide-int":
        new = new.replace(b"\x61p\x00", b"\x61p\x18\x00", 1)  # a non-minimal p = 0
    new_cid = dag_cbor_cid(new)
    # The node under its new CID; its parent (or the commit) re-linked to it, keeping its own
    # label (so with verification that parent no longer matches its CID: an error in both).
    out = [(new_cid, new) if c == old_cid else (c, b.replace(b"\x00" + old_cid, b"\x00" + new_cid)) for c, b in blocks]
    return header + b"".join(encode_varint(len(c) + len(b)) + c + b for c, b in out)


any_input = st.one_of(
    reordered().map(lambda c: c[1]),
    duplicated().map(lambda c: c[1]),
    removed().map(lambda c: c[1]),
    truncated().map(lambda c: c[0].car[: c[1]]),
    flipped().map(lambda c: c[1]),
    spliced().map(lambda c: c[1]),
    node_rewritten(),
)


@fuzz_settings(EXAMPLES)
@given(any_input, st.booleans(), st.booleans(), st.booleans(), st.sampled_from([1, 16, 4096, DEFAULT_READ_SIZE]), collection_sets)
def test_c_and_python_agree_in_memory(car: bytes, verify: bool, use_len: bool, record_cids: bool, read_size: int, collections: Any) -> None:
    both(car, verify=verify, use_len=use_len, record_cids=record_cids, read_size=read_size, collections=collections)


@fuzz_settings(max(5, EXAMPLES // 4))
@given(any_input, st.booleans(), st.booleans(), st.sampled_from([16, DEFAULT_READ_SIZE]), collection_sets)
def test_c_and_python_agree_spilled(car: bytes, verify: bool, use_len: bool, read_size: int, collections: Any) -> None:
    both(car, mode="spilled", verify=verify, use_len=use_len, read_size=read_size, collections=collections)


@pytest.mark.parametrize("base", BASES, ids=[b.name for b in BASES])
def test_bases_agree_with_record_cids(base: Any) -> None:
    got = both(base.car, record_cids=True)
    assert got[0] == "records"
    assert [(k, cid) for k, cid, _v in got[1]] == [(k, "b" + b32encode(dag_cbor_cid(v)).decode().lower().rstrip("=")) for k, v in base.records]
    assert [v for _k, _cid, v in got[1]] == [v for _k, v in base.records]


# --- Arrow batches written by the walker (Walker.next_batch) -----------------------------------------


async def _batches(car: bytes, mode: str, verify: bool, kind: int, n: int, budget: int, collections: Any) -> Any:
    """Every batch of a walk (its rows, and the batch itself for equals()), or the error; kind 2:
    the JSON lines."""
    from repo_stream.read.arrow import from_walker

    builder: DriverBuilder[Any] = DriverBuilder().with_verify_cids(verify).with_record_cids(True).with_collections(collections)
    out: list[Any] = []
    try:
        with anyio.fail_after(TIME_LIMIT):
            driver: Any = await builder.with_mem_limit_mb(4096 if mode == "memory" else 0.0001).load_car(car)
            if isinstance(driver, NeedDisk):
                store = await DiskBuilder().open()
                _commit, driver = await driver.finish_loading(store)
            else:
                store = None
            try:
                while (result := await driver._walk_batch(n, kind, budget)) is not None:
                    if kind == 2:
                        assert type(result) is bytes and result.endswith(b"\n")
                        out.append(result)
                        continue
                    batch = from_walker(result, kind == 1)
                    batch.validate(full=True)
                    out.append(batch)
            finally:
                if store is not None:
                    await store.close()
            return ("batches", [b if kind == 2 else b.to_pydict() for b in out], out)
    except RepoStreamError as exc:
        return ("error", _result(exc), [b if kind == 2 else b.to_pydict() for b in out])


@fuzz_settings(max(5, EXAMPLES // 4))
@given(any_input, st.sampled_from(["memory", "spilled"]), st.booleans(), st.sampled_from([0, 1, 2]), st.sampled_from([1, 7, 1000]), st.sampled_from([1, 3000, 1 << 30]), collection_sets)
def test_c_and_python_batches_agree(car: bytes, mode: str, verify: bool, kind: int, n: int, budget: int, collections: Any) -> None:
    """The C walker's Arrow buffers and the reference's columns (or JSON lines, kind 2): the same
    batches (cut at the same rows by n and by the byte budget), or the same error after the
    same batches."""
    pytest.importorskip("pyarrow")
    results = []
    before = implementation.backend().name
    try:
        for name in ("c", "python"):
            implementation.use(name)
            results.append(anyio.run(functools.partial(_batches, car, mode, verify, kind, n, budget, collections), backend="asyncio"))
    finally:
        implementation.use(before)
    c, python = results
    assert c[:2] == python[:2], f"C core {c[:2]!r:.600}\n  reference {python[:2]!r:.600}"
    if c[0] == "batches" and kind != 2:
        assert all(x.equals(y) for x, y in zip(c[2], python[2], strict=True))


@pytest.mark.parametrize("base", BASES, ids=[b.name for b in BASES])
def test_bases_batches_are_the_records(base: Any) -> None:
    """Raw: the records' blocks. JSON text: json.dumps of record_json of each, up to the first
    record that is not DAG-CBOR, where a ProcessorError names it."""
    pytest.importorskip("pyarrow")
    import json

    from repo_stream.records.values import record_json

    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    raw = anyio.run(functools.partial(_batches, base.car, "memory", False, 0, 5, 1 << 30, None), backend="asyncio")
    assert raw[0] == "batches"
    assert [(k, v) for d in raw[1] for k, v in zip(d["key"], d["value"], strict=True)] == base.records
    texts: list[tuple[str, str]] = []
    bad = None
    for k, v in base.records:
        try:
            texts.append((k, dumps(record_json(v))))
        except RepoStreamError:
            bad = k
            break
    got = anyio.run(functools.partial(_batches, base.car, "memory", False, 1, 5, 1 << 30, None), backend="asyncio")
    if bad is None:
        assert got[0] == "batches"
        assert [(k, v) for d in got[1] for k, v in zip(d["key"], d["value"], strict=True)] == texts
    else:
        assert got[0] == "error" and got[1][0] == "ProcessorError" and repr(bad) in got[1][1]
        done = [(k, v) for d in got[2] for k, v in zip(d["key"], d["value"], strict=True)]
        assert done == texts[: len(done)] and len(texts) - len(done) < 5  # the batches before the bad record's
