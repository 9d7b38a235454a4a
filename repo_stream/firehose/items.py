"""What the firehose client yields: :class:`Event` (one decoded message) and :class:`Problem`
(something reported about the stream: a malformed message, an error frame, a seq out of order,
a lost connection).

Spec: lexicon ``com.atproto.sync.subscribeRepos``: ``#commit`` ``{seq, repo, rev, ...}``,
``#sync`` ``{seq, did, ...}``, ``#identity`` ``{seq, did, time, handle?}``, ``#account``
``{seq, did, time, active, status?}``, ``#info`` ``{name, message?}`` (no seq; e.g.
``OutdatedCursor``). Other kinds are delivered with ``known=False``: a new kind of the lexicon
is reported, not fatal.

With ``raw_commits`` (:class:`~repo_stream.firehose.Firehose`'s option, which
:class:`~repo_stream.sync.Sync` turns on), the usual ``#commit`` message is not decoded: with the
C core, one pass over its body (``_native.commit_peek``) gives what the client and the service need
before verifying it (seq, repo, rev, time, the ops' actions and paths), as a :class:`RawCommit`;
:func:`~repo_stream.sync.verify_commit` then reads the message bytes itself. Any other message
(and every one without the C core) is decoded as usual, so what is accepted and what is reported
do not change: ``commit_peek`` accepts only messages :func:`~repo_stream.sync.events.decode_frame`
accepts, giving the same values (tested, and fuzzed against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from ..core import implementation
from ..errors import EventDecodeError, RepoStreamError
from ..records.values import to_json_value
from ..sync.events import decode_frame

try:
    from .. import _native
except ImportError:  # pragma: no cover - the pure-Python install
    _native = None  # type: ignore[assignment]

__all__ = ["KNOWN_TYPES", "Event", "Problem", "ProblemKind", "RawCommit", "parse_message"]

#: The event kinds of the lexicon, as header ``t`` values.
KNOWN_TYPES: Final = frozenset({"#commit", "#sync", "#identity", "#account", "#info"})

ProblemKind = Literal["malformed", "error-frame", "seq-backwards", "seq-gap", "disconnected"]


@dataclass(frozen=True, slots=True)
class Event:
    """One subscribeRepos message, decoded.

    Attributes:
        type: the header's ``t``: ``"#commit"``, ``"#sync"``, ``"#identity"``, ``"#account"``,
            ``"#info"``, or another (then ``known`` is False).
        seq: the body's ``seq`` (an int), or None (``#info`` has none).
        did: ``repo`` of a ``#commit``, ``did`` of the others, or None.
        time: the body's ``time`` (RFC 3339 text), or None.
        body: the body map as decoded (links as :class:`~repo_stream.records.values.Link`,
            ``blocks`` as bytes).
        message: the message bytes as received (for :func:`~repo_stream.sync.verify_commit`
            or a recording).
        known: True for the kinds of the lexicon.
    """

    type: str
    seq: int | None
    did: str | None
    time: str | None
    body: dict[str, object]
    message: bytes
    known: bool

    def to_json(self) -> dict[str, object]:
        """The event as JSON-ready values: ``{"type", "seq", "did", "time", "known", "body"}``,
        the body in the atproto JSON form (links as ``{"$link"}``, bytes as ``{"$bytes"}``;
        ``blocks`` shown by size only, as ``{"$bytes_len": N}``)."""
        body = {key: ({"$bytes_len": len(value)} if key == "blocks" and isinstance(value, bytes) else value) for key, value in self.body.items()}
        return {"type": self.type, "seq": self.seq, "did": self.did, "time": self.time, "known": self.known, "body": to_json_value(body)}


@dataclass(frozen=True, slots=True)
class RawCommit(Event):
    """A ``#commit`` message whose body was not decoded (``Firehose(raw_commits=True)``, module
    docstring): ``type`` is ``"#commit"``, ``seq``, ``did`` (``repo``) and ``time`` as for an
    :class:`Event`, ``body`` is empty (:func:`parse_message` without ``raw_commits`` decodes
    ``message``); pass ``message`` to :func:`~repo_stream.sync.verify_commit`.

    Attributes:
        rev: the body's ``rev``.
        ops: the ops' ``(action, path)``, in order (``action`` one of ``"create"``, ``"update"``,
            ``"delete"``).
    """

    rev: str
    ops: list[tuple[str, str]]


_RAW_SLOTS: Final = tuple(getattr(RawCommit, name).__set__ for name in (*Event.__slots__, *RawCommit.__slots__))


def _raw_commit(seq: int, did: str, time: str | None, message: bytes, rev: str, ops: list[tuple[str, str]]) -> RawCommit:
    """``RawCommit("#commit", seq, did, time, {}, message, True, rev, ops)`` with its slots set
    directly: the same object, without the frozen dataclass's ``__init__`` (one
    ``object.__setattr__`` call per field: ~1.6 us a message, this ~0.8 us)."""
    item: RawCommit = object.__new__(RawCommit)
    s_type, s_seq, s_did, s_time, s_body, s_message, s_known, s_rev, s_ops = _RAW_SLOTS
    s_type(item, "#commit")
    s_seq(item, seq)
    s_did(item, did)
    s_time(item, time)
    s_body(item, {})
    s_message(item, message)
    s_known(item, True)
    s_rev(item, rev)
    s_ops(item, ops)
    return item


#: The most ops of a #commit read by ``commit_peek`` (more: decoded as usual).
_PEEK_MAX_OPS: Final = 200


@dataclass(frozen=True, slots=True)
class Problem:
    """Something reported about the stream; the stream goes on after it (except where the
    client's docs say it stops).

    Attributes:
        kind: ``"malformed"`` (a message that is not a well-formed frame, or over the size cap:
            ``error`` is an :class:`~repo_stream.errors.EventDecodeError`), ``"error-frame"``
            (``op: -1``: :class:`~repo_stream.errors.ErrorFrameError`, the server then closes),
            ``"seq-backwards"`` / ``"seq-gap"`` (:class:`~repo_stream.errors.SeqOrderError`),
            ``"disconnected"`` (:class:`~repo_stream.errors.FirehoseError`: the connection was
            lost or could not be made; the client reconnects after ``retry_in`` seconds).
        error: the error, whose message says what and where (URL, seq).
        seq: the last seq delivered before it, or None.
        retry_in: for ``"disconnected"``: the backoff before the next attempt, seconds.
    """

    kind: ProblemKind
    error: RepoStreamError
    seq: int | None = None
    retry_in: float | None = None

    def to_json(self) -> dict[str, object]:
        """``{"problem": kind, "error": "<class>: <message>", "seq", "retryIn"}``."""
        return {"problem": self.kind, "error": f"{type(self.error).__name__}: {self.error}", "seq": self.seq, "retryIn": self.retry_in}


def parse_message(message: bytes, *, max_bytes: int, raw_commits: bool = False) -> Event:
    """Decode one message (:func:`repo_stream.sync.events.decode_frame`) into an :class:`Event`;
    with ``raw_commits`` and the C core, the usual ``#commit`` message into a :class:`RawCommit`
    without decoding its body (module docstring), any other as without.

    Raises:
        ErrorFrameError: an error frame.
        EventDecodeError: not a well-formed frame; a known kind whose ``seq`` is not an int,
            or whose ``repo``/``did`` is not text.
    """
    if raw_commits and _native is not None and type(message) is bytes and len(message) <= max_bytes and implementation.backend().name == "c":
        peeked = _native.commit_peek(message, _PEEK_MAX_OPS)
        if peeked is not None:
            return _raw_commit(peeked[0], peeked[1], peeked[3], message, peeked[2], peeked[4])
    frame = decode_frame(message, max_bytes=max_bytes)
    body = frame.body
    kind = frame.type
    known = kind in KNOWN_TYPES
    seq = body.get("seq")
    if seq is not None and (type(seq) is not int or seq < 0):
        raise EventDecodeError(f"subscribeRepos {kind[:50]} message: seq {str(seq)[:40]!r} is not a non-negative integer")
    if known and kind != "#info" and seq is None:
        raise EventDecodeError(f"subscribeRepos {kind} message without a seq")
    did = body.get("repo" if kind == "#commit" else "did")
    if known and kind != "#info" and type(did) is not str:
        raise EventDecodeError(f"subscribeRepos {kind} message at seq {seq}: {'repo' if kind == '#commit' else 'did'} is not text")
    when = body.get("time")
    return Event(
        type=kind,
        seq=seq,
        did=did if type(did) is str else None,
        time=when if type(when) is str else None,
        body=body,
        message=bytes(message),
        known=known,
    )

