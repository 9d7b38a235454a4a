"""The sync service's state file (repo_stream.sync.state.StateStore) alone, called as the
service calls it while it follows the firehose.

Usage: python benchmarks/sync_state.py [--events 50000] [--accounts 500] [--ops 5.5] [--group 250] [--rounds 3] [--root DIR]

A synthetic stream of ``--events`` ``#commit`` events over ``--accounts`` repos, each with
``--ops`` record ops on average (1-10; 80% creates, 5% updates, 15% deletes of keys the repo
has, as benchmarks/firehose.py makes them), is applied to a fresh state file (repos tracked,
no records stored, as benchmarks/sync.py's replay starts) in groups of ``--group`` events, as
``Sync`` does: per group ``unmark`` (the last group's marks), ``mark`` of every op's key,
``set_cursor`` and ``commit``; then per event ``put_records`` and ``set``. Printed: the CPU
seconds (process time) of each round, their median, and microseconds per event; the last line
is JSON. ``--root`` imports ``repo_stream`` from another checkout (an A/B against main).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

_B32 = "abcdefghijklmnopqrstuvwxyz234567"
_COLLECTIONS = ("app.bsky.feed.post", "app.bsky.feed.like", "app.bsky.feed.repost", "app.bsky.graph.follow")

Event = tuple[str, str, str, list[tuple[str, str | None]]]


def make_stream(events: int, accounts: int, ops: float, seed: int) -> tuple[dict[str, tuple[str, str]], list[Event]]:
    """The repos (DID -> (rev, data)) and the events (DID, rev, data, [(key, CID or None)])."""
    rng = random.Random(seed)

    def b32(n: int) -> str:
        return "".join(rng.choice(_B32) for _ in range(n))

    def cid() -> str:
        return "bafyrei" + b32(52)

    dids = [f"did:plc:{b32(24)}" for _ in range(accounts)]
    repos = {did: ("2222222222222", cid()) for did in dids}
    keys: dict[str, list[str]] = {did: [] for did in dids}
    tid = 3_000_000_000_000_000
    stream: list[Event] = []
    top = max(1, round(2 * ops - 1))  # 1..top, uniform: mean (1 + top) / 2
    for _ in range(events):
        did = rng.choice(dids)
        have = keys[did]
        changes: list[tuple[str, str | None]] = []
        seen: set[str] = set()
        for _ in range(rng.randint(1, top)):
            roll = rng.random()
            if roll < 0.8 or not have:
                tid += rng.randint(1, 1000)
                key = f"{rng.choice(_COLLECTIONS)}/{_tid(tid)}"
                have.append(key)
                changes.append((key, cid()))
            else:
                key = rng.choice(have)
                if key in seen:
                    continue
                if roll < 0.85:
                    changes.append((key, cid()))
                else:
                    have.remove(key)
                    changes.append((key, None))
            seen.add(key)
        tid += 1
        stream.append((did, _tid(tid), cid(), changes))
    return repos, stream


def _tid(n: int) -> str:
    out = []
    for _ in range(13):
        out.append(_B32[n & 31])
        n >>= 5
    return "".join(reversed(out))


def one_round(repos: dict[str, tuple[str, str]], stream: list[Event], group: int) -> tuple[float, float, int]:
    """Apply the stream to a fresh state file; (CPU seconds, wall seconds, file bytes)."""
    from repo_stream.sync.state import StateStore

    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "state.sqlite")
    with StateStore(path) as state:
        for did, (rev, data) in repos.items():
            state.set(did, "active", rev, data)
        state.commit()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with StateStore(path) as state:
        marks_done = False
        for start in range(0, len(stream), group):
            part = stream[start : start + group]
            keys = [(did, key) for did, _, _, changes in part for key, _ in changes]
            if marks_done:
                state.unmark()
            state.mark(keys)
            state.set_cursor(start)
            state.commit()
            for did, rev, data, changes in part:
                state.put_records(did, changes)
                state.set(did, "active", rev, data)
            marks_done = True
        state.unmark()
        state.commit()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
    for f in os.listdir(folder):
        os.unlink(os.path.join(folder, f))
    os.rmdir(folder)
    return cpu, wall, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--ops", type=float, default=5.5)
    parser.add_argument("--group", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]), help="the checkout to import repo_stream from")
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    repos, stream = make_stream(args.events, args.accounts, args.ops, args.seed)
    ops = sum(len(c) for _, _, _, c in stream)
    cpus: list[float] = []
    for i in range(args.rounds):
        cpu, wall, size = one_round(repos, stream, args.group)
        cpus.append(cpu)
        print(f"round {i + 1}: {cpu:.3f} s CPU, {wall:.3f} s wall, {cpu / len(stream) * 1e6:.1f} us/event, file {size / 2**20:.1f} MiB", flush=True)
    cpu = statistics.median(cpus)
    print(json.dumps({"root": args.root, "events": len(stream), "ops": ops, "cpu": round(cpu, 4), "us_per_event": round(cpu / len(stream) * 1e6, 2), "cpus": cpus}))


if __name__ == "__main__":
    main()
