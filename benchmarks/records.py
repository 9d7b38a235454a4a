"""Time record decoders: ns per record for each candidate, on three sets of real-shaped records.

Run from the repository root (needs libipld besides the package's own dependencies)::

    .venv/bin/pip install -q libipld && .venv/bin/python benchmarks/records.py

Sets: "generated" (2,000 records from ``repo_stream.records.generate.generate_records``, the mix of a
real account: likes, posts, follows, reposts, blob refs), "signed" (the 600 records of
``../shared/car-samples/signed-*.car``) and "little" (the 278 records of the real
``little.car``); the sample sets are left out when the samples are absent. Candidates are timed
in turn, round after round (so a busy machine slows them alike), and each one's fastest round
is kept; CPU time (``time.process_time_ns``), so other processes on the machine
matter less. The figures are in ``repo_stream/records.py``'s docstring.
"""

from __future__ import annotations

import argparse
import binascii
import io
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import cbor2
import cbrrr
import dag_cbor

from repo_stream import DriverBuilder
from repo_stream.records.generate import generate_records
from repo_stream.records.values import Link, decode_record, record_json

SAMPLES = Path(os.environ.get("REPO_STREAM_SAMPLES", Path(__file__).resolve().parents[2] / "shared" / "car-samples"))


async def _blocks(path: Path) -> list[bytes]:
    driver = await DriverBuilder().with_mem_limit_mb(1024).load_car(path.read_bytes())
    return [block async for _, block in driver]


def _sets() -> dict[str, list[bytes]]:
    sets = {"generated": [block for _, block in generate_records(2000)]}
    signed = [SAMPLES / "signed-k256.car", SAMPLES / "signed-p256.car"]
    if all(p.is_file() for p in signed):
        sets["signed"] = [b for p in signed for b in anyio.run(_blocks, p)]
    if (SAMPLES / "little.car").is_file():
        sets["little"] = anyio.run(_blocks, SAMPLES / "little.car")
    return sets


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).rstrip(b"=").decode()


def _json_pass(value: Any) -> Any:
    """Links already converted by a tag hook; turn bytes into ``{"$bytes"}``."""
    t = type(value)
    if t is dict:
        return {k: _json_pass(v) for k, v in value.items()}
    if t is list:
        return [_json_pass(v) for v in value]
    if t is bytes:
        return {"$bytes": _b64(value)}
    return value


def _cbor2_decoder(hook: Callable[..., Any]) -> Callable[[bytes], Any]:
    """A reused cbor2 decoder with a tag hook and a trailing-bytes check (as dagcbor.py does)."""
    buf = io.BytesIO()
    decoder = cbor2.CBORDecoder(buf, tag_hook=hook, allow_indefinite=False, max_depth=128, strict_hashable_types=True)

    def decode(block: bytes) -> Any:
        buf.seek(0)
        buf.truncate()
        buf.write(block)
        buf.seek(0)
        value = decoder.decode()
        if buf.tell() != len(block):
            raise ValueError("trailing bytes")
        return value

    return decode


def _hook_link(tag: Any, *_: Any) -> Any:
    if tag.tag == 42:
        return Link(tag.value[1:])
    raise ValueError(f"tag {tag.tag}")


def _hook_json(tag: Any, *_: Any) -> Any:
    if tag.tag == 42:
        return {"$link": str(Link(tag.value[1:]))}
    raise ValueError(f"tag {tag.tag}")


def candidates() -> dict[str, Callable[[bytes], Any]]:
    from repo_stream.records.values import to_json_value

    found: dict[str, Callable[[bytes], Any]] = {
        "decode_record (cbrrr, cid_ctor=Link, depth check)": decode_record,
        "cbrrr decode_dag_cbor, cid_ctor=Link": lambda b: cbrrr.decode_dag_cbor(b, cid_ctor=Link),
        "cbrrr decode_dag_cbor, its own CID class": cbrrr.decode_dag_cbor,
    }
    try:
        import libipld

        found["libipld decode_dag_cbor (links come back as bytes)"] = libipld.decode_dag_cbor
    except ImportError:
        print("libipld is not installed: left out", file=sys.stderr)
    found["cbor2 CBORDecoder reused, tag_hook -> Link"] = _cbor2_decoder(_hook_link)
    found["dag-cbor decode (pure Python)"] = dag_cbor.decode
    found["record_json (cbrrr atjson_mode, link and depth checks)"] = record_json
    found["cbrrr atjson_mode=True alone"] = lambda b: cbrrr.decode_dag_cbor(b, atjson_mode=True)
    found["to_json_value(decode_record(b))"] = lambda b: to_json_value(decode_record(b))
    json_cbor2 = _cbor2_decoder(_hook_json)
    found["cbor2 tag_hook -> {$link} + a $bytes pass"] = lambda b: _json_pass(json_cbor2(b))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    sets = _sets()
    found = candidates()
    best: dict[tuple[str, str], float] = {}
    for _ in range(args.rounds):
        for set_name, blocks in sets.items():
            for name, decode in found.items():
                loops = 1 if "pure Python" in name else 5
                start = time.process_time_ns()
                for _ in range(loops):
                    for block in blocks:
                        decode(block)
                per = (time.process_time_ns() - start) / loops / len(blocks)
                best[name, set_name] = min(best.get((name, set_name), per), per)
    for set_name, blocks in sets.items():
        links = sum(b.count(b"\xd8\x2a") for b in blocks)
        print(f"{set_name}: {len(blocks)} records, {sum(map(len, blocks)) / len(blocks):.0f} bytes on average, {links} links")
    print(f"{'ns per record':60}" + "".join(f"{s:>11}" for s in sets))
    for name in found:
        print(f"{name:60}" + "".join(f"{best[name, s]:11.0f}" for s in sets))


if __name__ == "__main__":
    main()
