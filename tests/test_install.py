"""The package installs anywhere: from its sdist, with or without a C compiler.

Offline: the wheels are built without build isolation (``setuptools`` comes from the test
environment, a ``test`` extra) and installed with ``--no-deps --no-index`` into throwaway venvs
that see the test environment's packages (the dependencies) through a ``.pth`` file.
Marked ``slow`` (about 30 s): ``-m 'not slow'`` leaves it out.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from .conftest import SAMPLES

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "fixtures" / "repo-2000-shuffled.car"
WARNING = "WARNING: repo-stream: the C core (repo_stream._native) could not be built"
NOTE = "warning: the C core (repo_stream._native) is not built"
#: Paths the sdist must hold for pytest to collect and run from it (and the C core to build).
REQUIRED = [
    "setup.py", "pyproject.toml", "MANIFEST.in", "LICENSE", "README.md", "repo_stream/py.typed",
    "repo_stream/_native.pyi", "native/native.h", "native/sha256_lanes.h", "native/module.c",
    "tests/__init__.py", "tests/conftest.py", "tests/helpers.py", "tests/servers.py", "tests/backfill_server.py",
    "fixtures/expected.json", "fixtures/repo-100.car", "fixtures/repo-2000-shuffled.car",
    "tools/test-sanitized.sh", "examples/walk.py", "benchmarks/run.py", "fuzz/harness.c",
]  # fmt: skip


def _run(args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _env(**changes: str | None) -> dict[str, str]:
    """This environment without the test suite's implementation switch, with ``changes``."""
    env = {k: v for k, v in os.environ.items() if k not in ("REPO_STREAM_PURE_PYTHON", "PYTHONPATH")}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


@pytest.fixture(scope="module")
def sdist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package's sdist, built from this checkout and unpacked: its top folder."""
    from importlib.metadata import version

    found = version("setuptools")
    if int(found.split(".")[0]) < 77:  # the SPDX license string needs 77; the test extra asks for it
        message = f"setuptools {found} is older than the build needs (>= 77): pip install -e '.[test]' again"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("sdist")
    build = "import sys\nfrom setuptools import build_meta\nprint(build_meta.build_sdist(sys.argv[1]))"
    name = _run([sys.executable, "-c", build, str(out)], cwd=ROOT).stdout.split()[-1]
    with tarfile.open(out / name) as archive:
        archive.extractall(out, filter="data")
    return out / name.removesuffix(".tar.gz")


def _wheel(tree: Path, out: Path, **env: str) -> tuple[Path, str]:
    """Build a wheel of ``tree`` (a copy of it, so that each build starts clean) into ``out``;
    return it and the build's output."""
    work = out / "src"
    shutil.copytree(tree, work)
    args = [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-cache-dir", "-w", str(out), str(work)]
    done = _run(args, cwd=out, env=_env(**env))
    (wheel,) = out.glob("*.whl")
    return wheel, done.stdout + done.stderr


def _venv(path: Path) -> Path:
    """A venv at ``path`` that sees this environment's packages (the dependencies, pytest) after
    its own; returns its python."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=path).stdout.strip()
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib"), *site.getsitepackages()}
    Path(purelib, "test-environment.pth").write_text("".join(f"{p}\n" for p in sorted(ours) if os.path.isdir(p)))
    return python


def _install(python: Path, wheel: Path) -> None:
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--no-cache-dir", str(wheel)]
    _run(pip, cwd=wheel.parent)


def _libraries(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return [name for name in archive.namelist() if name.endswith((".so", ".pyd"))]


def test_the_sdist_holds_tests_fixtures_tools_and_headers(sdist: Path) -> None:
    missing = [path for path in REQUIRED if not (sdist / path).is_file()]
    assert missing == []
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        return  # not a checkout (e.g. this very sdist): the list above is the check
    tracked = subprocess.run([git, "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split("\n")
    absent = [path for path in tracked if path and path != ".gitignore" and not (sdist / path).is_file()]
    assert absent == []


def test_without_a_compiler_the_pure_python_package_installs_and_runs(sdist: Path, tmp_path: Path) -> None:
    wheel, log = _wheel(sdist, tmp_path / "wheel", CC="/nonexistent")
    assert log.count(WARNING) == 1, log[-3000:]
    assert _libraries(wheel) == []
    python = _venv(tmp_path / "venv")
    _install(python, wheel)
    done = subprocess.run(
        [str(python.parent / "repo-stream"), "stats", str(FIXTURE), "--json"],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    expected = json.loads((ROOT / "fixtures" / "expected.json").read_text())["repo-2000-shuffled.car"]
    assert (result["records"], result["collections"], result["implementation"]) == (2000, expected["collections"], "python")
    assert done.stderr.count(NOTE) == 1, done.stderr
    where = _run([str(python), "-c", "import repo_stream; print(repo_stream.__file__)"], cwd=tmp_path, env=_env()).stdout
    assert where.startswith(str(tmp_path / "venv")), where


def test_pure_python_asked_for_at_install_time_builds_a_pure_wheel(sdist: Path, tmp_path: Path) -> None:
    wheel, log = _wheel(sdist, tmp_path / "wheel", REPO_STREAM_PURE_PYTHON="1")
    assert wheel.name.endswith("-py3-none-any.whl")
    assert _libraries(wheel) == []
    assert WARNING not in log


def test_with_a_compiler_the_c_core_builds_and_the_sdist_tests_pass(sdist: Path, tmp_path: Path) -> None:
    compiler = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    if shutil.which(compiler.split()[0]) is None and not os.environ.get("CI"):
        pytest.skip(f"no C compiler ({compiler}) here")
    wheel, log = _wheel(sdist, tmp_path / "wheel")
    assert WARNING not in log
    assert [Path(name).name.partition(".")[0] for name in _libraries(wheel)] == ["_native"]
    python = _venv(tmp_path / "venv")
    _install(python, wheel)
    # The sdist's tests, run against the installed package (not the sdist's own source folder,
    # which would come first on sys.path): a quick subset that needs conftest, helpers, servers
    # and fixtures, on both implementations.
    tests = tmp_path / "tests-from-sdist"
    shutil.copytree(sdist, tests, ignore=shutil.ignore_patterns("repo_stream", "build"))
    probe = "import repo_stream; print(repo_stream.IMPLEMENTATION, repo_stream.__file__)"
    implementation, where = _run([str(python), "-c", probe], cwd=tests, env=_env()).stdout.split()
    assert implementation == "c" and where.startswith(str(tmp_path / "venv")), where
    subset = [
        "tests/test_cli.py::test_stats_json", "tests/test_cli.py::test_get_a_record_and_a_missing_key",
        "tests/test_cli.py::test_a_repo_named_by_its_did_end_to_end", "tests/test_sources.py",
    ]  # fmt: skip
    env = _env(REPO_STREAM_SAMPLES=str(SAMPLES))  # the real samples, if here (the tests skip those otherwise)
    done = _run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *subset], cwd=tests, env=env, timeout=300)
    summary = done.stdout.splitlines()[-1]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, done.stdout[-3000:]


#: A user's script: the value types flow into the builder, the drivers' items and Records
#: (assert_type fails under mypy if any of them is Any or another type).
USER_SCRIPT = """
from typing import assert_type

import anyio

import repo_stream
from repo_stream.records import JsonValue, RecordValue


async def main() -> None:
    builder = repo_stream.DriverBuilder().with_block_processor(repo_stream.record_json)
    assert_type(builder, repo_stream.DriverBuilder[tuple[str, JsonValue]])
    driver = await repo_stream.DriverBuilder().with_record_cids(True).with_block_processor(len).load_car(b"")
    if isinstance(driver, repo_stream.MemoryDriver):
        async for key, cid, size in driver:
            assert_type(size, int)
    async with repo_stream.open_repo("repo.car", collections=["app.bsky.feed.post"]) as repo:
        async for record in repo:
            assert_type(record, repo_stream.Record[dict[str, JsonValue]])
            assert_type(record.cid, str | None)
    async with repo_stream.open_repo(b"", values=len) as sized:
        async for item in sized:
            assert_type(item.value, int)


for raw in repo_stream.iter_records("repo.car", values="raw"):
    assert_type(raw.value, bytes)
for decoded in repo_stream.iter_records("repo.car", values="python"):
    assert_type(decoded.value, dict[str, RecordValue])
one = repo_stream.get_record_sync("repo.car", "app.bsky.actor.profile/self")
assert_type(one, repo_stream.Record[dict[str, JsonValue]] | None)
anyio.run(main)
"""


def test_the_installed_package_type_checks_from_outside_the_checkout(tmp_path: Path) -> None:
    """mypy run outside the tree finds the package as installed in this environment (an editable
    install must use ``--config-settings editable_mode=compat``: setuptools' default import hook
    hides it from mypy)."""
    from importlib import metadata

    try:
        metadata.distribution("repo-stream")
    except metadata.PackageNotFoundError:
        pytest.skip("repo-stream is not installed in this environment (run from a source folder)")
    script = tmp_path / "uses_repo_stream.py"
    script.write_text(USER_SCRIPT)
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), str(script)],
        cwd=tmp_path, env=_env(MYPYPATH=None), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
