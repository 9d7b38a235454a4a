"""Fetch repo CARs over HTTP (``com.atproto.sync.getRepo``), streamed into ``load_car``.

:func:`fetch_car` streams one URL (normally a PDS's ``/xrpc/com.atproto.sync.getRepo?did=DID``,
see :func:`repo_url`) as an async iterable of ``bytes`` chunks that
:meth:`repo_stream.DriverBuilder.load_car` reads directly; the body is never held whole. It
retries on HTTP 429 and 5xx and on connection failures before the body starts, honouring
``Retry-After``, and enforces connect, read and total deadlines, a minimum rate and a size cap on
the decoded body (see :class:`FetchOptions`; bodies are read as :mod:`repo_stream.net.http` says:
gzip at most, decoded in bounded steps). To open a DID, a handle or any other SOURCE string, use
:func:`repo_stream.net.source.open_source`.

Example::

    async with fetch_car(repo_url("https://pds.example.com", did), did=did) as stream:
        driver = await DriverBuilder().load_car(stream)   # read inside the block

Spec: atproto.com/specs/sync ("com.atproto.sync.getRepo"), atproto.com/specs/xrpc (error bodies,
``Retry-After``).
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from urllib.parse import quote

import anyio
import httpx

from ..errors import FetchError, SourceError
from .hosts import HostLimiter, HostSlot
from .http import BodyError, body_chunks, describe_error, read_snippet, send
from .http import codings as _codings
from .identity import _client_scope, _http_url

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MIN_RATE",
    "DEFAULT_TOTAL_TIMEOUT",
    "CarStream",
    "FetchOptions",
    "fetch_car",
    "PROOF_MAX_BYTES",
    "fetch_record_proof",
    "parse_ratelimit_reset",
    "parse_retry_after",
    "record_url",
    "repo_url",
]

DEFAULT_MAX_BYTES = 4 * 1024**3
"""Default size cap of a fetched CAR: 4 GiB (the largest real repos are a few hundred MB)."""
DEFAULT_TOTAL_TIMEOUT = 3600.0
"""Default absolute deadline of one fetch, seconds (1 hour), retries and body included."""
DEFAULT_MIN_RATE = 64 * 1024
"""Default slowest average body rate accepted after the grace period, bytes per second (64 KiB/s)."""

PROOF_MAX_BYTES = 4 * 1024 * 1024
"""Size cap of a ``getRecord`` proof CAR: 4 MiB (a path of MST nodes and one record: a few KB)."""

_ERROR_BODY_BYTES = 4096  # how much of an error response is read for its message
_CAR_MEDIA_TYPE = "application/vnd.ipld.car"


@dataclass(frozen=True)
class FetchOptions:
    """How :func:`fetch_car` and :func:`open_source` fetch over HTTP. Times are in seconds.

    Every fetch has a deadline: ``total_timeout`` at the latest, and sooner for a slow body:
    once the response has started, the body must have averaged ``min_rate`` bytes per second
    after its first ``grace`` seconds, so a body of N bytes has ``grace + N / min_rate`` seconds
    (a 100 MB repo at the defaults: 30 s + 25 min). A server that stalls or drips a byte now and
    then fails at that time, not at the next byte.

    Attributes:
        connect_timeout: to establish a connection (default 10).
        read_timeout: the longest wait for the response headers or for any next piece of the
            body (default 30).
        total_timeout: the whole fetch, retries and body included (default 3600); None: no
            absolute limit (the rate rule still applies).
        min_rate: the slowest average body rate accepted after ``grace``, bytes per second
            (default 64 KiB/s); None: no rate rule.
        grace: seconds of the body not held to ``min_rate`` (default 30).
        max_bytes: the largest body accepted, in bytes as decoded (default 4 GiB); None for no
            limit. A larger identity ``Content-Length`` is refused before the body is read; a
            body that grows past it raises as soon as the excess is decoded.
        retries: extra attempts after a 429, a 5xx or a connection failure before the headers
            (default 3; 0 disables retrying), within ``total_timeout``. A timeout waiting for
            the headers is retried once at most; never retried: other statuses, a malformed or
            oversize answer, failures mid-body.
        backoff: the wait before the first retry (default 0.5); it doubles per retry, up to
            ``max_backoff`` (default 30), each wait drawn between half and all of that.
        max_retry_after: the longest ``Retry-After`` honoured (default 60). A server asking
            for a longer wait fails the fetch at once, with ``FetchError.retry_after`` set, so
            the caller can come back later.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float | None = DEFAULT_TOTAL_TIMEOUT
    min_rate: float | None = DEFAULT_MIN_RATE
    grace: float = 30.0
    max_bytes: int | None = DEFAULT_MAX_BYTES
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 60.0


def repo_url(pds: str, did: str) -> str:
    """The ``com.atproto.sync.getRepo`` URL of ``did``'s repo on ``pds`` (a base URL)."""
    return f"{pds.rstrip('/')}/xrpc/com.atproto.sync.getRepo?did={quote(did, safe=':')}"


def record_url(pds: str, did: str, key: str) -> str:
    """The ``com.atproto.sync.getRecord`` URL of the record ``key`` (``collection/rkey``) of
    ``did``'s repo on ``pds`` (a base URL)."""
    collection, _, rkey = key.partition("/")
    return (
        f"{pds.rstrip('/')}/xrpc/com.atproto.sync.getRecord?did={quote(did, safe=':')}"
        f"&collection={quote(collection, safe='')}&rkey={quote(rkey, safe='')}"
    )


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delay-seconds or an HTTP date (RFC 9110,
    section 10.2.3). A date in the past gives 0.0; a missing or unparsable value gives None.
    ``now`` (aware) defaults to the current time."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def parse_ratelimit_reset(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``RateLimit-Reset`` header, read on a 429 answer without
    ``Retry-After``: Bluesky's hosts send the Unix time (seconds) of the window's reset, the IETF
    draft (draft-ietf-httpapi-ratelimit-headers) a number of seconds; a value over 10^9 is read
    as a Unix time. A time in the past gives 0.0; a missing or unparsable value gives None.
    ``now`` (Unix seconds) defaults to the current time."""
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 15:
        return None
    seconds = int(value)
    if seconds > 1_000_000_000:
        return max(0.0, seconds - (time.time() if now is None else now))
    return float(seconds)


def _describe(url: str, did: str | None) -> str:
    if not did:
        return f"GET {url}"
    method = "getRecord" if "/xrpc/com.atproto.sync.getRecord?" in url else "getRepo"
    return f"{method} of {did} from {url}"


class CarStream:
    """The body of a successful response, as an async iterable of ``bytes`` chunks.

    Pass it to :meth:`repo_stream.DriverBuilder.load_car`. It can be iterated once. Chunks come
    as the network delivers them (typically up to 64 KiB). While iterating it raises
    :class:`FetchError` when the body passes ``max_bytes`` or ``total_timeout``, or when the
    connection fails, times out or ends before ``Content-Length`` bytes; the CAR reader wraps
    that in a ``SourceError``, which :func:`fetch_car` unwraps back to the ``FetchError`` when it
    leaves its ``async with`` block.

    Attributes:
        url: the URL requested (str). did: the DID asked for, or None.
        status: the HTTP status (2xx). content_length: the declared body size in bytes, or None.
        bytes_received: body bytes read so far. attempts: requests made (1 + retries used).
        error: the FetchError raised while iterating, if any.
    """

    def __init__(
        self, response: httpx.Response, *, url: str, did: str | None, options: FetchOptions, deadline: float | None, attempts: int
    ) -> None:
        self.url = url
        self.did = did
        self.status = response.status_code
        length = response.headers.get("content-length", "")
        encoded = response.headers.get("content-encoding", "identity").strip().lower() not in ("", "identity")
        self.content_length: int | None = int(length) if length.isascii() and length.isdigit() and not encoded else None
        self.bytes_received = 0
        self.attempts = attempts
        self.error: FetchError | None = None
        self._response = response
        self._options = options
        self._deadline = deadline
        self._consumed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._consumed:
            raise FetchError(
                f"{_describe(self.url, self.did)}: the response body can be read only once", url=self.url, did=self.did
            )
        self._consumed = True
        return self._chunks()

    def _fail(self, message: str) -> FetchError:
        self.error = FetchError(f"{_describe(self.url, self.did)}: {message}", url=self.url, did=self.did, status=self.status)
        return self.error

    def _next_by(self, started: float) -> Callable[[int], float | None]:
        """When the next piece of the body must arrive, given the bytes decoded so far."""
        options = self._options
        deadline = self._deadline

        def next_by(received: int) -> float | None:
            by = deadline
            if options.min_rate is not None and options.min_rate > 0:
                by_rate = started + options.grace + received / options.min_rate
                by = by_rate if by is None else min(by, by_rate)
            return by

        return next_by

    def _count(self, size: int) -> None:
        self.bytes_received += size

    async def _chunks(self) -> AsyncIterator[bytes]:
        options = self._options
        started = time.monotonic()
        try:
            async for chunk in body_chunks(
                self._response, max_bytes=options.max_bytes, next_by=self._next_by(started), on_piece=self._count
            ):
                yield chunk
        except BodyError as exc:
            message = str(exc)
            if message.startswith("deadline"):
                elapsed = time.monotonic() - started
                if self._deadline is not None and time.monotonic() >= self._deadline - 0.01:
                    message = f"not finished within the total timeout of {options.total_timeout:g} s, after {self.bytes_received} bytes (total_timeout)"
                else:
                    message = (
                        f"too slow: {self.bytes_received} bytes in {elapsed:.1f} s, under the {options.min_rate or 0:g} bytes/s "
                        f"average required after {options.grace:g} s (min_rate, grace)"
                    )
            elif "size cap" in message:
                message = f"{message} (max_bytes)"
            raise self._fail(message) from None
        except httpx.HTTPError as exc:
            error = self._fail(f"the body was cut off after {self.bytes_received} bytes: {_failure(exc, self._options)}")
            raise error from exc


async def _error_detail(response: httpx.Response, read_timeout: float) -> tuple[str, str | None]:
    """``(": Error: message", "Error")`` from an XRPC error body (or a text snippet, with its
    content type, and None); reads at most 4 KiB."""
    content_type = response.headers.get("content-type", "no content type")
    text = (await read_snippet(response, _ERROR_BODY_BYTES, read_timeout)).decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed.get("message")
        name: str = parsed["error"]
        return f": {name}" + (f": {message}" if isinstance(message, str) and message else ""), name
    snippet = "".join(ch if ch.isprintable() else "?" for ch in " ".join(text.split())[:200])
    return (f" ({content_type}): {snippet}" if snippet else f" ({content_type})"), None


def _backoff(options: FetchOptions, retry: int) -> float:
    delay = min(options.max_backoff, options.backoff * 2.0 ** (retry - 1))
    return delay * random.uniform(0.5, 1.0)


def _failure(exc: httpx.HTTPError, options: FetchOptions) -> str:
    """``"ClassName: detail"``; a timeout with no message says which limit passed."""
    if str(exc).strip():
        return describe_error(exc)
    if isinstance(exc, httpx.ConnectTimeout):
        return (
            f"{type(exc).__name__}: no connection within the connect timeout of {options.connect_timeout:g} s (connect_timeout)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return f"{type(exc).__name__}: no answer within the read timeout of {options.read_timeout:g} s (read_timeout)"
    return describe_error(exc)


def _retryable(exc: httpx.HTTPError) -> bool:
    """Whether a failure before the headers may succeed on another try: a connection that could
    not be made or was dropped, not an answer that was malformed or too large."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.ReadError | httpx.WriteError):
        return True
    return isinstance(exc, httpx.RemoteProtocolError) and "disconnected" in str(exc).lower()


async def _open_response(
    http: httpx.AsyncClient,
    url: str,
    did: str | None,
    options: FetchOptions,
    deadline: float | None,
    unsupported: tuple[int, ...] = (),
    slot: HostSlot | None = None,
) -> tuple[httpx.Response, int]:
    """Send the request, retrying as :class:`FetchOptions` says; the 2xx response, body unread.
    Statuses in ``unsupported`` (5xx meaning "not implemented") fail at once, not retried.
    With a host ``slot``, each attempt waits for :meth:`HostSlot.ready` (within the deadline),
    and a 429 or 503 with ``Retry-After`` blocks the host (:meth:`HostSlot.retry_after`)."""
    try:
        return await _attempts(http, url, did, options, deadline, unsupported, slot)
    except BaseException:
        if slot is not None:
            slot.attempt_failed()
        raise


async def _attempts(
    http: httpx.AsyncClient,
    url: str,
    did: str | None,
    options: FetchOptions,
    deadline: float | None,
    unsupported: tuple[int, ...],
    slot: HostSlot | None,
) -> tuple[httpx.Response, int]:
    what = _describe(url, did)
    timeout = httpx.Timeout(options.read_timeout, connect=options.connect_timeout)
    attempt = 0
    header_timeouts = 0

    def fail(message: str) -> FetchError:
        return FetchError(f"{what}: {message}", url=url, did=did)

    while True:
        attempt += 1
        retry_after: float | None = None
        status: int | None = None
        try:
            left = None if deadline is None else deadline - time.monotonic()
            with anyio.fail_after(left) if left is not None else _unbounded():
                if slot is not None:
                    await slot.ready()
                response = await send(http, url, headers={"Accept": _CAR_MEDIA_TYPE}, timeout=timeout, fail=fail)
        except TimeoutError:
            raise FetchError(
                f"{what}: no answer within the total timeout of {options.total_timeout:g} s (total_timeout)", url=url, did=did
            ) from None
        except httpx.HTTPError as exc:
            failure = _failure(exc, options)
            cause: Exception = exc
            if isinstance(exc, httpx.ReadTimeout | httpx.PoolTimeout | httpx.WriteTimeout):
                header_timeouts += 1
                if header_timeouts > 1:  # a server that did not answer twice will not: stop
                    raise FetchError(f"{what}: {failure} (after {attempt} attempts)", url=url, did=did) from exc
            elif not _retryable(exc):
                raise FetchError(f"{what}: {failure}", url=url, did=did) from exc
        else:
            status = response.status_code
            if 200 <= status < 300:
                await _check_answer(response, what, url, did, options)
                return response, attempt
            detail, xrpc_error = await _error_detail(response, options.read_timeout)
            failure = f"HTTP {status}{detail}"
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if retry_after is None and status == 429:
                retry_after = parse_ratelimit_reset(response.headers.get("ratelimit-reset"))
            if slot is not None and retry_after is not None and status in (429, 503):
                slot.retry_after(retry_after)  # capped at the limiter's max_retry_after
            if (status != 429 and status < 500) or status in unsupported:
                raise FetchError(f"{what}: {failure}", url=url, did=did, status=status, xrpc_error=xrpc_error)
            cause = FetchError(failure)
            if retry_after is not None and retry_after > options.max_retry_after:
                raise FetchError(
                    f"{what}: {failure}; the server asks to retry after {retry_after:g} s, more than the "
                    f"{options.max_retry_after:g} s allowed (max_retry_after)",
                    url=url,
                    did=did,
                    status=status,
                    retry_after=retry_after,
                )
        delay = max(_backoff(options, attempt), retry_after or 0.0)
        if attempt > options.retries:
            tries = f" (after {attempt} attempts)" if attempt > 1 else ""
            raise FetchError(f"{what}: {failure}{tries}", url=url, did=did, status=status, retry_after=retry_after) from cause
        if deadline is not None and time.monotonic() + delay > deadline:
            raise FetchError(
                f"{what}: {failure}; no time left for a retry within the total timeout of {options.total_timeout:g} s",
                url=url,
                did=did,
                status=status,
                retry_after=retry_after,
            ) from cause
        if slot is not None:
            slot.attempt_failed()
        await anyio.sleep(delay)


async def _check_answer(response: httpx.Response, what: str, url: str, did: str | None, options: FetchOptions) -> None:
    """Refuse a 2xx answer that cannot be a CAR: an HTML (or other text) page, a refused
    content coding, or an identity ``Content-Length`` over the cap. Closes it when refusing."""
    status = response.status_code
    content_type = response.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    problem = None
    if media in ("text/html", "application/xhtml+xml", "application/json"):
        problem = f"HTTP {status} answered with {content_type!r}, not a CAR ({_CAR_MEDIA_TYPE})"
    else:
        try:
            codings = _codings(response)
        except BodyError as exc:
            problem = f"HTTP {status}: {exc}"
        else:
            length = response.headers.get("content-length", "")
            if options.max_bytes is not None and not codings and length.isdigit() and int(length) > options.max_bytes:
                problem = f"Content-Length {length} bytes is over the size cap of {options.max_bytes} bytes (max_bytes)"
    if problem is not None:
        await response.aclose()
        raise FetchError(f"{what}: {problem}", url=url, did=did, status=status)


class _unbounded:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


@asynccontextmanager
async def fetch_car(
    url: str,
    *,
    did: str | None = None,
    client: httpx.AsyncClient | None = None,
    options: FetchOptions | None = None,
    allow_private_hosts: bool = False,
    limiter: HostLimiter | HostSlot | None = None,
) -> AsyncIterator[CarStream]:
    """Open ``url`` (e.g. ``https://PDS/xrpc/com.atproto.sync.getRepo?did=DID``) and yield its
    body as a :class:`CarStream` for ``load_car``. Use as ``async with``; read the body inside.

    Waits for a 2xx response first, retrying on 429 and 5xx and on connection failures (see
    :class:`FetchOptions`). Up to 5 redirects to http(s) URLs are followed, never from https to
    http. The response is closed on exit.

    Args:
        url: an ``http://`` or ``https://`` URL.
        did: the DID whose repo this is, for error messages (optional).
        client: the HTTP client (default: a new one, closed on exit).
        options: timeouts, size cap and retry policy (default :class:`FetchOptions()`).
        allow_private_hosts: without a ``client``, connect to any address. By default the
            client made here connects to ``url``'s own host and port as given (the caller named
            it) and only to public unicast addresses for any other host (redirect targets);
            see :mod:`repo_stream.net.guard`.
        limiter: per-host politeness (:mod:`repo_stream.net.hosts`): a :class:`HostLimiter`
            (a slot at ``url``'s host is waited for and held until the response is closed,
            on exit), or a :class:`HostSlot` the caller holds (and releases). Each attempt then
            waits for the host's rate and ``Retry-After``, and a 429 or 503 with
            ``Retry-After`` blocks the host for every fetch sharing the limiter.

    Raises:
        FetchError: on opening: a 4xx other than 429 (the XRPC ``error`` and ``message`` are
            quoted), 429/5xx or connection failures once retries are spent, a ``Retry-After`` over
            ``max_retry_after``, a ``Content-Length`` over ``max_bytes``, an HTML or JSON answer,
            a refused content coding, a refused redirect or private address; on reading
            (surfacing from the ``async with`` block): the decoded body passing ``max_bytes``,
            the deadline (``total_timeout``, ``min_rate``), a read timeout, a corrupt
            compressed body, or the connection cut before the body's end. Messages name the
            DID, URL and HTTP status.
    """
    options = options or FetchOptions()
    if _http_url(url) is None:
        raise FetchError(f"{_describe(url, did)}: not a valid http(s) URL", url=url, did=did)
    deadline = None if options.total_timeout is None else time.monotonic() + options.total_timeout
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(
            _client_scope(client, allow_private_hosts=allow_private_hosts, trusted=(url,) if client is None else ())
        )
        slot = limiter if not isinstance(limiter, HostLimiter) else await _host_slot(stack, limiter, url, did, options, deadline)
        response, attempts = await _open_response(http, url, did, options, deadline, slot=slot)
        stream = CarStream(response, url=url, did=did, options=options, deadline=deadline, attempts=attempts)
        try:
            yield stream
        except SourceError as exc:
            error = stream.error
            if error is not None and exc.__cause__ is error:
                raise error from error.__cause__  # the CAR reader wrapped our FetchError: unwrap it
            raise
        finally:
            await response.aclose()


async def _host_slot(
    stack: AsyncExitStack, limiter: HostLimiter, url: str, did: str | None, options: FetchOptions, deadline: float | None
) -> HostSlot:
    """A slot at ``url``'s host, released by ``stack``, waited for within the fetch's deadline."""
    try:
        with anyio.fail_after(None if deadline is None else deadline - time.monotonic()):
            return await stack.enter_async_context(limiter.slot(url))
    except TimeoutError:
        raise FetchError(
            f"{_describe(url, did)}: no free request slot at its host within the total timeout of {options.total_timeout:g} s "
            "(the host's per-host concurrency limit)",
            url=url,
            did=did,
        ) from None


def _unsupported(error: FetchError) -> bool:
    """Whether a failed ``getRecord`` says the PDS does not serve the method: HTTP 501, an
    XRPC ``MethodNotImplemented`` (or ``MethodNotFound``), or a 404 that is not an XRPC answer
    about the record or repo (a route the server does not know)."""
    if error.status == 501 or error.xrpc_error in ("MethodNotImplemented", "MethodNotFound"):
        return True
    return error.status == 404 and error.xrpc_error not in _ABOUT_THE_RECORD


_ABOUT_THE_RECORD = ("RecordNotFound", "RepoNotFound", "RepoTakendown", "RepoSuspended", "RepoDeactivated")


async def fetch_record_proof(
    pds: str,
    did: str,
    key: str,
    *,
    client: httpx.AsyncClient | None = None,
    options: FetchOptions | None = None,
    allow_private_hosts: bool = False,
    max_bytes: int = PROOF_MAX_BYTES,
) -> bytes | None:
    """The record proof CAR of ``key`` in ``did``'s repo from its PDS
    (``com.atproto.sync.getRecord``), unverified: check it with
    :func:`repo_stream.sync.verify_record_proof`.

    The request follows :class:`FetchOptions` (deadlines, retries, redirects, the address
    guard) like :func:`fetch_car`, with the body capped at ``max_bytes`` (default
    :data:`PROOF_MAX_BYTES`, 4 MiB; ``options.max_bytes`` when smaller).

    Args:
        pds: the PDS base URL (from the DID document).
        did: the account.
        key: the record's repo key, ``collection/rkey``.
        client: the HTTP client (default: a new one, closed on return), as for :func:`fetch_car`.
        options: timeouts and retries, as for :func:`fetch_car`; ``max_bytes`` lowers the cap.
        allow_private_hosts: as for :func:`fetch_car`.
        max_bytes: the largest proof accepted, bytes as decoded.

    Returns:
        The CAR bytes, or None when the PDS does not serve ``getRecord`` (HTTP 501, an XRPC
        ``MethodNotImplemented``, or a 404 that is not about the record or repo): fetch the
        whole repo instead.

    Raises:
        FetchError: as :func:`fetch_car` (e.g. an XRPC ``RecordNotFound``, whose ``xrpc_error``
            attribute says so; a body over the cap; a deadline passed).

    Spec: lexicon ``com.atproto.sync.getRecord``; atproto.com/specs/xrpc (error bodies).
    """
    options = options or FetchOptions()
    cap = max_bytes if options.max_bytes is None else min(max_bytes, options.max_bytes)
    options = replace(options, max_bytes=cap)
    url = record_url(pds, did, key)
    if _http_url(url) is None:
        raise FetchError(f"{_describe(url, did)}: not a valid http(s) URL", url=url, did=did)
    deadline = None if options.total_timeout is None else time.monotonic() + options.total_timeout
    async with _client_scope(client, allow_private_hosts=allow_private_hosts) as http:
        try:
            response, attempts = await _open_response(http, url, did, options, deadline, unsupported=(501,))
        except FetchError as exc:
            if _unsupported(exc):
                return None
            raise
        stream = CarStream(response, url=url, did=did, options=options, deadline=deadline, attempts=attempts)
        try:
            return b"".join([chunk async for chunk in stream])
        finally:
            await response.aclose()
