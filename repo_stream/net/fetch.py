"""Fetch repo CARs over HTTP (``com.atproto.sync.getRepo``), streamed into ``load_car``.

:func:`fetch_car` streams one URL (normally a PDS's ``/xrpc/com.atproto.sync.getRepo?did=DID``,
see :func:`repo_url`) as an async iterable of ``bytes`` chunks that
:meth:`repo_stream.DriverBuilder.load_car` reads directly; the body is never held whole. It
retries on HTTP 429 and 5xx and on connection failures before the body starts, honouring
``Retry-After``, and enforces connect, read and total timeouts and a size cap (see
:class:`FetchOptions`). To open a DID, a handle or any other SOURCE string, use
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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import anyio
import httpx

from ..errors import FetchError, SourceError
from .identity import _client_scope, _http_url

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CarStream",
    "FetchOptions",
    "fetch_car",
    "parse_retry_after",
    "repo_url",
]

DEFAULT_MAX_BYTES = 4 * 1024**3
"""Default size cap of a fetched CAR: 4 GiB (the largest real repos are a few hundred MB)."""

_ERROR_BODY_BYTES = 4096  # how much of an error response is read for its message
_CAR_MEDIA_TYPE = "application/vnd.ipld.car"


@dataclass(frozen=True)
class FetchOptions:
    """How :func:`fetch_car` and :func:`open_source` fetch over HTTP. Times are in seconds.

    Attributes:
        connect_timeout: to establish a connection (default 10).
        read_timeout: the longest wait for the response headers or for any next piece of the
            body (default 30).
        total_timeout: the whole fetch, retries and body included, or None for no limit (the
            default); checked between chunks and before each retry.
        max_bytes: the largest body accepted, in bytes (default 4 GiB); None for no limit. A
            larger ``Content-Length`` is refused before the body is read; a body that grows past
            it raises as soon as the excess arrives.
        retries: extra attempts after a 429, a 5xx or a connection failure before the body starts
            (default 3; 0 disables retrying). Never retried: other statuses and failures
            mid-body.
        backoff: the wait before the first retry (default 0.5); it doubles per retry, up to
            ``max_backoff`` (default 30), each wait drawn between half and all of that.
        max_retry_after: the longest ``Retry-After`` honoured (default 60). A server asking
            for a longer wait fails the fetch at once, with ``FetchError.retry_after`` set, so
            the caller can come back later.
    """

    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float | None = None
    max_bytes: int | None = DEFAULT_MAX_BYTES
    retries: int = 3
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_retry_after: float = 60.0


def repo_url(pds: str, did: str) -> str:
    """The ``com.atproto.sync.getRepo`` URL of ``did``'s repo on ``pds`` (a base URL)."""
    return f"{pds.rstrip('/')}/xrpc/com.atproto.sync.getRepo?did={quote(did, safe=':')}"


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


def _describe(url: str, did: str | None) -> str:
    return f"getRepo of {did} from {url}" if did else f"GET {url}"


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

    def __init__(self, response: httpx.Response, *, url: str, did: str | None, options: FetchOptions, deadline: float | None, attempts: int) -> None:
        self.url = url
        self.did = did
        self.status = response.status_code
        length = response.headers.get("content-length", "")
        self.content_length: int | None = int(length) if length.isascii() and length.isdigit() else None
        self.bytes_received = 0
        self.attempts = attempts
        self.error: FetchError | None = None
        self._response = response
        self._options = options
        self._deadline = deadline
        self._consumed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        if self._consumed:
            raise FetchError(f"{_describe(self.url, self.did)}: the response body can be read only once", url=self.url, did=self.did)
        self._consumed = True
        return self._chunks()

    def _fail(self, message: str) -> FetchError:
        self.error = FetchError(f"{_describe(self.url, self.did)}: {message}", url=self.url, did=self.did, status=self.status)
        return self.error

    async def _chunks(self) -> AsyncIterator[bytes]:
        cap = self._options.max_bytes
        deadline = self._deadline
        try:
            async for chunk in self._response.aiter_bytes():
                self.bytes_received += len(chunk)
                if cap is not None and self.bytes_received > cap:
                    raise self._fail(f"the body passed the size cap of {cap} bytes (max_bytes)")
                if deadline is not None and time.monotonic() > deadline:
                    raise self._fail(f"not finished within the total timeout of {self._options.total_timeout:g} s, after {self.bytes_received} bytes")
                yield chunk
        except httpx.HTTPError as exc:
            error = self._fail(f"the body was cut off after {self.bytes_received} bytes: {type(exc).__name__}: {exc or 'no detail'}")
            raise error from exc


async def _error_detail(response: httpx.Response, read_timeout: float) -> str:
    """``": Error: message"`` from an XRPC error body (or a text snippet); reads at most 4 KiB."""
    body = bytearray()
    with anyio.move_on_after(read_timeout):
        try:
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) >= _ERROR_BODY_BYTES:
                    break
        except httpx.HTTPError:
            pass
    await response.aclose()
    text = bytes(body[:_ERROR_BODY_BYTES]).decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        message = parsed.get("message")
        return f": {parsed['error']}" + (f": {message}" if isinstance(message, str) and message else "")
    snippet = " ".join(text.split())[:200]
    return f": {snippet}" if snippet else ""


def _backoff(options: FetchOptions, retry: int) -> float:
    delay = min(options.max_backoff, options.backoff * 2.0 ** (retry - 1))
    return delay * random.uniform(0.5, 1.0)


async def _open_response(http: httpx.AsyncClient, url: str, did: str | None, options: FetchOptions, deadline: float | None) -> tuple[httpx.Response, int]:
    """Send the request, retrying as :class:`FetchOptions` says; the 2xx response, body unread."""
    what = _describe(url, did)
    timeout = httpx.Timeout(options.read_timeout, connect=options.connect_timeout)
    attempt = 0
    while True:
        attempt += 1
        retry_after: float | None = None
        try:
            request = http.build_request("GET", url, headers={"Accept": _CAR_MEDIA_TYPE}, timeout=timeout)
            response = await http.send(request, stream=True, follow_redirects=True)
        except (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            failure = f"{type(exc).__name__}: {exc or 'no detail'}"
            status = None
            cause: Exception = exc
        except httpx.HTTPError as exc:
            raise FetchError(f"{what}: {type(exc).__name__}: {exc}", url=url, did=did) from exc
        else:
            status = response.status_code
            if 200 <= status < 300:
                length = response.headers.get("content-length", "")
                encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
                if options.max_bytes is not None and not encoded and length.isdigit() and int(length) > options.max_bytes:
                    await response.aclose()
                    raise FetchError(
                        f"{what}: Content-Length {length} bytes is over the size cap of {options.max_bytes} bytes (max_bytes)",
                        url=url, did=did, status=status,
                    )
                return response, attempt
            failure = f"HTTP {status}" + await _error_detail(response, options.read_timeout)
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status != 429 and status < 500:
                raise FetchError(f"{what}: {failure}", url=url, did=did, status=status)
            cause = FetchError(failure)
            if retry_after is not None and retry_after > options.max_retry_after:
                raise FetchError(
                    f"{what}: {failure}; the server asks to retry after {retry_after:g} s, more than the "
                    f"{options.max_retry_after:g} s allowed (max_retry_after)",
                    url=url, did=did, status=status, retry_after=retry_after,
                )
        delay = max(_backoff(options, attempt), retry_after or 0.0)
        if attempt > options.retries:
            tries = f" (after {attempt} attempts)" if attempt > 1 else ""
            raise FetchError(f"{what}: {failure}{tries}", url=url, did=did, status=status, retry_after=retry_after) from cause
        if deadline is not None and time.monotonic() + delay > deadline:
            raise FetchError(
                f"{what}: {failure}; no time left for a retry within the total timeout of {options.total_timeout:g} s",
                url=url, did=did, status=status, retry_after=retry_after,
            ) from cause
        await anyio.sleep(delay)


@asynccontextmanager
async def fetch_car(
    url: str,
    *,
    did: str | None = None,
    client: httpx.AsyncClient | None = None,
    options: FetchOptions | None = None,
) -> AsyncIterator[CarStream]:
    """Open ``url`` (e.g. ``https://PDS/xrpc/com.atproto.sync.getRepo?did=DID``) and yield its
    body as a :class:`CarStream` for ``load_car``. Use as ``async with``; read the body inside.

    Waits for a 2xx response first, retrying on 429 and 5xx and on connection failures and
    timeouts (see :class:`FetchOptions`). Redirects are followed. The response is closed on exit.

    Args:
        url: an ``http://`` or ``https://`` URL.
        did: the DID whose repo this is, for error messages (optional).
        client: the HTTP client (default: a new one, closed on exit).
        options: timeouts, size cap and retry policy (default :class:`FetchOptions()`).

    Raises:
        FetchError: on opening: a 4xx other than 429 (the XRPC ``error`` and ``message`` are
            quoted), 429/5xx or connection failures once retries are spent, a ``Retry-After`` over
            ``max_retry_after``, a ``Content-Length`` over ``max_bytes``; on reading (surfacing
            from the ``async with`` block): the body passing ``max_bytes`` or ``total_timeout``,
            a read timeout, or the connection cut before the body's end. Messages name the DID,
            URL and HTTP status.
    """
    options = options or FetchOptions()
    if _http_url(url) is None:
        raise FetchError(f"{_describe(url, did)}: not a valid http(s) URL", url=url, did=did)
    deadline = None if options.total_timeout is None else time.monotonic() + options.total_timeout
    async with _client_scope(client) as http:
        response, attempts = await _open_response(http, url, did, options, deadline)
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
