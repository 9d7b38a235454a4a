"""Reading one repo: the high-level API (:mod:`.repo`: :func:`open_repo`, :class:`Record`,
:func:`get_record`; :mod:`.blocking`: :func:`iter_records`, :func:`get_record_sync`) on top of the
low-level drivers (:mod:`.drivers`: :class:`DriverBuilder`, :class:`MemoryDriver`,
:class:`NeedDisk`, :class:`DiskDriver`).

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.core`, :mod:`repo_stream.spill`, and
(lazily, for sources that are names or URLs) :mod:`repo_stream.net`.
"""

from .blocking import get_record_sync, iter_records
from .drivers import DEFAULT_MEM_LIMIT_MB, DiskDriver, DriverBuilder, MemoryDriver, NeedDisk
from .repo import OpenRepo, Record, Repo, get_record, open_repo

__all__ = [
    "DEFAULT_MEM_LIMIT_MB",
    "DiskDriver",
    "DriverBuilder",
    "MemoryDriver",
    "NeedDisk",
    "OpenRepo",
    "Record",
    "Repo",
    "get_record",
    "get_record_sync",
    "iter_records",
    "open_repo",
]
