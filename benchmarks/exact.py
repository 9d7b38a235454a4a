"""The benchmark's correctness side (untimed): what a repo must hold, and what repo-stream emits.

    python benchmarks/exact.py expected N SEED PROFILE
    python benchmarks/exact.py walk PATH MEM_LIMIT_MB [verify]

``expected`` regenerates the records of ``generate_cached(N, seed=SEED, profile=PROFILE)`` with
``repo_stream.records.generate.generate_records`` (no CAR is read: the writer's input, not a reader's
output), sorts them by key, and prints their count, the sum of their block lengths, records per
collection, and :func:`digest` of the sorted ``(key, block)`` sequence.

``walk`` reads ``PATH`` with ``DriverBuilder().with_mem_limit_mb(MEM_LIMIT_MB)`` and no block
processor (so values are the raw record blocks), finishing into a temporary ``DiskBuilder().open()``
store when loading says ``NeedDisk``, optionally ``with_verify_cids(True)``, and prints the same
figures for what the walk emitted, plus ``spilled`` and ``implementation``
(``repo_stream.IMPLEMENTATION``, ``"python"`` where the package has no such attribute).

Both print one JSON line. ``run.py`` compares them: same digest means the same keys, in the same
order, with byte-identical record blocks.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class Tally:
    """Count, record-byte sum, per-collection counts and a sha256 over ``(key, block)`` pairs.

    Each pair is framed as ``len(key)`` (4 bytes, big-endian), the key's UTF-8 bytes, ``len(block)``
    (4 bytes), the block, so no two different sequences hash alike by shifting bytes across pairs.
    """

    def __init__(self) -> None:
        self.records = 0
        self.record_bytes = 0
        self.collections: dict[str, int] = {}
        self._hash = hashlib.sha256()

    def add(self, pairs: Iterable[tuple[str, bytes]]) -> None:
        update = self._hash.update
        for key, block in pairs:
            raw = key.encode()
            update(len(raw).to_bytes(4, "big") + raw + len(block).to_bytes(4, "big"))
            update(block)
            self.records += 1
            self.record_bytes += len(block)
            collection = key.partition("/")[0]
            self.collections[collection] = self.collections.get(collection, 0) + 1

    def figures(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "record_bytes": self.record_bytes,
            "collections": dict(sorted(self.collections.items())),
            "digest": self._hash.hexdigest(),
        }


def expected(n: int, seed: int, profile: str) -> dict[str, Any]:
    from repo_stream.records.generate import generate_records

    tally = Tally()
    tally.add(sorted(generate_records(n, seed=seed, profile=profile)))
    return tally.figures()


def walk(path: str, mem_limit_mb: float, verify: bool) -> dict[str, Any]:
    import anyio

    import repo_stream
    from repo_stream import DiskBuilder, DriverBuilder, NeedDisk

    async def main() -> dict[str, Any]:
        tally = Tally()
        async with await anyio.open_file(path, "rb") as f:
            driver: Any = await DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_verify_cids(verify).load_car(f)
            spilled = isinstance(driver, NeedDisk)
            store = None
            try:
                if isinstance(driver, NeedDisk):
                    store = await DiskBuilder().open()  # a temporary file, removed by close()
                    _, driver = await driver.finish_loading(store)
                while (chunk := await driver.next_chunk(1024)) is not None:
                    tally.add((key, bytes(value)) for key, value in chunk)
            finally:
                if store is not None:
                    await store.close()
        return {**tally.figures(), "spilled": spilled}

    out = anyio.run(main)
    out["implementation"] = getattr(repo_stream, "IMPLEMENTATION", "python")
    return out


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[0] == "expected":
        out = expected(int(argv[1]), int(argv[2]), argv[3])
    elif len(argv) in (3, 4) and argv[0] == "walk" and argv[3:] in ([], ["verify"]):
        out = walk(argv[1], float(argv[2]), verify=argv[3:] == ["verify"])
    else:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the working tree, not an installed copy
    sys.exit(main(sys.argv[1:]))
