"""Fetch repo CARs over HTTP (``com.atproto.sync.getRepo``) and open any CAR source by name.

- :func:`fetch_car` streams one URL (normally a PDS's
  ``/xrpc/com.atproto.sync.getRepo?did=DID``) as an async iterable of ``bytes`` chunks that
  :meth:`repo_stream.DriverBuilder.load_car` reads directly; the body is never held whole. It
  retries on HTTP 429 and 5xx and on connection failures before the body starts, honouring
  ``Retry-After``; it enforces connect, read and total timeouts and a size cap (see
  :class:`FetchOptions`).
- :func:`open_source` opens what a command line takes as SOURCE: a file path, ``-`` (standard
  input), an ``http(s)://`` URL, a DID, a handle, or an ``at://`` URI; names are resolved to the
  account's PDS with :mod:`repo_stream.identity`.

Example::

    async with open_source("alice.example.com") as opened:
        driver = await DriverBuilder().load_car(opened.source)
        ...                                   # walk inside the block: the body streams from here
        opened.check_did(driver.commit.did)   # the PDS served the repo we asked for

Spec: atproto.com/specs/sync ("com.atproto.sync.getRepo"), atproto.com/specs/xrpc (error bodies,
``Retry-After``).
"""

from __future__ import annotations

import email.utils
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

import anyio
import dns.asyncresolver
import httpx

from .errors import FetchError, IdentityError, SourceError
from .identity import (
    DEFAULT_PLC_URL,
    DEFAULT_TIMEOUT,
    ResolvedIdentity,
    _client_scope,
    is_valid_did,
    is_valid_handle,
    parse_identifier,
    resolve_identity,
)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "CarStream",
    "FetchOptions",
    "OpenedSource",
    "SourceKind",
    "classify_source",
    "fetch_car",
    "open_source",
    "parse_retry_after",
    "repo_url",
]

DEFAULT_MAX_BYTES = 4 * 1024**3
"""Default size cap of a fetched CAR: 4 GiB (the largest real repos are a few hundred MB)."""

_ERROR_BODY_BYTES = 4096  # how much of an error response is read for its message
_CAR_MEDIA_TYPE = "application/vnd.ipld.car"

SourceKind = Literal["path", "stdin", "url", "did", "handle"]


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


# ---------------------------------------------------------------------------------------------
# Any SOURCE


def classify_source(source: str) -> SourceKind:
    """What kind of SOURCE string this is, without touching the network or opening anything.

    In order: ``-`` is ``"stdin"``; ``http://``/``https://`` is ``"url"``; ``at://`` is ``"did"`` or
    ``"handle"`` by its authority; ``did:`` is ``"did"``; ``@name`` is ``"handle"``; an existing
    file, anything with a path separator, or a name ending in ``.car`` is ``"path"``; valid handle
    syntax is ``"handle"``; anything else is ``"path"``. (A handle under the ``.car`` TLD must be
    written ``@handle`` or ``at://handle``.)
    """
    lowered = source.lower()
    if source == "-":
        return "stdin"
    if lowered.startswith(("http://", "https://")):
        return "url"
    if source.startswith("at://"):
        return "did" if source[len("at://") :].startswith("did:") else "handle"
    if source.startswith("did:"):
        return "did"
    if source.startswith("@"):
        return "handle"
    if os.path.exists(source) or "/" in source or os.sep in source or lowered.endswith(".car"):
        return "path"
    return "handle" if is_valid_handle(source) else "path"


@dataclass(frozen=True)
class OpenedSource:
    """An opened SOURCE, from :func:`open_source`.

    Attributes:
        source: what to pass to ``DriverBuilder.load_car``: an anyio ``AsyncFile`` (path, stdin)
            or a :class:`CarStream` (url, did, handle).
        kind: ``"path"``, ``"stdin"``, ``"url"``, ``"did"`` or ``"handle"``.
        name: the SOURCE string as given.
        did: the DID whose repo is expected (from the DID, handle or ``at://`` URI, or a getRepo
            URL's ``did`` parameter), or None for paths, stdin and other URLs.
        url: the URL fetched, or None.
        size: the CAR's size in bytes when known (a regular file's size, or Content-Length).
        identity: the resolved identity (DID and handle sources), else None.
        stream: the :class:`CarStream` for HTTP sources, else None.
    """

    source: Any
    kind: SourceKind
    name: str
    did: str | None = None
    url: str | None = None
    size: int | None = None
    identity: ResolvedIdentity | None = None
    stream: CarStream | None = None

    @property
    def signing_key(self) -> str | None:
        """The account's signing key as ``did:key:z...`` if the identity was resolved, else None."""
        return self.identity.signing_key if self.identity is not None else None

    def check_did(self, did: str) -> None:
        """Check that a loaded repo's commit DID is the one asked for (no-op when none was).

        Raises:
            IdentityError: ``did`` differs from :attr:`did`.
        """
        if self.did is not None and did != self.did:
            raise IdentityError(f"{self.name}: the repo served is for {did}, not {self.did}" + (f" (from {self.url})" if self.url else ""))


@asynccontextmanager
async def open_source(
    source: str,
    *,
    plc_url: str = DEFAULT_PLC_URL,
    client: httpx.AsyncClient | None = None,
    dns_resolver: dns.asyncresolver.Resolver | None = None,
    identity_timeout: float = DEFAULT_TIMEOUT,
    options: FetchOptions | None = None,
    stdin: Any = None,
) -> AsyncIterator[OpenedSource]:
    """Open a SOURCE string as the command line takes it, yielding an :class:`OpenedSource`.

    SOURCE (classified by :func:`classify_source`) is:

    - a file path: opened with anyio; ``-``: standard input (``stdin`` if given, a binary file,
      else ``sys.stdin.buffer``; not closed);
    - an ``http://`` or ``https://`` URL, e.g. ``https://PDS/xrpc/com.atproto.sync.getRepo?did=DID``:
      fetched with :func:`fetch_car`;
    - a DID, handle, ``@handle`` or ``at://`` URI: resolved with
      :func:`repo_stream.identity.resolve_identity` (handles verified both ways) to the PDS of
      its DID document, then ``{pds}/xrpc/com.atproto.sync.getRepo?did={did}`` is fetched.

    Read the CAR inside the ``async with`` block: the file or response is closed on exit.

    Args:
        source: the SOURCE string.
        plc_url: PLC directory base URL for ``did:plc`` (default ``https://plc.directory``).
        client: the HTTP client for resolution and fetching (default: a new one, closed on exit).
        dns_resolver: DNS resolver for handles (default: the system's).
        identity_timeout: seconds for each identity lookup.
        options: the fetch's timeouts, size cap and retries (:class:`FetchOptions`).
        stdin: the binary file to read for ``-``.

    Raises:
        SourceError: a path that cannot be opened (missing, a directory, no permission).
        IdentityError: a malformed DID, handle or at:// URI (or a bad ``did`` parameter in a
            getRepo URL), resolution failing, or a DID document with no ``#atproto_pds``.
        FetchError: as :func:`fetch_car`.
    """
    kind = classify_source(source)
    if kind == "stdin":
        handle = stdin if stdin is not None else sys.stdin.buffer
        yield OpenedSource(source=anyio.wrap_file(handle), kind=kind, name=source)
        return
    if kind == "path":
        try:
            file = await anyio.open_file(source, "rb")
        except OSError as exc:
            raise SourceError(f"cannot open CAR file {source}: {exc.strerror or exc}") from exc
        async with file:
            try:
                size: int | None = os.fstat(file.wrapped.fileno()).st_size
            except OSError:  # pragma: no cover - fstat on an open file does not fail in practice
                size = None
            yield OpenedSource(source=file, kind=kind, name=source, size=size)
        return
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(_client_scope(client))
        identity = None
        if kind == "url":
            url = source
            did = _did_parameter(source)
        else:
            name = parse_identifier(source)
            identity = await resolve_identity(name, client=http, plc_url=plc_url, dns_resolver=dns_resolver, timeout=identity_timeout)
            did = identity.did
            if identity.pds is None:
                raise IdentityError(
                    f"{source}: the DID document of {did} has no valid #atproto_pds service "
                    "(type AtprotoPersonalDataServer, serviceEndpoint http(s)://host[:port])"
                )
            url = repo_url(identity.pds, did)
        stream = await stack.enter_async_context(fetch_car(url, did=did, client=http, options=options))
        yield OpenedSource(
            source=stream, kind=kind, name=source, did=did, url=url, size=stream.content_length, identity=identity, stream=stream
        )


def _did_parameter(url: str) -> str | None:
    """The ``did`` query parameter of a getRepo URL, checked for DID syntax; None for other URLs."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise FetchError(f"{url!r} is not a valid URL: {exc}", url=url) from None
    if not parsed.path.endswith("/xrpc/com.atproto.sync.getRepo"):
        return None
    if "did" not in parsed.params:
        return None
    did = str(parsed.params["did"])
    if not is_valid_did(did):
        raise IdentityError(f"{url}: the did parameter {did!r} is not valid DID syntax (atproto.com/specs/did)")
    return did
