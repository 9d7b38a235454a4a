"""Drivers: load a repo CAR into memory (or onto disk when it does not fit) and walk it in order.

The flow (after the Rust crate repo-stream)::

    driver = await DriverBuilder().with_mem_limit_mb(10).load_car(source)   # MemoryDriver | NeedDisk
    if isinstance(driver, NeedDisk):
        store = await DiskBuilder().open("spill.db")
        commit, driver = await driver.finish_loading(store)                  # -> DiskDriver
    while (chunk := await driver.next_chunk(256)) is not None:
        for key, value in chunk: ...

The drivers are the async shell around the hot path (the sans-IO CAR parser, the block table and
the walker; see :mod:`repo_stream.core.implementation` for the C core and the pure-Python reference).
How blocks are kept, processed and counted is described in :mod:`repo_stream.core.blocks`. When the
counted bytes reach the limit, :meth:`DriverBuilder.load_car` stops reading and returns
:class:`NeedDisk` holding what it has and the unread rest of the source.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar, overload

import anyio
import anyio.lowlevel

from ..core import implementation
from ..core.blocks import BLOCK_OVERHEAD, DiskRecords
from ..core.car import DEFAULT_MAX_BLOCK_SIZE, DEFAULT_READ_SIZE, CarReader
from ..core.cid import cid_str, is_plain_cid, to_cid
from ..core.commit import Commit, decode_commit
from ..core.mst import is_valid_collection
from ..core.walk import DEFAULT_MAX_DEPTH
from ..errors import DiskError, MissingBlockError
from ..spill.store import CBOR_CODEC, Codec, DiskStore

if TYPE_CHECKING:  # imported on first use (see repo_stream.core.cid)
    import pyarrow
    from multiformats import CID

__all__ = ["BLOCK_OVERHEAD", "DEFAULT_MEM_LIMIT_MB", "DriverBuilder", "MemoryDriver", "NeedDisk", "DiskDriver"]

#: The item type of a walk: ``tuple[str, V]`` (key, value), or ``tuple[str, str, V]`` (key, CID,
#: value) with ``with_record_cids``.
Item = TypeVar("Item")
V = TypeVar("V")
U = TypeVar("U")

#: The default memory limit, MiB, of the library and of the command line alike.
DEFAULT_MEM_LIMIT_MB = 64

_MIB = 1024 * 1024


class DriverBuilder(Generic[Item]):
    """Configures and starts loading a repo CAR (the low-level API; :func:`repo_stream.open_repo`
    is the high-level one).

    Every ``with_*`` method returns the builder, so calls chain. Defaults: 64 MiB memory limit
    (:data:`DEFAULT_MEM_LIMIT_MB`), raw bytes as values, 2 MiB maximum block size, no CID
    verification, maximum MST depth 32, items ``(key, value)``.

    Typing: ``Item`` is the type of the items the drivers give: ``DriverBuilder()`` is a
    ``DriverBuilder[tuple[str, bytes]]``; :meth:`with_block_processor` with a
    ``Callable[[bytes], U]`` makes it ``DriverBuilder[tuple[str, U]]``, and
    :meth:`with_record_cids` ``DriverBuilder[tuple[str, str, U]]``, so the value type flows
    through :meth:`load_car`, ``next_chunk`` and ``async for``.
    """

    def __init__(self: DriverBuilder[tuple[str, bytes]]) -> None:
        self._mem_limit = int(DEFAULT_MEM_LIMIT_MB * _MIB)
        self._process: Callable[[bytes], Any] | None = None
        self._codec: Codec = CBOR_CODEC
        self._max_block_size = DEFAULT_MAX_BLOCK_SIZE
        self._verify_cids = False
        self._max_depth = DEFAULT_MAX_DEPTH
        self._read_size = DEFAULT_READ_SIZE
        self._record_cids = False
        self._collections: frozenset[str] | None = None
        # Set by the high-level API (repo_stream.read.repo): items are this tuple subclass,
        # made by the walk itself (no second pass over each chunk).
        self._record_type: type | None = None

    def with_mem_limit_mb(self, mb: float) -> DriverBuilder[Item]:
        """Set the memory limit for kept blocks and values, in MiB (default 64); above it, loading
        stops with :class:`NeedDisk`."""
        if mb <= 0:
            raise ValueError(f"memory limit must be positive, got {mb} MiB")
        self._mem_limit = int(mb * _MIB)
        return self

    @overload
    def with_block_processor(
        self: DriverBuilder[tuple[str, str, Any]], process: Callable[[bytes], U]
    ) -> DriverBuilder[tuple[str, str, U]]: ...
    @overload
    def with_block_processor(self: DriverBuilder[tuple[str, Any]], process: Callable[[bytes], U]) -> DriverBuilder[tuple[str, U]]: ...
    def with_block_processor(self, process: Callable[[bytes], Any]) -> DriverBuilder[Any]:
        """Set the function that turns a record block's bytes into the emitted value (default: none).

        It is called once per block, when loaded or when emitted (see :mod:`repo_stream.core.blocks`),
        and on disk walks inside the store's worker thread. It should be deterministic. The
        builder's item type becomes ``tuple[str, U]`` (``tuple[str, str, U]`` with record CIDs)
        for a ``Callable[[bytes], U]``.
        """
        self._process = process
        return self

    def with_codec(self, encode: Callable[[Any], bytes], decode: Callable[[bytes], Any]) -> DriverBuilder[Item]:
        """Set how processed values are stored on disk (default CBOR; pickle is never used)."""
        self._codec = (encode, decode)
        return self

    def with_max_block_size(self, nbytes: int) -> DriverBuilder[Item]:
        """Set the largest accepted block, in bytes (default 2 MiB); larger sections are an error."""
        if nbytes < 1:
            raise ValueError(f"max block size must be positive, got {nbytes}")
        self._max_block_size = nbytes
        return self

    def with_verify_cids(self, verify: bool = True) -> DriverBuilder[Item]:
        """Check every block against its CID's sha2-256 digest while loading (default off).

        Turn it on for CARs from sources you do not trust; a mismatch raises
        :class:`~repo_stream.errors.CidMismatchError`. The commit block and every MST node must
        then also be canonical DAG-CBOR (:class:`~repo_stream.errors.CommitError`,
        :class:`~repo_stream.errors.NodeDecodeError` otherwise).
        """
        self._verify_cids = verify
        return self

    def with_max_depth(self, depth: int) -> DriverBuilder[Item]:
        """Set the deepest MST node nesting accepted (default 32)."""
        if depth < 1:
            raise ValueError(f"max depth must be at least 1, got {depth}")
        self._max_depth = depth
        return self

    def with_read_size(self, nbytes: int) -> DriverBuilder[Item]:
        """Set how many bytes are requested from the source per read (default 1 MiB)."""
        if nbytes < 1:
            raise ValueError(f"read size must be positive, got {nbytes}")
        self._read_size = nbytes
        return self

    @overload
    def with_record_cids(
        self: DriverBuilder[tuple[str, V]] | DriverBuilder[tuple[str, str, V]], record_cids: Literal[True] = ...
    ) -> DriverBuilder[tuple[str, str, V]]: ...
    @overload
    def with_record_cids(
        self: DriverBuilder[tuple[str, V]] | DriverBuilder[tuple[str, str, V]], record_cids: Literal[False]
    ) -> DriverBuilder[tuple[str, V]]: ...
    @overload
    def with_record_cids(self, record_cids: bool) -> DriverBuilder[Any]: ...
    def with_record_cids(self, record_cids: bool = True) -> DriverBuilder[Any]:
        """Emit ``(key, cid, value)`` items, ``cid`` the record's CID as a base32 string
        (``"bafyrei..."``), instead of ``(key, value)`` (default off)."""
        self._record_cids = record_cids
        return self

    def with_collections(self, collections: Iterable[str] | None) -> DriverBuilder[Item]:
        """Emit only the records of these collections (NSIDs such as ``"app.bsky.feed.post"``), and
        walk only the subtrees whose key range can hold them (``None``, the default: every record).

        Keys of a collection ``C`` are those from ``C/`` up to ``C0``; a subtree between two keys
        that bracket none of those ranges is never read, so a filtered walk visits fewer MST nodes
        (``driver.nodes_visited``). Spec: atproto repository, "Repo Data Structure" (keys are
        ``<collection>/<record-key>``).

        Raises:
            ValueError: a name is not a valid NSID.
        """
        if collections is None:
            self._collections = None
            return self
        names = frozenset(collections)
        bad = sorted(name for name in names if not is_valid_collection(name))
        if bad:
            raise ValueError(f"not a collection NSID: {', '.join(map(repr, bad))}")
        self._collections = names
        return self

    async def load_car(self, source: Any) -> MemoryDriver[Item] | NeedDisk[Item]:
        """Read a repo CAR from ``source`` until it ends or the memory limit is reached.

        Args:
            source: an anyio ``AsyncFile`` or anything with ``async read(n) -> bytes``, an anyio
                ``ByteReceiveStream``, an async iterable of ``bytes`` chunks, or ``bytes``.

        Returns:
            :class:`MemoryDriver` if the whole CAR fit, else :class:`NeedDisk`.

        Raises:
            CarError: the CAR framing is malformed (a subclass says how).
            CommitError: the commit block is malformed.
            MissingBlockError: there is no commit block.
            CidMismatchError: a block does not match its CID (with verification).
            SourceError: the byte source failed.
        """
        impl = implementation.backend()
        reader = CarReader(source, impl.CarParser(self._max_block_size, self._verify_cids), self._read_size)
        try:
            roots = await reader.read_header()
            loading = _Loading(self, impl, reader, roots[0])
            if await loading.load(self._mem_limit):
                return NeedDisk(loading)
            return MemoryDriver(loading)
        except BaseException:
            await _close_quietly(reader)
            raise


class _Loading:
    """What a load has so far: the parser's pump, the block table and, once read, the commit."""

    __slots__ = ("builder", "impl", "reader", "root", "table", "commit", "data")

    def __init__(self, builder: DriverBuilder[Any], impl: implementation.Backend, reader: CarReader, root: bytes) -> None:
        self.builder = builder
        self.impl = impl
        self.reader = reader
        self.root = root
        self.table = impl.BlockTable(root, builder._process, builder._codec[0])
        self.commit: Commit | None = None
        self.data: bytes | None = None

    async def load(self, limit: int) -> bool:
        """Load sections until the table counts ``limit`` bytes (True) or the input ends (False).

        The commit is decoded as soon as its block has been loaded.
        """
        reader = self.reader
        parser = reader.parser
        table = self.table
        while True:
            stopped = parser.load_into(table, limit)
            if self.commit is None:
                block = table.raw_block(self.root)
                if block is not None:
                    self.commit, self.data = decode_commit(block, self.root, strict=self.builder._verify_cids)
            if stopped:
                if table.used >= limit:
                    return True
                continue  # stopped just after the commit block, decoded above
            if not await reader.fill():
                parser.finish()
                return False

    def commit_or_raise(self) -> tuple[Commit, bytes]:
        if self.commit is None or self.data is None:
            raise MissingBlockError(f"commit block {cid_str(self.root)} (the CAR's first root) is not in the CAR")
        return self.commit, self.data

    def walker(self, nodes: Any, values: Any) -> Any:
        builder = self.builder
        _, data = self.commit_or_raise()
        return self.impl.Walker(
            data,
            nodes,
            values,
            max_depth=builder._max_depth,
            strict=builder._verify_cids,
            record_cids=builder._record_cids,
            collections=builder._collections,
            record_type=builder._record_type,
        )


class _Driver(Generic[Item]):
    """What the drivers share: the commit, counters, and iteration over chunks.

    Attributes:
        commit: the repo's :class:`~repo_stream.core.commit.Commit`.
        commit_cid_bytes: the commit's CID (the CAR's first root) as raw binary CID bytes.
    """

    commit: Commit
    commit_cid_bytes: bytes
    _commit_cid: CID | None = None
    _reader: CarReader
    _walker: Any
    _builder: DriverBuilder[Any]

    def _set_commit(self, loading: _Loading) -> None:
        self._builder = loading.builder
        self.commit, _ = loading.commit_or_raise()
        self.commit_cid_bytes = loading.root
        if not is_plain_cid(loading.root):
            self._commit_cid = to_cid(loading.root)  # checked now, as a CID made on first use would be

    @property
    def commit_cid(self) -> CID:
        """The commit's CID (the CAR's first root), a multiformats ``CID`` (made on first use)."""
        if self._commit_cid is None:
            self._commit_cid = to_cid(self.commit_cid_bytes)
        return self._commit_cid

    @property
    def blocks_read(self) -> int:
        """CAR sections read from the source."""
        return self._reader.blocks_read

    @property
    def bytes_read(self) -> int:
        """Bytes read from the source."""
        return self._reader.bytes_read

    @property
    def nodes_visited(self) -> int:
        """MST nodes expanded by the walk so far (fewer with ``with_collections``)."""
        return int(self._walker.nodes_visited)

    @property
    def batch_value_bytes(self) -> int:
        """Bytes of the record values the walker's batches took so far (:meth:`next_batch`,
        :meth:`next_json_lines`): each record block's length before transcoding (a ``str``
        value's UTF-8 length). Not counted: :meth:`next_chunk`'s items, and batches made of
        a block processor's items."""
        return int(self._walker.value_bytes)

    async def next_chunk(self, n: int = 256) -> list[Item] | None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def next_batch(self, n: int = 65536, *, values: Literal["raw", "json_text"] | None = None) -> pyarrow.RecordBatch | None:
        """The next up to ``n`` records in key order as one ``pyarrow.RecordBatch``, or ``None``
        at the end (:mod:`repo_stream.read.arrow`: columns ``key``, ``collection``
        (dictionary), ``rkey``, ``cid``, ``value``; ``value`` binary for raw blocks, utf8 for
        JSON text).

        The walker writes each record straight into the batch's Arrow buffers (C core; no Python
        object per record). A batch ends early, after the record that brings its bytes (keys,
        rkeys, CID texts, values, and 16 per record) to the memory limit, at most 1 GiB: so a
        batch's buffers stay within the limit (plus one record) and within Arrow's 2 GiB
        offsets. Errors come in record order. Needs pyarrow (the ``arrow`` extra) and record
        CIDs (``with_record_cids(True)``).

        Args:
            n: the most records in the batch (>= 1).
            values: ``"raw"`` (the record blocks, binary) or ``"json_text"`` (their atproto JSON
                text, utf8: :func:`repo_stream.records.json_text.transcode_json`, here as the
                batch is built when the driver has no block processor). ``None`` (the default):
                ``"json_text"`` if the driver's processor is the JSON text transcoder
                (:func:`~repo_stream.records.json_text.json_text_processor`), else ``"raw"``.
                With another block processor, ``values`` must be ``None``: the walk's items
                are made into a batch (``str`` values utf8, ``bytes`` binary).

        Raises:
            TypeError: no record CIDs; ``values="raw"`` with the JSON text processor, or a
                ``values`` with another processor; a value that is not ``bytes`` (``str`` for
                JSON text).
            ValueError: ``values`` is not one of those.
            ProcessorError: a record is not valid DAG-CBOR (JSON text), or the processor failed.
            ImportError: pyarrow is not installed. And the errors of :meth:`next_chunk`.
        """
        from .arrow import from_walker, record_batch

        if values not in (None, "raw", "json_text"):
            raise ValueError(f"values must be 'raw', 'json_text' or None, got {values!r}")
        builder = self._builder
        if not builder._record_cids:
            raise TypeError("next_batch needs record CIDs: build the driver with with_record_cids(True)")
        process = builder._process
        if process is None or _is_json_text(process):
            if values == "raw" and process is not None:
                raise TypeError("next_batch(values='raw') needs a driver without a block processor (its records are kept as JSON text)")
            json_values = values == "json_text" if values is not None else process is not None
            result = await self._walk_batch(n, 1 if json_values else 0, min(builder._mem_limit, _BATCH_BYTES))
            return None if result is None else from_walker(result, json_values)
        if values is not None:
            raise TypeError("next_batch(values=...) needs a driver without a block processor, or with the JSON text processor")
        chunk = await self.next_chunk(n)
        if chunk is None:
            return None
        items: list[Any] = chunk
        return record_batch(items, json_values=type(items[0][-1]) is str)

    async def next_json_lines(self, n: int = 4096) -> bytes | None:
        """The next up to ``n`` records in key order as ``repo-stream dump``'s JSON lines, one
        ``bytes`` (UTF-8), or ``None`` at the end: ``{"key":"<key>","cid":"<cid>","value":<the
        record's atproto JSON text>}`` and a newline per record
        (:func:`repo_stream.records.json_text.transcode_json`'s text; keys and CID texts need no
        escaping: the walk checks every key's characters).

        The C walker writes the lines straight into one buffer, transcoding each record block
        as it goes (no Python object per record), so a driver without a block processor keeps
        only the raw blocks in memory (about the CAR's size) and a chunk only its lines. Fewer
        than ``n`` records once the lines hold the memory limit's bytes (at most 1 GiB).

        Raises:
            TypeError: the driver has a block processor other than the JSON text transcoder.
            ProcessorError: a record is not valid DAG-CBOR (its RecordDecodeError the cause).
            And the errors of :meth:`next_chunk`.
        """
        builder = self._builder
        if builder._process is not None and not _is_json_text(builder._process):
            raise TypeError("next_json_lines needs a driver without a block processor, or with the JSON text processor")
        lines: bytes | None = await self._walk_batch(n, 2, min(builder._mem_limit, _BATCH_BYTES))
        return lines

    async def _walk_batch(self, n: int, value_kind: int, max_bytes: int) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    async def __aiter__(self) -> AsyncIterator[Item]:
        """Iterate over the items (``(key, value)``, or ``(key, cid, value)``), 256 at a time."""
        while (chunk := await self.next_chunk(256)) is not None:
            for record in chunk:
                yield record


#: The largest byte budget of one Arrow batch (``next_batch``): well within Arrow's 2 GiB offsets.
_BATCH_BYTES = 1 << 30


def _is_json_text(process: Callable[[bytes], Any]) -> bool:
    """Whether a block processor is the JSON text transcoder (of either implementation)."""
    from ..records.json_text import _python_transcode_json

    return process is _python_transcode_json or any(process is b.transcode_json for b in (implementation.PYTHON, implementation.C) if b)


async def _close_quietly(reader: CarReader) -> None:
    """Close the source's iterator after a failure or cancellation (shielded; errors ignored)."""
    with anyio.CancelScope(shield=True):
        try:
            await reader.aclose()
        except Exception:
            pass


class MemoryDriver(_Driver[Item]):
    """Walks a repo whose blocks all fit in memory. Made by :meth:`DriverBuilder.load_car`."""

    def __init__(self, loading: _Loading) -> None:
        self._set_commit(loading)
        self._reader = loading.reader
        self._table = loading.table
        self._walker = loading.walker(loading.table, loading.table)

    async def next_chunk(self, n: int = 256) -> list[Item] | None:
        """Return the next up to ``n`` items in key order, or ``None`` at the end.

        Items are ``(key, value)``, or ``(key, cid, value)`` with ``with_record_cids``. Each call
        passes an anyio checkpoint, so a long walk can be cancelled and lets other tasks run.

        Raises:
            MstError: an MST rule is broken (a subclass says which).
            MissingBlockError: a block the walk needs is not in the CAR.
            ProcessorError: the block processor raised on an emitted record.
        """
        await anyio.lowlevel.checkpoint()
        return self._walker.next_chunk(n)  # type: ignore[no-any-return]

    async def _walk_batch(self, n: int, value_kind: int, max_bytes: int) -> Any:
        await anyio.lowlevel.checkpoint()
        return self._walker.next_batch(n, value_kind, max_bytes)


class NeedDisk(Generic[Item]):
    """Loading stopped at the memory limit; finish it into a :class:`~repo_stream.spill.store.DiskStore`.

    Attributes:
        commit: the commit, if its block was read before the limit was reached, else ``None``.
    """

    def __init__(self, loading: _Loading) -> None:
        self._loading = loading
        self.commit: Commit | None = loading.commit

    @property
    def commit_cid(self) -> CID:
        """The commit's CID (the CAR's first root)."""
        return to_cid(self._loading.root)

    async def finish_loading(self, store: DiskStore) -> tuple[Commit, DiskDriver[Item]]:
        """Move the kept blocks and the rest of the source into ``store``; return the commit and a driver.

        Writes go in batched transactions of at most ``min(limit / 2, 8 MiB)`` of blocks, so memory
        stays within the limit throughout.

        Raises:
            DiskError: the store failed, or would grow past ``max_stored_mb``.
            MissingBlockError: there is no commit.
            RepoStreamError: the errors of :meth:`DriverBuilder.load_car`.
        """
        loading = self._loading
        if store.closed:
            raise DiskError(f"SQLite spill store {store.name} is closed")
        if store.stored_bytes:
            await store.reset()  # left over from an earlier repo that failed part-way
        batch = max(1, min(loading.builder._mem_limit // 2, 8 * _MIB))
        table = loading.table
        try:
            await _drain(store, table, batch)
            while await loading.load(batch):
                await _drain(store, table, batch)
            await _drain(store, table, batch)
            commit, _ = loading.commit_or_raise()
        except BaseException:
            table.clear()
            await _close_quietly(loading.reader)
            raise
        return commit, DiskDriver(loading, store)


async def _drain(store: DiskStore, table: Any, batch: int) -> None:
    """Move everything the table holds into the store, about ``batch`` bytes per run.

    Raises:
        DiskError: the codec failed, a processed str is not valid UTF-8, or the store failed.
    """
    while True:
        try:
            run, large, size = table.take_run(batch, store.next_large)
        except ValueError as exc:  # a str the processor made that UTF-8 cannot encode
            raise DiskError(f"SQLite spill store {store.name}: cannot store a processed value: {exc}") from exc
        if not run:
            return
        await store._run(store.put_run_sync, run, large, size)


#: Records per chunk for a caller that only counts a walk from disk (``stats``, a backfill with no
#: sink): each :meth:`DiskDriver.next_chunk` is a hop to the store's thread and back (~1.4 ms on a
#: 2-core machine, the GIL handed over twice), paid once per chunk.
DISK_COUNT_CHUNK = 8192


class DiskDriver(_Driver[Item]):
    """Walks a repo from a :class:`~repo_stream.spill.store.DiskStore`. Made by :meth:`NeedDisk.finish_loading`.

    Each :meth:`next_chunk` runs its whole part of the walk in the store's worker thread: one
    thread hop per chunk, not per block.
    """

    def __init__(self, loading: _Loading, store: DiskStore) -> None:
        self._set_commit(loading)
        self._reader = loading.reader
        self._store = store
        decode = loading.builder._codec[1]
        records = DiskRecords(store.lookup(decode), loading.builder._process, decode)
        self._walker = loading.walker(records, records)

    async def next_chunk(self, n: int = 256) -> list[Item] | None:
        """Return the next up to ``n`` items in key order, or ``None`` at the end.

        Raises:
            MstError: an MST rule is broken (a subclass says which).
            MissingBlockError: a block the walk needs is not in the CAR.
            ProcessorError: the block processor raised on an emitted record.
            DiskError: the spill store failed.
        """
        if self._walker.done:
            return None
        return await self._store._run(self._walker.next_chunk, n)

    async def _walk_batch(self, n: int, value_kind: int, max_bytes: int) -> Any:
        if self._walker.done:
            return None
        return await self._store._run(self._walker.next_batch, n, value_kind, max_bytes)

    async def reset_store(self) -> DiskStore:
        """Empty the store and hand it back for the next repo; this driver is finished after it."""
        self._walker.abandon()
        await self._store.reset()
        return self._store
