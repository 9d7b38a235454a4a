"""Every example and every runnable ```python block of README.md and docs/ runs as written (see
tests/test_docs.py for how they are found), on both implementations.

A snippet runs in a fresh process in a temporary folder holding a link to ``fixtures/``, so the
docs' examples read ``fixtures/repo-2000-shuffled.car`` and may write files of their own; the
child gets ``REPO_STREAM_PURE_PYTHON`` from conftest's ``impl`` fixture.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_docs import EXPECTED, ROOT, SNIPPETS, Snippet


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder to run a snippet in, with ``fixtures/`` linked in."""
    (tmp_path / "fixtures").symlink_to(ROOT / "fixtures", target_is_directory=True)
    return tmp_path


RUNNABLE = [s for s in SNIPPETS if s.run]


@pytest.mark.parametrize("snippet", RUNNABLE, ids=[s.where for s in RUNNABLE])
def test_snippet_runs(snippet: Snippet, workdir: Path) -> None:
    path = workdir / f"{snippet.name}.py"
    path.write_text(snippet.code, encoding="utf-8")
    done = _run([str(path)], workdir)
    assert done.returncode == 0, f"{snippet.where} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    if snippet.output is not None:
        assert done.stdout == snippet.output, f"{snippet.where}: the output differs from the one the docs show"


@pytest.mark.parametrize("mem_limit_mb", ["64", "0.1"])
def test_example_walk(workdir: Path, mem_limit_mb: str) -> None:
    """examples/walk.py prints every record of the fixture and the exact totals, in memory and
    spilled."""
    expected = EXPECTED["repo-2000-shuffled.car"]
    done = _run([str(ROOT / "examples" / "walk.py"), "fixtures/repo-2000-shuffled.car", "--mem-limit-mb", mem_limit_mb], workdir)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-1] == f"# {expected['records']} records, {expected['record_bytes']} bytes of record blocks"
    records = [line for line in lines if not line.startswith("#")]
    assert len(records) == expected["records"]
    keys = [line.partition("\t")[0] for line in records]
    assert keys == sorted(keys)
    assert any(line.startswith("# spilled to") for line in lines) == (mem_limit_mb == "0.1")
