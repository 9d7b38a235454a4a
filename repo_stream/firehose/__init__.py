"""The firehose: a ``com.atproto.sync.subscribeRepos`` client on anyio (asyncio and trio).

::

    from repo_stream.firehose import Firehose, Event, Problem

    async with Firehose("wss://bsky.network", cursor=None) as stream:
        async for item in stream:
            if isinstance(item, Event) and item.type == "#commit":
                ...  # item.seq, item.did, item.body, item.message (the raw bytes)
            elif isinstance(item, Problem):
                ...  # item.kind, item.error: reported, the stream goes on
            # stream.cursor: the seq to persist and resume from

Modules: :mod:`.websocket` (a WebSocket connection: wsproto over an anyio byte stream, TLS,
message size cap), :mod:`.items` (:class:`Event`, :class:`Problem`, decoding one message),
:mod:`.client` (:class:`Firehose`: reconnection with backoff and jitter, seq checks, the
bounded buffer, deadlines), :mod:`.recording` (record and replay raw messages) and :mod:`.keys`
(:class:`KeyCache`: accounts' signing keys from their DID documents, for verification with
:func:`repo_stream.sync.verify_commit`).

Spec: atproto event streams (https://atproto.com/specs/event-stream); lexicon
``com.atproto.sync.subscribeRepos``; RFC 6455.

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.records` (JSON values),
:mod:`repo_stream.sync` (frame decoding), :mod:`repo_stream.net` (DID documents for keys).
"""

from ..errors import ErrorFrameError, FirehoseError, SeqOrderError
from .client import DEFAULT_MAX_BUFFER, DEFAULT_MAX_BUFFER_BYTES, Firehose, FirehoseStats, subscribe_url
from .items import KNOWN_TYPES, Event, Problem, parse_message
from .keys import KeyCache
from .recording import read_messages, write_message

__all__ = [
    "Firehose",
    "FirehoseStats",
    "Event",
    "Problem",
    "KNOWN_TYPES",
    "DEFAULT_MAX_BUFFER",
    "DEFAULT_MAX_BUFFER_BYTES",
    "parse_message",
    "subscribe_url",
    "KeyCache",
    "read_messages",
    "write_message",
    "FirehoseError",
    "ErrorFrameError",
    "SeqOrderError",
]
