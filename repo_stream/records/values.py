"""Records as data: block processors that decode a record block, and the atproto JSON form.

Two ready processors for :meth:`DriverBuilder.with_block_processor
<repo_stream.DriverBuilder.with_block_processor>`:

* :func:`decode_record`: the DAG-CBOR record as Python values: ``dict`` (``str`` keys), ``list``,
  ``str``, ``int``, ``float``, ``bool``, ``None``, ``bytes``, and :class:`Link` for CID links
  (tag 42). When a load may spill, also pass ``.with_codec(*RECORD_CODEC)`` so the values
  survive the disk store (the default CBOR codec knows nothing of :class:`Link`).
* :func:`record_json`: the record in the atproto data model's JSON form (links as
  ``{"$link": "bafy..."}``, bytes as ``{"$bytes": base64}``), ready for :func:`json.dumps`. It
  works with the default codec; ``.with_codec(*JSON_CODEC)`` is faster: the drivers encode
  every kept value once to count its size, and cbrrr does that in a fraction of cbor2's time
  (a walk of ``fixtures/repo-2000-shuffled.car`` took ~6 us less per record).

:func:`to_json_value` turns values from :func:`decode_record` into the JSON form.

Spec: atproto data model (https://atproto.com/specs/data-model), "Data Types" and "JSON
Representation"; IPLD DAG-CBOR, "Strictness".

**Decoder choice.** ``benchmarks/records.py``, CPU time per record in ns (Python 3.11, one
core of a shared 2-core machine; each candidate timed over each set in turn, 25 rounds, the
fastest round kept):

=======================================================  =========  =======  =======
decode to Python values                                  generated  signed   little
=======================================================  =========  =======  =======
**decode_record** (cbrrr + Link + depth check, chosen)        2072     1342     9561
cbrrr ``decode_dag_cbor``, ``cid_ctor=Link``                  1841     1195     6314
cbrrr ``decode_dag_cbor``, its own ``CID`` class              1677     1121     5934
libipld ``decode_dag_cbor`` (links come back as bytes)         844      578     3221
cbor2 ``CBORDecoder`` reused, ``tag_hook`` -> Link            3080     2205     9835
dag-cbor ``decode`` (pure Python)                            81917    47695   177968
**decode to the JSON form**
**record_json** (cbrrr ``atjson_mode`` + checks, chosen)      2101     1396    10491
cbrrr ``atjson_mode=True`` alone                              1669     1194     5977
``to_json_value(decode_record(block))``                       5533     3131    24369
cbor2 ``tag_hook`` -> ``{"$link"}`` + a ``$bytes`` pass       6156     3890    22589
=======================================================  =========  =======  =======

Sets: "generated": 2,000 records from :func:`repo_stream.records.generate.generate_records` (the mix of
a real account: likes, posts, follows, reposts, blob refs; 246 bytes on average, 138 links);
"signed": the 600 records of the two ``signed-*.car`` samples (185 bytes, no links); "little":
the 278 records of the real ``little.car`` (888 bytes, 25 links; its 7 long-form documents of
15-30 KB are what the depth check walks, see below).

libipld decodes twice as fast but cannot be used: it returns a link as plain ``bytes``,
indistinguishable from a byte string, so neither :class:`Link` values nor the JSON form
(``$link`` vs ``$bytes``) can be made from its output, and it accepts non-minimal integers and
lengths. cbrrr is the fastest decoder that keeps links apart, its JSON mode builds the JSON form
in C, and it is strict: it refuses trailing bytes, map keys out of canonical order or repeated,
non-minimal integers and lengths, indefinite lengths, tags other than 42, NaN and infinities,
invalid UTF-8, and it is not recursive (no stack overflow on deep nesting). cbor2 is slower with
a tag hook and lenient (any key order, half and single floats).

**Strictness.** A block is accepted only if it is exactly one well-formed DAG-CBOR item, as
above, whose links are CIDv1 (version 1, then varint codec, varint hash code, varint digest
length and exactly that many digest bytes; atproto uses no CIDv0) and whose maps and lists are
nested at most :data:`MAX_DEPTH` deep. Anything else raises :class:`RecordDecodeError` (which
the drivers report as :class:`ProcessorError <repo_stream.errors.ProcessorError>` naming the
key and CID). The depth limit exists because deeply nested values break their users: Python's
``json`` stops at ~1,000 levels and ``cbor2.dumps`` (the default spill codec, which the drivers
also use to size kept values) crashes the process at ~7,000. Checking it costs nothing for a
block of at most :data:`MAX_DEPTH` bytes (84% of a generated account's records) and little for
one whose count of bytes that could start a map or list (``0x80``-``0xbf``, counted at C speed)
is at most :data:`MAX_DEPTH`; only other blocks, large and full of maps, get a walk over their
containers (it adds ~50% to decoding those).

Floats: DAG-CBOR allows 64-bit floats and the atproto data model forbids them in records; both
processors decode them rather than fail the walk.
"""

from __future__ import annotations

import binascii
import gc
import math
from collections.abc import Callable
from typing import Any, Final, TypeAlias

import cbrrr
from multiformats import CID as MultiformatsCID

from ..errors import RecordDecodeError

__all__ = [
    "JSON_CODEC",
    "MAX_DEPTH",
    "RECORD_CODEC",
    "JsonValue",
    "Link",
    "RecordValue",
    "decode_record",
    "record_json",
    "to_json_value",
]

#: A value of the atproto JSON form (:func:`record_json`): links are ``{"$link": ...}`` and bytes
#: ``{"$bytes": ...}`` maps. (``float`` only in the rare record that has one.)
JsonValue: TypeAlias = "bool | int | float | str | list[JsonValue] | dict[str, JsonValue] | None"
#: A decoded DAG-CBOR value (:func:`decode_record`): links are :class:`Link`, bytes ``bytes``.
RecordValue: TypeAlias = "bool | int | float | str | bytes | Link | list[RecordValue] | dict[str, RecordValue] | None"

#: The deepest nesting of maps and lists accepted in a record (the record's own map is depth 1).
MAX_DEPTH: Final = 256

_DAG_CBOR_SHA256: Final = b"\x01\x71\x12\x20"
_RAW_SHA256: Final = b"\x01\x55\x12\x20"
# The first byte of every CBOR array (major type 4) and map (major type 5) head.
_CONTAINER_HEADS: Final = bytes(range(0x80, 0xC0))
# A tag-42 head: DAG-CBOR requires the minimal one-byte argument, so every link starts so.
_TAG_42: Final = b"\xd8\x2a"

# A whole link head to a sha2-256 CIDv1: tag 42, a 37-byte string, 0x00, the CID's prefix.
_LINK_DAG_CBOR: Final = _TAG_42 + b"\x58\x25\x00" + _DAG_CBOR_SHA256
_LINK_RAW: Final = _TAG_42 + b"\x58\x25\x00" + _RAW_SHA256

_decode = cbrrr.decode_dag_cbor
_decode_c: Callable[[bytes, Callable[[bytes], object], bool], tuple[JsonValue, int]] = cbrrr._cbrrr.decode_dag_cbor


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    """``(value, next offset)`` of the minimal unsigned LEB128 varint at ``raw[at:]``."""
    value = 0
    for shift in range(0, 63, 7):
        if at >= len(raw):
            raise ValueError("it ends inside a varint")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if shift and not byte:
                raise ValueError("a varint is not minimal")
            return value, at
    raise ValueError("a varint is longer than 9 bytes")


def _check_cid(raw: bytes) -> None:
    """Raise ``ValueError`` unless ``raw`` is a binary CIDv1 with a complete multihash."""
    where = f"invalid link CID 0x{raw[:48].hex()}{'...' if len(raw) > 48 else ''}"
    if len(raw) == 34 and raw[:2] == b"\x12\x20":
        raise ValueError(f"{where}: a CIDv0 (atproto links are CIDv1)")
    try:
        version, at = _varint(raw, 0)
        if version != 1:
            raise ValueError(f"CID version {version}, expected 1")
        _, at = _varint(raw, at)  # codec
        _, at = _varint(raw, at)  # multihash code
        length, at = _varint(raw, at)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    if len(raw) - at != length:
        raise ValueError(f"{where}: its multihash declares {length} digest bytes but has {len(raw) - at}")


class Link(cbrrr.CID):
    """A DAG-CBOR link (tag 42): a CID held as its raw bytes, cheap to make (no parsing).

    ``str(link)`` is the base32 CID string (``"bafyrei..."``); ``bytes(link)`` and
    ``link.cid_bytes`` the binary CID; links with the same bytes are equal and hash alike. For a
    multiformats ``CID`` use ``multiformats.CID.decode(bytes(link))`` (~100 us).

    Raises:
        ValueError: ``cid_bytes`` is not a binary CIDv1 with a complete multihash.
    """

    __slots__ = ()

    def __init__(self, cid_bytes: bytes) -> None:
        if len(cid_bytes) != 36 or (cid_bytes[:4] != _DAG_CBOR_SHA256 and cid_bytes[:4] != _RAW_SHA256):
            _check_cid(cid_bytes)
        self.cid_bytes = cid_bytes

    def __str__(self) -> str:
        return self.encode()

    def __repr__(self) -> str:
        return f"Link({self.encode()!r})"


def _check_link(raw: bytes) -> None:
    """A ``cid_ctor`` that only validates (for :func:`record_json`'s check of its links)."""
    if len(raw) != 36 or (raw[:4] != _DAG_CBOR_SHA256 and raw[:4] != _RAW_SHA256):
        _check_cid(raw)


def _blessed_links_only(block: bytes) -> bool:
    """Whether every tag-42 head in ``block`` starts a 37-byte link to a 36-byte sha2-256 CIDv1.

    A cheap proof that :func:`record_json`'s links are valid, without decoding again: every
    real link starts with a tag-42 head, so if each occurrence of those two bytes (real or
    inside a string) is followed by a well-formed blessed CID, so is each real link.
    """
    return block.count(_TAG_42) == block.count(_LINK_DAG_CBOR) + block.count(_LINK_RAW)


def _check_depth(value: Any, json_form: bool) -> None:
    """Raise ``ValueError`` if maps and lists in ``value`` nest deeper than :data:`MAX_DEPTH`.

    Breadth first, one level at a time: :func:`gc.get_referents` lists every item of a level's
    maps and lists in one C call (about twice as fast as visiting them one by one). In the JSON
    form a link or bytes is a one-key map, which does not count as a level.
    """
    level = [value]
    for _ in range(MAX_DEPTH):
        items = gc.get_referents(*level)
        level = [item for item in items if type(item) is dict or type(item) is list]
        if not level:
            return
    if json_form and all(type(c) is dict and len(c) == 1 and ("$link" in c or "$bytes" in c) for c in level):
        return
    raise ValueError(f"maps and lists nested more than {MAX_DEPTH} deep")


def _heads(block: bytes) -> int:
    """How many bytes of ``block`` could start a map or a list: a bound on its nesting depth.

    Each level of nesting needs its own map or list head, whose first byte is in 0x80-0xbf.
    Counted at C speed; only asked of blocks longer than :data:`MAX_DEPTH` bytes.
    """
    return len(block) - len(block.translate(None, _CONTAINER_HEADS))


def _error(block: bytes, exc: BaseException) -> RecordDecodeError:
    detail = str(exc) or type(exc).__name__
    return RecordDecodeError(f"record block of {len(block)} bytes is not one well-formed DAG-CBOR item: {detail}")


def decode_record(block: bytes) -> RecordValue:
    """Decode a record block into Python values; a block processor.

    Args:
        block: the record's DAG-CBOR bytes.

    Returns:
        The record, usually a ``dict`` with ``str`` keys; values are ``dict``, ``list``,
        ``str``, ``int``, ``float``, ``bool``, ``None``, ``bytes`` and :class:`Link`.

    Raises:
        RecordDecodeError: ``block`` is not one well-formed DAG-CBOR item (see the module
            docstring, "Strictness"), e.g. trailing bytes, unsorted or repeated map keys, a tag
            other than 42, a link that is not a CIDv1, or nesting past :data:`MAX_DEPTH`.

    Cost: ~2 us for a typical 250-byte record (module docstring). Spec: atproto data model;
    IPLD DAG-CBOR.
    """
    try:
        value: RecordValue = _decode(block, False, Link)  # type: ignore[assignment]  # cid_ctor=Link: links are Link
    except Exception as exc:
        raise _error(block, exc) from exc
    if len(block) > MAX_DEPTH and _heads(block) > MAX_DEPTH:
        try:
            _check_depth(value, False)
        except ValueError as exc:
            raise _error(block, exc) from exc
    return value


def record_json(block: bytes) -> JsonValue:
    """Decode a record block straight into the atproto JSON form; a block processor.

    Equal to ``to_json_value(decode_record(block))``, built in C by cbrrr: links become
    ``{"$link": "bafy..."}`` (base32 CID string) and bytes ``{"$bytes": "..."}`` (standard
    base64 alphabet, no padding, as the reference implementation writes it). The result holds
    only ``dict``, ``list``, ``str``, ``int``, ``bool`` and ``None`` (``float`` too in the rare
    record that has one) and goes to :func:`json.dumps` as it is.

    Raises:
        RecordDecodeError: as :func:`decode_record`; also a map with a ``"$link"`` or
            ``"$bytes"`` key, which has no JSON form (the data model reserves them).

    Cost: ~2 us for a typical 250-byte record (module docstring). Links are checked by counting
    link heads in the block; only a record with a link that is not a 36-byte sha2-256 CIDv1
    is decoded a second time for an exact check. Spec: atproto data model, "JSON
    Representation".
    """
    try:
        # cbrrr's C decoder called directly (its Python wrapper costs ~0.4 us a record), with the
        # wrapper's check: the item must end where the block does.
        value, length = _decode_c(block, Link, True)
        if length != len(block):
            raise ValueError("did not parse to end of buffer")
    except Exception:  # decode_record below raises the precise error
        # A float (which cbrrr's JSON mode refuses), or a malformed block: decode_record says
        # which, and to_json_value refuses the reserved keys.
        try:
            return to_json_value(decode_record(block))
        except (TypeError, ValueError) as exc:
            raise _error(block, exc) from exc
    # 0xd8 starts every link's tag head; looking for one byte is memchr (~0.1 us), for the two
    # bytes of the head ten times slower, so the longer search runs only after the short one.
    if 0xD8 in block or len(block) > MAX_DEPTH:
        try:
            if 0xD8 in block and _TAG_42 in block and not _blessed_links_only(block):
                _decode(block, False, _check_link)  # exact: a validating cid_ctor
            if len(block) > MAX_DEPTH and _heads(block) > MAX_DEPTH:
                _check_depth(value, True)
        except Exception as exc:
            raise _error(block, exc) from exc
    return value


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").decode("ascii")


def _to_json(value: Any, depth: int) -> Any:
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        return value
    if t is dict or t is list or t is tuple:
        if depth >= MAX_DEPTH:
            raise ValueError(f"maps and lists nested more than {MAX_DEPTH} deep")
        if t is dict:
            out = {}
            for key, item in value.items():
                if type(key) is not str:
                    raise TypeError(f"map key {key!r:.80} is not a str")
                if key == "$link" or key == "$bytes":
                    raise ValueError(f"map key {key!r} is reserved by the atproto data model's JSON form")
                out[key] = _to_json(item, depth + 1)
            return out
        return [_to_json(item, depth + 1) for item in value]
    if isinstance(value, cbrrr.CID):
        return {"$link": value.encode()}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": _b64(bytes(value))}
    if isinstance(value, MultiformatsCID):
        return {"$link": value.encode("base32")}
    if t is float:
        if not math.isfinite(value):
            raise ValueError(f"{value} has no JSON form")
        return value
    if isinstance(value, (str, int)):  # subclasses (bool is handled above)
        return str(value) if isinstance(value, str) else int(value)
    raise TypeError(f"{type(value).__name__} is not an atproto data model type")


def to_json_value(value: Any) -> JsonValue:
    """Turn a decoded value (from :func:`decode_record`) into the atproto JSON form.

    Links (:class:`Link`, any ``cbrrr.CID``, a multiformats ``CID``) become
    ``{"$link": "<base32 CID>"}``; ``bytes`` (or ``bytearray``, ``memoryview``) become
    ``{"$bytes": "<base64, standard alphabet, no padding>"}``; maps (``str`` keys) and lists
    (or tuples) are converted item by item; ``str``, ``int``, ``bool``, ``None`` and finite
    ``float`` are kept. The input is not modified.

    Raises:
        TypeError: a value of another type, or a map key that is not a ``str``.
        ValueError: a ``"$link"`` or ``"$bytes"`` map key (reserved), a NaN or infinite float,
            or maps and lists nested more than :data:`MAX_DEPTH` deep.

    Spec: atproto data model, "JSON Representation".
    """
    json_value: JsonValue = _to_json(value, 0)
    return json_value


def _encode_record(value: Any) -> bytes:
    return cbrrr.encode_dag_cbor(value, False, Link)


#: The disk codec for :func:`decode_record`'s values: ``(encode, decode)`` to pass to
#: ``DriverBuilder.with_codec``. DAG-CBOR through cbrrr, so values come back equal (links as
#: :class:`Link`). Not needed for :func:`record_json`, whose values the default codec handles.
RECORD_CODEC: Final = (_encode_record, decode_record)

#: The disk codec for :func:`record_json`'s values: ``(encode, decode)``, DAG-CBOR through cbrrr.
#: The values come back equal, with their keys in the same (canonical) order, since the record
#: they were decoded from had its keys in that order.
JSON_CODEC: Final = (cbrrr.encode_dag_cbor, cbrrr.decode_dag_cbor)
