"""Sync 1.1: partial MSTs from CAR slices, MST edits and inversion, verified ``#commit`` and
``#sync`` events, and record proofs.

Modules: :mod:`.partial` (a partial MST loaded from a CAR slice: lookups, ``walk_slice``),
:mod:`.edit` (insert, update, delete with the exact layer rules), :mod:`.invert` (ops and their
inversion).

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.core`, :mod:`repo_stream.crypto`,
:mod:`repo_stream.records` (record values, and the writer for generated events). Nothing here
does network I/O.
"""

from .invert import Op, invert
from .partial import PartialTree, SliceEntry

__all__ = ["Op", "PartialTree", "SliceEntry", "invert"]
