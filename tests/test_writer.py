"""The CAR writer: canonical MSTs, exact encodings, block orders, streaming, and real samples.

The real-sample tests rebuild ../shared/car-samples repos from their records (read with the
project's reader) and must reproduce their MST root CID, their commit and their exact set of
blocks. The tree tests compare the one-pass builder against a naive recursive reading of the
spec written here, and against small trees worked out by hand.
"""

from __future__ import annotations

import io
import os
import random
import tempfile
import tracemalloc
from pathlib import Path

import anyio
import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_stream import DriverBuilder, InvalidKeyError, KeyOrderError, MemoryDriver
from repo_stream.core.cid import dag_cbor_cid, to_cid
from repo_stream.core.commit import decode_commit
from repo_stream.core.mst import key_layer
from repo_stream.records.writer import (
    ORDERS,
    build_mst,
    build_repo_car,
    car_bytes,
    encode_car_header,
    encode_commit,
    encode_node,
    encode_unsigned_commit,
    encode_varint,
    link,
    write_car,
)

from .conftest import sample_path

DID = "did:plc:writertestwritertestwrit"
REV = "3kwriterwrite"
EMPTY_NODE = bytes.fromhex("a2616580616cf6")


# ------------------------------------------------------------------------------------------
# Independent helpers (deliberately not using the code under test)
# ------------------------------------------------------------------------------------------


def sections(car: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Split CAR v1 bytes into (header block, [(cid, block)]) for 36-byte CIDs."""

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = car[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, pos

    length, pos = varint(0)
    header = car[pos : pos + length]
    pos += length
    out = []
    while pos < len(car):
        length, pos = varint(pos)
        section = car[pos : pos + length]
        pos += length
        out.append((section[:36], section[36:]))
    return header, out


def unlink(tag: cbor2.CBORTag | None) -> bytes | None:
    """Raw CID bytes of a decoded DAG-CBOR link, or None for null."""
    if tag is None:
        return None
    assert tag.tag == 42 and tag.value[0] == 0
    return tag.value[1:]


def ref_node(left: bytes | None, entries: list[tuple[bytes, bytes, bytes | None]]) -> bytes:
    """Encode a node with cbor2 from full keys, compressing against the previous key."""
    items = []
    prev = b""
    for key, value, right in entries:
        p = len(os.path.commonprefix([prev, key]))
        items.append({"k": key[p:], "p": p, "t": None if right is None else link(right), "v": link(value)})
        prev = key
    return cbor2.dumps({"e": items, "l": None if left is None else link(left)}, canonical=True)


def ref_mst(pairs: list[tuple[bytes, bytes]], layer_of=key_layer) -> tuple[bytes, dict[bytes, bytes]]:
    """The spec's canonical tree, built top-down the obvious (quadratic) way."""
    nodes: dict[bytes, bytes] = {}

    def put(block: bytes) -> bytes:
        cid = dag_cbor_cid(block)
        nodes[cid] = block
        return cid

    if not pairs:
        return put(ref_node(None, [])), nodes
    items = [(key, cid, layer_of(key)) for key, cid in pairs]

    def build(part: list, layer: int) -> bytes | None:
        if not part:
            return None
        here = [i for i, item in enumerate(part) if item[2] == layer]
        left = build(part[: here[0]] if here else part, layer - 1)
        entries = []
        for n, i in enumerate(here):
            end = here[n + 1] if n + 1 < len(here) else len(part)
            entries.append((part[i][0], part[i][1], build(part[i + 1 : end], layer - 1)))
        return put(ref_node(left, entries))

    return build(items, max(item[2] for item in items)), nodes


def ref_preorder(blocks: dict[bytes, bytes], commit_cid: bytes) -> list[bytes]:
    """Commit, then node / l subtree / (record, t subtree) per entry, each CID once."""
    out: list[bytes] = []
    seen: set[bytes] = set()

    def add(cid: bytes) -> None:
        if cid not in seen:
            seen.add(cid)
            out.append(cid)

    def node(cid: bytes) -> None:
        add(cid)
        decoded = cbor2.loads(blocks[cid])
        if decoded["l"] is not None:
            node(unlink(decoded["l"]))
        for entry in decoded["e"]:
            add(unlink(entry["v"]))
            if entry["t"] is not None:
                node(unlink(entry["t"]))

    add(commit_cid)
    node(unlink(cbor2.loads(blocks[commit_cid])["data"]))
    return out


def record(i: int, text: str = "hello") -> bytes:
    return cbor2.dumps({"$type": "app.bsky.feed.post", "text": f"{text} {i}", "n": i}, canonical=True)


def keys_with_layer(layer: int, count: int, collection: str = "com.example.record") -> list[str]:
    """The first ``count`` keys ``collection/k<n>`` (n = 0, 1, ...) whose MST layer is ``layer``."""
    found = []
    n = 0
    while len(found) < count:
        key = f"{collection}/k{n}"
        if key_layer(key.encode()) == layer:
            found.append(key)
        n += 1
    return found


def build(records, order: str = "preorder", **kwargs) -> tuple[object, bytes]:
    buf = io.BytesIO()
    commit = build_repo_car(records, did=DID, rev=REV, path=buf, order=order, **kwargs)
    return commit, buf.getvalue()


async def read_all(car: bytes) -> tuple[object, list[tuple[str, bytes]]]:
    driver = await DriverBuilder().with_mem_limit_mb(256).load_car(car)
    assert isinstance(driver, MemoryDriver)
    return driver, [item async for item in driver]


# ------------------------------------------------------------------------------------------
# Low-level encodings
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, encoded",
    [
        (0, "00"),
        (1, "01"),
        (127, "7f"),
        (128, "8001"),
        (300, "ac02"),
        (16383, "ff7f"),
        (16384, "808001"),
        (2**63 - 1, "ffffffffffffffff7f"),
    ],
)
def test_encode_varint(n, encoded):
    assert encode_varint(n) == bytes.fromhex(encoded)


def test_encode_varint_rejects():
    with pytest.raises(ValueError, match="non-negative"):
        encode_varint(-1)
    with pytest.raises(TypeError):
        encode_varint(True)
    with pytest.raises(TypeError):
        encode_varint(1.0)


def test_link():
    cid = dag_cbor_cid(b"\xa0")
    tag = link(cid)
    assert tag.tag == 42 and tag.value == b"\x00" + cid
    assert cbor2.dumps(tag) == b"\xd8\x2a\x58\x25\x00" + cid


def test_empty_node_bytes():
    assert encode_node(None, []) == EMPTY_NODE
    assert ref_node(None, []) == EMPTY_NODE


def test_encode_node_exact_bytes():
    v = dag_cbor_cid(b"\x01")
    t = dag_cbor_cid(b"\x02")
    left = dag_cbor_cid(b"\x03")
    expected = (
        b"\xa2\x61e\x82"
        + b"\xa4\x61k\x43abc\x61p\x00\x61t\xf6\x61v\xd8\x2a\x58\x25\x00" + v
        + b"\xa4\x61k\x41d\x61p\x02\x61t\xd8\x2a\x58\x25\x00" + t + b"\x61v\xd8\x2a\x58\x25\x00" + v
        + b"\x61l\xd8\x2a\x58\x25\x00" + left
    )
    assert encode_node(left, [(0, b"abc", v, None), (2, b"d", v, t)]) == expected


cids = st.one_of(st.binary(min_size=36, max_size=36), st.binary(min_size=1, max_size=70))


@settings(max_examples=300, deadline=None)
@given(
    left=st.one_of(st.none(), cids),
    entries=st.lists(
        st.tuples(
            st.integers(min_value=-(2**64), max_value=2**64 - 1),
            st.binary(max_size=300),
            cids,
            st.one_of(st.none(), cids),
        ),
        max_size=30,
    ),
)
def test_encode_node_matches_cbor2_canonical(left, entries):
    expected = cbor2.dumps(
        {
            "e": [{"k": k, "p": p, "t": None if t is None else link(t), "v": link(v)} for p, k, v, t in entries],
            "l": None if left is None else link(left),
        },
        canonical=True,
    )
    assert encode_node(left, entries) == expected


def test_encode_commit_exact():
    data = dag_cbor_cid(EMPTY_NODE)
    prev = dag_cbor_cid(b"\xa0")
    block = encode_commit("did:plc:abc", data, "3kabc", prev, b"\x01\x02", version=3)
    expected = (
        b"\xa6"
        + b"\x63did\x6bdid:plc:abc"
        + b"\x63rev\x653kabc"
        + b"\x63sig\x42\x01\x02"
        + b"\x64data\xd8\x2a\x58\x25\x00" + data
        + b"\x64prev\xd8\x2a\x58\x25\x00" + prev
        + b"\x67version\x03"
    )
    assert block == expected
    unsigned = encode_unsigned_commit("did:plc:abc", data, "3kabc", prev)
    assert unsigned == b"\xa5" + expected[1:].replace(b"\x63sig\x42\x01\x02", b"")
    commit, data_raw = decode_commit(encode_commit("did:plc:abc", data, "3kabc"), b"")
    assert data_raw == data
    assert (commit.did, commit.version, commit.rev, commit.prev, commit.sig) == ("did:plc:abc", 3, "3kabc", None, b"")
    assert encode_commit("d", data, "r", version=2).endswith(b"\x67version\x02")


def test_car_bytes_exact():
    block = b"\xa1\x61a\x01"
    cid = dag_cbor_cid(block)
    header = b"\xa2\x65roots\x81\xd8\x2a\x58\x25\x00" + cid + b"\x67version\x01"
    assert encode_car_header([cid]) == header
    expected = bytes([len(header)]) + header + bytes([36 + len(block)]) + cid + block
    assert car_bytes([cid], [(cid, block)]) == expected
    # No validation: zero roots, a CID that does not match, a repeated block.
    bogus = b"\x00" * 36
    raw = car_bytes([], [(bogus, block), (bogus, block)])
    assert raw == b"\x11\xa2\x65roots\x80\x67version\x01" + (bytes([40]) + bogus + block) * 2


def test_write_car_targets(tmp_path):
    block = b"\xa0"
    cid = dag_cbor_cid(block)
    expected = car_bytes([cid], [(cid, block)])
    assert write_car(str(tmp_path / "a.car"), [cid], [(cid, block)]) == len(expected)
    assert write_car(tmp_path / "b.car", [cid], iter([(cid, block)])) == len(expected)
    buf = io.BytesIO()
    assert write_car(buf, [cid], [(cid, block)]) == len(expected)
    assert (tmp_path / "a.car").read_bytes() == (tmp_path / "b.car").read_bytes() == buf.getvalue() == expected


# ------------------------------------------------------------------------------------------
# MST construction
# ------------------------------------------------------------------------------------------


def test_build_mst_empty():
    root, nodes = build_mst([])
    assert root == dag_cbor_cid(EMPTY_NODE)
    assert nodes == {root: EMPTY_NODE}


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_build_mst_single_key(layer):
    (key,) = keys_with_layer(layer, 1)
    value = dag_cbor_cid(record(0))
    root, nodes = build_mst([(key.encode(), value)])
    expected = encode_node(None, [(0, key.encode(), value, None)])
    assert root == dag_cbor_cid(expected)
    assert nodes == {root: expected}


def test_build_mst_one_layer_compresses_keys():
    pairs = [(k.encode(), dag_cbor_cid(k.encode())) for k in sorted(keys_with_layer(0, 3))]
    a, b, c = (k for k, _ in pairs)
    expected = encode_node(
        None,
        [
            (0, a, pairs[0][1], None),
            (len(os.path.commonprefix([a, b])), b[len(os.path.commonprefix([a, b])) :], pairs[1][1], None),
            (len(os.path.commonprefix([b, c])), c[len(os.path.commonprefix([b, c])) :], pairs[2][1], None),
        ],
    )
    root, nodes = build_mst(pairs)
    assert nodes == {root: expected}


def test_build_mst_two_layers_by_hand():
    """Keys a, c of layer 0 around b of layer 1: root [b] with l -> [a] and b.t -> [c]."""
    low = keys_with_layer(0, 40)
    (mid,) = keys_with_layer(1, 1)
    a = max(k for k in low if k < mid)
    c = min(k for k in low if k > mid)
    va, vb, vc = (dag_cbor_cid(record(i)) for i in range(3))
    left = encode_node(None, [(0, a.encode(), va, None)])
    right = encode_node(None, [(0, c.encode(), vc, None)])
    top = encode_node(dag_cbor_cid(left), [(0, mid.encode(), vb, dag_cbor_cid(right))])
    root, nodes = build_mst([(a.encode(), va), (mid.encode(), vb), (c.encode(), vc)])
    assert root == dag_cbor_cid(top)
    assert nodes == {dag_cbor_cid(n): n for n in (left, right, top)}


def test_build_mst_empty_intermediate_layers():
    """A layer-2 key with one layer-0 key on each side: the layer-1 nodes hold only ``l``."""
    low = keys_with_layer(0, 40)
    (high,) = keys_with_layer(2, 1)
    a = max(k for k in low if k < high)
    c = min(k for k in low if k > high)
    va, vb, vc = (dag_cbor_cid(record(i)) for i in range(3))
    leaf_a = encode_node(None, [(0, a.encode(), va, None)])
    leaf_c = encode_node(None, [(0, c.encode(), vc, None)])
    mid_a = encode_node(dag_cbor_cid(leaf_a), [])
    mid_c = encode_node(dag_cbor_cid(leaf_c), [])
    top = encode_node(dag_cbor_cid(mid_a), [(0, high.encode(), vb, dag_cbor_cid(mid_c))])
    root, nodes = build_mst([(a.encode(), va), (high.encode(), vb), (c.encode(), vc)])
    assert root == dag_cbor_cid(top)
    assert nodes == {dag_cbor_cid(n): n for n in (leaf_a, leaf_c, mid_a, mid_c, top)}
    # Only the layer-2 key and the one after it: no left subtree at all.
    root, nodes = build_mst([(high.encode(), vb), (c.encode(), vc)])
    top = encode_node(None, [(0, high.encode(), vb, dag_cbor_cid(mid_c))])
    assert root == dag_cbor_cid(top)
    assert nodes == {dag_cbor_cid(n): n for n in (leaf_c, mid_c, top)}


def test_build_mst_rejects_bad_order():
    v = dag_cbor_cid(b"\xa0")
    with pytest.raises(KeyOrderError, match="duplicate key 'a/b'"):
        build_mst([(b"a/a", v), (b"a/b", v), (b"a/b", v)])
    with pytest.raises(KeyOrderError, match="not strictly increasing: 'a/a' after 'a/b'"):
        build_mst([(b"a/b", v), (b"a/a", v)])


def test_build_mst_layer_override():
    pairs = [(f"x/{i:03d}".encode(), dag_cbor_cid(bytes([i]))) for i in range(20)]
    root, nodes = build_mst(pairs, layer_of=lambda key: 0)
    assert len(nodes) == 1
    decoded = cbor2.loads(nodes[root])
    assert [e["p"] for e in decoded["e"]] == [0] + [4] * 9 + [3] + [4] * 9
    assert decoded["l"] is None and all(e["t"] is None for e in decoded["e"])
    with pytest.raises(ValueError, match="negative"):
        build_mst(pairs, layer_of=lambda key: -1)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.text(alphabet="ab~", min_size=1, max_size=5),
        st.integers(min_value=0, max_value=4),
        max_size=40,
    )
)
def test_build_mst_matches_reference(layers):
    """Random keys with random layers (deep, sparse trees) against the top-down definition."""
    table = {f"com.example.x/{rkey}".encode(): layer for rkey, layer in layers.items()}
    pairs = sorted((key, dag_cbor_cid(key)) for key in table)
    assert build_mst(pairs, layer_of=table.__getitem__) == ref_mst(pairs, layer_of=table.__getitem__)


def test_build_mst_matches_reference_real_layers():
    rng = random.Random(7)
    keys = {f"app.bsky.feed.{rng.choice(['like', 'post', 'repost'])}/3k{rng.getrandbits(40):x}" for _ in range(3000)}
    pairs = sorted((key.encode(), dag_cbor_cid(key.encode())) for key in keys)
    assert build_mst(pairs) == ref_mst(pairs)


# ------------------------------------------------------------------------------------------
# Whole repos
# ------------------------------------------------------------------------------------------


def test_build_repo_car_empty():
    commit, car = build([])
    header, blocks = sections(car)
    root = dag_cbor_cid(EMPTY_NODE)
    commit_block = encode_commit(DID, root, REV)
    assert commit.did == DID and commit.rev == REV and commit.version == 3
    assert commit.prev is None and commit.sig == b""
    assert commit.data == to_cid(root)
    assert header == encode_car_header([dag_cbor_cid(commit_block)])
    assert blocks == [(dag_cbor_cid(commit_block), commit_block), (root, EMPTY_NODE)]


def test_build_repo_car_single_record_exact_bytes():
    key = "app.bsky.actor.profile/self"
    block = record(0)
    node = encode_node(None, [(0, key.encode(), dag_cbor_cid(block), None)])
    commit_block = encode_commit(DID, dag_cbor_cid(node), REV)
    commit_cid = dag_cbor_cid(commit_block)
    expected = car_bytes(
        [commit_cid], [(commit_cid, commit_block), (dag_cbor_cid(node), node), (dag_cbor_cid(block), block)]
    )
    commit, car = build([(key, block)])
    assert car == expected
    assert commit.data == to_cid(dag_cbor_cid(node))


def test_build_repo_car_sign():
    calls = []

    def sign(unsigned: bytes) -> bytes:
        calls.append(unsigned)
        return b"\x99" * 64

    commit, car = build([("app.bsky.feed.post/a", record(1))], sign=sign)
    _, blocks = sections(car)
    root = bytes(commit.data)
    assert calls == [encode_unsigned_commit(DID, root, REV)]
    assert commit.sig == b"\x99" * 64
    assert blocks[0][1] == encode_commit(DID, root, REV, sig=b"\x99" * 64)
    with pytest.raises(TypeError, match="sign"):
        build([("app.bsky.feed.post/a", record(1))], sign=lambda unsigned: "nope")


@pytest.mark.parametrize(
    "key",
    ["nocollection", "app.bsky.feed.post/", "/rkey", "app.bsky.feed.post/..", "app/rkey", "a.b.c/with space",
     "app.bsky.feed.post/" + "x" * 1100, "app.bsky.feed.post/é"],
)
def test_build_repo_car_invalid_key(tmp_path, key):
    out = tmp_path / "out.car"
    records = [("app.bsky.feed.post/ok", record(0)), (key, record(1))]
    with pytest.raises(InvalidKeyError, match="invalid repo key") as info:
        build_repo_car(records, did=DID, rev=REV, path=out)
    assert repr(key)[:60] in str(info.value)
    assert not out.exists()


def test_build_repo_car_non_str_key():
    with pytest.raises(InvalidKeyError, match="must be str"):
        build([(b"app.bsky.feed.post/a", record(0))])


def test_build_repo_car_duplicate_key(tmp_path):
    out = tmp_path / "out.car"
    records = [("app.bsky.feed.post/b", record(0)), ("app.bsky.feed.post/a", record(1)), ("app.bsky.feed.post/b", record(2))]
    with pytest.raises(KeyOrderError, match=r"^duplicate key 'app\.bsky\.feed\.post/b'$"):
        build_repo_car(records, did=DID, rev=REV, path=out)
    assert not out.exists()


def test_build_repo_car_bad_arguments():
    with pytest.raises(ValueError, match="order must be one of preorder, shuffled, reverse"):
        build([], order="inorder")
    with pytest.raises(TypeError, match="must be bytes"):
        build([("app.bsky.feed.post/a", "text")])


def many_records(n: int = 300, seed: int = 1) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    keys = {f"app.bsky.feed.{rng.choice(['like', 'post'])}/3k{rng.getrandbits(32):08x}" for _ in range(n)}
    records = [(key, record(i)) for i, key in enumerate(sorted(keys))]
    rng.shuffle(records)
    return records


def test_orders():
    records = many_records()
    _, pre = build(records, "preorder")
    _, shuf = build(records, "shuffled", seed=42)
    _, shuf_again = build(records, "shuffled", seed=42)
    _, shuf_other = build(records, "shuffled", seed=43)
    _, rev = build(records, "reverse")
    header, pre_blocks = sections(pre)
    # Preorder is exactly the documented walk, computed independently from the decoded nodes.
    commit_cid = pre_blocks[0][0]
    assert header == encode_car_header([commit_cid])
    assert [cid for cid, _ in pre_blocks] == ref_preorder(dict(pre_blocks), commit_cid)
    # Shuffled is random.Random(seed).shuffle of the preorder blocks; same seed, same bytes.
    assert shuf == shuf_again
    assert shuf != shuf_other
    expected = list(pre_blocks)
    random.Random(42).shuffle(expected)
    assert sections(shuf) == (header, expected)
    # Reverse is preorder reversed.
    assert sections(rev) == (header, pre_blocks[::-1])
    # The same blocks, each once, and the whole file the same size, in every order.
    for car in (shuf, shuf_other, rev):
        _, blocks = sections(car)
        assert sorted(blocks) == sorted(pre_blocks)
        assert len(car) == len(pre)
    assert len({cid for cid, _ in pre_blocks}) == len(pre_blocks)
    assert all(dag_cbor_cid(block) == cid for cid, block in pre_blocks)
    # 300 records, their nodes and the commit.
    nodes = [cid for cid, block in pre_blocks if set(cbor2.loads(block)) == {"e", "l"}]
    assert len(pre_blocks) == 1 + 300 + len(nodes)


def test_orders_read_back_in_key_order():
    records = many_records(200, seed=3)
    for order in ORDERS:
        commit, car = build(records, order, seed=5)
        driver, got = anyio.run(read_all, car)
        assert got == sorted(records)
        assert driver.commit == commit


def test_shared_record_block_written_once():
    shared = record(7, "shared")
    other = record(1)
    k1, k2, k3, k4 = sorted(keys_with_layer(0, 4))  # all layer 0: the tree is one node
    records = [(k4, shared), (k2, shared), (k3, other), (k1, shared)]
    root, nodes = build_mst(sorted((k.encode(), dag_cbor_cid(b)) for k, b in records))
    assert list(nodes) == [root]
    for order in ORDERS:
        _, car = build(records, order)
        _, blocks = sections(car)
        assert [block for _, block in blocks].count(shared) == 1
        assert len(blocks) == 4  # commit, the root node, 2 distinct records
        _, got = anyio.run(read_all, car)
        assert got == sorted(records)
    # In preorder it sits at its first key, k1, before k3's record.
    _, car = build(records)
    _, blocks = sections(car)
    assert [cid for cid, _ in blocks] == [blocks[0][0], root, dag_cbor_cid(shared), dag_cbor_cid(other)]


def test_output_targets_and_one_pass_input(tmp_path):
    records = many_records(50)
    commit, expected = build(records)
    for target in (str(tmp_path / "a.car"), tmp_path / "b.car"):
        assert build_repo_car(iter(records), did=DID, rev=REV, path=target) == commit
        assert Path(target).read_bytes() == expected
    assert build_repo_car((r for r in records), did=DID, rev=REV, path=io.BytesIO()) == commit
    assert build_repo_car([(k, bytearray(b)) for k, b in records], did=DID, rev=REV, path=io.BytesIO()) == commit


def test_spool_is_removed(tmp_path, monkeypatch):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool_dir))
    build(many_records(20))
    assert list(spool_dir.iterdir()) == []
    with pytest.raises(KeyOrderError):
        build([("app.bsky.feed.post/a", record(0))] * 2)
    assert list(spool_dir.iterdir()) == []


def test_streams_record_bytes(tmp_path):
    """200 records of 100 kB (20 MB in all) are written with well under 2 MB of Python memory."""
    blob = 100_000

    def records():
        for i in range(200):
            yield f"app.bsky.feed.post/r{i:05d}", cbor2.dumps({"i": i, "blob": bytes([i % 251]) * blob})

    out = tmp_path / "big.car"
    tracemalloc.start()
    try:
        build_repo_car(records(), did=DID, rev=REV, path=out, order="shuffled")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000
    assert out.stat().st_size > 200 * blob


# ------------------------------------------------------------------------------------------
# Real repos: rebuilding a sample's records gives its tree, commit and blocks exactly
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, count", [("empty.car", 0), ("tiny.car", 8), ("little.car", 278)])
def test_rebuild_real_sample(name, count):
    data = sample_path(name).read_bytes()
    driver, records = anyio.run(read_all, data)
    assert len(records) == count
    original = driver.commit
    shuffled = list(records)
    random.Random(0).shuffle(shuffled)

    buf = io.BytesIO()
    commit = build_repo_car(shuffled, did=original.did, rev=original.rev, path=buf, sign=lambda _: original.sig)
    car = buf.getvalue()

    # The MST root is the sample's, and so is the whole commit (hence the CAR header).
    assert commit.data == original.data
    assert commit == original
    sample_header, sample_blocks = sections(data)
    header, blocks = sections(car)
    assert header == sample_header
    assert blocks[0][0] == bytes(driver.commit_cid)
    # The very same blocks (every MST node byte for byte), only in another order.
    assert sorted(blocks) == sorted(sample_blocks)
    assert len(car) == len(data)
    # Unsigned, only the commit differs.
    unsigned = build_repo_car(records, did=original.did, rev=original.rev, path=io.BytesIO())
    assert unsigned.data == original.data and unsigned.sig == b""
