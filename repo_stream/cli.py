"""Command line: ``python -m repo_stream stats PATH``.

``stats`` walks a repo CAR (a file, or ``-`` for standard input) the way an indexer would, with
the record block length as each record's value, and prints a summary: did, rev, commit CID,
records, record bytes, blocks, records per collection, whether it spilled to disk, seconds and
MB/s. ``--json`` prints one JSON object instead. Any error prints one line ``error: ...`` on
stderr and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from typing import Any

import anyio

from .disk import DiskBuilder
from .drivers import DriverBuilder, NeedDisk
from .errors import RepoStreamError

__all__ = ["main", "stats"]


async def stats(path: str, *, mem_limit_mb: float = 64, disk_path: str | None = None, verify: bool = False) -> dict[str, Any]:
    """Walk the CAR at ``path`` (``"-"``: standard input) and return its figures as a dict.

    Keys: ``did, rev, version, commit, data`` (CIDs as base32 strings), ``records``,
    ``record_bytes`` (sum of record block lengths), ``blocks`` (CAR sections), ``car_bytes``,
    ``collections`` (collection -> record count), ``spilled`` (bool), ``seconds``.

    A spill file made at ``disk_path`` is removed afterwards (a file that existed before is
    emptied but kept); without ``disk_path`` a temporary one is used and always removed.

    Raises:
        RepoStreamError: the CAR is malformed (any subclass); OSError: the file cannot be read.
    """
    started = time.perf_counter()
    builder = DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_block_processor(len).with_verify_cids(verify)
    if path == "-":
        source = anyio.wrap_file(sys.stdin.buffer)
        return await _walk(builder, source, disk_path, started)
    async with await anyio.open_file(path, "rb") as source:
        return await _walk(builder, source, disk_path, started)


async def _walk(builder: DriverBuilder[Any], source: Any, disk_path: str | None, started: float) -> dict[str, Any]:
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
        while (chunk := await driver.next_chunk(1024)) is not None:
            records += len(chunk)
            for key, size in chunk:
                collections[key.partition("/")[0]] += 1
                record_bytes += size
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    args = _parser().parse_args(argv)
    if args.mem_limit_mb <= 0:
        print("error: --mem-limit-mb must be positive", file=sys.stderr)
        return 1
    try:
        result = anyio.run(lambda: stats(args.path, mem_limit_mb=args.mem_limit_mb, disk_path=args.disk_path, verify=args.verify))
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
