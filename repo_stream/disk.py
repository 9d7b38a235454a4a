"""The SQLite spill store.

When a repo does not fit in the memory limit, its blocks go into SQLite. The format is internal
(a store is scratch space, rebuilt from the CAR, read by nothing else)::

    blocks(key INTEGER PRIMARY KEY, cid BLOB NOT NULL, kind INTEGER NOT NULL, data)
    collided(cid BLOB PRIMARY KEY, kind INTEGER NOT NULL, data) WITHOUT ROWID
    stage.staged(key INTEGER NOT NULL, cid BLOB NOT NULL, kind INTEGER NOT NULL, data)

``kind`` says what ``data`` is: ``0`` the raw block bytes, ``1`` a processed value encoded by the
store's codec, ``2`` a processed value SQLite holds as it is (int in 64 bits, float, str, bytes,
None), which saves an encode and a decode per record for processors such as ``len``.

**Keys.** ``key`` is the CID's last 8 bytes read as a signed big-endian 64-bit integer
(:func:`cid_key`; for the usual sha2-256 CIDs, the digest's last 8 bytes), so a look-up is one
probe of SQLite's integer rowid B-tree; the full CID stored beside it is compared before a row is
used. Two different CIDs with the same key (a forged CID, or the same digest under another codec)
are both kept: the first stored takes the ``blocks`` row, later ones go to ``collided``, keyed by
the whole CID. Loading pays for this only when some key was taken already (a collision or a CID
stored twice); a look-up only when the row found is not the CID asked for. A CID stored twice
keeps its first block, as in memory.

**Staging.** Insert batches are appended as they come to ``staged``, in a second temporary
database attached as ``stage``. The first look-up after them moves them into ``blocks`` with one
``INSERT ... SELECT ... ORDER BY key`` (SQLite's external merge sort, its memory bounded by the
cache size): every B-tree page is written once, full. Inserting each batch in place instead
rewrites pages all over the tree on every batch, at a cost per row that grows with the store
(measured: 9.6 us a row at 633k rows, 14.4 us at 2.5M; staged: 6.5 us at both) and leaves pages
a third empty. The staging database is then dropped, which frees its disk space.

**Temporary stores leave nothing behind.** :meth:`DiskBuilder.open` without a path opens SQLite's
own temporary database (``sqlite3.connect("")``); the staging database is one as well. SQLite
creates such a file in the temporary directory (``SQLITE_TMPDIR``, else ``TMPDIR``, else
``/var/tmp``, ``/usr/tmp``, ``/tmp``) only once its page cache overflows, and unlinks it right
after creating it (as it does its sort files): the file has no name while it is used, and the
kernel frees it when the process ends, even by ``kill -9``. The journal is off: no side files.
(On a SQLite built to keep temporary databases in memory, ``SQLITE_TEMP_STORE`` 2 or 3, which
would not bound memory, both are instead files made with :func:`tempfile.mkstemp` and unlinked
right after SQLite opens them: :data:`TEMPORARY_IN_MEMORY`.) A temporary store opened with a
``directory`` (:meth:`DiskBuilder.open`) makes both files that way, in that folder: the
backfill's disk workers put their stores in its ``spill_dir`` so.

**A store at a path** keeps ``blocks`` and ``collided`` in that file, with
``locking_mode=EXCLUSIVE``. The file is marked with an application id (``PRAGMA
application_id``), so that :meth:`DiskBuilder.open` can start afresh, in O(1), from a file an
earlier store left (even one damaged by a crash mid-write), and refuses to overwrite any other
file. :meth:`DiskStore.reset` starts afresh the same way.

Pragmas: ``journal_mode=OFF`` and ``synchronous=OFF`` (nothing is ever rolled back: a batch that
fails marks the store as needing :meth:`DiskStore.reset`, which the drivers do before reuse);
``cache_size`` from :meth:`DiskBuilder.with_cache_size_mb` bounds SQLite's memory (``temp_store``
stays at its default, file, so sorts and temporary tables are bounded by it too).

All SQLite work runs in a worker thread through :func:`anyio.to_thread.run_sync`, one store at a
time (a ``CapacityLimiter(1)``), with whole batches per hop: a batch of inserts, or a whole chunk
of the walk. This works under asyncio and trio alike. (aiosqlite was the first choice, but it is
bound to asyncio's event loop and makes one thread hop per statement.)
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import Any, Self, TypeVar

import anyio
import cbor2

from .blocks import NOT_A_NODE
from .cid import cid_str
from .errors import DiskError

__all__ = ["CBOR_CODEC", "Codec", "DiskBuilder", "DiskStore", "cid_key"]

T = TypeVar("T")

#: A value codec: ``(encode, decode)``; ``encode(value) -> bytes`` and ``decode(bytes) -> value``.
Codec = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]

#: The default codec for processed values: CBOR (bytes, str, int, float, bool, None, list, dict).
CBOR_CODEC: Codec = (cbor2.dumps, cbor2.loads)

#: A stored row as the look-ups hold it: ``(cid, kind, data)``.
Row = tuple[bytes, int, Any]

_MIB = 1024 * 1024
_first = itemgetter(0)
_kind_data = itemgetter(1, 2)
_from_bytes = int.from_bytes

#: ``PRAGMA application_id`` of a store file ("RSsp"); SQLite keeps it at byte 68 of the header.
APPLICATION_ID = 0x52537370
_SQLITE_MAGIC = b"SQLite format 3\x00"

#: CIDs per look-up query (SQLite allows 32766 parameters; past ~64 the gain is small).
_FETCH_MAX = 256
#: Rows larger than this many bytes are not prefetched (they are fetched when asked for), and
#: prefetching pauses while this many rows wait: prefetched rows stay under ~16 MiB, whatever the input.
_PREFETCH_ROW_BYTES = 4096
_PREFETCH_ROWS = 4096
#: Cache of the staging database, KiB: appending needs only the last pages.
_STAGE_CACHE_KIB = 1024

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS blocks (key INTEGER PRIMARY KEY, cid BLOB NOT NULL, kind INTEGER NOT NULL, data)",
    "CREATE TABLE IF NOT EXISTS collided (cid BLOB PRIMARY KEY, kind INTEGER NOT NULL, data) WITHOUT ROWID",
)
_STAGE = (
    "PRAGMA stage.journal_mode=OFF",
    f"PRAGMA stage.cache_size=-{_STAGE_CACHE_KIB}",
    "CREATE TABLE stage.staged (key INTEGER NOT NULL, cid BLOB NOT NULL, kind INTEGER NOT NULL, data)",
)
_STAGE_INSERT = "INSERT INTO stage.staged VALUES (?, ?, ?, ?)"
# Merging: the first of a key (in staging order) goes to `blocks` unless the key is taken; then,
# only if some row was left out, every row whose key another CID holds goes to `collided` (where
# a CID stored already is left out too: the first block wins).
_MERGE = "INSERT OR IGNORE INTO blocks SELECT key, cid, kind, data FROM stage.staged ORDER BY key, rowid"
_MERGE_COLLIDED = (
    "INSERT OR IGNORE INTO collided SELECT s.cid, s.kind, s.data FROM stage.staged AS s"
    " WHERE (SELECT b.cid FROM blocks AS b WHERE b.key = s.key) IS NOT s.cid ORDER BY s.rowid"
)
_FETCH_ONE = "SELECT cid, kind, data FROM blocks WHERE key = ?"
_FETCH_COLLIDED = "SELECT cid, kind, data FROM collided WHERE cid = ?"


def _temporary_in_memory() -> bool:
    """Whether this SQLite keeps temporary databases in memory (built with ``SQLITE_TEMP_STORE`` 2 or 3)."""
    with sqlite3.connect(":memory:") as conn:
        options = {row[0] for row in conn.execute("PRAGMA compile_options")}
    conn.close()
    return "TEMP_STORE=2" in options or "TEMP_STORE=3" in options


#: True on the rare SQLite builds whose temporary databases live in memory (unbounded): there,
#: temporary stores use a named file instead, unlinked as soon as SQLite has opened it.
TEMPORARY_IN_MEMORY = _temporary_in_memory()


def _unlinked_file(directory: str | None) -> str:
    """A new empty file in ``directory`` (None: the temporary directory), for SQLite to open and
    the caller to unlink."""
    fd, name = tempfile.mkstemp(prefix="repo-stream-", suffix=".db", dir=directory)
    os.close(fd)
    return name


def cid_key(cid: bytes) -> int:
    """The store's integer key of ``cid`` (raw CID bytes): its last 8 bytes as a signed big-endian int64."""
    return _from_bytes(cid[-8:], "big", signed=True)


class _Sql(dict[int, str]):
    """``n -> a query for the rows of n keys``, built on first use.

    Up to :data:`_UNION_MAX` keys it is one ``SELECT ... WHERE key = ?`` per key joined by
    ``UNION ALL``, above it one ``WHERE key IN (...)``: measured on the 500k-record spill, the
    compound query costs 10-25% less a row for 2 to 16 keys (an ``IN`` list builds a temporary
    index on every run), the ``IN`` list less from about 64 keys.
    """

    def __init__(self, condition: str = "") -> None:
        super().__init__()
        self._select = "SELECT cid, kind, data FROM blocks WHERE key "
        self._condition = condition

    def __missing__(self, n: int) -> str:
        if n <= _UNION_MAX:
            sql = " UNION ALL ".join([f"{self._select}= ?{self._condition}"] * n)
        else:
            sql = f"{self._select}IN ({', '.join('?' * n)}){self._condition}"
        self[n] = sql
        return sql


#: Most keys per compound query (see :class:`_Sql`).
_UNION_MAX = 32
_FETCH = _Sql()
_PREFETCH = _Sql(f" AND length(data) <= {_PREFETCH_ROW_BYTES}")


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
        ``directory`` as well, its file and its staging file are made in that folder instead
        (``tempfile.mkstemp``) and unlinked as soon as SQLite has opened them: the store's disk
        space is on that folder's file system, and nothing is left there even after ``kill -9``.
        (SQLite's sort files, during the merge, still go to the temporary directory.)

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
    :class:`~repo_stream.drivers.DiskDriver` hands it back through ``reset_store()``, emptied and
    ready for the next repo. Only one driver may use a store at a time.
    """

    def __init__(self, path: Path | None, cache_size_mb: int, max_stored: int, directory: str | None = None) -> None:
        #: The SQLite file's path, or ``None`` for a temporary store (its file has no name).
        self.path = path
        #: The folder of a temporary store's unlinked files, or ``None`` (the temporary directory).
        self.directory = directory
        #: How messages name the store: its path, or ``"(temporary)"`` (``"(temporary, in DIR)"``).
        self.name = str(path) if path is not None else "(temporary)" if directory is None else f"(temporary, in {directory})"
        self._cache_kib = cache_size_mb * 1024
        self._max_stored = max_stored
        self._conn: sqlite3.Connection | None = None
        self._failed = False
        self._limiter = anyio.CapacityLimiter(1)
        #: Rows staged since the last merge into ``blocks``.
        self._staged = 0
        #: Bytes of CIDs and data stored since the last reset (a batch that failed counts too).
        self.stored_bytes = 0

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
            conn = sqlite3.connect(target, check_same_thread=False, isolation_level=None, cached_statements=512)
        finally:
            if unlink is not None:
                os.unlink(unlink)  # SQLite has the file open (or failed): from now on it has no name
        try:
            conn.execute("PRAGMA locking_mode=EXCLUSIVE")  # a temporary database is exclusive already
            conn.execute("PRAGMA journal_mode=OFF")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute("PRAGMA temp_store=FILE")  # sorts spill to (unlinked) files, not memory
            conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            for statement in _SCHEMA:
                conn.execute(statement)
            self._attach_stage(conn, self.directory)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._failed = False
        self._staged = 0

    @staticmethod
    def _attach_stage(conn: sqlite3.Connection, directory: str | None) -> None:
        """Attach a new, empty, temporary staging database as ``stage`` (an unlinked file in
        ``directory`` if given).

        Raises:
            OSError: no file can be made in ``directory``.
        """
        if directory is not None or TEMPORARY_IN_MEMORY:
            name = _unlinked_file(directory)
            try:
                conn.execute("ATTACH DATABASE ? AS stage", (name,))
            finally:
                os.unlink(name)
        else:
            conn.execute("ATTACH DATABASE '' AS stage")
        for statement in _STAGE:
            conn.execute(statement)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DiskError(f"SQLite spill store {self.name} is closed")
        if self._failed:
            raise DiskError(f"SQLite spill store {self.name}: an earlier write failed; reset() the store before reusing it")
        return self._conn

    # --- used by the drivers (in the worker thread) -------------------------------------------

    def put_batch_sync(self, rows: list[tuple[bytes, int, Any]], size: int) -> None:
        """Store ``(cid, kind, data)`` rows in one transaction; a CID already stored keeps its first block.

        ``kind`` is 0 (raw block bytes), 1 (codec-encoded value) or 2 (a value SQLite holds as it
        is). ``size`` is the rows' byte count for the ``max_stored_mb`` limit.

        Raises:
            DiskError: the rows would take the store past ``max_stored_mb``, or the store is closed
                or needs a :meth:`reset` after a failed write.
            sqlite3.Error: SQLite failed (:meth:`_run` makes it a DiskError); the store then
                needs a :meth:`reset`.
        """
        self._put([(_from_bytes(cid[-8:], "big", signed=True), cid, kind, data) for cid, kind, data in rows], size)

    def put_keyed_batch_sync(self, rows: list[tuple[int, bytes, int, Any]], size: int) -> None:
        """As :meth:`put_batch_sync`, for rows that carry their key: ``(cid_key(cid), cid, kind, data)``."""
        self._put(rows, size)

    def _put(self, rows: list[tuple[int, bytes, int, Any]], size: int) -> None:
        conn = self._connection()
        if self.stored_bytes + size > self._max_stored:
            raise DiskError(
                f"SQLite spill store {self.name} would hold {self.stored_bytes + size} bytes, "
                f"over its limit of {self._max_stored // _MIB} MiB"
            )
        # Counted before it is written: a batch that fails half-way (there is no journal to roll
        # it back with) leaves stored_bytes > 0, so the drivers reset the store before reuse.
        self.stored_bytes += size
        self._failed = True
        conn.execute("BEGIN")
        conn.executemany(_STAGE_INSERT, rows)
        conn.execute("COMMIT")
        self._staged += len(rows)
        self._failed = False

    def merge_sync(self) -> None:
        """Move the rows staged by the insert batches into place (in the worker thread).

        Look-ups do it on their first query if rows are staged; a driver may call it once
        loading is over, to count its time in the load rather than in the walk's first chunk.
        It is one SQLite statement, a sort of every staged row (cancelling waits for it).

        Raises:
            DiskError: the store is closed or needs a :meth:`reset`.
            sqlite3.Error: SQLite failed; the store then needs a :meth:`reset`.
        """
        if not self._staged:
            return
        conn = self._connection()
        self._failed = True
        # The sort takes as much memory as the main cache size: halve the cache meanwhile, so
        # that the two stay within the size set.
        conn.execute(f"PRAGMA main.cache_size=-{max(self._cache_kib // 2, 1024)}")
        conn.execute("BEGIN")
        before = conn.total_changes
        conn.execute(_MERGE)
        if conn.total_changes - before != self._staged:
            conn.execute(_MERGE_COLLIDED)
        conn.execute("COMMIT")
        conn.execute(f"PRAGMA main.cache_size=-{self._cache_kib}")
        conn.execute("DETACH DATABASE stage")
        self._attach_stage(conn, self.directory)
        self._staged = 0
        self._failed = False

    def lookup(self, decode: Callable[[bytes], Any]) -> _DiskLookup:
        """A :class:`~repo_stream.walk.BlockLookup` over this store, decoding processed values.

        Rows staged since the last look-up are merged on its first query (in the worker thread).

        Raises:
            DiskError: the store is closed, or needs a :meth:`reset` after a failed write.
        """
        self._connection()
        return _DiskLookup(self, decode)

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
            conn.close()

    async def close(self) -> None:
        """Close the store; a temporary store's files go with it, a file at a path stays.

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
    """Block look-ups for the walker, run inside the store's worker thread.

    When the walker expands a node it calls :meth:`prefetch` with the CIDs of the node's records
    and subtrees; their rows come in one ``IN (...)`` query and wait until asked for. Anything not
    prefetched (a large row, a CID asked twice, a collided CID) is fetched alone when asked for.
    A native walker can use :meth:`fetch_many` instead.
    """

    __slots__ = ("_decode", "_execute", "_raw_row", "_ready", "_store")

    def __init__(self, store: DiskStore, decode: Callable[[bytes], Any]) -> None:
        self._store = store
        assert store._conn is not None
        self._execute = store._conn.cursor().execute
        self._decode = decode
        # Prefetched rows waiting to be asked for, by CID: only CIDs the walker asked to prefetch
        # (a row of another CID under an asked key is dropped), small rows, and few of them.
        self._ready: dict[bytes, Row] = {}
        # The raw row :meth:`processed` just passed over, for the :meth:`raw` call that follows.
        self._raw_row: Row | None = None

    def _query(self, sql: _Sql, cids: Sequence[bytes]) -> dict[bytes, Row]:
        """The rows of ``cids`` (at most :data:`_FETCH_MAX`) in ``blocks``, by CID, from one query."""
        if self._store._staged:
            self._store.merge_sync()
        rows = self._execute(sql[len(cids)], [_from_bytes(c[-8:], "big", signed=True) for c in cids]).fetchall()
        found = dict(zip(map(_first, rows), rows, strict=True))
        wanted = set(cids)
        if not found.keys() <= wanted:  # a row of another CID under an asked key: dropped
            found = {cid: row for cid, row in found.items() if cid in wanted}
        return found

    def _one(self, cid: bytes) -> Row | None:
        """The row of ``cid``, from ``blocks`` or ``collided``, or ``None``."""
        if self._store._staged:
            self._store.merge_sync()
        row: Row | None = self._execute(_FETCH_ONE, (_from_bytes(cid[-8:], "big", signed=True),)).fetchone()
        if row is not None and row[0] == cid:
            return row
        collided: Row | None = self._execute(_FETCH_COLLIDED, (cid,)).fetchone()
        return collided

    def prefetch(self, cids: list[bytes]) -> None:
        """Fetch the rows of ``cids`` (the records and subtrees of a node, in walk order) ahead of use."""
        ready = self._ready
        if len(ready) >= _PREFETCH_ROWS:
            return
        if len(cids) <= _FETCH_MAX:
            ready.update(self._query(_PREFETCH, cids))
            return
        for i in range(0, len(cids), _FETCH_MAX):
            ready.update(self._query(_PREFETCH, cids[i : i + _FETCH_MAX]))
            if len(ready) >= _PREFETCH_ROWS:
                return

    def fetch_many(self, cids: list[bytes]) -> list[tuple[int, Any] | None]:
        """``(kind, data)`` for each CID of ``cids`` (raw CID bytes), in the order asked; ``None`` where absent.

        ``kind`` is 0 (``data`` is the raw block), 1 (the codec-encoded processed value) or 2 (the
        processed value itself). A CID may be asked for more than once. One query per 256 CIDs.
        """
        if len(cids) > _FETCH_MAX:
            out: list[tuple[int, Any] | None] = []
            for i in range(0, len(cids), _FETCH_MAX):
                out += self.fetch_many(cids[i : i + _FETCH_MAX])
            return out
        rows = list(map(self._query(_FETCH, cids).get, cids))
        if None in rows:
            rows = [self._one(cid) if row is None else row for cid, row in zip(cids, rows, strict=True)]
            return [None if row is None else (row[1], row[2]) for row in rows]
        return list(map(_kind_data, rows))  # type: ignore[arg-type]  # no None left

    def _row(self, cid: bytes) -> Row | None:
        row = self._ready.pop(cid, None)
        if row is None:
            row = self._one(cid)
        return row

    def node(self, cid: bytes) -> Any:
        row = self._row(cid)
        if row is None:
            return None
        return NOT_A_NODE if row[1] else row[2]

    def processed(self, cid: bytes, default: Any) -> Any:
        row = self._row(cid)
        if row is None:
            return default
        kind = row[1]
        if kind == 2:
            return row[2]
        if kind == 0:
            self._raw_row = row
            return default
        try:
            return self._decode(row[2])
        except Exception as exc:
            raise DiskError(f"stored value of block {cid_str(cid)} cannot be decoded: {exc}") from exc

    def raw(self, cid: bytes) -> bytes | None:
        held = self._raw_row
        if held is not None and held[0] == cid:
            self._raw_row = None
            data: bytes = held[2]
            return data
        row = self._row(cid)
        return row[2] if row is not None and row[1] == 0 else None
