"""``dump`` against ``ls`` and against libipld + json.dumps, in the same run (issue 22's targets).

    python benchmarks/dump.py [--rounds 5] [--n 500000] [--profile small]

Each round runs, one after the other in a fresh process each, with standard output to
``/dev/null``:

* ``ls``: ``python -m repo_stream ls PATH --mem-limit-mb 4096`` (in memory);
* ``dump``: ``python -m repo_stream dump PATH --mem-limit-mb 4096`` (in memory);
* ``dump-64``: ``python -m repo_stream dump PATH --mem-limit-mb 64`` (the default limit: spills);
* ``libipld-json``: ``benchmarks/peers.py libipld-json PATH`` (decode_car, key-order walk,
  ``json.dumps`` of each record's line);
* ``old-dump``: ``dump`` as it was before the transcoder (``benchmarks/dump_child.py``);
* ``stats``: ``python -m repo_stream stats PATH --mem-limit-mb 4096`` (the tuple walk);
* ``arrow-raw`` / ``arrow-json``: the repo into one ``pyarrow.Table`` of raw / JSON-text values
  (``benchmarks/dump_child.py``).

Time is the whole process's wall time (imports included, for all four); peak RSS is the child's
``ru_maxrss`` from ``os.wait4``. Prints the per-round figures, then the medians and the ratios
of the medians, and the targets' verdicts (the machine is shared: compare within one run).
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


def timed(argv: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process; raises if it fails."""
    started = time.perf_counter()
    with open(os.devnull, "wb") as null:
        proc = subprocess.Popen(argv, stdout=null, stderr=subprocess.PIPE)
        _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode() if proc.stderr else ""
    if status != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({status}): {err}")
    return seconds, usage.ru_maxrss / 1024


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
        "libipld-json": [py, str(HERE / "peers.py"), "libipld-json", path],
        "old-dump": [py, str(HERE / "dump_child.py"), "old-dump", path],
        "stats": [py, "-m", "repo_stream", "stats", path, "--mem-limit-mb", "4096", "--json"],
        "arrow-raw": [py, str(HERE / "dump_child.py"), "arrow-raw", path],
        "arrow-json": [py, str(HERE / "dump_child.py"), "arrow-json", path],
    }
    if args.only:
        methods = {k: v for k, v in methods.items() if k in args.only}
    size_mb = os.path.getsize(path) / 1e6
    print(f"{path}: {size_mb:.1f} MB, {args.n} records; {args.rounds} rounds", flush=True)
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
    for r in range(args.rounds):
        for name, argv in methods.items():
            s, rss = timed(argv)
            results[name].append((s, rss))
            print(f"round {r + 1} {name:13s} {s:7.3f} s  {rss:7.1f} MB", flush=True)
    med = {k: (statistics.median(s for s, _ in v), statistics.median(m for _, m in v)) for k, v in results.items()}
    print("\nmedians:")
    for k, (s, m) in med.items():
        print(f"  {k:13s} {s:7.3f} s  {m:7.1f} MB peak RSS  {args.n / s / 1e3:7.0f}k records/s")
    if "dump" in med and "libipld-json" in med:
        print(f"libipld-json / dump: {med['libipld-json'][0] / med['dump'][0]:.2f}x (target >= 2)")
    if "dump" in med and "ls" in med:
        print(f"dump / ls: {med['dump'][0] / med['ls'][0]:.2f}x (target <= 2.5)")
    if "old-dump" in med and "dump" in med:
        print(f"old-dump / dump: {med['old-dump'][0] / med['dump'][0]:.2f}x")
    if "stats" in med and "arrow-raw" in med:
        print(f"stats / arrow-raw: {med['stats'][0] / med['arrow-raw'][0]:.2f}x (target >= 1.8)")
    if "old-dump" in med and "arrow-json" in med:
        print(f"old-dump / arrow-json: {med['old-dump'][0] / med['arrow-json'][0]:.2f}x (target >= 4)")
    if "dump" in med:
        print(f"dump peak RSS - CAR size: {med['dump'][1] - size_mb:.1f} MB (target <= 60)")
    if "dump-64" in med:
        print(f"dump --mem-limit-mb 64 peak RSS: {med['dump-64'][1]:.1f} MB (target <= 200)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
