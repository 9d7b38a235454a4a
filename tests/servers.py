"""Real local servers for the network tests: an HTTP server and a UDP DNS server on 127.0.0.1.

Both run in a daemon thread, so they serve tests on asyncio and on trio alike.

- :class:`LocalHTTPServer` answers by ``(Host header, path)`` from a table of :class:`Reply`
  scripts (a list is played in order, its last entry repeating), and logs every request.
- :class:`LocalTransport` is an ``httpx`` transport that sends every request, whatever its scheme,
  host and port, to the local HTTP server over a real TCP connection, keeping the original
  ``Host`` header, and records the URLs the library asked for. This is how the tests reach
  ``https://HANDLE/.well-known/atproto-did`` and ``https://HOST/.well-known/did.json``, which the
  specs fix on port 443, without certificates or the internet.
- :class:`LocalDNSServer` answers TXT queries from a table, NXDOMAIN for other names, SERVFAIL
  or silence for names it is told to fail on. Built with dnspython's message API.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import urlsplit

import dns.exception
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import httpx
import pytest


@dataclass
class Reply:
    """One scripted HTTP answer.

    Attributes:
        status: the HTTP status.
        body: the body bytes.
        headers: extra headers.
        content_type: the Content-Type.
        chunk: send the body in pieces of this many bytes (default: all at once).
        delay: seconds to wait before each piece (a slow server).
        head_delay: seconds to wait before the status line (a server slow to answer).
        send: send only the first ``send`` bytes of the body, then close the connection
            (Content-Length still announces the whole body: a truncated answer).
        length: announce this Content-Length instead of ``len(body)``; None: the true length;
            ``-1``: no Content-Length, the body ends when the connection closes.
        drop: close the connection without answering at all.
    """

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_type: str = "application/octet-stream"
    chunk: int | None = None
    delay: float = 0.0
    head_delay: float = 0.0
    send: int | None = None
    length: int | None = None
    drop: bool = False


#: Answers after which a client should try again: rate limited (with the wait in either header),
#: overloaded, or a connection dropped without an answer. For ``parametrize("failure", ...)``.
TRANSIENT_FAILURES = [
    pytest.param(Reply(status=429, headers={"Retry-After": "0"}), id="429-retry-after"),
    pytest.param(Reply(status=429, headers={"RateLimit-Reset": "0"}), id="429-ratelimit-reset"),
    pytest.param(Reply(status=503), id="503"),
    pytest.param(Reply(drop=True), id="dropped"),
]


def json_reply(value: Any, status: int = 200) -> Reply:
    """A JSON answer."""
    return Reply(status=status, body=json.dumps(value).encode(), content_type="application/json")


def text_reply(text: str, status: int = 200) -> Reply:
    """A text/plain answer."""
    return Reply(status=status, body=text.encode(), content_type="text/plain")


@dataclass
class Request:
    """One request the HTTP server received."""

    host: str
    path: str
    query: str
    headers: dict[str, str]
    at: float


class LocalHTTPServer:
    """An HTTP/1.1 server on 127.0.0.1 (an ephemeral port) answering from a route table.

    ``routes[(host, path)]`` is a :class:`Reply` or a list of them, played in order with the last
    repeating; ``host`` is the Host header without its port, or ``"*"`` to match any host. A
    request with no route gets 404. ``requests`` logs every request received; ``bytes_served[path]``
counts the body bytes written for ``path``. Use as a context
    manager; closing it also wakes handlers that are sleeping in a slow reply.
    """

    def __init__(self) -> None:
        self.routes: dict[tuple[str, str], Reply | list[Reply]] = {}
        self.requests: list[Request] = []
        self.bytes_served: dict[str, int] = {}
        self._played: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out as two writes: with Nagle's algorithm the body waits for
            # the client's delayed ACK of the headers (~40 ms a kept-alive request).
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # clients that time out or go away mid-answer are part of the tests

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def route(self, host: str, path: str, reply: Reply | list[Reply]) -> None:
        """Answer GET ``path`` (no query) for Host ``host`` with ``reply``."""
        self.routes[(host, path)] = reply

    def hits(self, path: str, host: str | None = None) -> list[Request]:
        """The requests received for ``path`` (and ``host``, if given)."""
        return [r for r in self.requests if r.path == path and (host is None or r.host == host)]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _next_reply(self, host: str, path: str) -> Reply:
        with self._lock:
            for key in ((host, path), ("*", path)):
                script = self.routes.get(key)
                if script is None:
                    continue
                if isinstance(script, Reply):
                    return script
                i = self._played.get(key, 0)
                self._played[key] = i + 1
                return script[min(i, len(script) - 1)]
        return Reply(status=404, body=b'{"error":"NotFound","message":"no such route"}', content_type="application/json")

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        host = (handler.headers.get("Host") or "").split(":")[0]
        with self._lock:
            self.requests.append(Request(host, parts.path, parts.query, dict(handler.headers.items()), time.monotonic()))
        reply = self._next_reply(host, parts.path)
        try:
            self._send(handler, reply, parts.path)
        except OSError:  # the client went away (timeouts in tests): nothing to do
            handler.close_connection = True

    def _send(self, handler: BaseHTTPRequestHandler, reply: Reply, path: str = "") -> None:
        if reply.drop:
            handler.close_connection = True
            return
        if reply.head_delay and self.stopping.wait(reply.head_delay):
            return
        handler.send_response(reply.status)
        handler.send_header("Content-Type", reply.content_type)
        for name, value in reply.headers.items():
            handler.send_header(name, value)
        length = len(reply.body) if reply.length is None else reply.length
        if length >= 0:
            handler.send_header("Content-Length", str(length))
        if length < 0 or reply.send is not None:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        body = reply.body if reply.send is None else reply.body[: reply.send]
        step = reply.chunk or max(1, len(body))
        for start in range(0, len(body), step):
            if reply.delay and self.stopping.wait(reply.delay):
                return
            handler.wfile.write(body[start : start + step])
            handler.wfile.flush()
            with self._lock:
                self.bytes_served[path] = self.bytes_served.get(path, 0) + len(body[start : start + step])
        if handler.close_connection:
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_WR)


class LocalTransport(httpx.AsyncBaseTransport):
    """Sends every request to ``127.0.0.1:port`` over plain HTTP through a real httpx transport,
    keeping the request's own Host header; ``urls`` records the URLs as the library built them."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.urls: list[str] = []
        self._inner = httpx.AsyncHTTPTransport(verify=False)  # plain HTTP only: skip loading CA certificates

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.urls.append(str(request.url))
        request.url = request.url.copy_with(scheme="http", host="127.0.0.1", port=self.port)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


def local_client(server: LocalHTTPServer) -> tuple[httpx.AsyncClient, LocalTransport]:
    """An httpx client whose every request goes to ``server``, and its transport (for ``urls``)."""
    transport = LocalTransport(server.port)
    return httpx.AsyncClient(transport=transport), transport


class LocalDNSServer:
    """A UDP DNS server on 127.0.0.1 (an ephemeral port).

    ``txt[name]`` lists the TXT strings of ``name`` (lowercase, no trailing dot); a name in
    ``servfail`` answers SERVFAIL; a name in ``silent`` gets no answer (the client times out);
    a name in ``empty`` exists but has no TXT record (NOERROR, no answer); any other name is
    NXDOMAIN. ``delay[name]`` holds an answer back that many seconds. ``queries`` logs
    ``(name, type)`` of every query.
    """

    def __init__(self) -> None:
        self.txt: dict[str, list[str]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()
        self.empty: set[str] = set()
        self.delay: dict[str, float] = {}
        self.queries: list[tuple[str, str]] = []
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.05)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except dns.exception.DNSException:
                continue
            answer = self._answer(query)
            if answer is None:
                continue
            name = query.question[0].name.to_text(omit_final_dot=True).lower()
            if name in self.delay:
                timer = threading.Timer(self.delay[name], self._send_quietly, (answer.to_wire(), peer))
                timer.daemon = True
                timer.start()
            else:
                self._sock.sendto(answer.to_wire(), peer)

    def _send_quietly(self, data: bytes, peer: Any) -> None:
        try:
            self._sock.sendto(data, peer)
        except OSError:  # the server was closed meanwhile
            pass

    def _answer(self, query: dns.message.Message) -> dns.message.Message | None:
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        self.queries.append((name, dns.rdatatype.to_text(question.rdtype)))
        if name in self.silent:
            return None
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif name in self.txt and question.rdtype == dns.rdatatype.TXT:
            quoted = ['"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"' for value in self.txt[name]]
            response.answer.append(dns.rrset.from_text_list(question.name, 60, "IN", "TXT", quoted))
        elif name in self.txt or name in self.empty:
            pass  # NOERROR with no answer
        else:
            response.set_rcode(dns.rcode.NXDOMAIN)
        return response
