"""Records as Arrow record batches: :func:`record_batch`, behind ``driver.next_batch(n)`` and
``repo.batches(n)``.

A batch has the columns ``key`` (utf8), ``collection`` (dictionary<int32, utf8>), ``rkey``
(utf8), ``cid`` (utf8, the base32 CID) and ``value``: ``binary`` (the record block's DAG-CBOR
bytes) or ``utf8`` (the record's atproto JSON text). The C core's walker writes each record's
key, rkey, CID text and value straight into the columns' buffers as it walks (the value copied
from the block table, or transcoded from DAG-CBOR to JSON text into the buffer: no Python object
per record; ``Walker.next_batch`` in ``native/walk.c``, the buffers in ``native/arrow.c``) and
hands them to pyarrow through the Arrow C Data Interface (plain structs: no Arrow library is
linked into the core; pyarrow only imports them, without copying). The pure-Python reference
(:meth:`repo_stream.core.walk.Walker.next_batch`) gives the same columns as lists, made into the
same batch with pyarrow's constructors (:func:`from_walker`). :func:`record_batch` makes a batch
of a list of walked items (``(key, cid, value)`` tuples or Records) instead.

pyarrow is an extra: ``pip install 'repo-stream[arrow]'``. Spec: Arrow C Data Interface,
https://arrow.apache.org/docs/format/CDataInterface.html.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..core import implementation
from ..core.walk import BatchColumns

if TYPE_CHECKING:
    import pyarrow

__all__ = ["from_walker", "record_batch", "schema"]


def _pyarrow() -> Any:
    try:
        import pyarrow
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("Arrow batches need pyarrow: pip install 'repo-stream[arrow]'") from exc
    return pyarrow


def schema(json_values: bool) -> pyarrow.Schema:
    """The batches' schema: ``value`` is ``utf8`` with ``json_values``, else ``binary``."""
    pa = _pyarrow()
    return pa.schema(
        [
            pa.field("key", pa.utf8(), nullable=False),
            pa.field("collection", pa.dictionary(pa.int32(), pa.utf8()), nullable=False),
            pa.field("rkey", pa.utf8(), nullable=False),
            pa.field("cid", pa.utf8(), nullable=False),
            pa.field("value", pa.utf8() if json_values else pa.binary(), nullable=False),
        ]
    )


class _Capsules:
    """The Arrow PyCapsule interface over the C core's two capsules (read once)."""

    __slots__ = ("_pair",)

    def __init__(self, pair: tuple[object, object]) -> None:
        self._pair = pair

    def __arrow_c_array__(self, requested_schema: object = None) -> tuple[object, object]:
        return self._pair


def _python_batch(chunk: list[tuple[str, str, Any]], json_values: bool) -> pyarrow.RecordBatch:
    pa = _pyarrow()
    value_type = str if json_values else bytes
    for item in chunk:
        if not isinstance(item, tuple) or len(item) not in (3, 5):
            raise TypeError("arrow_batch: items are (key, cid, value) tuples or Records (a walk with record CIDs)")
    chunk = [(item[0], item[3], item[4]) if len(item) == 5 else item for item in chunk]
    for item in chunk:
        for value, what, want in ((item[0], "key", str), (item[1], "cid", str), (item[2], "value", value_type)):
            if not isinstance(value, want):
                raise TypeError(f"arrow_batch: the {what} of an item is {type(value).__name__}, not {want.__name__}")
    keys = [k for k, _, _ in chunk]
    names: list[str] = []
    indices: list[int] = []
    last = None
    rkeys: list[str] = []
    for key in keys:
        collection, _, rkey = key.partition("/")
        if collection != last:
            names.append(collection)
            last = collection
        indices.append(len(names) - 1)
        rkeys.append(rkey)
    columns = [
        pa.array(keys, pa.utf8()),
        pa.DictionaryArray.from_arrays(pa.array(indices, pa.int32()), pa.array(names, pa.utf8())),
        pa.array(rkeys, pa.utf8()),
        pa.array([c for _, c, _ in chunk], pa.utf8()),
        pa.array([v for _, _, v in chunk], pa.utf8() if json_values else pa.binary()),
    ]
    return pa.RecordBatch.from_arrays(columns, schema=schema(json_values))


def from_walker(result: Any, json_values: bool) -> pyarrow.RecordBatch:
    """The ``pyarrow.RecordBatch`` of a walker's ``next_batch`` result: the C core's capsules
    (imported without a copy), or the reference's :class:`~repo_stream.core.walk.BatchColumns`
    (built with pyarrow's constructors: the same batch)."""
    pa = _pyarrow()
    if isinstance(result, BatchColumns):
        columns = [
            pa.array(result.keys, pa.utf8()),
            pa.DictionaryArray.from_arrays(pa.array(result.indices, pa.int32()), pa.array(result.collections, pa.utf8())),
            pa.array(result.rkeys, pa.utf8()),
            pa.array(result.cids, pa.utf8()),
            pa.array(result.values, pa.utf8() if json_values else pa.binary()),
        ]
        return pa.RecordBatch.from_arrays(columns, schema=schema(json_values))
    return pa.record_batch(_Capsules(result))


def record_batch(chunk: list[tuple[str, str, Any]], json_values: bool, *, transcode: bool = False) -> pyarrow.RecordBatch:
    """The records of a walk's chunk as one ``pyarrow.RecordBatch`` (module docstring).

    Args:
        chunk: ``(key, cid, value)`` tuples, as a walk with record CIDs gives them, in key order.
        json_values: the values are JSON text (``str``); else raw blocks (``bytes``).
        transcode: the values are raw blocks (``bytes``) and the ``value`` column is their
            atproto JSON text (``utf8``), transcoded straight into the column's buffer
            (:func:`repo_stream.records.json_text.transcode_json`; no ``str`` per record).
            ``json_values`` is then ignored.

    Raises:
        TypeError: an item is not ``(str, str, bytes)`` (or ``str`` values with ``json_values``).
        RecordDecodeError: with ``transcode``, a block is not strict DAG-CBOR (the transcoder's
            error, naming the block's size and the byte offset).
        OverflowError: a column passes 2 GiB (Arrow's int32 offsets): ask for fewer records.
        ImportError: pyarrow is not installed.
    """
    pa = _pyarrow()
    if implementation.backend().name == "c":
        from .. import _native

        kind = 2 if transcode else 1 if json_values else 0
        batch = pa.record_batch(_Capsules(_native.arrow_batch(chunk, kind)))
    elif transcode:
        from ..records.json_text import json_text_processor

        for item in chunk:
            if not isinstance(item, tuple) or len(item) not in (3, 5) or not isinstance(item[-1], bytes):
                raise TypeError("arrow_batch: items are (key, cid, value) tuples or Records with bytes values")
        text = json_text_processor()
        batch = _python_batch([(item[0], item[-2], text(item[-1])) for item in chunk], True)
    else:
        batch = _python_batch(chunk, json_values)
    return batch
