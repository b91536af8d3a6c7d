"""A data directory in storage format 1 is upgraded in place when opened.

Format 1 is format 2's layout with each record's CRC taken over offset,
time and payload in one pass; format 2 hashes the payload first, then
offset and time (docs/storage.md). The files here are rewritten to format
1 by hand, from the layout, not with the broker's code.
"""

from __future__ import annotations

import json
import os
import random
import struct
import zlib

import pytest

import storage_helpers
from storage_helpers import append, make_store, read_all, segment_files

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs

_HEAD = struct.Struct(">II")


def to_format1(path: str, keep_new: float = 0.0, rng=None) -> int:
    """Rewrite every record CRC under ``path`` to format 1; returns how many.

    With ``keep_new``, that share of records keeps its format-2 CRC: a
    segment an interrupted upgrade had only partly rewritten.
    """
    n = 0
    tdir = os.path.join(path, "topics")
    for topic in os.listdir(tdir):
        for name in segment_files(os.path.join(tdir, topic)):
            fname = os.path.join(tdir, topic, name)
            data = bytearray(open(fname, "rb").read())
            pos = 0
            while pos < len(data):
                length, crc = _HEAD.unpack_from(data, pos)
                body = bytes(data[pos + 8:pos + 4 + length])
                assert zlib.crc32(body[:16], zlib.crc32(body[16:])) == crc  # format 2
                if not (rng and rng.random() < keep_new):
                    struct.pack_into(">I", data, pos + 4, zlib.crc32(body))
                    n += 1
                pos += 4 + length
            open(fname, "wb").write(data)
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"format": 1}, f)
    return n


def build(path, rng) -> dict:
    store = make_store(path)
    expected = {}
    for name in ("a", "b"):
        topic = store.get_or_create(name)
        for b in range(12):
            append(topic, [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 6))],
                   1_700_000_000_000 + b)
        expected[name] = read_all(topic)
    store.close()
    return expected


def test_format1_data_dir_is_upgraded_and_reads_back(tmp_path, records_impl):
    path = str(tmp_path / "d")
    expected = build(path, random.Random(1))
    assert len(segment_files(os.path.join(path, "topics", "a"))) > 1
    assert to_format1(path) > 0
    store = make_store(path)
    try:
        for name, want in expected.items():
            assert read_all(store.get(name)) == want
            assert store.get(name).end_offset == len(want)
    finally:
        store.close()
    assert json.load(open(os.path.join(path, "meta.json"))) == {"format": 2}
    # every record is format 2 now: to_format1 checks that before rewriting
    to_format1(path)


def test_interrupted_upgrade_runs_again(tmp_path, records_impl):
    # Some records already rewritten (format 2), the rest format 1, and
    # meta.json still format 1: as a crash in the middle leaves it.
    path = str(tmp_path / "d")
    rng = random.Random(2)
    expected = build(path, rng)
    to_format1(path, keep_new=0.5, rng=rng)
    store = make_store(path)
    try:
        for name, want in expected.items():
            assert read_all(store.get(name)) == want
    finally:
        store.close()


def test_upgrade_stops_at_a_torn_tail(tmp_path, records_impl):
    path = str(tmp_path / "d")
    expected = build(path, random.Random(3))
    to_format1(path)
    last = os.path.join(path, "topics", "a", segment_files(os.path.join(path, "topics", "a"))[-1])
    with open(last, "ab") as f:
        f.write(struct.pack(">II", 100, 0) + b"torn")
    store = make_store(path)
    try:
        assert read_all(store.get("a")) == expected["a"]
        assert read_all(store.get("b")) == expected["b"]
    finally:
        store.close()


@pytest.mark.parametrize("meta", [{"format": 3}, {"format": "1"}, {}])
def test_unknown_format_is_refused(tmp_path, meta):
    path = str(tmp_path / "d")
    make_store(path).close()
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(RuntimeError, match="storage format"):
        make_store(path)
