"""A real local subscribeRepos server for the firehose tests: WebSocket (wsproto) on 127.0.0.1.

It runs in daemon threads (one per connection, blocking sockets), so it serves tests on asyncio
and on trio alike. It replays a list of ``(seq, message)`` pairs: a connection with ``?cursor=N``
gets the messages after the first one whose seq is above ``N`` (messages without a seq, like
``#info``, go with the position they are at), one without a cursor gets them all. Each
connection follows the next :class:`Plan` of the script (the last one repeating) to inject
faults: a dropped connection after some messages, raw messages inserted, an error frame, a
message over a size. The server logs each connection's cursor and the messages it sent.

:func:`make_stream` builds a stream with :class:`~repo_stream.sync.generate.CommitGenerator`:
several accounts, many commits with one global seq, and ``#identity``, ``#account``, ``#sync``
and ``#info`` messages among them.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import cbrrr
from cbrrr import _cbrrr
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Ping, Request

from repo_stream.core.cid import cid_text
from repo_stream.sync.generate import CommitGenerator, make_signer


def encode_message(kind: str, body: dict[str, Any], op: int = 1) -> bytes:
    """A message: header ``{op, t}`` (``{op: -1}`` for an error frame) then ``body``."""
    header: dict[str, Any] = {"op": op} if op == -1 else {"op": op, "t": kind}
    return bytes(cbrrr.encode_dag_cbor(header)) + bytes(cbrrr.encode_dag_cbor(body))


def error_frame(error: str, message: str | None = None) -> bytes:
    body = {"error": error} if message is None else {"error": error, "message": message}
    return encode_message("", body, op=-1)


def with_seq(message: bytes, seq: int) -> bytes:
    """The message with its body's ``seq`` replaced."""
    header, n = _cbrrr.decode_dag_cbor(message, cbrrr.CID, False)
    body, _ = _cbrrr.decode_dag_cbor(message[n:], cbrrr.CID, False)
    body["seq"] = seq
    return bytes(cbrrr.encode_dag_cbor(header)) + bytes(cbrrr.encode_dag_cbor(body))


def accept_websocket(conn: socket.socket) -> tuple[WSConnection, int | None] | None:
    """Read a client's WebSocket handshake on ``conn`` and accept it: the server side of the
    connection and the ``cursor`` query parameter (None without one), or None if the client
    hung up first.

    Raises:
        OSError: the socket failed.
    """
    ws = WSConnection(ConnectionType.SERVER)
    target = None
    while target is None:
        data = conn.recv(65536)
        if not data:
            return None
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Request):
                target = event.target
    conn.sendall(ws.send(AcceptConnection()))
    cursor = parse_qs(urlsplit(target).query).get("cursor")
    return ws, int(cursor[0]) if cursor else None


@dataclass
class Account:
    did: str
    did_key: str
    generator: CommitGenerator
    start: tuple[str, str] = ("", "")  # the rev and data root (base32) before the stream


@dataclass
class Stream:
    """A generated stream: ``messages`` as ``(seq or None, bytes)``, and the accounts."""

    messages: list[tuple[int | None, bytes]]
    accounts: dict[str, Account]


def make_stream(accounts: int = 3, commits: int = 40, *, seed: int = 1) -> Stream:
    """``accounts`` accounts making ``commits`` commits in all, plus one ``#identity``,
    ``#account`` and ``#sync`` per account and an ``#info`` message, with global seqs from 1."""
    rng = random.Random(seed)
    people: dict[str, Account] = {}
    for i in range(accounts):
        sign, did_key = make_signer("k256", seed * 100 + i)
        did = "did:plc:" + ("firehose" + "abcdefghijklmnop"[i % 16] + "x" * (i // 16)).ljust(24, "a")
        generator = CommitGenerator(did, sign, seed=seed * 100 + i, engine="edit")
        people[did] = Account(did, did_key, generator, (generator.rev, cid_text(generator.root)))
    dids = list(people)
    out: list[tuple[int | None, bytes]] = []
    seq = 0

    def add(message: bytes) -> None:
        nonlocal seq
        seq += 1
        out.append((seq, with_seq(message, seq)))

    for n in range(commits):
        account = people[dids[rng.randrange(len(dids))]]
        generator = account.generator
        add(generator.commit(generator.random_ops(rng.randint(1, 4))))
        if n == commits // 3:
            out.append((None, encode_message("#info", {"name": "OutdatedCursor", "message": "cursor is older than the oldest event"})))
            for did in dids:
                add(encode_message("#identity", {"seq": 0, "did": did, "time": "2024-01-01T00:00:00.000Z", "handle": f"{did[8:16]}.test"}))
        if n == 2 * commits // 3:
            for did in dids:
                add(encode_message("#account", {"seq": 0, "did": did, "time": "2024-01-01T00:00:00.000Z", "active": True}))
                add(people[did].generator.sync_message())
    return Stream(out, people)


@dataclass
class Plan:
    """What one connection does.

    Attributes:
        drop_after: close the TCP connection abruptly after sending this many messages.
        insert: raw messages sent before the message at this index (of this connection).
        end_with: raw messages sent after the replay (e.g. an error frame), then close.
        close_at_end: close (a WebSocket close) after the replay instead of staying open.
        wait_for: send nothing until this holds (polled every 10 ms, 30 s at most).
    """

    drop_after: int | None = None
    insert: dict[int, list[bytes]] = field(default_factory=dict)
    end_with: list[bytes] = field(default_factory=list)
    close_at_end: bool = False
    wait_for: Callable[[], bool] | None = None


class FirehoseServer:
    """The server (a context manager): ``ws://127.0.0.1:PORT``."""

    def __init__(self, messages: list[tuple[int | None, bytes]], plans: list[Plan] | None = None) -> None:
        self.messages = messages
        self.plans = plans or [Plan()]
        self.cursors: list[int | None] = []
        self.sent: list[int] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self._stop = threading.Event()

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                accepted = accept_websocket(conn)
                if accepted is None:
                    return
                ws, cursor = accepted
                with self._lock:
                    index = len(self.cursors)
                    self.cursors.append(cursor)
                    self.sent.append(0)
                plan = self.plans[min(index, len(self.plans) - 1)]
                start = 0
                if cursor is not None:
                    start = next((i for i, (seq, _) in enumerate(self.messages) if seq is not None and seq > cursor), len(self.messages))
                count = 0
                waited = 0
                while plan.wait_for is not None and not plan.wait_for() and waited < 3000:
                    time.sleep(0.01)
                    waited += 1
                for position, (_, message) in enumerate(self.messages[start:]):
                    for raw in plan.insert.get(position, []):
                        conn.sendall(ws.send(BytesMessage(raw)))
                    if plan.drop_after is not None and count >= plan.drop_after:
                        conn.shutdown(socket.SHUT_RDWR)
                        return
                    conn.sendall(ws.send(BytesMessage(message)))
                    count += 1
                    with self._lock:
                        self.sent[index] = count
                for raw in plan.end_with:
                    conn.sendall(ws.send(BytesMessage(raw)))
                if plan.close_at_end or plan.end_with:
                    conn.sendall(ws.send(CloseConnection(code=1000)))
                    return
                conn.settimeout(0.2)
                while not self._stop.is_set():  # stay open; answer pings; end when the client closes
                    try:
                        data = conn.recv(65536)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, Ping):
                            conn.sendall(ws.send(event.response()))
                        elif isinstance(event, CloseConnection):
                            return
            except OSError:
                return
