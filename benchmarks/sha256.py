"""The C core's SHA-256: single-message speed and the firehose #commit pass that leans on it.

Two figures, medians of several timed passes:

- ``sha256 MB/s``: ``_native.sha256`` over messages of one size (64 B, 330 B, 4 KiB, 1 MiB),
  MB = 10**6 bytes of message.
- ``commit_event us``: ``_native.commit_event`` (the one C pass of ``verify_commit``: frame, ops,
  the CAR with every block hashed against its CID, the commit, the tree work with its node and key
  hashes) over the first ``--events`` messages of the cached firehose stream of
  ``benchmarks/firehose.py`` (run that once first to make it), CPU microseconds per event.

``--native A.so,B.so`` compares builds of the extension (e.g. one saved before a change and the
current one): all are loaded side by side in one process and alternated pass by pass (10 passes
of each in each of ``--rounds`` processes: the machine may be shared and noisy); the medians of
each build are printed side by side, with the median of each pass's difference to the pass of
the first build next to it.

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
    """repo_stream._native, or the build at `path` loaded beside it (set up as the package sets up its own)."""
    from repo_stream import _native
    from repo_stream.core import blocks, cid, messages

    assert _native is not None
    if path is None:
        return _native
    loader = importlib.machinery.ExtensionFileLoader("repo_stream._native", path)
    spec = importlib.util.spec_from_file_location("repo_stream._native", path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    module.setup(messages=messages, not_a_node=blocks.NOT_A_NODE, cid_text=cid.cid_text)
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


def commit_event_passes(mods: list[ModuleType], messages: list[bytes], passes: int) -> list[list[float]]:
    """CPU microseconds per event of each module's commit_event over `messages`: `passes` passes
    of each, the modules alternated pass by pass (in turn first and last)."""
    from repo_stream.core.car import DEFAULT_MAX_BLOCK_SIZE
    from repo_stream.core.walk import DEFAULT_MAX_DEPTH
    from repo_stream.records.values import Link
    from repo_stream.sync.verify import MAX_BLOCKS_BYTES, MAX_OPS

    args = (True, Link, MAX_OPS, MAX_BLOCKS_BYTES, DEFAULT_MAX_BLOCK_SIZE, DEFAULT_MAX_DEPTH)
    for mod in mods:
        for m in messages[:200]:
            assert mod.commit_event(m, *args) is not None
    out: list[list[float]] = [[] for _ in mods]
    for k in range(passes):
        # the order reversed every other pass (ABBA), so that neither build always runs first
        for i in range(len(mods)) if k % 2 == 0 else reversed(range(len(mods))):
            mod = mods[i]
            started = time.process_time()
            for m in messages:
                mod.commit_event(m, *args)
            out[i].append((time.process_time() - started) / len(messages) * 1e6)
    return out


def child(paths: list[str | None], events: int) -> None:
    """Each build's figures, the builds loaded side by side in this one process and alternated."""
    from firehose import load

    mods = [native(p) for p in paths]
    messages = load(STREAM)[:events]
    passes = commit_event_passes(mods, messages, 10)
    print(json.dumps([{"sha256": sha256_rates(mod), "event_us": us} for mod, us in zip(mods, passes, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--native", help="comma-separated paths of builds of the extension to compare")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.path or [None], args.events)
        return
    if not STREAM.exists():
        sys.exit(f"error: {STREAM} missing: run benchmarks/firehose.py once to make it")
    builds: list[str | None] = list(args.native.split(",")) if args.native else [None]
    results: dict[str | None, list[dict[str, object]]] = {b: [] for b in builds}
    for _ in range(args.rounds):
        cmd = [sys.executable, __file__, "--child", "--events", str(args.events)]
        for build in builds:
            cmd += ["--path", build] if build else []
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
        for build, run in zip(builds, json.loads(done.stdout), strict=True):
            results[build].append(run)
    print("| build | " + " | ".join(f"sha256 {s} B MB/s" for s in SIZES) + " | commit_event us/event | paired difference to the first |")
    print("|---|" + "---|" * (len(SIZES) + 2))
    first = [u for r in results[builds[0]] for u in r["event_us"]]  # type: ignore[attr-defined]
    for build, runs in results.items():
        rates = [statistics.median(float(r["sha256"][str(s)]) for r in runs) for s in SIZES]  # type: ignore[index]
        us = [float(u) for r in runs for u in r["event_us"]]  # type: ignore[attr-defined]
        # each pass runs next to the first build's in the same process: the differences are less noisy
        diff = statistics.median(u - f for u, f in zip(us, first, strict=True))
        print(
            f"| {build or 'repo_stream._native'} | "
            + " | ".join(f"{x:.0f}" for x in rates)
            + f" | {statistics.median(us):.2f} (min {min(us):.2f}, max {max(us):.2f}, {len(us)} passes) | {diff:+.2f} |"
        )

if __name__ == "__main__":
    main()
