"""Property tests: mutated repo CARs give exactly the right records or a RepoStreamError.

A few valid CARs are built here (:func:`tests.helpers.repo_car`,
:func:`repo_stream.records.writer.build_repo_car`) and mutated by hypothesis: sections reordered,
duplicated or removed (at section granularity, with a small splitter written here), truncation,
bit flips, and splices of byte ranges. Every walk runs under ``anyio.fail_after`` and must either
give exactly the original records, or raise a :class:`RepoStreamError` subclass; anything else
(another exception, a hang) fails. Where the mutation keeps the CAR valid (any reordering, any
duplication) the records must ALWAYS come out exactly; where it breaks it in a known way
(removed blocks, truncation) the error class is exact. With ``with_verify_cids(True)``, bit flips
and splices must give the exact records or an error; without verification they may give other
records (a flipped bit inside a record is not detectable), which must still have strictly
increasing valid keys. Spilled walks (through the SQLite store) run on fewer examples and must
agree with the in-memory walk of the same bytes.

Locally the runs replay the same examples; in CI each run draws fresh ones from a seed it prints
(tests/conftest.py's hypothesis profiles: rerun a CI failure with ``--hypothesis-seed=N``, which
also draws fresh examples locally). The number of examples per test comes from
``REPO_STREAM_FUZZ_EXAMPLES`` (default 500 in memory; the spilled test takes a quarter). For a
longer fuzz run, not in CI::

    REPO_STREAM_FUZZ_EXAMPLES=20000 python -m pytest tests/test_properties.py --hypothesis-seed=1
"""

from __future__ import annotations

import functools
import io
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from repo_stream import DiskBuilder, DriverBuilder, MissingBlockError, NeedDisk, RepoStreamError, TruncatedCarError
from repo_stream.core.car import DEFAULT_READ_SIZE
from repo_stream.records.writer import build_repo_car

from .helpers import DID, REV, read_varint, record, repo_car
from .spec_keys import spec_key

EXAMPLES = int(os.environ.get("REPO_STREAM_FUZZ_EXAMPLES", "500"))
SPILLED_EXAMPLES = max(5, EXAMPLES // 4)
TIME_LIMIT = 10  # seconds per walk


def fuzz_settings(examples: int) -> settings:
    """``examples`` examples, no deadline; derandomize and the database come from the profile
    conftest loads."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.function_scoped_fixture,  # the implementation fixture is the same for every example
        ],
    )


# --------------------------------------------------------------------------------------------
# Base CARs, and a test-side splitter
# --------------------------------------------------------------------------------------------


def split(car: bytes) -> tuple[bytes, list[bytes]]:
    """``(header with its length prefix, [each section with its length prefix])`` of a valid CAR."""
    length, pos = read_varint(car, 0)
    header = car[: pos + length]
    sections = []
    start = pos + length
    while start < len(car):
        n, q = read_varint(car, start)
        sections.append(car[start : q + n])
        start = q + n
    assert header + b"".join(sections) == car
    return header, sections


@dataclass(frozen=True)
class Base:
    name: str
    car: bytes
    records: list[tuple[str, bytes]]

    @functools.cached_property
    def parts(self) -> tuple[bytes, list[bytes]]:
        return split(self.car)

    @functools.cached_property
    def boundaries(self) -> frozenset[int]:
        """Offsets right after the header and after each section."""
        header, sections = self.parts
        out = {len(header)}
        pos = len(header)
        for section in sections:
            pos += len(section)
            out.add(pos)
        return frozenset(out)


def _built(records: list[tuple[str, bytes]], order: str, seed: int = 0) -> bytes:
    out = io.BytesIO()
    build_repo_car(records, did=DID, rev=REV, path=out, order=order, seed=seed)
    return out.getvalue()


def _bases() -> list[Base]:
    small = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(3)]
    mixed = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post {i}")) for i in range(30)]
    mixed += [(f"app.bsky.feed.like/3k{i:011d}", record(f"like {i}", "app.bsky.feed.like")) for i in range(10)]
    mixed += [("app.bsky.actor.profile/self", record("me", "app.bsky.actor.profile"))]
    shared = record("shared")
    odd = [(f"app.bsky.graph.follow/a:b~c-{i}", shared) for i in range(5)]
    odd += [("app.bsky.feed.post/empty-node", bytes.fromhex("a2616580616cf6")), ("app.bsky.feed.post/empty", b"")]
    odd += [(f"app.bsky.feed.post/{'x' * 500}{i}", record(str(i))) for i in range(4)]
    return [
        Base("small", repo_car(small), sorted(small)),
        Base("mixed", repo_car(mixed), sorted(mixed)),
        Base("mixed-reverse", repo_car(mixed, order="reverse"), sorted(mixed)),
        Base("odd-shuffled", _built(odd, "shuffled", 4), sorted(odd)),
        Base("empty", _built([], "preorder"), []),
    ]


BASES = _bases()

# --------------------------------------------------------------------------------------------
# Walking
# --------------------------------------------------------------------------------------------

READ_SIZES = [1, 3, 16, 100, 4096, DEFAULT_READ_SIZE]


@dataclass(frozen=True)
class Outcome:
    """What a walk gave: the records, or the class of the RepoStreamError it raised."""

    records: list[tuple[str, Any]] | None = None
    error: type[RepoStreamError] | None = None


async def _walk(car: bytes, mode: str, verify: bool, read_size: int, process: Callable[[bytes], Any] | None) -> Outcome:
    builder: DriverBuilder[Any] = DriverBuilder().with_verify_cids(verify).with_read_size(read_size)
    if process is not None:
        builder = builder.with_block_processor(process)
    try:
        with anyio.fail_after(TIME_LIMIT):
            if mode == "memory":
                driver = await builder.load_car(car)
                assert not isinstance(driver, NeedDisk)
                return Outcome(records=[r async for r in driver])
            driver = await builder.with_mem_limit_mb(0.0001).load_car(car)
            if not isinstance(driver, NeedDisk):  # nothing was kept (an error came first otherwise)
                return Outcome(records=[r async for r in driver])
            async with await DiskBuilder().open() as store:
                _commit, disk = await driver.finish_loading(store)
                return Outcome(records=[r async for r in disk])
    except RepoStreamError as exc:
        return Outcome(error=type(exc))
    # Anything else (TimeoutError from fail_after included) propagates and fails the test.


def walk(car: bytes, *, mode: str = "memory", verify: bool = False, read_size: int = DEFAULT_READ_SIZE, process: Callable[[bytes], Any] | None = None) -> Outcome:
    return anyio.run(functools.partial(_walk, car, mode, verify, read_size, process), backend="asyncio")


def check_plausible(outcome: Outcome) -> None:
    """Records from a CAR that may have been altered undetectably: keys strictly increasing and
    valid, values bytes."""
    if outcome.records is None:
        return
    keys = [k for k, _ in outcome.records]
    assert all(a < b for a, b in itertools.pairwise(keys)), keys
    assert all(spec_key(k) for k in keys), keys
    assert all(type(v) is bytes for _, v in outcome.records)


# --------------------------------------------------------------------------------------------
# Mutations
# --------------------------------------------------------------------------------------------

bases = st.sampled_from(BASES)
read_sizes = st.sampled_from(READ_SIZES)


@st.composite
def reordered(draw: st.DrawFn) -> tuple[Base, bytes]:
    base = draw(bases)
    header, sections = base.parts
    return base, header + b"".join(draw(st.permutations(sections)))


@st.composite
def duplicated(draw: st.DrawFn) -> tuple[Base, bytes]:
    """Copies of some sections inserted anywhere, and the lot shuffled or not."""
    base = draw(bases)
    header, sections = base.parts
    out = list(sections)
    for _ in range(draw(st.integers(1, 6))):
        copy = draw(st.sampled_from(sections))
        out.insert(draw(st.integers(0, len(out))), copy)
    if draw(st.booleans()):
        out = draw(st.permutations(out))
    return base, header + b"".join(out)


@st.composite
def removed(draw: st.DrawFn) -> tuple[Base, bytes]:
    """At least one section dropped (every block of a base CAR is referenced), the rest shuffled
    or not."""
    base = draw(bases)
    header, sections = base.parts
    drop = draw(st.sets(st.integers(0, len(sections) - 1), min_size=1, max_size=len(sections)))
    kept = [s for i, s in enumerate(sections) if i not in drop]
    if draw(st.booleans()):
        kept = draw(st.permutations(kept))
    return base, header + b"".join(kept)


@st.composite
def truncated(draw: st.DrawFn) -> tuple[Base, int]:
    base = draw(bases)
    if draw(st.booleans()):  # half the time exactly at a section boundary
        return base, draw(st.sampled_from(sorted(base.boundaries)))
    return base, draw(st.integers(0, len(base.car)))


@st.composite
def flipped(draw: st.DrawFn) -> tuple[Base, bytes]:
    base = draw(bases)
    car = bytearray(base.car)
    for _ in range(draw(st.integers(1, 4))):
        car[draw(st.integers(0, len(car) - 1))] ^= 1 << draw(st.integers(0, 7))
    return base, bytes(car)


@st.composite
def spliced(draw: st.DrawFn) -> tuple[Base, bytes]:
    """A byte range copied elsewhere, deleted, or overwritten; or random bytes inserted."""
    base = draw(bases)
    car = bytearray(base.car)
    n = len(car)
    start = draw(st.integers(0, n - 1))
    end = draw(st.integers(start, min(n, start + 300)))
    kind = draw(st.sampled_from(["copy", "delete", "overwrite", "insert"]))
    if kind == "copy":
        at = draw(st.integers(0, n))
        car[at:at] = car[start:end]
    elif kind == "delete":
        del car[start:end]
    elif kind == "overwrite":
        car[start:end] = draw(st.binary(min_size=end - start, max_size=end - start))
    else:
        car[start:start] = draw(st.binary(min_size=1, max_size=64))
    return base, bytes(car)


# --------------------------------------------------------------------------------------------
# In memory
# --------------------------------------------------------------------------------------------


@fuzz_settings(EXAMPLES)
@given(reordered(), st.booleans(), read_sizes)
def test_reordered_sections_give_exact_records(case: tuple[Base, bytes], verify: bool, read_size: int) -> None:
    base, car = case
    assert walk(car, verify=verify, read_size=read_size) == Outcome(records=base.records)


@fuzz_settings(EXAMPLES)
@given(duplicated(), st.booleans(), read_sizes)
def test_duplicated_sections_give_exact_records(case: tuple[Base, bytes], verify: bool, read_size: int) -> None:
    base, car = case
    assert walk(car, verify=verify, read_size=read_size) == Outcome(records=base.records)


@fuzz_settings(EXAMPLES)
@given(removed(), st.booleans(), read_sizes)
def test_removed_sections_raise_missing_block(case: tuple[Base, bytes], verify: bool, read_size: int) -> None:
    _base, car = case
    assert walk(car, verify=verify, read_size=read_size) == Outcome(error=MissingBlockError)


@fuzz_settings(EXAMPLES)
@given(truncated(), read_sizes)
def test_truncation_gives_records_missing_block_or_truncated(case: tuple[Base, int], read_size: int) -> None:
    base, k = case
    outcome = walk(base.car[:k], read_size=read_size)
    if k == len(base.car):
        assert outcome == Outcome(records=base.records)
    elif k in base.boundaries:
        assert outcome == Outcome(error=MissingBlockError)
    else:
        assert outcome == Outcome(error=TruncatedCarError)


@fuzz_settings(EXAMPLES)
@given(flipped(), read_sizes)
def test_bit_flips_verified_give_exact_records_or_an_error(case: tuple[Base, bytes], read_size: int) -> None:
    base, car = case
    outcome = walk(car, verify=True, read_size=read_size)
    assert outcome.error is not None or outcome.records == base.records


@fuzz_settings(EXAMPLES)
@given(flipped(), read_sizes)
def test_bit_flips_unverified_give_plausible_records_or_an_error(case: tuple[Base, bytes], read_size: int) -> None:
    _base, car = case
    check_plausible(walk(car, read_size=read_size))


@fuzz_settings(EXAMPLES)
@given(spliced(), st.booleans(), read_sizes)
def test_splices_give_exact_or_plausible_records_or_an_error(case: tuple[Base, bytes], verify: bool, read_size: int) -> None:
    base, car = case
    outcome = walk(car, verify=verify, read_size=read_size)
    if verify:
        assert outcome.error is not None or outcome.records == base.records
    else:
        check_plausible(outcome)


@fuzz_settings(EXAMPLES)
@given(bases, st.binary(min_size=1, max_size=400), read_sizes)
def test_random_tail_after_the_header_is_an_error(base: Base, tail: bytes, read_size: int) -> None:
    header, _ = base.parts
    outcome = walk(header + tail, read_size=read_size)
    # The tail cannot hold the real commit block (it would have to hash to the root CID).
    assert outcome.error is not None


# --------------------------------------------------------------------------------------------
# Spilled: the same bytes through the SQLite store agree with the in-memory walk
# --------------------------------------------------------------------------------------------

any_mutation = st.one_of(
    reordered().map(lambda c: ("valid", *c)),
    duplicated().map(lambda c: ("valid", *c)),
    removed().map(lambda c: ("removed", *c)),
    truncated().map(lambda c: ("truncated", c[0], c[0].car[: c[1]])),
    flipped().map(lambda c: ("flipped", *c)),
    spliced().map(lambda c: ("spliced", *c)),
)


@fuzz_settings(SPILLED_EXAMPLES)
@given(any_mutation, st.booleans(), st.booleans(), st.sampled_from([16, 4096, DEFAULT_READ_SIZE]))
def test_spilled_walk_agrees_with_memory(case: tuple[str, Base, bytes], verify: bool, use_len: bool, read_size: int) -> None:
    kind, base, car = case
    process = len if use_len else None
    memory = walk(car, verify=verify, read_size=read_size, process=process)
    spilled = walk(car, mode="spilled", verify=verify, read_size=read_size, process=process)
    assert spilled == memory
    expected = [(k, len(v) if use_len else v) for k, v in base.records]
    if kind == "valid":
        assert spilled == Outcome(records=expected)
    elif kind == "removed":
        assert spilled == Outcome(error=MissingBlockError)
    elif verify:
        assert spilled.error is not None or spilled.records == expected


@pytest.mark.parametrize("base", BASES, ids=[b.name for b in BASES])
def test_bases_are_valid_in_both_modes(base: Base) -> None:
    for mode in ("memory", "spilled"):
        assert walk(base.car, mode=mode, verify=True) == Outcome(records=base.records)
    assert len(base.parts[1]) >= 2
    assert cbor2.loads(base.parts[0][1:])["version"] == 1
