"""Commit signatures: Commit.verify_signature, the did:key parser and the atproto signer.

The signed samples were signed by the reference implementation (keys in their .json); other
expectations are checked with ``cryptography`` and the dag-cbor package directly, not through
repo_stream's own code paths.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
from typing import Any

import cbor2
import dag_cbor
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from multiformats import multibase

from repo_stream import (
    Commit,
    DriverBuilder,
    MemoryDriver,
    RepoStreamError,
    SignatureError,
    build_repo_car,
)
from repo_stream.core.cid import dag_cbor_cid
from repo_stream.core.commit import decode_commit
from repo_stream.crypto.didkey import (
    format_did_key,
    format_multikey,
    parse_did_key,
    parse_multikey,
)
from repo_stream.crypto.signature import CURVE_ORDERS, sign, verify
from repo_stream.records.writer import encode_commit, encode_unsigned_commit, link

from .conftest import sample_path

SAMPLES = ["signed-k256", "signed-p256"]
OTHER = {"signed-k256": "signed-p256", "signed-p256": "signed-k256"}
# The curve orders, as published in SEC 2 (secp256k1) and FIPS 186-4 (P-256).
N = {
    "secp256k1": int("FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141", 16),
    "secp256r1": int("FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16),
}
CURVES = {"k256": ec.SECP256K1, "p256": ec.SECP256R1}


def meta(name: str) -> dict[str, Any]:
    return json.loads(sample_path(f"{name}.json").read_text())


async def load_commit(car: bytes) -> Commit:
    driver = await DriverBuilder().load_car(car)
    assert isinstance(driver, MemoryDriver)
    assert driver.commit is not None
    return driver.commit


def raw_verify(key: ec.EllipticCurvePublicKey, data: bytes, sig: bytes) -> bool:
    """Plain ECDSA-SHA256 with cryptography alone (accepts high-S)."""
    try:
        key.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


# ---------------------------------------------------------------------------- the samples


@pytest.mark.anyio
@pytest.mark.parametrize("name", SAMPLES)
async def test_sample_verifies_with_its_key_and_not_with_the_other(name: str) -> None:
    info = meta(name)
    commit = await load_commit(sample_path(f"{name}.car").read_bytes())
    assert (commit.did, commit.rev, str(commit.cid)) == (info["did"], info["rev"], info["commit_cid"])
    assert commit.verify_signature(info["signing_key"]) is None
    assert commit.verify_signature(parse_did_key(info["signing_key"])) is None
    wrong = meta(OTHER[name])["signing_key"]
    with pytest.raises(SignatureError) as caught:
        commit.verify_signature(wrong)
    message = str(caught.value)
    assert info["commit_cid"] in message and info["did"] in message and wrong in message
    assert "does not verify" in message


@pytest.mark.anyio
@pytest.mark.parametrize("name", SAMPLES)
async def test_sample_fails_with_a_fresh_key_of_the_same_curve(name: str) -> None:
    commit = await load_commit(sample_path(f"{name}.car").read_bytes())
    curve = parse_did_key(meta(name)["signing_key"]).curve
    stranger = ec.generate_private_key(type(curve)()).public_key()
    with pytest.raises(SignatureError, match="does not verify"):
        commit.verify_signature(stranger)


@pytest.mark.anyio
@pytest.mark.parametrize("name", SAMPLES)
async def test_unsigned_bytes_are_the_block_without_sig_reencoded(name: str) -> None:
    car = sample_path(f"{name}.car").read_bytes()
    commit = await load_commit(car)
    # Independently: the dag-cbor package decodes the block, drops sig, re-encodes canonically.
    obj = dag_cbor.decode(commit.block)
    assert set(obj) == {"did", "version", "data", "rev", "prev", "sig"}
    del obj["sig"]
    assert commit.unsigned_bytes() == dag_cbor.encode(obj)
    assert str(commit.cid) == meta(name)["commit_cid"]


@pytest.mark.anyio
@pytest.mark.parametrize("name", SAMPLES)
@pytest.mark.parametrize("field", ["rev", "did", "data", "prev", "version"])
async def test_sample_with_a_changed_field_fails(name: str, field: str) -> None:
    info = meta(name)
    commit = await load_commit(sample_path(f"{name}.car").read_bytes())
    other_cid = commit.data.set(base="base32")
    changes: dict[str, Any] = {
        "rev": {"rev": "3n2umxbccck2i"},
        "did": {"did": "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"},
        "data": {"data": type(commit.data).decode(bytes(commit.data)[:-1] + bytes([bytes(commit.data)[-1] ^ 1]))},
        "prev": {"prev": other_cid},
        "version": {"version": 2},
    }[field]
    tampered = dataclasses.replace(commit, **changes)
    with pytest.raises(SignatureError, match="does not verify"):
        tampered.verify_signature(info["signing_key"])


@pytest.mark.anyio
@pytest.mark.parametrize("name", SAMPLES)
async def test_sample_commit_block_rewritten_with_another_rev_fails(name: str) -> None:
    info = meta(name)
    commit = await load_commit(sample_path(f"{name}.car").read_bytes())
    block = encode_commit(commit.did, bytes(commit.data), "3n2umxbccck2z", None, commit.sig)
    rewritten, _ = decode_commit(block, dag_cbor_cid(block), strict=True)
    assert rewritten.rev == "3n2umxbccck2z" and rewritten.sig == commit.sig
    with pytest.raises(SignatureError, match=f"commit {rewritten.cid} of {info['did']}: signature does not verify"):
        rewritten.verify_signature(info["signing_key"])


@pytest.mark.anyio
@pytest.mark.parametrize("name", SAMPLES)
async def test_high_s_twin_of_the_real_signature_is_refused(name: str) -> None:
    info = meta(name)
    commit = await load_commit(sample_path(f"{name}.car").read_bytes())
    key = parse_did_key(info["signing_key"])
    n = N[key.curve.name]
    r, s = int.from_bytes(commit.sig[:32], "big"), int.from_bytes(commit.sig[32:], "big")
    assert s <= n // 2  # the reference implementation signs low-S
    high = r.to_bytes(32, "big") + (n - s).to_bytes(32, "big")
    # Plain ECDSA accepts the twin: only the low-S rule can refuse it.
    assert raw_verify(key, commit.unsigned_bytes(), high)
    with pytest.raises(SignatureError, match="high-S"):
        dataclasses.replace(commit, sig=high).verify_signature(info["signing_key"])


@pytest.mark.anyio
@pytest.mark.parametrize("name", SAMPLES)
async def test_malformed_signatures_are_refused(name: str) -> None:
    info = meta(name)
    commit = await load_commit(sample_path(f"{name}.car").read_bytes())
    n = N[parse_did_key(info["signing_key"]).curve.name]
    r = commit.sig[:32]
    cases = {
        b"": "must be 64 bytes",
        commit.sig[:63]: "must be 64 bytes",
        commit.sig + b"\x00": "must be 64 bytes",
        bytes(32) + commit.sig[32:]: "r and s must be in 1..n-1",
        r + bytes(32): "r and s must be in 1..n-1",
        r + n.to_bytes(32, "big"): "r and s must be in 1..n-1",
        r + b"\xff" * 32: "r and s must be in 1..n-1",
        n.to_bytes(32, "big") + commit.sig[32:]: "r and s must be in 1..n-1",
        (n - 1).to_bytes(32, "big") + commit.sig[32:]: "does not verify",
        r + (n // 2 + 1).to_bytes(32, "big"): "high-S",
        r + (n - 1).to_bytes(32, "big"): "high-S",
        r + (n // 2).to_bytes(32, "big"): "does not verify",  # the highest low S: checked, and wrong
        r + (1).to_bytes(32, "big"): "does not verify",
        commit.sig[:-1] + bytes([commit.sig[-1] ^ 1]): "does not verify",
    }
    for sig, message in cases.items():
        with pytest.raises(SignatureError, match=message):
            dataclasses.replace(commit, sig=sig).verify_signature(info["signing_key"])


def test_each_way_in_gives_the_same_verdict_and_message() -> None:
    """A bytes signature of bytes data takes libsecp256k1's one verdict (no Python checks
    first); a bytearray or memoryview the checks and then the curve: the same outcome, each
    error with the same message, over the edge cases of r and s."""
    from repo_stream.crypto.signature import VerifyingKey

    for curve in (ec.SECP256K1(), ec.SECP256R1()):
        private = ec.generate_private_key(curve)
        key = VerifyingKey(private.public_key())
        n = N[curve.name]
        data = b"the unsigned commit"
        good = sign(private, data)
        r, s = int.from_bytes(good[:32], "big"), int.from_bytes(good[32:], "big")
        pairs = [(r, s), (r, n - s), (0, s), (r, 0), (n, s), (r, n), (2**256 - 1, s), (r, 2**256 - 1), (r, n // 2), (r, n // 2 + 1), (n - 1, s), (r, 1)]
        outcomes = []
        for rr, ss in pairs:
            sig = rr.to_bytes(32, "big") + ss.to_bytes(32, "big")
            seen = []
            for way_sig, way_data in ((sig, data), (bytearray(sig), data), (sig, memoryview(data)), (memoryview(sig), bytearray(data))):
                try:
                    key.verify(way_data, way_sig, where="w")
                    seen.append("ok")
                except SignatureError as exc:
                    seen.append(str(exc))
            assert len(set(seen)) == 1, (curve.name, rr, ss, seen)
            outcomes.append(seen[0])
        assert outcomes[0] == "ok"
        assert [o == "ok" for o in outcomes].count(True) == 1  # only the real signature
        assert "high-S" in outcomes[1] and "high-S" in outcomes[9]
        assert all("r and s must be in 1..n-1" in o for o in outcomes[2:8])
        assert "does not verify" in outcomes[8] and "does not verify" in outcomes[10] and "does not verify" in outcomes[11]


def test_signatures_checked_from_many_threads_at_once_keep_their_verdicts() -> None:
    """The secp256k1 check keeps its parsed signature per thread: threads checking good and bad
    signatures at once each get their own verdicts."""
    import threading

    from repo_stream.crypto.signature import VerifyingKey

    private = ec.generate_private_key(ec.SECP256K1())
    key = VerifyingKey(private.public_key())
    items = []
    for i in range(40):
        data = f"commit {i}".encode()
        sig = sign(private, data)
        items.append((data, sig, True))
        items.append((data, sig[:-1] + bytes([sig[-1] ^ 1]), False))
    wrong: list[object] = []

    def run() -> None:
        for _ in range(10):
            for data, sig, valid in items:
                try:
                    key.verify(data, sig)
                    ok = True
                except SignatureError:
                    ok = False
                if ok != valid:
                    wrong.append((data, valid))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# ---------------------------------------------------------------------------- generated keys

RECORDS = [(f"app.bsky.feed.post/3k{i:011d}", cbor2.dumps({"$type": "app.bsky.feed.post", "text": f"post {i}"}, canonical=True)) for i in range(40)]
DID = "did:plc:signaturetestsignaturetes"


@pytest.mark.anyio
@pytest.mark.parametrize("curve", ["k256", "p256"])
async def test_repo_signed_with_a_generated_key_verifies(curve: str) -> None:
    private = ec.generate_private_key(CURVES[curve]())
    public = private.public_key()
    out = io.BytesIO()
    written = build_repo_car(RECORDS, did=DID, rev="3kaaaaaaaaaab", path=out, sign=functools.partial(sign, private))
    commit = await load_commit(out.getvalue())
    assert commit == written and commit.cid == written.cid
    did_key = format_did_key(public)
    assert did_key.startswith("did:key:zQ3s" if curve == "k256" else "did:key:zDn")
    for key in (did_key, public):
        assert commit.verify_signature(key) is None
        assert written.verify_signature(key) is None
    # The signature is plain ECDSA-SHA256 over encode_unsigned_commit, as cryptography sees it.
    assert raw_verify(public, encode_unsigned_commit(DID, bytes(commit.data), "3kaaaaaaaaaab"), commit.sig)
    other = ec.generate_private_key(CURVES[curve]()).public_key()
    with pytest.raises(SignatureError, match="does not verify"):
        commit.verify_signature(format_did_key(other))


@pytest.mark.anyio
async def test_unsigned_repo_has_no_valid_signature() -> None:
    out = io.BytesIO()
    build_repo_car(RECORDS, did=DID, rev="3kaaaaaaaaaab", path=out)
    commit = await load_commit(out.getvalue())
    key = ec.generate_private_key(ec.SECP256K1()).public_key()
    with pytest.raises(SignatureError, match=r"must be 64 bytes \(r \|\| s\), got 0 bytes"):
        commit.verify_signature(key)


@pytest.mark.parametrize("curve", ["k256", "p256"])
def test_signer_is_low_s_compact_and_plain_ecdsa(curve: str) -> None:
    private = ec.generate_private_key(CURVES[curve]())
    n = N[private.curve.name]
    assert CURVE_ORDERS[private.curve.name] == n
    highs = 0
    for i in range(64):
        data = f"message {i}".encode()
        sig = sign(private, data)
        assert len(sig) == 64
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        assert 0 < r < n and 0 < s <= n // 2
        assert raw_verify(private.public_key(), data, sig)
        verify(private.public_key(), data, sig)
        # What OpenSSL gives is high-S about half the time; sign() must have folded those.
        _, s2 = decode_dss_signature(private.sign(data, ec.ECDSA(hashes.SHA256())))
        highs += s2 > n // 2
    assert highs > 0


def test_commit_with_extra_fields_signs_them_too() -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    did_key = format_did_key(private.public_key())
    data = dag_cbor_cid(b"root")
    fields = {"did": DID, "version": 3, "data": link(data), "rev": "3kaaaaaaaaaab", "prev": None, "note": "hello", "extra": [1, {"x": b"\x01"}]}
    # Signed over all fields but sig, as the reference implementation does.
    sig = sign(private, cbor2.dumps(fields, canonical=True))
    block = cbor2.dumps({**fields, "sig": sig}, canonical=True)
    commit, _ = decode_commit(block, dag_cbor_cid(block))
    assert commit.verify_signature(did_key) is None
    # An extra field changed after signing...
    changed = cbor2.dumps({**fields, "note": "hellO", "sig": sig}, canonical=True)
    with pytest.raises(SignatureError, match="does not verify"):
        decode_commit(changed, dag_cbor_cid(changed))[0].verify_signature(did_key)
    # ...or added to a commit signed over the five fields only.
    five = {k: v for k, v in fields.items() if k not in ("note", "extra")}
    sig5 = sign(private, cbor2.dumps(five, canonical=True))
    block5 = cbor2.dumps({**five, "sig": sig5}, canonical=True)
    assert decode_commit(block5, dag_cbor_cid(block5))[0].verify_signature(did_key) is None
    added = cbor2.dumps({**five, "sig": sig5, "zzz": 1}, canonical=True)
    with pytest.raises(SignatureError, match="does not verify"):
        decode_commit(added, dag_cbor_cid(added))[0].verify_signature(did_key)
    # A changed dataclass field still counts when there are extra fields.
    with pytest.raises(SignatureError, match="does not verify"):
        dataclasses.replace(commit, rev="3kaaaaaaaaaac").verify_signature(did_key)


# ---------------------------------------------------------------------------- did:key


def test_sample_keys_parse_to_their_curves_and_format_back() -> None:
    for name, curve in (("signed-k256", "secp256k1"), ("signed-p256", "secp256r1")):
        did_key = meta(name)["signing_key"]
        key = parse_did_key(did_key)
        assert key.curve.name == curve
        assert format_did_key(key) == did_key
        assert parse_multikey(did_key.removeprefix("did:key:")).public_numbers() == key.public_numbers()
        # Independently: base58btc of the multicodec varint + the compressed point.
        prefix = {"secp256k1": b"\xe7\x01", "secp256r1": b"\x80\x24"}[curve]
        assert multibase.decode(did_key.removeprefix("did:key:")) == prefix + key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)


def _multikey(prefix: bytes, point: bytes) -> str:
    return "did:key:" + multibase.encode(prefix + point, "base58btc")


K256_POINT = ec.generate_private_key(ec.SECP256K1()).public_key().public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
UNCOMPRESSED = ec.generate_private_key(ec.SECP256K1()).public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
ED25519 = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

BAD_DID_KEYS = {
    "empty": ("", "not a did:key"),
    "a did:plc": ("did:plc:ewvi7nxzyoun6zhxrhs64oiz", "not a did:key"),
    "no multibase": ("did:key:", "not base58btc multibase"),
    "base32 multibase": ("did:key:bafyrei", "not base58btc multibase"),
    "bad base58": ("did:key:z0OIl", "not valid base58btc"),
    "ed25519 key": (_multikey(b"\xed\x01", ED25519), "ed25519-pub"),
    "not a key codec": (_multikey(b"\x71", K256_POINT), "not an atproto key type"),
    "uncompressed point": (_multikey(b"\xe7\x01", UNCOMPRESSED), "33-byte compressed point"),
    "truncated point": (_multikey(b"\xe7\x01", K256_POINT[:-1]), "33-byte compressed point"),
    "bad point prefix": (_multikey(b"\xe7\x01", b"\x04" + K256_POINT[1:]), "33-byte compressed point"),
    "x not on curve": (_multikey(b"\x80\x24", b"\x02" + b"\xff" * 32), "not a point on secp256r1"),
    # x = 5: 5^3 + 7 has no square root mod p (no point); read by libsecp256k1 first, then refused as above
    "secp256k1 x not on curve": (_multikey(b"\xe7\x01", b"\x02" + (5).to_bytes(32, "big")), "not a point on secp256k1"),
}


@pytest.mark.parametrize("did_key, message", list(BAD_DID_KEYS.values()), ids=list(BAD_DID_KEYS))
def test_bad_did_keys_raise_signature_error(did_key: str, message: str) -> None:
    with pytest.raises(SignatureError, match=message) as caught:
        parse_did_key(did_key)
    assert isinstance(caught.value, RepoStreamError)
    assert repr(did_key[:100]) in str(caught.value)


@pytest.mark.anyio
async def test_bad_did_key_through_verify_names_commit_and_key() -> None:
    out = io.BytesIO()
    private = ec.generate_private_key(ec.SECP256K1())
    written = build_repo_car(RECORDS, did=DID, rev="3kaaaaaaaaaab", path=out, sign=functools.partial(sign, private))
    for did_key, message in BAD_DID_KEYS.values():
        with pytest.raises(SignatureError, match=message) as caught:
            written.verify_signature(did_key)
        assert f"commit {written.cid} of {DID}" in str(caught.value)


@pytest.mark.parametrize("did_key, message", list(BAD_DID_KEYS.values()), ids=list(BAD_DID_KEYS))
def test_bad_did_keys_give_verifying_key_the_same_error(did_key: str, message: str) -> None:
    """verifying_key reads secp256k1 did:keys without cryptography: the same errors."""
    from repo_stream.crypto.signature import verifying_key

    with pytest.raises(SignatureError, match=message) as caught:
        verifying_key(did_key)
    with pytest.raises(SignatureError) as parsed:
        parse_did_key(did_key)
    assert str(caught.value) == str(parsed.value)


def test_a_secp256k1_did_key_parsed_light_checks_as_the_full_key_does() -> None:
    """A did:key parsed for checking (libsecp256k1 alone) has the same curve, did:key,
    cryptography key (made when asked) and verdicts as one made from the cryptography key."""
    from repo_stream.crypto.signature import VerifyingKey, verifying_key

    private = ec.generate_private_key(ec.SECP256K1())
    did_key = format_did_key(private.public_key())
    light, full = verifying_key(did_key), VerifyingKey(parse_did_key(did_key), did_key)
    assert light is verifying_key(did_key)  # cached
    assert (light.curve, light.did_key) == (full.curve, full.did_key) == ("secp256k1", did_key)
    data = b"the unsigned commit"
    good = sign(private, data)
    n = N["secp256k1"]
    high = good[:32] + (n - int.from_bytes(good[32:], "big")).to_bytes(32, "big")
    for sig in (good, high, good[:-1] + bytes([good[-1] ^ 1]), bytes(64), good[:63]):
        for way in (sig, bytearray(sig)):
            verdicts = []
            for key in (light, full):
                try:
                    key.verify(data, way, where="w")
                    verdicts.append("ok")
                except SignatureError as exc:
                    verdicts.append(str(exc))
            assert verdicts[0] == verdicts[1], verdicts
    assert light.public_key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint) == private.public_key().public_bytes(
        Encoding.X962, PublicFormat.CompressedPoint
    )


def test_verifying_key_keeps_more_secp256k1_keys_than_a_busy_stream_has_accounts() -> None:
    """The parsed keys of 5,000 accounts stay cached (a firehose follower with more accounts
    than the cache holds would parse a key, ~90 us, at nearly every event)."""
    from repo_stream.crypto.signature import MAX_PARSED_K256, verifying_key

    assert MAX_PARSED_K256 >= 32_768
    keys = [format_did_key(ec.generate_private_key(ec.SECP256K1()).public_key()) for _ in range(5000)]
    first = [verifying_key(k) for k in keys]
    assert all(verifying_key(k) is v for k, v in zip(keys, first, strict=True))


def test_keys_of_other_kinds_are_refused() -> None:
    commit_key_errors = [
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
        b"\x02" * 33,
    ]
    for key in commit_key_errors:
        with pytest.raises(SignatureError, match="cannot verify"):
            verify(key, b"data", bytes(64))  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="expected a did:key string"):
        parse_did_key(42)  # type: ignore[arg-type]
    with pytest.raises(SignatureError, match="secp384r1"):
        format_multikey(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(SignatureError, match="cannot sign"):
        sign(ec.generate_private_key(ec.SECP384R1()), b"data")


def test_a_read_commit_makes_its_cids_on_first_use_and_equals_one_built_eagerly() -> None:
    """decode_commit leaves data/prev as raw CIDs until asked for (multiformats takes ~70 ms to
    import): they then become the same CID objects an eagerly built Commit holds."""
    did, rev, sig = "did:plc:abcdefghijklmnopqrstuvwx", "3kaaaaaaaaaab", bytes(64)
    data = dag_cbor_cid(b"\xa2ael\xf6aee\x80")
    prev = dag_cbor_cid(b"an earlier commit")
    for prev_raw in (None, prev):
        block = encode_commit(did, data, rev, prev_raw, sig, 3)
        commit, data_raw = decode_commit(block, dag_cbor_cid(block))
        assert data_raw == data
        assert "data" not in commit.__dict__  # not made yet
        assert commit.data_bytes == data
        eager = Commit(did=did, version=3, data=commit.data, rev=rev, prev=commit.prev, sig=sig, block=block)
        assert bytes(commit.data) == data and str(commit.data) == str(eager.data)
        assert commit.prev == (None if prev_raw is None else eager.prev)
        assert commit == eager and hash(commit) == hash(eager)
        assert commit.unsigned_bytes() == eager.unsigned_bytes() == encode_unsigned_commit(did, data, rev, prev_raw, 3)
        assert dataclasses.replace(commit, rev="3kaaaaaaaaaac").data == eager.data
        with pytest.raises(AttributeError, match="no attribute 'nothing'"):
            commit.nothing  # noqa: B018 - the attribute access is the test


@pytest.mark.parametrize("command", ["stats", "ls", "dump"])
def test_walking_a_file_does_not_import_multiformats_or_httpx(command: str, impl: str) -> None:
    """A walk needs no CID objects and a file no HTTP: a walk of a file in a fresh process leaves
    httpx (~0.2 s of start-up) unimported, and multiformats too where no record is decoded in
    Python (the C core's dump transcodes each block into its JSON line itself)."""
    import subprocess
    import sys
    from pathlib import Path

    car = Path(__file__).resolve().parent.parent / "fixtures" / "repo-2000-shuffled.car"
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['repo_stream', {command!r}, *{['--json'] if command == 'stats' else []!r}, {str(car)!r}]\n"
        "try:\n    runpy.run_module('repo_stream', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('multiformats' in sys.modules, 'httpx' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = done.stdout.splitlines()
    assert (json.loads(lines[0])["records"] if command == "stats" else len(lines)) == 2000
    multiformats, httpx = done.stderr.strip().splitlines()[-1].split()
    assert httpx == "False"
    # the reference's JSON form of a record knows CID objects
    assert multiformats == ("True" if command == "dump" and impl == "python" else "False")
