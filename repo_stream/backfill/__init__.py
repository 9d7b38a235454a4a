"""Backfilling many repos: the bounded executor (:mod:`.executor`) with its results
(:mod:`.results`), sinks (:mod:`.sinks`), repo lists (:mod:`.sources`) and checkpoint
(:mod:`.checkpoint`); the same executor in local worker processes (:mod:`.process_pool`, each
running :mod:`.worker`) and on a Dask cluster (:mod:`.cluster`, the ``cluster`` extra).

May import: :mod:`repo_stream.errors`, :mod:`repo_stream.core`, :mod:`repo_stream.spill`,
:mod:`repo_stream.read`, :mod:`repo_stream.net`, :mod:`repo_stream.records`.
"""

from .checkpoint import Checkpoint
from .executor import backfill
from .results import BackfillResult, BackfillStats
from .sinks import EventSink, JsonlSink, RecordOp, RepoSink, open_sink
from .sources import collection_sources, host_sources, list_repos, list_repos_by_collection, read_repo_list
from .stores import DuckdbSink, ParquetSink, PostgresCheckpoint, PostgresSink

__all__ = [
    "BackfillResult",
    "BackfillStats",
    "Checkpoint",
    "DuckdbSink",
    "EventSink",
    "JsonlSink",
    "ParquetSink",
    "PostgresCheckpoint",
    "PostgresSink",
    "RecordOp",
    "RepoSink",
    "open_sink",
    "backfill",
    "collection_sources",
    "host_sources",
    "list_repos",
    "list_repos_by_collection",
    "read_repo_list",
]
