"""Command line: ``repo-stream`` (or ``python -m repo_stream``) with ``stats``, ``ls``, ``dump``,
``get``, ``verify``, ``backfill`` and ``generate``.

Every command but ``backfill`` and ``generate`` reads one repo CAR from SOURCE, opened with
:func:`repo_stream.net.source.open_source`: a file path, ``-`` (standard input), an ``http(s)://``
URL (e.g. ``https://PDS/xrpc/com.atproto.sync.getRepo?did=DID``), a DID, a handle (``alice.com``
or ``@alice.com``) or an ``at://`` URI. DIDs and handles are resolved to the account's PDS
(``did:plc`` through the PLC directory of ``--plc-url``, default ``https://plc.directory``) and
the repo served must be the DID's own (its commit's ``did``).

- ``stats SOURCE``: walks the repo the way an indexer would, with the record block length as each
  record's value, and prints a summary: did, rev, commit CID, records, record bytes, blocks,
  records per collection, whether it spilled to disk, seconds and MB/s. ``--json`` prints one JSON
  object instead (see :func:`stats` for its keys).
- ``ls SOURCE``: one line per record in key order, ``KEY CID``; ``--json``: one
  ``{"key", "cid"}`` object per line.
- ``dump SOURCE``: one ``{"key", "cid", "value"}`` JSON object per line in key order, the value in
  the atproto data model's JSON form (:func:`repo_stream.records.record_json`).
- ``get SOURCE KEY``: the value of the record ``KEY`` (``collection/rkey``) as one JSON object; a
  key that is not in the repo is an error, a ``KEY`` that is not ``collection/rkey`` a usage error.
  For a DID, handle or ``at://`` SOURCE it fetches only the record's proof
  (``com.atproto.sync.getRecord``, a few KB) and verifies it (every block's CID, the MST path, the
  commit's DID and its signature with the DID document's ``#atproto`` key); a proof that does not
  verify is an error. Only a PDS that does not serve getRecord (HTTP 501, XRPC
  ``MethodNotImplemented``, or a 404 that is not about the record) makes it read the whole repo.
- ``verify SOURCE [--key DIDKEY]``: checks every block against its CID, every MST rule (canonical
  nodes and commit, key order, layers), and the commit's signature, with ``--key`` or the
  ``#atproto`` key of the DID document of a DID or handle SOURCE (a file, ``-`` or URL SOURCE
  needs ``--key``: without it that is a usage error, exit 2, as is a ``--key`` that is not an
  atproto did:key). Prints one summary line.
- ``backfill --repos FILE | --host URL [--collection-signal NSID]``: walks many repos at once,
  resumably (see :func:`repo_stream.backfill.backfill`), with per-PDS-host limits
  (``--per-host-concurrency``, ``--per-host-rps``); one tab-separated line per repo after a header line
  (:data:`BACKFILL_COLUMNS`, documented in ``backfill --help``) or, with ``--json``, one JSON
  object per repo. ``--verify cids`` checks every block's CID and every MST rule,
  ``--verify``/``--verify signature`` the commit signature too (with ``--key DIDKEY``, one key
  for every repo, else each account's DID document key).

``--collection NSID`` (repeatable) on stats, ls, dump and get walks only the MST subtrees whose
key range can hold those collections and emits only their records.

On a terminal, progress (bytes read of the total when known, then records emitted) is drawn on
stderr with tqdm; nothing extra when stderr is piped or with ``--json``.

Exit status: 0 success; 1 an error, printed as one line ``error: ...`` on stderr (any
:class:`~repo_stream.errors.RepoStreamError` or ``OSError``, a missing key for ``get``); 2 a usage
error (argparse: unknown options, a non-positive ``--mem-limit-mb``, an invalid NSID...); 130
interrupted (Ctrl-C, ``error: interrupted``); 143 terminated (SIGTERM, handled as Ctrl-C:
``error: terminated``); 141 (128 + SIGPIPE, as ``cat`` and other tools
killed by SIGPIPE) when standard output is closed early, e.g. by ``| head -1``: nothing is printed
and the walk stops at once.

Where the C core (``repo_stream._native``) is not built, every command but ``generate`` says so
once on stderr (``warning: the C core ... is not built``) and runs the pure-Python implementation:
same output, slower. ``REPO_STREAM_PURE_PYTHON=1`` asks for that implementation, silently.

``generate`` writes realistic generated repo CARs (see :mod:`repo_stream.records.generate`) into a cache
folder (default ``.cache/cars``) and prints their paths; files already there are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import anyio

from . import __version__
from .core import implementation
from .core.cid import cid_text
from .core.mst import is_valid_collection, is_valid_key
from .errors import RepoStreamError
from .read.drivers import DISK_COUNT_CHUNK, DiskDriver, DriverBuilder, MemoryDriver, NeedDisk
from .spill.store import DiskBuilder

if TYPE_CHECKING:
    from .core.commit import Commit
    from .net.fetch import FetchOptions
    from .net.source import OpenedSource

__all__ = ["main", "stats"]

_second = itemgetter(1)
#: SQLite page cache of a command's spill store, MiB: 16 keeps a 10 MiB-limit spill of a 500k-record
#: repo near 60 MB peak RSS (32 MiB: ~76 MB) at about the same speed.
_SPILL_CACHE_MB = 16

#: Exit status when standard output is closed early: 128 + SIGPIPE, as a tool killed by SIGPIPE.
EXIT_BROKEN_PIPE = 141


class _Progress:
    """tqdm bars on stderr: bytes while loading, records while walking. Inert when disabled."""

    def __init__(self, enabled: bool, total_bytes: int | None) -> None:
        self.enabled = enabled
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._tqdm = tqdm
            self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading", leave=False)

    def wrap(self, source: Any) -> Any:
        """Wrap a source for ``load_car`` so that each chunk read advances the byte bar.

        ``source`` has ``async read(n)`` (a file) or is an async iterable of ``bytes`` chunks (a
        :class:`repo_stream.net.fetch.CarStream`).
        """
        if not self.enabled:
            return source
        bar = self._bar
        if callable(getattr(source, "read", None)):

            class Counted:
                async def read(self, n: int = -1) -> bytes:
                    chunk: bytes = await source.read(n)
                    bar.update(len(chunk))
                    return chunk

            return Counted()

        class CountedChunks:
            def __init__(self) -> None:
                self._chunks: AsyncIterator[bytes] = aiter(source)

            def __aiter__(self) -> CountedChunks:
                return self

            async def __anext__(self) -> bytes:
                chunk = await anext(self._chunks)
                bar.update(len(chunk))
                return chunk

            async def aclose(self) -> None:
                close = getattr(self._chunks, "aclose", None)
                if close is not None:
                    await close()

        return CountedChunks()

    def walking(self) -> None:
        if self.enabled:
            self._bar.close()
            self._bar = self._tqdm(unit=" records", unit_scale=True, desc="walking", leave=False)

    def records(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class _Walk:
    """A loaded repo ready to walk: its source, commit and driver."""

    opened: OpenedSource
    commit: Commit
    driver: MemoryDriver[Any] | DiskDriver[Any]
    spilled: bool
    bar: _Progress


@asynccontextmanager
async def _walking(
    source: str,
    builder: DriverBuilder[Any],
    *,
    disk_path: str | None = None,
    plc_url: str | None = None,
    progress: bool = False,
    fetch_options: FetchOptions | None = None,
    allow_private_hosts: bool = False,
) -> AsyncIterator[_Walk]:
    """Open SOURCE, load its CAR (spilling to ``disk_path``, or a temporary file, past the
    builder's memory limit) and check the commit's DID against the one asked for.

    On exit the source is closed and a spill store closed and removed (a ``disk_path`` that existed
    before is emptied but kept).

    Raises:
        RepoStreamError (SourceError, IdentityError, FetchError, CarError...), OSError.
    """
    from .net.source import open_source

    async with open_source(source, plc_url=plc_url, options=fetch_options, allow_private_hosts=allow_private_hosts) as opened:
        bar = _Progress(progress, opened.size)
        store = None
        created = disk_path is not None and not os.path.exists(disk_path)
        try:
            loaded = await builder.load_car(bar.wrap(opened.source))
            driver: MemoryDriver[Any] | DiskDriver[Any]
            if isinstance(loaded, NeedDisk):
                if loaded.commit is not None:
                    opened.check_did(loaded.commit.did)  # before reading the rest to disk
                store = await DiskBuilder().with_cache_size_mb(_SPILL_CACHE_MB).open(disk_path)
                commit, driver = await loaded.finish_loading(store)
            else:
                commit, driver = loaded.commit, loaded
            opened.check_did(commit.did)
            bar.walking()
            yield _Walk(opened, commit, driver, store is not None, bar)
        finally:
            bar.close()
            if store is not None:
                await store.close()
                if created and disk_path is not None:
                    for suffix in ("", "-wal", "-shm", "-journal"):
                        try:
                            os.unlink(disk_path + suffix)
                        except FileNotFoundError:
                            pass


def _select(builder: DriverBuilder[Any], collections: Iterable[str] | None) -> DriverBuilder[Any]:
    """``builder`` set to walk only ``collections`` (None: every record)."""
    return builder if collections is None else builder.with_collections(collections)


async def stats(
    path: str,
    *,
    mem_limit_mb: float = 64,
    disk_path: str | None = None,
    verify: bool = False,
    progress: bool = False,
    collections: Iterable[str] | None = None,
    plc_url: str | None = None,
    fetch_options: FetchOptions | None = None,
    allow_private_hosts: bool = False,
) -> dict[str, Any]:
    """Walk the repo CAR of SOURCE ``path`` (a file, ``"-"`` for standard input, a URL, DID or
    handle; see :func:`repo_stream.net.source.open_source`) and return its figures as a dict.

    Keys: ``did, rev, version, commit, data`` (CIDs as base32 strings), ``records``,
    ``record_bytes`` (sum of record block lengths), ``blocks`` (CAR sections), ``car_bytes``,
    ``collections`` (collection -> record count), ``spilled`` (bool), ``seconds``,
    ``implementation`` (``"c"`` or ``"python"``), ``nodes`` (MST nodes visited).

    ``collections``: count only the records of these collection NSIDs, walking only the subtrees
    that can hold them. A spill file made at ``disk_path`` is removed afterwards (a file that
    existed before is emptied but kept); without ``disk_path`` a temporary one is used and always
    removed. ``progress=True`` draws tqdm bars on stderr. ``plc_url``: the PLC directory for a
    ``did:plc`` (default ``https://plc.directory``). ``fetch_options`` and ``allow_private_hosts``:
    as for :func:`repo_stream.net.source.open_source`.

    Raises:
        RepoStreamError: the CAR is malformed, or cannot be resolved or fetched (any subclass);
        OSError: the file cannot be read. ValueError: a name in ``collections`` is not an NSID.
    """
    started = time.perf_counter()
    builder = DriverBuilder().with_mem_limit_mb(mem_limit_mb).with_block_processor(len).with_verify_cids(verify)
    async with _walking(
        path, _select(builder, collections), disk_path=disk_path, plc_url=plc_url, progress=progress,
        fetch_options=fetch_options, allow_private_hosts=allow_private_hosts,
    ) as walk:  # fmt: skip
        return await _walk(walk, started)


async def _walk(walk: _Walk, started: float) -> dict[str, Any]:
    driver, commit, bar = walk.driver, walk.commit, walk.bar
    collections: Counter[str] = Counter()
    records = 0
    record_bytes = 0
    # From disk each chunk is a hop to the store's thread and back (about a millisecond with the
    # GIL handed over twice: 0.6 s of the 500k spill with 1024-record chunks): take bigger ones.
    chunk_size = DISK_COUNT_CHUNK if isinstance(driver, DiskDriver) else 1024
    while (chunk := await driver.next_chunk(chunk_size)) is not None:
        records += len(chunk)
        bar.records(len(chunk))
        record_bytes += sum(map(_second, chunk))
        first = chunk[0][0].partition("/")[0]
        if first == chunk[-1][0].partition("/")[0]:
            collections[first] += len(chunk)  # keys are sorted: one collection from first to last
        else:
            collections.update(key.partition("/")[0] for key, _ in chunk)
    return {
        "did": commit.did,
        "rev": commit.rev,
        "version": commit.version,
        "commit": cid_text(driver.commit_cid_bytes),
        "data": cid_text(commit.data_bytes),
        "records": records,
        "record_bytes": record_bytes,
        "blocks": driver.blocks_read,
        "car_bytes": driver.bytes_read,
        "collections": dict(sorted(collections.items())),
        "spilled": walk.spilled,
        "seconds": round(time.perf_counter() - started, 6),
        "implementation": implementation.backend().name,
        "nodes": driver.nodes_visited,
    }


def _human(result: dict[str, Any]) -> str:
    seconds = result["seconds"]
    rate = result["car_bytes"] / 1e6 / seconds if seconds > 0 else 0.0
    lines = [
        f"did           {result['did']}",
        f"rev           {result['rev']}",
        f"commit        {result['commit']}",
        f"data          {result['data']}",
        f"records       {result['records']}",
        f"record bytes  {result['record_bytes']}",
        f"blocks        {result['blocks']}",
        f"spilled       {'yes' if result['spilled'] else 'no'}",
        f"elapsed       {seconds:.3f} s ({rate:.1f} MB/s over {result['car_bytes']} bytes)",
        "collections:",
    ]
    width = max((len(c) for c in result["collections"]), default=0)
    lines += [f"  {name:<{width}}  {count}" for name, count in result["collections"].items()]
    return "\n".join(lines)


# --- ls, dump, get, verify ------------------------------------------------------------------

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _write(text: str) -> None:
    """Write ``text`` to standard output as UTF-8 (JSON's encoding, whatever the locale)."""
    sys.stdout.buffer.write(text.encode("utf-8", "surrogateescape"))


def _builder(args: argparse.Namespace) -> DriverBuilder[Any]:
    return _select(DriverBuilder().with_mem_limit_mb(args.mem_limit_mb), args.collection)


def _walking_args(args: argparse.Namespace, builder: DriverBuilder[Any]) -> Any:
    return _walking(
        args.source, builder, disk_path=args.disk_path, plc_url=args.plc_url, progress=_show_progress(args),
        fetch_options=_source_fetch_options(args), allow_private_hosts=args.allow_private_hosts,
    )  # fmt: skip


def _source_fetch_options(args: argparse.Namespace) -> FetchOptions | None:
    """:func:`_fetch_options` for a SOURCE that is fetched; None for a file or standard input, so
    that walking one never imports httpx (~0.2 s of start-up)."""
    from .net.source import classify_source

    return _fetch_options(args) if classify_source(args.source) in ("url", "did", "handle") else None


def _fetch_options(args: argparse.Namespace) -> FetchOptions:
    """The fetch limits of ``--max-repo-mb``, ``--timeout`` and ``--retries``."""
    from .net.fetch import FetchOptions

    return FetchOptions(max_bytes=int(args.max_repo_mb * 1024 * 1024), total_timeout=args.timeout, retries=args.retries)


async def _ls(args: argparse.Namespace) -> int:
    builder = _builder(args).with_record_cids(True).with_block_processor(len)
    async with _walking_args(args, builder) as walk:
        while (chunk := await walk.driver.next_chunk(1024)) is not None:
            walk.bar.records(len(chunk))
            if args.json:
                _write("".join(_dumps({"key": key, "cid": cid}) + "\n" for key, cid, _ in chunk))
            else:
                _write("".join(f"{key} {cid}\n" for key, cid, _ in chunk))
    return 0


async def _dump(args: argparse.Namespace) -> int:
    # The blocks are kept raw (about the CAR's size in memory); the walker writes each chunk's
    # lines itself, transcoding each record to its JSON text (the C core's transcoder) as it goes
    # (driver.next_json_lines). Keys need no escaping (the walk refuses any key outside the repo
    # key charset), nor do CIDs (base32 or base58 text), so a line is what json.dumps of the dict
    # would write.
    builder = _builder(args)
    out = sys.stdout.buffer
    async with _walking_args(args, builder) as walk:
        while (lines := await walk.driver.next_json_lines(1024)) is not None:
            walk.bar.records(lines.count(b"\n"))
            out.write(lines)
    return 0


_MISSING = object()


async def _find(walk: _Walk, key: str) -> Any:
    """The value of the record ``key``, or ``_MISSING``; stops at the first key past it."""
    while (chunk := await walk.driver.next_chunk(256)) is not None:
        walk.bar.records(len(chunk))
        for found, value in chunk:
            if found >= key:
                return value if found == key else _MISSING
    return _MISSING


async def _get_by_proof(args: argparse.Namespace) -> int | None:
    """``get`` of a DID, handle or at:// SOURCE through ``com.atproto.sync.getRecord``: resolve
    the identity, fetch the record proof (a few KB), verify it and the commit's signature with
    the DID document's ``#atproto`` key and print the record. None: the PDS does not serve
    getRecord (fetch the whole repo instead); a proof that does not verify is an error.

    Raises:
        IdentityError, FetchError, RecordProofError.
    """
    from .errors import IdentityError
    from .net.fetch import fetch_record_proof
    from .net.identity import DEFAULT_PLC_URL, DEFAULT_TIMEOUT, _client_scope, parse_identifier, resolve_identity
    from .sync.proof import verify_record_proof

    key: str = args.key
    plc_url = args.plc_url or DEFAULT_PLC_URL
    async with _client_scope(None, allow_private_hosts=args.allow_private_hosts, trusted=[plc_url]) as http:
        identity = await resolve_identity(parse_identifier(args.source), client=http, plc_url=plc_url, timeout=DEFAULT_TIMEOUT)
        did = identity.did
        if identity.pds is None:
            raise IdentityError(
                f"{args.source}: the DID document of {did} has no valid #atproto_pds service "
                "(type AtprotoPersonalDataServer, serviceEndpoint http(s)://host[:port])"
            )
        if identity.signing_key is None:
            raise IdentityError(f"{args.source}: the DID document of {did} has no #atproto signing key to verify the record proof with")
        car = await fetch_record_proof(identity.pds, did, key, client=http, options=_fetch_options(args))
    if car is None:
        return None
    proven = verify_record_proof(car, did, key, identity.signing_key)
    if proven is None:
        _error(f"no record {key} in the repo of {did} (absence proven by getRecord from {identity.pds})")
        return 1
    _write(_dumps(proven.value) + "\n")
    return 0


async def _get(args: argparse.Namespace) -> int:
    from .net.source import classify_source
    from .records.values import JSON_CODEC, record_json

    key: str = args.key
    if classify_source(args.source) in ("did", "handle"):
        done = await _get_by_proof(args)
        if done is not None:
            return done
    builder = DriverBuilder().with_mem_limit_mb(args.mem_limit_mb).with_block_processor(record_json).with_codec(*JSON_CODEC)
    builder = _select(builder, [key.partition("/")[0]])  # walk only the subtrees that can hold the key
    async with _walking_args(args, builder) as walk:
        value = await _find(walk, key)
        if value is not _MISSING:
            _write(_dumps(value) + "\n")
            return 0
        where = f"{walk.commit.did} (commit {walk.driver.commit_cid}, rev {walk.commit.rev})"
    _error(f"no record {key} in the repo of {where}")
    return 1


async def _verify(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    builder = DriverBuilder().with_mem_limit_mb(args.mem_limit_mb).with_block_processor(len).with_verify_cids(True)
    async with _walking_args(args, builder) as walk:
        key = args.key or walk.opened.signing_key
        if key is None:
            _error(f"{args.source}: the DID document of {walk.commit.did} has no #atproto signing key; give one with --key")
            return 1
        walk.commit.verify_signature(key)  # before the walk: a bad signature fails fast
        records = 0
        while (chunk := await walk.driver.next_chunk(1024)) is not None:
            records += len(chunk)
            walk.bar.records(len(chunk))
        driver = walk.driver
        summary = (
            f"verified {walk.commit.did} rev {walk.commit.rev} commit {driver.commit_cid}: {records} records, "
            f"{driver.blocks_read} blocks, signed by {key} "
            f"({time.perf_counter() - started:.3f} s)"
        )
    _write(summary + "\n")
    return 0


# --- arguments --------------------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _collection(text: str) -> str:
    if not is_valid_collection(text):
        raise argparse.ArgumentTypeError(f"not a collection NSID (e.g. app.bsky.feed.post): {text!r}")
    return text


def _did_key(text: str) -> str:
    """A did:key that parses to an atproto signing key (checked before any work)."""
    from .crypto.didkey import parse_did_key
    from .errors import SignatureError

    try:
        parse_did_key(text)
    except SignatureError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _record_key(text: str) -> str:
    """A record key ``collection/rkey`` (an NSID, a slash, a record key)."""
    if not is_valid_key(text):
        raise argparse.ArgumentTypeError(f"not a record key collection/rkey (e.g. app.bsky.actor.profile/self): {text!r}")
    return text


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text!r}")
    return value


def _host_arguments(p: argparse.ArgumentParser, fetches: str) -> None:
    """The per-PDS-host limits of a command that fetches many repos (see
    :class:`repo_stream.net.hosts.HostLimiter`); ``fetches`` names what the concurrency counts."""
    p.add_argument(
        "--per-host-concurrency", type=_positive_int, default=4, metavar="N",
        help=f"{fetches} open at once per PDS host (default 4)",
    )  # fmt: skip
    p.add_argument(
        "--per-host-rps", type=_positive_float, default=10.0, metavar="R",
        help="repo requests started per second per PDS host, retries included (default 10); a host's 429 or 503 "
        "with Retry-After pauses that host only (up to 60 s)",
    )  # fmt: skip


def _fetch_arguments(p: argparse.ArgumentParser) -> None:
    """The limits of every command that fetches (see :class:`repo_stream.net.fetch.FetchOptions`)."""
    p.add_argument(
        "--max-repo-mb", type=_positive_float, default=4096, metavar="MB",
        help="largest repo CAR fetched, MiB as decoded; a larger one fails as soon as it passes (default 4096)",
    )  # fmt: skip
    p.add_argument(
        "--timeout", type=_positive_float, default=3600.0, metavar="S",
        help="deadline of one repo fetch, seconds, retries and body included (default 3600); a body must also "
        "average 64 KiB/s after its first 30 s",
    )  # fmt: skip
    p.add_argument(
        "--retries", type=_non_negative_int, default=3, metavar="N",
        help="extra attempts after a connection failure, HTTP 429 or 5xx before the body starts (default 3)",
    )  # fmt: skip
    p.add_argument(
        "--allow-private-hosts", action="store_true",
        help="let hosts learned from the network (DID documents' PDS, did:web, handles, redirects) be private, "
        "loopback or link-local addresses (default: refused; hosts you name are always allowed)",
    )  # fmt: skip


def _source_arguments(p: argparse.ArgumentParser, *, collections: bool = True) -> None:
    """SOURCE and the options every command that walks a repo takes."""
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="a repo CAR file, - for standard input, a getRepo URL, a DID, a handle or an at:// URI",
    )
    p.add_argument("--mem-limit-mb", type=_positive_float, default=64, metavar="N", help="memory limit before spilling to disk, MiB (default 64)")
    p.add_argument("--disk-path", metavar="P", help="spill file (default: a temporary file, always removed)")
    p.add_argument("--plc-url", metavar="URL", default=argparse.SUPPRESS, help="PLC directory for did:plc (default https://plc.directory)")
    _fetch_arguments(p)
    if collections:
        p.add_argument(
            "--collection",
            action="append",
            type=_collection,
            metavar="NSID",
            help="only the records of this collection, walking only the subtrees that can hold them (repeatable)",
        )


# --- verify-commit (sync 1.1): one function and one subparser registration --------------------

#: Exit status of ``verify-commit`` for a valid commit that does not follow the given state.
EXIT_OUT_OF_SYNC = 3


def _add_verify_commit(commands: Any) -> None:
    """Register ``repo-stream verify-commit FILE [--key DIDKEY] [--prev-rev REV --prev-data CID]``."""
    p = commands.add_parser("verify-commit", help="verify a recorded subscribeRepos #commit (or #sync) message; print it as JSON")
    p.add_argument("file", metavar="FILE", help="the message bytes as received over the WebSocket (header + body); - for standard input")
    p.add_argument("--key", type=_did_key, metavar="DIDKEY", help="the account's signing key (default: from its DID document)")
    p.add_argument("--prev-rev", metavar="REV", help="the rev held for the repo (with --prev-data): check continuity")
    p.add_argument("--prev-data", metavar="CID", help="the MST root held for the repo (with --prev-rev)")
    p.add_argument("--no-prev-data", action="store_true", help="accept a commit without prevData on its signature alone")


async def _verify_commit(args: argparse.Namespace) -> int:
    """Verify one recorded #commit or #sync message: JSON on stdout; exit 1 on a broken commit,
    3 (:data:`EXIT_OUT_OF_SYNC`) when it is valid but does not follow --prev-rev/--prev-data."""
    import json

    from .errors import OutOfSyncError
    from .sync.events import DEFAULT_MAX_MESSAGE_BYTES, decode_frame
    from .sync.verify import RepoState, verify_commit, verify_sync

    if (args.prev_rev is None) != (args.prev_data is None):
        _error("verify-commit: --prev-rev and --prev-data go together")
        return 2
    if args.file == "-":
        message = sys.stdin.buffer.read(DEFAULT_MAX_MESSAGE_BYTES + 1)
    else:
        with open(args.file, "rb") as fh:
            message = fh.read(DEFAULT_MAX_MESSAGE_BYTES + 1)
    frame = decode_frame(message)
    key = args.key
    if key is None:
        from .net.identity import parse_did_document, resolve_did

        did = frame.body.get("repo") if frame.type == "#commit" else frame.body.get("did")
        if not isinstance(did, str):
            _error(f"verify-commit: {args.file}: a {frame.type} message without a DID; give --key")
            return 1
        document = await resolve_did(did, **({"plc_url": args.plc_url} if args.plc_url else {}))
        key = parse_did_document(did, document).signing_key
        if key is None:
            _error(f"verify-commit: the DID document of {did} has no #atproto signing key; give one with --key")
            return 1
    result: Any
    status = 0
    if frame.type == "#sync":
        result = verify_sync(message, key=key).to_json()
    else:
        prev = None if args.prev_rev is None else RepoState(args.prev_rev, args.prev_data)
        try:
            result = verify_commit(message, key=key, prev=prev, require_prev_data=not args.no_prev_data).to_json()
        except OutOfSyncError as exc:
            _error(str(exc))
            result = {**exc.result.to_json(), "outOfSync": str(exc)}
            status = EXIT_OUT_OF_SYNC
    _write(json.dumps(result, ensure_ascii=False) + "\n")
    return status


_SYNC_DESCRIPTION = """\
Backfill repos, then follow the firehose: every record of the repos, first as a backfill and then
live, each commit verified, in order per repo, resumable (repo_stream.sync.Sync).

Repos: --repos FILE (DIDs, one a line; - for standard input), --host URL (every repo the host
lists), or --collection-signal NSID (the repos that have a record in that collection: listed by
--host, default the relay, with com.atproto.sync.listReposByCollection, and found live).

State: --state PATH, an SQLite file (default ./repo-stream-sync.sqlite in the working folder),
holds each repo's status, rev and data root, the record CIDs delivered and the firehose cursor; a
restart with the same --state resumes from it. Ctrl-C and SIGTERM stop after committing what was
delivered.

Output (--json): one JSON object a line, flushed per line. Record events:
  {"did", "rev", "seq", "action": "create"|"update"|"delete", "collection", "rkey", "cid",
   "value", "live"}  (cid and value null for deletes; seq null and live false for backfilled
   records and the difference a resync emits)
Repo events: {"did", "event": "identity"|"account"|"resync"|"desynchronized"|"error", "seq", ...}
Without --json: one short line per event. --out SINK writes the records to a store instead
(duckdb:FILE, parquet:DIR, postgresql://...: a sink that takes sync events).
Progress goes to stderr when it is a terminal, and a summary on exit.

Exit status: 0 stopped (the stream ended); 1 an error ended the run; 2 usage; 130 interrupted;
143 terminated.
"""


#: The sync state file's default name, in the working folder (repo_stream.sync.service.DEFAULT_STATE_PATH).
DEFAULT_SYNC_STATE = "repo-stream-sync.sqlite"


def _add_sync(commands: Any) -> None:
    """Register ``repo-stream sync (--repos FILE|- | --host URL | --collection-signal NSID) --relay URL ...``."""
    p = commands.add_parser(
        "sync",
        help="backfill repos, then follow the firehose: verified, resumable record events",
        description=_SYNC_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--repos", metavar="FILE", help="a file of DIDs, one a line (# comments), or - for standard input")
    where.add_argument("--host", metavar="URL", default=None, help="every active repo of a PDS or relay (com.atproto.sync.listRepos)")
    where.add_argument(
        "--collection-signal",
        metavar="NSID",
        help="only repos with a record in this collection (com.atproto.sync.listReposByCollection on --list-host, default the relay; and found live)",
    )
    p.add_argument("--list-host", metavar="URL", help="with --collection-signal: the host to list from (default: the relay, as https://)")
    p.add_argument("--relay", required=True, metavar="URL", help="the firehose: a relay or PDS, wss://HOST or ws://HOST:PORT")
    p.add_argument("--plc-url", metavar="URL", default=argparse.SUPPRESS, help="PLC directory for did:plc (default https://plc.directory)")
    p.add_argument("--state", metavar="PATH", default=DEFAULT_SYNC_STATE, help=f"the SQLite state file (default ./{DEFAULT_SYNC_STATE})")
    p.add_argument("--cursor", type=_non_negative_int, metavar="N", help="start the firehose after this seq (default: the state's cursor, else live)")
    p.add_argument(
        "--collection", action="append", metavar="NSID", help="emit only records of this collection (repeatable; app.bsky.feed.* for a prefix)"
    )
    p.add_argument("--json", action="store_true", help="one JSON object per event, one a line")
    p.add_argument("--out", metavar="SINK", help="write the records to a store: duckdb:FILE, parquet:DIR, postgresql://... (its extra)")
    p.add_argument("--memory-workers", type=_positive_int, default=4, metavar="N", help="repos backfilled at once (default 4)")
    _host_arguments(p, "repo fetches (backfills and resyncs)")
    p.add_argument("--max-buffered", type=_non_negative_int, default=10_000, metavar="N",
                   help="firehose messages of repos being backfilled kept in memory; more go to the state file (default 10000)")  # fmt: skip
    p.add_argument("--max-events", type=_positive_int, metavar="N", help="stop after N events")
    p.add_argument("--allow-private-hosts", action="store_true", help="let hosts learned from the network (PDSes, did:web) be private addresses")


async def _sync(args: argparse.Namespace) -> int:
    """The ``sync`` command: run :class:`repo_stream.sync.Sync` and print (or store) its events."""
    from .backfill.sources import read_repo_list
    from .firehose import Problem
    from .sync.follow import RecordEvent
    from .sync.service import Sync

    sink: Any = None
    if args.out:
        from .backfill import open_sink

        sink = open_sink(args.out)
        if not hasattr(sink, "apply"):
            _error(f"sync: --out {args.out}: this sink cannot take sync events (use duckdb:, parquet: or postgresql:)")
            return 2
    bar: Any = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit=" events", desc="sync", file=sys.stderr, dynamic_ncols=True)

    def problem(item: Problem) -> None:
        line = f"warning: {item.kind}: {' '.join(str(item.error).split())}"
        if bar is not None:
            bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    repos = read_repo_list(args.repos) if args.repos else None
    try:
        sync = Sync(
            repos,
            relay=args.relay,
            plc_url=getattr(args, "plc_url", None),
            state=args.state,
            cursor=args.cursor,
            collections=args.collection,
            host=args.host if args.collection_signal is None else args.list_host,
            signal_collection=args.collection_signal,
            allow_private_hosts=args.allow_private_hosts,
            sink=sink,
            memory_workers=args.memory_workers,
            per_host_concurrency=args.per_host_concurrency,
            per_host_rps=args.per_host_rps,
            max_buffered=args.max_buffered,
            on_problem=problem,
            before_commit=sys.stdout.flush if sink is None else None,  # a line acknowledged is written before it is committed
        )
    except ValueError as exc:
        _error(f"sync: {exc}")
        return 2
    if args.repos and args.repos != "-":
        try:  # the list is read as the backfill goes: refuse a missing one before the firehose starts
            open(args.repos, "rb").close()
        except OSError as exc:
            _error(f"cannot read repo list {args.repos}: {exc.strerror or exc}")
            return 1
    count = 0
    shown = time.monotonic()
    try:
        async with sync:
            async for event in sync:
                count += 1
                if sink is None:
                    if args.json:
                        _write(event.to_json_line())
                    elif isinstance(event, RecordEvent):
                        where = f"seq {event.seq}" if event.seq is not None else "backfill"
                        _write(f"{event.did} {event.action} {event.collection}/{event.rkey} {event.cid or '-'} rev {event.rev} ({where})\n")
                    else:
                        detail = " ".join(f"{k}={v}" for k, v in event.detail.items())
                        _write(f"{event.did} {event.event} {detail}\n")
                await sync.ack()  # taken: written out (flushed before the state is committed)
                if bar is not None and time.monotonic() - shown >= 0.5:
                    shown = time.monotonic()
                    bar.n = count
                    bar.set_postfix_str(_sync_progress(sync), refresh=True)
                if args.max_events is not None and count >= args.max_events:
                    break
    finally:
        if bar is not None:
            bar.close()
        close = getattr(sink, "close", None)
        if close is not None:
            close()
        print(_sync_summary(sync), file=sys.stderr, flush=True)
    return 0


def _sync_progress(sync: Any) -> str:
    """The progress bar's text: events/s, lag behind the stream's ``time``, repos by status."""
    stats = sync.stats
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    lag = stats.lag()
    counts = sync.state.counts() if sync.state is not None else {}
    repos = ", ".join(f"{n} {status}" for status, n in counts.items())
    return f"{stats.delivered / elapsed:,.0f} events/s, lag {'-' if lag is None else f'{lag:,.1f} s'}, buffered {stats.buffered}; repos: {repos}"


def _sync_summary(sync: Any) -> str:
    """The summary line on exit."""
    stats = sync.stats
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    counts = sync.final_counts
    repos = ", ".join(f"{n} {status}" for status, n in counts.items()) or "none"
    caught = "backfill not done" if stats.backfilled_at is None else f"every repo backfilled after {stats.backfilled_at:.1f} s"
    caught += "" if stats.caught_up is None else f", caught up with the stream after {stats.caught_up:.1f} s"
    return (
        f"sync: {stats.delivered} events in {elapsed:.1f} s ({stats.delivered / elapsed:,.0f}/s): {stats.backfilled} backfilled records, "
        f"{stats.live} live records ({stats.commits} commits), {stats.repo_events} repo events; {stats.fetched} repos fetched, "
        f"{stats.failed} failed, {stats.resyncs} resyncs, {stats.broken} broken commits dropped, {stats.stale} stale events dropped; "
        f"buffered at most {stats.buffered_peak} ({stats.spilled} spilled); {stats.problems} stream problems; {caught}; repos: {repos}"
    )


def _add_firehose(commands: Any) -> None:
    """Register ``repo-stream firehose [URL] [--cursor N] [--record FILE] [--replay FILE] [--verify] [--json]``."""
    p = commands.add_parser(
        "firehose",
        help="print every event of a subscribeRepos stream (a relay or PDS), or of a recording; optionally record or verify",
    )
    p.add_argument("url", nargs="?", metavar="URL", help="the relay or PDS, wss://HOST or ws://HOST:PORT (or the full subscribeRepos URL)")
    p.add_argument("--cursor", type=_non_negative_int, metavar="N", help="start after this seq (default: live, from now)")
    p.add_argument("--record", metavar="FILE", help="append every message received to FILE (4-byte big-endian length, then the bytes)")
    p.add_argument("--replay", metavar="FILE", help="read the messages of a recording instead of a URL")
    p.add_argument("--verify", action="store_true", help="verify #commit and #sync events with each account's DID document key (cached)")
    p.add_argument("--json", action="store_true", help="one JSON object per event or problem, one a line")
    p.add_argument("--max-events", type=_positive_int, metavar="N", help="stop after N events")
    p.add_argument("--max-buffer", type=_positive_int, default=256, metavar="N", help="events buffered ahead of the output at most (default 256)")
    p.add_argument("--plc-url", metavar="URL", default=argparse.SUPPRESS, help="PLC directory for did:plc (default https://plc.directory)")
    p.add_argument("--allow-private-hosts", action="store_true", help="let did:web hosts resolve to private addresses (--verify)")


async def _firehose(args: argparse.Namespace) -> int:
    """Print every event of a stream or a recording; exit 0 at --max-events or the recording's
    end, 1 on an error that ends the stream (a FutureCursor error frame, a bad URL)."""
    import json
    from contextlib import ExitStack

    from .errors import CommitVerifyError, ErrorFrameError, IdentityError, OutOfSyncError
    from .firehose import Event, Firehose, KeyCache, Problem, parse_message, read_messages, write_message
    from .sync.events import DEFAULT_MAX_MESSAGE_BYTES
    from .sync.verify import verify_commit, verify_sync

    if (args.url is None) == (args.replay is None):
        _error("firehose: give a URL or --replay FILE (one of them)")
        return 2
    keys = KeyCache(allow_private_hosts=args.allow_private_hosts, **({"plc_url": args.plc_url} if getattr(args, "plc_url", None) else {}))
    count = 0

    async def show(item: Event | Problem) -> None:
        verdict: dict[str, Any] = {}
        if isinstance(item, Event) and args.verify and item.type in ("#commit", "#sync") and item.did is not None:
            try:
                key = await keys.key(item.did)
                if item.type == "#commit":
                    verify_commit(item.message, key=key)
                else:
                    verify_sync(item.message, key=key)
                verdict = {"verified": True}
            except (CommitVerifyError, OutOfSyncError, IdentityError) as exc:
                verdict = {"verified": False, "verifyError": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}
        if isinstance(item, Event) and item.type == "#identity" and item.did is not None:
            keys.forget(item.did)
        if args.json:
            _write(json.dumps({**item.to_json(), **verdict}, ensure_ascii=False) + "\n")
        elif isinstance(item, Problem):
            _write(f"! {item.kind}: {' '.join(str(item.error).split())}\n")
        else:
            body = item.body
            detail = ""
            if item.type == "#commit":
                ops = body.get("ops")
                paths = [f"{op.get('action')} {op.get('path')}" for op in ops if isinstance(op, dict)] if isinstance(ops, list) else []
                detail = f" rev {body.get('rev')} " + ", ".join(paths[:5]) + (f" (+{len(paths) - 5})" if len(paths) > 5 else "")
            elif item.type in ("#sync", "#account", "#identity", "#info"):
                fields = {"#sync": ("rev",), "#account": ("active", "status"), "#identity": ("handle",), "#info": ("name", "message")}[item.type]
                detail = "".join(f" {name}={body.get(name)}" for name in fields if name in body)
            mark = ""
            if verdict:
                mark = " verified" if verdict["verified"] else f" NOT VERIFIED: {verdict['verifyError']}"
            _write(f"{item.seq if item.seq is not None else '-'} {item.type} {item.did or '-'}{detail}{mark}\n")

    with ExitStack() as files:
        record = files.enter_context(open(args.record, "ab")) if args.record else None
        if args.replay is not None:
            source = files.enter_context(open(args.replay, "rb"))
            for message in read_messages(source, name=args.replay):
                if record is not None:
                    write_message(record, message)
                try:
                    item: Event | Problem = parse_message(message, max_bytes=DEFAULT_MAX_MESSAGE_BYTES)
                except ErrorFrameError as exc:
                    item = Problem("error-frame", exc)
                except RepoStreamError as exc:
                    item = Problem("malformed", exc)
                await show(item)
                count += isinstance(item, Event)
                if args.max_events is not None and count >= args.max_events:
                    break
            return 0
        async with Firehose(args.url, cursor=args.cursor, max_buffer=args.max_buffer) as stream:
            async for item in stream:
                if record is not None and isinstance(item, Event):
                    write_message(record, item.message)
                    record.flush()
                await show(item)
                count += isinstance(item, Event)
                if args.max_events is not None and count >= args.max_events:
                    break
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="repo-stream", description="Read atproto repository CAR files.")
    parser.add_argument("--version", action="version", version=f"repo-stream {__version__}")
    parser.add_argument("--plc-url", metavar="URL", default=None, help="PLC directory for did:plc (default https://plc.directory)")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("stats", help="walk a repo CAR and summarise its records")
    _source_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true", help="check every block against its CID (for untrusted CARs)")
    g = commands.add_parser("generate", help="write realistic generated repo CARs into a cache folder")
    g.add_argument("sizes", nargs="+", type=_positive_int, metavar="N", help="number of records, e.g. 100000 500000 2000000")
    g.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    g.add_argument("--order", choices=["preorder", "shuffled", "reverse"], default="shuffled", help="block order (default shuffled)")
    g.add_argument("--cache-dir", default=None, help="folder for the CARs (default .cache/cars)")
    g.add_argument(
        "--profile",
        choices=["default", "small"],
        default="default",
        help="record mix: default (~240-byte records) or small (like and follow heavy, ~190-byte records)",
    )
    p = commands.add_parser("ls", help="list every record's key and CID in key order")
    _source_arguments(p)
    p.add_argument("--json", action="store_true", help='one {"key","cid"} JSON object per line')
    p = commands.add_parser("dump", help='print every record as {"key","cid","value"} JSON, one per line')
    _source_arguments(p)
    p = commands.add_parser("get", help="print one record's value as JSON")
    _source_arguments(p, collections=False)
    p.add_argument("key", type=_record_key, metavar="KEY", help="the record's key, collection/rkey (e.g. app.bsky.actor.profile/self)")
    p = commands.add_parser("verify", help="check every block's CID, every MST rule and the commit signature")
    _source_arguments(p, collections=False)
    p.add_argument(
        "--key",
        type=_did_key,
        metavar="DIDKEY",
        help="the account's signing key, did:key:z... (default: from the DID document of a DID or handle SOURCE)",
    )
    _add_verify_commit(commands)
    _add_firehose(commands)
    _add_sync(commands)
    b = commands.add_parser(
        "backfill",
        help="walk many repos at once, resumably (DIDs, handles, URLs, paths)",
        description=_BACKFILL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--repos", metavar="FILE", help="a file of repo sources, one a line (# comments), or - for standard input")
    where.add_argument(
        "--host",
        metavar="URL",
        help="every active repo of a PDS or relay (com.atproto.sync.listRepos), fetched from that host; "
        "with --collection-signal, the repos the host lists for a collection",
    )
    b.add_argument(
        "--collection-signal",
        metavar="NSID",
        help="with --host: every repo that has a record in collection NSID (com.atproto.sync.listReposByCollection, "
        "served by relays), each fetched from its own PDS",
    )
    b.add_argument("--memory-workers", type=_positive_int, default=2, metavar="N", help="repos loaded and walked at once (default 2)")
    b.add_argument("--disk-workers", type=_positive_int, default=1, metavar="M", help="repos finished on disk at once (default 1)")
    b.add_argument(
        "--processes",
        type=_positive_int,
        default=1,
        metavar="P",
        help="processes on this machine: this one and P-1 worker processes, each with its own --memory-workers and --disk-workers (default 1: all in this process)",
    )
    b.add_argument("--mem-limit-mb", type=_positive_float, default=64, metavar="X", help="per-repo memory limit before spilling, MiB (default 64)")
    b.add_argument("--fetch-concurrency", type=_positive_int, default=None, metavar="K", help="sources opened ahead of the memory workers (default: --memory-workers)")
    _host_arguments(b, "repo fetches")
    b.add_argument("--spill-dir", metavar="DIR", help="folder for spill files (default: the system's temporary folder)")
    b.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="SQLite file recording finished repos; a rerun skips them (with --out postgresql, default: the database's backfill_checkpoint table)",
    )
    b.add_argument("--retry-failed", action="store_true", help="run repos the checkpoint records as failed again")
    b.add_argument(
        "--out",
        metavar="OUT",
        help="where records go: DIR or jsonl:DIR (DIR/<did>.jsonl), duckdb:FILE, parquet:DIR, postgresql://... (a store per its extra)",
    )
    b.add_argument("--raw", action="store_true", help="with --out: store each record's DAG-CBOR bytes instead of its JSON text")
    b.add_argument(
        "--verify",
        nargs="?",
        const="signature",
        choices=["cids", "signature"],
        help="cids: check every block against its CID and every MST rule; signature (the default of a bare --verify): "
        "that and the commit's signature, with --key or each account's DID document key",
    )
    b.add_argument(
        "--key",
        type=_did_key,
        metavar="DIDKEY",
        help="the signing key of every repo, did:key:z... (e.g. local files of one account); implies --verify signature",
    )
    b.add_argument("--json", action="store_true", help="one JSON object per repo on stdout; the summary on stderr")
    b.add_argument("--plc-url", metavar="URL", default=None, help="PLC directory for did:plc (default https://plc.directory)")
    b.add_argument("--dask", metavar="ADDRESS", default=None, help="run on a Dask cluster: a scheduler address, or 'local' for a local one")
    b.add_argument("--engine-workers", type=_positive_int, default=2, metavar="W", help="worker processes of --dask local (default 2)")
    _fetch_arguments(b)
    for sub in commands.choices.values():
        sub.set_defaults(command_parser=sub)  # a command's usage errors print its own usage
    return parser


#: The columns of ``backfill``'s tab-separated lines (its header line).
BACKFILL_COLUMNS = ("source", "did", "rev", "records", "verified", "status")

_BACKFILL_DESCRIPTION = """\
Walk many repos at once, resumably (DIDs, handles, URLs, paths).

Output: one line per repo on stdout, in completion order, after a header line naming the
tab-separated columns:
  source    the repo as given
  did       the commit's DID (or the DID asked for), - if unknown
  rev       the commit's rev, - if not read
  records   records walked (on failure: before it)
  verified  what was checked, on success: cids (every block's CID and every MST rule),
            cids+signature (and the commit's signature), - (nothing: no --verify, a failure,
            or a repo skipped as done in the checkpoint)
  status    ok, skipped (done in the checkpoint), or the error (its class and message)
With --json: one JSON object per repo instead (repo, did, rev, records, record_bytes, spilled,
seconds, error, skipped, verified), no header. A summary line goes to stderr.

Exit status: 0 once the run completed, whatever single repos did (see their status); 1 the run
could not go on (e.g. the repo list cannot be read); 2 usage; 130 interrupted.
"""


def _backfill(args: argparse.Namespace) -> int:
    """The ``backfill`` command: run :func:`repo_stream.backfill.backfill` (or its Dask form) and
    report each repo; 0 once the run completed, whatever single repos did."""
    from contextlib import aclosing

    from .backfill import (
        BackfillResult,
        BackfillStats,
        backfill,
        collection_sources,
        host_sources,
        open_sink,
        read_repo_list,
    )
    from .backfill.stores import PostgresSink

    stats = BackfillStats()
    bar: Any = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(unit=" repos", desc="backfill", file=sys.stderr, dynamic_ncols=True)

    header = [] if args.json else ["\t".join(BACKFILL_COLUMNS)]  # printed before the first repo's line

    def report(result: BackfillResult) -> None:
        if args.json:
            line = json.dumps(result.to_json())
        else:
            status = "skipped" if result.skipped else "ok"
            fields = [result.source, result.did or "-", result.rev or "-", str(result.records), result.verified or "-", result.error or status]
            line = "\n".join([*header, "\t".join(fields)])
            header.clear()
        if bar is not None and not args.json:
            bar.write(line)
        else:
            print(line, flush=True)
        if bar is not None:
            elapsed = max(time.monotonic() - stats.started, 1e-9)
            bar.set_postfix_str(
                f"failed {stats.failed}, spilled {stats.spilled}, {stats.records / elapsed:,.0f} records/s, "
                f"{stats.record_bytes / 1e6 / elapsed:.1f} MB/s",
                refresh=False,
            )
            bar.update(1)

    options: dict[str, Any] = {
        "sink": None, "memory_workers": args.memory_workers,
        "disk_workers": args.disk_workers, "mem_limit_mb": args.mem_limit_mb, "fetch_concurrency": args.fetch_concurrency,
        "spill_dir": args.spill_dir, "verify": args.verify or False, "signing_key": args.key, "checkpoint": args.checkpoint,
        "retry_failed": args.retry_failed, "plc_url": args.plc_url, "fetch_options": _fetch_options(args),
        "allow_private_hosts": args.allow_private_hosts,
        "per_host_concurrency": args.per_host_concurrency, "per_host_rps": args.per_host_rps,
    }  # fmt: skip
    if args.processes > 1:
        options["processes"] = args.processes

    def listing() -> AsyncIterator[str]:
        if args.repos:
            return read_repo_list(args.repos)
        if args.collection_signal is not None:
            return collection_sources(args.host, args.collection_signal, allow_private_hosts=args.allow_private_hosts)
        return host_sources(args.host, allow_private_hosts=args.allow_private_hosts)

    async def run() -> None:
        sources = listing()
        async with aclosing(backfill(sources, stats=stats, **options)) as results:
            async for result in results:
                report(result)

    async def names() -> list[str]:
        return [name async for name in listing()]

    try:
        options["sink"] = open_sink(args.out, args.raw) if args.out else None
        if args.checkpoint is None and isinstance(options["sink"], PostgresSink):
            options["checkpoint"] = options["sink"].checkpoint()  # kept in the database, with the rows
        if args.dask is None:
            anyio.run(run)
        else:
            from .backfill.cluster import backfill_on_dask

            for result in backfill_on_dask(anyio.run(names), scheduler=args.dask, n_workers=args.engine_workers, **options):
                stats.count(result)
                report(result)
    except KeyboardInterrupt:
        print(f"error: {_interruption()}", file=sys.stderr)
        return _interrupted_status()
    except BrokenPipeError:
        raise  # standard output closed early (`| head`): main stops quietly
    except (RepoStreamError, OSError, ValueError, ImportError) as exc:
        print(f"error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    elapsed = max(time.monotonic() - stats.started, 1e-9)
    print(
        f"backfill: {stats.done} repos in {elapsed:.1f} s: {stats.done - stats.failed} ok, {stats.failed} failed, "
        f"{stats.skipped} skipped (in the checkpoint), {stats.spilled} spilled; {stats.records} records "
        f"({stats.records / elapsed:,.0f}/s), {stats.record_bytes / 1e6:.1f} MB of records ({stats.record_bytes / 1e6 / elapsed:.1f} MB/s)",
        file=sys.stderr,
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    from .records.generate import generate_cached

    for n in args.sizes:
        started = time.perf_counter()
        path = generate_cached(n, seed=args.seed, order=args.order, cache_dir=args.cache_dir, profile=args.profile)
        size = path.stat().st_size
        print(f"{path}\t{n} records\t{size / 1e6:.1f} MB\t{time.perf_counter() - started:.1f} s", flush=True)
    return 0


def _show_progress(args: argparse.Namespace) -> bool:
    return sys.stderr.isatty() and not getattr(args, "json", False)


async def _stats(args: argparse.Namespace) -> int:
    result = await stats(
        args.source,
        mem_limit_mb=args.mem_limit_mb,
        disk_path=args.disk_path,
        verify=args.verify,
        progress=_show_progress(args),
        collections=args.collection,
        plc_url=args.plc_url,
        fetch_options=_source_fetch_options(args),
        allow_private_hosts=args.allow_private_hosts,
    )
    print(json.dumps(result) if args.json else _human(result))
    return 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "stats": _stats,
    "ls": _ls,
    "dump": _dump,
    "get": _get,
    "verify": _verify,
    "verify-commit": _verify_commit,
    "firehose": _firehose,
    "sync": _sync,
}


def _error(message: str) -> None:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    if args.command == "backfill":
        return _backfill(args)
    if args.command == "generate":
        try:
            return _generate(args)
        except BrokenPipeError:
            raise
        except (ValueError, OSError, RepoStreamError) as exc:
            _error(str(exc) or type(exc).__name__)
            return 1
    command = _COMMANDS[args.command]
    try:
        status: int = anyio.run(command, args)
    except BrokenPipeError:
        raise  # standard output closed early: main stops quietly
    except (RepoStreamError, OSError) as exc:
        _error(str(exc) or type(exc).__name__)
        return 1
    return status


def _note_pure_python(command: str) -> None:
    """Say once, on stderr, that the walk runs the pure-Python implementation because the C core
    is missing (not when ``REPO_STREAM_PURE_PYTHON`` asked for it; ``generate`` does not walk)."""
    if command != "generate" and implementation.C is None and not implementation.PURE_PYTHON_ASKED:
        print(
            f"warning: the C core (repo_stream._native) is not built ({implementation.NATIVE_IMPORT_ERROR}): "
            "running the pure-Python implementation, with the same results, more slowly "
            "(REPO_STREAM_PURE_PYTHON=1 silences this)",
            file=sys.stderr,
            flush=True,
        )


#: Exit status after SIGTERM: 128 + 15, as a process killed by it.
EXIT_TERMINATED = 143
_TERMINATED: list[bool] = []


def _on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM stops the command as Ctrl-C does (the event loop cancels its work: fetches closed,
    partial output and spill files removed, worker processes stopped), then exits 143."""
    _TERMINATED.append(True)
    signal.raise_signal(signal.SIGINT)


def _interruption() -> str:
    return "terminated" if _TERMINATED else "interrupted"


def _interrupted_status() -> int:
    return EXIT_TERMINATED if _TERMINATED else 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error, 2 usage, 130 interrupted,
    141 standard output closed early, 143 terminated by SIGTERM)."""
    parser = _parser()
    args = parser.parse_args(argv)
    usage_error: Callable[[str], Any] = args.command_parser.error
    if args.command == "backfill":
        if args.dask is not None and args.processes > 1:
            usage_error("--processes is for one machine; with --dask, the engine's workers are the processes")
        if args.collection_signal is not None:
            from .backfill.sources import is_valid_nsid

            if args.host is None:
                usage_error("--collection-signal NSID needs --host URL: the relay (or collection directory) that lists the repos")
            if not is_valid_nsid(args.collection_signal):
                usage_error(f"--collection-signal: {args.collection_signal!r} is not a collection NSID (e.g. app.bsky.feed.post)")
        if args.key is not None:
            if args.verify == "cids":
                usage_error("--key is for checking signatures: it goes with --verify signature (or alone), not --verify cids")
            args.verify = "signature"
    if args.command == "verify" and args.key is None:
        from .net.source import classify_source

        if classify_source(args.source) not in ("did", "handle"):
            usage_error("a file, - or URL SOURCE needs --key DIDKEY (only a DID or handle SOURCE has a DID document)")
    _note_pure_python(args.command)
    _TERMINATED.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        status = _run(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader of standard output went away (``| head``): stop quietly. Point stdout at
        # /dev/null so that the interpreter's own flush at exit does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        _error(_interruption())
        return _interrupted_status()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return status
