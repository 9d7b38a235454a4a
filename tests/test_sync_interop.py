"""The atproto interop test files (tests/interop/, CC0): MST key layers, common prefixes, and the
commit-proof fixtures (a commit's proof blocks must be enough to invert it in any op order)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from multiformats import CID

from repo_stream.core.cid import cid_text
from repo_stream.core.mst import key_layer
from repo_stream.errors import UnknownSubtreeError
from repo_stream.records.writer import build_mst, encode_node
from repo_stream.sync import Op, PartialTree, edit, invert
from repo_stream.sync.partial import key_layer_of

INTEROP = Path(__file__).resolve().parent / "interop"


def load(name: str) -> Any:
    return json.loads((INTEROP / name).read_text())


def raw(cid: str) -> bytes:
    return bytes(CID.decode(cid))


@pytest.mark.parametrize("case", load("key_heights.json"), ids=lambda c: repr(c["key"]))
def test_key_heights(case: dict[str, Any]) -> None:
    key = case["key"].encode()
    assert key_layer(key) == case["height"]
    assert key_layer_of(key) == case["height"]


@pytest.mark.parametrize("case", load("common_prefix.json"), ids=lambda c: f"{c['left']!r}-{c['right']!r}")
def test_common_prefix(case: dict[str, Any]) -> None:
    # The prefix length a node stores for the second key after the first: the writer's and the
    # partial tree's encoders both compress maximally.
    from repo_stream.sync.partial import encode_tree_node

    left, right = sorted((case["left"].encode(), case["right"].encode()))  # the length is symmetric
    if left == right:
        assert case["len"] == len(left)
        return
    value = b"\x01\x71\x12\x20" + b"\x00" * 32
    block = encode_tree_node(None, [left, right], [value, value], [None, None])
    p = case["len"]
    assert block == encode_node(None, [(0, left, value, None), (p, right[p:], value, None)])


FIXTURES = load("commit-proof-fixtures.json")


@pytest.mark.parametrize("fixture", FIXTURES, ids=[f["comment"] for f in FIXTURES])
def test_commit_proof_fixture(fixture: dict[str, Any]) -> None:
    leaf = raw(fixture["leafValue"])
    before = {k.encode(): leaf for k in fixture["keys"]}
    root, nodes = build_mst(sorted(before.items()))
    assert cid_text(root) == fixture["rootBeforeCommit"]

    # The commit applied with the edits on the full tree gives rootAfterCommit.
    tree = PartialTree(root, nodes, check_keys=False)
    for key in fixture["adds"]:
        edit.insert(tree, key.encode(), leaf)
    for key in fixture["dels"]:
        edit.delete(tree, key.encode())
    after = tree.root()
    assert cid_text(after) == fixture["rootAfterCommit"]

    # Inversion with only the proof blocks, in every order of the ops, gives rootBeforeCommit.
    all_blocks = {**nodes, **tree.added}
    proof = {raw(c): all_blocks[raw(c)] for c in fixture["blocksInProof"]}
    ops = [Op("create", k, leaf, None) for k in fixture["adds"]] + [Op("delete", k, None, leaf) for k in fixture["dels"]]
    for order in itertools.permutations(ops):
        assert cid_text(invert(PartialTree(after, proof, check_keys=False), list(order))) == fixture["rootBeforeCommit"]

    # Without the proof's root node nothing can be inverted: the error names it.
    partial = {c: b for c, b in proof.items() if c != after}
    with pytest.raises(UnknownSubtreeError) as info:
        invert(PartialTree(after, partial, check_keys=False), ops)
    assert info.value.cid == after
