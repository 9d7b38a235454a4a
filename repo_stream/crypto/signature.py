"""atproto ECDSA signatures: SHA-256, 64-byte compact ``r || s``, low-S only.

Spec: https://atproto.com/specs/cryptography: both curves (secp256k1 and P-256) sign the
SHA-256 digest of the bytes with ECDSA; the signature is the two 32-byte big-endian integers
``r`` and ``s`` concatenated (not DER), and ``s`` must be in the lower half of the curve order
("low-S"): a verifier refuses the high-S twin ``(r, n - s)`` that plain ECDSA would accept, so a
signature cannot be altered into another valid one.

The curve arithmetic: secp256k1 signatures are checked by libsecp256k1 through ``coincurve``
(~40 us a signature, ten times faster than OpenSSL's ~450 us for that curve), P-256 ones by
``cryptography`` (OpenSSL, ~85 us). :func:`verifying_key` parses a did:key once and keeps the
parsed key (a bounded cache per key string), for verifying many commits of one account.
"""

from __future__ import annotations

import functools
import hashlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from ..errors import SignatureError
from .didkey import PublicKey, did_key_point, format_did_key, parse_did_key

if TYPE_CHECKING:
    import coincurve

__all__ = ["CURVE_ORDERS", "VerifyingKey", "sign", "verify", "verifying_key"]

#: The group order ``n`` of each atproto curve, by ``cryptography``'s curve name.
CURVE_ORDERS: Final[dict[str, int]] = {
    "secp256k1": 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141,
    "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
}
_SUPPORTED: Final = frozenset(CURVE_ORDERS)


def verify(key: PublicKey, data: bytes, sig: bytes, *, where: str = "signature") -> None:
    """Check an atproto signature of ``data`` by ``key``; return ``None`` if it is valid.

    Args:
        key: a secp256k1 or P-256 ``EllipticCurvePublicKey``.
        data: the signed bytes (hashed here with SHA-256).
        sig: the 64-byte compact signature ``r || s`` (big-endian).
        where: what is being verified, to begin the error message with (e.g. the commit).

    Raises:
        SignatureError: ``key`` is not such a key, ``sig`` is not 64 bytes, ``r`` or ``s`` is 0
            or not below the curve order, ``s`` is high (above n/2), or the signature does not
            verify. The message names ``where`` and the key as a did:key.

    Spec: atproto cryptography, "ECDSA Signatures" / low-S.
    """
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _SUPPORTED:
        kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
        raise SignatureError(f"{where}: cannot verify with a {kind} key; atproto keys are secp256k1 or P-256")
    VerifyingKey(key).verify(data, sig, where=where)


@functools.lru_cache(maxsize=4096)
def _k256(point: bytes) -> coincurve.PublicKey:
    """The coincurve key of a compressed secp256k1 point (imported on first use)."""
    import coincurve

    return coincurve.PublicKey(point)


class VerifyingKey:
    """A parsed atproto signing key, ready to check many signatures.

    Args:
        key: a secp256k1 or P-256 ``cryptography`` ``EllipticCurvePublicKey``.
        did_key: its did:key string when known (else made when an error message needs it).

    Attributes: ``curve`` (``"secp256k1"`` or ``"secp256r1"``).

    Raises:
        SignatureError: ``key`` is not such a key.
    """

    __slots__ = ("curve", "_key", "_fast", "_check", "_did_key", "_order")

    def __init__(self, key: PublicKey, did_key: str | None = None) -> None:
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in _SUPPORTED:
            kind = key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else type(key).__name__
            raise SignatureError(f"cannot verify with a {kind} key; atproto keys are secp256k1 or P-256")
        self.curve: str = key.curve.name
        self._key: PublicKey | None = key
        self._did_key = did_key
        self._order = CURVE_ORDERS[self.curve]
        self._fast: coincurve.PublicKey | None = None
        self._check: Callable[[bytes, bytes], bool] | None = None
        if self.curve == "secp256k1":
            from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

            self._fast = _k256(key.public_bytes(Encoding.X962, PublicFormat.CompressedPoint))
            self._check = _k256_checker(self._fast)

    @property
    def did_key(self) -> str:
        """The key as a did:key string."""
        if self._did_key is None:
            self._did_key = format_did_key(self.public_key)
        return self._did_key

    @classmethod
    def _light(cls, did_key: str, fast: coincurve.PublicKey) -> VerifyingKey:
        """The secp256k1 key of ``did_key`` from its coincurve key alone: its ``cryptography``
        key is made when :attr:`public_key` is first read (it costs ~40 us and ~2 KB of OpenSSL
        memory, and checking signatures never needs it)."""
        self = cls.__new__(cls)
        self.curve = "secp256k1"
        self._key = None
        self._did_key = did_key
        self._order = CURVE_ORDERS["secp256k1"]
        self._fast = fast
        self._check = _k256_checker(fast)
        return self

    @property
    def public_key(self) -> PublicKey:
        """The ``cryptography`` public key."""
        if self._key is None:
            assert self._fast is not None
            self._key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256K1(), self._fast.format(compressed=True))
        return self._key

    def verify(self, data: bytes, sig: bytes, *, where: str = "signature") -> None:
        """Check an atproto signature of ``data``; return ``None`` if it is valid.

        Raises:
            SignatureError: as :func:`verify`.

        Spec: atproto cryptography, "ECDSA Signatures" / low-S.
        """
        check = self._check
        verified: bool | None = None  # the verdict when already known (False: go on for the error)
        if check is not None and type(sig) is bytes and type(data) is bytes and len(sig) == 64:
            # The usual call, one libsecp256k1 verdict: it accepts exactly the signatures the
            # checks below accept and that verify (see _k256_checker); a refusal goes on to
            # them for its error message, without verifying again.
            if check(sig, data):
                return
            verified = False
        if not isinstance(sig, (bytes, bytearray, memoryview)) or len(sig) != 64:
            got = f"{len(sig)} bytes" if isinstance(sig, (bytes, bytearray, memoryview)) else type(sig).__name__
            raise SignatureError(f"{where}: signature must be 64 bytes (r || s), got {got}")
        sig = bytes(sig)
        # r and s as 32-byte big-endian strings compare as the numbers do.
        order, half = _ORDER_BYTES[self.curve]
        r = sig[:32]
        s = sig[32:]
        if r == _ZERO32 or s == _ZERO32 or r >= order or s >= order:
            raise SignatureError(f"{where}: malformed signature: r and s must be in 1..n-1 of {self.curve}")
        if s > half:
            raise SignatureError(f"{where}: high-S signature refused (atproto requires s <= n/2); key {self.did_key}")
        fast = self._fast
        if verified is not None:
            ok = verified
        elif fast is not None:
            ok = _k256_verify(fast, sig, bytes(data))
        else:
            try:
                self.public_key.verify(encode_dss_signature(int.from_bytes(r, "big"), int.from_bytes(s, "big")), bytes(data), _ECDSA_SHA256)
                ok = True
            except InvalidSignature:
                ok = False
        if not ok:
            raise SignatureError(f"{where}: signature does not verify with key {self.did_key}")


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


_ZERO32: Final = bytes(32)
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())  # holds no state: one for every P-256 check
_ORDER_BYTES: Final = {name: (n.to_bytes(32, "big"), (n // 2).to_bytes(32, "big")) for name, n in CURVE_ORDERS.items()}


def _k256_verify_der(key: coincurve.PublicKey, sig: bytes, data: bytes) -> bool:
    """coincurve's own way: the compact signature made DER, parsed again by libsecp256k1."""
    from coincurve.ecdsa import cdata_to_der, deserialize_compact

    return bool(key.verify(cdata_to_der(deserialize_compact(sig)), data, hasher=_sha256))


def _k256_direct() -> Callable[[coincurve.PublicKey, bytes, bytes], bool]:
    """libsecp256k1 called directly through coincurve's cffi binding (the compact signature
    parsed as it is, no DER round trip: ~2 us less than :func:`_k256_verify_der`), or that
    function when this coincurve lacks the binding. The caller has checked r and s are in
    1..n-1 and s low, so both ways accept exactly the same signatures."""
    try:
        from coincurve._libsecp256k1 import ffi, lib  # type: ignore[import-not-found]
        from coincurve.context import GLOBAL_CONTEXT

        ctx = GLOBAL_CONTEXT.ctx
        parse = lib.secp256k1_ecdsa_signature_parse_compact
        check = lib.secp256k1_ecdsa_verify
        new = ffi.new
    except (ImportError, AttributeError):  # pragma: no cover - another coincurve
        return _k256_verify_der

    def verify(key: coincurve.PublicKey, sig: bytes, data: bytes) -> bool:
        parsed = new("secp256k1_ecdsa_signature *")
        if not parse(ctx, parsed, sig):
            return False
        return bool(check(ctx, parsed, hashlib.sha256(data).digest(), key.public_key))

    return verify


_k256_bound: list[Callable[[coincurve.PublicKey, bytes, bytes], bool]] = []
_k256_lib: list[tuple[Any, Any, Any, Any, threading.local] | None] = []


def _k256_checker(key: coincurve.PublicKey) -> Callable[[bytes, bytes], bool] | None:
    """A check of a 64-byte compact signature of ``data`` (bytes) by ``key`` in two
    libsecp256k1 calls, or None when this coincurve lacks the cffi binding.

    It is True exactly when :meth:`VerifyingKey.verify` accepts the signature:
    ``secp256k1_ecdsa_signature_parse_compact`` refuses ``r`` or ``s`` not below the curve
    order, and ``secp256k1_ecdsa_verify`` refuses ``r`` or ``s`` zero and a high ``s`` (its
    documented lower-S rule) as well as a signature that does not verify. The parsed-signature
    struct is allocated once per thread (cffi lets go of the GIL during the calls, so threads
    must not share one)."""
    if not _k256_lib:
        try:
            from coincurve._libsecp256k1 import ffi, lib
            from coincurve.context import GLOBAL_CONTEXT

            _k256_lib.append((GLOBAL_CONTEXT.ctx, lib.secp256k1_ecdsa_signature_parse_compact, lib.secp256k1_ecdsa_verify, ffi.new, threading.local()))
        except (ImportError, AttributeError):  # pragma: no cover - another coincurve
            _k256_lib.append(None)
    bound = _k256_lib[0]
    if bound is None:  # pragma: no cover - another coincurve
        return None
    ctx, parse, verify, new, local = bound
    point = key.public_key
    sha256 = hashlib.sha256

    def check(sig: bytes, data: bytes) -> bool:
        try:
            parsed = local.sig
        except AttributeError:
            parsed = local.sig = new("secp256k1_ecdsa_signature *")
        return bool(parse(ctx, parsed, sig)) and bool(verify(ctx, parsed, sha256(data).digest(), point))

    return check


def _k256_verify(key: coincurve.PublicKey, sig: bytes, data: bytes) -> bool:
    """Verify a compact low-S secp256k1 signature of ``data`` (SHA-256) with ``key``."""
    if not _k256_bound:
        _k256_bound.append(_k256_direct())  # bound on first use (coincurve is imported lazily)
    return _k256_bound[0](key, sig, data)


#: secp256k1 keys parsed from did:key strings kept at most (:func:`verifying_key`): ~1 KB each
#: (~34 MB when full), so a sync service following many accounts re-parses a key (~80 us) only
#: past this many.
MAX_PARSED_K256: Final = 32_768
#: P-256 keys parsed from did:key strings kept at most: ~3 KB each (OpenSSL's key).
MAX_PARSED_P256: Final = 4096


@functools.lru_cache(maxsize=MAX_PARSED_P256)
def _parsed(did_key: str) -> VerifyingKey:
    return VerifyingKey(parse_did_key(did_key), did_key)


@functools.lru_cache(maxsize=MAX_PARSED_K256)
def _parsed_k256(did_key: str) -> VerifyingKey:
    """A did:key that starts as secp256k1 ones do, parsed without ``cryptography`` (base58,
    then libsecp256k1 reads the point); any other key, and a point libsecp256k1 refuses (for
    :func:`parse_did_key`'s error), the usual way."""
    curve, point = did_key_point(did_key)
    if curve is ec.SECP256K1:
        try:
            fast = _k256_key(point)
        except ValueError:  # not on the curve: parse_did_key says so
            pass
        else:
            return VerifyingKey._light(did_key, fast)
    return VerifyingKey(parse_did_key(did_key), did_key)


def _k256_key(point: bytes) -> coincurve.PublicKey:
    import coincurve

    return coincurve.PublicKey(point)


def verifying_key(key: str | PublicKey | VerifyingKey) -> VerifyingKey:
    """A :class:`VerifyingKey` for a did:key string (parsed once: the last
    :data:`MAX_PARSED_K256` secp256k1 and :data:`MAX_PARSED_P256` other key strings are cached),
    a ``cryptography`` public key or a :class:`VerifyingKey` (returned as it is).

    Raises:
        SignatureError: the did:key cannot be parsed, or the key is not secp256k1 or P-256.
    """
    if isinstance(key, VerifyingKey):
        return key
    if isinstance(key, str):
        # secp256k1 did:keys start "did:key:zQ3s" (the multicodec prefix e7 01 in base58btc)
        return _parsed_k256(key) if key.startswith("did:key:zQ3s") else _parsed(key)
    return VerifyingKey(key)


def sign(private_key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """Sign ``data`` the atproto way: ECDSA over SHA-256, low-S, 64-byte ``r || s``.

    Usable as ``build_repo_car(..., sign=functools.partial(sign, private_key))``. ECDSA nonces
    are random (OpenSSL), so two signatures of the same bytes differ; both verify.

    Raises:
        SignatureError: ``private_key`` is not a secp256k1 or P-256 private key.
    """
    if not isinstance(private_key, ec.EllipticCurvePrivateKey) or private_key.curve.name not in _SUPPORTED:
        kind = private_key.curve.name if isinstance(private_key, ec.EllipticCurvePrivateKey) else type(private_key).__name__
        raise SignatureError(f"cannot sign with a {kind} key; atproto keys are secp256k1 or P-256")
    r, s = decode_dss_signature(private_key.sign(bytes(data), ec.ECDSA(hashes.SHA256())))
    n = CURVE_ORDERS[private_key.curve.name]
    if s > n // 2:
        s = n - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")
