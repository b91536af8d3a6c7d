"""The consumer offsets journal survives a torn write at every byte."""

from __future__ import annotations

import errno
import os
import shutil

import pytest

from broker.storage import fileio
from broker.storage.offsets import OffsetStore

A = (b"client-a", "topic.one")
B = (b"client-b", "t2")
C = (b"\xff" * 40, "x" * 200)


def journal(directory, *batches) -> OffsetStore:
    store = OffsetStore(str(directory))
    store.load()
    for changes in batches:
        store.write(changes)
    return store


def loaded(directory) -> dict:
    store = OffsetStore(str(directory))
    store.load()
    try:
        return dict(store.items())
    finally:
        store.close()


def test_torn_last_record_at_every_byte(tmp_path):
    src = tmp_path / "src"
    store = journal(src, {A: 1, B: 2}, {C: 3})
    size_before_last = os.path.getsize(src / "offsets.log")
    store.write({A: 99})
    store.close()
    data = (src / "offsets.log").read_bytes()
    before = {A: 1, B: 2, C: 3}
    for cut in range(size_before_last, len(data) + 1):
        d = tmp_path / ("cut%d" % cut)
        d.mkdir()
        (d / "offsets.log").write_bytes(data[:cut])
        want = {**before, A: 99} if cut == len(data) else before
        assert loaded(d) == want, cut
        assert os.path.getsize(d / "offsets.log") == (len(data) if cut == len(data)
                                                      else size_before_last)
        # Appending after a cut tail: the new record is readable.
        s = journal(d, {B: 7})
        s.close()
        assert loaded(d) == {**want, B: 7}
        shutil.rmtree(d)


def test_corrupt_byte_in_last_record(tmp_path):
    src = tmp_path / "src"
    store = journal(src, {A: 1}, {B: 2})
    size_before_last = os.path.getsize(src / "offsets.log")
    store.write({C: 3})
    store.close()
    data = (src / "offsets.log").read_bytes()
    for pos in range(size_before_last, len(data)):
        d = tmp_path / ("flip%d" % pos)
        d.mkdir()
        bad = bytearray(data)
        bad[pos] ^= 0x40
        (d / "offsets.log").write_bytes(bytes(bad))
        assert loaded(d) == {A: 1, B: 2}, pos
        shutil.rmtree(d)


def _history(directory) -> tuple[OffsetStore, dict]:
    store = journal(directory, *({A: i, B: 2 * i} for i in range(20)), {C: 5})
    return store, {A: 19, B: 38, C: 5}


def test_torn_compaction_at_every_byte(tmp_path):
    """A crash while the snapshot is written leaves the journal whole."""
    ref = tmp_path / "ref"
    store, state = _history(ref)
    journal_bytes = (ref / "offsets.log").read_bytes()
    store.compact()
    store.close()
    snapshot = (ref / "offsets.log").read_bytes()
    assert len(snapshot) < len(journal_bytes) and loaded(ref) == state
    for k in range(len(snapshot) + 1):
        d = tmp_path / ("tmp%d" % k)
        d.mkdir()
        (d / "offsets.log").write_bytes(journal_bytes)
        (d / "offsets.log.tmp").write_bytes(snapshot[:k])
        assert loaded(d) == state, k
        assert not (d / "offsets.log.tmp").exists()
        shutil.rmtree(d)


def test_compaction_cut_by_a_write_error_at_every_byte(tmp_path, monkeypatch):
    """The real compact(), failing after k bytes of the snapshot (ENOSPC)."""
    ref = tmp_path / "ref"
    store, state = _history(ref)
    store.compact()
    store.close()
    snapshot_len = os.path.getsize(ref / "offsets.log")
    real_write_all = fileio.write_all
    for k in range(snapshot_len):
        d = tmp_path / ("err%d" % k)
        store, _ = _history(d)

        def failing(fd, data, k=k):
            real_write_all(fd, memoryview(data)[:k])
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(fileio, "write_all", failing)
        with pytest.raises(OSError):
            store.compact()
        monkeypatch.setattr(fileio, "write_all", real_write_all)
        assert not (d / "offsets.log.tmp").exists()
        store.write({A: 1000})  # the journal still takes appends
        store.close()
        assert loaded(d) == {**state, A: 1000}, k
        shutil.rmtree(d)


def test_snapshot_torn_after_rename_keeps_a_prefix(tmp_path):
    """Had the renamed snapshot itself been torn, loading keeps whole records only."""
    ref = tmp_path / "ref"
    store, state = _history(ref)
    store.compact()
    store.close()
    snapshot = (ref / "offsets.log").read_bytes()
    full = 0
    for k in range(len(snapshot) + 1):
        d = tmp_path / ("snap%d" % k)
        d.mkdir()
        (d / "offsets.log").write_bytes(snapshot[:k])
        got = loaded(d)
        assert all(state[key] == value for key, value in got.items()), k
        full += got == state
        shutil.rmtree(d)
    assert full == 1


def test_failed_append_is_cut_back(tmp_path, monkeypatch):
    store = journal(tmp_path, {A: 1})
    size = os.path.getsize(tmp_path / "offsets.log")
    real_write = os.write
    calls = []

    def half_then_enospc(fd, data):
        if not calls:
            calls.append(1)
            return real_write(fd, bytes(data)[:len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError):
        store.write({B: 2, C: 3})
    monkeypatch.setattr(os, "write", real_write)
    assert os.path.getsize(tmp_path / "offsets.log") == size
    store.write({C: 4})
    store.close()
    assert loaded(tmp_path) == {A: 1, C: 4}


def test_journal_compacts_itself(tmp_path):
    store = OffsetStore(str(tmp_path))
    store.load()
    for i in range(12_000):
        store.write({A if i % 2 else B: i})
    store.close()
    assert os.path.getsize(tmp_path / "offsets.log") < 12_000 * 30
    assert loaded(tmp_path) == {A: 11_999, B: 11_998}
