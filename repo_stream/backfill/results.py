"""What a backfill yields: one :class:`BackfillResult` per repo, and the running
:class:`BackfillStats` of a run (for progress displays)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["BackfillResult", "BackfillStats"]


@dataclass(frozen=True, slots=True)
class BackfillResult:
    """The outcome of one repo of a backfill.

    Attributes:
        source: the source string as given (DID, handle, URL, path...).
        did: the commit's DID, or the DID asked for if the repo failed before its commit was
            read, or None (a path or URL whose commit was never read).
        rev: the commit's rev (a TID string), or None.
        records: records walked (on failure: those walked before it).
        record_bytes: the sum of the records' block lengths, bytes.
        spilled: True if the repo went past ``mem_limit_mb`` and was finished by a disk worker.
        seconds: wall time from opening the source to the last record (or the failure).
        error: None on success, else one line saying what went wrong (the exception's class and
            message, naming the DID, URL or CID).
        skipped: True if this result was read back from the checkpoint rather than run now.
        verified: what was checked, on success: ``"cids"`` (every block against its CID and
            every MST rule), ``"cids+signature"`` (that and the commit's signature), or None
            (nothing beyond reading: ``verify`` off, a failure, or a result read back from the
            checkpoint).
    """

    source: str
    did: str | None
    rev: str | None
    records: int
    record_bytes: int
    spilled: bool
    seconds: float
    error: str | None
    skipped: bool = False
    verified: str | None = None

    @property
    def ok(self) -> bool:
        """True when the repo was walked to its end without error."""
        return self.error is None

    def to_json(self) -> dict[str, Any]:
        """The CLI's ``--json`` object: ``{"repo", "did", "rev", "records", "record_bytes",
        "spilled", "seconds", "error", "skipped", "verified"}``."""
        data = asdict(self)
        data["repo"] = data.pop("source")
        data["seconds"] = round(self.seconds, 6)
        return {key: data[key] for key in ("repo", "did", "rev", "records", "record_bytes", "spilled", "seconds", "error", "skipped", "verified")}


@dataclass
class BackfillStats:
    """Live counters of a run (pass one to :func:`backfill` as ``stats=`` to watch it).

    Attributes:
        inputs: sources read so far. done: results yielded. failed: results with an error.
        skipped: results read back from the checkpoint. spilled: repos finished by disk workers.
        records, record_bytes: totals over the results yielded (bytes).
        in_memory: repos whose blocks are held in memory right now (loading, walking, or waiting
            for or in the disk queue); in_memory_peak: its highest value.
        disk_queue: NeedDisks waiting in the disk queue now; disk_queue_peak: its highest value;
            disk_queue_size: the queue's bound.
        refetched: fetches made again after a truncated or incomplete CAR (in this process).
        started: ``time.monotonic()`` at the start.
    """

    inputs: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    spilled: int = 0
    records: int = 0
    record_bytes: int = 0
    in_memory: int = 0
    in_memory_peak: int = 0
    disk_queue: int = 0
    disk_queue_peak: int = 0
    disk_queue_size: int = 0
    refetched: int = 0
    started: float = field(default_factory=time.monotonic)

    def count(self, result: BackfillResult) -> None:
        """Add one yielded result to the totals."""
        self.done += 1
        self.failed += result.error is not None
        self.skipped += result.skipped
        self.spilled += result.spilled and not result.skipped
        if not result.skipped:
            self.records += result.records
            self.record_bytes += result.record_bytes

    def _hold(self, n: int) -> None:
        self.in_memory += n
        self.in_memory_peak = max(self.in_memory_peak, self.in_memory)
