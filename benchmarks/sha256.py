"""The C core's SHA-256: single-message speed and the firehose #commit pass that leans on it.

Two figures, each the median of several timed passes in a fresh process:

- ``sha256 MB/s``: ``_native.sha256`` over messages of one size (64 B, 330 B, 4 KiB, 1 MiB),
  MB = 10**6 bytes of message.
- ``commit_event us``: ``_native.commit_event`` (the one C pass of ``verify_commit``: frame, ops,
  the CAR with every block hashed against its CID, the commit, the tree work with its node and key
  hashes) over the first ``--events`` messages of the cached firehose stream of
  ``benchmarks/firehose.py`` (run that once first to make it), microseconds per event.

``--native A.so,B.so`` compares builds of the extension (e.g. one saved before a change and the
current one): each runs in its own process, alternated ``--rounds`` times (the machine may be
shared and noisy), and the medians of each build are printed side by side.

Usage::

    .venv/bin/python benchmarks/sha256.py [--events 5000] [--rounds 5] [--native before.so,after.so]
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
STREAM = ROOT / ".cache" / "firehose-50000-a500-s1.bin"
SIZES = (64, 330, 4096, 1 << 20)


def native(path: str | None) -> ModuleType:
    """repo_stream._native, or the build at `path` loaded in its place."""
    if path is None:
        from repo_stream import _native

        assert _native is not None
        return _native
    loader = importlib.machinery.ExtensionFileLoader("repo_stream._native", path)
    spec = importlib.util.spec_from_file_location("repo_stream._native", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules["repo_stream._native"] = module
    import repo_stream

    repo_stream._native = module  # type: ignore[attr-defined]
    return module


def sha256_rates(mod: ModuleType) -> dict[str, float]:
    """MB/s of mod.sha256 per message size: the median of 7 passes of ~8 MB each."""
    out = {}
    for size in SIZES:
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        n = max(1, 8_000_000 // size)
        runs = []
        for _ in range(7):
            started = time.perf_counter()
            for _ in range(n):
                mod.sha256(data)
            runs.append(n * size / (time.perf_counter() - started) / 1e6)
        out[str(size)] = statistics.median(runs)
    return out


def commit_event_us(mod: ModuleType, events: int) -> float:
    """Microseconds per event of mod.commit_event over the first `events` messages (median of 5)."""
    from firehose import load

    from repo_stream.records.values import Link
    from repo_stream.sync.verify import DEFAULT_MAX_BLOCK_SIZE, DEFAULT_MAX_DEPTH, MAX_BLOCKS_BYTES, MAX_OPS

    messages = load(STREAM)[:events]
    args = (True, Link, MAX_OPS, MAX_BLOCKS_BYTES, DEFAULT_MAX_BLOCK_SIZE, DEFAULT_MAX_DEPTH)
    for m in messages[:200]:
        assert mod.commit_event(m, *args) is not None
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        for m in messages:
            mod.commit_event(m, *args)
        runs.append((time.perf_counter() - started) / len(messages) * 1e6)
    return statistics.median(runs)


def child(path: str | None, events: int) -> None:
    mod = native(path)
    print(json.dumps({"sha256": sha256_rates(mod), "event_us": commit_event_us(mod, events)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--native", help="comma-separated paths of builds of the extension to compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.path, args.events)
        return
    if not STREAM.exists():
        sys.exit(f"error: {STREAM} missing: run benchmarks/firehose.py once to make it")
    builds: list[str | None] = list(args.native.split(",")) if args.native else [None]
    results: dict[str | None, list[dict[str, object]]] = {b: [] for b in builds}
    for _ in range(args.rounds):
        for build in builds:
            cmd = [sys.executable, __file__, "--child", "--events", str(args.events)] + (["--path", build] if build else [])
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
            results[build].append(json.loads(done.stdout))
    print("| build | " + " | ".join(f"sha256 {s} B MB/s" for s in SIZES) + " | commit_event us/event |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    for build, runs in results.items():
        rates = [statistics.median(float(r["sha256"][str(s)]) for r in runs) for s in SIZES]  # type: ignore[index]
        us = statistics.median(float(r["event_us"]) for r in runs)  # type: ignore[arg-type]
        each = ", ".join(f"{float(r['event_us']):.2f}" for r in runs)  # type: ignore[arg-type]
        print(f"| {build or 'repo_stream._native'} | " + " | ".join(f"{x:.0f}" for x in rates) + f" | {us:.2f} ({each}) |")


if __name__ == "__main__":
    main()
