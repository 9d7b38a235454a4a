"""Record proofs: prove() from a whole generated repo, verify_record_proof() of presence and
absence, and every gap or mismatch refused."""

from __future__ import annotations

import pytest

from repo_stream.core.cid import dag_cbor_cid
from repo_stream.errors import RecordProofError
from repo_stream.records.generate import generate_records
from repo_stream.records.values import record_json
from repo_stream.records.writer import car_bytes
from repo_stream.sync import prove, read_car_slice, verify_record_proof
from repo_stream.sync.generate import CommitGenerator, make_signer

DID = "did:plc:proofproofproofproofproo"


@pytest.fixture(scope="module")
def repo() -> tuple[bytes, dict[str, bytes], str]:
    sign, did_key = make_signer("k256", 4)
    records = dict(generate_records(300, seed=4, profile="small"))
    gen = CommitGenerator(DID, sign, records.items(), seed=4)
    return gen.repo_car(), records, did_key


def test_present_records_are_proven(repo: tuple[bytes, dict[str, bytes], str]) -> None:
    car, records, did_key = repo
    for key in sorted(records)[::37]:
        proof = prove(car, key)
        assert len(proof) < len(car) // 10
        got = verify_record_proof(proof, DID, key, did_key)
        assert got is not None
        assert got.block == records[key] and got.cid.cid_bytes == dag_cbor_cid(records[key]) and got.value == record_json(records[key])


def test_absence_is_proven(repo: tuple[bytes, dict[str, bytes], str]) -> None:
    car, _, did_key = repo
    for key in ("app.bsky.feed.like/2222222222222", "app.bsky.feed.post/zzzzzzzzzzzzz", "zzz.zzz.zzz/self"):
        assert verify_record_proof(prove(car, key), DID, key, did_key) is None


def test_gaps_and_mismatches_are_refused(repo: tuple[bytes, dict[str, bytes], str]) -> None:
    car, records, did_key = repo
    key = sorted(records)[100]
    proof = prove(car, key)
    roots, blocks = read_car_slice(proof)
    with pytest.raises(RecordProofError, match="is for"):
        verify_record_proof(proof, "did:plc:someoneelse", key, did_key)
    with pytest.raises(RecordProofError, match="signature"):
        verify_record_proof(proof, DID, key, make_signer("p256", 4)[1])
    for cid in blocks:
        partial = car_bytes(roots, [(c, b) for c, b in blocks.items() if c != cid])
        with pytest.raises(RecordProofError):
            verify_record_proof(partial, DID, key, did_key)
    # A proof of one key does not prove another far away.
    with pytest.raises(RecordProofError, match="gap"):
        verify_record_proof(proof, DID, sorted(records)[-1], did_key)
    with pytest.raises(RecordProofError):
        verify_record_proof(proof[:-3], DID, key, did_key)
