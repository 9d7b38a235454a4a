"""Which implementation runs: the C core by default once built; the reference when forced."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest

import repo_stream
from repo_stream.core import implementation


def _default_in_child(**env: str) -> str:
    child_env = {k: v for k, v in os.environ.items() if k != "REPO_STREAM_PURE_PYTHON"} | env
    done = subprocess.run(
        [sys.executable, "-c", "import repo_stream; print(repo_stream.IMPLEMENTATION)"],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.once
def test_ci_builds_and_uses_the_c_core() -> None:
    """CI fails when the extension was not built: a fresh process must pick the C core."""
    if not os.environ.get("CI") and "c" not in implementation.available():
        pytest.skip("the C core is not built here (CI requires it)")
    assert "c" in implementation.available()
    assert _default_in_child() == "c"


@pytest.mark.once
def test_pure_python_is_forced_by_the_environment() -> None:
    assert _default_in_child(REPO_STREAM_PURE_PYTHON="1") == "python"
    assert _default_in_child(REPO_STREAM_PURE_PYTHON="0") in implementation.available()


def test_use_switches_and_refuses_unknown_names(impl: str) -> None:
    assert implementation.backend().name == impl == repo_stream.IMPLEMENTATION
    with pytest.raises(ValueError, match="implementation 'rust' is not available here"):
        implementation.use("rust")


@pytest.mark.c_only
def test_the_c_cores_sha256_matches_hashlib() -> None:
    """The core hashes MST keys and, with verification, every block with its own SHA-256 (a BMI2
    clone where the CPU has it): every length around the 55/64-byte padding edges, and large."""
    import hashlib
    import random

    from repo_stream import _native

    rng = random.Random(7)
    for n in [*range(200), 1000, 4095, 4096, 4097, 1 << 16, (1 << 20) + 3]:
        data = rng.randbytes(n)
        assert _native.sha256(data) == hashlib.sha256(data).digest(), n


@pytest.mark.c_only
def test_the_c_cores_side_by_side_sha256_matches_hashlib() -> None:
    """Blocks (--verify) and a node's keys are hashed side by side in vector lanes (16 with
    AVX-512, 8 with AVX2): every lane width this CPU has, batches that leave lanes idle or refill
    them many times, and messages of every length around the padding edges, mixed."""
    import hashlib
    import random

    from repo_stream import _native

    assert _native.sha256_lanes() in (1, 8, 16)
    rng = random.Random(11)
    messages = [rng.randbytes(n) for n in [*range(200), 1000, 4096, 4097, 70_000]]
    rng.shuffle(messages)
    expected = [hashlib.sha256(m).digest() for m in messages]
    for lanes in sorted({1, 8, 16, _native.sha256_lanes()}):
        for count in (0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, len(messages)):
            assert _native.sha256_many(messages[:count], lanes) == expected[:count], (lanes, count)
    same_length = [rng.randbytes(190) for _ in range(100)]  # the lanes finish together
    assert _native.sha256_many(same_length) == [hashlib.sha256(m).digest() for m in same_length]


def _tasks() -> int:
    """The C core's verification threads in this process (named rs-verify)."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # ended meanwhile
            pass
    return names.count("rs-verify")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux's /proc/self/task to count threads")
@pytest.mark.c_only
def test_verification_thread_checks_every_block_and_ends_with_its_parser() -> None:
    """With verify_cids the C parser hashes blocks on a helper thread: a block changed anywhere
    is still refused, naming its CID; the thread ends when the parser goes; and a parser used
    again in a forked child (which has no such thread) still verifies, without hanging."""
    import gc
    import signal

    from repo_stream import _native, errors
    from repo_stream.core.cid import cid_text

    data = open(os.path.join(os.path.dirname(__file__), "..", "fixtures", "repo-2000-shuffled.car"), "rb").read()

    def load(chunk: int) -> tuple[Any, int]:
        parser = _native.CarParser(verify_cids=True)
        header, count = None, 0
        for i in range(0, len(data), chunk):
            parser.feed(data[i : i + chunk])
            if header is None and (header := parser.read_header()) is None:
                continue
            count += len(parser.next_sections())
        parser.finish()
        return parser, count

    gc.collect()
    before = _tasks()
    for chunk in (1 << 20, 333):
        parser, count = load(chunk)
        assert count == parser.blocks_read == 2510
        # a thread once there is more than one short batch in the buffer at a time
        assert _tasks() == before + (1 if chunk == 1 << 20 else 0)
        del parser
        gc.collect()
        assert _tasks() == before
    # One byte changed in the first, a middle and the last block: refused, at that section.
    plain = _native.CarParser()
    plain.feed(data)
    plain.read_header()
    sections = plain.next_sections()
    for k in (0, 1255, 2509):
        cid, block = sections[k]
        at = data.index(cid + block) + len(cid) + len(block) // 2
        bad = bytearray(data)
        bad[at] ^= 0x40
        parser = _native.CarParser(verify_cids=True)
        parser.feed(bytes(bad))
        parser.read_header()
        with pytest.raises(errors.CidMismatchError) as info:
            parser.next_sections()
        assert str(info.value) == f"block {cid_text(cid)}: its bytes do not hash to its CID"
    # Fork with a parser whose thread is running: the child goes on with it.
    parser = _native.CarParser(verify_cids=True)
    parser.feed(data[: len(data) // 2])
    parser.read_header()
    first = len(parser.next_sections())
    pid = os.fork()
    if pid == 0:  # the child: finish, check, exit at once
        code = 1
        try:
            signal.alarm(20)
            parser.feed(data[len(data) // 2 :])
            rest = len(parser.next_sections())
            parser.finish()
            code = 0 if first + rest == 2510 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
