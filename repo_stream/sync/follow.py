"""Following the firehose for tracked repos: verified ``#commit`` events turned into
:class:`RecordEvent` items, in order per repo, with the state in a :class:`~.state.StateStore`.

This is the "follow" half of the sync service (the backfill half, buffering events of repos
still backfilling, and refetching desynchronized repos are not here yet). For each item of a
:class:`~repo_stream.firehose.Firehose`:

- ``#commit`` of a tracked ``active`` repo: :func:`~.verify.verify_commit` with the account's
  key (:class:`~repo_stream.firehose.KeyCache`) and ``prev`` = the stored rev and data. Valid:
  one :class:`RecordEvent` per op (``live=True``), then the stored rev, data and cursor are
  updated. :class:`~repo_stream.errors.OutOfSyncError` (a gap, or a repo changed behind our
  back): status ``desynchronized`` and a :class:`RepoEvent` ``"desynchronized"`` (the repo must
  be refetched; its commits are skipped until then). Any
  :class:`~repo_stream.errors.CommitVerifyError` (broken or forged): the commit is dropped and a
  :class:`RepoEvent` ``"error"`` reported. Stale commits (rev not above the stored one, e.g.
  replayed after a reconnect) are dropped silently.
- ``#sync``: verified (:func:`~.verify.verify_sync`); a data root other than the stored one makes
  the repo ``desynchronized``.
- ``#identity``: the cached key is dropped; a :class:`RepoEvent` ``"identity"``.
- ``#account``: ``active: false`` stores the given status (``takendown``, ``suspended``,
  ``deleted``, ``deactivated``) and stops the repo's record events; ``active: true`` makes it
  ``active`` again. A :class:`RepoEvent` ``"account"``.
- Untracked repos, unknown kinds and problems of the stream are skipped.
- ``collections``: only records of these collections are emitted (NSIDs, or prefixes ending in
  ``.*`` such as ``app.bsky.feed.*``); every commit is still verified and applied to the state.

Delivery: at least once. The state and the cursor of an event are written, and committed to
the SQLite file, when the consumer asks for the item after that event's last one: after a crash
the stream resumes from the committed cursor and re-delivers at most the events not taken.

Spec: atproto sync, "Commit Validation", "Repository Synchronization".
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..core.implementation import backend as _backend
from ..errors import CommitVerifyError, IdentityError, OutOfSyncError
from ..firehose import Event, Firehose, KeyCache
from ..records.values import JsonValue
from .state import StateStore
from .verify import RepoState, verify_commit, verify_sync

__all__ = ["RecordEvent", "RepoEvent", "collection_filter", "follow"]


def collection_filter(collections: Iterable[str] | None) -> Callable[[str], bool]:
    """A predicate on collection NSIDs: exact NSIDs, and prefixes written ``app.bsky.feed.*``
    (every NSID under ``app.bsky.feed.``); None or nothing given: every collection.

    Raises:
        ValueError: a pattern with ``*`` anywhere but a final ``.*``.
    """
    names = list(collections or ())
    if not names:
        return lambda collection: True
    exact = frozenset(n for n in names if not n.endswith(".*"))
    prefixes = tuple(n[:-1] for n in names if n.endswith(".*"))
    for name in names:
        if "*" in name[:-2] or (name.endswith("*") and not name.endswith(".*")):
            raise ValueError(f"collection pattern {name!r}: a * may only end it, as in app.bsky.feed.*")
    return lambda collection: collection in exact or collection.startswith(prefixes)


_UNSET: Any = object()
_text: Callable[[str], str] = json.encoder.encode_basestring
_compact: Callable[[object], str] = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class RecordEvent:
    """A record created, updated or deleted.

    Attributes:
        did: the account. rev: the commit's rev. seq: the firehose seq (None for backfilled
        records). action: ``"create"``, ``"update"`` or ``"delete"``. collection and rkey: the
        record's key. cid: the record's base32 CID (None for a delete). value: the record in the
        atproto JSON form (None for a delete). live: True when it came from the firehose.
        value_text: the record's JSON text when the event was made from it (the sync service
        makes its events so: ``value`` is then parsed from it when first read), else None.

    Made with ``RecordEvent(did, rev, seq, action, collection, rkey, cid, value, live)``, or
    with ``value_text=`` (the JSON text of :func:`repo_stream.records.json_text.transcode_json`)
    instead of ``value``. Events are equal when their attributes are. Read-only by convention.
    """

    __slots__ = ("did", "rev", "seq", "action", "collection", "rkey", "cid", "live", "_value", "value_text")
    __match_args__ = ("did", "rev", "seq", "action", "collection", "rkey", "cid", "value", "live")

    did: str
    rev: str
    seq: int | None
    action: Literal["create", "update", "delete"]
    collection: str
    rkey: str
    cid: str | None
    live: bool
    value_text: str | None

    def __init__(
        self,
        did: str,
        rev: str,
        seq: int | None,
        action: Literal["create", "update", "delete"],
        collection: str,
        rkey: str,
        cid: str | None,
        value: JsonValue | None = _UNSET,
        live: bool = False,
        *,
        value_text: str | None = None,
    ) -> None:
        self.did = did
        self.rev = rev
        self.seq = seq
        self.action = action
        self.collection = collection
        self.rkey = rkey
        self.cid = cid
        self.live = live
        self._value = None if value is _UNSET and value_text is None else value
        self.value_text = value_text

    @property
    def value(self) -> JsonValue | None:
        """The record in the atproto JSON form (None for a delete)."""
        if self._value is _UNSET:
            self._value = None if self.value_text is None else json.loads(self.value_text)
        return self._value

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RecordEvent):
            return NotImplemented
        return (self.did, self.rev, self.seq, self.action, self.collection, self.rkey, self.cid, self.live, self.value) == (
            other.did, other.rev, other.seq, other.action, other.collection, other.rkey, other.cid, other.live, other.value,
        )  # fmt: skip

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"RecordEvent(did={self.did!r}, rev={self.rev!r}, seq={self.seq!r}, action={self.action!r}, collection={self.collection!r}, "
            f"rkey={self.rkey!r}, cid={self.cid!r}, value={self.value!r}, live={self.live!r})"
        )

    def to_json(self) -> dict[str, Any]:
        """``{"did", "rev", "seq", "action", "collection", "rkey", "cid", "value", "live"}``."""
        return {
            "did": self.did, "rev": self.rev, "seq": self.seq, "action": self.action, "collection": self.collection,
            "rkey": self.rkey, "cid": self.cid, "value": self.value, "live": self.live,
        }  # fmt: skip

    def to_json_line(self) -> str:
        """:meth:`to_json` as one line of compact JSON text and a newline: equal to
        ``json.dumps(event.to_json(), ensure_ascii=False, separators=(",", ":")) + "\\n"``, made
        from ``value_text`` when the event has it (no Python object per value); in C when the C
        core is in use and the fields need no escaping (:func:`record_line` otherwise)."""
        text = self.value_text
        if text is None:
            value = self._value
            text = "null" if value is None else _compact(value) if value is not _UNSET else "null"
        fast = _backend().record_line
        if fast is not None:
            line: str | None = fast(self.did, self.rev, self.seq, self.action, self.collection, self.rkey, self.cid, text, self.live)
            if line is not None:
                return line
        return record_line(self.did, self.rev, self.seq, self.action, self.collection, self.rkey, self.cid, text, self.live)


def record_line(did: str, rev: str, seq: int | None, action: str, collection: str, rkey: str, cid: str | None, value_text: str, live: bool) -> str:
    """A record event's JSON line (:meth:`RecordEvent.to_json_line`), ``value_text`` its value's
    JSON text: the reference the C core's ``record_line`` gives byte for byte."""
    return (
        f'{{"did":{_text(did)},"rev":{_text(rev)},"seq":{"null" if seq is None else int(seq)},'
        f'"action":{_text(action)},"collection":{_text(collection)},"rkey":{_text(rkey)},'
        f'"cid":{"null" if cid is None else _text(cid)},"value":{value_text},"live":{"true" if live else "false"}}}\n'
    )


@dataclass(frozen=True, slots=True)
class RepoEvent:
    """Something that happened to a repo: ``event`` is ``"identity"``, ``"account"``,
    ``"desynchronized"``, ``"resync"`` (from the sync service: ``phase`` ``"started"`` or
    ``"finished"``) or ``"error"``; ``detail`` holds its details (``status``, ``active``,
    ``handle``, ``error``, ``reason``...), ``seq`` the firehose seq (None when not from one)."""

    did: str
    event: Literal["identity", "account", "desynchronized", "resync", "error"]
    seq: int | None
    detail: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """``{"did", "event", "seq", ...detail}``."""
        return {"did": self.did, "event": self.event, "seq": self.seq, **self.detail}

    def to_json_line(self) -> str:
        """:meth:`to_json` as one line of compact JSON text and a newline."""
        return _compact(self.to_json()) + "\n"


async def follow(
    stream: Firehose, state: StateStore, keys: KeyCache, *, collections: Iterable[str] | None = None
) -> AsyncIterator[RecordEvent | RepoEvent]:
    """The record and repo events of the tracked repos in ``state``, from ``stream`` (module
    docstring: what each kind does, and when the state is committed); records only of
    ``collections`` (see :func:`collection_filter`) when given.

    Raises:
        DiskError: the state file cannot be written.
        ErrorFrameError, FirehoseError: from the stream (it ended).
    """
    wanted = collection_filter(collections)
    async for item in stream:
        if not isinstance(item, Event) or item.did is None or item.seq is None:
            continue
        row = state.get(item.did)
        if row is None:
            continue
        if item.type == "#identity":
            keys.forget(item.did)
            handle = item.body.get("handle")
            yield RepoEvent(item.did, "identity", item.seq, {"handle": handle if isinstance(handle, str) else None})
        elif item.type == "#account":
            active = item.body.get("active") is True
            status = item.body.get("status")
            new = "active" if active else (status if status in ("takendown", "suspended", "deleted", "deactivated") else "deactivated")
            if row.status in ("active", "takendown", "suspended", "deleted", "deactivated"):
                state.set(item.did, str(new))
            yield RepoEvent(item.did, "account", item.seq, {"active": active, "status": status if isinstance(status, str) else None})
        elif item.type in ("#commit", "#sync") and row.status == "active" and row.rev is not None and row.data is not None:
            try:
                key = await keys.key(item.did)
            except IdentityError as exc:
                yield RepoEvent(item.did, "error", item.seq, {"error": f"IdentityError: {exc}"})
                continue
            if item.type == "#sync":
                try:
                    synced = verify_sync(item.message, key=key)
                except CommitVerifyError as exc:
                    yield RepoEvent(item.did, "error", item.seq, {"error": f"{type(exc).__name__}: {exc}"})
                    continue
                if str(synced.data) != row.data:
                    state.set(item.did, "desynchronized")
                    yield RepoEvent(item.did, "desynchronized", item.seq, {"reason": f"#sync to rev {synced.rev} with another data root"})
                continue
            rev = item.body.get("rev")
            if isinstance(rev, str) and rev <= row.rev:
                continue  # stale: already applied
            try:
                commit = verify_commit(item.message, key=key, prev=RepoState(row.rev, row.data))
            except OutOfSyncError as exc:
                state.set(item.did, "desynchronized")
                yield RepoEvent(item.did, "desynchronized", item.seq, {"reason": str(exc)})
                continue
            except CommitVerifyError as exc:
                yield RepoEvent(item.did, "error", item.seq, {"error": f"{type(exc).__name__}: {exc}"})
                continue
            for op in commit.ops:
                if not wanted(op.collection):
                    continue
                action: Literal["create", "update", "delete"] = "create" if op.action == "create" else "update" if op.action == "update" else "delete"
                yield RecordEvent(
                    commit.did, commit.rev, item.seq, action, op.collection, op.rkey,
                    None if op.cid is None else str(op.cid), op.value, True,
                )  # fmt: skip
            # Here the consumer has asked for the item after the commit's last one: it took them.
            state.set(commit.did, "active", commit.rev, str(commit.data))
            state.set_cursor(item.seq)
            state.commit()
