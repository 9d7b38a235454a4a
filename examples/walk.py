"""Walk a repo CAR in key order, in memory or spilled to disk, as the README's API example does.

Usage: python examples/walk.py REPO.car [--mem-limit-mb N]

Prints each record's key and block size, then the totals.
"""

from __future__ import annotations

import argparse
import os
import sys

import anyio

from repo_stream import DiskBuilder, DiskDriver, DiskStore, DriverBuilder, MemoryDriver, NeedDisk, RepoStreamError


async def walk(path: str, mem_limit_mb: float) -> None:
    async with await anyio.open_file(path, "rb") as f:
        loaded = await DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_block_processor(len).load_car(f)
        store: DiskStore | None = None
        driver: MemoryDriver[tuple[str, int]] | DiskDriver[tuple[str, int]]
        if isinstance(loaded, NeedDisk):
            # No path: SQLite's temporary database, whose file has no name (nothing is left behind).
            store = await DiskBuilder().with_cache_size_mb(32).with_max_stored_mb(10_240).open()
            commit, driver = await loaded.finish_loading(store)
            print(f"# spilled to {store.name}")
        else:
            commit, driver = loaded.commit, loaded
        print(f"# {commit.did} rev {commit.rev}, MST root {commit.data}")
        records = total = 0
        try:
            while (chunk := await driver.next_chunk(256)) is not None:
                for key, size in chunk:
                    print(f"{key}\t{size}")
                    records += 1
                    total += size
        finally:
            if store is not None:
                await store.close()
    print(f"# {records} records, {total} bytes of record blocks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("car")
    parser.add_argument("--mem-limit-mb", type=float, default=10)
    args = parser.parse_args()
    try:
        anyio.run(walk, args.car, args.mem_limit_mb)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of standard output went away (`| head -1`): stop quietly with 141 (128 +
        # SIGPIPE), as the CLI does. Standard output goes to /dev/null so that the interpreter's
        # own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise SystemExit(141) from None
    except (RepoStreamError, OSError) as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
