"""Build the compiled core ``spr._core`` from ``src/spr/_core.pyx``.

``SPR_DEBUG=1`` builds with annotation, line tracing and bounds checks, for profiling
and for reading ``cython -a`` output; the default is the release build.
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("SPR_DEBUG") == "1"

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "embedsignature": True,
}
if DEBUG:
    directives["linetrace"] = True

extensions = [
    Extension(
        "spr._core",
        ["src/spr/_core.pyx"],
        extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
