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
from collections.abc import Callable, Iterator
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


class _Account:
    """The records of one generated account, made one at a time from its ``random.Random``: one
    method per record kind, ``(now, rkey) -> (key, record)`` (``now`` in microseconds since the
    epoch), sharing the account's recent posts, lists and publication, which later records refer to.

    Every random draw comes from ``rng``, in call order: the same seed gives the same records.
    """

    __slots__ = (
        "rand", "randrange", "randbytes", "getrandbits", "choice", "choices", "own", "pool", "pool_n",
        "_day", "_day_text", "my_posts", "ungated", "unpostgated", "my_lists", "publication",
    )  # fmt: skip

    def __init__(self, rng: random.Random, own: str, n: int) -> None:
        self.rand = rng.random
        self.randrange = rng.randrange
        self.randbytes = rng.randbytes
        self.getrandbits = rng.getrandbits
        self.choice = rng.choice
        self.choices = rng.choices
        self.own = own
        # Other accounts this one interacts with (skewed: see other_did).
        self.pool = [self.fresh_did() for _ in range(min(4096, max(16, n // 4)))]
        self.pool_n = len(self.pool)
        self._day = -1  # the day iso() last formatted, and its text
        self._day_text = ""
        # This account's own things other records refer to.
        self.my_posts: deque[str] = deque(maxlen=64)  # recent post rkeys, for quotes and self-replies
        self.ungated: deque[str] = deque(maxlen=64)  # post rkeys without a threadgate yet
        self.unpostgated: deque[str] = deque(maxlen=64)
        self.my_lists: list[str] = []
        self.publication: list[str] = []

    # --- cheap random identifiers -----------------------------------------------------------

    def cid_str(self) -> str:
        # base32 of 0x01711220 + a 32-byte digest: "bafyrei" for the first 30 bits, then 26
        # character pairs for the prefix's last 2 bits (zero), the digest and 2 bits of padding.
        return "bafyrei" + _b32_bits(self.getrandbits(256) << 2, 26)

    def fresh_did(self) -> str:
        return _did_from(self.getrandbits(120))

    def other_did(self) -> str:  # skewed: a few accounts get most of the attention
        return self.pool[int(self.rand() ** 3 * self.pool_n)]

    def other_tid(self, now: int) -> str:
        return _tid(now - self.randrange(1, 120 * _DAY_US), self.randrange(1024))

    def strong_ref(self, now: int) -> dict[str, str]:
        return {"uri": f"at://{self.other_did()}/app.bsky.feed.post/{self.other_tid(now)}", "cid": self.cid_str()}

    def blob(self, mime: str, lo: int, hi: int) -> dict[str, Any]:
        ref = cbor2.CBORTag(42, b"\x00" + _RAW_SHA256 + self.randbytes(32))
        return {"$type": "blob", "ref": ref, "mimeType": mime, "size": self.randrange(lo, hi)}

    # --- time --------------------------------------------------------------------------------

    def iso(self, us: int) -> str:
        day, rem = divmod(us, _DAY_US)
        if day != self._day:
            self._day = day
            self._day_text = (_EPOCH_DATE + _dt.timedelta(days=day)).isoformat()
        secs, micros = divmod(rem, 1_000_000)
        h, rest = divmod(secs, 3600)
        m, s = divmod(rest, 60)
        return f"{self._day_text}T{h:02d}:{m:02d}:{s:02d}.{micros // 1000:03d}Z"

    def words(self, k: int) -> str:
        return " ".join(self.choices(_WORDS, k=k))

    def sentence(self, lo: int, hi: int) -> str:
        text = self.words(self.randrange(lo, hi))
        return text[0].upper() + text[1:] + self.choice(_ENDINGS)

    # --- the records ---------------------------------------------------------------------------
    def profile(self, now: int, _rkey: str) -> tuple[str, dict[str, Any]]:
        return "app.bsky.actor.profile/self", {
            "$type": "app.bsky.actor.profile",
            "displayName": self.sentence(1, 3).rstrip(".!?…"),
            "description": self.sentence(8, 30) + " " + self.sentence(3, 10),
            "avatar": self.blob("image/jpeg", 20_000, 400_000),
            "banner": self.blob("image/jpeg", 80_000, 900_000),
            "createdAt": self.iso(now),
        }

    def post(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        r = self.rand()
        k = self.randrange(1, 12) if r < 0.35 else self.randrange(8, 28) if r < 0.8 else self.randrange(25, 55)
        text = self.sentence(k, k + 1)
        facets: list[dict[str, Any]] | None = None
        if self.rand() < 0.15:
            kind = self.randrange(3)
            if kind == 0:
                feature: dict[str, str] = {"$type": "app.bsky.richtext.facet#link"}
                piece = feature["uri"] = f"{self.choice(_SITES)}/{self.choice(_WORDS)}/{self.randrange(10**6)}"
            elif kind == 1:
                handle = f"{self.choice(_TAGS)}{self.randrange(1000)}.bsky.social"
                piece = "@" + handle
                feature = {"$type": "app.bsky.richtext.facet#mention", "did": self.other_did()}
            else:
                tag = self.choice(_TAGS)
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
        rec: dict[str, Any] = {"$type": "app.bsky.feed.post", "text": text, "createdAt": self.iso(now)}
        if self.rand() < 0.95:
            rec["langs"] = self.choice(_LANGS)
        if facets is not None:
            rec["facets"] = facets
        if self.rand() < 0.3:
            if self.my_posts and self.rand() < 0.2:  # continuing one's own thread
                parent = {"uri": f"at://{self.own}/app.bsky.feed.post/{self.choice(self.my_posts)}", "cid": self.cid_str()}
            else:
                parent = self.strong_ref(now)
            rec["reply"] = {"root": parent if self.rand() < 0.5 else self.strong_ref(now), "parent": parent}
        if self.rand() < 0.25:
            r = self.rand()
            if r < 0.6:
                rec["embed"] = {
                    "$type": "app.bsky.embed.images",
                    "images": [
                        {
                            "alt": self.words(self.randrange(2, 14)) if self.rand() < 0.6 else "",
                            "image": self.blob(self.choice(_MIMES), 30_000, 1_000_000),
                            "aspectRatio": {"width": self.randrange(600, 2000), "height": self.randrange(600, 2000)},
                        }
                        for _ in range(1 + (self.rand() < 0.3) + (self.rand() < 0.2) + (self.rand() < 0.1))
                    ],
                }
            elif r < 0.8:
                external: dict[str, Any] = {
                    "uri": f"{self.choice(_SITES)}/{self.choice(_WORDS)}-{self.choice(_WORDS)}-{self.randrange(10**5)}",
                    "title": self.sentence(3, 9),
                    "description": self.sentence(6, 25),
                }
                if self.rand() < 0.7:
                    external["thumb"] = self.blob("image/jpeg", 5_000, 300_000)
                rec["embed"] = {"$type": "app.bsky.embed.external", "external": external}
            else:
                quoted = self.strong_ref(now)
                if self.my_posts and self.rand() < 0.3:
                    quoted = {"uri": f"at://{self.own}/app.bsky.feed.post/{self.choice(self.my_posts)}", "cid": self.cid_str()}
                rec["embed"] = {"$type": "app.bsky.embed.record", "record": quoted}
        self.my_posts.append(rkey)
        self.ungated.append(rkey)
        self.unpostgated.append(rkey)
        return "app.bsky.feed.post/" + rkey, rec

    def like(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if self.rand() < 0.01:
            subject = {"uri": f"at://{self.other_did()}/app.bsky.feed.generator/{self.choice(_TAGS)}", "cid": self.cid_str()}
        else:
            subject = self.strong_ref(now)
        return "app.bsky.feed.like/" + rkey, {"$type": "app.bsky.feed.like", "subject": subject, "createdAt": self.iso(now)}

    def repost(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        rec = {"$type": "app.bsky.feed.repost", "subject": self.strong_ref(now), "createdAt": self.iso(now)}
        return "app.bsky.feed.repost/" + rkey, rec

    def follow(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        subject = self.other_did() if self.rand() < 0.3 else self.fresh_did()
        return "app.bsky.graph.follow/" + rkey, {"$type": "app.bsky.graph.follow", "subject": subject, "createdAt": self.iso(now)}

    def block(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        rec = {"$type": "app.bsky.graph.block", "subject": self.fresh_did(), "createdAt": self.iso(now)}
        return "app.bsky.graph.block/" + rkey, rec

    def graph_list(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        self.my_lists.append(rkey)
        purpose = "app.bsky.graph.defs#modlist" if self.rand() < 0.3 else "app.bsky.graph.defs#curatelist"
        rec = {"$type": "app.bsky.graph.list", "name": self.sentence(1, 4), "purpose": purpose, "createdAt": self.iso(now)}
        if self.rand() < 0.7:
            rec["description"] = self.sentence(4, 20)
        return "app.bsky.graph.list/" + rkey, rec

    def listitem(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if not self.my_lists:
            return self.graph_list(now, rkey)
        return "app.bsky.graph.listitem/" + rkey, {
            "$type": "app.bsky.graph.listitem",
            "subject": self.fresh_did() if self.rand() < 0.5 else self.other_did(),
            "list": f"at://{self.own}/app.bsky.graph.list/{self.choice(self.my_lists)}",
            "createdAt": self.iso(now),
        }

    def threadgate(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if not self.ungated:  # keyed by a post's rkey; without a post to gate, like something
            return self.like(now, rkey)
        post_rkey = self.ungated.popleft()
        rules: list[dict[str, Any]] = [{"$type": "app.bsky.feed.threadgate#followingRule"}]
        if self.rand() < 0.4:
            rules.append({"$type": "app.bsky.feed.threadgate#mentionRule"})
        if self.my_lists and self.rand() < 0.2:
            gate_list = f"at://{self.own}/app.bsky.graph.list/{self.choice(self.my_lists)}"
            rules.append({"$type": "app.bsky.feed.threadgate#listRule", "list": gate_list})
        return "app.bsky.feed.threadgate/" + post_rkey, {
            "$type": "app.bsky.feed.threadgate",
            "post": f"at://{self.own}/app.bsky.feed.post/{post_rkey}",
            "allow": rules,
            "createdAt": self.iso(now),
        }

    def postgate(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        if not self.unpostgated:
            return self.like(now, rkey)
        post_rkey = self.unpostgated.popleft()
        return "app.bsky.feed.postgate/" + post_rkey, {
            "$type": "app.bsky.feed.postgate",
            "post": f"at://{self.own}/app.bsky.feed.post/{post_rkey}",
            "embeddingRules": [{"$type": "app.bsky.feed.postgate#disableRule"}],
            "detachedEmbeddingUris": [],
            "createdAt": self.iso(now),
        }

    def star(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        return "sh.tangled.feed.star/" + rkey, {
            "$type": "sh.tangled.feed.star",
            "subject": f"at://{self.other_did()}/sh.tangled.repo/{self.other_tid(now)}",
            "createdAt": self.iso(now),
        }

    def leaflet_publication(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        self.publication.append(rkey)
        return "pub.leaflet.publication/" + rkey, {
            "$type": "pub.leaflet.publication",
            "name": self.sentence(1, 4).rstrip(".!?…"),
            "base_path": f"{self.choice(_TAGS)}.leaflet.pub",
            "description": self.sentence(5, 15),
            "icon": self.blob("image/png", 2_000, 60_000),
        }

    def leaflet_document(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        blocks = [
            {
                "$type": "pub.leaflet.pages.linearDocument#block",
                "block": {
                    "$type": "pub.leaflet.blocks.text",
                    "plaintext": " ".join([self.sentence(6, 30) for _ in range(self.randrange(1, 5))]),
                    "facets": [],
                },
            }
            for _ in range(self.randrange(2, 9))
        ]
        rec: dict[str, Any] = {
            "$type": "pub.leaflet.document",
            "title": self.sentence(2, 8).rstrip(".!?…"),
            "description": self.sentence(5, 20),
            "author": self.own,
            "publishedAt": self.iso(now),
            "pages": [{"$type": "pub.leaflet.pages.linearDocument", "blocks": blocks}],
        }
        if self.publication:
            rec["publication"] = f"at://{self.own}/pub.leaflet.publication/{self.publication[0]}"
        return "pub.leaflet.document/" + rkey, rec

    def play(self, now: int, rkey: str) -> tuple[str, dict[str, Any]]:
        played = now - self.randrange(1_000_000, 600_000_000)
        return "fm.teal.alpha.feed.play/" + rkey, {
            "$type": "fm.teal.alpha.feed.play",
            "trackName": self.sentence(1, 5).rstrip(".!?…"),
            "artistNames": [self.choice(_ARTISTS)] if self.rand() < 0.85 else [self.choice(_ARTISTS), self.choice(_ARTISTS)],
            "releaseName": self.sentence(1, 4).rstrip(".!?…"),
            "duration": self.randrange(90, 420),
            "playedTime": self.iso(played),
            "musicServiceBaseDomain": "music.example.com",
            "submissionClientAgent": "scrobbler/0.4.2",
        }

    def odd(self, now: int, j: int) -> tuple[str, dict[str, Any]]:
        collection, rkey = _ODD_KEYS[j]
        if rkey is None:
            rkey = "".join(self.choices(_RKEY_CHARS, k=512))
        if collection == "chat.bsky.actor.declaration":
            return f"{collection}/{rkey}", {"$type": collection, "allowIncoming": "following"}
        if collection == "app.bsky.feed.generator":
            return f"{collection}/{rkey}", {
                "$type": collection,
                "did": "did:web:feeds.example.com",
                "displayName": self.sentence(1, 3).rstrip(".!?…"),
                "description": self.sentence(6, 20),
                "avatar": self.blob("image/png", 5_000, 100_000),
                "createdAt": self.iso(now),
            }
        return f"{collection}/{rkey}", {"$type": collection, "note": self.sentence(2, 10), "createdAt": self.iso(now)}

    def makers(self) -> dict[str, Callable[[int, str], tuple[str, dict[str, Any]]]]:
        """The record maker of each collection of the mixes (:data:`PROFILES`)."""
        return {
            "app.bsky.feed.like": self.like,
            "app.bsky.feed.post": self.post,
            "app.bsky.graph.follow": self.follow,
            "app.bsky.feed.repost": self.repost,
            "app.bsky.graph.block": self.block,
            "fm.teal.alpha.feed.play": self.play,
            "app.bsky.graph.listitem": self.listitem,
            "app.bsky.feed.threadgate": self.threadgate,
            "sh.tangled.feed.star": self.star,
            "app.bsky.feed.postgate": self.postgate,
            "pub.leaflet.document": self.leaflet_document,
            "app.bsky.graph.list": self.graph_list,
            "pub.leaflet.publication": self.leaflet_publication,
        }


def _kind_table(
    makers: dict[str, Callable[[int, str], tuple[str, dict[str, Any]]]], weights: tuple[tuple[str, float], ...]
) -> list[Callable[[int, str], tuple[str, dict[str, Any]]]]:
    """A lookup table of 1000 slots, each the maker of a collection in proportion to its weight:
    drawing a kind is one ``random()`` and one index."""
    mix = [makers[c] for c, _ in weights]
    cum: list[float] = []
    total = 0.0
    for _, w in weights:
        total += w
        cum.append(total)
    table = []
    for slot in range(1000):
        x = (slot + 0.5) / 1000 * total
        table.append(mix[next(i for i, c in enumerate(cum) if x < c)])
    return table


def _records(
    n: int, rng: random.Random, own: str, clock: int, weights: tuple[tuple[str, float], ...]
) -> Iterator[tuple[str, bytes]]:
    """The schedule: the profile first, then one record of each kind (``_COVER``), the odd keys
    spread evenly, and the mix of ``weights`` for the rest, in simulated-time order."""
    account = _Account(rng, own, n)
    makers = account.makers()
    table = _kind_table(makers, weights)
    rand = rng.random
    randrange = rng.randrange
    dumps = cbor2.dumps
    tid = _tid

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
            key, rec = account.profile(now, rkey)
        elif i <= n_cover:
            key, rec = makers[_COVER[i - 1]](now, rkey)
        elif i in odd_at:
            key, rec = account.odd(now, odd_at[i])
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
