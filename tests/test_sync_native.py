"""The C core's partial-tree functions against their pure-Python reference, differentially.

``load_node`` (one MST node decoded and checked), ``encode_node`` (a node block and its CID) and
``lookup_and_invert`` (a commit's whole tree work: lookups, inverse ops, the new root) must give
the same results and the same errors (class, message, ``cid``) as :mod:`repo_stream.sync.partial`
and :mod:`repo_stream.sync.invert`, on generated commits and on mutated node bytes.
"""

from __future__ import annotations

import importlib
import random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_stream.core import implementation
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.core.mst import key_layer
from repo_stream.errors import KeyAbsentError, KeyExistsError, RepoStreamError
from repo_stream.records.generate import generate_records
from repo_stream.records.writer import build_mst
from repo_stream.sync import partial
from repo_stream.sync.events import decode_frame
from repo_stream.sync.generate import CommitGenerator, make_signer, tid
from repo_stream.sync.invert import Op
from repo_stream.sync.verify import parse_cid

invert_module = importlib.import_module("repo_stream.sync.invert")

pytestmark = pytest.mark.skipif(implementation.C is None, reason="the C core is not built")

if implementation.C is not None:
    from repo_stream import _native

POOL = [block for _, block in generate_records(60, seed=3, profile="small")]
SIGN, _KEY = make_signer("k256", 5)
CIDS = [dag_cbor_cid(b"record %d" % i) for i in range(8)]


def _keys(n: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = set()
    while len(out) < n:
        collection = rng.choice(["app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.graph.follow"])
        out.add(f"{collection}/{tid(rng.randrange(1 << 50), rng.getrandbits(10))}".encode())
    return sorted(out)


KEYS = _keys(200, 11)


@pytest.fixture(params=["both"], autouse=True)
def impl(request: pytest.FixtureRequest) -> str:
    """Each test runs both implementations itself (overrides conftest's parametrised fixture)."""
    return str(request.param)


def outcome(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """What ``fn(*args, **kwargs)`` gave: ``("ok", value)`` with errors inside it made comparable, or the error."""
    try:
        return ("ok", comparable(fn(*args, **kwargs)))
    except RepoStreamError as exc:
        return ("error", comparable(exc))
    except (ValueError, TypeError) as exc:
        return ("error", type(exc).__name__, str(exc))


def comparable(value: Any) -> Any:
    if isinstance(value, BaseException):
        return (type(value).__name__, str(value), getattr(value, "cid", None))
    if isinstance(value, (list, tuple)):
        return [comparable(v) for v in value]
    return value


# ------------------------------------------------------------------------------ load_node


def _node_blocks(n: int, seed: int) -> tuple[bytes, dict[bytes, bytes]]:
    rng = random.Random(seed)
    keys = rng.sample(KEYS, n)
    return build_mst(sorted((k, CIDS[i % 8]) for i, k in enumerate(keys)))


TREES = [_node_blocks(n, seed) for seed, n in enumerate((1, 3, 12, 40, 120))]


def _both_load(cid: bytes, block: bytes, expected: int, lo: bytes | None, hi: bytes | None, check_keys: bool) -> None:
    c = outcome(_native.load_node, cid, block, expected, lo, hi, check_keys)
    py = outcome(partial.load_node, cid, block, expected, lo, hi, check_keys)
    assert c == py


def test_load_node_every_node_of_real_trees() -> None:
    loaded = 0
    for _root, nodes in TREES:
        for cid, block in nodes.items():
            for expected in (-1, 0, 1, 2, 3):
                _both_load(cid, block, expected, None, None, True)
            got = outcome(_native.load_node, cid, block, -1, None, None, True)
            if got[0] == "ok":  # a node with entries: its keys, in order, on its layer
                layer, keys, vals, kids = got[1]
                assert keys == sorted(keys) and len(kids) == len(keys) + 1 and len(vals) == len(keys)
                assert all(key_layer(k) == layer for k in keys)
                loaded += 1
            else:  # a node with only ``l`` cannot be a root
                assert got[1][0] == "EmptyRootError"
    assert loaded > 20


@settings(max_examples=400, deadline=None)
@given(tree=st.integers(0, len(TREES) - 1), pick=st.integers(0, 1000), position=st.integers(0, 100_000), byte=st.integers(0, 255),
       how=st.sampled_from(["set", "insert", "delete"]), expected=st.integers(-1, 4), bounds=st.integers(0, 3), check_keys=st.booleans())
def test_load_node_mutated_bytes(tree: int, pick: int, position: int, byte: int, how: str, expected: int, bounds: int, check_keys: bool) -> None:
    _, nodes = TREES[tree]
    cid = sorted(nodes)[pick % len(nodes)]
    block = bytearray(nodes[cid])
    at = position % (len(block) + 1)
    if how == "set" and at < len(block):
        block[at] = byte
    elif how == "insert":
        block[at:at] = bytes([byte])
    elif at < len(block):
        del block[at]
    lo = KEYS[position % 50] if bounds & 1 else None
    hi = KEYS[150 + position % 50] if bounds & 2 else None
    _both_load(cid, bytes(block), expected, lo, hi, check_keys)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), expected=st.integers(-1, 3))
def test_load_node_random_bytes(data: bytes, expected: int) -> None:
    _both_load(dag_cbor_cid(data), data, expected, None, None, True)


def test_load_node_rules() -> None:
    # Keys that are not repo paths: refused with check_keys, accepted without (both ways alike).
    odd = [b"A0/374913", b"B1/2", b"zz"]
    root, nodes = build_mst(sorted((k, CIDS[0]) for k in odd))
    for check in (True, False):
        for cid, block in nodes.items():
            _both_load(cid, block, -1, None, None, check)
    # Bounds: keys must lie strictly between lo and hi.
    root, nodes = build_mst([(KEYS[10], CIDS[0])], layer_of=lambda _: 0)
    for lo, hi in ((KEYS[10], None), (None, KEYS[10]), (KEYS[11], None), (None, KEYS[9]), (KEYS[9], KEYS[11])):
        _both_load(root, nodes[root], 0, lo, hi, True)
    with pytest.raises(RepoStreamError):
        _native.load_node(root, nodes[root], 0, KEYS[10], None, True)


def test_load_node_first_entry_prefix_outside() -> None:
    """A first entry with a prefix length other than 0 (here -13): both name the previous key b"" (the C
    core said None once: found by the fuzzer)."""
    # {e: [{k: b"zzz.zzzz.edge/222gaptmdeedq", p: -13, t: null, v: <link>}], l: null}
    link = b"\xd8\x2aX%\x00\x01q\x12 " + bytes(32)
    block = b"\xa2ae\x81\xa4akX\x1bzzz.zzzz.edge/222gaptmdeedqap\x2cat\xf6av" + link + b"al\xf6"
    cid = dag_cbor_cid(block)
    for expected in (-1, 0, 2):
        _both_load(cid, block, expected, None, None, True)
    with pytest.raises(RepoStreamError, match="outside the previous key b''"):
        _native.load_node(cid, block, -1, None, None, True)


def test_load_node_argument_errors() -> None:
    root, nodes = TREES[1]
    with pytest.raises(ValueError):
        _native.load_node(root, nodes[root], 200, None, None, True)
    with pytest.raises(TypeError):
        _native.load_node(root, nodes[root], -1, "a", None, True)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ encode_node


@settings(max_examples=200, deadline=None)
@given(picks=st.sets(st.integers(0, len(KEYS) - 1), max_size=30), left=st.booleans(), rights=st.lists(st.booleans(), min_size=30, max_size=30),
       odd=st.booleans())
def test_encode_node_matches(picks: set[int], left: bool, rights: list[bool], odd: bool) -> None:
    keys = [KEYS[i] for i in sorted(picks)]
    if odd:  # long keys, long suffixes and odd CIDs (heads of 2 and 3 bytes)
        keys = [k + b"x" * 300 * (i % 3) for i, k in enumerate(keys)]
    vals = [CIDS[i % 8] if not odd or i % 2 else CIDS[i % 8] + b"\x00" * 300 for i in range(len(keys))]
    rs: list[bytes | None] = [CIDS[(i + 1) % 8] if rights[i] else None for i in range(len(keys))]
    lcid = CIDS[7] if left else None
    assert _native.encode_node(lcid, keys, vals, rs) == partial.encode_node(lcid, keys, vals, rs)


def test_encode_node_length_errors() -> None:
    keys = KEYS[:3]
    for vals, rights in ((CIDS[:2], [None] * 3), (CIDS[:4], [None] * 3), (CIDS[:3], [None] * 2), (CIDS[:3], [None] * 4)):
        assert outcome(_native.encode_node, None, keys, vals, rights) == outcome(partial.encode_node, None, keys, vals, rights)
        assert outcome(_native.encode_node, None, keys, vals, rights)[0] == "error"
    assert outcome(_native.encode_node, None, [], CIDS[:1], []) == outcome(partial.encode_node, None, [], CIDS[:1], [])


# ------------------------------------------------------------------------------ lookup_and_invert


def _work(message: bytes) -> tuple[bytes, dict[bytes, bytes], list[Op]]:
    """The commit's data root, blocks and ops, as verify_commit finds them."""
    from repo_stream.core.commit import decode_commit

    body: Any = decode_frame(message).body
    roots, blocks = partial.read_car_slice(body["blocks"])
    _, data = decode_commit(blocks[roots[0]], roots[0], strict=True)
    ops = [
        Op(o["action"], o["path"], None if o["cid"] is None else parse_cid(o["cid"]), None if o.get("prev") is None else parse_cid(o["prev"]))
        for o in body["ops"]
    ]
    return data, blocks, ops


def _both_invert(root: bytes, blocks: Any, keys: list[bytes], ops: list[Op], check_keys: bool = True) -> tuple[Any, ...]:
    got = []
    for name in ("c", "python"):
        implementation.use(name)
        try:
            got.append(outcome(invert_module.lookup_and_invert, root, blocks, keys, ops, check_keys=check_keys))
        finally:
            implementation.use("c")
    assert got[0] == got[1]
    return got[0]


def _mutations(rng: random.Random, data: bytes, blocks: dict[bytes, bytes], ops: list[Op]) -> list[tuple[dict[bytes, bytes], list[Op]]]:
    out: list[tuple[dict[bytes, bytes], list[Op]]] = []
    node_cids = [c for c, b in blocks.items() if b[:1] == b"\xa2" and b"\x61e" in b[:4]]
    for cid in node_cids[:4]:  # a proof block missing
        out.append(({c: b for c, b in blocks.items() if c != cid}, ops))
    for _ in range(4):  # a node's bytes changed (blocks are not hash-checked here)
        if node_cids:
            cid = rng.choice(node_cids)
            block = bytearray(blocks[cid])
            block[rng.randrange(len(block))] = rng.randrange(256)
            out.append(({**blocks, cid: bytes(block)}, ops))
    if ops:  # an op's CIDs or action changed
        i = rng.randrange(len(ops))
        op = ops[i]
        for changed in (
            op._replace(cid=CIDS[1]) if op.cid is not None else op._replace(prev=CIDS[1]),
            op._replace(prev=CIDS[2]) if op.prev is not None else op,
            op._replace(action="delete", cid=None, prev=op.cid or op.prev),
            op._replace(path=KEYS[rng.randrange(len(KEYS))].decode()),
        ):
            out.append((blocks, [*ops[:i], changed, *ops[i + 1 :]]))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), size=st.sampled_from([0, 1, 5, 60, 300]), batches=st.integers(1, 4), creates=st.floats(0, 1),
       proof=st.sampled_from(["covering", "minimal"]))
def test_lookup_and_invert_generated_commits(seed: int, size: int, batches: int, creates: float, proof: str) -> None:
    rng = random.Random(seed)
    gen = CommitGenerator("did:plc:native", SIGN, generate_records(size, seed=seed, profile="small"), seed=seed, pool=POOL, proof=proof)  # type: ignore[arg-type]
    inverted = 0
    for _ in range(batches):
        old_root = gen.root
        message = gen.commit(gen.random_ops(rng.randint(1, 8), creates=creates, updates=(1 - creates) / 2))
        data, blocks, ops = _work(message)
        keys = [op.path.encode() for op in ops]
        got = _both_invert(data, blocks, keys, ops)
        assert got[0] == "ok"
        held, root = got[1]
        assert root == old_root  # the inversion reaches the previous tree's root
        assert held == [op.cid for op in ops]  # creates and updates hold their cid, deletes nothing
        inverted += 1
        for mutated, mutated_ops in _mutations(rng, data, blocks, ops):
            _both_invert(data, mutated, [op.path.encode() for op in mutated_ops], mutated_ops)
            _both_invert(data, mutated, [], mutated_ops, check_keys=False)
    assert inverted == batches


def test_lookup_and_invert_errors_come_back_as_values() -> None:
    keys = KEYS[:40]
    root, nodes = build_mst(sorted((k, CIDS[i % 8]) for i, k in enumerate(keys)))
    absent = next(k for k in KEYS[40:] if key_layer(k) == 0)
    # A lookup of a key in a missing subtree ends the lookups; no inversion is made.
    child = next(c for c in nodes if c != root)
    held, inv = _both_invert(root, {c: b for c, b in nodes.items() if c != child}, keys, [])[1]
    assert inv is None and held[-1][0] == "UnknownSubtreeError" and held[-1][2] == child
    # Inverting a create of a key the tree does not hold; of one holding another CID; of a delete of a held key.
    cases = [
        (Op("create", absent.decode(), CIDS[0], None), KeyAbsentError),
        (Op("create", keys[3].decode(), CIDS[5], None), KeyExistsError),
        (Op("delete", keys[3].decode(), None, CIDS[0]), KeyExistsError),
        (Op("update", keys[3].decode(), CIDS[5], CIDS[1]), KeyAbsentError),
    ]
    for op, error in cases:
        held, inv = _both_invert(root, nodes, [], [op])[1]
        assert held == [] and inv[0] == error.__name__, (op, inv)
    # No ops: the root is never read (so even an absent one is no error).
    assert _both_invert(CIDS[0], {}, [], [])[1] == [[], CIDS[0]]
    # An op lacking its CIDs is refused before anything is read.
    assert _both_invert(root, nodes, [], [Op("create", keys[0].decode(), None, None)])[:2] == ("error", "ValueError")


def test_lookup_and_invert_empty_tree_and_back() -> None:
    empty = dag_cbor_cid(b"\xa2ae\x80al\xf6")
    key = KEYS[5]
    root, nodes = build_mst([(key, CIDS[3])])
    blocks = {**nodes, empty: b"\xa2ae\x80al\xf6"}
    # Undo a create of the only key: the empty tree's root.
    held, inv = _both_invert(root, blocks, [key], [Op("create", key.decode(), CIDS[3], None)])[1]
    assert held == [CIDS[3]] and inv == empty
    # Undo a delete of the only key, from the empty tree.
    held, inv = _both_invert(empty, blocks, [key], [Op("delete", key.decode(), None, CIDS[3])])[1]
    assert held == [None] and inv == root


def test_lookup_and_invert_guards() -> None:
    with pytest.raises(TypeError):
        _native.lookup_and_invert(CIDS[0], {}, ["a"], [], True, 32)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _native.lookup_and_invert(CIDS[0], {}, [], [(0, "a", b"a")], True, 32)  # type: ignore[list-item]
    with pytest.raises(ValueError):
        _native.lookup_and_invert(CIDS[0], {}, [], [(0, "a", b"a", None, None)], True, 32)
    root = TREES[2][0]
    # A block that is not bytes: a TypeError, not a crash.
    with pytest.raises(TypeError):
        _native.lookup_and_invert(root, {root: "text"}, [KEYS[0]], [], True, 32)  # type: ignore[dict-item]


def test_car_header_fast_path() -> None:
    """decode_header's shortcut for the usual one-root header gives what the decoder gives, and
    headers that differ from it in any byte go through the decoder (and its errors)."""
    from repo_stream.core import car
    from repo_stream.core.dagcbor import StrictDecoder
    from repo_stream.errors import CarHeaderError, CidError

    cid = CIDS[3]
    usual = b"\xa2\x65roots\x81\xd8\x2a\x58\x25\x00" + cid + b"\x67version\x01"
    assert len(usual) == 58
    assert car.decode_header(usual, 1) == [cid] == [r.value[1:] for r in StrictDecoder(max_depth=8).decode(usual)["roots"]]
    for i in range(len(usual)):
        for flip in (0x01, 0x80):
            changed = bytearray(usual)
            changed[i] ^= flip
            try:
                got = car.decode_header(bytes(changed), 1)
            except (CarHeaderError, CidError):
                continue
            # accepted: then only as a header whose one root the decoder finds too (a CID other
            # than the usual prefix, say)
            assert got == [r.value[1:] for r in StrictDecoder(max_depth=8).decode(bytes(changed))["roots"]]
    with pytest.raises(CarHeaderError, match="version is 2"):
        car.decode_header(usual[:-1] + b"\x02", 1)


def test_sha256_both_ways() -> None:
    """The core's SHA-256 (the SHA extensions where the CPU has them) and its portable rounds give
    hashlib's digests, at every length around the block and padding edges and at random ones."""
    import hashlib

    rng = random.Random(2)
    lengths = [*range(200), *(rng.randrange(200, 70_000) for _ in range(100))]
    for n in lengths:
        data = rng.randbytes(n)
        want = hashlib.sha256(data).digest()
        assert _native.sha256(data) == want, n
        assert _native.sha256_portable(data) == want, n
    msgs = [rng.randbytes(rng.randrange(0, 3000)) for _ in range(40)] + [rng.randbytes(30) for _ in range(40)]
    for lanes in (1, 8, 16):
        assert _native.sha256_many(msgs, lanes) == [hashlib.sha256(m).digest() for m in msgs]


def test_sha256_two_at_once() -> None:
    """The core's two-message SHA-256 (both messages' rounds interleaved; read_car's CID checks)
    gives hashlib's digest for each, in order: both lanes at every length 0..300 against lengths
    shorter, longer and equal (each side empty too), and at random lengths up to 1 MiB."""
    import hashlib

    rng = random.Random(3)
    pairs = [(a, b) for a in range(301) for b in (0, 1, 55, 56, 63, 64, 65, 119, 120, 127, 128, 300, a, 300 - a)]
    pairs += [(rng.randrange(0, 1 << 20), rng.randrange(0, 70_000)) for _ in range(20)]
    for len_a, len_b in pairs:
        a, b = rng.randbytes(len_a), rng.randbytes(len_b)
        want = (hashlib.sha256(a).digest(), hashlib.sha256(b).digest())
        assert _native.sha256_x2(a, b) == want, (len_a, len_b)
        assert _native.sha256_x2(b, a) == want[::-1], (len_b, len_a)
    same = rng.randbytes(1000)
    assert _native.sha256_x2(same, memoryview(same)) == (hashlib.sha256(same).digest(),) * 2
    with pytest.raises(TypeError):
        _native.sha256_x2(b"", "text")  # type: ignore[arg-type]


@given(st.one_of(st.binary(max_size=300), st.binary(min_size=35, max_size=300).map(lambda b: b"\x01" + b), st.sampled_from([b"\x01q\x12 ", b"\x01U\x12 "]).flatmap(lambda p: st.binary(min_size=32, max_size=32).map(lambda d: p + d))))
@settings(max_examples=300, deadline=None)
def test_cid_text_both_ways(raw: bytes) -> None:
    """_native.cid_text (the sync service's record and root CIDs) gives the reference's text
    (repo_stream.core.cid.cid_text) for any bytes: base32 for a CIDv1, the reference's own
    answer for anything else (CIDv0, no CID, over 256 bytes), from any bytes-like object."""
    from repo_stream.core.cid import cid_text

    want = cid_text(raw)
    assert _native.cid_text(raw) == want
    assert _native.cid_text(bytearray(raw)) == want and _native.cid_text(memoryview(raw)) == want
    assert implementation.C is not None and implementation.C.cid_text(raw) == implementation.PYTHON.cid_text(raw)


def test_cid_text_argument_errors() -> None:
    with pytest.raises(TypeError):
        _native.cid_text("bafy")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _native.cid_text(None)  # type: ignore[arg-type]


def _sections_into(parser_type: Any, car: bytes, chunk: int, verify: bool) -> tuple[Any, ...]:
    parser = parser_type(1024, verify)
    blocks: dict[bytes, bytes] = {}
    counts = []
    header = None
    try:
        for at in range(0, len(car), chunk):
            parser.feed(car[at : at + chunk])
            if header is None:
                header = parser.read_header()
            if header is not None:
                counts.append(parser.sections_into(blocks))
        parser.finish()
    except RepoStreamError as exc:
        return ("error", comparable(exc), counts, list(blocks.items()))
    return ("ok", counts, list(blocks.items()))


def test_car_parser_sections_into_both_ways() -> None:
    """CarParser.sections_into (read_car_slice's loop in one call): the C parser's and the
    reference's give the same dict (first block of a CID given twice kept, insertion order) and
    counts, fed whole or in pieces, and the same error with the same sections before it."""
    from repo_stream.core.car import CarParser as PyCarParser
    from repo_stream.records.writer import car_bytes

    blocks = [(dag_cbor_cid(b), b) for b in POOL[:12]]
    twice = [*blocks[:3], (blocks[1][0], b"another block"), *blocks[3:]]  # CID given twice: the first stays
    good = car_bytes([blocks[0][0]], blocks)
    cases = [good, car_bytes([blocks[0][0]], twice), good[:-5], good + b"\x05\x01", good[:200] + b"\xff" + good[201:]]
    big = car_bytes([blocks[0][0]], [*blocks[:2], (dag_cbor_cid(b"x" * 2000), b"x" * 2000)])  # over the 1024-byte limit
    cases.append(big)
    for car in cases:
        for chunk in (len(car), 97, 7):
            for verify in (True, False):
                got = _sections_into(_native.CarParser, car, chunk, verify)
                assert got == _sections_into(PyCarParser, car, chunk, verify)
    ok = _sections_into(_native.CarParser, car_bytes([blocks[0][0]], twice), 50, False)  # unchecked: the twin is kept out
    assert ok[0] == "ok" and sum(ok[1]) == len(twice) and ok[2] == blocks
    with pytest.raises(TypeError):
        _native.CarParser(1024, False).sections_into([])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ commit_event (verify_commit's fast path)


def _verify_outcome(message: bytes, **kwargs: Any) -> tuple[Any, ...]:
    """verify_commit's result (JSON form and record blocks) or error (class, message, cid, did, rev)."""
    from repo_stream.sync.verify import verify_commit

    try:
        result = verify_commit(message, key=_KEY, now=2e9, **kwargs)
    except RepoStreamError as exc:
        got = exc.result if hasattr(exc, "result") else None  # OutOfSyncError carries the result
        return ("error", type(exc).__name__, str(exc), getattr(exc, "cid", None), getattr(exc, "did", None), getattr(exc, "rev", None),
                None if got is None else got.to_json())
    return ("ok", result.to_json(), [(op.block, type(op.cid).__name__, type(op.prev).__name__) for op in result.ops])


def _both_verify(message: bytes, **kwargs: Any) -> tuple[Any, ...]:
    got = []
    for name in ("c", "python"):
        implementation.use(name)
        try:
            got.append(_verify_outcome(message, **kwargs))
        finally:
            implementation.use("c")
    assert got[0] == got[1]
    return got[0]


def _fast(message: bytes, check_keys: bool = True) -> Any:
    from repo_stream.records.values import Link

    return _native.commit_event(message, check_keys, Link, 200, 2_000_000, 2 * 1024 * 1024, 256)


_HEADER = b"\xa2\x61t\x67#commit\x62op\x01"


def _message(body: dict[str, Any]) -> bytes:
    import cbrrr

    from repo_stream.records.values import Link

    return _HEADER + cbrrr.encode_dag_cbor(body, cid_type=Link)


def _generated(seed: int, n: int = 4) -> list[bytes]:
    rng = random.Random(seed)
    gen = CommitGenerator("did:plc:native", SIGN, generate_records(40, seed=seed, profile="small"), seed=seed, pool=POOL)  # type: ignore[arg-type]
    return [gen.commit(gen.random_ops(rng.randint(1, 8), creates=0.5, updates=0.25)) for _ in range(n)]


def test_commit_event_reads_generated_commits_as_the_reference() -> None:
    from repo_stream.sync.verify import RepoState

    for seed in range(6):
        for message in _generated(seed):
            assert _fast(message) is not None  # the usual message: read in C
            assert _both_verify(message)[0] == "ok"
            assert _both_verify(message, check_keys=False)[0] == "ok"
            body: Any = decode_frame(message).body
            assert _both_verify(message, prev=RepoState(body["since"], body["prevData"]))[0] == "ok"
            assert _both_verify(message, prev=RepoState(body["since"], CIDS[0]))[1] == "OutOfSyncError"
            assert _both_verify(message, prev=RepoState(body["rev"], body["prevData"]))[1] == "StaleRevError"


def _variants(body: dict[str, Any]) -> list[tuple[str, dict[str, Any], bool]]:
    """(what, body, read in C) for bodies changed one way each."""
    from repo_stream.records.values import Link

    def op_changed(i: int, **changes: Any) -> dict[str, Any]:
        ops = [dict(op) for op in body["ops"]]
        ops[i].update(changes)
        for k in [k for k, v in changes.items() if v is _DROP]:
            del ops[i][k]
        return {**body, "ops": ops}

    first = body["ops"][0]
    raw_link = Link(b"\x01\x55" + first["cid"].cid_bytes[2:]) if first["cid"] is not None else Link(b"\x01\x55" + CIDS[0][2:])
    blocks = body["blocks"]
    out = [
        ("since null", {**body, "since": None}, True),
        ("no since", {k: v for k, v in body.items() if k != "since"}, True),
        ("no seq, no time", {k: v for k, v in body.items() if k not in ("seq", "time")}, True),
        ("rebase", {**body, "rebase": True}, True),
        ("a blob", {**body, "blobs": [Link(CIDS[3])]}, True),
        ("prevData null", {**body, "prevData": None}, True),
        ("no prevData", {k: v for k, v in body.items() if k != "prevData"}, True),
        ("an unknown field", {**body, "zzz": 1}, False),
        ("tooBig", {**body, "tooBig": True}, False),
        ("time null", {**body, "time": None}, False),
        ("seq negative", {**body, "seq": -1}, False),
        ("repo not text", {**body, "repo": b"did:plc:native"}, False),
        ("another repo", {**body, "repo": "did:plc:other"}, False),
        ("another rev", {**body, "rev": "3kaaaaaaaaaaa"}, False),
        ("a long rev", {**body, "rev": "3" * 201}, False),
        ("blocks not bytes", {**body, "blocks": "x"}, False),
        ("ops not a list", {**body, "ops": {}}, False),
        ("commit a raw CID", {**body, "commit": raw_link}, False),
        ("commit not the root", {**body, "commit": Link(CIDS[2])}, False),
        ("a block changed", {**body, "blocks": blocks[:-1] + bytes([blocks[-1] ^ 1])}, False),
        ("blocks cut", {**body, "blocks": blocks[:-5]}, False),
        ("blocks of another CAR header", {**body, "blocks": b"\x00" + blocks}, False),
        ("op with an unknown key", op_changed(0, zzz=1), False),
        ("op action unknown", op_changed(0, action="frobnicate"), False),
        ("op path invalid", op_changed(0, path="not a key"), False),
        ("op path long", op_changed(0, path="app.bsky.feed.like/" + "a" * 1100), False),
        ("op without action", op_changed(0, action=_DROP), False),
        ("op cid raw", op_changed(0, cid=raw_link), False),
        ("op prev null", op_changed(0, prev=None), first["action"] == "create"),
        ("op duplicate path", {**body, "ops": [*body["ops"], body["ops"][0]]}, False),
    ]
    if first["action"] == "create":
        out.append(("create with prev", op_changed(0, prev=Link(CIDS[4])), False))
        out.append(("create without cid", op_changed(0, cid=None), False))
    else:
        out.append((f"{first['action']} without prev", op_changed(0, prev=_DROP), False))
    return out


_DROP = object()


def test_commit_event_falls_back_on_anything_unusual() -> None:
    """Each variant: read in C or not as expected, and verify_commit gives what the reference gives."""
    seen = set()
    for seed in range(3):
        for message in _generated(seed, 2):
            body: Any = decode_frame(message).body
            for what, changed, fast in _variants(body):
                changed_message = _message(changed)
                assert (_fast(changed_message) is not None) == fast, what
                for kwargs in ({}, {"require_prev_data": False}, {"check_keys": False}):
                    got = _both_verify(changed_message, **kwargs)
                    seen.add((got[0], got[1] if got[0] == "error" else ""))
    assert {o[0] for o in seen} == {"ok", "error"}
    assert {o[1] for o in seen if o[0] == "error"} >= {
        "MalformedEventError", "BlocksTooLargeError", "CommitDidMismatchError", "RevMismatchError", "MalformedCarError",
        "CommitNotRootError", "InvalidOpError", "DuplicateOpPathError", "MissingPrevDataError",
    }


def test_commit_event_not_canonical_or_other_headers() -> None:
    message = _generated(7, 1)[0]
    assert _fast(message) is not None
    assert _fast(b"\xa2\x61t\x65#sync\x62op\x01" + message[15:]) is None  # another type
    assert _fast(b"\xa2\x62op\x01\x61t\x67#commit" + message[15:]) is None  # keys out of order (cbrrr refuses it too)
    assert _fast(message + b"\x00") is None  # bytes after the body
    assert _fast(message[:-1]) is None
    assert _fast(b"") is None
    for cut in range(0, len(message), max(1, len(message) // 50)):
        assert _fast(message[:cut]) is None
    assert _both_verify(b"\xa2\x62op\x01\x61t\x67#commit" + message[15:])[1] == "MalformedEventError"


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 5), position=st.integers(0, 1 << 20), byte=st.integers(0, 255), how=st.sampled_from(["set", "insert", "delete"]),
       check_keys=st.booleans())
def test_commit_event_mutated_messages(seed: int, position: int, byte: int, how: str, check_keys: bool) -> None:
    message = _mutated(_generated(seed, 1)[0], position, byte, how)
    _both_verify(message, check_keys=check_keys, require_prev_data=False)


def _mutated(message: bytes, position: int, byte: int, how: str) -> bytes:
    """``message`` with one byte set, inserted or deleted at ``position`` (modulo its length)."""
    out = bytearray(message)
    at = position % len(out)
    if how == "set":
        out[at] = byte
    elif how == "insert":
        out.insert(at, byte)
    else:
        del out[at]
    return bytes(out)


def _with_rev(rev: str) -> bytes:
    """A generated commit whose event and commit block both carry ``rev`` (signed as such)."""
    gen = CommitGenerator("did:plc:native", SIGN, generate_records(10, seed=3, profile="small"), seed=3, pool=POOL)  # type: ignore[arg-type]
    gen._next_rev = lambda: rev  # type: ignore[method-assign]
    return gen.commit(gen.random_ops(2, creates=1.0))


_REVS = [
    "3khuwcck6sey4", "2222222222222", "jzzzzzzzzzzzz", "kzzzzzzzzzzzz", "zzzzzzzzzzzzz", "3khuwcck6sey", "3khuwcck6sey42",
    "3KHUWCCK6SEY4", "3khuwcck6sey0", "3khuwcck6sey1", "1khuwcck6sey4", "3khuwcck6sey=", "3khuwcck6se\x00y", "3khuwcck6sey\u00e9",
    "\u00e9khuwcck6sey", "3khuwcck6sé", "", "3",
]


def test_commit_event_reads_the_revs_tid_timestamp_as_tid_timestamp() -> None:
    """The C pass's timestamp of the rev is tid_timestamp's (a TID's microseconds, None for any
    other rev), and verify_commit decides the same with it (InvalidRevError, FutureRevError, ok)."""
    from repo_stream.sync.verify import tid_timestamp

    for rev in _REVS:
        message = _with_rev(rev)
        fast = _fast(message)
        assert fast is not None, rev
        assert fast[1] == rev
        assert fast[13] == tid_timestamp(rev), rev
        assert type(fast[13]) is (int if fast[13] is not None else type(None))
        outcome = _both_verify(message, require_prev_data=False)
        assert (outcome[1] == "InvalidRevError") == (tid_timestamp(rev) is None), (rev, outcome[:3])
    assert tid_timestamp("jzzzzzzzzzzzz") == (1 << 54) - 1  # the largest: 64 bits of TID less the 10 of the clock id
    assert _fast(_with_rev("jzzzzzzzzzzzz"))[13] == (1 << 54) - 1


@settings(max_examples=60, deadline=None)
@given(rev=st.text(alphabet="0123456789abcdefghijklmnopqrstuvwxyzABZ=é", min_size=12, max_size=14))
def test_commit_event_tid_timestamp_of_any_rev(rev: str) -> None:
    from repo_stream.sync.verify import tid_timestamp

    fast = _fast(_with_rev(rev))
    assert fast is not None and fast[13] == tid_timestamp(rev)


def test_commit_event_links_are_links_made_without_init() -> None:
    """The C pass makes the Link class's instances directly (object.__new__, cid_bytes set): the
    same values Link(bytes) gives; a callable that is not such a class is called."""
    from repo_stream.records.values import Link

    message = _generated(2, 1)[0]
    fast = _fast(message)
    assert fast is not None
    links = [fast[3], fast[4]] + [link for item in fast[7] for link in item[5:7] if link is not None]
    raws = [fast[3].cid_bytes, fast[4].cid_bytes] + [raw for item in fast[7] for raw in item[3:5] if raw is not None]
    assert len(links) == len(raws) >= 3
    for link, raw in zip(links, raws, strict=True):
        assert type(link) is Link and link == Link(raw) and hash(link) == hash(Link(raw)) and str(link) == str(Link(raw))
        assert link.cid_bytes is not None and bytes(link) == raw
    calls: list[bytes] = []

    def maker(raw: bytes) -> tuple[str, bytes]:
        calls.append(raw)
        return ("made", raw)

    other = _native.commit_event(message, True, maker, 200, 2_000_000, 2 * 1024 * 1024, 256)
    assert other is not None and other[3] == ("made", fast[3].cid_bytes) and len(calls) == len(raws)


def test_commit_event_guards() -> None:
    from repo_stream.records.values import Link

    message = _generated(1, 1)[0]
    with pytest.raises(TypeError):
        _native.commit_event(bytearray(message), True, Link, 200, 2_000_000, 1 << 21, 256)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        _native.commit_event(message, True, None, 200, 2_000_000, 1 << 21, 256)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _native.commit_event(message, True, Link, -1, 2_000_000, 1 << 21, 256)
    assert _native.commit_event(message, True, Link, 0, 2_000_000, 1 << 21, 256) is None  # over max_ops: the reference decides
    assert _native.commit_event(message, True, Link, 200, 10, 1 << 21, 256) is None  # over max_blocks
    assert _native.commit_event(message, True, Link, 200, 2_000_000, 1, 256) is None  # a block over max_block


# ------------------------------------------------------------------------------ commit_peek (the firehose's raw #commit)


def _peeked(message: bytes) -> tuple[Any, ...]:
    """parse_message with raw_commits (C: commit_peek) against the decoded message: the same
    values when it reads it, and it reads only messages that decode (else the same error)."""
    from repo_stream.firehose.items import RawCommit, parse_message

    try:
        decoded = parse_message(message, max_bytes=5 << 20)
    except RepoStreamError as exc:
        with pytest.raises(type(exc)) as raised:
            parse_message(message, max_bytes=5 << 20, raw_commits=True)
        assert str(raised.value) == str(exc)
        assert _native.commit_peek(message, 200) is None
        return ("error", type(exc).__name__)
    raw = parse_message(message, max_bytes=5 << 20, raw_commits=True)
    if type(raw) is not RawCommit:
        assert raw == decoded
        assert _native.commit_peek(message, 200) is None
        return ("decoded", decoded.type)
    ops = decoded.body["ops"]
    assert isinstance(ops, list)
    assert (raw.type, raw.seq, raw.did, raw.time, raw.rev, raw.ops, raw.message, raw.known) == (
        decoded.type, decoded.seq, decoded.did, decoded.time, decoded.body["rev"], [(op["action"], op["path"]) for op in ops],
        decoded.message, decoded.known,
    )  # fmt: skip
    return ("raw", raw.seq)


def test_commit_peek_reads_generated_commits_as_decoded() -> None:
    from repo_stream.firehose.items import RawCommit, parse_message

    for seed in range(4):
        for message in _generated(seed):
            body: Any = decode_frame(message).body
            with_seq = _message({**body, "seq": 12345678901, "time": "2026-12-06T09:00:00.000Z"})
            assert _peeked(with_seq) == ("raw", 12345678901)
            assert _peeked(message)[0] == ("raw" if "seq" in body else "error")
            # the reference implementation, or raw_commits off: decoded
            assert type(parse_message(with_seq, max_bytes=5 << 20)) is not RawCommit
            implementation.use("python")
            try:
                assert type(parse_message(with_seq, max_bytes=5 << 20, raw_commits=True)) is not RawCommit
            finally:
                implementation.use("c")
            # over max_bytes: the usual error
            assert _peeked(with_seq)[0] == "raw"
            with pytest.raises(RepoStreamError, match="over the"):
                parse_message(with_seq, max_bytes=len(with_seq) - 1, raw_commits=True)


def test_commit_peek_variants() -> None:
    seen = set()
    for seed in range(3):
        for message in _generated(seed, 2):
            body: Any = decode_frame(message).body
            body = {**body, "seq": 7, "time": "2026-12-06T09:00:00Z"}
            for what, changed, _ in _variants(body):
                seen.add((what, _peeked(_message(changed))[0]))
            for what, changed in [
                ("seq over 2^63", {**body, "seq": 1 << 63}),
                ("seq 2^63 - 1", {**body, "seq": (1 << 63) - 1}),
                ("no seq", {k: v for k, v in body.items() if k != "seq"}),
                ("no time", {k: v for k, v in body.items() if k != "time"}),
                ("many ops", {**body, "ops": [{**body["ops"][0], "path": f"app.bsky.feed.like/{i:05d}"} for i in range(201)]}),
            ]:
                seen.add((what, _peeked(_message(changed))[0]))
    got = dict(seen)
    assert got["since null"] == got["rebase"] == got["no time"] == got["seq 2^63 - 1"] == "raw"
    assert got["an unknown field"] == got["tooBig"] == got["many ops"] == "decoded"
    assert got["seq negative"] == got["repo not text"] == got["no seq"] == "error"
    assert got["seq over 2^63"] in ("decoded", "error")  # cbrrr's choice; never read in C


def test_commit_peek_not_canonical_text_and_cuts() -> None:
    message = _message({**decode_frame(_generated(7, 1)[0]).body, "seq": 9})
    assert _peeked(message) == ("raw", 9)
    assert _peeked(b"\xa2\x61t\x65#sync\x62op\x01" + message[15:])[0] in ("decoded", "error")
    assert _peeked(b"\xa2\x62op\x01\x61t\x67#commit" + message[15:])[0] == "error"
    assert _peeked(message + b"\x00")[0] == "error"
    for cut in range(0, len(message), max(1, len(message) // 60)):
        assert _peeked(message[:cut])[0] == "error"
    # text that is not UTF-8 (repo): refused by both
    body: Any = decode_frame(message).body
    bad = _message({**body, "repo": "did:plc:\u00e9"}).replace("\u00e9".encode(), b"\xc3\x28")
    assert _peeked(bad)[0] == "error"


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 5), position=st.integers(0, 1 << 20), byte=st.integers(0, 255), how=st.sampled_from(["set", "insert", "delete"]))
def test_commit_peek_mutated_messages(seed: int, position: int, byte: int, how: str) -> None:
    message = _message({**decode_frame(_generated(seed, 1)[0]).body, "seq": 3, "time": "2026-12-06T09:00:00Z"})
    _peeked(_mutated(message, position, byte, how))


def test_commit_peek_guards() -> None:
    message = _message({**decode_frame(_generated(1, 1)[0]).body, "seq": 3})
    with pytest.raises(TypeError):
        _native.commit_peek(bytearray(message), 200)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        _native.commit_peek(message, -1)
    assert _native.commit_peek(message, 0) is None  # over max_ops: decoded
    assert _native.commit_peek(message, 200) is not None
