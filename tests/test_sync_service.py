"""The sync service (repo_stream.sync.Sync) against real local servers: a WebSocket server
replaying a generated stream and an HTTP server that is the PLC directory and the PDS (getRepo).
After each scenario the records delivered per repo (creates, updates and deletes applied to a
dict) equal the repo's records at the end of the stream, computed by the generator that made the
stream and checked against a full walk of the final repo CAR. Asyncio and trio."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from repo_stream import iter_records
from repo_stream.core.cid import cid_text
from repo_stream.sync import RecordEvent, RepoEvent, Sync
from repo_stream.sync.state import StateStore
from tests.backfill_server import RepoHost, car_reply
from tests.firehose_server import FirehoseServer, Plan, error_frame
from tests.servers import json_reply
from tests.sync_server import SyncStream, make_sync_stream, serve
from tests.test_firehose import forge

STREAM = make_sync_stream(accounts=4, commits=240, seed=3)


def walk_final(stream: SyncStream, did: str) -> dict[str, str]:
    """The final repo's records by a full walk of its CAR (independent of the generator's map)."""
    return {record.key: str(record.cid) for record in iter_records(stream.accounts[did].final)}


def test_the_generator_agrees_with_a_walk_of_the_final_repos() -> None:
    for did, account in STREAM.accounts.items():
        assert account.records() == walk_final(STREAM, did)
        assert len(account.records()) > 20


def apply(records: dict[str, dict[str, str]], event: RecordEvent) -> None:
    repo = records.setdefault(event.did, {})
    key = f"{event.collection}/{event.rkey}"
    if event.action == "delete":
        assert event.cid is None and event.value is None
        repo.pop(key, None)
    else:
        assert event.cid is not None and isinstance(event.value, dict)
        repo[key] = event.cid


class Run:
    """What a run delivered."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, str]] = {}
        self.events: list[RecordEvent | RepoEvent] = []
        self.stats: Any = None

    def repo_events(self, kind: str) -> list[RepoEvent]:
        return [e for e in self.events if isinstance(e, RepoEvent) and e.event == kind]


def caught_up(sync: Sync, stream: SyncStream) -> bool:
    """Every repo is active at its final rev (its last commit's events taken)."""
    assert sync.state is not None
    for did, account in stream.accounts.items():
        row = sync.state.get(did)
        if row is None or row.status != "active" or row.rev != account.generator.rev or did in sync._fetching:
            return False
    return True


async def run_sync(
    stream: SyncStream,
    relay: str,
    host: RepoHost,
    state: Path,
    run: Run | None = None,
    *,
    stop_after: int | None = None,
    on_event: Callable[[RecordEvent | RepoEvent], Any] | None = None,
    stop_when: Callable[[RecordEvent | RepoEvent], bool] | None = None,
    timeout: float = 60,
    **options: Any,
) -> Run:
    """Sync every account of ``stream`` until caught up (or ``stop_after`` events, or the first
    event ``stop_when`` holds for, which is taken)."""
    run = run or Run()
    options.setdefault("firehose_options", {"backoff_base": 0.01, "backoff_cap": 0.05})
    with anyio.fail_after(timeout):
        async with Sync(list(stream.accounts), relay=relay, plc_url=host.base, state=state, allow_private_hosts=True, **options) as sync:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while not caught_up(sync, stream):
                        await anyio.sleep(0.02)
                    tg.cancel_scope.cancel()

                if stop_after is None and stop_when is None:
                    tg.start_soon(watch)
                taken = 0
                async for event in sync:
                    if isinstance(event, RecordEvent):
                        apply(run.records, event)
                    run.events.append(event)
                    if on_event is not None:
                        await on_event(event)
                    taken += 1
                    if stop_after is not None and taken >= stop_after:
                        break
                    if stop_when is not None and stop_when(event):
                        break
                tg.cancel_scope.cancel()
            run.stats = sync.stats
    return run


def after_the_fetches(host: RepoHost, stream: SyncStream) -> list[Plan]:
    """A relay script that starts the stream once every repo's fetch has started. Events of a
    repo whose fetch has not started are skipped (the fetch covers them), which the snapshot
    (made at 30% of the stream) served by the first getRepo would not: a repo could be resynced
    or, with no commit left to show the gap, left at its snapshot (timing, under load)."""
    return [Plan(wait_for=lambda: all(host.fetches(did) for did in stream.accounts))]


def check_final(run: Run, stream: SyncStream, dids: list[str] | None = None) -> None:
    for did in dids or list(stream.accounts):
        assert run.records.get(did, {}) == stream.accounts[did].records(), did


@pytest.mark.anyio
async def test_backfill_then_follow_with_events_during_the_backfill(tmp_path: Path) -> None:
    # getRepo answers slowly: the whole stream arrives while the repos are backfilled, is
    # buffered (past 40 messages spilled to the state file) and applied after each backfill.
    with RepoHost() as host, FirehoseServer(STREAM.messages, after_the_fetches(host, STREAM)) as relay:
        serve(host, STREAM)
        for did, account in STREAM.accounts.items():
            host.repo(did, car_reply(account.snapshot, head_delay=0.5))
        run = await run_sync(STREAM, relay.url, host, tmp_path / "state.sqlite", max_buffered=40)
    check_final(run, STREAM)
    backfilled = [e for e in run.events if isinstance(e, RecordEvent) and not e.live]
    live = [e for e in run.events if isinstance(e, RecordEvent) and e.live]
    assert backfilled and all(e.seq is None and e.action == "create" for e in backfilled)
    assert live and all(e.seq is not None for e in live)
    for did, account in STREAM.accounts.items():  # the backfill: exactly the snapshot's records
        snapshot = {r.key: str(r.cid) for r in iter_records(account.snapshot)}
        assert {f"{e.collection}/{e.rkey}": e.cid for e in backfilled if e.did == did} == snapshot
        assert {e.rev for e in backfilled if e.did == did} == {account.snapshot_rev}
        assert all(e.rev > account.snapshot_rev for e in live if e.did == did)  # older ones dropped
    stats = run.stats
    assert stats.buffered_peak > 40 and stats.spilled > 0 and stats.buffered == 0
    assert stats.stale > 0 and stats.fetched == 4 and stats.resyncs == 0 and stats.backfilled_at is not None
    assert sorted(e.event for e in run.events if isinstance(e, RepoEvent)) == ["account"] * 4 + ["identity"] * 4


@pytest.mark.anyio
@pytest.mark.once
async def test_the_buffer_spills_past_its_byte_budget(tmp_path: Path) -> None:
    with FirehoseServer(STREAM.messages) as relay, RepoHost() as host:
        serve(host, STREAM)
        for did, account in STREAM.accounts.items():
            host.repo(did, car_reply(account.snapshot, head_delay=0.5))
        run = await run_sync(STREAM, relay.url, host, tmp_path / "state.sqlite", max_buffered_bytes=30_000)
    check_final(run, STREAM)
    assert run.stats.spilled > 0 and run.stats.buffered == 0


@pytest.mark.anyio
@pytest.mark.once
async def test_a_gap_triggers_a_resync_that_emits_the_difference(tmp_path: Path) -> None:
    did = list(STREAM.accounts)[1]
    commits = STREAM.accounts[did].commits
    gap = commits[len(commits) // 2]  # after the snapshot
    messages = [m for i, m in enumerate(STREAM.messages) if i != gap]
    with RepoHost() as host, FirehoseServer(messages, after_the_fetches(host, STREAM)) as relay:
        serve(host, STREAM)
        run = await run_sync(STREAM, relay.url, host, tmp_path / "state.sqlite")
        assert len(host.fetches(did)) == 2 and all(len(host.fetches(d)) == 1 for d in STREAM.accounts if d != did)
    check_final(run, STREAM)
    assert [e.did for e in run.repo_events("desynchronized")] == [did]
    resync = run.repo_events("resync")
    assert [(e.did, e.detail["phase"]) for e in resync] == [(did, "started"), (did, "finished")]
    assert resync[1].detail["rev"] == STREAM.accounts[did].generator.rev
    changed = resync[1].detail["created"] + resync[1].detail["updated"] + resync[1].detail["deleted"]
    diff = [e for e in run.events if isinstance(e, RecordEvent) and e.did == did and not e.live and e.rev == STREAM.accounts[did].generator.rev]
    assert changed == len(diff) > 0
    assert run.stats.resyncs == 1


@pytest.mark.anyio
@pytest.mark.once
async def test_a_sync_event_replacing_a_repo_triggers_a_resync(tmp_path: Path) -> None:
    stream = make_sync_stream(accounts=3, commits=120, seed=5, replace=None)
    did = list(stream.accounts)[2]
    stream = make_sync_stream(accounts=3, commits=120, seed=5, replace=did)
    with FirehoseServer(stream.messages) as relay, RepoHost() as host:
        serve(host, stream)
        run = await run_sync(stream, relay.url, host, tmp_path / "state.sqlite")
    check_final(run, stream)
    desync = run.repo_events("desynchronized")
    assert [e.did for e in desync] == [did] and "#sync" in desync[0].detail["reason"]
    assert [e.detail["phase"] for e in run.repo_events("resync")] == ["started", "finished"]


@pytest.mark.anyio
@pytest.mark.once
async def test_a_forged_commit_is_reported_and_dropped(tmp_path: Path) -> None:
    did = next(iter(STREAM.accounts))
    at = STREAM.accounts[did].commits[-5]
    plans = [Plan(insert={at: [forge(STREAM.messages[at][1])]})]
    with FirehoseServer(STREAM.messages, plans) as relay, RepoHost() as host:
        serve(host, STREAM)
        run = await run_sync(STREAM, relay.url, host, tmp_path / "state.sqlite")
    check_final(run, STREAM)
    errors = run.repo_events("error")
    assert [e.did for e in errors] == [did] and errors[0].detail["error"].startswith("MalformedCarError")
    assert run.stats.broken == 1 and not run.repo_events("resync")


@pytest.mark.anyio
@pytest.mark.once
async def test_dropped_connection_malformed_frame_and_error_frame(tmp_path: Path) -> None:
    n = len(STREAM.messages)
    plans = [
        Plan(drop_after=n // 3, insert={10: [b"\xa1garbage"]}),  # a malformed frame, then the TCP connection dropped
        Plan(insert={5: [error_frame("ConsumerTooSlow", "too slow")]}),  # an error frame: the relay drops us
        Plan(),
    ]
    problems: list[str] = []
    with FirehoseServer(STREAM.messages, plans) as relay, RepoHost() as host:
        serve(host, STREAM)  # the snapshot: every repo needs the stream to its end
        run = await run_sync(STREAM, relay.url, host, tmp_path / "state.sqlite", on_problem=lambda p: problems.append(p.kind))
        assert len(relay.cursors) >= 3 and relay.cursors[0] is None and relay.cursors[1] is not None
    check_final(run, STREAM)
    assert "malformed" in problems and "error-frame" in problems and problems.count("disconnected") >= 2


@pytest.mark.anyio
@pytest.mark.once
async def test_a_slow_consumer_gets_everything_through_a_small_buffer(tmp_path: Path) -> None:
    async def slow(event: RecordEvent | RepoEvent) -> None:
        await anyio.sleep(0.001)

    with FirehoseServer(STREAM.messages) as relay, RepoHost() as host:
        serve(host, STREAM)
        run = await run_sync(
            STREAM, relay.url, host, tmp_path / "state.sqlite", on_event=slow, firehose_options={"max_buffer": 4, "backoff_base": 0.01}
        )
    check_final(run, STREAM)


@pytest.mark.anyio
@pytest.mark.once
async def test_a_collection_filter_leaves_out_other_collections(tmp_path: Path) -> None:
    wanted = ("app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.feed.repost")
    with FirehoseServer(STREAM.messages) as relay, RepoHost() as host:
        serve(host, STREAM)
        run = await run_sync(STREAM, relay.url, host, tmp_path / "state.sqlite", collections=["app.bsky.feed.*"])
    seen = {e.collection for e in run.events if isinstance(e, RecordEvent)}
    assert seen == set(wanted)
    for did, account in STREAM.accounts.items():
        want = {k: v for k, v in account.records().items() if k.startswith("app.bsky.feed.")}
        assert want and run.records[did] == want
        assert set(account.records()) - set(want)  # other collections exist


@pytest.mark.anyio
@pytest.mark.once
async def test_a_restart_resumes_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite"
    with FirehoseServer(STREAM.messages) as relay, RepoHost() as host:
        serve(host, STREAM)
        run = Run()
        await run_sync(STREAM, relay.url, host, path, run, stop_after=300, commit_every=1)
        taken = len(run.events)
        with StateStore(path) as state:
            cursor = state.cursor
            assert state.counts().get("active", 0) >= 1
        await run_sync(STREAM, relay.url, host, path, run)
        assert relay.cursors[-1] == cursor
    check_final(run, STREAM)
    assert taken == 300 < len(run.events)


@pytest.mark.anyio
@pytest.mark.once
async def test_an_interrupted_backfill_resumes_with_the_rest_only(tmp_path: Path) -> None:
    # Stop in the middle of the first repo's backfill: the restart delivers only what was not taken.
    stream = make_sync_stream(accounts=1, commits=30, seed=9, initial_records=300, snapshot=0)
    path = tmp_path / "state.sqlite"
    with FirehoseServer(stream.messages) as relay, RepoHost() as host:
        serve(host, stream, fresh=True)
        run = Run()
        await run_sync(stream, relay.url, host, path, run, stop_after=100, commit_every=1)
        first = [f"{e.collection}/{e.rkey}" for e in run.events if isinstance(e, RecordEvent)]
        second = Run()
        await run_sync(stream, relay.url, host, path, second)
    again = [f"{e.collection}/{e.rkey}" for e in second.events if isinstance(e, RecordEvent) and not e.live]
    assert len(first) == 100 and not set(first[:99]) & set(again)  # the last one may come again
    merged: dict[str, dict[str, str]] = {}
    for event in run.events + second.events:
        if isinstance(event, RecordEvent):
            apply(merged, event)
    did = next(iter(stream.accounts))
    assert merged[did] == stream.accounts[did].records()


@pytest.mark.anyio
@pytest.mark.once
async def test_signal_collection_tracks_listed_repos_and_repos_found_live(tmp_path: Path) -> None:
    dids = list(STREAM.accounts)
    with FirehoseServer(STREAM.messages) as relay, RepoHost() as host:
        serve(host, STREAM)
        host.collection_listing("app.bsky.graph.block", [[{"did": dids[0]}]])
        run = Run()
        with anyio.fail_after(60):
            async with Sync(
                relay=relay.url, plc_url=host.base, state=tmp_path / "s.sqlite", host=host.base,
                signal_collection="app.bsky.graph.block", allow_private_hosts=True,
            ) as sync:  # fmt: skip
                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        while not caught_up(sync, STREAM):
                            await anyio.sleep(0.02)
                        tg.cancel_scope.cancel()

                    tg.start_soon(watch)
                    async for event in sync:
                        if isinstance(event, RecordEvent):
                            apply(run.records, event)
    check_final(run, STREAM)  # every account creates a block record at some point of the stream


def test_state_records_pages_in_key_order(tmp_path: Path) -> None:
    with StateStore(tmp_path / "s.sqlite") as state:
        for key in ("a.b/x", "a.b.c/y", "a.b/a", "z/1"):
            state.put_record("did:plc:a", key, cid_text(b"\x01q\x12 " + bytes(32)))
        state.put_record("did:plc:a", "z/1", None)
        keys = [k for k, _ in state.records_page("did:plc:a", "", None, 10)]
        assert keys == sorted(["a.b/x", "a.b.c/y", "a.b/a"], key=str.encode)
        assert [k for k, _ in state.records_page("did:plc:a", "a.b.c/y", "a.b/a", 10)] == ["a.b/a"]


@pytest.mark.once
def test_state_marks_fold_to_records_with_an_empty_cid(tmp_path: Path) -> None:
    # Marks left by a killed run: a row per DID of a group (keys joined by newlines), a row per
    # key (files made before), a stored record among them; a key with a newline is not noted.
    path = tmp_path / "s.sqlite"
    cid = cid_text(b"\x01q\x12 " + bytes(32))
    with StateStore(path) as state:
        state.put_record("did:plc:a", "a/1", cid)
        state.mark([("did:plc:a", "a/1"), ("did:plc:b", "b/1"), ("did:plc:a", "a/2"), ("did:plc:a", "a/bad\nkey")])
        state._run("INSERT INTO marks (did, key) VALUES ('did:plc:c', 'c/1')")
        state.commit()
        assert state._run("SELECT COUNT(*) FROM marks").fetchone()[0] == 3
    with StateStore(path) as state:
        assert state.fold_marks() == 4
        assert state._run("SELECT COUNT(*) FROM marks").fetchone()[0] == 0
        assert state.records_page("did:plc:a", "", None, 10) == [("a/1", ""), ("a/2", "")]
        assert state.records_page("did:plc:b", "", None, 10) == [("b/1", "")]
        assert state.records_page("did:plc:c", "", None, 10) == [("c/1", "")]
        assert state.fold_marks() == 0


@pytest.mark.once
@pytest.mark.parametrize("reopen", [False, True])
@pytest.mark.parametrize("max_changes", [3, 100_000])
def test_state_record_changes_fold_to_the_last_change_of_each_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reopen: bool, max_changes: int) -> None:
    # Changes of one key across flushes (puts, deletes, puts after deletes), folded during the
    # writes (max_changes=3), before a read, or by the next open of the file (reopen: the
    # changes were committed and not folded).
    import repo_stream.sync.state as state_module

    monkeypatch.setattr(state_module, "MAX_CHANGES", max_changes)
    cids = [cid_text(b"\x01q\x12 " + bytes([i]) * 32) for i in range(6)]
    steps: list[list[tuple[str, str | None]]] = [
        [("a/1", cids[0]), ("a/2", cids[0]), ("a/3", cids[0]), ("a/4", cids[0])],
        [("a/1", None), ("a/2", cids[1]), ("a/5", cids[1])],
        [("a/1", cids[2]), ("a/3", None), ("a/5", None)],
        [("a/2", None), ("a/3", cids[3]), ("a/6", cids[3])],
        [("a/2", cids[4]), ("a/6", None)],
    ]
    path = tmp_path / "s.sqlite"
    with StateStore(path) as state:
        state.put_records("did:plc:b", [("a/1", cids[5])])
        for step in steps:
            state.put_records("did:plc:a", step)
            state.flush()
        state.commit()
        if reopen:
            state.close()
            state = StateStore(path)
        page = state.records_page("did:plc:a", "", None, 10)
        assert page == [("a/1", cids[2]), ("a/2", cids[4]), ("a/3", cids[3]), ("a/4", cids[0])]
        assert state.records_page("did:plc:b", "", None, 10) == [("a/1", cids[5])]
        assert state._run("SELECT COUNT(*) FROM journal").fetchone()[0] == 0
        state.close()


@pytest.mark.once
@pytest.mark.parametrize("reopen", [False, True])
def test_state_journal_keeps_keys_and_dids_that_json_escapes(tmp_path: Path, reopen: bool) -> None:
    # The journal is JSON: quotes, backslashes, control and non-ASCII characters in a DID or a
    # key come back as they were (folded before a read, or by the next open). A key or DID with
    # a NUL (never a repo's) is not stored, and its delete removes nothing else.
    cid = cid_text(b"\x01q\x12 " + bytes(32))
    keys = ['a/"q"', "a/back\\slash", "a/\\u0000", "a/\u00e9t\u00e9", "a/tab\tnl\nnul", "a/\U0001f600"]
    dids = ['did:web:"x"', "did:plc:\u00e9\\"]
    path = tmp_path / "s.sqlite"
    with StateStore(path) as state:
        for did in dids:
            state.put_records(did, [(key, cid) for key in keys])
        state.put_records(dids[1], [(keys[0], None), ("a/tab\tnl\nnul\x00", cid)])
        state.put_records("did:plc:nul\x00", [("a/1", cid)])
        state.commit()
        state.put_records(dids[0], [("a/tab\tnl\nnul\x00", None)])
        state.put_records("did:plc:nul\x00", [("a/1", None)])
        state.commit()
        if reopen:
            state.close()
            state = StateStore(path)
        assert state.records_page(dids[0], "", None, 10) == sorted(((key, cid) for key in keys), key=lambda kc: kc[0].encode())
        assert state.records_page(dids[1], "", None, 10) == sorted(((key, cid) for key in keys[1:]), key=lambda kc: kc[0].encode())
        assert not state.has_records("did:plc:nul") and not state.has_records("did:plc:nul\x00")
        state.close()


@pytest.mark.once
def test_state_file_made_before_the_journal_opens_with_its_changes_folded(tmp_path: Path) -> None:
    # A file as the code before the journal made it (4 KiB pages; record changes a row each in
    # table ``changes``, committed and not folded; marks of a killed run), written here in plain
    # SQL: the store opens it, folds the changes (the last of each key wins, deletes included),
    # drops ``changes``, keeps the rest, and works on as usual.
    import sqlite3
    from contextlib import closing

    cids = [cid_text(b"\x01q\x12 " + bytes([i]) * 32) for i in range(4)]
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE repos (did TEXT PRIMARY KEY, status TEXT NOT NULL, rev TEXT, data TEXT, updated REAL)")
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute("CREATE TABLE records (did TEXT, key TEXT, cid TEXT NOT NULL, PRIMARY KEY (did, key)) WITHOUT ROWID")
        db.execute("CREATE TABLE staged (did TEXT, key TEXT, cid TEXT NOT NULL, PRIMARY KEY (did, key)) WITHOUT ROWID")
        db.execute("CREATE TABLE marks (did TEXT, key TEXT)")
        db.execute("CREATE TABLE buffer (did TEXT, seq INTEGER, message BLOB NOT NULL, PRIMARY KEY (did, seq)) WITHOUT ROWID")
        db.execute("CREATE TABLE changes (did TEXT NOT NULL, key TEXT NOT NULL, cid TEXT)")
        db.execute("INSERT INTO repos VALUES ('did:plc:a', 'active', '3kaaaaaaaaaa2', ?, 0), ('did:plc:b', 'pending', NULL, NULL, 0)", (cids[3],))
        db.execute("INSERT INTO meta VALUES ('cursor', '41')")
        db.executemany("INSERT INTO records VALUES ('did:plc:a', ?, ?)", [("a/1", cids[0]), ("a/2", cids[0]), ("a/3", cids[0])])
        db.executemany(
            "INSERT INTO changes (did, key, cid) VALUES (?, ?, ?)",
            [
                ("did:plc:a", "a/1", None),  # deleted
                ("did:plc:a", "a/2", cids[1]),  # updated
                ("did:plc:a", "a/4", cids[1]),  # created, then deleted
                ("did:plc:a", "a/4", None),
                ("did:plc:a", "a/3", None),  # deleted, then created again
                ("did:plc:a", "a/3", cids[2]),
                ("did:plc:a", "a/5", cids[2]),  # created
                ("did:plc:b", "b/1", cids[3]),
            ],
        )
        db.execute("INSERT INTO marks VALUES ('did:plc:a', 'a/6\na/7')")
        db.commit()
        assert db.execute("PRAGMA page_size").fetchone()[0] == 4096
    with StateStore(path) as state:
        tables = {name for (name,) in state._run("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "changes" not in tables and "journal" in tables
        assert state._run("PRAGMA page_size").fetchone()[0] == 4096
        assert state.cursor == 41
        assert state.get("did:plc:a") == ("did:plc:a", "active", "3kaaaaaaaaaa2", cids[3])
        assert state.dids("pending") == ["did:plc:b"]
        assert state.records_page("did:plc:a", "", None, 10) == [("a/2", cids[1]), ("a/3", cids[2]), ("a/5", cids[2])]
        assert state.records_page("did:plc:b", "", None, 10) == [("b/1", cids[3])]
        assert state.fold_marks() == 2
        state.put_records("did:plc:a", [("a/2", None), ("a/8", cids[0])])
        state.commit()
    with StateStore(path) as state:
        assert state.records_page("did:plc:a", "", None, 10) == [("a/3", cids[2]), ("a/5", cids[2]), ("a/6", ""), ("a/7", ""), ("a/8", cids[0])]


# ------------------------------------------------------------------------------ the CLI


class Child:
    """A ``repo-stream sync`` subprocess whose stdout lines are read by a thread."""

    def __init__(self, args: list[str]) -> None:
        import queue
        import subprocess
        import sys
        import threading

        self.process = subprocess.Popen(
            [sys.executable, "-m", "repo_stream", "sync", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert self.process.stdout is not None
            for line in self.process.stdout:
                self.lines.put(line)
            self.lines.put(None)

        threading.Thread(target=read, daemon=True).start()

    def rest(self, timeout: float = 10) -> list[dict[str, Any]]:
        """The lines left (as JSON) once the child has ended: what it wrote is delivered."""
        import json

        out: list[dict[str, Any]] = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            out.append(json.loads(line))
        return out

    def take(self, until: Callable[[dict[str, Any]], bool], timeout: float = 60) -> list[dict[str, Any]]:
        """Lines (as JSON) until ``until(line)`` holds after one."""
        import json
        import time

        out: list[dict[str, Any]] = []
        end = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            assert line is not None, f"the child ended: {self.process.wait()} {self.process.stderr.read() if self.process.stderr else ''}"
            out.append(json.loads(line))
            if until(out[-1]):
                return out


def apply_json(records: dict[str, dict[str, str]], line: dict[str, Any]) -> None:
    if "action" not in line:
        return
    repo = records.setdefault(line["did"], {})
    key = f"{line['collection']}/{line['rkey']}"
    if line["action"] == "delete":
        repo.pop(key, None)
    else:
        repo[key] = line["cid"]


def committed_cursor(path: Path, until: int, revs: dict[str, str] | None = None, timeout: float = 30) -> int:
    """The cursor committed to the state file ``path`` once it is at least ``until`` and every
    repo of ``revs`` (DID -> rev) is committed active at that rev (or when ``timeout`` seconds
    have passed), read by another, read-only, connection."""
    import sqlite3
    import time
    from contextlib import closing

    end = time.monotonic() + timeout
    while True:
        try:
            with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)) as db:
                row = db.execute("SELECT value FROM meta WHERE key = 'cursor'").fetchone()
                rows = dict(db.execute("SELECT did, rev FROM repos WHERE status = 'active'").fetchall())
        except sqlite3.OperationalError:  # not made yet
            row, rows = None, {}
        cursor = -1 if row is None else int(row[0])
        if (cursor >= until and all(rows.get(did) == rev for did, rev in (revs or {}).items())) or time.monotonic() > end:
            return cursor
        time.sleep(0.05)


@pytest.mark.once
def test_cli_kill_9_and_restart_lose_nothing_and_sigterm_stops_cleanly(tmp_path: Path) -> None:
    import signal

    dids = tmp_path / "dids.txt"
    dids.write_text("# the accounts\n" + "\n".join(STREAM.accounts) + "\n")
    state = tmp_path / "state.sqlite"
    records: dict[str, dict[str, str]] = {}
    final = {did: account.records() for did, account in STREAM.accounts.items()}
    with RepoHost() as host, FirehoseServer(STREAM.messages, after_the_fetches(host, STREAM)) as relay:
        serve(host, STREAM)
        args = ["--repos", str(dids), "--relay", relay.url, "--plc-url", host.base, "--state", str(state), "--json", "--allow-private-hosts"]
        first = Child(args)
        count = 0

        def enough(line: dict[str, Any]) -> bool:
            nonlocal count
            count += 1
            return count >= 250

        lines = first.take(enough)
        first.process.send_signal(signal.SIGKILL)
        assert first.process.wait(10) == -signal.SIGKILL
        lines += first.rest()  # what it wrote before it was killed is the consumer's
        for line in lines:
            apply_json(records, line)
        assert records != final
        second = Child(args)

        def done(line: dict[str, Any]) -> bool:
            apply_json(records, line)
            return records == final

        more = second.take(done)
        # The records are the final ones (maybe by refetches): wait until the child has taken the
        # rest of the stream (stale events) and committed its cursor (it commits when idle).
        last = max(seq for seq, _ in STREAM.messages if seq is not None)
        assert committed_cursor(state, until=last, revs={did: a.generator.rev for did, a in STREAM.accounts.items()}) >= last
        second.process.send_signal(signal.SIGTERM)
        assert second.process.wait(20) == 143
        more += second.rest()
        for line in more:
            apply_json(records, line)
        assert records == final
        # (an #identity of a repo waiting for its fetch is left out: the fetch covers it)
        assert {line.get("event", "record") for line in lines + more} >= {"record", "account"}
        for line in lines + more:
            if "action" in line:
                assert set(line) == {"did", "rev", "seq", "action", "collection", "rkey", "cid", "value", "live"}
                assert (line["seq"] is None) == (not line["live"])
        assert second.process.stderr is not None
        err = second.process.stderr.read()
        assert "sync: " in err and "repos: 4 active" in err, err
    with StateStore(state) as store:  # what was delivered is committed
        for did, account in STREAM.accounts.items():
            row = store.get(did)
            assert row is not None and row.status == "active" and row.rev == account.generator.rev
        assert store.cursor == last


@pytest.mark.once
def test_cli_writes_a_line_out_before_the_state_commits_it(tmp_path: Path) -> None:
    # Killed once it has committed the whole stream (idle: it commits what it took): every line
    # whose event is committed was written out, not left in a buffer that the kill loses.
    import signal

    dids = tmp_path / "dids.txt"
    dids.write_text("\n".join(STREAM.accounts) + "\n")
    state = tmp_path / "state.sqlite"
    last = max(seq for seq, _ in STREAM.messages if seq is not None)
    with RepoHost() as host, FirehoseServer(STREAM.messages, after_the_fetches(host, STREAM)) as relay:
        serve(host, STREAM)
        child = Child(["--repos", str(dids), "--relay", relay.url, "--plc-url", host.base, "--state", str(state), "--json", "--allow-private-hosts"])
        assert committed_cursor(state, until=last, revs={did: a.generator.rev for did, a in STREAM.accounts.items()}) == last
        child.process.send_signal(signal.SIGKILL)
        assert child.process.wait(10) == -signal.SIGKILL
        records: dict[str, dict[str, str]] = {}
        for line in child.rest():
            apply_json(records, line)
    assert records == {did: walk_final(STREAM, did) for did in STREAM.accounts}


@pytest.mark.once
def test_cli_usage_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from repo_stream.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["sync", "--relay", "ws://127.0.0.1:9"])  # no repos
    assert exit_info.value.code == 2
    assert main(["sync", "--repos", str(tmp_path / "none.txt"), "--relay", "ws://127.0.0.1:9", "--collection", "app.*.x", "--state", str(tmp_path / "s")]) == 2
    assert "may only end it" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sync", "--help"])
    assert "./repo-stream-sync.sqlite" in capsys.readouterr().out


class FakeSink:
    """A RepoSink and EventSink in memory: what a store would hold."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, str]] = {}
        self.parts: dict[str, dict[str, str]] = {}
        self.revs: dict[str, str] = {}
        self.statuses: list[tuple[str, str]] = []

    async def __call__(self, source: str, commit: Any, items: list[Any]) -> None:
        assert source == commit.did and all(isinstance(v, bytes) for _, _, v in items)
        self.parts.setdefault(commit.did, {}).update({k: c for k, c, _ in items})

    async def finish(self, source: str, commit: Any, error: BaseException | None) -> None:
        part = self.parts.pop(commit.did, {})
        if error is None:
            self.rows[commit.did] = part
            self.revs[commit.did] = commit.rev

    async def apply(self, did: str, rev: str, data: str, ops: Any) -> None:
        repo = self.rows.setdefault(did, {})
        for op in ops:
            key = f"{op.collection}/{op.rkey}"
            if op.action == "delete":
                assert op.cid is None and op.value is None
                repo.pop(key, None)
            else:
                assert isinstance(op.value, bytes) and op.cid is not None
                repo[key] = op.cid
        self.revs[did] = rev

    async def set_status(self, did: str, status: str) -> None:
        self.statuses.append((did, status))


@pytest.mark.anyio
@pytest.mark.once
async def test_a_sink_takes_backfills_live_commits_and_resync_differences(tmp_path: Path) -> None:
    did = list(STREAM.accounts)[2]
    gap = STREAM.accounts[did].commits[len(STREAM.accounts[did].commits) // 2]
    messages = [m for i, m in enumerate(STREAM.messages) if i != gap]
    sink = FakeSink()
    with FirehoseServer(messages) as relay, RepoHost() as host:
        serve(host, STREAM)
        run = await run_sync(STREAM, relay.url, host, tmp_path / "state.sqlite", sink=sink)
    check_final(run, STREAM)
    assert sink.rows == {d: a.records() for d, a in STREAM.accounts.items()}
    assert sink.revs == {d: a.generator.rev for d, a in STREAM.accounts.items()}
    assert sorted(sink.statuses) == sorted((d, "active") for d in STREAM.accounts) and not sink.parts


# --- per-host politeness of the service's fetches ----------------------------------------------


@pytest.mark.anyio
@pytest.mark.once
async def test_fetches_are_polite_per_host_and_a_truncated_repo_is_refetched_then_reported(tmp_path: Path) -> None:
    from repo_stream.net.fetch import FetchOptions
    from tests.servers import Reply
    from tests.sync_server import did_document
    from tests.test_backfill_hosts import cut_on_a_block_boundary

    stream = make_sync_stream(accounts=4, commits=40, seed=21, snapshot=0)
    busy_dids, (heals, stays) = list(stream.accounts)[:2], list(stream.accounts)[2:]
    with FirehoseServer(stream.messages) as relay, RepoHost() as plc, RepoHost() as busy, RepoHost() as calm:
        for did, account in stream.accounts.items():
            pds = busy if did in busy_dids else calm
            plc.route("*", f"/{did}", json_reply(did_document(did, account.did_key, pds.base)))
        for did in busy_dids:  # a 429 with Retry-After: 2 on this host, then the repo
            busy.repo(did, [Reply(status=429, headers={"Retry-After": "2"}), car_reply(stream.accounts[did].final)])
        cut = cut_on_a_block_boundary(stream.accounts[heals].final)
        calm.repo(heals, [car_reply(cut), car_reply(stream.accounts[heals].final)])  # truncated once, then whole
        calm.repo(stays, car_reply(cut_on_a_block_boundary(stream.accounts[stays].final)))  # truncated every time
        run = Run()
        errors: list[RepoEvent] = []
        with anyio.fail_after(60):
            async with Sync(
                list(stream.accounts), relay=relay.url, plc_url=plc.base, state=tmp_path / "s.sqlite", allow_private_hosts=True,
                per_host_concurrency=1, per_host_rps=50, memory_workers=2,
                fetch_options=FetchOptions(connect_timeout=2, read_timeout=2, retries=2, backoff=0.01, max_backoff=0.02, max_retry_after=5),
                firehose_options={"backoff_base": 0.01, "backoff_cap": 0.05},
            ) as sync:  # fmt: skip
                assert sync.host_limiter is not None

                def settled() -> bool:
                    assert sync.state is not None
                    rows = {did: sync.state.get(did) for did in stream.accounts}
                    good = all(
                        (row := rows[did]) is not None and row.status == "active" and row.rev == stream.accounts[did].generator.rev
                        for did in (*busy_dids, heals)
                    )
                    row = rows[stays]
                    return good and row is not None and row.status == "error"

                async with anyio.create_task_group() as tg:

                    async def watch() -> None:
                        while not settled():
                            await anyio.sleep(0.02)
                        tg.cancel_scope.cancel()

                    tg.start_soon(watch)
                    async for event in sync:
                        if isinstance(event, RecordEvent):
                            apply(run.records, event)
                        elif event.event == "error":
                            errors.append(event)
                    run.stats = sync.stats
        # The 429 held up only its host: the other host's repos were fetched meanwhile.
        busy_first = min(r.at for r in busy.fetches())
        busy_again = max(r.at for r in busy.fetches())
        assert busy_again - busy_first >= 1.9
        assert max(r.at for r in calm.fetches()) < busy_first + 1.9
        # One fetch at a time per host, counted by the servers.
        assert busy.serving_peak == 1 and calm.serving_peak == 1
        assert len(calm.fetches(heals)) == 2 and len(calm.fetches(stays)) == 3  # 1 + retries
    check_final(run, stream, [*busy_dids, heals])
    assert [e.did for e in errors] == [stays] and str(errors[0].detail["error"]).startswith("MissingBlockError"), errors
    final = stream.accounts[stays].records()  # what the consumer has of it are records it has
    assert all(final.get(key) == cid for key, cid in run.records.get(stays, {}).items())


# --- at least once across kill -9: the consumer's records equal the repo's after any resync ----


def committed_copy(path: Path, to: Path) -> None:
    """What a ``kill -9`` now would leave of the state file: what is committed (another
    connection's view, copied with SQLite's backup)."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(path)) as source, closing(sqlite3.connect(to)) as copy:
        source.backup(copy)


@pytest.mark.anyio
@pytest.mark.parametrize(("kill_after_live", "commit_every"), [(3, 100_000), (25, 100_000), (60, 100_000), (110, 100_000), (40, 7)])
async def test_kill_9_in_a_live_stream_then_a_resync_leaves_the_consumer_with_the_repos_records(
    tmp_path: Path, kill_after_live: int, commit_every: int
) -> None:
    # The first run is "killed" after the consumer took its Nth live record event: the state file
    # is what was committed then, the consumer has what it took. The second run's relay lacks the
    # events from the committed cursor to the last one the first run delivered (they are not
    # delivered again), and every repo is refetched (as after a gap: the final repo), its
    # records compared with the state.
    path, killed = tmp_path / "state.sqlite", tmp_path / "killed.sqlite"
    live = last_seq = 0

    def kill(event: RecordEvent | RepoEvent) -> bool:
        nonlocal live, last_seq
        last_seq = max(last_seq, event.seq or 0)
        if isinstance(event, RecordEvent) and event.live:
            live += 1
        if live < kill_after_live:
            return False
        committed_copy(path, killed)
        return True

    with FirehoseServer(STREAM.messages) as relay, RepoHost() as host:
        serve(host, STREAM)
        first = await run_sync(STREAM, relay.url, host, path, stop_when=kill, commit_every=commit_every, commit_interval=3600)
        assert live == kill_after_live
        with StateStore(killed) as state:
            cursor = state.cursor or 0
            for did in STREAM.accounts:  # a repo without commits after the gap is refetched too
                row = state.get(did)
                if row is not None and row.status == "active":
                    state.set(did, "desynchronized")
            state.commit()
        gap = {i for i, (seq, _) in enumerate(STREAM.messages) if seq is not None and cursor < seq <= last_seq}
        fetched = {did: len(host.fetches(did)) for did in STREAM.accounts}
        with FirehoseServer([m for i, m in enumerate(STREAM.messages) if i not in gap]) as relay2:
            second = await run_sync(STREAM, relay2.url, host, killed)
        assert all(len(host.fetches(did)) > fetched[did] for did in STREAM.accounts)  # every repo was fetched
    records: dict[str, dict[str, str]] = {}
    for event in first.events + second.events:
        if isinstance(event, RecordEvent):
            apply(records, event)
    for did in STREAM.accounts:
        assert records.get(did, {}) == walk_final(STREAM, did), did
    with StateStore(killed) as state:  # no mark is left once all was committed
        assert state._run("SELECT COUNT(*) FROM marks").fetchone()[0] == 0


def make_revert_stream() -> tuple[SyncStream, str, str]:
    """One account of 20 records and six commits: the first deletes a record and updates
    another, the third creates the first again and updates the second back (both to their old
    CIDs), the others only create. Returns the stream and the two keys."""
    from repo_stream.sync.generate import CommitGenerator, make_signer
    from tests.firehose_server import with_seq
    from tests.sync_server import SyncAccount

    sign, did_key = make_signer("k256", 4242)
    did = "did:plc:" + "reverts".ljust(24, "a")
    generator = CommitGenerator(did, sign, seed=4242, engine="edit")
    generator.commit(generator.random_ops(20, creates=1.0))
    account = SyncAccount(did, did_key, generator, snapshot=generator.repo_car(), snapshot_rev=generator.rev)
    keys = sorted(generator.pairs)
    gone, changed = keys[3].decode(), keys[11].decode()
    gone_block, changed_block = (generator.records[generator.pairs[k]] for k in (keys[3], keys[11]))
    other = next(b for b in generator.pool if b not in (gone_block, changed_block))
    messages: list[tuple[int | None, bytes]] = []

    def add(message: bytes) -> None:
        account.commits.append(len(messages))
        messages.append((len(messages) + 1, with_seq(message, len(messages) + 1)))

    add(generator.commit([("delete", gone, None), ("update", changed, other)]))
    add(generator.commit(generator.random_ops(2, creates=1.0)))
    add(generator.commit([("create", gone, gone_block), ("update", changed, changed_block)]))
    for _ in range(3):
        add(generator.commit(generator.random_ops(2, creates=1.0)))
    account.final = generator.repo_car()
    return SyncStream(messages, {did: account}), gone, changed


@pytest.mark.anyio
async def test_a_delete_and_an_update_delivered_not_committed_then_reverted_are_sent_again(tmp_path: Path) -> None:
    # The first run delivers a commit deleting a record and updating another and is killed before
    # that commit is committed (commit_every=1: all before it is); the record is then created
    # again and the other updated back, both to the CIDs the state holds: without the marks the
    # refetch sees no difference and the consumer keeps neither.
    stream, gone, changed = make_revert_stream()
    did = next(iter(stream.accounts))
    path, killed = tmp_path / "state.sqlite", tmp_path / "killed.sqlite"
    seen: list[str] = []

    def kill(event: RecordEvent | RepoEvent) -> bool:
        if isinstance(event, RecordEvent) and event.live:
            seen.append(f"{event.collection}/{event.rkey}")
        if len(seen) < 2:
            return False
        committed_copy(path, killed)
        return True

    with FirehoseServer(stream.messages) as relay, RepoHost() as host:
        serve(host, stream)
        first = await run_sync(stream, relay.url, host, path, stop_when=kill, commit_every=1)
        assert sorted(seen) == sorted([gone, changed])
        with FirehoseServer(stream.messages[1:]) as relay2:  # the commit is not sent again: a gap
            second = await run_sync(stream, relay2.url, host, killed)
        assert len(host.fetches(did)) == 2
    final = walk_final(stream, did)
    again = {f"{e.collection}/{e.rkey}": (e.action, e.cid) for e in second.events if isinstance(e, RecordEvent)}
    assert again.get(gone) == ("update", final[gone]) and again.get(changed) == ("update", final[changed])
    records: dict[str, dict[str, str]] = {}
    for event in first.events + second.events:
        if isinstance(event, RecordEvent):
            apply(records, event)
    assert records[did] == final
