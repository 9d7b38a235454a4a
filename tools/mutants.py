#!/usr/bin/env python3
"""Mutation testing of the pure-Python reference's rule checks: do the tests notice a broken rule?

Each mutant below is one small deliberate bug in a rule check (CAR framing, DAG-CBOR strictness,
MST rules, key syntax): a module, an exact source snippet that must occur once in it, and its
replacement. One at a time, the mutant is applied to a scratch copy of the tree (never the
working tree), and a fast subset of the tests runs there on the pure-Python implementation
(``REPO_STREAM_TEST_IMPLEMENTATIONS=python``, so the C core cannot vouch for it). A mutant the
tests fail on is killed; one they pass with survived, and needs a test or a written reason
(docs/contributing.md, "Mutation testing").

Usage (from the checkout, with the test extra installed)::

    python tools/mutants.py                 # every mutant
    python tools/mutants.py -k walk -v      # those whose name contains "walk", with pytest's tail
    python tools/mutants.py --list

Exit status: 0 when every mutant was killed, 1 when one survived (or could not be applied).
Run on demand, not in CI: a survivor costs one whole subset run (~30 s).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Where each mutated module lives: candidate module names, first found wins. When modules move
#: (as repo_stream.car became repo_stream.core.car), add the new name here; nothing else changes.
MODULES = {
    "car": ["repo_stream.core.car"],
    "dagcbor": ["repo_stream.core.dagcbor"],
    "walk": ["repo_stream.core.walk"],
    "mst": ["repo_stream.core.mst"],
    "commit": ["repo_stream.core.commit"],
    "partial": ["repo_stream.sync.partial"],
    "edit": ["repo_stream.sync.edit"],
}

#: The tests each run uses (fast, and about the rules; test_differential is left out on purpose:
#: it compares with the C core, and the point is whether the tests know the rules themselves).
TESTS = [
    "tests/test_hostile.py",
    "tests/test_walk_rules.py",
    "tests/test_key_syntax.py",
    "tests/test_properties.py",
    "tests/test_records.py",
    "tests/test_sync_mst.py",
]
#: Fewer hypothesis examples than the default run: the mutants are plain rule breaks.
FUZZ_EXAMPLES = "100"


@dataclass(frozen=True)
class Mutant:
    name: str
    module: str  # a key of MODULES
    snippet: str
    replacement: str


M = Mutant
MUTANTS = [
    # --- CAR framing (car.py) --------------------------------------------------------------------
    M("car-varint-10-bytes", "car", "        shift += 7\n        if pos - start >= 9:", "        shift += 7\n        if pos - start > 9:"),
    # Equivalent (unreachable: the loop's own check raises at the 9th continuation byte).
    M("car-varint-10-bytes-at-end", "car", "        if pos >= end:\n            if pos - start >= 9:", "        if pos >= end:\n            if pos - start > 9:"),
    M("car-varint-not-minimal", "car", "if byte == 0 and pos - start > 1:", "if False:"),
    M("car-cid-version", "car", "    if version != 1:\n        raise messages.cid_bad", "    if False:\n        raise messages.cid_bad"),
    M("car-cid-digest-too-long", "car", "if digest_len > _MAX_DIGEST_BYTES:", "if False:"),
    M("car-cid-digest-past-section", "car", "if p + digest_len > end:", "if False:"),
    M("car-cidv0-past-section", "car", "if pos + 34 > end:", "if False:"),
    M("car-header-version", "car", "if type(version) is not int or version != 1:", "if type(version) is not int:"),
    M("car-header-no-roots", "car", "    if not roots:\n", "    if False:\n"),
    M("car-header-root-tag", "car", "            and root.tag == 42\n", "            and True\n"),
    M("car-header-root-multibase-0", "car", "            and root.value[0] == 0\n", "            and True\n"),
    M("car-header-length-zero", "car", "        if length == 0:\n            raise messages.header_length_zero()", "        if False:\n            raise messages.header_length_zero()"),
    M("car-header-one-byte-over", "car", "if length > self.max_block_size:", "if length > self.max_block_size + 1:"),
    M("car-empty-section", "car", "        if length == 0:\n            raise messages.empty_section", "        if False:\n            raise messages.empty_section"),
    M("car-block-one-byte-over", "car", "        if end - cid_end > limit:\n            raise messages.block_too_large(buf[pos:cid_end], offset + start, end - cid_end, limit)\n        cid = ", "        if end - cid_end > limit + 1:\n            raise messages.block_too_large(buf[pos:cid_end], offset + start, end - cid_end, limit)\n        cid = "),
    M("car-section-too-large", "car", "if length > limit + _MAX_CID_BYTES:", "if False:"),
    M("car-verify-skipped", "car", "if self.verify_cids and (", "if False and ("),
    M("car-verify-digest", "car", "    if _SHA256(block).digest() != digest:", "    if False:"),
    M("car-verify-other-hash", "car", 'if cid[p : p + 2] != b"\\x12\\x20" or len(cid) != p + 34:', "if len(cid) != p + 34:"),
    M("car-truncated-section", "car", "        if left:\n", "        if False:\n"),
    # --- DAG-CBOR strictness (dagcbor.py) -------------------------------------------------------
    M("dagcbor-trailing-bytes", "dagcbor", "if end != len(block):", "if False:"),
    M("dagcbor-indefinite", "dagcbor", "allow_indefinite=False,", "allow_indefinite=True,"),
    M("dagcbor-tags-parsed", "dagcbor", "semantic_decoders=_REFUSED_TAGS if refuse_tags else None,", "semantic_decoders=None,"),
    M("dagcbor-link-any-tag", "dagcbor", "if type(value) is cbor2.CBORTag and value.tag == 42:", "if type(value) is cbor2.CBORTag:"),
    M("dagcbor-link-multibase-0", "dagcbor", "if type(raw) is bytes and len(raw) > 1 and raw[0] == 0:\n            return raw[1:]", "if type(raw) is bytes and len(raw) > 1:\n            return raw[1:]"),
    # --- MST nodes and rules (walk.py) ----------------------------------------------------------
    M("walk-link-any-tag", "walk", "if type(value) is _CBORTag and value.tag == 42:", "if type(value) is _CBORTag:"),
    M("walk-link-multibase-0", "walk", "if type(raw) is bytes and len(raw) > 1 and raw[0] == 0:\n            return raw", "if type(raw) is bytes and len(raw) > 1:\n            return raw"),
    M("walk-node-size-unchecked", "walk", "if size != len(block) or (strict and", "if (strict and"),
    M("walk-node-strict-entry-order", "walk", "            in_order = list(entry) == _ENTRY_KEYS", "            in_order = True"),
    M("walk-node-strict-node-order", "walk", "(in_order and list(node) == _NODE_KEYS)", "in_order"),
    # Equivalent (a missing field fails its look-up; an extra one makes the node longer than
    # canonical, and node_problem gives the same message).
    M("walk-node-entry-4-fields", "walk", "if type(entry) is not dict or len(entry) != 4:", "if type(entry) is not dict:"),
    M("walk-key-order-equal", "walk", "if skey <= last:", "if skey < last:"),
    M("walk-depth-one-more", "walk", "if depth > self._max_depth:", "if depth > self._max_depth + 1:"),
    M("walk-node-codec", "walk", "if cid[:2] != _DAG_CBOR_V1:", "if False:"),
    M("walk-prefix-negative", "walk", "if p < 0 or p > len(prev):", "if p > len(prev):"),
    M("walk-prefix-not-maximal", "walk", "if p < len(prev) and k and k[0] == prev[p]:", "if False:"),
    M("walk-layer-mixed", "walk", "            if layer >= 0:\n                raise messages.layer_mismatch", "            if False:\n                raise messages.layer_mismatch"),
    M("walk-layer-halved", "walk", "key_layer = (64 - top.bit_length()) >> 1 if top", "key_layer = (64 - top.bit_length()) >> 2 if top"),
    M("walk-key-one-byte-long", "walk", "if len(key) > MAX_KEY_BYTES:", "if len(key) > MAX_KEY_BYTES + 1:"),
    M("walk-rkey-dotdot", "walk", 'if not _RKEY_RE.fullmatch(rkey) or rkey == "." or rkey == "..":', 'if not _RKEY_RE.fullmatch(rkey) or rkey == ".":'),
    M("walk-rkey-513", "walk", '_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,512}")', '_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,513}")'),
    M("walk-collection-unchecked", "walk", "if not (slash and _valid_collection(collection)):", "if not slash:"),
    M("walk-subtree-at-layer-0", "walk", "if tcid is not None and child < 0:", "if False:"),
    M("walk-wrong-layer", "walk", "if layer != expected and not is_root:", "if False:"),
    M("walk-left-at-layer-0", "walk", "        if left is not None and child < 0:\n            raise", "        if False:\n            raise"),
    M("walk-empty-node", "walk", "                raise messages.empty_node(cid)", "                return None"),
    M("walk-empty-root", "walk", "            if is_root:\n                raise messages.empty_root(cid)", "            if False:\n                raise messages.empty_root(cid)"),
    M("walk-empty-left-at-layer-0", "walk", "            if expected == 0:\n                raise messages.left_at_layer0(cid)", "            if False:\n                raise messages.left_at_layer0(cid)"),
    # --- key syntax (mst.py) --------------------------------------------------------------------
    M("mst-nsid-tld-digit", "mst", 'r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"\n', 'r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"\n'),
    M("mst-nsid-name-digit", "mst", 'r"\\.[a-zA-Z][a-zA-Z0-9]{0,62}"', 'r"\\.[a-zA-Z0-9][a-zA-Z0-9]{0,62}"'),
    M("mst-nsid-name-hyphen", "mst", 'r"\\.[a-zA-Z][a-zA-Z0-9]{0,62}"', 'r"\\.[a-zA-Z][a-zA-Z0-9-]{0,62}"'),
    M("mst-nsid-two-segments", "mst", 'r"(?:\\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)+"', 'r"(?:\\.[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?)*"'),
    M("mst-nsid-segment-64", "mst", 'r"[a-zA-Z](?:[a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?"\n', 'r"[a-zA-Z](?:[a-zA-Z0-9-]{0,62}[a-zA-Z0-9])?"\n'),
    M("mst-nsid-length", "mst", "len(collection) <= 317", "len(collection) <= 400"),
    M("mst-rkey-513", "mst", '_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,512}")', '_RKEY_RE = re.compile(r"[A-Za-z0-9._:~-]{1,513}")'),
    M("mst-rkey-dotdot", "mst", 'and rkey != "." and rkey != ".."', 'and rkey != "."'),
    M("mst-key-layer-halved", "mst", "        return (64 - top.bit_length()) >> 1", "        return (64 - top.bit_length()) >> 2"),
    # --- the commit (commit.py) -----------------------------------------------------------------
    M("commit-version", "commit", 'if obj["version"] != 3:', "if False:"),
    M("commit-prev-any", "commit", "        if prev is None:\n            raise CommitError", "        if False:\n            raise CommitError"),
    # --- partial trees (sync/partial.py) and their edits (sync/edit.py) -----------------------------
    M("partial-key-order-equal", "partial", "        if keys and key <= keys[-1]:", "        if keys and key < keys[-1]:"),
    # (keys[0] == lo cannot happen: lo is the parent's key, a layer above every key of the node)
    M("partial-lo-bound", "partial", "    if lo is not None and keys[0] <= lo:", "    if False:"),
    M("partial-hi-bound", "partial", "    if hi is not None and keys[-1] >= hi:", "    if False:"),
    M("partial-wrong-layer", "partial", "    if layer != expected and not is_root:\n        raise messages.wrong_layer", "    if False:\n        raise messages.wrong_layer"),
    M("partial-empty-node", "partial", "                return -1, [], [], [None]  # the empty repo\n            raise messages.empty_node(cid)", "                return -1, [], [], [None]  # the empty repo\n            return -1, [], [], [None]"),
    M("edit-split-keeps-empty", "edit", "        left = lnode if lnode.keys or lnode.kids[0] is not None else None", "        left = lnode"),
    M("edit-merge-rest-side", "edit", "            rest = b_first if a_last is None else a_last", "            rest = a_last if a_last is None else b_first"),
    M("edit-wrap-one-short", "edit", "    while layer < to_layer:", "    while layer < to_layer - 1:"),
    M("edit-delete-root-collapse", "edit", "    while not root.keys and root.kids[0] is not None:", "    while False:"),
]


def module_path(key: str) -> Path:
    """The file of ``MODULES[key]``, relative to the checkout (by module name, wherever it is)."""
    sys.path.insert(0, str(ROOT))
    try:
        for name in MODULES[key]:
            try:
                spec = importlib.util.find_spec(name)
            except ModuleNotFoundError:
                continue
            if spec is not None and spec.origin is not None:
                path = Path(spec.origin).resolve()
                if path.is_relative_to(ROOT):
                    return path.relative_to(ROOT)
    finally:
        sys.path.remove(str(ROOT))
    raise SystemExit(f"error: none of {MODULES[key]} is a module of {ROOT}: update MODULES in {__file__}")


def scratch_copy(into: Path) -> Path:
    """Copy the package, tests and fixtures (what the tests need) to ``into``."""
    skip = shutil.ignore_patterns("__pycache__", ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache", "*.egg-info")
    tree = into / "tree"
    tree.mkdir()
    for name in ("repo_stream", "tests", "fixtures"):
        shutil.copytree(ROOT / name, tree / name, ignore=skip)
    for name in ("pyproject.toml",):
        shutil.copy2(ROOT / name, tree / name)
    return tree


def run_tests(tree: Path, verbose: bool, timeout: float) -> tuple[str, str]:
    env = dict(os.environ)
    env.update(
        REPO_STREAM_TEST_IMPLEMENTATIONS="python",
        REPO_STREAM_PURE_PYTHON="1",
        REPO_STREAM_FUZZ_EXAMPLES=FUZZ_EXAMPLES,
        PYTHONPATH=str(tree),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.setdefault("REPO_STREAM_SAMPLES", str(ROOT.parent / "shared" / "car-samples"))
    env.pop("CI", None)  # the fixed examples: a mutant's verdict does not depend on the run
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS]
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "killed (timeout)", ""
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    if done.returncode == 0:
        return "survived", tail
    if done.returncode == 1:
        return "killed", tail
    return f"error (pytest exit {done.returncode})", tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-k", default="", help="only the mutants whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the tail of each pytest run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per test run (a hang counts as killed)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if args.k in m.name]
    paths = {key: module_path(key) for key in MODULES}
    if args.list:
        for m in chosen:
            print(f"{m.name:32} {paths[m.module]}")
        return 0
    results: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="repo-stream-mutants-") as tmp:
        tree = scratch_copy(Path(tmp))
        # The scratch copy's own package must be the one imported (not an editable install's).
        check = subprocess.run(
            [sys.executable, "-c", "import repo_stream; print(repo_stream.__file__)"],
            cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, check=True,
        )
        if not Path(check.stdout.strip()).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"error: the scratch copy imports repo_stream from {check.stdout.strip()}, not {tree}")
        baseline, tail = run_tests(tree, args.verbose, args.timeout)
        if baseline != "survived":
            print(f"error: the tests fail without any mutant:\n{tail}", file=sys.stderr)
            return 1
        for m in chosen:
            path = tree / paths[m.module]
            original = path.read_text(encoding="utf-8")
            count = original.count(m.snippet)
            if count != 1:
                verdict, tail = f"not applied (snippet found {count} times)", ""
            else:
                path.write_text(original.replace(m.snippet, m.replacement), encoding="utf-8")
                started = time.monotonic()
                try:
                    verdict, tail = run_tests(tree, args.verbose, args.timeout)
                finally:
                    path.write_text(original, encoding="utf-8")
                verdict += f" ({time.monotonic() - started:.0f} s)"
            results.setdefault(verdict.split(" (")[0], []).append(m.name)
            print(f"{m.name:32} {paths[m.module]}: {verdict}", flush=True)
            if args.verbose and tail:
                print("    " + tail.replace("\n", "\n    "))
    killed = sum(len(v) for k, v in results.items() if k.startswith("killed"))
    total = len(chosen)
    print(f"\n{killed}/{total} mutants killed ({100 * killed / max(total, 1):.0f}%)")
    for verdict, names in sorted(results.items()):
        if not verdict.startswith("killed"):
            print(f"{verdict}: {', '.join(names)}")
    return 0 if killed == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
