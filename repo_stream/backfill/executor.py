"""Backfill many repos at once: a bounded executor with memory workers and a disk-worker queue.

:func:`backfill` takes repo sources (anything :func:`repo_stream.net.source.open_source` opens: DIDs,
handles, ``at://`` URIs, getRepo URLs, paths) and yields one :class:`BackfillResult` per source, in
completion order. Inside, a pipeline of anyio tasks joined by bounded memory streams:

- ``fetch_concurrency`` *openers* resolve each source to its getRepo URL (identity look-ups);
- *host workers* wait for a place at the repo's PDS host (per-host concurrency, requests per
  second and ``Retry-After``: :mod:`repo_stream.net.hosts`) and open its fetch, at most
  ``fetch_concurrency`` fetches started ahead of the memory workers (the HTTP round trip
  overlaps with walking); a busy or rate-limited host holds up only its own repos;
- ``memory_workers`` *memory workers* load each CAR with a per-repo limit of ``mem_limit_mb`` and
  walk it; a repo that reaches the limit becomes a :class:`~repo_stream.NeedDisk` and is handed to
- a bounded queue (``disk_queue_size`` NeedDisks; ``0`` is a hand-over) served by ``disk_workers``
  *disk workers*, each with its own SQLite spill store (reset between repos). When the queue is
  full, memory workers wait (backpressure) instead of loading more.

Each worker takes the next repo as soon as it finishes one (a sliding window, never batch by
batch). Whatever goes wrong with one repo (identity, HTTP, a malformed CAR, a commit for another
DID, a bad signature with ``verify``) is that repo's result (``error``), never the run's end. A
fetched CAR that turns out truncated or incomplete (blocks missing: ``MissingBlockError``; cut
within a block: ``TruncatedCarError``) is fetched again, up to ``FetchOptions.retries`` times
(the sink drops what it had of the repo first), then reported.
Cancelling the consumer stops every task promptly, closes every fetch and removes every spill file.

Peak memory is about ``(memory_workers + disk_queue_size) x mem_limit + disk_workers x (mem_limit
+ disk_cache_mb)`` plus the interpreter, whatever the repos' sizes.

One process uses one core (the C core holds the GIL while it builds items, and the rest is
Python): ``processes=N`` runs the executor in N processes, this one and N - 1 worker processes
it feeds one source at a time (:mod:`repo_stream.backfill.process_pool`).

A :class:`Checkpoint` (an SQLite file) records every finished repo; a rerun with the same file
yields the recorded results (``skipped=True``) without fetching those repos again, and
``retry_failed=True`` runs the failures again. A result is yielded only once it is recorded, so
a run killed at any point loses no finished repo.

Example::

    from contextlib import aclosing
    from repo_stream.backfill import backfill, read_repo_list

    async with aclosing(backfill(read_repo_list("dids.txt"), memory_workers=2, checkpoint="run.db")) as results:
        async for result in results:
            print(result.source, result.records, result.error)

Specs: atproto.com/specs/sync (``com.atproto.sync.getRepo``, ``com.atproto.sync.listRepos``),
atproto.com/specs/repository.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream as ObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream as ObjectSendStream

from ..core.commit import Commit
from ..errors import (
    FetchError,
    IdentityError,
    MissingBlockError,
    ProcessorError,
    RecordDecodeError,
    RepoStreamError,
    SignatureError,
    SourceError,
    TruncatedCarError,
)
from ..read.drivers import DISK_COUNT_CHUNK, DiskDriver, DriverBuilder, NeedDisk
from ..spill.store import DiskBuilder, DiskStore
from .checkpoint import Checkpoint, is_done
from .results import BackfillResult, BackfillStats
from .sinks import RepoSink

if TYPE_CHECKING:
    import dns.asyncresolver
    import httpx
    from anyio.abc import TaskGroup

    from ..net.fetch import FetchOptions
    from ..net.hosts import HostLimiter, HostSlot
    from ..net.source import LocatedSource, OpenedSource

__all__ = ["DEFAULT_PER_HOST_CONCURRENCY", "DEFAULT_PER_HOST_RPS", "HOST_WAITING", "DuplicateRepoError", "backfill"]

DEFAULT_PER_HOST_CONCURRENCY = 4
"""Default getRepo fetches open at once per PDS host (the same as :data:`repo_stream.net.hosts.DEFAULT_HOST_CONCURRENCY`)."""
DEFAULT_PER_HOST_RPS = 10.0
"""Default getRepo requests started per second per PDS host."""

_CHUNK = 1024  # records per next_chunk
_BATCH_ROWS = 65536  # records per next_batch, for a batch sink without batch_rows
#: Fetched repos that may wait for their PDS host (a per-host slot, its rate or its Retry-After)
#: at once, at least: a busy or rate-limited host holds up other hosts' repos only once this
#: many of its repos are waiting.
HOST_WAITING = 64
#: Errors of a fetched CAR that may be a truncated or incomplete answer, retried as transient: a
#: CAR cut on a block boundary parses as complete but misses blocks (MissingBlockError), one cut
#: within a block without a Content-Length ends early (TruncatedCarError).
_TRANSIENT_CAR_ERRORS = (MissingBlockError, TruncatedCarError)
#: BackfillResult.verified of a successful repo, by verify mode.
_VERIFIED: dict[str | None, str | None] = {None: None, "cids": "cids", "signature": "cids+signature"}


def _verify_mode(verify: object, signing_key: str | None) -> Literal["cids", "signature"] | None:
    """``backfill``'s ``verify`` and ``signing_key`` as one mode: None, "cids" or "signature".

    Raises:
        ValueError: an unknown ``verify``, or a ``signing_key`` without signature verification.
        SignatureError: ``signing_key`` does not parse.
    """
    if verify is True or verify == "signature":
        mode: Literal["cids", "signature"] | None = "signature"
    elif verify is False or verify is None:
        mode = None
    elif verify == "cids":
        mode = "cids"
    else:
        raise ValueError(f"verify must be False, True, 'cids' or 'signature', got {verify!r}")
    if signing_key is not None:
        if mode != "signature":
            raise ValueError("signing_key is for verifying signatures: give it with verify=True (or 'signature')")
        from ..crypto.didkey import parse_did_key

        parse_did_key(signing_key)  # raises SignatureError
    return mode


_BATCH = 256  # checkpoint rows per look-up or transaction


def _describe(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


@dataclass(eq=False)
class _Job:
    """One repo on its way through the pipeline."""

    source: str
    started: float
    stack: AsyncExitStack | None = None
    opened: OpenedSource | None = None
    commit: Commit | None = None
    records: int = 0
    record_bytes: int = 0
    spilled: bool = False
    held: bool = False  # counted in stats.in_memory
    claimed: str | None = None  # the DID this job holds in _Run.claims
    located: LocatedSource | None = None  # a network source: where it is fetched from
    refetches: int = 0  # fetches again after a truncated or incomplete answer
    slot: HostSlot | None = None  # its place at its PDS host, held until the job closes
    fetch: AsyncExitStack | None = None  # its open fetch (inside ``stack``)


async def _drain_batch(stream: ObjectReceiveStream[Any], limit: int) -> list[Any]:
    """Wait for one item, then take whatever else is ready, up to ``limit``; [] at the end."""
    try:
        first = await stream.receive()
    except anyio.EndOfStream:
        return []
    batch = [first]
    while len(batch) < limit:
        try:
            batch.append(stream.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
    return batch


class DuplicateRepoError(RepoStreamError):
    """A source names a repo (a DID) that another source of the same run already has: its
    result says so instead of fetching and writing the repo a second time. ``did``: that DID;
    ``first``: the source that has it."""

    def __init__(self, message: str, *, did: str, first: str) -> None:
        super().__init__(message)
        self.did = did
        self.first = first


def _known_did(source: str) -> str | None:
    """The DID a source names without any look-up: a DID, an ``at://DID`` URI, or a getRepo URL's
    ``did`` parameter; None for handles, paths and other URLs."""
    if source.startswith("did:"):
        return source.strip()
    if source.startswith("at://did:"):
        return source[len("at://") :].split("/", 1)[0]
    if source.lower().startswith(("http://", "https://")) and "com.atproto.sync.getRepo" in source:
        from urllib.parse import parse_qs, urlsplit

        found = parse_qs(urlsplit(source).query).get("did")
        return found[0] if found else None
    return None


class _Run:
    """The tasks and shared state of one :func:`backfill` call."""

    def __init__(self, options: dict[str, Any], stats: BackfillStats) -> None:
        from .sources import SeenDids

        self.o = options
        self.stats = stats
        self.jobs: set[_Job] = set()  # jobs whose source is open
        self.stores: list[DiskStore] = []
        self.feed_error: BaseException | None = None
        self.http: Any = options["client"]
        self.keys: dict[str, str | None] = {}
        #: DID -> the first source of this run that named it (on disk past 2 MiB).
        self.claims = SeenDids()
        #: Per-host politeness of the getRepo fetches (None: fetch without it).
        self.limiter: HostLimiter | None = options.get("host_limiter")
        #: Fetches started and not yet taken by a memory worker, at most ``fetch_concurrency``.
        self.gate = anyio.Semaphore(max(1, options.get("fetch_concurrency", 1)))

    def claim(self, job: _Job, did: str) -> None:
        """Take ``did`` for this job's source, once per run when the sink's output is keyed by DID
        (``sink.keyed_by_did``); other sinks may take a repo twice.

        Raises:
            DuplicateRepoError: an earlier source of this run has that DID.
        """
        if job.claimed == did or not getattr(self.o["sink"], "keyed_by_did", False):
            return
        first = self.claims.add(did, job.source)
        if first is not None:
            raise DuplicateRepoError(
                f"{job.source}: a duplicate of {first}: the repo of {did} is already in this run (not fetched again)", did=did, first=first
            )
        job.claimed = did

    # -- helpers --------------------------------------------------------------------------------

    def builder(self) -> DriverBuilder[Any]:
        o = self.o
        builder: DriverBuilder[Any] = DriverBuilder().with_mem_limit_mb(o["mem_limit_mb"]).with_verify_cids(o["verify"] is not None)
        if o["sink"] is None:
            return builder.with_block_processor(len)
        return builder.with_record_cids(True)

    def result(self, job: _Job, error: BaseException | None) -> BackfillResult:
        if isinstance(error, SourceError) and isinstance(error.__cause__, FetchError):
            error = error.__cause__  # the body failed mid-way: say so, as fetch_car does on exit
        commit = job.commit
        did = commit.did if commit is not None else (job.opened.did if job.opened is not None else None)
        if did is None and job.located is not None:
            did = job.located.did
        if did is None:  # failed before opening: the DID the fetch named, or the source itself
            named = getattr(error, "did", None)
            did = named if isinstance(named, str) else (job.source if job.source.startswith("did:") else None)
        return BackfillResult(
            source=job.source,
            did=did,
            rev=commit.rev if commit is not None else None,
            records=job.records,
            record_bytes=job.record_bytes,
            spilled=job.spilled,
            seconds=time.monotonic() - job.started,
            error=None if error is None else _describe(error),
            verified=None if error is not None else _VERIFIED[self.o["verify"]],
        )

    def release(self, job: _Job) -> None:
        if job.held:
            job.held = False
            self.stats._hold(-1)

    async def close_job(self, job: _Job) -> None:
        """Close the job's source (fetch, file), shielded and bounded in time."""
        self.release(job)
        stack, job.stack = job.stack, None
        self.jobs.discard(job)
        if stack is not None:
            with anyio.move_on_after(10, shield=True):
                try:
                    await stack.aclose()
                except Exception:
                    pass

    async def check_commit(self, job: _Job, commit: Commit) -> None:
        """The commit's DID is the one asked for; with ``verify``, its signature is good."""
        job.commit = commit
        assert job.opened is not None
        job.opened.check_did(commit.did)
        self.claim(job, commit.did)  # a path or plain URL: its DID is known only now
        if self.o["verify"] == "signature":
            key = self.o["signing_key"] or await self.signing_key(job.opened, commit.did)
            if key is None:
                raise SignatureError(f"{commit.did}: its DID document has no #atproto signing key to verify commit {commit.cid}")
            commit.verify_signature(key)  # raises SignatureError

    async def signing_key(self, opened: OpenedSource, did: str) -> str:
        """The account's signing key (``did:key:z...``): from the resolved identity, else resolved now."""
        if opened.signing_key is not None:
            return opened.signing_key
        if did not in self.keys:
            from ..net.identity import DEFAULT_PLC_URL, parse_did_document, resolve_did

            document = await resolve_did(
                did, client=self.http, plc_url=self.o["plc_url"] or DEFAULT_PLC_URL, allow_private_hosts=self.o["allow_private_hosts"]
            )
            self.keys[did] = parse_did_document(did, document).signing_key
        key = self.keys[did]
        if key is None:
            raise IdentityError(f"DID {did}: the DID document has no #atproto signing key, so the commit cannot be verified")
        return key

    async def walk(self, job: _Job, driver: Any) -> None:
        sink = self.o["sink"]
        assert job.commit is not None
        if sink is None:
            # From disk a chunk is a hop to the store's thread and back: counting takes bigger ones.
            chunk_size = DISK_COUNT_CHUNK if isinstance(driver, DiskDriver) else _CHUNK
            while (chunk := await driver.next_chunk(chunk_size)) is not None:
                job.records += len(chunk)
                job.record_bytes += sum(size for _, size in chunk)
            return
        write_batch = getattr(sink, "write_batch", None)
        values = getattr(sink, "batch_values", None)
        if write_batch is not None and values in ("raw", "json_text", "json_lines"):
            rows = int(getattr(sink, "batch_rows", _BATCH_ROWS))
            await self.walk_batches(job, driver, write_batch, values, rows, getattr(sink, "batch_block_bytes", False) is True)
            return
        while (chunk := await driver.next_chunk(_CHUNK)) is not None:
            job.records += len(chunk)
            job.record_bytes += sum(len(value) for _, _, value in chunk)
            await sink(job.source, job.commit, chunk)

    async def walk_batches(self, job: _Job, driver: Any, write_batch: Any, values: str, rows: int, block_bytes: bool = False) -> None:
        """The walk as the walker's own Arrow batches of up to ``rows`` records, or its JSON lines
        (``json_lines``), for a sink with ``write_batch``: no Python object per record. Each
        batch is made in one call (over the in-memory table: on the event loop, like a chunk). A
        record that is not valid DAG-CBOR (``json_text``, ``json_lines``) fails the repo with its
        :class:`RecordDecodeError`, naming the DID. ``block_bytes``: the sink's ``write_batch``
        also takes each batch's record block bytes (keyword ``block_bytes``)."""
        assert job.commit is not None
        taken = 0
        while True:
            try:
                if values == "json_lines":
                    batch = await driver.next_json_lines(max(1, rows))
                else:
                    batch = await driver.next_batch(max(1, rows), values=values)
            except ProcessorError as exc:
                cause = exc.__cause__
                if isinstance(cause, RecordDecodeError):  # the transcoder's, as the tuple path's sinks raise it
                    raise RecordDecodeError(f"{job.commit.did}: {cause}") from exc
                raise
            if batch is None:
                return
            job.records += batch.count(b"\n") if values == "json_lines" else batch.num_rows  # a line per record
            grown = driver.batch_value_bytes - taken
            job.record_bytes += grown
            taken = driver.batch_value_bytes
            if block_bytes:
                await write_batch(job.source, job.commit, batch, block_bytes=grown)
            else:
                await write_batch(job.source, job.commit, batch)

    async def finish_sink(self, job: _Job, error: BaseException | None) -> BaseException | None:
        """Tell the sink the repo ended; a sink failing here fails the repo."""
        finish = getattr(self.o["sink"], "finish", None)
        if finish is None or job.commit is None or isinstance(error, DuplicateRepoError):
            # A duplicate never reached the sink, whose output for that DID is the first
            # source's, maybe still being written: telling it this one failed would end that.
            return error
        try:
            with anyio.CancelScope(shield=not isinstance(error, Exception) and error is not None):
                await finish(job.source, job.commit, error)
        except Exception as exc:
            return error or exc
        return error

    # -- stages ---------------------------------------------------------------------------------

    async def feed(self, sources: Iterable[str] | AsyncIterable[str], send: ObjectSendStream[str]) -> None:
        async with send:
            try:
                if isinstance(sources, AsyncIterable):
                    async for source in sources:
                        self.stats.inputs += 1
                        await send.send(source)
                else:
                    for source in sources:
                        self.stats.inputs += 1
                        await send.send(source)
            except Exception as exc:
                self.feed_error = exc

    async def skip_done(self, receive: ObjectReceiveStream[str], todo: ObjectSendStream[str], out: ObjectSendStream[BackfillResult]) -> None:
        checkpoint: Checkpoint = self.o["checkpoint"]
        async with receive, todo, out:
            while batch := await _drain_batch(receive, _BATCH):
                done = await checkpoint.lookup(batch)
                for source in batch:
                    recorded = done.get(source)
                    if is_done(recorded, self.o["retry_failed"]):
                        assert recorded is not None
                        await out.send(recorded)
                    else:
                        await todo.send(source)

    async def opener(self, todo: ObjectReceiveStream[str], located: ObjectSendStream[_Job], opened: ObjectSendStream[_Job], results: ObjectSendStream[BackfillResult]) -> None:
        """Take each source: open a path (or stdin) at once; resolve a DID, handle or URL to the
        URL of its repo (identity look-ups, no fetch) and hand it to the host workers."""
        from ..net.source import classify_source, locate_source, open_source

        o = self.o
        async with todo, located, opened, results:
            async for source in todo:
                job = _Job(source, time.monotonic())
                job.stack = AsyncExitStack()
                self.jobs.add(job)
                try:
                    known = _known_did(source)
                    if known is not None:
                        self.claim(job, known)  # before any look-up or fetch
                    if classify_source(source) in ("path", "stdin"):
                        job.opened = await job.stack.enter_async_context(open_source(source, client=self.http))
                    else:
                        job.located = await locate_source(
                            source,
                            plc_url=o["plc_url"],
                            client=self.http,
                            dns_resolver=o["dns_resolver"],
                            allow_private_hosts=o["allow_private_hosts"],
                        )
                        if job.located.did is not None:
                            self.claim(job, job.located.did)  # a handle: known once resolved, before any fetch
                except Exception as exc:
                    await self.close_job(job)
                    await results.send(self.result(job, exc))
                    continue
                await (opened if job.opened is not None else located).send(job)

    async def open_fetch(self, job: _Job, *, gated: bool) -> None:
        """Open ``job``'s fetch: first (if the run has a limiter and the job holds no slot yet)
        wait for a slot at its PDS host, kept in the job's stack; then fetch, in a stack of its
        own (:attr:`_Job.fetch`, closed alone by :meth:`refetch`). ``gated``: the request also
        takes :attr:`gate` once the host is ready, held until :meth:`host_worker` hands the job on."""
        from ..net.source import open_source

        assert job.located is not None and job.stack is not None
        if self.limiter is not None and job.slot is None:
            job.slot = await job.stack.enter_async_context(self.limiter.slot(job.located.url, gate=self.gate if gated else None))
        job.fetch = AsyncExitStack()
        job.stack.push_async_callback(job.fetch.aclose)
        try:
            job.opened = await job.fetch.enter_async_context(
                open_source(job.located, client=self.http, options=self.o["fetch_options"], limiter=job.slot)
            )
        except BaseException:
            if job.slot is not None:
                job.slot.drop_gate()
            raise

    async def host_worker(self, located: ObjectReceiveStream[_Job], opened: ObjectSendStream[_Job], results: ObjectSendStream[BackfillResult]) -> None:
        """Fetch located repos: each waits for its host (so a busy or rate-limited host holds up
        only the host workers waiting for it, not the others), then at most ``fetch_concurrency``
        fetches at once are started and not yet taken by a memory worker."""
        async with located, opened, results:
            async for job in located:
                try:
                    if self.limiter is None:
                        async with self.gate:
                            await self.open_fetch(job, gated=False)
                            await opened.send(job)
                        continue
                    await self.open_fetch(job, gated=True)
                except Exception as exc:
                    await self.close_job(job)
                    await results.send(self.result(job, exc))
                    continue
                try:
                    await opened.send(job)
                finally:
                    if job.slot is not None:
                        job.slot.drop_gate()  # its host slot stays held until the job closes

    async def refetch(self, job: _Job, error: BaseException) -> bool:
        """After a truncated or incomplete fetched CAR: drop what the sink has of the repo, close
        the fetch (the job keeps its place at the host: no other repo can take it meanwhile),
        wait (the fetch's backoff) and fetch it again, up to ``FetchOptions.retries`` times per
        repo. False (nothing done) for a source that is not fetched or out of retries."""
        from ..net.fetch import FetchOptions, _backoff

        options = self.o["fetch_options"] or FetchOptions()
        if job.located is None or job.refetches >= options.retries:
            return False
        job.refetches += 1
        self.stats.refetched += 1
        await self.finish_sink(job, error)
        job.commit, job.records, job.record_bytes, job.spilled = None, 0, 0, False
        self.release(job)
        fetch, job.fetch, job.opened = job.fetch, None, None
        if fetch is not None:
            with anyio.move_on_after(10, shield=True):
                try:
                    await fetch.aclose()
                except Exception:
                    pass
        await anyio.sleep(_backoff(options, job.refetches))
        await self.open_fetch(job, gated=False)
        return True

    async def memory_worker(
        self, opened: ObjectReceiveStream[_Job], disk: ObjectSendStream[tuple[_Job, NeedDisk[Any]]], results: ObjectSendStream[BackfillResult]
    ) -> None:
        async with opened, disk, results:
            async for job in opened:
                error: BaseException | None = None
                queued = False
                try:
                    while True:
                        try:
                            queued = await self.load_in_memory(job, disk)
                        except _TRANSIENT_CAR_ERRORS as exc:
                            if await self.refetch(job, exc):
                                continue
                            raise
                        break
                except Exception as exc:
                    error = exc
                except BaseException as exc:  # cancelled: let the sink drop the repo, then go
                    await self.finish_sink(job, exc)
                    raise
                if not queued:
                    await self.settle(job, error, results)

    async def load_in_memory(self, job: _Job, disk: ObjectSendStream[tuple[_Job, NeedDisk[Any]]]) -> bool:
        """Load the job's CAR and walk it; a repo past the memory limit goes to the disk queue
        instead (True)."""
        assert job.opened is not None
        job.held = True
        self.stats._hold(1)
        driver = await self.builder().load_car(job.opened.source)
        if isinstance(driver, NeedDisk):
            job.spilled = True
            if driver.commit is not None:
                await self.check_commit(job, driver.commit)  # fail early, before queueing
            await disk.send((job, driver))  # waits while the disk queue is full (backpressure)
            self.watch_queue(disk)
            return True
        await self.check_commit(job, driver.commit)
        await self.walk(job, driver)
        return False

    async def settle(self, job: _Job, error: BaseException | None, results: ObjectSendStream[BackfillResult]) -> None:
        """Finish the repo's sink, close its source, and send its one result."""
        error = await self.finish_sink(job, error)
        await self.close_job(job)
        await results.send(self.result(job, error))

    def watch_queue(self, disk: ObjectSendStream[Any] | ObjectReceiveStream[Any]) -> None:
        used = disk.statistics().current_buffer_used
        self.stats.disk_queue = used
        self.stats.disk_queue_peak = max(self.stats.disk_queue_peak, used)

    async def disk_worker(self, disk: ObjectReceiveStream[tuple[_Job, NeedDisk[Any]]], results: ObjectSendStream[BackfillResult]) -> None:
        store: DiskStore | None = None
        async with disk, results:
            async for job, need in disk:
                self.watch_queue(disk)
                error: BaseException | None = None
                try:
                    if store is None:
                        store = await self.open_store()
                    pending: NeedDisk[Any] | None = need
                    while True:
                        try:
                            await self.finish_on_disk(job, pending, store)
                        except _TRANSIENT_CAR_ERRORS as exc:
                            if await self.refetch(job, exc):
                                pending = None  # fetched again: loaded from the start here
                                continue
                            raise
                        break
                except Exception as exc:
                    error = exc
                except BaseException as exc:  # cancelled: let the sink drop the repo, then go
                    await self.finish_sink(job, exc)
                    raise
                await self.settle(job, error, results)

    async def finish_on_disk(self, job: _Job, need: NeedDisk[Any] | None, store: DiskStore) -> None:
        """Finish loading ``need`` into ``store`` and walk it; with None (a repo fetched again),
        load the job's CAR from the start, in memory if it fits, else on to ``store``."""
        if need is None:
            assert job.opened is not None
            job.held = True
            self.stats._hold(1)
            loaded = await self.builder().load_car(job.opened.source)
            if not isinstance(loaded, NeedDisk):
                await self.check_commit(job, loaded.commit)
                await self.walk(job, loaded)
                return
            job.spilled = True
            need = loaded
        commit, driver = await need.finish_loading(store)
        self.release(job)  # the blocks are on disk now
        if job.commit is None:
            await self.check_commit(job, commit)
        await self.walk(job, driver)
        await driver.reset_store()

    async def open_store(self) -> DiskStore:
        """A temporary store whose files, in ``spill_dir``, are unlinked as soon as opened: even a
        ``kill -9`` of the run leaves nothing there."""
        store = await DiskBuilder().with_cache_size_mb(self.o["disk_cache_mb"]).open(directory=self.o["spill_dir"])
        self.stores.append(store)
        return store

    async def start_workers(
        self,
        tg: TaskGroup,
        todo: ObjectReceiveStream[str],
        results: ObjectSendStream[BackfillResult],
        openers: int,
        memory_workers: int,
        disk_workers: int,
        disk_queue_size: int,
    ) -> None:
        """Start the openers, memory workers and disk workers in ``tg``, joined by their streams."""
        located_send, located = anyio.create_memory_object_stream[_Job](0)
        opened_send, opened = anyio.create_memory_object_stream[_Job](0)
        disk_send, disk = anyio.create_memory_object_stream[tuple[_Job, NeedDisk[Any]]](disk_queue_size)
        for _ in range(openers):
            tg.start_soon(self.opener, todo.clone(), located_send.clone(), opened_send.clone(), results.clone())
        for _ in range(max(HOST_WAITING, openers) if self.limiter is not None else openers):
            tg.start_soon(self.host_worker, located.clone(), opened_send.clone(), results.clone())
        for _ in range(memory_workers):
            tg.start_soon(self.memory_worker, opened.clone(), disk_send.clone(), results.clone())
        for _ in range(disk_workers):
            tg.start_soon(self.disk_worker, disk.clone(), results.clone())
        for end in (todo, located_send, located, opened_send, opened, disk_send, disk, results):
            await end.aclose()

    async def recorder(self, results: ObjectReceiveStream[BackfillResult], out: ObjectSendStream[BackfillResult]) -> None:
        """Record results in the checkpoint, a batch per transaction, then pass them on."""
        checkpoint: Checkpoint = self.o["checkpoint"]
        async with results, out:
            while batch := await _drain_batch(results, _BATCH):
                # A duplicate's result is not recorded: its source may be the first's own string.
                await checkpoint.record([r for r in batch if not (r.error or "").startswith(DuplicateRepoError.__name__)])
                for result in batch:
                    await out.send(result)

    async def cleanup(self) -> None:
        """Close every open source and spill store (their files go with them). Shielded."""
        with anyio.CancelScope(shield=True):
            for job in list(self.jobs):
                await self.close_job(job)
            for store in self.stores:
                await store.close()
            self.claims.close()


async def backfill(
    sources: Iterable[str] | AsyncIterable[str],
    *,
    sink: RepoSink | None = None,
    memory_workers: int = 2,
    disk_workers: int = 1,
    mem_limit_mb: float = 64,
    fetch_concurrency: int | None = None,
    disk_queue_size: int = 0,
    disk_cache_mb: int = 32,
    spill_dir: str | os.PathLike[str] | None = None,
    verify: bool | Literal["cids", "signature"] = False,
    signing_key: str | None = None,
    checkpoint: str | os.PathLike[str] | Checkpoint | None = None,
    retry_failed: bool = False,
    plc_url: str | None = None,
    client: httpx.AsyncClient | None = None,
    dns_resolver: dns.asyncresolver.Resolver | None = None,
    fetch_options: FetchOptions | None = None,
    stats: BackfillStats | None = None,
    processes: int = 1,
    allow_private_hosts: bool = False,
    per_host_concurrency: int | None = DEFAULT_PER_HOST_CONCURRENCY,
    per_host_rps: float | None = DEFAULT_PER_HOST_RPS,
    host_limiter: HostLimiter | None = None,
) -> AsyncGenerator[BackfillResult, None]:
    """Walk every repo of ``sources`` with a bounded pool of workers; yield one
    :class:`BackfillResult` per source, in completion order.

    An async generator: when leaving the loop early, close it (``contextlib.aclosing``), which
    cancels the work in flight, closes every fetch and removes every spill file.

    With a sink whose output is keyed by DID (``sink.keyed_by_did`` true, as :class:`JsonlSink`),
    each repo runs once per run: a source whose DID an earlier source of the run already named
    (the same DID twice, a DID and its getRepo URL, a handle and its DID) yields its own result
    with the error ``DuplicateRepoError: SOURCE: a duplicate of FIRST ...``, without a second
    fetch when its DID is known before fetching (DIDs, ``at://`` URIs, getRepo URLs, handles
    once resolved) and without a second walk or write otherwise (paths, other URLs). Such
    results are not recorded in the checkpoint. The DIDs of a run are kept in SQLite's
    temporary database (2 MiB of cache; the rest on disk). With another sink, or none,
    duplicated sources run (and are yielded) once per occurrence.

    Args:
        sources: repo sources (str), an iterable or an async iterable (e.g. :func:`read_repo_list`,
            :func:`host_sources`): DIDs, handles, ``at://`` URIs, getRepo URLs, CAR paths.
        sink: receives each repo's records (see :class:`RepoSink`, e.g. :class:`JsonlSink`);
            None: records are only counted.
        memory_workers: repos loaded and walked at once (>= 1).
        disk_workers: repos finished on disk at once (>= 1), each with its own SQLite store.
        mem_limit_mb: the per-repo memory limit, MiB; a repo past it goes to the disk workers.
        fetch_concurrency: sources resolved and opened ahead of the memory workers at once
            (default ``memory_workers``: each memory worker has its next repo's identity look-ups
            and HTTP round trip done while it walks). Open fetches are at most
            ``fetch_concurrency + memory_workers + disk_queue_size + disk_workers``.
        disk_queue_size: NeedDisks that may wait for a disk worker (default 0: a memory worker
            hands its repo straight to a free disk worker, or waits).
        disk_cache_mb: each disk store's SQLite page cache, MiB.
        spill_dir: the folder for spill files (default: the system's temporary folder). Each
            disk worker's store is a file there that is unlinked as soon as SQLite has opened it,
            so the folder shows nothing and even a ``kill -9`` of the run leaves nothing in it.
        verify: ``"cids"``: check every block against its CID and every MST rule
            (``with_verify_cids``); ``"signature"`` or True: that and the commit's signature,
            against ``signing_key`` or else the account's key from its DID document (resolved,
            so a path or URL source needs the network or ``signing_key``). Each successful
            result says what was checked (:attr:`BackfillResult.verified`).
        signing_key: one ``did:key:z...`` that signed every repo (e.g. local files of one
            account); needs ``verify`` True or ``"signature"``.
        checkpoint: an SQLite file path (or an open :class:`Checkpoint`) recording finished
            repos; sources recorded there are not run again but yielded from it (``skipped``).
        retry_failed: run sources recorded as failed again.
        plc_url: as for :func:`repo_stream.net.source.open_source`.
        client: as for :func:`repo_stream.net.source.open_source`: one client is shared by the
            whole run; by default a new one, closed at the end, that connects only to public
            addresses for hosts learned from the network unless ``allow_private_hosts`` (see
            :mod:`repo_stream.net.guard`).
        dns_resolver: as for :func:`repo_stream.net.source.open_source`.
        fetch_options: as for :func:`repo_stream.net.source.open_source`.
        allow_private_hosts: as for :func:`repo_stream.net.source.open_source`.
        per_host_concurrency: getRepo fetches open at once per PDS host (default 4; None: no
            limit). A fetch holds its place from its request until its body is read (the repo
            walked or spilled). Hosts are told apart by scheme, name and port
            (:func:`repo_stream.net.hosts.host_key`).
        per_host_rps: getRepo requests started per second per PDS host, retries included, evenly
            spaced (default 10.0; None: no limit). A 429 or 503 answer with ``Retry-After``
            (seconds or an HTTP date) blocks that host, and only that host, for that long, capped
            at ``fetch_options.max_retry_after`` (60 s by default; a longer one fails the fetch as
            :class:`~repo_stream.net.fetch.FetchOptions` says). Repos waiting for a busy or
            blocked host do not hold up other hosts' repos: up to :data:`HOST_WAITING` (64) repos
            (or ``fetch_concurrency``, if more) wait for their hosts at once, identities already
            resolved, and only then does the run wait for them. With ``processes``, each process
            keeps its own limits: ``per_host_rps / processes`` and ``per_host_concurrency //
            processes`` (at least 1) each, and sees only its own ``Retry-After`` answers.
        host_limiter: a :class:`~repo_stream.net.hosts.HostLimiter` to share with other fetches
            (e.g. a sync service's resyncs), instead of one made from ``per_host_concurrency``
            and ``per_host_rps``; not with ``processes``.
        stats: a :class:`BackfillStats` to update as the run goes (for progress displays).
        processes: with more than 1, the repos run in that many processes: this one and
            ``processes - 1`` worker processes, each with the executor above (its own
            ``memory_workers``, ``disk_workers`` and fetch client), handed one source at a time
            by this process, which alone reads ``sources``, keeps the checkpoint and yields the
            results (see :mod:`repo_stream.backfill.process_pool`). The sink must then be picklable (the
            worker processes call copies of it, this process the sink itself), ``client`` and
            ``dns_resolver`` are not allowed, and ``stats`` counts results only (not the repos
            held or the disk queue).

    Raises:
        ValueError: a worker count or limit out of range (a per-host limit too); ``verify`` not one
            of the above, or a ``signing_key`` without signature verification; with ``processes``,
            a ``client``, ``dns_resolver`` or ``host_limiter``, or options (the sink) that cannot
            be pickled.
        SignatureError: ``signing_key`` is not a did:key of an atproto signing key.
        RepoStreamError: the checkpoint cannot be opened or written; whatever ``sources`` raised
            (e.g. a ``FetchError`` from listRepos), after the results of the repos already read.
    """
    concurrency = _check_arguments(memory_workers, disk_workers, processes, mem_limit_mb, disk_queue_size, fetch_concurrency, client, dns_resolver)
    _check_host_limits(per_host_concurrency, per_host_rps, host_limiter, processes)
    mode = _verify_mode(verify, signing_key)
    spill = None if spill_dir is None else os.fspath(spill_dir)
    worker_options: dict[str, Any] | None = None
    if processes > 1:
        from .process_pool import check_picklable

        worker_options = {
            "sink": sink, "memory_workers": memory_workers, "disk_workers": disk_workers,
            "mem_limit_mb": mem_limit_mb, "fetch_concurrency": concurrency,
            "disk_queue_size": disk_queue_size, "disk_cache_mb": disk_cache_mb,
            "spill_dir": spill, "verify": mode or False, "signing_key": signing_key, "plc_url": plc_url,
            "fetch_options": fetch_options,
            "allow_private_hosts": allow_private_hosts,
            "per_host_concurrency": None if per_host_concurrency is None else max(1, per_host_concurrency // processes),
            "per_host_rps": None if per_host_rps is None else per_host_rps / processes,
        }  # fmt: skip
        check_picklable(worker_options)
    stats = stats if stats is not None else BackfillStats()
    stats.disk_queue_size = disk_queue_size
    async with AsyncExitStack() as stack:
        checkpoint, client = await _open_shared(stack, checkpoint, client, processes, concurrency, allow_private_hosts)
        options: dict[str, Any] = {
            "sink": sink, "mem_limit_mb": mem_limit_mb, "verify": mode, "signing_key": signing_key, "checkpoint": checkpoint,
            "retry_failed": retry_failed, "plc_url": plc_url, "client": client, "dns_resolver": dns_resolver,
            "fetch_options": fetch_options, "spill_dir": spill, "disk_cache_mb": disk_cache_mb,
            "allow_private_hosts": allow_private_hosts,
        }  # fmt: skip
        if processes == 1:
            options["fetch_concurrency"] = concurrency
            options["host_limiter"] = host_limiter or _make_limiter(per_host_concurrency, per_host_rps, fetch_options)
        run = _Run(options, stats)
        pipeline = _pipeline(run, sources, worker_options, processes, concurrency, memory_workers, disk_workers, disk_queue_size)
        try:
            async for result in pipeline:
                yield result
        finally:
            await pipeline.aclose()
        if run.feed_error is not None:
            raise run.feed_error


def _check_host_limits(concurrency: int | None, rps: float | None, limiter: object, processes: int) -> None:
    """Check :func:`backfill`'s per-host limits.

    Raises:
        ValueError: a concurrency below 1, a rate not positive (or NaN), a ``host_limiter`` with
            ``processes``.
    """
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"per_host_concurrency must be at least 1, got {concurrency}")
    if rps is not None and not rps > 0:
        raise ValueError(f"per_host_rps must be positive, got {rps}")
    if limiter is not None and processes > 1:
        raise ValueError("a host_limiter cannot be shared with worker processes: leave it out with processes > 1")


def _make_limiter(concurrency: int | None, rps: float | None, fetch_options: FetchOptions | None) -> HostLimiter | None:
    """The run's :class:`~repo_stream.net.hosts.HostLimiter`, or None with neither limit."""
    if concurrency is None and rps is None:
        return None
    from ..net.hosts import HostLimiter

    return HostLimiter(
        concurrency if concurrency is not None else 2**31 - 1,
        rps if rps is not None else math.inf,
        max_retry_after=fetch_options.max_retry_after if fetch_options is not None else 60.0,
    )


def _check_arguments(
    memory_workers: int,
    disk_workers: int,
    processes: int,
    mem_limit_mb: float,
    disk_queue_size: int,
    fetch_concurrency: int | None,
    client: Any,
    dns_resolver: Any,
) -> int:
    """Check :func:`backfill`'s counts and limits; the fetch concurrency to use.

    Raises:
        ValueError: as :func:`backfill` says.
    """
    for name, value in (("memory_workers", memory_workers), ("disk_workers", disk_workers), ("processes", processes)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if not mem_limit_mb > 0 or not math.isfinite(mem_limit_mb):
        raise ValueError(f"mem_limit_mb must be positive, got {mem_limit_mb}")
    if disk_queue_size < 0:
        raise ValueError(f"disk_queue_size must be at least 0, got {disk_queue_size}")
    concurrency = fetch_concurrency if fetch_concurrency is not None else memory_workers
    if concurrency < 1:
        raise ValueError(f"fetch_concurrency must be at least 1, got {concurrency}")
    if processes > 1 and (client is not None or dns_resolver is not None):
        raise ValueError("client and dns_resolver cannot be sent to worker processes: leave them out with processes > 1")
    return concurrency


async def _open_shared(
    stack: AsyncExitStack,
    checkpoint: str | os.PathLike[str] | Checkpoint | None,
    client: httpx.AsyncClient | None,
    processes: int,
    concurrency: int,
    allow_private_hosts: bool,
) -> tuple[Checkpoint | None, httpx.AsyncClient | None]:
    """Open what the run shares, closed by ``stack``: the checkpoint (from a path) and, in one
    process without a caller's client, the HTTP client (:func:`repo_stream.net.guard.make_client`)."""
    if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
        owned = checkpoint = await anyio.to_thread.run_sync(Checkpoint, checkpoint)
        stack.push_async_callback(owned.close)
    if client is None and processes == 1:
        from ..net.guard import make_client

        client = await stack.enter_async_context(make_client(allow_private_hosts=allow_private_hosts, max_connections=concurrency + 8))
    return checkpoint, client


async def _pipeline(
    run: _Run,
    sources: Iterable[str] | AsyncIterable[str],
    worker_options: dict[str, Any] | None,
    processes: int,
    concurrency: int,
    memory_workers: int,
    disk_workers: int,
    disk_queue_size: int,
) -> AsyncGenerator[BackfillResult, None]:
    """Run the pipeline (feed, checkpoint skip and record, workers here or in processes) and
    yield its results; every source and store is closed at the end."""
    checkpoint: Checkpoint | None = run.o["checkpoint"]
    try:
        async with anyio.create_task_group() as tg:
            inputs_send, inputs = anyio.create_memory_object_stream[str](_BATCH)
            todo_send, todo = anyio.create_memory_object_stream[str](0)
            results_send, results = anyio.create_memory_object_stream[BackfillResult](_BATCH)
            if checkpoint is not None:
                out_send, out = anyio.create_memory_object_stream[BackfillResult](_BATCH)
                tg.start_soon(run.recorder, results, out_send)
                tg.start_soon(run.skip_done, inputs, todo_send, out_send.clone())
                feed_send: ObjectSendStream[str] = inputs_send
            else:
                out = results
                feed_send = todo_send
                await inputs_send.aclose()
                await inputs.aclose()
            tg.start_soon(run.feed, sources, feed_send)
            if worker_options is not None:
                from .process_pool import run_in_processes

                window = concurrency + memory_workers + disk_queue_size + disk_workers + 1
                tg.start_soon(run_in_processes, todo, results_send, worker_options, processes, window, backfill)
            else:
                await run.start_workers(tg, todo, results_send, concurrency, memory_workers, disk_workers, disk_queue_size)
            async with out:
                async for result in out:
                    run.stats.count(result)
                    yield result
    except BaseExceptionGroup as group:
        # Closing this generator early (``aclose``) throws GeneratorExit in at the ``yield``,
        # inside the task group, which wraps it: hand ``aclose`` back the GeneratorExit. When
        # it is closed because its caller is cancelled, the group also holds the cancellation
        # (an outer cancel scope would strip that and let a group of GeneratorExit escape).
        closing, rest = group.split(GeneratorExit)
        if closing is not None and (rest is None or rest.split(anyio.get_cancelled_exc_class())[1] is None):
            raise GeneratorExit from None
        raise
    finally:
        await run.cleanup()
