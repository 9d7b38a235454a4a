"""Where a backfill's records go: the :class:`RepoSink` protocol and :class:`JsonlSink`, which
writes each repo's records to a JSON-lines file."""

from __future__ import annotations

import base64
import fcntl
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio

from ..core.commit import Commit
from ..errors import RepoStreamError

__all__ = ["JsonlSink", "RepoSink", "bytes_value", "json_value"]


class RepoSink(Protocol):
    """Receives each repo's records: an async callable ``sink(source, commit, items)``.

    ``items`` is one chunk (a list) of ``(key, cid, value)`` tuples in key order: ``key`` the MST
    key ``collection/rkey``, ``cid`` the record's CID (base32 str), ``value`` the record block's
    raw DAG-CBOR bytes. A sink may also define ``async finish(source, commit, error)``, called
    once per repo whose commit was read, after its last chunk, with ``error`` None on success or
    the exception that ended the repo. A sink that raises fails that repo only. A sink whose
    output is keyed by DID sets ``keyed_by_did = True``: the backfill then runs each DID once
    (a second source for it gets a ``DuplicateRepoError`` result).
    """

    def __call__(self, source: str, commit: Commit, items: list[Any]) -> Awaitable[None]: ...


def bytes_value(block: bytes) -> Any:
    """The raw block as ``{"$bytes": base64}`` (atproto's JSON form of bytes), for records that
    need not be decoded."""
    return {"$bytes": base64.b64encode(block).decode("ascii")}


def json_value(block: bytes) -> Any:
    """The default :class:`JsonlSink` value: the record in the atproto JSON form, as ``dump``
    writes it (:func:`repo_stream.records.record_json`). As the sink's ``value`` it is not called:
    the sink writes :func:`repo_stream.records.json_text.transcode_json`'s text instead (the same
    JSON, non-ASCII characters written as UTF-8 rather than ``\\u`` escapes)."""
    from ..records.values import record_json

    return record_json(block)


class JsonlSink:
    """Writes each repo's records to ``DIR/<did>.jsonl``: one ``{"key", "cid", "value"}`` object a
    line, in key order, as UTF-8 JSON (non-ASCII characters as they are, like ``dump``).

    ``value`` converts the record block's bytes to a JSON value (default :func:`json_value`, the
    ``dump`` format; :func:`bytes_value` keeps the raw block).
    A repo is written to ``<did>.jsonl.part``, locked (``flock``) while it is written, and when
    complete flushed to disk (``fsync``), renamed to ``<did>.jsonl`` and the folder fsynced, all
    before its result is yielded (and recorded in a checkpoint); a repo that fails leaves no file.
    Output is keyed by DID (``keyed_by_did``): the backfill runs each DID once, and a second
    writer of the same DID at once (another process) fails its repo instead of mixing the files.
    Picklable (it holds only the folder and the converter), so cluster workers can use it.
    """

    keyed_by_did = True

    def __init__(self, directory: str | os.PathLike[str], value: Callable[[bytes], Any] = json_value) -> None:
        self.directory = os.fspath(directory)
        self.value = value
        self._files: dict[tuple[str, str], Any] = {}
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "value": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["value"])  # type: ignore[misc]

    def path(self, did: str) -> str:
        """The output path of ``did``'s records."""
        return os.path.join(self.directory, did.replace("/", "_") + ".jsonl")

    def _open_locked(self, did: str) -> Any:
        """``<did>.jsonl.part``, created or emptied, under an exclusive lock; a text file."""
        os.makedirs(self.directory, exist_ok=True)
        part = self.path(did) + ".part"
        while True:
            fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # The lock is on the file opened, which another writer may have renamed into place
                # (finished) between our open and our lock: then it is that writer's output, not
                # a .part to empty. Take the lock on the file now at the .part name instead.
                try:
                    current = os.stat(part)
                except FileNotFoundError:
                    current = None
                if current is not None and (current.st_ino, current.st_dev) == (os.fstat(fd).st_ino, os.fstat(fd).st_dev):
                    break
                os.close(fd)
            except BlockingIOError:
                os.close(fd)
                raise RepoStreamError(
                    f"{part} is being written by another writer of {did} (a duplicate in another process); not written twice"
                ) from None
            except BaseException:
                os.close(fd)
                raise
        os.ftruncate(fd, 0)
        return open(fd, "w", encoding="utf-8", errors="surrogateescape")

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        key = (source, commit.did)
        file = self._files.get(key)
        if file is None:
            file = self._files[key] = anyio.wrap_file(await anyio.to_thread.run_sync(self._open_locked, commit.did))
        value = self.value
        if value is json_value:  # the C core's transcoder: the record's JSON text, made in one pass
            from ..records.json_text import json_text_processor

            transcode = json_text_processor()
            text = "".join([f'{{"key":"{k}","cid":"{c}","value":{transcode(v)}}}\n' for k, c, v in items])
        else:
            dumps = self._dumps
            text = "".join(dumps({"key": k, "cid": c, "value": value(v)}) + "\n" for k, c, v in items)
        await file.write(text)

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Close the repo's file: on success fsync it, rename it into place and fsync the
        folder; on failure remove it."""
        file = self._files.pop((source, commit.did), None)
        if file is None:
            if error is None:  # an empty repo: no chunk came
                file = anyio.wrap_file(await anyio.to_thread.run_sync(self._open_locked, commit.did))
            else:
                return
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._close, file.wrapped, self.path(commit.did), error is None)

    def _close(self, file: Any, path: str, keep: bool) -> None:
        try:
            if keep:
                file.flush()
                os.fsync(file.fileno())
                os.replace(path + ".part", path)
                folder = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(folder)
                finally:
                    os.close(folder)
            else:
                try:
                    os.unlink(path + ".part")
                except FileNotFoundError:
                    pass
        finally:
            file.close()  # the lock goes with it, after the rename
