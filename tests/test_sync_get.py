"""``repo-stream get DID KEY`` through ``com.atproto.sync.getRecord``: only the proof is fetched
(bytes served counted by the local server), it is verified, a forged proof is an error (never a
fallback), and only a PDS without getRecord makes get read the whole repo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from repo_stream.core.cid import cid_text
from repo_stream.sync.proof import prove

from .servers import LocalHTTPServer, Reply, json_reply
from .test_cli import GET_REPO, did_document, run_bytes, signed

GET_RECORD = "/xrpc/com.atproto.sync.getRecord"
CAR = "application/vnd.ipld.car"


@pytest.fixture
def server() -> Any:
    with LocalHTTPServer() as local:
        yield local


def expected_records(name: str) -> dict[str, Any]:
    """The sample's records by key, from its recorded dump (an independent oracle)."""
    path = Path(str(signed(name)[0]).removesuffix(".car") + ".dump.jsonl")
    return {row["key"]: row for row in map(json.loads, path.read_text().splitlines())}


def serve(server: LocalHTTPServer, meta: dict[str, Any], car: bytes, proof: Reply | None) -> None:
    did = meta["did"]
    server.route("*", f"/{did}", json_reply(did_document(did, server.base, meta["signing_key"])))
    server.route("*", GET_REPO, Reply(body=car, content_type=CAR))
    if proof is not None:
        server.route("*", GET_RECORD, proof)


@pytest.mark.parametrize("name", ["k256", "p256"])
def test_get_fetches_only_the_proof(server: LocalHTTPServer, name: str) -> None:
    path, meta = signed(name)
    car = path.read_bytes()
    records = expected_records(name)
    key = sorted(records)[137]
    serve(server, meta, car, Reply(body=prove(car, key), content_type=CAR))
    done = run_bytes("get", meta["did"], key, "--plc-url", server.base)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == records[key]["value"]
    hits = server.hits(GET_RECORD)
    collection, _, rkey = key.partition("/")
    assert [h.query for h in hits] == [f"did={meta['did']}&collection={collection}&rkey={rkey}"]
    assert server.hits(GET_REPO) == []
    served = server.bytes_served[GET_RECORD]
    assert served < len(car) / 10, (served, len(car))  # a few KB out of ~93 KB


def test_get_absent_key_is_proven_absent(server: LocalHTTPServer) -> None:
    path, meta = signed("k256")
    car = path.read_bytes()
    key = "app.bsky.feed.post/3zzzzzzzzzzzz"
    assert key not in expected_records("k256")
    serve(server, meta, car, Reply(body=prove(car, key), content_type=CAR))
    done = run_bytes("get", f"at://{meta['did']}", key, "--plc-url", server.base)
    assert done.returncode == 1 and done.stdout == b""
    assert (
        done.stderr.decode()
        == f"error: no record {key} in the repo of {meta['did']} (absence proven by getRecord from {server.base})\n"
    )
    assert server.hits(GET_REPO) == []


def forged_proofs(car: bytes, key: str, other_car: bytes) -> dict[str, tuple[bytes, str]]:
    """Proofs that must fail, each with a part of the error it must give."""
    from repo_stream.records.writer import car_bytes
    from repo_stream.sync.partial import read_car_slice

    proof = prove(car, key)
    roots, blocks = read_car_slice(proof)
    sections = list(blocks.items())
    record_cid = sections[-1][0]
    flipped = bytearray(sections[-1][1])
    flipped[-1] ^= 1
    return {
        "record changed": (
            car_bytes(roots, [*sections[:-1], (record_cid, bytes(flipped))]),
            f"block {cid_text(record_cid)}: its bytes do not hash to its CID",
        ),
        "record dropped": (car_bytes(roots, sections[:-1]), f"the record block {cid_text(record_cid)} is not in the CAR"),
        "node dropped": (car_bytes(roots, [sections[0], *sections[2:]]), "the path has a gap"),
        "another account's commit": (prove(other_car, key), "the commit"),
    }


@pytest.mark.parametrize("forgery", ["record changed", "record dropped", "node dropped", "another account's commit"])
def test_a_forged_proof_fails_and_never_falls_back(server: LocalHTTPServer, forgery: str) -> None:
    path, meta = signed("k256")
    car = path.read_bytes()
    key = sorted(expected_records("k256"))[42]
    proof, message = forged_proofs(car, key, signed("p256")[0].read_bytes())[forgery]
    serve(server, meta, car, Reply(body=proof, content_type=CAR))
    done = run_bytes("get", meta["did"], key, "--plc-url", server.base)
    assert done.returncode == 1 and done.stdout == b""
    err = done.stderr.decode()
    assert err.startswith(f"error: record proof of {key!r} in {meta['did']}") and message in err and err.count("\n") == 1, err
    assert server.hits(GET_REPO) == []  # no fallback


def test_a_proof_signed_by_another_key_fails(server: LocalHTTPServer) -> None:
    path, meta = signed("k256")
    car = path.read_bytes()
    key = sorted(expected_records("k256"))[0]
    _, other = signed("p256")
    serve(server, {**meta, "signing_key": other["signing_key"]}, car, Reply(body=prove(car, key), content_type=CAR))
    done = run_bytes("get", meta["did"], key, "--plc-url", server.base)
    assert done.returncode == 1 and b"signature" in done.stderr, done.stderr
    assert server.hits(GET_REPO) == []


@pytest.mark.parametrize(
    "answer",
    [
        Reply(
            status=501,
            body=b'{"error":"MethodNotImplemented","message":"Method Not Implemented"}',
            content_type="application/json",
        ),
        Reply(status=400, body=b'{"error":"MethodNotImplemented"}', content_type="application/json"),
        Reply(status=404, body=b"Not Found", content_type="text/plain"),
        None,  # no route: the local server's own 404 NotFound
    ],
)
def test_a_pds_without_get_record_falls_back_to_the_repo(server: LocalHTTPServer, answer: Reply | None) -> None:
    path, meta = signed("k256")
    records = expected_records("k256")
    key = sorted(records)[7]
    serve(server, meta, path.read_bytes(), answer)
    done = run_bytes("get", meta["did"], key, "--plc-url", server.base)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == records[key]["value"]
    assert len(server.hits(GET_RECORD)) == 1 and len(server.hits(GET_REPO)) == 1


def test_record_not_found_and_server_errors_do_not_fall_back(server: LocalHTTPServer) -> None:
    path, meta = signed("k256")
    key = sorted(expected_records("k256"))[3]
    missing = Reply(
        status=400, body=b'{"error":"RecordNotFound","message":"Could not locate record"}', content_type="application/json"
    )
    serve(server, meta, path.read_bytes(), missing)
    done = run_bytes("get", meta["did"], key, "--plc-url", server.base, "--retries", "0")
    assert done.returncode == 1
    assert done.stderr.decode().startswith(f"error: getRecord of {meta['did']} from {server.base}{GET_RECORD}?did=")
    assert b"HTTP 400: RecordNotFound: Could not locate record" in done.stderr
    server.route("*", GET_RECORD, Reply(status=500, body=b'{"error":"InternalServerError"}', content_type="application/json"))
    done = run_bytes("get", meta["did"], key, "--plc-url", server.base, "--retries", "0")
    assert done.returncode == 1 and b"HTTP 500: InternalServerError" in done.stderr
    assert server.hits(GET_REPO) == []


def test_an_oversized_proof_is_refused(server: LocalHTTPServer) -> None:
    path, meta = signed("k256")
    key = sorted(expected_records("k256"))[3]
    serve(server, meta, path.read_bytes(), Reply(body=b"\0" * (5 * 1024 * 1024), content_type=CAR))
    done = run_bytes("get", meta["did"], key, "--plc-url", server.base)
    assert done.returncode == 1 and b"size cap of 4194304 bytes" in done.stderr, done.stderr
    assert server.hits(GET_REPO) == []
