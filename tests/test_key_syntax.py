"""MST key syntax against the atproto interop test files (tests/interop/, CC0): the test-side
oracle of tests/spec_keys.py, the reference's rules (repo_stream.core.mst) and both walkers (a repo
holding the key must give its record, or fail with InvalidKeyError), in memory and spilled; and
key layers against the interop file of known MST heights."""

from __future__ import annotations

import random

import cbor2
import pytest

from repo_stream import InvalidKeyError
from repo_stream.core.cid import cid_str, dag_cbor_cid
from repo_stream.core.mst import is_valid_collection, is_valid_key, is_valid_rkey, key_layer
from repo_stream.records.writer import build_mst, car_bytes, encode_commit

from .helpers import DID, REV, walk, walk_error
from .spec_keys import interop_json, interop_lines, spec_key, spec_nsid, spec_rkey

pytestmark = pytest.mark.anyio

VALID_RKEYS = interop_lines("recordkey_syntax_valid")
INVALID_RKEYS = interop_lines("recordkey_syntax_invalid")
VALID_NSIDS = interop_lines("nsid_syntax_valid")
INVALID_NSIDS = interop_lines("nsid_syntax_invalid")


def test_interop_files_are_read() -> None:
    assert (len(VALID_RKEYS), len(INVALID_RKEYS), len(VALID_NSIDS), len(INVALID_NSIDS)) == (16, 11, 25, 27)
    assert "o" * 512 in VALID_RKEYS and "o" * 513 in INVALID_RKEYS
    assert " one.two.three" in INVALID_NSIDS and "one.two.three " in INVALID_NSIDS


@pytest.mark.parametrize("rkey", VALID_RKEYS)
def test_valid_record_keys(rkey: str) -> None:
    assert spec_rkey(rkey)
    assert is_valid_rkey(rkey)
    assert is_valid_key(f"app.bsky.feed.post/{rkey}")


@pytest.mark.parametrize("rkey", INVALID_RKEYS)
def test_invalid_record_keys(rkey: str) -> None:
    assert not spec_rkey(rkey)
    assert not is_valid_rkey(rkey)
    assert not is_valid_key(f"app.bsky.feed.post/{rkey}")


@pytest.mark.parametrize("nsid", VALID_NSIDS)
def test_valid_nsids(nsid: str) -> None:
    assert spec_nsid(nsid)
    assert is_valid_collection(nsid)
    assert is_valid_key(f"{nsid}/self")


@pytest.mark.parametrize("nsid", INVALID_NSIDS)
def test_invalid_nsids(nsid: str) -> None:
    assert not spec_nsid(nsid)
    assert not is_valid_collection(nsid)
    assert not is_valid_key(f"{nsid}/self")


# Segment lengths the interop files do not try: the first segment and the name at 63 and 64.
EDGE_NSIDS = {
    "a" * 63 + ".example.thing": True,
    "a" * 64 + ".example.thing": False,
    "com.example." + "n" * 63: True,
    "com.example." + "n" * 64: False,
}


@pytest.mark.parametrize("nsid", list(EDGE_NSIDS), ids=lambda n: f"{n[:8]}-{len(n)}")
def test_nsid_segment_lengths(nsid: str) -> None:
    assert spec_nsid(nsid) is EDGE_NSIDS[nsid]
    assert is_valid_collection(nsid) is EDGE_NSIDS[nsid]


def _key_by_parts(key: str) -> bool:
    """The key rule as its parts (what is_valid_key's single match must equal)."""
    collection, sep, rkey = key.partition("/")
    return len(key) <= 1024 and bool(sep) and is_valid_collection(collection) and is_valid_rkey(rkey)


def test_one_match_key_check_equals_the_parts() -> None:
    rng = random.Random(20)
    alphabet = "aZ09.-_:~/\u00e9\x00 "
    cases = ["a.b.c/.", "a.b.c/..", "a.b.c/...", "a.b.c//x", "a.b.c/x/y", "a.b.c/", "/x", "a.b/x", "app.bsky.feed.post/.a"]
    cases += ["a.b.c/" + "x" * n for n in (511, 512, 513)] + ["a." * n + "bc/x" for n in (150, 157, 158, 159)]
    segment = "a" * 61 + "."
    cases += [((segment * 6)[: n - 2] + ".x").replace("..", ".a") + "/r" for n in range(312, 322)]
    cases += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))) for _ in range(20_000)]
    cases += ["app.bsky." + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 9))) for _ in range(20_000)]
    assert sum(map(_key_by_parts, cases)) > 80  # valid ones among them, not only refusals
    assert [c for c in cases if is_valid_key(c) != _key_by_parts(c)] == []


def test_spec_key_bounds() -> None:
    rkey = "o" * 512
    nsid = "a.b." + "c" * (1024 - len(rkey) - 1 - 4)
    assert not spec_nsid(nsid)  # name over 63 characters
    assert spec_key("com.example.thing/" + rkey) and not spec_key("com.example.thing") and not spec_key("/self")


# A repo of one record under ``key``: the walk must give it exactly, or refuse the key.

RECORD = cbor2.dumps({"$type": "com.example.thing", "n": 1}, canonical=True)


def _one_record_repo(key: str) -> tuple[bytes, bytes]:
    root, nodes = build_mst([(key.encode(), dag_cbor_cid(RECORD))])
    commit = encode_commit(DID, root, REV)
    blocks = [(dag_cbor_cid(commit), commit), *nodes.items(), (dag_cbor_cid(RECORD), RECORD)]
    return car_bytes([dag_cbor_cid(commit)], blocks), root


WALKED_VALID = [f"com.example.thing/{r}" for r in VALID_RKEYS] + [f"{n}/self" for n in VALID_NSIDS]
WALKED_INVALID = [f"com.example.thing/{r}" for r in INVALID_RKEYS if "/" not in r] + [f"{n}/self" for n in INVALID_NSIDS]


@pytest.mark.parametrize("mode", ["memory", "spilled"])
@pytest.mark.parametrize("key", WALKED_VALID)
async def test_walk_gives_records_under_valid_keys(key: str, mode: str) -> None:
    car, _root = _one_record_repo(key)
    assert await walk(mode, car) == [(key, RECORD)]


@pytest.mark.parametrize("mode", ["memory", "spilled"])
@pytest.mark.parametrize("key", WALKED_INVALID)
async def test_walk_refuses_invalid_keys(key: str, mode: str) -> None:
    car, root = _one_record_repo(key)
    error = await walk_error(mode, car, InvalidKeyError)
    assert str(error) == f"MST key {key!r} in node {cid_str(root)} is not a valid collection/rkey path"


async def test_walk_refuses_a_record_key_with_a_slash() -> None:
    key = "com.example.thing/alpha/beta"  # the interop file's "alpha/beta"
    car, root = _one_record_repo(key)
    error = await walk_error("memory", car, InvalidKeyError)
    assert str(error) == f"MST key {key!r} in node {cid_str(root)} is not a valid collection/rkey path"


@pytest.mark.parametrize("case", interop_json("key_heights.json"), ids=lambda c: c["key"] or "empty")
def test_key_layers_match_the_interop_heights(case: dict[str, object]) -> None:
    assert key_layer(str(case["key"]).encode()) == case["height"]
