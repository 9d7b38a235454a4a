"""Store sinks of a backfill: :class:`DuckdbSink`, :class:`ParquetSink` and :class:`PostgresSink`.

Each writes the columns :data:`~repo_stream.backfill.sinks.RECORD_COLUMNS` (``did, collection,
rkey, cid, rev, value``) of every record, ``value`` being the record's atproto JSON text
(:func:`repo_stream.records.json_text.transcode_json`, the C core's transcoder) or, with
``raw=True``, its DAG-CBOR bytes. A record block that is not valid DAG-CBOR fails its repo with
a :class:`~repo_stream.errors.RecordDecodeError` and nothing of that repo is kept.

Each follows :class:`~repo_stream.backfill.sinks.RepoSink`'s protocol: a repo's rows become
visible all at once in its ``finish`` (one database transaction, or files renamed into place),
before the backfill records it in its checkpoint; a repo that comes again replaces its rows.
Blocking store calls run in worker threads. Each needs its extra (``repo-stream[duckdb]``,
``[parquet]``, ``[postgresql]``) and, for the columns, pyarrow.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..core.commit import Commit
from ..errors import RepoStreamError, SinkError
from .checkpoint import Checkpoint
from .results import BackfillResult
from .sinks import REPO_STATUSES, RecordOp

__all__ = ["DuckdbSink", "ParquetSink", "PostgresCheckpoint", "PostgresSink", "pg_copy_batch", "pg_copy_rows", "record_table"]


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise SinkError("the store sinks need pyarrow: pip install 'repo-stream[parquet]'") from None
    return pyarrow


def _check_table(did: str, rev: str, items: list[Any], raw: bool) -> Any:
    """:func:`record_table` of a DID and rev."""
    from ..read.arrow import record_batch

    try:
        # The C core's columns (key, collection, rkey, cid, value): with JSON values the blocks are
        # transcoded straight into the value column's buffer (no str per record).
        batch = record_batch(items, json_values=False, transcode=not raw)
    except RepoStreamError as exc:
        raise type(exc)(f"{did}: {exc}") from exc
    return _batch_table(did, rev, batch)


def _batch_table(did: str, rev: str, batch: Any) -> Any:
    """A walker's batch (``key, collection, rkey, cid, value``) as a table of
    :data:`RECORD_COLUMNS`: ``did`` and ``rev`` made once for the batch, the rest its buffers."""
    pa = _pyarrow()
    n = batch.num_rows
    return pa.table(
        {
            "did": pa.repeat(pa.scalar(did, pa.string()), n),
            "collection": batch.column(1),
            "rkey": batch.column(2),
            "cid": batch.column(3),
            "rev": pa.repeat(pa.scalar(rev, pa.string()), n),
            "value": batch.column(4),
        }
    )


def record_table(commit: Commit, items: list[Any], raw: bool = False) -> Any:
    """A chunk of a repo's records as a ``pyarrow.Table`` of :data:`RECORD_COLUMNS`.

    Args:
        commit: the repo's commit (its DID and rev fill ``did`` and ``rev``).
        items: ``(key, cid, block)`` tuples as a :class:`RepoSink` receives them.
        raw: ``value`` as the blocks' bytes (``binary``) instead of their JSON text (``string``).

    Returns:
        A ``pyarrow.Table``: ``did``, ``rkey``, ``cid``, ``rev`` strings, ``collection``
        (``dictionary<int32, string>``: one entry per collection run) and ``value``;
        ``len(items)`` rows in the items' order. The C core builds the columns (the JSON texts
        transcoded into the value column's buffer); ``did`` and ``rev`` are made once per table.

    Raises:
        RecordDecodeError: a block is not valid DAG-CBOR (JSON values only), naming the DID,
            the block's size and the offset.
        SinkError: pyarrow is not installed.
    """
    return _check_table(commit.did, commit.rev, items, raw)


class _Pending:
    """Each open repo's records not yet written, until they make a batch of ``batch_rows``."""

    def __init__(self, batch_rows: int) -> None:
        self.batch_rows = batch_rows
        self.items: dict[tuple[str, str], list[Any]] = {}

    def add(self, key: tuple[str, str], items: list[Any]) -> list[Any] | None:
        """Add ``items``; the repo's pending items when they reach a batch, else None."""
        pending = self.items.get(key)
        if pending is None:
            pending = self.items[key] = []
        pending.extend(items)
        if len(pending) < self.batch_rows:
            return None
        return self.take(key)

    def take(self, key: tuple[str, str]) -> list[Any] | None:
        """The repo's pending items (None if none), forgotten here."""
        return self.items.pop(key, None) or None


class _Background:
    """A store write per repo running in a thread while the walk gathers the repo's next batch
    (at most one in flight per repo: its batches stay in order and memory stays two batches)."""

    def __init__(self) -> None:
        self._pool: Any = None
        self._running: dict[Any, Any] = {}
        self._lock = threading.Lock()

    async def submit(self, key: Any, fn: Any, *args: Any) -> None:
        """Wait for ``key``'s write in flight (raising its error), then start ``fn(*args)``."""
        await self.wait(key)
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="repo-stream-sink")
            self._running[key] = self._pool.submit(fn, *args)

    async def wait(self, key: Any) -> None:
        """Wait for ``key``'s write in flight, if any; raise its error."""
        future = self._running.get(key)
        if future is not None:
            try:
                await anyio.to_thread.run_sync(future.result)
            finally:
                if future.done():
                    self._running.pop(key, None)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            self._running.clear()


async def _settle(background: _Background, key: Any) -> Exception | None:
    """Wait for ``key``'s write in flight; its error, if it failed."""
    try:
        await background.wait(key)
    except Exception as exc:
        return exc
    return None


def _data(commit: Commit) -> str:
    return str(commit.data)


def _op_items(ops: Sequence[RecordOp], did: str) -> tuple[list[Any], list[tuple[str, str]]]:
    """One commit's ops as the upserts ``(key, cid, block)`` in key order and the deleted
    ``(collection, rkey)``; a key's last op wins.

    Raises:
        SinkError: an op's action is unknown, or a create/update lacks its CID or block.
    """
    last: dict[tuple[str, str], RecordOp] = {}
    for op in ops:
        if op.action not in ("create", "update", "delete"):
            raise SinkError(f"{did}: op {op.collection}/{op.rkey}: unknown action {op.action!r}")
        if op.action != "delete" and (op.cid is None or op.value is None):
            raise SinkError(f"{did}: {op.action} of {op.collection}/{op.rkey} has no CID or block")
        last[(op.collection, op.rkey)] = op
    upserts = sorted((f"{c}/{r}", op.cid, op.value) for (c, r), op in last.items() if op.action != "delete")
    deletes = [key for key, op in last.items() if op.action == "delete"]
    return upserts, deletes


def _check_status(did: str, status: str) -> None:
    if status not in REPO_STATUSES:
        raise SinkError(f"{did}: status {status!r} is not one of {', '.join(REPO_STATUSES)}")


# -- DuckDB -----------------------------------------------------------------------------------

#: DuckDB's row group (rows): the default batch of :class:`DuckdbSink`.
_DUCKDB_ROW_GROUP = 122880


def _duckdb() -> Any:
    try:
        import duckdb
    except ImportError:
        raise SinkError("--out duckdb: needs the duckdb extra: pip install 'repo-stream[duckdb]'") from None
    return duckdb


def _json_column(table: Any) -> Any:
    """``table`` with its ``value`` column (JSON texts, ``string``) typed as Arrow's JSON
    extension type (``arrow.json``, pyarrow 19 and later), which DuckDB takes as its ``JSON``
    type as it is (DuckDB 1.2 and later): the texts, made by the transcoder, are not parsed again
    to be validated. Unchanged with an older pyarrow (DuckDB then casts the strings to ``JSON``,
    validating them)."""
    pa = _pyarrow()
    json_type = getattr(pa, "json_", None)
    if json_type is None:
        return table
    index = table.schema.get_field_index("value")
    kind = json_type()
    column = pa.chunked_array([pa.ExtensionArray.from_storage(kind, chunk) for chunk in table.column(index).chunks], type=kind)
    return table.set_column(index, pa.field("value", kind, nullable=table.schema.field(index).nullable), column)


class DuckdbSink:
    """Writes records into a DuckDB database file (``--out duckdb:FILE``).

    Tables (created if missing)::

        records(did VARCHAR, collection VARCHAR, rkey VARCHAR, cid VARCHAR, rev VARCHAR,
                value JSON (BLOB with raw), PRIMARY KEY (did, collection, rkey))
        repos(did VARCHAR PRIMARY KEY, rev VARCHAR, data VARCHAR, status VARCHAR, updated TIMESTAMPTZ)

    Backfill (:class:`~repo_stream.backfill.sinks.RepoSink`): each repo is one transaction on
    its own cursor: its earlier rows are deleted, its records are gathered into batches of
    ``batch_rows`` (the C core writes each batch's Arrow columns, JSON texts included, with no
    Python object per record), each batch is inserted with one ``INSERT ... SELECT`` from the
    Arrow table (in a thread, while the walk gathers the next batch), and ``finish`` writes the
    repo's ``repos`` row (``status`` ``active``, ``data`` the MST root CID) and commits. A crash
    (even ``kill -9``) leaves each repo either fully in or not at all.

    Sync (:class:`~repo_stream.backfill.sinks.EventSink`): :meth:`apply` upserts a commit's
    creates and updates, deletes its deletes and sets the repo's ``repos`` row (rev, data,
    ``active``) in one transaction; :meth:`set_status` sets the ``status``. A resync is a
    backfill of the repo (its rows replaced).

    One process at a time opens the file (DuckDB's lock): not for ``processes > 1``.

    Args:
        path: the database file (created if missing).
        raw: store the DAG-CBOR bytes instead of the JSON text.
        batch_rows: records gathered (per repo) into one insert (default 122,880: DuckDB's
            row group, so that each insert fills whole row groups, which DuckDB writes to the
            file during the insert, in the sink's thread beside the walk, rather than all at
            ``COMMIT``).
        compress: compress ``value`` with zstd (``USING COMPRESSION zstd``). ``False``: store
            it uncompressed (commits faster, the file about 1.7x larger). Either way ``rkey``
            and ``cid`` are stored uncompressed (nearly unique: DuckDB's default ``DICT_FSST``
            costs more time at ``COMMIT`` than it saves space) and ``did``, ``collection`` and
            ``rev`` get DuckDB's default (one value per run: nearly free). Applies when the
            ``records`` table is created (DuckDB keeps a column's compression in its catalog).

    A context manager: leaving it (or :meth:`close`) closes the database, so that other
    connections with other settings (``read_only=True``) can open it.
    """

    keyed_by_did = True

    def __init__(
        self, path: str | os.PathLike[str], raw: bool = False, batch_rows: int = _DUCKDB_ROW_GROUP, compress: bool = True
    ) -> None:
        self.path = os.fspath(path)
        self.raw = raw
        self.compress = compress
        self.batch_rows = batch_rows
        self._conn: Any = None
        self._open: dict[tuple[str, str], Any] = {}
        self._pending = _Pending(batch_rows)
        self._background = _Background()
        self._lock = anyio.Lock()
        duckdb = _duckdb()  # a missing extra fails here; and the module is loaded before the walk, not in it
        _pyarrow()
        # Arrow's JSON extension type as DuckDB's JSON: DuckDB 1.2 and later (with pyarrow 19+).
        version = tuple(int(part) for part in re.findall(r"\d+", duckdb.__version__)[:2])
        self._json_extension = version >= (1, 2)

    def _db(self) -> Any:
        if self._conn is None:
            duckdb = _duckdb()
            try:
                conn = duckdb.connect(self.path)
                value = "BLOB" if self.raw else "JSON"
                plain, packed = " USING COMPRESSION uncompressed", f" USING COMPRESSION {'zstd' if self.compress else 'uncompressed'}"
                create = (
                    "CREATE TABLE IF NOT EXISTS records (did VARCHAR NOT NULL, collection VARCHAR NOT NULL, "
                    "rkey VARCHAR NOT NULL{plain}, cid VARCHAR NOT NULL{plain}, rev VARCHAR NOT NULL, value {value}{packed}, "
                    "PRIMARY KEY (did, collection, rkey))"
                )
                try:
                    conn.execute(create.format(plain=plain, value=value, packed=packed))
                except duckdb.Error:  # a DuckDB before 1.2 (no zstd for strings): its defaults
                    conn.execute(create.format(plain="", value=value, packed=""))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS repos (did VARCHAR PRIMARY KEY, rev VARCHAR, data VARCHAR, status VARCHAR, updated TIMESTAMPTZ)"
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS sync_cursor (stream VARCHAR PRIMARY KEY, seq BIGINT NOT NULL, updated TIMESTAMPTZ)"
                )
            except duckdb.Error as exc:
                raise SinkError(f"duckdb {self.path}: {exc}") from exc
            self._conn = conn
        return self._conn

    def _cursor(self, did: str) -> Any:
        import duckdb

        try:
            cursor = self._db().cursor()
            cursor.execute("BEGIN TRANSACTION")
        except duckdb.Error as exc:
            raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc
        return cursor

    def _begin(self, did: str) -> Any:
        import duckdb

        cursor = self._cursor(did)
        try:
            # A DID's records and its repos row commit together (backfill and sync alike), so a DID
            # with no repos row has no records: skip the DELETE, which scans the whole table.
            if cursor.execute("SELECT 1 FROM repos WHERE did = ?", [did]).fetchone() is not None:
                cursor.execute("DELETE FROM records WHERE did = ?", [did])
        except duckdb.Error as exc:
            cursor.close()
            raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc
        return cursor

    @property
    def batch_values(self) -> str:
        """What the backfill's batches carry as ``value`` (:class:`~repo_stream.backfill.sinks.RepoSink`):
        ``"raw"`` with ``raw``, else ``"json_text"``."""
        return "raw" if self.raw else "json_text"

    def _insert(self, cursor: Any, did: str, rev: str, items: list[Any], replace: bool = False) -> None:
        self._insert_table(cursor, did, _check_table(did, rev, items, self.raw), replace)

    def _insert_table(self, cursor: Any, did: str, table: Any, replace: bool = False) -> None:
        import duckdb

        verb = "INSERT OR REPLACE" if replace else "INSERT"
        if not self.raw and self._json_extension:
            table = _json_column(table)
        try:
            cursor.register("repo_stream_chunk", table)
            try:
                cursor.execute(f"{verb} INTO records SELECT did, collection, rkey, cid, rev, value FROM repo_stream_chunk")
            finally:
                cursor.unregister("repo_stream_chunk")
        except duckdb.Error as exc:
            raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc

    def _end(
        self, cursor: Any, did: str, repo: tuple[str, str] | None, keep: bool, stream: tuple[str, int] | None = None
    ) -> None:
        import duckdb

        try:
            if keep:
                if repo is not None:
                    cursor.execute("INSERT OR REPLACE INTO repos VALUES (?, ?, ?, 'active', now())", [did, *repo])
                if stream is not None:
                    cursor.execute("INSERT OR REPLACE INTO sync_cursor VALUES (?, ?, now())", [stream[0], stream[1]])
                cursor.execute("COMMIT")
            else:
                cursor.execute("ROLLBACK")
        except duckdb.Error as exc:
            raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc
        finally:
            cursor.close()

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        key = (source, commit.did)
        cursor = self._open.get(key)
        if cursor is None:
            async with self._lock:  # one opener of the database
                cursor = self._open[key] = await anyio.to_thread.run_sync(self._begin, commit.did)
        batch = self._pending.add(key, items)
        if batch is not None:
            await self._background.submit(key, self._insert, cursor, commit.did, commit.rev, batch)

    async def write_batch(self, source: str, commit: Commit, batch: Any) -> None:
        """A walker's Arrow batch of the repo's records (:class:`~repo_stream.backfill.sinks.RepoSink`:
        ``value`` as :attr:`batch_values` says), inserted in a thread with one ``INSERT ... SELECT``
        while the walk makes the next batch."""
        key = (source, commit.did)
        cursor = self._open.get(key)
        if cursor is None:
            async with self._lock:
                cursor = self._open[key] = await anyio.to_thread.run_sync(self._begin, commit.did)
        rest = self._pending.take(key)
        if rest is not None:  # tuple chunks of the repo before (kept in order)
            await self._background.submit(key, self._insert, cursor, commit.did, commit.rev, rest)
        await self._background.submit(key, self._insert_table, cursor, commit.did, _batch_table(commit.did, commit.rev, batch))

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Commit the repo's transaction with its ``repos`` row (success), or roll it back.

        Raises:
            SinkError: a write of the repo failed (then rolled back).
        """
        key = (source, commit.did)
        rest = self._pending.take(key)
        with anyio.CancelScope(shield=True):
            failed = await _settle(self._background, key)
            cursor = self._open.pop(key, None)
            if cursor is None:
                if error is None and failed is None:
                    async with self._lock:
                        cursor = await anyio.to_thread.run_sync(self._begin, commit.did)  # an empty repo
            keep = error is None and failed is None
            if cursor is not None:
                if keep and rest is not None:
                    try:
                        await anyio.to_thread.run_sync(self._insert, cursor, commit.did, commit.rev, rest)
                    except BaseException:
                        await anyio.to_thread.run_sync(self._end, cursor, commit.did, None, False)
                        raise
                await anyio.to_thread.run_sync(self._end, cursor, commit.did, (commit.rev, _data(commit)), keep)
        if failed is not None and error is None:
            raise failed

    # -- sync events (EventSink) --

    def _apply(self, did: str, rev: str, data: str, ops: Sequence[RecordOp], stream: tuple[str, int] | None) -> None:
        import duckdb

        upserts, deletes = _op_items(ops, did)
        cursor = self._cursor(did)
        try:
            if upserts:
                self._insert(cursor, did, rev, upserts, replace=True)
            if deletes:
                cursor.executemany(
                    "DELETE FROM records WHERE did = ? AND collection = ? AND rkey = ?", [[did, c, r] for c, r in deletes]
                )
        except BaseException as exc:
            self._end(cursor, did, None, False)
            if isinstance(exc, duckdb.Error):
                raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc
            raise
        self._end(cursor, did, (rev, data), True, stream)

    async def apply(
        self, did: str, rev: str, data: str, ops: Sequence[RecordOp], *, cursor: tuple[str, int] | None = None
    ) -> None:
        """Apply one sync commit in one transaction: creates and updates upsert their rows
        (``value`` the record's JSON text, or its block with ``raw``), deletes delete theirs,
        the repo's ``repos`` row gets ``rev``, ``data`` and status ``active``, and
        (``cursor=(stream, seq)``) ``sync_cursor`` the seq (:meth:`load_cursor`).

        Args:
            did: the repo's DID.
            rev: the commit's rev (TID); the rows' ``rev``.
            data: the commit's MST root CID (base32 str).
            ops: the commit's ops (:class:`~repo_stream.backfill.sinks.RecordOp`); a key's last
                op wins.

        Raises:
            RecordDecodeError: a block is not valid DAG-CBOR (nothing of the commit applied).
            SinkError: the database failed, or an op is malformed.
        """
        with anyio.CancelScope(shield=True):  # a commit is all in or not at all
            async with self._lock:
                await anyio.to_thread.run_sync(self._apply, did, rev, data, ops, cursor)

    def _set_status(self, did: str, status: str, stream: tuple[str, int] | None) -> None:
        import duckdb

        cursor = self._cursor(did)
        try:
            cursor.execute(
                "INSERT INTO repos (did, status, updated) VALUES (?, ?, now()) "
                "ON CONFLICT (did) DO UPDATE SET status = excluded.status, updated = excluded.updated",
                [did, status],
            )
        except duckdb.Error as exc:
            self._end(cursor, did, None, False)
            raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc
        self._end(cursor, did, None, True, stream)

    async def set_status(self, did: str, status: str, *, cursor: tuple[str, int] | None = None) -> None:
        """Set the repo's ``repos.status`` (one of :data:`~repo_stream.backfill.sinks.REPO_STATUSES`;
        a repo not yet there gets a row with no rev), and (``cursor=(stream, seq)``)
        ``sync_cursor``, in one transaction. Its records are kept.

        Raises:
            SinkError: an unknown status, or the database failed.
        """
        _check_status(did, status)
        with anyio.CancelScope(shield=True):
            async with self._lock:
                await anyio.to_thread.run_sync(self._set_status, did, status, cursor)

    async def load_cursor(self, stream: str) -> int | None:
        """The seq stored for ``stream`` by :meth:`apply` / :meth:`set_status`, or None.

        Raises:
            SinkError: the database failed.
        """
        import duckdb

        def run() -> int | None:
            try:
                with self._db().cursor() as cursor:
                    row = cursor.execute("SELECT seq FROM sync_cursor WHERE stream = ?", [stream]).fetchone()
            except duckdb.Error as exc:
                raise SinkError(f"duckdb {self.path}: cursor {stream}: {exc}") from exc
            return None if row is None else int(row[0])

        async with self._lock:
            return await anyio.to_thread.run_sync(run)

    def __enter__(self) -> DuckdbSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (open transactions roll back)."""
        self._background.close()
        for cursor in self._open.values():
            cursor.close()
        self._open.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- Parquet ----------------------------------------------------------------------------------

#: The Parquet files' dictionary-encoded columns (the others: plain, then zstd).
_DICTIONARY_COLUMNS = ["did", "collection", "rev"]

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def _file_name(name: str) -> str:
    """``name`` as one path component: itself when plainly safe, else ``_`` and its hex."""
    if _SAFE_NAME.fullmatch(name) and len(name) <= 200:
        return name
    return "_" + name.encode("utf-8", "surrogateescape").hex()[:200]


@dataclass
class _ParquetFile:
    path: str
    writer: Any
    pending: list[Any] = field(default_factory=list)
    rows: int = 0
    bytes: int = 0
    complete: bool = False  # written, closed and fsynced (the repo's walk is past its collection)


class ParquetSink:
    """Writes records as Parquet files, one per repo and collection (``--out parquet:DIR``):
    ``DIR/<collection>/<did>.parquet``, zstd-compressed, row groups of up to ``row_group_rows``
    rows (fewer when their values pass ``row_group_mb``), columns ``did, collection, rkey, cid,
    rev, value`` (``value`` the JSON text as ``string``, or with ``raw`` the block as ``binary``).

    Records are gathered into batches of ``batch_rows`` per repo; the C core writes each batch's
    Arrow columns (JSON texts included, no Python object per record) and a thread writes it
    while the walk gathers the next.

    A repo's files are written as ``.parquet.part`` and, in ``finish``, fsynced and renamed into
    place (then their folders fsynced), before the repo's result is recorded in the checkpoint;
    a failed repo's ``.part`` files are removed. A crash leaves only complete ``.parquet`` files
    (and maybe ``.part`` files, which readers skip: read ``DIR/*/*.parquet``). Files are atomic,
    a repo is not: a crash during a repo's renames can leave some of its collections' new files
    in place and others not, but that repo is not in the checkpoint, and the resumed run rewrites
    it (for a store where a repo is all in or not at all, use DuckDB or PostgreSQL). A repo that comes
    again replaces its files (those of collections it no longer has are removed). Memory: the pending row group of each open file.

    Sync events (:class:`~repo_stream.backfill.sinks.EventSink`; Parquet files are append-only,
    so a commit is written as change rows, not applied in place):

    - :meth:`apply` writes ``DIR/_sync/changes/<did>/<rev>.parquet``: the commit's ops as rows
      ``did, collection, rkey, cid, rev, value, action`` (``action`` ``create``, ``update`` or
      ``delete``; ``cid`` and ``value`` null for a delete), written as ``.part``, fsynced and
      renamed (the file is the commit: all of it or nothing), then the repo's state file;
    - the repo's state, ``DIR/_sync/repos/<did>.parquet``: one row ``did, rev, data, status,
      updated, base_rev`` (``base_rev`` the rev of the repo's backfilled files), rewritten
      atomically by ``finish`` (``active``), :meth:`apply` (rev, data, ``active``) and
      :meth:`set_status`;
    - a resync is a backfill of the repo: its files are replaced, ``base_rev`` set to its rev and
      its change files up to that rev removed.

    A repo's current records are its files' rows overlaid with its change rows of a rev above
    ``base_rev``, the highest rev winning per key, deletes removing (``docs/guide/storing-records.md``
    has the query). ``DIR/*/*.parquet`` matches only the backfilled files.

    Args:
        directory: the output folder (created if missing).
        raw: store the DAG-CBOR bytes instead of the JSON text.
        row_group_rows: rows per row group, at most.
        row_group_mb: MiB of pending values that close a row group early.
        batch_rows: records gathered (per repo) into one Arrow table.
    """

    keyed_by_did = True

    def __init__(
        self,
        directory: str | os.PathLike[str],
        raw: bool = False,
        row_group_rows: int = 131072,
        row_group_mb: float = 32,
        batch_rows: int = 65536,
    ) -> None:
        self.directory = os.fspath(directory)
        self.raw = raw
        self.row_group_rows = row_group_rows
        self.row_group_bytes = int(row_group_mb * 1024 * 1024)
        self.batch_rows = batch_rows
        self._open: dict[tuple[str, str], dict[str, _ParquetFile]] = {}
        self._pending = _Pending(batch_rows)
        self._background = _Background()
        self._repo_lock = threading.Lock()
        _pyarrow()  # a missing extra fails here; and the modules are loaded before the walk, not in it
        import pyarrow.parquet  # noqa: F401

    def __getstate__(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "raw": self.raw,
            "rows": self.row_group_rows,
            "bytes": self.row_group_bytes,
            "batch": self.batch_rows,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["raw"], state["rows"], state["bytes"] / 1024 / 1024, state["batch"])  # type: ignore[misc]

    def path(self, collection: str, did: str) -> str:
        """The file of ``did``'s records of ``collection``."""
        return os.path.join(self.directory, _file_name(collection), _file_name(did) + ".parquet")

    def _changes_dir(self, did: str) -> str:
        return os.path.join(self.directory, "_sync", "changes", _file_name(did))

    def _repo_path(self, did: str) -> str:
        return os.path.join(self.directory, "_sync", "repos", _file_name(did) + ".parquet")

    @property
    def batch_values(self) -> str:
        """What the backfill's batches carry as ``value`` (:class:`~repo_stream.backfill.sinks.RepoSink`):
        ``"raw"`` with ``raw``, else ``"json_text"``."""
        return "raw" if self.raw else "json_text"

    def _write(self, files: dict[str, _ParquetFile], did: str, rev: str, items: list[Any]) -> None:
        self._write_table(files, did, _check_table(did, rev, items, self.raw))

    def _write_table(self, files: dict[str, _ParquetFile], did: str, table: Any) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        collection = table.column("collection").combine_chunks()
        names = collection.dictionary.to_pylist()
        # Each collection is one run in key order: the dictionary's indices are runs 0, 1, 2, ...
        runs = pc.run_end_encode(collection.indices)
        start = 0
        try:
            for index, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
                name = names[index]
                part = table.slice(start, end - start)
                part = part.set_column(1, "collection", pa.repeat(pa.scalar(name, pa.string()), end - start))
                start = end
                file = files.get(name)
                if file is not None and file.complete:  # cannot be: a collection's keys are one run
                    raise SinkError(f"parquet {self.directory}: {did}: the records of {name} are not in key order")
                if file is None:
                    path = self.path(name, did)
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    # Dictionary pages only for the columns of one value per file (did, collection,
                    # rev): rkey, cid and value are (nearly) unique, their dictionaries wasted work.
                    writer = pq.ParquetWriter(path + ".part", part.schema, compression="zstd", use_dictionary=_DICTIONARY_COLUMNS)
                    file = files[name] = _ParquetFile(path, writer)
                file.pending.append(part)
                file.rows += part.num_rows
                file.bytes += part.column("value").nbytes
                if file.rows >= self.row_group_rows or file.bytes >= self.row_group_bytes:
                    self._flush(file)
            # Records come in key order, so the collections before the batch's last are complete:
            # their files are finished now (in this thread, while the walk goes on), not in finish.
            for index in runs.values.to_pylist()[:-1]:
                self._complete(files[names[index]])
        except OSError as exc:
            raise SinkError(f"parquet {self.directory}: {did}: {exc}") from exc

    def _complete(self, file: _ParquetFile) -> None:
        """Write the file's pending rows, close it and fsync it (renamed in ``finish``)."""
        self._flush(file)
        file.writer.close()
        fd = os.open(file.path + ".part", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        file.complete = True

    def _flush(self, file: _ParquetFile) -> None:
        import pyarrow as pa

        if file.pending:
            file.writer.write_table(pa.concat_tables(file.pending), row_group_size=max(file.rows, 1))
        file.pending, file.rows, file.bytes = [], 0, 0

    def _close(self, files: dict[str, _ParquetFile], did: str, rev: str, data: str, keep: bool) -> None:
        folders = set()
        try:
            for file in files.values():
                if keep and not file.complete:
                    self._complete(file)
                file.writer.close()
            for file in files.values():
                part = file.path + ".part"
                if keep:
                    os.replace(part, file.path)
                    folders.add(os.path.dirname(file.path))
                else:
                    try:
                        os.unlink(part)
                    except FileNotFoundError:
                        pass
            if keep:  # the repo's files of collections it no longer has (an earlier version's)
                name = _file_name(did) + ".parquet"
                written = {file.path for file in files.values()}
                for entry in os.scandir(self.directory) if os.path.isdir(self.directory) else []:
                    stale = os.path.join(entry.path, name)
                    if entry.is_dir() and stale not in written and os.path.exists(stale):
                        os.unlink(stale)
                        folders.add(entry.path)
            if keep:
                self._write_repo(did, rev, data, "active", rev)
                changes = self._changes_dir(did)
                for entry in os.scandir(changes) if os.path.isdir(changes) else []:  # superseded by the resync
                    if entry.name.endswith(".parquet") and entry.name.removesuffix(".parquet") <= _file_name(rev):
                        os.unlink(entry.path)
                        folders.add(changes)
            for folder in folders:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise SinkError(f"parquet {self.directory}: {did}: {exc}") from exc

    def _write_file(self, path: str, table: Any) -> None:
        """``table`` as the Parquet file ``path``: written as ``.part``, fsynced, renamed, its
        folder fsynced."""
        import pyarrow.parquet as pq

        os.makedirs(os.path.dirname(path), exist_ok=True)
        pq.write_table(table, path + ".part", compression="zstd")
        fd = os.open(path + ".part", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(path + ".part", path)
        fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write_repo(self, did: str, rev: str | None, data: str | None, status: str, base_rev: str | None) -> None:
        """Rewrite the repo's state file; ``None`` keeps a column's value (or null)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = self._repo_path(did)
        with self._repo_lock:
            old: dict[str, Any] = {}
            if os.path.exists(path):
                old = pq.read_table(path).to_pylist()[0]
            row = {
                "did": did,
                "rev": rev if rev is not None else old.get("rev"),
                "data": data if data is not None else old.get("data"),
                "status": status,
                "updated": int(time.time() * 1_000_000),
                "base_rev": base_rev if base_rev is not None else old.get("base_rev"),
            }
            schema = pa.schema(
                [
                    ("did", pa.string()),
                    ("rev", pa.string()),
                    ("data", pa.string()),
                    ("status", pa.string()),
                    ("updated", pa.timestamp("us", tz="UTC")),
                    ("base_rev", pa.string()),
                ]
            )
            self._write_file(path, pa.Table.from_pylist([row], schema=schema))

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        key = (source, commit.did)
        files = self._open.setdefault(key, {})
        batch = self._pending.add(key, items)
        if batch is not None:
            await self._background.submit(key, self._write, files, commit.did, commit.rev, batch)

    async def write_batch(self, source: str, commit: Commit, batch: Any) -> None:
        """A walker's Arrow batch of the repo's records (:class:`~repo_stream.backfill.sinks.RepoSink`:
        ``value`` as :attr:`batch_values` says), written to its files in a thread while the walk
        makes the next batch."""
        key = (source, commit.did)
        files = self._open.setdefault(key, {})
        rest = self._pending.take(key)
        if rest is not None:  # tuple chunks of the repo before (kept in order)
            await self._background.submit(key, self._write, files, commit.did, commit.rev, rest)
        await self._background.submit(key, self._write_table, files, commit.did, _batch_table(commit.did, commit.rev, batch))

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Complete and rename the repo's files (success), or remove them.

        Raises:
            SinkError: a write of the repo failed (its files then removed).
        """
        key = (source, commit.did)
        rest = self._pending.take(key)
        with anyio.CancelScope(shield=True):
            failed = await _settle(self._background, key)
            files = self._open.pop(key, None)
            if files is None and error is not None:
                return
            files = files or {}
            keep = error is None and failed is None
            if keep and rest is not None:
                try:
                    await anyio.to_thread.run_sync(self._write, files, commit.did, commit.rev, rest)
                except BaseException:
                    await anyio.to_thread.run_sync(self._close, files, commit.did, commit.rev, _data(commit), False)
                    raise
            await anyio.to_thread.run_sync(self._close, files, commit.did, commit.rev, _data(commit), keep)
        if failed is not None and error is None:
            raise failed

    # -- sync events (EventSink) --

    def _apply(self, did: str, rev: str, data: str, ops: Sequence[RecordOp]) -> None:
        import pyarrow as pa

        upserts, deletes = _op_items(ops, did)
        actions = {(op.collection, op.rkey): op.action for op in ops}
        table = _check_table(did, rev, upserts, self.raw)
        rows = {
            "did": table.column("did").to_pylist() + [did] * len(deletes),
            "collection": table.column("collection").cast(pa.string()).to_pylist() + [c for c, _ in deletes],
            "rkey": table.column("rkey").to_pylist() + [r for _, r in deletes],
            "cid": table.column("cid").to_pylist() + [None] * len(deletes),
            "rev": [rev] * (len(upserts) + len(deletes)),
            "value": table.column("value").to_pylist() + [None] * len(deletes),
        }
        rows["action"] = [actions[(c, r)] for c, r in zip(rows["collection"], rows["rkey"], strict=True)]
        schema = pa.schema(
            [
                ("did", pa.string()),
                ("collection", pa.string()),
                ("rkey", pa.string()),
                ("cid", pa.string()),
                ("rev", pa.string()),
                ("value", pa.binary() if self.raw else pa.string()),
                ("action", pa.string()),
            ]
        )
        try:
            self._write_file(os.path.join(self._changes_dir(did), _file_name(rev) + ".parquet"), pa.table(rows, schema=schema))
            self._write_repo(did, rev, data, "active", None)
        except OSError as exc:
            raise SinkError(f"parquet {self.directory}: {did}: {exc}") from exc

    async def apply(self, did: str, rev: str, data: str, ops: Sequence[RecordOp]) -> None:
        """Write one sync commit's ops as the change file ``_sync/changes/<did>/<rev>.parquet``
        (class docstring), then set the repo's state (rev, data, ``active``).

        Raises:
            RecordDecodeError: a block is not valid DAG-CBOR (nothing written).
            SinkError: a file cannot be written, or an op is malformed.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._apply, did, rev, data, ops)

    async def set_status(self, did: str, status: str) -> None:
        """Set the repo's ``status`` in its state file ``_sync/repos/<did>.parquet``.

        Raises:
            SinkError: an unknown status, or the file cannot be written.
        """
        _check_status(did, status)

        def run() -> None:
            try:
                self._write_repo(did, None, None, status, None)
            except OSError as exc:
                raise SinkError(f"parquet {self.directory}: {did}: {exc}") from exc

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(run)

    def close(self) -> None:
        """Stop the writer threads."""
        self._background.close()


# -- PostgreSQL -------------------------------------------------------------------------------

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    did text COLLATE "C" NOT NULL, collection text COLLATE "C" NOT NULL, rkey text COLLATE "C" NOT NULL, cid text NOT NULL, rev text NOT NULL,
    value {value}, PRIMARY KEY (did, collection, rkey)
);
CREATE TABLE IF NOT EXISTS repos (did text PRIMARY KEY, rev text, data text, status text, updated timestamptz);
CREATE TABLE IF NOT EXISTS sync_cursor (stream text PRIMARY KEY, seq bigint NOT NULL, updated timestamptz);
CREATE TABLE IF NOT EXISTS backfill_checkpoint (
    source text PRIMARY KEY, did text, rev text, outcome text NOT NULL, error text, records bigint NOT NULL,
    record_bytes bigint NOT NULL, spilled boolean NOT NULL, seconds double precision NOT NULL, finished_at double precision NOT NULL
);
"""


#: PostgreSQL's binary COPY header (signature, flags, no extension) and trailer.
_PG_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_PG_TRAILER = b"\xff\xff"


def _pg_copy_rows_reference(items: list[Any], did: str, rev: str, jsonb: bool) -> bytes:
    """:func:`pg_copy_rows` in pure Python (the reference the C core mirrors)."""
    import struct

    from ..records.json_text import json_text_processor

    transcode = json_text_processor()
    out = bytearray()
    head = struct.Struct(">hi")
    length = struct.Struct(">i")
    fixed_did, fixed_rev = did.encode("utf-8", "surrogatepass"), rev.encode("utf-8", "surrogatepass")
    for item in items:
        if not (
            isinstance(item, tuple)
            and len(item) == 3
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and isinstance(item[2], bytes)
        ):
            raise TypeError("pg_copy_rows: items are (key: str, cid: str, block: bytes) tuples")
        key, cid, block = item
        collection, slash, rkey = key.partition("/")
        if not slash:
            raise ValueError(f"pg_copy_rows: key {key!r} has no '/'")
        value = b"\x01" + transcode(block).encode("utf-8") if jsonb else block
        out += head.pack(6, len(fixed_did)) + fixed_did
        for column in (collection.encode(), rkey.encode(), cid.encode(), fixed_rev, value):
            out += length.pack(len(column)) + column
    return bytes(out)


def pg_copy_rows(items: list[Any], did: str, rev: str, jsonb: bool) -> bytes:
    """The rows of PostgreSQL's binary ``COPY`` format (no header or trailer) of the columns
    ``did, collection, rkey, cid, rev, value`` for a chunk of a repo's records, built in one
    pass by the C core (no Python object per record).

    Args:
        items: ``(key, cid, block)`` tuples as a :class:`RepoSink` receives them.
        did, rev: the repo's DID and rev (the same in every row).
        jsonb: ``value`` is the record's JSON text as ``jsonb`` (format version 1); else the
            block's bytes as ``bytea``.

    Returns:
        The rows, to put between ``COPY ... (FORMAT BINARY)``'s header and trailer.

    Raises:
        RecordDecodeError: a block is not valid DAG-CBOR (``jsonb`` only), naming the DID, the
            block's size and the offset.
        TypeError: an item is not ``(str, str, bytes)``.
        ValueError: a key has no ``/``.

    Spec: PostgreSQL, COPY, "Binary Format"; jsonb's binary form is a version byte (1) and the text.
    """
    from ..core import implementation

    try:
        if implementation.backend().name == "c":
            from .. import _native

            rows: bytes = _native.pg_copy_rows(items, did, rev, jsonb)
            return rows
        return _pg_copy_rows_reference(items, did, rev, jsonb)
    except RepoStreamError as exc:
        raise type(exc)(f"{did}: {exc}") from exc


def pg_copy_batch(batch: Any, did: str, rev: str, jsonb: bool) -> Any:
    """:func:`pg_copy_rows`'s rows (the same bytes) of a walker's Arrow batch
    (:mod:`repo_stream.read.arrow`: ``key, collection, rkey, cid, value``), made column by column
    with pyarrow's compute kernels (one concatenation per row over the columns' buffers, the
    length prefixes computed as arrays: no Python object per record, and the GIL released).

    Args:
        batch: a ``pyarrow.RecordBatch`` of ``driver.next_batch``: ``value`` the records' JSON
            text (``utf8``) with ``jsonb``, else their blocks (``binary``).
        did, rev: the repo's DID and rev (the same in every row).
        jsonb: ``value`` as ``jsonb`` (format version 1, then the text); else ``bytea``.

    Returns:
        The rows as a bytes-like object (a ``memoryview`` of the Arrow buffer that holds them).

    Raises:
        TypeError: ``value`` is not ``utf8`` with ``jsonb``, or not ``binary`` without.

    Spec: PostgreSQL, COPY, "Binary Format".
    """
    import array
    import struct
    import sys

    pa = _pyarrow()
    import pyarrow.compute as pc

    n = batch.num_rows
    value = batch.column(4)
    if value.type != (pa.utf8() if jsonb else pa.binary()):
        raise TypeError(f"pg_copy_batch: value is {value.type}, not {'utf8' if jsonb else 'binary'}")
    if n == 0:
        return b""

    def prefixed(column: Any, plus: int = 0) -> list[Any]:
        """The column's big-endian int32 length prefixes (plus ``plus``) and its bytes."""
        lengths = pc.binary_length(column)
        if plus:
            lengths = pc.add(lengths, pa.scalar(plus, pa.int32()))
        be = array.array("i")
        be.frombytes(memoryview(lengths.buffers()[1])[lengths.offset * 4 : (lengths.offset + n) * 4])
        if sys.byteorder == "little":
            be.byteswap()
        prefix = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4), n, [None, pa.py_buffer(be)])
        return [prefix.cast(pa.large_binary()), column.cast(pa.large_binary())]

    did_bytes, rev_bytes = did.encode("utf-8", "surrogatepass"), rev.encode("utf-8", "surrogatepass")
    collection = batch.column(1)
    if pa.types.is_dictionary(collection.type):
        collection = collection.dictionary_decode()
    parts = [
        pa.scalar(struct.pack(">hi", 6, len(did_bytes)) + did_bytes, pa.large_binary()),
        *prefixed(collection),
        *prefixed(batch.column(2)),
        *prefixed(batch.column(3)),
        pa.scalar(struct.pack(">i", len(rev_bytes)) + rev_bytes, pa.large_binary()),
    ]
    if jsonb:
        length, text = prefixed(value, 1)
        parts += [length, pa.scalar(b"\x01", pa.large_binary()), text]
    else:
        parts += prefixed(value)
    # large_binary (int64 offsets): a batch's rows may pass 2 GiB, as pg_copy_rows' bytes may
    rows = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.large_binary()))
    offsets = array.array("q")
    offsets.frombytes(memoryview(rows.buffers()[1])[rows.offset * 8 : (rows.offset + n + 1) * 8])
    return memoryview(rows.buffers()[2])[offsets[0] : offsets[n]]


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise SinkError("--out postgresql: needs the postgresql extra: pip install 'repo-stream[postgresql]'") from None
    return psycopg


@dataclass
class _PgRepo:
    """A repo's open transaction: its connection (None after a connection loss) and every
    ``COPY`` payload sent in it, spooled (to a temporary file past 64 MiB) for a replay."""

    conn: Any
    spool: Any
    sizes: list[int] = field(default_factory=list)
    records: int = 0
    record_bytes: int = 0


_PG_APPLICATION = "repo-stream-sink"


class PostgresSink:
    """Writes records into PostgreSQL (``--out postgresql://...``, or a libpq DSN such as
    ``host=/run/postgresql dbname=x`` for a Unix socket), through psycopg 3.

    Same tables as :class:`DuckdbSink` (``value`` is ``jsonb``, or ``bytea`` with ``raw``; ``did``,
    ``collection`` and ``rkey`` are ``COLLATE "C"``, so ``ORDER BY`` gives the MST's bytewise key
    order in any locale), and ``sync_cursor(stream, seq, updated)``. Each repo is one transaction on a connection of its
    own (kept for the next repo): its earlier rows are deleted; the backfill hands the sink the
    walker's Arrow batches of ``batch_rows`` records (the C walker writes the JSON texts into
    them), whose binary ``COPY`` rows are made with pyarrow's kernels (:func:`pg_copy_batch`; JSON
    texts as ``jsonb``, no Python object per record; tuple chunks: :func:`pg_copy_rows`, the C
    core) while a thread ``COPY``-es the batch before straight into ``records`` (the repo's
    rows were deleted in the same transaction and its keys are unique, so no row can clash; a
    staging table and a merge, as a sync commit's upserts take, cost about twice the server's
    time); and ``finish`` upserts its ``repos`` row, records it in ``backfill_checkpoint`` and commits: a
    crash leaves each repo fully in or not at all, and recorded exactly when its rows are. JSON
    texts PostgreSQL's ``jsonb`` refuses (a ``\\u0000`` in a string) fail their repo.

    Connection loss (the server restarted, the backend terminated, the socket broken): the
    transaction is redone on a new connection, up to ``retries`` times with exponential backoff
    (``backoff`` seconds, doubling): the repo's rows are deleted again and every batch sent so
    far is replayed from the spool (the repo's ``COPY`` data, in memory up to 64 MiB, then in a
    temporary file), then the failed step is retried. A loss during ``COMMIT`` (whether it
    committed is unknown) is redone the same way: the transaction is idempotent. Other errors
    fail the repo.

    Sync (:class:`~repo_stream.backfill.sinks.EventSink`): :meth:`apply` and :meth:`set_status`
    are each one transaction (retried the same way), and may store the firehose cursor
    (``cursor=(stream, seq)``) in ``sync_cursor`` in the same transaction: :meth:`load_cursor`
    reads it back, so a restarted sync resumes exactly after the last commit applied.

    Args:
        dsn: a libpq connection string or URI.
        raw: store the DAG-CBOR bytes instead of the JSON text.
        batch_rows: records gathered (per repo) into one ``COPY`` and merge.
        retries: attempts after a connection loss, per step.
        backoff: seconds before the first new attempt (doubled each time, at most 30 s).

    The same transaction records the repo as done in ``backfill_checkpoint`` (source, DID, rev,
    records): :meth:`checkpoint` gives the backfill's checkpoint kept there, so a repo is recorded
    exactly when its rows commit, with no SQLite file (the CLI uses it when ``--checkpoint`` is
    not given).

    A context manager: leaving it (or :meth:`close`) closes its connections.
    """

    keyed_by_did = True

    def __init__(self, dsn: str, raw: bool = False, batch_rows: int = 65536, retries: int = 5, backoff: float = 0.5) -> None:
        self.dsn = dsn
        self.raw = raw
        self.batch_rows = batch_rows
        self.retries = retries
        self.backoff = backoff
        self._pending = _Pending(batch_rows)
        self._background = _Background()
        self._free: list[Any] = []
        self._free_lock = threading.Lock()
        self._open: dict[tuple[str, str], _PgRepo] = {}
        self._schema_made = False
        self._schema_lock = threading.Lock()
        # A missing extra fails here, not at the first repo; and the modules are loaded before
        # the walk, not in it (psycopg's import alone takes ~0.2 s, holding the GIL).
        _pyarrow()
        import pyarrow.compute  # noqa: F401  (pg_copy_batch's kernels)

        _psycopg()

    def __getstate__(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "raw": self.raw, "batch_rows": self.batch_rows, "retries": self.retries, "backoff": self.backoff}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    def _where(self) -> str:
        """The DSN without a password, for messages."""
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", re.sub(r"password=\S+", "password=***", self.dsn))

    def _connect(self) -> Any:
        psycopg = _psycopg()
        with self._free_lock:
            while self._free:
                conn = self._free.pop()
                if not (conn.closed or conn.broken):
                    return conn
        conn = psycopg.connect(self.dsn, connect_timeout=30, application_name=_PG_APPLICATION)
        try:
            with self._schema_lock:
                if not self._schema_made:  # serialised across processes too: CREATE ... IF NOT EXISTS races
                    conn.execute("SELECT pg_advisory_xact_lock(7262011)")
                    conn.execute(_PG_SCHEMA.format(value="bytea" if self.raw else "jsonb"))
                    conn.commit()
                    self._schema_made = True
            value = "bytea" if self.raw else "jsonb"
            conn.execute(
                "CREATE TEMP TABLE repo_stream_staging (did text, collection text, rkey text, cid text, rev text, "
                f"value {value}) ON COMMIT DELETE ROWS"
            )
            conn.commit()
        except BaseException:
            conn.close()
            raise
        return conn

    def _release(self, conn: Any) -> None:
        with self._free_lock:
            self._free.append(conn)

    def _retrying(self, what: str, did: str, step: Any, recover: Any) -> Any:
        """``step()``; after a connection loss, ``recover()`` (a new connection, the transaction
        redone so far) and ``step()`` again, up to ``retries`` times with backoff.

        Raises:
            SinkError: another database error, or the connection lost ``retries + 1`` times.
        """
        import psycopg

        attempt = 0
        delay = self.backoff
        while True:
            try:
                if attempt:
                    recover()
                return step()
            except psycopg.Error as exc:
                lost = isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
                if not lost or attempt >= self.retries:
                    again = f" (after {attempt} reconnections)" if attempt else ""
                    raise SinkError(f"postgresql {self._where()}: {did}: {what}{again}: {str(exc).strip()}") from exc
            attempt += 1
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def _open_repo(self, repo: _PgRepo, did: str, replay: int) -> None:
        """A new connection for ``repo``: its rows deleted, its first ``replay`` payloads sent."""
        if repo.conn is not None:
            try:
                repo.conn.close()
            except Exception:  # a broken connection's close may fail too
                pass
            repo.conn = None
        conn = self._connect()
        repo.conn = conn
        conn.execute("DELETE FROM records WHERE did = %s", [did])
        repo.spool.seek(0)
        for size in repo.sizes[:replay]:
            self._copy(conn, repo.spool.read(size))
        repo.spool.seek(0, os.SEEK_END)

    def _begin(self, did: str) -> _PgRepo:
        import tempfile

        repo = _PgRepo(None, tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024))
        try:
            self._connect_repo(repo, did)
        except BaseException:
            repo.spool.close()
            raise
        return repo

    def _connect_repo(self, repo: _PgRepo, did: str) -> None:
        self._retrying("begin", did, lambda: self._open_repo(repo, did, 0), lambda: None)

    async def _start(self, key: tuple[str, str], did: str) -> _PgRepo:
        """A repo's first records: its transaction begun by the thread (a connection, the repo's
        rows deleted) while the walk makes its first batch; an error comes with the next step."""
        import tempfile

        repo = self._open[key] = _PgRepo(None, tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024))
        await self._background.submit(key, self._connect_repo, repo, did)
        return repo

    def _copy(self, conn: Any, payload: bytes, merge: bool = False) -> None:
        """``COPY`` the binary rows of ``payload`` (:func:`pg_copy_rows`; the header and trailer
        are written around them): straight into ``records`` (a backfilled repo, whose rows this
        transaction deleted: no key can clash), or (``merge``, a sync commit) into the staging
        table and merged into ``records`` with one upsert."""
        with conn.cursor() as cursor:
            target = "repo_stream_staging" if merge else "records (did, collection, rkey, cid, rev, value)"
            with cursor.copy(f"COPY {target} FROM STDIN (FORMAT BINARY)") as copy:
                copy.write(_PG_HEADER)
                copy.write(payload)  # not concatenated: a batch's rows are tens of MB
                copy.write(_PG_TRAILER)
            if not merge:
                return
            cursor.execute(
                "INSERT INTO records SELECT did, collection, rkey, cid, rev, value FROM repo_stream_staging "
                "ON CONFLICT (did, collection, rkey) DO UPDATE SET cid = excluded.cid, rev = excluded.rev, value = excluded.value"
            )
            cursor.execute("TRUNCATE repo_stream_staging")

    def _send(self, repo: _PgRepo, did: str, rev: str, items: list[Any]) -> None:
        self._send_payload(repo, did, self._payload(did, rev, items))

    def _payload(self, did: str, rev: str, items: list[Any]) -> bytes:
        """A batch's binary ``COPY`` rows (:func:`pg_copy_rows`)."""
        return pg_copy_rows(items, did, rev, not self.raw)

    def _send_payload(self, repo: _PgRepo, did: str, payload: Any) -> None:
        repo.spool.write(payload)
        repo.sizes.append(len(payload))
        done = len(repo.sizes) - 1
        self._retrying("copy", did, lambda: self._copy(repo.conn, payload), lambda: self._open_repo(repo, did, done))

    def _end(self, repo: _PgRepo, did: str, commit: Commit | None, source: str = "") -> None:
        """Commit (``commit`` given: with the repos and checkpoint rows) or roll back; the
        connection back to the pool either way (closed if broken)."""
        try:
            if commit is not None:

                def step() -> None:
                    conn = repo.conn
                    conn.execute(
                        "INSERT INTO repos VALUES (%s, %s, %s, 'active', now()) ON CONFLICT (did) DO UPDATE "
                        "SET rev = excluded.rev, data = excluded.data, status = excluded.status, updated = excluded.updated",
                        [commit.did, commit.rev, _data(commit)],
                    )
                    # The repo is done in the same transaction as its rows (PostgresCheckpoint reads it).
                    conn.execute(
                        "INSERT INTO backfill_checkpoint VALUES (%s, %s, %s, 'ok', NULL, %s, %s, false, 0, extract(epoch FROM now())) "
                        "ON CONFLICT (source) DO UPDATE SET did = excluded.did, rev = excluded.rev, outcome = 'ok', error = NULL, "
                        "records = excluded.records, record_bytes = excluded.record_bytes, finished_at = excluded.finished_at",
                        [source, commit.did, commit.rev, repo.records, repo.record_bytes],
                    )
                    conn.commit()

                self._retrying("commit", did, step, lambda: self._open_repo(repo, did, len(repo.sizes)))
            elif repo.conn is not None:
                try:
                    repo.conn.rollback()
                except Exception:  # a lost connection rolls back by itself
                    repo.conn.close()
        except BaseException:
            if repo.conn is not None:
                repo.conn.close()
            raise
        finally:
            repo.spool.close()
        if repo.conn is not None and not (repo.conn.closed or repo.conn.broken):
            self._release(repo.conn)

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        key = (source, commit.did)
        repo = self._open.get(key)
        if repo is None:
            repo = await self._start(key, commit.did)
        repo.records += len(items)
        repo.record_bytes += sum(len(v) for _, _, v in items)
        batch = self._pending.add(key, items)
        if batch is not None:
            # The batch's rows are made here, while the thread's COPY of the one before keeps the
            # server busy (the server, not the client, is what limits a large repo's ingest).
            payload = self._payload(commit.did, commit.rev, batch)
            await self._background.submit(key, self._send_payload, repo, commit.did, payload)

    @property
    def batch_values(self) -> str:
        """What the backfill's batches carry as ``value`` (:class:`~repo_stream.backfill.sinks.RepoSink`):
        ``"raw"`` with ``raw``, else ``"json_text"``."""
        return "raw" if self.raw else "json_text"

    #: :meth:`write_batch` takes ``block_bytes`` (:class:`~repo_stream.backfill.sinks.RepoSink`).
    batch_block_bytes = True

    async def write_batch(self, source: str, commit: Commit, batch: Any, block_bytes: int | None = None) -> None:
        """A walker's Arrow batch of the repo's records (:class:`~repo_stream.backfill.sinks.RepoSink`:
        ``value`` as :attr:`batch_values` says): its ``COPY`` rows made here
        (:func:`pg_copy_batch`) while the thread's ``COPY`` of the batch before keeps the server
        busy, then ``COPY``-ed by the thread. ``block_bytes``: the batch's record blocks' bytes
        (the checkpoint row's ``record_bytes``; without it, the values' bytes)."""
        key = (source, commit.did)
        repo = self._open.get(key)
        if repo is None:
            repo = await self._start(key, commit.did)
        rest = self._pending.take(key)
        if rest is not None:  # tuple chunks of the repo before (kept in order)
            payload = self._payload(commit.did, commit.rev, rest)
            await self._background.submit(key, self._send_payload, repo, commit.did, payload)
        repo.records += batch.num_rows
        if block_bytes is None:
            import pyarrow.compute as pc

            block_bytes = int(pc.sum(pc.binary_length(batch.column(4))).as_py() or 0)
        repo.record_bytes += block_bytes
        payload = pg_copy_batch(batch, commit.did, commit.rev, not self.raw)
        await self._background.submit(key, self._send_payload, repo, commit.did, payload)

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Commit the repo's transaction with its ``repos`` and checkpoint rows (success), or
        roll it back.

        Raises:
            SinkError: a step of the repo failed (then rolled back).
        """
        key = (source, commit.did)
        rest = self._pending.take(key)
        with anyio.CancelScope(shield=True):
            failed = await _settle(self._background, key)
            repo = self._open.pop(key, None)
            if repo is None:
                if error is not None or failed is not None:
                    if failed is not None and error is None:
                        raise failed
                    return
                repo = await anyio.to_thread.run_sync(self._begin, commit.did)  # an empty repo
            keep = error is None and failed is None
            if keep and rest is not None:
                try:
                    await anyio.to_thread.run_sync(self._send, repo, commit.did, commit.rev, rest)
                except BaseException:
                    await anyio.to_thread.run_sync(self._end, repo, commit.did, None)
                    raise
            await anyio.to_thread.run_sync(self._end, repo, commit.did, commit if keep else None, source)
        if failed is not None and error is None:
            raise failed

    # -- sync events (EventSink) --

    def _event(self, what: str, did: str, body: Any, cursor: tuple[str, int] | None) -> None:
        """``body(conn)`` and the cursor in one transaction on a connection of the pool, redone
        on a new connection after a connection loss."""
        holder: list[Any] = [None]

        def step() -> None:
            if holder[0] is None:
                holder[0] = self._connect()
            conn = holder[0]
            body(conn)
            if cursor is not None:
                conn.execute(
                    "INSERT INTO sync_cursor VALUES (%s, %s, now()) ON CONFLICT (stream) DO UPDATE "
                    "SET seq = excluded.seq, updated = excluded.updated",
                    [cursor[0], cursor[1]],
                )
            conn.commit()

        def recover() -> None:
            if holder[0] is not None:
                try:
                    holder[0].close()
                except Exception:
                    pass
            holder[0] = None

        try:
            self._retrying(what, did, step, recover)
        except BaseException:
            if holder[0] is not None:
                try:
                    holder[0].rollback()
                    self._release(holder[0])
                except Exception:
                    holder[0].close()
            raise
        self._release(holder[0])

    def _apply(self, did: str, rev: str, data: str, ops: Sequence[RecordOp], cursor: tuple[str, int] | None) -> None:
        upserts, deletes = _op_items(ops, did)
        payload = pg_copy_rows(upserts, did, rev, not self.raw) if upserts else b""

        def body(conn: Any) -> None:
            if payload:
                self._copy(conn, payload, merge=True)
            if deletes:
                with conn.cursor() as cur:
                    cur.executemany(
                        "DELETE FROM records WHERE did = %s AND collection = %s AND rkey = %s", [(did, c, r) for c, r in deletes]
                    )
            conn.execute(
                "INSERT INTO repos VALUES (%s, %s, %s, 'active', now()) ON CONFLICT (did) DO UPDATE "
                "SET rev = excluded.rev, data = excluded.data, status = excluded.status, updated = excluded.updated",
                [did, rev, data],
            )

        self._event("apply", did, body, cursor)

    async def apply(
        self, did: str, rev: str, data: str, ops: Sequence[RecordOp], *, cursor: tuple[str, int] | None = None
    ) -> None:
        """Apply one sync commit in one transaction: creates and updates upsert their rows
        (``COPY`` and merge), deletes delete theirs, the repo's ``repos`` row gets ``rev``,
        ``data`` and status ``active``, and (``cursor=(stream, seq)``) ``sync_cursor`` the seq.
        Redone on a new connection after a connection loss.

        Raises:
            RecordDecodeError: a block is not valid DAG-CBOR (nothing of the commit applied).
            SinkError: the database failed, or an op is malformed.
        """
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._apply, did, rev, data, ops, cursor)

    async def set_status(self, did: str, status: str, *, cursor: tuple[str, int] | None = None) -> None:
        """Set the repo's ``repos.status`` (a repo not yet there gets a row with no rev), and
        (``cursor=(stream, seq)``) ``sync_cursor``, in one transaction. Its records are kept.

        Raises:
            SinkError: an unknown status, or the database failed.
        """
        _check_status(did, status)

        def body(conn: Any) -> None:
            conn.execute(
                "INSERT INTO repos (did, status, updated) VALUES (%s, %s, now()) "
                "ON CONFLICT (did) DO UPDATE SET status = excluded.status, updated = excluded.updated",
                [did, status],
            )

        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._event, "status", did, body, cursor)

    async def load_cursor(self, stream: str) -> int | None:
        """The seq stored for ``stream`` by :meth:`apply` / :meth:`set_status`, or None.

        Raises:
            SinkError: the database failed.
        """
        found: list[int | None] = [None]

        def body(conn: Any) -> None:
            row = conn.execute("SELECT seq FROM sync_cursor WHERE stream = %s", [stream]).fetchone()
            found[0] = None if row is None else int(row[0])

        await anyio.to_thread.run_sync(self._event, "cursor", stream, body, None)
        return found[0]

    def checkpoint(self) -> PostgresCheckpoint:
        """The backfill checkpoint in this database (``backfill_checkpoint``); pass it to
        :func:`~repo_stream.backfill.backfill` as ``checkpoint``.

        Raises:
            SinkError: the database cannot be reached or the table made.
        """
        return PostgresCheckpoint(self.dsn, self._where(), self.retries, self.backoff)

    def __enter__(self) -> PostgresSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (open transactions roll back)."""
        self._background.close()
        for repo in self._open.values():
            if repo.conn is not None:
                repo.conn.close()
            repo.spool.close()
        with self._free_lock:
            for conn in self._free:
                conn.close()
            self._free.clear()
        self._open.clear()


class PostgresCheckpoint(Checkpoint):
    """A backfill :class:`~repo_stream.backfill.Checkpoint` kept in PostgreSQL's
    ``backfill_checkpoint`` table (the SQLite checkpoint's columns), where :class:`PostgresSink`
    records each repo in the transaction of its rows. Made by :meth:`PostgresSink.checkpoint`.
    After a connection loss each call is redone on a new connection (``retries`` times, backoff
    from ``backoff`` seconds doubling; the calls are reads and idempotent upserts).
    """

    def __init__(self, dsn: str, where: str | None = None, retries: int = 5, backoff: float = 0.5) -> None:
        import psycopg

        self.path = where or "postgresql"
        self._dsn = dsn
        self._retries = retries
        self._backoff = backoff
        try:
            self._pg: Any = psycopg.connect(dsn, connect_timeout=30, application_name="repo-stream-checkpoint")
            self._pg.execute("SELECT pg_advisory_xact_lock(7262011)")
            self._pg.execute(_PG_SCHEMA.format(value="jsonb"))
            self._pg.commit()
        except psycopg.Error as exc:
            raise SinkError(f"checkpoint {self.path}: {str(exc).strip()}") from exc
        self._conn = None
        self._limiter = anyio.CapacityLimiter(1)

    def _call(self, fn: Any, *args: Any) -> Any:
        import psycopg

        delay = self._backoff
        for attempt in range(self._retries + 1):
            if self._pg is None:
                raise SinkError(f"checkpoint {self.path} is closed")
            try:
                with self._pg.transaction():
                    return fn(*args)
            except psycopg.Error as exc:
                if not isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or attempt == self._retries:
                    again = f" (after {attempt} reconnections)" if attempt else ""
                    raise SinkError(f"checkpoint {self.path}{again}: {str(exc).strip()}") from exc
            time.sleep(delay)
            delay = min(delay * 2, 30.0)
            try:
                self._pg.close()
                self._pg = psycopg.connect(self._dsn, connect_timeout=30, application_name="repo-stream-checkpoint")
            except psycopg.Error:
                pass  # the next attempt fails on the closed connection and comes here again
        raise AssertionError("unreachable")

    def lookup_sync(self, sources: list[str]) -> dict[str, BackfillResult]:
        """The recorded results of those of ``sources`` that have one (``skipped=True``)."""

        def run() -> dict[str, BackfillResult]:
            rows = self._pg.execute(
                "SELECT source, did, rev, error, records, record_bytes, spilled, seconds, outcome FROM backfill_checkpoint "
                "WHERE source = ANY(%s)",
                [list(dict.fromkeys(sources))],
            ).fetchall()
            found = {}
            for source, did, rev, error, records, record_bytes, spilled, seconds, outcome in rows:
                if outcome != "ok" and error is None:
                    error = f"recorded as {outcome!r}"
                found[source] = BackfillResult(source, did, rev, records, record_bytes, spilled, seconds, error, skipped=True)
            return found

        result: dict[str, BackfillResult] = self._call(run)
        return result

    def record_sync(self, results: Iterable[BackfillResult]) -> None:
        """Record finished repos in one transaction (results with ``skipped`` are ignored)."""
        rows = [
            (
                r.source,
                r.did,
                r.rev,
                "ok" if r.error is None else "error",
                r.error,
                r.records,
                r.record_bytes,
                r.spilled,
                r.seconds,
            )
            for r in results
            if not r.skipped
        ]
        if rows:
            self._call(
                lambda: self._pg.cursor().executemany(
                    "INSERT INTO backfill_checkpoint VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, extract(epoch FROM now())) "
                    "ON CONFLICT (source) DO UPDATE SET did = excluded.did, rev = excluded.rev, outcome = excluded.outcome, "
                    "error = excluded.error, records = excluded.records, record_bytes = excluded.record_bytes, "
                    "spilled = excluded.spilled, seconds = excluded.seconds, finished_at = excluded.finished_at",
                    rows,
                )
            )

    def counts_sync(self) -> dict[str, int]:
        """Recorded repos per outcome, e.g. ``{"ok": 980, "error": 20}``."""
        counts: dict[str, int] = self._call(
            lambda: dict(self._pg.execute("SELECT outcome, count(*) FROM backfill_checkpoint GROUP BY outcome").fetchall())
        )
        return counts

    def close_sync(self) -> None:
        """Close the connection (safe to call twice)."""
        conn, self._pg = self._pg, None
        if conn is not None:
            conn.close()
