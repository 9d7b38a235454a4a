"""Incremental CAR v1 reader over any async byte source.

A CAR v1 stream is ``varint(len) + DAG-CBOR header {version: 1, roots: [CID, ...]}`` followed by
sections ``varint(len) + CID + block`` (spec: IPLD CARv1, https://ipld.io/specs/transport/car/carv1/;
atproto repository, "CAR File Serialization").

:class:`CarParser` is sans-IO (after h11's design): it is fed bytes and hands back the header and
complete sections, or says how many more bytes it needs; it never reads. :class:`CarReader` is the
small async pump that reads a :class:`ByteSource` into a parser, the pure-Python one here or the C
core's (:mod:`repo_stream._native`), which has the same methods and raises the same errors. CIDs
stay raw ``bytes``.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Final, Protocol, runtime_checkable

import anyio
import cbor2

from ..errors import (
    CarHeaderError,
    SourceError,
    VarintError,
)
from . import messages
from .cid import DAG_CBOR_SHA256_PREFIX
from .dagcbor import DagCborError, StrictDecoder

__all__ = [
    "DEFAULT_MAX_BLOCK_SIZE",
    "DEFAULT_READ_SIZE",
    "AsyncReadable",
    "BlockSink",
    "ByteSource",
    "CarParser",
    "CarReader",
    "decode_header",
    "read_varint",
]

#: Largest block accepted by default, in bytes (2 MiB). Bigger sections fail before allocation.
DEFAULT_MAX_BLOCK_SIZE = 2 * 1024 * 1024
#: Bytes requested from the source per read (1 MiB: fewer thread hops than 256 KiB, ~5% faster loads).
DEFAULT_READ_SIZE = 1024 * 1024
# A CID is three varints (<= 9 bytes each) and a digest of at most 64 bytes (sha2-512): <= 92 bytes.
_MAX_DIGEST_BYTES = 64
# Sections may exceed the block limit by this much (the CID).
_MAX_CID_BYTES = 128
_SHA256 = hashlib.sha256


@runtime_checkable
class AsyncReadable(Protocol):
    """Anything with ``async read(n) -> bytes`` that returns ``b""`` at the end (anyio ``AsyncFile``)."""

    async def read(self, n: int = -1, /) -> bytes: ...


def read_varint(buf: bytes, pos: int, offset: int = 0, end: int | None = None) -> tuple[int, int] | None:
    """Decode an unsigned LEB128 varint from ``buf`` at ``pos``, reading no further than ``end``.

    Returns ``(value, next_pos)``, or ``None`` if the bytes end (at ``end``, default
    ``len(buf)``) before the varint does. ``offset`` is the absolute stream offset of ``buf[0]``,
    for error messages.

    Raises:
        VarintError: longer than 9 bytes, or not minimal (a trailing zero byte).
    """
    value = 0
    shift = 0
    start = pos
    if end is None:
        end = len(buf)
    while True:
        if pos >= end:
            if pos - start >= 9:
                raise messages.varint_too_long(offset + start)
            return None
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            if byte == 0 and pos - start > 1:
                raise messages.varint_not_minimal(offset + start)
            return value, pos
        shift += 7
        if pos - start >= 9:
            raise messages.varint_too_long(offset + start)


def _cid_end(buf: bytes, pos: int, end: int, offset: int) -> int:
    """Return where the binary CID starting at ``buf[pos]`` ends; it must fit before ``end``.

    Raises:
        CidError: not CIDv0/CIDv1, or its multihash runs past ``end`` (the section's end).
    """
    at = offset + pos
    if end - pos >= 2 and buf[pos] == 0x12 and buf[pos + 1] == 0x20:  # CIDv0: bare sha2-256 multihash
        if pos + 34 > end:
            raise messages.cid_bad(at, "multihash runs past the end of its section")
        return pos + 34
    fields = []
    p = pos
    for _ in range(4):  # version, codec, hash function, digest length
        try:
            got = read_varint(buf, p, offset, end)
        except VarintError as exc:
            raise messages.cid_bad(at, str(exc)) from None
        if got is None:
            raise messages.cid_bad(at, "runs past the end of its section")
        value, p = got
        fields.append(value)
    version, _codec, _hash, digest_len = fields
    if version != 1:
        raise messages.cid_bad(at, f"unsupported CID version {version}")
    if digest_len > _MAX_DIGEST_BYTES:
        raise messages.cid_bad(at, f"a {digest_len}-byte digest is longer than any supported hash ({_MAX_DIGEST_BYTES})")
    if p + digest_len > end:
        raise messages.cid_bad(at, f"multihash digest of {digest_len} bytes runs past the end of its section")
    return p + digest_len


def _verify(cid: bytes, block: bytes) -> None:
    """Check ``block`` against the sha2-256 digest in ``cid`` (a CID :func:`_cid_end` accepted).

    Raises:
        CidMismatchError: the digest differs, or the CID does not use sha2-256.
    """
    if len(cid) == 34 and cid.startswith(b"\x12\x20"):  # CIDv0
        digest = cid[2:]
    else:
        _version, p = read_varint(cid, 0) or (0, 0)
        _codec, p = read_varint(cid, p) or (0, 0)
        if cid[p : p + 2] != b"\x12\x20" or len(cid) != p + 34:
            raise messages.cid_not_sha256(cid)
        digest = cid[p + 2 :]
    if _SHA256(block).digest() != digest:
        raise messages.cid_mismatch(cid)


class ByteSource:
    """Adapts any supported async byte source to ``await read() -> bytes`` (``b""`` at the end).

    Accepted sources: ``bytes``/``bytearray``/``memoryview``; an object with ``async read(n)``
    (anyio ``AsyncFile``); an anyio ``ByteReceiveStream`` (``async receive(max_bytes)``); or an
    async iterable of ``bytes`` chunks (e.g. ``httpx.Response.aiter_bytes()``).

    Raises:
        SourceError: the source raised (chained as ``__cause__``), returned something that is not
            bytes, or is of none of the kinds above.
    """

    __slots__ = ("_kind", "_obj", "_iter", "_read_size", "_done")

    def __init__(self, source: Any, read_size: int = DEFAULT_READ_SIZE) -> None:
        self._read_size = read_size
        self._done = False
        self._iter: AsyncIterator[bytes] | None = None
        self._obj = source
        if isinstance(source, (bytes, bytearray, memoryview)):
            self._kind = "bytes"
            self._obj = memoryview(source).cast("B")
        elif callable(getattr(source, "receive", None)):
            self._kind = "receive"
        elif callable(getattr(source, "read", None)):
            self._kind = "read"
        elif isinstance(source, AsyncIterable) or callable(getattr(source, "__aiter__", None)):
            self._kind = "iter"
        else:
            raise SourceError(
                f"unsupported CAR source {type(source).__name__}: expected bytes, an object with "
                "async read(n), an anyio ByteReceiveStream, or an async iterable of bytes"
            )

    async def read(self) -> bytes:
        """Return the next non-empty chunk of the source, or ``b""`` once it is exhausted."""
        while not self._done:
            try:
                chunk = await self._next()
            except Exception as exc:
                raise SourceError(f"reading the CAR source failed: {type(exc).__name__}: {exc}") from exc
            if chunk is None:
                self._done = True
                return b""
            if type(chunk) is not bytes:
                if not isinstance(chunk, (bytearray, memoryview)):
                    raise SourceError(f"the CAR source returned {type(chunk).__name__}, expected bytes")
                chunk = bytes(chunk)
            if chunk:
                return chunk
            if self._kind != "iter":  # b"" from read() means the end; an iterator may yield b"" mid-stream
                self._done = True
        return b""

    async def _next(self) -> Any:
        """One raw read from the source; ``None`` at its end."""
        kind = self._kind
        if kind == "bytes":
            view: memoryview = self._obj
            if not view:
                return None
            self._obj = view[self._read_size :]
            return bytes(view[: self._read_size])
        if kind == "read":
            chunk = self._obj.read(self._read_size)
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                chunk = await chunk
            return chunk
        if kind == "receive":
            try:
                return await self._obj.receive(self._read_size)
            except anyio.EndOfStream:
                return None
        if self._iter is None:
            self._iter = aiter(self._obj)
        try:
            return await anext(self._iter)
        except StopAsyncIteration:
            return None

    async def aclose(self) -> None:
        """Close the underlying async iterator, if any (file objects are left to their owner)."""
        it = self._iter
        self._iter = None
        self._done = True
        if it is not None and hasattr(it, "aclose"):
            try:
                await it.aclose()
            except Exception:
                pass


#: The usual header's bytes around its one root CID: a map of 2, "roots", an array of 1, a tag-42
#: link of 37 bytes (0x00 + the 36-byte CID); then "version", 1.
_ONE_ROOT_HEAD: Final = b"\xa2\x65roots\x81\xd8\x2a\x58\x25\x00"
_VERSION_1: Final = b"\x67version\x01"


def decode_header(raw: bytes, start: int) -> list[bytes]:
    """Decode the CAR header's DAG-CBOR bytes ``raw`` (found at byte ``start``); return its roots.

    The roots are raw CID bytes; there is at least one (the first is the repo's commit).

    Raises:
        CarHeaderError: not DAG-CBOR, not a map, ``version`` not 1, roots missing, empty or not CIDs.
        CidError: a root is a link whose bytes are not a CID.
    """
    if len(raw) == 58 and raw.startswith(_ONE_ROOT_HEAD) and raw.endswith(_VERSION_1) and raw[13:17] == DAG_CBOR_SHA256_PREFIX:
        # The usual header, {"roots": [one v1 dag-cbor sha2-256 CID], "version": 1} in canonical
        # DAG-CBOR, byte for byte: what the decode below returns for it, without a decoder.
        return [raw[13:49]]
    try:
        header = StrictDecoder(max_depth=8).decode(raw)
    except DagCborError as exc:
        raise CarHeaderError(f"CAR header (bytes {start}..{start + len(raw)}) is not valid DAG-CBOR: {exc}") from exc
    if not isinstance(header, dict):
        raise CarHeaderError(f"CAR header is a {type(header).__name__}, expected a map")
    version = header.get("version")
    if type(version) is not int or version != 1:
        raise CarHeaderError(f"CAR header version is {version!r}, only 1 is supported")
    roots = header.get("roots")
    if not isinstance(roots, list):
        raise CarHeaderError(f"CAR header roots is {type(roots).__name__}, expected a list of CIDs")
    if not roots:
        raise CarHeaderError("CAR header has no roots; the first root must be the commit")
    out = []
    for i, root in enumerate(roots):
        if not (
            isinstance(root, cbor2.CBORTag)
            and root.tag == 42
            and isinstance(root.value, bytes)
            and len(root.value) > 1
            and root.value[0] == 0
        ):
            raise CarHeaderError(f"CAR header root {i} is not a CID link: {root!r:.80}")
        cid = root.value[1:]
        _cid_end(cid, 0, len(cid), 0)  # raises CidError on garbage
        out.append(cid)
    return out


class BlockSink(Protocol):
    """Where :meth:`CarParser.load_into` puts sections: the in-memory block table."""

    used: int
    #: The raw CID of the commit (the CAR's first root).
    root: bytes

    def add(self, cid: bytes, block: bytes) -> None:
        """Keep ``block`` under ``cid`` (a repeated CID keeps its first block); grows ``used``."""


class CarParser:
    """A sans-IO CAR v1 parser (the pure-Python reference; :mod:`repo_stream._native` has the C one).

    It never reads: :meth:`feed` gives it bytes, :attr:`want` says how many more it needs before
    it can make progress, and :meth:`read_header`, :meth:`next_sections` and :meth:`load_into`
    take what the bytes fed so far complete. :class:`CarReader` is the async pump around it.

    Args:
        max_block_size: the largest block accepted, in bytes; a larger section is refused as soon
            as its length (or, when the length is within a CID of the limit, its CID) is read.
        verify_cids: check each block's bytes against its CID's sha2-256 digest.

    The buffer holds at most one section plus what was fed after it, so memory stays near
    ``max_block_size`` plus one feed whatever the input claims.

    Raises (from its methods): :class:`TruncatedCarError`, :class:`VarintError`,
    :class:`BlockTooLargeError`, :class:`CidError`, :class:`CidMismatchError`.
    """

    __slots__ = ("_buf", "_pos", "_offset", "_need", "_header_done", "max_block_size", "verify_cids", "bytes_fed", "blocks_read")

    def __init__(self, max_block_size: int = DEFAULT_MAX_BLOCK_SIZE, verify_cids: bool = False) -> None:
        self._buf = b""
        self._pos = 0
        self._offset = 0  # stream offset of self._buf[0]
        self._need = 0  # bytes (from self._pos) the parser needs before it can go on
        self._header_done = False
        self.max_block_size = max_block_size
        self.verify_cids = verify_cids
        #: Bytes fed so far.
        self.bytes_fed = 0
        #: Sections parsed so far.
        self.blocks_read = 0

    @property
    def offset(self) -> int:
        """Stream offset (bytes) of the first unparsed byte."""
        return self._offset + self._pos

    @property
    def want(self) -> int:
        """How many more bytes the parser needs before it can make progress (at least 1)."""
        return max(self._need - (len(self._buf) - self._pos), 1)

    def feed(self, data: bytes) -> None:
        """Append ``data`` (the next bytes of the CAR) to what is buffered."""
        self.bytes_fed += len(data)
        pos = self._pos
        if pos >= len(self._buf):
            self._offset += len(self._buf)
            self._buf = data
        else:
            self._offset += pos
            self._buf = b"".join([memoryview(self._buf)[pos:], data])
        self._pos = 0
        self._need = 0

    def read_header(self) -> bytes | None:
        """Take the CAR header's DAG-CBOR bytes if they have all been fed, else return ``None``.

        Decode them with :func:`decode_header` (its start is :attr:`offset` minus their length).

        Raises:
            CarHeaderError: the header length is 0. BlockTooLargeError: it is over the block limit.
            VarintError: the length is not a valid varint.
        """
        got = read_varint(self._buf, self._pos, self._offset)
        if got is None:
            self._need = len(self._buf) - self._pos + 1
            return None
        length, start = got
        if length == 0:
            raise messages.header_length_zero()
        if length > self.max_block_size:
            raise messages.header_too_large(length, self.max_block_size)
        if start + length > len(self._buf):
            self._need = start + length - self._pos
            return None
        self._pos = start + length
        self._header_done = True
        return self._buf[start : start + length]

    def finish(self) -> None:
        """Say the input has ended: raise if it ended inside the header or a section.

        Raises:
            TruncatedCarError: no header, or bytes of an incomplete section are left.
        """
        if not self._header_done:
            if self.bytes_fed == 0:
                raise messages.empty_input()
            raise messages.truncated_header(self.bytes_fed)
        left = len(self._buf) - self._pos
        if left:
            raise messages.truncated_section(self.offset, left)

    def next_sections(self) -> list[tuple[bytes, bytes]]:
        """Return every complete ``(cid, block)`` section buffered (possibly none)."""
        out: list[tuple[bytes, bytes]] = []
        append = out.append
        while (section := self._section()) is not None:
            append(section)
        return out

    def sections_into(self, blocks: dict[bytes, bytes]) -> int:
        """Put every complete section buffered into ``blocks`` (raw CID -> block; a CID already
        there keeps its block, as ``dict.setdefault``); return how many sections were read.

        Raises: as :meth:`next_sections` (``blocks`` then holds the sections before the bad one)."""
        read = 0
        setdefault = blocks.setdefault
        while (section := self._section()) is not None:
            setdefault(*section)
            read += 1
        return read

    def load_into(self, table: BlockSink, limit: int) -> bool:
        """Move complete sections into ``table`` until ``table.used`` reaches ``limit`` bytes.

        Returns True if it stopped at the limit, or just after the table's root block (the
        commit: the caller decodes it before any later section is read, so a bad commit is
        reported before a bad section after it, wherever the limit falls); sections may still be
        buffered. False when the buffered bytes hold no further complete section.
        """
        add = table.add
        section = self._section
        root = table.root
        while (got := section()) is not None:
            add(*got)
            if table.used >= limit or got[0] == root:
                return True
        return False

    def _section(self) -> tuple[bytes, bytes] | None:
        """Parse the next complete section, or return ``None`` (setting what is needed)."""
        buf = self._buf
        pos = start = self._pos
        n = len(buf)
        if pos >= n:
            return None
        offset = self._offset
        limit = self.max_block_size
        length = buf[pos]
        if length < 0x80:
            pos += 1
        elif pos + 1 < n and 0 < buf[pos + 1] < 0x80:  # two bytes: blocks of 128 B..16 KiB
            length = (length & 0x7F) | (buf[pos + 1] << 7)
            pos += 2
        else:
            got = read_varint(buf, pos, offset)
            if got is None:
                self._need = n - start + 1
                return None
            length, pos = got
        if length > limit + _MAX_CID_BYTES:
            raise messages.section_too_large(offset + start, length, limit)
        end = pos + length
        prefix = DAG_CBOR_SHA256_PREFIX
        if end > n:
            if length > limit and (buf.startswith(prefix, pos) or n - pos >= _MAX_CID_BYTES):
                # Possibly over the limit by less than a CID: decide now, not after buffering it.
                cid_end = pos + 36 if buf.startswith(prefix, pos) else _cid_end(buf, pos, end, offset)
                if end - cid_end > limit:
                    raise messages.block_too_large(buf[pos:cid_end], offset + start, end - cid_end, limit)
            self._need = end - start
            return None
        if length == 0:
            raise messages.empty_section(offset + start)
        if buf.startswith(prefix, pos) and pos + 36 <= end:
            cid_end = pos + 36
        else:
            cid_end = _cid_end(buf, pos, end, offset)
        if end - cid_end > limit:
            raise messages.block_too_large(buf[pos:cid_end], offset + start, end - cid_end, limit)
        cid = buf[pos:cid_end]
        block = buf[cid_end:end]
        if self.verify_cids and (cid_end - pos != 36 or not cid.startswith(prefix) or _SHA256(block).digest() != cid[4:]):
            _verify(cid, block)  # another kind of CID, or a mismatch to report
        self._pos = end
        self.blocks_read += 1
        return cid, block


class CarReader:
    """The async pump around a sans-IO CAR parser: reads the source until the parser has enough.

    Args:
        source: any source :class:`ByteSource` accepts.
        parser: a :class:`CarParser` (or the C core's, which has the same methods).
        read_size: bytes requested from the source per read (default 1 MiB).

    Reads are gathered until the parser's :attr:`CarParser.want` is met and fed at once, so a
    section arriving in many small chunks costs linear, not quadratic, copying.

    Raises (from its methods): the parser's errors, :class:`CarHeaderError`, :class:`SourceError`.
    """

    __slots__ = ("_source", "parser", "_eof")

    def __init__(self, source: Any, parser: Any, read_size: int = DEFAULT_READ_SIZE) -> None:
        self._source = source if isinstance(source, ByteSource) else ByteSource(source, read_size)
        self.parser = parser
        self._eof = False

    @property
    def bytes_read(self) -> int:
        """Bytes received from the source so far."""
        return int(self.parser.bytes_fed)

    @property
    def blocks_read(self) -> int:
        """Sections parsed so far."""
        return int(self.parser.blocks_read)

    async def fill(self) -> bool:
        """Read until the parser's :attr:`~CarParser.want` is met (at least one read) and feed it.

        Returns False, having fed nothing, at the end of the input.
        """
        if self._eof:
            return False
        want = self.parser.want
        chunks: list[bytes] = []
        got = 0
        while got < want:
            chunk = await self._source.read()
            if not chunk:
                self._eof = True
                break
            chunks.append(chunk)
            got += len(chunk)
        if not chunks:
            return False
        self.parser.feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        return True

    async def read_header(self) -> list[bytes]:
        """Read and decode the CAR header; return its roots as raw CID bytes (at least one).

        Raises:
            CarHeaderError, CidError, BlockTooLargeError, VarintError; TruncatedCarError: the
            input ends inside the header (or is empty).
        """
        parser = self.parser
        while (raw := parser.read_header()) is None:
            if not await self.fill():
                parser.finish()
        return decode_header(raw, parser.offset - len(raw))

    async def load_into(self, table: BlockSink, limit: int) -> bool:
        """Read sections into ``table`` until ``table.used`` reaches ``limit`` or the input ends.

        Returns True if it stopped at the limit, False at the end of the input.

        Raises:
            TruncatedCarError: the input ends inside a section; the parser's other errors.
        """
        parser = self.parser
        while True:
            if parser.load_into(table, limit):
                if table.used >= limit:
                    return True
                continue  # stopped just after the root block
            if not await self.fill():
                parser.finish()
                return False

    async def aclose(self) -> None:
        """Release the source's iterator (if any)."""
        await self._source.aclose()
