#!/usr/bin/env bash
# Coverage-guided fuzzing of the C core (libFuzzer + ASan + UBSan), differential against the
# pure-Python reference. Usage: bash fuzz/run.sh [SECONDS]   (default 60; needs clang-14 from
# Debian: apt-get install clang-14 libclang-rt-14-dev). Findings go to fuzz/findings/ (ignored by git).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-60}
py=${PYTHON:-$here/.venv/bin/python}
cc=${CC:-clang-14}
build=$here/fuzz/build
mkdir -p "$build" "$here/fuzz/corpus" "$here/fuzz/findings"
"$cc" -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer \
    $("$py" -c "import sysconfig; print('-I' + sysconfig.get_paths()['include'])") \
    -pthread "$here/fuzz/harness.c" "$here"/native/*.c \
    -L"$("$py" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")" \
    -lpython"$("$py" -c "import sysconfig; print(sysconfig.get_config_var('LDVERSION'))")" \
    -Wl,-rpath,"$("$py" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")" \
    -o "$build/fuzz-core"
"$py" "$here/fuzz/seeds.py" "$build/seeds"
site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cd "$here"
# PYTHONMALLOC=malloc: buffers of 512 bytes or less come from malloc too, where ASan sees them.
PYTHONMALLOC=malloc ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
PYTHONPATH="$here:$site" REPO_STREAM_PURE_PYTHON=0 \
    "$build/fuzz-core" -max_total_time="$seconds" -max_len=65536 -timeout=20 -rss_limit_mb=4096 \
    -artifact_prefix="$here/fuzz/findings/" -print_final_stats=1 "$here/fuzz/corpus" "$build/seeds"
