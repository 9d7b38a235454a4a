"""The firehose client (repo_stream.firehose) and ``repo-stream firehose`` against a real local
WebSocket server (tests/firehose_server.py) replaying generated streams, with faults: a dropped
connection, malformed and oversized messages, error frames, seq gaps, a slow consumer. Every
async test runs on asyncio and on trio."""

from __future__ import annotations

import io
import json
from pathlib import Path

import anyio
import cbrrr
import pytest
from cbrrr import _cbrrr

from repo_stream.cli import main
from repo_stream.errors import ErrorFrameError, EventDecodeError, FirehoseError, SeqOrderError
from repo_stream.firehose import Event, Firehose, Problem, read_messages, subscribe_url, write_message
from repo_stream.sync import RepoState, verify_commit, verify_sync
from tests.firehose_server import FirehoseServer, Plan, Stream, encode_message, error_frame, make_stream
from tests.servers import LocalHTTPServer, json_reply

pytestmark = pytest.mark.once  # no CAR walking: the implementation does not matter

STREAM = make_stream(accounts=4, commits=160)


def expected(stream: Stream, after: int | None = None) -> list[tuple[int | None, bytes]]:
    if after is None:
        return stream.messages
    start = next(i for i, (seq, _) in enumerate(stream.messages) if seq is not None and seq > after)
    return stream.messages[start:]


async def take(client: Firehose, events: int) -> tuple[list[Event], list[Problem]]:
    got: list[Event] = []
    problems: list[Problem] = []
    async for item in client:
        if isinstance(item, Event):
            got.append(item)
            if len(got) == events:
                break
        else:
            problems.append(item)
    return got, problems


def test_the_generated_stream_has_every_kind() -> None:
    kinds = [m[:30] for _, m in STREAM.messages]
    for kind in (b"#commit", b"#sync", b"#identity", b"#account", b"#info"):
        assert any(kind in k for k in kinds), kind
    seqs = [seq for seq, _ in STREAM.messages if seq is not None]
    assert seqs == list(range(1, len(seqs) + 1))


@pytest.mark.anyio
async def test_every_event_arrives_in_order_and_every_commit_verifies() -> None:
    with FirehoseServer(STREAM.messages) as server, anyio.fail_after(30):
        async with Firehose(server.url, max_reconnects=0) as client:
            got, problems = await take(client, len(STREAM.messages))
        assert problems == []
        assert [(e.seq, e.message) for e in got] == STREAM.messages
        assert client.cursor == STREAM.messages[-1][0]
    by_type = {e.type for e in got}
    assert by_type == {"#commit", "#sync", "#identity", "#account", "#info"}
    info = next(e for e in got if e.type == "#info")
    assert info.seq is None and info.body["name"] == "OutdatedCursor"
    state: dict[str, RepoState] = {}
    commits = 0
    for event in got:
        assert event.known
        if event.type == "#commit":
            assert event.did is not None
            key = STREAM.accounts[event.did].did_key
            result = verify_commit(event.message, key=key, prev=state.get(event.did))
            state[event.did] = RepoState(result.rev, result.data)
            commits += 1
        elif event.type == "#sync":
            assert event.did is not None
            verify_sync(event.message, key=STREAM.accounts[event.did].did_key)
    assert commits == 160
    for did, account in STREAM.accounts.items():  # the last verified state is each repo's
        assert state[did].rev == account.generator.rev and bytes(state[did].data) == account.generator.root


@pytest.mark.anyio
async def test_a_dropped_connection_resumes_from_the_cursor_and_delivers_every_event_once() -> None:
    plans = [Plan(drop_after=50), Plan(drop_after=70), Plan()]
    with FirehoseServer(STREAM.messages, plans) as server, anyio.fail_after(30):
        async with Firehose(server.url, backoff_base=0.01, backoff_cap=0.05, max_reconnects=5) as client:
            got, problems = await take(client, len(STREAM.messages))
        assert [(e.seq, e.message) for e in got] == STREAM.messages
        assert [p.kind for p in problems] == ["disconnected", "disconnected"]
        assert all(isinstance(p.error, FirehoseError) and p.retry_in is not None and 0 < p.retry_in <= 0.05 for p in problems)
        seq_50 = [seq for seq, _ in STREAM.messages[:50] if seq is not None][-1]
        seq_120 = [seq for seq, _ in expected(STREAM, seq_50)[:70] if seq is not None][-1]
        assert server.cursors == [None, seq_50, seq_120]
        assert client.stats.connections == 3


@pytest.mark.anyio
async def test_a_cursor_starts_after_it() -> None:
    with FirehoseServer(STREAM.messages) as server, anyio.fail_after(30):
        async with Firehose(server.url + "/", cursor=100, max_reconnects=0) as client:
            rest = expected(STREAM, 100)
            got, problems = await take(client, len(rest))
        assert server.cursors == [100]
        assert [(e.seq, e.message) for e in got] == rest and problems == []


@pytest.mark.anyio
async def test_malformed_and_oversized_messages_are_reported_and_the_stream_goes_on() -> None:
    big = encode_message("#commit", {"seq": 0, "blob": b"x" * 200_000})
    garbage = b"\xa2bop\x01at\xff"
    truncated = STREAM.messages[3][1][:-5]
    plans = [Plan(insert={5: [garbage], 9: [big], 12: [truncated], 20: [encode_message("#commit", {"seq": "7"})]})]
    with FirehoseServer(STREAM.messages, plans) as server, anyio.fail_after(30):
        async with Firehose(server.url, max_message_bytes=100_000, max_reconnects=0) as client:
            got, problems = await take(client, len(STREAM.messages))
    assert [(e.seq, e.message) for e in got] == STREAM.messages
    assert [p.kind for p in problems] == ["malformed"] * 4
    assert all(type(p.error) is EventDecodeError for p in problems)
    assert "200" in str(problems[1].error) and "over the 100000-byte limit" in str(problems[1].error)
    assert "seq '7' is not a non-negative integer" in str(problems[3].error)
    assert [p.seq for p in problems] == [STREAM.messages[4][0], STREAM.messages[8][0], STREAM.messages[11][0], STREAM.messages[19][0]]


@pytest.mark.anyio
async def test_raw_commits_give_the_same_items_with_the_commits_undecoded() -> None:
    """raw_commits (what Sync turns on): the same events and problems, in order, as decoding
    every message; with the C core the usual #commit is a RawCommit (rev and ops as decoded, body
    empty), everything else (a commit that is not canonical, malformed messages, seq disorder)
    as without."""
    from repo_stream.core import implementation
    from repo_stream.firehose.items import RawCommit

    first = STREAM.messages[0][1]
    unusual = encode_message("#commit", {"seq": 3, "repo": "did:plc:x", "rev": "3kaaaaaaaaaaa", "ops": [], "zzz": 1})
    garbage = b"\xa2bop\x01at\xff"
    runs = []
    for raw in (False, True):
        plans = [Plan(insert={5: [garbage], 9: [unusual], 12: [first[:-5]], 20: [encode_message("#commit", {"seq": "7"})]})]
        with FirehoseServer(STREAM.messages, plans) as server, anyio.fail_after(30):
            async with Firehose(server.url, max_reconnects=0, raw_commits=raw) as client:
                got, problems = await take(client, len(STREAM.messages) + 1)
        runs.append((got, [(p.kind, type(p.error), str(p.error).replace(server.url, "URL"), p.seq) for p in problems]))
    (decoded, problems), (raw_got, raw_problems) = runs
    assert [(e.type, e.seq, e.did, e.time, e.message, e.known) for e in raw_got] == [(e.type, e.seq, e.did, e.time, e.message, e.known) for e in decoded]
    assert raw_problems == problems
    assert [p[0] for p in problems] == ["malformed", "seq-backwards", "seq-gap", "malformed", "malformed"]
    raws = [(r, e) for r, e in zip(raw_got, decoded, strict=True) if type(r) is RawCommit]
    assert all(type(e) is not RawCommit for e in decoded)
    if implementation.backend().name == "c":
        assert len(raws) == 160  # every generated commit; not the unusual one
        for r, e in raws:
            assert r.body == {} and r.rev == e.body["rev"]
            assert r.ops == [(op["action"], op["path"]) for op in e.body["ops"]]  # type: ignore[attr-defined]
    else:
        assert raws == []


@pytest.mark.anyio
async def test_an_unknown_kind_is_delivered_as_not_known() -> None:
    messages = [(1, STREAM.messages[0][1]), (2, encode_message("#labels", {"seq": 2, "labels": []})), (3, encode_message("#identity", {"seq": 3, "did": "did:plc:x", "time": "t"}))]
    with FirehoseServer(messages) as server, anyio.fail_after(30):
        async with Firehose(server.url, max_reconnects=0) as client:
            got, problems = await take(client, 3)
    assert [(e.type, e.known, e.seq) for e in got] == [("#commit", True, STREAM.messages[0][0]), ("#labels", False, 2), ("#identity", True, 3)]
    assert problems == []


@pytest.mark.anyio
async def test_a_future_cursor_error_frame_ends_the_stream() -> None:
    plans = [Plan(end_with=[error_frame("FutureCursor", "Cursor in the future.")])]
    with FirehoseServer(STREAM.messages[:10], plans) as server, anyio.fail_after(30):
        got: list[Event] = []
        problems: list[Problem] = []
        with pytest.raises(ErrorFrameError) as info:
            async with Firehose(server.url, max_reconnects=3, backoff_base=0.01) as client:
                async for item in client:
                    (got if isinstance(item, Event) else problems).append(item)  # type: ignore[arg-type]
    assert info.value.error == "FutureCursor" and info.value.text == "Cursor in the future."
    assert len(got) == 10 and [p.kind for p in problems] == ["error-frame"]
    assert server.cursors == [None]  # not retried


@pytest.mark.anyio
async def test_a_consumer_too_slow_error_frame_reconnects_from_the_cursor() -> None:
    plans = [Plan(insert={30: [error_frame("ConsumerTooSlow")]}, drop_after=30), Plan()]
    with FirehoseServer(STREAM.messages, plans) as server, anyio.fail_after(30):
        async with Firehose(server.url, backoff_base=0.01, max_reconnects=2) as client:
            got, problems = await take(client, len(STREAM.messages))
    assert [(e.seq, e.message) for e in got] == STREAM.messages
    assert [p.kind for p in problems] == ["error-frame", "disconnected"]
    assert isinstance(problems[0].error, ErrorFrameError) and problems[0].error.error == "ConsumerTooSlow"
    assert server.cursors == [None, [seq for seq, _ in STREAM.messages[:30] if seq is not None][-1]]


@pytest.mark.anyio
async def test_seq_going_backwards_or_jumping_is_reported() -> None:
    def ident(seq: int) -> tuple[int, bytes]:
        return seq, encode_message("#identity", {"seq": seq, "did": "did:plc:x", "time": "t"})

    messages = [ident(1), ident(2), ident(5), ident(4), ident(6)]
    with FirehoseServer(messages) as server, anyio.fail_after(30):
        async with Firehose(server.url, max_reconnects=0) as client:
            got, problems = await take(client, 5)
    assert [e.seq for e in got] == [1, 2, 5, 4, 6]
    assert [p.kind for p in problems] == ["seq-gap", "seq-backwards", "seq-gap"]
    assert all(isinstance(p.error, SeqOrderError) for p in problems)
    assert [(p.error.previous, p.error.seq) for p in problems] == [(2, 5), (5, 4), (4, 6)]  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_a_slow_consumer_gets_backpressure_within_the_buffer_bound() -> None:
    with FirehoseServer(STREAM.messages) as server, anyio.fail_after(60):
        async with Firehose(server.url, max_buffer=4, max_reconnects=0) as client:
            taken = 0
            ahead = 0
            async for item in client:
                assert isinstance(item, Event)
                taken += 1
                ahead = max(ahead, client.stats.events - taken)
                assert client.buffered <= 4
                if taken < 60:
                    await anyio.sleep(0.002)  # slow: the reader fills the buffer and waits
                if taken == len(STREAM.messages):
                    break
        assert client.stats.max_buffered == 4  # the buffer filled up: the reader waited
        assert ahead <= 4  # never more than max_buffer events read ahead of the consumer
        assert taken == len(STREAM.messages)


@pytest.mark.anyio
async def test_batches_gather_what_the_reader_decodes_within_the_wait() -> None:
    # The whole stream is there at once (loopback): with gather, the lists are full ones of
    # max_items (not one read's worth each) but the last, with every event once, in order; the
    # places are freed as they are gathered (the reader goes on past max_buffer); a dropped
    # connection's problem comes in its place in a list.
    plans = [Plan(drop_after=150), Plan()]
    with FirehoseServer(STREAM.messages, plans) as server, anyio.fail_after(60):
        async with Firehose(server.url, max_buffer=16, backoff_base=0.01, backoff_cap=0.05, max_reconnects=5) as client:
            lists: list[list[Event | Problem]] = []
            events = 0
            async for batch in client.batches(64, gather=0.5):
                lists.append(batch)
                events += sum(isinstance(item, Event) for item in batch)
                if events == len(STREAM.messages):
                    break
    items = [item for batch in lists for item in batch]
    assert [(e.seq, e.message) for e in items if isinstance(e, Event)] == STREAM.messages
    assert [p.kind for p in items if isinstance(p, Problem)] == ["disconnected"]
    assert all(len(batch) <= 64 for batch in lists)
    assert sum(len(batch) == 64 for batch in lists) >= len(items) // 64 - 1  # full lists, over max_buffer (16)
    assert client.cursor == STREAM.messages[-1][0]


@pytest.mark.anyio
async def test_the_buffer_holds_at_most_max_buffer_bytes() -> None:
    sizes = [len(m) for _, m in STREAM.messages]
    budget = 3 * max(sizes)
    with FirehoseServer(STREAM.messages) as server, anyio.fail_after(60):
        async with Firehose(server.url, max_buffer=1000, max_buffer_bytes=budget, max_reconnects=0) as client:
            taken = 0
            async for item in client:
                assert isinstance(item, Event)
                taken += 1
                if taken < 80:
                    await anyio.sleep(0.002)
                if taken == len(STREAM.messages):
                    break
    assert budget - max(sizes) < client.stats.max_buffered_bytes <= budget  # filled, never past the budget
    assert client.stats.max_buffered < 1000  # the byte budget, not the item count, held the reader


@pytest.mark.anyio
async def test_connection_failures_back_off_then_give_up() -> None:
    with FirehoseServer([]) as server:
        port = server.port
    with anyio.fail_after(30):
        problems: list[Problem] = []
        with pytest.raises(FirehoseError, match=f"127.0.0.1:{port}"):
            async with Firehose(f"ws://127.0.0.1:{port}", max_reconnects=3, backoff_base=0.01, backoff_cap=0.02) as client:
                async for item in client:
                    assert isinstance(item, Problem)
                    problems.append(item)
        assert [p.kind for p in problems] == ["disconnected"] * 3
        assert all(p.retry_in is not None and 0.005 <= p.retry_in <= 0.02 for p in problems)


@pytest.mark.anyio
async def test_a_refused_upgrade_names_the_status() -> None:
    with LocalHTTPServer() as http, anyio.fail_after(10):
        with pytest.raises(FirehoseError) as info:
            async with Firehose(http.base.replace("http", "ws"), max_reconnects=0) as client:
                async for _ in client:
                    pass
    assert info.value.status == 404 and "HTTP 404" in str(info.value)


def test_subscribe_url() -> None:
    assert subscribe_url("wss://bsky.network", None) == "wss://bsky.network/xrpc/com.atproto.sync.subscribeRepos"
    assert subscribe_url("ws://h:5/xrpc/com.atproto.sync.subscribeRepos?cursor=3&x=1", 9) == "ws://h:5/xrpc/com.atproto.sync.subscribeRepos?x=1&cursor=9"


def test_recordings_round_trip_and_refuse_truncation() -> None:
    out = io.BytesIO()
    for _, message in STREAM.messages[:5]:
        write_message(out, message)
    assert list(read_messages(io.BytesIO(out.getvalue()))) == [m for _, m in STREAM.messages[:5]]
    with pytest.raises(EventDecodeError, match="ends inside the"):
        list(read_messages(io.BytesIO(out.getvalue()[:-1])))
    with pytest.raises(EventDecodeError, match="over the 10-byte limit"):
        list(read_messages(io.BytesIO(out.getvalue()), max_bytes=10))


def did_document(did: str, key: str) -> dict[str, object]:
    multibase = key.removeprefix("did:key:")
    return {"id": did, "alsoKnownAs": [], "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": multibase}]}


def test_cli_prints_records_verifies_and_replays(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recording = tmp_path / "stream.bin"
    n = len(STREAM.messages)
    messages = [(STREAM.messages[0][0], forge(STREAM.messages[0][1])), *STREAM.messages[1:]]
    with FirehoseServer(messages) as server, LocalHTTPServer() as plc:
        for did, account in STREAM.accounts.items():
            plc.route("*", f"/{did}", json_reply(did_document(did, account.did_key)))
        status = main(["firehose", server.url, "--json", "--verify", "--record", str(recording), "--max-events", str(n), "--plc-url", plc.base])
        out = capsys.readouterr()
        assert status == 0, out.err
        assert len(plc.requests) == len(STREAM.accounts) + 4  # each key once, again after each #identity
    lines = [json.loads(line) for line in out.out.splitlines()]
    assert [(x["type"], x["seq"]) for x in lines] == [(_kind(m), s) for s, m in messages]
    commits = [x for x in lines if x["type"] in ("#commit", "#sync")]
    assert commits[0]["verified"] is False and commits[0]["verifyError"].startswith("MalformedCarError"), commits[0]["verifyError"]
    assert all(x["verified"] is True for x in commits[1:])
    with recording.open("rb") as fh:
        assert list(read_messages(fh)) == [m for _, m in messages]
    assert main(["firehose", "--replay", str(recording), "--json"]) == 0
    replayed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert replayed == [{k: v for k, v in x.items() if k not in ("verified", "verifyError")} for x in lines]
    assert main(["firehose", "--replay", str(recording)]) == 0
    text = capsys.readouterr().out.splitlines()
    assert len(text) == n and text[0].startswith(f"{messages[0][0]} #commit did:plc:")


def forge(message: bytes) -> bytes:
    """The message with the last byte of its ``blocks`` flipped (a record block no longer hashes
    to its CID)."""
    header, n = _cbrrr.decode_dag_cbor(message, cbrrr.CID, False)
    body, _ = _cbrrr.decode_dag_cbor(message[n:], cbrrr.CID, False)
    blocks = body["blocks"]
    body["blocks"] = blocks[:-1] + bytes([blocks[-1] ^ 1])
    return bytes(cbrrr.encode_dag_cbor(header)) + bytes(cbrrr.encode_dag_cbor(body))


def _kind(message: bytes) -> str:
    from repo_stream.sync.events import decode_frame

    return decode_frame(message).type


def test_cli_needs_a_url_or_a_replay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firehose"]) == 2
    assert "give a URL or --replay FILE" in capsys.readouterr().err


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and, with ``upgrade``, completes the
    WebSocket upgrade; then it never sends anything (pings go unanswered)."""

    def __init__(self, upgrade: bool) -> None:
        import socket
        import threading

        self.upgrade = upgrade
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"ws://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        from wsproto import ConnectionType, WSConnection
        from wsproto.events import AcceptConnection, Request

        held = []
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            held.append(conn)
            if self.upgrade:
                ws = WSConnection(ConnectionType.SERVER)
                while True:
                    ws.receive_data(conn.recv(65536))
                    if any(isinstance(e, Request) for e in ws.events()):
                        break
                conn.sendall(ws.send(AcceptConnection()))

    def close(self) -> None:
        self.listener.close()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("upgrade", "options", "message"),
    [
        (False, {"connect_timeout": 0.3}, r"no WebSocket connection within 0\.3 seconds"),  # the deadline covers the upgrade
        (True, {"ping_interval": 0.2}, r"no data for 0\.4 seconds"),  # an unanswered ping drops the connection
    ],
    ids=["connect-deadline-covers-the-upgrade", "unanswered-ping"],
)
async def test_a_silent_server_is_dropped_and_retried(upgrade: bool, options: dict[str, float], message: str) -> None:
    server = SilentServer(upgrade=upgrade)
    try:
        with anyio.fail_after(10), pytest.raises(FirehoseError, match=message):
            async with Firehose(server.url, max_reconnects=1, backoff_base=0.01, **options) as client:
                async for item in client:
                    assert isinstance(item, Problem) and item.kind == "disconnected"
        assert server.connections == 2
    finally:
        server.close()


@pytest.mark.anyio
async def test_a_url_that_is_not_a_websocket_ends_the_stream() -> None:
    with anyio.fail_after(10), pytest.raises(FirehoseError, match="the scheme must be ws:// or wss://"):
        async with Firehose("ftp://127.0.0.1:1", max_reconnects=5) as client:
            async for _ in client:
                pass


def test_cli_reports_a_bad_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["firehose", "ftp://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: firehose URL 'ftp://127.0.0.1:1/xrpc/com.atproto.sync.subscribeRepos': the scheme must be ws:// or wss://")


@pytest.mark.anyio
async def test_a_quiet_server_that_answers_pings_keeps_the_connection() -> None:
    with FirehoseServer([]) as server, anyio.fail_after(10):
        async with Firehose(server.url, ping_interval=0.1, max_reconnects=0) as client:
            with anyio.move_on_after(1.0):
                async for item in client:
                    raise AssertionError(f"unexpected {item}")
            assert client.stats.connections == 1 and client.stats.problems == 0


def test_raw_commit_made_fast_is_the_dataclass_one() -> None:
    """parse_message makes a RawCommit with its slots set directly (no frozen __init__): every
    field, in the dataclass's order, equal to the one made the usual way."""
    import dataclasses

    from repo_stream.firehose.items import Event, RawCommit, _raw_commit

    assert (*Event.__slots__, *RawCommit.__slots__) == tuple(field.name for field in dataclasses.fields(RawCommit))
    made = _raw_commit(5, "did:plc:x", None, b"message", "3kaaaaaaaaaaa", [("create", "app.bsky.feed.post/3kaaaaaaaaaaa")])
    usual = RawCommit("#commit", 5, "did:plc:x", None, {}, b"message", True, "3kaaaaaaaaaaa", [("create", "app.bsky.feed.post/3kaaaaaaaaaaa")])
    assert type(made) is RawCommit and made == usual
    assert [getattr(made, f.name) for f in dataclasses.fields(RawCommit)] == [getattr(usual, f.name) for f in dataclasses.fields(RawCommit)]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.seq = 6  # type: ignore[misc]
