"""Decoding ``com.atproto.sync.subscribeRepos`` messages: the frame header, then the body.

Spec: atproto event streams (https://atproto.com/specs/event-stream), "Framing": each WebSocket
binary message is two DAG-CBOR items back to back, a header ``{op: 1, t: "#commit"}`` (or
``{op: -1}`` for an error frame, whose body is ``{error, message?}``) and the body map. Lexicon
``com.atproto.sync.subscribeRepos``: ``#commit`` ``{seq, rebase, tooBig, repo, commit, rev,
since, blocks, ops: [{action, path, cid, prev?}], blobs, prevData?, time}``, ``#sync`` ``{seq,
did, blocks, rev, time}``.

Both items are decoded with cbrrr, which is strict (canonical DAG-CBOR only: minimal integers
and lengths, sorted map keys, tag 42 only, valid UTF-8), iterative (no recursion on nesting),
checks every declared length against the bytes left before allocating, and refuses trailing
bytes. Links come back as :class:`~repo_stream.records.values.Link` (raw CID bytes; ``str()`` is
base32), refused unless they are CIDv1. A message is refused before decoding when it is over
``max_bytes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, NamedTuple

from cbrrr import _cbrrr

from ..errors import ErrorFrameError, EventDecodeError
from ..records.values import Link

__all__ = ["DEFAULT_MAX_MESSAGE_BYTES", "Frame", "decode_frame"]

#: The largest message accepted, in bytes (5 MiB: a commit's blocks are at most 2,000,000 bytes).
DEFAULT_MAX_MESSAGE_BYTES: Final = 5 * 1024 * 1024

_decode: Callable[[Any, Callable[[bytes], Link], bool], tuple[object, int]] = _cbrrr.decode_dag_cbor


class Frame(NamedTuple):
    """A decoded subscribeRepos message.

    Attributes:
        type: the header's ``t`` (``"#commit"``, ``"#sync"``, ``"#identity"``, ...).
        body: the body map (links as :class:`~repo_stream.records.values.Link`).
    """

    type: str
    body: dict[str, object]


def _item(message: bytes | memoryview, start: int, what: str) -> tuple[object, int]:
    try:
        value, length = _decode(message[start:] if start else message, Link, False)
    except Exception as exc:
        detail = str(exc) or type(exc).__name__
        raise EventDecodeError(f"subscribeRepos message: the {what} at byte {start} is not valid DAG-CBOR: {detail}") from None
    return value, start + int(length)


def decode_frame(message: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Frame:
    """Decode one subscribeRepos message (the bytes of one WebSocket binary message).

    Args:
        message: the message bytes: header then body, two DAG-CBOR items.
        max_bytes: refuse longer messages (default :data:`DEFAULT_MAX_MESSAGE_BYTES`).

    Returns:
        The :class:`Frame` (header ``t`` and body map).

    Raises:
        EventDecodeError: over ``max_bytes``; either item not valid DAG-CBOR or not a map;
            bytes after the body; a header without ``op: 1`` and a text ``t``; an error frame
            (``op: -1``: :class:`~repo_stream.errors.ErrorFrameError`, a subclass, whose message
            quotes its ``error`` and ``message``).

    Spec: atproto event streams, "Framing".
    """
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise EventDecodeError(f"subscribeRepos message of type {type(message).__name__}: expected bytes")
    view = memoryview(message).cast("B")
    size = len(view)
    if size > max_bytes:
        raise EventDecodeError(f"subscribeRepos message of {size} bytes is over the {max_bytes}-byte limit")
    if not size:
        raise EventDecodeError("subscribeRepos message is empty")
    header, end = _item(view, 0, "header")
    if type(header) is not dict:
        raise EventDecodeError(f"subscribeRepos message: the header is a {type(header).__name__}, expected a map")
    if end >= size:
        raise EventDecodeError(f"subscribeRepos message: no body after the {end}-byte header")
    body, stop = _item(view, end, "body")
    if stop != size:
        raise EventDecodeError(f"subscribeRepos message: {size - stop} bytes after the body (at byte {stop})")
    if type(body) is not dict:
        raise EventDecodeError(f"subscribeRepos message: the body is a {type(body).__name__}, expected a map")
    op = header.get("op")
    if op == -1:
        error = body.get("error")
        text = body.get("message")
        raise ErrorFrameError(
            f"subscribeRepos error frame: {str(error)[:200]!r}" + (f": {str(text)[:500]!r}" if text is not None else ""),
            error=str(error)[:200],
            text=None if text is None else str(text)[:500],
        )
    kind = header.get("t")
    if op != 1 or type(op) is not int or type(kind) is not str:
        raise EventDecodeError(f"subscribeRepos message: header {str(header)[:200]} is not {{op: 1, t: <type>}}")
    return Frame(kind, body)
