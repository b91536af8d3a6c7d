"""Build script: declares the Cython extensions in broker/_speedups.

``PYLOGSTREAMS_NO_EXTENSIONS=1`` makes a pure-Python build (the same
variable that makes ``broker.codec`` load the pure twin at run time).
``PYLOGSTREAMS_CYTHON_ANNOTATE=1`` writes Cython's HTML annotation next to
each .pyx; ``PYLOGSTREAMS_CYTHON_TRACE=1`` compiles with line tracing for
profilers and coverage.
"""

import os
import sys

from setuptools import setup

EXTENSIONS = ["frames", "records", "wire1"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _ext_modules():
    if _flag("PYLOGSTREAMS_NO_EXTENSIONS"):
        print("pylogstreams: PURE build (PYLOGSTREAMS_NO_EXTENSIONS is set); "
              "broker.codec will use the pure-Python codec", file=sys.stderr)
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    trace = _flag("PYLOGSTREAMS_CYTHON_TRACE")
    macros = [("CYTHON_TRACE_NOGIL", "1")] if trace else []
    exts = [
        Extension(
            "broker._speedups." + name,
            ["broker/_speedups/%s.pyx" % name],
            libraries=["z"],
            depends=["broker/_speedups/crc32_clmul.h"],
            define_macros=macros,
            extra_compile_args=["-O2"],
        )
        for name in EXTENSIONS
    ]
    print("pylogstreams: CYTHON build of broker._speedups (%s)"
          % ", ".join(EXTENSIONS), file=sys.stderr)
    return cythonize(
        exts,
        language_level=3,
        annotate=_flag("PYLOGSTREAMS_CYTHON_ANNOTATE"),
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
            "linetrace": trace,
        },
    )


setup(ext_modules=_ext_modules())
