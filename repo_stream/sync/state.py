"""The sync service's per-repo state, in SQLite: each repo's status, rev and MST root, and the
stream cursor.

Table ``repos(did, status, rev, data, updated)``: ``status`` is one of :data:`STATUSES`,
``rev`` the last verified rev (a TID) and ``data`` the MST root it has (a base32 CID string),
both NULL before the first backfill. Table ``meta(key, value)`` holds the firehose ``cursor``
(the seq of the last event whose changes the consumer took). Writes become durable at
:meth:`StateStore.commit` (one SQLite transaction), so a crash loses only what was not
committed, and a restart re-delivers it.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from types import TracebackType
from typing import Final, NamedTuple, Self

from ..errors import DiskError

__all__ = ["STATUSES", "RepoRow", "StateStore"]

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
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS repos (did TEXT PRIMARY KEY, status TEXT NOT NULL, rev TEXT, data TEXT, updated REAL)")
            self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            self._db.commit()
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the file (what was not committed is rolled back)."""
        self._db.close()

    def _run(self, sql: str, args: tuple[object, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    def add(self, did: str, status: str = "pending") -> None:
        """Track ``did`` (no change when it is tracked already)."""
        self._check(status)
        self._run("INSERT OR IGNORE INTO repos (did, status, updated) VALUES (?, ?, ?)", (did, status, time.time()))

    def get(self, did: str) -> RepoRow | None:
        """The repo's state, or None when it is not tracked."""
        row = self._run("SELECT did, status, rev, data FROM repos WHERE did = ?", (did,)).fetchone()
        return None if row is None else RepoRow(*row)

    def set(self, did: str, status: str, rev: str | None = None, data: str | None = None) -> None:
        """Set the repo's status and, when given, its rev and data (tracking it if it was not)."""
        self._check(status)
        self._run(
            "INSERT INTO repos (did, status, rev, data, updated) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT(did) DO UPDATE SET status = excluded.status, rev = COALESCE(excluded.rev, rev), "
            "data = COALESCE(excluded.data, data), updated = excluded.updated",
            (did, status, rev, data, time.time()),
        )

    def counts(self) -> dict[str, int]:
        """Repos by status."""
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
        try:
            self._db.commit()
        except sqlite3.Error as exc:
            raise DiskError(f"sync state {self.path}: {exc}") from None

    @staticmethod
    def _check(status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"repo status {status!r} is not one of {sorted(STATUSES)}")
