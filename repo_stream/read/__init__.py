"""Reading one repo: the low-level drivers (:mod:`.drivers`: :class:`DriverBuilder`,
:class:`MemoryDriver`, :class:`NeedDisk`, :class:`DiskDriver`).

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.core`, :mod:`repo_stream.spill`, and
(lazily, for sources that are names or URLs) :mod:`repo_stream.net`.
"""

from .drivers import DiskDriver, DriverBuilder, MemoryDriver, NeedDisk

__all__ = ["DiskDriver", "DriverBuilder", "MemoryDriver", "NeedDisk"]
