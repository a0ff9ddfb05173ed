"""Builds strsparse's native sparse kernels (everything else is in pyproject.toml).

The kernels are plain C, loaded through ctypes; they pick AVX-512, AVX2 or a portable path
at run time, so the build uses no -march flags. The extension is optional: if it cannot be
built, strsparse still installs and compiles the kernels on first use, or falls back.
"""

import sys

from setuptools import Extension, setup

extra_compile_args = [] if sys.platform == "win32" else ["-O3", "-std=c11", "-pthread"]
extra_link_args = [] if sys.platform == "win32" else ["-pthread"]

setup(
    ext_modules=[
        Extension(
            "strsparse.inference._kernels",
            sources=["src/strsparse/inference/csrc/kernels.c"],
            extra_compile_args=extra_compile_args,
            extra_link_args=extra_link_args,
            optional=True,
        )
    ]
)
