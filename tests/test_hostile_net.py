"""The network side against hostile servers on 127.0.0.1 (issue 19, items 1-9): compression
bombs (measured in a child process, tests/hostile_child.py), listRepos cycles and endless pages,
slow-drip servers and deadlines, private addresses (SSRF), ``--out`` collisions, the limits'
flags, retries that cannot help, SIGTERM and orphaned workers, and the messages.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from repo_stream.backfill import BackfillResult, JsonlSink, backfill, list_repos
from repo_stream.cli import main
from repo_stream.errors import FetchError, IdentityError, RepoStreamError
from repo_stream.net import guard
from repo_stream.net.fetch import FetchOptions, fetch_car
from repo_stream.net.guard import GuardedBackend, PrivateHostError, is_public_address, make_client
from repo_stream.net.http import send
from repo_stream.net.source import open_source

from .backfill_server import GET_REPO, LIST_REPOS, RepoHost, car_reply, repo_car_of
from .hostile_child import bomb
from .servers import Reply, json_reply

ROOT = Path(__file__).resolve().parents[1]
FAST = FetchOptions(connect_timeout=1, read_timeout=1, retries=1, backoff=0.01, max_backoff=0.02, max_retry_after=1)


def did_of(i: int) -> str:
    return "did:plc:" + base64.b32encode(i.to_bytes(15, "big")).decode().lower()


def did_document(did: str, pds: str) -> dict[str, Any]:
    return {
        "id": did, "alsoKnownAs": [], "verificationMethod": [],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }  # fmt: skip


@pytest.fixture
def host() -> Iterator[RepoHost]:
    with RepoHost() as server:
        yield server


async def run_all(sources: Any, **options: Any) -> list[BackfillResult]:
    options.setdefault("fetch_options", FAST)
    with anyio.fail_after(30):
        async with aclosing(backfill(sources, **options)) as results:
            return [r async for r in results]


# --- 1. decompression bombs: every body, peak RSS measured ------------------------------------


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("getrepo", "FetchError", "the body passed the size cap of 268435456 bytes as decoded (max_bytes)"),
        ("stats", "CarHeaderError", "CAR header at byte 0 has length 0"),
        ("did", "IdentityError", "answered more than 1048576 bytes (as decoded)"),
        ("well-known", "IdentityError", "answered more than 4096 bytes (as decoded)"),
        ("list-repos", "FetchError", "the body passed the size cap of 2097152 bytes as decoded"),
        ("error-body", "FetchError", "HTTP 500 (text/html): "),
    ],
)
def test_a_4_gib_gzip_gzip_bomb_stays_under_200_mb(case: str, error: str, message: str) -> None:
    """4 GiB of zeros in ~5 kB (``Content-Encoding: gzip, gzip``): each body is decoded in 64 KiB
    steps and stopped at its cap; the child process's peak RSS stays near its baseline."""
    done = subprocess.run([sys.executable, "-m", "tests.hostile_child", case], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["type"] == error and message in out["message"], out
    assert out["peak_mb"] < 200, out
    assert out["peak_mb"] - out["baseline_mb"] < 32, out  # a few MiB over the imports, not GBs


def test_the_bomb_is_what_it_claims() -> None:
    """The test's own bomb: a few kB that decode (through two gzip layers) to zeros, endlessly."""
    data = bomb()
    assert len(data) < 64 * 1024
    import zlib

    first = zlib.decompressobj(31).decompress(data, 1 << 20)
    second = zlib.decompressobj(31).decompress(first, 1 << 20)
    assert second == bytes(1 << 20)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("encoding", "message"),
    [
        ("gzip, gzip, gzip", "stacks 3 codings (gzip, gzip, gzip); at most 2 are accepted"),
        ("br", "Content-Encoding 'br' is not accepted"),
        ("compress", "Content-Encoding 'compress' is not accepted"),
    ],
)
async def test_deep_or_unknown_codings_are_refused(host: RepoHost, encoding: str, message: str) -> None:
    host.route("*", "/car", Reply(body=b"\x1f\x8b whatever", headers={"Content-Encoding": encoding}, content_type="application/vnd.ipld.car"))
    with anyio.fail_after(10), pytest.raises(FetchError, match=re.escape(message)):
        async with fetch_car(f"{host.base}/car", options=FAST):
            pass
    assert host.hits("/car")[0].headers["Accept-Encoding"] == "identity, gzip"


@pytest.mark.anyio
async def test_gzip_and_deflate_repos_are_read(host: RepoHost) -> None:
    import gzip
    import zlib

    did = did_of(1)
    car = repo_car_of(did, 50)
    host.route("*", "/gz", car_reply(gzip.compress(car), headers={"Content-Encoding": "gzip"}))
    host.route("*", "/zz", car_reply(zlib.compress(car), headers={"Content-Encoding": "deflate"}))
    host.route("*", "/cut", car_reply(gzip.compress(car)[:-100], headers={"Content-Encoding": "gzip"}))
    for path in ("/gz", "/zz"):
        async with fetch_car(f"{host.base}{path}", options=FAST) as stream:
            got = b"".join([chunk async for chunk in stream])
        assert got == car
    with pytest.raises(FetchError, match="ends before its compressed stream does"):
        async with fetch_car(f"{host.base}/cut", options=FAST) as stream:
            async for _ in stream:
                pass


# --- 2. listRepos ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_list_repos_cycle_ends_with_an_error(host: RepoHost) -> None:
    host.route("*", LIST_REPOS, json_reply({"repos": [{"did": did_of(1)}], "cursor": "A"}))
    host.route("*", f"{LIST_REPOS}?cursor=A", json_reply({"repos": [{"did": did_of(2)}], "cursor": "B"}))
    host.route("*", f"{LIST_REPOS}?cursor=B", json_reply({"repos": [{"did": did_of(1)}, {"did": did_of(3)}], "cursor": "A"}))
    got: list[str] = []
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(FetchError, match="sent the cursor 'A' again: a cycle"):
        async for did in list_repos(host.base):
            got.append(did)
    assert got == [did_of(1), did_of(2), did_of(3)]  # did_of(1), listed twice, yielded once
    assert time.monotonic() - started < 2
    assert [r.query for r in host.hits(LIST_REPOS)] == ["limit=1000", "limit=1000&cursor=A", "limit=1000&cursor=B"]


@pytest.mark.anyio
async def test_list_repos_page_over_the_limit_or_endless(host: RepoHost) -> None:
    host.route("*", LIST_REPOS, json_reply({"repos": [{"did": did_of(i)} for i in range(11)], "cursor": "x"}))
    with anyio.fail_after(10), pytest.raises(FetchError, match="the page lists 11 repos, more than the limit of 10 asked"):
        async for _ in list_repos(host.base, page_size=10):
            pass
    assert host.hits(LIST_REPOS)[0].query == "limit=10"
    endless = b'{"repos":[' + b'{"did":"did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"},' * 100_000  # ~4.4 MB, never closed
    host.route("*", LIST_REPOS, Reply(body=endless, length=-1, content_type="application/json"))
    with anyio.fail_after(10), pytest.raises(FetchError, match="the body passed the size cap of 2097152 bytes"):
        async for _ in list_repos(host.base):
            pass


# --- 3. deadlines ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_slow_drip_fails_at_its_deadline_not_at_the_next_byte(host: RepoHost) -> None:
    did = did_of(5)
    host.repo(did, car_reply(repo_car_of(did, 20), chunk=1, delay=0.4))  # one byte every 0.4 s
    options = FetchOptions(read_timeout=5, grace=1.0, min_rate=64 * 1024)
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(FetchError, match=r"too slow: \d+ bytes in 1\.\d s, under the 65536 bytes/s"):
        async with fetch_car(host.repo_url(did), did=did, options=options) as stream:
            async for _ in stream:
                pass
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 1.6, elapsed  # the deadline (1 s + bytes/rate), not the 0.4 s drip or the 5 s read timeout


@pytest.mark.anyio
async def test_slow_drip_repos_do_not_hold_up_the_backfill(host: RepoHost) -> None:
    good = [did_of(i) for i in range(20)]
    slow = [did_of(100), did_of(101)]
    for did in good:
        host.repo(did, car_reply(repo_car_of(did, 10)))
    for did in slow:
        host.repo(did, car_reply(repo_car_of(did, 10), chunk=1, delay=20))  # one byte every 20 s
    sources = [host.repo_url(d) for d in slow + good]
    options = FetchOptions(connect_timeout=1, read_timeout=30, grace=1.0, retries=0)
    started = time.monotonic()
    finished: dict[str, float] = {}
    with anyio.fail_after(20):
        async with aclosing(backfill(sources, memory_workers=2, fetch_options=options)) as results:
            async for result in results:
                finished[result.source] = time.monotonic() - started
                if result.source in {host.repo_url(d) for d in slow}:
                    assert result.error is not None and "too slow" in result.error
                else:
                    assert result.error is None and result.records == 10
    assert len(finished) == 22
    assert max(finished[host.repo_url(d)] for d in slow) < 2.5
    assert max(finished[host.repo_url(d)] for d in good) < 3.5  # both workers freed at ~1 s, then the rest at once


# --- 4. SSRF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("1.1.1.1", True),
        ("127.0.0.1", False), ("10.0.0.1", False), ("172.16.5.4", False), ("192.168.1.1", False),
        ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False), ("255.255.255.255", False),
        ("224.0.0.1", False), ("192.0.0.8", False), ("198.18.0.1", False), ("::1", False), ("::", False),
        ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False), ("fd12:3456::1", False), ("ff02::1", False),
        ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:8.8.8.8", True), ("2002:7f00:1::", False),
        ("2002:808:808::", True), ("64:ff9b::7f00:1", False), ("64:ff9b::808:808", True), ("2001:db8::1", False),
        ("::127.0.0.1", False), ("metadata.google.internal", False),
    ],
)  # fmt: skip
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(address) is public


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("pds", "refused"),
    [
        ("http://169.254.169.254", "169.254.169.254"),
        ("http://10.0.0.1", "10.0.0.1"),
        ("http://[::1]:22", "::1"),
        ("http://100.64.0.1", "100.64.0.1"),
        ("http://[::ffff:127.0.0.1]:6379", "::ffff:127.0.0.1"),
        ("http://localhost:{port}", "127.0.0.1"),
    ],
)
async def test_a_did_document_cannot_send_the_fetcher_to_a_private_address(host: RepoHost, pds: str, refused: str) -> None:
    did = did_of(7)
    endpoint = pds.format(port=host.port)
    host.route("*", f"/{did}", json_reply(did_document(did, endpoint)))
    host.repo(did, car_reply(repo_car_of(did, 3)))
    with anyio.fail_after(10), pytest.raises(FetchError) as info:
        async with open_source(did, plc_url=host.base, options=FAST):
            pass
    assert f"resolves to {refused}, not a public unicast address; refused" in str(info.value)
    assert "host " in str(info.value) and did in str(info.value)
    assert host.fetches(did) == []  # nothing was sent
    if "localhost" in pds:  # the opt-out reaches it
        async with open_source(did, plc_url=host.base, options=FAST, allow_private_hosts=True) as opened:
            assert opened.url == f"{endpoint}{GET_REPO}?did={did}"
        assert len(host.fetches(did)) == 1


@pytest.mark.anyio
async def test_the_pds_on_a_named_host_is_allowed(host: RepoHost) -> None:
    """``plc_url`` (and a URL SOURCE) are named by the user: their host and port are trusted as
    given, so a PDS on that same origin is reachable, without the opt-out."""
    did = did_of(8)
    host.route("*", f"/{did}", json_reply(did_document(did, host.base)))
    host.repo(did, car_reply(repo_car_of(did, 3)))
    async with open_source(did, plc_url=host.base, options=FAST) as opened:
        data = b"".join([c async for c in opened.source])
    assert data == repo_car_of(did, 3)


@pytest.mark.anyio
async def test_redirects_are_rechecked(host: RepoHost) -> None:
    host.route("*", "/to-localhost", Reply(status=302, headers={"Location": f"http://localhost:{host.port}/car"}))
    host.route("*", "/to-file", Reply(status=302, headers={"Location": "file:///etc/passwd"}))
    host.route("*", "/car", car_reply(b"car"))
    with anyio.fail_after(10), pytest.raises(FetchError, match=r"host localhost resolves to 127\.0\.0\.1, .*\(redirected to http://localhost:\d+/car\)"):
        async with fetch_car(f"{host.base}/to-localhost", options=FAST):
            pass
    with anyio.fail_after(10), pytest.raises(FetchError, match=r"redirects to 'file:///etc/passwd', not an http\(s\) URL"):
        async with fetch_car(f"{host.base}/to-file", options=FAST):
            pass
    assert host.hits("/car") == []
    async with fetch_car(f"{host.base}/to-localhost", options=FAST, allow_private_hosts=True) as stream:
        assert b"".join([c async for c in stream]) == b"car"


@pytest.mark.anyio
async def test_an_https_to_http_redirect_is_refused() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(302, headers={"Location": "http://pds.example.com/plain"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(FetchError, match=r"redirects from https to http \(http://pds\.example\.com/plain\); refused"):
            await send(client, "https://pds.example.com/x", timeout=5, fail=FetchError)
    assert seen == ["https://pds.example.com/x"]


@pytest.mark.anyio
async def test_the_guard_connects_to_the_address_it_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: the name is resolved once, every answer checked, and the connection made to
    a checked address (never to the name, which could resolve again to something else)."""
    backend = GuardedBackend()
    answers = [[("93.184.215.14", 443)], [("93.184.215.14", 443), ("127.0.0.1", 443)]]

    async def getaddrinfo(host: str, port: int, **kw: Any) -> list[Any]:
        return [(2, 1, 6, "", a) for a in answers.pop(0)]

    connected: list[str] = []

    async def connect_tcp(host: str, *args: Any) -> Any:
        connected.append(host)
        return "stream"

    monkeypatch.setattr(guard.anyio, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(backend._inner, "connect_tcp", connect_tcp)
    assert await backend.connect_tcp("rebind.example.com", 443) == "stream"
    assert connected == ["93.184.215.14"]
    with pytest.raises(PrivateHostError, match=r"host rebind\.example\.com resolves to 127\.0\.0\.1"):
        await backend.connect_tcp("rebind.example.com", 443)
    assert connected == ["93.184.215.14"]


@pytest.mark.anyio
async def test_did_web_on_a_private_port_is_refused(host: RepoHost) -> None:
    did = f"did:web:localhost%3A{host.port}"
    host.route("localhost", "/.well-known/did.json", json_reply(did_document(did, host.base)))
    with anyio.fail_after(10), pytest.raises(IdentityError, match=r"host localhost resolves to 127\.0\.0\.1"):
        async with open_source(did, options=FAST):
            pass
    assert host.hits("/.well-known/did.json") == []


def test_the_cli_refuses_and_the_opt_out_allows(host: RepoHost, capsys: pytest.CaptureFixture[str]) -> None:
    did = did_of(9)
    host.route("*", f"/{did}", json_reply(did_document(did, f"http://localhost:{host.port}")))
    host.repo(did, car_reply(repo_car_of(did, 4)))
    assert main(["stats", did, "--plc-url", host.base, "--json"]) == 1
    assert "resolves to 127.0.0.1, not a public unicast address" in capsys.readouterr().err
    assert main(["stats", did, "--plc-url", host.base, "--json", "--allow-private-hosts"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 4


@pytest.mark.anyio
async def test_a_guarded_client_made_once_serves_a_backfill(host: RepoHost) -> None:
    did = did_of(10)
    host.route("*", f"/{did}", json_reply(did_document(did, f"http://localhost:{host.port}")))
    host.repo(did, car_reply(repo_car_of(did, 2)))
    [refused] = await run_all([did], plc_url=host.base)
    assert refused.error is not None and "FetchError" in refused.error and "resolves to 127.0.0.1" in refused.error
    [allowed] = await run_all([did], plc_url=host.base, allow_private_hosts=True)
    assert (allowed.error, allowed.records) == (None, 2)
    async with make_client() as client:
        assert guard.guard_of(client) is not None


# --- 5. --out collisions ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_out_runs_each_did_once_and_reports_the_duplicates(host: RepoHost, tmp_path: Path) -> None:
    did = did_of(20)
    car = repo_car_of(did, 2000)
    host.repo(did, car_reply(car, chunk=8192))
    host.route("*", f"/{did}", json_reply(did_document(did, host.base)))
    url = host.repo_url(did)
    sources = [url, did, url, f"at://{did}"]
    out = tmp_path / "out"
    results = await run_all(sources, sink=JsonlSink(out), plc_url=host.base, memory_workers=3, fetch_concurrency=4)
    assert sorted(r.source for r in results) == sorted(sources)
    ok = [r for r in results if r.error is None]
    dup = [r for r in results if r.error is not None]
    assert len(ok) == 1 and ok[0].records == 2000
    assert len(dup) == 3
    for r in dup:
        assert r.error is not None and r.error.startswith(f"DuplicateRepoError: {r.source}: a duplicate of {ok[0].source}")
        assert r.did == did
    assert len(host.fetches(did)) == 1  # no second fetch
    lines = (out / f"{did}.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2000 and all(json.loads(line)["key"] for line in lines)
    assert sorted(p.name for p in out.iterdir()) == [f"{did}.jsonl"]


def test_the_sink_locks_a_did_against_another_writer(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    first = sink._open_locked("did:plc:x")
    try:
        with pytest.raises(RepoStreamError, match="being written by another writer of did:plc:x"):
            JsonlSink(tmp_path)._open_locked("did:plc:x")
    finally:
        first.close()


@pytest.mark.anyio
async def test_out_is_utf8_like_dump(host: RepoHost, tmp_path: Path) -> None:
    import io

    import cbor2

    from repo_stream.records.writer import build_repo_car

    did = did_of(21)
    records = [("app.bsky.feed.post/3kaaa", cbor2.dumps({"$type": "app.bsky.feed.post", "text": "héllo wörld 🌍"}, canonical=True))]
    buffer = io.BytesIO()
    build_repo_car(records, did=did, rev="3kaaaaaaaaaaa", path=buffer)
    (tmp_path / "repo.car").write_bytes(buffer.getvalue())
    [result] = await run_all([str(tmp_path / "repo.car")], sink=JsonlSink(tmp_path / "out"))
    assert result.error is None
    raw = (tmp_path / "out" / f"{did}.jsonl").read_bytes()
    assert "héllo wörld 🌍".encode() in raw and b"\\u" not in raw


# --- 6, 7. the limits' flags; retries that cannot help ---------------------------------------


@pytest.mark.parametrize("command", ["stats", "ls", "dump", "get", "verify", "backfill"])
def test_every_fetching_command_has_the_limit_flags(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--max-repo-mb", "(default 4096)"), ("--timeout", "(default 3600)"), ("--retries", "(default 3)")):
        assert flag in text and default in text
    assert "--allow-private-hosts" in text


def test_the_flags_reach_the_fetch(host: RepoHost, capsys: pytest.CaptureFixture[str]) -> None:
    did = did_of(30)
    host.repo(did, car_reply(repo_car_of(did, 500), length=-1))
    assert main(["stats", host.repo_url(did), "--max-repo-mb", "0.01"]) == 1
    assert "passed the size cap of 10485 bytes as decoded (max_bytes)" in capsys.readouterr().err
    host.route("*", "/fail", Reply(status=503))
    assert main(["stats", f"{host.base}/fail", "--retries", "0"]) == 1
    assert "HTTP 503" in capsys.readouterr().err and len(host.hits("/fail")) == 1
    host.route("*", "/slow", car_reply(repo_car_of(did, 500), chunk=100, delay=0.05))
    started = time.monotonic()
    assert main(["stats", f"{host.base}/slow", "--timeout", "0.5"]) == 1
    assert "not finished within the total timeout of 0.5 s" in capsys.readouterr().err
    assert time.monotonic() - started < 2


@pytest.mark.anyio
async def test_only_what_can_succeed_later_is_retried(host: RepoHost) -> None:
    options = FetchOptions(read_timeout=0.2, retries=3, backoff=0.01)
    host.route("*", "/stall", Reply(head_delay=5))
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(FetchError, match=r"ReadTimeout: no answer within the read timeout of 0\.2 s \(read_timeout\) \(after 2 attempts\)"):
        async with fetch_car(f"{host.base}/stall", options=options):
            pass
    assert len(host.hits("/stall")) == 2 and time.monotonic() - started < 1.5  # once retried, not 3 times
    host.route("*", "/big-headers", Reply(headers={"X-Filler": "a" * (1 << 20)}))
    with anyio.fail_after(10), pytest.raises(FetchError, match="RemoteProtocolError"):
        async with fetch_car(f"{host.base}/big-headers", options=options):
            pass
    assert len(host.hits("/big-headers")) == 1
    host.route("*", "/flaky", [Reply(status=502), Reply(status=429), car_reply(b"car")])
    async with fetch_car(f"{host.base}/flaky", options=options) as stream:
        assert stream.attempts == 3


# --- 8. SIGTERM; a worker whose parent dies ----------------------------------------------------


def test_sigterm_stops_cleanly_with_143_and_no_part_file(host: RepoHost, tmp_path: Path) -> None:
    # 8 repos, 2 at a time: the run lasts several loads. The walker writes a small repo's lines
    # in one batch, so its .part lives only for a moment: SIGTERM goes at the first .part seen,
    # else right after the first repo is complete (still in the middle of the run).
    dids = [did_of(40 + i) for i in range(8)]
    for did in dids:
        host.repo(did, car_reply(repo_car_of(did, 3000), chunk=4096, delay=0.02))
    listing = tmp_path / "repos.txt"
    listing.write_text("\n".join(host.repo_url(d) for d in dids) + "\n")
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-m", "repo_stream", "backfill", "--repos", str(listing), "--out", str(out),
         "--allow-private-hosts", "--per-host-concurrency", "2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not (out.exists() and any(p.name.endswith((".part", ".jsonl")) for p in out.iterdir())):
        assert time.monotonic() < deadline, "no repo was written"
        time.sleep(0.002)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=20)
    assert child.returncode == 143, err
    assert "error: terminated" in err
    assert [p.name for p in out.iterdir() if p.name.endswith(".part")] == []


def test_a_worker_stops_within_a_second_of_its_parent_dying(host: RepoHost, tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    dids = [did_of(60 + i) for i in range(8)]
    for did in dids:
        host.repo(did, car_reply(repo_car_of(did, 3000), chunk=1024, delay=0.1))  # ~20 s each
    listing = tmp_path / "repos.txt"
    listing.write_text("\n".join(host.repo_url(d) for d in dids) + "\n")
    parent = subprocess.Popen(
        [sys.executable, "-m", "repo_stream", "backfill", "--repos", str(listing), "--processes", "2", "--allow-private-hosts"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        workers: list[Any] = []
        while time.monotonic() < deadline:
            workers = psutil.Process(parent.pid).children()
            if workers and len(host.fetches()) >= 3:
                break
            time.sleep(0.05)
        assert workers, "no worker process started"
        worker = workers[0]
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        killed = time.monotonic()
        def alive() -> bool:  # an orphan's zombie may wait for a reaper: it has stopped all the same
            try:
                return bool(worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE)
            except psutil.NoSuchProcess:
                return False

        while alive() and time.monotonic() - killed < 5:
            time.sleep(0.02)
        stopped = time.monotonic() - killed
        assert stopped < 1.0, stopped
    finally:
        if parent.poll() is None:
            parent.kill()
        for child in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if child.pid != parent.pid and "repo_stream.backfill.worker" in " ".join(child.cmdline()):
                    child.kill()
            except psutil.Error:  # gone, or a zombie waiting for its reaper: nothing left to stop
                pass


# --- 9. messages -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_an_html_answer_names_the_url_status_and_content_type(host: RepoHost) -> None:
    host.route("*", "/car", Reply(body=b"<html>Cloudflare</html>", content_type="text/html; charset=utf-8"))
    with pytest.raises(FetchError) as info:
        async with fetch_car(f"{host.base}/car", options=FAST):
            pass
    assert str(info.value) == f"GET {host.base}/car: HTTP 200 answered with 'text/html; charset=utf-8', not a CAR (application/vnd.ipld.car)"


@pytest.mark.anyio
async def test_a_body_read_timeout_has_a_detail(host: RepoHost) -> None:
    host.route("*", "/car", car_reply(b"x" * 10000, chunk=10, delay=1))
    with pytest.raises(FetchError) as info:
        async with fetch_car(f"{host.base}/car", options=FetchOptions(read_timeout=0.2)) as stream:
            async for _ in stream:
                pass
    assert str(info.value).endswith("ReadTimeout: no answer within the read timeout of 0.2 s (read_timeout)")
