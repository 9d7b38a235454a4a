"""A WebSocket client connection: wsproto (the sans-IO protocol) over an anyio byte stream.

Spec: RFC 6455 (the WebSocket protocol), as used by atproto event streams
(https://atproto.com/specs/event-stream): binary messages, one event each.

:func:`connect` opens TCP (``ws://``) or TLS (``wss://``, anyio's TLS with the system's
certificates or a given ``ssl_context``), sends the HTTP/1.1 upgrade and waits for ``101``, all
within ``connect_timeout`` seconds. :meth:`WebSocket.receive` returns the next whole binary
message. Messages are assembled here, so their size is capped here: a message over
``max_message_bytes`` is read to its end and thrown away without being kept (the connection stays
usable), and :class:`MessageTooLarge` says so. Pings are answered with pongs; text messages are
refused like oversized ones (the protocol has none). No redirect is followed: a ``3xx`` answer to
the upgrade is a :class:`~repo_stream.errors.FirehoseError` naming the status.
"""

from __future__ import annotations

import ssl
from collections import deque
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import anyio
import anyio.abc
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from ..errors import FirehoseError

__all__ = ["MessageTooLarge", "WebSocket", "connect", "split_url"]

_READ_BYTES: Final = 65536  # the upgrade's answer
#: Bytes asked for per read of an open connection: whatever the transport holds (asyncio hands
#: over up to 256 KiB at a time), so that one read gives every message it completes.
_RECEIVE_BYTES: Final = 1 << 20
_MAX_REJECT_BODY: Final = 4096


@dataclass(frozen=True, slots=True)
class MessageTooLarge:
    """A message over the size cap, read to its end and dropped: ``size`` bytes in all
    (``text``: it was a text message, refused whatever its size)."""

    size: int
    text: bool = False


def split_url(url: str) -> tuple[bool, str, int, str]:
    """``(tls, host, port, target)`` of a ``ws://`` or ``wss://`` URL (``http(s)://`` taken as
    ``ws(s)://``). ``target`` is the path and query (``/`` when empty).

    Raises:
        FirehoseError: another scheme, or no host.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("ws", "wss", "http", "https"):
        raise FirehoseError(f"firehose URL {url!r}: the scheme must be ws:// or wss://", url=url)
    if not parts.hostname:
        raise FirehoseError(f"firehose URL {url!r} has no host", url=url)
    tls = scheme in ("wss", "https")
    try:
        port = parts.port or (443 if tls else 80)
    except ValueError:
        raise FirehoseError(f"firehose URL {url!r} has an invalid port", url=url) from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return tls, parts.hostname, port, target


class WebSocket:
    """One open WebSocket connection (use :func:`connect`)."""

    def __init__(self, stream: anyio.abc.ByteStream, protocol: WSConnection, url: str, max_message_bytes: int) -> None:
        self._stream = stream
        self._ws = protocol
        self.url = url
        self.max_message_bytes = max_message_bytes
        self._parts: list[bytes] = []
        self._size = 0
        self._text = False
        self._pending: deque[bytes | MessageTooLarge] = deque()
        self._closed = False
        self._close_error: FirehoseError | None = None
        #: Bytes received on this connection (frames and headers).
        self.bytes_received = 0

    async def _flush(self, data: bytes) -> None:
        if data:
            await self._stream.send(data)

    async def receive(self) -> bytes | MessageTooLarge:
        """The next whole message's bytes, or :class:`MessageTooLarge` for one over the cap.

        Raises:
            FirehoseError: the server closed the connection (the close code and reason quoted),
                or the TCP/TLS stream ended or failed.
        """
        while not self._pending:
            if self._close_error is not None:
                raise self._close_error
            if self._closed:
                raise FirehoseError(f"{self.url}: the WebSocket is closed", url=self.url)
            try:
                data = await self._stream.receive(_RECEIVE_BYTES)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError, ssl.SSLError) as exc:
                self._closed = True
                detail = "the server closed the connection" if isinstance(exc, anyio.EndOfStream) else f"the connection failed ({type(exc).__name__}: {exc})"
                raise FirehoseError(f"{self.url}: {detail}", url=self.url) from None
            self.bytes_received += len(data)
            self._ws.receive_data(data)
            await self._process()
        return self._pending.popleft()

    def received(self) -> list[bytes | MessageTooLarge]:
        """Take every whole message already received (as :meth:`receive` would return them one
        by one), without reading: none when the last read completed no more."""
        pending = list(self._pending)
        self._pending.clear()
        return pending

    async def _process(self) -> None:
        for event in self._ws.events():
            if isinstance(event, (BytesMessage, TextMessage)):
                chunk = event.data if isinstance(event, BytesMessage) else event.data.encode()
                self._size += len(chunk)
                self._text = self._text or isinstance(event, TextMessage)
                if event.message_finished and not self._parts and self._size <= self.max_message_bytes and not self._text:
                    self._pending.append(bytes(chunk))  # a message in one piece: one copy
                    self._size = 0
                    continue
                if self._size <= self.max_message_bytes and not self._text:
                    self._parts.append(bytes(chunk))
                else:
                    self._parts.clear()
                if event.message_finished:
                    if self._size > self.max_message_bytes or self._text:
                        self._pending.append(MessageTooLarge(self._size, self._text))
                    else:
                        self._pending.append(b"".join(self._parts))
                    self._parts.clear()
                    self._size = 0
                    self._text = False
            elif isinstance(event, Ping):
                await self._flush(self._ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self._closed = True
                try:
                    await self._flush(self._ws.send(event.response()))
                except Exception:
                    pass
                reason = f" ({event.reason[:200]!r})" if event.reason else ""
                self._close_error = FirehoseError(f"{self.url}: the server closed the WebSocket with code {event.code}{reason}", url=self.url)

    async def ping(self) -> None:
        """Send a ping (the answer, a pong, counts as data received).

        Raises:
            FirehoseError: the connection failed.
        """
        try:
            await self._flush(self._ws.send(Ping(b"repo-stream")))
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError) as exc:
            raise FirehoseError(f"{self.url}: sending a ping failed: {type(exc).__name__}", url=self.url) from None

    async def aclose(self) -> None:
        """Close the connection (a close frame when still open, then the TCP/TLS stream)."""
        if not self._closed:
            self._closed = True
            with anyio.move_on_after(1, shield=True):
                try:
                    await self._flush(self._ws.send(CloseConnection(code=1000)))
                except Exception:
                    pass
        with anyio.CancelScope(shield=True):
            try:
                await self._stream.aclose()
            except Exception:
                pass


async def connect(
    url: str,
    *,
    connect_timeout: float = 10.0,
    max_message_bytes: int,
    ssl_context: ssl.SSLContext | None = None,
) -> WebSocket:
    """Open a WebSocket to ``url`` (``ws://`` or ``wss://``) within ``connect_timeout`` seconds.

    The host is connected as given (it is the user's choice of relay or PDS: no public-address
    check).

    Raises:
        FirehoseError: a bad URL, a connection or TLS failure, the deadline, or an upgrade
            answered with another status than 101 (``status`` set; the start of the body quoted).
    """
    tls, host, port, target = split_url(url)
    stream: anyio.abc.ByteStream | None = None
    try:
        with anyio.fail_after(connect_timeout):
            try:
                if tls:
                    context = ssl_context or ssl.create_default_context()
                    stream = await anyio.connect_tcp(host, port, tls=True, ssl_context=context, tls_standard_compatible=False)
                else:
                    stream = await anyio.connect_tcp(host, port)
            except (OSError, ssl.SSLError, anyio.BrokenResourceError) as exc:
                raise FirehoseError(f"{url}: cannot connect to {host}:{port}: {type(exc).__name__}: {exc}", url=url) from None
            protocol = WSConnection(ConnectionType.CLIENT)
            host_header = host if port == (443 if tls else 80) else f"{host}:{port}"
            if ":" in host and not host.startswith("["):
                host_header = f"[{host}]" if port == (443 if tls else 80) else f"[{host}]:{port}"
            await stream.send(protocol.send(Request(host=host_header, target=target)))
            status: int | None = None
            body = b""
            while True:
                try:
                    data = await stream.receive(_READ_BYTES)
                except (anyio.EndOfStream, anyio.BrokenResourceError, OSError, ssl.SSLError):
                    data = None
                protocol.receive_data(data)
                for event in protocol.events():
                    if isinstance(event, AcceptConnection):
                        socket = WebSocket(stream, protocol, url, max_message_bytes)
                        stream = None
                        await socket._process()  # frames that came with the 101 answer
                        return socket
                    if isinstance(event, RejectConnection):
                        status = event.status_code
                        if not event.has_body:
                            raise FirehoseError(f"{url}: the WebSocket upgrade was answered with HTTP {status}", url=url, status=status)
                    elif isinstance(event, RejectData):
                        body = (body + bytes(event.data))[:_MAX_REJECT_BODY]
                        if event.body_finished:
                            text = body.decode("utf-8", "replace")[:300]
                            raise FirehoseError(f"{url}: the WebSocket upgrade was answered with HTTP {status}: {text!r}", url=url, status=status)
                if data is None:
                    raise FirehoseError(f"{url}: the connection ended during the WebSocket upgrade", url=url, status=status)
    except TimeoutError:
        raise FirehoseError(f"{url}: no WebSocket connection within {connect_timeout:g} seconds", url=url) from None
    except FirehoseError:
        raise
    except Exception as exc:  # wsproto's RemoteProtocolError on a garbled answer
        raise FirehoseError(f"{url}: the WebSocket upgrade failed: {type(exc).__name__}: {exc}", url=url) from None
    finally:
        if stream is not None:
            with anyio.CancelScope(shield=True):
                await stream.aclose()
