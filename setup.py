"""Builds strsparse's native sparse kernels (everything else is in pyproject.toml).

The kernels are plain C, loaded through ctypes; they pick AVX-512, AVX2 or a portable path
at run time, so the build uses no -march flags. The extension is optional: if it cannot be
built, strsparse still installs and compiles the kernels on first use, or falls back.
"""

import hashlib
import sys
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "src/strsparse/inference/csrc/kernels.c"
# the loader compares this digest with the installed source's and ignores a stale build
digest = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()[:16]

extra_compile_args = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-pthread"]
extra_link_args = [] if sys.platform == "win32" else ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "strsparse.inference._kernels",
            sources=[SOURCE],
            define_macros=[("SS_SOURCE_HASH", f'"{digest}"')],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            optional=True,
        )
    ]
)
