"""Generate realistic, deterministic atproto repositories for tests and benchmarks.

:func:`generate_records` yields ``(key, record_block)`` pairs shaped like a real Bluesky account;
:func:`generate_repo_car` writes them as a canonical repo CAR with
:func:`repo_stream.records.writer.build_repo_car`; :func:`generate_cached` does that once per
``(n, order, seed, profile)`` into a cache folder and returns the file's path.

Determinism: everything random comes from one ``random.Random(seed)`` owned by the call (no global
random state, no wall clock, no uuid, no hash-order dependence), so the same ``n``, ``seed`` and
``did`` give byte-identical records, and the same arguments give a byte-identical CAR, on any
platform, for a given version of this module and of Python's ``random`` (stable across CPython
3.11+). Changing the generator changes its output: regenerate ``fixtures/`` with
``python fixtures/make_fixtures.py`` and clear ``.cache/cars`` when it does.

The record mix of the default profile (shares of the ``n`` records; the rare kinds are seeded
once early on, see below):

* ``app.bsky.actor.profile/self``: exactly one (displayName, description, avatar and banner blobs).
* ``app.bsky.feed.like`` ~45%: ``{subject: strongRef {uri, cid}, createdAt}``, ~210 bytes.
* ``app.bsky.feed.post`` ~25%: text of 1 to ~300 characters (some non-ASCII), ``createdAt``,
  usually ``langs``; ~15% with ``facets`` (links, mentions, tags; UTF-8 byte ranges), ~30%
  replies (``reply: {root, parent}`` strongRefs), ~25% with an embed (images with blob refs,
  an external link card, or a quoted record); median ~340 bytes, 90% within 100-760.
* ``app.bsky.graph.follow`` ~12% and ``app.bsky.graph.block`` ~2%: ``{subject: did, createdAt}``.
* ``app.bsky.feed.repost`` ~10%: like a like.
* ``app.bsky.graph.list`` / ``app.bsky.graph.listitem`` (~0.2% / ~1.6%; items point at this
  account's lists), ``app.bsky.feed.threadgate`` / ``app.bsky.feed.postgate`` (keyed by the
  rkey of one of this account's posts), ``pub.leaflet.publication`` (one) and
  ``pub.leaflet.document`` (1-5 KB), ``sh.tangled.feed.star``, ``fm.teal.alpha.feed.play``.
* Odd but legal keys, ``min(13, n // 25)`` of them (all of them once ``n >= 325``), spread
  evenly through the stream, in this order: a 512-character rkey, ``chat.bsky.actor.declaration/
  self``, feed generators ``whats-hot`` and ``cool_feed.v2``, then in ``com.example.odd.record``:
  ``key~with~tildes``, ``ns:colon:key``, ``a.b-c_d:e~f``, ``MixedCase123``,
  ``2024-05-06T07:08:09.123Z``, ``~``, ``...``, ``0``, ``self``.

Two profiles (``profile=`` on every function here, ``--profile`` on the command line) draw the
records that are not fixed below from these same kinds with different shares:

* ``"default"`` (:data:`PROFILES`, the default, what ``fixtures/`` are made with): the shares
  above; 500,000 records (seed 0) hold 120,751,817 bytes of record blocks, 241.50 bytes each on
  average, in a 185.3 MB shuffled CAR.
* ``"small"``: like and follow heavy, as real accounts are: likes ~52%, follows ~29%, posts ~7%,
  reposts ~6%, blocks ~3%, list items ~1.5%, the rest ~1.5% together. 500,000 records (seed 0)
  hold 95,382,612 bytes of record blocks, **190.77 bytes** (190.765224) each on average, in a
  159.9 MB (159,873,211-byte) shuffled CAR; 20,000 records (seed 0) hold 3,844,233 bytes,
  192.21 each (tests/test_generate.py checks that figure, and 185-195 bytes for other seeds).
  Each kind's records are shaped as in the default profile (likes ~212 bytes, follows ~107,
  reposts ~214, posts ~366 on average).

Record 0 is the profile; records 1-13 are one each of the 13 TID-keyed kinds above in a fixed
order (so any ``n >= 14`` has all of them); the odd keys sit at fixed positions; the rest are
drawn by share. All other rkeys are TIDs (13 characters of base32-sortable ``234567a-z``) from a
simulated clock that runs strictly forward from 2023-04-01 over about two years whatever ``n``
is, so keys are unique and grow with time (the clock id part changes now and then, as when a PDS
restarts); the commit ``rev`` is a TID after all of them.

Records are canonical DAG-CBOR (``cbor2.dumps(..., canonical=True)``), with ``$type`` in every
record, blob refs ``{"$type": "blob", "ref": link, "mimeType", "size"}``, and no floats. CIDs of
other accounts' records are random but well-formed base32 CIDv1 strings (``bafyrei...``); DIDs
are random ``did:plc:`` strings.

Speed (one CPU core): about 12 us a record to generate (a third of it in ``cbor2.dumps``);
generating and writing a shuffled 500,000-record CAR (185 MB) takes about 13 s.
"""

from __future__ import annotations

import datetime as _dt
import os
import random
import secrets
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2

from ..core.commit import Commit
from .writer import ORDERS, build_repo_car

__all__ = [
    "DEFAULT_CACHE_DIR",
    "PROFILES",
    "default_did",
    "generate_cached",
    "generate_records",
    "generate_repo_car",
    "repo_rev",
]

#: Where :func:`generate_cached` writes by default: ``.cache/cars`` under the working directory
#: (git-ignored when that is the repo root).
DEFAULT_CACHE_DIR = Path(".cache") / "cars"

_S32 = "234567abcdefghijklmnopqrstuvwxyz"  # base32-sortable, for TIDs
_S32_PAIRS = [a + b for a in _S32 for b in _S32]  # 10 bits -> 2 characters
_B32 = "abcdefghijklmnopqrstuvwxyz234567"  # RFC 4648 base32, lowercase: CIDs and did:plc
_B32_PAIRS = [a + b for a in _B32 for b in _B32]
_RKEY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_:~"

_START_US = 1_680_307_200_000_000  # 2023-04-01T00:00:00Z, microseconds since the Unix epoch
_SPAN_US = 730 * 86_400_000_000  # the simulated clock covers two years, whatever n is
_DAY_US = 86_400_000_000
_EPOCH_DATE = _dt.date(1970, 1, 1)

_RAW_SHA256 = b"\x01\x55\x12\x20"


def _tid(us: int, clock: int) -> str:
    """Return the 13-character TID of ``us`` microseconds since the epoch and a 10-bit clock id."""
    v = (us << 10) | clock
    p = _S32_PAIRS
    return (
        _S32[(v >> 60) & 31]
        + p[(v >> 50) & 1023]
        + p[(v >> 40) & 1023]
        + p[(v >> 30) & 1023]
        + p[(v >> 20) & 1023]
        + p[(v >> 10) & 1023]
        + p[v & 1023]
    )


def _b32_bits(v: int, pairs: int) -> str:
    """Return the low ``10 * pairs`` bits of ``v`` as lowercase RFC 4648 base32, most significant first.

    ``base64.b32encode`` is pure Python and ~3x slower; this is what makes CID strings cheap.
    """
    p = _B32_PAIRS
    return "".join([p[(v >> shift) & 1023] for shift in range(10 * pairs - 10, -1, -10)])


def _did_from(bits120: int) -> str:
    """Return ``did:plc:`` + 24 lowercase base32 characters (the base32 of 15 random bytes)."""
    return "did:plc:" + _b32_bits(bits120, 12)


def _account(seed: Any) -> tuple[random.Random, str, int]:
    """Return ``(rng, default did, TID clock id)`` for ``seed``: the first draws of every repo."""
    rng = random.Random(seed)
    did = _did_from(rng.getrandbits(120))
    clock = rng.getrandbits(10)
    return rng, did, clock


def default_did(seed: Any = 0) -> str:
    """Return the account DID :func:`generate_records` uses for ``seed`` when none is given."""
    return _account(seed)[1]


def repo_rev(seed: Any = 0) -> str:
    """Return the commit ``rev`` for ``seed``: a TID later than every record TID of the repo."""
    _, _, clock = _account(seed)
    return _tid(_START_US + _SPAN_US, clock)


# Vocabulary for post text, written for this module. A few non-ASCII words make UTF-8 byte
# offsets (facets) differ from character offsets.
_WORDS = (
    "the a an and or but so if then because when while after before about around into over under "
    "with without from for of on at to by up down out again still just really maybe probably "
    "today tonight tomorrow yesterday morning evening weekend week year time day night "
    "I you we they it this that these those my your our their his her "
    "is are was were be been being have has had do does did can could will would should might "
    "think know feel see look want need love like hate try make take give find keep start stop "
    "read write post share follow build ship fix break test run walk cook eat drink sleep "
    "coffee tea bread soup pizza garden cat dog bird rain snow sun wind sky sea river mountain "
    "city train bus bike street park library museum concert show movie book song album record "
    "code bug release server database network protocol feed timeline thread reply repo schema "
    "good great bad weird funny strange quiet loud small big new old long short early late "
    "honestly literally absolutely definitely finally already almost never always sometimes "
    "friend friends people everyone someone nobody family team community neighbours "
    "question answer idea plan project problem solution update news story photo picture "
    "café naïve über smörgåsbord jalapeño façade 日本 東京 ラーメン 🎉 ✨ 🙂 🌧️ ☕ 📚 — … "
).split()
_ENDINGS = (".", ".", ".", "!", "?", "", "", "…")
_TAGS = ("art", "photography", "books", "music", "python", "rustlang", "atproto", "gardening", "cats", "running")
_LANGS = (["en"],) * 17 + (["ja"], ["de"], ["pt"], ["en", "es"], ["fr"])
_MIMES = ("image/jpeg", "image/jpeg", "image/jpeg", "image/png", "image/webp")
_ARTISTS = (
    "The Quiet Rooms", "Mira Voss", "Low Tide Orchestra", "Kepler & Sons", "DJ Paperclip", "Aoi Tanaka", "Northern Static"
)
_SITES = ("https://example.com", "https://blog.example.org", "https://news.example.net", "https://docs.example.dev")

# Share of each kind among the records drawn at random (relative weights).
_MIX = (
    ("app.bsky.feed.like", 45.0),
    ("app.bsky.feed.post", 25.0),
    ("app.bsky.graph.follow", 12.0),
    ("app.bsky.feed.repost", 10.0),
    ("app.bsky.graph.block", 2.0),
    ("fm.teal.alpha.feed.play", 2.0),
    ("app.bsky.graph.listitem", 1.6),
    ("app.bsky.feed.threadgate", 0.6),
    ("sh.tangled.feed.star", 0.6),
    ("app.bsky.feed.postgate", 0.3),
    ("pub.leaflet.document", 0.3),
    ("app.bsky.graph.list", 0.2),
)
# The "small" profile: the same kinds, drawn like and follow heavy, as the repos of active
# accounts are (most of what people do is like, follow and repost; posts are a small share), so
# the average record block is about 190 bytes instead of about 240. Likes are ~212 bytes,
# follows and blocks ~107, reposts ~214, posts ~365 on average.
_SMALL_MIX = (
    ("app.bsky.feed.like", 52.0),
    ("app.bsky.graph.follow", 29.0),
    ("app.bsky.feed.post", 7.0),
    ("app.bsky.feed.repost", 6.0),
    ("app.bsky.graph.block", 3.0),
    ("app.bsky.graph.listitem", 1.5),
    ("fm.teal.alpha.feed.play", 0.5),
    ("sh.tangled.feed.star", 0.3),
    ("app.bsky.feed.threadgate", 0.2),
    ("app.bsky.feed.postgate", 0.1),
    ("pub.leaflet.document", 0.1),
    ("app.bsky.graph.list", 0.1),
)
#: The record mixes :func:`generate_records` knows, by name; ``"default"`` is the default.
PROFILES: dict[str, tuple[tuple[str, float], ...]] = {"default": _MIX, "small": _SMALL_MIX}
# One of each, right after the profile, so that every kind is present once n >= 14. The list and
# the post come before the kinds that refer to them, the publication before its documents.
_COVER = (
    "app.bsky.graph.list",
    "app.bsky.feed.post",
    "pub.leaflet.publication",
    "app.bsky.feed.like",
    "app.bsky.graph.follow",
    "app.bsky.feed.repost",
    "app.bsky.graph.block",
    "app.bsky.graph.listitem",
    "app.bsky.feed.threadgate",
    "app.bsky.feed.postgate",
    "sh.tangled.feed.star",
    "pub.leaflet.document",
    "fm.teal.alpha.feed.play",
)
_ODD = "com.example.odd.record"
# Odd-but-legal keys, in the order they are included as n grows; None = the 512-character rkey.
_ODD_KEYS: tuple[tuple[str, str | None], ...] = (
    (_ODD, None),
    ("chat.bsky.actor.declaration", "self"),
    ("app.bsky.feed.generator", "whats-hot"),
    ("app.bsky.feed.generator", "cool_feed.v2"),
    (_ODD, "key~with~tildes"),
    (_ODD, "ns:colon:key"),
    (_ODD, "a.b-c_d:e~f"),
    (_ODD, "MixedCase123"),
    (_ODD, "2024-05-06T07:08:09.123Z"),
    (_ODD, "~"),
    (_ODD, "..."),
    (_ODD, "0"),
    (_ODD, "self"),
)


def _profile_weights(profile: str) -> tuple[tuple[str, float], ...]:
    """Return the record mix of ``profile``; raise ``ValueError`` naming the known ones if unknown."""
    try:
        return PROFILES[profile]
    except (KeyError, TypeError):
        raise ValueError(f"profile must be one of {', '.join(PROFILES)}; got {profile!r}") from None


def generate_records(
    n: int, *, seed: Any = 0, did: str | None = None, profile: str = "default"
) -> Iterator[tuple[str, bytes]]:
    """Yield ``n`` records of a realistic account as ``(key, record_block)``, lazily.

    See the module docstring for the mix, the key scheme and the determinism guarantee. Records
    come in simulated-time order (TID keys increasing), not key order, and nothing is kept per
    record except a few dozen recent rkeys, so memory does not grow with ``n``.

    Args:
        n: the number of records, ``int >= 0``.
        seed: the seed of the ``random.Random`` used for everything (``int`` recommended).
        did: the account DID, written into its own at-URIs (list items, threadgates, leaflet
            documents); default :func:`default_did` of ``seed``. Only those fields change with it.
        profile: the record mix, a key of :data:`PROFILES`: ``"default"`` (~240-byte average
            record block, what ``fixtures/`` are made with) or ``"small"`` (like and follow
            heavy, ~190 bytes; see the module docstring).

    Yields:
        ``(key, block)``: ``key`` a valid, unique repo key ``"<collection>/<rkey>"`` (``str``),
        ``block`` the record's canonical DAG-CBOR ``bytes``.

    Raises:
        TypeError / ValueError: ``n`` is not an ``int`` / is negative, or ``profile`` is unknown
            (raised by the call itself, before any iteration).
    """
    if type(n) is not int:
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    weights = _profile_weights(profile)
    rng, own_did, clock = _account(seed)
    if did is not None:
        own_did = did
    return _records(n, rng, own_did, clock, weights)


def _records(
    n: int, rng: random.Random, own: str, clock: int, weights: tuple[tuple[str, float], ...]
) -> Iterator[tuple[str, bytes]]:
    rand = rng.random
    randrange = rng.randrange
    randbytes = rng.randbytes
    getrandbits = rng.getrandbits
    choice = rng.choice
    choices = rng.choices
    dumps = cbor2.dumps
    tid = _tid
    b32_bits = _b32_bits
    Tag = cbor2.CBORTag

    # --- cheap random identifiers -----------------------------------------------------------

    def cid_str() -> str:
        # base32 of 0x01711220 + a 32-byte digest: "bafyrei" for the first 30 bits, then 26
        # character pairs for the prefix's last 2 bits (zero), the digest and 2 bits of padding.
        return "bafyrei" + b32_bits(getrandbits(256) << 2, 26)

    def fresh_did() -> str:
        return _did_from(getrandbits(120))

    pool = [fresh_did() for _ in range(min(4096, max(16, n // 4)))]
    pool_n = len(pool)

    def other_did() -> str:  # skewed: a few accounts get most of the attention
        return pool[int(rand() ** 3 * pool_n)]

    def other_tid(now: int) -> str:
        return tid(now - randrange(1, 120 * _DAY_US), randrange(1024))

    def strong_ref(now: int) -> dict[str, str]:
        return {"uri": f"at://{other_did()}/app.bsky.feed.post/{other_tid(now)}", "cid": cid_str()}

    def blob(mime: str, lo: int, hi: int) -> dict[str, Any]:
        ref = Tag(42, b"\x00" + _RAW_SHA256 + randbytes(32))
        return {"$type": "blob", "ref": ref, "mimeType": mime, "size": randrange(lo, hi)}

    # --- time --------------------------------------------------------------------------------
    day_cache = [-1, ""]

    def iso(us: int) -> str:
        day, rem = divmod(us, _DAY_US)
        if day != day_cache[0]:
            day_cache[0] = day
            day_cache[1] = (_EPOCH_DATE + _dt.timedelta(days=day)).isoformat()
        secs, micros = divmod(rem, 1_000_000)
        h, rest = divmod(secs, 3600)
        m, s = divmod(rest, 60)
        return f"{day_cache[1]}T{h:02d}:{m:02d}:{s:02d}.{micros // 1000:03d}Z"

    def words(k: int) -> str:
        return " ".join(choices(_WORDS, k=k))

    def sentence(lo: int, hi: int) -> str:
        text = words(randrange(lo, hi))
        return text[0].upper() + text[1:] + choice(_ENDINGS)

    # --- this account's own things other records refer to ------------------------------------
    my_posts: deque[str] = deque(maxlen=64)  # recent post rkeys, for quotes and self-replies
    ungated: deque[str] = deque(maxlen=64)  # post rkeys without a threadgate yet
    unpostgated: deque[str] = deque(maxlen=64)
    my_lists: list[str] = []
    publication: list[str] = []

    # --- the records ---------------------------------------------------------------------------
    def profile(now: int, _rkey: str) -> tuple[str, dict[str, Any]]:
        return "app.bsky.actor.profile/self", {
            "$type": "app.bsky.actor.profile",
            "displayName": sentence(1, 3).rstrip(".!?…"),
            "description": sentence(8, 30) + " " + sentence(3, 10),
            "avatar": blob("image/jpeg", 20_000, 400_000),
            "banner": blob("image/jpeg", 80_000, 900_000),
            "createdAt": iso(now),
        }

    def post(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        r = rand()
        k = randrange(1, 12) if r < 0.35 else randrange(8, 28) if r < 0.8 else randrange(25, 55)
        text = sentence(k, k + 1)
        facets: list[dict[str, Any]] | None = None
        if rand() < 0.15:
            kind = randrange(3)
            if kind == 0:
                feature: dict[str, str] = {"$type": "app.bsky.richtext.facet#link"}
                piece = feature["uri"] = f"{choice(_SITES)}/{choice(_WORDS)}/{randrange(10**6)}"
            elif kind == 1:
                handle = f"{choice(_TAGS)}{randrange(1000)}.bsky.social"
                piece = "@" + handle
                feature = {"$type": "app.bsky.richtext.facet#mention", "did": other_did()}
            else:
                tag = choice(_TAGS)
                piece = "#" + tag
                feature = {"$type": "app.bsky.richtext.facet#tag", "tag": tag}
            start = len(text.encode("utf-8")) + 1
            text = f"{text} {piece}"
            facets = [
                {
                    "$type": "app.bsky.richtext.facet",
                    "index": {"byteStart": start, "byteEnd": start + len(piece.encode("utf-8"))},
                    "features": [feature],
                }
            ]
        text = text[:300]
        if facets is not None and facets[0]["index"]["byteEnd"] > len(text.encode("utf-8")):
            facets = None  # the facet was cut off
        rec: dict[str, Any] = {"$type": "app.bsky.feed.post", "text": text, "createdAt": iso(now)}
        if rand() < 0.95:
            rec["langs"] = choice(_LANGS)
        if facets is not None:
            rec["facets"] = facets
        if rand() < 0.3:
            if my_posts and rand() < 0.2:  # continuing one's own thread
                parent = {"uri": f"at://{own}/app.bsky.feed.post/{choice(my_posts)}", "cid": cid_str()}
            else:
                parent = strong_ref(now)
            rec["reply"] = {"root": parent if rand() < 0.5 else strong_ref(now), "parent": parent}
        if rand() < 0.25:
            r = rand()
            if r < 0.6:
                rec["embed"] = {
                    "$type": "app.bsky.embed.images",
                    "images": [
                        {
                            "alt": words(randrange(2, 14)) if rand() < 0.6 else "",
                            "image": blob(choice(_MIMES), 30_000, 1_000_000),
                            "aspectRatio": {"width": randrange(600, 2000), "height": randrange(600, 2000)},
                        }
                        for _ in range(1 + (rand() < 0.3) + (rand() < 0.2) + (rand() < 0.1))
                    ],
                }
            elif r < 0.8:
                external: dict[str, Any] = {
                    "uri": f"{choice(_SITES)}/{choice(_WORDS)}-{choice(_WORDS)}-{randrange(10**5)}",
                    "title": sentence(3, 9),
                    "description": sentence(6, 25),
                }
                if rand() < 0.7:
                    external["thumb"] = blob("image/jpeg", 5_000, 300_000)
                rec["embed"] = {"$type": "app.bsky.embed.external", "external": external}
            else:
                quoted = strong_ref(now)
                if my_posts and rand() < 0.3:
                    quoted = {"uri": f"at://{own}/app.bsky.feed.post/{choice(my_posts)}", "cid": cid_str()}
                rec["embed"] = {"$type": "app.bsky.embed.record", "record": quoted}
        my_posts.append(rkey)
        ungated.append(rkey)
        unpostgated.append(rkey)
        return "app.bsky.feed.post/" + rkey, rec

    def like(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if rand() < 0.01:
            subject = {"uri": f"at://{other_did()}/app.bsky.feed.generator/{choice(_TAGS)}", "cid": cid_str()}
        else:
            subject = strong_ref(now)
        return "app.bsky.feed.like/" + rkey, {"$type": "app.bsky.feed.like", "subject": subject, "createdAt": iso(now)}

    def repost(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        rec = {"$type": "app.bsky.feed.repost", "subject": strong_ref(now), "createdAt": iso(now)}
        return "app.bsky.feed.repost/" + rkey, rec

    def follow(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        subject = other_did() if rand() < 0.3 else fresh_did()
        return "app.bsky.graph.follow/" + rkey, {"$type": "app.bsky.graph.follow", "subject": subject, "createdAt": iso(now)}

    def block(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        rec = {"$type": "app.bsky.graph.block", "subject": fresh_did(), "createdAt": iso(now)}
        return "app.bsky.graph.block/" + rkey, rec

    def graph_list(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        my_lists.append(rkey)
        purpose = "app.bsky.graph.defs#modlist" if rand() < 0.3 else "app.bsky.graph.defs#curatelist"
        rec = {"$type": "app.bsky.graph.list", "name": sentence(1, 4), "purpose": purpose, "createdAt": iso(now)}
        if rand() < 0.7:
            rec["description"] = sentence(4, 20)
        return "app.bsky.graph.list/" + rkey, rec

    def listitem(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if not my_lists:
            return graph_list(now, rkey)
        return "app.bsky.graph.listitem/" + rkey, {
            "$type": "app.bsky.graph.listitem",
            "subject": fresh_did() if rand() < 0.5 else other_did(),
            "list": f"at://{own}/app.bsky.graph.list/{choice(my_lists)}",
            "createdAt": iso(now),
        }

    def threadgate(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if not ungated:  # keyed by a post's rkey; without a post to gate, like something
            return like(now, rkey)
        post_rkey = ungated.popleft()
        rules: list[dict[str, Any]] = [{"$type": "app.bsky.feed.threadgate#followingRule"}]
        if rand() < 0.4:
            rules.append({"$type": "app.bsky.feed.threadgate#mentionRule"})
        if my_lists and rand() < 0.2:
            gate_list = f"at://{own}/app.bsky.graph.list/{choice(my_lists)}"
            rules.append({"$type": "app.bsky.feed.threadgate#listRule", "list": gate_list})
        return "app.bsky.feed.threadgate/" + post_rkey, {
            "$type": "app.bsky.feed.threadgate",
            "post": f"at://{own}/app.bsky.feed.post/{post_rkey}",
            "allow": rules,
            "createdAt": iso(now),
        }

    def postgate(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if not unpostgated:
            return like(now, rkey)
        post_rkey = unpostgated.popleft()
        return "app.bsky.feed.postgate/" + post_rkey, {
            "$type": "app.bsky.feed.postgate",
            "post": f"at://{own}/app.bsky.feed.post/{post_rkey}",
            "embeddingRules": [{"$type": "app.bsky.feed.postgate#disableRule"}],
            "detachedEmbeddingUris": [],
            "createdAt": iso(now),
        }

    def star(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        return "sh.tangled.feed.star/" + rkey, {
            "$type": "sh.tangled.feed.star",
            "subject": f"at://{other_did()}/sh.tangled.repo/{other_tid(now)}",
            "createdAt": iso(now),
        }

    def leaflet_publication(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        publication.append(rkey)
        return "pub.leaflet.publication/" + rkey, {
            "$type": "pub.leaflet.publication",
            "name": sentence(1, 4).rstrip(".!?…"),
            "base_path": f"{choice(_TAGS)}.leaflet.pub",
            "description": sentence(5, 15),
            "icon": blob("image/png", 2_000, 60_000),
        }

    def leaflet_document(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        blocks = [
            {
                "$type": "pub.leaflet.pages.linearDocument#block",
                "block": {
                    "$type": "pub.leaflet.blocks.text",
                    "plaintext": " ".join([sentence(6, 30) for _ in range(randrange(1, 5))]),
                    "facets": [],
                },
            }
            for _ in range(randrange(2, 9))
        ]
        rec: dict[str, Any] = {
            "$type": "pub.leaflet.document",
            "title": sentence(2, 8).rstrip(".!?…"),
            "description": sentence(5, 20),
            "author": own,
            "publishedAt": iso(now),
            "pages": [{"$type": "pub.leaflet.pages.linearDocument", "blocks": blocks}],
        }
        if publication:
            rec["publication"] = f"at://{own}/pub.leaflet.publication/{publication[0]}"
        return "pub.leaflet.document/" + rkey, rec

    def play(now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        played = now - randrange(1_000_000, 600_000_000)
        return "fm.teal.alpha.feed.play/" + rkey, {
            "$type": "fm.teal.alpha.feed.play",
            "trackName": sentence(1, 5).rstrip(".!?…"),
            "artistNames": [choice(_ARTISTS)] if rand() < 0.85 else [choice(_ARTISTS), choice(_ARTISTS)],
            "releaseName": sentence(1, 4).rstrip(".!?…"),
            "duration": randrange(90, 420),
            "playedTime": iso(played),
            "musicServiceBaseDomain": "music.example.com",
            "submissionClientAgent": "scrobbler/0.4.2",
        }

    makers = {
        "app.bsky.feed.like": like,
        "app.bsky.feed.post": post,
        "app.bsky.graph.follow": follow,
        "app.bsky.feed.repost": repost,
        "app.bsky.graph.block": block,
        "fm.teal.alpha.feed.play": play,
        "app.bsky.graph.listitem": listitem,
        "app.bsky.feed.threadgate": threadgate,
        "sh.tangled.feed.star": star,
        "app.bsky.feed.postgate": postgate,
        "pub.leaflet.document": leaflet_document,
        "app.bsky.graph.list": graph_list,
        "pub.leaflet.publication": leaflet_publication,
    }
    mix = [makers[c] for c, _ in weights]
    cum: list[float] = []
    total = 0.0
    for _, w in weights:
        total += w
        cum.append(total)
    # A lookup table of 1000 slots makes drawing a kind one random() and one index.
    table = []
    for slot in range(1000):
        x = (slot + 0.5) / 1000 * total
        table.append(mix[next(i for i, c in enumerate(cum) if x < c)])

    def odd(now: int, j: int) -> tuple[str, dict[str, Any]]:
        collection, rkey = _ODD_KEYS[j]
        if rkey is None:
            rkey = "".join(choices(_RKEY_CHARS, k=512))
        if collection == "chat.bsky.actor.declaration":
            return f"{collection}/{rkey}", {"$type": collection, "allowIncoming": "following"}
        if collection == "app.bsky.feed.generator":
            return f"{collection}/{rkey}", {
                "$type": collection,
                "did": "did:web:feeds.example.com",
                "displayName": sentence(1, 3).rstrip(".!?…"),
                "description": sentence(6, 20),
                "avatar": blob("image/png", 5_000, 100_000),
                "createdAt": iso(now),
            }
        return f"{collection}/{rkey}", {"$type": collection, "note": sentence(2, 10), "createdAt": iso(now)}

    # --- the schedule ----------------------------------------------------------------------------
    n_cover = min(len(_COVER), max(0, n - 1))
    n_odd = min(len(_ODD_KEYS), n // 25)
    free = n - 1 - n_cover  # positions after the profile and the cover records
    odd_at = {1 + n_cover + (j + 1) * free // (n_odd + 1): j for j in range(n_odd)}
    step = _SPAN_US // max(n, 1)  # at least 1 us for any practical n

    for i in range(n):
        now = _START_US + i * step + randrange(step)  # strictly increasing: stays within its step
        if rand() < 0.002:  # the PDS restarted with a new TID clock id
            clock = randrange(1024)
        rkey = tid(now, clock)
        if i == 0:
            key, rec = profile(now, rkey)
        elif i <= n_cover:
            key, rec = makers[_COVER[i - 1]](now, rkey)
        elif i in odd_at:
            key, rec = odd(now, odd_at[i])
        else:
            key, rec = table[int(rand() * 1000)](now, rkey)
        yield key, dumps(rec, canonical=True)


def generate_repo_car(
    path: Any, n: int, *, seed: Any = 0, order: str = "shuffled", did: str | None = None, profile: str = "default"
) -> Commit:
    """Write the repo of :func:`generate_records` ``(n, seed=seed, did=did, profile=profile)`` as a CAR at ``path``.

    Args:
        path: a filesystem path (``str`` / ``PathLike``; created or truncated) or a binary file
            object with ``.write`` (left open), as for :func:`~repo_stream.records.writer.build_repo_car`.
        n: the number of records, ``int >= 0``.
        seed: the generator seed; also the block-shuffle seed when ``order="shuffled"``.
        order: ``"preorder"``, ``"shuffled"`` or ``"reverse"`` (see ``build_repo_car``).
        did: the account DID; default :func:`default_did` of ``seed``.
        profile: the record mix, ``"default"`` or ``"small"`` (see :data:`PROFILES`).

    Returns:
        The written :class:`~repo_stream.core.commit.Commit` (``rev`` is :func:`repo_rev` of ``seed``,
        unsigned: ``sig`` is empty).

    The same arguments always give a byte-identical file. Writing streams the records through a
    temporary spool; memory holds the keys and CIDs (about 150 bytes a record) and the MST nodes.

    Raises:
        ValueError: bad ``n``, ``order`` or ``profile``. TypeError: ``n`` is not an ``int``.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    records = generate_records(n, seed=seed, did=did, profile=profile)
    return build_repo_car(
        records, did=did if did is not None else default_did(seed), rev=repo_rev(seed), path=path, order=order, seed=seed
    )


def generate_cached(
    n: int, *, seed: int = 0, order: str = "shuffled", cache_dir: Path | None = None, profile: str = "default"
) -> Path:
    """Return the path of the cached CAR for these arguments, generating it if absent.

    The file is :func:`generate_repo_car` ``(path, n, seed=seed, order=order, profile=profile)``,
    named ``repo-{n}-{order}-s{seed}.car`` for the default profile (the names it always had) and
    ``repo-{n}-{profile}-{order}-s{seed}.car`` for any other, e.g. ``repo-500000-small-shuffled-s0.car``. It is written to
    a temporary name in ``cache_dir`` and renamed into place, so a present file is complete (an
    interrupted run leaves at most a ``.tmp-*`` file, never a partial CAR under the real name).
    A present file is trusted as it is: delete the cache after changing the generator.

    Args:
        n: the number of records, ``int >= 0``.
        seed: the generator seed (an ``int``; it is part of the file name).
        order: ``"preorder"``, ``"shuffled"`` or ``"reverse"``.
        cache_dir: the folder, created if missing; default :data:`DEFAULT_CACHE_DIR`
            (``.cache/cars`` under the working directory, git-ignored in the repo).
        profile: the record mix, ``"default"`` or ``"small"`` (see :data:`PROFILES`).

    Returns:
        The CAR's :class:`~pathlib.Path`.

    Raises:
        ValueError: bad ``n``, ``order`` or ``profile``. OSError: the folder or file cannot be written.
    """
    if type(n) is not int or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}; got {order!r}")
    _profile_weights(profile)
    folder = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    kind = "" if profile == "default" else f"{profile}-"
    target = folder / f"repo-{n}-{kind}{order}-s{seed}.car"
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    # A new file with the usual mode (0666 less the umask, as open() gives; mkstemp's is 0600),
    # under a unique temporary name, renamed into place once complete.
    tmp = str(folder / f".tmp-{target.name}-{os.getpid()}-{secrets.token_hex(6)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as out:
            generate_repo_car(out, n, seed=seed, order=order, profile=profile)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target
