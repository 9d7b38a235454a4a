"""The SQLite spill store in isolation: its cost per run, per merge and per look-up on a real spill.

Usage: python benchmarks/spill_store.py REPO.car [--rounds 3] [--mem-limit-mb 10] [--cache-mb 16]

First it spills the CAR once as ``stats`` does (block processor ``len``), recording every run
handed to the store and, in walk order, the node CIDs and the record CIDs (a chunk at a time)
the walker asks for. Then, ``--rounds`` times, into a fresh temporary store, it times (thread CPU
time and wall time, printed as medians):

* ``store runs``: every recorded run through ``put_run_sync``;
* ``merge``: ``merge_sync``, the runs into one, with its index;
* ``node look-ups``: ``node`` of every node CID, in walk order;
* ``record look-ups``: ``fetch_many`` of every chunk of record CIDs, in walk order.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repo_stream import DiskBuilder, DriverBuilder, NeedDisk
from repo_stream.spill.store import DiskStore

Recorded = tuple[list[tuple[bytes, list[Any], int]], list[bytes], list[list[bytes]], int]


async def record_spill(path: str, mem_limit_mb: float) -> Recorded:
    """Spill ``path``; return the runs, the node CIDs, the record CID chunks and the record count."""
    runs: list[tuple[bytes, list[Any], int]] = []
    nodes: list[bytes] = []
    chunks: list[list[bytes]] = []
    put = DiskStore.put_run_sync
    lookup = DiskStore.lookup

    def recording_put(self: DiskStore, run: bytes, large: list[Any], size: int) -> None:
        runs.append((run, list(large), size))
        put(self, run, large, size)

    class Recorder:
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def node(self, cid: bytes) -> Any:
            nodes.append(cid)
            return self.inner.node(cid)

        def fetch_many(self, cids: list[bytes]) -> Any:
            chunks.append(list(cids))
            return self.inner.fetch_many(cids)

    def recording_lookup(self: DiskStore, decode: Callable[[bytes], Any]) -> Any:
        return Recorder(lookup(self, decode))

    DiskStore.put_run_sync = recording_put  # type: ignore[method-assign]
    DiskStore.lookup = recording_lookup  # type: ignore[method-assign]
    try:
        async with await anyio.open_file(path, "rb") as f:
            driver = await DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_block_processor(len).load_car(f)
            if not isinstance(driver, NeedDisk):
                raise SystemExit(f"{path} fits in {mem_limit_mb} MiB: nothing to spill")
            async with await DiskBuilder().open() as store:
                _, disk = await driver.finish_loading(store)
                records = 0
                while (chunk := await disk.next_chunk(1024)) is not None:
                    records += len(chunk)
    finally:
        DiskStore.put_run_sync = put  # type: ignore[method-assign]
        DiskStore.lookup = lookup  # type: ignore[method-assign]
    return runs, nodes, chunks, records


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """``(thread CPU seconds, wall seconds)`` of ``fn()``."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def one_round(recorded: Recorded, cache_mb: int) -> dict[str, tuple[float, float]]:
    runs, nodes, chunks, _ = recorded
    store = anyio.run(lambda: DiskBuilder().with_cache_size_mb(cache_mb).open())
    out: dict[str, tuple[float, float]] = {}
    try:

        def store_runs() -> None:
            for run, large, size in runs:
                # the ids of a run's large payloads follow on from the store's, as when recorded
                store.put_run_sync(run, large, size)

        out["store runs"] = timed(store_runs)
        out["merge"] = timed(store.merge_sync)
        lookup = store.lookup(bytes)

        def node_lookups() -> None:
            for cid in nodes:
                lookup.node(cid)

        def record_lookups() -> None:
            for cids in chunks:
                lookup.fetch_many(cids)

        out["node look-ups"] = timed(node_lookups)
        out["record look-ups"] = timed(record_lookups)
    finally:
        anyio.run(store.close)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("car")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mem-limit-mb", type=float, default=10)
    parser.add_argument("--cache-mb", type=int, default=16)
    args = parser.parse_args()
    recorded = anyio.run(record_spill, args.car, args.mem_limit_mb)
    runs, nodes, chunks, records = recorded
    looked_up = sum(len(c) for c in chunks)
    print(f"{args.car}: {records} records; {len(runs)} runs, {sum(len(r) for r, _, _ in runs) / 1e6:.1f} MB; "
          f"{len(nodes)} node look-ups, {looked_up} record look-ups in {len(chunks)} chunks")
    results = [one_round(recorded, args.cache_mb) for _ in range(args.rounds)]
    for name in results[0]:
        cpu = statistics.median(r[name][0] for r in results)
        wall = statistics.median(r[name][1] for r in results)
        count = {"node look-ups": len(nodes), "record look-ups": looked_up}.get(name)
        per = f", {wall / count * 1e6:.2f} us each" if count else ""
        print(f"  {name:16} {wall:6.3f} s wall, {cpu:6.3f} s CPU{per}")


if __name__ == "__main__":
    main()
