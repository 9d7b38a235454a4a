"""Shared test fixtures: the anyio backends and the real CAR samples in ../shared/car-samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("REPO_STREAM_SAMPLES", ROOT.parent / "shared" / "car-samples"))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every ``@pytest.mark.anyio`` test on asyncio and on trio."""
    return request.param


def sample_path(name: str) -> Path:
    """Path of a real repo CAR in ../shared/car-samples; skips the test, saying why, if absent."""
    path = SAMPLES / name
    if not path.is_file():
        pytest.skip(f"real CAR sample {path} is not present (../shared/car-samples is optional)")
    return path
