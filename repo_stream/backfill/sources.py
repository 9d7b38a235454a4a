"""Where a backfill's repos come from: a list file (or standard input), or a host's
``com.atproto.sync.listRepos`` pages.

Spec: atproto.com/specs/sync (``com.atproto.sync.listRepos``)."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio

from ..errors import FetchError, SourceError

if TYPE_CHECKING:
    import httpx

__all__ = ["host_sources", "list_repos", "read_repo_list"]


async def read_repo_list(path: str, *, stdin: Any = None) -> AsyncIterator[str]:
    """Yield the identifiers of a file, one a line (``-``: standard input, or the text file
    ``stdin``); blank lines and lines starting with ``#`` are skipped, spaces trimmed.

    Raises:
        SourceError: the file cannot be opened or read, or is not UTF-8 text
            (``cannot read repo list PATH: No such file or directory``).
    """
    name = "standard input" if path == "-" else path
    try:
        if path == "-":
            lines: Any = anyio.wrap_file(stdin if stdin is not None else sys.stdin)
            async for line in lines:
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


async def list_repos(
    host: str,
    *,
    client: httpx.AsyncClient | None = None,
    page_size: int = 1000,
    timeout: float = 30.0,
    include_inactive: bool = False,
) -> AsyncIterator[str]:
    """Yield the DID of every repo a PDS or relay hosts, from ``com.atproto.sync.listRepos``,
    page by page (following ``cursor`` until a page comes back without one or empty).

    Repos listed with ``"active": false`` are left out unless ``include_inactive`` (their getRepo
    fails by spec). Pages are fetched one at a time, as the consumer needs them.

    Args:
        host: the host's base URL, e.g. ``https://pds.example.com``.
        client: the HTTP client (default: a new one, closed at the end).
        page_size: the ``limit`` asked per page (1..1000).
        timeout: seconds allowed per page.

    Raises:
        FetchError: a page fails (status, connection, timeout, not JSON, wrong shape); the message
            names the URL and cursor.

    Spec: atproto.com/specs/sync ("com.atproto.sync.listRepos"), lexicon ``com.atproto.sync.listRepos``.
    """
    import httpx

    from ..net.identity import _client_scope

    base = host.rstrip("/") + "/xrpc/com.atproto.sync.listRepos"
    cursor: str | None = None
    async with _client_scope(client) as http:
        while True:
            params: dict[str, str | int] = {"limit": page_size}
            if cursor is not None:
                params["cursor"] = cursor
            where = f"listRepos {base}" + (f" (cursor {cursor!r})" if cursor is not None else "")
            try:
                response = await http.get(base, params=params, timeout=timeout, follow_redirects=True)
            except httpx.HTTPError as exc:
                raise FetchError(f"{where}: {type(exc).__name__}: {exc or 'no detail'}", url=base) from exc
            if response.status_code != 200:
                snippet = " ".join(response.text.split())[:200]
                raise FetchError(f"{where}: HTTP {response.status_code}: {snippet}", url=base, status=response.status_code)
            try:
                page = response.json()
            except ValueError:
                raise FetchError(f"{where}: the answer is not JSON", url=base, status=200) from None
            repos = page.get("repos") if isinstance(page, dict) else None
            if not isinstance(repos, list):
                raise FetchError(f"{where}: the answer has no 'repos' list", url=base, status=200)
            for repo in repos:
                if not isinstance(repo, dict) or not isinstance(repo.get("did"), str):
                    raise FetchError(f"{where}: a 'repos' entry has no 'did' string: {str(repo)[:100]}", url=base, status=200)
                if include_inactive or repo.get("active", True) is not False:
                    yield repo["did"]
            next_cursor = page.get("cursor")
            if not repos or not isinstance(next_cursor, str) or not next_cursor or next_cursor == cursor:
                return
            cursor = next_cursor


async def host_sources(host: str, *, client: httpx.AsyncClient | None = None, page_size: int = 1000) -> AsyncIterator[str]:
    """Every active repo of ``host`` (:func:`list_repos`) as its getRepo URL on that host
    (``{host}/xrpc/com.atproto.sync.getRepo?did=DID``), so repos are fetched from the host
    itself with no identity look-ups, and each commit's DID is still checked."""
    from ..net.fetch import repo_url

    async for did in list_repos(host, client=client, page_size=page_size):
        yield repo_url(host, did)
