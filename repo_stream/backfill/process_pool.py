"""The backfill spread over local processes (``backfill(..., processes=N)``).

One Python process walks one repo at a time on one core: the C core holds the GIL while it
builds each chunk's items, and fetching, the checkpoint and the sinks are Python. To use more
cores on one machine, :func:`repo_stream.backfill.backfill` with ``processes=N`` walks repos in
``N`` processes: this one and ``N - 1`` worker processes (fresh interpreters, ``python -m
repo_stream.backfill.worker``). Each runs the same bounded executor (its own ``memory_workers``,
``disk_workers``, fetch client and spill stores) over the sources it is handed; this process
runs its own in process, beside what must be single: reading the sources, the checkpoint, and
yielding the results. (A coordinator of its own would be one more interpreter, 30 MB and 0.2 s
of start-up, and the pickling and waking for its share of the results, on a core it leaves
mostly idle.)

**Hand-out.** Sources go one at a time, each to the worker with the fewest in flight (this
process's executor counts as one), and no worker has more than its pipeline holds
(``fetch_concurrency + memory_workers + disk_queue_size + disk_workers + 1``), plus
:data:`_SLACK` for a worker process: a sliding window per worker, so that a worker busy with a
large repo is not given much more while another is idle. The slack covers the time this process
takes to answer a result with the next source (its event loop is busy with its own walking):
without it, a worker process walking small repos waited for sources ~14% of a run (~5% with
it). Each worker has two one-way pipes: sources in, results out, each message a 4-byte length
and a pickle. Both ends wait on their pipes in their event loops (``anyio.wait_readable``), not
in a thread (a thread hop costs ~0.17 ms of CPU, once per source in each worker and once per
result here), and take whatever has arrived with one ``os.read``. The sources a worker holds
also stay under half its pipe's capacity in bytes (any one source may go to a worker that holds
none), so writing a source never blocks this process's event loop while the worker is itself
blocked sending a result.

**Nothing lost.** This process knows which sources each worker holds. A worker process that
exits without finishing (killed, out of memory, crashed) gives an error result for each of them;
the others go on with the rest.

**Stopping.** When the run ends early (the consumer leaves, cancels, or fails, or a Ctrl-C
reaches this process), each worker is sent a stop on its pipe, which cancels its executor as
cancelling an in-process run does (sinks told, fetches and stores closed), and is killed if it
has not exited after :data:`STOP_GRACE` seconds. Workers ignore SIGINT, so a Ctrl-C at the
terminal stops them through this process, never half-way through their own shutdown. The
workers' spill files are unlinked as soon as opened (see ``spill_dir``), so even a worker that
is killed leaves none. A worker whose parent is gone finishes the repos it holds and exits.

Memory: each worker process is a whole interpreter with the library loaded (32 MB of RSS after
its imports) on top of its own
``memory_workers x mem_limit + disk_workers x (mem_limit + disk_cache_mb)``, as is this process.
"""

from __future__ import annotations

import fcntl
import math
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream as ObjectReceiveStream
from anyio.streams.memory import MemoryObjectSendStream as ObjectSendStream

from .results import BackfillResult

__all__ = ["STOP_GRACE", "Executor", "check_picklable", "run_in_processes"]

#: The in-process executor: ``executor(sources, **options)`` yields one result per source.
Executor = Callable[..., AsyncGenerator[BackfillResult, None]]

#: Seconds a worker process has to stop after it is sent a stop before it is killed.
STOP_GRACE = 10.0
#: Bytes of held sources a worker's tasks pipe is given, where its capacity cannot be read.
_PIPE_BUDGET = 8192


#: Sent to a worker to stop it: it cancels its executor (as cancelling an in-process run does).
_STOP = False
#: Sources a worker process may hold beyond its pipeline: those waiting in its pipe while this
#: process is busy. On benchmarks/backfill.py's set three times over (``--list-times 3``: 3,000
#: small repos) 16 took ``processes=2`` from 5.60 to 4.69 s (medians of 5; 4 and 8: ~4.9 s).
_SLACK = 16


class _Frames:
    """The messages arriving on a pipe, framed as :func:`_message` frames them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending = bytearray()

    def read(self) -> list[Any] | None:
        """The messages complete after one read of the pipe (which blocks until it has bytes:
        call it once the pipe is readable); None once it has ended.

        Raises:
            OSError: the pipe cannot be read (closed here).
        """
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        pending = self._pending
        pending += data
        messages = []
        start = 0
        while len(pending) - start >= 4:
            (size,) = struct.unpack_from("!i", pending, start)
            if len(pending) - start - 4 < size:
                break
            messages.append(pickle.loads(pending[start + 4 : start + 4 + size]))
            start += 4 + size
        del pending[:start]
        return messages


class _Room:
    """Wakes the hand-out when an executor may have room again (a result came back)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    def changed(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        """Wait for the next :meth:`changed` (check for room first: one before this call is not
        seen, and none can come between the check and this call, in one event loop)."""
        self._event = anyio.Event()
        await self._event.wait()


class _Worker:
    """A worker process as this process sees it.

    It is ``python -m repo_stream.backfill.worker TASKS_FD RESULTS_FD``, not a ``multiprocessing``
    child: nothing of the caller's ``__main__`` is run again in it (a script without an
    ``if __name__ == "__main__"`` guard works), and its standard streams stay the caller's.
    It gets this process's ``sys.path`` first, then the options, on its tasks pipe.
    """

    def __init__(self, options: bytes) -> None:
        tasks_r, tasks_w = os.pipe()
        results_r, results_w = os.pipe()
        # Started with SIGINT blocked (the mask is inherited through exec): a Ctrl-C at the
        # terminal, which reaches the whole process group, would end it with a traceback while
        # it imports. It then ignores SIGINT: this process stops it with _STOP.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "repo_stream.backfill.worker", str(tasks_r), str(results_w)],
                pass_fds=(tasks_r, results_w),
                stdin=subprocess.DEVNULL,
            )
        except BaseException:
            os.close(tasks_w)  # no worker: this process's ends go too
            os.close(results_r)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            os.close(tasks_r)  # the worker's ends
            os.close(results_w)
        self.tasks = tasks_w  # -1 once closed
        self.results = _Frames(results_r)
        #: Sources handed out and not answered yet (a source may be in it more than once).
        self.held: list[str] = []
        #: Their bytes on the tasks pipe, bounded by ``budget`` (see the module's "Hand-out").
        self.held_bytes = 0
        try:
            self.budget = fcntl.fcntl(tasks_w, fcntl.F_GETPIPE_SZ) // 2  # type: ignore[attr-defined,unused-ignore]
        except (AttributeError, OSError):  # not Linux
            self.budget = _PIPE_BUDGET
        self.finished = False  # answered "done" or "failed", or gone
        _write(self.tasks, _message(list(sys.path)))  # if it is gone already, its collector sees its results pipe end
        _write(self.tasks, _message(options))  # unpickled in the worker once it has this sys.path

    def lost(self, why: str) -> list[BackfillResult]:
        """Error results for the sources it held; it gets no more."""
        self.finished = True
        lost = [BackfillResult(source, None, None, 0, 0, False, 0.0, f"WorkerError: {why}") for source in self.held]
        self.held.clear()
        self.held_bytes = 0
        return lost

    def has_room(self, window: int, size: int) -> bool:
        """Whether it may be handed a source of ``size`` pickled bytes now (``window``: the
        pipeline's; this worker process may hold :data:`_SLACK` more)."""
        if self.finished or len(self.held) >= window + _SLACK:
            return False
        return not self.held or self.held_bytes + size <= self.budget

    def give(self, source: str, message: bytes) -> None:
        """Hand it ``source`` (``message``: as :func:`_message` frames it)."""
        self.held.append(source)  # answered, or failed when its exit is seen
        self.held_bytes += len(message)
        _write(self.tasks, message)

    def end(self) -> None:
        """No more sources."""
        if not self.finished:
            _write(self.tasks, _message(None))

    def gone(self) -> list[BackfillResult]:
        """Its results pipe ended: wait for it to exit; error results for what it held."""
        code = self.process.wait()
        return self.lost(f"worker process {self.process.pid} exited with code {code}")


class _Local:
    """This process's own executor, as the hand-out sees it (a worker that cannot die)."""

    def __init__(self) -> None:
        self.sources_send, self.sources = anyio.create_memory_object_stream[str](math.inf)  # the window bounds it
        self.held: list[str] = []
        self.finished = False

    def has_room(self, window: int, size: int) -> bool:
        return not self.finished and len(self.held) < window

    def give(self, source: str, message: bytes) -> None:
        self.held.append(source)
        self.sources_send.send_nowait(source)

    def end(self) -> None:
        self.sources_send.close()


def check_picklable(options: dict[str, Any]) -> bytes:
    """``options`` pickled, for the worker processes.

    Raises:
        ValueError: something in it (usually the sink) cannot be pickled.
    """
    try:
        return pickle.dumps(options)
    except Exception as exc:
        raise ValueError(f"backfill options must be picklable to go to worker processes (is the sink?): {exc}") from exc


async def run_in_processes(
    todo: ObjectReceiveStream[str],
    results: ObjectSendStream[BackfillResult],
    options: dict[str, Any],
    processes: int,
    window: int,
    executor: Executor,
) -> None:
    """Run every source of ``todo`` in this process and ``processes - 1`` worker processes;
    send one result per source.

    Args:
        todo: the sources to run (the checkpoint's finished ones already taken out).
        results: where each result goes, in completion order.
        options: keyword arguments of :func:`repo_stream.backfill.backfill` for each executor (no
            checkpoint, client, resolver or stats; they must be picklable).
        processes: processes to walk repos in, this one included (>= 2).
        window: sources an executor's pipeline holds: this process's executor holds no more at
            once, a worker process :data:`_SLACK` more.
        executor: the in-process executor this process runs its share with
            (:func:`repo_stream.backfill.backfill`, passed in so that this module does not
            import it; a worker process runs it through :mod:`repo_stream.backfill.worker`).

    Raises:
        ValueError: ``options`` cannot be pickled (a sink that cannot be sent to another process).
    """
    pickled = check_picklable(options)
    workers: list[_Worker] = []
    local = _Local()
    room = _Room()
    try:
        async with todo, results:
            for _ in range(processes - 1):
                workers.append(_Worker(pickled))
            executors: list[_Worker | _Local] = [*workers, local]

            async def hand_out() -> None:
                async for source in todo:
                    message = _message(source)
                    while not (open_ := [e for e in executors if e.has_room(window, len(message))]):
                        await room.wait()
                    executor = min(open_, key=lambda e: len(e.held))
                    executor.give(source, message)
                for executor in executors:
                    executor.end()

            async def walk_here() -> None:
                async with aclosing(executor(local.sources, **options)) as run:
                    async for result in run:
                        local.held.remove(result.source)
                        room.changed()
                        await results.send(result)
                local.finished = True

            async def collect(worker: _Worker) -> None:
                while not worker.finished:
                    await anyio.wait_readable(worker.results.fd)
                    out = _receive(worker)
                    if out:
                        room.changed()
                    for result in out:
                        await results.send(result)
                # It has answered and is exiting (its interpreter's teardown takes ~60 ms): wait
                # for that here, beside this process's own walking, rather than after it in _stop.
                with anyio.move_on_after(STOP_GRACE):
                    await anyio.to_thread.run_sync(worker.process.wait, abandon_on_cancel=True)

            async with anyio.create_task_group() as tg:
                tg.start_soon(hand_out)
                tg.start_soon(walk_here)
                for worker in workers:
                    tg.start_soon(collect, worker)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_stop, workers)


def _message(message: Any) -> bytes:
    """``message`` as it goes on a pipe, either way: a 4-byte big-endian length, then the pickle
    (read back by :class:`_Frames`)."""
    data = pickle.dumps(message)
    return struct.pack("!i", len(data)) + data


def _write(fd: int, message: bytes) -> None:
    """Write a framed message to a blocking pipe; one that is gone (or closed here: ``fd`` -1) is
    seen by its reader's end."""
    try:
        view = memoryview(message)
        while view:  # a signal may cut a write short
            view = view[os.write(fd, view) :]
    except OSError:
        pass


def _receive(worker: _Worker) -> list[BackfillResult]:
    """The results a worker has sent so far (its pipe is readable)."""
    out: list[BackfillResult] = []
    try:
        messages = worker.results.read()
    except OSError:
        messages = None
    if messages is None:
        return worker.gone()
    for kind, value in messages:
        if worker.finished:
            break
        if kind == "result":
            try:
                worker.held.remove(value.source)
                worker.held_bytes -= len(_message(value.source))
            except ValueError:
                pass
            out.append(value)
        elif kind == "done":
            out += worker.lost("worker process ended before answering")  # none, unless it lost track
        else:
            out += worker.lost(f"worker process failed: {value}")
    return out


def _stop(workers: list[_Worker]) -> None:
    """Stop every worker process: those that answered "done" exit by themselves; the others are
    sent _STOP. Any still running after STOP_GRACE seconds is killed."""
    for worker in workers:
        if not worker.finished:
            _write(worker.tasks, _message(_STOP))
    deadline = time.monotonic() + STOP_GRACE
    for worker in workers:
        try:
            worker.process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()
        for fd in (worker.tasks, worker.results.fd):
            os.close(fd)
        worker.tasks = worker.results.fd = -1
