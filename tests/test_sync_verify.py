"""verify_commit / verify_sync on #commit events generated the way a PDS makes them (the
project's writer builds each tree; secp256k1 and P-256 keys): every commit verifies and inverts
to its prevData; every single mutation is refused with the class of the rule it breaks; random
and mutated bytes give typed errors only."""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import cbrrr
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_stream.core.cid import dag_cbor_cid
from repo_stream.core.commit import encode_commit, encode_unsigned_commit
from repo_stream.errors import (
    BlocksTooLargeError,
    CommitDidMismatchError,
    CommitNotRootError,
    CommitSignatureError,
    DeletedKeyPresentError,
    DuplicateOpPathError,
    FutureRevError,
    InvalidOpError,
    InvalidRevError,
    InversionMismatchError,
    MalformedCarError,
    MalformedEventError,
    MissingCommitBlockError,
    MissingPrevDataError,
    MissingProofBlockError,
    MissingRecordBlockError,
    OpCidMismatchError,
    OpPrevMissingError,
    RepoStreamError,
    RevMismatchError,
    StaleRevError,
    TooManyOpsError,
)
from repo_stream.records.generate import generate_records
from repo_stream.records.values import Link, record_json
from repo_stream.records.writer import car_bytes
from repo_stream.sync import (
    CommitVerifyError,
    OutOfSyncError,
    RepoState,
    decode_frame,
    read_car_slice,
    verify_commit,
    verify_sync,
)
from repo_stream.sync.generate import CommitGenerator, encode_message, make_signer, tid

DID = "did:plc:ewvi7nxzyoun6zhxrhs64oiz"
SIGNERS = {curve: make_signer(curve, 3) for curve in ("k256", "p256")}  # type: ignore[arg-type]
POOL = [block for _, block in generate_records(200, seed=5, profile="small")]


@functools.lru_cache(maxsize=64)
def stream(seed: int, curve: str, commits: int, big: bool, proof: str = "covering") -> tuple[str, tuple[tuple[bytes, str, bytes], ...]]:
    """``commits`` generated #commit messages of one repo: (message, since rev, since data).
    With ``proof="minimal"`` the CARs hold only the nodes verification needs."""
    sign, did_key = SIGNERS[curve]
    rng = random.Random(seed)
    records = generate_records(rng.randint(0, 250), seed=seed, profile="small")
    gen = CommitGenerator(DID, sign, records, seed=seed, pool=POOL, proof=proof)  # type: ignore[arg-type]
    out = []
    for i in range(commits):
        before_rev, before_data = gen.rev, gen.root
        n = rng.randint(100, 200) if big and i == 0 else rng.randint(1, 12)
        out.append((gen.commit(gen.random_ops(n)), before_rev, before_data))
    return did_key, tuple(out)


def body_of(message: bytes) -> dict[str, Any]:
    return dict(decode_frame(message).body)


def encode(body: dict[str, Any]) -> bytes:
    return bytes(cbrrr.encode_dag_cbor({"op": 1, "t": "#commit"})) + bytes(cbrrr.encode_dag_cbor(body, cid_type=Link))


def with_blocks(body: dict[str, Any], change: Callable[[list[bytes], dict[bytes, bytes]], None]) -> dict[str, Any]:
    roots, blocks = read_car_slice(body["blocks"])
    change(roots, blocks)
    return {**body, "blocks": car_bytes(roots, blocks.items())}


def resign(body: dict[str, Any], sign: Callable[[bytes], bytes], *, did: str | None = None, rev: str | None = None) -> dict[str, Any]:
    """The event with its commit re-made (other did or rev) and signed by ``sign``."""
    roots, blocks = read_car_slice(body["blocks"])
    old = cbrrr.decode_dag_cbor(blocks[roots[0]])
    data = bytes(old["data"].cid_bytes)
    new_did, new_rev = did or old["did"], rev or old["rev"]
    block = encode_commit(new_did, data, new_rev, None, sign(encode_unsigned_commit(new_did, data, new_rev)))
    cid = dag_cbor_cid(block)
    del blocks[roots[0]]
    blocks = {cid: block, **blocks}
    return {**body, "commit": Link(cid), "rev": new_rev, "blocks": car_bytes([cid], blocks.items())}


# ------------------------------------------------------------------------------ valid events


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), curve=st.sampled_from(["k256", "p256"]), big=st.booleans(), proof=st.sampled_from(["covering", "minimal"]))
def test_generated_commits_verify_and_invert(seed: int, curve: str, big: bool, proof: str) -> None:
    did_key, messages = stream(seed, curve, 4, big, proof)
    state = None
    for message, since, since_data in messages:
        body = body_of(message)
        result = verify_commit(message, key=did_key, prev=state)
        assert result.inverted and result.did == DID and result.rev == body["rev"] and result.since == since
        assert result.prev_data is not None and result.prev_data.cid_bytes == since_data
        assert str(result.commit) == str(body["commit"]) and result.seq == body["seq"]
        assert [(op.action, op.path) for op in result.ops] == [(op["action"], op["path"]) for op in body["ops"]]
        _, blocks = read_car_slice(body["blocks"])
        for op, raw in zip(result.ops, body["ops"], strict=True):
            assert op.cid == raw["cid"] and op.prev == raw.get("prev")
            if op.action == "delete":
                assert op.value is None and op.cid is None
            else:
                assert op.cid is not None and op.value == record_json(blocks[op.cid.cid_bytes])
        # The decoded body verifies the same.
        assert verify_commit(body, key=did_key, prev=state) == result
        state = RepoState(result.rev, str(result.data))


def test_sync_event_verifies() -> None:
    sign, did_key = SIGNERS["p256"]
    gen = CommitGenerator(DID, sign, generate_records(50, seed=1, profile="small"), seed=1, pool=POOL)
    gen.commit(gen.random_ops(3))
    result = verify_sync(gen.sync_message(), key=did_key)
    assert (result.did, result.rev, result.data.cid_bytes, result.commit.cid_bytes) == (DID, gen.rev, gen.root, gen.commit_cid)
    with pytest.raises(CommitSignatureError):
        verify_sync(gen.sync_message(), key=SIGNERS["k256"][1])
    with pytest.raises(MalformedEventError):
        verify_sync(gen.commit(gen.random_ops(1)), key=did_key)  # a #commit is not a #sync


def test_out_of_sync_is_reported_with_the_result() -> None:
    did_key, messages = stream(11, "k256", 2, False)
    first = verify_commit(messages[0][0], key=did_key)
    # since differs from the held rev
    with pytest.raises(OutOfSyncError) as info:
        verify_commit(messages[1][0], key=did_key, prev=RepoState("2222222222222", first.data))
    assert info.value.result == verify_commit(messages[1][0], key=did_key)
    # prevData differs from the held data
    with pytest.raises(OutOfSyncError):
        verify_commit(messages[1][0], key=did_key, prev=RepoState(first.rev, Link(dag_cbor_cid(b"other"))))
    assert verify_commit(messages[1][0], key=did_key, prev=RepoState(first.rev, first.data)).inverted
    assert not issubclass(OutOfSyncError, CommitVerifyError)


def test_no_prev_data_needs_the_callers_consent() -> None:
    did_key, messages = stream(12, "k256", 1, False)
    body = body_of(messages[0][0])
    del body["prevData"]
    for op in body["ops"]:
        op.pop("prev", None)
    with pytest.raises(MissingPrevDataError):
        verify_commit(encode(body), key=did_key)
    result = verify_commit(encode(body), key=did_key, require_prev_data=False)
    assert not result.inverted and result.prev_data is None


# ------------------------------------------------------------------------------ mutations

MUTATIONS = [
    "drop-block",
    "op-cid",
    "op-prev",
    "op-drop",
    "op-duplicate",
    "op-add",
    "sig-flip",
    "prev-data",
    "rev-replayed",
    "other-did",
    "other-key",
    "delete-present",
    "update-without-prev",
    "create-with-prev",
]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), curve=st.sampled_from(["k256", "p256"]), pick=st.integers(0, 1_000_000))
@pytest.mark.parametrize("mutation", MUTATIONS)
def test_every_mutation_is_refused(mutation: str, seed: int, curve: str, pick: int) -> None:
    did_key, messages = stream(seed, curve, 1, pick % 4 == 0, "minimal")
    message = messages[0][0]
    body = body_of(message)
    verify_commit(message, key=did_key)  # the unchanged event verifies
    rng = random.Random(pick)
    ops: list[dict[str, Any]] = body["ops"]
    other_cid = Link(dag_cbor_cid(b"something else %d" % pick))
    prev = None
    expected: tuple[type[RepoStreamError], ...]
    if mutation == "drop-block":
        roots, blocks = read_car_slice(body["blocks"])
        dropped = rng.choice(sorted(blocks))
        record_cids = {op["cid"].cid_bytes for op in ops if op["cid"] is not None}
        body = with_blocks(body, lambda _, b: b.pop(dropped))
        expected = (
            (MissingCommitBlockError,) if dropped == roots[0] else (MissingRecordBlockError,) if dropped in record_cids else (MissingProofBlockError,)
        )
    elif mutation == "op-cid":
        changeable = [op for op in ops if op["action"] != "delete"]
        if not changeable:
            return
        rng.choice(changeable)["cid"] = other_cid
        expected = (OpCidMismatchError,)
    elif mutation == "op-prev":
        changeable = [op for op in ops if op["action"] != "create"]
        if not changeable:
            return
        rng.choice(changeable)["prev"] = other_cid
        expected = (InversionMismatchError,)
    elif mutation == "op-drop":
        ops.pop(rng.randrange(len(ops)))
        expected = (InversionMismatchError,)
    elif mutation == "op-duplicate":
        ops.insert(rng.randrange(len(ops) + 1), dict(rng.choice(ops)))
        expected = (DuplicateOpPathError,)
    elif mutation == "op-add":
        ops.insert(rng.randrange(len(ops) + 1), {"action": "create", "path": f"app.bsky.feed.like/{tid(rng.randrange(1 << 50))}", "cid": other_cid})
        expected = (OpCidMismatchError, MissingProofBlockError)
    elif mutation == "sig-flip":
        roots, blocks = read_car_slice(body["blocks"])
        commit = cbrrr.decode_dag_cbor(blocks[roots[0]])
        sig = bytearray(commit["sig"])
        sig[rng.randrange(64)] ^= 1 << rng.randrange(8)
        block = bytes(cbrrr.encode_dag_cbor({**commit, "sig": bytes(sig)}))
        cid = dag_cbor_cid(block)
        del blocks[roots[0]]
        body = {**body, "commit": Link(cid), "blocks": car_bytes([cid], [(cid, block), *blocks.items()])}
        expected = (CommitSignatureError,)
    elif mutation == "prev-data":
        body["prevData"] = other_cid
        expected = (InversionMismatchError,)
    elif mutation == "rev-replayed":
        prev = RepoState(rng.choice([body["rev"], tid(1 << 52)]), body["prevData"])
        expected = (StaleRevError,)
    elif mutation == "other-did":
        if rng.random() < 0.5:
            body["repo"] = "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa"  # the event names another repo
        else:
            body = resign(body, SIGNERS[curve][0], did="did:plc:bbbbbbbbbbbbbbbbbbbbbbbb")  # a commit of another repo
        expected = (CommitDidMismatchError,)
    elif mutation == "other-key":
        did_key = SIGNERS["p256" if curve == "k256" else "k256"][1]
        expected = (CommitSignatureError,)
    elif mutation == "delete-present":
        changeable = [op for op in ops if op["action"] == "update"]
        if not changeable:
            return
        op = rng.choice(changeable)
        op["action"], op["cid"] = "delete", None
        expected = (DeletedKeyPresentError,)
    elif mutation == "update-without-prev":
        changeable = [op for op in ops if op["action"] != "create"]
        if not changeable:
            return
        rng.choice(changeable).pop("prev")
        expected = (OpPrevMissingError,)
    else:  # create-with-prev
        changeable = [op for op in ops if op["action"] == "create"]
        if not changeable:
            return
        rng.choice(changeable)["prev"] = other_cid
        expected = (InvalidOpError,)
    for form in (encode(body), body):
        with pytest.raises(expected):
            verify_commit(form, key=did_key, prev=prev)


def test_other_rules() -> None:
    sign, did_key = SIGNERS["k256"]
    _, messages = stream(21, "k256", 1, False)
    body = body_of(messages[0][0])
    with pytest.raises(FutureRevError):
        verify_commit(body, key=did_key, now=1_600_000_000.0)
    with pytest.raises(InvalidRevError):
        verify_commit(resign(body, sign, rev="not-a-tid-rev"), key=did_key)
    with pytest.raises(RevMismatchError):
        verify_commit({**body, "rev": tid(1 << 52)}, key=did_key)
    with pytest.raises(TooManyOpsError):
        verify_commit({**body, "ops": [body["ops"][0]] * 201}, key=did_key)
    with pytest.raises(BlocksTooLargeError):
        verify_commit({**body, "blocks": bytes(2_000_001)}, key=did_key)
    with pytest.raises(BlocksTooLargeError):
        verify_commit({**body, "tooBig": True}, key=did_key)
    with pytest.raises(CommitNotRootError):
        verify_commit({**body, "commit": Link(dag_cbor_cid(b"x"))}, key=did_key)
    with pytest.raises(MalformedCarError):
        verify_commit({**body, "blocks": body["blocks"][:-1]}, key=did_key)
    with pytest.raises(InvalidOpError):
        verify_commit({**body, "ops": [{**body["ops"][0], "path": "not a key"}]}, key=did_key)
    with pytest.raises(MalformedEventError):
        verify_commit({**body, "ops": "nope"}, key=did_key)
    with pytest.raises(MalformedEventError):
        verify_commit(encode_message("#identity", {"did": DID, "seq": 1}), key=did_key)


# ------------------------------------------------------------------------------ hostile bytes


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2000))
def test_random_bytes_are_malformed_events(data: bytes) -> None:
    with pytest.raises(CommitVerifyError):
        verify_commit(data, key=SIGNERS["k256"][1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 3), position=st.integers(0, 1 << 30), byte=st.integers(0, 255), cut=st.booleans())
def test_mutated_messages_give_typed_errors(seed: int, position: int, byte: int, cut: bool) -> None:
    did_key, messages = stream(seed, "k256", 1, False)
    message = bytearray(messages[0][0])
    at = position % len(message)
    if cut:
        del message[at:]
    else:
        message[at] = byte
    try:
        verify_commit(bytes(message), key=did_key)
    except (CommitVerifyError, OutOfSyncError):
        pass


def _commit_variants() -> list[bytes]:
    """Commit blocks: the usual ones (with and without prev) and ones the single-decode path must
    hand to decode_commit: another version, extra fields, non-canonical, not a map, a bad data."""
    data = dag_cbor_cid(b"\xa2ae\x80al\xf6")
    prev = dag_cbor_cid(b"\x01")
    usual = encode_commit("did:plc:abc", data, "3kaaaaaaaaaaa", None, b"\x07" * 64)
    with_prev = encode_commit("did:plc:abc", data, "3kaaaaaaaaaaa", prev, b"\x07" * 64)
    obj = cbrrr.decode_dag_cbor(usual)
    extra = cbrrr.encode_dag_cbor({**obj, "zzz": 1})
    not_canonical = b"\xa6" + usual[1:].replace(b"\x03", b"\x18\x03", 1)  # version as a 2-byte int
    return [
        usual,
        with_prev,
        encode_commit("did:plc:abc", data, "3kaaaaaaaaaaa", None, b"\x07" * 64, version=2),
        extra,
        not_canonical,
        cbrrr.encode_dag_cbor([1, 2]),
        cbrrr.encode_dag_cbor({**obj, "data": b"not a link"}),
        cbrrr.encode_dag_cbor({**obj, "data": cbrrr.CID(b"\x01\x55\x12\x20" + bytes(32))}),  # a raw-codec CID
        usual[:-3],
    ]


@pytest.mark.parametrize("index", range(9))
def test_the_single_decode_of_a_commit_agrees_with_decode_commit(index: int) -> None:
    """verify's one-decode path gives decode_commit(strict=True) and unsigned_bytes() exactly, or
    steps aside (None) for decode_commit to decode or refuse."""
    from repo_stream.core.commit import decode_commit
    from repo_stream.errors import CommitError
    from repo_stream.sync.verify import _fast_commit

    block = _commit_variants()[index]
    cid = dag_cbor_cid(block)
    fast = _fast_commit(block, cid)
    try:
        commit, data = decode_commit(block, cid, strict=True)
    except CommitError:
        assert fast is None
        return
    if index in (0, 1):
        assert fast is not None  # the usual commit takes the single decode
    if fast is not None:
        got, got_data, unsigned = fast
        assert (got.did, got.version, got.rev, got.sig, got.block, got.data, got.prev) == (
            commit.did, commit.version, commit.rev, commit.sig, commit.block, commit.data, commit.prev,
        )  # fmt: skip
        assert got_data == data and unsigned == commit.unsigned_bytes()
    else:
        # extra fields (kept in the signed bytes) and an unusual data CID: decode_commit's path
        assert index in (3, 7)


def test_verified_commit_made_fast_is_the_dataclass_one() -> None:
    """verify_commit makes its result with the slots set directly (no frozen __init__): the same
    fields in the same order, equal to the dataclass made the usual way."""
    import dataclasses

    from repo_stream.sync.verify import VerifiedCommit, _verified_commit

    assert VerifiedCommit.__slots__ == tuple(field.name for field in dataclasses.fields(VerifiedCommit))
    a, b = dag_cbor_cid(b"\xa0"), dag_cbor_cid(b"\x80")
    values = ("did:plc:x", "3kaaaaaaaaaaa", None, Link(a), Link(b), None, False, (), 7, "2024-01-01T00:00:00Z")
    made = _verified_commit(*values)
    assert type(made) is VerifiedCommit and made == VerifiedCommit(*values)
    assert [getattr(made, field.name) for field in dataclasses.fields(VerifiedCommit)] == list(values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.rev = "other"  # type: ignore[misc]
