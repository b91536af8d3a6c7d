"""The writer's two builds from one source: ``broker/storage/writer.py`` as it
is, and compiled with ``writer.pxd`` into ``broker._speedups.writer``.

Every storage test runs with both (``storage_helpers.records_impl``); these
check what only the compiled build can get wrong: an attribute writer.py
sets that writer.pxd does not declare (it would live in the instance
``__dict__``, slower), and a method replaced on one writer, which the
compiled code must call as the pure code does.
"""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path

import broker.storage.writer as pure_writer
import storage_helpers
from storage_helpers import make_store, publish

SOURCE = Path(pure_writer.__file__)
PXD = SOURCE.parents[1] / "_speedups" / "writer.pxd"


def _set_attributes(cls: ast.ClassDef) -> set[str]:
    """``self.X = ...`` targets in a class, less its own methods and class attributes."""
    members = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    members |= {t.id for n in cls.body if isinstance(n, ast.Assign)
                for t in n.targets if isinstance(t, ast.Name)}
    return {node.attr for node in ast.walk(cls)
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name) and node.value.id == "self"} - members


def _declared(pxd: str, cls: str) -> set[str]:
    body = re.search(r"^cdef class %s:\n((?:[ \t]+.*\n|\n)*)" % cls, pxd, re.M).group(1)
    names: set[str] = set()
    for line in body.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("cdef public object "):
            names |= {n.strip() for n in line[len("cdef public object "):].split(",")}
    return names


def test_writer_pxd_declares_every_attribute_writer_py_sets():
    tree = ast.parse(SOURCE.read_text())
    pxd = PXD.read_text()
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    assert set(re.findall(r"^cdef class (\w+):", pxd, re.M)) == {"_Job", "DiskWriter"}
    for name in ("_Job", "DiskWriter"):
        assert _set_attributes(classes[name]) == _declared(pxd, name), name
    slots = next(n for n in classes["_Job"].body if isinstance(n, ast.Assign)
                 and n.targets[0].id == "__slots__")
    assert set(ast.literal_eval(slots.value)) == _declared(pxd, "_Job")


def test_a_compiled_writer_keeps_its_state_in_fields_and_calls_replaced_methods(tmp_path):
    """After a start, a publish, a flush and a close, nothing is in the compiled
    writer's ``__dict__`` but the method a test put there, and the compiled
    ``_kick`` called it."""
    cls = storage_helpers.load_writer("c")
    assert cls.__module__ == "broker._speedups.writer"
    calls = []

    async def main():
        store = make_store(tmp_path)
        writer = cls(asyncio.get_running_loop(), store.offsets, fsync="interval",
                     fsync_interval_ms=1000, high_water=1 << 20, low_water=1 << 19,
                     on_written=lambda topic: None, store=store)
        real = writer._write_here

        def write_here(job):
            calls.append(job)
            return real(job)

        writer._write_here = write_here
        writer.start()
        topic = store.get_or_create("t")
        publish(writer, topic, [b"one", b"two"])
        await writer.flush()
        state = dict(vars(writer))
        await writer.close()
        store.close()
        return state, topic.end_offset

    state, end = asyncio.run(main())
    assert list(state) == ["_write_here"]
    assert len(calls) == 1 and end == 2
