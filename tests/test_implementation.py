"""Which implementation runs: the C core by default once built; the reference when forced."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import repo_stream
from repo_stream import implementation


def _default_in_child(**env: str) -> str:
    child_env = {k: v for k, v in os.environ.items() if k != "REPO_STREAM_PURE_PYTHON"} | env
    done = subprocess.run(
        [sys.executable, "-c", "import repo_stream; print(repo_stream.IMPLEMENTATION)"],
        capture_output=True, text=True, env=child_env, timeout=60, check=True,
    )
    return done.stdout.strip()


def test_ci_builds_and_uses_the_c_core() -> None:
    """CI fails when the extension was not built: a fresh process must pick the C core."""
    if not os.environ.get("CI") and "c" not in implementation.available():
        pytest.skip("the C core is not built here (CI requires it)")
    assert "c" in implementation.available()
    assert _default_in_child() == "c"


def test_pure_python_is_forced_by_the_environment() -> None:
    assert _default_in_child(REPO_STREAM_PURE_PYTHON="1") == "python"
    assert _default_in_child(REPO_STREAM_PURE_PYTHON="0") in implementation.available()


def test_use_switches_and_refuses_unknown_names(impl: str) -> None:
    assert implementation.backend().name == impl == repo_stream.IMPLEMENTATION
    with pytest.raises(ValueError, match="implementation 'rust' is not available here"):
        implementation.use("rust")


def test_the_c_cores_sha256_matches_hashlib() -> None:
    """The core hashes MST keys and, with verification, every block with its own SHA-256 (a BMI2
    clone where the CPU has it): every length around the 55/64-byte padding edges, and large."""
    import hashlib
    import random

    if "c" not in implementation.available():
        pytest.skip("the C core is not built here")
    from repo_stream import _native

    rng = random.Random(7)
    for n in [*range(200), 1000, 4095, 4096, 4097, 1 << 16, (1 << 20) + 3]:
        data = rng.randbytes(n)
        assert _native.sha256(data) == hashlib.sha256(data).digest(), n
