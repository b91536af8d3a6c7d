"""Build script: declares the Cython extensions in broker/_speedups.

Two kinds: the codec, written in Cython (``broker/_speedups/*.pyx``), with
a pure-Python twin in ``broker/_pure``; and broker modules written in plain
Python that are also compiled as they are (``COMPILED_PY``), into
``broker._speedups.<name>``, typed by ``broker/_speedups/<name>.pxd``, so
that one source serves both builds.

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
# broker._speedups.<name> compiled from a plain-Python source (and its .pxd).
COMPILED_PY = {"writer": "broker/storage/writer.py"}


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
    # The Python sources keep Python's semantics exactly: bounds checks and
    # negative indexes as in Python, annotations not taken as C types.
    py_exts = [
        Extension("broker._speedups." + name, [source], define_macros=macros,
                  extra_compile_args=["-O2"])
        for name, source in COMPILED_PY.items()
    ]
    print("pylogstreams: CYTHON build of broker._speedups (%s)"
          % ", ".join(EXTENSIONS + list(COMPILED_PY)), file=sys.stderr)
    common = dict(language_level=3, annotate=_flag("PYLOGSTREAMS_CYTHON_ANNOTATE"))
    return cythonize(
        exts,
        compiler_directives={
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "embedsignature": True,
            "linetrace": trace,
        },
        **common,
    ) + cythonize(
        py_exts,
        compiler_directives={
            "annotation_typing": False,
            "binding": True,
            "embedsignature": True,
            "linetrace": trace,
        },
        **common,
    )


setup(ext_modules=_ext_modules())
