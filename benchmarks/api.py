"""The high-level API's cost: ``open_repo`` and ``iter_records`` against the low-level drivers.

Each run walks every record of one repo in memory and counts records and value bytes (raw
values: the walk itself is what is measured, not a record decoder). The ways, in one process,
interleaved round by round so that a slow phase of the machine hits each alike:

- ``drivers``: ``DriverBuilder().with_record_cids(True)`` + ``async for key, cid, value in driver``
  (the low-level API, what ``open_repo`` is built on);
- ``open_repo``: ``async with open_repo(path, values="raw") as repo: async for record in repo``;
- ``iter_records``: ``for record in iter_records(path, values="raw")`` (no event loop in sight:
  the walk runs in a worker thread's loop, a chunk at a time);
- ``async for`` of ``open_repo``'s ``next_chunk`` (1,024 records a chunk), for reference.

Usage::

    .venv/bin/python benchmarks/api.py [--n 500000] [--profile small] [--rounds 7]

Prints a Markdown table of medians (seconds, records/s, ratio to ``drivers``).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio

from repo_stream import IMPLEMENTATION, DriverBuilder, MemoryDriver, iter_records, open_repo
from repo_stream.records.generate import generate_cached


def by_drivers(path: Path) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        async with await anyio.open_file(path, "rb") as f:
            driver = await DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True).load_car(f)
            assert isinstance(driver, MemoryDriver)
            n = size = 0
            async for _key, _cid, value in driver:
                n += 1
                size += len(value)
            return n, size

    return anyio.run(run)


def by_open_repo(path: Path) -> tuple[int, int]:
    async def run() -> tuple[int, int]:
        async with open_repo(path, values="raw", mem_limit_mb=4096) as repo:
            n = size = 0
            async for record in repo:
                n += 1
                size += len(record.value)
            return n, size

    return anyio.run(run)


def by_iter_records(path: Path) -> tuple[int, int]:
    n = size = 0
    for record in iter_records(path, values="raw", mem_limit_mb=4096):
        n += 1
        size += len(record.value)
    return n, size


WAYS: dict[str, Callable[[Path], tuple[int, int]]] = {
    "drivers": by_drivers,
    "open_repo": by_open_repo,
    "iter_records": by_iter_records,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000, help="records (default 500000)")
    parser.add_argument("--profile", default="small", help="generator profile (default small: ~190-byte records)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds; medians are reported (default 7)")
    args = parser.parse_args()
    path = generate_cached(args.n, profile=args.profile)
    times: dict[str, list[float]] = {name: [] for name in WAYS}
    results = set()
    for _ in range(args.rounds):
        for name, way in WAYS.items():
            gc.collect()
            start = time.perf_counter()
            results.add(way(path))
            times[name].append(time.perf_counter() - start)
    if len(results) != 1:
        sys.exit(f"the ways disagree: {results}")
    (records, _), = results
    base = statistics.median(times["drivers"])
    print(f"{path.name}: {records:,} records, {path.stat().st_size / 1e6:.0f} MB, implementation {IMPLEMENTATION}, "
          f"medians of {args.rounds} rounds\n")
    print("| Way | Seconds (median) | Range | Records/s | vs drivers |")
    print("|:--|--:|--:|--:|--:|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.3f} | {min(values):.3f}-{max(values):.3f} | {records / median / 1e3:,.0f} k | {median / base:.2f}x |")


if __name__ == "__main__":
    main()
