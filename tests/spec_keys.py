"""A test-side oracle for MST key syntax, written from the specs (not from repo_stream.core.mst), and
the atproto interop test files it is checked against (tests/interop/, CC0).

Specs: record key (https://atproto.com/specs/record-key): 1 to 512 characters of
``A-Za-z0-9 . - _ : ~``, not ``.`` or ``..``. NSID (https://atproto.com/specs/nsid): a domain
authority of at least two segments, each 1 to 63 letters, digits or hyphens, neither starting nor
ending with a hyphen, the first not starting with a digit; then a name of 1 to 63 letters and
digits, not starting with a digit; at most 317 characters in all. (The spec also limits the
authority to 253 characters; the interop files list a 283-character one as valid, and neither
this oracle nor the reference applies that limit.) An MST key
is ``<NSID>/<record key>`` (atproto repository spec), at most 1024 bytes.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

INTEROP = Path(__file__).resolve().parent / "interop"

_LETTERS = set(string.ascii_letters)
_DIGITS = set(string.digits)
_RKEY_CHARS = _LETTERS | _DIGITS | set(".-_:~")


def spec_rkey(rkey: str) -> bool:
    """Whether ``rkey`` is a record key by the spec's rules."""
    return 1 <= len(rkey) <= 512 and set(rkey) <= _RKEY_CHARS and rkey not in (".", "..")


def _domain_segment(segment: str) -> bool:
    return 1 <= len(segment) <= 63 and set(segment) <= _LETTERS | _DIGITS | {"-"} and segment[0] != "-" and segment[-1] != "-"


def spec_nsid(nsid: str) -> bool:
    """Whether ``nsid`` is an NSID by the spec's rules."""
    if len(nsid) > 317:
        return False
    *authority, name = nsid.split(".")
    return (
        len(authority) >= 2
        and all(_domain_segment(s) for s in authority)
        and authority[0][0] not in _DIGITS
        and 1 <= len(name) <= 63
        and set(name) <= _LETTERS | _DIGITS
        and name[0] in _LETTERS
    )


def spec_key(key: str) -> bool:
    """Whether ``key`` is an MST key ``<NSID>/<record key>`` of at most 1024 bytes."""
    collection, slash, rkey = key.partition("/")
    return bool(slash) and len(key.encode()) <= 1024 and spec_nsid(collection) and spec_rkey(rkey)


def interop_lines(name: str) -> list[str]:
    """The values of ``tests/interop/<name>.txt``: every line but comments (``#``) and empty ones."""
    text = (INTEROP / f"{name}.txt").read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line and not line.startswith("#")]


def interop_json(name: str) -> Any:
    return json.loads((INTEROP / name).read_text(encoding="utf-8"))
