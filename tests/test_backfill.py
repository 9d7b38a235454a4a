"""The backfill executor, its checkpoint, its sources and its CLI, against a real local PDS.

The server (tests/backfill_server.py) answers getRepo per DID: whole, slow, truncated, 404, 500,
too slow, another account's repo. Every test is bounded by ``fail_after``; timeouts and backoffs
are in milliseconds.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest
from multiformats import multibase

from repo_stream import Commit, DriverBuilder
from repo_stream.backfill import (
    BackfillResult,
    BackfillStats,
    Checkpoint,
    backfill,
    host_sources,
    list_repos,
    read_repo_list,
)
from repo_stream.cli import main
from repo_stream.core.cid import cid_str, dag_cbor_cid
from repo_stream.errors import FetchError, SignatureError, SourceError
from repo_stream.net.fetch import FetchOptions

from .backfill_server import LIST_REPOS, RepoHost, car_reply, repo_car_of, repo_records
from .helpers import sqlite_temp_files
from .servers import TRANSIENT_FAILURES, Reply, json_reply

ROOT = Path(__file__).resolve().parents[1]
REPO_2000 = ROOT / "fixtures" / "repo-2000-shuffled.car"
EXPECTED = json.loads((ROOT / "fixtures" / "expected.json").read_text())
DID_2000 = EXPECTED["repo-2000-shuffled.car"]["did"]
FAST = FetchOptions(connect_timeout=1, read_timeout=0.5, retries=1, backoff=0.01, max_backoff=0.02, max_retry_after=1)


def did_of(i: int) -> str:
    """A valid did:plc (24 base32 characters) for test account ``i``."""
    return "did:plc:" + base64.b32encode(i.to_bytes(15, "big")).decode().lower()


SIZES = [0, 1, 5, 30, 120]
CARS = {did_of(i): repo_car_of(did_of(i), n) for i, n in enumerate(SIZES)}
RECORD_BYTES = {did_of(i): sum(len(block) for _, block in repo_records(did_of(i), n)) for i, n in enumerate(SIZES)}


@pytest.fixture
def host() -> Iterator[RepoHost]:
    with RepoHost() as server:
        yield server


async def run_all(sources: Any, **options: Any) -> list[BackfillResult]:
    options.setdefault("fetch_options", FAST)
    with anyio.fail_after(20):
        async with aclosing(backfill(sources, **options)) as results:
            return [r async for r in results]


def unlinked_in(folder: Path, pid: int | str = "self") -> list[str]:
    """Files in ``folder`` that process ``pid`` holds open after they were unlinked (spill stores)."""
    return [t for t in sqlite_temp_files(pid) if t.startswith(f"{folder}/") and t.endswith(" (deleted)")]


def by_source(results: list[BackfillResult]) -> dict[str, BackfillResult]:
    return {r.source: r for r in results}


# --- one result per input, whatever each repo does -------------------------------------------


@pytest.mark.anyio
async def test_every_input_gets_exactly_one_result(host: RepoHost, tmp_path: Path) -> None:
    good = {did: host.repo(did, car_reply(car)) for did, car in CARS.items()}
    d404, d500, slow, too_slow, cut, wrong, via_plc = (did_of(i) for i in range(10, 17))
    u404 = host.repo(d404, json_reply({"error": "RepoNotFound", "message": "Could not find repo"}, status=404))
    u500 = host.repo(d500, Reply(status=500))
    slow_car = repo_car_of(slow, 60)
    u_slow = host.repo(slow, car_reply(slow_car, chunk=1000, delay=0.005))
    u_too_slow = host.repo(too_slow, car_reply(repo_car_of(too_slow, 3), head_delay=3))
    cut_car = repo_car_of(cut, 60)
    u_cut = host.repo(cut, car_reply(cut_car, send=len(cut_car) // 2))
    u_wrong = host.repo(wrong, car_reply(CARS[did_of(2)]))  # another account's repo
    host.repo(via_plc, car_reply(repo_car_of(via_plc, 7)))
    host.route("*", f"/{via_plc}", json_reply({
        "id": via_plc, "alsoKnownAs": [], "verificationMethod": [],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": host.base}],
    }))  # fmt: skip
    missing = str(tmp_path / "missing.car")
    inputs = [*good.values(), u404, u500, u_slow, u_too_slow, u_cut, u_wrong, via_plc, missing, good[did_of(1)]]

    stats = BackfillStats()
    results = await run_all(iter(inputs), memory_workers=2, fetch_concurrency=3, plc_url=host.base, stats=stats)

    assert Counter(r.source for r in results) == Counter(inputs)
    got = by_source(results)
    for i, (did, url) in enumerate(good.items()):
        assert (got[url].did, got[url].rev, got[url].records, got[url].record_bytes, got[url].error) == (
            did, "3kaaaaaaaaaaa", SIZES[i], RECORD_BYTES[did], None
        )
    assert got[u_slow].error is None and got[u_slow].records == 60
    assert got[via_plc].error is None and (got[via_plc].did, got[via_plc].records) == (via_plc, 7)
    assert got[u404].error is not None and got[u404].error.startswith("FetchError") and "HTTP 404" in got[u404].error and "RepoNotFound" in got[u404].error
    assert got[u404].did == d404
    assert got[u500].error is not None and "HTTP 500" in got[u500].error and "after 2 attempts" in got[u500].error
    assert len(host.fetches(d500)) == 2
    assert got[u_too_slow].error is not None and got[u_too_slow].error.startswith("FetchError")
    assert got[u_cut].error is not None and got[u_cut].error.startswith("FetchError") and "cut off" in got[u_cut].error
    assert got[u_wrong].error is not None and got[u_wrong].error.startswith("IdentityError")
    assert f"for {did_of(2)}, not {wrong}" in got[u_wrong].error
    assert got[missing].error is not None and got[missing].error.startswith("SourceError")
    assert (stats.inputs, stats.done, stats.failed, stats.skipped) == (len(inputs), len(inputs), 6, 0)
    assert stats.records == sum(SIZES) + SIZES[1] + 60 + 7


@pytest.mark.anyio
async def test_async_iterable_sources_and_argument_checks(host: RepoHost) -> None:
    urls = [host.repo(did, car_reply(car)) for did, car in CARS.items()]

    async def sources() -> Any:
        for url in urls:
            await anyio.lowlevel.checkpoint()
            yield url

    results = await run_all(sources(), memory_workers=1, disk_workers=1)
    assert sorted(r.records for r in results) == sorted(SIZES)
    for bad in ({"memory_workers": 0}, {"disk_workers": 0}, {"mem_limit_mb": 0}, {"disk_queue_size": -1}, {"fetch_concurrency": 0}):
        with pytest.raises(ValueError):
            await run_all(urls, **bad)


# --- spilling, backpressure, cancellation ----------------------------------------------------


class SlowSink:
    """Collects records; sleeps per chunk so the disk worker is the bottleneck."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.records: dict[str, list[tuple[str, str, bytes]]] = {}
        self.finished: dict[str, BaseException | None] = {}

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        self.records.setdefault(source, []).extend(items)
        await anyio.sleep(self.delay)

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        self.finished[source] = error


@pytest.mark.anyio
@pytest.mark.parametrize("queue", [0, 2])
async def test_backpressure_bounds_the_repos_in_memory(tmp_path: Path, queue: int) -> None:
    paths = []
    for i in range(6):
        path = tmp_path / f"repo{i}.car"
        path.write_bytes(REPO_2000.read_bytes())
        paths.append(str(path))
    sink = SlowSink(0.01)
    stats = BackfillStats()
    results = await run_all(
        paths, sink=sink, memory_workers=2, disk_workers=1, disk_queue_size=queue, mem_limit_mb=0.05, stats=stats, spill_dir=tmp_path
    )
    expected = EXPECTED["repo-2000-shuffled.car"]
    assert [(r.records, r.record_bytes, r.spilled, r.error) for r in results] == [(2000, expected["record_bytes"], True, None)] * 6
    # every memory worker holds one repo, the queue `queue` more, the disk worker one: no more, ever
    assert stats.in_memory_peak == 2 + queue + 1
    assert stats.disk_queue_peak == queue
    assert (stats.in_memory, stats.spilled) == (0, 6)
    keys = [k for k, _, _ in sink.records[paths[0]]]
    assert len(keys) == 2000 and keys == sorted(keys)
    _, cid, value = sink.records[paths[0]][0]
    assert cid == cid_str(dag_cbor_cid(value))
    assert set(sink.finished) == set(paths) and all(e is None for e in sink.finished.values())
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".car")] == []


@pytest.mark.anyio
async def test_cancelling_stops_promptly_and_leaves_no_spill_file(host: RepoHost, tmp_path: Path) -> None:
    data = REPO_2000.read_bytes()
    host.repo(DID_2000, car_reply(data, chunk=8192, delay=0.03))  # ~1 s a repo
    spill = tmp_path / "spill"
    spill.mkdir()
    stats = BackfillStats()
    seen: list[BackfillResult] = []

    async def consume() -> None:
        async with aclosing(backfill([host.repo_url(DID_2000)] * 4, mem_limit_mb=0.05, spill_dir=spill, stats=stats, fetch_options=FAST)) as results:
            async for result in results:
                seen.append(result)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            while not unlinked_in(spill):  # a disk worker's store: its files have no name
                await anyio.sleep(0.01)
            assert list(spill.iterdir()) == []
            started = time.monotonic()
            tg.cancel_scope.cancel()
    assert time.monotonic() - started < 1.0
    assert seen == []
    assert list(spill.iterdir()) == [] and unlinked_in(spill) == []  # the stores are closed
    assert stats.in_memory == 0


# --- checkpoint ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_checkpoint_skips_finished_repos_and_retries_failures(host: RepoHost, tmp_path: Path) -> None:
    urls = [host.repo(did, car_reply(car)) for did, car in CARS.items()]
    bad = did_of(20)
    urls.append(host.repo(bad, [Reply(status=404), car_reply(repo_car_of(bad, 4))]))
    checkpoint = tmp_path / "run.db"

    first = by_source(await run_all(urls, checkpoint=checkpoint))
    assert len(first) == 6 and not any(r.skipped for r in first.values())
    assert first[urls[-1]].error is not None and "HTTP 404" in first[urls[-1]].error
    assert len(host.fetches()) == 6

    second = await run_all(urls, checkpoint=checkpoint)
    assert len(host.fetches()) == 6  # nothing fetched again
    assert [r.source for r in second] == urls and all(r.skipped for r in second)
    assert {r.source: (r.did, r.rev, r.records, r.record_bytes, r.error) for r in second} == {
        s: (r.did, r.rev, r.records, r.record_bytes, r.error) for s, r in first.items()
    }

    third = by_source(await run_all(urls, checkpoint=checkpoint, retry_failed=True))
    assert len(host.fetches()) == 7 and len(host.fetches(bad)) == 2
    assert (third[urls[-1]].skipped, third[urls[-1]].error, third[urls[-1]].records) == (False, None, 4)
    assert sum(r.skipped for r in third.values()) == 5
    store = Checkpoint(checkpoint)
    assert store.counts_sync() == {"ok": 6}
    store.close_sync()


def test_kill_and_resume_fetches_no_finished_repo_again(host: RepoHost, tmp_path: Path) -> None:
    dids = [did_of(100 + i) for i in range(9)]
    for did in dids:
        host.repo(did, car_reply(repo_car_of(did, 3), head_delay=0.1))
    listing = tmp_path / "repos.txt"
    listing.write_text("# accounts\n\n" + "\n".join(host.repo_url(d) for d in dids) + "\n")
    checkpoint = tmp_path / "run.db"
    command = [sys.executable, "-m", "repo_stream", "backfill", "--repos", str(listing), "--checkpoint", str(checkpoint),
               "--json", "--memory-workers", "1", "--fetch-concurrency", "1"]  # fmt: skip

    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert child.stdout is not None
    printed = [json.loads(child.stdout.readline()) for _ in range(4)]
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    fetched_before = Counter(r.query for r in host.fetches())
    assert 4 <= len(fetched_before) < len(dids)

    rerun = subprocess.run(command, check=False, capture_output=True, text=True, timeout=30)
    assert rerun.returncode == 0, rerun.stderr
    lines = [json.loads(line) for line in rerun.stdout.splitlines()]
    assert sorted(r["repo"] for r in lines) == sorted(host.repo_url(d) for d in dids)
    done = {r["repo"] for r in printed}
    for result in lines:
        assert result["skipped"] == (result["repo"] in done)
        assert (result["records"], result["error"]) == (3, None)
    for did in dids:  # a repo printed before the kill was never fetched again
        assert len(host.fetches(did)) == (1 if host.repo_url(did) in done else len(host.fetches(did)))
        assert len(host.fetches(did)) >= 1
    assert sum(len(host.fetches(d)) for d in dids if host.repo_url(d) in done) == len(done)
    assert "9 repos" in rerun.stderr and f"{len(done)} skipped" in rerun.stderr


# --- where repos come from -------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_repos_follows_the_cursor(host: RepoHost) -> None:
    dids = [did_of(200 + i) for i in range(6)]
    host.listing([
        [{"did": dids[0], "head": "x", "rev": "r"}, {"did": dids[1]}],
        [{"did": dids[2]}, {"did": dids[3], "active": False, "status": "deactivated"}],
        [{"did": dids[4]}, {"did": dids[5], "active": True}],
    ])  # fmt: skip
    for did in dids:
        host.repo(did, car_reply(repo_car_of(did, 2)))
    listed = [d async for d in list_repos(host.base, page_size=2)]
    assert listed == [dids[0], dids[1], dids[2], dids[4], dids[5]]
    pages = [r.query for r in host.requests if r.path == LIST_REPOS]
    assert pages == ["limit=2", "limit=2&cursor=page1", "limit=2&cursor=page2"]
    assert [d async for d in list_repos(host.base, include_inactive=True)] == dids

    results = await run_all(host_sources(host.base))
    assert sorted((r.did, r.records, r.error) for r in results) == sorted((d, 2, None) for d in listed)


@pytest.mark.anyio
async def test_a_listing_that_fails_part_way_raises_after_the_repos_read(host: RepoHost) -> None:
    did = did_of(300)
    host.repo(did, car_reply(repo_car_of(did, 2)))
    host.route("*", LIST_REPOS, json_reply({"repos": [{"did": did}], "cursor": "next"}))
    host.route("*", f"{LIST_REPOS}?cursor=next", Reply(status=502))
    seen = []
    with pytest.raises(FetchError, match=r"HTTP 502 .*\(after 2 attempts\)$"):
        async with aclosing(backfill(host_sources(host.base, retries=1, backoff=0.01), fetch_options=FAST)) as results:
            async for result in results:
                seen.append(result)
    assert [(r.did, r.records) for r in seen] == [(did, 2)]
    assert [r.query for r in host.requests if r.path == LIST_REPOS] == ["limit=1000", "limit=1000&cursor=next", "limit=1000&cursor=next"]


@pytest.mark.anyio
@pytest.mark.parametrize("failure", TRANSIENT_FAILURES)
async def test_a_listing_page_that_fails_transiently_is_asked_again(host: RepoHost, failure: Reply) -> None:
    dids = [did_of(310 + i) for i in range(3)]
    host.route("*", LIST_REPOS, json_reply({"repos": [{"did": dids[0]}], "cursor": "next"}))
    host.route("*", f"{LIST_REPOS}?cursor=next", [failure, failure, json_reply({"repos": [{"did": d} for d in dids[1:]]})])
    listed = [d async for d in list_repos(host.base, retries=2, backoff=0.01)]
    assert listed == dids
    assert [r.query for r in host.requests if r.path == LIST_REPOS] == ["limit=1000"] + ["limit=1000&cursor=next"] * 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [{"Retry-After": "120"}, {"RateLimit-Reset": "120"}, {"RateLimit-Reset": str(int(time.time()) + 3600)}],
    ids=["retry-after", "ratelimit-reset-seconds", "ratelimit-reset-unix-time"],
)
async def test_a_listing_host_asking_for_a_long_wait_fails_at_once(host: RepoHost, headers: dict[str, str]) -> None:
    host.route("*", LIST_REPOS, Reply(status=429, headers=headers))
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"listRepos .*: HTTP 429 \(application/octet-stream\); the host asks to retry after [\d.]+ s, more than the 60 s allowed$") as caught:
        [d async for d in list_repos(host.base, retries=3, backoff=5)]
    assert time.monotonic() - started < 3
    assert caught.value.retry_after is not None and caught.value.retry_after > 60 and caught.value.status == 429
    assert len([r for r in host.requests if r.path == LIST_REPOS]) == 1


@pytest.mark.anyio
async def test_a_listing_page_that_keeps_failing_fails_after_the_retries(host: RepoHost) -> None:
    host.route("*", LIST_REPOS, Reply(status=503, body=b"overloaded", content_type="text/plain"))
    with pytest.raises(FetchError, match=r"listRepos .*: HTTP 503 \(text/plain\): overloaded \(after 3 attempts\)$") as caught:
        [d async for d in list_repos(host.base, retries=2, backoff=0.01)]
    assert caught.value.status == 503
    assert len([r for r in host.requests if r.path == LIST_REPOS]) == 3
    host.route("*", LIST_REPOS, Reply(status=400, body=b"bad", content_type="text/plain"))
    with pytest.raises(FetchError, match=r"HTTP 400 \(text/plain\): bad$"):  # not transient: no second try
        [d async for d in list_repos(host.base, retries=2, backoff=0.01)]
    assert len([r for r in host.requests if r.path == LIST_REPOS]) == 4


@pytest.mark.anyio
async def test_read_repo_list_skips_blanks_and_comments(tmp_path: Path) -> None:
    listing = tmp_path / "list.txt"
    listing.write_text("# header\n\n  did:plc:a  \n#x\nalice.test\n")
    assert [s async for s in read_repo_list(str(listing))] == ["did:plc:a", "alice.test"]


@pytest.mark.anyio
async def test_read_repo_list_from_standard_input() -> None:
    listed = [s async for s in read_repo_list("-", stdin=io.BytesIO(b"# header\n did:plc:a \n\nalice.test"))]
    assert listed == ["did:plc:a", "alice.test"]
    with pytest.raises(SourceError, match=r"^cannot read repo list standard input: not UTF-8 text \(invalid start byte\)$"):
        [s async for s in read_repo_list("-", stdin=io.BytesIO(b"did:plc:a\n\xff\n"))]


# --- verify ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_verify_checks_block_cids(host: RepoHost) -> None:
    did = did_of(400)
    car = bytearray(repo_car_of(did, 5))
    at = car.rindex(b"xxxx")
    car[at] = ord("y")  # one record's bytes no longer match its CID
    url = host.repo(did, car_reply(bytes(car)))
    [plain] = await run_all([url])
    assert (plain.error, plain.records) == (None, 5)
    [checked] = await run_all([url], verify=True)
    assert checked.error is not None and checked.error.startswith("CidMismatchError")


@pytest.mark.anyio
async def test_verify_with_a_wrong_signing_key(host: RepoHost) -> None:
    did = did_of(401)
    host.repo(did, car_reply(repo_car_of(did, 3)))  # unsigned: no key can verify it
    key = multibase.encode(bytes([0x80, 0x24, 0x02]) + bytes(range(1, 33)), "base58btc")
    host.route("*", f"/{did}", json_reply({
        "id": did, "alsoKnownAs": [],
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": key}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": host.base}],
    }))  # fmt: skip
    [plain] = await run_all([did], plc_url=host.base)
    assert plain.error is None
    [checked] = await run_all([did], plc_url=host.base, verify=True)
    assert checked.error is not None and checked.error.startswith("SignatureError")


def _signed_file(folder: Path, name: str, did: str) -> tuple[Path, str]:
    """A CAR of 6 records signed with a new secp256k1 key: its path and the key's did:key."""
    import functools

    from cryptography.hazmat.primitives.asymmetric import ec

    from repo_stream.crypto.didkey import format_did_key
    from repo_stream.crypto.signature import sign
    from repo_stream.records.writer import build_repo_car

    private = ec.generate_private_key(ec.SECP256K1())
    path = folder / name
    build_repo_car(repo_records(did, 6), did=did, rev="3kaaaaaaaaaab", path=path, sign=functools.partial(sign, private))
    return path, format_did_key(private.public_key())


@pytest.mark.anyio
@pytest.mark.parametrize("processes", [1, 2])
async def test_verify_modes_and_one_signing_key_on_local_files(tmp_path: Path, processes: int) -> None:
    """Offline: ``verify="cids"`` checks CIDs and MST rules only, ``signing_key`` replaces the DID
    documents; each result says what was checked, also from worker processes."""
    first, key = _signed_file(tmp_path, "first.car", did_of(410))
    second, _ = _signed_file(tmp_path, "second.car", did_of(411))
    paths = [str(first), str(second)]

    def outcome(results: list[BackfillResult]) -> dict[str, tuple[int, str | None, str | None]]:
        return {Path(r.source).name: (r.records, r.verified, r.error and r.error.partition(":")[0]) for r in results}

    got = outcome(await run_all(paths, verify="cids", processes=processes))
    assert got == {"first.car": (6, "cids", None), "second.car": (6, "cids", None)}
    got = outcome(await run_all(paths, verify=True, signing_key=key, processes=processes))
    assert got == {"first.car": (6, "cids+signature", None), "second.car": (0, None, "SignatureError")}
    assert outcome(await run_all(paths, processes=processes)) == {"first.car": (6, None, None), "second.car": (6, None, None)}


@pytest.mark.anyio
async def test_verify_options_are_checked_up_front() -> None:
    key = "did:key:zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU76E"
    with pytest.raises(ValueError, match="signing_key is for verifying signatures"):
        await run_all(["x.car"], verify="cids", signing_key=key)
    with pytest.raises(ValueError, match="signing_key is for verifying signatures"):
        await run_all(["x.car"], signing_key=key)
    with pytest.raises(ValueError, match="verify must be False, True, 'cids' or 'signature', got 'all'"):
        await run_all(["x.car"], verify="all")
    with pytest.raises(SignatureError, match="did:key 'did:key:z'"):
        await run_all(["x.car"], verify=True, signing_key="did:key:z")


# --- the command line ------------------------------------------------------------------------


def test_cli_json_and_out(host: RepoHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    urls = [host.repo(did, car_reply(car)) for did, car in CARS.items()]
    bad = host.repo(did_of(500), Reply(status=404))
    listing = tmp_path / "repos.txt"
    listing.write_text("\n".join([*urls, bad]) + "\n")
    out = tmp_path / "out"
    assert main(["backfill", "--repos", str(listing), "--json", "--out", str(out), "--mem-limit-mb", "0.01"]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert len(lines) == 6
    keys = {"repo", "did", "rev", "records", "record_bytes", "spilled", "seconds", "error", "skipped", "verified"}
    assert all(set(line) == keys and line["verified"] is None for line in lines)
    got = {line["repo"]: line for line in lines}
    assert got[bad]["error"].startswith("FetchError") and got[bad]["did"] == did_of(500)
    assert [got[u]["records"] for u in urls] == SIZES
    assert "6 repos" in captured.err and "1 failed" in captured.err
    assert sorted(os.listdir(out)) == sorted(f"{did}.jsonl" for did in CARS)
    rows = [json.loads(line) for line in (out / f"{did_of(4)}.jsonl").read_text().splitlines()]
    assert len(rows) == 120 and [r["key"] for r in rows] == sorted(r["key"] for r in rows)
    assert rows == anyio.run(_dump_rows, CARS[did_of(4)])  # the dump format: {"key", "cid", "value"}
    assert all(did_of(4) in json.dumps(row["value"]) for row in rows[:5])
    assert (out / f"{did_of(0)}.jsonl").read_text() == ""


async def _dump_rows(car: bytes) -> list[dict[str, object]]:
    from repo_stream.records.values import record_json

    driver = await DriverBuilder().with_record_cids(True).with_block_processor(record_json).load_car(car)
    return [{"key": k, "cid": c, "value": v} async for k, c, v in driver]


def test_cli_errors_and_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["backfill", "--repos", str(tmp_path / "nope.txt")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "nope.txt" in err
    for argv in (["backfill"], ["backfill", "--repos", "x", "--host", "y"], ["backfill", "--repos", "x", "--memory-workers", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    capsys.readouterr()


def test_cli_human_output_from_stdin(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "repo_stream", "backfill", "--repos", "-"], check=False,
        input=f"{REPO_2000}\n{tmp_path / 'missing.car'}\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header == "source\tdid\trev\trecords\tverified\tstatus"
    rows = {line.split("\t")[0]: line.split("\t") for line in lines}
    assert rows[str(REPO_2000)] == [str(REPO_2000), DID_2000, EXPECTED["repo-2000-shuffled.car"]["rev"], "2000", "-", "ok"]
    assert rows[str(tmp_path / "missing.car")][4] == "-"
    assert rows[str(tmp_path / "missing.car")][5].startswith("SourceError")
    assert len(rows) == 2
    assert "2 repos" in done.stderr and "1 failed" in done.stderr


class RecordingSink:
    """Records what the executor tells it."""

    keyed_by_did = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        self.calls.append(("records", source, None))

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        self.calls.append(("finish", source, None if error is None else type(error).__name__))


@pytest.mark.anyio
async def test_a_duplicate_is_not_finished_in_the_sink() -> None:
    """A duplicate never reached the sink; telling the sink it failed would end the first
    source's output for that DID, maybe mid-write (JsonlSink closed the first's file and removed
    its .part: 'I/O operation on closed file', and no output). Other failures are finished."""
    from repo_stream.backfill.executor import DuplicateRepoError, _Job, _Run

    sink = RecordingSink()
    run = _Run({"sink": sink, "client": None}, BackfillStats())
    car = (Path(__file__).resolve().parents[1] / "fixtures" / "repo-100.car").read_bytes()
    driver = await DriverBuilder().load_car(car)
    commit = driver.commit
    assert commit is not None
    duplicate = DuplicateRepoError("b: a duplicate of a", did=commit.did, first="a")
    job = _Job("b", 0.0, commit=commit)
    assert await run.finish_sink(job, duplicate) is duplicate
    other = ValueError("boom")
    assert await run.finish_sink(_Job("c", 0.0, commit=commit), other) is other
    assert sink.calls == [("finish", "c", "ValueError")]
    run.claims.close()
