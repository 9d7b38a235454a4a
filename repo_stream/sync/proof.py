"""Record proofs: the CAR ``com.atproto.sync.getRecord`` serves, made and checked.

Spec: atproto sync / lexicon ``com.atproto.sync.getRecord``: a CAR whose root is the signed
commit, holding the MST nodes on the path from the root to the record's key and the record
block. The same path proves absence: the nodes down to the key's layer show that no entry for
it exists (the neighbours' paths).

:func:`prove` makes such a CAR from a whole repo (the CAR bytes, or its blocks in memory);
:func:`verify_record_proof` checks one: the commit's signature and DID, every node on the
path (strict DAG-CBOR, the walker's rules, every block hashed against its CID), and returns the
record's CID and value, or ``None`` for a proven absence.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from ..core.cid import cid_str
from ..core.commit import decode_commit
from ..errors import CarError, CidMismatchError, CommitError, MstError, RecordProofError, SignatureError, UnknownSubtreeError
from ..records.values import Link, record_json
from ..records.writer import car_bytes
from .partial import PartialTree, read_car_slice

if TYPE_CHECKING:
    from ..crypto.didkey import PublicKey
    from ..crypto.signature import VerifyingKey

__all__ = ["ProvenRecord", "prove", "verify_record_proof"]


class ProvenRecord(NamedTuple):
    """A record proven by :func:`verify_record_proof`: its raw ``cid`` as a Link (``str()`` is
    base32), its value (``record_json`` by default), its block, and the commit's rev."""

    cid: Link
    value: Any
    block: bytes
    rev: str


def prove(repo: bytes | Mapping[bytes, bytes], key: str, *, commit: bytes | None = None) -> bytes:
    """The proof CAR of ``key`` in a whole repo: the commit, the nodes on the path to ``key``,
    and the record block when the key is present (its absence is proven by the same path).

    Args:
        repo: the repo's CAR bytes (getRepo's answer), or its blocks by raw CID (then give
            ``commit``).
        key: the record's repo key ``collection/rkey``.
        commit: the raw CID of the commit, when ``repo`` is a mapping.

    Returns:
        The CAR bytes (root: the commit).

    Raises:
        CarError, CidMismatchError: ``repo`` is not a well-formed CAR.
        CommitError: the commit is missing or malformed. MstError: the tree breaks a rule.
        UnknownSubtreeError: a node on the path is not in ``repo``.
    """
    if isinstance(repo, (bytes, bytearray, memoryview)):
        roots, blocks = read_car_slice(bytes(repo))
        commit_cid = roots[0]
    else:
        if commit is None:
            raise ValueError("prove: give the commit's CID with a mapping of blocks")
        blocks, commit_cid = dict(repo), commit
    commit_block = blocks.get(commit_cid)
    if commit_block is None:
        raise CommitError(f"commit {cid_str(commit_cid)} is not in the repo")
    _, data = decode_commit(commit_block, commit_cid)
    tree = PartialTree(data, blocks, check_keys=False)
    held = tree.get(key)
    sections = [(commit_cid, commit_block)]
    sections += [(cid, blocks[cid]) for cid in tree.path_cids(key.encode())]
    if held is not None and held in blocks:
        sections.append((held, blocks[held]))
    return car_bytes([commit_cid], sections)


def verify_record_proof(
    car: bytes,
    did: str,
    key: str,
    signing_key: str | PublicKey | VerifyingKey,
    *,
    process: Callable[[bytes], Any] = record_json,
) -> ProvenRecord | None:
    """Check a record proof CAR (getRecord's answer) for ``key`` in ``did``'s repo.

    Args:
        car: the proof CAR bytes.
        did: the account the record must belong to.
        key: the repo key ``collection/rkey``.
        signing_key: the account's key (did:key string, public key or VerifyingKey).
        process: turns the record block into ``.value`` (default ``record_json``).

    Returns:
        The :class:`ProvenRecord`, or ``None`` when the proof shows the key is absent.

    Raises:
        RecordProofError: the CAR is malformed or a block does not hash to its CID; the commit
            is missing, malformed, for another DID or not signed by ``signing_key``; a node on
            the path is missing or breaks an MST rule; the record block is missing or invalid.
            The message names the DID, key and CID.

    Spec: lexicon com.atproto.sync.getRecord; atproto repository, "Merkle Search Tree".
    """
    from ..crypto.signature import verifying_key

    where = f"record proof of {key!r} in {did}"
    try:
        roots, blocks = read_car_slice(car)
    except (CarError, CidMismatchError) as exc:
        raise RecordProofError(f"{where}: {exc}") from exc
    commit_cid = roots[0]
    commit_block = blocks.get(commit_cid)
    if commit_block is None:
        raise RecordProofError(f"{where}: the commit {cid_str(commit_cid)} is not in the CAR")
    try:
        commit, data = decode_commit(commit_block, commit_cid, strict=True)
    except CommitError as exc:
        raise RecordProofError(f"{where}: {exc}") from exc
    if commit.did != did:
        raise RecordProofError(f"{where}: the commit {cid_str(commit_cid)} is for {commit.did[:200]!r}")
    try:
        verifying_key(signing_key).verify(commit.unsigned_bytes(), commit.sig, where=f"{where}: commit {cid_str(commit_cid)}")
    except SignatureError as exc:
        raise RecordProofError(str(exc)) from exc
    try:
        held = PartialTree(data, blocks).get(key)
    except UnknownSubtreeError as exc:
        raise RecordProofError(f"{where}: the path has a gap: {exc}") from exc
    except MstError as exc:
        raise RecordProofError(f"{where}: {exc}") from exc
    if held is None:
        return None
    block = blocks.get(held)
    if block is None:
        raise RecordProofError(f"{where}: the record block {cid_str(held)} is not in the CAR")
    try:
        value = process(block)
    except Exception as exc:
        raise RecordProofError(f"{where}: record {cid_str(held)}: {exc}") from exc
    return ProvenRecord(Link(held), value, block, commit.rev)
