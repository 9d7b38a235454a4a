"""A sync record event's JSON line (``RecordEvent.to_json_line``, made in C by the C core's
``record_line`` when its fields need no escaping) against ``json.dumps`` of ``to_json()``, on
both implementations, for every kind of field: escapes, non-ASCII text, seq None or large, CID
None; and the C line against the Python one (``record_line``), which it equals or declines, also
for a seq that is a bool and a live that is not."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from repo_stream.core import implementation
from repo_stream.sync.follow import RecordEvent, record_line

DID = "did:plc:ik2yok4z7izyup26nscbtvnf"
CID = "bafyreib5s3ybobrwjpvjutnyys4yhrhgeupyevfb5l7pgbwac2odmkza3u"
VALUE = {"$type": "app.bsky.feed.like", "subject": {"cid": CID, "uri": f"at://{DID}/app.bsky.feed.post/3jsqygdnr4unw"}, "createdAt": "2023-07-24T23:50:00.358Z"}


def compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def expected(event: RecordEvent) -> str:
    return compact(event.to_json()) + "\n"


def test_usual_line() -> None:
    event = RecordEvent(DID, "3khuwcck6sey4", 123456, "create", "app.bsky.feed.like", "3kq727ccx67vs", CID, live=True, value_text=compact(VALUE))
    assert event.to_json_line() == (
        '{"did":"did:plc:ik2yok4z7izyup26nscbtvnf","rev":"3khuwcck6sey4","seq":123456,"action":"create",'
        '"collection":"app.bsky.feed.like","rkey":"3kq727ccx67vs","cid":"bafyreib5s3ybobrwjpvjutnyys4yhrhgeupyevfb5l7pgbwac2odmkza3u",'
        f'"value":{compact(VALUE)},"live":true}}\n'
    )
    delete = RecordEvent(DID, "3khuwcck6sey4", None, "delete", "app.bsky.feed.like", "3kq727ccx67vs", None)
    assert delete.to_json_line() == (
        '{"did":"did:plc:ik2yok4z7izyup26nscbtvnf","rev":"3khuwcck6sey4","seq":null,"action":"delete",'
        '"collection":"app.bsky.feed.like","rkey":"3kq727ccx67vs","cid":null,"value":null,"live":false}\n'
    )


TEXT = st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from(['"', "\\", "\n", "\x00", "\x1f", "\x7f", "é", "\U0001f600"]), max_size=12)
PLAIN = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12)
JSON = st.recursive(st.none() | st.booleans() | st.integers() | TEXT, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


@settings(max_examples=300)
@given(
    did=PLAIN | TEXT,
    rev=PLAIN | TEXT,
    seq=st.none() | st.integers(-(2**70), 2**70),
    action=st.sampled_from(["create", "update", "delete"]) | TEXT,
    collection=PLAIN | TEXT,
    rkey=PLAIN | TEXT,
    cid=st.none() | PLAIN | TEXT,
    value=st.none() | JSON,
    as_text=st.booleans(),
    live=st.booleans(),
)
def test_line_is_json_dumps_of_to_json(
    did: str, rev: str, seq: int | None, action: Any, collection: str, rkey: str, cid: str | None, value: Any, as_text: bool, live: Any
) -> None:
    if as_text and value is not None:
        event = RecordEvent(did, rev, seq, action, collection, rkey, cid, live=live, value_text=compact(value))
    else:
        event = RecordEvent(did, rev, seq, action, collection, rkey, cid, value, live=live)
    line = event.to_json_line()
    assert line == expected(event)
    assert json.loads(line)["value"] == value


@pytest.mark.c_only
@settings(max_examples=300)
@given(
    fields=st.tuples(PLAIN | TEXT, PLAIN | TEXT, PLAIN | TEXT, PLAIN | TEXT, PLAIN | TEXT),
    seq=st.none() | st.integers(-(2**70), 2**70) | st.booleans(),
    cid=st.none() | PLAIN | TEXT,
    value=TEXT,
    live=st.booleans() | st.sampled_from([0, 1, "", "x"]),
)
def test_c_record_line_is_the_reference_or_declines(fields: tuple[str, str, str, str, str], seq: Any, cid: str | None, value: str, live: Any) -> None:
    """The C line is the reference's byte for byte, or None (declined: the reference then makes
    it) exactly when a string field needs an escape or is not ASCII, seq is not an int of 64 bits
    or None, or live is not a bool."""
    assert implementation.C is not None
    did, rev, action, collection, rkey = fields
    got = implementation.C.record_line(did, rev, seq, action, collection, rkey, cid, value, live)
    plain = all(all(0x20 <= ord(c) < 0x7F and c not in '"\\' for c in s) for s in (*fields, *([] if cid is None else [cid])))
    usual_seq = seq is None or (type(seq) is int and -(2**63) <= seq < 2**63)
    if plain and usual_seq and type(live) is bool:
        assert got == record_line(did, rev, seq, action, collection, rkey, cid, value, live)
    else:
        assert got is None


@pytest.mark.c_only
def test_c_record_line_argument_count() -> None:
    assert implementation.C is not None
    with pytest.raises(TypeError, match="takes 9 arguments"):
        implementation.C.record_line(DID)
