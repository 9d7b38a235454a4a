"""The backfill spread over local worker processes (``processes=N``, ``repo_stream.backfill.process_pool``),
against a real local PDS: the same results as in one process, the work in the workers, a worker
that dies, cancelling, the checkpoint and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from repo_stream import Commit
from repo_stream.backfill import BackfillResult, backfill
from repo_stream.cli import main

from .backfill_server import RepoHost, car_reply, repo_car_of
from .servers import Reply, json_reply
from .test_backfill import CARS, DID_2000, FAST, RECORD_BYTES, REPO_2000, SIZES, by_source, did_of, run_all, unlinked_in

#: Worker processes are fresh interpreters: a run takes a second or so more than in one process.
pytestmark = pytest.mark.anyio


@pytest.fixture
def host() -> Iterator[RepoHost]:
    with RepoHost() as server:
        yield server


class PidSink:
    """Writes, for each repo, the process that walked it and its record count: ``DIR/<did>``.
    With ``die_in_workers``, a worker process (not the one that made the sink) dies mid-repo
    on the first repo it walks."""

    def __init__(self, directory: Path, die_in_workers: bool = False) -> None:
        self.directory = directory
        self.die_in_workers = die_in_workers
        self.maker = os.getpid()

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        if self.die_in_workers and os.getpid() != self.maker:
            os._exit(3)
        path = self.directory / commit.did
        count = int(path.read_text().split()[1]) if path.exists() else 0
        path.write_text(f"{os.getpid()} {count + len(items)}")


def worker_processes() -> list[int]:
    """Pids of this process's children that are backfill worker processes."""
    me = str(os.getpid())
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = f.read().rpartition(")")[2].split()[1]
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        if parent == me and b"repo_stream.backfill.worker" in command:
            pids.append(int(entry))
    return pids


class ImportsSink:
    """Writes, for each repo, the process that walked it and what it could import there:
    ``DIR/<did>`` = ``PID TRIO CLICK HTTPCORE_TRIO`` (trio's and click's module names, and
    whether httpcore was imported with its trio support)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        import click
        import httpcore._synchronization
        import trio

        support = "with-trio" if httpcore._synchronization.trio is not None else "without-trio"
        (self.directory / commit.did).write_text(f"{os.getpid()} {trio.__name__} {click.__name__} {support}")


async def test_a_worker_hides_trio_and_click_only_while_httpx_imports(host: RepoHost, tmp_path: Path) -> None:
    # A worker imports httpx and httpcore with trio and click hidden (start-up time); a sink in
    # it imports both afterwards all the same.
    urls = [host.repo(did_of(50 + i), car_reply(repo_car_of(did_of(50 + i), 3))) for i in range(8)]
    results = await run_all(urls, processes=2, memory_workers=1, fetch_concurrency=1, sink=ImportsSink(tmp_path))
    assert sorted((r.source, r.records, r.error) for r in results) == sorted((url, 3, None) for url in urls)
    seen = {tuple(path.read_text().split()) for path in tmp_path.iterdir()}
    assert {line[1:] for line in seen if line[0] != str(os.getpid())} == {("trio", "click", "without-trio")}
    assert {line[1:] for line in seen if line[0] == str(os.getpid())} == {("trio", "click", "with-trio")}


def test_frames_read_messages_split_anywhere() -> None:
    # The pipes' framing (a 4-byte length and a pickle): messages cut at any byte, several in
    # one read, and the pipe's end.
    from repo_stream.backfill.process_pool import _Frames, _message

    read_end, write_end = os.pipe()
    frames = _Frames(read_end)
    data = b"".join(_message(m) for m in ["a", None, ("result", 7), "b" * 70_000, False])
    got: list[Any] = []
    for start in range(0, len(data), 3):  # 3 bytes at a time: every header is cut somewhere
        os.write(write_end, data[start : start + 3])
        messages = frames.read()
        assert messages is not None
        got += messages
    os.write(write_end, data[:5])  # a message cut off by the end of the pipe is dropped
    assert frames.read() == []
    os.close(write_end)
    assert frames.read() is None
    os.close(read_end)
    assert got == ["a", None, ("result", 7), "b" * 70_000, False]


def test_the_hand_out_gives_a_worker_process_its_pipeline_and_the_slack() -> None:
    # This process's executor holds its pipeline (4 sources here); a worker process 16 more,
    # which wait in its pipe while this process is busy; either way, under the pipe's budget.
    from repo_stream.backfill.process_pool import _SLACK, _Local, _Worker

    assert _SLACK == 16
    local = _Local()
    worker = object.__new__(_Worker)  # its hand-out state only: no process
    worker.held, worker.held_bytes, worker.budget, worker.finished = [], 0, 1000, False
    while local.has_room(4, 10):
        local.give(f"local-{len(local.held)}", b"")
    while worker.has_room(4, 10):
        worker.held.append(f"worker-{len(worker.held)}")
        worker.held_bytes += 10
    assert (len(local.held), len(worker.held)) == (4, 20)
    worker.held, worker.held_bytes = ["big"], 995
    assert not worker.has_room(4, 10)  # the pipe's budget
    worker.held, worker.held_bytes = [], 0
    assert worker.has_room(4, 5000)  # any one source goes to a worker that holds none
    worker.finished = True
    assert not worker.has_room(4, 10)


async def test_two_processes_give_every_input_its_one_result(host: RepoHost, tmp_path: Path) -> None:
    good = {did: host.repo(did, car_reply(car)) for did, car in CARS.items()}
    d404, d500, cut, wrong = (did_of(i) for i in range(30, 34))
    u404 = host.repo(d404, json_reply({"error": "RepoNotFound", "message": "Could not find repo"}, status=404))
    u500 = host.repo(d500, Reply(status=500))
    cut_car = repo_car_of(cut, 60)
    u_cut = host.repo(cut, car_reply(cut_car, send=len(cut_car) // 2))
    u_wrong = host.repo(wrong, car_reply(CARS[did_of(2)]))
    missing = str(tmp_path / "missing.car")
    inputs = [*good.values(), u404, u500, u_cut, u_wrong, missing, good[did_of(4)]]
    seen = tmp_path / "seen"
    seen.mkdir()

    results = await run_all(inputs, processes=2, memory_workers=1, mem_limit_mb=0.01, sink=PidSink(seen))

    assert Counter(r.source for r in results) == Counter(inputs)
    got = {r.source: r for r in results}
    for i, (did, url) in enumerate(good.items()):
        assert (got[url].did, got[url].rev, got[url].records, got[url].record_bytes, got[url].error) == (
            did, "3kaaaaaaaaaaa", SIZES[i], RECORD_BYTES[did], None
        )  # fmt: skip
    assert any(r.spilled for r in results)  # past 0.01 MiB: finished by a worker's disk worker
    assert got[u404].error is not None and "HTTP 404" in got[u404].error and got[u404].did == d404
    assert got[u500].error is not None and "HTTP 500" in got[u500].error
    assert got[u_cut].error is not None and "cut off" in got[u_cut].error
    assert got[u_wrong].error is not None and got[u_wrong].error.startswith("IdentityError")
    assert got[missing].error is not None and got[missing].error.startswith("SourceError")
    walked = {path.name: tuple(map(int, path.read_text().split())) for path in seen.iterdir()}
    assert {did: n for did, (_, n) in walked.items()} == {did: n * (2 if did == did_of(4) else 1) for did, n in zip(CARS, SIZES, strict=True) if n}
    pids = {pid for pid, _ in walked.values()}
    assert len(pids) == 2 and os.getpid() in pids  # walked in this process and in the one worker process
    assert worker_processes() == []


async def test_a_worker_that_dies_fails_only_the_repos_it_held(host: RepoHost, tmp_path: Path) -> None:
    urls = [host.repo(did_of(40 + i), car_reply(repo_car_of(did_of(40 + i), 5 + i))) for i in range(12)]
    results = await run_all(urls, processes=3, memory_workers=1, fetch_concurrency=1, sink=PidSink(tmp_path, die_in_workers=True))

    assert Counter(r.source for r in results) == Counter(urls)
    failed = [r for r in results if r.error is not None]
    assert all(r.error is not None and r.error.startswith("WorkerError: worker process") and "exited with code 3" in r.error for r in failed)
    assert 2 <= len(failed) <= 8  # each worker process dies on its first repo with what it holds: all but this process's 4
    ok = {r.source: r.records for r in results if r.error is None}
    assert ok == {url: 5 + i for i, url in enumerate(urls) if url in ok}
    assert len(ok) >= len(urls) - 8  # this process's executor walked the rest
    assert worker_processes() == []


async def test_cancelling_stops_the_workers_and_leaves_no_spill_file(host: RepoHost, tmp_path: Path) -> None:
    host.repo(DID_2000, car_reply(REPO_2000.read_bytes(), chunk=8192, delay=0.03))  # ~1 s a repo
    spill = tmp_path / "spill"
    spill.mkdir()
    seen: list[BackfillResult] = []

    async def consume() -> None:
        options: dict[str, Any] = {"processes": 2, "mem_limit_mb": 0.05, "spill_dir": spill, "fetch_options": FAST}
        async with aclosing(backfill([host.repo_url(DID_2000)] * 6, **options)) as results:
            async for result in results:
                seen.append(result)

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            while not (unlinked_in(spill) and any(unlinked_in(spill, pid) for pid in worker_processes())):  # both are spilling
                await anyio.sleep(0.01)
            assert list(spill.iterdir()) == []  # the stores' files have no name
            tg.cancel_scope.cancel()
    assert seen == []
    assert list(spill.iterdir()) == []
    assert worker_processes() == []


async def test_a_checkpointed_run_in_processes_is_not_run_again(host: RepoHost, tmp_path: Path) -> None:
    urls = [host.repo(did, car_reply(car)) for did, car in CARS.items()]
    checkpoint = tmp_path / "run.db"
    first = await run_all(urls, processes=2, checkpoint=checkpoint)
    assert sorted((r.source, r.records, r.error) for r in first) == sorted(zip(urls, SIZES, [None] * len(urls), strict=True))
    assert len(host.fetches()) == len(urls)
    again = await run_all(urls, processes=2, checkpoint=checkpoint)
    assert len(host.fetches()) == len(urls)  # nothing fetched (and no worker needed) again
    assert [r.source for r in again] == urls and all(r.skipped for r in again)


async def test_processes_argument_checks(host: RepoHost) -> None:
    with pytest.raises(ValueError, match="processes must be at least 1"):
        await run_all([], processes=0)
    async with httpx.AsyncClient() as client:
        with pytest.raises(ValueError, match="client and dns_resolver cannot be sent"):
            await run_all([], processes=2, client=client)

    async def local_sink(source: str, commit: Commit, items: list[Any]) -> None:
        pass

    with pytest.raises(ValueError, match="must be picklable"):
        await run_all([host.repo_url(DID_2000)], processes=2, sink=local_sink)


def test_cli_processes(host: RepoHost, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    urls = [host.repo(did, car_reply(car)) for did, car in CARS.items()]
    listing = tmp_path / "repos.txt"
    listing.write_text("\n".join(urls) + "\n")
    out = tmp_path / "out"
    assert main(["backfill", "--repos", str(listing), "--json", "--processes", "2", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines()]
    assert sorted((line["repo"], line["records"], line["error"]) for line in lines) == sorted(zip(urls, SIZES, [None] * 5, strict=True))
    assert "5 repos" in captured.err and "0 failed" in captured.err
    assert sorted(os.listdir(out)) == sorted(f"{did}.jsonl" for did in CARS)
    assert len((out / f"{did_of(4)}.jsonl").read_text().splitlines()) == SIZES[4]
    with pytest.raises(SystemExit) as usage:
        main(["backfill", "--repos", str(listing), "--processes", "2", "--dask", "local"])
    assert usage.value.code == 2
    assert "--processes is for one machine" in capsys.readouterr().err


@pytest.mark.parametrize("processes", ["1", "2"])
def test_cli_closed_stdout_ends_quietly(tmp_path: Path, processes: str) -> None:
    """``backfill --json | head -1``: no traceback from any process, exit 141."""
    listing = tmp_path / "repos.txt"
    listing.write_text(f"{REPO_2000}\n" * 200)
    command = [sys.executable, "-m", "repo_stream", "backfill", "--repos", str(listing), "--json", "--processes", processes]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    first = json.loads(child.stdout.readline())
    child.stdout.close()  # while the run goes on: its next line cannot be written
    status = child.wait(timeout=60)
    err = child.stderr.read()
    child.stderr.close()
    assert (first["records"], first["error"]) == (2000, None)
    assert err == b""
    assert status == 141
    assert worker_processes() == []


async def test_long_sources_each_get_their_one_result(host: RepoHost, tmp_path: Path) -> None:
    # Sources of 12 KB (a window of them is more than a 64 KiB pipe holds: the hand-out keeps a
    # worker's held sources under half its pipe) and one of 200 KB, written to the pipe in several
    # pieces while the worker reads it, go through whole.
    url = host.repo(DID_2000, car_reply(REPO_2000.read_bytes()))
    long_paths = [f"{tmp_path}/{i:03d}/" + ("d" * 200 + "/") * 60 + "repo.car" for i in range(60)]
    huge = str(tmp_path / ("h" * 200_000))
    inputs = [huge, *long_paths, url]
    results = await run_all(inputs, processes=2, memory_workers=2, fetch_concurrency=8)
    assert Counter(r.source for r in results) == Counter(inputs)
    got = by_source(results)
    assert (got[url].records, got[url].error) == (2000, None)
    for source in [huge, *long_paths]:
        assert got[source].error is not None and got[source].error.startswith("SourceError"), got[source].error[:200]
