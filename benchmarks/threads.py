"""Two threads walking two repos at once, against the same two walks one after the other.

    python benchmarks/threads.py [--profile small] [--size 100000] [--runs 5]

Each walk is ``repo_stream.cli.stats`` (the whole ``stats`` job, in memory) run by ``anyio.run``
in its own OS thread, on a generated shuffled repo (``generate_cached``). The C core holds the
GIL while it loads and walks, except for the ``--verify`` hashing, which runs on a helper thread
of its own; the speed-up printed (one after the other / both at once; 2.0 would be perfect
overlap) shows how much two threads gain, with and without ``--verify``. Medians of ``--runs``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parents[1]


def walk(path: str, verify: bool) -> None:
    from repo_stream.cli import stats

    result = anyio.run(functools.partial(stats, path, mem_limit_mb=4096, verify=verify))
    assert not result["spilled"], result


def one_after_the_other(path: str, verify: bool) -> float:
    started = time.perf_counter()
    walk(path, verify)
    walk(path, verify)
    return time.perf_counter() - started


def both_at_once(path: str, verify: bool) -> float:
    threads = [threading.Thread(target=walk, args=(path, verify)) for _ in range(2)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="small")
    parser.add_argument("--size", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from repo_stream import IMPLEMENTATION
    from repo_stream.records.generate import generate_cached

    path = str(generate_cached(args.size, seed=0, order="shuffled", cache_dir=ROOT / ".cache" / "cars", profile=args.profile))
    print(f"{path}: {args.size:,} records, implementation {IMPLEMENTATION}, medians of {args.runs}")
    for verify in (False, True):
        walk(path, verify)  # warm: imports, page cache
        serial, parallel = [], []
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            serial.append(one_after_the_other(path, verify))
            parallel.append(both_at_once(path, verify))
        s, p = statistics.median(serial), statistics.median(parallel)
        label = "stats --verify" if verify else "stats"
        print(f"  {label:<15} two walks one after the other {s:6.3f} s, in two threads at once {p:6.3f} s: {s / p:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
