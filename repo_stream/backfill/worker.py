"""A backfill worker process: ``python -m repo_stream.backfill.worker TASKS_FD RESULTS_FD``.

Started by :mod:`repo_stream.backfill.process_pool`: it reads its options and then sources on
``TASKS_FD`` (framed as :func:`~repo_stream.backfill.process_pool._message` frames them), runs the
in-process executor (:func:`repo_stream.backfill.executor.backfill`) over them and writes one
result per source on ``RESULTS_FD``.
"""

from __future__ import annotations

import math
import pickle
import signal
import sys
from contextlib import aclosing
from typing import Any

import anyio

from .executor import backfill
from .process_pool import _STOP, _Frames, _message, _write


def _worker_main(tasks: _Frames, results: int, options: dict[str, Any], early: list[Any]) -> None:
    """A worker process: run the backfill over the sources received on ``tasks`` (``early``:
    those already read with the options).

    ``tasks`` carries sources, then ``None`` (no more), or :data:`_STOP` at any time. Sends on
    the pipe ``results`` ``("result", BackfillResult)`` per source, then ``("done", None)``;
    ``("failed", message)`` if the executor itself fails. If the parent is gone (its pipe ends),
    it stops at once (the executor cancelled: sinks told, fetches closed) and exits.
    """
    async def run() -> None:
        sources_send, sources = anyio.create_memory_object_stream[str](math.inf)  # the parent's window bounds it
        async with anyio.create_task_group() as tg:

            async def read_tasks() -> None:
                # Watches the pipe to the end, even after "no more": its end means the parent is
                # gone (it holds the pipe open until this process exits), and then this process
                # stops at once, as on _STOP, rather than fetching for nobody.
                more = True
                try:
                    messages: list[Any] | None = early
                    while messages is not None:
                        for message in messages:
                            if message is _STOP:
                                tg.cancel_scope.cancel()
                                return
                            if message is None:
                                more = False
                                sources_send.close()
                            elif more:
                                sources_send.send_nowait(message)  # unbounded: the parent's window bounds it
                        await anyio.wait_readable(tasks.fd)
                        messages = tasks.read()
                    tg.cancel_scope.cancel()  # the parent is gone
                finally:
                    sources_send.close()

            tg.start_soon(read_tasks)
            async with aclosing(backfill(sources, **options)) as run:
                async for result in run:
                    _write(results, _message(("result", result)))
            tg.cancel_scope.cancel()  # every source answered: stop watching the pipe

    try:
        anyio.run(run)
        message: tuple[str, str | None] = ("done", None)
    except BaseException as exc:
        message = ("failed", f"{type(exc).__name__}: {' '.join(str(exc).split()) or 'no detail'}")
    _write(results, _message(message))


def _import_http_stack() -> None:
    """Import httpx and httpcore without the optional parts a worker never uses.

    A worker runs on asyncio and has no command line, but httpcore imports trio whenever it is
    installed (to run under trio too: ~70 ms of the worker's start-up) and httpx imports click,
    rich and pygments for its command line (~20 ms). Both are hidden while httpx and httpcore
    import (``import trio`` raises ImportError), then shown again: a sink may import them.
    """
    hidden = [name for name in ("trio", "click") if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        import httpcore  # noqa: F401
        import httpx  # noqa: F401
    finally:
        for name in hidden:
            del sys.modules[name]


def _main(argv: list[str]) -> None:
    """A worker process's entry: ``python -m repo_stream.backfill.process_pool TASKS_FD RESULTS_FD``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C reaches the parent, which stops this one
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # blocked by the parent until now
    tasks = _Frames(int(argv[1]))
    results = int(argv[2])
    try:
        received: list[Any] = []
        while len(received) < 2:  # sys.path, then the options (still pickled), and maybe sources
            messages = tasks.read()
            if messages is None:
                raise EOFError("the parent process is gone")
            received += messages
        path, options, *early = received
        sys.path[:] = path
        _import_http_stack()
        options = pickle.loads(options)  # with the caller's sys.path: the sink's class may be the caller's
    except BaseException as exc:  # e.g. a sink whose class this process cannot import
        _write(results, _message(("failed", f"cannot read its options: {type(exc).__name__}: {' '.join(str(exc).split())}")))
        return
    _worker_main(tasks, results, options, early)


if __name__ == "__main__":
    _main(sys.argv)
