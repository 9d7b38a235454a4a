"""The peers' side of the benchmark: one timed walk of a repo CAR per process, as a user would write it.

    python benchmarks/peers.py METHOD PATH

``METHOD`` is one of:

* ``read``: read the whole file into memory, nothing else (the floor under every row).
* ``atmst``: ``ReadOnlyCARBlockStore`` (``validate_hashes=False``, its faster setting, matching
  repo-stream without ``--verify``) + ``NodeWalker.iter_kv()``; each record's value is its block
  fetched from the store, and the consumer takes its length, as ``stats`` does.
* ``libipld-json``: ``libipld.decode_car(whole file)``, the same walk, and each record written as
  ``dump`` writes it, one ``{"key","cid","value"}`` line by ``json.dumps(ensure_ascii=False,
  separators=(",", ":"))`` (to ``os.devnull``; bytes as ``{"$bytes": base64}`` through
  ``default=``: libipld hands links back as bytes too, so its links come out as ``$bytes``, a
  cheaper and wrong form, which only flatters it). The peer of ``dump`` (``benchmarks/dump.py``).
* ``libipld`` / ``libipld-nogc``: ``libipld.decode_car(whole file)``, then the in-key-order MST
  walk below over the decoded nodes; each record's value is the decoded record libipld made. With
  ``-nogc``, ``gc.disable()`` runs before the file is opened: ``decode_car`` makes a few
  containers per block, and the cyclic collections they trigger dominate its time on big repos.

Every walk emits every record, in key order, to the same consumer as ``python -m repo_stream stats``
(record count, records per collection, and the sum of record block lengths where the value is a
length), and prints one JSON line: ``records``, ``record_bytes`` (``null`` for libipld, which
keeps no block bytes), ``collections``, ``seconds`` (from just before the file is opened to the
end of the walk) and ``phases``. The parent (``run.py``) checks the counts against the generator.

Only what each walk needs is imported, so whole-process times compare fairly with
``python -m repo_stream stats``.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any


def read_file(path: str) -> dict[str, Any]:
    started = time.perf_counter()
    with open(path, "rb") as f:
        data = f.read()
    done = time.perf_counter()
    return {"records": 0, "record_bytes": 0, "collections": {}, "bytes": len(data), "seconds": done - started}


def walk_atmst(path: str) -> dict[str, Any]:
    from atmst.blockstore.car_file import ReadOnlyCARBlockStore  # type: ignore[import-untyped]
    from atmst.mst.node_store import NodeStore  # type: ignore[import-untyped]
    from atmst.mst.node_walker import NodeWalker  # type: ignore[import-untyped]
    from cbrrr import decode_dag_cbor

    started = time.perf_counter()
    records = 0
    record_bytes = 0
    collections: dict[str, int] = {}
    with open(path, "rb") as f:
        store = ReadOnlyCARBlockStore(f, validate_hashes=False)  # one pass: block offsets
        indexed = time.perf_counter()
        commit: Any = decode_dag_cbor(store.get_block(bytes(store.car_root)))
        get_block = store.get_block
        for key, value_cid in NodeWalker(NodeStore(store), commit["data"]).iter_kv():
            size = len(get_block(bytes(value_cid)))
            # The consumer, as in repo_stream.cli: count per collection, sum the values.
            records += 1
            collection = key.partition("/")[0]
            collections[collection] = collections.get(collection, 0) + 1
            record_bytes += size
    done = time.perf_counter()
    return {
        "records": records,
        "record_bytes": record_bytes,
        "collections": collections,
        "seconds": done - started,
        "phases": {"index": indexed - started, "walk": done - indexed},
    }


def iter_mst(blocks: dict[bytes, Any], root: bytes) -> Iterator[tuple[str, bytes, Any]]:
    """Yield ``(key, record CID bytes, decoded record)`` for every record under the MST node ``root``, in key order.

    ``blocks`` is what ``libipld.decode_car`` hands back: ``{CID bytes: decoded block}``; CIDs
    inside nodes are the same raw bytes. A node is ``{"l": left subtree CID or None, "e": [{"p":
    shared prefix length, "k": key suffix, "v": record CID, "t": right subtree CID or None},
    ...]}``: keys are rebuilt from ``p``/``k``, and the walk (iterative, with a stack) visits
    ``l``, then each entry's record followed by its ``t`` subtree, checking that keys strictly
    increase. Keys are emitted as ``str``, like repo-stream's.
    """
    previous = b""
    # Stack items: (None, node CID) to expand a node, (key, record CID) to emit a record.
    stack: list[tuple[bytes | None, bytes]] = [(None, root)]
    pop = stack.pop
    push = stack.append
    while stack:
        raw_key, cid = pop()
        if raw_key is not None:
            if raw_key <= previous:
                raise AssertionError(f"libipld walk: key {raw_key!r} not after {previous!r}")
            previous = raw_key
            yield raw_key.decode(), cid, blocks[cid]
            continue
        node = blocks[cid]
        items = []
        last = b""
        for entry in node["e"]:
            last = last[: entry["p"]] + entry["k"]
            items.append((last, entry["v"], entry["t"]))
        for k, v, t in reversed(items):
            if t is not None:
                push((None, t))
            push((k, v))
        if node["l"] is not None:
            push((None, node["l"]))


def walk_libipld(path: str, gc_enabled: bool) -> dict[str, Any]:
    """``libipld.decode_car(whole file)``, then :func:`iter_mst` from the commit's ``data``."""
    import gc

    import libipld

    if not gc_enabled:
        gc.disable()
    started = time.perf_counter()
    with open(path, "rb") as f:
        data = f.read()
    read = time.perf_counter()
    header, blocks = libipld.decode_car(data)
    decoded = time.perf_counter()
    del data
    commit = blocks[header["roots"][0]]
    records = 0
    collections: dict[str, int] = {}
    for key, _cid, _record in iter_mst(blocks, commit["data"]):
        # The consumer, as in repo_stream.cli (there is no block length to sum here).
        records += 1
        collection = key.partition("/")[0]
        collections[collection] = collections.get(collection, 0) + 1
    done = time.perf_counter()
    return {
        "records": records,
        "record_bytes": None,
        "collections": collections,
        "seconds": done - started,
        "phases": {"read": read - started, "decode_car": decoded - read, "walk": done - decoded},
    }


def walk_libipld_json(path: str) -> dict[str, Any]:
    """``libipld.decode_car(whole file)``, :func:`iter_mst`, and one JSON line per record (``dump``'s)."""
    import base64
    import os

    import libipld

    def jsonable(value: Any) -> Any:
        if isinstance(value, bytes):
            return {"$bytes": base64.b64encode(value).decode("ascii").rstrip("=")}
        raise TypeError(f"{type(value).__name__} has no JSON form")

    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=jsonable).encode
    encode_cid = libipld.encode_cid
    started = time.perf_counter()
    with open(path, "rb") as f:
        data = f.read()
    header, blocks = libipld.decode_car(data)
    decoded = time.perf_counter()
    del data
    commit = blocks[header["roots"][0]]
    records = 0
    collections: dict[str, int] = {}
    with open(os.devnull, "w", encoding="utf-8") as out:
        lines: list[str] = []
        for key, cid, record in iter_mst(blocks, commit["data"]):
            lines.append(dumps({"key": key, "cid": encode_cid(cid), "value": record}) + "\n")
            records += 1
            collection = key.partition("/")[0]
            collections[collection] = collections.get(collection, 0) + 1
            if len(lines) == 1024:
                out.write("".join(lines))
                lines.clear()
        out.write("".join(lines))
    done = time.perf_counter()
    return {
        "records": records,
        "record_bytes": None,
        "collections": collections,
        "seconds": done - started,
        "phases": {"decode_car": decoded - started, "walk_and_json": done - decoded},
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    method, path = argv
    if method == "read":
        out = read_file(path)
    elif method == "atmst":
        out = walk_atmst(path)
    elif method == "libipld":
        out = walk_libipld(path, gc_enabled=True)
    elif method == "libipld-json":
        out = walk_libipld_json(path)
    elif method == "libipld-nogc":
        out = walk_libipld(path, gc_enabled=False)
    else:
        print(f"error: unknown method {method!r}", file=sys.stderr)
        return 2
    out["method"] = method
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
