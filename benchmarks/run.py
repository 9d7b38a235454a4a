"""Benchmark repo-stream's full repo walk (both implementations, in memory, spilled, --verify) against atmst and libipld.

    python benchmarks/run.py [--profiles small,default] [--sizes 10000,100000,500000] [--runs 3]
                             [--methods M,M,...] [--no-exact] [--markdown-out FILE] [--json-out FILE]

For each profile and size, a generated shuffled repo CAR (``repo_stream.records.generate.generate_cached``,
cached in ``.cache/cars`` at the repo root) is walked in full, in key order, by each method below,
``--runs`` times, each walk in its own fresh process, timed from ``Popen`` to the reap (the whole
process). The child reports the seconds from just before it opens the file to the end of the walk,
and its own peak RSS: ``VmHWM`` of ``/proc/self/status`` as it exits (a small wrapper runs the
command and writes it to a file). Not ``ru_maxrss`` from ``os.wait4``: on Linux that starts at the
parent's peak (the child is spawned with ``vfork``, and ``execve`` keeps the old address space's
high-water mark), so every row would show at least this script's own peak, e.g. after it generated
a CAR. ``ru_maxrss`` is the fallback where ``/proc`` is missing.

Methods (``--methods``; the first eight run by default):

* ``read``: read the file into memory, nothing else (``peers.py``): the floor.
* ``rs-memory``: ``python -m repo_stream stats PATH --json --mem-limit-mb 4096`` (never spills),
  with whichever implementation the package picks (the C extension when it is built).
* ``rs-memory-py``: the same with ``REPO_STREAM_PURE_PYTHON=1``: the pure-Python reference.
* ``rs-spilled``: ``stats --mem-limit-mb 10`` (1 MiB for a repo that fits in 10 MiB; the row says so).
* ``rs-verify``: ``stats --verify --mem-limit-mb 4096``.
* ``atmst``, ``libipld``, ``libipld-nogc``: the peers, as written in ``benchmarks/peers.py``.
* ``rs-spilled-py``, ``rs-verify-py`` (not by default): the spilled and --verify rows with
  ``REPO_STREAM_PURE_PYTHON=1``.

repo-stream rows are labelled with the ``implementation`` that ``stats --json`` reports
(``"python"`` when the key is absent, as before the C extension). Checks, any failure of which
stops the script: every run of every method emits exactly the generator's record count and records
per collection (and record-byte sum, where the method has block bytes); the in-memory rows do not
spill and the spilled rows do; the pure-Python rows report ``python``. Unless ``--no-exact``, each
repo-stream configuration also walks the repo once, untimed, with raw blocks as values
(``exact.py walk``), and the sha256 of its ``(key, block)`` sequence must equal that of the
generator's records sorted by key (``exact.py expected``, cached next to the CAR). A spilled run
that leaves anything in its private ``TMPDIR`` fails the "spill file removed" target.

At the end: a Markdown table and the issue's target checks (PASS/FAIL with the figures), for the
small-record profile and, for information, the default one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
CACHE_DIR = ROOT / ".cache" / "cars"
SEED = 0

MEMORY_LIMIT_MB = 4096.0  # large enough that the in-memory rows never spill
SPILL_LIMIT_MB = 10.0
# A repo that fits in SPILL_LIMIT_MB (10,000 records does) is spilled at this limit instead, so that
# the spilled row always measures a walk from SQLite; its label says so.
SMALL_SPILL_LIMIT_MB = 1.0
PURE_ENV = "REPO_STREAM_PURE_PYTHON"


@dataclass(frozen=True)
class Method:
    id: str
    kind: str  # "rs" (python -m repo_stream stats) or "peer" (peers.py)
    mode: str = ""  # rs: "memory", "spilled" or "verify"
    pure: bool = False  # rs: REPO_STREAM_PURE_PYTHON=1

    @property
    def verify(self) -> bool:
        return self.mode == "verify"


METHODS = {
    m.id: m
    for m in [
        Method("read", "peer"),
        Method("rs-memory", "rs", "memory"),
        Method("rs-memory-py", "rs", "memory", pure=True),
        Method("rs-spilled", "rs", "spilled"),
        Method("rs-verify", "rs", "verify"),
        Method("atmst", "peer"),
        Method("libipld", "peer"),
        Method("libipld-nogc", "peer"),
        Method("rs-spilled-py", "rs", "spilled", pure=True),
        Method("rs-verify-py", "rs", "verify", pure=True),
    ]
}
DEFAULT_METHODS = ["read", "rs-memory", "rs-memory-py", "rs-spilled", "rs-verify", "atmst", "libipld", "libipld-nogc"]
PEER_TITLES = {
    "read": "read the file, nothing else",
    "atmst": "atmst",
    "libipld": "libipld decode_car + walk, GC on",
    "libipld-nogc": "libipld decode_car + walk, GC disabled",
}
PROFILES = ("small", "default")


class BenchError(Exception):
    """The benchmark cannot give a valid figure: a walk failed or emitted the wrong records."""


def label(m: Method, implementation: str | None, spill_limit: float) -> str:
    if m.kind == "peer":
        return PEER_TITLES[m.id]
    what = {"memory": "in memory", "spilled": f"spilled, {spill_limit:g} MiB", "verify": "--verify"}[m.mode]
    impl = implementation or "python"
    return f"repo-stream {what} [{impl}{', ' + PURE_ENV + '=1' if m.pure else ''}]"


# --------------------------------------------------------------------------------------------
# Running one child
# --------------------------------------------------------------------------------------------


def _env(tmp: str, pure: bool) -> dict[str, str]:
    env = dict(os.environ, TMPDIR=tmp, PYTHONHASHSEED="0")
    env.pop("PYTHONTRACEMALLOC", None)
    # Bytecode caching as Python does it by default (and pip's installs, which compile every
    # module): without it, each fresh process compiles repo-stream's modules again (~60 ms).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop(PURE_ENV, None)
    if pure:
        env[PURE_ENV] = "1"
    return env


class _Watcher:
    """Lists a folder every 20 ms in a thread and keeps every name seen (the spill store's)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.seen.update(os.listdir(self.folder))
            except OSError:
                pass

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join()
        return sorted(self.seen)


# Runs a Python command (``-m MODULE``, ``-c CODE`` or ``SCRIPT``, then its arguments) and, as the
# process exits, writes its peak RSS (``VmHWM``, KiB) to the file named first: the exec'd process's
# own address space, whatever the parent's size.
_PEAK_WRAPPER = """\
import atexit, os, runpy, sys
out, kind, target, *rest = sys.argv[1:]
def report():
    try:
        with open("/proc/self/status") as status:
            kib = next(line.split()[1] for line in status if line.startswith("VmHWM:"))
        with open(out, "w") as f:
            f.write(kib)
    except (OSError, StopIteration):
        pass
atexit.register(report)
sys.argv = [target, *rest]
if kind == "-m":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
elif kind == "-c":
    sys.argv[0] = "-c"
    exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
else:
    sys.path[0] = os.path.dirname(os.path.abspath(target))
    runpy.run_path(target, run_name="__main__")
"""


def _with_peak_report(argv: list[str], out: str) -> list[str]:
    """``argv`` (``[sys.executable, ...]``) run under :data:`_PEAK_WRAPPER`, which writes to ``out``."""
    kind, target, rest = (argv[1], argv[2], argv[3:]) if argv[1] in ("-m", "-c") else ("path", argv[1], argv[2:])
    return [argv[0], "-c", _PEAK_WRAPPER, out, kind, target, *rest]


def run_child(argv: list[str], *, pure: bool = False, watch: bool = False) -> dict[str, Any]:
    """Run ``argv`` (``[sys.executable, ...]``) in a fresh process (cwd: repo root, private
    ``TMPDIR``); return its last JSON line.

    Adds ``process_s`` (Popen to reap, seconds), ``peak_rss`` (bytes: the child's own peak,
    ``VmHWM`` as it exits; ``ru_maxrss`` where there is no ``/proc``), ``peak_rss_from``
    (``"VmHWM"`` or ``"ru_maxrss"``), ``tmp_left`` (names left in its ``TMPDIR``, which is then
    removed) and, with ``watch``, ``tmp_seen`` (names seen there during the run).
    """
    tmp = tempfile.mkdtemp(prefix="rs-bench-tmp-")
    peak_fd, peak_file = tempfile.mkstemp(prefix="rs-bench-peak-")
    os.close(peak_fd)
    watcher = _Watcher(tmp) if watch else None
    try:
        with tempfile.TemporaryFile() as err:
            started = time.perf_counter()
            command = _with_peak_report(argv, peak_file)
            proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=_env(tmp, pure), cwd=ROOT)
            assert proc.stdout is not None
            out = proc.stdout.read()
            proc.stdout.close()
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - started
            proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
            seen = watcher.stop() if watcher else []
            if proc.returncode != 0:
                err.seek(0)
                raise BenchError(
                    f"{' '.join(argv[1:])} exited with {proc.returncode}:\n{err.read().decode(errors='replace')}"
                )
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        result["tmp_left"] = sorted(os.listdir(tmp))
        with open(peak_file) as f:
            own_kib = f.read().strip()
    finally:
        if watcher is not None and not watcher._stop.is_set():
            watcher.stop()
        shutil.rmtree(tmp, ignore_errors=True)
        os.unlink(peak_file)
    result["tmp_seen"] = seen
    result["process_s"] = wall
    if own_kib:
        result["peak_rss"], result["peak_rss_from"] = int(own_kib) * 1024, "VmHWM"
    else:  # no /proc: ru_maxrss, which counts the parent's peak too (KiB on Linux)
        result["peak_rss"], result["peak_rss_from"] = usage.ru_maxrss * 1024, "ru_maxrss"
    return result


def measure(m: Method, path: Path, spill_limit: float) -> dict[str, Any]:
    """One timed walk of ``path`` by method ``m``; ``seconds`` is the child's from-file-open time."""
    if m.kind == "peer":
        return run_child([sys.executable, str(HERE / "peers.py"), m.id, str(path)])
    limit = spill_limit if m.mode == "spilled" else MEMORY_LIMIT_MB
    argv = [sys.executable, "-m", "repo_stream", "stats", str(path), "--json", "--mem-limit-mb", f"{limit:g}"]
    if m.verify:
        argv.append("--verify")
    result = run_child(argv, pure=m.pure, watch=m.mode == "spilled")
    result.setdefault("implementation", "python")
    return result


# --------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------


def expected_figures(path: Path, n: int, profile: str) -> dict[str, Any]:
    """The generator's figures for ``path`` (see ``exact.py expected``), cached next to it."""
    stat = path.stat()
    cache = path.with_name(path.name + ".expected.json")
    stamp = {"car_bytes": stat.st_size, "car_mtime_ns": stat.st_mtime_ns, "n": n, "seed": SEED, "profile": profile}
    try:
        cached = json.loads(cache.read_text())
        if all(cached.get(k) == v for k, v in stamp.items()):
            return dict(cached)
    except (OSError, ValueError):
        pass
    started = time.perf_counter()
    figures = run_child([sys.executable, str(HERE / "exact.py"), "expected", str(n), str(SEED), profile])
    out = {**stamp, **{k: figures[k] for k in ("records", "record_bytes", "collections", "digest")}}
    cache.write_text(json.dumps(out))
    print(f"  expected figures from the generator ({time.perf_counter() - started:.1f} s, cached in {cache.name})", flush=True)
    return out


def check_run(m: Method, r: dict[str, Any], want: dict[str, Any], where: str) -> None:
    """Stop unless the run emitted exactly the expected records (count, collections, bytes)."""
    if m.id == "read":
        return
    got_collections = dict(sorted(r["collections"].items()))
    if r["records"] != want["records"] or got_collections != want["collections"]:
        raise BenchError(
            f"{m.id} on {where}: {r['records']} records, collections {got_collections}; "
            f"expected {want['records']}, {want['collections']}"
        )
    if r.get("record_bytes") is not None and r["record_bytes"] != want["record_bytes"]:
        raise BenchError(f"{m.id} on {where}: record bytes {r['record_bytes']}, expected {want['record_bytes']}")
    if m.kind == "rs":
        if r["spilled"] != (m.mode == "spilled"):
            raise BenchError(f"{m.id} on {where}: spilled={r['spilled']}, expected {m.mode == 'spilled'}")
        if m.pure and r["implementation"] != "python":
            raise BenchError(f"{m.id} on {where}: {PURE_ENV}=1 but stats reports implementation {r['implementation']!r}")


def exact_walk(m: Method, path: Path, spill_limit: float) -> dict[str, Any]:
    limit = spill_limit if m.mode == "spilled" else MEMORY_LIMIT_MB
    argv = [sys.executable, str(HERE / "exact.py"), "walk", str(path), f"{limit:g}"] + (["verify"] if m.verify else [])
    return run_child(argv, pure=m.pure)


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------


def fmt_rate(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.0f} k"
    return f"{x:.0f}"


def environment() -> str:
    import importlib.metadata as md

    def version(name: str) -> str:
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return "missing"

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "repo_stream"], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()
        rev = (rev or "unknown") + (" + uncommitted changes in repo_stream/" if dirty else "")
    except OSError:
        rev = "unknown"
    return (
        f"Python {platform.python_version()}, {cpu}, {os.cpu_count()} CPUs; repo-stream {version('repo-stream')} "
        f"(git {rev}), atmst {version('atmst')} (cbrrr {version('cbrrr')}), libipld {version('libipld')}"
    )


Check = tuple[str, "bool | None", str]


def target_checks(rows: dict[str, dict[str, Any]], car_bytes: int, exact: dict[str, Any]) -> list[Check]:
    """The issue's targets, on whole-process medians of one profile at one size."""
    checks: list[Check] = []
    mem, py, nogc = rows.get("rs-memory"), rows.get("rs-memory-py"), rows.get("libipld-nogc")
    spill, ver = rows.get("rs-spilled"), rows.get("rs-verify")

    def both(a: dict[str, Any], b: dict[str, Any]) -> str:
        return (
            f"{a['process_s']:.3f} s / {b['process_s']:.3f} s = {a['process_s'] / b['process_s']:.2f}x whole process; "
            f"from open {a['seconds']:.3f} s / {b['seconds']:.3f} s = {a['seconds'] / b['seconds']:.2f}x"
        )

    name = "in memory >= 2.5x faster than libipld + walk, GC disabled"
    if mem and nogc:
        checks.append((name, nogc["process_s"] / mem["process_s"] >= 2.5, f"{nogc['label']} / {mem['label']}: {both(nogc, mem)}"))
    else:
        checks.append((name, None, "needs rs-memory and libipld-nogc"))
    name = "in memory >= 5x faster than the pure-Python path"
    if mem and py:
        checks.append((name, py["process_s"] / mem["process_s"] >= 5, f"{py['label']} / {mem['label']}: {both(py, mem)}"))
    else:
        checks.append((name, None, "needs rs-memory and rs-memory-py"))
    if spill:
        checks.append(("spilled peak RSS <= 80 MB", spill["peak_rss_mb"] <= 80,
                       f"{spill['label']}: {spill['peak_rss_mb']:.1f} MB (max over runs)"))
        if mem:
            checks.append(("spilled time <= 5x native in-memory", spill["process_s"] / mem["process_s"] <= 5,
                           f"{spill['label']} / {mem['label']}: {both(spill, mem)}"))
        else:
            checks.append(("spilled time <= 5x native in-memory", None, "needs rs-memory"))
        sequence = exact.get("rs-spilled")
        if sequence is None:
            detail = "every run's count, record bytes and collections equal the generator's; sequence not checked (--no-exact)"
            ok: bool | None = True
        else:
            ok = sequence["digest"] == exact["expected"]["digest"]
            detail = (f"every run's count, record bytes and collections equal the generator's; sha256 of the "
                      f"(key, block) sequence {'equals' if ok else 'DIFFERS FROM'} the generator's sorted records"
                      + (" and the in-memory walk's" if "rs-memory" in exact and exact["rs-memory"]["digest"] == sequence["digest"] else ""))
        checks.append(("spilled records exact", ok, detail))
        left = spill["tmp_left"]
        seen = spill["tmp_seen"]
        checks.append(("spill file removed", not left,
                       (f"{spill['runs']} runs, private TMPDIR afterwards: {left or 'empty'}; seen there during the runs: "
                        f"{', '.join(seen) if seen else 'nothing (unlinked at once, or too brief to see)'}")))
    else:
        checks.append(("spilled: peak RSS, time, records, spill file", None, "needs rs-spilled"))
    name = "--verify <= 25% over in memory"
    if ver and mem:
        cost = ver["process_s"] / mem["process_s"] - 1
        checks.append((name, cost <= 0.25, f"{ver['label']} / {mem['label']}: {both(ver, mem)} ({cost * 100:+.1f}%)"))
    else:
        checks.append((name, None, "needs rs-verify and rs-memory"))
    name = "in-memory peak RSS <= CAR size + 40 MB"
    if mem:
        budget = car_bytes / 1e6 + 40
        checks.append((name, mem["peak_rss_mb"] <= budget,
                       f"{mem['label']}: {mem['peak_rss_mb']:.1f} MB vs {car_bytes / 1e6:.1f} + 40 = {budget:.1f} MB"))
    else:
        checks.append((name, None, "needs rs-memory"))
    return checks


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Methods: " + ", ".join(METHODS) + f" (default: {','.join(DEFAULT_METHODS)}).",
    )
    parser.add_argument("--profiles", default=",".join(PROFILES), help="generator profiles, comma-separated (default small,default)")
    parser.add_argument("--sizes", default="10000,100000,500000", help="record counts, comma-separated (default 10000,100000,500000)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per (profile, size, method); medians are reported (default 3)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="methods to run, comma-separated (see below)")
    parser.add_argument("--no-exact", action="store_true", help="skip the untimed record-sequence check of each repo-stream configuration")
    parser.add_argument("--markdown-out", metavar="FILE", help="also write the table and target checks to FILE")
    parser.add_argument("--json-out", metavar="FILE", help="also write every figure, every run included, to FILE as JSON")
    args = parser.parse_args(argv)

    try:
        sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes: not a list of integers: {args.sizes!r}")
    profiles = [p for p in args.profiles.split(",") if p]
    methods = [METHODS[m] for m in args.methods.split(",") if m in METHODS]
    unknown = [m for m in args.methods.split(",") if m and m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    if bad := [p for p in profiles if p not in PROFILES]:
        parser.error(f"unknown profile(s) {', '.join(bad)}; known: {', '.join(PROFILES)}")
    if not sizes or not profiles or not methods:
        parser.error("nothing to run")
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    sys.path.insert(0, str(ROOT))
    from repo_stream.records.generate import generate_cached

    env_line = environment()
    print(env_line, flush=True)
    run_child([sys.executable, "-c", "import anyio, repo_stream.cli; print('{}')"])  # writes the bytecode caches, untimed
    floor = run_child([sys.executable, "-c", "import anyio, repo_stream.cli; print('{}')"])
    print(f"python -c 'import anyio, repo_stream.cli' (start-up, no walk): {floor['process_s']:.3f} s, "
          f"peak RSS {floor['peak_rss'] / 1e6:.1f} MB", flush=True)

    results: list[dict[str, Any]] = []  # one per (profile, size)
    for profile in profiles:
        for size in sizes:
            started = time.perf_counter()
            path = generate_cached(size, seed=SEED, order="shuffled", cache_dir=CACHE_DIR, profile=profile)
            car_bytes = path.stat().st_size
            print(f"\n[{profile} profile] {path.relative_to(ROOT)}: {size:,} records, {car_bytes / 1e6:.1f} MB "
                  f"(ready in {time.perf_counter() - started:.1f} s)", flush=True)
            want = expected_figures(path, size, profile)
            print(f"  {want['records']:,} records, {want['record_bytes']:,} bytes of record blocks "
                  f"({want['record_bytes'] / max(want['records'], 1):.2f} bytes each on average)", flush=True)
            with open(path, "rb") as f:  # warm the page cache so the first measured run does not pay for the disk
                while f.read(1 << 24):
                    pass

            # The spilled rows' limit: 10 MiB unless the repo fits in it.
            spill_limit = SPILL_LIMIT_MB
            exact: dict[str, Any] = {"expected": want}
            if not args.no_exact:
                for m in methods:
                    if m.kind != "rs":
                        continue
                    t0 = time.perf_counter()
                    r = exact_walk(m, path, spill_limit)
                    if m.mode == "spilled" and not r["spilled"] and spill_limit != SMALL_SPILL_LIMIT_MB:
                        print(f"  ({size:,} records fit in {spill_limit:g} MiB: the spilled rows use {SMALL_SPILL_LIMIT_MB:g} MiB here)")
                        spill_limit = SMALL_SPILL_LIMIT_MB
                        r = exact_walk(m, path, spill_limit)
                    same = {k: r[k] for k in ("records", "record_bytes", "collections", "digest")} == {
                        k: want[k] for k in ("records", "record_bytes", "collections", "digest")
                    }
                    if not same or r["spilled"] != (m.mode == "spilled") or r["tmp_left"]:
                        raise BenchError(
                            f"exact check of {m.id} on {path.name}: records={r['records']} record_bytes={r['record_bytes']} "
                            f"digest={r['digest']} spilled={r['spilled']} left in TMPDIR={r['tmp_left']}; expected "
                            f"records={want['records']} record_bytes={want['record_bytes']} digest={want['digest']}"
                        )
                    exact[m.id] = r
                    print(f"  exact: {m.id} [{r['implementation']}] emits the generator's {r['records']:,} records, "
                          f"byte for byte, in key order ({time.perf_counter() - t0:.1f} s, untimed)", flush=True)

            runs: dict[str, list[dict[str, Any]]] = {m.id: [] for m in methods}
            for i in range(args.runs):  # interleaved, so drift on a shared machine hits every method alike
                for m in methods:
                    r = measure(m, path, spill_limit)
                    if m.mode == "spilled" and not r["spilled"] and spill_limit != SMALL_SPILL_LIMIT_MB and not runs[m.id]:
                        print(f"  ({size:,} records fit in {spill_limit:g} MiB: the spilled rows use {SMALL_SPILL_LIMIT_MB:g} MiB here)")
                        spill_limit = SMALL_SPILL_LIMIT_MB
                        r = measure(m, path, spill_limit)
                    check_run(m, r, want, path.name)
                    if m.kind == "rs" and r["tmp_left"]:
                        print(f"  !! {m.id} left {r['tmp_left']} in its TMPDIR", flush=True)
                    runs[m.id].append(r)
                    impl = r.get("implementation")
                    print(
                        f"  run {i + 1}/{args.runs} {label(m, impl, spill_limit):<58} process {r['process_s']:7.3f} s  "
                        f"from open {r['seconds']:7.3f} s  peak RSS {r['peak_rss'] / 1e6:7.1f} MB"
                        + ("  (" + ", ".join(f"{k} {v:.3f}" for k, v in r["phases"].items()) + ")" if "phases" in r else ""),
                        flush=True,
                    )

            rows: dict[str, dict[str, Any]] = {}
            for m in methods:
                rs = runs[m.id]
                impls = {r.get("implementation") for r in rs}
                if len(impls) != 1:
                    raise BenchError(f"{m.id} on {path.name}: runs report different implementations {impls}")
                impl = impls.pop()
                secs = statistics.median(r["seconds"] for r in rs)
                rows[m.id] = {
                    "label": label(m, impl, spill_limit),
                    "implementation": impl,
                    "runs": len(rs),
                    "process_s": statistics.median(r["process_s"] for r in rs),
                    "seconds": secs,
                    "all_process_s": [r["process_s"] for r in rs],
                    "all_seconds": [r["seconds"] for r in rs],
                    "mb_s": car_bytes / 1e6 / secs if secs > 0 else 0.0,
                    "rec_s": want["records"] / secs if secs > 0 else 0.0,
                    "peak_rss_mb": max(r["peak_rss"] for r in rs) / 1e6,
                    "tmp_left": sorted({name for r in rs for name in r["tmp_left"]}),
                    "tmp_seen": sorted({name for r in rs for name in r["tmp_seen"]}),
                }
            results.append({
                "profile": profile, "size": size, "car": path.name, "car_bytes": car_bytes,
                "expected": want, "spill_limit_mb": spill_limit, "rows": rows, "runs": runs,
                "exact": {k: v for k, v in exact.items() if k != "expected"},
            })

    # --- table -------------------------------------------------------------------------------
    lines = [
        "| Profile | Records | CAR MB | Method | Process s | From open s | MB/s | Records/s | Peak RSS MB |",
        "|:--|--:|--:|:--|--:|--:|--:|--:|--:|",
    ]
    for res in results:
        avg = res["expected"]["record_bytes"] / max(res["expected"]["records"], 1)
        for m in methods:
            row = res["rows"][m.id]
            lines.append(
                f"| {res['profile']} ({avg:.0f} B/record) | {res['size']:,} | {res['car_bytes'] / 1e6:.1f} | {row['label']} "
                f"| {row['process_s']:.3f} | {row['seconds']:.3f} | {row['mb_s']:.1f} | {fmt_rate(row['rec_s'])} | {row['peak_rss_mb']:.0f} |"
            )
    table = "\n".join(lines)

    # --- target checks: the small profile (the table) and, for information, the default --
    check_text: list[str] = []
    all_checks: dict[str, Any] = {}
    for profile in [p for p in PROFILES if p in profiles]:
        mine = [r for r in results if r["profile"] == profile]
        res = max(mine, key=lambda r: r["size"])
        checks = target_checks(res["rows"], res["car_bytes"], {"expected": res["expected"], **res["exact"]})
        all_checks[profile] = [{"target": n, "pass": ok, "detail": d} for n, ok, d in checks]
        heading = (
            f"Target checks, {profile} profile, {res['size']:,} records ({res['car_bytes'] / 1e6:.1f} MB), medians of {args.runs}"
            + (" (the issue's targets):" if profile == "small" else " (for information):")
        )
        check_text += ["", heading, ""] + [
            f"- {'PASS' if ok else 'FAIL' if ok is not None else 'N/A'}: {n} ({d})" for n, ok, d in checks
        ]
    notes = [
        "",
        (f"Median of {args.runs} runs, each in a fresh process. Process s: the whole process, start to exit "
        f"(`python -m repo_stream stats ... --json` for repo-stream; `benchmarks/peers.py` for the others); "
        f"from open s: from just before the CAR is opened to the end of the walk, which MB/s (MB = 10^6 bytes of CAR) "
        f"and records/s use. Peak RSS: the process's own (`VmHWM` as it exits), max over runs; Python start-up with "
        f"repo-stream's imports alone takes {floor['process_s']:.2f} s and {floor['peak_rss'] / 1e6:.0f} MB. "
        f"[c]/[python]: the implementation `stats --json` reported. Generated shuffled repos "
        f"(`generate_cached(n, profile=...)`); every run emitted exactly the generator's records. {env_line}."),
    ]
    markdown = table + "\n" + "\n".join(check_text + notes) + "\n"
    print("\n" + markdown)
    print("per-run seconds (process / from open):")
    for res in results:
        for m in methods:
            row = res["rows"][m.id]
            print(f"  {res['profile']:<8} {res['size']:>9,} {row['label']:<58} "
                  + "  ".join(f"{p:.3f}/{s:.3f}" for p, s in zip(row["all_process_s"], row["all_seconds"], strict=True)))
    if args.markdown_out:
        Path(args.markdown_out).write_text(markdown)
        print(f"\nwrote {args.markdown_out}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(
            {"environment": env_line, "floor": floor, "results": results, "checks": all_checks}, indent=1, default=str
        ))
        print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"\nBENCHMARK FAILED: {exc}", file=sys.stderr)
        sys.exit(1)
