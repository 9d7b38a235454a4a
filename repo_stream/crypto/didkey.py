"""did:key and Multikey strings for atproto signing keys: parse to a public key, and back.

atproto signs with ECDSA on two curves (spec: https://atproto.com/specs/cryptography):

* secp256k1 ("k256"): multicodec ``secp256k1-pub``, code ``0xe7`` (varint ``e7 01``); did:keys
  start ``did:key:zQ3s``;
* NIST P-256 ("p256", secp256r1): multicodec ``p256-pub``, code ``0x1200`` (varint ``80 24``);
  did:keys start ``did:key:zDn``.

A did:key is ``"did:key:"`` + a Multikey: multibase base58btc (prefix ``z``) of the varint
multicodec code followed by the 33-byte compressed point (``02``/``03`` + X). DID documents
carry the same Multikey, without ``did:key:``, as ``publicKeyMultibase``. Base58btc and the
multicodec table come from the multiformats package; the points are read by ``cryptography``.
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from multiformats import multibase, multicodec

from ..errors import SignatureError

__all__ = ["CURVES", "PublicKey", "format_did_key", "format_multikey", "parse_did_key", "parse_multikey"]

#: The public key type this module reads and writes (``cryptography``'s).
PublicKey = ec.EllipticCurvePublicKey

#: multicodec name -> the ``cryptography`` curve class, for the two atproto curves.
CURVES: Final[dict[str, type[ec.EllipticCurve]]] = {"secp256k1-pub": ec.SECP256K1, "p256-pub": ec.SECP256R1}
#: ``cryptography``'s curve name -> multicodec name.
_CODEC_OF_CURVE: Final[dict[str, str]] = {"secp256k1": "secp256k1-pub", "secp256r1": "p256-pub"}


def _short(text: str) -> str:
    return repr(text) if len(text) <= 100 else repr(text[:100]) + "..."


def parse_multikey(multikey: str) -> PublicKey:
    """Parse a Multikey (``"z..."``, as in a DID document's ``publicKeyMultibase``).

    Returns:
        An ``EllipticCurvePublicKey`` on ``SECP256K1`` or ``SECP256R1``.

    Raises:
        SignatureError: not a string, not base58btc multibase, an unknown or unsupported
            multicodec (atproto keys are ``secp256k1-pub`` and ``p256-pub``), not a 33-byte
            compressed point, or a point not on the curve. The message quotes the key.

    Spec: atproto cryptography, "Public Key Encoding"; multibase; multicodec.
    """
    if not isinstance(multikey, str):
        raise SignatureError(f"key of type {type(multikey).__name__}: expected a Multikey string")
    return _parse(multikey, f"key {_short(multikey)}")


def parse_did_key(did_key: str) -> PublicKey:
    """Parse a did:key (``"did:key:z..."``) to its public key.

    Raises:
        SignatureError: not ``did:key:`` + a Multikey that :func:`parse_multikey` accepts.

    Spec: atproto cryptography, "Public Key Encoding"; W3C did:key method.
    """
    if not isinstance(did_key, str):
        raise SignatureError(f"key of type {type(did_key).__name__}: expected a did:key string")
    if not did_key.startswith("did:key:"):
        raise SignatureError(f"key {_short(did_key)}: not a did:key (expected 'did:key:z...')")
    return _parse(did_key[len("did:key:") :], f"did:key {_short(did_key)}")


def did_key_point(did_key: str) -> tuple[type[ec.EllipticCurve], bytes]:
    """The curve and the 33-byte compressed point of a did:key, without reading the point: the
    checks of :func:`parse_did_key` but the last (that the point is on the curve), with the same
    errors.

    Raises:
        SignatureError: as :func:`parse_did_key`, except for a point not on its curve.
    """
    if not isinstance(did_key, str):
        raise SignatureError(f"key of type {type(did_key).__name__}: expected a did:key string")
    if not did_key.startswith("did:key:"):
        raise SignatureError(f"key {_short(did_key)}: not a did:key (expected 'did:key:z...')")
    return _point(did_key[len("did:key:") :], f"did:key {_short(did_key)}")


def _parse(multikey: str, where: str) -> PublicKey:
    curve, point = _point(multikey, where)
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(curve(), point)
    except ValueError as exc:
        raise SignatureError(f"{where}: not a point on {curve.name}: {exc}") from exc


def _point(multikey: str, where: str) -> tuple[type[ec.EllipticCurve], bytes]:
    if not multikey.startswith("z"):
        raise SignatureError(f"{where}: not base58btc multibase (a Multikey starts with 'z')")
    try:
        raw = multibase.decode(multikey)
    except Exception as exc:  # multiformats raises assorted ValueError/KeyError subclasses
        raise SignatureError(f"{where}: not valid base58btc: {exc}") from exc
    try:
        codec, point = multicodec.unwrap(raw)
    except Exception as exc:
        raise SignatureError(f"{where}: no known multicodec prefix: {exc}") from exc
    curve = CURVES.get(codec.name)
    if curve is None:
        raise SignatureError(f"{where}: multicodec {codec.name} (0x{codec.code:x}) is not an atproto key type (secp256k1-pub, p256-pub)")
    if len(point) != 33 or point[0] not in (2, 3):
        raise SignatureError(f"{where}: a {codec.name} key must be a 33-byte compressed point (02/03 + X), got {len(point)} bytes")
    return curve, bytes(point)


def format_multikey(key: PublicKey) -> str:
    """The Multikey (``"z..."``) of a secp256k1 or P-256 public key (compressed point).

    Raises:
        SignatureError: ``key`` is not an elliptic-curve public key on one of those curves.
    """
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise SignatureError(f"expected an elliptic-curve public key, got {type(key).__name__}")
    codec = _CODEC_OF_CURVE.get(key.curve.name)
    if codec is None:
        raise SignatureError(f"a {key.curve.name} key; atproto keys are on secp256k1 or P-256 (secp256r1)")
    point = key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint)
    return str(multibase.encode(multicodec.wrap(codec, point), "base58btc"))


def format_did_key(key: PublicKey) -> str:
    """The did:key (``"did:key:z..."``) of a secp256k1 or P-256 public key.

    Raises:
        SignatureError: as :func:`format_multikey`.
    """
    return "did:key:" + format_multikey(key)
