"""The firehose client over loopback: events/s through the WebSocket, decoding and (optionally)
full sync 1.1 verification, with the client's peak RSS.

The ``#commit`` stream of ``benchmarks/firehose.py`` (generated once, cached under ``.cache/``)
is given global seqs and served by the tests' WebSocket server (tests/firehose_server.py,
wsproto, blocking sockets) in a separate process on 127.0.0.1; this process runs
:class:`repo_stream.firehose.Firehose` over it until every event has arrived.

Modes:

- ``client``: the client alone: WebSocket frames, message assembly, ``decode_frame`` (strict
  DAG-CBOR), seq checks, the bounded buffer, the consumer loop.
- ``verify``: and ``verify_commit`` of every event, with continuity (``prev=RepoState``).

Usage::

    .venv/bin/python benchmarks/firehose_client.py [--events 50000] [--accounts 500] [--mode client|verify] [--backend asyncio|trio]

Prints one line: events, wall seconds, events/s (wall), CPU seconds of this process, events/s
per CPU second, peak RSS (MiB).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SERVER = """
import sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
from firehose import load
from tests.firehose_server import FirehoseServer, with_seq
messages = [(i + 1, with_seq(m, i + 1)) for i, m in enumerate(load(__import__('pathlib').Path({path!r})))]
with FirehoseServer(messages) as server:
    print(server.port, flush=True)
    sys.stdin.read()
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mode", choices=["client", "verify"], default="client")
    parser.add_argument("--backend", choices=["asyncio", "trio"], default="asyncio")
    args = parser.parse_args()

    import anyio
    from firehose import CACHE, generate

    from repo_stream.firehose import Event, Firehose
    from repo_stream.sync import RepoState, verify_commit

    path = CACHE / f"firehose-{args.events}-a{args.accounts}-s{args.seed}.bin"
    if not path.exists():
        CACHE.mkdir(exist_ok=True)
        generate(path, args.events, args.accounts, args.seed)
    states: dict[str, Any] = json.loads(path.with_suffix(".json").read_text())
    held = {did: RepoState(s["rev"], s["data"]) for did, s in states.items()}
    keys = {did: s["key"] for did, s in states.items()}
    server = subprocess.Popen(
        [sys.executable, "-c", SERVER.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), path=str(path))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    port = int(server.stdout.readline())
    problems = 0

    async def run() -> int:
        nonlocal problems
        count = 0
        async with Firehose(f"ws://127.0.0.1:{port}", max_reconnects=0) as stream:
            async for item in stream:
                if not isinstance(item, Event):
                    problems += 1
                    continue
                count += 1
                if args.mode == "verify":
                    assert item.did is not None
                    result = verify_commit(item.message, key=keys[item.did], prev=held[item.did])
                    held[item.did] = RepoState(result.rev, result.data)
                if count == args.events:
                    break
        return count

    try:
        cpu0 = time.process_time()
        wall0 = time.perf_counter()
        count = anyio.run(run, backend=args.backend)
        wall = time.perf_counter() - wall0
        cpu = time.process_time() - cpu0
    finally:
        server.kill()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"mode={args.mode} backend={args.backend} events={count} problems={problems} wall={wall:.2f}s "
        f"events/s(wall)={count / wall:,.0f} cpu={cpu:.2f}s events/s(cpu)={count / cpu:,.0f} peak_rss={peak:.0f}MiB"
    )


if __name__ == "__main__":
    main()
