"""Crash recovery: torn and corrupt tails, checkpoints, indexes, lazy opening.

The fuzz tests build a log with small segments, then play a crash many
times over copies of it: cut the log at a random byte, drop the segments
after the cut, flip random bits just before it, damage the index, and
reopen. What must remain is exactly the longest valid prefix, computed
here by an independent parser of the files; no corrupt record may ever be
returned. Each runs with both record codecs.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import struct
import zlib

import pytest

from broker.storage import checkpoint
import storage_helpers
from storage_helpers import (
    append, decoder, make_store, publish, read_all, segment_files, start_writer)

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs

_HDR = struct.Struct(">IIQQ")


def layout(directory) -> list[tuple]:
    """Every record of a healthy topic dir: (segment file, start, end, offset, payload)."""
    out = []
    for name in segment_files(directory):
        data = open(os.path.join(directory, name), "rb").read()
        pos = 0
        while pos < len(data):
            length, crc, off, _ts = _HDR.unpack_from(data, pos)
            assert zlib.crc32(data[pos + 8:pos + 24], zlib.crc32(data[pos + 24:pos + 4 + length])) == crc
            out.append((name, pos, pos + 4 + length, off, data[pos + 24:pos + 4 + length]))
            pos += 4 + length
    return out


def build(path, rng, batches: int, *, checkpoint_after: int | None = None):
    """A topic "t" of random batches; returns the checkpoint entry if one was written."""
    store = make_store(path)
    topic = store.get_or_create("t")
    entry = None
    t0 = 1_700_000_000_000
    for b in range(batches):
        msgs = [rng.randbytes(rng.randrange(0, 400)) for _ in range(rng.randrange(1, 9))]
        append(topic, msgs, t0 + b)
        if b == checkpoint_after:
            topic.finish_seal()  # the roll before left its seal's fsync for later
            topic.active.fsync()
            topic.note_synced()
            store.write_checkpoint()
            entry = topic.durable
    store.close(checkpoint=False)  # as a crash leaves it
    return entry


def crash_copy(template, dest, rng, entry):
    """Damage a copy of ``template`` as a crash could; return the expected records."""
    shutil.copytree(template, dest)
    tdir = os.path.join(dest, "topics", "t")
    recs = layout(os.path.join(template, "topics", "t"))
    names = segment_files(tdir)
    sizes = [os.path.getsize(os.path.join(tdir, n)) for n in names]
    cut = rng.randrange(0, sum(sizes) + 1)
    if entry is not None and rng.random() < 0.8:
        # Mostly after the checkpoint (what a crash can damage); sometimes
        # before it, which must make recovery distrust the checkpoint.
        ck_name = "%020d.log" % entry.base_offset
        ck = names.index(ck_name)
        ck_global = sum(sizes[:ck]) + entry.size
        if rng.random() < 0.5:  # within the checkpointed segment
            cut = rng.randrange(ck_global, sum(sizes[:ck + 1]) + 1)
        else:
            cut = rng.randrange(ck_global, sum(sizes) + 1)
    k = 0
    while k < len(names) - 1 and cut > sizes[k]:
        cut -= sizes[k]
        k += 1
    for name in names[k + 1:]:
        os.unlink(os.path.join(tdir, name))
        os.unlink(os.path.join(tdir, name[:-4] + ".index"))
    last = os.path.join(tdir, names[k])
    os.truncate(last, cut)
    # Bits a crash could have damaged: not those a matching checkpoint covers.
    lo = 0
    if entry is not None and names[k] == "%020d.log" % entry.base_offset and cut >= entry.size:
        lo = entry.size
    flips = set()
    if cut > lo:
        with open(last, "r+b") as f:
            for _ in range(rng.randrange(0, 4)):
                p = rng.randrange(max(lo, cut - 300), cut)
                f.seek(p)
                byte = f.read(1)[0] ^ (1 << rng.randrange(8))
                f.seek(p)
                f.write(bytes([byte]))
                flips.add(p)
    index = last[:-4] + ".index"
    damage = rng.choice(["none", "none", "delete", "truncate", "garbage"])
    if damage == "delete":
        os.unlink(index)
    elif damage == "truncate":
        os.truncate(index, rng.randrange(0, os.path.getsize(index) + 1))
    elif damage == "garbage":
        with open(index, "ab") as f:
            f.write(rng.randbytes(rng.randrange(1, 40)))
    expected = []
    for name, start, end, off, payload in recs:
        if name < names[k]:
            expected.append((off, payload))
        elif name == names[k]:
            if end > cut or any(start <= p < end for p in flips):
                break
            expected.append((off, payload))
    valid_end = 0
    for name, start, end, off, payload in recs:
        if name == names[k] and (off, payload) in expected[-1:]:
            valid_end = end
    return expected, last, valid_end, cut, lo


def check_recovered(path, expected, last, valid_end):
    store = make_store(path)
    try:
        topic = store.get("t")
        got = read_all(topic)
        assert [(o, p) for o, _t, p in got] == expected
        assert topic.end_offset == len(expected)
        assert os.path.getsize(last) == valid_end
        # The log takes appends again right after the recovered end.
        append(topic, [b"after-crash"])
        assert read_all(topic, len(expected))[0][2] == b"after-crash"
        return dict(store.stats)
    finally:
        store.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_crash_fuzz_no_checkpoint(records_impl, tmp_path, seed):
    rng = random.Random(seed)
    template = tmp_path / "template"
    build(template, rng, 60)
    for case in range(40):
        dest = tmp_path / ("case%d" % case)
        expected, last, valid_end, cut, _ = crash_copy(template, dest, rng, None)
        stats = check_recovered(dest, expected, last, valid_end)
        assert stats["recovery_truncated_bytes"] == cut - valid_end
        shutil.rmtree(dest)


@pytest.mark.parametrize("seed", [3, 4])
def test_crash_fuzz_after_checkpoint(records_impl, tmp_path, seed):
    rng = random.Random(seed)
    template = tmp_path / "template"
    entry = build(template, rng, 60, checkpoint_after=45)
    assert entry is not None and entry.size > 0
    saw_trusted = False
    for case in range(40):
        dest = tmp_path / ("case%d" % case)
        expected, last, valid_end, cut, lo = crash_copy(template, dest, rng, entry)
        index = last[:-4] + ".index"
        index_ok = os.path.exists(index) and os.path.getsize(index) >= entry.index_size
        stats = check_recovered(dest, expected, last, valid_end)
        if lo and index_ok:
            # The checkpoint still matched: only what followed it was read.
            saw_trusted = True
            assert stats["recovery_scanned_bytes"] == cut - entry.size
        shutil.rmtree(dest)
    assert saw_trusted


@pytest.mark.parametrize("seed", [5, 6])
def test_crash_fuzz_torn_segment_before_the_last(records_impl, tmp_path, seed):
    """Power lost while a roll's seal waited for the syncer: the sealed
    segment lost a tail (cut at a random byte, bits flipped before the cut)
    while the next one's records reached the disk. Recovery keeps the
    longest valid prefix, which ends in the torn segment: the next one goes."""
    rng = random.Random(seed)
    template = tmp_path / "template"
    build(template, rng, 60)
    tdir_t = os.path.join(template, "topics", "t")
    recs = layout(tdir_t)
    names = segment_files(tdir_t)
    torn_name, next_name = names[-2], names[-1]
    torn_size = os.path.getsize(os.path.join(tdir_t, torn_name))
    next_size = os.path.getsize(os.path.join(tdir_t, next_name))
    for case in range(30):
        dest = tmp_path / ("case%d" % case)
        shutil.copytree(template, dest)
        tdir = os.path.join(dest, "topics", "t")
        torn = os.path.join(tdir, torn_name)
        cut = rng.randrange(0, torn_size)
        os.truncate(torn, cut)
        flips = set()
        with open(torn, "r+b") as f:
            for _ in range(rng.randrange(0, 3) if cut else 0):
                p = rng.randrange(max(0, cut - 300), cut)
                f.seek(p)
                byte = f.read(1)[0] ^ (1 << rng.randrange(8))
                f.seek(p)
                f.write(bytes([byte]))
                flips.add(p)
        expected = []
        valid_end = 0
        for name, start, end, off, payload in recs:
            if name < torn_name:
                expected.append((off, payload))
            elif name == torn_name:
                if end > cut or any(start <= q < end for q in flips):
                    break
                expected.append((off, payload))
                valid_end = end
        stats = check_recovered(dest, expected, torn, valid_end)
        assert stats["recovery_dropped_segments"] == 1
        assert stats["recovery_truncated_bytes"] == cut - valid_end + next_size
        assert segment_files(tdir) == names[:-1]
        shutil.rmtree(dest)


def test_corruption_inside_checkpointed_prefix_is_never_served(records_impl, tmp_path):
    """Bit rot where recovery trusts the checkpoint: reads refuse, never return it."""
    rng = random.Random(5)
    entry = build(tmp_path, rng, 30, checkpoint_after=29)
    recs = layout(tmp_path / "topics" / "t")
    victim = [r for r in recs if r[0] == "%020d.log" % entry.base_offset][-1]
    path = tmp_path / "topics" / "t" / victim[0]
    with open(path, "r+b") as f:
        f.seek(victim[2] - 1)
        b = f.read(1)[0]
        f.seek(victim[2] - 1)
        f.write(bytes([b ^ 0x10]))
    # The last record is checked against the checkpoint: a mismatch there
    # means a full scan, which cuts the corrupt record off.
    store = make_store(tmp_path)
    got = read_all(store.get("t"))
    assert [(o, p) for o, _t, p in got] == [(r[3], r[4]) for r in recs[:-1]]
    store.close()
    # A flipped bit in an earlier record of the trusted prefix is not
    # scanned for; reading it raises instead of returning it.
    recs = layout(tmp_path / "topics" / "t")
    seg_recs = [r for r in recs if r[0] == victim[0]]
    inner = seg_recs[len(seg_recs) // 2]
    with open(path, "r+b") as f:
        f.seek(inner[1] + 30 if inner[2] - inner[1] > 30 else inner[1] + 10)
        b = f.read(1)[0]
        f.seek(f.tell() - 1)
        f.write(bytes([b ^ 0x01]))
    store = make_store(tmp_path)
    topic = store.get("t")
    records = records_impl
    with pytest.raises(records.CorruptRecordError):
        read_all(topic, inner[3])
    store.close()


def _count_log_opens(monkeypatch):
    opened = []
    real_open = os.open

    def spy(path, *args, **kwargs):
        if str(path).endswith(".log") and "offsets" not in str(path):
            opened.append(str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    return opened


def test_clean_restart_scans_and_opens_nothing(records_impl, tmp_path, monkeypatch):
    async def write():
        store = make_store(tmp_path, segment_bytes=2048)
        writer = await start_writer(store)
        for name in ("a", "b", "c"):
            topic = store.get_or_create(name)
            for i in range(30):
                publish(writer, topic, [b"%s-%d" % (name.encode(), i) * 40])
        await writer.flush()
        await writer.close()
        store.close()

    asyncio.run(write())
    found = checkpoint.read(str(tmp_path))
    assert found is not None and found[0] is True and set(found[1]) == {"a", "b", "c"}
    opened = _count_log_opens(monkeypatch)
    store = make_store(tmp_path, segment_bytes=2048)
    assert opened == []
    assert store.stats["recovery_scanned_bytes"] == 0
    monkeypatch.undo()
    for name in ("a", "b", "c"):
        topic = store.get(name)
        assert len(topic.segments) >= 3
        assert [p for _o, _t, p in read_all(topic)] == [b"%s-%d" % (name.encode(), i) * 40
                                                      for i in range(30)]
    store.close()


def test_unclean_restart_scans_only_after_the_checkpoint(records_impl, tmp_path):
    payload = b"x" * 1000
    async def write():
        store = make_store(tmp_path, segment_bytes=1 << 20)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        for _ in range(100):
            publish(writer, topic, [payload])
        await writer.checkpoint()
        before = topic.active.size
        for _ in range(7):
            publish(writer, topic, [payload])
        await writer.flush()
        after = topic.active.size
        await writer.close(clean=False)  # kill -9: no final fsync, no checkpoint
        store.close(checkpoint=False)
        return before, after

    before, after = asyncio.run(write())
    assert after - before == 7 * (24 + 1000)
    store = make_store(tmp_path, segment_bytes=1 << 20)
    assert store.stats["recovery_scanned_bytes"] == after - before
    assert len(read_all(store.get("t"))) == 107
    store.close()


def test_no_checkpoint_scans_only_the_last_two_segments(records_impl, tmp_path):
    """The one before the last may still have waited for its seal's fsync."""
    rng = random.Random(7)
    build(tmp_path, rng, 40)
    assert not os.path.exists(tmp_path / "checkpoint")  # build() wrote none
    tdir = tmp_path / "topics" / "t"
    names = segment_files(tdir)
    assert len(names) > 3
    store = make_store(tmp_path)
    assert store.stats["recovery_scanned_bytes"] == sum(
        os.path.getsize(tdir / name) for name in names[-2:])
    assert checkpoint.read(str(tmp_path)) is not None  # written after recovery
    store.close()


def test_corrupt_checkpoint_file_is_ignored(records_impl, tmp_path):
    rng = random.Random(8)
    build(tmp_path, rng, 20, checkpoint_after=19)
    data = bytearray(open(tmp_path / "checkpoint", "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(tmp_path / "checkpoint", "wb").write(bytes(data))
    recs = layout(tmp_path / "topics" / "t")
    store = make_store(tmp_path)
    assert [(o, p) for o, _t, p in read_all(store.get("t"))] == [(r[3], r[4]) for r in recs]
    assert store.stats["recovery_scanned_bytes"] > 0
    store.close()


def test_missing_or_garbled_indexes_are_rebuilt(records_impl, tmp_path):
    rng = random.Random(9)
    build(tmp_path, rng, 50)
    tdir = tmp_path / "topics" / "t"
    recs = layout(tdir)
    names = segment_files(tdir)
    assert len(names) >= 4
    os.unlink(tdir / (names[0][:-4] + ".index"))
    open(tdir / (names[1][:-4] + ".index"), "wb").write(b"\xff" * 24)
    os.truncate(tdir / (names[2][:-4] + ".index"), 0)
    os.unlink(tdir / (names[-1][:-4] + ".index"))
    store = make_store(tmp_path)
    topic = store.get("t")
    # Read every record from its own offset: each lookup goes through an index.
    for _name, _s, _e, off, payload in recs:
        assert read_all(topic, off, max_bytes=1)[0][2] == payload
    assert store.stats["index_rebuilds"] >= 3
    store.close()
    # Sealed segments' rebuilt indexes were saved: no rebuild the next time.
    store = make_store(tmp_path)
    assert [p for _o, _t, p in read_all(store.get("t"))] == [r[4] for r in recs]
    assert store.stats["index_rebuilds"] == 0
    store.close()


def test_thousands_of_segments_open_lazily(records_impl, tmp_path, monkeypatch):
    """3,000 sealed segments: startup stats them but opens only what it reads."""
    rec = records_impl
    tdir = tmp_path / "topics" / "many"
    tdir.mkdir(parents=True)
    n = 3000
    t0 = 1_700_000_000_000
    for i in range(n):
        (tdir / ("%020d.log" % (2 * i))).write_bytes(
            rec.encode_records([b"a%d" % i, b"b%d" % i], 2 * i, t0 + i))
    opened = _count_log_opens(monkeypatch)
    store = make_store(tmp_path, max_open_segments=8)
    # The last two, recovered (no checkpoint: the one before the last may
    # have waited for its seal); nothing else.
    assert opened == [str(tdir / ("%020d.log" % (2 * i))) for i in (n - 2, n - 1)]
    monkeypatch.undo()
    topic = store.get("many")
    assert (topic.start_offset, topic.end_offset, len(topic.segments)) == (0, 2 * n, n)
    # Reads far apart open only what they touch, and never more than the cap.
    convert = decoder()
    for off in (0, 2999, 4444, 5999, 17, 3001, 2, 5998):
        recs, _count, _nxt = topic.read(off, 1, convert)
        assert recs[0][2] == (b"a%d" if off % 2 == 0 else b"b%d") % (off // 2)
        assert len(store.rcache) <= 8
    assert topic.offset_for_time(t0 + 1234) == 2468
    assert len(store.rcache) <= 8
    store.close()
