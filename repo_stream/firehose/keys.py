"""Signing keys of accounts, from their DID documents, cached (for verifying firehose events).

Spec: atproto DID (https://atproto.com/specs/did), "DID Documents": the ``#atproto``
verification method; atproto sync, "Commit Validation" (the key to check a commit with is the
account's current one; an ``#identity`` event means it may have changed).

:class:`KeyCache` resolves each DID once (:func:`repo_stream.net.identity.resolve_did`: PLC for
``did:plc``, ``https://HOST/.well-known/did.json`` for ``did:web``) and keeps at most
``max_entries`` keys, least recently used dropped first. :meth:`KeyCache.forget` drops one (call
it on ``#identity``). The PLC directory is the user's choice and trusted; ``did:web`` hosts are
learned from the stream and must be public addresses unless ``allow_private_hosts``.
"""

from __future__ import annotations

from collections import OrderedDict

import httpx

from ..errors import IdentityError
from ..net.identity import DEFAULT_PLC_URL, DEFAULT_TIMEOUT, parse_did_document, resolve_did

__all__ = ["KeyCache"]


class KeyCache:
    """DID -> ``#atproto`` signing key (``did:key:z...``), resolved once and cached.

    Args:
        client: the HTTP client (default: one per lookup, guarded as
            :func:`~repo_stream.net.identity.resolve_did` makes it).
        plc_url: the PLC directory.
        timeout: seconds per lookup.
        max_entries: keys kept at most.
        allow_private_hosts: let ``did:web`` hosts resolve to private addresses.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        plc_url: str = DEFAULT_PLC_URL,
        timeout: float = DEFAULT_TIMEOUT,
        max_entries: int = 100_000,
        allow_private_hosts: bool = False,
    ) -> None:
        self.client = client
        self.plc_url = plc_url
        self.timeout = timeout
        self.max_entries = max_entries
        self.allow_private_hosts = allow_private_hosts
        self._keys: OrderedDict[str, str] = OrderedDict()
        #: Lookups made (cache misses).
        self.lookups = 0

    async def key(self, did: str) -> str:
        """The account's signing key.

        Raises:
            IdentityError: the DID does not resolve, or its document has no ``#atproto`` key.
        """
        known = self._keys.get(did)
        if known is not None:
            self._keys.move_to_end(did)
            return known
        self.lookups += 1
        document = await resolve_did(
            did, client=self.client, plc_url=self.plc_url, timeout=self.timeout, allow_private_hosts=self.allow_private_hosts
        )
        key = parse_did_document(did, document).signing_key
        if key is None:
            raise IdentityError(f"DID {did}: the DID document has no #atproto signing key")
        self._keys[did] = key
        if len(self._keys) > self.max_entries:
            self._keys.popitem(last=False)
        return key

    def forget(self, did: str) -> None:
        """Drop ``did``'s cached key (on ``#identity``: the next lookup fetches the document again)."""
        self._keys.pop(did, None)
