"""Backfill past one process: the bounded executor as tasks of a Dask cluster.

:func:`backfill_on_dask` cuts the repo list into shards of ``shard_size`` sources and runs each
shard as one Dask task, :func:`run_shard`, which runs :func:`repo_stream.backfill.backfill` (the
same bounded executor: memory workers, disk queue, disk workers) in the worker process. Shards
are submitted as a sliding window (``max_in_flight`` at once; as each finishes, the next goes) and
their results come back to the driver, which alone writes the checkpoint: a source recorded there
is never sent to a worker again, so a rerun after a crash, on any cluster, runs only what was not
recorded. The results of a shard are recorded (and yielded) when the shard finishes, so a crash
loses at most the shards in flight.

Why Dask (``distributed``) rather than Ray: see the README's "Backfill" section (pure-Python
install of a few MB, a local process cluster that starts in about a second and fits this
2-core machine's memory, futures with ``as_completed`` for the sliding window).

Example (a real cluster: ``dask scheduler`` on one host, ``dask worker tcp://HOST:8786
--nthreads 1`` on each machine)::

    from repo_stream.backfill.cluster import backfill_on_dask

    for result in backfill_on_dask(dids, scheduler="tcp://HOST:8786", checkpoint="run.db",
                                   memory_workers=2, mem_limit_mb=64):
        print(result.source, result.error)

Requires the ``cluster`` extra (``pip install 'repo-stream[cluster]'``).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator
from typing import Any

import anyio

from .checkpoint import Checkpoint, is_done
from .executor import backfill
from .results import BackfillResult

__all__ = ["backfill_on_dask", "run_shard"]


def run_shard(sources: list[str], options: dict[str, Any]) -> list[BackfillResult]:
    """Run :func:`repo_stream.backfill.backfill` over ``sources`` in this process (a Dask task);
    return the results in completion order. ``options`` are its keyword arguments (no checkpoint:
    the driver records results)."""

    async def collect() -> list[BackfillResult]:
        return [result async for result in backfill(sources, **options)]

    return anyio.run(collect)


def _shards(sources: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(sources)
    while shard := list(itertools.islice(it, size)):
        yield shard


def _failed_shard(sources: list[str], exc: BaseException) -> list[BackfillResult]:
    message = " ".join(str(exc).split()) or "no detail"
    return [BackfillResult(s, None, None, 0, 0, False, 0.0, f"ShardError: the Dask task failed: {type(exc).__name__}: {message}") for s in sources]


def backfill_on_dask(
    sources: Iterable[str],
    *,
    scheduler: Any = "local",
    n_workers: int = 2,
    shard_size: int = 32,
    max_in_flight: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    retry_failed: bool = False,
    **options: Any,
) -> Iterator[BackfillResult]:
    """Backfill ``sources`` on a Dask cluster; yield one :class:`~repo_stream.backfill.BackfillResult`
    per source, shard by shard in completion order.

    Args:
        sources: repo sources (str), as for :func:`repo_stream.backfill.backfill`.
        scheduler: ``"local"`` (or None): start a ``LocalCluster`` of ``n_workers`` processes with one
            thread each, closed at the end; a scheduler address (``"tcp://host:8786"``); or a
            ``distributed.Client``.
        n_workers: worker processes of the local cluster.
        shard_size: sources per task.
        max_in_flight: shards submitted at once (default: twice the cluster's worker threads, so
            each worker has its next shard ready).
        checkpoint: an SQLite checkpoint path, read and written by this (driver) process only.
        retry_failed: run sources recorded as failed again.
        **options: keyword arguments of :func:`repo_stream.backfill.backfill` for each shard
            (``memory_workers``, ``mem_limit_mb``, ``sink``, ``verify``, ``plc_url``...); they must
            be picklable.

    Raises:
        ImportError: ``distributed`` is not installed (the ``cluster`` extra).
        RepoStreamError: the checkpoint cannot be opened or written.

    A shard whose task fails as a whole (its worker died more often than Dask's
    ``allowed-failures``) gives an error result for each of its sources.
    """
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError as exc:  # pragma: no cover - the cluster extra is installed in CI
        raise ImportError("backfill on Dask needs the 'distributed' package: pip install 'repo-stream[cluster]'") from exc
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    for key in ("checkpoint", "client", "stats", "dns_resolver"):
        options.pop(key, None)
    cluster = _Cluster(scheduler, n_workers, Client, LocalCluster)
    store = Checkpoint(checkpoint) if checkpoint is not None else None
    try:
        yield from _run_shards(_shards(sources, shard_size), cluster, options, max_in_flight, store, retry_failed, as_completed)
    finally:
        if store is not None:
            store.close_sync()
        cluster.close()


class _Cluster:
    """The run's Dask client, made on first need (a rerun with everything recorded starts none);
    :meth:`close` closes the client and local cluster this made (not a client given)."""

    def __init__(self, scheduler: Any, n_workers: int, client_class: Any, local_cluster_class: Any) -> None:
        self.scheduler = scheduler
        self.n_workers = n_workers
        self._client_class = client_class
        self._local_cluster_class = local_cluster_class
        self._cluster: Any = None
        self._client: Any = None
        self._own_client = False

    def client(self) -> Any:
        if self._client is None:
            if isinstance(self.scheduler, self._client_class):
                self._client = self.scheduler
            elif self.scheduler in (None, "local"):
                self._cluster = self._local_cluster_class(
                    n_workers=self.n_workers, threads_per_worker=1, processes=True, dashboard_address=None
                )
                self._client, self._own_client = self._client_class(self._cluster), True
            else:
                self._client, self._own_client = self._client_class(self.scheduler), True
        return self._client

    def close(self) -> None:
        if self._own_client and self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()


def _skip_recorded(store: Checkpoint | None, shard: list[str], retry_failed: bool) -> tuple[list[BackfillResult], list[str]]:
    """The results the checkpoint already has for ``shard`` (``skipped``), and the sources to run."""
    if store is None:
        return [], shard
    recorded = store.lookup_sync(shard)
    done: list[BackfillResult] = []
    todo: list[str] = []
    for source in shard:
        result = recorded.get(source)
        if is_done(result, retry_failed):
            assert result is not None
            done.append(result)
        else:
            todo.append(source)
    return done, todo


def _run_shards(
    shards: Iterator[list[str]],
    cluster: _Cluster,
    options: dict[str, Any],
    window: int | None,
    store: Checkpoint | None,
    retry_failed: bool,
    as_completed: Any,
) -> Iterator[BackfillResult]:
    """Keep ``window`` shards submitted (default: twice the cluster's worker threads), yielding
    recorded results as their shards are read and each finished shard's results (recorded first)."""
    running: Any = None
    pending: dict[Any, list[str]] = {}
    exhausted = False
    while True:
        while not exhausted and (window is None or len(pending) < window):
            shard = next(shards, None)
            if shard is None:
                exhausted = True
                break
            done, shard = _skip_recorded(store, shard, retry_failed)
            yield from done
            if shard:
                dask = cluster.client()
                if window is None:
                    window = 2 * (sum(dask.nthreads().values()) or 1)
                future = dask.submit(run_shard, shard, options, pure=False)
                pending[future] = shard
                if running is None:
                    running = as_completed([future])
                else:
                    running.add(future)
        if not pending:
            return
        future = next(running)
        shard = pending.pop(future)
        try:
            results = future.result()
        except Exception as exc:
            results = _failed_shard(shard, exc)
        if store is not None:
            store.record_sync(results)
        yield from results
