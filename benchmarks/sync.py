"""The sync service (repo_stream.sync.Sync): a pipeline replay and a backfill-then-follow run.

Two figures, each way in its own fresh process (peak RSS is its own), the servers in another.
The replay runs each way ``--rounds`` times (default 3), alternated, and reports the medians and
the round-by-round ratio: on a shared machine the speed of a core drifts by tens of percent from
one minute to the next, and the ratio of runs made side by side drifts far less.

``--part replay`` (default ``--events 50000``): the ``#commit`` stream of
``benchmarks/firehose.py`` (generated once, cached under ``.cache/``: 500 accounts, 1-10 ops per
event) served over loopback WebSocket by the tests' server, with a PLC directory for the keys.

- ``sync``: :class:`repo_stream.sync.Sync` with every account tracked as already backfilled at the
  stream's start (its rev and MST root in the state file): WebSocket, ``verify_commit`` with
  continuity, the state (record CIDs, rev, root, cursor) in SQLite, and each event written as its
  JSON line (``event.to_json_line()``: compact JSON, the record value as the C transcoder's
  text) to a buffered file (``/dev/null``). ``verify_commit``'s own CPU time is measured around
  each call in one more run, reported apart (the rest is the pipeline: WebSocket, decode,
  state, JSON); the clock reads are not in the rounds' figures.
- ``sdk``: the atproto Python SDK's firehose client (``AsyncFirehoseSubscribeReposClient``):
  ``parse_subscribe_repos_message``, ``CAR.from_bytes`` of the blocks, each op's record looked up
  and written as JSON (``json.dumps(..., default=str)``). It verifies nothing and keeps no state.

``--part backfill`` (default ``--repos 1000``): a live PDS and relay in one process: ``--repos``
accounts with 20-80 records each, and commits made at ``--rate`` per second by a producer
thread while the service runs (a WebSocket stream that grows; getRepo answers the repo as it is
at that moment). The service backfills every repo (4 memory workers) while following the
stream from its start, per-host limits lifted (the local PDS is one host). Reported: seconds until caught up (every repo fetched and its buffered
events applied), firehose messages buffered at the peak and spilled, resyncs, events, peak RSS;
then, once the producer stops, that every repo's stored rev is its final one.

Usage::

    .venv/bin/python benchmarks/sync.py [--part replay|backfill|both] [--events 50000] [--rounds 3] [--repos 1000] [--rate 300]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def peak_rss_mib() -> float:
    """This process's peak RSS, MiB: ``VmHWM`` of /proc/self/status (``ru_maxrss`` would carry
    the parent's peak over a fork and exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------ replay


def replay_server(path: str) -> None:
    """Serve the cached stream (WebSocket) and the accounts' DID documents (HTTP); print the ports."""
    from firehose import load

    from tests.firehose_server import FirehoseServer, with_seq
    from tests.servers import LocalHTTPServer, json_reply
    from tests.test_firehose import did_document

    states = json.loads(Path(path).with_suffix(".json").read_text())
    messages: list[tuple[int | None, bytes]] = [(i + 1, with_seq(m, i + 1)) for i, m in enumerate(load(Path(path)))]
    with FirehoseServer(messages) as server, LocalHTTPServer() as plc:
        for did, state in states.items():
            plc.route("*", f"/{did}", json_reply(did_document(did, state["key"])))
        print(server.port, plc.port, flush=True)
        sys.stdin.read()


def replay_sync(path: str, ws: int, http: int, events: int, timed_state: bool = False, timed_verify: bool = False) -> dict[str, Any]:
    import anyio

    from repo_stream.sync import Sync
    from repo_stream.sync.state import StateStore

    states = json.loads(Path(path).with_suffix(".json").read_text())
    folder = tempfile.mkdtemp()
    state_path = os.path.join(folder, "state.sqlite")
    with StateStore(state_path) as state:
        for did, s in states.items():
            state.set(did, "active", s["rev"], s["data"])
        state.commit()
    out = open(os.devnull, "w", buffering=1 << 16)
    count = 0
    # With ``timed_verify`` (--verify-cpu), verify_commit's own CPU time, measured around each
    # call (two clock reads and a wrapper, ~1.5 us an event, counted in cpu: the events per CPU
    # second are read from runs without it), so the rest of the pipeline can be told apart.
    import repo_stream.sync.service as service

    real_verify = service.verify_commit
    verify_cpu = 0.0

    def timed_verify_commit(*a: Any, **k: Any) -> Any:
        nonlocal verify_cpu
        t0 = time.process_time()
        try:
            return real_verify(*a, **k)
        finally:
            verify_cpu += time.process_time() - t0

    if timed_verify:
        service.verify_commit = timed_verify_commit  # type: ignore[assignment]

    # With ``timed_state`` (--state-cpu), the state file's own CPU time (StateStore), measured
    # the same way around each call of its methods from outside it (a call from one method to
    # another is inside the outer one; ~1 us of clock reads a call, counted in cpu, so the
    # events per CPU second are read from a run without it).
    state_cpu = 0.0
    depth = 0

    state_calls: dict[str, int] = {}

    def timed(method: Any) -> Any:
        name = method.__name__

        def call(*a: Any, **k: Any) -> Any:
            nonlocal state_cpu, depth
            state_calls[name] = state_calls.get(name, 0) + 1
            if depth:
                return method(*a, **k)
            depth = 1
            t0 = time.process_time()
            try:
                return method(*a, **k)
            finally:
                state_cpu += time.process_time() - t0
                depth = 0

        return call

    if timed_state:
        for name, method in list(vars(StateStore).items()):
            if callable(method) and not name.startswith("_"):
                setattr(StateStore, name, timed(method))

    async def run() -> Any:
        nonlocal count
        async with Sync(relay=f"ws://127.0.0.1:{ws}", plc_url=f"http://127.0.0.1:{http}", state=state_path, cursor=0, allow_private_hosts=True) as sync:
            async for event in sync:
                out.write(event.to_json_line())
                count += 1
                if sync.stats.commits >= events:
                    break
            return sync.stats

    # The modules the service imports as it starts (its HTTP client, the signature code and
    # their libraries), imported before the clock as the SDK way imports its package: the
    # figure is the pipeline's, not Python's import and compile time (~0.2-0.6 CPU s here,
    # where the editable checkout has no cached bytecode).
    import certifi  # noqa: F401
    import coincurve  # noqa: F401

    import repo_stream.crypto.signature
    import repo_stream.net.fetch
    import repo_stream.net.guard
    import repo_stream.net.source
    import repo_stream.records.json_text  # noqa: F401

    cpu0, wall0 = time.process_time(), time.perf_counter()
    stats = anyio.run(run)

    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    out.close()
    return {"way": "sync", "events": stats.commits, "records": count, "broken": stats.broken, "wall": wall, "cpu": cpu, **({"verify_cpu": verify_cpu} if timed_verify else {}), **({"state_cpu": state_cpu, "state_calls": state_calls} if timed_state else {}), "rss": peak_rss_mib()}


def replay_sdk(path: str, ws: int, http: int, events: int) -> dict[str, Any]:
    import asyncio

    from atproto import CAR, firehose_models, models, parse_subscribe_repos_message
    from atproto_firehose import AsyncFirehoseSubscribeReposClient

    out = open(os.devnull, "w", buffering=1 << 16)
    count = 0
    records = 0
    client = AsyncFirehoseSubscribeReposClient(base_uri=f"ws://127.0.0.1:{ws}/xrpc")

    async def on_message(message: firehose_models.MessageFrame) -> None:
        nonlocal count, records
        commit = parse_subscribe_repos_message(message)
        if not isinstance(commit, models.ComAtprotoSyncSubscribeRepos.Commit):
            return
        car = CAR.from_bytes(commit.blocks)
        for op in commit.ops:
            value = car.blocks.get(op.cid) if op.cid is not None else None
            out.write(json.dumps({"did": commit.repo, "rev": commit.rev, "seq": commit.seq, "action": op.action, "path": op.path, "cid": str(op.cid), "value": value}, default=str) + "\n")
            records += 1
        count += 1
        if count >= events:
            await client.stop()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    asyncio.run(client.start(on_message))

    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    out.close()
    return {"way": "sdk", "events": count, "records": records, "broken": 0, "wall": wall, "cpu": cpu, "rss": peak_rss_mib()}


def part_replay(args: argparse.Namespace) -> None:
    from firehose import CACHE, generate

    path = CACHE / f"firehose-{args.events}-a{args.accounts}-s1.bin"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        generate(path, args.events, args.accounts, 1)
    server = subprocess.Popen([sys.executable, __file__, "--child", "replay-server", "--path", str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        ws, http = server.stdout.readline().split()
        def child(way: str, *extra: str) -> dict[str, Any]:
            done = subprocess.run(
                [sys.executable, __file__, "--child", f"replay-{way}", "--path", str(path), "--ws", ws, "--http", http, "--events", str(args.events), *extra],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            return dict(json.loads(done.stdout.strip().splitlines()[-1]))

        # The ways alternate, round after round, so that they meet the same minutes of a shared
        # machine; then one sync run timing verify_commit apart (its clock reads cost ~1.5 us an
        # event: not in the rounds).
        ways = args.ways.split(",")
        runs: dict[str, list[dict[str, Any]]] = {way: [] for way in ways}
        for _ in range(args.rounds):
            for way in ways:
                runs[way].append(child(way))
        timed = child("sync", "--verify-cpu") if "sync" in ways else None
    finally:
        server.kill()

    def rate(r: dict[str, Any]) -> float:
        return float(r["events"] / r["cpu"])

    print(f"\nReplay of {args.events:,} #commit events ({args.accounts} accounts) over loopback WebSocket, {args.rounds} round(s), medians:\n")
    print("| way | events | records out | wall s | CPU s | events/s per CPU s | range | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for way, rows in runs.items():
        rates = sorted(rate(r) for r in rows)
        print(
            f"| {way} | {rows[0]['events']:,} | {rows[0]['records']:,} | {statistics.median(r['wall'] for r in rows):.1f} | "
            f"{statistics.median(r['cpu'] for r in rows):.1f} | {statistics.median(rates):,.0f} | {rates[0]:,.0f}-{rates[-1]:,.0f} | "
            f"{max(r['rss'] for r in rows):.0f} |"
        )
    if "sync" in runs and "sdk" in runs:
        ratios = sorted(rate(a) / rate(b) for a, b in zip(runs["sync"], runs["sdk"], strict=True))
        print(f"\nsync / sdk, round by round: median {statistics.median(ratios):.2f} (range {ratios[0]:.2f}-{ratios[-1]:.2f})")
    if timed is not None:
        verify = timed["verify_cpu"]
        print(
            f"verify_commit (one more sync run, timed apart): {verify:.1f} of {timed['cpu']:.1f} CPU s ({verify / timed['cpu']:.0%}); "
            f"the rest of the pipeline alone: {timed['events'] / (timed['cpu'] - verify):,.0f} events per CPU s"
        )


# ------------------------------------------------------------------------------ backfill


class LiveRelay:
    """A growing subscribeRepos stream over WebSocket (wsproto, a thread per connection): each
    connection gets every message from its cursor on, then waits for more."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.cond = threading.Condition()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def add(self, message: bytes) -> None:
        with self.cond:
            self.messages.append(message)
            self.cond.notify_all()

    def accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            threading.Thread(target=self.serve, args=(conn,), daemon=True).start()

    def serve(self, conn: socket.socket) -> None:
        from wsproto.events import BytesMessage

        from tests.firehose_server import accept_websocket

        try:
            accepted = accept_websocket(conn)
            if accepted is None:
                return
            ws, cursor = accepted
            i = cursor or 0  # seq n is messages[n - 1]
            while True:
                with self.cond:
                    while len(self.messages) <= i:
                        self.cond.wait()
                    batch = self.messages[i : i + 256]
                i += len(batch)
                conn.sendall(b"".join(ws.send(BytesMessage(m)) for m in batch))
        except OSError:
            return


def backfill_server(repos: int, commits: int, rate: float, seed: int) -> None:
    """A live PDS + relay: ``repos`` accounts; after the first getRepo, ``commits`` commits at
    ``rate`` per second. Prints the ports; writes the final revs to stdout when done."""
    from http.server import BaseHTTPRequestHandler

    from repo_stream.records.generate import generate_records
    from repo_stream.sync.generate import CommitGenerator, make_signer
    from tests.backfill_server import GET_REPO, RepoHost, car_reply
    from tests.firehose_server import with_seq
    from tests.servers import json_reply
    from tests.sync_server import did_document

    rng = random.Random(seed)
    pool = [b for _, b in generate_records(2000, seed=seed, profile="small")]
    lock = threading.Lock()
    gens: dict[str, CommitGenerator] = {}
    keys: dict[str, str] = {}
    for i in range(repos):
        sign, did_key = make_signer("k256", i)
        did = "did:plc:" + "".join("abcdefghijklmnopqrstuvwxyz234567"[(i >> (5 * k)) & 31] for k in range(6)).ljust(24, "q")
        records = generate_records(rng.randint(20, 80), seed=seed * 100_000 + i, profile="small")
        gens[did] = CommitGenerator(did, sign, records, seed=i, engine="edit", pool=pool)
        keys[did] = did_key
    relay = LiveRelay()
    started = threading.Event()

    class Host(RepoHost):
        def _handle(self, handler: BaseHTTPRequestHandler) -> None:
            parts = urlsplit(handler.path)
            if parts.path == GET_REPO:
                did = parse_qs(parts.query)["did"][0]
                started.set()
                with lock:
                    car = gens[did].repo_car()  # the repo as it is now
                try:
                    self._send(handler, car_reply(car))
                except OSError:
                    handler.close_connection = True
                return
            super()._handle(handler)

    with Host() as host:
        for did in gens:
            host.route("*", f"/{did}", json_reply(did_document(did, keys[did], host.base)))
        print(relay.port, host.port, flush=True)
        dids = list(gens)
        started.wait()
        t0 = time.monotonic()
        for n in range(commits):
            did = rng.choice(dids)
            with lock:
                gen = gens[did]
                message = gen.commit(gen.random_ops(rng.randint(1, 6), creates=0.7, updates=0.15))
            relay.add(with_seq(message, n + 1))
            delay = t0 + (n + 1) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        print(json.dumps({did: gen.rev for did, gen in gens.items()}), flush=True)
        sys.stdin.read()


def backfill_client(dids_path: str, ws: int, http: int, finals_path: str) -> dict[str, Any]:
    import anyio

    from repo_stream.sync import Sync

    dids = Path(dids_path).read_text().split()
    state_path = os.path.join(tempfile.mkdtemp(), "state.sqlite")
    out = open(os.devnull, "w", buffering=1 << 16)
    result: dict[str, Any] = {}

    async def run() -> None:
        async with Sync(
            dids, relay=f"ws://127.0.0.1:{ws}", plc_url=f"http://127.0.0.1:{http}", state=state_path, cursor=0, allow_private_hosts=True,
            per_host_concurrency=None, per_host_rps=None,  # the local server is one host: measure the service, not the limits
        ) as sync:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    finals: dict[str, str] | None = None
                    while True:
                        await anyio.sleep(0.2)
                        if finals is None and os.path.getsize(finals_path):
                            finals = json.loads(Path(finals_path).read_text())
                            result["stream_end"] = time.monotonic() - sync.stats.started
                        if finals is not None and sync.stats.caught_up is not None:
                            assert sync.state is not None
                            rows = {did: sync.state.get(did) for did in finals}
                            if all(r is not None and r.rev == finals[did] and r.status == "active" for did, r in rows.items()):
                                result["all_final"] = time.monotonic() - sync.stats.started
                                tg.cancel_scope.cancel()

                tg.start_soon(watch)
                async for event in sync:
                    out.write(json.dumps(event.to_json()) + "\n")
            s = sync.stats
            result.update(
                caught_up=s.caught_up, backfilled_at=s.backfilled_at, buffered_peak=s.buffered_peak, spilled=s.spilled, resyncs=s.resyncs, fetched=s.fetched,
                failed=s.failed, backfilled=s.backfilled, live=s.live, commits=s.commits, stale=s.stale, delivered=s.delivered,
            )  # fmt: skip

    cpu0 = time.process_time()
    anyio.run(run)
    result["cpu"] = time.process_time() - cpu0
    result["rss"] = peak_rss_mib()
    return result


def part_backfill(args: argparse.Namespace) -> None:
    server = subprocess.Popen(
        [sys.executable, __file__, "--child", "backfill-server", "--repos", str(args.repos), "--commits", str(args.commits), "--rate", str(args.rate)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    folder = Path(tempfile.mkdtemp())
    finals = folder / "finals.json"
    finals.write_text("")
    try:
        assert server.stdout is not None
        ws, http = server.stdout.readline().split()
        dids = folder / "dids.txt"
        # The DIDs, as the server makes them.
        names = ["did:plc:" + "".join("abcdefghijklmnopqrstuvwxyz234567"[(i >> (5 * k)) & 31] for k in range(6)).ljust(24, "q") for i in range(args.repos)]
        dids.write_text("\n".join(names) + "\n")
        client = subprocess.Popen(
            [sys.executable, __file__, "--child", "backfill-client", "--path", str(dids), "--ws", ws, "--http", http, "--finals", str(finals)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        line = server.stdout.readline()  # the final revs, once the producer is done
        finals.write_text(line)
        out, _ = client.communicate(timeout=1800)
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        server.kill()
    print(f"\nBackfill then follow: {args.repos:,} repos, {args.commits:,} commits made at {args.rate:g}/s during the run:\n")
    print(
        "| repos | every repo backfilled (s) | caught up (s) | every repo at its final rev (s) | buffered at peak | spilled | resyncs "
        "| backfilled records | live records | stale dropped | client CPU s | client peak RSS MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {r['fetched']:,} | {r['backfilled_at']:.1f} | {r['caught_up'] or 0:.1f} | {r.get('all_final', 0):.1f} | {r['buffered_peak']:,} | {r['spilled']:,} | {r['resyncs']} "
        f"| {r['backfilled']:,} | {r['live']:,} | {r['stale']:,} | {r['cpu']:.1f} | {r['rss']:.0f} |"
    )
    print(f"\nthe producer made its last commit at {r.get('stream_end', 0):.1f} s (as the client saw it); failed fetches: {r['failed']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["replay", "backfill", "both"], default="both")
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--repos", type=int, default=1000)
    parser.add_argument("--commits", type=int, default=6000)
    parser.add_argument("--rate", type=float, default=300)
    parser.add_argument("--ways", default="sync,sdk", help="replay: the clients to run, of sync,sdk")
    parser.add_argument("--child", default=None)
    parser.add_argument("--path", default="")
    parser.add_argument("--finals", default="")
    parser.add_argument("--ws", type=int, default=0)
    parser.add_argument("--http", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="replay: runs of each way, alternated (medians reported)")
    parser.add_argument("--verify-cpu", action="store_true", help="replay-sync child: also time verify_commit (verify_cpu; ~1.5 us an event)")
    parser.add_argument("--state-cpu", action="store_true", help="replay-sync child: also time the StateStore's methods (state_cpu; adds ~1 us a call)")
    args = parser.parse_args()
    if args.child == "replay-server":
        replay_server(args.path)
    elif args.child in ("replay-sync", "replay-sdk"):
        if args.child == "replay-sync":
            print(json.dumps(replay_sync(args.path, args.ws, args.http, args.events, args.state_cpu, args.verify_cpu)))
        else:
            print(json.dumps(replay_sdk(args.path, args.ws, args.http, args.events)))
    elif args.child == "backfill-server":
        backfill_server(args.repos, args.commits, args.rate, 1)
    elif args.child == "backfill-client":
        print(json.dumps(backfill_client(args.path, args.ws, args.http, args.finals)))
    else:
        if args.part in ("replay", "both"):
            part_replay(args)
        if args.part in ("backfill", "both"):
            part_backfill(args)


if __name__ == "__main__":
    main()
