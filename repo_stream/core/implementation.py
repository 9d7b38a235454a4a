"""Which implementation runs the hot path: the C core or the pure-Python reference.

The hot path is three pieces behind one seam: the sans-IO CAR parser, the in-memory block table
and the MST walker. :mod:`repo_stream._native` (C, built by ``pip install .``) implements all
three; :mod:`repo_stream.core.car`, :mod:`repo_stream.core.blocks` and :mod:`repo_stream.core.walk` are the
readable reference and the fallback where the extension is not built. Both give the same records
and the same errors.

``REPO_STREAM_PURE_PYTHON=1`` in the environment forces the reference. :data:`IMPLEMENTATION`
(also ``repo_stream.IMPLEMENTATION``) is ``"c"`` or ``"python"``: the one in use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import blocks, car, cid, messages, runs, walk

__all__ = ["IMPLEMENTATION", "Backend", "available", "backend", "trim_memory", "use"]


@dataclass(frozen=True)
class Backend:
    """One implementation's classes: ``CarParser(max_block_size, verify_cids)``,
    ``BlockTable(root, process, encode)`` and ``Walker(root, nodes, values, *, max_depth, strict,
    record_cids)``, with the methods of :class:`repo_stream.core.car.CarParser`,
    :class:`repo_stream.core.blocks.MemoryBlocks` and :class:`repo_stream.core.walk.Walker`; and the spill
    store's sorted runs, :func:`repo_stream.core.runs.pack_run` and ``RunMerge`` (whose ``index()``
    gives a ``RunIndex``), the same bytes from both; ``transcode_json(block) -> str``, a record
    block as its atproto JSON text (:mod:`repo_stream.records.json_text`); ``cid_text(raw) ->
    str``, a binary CID's usual text (:func:`repo_stream.core.cid.cid_text`); and
    ``record_line`` and ``record_events``, a sync record event's JSON line and a verified
    commit's record events made in C (``None`` for the reference, which makes them in Python:
    :meth:`repo_stream.sync.follow.RecordEvent.to_json_line`,
    :func:`repo_stream.sync.service.record_events`)."""

    name: str
    CarParser: Any
    BlockTable: Any
    Walker: Any
    pack_run: Any
    RunMerge: Any
    transcode_json: Any
    cid_text: Any
    record_line: Any = None
    record_events: Any = None


def _python_transcode_json(block: bytes) -> str:
    from ..records.json_text import _python_transcode_json as transcode  # records imports core: lazily

    return transcode(block)


PYTHON = Backend("python", car.CarParser, blocks.MemoryBlocks, walk.Walker, runs.pack_run, runs.RunMerge, _python_transcode_json, cid.cid_text)
C: Backend | None
#: Why the C core could not be imported (``None`` when it was): the ImportError's message.
NATIVE_IMPORT_ERROR: str | None = None
#: ``REPO_STREAM_PURE_PYTHON`` asked for the reference (rather than the C core being missing).
PURE_PYTHON_ASKED: bool = os.environ.get("REPO_STREAM_PURE_PYTHON", "") not in ("", "0")
try:
    from .. import _native
except ImportError as exc:  # not built (or not loadable): the reference runs
    C = None
    NATIVE_IMPORT_ERROR = str(exc) or type(exc).__name__
else:
    _native.setup(messages=messages, not_a_node=blocks.NOT_A_NODE, cid_text=cid.cid_text)
    C = Backend("c", _native.CarParser, _native.BlockTable, _native.Walker, _native.pack_run, _native.RunMerge, _native.transcode_json, _native.cid_text, _native.record_line, _native.record_events)

_BACKENDS = {"python": PYTHON, **({"c": C} if C is not None else {})}
_active: Backend = PYTHON if C is None or PURE_PYTHON_ASKED else C
#: The implementation in use: ``"c"`` or ``"python"``.
IMPLEMENTATION: str = _active.name


def trim_memory() -> None:
    """Hand freed heap memory back to the operating system now, where the C core is built and
    the C library is glibc (``malloc_trim``); otherwise nothing. The disk store calls it when it
    closes a database: SQLite's page cache (up to ``disk_cache_mb``) is freed in the arena of
    the thread that ran it, and glibc keeps that in the process."""
    if C is not None:
        _native.trim_memory()


def available() -> list[str]:
    """The implementations that can run here: ``["c", "python"]``, or ``["python"]`` if not built."""
    return sorted(_BACKENDS)


def backend() -> Backend:
    """The implementation drivers use for the next ``load_car``."""
    return _active


def use(name: str) -> None:
    """Switch the implementation for later loads (``"c"`` or ``"python"``); for tests and benchmarks.

    Raises:
        ValueError: ``name`` is not one of :func:`available`.
    """
    global _active, IMPLEMENTATION
    if name not in _BACKENDS:
        raise ValueError(f"implementation {name!r} is not available here (available: {', '.join(available())})")
    _active = _BACKENDS[name]
    IMPLEMENTATION = name
    import repo_stream

    repo_stream.IMPLEMENTATION = name
