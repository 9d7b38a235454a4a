"""The sync service: backfill each tracked repo, then follow the firehose, as one ordered stream
of record events per repo, verified, resumable and bounded in memory.

::

    from repo_stream.sync import Sync

    async with Sync(repos=["did:plc:..."], relay="wss://bsky.network", state="sync.sqlite") as sync:
        async for event in sync:          # RecordEvent or RepoEvent
            print(event.to_json())        # taking the next one acknowledges this one

What happens, per repo (state in a :class:`~.state.StateStore`):

- **Backfill.** A repo to fetch (new, or left unfinished by an earlier run) is fetched with the
  backfill executor (:func:`repo_stream.backfill.backfill`: the DID document, then getRepo from
  its PDS; every block checked against its CID, the MST rules, the commit's DID and signature).
  Its records are compared, in key order, with the record CIDs stored for the repo (none the
  first time) and the difference is emitted as :class:`~.follow.RecordEvent` items with
  ``live=False`` and ``seq=None``: creates, updates (another CID) and deletes (a stored key the
  repo no longer has). The repo is then ``active`` at the fetched rev and MST root.
- **Buffering.** The firehose is followed from the start. Events of a repo being fetched are
  buffered (``max_buffered`` messages in memory across all repos, then spilled to the state
  file's ``buffer`` table; also past ``max_buffered_bytes``) and applied in order once its
  fetch is delivered; those whose rev is
  not above the fetched one are dropped. Events of a repo whose fetch has not started are
  skipped: the fetch covers them.
- **Following.** As :func:`~.follow.follow`: each ``#commit`` of an ``active`` repo is verified
  (:func:`~.verify.verify_commit`, with the account's key from a :class:`~repo_stream.firehose.KeyCache`
  and continuity with the stored rev and MST root); one ``RecordEvent`` per op (``live=True``).
  The firehose client runs with ``raw_commits``: the usual ``#commit`` message comes undecoded
  (a :class:`~repo_stream.firehose.items.RawCommit`) and its bytes go to ``verify_commit``'s one
  C pass; any other message is decoded as before (the same events and errors either way).
- **Out of sync.** A commit that does not continue the stored state (a missed commit: ``since``
  or ``prevData`` differ, :class:`~repo_stream.errors.OutOfSyncError`), or a ``#sync`` with another
  MST root, emits ``RepoEvent("desynchronized")`` and ``RepoEvent("resync", phase="started")``,
  refetches the repo and emits the difference as above (then ``RepoEvent("resync",
  phase="finished")`` with the counts), and then its buffered events.
- **Accounts.** ``#account`` with ``active: false`` stores its status and stops the repo's
  events until ``active: true``; ``#identity`` drops the cached key.
- **Broken commits** are dropped and reported (``RepoEvent("error")``); a repo whose fetch fails
  is ``error`` (and retried by the next run).

Filters: ``collections`` (NSIDs and ``app.bsky.feed.*`` prefixes) on the records emitted and
stored; ``signal_collection``: track only repos that have a record in that collection (listed
with ``com.atproto.sync.listReposByCollection`` on ``host``, and found live: an untracked repo
creating such a record is tracked and backfilled).

Delivery is at least once. Every item's changes to the state (its record CID, the repo's rev and
root, the cursor) are applied when the consumer asks for the next item (or calls :meth:`Sync.ack`)
and committed to the SQLite file in groups: when no input came for 20 ms, every
``commit_every`` items and every ``commit_interval`` seconds, and on exit. The committed cursor
is the seq of the last firehose event handled, held back before the first event still buffered,
so after a ``kill -9`` a restart with the same state file replays from there, drops what it
already applied (rev not above the stored one) and re-delivers only items not acknowledged or
acknowledged after the last commit (``commit_every=1`` commits every acknowledgement). An
interrupted fetch is redone and emits only the difference with what was delivered. Keys that
may have been delivered and not committed are committed first: a fetch's creates as records
with an empty CID, live events' ops as marks (one commit per group of firehose events, see
:meth:`Sync._mark_live`) that a restart turns into such records; so a refetch after a restart
sends each again (an update, or a delete if the repo no longer has it), and after a restart and
any resync a consumer applying the events holds the repo's records (updates as upserts).
``before_commit`` lets a consumer that buffers its output write it out before each commit.

Spec: atproto sync (https://atproto.com/specs/sync), "Commit Validation", "Repository
Synchronization"; lexicons ``com.atproto.sync.subscribeRepos``, ``getRepo``, ``listRepos``,
``listReposByCollection``.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, Self

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..backfill.sources import list_repos_by_collection
from ..core.cid import cid_text
from ..errors import CommitVerifyError, FetchError, IdentityError, OutOfSyncError
from ..firehose import Event, Firehose, KeyCache, Problem
from ..firehose.items import RawCommit, parse_message
from ..net.hosts import DEFAULT_HOST_CONCURRENCY, DEFAULT_HOST_RPS, HostLimiter
from .follow import _UNSET, RecordEvent, RepoEvent, collection_filter
from .state import StateStore
from .verify import RepoState, VerifiedOp, verify_commit, verify_sync

if TYPE_CHECKING:
    import httpx

    from ..backfill.results import BackfillResult
    from ..backfill.sinks import RecordOp
    from ..core.commit import Commit
    from ..net.fetch import FetchOptions

__all__ = ["DEFAULT_STATE_PATH", "Sync", "SyncStats", "list_repos_by_collection"]

#: The state file's default name (in the working folder).
DEFAULT_STATE_PATH: Final = "repo-stream-sync.sqlite"
_INACTIVE: Final = ("takendown", "suspended", "deleted", "deactivated")
_PAGE: Final = 500  # stored records compared per query
_IDLE: Final = 0.02  # seconds without input before what was taken is committed
#: Seconds the pump waits for the firehose reader's next read before it hands a group over, and
#: the most firehose items in a group (see Firehose.batches): a busy stream comes in groups of up
#: to _GROUP events, one commit of their marks each, rather than one per read of the connection.
_GATHER: Final = 0.001
_GROUP: Final = 256
_MAX_ROOTS: Final = 100_000  # repos whose verified MST root is kept as bytes too (then forgotten at once)
_Item = tuple[str, Any, Any, Any]
_ACTIONS: Final[dict[str, Literal["create", "update", "delete"]]] = {"create": "create", "update": "update", "delete": "delete"}
_Effect = Callable[[], Awaitable[None]] | None
_Delivery = tuple["RecordEvent | RepoEvent | None", _Effect]


def record_events(
    cls: type[RecordEvent], unset: object, did: str, rev: str, seq: int | None, ops: Sequence[VerifiedOp[str]]
) -> tuple[list[_Delivery], list[tuple[str, str | None]]]:
    """A verified commit's record events, every op one (no collection filter): ``(deliveries,
    records)``, deliveries a list of ``(cls(did, rev, seq, action, collection, rkey, cid text,
    live=True, value_text=value), None)``, records of ``(path, cid text or None)``; ``ops`` are
    :class:`~repo_stream.sync.verify.VerifiedOp` with their value as JSON text. The reference of
    the C core's ``record_events`` (which sets the events' slots itself, ``unset`` the marker
    ``__init__`` stores for a value not decoded yet)."""
    deliveries: list[_Delivery] = []
    records: list[tuple[str, str | None]] = []
    for action, path, link, _, text, _ in ops:
        collection, _, rkey = path.partition("/")
        cid = None if link is None else cid_text(link.cid_bytes)
        deliveries.append((cls(did, rev, seq, action, collection, rkey, cid, live=True, value_text=text), None))  # type: ignore[arg-type]
        records.append((path, cid))
    return deliveries, records


SyncEvent = RecordEvent | RepoEvent


@dataclass(slots=True)
class SyncStats:
    """Counters of a :class:`Sync` (read them any time).

    Attributes:
        delivered: items handed to the consumer.
        backfilled: record events from fetches (``live=False``).
        live: record events from the firehose.
        repo_events: repo events.
        commits: ``#commit`` events verified and applied.
        stale: events dropped as already applied (rev not above the stored one).
        broken: commits dropped as invalid.
        fetches: fetches started (backfills and resyncs).
        fetched: fetches delivered.
        failed: fetches failed.
        resyncs: resyncs started.
        buffered: firehose messages buffered now (in memory and spilled).
        buffered_peak: the most buffered at once.
        spilled: messages ever spilled to the state file.
        problems: problems of the stream (:class:`~repo_stream.firehose.Problem`).
        last_time: ``time`` of the last firehose event handled (RFC 3339).
        backfilled_at: seconds from the start until every repo listed was fetched, its records
            delivered and its buffered events applied (None until then).
        caught_up: seconds until, after that, the service had taken everything the firehose had
            sent (None until then).
        started: ``time.monotonic()`` at the start.
    """

    delivered: int = 0
    backfilled: int = 0
    live: int = 0
    repo_events: int = 0
    commits: int = 0
    stale: int = 0
    broken: int = 0
    fetches: int = 0
    fetched: int = 0
    failed: int = 0
    resyncs: int = 0
    buffered: int = 0
    buffered_peak: int = 0
    spilled: int = 0
    problems: int = 0
    last_time: str | None = None
    backfilled_at: float | None = None
    caught_up: float | None = None
    started: float = field(default_factory=time.monotonic)

    def lag(self, now: float | None = None) -> float | None:
        """Seconds between the clock (``now``, default ``time.time()``) and the ``time`` of the
        last firehose event handled, or None."""
        if self.last_time is None:
            return None
        try:
            stamp = datetime.fromisoformat(self.last_time.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
        return (time.time() if now is None else now) - stamp


@dataclass(eq=False, slots=True)
class _Fetch:
    """A repo being fetched (backfilled or refetched)."""

    did: str
    reason: str  # "backfill", "signal" or the desynchronization's reason
    commit: Commit | None = None
    fresh: bool = False  # nothing stored: every record is a create (and goes to a RepoSink)
    position: str = ""  # the last key compared
    created: int = 0
    updated: int = 0
    deleted: int = 0
    failed: bool = False


class _ChunkSink:
    """The backfill executor's sink: hands each chunk of a fetched repo, and its end, to the
    service's consumer (waiting while the consumer is behind)."""

    def __init__(self, send: MemoryObjectSendStream[_Item]) -> None:
        self.send = send

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        await self.send.send(("chunk", commit.did, commit, items))

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, Exception):
            return  # cancelled: the service is stopping
        await self.send.send(("end", commit.did, commit, error))


class Sync:
    """The sync service (module docstring): ``async with Sync(...) as sync: async for event in
    sync: ...``, each event a :class:`~.follow.RecordEvent` or :class:`~.follow.RepoEvent`.

    Args:
        repos: the DIDs to track (an iterable or async iterable of str, e.g.
            :func:`repo_stream.backfill.read_repo_list`); more may come from ``host`` or
            ``signal_collection``. Repos tracked by an earlier run with the same ``state`` stay
            tracked.
        relay: the firehose: a relay or PDS, ``wss://HOST`` or ``ws://HOST:PORT``.
        plc_url: the PLC directory for DID documents (default ``https://plc.directory``).
        state: the SQLite state file (default :data:`DEFAULT_STATE_PATH`).
        cursor: start the firehose after this seq (default: the state's committed cursor, else
            live from now).
        collections: emit and store only records of these collections (NSIDs, ``app.bsky.feed.*``).
        host: also track every repo this host lists (``com.atproto.sync.listRepos``), or with
            ``signal_collection`` the repos it lists for that collection.
        signal_collection: track only repos that have a record in this collection (NSID): those
            ``host`` (default: the relay, as ``https://``) lists with
            ``com.atproto.sync.listReposByCollection``, those of ``repos``, and those the firehose
            shows creating one.
        allow_private_hosts: let hosts learned from the network (PDSes, ``did:web``) be private
            addresses (for local development and tests).
        sink: also write the records to a store: an :class:`~repo_stream.backfill.EventSink` (each
            live commit and each part of a difference: ``apply``; ``#account``: ``set_status``),
            which when it is also a :class:`~repo_stream.backfill.RepoSink` takes a repo's first
            backfill as a repo (its chunks, then ``finish``). Written when the consumer
            acknowledges the items, as the state.
        memory_workers: the backfill executor's repos loaded and walked at once.
        per_host_concurrency: getRepo fetches (backfills and resyncs alike) open at once per PDS
            host (default 4; None: no limit).
        per_host_rps: getRepo requests started per second per PDS host, retries included
            (default 10.0; None: no limit). A 429 or 503 with ``Retry-After`` pauses that host
            only (see :mod:`repo_stream.net.hosts`); repos of other hosts go on.
        host_limiter: a :class:`~repo_stream.net.hosts.HostLimiter` to use instead of one made from
            the two above (to share the limits with other fetches of the program).
        fetch_options: the getRepo fetches' :class:`~repo_stream.net.fetch.FetchOptions`
            (deadlines, size cap, ``retries``: also how often a truncated or incomplete CAR,
            ``MissingBlockError`` or ``TruncatedCarError``, is fetched again before the repo is
            reported as ``error``).
        mem_limit_mb: the backfill's per-repo memory limit, MiB (bigger repos spill to disk).
        max_buffered: firehose messages of repos being fetched kept in memory at most (across
            all repos); more are spilled to the state file.
        max_buffered_bytes: and message bytes kept so at most (default 64 MiB).
        commit_every: commit the state at least every so many acknowledged items.
        commit_interval: commit the state at least every so many seconds.
        client: the HTTP client for DID documents and listings (default: one made here,
            guarded as :func:`repo_stream.net.guard.make_client` makes it).
        firehose_options: more keyword arguments for :class:`~repo_stream.firehose.Firehose`
            (``max_buffer``, ``backoff_base``, ``max_reconnects``...).
        on_problem: called with each :class:`~repo_stream.firehose.Problem` of the stream (a
            lost connection, a malformed message, an error frame, a seq out of order).
        before_commit: called (no arguments) before each commit of the state: a consumer that
            buffers what it does with the items (an output stream, a transaction) makes it
            durable here, as what it acknowledged is about to be (the CLI flushes standard
            output). An exception it raises stops the commit and ends the iteration.

    Raises (from iteration):
        ErrorFrameError: the relay sent ``FutureCursor``.
        FirehoseError: the firehose cannot be reached (``firehose_options`` ``max_reconnects``).
        FetchError: ``host``'s listing failed.
        DiskError: the state file cannot be written.
    """

    def __init__(
        self,
        repos: Iterable[str] | AsyncIterable[str] | None = None,
        *,
        relay: str,
        plc_url: str | None = None,
        state: str | Path = DEFAULT_STATE_PATH,
        cursor: int | None = None,
        collections: Iterable[str] | None = None,
        host: str | None = None,
        signal_collection: str | None = None,
        allow_private_hosts: bool = False,
        sink: Any = None,
        memory_workers: int = 4,
        per_host_concurrency: int | None = DEFAULT_HOST_CONCURRENCY,
        per_host_rps: float | None = DEFAULT_HOST_RPS,
        host_limiter: HostLimiter | None = None,
        fetch_options: FetchOptions | None = None,
        mem_limit_mb: float = 64,
        max_buffered: int = 10_000,
        max_buffered_bytes: int = 64 * 1024 * 1024,
        commit_every: int = 1000,
        commit_interval: float = 0.25,
        client: httpx.AsyncClient | None = None,
        firehose_options: dict[str, Any] | None = None,
        on_problem: Callable[[Problem], None] | None = None,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        if max_buffered < 0 or commit_every < 1:
            raise ValueError("max_buffered must be at least 0 and commit_every at least 1")
        self.repos = repos
        self.relay = relay
        self.plc_url = plc_url
        self.state_path = str(state)
        self.start_cursor = cursor
        self.collections = list(collections or ())
        self._wanted = collection_filter(self.collections)
        self._every_collection = not self.collections  # no filter: the hot path skips the calls
        self.host = host
        self.signal_collection = signal_collection
        if signal_collection is not None and ("*" in signal_collection or "/" in signal_collection):
            raise ValueError(f"signal collection {signal_collection!r}: give one NSID")
        self.allow_private_hosts = allow_private_hosts
        self.sink = sink
        self.memory_workers = memory_workers
        if per_host_concurrency is not None and per_host_concurrency < 1:
            raise ValueError(f"per_host_concurrency must be at least 1, got {per_host_concurrency}")
        if per_host_rps is not None and not per_host_rps > 0:
            raise ValueError(f"per_host_rps must be positive, got {per_host_rps}")
        self.fetch_options = fetch_options
        if host_limiter is None and (per_host_concurrency is not None or per_host_rps is not None):
            host_limiter = HostLimiter(
                per_host_concurrency if per_host_concurrency is not None else 2**31 - 1,
                per_host_rps if per_host_rps is not None else math.inf,
                max_retry_after=fetch_options.max_retry_after if fetch_options is not None else 60.0,
            )
        #: The per-host limits of every getRepo fetch of the service (backfills and resyncs), or None.
        self.host_limiter = host_limiter
        self.mem_limit_mb = mem_limit_mb
        self.max_buffered = max_buffered
        self.max_buffered_bytes = max_buffered_bytes
        self.commit_every = commit_every
        self.commit_interval = commit_interval
        self.firehose_options = dict(firehose_options or {})
        self.on_problem = on_problem
        self.before_commit = before_commit
        self._client = client
        self.stats = SyncStats()
        from ..records.json_text import json_text_processor

        #: Record blocks to their JSON text (the C core's transcoder, or the reference).
        self._transcode = json_text_processor()
        from ..core.implementation import backend

        #: Binary CIDs to their base32 text (the C core's, or the reference).
        self._cid_text: Callable[[bytes], str] = backend().cid_text
        #: A verified commit's record events made in C (:func:`record_events` otherwise).
        self._record_events: Callable[..., tuple[list[_Delivery], list[tuple[str, str | None]]]] | None = backend().record_events
        self._roots: dict[str, tuple[str, bytes]] = {}  # did -> (the root this service verified last: text, bytes)
        self.state: StateStore | None = None
        self.keys: KeyCache | None = None
        self.firehose: Firehose | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._send: MemoryObjectSendStream[_Item] | None = None
        self._receive: MemoryObjectReceiveStream[_Item] | None = None
        self._fetching: dict[str, _Fetch] = {}
        self._requests: deque[str] = deque()
        self._wake: anyio.Event | None = None
        self._listed = False  # every source of repos has been read
        self._buffers: dict[str, deque[Event]] = {}
        self._spilled: dict[str, int] = {}
        self._first_seq: dict[str, int] = {}
        self._in_memory = 0
        self._in_memory_bytes = 0
        self._seq_done: int | None = None
        self._pending: _Effect = None
        self._marks_open = False  # marks of a group not all acknowledged are in the state
        self._marks_done = False  # marks are in the state, all acknowledged: removed at the next commit
        self._acks = 0
        self._last_commit = time.monotonic()
        self._iterator: AsyncIterator[SyncEvent] | None = None
        self._stack: Any = None
        #: Repos by status when the service stopped (for a summary).
        self.final_counts: dict[str, int] = {}

    # ------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        from contextlib import AsyncExitStack

        from ..net.guard import make_client

        stack = AsyncExitStack()
        await stack.__aenter__()
        try:
            self._wake = anyio.Event()
            self.state = stack.enter_context(StateStore(self.state_path))
            # Fetches left unfinished by an earlier run are redone; spilled messages replay.
            self.state.reset_statuses(("backfilling", "desynchronized", "error"), "pending")
            self.state.clear_spilled()
            self.state.clear_staged()
            self.state.fold_marks()  # live events a killed run may have delivered: unknown CIDs
            self.state.commit()
            if self._client is None:
                self._client = await stack.enter_async_context(make_client(allow_private_hosts=self.allow_private_hosts, max_connections=32))
            from ..net.identity import DEFAULT_PLC_URL

            self.keys = KeyCache(client=self._client, plc_url=self.plc_url or DEFAULT_PLC_URL, allow_private_hosts=self.allow_private_hosts)
            cursor = self.start_cursor if self.start_cursor is not None else self.state.cursor
            self._seq_done = cursor
            self.firehose = await stack.enter_async_context(Firehose(self.relay, cursor=cursor, **({"raw_commits": True} | self.firehose_options)))
            self._send, self._receive = anyio.create_memory_object_stream[_Item](16)
            self._group = await stack.enter_async_context(anyio.create_task_group())
            stack.push_async_callback(self._stop)
            self._group.start_soon(self._pump)
            self._group.start_soon(self._backfill)
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        self._stack = stack
        return self

    async def _stop(self) -> None:
        """Cancel the tasks (before the task group's exit waits for them)."""
        if self._group is not None:
            self._group.cancel_scope.cancel()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self._iterator is not None:
                with anyio.CancelScope(shield=True):
                    await self._iterator.aclose()  # type: ignore[attr-defined]
            self._commit()  # what was acknowledged, whatever ended the run
            if self.state is not None:
                self.final_counts = self.state.counts()
        finally:
            stack, self._stack = self._stack, None
            if stack is not None:
                await stack.__aexit__(None, None, None)

    def __aiter__(self) -> AsyncIterator[SyncEvent]:
        if self._receive is None:
            raise RuntimeError("iterate a Sync inside `async with`")
        if self._iterator is None:
            self._iterator = self._events()
        return self._iterator

    async def ack(self) -> None:
        """Acknowledge the last item delivered now (taking the next item does it too): its
        changes are applied to the state, and committed with the next commit."""
        effect, self._pending = self._pending, None
        if effect is not None:
            if self.sink is None:
                await effect()  # no await inside: nothing can cancel it half-way
            else:
                with anyio.CancelScope(shield=True):
                    await effect()
            self._acks += 1

    def commit(self) -> None:
        """Commit what was acknowledged to the state file now."""
        self._commit()

    def _commit(self) -> None:
        state = self.state
        if state is None:
            return
        cursor = self._seq_done
        if self._first_seq:
            held = min(self._first_seq.values()) - 1
            cursor = held if cursor is None else min(cursor, held)
        if cursor is not None and cursor >= 0:
            state.set_cursor(cursor)
        if self.before_commit is not None:
            self.before_commit()
        if self._marks_done and not self._marks_open:
            state.unmark()  # every mark is acknowledged: their changes are committed with this
            self._marks_done = False
        state.commit()
        self._acks = 0
        self._last_commit = time.monotonic()

    def _mark_live(self, items: Iterable[Event | Problem]) -> None:
        """Before a group of firehose events is delivered: mark the keys of their ops (creates,
        updates and deletes alike, of tracked repos not being fetched, rev above the stored one)
        and commit (with what was acknowledged): one commit per group. If the service stops
        (even ``kill -9``) before their changes are committed, the next run turns the marks into
        records with an empty CID (:meth:`StateStore.fold_marks`), so a refetch of the repo sends
        each again (an update if the repo has it, a delete if not) and the consumer's records
        end equal to the repo's. The marks are removed by the first commit after the group is
        acknowledged (:meth:`_close_marks`), all at once (the table holds only marks of groups
        not acknowledged, or acknowledged and not committed). The ops are not verified yet: a
        mark of an op that is then dropped costs at most a needless update or delete after a
        restart."""
        state = self.state
        assert state is not None
        fetching, wanted, every = self._fetching, self._wanted, self._every_collection
        keys: list[tuple[str, str]] = []
        for item in items:
            if isinstance(item, Problem) or item.type != "#commit":
                continue
            did = item.did
            if did is None or did in fetching:
                continue
            row = state.get(did)
            if row is None or row.rev is None:
                continue
            if type(item) is RawCommit:  # not decoded: its rev and (action, path) pairs read in C
                if item.rev <= row.rev:
                    continue
                for _, op_path in item.ops:
                    if every or wanted(op_path.partition("/")[0]):
                        keys.append((did, op_path))
                continue
            body = item.body
            rev = body.get("rev")
            ops = body.get("ops")
            if (isinstance(rev, str) and rev <= row.rev) or not isinstance(ops, list):
                continue
            for op in ops:
                path = op.get("path") if isinstance(op, dict) else None
                if isinstance(path, str) and (every or wanted(path.partition("/")[0])):
                    keys.append((did, path))
        if keys:
            if self._marks_done and not self._marks_open:
                state.unmark()
                self._marks_done = False
            state.mark(keys)
            self._marks_open = True
            self._commit()

    def _close_marks(self) -> None:
        """The group marked last is acknowledged: its marks go with the next commit."""
        if self._marks_open:
            self._marks_done, self._marks_open = True, False

    # ------------------------------------------------------------------------------ tasks

    async def _pump(self) -> None:
        """Firehose items into the consumer's stream, a list at a time (those waiting in the
        firehose's buffer and those its reader decodes within ``_GATHER`` seconds of the last:
        one hand-over and one commit of marks per list, not per event). The next list is taken
        once the consumer has started on this one, so at most two lists (each at most
        ``_GROUP`` and the firehose's ``max_buffer`` items, about ``max_buffer_bytes``) are held
        outside its buffer."""
        assert self.firehose is not None and self._send is not None
        send = self._send.clone()
        async with send:
            try:
                async for batch in self.firehose.batches(min(_GROUP, self.firehose.max_buffer), gather=_GATHER):
                    taken = anyio.Event()
                    await send.send(("firehose", batch, taken, None))
                    await taken.wait()
            except Exception as exc:
                await send.send(("firehose-error", exc, None, None))

    async def _backfill(self) -> None:
        """The backfill executor over :meth:`_sources`; its chunks and results into the stream."""
        from ..backfill.executor import backfill

        assert self._send is not None
        send = self._send.clone()
        async with send:
            try:
                results = backfill(
                    self._sources(),
                    sink=_ChunkSink(send.clone()),
                    client=self._client,
                    memory_workers=self.memory_workers,
                    mem_limit_mb=self.mem_limit_mb,
                    verify="signature",
                    plc_url=self.plc_url,
                    allow_private_hosts=self.allow_private_hosts,
                    fetch_options=self.fetch_options,
                    per_host_concurrency=None,
                    per_host_rps=None,
                    host_limiter=self.host_limiter,
                )
                async with aclosing(results):
                    async for result in results:
                        await send.send(("result", result, None, None))
            except Exception as exc:
                await send.send(("source-error", exc, None, None))

    def _request(self, did: str, reason: str) -> None:
        """Fetch ``did`` (again): its events are buffered from now until the fetch is delivered."""
        assert self.state is not None
        self._fetching[did] = _Fetch(did, reason)
        self.state.set(did, "backfilling" if reason in ("backfill", "signal") else "desynchronized")
        self.stats.fetches += 1
        self._requests.append(did)
        if self._wake is not None:
            self._wake.set()

    async def _sources(self) -> AsyncIterator[str]:
        """The DIDs to fetch, as the executor takes them: requested refetches first, then the
        repos given, listed by ``host``, and left pending by an earlier run; then refetches as
        they come, until the service stops."""
        state = self.state
        assert state is not None

        async def listed() -> AsyncGenerator[str, None]:
            if self.repos is not None:
                if isinstance(self.repos, AsyncIterable):
                    async for did in self.repos:
                        yield did.strip()
                else:
                    for did in self.repos:
                        yield did.strip()
            if self.signal_collection is not None:
                where = self.host or _http_url(self.relay)
                async for did in list_repos_by_collection(where, self.signal_collection, client=self._client, allow_private_hosts=self.allow_private_hosts):
                    yield did
            elif self.host is not None:
                from ..backfill.sources import list_repos

                async for did in list_repos(self.host, client=self._client, allow_private_hosts=self.allow_private_hosts):
                    yield did

        async def previous() -> AsyncGenerator[str, None]:
            after = ""
            while page := state.dids("pending", after, 500):
                for did in page:
                    yield did
                after = page[-1]

        for source in (listed(), previous()):
            async with aclosing(source) as dids:
                async for did in dids:
                    while self._requests:
                        yield self._requests.popleft()
                    if not did.startswith("did:"):
                        continue
                    state.add(did)
                    row = state.get(did)
                    if row is None or row.status != "pending" or did in self._fetching:
                        continue
                    self._fetching[did] = _Fetch(did, "backfill")
                    state.set(did, "backfilling")
                    self.stats.fetches += 1
                    yield did
        self._listed = True
        while True:
            while self._requests:
                yield self._requests.popleft()
            self._check_caught_up()
            self._wake = wake = anyio.Event()
            await wake.wait()

    def _check_caught_up(self, idle: bool = False) -> None:
        """Record when every repo was backfilled and, ``idle`` (nothing waiting from the
        firehose), when the service caught up with the stream."""
        stats = self.stats
        if stats.caught_up is not None or not self._listed or self._fetching or self._requests:
            return
        now = time.monotonic() - stats.started
        if stats.backfilled_at is None:
            stats.backfilled_at = now
        if idle and self.firehose is not None and self.firehose.buffered == 0:
            stats.caught_up = now

    # ------------------------------------------------------------------------------ the consumer

    async def _events(self) -> AsyncIterator[SyncEvent]:
        assert self._receive is not None
        receive = self._receive
        while True:
            await self.ack()
            if self._acks >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_interval:
                self._commit()
            try:
                item = receive.receive_nowait()
            except anyio.WouldBlock:
                self._check_caught_up(idle=True)
                # Idle: commit what was taken, unless more comes at once (a commit costs ~0.1 ms:
                # one per event would be most of the time of a busy stream).
                got: _Item | None = None
                if self._acks:
                    with anyio.move_on_after(_IDLE):
                        try:
                            got = await receive.receive()
                        except anyio.EndOfStream:
                            return
                    if got is None:
                        self._commit()
                if got is None:
                    try:
                        got = await receive.receive()
                    except anyio.EndOfStream:
                        return
                item = got
            except anyio.EndOfStream:
                return
            kind = item[0]
            if kind == "firehose":  # the hot path: lists, no generator
                item[2].set()
                stats = self.stats
                self._mark_live(item[1])
                for message in item[1]:
                    for event, effect in await self._on_firehose(message):
                        if event is None:
                            if effect is not None:
                                await effect()
                                self._acks += 1
                            continue
                        if self._pending is not None:
                            await self.ack()
                        self._pending = effect
                        stats.delivered += 1
                        yield event
                        effect = self._pending
                        if effect is not None:
                            if self.sink is None:  # self.ack(), one coroutine less per event
                                self._pending = None
                                await effect()  # no await inside: nothing can cancel it half-way
                                self._acks += 1
                            else:
                                await self.ack()
                    if self._acks >= self.commit_every:
                        self._commit()
                self._close_marks()
                continue
            if kind == "chunk":
                handler = self._on_chunk(item[1], item[2], item[3])
            elif kind == "end":
                handler = self._on_end(item[1], item[2], item[3])
            elif kind == "result":
                handler = self._on_result(item[1])
            else:  # firehose-error, source-error: the stream ends with it
                raise item[1]
            async with aclosing(handler) as deliveries:
                async for event, effect in deliveries:
                    if event is None:
                        if effect is not None:
                            await effect()
                            self._acks += 1
                        continue
                    if self._pending is not None:
                        await self.ack()
                    self._pending = effect
                    self.stats.delivered += 1
                    yield event
                    if self._pending is not None:
                        await self.ack()
            self._close_marks()

    async def _on_firehose(self, item: Event | Problem) -> list[_Delivery]:
        if isinstance(item, Problem):
            self.stats.problems += 1
            if self.on_problem is not None:
                self.on_problem(item)
            return []
        if item.time is not None:
            self.stats.last_time = item.time
        deliveries = await self._on_event(item)
        seq = item.seq
        if seq is None:
            return deliveries
        # The seq is done once the event's last delivery is taken.
        last_event, before = deliveries[-1] if deliveries else (None, None)

        async def done(before: _Effect = before, seq: int = seq) -> None:
            if before is not None:
                await before()
            self._seq_done = seq

        if deliveries:
            deliveries[-1] = (last_event, done)
        else:
            deliveries.append((None, done))
        return deliveries

    def _buffer(self, item: Event) -> None:
        did = item.did
        assert did is not None and item.seq is not None and self.state is not None
        self._first_seq.setdefault(did, item.seq)
        if did in self._spilled or self._in_memory >= self.max_buffered or self._in_memory_bytes + len(item.message) > self.max_buffered_bytes:
            self.state.spill(did, item.seq, item.message)
            self._spilled[did] = self._spilled.get(did, 0) + 1
            self.stats.spilled += 1
        else:
            self._buffers.setdefault(did, deque()).append(item)
            self._in_memory += 1
            self._in_memory_bytes += len(item.message)
        self.stats.buffered += 1
        self.stats.buffered_peak = max(self.stats.buffered_peak, self.stats.buffered)

    def _unbuffer(self, did: str) -> Event | None:
        """The oldest buffered message of ``did``, or None."""
        queue = self._buffers.get(did)
        if queue:
            self._in_memory -= 1
            self.stats.buffered -= 1
            item = queue.popleft()
            self._in_memory_bytes -= len(item.message)
            return item
        self._buffers.pop(did, None)
        if did in self._spilled:
            assert self.state is not None
            rows = self.state.unspill(did, 1)
            if rows:
                self._spilled[did] -= 1
                self.stats.buffered -= 1
                firehose = self.firehose
                return parse_message(rows[0][1], max_bytes=firehose.max_message_bytes if firehose is not None else 5 << 20)
            del self._spilled[did]
        return None

    def _drop_buffer(self, did: str) -> None:
        queue = self._buffers.pop(did, None)
        if queue:
            self._in_memory -= len(queue)
            self._in_memory_bytes -= sum(len(item.message) for item in queue)
            self.stats.buffered -= len(queue)
        count = self._spilled.pop(did, 0)
        if count:
            assert self.state is not None
            self.state.clear_spilled(did)
            self.stats.buffered -= count
        self._first_seq.pop(did, None)

    async def _on_event(self, item: Event) -> list[_Delivery]:
        """Deliveries for one firehose event: ``(event, effect)`` pairs, ``event`` None for an
        effect to apply at once. (A list, not a generator: the hot path.)"""
        state, keys = self.state, self.keys
        assert state is not None and keys is not None
        did, seq = item.did, item.seq
        if did is None or seq is None or not item.known:
            return []
        if did in self._fetching:
            self._buffer(item)
            return []
        row = state.get(did)
        if row is None:
            if self.signal_collection is not None and item.type == "#commit" and self._signals(item):
                state.add(did)
                self._request(did, "signal")
                self._buffer(item)
            return []
        status = row.status
        if item.type == "#identity":
            keys.forget(did)
            if status == "active" or status in _INACTIVE:
                handle = item.body.get("handle")
                self.stats.repo_events += 1
                return [(RepoEvent(did, "identity", seq, {"handle": handle if isinstance(handle, str) else None}), None)]
            return []
        if item.type == "#account":
            if status != "active" and status not in _INACTIVE:
                return []
            active = item.body.get("active") is True
            raw = item.body.get("status")
            new = "active" if active else (raw if raw in _INACTIVE else "deactivated")
            assert isinstance(new, str)

            async def account(did: str = did, new: str = new) -> None:
                state.set(did, new)
                if self.sink is not None and hasattr(self.sink, "set_status"):
                    await self.sink.set_status(did, new)

            self.stats.repo_events += 1
            return [(RepoEvent(did, "account", seq, {"active": active, "status": raw if isinstance(raw, str) else None}), account)]
        if item.type not in ("#commit", "#sync") or status != "active" or row.rev is None or row.data is None:
            return []
        try:
            key = await keys.key(did)
        except IdentityError as exc:
            self.stats.repo_events += 1
            return [(RepoEvent(did, "error", seq, {"error": f"IdentityError: {exc}"}), None)]
        if item.type == "#sync":
            try:
                synced = verify_sync(item.body, key=key)  # decoded once, by the firehose client
            except CommitVerifyError as exc:
                self.stats.broken += 1
                self.stats.repo_events += 1
                return [(RepoEvent(did, "error", seq, {"error": f"{type(exc).__name__}: {exc}"}), None)]
            if str(synced.data) != row.data and synced.rev >= row.rev:
                return self._desynchronized(item, f"#sync to rev {synced.rev} with another data root")
            return []
        raw = type(item) is RawCommit
        rev = item.rev if type(item) is RawCommit else item.body.get("rev")
        if isinstance(rev, str) and rev <= row.rev:
            self.stats.stale += 1
            return []
        # The stored root as bytes when this service verified it last (no base32 decoding).
        held = self._roots.get(did)
        prev_data: str | bytes = held[1] if held is not None and held[0] == row.data else row.data
        try:
            # A RawCommit's message is read by verify_commit in one C pass; others were decoded.
            commit = verify_commit(
                item.message if raw else item.body,
                key=key,
                prev=RepoState(row.rev, prev_data),
                process=self._transcode,
                max_message_bytes=len(item.message),
            )
        except OutOfSyncError as exc:
            return self._desynchronized(item, str(exc))
        except CommitVerifyError as exc:
            self.stats.broken += 1
            self.stats.repo_events += 1
            return [(RepoEvent(did, "error", seq, {"error": f"{type(exc).__name__}: {exc}"}), None)]
        self.stats.commits += 1
        cid_text = self._cid_text
        wanted, every = self._wanted, self._every_collection
        rev_now = commit.rev
        data_bytes = commit.data.cid_bytes
        data_now = cid_text(data_bytes)
        roots = self._roots
        if len(roots) >= _MAX_ROOTS and did not in roots:
            roots.clear()
        roots[did] = (data_now, data_bytes)
        out: list[_Delivery] = []
        records: list[tuple[str, str | None]] = []
        ops: list[RecordOp] = []
        sink = self.sink
        if sink is not None:
            from ..backfill.sinks import RecordOp
        if every and sink is None:  # the usual case: every op an event, no sink
            make = self._record_events
            out, records = (make or record_events)(RecordEvent, _UNSET, did, rev_now, seq, commit.ops)
        else:
            # The ops as the tuples they are (action, path, cid, prev, value, block): no
            # attribute lookups; a verified op's action is one of the three, mapped to its Literal.
            for kind, path, link, _, text, block in commit.ops:
                collection, _, rkey = path.partition("/")
                if not every and not wanted(collection):
                    continue
                action = _ACTIONS[kind]
                cid = None if link is None else cid_text(link.cid_bytes)
                out.append((RecordEvent(did, rev_now, seq, action, collection, rkey, cid, live=True, value_text=text), None))
                records.append((path, cid))
                if sink is not None:
                    ops.append(RecordOp(action, collection, rkey, cid, block))
        self.stats.live += len(out)

        async def applied(did: str = did, rev: str = rev_now, data: str = data_now, ops: list[RecordOp] = ops) -> None:
            # The commit is the unit: its records, rev and root are written once its last event
            # is taken (a crash before re-delivers the whole commit).
            state.put_records(did, records)
            state.set(did, "active", rev, data)
            if self.sink is not None:
                await self.sink.apply(did, rev, data, ops)

        if not out:
            return [(None, applied)]
        out[-1] = (out[-1][0], applied)
        return out

    def _signals(self, item: Event) -> bool:
        """True when a ``#commit`` creates or updates a record of the signal collection."""
        prefix = f"{self.signal_collection}/"
        if type(item) is RawCommit:
            return any(action != "delete" and path.startswith(prefix) for action, path in item.ops)
        ops = item.body.get("ops")
        return isinstance(ops, list) and any(
            isinstance(op, dict) and op.get("action") in ("create", "update") and str(op.get("path", "")).startswith(prefix) for op in ops
        )

    def _desynchronized(self, item: Event, reason: str) -> list[_Delivery]:
        did = item.did
        assert did is not None
        self._request(did, reason)
        self._buffer(item)  # applied after the refetch if the repo it gives is older
        self.stats.resyncs += 1
        self.stats.repo_events += 2
        return [
            (RepoEvent(did, "desynchronized", item.seq, {"reason": reason}), None),
            (RepoEvent(did, "resync", item.seq, {"phase": "started", "reason": reason}), None),
        ]

    # -- fetches --------------------------------------------------------------------------------

    async def _on_chunk(self, did: str, commit: Commit, items: list[tuple[str, str, bytes]]) -> AsyncGenerator[_Delivery, None]:
        state = self.state
        assert state is not None
        fetch = self._fetching.get(did)
        if fetch is None or fetch.failed or not items:
            return
        if fetch.commit is None:
            fetch.commit = commit
            fetch.fresh = not state.has_records(did)
        wanted = self._wanted
        new = [(k, c, v) for k, c, v in items if wanted(k.partition("/")[0])]
        upto = items[-1][0]
        if fetch.fresh:
            staged = self.sink is not None and callable(self.sink)
            self._mark(did, [k for k, _, _ in new])
            for key, cid, block in new:
                yield self._backfilled(fetch, "create", key, cid, block, staged)
            if staged and new:
                chunk = [(k, c, v) for k, c, v in new]

                async def write(chunk: list[tuple[str, str, bytes]] = chunk) -> None:
                    await self.sink(did, commit, chunk)

                yield None, write
            fetch.position = upto
            return
        async for delivery in self._difference(fetch, new, upto):
            yield delivery

    def _mark(self, did: str, keys: list[str]) -> None:
        """Before a fetch's creates are delivered: store their keys with an empty CID and commit
        (with what was acknowledged), so that if the service stops (even ``kill -9``) before
        they are acknowledged, the fetch redone by the next run sends each again if the repo
        still has it (as an update: its CID differs) or a delete if not, and a consumer is never
        left with a record the repo no longer has. Acknowledging a create stores its CID."""
        if not keys:
            return
        assert self.state is not None
        self.state.put_records(did, [(key, "") for key in keys])
        self._commit()

    def _backfilled(
        self, fetch: _Fetch, action: Literal["create", "update", "delete"], key: str, cid: str | None, block: bytes | None, staged: bool = False
    ) -> tuple[SyncEvent, _Effect]:
        """A record event of a fetch, and its effect: store its CID (in ``staged`` for a first
        backfill going to a RepoSink)."""
        assert fetch.commit is not None and self.state is not None
        collection, _, rkey = key.partition("/")
        if action == "create":
            fetch.created += 1
        elif action == "update":
            fetch.updated += 1
        else:
            fetch.deleted += 1
        self.stats.backfilled += 1
        text = None if block is None else self._transcode(block)
        state = self.state

        async def put(did: str = fetch.did) -> None:
            state.put_record(did, key, cid, staged=staged)

        return RecordEvent(fetch.did, fetch.commit.rev, None, action, collection, rkey, cid, live=False, value_text=text), put

    async def _difference(self, fetch: _Fetch, new: Sequence[tuple[str, str, bytes]], upto: str | None) -> AsyncGenerator[_Delivery, None]:
        """Compare ``new`` (the fetched records with ``position < key <= upto``, in key order)
        with the stored ones in that range; deliver the difference."""
        state = self.state
        assert state is not None and fetch.commit is not None
        j = 0
        while True:
            page = state.records_page(fetch.did, fetch.position, upto, _PAGE)
            top = page[-1][0] if len(page) == _PAGE else upto
            stored = dict(page)
            out: list[tuple[str, Literal["create", "update", "delete"], str | None, bytes | None]] = []
            cid: str | None
            block: bytes | None
            while j < len(new) and (top is None or new[j][0] <= top):
                key, cid, block = new[j]
                j += 1
                old = stored.pop(key, None)
                if old is None:
                    out.append((key, "create", cid, block))
                elif old != cid:
                    out.append((key, "update", cid, block))
            out += [(key, "delete", None, None) for key in stored]
            out.sort(key=lambda x: x[0].encode())
            self._mark(fetch.did, [key for key, action, _, _ in out if action == "create"])
            ops: list[RecordOp] = []
            for key, action, cid, block in out:
                yield self._backfilled(fetch, action, key, cid, block)
                if self.sink is not None:
                    from ..backfill.sinks import RecordOp

                    collection, _, rkey = key.partition("/")
                    ops.append(RecordOp(action, collection, rkey, cid, block))
            if ops:
                commit = fetch.commit

                async def write(ops: list[RecordOp] = ops, commit: Commit = commit) -> None:
                    await self.sink.apply(commit.did, commit.rev, cid_text(commit.data_bytes), ops)

                yield None, write
            if top is not None:
                fetch.position = top
            elif page:
                fetch.position = page[-1][0]
            if len(page) < _PAGE:
                if upto is not None:
                    fetch.position = upto
                return

    async def _on_end(self, did: str, commit: Commit, error: BaseException | None) -> AsyncGenerator[_Delivery, None]:
        state = self.state
        assert state is not None
        fetch = self._fetching.get(did)
        if fetch is None or fetch.failed:
            return
        if error is not None:
            # The executor tells the sink a repo ended with an error before it fetches it again
            # (a truncated or incomplete CAR: MissingBlockError, TruncatedCarError) and before
            # its result says it failed: start the comparison over (what was delivered is
            # stored, so the next fetch sends only the difference); the result reports a failure.
            await self._restart(fetch, commit, error)
            return
        if fetch.commit is None:  # an empty repo
            fetch.commit = commit
            fetch.fresh = not state.has_records(did)
        if not fetch.fresh:
            async for delivery in self._difference(fetch, [], None):
                yield delivery
        staged = fetch.fresh and self.sink is not None and callable(self.sink)
        rev, data = commit.rev, cid_text(commit.data_bytes)

        async def finished() -> None:
            if staged:
                finish = getattr(self.sink, "finish", None)
                if finish is not None:
                    await finish(did, commit, None)
                state.unstage(did)
            state.set(did, "active", rev, data)
            self._fetching.pop(did, None)
            self.stats.fetched += 1

        if fetch.reason != "backfill":
            detail = {
                "phase": "finished", "reason": fetch.reason, "rev": rev, "data": data,
                "created": fetch.created, "updated": fetch.updated, "deleted": fetch.deleted,
            }  # fmt: skip
            self.stats.repo_events += 1
            yield RepoEvent(did, "resync", None, detail), finished
        else:
            yield None, finished
        # Then the events buffered while it was fetched, in order, until one needs a refetch;
        # those in memory marked as one group, the spilled ones one by one.
        queue = self._buffers.get(did)
        in_memory = len(queue) if queue else 0
        if queue:
            self._mark_live(list(queue))
        while did not in self._fetching:
            item = self._unbuffer(did)
            if item is None:
                break
            if in_memory:
                in_memory -= 1
            else:
                self._mark_live([item])
            for delivery in await self._on_event(item):
                yield delivery
        if did not in self._fetching:
            self._drop_buffer(did)

    async def _restart(self, fetch: _Fetch, commit: Commit, error: BaseException) -> None:
        state = self.state
        assert state is not None
        if fetch.fresh and self.sink is not None and callable(self.sink):
            state.clear_staged(fetch.did)
            finish = getattr(self.sink, "finish", None)
            if finish is not None:
                try:
                    await finish(fetch.did, commit, error)
                except Exception:
                    pass
        fetch.commit = None
        fetch.fresh = False
        fetch.position = ""

    async def _failed(self, fetch: _Fetch, error: str) -> AsyncGenerator[_Delivery, None]:
        state = self.state
        assert state is not None
        fetch.failed = True
        self._fetching.pop(fetch.did, None)
        self._drop_buffer(fetch.did)
        state.set(fetch.did, "error")
        if fetch.fresh and self.sink is not None:
            state.clear_staged(fetch.did)
            finish = getattr(self.sink, "finish", None)
            if finish is not None and fetch.commit is not None:
                try:
                    await finish(fetch.did, fetch.commit, FetchError(error))
                except Exception:
                    pass
        self.stats.failed += 1
        self.stats.repo_events += 1
        yield RepoEvent(fetch.did, "error", None, {"error": error}), None

    async def _on_result(self, result: BackfillResult) -> AsyncGenerator[_Delivery, None]:
        did = result.did or result.source
        fetch = self._fetching.get(did)
        if result.error is None or fetch is None or fetch.failed:
            return
        async for delivery in self._failed(fetch, result.error):
            yield delivery


def _http_url(url: str) -> str:
    """``wss://host`` -> ``https://host`` (``ws://`` -> ``http://``), without the path."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme.lower(), parts.scheme)
    return f"{scheme}://{parts.netloc}"
