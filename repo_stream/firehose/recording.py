"""Recordings of a stream: each message as a 4-byte big-endian length, then its bytes.

The format keeps the messages exactly as received (header and body, DAG-CBOR), so a recording
replays through the same decoding and verification as the live stream
(``repo-stream firehose --replay FILE``, :func:`read_messages`), or one message of it through
``repo-stream verify-commit``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from ..errors import EventDecodeError
from ..sync.events import DEFAULT_MAX_MESSAGE_BYTES

__all__ = ["read_messages", "write_message"]

_LENGTH = struct.Struct(">I")


def write_message(out: BinaryIO, message: bytes) -> None:
    """Append one message to a recording: its length (4 bytes, big-endian) then its bytes."""
    out.write(_LENGTH.pack(len(message)))
    out.write(message)


def read_messages(source: BinaryIO, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, name: str = "recording") -> Iterator[bytes]:
    """The messages of a recording, in order; memory: one message at a time.

    Args:
        source: the recording, open for binary reading.
        max_bytes: refuse a declared length above this (before reading it).
        name: the file's name, for messages.

    Raises:
        EventDecodeError: a length over ``max_bytes``, or the file ending inside a length or a
            message (the message says at which byte offset).
    """
    offset = 0
    while True:
        head = source.read(4)
        if not head:
            return
        if len(head) < 4:
            raise EventDecodeError(f"{name}: the file ends inside a message length at byte {offset}")
        (length,) = _LENGTH.unpack(head)
        if length > max_bytes:
            raise EventDecodeError(f"{name}: the message at byte {offset} declares {length} bytes, over the {max_bytes}-byte limit")
        message = source.read(length)
        if len(message) < length:
            raise EventDecodeError(f"{name}: the file ends inside the {length}-byte message at byte {offset} ({len(message)} bytes there)")
        offset += 4 + length
        yield message
