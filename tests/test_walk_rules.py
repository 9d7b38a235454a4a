"""Every MST walker rule, checked with small CARs built here, in memory and spilled to disk.

Each rule of :mod:`repo_stream.core.walk` gets inputs that break it and must fail with exactly its
error class (not a parent, not a sibling), both when the whole CAR is walked from memory and when
a tiny memory limit forces it through the SQLite spill store. Valid trees, built by hand and by
:func:`repo_stream.records.writer.build_repo_car`, must come out record for record.

Nothing is read from disk: keys on a wanted MST layer are found by trying numbered rkeys.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable
from typing import Any

import cbor2
import pytest

from repo_stream import (
    DepthLimitError,
    DiskBuilder,
    DriverBuilder,
    EmptyNodeError,
    EmptyRootError,
    InvalidKeyError,
    KeyEncodingError,
    KeyOrderError,
    LayerMismatchError,
    MissingBlockError,
    NeedDisk,
    NodeDecodeError,
    PrefixError,
    SubtreeLayerError,
)
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.core.mst import key_layer
from repo_stream.records.writer import build_mst, build_repo_car, car_bytes, encode_commit, encode_node, link

from .helpers import walk, walk_error

pytestmark = pytest.mark.anyio

DID = "did:plc:test"
REV = "3kaaaaaaaaaaa"
POST = "app.bsky.feed.post"

# --------------------------------------------------------------------------------------------
# Keys on chosen layers
# --------------------------------------------------------------------------------------------

#: (key, layer) for numbered post keys, in increasing key order.
_NUMBERED = [(k, key_layer(k.encode())) for k in (f"{POST}/{i:013d}" for i in range(600))]


def keys_on(layer: int, n: int = 1, after: str = "", before: str | None = None) -> list[str]:
    """The first ``n`` numbered keys of ``layer`` strictly between ``after`` and ``before``."""
    found = [k for k, lay in _NUMBERED if lay == layer and k > after and (before is None or k < before)][:n]
    assert len(found) == n, f"not enough layer-{layer} keys between {after!r} and {before!r}"
    return found


def key_on(layer: int, after: str = "", before: str | None = None) -> str:
    return keys_on(layer, 1, after, before)[0]


def search_key(template: bytes, layer: int) -> bytes:
    """The first ``template % i`` (i = 0, 1, ...) whose key bytes are on ``layer``."""
    for i in range(100_000):
        key = template.replace(b"{}", str(i).encode())
        if key_layer(key) == layer:
            return key
    raise AssertionError(f"no key like {template!r} on layer {layer}")  # pragma: no cover


L0 = keys_on(0, 12)
L1 = keys_on(1, 4)
L2 = keys_on(2, 3)

# A small valid three-level shape: K0 < K1 < K2 < K0_AFTER, on layers 0, 1, 2, 0.
K0 = key_on(0)
K1 = key_on(1, after=K0)
K2 = key_on(2, after=K1)
K0_AFTER = key_on(0, after=K2)

# --------------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------------


def record_block(key: str | bytes) -> bytes:
    """The record block this file stores for ``key`` (distinct per key)."""
    text = key if isinstance(key, str) else key.decode("utf-8", "replace")
    return cbor2.dumps({"$type": POST, "text": text}, canonical=True)


def expected(*keys: str) -> list[tuple[str, bytes]]:
    """The records a walk must emit for ``keys`` built with :meth:`Repo.node`."""
    return [(k, record_block(k)) for k in keys]


def forged_cid(label: str) -> bytes:
    """A well-formed dag-cbor CID chosen up front, to label a block whose hash it is not."""
    return dag_cbor_cid(b"forged:" + label.encode())


def _shared(a: bytes, b: bytes) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


class Repo:
    """The blocks of a hand-built repo, in the order they are added."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}

    def put(self, block: bytes, cid: bytes | None = None) -> bytes:
        """Store ``block`` under ``cid`` (default: its real CID); return the CID."""
        cid = dag_cbor_cid(block) if cid is None else cid
        self.blocks[cid] = block
        return cid

    def record(self, key: str | bytes) -> bytes:
        return self.put(record_block(key))

    def node(self, *entries: str | bytes | tuple[str | bytes, bytes | None], left: bytes | None = None, cid: bytes | None = None) -> bytes:
        """Store a node of full keys (``key`` or ``(key, t)``), maximally compressed, each key with
        its own record block; return the node's CID."""
        items = []
        prev = b""
        for entry in entries:
            key, t = entry if isinstance(entry, tuple) else (entry, None)
            kb = key.encode() if isinstance(key, str) else key
            p = _shared(prev, kb)
            items.append((p, kb[p:], self.record(key), t))
            prev = kb
        return self.put(encode_node(left, items), cid)

    def raw_node(self, entries: list[tuple[int, bytes, bytes, bytes | None]], left: bytes | None = None) -> bytes:
        """Store a node with entries ``(p, k, v, t)`` exactly as given; return its CID."""
        return self.put(encode_node(left, entries))

    def car(self, data: bytes, *, drop: tuple[bytes, ...] = (), extra: list[tuple[bytes, bytes]] = (), commit: bool = True) -> bytes:
        """The CAR: root = the commit over ``data``, then the commit block (unless ``commit`` is
        false), then every stored block not in ``drop``, then ``extra``."""
        commit_block = encode_commit(did=DID, data_cid=data, rev=REV)
        commit_cid = dag_cbor_cid(commit_block)
        blocks = [(commit_cid, commit_block)] if commit else []
        blocks += [(c, b) for c, b in self.blocks.items() if c not in drop]
        blocks += list(extra)
        return car_bytes([commit_cid], blocks)


# --------------------------------------------------------------------------------------------
# Walking both ways
# --------------------------------------------------------------------------------------------

@pytest.fixture(params=["memory", "spilled"])
def mode(request: pytest.FixtureRequest) -> str:
    return request.param


def cases(*builders: Callable[[], Any]) -> pytest.MarkDecorator:
    """Parametrize ``build`` with case builder functions, each id'd by its name."""
    return pytest.mark.parametrize("build", builders, ids=[b.__name__ for b in builders])


# --------------------------------------------------------------------------------------------
# 1. Valid repos
# --------------------------------------------------------------------------------------------


async def test_empty_repo(mode: str) -> None:
    repo = Repo()
    root = repo.put(encode_node(None, []))
    assert await walk(mode, repo.car(root)) == []


async def test_one_key_repo(mode: str) -> None:
    repo = Repo()
    root = repo.node(L0[0])
    assert await walk(mode, repo.car(root)) == expected(L0[0])


async def test_two_layer_repo_by_hand(mode: str) -> None:
    k1 = L1[0]
    left = keys_on(0, 2, before=k1)
    right = keys_on(0, 2, after=k1)
    repo = Repo()
    root = repo.node((k1, repo.node(*right)), left=repo.node(*left))
    # The hand-built tree is the canonical one.
    assert root == build_mst([(k.encode(), dag_cbor_cid(record_block(k))) for k in [*left, k1, *right]])[0]
    assert await walk(mode, repo.car(root)) == expected(*left, k1, *right)


def three_level_repo() -> tuple[Repo, bytes]:
    """Root [K2] (layer 2); its ``l`` is [K1] (layer 1) over [K0]; its ``t`` is a layer-1 node
    with no entries whose ``l`` is [K0_AFTER] (layer 0): three nodes deep."""
    repo = Repo()
    left = repo.node(K1, left=repo.node(K0))
    right = repo.node(left=repo.node(K0_AFTER))
    root = repo.node((K2, right), left=left)
    return repo, root


async def test_three_level_repo_by_hand(mode: str) -> None:
    repo, root = three_level_repo()
    keys = [K0, K1, K2, K0_AFTER]
    assert root == build_mst([(k.encode(), dag_cbor_cid(record_block(k))) for k in keys])[0]
    assert await walk(mode, repo.car(root)) == expected(*keys)


@pytest.mark.parametrize("order", ["preorder", "shuffled", "reverse"])
async def test_build_repo_car_round_trip(mode: str, order: str) -> None:
    keys = [f"{POST}/{i:013d}" for i in range(150)]
    keys += [f"app.bsky.feed.like/3k{i:011d}" for i in range(40)]
    keys += ["app.bsky.actor.profile/self", "app.bsky.graph.follow/a:b~c-d_e.f"]
    records = [(k, record_block(k)) for k in keys]
    random.Random(7).shuffle(records)
    out = io.BytesIO()
    build_repo_car(records, did=DID, rev=REV, path=out, order=order, seed=3)
    assert await walk(mode, out.getvalue()) == sorted(records)


# --------------------------------------------------------------------------------------------
# 2. Shared record blocks, 3. unreferenced blocks
# --------------------------------------------------------------------------------------------


async def test_two_keys_share_one_record_block(mode: str) -> None:
    a, b = L0[0], L0[1]
    repo = Repo()
    shared = repo.put(record_block("shared"))
    p = _shared(a.encode(), b.encode())
    root = repo.raw_node([(0, a.encode(), shared, None), (p, b.encode()[p:], shared, None)])
    records = await walk(mode, repo.car(root))
    assert records == [(a, record_block("shared")), (b, record_block("shared"))]
    assert records[0][1] == records[1][1]


async def test_unreferenced_blocks_are_ignored(mode: str) -> None:
    repo = Repo()
    root = repo.node(*L0[:3])
    garbage = b"\xff\xfe not cbor at all"
    bad_node = encode_node(None, [(7, b"\xff\xff", forged_cid("nowhere"), forged_cid("nowhere"))])
    extra = [
        (dag_cbor_cid(garbage), garbage),
        (dag_cbor_cid(bad_node), bad_node),
        (b"\x01\x55\x12\x20" + bytes(32), b"raw blob bytes"),  # a raw-codec CID
        (dag_cbor_cid(record_block("orphan")), record_block("orphan")),
    ]
    assert await walk(mode, repo.car(root, extra=extra)) == expected(*L0[:3])


# --------------------------------------------------------------------------------------------
# 4. KeyOrderError
# --------------------------------------------------------------------------------------------


def keys_decreasing_in_node() -> bytes:
    repo = Repo()
    return repo.car(repo.node(L0[1], L0[0]))


def duplicate_key_in_node() -> bytes:
    repo = Repo()
    return repo.car(repo.node(L0[0], L0[0]))


def t_subtree_below_its_entry() -> bytes:
    k1 = L1[0]
    repo = Repo()
    return repo.car(repo.node((k1, repo.node(*keys_on(0, 2, before=k1)))))


def t_subtree_past_next_entry() -> bytes:
    a, b = L1[0], L1[1]
    repo = Repo()
    return repo.car(repo.node((a, repo.node(key_on(0, after=b))), b))


def l_subtree_past_first_entry() -> bytes:
    k1 = L1[0]
    repo = Repo()
    return repo.car(repo.node(k1, left=repo.node(key_on(0, after=k1))))


@cases(keys_decreasing_in_node, duplicate_key_in_node, t_subtree_below_its_entry, t_subtree_past_next_entry, l_subtree_past_first_entry)
async def test_key_order_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), KeyOrderError)


# --------------------------------------------------------------------------------------------
# 5. LayerMismatchError
# --------------------------------------------------------------------------------------------


def root_mixes_layers_0_and_1() -> bytes:
    repo = Repo()
    return repo.car(repo.node(*sorted([L0[0], L1[0]])))


def subtree_mixes_layers_0_and_1() -> bytes:
    k2 = L2[0]
    mixed = sorted([key_on(0, before=k2), key_on(1, before=k2)])
    repo = Repo()
    return repo.car(repo.node(k2, left=repo.node(*mixed)))


@cases(root_mixes_layers_0_and_1, subtree_mixes_layers_0_and_1)
async def test_layer_mismatch_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), LayerMismatchError)


# --------------------------------------------------------------------------------------------
# 6. SubtreeLayerError
# --------------------------------------------------------------------------------------------


def layer2_root_child_skips_layer1() -> bytes:
    k2 = L2[0]
    repo = Repo()
    return repo.car(repo.node(k2, left=repo.node(*keys_on(0, 2, before=k2))))


def layer1_root_l_child_on_layer1() -> bytes:
    k1 = L1[1]
    repo = Repo()
    return repo.car(repo.node(k1, left=repo.node(key_on(1, before=k1))))


def layer1_root_t_child_on_layer2() -> bytes:
    k1 = L1[0]
    repo = Repo()
    return repo.car(repo.node((k1, repo.node(key_on(2, after=k1)))))


def layer0_root_with_l() -> bytes:
    k = L0[1]
    repo = Repo()
    return repo.car(repo.node(k, left=repo.node(key_on(0, before=k))))


def layer0_root_with_t() -> bytes:
    k = L0[0]
    repo = Repo()
    return repo.car(repo.node((k, repo.node(key_on(0, after=k)))))


def layer0_root_with_l_to_missing_block() -> bytes:
    repo = Repo()
    return repo.car(repo.node(L0[0], left=forged_cid("absent")))


def layer0_subtree_with_t() -> bytes:
    k1 = L1[0]
    a, b = keys_on(0, 2, after=k1)
    repo = Repo()
    return repo.car(repo.node((k1, repo.node((a, repo.node(b))))))


def layer0_empty_subtree_with_l() -> bytes:
    k1 = L1[0]
    repo = Repo()
    below = repo.node(key_on(0, before=k1))
    return repo.car(repo.node(k1, left=repo.node(left=below)))


@cases(
    layer2_root_child_skips_layer1,
    layer1_root_l_child_on_layer1,
    layer1_root_t_child_on_layer2,
    layer0_root_with_l,
    layer0_root_with_t,
    layer0_root_with_l_to_missing_block,
    layer0_subtree_with_t,
    layer0_empty_subtree_with_l,
)
async def test_subtree_layer_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), SubtreeLayerError)


# --------------------------------------------------------------------------------------------
# 7. EmptyNodeError, 8. EmptyRootError
# --------------------------------------------------------------------------------------------


def empty_l_subtree() -> bytes:
    repo = Repo()
    return repo.car(repo.node(L1[0], left=repo.node()))


def empty_t_subtree() -> bytes:
    repo = Repo()
    return repo.car(repo.node((L1[0], repo.node())))


def empty_node_under_empty_layer1_node() -> bytes:
    k2 = L2[0]
    repo = Repo()
    return repo.car(repo.node(k2, left=repo.node(left=repo.node())))


@cases(empty_l_subtree, empty_t_subtree, empty_node_under_empty_layer1_node)
async def test_empty_node_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), EmptyNodeError)


def root_with_only_l() -> bytes:
    repo = Repo()
    return repo.car(repo.node(left=repo.node(L0[0])))


def root_with_only_l_to_missing_block() -> bytes:
    repo = Repo()
    return repo.car(repo.node(left=forged_cid("absent")))


def root_with_only_l_to_itself() -> bytes:
    repo = Repo()
    me = forged_cid("self")
    return repo.car(repo.put(encode_node(me, []), cid=me))


@cases(root_with_only_l, root_with_only_l_to_missing_block, root_with_only_l_to_itself)
async def test_empty_root_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), EmptyRootError)


# --------------------------------------------------------------------------------------------
# 9. PrefixError
# --------------------------------------------------------------------------------------------


def _two_entry_node(p: int, second: bytes) -> bytes:
    """A root with L0[0] and then the entry ``(p, second)``."""
    repo = Repo()
    first = L0[0].encode()
    entries = [(0, first, repo.record(L0[0]), None), (p, second, repo.record(L0[1]), None)]
    return repo.car(repo.raw_node(entries))


def p_beyond_previous_key() -> bytes:
    return _two_entry_node(len(L0[0]) + 1, b"x")


def p_on_first_entry() -> bytes:
    repo = Repo()
    key = L0[0].encode()
    return repo.car(repo.raw_node([(1, key[1:], repo.record(L0[0]), None)]))


def p_negative() -> bytes:
    return _two_entry_node(-1, L0[1].encode())


def p_zero_not_maximal() -> bytes:
    return _two_entry_node(0, L0[1].encode())  # both keys share "app.bsky.feed.post/000..."


def p_one_short_of_maximal() -> bytes:
    a, b = L0[0].encode(), L0[1].encode()
    p = _shared(a, b) - 1
    return _two_entry_node(p, b[p:])


@cases(p_beyond_previous_key, p_on_first_entry, p_negative, p_zero_not_maximal, p_one_short_of_maximal)
async def test_prefix_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), PrefixError)


# --------------------------------------------------------------------------------------------
# 10. KeyEncodingError, 11. InvalidKeyError
# --------------------------------------------------------------------------------------------


def _node_with_bad_key(bad: bytes) -> bytes:
    """A root holding a valid layer-0 key and ``bad`` (which must be on layer 0 too)."""
    assert key_layer(bad) == 0
    repo = Repo()
    return repo.car(repo.node(*sorted([L0[0].encode(), bad])))


def _root_with_only(bad: bytes) -> bytes:
    """A root whose single entry is ``bad`` (a root may be on any layer)."""
    repo = Repo()
    return repo.car(repo.node(bad))


def non_utf8_rkey() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + b"/bad\xff{}", 0))


def truncated_utf8_sequence() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + b"/{}\xc3", 0))


def non_utf8_collection() -> bytes:
    return _node_with_bad_key(search_key(b"app.bsky.\xe9\x80.post/{}", 0))


@cases(non_utf8_rkey, truncated_utf8_sequence, non_utf8_collection)
async def test_key_encoding_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), KeyEncodingError)


def no_slash() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + b"{}", 0))


def one_segment_collection() -> bytes:
    return _node_with_bad_key(search_key(b"post/{}", 0))


def collection_starts_with_digit() -> bytes:
    return _node_with_bad_key(search_key(b"1app.bsky.feed.post/{}", 0))


def collection_with_empty_segment() -> bytes:
    return _node_with_bad_key(search_key(b"app..feed.post/{}", 0))


def rkey_with_space() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + b"/a b{}", 0))


def rkey_with_hash() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + b"/a#{}", 0))


def rkey_with_second_slash() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + b"/a/{}", 0))


def non_ascii_rkey() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + "/é{}".encode(), 0))


def rkey_over_512() -> bytes:
    return _node_with_bad_key(search_key(POST.encode() + b"/" + b"a" * 512 + b"{}", 0))


def empty_rkey() -> bytes:
    return _root_with_only(POST.encode() + b"/")


def rkey_dot() -> bytes:
    return _root_with_only(POST.encode() + b"/.")


def rkey_dot_dot() -> bytes:
    return _root_with_only(POST.encode() + b"/..")


@cases(
    no_slash,
    one_segment_collection,
    collection_starts_with_digit,
    collection_with_empty_segment,
    rkey_with_space,
    rkey_with_hash,
    rkey_with_second_slash,
    non_ascii_rkey,
    rkey_over_512,
    empty_rkey,
    rkey_dot,
    rkey_dot_dot,
)
async def test_invalid_key_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), InvalidKeyError)


async def test_invalid_key_error_over_1024_bytes(mode: str) -> None:
    # No valid collection/rkey path is that long (317 + 1 + 512 < 1024), so the length rule is
    # checked first and named in the message; a non-UTF-8 tail must not turn it into KeyEncodingError.
    for tail in (b"", b"\xff"):
        key = search_key(POST.encode() + b"/" + b"a" * 1010 + b"{}" + tail, 0)
        assert len(key) > 1024
        exc = await walk_error(mode, _node_with_bad_key(key), InvalidKeyError)
        assert "1024" in str(exc)


async def test_invalid_key_error_names_the_length_from_1025_bytes(mode: str) -> None:
    # At 1025 bytes the length rule speaks; at 1024 the key is refused for its syntax (an rkey
    # over 512 characters) instead.
    for size in (1025, 1024):
        key = search_key(POST.encode() + b"/" + b"a" * (size - len(POST) - 2) + b"{}", 0)
        assert len(key) == size
        exc = str(await walk_error(mode, _node_with_bad_key(key), InvalidKeyError))
        if size == 1025:
            assert exc.startswith("MST key of 1025 bytes in node ") and exc.endswith(" is over 1024 bytes"), exc
        else:
            assert exc.startswith(f"MST key {key.decode()!r} in node ") and exc.endswith(" is not a valid collection/rkey path"), exc


# --------------------------------------------------------------------------------------------
# 12. NodeDecodeError
# --------------------------------------------------------------------------------------------


def _node_cbor(value: Any) -> bytes:
    """A CAR whose data CID points at ``value`` encoded as canonical CBOR."""
    repo = Repo()
    return repo.car(repo.put(cbor2.dumps(value, canonical=True)))


def _entry(key: str, **override: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {"k": key.encode(), "p": 0, "t": None, "v": link(dag_cbor_cid(record_block(key)))}
    entry.update(override)
    return {name: value for name, value in entry.items() if value is not _DROP}


_DROP = object()


def data_is_a_record() -> bytes:
    repo = Repo()
    return repo.car(repo.record("not a node"))


def data_is_garbage_cbor() -> bytes:
    repo = Repo()
    return repo.car(repo.put(b"\xff\xfe\xfd garbage"))


def data_is_truncated_node() -> bytes:
    repo = Repo()
    node = encode_node(None, [(0, L0[0].encode(), dag_cbor_cid(record_block(L0[0])), None)])
    return repo.car(repo.put(node[:-5]))


def data_is_the_commit() -> bytes:
    commit_block = encode_commit(did=DID, data_cid=forged_cid("x"), rev=REV)
    repo = Repo()
    # The CAR's commit points its data at another commit block (a map without e and l).
    return repo.car(repo.put(commit_block))


def data_is_a_list() -> bytes:
    return _node_cbor([[], None])


def node_without_l() -> bytes:
    return _node_cbor({"e": []})


def node_without_e() -> bytes:
    return _node_cbor({"l": None})


def node_l_is_int() -> bytes:
    return _node_cbor({"e": [], "l": 5})


def node_l_is_bytes() -> bytes:
    return _node_cbor({"e": [_entry(L0[0])], "l": dag_cbor_cid(b"x")})


def node_e_is_a_map() -> bytes:
    return _node_cbor({"e": {}, "l": None})


def entry_not_a_map() -> bytes:
    return _node_cbor({"e": [[0, L0[0].encode()]], "l": None})


def entry_missing_v() -> bytes:
    return _node_cbor({"e": [_entry(L0[0], v=_DROP)], "l": None})


def entry_missing_t() -> bytes:
    return _node_cbor({"e": [_entry(L0[0], t=_DROP)], "l": None})


def entry_missing_p() -> bytes:
    return _node_cbor({"e": [_entry(L0[0], p=_DROP)], "l": None})


def entry_k_is_text() -> bytes:
    return _node_cbor({"e": [_entry(L0[0], k=L0[0])], "l": None})


def entry_p_is_text() -> bytes:
    return _node_cbor({"e": [_entry(L0[0], p="0")], "l": None})


def entry_v_is_bytes() -> bytes:
    return _node_cbor({"e": [_entry(L0[0], v=dag_cbor_cid(b"x"))], "l": None})


def entry_v_is_null() -> bytes:
    return _node_cbor({"e": [_entry(L0[0], v=None)], "l": None})


def entry_t_is_text() -> bytes:
    return _node_cbor({"e": [_entry(L1[0], t="bafy")], "l": None})


def subtree_is_a_record() -> bytes:
    repo = Repo()
    return repo.car(repo.node((L1[0], repo.record("not a node"))))


@cases(
    data_is_a_record,
    data_is_garbage_cbor,
    data_is_truncated_node,
    data_is_the_commit,
    data_is_a_list,
    node_without_l,
    node_without_e,
    node_l_is_int,
    node_l_is_bytes,
    node_e_is_a_map,
    entry_not_a_map,
    entry_missing_v,
    entry_missing_t,
    entry_missing_p,
    entry_k_is_text,
    entry_p_is_text,
    entry_v_is_bytes,
    entry_v_is_null,
    entry_t_is_text,
    subtree_is_a_record,
)
async def test_node_decode_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), NodeDecodeError)


@cases(data_is_a_record, data_is_garbage_cbor, subtree_is_a_record, node_l_is_int, entry_missing_v)
async def test_node_decode_error_with_block_processor(mode: str, build: Callable[[], bytes]) -> None:
    # With a processor, blocks that cannot be nodes are processed at load time (NOT_A_NODE later).
    await walk_error(mode, build(), NodeDecodeError, lambda b: b.with_block_processor(len))


# --------------------------------------------------------------------------------------------
# 13. MissingBlockError
# --------------------------------------------------------------------------------------------


def root_node_absent() -> bytes:
    repo = Repo()
    root = repo.node(L0[0])
    return repo.car(root, drop=(root,))


def l_subtree_absent() -> bytes:
    k1 = L1[0]
    repo = Repo()
    left = repo.node(key_on(0, before=k1))
    return repo.car(repo.node(k1, left=left), drop=(left,))


def t_subtree_absent() -> bytes:
    k1 = L1[0]
    repo = Repo()
    right = repo.node(key_on(0, after=k1))
    return repo.car(repo.node((k1, right)), drop=(right,))


def deep_subtree_absent() -> bytes:
    repo, root = three_level_repo()
    deepest = dag_cbor_cid(encode_node(None, [(0, K0_AFTER.encode(), dag_cbor_cid(record_block(K0_AFTER)), None)]))
    assert deepest in repo.blocks
    return repo.car(root, drop=(deepest,))


def commit_absent() -> bytes:
    repo = Repo()
    return repo.car(repo.node(L0[0]), commit=False)


@cases(root_node_absent, l_subtree_absent, t_subtree_absent, deep_subtree_absent, commit_absent)
async def test_missing_block_error(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), MissingBlockError)


async def test_missing_record_block_names_its_key(mode: str) -> None:
    a, b, c = L0[:3]
    repo = Repo()
    root = repo.node(a, b, c)
    exc = await walk_error(mode, repo.car(root, drop=(dag_cbor_cid(record_block(b)),)), MissingBlockError)
    assert repr(b) in str(exc)


async def test_commit_absent_fails_at_load(mode: str) -> None:
    repo = Repo()
    car = repo.car(repo.node(L0[0]), commit=False)
    if mode == "memory":
        with pytest.raises(MissingBlockError) as excinfo:
            await DriverBuilder().load_car(car)
    else:
        spill = await DriverBuilder().with_mem_limit_mb(0.0001).load_car(car)
        assert isinstance(spill, NeedDisk)
        async with await DiskBuilder().open() as store:
            with pytest.raises(MissingBlockError) as excinfo:
                await spill.finish_loading(store)
    assert type(excinfo.value) is MissingBlockError
    assert "commit" in str(excinfo.value)


# --------------------------------------------------------------------------------------------
# 14. Cycles through forged CIDs end with an error
# --------------------------------------------------------------------------------------------


def _self_linked(layer: int, side: str) -> bytes:
    """A root on ``layer`` whose ``l`` or ``t`` is its own (forged) CID."""
    key = L0[0] if layer == 0 else L1[0]
    me = forged_cid(f"self-{layer}-{side}")
    repo = Repo()
    if side == "t":
        repo.node((key, me), cid=me)
    else:
        repo.node(key, left=me, cid=me)
    return repo.car(me)


def layer0_node_t_to_itself() -> bytes:
    return _self_linked(0, "t")


def layer0_node_l_to_itself() -> bytes:
    return _self_linked(0, "l")


def layer1_node_t_to_itself() -> bytes:
    return _self_linked(1, "t")


def layer1_node_l_to_itself() -> bytes:
    return _self_linked(1, "l")


def subtree_t_to_itself() -> bytes:
    """A layer-2 root whose layer-1 subtree links to itself."""
    me = forged_cid("subtree-self")
    repo = Repo()
    k2 = L2[0]
    repo.node((key_on(1, after=k2), me), cid=me)
    return repo.car(repo.node((k2, me)))


def empty_node_l_to_itself() -> bytes:
    me = forged_cid("empty-self")
    repo = Repo()
    repo.put(encode_node(me, []), cid=me)
    return repo.car(repo.node(L2[0], left=me))


def two_empty_nodes_in_a_cycle() -> bytes:
    a, b = forged_cid("cycle-a"), forged_cid("cycle-b")
    repo = Repo()
    repo.put(encode_node(b, []), cid=a)
    repo.put(encode_node(a, []), cid=b)
    return repo.car(repo.node(L2[0], left=a))


def long_chain_of_empty_nodes() -> bytes:
    repo = Repo()
    below = repo.node(L0[0])
    for _ in range(50):
        below = repo.node(left=below)
    return repo.car(repo.node(key_on(2, after=L0[0]), left=below))


@cases(
    layer0_node_t_to_itself,
    layer0_node_l_to_itself,
    layer1_node_t_to_itself,
    layer1_node_l_to_itself,
    subtree_t_to_itself,
    empty_node_l_to_itself,
    two_empty_nodes_in_a_cycle,
    long_chain_of_empty_nodes,
)
async def test_cycles_and_chains_fail_without_looping(mode: str, build: Callable[[], bytes]) -> None:
    await walk_error(mode, build(), SubtreeLayerError)


async def test_subtrees_sharing_one_node_repeat_keys(mode: str) -> None:
    # ``l`` and ``t`` of a layer-1 root both link to one layer-0 node: its keys would come twice.
    k1 = L1[0]
    repo = Repo()
    shared = repo.node(key_on(0, before=k1))
    await walk_error(mode, repo.car(repo.node((k1, shared), left=shared)), KeyOrderError)


# --------------------------------------------------------------------------------------------
# 15. DepthLimitError
# --------------------------------------------------------------------------------------------


async def test_depth_limit_error(mode: str) -> None:
    repo, root = three_level_repo()
    car = repo.car(root)
    await walk_error(mode, car, DepthLimitError, lambda b: b.with_max_depth(2))
    await walk_error(mode, car, DepthLimitError, lambda b: b.with_max_depth(1))
    assert await walk(mode, car, lambda b: b.with_max_depth(3)) == expected(K0, K1, K2, K0_AFTER)


async def test_depth_limit_counts_empty_nodes(mode: str) -> None:
    # A layer-2 root over an empty layer-1 node over a layer-0 node is three deep as well.
    repo = Repo()
    k2 = key_on(2, after=L0[0])
    root = repo.node(k2, left=repo.node(left=repo.node(L0[0])))
    car = repo.car(root)
    await walk_error(mode, car, DepthLimitError, lambda b: b.with_max_depth(2))
    assert await walk(mode, car, lambda b: b.with_max_depth(3)) == expected(L0[0], k2)


async def test_repeated_cid_first_block_wins_in_both_modes(mode: str) -> None:
    """A forged CID labelling two different nodes: the first one in the CAR is used, in memory
    and on disk alike (on disk, even when the copies fall into different batches)."""
    first, second = f"{POST}/0000000000000", f"{POST}/0000000000001"
    repo = Repo()
    label = forged_cid("dup")
    one = Repo()
    one.node(first, cid=label)
    two = Repo()
    two.node(second, cid=label)
    records = [(c, b) for c, b in {**one.blocks, **two.blocks}.items() if c != label]
    car = repo.car(label, extra=[(label, one.blocks[label]), *records, (label, two.blocks[label])])
    assert await walk(mode, car) == expected(first)
