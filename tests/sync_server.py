"""Local servers for the sync service tests and benchmark: a generated stream (several accounts,
many commits, ``#identity``, ``#account``, ``#sync``) replayed by
:class:`tests.firehose_server.FirehoseServer`, and one HTTP server that is both the PLC directory
(``/DID``: a DID document with the account's key and this server as its PDS) and the PDS
(``getRepo?did=DID``: the repo as it was at a point of the stream, then as it is at the end).

:func:`make_sync_stream` keeps, per account, the repo CAR at ``snapshot`` (a fraction of the
stream: what a first getRepo answers, so that the events before it are already in the repo and
those after it arrive while it is backfilled) and at the end (what any later getRepo answers).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from repo_stream.core.cid import cid_text
from repo_stream.sync.generate import CommitGenerator, make_signer
from tests.backfill_server import RepoHost, car_reply
from tests.firehose_server import encode_message, with_seq
from tests.servers import json_reply

_LETTERS = str.maketrans("0123456789", "abcdefghij")


@dataclass
class SyncAccount:
    did: str
    did_key: str
    generator: CommitGenerator
    snapshot: bytes = b""  # the repo CAR at the snapshot point
    snapshot_rev: str = ""
    final: bytes = b""  # the repo CAR at the end
    commits: list[int] = field(default_factory=list)  # indexes of its #commit messages

    def records(self) -> dict[str, str]:
        """The repo's records at the end: key -> CID (base32)."""
        return {key.decode(): cid_text(cid) for key, cid in self.generator.pairs.items()}


@dataclass
class SyncStream:
    messages: list[tuple[int | None, bytes]]
    accounts: dict[str, SyncAccount]


def make_sync_stream(
    accounts: int = 4,
    commits: int = 200,
    *,
    seed: int = 1,
    snapshot: float = 0.3,
    initial_records: int = 20,
    replace: str | None = None,
) -> SyncStream:
    """``accounts`` accounts with ``initial_records`` records each making ``commits`` commits in
    all (1 to 4 ops), with one ``#identity`` and ``#account`` (active) per account at a third of
    the stream and a ``#sync`` of the current commit per account at two thirds; with ``replace``
    (a DID), that account's repo is changed without a ``#commit`` (as a repo import) just before
    its ``#sync``, so the ``#sync`` names another data root."""
    rng = random.Random(seed)
    people: dict[str, SyncAccount] = {}
    for i in range(accounts):
        sign, did_key = make_signer("k256", seed * 1000 + i)
        did = "did:plc:" + f"sync{seed:04d}{i:06d}".translate(_LETTERS).ljust(24, "a")
        generator = CommitGenerator(did, sign, seed=seed * 1000 + i, engine="edit")
        if initial_records:
            generator.commit(generator.random_ops(initial_records, creates=1.0))  # before the stream
        people[did] = SyncAccount(did, did_key, generator)
    dids = list(people)
    out: list[tuple[int | None, bytes]] = []
    seq = 0

    def add(message: bytes) -> None:
        nonlocal seq
        seq += 1
        out.append((seq, with_seq(message, seq)))

    def take_snapshots() -> None:
        for account in people.values():
            account.snapshot = account.generator.repo_car()
            account.snapshot_rev = account.generator.rev

    if snapshot <= 0:
        take_snapshots()
    for n in range(commits):
        if snapshot > 0 and n == int(commits * snapshot):
            take_snapshots()
        account = people[dids[rng.randrange(len(dids))]]
        generator = account.generator
        account.commits.append(len(out))
        add(generator.commit(generator.random_ops(rng.randint(1, 4))))
        if n == commits // 3:
            out.append((None, encode_message("#info", {"name": "OutdatedCursor"})))
            for did in dids:
                add(encode_message("#identity", {"seq": 0, "did": did, "time": "2024-01-01T00:00:00.000Z", "handle": f"{did[8:20]}.test"}))
        if n == 2 * commits // 3:
            for did in dids:
                add(encode_message("#account", {"seq": 0, "did": did, "time": "2024-01-01T00:00:00.000Z", "active": True}))
                if did == replace:
                    _replace(people[did].generator)
                add(people[did].generator.sync_message())
    for account in people.values():
        account.final = account.generator.repo_car()
    return SyncStream(out, people)


def _replace(generator: CommitGenerator) -> None:
    """Change the repo without a ``#commit``: apply ops and drop the message (a repo import)."""
    generator.commit(generator.random_ops(6))
    generator.seq -= 1


def did_document(did: str, key: str, pds: str) -> dict[str, Any]:
    multibase = key.removeprefix("did:key:")
    return {
        "id": did,
        "alsoKnownAs": [f"at://{did[8:20]}.test"],
        "verificationMethod": [{"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": multibase}],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }


def serve(host: RepoHost, stream: SyncStream, *, fresh: bool = False) -> None:
    """Route the PLC documents and getRepo on ``host``: the snapshot first, then the final repo
    (``fresh``: the final repo from the first request)."""
    for did, account in stream.accounts.items():
        host.route("*", f"/{did}", json_reply(did_document(did, account.did_key, host.base)))
        replies = [car_reply(account.final)] if fresh else [car_reply(account.snapshot), car_reply(account.final)]
        host.repo(did, replies)
