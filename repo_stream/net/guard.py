"""Public-only connections for hosts learned from the network (an SSRF guard).

A DID document, a ``did:web`` DID, a handle, a redirect or a listRepos page can name any host:
``169.254.169.254`` (cloud metadata), ``127.0.0.1:6379``, ``10.0.0.1``, ``[::1]:22``. The HTTP
clients this library makes (:func:`make_client`) connect through :class:`GuardedBackend`, an
httpcore network backend that resolves the host itself, checks **every** address it resolves to
with :func:`is_public_address`, and connects to a checked address, so a DNS answer that changes
between the check and the connection (DNS rebinding) cannot get around it. IPv4 and IPv6 are
both checked, IPv4-mapped, 6to4, Teredo and NAT64 forms by the IPv4 address they carry.

Hosts the user named (a getRepo URL SOURCE, ``--plc-url``, ``--host``) are *trusted*: their
``(host, port)`` is added with :meth:`GuardedBackend.trust` and connected as given. With
``allow_private_hosts=True`` (``--allow-private-hosts``) nothing is checked.

A refused connection raises :class:`PrivateHostError`, naming the host and the address; the
callers turn it into a ``FetchError`` or ``IdentityError`` naming the URL too.

An ``httpx.AsyncClient`` the caller builds is used as it is: it connects where its transport
says (the redirect and scheme rules of :mod:`repo_stream.net.http` still apply). Build it with
:func:`make_client` to keep the guard. A guarded client does not use proxies from the environment
(``HTTP_PROXY``...): through a proxy the address connected would be the proxy's.
"""

from __future__ import annotations

import ipaddress
import socket
import weakref
from collections.abc import Iterable
from typing import Any

import anyio
import httpcore
import httpx

from ..errors import RepoStreamError

__all__ = ["GuardedBackend", "PrivateHostError", "guard_of", "is_public_address", "make_client", "origin_of"]

_USER_AGENT = "repo-stream (+https://atproto.com/specs/sync)"
ACCEPT_ENCODING = "identity, gzip"
"""What every request of this library accepts as ``Accept-Encoding``: no other coding is decoded."""

# Ranges Python 3.11's ``is_global`` lets through that are not public unicast.
_NOT_PUBLIC = [
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10",
        "ff00::/8", "64:ff9b:1::/48",
    )
]  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class PrivateHostError(RepoStreamError):
    """A host learned from the network resolves to an address that is not public unicast
    (loopback, private, link-local, unique-local, CGNAT, multicast, unspecified, reserved...).
    The message names the host and the address; ``host`` and ``address`` hold them."""

    def __init__(self, host: str, address: str, why: str = "not a public unicast address") -> None:
        super().__init__(f"host {host} resolves to {address}, {why}; refused (allow it with --allow-private-hosts or allow_private_hosts=True)")
        self.host = host
        self.address = address


def is_public_address(address: str) -> bool:
    """Whether ``address`` (an IPv4 or IPv6 literal) is a public unicast address.

    False for loopback, private (RFC 1918), CGNAT (100.64/10), link-local, unique-local
    (fc00::/7), site-local, multicast, unspecified, broadcast, documentation and benchmarking
    ranges, and every other range IANA does not mark globally reachable; IPv4-mapped
    (``::ffff:a.b.c.d``), IPv4-compatible, 6to4 (2002::/16), Teredo and NAT64 (64:ff9b::/96)
    addresses are judged by the IPv4 address they carry. Not an address at all: False.
    """
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        # Forms that reach an IPv4 address: judged by it alone.
        if ip.ipv4_mapped is not None:
            return is_public_address(str(ip.ipv4_mapped))
        if ip in _NAT64:
            return is_public_address(str(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)))
        if int(ip) >> 32 == 0:  # ::a.b.c.d (deprecated IPv4-compatible), ::1 and :: too
            return int(ip) > 1 and is_public_address(str(ipaddress.IPv4Address(int(ip))))
        embedded = ip.sixtofour or (ip.teredo[1] if ip.teredo is not None else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    if any(ip in network for network in _NOT_PUBLIC if network.version == ip.version):
        return False
    return ip.is_global and not (ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified)


def origin_of(url: str | httpx.URL) -> tuple[str, int] | None:
    """``(host, port)`` of an http(s) URL (host lowercased, port defaulted), or None."""
    try:
        parsed = httpx.URL(url) if isinstance(url, str) else url
    except httpx.InvalidURL:
        return None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        return None
    return parsed.host.lower(), parsed.port or (443 if parsed.scheme == "https" else 80)


class GuardedBackend(httpcore.AsyncNetworkBackend):
    """An httpcore network backend that connects only to public unicast addresses, except to the
    ``(host, port)`` pairs it was told to trust (see the module docstring)."""

    def __init__(self, trusted: Iterable[tuple[str, int]] = ()) -> None:
        self._inner = httpcore.AnyIOBackend()
        self.trusted: set[tuple[str, int]] = set(trusted)

    def trust(self, url: str | httpx.URL) -> None:
        """Connect to ``url``'s host and port as given, private or not (a host the user named)."""
        origin = origin_of(url)
        if origin is not None:
            self.trusted.add(origin)

    async def _addresses(self, host: str, port: int) -> list[str]:
        """The addresses of ``host``, all checked; raises PrivateHostError on any that is not public."""
        literal = host.strip("[]")
        try:
            ipaddress.ip_address(literal.split("%", 1)[0])
            addresses = [literal]
        except ValueError:
            try:
                infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            if not addresses:
                raise httpcore.ConnectError(f"cannot resolve {host}: no address") from None
        for address in addresses:
            if not is_public_address(address):
                raise PrivateHostError(host, address)
        return addresses

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if (host.lower(), port) in self.trusted:
            return await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        with anyio.fail_after(timeout) if timeout is not None else _no_timeout():
            try:
                addresses = await self._addresses(host, port)
            except TimeoutError:
                raise httpcore.ConnectTimeout(f"resolving {host} timed out") from None
        failure: Exception | None = None
        for address in addresses:  # each one checked above: connect to exactly that address
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used")  # pragma: no cover

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _no_timeout:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


_GUARDS: weakref.WeakKeyDictionary[httpx.AsyncClient, GuardedBackend] = weakref.WeakKeyDictionary()


def guard_of(client: httpx.AsyncClient) -> GuardedBackend | None:
    """The :class:`GuardedBackend` of a client made by :func:`make_client`, else None."""
    return _GUARDS.get(client)


def make_client(
    *,
    allow_private_hosts: bool = False,
    trusted: Iterable[str] = (),
    max_connections: int | None = None,
    verify: Any = None,
) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` as this library makes its own: certificates verified, the
    library's User-Agent, ``Accept-Encoding: identity, gzip``, and (unless
    ``allow_private_hosts``) connections only to public unicast addresses, except to the
    ``trusted`` URLs' hosts and ports. Close it (``async with``) when done.

    Args:
        allow_private_hosts: connect anywhere (for local development and tests); proxies from
            the environment are then used as httpx does.
        trusted: URLs whose ``(host, port)`` is connected as given (the hosts the user named).
        max_connections: the pool's bound (default httpx's, 100).
        verify: an ``ssl.SSLContext`` (default: httpx's verifying context, built once).
    """
    from .identity import _ssl_context

    context = verify if verify is not None else _ssl_context()
    limits = httpx.Limits() if max_connections is None else httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": ACCEPT_ENCODING}
    if allow_private_hosts:
        return httpx.AsyncClient(headers=headers, verify=context, limits=limits)
    backend = GuardedBackend()
    for url in trusted:
        backend.trust(url)
    transport = httpx.AsyncHTTPTransport(verify=context, limits=limits, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    client = httpx.AsyncClient(headers=headers, transport=transport, trust_env=False)
    _GUARDS[client] = backend
    return client
