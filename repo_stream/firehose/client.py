"""The subscribeRepos client: connect, read, decode, reconnect, in bounded memory.

Spec: atproto event streams (https://atproto.com/specs/event-stream): "Sequence Numbers" and
"Cursors" (``cursor=N`` replays the events after ``N``), "Framing" (error frames end the
stream); lexicon ``com.atproto.sync.subscribeRepos``.

:class:`Firehose` runs one reader task that receives messages, decodes them and puts
:class:`~repo_stream.firehose.items.Event` and :class:`~repo_stream.firehose.items.Problem` items
into a buffer of at most ``max_buffer`` items, holding at most ``max_buffer_bytes`` of message
bytes (one message is let in whatever its size when the buffer is empty); the consumer iterates
over it, one item at a time or (:meth:`Firehose.batches`) every item waiting at once. Handing an
item over needs no wait; a reader waiting for space is woken once the buffer is down to half. A slow consumer fills the buffer, the reader then waits,
stops reading the socket, and TCP's flow control slows the server down: the messages buffered
stay within ``min(max_buffer * max_message_bytes, max(max_buffer_bytes, max_message_bytes))``
bytes, plus the one being read. A relay that will not wait drops the connection
(an error frame ``ConsumerTooSlow``, or a plain close): the client reports it, backs off and
reconnects with ``cursor`` = the seq of the last event it buffered, so nothing is lost while the
server still holds those events (a relay keeps hours to days of them; after that it sends
``#info OutdatedCursor`` and starts from its oldest).

Reconnection: capped exponential backoff with full jitter: the n-th consecutive failure waits a
uniform random time in ``[delay/2, delay]`` with ``delay = min(backoff_cap, backoff_base *
2**(n-1))``; a connection that delivered a message resets n. ``max_reconnects`` consecutive
failures (default: no limit) end the stream with the last :class:`~repo_stream.errors.FirehoseError`.

Seq: each event with a seq must be above the previous one. A seq not above it is reported
(``"seq-backwards"``) and the event is still delivered; a jump past ``previous + 1`` is reported
(``"seq-gap"``) and the event delivered (relays skip seqs: a gap is information, not an error).

Error frames: ``FutureCursor`` (the cursor is ahead of the server: resuming would repeat it
forever) is reported and then ends the stream, raising the
:class:`~repo_stream.errors.ErrorFrameError`; any other (``ConsumerTooSlow``...) is reported and
the client reconnects from its cursor.

Deadlines: ``connect_timeout`` for TCP, TLS and the upgrade; after ``ping_interval`` seconds
without data the client sends a ping, and after as long again without data it drops the
connection (reported as ``"disconnected"``) and reconnects.
"""

from __future__ import annotations

import math
import random
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.abc
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from ..errors import ErrorFrameError, EventDecodeError, FirehoseError, SeqOrderError
from ..sync.events import DEFAULT_MAX_MESSAGE_BYTES
from .items import Event, Problem, parse_message
from .websocket import MessageTooLarge, WebSocket, connect

__all__ = ["DEFAULT_MAX_BUFFER", "DEFAULT_MAX_BUFFER_BYTES", "Firehose", "FirehoseStats", "subscribe_url"]

#: Items (events and problems) buffered between the reader and the consumer by default.
DEFAULT_MAX_BUFFER: Final = 256
#: Message bytes buffered between the reader and the consumer by default (64 MiB).
DEFAULT_MAX_BUFFER_BYTES: Final = 64 * 1024 * 1024
#: The XRPC path of the event stream.
SUBSCRIBE_REPOS_PATH: Final = "/xrpc/com.atproto.sync.subscribeRepos"


def subscribe_url(url: str, cursor: int | None) -> str:
    """The subscribeRepos URL of a host: ``url`` with the XRPC path when it has no path
    (``wss://bsky.network`` -> ``wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos``), and
    ``cursor`` set in the query (replacing one given) unless None."""
    parts = urlsplit(url)
    path = parts.path if parts.path not in ("", "/") else SUBSCRIBE_REPOS_PATH
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "cursor"]
    if cursor is not None:
        query.append(("cursor", str(cursor)))
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))


@dataclass(slots=True)
class FirehoseStats:
    """Counters of a :class:`Firehose` (read them any time).

    Attributes:
        connections: connections opened. messages: messages received (all kinds).
        bytes: message bytes received. events: events delivered to the buffer.
        problems: problems reported. max_buffered: the most items ever waiting in the buffer
        (at most ``max_buffer``). max_buffered_bytes: the most message bytes ever buffered
        (counting the one being handed over). started: ``time.monotonic()`` at the start.
    """

    connections: int = 0
    messages: int = 0
    bytes: int = 0
    events: int = 0
    problems: int = 0
    max_buffered: int = 0
    max_buffered_bytes: int = 0
    started: float = field(default_factory=time.monotonic)


class Firehose:
    """A ``com.atproto.sync.subscribeRepos`` stream: ``async with Firehose(url) as stream:
    async for item in stream: ...``, items being :class:`~repo_stream.firehose.items.Event` or
    :class:`~repo_stream.firehose.items.Problem` (module docstring: what is reported, when the
    client reconnects and when it stops).

    Args:
        url: the relay or PDS: ``wss://HOST`` or ``ws://HOST:PORT`` (the XRPC path is added when
            the URL has none) or the full subscribeRepos URL. Connected as given (trusted).
        cursor: start after this seq (None: live, from now).
        max_message_bytes: the largest message kept (bigger ones are dropped and reported as
            ``"malformed"``); default 5 MiB.
        max_buffer: items waiting for the consumer at most (backpressure beyond).
        max_buffer_bytes: message bytes waiting for the consumer at most (default 64 MiB).
        connect_timeout: seconds for TCP, TLS and the WebSocket upgrade.
        ping_interval: seconds without data before a ping; as long again and the connection
            is dropped and reopened.
        backoff_base, backoff_cap: the reconnection backoff, seconds (module docstring).
        max_reconnects: consecutive failed connections before giving up (None: never).
        ssl_context: for ``wss://`` (default: the system's trusted certificates).
        raw_commits: hand the usual ``#commit`` message over undecoded, as a
            :class:`~repo_stream.firehose.items.RawCommit` (with the C core; for a consumer that
            passes ``message`` to :func:`~repo_stream.sync.verify_commit`, as
            :class:`~repo_stream.sync.Sync` does); every other message as without.

    Raises (from iteration):
        ErrorFrameError: a ``FutureCursor`` error frame.
        FirehoseError: ``max_reconnects`` consecutive failures (the last one's error), or a
            URL that is not ``ws://`` / ``wss://``.
    """

    def __init__(
        self,
        url: str,
        *,
        cursor: int | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_buffer: int = DEFAULT_MAX_BUFFER,
        max_buffer_bytes: int = DEFAULT_MAX_BUFFER_BYTES,
        connect_timeout: float = 10.0,
        ping_interval: float = 30.0,
        backoff_base: float = 0.5,
        backoff_cap: float = 30.0,
        max_reconnects: int | None = None,
        ssl_context: ssl.SSLContext | None = None,
        raw_commits: bool = False,
    ) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, not {max_buffer}")
        self.url = url
        self.max_message_bytes = max_message_bytes
        self.max_buffer = max_buffer
        self.max_buffer_bytes = max_buffer_bytes
        self._buffered_bytes = 0
        self._buffered_items = 0
        self._space: anyio.Event | None = None
        self._arrival: anyio.Event | None = None  # batches() waiting for the reader's next item
        self._stashed: BaseException | None = None
        self.connect_timeout = connect_timeout
        self.ping_interval = ping_interval
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.max_reconnects = max_reconnects
        self.ssl_context = ssl_context
        self.raw_commits = raw_commits
        #: The seq of the last event the consumer took (persist it; pass it as ``cursor`` to resume).
        self.cursor: int | None = cursor
        #: The seq of the last event put in the buffer: where a reconnection resumes.
        self.read_cursor: int | None = cursor
        self.stats = FirehoseStats()
        self._send: MemoryObjectSendStream[Event | Problem | BaseException] | None = None
        self._receive: MemoryObjectReceiveStream[Event | Problem | BaseException] | None = None
        self._group: anyio.abc.TaskGroup | None = None
        self._done = False
        self._rng = random.Random()

    # ------------------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        # The stream itself is unbounded: the reader counts items and bytes (``_put``) and waits
        # for space there, so handing an item over needs no wait and no task switch.
        self._send, self._receive = anyio.create_memory_object_stream[Event | Problem | BaseException](math.inf)
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._group.start_soon(self._run)
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        assert self._group is not None
        self._group.cancel_scope.cancel()
        try:
            # The reader sends its errors through the buffer; the body's own exception (if any)
            # propagates as it is, not wrapped in an exception group.
            await self._group.__aexit__(None, None, None)
            return None
        finally:
            if self._receive is not None:
                self._receive.close()

    def __aiter__(self) -> AsyncIterator[Event | Problem]:
        return self._items()

    async def _items(self) -> AsyncIterator[Event | Problem]:
        # One at a time: an item's place in the buffer is freed when it is taken, so the reader
        # is never more than max_buffer items ahead of the consumer.
        async for batch in self.batches(1):
            yield batch[0]

    async def batches(self, max_items: int | None = None, *, gather: float = 0.0) -> AsyncIterator[list[Event | Problem]]:
        """The stream's items as lists: each list holds every item waiting in the buffer when it
        is taken (at least one, at most ``max_items``), in order; the same items as iterating.
        Taking them frees their place in the buffer, so a consumer holding a list holds up to
        ``max_buffer`` items (``max_buffer_bytes`` of messages) outside it.

        ``gather`` (seconds): after the items waiting, keep taking those the reader buffers
        within ``gather`` seconds of the last ones (each read of the connection decodes every
        message it completes at once), up to ``max_items`` (default ``max_buffer``) and
        ``max_buffer_bytes`` of messages: a busy stream comes in lists of the data the
        connection already holds rather than of one read each; an idle one waits ``gather``
        longer for its list. The places of the items gathered are freed as they are taken, so
        the consumer then holds up to ``max_items`` items outside the buffer.

        Raises:
            ErrorFrameError, FirehoseError: as iterating (after the items before the error).
        """
        receive = self._receive
        if receive is None:
            raise RuntimeError("iterate a Firehose inside `async with`")
        limit = max_items if max_items is not None and max_items > 0 else (self.max_buffer if gather > 0 else math.inf)
        while True:
            if self._stashed is not None:
                error, self._stashed = self._stashed, None
                raise error
            try:
                first = receive.receive_nowait()
            except anyio.WouldBlock:
                try:
                    first = await receive.receive()
                except anyio.EndOfStream:
                    return
            except anyio.EndOfStream:
                return
            batch: list[Event | Problem] = []
            size = 0
            freed = 0
            item: Event | Problem | BaseException | None = first
            while item is not None:
                while True:
                    if isinstance(item, BaseException):
                        if not batch:
                            raise item
                        self._stashed = item
                        break
                    batch.append(item)
                    if gather > 0 and isinstance(item, Event):
                        size += len(item.message)
                    if len(batch) >= limit:
                        break
                    try:
                        item = receive.receive_nowait()
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                item = None
                if gather > 0 and self._stashed is None and len(batch) < limit and size < self.max_buffer_bytes:
                    # Free the places of what was taken so the reader can go on reading.
                    self._taken(batch[freed:])
                    freed = len(batch)
                    item = await self._gather(receive, gather)
            self._taken(batch[freed:])
            yield batch

    async def _gather(self, receive: MemoryObjectReceiveStream[Event | Problem | BaseException], wait: float) -> Event | Problem | BaseException | None:
        """The next item if the reader buffers one within ``wait`` seconds, else None."""
        try:
            return receive.receive_nowait()
        except anyio.WouldBlock:
            pass
        except anyio.EndOfStream:
            return None
        arrival = self._arrival = anyio.Event()
        with anyio.move_on_after(wait):
            await arrival.wait()
        self._arrival = None
        try:
            return receive.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream):
            return None

    def _taken(self, batch: list[Event | Problem]) -> None:
        """Free the places of ``batch`` in the buffer; wake the reader once the buffer is down to
        half (not per item: one task switch per half buffer, not per message)."""
        size = 0
        for item in batch:
            if isinstance(item, Event):
                size += len(item.message)
                if item.seq is not None:
                    self.cursor = item.seq
        self._buffered_items -= len(batch)
        self._buffered_bytes -= size
        space = self._space
        if space is not None and (
            self._buffered_items == 0 or (self._buffered_items <= self.max_buffer // 2 and self._buffered_bytes <= self.max_buffer_bytes // 2)
        ):
            space.set()

    @property
    def buffered(self) -> int:
        """Items waiting in the buffer now."""
        return self._buffered_items

    # ------------------------------------------------------------------------------ reader

    async def _put(self, item: Event | Problem | BaseException) -> None:
        assert self._send is not None
        size = len(item.message) if isinstance(item, Event) else 0
        # At most max_buffer items and max_buffer_bytes of messages (one message whatever its
        # size when the buffer is empty); the consumer wakes this once it is down to half.
        while self._buffered_items and (self._buffered_items >= self.max_buffer or (size and self._buffered_bytes + size > self.max_buffer_bytes)):
            self._space = anyio.Event()
            await self._space.wait()
        self._space = None
        self._buffered_bytes += size
        self._buffered_items += 1
        if self._buffered_bytes > self.stats.max_buffered_bytes:
            self.stats.max_buffered_bytes = self._buffered_bytes
        if self._buffered_items > self.stats.max_buffered:
            self.stats.max_buffered = self._buffered_items
        self._send.send_nowait(item)
        if self._arrival is not None:
            self._arrival.set()
        if isinstance(item, Problem):
            self.stats.problems += 1
        elif isinstance(item, Event):
            self.stats.events += 1

    def _backoff(self, failures: int) -> float:
        delay = min(self.backoff_cap, self.backoff_base * math.pow(2, min(failures - 1, 60)))
        return delay * (0.5 + 0.5 * self._rng.random())

    async def _run(self) -> None:
        assert self._send is not None
        failures = 0
        try:
            while True:
                url = subscribe_url(self.url, self.read_cursor)
                try:
                    socket = await connect(url, connect_timeout=self.connect_timeout, max_message_bytes=self.max_message_bytes, ssl_context=self.ssl_context)
                except FirehoseError as exc:
                    if url.split(":", 1)[0].lower() not in ("ws", "wss", "http", "https"):
                        raise
                    error: FirehoseError = exc
                else:
                    self.stats.connections += 1
                    try:
                        delivered, error = await self._read(socket)
                    except _Reconnect as exc:
                        delivered, error = True, exc.error
                    finally:
                        await socket.aclose()
                    if delivered:
                        failures = 0
                failures += 1
                if self.max_reconnects is not None and failures > self.max_reconnects:
                    raise error
                wait = self._backoff(failures)
                await self._put(Problem("disconnected", error, self.read_cursor, round(wait, 3)))
                await anyio.sleep(wait)
        except (FirehoseError, ErrorFrameError) as exc:
            self._send.send_nowait(exc)
        finally:
            self._send.close()

    async def _read(self, socket: WebSocket) -> tuple[bool, FirehoseError]:
        """Read until the connection fails; return (a message came, the error that ended it).
        Every message a read completes is decoded and buffered before the next read."""
        delivered = False
        pinged = False
        while True:
            message: bytes | MessageTooLarge | None = None
            before = socket.bytes_received
            try:
                with anyio.move_on_after(self.ping_interval):
                    message = await socket.receive()
                if message is None:
                    if socket.bytes_received != before:  # a pong, or part of a message: alive
                        pinged = False
                        continue
                    if pinged:
                        return delivered, FirehoseError(f"{socket.url}: no data for {2 * self.ping_interval:g} seconds (a ping went unanswered)", url=socket.url)
                    await socket.ping()
                    pinged = True
                    continue
            except FirehoseError as exc:
                return delivered, exc
            pinged = False
            delivered = True
            for each in (message, *socket.received()):
                await self._handle(socket, each)

    async def _handle(self, socket: WebSocket, message: bytes | MessageTooLarge) -> None:
        """Decode one message and buffer it (or the problem it is).

        Raises:
            ErrorFrameError: a ``FutureCursor`` error frame.
            _Reconnect: another error frame (the connection is to be dropped).
        """
        self.stats.messages += 1
        if isinstance(message, MessageTooLarge):
            what = "a text message" if message.text else f"a message of {message.size} bytes, over the {self.max_message_bytes}-byte limit"
            error = EventDecodeError(f"{socket.url}: {what}, after seq {self.read_cursor}: dropped")
            await self._put(Problem("malformed", error, self.read_cursor))
            return
        self.stats.bytes += len(message)
        try:
            event = parse_message(message, max_bytes=self.max_message_bytes, raw_commits=self.raw_commits)
        except ErrorFrameError as exc:
            await self._put(Problem("error-frame", exc, self.read_cursor))
            if exc.error == "FutureCursor":
                raise
            raise _Reconnect(FirehoseError(f"{socket.url}: the server sent error frame {exc.error!r}", url=socket.url)) from None
        except EventDecodeError as exc:
            exc.args = (f"{exc} (after seq {self.read_cursor})",)
            await self._put(Problem("malformed", exc, self.read_cursor))
            return
        if event.seq is not None:
            previous = self.read_cursor
            if previous is not None and event.seq <= previous:
                text = f"{socket.url}: seq {event.seq} of a {event.type[:50]} is not above the previous seq {previous}"
                await self._put(Problem("seq-backwards", SeqOrderError(text, url=socket.url, previous=previous, seq=event.seq), previous))
            elif previous is not None and event.seq > previous + 1:
                text = f"{socket.url}: seq jumps from {previous} to {event.seq} ({event.seq - previous - 1} missing)"
                await self._put(Problem("seq-gap", SeqOrderError(text, url=socket.url, previous=previous, seq=event.seq), previous))
            self.read_cursor = event.seq
        await self._put(event)


class _Reconnect(Exception):
    """An error frame other than ``FutureCursor``: drop the connection and reconnect (carries the
    error that ended it)."""

    def __init__(self, error: FirehoseError) -> None:
        super().__init__(str(error))
        self.error = error
