"""repo-stream: stream the records of an atproto repository CAR in key order, in bounded memory.

The high-level API: ``async with open_repo(SOURCE) as repo: async for record in repo: ...``
(:func:`open_repo`, a :class:`Repo` of :class:`Record` items, spilling to disk by itself), its
synchronous form :func:`iter_records`, and :func:`get_record` / :func:`get_record_sync` for one
record. SOURCE is a path, bytes, an open file, a getRepo URL, a DID, a handle or an ``at://`` URI.

The low-level API (after the Rust crate repo-stream): load a CAR with :class:`DriverBuilder`; if
it fits the memory limit you get a :class:`MemoryDriver`, else a :class:`NeedDisk` to finish
into a :class:`DiskStore` (from :class:`DiskBuilder`), giving a :class:`DiskDriver`. Either
driver yields ``(key, value)`` items in strictly increasing key order. Every error is a
:class:`RepoStreamError`. :func:`build_repo_car` writes canonical repo CARs.
:func:`decode_record` and :func:`record_json` are ready block processors that give records as
Python values or in the atproto JSON form (:mod:`repo_stream.records`).
"""

from typing import TYPE_CHECKING

from .core.commit import Commit
from .core.implementation import IMPLEMENTATION
from .errors import *  # noqa: F403 - the error classes are part of the public API
from .errors import __all__ as _error_names
from .read.blocking import get_record_sync, iter_records
from .read.drivers import DEFAULT_MEM_LIMIT_MB, DiskDriver, DriverBuilder, MemoryDriver, NeedDisk
from .read.repo import OpenRepo, Record, Repo, get_record, open_repo
from .spill.store import DiskBuilder, DiskStore

__version__ = "0.1.0"

__all__ = [
    "open_repo",
    "iter_records",
    "get_record",
    "get_record_sync",
    "OpenRepo",
    "Record",
    "Repo",
    "DEFAULT_MEM_LIMIT_MB",
    "Commit",
    "DiskBuilder",
    "DiskDriver",
    "DiskStore",
    "DriverBuilder",
    "IMPLEMENTATION",
    "MemoryDriver",
    "NeedDisk",
    "build_repo_car",
    "Link",
    "JSON_CODEC",
    "RECORD_CODEC",
    "decode_record",
    "record_json",
    "to_json_value",
    "Sync",
    "RecordEvent",
    "RepoEvent",
    *_error_names,
]

_LAZY = {
    "JSON_CODEC": "records.values",
    "RECORD_CODEC": "records.values",
    "Link": "records.values",
    "decode_record": "records.values",
    "record_json": "records.values",
    "to_json_value": "records.values",
    "build_repo_car": "records.writer",
    "Sync": "sync.service",
    "RecordEvent": "sync.follow",
    "RepoEvent": "sync.follow",
}

if TYPE_CHECKING:  # the lazily imported names, precisely typed for type checkers
    from .records.values import JSON_CODEC, RECORD_CODEC, Link, decode_record, record_json, to_json_value
    from .records.writer import build_repo_car
    from .sync.follow import RecordEvent, RepoEvent
    from .sync.service import Sync


def __getattr__(name: str) -> object:
    """Import the record decoders, the CAR writer and the sync service on first use (start-up
    stays short: cbrrr, the writer and the firehose are not needed to walk a repo)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'repo_stream' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
