"""``python -m repo_stream stats``: output, spilling, and one-line errors."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest

from .conftest import sample_path
from .helpers import DID, REV, record, repo_car
from .servers import LocalHTTPServer, Reply, json_reply

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
    assert bad.returncode == 2 and "argument N: must be a positive integer, got '-1'" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo-120-shuffled-s3.car", "repo-60-shuffled-s3.car"]


def test_generate_small_profile(tmp_path: Path) -> None:
    from repo_stream.records.generate import PROFILES, generate_repo_car

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


# --- ls, dump, get, verify, and what every command shares -------------------------------------

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
EXPECTED_FIXTURES = json.loads((FIXTURES / "expected.json").read_text())
GET_REPO = "/xrpc/com.atproto.sync.getRepo"


def run_bytes(*args: str, stdin: bytes | None = None, script: bool = False) -> subprocess.CompletedProcess[bytes]:
    """Run the command line (``python -m repo_stream``, or with ``script`` the installed
    ``repo-stream`` script beside this Python), output as bytes."""
    command = [sys.executable, "-m", "repo_stream"]
    if script:
        path = Path(sys.executable).parent / "repo-stream"
        if not path.exists():
            pytest.skip(f"the repo-stream script is not installed beside {sys.executable}")
        command = [str(path)]
    return subprocess.run([*command, *args], input=stdin, capture_output=True, timeout=60, check=False)


def cid_of(block: bytes) -> str:
    """The base32 CIDv1 (dag-cbor, sha2-256) of a record block, computed here from its bytes."""
    raw = b"\x01\x71\x12\x20" + hashlib.sha256(block).digest()
    return "b" + base64.b32encode(raw).decode().lower().rstrip("=")


def comparable(value: Any) -> Any:
    """A JSON value with each ``{"$bytes": ...}`` replaced by the bytes it decodes to (padding is optional)."""
    if isinstance(value, dict):
        if set(value) == {"$bytes"}:
            text = value["$bytes"]
            return ("bytes", base64.b64decode(text + "=" * (-len(text) % 4)))
        return {k: comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [comparable(v) for v in value]
    return value


def json_lines(data: bytes) -> list[Any]:
    assert data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def signed(name: str) -> tuple[Path, dict[str, Any]]:
    path = sample_path(f"signed-{name}.car")
    return path, json.loads(path.with_suffix(".json").read_text())


SORTED = sorted(POSTS + LIKES)


def test_ls_lists_keys_and_cids_in_key_order(car_path: Path) -> None:
    done = run_bytes("ls", str(car_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "".join(f"{key} {cid_of(block)}\n" for key, block in SORTED)
    assert done.stderr == b""
    as_json = run_bytes("ls", str(car_path), "--json")
    assert json_lines(as_json.stdout) == [{"key": key, "cid": cid_of(block)} for key, block in SORTED]


def test_ls_collection_and_spilled(car_path: Path, tmp_path: Path) -> None:
    done = run_bytes("ls", str(car_path), "--collection", "app.bsky.feed.like", "--mem-limit-mb", "0.001")
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "".join(f"{key} {cid_of(block)}\n" for key, block in sorted(LIKES))
    both = run_bytes("ls", "-", "--collection", "app.bsky.feed.post", "--collection", "app.bsky.feed.like", stdin=car_path.read_bytes())
    assert both.stdout.decode() == "".join(f"{key} {cid_of(block)}\n" for key, block in SORTED)
    none = run_bytes("ls", str(car_path), "--collection", "app.bsky.graph.follow")
    assert (none.returncode, none.stdout, none.stderr) == (0, b"", b"")


@pytest.mark.parametrize("name", ["k256", "p256"])
def test_ls_signed_samples(name: str) -> None:
    path, _ = signed(name)
    rows = [line.split("\t") for line in path.with_suffix(".records.tsv").read_text().splitlines()]
    done = run_bytes("ls", str(path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "".join(f"{key} {cid}\n" for key, cid, _ in rows)


@pytest.mark.parametrize("name", ["k256", "p256"])
def test_dump_signed_samples_equal_the_reference_dump(name: str, tmp_path: Path) -> None:
    path, _ = signed(name)
    expected = [comparable(v) for v in json_lines(path.with_suffix(".dump.jsonl").read_bytes())]
    done = run_bytes("dump", str(path))
    assert done.returncode == 0, done.stderr
    assert [comparable(v) for v in json_lines(done.stdout)] == expected
    assert any("bytes" in repr(v) for v in expected)  # the samples do hold $bytes values
    spilled = run_bytes("dump", str(path), "--mem-limit-mb", "0.01", "--disk-path", str(tmp_path / "spill.db"))
    assert spilled.returncode == 0, spilled.stderr
    assert spilled.stdout == done.stdout
    assert list(tmp_path.iterdir()) == []


def test_dump_fixture_values(car_path: Path) -> None:
    done = run_bytes("dump", str(car_path), "--collection", "app.bsky.feed.like")
    assert done.returncode == 0, done.stderr
    lines = json_lines(done.stdout)
    assert [(d["key"], d["cid"]) for d in lines] == [(key, cid_of(block)) for key, block in sorted(LIKES)]
    assert [d["value"] for d in lines] == [cbor2.loads(block) for _, block in sorted(LIKES)]


def test_get_a_record_and_a_missing_key(car_path: Path) -> None:
    key, block = LIKES[7]
    done = run_bytes("get", str(car_path), key)
    assert done.returncode == 0, done.stderr
    assert json_lines(done.stdout) == [cbor2.loads(block)]
    for missing in ["app.bsky.feed.like/3k99999999999", "app.bsky.feed.zzz/x"]:  # (not a key: a usage error)
        bad = run_bytes("get", str(car_path), missing)
        assert bad.returncode == 1 and bad.stdout == b""
        pattern = rf"error: no record {missing} in the repo of {DID} \(commit bafyrei[a-z2-7]{{52}}, rev {REV}\)\n"
        assert re.fullmatch(pattern, bad.stderr.decode()), bad.stderr


def test_get_signed_sample_record() -> None:
    path, _ = signed("k256")
    reference = json_lines(path.with_suffix(".dump.jsonl").read_bytes())
    for wanted in (reference[0], reference[len(reference) // 2], reference[-1]):
        done = run_bytes("get", str(path), wanted["key"])
        assert done.returncode == 0, done.stderr
        assert [comparable(v) for v in json_lines(done.stdout)] == [comparable(wanted["value"])]


@pytest.mark.parametrize("name", ["k256", "p256"])
def test_verify_signed_samples(name: str) -> None:
    path, meta = signed(name)
    done = run_bytes("verify", str(path), "--key", meta["signing_key"])
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith(
        f"verified {meta['did']} rev {meta['rev']} commit {meta['commit_cid']}: {meta['records']} records, "
    )
    assert f"signed by {meta['signing_key']} (" in done.stdout.decode()
    assert done.stdout.count(b"\n") == 1 and done.stderr == b""


def test_verify_fails_on_a_wrong_key() -> None:
    path, meta = signed("k256")
    _, other = signed("p256")
    done = run_bytes("verify", str(path), "--key", other["signing_key"])
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.decode() == (
        f"error: commit {meta['commit_cid']} of {meta['did']}: signature does not verify with key {other['signing_key']}\n"
    )


def test_verify_fails_on_a_tampered_car(tmp_path: Path) -> None:
    path, meta = signed("p256")
    data = bytearray(path.read_bytes())
    at = data.index(b"gen 12")  # inside the profile record's block
    data[at : at + 6] = b"gen 13"
    bad = tmp_path / "tampered.car"
    bad.write_bytes(bytes(data))
    done = run_bytes("verify", str(bad), "--key", meta["signing_key"])
    assert done.returncode == 1 and done.stdout == b""
    assert done.stderr.startswith(b"error: ") and b"CID" in done.stderr and done.stderr.count(b"\n") == 1
    # The commit itself changed: another rev in its block.
    data = bytearray(path.read_bytes())
    at = data.index(meta["rev"].encode())
    data[at + len(meta["rev"]) - 1] ^= 1
    bad.write_bytes(bytes(data))
    done = run_bytes("verify", str(bad), "--key", meta["signing_key"])
    assert done.returncode == 1 and done.stderr.startswith(b"error: ") and done.stderr.count(b"\n") == 1


def test_verify_a_file_needs_a_key(car_path: Path) -> None:
    done = run_bytes("verify", str(car_path))
    assert done.returncode == 2 and done.stdout == b""
    # verify's own usage, not the top-level one.
    assert done.stderr.startswith(b"usage: repo-stream verify [-h]")
    assert done.stderr.endswith(b"repo-stream verify: error: a file, - or URL SOURCE needs --key DIDKEY (only a DID or handle SOURCE has a DID document)\n")
    bad = run_bytes("verify", str(car_path), "--key", "zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU76E")
    assert bad.returncode == 2 and b"not a did:key" in bad.stderr


def did_document(did: str, pds: str, key: str | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": did,
        "alsoKnownAs": ["at://alice.test"],
        "verificationMethod": [],
        "service": [{"id": "#atproto_pds", "type": "AtprotoPersonalDataServer", "serviceEndpoint": pds}],
    }
    if key is not None:
        multibase = key.removeprefix("did:key:")
        doc["verificationMethod"].append({"id": f"{did}#atproto", "type": "Multikey", "controller": did, "publicKeyMultibase": multibase})
    return doc


@pytest.fixture
def server() -> Iterator[LocalHTTPServer]:
    with LocalHTTPServer() as local:
        yield local


def serve_repo(server: LocalHTTPServer, did: str, car: bytes, key: str | None = None) -> None:
    """A PLC directory and a PDS on the local server: ``did``'s document, and its repo."""
    server.route("*", f"/{did}", json_reply(did_document(did, server.base, key)))
    server.route("*", GET_REPO, Reply(body=car, content_type="application/vnd.ipld.car"))


def test_a_repo_named_by_its_did_end_to_end(server: LocalHTTPServer) -> None:
    """ls, dump, get, verify and stats on a DID resolved through a local PLC directory to a local PDS."""
    path, meta = signed("k256")
    serve_repo(server, meta["did"], path.read_bytes(), meta["signing_key"])
    plc = ("--plc-url", server.base)
    assert run_bytes("ls", meta["did"], *plc).stdout == run_bytes("ls", str(path)).stdout
    dumped = run_bytes("dump", meta["did"], *plc)
    assert dumped.returncode == 0, dumped.stderr
    assert dumped.stdout == run_bytes("dump", str(path)).stdout
    first = json_lines(dumped.stdout)[0]
    got = run_bytes("--plc-url", server.base, "get", f"at://{meta['did']}", first["key"])  # global option, at:// URI
    assert json_lines(got.stdout) == [first["value"]]
    verified = run_bytes("verify", meta["did"], *plc)  # the key from the DID document
    assert verified.returncode == 0, verified.stderr
    assert verified.stdout.decode().startswith(f"verified {meta['did']} rev {meta['rev']} commit {meta['commit_cid']}: 300 records")
    assert f"signed by {meta['signing_key']} (" in verified.stdout.decode()
    result = json.loads(run_bytes("stats", meta["did"], "--json", *plc).stdout)
    assert (result["records"], result["record_bytes"], result["car_bytes"]) == (meta["records"], meta["record_bytes"], meta["car_bytes"])
    assert [r.query for r in server.hits(GET_REPO)] == [f"did={meta['did']}"] * 5


def test_a_fixture_named_by_its_did_and_fetched_by_url(server: LocalHTTPServer, tmp_path: Path) -> None:
    expected = EXPECTED_FIXTURES["repo-2000-shuffled.car"]
    car = (FIXTURES / "repo-2000-shuffled.car").read_bytes()
    serve_repo(server, expected["did"], car)
    result = json.loads(run_bytes("stats", expected["did"], "--plc-url", server.base, "--json").stdout)
    figures = {k: result[k] for k in ("did", "rev", "records", "record_bytes", "collections", "data", "commit")}
    assert figures == {k: expected[k] for k in figures}
    url = f"{server.base}{GET_REPO}?did={expected['did']}"
    spilled = json.loads(run_bytes("stats", url, "--json", "--mem-limit-mb", "0.05", "--disk-path", str(tmp_path / "s.db")).stdout)
    assert (spilled["records"], spilled["spilled"]) == (2000, True)
    listed = run_bytes("ls", url, "--collection", "app.bsky.feed.post").stdout.decode().splitlines()
    assert len(listed) == expected["collections"]["app.bsky.feed.post"]
    assert all(line.startswith("app.bsky.feed.post/") for line in listed)


def test_a_did_errors(server: LocalHTTPServer) -> None:
    path, meta = signed("k256")
    _, other = signed("p256")
    # The PDS serves another account's repo: caught by the commit's DID.
    serve_repo(server, other["did"], path.read_bytes(), other["signing_key"])
    done = run_bytes("ls", other["did"], "--plc-url", server.base)
    assert done.returncode == 1 and done.stdout == b""
    assert f"the repo served is for {meta['did']}, not {other['did']}".encode() in done.stderr
    # No signing key in the DID document.
    serve_repo(server, meta["did"], path.read_bytes(), None)
    done = run_bytes("verify", meta["did"], "--plc-url", server.base)
    assert done.returncode == 1
    assert done.stderr.decode() == f"error: {meta['did']}: the DID document of {meta['did']} has no #atproto signing key; give one with --key\n"
    # An unknown DID.
    done = run_bytes("dump", "did:plc:nobodynobodynobodynobody", "--plc-url", server.base)
    assert done.returncode == 1 and done.stderr.startswith(b"error: DID did:plc:nobodynobodynobodynobody: not found")


def test_version_and_the_installed_script(car_path: Path) -> None:
    from repo_stream import __version__

    assert run_bytes("--version").stdout == f"repo-stream {__version__}\n".encode()
    assert run_bytes("--version", script=True).stdout == f"repo-stream {__version__}\n".encode()
    done = run_bytes("ls", str(car_path), script=True)
    assert done.returncode == 0 and done.stdout == run_bytes("ls", str(car_path)).stdout
    bad = run_bytes("stats", "/nonexistent/repo.car", script=True)
    assert bad.returncode == 1 and bad.stderr.startswith(b"error: cannot open CAR file /nonexistent/repo.car")


@pytest.mark.parametrize(
    "args, message",
    [
        (["stats", "x.car", "--mem-limit-mb", "0"], "argument --mem-limit-mb: must be a positive number, got '0'"),
        (["ls", "x.car", "--mem-limit-mb", "-3"], "argument --mem-limit-mb: must be a positive number, got '-3'"),
        (["dump", "x.car", "--mem-limit-mb", "nan"], "argument --mem-limit-mb: must be a positive number, got 'nan'"),
        (["stats", "x.car", "--mem-limit-mb", "lots"], "argument --mem-limit-mb: not a number: 'lots'"),
        (["ls", "x.car", "--collection", "feed"], "argument --collection: not a collection NSID"),
        (["get", "x.car"], "the following arguments are required: KEY"),
        (["dump"], "the following arguments are required: SOURCE"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        ([], "the following arguments are required: command"),
        (["ls", "x.car", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    done = run_bytes(*args)
    assert done.returncode == 2 and done.stdout == b""
    assert message in done.stderr.decode()
    assert b"Traceback" not in done.stderr


def test_errors_are_one_line_for_every_command(tmp_path: Path) -> None:
    bad = tmp_path / "bad.car"
    bad.write_bytes(b"\x05hello")
    for args in (["ls", str(bad)], ["dump", str(bad)], ["get", str(bad), "a.b.c/d"], ["verify", str(bad), "--key", "did:key:zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU76E"]):
        done = run_bytes(*args)
        assert done.returncode == 1, args
        assert done.stderr.startswith(b"error: CAR header (bytes 1..6) is not valid DAG-CBOR"), done.stderr
        assert done.stderr.count(b"\n") == 1 and done.stdout == b""


@pytest.mark.parametrize("command", [["dump"], ["ls"], ["ls", "--json"], ["stats", "--json"]])
def test_closed_stdout_ends_quietly(command: list[str]) -> None:
    """``| head -1``: the reader closes the pipe after one line; no traceback, exit 141 when the
    write failed (0 when everything fitted in the pipe before it was closed)."""
    path = FIXTURES / "repo-2000-shuffled.car"
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-m", "repo_stream", command[0], str(path), *command[1:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stderr is not None
        first = child.stdout.readline()
        child.stdout.close()
        status = child.wait(timeout=60)
        err = child.stderr.read()
        child.stderr.close()
        assert first.startswith(b"{" if command[0] == "dump" or "--json" in command else b"app.")
        assert err == b""
        assert status == (0 if command[0] == "stats" else 141)


def test_interrupted_is_one_line_and_130() -> None:
    """Ctrl-C while the walk waits for the rest of its input: one line, exit 130. The signal goes
    once the child has read most of what was written to its stdin (a pipe holds 64 KiB, so
    writing 400 kB returns only after the child has read 330 kB): it is walking, past start-up
    (a signal during the interpreter's start-up gives Python's own traceback)."""
    car = (FIXTURES / "repo-2000-shuffled.car").read_bytes()
    assert len(car) > 400_000
    child = subprocess.Popen(
        [sys.executable, "-m", "repo_stream", "stats", "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    stdin = child.stdin
    try:
        writer = threading.Thread(target=lambda: (stdin.write(car[:400_000]), stdin.flush()), daemon=True)
        writer.start()
        writer.join(timeout=60)
        assert not writer.is_alive(), "the child did not read its input within 60 s"
        child.send_signal(signal.SIGINT)
        # The input stays open and idle (its writer is alive but quiet): the child still exits at
        # once, its wait for stdin is cancelled, not a read blocked in a thread.
        child.wait(timeout=30)
        out, err = child.stdout.read(), child.stderr.read()
    finally:
        child.kill()
        for stream in (stdin, child.stdout, child.stderr):
            try:
                stream.close()
            except BrokenPipeError:
                pass
    assert (child.returncode, out, err) == (130, b"", b"error: interrupted\n")


@pytest.mark.parametrize("command", [["stats", "-"], ["backfill", "--repos", "-"]], ids=["car-on-stdin", "repo-list-on-stdin"])
def test_ctrl_c_stops_a_command_waiting_on_an_idle_stdin(command: list[str], tmp_path: Path) -> None:
    """Ctrl-C while a command waits for input that does not come (the writer is alive, quiet):
    one line, exit 130, at once."""
    child = subprocess.Popen(
        [sys.executable, "-m", "repo_stream", *command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path,
    )  # fmt: skip
    assert child.stdin is not None and child.stdout is not None and child.stderr is not None
    try:
        child.stdin.write(b"\xa2" if command[0] == "stats" else b"# nothing yet\n")  # part of a CAR header / a comment
        child.stdin.flush()
        time.sleep(3)  # past start-up, waiting for more input
        assert child.poll() is None
        child.send_signal(signal.SIGINT)
        child.wait(timeout=10)
        out, err = child.stdout.read(), child.stderr.read()
    finally:
        child.kill()
        for stream in (child.stdin, child.stdout, child.stderr):
            try:
                stream.close()
            except BrokenPipeError:
                pass
    assert (child.returncode, out) == (130, b"")
    assert err.endswith(b"error: interrupted\n"), err


# A CLI whose C core cannot be imported (as where it was not built): None in sys.modules makes the
# import fail the way a missing module does.
_WITHOUT_C_CORE = "import sys; sys.modules['repo_stream._native'] = None; from repo_stream.cli import main; sys.exit(main())"


@pytest.mark.parametrize("asked", [None, "1"])
def test_a_missing_c_core_is_said_once_unless_pure_python_was_asked_for(car_path: Path, asked: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "REPO_STREAM_PURE_PYTHON"}
    if asked is not None:
        env["REPO_STREAM_PURE_PYTHON"] = asked
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_C_CORE, "stats", str(car_path), "--json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["records"], result["implementation"]) == (65, "python")
    note = (
        "warning: the C core (repo_stream._native) is not built (import of repo_stream._native halted; None in sys.modules): "
        "running the pure-Python implementation, with the same results, more slowly (REPO_STREAM_PURE_PYTHON=1 silences this)\n"
    )
    assert done.stderr == ("" if asked else note)


# --- usage errors before any work, backfill's output and checks, examples, file modes ----------


@pytest.mark.parametrize(
    "key, message",
    [
        ("did:key:z", "argument --key: did:key 'did:key:z': no known multicodec prefix"),
        ("zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU76E", "argument --key: key 'zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU76E': not a did:key"),
        ("did:key:zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU7", "argument --key: did:key 'did:key:zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU7'"),
    ],
)
def test_verify_an_invalid_did_key_is_a_usage_error_before_any_work(key: str, message: str) -> None:
    # The CAR does not exist: a usage error (2), not "cannot open" (1), shows nothing was opened.
    done = run("verify", "/nonexistent/repo.car", "--key", key)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: repo-stream verify") and message in done.stderr
    assert done.stderr.count("error") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize("key", ["notakey", "app.bsky.feed.post/", "/3k2a", "post/3k2a", "app.bsky.feed.post/a/b", "app.bsky.feed.post/.."])
def test_get_a_key_that_is_not_collection_rkey_is_a_usage_error_before_any_work(key: str) -> None:
    done = run("get", "/nonexistent/repo.car", key)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: repo-stream get")
    assert f"repo-stream get: error: argument KEY: not a record key collection/rkey (e.g. app.bsky.actor.profile/self): {key!r}\n" in done.stderr


def test_backfill_an_unreadable_repo_list_is_one_line() -> None:
    done = run("backfill", "--repos", "/nonexistent/repos.txt")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "error: cannot read repo list /nonexistent/repos.txt: No such file or directory\n"


def test_sync_an_unreadable_repo_list_is_one_line_before_the_firehose_starts(tmp_path: Path) -> None:
    # the relay is a closed port: reaching it would print a connection warning and a summary first
    done = run("sync", "--repos", "/nonexistent/repos.txt", "--relay", "ws://127.0.0.1:9", "--state", str(tmp_path / "state.sqlite"))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "error: cannot read repo list /nonexistent/repos.txt: No such file or directory\n"
    assert not (tmp_path / "state.sqlite").exists()


def test_backfill_help_documents_the_columns_and_the_checks() -> None:
    done = run("backfill", "--help")
    assert done.returncode == 0
    help_text = " ".join(done.stdout.split())
    for text in (
        "tab-separated columns: source the repo as given did",
        "verified what was checked, on success: cids (every block's CID and every MST rule), cids+signature",
        "status ok, skipped (done in the checkpoint), or the error",
        "--verify [{cids,signature}]",
        "--key DIDKEY the signing key of every repo",
        "Exit status: 0 once the run completed",
    ):
        assert text in help_text


def _signed_car(tmp_path: Path, name: str, curve: Any) -> tuple[Path, str]:
    """A CAR of POSTS signed with a new key: its path and the key's did:key."""
    import functools

    from cryptography.hazmat.primitives.asymmetric import ec

    from repo_stream.crypto.didkey import format_did_key
    from repo_stream.crypto.signature import sign
    from repo_stream.records.writer import build_repo_car

    private = ec.generate_private_key(curve)
    path = tmp_path / name
    build_repo_car(POSTS, did=DID, rev=REV, path=path, sign=functools.partial(sign, private))
    return path, format_did_key(private.public_key())


def test_backfill_verifies_local_files_with_one_key_or_cids_only(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    good, key = _signed_car(tmp_path, "good.car", ec.SECP256K1())
    other, other_key = _signed_car(tmp_path, "other.car", ec.SECP256R1())
    listing = tmp_path / "repos.txt"
    listing.write_text(f"{good}\n{other}\n")
    header = "source\tdid\trev\trecords\tverified\tstatus"

    def rows(*options: str) -> dict[str, list[str]]:
        done = run("backfill", "--repos", str(listing), "--memory-workers", "1", *options)
        assert done.returncode == 0, done.stderr
        first, *lines = done.stdout.splitlines()
        assert first == header
        return {Path(line.split("\t")[0]).name: line.split("\t")[1:] for line in lines}

    # --key alone checks the signatures (offline: no DID document needed).
    assert rows("--key", key) == {
        "good.car": [DID, REV, "40", "cids+signature", "ok"],
        "other.car": [DID, REV, "0", "-", f"SignatureError: commit {_commit_cid(other)} of {DID}: signature does not verify with key {key}"],
    }
    assert rows("--verify", "signature", "--key", other_key)["other.car"] == [DID, REV, "40", "cids+signature", "ok"]
    # --verify cids: CIDs and MST rules, no signature.
    assert rows("--verify", "cids") == {"good.car": [DID, REV, "40", "cids", "ok"], "other.car": [DID, REV, "40", "cids", "ok"]}
    assert rows() == {"good.car": [DID, REV, "40", "-", "ok"], "other.car": [DID, REV, "40", "-", "ok"]}
    # A broken block: --verify cids fails it, no --verify does not look.
    data = bytearray(good.read_bytes())
    at = data.index(b"post number 7")
    data[at : at + 13] = b"post number 8"
    good.write_bytes(bytes(data))
    broken = rows("--verify", "cids")["good.car"]
    assert broken[3] == "-" and broken[4].startswith("CidMismatchError"), broken
    assert rows()["good.car"] == [DID, REV, "40", "-", "ok"]
    # --json says what was checked too.
    done = run("backfill", "--repos", str(listing), "--json", "--verify", "cids")
    assert sorted((Path(r["repo"]).name, r["verified"]) for r in map(json.loads, done.stdout.splitlines())) == [
        ("good.car", None), ("other.car", "cids"),
    ]  # fmt: skip


def _commit_cid(path: Path) -> str:
    return json.loads(run("stats", str(path), "--json").stdout)["commit"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--verify", "cids", "--key", "did:key:zQ3shcCqfar5htv2sHrykmRYJJUSkMUDKZNeb4ZBmSAEQU76E"], "--key is for checking signatures"),
        (["--key", "did:key:z"], "argument --key: did:key 'did:key:z'"),
        (["--verify", "everything"], "argument --verify: invalid choice: 'everything'"),
    ],
)
def test_backfill_verify_usage_errors(args: list[str], message: str) -> None:
    done = run("backfill", "--repos", "/nonexistent/repos.txt", *args)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: repo-stream backfill") and message in done.stderr


def test_the_walk_example_ends_quietly_when_stdout_closes() -> None:
    """``examples/walk.py REPO | head -1`` behaves as the CLI: no error, exit 141."""
    example = Path(__file__).resolve().parents[1] / "examples" / "walk.py"
    child = subprocess.Popen([sys.executable, str(example), str(FIXTURES / "repo-2000-shuffled.car")], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert child.stdout is not None and child.stderr is not None
    first = child.stdout.readline()
    child.stdout.close()
    status = child.wait(timeout=60)
    err = child.stderr.read()
    child.stderr.close()
    assert first.startswith(b"# did:plc:zvqt5whrnlpzdn2yjirglmpv rev ")
    assert (status, err) == (141, b"")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_generated_cars_have_the_usual_mode(tmp_path: Path, umask: int, mode: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "repo_stream", "generate", "30", "--cache-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, umask=umask,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.split("\t")[0])
    assert (path.stat().st_mode & 0o777, [p.name for p in tmp_path.iterdir()]) == (mode, [path.name])
