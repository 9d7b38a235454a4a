"""The SQLite spill store in isolation: insert and look-up rows per second on a real spill.

Usage: python benchmarks/spill_store.py REPO.car [--rounds 3] [--mem-limit-mb 10] [--cache-mb 32]

First it spills the CAR once as ``stats`` does (block processor ``len``), recording every insert
batch handed to the store and, in walk order, the CIDs the walker asks to prefetch for each node
it expands. Then, ``--rounds`` times, into a fresh temporary store, it times (thread CPU time and
wall time, printed as medians):

* ``insert``: every recorded batch through ``put_batch_sync``, then ``merge_sync``;
* ``walk look-ups``: the walker's protocol: ``prefetch`` of a node's CIDs, then ``processed``
  (records) or ``node`` (subtrees) for each;
* ``fetch_many per node``: one ``fetch_many`` per expanded node, as a native walker would;
* ``fetch_many per 64``: the same CIDs, 64 per call.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from repo_stream import DiskBuilder, DriverBuilder, NeedDisk
from repo_stream.disk import DiskStore


async def record_spill(path: str, mem_limit_mb: float) -> tuple[list[tuple[list[Any], int]], list[tuple[list[bytes], list[bool]]], int]:
    """Spill ``path``; return the insert batches, the prefetch groups (CIDs, is-node flags) and the record count."""
    batches: list[tuple[list[Any], int]] = []
    groups: list[tuple[list[bytes], list[bool]]] = []
    put = DiskStore.put_batch_sync
    lookup = DiskStore.lookup

    def recording_put(self: DiskStore, rows: list[Any], size: int) -> None:
        batches.append((list(rows), size))
        put(self, rows, size)

    class Recorder:
        def __init__(self, inner: Any) -> None:
            self.inner = inner
            self.nodes: set[bytes] = set()

        def prefetch(self, cids: list[bytes]) -> None:
            groups.append((list(cids), []))
            self.inner.prefetch(cids)

        def node(self, cid: bytes) -> Any:
            self.nodes.add(cid)
            return self.inner.node(cid)

        def processed(self, cid: bytes, default: Any) -> Any:
            return self.inner.processed(cid, default)

        def raw(self, cid: bytes) -> Any:
            return self.inner.raw(cid)

        def fetch_many(self, cids: list[bytes]) -> Any:  # the C walker's record values, a chunk at a time
            groups.append((list(cids), []))
            return self.inner.fetch_many(cids)

    recorders: list[Recorder] = []

    def recording_lookup(self: DiskStore, decode: Callable[[bytes], Any]) -> Any:
        recorders.append(Recorder(lookup(self, decode)))
        return recorders[-1]

    DiskStore.put_batch_sync = recording_put  # type: ignore[method-assign]
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
        DiskStore.put_batch_sync = put  # type: ignore[method-assign]
        DiskStore.lookup = lookup  # type: ignore[method-assign]
    nodes = recorders[0].nodes
    for cids, flags in groups:
        flags.extend(cid in nodes for cid in cids)
    return batches, groups, records


def timed(fn: Callable[[], None]) -> tuple[float, float]:
    """``(thread CPU seconds, wall seconds)`` of ``fn()``."""
    cpu, wall = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - cpu, time.perf_counter() - wall


def one_round(batches: list[tuple[list[Any], int]], groups: list[tuple[list[bytes], list[bool]]], cache_mb: int) -> dict[str, tuple[float, float]]:
    store = anyio.run(lambda: DiskBuilder().with_cache_size_mb(cache_mb).open())
    out: dict[str, tuple[float, float]] = {}
    try:

        def insert() -> None:
            for rows, size in batches:
                store.put_batch_sync(list(rows), size)
            store.merge_sync()

        out["insert"] = timed(insert)
        lookup = store.lookup(bytes)
        missing = object()

        def walk_lookups() -> None:
            for cids, is_node in groups:
                lookup.prefetch(cids)
                for cid, node in zip(cids, is_node, strict=True):
                    if node:
                        lookup.node(cid)
                    elif lookup.processed(cid, missing) is missing:
                        lookup.raw(cid)

        every = [cid for cids, _ in groups for cid in cids]
        sixty_fours = [every[i : i + 64] for i in range(0, len(every), 64)]

        def per_node() -> None:
            for cids, _ in groups:
                lookup.fetch_many(cids)

        def per_64() -> None:
            for cids in sixty_fours:
                lookup.fetch_many(cids)

        out["walk look-ups"] = timed(walk_lookups)
        out["fetch_many per node"] = timed(per_node)
        out["fetch_many per 64"] = timed(per_64)
    finally:
        anyio.run(store.close)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("car")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mem-limit-mb", type=float, default=10)
    parser.add_argument("--cache-mb", type=int, default=32)
    args = parser.parse_args()
    batches, groups, records = anyio.run(record_spill, args.car, args.mem_limit_mb)
    rows = sum(len(r) for r, _ in batches)
    looked_up = sum(len(c) for c, _ in groups)
    print(f"{args.car}: {records} records; {rows} rows in {len(batches)} batches, "
          f"{sum(s for _, s in batches) / 1e6:.1f} MB; {looked_up} look-ups in {len(groups)} nodes")
    gc.collect()
    gc.disable()  # the recorded rows are millions of objects: keep collections out of the timings
    rounds = [one_round(batches, groups, args.cache_mb) for _ in range(args.rounds)]
    for name in rounds[0]:
        n = rows if name == "insert" else looked_up
        cpu = statistics.median(r[name][0] for r in rounds)
        wall = statistics.median(r[name][1] for r in rounds)
        print(f"  {name:20} {1e6 * cpu / n:6.2f} us/row CPU ({n / cpu / 1e3:5.0f} k rows/s), wall {wall:6.2f} s")


if __name__ == "__main__":
    main()
