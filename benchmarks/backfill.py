"""Backfill benchmark: ~1,000 generated repos served by a local HTTP server.

The repo set (cached in ``.cache/backfill/``, made once, ~1 min on 2 cores): 972 repos of 10 to
~3,000 records (log-uniform), 4 large ones (30k, 50k, 100k, 100k records; the two 100k ones spill
at the 16 MiB limit), all in the ``small`` profile (~190-byte records), plus 12 DIDs the server
does not have (404), 6 answers cut off half-way and 6 that answer HTTP 500 (retried, then failed).

The server runs in its own process, a thread per connection, sending each CAR with ``os.sendfile``.
Each measured run is a fresh process (``--run NAME``) whose peak RSS is sampled (psutil, every 50 ms; the list of processes every second)
over the whole process tree (the Dask runs include the scheduler and workers). Runs:

- ``backfill-mN``: :func:`repo_stream.backfill.backfill` with N memory workers, 1 disk worker,
  16 MiB per repo;
- ``backfill-pN``: the same with ``processes=N``: N worker processes (``repo_stream.backfill.process_pool``),
  each with 1 memory worker and 1 disk worker, fed one repo at a time by the measured process;
- ``gather``: the naive way: ``asyncio.gather`` of fetch + load + walk for every repo at once,
  no memory limit (a 4 GiB one);
- ``dask-wN``: :func:`repo_stream.backfill.cluster.backfill_on_dask` on a local cluster of N worker
  processes (1 thread each), 2 memory workers per worker, shards of 32 repos (the cluster's
  start-up is included);
- ``split-2``: what two processes can give at best, for comparison with ``backfill-p2``: the
  list cut in two halves of equal CAR bytes (each kind of broken repo dealt out alternately),
  each run as ``backfill-m1`` in its own process, both started at once, fed nothing by anyone.
  ``seconds`` is the later half's own run time (neither process's start counted);
  ``seconds_with_start`` is the later of the first half's run time and the second half's time
  from being started to its exit (one process's start counted, as ``processes=2`` must count
  its worker's). Its peak RSS is the sum of the two halves' peaks.

Usage: ``python benchmarks/backfill.py [--repeat 3] [--runs backfill-m1,backfill-m2,...] [--list-times N]``
(``--list-times 3``: each run goes through the list three times over, 3,000 sources, so that
starting a worker process weighs less).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "backfill"
GET_REPO = "/xrpc/com.atproto.sync.getRepo"
RUNS = ["backfill-m1", "backfill-m2", "backfill-m4", "backfill-p2", "split-2", "gather", "dask-w1", "dask-w2"]


def plan() -> list[tuple[int, int]]:
    """(seed, records) of the generated repos."""
    rng = random.Random(2024)
    sizes = [int(10 * 10 ** (rng.random() * 2.5)) for _ in range(972)] + [30_000, 50_000, 100_000, 100_000]
    return [(1000 + i, n) for i, n in enumerate(sizes)]


def _make(item: tuple[int, int]) -> str:
    from repo_stream.records.generate import default_did, generate_repo_car

    seed, n = item
    did = default_did(seed)
    path = CACHE / f"{seed}-{n}.car"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        generate_repo_car(tmp, n, seed=seed, profile="small", order="shuffled")
        tmp.rename(path)
    return did


def prepare() -> dict[str, Any]:
    """Make (or reuse) the repo set; return {did: path}, plus the broken DIDs."""
    from concurrent.futures import ProcessPoolExecutor

    from repo_stream.records.generate import default_did

    CACHE.mkdir(parents=True, exist_ok=True)
    items = plan()
    started = time.perf_counter()
    with ProcessPoolExecutor(2) as pool:
        dids = list(pool.map(_make, items, chunksize=16))
    print(f"# repo set ready in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    repos = {did: str(CACHE / f"{seed}-{n}.car") for did, (seed, n) in zip(dids, items, strict=True)}
    broken = {default_did(5000 + i): kind for i, kind in enumerate(["missing"] * 12 + ["truncated"] * 6 + ["error"] * 6)}
    return {"repos": repos, "broken": broken, "records": sum(n for _, n in items)}


def halves(data: dict[str, Any], dids: list[str]) -> list[list[str]]:
    """``dids`` (in their order) cut in two halves of equal CAR bytes: the served repos dealt
    largest first to the lighter half, each kind of broken repo dealt out alternately."""
    size = {did: os.path.getsize(path) for did, path in data["repos"].items()}
    half: dict[str, int] = {}
    load = [0, 0]
    for did in sorted(size, key=lambda d: (-size[d], d)):
        half[did] = 0 if load[0] <= load[1] else 1
        load[half[did]] += size[did]
    dealt: dict[str, int] = {}
    for did, kind in sorted(data["broken"].items()):
        half[did] = dealt.get(kind, 0) % 2
        dealt[kind] = dealt.get(kind, 0) + 1
    return [[did for did in dids if half[did] == k] for k in (0, 1)]


def child_run(name: str, port: int, times: int, *extra: str) -> list[str]:
    """The command of one measured run in a fresh process (see ``--run``)."""
    return [sys.executable, __file__, "--run", name, "--port", str(port), "--list-times", str(times), *extra]


def figure_of(stdout: str) -> dict[str, Any]:
    """A measured run's figures, the last line it printed."""
    figure: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    return figure


def run_split(port: int, env: dict[str, str], times: int) -> dict[str, Any]:
    """The ``split-2`` run: two ``backfill-m1`` processes over the two halves, started at once."""
    started = time.perf_counter()
    children = [
        subprocess.Popen(child_run("backfill-m1", port, times, "--half", str(k)), stdout=subprocess.PIPE, text=True, env=env)
        for k in (0, 1)
    ]
    # Each half's exit time as it happens (within 5 ms): waiting on one, then the other, would
    # give the second the first's time whenever it ends first. A figure is one short line: it
    # fits in the pipe, so an unread stdout holds no child up.
    exits: list[float | None] = [None, None]
    while None in exits:
        for k, child in enumerate(children):
            if exits[k] is None and child.poll() is not None:
                exits[k] = time.perf_counter() - started
        time.sleep(0.005)
    figures = []
    for child in children:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise SystemExit(f"split-2: a half exited with {child.returncode}")
        figures.append(figure_of(out))
    second_exit = exits[1]
    assert second_exit is not None
    return {
        "run": "split-2",
        "seconds": max(f["seconds"] for f in figures),
        "seconds_with_start": max(figures[0]["seconds"], second_exit),
        "repos": sum(f["repos"] for f in figures),
        "ok": sum(f["ok"] for f in figures),
        "records": sum(f["records"] for f in figures),
        "spilled": sum(f["spilled"] for f in figures),
        "peak_rss_mb": sum(f["peak_rss_mb"] for f in figures),
    }


def serve(repos: dict[str, str], broken: dict[str, str], ready: Any) -> None:
    """The local PDS (run in its own process): a thread per connection that reads each request's
    head with plain ``recv`` and sends a CAR with one blocking ``os.sendfile``. A remote PDS costs
    the backfill's machine no CPU, so this one is kept as light as it can be: on this 2-core
    machine its CPU comes out of the cores the measured runs use (``http.server`` took ~0.5 s a
    run parsing headers, an asyncio server with ``loop.sendfile`` ~0.4 s, this one ~0.17 s)."""
    import socketserver

    any_car = next(iter(repos.values()))

    def head(status: str, kind: str, length: int, close: bool = False) -> bytes:
        extra = "Connection: close\r\n" if close else ""
        return f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {length}\r\n{extra}\r\n".encode()

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            sock: socket.socket = self.request
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else an answer's last segment waits for a delayed ACK
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    data = sock.recv(65536)
                    if not data:
                        return
                    pending += data
                request, _, pending = pending.partition(b"\r\n\r\n")
                parts = urlsplit(request.split(b" ", 2)[1].decode())
                did = parse_qs(parts.query).get("did", [""])[0]
                kind = broken.get(did)
                if parts.path != GET_REPO or kind == "missing" or (kind is None and did not in repos):
                    body = b'{"error":"RepoNotFound","message":"Could not find repo"}'
                    sock.sendall(head("404 Not Found", "application/json", len(body)) + body)
                    continue
                if kind == "error":
                    body = b'{"error":"InternalServerError"}'
                    sock.sendall(head("500 Internal Server Error", "application/json", len(body)) + body)
                    continue
                path = any_car if kind == "truncated" else repos[did]
                size = os.path.getsize(path)
                count = size // 2 if kind == "truncated" else size
                sock.sendall(head("200 OK", "application/vnd.ipld.car", size, close=kind == "truncated"))
                with open(path, "rb") as f:
                    sent = 0
                    while sent < count:
                        sent += os.sendfile(sock.fileno(), f.fileno(), sent, count - sent)
                if kind == "truncated":
                    return

    class Server(socketserver.ThreadingTCPServer):
        daemon_threads = True
        request_queue_size = 1024  # the gather run connects 1,000 times at once

    threading.stack_size(256 << 10)  # a thread per connection: 1,000 for the gather run
    server = Server(("127.0.0.1", 0), Handler)
    ready.put(server.server_address[1])
    server.serve_forever()


class PeakRSS:
    """Samples the summed RSS of this process and its descendants every 50 ms."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Listing the descendants reads every process's /proc entry (psutil's children() walks
        # them all): done every 20th sample only, or the sampler alone takes ~8% of a core from
        # the run it measures. The worker processes live the whole run, so none is missed.
        me = self._psutil.Process()
        tree = [me]
        tick = 0
        while not self._stop.wait(0.05):
            if tick % 20 == 0:
                try:
                    tree = [me, *me.children(recursive=True)]
                except self._psutil.Error:
                    pass
            tick += 1
            total = 0
            for proc in tree:
                try:
                    total += proc.memory_info().rss
                except self._psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_one(name: str, sources: list[str]) -> dict[str, Any]:
    """One measured run in this process; returns its figures."""
    import anyio

    from repo_stream.net.fetch import FetchOptions

    options = FetchOptions(retries=1, backoff=0.05)
    # The local server is one host: the per-host politeness limits (4 at once, 10 requests/s by
    # default) would measure the limits, not the executor. They are lifted for every run.
    unlimited: dict[str, Any] = {"per_host_concurrency": None, "per_host_rps": None}
    rss = PeakRSS()
    started = time.perf_counter()
    results: list[Any] = []
    if name.startswith("backfill-m"):
        from repo_stream.backfill import backfill

        async def main() -> None:
            async for result in backfill(sources, memory_workers=int(name[len("backfill-m") :]), disk_workers=1, mem_limit_mb=16, fetch_options=options, **unlimited):
                results.append((result.records, result.error is None, result.spilled))

        anyio.run(main)
    elif name.startswith("backfill-p"):
        from repo_stream.backfill import backfill

        async def main() -> None:
            processes = int(name[len("backfill-p") :])
            async for result in backfill(sources, processes=processes, memory_workers=1, disk_workers=1, mem_limit_mb=16, fetch_options=options, **unlimited):
                results.append((result.records, result.error is None, result.spilled))

        anyio.run(main)
    elif name.startswith("dask-w"):
        from repo_stream.backfill.cluster import backfill_on_dask

        for result in backfill_on_dask(sources, n_workers=int(name[len("dask-w") :]), shard_size=32, memory_workers=2, mem_limit_mb=16, fetch_options=options, **unlimited):
            results.append((result.records, result.error is None, result.spilled))
    elif name == "gather":
        import asyncio

        import httpx

        from repo_stream import DriverBuilder
        from repo_stream.net.fetch import fetch_car

        async def one(client: httpx.AsyncClient, url: str) -> tuple[int, bool, bool]:
            try:
                async with fetch_car(url, client=client, options=options) as stream:
                    driver = await DriverBuilder().with_mem_limit_mb(4096).with_block_processor(len).load_car(stream)
                    n = 0
                    async for _ in driver:  # type: ignore[union-attr]
                        n += 1
                    return n, True, False
            except Exception:  # counted as a failure
                return 0, False, False

        async def gather() -> None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(120)) as client:
                results.extend(await asyncio.gather(*(one(client, url) for url in sources)))

        asyncio.run(gather())
    else:
        raise SystemExit(f"unknown run {name}")
    seconds = time.perf_counter() - started
    peak = rss.stop()
    return {
        "run": name,
        "seconds": seconds,
        "repos": len(results),
        "ok": sum(ok for _, ok, _ in results),
        "records": sum(n for n, _, _ in results),
        "spilled": sum(s for _, _, s in results),
        "peak_rss_mb": peak / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--half", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    parser.add_argument("--list-times", type=int, default=1, metavar="N", help="run the list N times over in each run (N x 1,000 sources: start-up's share shrinks)")
    args = parser.parse_args()
    data = prepare()
    dids = sorted([*data["repos"], *data["broken"]])
    random.Random(7).shuffle(dids)
    if args.run:
        if args.half is not None:
            dids = halves(data, dids)[args.half]
        sources = [f"http://127.0.0.1:{args.port}{GET_REPO}?did={did}" for did in dids] * args.list_times
        print(json.dumps(run_one(args.run, sources)))
        return
    import multiprocessing

    ready: Any = multiprocessing.Queue()
    server = multiprocessing.Process(target=serve, args=(data["repos"], data["broken"], ready), daemon=True)
    server.start()
    port = ready.get(timeout=30)
    total_mb = sum(os.path.getsize(p) for p in data["repos"].values()) / 1e6
    print(f"# {len(dids)} repos ({len(data['repos'])} served, {len(data['broken'])} broken or missing), "
          f"{data['records']} records, {total_mb:.0f} MB of CARs", file=sys.stderr)  # fmt: skip
    figures: dict[str, list[dict[str, Any]]] = {}
    # The runs import with Python's default bytecode cache, as a user's process does (one
    # untimed import writes it first), not recompiling every module in every process.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run([sys.executable, "-c", "import repo_stream.backfill.executor, repo_stream.backfill.process_pool, repo_stream.backfill.cluster, psutil"], check=True, env=env)
    try:
        for _ in range(args.repeat):
            for name in args.runs.split(","):
                if name == "split-2":
                    figure = run_split(port, env, args.list_times)
                else:
                    done = subprocess.run(child_run(name, port, args.list_times), capture_output=True, text=True, check=True, env=env)
                    figure = figure_of(done.stdout)
                print(f"# {figure}", file=sys.stderr)
                figures.setdefault(name, []).append(figure)
    finally:
        server.terminate()
    print("| Run | Median s | Repos/s | Records/s | Peak RSS MB (max) | OK / repos | Spilled |")
    print("|:--|--:|--:|--:|--:|--:|--:|")
    medians = {}
    for name, runs in figures.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        medians[name] = seconds
        last = runs[-1]
        print(
            f"| {name} | {seconds:.2f} | {last['repos'] / seconds:.0f} | {last['records'] / seconds / 1e3:.0f} k | "
            f"{max(r['peak_rss_mb'] for r in runs):.0f} | {last['ok']} / {last['repos']} | {last['spilled']} |"
        )
    pairs = (("backfill-m1", "backfill-m2"), ("backfill-m1", "backfill-m4"), ("backfill-m1", "backfill-p2"), ("backfill-m1", "split-2"), ("dask-w1", "dask-w2"), ("backfill-m1", "dask-w2"))
    for a, b in pairs:
        if a in medians and b in medians:
            print(f"- {b} vs {a}: {medians[a] / medians[b]:.2f}x the throughput")
    if "split-2" in figures and "backfill-m1" in medians:
        with_start = statistics.median(r["seconds_with_start"] for r in figures["split-2"])
        print(f"- split-2 vs backfill-m1, one process's start counted: {medians['backfill-m1'] / with_start:.2f}x the throughput")
    times = f", each through the list {args.list_times} times over" if args.list_times > 1 else ""
    print(f"\nMedian of {args.repeat} runs, each in a fresh process{times}; Python {sys.version.split()[0]}, {os.cpu_count()} CPUs.")


if __name__ == "__main__":
    main()
