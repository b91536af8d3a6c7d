"""What a wheel carries: the package's files that ``build_py`` copies.

Cython writes its generated C next to each source (``broker/_speedups/*.c``,
``broker/storage/writer.c``). They go in the sdist, as the extensions'
sources, but not in the wheel, which has the compiled modules; the
``.pyx``, ``.pxd`` and ``.h`` files and ``py.typed`` do go in it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_leaves_the_generated_c_out(tmp_path):
    egg, lib = tmp_path / "egg", tmp_path / "lib"
    egg.mkdir()
    # build_py is the step of a wheel build that picks the package data;
    # egg_info lists the candidates (SOURCES.txt), as it does for the wheel.
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "-e", str(egg), "build_py", "-d", str(lib)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [sources] = egg.glob("*.egg-info/SOURCES.txt")
    generated = [line for line in sources.read_text().splitlines() if line.endswith(".c")]
    if not generated:
        pytest.skip("a pure build (PYLOGSTREAMS_NO_EXTENSIONS): no generated C to leave out")
    assert sorted(generated) == ["broker/_speedups/frames.c", "broker/_speedups/records.c",
                                 "broker/_speedups/wire1.c", "broker/storage/writer.c"]
    copied = {p.relative_to(lib).as_posix() for p in lib.rglob("*") if p.is_file()}
    assert not [p for p in copied if p.endswith(".c")]
    for name in ("broker/py.typed", "broker/_speedups/crc32_clmul.h",
                 "broker/_speedups/frames.pyx", "broker/_speedups/writer.pxd",
                 "broker/storage/writer.py"):
        assert name in copied
