"""Merkle Search Tree rules: key layers and key syntax.

Spec: atproto repository, "Merkle Search Tree" (https://atproto.com/specs/repository), record key
syntax (https://atproto.com/specs/record-key) and NSID syntax (https://atproto.com/specs/nsid).
"""

from __future__ import annotations

import hashlib
import re

__all__ = ["MAX_KEY_BYTES", "key_layer", "is_valid_key", "is_valid_collection", "is_valid_rkey"]

#: The longest MST key (``collection/rkey``) a repo may hold, in bytes.
MAX_KEY_BYTES = 1024

_sha256 = hashlib.sha256


def key_layer(key: bytes) -> int:
    """Return the MST layer of ``key``: leading zero bits of sha256(key), divided by 2, rounded down.

    ``key`` is the full UTF-8 key bytes (``b"app.bsky.feed.post/3k..."``). The result is 0 for
    about 3 keys in 4, 1 for 3 in 16, and so on; at most 128.
    """
    digest = _sha256(key).digest()
    top = int.from_bytes(digest[:8], "big")
    if top:
        return (64 - top.bit_length()) >> 1
    return (256 - int.from_bytes(digest, "big").bit_length()) >> 1


# NSID: a reversed domain (>= 2 segments; letters, digits, hyphens; no leading/trailing hyphen;
# the first segment does not start with a digit) then a name (a letter, then letters/digits).
_NSID_RE = re.compile(
    r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"
    r"(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"
    r"\.[a-zA-Z][a-zA-Z0-9]{0,62}"
)
# Record key: 1 to 512 of A-Z a-z 0-9 . - _ : ~, and not "." or "..".
_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,512}")


def is_valid_collection(collection: str) -> bool:
    """Return whether ``collection`` is a syntactically valid NSID (at most 317 characters)."""
    return len(collection) <= 317 and _NSID_RE.fullmatch(collection) is not None


def is_valid_rkey(rkey: str) -> bool:
    """Return whether ``rkey`` is a valid record key (1-512 of ``A-Za-z0-9._:~-``, not ``.``/``..``)."""
    return _RKEY_RE.fullmatch(rkey) is not None and rkey != "." and rkey != ".."


# A whole key in one match: neither part holds a "/", so the NSID is what comes before the only
# "/" (the length limits, and "." and "..", are checked apart: ~3x faster than three matches).
_KEY_RE = re.compile(f"(?:{_NSID_RE.pattern})/{_RKEY_RE.pattern}")


def is_valid_key(key: str) -> bool:
    """Return whether ``key`` is a valid MST key ``<collection NSID>/<record key>`` of <= 1024 bytes."""
    if len(key) > MAX_KEY_BYTES or _KEY_RE.fullmatch(key) is None:
        return False
    slash = key.index("/")
    return slash <= 317 and (len(key) - slash > 3 or key[slash + 1 :] not in (".", ".."))
