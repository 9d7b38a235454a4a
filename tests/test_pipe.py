"""PipeReader: standard input read in the event loop (pipes, terminals) or a worker thread (files),
so that Ctrl-C can stop a command waiting on an idle pipe (see also tests/test_cli.py)."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import anyio
import pytest

from repo_stream.read.pipe import PipeReader


@pytest.mark.anyio
async def test_a_pipe_is_read_as_it_comes_and_ends_with_empty_bytes() -> None:
    read_end, write_end = os.pipe()
    with open(read_end, "rb") as handle:
        reader = PipeReader(handle)
        os.write(write_end, b"abc")
        assert await reader.read(10) == b"abc"  # what is there, without waiting for 10 bytes
        os.write(write_end, b"defgh")
        assert await reader.read(2) == b"de"
        assert await reader.read(-1) == b"fgh"
        os.close(write_end)
        assert await reader.read(10) == b""


@pytest.mark.anyio
async def test_waiting_on_an_idle_pipe_is_cancelled_at_once() -> None:
    read_end, write_end = os.pipe()
    try:
        with open(read_end, "rb") as handle:
            reader = PipeReader(handle)
            started = time.monotonic()
            with anyio.move_on_after(0.2) as scope:
                await reader.read(10)
            assert scope.cancelled_caught and time.monotonic() - started < 2
            os.write(write_end, b"later")  # nothing was lost to the cancelled wait
            assert await reader.read(10) == b"later"
    finally:
        os.close(write_end)


@pytest.mark.anyio
async def test_lines_split_across_reads_and_multibyte_characters() -> None:
    read_end, write_end = os.pipe()
    text = "did:plc:a\n# caf\u00e9\n\nlast without end"
    data = text.encode()
    with open(read_end, "rb") as handle:
        reader = PipeReader(handle)
        lines: list[str] = []

        async def consume() -> None:
            async for line in reader.lines():
                lines.append(line)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            for i in range(len(data)):  # one byte at a time: "\u00e9" is split between two reads
                os.write(write_end, data[i : i + 1])
                await anyio.sleep(0)
            os.close(write_end)
    assert lines == ["did:plc:a\n", "# caf\u00e9\n", "\n", "last without end"]


@pytest.mark.anyio
async def test_lines_that_are_not_utf8_raise() -> None:
    reader = PipeReader(io.BytesIO(b"ok\n\xff\xfe\n"))
    with pytest.raises(UnicodeDecodeError):
        async for _ in reader.lines():
            pass


@pytest.mark.anyio
@pytest.mark.parametrize("kind", ["file", "bytesio"])
async def test_files_and_file_objects_are_read_in_a_thread(kind: str, tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    if kind == "file":
        (tmp_path / "input").write_bytes(data)
        handle = open(tmp_path / "input", "rb")  # closed below
    else:
        handle = io.BytesIO(data)
    with handle:
        reader = PipeReader(handle)  # type: ignore[arg-type]
        assert reader._fd is None
        chunks = []
        while chunk := await reader.read(100_000):
            chunks.append(chunk)
    assert b"".join(chunks) == data and [len(c) for c in chunks] == [100_000, 100_000, 56_000]
