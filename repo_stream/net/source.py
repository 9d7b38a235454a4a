"""Open any CAR source the command line takes as SOURCE, for ``DriverBuilder.load_car``.

SOURCE is a file path, ``-`` (standard input), an ``http(s)://`` URL (e.g. a PDS's
``/xrpc/com.atproto.sync.getRepo?did=DID``), a DID, a handle, or an ``at://`` URI. Names are
resolved to the account's PDS with :mod:`repo_stream.net.identity` and fetched with
:mod:`repo_stream.net.fetch`; those modules (and httpx and dnspython) are imported only when a source
needs them, so opening a local file stays quick to start.

Example::

    from repo_stream import DriverBuilder
    from repo_stream.net.source import open_source

    async with open_source("alice.example.com") as opened:   # or a path, "-", a URL, a DID...
        driver = await DriverBuilder().load_car(opened.source)  # read inside the block
        ...
        opened.check_did(commit.did)   # the server sent the repo that was asked for

Specs: atproto.com/specs/handle, /specs/did (resolution), /specs/sync (``getRepo``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio

from ..errors import IdentityError, SourceError

if TYPE_CHECKING:
    import dns.asyncresolver
    import httpx

    from .fetch import CarStream, FetchOptions
    from .hosts import HostLimiter, HostSlot
    from .identity import ResolvedIdentity

__all__ = ["LocatedSource", "OpenedSource", "SourceKind", "classify_source", "locate_source", "open_source"]

SourceKind = Literal["path", "stdin", "url", "did", "handle"]


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
    from .identity import is_valid_handle

    return "handle" if is_valid_handle(source) else "path"


@dataclass(frozen=True)
class OpenedSource:
    """An opened SOURCE, from :func:`open_source`.

    Attributes:
        source: what to pass to ``DriverBuilder.load_car``: an anyio ``AsyncFile`` (path), a
            :class:`~repo_stream.read.pipe.PipeReader` (stdin)
            or a :class:`repo_stream.net.fetch.CarStream` (url, did, handle).
        kind: ``"path"``, ``"stdin"``, ``"url"``, ``"did"`` or ``"handle"``.
        name: the SOURCE string as given.
        did: the DID whose repo is expected (from the DID, handle or ``at://`` URI, or a getRepo
            URL's ``did`` parameter), or None for paths, stdin and other URLs.
        url: the URL fetched, or None.
        size: the CAR's size in bytes when known (a regular file's size, or Content-Length).
        identity: the resolved identity (DID and handle sources), else None.
        stream: the :class:`repo_stream.net.fetch.CarStream` for HTTP sources, else None.
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


@dataclass(frozen=True)
class LocatedSource:
    """Where a network SOURCE's repo is fetched from, found by :func:`locate_source` (identity
    look-ups done, nothing fetched yet); pass it to :func:`open_source` to fetch it.

    Attributes:
        name: the SOURCE string as given. kind: ``"url"``, ``"did"`` or ``"handle"``.
        url: the getRepo (or other) URL to fetch. did: the DID expected, or None (a URL that
        is not a getRepo URL). identity: the resolved identity (DID and handle sources), else None.
    """

    name: str
    kind: SourceKind
    url: str
    did: str | None = None
    identity: ResolvedIdentity | None = None


async def locate_source(
    source: str,
    *,
    plc_url: str | None = None,
    client: httpx.AsyncClient | None = None,
    dns_resolver: dns.asyncresolver.Resolver | None = None,
    identity_timeout: float | None = None,
    allow_private_hosts: bool = False,
) -> LocatedSource:
    """Resolve a URL, DID, handle or ``at://`` SOURCE to the URL its repo is fetched from,
    without fetching it: what :func:`open_source` does before its fetch. Lets a caller wait for
    the PDS host (e.g. a :class:`repo_stream.net.hosts.HostLimiter` slot) between the identity
    look-ups and the fetch. Arguments as for :func:`open_source`.

    Raises:
        ValueError: ``source`` is a path or ``-`` (nothing to locate: open it with :func:`open_source`).
        IdentityError, FetchError: as :func:`open_source`.
    """
    kind = classify_source(source)
    if kind in ("path", "stdin"):
        raise ValueError(f"{source!r} is a {kind}, not a URL, DID or handle: nothing to locate")
    from .fetch import repo_url
    from .identity import DEFAULT_PLC_URL, DEFAULT_TIMEOUT, _client_scope, parse_identifier, resolve_identity

    if kind == "url":
        return LocatedSource(name=source, kind=kind, url=source, did=_did_parameter(source))
    async with _client_scope(client, allow_private_hosts=allow_private_hosts, trusted=[plc_url or DEFAULT_PLC_URL]) as http:
        identity = await resolve_identity(
            parse_identifier(source),
            client=http,
            plc_url=plc_url or DEFAULT_PLC_URL,
            dns_resolver=dns_resolver,
            timeout=DEFAULT_TIMEOUT if identity_timeout is None else identity_timeout,
        )
    if identity.pds is None:
        raise IdentityError(
            f"{source}: the DID document of {identity.did} has no valid #atproto_pds service "
            "(type AtprotoPersonalDataServer, serviceEndpoint http(s)://host[:port])"
        )
    return LocatedSource(name=source, kind=kind, url=repo_url(identity.pds, identity.did), did=identity.did, identity=identity)


@asynccontextmanager
async def open_source(
    source: str | LocatedSource,
    *,
    plc_url: str | None = None,
    client: httpx.AsyncClient | None = None,
    dns_resolver: dns.asyncresolver.Resolver | None = None,
    identity_timeout: float | None = None,
    options: FetchOptions | None = None,
    stdin: Any = None,
    allow_private_hosts: bool = False,
    limiter: HostLimiter | HostSlot | None = None,
) -> AsyncIterator[OpenedSource]:
    """Open a SOURCE string as the command line takes it, yielding an :class:`OpenedSource`.

    SOURCE (classified by :func:`classify_source`) is:

    - a file path: opened with anyio; ``-``: standard input (``stdin`` if given, a binary file,
      else ``sys.stdin.buffer``; not closed);
    - an ``http://`` or ``https://`` URL, e.g. ``https://PDS/xrpc/com.atproto.sync.getRepo?did=DID``:
      fetched with :func:`repo_stream.net.fetch.fetch_car`;
    - a DID, handle, ``@handle`` or ``at://`` URI: resolved with
      :func:`repo_stream.net.identity.resolve_identity` (handles verified both ways) to the PDS of
      its DID document, then ``{pds}/xrpc/com.atproto.sync.getRepo?did={did}`` is fetched.

    Read the CAR inside the ``async with`` block: the file or response is closed on exit.

    Args:
        source: the SOURCE string.
        plc_url: PLC directory base URL for ``did:plc`` (None: ``https://plc.directory``).
        client: the HTTP client for resolution and fetching (default: a new one, closed on exit).
        dns_resolver: DNS resolver for handles (default: the system's).
        identity_timeout: seconds for each identity lookup (None: 10).
        options: the fetch's timeouts, size cap and retries (:class:`repo_stream.net.fetch.FetchOptions`).
        stdin: the binary file to read for ``-``.
        allow_private_hosts: let hosts learned from the network (the DID document's PDS, a
            ``did:web`` host, a handle's domain, redirect targets) resolve to private addresses.
            By default they must be public unicast (:mod:`repo_stream.net.guard`); a URL SOURCE
            and ``plc_url`` are named by the user and connected as given. Applies to the client
            made here or one from :func:`repo_stream.net.guard.make_client`; a client of your
            own connects as its transport does.
        limiter: per-host politeness for the fetch, as for :func:`repo_stream.net.fetch.fetch_car`
            (identity look-ups are not limited).

    ``source`` may also be a :class:`LocatedSource` (from :func:`locate_source`): its URL is
    fetched with no further look-up.

    Raises:
        SourceError: a path that cannot be opened (missing, a directory, no permission).
        IdentityError: a malformed DID, handle or at:// URI (or a bad ``did`` parameter in a
            getRepo URL), resolution failing, or a DID document with no ``#atproto_pds``.
        FetchError: as :func:`repo_stream.net.fetch.fetch_car` (an invalid URL too); a PDS that
            resolves to a private address.
    """
    if isinstance(source, LocatedSource):
        located: LocatedSource | None = source
        kind: SourceKind = source.kind
    else:
        located = None
        kind = classify_source(source)
    if isinstance(source, str) and kind == "stdin":
        from ..read.pipe import PipeReader

        handle = stdin if stdin is not None else sys.stdin.buffer
        yield OpenedSource(source=PipeReader(handle), kind=kind, name=source)  # Ctrl-C stops an idle pipe
        return
    if isinstance(source, str) and kind == "path":
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
    from .fetch import fetch_car
    from .identity import DEFAULT_PLC_URL, _client_scope

    async with AsyncExitStack() as stack:
        name = source.name if isinstance(source, LocatedSource) else source
        trusted = [name] if kind == "url" else [plc_url or DEFAULT_PLC_URL]
        http = await stack.enter_async_context(_client_scope(client, allow_private_hosts=allow_private_hosts, trusted=trusted))
        if located is None:
            assert isinstance(source, str)
            located = await locate_source(
                source, plc_url=plc_url, client=http, dns_resolver=dns_resolver, identity_timeout=identity_timeout
            )
        url, did = located.url, located.did
        stream = await stack.enter_async_context(fetch_car(url, did=did, client=http, options=options, limiter=limiter))
        yield OpenedSource(
            source=stream, kind=kind, name=name, did=did, url=url, size=stream.content_length, identity=located.identity, stream=stream
        )


def _did_parameter(url: str) -> str | None:
    """The ``did`` query parameter of a getRepo URL, checked for DID syntax; None for other URLs."""
    import httpx

    from ..errors import FetchError
    from .identity import is_valid_did

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
