"""Peak RSS against --mem-limit-mb for the block processors len, record_json and decode_record.

Run from the repository root::

    .venv/bin/python benchmarks/value_memory.py [--records 500000] [--limits 16,64,150]

Walks a generated repo of small records (``generate_cached(N, profile="small")``, cached in
``.cache/cars``) to the end in a fresh process per (processor, limit), with the memory limit given,
and reports its peak RSS (``ru_maxrss`` from ``wait4``) next to the interpreter's baseline (the same
process on a one-record repo). A processed record kept in memory is counted at what it costs as
Python objects (``repo_stream.core.blocks.value_size``); counting a decoded record as its block's length
let ``dump --mem-limit-mb 64`` reach ~300 MB. Once the limit is reached the rest is spilled to a
temporary SQLite store (whose page cache, ``disk_cache_mb``, comes on top).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import sys, anyio
from repo_stream import DiskBuilder, DriverBuilder, NeedDisk
from repo_stream.records import JSON_CODEC, RECORD_CODEC, decode_record, record_json
process = {"len": len, "record_json": record_json, "decode_record": decode_record}[sys.argv[1]]
async def main():
    builder = DriverBuilder().with_mem_limit_mb(float(sys.argv[2])).with_block_processor(process)
    if process is not len:  # the codec for spilled values: the package's, as dump uses JSON_CODEC
        builder = builder.with_codec(*(JSON_CODEC if process is record_json else RECORD_CODEC))
    with open(sys.argv[3], "rb") as f:
        loaded = await builder.load_car(f)
        n = 0
        if isinstance(loaded, NeedDisk):
            async with await DiskBuilder().open() as store:
                _, disk = await loaded.finish_loading(store)
                while (chunk := await disk.next_chunk(256)) is not None:
                    n += len(chunk)
            print("spilled", n)
        else:
            while (chunk := await loaded.next_chunk(256)) is not None:
                n += len(chunk)
            print("memory", n)
anyio.run(main)
"""


def peak(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read().decode(errors="replace").strip().splitlines()
    _, status, usage = os.wait4(proc.pid, 0)
    return usage.ru_maxrss / 1024, (out[-1] if out else "")[:60] + ("" if os.waitstatus_to_exitcode(status) == 0 else " (failed)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=500_000)
    parser.add_argument("--limits", default="16,64,150")
    parser.add_argument("--processors", default="len,record_json,decode_record")
    parser.add_argument("--impls", default="c")
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "cars"))
    options = parser.parse_args()
    # generated in a child: a parent's peak RSS is carried over into its children on Linux
    code = f"from pathlib import Path; from repo_stream.records.generate import generate_cached; print(generate_cached({options.records}, cache_dir=Path({options.cache!r}), profile='small'))"
    car = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    one = Path(tempfile.gettempdir()) / "repo-stream-one-record.car"
    code = f"from pathlib import Path; from repo_stream.records.generate import generate_cached; import shutil; shutil.copy(generate_cached(1, cache_dir=Path({options.cache!r}), profile='small'), {str(one)!r})"
    subprocess.run([sys.executable, "-c", code], check=True)
    print(f"# {car}: {Path(car).stat().st_size / 2**20:.0f} MiB")
    print("| impl | processor | --mem-limit-mb | peak RSS MiB | baseline MiB | peak - baseline | result |")
    print("|:--|:--|--:|--:|--:|--:|:--|")
    for impl in options.impls.split(","):
        env = {**os.environ, "REPO_STREAM_PURE_PYTHON": "1" if impl == "python" else "0"}
        for name in options.processors.split(","):
            for limit in options.limits.split(","):
                base, _ = peak([sys.executable, "-c", CHILD, name, limit, str(one)], env)
                top, result = peak([sys.executable, "-c", CHILD, name, limit, car], env)
                print(f"| {impl} | {name} | {limit} | {top:.0f} | {base:.0f} | {top - base:.0f} | {result} |", flush=True)


if __name__ == "__main__":
    main()
