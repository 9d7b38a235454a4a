"""One compression-bomb case, run in its own process so its peak RSS can be measured:
``python -m tests.hostile_child CASE``. Prints one JSON line: the error class and message, the
RSS before the case and the process's peak RSS (MB), and the seconds the case took.

The bombs are built here, never stored: :func:`zeros_deflate` repeats one full-flush deflate
block of 1 MiB of zeros (~1 kB), so a "4 GiB" stream is ~4 MB; gzip-wrapping that again makes
a few kB that decode to 4 GiB through two codings (``Content-Encoding: gzip, gzip``). The
streams have no end: the caps must stop the reading long before.
"""

from __future__ import annotations

import gzip
import json
import resource
import sys
import time
import zlib
from typing import Any

import anyio

GIB = 1 << 30
GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"


def zeros_deflate(total: int) -> bytes:
    """A raw deflate stream of ``total`` zero bytes (whole MiBs), cut before its final block."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(1 << 20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (total >> 20)


def bomb(total: int = 4 * GIB, layers: int = 2) -> bytes:
    """``layers`` gzip codings around ``total`` zero bytes."""
    data = GZIP_HEADER + zeros_deflate(total)
    for _ in range(layers - 1):
        data = gzip.compress(data, 9)
    return data


def rss_mb() -> float:
    """This process's peak RSS, MB: VmHWM, which starts anew at exec. (ru_maxrss does not: a child
    started by vfork + exec carries its parent's peak, the test runner's hundreds of MB.)"""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(case: str) -> None:
    from repo_stream.backfill.sources import list_repos
    from repo_stream.cli import stats
    from repo_stream.net.fetch import FetchOptions, fetch_car
    from repo_stream.net.identity import resolve_did, resolve_handle_https

    from .servers import LocalHTTPServer, Reply, local_client

    did = "did:plc:" + "a" * 24
    two = {"Content-Encoding": "gzip, gzip"}
    body = bomb()
    with LocalHTTPServer() as server:
        if case == "getrepo":  # drained as raw bytes: only the cap can stop it
            server.route("*", "/car", Reply(body=body, headers=two, content_type="application/vnd.ipld.car"))
            async with fetch_car(f"{server.base}/car", options=FetchOptions(max_bytes=256 << 20)) as stream:
                async for _ in stream:
                    pass
        elif case == "stats":  # the CLI's own path (default options)
            server.route("*", "/car", Reply(body=body, headers=two, content_type="application/vnd.ipld.car"))
            await stats(f"{server.base}/car")
        elif case == "did":
            server.route("*", f"/{did}", Reply(body=body, headers=two, content_type="application/json"))
            await resolve_did(did, plc_url=server.base)
        elif case == "well-known":
            server.route("*", "/.well-known/atproto-did", Reply(body=body, headers=two, content_type="text/plain"))
            client, _ = local_client(server)
            async with client:
                await resolve_handle_https("alice.test", client=client)
        elif case == "list-repos":
            server.route("*", "/xrpc/com.atproto.sync.listRepos", Reply(body=body, headers=two, content_type="application/json"))
            async for _ in list_repos(server.base):
                pass
        elif case == "error-body":  # a 500 whose error page is a bomb: only 4 KiB are read
            server.route("*", "/car", Reply(status=500, body=body, headers=two, content_type="text/html"))
            async with fetch_car(f"{server.base}/car", options=FetchOptions(retries=0)):
                pass
        else:
            raise SystemExit(f"unknown case {case}")


def main() -> None:
    case = sys.argv[1]
    import repo_stream.backfill.sources
    import repo_stream.cli
    import repo_stream.net.fetch  # noqa: F401

    bomb()  # built once before the baseline: its few MB are the test's, not the library's
    before = rss_mb()
    started = time.monotonic()
    error: dict[str, Any] = {"type": None, "message": None}
    try:
        anyio.run(run, case)
    except Exception as exc:
        error = {"type": type(exc).__name__, "message": str(exc)}
    print(json.dumps({**error, "baseline_mb": round(before, 1), "peak_mb": round(rss_mb(), 1), "seconds": round(time.monotonic() - started, 2)}))


if __name__ == "__main__":
    main()
