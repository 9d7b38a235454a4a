"""``python -m repo_stream stats``: output, spilling, and one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import sample_path
from .helpers import record, repo_car

POSTS = [(f"app.bsky.feed.post/3k{i:011d}", record(f"post number {i}")) for i in range(40)]
LIKES = [(f"app.bsky.feed.like/3k{i:011d}", record(f"like {i}", "app.bsky.feed.like")) for i in range(25)]


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "repo_stream", *args],
        input=stdin.decode("latin-1") if stdin is not None else None,
        capture_output=True,
        text=True,
        encoding="latin-1",
        timeout=60,
    )


@pytest.fixture(scope="module")
def car_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "repo.car"
    path.write_bytes(repo_car(POSTS + LIKES, order="reverse"))
    return path


def test_stats_json(car_path: Path, impl: str) -> None:
    done = run("stats", str(car_path), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["did"] == "did:plc:testtesttesttesttesttest"
    assert result["rev"] == "3kaaaaaaaaaaa"
    assert result["version"] == 3
    assert result["records"] == 65
    assert result["record_bytes"] == sum(len(b) for _, b in POSTS + LIKES)
    assert result["collections"] == {"app.bsky.feed.like": 25, "app.bsky.feed.post": 40}
    assert result["spilled"] is False
    assert result["commit"].startswith("bafyrei") and result["data"].startswith("bafyrei")
    assert result["seconds"] > 0
    assert result["implementation"] == impl
    assert done.stderr == ""


def test_stats_spilled_matches_and_removes_its_disk_file(car_path: Path, tmp_path: Path) -> None:
    spill = tmp_path / "spill.db"
    done = run("stats", str(car_path), "--json", "--mem-limit-mb", "0.001", "--disk-path", str(spill))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["spilled"] is True
    assert result["records"] == 65
    assert not spill.exists()
    assert list(tmp_path.iterdir()) == []


def test_stats_stdin_and_human_output(car_path: Path) -> None:
    done = run("stats", "-", stdin=car_path.read_bytes())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "records       65" in lines
    assert "spilled       no" in lines
    assert "  app.bsky.feed.post  40" in lines


def test_stats_little_sample() -> None:
    path = sample_path("little.car")
    done = run("stats", str(path), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["records"], result["record_bytes"]) == (278, 246960)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "error: empty input: no CAR header"),
        (b"\x05hello", "error: CAR header (bytes 1..6) is not valid DAG-CBOR"),
        (None, "error: input ends inside the section at byte"),
    ],
    ids=["empty", "not-cbor", "truncated"],
)
def test_stats_errors_are_one_line(car_path: Path, tmp_path: Path, data: bytes | None, message: str) -> None:
    bad = tmp_path / "bad.car"
    bad.write_bytes(data if data is not None else car_path.read_bytes()[:-10])
    done = run("stats", str(bad))
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(message)
    assert done.stderr.count("\n") == 1
    assert "Traceback" not in done.stderr


def test_stats_missing_file() -> None:
    done = run("stats", "/nonexistent/repo.car")
    assert done.returncode == 1
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


def test_stats_progress_only_on_a_terminal(car_path: Path) -> None:
    """With stderr on a terminal, stats draws tqdm bars there; piped (above) it prints nothing."""
    import fcntl
    import os
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    child = subprocess.Popen(
        [sys.executable, "-m", "repo_stream", "stats", str(car_path)], stdout=subprocess.PIPE, stderr=follower
    )
    os.close(follower)
    drawn = b""
    try:
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the child has exited and closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
        out = child.stdout.read()
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        child.stdout.close()
        os.close(leader)
    assert b"loading" in drawn and b"walking" in drawn
    assert b"records       65" in out


def test_generate_writes_cached_repos(tmp_path: Path) -> None:
    done = run("generate", "60", "120", "--seed", "3", "--cache-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    paths = [Path(line.split("\t")[0]) for line in done.stdout.splitlines()]
    assert [p.name for p in paths] == ["repo-60-shuffled-s3.car", "repo-120-shuffled-s3.car"]
    first = paths[0].read_bytes()
    again = run("generate", "60", "--seed", "3", "--cache-dir", str(tmp_path))  # reused, not rewritten
    assert again.returncode == 0 and paths[0].read_bytes() == first
    result = json.loads(run("stats", str(paths[1]), "--json").stdout)
    assert result["records"] == 120
    bad = run("generate", "-1", "--cache-dir", str(tmp_path))
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1


def test_generate_small_profile(tmp_path: Path) -> None:
    from repo_stream.generate import PROFILES, generate_repo_car

    done = run("generate", "80", "--profile", "small", "--seed", "4", "--cache-dir", str(tmp_path))
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.split("\t")[0])
    assert path == tmp_path / "repo-80-small-shuffled-s4.car"
    out = io.BytesIO()
    generate_repo_car(out, 80, seed=4, profile="small")
    assert path.read_bytes() == out.getvalue()
    assert json.loads(run("stats", str(path), "--json").stdout)["records"] == 80
    bad = run("generate", "80", "--profile", "tiny", "--cache-dir", str(tmp_path))
    assert bad.returncode == 2 and "invalid choice: 'tiny'" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # The command offers exactly the generator's profiles.
    helped = run("generate", "--help")
    assert "{" + ",".join(PROFILES) + "}" in helped.stdout
