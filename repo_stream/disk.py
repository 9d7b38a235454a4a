"""The SQLite spill store.

When a repo does not fit in the memory limit, its blocks go into one SQLite table
``blocks(cid BLOB PRIMARY KEY, processed INTEGER, data) WITHOUT ROWID``: raw block bytes
(``processed = 0``), a processed value encoded by the store's codec (``processed = 1``), or a
processed value SQLite holds as it is (``processed = 2``: int in 64 bits, float, str, bytes,
None), which saves an encode and a decode per record for processors such as ``len``.

All SQLite work runs in a worker thread through :func:`anyio.to_thread.run_sync`, one store at a
time (a ``CapacityLimiter(1)``), with whole batches per hop: a batch of inserts, or a whole chunk
of the walk. This works under asyncio and trio alike. (aiosqlite was the first choice, but it is
bound to asyncio's event loop and makes one thread hop per statement.)

Pragmas: ``journal_mode=WAL``, ``synchronous=OFF`` (a spill file is scratch space: after a crash
it is rebuilt from the CAR, never trusted), ``cache_size`` from :meth:`DiskBuilder.with_cache_size_mb`.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
from collections.abc import Callable
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

import anyio
import cbor2

from .blocks import NOT_A_NODE
from .cid import cid_str
from .errors import DiskError

__all__ = ["Codec", "CBOR_CODEC", "DiskBuilder", "DiskStore"]

T = TypeVar("T")

#: A value codec: ``(encode, decode)``; ``encode(value) -> bytes`` and ``decode(bytes) -> value``.
Codec = tuple[Callable[[Any], bytes], Callable[[bytes], Any]]

#: The default codec for processed values: CBOR (bytes, str, int, float, bool, None, list, dict).
CBOR_CODEC: Codec = (cbor2.dumps, cbor2.loads)

_MIB = 1024 * 1024
_by_cid = itemgetter(0)


class DiskBuilder:
    """Configures and opens a :class:`DiskStore`.

    Example::

        store = await DiskBuilder().with_cache_size_mb(32).with_max_stored_mb(10_240).open("spill.db")
    """

    def __init__(self) -> None:
        self._cache_size_mb = 32
        self._max_stored_mb = 10_240

    def with_cache_size_mb(self, mb: int) -> DiskBuilder:
        """Set SQLite's page cache size, in MiB (default 32). Returns ``self``."""
        if mb < 1:
            raise ValueError(f"cache size must be at least 1 MiB, got {mb}")
        self._cache_size_mb = mb
        return self

    def with_max_stored_mb(self, mb: int) -> DiskBuilder:
        """Set the most block data the store accepts, in MiB (default 10240). Returns ``self``.

        Going past it raises :class:`~repo_stream.errors.DiskError`. It counts the CID and data
        bytes stored; the file itself is somewhat larger (B-tree pages, WAL).
        """
        if mb < 1:
            raise ValueError(f"max stored size must be at least 1 MiB, got {mb}")
        self._max_stored_mb = mb
        return self

    async def open(self, path: str | os.PathLike[str] | None = None) -> DiskStore:
        """Open (creating if needed) a store at ``path``; empty any blocks it already holds.

        With ``path=None`` the store lives in a new temporary directory, removed by
        :meth:`DiskStore.close`.

        Raises:
            DiskError: SQLite cannot open or set up the file.
        """
        temp_dir = None
        if path is None:
            temp_dir = tempfile.mkdtemp(prefix="repo-stream-")
            path = os.path.join(temp_dir, "spill.db")
        store = DiskStore(Path(path), self._cache_size_mb, self._max_stored_mb * _MIB, temp_dir)
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

    def __init__(self, path: Path, cache_size_mb: int, max_stored: int, temp_dir: str | None) -> None:
        #: The SQLite file's path.
        self.path = path
        self._cache_size_mb = cache_size_mb
        self._max_stored = max_stored
        self._temp_dir = temp_dir
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        #: Bytes of CIDs and data stored since the last reset.
        self.stored_bytes = 0

    # --- plumbing ----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the store's worker thread; SQLite errors become :class:`DiskError`.

        The thread is never abandoned: on cancellation it finishes its batch first.
        """
        try:
            return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)
        except sqlite3.Error as exc:
            raise DiskError(f"SQLite spill store {self.path}: {exc}") from exc

    def _open_sync(self) -> None:
        conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=OFF")
            conn.execute(f"PRAGMA cache_size=-{self._cache_size_mb * 1024}")
            conn.execute("PRAGMA temp_store=MEMORY")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS blocks (cid BLOB PRIMARY KEY, processed INTEGER NOT NULL, data) WITHOUT ROWID"
            )
            conn.execute("DELETE FROM blocks")
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DiskError(f"SQLite spill store {self.path} is closed")
        return self._conn

    # --- used by the drivers (in the worker thread) -------------------------------------------

    def put_batch_sync(self, rows: list[tuple[bytes, int, Any]], size: int) -> None:
        """Insert ``(cid, processed, data)`` rows in one transaction (duplicates ignored).

        ``size`` is the rows' byte count for the ``max_stored_mb`` limit.

        Raises:
            DiskError: the rows would take the store past ``max_stored_mb``, or SQLite failed.
        """
        if self.stored_bytes + size > self._max_stored:
            raise DiskError(
                f"SQLite spill store {self.path} would hold {self.stored_bytes + size} bytes, "
                f"over its limit of {self._max_stored // _MIB} MiB"
            )
        conn = self._connection()
        rows.sort(key=_by_cid)  # inserting in key order touches each B-tree page once per batch (~25% faster)
        conn.execute("BEGIN")
        try:
            conn.executemany("INSERT OR IGNORE INTO blocks VALUES (?, ?, ?)", rows)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        self.stored_bytes += size

    def lookup(self, decode: Callable[[bytes], Any]) -> _DiskLookup:
        """A :class:`~repo_stream.walk.BlockLookup` over this store, decoding processed values."""
        return _DiskLookup(self._connection(), decode)

    def _reset_sync(self) -> None:
        conn = self._connection()
        conn.execute("DELETE FROM blocks")
        self.stored_bytes = 0

    async def reset(self) -> None:
        """Delete every stored block, keeping the file open for the next repo."""
        await self._run(self._reset_sync)

    # --- lifecycle ----------------------------------------------------------------------------

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        """Close the SQLite connection; remove the file if the store was opened without a path.

        Safe to call more than once, and shielded from cancellation so nothing is left open.
        """
        with anyio.CancelScope(shield=True):
            if self._conn is not None:
                await anyio.to_thread.run_sync(self._close_sync, limiter=self._limiter)
            if self._temp_dir is not None:
                temp_dir, self._temp_dir = self._temp_dir, None
                for name in os.listdir(temp_dir):
                    os.unlink(os.path.join(temp_dir, name))
                os.rmdir(temp_dir)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._conn is None

    async def __aenter__(self) -> DiskStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


_PREFETCH_SQL = {n: f"SELECT cid, processed, data FROM blocks WHERE cid IN ({', '.join('?' * n)})" for n in range(1, 65)}


class _DiskLookup:
    """Block look-ups for the walker, run inside the store's worker thread.

    When the walker expands a node it calls :meth:`prefetch` with the CIDs of the node's records
    and subtrees; they are fetched with one ``IN (...)`` query per 64 and held until used
    (about 40% less time than a query per block). Anything not prefetched is fetched alone.
    """

    __slots__ = ("_cur", "_decode", "_ready", "_raw_row")

    def __init__(self, conn: sqlite3.Connection, decode: Callable[[bytes], Any]) -> None:
        self._cur = conn.cursor()
        self._decode = decode
        # Fetched rows waiting to be used: bounded by the entries of the nodes on the walk's stack.
        self._ready: dict[bytes, tuple[int, Any]] = {}
        # The raw row :meth:`processed` just passed over, for the :meth:`raw` call that follows.
        self._raw_row: tuple[bytes, bytes] | None = None

    def prefetch(self, cids: list[bytes]) -> None:
        ready = self._ready
        execute = self._cur.execute
        for i in range(0, len(cids), 64):
            part = cids[i : i + 64]
            for cid, processed, data in execute(_PREFETCH_SQL[len(part)], part):
                ready[cid] = (processed, data)

    def _row(self, cid: bytes) -> tuple[int, Any] | None:
        row = self._ready.pop(cid, None)
        if row is None:
            row = self._cur.execute("SELECT processed, data FROM blocks WHERE cid = ?", (cid,)).fetchone()
        return row

    def node(self, cid: bytes) -> Any:
        row = self._row(cid)
        if row is None:
            return None
        return NOT_A_NODE if row[0] else row[1]

    def processed(self, cid: bytes, default: Any) -> Any:
        row = self._row(cid)
        if row is None:
            return default
        kind, data = row
        if kind == 2:
            return data
        if kind == 0:
            self._raw_row = (cid, data)
            return default
        try:
            return self._decode(data)
        except Exception as exc:
            raise DiskError(f"stored value of block {cid_str(cid)} cannot be decoded: {exc}") from exc

    def raw(self, cid: bytes) -> bytes | None:
        held = self._raw_row
        if held is not None and held[0] == cid:
            self._raw_row = None
            return held[1]
        row = self._row(cid)
        return row[1] if row is not None and row[0] == 0 else None
