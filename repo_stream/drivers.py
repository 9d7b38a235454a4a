"""Drivers: load a repo CAR into memory (or onto disk when it does not fit) and walk it in order.

The flow (after the Rust crate repo-stream)::

    driver = await DriverBuilder().with_mem_limit_mb(10).load_car(source)   # MemoryDriver | NeedDisk
    if isinstance(driver, NeedDisk):
        store = await DiskBuilder().open("spill.db")
        commit, driver = await driver.finish_loading(store)                  # -> DiskDriver
    while (chunk := await driver.next_chunk(256)) is not None:
        for key, value in chunk: ...

**Block processor.** A block that cannot be an MST node (it does not start like the DAG-CBOR map
``{e: [...], l: ...}``) is processed as it is loaded, and only the processed value is kept. A
block that could be a node is kept raw and processed only if the walk emits it as a record. An
exception from the processor is kept back (the raw block is kept instead) and raised as
:class:`~repo_stream.errors.ProcessorError` only if that block is emitted as a record.

**Memory limit.** Kept blocks count their raw length (or the processed value's size) plus
:data:`BLOCK_OVERHEAD` bytes each. When the count reaches the limit, :meth:`DriverBuilder.load_car`
stops reading and returns :class:`NeedDisk` holding what it has and the unread rest of the source.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import anyio
from multiformats import CID

from .car import DEFAULT_MAX_BLOCK_SIZE, DEFAULT_READ_SIZE, CarReader
from .cid import cid_str, to_cid
from .commit import Commit, decode_commit
from .disk import CBOR_CODEC, Codec, DiskStore
from .errors import DiskError, MissingBlockError
from .walk import DEFAULT_MAX_DEPTH, NOT_A_NODE, Walker

__all__ = ["BLOCK_OVERHEAD", "DriverBuilder", "MemoryDriver", "NeedDisk", "DiskDriver"]

T = TypeVar("T")

_MIB = 1024 * 1024
#: Bytes counted per kept block on top of its data: the dict slot, the CID key and object headers.
BLOCK_OVERHEAD = 160
_INT64 = 1 << 63  # SQLite integers are signed 64-bit
# Every MST node starts with map(2), text(1) "e", then an array header (major type 4).
_NODE_START = b"\xa2ae"


class _Encoded:
    """A processed value already encoded by the codec (while spilling: encoded once, not twice)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _Loader:
    """Sorts loaded sections into raw and processed blocks and finds the commit."""

    __slots__ = ("root", "process", "encode", "strict", "spilling", "raw", "processed", "used", "commit", "data_cid")

    def __init__(
        self, root: bytes, process: Callable[[bytes], Any] | None, encode: Callable[[Any], bytes], strict: bool = False
    ) -> None:
        self.root = root
        self.strict = strict
        #: Set by NeedDisk.finish_loading: values that need the codec are kept encoded.
        self.spilling = False
        self.process = process
        self.encode = encode
        self.raw: dict[bytes, bytes] = {}
        self.processed: dict[bytes, Any] = {}
        self.used = 0
        self.commit: Commit | None = None
        self.data_cid: bytes | None = None

    def ingest(self, sections: list[tuple[bytes, bytes]], start: int, limit: int) -> int | None:
        """Keep ``sections[start:]`` until the counted bytes reach ``limit``.

        Returns ``None`` if the limit was not reached, else the index of the first section not
        taken (possibly ``len(sections)``).

        Raises:
            CommitError: the commit block is malformed.
        """
        raw = self.raw
        processed = self.processed
        process = self.process
        root = self.root
        used = self.used
        overhead = BLOCK_OVERHEAD
        node_start = _NODE_START
        i = start
        n = len(sections)
        try:
            while i < n:
                cid, block = sections[i]
                i += 1
                if cid in raw or cid in processed:
                    continue  # a repeated CID: the first block wins, as in the disk store
                if process is None or (block.startswith(node_start) and len(block) > 3 and block[3] & 0xE0 == 0x80):
                    raw[cid] = block
                    used += len(block) + overhead
                elif cid == root:
                    raw[cid] = block
                    used += len(block) + overhead
                else:
                    try:
                        value = process(block)
                    except Exception:
                        raw[cid] = block  # processed again, and the error raised, only if emitted
                        used += len(block) + overhead
                    else:
                        t = type(value)
                        if t is int or t is bool or t is float or value is None:
                            used += 8 + overhead
                        elif t is bytes or t is str:
                            used += len(value) + overhead
                        else:
                            value, size = self._sized(value)
                            used += size + overhead
                        processed[cid] = value
                if used >= limit:
                    return i
            return None
        finally:
            self.used = used
            if self.commit is None and root in raw:
                self.commit, self.data_cid = decode_commit(raw[root], root, strict=self.strict)

    def _sized(self, value: Any) -> tuple[Any, int]:
        """``(value to keep, bytes counted)`` for a value that is not an exact int/float/str/bytes/None.

        Counted as its codec-encoded size; while spilling, the encoding itself is kept, so it
        is not encoded a second time on its way to disk.
        """
        if isinstance(value, (bytes, bytearray, str)):
            return value, len(value)
        if isinstance(value, (int, float)):
            return value, 8
        try:
            data = self.encode(value)
        except Exception:
            return value, sys.getsizeof(value)  # the store's own encode will report it
        if self.spilling:
            return _Encoded(data), len(data)
        return value, len(data)

    def lookup(self) -> _MemoryLookup:
        return _MemoryLookup(self.raw, self.processed)


class _MemoryLookup:
    """Block look-ups for the walker over the in-memory dicts (plain ``dict.get`` where possible)."""

    __slots__ = ("node", "processed", "raw", "_raw", "_processed")

    def __init__(self, raw: dict[bytes, bytes], processed: dict[bytes, Any]) -> None:
        self._raw = raw
        self._processed = processed
        self.node = self._node if processed else raw.get
        self.processed = processed.get
        self.raw = raw.get

    def _node(self, cid: bytes) -> Any:
        block = self._raw.get(cid)
        if block is None and cid in self._processed:
            return NOT_A_NODE
        return block


class DriverBuilder(Generic[T]):
    """Configures and starts loading a repo CAR.

    Every ``with_*`` method returns the builder, so calls chain. Defaults: 16 MiB memory limit,
    raw bytes as values, 2 MiB maximum block size, no CID verification, maximum MST depth 32.
    """

    def __init__(self) -> None:
        self._mem_limit = 16 * _MIB
        self._process: Callable[[bytes], Any] | None = None
        self._codec: Codec = CBOR_CODEC
        self._max_block_size = DEFAULT_MAX_BLOCK_SIZE
        self._verify_cids = False
        self._max_depth = DEFAULT_MAX_DEPTH
        self._read_size = DEFAULT_READ_SIZE

    def with_mem_limit_mb(self, mb: float) -> DriverBuilder[T]:
        """Set the memory limit for kept blocks, in MiB (default 16); above it, loading spills."""
        if mb <= 0:
            raise ValueError(f"memory limit must be positive, got {mb} MiB")
        self._mem_limit = int(mb * _MIB)
        return self

    def with_block_processor(self, process: Callable[[bytes], Any]) -> DriverBuilder[Any]:
        """Set the function that turns a record block's bytes into the emitted value (default: none).

        It is called once per block, when loaded or when emitted (see the module docstring), and
        on disk walks inside the store's worker thread. It should be deterministic.
        """
        self._process = process
        return self

    def with_codec(self, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> DriverBuilder[T]:
        """Set how processed values are stored on disk (default CBOR; pickle is never used)."""
        self._codec = (encode, decode)
        return self

    def with_max_block_size(self, nbytes: int) -> DriverBuilder[T]:
        """Set the largest accepted block, in bytes (default 2 MiB); larger sections are an error."""
        if nbytes < 1:
            raise ValueError(f"max block size must be positive, got {nbytes}")
        self._max_block_size = nbytes
        return self

    def with_verify_cids(self, verify: bool = True) -> DriverBuilder[T]:
        """Check every block against its CID's sha2-256 digest while loading (default off).

        Turn it on for CARs from sources you do not trust; a mismatch raises
        :class:`~repo_stream.errors.CidMismatchError`. The commit block must then also be
        canonical DAG-CBOR (:class:`~repo_stream.errors.CommitError` otherwise).
        """
        self._verify_cids = verify
        return self

    def with_max_depth(self, depth: int) -> DriverBuilder[T]:
        """Set the deepest MST node nesting accepted (default 32)."""
        if depth < 1:
            raise ValueError(f"max depth must be at least 1, got {depth}")
        self._max_depth = depth
        return self

    def with_read_size(self, nbytes: int) -> DriverBuilder[T]:
        """Set how many bytes are requested from the source per read (default 1 MiB)."""
        if nbytes < 1:
            raise ValueError(f"read size must be positive, got {nbytes}")
        self._read_size = nbytes
        return self

    async def load_car(self, source: Any) -> MemoryDriver[T] | NeedDisk[T]:
        """Read a repo CAR from ``source`` until it ends or the memory limit is reached.

        Args:
            source: an anyio ``AsyncFile`` or anything with ``async read(n) -> bytes``, an anyio
                ``ByteReceiveStream``, an async iterable of ``bytes`` chunks, or ``bytes``.

        Returns:
            :class:`MemoryDriver` if the whole CAR fit, else :class:`NeedDisk`.

        Raises:
            CarError subclasses (framing), CommitError, MissingBlockError (no commit block),
            CidMismatchError (with verification), SourceError.
        """
        reader = CarReader(
            source,
            max_block_size=self._max_block_size,
            read_size=self._read_size,
            verify_cids=self._verify_cids,
        )
        try:
            roots = await reader.read_header()
            loader = _Loader(roots[0], self._process, self._codec[0], strict=self._verify_cids)
            while (sections := await reader.next_sections()) is not None:
                stop = loader.ingest(sections, 0, self._mem_limit)
                if stop is not None:
                    return NeedDisk(self, reader, loader, sections[stop:])
            return MemoryDriver(self, reader, loader)
        except BaseException:
            await _close_quietly(reader)
            raise


class _Driver(Generic[T]):
    """What the drivers share: the commit, counters, and iteration over chunks."""

    _reader: CarReader
    _walker: Walker[T]

    @property
    def blocks_read(self) -> int:
        """CAR sections read from the source."""
        return self._reader.blocks_read

    @property
    def bytes_read(self) -> int:
        """Bytes read from the source."""
        return self._reader.bytes_read

    async def next_chunk(self, n: int = 256) -> list[tuple[str, T]] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def __aiter__(self) -> AsyncIterator[tuple[str, T]]:
        """Iterate over ``(key, value)`` records, fetching 256 at a time."""
        while (chunk := await self.next_chunk(256)) is not None:
            for record in chunk:
                yield record


async def _close_quietly(reader: CarReader) -> None:
    """Close the source's iterator after a failure or cancellation (shielded; errors ignored)."""
    with anyio.CancelScope(shield=True):
        try:
            await reader.aclose()
        except Exception:
            pass


def _commit_or_raise(loader: _Loader) -> tuple[Commit, bytes]:
    if loader.commit is None or loader.data_cid is None:
        raise MissingBlockError(f"commit block {cid_str(loader.root)} (the CAR's first root) is not in the CAR")
    return loader.commit, loader.data_cid


class MemoryDriver(_Driver[T]):
    """Walks a repo whose blocks all fit in memory. Made by :meth:`DriverBuilder.load_car`.

    Attributes:
        commit: the repo's :class:`~repo_stream.commit.Commit`.
        commit_cid: the commit's CID (the CAR's first root).
    """

    def __init__(self, builder: DriverBuilder[T], reader: CarReader, loader: _Loader) -> None:
        self.commit, data = _commit_or_raise(loader)
        self.commit_cid: CID = to_cid(loader.root)
        self._reader = reader
        self._lookup = loader.lookup()
        self._walker = Walker(data, builder._process, max_depth=builder._max_depth, strict_tags=builder._verify_cids)

    async def next_chunk(self, n: int = 256) -> list[tuple[str, T]] | None:
        """Return the next up to ``n`` ``(key, value)`` records in key order, or ``None`` at the end.

        Raises:
            MstError subclasses, MissingBlockError, ProcessorError.
        """
        return self._walker.next_chunk(n, self._lookup)


class NeedDisk(Generic[T]):
    """Loading stopped at the memory limit; finish it into a :class:`~repo_stream.disk.DiskStore`.

    Attributes:
        commit: the commit, if its block was read before the limit was reached, else ``None``.
    """

    def __init__(self, builder: DriverBuilder[T], reader: CarReader, loader: _Loader, pending: list[tuple[bytes, bytes]]) -> None:
        self._builder = builder
        self._reader = reader
        self._loader = loader
        self._pending = pending
        self.commit: Commit | None = loader.commit

    @property
    def commit_cid(self) -> CID:
        """The commit's CID (the CAR's first root)."""
        return to_cid(self._loader.root)

    async def finish_loading(self, store: DiskStore) -> tuple[Commit, DiskDriver[T]]:
        """Move the kept blocks and the rest of the source into ``store``; return the commit and a driver.

        Writes go in batched transactions of at most ``min(limit / 2, 8 MiB)`` of blocks, so memory
        stays within the limit throughout.

        Raises:
            DiskError (including going past ``max_stored_mb``), the errors of
            :meth:`DriverBuilder.load_car`, and :class:`MissingBlockError` if there is no commit.
        """
        loader = self._loader
        if store.closed:
            raise DiskError(f"SQLite spill store {store.path} is closed")
        if store.stored_bytes:
            await store.reset()  # left over from an earlier repo that failed part-way
        batch = max(1, min(self._builder._mem_limit // 2, 8 * _MIB))
        encode = self._builder._codec[0]
        loader.spilling = True
        await self._drain(store, loader, batch, encode)
        pending = self._pending
        self._pending = []
        reader = self._reader
        try:
            while True:
                start = 0
                while (stop := loader.ingest(pending, start, batch)) is not None:
                    await self._drain(store, loader, batch, encode)
                    start = stop
                sections = await reader.next_sections()
                if sections is None:
                    break
                pending = sections
            await self._drain(store, loader, batch, encode)
            commit, data = _commit_or_raise(loader)
        except BaseException:
            loader.raw.clear()
            loader.processed.clear()
            await _close_quietly(reader)
            raise
        return commit, DiskDriver(self._builder, reader, store, data, to_cid(loader.root))

    @staticmethod
    async def _drain(store: DiskStore, loader: _Loader, batch: int, encode: Callable[[Any], bytes]) -> None:
        """Move everything the loader holds into the store, ``batch`` bytes per transaction."""
        raw = loader.raw
        processed = loader.processed
        while raw or processed:
            rows: list[tuple[bytes, int, Any]] = []
            size = 0
            while raw and size < batch:
                cid, block = raw.popitem()
                rows.append((cid, 0, block))
                size += len(cid) + len(block)
            while processed and size < batch:
                cid, value = processed.popitem()
                t = type(value)
                if (t is int and -_INT64 <= value < _INT64) or t is float or value is None:
                    rows.append((cid, 2, value))
                    size += len(cid) + 8
                elif t is bytes or t is str:
                    rows.append((cid, 2, value))
                    size += len(cid) + len(value)
                elif t is _Encoded:
                    rows.append((cid, 1, value.data))
                    size += len(cid) + len(value.data)
                else:
                    data = encode(value)
                    rows.append((cid, 1, data))
                    size += len(cid) + len(data)
            await store._run(store.put_batch_sync, rows, size)
        loader.used = 0


class DiskDriver(_Driver[T]):
    """Walks a repo from a :class:`~repo_stream.disk.DiskStore`. Made by :meth:`NeedDisk.finish_loading`.

    Each :meth:`next_chunk` runs its whole part of the walk in the store's worker thread: one
    thread hop per chunk, not per block.
    """

    def __init__(self, builder: DriverBuilder[T], reader: CarReader, store: DiskStore, data: bytes, commit_cid: CID) -> None:
        self._reader = reader
        self._store = store
        self.commit_cid = commit_cid
        self._lookup = store.lookup(builder._codec[1])
        self._walker = Walker(data, builder._process, max_depth=builder._max_depth, strict_tags=builder._verify_cids)

    async def next_chunk(self, n: int = 256) -> list[tuple[str, T]] | None:
        """Return the next up to ``n`` ``(key, value)`` records in key order, or ``None`` at the end.

        Raises:
            MstError subclasses, MissingBlockError, ProcessorError, DiskError.
        """
        if self._walker.done:
            return None
        return await self._store._run(self._walker.next_chunk, n, self._lookup)

    async def reset_store(self) -> DiskStore:
        """Empty the store and hand it back for the next repo; this driver is finished after it."""
        self._walker.abandon()
        await self._store.reset()
        return self._store
