"""The documentation: the site builds with ``mkdocs build --strict`` (a broken link, a missing page
or an unparseable docstring fails), and every ```python block of README.md and docs/ and every
file in examples/ passes ``mypy --strict`` (tests/test_snippets.py runs them). Once, on one
implementation (conftest's ``CORE_FREE``).

The snippets: a block preceded by ``<!-- no-run: REASON -->`` (one that needs the network) is
type-checked but not run. A ```text block preceded by ``<!-- output -->`` right after a snippet is
its exact standard output.

Outside CI these skip, saying so, when mkdocs or mypy is not installed (both are in the ``test``
extra); in CI (``CI`` set) a missing tool fails.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXPECTED = json.loads((ROOT / "fixtures" / "expected.json").read_text())

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_NO_RUN = re.compile(r"<!--\s*no-run\b[^>]*-->\s*$")
_OUTPUT = re.compile(r"\s*<!--\s*output\s*-->\s*\n```text\n(.*?)^```", re.MULTILINE | re.DOTALL)


@dataclass(frozen=True)
class Snippet:
    """One ```python block of a Markdown file, or one file of examples/."""

    name: str  # a module name, unique: readme_l42, docs_guide_reading_l10, example_walk
    where: str  # file:line, for messages
    code: str
    run: bool
    output: str | None  # the exact standard output, when the docs show it


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _snippets() -> list[Snippet]:
    found: list[Snippet] = []
    for path in _markdown_files():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT).as_posix()
        stem = re.sub(r"\W", "_", rel.removesuffix(".md").lower())
        for match in _FENCE.finditer(text):
            if match.group(1) != "python":
                continue
            line = text.count("\n", 0, match.start()) + 1
            before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
            after = _OUTPUT.match(text, match.end())
            found.append(
                Snippet(
                    name=f"{stem}_l{line}",
                    where=f"{rel}:{line}",
                    code=match.group(2),
                    run=not _NO_RUN.search(before),
                    output=after.group(1) if after else None,
                )
            )
    for path in sorted((ROOT / "examples").glob("*.py")):
        found.append(Snippet(f"example_{path.stem}", f"examples/{path.name}", path.read_text(encoding="utf-8"), False, None))
    return found


SNIPPETS = _snippets()


def _tool(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{module} is not installed, but CI must run it (pip install -e '.[test]')")
        pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def test_snippets_found() -> None:
    """The extraction finds the README's quick start and every docs page's examples."""
    names = {s.where.partition(":")[0] for s in SNIPPETS}
    assert "README.md" in names
    assert "examples/walk.py" in names
    assert "docs/guide/reading.md" in names
    assert len(SNIPPETS) >= 15
    assert sum(s.output is not None for s in SNIPPETS) >= 10  # outputs shown are found, so checked


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    _tool("mkdocs")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=env,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stdout}{done.stderr}"
    site = tmp_path / "site"
    for page in ("index.html", "cli/index.html", "guide/reading/index.html", "reference/index.html"):
        assert (site / page).is_file(), page
    reference = (site / "reference" / "index.html").read_text(encoding="utf-8")
    assert 'id="repo_stream.open_repo"' in reference  # mkdocstrings rendered the docstrings
    assert ":func:" not in reference  # tools/mkdocs_hooks.py turned the roles into code


def test_snippets_mypy_strict(tmp_path: Path) -> None:
    _tool("mypy")
    folder = tmp_path / "snippets"
    folder.mkdir()
    names: dict[str, tuple[str, int]] = {}  # file name -> (Markdown file or example, line of its ```python fence)
    for snippet in SNIPPETS:
        (folder / f"{snippet.name}.py").write_text(snippet.code, encoding="utf-8")
        path, _, line = snippet.where.partition(":")
        names[f"{snippet.name}.py"] = (path, int(line) if line else 0)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--python-version", "3.11", str(folder)],
        cwd=ROOT,  # pyproject's [tool.mypy], and repo_stream found in the checkout
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "MYPYPATH": str(ROOT)},
    )

    def where(match: re.Match[str]) -> str:
        """``.../readme_l39.py:5:`` -> ``README.md:44:``, the line in the Markdown file."""
        path, fence = names.get(match.group(1), (match.group(1), 0))
        return f"{path}:{fence + int(match.group(2))}:"

    report = re.sub(r"(?:\S*/)?(\w+\.py):(\d+):", where, done.stdout)
    assert done.returncode == 0, f"mypy --strict on the docs' snippets failed:\n{report}{done.stderr}"


