"""One timed child of ``benchmarks/dump.py``: ``python benchmarks/dump_child.py MODE PATH``.

* ``arrow-raw`` / ``arrow-json``: the repo (in memory) into one ``pyarrow.Table`` through
  ``driver.next_batch(65536)``, values raw blocks / JSON text (the C transcoder).
* ``old-dump``: ``dump`` as it was before the transcoder (``record_json`` as the block processor
  with ``JSON_CODEC``, each line ``json.dumps`` of a dict), to ``os.devnull``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import anyio

from repo_stream import DriverBuilder


async def arrow(path: str, json_text: bool) -> None:
    import pyarrow as pa

    from repo_stream.records.json_text import json_text_processor

    builder: DriverBuilder[Any] = DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True)
    if json_text:
        builder = builder.with_block_processor(json_text_processor())
    async with await anyio.open_file(path, "rb") as f:
        driver = await builder.load_car(f)
        batches = []
        while (batch := await driver.next_batch(65536)) is not None:
            batches.append(batch)
    table = pa.Table.from_batches(batches)
    print(table.num_rows, file=sys.stderr)


async def old_dump(path: str) -> None:
    from repo_stream.records.values import JSON_CODEC, record_json

    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    builder = DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True).with_block_processor(record_json).with_codec(*JSON_CODEC)
    with open(os.devnull, "wb") as out:
        async with await anyio.open_file(path, "rb") as f:
            driver = await builder.load_car(f)
            while (chunk := await driver.next_chunk(256)) is not None:
                text = "".join(dumps({"key": key, "cid": cid, "value": value}) + "\n" for key, cid, value in chunk)
                out.write(text.encode("utf-8", "surrogateescape"))


def main() -> None:
    mode, path = sys.argv[1:]
    if mode == "arrow-raw":
        anyio.run(arrow, path, False)
    elif mode == "arrow-json":
        anyio.run(arrow, path, True)
    elif mode == "old-dump":
        anyio.run(old_dump, path)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
