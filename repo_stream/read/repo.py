"""The high-level API: open a repo from whatever names it and iterate its records, spilling to
disk by itself when the repo is larger than the memory limit.

Example::

    import anyio
    import repo_stream

    async def main() -> None:
        async with repo_stream.open_repo("alice.example.com", collections=["app.bsky.feed.post"]) as repo:
            print(repo.did, repo.rev)
            async for record in repo:                  # Record(key, collection, rkey, cid, value)
                print(record.rkey, record.value["text"])

    anyio.run(main)

:func:`open_repo` is :class:`~repo_stream.DriverBuilder` plus the ``NeedDisk`` branch plus
:func:`~repo_stream.net.source.open_source`, with their resources tied to one ``async with``:
the fetch, the file and the spill store are closed on exit, on error and on cancellation, and a
temporary spill store leaves no file. :func:`get_record` reads one record. The synchronous forms
are in :mod:`repo_stream.read.blocking`.

Spec: atproto.com/specs/repository (records are the MST's ``collection/rkey`` keys, in key order).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Literal, NamedTuple, TypeVar, overload

import anyio

from ..core.commit import Commit
from ..core.mst import is_valid_key
from ..errors import InvalidKeyError, RecordDecodeError
from ..spill.store import DiskBuilder, DiskStore
from .drivers import DEFAULT_MEM_LIMIT_MB, DiskDriver, DriverBuilder, MemoryDriver, NeedDisk

if TYPE_CHECKING:
    import dns.asyncresolver
    import httpx
    import pyarrow

    from ..net.fetch import FetchOptions
    from ..net.source import OpenedSource
    from ..records.values import JsonValue, RecordValue

__all__ = ["CHUNK_SIZE", "Record", "Repo", "RepoSource", "Values", "get_record", "open_repo"]

V = TypeVar("V")
U = TypeVar("U")

#: Records per chunk the high-level API asks the walk for (one anyio checkpoint, or on disk one
#: thread hop, per chunk).
CHUNK_SIZE = 1024

#: How record values are given: ``"raw"`` (the record block's DAG-CBOR bytes), ``"json"`` (the
#: atproto JSON form, :func:`repo_stream.records.record_json`), ``"python"`` (Python values with
#: :class:`~repo_stream.records.Link` and ``bytes``, :func:`repo_stream.records.decode_record`), or
#: ``"json_text"`` (the JSON form as text, a ``str``: :mod:`repo_stream.records.json_text`), or a
#: callable ``(bytes) -> value`` of your own (a block processor).
Values = Literal["raw", "json", "python", "json_text"]

#: What :func:`open_repo` reads: a SOURCE string (a path, ``-``, a getRepo URL, a DID, a handle, an
#: ``at://`` URI; see :func:`repo_stream.net.source.open_source`), a path object, the CAR's bytes,
#: an open binary file (``open(path, "rb")``), or an async source that
#: :meth:`repo_stream.DriverBuilder.load_car` takes (an anyio ``AsyncFile``, a byte stream, an
#: async iterable of ``bytes`` chunks).
RepoSource = str | os.PathLike[str] | bytes | bytearray | memoryview | Any


class Record(NamedTuple, Generic[V]):
    """One record of a repo, as :func:`open_repo` and :func:`~repo_stream.iter_records` give it.

    A named tuple (cheaper to make than a frozen dataclass: ~0.2 us against ~1 us each), so it
    also unpacks: ``key, collection, rkey, cid, value = record``.

    Attributes:
        key: the MST key, ``collection/rkey``.
        collection: the collection NSID (``app.bsky.feed.post``).
        rkey: the record key (a TID, ``self``, ...).
        cid: the record's CID as a base32 string (``bafyrei...``), or None with
            ``record_cids=False``.
        value: the record as the ``values`` option asked (bytes, JSON form, Python values...).
    """

    key: str
    collection: str
    rkey: str
    cid: str | None
    value: V


class Repo(Generic[V]):
    """An open repo: its commit, and its records in key order (``async for record in repo``).

    Made by :func:`open_repo`; valid inside its ``async with`` block only. Iterate it once.

    Attributes:
        commit: the signed commit (:class:`~repo_stream.Commit`).
        source: the :class:`~repo_stream.net.source.OpenedSource` for SOURCE strings (with the
            resolved identity for DIDs and handles), else None.
        spilled: True if the repo passed the memory limit and is walked from a spill store.
        signature_verified: True if the commit's signature was checked (``verify=True`` with a
            key from the DID document or ``signing_key``).
    """

    def __init__(
        self,
        commit: Commit,
        driver: MemoryDriver[Any] | DiskDriver[Any],
        *,
        source: OpenedSource | None,
        spilled: bool,
        signature_verified: bool,
        record_cids: bool,
    ) -> None:
        self.commit = commit
        self.source = source
        self.spilled = spilled
        self.signature_verified = signature_verified
        self._driver = driver
        self._record_cids = record_cids

    @property
    def did(self) -> str:
        """The repo's DID (the commit's ``did``)."""
        return self.commit.did

    @property
    def rev(self) -> str:
        """The commit's rev (a TID string)."""
        return self.commit.rev

    @property
    def bytes_read(self) -> int:
        """CAR bytes read from the source so far."""
        return self._driver.bytes_read

    @property
    def nodes_visited(self) -> int:
        """MST nodes the walk has expanded so far (fewer with ``collections``)."""
        return self._driver.nodes_visited

    async def next_chunk(self, n: int = CHUNK_SIZE) -> list[Record[V]] | None:
        """The next up to ``n`` records in key order, or None at the end.

        Raises:
            MstError: an MST rule is broken (a subclass says which).
            MissingBlockError: a block the walk needs is not in the CAR.
            ProcessorError: the ``values`` callable or decoder failed on a record; its exception
                is the ``__cause__``.
            DiskError: the spill store failed.
            SourceError: the byte source failed.
            CarError: the rest of the CAR is malformed (a subclass says how).
        """
        chunk: list[Record[V]] | None = await self._driver.next_chunk(n)  # the walk makes Records itself
        return chunk

    async def batches(self, n: int = 65536) -> AsyncIterator[pyarrow.RecordBatch]:
        """Every record in key order, ``n`` at a time, as ``pyarrow.RecordBatch`` es (columns
        ``key``, ``collection`` (dictionary), ``rkey``, ``cid``, ``value``: binary with
        ``values="raw"``, utf8 JSON text with ``values="json_text"``; see
        :mod:`repo_stream.read.arrow`). ``pyarrow.Table.from_batches`` makes one table of them.

        Raises:
            TypeError: the repo was opened with other ``values``, or ``record_cids=False``.
            ImportError: pyarrow is not installed (``pip install 'repo-stream[arrow]'``). And the
            errors of :meth:`next_chunk`.
        """
        if not self._record_cids:
            raise TypeError("batches() needs record CIDs: open the repo with record_cids=True")
        while (batch := await self._driver.next_batch(n)) is not None:
            yield batch

    async def __aiter__(self) -> AsyncIterator[Record[V]]:
        """Every record in strictly increasing key order (the errors of :meth:`next_chunk`)."""
        while (chunk := await self.next_chunk()) is not None:
            for record in chunk:
                yield record


class OpenRepo(Generic[V]):
    """The async context manager :func:`open_repo` returns: ``async with`` it to get the
    :class:`Repo`; leaving the block closes the source and the spill store."""

    def __init__(self, source: RepoSource, builder: DriverBuilder[Any], options: dict[str, Any]) -> None:
        self._source = source
        self._builder = builder
        self._options = options
        self._stack: AsyncExitStack | None = None

    async def __aenter__(self) -> Repo[V]:
        if self._stack is not None:
            raise RuntimeError("open_repo(...) is already entered; call open_repo again for another walk")
        stack = self._stack = AsyncExitStack()
        try:
            return await self._open(stack)
        except BaseException:
            self._stack = None
            await stack.aclose()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            with anyio.CancelScope(shield=True):
                await stack.aclose()

    async def _open(self, stack: AsyncExitStack) -> Repo[V]:
        o = self._options
        opened: OpenedSource | None = None
        source = self._source
        if isinstance(source, str):
            from ..net.source import open_source

            opened = await stack.enter_async_context(
                open_source(
                    source,
                    plc_url=o["plc_url"],
                    client=o["client"],
                    dns_resolver=o["dns_resolver"],
                    options=o["fetch_options"],
                )
            )
            car: Any = opened.source
        elif isinstance(source, os.PathLike):
            car = await anyio.open_file(source, "rb")
            stack.push_async_callback(car.aclose)
        elif isinstance(source, bytes | bytearray | memoryview):
            car = bytes(source)
        elif hasattr(source, "read") and not _is_async_read(source):
            car = anyio.wrap_file(source)  # a plain binary file: its reads go to a worker thread
        else:
            car = source
        driver = await self._builder.load_car(car)
        spilled = isinstance(driver, NeedDisk)
        walk: MemoryDriver[Any] | DiskDriver[Any]
        if isinstance(driver, NeedDisk):
            store: DiskStore = await stack.enter_async_context(
                await DiskBuilder().with_cache_size_mb(o["disk_cache_mb"]).open(directory=o["spill_dir"])
            )
            commit, walk = await driver.finish_loading(store)
        else:
            commit, walk = driver.commit, driver
        if opened is not None:
            opened.check_did(commit.did)
        key = o["signing_key"] or (opened.signing_key if opened is not None else None)
        verified = False
        if o["verify"] and key is not None:
            commit.verify_signature(key)
            verified = True
        return Repo(commit, walk, source=opened, spilled=spilled, signature_verified=verified, record_cids=o["record_cids"])


def _json_map() -> Callable[[bytes], dict[str, JsonValue]]:
    """``values="json"``: :func:`~repo_stream.records.record_json`, and a record must be a map."""
    from ..records.values import record_json

    def process(block: bytes) -> dict[str, JsonValue]:
        value = record_json(block)
        if type(value) is not dict:
            raise _not_a_map(block, value)
        return value

    return process


def _python_map() -> Callable[[bytes], dict[str, RecordValue]]:
    """``values="python"``: :func:`~repo_stream.records.decode_record`, and a record must be a map."""
    from ..records.values import decode_record

    def process(block: bytes) -> dict[str, RecordValue]:
        value = decode_record(block)
        if type(value) is not dict:
            raise _not_a_map(block, value)
        return value

    return process


def _not_a_map(block: bytes, value: object) -> RecordDecodeError:
    return RecordDecodeError(
        f"record block of {len(block)} bytes is a {type(value).__name__}, not a map (atproto data model: a record is a map)"
    )


def _is_async_read(source: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(getattr(source, "read", None))


@overload
def open_repo(
    source: RepoSource,
    *,
    values: Literal["json"] = ...,
    collections: Iterable[str] | None = ...,
    mem_limit_mb: float = ...,
    spill_dir: str | os.PathLike[str] | None = ...,
    disk_cache_mb: int = ...,
    verify: bool = ...,
    signing_key: str | None = ...,
    record_cids: bool = ...,
    plc_url: str | None = ...,
    client: httpx.AsyncClient | None = ...,
    dns_resolver: dns.asyncresolver.Resolver | None = ...,
    fetch_options: FetchOptions | None = ...,
) -> OpenRepo[dict[str, JsonValue]]: ...
@overload
def open_repo(
    source: RepoSource,
    *,
    values: Literal["json_text"],
    collections: Iterable[str] | None = ...,
    mem_limit_mb: float = ...,
    spill_dir: str | os.PathLike[str] | None = ...,
    disk_cache_mb: int = ...,
    verify: bool = ...,
    signing_key: str | None = ...,
    record_cids: bool = ...,
    plc_url: str | None = ...,
    client: httpx.AsyncClient | None = ...,
    dns_resolver: dns.asyncresolver.Resolver | None = ...,
    fetch_options: FetchOptions | None = ...,
) -> OpenRepo[str]: ...
@overload
def open_repo(
    source: RepoSource,
    *,
    values: Literal["raw"],
    collections: Iterable[str] | None = ...,
    mem_limit_mb: float = ...,
    spill_dir: str | os.PathLike[str] | None = ...,
    disk_cache_mb: int = ...,
    verify: bool = ...,
    signing_key: str | None = ...,
    record_cids: bool = ...,
    plc_url: str | None = ...,
    client: httpx.AsyncClient | None = ...,
    dns_resolver: dns.asyncresolver.Resolver | None = ...,
    fetch_options: FetchOptions | None = ...,
) -> OpenRepo[bytes]: ...
@overload
def open_repo(
    source: RepoSource,
    *,
    values: Literal["python"],
    collections: Iterable[str] | None = ...,
    mem_limit_mb: float = ...,
    spill_dir: str | os.PathLike[str] | None = ...,
    disk_cache_mb: int = ...,
    verify: bool = ...,
    signing_key: str | None = ...,
    record_cids: bool = ...,
    plc_url: str | None = ...,
    client: httpx.AsyncClient | None = ...,
    dns_resolver: dns.asyncresolver.Resolver | None = ...,
    fetch_options: FetchOptions | None = ...,
) -> OpenRepo[dict[str, RecordValue]]: ...
@overload
def open_repo(
    source: RepoSource,
    *,
    values: Callable[[bytes], U],
    collections: Iterable[str] | None = ...,
    mem_limit_mb: float = ...,
    spill_dir: str | os.PathLike[str] | None = ...,
    disk_cache_mb: int = ...,
    verify: bool = ...,
    signing_key: str | None = ...,
    record_cids: bool = ...,
    plc_url: str | None = ...,
    client: httpx.AsyncClient | None = ...,
    dns_resolver: dns.asyncresolver.Resolver | None = ...,
    fetch_options: FetchOptions | None = ...,
) -> OpenRepo[U]: ...
def open_repo(
    source: RepoSource,
    *,
    values: Values | Callable[[bytes], Any] = "json",
    collections: Iterable[str] | None = None,
    mem_limit_mb: float = DEFAULT_MEM_LIMIT_MB,
    spill_dir: str | os.PathLike[str] | None = None,
    disk_cache_mb: int = 32,
    verify: bool = False,
    signing_key: str | None = None,
    record_cids: bool = True,
    plc_url: str | None = None,
    client: httpx.AsyncClient | None = None,
    dns_resolver: dns.asyncresolver.Resolver | None = None,
    fetch_options: FetchOptions | None = None,
) -> OpenRepo[Any]:
    """Open a repo for reading its records: ``async with open_repo(SOURCE) as repo:``.

    Loads the CAR into memory up to ``mem_limit_mb``; a larger repo is finished into a temporary
    SQLite spill store (in ``spill_dir``, unlinked as soon as it is open) and walked from there,
    with no change for the caller but :attr:`Repo.spilled`. Everything opened is closed when the
    block ends, however it ends.

    Args:
        source: a :data:`RepoSource`: a SOURCE string (path, ``-``, getRepo URL, DID, handle,
            ``at://`` URI), a path object, the CAR's bytes, an open binary file or an async
            byte source.
        values: how record values are given (:data:`Values`, or a callable ``(bytes) -> U``);
            default ``"json"``. With a callable, the :class:`Repo`'s records are ``Record[U]``.
            ``"json_text"``: each value is the record's JSON text (``str``, made by the C core's
            transcoder, :mod:`repo_stream.records.json_text`), for writing out or
            :meth:`Repo.batches`.
        collections: only these collections' records (NSIDs); only the subtrees that can hold
            them are walked. None: every record.
        mem_limit_mb: the memory limit for kept blocks and values, MiB (default 64, as the
            command line's); past it the repo spills to disk.
        spill_dir: the folder for the spill file (default: the system's temporary folder).
        disk_cache_mb: the spill store's SQLite page cache, MiB.
        verify: check every block against its CID, MST nodes and the commit as canonical
            DAG-CBOR, and the commit's signature when a key is known: ``signing_key``, or the
            DID document's for a DID, handle or ``at://`` SOURCE (:attr:`Repo.signature_verified`
            says whether it was checked).
        signing_key: the account's signing key (``did:key:z...``) to check the signature with.
        record_cids: give each record's CID (:attr:`Record.cid`; default True; False saves the
            base32 encoding of each CID).
        plc_url: as for :func:`repo_stream.net.source.open_source`.
        client: as for :func:`repo_stream.net.source.open_source`.
        dns_resolver: as for :func:`repo_stream.net.source.open_source`.
        fetch_options: as for :func:`repo_stream.net.source.open_source`.

    Returns:
        An async context manager giving a :class:`Repo`.

    Raises:
        ValueError: an option out of range, a collection that is not an NSID, an unknown
            ``values`` name (at once, before anything is opened).
        IdentityError: on entering, a DID or handle SOURCE does not resolve.
        FetchError: on entering, fetching the repo failed.
        SourceError: on entering, the byte source failed.
        CarError: on entering, the CAR framing is malformed (a subclass says how).
        CommitError: on entering, the commit is malformed.
        MissingBlockError: on entering, there is no commit block.
        CidMismatchError: on entering, with ``verify``, a block does not match its CID.
        SignatureError: on entering, with ``verify``, the commit's signature does not verify.
        DiskError: on entering, spilling failed. While iterating: see :meth:`Repo.next_chunk`.
    """
    builder: DriverBuilder[Any] = (
        DriverBuilder()
        .with_mem_limit_mb(mem_limit_mb)
        .with_collections(collections)
        .with_verify_cids(verify)
        .with_record_cids(record_cids)
    )
    if values == "json":
        from ..records.values import JSON_CODEC

        builder = builder.with_block_processor(_json_map()).with_codec(*JSON_CODEC)
    elif values == "python":
        from ..records.values import RECORD_CODEC

        builder = builder.with_block_processor(_python_map()).with_codec(*RECORD_CODEC)
    elif values == "json_text":
        from ..records.json_text import json_text_processor

        builder = builder.with_block_processor(json_text_processor())
    elif callable(values):
        builder = builder.with_block_processor(values)
    elif values != "raw":
        raise ValueError(f"values must be 'raw', 'json', 'python', 'json_text' or a callable, got {values!r}")
    if disk_cache_mb < 1:
        raise ValueError(f"disk_cache_mb must be at least 1, got {disk_cache_mb}")
    builder._record_type = Record  # the walk makes each item a Record (C: no second pass, no per-record Python)
    if signing_key is not None:
        from ..crypto.didkey import parse_did_key

        parse_did_key(signing_key)  # a bad key fails now, not after the whole repo is read
    options = {
        "spill_dir": spill_dir, "disk_cache_mb": disk_cache_mb, "verify": verify, "signing_key": signing_key,
        "record_cids": record_cids, "plc_url": plc_url, "client": client, "dns_resolver": dns_resolver,
        "fetch_options": fetch_options,
    }  # fmt: skip
    return OpenRepo(source, builder, options)


@overload
async def get_record(source: RepoSource, key: str, *, values: Literal["json"] = ..., **options: Any) -> Record[dict[str, JsonValue]] | None: ...
@overload
async def get_record(source: RepoSource, key: str, *, values: Literal["raw"], **options: Any) -> Record[bytes] | None: ...
@overload
async def get_record(
    source: RepoSource, key: str, *, values: Literal["python"], **options: Any
) -> Record[dict[str, RecordValue]] | None: ...
@overload
async def get_record(source: RepoSource, key: str, *, values: Callable[[bytes], U], **options: Any) -> Record[U] | None: ...
async def get_record(
    source: RepoSource,
    key: str,
    *,
    values: Values | Callable[[bytes], Any] = "json",
    **options: Any,
) -> Record[Any] | None:
    """One record of a repo, or None if the repo has no record at ``key``.

    Walks only the MST subtrees that can hold ``key``'s collection, and stops at the key.

    Args:
        source: as for :func:`open_repo`.
        key: ``collection/rkey`` (e.g. ``"app.bsky.actor.profile/self"``).
        values: as for :func:`open_repo`.
        **options: the other keyword arguments of :func:`open_repo`.

    Raises:
        InvalidKeyError: ``key`` is not a valid ``collection/rkey`` (before anything is opened).
        The errors of :func:`open_repo`.
    """
    if not isinstance(key, str) or not is_valid_key(key):
        raise InvalidKeyError(f"not a record key (collection/rkey): {key!r}")
    collection = key.partition("/")[0]
    async with open_repo(source, values=values, collections=[collection], **options) as repo:
        while (chunk := await repo.next_chunk(256)) is not None:
            for record in chunk:
                if record.key == key:
                    return record
                if record.key > key:
                    return None
    return None
