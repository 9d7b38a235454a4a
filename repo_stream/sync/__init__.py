"""Sync 1.1: partial MSTs from CAR slices, MST edits and inversion, verified ``#commit`` and
``#sync`` events, record proofs, and generated commit events.

Modules: :mod:`.partial` (a partial MST loaded from a CAR slice: lookups, ``walk_slice``;
:func:`read_car_slice`), :mod:`.edit` (insert, update, delete with the exact layer rules),
:mod:`.invert` (ops and their inversion), :mod:`.events` (decoding subscribeRepos frames),
:mod:`.verify` (:func:`verify_commit`, :func:`verify_sync`, :class:`RepoState`, the results),
:mod:`.proof` (record proofs: :func:`prove`, :func:`verify_record_proof`) and :mod:`.generate`
(``#commit`` events made the way a PDS makes them, for tests and benchmarks).

The sync service: :mod:`.state` (per-repo state, record CIDs and the cursor in SQLite:
:class:`~.state.StateStore`), :mod:`.follow` (:func:`~.follow.follow`: verified
:class:`~.follow.RecordEvent` items from a :class:`~repo_stream.firehose.Firehose`) and
:mod:`.service` (:class:`~.service.Sync`: backfill, then follow). They do network I/O through
:mod:`repo_stream.firehose` and are imported on first use (``repo_stream.sync.Sync``): the
firehose imports the frame decoding from here.

Spec: atproto sync (https://atproto.com/specs/sync), "Commit Validation"; proposal 0006.

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.core`, :mod:`repo_stream.crypto`,
:mod:`repo_stream.records` (record values; the writer and the record generator for
:mod:`.generate`); :mod:`.follow` and :mod:`.service` also :mod:`repo_stream.firehose`,
:mod:`repo_stream.net`; :mod:`.service` also :mod:`repo_stream.backfill`. Nothing but
:mod:`.follow` and :mod:`.service` does network I/O.
"""

from typing import TYPE_CHECKING

from ..errors import CommitVerifyError, OutOfSyncError
from .events import Frame, decode_frame
from .invert import Op, invert
from .partial import CarSlice, PartialTree, SliceEntry, read_car_slice
from .proof import ProvenRecord, prove, verify_record_proof
from .verify import RepoState, VerifiedCommit, VerifiedOp, VerifiedSync, verify_commit, verify_sync

if TYPE_CHECKING:
    from .follow import RecordEvent, RepoEvent
    from .service import Sync, SyncStats

__all__ = [
    "Sync",
    "SyncStats",
    "RecordEvent",
    "RepoEvent",
    "verify_commit",
    "verify_sync",
    "RepoState",
    "OutOfSyncError",
    "CommitVerifyError",
    "VerifiedCommit",
    "VerifiedOp",
    "VerifiedSync",
    "Frame",
    "decode_frame",
    "Op",
    "invert",
    "ProvenRecord",
    "prove",
    "verify_record_proof",
    "CarSlice",
    "PartialTree",
    "SliceEntry",
    "read_car_slice",
]

_LAZY = {"Sync": "service", "SyncStats": "service", "RecordEvent": "follow", "RepoEvent": "follow"}


def __getattr__(name: str) -> object:
    """The sync service's names, imported on first use (they import the firehose, which imports
    this package)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'repo_stream.sync' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
