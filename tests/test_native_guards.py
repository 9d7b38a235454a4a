"""The C core's private types cannot be misused into memory errors (issue 19, item 13).

``_native.CarParser``, ``BlockTable`` and ``Walker`` are initialised once (a second ``__init__``
raises), every method checks that ``__init__`` ran, and a callback (a block processor, a node
store) that calls back into the parser, the table or the walker while it runs is refused with a
``RuntimeError``, instead of reading a buffer that moved or was freed. tools/test-sanitized.sh runs
these under AddressSanitizer with ``PYTHONMALLOC=malloc``, where any such read would abort.

These are the C core's own types (the reference's are plain Python classes), so they run once.
"""

from __future__ import annotations

import os
from typing import Any

import cbor2
import pytest

from repo_stream import ProcessorError
from repo_stream.core import implementation
from repo_stream.core.cid import dag_cbor_cid

from .helpers import record, repo_car

pytestmark = pytest.mark.skipif("c" not in implementation.available() and not os.environ.get("CI"), reason="the C core is not built here")

MIB = 1024 * 1024


@pytest.fixture(params=["c"], autouse=True)
def impl(request: pytest.FixtureRequest) -> str:
    """Overrides the per-implementation fixture: these are tests of the C core's private API."""
    return str(request.param)


def native() -> Any:
    from repo_stream import _native

    return _native


RECORDS = [(f"app.bsky.feed.post/{i:04d}", record(f"post {i}")) for i in range(40)]
CAR = repo_car(RECORDS)


def loaded(process: Any = None) -> tuple[Any, Any, bytes]:
    """(parser, table, data CID) with the whole of CAR loaded."""
    n = native()
    parser = n.CarParser(2 * MIB, False)
    parser.feed(CAR)
    commit_cid = bytes(cbor2.loads(parser.read_header())["roots"][0].value[1:])
    table = n.BlockTable(commit_cid, process, cbor2.dumps)
    while parser.load_into(table, 1 << 40):
        pass
    parser.finish()
    commit = cbor2.loads(table.raw_block(commit_cid))
    return parser, table, bytes(commit["data"].value[1:])


def test_walker_init_twice_is_refused_and_the_first_init_stands() -> None:
    _, table, data = loaded()
    walker = native().Walker(data, table, table, collections=["app.bsky.feed.post"])
    with pytest.raises(RuntimeError, match=r"^Walker\.__init__ called twice$"):
        walker.__init__(data, table, table, collections=[f"a.b.c{i}" for i in range(1000)])
    with pytest.raises(RuntimeError, match=r"^Walker\.__init__ called twice$"):
        walker.__init__(b"\x01", None)  # even with arguments that would fail to parse
    items = walker.next_chunk(1000)
    assert [key for key, _ in items] == [key for key, _ in RECORDS]


def test_walker_without_init_is_refused() -> None:
    walker = native().Walker.__new__(native().Walker)
    with pytest.raises(RuntimeError, match=r"^Walker is not initialised \(its __init__ did not run\)$"):
        walker.next_chunk(10)
    walker.abandon()
    assert walker.done


def test_block_table_without_init_is_refused_everywhere() -> None:
    n = native()
    table = n.BlockTable.__new__(n.BlockTable)
    message = r"^BlockTable is not initialised \(its __init__ did not run\)$"
    cid = dag_cbor_cid(b"\xa0")
    for call in (
        lambda: table.add(cid, b"\xa0"),
        lambda: table.raw_block(cid),
        lambda: table.node(cid),
        lambda: table.take_rows(100),
        lambda: table.take_run(100, 0),
        table.clear,
        lambda: n.Walker(cid, table, table),
    ):
        with pytest.raises(RuntimeError, match=message):
            call()
    parser = n.CarParser(2 * MIB, False)
    parser.feed(CAR)
    parser.read_header()
    with pytest.raises(RuntimeError, match=message):
        parser.load_into(table, 1 << 30)
    assert len(table) == 0 and table.used == 0 and table.process is None and table.root is None


def test_block_table_init_twice_is_refused() -> None:
    _, table, data = loaded()
    count = len(table)
    with pytest.raises(RuntimeError, match=r"^BlockTable\.__init__ called twice$"):
        table.__init__(b"x", None, cbor2.dumps)
    assert len(table) == count and table.node(data) is not None


def test_car_parser_without_init_or_twice_is_refused() -> None:
    n = native()
    parser = n.CarParser.__new__(n.CarParser)
    message = r"^CarParser is not initialised \(its __init__ did not run\)$"
    for call in (lambda: parser.feed(b"x"), parser.read_header, parser.finish, parser.next_sections):
        with pytest.raises(RuntimeError, match=message):
            call()
    good = n.CarParser(2 * MIB, False)
    good.feed(CAR[:10])
    with pytest.raises(RuntimeError, match=r"^CarParser\.__init__ called twice$"):
        good.__init__(100, True)
    assert good.max_block_size == 2 * MIB and good.bytes_fed == 10


def test_processor_feeding_its_parser_during_load_into_is_refused() -> None:
    """The case that made the table copy from a freed buffer: feed() moves the parser's buffer
    while load_into is copying a section out of it."""
    seen: list[str] = []
    box: dict[str, Any] = {}

    def process(block: bytes) -> int:
        for call in (lambda: box["parser"].feed(b"\x00" * 1_000_000), box["parser"].next_sections, box["parser"].finish):
            try:
                call()
            except RuntimeError as exc:
                seen.append(str(exc))
        for call in (lambda: box["table"].add(b"\x01", b"x"), box["table"].clear, lambda: box["table"].take_rows(1)):
            try:
                call()
            except RuntimeError as exc:
                seen.append(str(exc))
        return len(block)

    n = native()
    parser = n.CarParser(2 * MIB, False)
    box["parser"] = parser
    parser.feed(CAR)
    root = bytes(cbor2.loads(parser.read_header())["roots"][0].value[1:])
    table = n.BlockTable(root, process, cbor2.dumps)
    box["table"] = table
    while parser.load_into(table, 1 << 40):
        pass
    parser.finish()
    assert parser.bytes_fed == len(CAR)
    assert len(table) == len(loaded()[1])  # every block, as without the callbacks
    assert len(seen) == 6 * len(RECORDS)
    assert set(seen) == {
        "CarParser is already running (called again from a callback)",
        "BlockTable is already running (called again from a callback)",
    }
    commit = cbor2.loads(table.raw_block(root))
    walker = n.Walker(bytes(commit["data"].value[1:]), table, table)
    assert walker.next_chunk(1000) == [(key, len(block)) for key, block in RECORDS]


def test_callbacks_calling_into_a_running_walk_are_refused() -> None:
    _, table, data = loaded()
    n = native()

    class Nodes:
        """A node store that calls back into the walker that is asking it."""

        def __init__(self) -> None:
            self.walker: Any = None
            self.seen: list[str] = []

        def node(self, cid: bytes) -> bytes | None:
            for call in (lambda: self.walker.next_chunk(5), self.walker.abandon):
                try:
                    call()
                except RuntimeError as exc:
                    self.seen.append(str(exc))
            return table.raw_block(cid)

    nodes = Nodes()
    walker = n.Walker(data, nodes, None)
    nodes.walker = walker
    pairs = walker.next_chunk(1000)
    assert [key for key, _ in pairs] == [key for key, _ in RECORDS]
    assert nodes.seen == ["Walker is already running (called again from a callback)"] * (2 * walker.nodes_visited)
    assert walker.nodes_visited == len(table) - len(RECORDS) - 1  # every node but not the commit

    def clearing(block: bytes) -> int:
        table.clear()
        return len(block)

    # A processor run by the walk (a record kept raw because it looks like a node) may not clear
    # the table whose blocks the walk is reading: its error is the record's ProcessorError.
    node_like = b"\xa2ae\x80al\xf6"
    car = repo_car([("app.bsky.feed.post/a", node_like)])
    parser = n.CarParser(2 * MIB, False)
    parser.feed(car)
    root = bytes(cbor2.loads(parser.read_header())["roots"][0].value[1:])
    table = n.BlockTable(root, clearing, cbor2.dumps)
    while parser.load_into(table, 1 << 40):
        pass
    commit = cbor2.loads(table.raw_block(root))
    walker = n.Walker(bytes(commit["data"].value[1:]), table, table)
    with pytest.raises(ProcessorError) as info:
        walker.next_chunk(10)
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == "BlockTable is already running (called again from a callback)"
    assert len(table) == 3


# --- the table's hash keys (issue 19, item 12) ----------------------------------------------------

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
PREFIX = b"\x01\x71\x12\x20"  # CIDv1, dag-cbor, sha2-256, 32 bytes


def old_nh_keys() -> list[int]:
    """The NH keys the C table used to draw from CPython's hash secret: SipHash of 8 fixed bytes
    each. ``hash(bytes)`` is that SipHash, so under PYTHONHASHSEED=0 they are public."""
    keys = []
    for i in range(10):
        x = (0x9E3779B97F4A7C15 * (i + 1)) & MASK64
        keys.append(((hash(x.to_bytes(8, "little")) & MASK64) >> 16) & MASK32)
    return keys


def old_nh(cid: bytes, keys: list[int]) -> int:
    """The old table hash of a 36-byte CID before its mixer (a bijection: equal here, equal after)."""
    m = [int.from_bytes(cid[i : i + 4], "little") for i in range(0, 36, 4)] + [0]
    return sum(((m[i] + keys[i]) & MASK32) * ((m[i + 1] + keys[i + 1]) & MASK32) for i in range(0, 10, 2)) & MASK64


def factor_pairs(product: int) -> list[tuple[int, int]]:
    """Pairs (x, y) of 32-bit factors with x * y == product."""
    pairs = []
    divisors = [1]
    n = product
    p = 2
    while n > 1:
        e = 0
        while n % p == 0:
            n //= p
            e += 1
        if e:
            divisors = [d * p**k for d in divisors for k in range(e + 1)]
        p += 1
    for x in sorted(divisors):
        y = product // x
        if x <= MASK32 and y <= MASK32:
            pairs.append((x, y))
    return pairs


def colliding_cids(keys: list[int], count: int) -> list[bytes]:
    """``count`` different 36-byte CIDs whose old table hashes under ``keys`` are all equal: two
    word pairs of the digest are chosen so that each pair's NH product stays the same."""
    product = 2**10 * 3**5 * 5**3 * 7**2 * 11 * 13 * 17 * 19 * 23 * 29 * 31  # 61 bits, many 32-bit factor pairs
    pairs = factor_pairs(product)
    assert len(pairs) ** 2 >= count
    out = []
    for a, b in pairs:
        for c, d in pairs:
            words = [int.from_bytes(PREFIX, "little"), 7, 0, 0, 0, 0, 11, 13, 17]
            words[2], words[3] = (a - keys[2]) & MASK32, (b - keys[3]) & MASK32
            words[4], words[5] = (c - keys[4]) & MASK32, (d - keys[5]) & MASK32
            out.append(b"".join(w.to_bytes(4, "little") for w in words))
            if len(out) == count:
                return out
    raise AssertionError("not enough factor pairs")


LOAD_SCRIPT = r"""
import sys, time
from repo_stream.core import implementation
from repo_stream import _native
car = sys.stdin.buffer.read()
parser = _native.CarParser(2 * 1024 * 1024, False)
parser.feed(car)
parser.read_header()
table = _native.BlockTable(b"no root", None, bytes)
start = time.perf_counter()
while parser.load_into(table, 1 << 40):
    pass
parser.finish()
print(len(table), table.longest_probe, time.perf_counter() - start)
"""


def test_table_hash_is_keyed_from_the_os_not_from_pythonhashseed() -> None:
    """With PYTHONHASHSEED=0 the old keys were public: CIDs forged for them all fell into one slot
    run (80,000 took 7.3 s to load). The keys now come from getrandom at import."""
    import subprocess
    import sys

    from repo_stream.records.writer import car_bytes

    count = 20_000
    keys_script = "from tests.test_native_guards import old_nh_keys; print(old_nh_keys())"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    seed0 = subprocess.run([sys.executable, "-c", keys_script], env=env, capture_output=True, text=True, check=True)
    keys = [int(k) for k in seed0.stdout.strip("[]\n").split(",")]
    cids = colliding_cids(keys, count)
    assert len(set(cids)) == count
    assert len({old_nh(cid, keys) for cid in cids}) == 1  # the old scheme: every one in the same slot
    car = car_bytes([cids[0]], [(cid, b"\x01") for cid in cids])
    for _ in range(2):  # each start draws new keys: neither run degrades
        run = subprocess.run([sys.executable, "-c", LOAD_SCRIPT], input=car, env=env, capture_output=True, check=True)
        kept, longest, seconds = run.stdout.decode().split()
        assert int(kept) == count
        assert int(longest) < 1000, f"longest probe {longest} for {count} forged CIDs"  # ~40; old scheme: ~20,000
        assert float(seconds) < 5.0  # ~0.01 s; the old scheme took ~0.5 s here, ~7 s for 80,000


def test_partial_tree_functions_need_setup() -> None:
    """load_node and lookup_and_invert refuse to run before setup() (they build errors through
    repo_stream.core.messages): a RuntimeError saying so, in a fresh interpreter."""
    import subprocess
    import sys

    script = (
        "import glob, importlib.util, os, sys\n"
        "package = os.path.dirname(importlib.util.find_spec('repo_stream').origin)  # found, not imported\n"
        "path = glob.glob(os.path.join(package, '_native*.so'))[0]\n"
        "spec = importlib.util.spec_from_file_location('repo_stream._native', path)\n"
        "native = importlib.util.module_from_spec(spec); spec.loader.exec_module(native)\n"
        "assert 'repo_stream' not in sys.modules\n"
        "for call in (lambda: native.load_node(b'\\x01q', b'', -1, None, None, True),\n"
        "             lambda: native.lookup_and_invert(b'\\x01q', {}, [], [], True, 32)):\n"
        "    try:\n"
        "        call()\n"
        "    except RuntimeError as exc:\n"
        "        assert 'setup() was not called' in str(exc), exc\n"
        "    else:\n"
        "        sys.exit('no error')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)
    assert done.stdout.strip() == "ok", done.stderr
