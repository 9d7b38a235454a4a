"""Partial MSTs and their edits: every edit sequence gives the root the project's writer
(build_mst, the independent oracle) builds for the final key set; lookups, walk_slice and
unknown subtrees; node rules on load."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_stream.core.cid import dag_cbor_cid
from repo_stream.core.mst import key_layer
from repo_stream.errors import (
    EmptyNodeError,
    KeyAbsentError,
    KeyExistsError,
    KeyOrderError,
    LayerMismatchError,
    MstError,
    NodeDecodeError,
    RepoStreamError,
    SubtreeLayerError,
    UnknownSubtreeError,
)
from repo_stream.records.writer import build_mst
from repo_stream.sync import PartialTree, edit
from repo_stream.sync.generate import covering_proof, tid
from repo_stream.sync.partial import encode_tree_node


def _pool() -> list[bytes]:
    """Keys of every layer up to 3 (a few of each high one), in several collections."""
    rng = random.Random(7)
    found: dict[int, list[bytes]] = {0: [], 1: [], 2: [], 3: []}
    want = {0: 60, 1: 30, 2: 12, 3: 4}
    while any(len(found[layer]) < n for layer, n in want.items()):
        collection = rng.choice(["app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.graph.follow"])
        key = f"{collection}/{tid(rng.randrange(1 << 50), rng.getrandbits(10))}".encode()
        layer = min(key_layer(key), 3)
        if len(found[layer]) < want[layer]:
            found[layer].append(key)
    return sorted(k for keys in found.values() for k in keys)


POOL = _pool()
CIDS = [dag_cbor_cid(b"record %d" % i) for i in range(8)]


def test_pool_has_high_layers() -> None:
    assert max(key_layer(k) for k in POOL) >= 3


keys_st = st.sets(st.sampled_from(POOL), max_size=60)
ops_st = st.lists(st.tuples(st.sampled_from(POOL), st.integers(0, len(CIDS) - 1), st.booleans()), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(initial=keys_st, ops=ops_st, check_every=st.booleans())
def test_edits_match_the_writer(initial: set[bytes], ops: list[tuple[bytes, int, bool]], check_every: bool) -> None:
    current = {k: CIDS[i % len(CIDS)] for i, k in enumerate(sorted(initial))}
    root, nodes = build_mst(sorted(current.items()))
    tree = PartialTree(root, nodes)
    for key, value, remove in ops:
        cid = CIDS[value]
        if key in current and remove:
            assert edit.delete(tree, key) == current.pop(key)
        elif key in current:
            assert edit.update(tree, key, cid) == current[key]
            current[key] = cid
        else:
            edit.insert(tree, key, cid)
            current[key] = cid
        if check_every:
            assert tree.root() == build_mst(sorted(current.items()))[0]
    expected, expected_nodes = build_mst(sorted(current.items()))
    assert tree.root() == expected
    # Every node of the new tree is either unchanged or one the edits made, byte for byte.
    blocks = {**nodes, **tree.added}
    for cid, block in expected_nodes.items():
        assert blocks[cid] == block
    walked = [(e.key.encode(), e.cid) for e in PartialTree(expected, blocks).walk_slice()]
    assert walked == sorted(current.items())


@settings(max_examples=100, deadline=None)
@given(initial=keys_st.filter(bool), ops=ops_st)
def test_edits_need_only_the_covering_proof(initial: set[bytes], ops: list[tuple[bytes, int, bool]]) -> None:
    """A single edit on a tree that holds only the covering proof of its key gives the writer's root."""
    current = dict.fromkeys(initial, CIDS[0])
    root, nodes = build_mst(sorted(current.items()))
    key, value, remove = ops[0]
    present = key in current
    proof = {c: nodes[c] for c in covering_proof(nodes, root, key, spines=present and remove)}
    tree = PartialTree(root, proof)
    if present and remove:
        edit.delete(tree, key)
        del current[key]
    elif present:
        edit.update(tree, key, CIDS[value])
        current[key] = CIDS[value]
    else:
        edit.insert(tree, key, CIDS[value])
        current[key] = CIDS[value]
    assert tree.root() == build_mst(sorted(current.items()))[0]


def test_get_proves_presence_and_absence() -> None:
    current = {k: CIDS[i % 8] for i, k in enumerate(POOL)}
    root, nodes = build_mst(sorted(current.items()))
    for key in POOL[::7]:
        proof = {c: nodes[c] for c in covering_proof(nodes, root, key, spines=False)}
        assert PartialTree(root, proof).get(key.decode()) == current[key]
    absent = b"app.bsky.feed.like/2222222222222"
    proof = {c: nodes[c] for c in covering_proof(nodes, root, absent)}
    assert PartialTree(root, proof).get(absent.decode()) is None
    # Without the proof, the lookup names the node it lacks.
    with pytest.raises(UnknownSubtreeError) as info:
        PartialTree(root, {root: nodes[root]}).get(absent.decode())
    assert info.value.cid in nodes and info.value.cid != root


def test_walk_slice_reads_only_the_range() -> None:
    current = {k: CIDS[i % 8] for i, k in enumerate(POOL)}
    root, nodes = build_mst(sorted(current.items()))
    start, end = POOL[40].decode(), POOL[60].decode()
    full = list(PartialTree(root, nodes).walk_slice(start, end))
    assert [e.key for e in full] == [k.decode() for k in POOL[40:60]]
    assert all(e.cid == current[e.key.encode()] and e.block is None for e in full)
    # The nodes the full walk of the range read are enough for it; a far range then fails.
    needed: set[bytes] = set()
    for key in POOL[40:60]:
        needed.update(covering_proof(nodes, root, key))
    needed.update(covering_proof(nodes, root, start.encode()))
    needed.update(covering_proof(nodes, root, end.encode()))
    sliced = PartialTree(root, {c: nodes[c] for c in needed})
    assert [e.key for e in sliced.walk_slice(start, end)] == [e.key for e in full]
    with pytest.raises(UnknownSubtreeError):
        list(PartialTree(root, {c: nodes[c] for c in needed}).walk_slice(None, None))


def test_edit_errors() -> None:
    root, nodes = build_mst(sorted((k, CIDS[0]) for k in POOL[:20]))
    tree = PartialTree(root, nodes)
    with pytest.raises(KeyExistsError):
        edit.insert(tree, POOL[3], CIDS[1])
    with pytest.raises(KeyAbsentError):
        edit.delete(tree, POOL[30])
    with pytest.raises(KeyAbsentError):
        edit.update(tree, POOL[30], CIDS[1])
    assert tree.root() == root  # nothing changed


def test_empty_tree_and_back() -> None:
    empty, nodes = build_mst([])
    tree = PartialTree(empty, nodes)
    assert tree.get(POOL[0].decode()) is None
    for key in POOL:
        edit.insert(tree, key, CIDS[1])
    assert tree.root() == build_mst([(k, CIDS[1]) for k in POOL])[0]
    for key in reversed(POOL):
        edit.delete(tree, key)
    assert tree.root() == empty


def test_wrong_layer_node_refused() -> None:
    # A root whose two keys are on different layers.
    low = next(k for k in POOL if key_layer(k) == 0)
    high = next(k for k in POOL if key_layer(k) == 2 and k > low)
    cid, nodes = build_mst([(low, CIDS[0]), (high, CIDS[0])], layer_of=lambda _: 0)
    with pytest.raises(LayerMismatchError):
        PartialTree(cid, nodes).get(low.decode())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_random_node_bytes_typed_errors(data: bytes) -> None:
    cid = dag_cbor_cid(data)
    tree = PartialTree(cid, {cid: data})
    try:
        tree.get("app.bsky.feed.post/3kabc")
        edit.insert(tree, b"app.bsky.feed.post/3kabc", CIDS[0])
        tree.root()
    except RepoStreamError:
        pass


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_mutated_node_typed_errors(position: int, byte: int) -> None:
    current = {k: CIDS[i % 8] for i, k in enumerate(POOL[:40])}
    root, nodes = build_mst(sorted(current.items()))
    block = bytearray(nodes[root])
    block[position % len(block)] = byte
    mutated = {**nodes, root: bytes(block)}
    tree = PartialTree(root, mutated)
    try:
        for key in POOL[:40:5]:
            tree.get(key.decode())
        edit.delete(tree, POOL[0])
    except (MstError, NodeDecodeError, UnknownSubtreeError):
        pass


def _node(keys: list[bytes], left: bytes | None = None, rights: list[bytes | None] | None = None) -> tuple[bytes, bytes]:
    block = encode_tree_node(left, keys, [CIDS[0]] * len(keys), rights or [None] * len(keys))
    return dag_cbor_cid(block), block


def test_node_key_order_refused() -> None:
    low = [k for k in POOL if key_layer(k) == 0]
    # A key repeated in one node (p = the whole previous key, k empty: compression maximal).
    cid, block = _node([low[0], low[0]])
    with pytest.raises(KeyOrderError, match="does not follow"):
        PartialTree(cid, {cid: block}).get(low[1].decode())
    # Keys out of order in one node.
    cid, block = _node([low[1], low[0]])
    with pytest.raises(KeyOrderError):
        PartialTree(cid, {cid: block}).get(low[1].decode())


def test_subtree_keys_outside_their_range_refused() -> None:
    low = [k for k in POOL if key_layer(k) == 0]
    high = [k for k in POOL if key_layer(k) == 1]
    sep = high[len(high) // 2]
    below = max(k for k in low if k < sep)
    above = min(k for k in low if k > sep)
    # The left subtree of sep holds a key above it (over its upper bound).
    child, child_block = _node([above])
    root, root_block = _node([sep], left=child)
    with pytest.raises(KeyOrderError):  # a look-up left of sep reads it
        PartialTree(root, {root: root_block, child: child_block}).get(below.decode())
    # The subtree after sep holds a key below it (under its lower bound).
    child, child_block = _node([below])
    root, root_block = _node([sep], rights=[child])
    with pytest.raises(KeyOrderError):  # a look-up right of sep reads it
        PartialTree(root, {root: root_block, child: child_block}).get(above.decode())
    # Each where it belongs: both found.
    left, left_block = _node([below])
    right, right_block = _node([above])
    root, root_block = _node([sep], left=left, rights=[right])
    tree = PartialTree(root, {root: root_block, left: left_block, right: right_block})
    assert tree.get(below.decode()) == CIDS[0] and tree.get(above.decode()) == CIDS[0]


def test_subtree_on_the_wrong_layer_refused() -> None:
    # A layer-2 root whose left subtree is a layer-0 node: layer 1 is skipped.
    top = next(k for k in POOL if key_layer(k) == 2)
    low = max(k for k in POOL if key_layer(k) == 0 and k < top)
    child, child_block = _node([low])
    root, root_block = _node([top], left=child)
    with pytest.raises(SubtreeLayerError, match="sits where layer 1 belongs"):
        PartialTree(root, {root: root_block, child: child_block}).get(low.decode())


def test_empty_subtree_node_refused() -> None:
    # {e: [], l: null} is the empty repo's root, and nothing else: as a subtree it is refused.
    top = next(k for k in POOL if key_layer(k) == 1)
    low = max(k for k in POOL if key_layer(k) == 0 and k < top)
    child, child_block = _node([])
    root, root_block = _node([top], left=child)
    with pytest.raises(EmptyNodeError):
        PartialTree(root, {root: root_block, child: child_block}).get(low.decode())
