"""Builds the C core, repo_stream._native, if it can (everything else is in pyproject.toml).

The C core is optional: the package has a pure-Python implementation of the same hot path
(slower, same records and errors). Without a working C compiler or Python's headers the build
prints one warning and installs the pure-Python package; ``REPO_STREAM_PURE_PYTHON=1`` at install
time skips the build (a pure ``py3-none-any`` wheel).

REPO_STREAM_SANITIZE=1 builds it with AddressSanitizer and UndefinedBehaviorSanitizer (for CI
and fuzzing; run Python with LD_PRELOAD of libasan, see README "Tests"); that build must succeed.
"""

import os
import sys
from glob import glob

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CCompilerError, ExecError, PlatformError

SANITIZE = os.environ.get("REPO_STREAM_SANITIZE") == "1"
PURE_PYTHON = os.environ.get("REPO_STREAM_PURE_PYTHON", "") not in ("", "0") and not SANITIZE

flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-pthread"]
link = ["-pthread"]  # native/verify.c hashes blocks on a helper thread
if SANITIZE:
    flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    link += ["-fsanitize=address,undefined"]

#: What a build without a compiler, a linker or Python's headers raises (a missing compiler
#: executable is an ExecError or OSError, a failed compile a CompileError, a failed link a
#: LinkError: both CCompilerError; no compiler configured for the platform a PlatformError).
BUILD_ERRORS = (CCompilerError, ExecError, PlatformError, OSError)


class OptionalBuildExt(build_ext):
    """``build_ext`` that leaves the C core out, with one warning, when it cannot be built."""

    def run(self) -> None:
        try:
            super().run()
        except BUILD_ERRORS as exc:
            self._skip(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except BUILD_ERRORS as exc:
            self._skip(exc)

    # Without the library, the files it would have made are not outputs (an editable install
    # links or copies the outputs).
    def get_outputs(self) -> list[str]:
        return [path for path in super().get_outputs() if not self._skipped or os.path.exists(path)]

    def get_output_mapping(self) -> dict[str, str]:
        mapping = super().get_output_mapping()
        return {k: v for k, v in mapping.items() if not self._skipped or os.path.exists(k)}

    _skipped = False

    def _skip(self, exc: BaseException) -> None:
        if SANITIZE:
            raise exc  # a sanitizer build is for testing the C core: no fallback
        if self._skipped:
            return  # warned once already
        self._skipped = True
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(
            f"WARNING: repo-stream: the C core (repo_stream._native) could not be built ({reason}); "
            "installing the pure-Python implementation, which gives the same results more slowly. "
            "For the fast path install a C compiler and Python's headers (e.g. gcc and python3-dev) and reinstall.",
            file=sys.stderr,
            flush=True,
        )


native = Extension(
    "repo_stream._native",
    sources=sorted(glob("native/*.c")),
    depends=sorted(glob("native/*.h")),
    extra_compile_args=flags,
    extra_link_args=link,
    optional=not SANITIZE,  # an in-place (editable) build copies the library back only if it was built
)

setup(ext_modules=[] if PURE_PYTHON else [native], cmdclass={"build_ext": OptionalBuildExt})
