"""Builds the C core, repo_stream._native (everything else is in pyproject.toml).

REPO_STREAM_SANITIZE=1 builds it with AddressSanitizer and UndefinedBehaviorSanitizer (for CI
and fuzzing; run Python with LD_PRELOAD of libasan, see README "Tests").
"""

import os
from glob import glob

from setuptools import Extension, setup

flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-pthread"]
link = ["-pthread"]  # native/verify.c hashes blocks on a helper thread
if os.environ.get("REPO_STREAM_SANITIZE") == "1":
    flags += ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
    link += ["-fsanitize=address,undefined"]

setup(
    ext_modules=[
        Extension(
            "repo_stream._native",
            sources=sorted(glob("native/*.c")),
            depends=sorted(glob("native/*.h")),
            extra_compile_args=flags,
            extra_link_args=link,
        )
    ]
)
