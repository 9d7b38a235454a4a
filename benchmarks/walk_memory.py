"""Peak RSS of walking MST nodes whose prefix-compressed keys spell out ~40x their bytes.

Run from the repository root::

    .venv/bin/python benchmarks/walk_memory.py [--entries 80000] [--cases node,chain] [--limits 16,64]

Prefix compression lets an entry of ~24 bytes stand for a key of ~823 (the previous key's first
~820 bytes, then a few new ones). The CARs are built here, in a temporary folder (never committed):

- ``node``: one valid layer-0 MST node of ``--entries`` such keys (~1.9 MB for 80,000);
- ``chain``: four such nodes, layers 3, 2, 1, 0, each the ``l`` of the one above, so the walk holds
  all four at once before its first record (~7.5 MB);

every record linking to one tiny record block (a 4-byte identity CID), so the walks succeed and
emit every record. Each (case, implementation, limit) runs ``python -m repo_stream stats CAR
--mem-limit-mb LIMIT`` in a fresh process and reports its peak RSS (``ru_maxrss`` from
``wait4``; the CARs are built in another child, as Linux carries a parent's peak over into its
children), next to the same process on a one-record repo (the interpreter's baseline, with the
package imported). A limit below the CAR's size spills it to a temporary SQLite store.
``--verify`` adds ``--verify`` rows, on the same nodes without the record block (every block
verifies; the walk fails at the first record, MissingBlockError: what counts is its peak, which
used to come before, with the whole node expanded).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from repo_stream.records.writer import build_mst, car_bytes, encode_commit

DID = "did:plc:walkmemorywalkmemorywalkm"
COLLECTION = ".".join(["a" * 63] * 4 + ["b" * 57])  # a valid NSID of 313 characters
RECORD = b"\xa1d$typeqapp.bsky.feed.like"
RECORD_CID = b"\x01\x55\x00\x00"  # CIDv1, raw, identity multihash of 0 bytes: 4 bytes in each entry


def layer_of(key: bytes) -> int:
    digest = hashlib.sha256(key).digest()
    zeros = 256 - int.from_bytes(digest, "big").bit_length()
    return zeros >> 1


def keys_on(layer: int, count: int, tag: str) -> list[bytes]:
    """``count`` increasing keys of MST ``layer``, ~823 bytes each, differing in their last bytes."""
    out = []
    i = 0
    head = f"{COLLECTION}/{'r' * 500}{tag}".encode()
    while len(out) < count:
        key = head + b"%08d" % i
        if layer_of(key) == layer:
            out.append(key)
        i += 1
    return out


def build(case: str, entries: int, folder: Path) -> None:
    path = folder / f"{case}-{entries}.car"
    if path.exists():
        return
    layers = [0] if case == "node" else [0, 1, 2, 3]
    keys: list[bytes] = []
    for layer in layers:  # tags a < b < c < d: each layer's keys all before the next layer's
        keys += keys_on(layer, entries, "abcd"[layer])
    root, nodes = build_mst([(key, RECORD_CID) for key in keys])
    commit = encode_commit(DID, root, "3kaaaaaaaaaaa")
    blocks = [(hashlib_cid(commit), commit), *nodes.items()]
    (folder / f"{case}-{entries}-absent.car").write_bytes(car_bytes([hashlib_cid(commit)], blocks))
    path.write_bytes(car_bytes([hashlib_cid(commit)], [*blocks, (RECORD_CID, RECORD)]))
    sizes = sorted(len(b) for b in nodes.values())
    print(f"# {case}: {len(keys):,} records, {len(nodes)} node(s) of {sizes[-1]:,} bytes at most, CAR {path.stat().st_size:,} bytes", flush=True)


def hashlib_cid(block: bytes) -> bytes:
    return b"\x01\x71\x12\x20" + hashlib.sha256(block).digest()


def peak_rss_mib(args: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    """Run a child; its peak RSS (MiB), exit status and last line of output."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace").strip().splitlines()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024, proc.returncode, (output[-1] if output else "")[:100]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=80_000, help="entries per node (default 80000)")
    parser.add_argument("--cases", default="node,chain")
    parser.add_argument("--limits", default="16,64", help="--mem-limit-mb values (default 16,64)")
    parser.add_argument("--impls", default="c,python")
    parser.add_argument("--verify", action="store_true", help="also run with --verify")
    parser.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "repo-stream-walk-memory"))
    parser.add_argument("--build", help=argparse.SUPPRESS)  # in a child: build one case's CARs
    options = parser.parse_args()
    folder = Path(options.folder)
    folder.mkdir(exist_ok=True)
    if options.build:
        build(options.build, options.entries, folder)
        return
    small = folder / "one-record.car"
    if not small.exists():
        root, nodes = build_mst([(f"{COLLECTION}/r".encode(), RECORD_CID)])
        commit = encode_commit(DID, root, "3kaaaaaaaaaaa")
        small.write_bytes(car_bytes([hashlib_cid(commit)], [(hashlib_cid(commit), commit), *nodes.items(), (RECORD_CID, RECORD)]))
    print("| case | impl | --mem-limit-mb | flags | peak RSS MiB | baseline MiB | over baseline | exit | last line |")
    print("|:--|:--|--:|:--|--:|--:|--:|--:|:--|")
    for case in options.cases.split(","):
        subprocess.run([sys.executable, __file__, "--build", case, "--entries", str(options.entries), "--folder", str(folder)], check=True)
        for impl in options.impls.split(","):
            env = {**os.environ, "REPO_STREAM_PURE_PYTHON": "1" if impl == "python" else "0"}
            for limit in options.limits.split(","):
                for flags in [[]] + ([["--verify"]] if options.verify else []):
                    cmd = [sys.executable, "-m", "repo_stream", "stats", "--json", "--mem-limit-mb", limit, *flags]
                    base, _, _ = peak_rss_mib([*cmd, str(small)], env)
                    car = folder / f"{case}-{options.entries}{'-absent' if flags else ''}.car"
                    peak, code, last = peak_rss_mib([*cmd, str(car)], env)
                    print(f"| {case} | {impl} | {limit} | {' '.join(flags)} | {peak:.0f} | {base:.0f} | {peak - base:.0f} | {code} | {last} |", flush=True)


if __name__ == "__main__":
    main()
