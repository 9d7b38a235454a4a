"""``dump`` against ``ls`` and against libipld + json.dumps, in the same run (issue 22's targets).

    python benchmarks/dump.py [--rounds 5] [--n 500000] [--profile small]

Each round runs, one after the other in a fresh process each, with standard output to
``/dev/null``:

* ``ls``: ``python -m repo_stream ls PATH --mem-limit-mb 4096`` (in memory);
* ``dump``: ``python -m repo_stream dump PATH --mem-limit-mb 4096`` (in memory);
* ``dump-64``: ``python -m repo_stream dump PATH --mem-limit-mb 64`` (the default limit: spills);
* ``prev-dump`` / ``prev-dump-64``: the same as ``dump`` was before the walker wrote its lines
  (``benchmarks/dump_child.py``);
* ``libipld-json``: ``benchmarks/peers.py libipld-json PATH`` (decode_car, key-order walk,
  ``json.dumps`` of each record's line);
* ``old-dump``: ``dump`` as it was before the transcoder (``benchmarks/dump_child.py``);
* ``stats``: ``python -m repo_stream stats PATH --mem-limit-mb 4096`` (the tuple walk);
* ``tuple-walk``: the same in-memory walk as ``arrow-raw`` making ``(key, cid, bytes)`` tuples
  (``next_chunk(65536)``), the items kept in a list (``benchmarks/dump_child.py``);
* ``arrow-raw`` / ``arrow-json`` / ``arrow-json-processor``: the repo into one ``pyarrow.Table``
  of raw / JSON-text values (``benchmarks/dump_child.py``).

Each child's wall time and CPU time (user + system, from ``os.wait4``; imports included) and
peak RSS (``ru_maxrss``). Prints the per-round figures, then the medians and the ratios of the
medians, and the targets' verdicts (the machine is shared with other work: CPU time is the
steadier figure; compare within one run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def timed(argv: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds (user + system), peak RSS in MB) of one child process; raises if
    it fails."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, stdout=null, stderr=subprocess.PIPE)
        _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({status}): {err}")
    return seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--profile", default="small")
    parser.add_argument("--only", nargs="*", help="methods to run (default all)")
    args = parser.parse_args()
    from repo_stream.records.generate import generate_cached

    path = str(generate_cached(args.n, profile=args.profile))
    py = sys.executable
    methods = {
        "ls": [py, "-m", "repo_stream", "ls", path, "--mem-limit-mb", "4096"],
        "dump": [py, "-m", "repo_stream", "dump", path, "--mem-limit-mb", "4096"],
        "dump-64": [py, "-m", "repo_stream", "dump", path, "--mem-limit-mb", "64"],
        "prev-dump": [py, str(HERE / "dump_child.py"), "prev-dump", path],
        "prev-dump-64": [py, str(HERE / "dump_child.py"), "prev-dump-64", path],
        "libipld-json": [py, str(HERE / "peers.py"), "libipld-json", path],
        "old-dump": [py, str(HERE / "dump_child.py"), "old-dump", path],
        "stats": [py, "-m", "repo_stream", "stats", path, "--mem-limit-mb", "4096", "--json"],
        "tuple-walk": [py, str(HERE / "dump_child.py"), "tuple-walk", path],
        "arrow-raw": [py, str(HERE / "dump_child.py"), "arrow-raw", path],
        "arrow-json": [py, str(HERE / "dump_child.py"), "arrow-json", path],
        "arrow-json-processor": [py, str(HERE / "dump_child.py"), "arrow-json-processor", path],
    }
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only}
    size_mb = os.path.getsize(path) / 1e6
    print(f"{path}: {size_mb:.1f} MB, {args.n} records; {args.rounds} rounds", flush=True)
    results: dict[str, list[tuple[float, float, float]]] = {k: [] for k in methods}
    for r in range(args.rounds):
        for name, argv in methods.items():
            got = timed(argv)
            results[name].append(got)
            print(f"round {r + 1} {name:21s} {got[0]:7.3f} s wall {got[1]:7.3f} s CPU {got[2]:7.1f} MB", flush=True)
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in results.items()}
    print("\nmedians (wall, CPU = user + system, peak RSS):")
    for k, (s, c, m) in med.items():
        print(f"  {k:21s} {s:7.3f} s wall {c:7.3f} s CPU {m:7.1f} MB  {args.n / s / 1e3:7.0f}k records/s (wall)")

    def ratio(a: str, b: str, what: str) -> None:
        if a in med and b in med:
            print(f"{a} / {b}: {med[a][0] / med[b][0]:.2f}x wall, {med[a][1] / med[b][1]:.2f}x CPU ({what})")

    print("\nratios of the medians:")
    ratio("libipld-json", "dump", "target >= 2")
    ratio("dump", "ls", "target <= 2.5")
    ratio("old-dump", "dump", "")
    ratio("prev-dump", "dump", "")
    ratio("prev-dump-64", "dump-64", "")
    ratio("stats", "arrow-raw", "target >= 1.8")
    ratio("tuple-walk", "arrow-raw", "the same walk making (key, cid, bytes) tuples")
    ratio("old-dump", "arrow-json", "target >= 4")
    ratio("libipld-json", "arrow-json", "")
    ratio("arrow-json", "ls", "")
    ratio("old-dump", "arrow-json-processor", "")
    if "dump" in med:
        print(f"dump peak RSS - CAR size: {med['dump'][2] - size_mb:.1f} MB (target <= 60)")
    if "prev-dump" in med:
        print(f"prev-dump peak RSS - CAR size: {med['prev-dump'][2] - size_mb:.1f} MB")
    if "dump-64" in med:
        print(f"dump --mem-limit-mb 64 peak RSS: {med['dump-64'][2]:.1f} MB (target <= 200)")
    if "prev-dump-64" in med:
        print(f"prev-dump-64 peak RSS: {med['prev-dump-64'][2]:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
