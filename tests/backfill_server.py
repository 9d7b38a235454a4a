"""A local PDS for the backfill tests and benchmark: getRepo answers per DID, listRepos and
listReposByCollection pages.

:class:`RepoHost` is a :class:`tests.servers.LocalHTTPServer` whose route table also tells
requests apart by query: ``getRepo?did=DID`` is routed as the path ``/xrpc/com.atproto.sync.getRepo?did=DID``
and ``listRepos?cursor=C`` as ``/xrpc/com.atproto.sync.listRepos?cursor=C`` (no cursor: the bare
path), so one server plays a different script for every repo and every page.
"""

from __future__ import annotations

import io
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import parse_qs, urlsplit

from repo_stream.records.writer import build_repo_car

from .servers import LocalHTTPServer, Reply, Request, json_reply

GET_REPO = "/xrpc/com.atproto.sync.getRepo"
LIST_REPOS = "/xrpc/com.atproto.sync.listRepos"
BY_COLLECTION = "/xrpc/com.atproto.sync.listReposByCollection"


def repo_records(did: str, n: int, size: int = 40) -> list[tuple[str, bytes]]:
    """``n`` posts for ``did``, ``(key, DAG-CBOR block)``, with about ``size`` bytes of text each."""
    import cbor2

    return [
        (f"app.bsky.feed.post/3k{i:06d}", cbor2.dumps({"$type": "app.bsky.feed.post", "text": f"{did} {i} " + "x" * size}, canonical=True))
        for i in range(n)
    ]


def repo_car_of(did: str, n: int, rev: str = "3kaaaaaaaaaaa", size: int = 40) -> bytes:
    """A canonical repo CAR of :func:`repo_records` ``(did, n, size)``."""
    out = io.BytesIO()
    build_repo_car(repo_records(did, n, size), did=did, rev=rev, path=out)
    return out.getvalue()


def car_reply(data: bytes, **options: Any) -> Reply:
    """A getRepo answer carrying ``data``."""
    return Reply(body=data, content_type="application/vnd.ipld.car", **options)


class RepoHost(LocalHTTPServer):
    """A local HTTP server that routes getRepo by its ``did`` and listRepos by its ``cursor``.

    ``serving`` counts the getRepo answers being sent right now and ``serving_peak`` the most
    at once (a request counts from its arrival until its last byte is written)."""

    def __init__(self) -> None:
        super().__init__()
        self.serving = 0
        self.serving_peak = 0

    def repo(self, did: str, reply: Reply | list[Reply]) -> str:
        """Serve ``reply`` for ``getRepo?did=DID``; return that URL."""
        self.route("*", f"{GET_REPO}?did={did}", reply)
        return self.repo_url(did)

    def repo_url(self, did: str) -> str:
        return f"{self.base}{GET_REPO}?did={did}"

    def listing(self, pages: list[list[dict[str, Any]]]) -> None:
        """Serve listRepos as these pages, each but the last with a cursor to the next."""
        for i, repos in enumerate(pages):
            body: dict[str, Any] = {"repos": repos}
            if i + 1 < len(pages):
                body["cursor"] = f"page{i + 1}"
            path = LIST_REPOS if i == 0 else f"{LIST_REPOS}?cursor=page{i}"
            self.route("*", path, json_reply(body))

    def collection_listing(self, collection: str, pages: list[list[dict[str, Any]]]) -> None:
        """Serve listReposByCollection for ``collection`` as these pages, each but the last with a
        cursor to the next."""
        for i, repos in enumerate(pages):
            body: dict[str, Any] = {"repos": repos}
            if i + 1 < len(pages):
                body["cursor"] = f"page{i + 1}"
            self.route("*", self.collection_key(collection, f"page{i}" if i else None), json_reply(body))

    @staticmethod
    def collection_key(collection: str, cursor: str | None = None) -> str:
        """The route of one listReposByCollection page."""
        return f"{BY_COLLECTION}?collection={collection}" + (f"&cursor={cursor}" if cursor is not None else "")

    def fetches(self, did: str | None = None) -> list[Request]:
        """The getRepo requests received (for ``did``, if given)."""
        return [r for r in self.requests if r.path == GET_REPO and (did is None or parse_qs(r.query).get("did") == [did])]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        host = (handler.headers.get("Host") or "").split(":")[0]
        with self._lock:
            self.requests.append(Request(host, parts.path, parts.query, dict(handler.headers.items()), time.monotonic()))
        query = parse_qs(parts.query)
        key = parts.path
        if parts.path == GET_REPO and "did" in query:
            key = f"{GET_REPO}?did={query['did'][0]}"
        elif parts.path == LIST_REPOS and "cursor" in query:
            key = f"{LIST_REPOS}?cursor={query['cursor'][0]}"
        elif parts.path == BY_COLLECTION and "collection" in query:
            key = self.collection_key(query["collection"][0], query["cursor"][0] if "cursor" in query else None)
        reply = self._next_reply(host, key)
        counted = parts.path == GET_REPO
        if counted:
            with self._lock:
                self.serving += 1
                self.serving_peak = max(self.serving_peak, self.serving)
        try:
            self._send(handler, reply)
        except OSError:
            handler.close_connection = True
        finally:
            if counted:
                with self._lock:
                    self.serving -= 1
