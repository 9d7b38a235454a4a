"""A record block straight to its atproto JSON text: :func:`transcode_json`, a block processor.

``transcode_json(block)`` is ``json.dumps(record_json(block), ensure_ascii=False,
separators=(",", ":"))``, byte for byte (what ``repo-stream dump`` writes as each line's
``value``), made without a Python object per value: the C core (``native/json.c``) reads the
DAG-CBOR and writes the JSON in one pass, and the walk keeps only the text (a ``str``, so a kept
record costs its JSON's size). :func:`transcode_json_reference` is the readable pure-Python
reference the C core mirrors: the same checks in the same order, the same error and message.

The text: maps in the block's (canonical) key order; links as ``{"$link":"b<base32 CID>"}``;
byte strings as ``{"$bytes":"<base64, standard alphabet, no padding>"}``; integers in full
(DAG-CBOR's range, -2**64 to 2**64-1, as record_json keeps them); floats (64-bit, finite: the
atproto data model forbids them in records, but DAG-CBOR allows them and record_json decodes
them) as Python's ``repr``; strings escaped as :mod:`json` escapes them with
``ensure_ascii=False`` (``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``, other
control characters as ``\\u00XX``; everything else as it is).

Strictness (spec: IPLD DAG-CBOR, "Strictness"; atproto data model, "JSON Representation"): the
block must be exactly one item; minimal heads; definite lengths; map keys text strings in
canonical order (shorter first, then bytewise), none repeated, none ``"$link"`` or ``"$bytes"``;
valid UTF-8; no tag but 42, over a byte string ``0x00 + CIDv1`` with a complete multihash; only
the simple values false, true, null and 64-bit floats (no NaN, no infinity); maps and lists
nested at most :data:`~repo_stream.records.values.MAX_DEPTH` deep. Anything else raises
:class:`~repo_stream.errors.RecordDecodeError` naming the byte offset (the same blocks
:func:`~repo_stream.records.values.record_json` refuses; the messages are this module's).
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Callable
from typing import Final

from ..core import implementation, messages
from ..errors import RecordDecodeError
from .values import MAX_DEPTH, record_json

__all__ = ["transcode_json", "transcode_json_reference", "json_text_processor"]

_dumps: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_FLOAT: Final = struct.Struct(">d")


class _Bad(Exception):
    def __init__(self, at: int, why: str) -> None:
        self.at = at
        self.why = why


def _head(block: bytes, at: int) -> tuple[int, int, bool, int]:
    """``(major, argument, minimal, next offset)`` of the CBOR head at ``block[at:]``."""
    if at >= len(block):
        raise _Bad(at, "truncated or reserved CBOR head")
    first = block[at]
    info = first & 0x1F
    if info < 24:
        return first >> 5, info, True, at + 1
    if info > 27:
        raise _Bad(at, "truncated or reserved CBOR head")
    width = 1 << (info - 24)
    if len(block) - at - 1 < width:
        raise _Bad(at, "truncated or reserved CBOR head")
    value = int.from_bytes(block[at + 1 : at + 1 + width], "big")
    minimal = value >= (24, 0x100, 0x10000, 0x100000000)[info - 24]
    return first >> 5, value, minimal, at + 1 + width


def _varint(raw: bytes, at: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 63, 7):
        if at >= len(raw):
            raise ValueError("a link's CID ends inside a varint")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if shift and not byte:
                raise ValueError("a link's CID has a varint that is not minimal")
            return value, at
    raise ValueError("a link's CID has a varint longer than 9 bytes")


def _cid_problem(cid: bytes) -> str | None:
    if len(cid) == 36 and cid[0] == 1 and cid[1] in (0x71, 0x55) and cid[2:4] == b"\x12\x20":
        return None
    if len(cid) == 34 and cid[:2] == b"\x12\x20":
        return "a link is a CIDv0 (atproto links are CIDv1)"
    try:
        version, at = _varint(cid, 0)
        if version != 1:
            return "a link's CID is not version 1"
        _, at = _varint(cid, at)
        _, at = _varint(cid, at)
        length, at = _varint(cid, at)
    except ValueError as exc:
        return str(exc)
    if length != len(cid) - at:
        return "a link's CID digest is not the length its multihash declares"
    return None


def _text(block: bytes, start: int, end: int, at: int, what: str) -> str:
    try:
        return _dumps(block[start:end].decode("utf-8"))
    except UnicodeDecodeError:
        raise _Bad(at, f"{what} is not valid UTF-8") from None


def _transcode(block: bytes) -> str:
    out: list[str] = []
    stack: list[list[int]] = []  # [items left, is map, last key start, last key length] (-1: none)
    p = 0
    n = len(block)
    while True:
        if stack and stack[-1][1]:  # a key
            frame = stack[-1]
            at = p
            major, length, minimal, p = _head(block, p)
            if major != 3:
                raise _Bad(at, "a map key is not a text string")
            if not minimal:
                raise _Bad(at, "a length is not minimally encoded")
            if length > n - p:
                raise _Bad(at, "a map key runs past the end of the block")
            key = block[p : p + length]
            if frame[2] >= 0:
                last = block[frame[2] : frame[2] + frame[3]]
                if key == last:
                    raise _Bad(at, "a map key is repeated")
                if (length, key) < (frame[3], last):
                    raise _Bad(at, "map keys are not in canonical order (shorter first, then bytewise)")
            if key == b"$link" or key == b"$bytes":
                raise _Bad(at, "a map key '$link' or '$bytes' is reserved by the atproto data model's JSON form")
            frame[2], frame[3] = p, length
            out.append(_text(block, p, p + length, at, "a map key"))
            out.append(":")
            p += length
        at = p
        if p < n and block[p] == 0xFB:
            if n - p < 9:
                raise _Bad(at, "truncated or reserved CBOR head")
            (value,) = _FLOAT.unpack_from(block, p + 1)
            p += 9
            if math.isnan(value):
                raise _Bad(at, "a float is NaN")
            if math.isinf(value):
                raise _Bad(at, "a float is infinite")
            out.append(repr(value))
        else:
            major, arg, minimal, p = _head(block, p)
            if major == 7 and not 0xF4 <= block[at] <= 0xF6:
                raise _Bad(at, "a CBOR simple value or float DAG-CBOR does not allow")
            if not minimal:
                raise _Bad(
                    at,
                    "a tag is not minimally encoded"
                    if major == 6
                    else "a length is not minimally encoded"
                    if major >= 2
                    else "an integer is not minimally encoded",
                )
            if major == 0:
                out.append(str(arg))
            elif major == 1:
                out.append(str(-1 - arg))
            elif major == 2:
                if arg > n - p:
                    raise _Bad(at, "a byte string runs past the end of the block")
                out.append('{"$bytes":"' + base64.b64encode(block[p : p + arg]).decode("ascii").rstrip("=") + '"}')
                p += arg
            elif major == 3:
                if arg > n - p:
                    raise _Bad(at, "a text string runs past the end of the block")
                out.append(_text(block, p, p + arg, at, "a text string"))
                p += arg
            elif major == 4 or major == 5:
                if len(stack) >= MAX_DEPTH:
                    raise _Bad(at, f"maps and lists nested more than {MAX_DEPTH} deep")
                if arg > (n - p if major == 4 else (n - p) // 2):
                    raise _Bad(
                        at,
                        "a list claims more items than there are bytes left"
                        if major == 4
                        else "a map claims more entries than there are bytes left",
                    )
                if arg == 0:
                    out.append("[]" if major == 4 else "{}")
                else:
                    out.append("[" if major == 4 else "{")
                    stack.append([arg, major == 5, -1, 0])
                    continue
            elif major == 6:
                if arg != 42:
                    raise _Bad(at, "a CBOR tag other than 42 (link)")
                s = p
                major, length, minimal, p = _head(block, p)
                if major != 2:
                    raise _Bad(s, "a link (tag 42) is not over a byte string")
                if not minimal:
                    raise _Bad(s, "a length is not minimally encoded")
                if length > n - p:
                    raise _Bad(s, "a byte string runs past the end of the block")
                if length == 0 or block[p] != 0:
                    raise _Bad(s, "a link's bytes do not start with 0x00")
                cid = block[p + 1 : p + length]
                why = _cid_problem(cid)
                if why is not None:
                    raise _Bad(s, why)
                out.append('{"$link":"b' + base64.b32encode(cid).decode("ascii").lower().rstrip("=") + '"}')
                p += length
            else:
                out.append("false" if arg == 20 else "true" if arg == 21 else "null")
        while True:
            if not stack:
                if p != n:
                    raise _Bad(p, "bytes after the end of the item")
                return "".join(out)
            frame = stack[-1]
            frame[0] -= 1
            if frame[0] > 0:
                out.append(",")
                break
            out.append("}" if frame[1] else "]")
            stack.pop()


def transcode_json_reference(block: bytes) -> str:
    """The pure-Python reference of :func:`transcode_json` (what ``native/json.c`` mirrors).

    Args:
        block: the record's DAG-CBOR bytes.

    Returns:
        The record's atproto JSON text (module docstring).

    Raises:
        RecordDecodeError: ``block`` is not one strict DAG-CBOR item with a JSON form (module
            docstring, "Strictness"); the message names the block's size and the byte offset.
    """
    try:
        return _transcode(bytes(block))
    except _Bad as bad:
        raise messages.record_not_dagcbor(len(block), bad.at, bad.why) from None


def _python_transcode_json(block: bytes) -> str:
    """The pure-Python backend's :func:`transcode_json`: cbrrr's JSON mode and :mod:`json` (C
    code, ~3x the reference's speed), which accept the same blocks and give the same text; a
    block they refuse goes to the reference, for its error and message."""
    try:
        return _dumps(record_json(block))
    except RecordDecodeError:
        return transcode_json_reference(block)


def json_text_processor() -> Callable[[bytes], str]:
    """The :func:`transcode_json` of the implementation in use (``repo_stream.IMPLEMENTATION``),
    to pass to ``DriverBuilder.with_block_processor``: the C core's function itself, so the walk
    calls C with no Python frame in between. Picklable (cluster workers can hold it)."""
    backend = implementation.backend()
    fn: Callable[[bytes], str] = _python_transcode_json if backend.name == "python" else backend.transcode_json
    return fn


def transcode_json(block: bytes) -> str:
    """A record block as its atproto JSON text, in the implementation in use; a block processor.

    Equal to ``json.dumps(record_json(block), ensure_ascii=False, separators=(",", ":"))`` for
    every block :func:`~repo_stream.records.values.record_json` accepts, and refuses the blocks
    it refuses, with this module's messages (module docstring). For a walk, pass
    :func:`json_text_processor`'s function (one call less per record).

    Args:
        block: the record's DAG-CBOR bytes.

    Returns:
        The JSON text (a ``str``; UTF-8 when written out).

    Raises:
        RecordDecodeError: ``block`` is not one strict DAG-CBOR item with a JSON form; the
            message names the block's size and the byte offset of the fault.

    Cost (C core): ~0.3 us for a typical 250-byte record. Spec: atproto data model, "JSON
    Representation"; IPLD DAG-CBOR, "Strictness".
    """
    text: str = implementation.backend().transcode_json(block)
    return text
