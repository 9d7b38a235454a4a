"""Fetching repo CARs over HTTP and opening SOURCE strings, against a real local HTTP server.

The server (tests/servers.py) plays scripted answers: CARs whole, slow, truncated, oversize,
404, 429 with Retry-After, 500, dropped connections. Timeouts and backoffs are set in
milliseconds so the whole file runs in a few seconds; every test is bounded by ``fail_after``.
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import anyio
import cbor2
import httpx
import pytest

from repo_stream import (
    DiskBuilder,
    DriverBuilder,
    FetchError,
    IdentityError,
    MemoryDriver,
    NeedDisk,
    RepoStreamError,
    SourceError,
    TruncatedCarError,
)
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.net.fetch import (
    CarStream,
    FetchOptions,
    fetch_car,
    parse_ratelimit_reset,
    parse_retry_after,
    repo_url,
)
from repo_stream.net.identity import make_dns_resolver
from repo_stream.net.source import OpenedSource, classify_source, open_source

from .helpers import DID as HELPER_DID
from .helpers import REV as HELPER_REV
from .helpers import record, repo_car
from .servers import LocalDNSServer, LocalHTTPServer, Reply, json_reply, local_client

ROOT = Path(__file__).resolve().parents[1]
REPO_100 = ROOT / "fixtures" / "repo-100.car"
EXPECTED_100 = json.loads((ROOT / "fixtures" / "expected.json").read_text())["repo-100.car"]
DID_100 = EXPECTED_100["did"]
GET_REPO = "/xrpc/com.atproto.sync.getRepo"
FAST = FetchOptions(connect_timeout=1, read_timeout=1, retries=2, backoff=0.01, max_backoff=0.05, max_retry_after=1)

RECORDS = sorted(
    [(f"app.bsky.feed.post/3k{i:03d}", record(f"post {i}")) for i in range(40)]
    + [(f"app.bsky.feed.like/3l{i:03d}", record(f"like {i}", "app.bsky.feed.like")) for i in range(25)]
    + [("app.bsky.actor.profile/self", record("me", "app.bsky.actor.profile"))]
)
CAR = repo_car(RECORDS)


def car_reply(data: bytes, **options: Any) -> Reply:
    return Reply(body=data, content_type="application/vnd.ipld.car", **options)


def did_document(did: str, pds: str | None, handle: str = "alice.test") -> dict[str, Any]:
    doc: dict[str, Any] = {"id": did, "alsoKnownAs": [f"at://{handle}"], "verificationMethod": [], "service": []}
    if pds is not None:
        doc["service"].append({"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds})
    return doc


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as local:
        yield local


async def walk(source: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """(commit, records) of the CAR in ``source``, walked in memory."""
    driver = await DriverBuilder[bytes]().load_car(source)
    assert isinstance(driver, MemoryDriver)
    return driver.commit, [r async for r in driver]


def summary(records: list[tuple[str, bytes]]) -> tuple[int, int, dict[str, int]]:
    return len(records), sum(len(v) for _, v in records), dict(Counter(k.split("/")[0] for k, _ in records))


EXPECTED_SUMMARY_100 = (EXPECTED_100["records"], EXPECTED_100["record_bytes"], EXPECTED_100["collections"])


# --- fetch_car: success ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_fetch_streams_into_load_car(server: LocalHTTPServer) -> None:
    data = REPO_100.read_bytes()
    server.route("*", GET_REPO, car_reply(data))
    url = repo_url(server.base, DID_100)
    assert url == f"{server.base}/xrpc/com.atproto.sync.getRepo?did={DID_100}"
    with anyio.fail_after(10):
        async with fetch_car(url, did=DID_100, options=FAST) as stream:
            commit, records = await walk(stream)
            assert (stream.status, stream.content_length, stream.bytes_received, stream.attempts) == (200, len(data), len(data), 1)
    assert (commit.did, commit.rev) == (DID_100, EXPECTED_100["rev"])
    assert summary(records) == EXPECTED_SUMMARY_100
    [hit] = server.hits(GET_REPO)
    assert hit.query == f"did={DID_100}" and hit.headers["Accept"] == "application/vnd.ipld.car"


@pytest.mark.anyio
async def test_fetch_arrives_in_pieces_and_spills(server: LocalHTTPServer) -> None:
    """A slowly dribbled, close-delimited body, walked through NeedDisk: exact records."""
    server.route("*", GET_REPO, car_reply(CAR, chunk=1000, delay=0.001, length=-1))
    with anyio.fail_after(20):
        async with fetch_car(f"{server.base}{GET_REPO}?did={HELPER_DID}", options=FAST) as stream:
            spill = await DriverBuilder[bytes]().with_mem_limit_mb(2000 / 2**20).load_car(stream)
            assert isinstance(spill, NeedDisk)
            async with await DiskBuilder().open() as store:
                commit, disk = await spill.finish_loading(store)
                records = [r async for r in disk]
            assert stream.content_length is None and stream.bytes_received == len(CAR)
    assert (commit.did, commit.rev) == (HELPER_DID, HELPER_REV)
    assert records == RECORDS


@pytest.mark.anyio
async def test_fetch_follows_redirects(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, Reply(status=302, headers={"Location": "/blobs/repo.car"}))
    server.route("*", "/blobs/repo.car", car_reply(CAR))
    with anyio.fail_after(10):
        async with fetch_car(f"{server.base}{GET_REPO}?did={HELPER_DID}", options=FAST) as stream:
            _, records = await walk(stream)
    assert records == RECORDS


@pytest.mark.anyio
async def test_stream_is_read_once(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR))
    with anyio.fail_after(10):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FAST) as stream:
            await walk(stream)
            with pytest.raises(FetchError, match="can be read only once"):
                aiter(stream)


# --- fetch_car: HTTP errors and retries -----------------------------------------------------


@pytest.mark.anyio
async def test_404_is_not_retried_and_quotes_the_xrpc_error(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, json_reply({"error": "RepoNotFound", "message": f"Could not find repo for DID: {DID_100}"}, 404))
    url = repo_url(server.base, DID_100)
    with anyio.fail_after(10), pytest.raises(FetchError) as info:
        async with fetch_car(url, did=DID_100, options=FAST):
            pytest.fail("opened a 404")
    error = info.value
    assert str(error) == f"getRepo of {DID_100} from {url}: HTTP 404: RepoNotFound: Could not find repo for DID: {DID_100}"
    assert (error.status, error.url, error.did, error.retry_after) == (404, url, DID_100, None)
    assert len(server.hits(GET_REPO)) == 1


@pytest.mark.anyio
async def test_400_with_a_text_body(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, Reply(status=400, body=b"bad\n  request", content_type="text/plain"))
    with anyio.fail_after(10), pytest.raises(FetchError, match=r"^GET http://127\.0\.0\.1:\d+/xrpc/com\.atproto\.sync\.getRepo: HTTP 400 \(text/plain\): bad request$"):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FAST):
            pass


@pytest.mark.anyio
async def test_5xx_and_429_are_retried_with_backoff(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, [Reply(status=500), Reply(status=503), Reply(status=429), car_reply(CAR)])
    options = FetchOptions(read_timeout=1, retries=3, backoff=0.05, max_backoff=1)
    with anyio.fail_after(10):
        async with fetch_car(f"{server.base}{GET_REPO}", options=options) as stream:
            _, records = await walk(stream)
            assert stream.attempts == 4
    assert records == RECORDS
    times = [hit.at for hit in server.hits(GET_REPO)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert len(gaps) == 3
    # Each wait is drawn between half and all of 0.05, 0.1, 0.2 s.
    assert gaps[0] >= 0.025 and gaps[1] >= 0.05 and gaps[2] >= 0.1, gaps


@pytest.mark.anyio
async def test_retries_run_out(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, json_reply({"error": "InternalServerError", "message": "boom"}, 500))
    url = repo_url(server.base, DID_100)
    with anyio.fail_after(10), pytest.raises(FetchError) as info:
        async with fetch_car(url, did=DID_100, options=FAST):
            pass
    assert str(info.value) == f"getRepo of {DID_100} from {url}: HTTP 500: InternalServerError: boom (after 3 attempts)"
    assert info.value.status == 500
    assert len(server.hits(GET_REPO)) == 3
    server.requests.clear()
    with anyio.fail_after(10), pytest.raises(FetchError, match=r": HTTP 500: InternalServerError: boom$"):
        async with fetch_car(url, did=DID_100, options=FetchOptions(retries=0)):
            pass
    assert len(server.hits(GET_REPO)) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "gap"),
    [
        (lambda: {"Retry-After": "1"}, 0.95),
        # on a 429 without Retry-After: Bluesky's hosts send the Unix time of the reset
        (lambda: {"RateLimit-Reset": str(int(time.time()) + 2), "RateLimit-Remaining": "0"}, 0.9),
    ],
    ids=["retry-after-seconds", "ratelimit-reset-unix-time"],
)
async def test_the_wait_a_429_asks_for_is_honoured(server: LocalHTTPServer, headers: Callable[[], dict[str, str]], gap: float) -> None:
    server.route("*", GET_REPO, [Reply(status=429, headers=headers()), car_reply(CAR)])
    options = FetchOptions(retries=1, backoff=0.001, max_retry_after=5)
    with anyio.fail_after(10):
        async with fetch_car(f"{server.base}{GET_REPO}", options=options) as stream:
            _, records = await walk(stream)
    assert records == RECORDS
    first, second = (hit.at for hit in server.hits(GET_REPO))
    assert gap <= second - first < 4


@pytest.mark.anyio
async def test_retry_after_date_in_the_past_retries_at_once(server: LocalHTTPServer) -> None:
    past = format_datetime(datetime.now(UTC) - timedelta(hours=1), usegmt=True)
    server.route("*", GET_REPO, [Reply(status=503, headers={"Retry-After": past}), car_reply(CAR)])
    with anyio.fail_after(10):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FAST) as stream:
            _, records = await walk(stream)
    assert records == RECORDS and len(server.hits(GET_REPO)) == 2


@pytest.mark.anyio
async def test_retry_after_over_the_cap_fails_at_once(server: LocalHTTPServer) -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(hours=1), usegmt=True)
    for retry_after in ("3600", later):
        server.route("*", GET_REPO, Reply(status=429, headers={"Retry-After": retry_after}))
        server.requests.clear()
        started = time.monotonic()
        with anyio.fail_after(10), pytest.raises(FetchError) as info:
            async with fetch_car(f"{server.base}{GET_REPO}", did=DID_100, options=FAST):
                pass
        assert time.monotonic() - started < 1
        assert info.value.status == 429 and info.value.retry_after is not None and 3590 < info.value.retry_after <= 3600
        assert "the server asks to retry after" in str(info.value) and "more than the 1 s allowed (max_retry_after)" in str(info.value)
        assert len(server.hits(GET_REPO)) == 1


def test_parse_ratelimit_reset() -> None:
    now = 1_750_000_000.0
    assert parse_ratelimit_reset("1750000030", now=now) == 30.0  # a Unix time (Bluesky)
    assert parse_ratelimit_reset("1749999000", now=now) == 0.0  # already past
    assert parse_ratelimit_reset(" 45 ", now=now) == 45.0  # seconds (the IETF draft)
    assert parse_ratelimit_reset("0", now=now) == 0.0
    for bad in ("soon", "-5", "1.5", "", "9" * 16, None):
        assert parse_ratelimit_reset(bad, now=now) is None


def test_parse_retry_after() -> None:
    now = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now=now) == 120.0
    assert parse_retry_after(" 0 ", now=now) == 0.0
    assert parse_retry_after("Sat, 01 Mar 2025 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Sat, 01 Mar 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon", now=now) is None
    assert parse_retry_after("-5", now=now) is None
    assert parse_retry_after("1.5", now=now) is None
    assert parse_retry_after(None) is None


# --- fetch_car: connections and timeouts ----------------------------------------------------


@pytest.mark.anyio
async def test_dropped_connections_are_retried(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, [Reply(drop=True), Reply(drop=True), car_reply(CAR)])
    with anyio.fail_after(10):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FAST) as stream:
            _, records = await walk(stream)
            assert stream.attempts == 3
    assert records == RECORDS


@pytest.mark.anyio
async def test_refused_connection(server: LocalHTTPServer) -> None:
    url = f"http://127.0.0.1:9{GET_REPO}?did={DID_100}"  # the discard port: nothing listens
    with anyio.fail_after(10), pytest.raises(FetchError) as info:
        async with fetch_car(url, did=DID_100, options=FAST):
            pass
    assert str(info.value).startswith(f"getRepo of {DID_100} from {url}: ConnectError: ")
    assert str(info.value).endswith("(after 3 attempts)")
    assert info.value.status is None and isinstance(info.value.__cause__, httpx.ConnectError)


@pytest.mark.anyio
async def test_slow_headers_time_out(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR, head_delay=5))
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(FetchError, match=r"ReadTimeout.*\(after 2 attempts\)$"):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FetchOptions(read_timeout=0.1, retries=1, backoff=0.01)):
            pass
    assert time.monotonic() - started < 2
    assert len(server.hits(GET_REPO)) == 2


@pytest.mark.anyio
async def test_slow_body_times_out_mid_stream(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR, chunk=4096, delay=2))
    url = repo_url(server.base, HELPER_DID)
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(FetchError) as info:
        async with fetch_car(url, did=HELPER_DID, options=FetchOptions(read_timeout=0.2)) as stream:
            await walk(stream)
    assert time.monotonic() - started < 5
    assert str(info.value).startswith(f"getRepo of {HELPER_DID} from {url}: the body was cut off after ")
    assert "ReadTimeout" in str(info.value)
    assert info.value.status == 200 and isinstance(info.value.__cause__, httpx.ReadTimeout)
    assert len(server.hits(GET_REPO)) == 1  # never retried once the body started


@pytest.mark.anyio
async def test_total_timeout(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR, chunk=500, delay=0.05))  # about 2 s in all
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(FetchError, match=r"not finished within the total timeout of 0\.3 s, after \d+ bytes"):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FetchOptions(read_timeout=1, total_timeout=0.3)) as stream:
            await walk(stream)
    assert time.monotonic() - started < 1.5


@pytest.mark.anyio
async def test_mid_body_failure_is_a_source_error_inside_the_block(server: LocalHTTPServer) -> None:
    """Inside ``async with`` the CAR reader reports the cut as SourceError (FetchError chained,
    a useful message); leaving the block turns it back into the FetchError."""
    server.route("*", GET_REPO, car_reply(CAR, send=len(CAR) // 2))
    url = repo_url(server.base, HELPER_DID)
    with anyio.fail_after(10), pytest.raises(FetchError) as outer:
        async with fetch_car(url, did=HELPER_DID, options=FAST) as stream:
            with pytest.raises(SourceError) as inner:
                await walk(stream)
            assert isinstance(inner.value.__cause__, FetchError)
            assert str(inner.value) == f"reading the CAR source failed: FetchError: {inner.value.__cause__}"
            raise inner.value
    message = str(outer.value)
    assert message.startswith(f"getRepo of {HELPER_DID} from {url}: the body was cut off after {len(CAR) // 2} bytes: RemoteProtocolError")
    assert isinstance(outer.value.__cause__, httpx.RemoteProtocolError)


@pytest.mark.anyio
async def test_close_delimited_truncation_is_a_truncated_car(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR, length=-1, send=len(CAR) - 10))
    with anyio.fail_after(10), pytest.raises(TruncatedCarError):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FAST) as stream:
            await walk(stream)


# --- fetch_car: size cap --------------------------------------------------------------------


@pytest.mark.anyio
async def test_content_length_over_the_cap_is_refused_before_the_body(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR))
    with anyio.fail_after(10), pytest.raises(FetchError) as info:
        async with fetch_car(f"{server.base}{GET_REPO}", options=FetchOptions(max_bytes=len(CAR) - 1)):
            pytest.fail("opened an oversize body")
    assert str(info.value).endswith(f": Content-Length {len(CAR)} bytes is over the size cap of {len(CAR) - 1} bytes (max_bytes)")
    assert info.value.status == 200 and len(server.hits(GET_REPO)) == 1


@pytest.mark.anyio
async def test_body_over_the_cap_fails_as_it_arrives(server: LocalHTTPServer) -> None:
    """No Content-Length: the cap is checked as bytes arrive, and the body stops being read."""
    padding = [cbor2.dumps({"pad": i, "bytes": bytes(1000)}) for i in range(100)]
    big = repo_car(RECORDS, extra_blocks=[(dag_cbor_cid(block), block) for block in padding])  # a valid CAR, 100 kB over
    server.route("*", GET_REPO, car_reply(big, length=-1, chunk=1024))
    cap = len(CAR) + 5000
    assert len(big) > cap + 65536
    with anyio.fail_after(10), pytest.raises(FetchError, match=f"the body passed the size cap of {cap} bytes") as info:
        async with fetch_car(f"{server.base}{GET_REPO}", options=FetchOptions(max_bytes=cap)) as stream:
            driver = await DriverBuilder[bytes]().load_car(stream)
            assert isinstance(driver, MemoryDriver)
            # load_car reads to the end of the stream, so the cap fires before it returns
            pytest.fail("read past the cap")
    assert cap < stream.bytes_received <= cap + 65536
    assert info.value.status == 200


@pytest.mark.anyio
async def test_exactly_the_cap_is_accepted(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR, length=-1))
    with anyio.fail_after(10):
        async with fetch_car(f"{server.base}{GET_REPO}", options=FetchOptions(max_bytes=len(CAR))) as stream:
            _, records = await walk(stream)
    assert records == RECORDS


# --- open_source ----------------------------------------------------------------------------


def test_local_sources_do_not_load_the_network_stack() -> None:
    """Opening a file must not import httpx or dnspython (they cost ~0.3 s of start-up)."""
    code = (
        "import sys, anyio\n"
        "from repo_stream import DriverBuilder\n"
        "from repo_stream.net.source import open_source\n"
        "async def main():\n"
        f"    async with open_source({str(REPO_100)!r}) as opened:\n"
        "        driver = await DriverBuilder().load_car(opened.source)\n"
        "        print(len([r async for r in driver]))\n"
        "anyio.run(main)\n"
        "print(sorted(m for m in ('httpx', 'dns', 'repo_stream.net.identity', 'repo_stream.net.fetch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split("\n")[:2] == [str(EXPECTED_100["records"]), "[]"]



@pytest.mark.parametrize(
    ("source", "kind"),
    [
        ("-", "stdin"),
        ("fixtures/repo-100.car", "path"),
        (str(REPO_100), "path"),
        ("missing.car", "path"),
        ("some/dir/repo", "path"),
        ("tests", "path"),
        ("not a handle", "path"),
        ("https://pds.test/xrpc/com.atproto.sync.getRepo?did=did:plc:x", "url"),
        ("HTTP://127.0.0.1:8080/repo.car", "url"),
        ("did:plc:alicealicealicealicealic", "did"),
        ("did:web:alice.test", "did"),
        ("at://did:plc:alicealicealicealicealic/app.bsky.feed.post", "did"),
        ("at://alice.test", "handle"),
        ("alice.test", "handle"),
        ("@alice.car", "handle"),
    ],
)
def test_classify_source(source: str, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    assert classify_source(source) == kind


@pytest.mark.anyio
async def test_open_path_and_stdin() -> None:
    data = REPO_100.read_bytes()
    async with open_source(str(REPO_100)) as opened:
        assert (opened.kind, opened.size, opened.did, opened.url, opened.signing_key) == ("path", len(data), None, None, None)
        _, records = await walk(opened.source)
    assert summary(records) == EXPECTED_SUMMARY_100
    async with open_source("-", stdin=io.BytesIO(data)) as opened:
        assert (opened.kind, opened.size) == ("stdin", None)
        _, records = await walk(opened.source)
    assert summary(records) == EXPECTED_SUMMARY_100


@pytest.mark.anyio
async def test_open_missing_path_is_a_source_error(tmp_path: Path) -> None:
    for path in (tmp_path / "missing.car", tmp_path):
        with pytest.raises(SourceError, match=f"cannot open CAR file {path}: "):
            async with open_source(str(path)):
                pytest.fail("opened")


@pytest.mark.anyio
@pytest.mark.parametrize("url", ["http://", "http:///x", "https://127.0.0.1:99999/x", "http://[::1"])
async def test_open_invalid_url(url: str) -> None:
    with anyio.fail_after(5), pytest.raises(FetchError, match="not a valid"):
        async with open_source(url, options=FAST):
            pytest.fail("opened")


@pytest.mark.anyio
async def test_open_url(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, car_reply(CAR))
    url = repo_url(server.base, HELPER_DID)
    with anyio.fail_after(10):
        async with open_source(url, options=FAST) as opened:
            assert (opened.kind, opened.did, opened.url, opened.size, opened.identity) == ("url", HELPER_DID, url, len(CAR), None)
            assert isinstance(opened.source, CarStream) and opened.stream is opened.source
            commit, records = await walk(opened.source)
            opened.check_did(commit.did)
    assert records == RECORDS
    with pytest.raises(IdentityError, match="the did parameter 'alice' is not valid DID syntax"):
        async with open_source(f"{server.base}{GET_REPO}?did=alice"):
            pass


@pytest.mark.anyio
async def test_end_to_end_did_via_plc_to_pds(server: LocalHTTPServer) -> None:
    """A DID resolved by the local PLC directory to a PDS on the local server; the CAR streamed
    from it and walked: the exact records."""
    server.route("plc.test", f"/{HELPER_DID}", json_reply(did_document(HELPER_DID, "https://pds.test")))
    server.route("pds.test", GET_REPO, car_reply(CAR, chunk=2048))
    client, transport = local_client(server)
    async with client:
        with anyio.fail_after(10):
            async with open_source(HELPER_DID, plc_url="https://plc.test", client=client, options=FAST) as opened:
                assert (opened.kind, opened.did, opened.url) == ("did", HELPER_DID, f"https://pds.test{GET_REPO}?did={HELPER_DID}")
                assert opened.identity is not None and opened.identity.pds == "https://pds.test"
                commit, records = await walk(opened.source)
                opened.check_did(commit.did)
    assert records == RECORDS
    assert (commit.did, commit.rev) == (HELPER_DID, HELPER_REV)
    assert transport.urls == [f"https://plc.test/{HELPER_DID}", f"https://pds.test{GET_REPO}?did={HELPER_DID}"]


@pytest.mark.anyio
async def test_end_to_end_handle_via_dns_plc_and_pds(server: LocalHTTPServer) -> None:
    """A handle found in the local DNS server, its DID in the PLC directory at a plain
    ``plc_url``, the fixture repo served by the PDS: the fixture's figures."""
    server.route("127.0.0.1", f"/{DID_100}", json_reply(did_document(DID_100, "https://pds.test", handle="alice.test")))
    server.route("pds.test", GET_REPO, car_reply(REPO_100.read_bytes()))
    client, transport = local_client(server)
    with LocalDNSServer() as dns_server:
        dns_server.txt["_atproto.alice.test"] = [f"did={DID_100}"]
        async with client:
            with anyio.fail_after(10):
                async with open_source(
                    "at://alice.test",
                    plc_url=server.base,
                    client=client,
                    dns_resolver=make_dns_resolver([("127.0.0.1", dns_server.port)], timeout=2),
                    options=FAST,
                ) as opened:
                    assert opened.kind == "handle" and opened.identity is not None and opened.identity.handle_verified
                    commit, records = await walk(opened.source)
                    opened.check_did(commit.did)
    assert commit.did == DID_100 and summary(records) == EXPECTED_SUMMARY_100
    assert f"https://pds.test{GET_REPO}?did={DID_100}" in transport.urls


@pytest.mark.anyio
async def test_served_repo_for_another_did_is_caught(server: LocalHTTPServer) -> None:
    server.route("*", f"/{HELPER_DID}", json_reply(did_document(HELPER_DID, server.base)))
    server.route("*", GET_REPO, car_reply(REPO_100.read_bytes()))  # the PDS answers with someone else's repo
    with anyio.fail_after(10):
        async with open_source(HELPER_DID, plc_url=server.base, options=FAST) as opened:
            commit, _ = await walk(opened.source)
            with pytest.raises(IdentityError, match=f"the repo served is for {DID_100}, not {HELPER_DID}"):
                opened.check_did(commit.did)


@pytest.mark.anyio
async def test_did_without_a_pds(server: LocalHTTPServer) -> None:
    server.route("*", f"/{HELPER_DID}", json_reply(did_document(HELPER_DID, None)))
    with anyio.fail_after(10), pytest.raises(IdentityError, match=f"the DID document of {HELPER_DID} has no valid #atproto_pds service"):
        async with open_source(HELPER_DID, plc_url=server.base, options=FAST):
            pass
    assert server.hits(GET_REPO) == []


@pytest.mark.anyio
async def test_open_source_errors_are_typed(server: LocalHTTPServer) -> None:
    server.route("*", GET_REPO, json_reply({"error": "RepoTakendown", "message": "Repo has been takendown"}, 400))
    server.route("*", f"/{HELPER_DID}", json_reply(did_document(HELPER_DID, server.base)))
    with anyio.fail_after(10):
        with pytest.raises(FetchError, match="HTTP 400: RepoTakendown: Repo has been takendown"):
            async with open_source(HELPER_DID, plc_url=server.base, options=FAST):
                pass
        with pytest.raises(IdentityError, match="unsupported DID method 'key'"):
            async with open_source("did:key:zQ3shTestTestTest"):
                pass
        with pytest.raises(IdentityError, match="not found"):
            async with open_source("did:plc:bobbobbobbobbobbobbobbob", plc_url=server.base):
                pass


def test_fetch_errors_are_repo_stream_errors() -> None:
    assert issubclass(FetchError, RepoStreamError) and not issubclass(FetchError, SourceError)
    assert OpenedSource(source=b"", kind="path", name="x").signing_key is None
