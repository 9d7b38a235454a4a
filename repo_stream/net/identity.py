"""atproto identity: parse and resolve handles and DIDs to a DID document, a PDS and a signing key.

Specs: atproto.com/specs/handle ("Handle Identifier Syntax", "Handle Resolution"),
atproto.com/specs/did ("AT Protocol DID Identifier Syntax", "DID Documents", "Representation of
Public Keys"), atproto.com/specs/at-uri-scheme.

- :func:`parse_identifier` turns user input (a DID, a handle, ``@handle`` or an ``at://`` URI) into
  a syntactically valid DID or a lowercase handle.
- :func:`resolve_handle` finds a handle's DID through the ``_atproto.HANDLE`` DNS TXT record and
  ``https://HANDLE/.well-known/atproto-did``, both tried at once.
- :func:`resolve_did` fetches a DID document: ``did:plc`` from a PLC directory
  (``GET {plc_url}/{did}``), ``did:web`` from ``https://HOST/.well-known/did.json``.
- :func:`parse_did_document` extracts the handle, PDS and signing key from a document.
- :func:`resolve_identity` does all of it and returns a :class:`ResolvedIdentity`.

Network access goes through an ``httpx.AsyncClient`` (pass your own to reuse connections, set
proxies, or route requests elsewhere in tests: see ``tests/servers.py``) and a dnspython
``dns.asyncresolver.Resolver`` (pass your own, e.g. from :func:`make_dns_resolver`, to use
particular name servers). All functions run on asyncio and trio.
"""

from __future__ import annotations

import functools
import json
import random
import re
import ssl
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import anyio
import httpx

from ..errors import IdentityError

if TYPE_CHECKING:  # imported where used: dnspython and multiformats take ~25 ms and ~2 MB to import,
    # which a process fetching repos by URL or walking files (a backfill worker, `stats URL`) never needs
    import dns.asyncresolver

__all__ = [
    "DEFAULT_PLC_URL",
    "DEFAULT_TIMEOUT",
    "ResolvedIdentity",
    "did_document_url",
    "is_valid_did",
    "is_valid_handle",
    "make_dns_resolver",
    "parse_at_uri",
    "parse_did_document",
    "parse_identifier",
    "resolve_did",
    "resolve_handle",
    "resolve_handle_dns",
    "resolve_handle_https",
    "resolve_identity",
]

DEFAULT_PLC_URL = "https://plc.directory"
"""The PLC directory used for ``did:plc`` unless told otherwise."""

DEFAULT_TIMEOUT = 10.0
"""Seconds allowed for each identity lookup (one DNS query, or one HTTP request and its body)."""

MAX_DID_LENGTH = 2048
"""Hard limit on a DID's length in atproto (spec: atproto DID, "Identifier Syntax")."""

MAX_DOCUMENT_BYTES = 1024 * 1024
"""Largest DID document body read (bytes); a larger one is refused."""

MAX_WELL_KNOWN_BYTES = 4096
"""Largest ``/.well-known/atproto-did`` body read (bytes): a DID is at most 2048 characters."""

RETRIES = 2
"""Tries after the first for an identity GET that failed transiently: HTTP 429, 500, 502, 503 or
504, or a connection refused or dropped (a PLC directory rate-limiting a large backfill)."""

RETRY_BACKOFF = 0.25
"""Seconds before the first retry of an identity GET, doubled for each next (with jitter), or as
long as the host asks (``Retry-After``, or ``RateLimit-Reset`` on a 429) if longer."""

MAX_RETRY_WAIT = 60.0
"""The longest wait an identity host may ask for, seconds; a longer one is not waited for: the
answer stands (the lookup fails, naming the status)."""

_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})

DISALLOWED_TLDS = frozenset({"alt", "arpa", "example", "internal", "invalid", "local", "localhost", "onion"})
"""TLDs that are valid handle syntax but must fail resolution (spec: handle, "Non-Syntax Restrictions")."""

_DID_RE = re.compile(r"^did:[a-z]+:[a-zA-Z0-9._:%-]*[a-zA-Z0-9._-]$")
_PLC_RE = re.compile(r"^did:plc:[a-z2-7]{24}$")
_HANDLE_RE = re.compile(r"^([a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?\.)+[a-zA-Z]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?$")
_LOCALHOST_RE = re.compile(r"^localhost(%3[aA][0-9]{1,5})?$")

# Multicodec prefixes (as varints) of compressed public keys (spec: atproto cryptography).
_K256_PREFIX = b"\xe7\x01"  # secp256k1-pub, 0xe7
_P256_PREFIX = b"\x80\x24"  # p256-pub, 0x1200
_LEGACY_KEY_TYPES = {
    "EcdsaSecp256k1VerificationKey2019": _K256_PREFIX,
    "EcdsaSecp256r1VerificationKey2019": _P256_PREFIX,
}
_USER_AGENT = "repo-stream (+https://atproto.com/specs/sync)"


@dataclass(frozen=True)
class ResolvedIdentity:
    """What an account's DID document says (spec: atproto DID, "DID Documents").

    Attributes:
        did: the account's DID, e.g. ``did:plc:z72i7hdynmk6r22z27h6tvur``.
        handle: the primary handle the document claims (first valid ``at://`` entry of
            ``alsoKnownAs``, lowercase), or None.
        handle_verified: True when the handle was also resolved back to ``did`` (done by
            :func:`resolve_identity` when its input was a handle or ``verify_handle=True``).
        pds: the PDS base URL (``scheme://host[:port]``, no trailing slash) of the first valid
            ``#atproto_pds`` service of type ``AtprotoPersonalDataServer``, or None.
        signing_key: the first valid ``#atproto`` verification method's public key as a
            ``did:key:z...`` string (compressed point with its multicodec), or None.
        document: the DID document as parsed JSON (not compared or hashed).
    """

    did: str
    handle: str | None
    handle_verified: bool
    pds: str | None
    signing_key: str | None
    document: Mapping[str, Any] = field(compare=False, repr=False)


# ---------------------------------------------------------------------------------------------
# Syntax


def is_valid_did(did: str) -> bool:
    """Whether ``did`` is valid atproto DID syntax (any method), at most 2048 characters.

    Spec: atproto DID, "AT Protocol DID Identifier Syntax". Case matters: ``DID:plc:...`` and
    ``did:PLC:...`` are invalid. Percent-encoding is not checked beyond its characters.
    """
    return len(did) <= MAX_DID_LENGTH and _DID_RE.match(did) is not None and not did.endswith("%")


def is_valid_handle(handle: str) -> bool:
    """Whether ``handle`` is valid handle syntax (spec: atproto handle, "Handle Identifier Syntax").

    ASCII only, at most 253 characters, at least two dot-separated labels of 1-63 letters, digits
    and hyphens, no label starting or ending with a hyphen, the last not starting with a digit.
    Reserved TLDs (``.local``, ``.onion``...) pass this check; resolution refuses them.
    """
    return len(handle) <= 253 and handle.isascii() and _HANDLE_RE.match(handle) is not None


def _check_did(did: str, what: str = "DID") -> str:
    if not is_valid_did(did):
        raise IdentityError(f"{what} {did!r} is not valid DID syntax (atproto.com/specs/did)")
    method = did.split(":", 2)[1]
    if method == "plc":
        if not _PLC_RE.match(did):
            raise IdentityError(f"{what} {did!r} is not a did:plc (did:plc: and 24 characters of a-z, 2-7)")
    elif method == "web":
        _did_web_host(did)
    else:
        raise IdentityError(f"{what} {did!r} uses the unsupported DID method {method!r} (atproto supports plc and web)")
    return did


def _check_handle(handle: str, what: str = "handle") -> str:
    if not is_valid_handle(handle):
        raise IdentityError(f"{what} {handle!r} is not valid handle syntax (atproto.com/specs/handle)")
    handle = handle.lower()
    tld = handle.rsplit(".", 1)[1]
    if tld in DISALLOWED_TLDS:
        raise IdentityError(f"{what} {handle!r} is under the reserved TLD .{tld}, which atproto never resolves")
    return handle


def parse_at_uri(uri: str) -> tuple[str, str | None]:
    """Split an ``at://AUTHORITY[/COLLECTION[/RKEY]]`` URI into ``(authority, path or None)``.

    The authority is checked and normalised like :func:`parse_identifier` (a DID, or a handle
    lowercased); the path is returned as written, without its leading slash.
    Spec: atproto.com/specs/at-uri-scheme (restricted syntax: no query or fragment).

    Raises:
        IdentityError: not an ``at://`` URI, a query or fragment, or a bad authority.
    """
    if not uri.startswith("at://"):
        raise IdentityError(f"{uri!r} is not an at:// URI")
    rest = uri[len("at://") :]
    if "?" in rest or "#" in rest:
        raise IdentityError(f"at:// URI {uri!r} has a query or fragment, which repo sources do not take")
    authority, _, path = rest.partition("/")
    if not authority:
        raise IdentityError(f"at:// URI {uri!r} has no authority (DID or handle)")
    parts = path.split("/") if path else []
    if len(parts) > 2 or any(not p for p in parts):
        raise IdentityError(f"at:// URI {uri!r} has a path other than /COLLECTION or /COLLECTION/RKEY")
    if authority.startswith("did:"):
        return _check_did(authority, "at:// URI authority"), path or None
    return _check_handle(authority, "at:// URI authority"), path or None


def parse_identifier(text: str) -> str:
    """Normalise user input naming an account to a DID or a lowercase handle.

    Accepts a DID (``did:plc:...``, ``did:web:...``), a handle (``alice.example.com``, or
    ``@alice.example.com`` as written in user interfaces) or an ``at://`` URI whose authority is
    either. Returns the DID unchanged or the handle lowercased; tell them apart with
    ``result.startswith("did:")``.

    Raises:
        IdentityError: invalid syntax, an unsupported DID method, a path-based or non-hostname
            ``did:web``, or a handle under a reserved TLD (``.local``, ``.onion``, ...).
    """
    text = text.strip()
    if text.startswith("at://"):
        return parse_at_uri(text)[0]
    if text.startswith("did:"):
        return _check_did(text)
    return _check_handle(text.removeprefix("@"))


def _did_web_host(did: str) -> str:
    """``host`` or ``host:port`` for a hostname-level ``did:web`` (port only for localhost)."""
    ident = did[len("did:web:") :]
    if ":" in ident:
        raise IdentityError(f"DID {did!r}: path-based did:web is not supported in atproto")
    if _LOCALHOST_RE.match(ident):
        return unquote(ident)
    if "%" in ident:
        raise IdentityError(f"DID {did!r}: a did:web port is only allowed for localhost")
    try:
        return _check_handle(ident, "did:web host")
    except IdentityError as exc:
        raise IdentityError(f"DID {did!r}: {exc}") from None


def did_document_url(did: str, plc_url: str = DEFAULT_PLC_URL) -> str:
    """The URL a DID's document is fetched from.

    ``did:plc:X`` -> ``{plc_url}/did:plc:X``; ``did:web:HOST`` -> ``https://HOST/.well-known/did.json``
    (``http://localhost:PORT/...`` for ``did:web:localhost%3APORT``, which the spec allows only in
    development). Raises :class:`IdentityError` for bad syntax or an unsupported method.
    """
    _check_did(did)
    if did.startswith("did:plc:"):
        return f"{plc_url.rstrip('/')}/{did}"
    host = _did_web_host(did)
    scheme = "http" if host.split(":")[0] == "localhost" else "https"
    return f"{scheme}://{host}/.well-known/did.json"


# ---------------------------------------------------------------------------------------------
# Network helpers


def _http_url(url: str) -> httpx.URL | None:
    """``url`` parsed if it is an absolute ``http``/``https`` URL with a host and a port within
    0-65535, else None (httpx would otherwise fail in odd ways on, say, port 99999)."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host or (parsed.port is not None and not 0 < parsed.port <= 65535):
        return None
    return parsed


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once: loading the CA bundle takes ~0.25 s."""
    return httpx.create_ssl_context()


@asynccontextmanager
async def _client_scope(
    client: httpx.AsyncClient | None, *, allow_private_hosts: bool = False, trusted: Sequence[str] = ()
) -> AsyncIterator[httpx.AsyncClient]:
    """The caller's client, or a fresh one (:func:`repo_stream.net.guard.make_client`) closed on
    exit. ``trusted``: URLs the user named, connected as given (added to a guarded caller's
    client too); every other host must resolve to public addresses unless ``allow_private_hosts``."""
    from .guard import guard_of, make_client

    if client is not None:
        guard = guard_of(client)
        if guard is not None:
            for url in trusted:
                guard.trust(url)
        yield client
        return
    async with make_client(allow_private_hosts=allow_private_hosts, trusted=trusted) as own:
        yield own


async def _get_small(client: httpx.AsyncClient, url: str, *, timeout: float, max_bytes: int, what: str) -> tuple[int, str, bytes]:
    """GET ``url`` following redirects (:func:`repo_stream.net.http.send`); ``(status, content
    type, body)`` with the decoded body capped at ``max_bytes``, read in bounded steps.

    The whole exchange, redirects and body included, must end within ``timeout`` seconds. A
    transient failure (HTTP 429, 500, 502, 503, 504; a connection refused or dropped) is tried
    again up to :data:`RETRIES` times (see :data:`RETRY_BACKOFF`, :data:`MAX_RETRY_WAIT`); the
    last answer's status is returned as any other.
    """
    from .fetch import parse_ratelimit_reset, parse_retry_after

    if _http_url(url) is None:
        raise IdentityError(f"{what}: {url!r} is not a valid http(s) URL")
    attempt = 0
    while True:
        attempt += 1
        wait: float | None = None
        try:
            status, content_type, body, headers = await _get_once(client, url, timeout=timeout, max_bytes=max_bytes, what=what)
        except _TransientIdentityError as exc:
            if attempt > RETRIES:
                raise IdentityError(f"{exc} (after {attempt} attempts)") from exc.__cause__
        else:
            if status not in _TRANSIENT_STATUSES or attempt > RETRIES:
                return status, content_type, body
            wait = parse_retry_after(headers.get("retry-after"))
            if wait is None and status == 429:
                wait = parse_ratelimit_reset(headers.get("ratelimit-reset"))
            if wait is not None and wait > MAX_RETRY_WAIT:
                return status, content_type, body
        await anyio.sleep(max(RETRY_BACKOFF * 2.0 ** (attempt - 1) * random.uniform(0.5, 1.0), wait or 0.0))


class _TransientIdentityError(IdentityError):
    """An identity GET that another try may fix (a connection refused or dropped)."""


async def _get_once(
    client: httpx.AsyncClient, url: str, *, timeout: float, max_bytes: int, what: str
) -> tuple[int, str, bytes, httpx.Headers]:
    """One try of :func:`_get_small`; also the answer's headers. Raises
    :class:`_TransientIdentityError` for a connection refused or dropped."""
    from .fetch import _retryable
    from .http import BodyError, describe_error, read_body, send

    def fail(message: str) -> IdentityError:
        return IdentityError(f"{what}: GET {url}: {message}")

    try:
        with anyio.fail_after(timeout):
            response = await send(client, url, timeout=timeout, fail=fail)
            try:
                body = await read_body(response, max_bytes)
            finally:
                await response.aclose()
            return response.status_code, response.headers.get("content-type", ""), body, response.headers
    except TimeoutError:
        raise IdentityError(f"{what}: GET {url} did not complete within {timeout:g} s") from None
    except BodyError as exc:
        if "size cap" in str(exc):
            raise IdentityError(f"{what}: GET {url} answered more than {max_bytes} bytes (as decoded)") from None
        raise IdentityError(f"{what}: GET {url}: {exc}") from None
    except httpx.HTTPError as exc:
        if _retryable(exc):
            raise _TransientIdentityError(f"{what}: GET {url} failed: {describe_error(exc)}") from exc
        raise IdentityError(f"{what}: GET {url} failed: {describe_error(exc)}") from exc


def make_dns_resolver(nameservers: Sequence[str | tuple[str, int]], *, timeout: float = DEFAULT_TIMEOUT) -> dns.asyncresolver.Resolver:
    """A dnspython async resolver that asks only ``nameservers`` (addresses, or ``(address, port)``).

    ``timeout`` is the total seconds allowed per lookup. Without this, the functions here use
    the system's resolver (``/etc/resolv.conf``).
    """
    import dns.asyncresolver
    import dns.nameserver

    resolver = dns.asyncresolver.Resolver(configure=False)
    resolver.nameservers = [
        dns.nameserver.Do53Nameserver(ns, 53) if isinstance(ns, str) else dns.nameserver.Do53Nameserver(ns[0], ns[1])
        for ns in nameservers
    ]
    resolver.lifetime = timeout
    resolver.timeout = timeout
    return resolver


# ---------------------------------------------------------------------------------------------
# Handle -> DID


class _AmbiguousHandleError(IdentityError):
    """The DNS TXT records name more than one DID (spec: resolution must fail)."""


async def resolve_handle_dns(handle: str, *, dns_resolver: dns.asyncresolver.Resolver | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """A handle's DID from the ``_atproto.HANDLE`` TXT record (spec: handle, "DNS TXT Method").

    Values not starting with ``did=`` are ignored; several records naming one DID are fine.

    Args:
        handle: a valid handle (any case).
        dns_resolver: the resolver to ask (default: the system's).
        timeout: seconds allowed for the lookup.

    Raises:
        IdentityError: no such name or no ``did=`` record, records naming different DIDs, an
            invalid DID in the record, or the DNS lookup failing or timing out.
    """
    import dns.asyncbackend
    import dns.asyncresolver
    import dns.exception
    import dns.rdatatype
    import dns.resolver

    handle = _check_handle(handle)
    name = f"_atproto.{handle}"
    try:
        resolver = dns_resolver if dns_resolver is not None else dns.asyncresolver.get_default_resolver()
        # dnspython caches the first event loop library it sees; name the running one each time.
        backend = dns.asyncbackend.get_backend(dns.asyncbackend.sniff())
        answer = await resolver.resolve(name, dns.rdatatype.TXT, lifetime=timeout, search=False, backend=backend)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        raise IdentityError(f"handle {handle}: DNS has no TXT record {name}") from None
    except dns.exception.Timeout:
        raise IdentityError(f"handle {handle}: DNS TXT lookup of {name} timed out after {timeout:g} s") from None
    except (dns.exception.DNSException, OSError) as exc:
        raise IdentityError(f"handle {handle}: DNS TXT lookup of {name} failed: {type(exc).__name__}: {exc}") from exc
    dids: list[str] = []
    for rdata in answer:
        value = b"".join(rdata.strings).decode("ascii", "replace")
        if value.startswith("did="):
            did = value[len("did=") :]
            if did not in dids:
                dids.append(did)
    if not dids:
        raise IdentityError(f"handle {handle}: no TXT record of {name} starts with did=")
    if len(dids) > 1:
        raise _AmbiguousHandleError(f"handle {handle}: the TXT records of {name} name different DIDs: {', '.join(sorted(dids))}")
    return _check_did(dids[0], f"handle {handle}: TXT record of {name} names")


async def resolve_handle_https(
    handle: str, *, client: httpx.AsyncClient | None = None, timeout: float = DEFAULT_TIMEOUT, allow_private_hosts: bool = False
) -> str:
    """A handle's DID from ``https://HANDLE/.well-known/atproto-did`` (spec: handle, "HTTPS
    well-known Method").

    Up to 5 redirects are followed (http(s) only, never https to http); the body, stripped of
    whitespace, must be a DID; the content type is not checked. The handle's host is learned
    from the input, not named by the user: it must resolve to public addresses (see
    :mod:`repo_stream.net.guard`) unless ``allow_private_hosts``.

    Args:
        handle: a valid handle (any case).
        client: the HTTP client to use (default: a new one for this call).
        timeout: seconds allowed for the request, redirects and body.
        allow_private_hosts: without a ``client``, connect to private addresses too.

    Raises:
        IdentityError: a connection failure or timeout, a private address, a non-2xx status, a
            body over 4096 bytes as decoded, or a body that is not a valid DID.
    """
    handle = _check_handle(handle)
    url = f"https://{handle}/.well-known/atproto-did"
    async with _client_scope(client, allow_private_hosts=allow_private_hosts) as http:
        status, content_type, body = await _get_small(http, url, timeout=timeout, max_bytes=MAX_WELL_KNOWN_BYTES, what=f"handle {handle}")
    if not 200 <= status < 300:
        raise IdentityError(f"handle {handle}: GET {url} answered HTTP {status} ({content_type or 'no content type'})")
    text = body.decode("utf-8", "replace").strip()
    return _check_did(text, f"handle {handle}: {url} answered")


async def resolve_handle(
    handle: str,
    *,
    client: httpx.AsyncClient | None = None,
    dns_resolver: dns.asyncresolver.Resolver | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    allow_private_hosts: bool = False,
) -> str:
    """Resolve a handle to its DID by DNS TXT and HTTPS well-known, both at once (spec: handle,
    "Handle Resolution", "Resolution Best Practices").

    How the two combine: both lookups start together. A DID from DNS is taken as soon as it
    arrives (the other lookup is cancelled). A DID from HTTPS is taken only once DNS has found
    none, so when the two disagree DNS wins, as the spec prefers. If the DNS records name two
    different DIDs, resolution fails whatever HTTPS says. The DID is not checked against its
    document here (see :func:`resolve_identity` for the bidirectional check).

    Args:
        handle: a handle (any case, optionally ``@``-prefixed).
        client: the HTTP client (default: a new one for this call).
        dns_resolver: the DNS resolver (default: the system's; see :func:`make_dns_resolver`).
        timeout: seconds allowed for each of the two lookups.
        allow_private_hosts: as for :func:`resolve_handle_https`.

    Returns:
        The DID, e.g. ``did:plc:z72i7hdynmk6r22z27h6tvur``.

    Raises:
        IdentityError: bad handle syntax, a reserved TLD, ambiguous DNS records, or neither
            method giving a DID (the message gives both reasons).
    """
    handle = _check_handle(handle.removeprefix("@"))
    results: dict[str, str | IdentityError] = {}
    async with _client_scope(client, allow_private_hosts=allow_private_hosts) as http, anyio.create_task_group() as tg:

        async def by_dns() -> None:
            try:
                results["dns"] = await resolve_handle_dns(handle, dns_resolver=dns_resolver, timeout=timeout)
            except IdentityError as exc:
                results["dns"] = exc
                return
            tg.cancel_scope.cancel()  # DNS answered with a DID: it wins, stop the HTTPS lookup

        async def by_https() -> None:
            try:
                results["https"] = await resolve_handle_https(handle, client=http, timeout=timeout, allow_private_hosts=allow_private_hosts)
            except IdentityError as exc:
                results["https"] = exc

        tg.start_soon(by_dns)
        tg.start_soon(by_https)
    by_dns_result = results.get("dns")
    if isinstance(by_dns_result, str):
        return by_dns_result
    if isinstance(by_dns_result, _AmbiguousHandleError):
        raise by_dns_result
    by_https_result = results["https"]
    if isinstance(by_https_result, str):
        return by_https_result
    raise IdentityError(f"could not resolve handle {handle}: DNS: {by_dns_result}; HTTPS: {by_https_result}")


# ---------------------------------------------------------------------------------------------
# DID -> DID document


async def resolve_did(
    did: str,
    *,
    client: httpx.AsyncClient | None = None,
    plc_url: str = DEFAULT_PLC_URL,
    timeout: float = DEFAULT_TIMEOUT,
    allow_private_hosts: bool = False,
) -> dict[str, Any]:
    """Fetch a DID's document (spec: atproto DID, "Blessed DID Methods").

    ``did:plc`` is read from the PLC directory at ``plc_url`` (``GET {plc_url}/{did}``);
    ``did:web`` from ``https://HOST/.well-known/did.json`` (see :func:`did_document_url`).
    Up to 5 redirects are followed (http(s) only, never https to http). ``plc_url`` is named by
    the user and connected as given; a ``did:web`` host and redirect targets must resolve to
    public addresses (see :mod:`repo_stream.net.guard`) unless ``allow_private_hosts``.

    Args:
        did: a ``did:plc`` or hostname-level ``did:web`` DID.
        client: the HTTP client (default: a new one for this call).
        plc_url: the PLC directory's base URL (default ``https://plc.directory``).
        timeout: seconds allowed for the request, redirects and body.
        allow_private_hosts: without a ``client``, connect to private addresses too.

    Returns:
        The document as parsed JSON: a dict whose ``id`` is ``did``.

    Raises:
        IdentityError: bad syntax or an unsupported method; a connection failure or timeout; a
            private address; a non-2xx status (404: not registered, 410: deactivated); a body over
            1 MiB as decoded, not JSON,
            not an object, or whose ``id`` is not ``did``. The message names the DID, URL and status.
    """
    url = did_document_url(did, plc_url)
    trusted = (plc_url,) if did.startswith("did:plc:") else ()
    async with _client_scope(client, allow_private_hosts=allow_private_hosts, trusted=trusted) as http:
        status, content_type, body = await _get_small(http, url, timeout=timeout, max_bytes=MAX_DOCUMENT_BYTES, what=f"DID {did}")
    answer = f"HTTP {status}, {content_type or 'no content type'}"
    if status == 404:
        raise IdentityError(f"DID {did}: not found (HTTP 404 from {url})")
    if status == 410:
        raise IdentityError(f"DID {did}: deactivated or tombstoned (HTTP 410 from {url})")
    if not 200 <= status < 300:
        raise IdentityError(f"DID {did}: GET {url} answered {answer}")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise IdentityError(f"DID {did}: the document from {url} ({answer}) is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise IdentityError(f"DID {did}: the document from {url} is a JSON {type(document).__name__}, not an object")
    if document.get("id") != did:
        raise IdentityError(f"DID {did}: the document from {url} is for {document.get('id')!r}, not {did}")
    return document


# ---------------------------------------------------------------------------------------------
# DID document -> handle, PDS, signing key


def _fragment_matches(value: Any, did: str, fragment: str) -> bool:
    return isinstance(value, str) and value in (fragment, did + fragment)


def _signing_key(did: str, method: Any) -> str | None:
    """The ``did:key`` of one verification method, or None if it is not a valid atproto key."""
    if not isinstance(method, dict) or not _fragment_matches(method.get("id"), did, "#atproto"):
        return None
    if method.get("controller") != did:
        return None
    encoded = method.get("publicKeyMultibase")
    if not isinstance(encoded, str) or not encoded.startswith("z"):
        return None
    from multiformats import multibase

    try:
        raw = multibase.decode(encoded)
    except ValueError:  # not base58btc (the library's decoding errors are ValueErrors)
        return None
    kind = method.get("type")
    if kind == "Multikey":
        if raw[:2] in (_K256_PREFIX, _P256_PREFIX) and len(raw) == 35 and raw[2] in (2, 3):
            return "did:key:" + encoded
        return None
    prefix = _LEGACY_KEY_TYPES.get(kind) if isinstance(kind, str) else None
    if prefix is None:
        return None
    # Legacy form: the uncompressed point (0x04 || x || y, or x || y) with no multicodec.
    if len(raw) == 65 and raw[0] == 4:
        raw = raw[1:]
    if len(raw) != 64:
        return None
    compressed = bytes([2 | (raw[63] & 1)]) + raw[:32]
    return "did:key:" + multibase.encode(prefix + compressed, "base58btc")


def _pds_endpoint(did: str, service: Any) -> str | None:
    """The base URL of one service entry, or None if it is not a valid atproto PDS entry."""
    if not isinstance(service, dict) or not _fragment_matches(service.get("id"), did, "#atproto_pds"):
        return None
    if service.get("type") != "AtprotoPersonalDataServer":
        return None
    endpoint = service.get("serviceEndpoint")
    if not isinstance(endpoint, str):
        return None
    url = _http_url(endpoint)
    if url is None or url.userinfo or url.query or url.fragment:
        return None
    if url.path not in ("", "/"):
        return None
    return endpoint.rstrip("/")


def parse_did_document(did: str, document: Mapping[str, Any]) -> ResolvedIdentity:
    """Extract the handle, PDS and signing key from a DID document (spec: atproto DID, "DID
    Documents", "Representation of Public Keys").

    - handle: the first ``alsoKnownAs`` entry that is ``at://`` plus a valid handle, lowercased.
    - PDS: the first ``service`` entry with ``id`` ``#atproto_pds`` (or ``DID#atproto_pds``),
      ``type`` ``AtprotoPersonalDataServer`` and a ``serviceEndpoint`` of the form
      ``http(s)://host[:port]``; returned without a trailing slash.
    - signing key: the first ``verificationMethod`` with ``id`` ``#atproto`` (or ``DID#atproto``),
      ``controller`` equal to the DID, and either ``type`` ``Multikey`` with a compressed
      secp256k1 or P-256 ``publicKeyMultibase``, or the legacy types
      ``EcdsaSecp256k1VerificationKey2019`` / ``EcdsaSecp256r1VerificationKey2019`` with an
      uncompressed key (converted to the compressed form). Returned as ``did:key:z...``.

    Entries that do not qualify are skipped; a missing handle, PDS or key is None.
    ``handle_verified`` is False (this function does no network access).

    Raises:
        IdentityError: ``document`` is not a mapping, or its ``id`` is not ``did``.
    """
    if not isinstance(document, Mapping):
        raise IdentityError(f"DID {did}: the DID document is a {type(document).__name__}, not a JSON object")
    if document.get("id") != did:
        raise IdentityError(f"DID {did}: the DID document is for {document.get('id')!r}")
    handle = None
    aka = document.get("alsoKnownAs")
    for uri in aka if isinstance(aka, list) else ():
        if isinstance(uri, str) and uri.startswith("at://") and is_valid_handle(uri[len("at://") :]):
            handle = uri[len("at://") :].lower()
            break
    pds = None
    services = document.get("service")
    for service in services if isinstance(services, list) else ():
        if (pds := _pds_endpoint(did, service)) is not None:
            break
    key = None
    methods = document.get("verificationMethod")
    for method in methods if isinstance(methods, list) else ():
        if (key := _signing_key(did, method)) is not None:
            break
    return ResolvedIdentity(did=did, handle=handle, handle_verified=False, pds=pds, signing_key=key, document=document)


async def resolve_identity(
    identifier: str,
    *,
    client: httpx.AsyncClient | None = None,
    plc_url: str = DEFAULT_PLC_URL,
    dns_resolver: dns.asyncresolver.Resolver | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    verify_handle: bool = False,
    allow_private_hosts: bool = False,
) -> ResolvedIdentity:
    """Resolve a DID, handle or ``at://`` URI to the account's DID document, PDS and signing key.

    A handle is resolved to a DID (:func:`resolve_handle`), then the DID's document is fetched
    (:func:`resolve_did`) and parsed (:func:`parse_did_document`). When the input was a handle,
    the document's primary handle must be that handle (spec: handle, "the link between handle
    and DID must be confirmed bidirectionally"); otherwise the DID's claimed handle is checked
    the same way only with ``verify_handle=True``.

    Args:
        identifier: ``did:plc:...``, ``did:web:...``, a handle, ``@handle``, or ``at://AUTHORITY[/...]``.
        client: the HTTP client (default: one for this call).
        plc_url: the PLC directory base URL for ``did:plc``.
        dns_resolver: the DNS resolver for handles (default: the system's).
        timeout: seconds allowed for each lookup.
        verify_handle: for a DID input, also resolve the document's handle back to the DID.
        allow_private_hosts: without a ``client``, let handles, ``did:web`` hosts and redirects
            lead to private addresses (``plc_url`` is always connected as given).

    Returns:
        A :class:`ResolvedIdentity`; ``pds`` and ``signing_key`` may be None if the document
        lacks them (callers that need them raise, e.g. :func:`repo_stream.net.fetch.open_source`).

    Raises:
        IdentityError: anything in the chain fails; the message names the handle, DID, URL or
            DNS name and HTTP status.
    """
    name = parse_identifier(identifier)
    async with _client_scope(client, allow_private_hosts=allow_private_hosts, trusted=(plc_url,)) as http:
        if name.startswith("did:"):
            did = name
            document = await resolve_did(did, client=http, plc_url=plc_url, timeout=timeout)
            identity = parse_did_document(did, document)
            if not verify_handle or identity.handle is None:
                return identity
            handle = identity.handle
            try:
                back = await resolve_handle(handle, client=http, dns_resolver=dns_resolver, timeout=timeout)
            except IdentityError as exc:
                raise IdentityError(f"DID {did} claims handle {handle}, which does not resolve: {exc}") from exc
            if back != did:
                raise IdentityError(f"DID {did} claims handle {handle}, but that handle resolves to {back}")
        else:
            handle = name
            did = await resolve_handle(handle, client=http, dns_resolver=dns_resolver, timeout=timeout)
            document = await resolve_did(did, client=http, plc_url=plc_url, timeout=timeout)
            identity = parse_did_document(did, document)
            if identity.handle != handle:
                claimed = identity.handle or "no handle"
                raise IdentityError(f"handle {handle} resolves to {did}, but its DID document claims {claimed}, not {handle}")
    return ResolvedIdentity(
        did=did, handle=handle, handle_verified=True, pds=identity.pds, signing_key=identity.signing_key, document=document
    )
