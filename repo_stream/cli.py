"""Command line: ``python -m repo_stream stats PATH`` and ``python -m repo_stream generate N ...``.

``stats`` walks a repo CAR (a file, or ``-`` for standard input) the way an indexer would, with
the record block length as each record's value, and prints a summary: did, rev, commit CID,
records, record bytes, blocks, records per collection, whether it spilled to disk, seconds and
MB/s. ``--json`` prints one JSON object instead. On a terminal, progress (bytes read of the total
when known, then records emitted) is drawn on stderr with tqdm; nothing extra when stderr is piped
or with ``--json``. Any error prints one line ``error: ...`` on stderr and exits with status 1.

``generate`` writes realistic generated repo CARs (see :mod:`repo_stream.generate`) into a cache
folder (default ``.cache/cars``) and prints their paths; files already there are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from operator import itemgetter
from typing import Any

import anyio

from . import implementation
from .disk import DiskBuilder
from .drivers import DriverBuilder, NeedDisk
from .errors import RepoStreamError

__all__ = ["main", "stats"]

_second = itemgetter(1)


class _Progress:
    """tqdm bars on stderr: bytes while loading, records while walking. Inert when disabled."""

    def __init__(self, enabled: bool, total_bytes: int | None) -> None:
        self.enabled = enabled
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading", leave=False)

    def wrap(self, source: Any) -> Any:
        """Wrap an ``async read(n)`` source so each read advances the byte bar."""
        if not self.enabled:
            return source
        progress = self

        class Counted:
            async def read(self, n: int = -1) -> bytes:
                chunk = await source.read(n)
                progress._bar.update(len(chunk))
                return chunk

        return Counted()

    def walking(self) -> None:
        if self.enabled:
            self._bar.close()
            self._bar = self._tqdm(unit=" records", unit_scale=True, desc="walking", leave=False)

    def records(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


async def stats(
    path: str,
    *,
    mem_limit_mb: float = 64,
    disk_path: str | None = None,
    verify: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Walk the CAR at ``path`` (``"-"``: standard input) and return its figures as a dict.

    Keys: ``did, rev, version, commit, data`` (CIDs as base32 strings), ``records``,
    ``record_bytes`` (sum of record block lengths), ``blocks`` (CAR sections), ``car_bytes``,
    ``collections`` (collection -> record count), ``spilled`` (bool), ``seconds``,
    ``implementation`` (``"c"`` or ``"python"``).

    A spill file made at ``disk_path`` is removed afterwards (a file that existed before is
    emptied but kept); without ``disk_path`` a temporary one is used and always removed.
    ``progress=True`` draws tqdm bars on stderr.

    Raises:
        RepoStreamError: the CAR is malformed (any subclass); OSError: the file cannot be read.
    """
    started = time.perf_counter()
    builder = DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_block_processor(len).with_verify_cids(verify)
    if path == "-":
        bar = _Progress(progress, None)
        try:
            return await _walk(builder, bar.wrap(anyio.wrap_file(sys.stdin.buffer)), disk_path, started, bar)
        finally:
            bar.close()
    async with await anyio.open_file(path, "rb") as source:
        bar = _Progress(progress, os.fstat(source.wrapped.fileno()).st_size)
        try:
            return await _walk(builder, bar.wrap(source), disk_path, started, bar)
        finally:
            bar.close()


async def _walk(builder: DriverBuilder[Any], source: Any, disk_path: str | None, started: float, bar: _Progress) -> dict[str, Any]:
    driver = await builder.load_car(source)
    spilled = isinstance(driver, NeedDisk)
    collections: Counter[str] = Counter()
    records = 0
    record_bytes = 0
    store = None
    created = disk_path is not None and not os.path.exists(disk_path)
    try:
        if isinstance(driver, NeedDisk):
            store = await DiskBuilder().open(disk_path)
            commit, driver = await driver.finish_loading(store)
        else:
            commit = driver.commit
        bar.walking()
        while (chunk := await driver.next_chunk(1024)) is not None:
            records += len(chunk)
            bar.records(len(chunk))
            record_bytes += sum(map(_second, chunk))
            first = chunk[0][0].partition("/")[0]
            if first == chunk[-1][0].partition("/")[0]:
                collections[first] += len(chunk)  # keys are sorted: one collection from first to last
            else:
                collections.update(key.partition("/")[0] for key, _ in chunk)
    finally:
        if store is not None:
            await store.close()
            if created and disk_path is not None:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    try:
                        os.unlink(disk_path + suffix)
                    except FileNotFoundError:
                        pass
    return {
        "did": commit.did,
        "rev": commit.rev,
        "version": commit.version,
        "commit": str(driver.commit_cid),
        "data": str(commit.data),
        "records": records,
        "record_bytes": record_bytes,
        "blocks": driver.blocks_read,
        "car_bytes": driver.bytes_read,
        "collections": dict(sorted(collections.items())),
        "spilled": spilled,
        "seconds": round(time.perf_counter() - started, 6),
        "implementation": implementation.backend().name,
    }


def _human(result: dict[str, Any]) -> str:
    seconds = result["seconds"]
    rate = result["car_bytes"] / 1e6 / seconds if seconds > 0 else 0.0
    lines = [
        f"did           {result['did']}",
        f"rev           {result['rev']}",
        f"commit        {result['commit']}",
        f"data          {result['data']}",
        f"records       {result['records']}",
        f"record bytes  {result['record_bytes']}",
        f"blocks        {result['blocks']}",
        f"spilled       {'yes' if result['spilled'] else 'no'}",
        f"elapsed       {seconds:.3f} s ({rate:.1f} MB/s over {result['car_bytes']} bytes)",
        "collections:",
    ]
    width = max((len(c) for c in result["collections"]), default=0)
    lines += [f"  {name:<{width}}  {count}" for name, count in result["collections"].items()]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m repo_stream", description="Read atproto repository CAR files.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("stats", help="walk a repo CAR and summarise its records")
    p.add_argument("path", help="a repo CAR file, or - for standard input")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--mem-limit-mb", type=float, default=64, metavar="N", help="memory limit before spilling to disk, MiB (default 64)")
    p.add_argument("--disk-path", metavar="P", help="spill file (default: a temporary file, always removed)")
    p.add_argument("--verify", action="store_true", help="check every block against its CID (for untrusted CARs)")
    g = commands.add_parser("generate", help="write realistic generated repo CARs into a cache folder")
    g.add_argument("sizes", nargs="+", type=int, metavar="N", help="number of records, e.g. 100000 500000 2000000")
    g.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    g.add_argument("--order", choices=["preorder", "shuffled", "reverse"], default="shuffled", help="block order (default shuffled)")
    g.add_argument("--cache-dir", default=None, help="folder for the CARs (default .cache/cars)")
    g.add_argument(
        "--profile",
        choices=["default", "small"],
        default="default",
        help="record mix: default (~240-byte records) or small (like and follow heavy, ~190-byte records)",
    )
    b = commands.add_parser("backfill", help="walk many repos at once, resumably (DIDs, handles, URLs, paths)")
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--repos", metavar="FILE", help="a file of repo sources, one a line (# comments), or - for standard input")
    where.add_argument("--host", metavar="URL", help="every active repo of a PDS or relay (com.atproto.sync.listRepos)")
    b.add_argument("--memory-workers", type=_positive_int, default=2, metavar="N", help="repos loaded and walked at once (default 2)")
    b.add_argument("--disk-workers", type=_positive_int, default=1, metavar="M", help="repos finished on disk at once (default 1)")
    b.add_argument("--mem-limit-mb", type=_positive_float, default=64, metavar="X", help="per-repo memory limit before spilling, MiB (default 64)")
    b.add_argument("--fetch-concurrency", type=_positive_int, default=None, metavar="K", help="sources opened ahead of the memory workers (default: --memory-workers)")
    b.add_argument("--spill-dir", metavar="DIR", help="folder for spill files (default: the system's temporary folder)")
    b.add_argument("--checkpoint", metavar="PATH", help="SQLite file recording finished repos; a rerun skips them")
    b.add_argument("--retry-failed", action="store_true", help="run repos the checkpoint records as failed again")
    b.add_argument("--out", metavar="DIR", help="write each repo's records as DIR/<did>.jsonl")
    b.add_argument("--verify", action="store_true", help="check every block against its CID and the commit signature")
    b.add_argument("--json", action="store_true", help="one JSON object per repo on stdout; the summary on stderr")
    b.add_argument("--plc-url", metavar="URL", default=None, help="PLC directory for did:plc (default https://plc.directory)")
    b.add_argument("--dask", metavar="ADDRESS", default=None, help="run on a Dask cluster: a scheduler address, or 'local' for a local one")
    b.add_argument("--engine-workers", type=_positive_int, default=2, metavar="W", help="worker processes of --dask local (default 2)")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _backfill(args: argparse.Namespace) -> int:
    """The ``backfill`` command: run :func:`repo_stream.backfill.backfill` (or its Dask form) and
    report each repo; 0 once the run completed, whatever single repos did."""
    from contextlib import aclosing

    from .backfill import (
        BackfillResult,
        BackfillStats,
        JsonlSink,
        backfill,
        host_sources,
        read_repo_list,
    )

    stats = BackfillStats()
    bar: Any = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit=" repos", desc="backfill", file=sys.stderr, dynamic_ncols=True)

    def report(result: BackfillResult) -> None:
        if args.json:
            line = json.dumps(result.to_json())
        else:
            status = "skipped" if result.skipped else "ok"
            line = "\t".join([result.source, result.did or "-", result.rev or "-", str(result.records), result.error or status])
        if bar is not None and not args.json:
            bar.write(line)
        else:
            print(line, flush=True)
        if bar is not None:
            elapsed = max(time.monotonic() - stats.started, 1e-9)
            bar.set_postfix_str(
                f"failed {stats.failed}, spilled {stats.spilled}, {stats.records / elapsed:,.0f} records/s, "
                f"{stats.record_bytes / 1e6 / elapsed:.1f} MB/s",
                refresh=False,
            )
            bar.update(1)

    options: dict[str, Any] = {
        "sink": JsonlSink(args.out) if args.out else None, "memory_workers": args.memory_workers,
        "disk_workers": args.disk_workers, "mem_limit_mb": args.mem_limit_mb, "fetch_concurrency": args.fetch_concurrency,
        "spill_dir": args.spill_dir, "verify": args.verify, "checkpoint": args.checkpoint,
        "retry_failed": args.retry_failed, "plc_url": args.plc_url,
    }  # fmt: skip

    async def run() -> None:
        sources = read_repo_list(args.repos) if args.repos else host_sources(args.host)
        async with aclosing(backfill(sources, stats=stats, **options)) as results:
            async for result in results:
                report(result)

    async def names() -> list[str]:
        return [name async for name in (read_repo_list(args.repos) if args.repos else host_sources(args.host))]

    try:
        if args.dask is None:
            anyio.run(run)
        else:
            from .cluster import backfill_on_dask

            for result in backfill_on_dask(anyio.run(names), scheduler=args.dask, n_workers=args.engine_workers, **options):
                stats.count(result)
                report(result)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (RepoStreamError, OSError, ValueError, ImportError) as exc:
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    print(
        f"backfill: {stats.done} repos in {elapsed:.1f} s: {stats.done - stats.failed} ok, {stats.failed} failed, "
        f"{stats.skipped} skipped (in the checkpoint), {stats.spilled} spilled; {stats.records} records "
        f"({stats.records / elapsed:,.0f}/s), {stats.record_bytes / 1e6:.1f} MB of records ({stats.record_bytes / 1e6 / elapsed:.1f} MB/s)",
        file=sys.stderr,
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .generate import generate_cached

    for n in args.sizes:
        started = time.perf_counter()
        path = generate_cached(n, seed=args.seed, order=args.order, cache_dir=args.cache_dir, profile=args.profile)
        size = path.stat().st_size
        print(f"{path}\t{n} records\t{size / 1e6:.1f} MB\t{time.perf_counter() - started:.1f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    args = _parser().parse_args(argv)
    if args.command == "backfill":
        return _backfill(args)
    if args.command == "generate":
        try:
            return _generate(args)
        except (ValueError, OSError, RepoStreamError) as exc:
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
    if args.mem_limit_mb <= 0:
        print("error: --mem-limit-mb must be positive", file=sys.stderr)
        return 1
    try:
        show = sys.stderr.isatty() and not args.json
        result = anyio.run(
            lambda: stats(
                args.path, mem_limit_mb=args.mem_limit_mb, disk_path=args.disk_path, verify=args.verify, progress=show
            )
        )
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (RepoStreamError, OSError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        print(_human(result))
    return 0
