"""Per-host politeness: at most N requests open at once and R request starts per second for each
host, and a host's ``Retry-After`` (on HTTP 429 or 503) honoured for that host only.

A :class:`HostLimiter` is shared by everything that fetches from PDS hosts in one run (the
backfill executor, the sync service's resyncs). Each fetch takes a :class:`HostSlot` for the host
of its URL (:meth:`HostLimiter.slot`) and holds it until its response is closed: that is the
concurrency limit. Before each request (retries included) it waits on :meth:`HostSlot.ready`: not
before the host's ``Retry-After`` has passed, and at least ``1 / rps`` seconds after the host's
previous request start: that is the rate limit (evenly spaced, no bursts). A 429 or 503 with
``Retry-After`` blocks the host for every slot (:meth:`HostSlot.retry_after`). A fetch waiting for
a busy or blocked host waits alone: other hosts' fetches go on.

A host is the URL's scheme, host name (lower case) and port: ``https://pds.example.com:443``.
The limits apply to the host of the URL asked for (a redirect to another host is paced as its
first host). State is kept per host while a slot is held or the host is blocked or paced; idle
hosts are forgotten, so memory is bounded by the hosts in use.

Runs on anyio (asyncio and trio). One limiter belongs to one event loop.

Example::

    limiter = HostLimiter(concurrency=4, rps=10)
    async with fetch_car(url, did=did, limiter=limiter) as stream:
        ...
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
import httpx

__all__ = ["DEFAULT_HOST_CONCURRENCY", "DEFAULT_HOST_RPS", "HostLimiter", "HostSlot", "host_key"]

DEFAULT_HOST_CONCURRENCY = 4
"""Default requests open at once per host."""
DEFAULT_HOST_RPS = 10.0
"""Default request starts per second per host."""
_PRUNE_AT = 1024  # hosts kept before idle ones are dropped


def host_key(url: str) -> str:
    """The host of ``url`` as the limiter counts it: ``scheme://host:port`` (host lower case,
    the scheme's default port written out). A URL that does not parse is its own key."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return url
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme, 0)
    return f"{parsed.scheme}://{parsed.host.lower()}:{port}"


@dataclass(eq=False)
class _Host:
    """The state of one host."""

    slots: anyio.Semaphore
    next_start: float = 0.0  # monotonic time before which no request may start (rate)
    blocked_until: float = 0.0  # monotonic time of the end of its Retry-After
    holders: int = 0  # slots taken or being waited for


class HostSlot:
    """One fetch's place at a host, from :meth:`HostLimiter.slot`; held until released.

    Attributes:
        host: the host key (:func:`host_key`).
        requests: requests started through :meth:`ready`.
    """

    def __init__(self, limiter: HostLimiter, host: str, state: _Host, gate: anyio.Semaphore | None) -> None:
        self.host = host
        self.requests = 0
        self._limiter = limiter
        self._state = state
        self._gate = gate
        self._gated = False
        self._released = False

    async def ready(self) -> None:
        """Wait until a request to the host may start: its ``Retry-After`` has passed and the
        previous start was at least ``1 / rps`` seconds ago; then count this start. With a gate
        (the backfill executor's bound on open fetches), the gate is taken after the host is
        ready, never while waiting for it, and held until :meth:`attempt_failed` or
        :meth:`release_gate`."""
        state = self._state
        while True:
            now = time.monotonic()
            start = max(now, state.next_start, state.blocked_until)
            if start > now:
                await anyio.sleep(start - now)
                continue
            if self._gate is not None and not self._gated:
                await self._gate.acquire()
                self._gated = True
                now = time.monotonic()
                if max(state.next_start, state.blocked_until) > now:  # the host was taken meanwhile
                    self.release_gate()
                    continue
            state.next_start = now + self._limiter.interval
            self.requests += 1
            return

    def retry_after(self, seconds: float) -> None:
        """Block the host for ``seconds`` (capped at the limiter's ``max_retry_after``), for every
        fetch to it: a 429 or 503 answer's ``Retry-After``. A longer block already set stays."""
        seconds = min(max(0.0, seconds), self._limiter.max_retry_after)
        self._state.blocked_until = max(self._state.blocked_until, time.monotonic() + seconds)

    def attempt_failed(self) -> None:
        """The request started by :meth:`ready` has no response to hand on (an error status,
        a connection failure): give the gate back before any wait for a retry."""
        self.release_gate()

    def release_gate(self) -> None:
        """Give back the gate taken by :meth:`ready`, if held (idempotent)."""
        if self._gated and self._gate is not None:
            self._gated = False
            self._gate.release()

    def drop_gate(self) -> None:
        """Give back the gate, if held, and take it no more: later requests of this slot wait
        only for the host (e.g. a fetch again by a worker that reads it at once)."""
        self.release_gate()
        self._gate = None

    def release(self) -> None:
        """Give the slot (and the gate) back; idempotent."""
        self.release_gate()
        if not self._released:
            self._released = True
            self._limiter._release(self.host, self._state)


class HostLimiter:
    """Per-host concurrency and request-rate limits, and per-host ``Retry-After`` (see the
    module's description). Share one between every fetch of a run.

    Args:
        concurrency: requests (responses) open at once per host, >= 1 (default 4).
        rps: request starts per second per host, > 0 (default 10.0); ``math.inf``: no rate limit.
        max_retry_after: the longest ``Retry-After`` a host is blocked for, seconds (default 60).

    Raises:
        ValueError: ``concurrency`` below 1, ``rps`` not positive, ``max_retry_after`` negative.
    """

    def __init__(
        self, concurrency: int = DEFAULT_HOST_CONCURRENCY, rps: float = DEFAULT_HOST_RPS, *, max_retry_after: float = 60.0
    ) -> None:
        if concurrency < 1:
            raise ValueError(f"per-host concurrency must be at least 1, got {concurrency}")
        if not rps > 0:
            raise ValueError(f"per-host requests per second must be positive, got {rps}")
        if not max_retry_after >= 0:
            raise ValueError(f"max_retry_after must be at least 0, got {max_retry_after}")
        self.concurrency = concurrency
        self.rps = rps
        self.interval = 0.0 if math.isinf(rps) else 1.0 / rps
        self.max_retry_after = max_retry_after
        self._hosts: dict[str, _Host] = {}
        #: The most slots held at once per host key, since the limiter was made (for tests and stats).
        self.peak: dict[str, int] = {}

    def blocked(self, url: str) -> float:
        """Seconds left of the ``Retry-After`` of ``url``'s host (0.0 if it is not blocked)."""
        state = self._hosts.get(host_key(url))
        return 0.0 if state is None else max(0.0, state.blocked_until - time.monotonic())

    def hosts(self) -> int:
        """Hosts with state kept now: in use, blocked, or paced (a request started less than
        ``1 / rps`` seconds ago). Idle hosts are dropped here and whenever 1024 are kept."""
        self._prune()
        return len(self._hosts)

    async def acquire(self, url: str, *, gate: anyio.Semaphore | None = None) -> HostSlot:
        """Wait for a slot at ``url``'s host; the caller must :meth:`HostSlot.release` it.

        ``gate``: a semaphore that :meth:`HostSlot.ready` takes once the host is ready (see there).
        """
        key = host_key(url)
        state = self._hosts.get(key)
        if state is None:
            if len(self._hosts) >= _PRUNE_AT:
                self._prune()
            state = self._hosts[key] = _Host(anyio.Semaphore(self.concurrency))
        state.holders += 1
        try:
            await state.slots.acquire()
        except BaseException:
            state.holders -= 1
            self._forget(key, state)
            raise
        in_use = self.concurrency - state.slots.value
        if in_use > self.peak.get(key, 0):
            if len(self.peak) < 4096 or key in self.peak:
                self.peak[key] = in_use
        return HostSlot(self, key, state, gate)

    @asynccontextmanager
    async def slot(self, url: str, *, gate: anyio.Semaphore | None = None) -> AsyncIterator[HostSlot]:
        """``async with limiter.slot(url) as slot:`` a slot at ``url``'s host, released on exit."""
        held = await self.acquire(url, gate=gate)
        try:
            yield held
        finally:
            held.release()

    def _release(self, key: str, state: _Host) -> None:
        state.holders -= 1
        state.slots.release()
        self._forget(key, state)

    def _prune(self) -> None:
        """Drop every idle host's state (hosts paced or blocked until a time now past)."""
        for key, state in list(self._hosts.items()):
            self._forget(key, state)

    def _forget(self, key: str, state: _Host) -> None:
        """Drop an idle host's state: no slot held or awaited, no wait pending."""
        if state.holders == 0 and max(state.next_start, state.blocked_until) <= time.monotonic() and self._hosts.get(key) is state:
            del self._hosts[key]
