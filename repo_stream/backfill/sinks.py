"""Where a backfill's records go: the :class:`RepoSink` protocol and :class:`JsonlSink`, which
writes each repo's records to a JSON-lines file."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio

from ..core.commit import Commit

__all__ = ["JsonlSink", "RepoSink", "bytes_value", "json_value"]


class RepoSink(Protocol):
    """Receives each repo's records: an async callable ``sink(source, commit, items)``.

    ``items`` is one chunk (a list) of ``(key, cid, value)`` tuples in key order: ``key`` the MST
    key ``collection/rkey``, ``cid`` the record's CID (base32 str), ``value`` the record block's
    raw DAG-CBOR bytes. A sink may also define ``async finish(source, commit, error)``, called
    once per repo whose commit was read, after its last chunk, with ``error`` None on success or
    the exception that ended the repo. A sink that raises fails that repo only.
    """

    def __call__(self, source: str, commit: Commit, items: list[Any]) -> Awaitable[None]: ...


def bytes_value(block: bytes) -> Any:
    """The raw block as ``{"$bytes": base64}`` (atproto's JSON form of bytes), for records that
    need not be decoded."""
    return {"$bytes": base64.b64encode(block).decode("ascii")}


def json_value(block: bytes) -> Any:
    """The default :class:`JsonlSink` value: the record in the atproto JSON form, as ``dump``
    writes it (:func:`repo_stream.records.record_json`). As the sink's ``value`` it is not called:
    the sink writes :func:`repo_stream.records.json_text.transcode_json`'s text instead (the same
    JSON, non-ASCII characters written as UTF-8 rather than ``\\u`` escapes)."""
    from ..records.values import record_json

    return record_json(block)


class JsonlSink:
    """Writes each repo's records to ``DIR/<did>.jsonl``: one ``{"key", "cid", "value"}`` object a
    line, in key order.

    ``value`` converts the record block's bytes to a JSON value (default :func:`json_value`, the
    ``dump`` format; :func:`bytes_value` keeps the raw block).
    A repo is written to ``<did>.jsonl.part`` and renamed when complete; a repo that fails leaves
    no file. Picklable (it holds only the folder and the converter), so cluster workers can use it.
    """

    def __init__(self, directory: str | os.PathLike[str], value: Callable[[bytes], Any] = json_value) -> None:
        self.directory = os.fspath(directory)
        self.value = value
        self._files: dict[tuple[str, str], Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"directory": self.directory, "value": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["value"])  # type: ignore[misc]

    def path(self, did: str) -> str:
        """The output path of ``did``'s records."""
        return os.path.join(self.directory, did.replace("/", "_") + ".jsonl")

    async def __call__(self, source: str, commit: Commit, items: list[Any]) -> None:
        key = (source, commit.did)
        file = self._files.get(key)
        if file is None:
            os.makedirs(self.directory, exist_ok=True)
            file = self._files[key] = await anyio.open_file(self.path(commit.did) + ".part", "w", encoding="utf-8")
        value = self.value
        if value is json_value:  # the C core's transcoder: the record's JSON text, made in one pass
            from ..records.json_text import json_text_processor

            transcode = json_text_processor()
            text = "".join([f'{{"key":"{k}","cid":"{c}","value":{transcode(v)}}}\n' for k, c, v in items])
        else:
            text = "".join(json.dumps({"key": k, "cid": c, "value": value(v)}, separators=(",", ":")) + "\n" for k, c, v in items)
        await file.write(text)

    async def finish(self, source: str, commit: Commit, error: BaseException | None) -> None:
        """Close the repo's file: rename it into place on success, remove it on failure."""
        file = self._files.pop((source, commit.did), None)
        path = self.path(commit.did)
        if file is None:  # an empty repo: no chunk came
            if error is None:
                os.makedirs(self.directory, exist_ok=True)
                await anyio.Path(path).write_text("")
            return
        with anyio.CancelScope(shield=True):
            await file.aclose()
        if error is None:
            os.replace(path + ".part", path)
        else:
            try:
                os.unlink(path + ".part")
            except FileNotFoundError:
                pass
