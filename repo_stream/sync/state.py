"""The sync service's per-repo state, in SQLite: each repo's status, rev and MST root, and the
stream cursor.

Table ``repos(did, status, rev, data, updated)``: ``status`` is one of :data:`STATUSES`,
``rev`` the last verified rev (a TID) and ``data`` the MST root it has (a base32 CID string),
both NULL before the first backfill. Table ``meta(key, value)`` holds the firehose ``cursor``
(the seq of the last event whose changes the consumer took). Table ``records(did, key, cid)``
holds the record CIDs delivered for each tracked repo (``key`` is ``collection/rkey``; the
sync service compares them with a refetched repo to emit the difference), ``staged`` the same
for a backfill written to a sink and not finished yet, and ``buffer(did, seq, message)`` the
firehose messages of repos still backfilling past the in-memory limit (emptied at start: a
restart replays them from the cursor). Table ``marks(did, key)`` holds the keys of live events
that may have been delivered and whose changes may not be committed yet (written and committed
before they are delivered, removed once their changes are committed; a row per DID and group,
its keys joined by newlines, or a row per key in files made before): at start they become
records with an empty CID (:meth:`StateStore.fold_marks`), so a refetch sends each of them again
(an update if the repo has it, a delete if not). Writes become durable at
:meth:`StateStore.commit` (one SQLite transaction), so a crash loses only what was not
committed, and a restart re-delivers it.

Writes of repo rows and of record CIDs are kept in memory until the next commit (or
:data:`MAX_PENDING` of them, or a read that needs them) and then written, the last write of
each key winning: the repo rows with one ``executemany``, the record CIDs as one row appended to
table ``journal(id, batch)``, ``batch`` a JSON object ``{did: {key: cid or null}}`` (null: a
delete; one SQL row and one JSON encoding per commit rather than one row per record, a few new
pages per commit); repo rows read are cached (:data:`MAX_CACHED_ROWS` at most), so following
the firehose costs no SQL statement per event. The journal is folded into ``records`` in key
order (SQLite's JSON functions read it), the last change of each key winning, once
:data:`MAX_CHANGES` are there or before ``records`` is read or written otherwise (and at open):
each page of ``records`` is then written once per fold rather than once per commit that touches
it. Files made before the journal hold the changes as a row each in table
``changes(did, key, cid)``: they are folded at open and the table dropped. A new file has 16
KiB pages; SQLite's page cache is 16 MiB, and the log (WAL, ``synchronous=NORMAL``: a commit
survives the process being killed; an operating system crash may lose the last commits, never
the file) is copied into the file every 64 MiB.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Self

from ..errors import DiskError

__all__ = ["MAX_CACHED_ROWS", "MAX_CHANGES", "MAX_PENDING", "STATUSES", "RepoRow", "StateStore"]

#: Repo rows kept in memory at most (the oldest read are dropped first).
MAX_CACHED_ROWS: Final = 100_000
#: Row and record writes held in memory at most before they are written (not committed).
MAX_PENDING: Final = 20_000
#: Record changes written to table ``journal`` at most before they are folded into ``records``.
MAX_CHANGES: Final = 100_000
#: Every record change in ``journal``, one row each: ``did``, ``key``, ``cid`` (NULL: a delete) and
#: ``b``, its batch (a key changes once in a batch: the latest batch wins).
_FLAT: Final = "SELECT c.key AS did, r.key AS key, r.value AS cid, j.id AS b FROM journal AS j, json_each(j.batch) AS c, json_each(c.value) AS r"
#: Remove the records of a JSON object ``{did: [key, ...]}``.
_DELETE: Final = "DELETE FROM records WHERE (did, key) IN (SELECT c.key, r.value FROM json_each(?) AS c, json_each(c.value) AS r)"
#: The last change of each key in ``journal``.
_LATEST: Final = f"SELECT did, key, cid FROM (SELECT did, key, cid, row_number() OVER (PARTITION BY did, key ORDER BY b DESC) AS n FROM ({_FLAT})) WHERE n = 1"
#: The last change of each key in table ``changes`` of files made before ``journal`` (the
#: latest appended wins).
_LATEST_V1: Final = (
    "SELECT did, key, cid FROM (SELECT did, key, cid, row_number() OVER (PARTITION BY did, key ORDER BY rowid DESC) AS n FROM changes) WHERE n = 1"
)
#: JSON text of a value, compact (the journal's batches).
_json: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_UPSERT_ROW: Final = (
    "INSERT INTO repos (did, status, rev, data, updated) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT(did) DO UPDATE SET status = excluded.status, rev = COALESCE(excluded.rev, rev), "
    "data = COALESCE(excluded.data, data), updated = excluded.updated"
)

#: The statuses of a repo: waiting for its backfill, being backfilled, followed live, out of
#: sync (to refetch), not active on its host (the ``#account`` statuses), or failed.
STATUSES: Final = frozenset(
    {"pending", "backfilling", "active", "desynchronized", "takendown", "suspended", "deleted", "deactivated", "error"}
)


class RepoRow(NamedTuple):
    """One repo's state: ``did``, ``status`` (one of :data:`STATUSES`), ``rev`` and ``data``
    (the MST root's base32 CID) or None before the first backfill."""

    did: str
    status: str
    rev: str | None
    data: str | None


_new_row: Final = tuple.__new__  # RepoRow(*fields) without its Python-level __new__


class StateStore:
    """The state file (``path``; ``":memory:"`` for a test). Use as a context manager, or call
    :meth:`close`.

    Raises:
        DiskError: the file cannot be opened or written (the message names the path).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        try:
            self._db = sqlite3.connect(self.path, isolation_level="DEFERRED")
            # 16 KiB pages for a new file (an existing one keeps its own): a commit writes
            # fewer, fuller pages to the log, and a fold visits fewer.
            self._db.execute("PRAGMA page_size=16384")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS repos (did TEXT PRIMARY KEY, status TEXT NOT NULL, rev TEXT, data TEXT, updated REAL)")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # 16 MiB of page cache (records land all over the records table) and a checkpoint
            # every 64 MiB of log (SQLite's default is 1,000 pages): fewer page reads and writes.
            self._db.execute("PRAGMA cache_size=-16384")
            # Deleted rows zeroed only where that costs no page write (some SQLite builds, as
            # Debian's, zero every freed page: the journal and marks emptied would each be
            # written again as zeros). The state holds public records' keys and CIDs.
            self._db.execute("PRAGMA secure_delete=FAST")
            page_size = int(self._db.execute("PRAGMA page_size").fetchone()[0])
            self._db.execute(f"PRAGMA wal_autocheckpoint={(64 << 20) // page_size}")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            for table in ("records", "staged"):
                self._db.execute(f"CREATE TABLE IF NOT EXISTS {table} (did TEXT, key TEXT, cid TEXT NOT NULL, PRIMARY KEY (did, key)) WITHOUT ROWID")
            # Marks are appended (a rowid table, no key order: a group's marks fill a few new
            # pages rather than one page each) and removed all at once. (Files made before keep
            # their (did, key) table: the same statements work on it.)
            self._db.execute("CREATE TABLE IF NOT EXISTS marks (did TEXT, key TEXT)")
            self._db.execute("CREATE TABLE IF NOT EXISTS buffer (did TEXT, seq INTEGER, message BLOB NOT NULL, PRIMARY KEY (did, seq)) WITHOUT ROWID")
            self._db.execute("CREATE TABLE IF NOT EXISTS journal (id INTEGER PRIMARY KEY, batch TEXT NOT NULL)")
            try:
                self._db.execute("SELECT json_valid('{}')").fetchone()
            except sqlite3.OperationalError:
                raise DiskError(
                    f"sync state {self.path}: the SQLite library (version {sqlite3.sqlite_version}) has no JSON functions (built in from 3.38 on)"
                ) from None
            self._changes = 0
            self._deleted: dict[str, dict[str, bool]] = {}  # did -> key deleted since the fold -> its last change is a delete
            self._fold_left()
            self._db.commit()
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None
        self._rows: dict[str, RepoRow] = {}  # cache: did -> its row as written last
        self._dirty: dict[str, RepoRow] = {}  # rows set since the last flush
        self._records: dict[str, dict[str, str | None]] = {}  # did -> key -> CID (None: delete) since the last flush
        self._held = 0  # record changes in self._records

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (what was not committed is rolled back)."""
        self._rows.clear()
        self._dirty.clear()
        self._records.clear()
        self._deleted.clear()
        self._db.close()

    def flush(self) -> None:
        """Write the rows and records held in memory to the file (not committed)."""
        try:
            if self._dirty:
                now = time.time()
                self._db.executemany(_UPSERT_ROW, [(*row, now) for row in self._dirty.values()])
                self._dirty.clear()
            if self._records:
                text = _json(self._records)
                if "\\u0000" in text:  # a NUL in a DID or key (never a repo's): not stored (SQLite's JSON strings end at NUL)
                    text = _json({did: {k: c for k, c in held.items() if "\0" not in k} for did, held in self._records.items() if "\0" not in did})
                self._db.execute("INSERT INTO journal (batch) VALUES (?)", (text,))
                self._changes += self._held
                self._records = {}
                self._held = 0
                if self._changes >= MAX_CHANGES:
                    self._fold()
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    def _fold(self) -> None:
        """Apply the record changes in ``journal`` to ``records`` (not committed): the CIDs in
        key order, the last change of each key winning, then the keys whose last change is a
        delete (noted as they are written), in key order; then empty ``journal``."""
        if not self._changes:
            return
        self._db.execute(
            f"INSERT INTO records (did, key, cid) SELECT did, key, cid FROM ({_FLAT}) WHERE cid IS NOT NULL ORDER BY did, key, b "
            "ON CONFLICT(did, key) DO UPDATE SET cid = excluded.cid"
        )
        gone = {did: [key for key, last in keys.items() if last and "\0" not in key] for did, keys in self._deleted.items() if "\0" not in did}
        if any(gone.values()):
            self._db.execute(_DELETE, (_json(gone),))
        self._db.execute("DELETE FROM journal")
        self._changes = 0
        self._deleted.clear()

    def _fold_left(self) -> None:
        """At open: fold the changes an earlier run committed and did not fold (the last change
        of each key found in SQL, as the deletes were noted by that run); a file made before
        table ``journal`` has them in table ``changes`` (a row per change), dropped then."""
        db = self._db
        for latest, table in ((_LATEST_V1, "changes"), (_LATEST, "journal")):
            if table == "changes" and db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'").fetchone() is None:
                continue
            if db.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is not None:
                db.execute(
                    f"INSERT INTO records (did, key, cid) SELECT did, key, cid FROM ({latest}) WHERE cid IS NOT NULL ORDER BY did, key "
                    "ON CONFLICT(did, key) DO UPDATE SET cid = excluded.cid"
                )
                db.execute(f"DELETE FROM records WHERE (did, key) IN (SELECT did, key FROM ({latest}) WHERE cid IS NULL)")
            db.execute("DROP TABLE changes" if table == "changes" else "DELETE FROM journal")

    def _settle(self) -> None:
        """Write what is held in memory and fold the record changes: ``records`` is then current."""
        self.flush()
        try:
            self._fold()
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    def _cache(self, row: RepoRow) -> None:
        rows = self._rows
        if len(rows) >= MAX_CACHED_ROWS and row.did not in rows:
            for did in list(rows)[: MAX_CACHED_ROWS // 10]:
                del rows[did]
        rows[row.did] = row

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    def add(self, did: str, status: str = "pending") -> None:
        """Track ``did`` (no change when it is tracked already)."""
        self._check(status)
        if did in self._rows or did in self._dirty:
            return
        self._run("INSERT OR IGNORE INTO repos (did, status, updated) VALUES (?, ?, ?)", (did, status, time.time()))

    def get(self, did: str) -> RepoRow | None:
        """The repo's state, or None when it is not tracked."""
        row = self._rows.get(did)
        if row is not None:
            return row
        row = self._dirty.get(did)
        if row is None:
            found = self._run("SELECT did, status, rev, data FROM repos WHERE did = ?", (did,)).fetchone()
            if found is None:
                return None
            row = RepoRow(*found)
        self._cache(row)
        return row

    def set(self, did: str, status: str, rev: str | None = None, data: str | None = None) -> None:
        """Set the repo's status and, when given, its rev and data (tracking it if it was not)."""
        if status not in STATUSES:
            self._check(status)
        if rev is None or data is None:  # both given: nothing to keep
            old = self.get(did)
            if old is not None:
                rev = old.rev if rev is None else rev
                data = old.data if data is None else data
        row = _new_row(RepoRow, (did, status, rev, data))
        rows = self._rows
        if did in rows:
            rows[did] = row
        else:
            self._cache(row)
        dirty = self._dirty
        dirty[did] = row
        if len(dirty) >= MAX_PENDING:
            self.flush()

    def dids(self, status: str, after: str = "", limit: int = 1000) -> list[str]:
        """Up to ``limit`` DIDs with ``status``, above ``after``, in order (for paging)."""
        self.flush()
        return [r[0] for r in self._run("SELECT did FROM repos WHERE status = ? AND did > ? ORDER BY did LIMIT ?", (status, after, limit))]

    def reset_statuses(self, statuses: tuple[str, ...], to: str) -> None:
        """Set every repo with one of ``statuses`` to ``to`` (at start: unfinished fetches to redo)."""
        self._check(to)
        self.flush()
        self._rows.clear()
        marks = ",".join("?" * len(statuses))
        self._run(f"UPDATE repos SET status = ? WHERE status IN ({marks})", (to, *statuses))

    # -- records: the CIDs delivered per repo --------------------------------------------------

    def has_records(self, did: str) -> bool:
        """True when any record of ``did`` is stored."""
        self._settle()
        return self._run("SELECT 1 FROM records WHERE did = ? LIMIT 1", (did,)).fetchone() is not None

    def records_page(self, did: str, after: str, upto: str | None, limit: int) -> list[tuple[str, str]]:
        """Up to ``limit`` ``(key, cid)`` of ``did`` with ``after < key <= upto`` (no upper bound
        when ``upto`` is None), in key order (bytewise, the MST's order)."""
        self._settle()
        if upto is None:
            sql, args = "SELECT key, cid FROM records WHERE did = ? AND key > ? ORDER BY key LIMIT ?", (did, after, limit)
        else:
            sql, args = "SELECT key, cid FROM records WHERE did = ? AND key > ? AND key <= ? ORDER BY key LIMIT ?", (did, after, upto, limit)  # type: ignore[assignment]
        return [(str(k), str(c)) for k, c in self._run(sql, args)]

    def put_record(self, did: str, key: str, cid: str | None, *, staged: bool = False) -> None:
        """Store (``cid`` given) or remove (None) the record ``key`` of ``did``; ``staged``: in
        the staging table (see :meth:`unstage`)."""
        if not staged:
            self.put_records(did, [(key, cid)])
            return
        table = "staged"
        if cid is None:
            self._run(f"DELETE FROM {table} WHERE did = ? AND key = ?", (did, key))
        else:
            self._run(f"INSERT INTO {table} (did, key, cid) VALUES (?, ?, ?) ON CONFLICT(did, key) DO UPDATE SET cid = excluded.cid", (did, key, cid))

    def put_records(self, did: str, records: list[tuple[str, str | None]]) -> None:
        """Store or remove (CID None) each ``(key, cid)`` of ``did`` (each key named once; a DID
        or key with a NUL character, never a repo's, is not stored)."""
        pending = self._records
        held = pending.get(did)
        if held is None:
            pending[did] = dict(records)
        else:
            held.update(records)
        deleted = self._deleted.get(did)
        if deleted is not None:
            for key, cid in records:
                if cid is None:
                    deleted[key] = True
                elif key in deleted:
                    deleted[key] = False
        else:
            for key, cid in records:
                if cid is None:
                    self._deleted[did] = {key: True for key, cid in records if cid is None}
                    break
        self._held += len(records)
        if self._held >= MAX_PENDING:
            self.flush()

    def mark(self, keys: list[tuple[str, str]]) -> None:
        """Note ``(did, key)`` pairs as maybe delivered and not committed (durable at the next
        :meth:`commit`; see the module docstring). Stored as one row per DID, its keys joined
        by newlines (a row costs SQLite about as much as its bytes: ~3 us an event less than a
        row per key); a key with a newline is not a repo key, never delivered, and not noted."""
        rows: dict[str, list[str]] = {}
        for did, key in keys:
            if "\n" not in key:
                held = rows.get(did)
                if held is None:
                    rows[did] = [key]
                else:
                    held.append(key)
        try:
            self._db.executemany("INSERT OR IGNORE INTO marks (did, key) VALUES (?, ?)", [(did, "\n".join(held)) for did, held in rows.items()])
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    def unmark(self) -> None:
        """Remove every mark (their changes are committed with this; SQLite empties the table
        without visiting its rows)."""
        self._run("DELETE FROM marks")

    def fold_marks(self) -> int:
        """Turn every mark left by an earlier run into a record with an empty CID (stored or
        not, the repo's CID of it is unknown) and remove the marks; the number of marks."""
        self._settle()
        count = 0
        # A row holds one key (files made before) or several joined by newlines.
        for did, joined in self._run("SELECT did, key FROM marks").fetchall():
            keys = str(joined).split("\n")
            count += len(keys)
            try:
                self._db.executemany(
                    "INSERT INTO records (did, key, cid) VALUES (?, ?, '') ON CONFLICT(did, key) DO UPDATE SET cid = ''", [(did, key) for key in keys]
                )
            except sqlite3.Error as exc:
                raise DiskError(f"sync state {self.path}: {exc}") from None
        if count:
            self._run("DELETE FROM marks")
        return count

    def unstage(self, did: str) -> None:
        """Move ``did``'s staged records into ``records`` (its backfill reached the sink)."""
        self._settle()
        self._run("DELETE FROM records WHERE did = ?", (did,))
        self._run("INSERT INTO records (did, key, cid) SELECT did, key, cid FROM staged WHERE did = ?", (did,))
        self._run("DELETE FROM staged WHERE did = ?", (did,))

    def clear_staged(self, did: str | None = None) -> None:
        """Drop the staged records of ``did`` (None: of every repo)."""
        if did is None:
            self._run("DELETE FROM staged")
        else:
            self._run("DELETE FROM staged WHERE did = ?", (did,))

    # -- buffer: firehose messages of repos being fetched, past the in-memory limit --------------

    def spill(self, did: str, seq: int, message: bytes) -> None:
        """Keep a message of ``did`` (not committed on purpose: see the module docstring)."""
        self._run("INSERT OR REPLACE INTO buffer (did, seq, message) VALUES (?, ?, ?)", (did, seq, message))

    def unspill(self, did: str, limit: int = 100) -> list[tuple[int, bytes]]:
        """Take (and remove) up to ``limit`` of ``did``'s oldest spilled messages, ``(seq, message)``."""
        rows = [(int(s), bytes(m)) for s, m in self._run("SELECT seq, message FROM buffer WHERE did = ? ORDER BY seq LIMIT ?", (did, limit))]
        if rows:
            self._run("DELETE FROM buffer WHERE did = ? AND seq <= ?", (did, rows[-1][0]))
        return rows

    def clear_spilled(self, did: str | None = None) -> None:
        """Drop the spilled messages of ``did`` (None: all)."""
        if did is None:
            self._run("DELETE FROM buffer")
        else:
            self._run("DELETE FROM buffer WHERE did = ?", (did,))

    def counts(self) -> dict[str, int]:
        """Repos by status."""
        self.flush()
        return dict(self._run("SELECT status, COUNT(*) FROM repos GROUP BY status ORDER BY status").fetchall())

    @property
    def cursor(self) -> int | None:
        """The committed firehose cursor, or None."""
        row = self._run("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
        return None if row is None else int(row[0])

    def set_cursor(self, seq: int) -> None:
        """Record the cursor (durable at the next :meth:`commit`)."""
        self._run("INSERT INTO meta (key, value) VALUES ('cursor', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (str(seq),))

    def commit(self) -> None:
        """Make every change so far durable (one transaction)."""
        self.flush()
        try:
            self._db.commit()
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    @staticmethod
    def _check(status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"repo status {status!r} is not one of {sorted(STATUSES)}")
