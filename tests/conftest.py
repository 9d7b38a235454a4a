"""Shared test fixtures: the implementations, the anyio backends, the real CAR samples and the
hypothesis profiles.

Hypothesis: locally (no ``CI``) the property tests replay a fixed set of examples
(``derandomize``, profile ``fixed``); in CI (``CI`` set), or given ``--hypothesis-seed=N``, they
draw fresh examples from a seed (profile ``fresh``), which the header and the summary print, so
that a failure is reproduced with ``--hypothesis-seed=N``. No example database either way.
"""

from __future__ import annotations

import glob
import os
import pwd
import random
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import core as hypothesis_core
from hypothesis import settings

from repo_stream.core import implementation

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(os.environ.get("REPO_STREAM_SAMPLES", ROOT.parent / "shared" / "car-samples"))
#: Both implementations: the C core and the pure-Python reference (tools/test-sanitized.sh runs
#: only the C core's, with REPO_STREAM_TEST_IMPLEMENTATIONS=c).
IMPLEMENTATIONS = os.environ.get("REPO_STREAM_TEST_IMPLEMENTATIONS", "c,python").split(",")


#: Test modules that never run the hot path (they test the writer, the generator, identity
#: resolution, signatures): once is enough, on the first implementation.
CORE_FREE = {"test_writer", "test_generate", "test_identity", "test_signature", "test_docs", "test_install"}
#: Test modules that switch implementations themselves, or (test_lint) use none.
SELF_MANAGED = {"test_differential", "test_runs", "test_lint", "test_native_guards", "test_json_text", "test_sync_native"}

settings.register_profile("fixed", derandomize=True, database=None, print_blob=True)
settings.register_profile("fresh", derandomize=False, database=None, print_blob=True)
#: The seed the ``fresh`` profile draws from (None with ``fixed``).
HYPOTHESIS_SEED: int | None = None


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "c_only: tests the C core itself: runs on the C core only")
    config.addinivalue_line("markers", "once: does not depend on the implementation: runs once, on the first")
    global HYPOTHESIS_SEED
    seed = config.getoption("hypothesis_seed", None)
    if os.environ.get("CI") or seed is not None:
        settings.load_profile("fresh")
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 32)
            hypothesis_core.global_force_seed = seed  # what --hypothesis-seed sets
        HYPOTHESIS_SEED = int(seed)
    else:
        settings.load_profile("fixed")


def _hypothesis_line() -> str:
    if HYPOTHESIS_SEED is None:
        return "hypothesis: profile 'fixed' (the same examples every run; CI or --hypothesis-seed=N draws fresh ones)"
    return f"hypothesis: profile 'fresh', seed {HYPOTHESIS_SEED} (rerun these examples with --hypothesis-seed={HYPOTHESIS_SEED})"


def pytest_report_header(config: pytest.Config) -> str:
    return _hypothesis_line()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(_hypothesis_line())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    module = metafunc.module.__name__.rpartition(".")[2]
    if "impl" not in metafunc.fixturenames or module in SELF_MANAGED:
        return
    if metafunc.definition.get_closest_marker("c_only"):
        skip = pytest.mark.skip(reason="tests the C core, and REPO_STREAM_TEST_IMPLEMENTATIONS leaves it out")
        names = [pytest.param("c", marks=() if "c" in IMPLEMENTATIONS else skip)]
    elif module in CORE_FREE or metafunc.definition.get_closest_marker("once"):
        names = IMPLEMENTATIONS[:1]
    else:
        names = IMPLEMENTATIONS
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
    """Path of a real repo CAR in ../shared/car-samples (or ``$REPO_STREAM_SAMPLES``).

    If it is absent the test skips, with one reason for every such test (so pytest's summary
    gives it one line); in CI (``CI`` set) the whole run stops instead, with one line: the checks
    against data the project did not make must run there."""
    path = SAMPLES / name
    if not path.is_file():
        missing = f"the real CAR samples are not at {SAMPLES}" if not SAMPLES.is_dir() else f"real CAR sample {path} is missing"
        if os.environ.get("CI"):
            pytest.exit(f"error: {missing}, but CI must run the tests against them (set REPO_STREAM_SAMPLES)", returncode=1)
        pytest.skip(f"{missing} (set REPO_STREAM_SAMPLES to run the tests against them)")
    return path


# --- a PostgreSQL server of our own ------------------------------------------------------------


def _pg_bindir() -> str | None:
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "initdb")):
            return folder
    return None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A PostgreSQL server on a Unix socket in a temporary folder (no TCP); its socket folder."""
    bindir = _pg_bindir()
    if bindir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL's initdb/pg_ctl are missing, but CI must run the PostgreSQL tests (.ci/run installs them)")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql to run these tests")
    pytest.importorskip("psycopg")
    base = tempfile.mkdtemp(prefix="repo-stream-pg-")
    user = None
    if os.geteuid() == 0:  # initdb refuses root: run the server as the package's user
        user = "postgres"
        entry = pwd.getpwnam(user)
        os.chown(base, entry.pw_uid, entry.pw_gid)
    data = os.path.join(base, "data")
    run = {"user": user, "check": True, "capture_output": True, "timeout": 120}
    pg_ctl = os.path.join(bindir, "pg_ctl")
    try:
        subprocess.run([os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"], **run)
        options = f"-k {base} -c listen_addresses='' -F"
        subprocess.run([pg_ctl, "-D", data, "-o", options, "-l", os.path.join(base, "log"), "-w", "start"], **run)
        yield base
    finally:
        subprocess.run([pg_ctl, "-D", data, "-m", "immediate", "-w", "stop"], user=user, capture_output=True, timeout=60, check=False)
        shutil.rmtree(base, ignore_errors=True)


_databases = iter(range(1_000_000))


def new_database(server: str) -> str:
    """A fresh database on the server; its DSN."""
    import psycopg

    name = f"t{next(_databases)}"
    with psycopg.connect(f"host={server} user=postgres dbname=postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return f"host={server} user=postgres dbname={name}"
