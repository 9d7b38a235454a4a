"""Records as data: decode_record, record_json, to_json_value and RECORD_CODEC.

Expected values come from elsewhere: the reference implementation's JSON dumps beside the signed
samples, the multiformats package (CID strings), the standard library's base64, and blocks
written by cbor2 or the dag-cbor package, never by repo_stream.records.values itself.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any

import cbor2
import dag_cbor
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multiformats import CID

from repo_stream import DriverBuilder, ProcessorError, RecordDecodeError
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.records.values import (
    JSON_CODEC,
    MAX_DEPTH,
    RECORD_CODEC,
    Link,
    decode_record,
    record_json,
    to_json_value,
)
from repo_stream.records.writer import link

from .conftest import sample_path
from .helpers import repo_car, walk, walk_both

DIGEST = bytes(range(32))
RECORD_CID = b"\x01\x71\x12\x20" + DIGEST  # dag-cbor, sha2-256
BLOB_CID = b"\x01\x55\x12\x20" + DIGEST[::-1]  # raw, sha2-256


def canonical(value: Any) -> bytes:
    """A DAG-CBOR block written by cbor2 (canonical: sorted keys, minimal integers; no floats)."""
    return cbor2.dumps(value, canonical=True)


def b32(raw: bytes) -> str:
    """The base32 CID string of raw CID bytes, by the multiformats package."""
    return str(CID.decode(raw).set(base="base32"))


def b64(data: bytes) -> str:
    """Standard base64 without padding, by the standard library."""
    return base64.b64encode(data).decode().rstrip("=")


def float_block(x: float) -> bytes:
    """``{"f": x}`` with x as the 64-bit float DAG-CBOR requires (cbor2 would shorten it)."""
    return b"\xa1\x61f\xfb" + struct.pack(">d", x)


# ---------------------------------------------------------------------------- the samples


def normalise(value: Any) -> Any:
    """JSON form with ``$bytes`` strings replaced by the bytes they decode to (padding optional)."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            text = value["$bytes"]
            return ("$bytes", base64.b64decode(text + "=" * (-len(text) % 4), validate=True))
        return {k: normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["signed-k256", "signed-p256"])
async def test_record_json_equals_the_reference_dump(name: str) -> None:
    car = sample_path(f"{name}.car").read_bytes()
    lines = sample_path(f"{name}.dump.jsonl").read_text().splitlines()
    expected = [(row["key"], normalise(row["value"])) for row in map(json.loads, lines)]
    assert len(expected) == json.loads(sample_path(f"{name}.json").read_text())["records"] == 300
    in_memory, on_disk = await walk_both(car, DriverBuilder().with_block_processor(record_json))
    for records in (in_memory, on_disk):
        # As parsed JSON: what json.dumps writes must read back to the reference's value.
        got = [(key, normalise(json.loads(json.dumps(value)))) for key, value in records]
        assert [key for key, _ in got] == [key for key, _ in expected]
        for (key, value), (_, want) in zip(got, expected, strict=True):
            assert value == want, key
    # The samples do have byte strings, so the $bytes path is exercised.
    assert sum('"$bytes"' in line for line in lines) >= 5


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["signed-k256.car", "little.car"])
async def test_decode_record_agrees_with_record_json_and_spills_with_its_codec(name: str) -> None:
    car = sample_path(name).read_bytes()
    as_json, _ = await walk_both(car, DriverBuilder().with_block_processor(record_json))
    builder = DriverBuilder().with_block_processor(decode_record).with_codec(*RECORD_CODEC)
    in_memory, on_disk = await walk_both(car, builder)
    assert on_disk == in_memory
    assert [(key, to_json_value(value)) for key, value in in_memory] == as_json
    links = [v for _, value in on_disk for v in _leaves(value) if isinstance(v, Link)]
    if name == "little.car":
        assert len(links) >= 20  # 25 tag-42 links in this real repo's records
        assert all(str(x).startswith("baf") and str(x) == b32(bytes(x)) for x in links)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [x for v in value.values() for x in _leaves(v)]
    if isinstance(value, list):
        return [x for v in value for x in _leaves(v)]
    return [value]


# ---------------------------------------------------------------------------- values


def test_links_are_link_objects_with_base32_strings() -> None:
    block = canonical({"$type": "app.bsky.embed.images#image", "ref": link(BLOB_CID), "alt": "", "also": [link(RECORD_CID)]})
    value = decode_record(block)
    ref, other = value["ref"], value["also"][0]
    assert type(ref) is Link and type(other) is Link
    assert str(ref) == b32(BLOB_CID) and str(ref).startswith("bafkrei")
    assert str(other) == b32(RECORD_CID) and str(other).startswith("bafyrei")
    assert bytes(ref) == BLOB_CID and ref.cid_bytes == BLOB_CID
    assert ref == Link(BLOB_CID) and hash(ref) == hash(Link(BLOB_CID))
    assert ref != other and ref != BLOB_CID and ref != str(ref)
    assert {ref, Link(BLOB_CID), other} == {ref, other}
    assert repr(ref) == f"Link('{b32(BLOB_CID)}')"
    assert record_json(block) == {
        "$type": "app.bsky.embed.images#image",
        "alt": "",
        "also": [{"$link": b32(RECORD_CID)}],
        "ref": {"$link": b32(BLOB_CID)},
    }


def test_other_valid_cidv1_links_are_accepted() -> None:
    identity = b"\x01\x71\x00\x03abc"  # identity multihash of 3 bytes
    sha512 = b"\x01\x70\x13\x40" + bytes(64)  # dag-pb, sha2-512
    block = canonical([link(identity), link(sha512)])
    assert [bytes(x) for x in decode_record(block)] == [identity, sha512]
    assert record_json(block) == [{"$link": b32(identity)}, {"$link": b32(sha512)}]


@pytest.mark.parametrize("data", [b"", b"\x00", b"ab", b"abc", b"\xfb\xff\xfe", bytes(range(256))])
def test_bytes_become_unpadded_standard_base64(data: bytes) -> None:
    block = canonical({"b": data})
    assert decode_record(block) == {"b": data}
    assert type(decode_record(block)["b"]) is bytes
    assert record_json(block) == {"b": {"$bytes": b64(data)}}
    assert to_json_value(decode_record(block)) == record_json(block)


def test_nested_values_and_scalars() -> None:
    value = {
        "$type": "com.example.nested",
        "ints": [0, 1, 23, 24, 255, 256, 65536, 2**32, 2**63 - 1, -1, -24, -25, -(2**63)],
        "big": [2**64 - 1, -(2**64)],
        "flags": [True, False, None],
        "text": "h\u00e9llo \U0001f98b \u65e5\u672c",
        "empty": {"map": {}, "list": [], "str": ""},
        "deep": [{"a": [{"b": [[link(RECORD_CID), b"\x01"]]}]}],
    }
    block = canonical(value)
    decoded = decode_record(block)
    assert decoded["ints"] == value["ints"] and decoded["big"] == value["big"]
    assert decoded["flags"] == [True, False, None] and decoded["text"] == value["text"]
    assert decoded["empty"] == {"map": {}, "list": [], "str": ""}
    assert decoded["deep"] == [{"a": [{"b": [[Link(RECORD_CID), b"\x01"]]}]}]
    expected_json = dict(value, deep=[{"a": [{"b": [[{"$link": b32(RECORD_CID)}, {"$bytes": "AQ"}]]}]}])
    assert record_json(block) == expected_json
    assert to_json_value(decoded) == expected_json
    assert json.loads(json.dumps(record_json(block))) == expected_json


def test_floats_are_decoded_in_both_forms() -> None:
    for x in (1.5, -0.0, 1e300):
        block = float_block(x)
        assert decode_record(block) == {"f": x}
        assert record_json(block) == {"f": x}
        assert type(record_json(block)["f"]) is float


def test_a_record_written_by_the_dag_cbor_package_decodes() -> None:
    cid = CID.decode(RECORD_CID)
    block = dag_cbor.encode({"$type": "x.y.z", "subject": cid, "data": b"\x00\xff", "n": [-5, 10**12]})
    assert decode_record(block) == {"$type": "x.y.z", "subject": Link(RECORD_CID), "data": b"\x00\xff", "n": [-5, 10**12]}
    assert record_json(block) == {"$type": "x.y.z", "subject": {"$link": b32(RECORD_CID)}, "data": {"$bytes": "AP8"}, "n": [-5, 10**12]}


# ---------------------------------------------------------------------------- strictness

VALID = canonical({"a": 1})
MALFORMED = {
    "trailing byte": VALID + b"\x00",
    "two items": VALID + VALID,
    "empty block": b"",
    "truncated map": bytes.fromhex("a26161"),
    "keys out of order": bytes.fromhex("a2616201616101"),
    "keys shorter-first violated": bytes.fromhex("a262626201616301"),
    "repeated key": bytes.fromhex("a2616101616101"),
    "integer map key": bytes.fromhex("a10101"),
    "bytes map key": bytes.fromhex("a1416101"),
    "non-minimal integer": bytes.fromhex("a161611801"),
    "indefinite list": bytes.fromhex("9f01ff"),
    "indefinite string": bytes.fromhex("7f6161ff"),
    "bignum tag": bytes.fromhex("c24101"),
    "date tag": bytes.fromhex("c1186f"),
    "tag 42 on a string": bytes.fromhex("d82a6161"),
    "tag 42 without the 00 prefix": b"\xd8\x2a\x58\x24" + RECORD_CID,
    "tag 42 over an empty CID": bytes.fromhex("d82a4100"),
    "tag 42 with a non-minimal head": b"\xd9\x00\x2a\x58\x25\x00" + RECORD_CID,
    "CIDv0 link": b"\xd8\x2a\x58\x23\x00\x12\x20" + DIGEST,
    "CID version 2": b"\xd8\x2a\x58\x25\x00\x02\x71\x12\x20" + DIGEST,
    "CID digest shorter than declared": b"\xd8\x2a\x58\x24\x00" + RECORD_CID[:-1],
    "CID digest longer than declared": b"\xd8\x2a\x58\x26\x00" + RECORD_CID + b"\x00",
    "CID varint never ends": b"\xd8\x2a\x45\x00\x01\x71\x92\x80",
    "half float": bytes.fromhex("f93c00"),
    "single float": bytes.fromhex("fa3fc00000"),
    "NaN": bytes.fromhex("fb7ff8000000000000"),
    "infinity": bytes.fromhex("fb7ff0000000000000"),
    "undefined": bytes.fromhex("f7"),
    "simple value": bytes.fromhex("f0"),
    "invalid UTF-8": bytes.fromhex("a1616161ff"),
    "nested too deep": b"\x81" * (MAX_DEPTH + 1) + b"\x01",
}


@pytest.mark.parametrize("block", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_blocks_raise_record_decode_error(block: bytes) -> None:
    for process in (decode_record, record_json):
        with pytest.raises(RecordDecodeError, match=rf"record block of {len(block)} bytes is not one well-formed DAG-CBOR item: \S"):
            process(block)


def test_bad_links_are_named() -> None:
    with pytest.raises(RecordDecodeError, match="CIDv0"):
        decode_record(MALFORMED["CIDv0 link"])
    with pytest.raises(RecordDecodeError, match="declares 32 digest bytes but has 31"):
        record_json(MALFORMED["CID digest shorter than declared"])
    with pytest.raises(ValueError, match="CID version 2"):
        Link(b"\x02\x71\x12\x20" + DIGEST)


def test_link_lookalikes_inside_byte_strings_neither_hide_nor_fake_a_bad_link() -> None:
    head = b"\xd8\x2a\x58\x25\x00"  # what a link to a 36-byte CID starts with
    # A stray tag-42 head inside bytes, next to a good link: accepted.
    stray = canonical({"b": b"\xd8\x2a", "l": link(RECORD_CID)})
    assert record_json(stray) == {"b": {"$bytes": b64(b"\xd8\x2a")}, "l": {"$link": b32(RECORD_CID)}}
    # A whole good-looking link inside bytes, next to a bad (CIDv0) link: refused by both.
    bad_link = b"\xd8\x2a\x58\x23\x00\x12\x20" + DIGEST
    block = b"\xa2\x61b\x58\x29" + head + RECORD_CID + b"\x61l" + bad_link
    assert cbor2.loads(block)["b"] == head + RECORD_CID  # the block is what it claims to be
    for process in (decode_record, record_json):
        with pytest.raises(RecordDecodeError, match="CIDv0"):
            process(block)


def test_reserved_keys_have_no_json_form() -> None:
    for key in ("$link", "$bytes"):
        block = canonical({"x": {key: "bafy"}})
        assert decode_record(block) == {"x": {key: "bafy"}}
        with pytest.raises(RecordDecodeError, match="reserved"):
            record_json(block)
        with pytest.raises(ValueError, match="reserved"):
            to_json_value(decode_record(block))


def nested(depth: int, inner: bytes = b"\x01", pad: int = 0) -> bytes:
    """``depth`` lists, one inside the other, around ``inner``; ``pad`` makes the outer list
    also hold a string of that many ``0xbf`` continuation-like bytes (in é's)."""
    if pad:
        text = ("\u00ff" * (pad // 2)).encode()  # c3 bf ...: half the bytes in 0x80-0xbf
        head = b"\x82" + b"\x79" + len(text).to_bytes(2, "big") + text
        return head + b"\x81" * (depth - 1) + inner
    return b"\x81" * depth + inner


def test_depth_limit_is_exact_in_both_forms() -> None:
    # MAX_DEPTH levels are fine, one more is not; the block is short, so the bound decides alone.
    ok = nested(MAX_DEPTH)
    value = decode_record(ok)
    assert record_json(ok) == value
    depth = 0
    while isinstance(value, list):
        value, depth = value[0], depth + 1
    assert (depth, value) == (MAX_DEPTH, 1)
    for process in (decode_record, record_json):
        with pytest.raises(RecordDecodeError, match=f"nested more than {MAX_DEPTH} deep"):
            process(nested(MAX_DEPTH + 1))
    # A link at the deepest level becomes a one-key map in the JSON form: still accepted.
    deepest_link = nested(MAX_DEPTH, b"\xd8\x2a\x58\x25\x00" + RECORD_CID)
    decoded = decode_record(deepest_link)
    for _ in range(MAX_DEPTH):
        assert type(decoded) is list and len(decoded) == 1
        decoded = decoded[0]
    assert decoded == Link(RECORD_CID)
    json_value = record_json(deepest_link)
    for _ in range(MAX_DEPTH):
        json_value = json_value[0]
    assert json_value == {"$link": b32(RECORD_CID)}


def test_depth_is_walked_when_a_long_block_has_many_container_like_bytes() -> None:
    # Long blocks full of 0x80-0xbf bytes (non-ASCII text) are shallow and pass the walk...
    text = "\u00e9\u65e5" * 400
    shallow = canonical({"$type": "app.bsky.feed.post", "text": text})
    assert decode_record(shallow) == {"$type": "app.bsky.feed.post", "text": text}
    assert record_json(shallow) == {"$type": "app.bsky.feed.post", "text": text}
    # ...and deep ones are caught by it, in both forms.
    for depth, ok in ((MAX_DEPTH, True), (MAX_DEPTH + 1, False)):
        block = nested(depth, pad=600)
        assert len(block) > 600
        for process in (decode_record, record_json):
            if ok:
                process(block)
            else:
                with pytest.raises(RecordDecodeError, match="nested more than"):
                    process(block)


def test_decode_errors_chain_the_cause() -> None:
    with pytest.raises(RecordDecodeError) as info:
        decode_record(MALFORMED["keys out of order"])
    assert isinstance(info.value.__cause__, ValueError)
    assert "order" in str(info.value)


# ---------------------------------------------------------------------------- to_json_value


def test_to_json_value_accepts_other_link_and_bytes_types_and_copies() -> None:
    value = {"t": (1, "a"), "ba": bytearray(b"\x01\x02"), "mv": memoryview(b"\x03"), "cid": CID.decode(RECORD_CID)}
    assert to_json_value(value) == {
        "t": [1, "a"],
        "ba": {"$bytes": b64(b"\x01\x02")},
        "mv": {"$bytes": b64(b"\x03")},
        "cid": {"$link": b32(RECORD_CID)},
    }
    original = {"l": [Link(RECORD_CID)], "b": b"x"}
    out = to_json_value(original)
    assert original == {"l": [Link(RECORD_CID)], "b": b"x"}
    assert out == {"l": [{"$link": b32(RECORD_CID)}], "b": {"$bytes": "eA"}}


@pytest.mark.parametrize(
    "value, error",
    [
        ({1: "x"}, TypeError),
        ({"s": {1, 2}}, TypeError),
        ([object()], TypeError),
        ({"f": math.nan}, ValueError),
        ({"f": math.inf}, ValueError),
        ({"$bytes": "AA"}, ValueError),
    ],
)
def test_to_json_value_refuses_what_has_no_json_form(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        to_json_value(value)


def test_to_json_value_depth_limit() -> None:
    value: Any = 1
    for _ in range(MAX_DEPTH):
        value = [value]
    assert to_json_value(value) == value
    with pytest.raises(ValueError, match="nested more than"):
        to_json_value([value])


# ---------------------------------------------------------------------------- property


def expected_json(value: Any) -> Any:
    """The JSON form, computed here with multiformats and base64 (independent of records.py)."""
    if isinstance(value, CID):
        return {"$link": b32(bytes(value))}
    if isinstance(value, bytes):
        return {"$bytes": b64(value)}
    if isinstance(value, dict):
        return {k: expected_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expected_json(v) for v in value]
    return value


def expected_decoded(value: Any) -> Any:
    """What decode_record must give for ``value`` (a CID becomes a Link of its bytes)."""
    if isinstance(value, CID):
        return Link(bytes(value))
    if isinstance(value, dict):
        return {k: expected_decoded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [expected_decoded(v) for v in value]
    return value


CIDS = st.sampled_from([CID.decode(RECORD_CID), CID.decode(BLOB_CID)])
SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20) | st.binary(max_size=20) | CIDS
KEYS = st.text(max_size=8).filter(lambda k: k not in ("$link", "$bytes"))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4), max_leaves=25)


@settings(max_examples=200, deadline=None)
@given(VALUES)
def test_any_dag_cbor_value_round_trips_to_its_json_form(value: Any) -> None:
    block = dag_cbor.encode(value)  # an independent canonical encoder
    want = expected_json(value)
    assert record_json(block) == want
    decoded = decode_record(block)
    assert decoded == expected_decoded(value)
    assert to_json_value(decoded) == want
    assert RECORD_CODEC[1](RECORD_CODEC[0](decoded)) == expected_decoded(value)
    assert RECORD_CODEC[0](decoded) == block  # canonical both ways


# ---------------------------------------------------------------------------- in a walk

POSTS = [(f"app.bsky.feed.post/3k{i:011d}", canonical({"$type": "app.bsky.feed.post", "text": f"post {i}"})) for i in range(6)]


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["memory", "spilled"])
@pytest.mark.parametrize("bad", [MALFORMED["keys out of order"], VALID + b"\x00"], ids=["unsorted keys", "trailing bytes"])
async def test_malformed_record_is_a_processor_error_on_walk(mode: str, bad: bytes) -> None:
    key = "app.bsky.feed.post/3k00000000003x"
    car = repo_car([*POSTS, (key, bad)])
    for process in (decode_record, record_json):
        with pytest.raises(ProcessorError) as info:
            await walk(mode, car, lambda b, p=process: b.with_block_processor(p))
        assert type(info.value.__cause__) is RecordDecodeError
        assert key in str(info.value)
        assert b32(dag_cbor_cid(bad)) in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("mode", ["memory", "spilled"])
async def test_walk_with_links_and_bytes_in_both_modes(mode: str) -> None:
    image = {"$type": "blob", "ref": link(BLOB_CID), "mimeType": "image/jpeg", "size": 12345}
    post = canonical({"$type": "app.bsky.feed.post", "text": "pic", "embed": {"images": [{"alt": "", "image": image}]}})
    odd = canonical({"$type": "com.example.thing", "sig": b"\xff\x00\xfe", "link": link(RECORD_CID)})
    car = repo_car([*POSTS, ("app.bsky.feed.post/3kzzz", post), ("com.example.thing/a", odd)])
    as_json = await walk(mode, car, lambda b: b.with_block_processor(record_json))
    values = dict(as_json)
    assert values["app.bsky.feed.post/3kzzz"]["embed"]["images"][0]["image"]["ref"] == {"$link": b32(BLOB_CID)}
    assert values["com.example.thing/a"] == {"$type": "com.example.thing", "sig": {"$bytes": b64(b"\xff\x00\xfe")}, "link": {"$link": b32(RECORD_CID)}}
    decoded = await walk(mode, car, lambda b: b.with_block_processor(decode_record).with_codec(*RECORD_CODEC))
    assert dict(decoded)["com.example.thing/a"]["link"] == Link(RECORD_CID)
    assert [(k, to_json_value(v)) for k, v in decoded] == as_json
    with_codec = await walk(mode, car, lambda b: b.with_block_processor(record_json).with_codec(*JSON_CODEC))
    assert with_codec == as_json
    assert [json.dumps(v) for _, v in with_codec] == [json.dumps(v) for _, v in as_json]  # same key order


@pytest.mark.anyio
@pytest.mark.parametrize("name", ["signed-p256.car", "little.car"])
async def test_json_codec_keeps_values_and_key_order_when_spilled(name: str) -> None:
    car = sample_path(name).read_bytes()
    plain, _ = await walk_both(car, DriverBuilder().with_block_processor(record_json))
    in_memory, on_disk = await walk_both(car, DriverBuilder().with_block_processor(record_json).with_codec(*JSON_CODEC))
    assert in_memory == plain and on_disk == plain
    assert [json.dumps(v) for _, v in on_disk] == [json.dumps(v) for _, v in plain]
