"""Generated ``#commit`` events, made the way a PDS makes them, for tests, benchmarks and examples.

:class:`CommitGenerator` holds one account's repo (keys, record blocks, the canonical MST) and a
signing key. :meth:`CommitGenerator.commit` applies a batch of ops, builds the new tree, signs the
new commit and returns the subscribeRepos message bytes: header ``{op: 1, t: "#commit"}`` and a
body with ``repo``, ``rev``, ``since``, ``commit``, ``prevData``, ``ops`` (with ``prev`` for updates
and deletes) and ``blocks``: a CAR of the commit, the new MST nodes, the new record blocks and, for
every op's key, the nodes of the new tree that prove it (its search path, down to the bottom for
a delete; for a create also the inner spines of its two neighbouring subtrees, which deleting it
merges),
as a PDS adds them so that consumers can invert the commit (spec: atproto sync, "Commit
Validation"; the reference PDS's "covering proof").

The new tree is built by the project's writer (:func:`repo_stream.records.writer.build_mst`,
``engine="writer"``, independent of :mod:`repo_stream.sync.edit`) or, faster for long streams, by
editing the previous tree in place (``engine="edit"``). :meth:`random_ops` draws op batches that
touch the tree's edges, split and merge nodes (keys of high layers) and update and delete
existing records.

Determinism: everything comes from the ``seed`` (keys, records, revs, timestamps), except ECDSA
signatures, whose nonces are random.
"""

from __future__ import annotations

import random
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal

import cbrrr
from cryptography.hazmat.primitives.asymmetric import ec

from ..core.cid import dag_cbor_cid
from ..core.commit import encode_commit, encode_unsigned_commit
from ..core.dagcbor import StrictDecoder
from ..core.mst import key_layer
from ..core.walk import decode_node
from ..crypto.didkey import format_did_key
from ..crypto.signature import sign as _sign
from ..records.generate import generate_records
from ..records.writer import build_mst, build_repo_car, car_bytes
from . import edit
from .invert import Op, invert
from .partial import PartialTree

__all__ = ["CommitGenerator", "OpSpec", "make_signer", "tid"]

#: An op to apply: ``(action, path, record block or None for a delete)``.
OpSpec = tuple[str, str, bytes | None]

_S32: Final = "234567abcdefghijklmnopqrstuvwxyz"
_START_US: Final = 1_704_067_200_000_000  # 2024-01-01T00:00:00Z
_COLLECTIONS: Final = (
    "app.bsky.feed.like",
    "app.bsky.feed.post",
    "app.bsky.graph.follow",
    "app.bsky.feed.repost",
    "app.bsky.graph.block",
)


def tid(us: int, clock: int = 0) -> str:
    """The TID of ``us`` microseconds since the Unix epoch and a 10-bit clock id (13 characters)."""
    value = (us << 10) | (clock & 1023)
    return "".join(_S32[(value >> shift) & 31] for shift in range(60, -1, -5))


def make_signer(curve: Literal["k256", "p256"], seed: int) -> tuple[Callable[[bytes], bytes], str]:
    """A deterministic signing key for ``curve``: ``(sign(data) -> 64-byte signature, did:key)``.

    secp256k1 keys sign through libsecp256k1 (``coincurve``, low-S by construction), P-256 keys
    through :func:`repo_stream.crypto.signature.sign`.
    """
    curve_class = ec.SECP256K1() if curve == "k256" else ec.SECP256R1()
    secret = 1 + (random.Random(f"{curve}-{seed}").getrandbits(200))
    private = ec.derive_private_key(secret, curve_class)
    did_key = format_did_key(private.public_key())
    if curve == "k256":
        import coincurve

        fast = coincurve.PrivateKey(secret.to_bytes(32, "big"))

        def sign_k256(data: bytes) -> bytes:
            return bytes(fast.sign_recoverable(data)[:64])

        return sign_k256, did_key

    def sign_p256(data: bytes) -> bytes:
        return _sign(private, data)

    return sign_p256, did_key


class CommitGenerator:
    """One account's repo, changed by op batches into signed ``#commit`` messages.

    Args:
        did: the account DID.
        sign: signs the unsigned commit bytes (see :func:`make_signer`).
        records: the repo's initial ``(key, record block)`` pairs.
        seed: seeds keys, records and the simulated clock.
        engine: ``"writer"`` (each tree built by :func:`~repo_stream.records.writer.build_mst`)
            or ``"edit"`` (the previous tree edited with :mod:`repo_stream.sync.edit`).
        pool: record blocks to draw new records from (default: 500 generated ones, ``small``
            profile).
        start_us: the simulated clock's start, microseconds since the Unix epoch.
        proof: which MST nodes go into ``blocks``: ``"covering"`` (as a PDS: the new nodes and
            each op key's covering proof in the new tree, see :func:`covering_proof`) or
            ``"minimal"`` (exactly the nodes a consumer reads to check the ops and invert them,
            found by doing it: every one of them is needed).
    """

    def __init__(
        self,
        did: str,
        sign: Callable[[bytes], bytes],
        records: Iterable[tuple[str, bytes]] = (),
        *,
        seed: int = 0,
        engine: Literal["writer", "edit"] = "writer",
        pool: Sequence[bytes] | None = None,
        start_us: int = _START_US,
        proof: Literal["covering", "minimal"] = "covering",
    ) -> None:
        self.did = did
        self.proof = proof
        self._sign = sign
        self.rng = random.Random(seed)
        self.engine = engine
        self.pool = list(pool) if pool is not None else [b for _, b in generate_records(500, seed=seed, profile="small")]
        self.clock = self.rng.getrandbits(10)
        self.now_us = start_us
        #: key (UTF-8 bytes) -> record CID
        self.pairs: dict[bytes, bytes] = {}
        #: record CID -> record block
        self.records: dict[bytes, bytes] = {}
        for key, block in records:
            cid = dag_cbor_cid(block)
            self.pairs[key.encode()] = cid
            self.records[cid] = block
        self.root, self.nodes = build_mst(sorted(self.pairs.items()))
        self.rev = self._next_rev()
        self.seq = 0
        self.commit_cid, self.commit_block = self._signed_commit(self.root, self.rev)

    # ------------------------------------------------------------------------------ commits

    def _next_rev(self) -> str:
        self.now_us += self.rng.randint(1, 5_000_000)
        return tid(self.now_us, self.clock)

    def _signed_commit(self, root: bytes, rev: str) -> tuple[bytes, bytes]:
        sig = self._sign(encode_unsigned_commit(self.did, root, rev))
        block = encode_commit(self.did, root, rev, None, sig)
        return dag_cbor_cid(block), block

    def repo_car(self) -> bytes:
        """The whole repo as a CAR (the last commit, the tree and every record), as getRepo gives it."""
        import io

        out = io.BytesIO()
        by_key = {key.decode(): self.records[cid] for key, cid in self.pairs.items()}
        build_repo_car(sorted(by_key.items()), did=self.did, rev=self.rev, path=out, sign=self._sign)
        return out.getvalue()

    def commit(self, ops: Sequence[OpSpec], *, since: str | Literal["auto"] | None = "auto") -> bytes:
        """Apply ``ops`` and return the ``#commit`` message bytes (header + body).

        Args:
            ops: ``(action, path, block)``: ``"create"`` (the path must be absent), ``"update"``
                (present) with the new record block; ``"delete"`` (present) with ``None``.
            since: the event's ``since`` (default: the previous commit's rev).

        Raises:
            ValueError: an op does not fit the repo (create of a present key, ...), or two ops
                name one path.
        """
        old_root, old_pairs = self.root, self.pairs
        pairs = dict(old_pairs)
        body_ops: list[dict[str, Any]] = []
        new_records: dict[bytes, bytes] = {}
        seen: set[str] = set()
        for action, path, block in ops:
            if path in seen:
                raise ValueError(f"two ops name {path!r}")
            seen.add(path)
            key = path.encode()
            prev = pairs.get(key)
            if (action == "create" and prev is not None) or (action != "create" and prev is None):
                raise ValueError(f"{action} of {path!r} does not fit the repo")
            op: dict[str, Any] = {"action": action, "path": path, "cid": None}
            if prev is not None:
                op["prev"] = cbrrr.CID(prev)
            if action == "delete":
                del pairs[key]
            else:
                assert block is not None
                cid = dag_cbor_cid(block)
                pairs[key] = cid
                new_records[cid] = block
                op["cid"] = cbrrr.CID(cid)
            body_ops.append(op)
        if self.engine == "writer":
            root, nodes = build_mst(sorted(pairs.items()))
            added = {cid: block for cid, block in nodes.items() if cid not in self.nodes}
        else:
            tree = PartialTree(old_root, self.nodes, check_keys=False)
            for action, path, _ in ops:
                key = path.encode()
                if action == "create":
                    edit.insert(tree, key, pairs[key])
                elif action == "update":
                    edit.update(tree, key, pairs[key])
                else:
                    edit.delete(tree, key)
            root = tree.root()
            added = dict(tree.added)
            nodes = self.nodes
            nodes.update(added)
        proof: dict[bytes, bytes] = {}
        if self.proof == "covering":
            for action, path, _ in ops:
                for cid in covering_proof(nodes, root, path.encode(), spines=action == "create"):
                    proof[cid] = nodes[cid]
            proof.update(added)
        else:
            proof = _inversion_reads(nodes, root, ops, pairs, old_pairs)
        rev = self._next_rev()
        commit_cid, commit_block = self._signed_commit(root, rev)
        sections = [(commit_cid, commit_block)]
        sections += list(proof.items())
        sections += list(new_records.items())
        prev_rev = self.rev
        self.seq += 1
        body = {
            "seq": self.seq,
            "rebase": False,
            "tooBig": False,
            "repo": self.did,
            "commit": cbrrr.CID(commit_cid),
            "rev": rev,
            "since": prev_rev if since == "auto" else since,
            "blocks": car_bytes([commit_cid], sections),
            "ops": body_ops,
            "blobs": [],
            "prevData": cbrrr.CID(old_root),
            "time": "2024-01-01T00:00:00.000Z",
        }
        self.pairs = pairs
        self.records.update(new_records)
        self.root = root
        if self.engine == "writer":
            self.nodes = nodes
        self.rev = rev
        self.commit_cid, self.commit_block = commit_cid, commit_block
        return encode_message("#commit", body)

    def sync_message(self) -> bytes:
        """A ``#sync`` message for the current commit (a CAR of the commit block alone)."""
        self.seq += 1
        body = {
            "seq": self.seq,
            "did": self.did,
            "rev": self.rev,
            "blocks": car_bytes([self.commit_cid], [(self.commit_cid, self.commit_block)]),
            "time": "2024-01-01T00:00:00.000Z",
        }
        return encode_message("#sync", body)

    # ------------------------------------------------------------------------------ random ops

    def new_record(self) -> bytes:
        """A record block from the pool (a fresh ``createdAt`` is not needed: CIDs may repeat)."""
        return self.pool[self.rng.randrange(len(self.pool))]

    def _fresh_key(self, taken: set[bytes]) -> str:
        rng = self.rng
        kind = rng.random()
        collection = rng.choice(_COLLECTIONS)
        for _ in range(1000):
            if kind < 0.5:  # a new TID: the right edge of its collection
                self.now_us += rng.randint(1, 1000)
                path = f"{collection}/{tid(self.now_us, self.clock)}"
            elif kind < 0.6:  # before every key
                path = f"app.aaaa.edge/{tid(rng.randrange(1 << 40), rng.getrandbits(10))}"
            elif kind < 0.7:  # after every key
                path = f"zzz.zzzz.edge/{tid(rng.randrange(1 << 40), rng.getrandbits(10))}"
            elif kind < 0.85:  # a key of a high layer: splits nodes on insert, merges on delete
                path = f"{collection}/{tid(rng.randrange(1 << 50), rng.getrandbits(10))}"
                if key_layer(path.encode()) < 2:
                    continue
            else:  # anywhere
                path = f"{collection}/{tid(rng.randrange(1 << 52), rng.getrandbits(10))}"
            if path.encode() not in taken:
                return path
        raise RuntimeError("no fresh key found")  # pragma: no cover - 1000 draws

    def random_ops(self, n: int, *, creates: float = 0.5, updates: float = 0.25) -> list[OpSpec]:
        """``n`` ops on distinct paths: creates (``creates`` of them, fresh keys at the edges, of
        high layers or anywhere), updates (``updates``) and deletes (the rest; the first and last
        keys and high-layer keys more often) of present keys. Fewer updates and deletes are drawn
        when the repo is small."""
        rng = self.rng
        present = sorted(self.pairs)
        taken = set(self.pairs)
        used: set[bytes] = set()
        ops: list[OpSpec] = []
        for _ in range(n):
            r = rng.random()
            if r >= creates and len(used) < len(present):
                for _ in range(20):
                    pick = rng.random()
                    if pick < 0.1:
                        key = present[0]
                    elif pick < 0.2:
                        key = present[-1]
                    else:
                        key = present[rng.randrange(len(present))]
                    if key not in used:
                        break
                else:
                    continue
                used.add(key)
                if r < creates + updates:
                    ops.append(("update", key.decode(), self.new_record()))
                else:
                    ops.append(("delete", key.decode(), None))
            else:
                path = self._fresh_key(taken)
                taken.add(path.encode())
                ops.append(("create", path, self.new_record()))
        return ops


class _Reads(Mapping[bytes, bytes]):
    """A block mapping that remembers which blocks were asked for."""

    def __init__(self, blocks: dict[bytes, bytes]) -> None:
        self.blocks = blocks
        self.read: dict[bytes, bytes] = {}

    def __getitem__(self, cid: bytes) -> bytes:
        block = self.blocks[cid]
        self.read[cid] = block
        return block

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)


def _inversion_reads(
    nodes: dict[bytes, bytes], root: bytes, ops: Sequence[OpSpec], pairs: dict[bytes, bytes], old_pairs: dict[bytes, bytes]
) -> dict[bytes, bytes]:
    """The nodes of the tree ``root`` a consumer reads to look up every op's key and invert the ops."""
    reads = _Reads(nodes)
    tree = PartialTree(root, reads, check_keys=False)
    for _, path, _ in ops:
        tree.get(path)
    invert(tree, [Op(action, path, pairs.get(path.encode()), old_pairs.get(path.encode())) for action, path, _ in ops])
    return reads.read


def encode_message(kind: str, body: dict[str, Any]) -> bytes:
    """A subscribeRepos message: the header ``{op: 1, t: kind}`` then ``body``, in DAG-CBOR."""
    return bytes(cbrrr.encode_dag_cbor({"op": 1, "t": kind})) + bytes(cbrrr.encode_dag_cbor(body))


def covering_proof(nodes: dict[bytes, bytes], root: bytes, key: bytes, *, spines: bool = True) -> list[bytes]:
    """The node CIDs of the tree ``root`` (all of whose nodes are in ``nodes``) that prove ``key``:
    its search path down to the bottom, or to the node holding ``key``; there, with ``spines``
    (what deleting ``key``, the inverse of its create, merges), the whole right spine of its left
    neighbour subtree and the whole left spine of its right one. (Merging needs them only as
    far as both go, but once other ops of the commit are undone first, the merge can reach
    further: the whole spines cover that.)

    An independent reading of the tree (it decodes the node blocks itself), for building events.
    """
    decoder = StrictDecoder(max_depth=8)
    out: list[bytes] = []
    cid: bytes | None = root
    while cid is not None:
        out.append(cid)
        keys, kids = _decoded(nodes, cid, decoder)
        i = bisect_left(keys, key)
        if i < len(keys) and keys[i] == key:
            if spines:
                for side, pick in ((kids[i], -1), (kids[i + 1], 0)):
                    while side is not None:
                        out.append(side)
                        side = _decoded(nodes, side, decoder)[1][pick]
            break
        cid = kids[i]
    return out


def _decoded(nodes: dict[bytes, bytes], cid: bytes, decoder: StrictDecoder) -> tuple[list[bytes], list[bytes | None]]:
    left, entries = decode_node(cid, nodes[cid], decoder, False)
    keys: list[bytes] = []
    kids: list[bytes | None] = [left]
    prev = b""
    for p, k, _, t in entries:
        prev = prev[:p] + k
        keys.append(prev)
        kids.append(t)
    return keys, kids
