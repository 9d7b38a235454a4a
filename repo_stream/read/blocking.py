"""The synchronous forms of the high-level API, for scripts and notebooks: no event loop in sight.

Example::

    import repo_stream

    for record in repo_stream.iter_records("repo.car", collections=["app.bsky.feed.post"]):
        print(record.rkey, record.value["text"])

In a plain script the walk runs on a private asyncio event loop in the calling thread, driven a
chunk (:data:`~repo_stream.read.repo.CHUNK_SIZE` records) at a time. Inside a running event loop
(Jupyter, an async web handler) it runs on an event loop of its own in a worker thread (anyio's
blocking portal) instead; the caller's loop is blocked while it waits for each chunk, as for any
blocking call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import sniffio
from anyio.from_thread import start_blocking_portal

from .repo import CHUNK_SIZE, OpenRepo, Record, RepoSource, Values, get_record, open_repo

if TYPE_CHECKING:
    from ..records.values import JsonValue, RecordValue

__all__ = ["get_record_sync", "iter_records"]

U = TypeVar("U")


@overload
def iter_records(source: RepoSource, *, values: Literal["json"] = ..., **options: Any) -> Iterator[Record[dict[str, JsonValue]]]: ...
@overload
def iter_records(source: RepoSource, *, values: Literal["raw"], **options: Any) -> Iterator[Record[bytes]]: ...
@overload
def iter_records(source: RepoSource, *, values: Literal["python"], **options: Any) -> Iterator[Record[dict[str, RecordValue]]]: ...
@overload
def iter_records(source: RepoSource, *, values: Callable[[bytes], U], **options: Any) -> Iterator[Record[U]]: ...
def iter_records(source: RepoSource, *, values: Values | Callable[[bytes], Any] = "json", **options: Any) -> Iterator[Record[Any]]:
    """Every record of a repo in key order, synchronously: ``for record in iter_records(SOURCE):``.

    A generator over :func:`~repo_stream.open_repo` (same arguments, same :class:`Record` items,
    spilling to a temporary store by itself past ``mem_limit_mb``). Nothing is opened until the
    first record is asked for. Leaving the loop early (``break``, an exception) or closing the
    generator stops the walk and closes the source and the spill store; a generator dropped
    without closing is closed when it is garbage-collected.

    Args:
        source: as for :func:`~repo_stream.open_repo`: a SOURCE string, a path, bytes, an open
            binary file.
        values: as for :func:`~repo_stream.open_repo` (default ``"json"``).
        **options: the other keyword arguments of :func:`~repo_stream.open_repo`
            (``collections``, ``mem_limit_mb``, ``spill_dir``, ``verify``, ...).

    Raises:
        RepoStreamError: the errors of :func:`~repo_stream.open_repo` and
            :meth:`Repo.next_chunk <repo_stream.Repo.next_chunk>`, raised in the calling thread.
    """
    return _iterate(open_repo(source, values=values, **options))  # options checked now, in the caller


def _iterate(opener: OpenRepo[U]) -> Iterator[Record[U]]:
    try:
        sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:  # the usual case, a script: a loop of our own, here
        yield from _iterate_here(opener)
    else:  # inside a running asyncio or trio loop (a notebook): the walk's loop runs in a worker thread
        yield from _iterate_in_thread(opener)


def _iterate_here(opener: OpenRepo[U]) -> Iterator[Record[U]]:
    """Drive the walk on a private asyncio loop in this thread, one ``run_until_complete`` per
    chunk: no thread hop (a worker thread's loop cost ~0.7 ms of hand-over per chunk here)."""
    loop = asyncio.new_event_loop()
    threads_before = set(threading.enumerate())
    try:
        repo = loop.run_until_complete(opener.__aenter__())
        try:
            while (chunk := loop.run_until_complete(repo.next_chunk(CHUNK_SIZE))) is not None:
                yield from chunk
        except BaseException as exc:  # GeneratorExit when the loop is left early: close everything
            loop.run_until_complete(opener.__aexit__(type(exc), exc, exc.__traceback__))
            raise
        loop.run_until_complete(opener.__aexit__(None, None, None))
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()
            # anyio's worker threads (spill store calls) were told to stop as each step's task
            # ended; wait for them, so that nothing of the walk outlives the iterator
            for thread in set(threading.enumerate()) - threads_before:
                if getattr(thread, "loop", None) is loop:  # anyio's WorkerThread of this loop
                    thread.join(timeout=5.0)


def _iterate_in_thread(opener: OpenRepo[U]) -> Iterator[Record[U]]:
    with start_blocking_portal() as portal, portal.wrap_async_context_manager(opener) as repo:
        while (chunk := portal.call(repo.next_chunk, CHUNK_SIZE)) is not None:
            yield from chunk


@overload
def get_record_sync(source: RepoSource, key: str, *, values: Literal["json"] = ..., **options: Any) -> Record[dict[str, JsonValue]] | None: ...
@overload
def get_record_sync(source: RepoSource, key: str, *, values: Literal["raw"], **options: Any) -> Record[bytes] | None: ...
@overload
def get_record_sync(
    source: RepoSource, key: str, *, values: Literal["python"], **options: Any
) -> Record[dict[str, RecordValue]] | None: ...
@overload
def get_record_sync(source: RepoSource, key: str, *, values: Callable[[bytes], U], **options: Any) -> Record[U] | None: ...
def get_record_sync(
    source: RepoSource, key: str, *, values: Values | Callable[[bytes], Any] = "json", **options: Any
) -> Record[Any] | None:
    """:func:`~repo_stream.get_record`, synchronously: one record, or None if there is none at
    ``key`` (``collection/rkey``).

    Raises:
        InvalidKeyError: ``key`` is not ``collection/rkey``. The errors of
        :func:`~repo_stream.open_repo`.
    """
    with start_blocking_portal() as portal:
        record: Record[Any] | None = portal.call(partial(get_record, source, key, values=values, **options))
        return record
