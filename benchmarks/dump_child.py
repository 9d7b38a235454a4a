"""One timed child of ``benchmarks/dump.py``: ``python benchmarks/dump_child.py MODE PATH``.

* ``arrow-raw`` / ``arrow-json``: the repo (in memory, raw blocks) into one ``pyarrow.Table``
  through ``driver.next_batch(65536, values="raw" / "json_text")``: values raw blocks / JSON
  text (transcoded by the C walker into the batch's buffer as it is built).
* ``arrow-json-processor``: the same JSON table, loaded with the transcoder as block processor
  (the table keeps each record's JSON text as a str; ``next_batch(65536)`` copies it).
* ``prev-dump`` / ``prev-dump-64``: ``dump`` as it was before ``driver.next_json_lines`` (the
  transcoder as block processor: the table keeps each record's JSON text as a str; the lines put
  together in Python), in memory / at the default 64 MiB limit (spilled).
* ``tuple-walk``: the same walk as ``arrow-raw`` making ``(key, cid, bytes)`` tuples, kept in
  a list (what a table of raw values replaces).
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


async def arrow(path: str, json_text: bool, processor: bool = False) -> None:
    import pyarrow as pa

    from repo_stream.records.json_text import json_text_processor

    builder: DriverBuilder[Any] = DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True)
    if processor:  # the transcoder as block processor: the table keeps a str per record
        builder = builder.with_block_processor(json_text_processor())
    async with await anyio.open_file(path, "rb") as f:
        driver = await builder.load_car(f)
        batches = []
        values = "json_text" if json_text else "raw"
        while (batch := await driver.next_batch(65536, values=None if processor else values)) is not None:
            batches.append(batch)
    table = pa.Table.from_batches(batches)
    print(table.num_rows, file=sys.stderr)


async def tuple_walk(path: str) -> None:
    builder: DriverBuilder[Any] = DriverBuilder().with_mem_limit_mb(4096).with_record_cids(True)
    async with await anyio.open_file(path, "rb") as f:
        driver = await builder.load_car(f)
        items = []
        while (chunk := await driver.next_chunk(65536)) is not None:
            items.extend(chunk)
    print(len(items), file=sys.stderr)


async def prev_dump(path: str, mem_limit_mb: float) -> None:
    """``dump`` as it was before the walker wrote the lines (the transcoder as block processor,
    the table keeping each record's JSON text as a str, the line put together in Python)."""
    from repo_stream import DiskBuilder, NeedDisk
    from repo_stream.records.json_text import json_text_processor

    builder = DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_record_cids(True).with_block_processor(json_text_processor())
    with open(os.devnull, "wb") as out:
        async with await anyio.open_file(path, "rb") as f:
            driver: Any = await builder.load_car(f)
            store = None
            if isinstance(driver, NeedDisk):
                store = await DiskBuilder().open()
                _commit, driver = await driver.finish_loading(store)
            while (chunk := await driver.next_chunk(1024)) is not None:
                out.write("".join([f'{{"key":"{key}","cid":"{cid}","value":{value}}}\n' for key, cid, value in chunk]).encode())
            if store is not None:
                await store.close()


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
    elif mode == "arrow-json-processor":
        anyio.run(arrow, path, True, True)
    elif mode == "prev-dump":
        anyio.run(prev_dump, path, 4096)
    elif mode == "prev-dump-64":
        anyio.run(prev_dump, path, 64)
    elif mode == "tuple-walk":
        anyio.run(tuple_walk, path)
    elif mode == "old-dump":
        anyio.run(old_dump, path)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
