"""The package type-checks with ``mypy --strict`` and passes ``ruff check`` (configured in
pyproject.toml), so README's test command (and CI) covers them. Outside CI they skip, saying so,
when the tools are not installed (they are in the ``test`` extra)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def impl() -> str:
    """Lint once: this overrides conftest's fixture that runs every test on both implementations
    (conftest does not parametrize this module)."""
    return "any"


def tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed, but CI must run it (pip install -e '.[test]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def check(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}"


def test_mypy_strict() -> None:
    tool("mypy")
    # --no-incremental: a cache from before the C core's stub existed can hide it.
    check("mypy", "--strict", "--no-incremental", "repo_stream")


def test_ruff_check() -> None:
    tool("ruff")
    check("ruff", "check", "--no-cache", "repo_stream", "tests", "benchmarks", "fuzz")
