"""A verified commit's record events (``repo_stream.sync.service.record_events``, made in C by
the C core's ``record_events``): the events, their JSON lines and the (path, CID) pairs of the
C core equal the reference's on generated commits, and its argument checks."""

from __future__ import annotations

import json
from typing import Any

import pytest

from repo_stream.core import implementation
from repo_stream.core.cid import cid_text
from repo_stream.records.json_text import json_text_processor
from repo_stream.records.values import Link
from repo_stream.sync.events import decode_frame
from repo_stream.sync.follow import _UNSET, RecordEvent
from repo_stream.sync.service import record_events
from repo_stream.sync.verify import VerifiedOp, verify_commit
from tests.firehose_server import make_stream

STREAM = make_stream(accounts=3, commits=60, seed=11)


def verified_commits() -> list[tuple[str, int, Any]]:
    out = []
    for seq, message in STREAM.messages:
        frame = decode_frame(message)
        if frame.type != "#commit" or seq is None:
            continue
        did = frame.body["repo"]
        out.append((did, seq, verify_commit(message, key=STREAM.accounts[did].did_key, prev=None, process=json_text_processor())))
    return out


def test_reference_events_are_the_ops() -> None:
    commits = verified_commits()
    assert sum(len(c.ops) for _, _, c in commits) > 100
    for did, seq, commit in commits:
        deliveries, records = record_events(RecordEvent, _UNSET, did, commit.rev, seq, commit.ops)
        assert [effect for _, effect in deliveries] == [None] * len(commit.ops)
        for (event, _), (path, cid), op in zip(deliveries, records, commit.ops, strict=True):
            assert isinstance(event, RecordEvent)
            assert (event.did, event.rev, event.seq, event.action, f"{event.collection}/{event.rkey}", event.live) == (did, commit.rev, seq, op.action, op.path, True)
            assert path == op.path
            assert event.cid == cid == (None if op.cid is None else cid_text(op.cid.cid_bytes))
            assert event.value == (None if op.value is None else json.loads(op.value))


@pytest.mark.c_only
def test_c_record_events_equal_the_reference() -> None:
    assert implementation.C is not None
    make = implementation.C.record_events
    actions = set()
    for did, seq, commit in verified_commits():
        want = record_events(RecordEvent, _UNSET, did, commit.rev, seq, commit.ops)
        for ops in (commit.ops, list(commit.ops)):
            got = make(RecordEvent, _UNSET, did, commit.rev, seq, ops)
            assert got[1] == want[1]
            assert [e for e, _ in got[0]] == [e for e, _ in want[0]]
            assert [e.to_json_line() for e, _ in got[0]] == [e.to_json_line() for e, _ in want[0]]
            assert all(type(e) is RecordEvent and effect is None for e, effect in got[0])
            assert [e._value for e, _ in got[0]] == [e._value for e, _ in want[0]]  # the marker, or None for a delete
        actions.update(op.action for op in commit.ops)
    assert actions == {"create", "update", "delete"}


@pytest.mark.c_only
def test_c_record_events_odd_paths_and_no_ops() -> None:
    assert implementation.C is not None
    make = implementation.C.record_events
    link = Link(bytes.fromhex("01711220") + bytes(32))
    ops = (VerifiedOp("create", "no-slash", link, None, "{}", b""), VerifiedOp("delete", "a/b/c", None, None, None, None), VerifiedOp("update", "/", link, link, "1", b""))
    assert make(RecordEvent, _UNSET, "did:plc:x", "r", None, ops) == record_events(RecordEvent, _UNSET, "did:plc:x", "r", None, ops)
    got, _ = make(RecordEvent, _UNSET, "did:plc:x", "r", None, ops)
    assert [(e.collection, e.rkey) for e, _ in got] == [("no-slash", ""), ("a", "b/c"), ("", "")]
    assert make(RecordEvent, _UNSET, "did:plc:x", "r", 5, ()) == ([], [])


@pytest.mark.c_only
def test_c_record_events_argument_checks() -> None:
    assert implementation.C is not None
    make = implementation.C.record_events
    op = VerifiedOp("create", "a/b", None, None, None, None)

    class Other:
        __slots__ = ("did",)

    class Sub(RecordEvent):
        __slots__ = ()

    class Bad:
        cid_bytes = "not bytes"

    with pytest.raises(TypeError, match="takes 6 arguments"):
        make(RecordEvent)
    for cls in (Other, Sub, dict):
        with pytest.raises(TypeError, match="has no slot"):
            make(cls, _UNSET, "d", "r", None, (op,))
    with pytest.raises(TypeError, match="must be a class"):
        make(object(), _UNSET, "d", "r", None, (op,))
    with pytest.raises(TypeError, match="ops a tuple or a list"):
        make(RecordEvent, _UNSET, "d", "r", None, iter([op]))
    with pytest.raises(TypeError, match="not a 6-tuple"):
        make(RecordEvent, _UNSET, "d", "r", None, [("create", "a/b")])
    with pytest.raises(TypeError, match="action and path must be str"):
        make(RecordEvent, _UNSET, "d", "r", None, [("create", b"a/b", None, None, None, None)])
    with pytest.raises(TypeError, match="cid_bytes is not bytes"):
        make(RecordEvent, _UNSET, "d", "r", None, [("create", "a/b", Bad(), None, "{}", b"")])
    # still bound to RecordEvent after the refusals
    assert make(RecordEvent, _UNSET, "d", "r", None, [op])[1] == [("a/b", None)]
