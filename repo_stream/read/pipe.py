"""Standard input as an async byte source that Ctrl-C can always stop.

A blocking ``read`` of a pipe or terminal in a worker thread (what ``anyio.wrap_file`` does) cannot
be abandoned: after Ctrl-C the process would wait, at exit, for that thread's read to return, that
is for input that may never come (``repo-stream stats -`` with an idle writer). A
:class:`PipeReader` instead waits for a pipe, socket or terminal to be readable in the event loop
itself (:func:`anyio.wait_readable`: asyncio and trio) and then reads what is there with one
``os.read``, which does not block; a regular file (``< repo.car``) or a file object without a file
descriptor is read in a worker thread, where a read always returns.
"""

from __future__ import annotations

import codecs
import os
import stat
from collections.abc import AsyncIterator
from typing import BinaryIO

import anyio
import anyio.to_thread

__all__ = ["PipeReader"]

#: Bytes asked for by ``read()`` without a size (and the line reader's chunk).
READ_SIZE = 1 << 16


class PipeReader:
    """An async reader of a binary file object, usually ``sys.stdin.buffer`` (not closed here).

    Args:
        handle: the binary file to read. When it has a file descriptor that is a pipe, socket or
            terminal, reads wait in the event loop (cancellable at once, no thread); otherwise
            they run ``handle.read`` in a worker thread. Reads go to the descriptor, past the
            file object's own read-ahead buffer: nothing must have read through ``handle`` before.
    """

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self._fd: int | None = None
        try:
            fd = handle.fileno()
            mode = os.fstat(fd).st_mode
        except (OSError, ValueError, AttributeError):  # io.BytesIO and the like: no descriptor
            return
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISCHR(mode):
            self._fd = fd

    async def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (``-1``: up to :data:`READ_SIZE`), as soon as some are there;
        ``b""`` at the end of the input.

        Raises:
            OSError: the read failed (the caller names the source).
        """
        want = size if size > 0 else READ_SIZE
        if self._fd is None:
            return await anyio.to_thread.run_sync(self._handle.read, want)
        while True:
            await anyio.wait_readable(self._fd)
            try:
                return os.read(self._fd, want)
            except BlockingIOError:  # a descriptor left non-blocking by someone else, woken early
                continue

    async def lines(self) -> AsyncIterator[str]:
        """The input's lines as text (UTF-8, ``\\n`` kept), the last one even without an end of line.

        Raises:
            UnicodeDecodeError: the input is not UTF-8 text.
            OSError: a read failed.
        """
        decoder = codecs.getincrementaldecoder("utf-8")()
        pending = ""
        while True:
            chunk = await self.read(READ_SIZE)
            text = decoder.decode(chunk, final=not chunk)
            if text:
                pending += text
                *complete, pending = pending.split("\n")
                for line in complete:
                    yield line + "\n"
            if not chunk:
                if pending:
                    yield pending
                return
