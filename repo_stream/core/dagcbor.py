"""Strict DAG-CBOR decoding on top of cbor2's C decoder.

``cbor2.loads`` is fast but lenient in two ways that matter for hostile input: it ignores bytes
after the first CBOR item, and it turns tags such as 2 (bignum), 0/1 (dates), 35 (regex) or
36 (MIME, whose parsing costs ~1 s per MiB) into Python objects. DAG-CBOR (spec: IPLD DAG-CBOR,
"Strictness"; atproto data model) allows exactly one item per block and no tag but 42 (CID link).

:class:`StrictDecoder` always refuses trailing bytes and never lets cbor2 parse a regex or MIME
tag. With ``all_tags=True`` it refuses every tag but 42. That costs ~1 us more per MST node
(cbor2 takes a slower path whenever any tag override is set), so the walker does it only with
``with_verify_cids`` (sources you do not trust); otherwise a node that spells a small integer as
a bignum tag, like one with a non-minimal integer, is read for what it means. Neither mode checks
canonical form (minimal integers, sorted keys): that needs re-encoding, ~5x a decode;
``with_verify_cids`` checks the commit fully with the ``dag-cbor`` package.
"""

from __future__ import annotations

import io
from typing import Any, cast

import cbor2

__all__ = ["StrictDecoder", "DagCborError", "link_cid", "encode_head", "encode_link", "HEADS", "LINK36_HEAD"]


class DagCborError(ValueError):
    """The bytes are not one well-formed DAG-CBOR item (internal; callers re-raise their own type)."""


def _refuse(*_args: Any) -> Any:
    raise DagCborError("a CBOR tag other than 42 (CID link)")


# Every tag cbor2 would otherwise decode itself. Tag 42 is not among them: it stays a CBORTag.
_REFUSED_TAGS = dict.fromkeys((0, 1, 2, 3, 4, 5, 25, 28, 29, 30, 35, 36, 37, 100, 256, 258, 260, 261, 262, 263, 270, 1004, 55799), _refuse)


class StrictDecoder:
    """Decodes whole blocks as single DAG-CBOR items. Not thread-safe: one per walker or call.

    Args:
        max_depth: the deepest nesting of maps and arrays accepted.
        all_tags: refuse every tag but 42 (default); else only regex and MIME tags.
    """

    __slots__ = ("_max_depth", "_all_tags", "_fast", "_strict")

    def __init__(self, max_depth: int = 16, *, all_tags: bool = True) -> None:
        self._max_depth = max_depth
        self._all_tags = all_tags
        self._fast: tuple[io.BytesIO, Any] | None = None if all_tags else self._new(False)
        self._strict: tuple[io.BytesIO, Any] | None = None

    def _new(self, refuse_tags: bool) -> tuple[io.BytesIO, Any]:
        buf = io.BytesIO()
        decoder = cbor2.CBORDecoder(
            buf,
            semantic_decoders=_REFUSED_TAGS if refuse_tags else None,
            max_depth=self._max_depth,
            allow_indefinite=False,
            strict_hashable_types=True,
        )
        return buf, decoder

    def decode(self, block: bytes) -> Any:
        """Return the one CBOR item that is all of ``block``.

        Raises:
            DagCborError: trailing bytes, a refused tag (see the module docstring), indefinite
                lengths, nesting past ``max_depth``, map keys that are not strings or bytes, or
                malformed CBOR.
        """
        # Tags 35 (regex) and 36 (MIME) start d8 23 / d8 24; a block holding those bytes (in a
        # hash, now and then) goes through the decoder that refuses tags.
        if self._all_tags or b"\xd8\x24" in block or b"\xd8\x23" in block:
            if self._strict is None:
                self._strict = self._new(True)
            pair = self._strict
            strict = True
        else:
            pair = cast("tuple[io.BytesIO, Any]", self._fast)  # made in __init__ unless all_tags
            strict = False
        buf, decoder = pair
        buf.seek(0)
        buf.truncate()
        buf.write(block)
        buf.seek(0)
        try:
            value = decoder.decode()
        except Exception as exc:
            # cbor2's decoder must not be reused after it raised (its state is left broken): a
            # failure gets a fresh one. After a success it is reused, saving ~0.6 us a block.
            if strict:
                self._strict = None
            else:
                self._fast = self._new(False)
            cause = exc.__cause__ if isinstance(exc.__cause__, DagCborError) else exc
            raise DagCborError(str(cause) or type(cause).__name__) from exc
        end = buf.tell()
        if end != len(block):
            raise DagCborError(f"{len(block) - end} bytes after the CBOR item (of {len(block)})")
        return value


def link_cid(value: Any) -> bytes | None:
    """The raw CID bytes of a DAG-CBOR link (tag 42 over ``0x00 + CID``); ``None`` if not a link."""
    if type(value) is cbor2.CBORTag and value.tag == 42:
        raw = value.value
        if type(raw) is bytes and len(raw) > 1 and raw[0] == 0:
            return raw[1:]
    return None


# --- encoding: the pieces the MST node encoders (records.writer, sync.partial) share ------------


def encode_head(major: int, n: int) -> bytes:
    """The shortest CBOR head for major type ``major`` (0-7) and argument ``n`` (0 <= n < 2**64).

    Spec: RFC 8949, "Specification of the CBOR Encoding"; DAG-CBOR requires the shortest form.
    """
    m = major << 5
    if n < 24:
        return bytes((m | n,))
    if n < 0x100:
        return bytes((m | 24, n))
    if n < 0x10000:
        return bytes((m | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((m | 26,)) + n.to_bytes(4, "big")
    return bytes((m | 27,)) + n.to_bytes(8, "big")


#: ``HEADS[major][n]``: the heads of arguments 0-255 of major types 0 (int), 2 (bytes), 4 (array).
HEADS: dict[int, list[bytes]] = {major: [encode_head(major, n) for n in range(256)] for major in (0, 2, 4)}
#: The head of a link to a 36-byte CID: tag 42, a 37-byte string, the multibase identity prefix 0x00.
LINK36_HEAD = b"\xd8\x2a\x58\x25\x00"


def encode_link(cid: bytes) -> bytes:
    """The DAG-CBOR link (tag 42) to the raw CID ``cid``. Spec: DAG-CBOR, "Links"."""
    if len(cid) == 36:
        return LINK36_HEAD + cid
    return b"\xd8\x2a" + encode_head(2, len(cid) + 1) + b"\x00" + cid
