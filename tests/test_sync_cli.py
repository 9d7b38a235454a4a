"""repo-stream verify-commit on recorded generated messages: JSON out, exit 1 on a broken
commit, exit 3 when out of sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repo_stream.cli import main
from repo_stream.core.cid import cid_text
from repo_stream.records.generate import generate_records
from repo_stream.sync.generate import CommitGenerator, make_signer


@pytest.fixture
def recorded(tmp_path: Path) -> tuple[Path, Path, str, str, str]:
    sign, did_key = make_signer("k256", 9)
    gen = CommitGenerator("did:plc:cli", sign, generate_records(80, seed=9, profile="small"), seed=9)
    rev, data = gen.rev, cid_text(gen.root)
    commit = tmp_path / "commit.bin"
    commit.write_bytes(gen.commit(gen.random_ops(5)))
    sync = tmp_path / "sync.bin"
    sync.write_bytes(gen.sync_message())
    return commit, sync, did_key, rev, data


def test_verify_commit_prints_json(recorded: tuple[Path, Path, str, str, str], capsys: pytest.CaptureFixture[str]) -> None:
    commit, sync, did_key, rev, data = recorded
    assert main(["verify-commit", str(commit), "--key", did_key, "--prev-rev", rev, "--prev-data", data]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["did"] == "did:plc:cli" and out["since"] == rev and out["prevData"] == data and out["inverted"] is True
    assert len(out["ops"]) == 5 and all(op["action"] in ("create", "update", "delete") for op in out["ops"])
    assert main(["verify-commit", str(sync), "--key", did_key]) == 0
    assert json.loads(capsys.readouterr().out)["rev"] > rev


def test_verify_commit_exit_codes(recorded: tuple[Path, Path, str, str, str], capsys: pytest.CaptureFixture[str]) -> None:
    commit, _, did_key, _, data = recorded
    assert main(["verify-commit", str(commit), "--key", did_key, "--prev-rev", "2222222222222", "--prev-data", data]) == 3
    captured = capsys.readouterr()
    assert "refetch" in captured.err and json.loads(captured.out)["inverted"] is True
    other = make_signer("p256", 1)[1]
    assert main(["verify-commit", str(commit), "--key", other]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "signature does not verify" in err and len(err.splitlines()) == 1
    commit.write_bytes(commit.read_bytes()[:50])
    assert main(["verify-commit", str(commit), "--key", did_key]) == 1
    assert capsys.readouterr().err.startswith("error: subscribeRepos message")
