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


def assert_reads_back(path, expected: dict) -> None:
    """Open the data dir (upgrading it) and read every topic back."""
    store = make_store(path)
    try:
        for name, want in expected.items():
            assert read_all(store.get(name)) == want
            assert store.get(name).end_offset == len(want)
    finally:
        store.close()


def test_format1_data_dir_is_upgraded_and_reads_back(tmp_path, records_impl):
    path = str(tmp_path / "d")
    expected = build(path, random.Random(1))
    assert len(segment_files(os.path.join(path, "topics", "a"))) > 1
    assert to_format1(path) > 0
    assert_reads_back(path, expected)
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
    assert_reads_back(path, expected)


def test_upgrade_stops_at_a_torn_tail(tmp_path, records_impl):
    path = str(tmp_path / "d")
    expected = build(path, random.Random(3))
    to_format1(path)
    last = os.path.join(path, "topics", "a", segment_files(os.path.join(path, "topics", "a"))[-1])
    with open(last, "ab") as f:
        f.write(struct.pack(">II", 100, 0) + b"torn")
    assert_reads_back(path, expected)


@pytest.mark.parametrize("meta", [{"format": 3}, {"format": "1"}, {"format": True}, {}, [1]])
def test_unknown_format_is_refused(tmp_path, meta):
    path = str(tmp_path / "d")
    make_store(path).close()
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    with pytest.raises(RuntimeError, match="storage format"):
        make_store(path)


def records_of(fname: str) -> list[bytes]:
    data = open(fname, "rb").read()
    out, pos = [], 0
    while pos < len(data):
        length = struct.unpack_from(">I", data, pos)[0]
        out.append(data[pos:pos + 4 + length])
        pos += 4 + length
    return out


def format2_valid(rec: bytes) -> bool:
    return zlib.crc32(rec[8:24], zlib.crc32(rec[24:])) == struct.unpack_from(">I", rec, 4)[0]


@pytest.mark.parametrize("which", ["sealed", "active"])
def test_a_corrupt_record_stays_refused_and_the_rest_is_upgraded(tmp_path, which):
    # A complete record valid under neither format (corrupt before the
    # upgrade) is left byte for byte; the records before and after it in
    # its segment are upgraded all the same.
    path = str(tmp_path / "d")
    build(path, random.Random(4))
    to_format1(path)
    tdir = os.path.join(path, "topics", "a")
    names = segment_files(tdir)
    fname = os.path.join(tdir, names[0] if which == "sealed" else names[-1])
    recs = records_of(fname)
    assert len(recs) >= 3
    k = len(recs) // 2
    bad = bytearray(recs[k])
    bad[-1 if len(bad) > 24 else 20] ^= 0x40   # a payload (or time) bit
    recs[k] = bytes(bad)
    open(fname, "wb").write(b"".join(recs))
    make_store(path).close()
    after = records_of(fname)
    assert after[k] == recs[k] and not format2_valid(after[k])
    assert all(format2_valid(r) for i, r in enumerate(after) if i != k)
    assert [r[8:] for r in after] == [r[8:] for r in recs]  # only CRC fields changed


def test_records_bigger_than_a_chunk(tmp_path, monkeypatch):
    # The upgrade streams a segment in chunks: make them smaller than a
    # record, so that records straddle chunks and need reads of their own.
    from broker.storage import upgrade
    monkeypatch.setattr(upgrade, "_CHUNK", 50)
    path = str(tmp_path / "d")
    expected = build(path, random.Random(5))
    to_format1(path)
    last = os.path.join(path, "topics", "b", segment_files(os.path.join(path, "topics", "b"))[-1])
    with open(last, "ab") as f:  # a torn tail longer than a header
        f.write(struct.pack(">II", 500, 0) + b"x" * 100)
    assert_reads_back(path, expected)


def test_only_segments_of_valid_topics_are_touched(tmp_path):
    path = str(tmp_path / "d")
    build(path, random.Random(6))
    to_format1(path)
    tdir = os.path.join(path, "topics")
    seg = os.path.join(tdir, "a", segment_files(os.path.join(tdir, "a"))[0])
    old = open(seg, "rb").read()
    # Format-1 records where the broker does not look: a directory that is
    # no topic name, and files that are no segment names.
    others = [os.path.join(tdir, "a", "notes.log"), os.path.join(tdir, "a", "0" * 19 + "x.log"),
              os.path.join(tdir, "a", "\u0661" * 20 + ".log")]
    os.mkdir(os.path.join(tdir, "not a topic"))
    others.append(os.path.join(tdir, "not a topic", "0" * 20 + ".log"))
    for name in others:
        open(name, "wb").write(old)
    # Copies left by an interrupted upgrade are removed, never read: one
    # beside a segment the upgrade rewrites (its copy is made anew), one
    # whose segment is gone.
    stale = [seg + ".tmp", os.path.join(tdir, "a", "9" * 20 + ".log.tmp")]
    for name in stale:
        open(name, "wb").write(b"garbage")
    make_store(path).close()
    assert not [name for name in stale if os.path.exists(name)]
    for name in others:
        assert open(name, "rb").read() == old, name
    assert all(format2_valid(r) for r in records_of(seg))


def test_a_failed_upgrade_leaves_format1_and_the_lock(tmp_path, monkeypatch):
    # meta.json says format 2 only after every segment is upgraded; a
    # failure leaves format 1 (the next start runs it again) and releases
    # the data dir's lock.
    from broker.storage import upgrade
    path = str(tmp_path / "d")
    expected = build(path, random.Random(7))
    to_format1(path)
    real = upgrade.upgrade_segment
    calls = []

    def failing(fname):
        calls.append(fname)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(fname)

    monkeypatch.setattr(upgrade, "upgrade_segment", failing)
    with pytest.raises(OSError):
        make_store(path)
    assert json.load(open(os.path.join(path, "meta.json"))) == {"format": 1}
    assert not [n for d in os.listdir(os.path.join(path, "topics"))
                for n in os.listdir(os.path.join(path, "topics", d)) if n.endswith(".tmp")]
    monkeypatch.setattr(upgrade, "upgrade_segment", real)
    store = make_store(path)  # the lock was released; the upgrade runs again
    try:
        for name, want in expected.items():
            assert read_all(store.get(name)) == want
    finally:
        store.close()
    assert json.load(open(os.path.join(path, "meta.json"))) == {"format": 2}
