"""Shared test fixtures: the implementations, the anyio backends and the real CAR samples."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from repo_stream.core import implementation

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("REPO_STREAM_SAMPLES", ROOT.parent / "shared" / "car-samples"))
#: Both implementations: the C core and the pure-Python reference (tools/test-sanitized.sh runs
#: only the C core's, with REPO_STREAM_TEST_IMPLEMENTATIONS=c).
IMPLEMENTATIONS = os.environ.get("REPO_STREAM_TEST_IMPLEMENTATIONS", "c,python").split(",")


#: Test modules that never run the hot path (they test the writer, the generator, identity
#: resolution, signatures): once is enough, on the first implementation.
CORE_FREE = {"test_writer", "test_generate", "test_identity", "test_signature", "test_docs", "test_install"}
#: Test modules that switch implementations themselves.
SELF_MANAGED = {"test_differential", "test_runs", "test_native_guards", "test_json_text"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if "impl" in metafunc.fixturenames and module not in SELF_MANAGED:
        names = IMPLEMENTATIONS[:1] if module in CORE_FREE else IMPLEMENTATIONS
        metafunc.parametrize("impl", names, indirect=True)


@pytest.fixture(autouse=True)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run every test on the C core and on the pure-Python reference (as cbor2 tests its C and
    Python decoders); child processes get ``REPO_STREAM_PURE_PYTHON`` to match. Without the
    built extension the C runs skip, saying so, except in CI (``CI`` set), where a missing C core
    fails them."""
    name = request.param
    if name not in implementation.available():
        if os.environ.get("CI"):
            pytest.fail("the C core (repo_stream._native) was not built, but CI must test it")
        pytest.skip("the C core (repo_stream._native) is not built here")
    before = implementation.backend().name
    implementation.use(name)
    monkeypatch.setenv("REPO_STREAM_PURE_PYTHON", "1" if name == "python" else "0")
    try:
        yield name
    finally:
        implementation.use(before)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return str(request.param)


def sample_path(name: str) -> Path:
    """Path of a real repo CAR in ../shared/car-samples; skips the test, saying why, if absent."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"real CAR sample {path} is not present (../shared/car-samples is optional)")
    return path
