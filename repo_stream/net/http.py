"""Every HTTP exchange of this library goes through here: redirects followed by hand (http(s)
only, re-checked, no https -> http downgrade) and bodies decoded and size-capped as produced.

**Bodies.** Requests ask for ``Accept-Encoding: identity, gzip``. The body is read raw
(``Response.aiter_raw``) and decoded here, at most :data:`STEP` bytes at a time
(``zlib.decompressobj().decompress(data, max_length)``), each step counted against the caller's
cap before the next is made. Whatever the encoding stack, the memory beyond the cap's own
buffers is one raw network chunk (up to 64 KiB) and one step per coding. ``gzip``, ``x-gzip``
and ``deflate`` are decoded; at most :data:`MAX_CODINGS` codings may be stacked; any other
coding (``br``, ``zstd``...) or a longer stack is refused, as is a compressed body cut short.
This holds for every body read: getRepo CARs, DID documents, ``/.well-known/atproto-did``,
listRepos pages and error bodies.

**Deadlines.** :func:`body_chunks` takes a callable giving, for the bytes read so far, the
monotonic time by which the next piece must arrive; a piece that does not arrive in time fails
the body at that time, whether the server is silent or dripping a byte now and then.

Spec: RFC 9110 sections 8.4 (Content-Encoding) and 15.4 (redirects).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import NoReturn

import anyio
import httpx

from ..errors import RepoStreamError
from .guard import ACCEPT_ENCODING, PrivateHostError

__all__ = ["MAX_CODINGS", "MAX_REDIRECTS", "STEP", "body_chunks", "codings", "describe_error", "read_body", "send"]

STEP = 64 * 1024
"""Largest piece of decoded body made at once, bytes."""
MAX_CODINGS = 2
"""Most content codings accepted stacked on one body (``gzip, gzip`` is the deepest accepted)."""
MAX_REDIRECTS = 5
"""Most redirects followed for one request."""

_REDIRECTS = (301, 302, 303, 307, 308)


class BodyError(RepoStreamError):
    """Raised by the decoding helpers; callers re-raise it as their own error type with context."""


def describe_error(exc: BaseException) -> str:
    """``"ClassName: message"``, or ``"ClassName (no detail)"`` when the message is empty."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else f"{type(exc).__name__} (no detail)"


def codings(response: httpx.Response) -> list[str]:
    """The response's content codings, outermost last, ``identity`` dropped (RFC 9110 8.4).

    Raises:
        BodyError: an unknown coding, or more than :data:`MAX_CODINGS` stacked.
    """
    found = [c.strip().lower() for value in response.headers.get_list("content-encoding") for c in value.split(",")]
    found = [c for c in found if c and c != "identity"]
    for coding in found:
        if coding not in ("gzip", "x-gzip", "deflate"):
            raise BodyError(f"Content-Encoding {coding!r} is not accepted (only gzip and deflate, as Accept-Encoding says)")
    if len(found) > MAX_CODINGS:
        raise BodyError(f"Content-Encoding stacks {len(found)} codings ({', '.join(found)}); at most {MAX_CODINGS} are accepted")
    return found


class _Decoder:
    """One content coding, decoded in steps of at most STEP bytes."""

    def __init__(self, coding: str) -> None:
        self.coding = coding
        self._gzip = coding != "deflate"
        self._obj = self._new()
        self._started = False

    def _new(self) -> zlib._Decompress:
        # gzip: 16 + MAX_WBITS; deflate is zlib-wrapped by the RFC, but raw deflate is common: sniffed.
        return zlib.decompressobj(16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS)

    def feed(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of ``data``, each at most STEP bytes, made one at a time."""
        if not self._started and data:
            self._started = True
            if not self._gzip and (data[0] & 0x0F) != 8:  # not a zlib header: raw deflate
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
        while True:
            try:
                if self._obj.eof:
                    if not data:
                        break
                    if not self._gzip:
                        raise BodyError(f"{len(data)} bytes after the end of the deflate stream")
                    self._obj = self._new()  # a gzip body may have several members
                piece = self._obj.decompress(data, STEP)
            except zlib.error as exc:
                raise BodyError(f"the {self.coding} body cannot be decoded: {exc}") from None
            tail = self._obj.unconsumed_tail
            data = tail if tail else (self._obj.unused_data if self._obj.eof else b"")
            if piece:
                yield piece
            if not data and len(piece) < STEP:
                break  # all input taken and no output held back

    def finish(self) -> None:
        if self._started and not self._obj.eof:
            raise BodyError(f"the {self.coding} body ends before its compressed stream does (cut off)")


def _decode(decoders: list[_Decoder], data: bytes) -> Iterator[bytes]:
    """``data`` (the raw body's next piece) through every coding, outermost first, in steps."""
    if not decoders:
        yield data
        return
    first, rest = decoders[0], decoders[1:]
    for piece in first.feed(data):
        yield from _decode(rest, piece)


async def body_chunks(
    response: httpx.Response,
    *,
    max_bytes: int | None,
    next_by: Callable[[int], float | None] | None = None,
    on_piece: Callable[[int], None] | None = None,
) -> AsyncIterator[bytes]:
    """The decoded body of ``response`` (opened with ``stream=True``), in pieces of at most
    :data:`STEP` bytes (identity bodies: as they arrive, up to 64 KiB).

    Args:
        max_bytes: the largest decoded body accepted, bytes (None: no cap).
        next_by: given the decoded bytes so far, the ``time.monotonic()`` by which the next raw
            piece must arrive (None: no limit but the client's read timeout).
        on_piece: told the size of each decoded piece, before it is checked against the cap.

    Raises:
        BodyError: the decoded body passes ``max_bytes``; a coding is refused or cannot be
            decoded; the compressed stream is cut short; ``next_by`` passes (the message says
            "deadline").
        httpx.HTTPError: the connection fails or times out.
    """
    decoders = [_Decoder(c) for c in reversed(codings(response))]
    received = 0
    raw = response.aiter_raw()
    try:
        while True:
            by = next_by(received) if next_by is not None else None
            try:
                if by is None:
                    data = await anext(raw)
                else:
                    with anyio.fail_after(max(0.0, by - time.monotonic())):
                        data = await anext(raw)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise BodyError(f"deadline: no more of the body came in time, after {received} bytes") from None
            for piece in _decode(decoders, data):
                received += len(piece)
                if on_piece is not None:
                    on_piece(len(piece))
                if max_bytes is not None and received > max_bytes:
                    raise BodyError(f"the body passed the size cap of {max_bytes} bytes as decoded")
                yield piece
        for decoder in decoders:
            decoder.finish()
    finally:
        close = getattr(raw, "aclose", None)
        if close is not None:
            await close()


async def read_body(response: httpx.Response, max_bytes: int, *, next_by: Callable[[int], float | None] | None = None) -> bytes:
    """The whole decoded body of ``response``, at most ``max_bytes`` (see :func:`body_chunks`)."""
    body = bytearray()
    async for piece in body_chunks(response, max_bytes=max_bytes, next_by=next_by):
        body += piece
    return bytes(body)


async def read_snippet(response: httpx.Response, max_bytes: int, timeout: float) -> bytes:
    """Up to ``max_bytes`` of the decoded body (an error page), within ``timeout`` seconds; what
    could be read (possibly nothing) if the body is longer, slow or fails. Closes the response."""
    body = bytearray()
    with anyio.move_on_after(timeout):
        try:
            async for piece in body_chunks(response, max_bytes=None):
                body += piece
                if len(body) >= max_bytes:
                    break
        except (httpx.HTTPError, BodyError):
            pass
    await response.aclose()
    return bytes(body[:max_bytes])


async def send(
    client: httpx.AsyncClient,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    timeout: httpx.Timeout | float,
    params: dict[str, str | int] | None = None,
    fail: Callable[[str], Exception],
) -> httpx.Response:
    """GET ``url`` (streamed: read the body with :func:`body_chunks`), following up to
    :data:`MAX_REDIRECTS` redirects to ``http``/``https`` URLs only, never from https to http.
    Each hop connects through the client's transport (a :func:`~repo_stream.net.guard.make_client`
    client checks every address). Returns the first response that is not a redirect.

    Raises:
        the exception ``fail(message)`` gives: a refused redirect, too many redirects, or a host
            that resolves to a private address (message naming the host and address);
        httpx.HTTPError: connection failures and timeouts (for the caller to judge).
    """
    request_headers = {"Accept-Encoding": ACCEPT_ENCODING, **(headers or {})}
    request = client.build_request("GET", url, headers=request_headers, params=params, timeout=timeout)
    for _ in range(MAX_REDIRECTS + 1):
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except PrivateHostError as exc:
            raise fail(f"{exc}" + (f" (redirected to {request.url})" if str(request.url) != url else "")) from exc
        if response.status_code not in _REDIRECTS or "location" not in response.headers:
            return response
        location = response.headers["location"]
        await response.aclose()
        try:
            target = request.url.join(location)
        except httpx.InvalidURL:
            _refuse(fail, f"HTTP {response.status_code} from {request.url} redirects to an invalid URL {location[:200]!r}")
        if target.scheme not in ("http", "https") or not target.host:
            _refuse(fail, f"HTTP {response.status_code} from {request.url} redirects to {location[:200]!r}, not an http(s) URL")
        if request.url.scheme == "https" and target.scheme == "http":
            _refuse(fail, f"HTTP {response.status_code} from {request.url} redirects from https to http ({target}); refused")
        request = client.build_request("GET", target, headers=request_headers, timeout=timeout)
    raise fail(f"more than {MAX_REDIRECTS} redirects")


def _refuse(fail: Callable[[str], Exception], message: str) -> NoReturn:
    raise fail(message)
