"""The sync service's follow half (repo_stream.sync.follow, repo_stream.sync.state) against the
local WebSocket server: verified record events per repo that rebuild each repo's final records
exactly, a gap that desynchronizes one repo, a forged commit dropped, a restart from the
committed cursor. Asyncio and trio."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from repo_stream.core.cid import cid_text
from repo_stream.errors import FirehoseError
from repo_stream.firehose import Firehose, KeyCache
from repo_stream.sync.events import decode_frame
from repo_stream.sync.follow import RecordEvent, RepoEvent, collection_filter, follow
from repo_stream.sync.state import StateStore
from tests.firehose_server import FirehoseServer, Plan, Stream, make_stream
from tests.servers import LocalHTTPServer, json_reply
from tests.test_firehose import did_document, forge

pytestmark = pytest.mark.once

STREAM = make_stream(accounts=3, commits=90, seed=7)


def final_records(stream: Stream, did: str) -> dict[str, str]:
    return {key.decode(): cid_text(cid) for key, cid in stream.accounts[did].generator.pairs.items()}


def apply(records: dict[str, dict[str, str]], event: RecordEvent) -> None:
    repo = records.setdefault(event.did, {})
    key = f"{event.collection}/{event.rkey}"
    if event.action == "delete":
        repo.pop(key, None)  # at least once: a delete re-delivered after a restart
    else:
        assert event.cid is not None and event.value is not None
        repo[key] = event.cid


def plc_for(stream: Stream) -> LocalHTTPServer:
    plc = LocalHTTPServer()
    for did, account in stream.accounts.items():
        plc.route("*", f"/{did}", json_reply(did_document(did, account.did_key)))
    return plc


def track(state: StateStore, stream: Stream) -> None:
    for did, account in stream.accounts.items():
        state.set(did, "active", *account.start)  # as if backfilled at the stream's start
    state.commit()


def commits_of(stream: Stream) -> int:
    return sum(1 for _, m in stream.messages if b"#commit" in m[:20])


async def run(
    url: str,
    state: StateStore,
    keys: KeyCache,
    records: dict[str, dict[str, str]],
    repo_events: list[RepoEvent],
    *,
    stop_after: int | None = None,
    collections: list[str] | None = None,
    seen: set[str] | None = None,
) -> int:
    """Follow until the server closes at the end of its replay (or ``stop_after`` items)."""
    taken = 0
    try:
        async with Firehose(url, cursor=state.cursor, max_reconnects=0) as stream:
            async for item in follow(stream, state, keys, collections=collections):
                if isinstance(item, RecordEvent):
                    assert item.live and item.seq is not None
                    apply(records, item)
                    if seen is not None:
                        seen.add(item.collection)
                else:
                    repo_events.append(item)
                taken += 1
                if stop_after is not None and taken >= stop_after:
                    break
    except FirehoseError as exc:
        assert "closed the WebSocket with code 1000" in str(exc)
    return taken


@pytest.mark.anyio
async def test_following_rebuilds_every_repo_exactly(tmp_path: Path) -> None:
    records: dict[str, dict[str, str]] = {}
    repo_events: list[RepoEvent] = []
    with FirehoseServer(STREAM.messages, [Plan(close_at_end=True)]) as server, plc_for(STREAM) as plc, StateStore(tmp_path / "state.sqlite") as state:
        track(state, STREAM)
        with anyio.fail_after(60):
            await run(server.url, state, KeyCache(plc_url=plc.base), records, repo_events)
        for did, account in STREAM.accounts.items():
            assert records.get(did, {}) == final_records(STREAM, did)
            row = state.get(did)
            assert row is not None and row.status == "active" and row.rev == account.generator.rev
            assert row.data == cid_text(account.generator.root)
    assert sorted(e.event for e in repo_events) == ["account"] * 3 + ["identity"] * 3


@pytest.mark.anyio
async def test_a_gap_desynchronizes_the_repo_and_a_forged_commit_is_dropped(tmp_path: Path) -> None:
    commits = [i for i, (_, m) in enumerate(STREAM.messages) if b"#commit" in m[:20]]
    dids = list(STREAM.accounts)
    def repo_of(message: bytes) -> str:
        return str(decode_frame(message).body["repo"])

    gap_at = next(i for i in commits[20:] if repo_of(STREAM.messages[i][1]) == dids[0])
    forged_at = next(i for i in commits[30:] if repo_of(STREAM.messages[i][1]) == dids[1])
    messages = [m for i, m in enumerate(STREAM.messages) if i != gap_at]
    position = messages.index(STREAM.messages[forged_at])
    plans = [Plan(insert={position: [forge(STREAM.messages[forged_at][1])]}, close_at_end=True)]
    records: dict[str, dict[str, str]] = {}
    repo_events: list[RepoEvent] = []
    with FirehoseServer(messages, plans) as server, plc_for(STREAM) as plc, StateStore(tmp_path / "state.sqlite") as state:
        track(state, STREAM)
        with anyio.fail_after(60):
            await run(server.url, state, KeyCache(plc_url=plc.base), records, repo_events)
        reported = sorted((e.did, e.event) for e in repo_events if e.event in ("desynchronized", "error"))
        assert reported == sorted([(dids[0], "desynchronized"), (dids[1], "error")])
        error = next(e for e in repo_events if e.event == "error")
        assert error.detail["error"].startswith("MalformedCarError")
        row = state.get(dids[0])
        assert row is not None and row.status == "desynchronized"
        for did in dids[1:]:
            assert records.get(did, {}) == final_records(STREAM, did)
            assert state.get(did) == (did, "active", STREAM.accounts[did].generator.rev, cid_text(STREAM.accounts[did].generator.root))


@pytest.mark.anyio
async def test_a_restart_resumes_from_the_committed_cursor(tmp_path: Path) -> None:
    records: dict[str, dict[str, str]] = {}
    repo_events: list[RepoEvent] = []
    path = tmp_path / "state.sqlite"
    with FirehoseServer(STREAM.messages, [Plan(close_at_end=True)]) as server, plc_for(STREAM) as plc:
        with StateStore(path) as state:
            track(state, STREAM)
            with anyio.fail_after(60):
                await run(server.url, state, KeyCache(plc_url=plc.base), records, repo_events, stop_after=40)
            first_cursor = state.cursor
        assert first_cursor is not None and first_cursor < STREAM.messages[-1][0]  # type: ignore[operator]
        with StateStore(path) as state:  # a new process would see this
            assert state.cursor == first_cursor
            with anyio.fail_after(60):
                await run(server.url, state, KeyCache(plc_url=plc.base), records, repo_events)
        assert server.cursors == [None, first_cursor]
        for did in STREAM.accounts:
            assert records.get(did, {}) == final_records(STREAM, did)


def test_state_store_round_trip(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite") as state:
        state.add("did:plc:a")
        state.set("did:plc:b", "active", "3k2222222222a", "bafyx")
        state.set("did:plc:b", "desynchronized")
        state.set_cursor(42)
        state.commit()
        state.set_cursor(43)  # not committed
    with StateStore(tmp_path / "s.sqlite") as state:
        assert state.get("did:plc:a") == ("did:plc:a", "pending", None, None)
        assert state.get("did:plc:b") == ("did:plc:b", "desynchronized", "3k2222222222a", "bafyx")
        assert state.get("did:plc:c") is None
        assert state.cursor == 42
        assert state.counts() == {"desynchronized": 1, "pending": 1}
        with pytest.raises(ValueError, match="not one of"):
            state.set("did:plc:a", "gone")


@pytest.mark.anyio
async def test_a_collection_filter_emits_only_its_records(tmp_path: Path) -> None:
    records: dict[str, dict[str, str]] = {}
    repo_events: list[RepoEvent] = []
    seen: set[str] = set()
    with FirehoseServer(STREAM.messages, [Plan(close_at_end=True)]) as server, plc_for(STREAM) as plc, StateStore(tmp_path / "s.sqlite") as state:
        track(state, STREAM)
        with anyio.fail_after(60):
            await run(server.url, state, KeyCache(plc_url=plc.base), records, repo_events, collections=["app.bsky.feed.*", "app.bsky.graph.follow"], seen=seen)
        assert seen == {"app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.feed.repost", "app.bsky.graph.follow"}
        for did, account in STREAM.accounts.items():
            want = {k: v for k, v in final_records(STREAM, did).items() if k.startswith(("app.bsky.feed.", "app.bsky.graph.follow/"))}
            assert want and records.get(did, {}) == want
            row = state.get(did)
            assert row is not None and row.rev == account.generator.rev  # every commit applied to the state
    every = {k.partition("/")[0] for did in STREAM.accounts for k in final_records(STREAM, did)}
    assert every - {"app.bsky.feed.like", "app.bsky.feed.post", "app.bsky.feed.repost", "app.bsky.graph.follow"}  # others exist


def test_collection_filter() -> None:
    wanted = collection_filter(["app.bsky.feed.*", "app.bsky.graph.follow"])
    assert [wanted(c) for c in ("app.bsky.feed.post", "app.bsky.graph.follow", "app.bsky.graph.block", "app.bsky.feedx.post")] == [True, True, False, False]
    assert collection_filter(None)("anything.at.all")
    with pytest.raises(ValueError, match="may only end it"):
        collection_filter(["app.*.post"])
