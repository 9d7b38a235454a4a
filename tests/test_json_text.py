"""transcode_json: a record block straight to its atproto JSON text (repo_stream.records.json_text).

Three ways to the same text must agree byte for byte on every record of the samples and of
generated repos, and on hypothesis-made values: the C core (``_native.transcode_json``), the
pure-Python reference (``transcode_json_reference``) and what ``dump`` wrote before,
``json.dumps(record_json(block), ensure_ascii=False, separators=(",", ":"))``. On bad blocks
(hand-made and mutated) C and the reference raise the same error with the same message, and
record_json refuses the same blocks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import cbrrr
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from repo_stream import DriverBuilder, RecordDecodeError
from repo_stream.core import implementation
from repo_stream.records.generate import generate_records
from repo_stream.records.json_text import _python_transcode_json, transcode_json, transcode_json_reference
from repo_stream.records.values import MAX_DEPTH, Link, record_json

from .conftest import SAMPLES
from .test_records import MALFORMED, RECORD_CID

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

try:
    from repo_stream._native import transcode_json as c_transcode
except ImportError:  # the C core is not built: only the reference runs
    c_transcode = None


@pytest.fixture(params=["both"], autouse=True)
def impl(request: pytest.FixtureRequest) -> str:
    """Overrides the per-implementation fixture: these tests call every implementation at once."""
    return str(request.param)


def transcoders() -> list[Any]:
    """The implementations under test: the reference, the Python backend's, and C if built."""
    found = [transcode_json_reference, _python_transcode_json]
    if c_transcode is not None and "c" in implementation.available():
        found.append(c_transcode)
    return found


def outcome(fn: Any, block: bytes) -> tuple[str, str]:
    try:
        return ("ok", fn(block))
    except RecordDecodeError as exc:
        return ("error", str(exc))


def expected(block: bytes) -> tuple[str, str]:
    """What dump wrote before the transcoder: record_json, then json.dumps as dump calls it."""
    try:
        return ("ok", _dumps(record_json(block)))
    except RecordDecodeError:
        return ("error", "")


def check_block(block: bytes) -> None:
    want = expected(block)
    got = [outcome(fn, block) for fn in transcoders()]
    for (kind, text), fn in zip(got, transcoders(), strict=True):
        assert kind == want[0], (fn, block.hex(), text, want)
        if kind == "ok":
            assert text == want[1], (fn, block.hex())
    # C and the reference: the same message too
    assert len({g for g in got if g[0] == "error"}) <= 1, got


def record_blocks(car: bytes) -> list[bytes]:
    async def collect() -> list[bytes]:
        driver = await DriverBuilder().with_mem_limit_mb(4096).with_block_processor(bytes).load_car(car)
        return [value async for _key, value in driver]

    import anyio

    return anyio.run(collect)


SAMPLE_NAMES = ["little.car", "tiny.car", "signed-k256.car", "signed-p256.car", "empty.car"]


@pytest.mark.parametrize("name", SAMPLE_NAMES)
def test_every_sample_record_is_dumps_of_record_json(name: str) -> None:
    path = Path(SAMPLES) / name
    if not path.is_file():
        pytest.skip(f"real CAR sample {path} is not present")
    blocks = record_blocks(path.read_bytes())
    if name != "empty.car":
        assert blocks
    for block in blocks:
        check_block(block)


@pytest.mark.parametrize("profile", ["default", "small"])
def test_every_generated_record_is_dumps_of_record_json(profile: str) -> None:
    n = 0
    for _key, block in generate_records(3000, seed=7, profile=profile):
        check_block(block)
        n += 1
    assert n == 3000


def test_sample_dump_reference_file_matches() -> None:
    """The committed dump of a signed sample: each line's value is the transcoder's text."""
    path = Path(SAMPLES) / "signed-k256.dump.jsonl"
    car = Path(SAMPLES) / "signed-k256.car"
    if not path.is_file() or not car.is_file():
        pytest.skip("signed-k256 sample not present")
    lines = path.read_text("utf-8").splitlines()
    blocks = record_blocks(car.read_bytes())
    assert len(lines) == len(blocks) == 300
    for line, block in zip(lines, blocks, strict=True):
        assert json.loads(line)["value"] == json.loads(transcode_json(block))


# ------------------------------------------------------------------------- exact texts


def test_exact_texts() -> None:
    cases: dict[bytes, str] = {
        b"\xa0": "{}",
        b"\x80": "[]",
        b"\x1b" + b"\xff" * 8: "18446744073709551615",
        b"\x3b" + b"\xff" * 8: "-18446744073709551616",
        b"\x3b" + b"\x7f" + b"\xff" * 7: "-9223372036854775808",
        b"\x20": "-1",
        b"\xfb" + struct.pack(">d", 1.5): "1.5",
        b"\xfb" + struct.pack(">d", -0.0): "-0.0",
        b"\xfb" + struct.pack(">d", 1e100): "1e+100",
        b"\xfb" + struct.pack(">d", 1e-7): "1e-07",
        b"\xfb" + struct.pack(">d", 1.0): "1.0",
        b"\xf4\xf5\xf6"[0:1]: "false",
        b"\xf5": "true",
        b"\xf6": "null",
        b"\x43abc": '{"$bytes":"YWJj"}',
        b"\x40": '{"$bytes":""}',
        b"\x64\x01\x7f\"\\": '"\\u0001\x7f\\"\\\\"',
        "\u2028é😀\x1f\t\n\r\b\f".encode().join([b"\x6f", b""]): '"\u2028é😀\\u001f\\t\\n\\r\\b\\f"',
        b"\xd8\x2a\x47\x00\x01\x55\x00\x02\xaa\xbb": '{"$link":"bafkqaavkxm"}',
        b"\xa2\x61a\x01\x62aa\x80": '{"a":1,"aa":[]}',
        b"\xa1\x65$type\x61x": '{"$type":"x"}',
    }
    for block, text in cases.items():
        for fn in transcoders():
            assert fn(block) == text, (fn, block.hex())
        assert _dumps(record_json(block)) == text


def test_depth_limit_is_exact() -> None:
    link = b"\xd8\x2a\x58\x25\x00" + RECORD_CID
    for inner in (b"\x01", link, b"\x41a", b"\xfb" + struct.pack(">d", 2.5)):
        ok = b"\x81" * MAX_DEPTH + inner
        assert transcode_json_reference(ok) == "[" * MAX_DEPTH + _dumps(record_json(ok))[MAX_DEPTH:]
        check_block(ok)
        check_block(b"\x81" * (MAX_DEPTH + 1) + inner)
    for block in (b"\x81" * MAX_DEPTH + b"\x80", b"\xa1\x61a" * (MAX_DEPTH + 1) + b"\x01", b"\x81" * 100000 + b"\x01"):
        check_block(block)
        with pytest.raises(RecordDecodeError, match=f"nested more than {MAX_DEPTH} deep"):
            transcode_json_reference(block)


@pytest.mark.parametrize("block", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_blocks_are_refused_alike(block: bytes) -> None:
    messages = set()
    for fn in transcoders():
        with pytest.raises(RecordDecodeError, match=rf"record block of {len(block)} bytes is not one well-formed DAG-CBOR item: .* \(at byte \d+\)$"):
            fn(block)
        messages.add(outcome(fn, block)[1])
    assert len(messages) == 1
    check_block(block)


def test_messages_name_the_fault_and_offset() -> None:
    cases = {
        b"\xa2\x61b\x01\x61a\x01": "map keys are not in canonical order (shorter first, then bytewise) (at byte 4)",
        b"\xa2\x61a\x01\x61a\x01": "a map key is repeated (at byte 4)",
        b"\x01\x01": "bytes after the end of the item (at byte 1)",
        b"\x82\x01\xc1\x01": "a CBOR tag other than 42 (link) (at byte 2)",
        b"\xa1\x65$link\x61x": "a map key '$link' or '$bytes' is reserved by the atproto data model's JSON form (at byte 1)",
        b"\x81\x63\xed\xa0\x80": "a text string is not valid UTF-8 (at byte 1)",
        b"\xbb" + b"\x00\x00\x00\x01\x00\x00\x00\x00": "a map claims more entries than there are bytes left (at byte 0)",
        b"\x5b" + b"\xff" * 8: "a byte string runs past the end of the block (at byte 0)",
        b"\xd8\x2a\x58\x23\x00\x12\x20" + bytes(32): "a link is a CIDv0 (atproto links are CIDv1) (at byte 2)",
    }
    for block, tail in cases.items():
        for fn in transcoders():
            with pytest.raises(RecordDecodeError) as info:
                fn(block)
            assert str(info.value) == f"record block of {len(block)} bytes is not one well-formed DAG-CBOR item: {tail}"


def test_not_bytes_is_a_type_error_in_c() -> None:
    if c_transcode is None:
        pytest.skip("the C core is not built here")
    with pytest.raises(TypeError):
        c_transcode("text")  # type: ignore[arg-type]
    assert c_transcode(bytearray(b"\x01")) == "1"
    assert c_transcode(memoryview(b"\x02")) == "2"


def test_long_outputs_grow_past_the_stack_buffer() -> None:
    text = "\x01" * 5000  # 30,000 bytes escaped
    block = cbrrr.encode_dag_cbor({"t": text, "b": b"\xff" * 9000, "l": ["é" * 3000] * 3})
    check_block(block)


# --------------------------------------------------------------------------- hypothesis

_keys = st.text(max_size=8)
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.builds(lambda d: Link(b"\x01\x71\x12\x20" + d), st.binary(min_size=32, max_size=32))
    | st.builds(lambda d: Link(b"\x01\x55\x00" + bytes([len(d)]) + d), st.binary(max_size=40))
)
values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=5), max_leaves=30)


@settings(max_examples=400, deadline=None)
@given(values)
def test_hypothesis_values_agree(value: Any) -> None:
    try:
        block = cbrrr.encode_dag_cbor(value, False, Link)
    except Exception:
        assume(False)
        raise
    check_block(block)


@settings(max_examples=600, deadline=None)
@given(values, st.data())
def test_hypothesis_mutated_blocks_agree(value: Any, data: st.DataObject) -> None:
    try:
        block = bytearray(cbrrr.encode_dag_cbor(value, False, Link))
    except Exception:
        assume(False)
        raise
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
        at = data.draw(st.integers(0, max(len(block) - 1, 0)))
        if kind == "flip" and block:
            block[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and block:
            block[at] = data.draw(st.sampled_from([0x00, 0x18, 0x1B, 0x3B, 0x5B, 0x7B, 0x9B, 0xBB, 0xD8, 0x2A, 0xF7, 0xFB, 0xFF, 0x80, 0xA0]))
        elif kind == "cut":
            del block[at:]
        elif kind == "insert":
            block[at:at] = data.draw(st.binary(min_size=1, max_size=3))
        elif kind == "delete" and block:
            del block[at]
    check_block(bytes(block))
