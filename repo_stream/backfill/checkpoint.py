"""The backfill's checkpoint: an SQLite file recording each finished repo, so a rerun skips them."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterable

import anyio

from ..errors import RepoStreamError
from .results import BackfillResult

__all__ = ["Checkpoint", "is_done"]


_SCHEMA = """
CREATE TABLE IF NOT EXISTS repos (
    source TEXT PRIMARY KEY,
    did TEXT,
    rev TEXT,
    outcome TEXT NOT NULL,          -- 'ok' or 'error'
    error TEXT,
    records INTEGER NOT NULL,
    record_bytes INTEGER NOT NULL,
    spilled INTEGER NOT NULL,
    seconds REAL NOT NULL,
    finished_at REAL NOT NULL       -- Unix time, seconds
)
"""


class Checkpoint:
    """An SQLite file recording each finished repo of a backfill: source, DID, rev, outcome
    (``ok`` or ``error``), error, figures and the time it finished.

    Rows are keyed by source string; recording a source again replaces its row. The database is
    in WAL mode with ``synchronous=NORMAL``: a recorded batch survives the process being killed.
    The ``*_sync`` methods block (use them from threads or synchronous code); the async ones run
    them in a worker thread, one at a time.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        """Open (creating if needed) the checkpoint at ``path``.

        Raises:
            RepoStreamError: SQLite cannot open it or it is not a checkpoint.
        """
        self.path = os.fspath(path)
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA busy_timeout=10000")
            self._conn.execute(_SCHEMA)
        except sqlite3.Error as exc:
            raise RepoStreamError(f"checkpoint {self.path}: {exc}") from exc
        self._limiter = anyio.CapacityLimiter(1)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RepoStreamError(f"checkpoint {self.path} is closed")
        return self._conn

    def lookup_sync(self, sources: list[str]) -> dict[str, BackfillResult]:
        """The recorded results of those of ``sources`` that have one (``skipped=True``)."""
        found: dict[str, BackfillResult] = {}
        db = self._db()
        unique = list(dict.fromkeys(sources))
        try:
            for start in range(0, len(unique), 500):
                part = unique[start : start + 500]
                rows = db.execute(
                    "SELECT source, did, rev, error, records, record_bytes, spilled, seconds, outcome FROM repos "
                    f"WHERE source IN ({', '.join('?' * len(part))})",
                    part,
                ).fetchall()
                for source, did, rev, error, records, record_bytes, spilled, seconds, outcome in rows:
                    if outcome != "ok" and error is None:
                        error = f"recorded as {outcome!r}"
                    found[source] = BackfillResult(source, did, rev, records, record_bytes, bool(spilled), seconds, error, skipped=True)
        except sqlite3.Error as exc:
            raise RepoStreamError(f"checkpoint {self.path}: {exc}") from exc
        return found

    def record_sync(self, results: Iterable[BackfillResult]) -> None:
        """Record finished repos in one transaction (results with ``skipped`` are ignored)."""
        now = time.time()
        rows = [
            (r.source, r.did, r.rev, "ok" if r.error is None else "error", r.error, r.records, r.record_bytes, int(r.spilled), r.seconds, now)
            for r in results
            if not r.skipped
        ]
        if not rows:
            return
        db = self._db()
        try:
            db.execute("BEGIN")
            try:
                db.executemany("INSERT OR REPLACE INTO repos VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            raise RepoStreamError(f"checkpoint {self.path}: {exc}") from exc

    def counts_sync(self) -> dict[str, int]:
        """Recorded repos per outcome, e.g. ``{"ok": 980, "error": 20}``."""
        return dict(self._db().execute("SELECT outcome, count(*) FROM repos GROUP BY outcome").fetchall())

    def close_sync(self) -> None:
        """Close the database (safe to call twice)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def lookup(self, sources: list[str]) -> dict[str, BackfillResult]:
        """:meth:`lookup_sync` in a worker thread."""
        return await anyio.to_thread.run_sync(self.lookup_sync, sources, limiter=self._limiter)

    async def record(self, results: list[BackfillResult]) -> None:
        """:meth:`record_sync` in a worker thread; finishes even if cancelled meanwhile."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.record_sync, results, limiter=self._limiter)

    async def close(self) -> None:
        """:meth:`close_sync` in a worker thread."""
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self.close_sync, limiter=self._limiter)


def is_done(result: BackfillResult | None, retry_failed: bool) -> bool:
    """Whether a recorded result means the repo should not run again."""
    return result is not None and (result.error is None or not retry_failed)

