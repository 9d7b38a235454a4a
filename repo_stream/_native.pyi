"""Type stub of the C core, ``repo_stream._native`` (native/*.c): the same classes and methods as
:class:`repo_stream.core.car.CarParser`, :class:`repo_stream.core.blocks.MemoryBlocks`,
:class:`repo_stream.core.walk.Walker` and :mod:`repo_stream.core.runs`. See :mod:`repo_stream.core.implementation`."""

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

def setup(*, messages: ModuleType, not_a_node: object, cid_text: Callable[[bytes], str]) -> None:
    """Connect the core to repo_stream's Python side (done by repo_stream.core.implementation)."""

def sha256(data: bytes | bytearray | memoryview, /) -> bytes:
    """The core's SHA-256 digest of a bytes-like object (for tests)."""

def load_node(
    cid: bytes, block: bytes, expected: int, lo: bytes | None, hi: bytes | None, check_keys: bool, /
) -> tuple[int, list[bytes], list[bytes], list[Any]]:
    """Decode and check one MST node of a partial tree: (layer, keys, vals, kids) (see repo_stream.sync.partial.load_node)."""

def encode_node(left: bytes | None, keys: list[bytes], vals: list[bytes], rights: list[bytes | None], /) -> tuple[bytes, bytes]:
    """An MST node block and its CID: (cid, block) (see repo_stream.sync.partial.encode_node)."""

def lookup_and_invert(
    root: bytes,
    blocks: dict[bytes, bytes],
    keys: list[bytes],
    ops: list[tuple[int, str, bytes, bytes | None, bytes | None]],
    check_keys: bool,
    max_depth: int,
    /,
) -> tuple[list[Any], Any]:
    """A commit's tree work held in C: (held, inverted) (see repo_stream.sync.invert.lookup_and_invert)."""

def commit_event(
    message: bytes, check_keys: bool, link: Callable[[bytes], Any], max_ops: int, max_blocks: int, max_block: int, max_depth: int, /
) -> tuple[Any, ...] | None:
    """The usual #commit message read in one pass: (did, rev, since, commit, prevData, seq, time, items, record blocks,
    data, sig, unsigned, tree work or None, the rev's TID timestamp or None), or None for any other message (see
    repo_stream.sync.verify.verify_commit). A ``link`` that is a Python class made by ``object.__new__`` (``Link``) gets
    its instances made so, their ``cid_bytes`` set, without ``__init__`` (each CID is a 36-byte dag-cbor sha2-256
    CIDv1, which ``Link`` takes as it is); any other callable is called with the CID bytes."""

def commit_peek(message: bytes, max_ops: int, /) -> tuple[int, str, str, str | None, list[tuple[str, str]]] | None:
    """What a firehose client needs of the usual #commit message without decoding the rest: (seq, repo, rev, time,
    [(action, path), ...]) as decode_frame gives them, or None for any other message (see
    repo_stream.firehose.items.parse_message)."""

def sha256_portable(data: bytes | bytearray | memoryview, /) -> bytes:
    """The same with the portable rounds only, not the CPU's SHA extensions (for tests)."""

def sha256_x2(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview, /) -> tuple[bytes, bytes]:
    """The core's SHA-256 digests of two messages hashed at once, as a pair (for tests)."""

def cid_text(raw: bytes | bytearray | memoryview, /) -> str:
    """The usual text of a binary CID, as repo_stream.core.cid.cid_text (base32 for a CIDv1)."""

def transcode_json(block: bytes | bytearray | memoryview, /) -> str:
    """A record block (strict DAG-CBOR) as its atproto JSON text (see repo_stream.records.json_text.transcode_json)."""

def record_line(
    did: str, rev: str, seq: int | None, action: str, collection: str, rkey: str, cid: str | None, value_text: str, live: bool, /
) -> str | None:
    """A sync RecordEvent's JSON line, as repo_stream.sync.follow.record_line makes it, or None when an argument is
    not the usual kind (a string needing an escape, a seq beyond 64 bits...): the caller makes it in Python then."""

def record_events(
    cls: type[Any], unset: object, did: str, rev: str, seq: int | None, ops: tuple[Any, ...] | list[Any], /
) -> tuple[list[tuple[Any, None]], list[tuple[str, str | None]]]:
    """A verified commit's record events, as repo_stream.sync.service.record_events makes them: (deliveries,
    records); cls a class with RecordEvent's slots (set, its __init__ not called)."""

def arrow_batch(chunk: list[tuple[str, str, Any]], value_kind: int, /) -> tuple[object, object]:
    """A chunk of (key, cid, value) as the Arrow C Data Interface capsules (schema, array) of a record batch."""

def pg_copy_rows(chunk: list[tuple[str, str, bytes]], did: str, rev: str, jsonb: bool, /) -> bytes:
    """PostgreSQL binary COPY rows (did, collection, rkey, cid, rev, value) of (key, cid, block) items (see repo_stream.backfill.stores.pg_copy_rows)."""

def trim_memory() -> None:
    """Hand freed heap memory back to the OS now (glibc's malloc_trim; nothing elsewhere)."""

class BlockTable:
    """The C in-memory block table; the same behaviour as repo_stream.core.blocks.MemoryBlocks."""

    def __init__(self, root: bytes, process: Callable[[bytes], Any] | None, encode: Callable[[Any], bytes]) -> None: ...
    @property
    def process(self) -> Callable[[bytes], Any] | None: ...
    @property
    def root(self) -> bytes: ...
    @property
    def used(self) -> int: ...
    @property
    def longest_probe(self) -> int:
        """Slots the longest look-up of a kept CID walks past its home slot (for tests)."""
    def add(self, cid: bytes, block: bytes, /) -> None: ...
    def clear(self) -> None: ...
    def node(self, cid: bytes, /) -> Any: ...
    def raw_block(self, cid: bytes, /) -> bytes | None: ...
    def take_rows(self, max_bytes: int, /) -> tuple[list[tuple[bytes, int, Any]], int]: ...
    def take_run(self, max_bytes: int, next_large: int, /) -> tuple[bytes, list[tuple[int, bytes]], int]: ...

def pack_run(rows: Any, next_large: int, /) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Pack spill rows into one sorted run; the same bytes as repo_stream.core.runs.pack_run."""

class RunIndex:
    """Finds entries in a merged run; the same as repo_stream.core.runs.RunIndex."""

    @property
    def total(self) -> int: ...
    def __len__(self) -> int: ...
    def attach(self, segments: Any, segment_size: int, /) -> None: ...
    def get(self, cid: bytes, /) -> tuple[int, Any] | None: ...
    def get_many(self, cids: Any, /) -> tuple[list[tuple[int, Any] | None], int, int]: ...

class RunMerge:
    """Merges sorted runs fed a piece at a time; the same as repo_stream.core.runs.RunMerge."""

    def __init__(self, n: int, index_every: int = ..., split: bool = ...) -> None: ...
    def feed(self, i: int, data: bytes, /) -> None: ...
    def step(self, out_max: int, /) -> bytes | tuple[int, bytes] | int | None: ...
    def index(self) -> RunIndex | tuple[RunIndex, RunIndex]: ...

class CarParser:
    """The C sans-IO CAR v1 parser; the same methods and errors as repo_stream.core.car.CarParser."""

    def __init__(self, max_block_size: int = ..., verify_cids: bool = ...) -> None: ...
    @property
    def blocks_read(self) -> int: ...
    @property
    def bytes_fed(self) -> int: ...
    @property
    def max_block_size(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def verify_cids(self) -> bool: ...
    @property
    def want(self) -> int: ...
    def feed(self, data: bytes, /) -> None: ...
    def finish(self) -> None: ...
    def load_into(self, table: BlockTable, limit: int, /) -> bool: ...
    def next_sections(self) -> list[tuple[bytes, bytes]]: ...
    def sections_into(self, blocks: dict[bytes, bytes], /) -> int: ...
    def read_header(self) -> bytes | None: ...

class Walker:
    """The C MST walker; the same behaviour and errors as repo_stream.core.walk.Walker."""

    def __init__(
        self,
        root: bytes,
        nodes: Any,
        values: Any = ...,
        *,
        max_depth: int = ...,
        strict: bool = ...,
        record_cids: bool = ...,
        collections: Iterable[str] | None = ...,
        record_type: type | None = ...,
    ) -> None: ...
    @property
    def done(self) -> bool: ...
    @property
    def records(self) -> int: ...
    @property
    def value_bytes(self) -> int: ...
    @property
    def nodes_visited(self) -> int: ...
    def abandon(self) -> None: ...
    def next_chunk(self, n: int, /) -> list[tuple[Any, ...]] | None: ...
    def next_batch(self, n: int, value_kind: int, max_bytes: int, /) -> tuple[object, object] | bytes | None:
        """Up to n records as the Arrow C Data Interface capsules (schema, array) of a record
        batch (value_kind 0 raw blocks, 1 JSON text), or as JSON lines (value_kind 2: bytes);
        None at the end (repo_stream.core.walk.Walker.next_batch)."""
