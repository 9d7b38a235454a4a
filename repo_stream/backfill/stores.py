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
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..core.commit import Commit
from ..errors import RepoStreamError, SinkError
from .checkpoint import Checkpoint
from .results import BackfillResult

__all__ = ["DuckdbSink", "ParquetSink", "PostgresCheckpoint", "PostgresSink", "record_table"]


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError:
        raise SinkError("the store sinks need pyarrow: pip install 'repo-stream[parquet]'") from None
    return pyarrow


def record_table(commit: Commit, items: list[Any], raw: bool = False) -> Any:
    """A chunk of a repo's records as a ``pyarrow.Table`` of :data:`RECORD_COLUMNS`.

    Args:
        commit: the repo's commit (its DID and rev fill ``did`` and ``rev``).
        items: ``(key, cid, block)`` tuples as a :class:`RepoSink` receives them.
        raw: ``value`` as the blocks' bytes (``binary``) instead of their JSON text (``string``).

    Returns:
        A ``pyarrow.Table``: ``did``, ``collection``, ``rkey``, ``cid``, ``rev`` strings and
        ``value``; ``len(items)`` rows in the items' order.

    Raises:
        RecordDecodeError: a block is not valid DAG-CBOR (JSON values only), naming the offset.
        SinkError: pyarrow is not installed.
    """
    pa = _pyarrow()
    from ..read.arrow import record_batch

    n = len(items)
    if raw:
        batch = record_batch(items, json_values=False)
    else:
        from ..records.json_text import json_text_processor

        transcode = json_text_processor()
        try:
            batch = record_batch([(k, c, transcode(v)) for k, c, v in items], json_values=True)
        except RepoStreamError as exc:
            raise type(exc)(f"{commit.did}: {exc}") from exc
    # The C core's columns (key, collection, rkey, cid, value), with the repo's DID and rev.
    return pa.table(
        {
            "did": pa.array([commit.did] * n, pa.string()),
            "collection": batch.column(1).cast(pa.string()),
            "rkey": batch.column(2),
            "cid": batch.column(3),
            "rev": pa.array([commit.rev] * n, pa.string()),
            "value": batch.column(4),
        }
    )


class _Pending:
    """Each open repo's record tables not yet written, until they make a batch."""

    def __init__(self, batch_rows: int) -> None:
        self.batch_rows = batch_rows
        self.tables: dict[tuple[str, str], list[Any]] = {}

    def add(self, key: tuple[str, str], table: Any) -> Any:
        """Add ``table``; the repo's pending tables as one when they reach a batch, else None."""
        tables = self.tables.setdefault(key, [])
        tables.append(table)
        if sum(t.num_rows for t in tables) < self.batch_rows:
            return None
        return self.take(key)

    def take(self, key: tuple[str, str]) -> Any:
        """The repo's pending tables as one (None if none), forgotten here."""
        tables = self.tables.pop(key, None)
        if not tables:
            return None
        return _pyarrow().concat_tables(tables)


def _data(commit: Commit) -> str:
    return str(commit.data)


# -- DuckDB -----------------------------------------------------------------------------------


class DuckdbSink:
    """Writes records into a DuckDB database file (``--out duckdb:FILE``).

    Tables (created if missing)::

        records(did VARCHAR, collection VARCHAR, rkey VARCHAR, cid VARCHAR, rev VARCHAR,
                value JSON (BLOB with raw), PRIMARY KEY (did, collection, rkey))
        repos(did VARCHAR PRIMARY KEY, rev VARCHAR, data VARCHAR, status VARCHAR, updated TIMESTAMPTZ)

    Each repo is one transaction on its own cursor: its earlier rows are deleted, each chunk is
    inserted from ``pyarrow.Table``s of ``batch_rows`` records (DuckDB reads the Arrow buffers; no row-by-row insert),
    and ``finish`` writes its ``repos`` row (``status`` ``active``, ``data`` the MST root CID)
    and commits. A crash (even ``kill -9``) leaves each repo either fully in or not at all.
    One process at a time opens the file (DuckDB's lock): not for ``processes > 1``.

    Args:
        path: the database file (created if missing).
        raw: store the DAG-CBOR bytes instead of the JSON text.
        batch_rows: records gathered (per repo) into one insert.

    A context manager: leaving it (or :meth:`close`) closes the database, so that other
    connections with other settings (``read_only=True``) can open it.
    """

    keyed_by_did = True

    def __init__(self, path: str | os.PathLike[str], raw: bool = False, batch_rows: int = 65536) -> None:
        self.path = os.fspath(path)
        self.raw = raw
        self._conn: Any = None
        self._open: dict[tuple[str, str], Any] = {}
        self._pending = _Pending(batch_rows)
        self._lock = anyio.Lock()

    def _db(self) -> Any:
        if self._conn is None:
            try:
                import duckdb
            except ImportError:
                raise SinkError("--out duckdb: needs the duckdb extra: pip install 'repo-stream[duckdb]'") from None
            try:
                conn = duckdb.connect(self.path)
                value = "BLOB" if self.raw else "JSON"
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS records (did VARCHAR NOT NULL, collection VARCHAR NOT NULL, rkey VARCHAR NOT NULL, "
                    f"cid VARCHAR NOT NULL, rev VARCHAR NOT NULL, value {value}, PRIMARY KEY (did, collection, rkey))"
                )
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS repos (did VARCHAR PRIMARY KEY, rev VARCHAR, data VARCHAR, status VARCHAR, updated TIMESTAMPTZ)"
                )
            except duckdb.Error as exc:
                raise SinkError(f"duckdb {self.path}: {exc}") from exc
            self._conn = conn
        return self._conn

    def _begin(self, did: str) -> Any:
        import duckdb

        try:
            cursor = self._db().cursor()
            cursor.execute("BEGIN TRANSACTION")
            cursor.execute("DELETE FROM records WHERE did = ?", [did])
        except duckdb.Error as exc:
            raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc
        return cursor

    def _insert(self, cursor: Any, did: str, table: Any) -> None:
        import duckdb

        try:
            cursor.register("repo_stream_chunk", table)
            cursor.execute("INSERT INTO records SELECT did, collection, rkey, cid, rev, value FROM repo_stream_chunk")
            cursor.unregister("repo_stream_chunk")
        except duckdb.Error as exc:
            raise SinkError(f"duckdb {self.path}: {did}: {exc}") from exc

    def _end(self, cursor: Any, commit: Commit, keep: bool) -> None:
        import duckdb

        try:
            if keep:
                cursor.execute(
                    "INSERT OR REPLACE INTO repos VALUES (?, ?, ?, 'active', now())", [commit.did, commit.rev, _data(commit)]
                )
                cursor.execute("COMMIT")
            else:
                cursor.execute("ROLLBACK")
        except duckdb.Error as exc:
            raise SinkError(f"duckdb {self.path}: {commit.did}: {exc}") from exc
        finally:
            cursor.close()

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        key = (source, commit.did)
        cursor = self._open.get(key)
        if cursor is None:
            async with self._lock:  # one opener of the database
                cursor = self._open[key] = await anyio.to_thread.run_sync(self._begin, commit.did)
        table = self._pending.add(key, record_table(commit, items, self.raw))
        if table is not None:
            await anyio.to_thread.run_sync(self._insert, cursor, commit.did, table)

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Commit the repo's transaction with its ``repos`` row (success), or roll it back."""
        key = (source, commit.did)
        cursor = self._open.pop(key, None)
        rest = self._pending.take(key)
        if cursor is None:
            if error is not None:
                return
            async with self._lock:
                cursor = await anyio.to_thread.run_sync(self._begin, commit.did)  # an empty repo
        with anyio.CancelScope(shield=True):
            keep = error is None
            if keep and rest is not None:
                try:
                    await anyio.to_thread.run_sync(self._insert, cursor, commit.did, rest)
                except BaseException:
                    await anyio.to_thread.run_sync(self._end, cursor, commit, False)
                    raise
            await anyio.to_thread.run_sync(self._end, cursor, commit, keep)

    def __enter__(self) -> DuckdbSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database (open transactions roll back)."""
        for cursor in self._open.values():
            cursor.close()
        self._open.clear()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- Parquet ----------------------------------------------------------------------------------

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


class ParquetSink:
    """Writes records as Parquet files, one per repo and collection (``--out parquet:DIR``):
    ``DIR/<collection>/<did>.parquet``, zstd-compressed, row groups of up to ``row_group_rows``
    rows (fewer when their values pass ``row_group_mb``), columns ``did, collection, rkey, cid,
    rev, value`` (``value`` the JSON text as ``string``, or with ``raw`` the block as ``binary``).

    A repo's files are written as ``.parquet.part`` and, in ``finish``, fsynced and renamed into
    place (then their folders fsynced), before the repo's result is recorded in the checkpoint;
    a failed repo's ``.part`` files are removed. A crash leaves only complete ``.parquet`` files
    (and maybe ``.part`` files, which readers skip: read ``DIR/*/*.parquet``). Files are atomic,
    a repo is not: a crash during a repo's renames can leave some of its collections' new files
    in place and others not, but that repo is not in the checkpoint, and the resumed run rewrites
    it (for a store where a repo is all in or not at all, use DuckDB or PostgreSQL). A repo that comes
    again replaces its files (those of collections it no longer has are removed). Memory: the pending row group of each open file.

    Args:
        directory: the output folder (created if missing).
        raw: store the DAG-CBOR bytes instead of the JSON text.
        row_group_rows: rows per row group, at most.
        row_group_mb: MiB of pending values that close a row group early.
    """

    keyed_by_did = True

    def __init__(
        self, directory: str | os.PathLike[str], raw: bool = False, row_group_rows: int = 131072, row_group_mb: float = 32
    ) -> None:
        self.directory = os.fspath(directory)
        self.raw = raw
        self.row_group_rows = row_group_rows
        self.row_group_bytes = int(row_group_mb * 1024 * 1024)
        self._open: dict[tuple[str, str], dict[str, _ParquetFile]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "raw": self.raw, "rows": self.row_group_rows, "bytes": self.row_group_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["raw"], state["rows"], state["bytes"] / 1024 / 1024)  # type: ignore[misc]

    def path(self, collection: str, did: str) -> str:
        """The file of ``did``'s records of ``collection``."""
        return os.path.join(self.directory, _file_name(collection), _file_name(did) + ".parquet")

    def _write(self, files: dict[str, _ParquetFile], did: str, table: Any) -> None:
        import pyarrow.parquet as pq

        collections = table.column("collection").to_pylist()
        start = 0
        n = len(collections)
        while start < n:  # the chunk is in key order: each collection is one run
            name = collections[start]
            end = start
            while end < n and collections[end] == name:
                end += 1
            part = table.slice(start, end - start)
            start = end
            file = files.get(name)
            if file is None:
                path = self.path(name, did)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                writer = pq.ParquetWriter(path + ".part", part.schema, compression="zstd")
                file = files[name] = _ParquetFile(path, writer)
            file.pending.append(part)
            file.rows += part.num_rows
            file.bytes += part.column("value").nbytes
            if file.rows >= self.row_group_rows or file.bytes >= self.row_group_bytes:
                self._flush(file)

    def _flush(self, file: _ParquetFile) -> None:
        import pyarrow as pa

        if file.pending:
            file.writer.write_table(pa.concat_tables(file.pending), row_group_size=max(file.rows, 1))
        file.pending, file.rows, file.bytes = [], 0, 0

    def _close(self, files: dict[str, _ParquetFile], did: str, keep: bool) -> None:
        folders = set()
        try:
            for file in files.values():
                if keep:
                    self._flush(file)
                file.writer.close()
            for file in files.values():
                part = file.path + ".part"
                if keep:
                    fd = os.open(part, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
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
            for folder in folders:
                fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise SinkError(f"parquet {self.directory}: {did}: {exc}") from exc

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        files = self._open.setdefault((source, commit.did), {})
        table = record_table(commit, items, self.raw)
        try:
            await anyio.to_thread.run_sync(self._write, files, commit.did, table)
        except OSError as exc:
            raise SinkError(f"parquet {self.directory}: {commit.did}: {exc}") from exc

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Complete and rename the repo's files (success), or remove them."""
        files = self._open.pop((source, commit.did), None)
        if files is None and error is not None:
            return
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close, files or {}, commit.did, error is None)


# -- PostgreSQL -------------------------------------------------------------------------------

_PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    did text NOT NULL, collection text NOT NULL, rkey text NOT NULL, cid text NOT NULL, rev text NOT NULL,
    value {value}, PRIMARY KEY (did, collection, rkey)
);
CREATE TABLE IF NOT EXISTS repos (did text PRIMARY KEY, rev text, data text, status text, updated timestamptz);
CREATE TABLE IF NOT EXISTS backfill_checkpoint (
    source text PRIMARY KEY, did text, rev text, outcome text NOT NULL, error text, records bigint NOT NULL,
    record_bytes bigint NOT NULL, spilled boolean NOT NULL, seconds double precision NOT NULL, finished_at double precision NOT NULL
);
"""


class PostgresSink:
    """Writes records into PostgreSQL (``--out postgresql://...``, or a libpq DSN such as
    ``host=/run/postgresql dbname=x`` for a Unix socket), through psycopg 3.

    Same tables as :class:`DuckdbSink` (``value`` is ``jsonb``, or ``bytea`` with ``raw``).
    Each repo is one transaction on a connection of its own (kept for the next repo): its
    earlier rows are deleted, each chunk is ``COPY``-ed (binary) into a temporary staging table
    and merged into ``records`` with one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` per batch
    of ``batch_rows`` records, and
    ``finish`` upserts its ``repos`` row and commits: a crash leaves each repo fully in or not at
    all. JSON texts PostgreSQL's ``jsonb`` refuses (a ``\\u0000`` in a string) fail their repo.

    Args:
        dsn: a libpq connection string or URI.
        raw: store the DAG-CBOR bytes instead of the JSON text.
        batch_rows: records gathered (per repo) into one ``COPY`` and merge.

    The same transaction records the repo as done in ``backfill_checkpoint`` (source, DID, rev,
    records): :meth:`checkpoint` gives the backfill's checkpoint kept there, so a repo is recorded
    exactly when its rows commit, with no SQLite file (the CLI uses it when ``--checkpoint`` is
    not given).

    A context manager: leaving it (or :meth:`close`) closes its connections.
    """

    keyed_by_did = True

    def __init__(self, dsn: str, raw: bool = False, batch_rows: int = 65536) -> None:
        self.dsn = dsn
        self.raw = raw
        self._pending = _Pending(batch_rows)
        self._counts: dict[tuple[str, str], tuple[int, int]] = {}
        self._free: list[Any] = []
        self._open: dict[tuple[str, str], Any] = {}
        self._schema_made = False
        self._schema_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "raw": self.raw}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["dsn"], state["raw"])  # type: ignore[misc]

    def _where(self) -> str:
        """The DSN without a password, for messages."""
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", re.sub(r"password=\S+", "password=***", self.dsn))

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise SinkError("--out postgresql: needs the postgresql extra: pip install 'repo-stream[postgresql]'") from None
        if self._free:
            return self._free.pop()
        conn = psycopg.connect(self.dsn, connect_timeout=30)
        with self._schema_lock:
            if not self._schema_made:  # serialised across processes too: CREATE ... IF NOT EXISTS races
                conn.execute("SELECT pg_advisory_xact_lock(7262011)")
                conn.execute(_PG_SCHEMA.format(value="bytea" if self.raw else "jsonb"))
                conn.commit()
                self._schema_made = True
        value = "bytea" if self.raw else "text"
        conn.execute(
            "CREATE TEMP TABLE repo_stream_staging (did text, collection text, rkey text, cid text, rev text, "
            f"value {value}) ON COMMIT DELETE ROWS"
        )
        conn.commit()
        return conn

    def _run(self, what: str, did: str, fn: Any, *args: Any) -> Any:
        import psycopg

        try:
            return fn(*args)
        except psycopg.Error as exc:
            raise SinkError(f"postgresql {self._where()}: {did}: {what}: {str(exc).strip()}") from exc

    def _begin(self, did: str) -> Any:
        conn = self._connect()
        conn.execute("DELETE FROM records WHERE did = %s", [did])
        return conn

    def _insert(self, conn: Any, table: Any) -> None:
        cursor = conn.cursor()
        columns = [table.column(i).to_pylist() for i in range(6)]
        types = ["text"] * 5 + ["bytea" if self.raw else "text"]
        with cursor.copy("COPY repo_stream_staging FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(types)
            write = copy.write_row
            for row in zip(*columns, strict=True):
                write(row)
        value = "value" if self.raw else "value::jsonb"
        cursor.execute(
            f"INSERT INTO records SELECT did, collection, rkey, cid, rev, {value} FROM repo_stream_staging "
            "ON CONFLICT (did, collection, rkey) DO UPDATE SET cid = excluded.cid, rev = excluded.rev, value = excluded.value"
        )
        cursor.execute("TRUNCATE repo_stream_staging")

    def _end(self, conn: Any, commit: Commit, keep: bool, source: str = "", counts: tuple[int, int] = (0, 0)) -> None:
        try:
            if keep:
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
                    [source, commit.did, commit.rev, *counts],
                )
                conn.commit()
            else:
                conn.rollback()
        except BaseException:
            conn.close()
            raise
        self._free.append(conn)

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        key = (source, commit.did)
        conn = self._open.get(key)
        if conn is None:
            conn = self._open[key] = await anyio.to_thread.run_sync(self._run, "begin", commit.did, self._begin, commit.did)
        counts = self._counts.get(key, (0, 0))
        self._counts[key] = (counts[0] + len(items), counts[1] + sum(len(v) for _, _, v in items))
        table = self._pending.add(key, record_table(commit, items, self.raw))
        if table is not None:
            await anyio.to_thread.run_sync(self._run, "copy", commit.did, self._insert, conn, table)

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Commit the repo's transaction with its ``repos`` row (success), or roll it back."""
        key = (source, commit.did)
        conn = self._open.pop(key, None)
        rest = self._pending.take(key)
        counts = self._counts.pop(key, (0, 0))
        if conn is None:
            if error is not None:
                return
            conn = await anyio.to_thread.run_sync(self._run, "begin", commit.did, self._begin, commit.did)
        with anyio.CancelScope(shield=True):
            keep = error is None
            if keep and rest is not None:
                try:
                    await anyio.to_thread.run_sync(self._run, "copy", commit.did, self._insert, conn, rest)
                except BaseException:
                    await anyio.to_thread.run_sync(self._run, "rollback", commit.did, self._end, conn, commit, False)
                    raise
            await anyio.to_thread.run_sync(self._run, "commit", commit.did, self._end, conn, commit, keep, source, counts)

    def checkpoint(self) -> PostgresCheckpoint:
        """The backfill checkpoint in this database (``backfill_checkpoint``); pass it to
        :func:`~repo_stream.backfill.backfill` as ``checkpoint``.

        Raises:
            SinkError: the database cannot be reached or the table made.
        """
        return PostgresCheckpoint(self.dsn, self._where())

    def __enter__(self) -> PostgresSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (open transactions roll back)."""
        for conn in [*self._free, *self._open.values()]:
            conn.close()
        self._free.clear()
        self._open.clear()


class PostgresCheckpoint(Checkpoint):
    """A backfill :class:`~repo_stream.backfill.Checkpoint` kept in PostgreSQL's
    ``backfill_checkpoint`` table (the SQLite checkpoint's columns), where :class:`PostgresSink`
    records each repo in the transaction of its rows. Made by :meth:`PostgresSink.checkpoint`.
    """

    def __init__(self, dsn: str, where: str | None = None) -> None:
        import psycopg

        self.path = where or "postgresql"
        try:
            self._pg: Any = psycopg.connect(dsn, connect_timeout=30)
            self._pg.execute("SELECT pg_advisory_xact_lock(7262011)")
            self._pg.execute(_PG_SCHEMA.format(value="jsonb"))
            self._pg.commit()
        except psycopg.Error as exc:
            raise SinkError(f"checkpoint {self.path}: {str(exc).strip()}") from exc
        self._conn = None
        self._limiter = anyio.CapacityLimiter(1)

    def _call(self, fn: Any, *args: Any) -> Any:
        import psycopg

        if self._pg is None:
            raise SinkError(f"checkpoint {self.path} is closed")
        try:
            with self._pg.transaction():
                return fn(*args)
        except psycopg.Error as exc:
            raise SinkError(f"checkpoint {self.path}: {str(exc).strip()}") from exc

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
            (r.source, r.did, r.rev, "ok" if r.error is None else "error", r.error, r.records, r.record_bytes, r.spilled, r.seconds)
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
