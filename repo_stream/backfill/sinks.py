"""Where a backfill's records go: the :class:`RepoSink` protocol and :class:`JsonlSink`, which
writes each repo's records to a JSON-lines file."""

from __future__ import annotations

import base64
import fcntl
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import anyio

from ..core.commit import Commit
from ..errors import RepoStreamError

__all__ = [
    "EventSink",
    "JsonlSink",
    "RECORD_COLUMNS",
    "REPO_STATUSES",
    "RecordOp",
    "RepoSink",
    "bytes_value",
    "json_value",
    "open_sink",
]


class RepoSink(Protocol):
    """Receives each repo's records: an async callable ``sink(source, commit, items)``.

    The protocol, as the backfill calls it (:func:`repo_stream.backfill.backfill`):

    - ``await sink(source, commit, items)``, once per chunk of a repo, in key order: ``items`` is
      a list of ``(key, cid, value)`` tuples, ``key`` the MST key ``collection/rkey``, ``cid`` the
      record's CID (base32 str), ``value`` the record block's raw DAG-CBOR bytes. ``commit`` (a
      :class:`~repo_stream.core.commit.Commit`) gives the repo's DID, rev and data CID. Chunks of
      different repos interleave (one repo per worker at once); a repo is keyed by
      ``(source, commit.did)``.
    - ``await sink.finish(source, commit, error)`` (optional), once per repo whose commit was
      read, after its last chunk: ``error`` None on success, else the exception that ended the
      repo (a cancellation included: then the call is shielded). On success the sink makes the
      repo durable here (commit a transaction, rename a file) and returns only once it is; on
      failure it drops what it holds of the repo. Only after ``finish`` returned without raising
      is the repo's result yielded and recorded in the checkpoint, so a checkpoint never names a
      repo the sink has not made durable. A sink raising (in a chunk or in ``finish``) fails that
      repo only; ``finish`` is still called after a chunk raised.
    - Batches (optional): a sink with an async method ``write_batch(source, commit, batch)`` and
      an attribute ``batch_values`` (``"raw"`` or ``"json_text"``) gets the repo's records as the
      walker's own Arrow batches instead of tuple chunks (``await sink.write_batch(...)`` in place
      of ``await sink(...)``, with the same order, interleaving and ``finish``): ``batch`` is a
      ``pyarrow.RecordBatch`` of ``driver.next_batch(batch_rows, values=batch_values)``
      (:mod:`repo_stream.read.arrow`: columns ``key``, ``collection`` (dictionary), ``rkey``,
      ``cid``, ``value``: the block's bytes, or its atproto JSON text), written by the C walker
      straight into Arrow buffers (no Python object per record). ``batch_rows`` (optional
      attribute, default 65536) is the most records a batch holds; a batch ends sooner at the
      per-repo memory limit's bytes. ``batch_values = "json_lines"``: ``batch`` is instead one
      ``bytes`` of ``driver.next_json_lines(batch_rows)``, ``repo-stream dump``'s lines (UTF-8
      ``{"key","cid","value"}`` and a newline per record). A record that is not valid DAG-CBOR
      (``json_text``, ``json_lines``) fails the repo with a
      :class:`~repo_stream.errors.RecordDecodeError` naming the DID, before its batch reaches the
      sink. ``batch_block_bytes = True`` (optional attribute): ``write_batch`` is called with the
      keyword ``block_bytes``, the bytes of the batch's record blocks (before transcoding).
      The store sinks here take batches; such a sink still takes tuple chunks when called as
      ``sink(source, commit, items)``.
    - ``keyed_by_did = True`` (optional attribute): the sink's output is keyed by DID; the backfill
      then runs each DID once per run (a second source for it gets a ``DuplicateRepoError``).
      Such a sink replaces a DID's earlier output when the repo comes again (a resumed run redoes
      a repo whose ``finish`` ended but whose checkpoint row was lost: no duplicate).

    A sink whose output is a store (:class:`~repo_stream.backfill.DuckdbSink`,
    :class:`~repo_stream.backfill.ParquetSink`, :class:`~repo_stream.backfill.PostgresSink`) writes
    the columns :data:`RECORD_COLUMNS` and may also implement :class:`EventSink` (the events of a
    sync). The sinks here need the extras of their stores (``repo-stream[duckdb]``,
    ``[parquet]``, ``[postgresql]``).
    """

    def __call__(self, source: str, commit: Commit, items: list[Any]) -> Awaitable[None]: ...


#: The columns a store sink writes per record, in order: the account's DID, the record's
#: collection (NSID) and rkey (its MST key split at the first ``/``), its CID (base32 str), the
#: repo's rev (TID str) when the record was written, and ``value`` (the record's atproto JSON
#: text, :func:`repo_stream.records.json_text.transcode_json`; or with ``raw`` its DAG-CBOR bytes).
RECORD_COLUMNS = ("did", "collection", "rkey", "cid", "rev", "value")

#: The states of a repo in a store's ``repos`` table: ``active`` after a backfill or a sync commit;
#: the others as a sync ``#account`` event reports them.
REPO_STATUSES = ("active", "takendown", "suspended", "deleted", "deactivated")


@dataclass(frozen=True, slots=True)
class RecordOp:
    """One record change of a sync commit, for :meth:`EventSink.apply`.

    Attributes:
        action: ``"create"``, ``"update"`` or ``"delete"`` (the op's action).
        collection, rkey: the record's key, split at the first ``/``.
        cid: the new record's CID (base32 str); None for a delete.
        value: the new record block's DAG-CBOR bytes; None for a delete.
    """

    action: str
    collection: str
    rkey: str
    cid: str | None = None
    value: bytes | None = None


class EventSink(Protocol):
    """A store that also takes the events of a sync (room for ``repo-stream sync --out``; the
    backfill does not call it). Each call is one transaction: its rows and the repo's ``repos``
    row (rev, data CID, status) commit together.

    Implemented by :class:`JsonlSink` (events appended to ``DIR/<did>.events.jsonl``),
    :class:`~repo_stream.backfill.DuckdbSink` and :class:`~repo_stream.backfill.PostgresSink`
    (rows upserted and deleted in place) and :class:`~repo_stream.backfill.ParquetSink` (change
    rows with an ``action`` column, Parquet files being append-only). A resync (a ``#sync``
    event, or a repo whose commits cannot be applied) is a backfill of the repo through the same
    sink as a :class:`RepoSink`: its rows are replaced by the new version's.

    The database sinks also take ``cursor=(stream, seq)`` (keyword) in both calls and store it
    in their ``sync_cursor`` table in the same transaction, and read it back with
    ``await sink.load_cursor(stream)``: a sync that resumes from there applies each event
    exactly once across a crash.
    """

    async def apply(self, did: str, rev: str, data: str, ops: Sequence[RecordOp]) -> None:
        """Apply one commit's ops (creates and updates upsert, deletes delete) and set the repo's
        rev and data CID."""
        ...

    async def set_status(self, did: str, status: str) -> None:
        """Record an ``#account`` event's status (one of :data:`REPO_STATUSES`)."""
        ...


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
    Sync events (:class:`EventSink`) go to ``DIR/<did>.events.jsonl``, a line each
    (:meth:`apply`, :meth:`set_status`).

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
    #: Records per batch of JSON lines (:meth:`write_batch`).
    batch_rows = 4096

    def __init__(self, directory: str | os.PathLike[str], value: Callable[[bytes], Any] = json_value) -> None:
        self.directory = os.fspath(directory)
        self.value = value
        self._files: dict[tuple[str, str], Any] = {}
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    @property
    def batch_values(self) -> str | None:
        """``"json_lines"`` with the default ``value`` (:func:`json_value`): the backfill hands
        :meth:`write_batch` the walker's own lines (:class:`RepoSink`); else None (tuple chunks)."""
        return "json_lines" if self.value is json_value else None

    async def write_batch(self, source: str, commit: Commit, lines: bytes) -> None:
        """Append a batch of the repo's lines (``driver.next_json_lines``: the lines :meth:`__call__`
        writes, made by the C walker) to its file."""
        key = (source, commit.did)
        file = self._files.get(key)
        if file is None:
            file = self._files[key] = anyio.wrap_file(await anyio.to_thread.run_sync(self._open_locked, commit.did))
        await anyio.to_thread.run_sync(_write_bytes, file.wrapped, lines)

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
                try:  # a resync: the events of the repo's earlier version are superseded
                    os.unlink(path.removesuffix(".jsonl") + ".events.jsonl")
                except FileNotFoundError:
                    pass
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

    # -- sync events (EventSink) --

    def events_path(self, did: str) -> str:
        """The file of ``did``'s sync events (:meth:`apply`, :meth:`set_status`)."""
        return os.path.join(self.directory, did.replace("/", "_") + ".events.jsonl")

    def _append(self, did: str, line: str) -> None:
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.events_path(did), os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = line.encode("utf-8", "surrogateescape")
            while data:
                data = data[os.write(fd, data) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    async def apply(self, did: str, rev: str, data: str, ops: Sequence[RecordOp]) -> None:
        """Append one sync commit to ``DIR/<did>.events.jsonl`` as one line
        ``{"rev", "data", "ops": [{"action", "key", "cid", "value"}]}`` (``value`` as the
        sink's converter makes it; ``cid`` and ``value`` null for a delete), written with one
        ``write`` and fsynced: the line is the commit. The repo's records are its ``.jsonl``
        file's with its events' ops applied in order (a key's last op wins; a backfill of the
        repo, i.e. a resync, removes the events file before renaming the new ``.jsonl`` into place).

        Raises:
            RecordDecodeError: a block is not valid DAG-CBOR (nothing written).
            SinkError: an op is malformed.
            OSError: the file cannot be written.
        """
        from ..errors import SinkError

        if self.value is json_value:
            from ..records.json_text import json_text_processor

            transcode = json_text_processor()
        out = []
        for op in ops:
            if op.action not in ("create", "update", "delete"):
                raise SinkError(f"{did}: op {op.collection}/{op.rkey}: unknown action {op.action!r}")
            key = f"{op.collection}/{op.rkey}"
            if op.action == "delete":
                out.append(f'{{"action":"delete","key":{self._dumps(key)},"cid":null,"value":null}}')
                continue
            if op.cid is None or op.value is None:
                raise SinkError(f"{did}: {op.action} of {key} has no CID or block")
            try:
                value = transcode(op.value) if self.value is json_value else self._dumps(self.value(op.value))
            except RepoStreamError as exc:
                raise type(exc)(f"{did}: {key}: {exc}") from exc
            out.append(f'{{"action":"{op.action}","key":{self._dumps(key)},"cid":"{op.cid}","value":{value}}}')
        line = f'{{"rev":{self._dumps(rev)},"data":{self._dumps(data)},"ops":[{",".join(out)}]}}\n'
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._append, did, line)

    async def set_status(self, did: str, status: str) -> None:
        """Append ``{"status": status}`` to ``DIR/<did>.events.jsonl`` (one line, fsynced).

        Raises:
            SinkError: the status is not one of :data:`REPO_STATUSES`.
            OSError: the file cannot be written.
        """
        from ..errors import SinkError

        if status not in REPO_STATUSES:
            raise SinkError(f"{did}: status {status!r} is not one of {', '.join(REPO_STATUSES)}")
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(self._append, did, f'{{"status":{self._dumps(status)}}}\n')


def _write_bytes(file: Any, data: bytes) -> None:
    """``data`` to a text file's bytes, after what its text layer holds."""
    file.flush()
    file.buffer.write(data)


def open_sink(out: str, raw: bool = False) -> RepoSink:
    """The sink of a ``--out`` value: ``jsonl:DIR`` or a bare ``DIR`` (:class:`JsonlSink`),
    ``duckdb:FILE`` (:class:`~repo_stream.backfill.stores.DuckdbSink`), ``parquet:DIR``
    (:class:`~repo_stream.backfill.stores.ParquetSink`), or ``postgresql://...`` /
    ``postgres://...`` / ``postgresql:DSN`` (:class:`~repo_stream.backfill.stores.PostgresSink`;
    e.g. ``postgresql:host=/tmp/pg dbname=x`` for a Unix socket).

    Args:
        out: the ``--out`` value.
        raw: the record blocks' bytes as values instead of their JSON text (base64 ``$bytes``
            for ``jsonl``).

    Raises:
        SinkError: an empty store path.
    """
    from ..errors import SinkError
    from . import stores

    kind, sep, rest = out.partition(":")
    if out.startswith(("postgresql://", "postgres://")):
        return stores.PostgresSink(out, raw)
    if sep and kind in ("jsonl", "duckdb", "parquet", "postgresql"):
        if not rest:
            raise SinkError(f"--out {out}: {kind}: needs a path or DSN after the colon")
        if kind == "duckdb":
            return stores.DuckdbSink(rest, raw)
        if kind == "parquet":
            return stores.ParquetSink(rest, raw)
        if kind == "postgresql":
            return stores.PostgresSink(rest, raw)
        out = rest
    return JsonlSink(out, bytes_value if raw else json_value)
