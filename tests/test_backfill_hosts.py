"""Per-host politeness of the backfill and of fetches (repo_stream.net.hosts), the refetch of a
truncated or incomplete getRepo answer, and the listReposByCollection source, against real local
servers on 127.0.0.1 (tests/backfill_server.py). Two servers are two hosts (their ports differ).

Timing assertions compare orders and server-side arrival times with wide margins (a 2 s
Retry-After is asserted as "no request within 1.9 s"); every test is bounded by ``fail_after``.
"""

from __future__ import annotations

import base64
import email.utils
import itertools
import json
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import pytest

from repo_stream import DriverBuilder
from repo_stream.backfill import BackfillResult, BackfillStats, JsonlSink, backfill, collection_sources, list_repos_by_collection
from repo_stream.cli import main
from repo_stream.errors import FetchError, MissingBlockError, UnsupportedMethodError
from repo_stream.net.fetch import FetchOptions, fetch_car
from repo_stream.net.hosts import HostLimiter, host_key

from .backfill_server import BY_COLLECTION, RepoHost, car_reply, repo_car_of
from .servers import Reply, json_reply

FAST = FetchOptions(connect_timeout=2, read_timeout=2, retries=2, backoff=0.01, max_backoff=0.02, max_retry_after=5)


def did_of(i: int) -> str:
    """A valid did:plc for test account ``i``."""
    return "did:plc:" + base64.b32encode(i.to_bytes(15, "big")).decode().lower()


@pytest.fixture
def host() -> Iterator[RepoHost]:
    with RepoHost() as server:
        yield server


@pytest.fixture
def other() -> Iterator[RepoHost]:
    with RepoHost() as server:
        yield server


async def run_all(sources: Any, *, seconds: float = 30, **options: Any) -> list[BackfillResult]:
    options.setdefault("fetch_options", FAST)
    with anyio.fail_after(seconds):
        async with aclosing(backfill(sources, **options)) as results:
            return [r async for r in results]


def sections(car: bytes) -> tuple[bytes, list[bytes]]:
    """A CAR's header (with its length varint) and its sections (each with its varint)."""

    def varint(at: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = car[at]
            at += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value, at

    length, at = varint(0)
    header = car[: at + length]
    out = []
    at += length
    while at < len(car):
        start = at
        length, at = varint(at)
        at += length
        out.append(car[start:at])
    return header, out


def cut_on_a_block_boundary(car: bytes, drop: int = 3) -> bytes:
    """``car`` without its last ``drop`` sections: well-formed, but missing blocks."""
    header, blocks = sections(car)
    return header + b"".join(blocks[:-drop])


# --- per-host concurrency ---------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("limit", [1, 2])
async def test_concurrency_per_host_never_exceeds_the_limit(host: RepoHost, other: RepoHost, limit: int) -> None:
    # Slow answers (20 pieces, 10 ms apart), many workers: without the limit they overlap more.
    urls = []
    for i in range(8):
        for server in (host, other):
            did = did_of(100 * (server is other) + i)
            urls.append(server.repo(did, car_reply(repo_car_of(did, 20), chunk=200, delay=0.01)))
    results = await run_all(urls, memory_workers=4, fetch_concurrency=4, per_host_concurrency=limit, per_host_rps=None)
    assert sorted(r.source for r in results if r.error is None and r.records == 20) == sorted(urls)
    assert host.serving_peak == limit and other.serving_peak == limit


@pytest.mark.anyio
async def test_without_a_per_host_limit_the_same_run_overlaps_more(host: RepoHost) -> None:
    # The control of the test above: the server does see more than 2 at once when unlimited.
    urls = [host.repo(did_of(i), car_reply(repo_car_of(did_of(i), 20), chunk=200, delay=0.01)) for i in range(8)]
    results = await run_all(urls, memory_workers=4, fetch_concurrency=4, per_host_concurrency=None, per_host_rps=None)
    assert all(r.error is None for r in results)
    assert host.serving_peak > 2


@pytest.mark.anyio
async def test_with_processes_the_limit_is_shared_out(host: RepoHost) -> None:
    # 2 processes, per_host_concurrency 2: 1 each, so never more than 2 at the host.
    urls = [host.repo(did_of(i), car_reply(repo_car_of(did_of(i), 20), chunk=200, delay=0.01)) for i in range(8)]
    results = await run_all(urls, seconds=60, processes=2, memory_workers=2, per_host_concurrency=2, per_host_rps=None)
    assert sorted(r.source for r in results if r.error is None and r.records == 20) == sorted(urls)
    assert host.serving_peak <= 2


@pytest.mark.anyio
async def test_requests_per_second_per_host(host: RepoHost, other: RepoHost) -> None:
    mine = [host.repo(did_of(i), car_reply(repo_car_of(did_of(i), 2))) for i in range(6)]
    theirs = [other.repo(did_of(50 + i), car_reply(repo_car_of(did_of(50 + i), 2))) for i in range(6)]
    results = await run_all([*mine, *theirs], memory_workers=4, fetch_concurrency=4, per_host_rps=5)
    assert all(r.error is None for r in results) and len(results) == 12
    for server in (host, other):
        times = sorted(r.at for r in server.fetches())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        # 5 per second: sent 0.2 s apart. The server sees the first one late by the client's
        # first connection (up to ~0.2 s here), so its gaps are judged from the second on.
        assert len(times) == 6 and min(gaps[1:]) > 0.15 and times[-1] - times[1] > 0.7, gaps
    # The two hosts are paced side by side, not one after the other: each host's first request
    # came before the other's last.
    for one, two in ((host, other), (other, host)):
        assert min(r.at for r in one.fetches()) < max(r.at for r in two.fetches())


# --- Retry-After holds up only its host -------------------------------------------------------


@pytest.mark.anyio
async def test_a_host_answering_429_waits_while_another_hosts_repos_proceed(host: RepoHost, other: RepoHost) -> None:
    busy = [host.repo(did_of(i), [Reply(status=429, headers={"Retry-After": "2"}), car_reply(repo_car_of(did_of(i), 3))]) for i in range(3)]
    free = [other.repo(did_of(10 + i), car_reply(repo_car_of(did_of(10 + i), 4))) for i in range(5)]
    order: list[str] = []
    with anyio.fail_after(30):
        async with aclosing(backfill([*busy, *free], fetch_options=FAST, memory_workers=2)) as results:
            async for result in results:
                assert result.error is None, result.error
                order.append(result.source)
    # Every repo of the free host finished before any of the busy one's.
    assert order[: len(free)] and set(order[: len(free)]) == set(free) and set(order[len(free) :]) == set(busy)
    # Each busy repo was asked twice (429, then its CAR), the second time after the Retry-After
    # (2 s) that followed the host's first request; between the first requests (sent at 10/s
    # before the first 429 came back, if any) and the end of the wait, nothing.
    first = min(r.at for r in host.fetches())
    for url in busy:
        did = url.rsplit("=", 1)[1]
        assert len(host.fetches(did)) == 2 and host.fetches(did)[1].at - first > 1.9
    assert not [r for r in host.fetches() if 0.5 < r.at - first < 1.9]
    assert max(r.at for r in other.fetches()) - first < 1.9  # the free host was not held up


@pytest.mark.anyio
async def test_retry_after_as_an_http_date_blocks_that_host_for_every_fetch(host: RepoHost, other: RepoHost) -> None:
    when = email.utils.formatdate(time.time() + 3, usegmt=True)  # 2..3 s from now (1 s resolution)
    a, b, c = did_of(1), did_of(2), did_of(3)
    host.repo(a, [Reply(status=503, headers={"Retry-After": when}), car_reply(repo_car_of(a, 1))])
    host.repo(b, car_reply(repo_car_of(b, 1)))
    other.repo(c, car_reply(repo_car_of(c, 1)))
    limiter = HostLimiter(concurrency=4, rps=100)
    times: dict[str, float] = {}

    async def fetch(url: str, did: str, delay: float) -> None:
        await anyio.sleep(delay)
        async with fetch_car(url, did=did, options=FAST, limiter=limiter) as stream:
            driver = await DriverBuilder().load_car(stream)
            assert driver.commit.did == did
        times[did] = time.monotonic()

    with anyio.fail_after(20):
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(fetch, host.repo_url(a), a, 0)
            tg.start_soon(fetch, host.repo_url(b), b, 0.3)  # after the 503: waits for the same date
            tg.start_soon(fetch, other.repo_url(c), c, 0.3)  # another host: not held up
    assert times[c] - started < 1.5
    assert times[a] - started > 1.5 and times[b] - started > 1.5
    assert [r.at - started > 1.5 for r in sorted(host.fetches(), key=lambda r: r.at)] == [False, True, True]
    await anyio.sleep(0.05)  # past the last request's 1 / rps
    assert limiter.hosts() == 0  # idle hosts are forgotten


def test_host_keys_and_limiter_arguments() -> None:
    assert host_key("https://PDS.Example.com/xrpc/x?y=1") == "https://pds.example.com:443"
    assert host_key("http://127.0.0.1:8080/a") == "http://127.0.0.1:8080"
    assert host_key("http://127.0.0.1:8080/a") != host_key("http://127.0.0.1:8081/a")
    for bad in ({"concurrency": 0}, {"rps": 0}, {"rps": float("nan")}, {"max_retry_after": -1}):
        with pytest.raises(ValueError):
            HostLimiter(**bad)


@pytest.mark.anyio
async def test_backfill_checks_its_per_host_arguments() -> None:
    for bad in ({"per_host_concurrency": 0}, {"per_host_rps": 0.0}, {"host_limiter": HostLimiter(), "processes": 2}):
        with pytest.raises(ValueError):
            await run_all([], **bad)


# --- a truncated or incomplete getRepo answer is fetched again ---------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("mem_limit_mb", [64, 0.002], ids=["in-memory", "spilled"])
@pytest.mark.parametrize("per_host", [1, 4])
async def test_a_car_cut_on_a_block_boundary_is_fetched_again_then_reported(
    host: RepoHost, tmp_path: Path, mem_limit_mb: float, per_host: int
) -> None:
    # per_host 1 and one worker of each kind: the repo fetched again keeps its place at the host
    # (were it given back, the next repo's fetch would take it and wait for the busy worker).
    heals, stays = did_of(1), did_of(2)
    heals_car, stays_car = repo_car_of(heals, 300), repo_car_of(stays, 300)
    cut = cut_on_a_block_boundary(heals_car)
    with pytest.raises(MissingBlockError):  # the cut CAR parses, and its walk misses blocks
        driver = await DriverBuilder().load_car(cut)
        while await driver.next_chunk(1000) is not None:
            pass
    u_heals = host.repo(heals, [car_reply(cut), car_reply(cut), car_reply(heals_car)])
    u_stays = host.repo(stays, car_reply(cut_on_a_block_boundary(stays_car)))
    out = tmp_path / "out"
    stats = BackfillStats()
    results = await run_all(
        [u_heals, u_stays], sink=JsonlSink(out), mem_limit_mb=mem_limit_mb, stats=stats,
        memory_workers=1, disk_workers=1, fetch_concurrency=1, per_host_concurrency=per_host,
    )  # fmt: skip
    got = {r.source: r for r in results}
    assert got[u_heals].error is None and got[u_heals].records == 300
    assert got[u_stays].error is not None and got[u_stays].error.startswith("MissingBlockError"), got[u_stays].error
    assert len(host.fetches(heals)) == 3 and len(host.fetches(stays)) == 3  # 1 + FAST.retries
    assert stats.refetched == 4
    # The sink holds exactly the healed repo's records, once each, and nothing of the other.
    lines = (out / f"{heals}.jsonl").read_text().splitlines()
    assert len(lines) == 300 and len({json.loads(line)["key"] for line in lines}) == 300
    assert sorted(p.name for p in out.iterdir()) == [f"{heals}.jsonl"]


@pytest.mark.anyio
async def test_a_file_with_missing_blocks_is_not_retried(host: RepoHost, tmp_path: Path) -> None:
    path = tmp_path / "cut.car"
    path.write_bytes(cut_on_a_block_boundary(repo_car_of(did_of(1), 50)))
    stats = BackfillStats()
    [result] = await run_all([str(path)], stats=stats)
    assert result.error is not None and result.error.startswith("MissingBlockError")
    assert stats.refetched == 0


# --- listReposByCollection --------------------------------------------------------------------

POST = "app.bsky.feed.post"


@pytest.mark.anyio
async def test_list_repos_by_collection_follows_the_cursor(host: RepoHost) -> None:
    dids = [did_of(i) for i in range(5)]
    host.collection_listing(POST, [[{"did": d} for d in dids[:2]], [{"did": d} for d in dids[2:4]], [{"did": dids[4]}, {"did": dids[0]}]])
    with anyio.fail_after(10):
        listed = [d async for d in list_repos_by_collection(host.base, POST, page_size=2)]
    assert listed == dids  # in order, the repeated DID once
    asked = [r.query for r in host.requests if r.path == BY_COLLECTION]
    assert asked == [f"collection={POST}&limit=2", f"collection={POST}&limit=2&cursor=page1", f"collection={POST}&limit=2&cursor=page2"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (json_reply({"repos": [{"did": did_of(i)} for i in range(3)], "cursor": "x"}), "more than the limit of 2 asked"),
        (json_reply({"repos": [{"did": did_of(1)}, {"handle": "x"}]}), "has no 'did' string"),
        (json_reply({"cursor": "x"}), "has no 'repos' list"),
        (json_reply([1, 2]), "has no 'repos' list"),
        (Reply(body=b"<html>oops</html>", content_type="text/html"), "is not JSON"),
        (json_reply({"repos": [{"did": did_of(1)}], "cursor": "c" * 5000}), "more than 4096"),
        (Reply(body=b'{"repos": [' + b'{"did": "did:plc:x"},' * 120_000 + b"]}", content_type="application/json"), "size cap"),
        (json_reply({"error": "InternalServerError"}, status=500), "HTTP 500"),
        (Reply(status=200, body=b"{}", head_delay=3), "no complete page within 1 s"),
    ],
    ids=["over-limit", "no-did", "no-repos", "not-object", "html", "long-cursor", "oversized", "http-500", "too-slow"],
)
async def test_hostile_collection_listings_are_refused(host: RepoHost, reply: Reply, message: str) -> None:
    host.route("*", host.collection_key(POST), reply)
    with anyio.fail_after(15), pytest.raises(FetchError) as caught:
        [d async for d in list_repos_by_collection(host.base, POST, page_size=2, timeout=1)]
    assert message in str(caught.value) and BY_COLLECTION in str(caught.value)
    assert not isinstance(caught.value, UnsupportedMethodError)


@pytest.mark.anyio
async def test_a_cursor_cycle_stops_the_collection_listing(host: RepoHost) -> None:
    host.route("*", host.collection_key(POST), json_reply({"repos": [{"did": did_of(1)}], "cursor": "a"}))
    host.route("*", host.collection_key(POST, "a"), json_reply({"repos": [{"did": did_of(2)}], "cursor": "b"}))
    host.route("*", host.collection_key(POST, "b"), json_reply({"repos": [{"did": did_of(3)}], "cursor": "a"}))
    listed: list[str] = []
    with anyio.fail_after(10), pytest.raises(FetchError, match="again: a cycle"):
        async for did in list_repos_by_collection(host.base, POST):
            listed.append(did)
    assert listed == [did_of(1), did_of(2), did_of(3)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply",
    [
        Reply(status=404, body=b"Not Found", content_type="text/plain"),
        json_reply({"error": "MethodNotImplemented", "message": "Method Not Implemented"}, status=501),
        json_reply({"error": "MethodNotImplemented"}, status=400),
    ],
    ids=["404", "501", "xrpc-400"],
)
async def test_a_host_that_does_not_serve_it_says_so(host: RepoHost, reply: Reply) -> None:
    host.route("*", BY_COLLECTION, reply)  # any collection
    with anyio.fail_after(10), pytest.raises(UnsupportedMethodError) as caught:
        [d async for d in collection_sources(host.base, POST)]
    assert caught.value.method == "com.atproto.sync.listReposByCollection"
    assert "does not serve com.atproto.sync.listReposByCollection" in str(caught.value)


@pytest.mark.anyio
async def test_collection_arguments_are_checked() -> None:
    for collection in ("post", "app.bsky", "app..bsky.post", "app.bsky.feed.post!", "1app.bsky.post"):
        with pytest.raises(ValueError, match="not a collection NSID"):
            [d async for d in list_repos_by_collection("http://127.0.0.1:9", collection)]
    with pytest.raises(ValueError, match=r"1\.\.2000"):
        [d async for d in list_repos_by_collection("http://127.0.0.1:9", POST, page_size=2001)]


def plc_document(did: str, pds: str) -> Reply:
    return json_reply({
        "id": did, "alsoKnownAs": [], "verificationMethod": [],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds},],
    })  # fmt: skip


def test_cli_backfill_collection_signal(host: RepoHost, capsys: pytest.CaptureFixture[str]) -> None:
    dids = [did_of(i) for i in range(3)]
    for i, did in enumerate(dids):
        host.repo(did, car_reply(repo_car_of(did, i + 1)))
        host.route("*", f"/{did}", plc_document(did, host.base))
    host.collection_listing(POST, [[{"did": d} for d in dids[:2]], [{"did": dids[2]}]])
    status = main([
        "backfill", "--collection-signal", POST, "--host", host.base, "--plc-url", host.base, "--json",
        "--per-host-concurrency", "1", "--per-host-rps", "50", "--retries", "0",
    ])  # fmt: skip
    out = capsys.readouterr()
    assert status == 0, out.err
    rows = {row["repo"]: row for row in map(json.loads, out.out.splitlines())}
    assert {did: (rows[did]["did"], rows[did]["records"], rows[did]["error"]) for did in dids} == {
        did: (did, i + 1, None) for i, did in enumerate(dids)
    }
    assert host.serving_peak == 1


def test_cli_collection_signal_errors(host: RepoHost, capsys: pytest.CaptureFixture[str]) -> None:
    host.route("*", BY_COLLECTION, Reply(status=404, body=b"Not Found", content_type="text/plain"))
    assert main(["backfill", "--collection-signal", POST, "--host", host.base]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "does not serve com.atproto.sync.listReposByCollection" in err
    with pytest.raises(SystemExit) as usage:
        main(["backfill", "--collection-signal", POST, "--repos", "-"])
    assert usage.value.code == 2 and "needs --host URL" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["backfill", "--collection-signal", "not-an-nsid", "--host", host.base])
    assert usage.value.code == 2 and "not a collection NSID" in capsys.readouterr().err
    for bad in (["--per-host-concurrency", "0"], ["--per-host-rps", "-1"]):
        with pytest.raises(SystemExit) as usage:
            main(["backfill", "--host", host.base, *bad])
        assert usage.value.code == 2
