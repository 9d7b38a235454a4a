"""Write the fuzzer's seed inputs (an option byte + a small valid repo CAR) into a folder."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import cbor2

from repo_stream.records.writer import build_repo_car

ROOT = Path(__file__).resolve().parents[1]


def record(text: str, kind: str) -> bytes:
    return cbor2.dumps({"$type": kind, "text": text, "createdAt": "2024-01-01T00:00:00Z"}, canonical=True)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    sets = {
        "empty": [],
        "one": [("app.bsky.feed.post/3kaaaaaaaaaaa", record("hi", "app.bsky.feed.post"))],
        "forty": [(f"app.bsky.feed.like/3k{i:011d}", record(str(i), "app.bsky.feed.like")) for i in range(40)],
        "odd": [(f"app.bsky.graph.follow/a:b~c-{i}", record("x", "app.bsky.graph.follow")) for i in range(6)]
        + [(f"com.example.thing/{'x' * 300}{i}", record(str(i), "com.example.thing")) for i in range(3)],
    }
    for name, records in sets.items():
        buf = io.BytesIO()
        build_repo_car(records, did="did:plc:fuzzfuzzfuzzfuzzfuzzfuzz", rev="3kaaaaaaaaaaa", path=buf, order="shuffled")
        for options in (0x00, 0x01, 0x02, 0x0F, 0x3A, 0x57, 0xE3):
            (out / f"{name}-{options:02x}.car").write_bytes(bytes([options]) + buf.getvalue())
    # record blocks, for the transcoder (the option byte is ignored there)
    from repo_stream.records.generate import generate_records

    for i, (_key, block) in enumerate(generate_records(40, seed=3)):
        (out / f"record-{i:02d}.cbor").write_bytes(b"\x00" + block)
    fixture = ROOT / "fixtures" / "repo-100.car"
    if fixture.is_file():
        (out / "repo-100-00.car").write_bytes(b"\x00" + fixture.read_bytes())
        (out / "repo-100-0b.car").write_bytes(b"\x0b" + fixture.read_bytes())
    sync_seeds(out)


def sync_seeds(out: Path) -> None:
    """Inputs for fuzz/target.py's ``sync_one``: generated #commit and #sync messages, their
    blocks as CAR slices, and record proofs (present and absent keys)."""
    from repo_stream.sync.events import decode_frame
    from repo_stream.sync.generate import CommitGenerator, make_signer
    from repo_stream.sync.proof import prove

    magic = b"\xffS"
    sign, _ = make_signer("k256", 1)
    records = [(f"app.bsky.feed.like/3k{i:011d}", record(str(i), "app.bsky.feed.like")) for i in range(30)]
    gen = CommitGenerator("did:plc:fuzzfuzzfuzzfuzzfuzzfuzz", sign, records, seed=1)
    for i, n in enumerate((1, 3, 8)):
        message = gen.commit(gen.random_ops(n))
        (out / f"sync-commit-{i}.bin").write_bytes(magic + b"\x00" + message)
        blocks = decode_frame(message).body["blocks"]
        (out / f"sync-slice-{i}.car").write_bytes(magic + b"\x01" + blocks)
        (out / f"sync-slice-raw-{i}.car").write_bytes(magic + b"\x02" + blocks)
        (out / f"sync-invert-{i}.car").write_bytes(magic + b"\x05" + blocks)
    for j, block in enumerate(sorted(gen.nodes.values())[:6]):
        for first in (0, 0xC1):
            (out / f"sync-node-{j}-{first}.bin").write_bytes(magic + b"\x04" + bytes([first]) + block)
    (out / "sync-sync.bin").write_bytes(magic + b"\x00" + gen.sync_message())
    repo = gen.repo_car()
    keys = ["app.bsky.feed.like/3k00000000007", "app.bsky.feed.post/3kaaaaaaaaaaa", "com.example.thing/zzz", "a.b.c/"]
    for key in keys:
        proof = prove(repo, key)
        # sync_one checks the key its length picks: present or absent, both paths are exercised
        (out / f"sync-proof-{key.replace('/', '_')}.car").write_bytes(magic + b"\x03" + proof)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
