"""The backfill on a local Dask cluster of worker processes (``repo_stream.backfill.cluster``), against a
real local PDS: results, the driver's checkpoint, and a rerun that starts no cluster at all."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from repo_stream.backfill.cluster import backfill_on_dask

from .backfill_server import RepoHost, car_reply, repo_car_of
from .servers import Reply
from .test_backfill import FAST, did_of

pytest.importorskip("distributed", reason="the cluster extra (dask distributed) is not installed")


@pytest.fixture
def host() -> Iterator[RepoHost]:
    with RepoHost() as server:
        yield server


@pytest.mark.once  # a cluster takes seconds to start
def test_backfill_on_a_local_dask_cluster(host: RepoHost, tmp_path: Path, impl: str) -> None:
    sizes = {did_of(600 + i): i * 7 for i in range(10)}
    urls = [host.repo(did, car_reply(repo_car_of(did, n))) for did, n in sizes.items()]
    bad = did_of(699)
    urls.append(host.repo(bad, Reply(status=404)))
    checkpoint = tmp_path / "run.db"

    results = list(backfill_on_dask(urls, n_workers=2, shard_size=3, checkpoint=checkpoint, mem_limit_mb=0.005, fetch_options=FAST))
    assert sorted(r.source for r in results) == sorted(urls)
    got = {r.did: r for r in results}
    assert {did: (got[did].records, got[did].error) for did in sizes} == {did: (n, None) for did, n in sizes.items()}
    assert got[bad].error is not None and "HTTP 404" in got[bad].error
    assert any(r.spilled for r in results)  # the bigger repos went past 0.005 MiB to the disk workers
    assert len({r.query for r in host.fetches()}) == len(urls) and len(host.fetches()) == len(urls)

    started = time.monotonic()
    again = list(backfill_on_dask(urls, n_workers=2, shard_size=3, checkpoint=checkpoint, fetch_options=FAST))
    assert time.monotonic() - started < 1.0  # everything recorded: no cluster was started
    assert len(host.fetches()) == len(urls)
    assert sorted(r.source for r in again) == sorted(urls) and all(r.skipped for r in again)
