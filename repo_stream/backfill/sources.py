"""Where a backfill's repos come from: a list file (or standard input), a host's
``com.atproto.sync.listRepos`` pages, or the repos with a record in a collection as a relay
lists them (``com.atproto.sync.listReposByCollection``).

Spec: atproto.com/specs/sync (``com.atproto.sync.listRepos``), lexicon
``com.atproto.sync.listReposByCollection``."""

from __future__ import annotations

import json
import random
import re
import sqlite3
import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import FetchError, SourceError

if TYPE_CHECKING:
    import httpx

__all__ = [
    "MAX_LISTING_WAIT",
    "MAX_PAGE_BYTES",
    "SeenDids",
    "collection_sources",
    "host_sources",
    "is_valid_nsid",
    "list_repos",
    "list_repos_by_collection",
    "read_repo_list",
]


async def read_repo_list(path: str, *, stdin: Any = None) -> AsyncIterator[str]:
    """Yield the identifiers of a file, one a line (``-``: standard input, or the binary file
    ``stdin``); blank lines and lines starting with ``#`` are skipped, spaces trimmed.

    Raises:
        SourceError: the file cannot be opened or read, or is not UTF-8 text
            (``cannot read repo list PATH: No such file or directory``).
    """
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            from ..read.pipe import PipeReader

            reader = PipeReader(stdin if stdin is not None else sys.stdin.buffer)  # Ctrl-C stops an idle pipe
            async for line in reader.lines():
                if entry := _entry(line):
                    yield entry
            return
        async with await anyio.open_file(path, "r", encoding="utf-8") as file:
            async for line in file:
                if entry := _entry(line):
                    yield entry
    except OSError as exc:
        raise SourceError(f"cannot read repo list {name}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"cannot read repo list {name}: not UTF-8 text ({exc.reason})") from exc


def _entry(line: str) -> str | None:
    """A list line's identifier, or None for a blank or ``#`` comment line."""
    name = line.strip()
    return name if name and not name.startswith("#") else None


MAX_PAGE_BYTES = 2 * 1024 * 1024
"""Largest listRepos page read, bytes as decoded: 2 MiB (a page of 1000 repos is ~150 kB)."""


class SeenDids:
    """A set of DIDs (or any strings) kept in SQLite's private temporary database
    (``sqlite3.connect("")``), so that its memory stays within a 2 MiB page cache however many
    are added: a relay's 40 million DIDs would take ~4 GB as a Python set. The file, in the
    temporary folder, exists only while the cache overflows and goes with the connection."""

    def __init__(self) -> None:
        self._db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA cache_size=-2048")
        self._db.execute("CREATE TABLE seen (key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID")

    def add(self, key: str, value: str = "") -> str | None:
        """Add ``key``; None if it is new, else the ``value`` it was first added with."""
        row = self._db.execute("SELECT value FROM seen WHERE key = ?", (key,)).fetchone()
        if row is not None:
            return str(row[0])
        self._db.execute("INSERT INTO seen VALUES (?, ?)", (key, value))
        return None

    def close(self) -> None:
        """Drop the set (its file goes with it)."""
        self._db.close()


async def list_repos(
    host: str,
    *,
    client: httpx.AsyncClient | None = None,
    page_size: int = 1000,
    timeout: float = 30.0,
    include_inactive: bool = False,
    allow_private_hosts: bool = False,
    retries: int = 3,
    backoff: float = 1.0,
) -> AsyncIterator[str]:
    """Yield the DID of every repo a PDS or relay hosts, from ``com.atproto.sync.listRepos``,
    page by page (following ``cursor`` until a page comes back without one or empty).

    Repos listed with ``"active": false`` are left out unless ``include_inactive`` (their getRepo
    fails by spec). Pages are fetched one at a time, as the consumer needs them. A hostile host
    cannot make the listing endless or large: each page is read (decoded) up to
    :data:`MAX_PAGE_BYTES` and parsed within that; a page listing more repos than the ``limit``
    asked, or a ``cursor`` that was already followed (a cycle), fails the listing; a DID listed
    again is left out (DIDs and cursors are kept in :class:`SeenDids`, on disk past 2 MiB).

    A page that fails in a way another try may fix (HTTP 429, 500, 502, 503 or 504, a dropped
    or refused connection, no complete page within ``timeout``) is asked again, up to
    ``retries`` times, after ``backoff`` seconds doubled per try (with jitter, at most 30 s) or
    as long as the host asks if longer: ``Retry-After`` (seconds or an HTTP date), or on a 429
    without it ``RateLimit-Reset`` (seconds, or the Unix time of the reset as Bluesky's hosts
    send it). A host asking for more than :data:`MAX_LISTING_WAIT` (60 s) fails the listing.

    Args:
        host: the host's base URL, e.g. ``https://pds.example.com`` (named by the user: connected
            as given, even on a private address).
        client: the HTTP client (default: a new one, closed at the end).
        page_size: the ``limit`` asked per page (1..1000).
        timeout: seconds allowed per page, redirects and body included.
        allow_private_hosts: let redirects lead to private addresses (see
            :mod:`repo_stream.net.guard`).
        retries: tries after the first for a page that failed transiently, >= 0.
        backoff: seconds before the first retry (doubled for each next), >= 0.

    Raises:
        FetchError: a page fails (status, connection, timeout, over the size cap, not JSON, wrong
            shape, more repos than asked; transient failures after ``retries`` more tries), or a
            cursor repeats; the message names the URL and cursor.
        ValueError: ``page_size`` out of 1..1000, ``retries`` or ``backoff`` negative.

    Spec: atproto.com/specs/sync ("com.atproto.sync.listRepos"), lexicon ``com.atproto.sync.listRepos``.
    """
    if not 1 <= page_size <= 1000:
        raise ValueError(f"page_size must be within 1..1000, got {page_size}")
    _check_retries(retries, backoff)
    async for did in _list_pages(
        host, "com.atproto.sync.listRepos", {}, client=client, page_size=page_size, timeout=timeout,
        include_inactive=include_inactive, allow_private_hosts=allow_private_hosts, retries=retries, backoff=backoff,
    ):  # fmt: skip
        yield did


_NSID = re.compile(r"^[a-zA-Z](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?)+\.[a-zA-Z][a-zA-Z0-9]{0,62}$")


def is_valid_nsid(nsid: str) -> bool:
    """Whether ``nsid`` has NSID syntax (atproto.com/specs/nsid): at least three segments of
    ASCII letters, digits and inner hyphens, the first not starting with a digit, the last (the
    name) letters and digits only, 317 characters at most."""
    return len(nsid) <= 317 and _NSID.match(nsid) is not None


async def list_repos_by_collection(
    host: str,
    collection: str,
    *,
    client: httpx.AsyncClient | None = None,
    page_size: int = 1000,
    timeout: float = 30.0,
    allow_private_hosts: bool = False,
    retries: int = 3,
    backoff: float = 1.0,
) -> AsyncIterator[str]:
    """Yield the DID of every repo that has at least one record in ``collection``, as ``host``
    (a relay or collection directory that serves it) lists them with
    ``com.atproto.sync.listReposByCollection``, page by page (``collection``, ``limit`` and
    ``cursor`` parameters; answers ``{"repos": [{"did": ...}], "cursor": ...}``).

    The same caps as :func:`list_repos`: one page at a time, each read up to
    :data:`MAX_PAGE_BYTES` as decoded within ``timeout`` seconds; more repos than the ``limit``
    asked, an entry without a ``did`` string, a cursor over 4096 characters or one already
    followed (a cycle) fail the listing; a DID listed again is left out. Transient failures are
    retried as :func:`list_repos` says (``retries``, ``backoff``, ``Retry-After``,
    ``RateLimit-Reset``).

    Args:
        host: the host's base URL, e.g. ``https://relay1.us-east.bsky.network`` (named by the
            user: connected as given, even on a private address).
        collection: the NSID, e.g. ``app.bsky.feed.post``.
        client: the HTTP client (default: a new one, closed at the end).
        page_size: the ``limit`` asked per page (1..2000, the lexicon's range).
        timeout: seconds allowed per page, redirects and body included.
        allow_private_hosts: let redirects lead to private addresses.
        retries: tries after the first for a page that failed transiently, >= 0.
        backoff: seconds before the first retry (doubled for each next), >= 0.

    Raises:
        UnsupportedMethodError: the host does not serve ``listReposByCollection`` (HTTP 404 or
            501, or an XRPC ``MethodNotImplemented``): ask a relay or collection directory.
        FetchError: a page fails otherwise, as for :func:`list_repos`.
        ValueError: ``collection`` is not an NSID, ``page_size`` out of 1..2000, ``retries`` or
            ``backoff`` negative.

    Spec: lexicon ``com.atproto.sync.listReposByCollection``.
    """
    if not is_valid_nsid(collection):
        raise ValueError(f"{collection!r} is not a collection NSID (e.g. app.bsky.feed.post; atproto.com/specs/nsid)")
    if not 1 <= page_size <= 2000:
        raise ValueError(f"page_size must be within 1..2000, got {page_size}")
    _check_retries(retries, backoff)
    async for did in _list_pages(
        host, "com.atproto.sync.listReposByCollection", {"collection": collection}, client=client, page_size=page_size,
        timeout=timeout, include_inactive=True, allow_private_hosts=allow_private_hosts, retries=retries, backoff=backoff,
    ):  # fmt: skip
        yield did


def _check_retries(retries: int, backoff: float) -> None:
    if retries < 0:
        raise ValueError(f"retries must be at least 0, got {retries}")
    if not backoff >= 0:
        raise ValueError(f"backoff must be at least 0 seconds, got {backoff}")


async def _list_pages(
    host: str,
    method: str,
    fixed: dict[str, str],
    *,
    client: httpx.AsyncClient | None,
    page_size: int,
    timeout: float,
    include_inactive: bool,
    allow_private_hosts: bool,
    retries: int,
    backoff: float,
) -> AsyncIterator[str]:
    """The DIDs of the ``{"repos": [{"did"}], "cursor"}`` pages of the XRPC ``method`` at
    ``host``, asked with ``fixed`` params plus ``limit`` and ``cursor`` (see :func:`list_repos`)."""
    from ..net.identity import _client_scope

    name = method.rsplit(".", 1)[-1]
    base = host.rstrip("/") + "/xrpc/" + method
    cursor: str | None = None
    seen = SeenDids()
    try:
        async with _client_scope(client, allow_private_hosts=allow_private_hosts, trusted=(base,)) as http:
            while True:
                params: dict[str, str | int] = {**fixed, "limit": page_size}
                if cursor is not None:
                    params["cursor"] = cursor
                where = f"{name} {base}" + "".join(f" ({k} {v})" for k, v in fixed.items()) + (f" (cursor {cursor!r})" if cursor is not None else "")

                body, content_type = await _page_with_retries(http, base, params, where, method, timeout, retries, backoff)
                try:
                    page = json.loads(body)
                except (ValueError, RecursionError):
                    raise FetchError(f"{where}: the answer (HTTP 200, {content_type}) is not JSON", url=base, status=200) from None
                del body
                repos = page.get("repos") if isinstance(page, dict) else None
                if not isinstance(repos, list):
                    raise FetchError(f"{where}: the answer has no 'repos' list", url=base, status=200)
                if len(repos) > page_size:
                    raise FetchError(f"{where}: the page lists {len(repos)} repos, more than the limit of {page_size} asked", url=base, status=200)
                for repo in repos:
                    if not isinstance(repo, dict) or not isinstance(repo.get("did"), str):
                        raise FetchError(f"{where}: a 'repos' entry has no 'did' string: {str(repo)[:100]}", url=base, status=200)
                if not isinstance(page, dict):  # for mypy: checked above
                    return
                next_cursor = page.get("cursor")
                del page
                for repo in repos:
                    if (include_inactive or repo.get("active", True) is not False) and seen.add(repo["did"]) is None:
                        yield repo["did"]
                if not repos or not isinstance(next_cursor, str) or not next_cursor:
                    return
                if len(next_cursor) > 4096:
                    raise FetchError(f"{where}: the next cursor is {len(next_cursor)} characters long, more than 4096", url=base, status=200)
                if next_cursor == cursor or seen.add("\0cursor " + next_cursor) is not None:
                    raise FetchError(f"{where}: the host sent the cursor {next_cursor[:100]!r} again: a cycle, the listing stops", url=base, status=200)
                cursor = next_cursor
    finally:
        seen.close()


#: Statuses after which a listing page is asked again (rate limited, or the host is overloaded).
_TRANSIENT_STATUSES = (429, 500, 502, 503, 504)
#: The longest wait a host may ask for (``Retry-After`` or ``RateLimit-Reset``), seconds; a longer one fails the listing.
MAX_LISTING_WAIT = 60.0


class _TransientPage(Exception):
    """A page failed in a way another try may fix: ``error`` to raise if none is left, and the
    seconds the host asked to wait (or None)."""

    def __init__(self, error: FetchError, wait: float | None) -> None:
        super().__init__(str(error))
        self.error = error
        self.wait = wait


async def _page_with_retries(
    http: httpx.AsyncClient, base: str, params: dict[str, str | int], where: str, method: str, timeout: float, retries: int, backoff: float
) -> tuple[bytes, str]:
    """One listing page's body and content type, asked again up to ``retries`` times after a
    transient failure (see :func:`list_repos`), waiting ``backoff`` seconds doubled per try (with
    jitter, at most 30 s) or as long as the host asks, if longer."""
    attempt = 0
    while True:
        attempt += 1
        try:
            return await _page(http, base, params, where, method, timeout)
        except _TransientPage as failure:
            error, wait = failure.error, failure.wait
            if wait is not None and wait > MAX_LISTING_WAIT:
                raise FetchError(
                    f"{error}; the host asks to retry after {wait:g} s, more than the {MAX_LISTING_WAIT:g} s allowed",
                    url=base, status=error.status, retry_after=wait, xrpc_error=error.xrpc_error,
                ) from None  # fmt: skip
            if attempt > retries:
                tries = f" (after {attempt} attempts)" if attempt > 1 else ""
                raise FetchError(f"{error}{tries}", url=base, status=error.status, retry_after=wait, xrpc_error=error.xrpc_error) from error.__cause__
            delay = min(30.0, backoff * 2.0 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            await anyio.sleep(max(delay, wait or 0.0))


async def _page(http: httpx.AsyncClient, base: str, params: dict[str, str | int], where: str, method: str, timeout: float) -> tuple[bytes, str]:
    """One try at a listing page: its body (read up to :data:`MAX_PAGE_BYTES` as decoded) and
    content type. Raises :class:`_TransientPage` for a failure worth another try, else
    :class:`~repo_stream.errors.UnsupportedMethodError` or :class:`~repo_stream.errors.FetchError`."""
    import httpx

    from ..errors import UnsupportedMethodError
    from ..net.fetch import _retryable, parse_ratelimit_reset, parse_retry_after
    from ..net.http import BodyError, describe_error, read_body, read_snippet, send

    def fail(message: str) -> FetchError:
        return FetchError(f"{where}: {message}", url=base)

    try:
        with anyio.fail_after(timeout):
            response = await send(http, base, params=params, timeout=timeout, fail=fail)
            try:
                status = response.status_code
                content_type = response.headers.get("content-type", "no content type")
                if status != 200:
                    raw = (await read_snippet(response, 4096, timeout)).decode("utf-8", "replace")
                    xrpc_error = _xrpc_error(raw)
                    text = " ".join(raw.split())[:200]
                    snippet = "".join(ch if ch.isprintable() else "?" for ch in text)
                    message = f"{where}: HTTP {status} ({content_type})" + (f": {snippet}" if snippet else "")
                    if status in (404, 501) or xrpc_error in ("MethodNotImplemented", "MethodNotFound"):
                        raise UnsupportedMethodError(
                            f"{message}: the host does not serve {method}", method=method, url=base, status=status, xrpc_error=xrpc_error
                        )
                    error = FetchError(message, url=base, status=status, xrpc_error=xrpc_error)
                    if status in _TRANSIENT_STATUSES:
                        wait = parse_retry_after(response.headers.get("retry-after"))
                        if wait is None and status == 429:
                            wait = parse_ratelimit_reset(response.headers.get("ratelimit-reset"))
                        raise _TransientPage(error, wait)
                    raise error
                return await read_body(response, MAX_PAGE_BYTES), content_type
            finally:
                await response.aclose()
    except TimeoutError:
        raise _TransientPage(FetchError(f"{where}: no complete page within {timeout:g} s", url=base), None) from None
    except BodyError as exc:
        raise FetchError(f"{where}: {exc}", url=base, status=200) from None
    except httpx.HTTPError as exc:
        error = FetchError(f"{where}: {describe_error(exc)}", url=base)
        if _retryable(exc):
            raise _TransientPage(error, None) from exc
        raise error from exc


def _xrpc_error(text: str) -> str | None:
    """The ``error`` name of an XRPC error body, or None."""
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        return None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    return error if isinstance(error, str) else None


async def host_sources(
    host: str,
    *,
    client: httpx.AsyncClient | None = None,
    page_size: int = 1000,
    allow_private_hosts: bool = False,
    retries: int = 3,
    backoff: float = 1.0,
) -> AsyncIterator[str]:
    """Every active repo of ``host`` (:func:`list_repos`) as its getRepo URL on that host
    (``{host}/xrpc/com.atproto.sync.getRepo?did=DID``), so repos are fetched from the host
    itself with no identity look-ups, and each commit's DID is still checked."""
    from ..net.fetch import repo_url

    async for did in list_repos(
        host, client=client, page_size=page_size, allow_private_hosts=allow_private_hosts, retries=retries, backoff=backoff
    ):
        yield repo_url(host, did)


async def collection_sources(
    host: str,
    collection: str,
    *,
    client: httpx.AsyncClient | None = None,
    page_size: int = 1000,
    allow_private_hosts: bool = False,
    retries: int = 3,
    backoff: float = 1.0,
) -> AsyncIterator[str]:
    """The DIDs of every repo with a record in ``collection`` (:func:`list_repos_by_collection`
    at ``host``, a relay or collection directory), as backfill sources: each is resolved to its
    own PDS (the host that lists them does not serve their repos). Same errors as
    :func:`list_repos_by_collection`."""
    async for did in list_repos_by_collection(
        host, collection, client=client, page_size=page_size, allow_private_hosts=allow_private_hosts, retries=retries, backoff=backoff
    ):
        yield did
