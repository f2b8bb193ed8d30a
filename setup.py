"""Build the compiled core ``spr._core`` from ``src/spr/_core.pyx``.

``_core.pyx`` includes the files in ``src/spr/_core/`` and reads ``src/spr/_core.pxd``;
they are listed in ``depends`` so that editing any of them rebuilds the extension.

``SPR_DEBUG=1`` builds with annotation, line tracing and bounds checks, for profiling
and for reading ``cython -a`` output; the default is the release build.
"""

import os
from pathlib import Path

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

# Paths relative to this file, as setuptools wants them (the sdist ships them too);
# sorted, so that the build does not depend on the order the file system lists them in.
HERE = Path(__file__).resolve().parent
INCLUDES = sorted(p.relative_to(HERE).as_posix() for p in (HERE / "src/spr/_core").glob("*.pxi"))
depends = ["src/spr/_core.pxd", *INCLUDES]

extensions = [
    Extension(
        "spr._core",
        ["src/spr/_core.pyx"],
        depends=depends,
        extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
        define_macros=[("CYTHON_TRACE_NOGIL", "1")] if DEBUG else [],
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
