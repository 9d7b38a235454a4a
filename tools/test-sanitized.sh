#!/usr/bin/env bash
# Build the C core with AddressSanitizer + UndefinedBehaviorSanitizer in a scratch copy of the
# package, and run the hostile-input, walk-rule, property and differential tests on that build.
# Any memory error or undefined behaviour aborts the run. Usage: bash tools/test-sanitized.sh
# (uses .venv/bin/python, or $PYTHON).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r "$here/repo_stream" "$here/tests" "$here/fixtures" "$here/native" "$here/setup.py" "$here/pyproject.toml" "$work/"
rm -f "$work"/repo_stream/*.so
cd "$work"
REPO_STREAM_SANITIZE=1 "$py" setup.py -q build_ext --inplace 2>&1 | { grep -E "warning:|error:" || true; }
export LD_PRELOAD="$(gcc -print-file-name=libasan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# Every allocation through malloc, so ASan sees buffers of 512 bytes or less too (pymalloc's arenas
# would hide them: walk.c's key, prev, last and stack buffers start that small).
export PYTHONMALLOC=malloc
export REPO_STREAM_TEST_IMPLEMENTATIONS=c REPO_STREAM_SAMPLES="$here/../shared/car-samples"
"$py" -c "import repo_stream; assert repo_stream.IMPLEMENTATION == 'c', 'sanitized C core not loaded'"
"$py" -m pytest -q -p no:cacheprovider tests/test_hostile.py tests/test_walk_rules.py tests/test_properties.py \
    tests/test_differential.py tests/test_samples.py tests/test_processor.py tests/test_runs.py tests/test_disk.py \
    tests/test_native_guards.py tests/test_memory_promise.py tests/test_json_text.py tests/test_arrow.py tests/test_arrow_walk.py \
    tests/test_sync_native.py tests/test_sync_mst.py tests/test_sync_verify.py tests/test_sync_proof.py tests/test_sync_lines.py tests/test_sync_record_events.py
# The C core's bulk builders of the store sinks (Arrow value column transcoded in place, PostgreSQL COPY rows).
"$py" -m pytest -q -p no:cacheprovider tests/test_sink_events.py -k "pg_copy_rows or transcodes_values"
