"""The SQLite spill store.

When a repo does not fit in the memory limit, its blocks go into SQLite. The format is internal
(a store is scratch space, rebuilt from the CAR, read by nothing else)::

    runs(id INTEGER PRIMARY KEY, data BLOB NOT NULL)
    merged(id INTEGER PRIMARY KEY, data BLOB NOT NULL)
    large(id INTEGER PRIMARY KEY, data BLOB NOT NULL)

**Sorted runs, not a row per block.** Each batch of spill rows (``(cid, kind, data)``, see
:mod:`repo_stream.core.blocks`) is sorted by CID and packed into one *run*, stored in ``runs`` rows of
1 MiB (the format: :mod:`repo_stream.core.runs`); payloads over 8 KiB go to ``large``, one row each,
and the run holds their id. The first look-up merges the runs (a k-way merge in bounded memory,
read and written through SQLite's incremental blob I/O), keeping the first block of a CID stored
twice, as in memory, into two merged runs in ``merged``: the raw blocks shaped like MST nodes, and
the rest (the records, mostly): each smaller, so that a look-up more often finds its page in
SQLite's cache. Each merged run is kept in segments of 4 MiB (rows; larger in a store over 1 GiB,
so that there are at most 256), with an index point about every KiB in memory; a look-up reads
one short range of a merged run and scans it. (Measured on the
500k-record repo: SQLite costs about 3.3 us a row to insert, about 3 us a row to sort, and 3-7 us
a row to look up; a block costs it one blob read instead.) Runs stored after a look-up are merged
in on the next one. A store with more runs than a merge may hold open at once (its cache size
over 128 KiB) merges them in levels, alternating between the two tables.

**Temporary stores leave nothing behind.** :meth:`DiskBuilder.open` without a path opens SQLite's
own temporary database (``sqlite3.connect("")``). SQLite creates its file in the temporary
directory (``SQLITE_TMPDIR``, else ``TMPDIR``, else ``/var/tmp``, ``/usr/tmp``, ``/tmp``) only
once its page cache overflows, and unlinks it right after creating it: the file has no name while
it is used, and the kernel frees it when the process ends, even by ``kill -9``. The journal is
off: no side files. (On a SQLite built to keep temporary databases in memory, ``SQLITE_TEMP_STORE``
2 or 3, which would not bound memory, the store is instead a file made with
:func:`tempfile.mkstemp` and unlinked right after SQLite opens it: :data:`TEMPORARY_IN_MEMORY`.)
A temporary store opened with a ``directory`` (:meth:`DiskBuilder.open`) makes its file that way,
in that folder: the backfill's disk workers put their stores in its ``spill_dir`` so.

**A store at a path** keeps its tables in that file, with ``locking_mode=EXCLUSIVE``. The file is
marked with an application id (``PRAGMA application_id``), so that :meth:`DiskBuilder.open` can
start afresh, in O(1), from a file an earlier store left (even one damaged by a crash mid-write),
and refuses to overwrite any other file. :meth:`DiskStore.reset` starts afresh the same way.

Pragmas: ``journal_mode=OFF`` and ``synchronous=OFF`` (nothing is ever rolled back: a batch that
fails marks the store as needing :meth:`DiskStore.reset`, which the drivers do before reuse);
``cache_size`` from :meth:`DiskBuilder.with_cache_size_mb` bounds SQLite's memory (until the
first merge it is at most 1 MiB: storing runs writes each page once, and the walk, not loading,
needs the cache). The merge's
buffers stay under half of that size and the index under a quarter (an index point per KiB, or
sparser in a store too large for that).

All SQLite work runs in a worker thread through :func:`anyio.to_thread.run_sync`, one store at a
time (a ``CapacityLimiter(1)``), with whole batches per hop: a batch of inserts, or a whole chunk
of the walk. This works under asyncio and trio alike. (aiosqlite was the first choice, but it is
bound to asyncio's event loop and makes one thread hop per statement.)
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self, TypeVar

import anyio
import cbor2

from ..core import implementation
from ..core.blocks import NOT_A_NODE
from ..core.runs import LARGE, large_value
from ..errors import DiskError

__all__ = ["CBOR_CODEC", "Codec", "DiskBuilder", "DiskStore"]

T = TypeVar("T")

#: A value codec: ``(encode, decode)``; ``encode(value) -> bytes`` and ``decode(bytes) -> value``.
Codec = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]

#: The default codec for processed values: CBOR (bytes, str, int, float, bool, None, list, dict).
CBOR_CODEC: Codec = (cbor2.dumps, cbor2.loads)

#: A run as the store keeps track of it: its rows, ``(table, id, bytes used)``, in order.
Segments = list[tuple[str, int, int]]

_MIB = 1024 * 1024
_from_bytes = int.from_bytes

#: ``PRAGMA application_id`` of a store file ("RSsp"); SQLite keeps it at byte 68 of the header.
APPLICATION_ID = 0x52537370
_SQLITE_MAGIC = b"SQLite format 3\x00"

#: A merged run is kept in rows ("segments") of this many bytes, or more in a store so large that
#: it would take more than _SEGMENTS_MOST of them (a blob handle stays open on each: about 9 KiB).
#: Smaller ones are merged faster: a row is made with zeroblob and then written, and while its
#: pages fit in SQLite's cache they are written once (measured: 4 MiB ones, 0.5 s for the 500k
#: repo's merge; 16 MiB ones, 0.6-0.9 s).
_SEGMENT = 4 * _MIB
_SEGMENTS_MOST = 256
#: Bytes read from each run per feed of a merge, and written per blob write.
_READ_PIECE = 32 * 1024
_WRITE_PIECE = 256 * 1024
#: Bytes of a stored run per row, and SQLite's cache while runs are stored (KiB).
_RUN_ROW = 1 * _MIB
_LOADING_CACHE_KIB = 1024
#: Index points: at least this many bytes apart, and about this many bytes of memory each.
_INDEX_EVERY = 1024
_POINT_BYTES = 64

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS runs (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS merged (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS large (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
)


def _temporary_in_memory() -> bool:
    """Whether this SQLite keeps temporary databases in memory (built with ``SQLITE_TEMP_STORE`` 2 or 3)."""
    with sqlite3.connect(":memory:") as conn:
        options = {row[0] for row in conn.execute("PRAGMA compile_options")}
    conn.close()
    return "TEMP_STORE=2" in options or "TEMP_STORE=3" in options


#: True on the rare SQLite builds whose temporary databases live in memory (unbounded): there,
#: temporary stores use a named file instead, unlinked as soon as SQLite has opened it.
TEMPORARY_IN_MEMORY = _temporary_in_memory()


def _sqlite_temp_dir() -> str:
    """The folder SQLite makes its temporary files in (``SQLITE_TMPDIR``, ``TMPDIR``,
    ``/var/tmp``, ``/usr/tmp``, ``/tmp``: the first that is a writable folder), for messages: a
    full disk names it."""
    for folder in (os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"), "/var/tmp", "/usr/tmp", "/tmp"):
        if folder and os.path.isdir(folder) and os.access(folder, os.W_OK | os.X_OK):
            return folder
    return "."


def _unlinked_file(directory: str | None) -> str:
    """A new empty file in ``directory`` (None: the temporary directory), for SQLite to open and
    the caller to unlink."""
    fd, name = tempfile.mkstemp(prefix="repo-stream-", suffix=".db", dir=directory)
    os.close(fd)
    return name


class DiskBuilder:
    """Configures and opens a :class:`DiskStore`.

    Example::

        store = await DiskBuilder().with_cache_size_mb(32).with_max_stored_mb(10_240).open("spill.db")
    """

    def __init__(self) -> None:
        self._cache_size_mb = 32
        self._max_stored_mb = 10_240

    def with_cache_size_mb(self, mb: int) -> DiskBuilder:
        """Set SQLite's page cache size, in MiB (default 32); it bounds the store's memory. Returns ``self``."""
        if mb < 1:
            raise ValueError(f"cache size must be at least 1 MiB, got {mb}")
        self._cache_size_mb = mb
        return self

    def with_max_stored_mb(self, mb: int) -> DiskBuilder:
        """Set the most block data the store accepts, in MiB (default 10240). Returns ``self``.

        Going past it raises :class:`~repo_stream.errors.DiskError`. It counts the CID and data
        bytes stored; the files themselves are somewhat larger (B-tree pages, and the staged copy
        until the walk starts).
        """
        if mb < 1:
            raise ValueError(f"max stored size must be at least 1 MiB, got {mb}")
        self._max_stored_mb = mb
        return self

    async def open(self, path: str | os.PathLike[str] | None = None, *, directory: str | os.PathLike[str] | None = None) -> DiskStore:
        """Open a store: a temporary one, which leaves no file even after ``kill -9``, or one at ``path``.

        With ``path=None`` the store is SQLite's temporary database: its file, in the temporary
        directory, is unlinked as soon as SQLite creates it (see the module docstring). With a
        ``directory`` as well, its file is made in that folder instead (``tempfile.mkstemp``) and
        unlinked as soon as SQLite has opened it: the store's disk space is on that folder's file
        system, and nothing is left there even after ``kill -9``.

        With a ``path``, the file stays after :meth:`DiskStore.close`. If it exists already, it
        must be empty or a store file left by an earlier store (of this process or another, even
        one killed mid-write): that file is replaced by an empty store.

        Raises:
            ValueError: both ``path`` and ``directory`` are given.
            DiskError: ``path`` holds something else (it is left untouched), ``directory`` has no
                room for a new file, or SQLite cannot open or set up the store.
        """
        if path is not None and directory is not None:
            raise ValueError("give a store path or a directory for a temporary store, not both")
        folder = None if directory is None else os.fspath(directory)
        store = DiskStore(None if path is None else Path(path), self._cache_size_mb, self._max_stored_mb * _MIB, folder)
        try:
            await store._run(store._open_sync)
        except BaseException:
            await store.close()
            raise
        return store


class DiskStore:
    """An open SQLite spill store. Use :class:`DiskBuilder` to make one.

    It is an async context manager (``async with store:`` closes it). After a walk, a
    :class:`~repo_stream.read.drivers.DiskDriver` hands it back through ``reset_store()``, emptied and
    ready for the next repo. Only one driver may use a store at a time.
    """

    def __init__(self, path: Path | None, cache_size_mb: int, max_stored: int, directory: str | None = None) -> None:
        #: The SQLite file's path, or ``None`` for a temporary store (its file has no name).
        self.path = path
        #: The folder of a temporary store's unlinked file, or ``None`` (the temporary directory).
        self.directory = directory
        #: How messages name the store: its path, or ``"(temporary, in DIR)"`` naming its folder.
        self.name = str(path) if path is not None else f"(temporary, in {directory if directory is not None else _sqlite_temp_dir()})"
        self._cache_kib = cache_size_mb * 1024
        self._max_stored = max_stored
        self._conn: sqlite3.Connection | None = None
        self._failed = False
        self._limiter = anyio.CapacityLimiter(1)
        #: Bytes of CIDs and data stored since the last reset (a batch that failed counts too).
        self.stored_bytes = 0
        self._empty()

    def _empty(self) -> None:
        #: Runs stored since the last merge, in load order.
        self._runs: list[Segments] = []
        #: The merged runs, MST nodes and the rest, their indexes (``None`` before the first
        #: merge), and the blob handles the indexes read them through.
        self._merged: list[Segments] = []
        self._nodes: Any = None
        self._values: Any = None
        self._blobs: list[sqlite3.Blob] = []
        self._next_id = 1
        self._next_large = 1

    # --- plumbing ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the store's worker thread; SQLite and file errors become :class:`DiskError`.

        The thread is never abandoned: on cancellation it finishes its batch first.
        """
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except (sqlite3.Error, OSError) as exc:
            raise DiskError(f"SQLite spill store {self.name}: {exc}") from exc

    def _open_sync(self) -> None:
        unlink = None
        if self.path is not None:
            _clear_store_file(self.path)
            target: str | Path = self.path
        elif self.directory is not None or TEMPORARY_IN_MEMORY:
            try:
                target = unlink = _unlinked_file(self.directory)
            except OSError as exc:
                raise DiskError(f"SQLite spill store {self.name}: cannot make its file: {exc}") from exc
        else:
            target = ""  # SQLite's temporary database
        try:
            conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        finally:
            if unlink is not None:
                os.unlink(unlink)  # SQLite has the file open (or failed): from now on it has no name
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # a temporary database is exclusive already
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA temp_store=FILE")
            # Loading writes each page once: a small cache until the merge, which sets the full one.
            conn.execute(f"PRAGMA cache_size=-{min(self._cache_kib, _LOADING_CACHE_KIB)}")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            for statement in _SCHEMA:
                conn.execute(statement)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._failed = False
        self._empty()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DiskError(f"SQLite spill store {self.name} is closed")
        if self._failed:
            raise DiskError(f"SQLite spill store {self.name}: an earlier write failed; reset() the store before reusing it")
        return self._conn

    # --- used by the drivers (in the worker thread) -------------------------------------------

    def put_batch_sync(self, rows: list[tuple[bytes, int, Any]], size: int) -> None:
        """Store ``(cid, kind, data)`` rows as one run; a CID already stored keeps its first block.

        ``kind`` is 0 (raw block bytes), 1 (codec-encoded value) or 2 (a value stored as it is:
        an int in 64 bits, a float, a str, bytes or None). ``size`` is the rows' byte count for
        the ``max_stored_mb`` limit. (The drivers hand over runs their block table packed
        itself, through :meth:`put_run_sync`.)

        Raises:
            DiskError: a row is not a spill row (nothing is stored then), or as :meth:`put_run_sync`.
        """
        self._connection()
        try:
            run, large = implementation.backend().pack_run(rows, self._next_large)
        except (TypeError, ValueError) as exc:
            raise DiskError(f"SQLite spill store {self.name}: cannot store a row: {exc}") from exc
        self.put_run_sync(run, large, size)

    @property
    def next_large(self) -> int:
        """The id the next payload stored apart gets (for a block table's ``take_run``)."""
        return self._next_large

    def put_run_sync(self, run: bytes, large: list[tuple[int, bytes]], size: int) -> None:
        """Store a run packed by a block table's ``take_run(max_bytes, self.next_large)``, in one transaction.

        ``size`` is its rows' byte count for the ``max_stored_mb`` limit.

        Raises:
            DiskError: the run would take the store past ``max_stored_mb``, ``large`` is not
                numbered from :attr:`next_large`, or the store is closed or needs a
                :meth:`reset` after a failed write.
            sqlite3.Error: SQLite failed (:meth:`_run` makes it a DiskError); the store then
                needs a :meth:`reset`.
        """
        conn = self._connection()
        if self.stored_bytes + size > self._max_stored:
            raise DiskError(
                f"SQLite spill store {self.name} would hold {self.stored_bytes + size} bytes, "
                f"over its limit of {self._max_stored // _MIB} MiB"
            )
        if large and large[0][0] != self._next_large:
            raise DiskError(f"SQLite spill store {self.name}: a run's large payloads start at id {large[0][0]}, not {self._next_large}")
        # Counted before it is written: a run that fails half-way (there is no journal to roll
        # it back with) leaves stored_bytes > 0, so the drivers reset the store before reuse.
        self.stored_bytes += size
        self._failed = True
        self._put_run(conn, run, large)

    def _put_run(self, conn: sqlite3.Connection, run: bytes, large: list[tuple[int, bytes]]) -> None:
        conn.execute("BEGIN")
        if run:
            # In rows of a few pieces: binding the whole run would copy all of it at once, and a
            # blob written in place (zeroblob) is written twice through the small loading cache.
            view = memoryview(run)
            segments: Segments = []
            for at in range(0, len(run), _RUN_ROW):
                piece = view[at : at + _RUN_ROW]
                conn.execute("INSERT INTO runs VALUES (?, ?)", (self._next_id, piece))
                segments.append(("runs", self._next_id, len(piece)))
                self._next_id += 1
            self._runs.append(segments)
        if large:
            conn.executemany("INSERT INTO large VALUES (?, ?)", large)
            self._next_large += len(large)
        conn.execute("COMMIT")
        self._failed = False

    def merge_sync(self) -> None:
        """Merge the runs stored since the last merge into the two merged runs (in the worker thread).

        Look-ups do it on their first query if runs are waiting; a driver may call it once
        loading is over, to count its time in the load rather than in the walk's first chunk.

        Raises:
            DiskError: the store is closed or needs a :meth:`reset`, or a run does not read back.
            sqlite3.Error: SQLite failed; the store then needs a :meth:`reset`.
        """
        if not self._runs:
            return
        conn = self._connection()
        self._failed = True
        self._close_blobs()
        self._nodes = self._values = None
        conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
        runs = [run for run in self._merged if run] + self._runs  # the merged two hold no CID in common
        self._merged, self._runs = [], []
        # Each run being merged holds up to two pieces: together, at most half the cache size.
        fan_in = max(2, self._cache_kib * 1024 // 2 // (2 * _READ_PIECE))
        while len(runs) > fan_in:  # in levels, each run read once per level; load order kept
            level = [self._merge(conn, runs[i : i + fan_in], 0)[0][0] for i in range(0, len(runs), fan_in)]
            runs = [run for run in level if run]
        total = sum(used for run in runs for _, _, used in run)
        every = max(_INDEX_EVERY, total * _POINT_BYTES // max(1, self._cache_kib * 1024 // 4))
        self._merged, (self._nodes, self._values) = self._merge(conn, runs, every)
        segment = _segment_size(total)
        for merged, index in zip(self._merged, (self._nodes, self._values), strict=True):
            blobs = [conn.blobopen(table, "data", rowid, readonly=True) for table, rowid, _ in merged]
            self._blobs += blobs
            index.attach(blobs, segment)
        self._failed = False

    def _merge(self, conn: sqlite3.Connection, runs: list[Segments], every: int) -> tuple[list[Segments], Any]:
        """Merge ``runs`` (in load order), and delete theirs.

        With ``every`` (the last merge) the entries go to two runs, MST nodes and the rest, and
        it returns both and their indexes; with ``every=0``, one run and ``None``.

        The new runs go to the other table than most of their inputs': a blob written in the
        table a blob is read from makes SQLite walk the read blob's overflow pages again on
        every read (measured: 10x slower).
        """
        split = every > 0
        merge = implementation.backend().RunMerge(len(runs), every, split)
        readers = [_Reader(conn, self.name, run) for run in runs]
        total = sum(used for run in runs for _, _, used in run)  # neither merged run is longer
        table = "merged" if 2 * sum(run[0][0] == "runs" for run in runs) >= len(runs) else "runs"
        writers = [_Writer(self, conn, table, total, _segment_size(total)) for _ in range(2 if split else 1)]
        conn.execute("BEGIN")
        try:
            while (piece := merge.step(_WRITE_PIECE)) is not None:
                if type(piece) is int:
                    merge.feed(piece, readers[piece].read())
                elif split:
                    writers[piece[0]].write(piece[1])
                else:
                    writers[0].write(piece)
        finally:
            for writer in writers:
                writer.close()
            for reader in readers:
                reader.close()
        for name in ("runs", "merged"):
            conn.executemany(f"DELETE FROM {name} WHERE id = ?", [(rowid,) for run in runs for t, rowid, _ in run if t == name])
        conn.execute("COMMIT")
        return [writer.segments for writer in writers], merge.index() if split else None

    def _large(self, row: tuple[int, Any]) -> tuple[int, Any]:
        """The ``(kind, data)`` of an entry whose payload is a ``large`` row."""
        assert self._conn is not None
        found = self._conn.execute("SELECT data FROM large WHERE id = ?", (row[1],)).fetchone()
        if found is None:
            raise DiskError(f"SQLite spill store {self.name} is damaged: large row {row[1]} is missing")
        return large_value(row[0], found[0])

    def lookup(self, decode: Callable[[bytes], Any]) -> _DiskLookup:
        """A :class:`~repo_stream.core.blocks.NodeLookup` with ``fetch_many``, over this store.

        Runs stored since the last look-up are merged on its first query (in the worker thread).

        Raises:
            DiskError: the store is closed, or needs a :meth:`reset` after a failed write.
        """
        self._connection()
        return _DiskLookup(self)

    def _close_blobs(self) -> None:
        blobs, self._blobs = self._blobs, []
        for blob in blobs:
            blob.close()

    def _reset_sync(self) -> None:
        self._close_sync()
        self.stored_bytes = 0
        self._open_sync()

    async def reset(self) -> None:
        """Empty the store for the next repo: a new temporary database, or the file at ``path`` made afresh.

        Raises:
            DiskError: the store is closed, or SQLite cannot set up the new database.
        """
        if self._conn is None:
            raise DiskError(f"SQLite spill store {self.name} is closed")
        await self._run(self._reset_sync)

    # --- lifecycle ----------------------------------------------------------------------------

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                self._close_blobs()
            finally:
                self._empty()
                conn.close()
                implementation.trim_memory()  # its page cache, freed in this thread's arena

    async def close(self) -> None:
        """Close the store; a temporary store's file goes with it, a file at a path stays.

        Safe to call more than once, and shielded from cancellation so nothing is left open.
        """
        with anyio.CancelScope(shield=True):
            if self._conn is not None:
                await anyio.to_thread.run_sync(self._close_sync, limiter=self._limiter)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._conn is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _Writer:
    """Writes a merged run into ``table``, in segments of ``segment`` bytes (the last one
    shorter): each a row made with ``zeroblob`` of its size, then written through a blob handle."""

    __slots__ = ("_store", "_conn", "_table", "_left", "_segment", "_blob", "_room", "segments")

    def __init__(self, store: DiskStore, conn: sqlite3.Connection, table: str, most: int, segment: int) -> None:
        self._store = store
        self._conn = conn
        self._table = table
        self._left = most  # the run is no longer than this
        self._segment = segment
        self._blob: sqlite3.Blob | None = None
        self._room = 0
        self.segments: Segments = []

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if not self._room:
                self.close()
                size = min(self._segment, max(self._left, len(view)))
                rowid = self._store._next_id
                self._store._next_id += 1
                self._conn.execute(f"INSERT INTO {self._table} VALUES (?, zeroblob(?))", (rowid, size))
                self._blob = self._conn.blobopen(self._table, "data", rowid)
                self.segments.append((self._table, rowid, 0))
                self._room = size
            assert self._blob is not None
            n = min(self._room, len(view))
            self._blob.write(view[:n])
            table, rowid, used = self.segments[-1]
            self.segments[-1] = (table, rowid, used + n)
            self._room -= n
            self._left -= n
            view = view[n:]

    def close(self) -> None:
        if self._blob is not None:
            self._blob.close()
            self._blob = None


class _Reader:
    """Reads a run from its ``runs`` rows, a piece at a time, for a merge."""

    __slots__ = ("_conn", "_name", "_segments", "_blob", "_rowid", "_left")

    def __init__(self, conn: sqlite3.Connection, name: str, segments: Segments) -> None:
        self._conn = conn
        self._name = name
        self._segments = list(reversed(segments))
        self._blob: sqlite3.Blob | None = None
        self._rowid = 0
        self._left = 0

    def read(self) -> bytes:
        """The run's next piece, ``b""`` at its end.

        Raises:
            DiskError: a row is shorter than the store wrote.
        """
        while not self._left:
            self.close()
            if not self._segments:
                return b""
            table, self._rowid, self._left = self._segments.pop()
            self._blob = self._conn.blobopen(table, "data", self._rowid, readonly=True)
        assert self._blob is not None
        data = self._blob.read(min(self._left, _READ_PIECE))
        if not data:
            raise DiskError(f"SQLite spill store {self._name} is damaged: row {self._rowid} is shorter than written")
        self._left -= len(data)
        return data

    def close(self) -> None:
        if self._blob is not None:
            self._blob.close()
            self._blob = None


def _segment_size(total: int) -> int:
    """The segment size of a merged run of at most ``total`` bytes: whole MiB, at least :data:`_SEGMENT`."""
    return max(_SEGMENT, -(-total // _SEGMENTS_MOST // _MIB) * _MIB)


def _clear_store_file(path: Path) -> None:
    """Make way at ``path`` for a new store: remove a store file left there, refuse anything else.

    Raises:
        DiskError: ``path`` holds something other than an empty file or a store file, or cannot
            be read or removed.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise DiskError(f"SQLite spill store {path}: cannot read it: {exc}") from exc
    if not head:
        return
    if head[:16] != _SQLITE_MAGIC or len(head) < 72 or _from_bytes(head[68:72], "big") != APPLICATION_ID:
        raise DiskError(f"SQLite spill store {path}: the file exists and is not a repo-stream spill store; refusing to overwrite it")
    try:
        os.unlink(path)
    except OSError as exc:
        raise DiskError(f"SQLite spill store {path}: cannot remove the earlier store file: {exc}") from exc


class _DiskLookup:
    """Block look-ups for the walker, run inside the store's worker thread: :meth:`node` for MST
    nodes, :meth:`fetch_many` for a chunk's records."""

    __slots__ = ("_store",)

    def __init__(self, store: DiskStore) -> None:
        self._store = store

    def _indexes(self) -> tuple[Any, Any]:
        store = self._store
        if store._runs or store._nodes is None:
            store._connection()  # a DiskError if the store was closed, or failed
            store.merge_sync()
        return store._nodes, store._values

    def node(self, cid: bytes) -> Any:
        """The raw block of ``cid``; ``None`` if absent; :data:`NOT_A_NODE` if stored processed."""
        nodes, values = self._indexes()
        if nodes is None:
            return None
        row = nodes.get(cid)
        if row is None:
            row = values.get(cid)  # a block that does not look like a node
            if row is None:
                return None
            if row[0] & LARGE:
                row = self._store._large(row)
        return row[1] if row[0] == 0 else NOT_A_NODE

    def fetch_many(self, cids: list[bytes]) -> tuple[list[tuple[int, Any] | None], bool]:
        """``(kind, data)`` for each CID of ``cids`` (raw CID bytes), in the order asked, ``None``
        where absent; and whether every one is there with kind 2.

        ``kind`` is 0 (``data`` is the raw block), 1 (the codec-encoded processed value) or 2 (the
        processed value itself). A CID may be asked for more than once.

        Raises:
            DiskError: the store does not read back, or needs a :meth:`DiskStore.reset`.
        """
        nodes, values = self._indexes()
        if nodes is None:
            return [None] * len(cids), not cids
        rows, n_large, n_plain = values.get_many(cids)
        if n_plain != len(cids) and None in rows:  # a record block that looks like a node, or none
            found, _, _ = nodes.get_many([cid for cid, row in zip(cids, rows, strict=True) if row is None])
            if any(row is not None for row in found):
                found.reverse()
                rows = [found.pop() if row is None else row for row in rows]
        if n_large:
            large = self._store._large
            rows = [large(row) if row is not None and row[0] & LARGE else row for row in rows]
            n_plain = sum(1 for row in rows if row is not None and row[0] == 2)
        return rows, n_plain == len(cids)
