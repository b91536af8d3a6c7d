"""Disk errors: ENOSPC on a real (tiny) filesystem, EIO injected.

A refused publish is never acknowledged and never half stored; reads keep
working; writes are accepted again once the disk has room.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess

import pytest

import storage_helpers
from storage_helpers import (
    DiskFaults, make_store, publish, read_all, segment_files, start_writer)

records_impl = storage_helpers.records_impl  # fixture: every test runs with both codecs


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1 MiB tmpfs mounted for this test (needs root, i.e. CAP_SYS_ADMIN)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                               str(mnt)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip("cannot run mount(8) to make a small filesystem: %s" % exc)
    if proc.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): %s"
                    % proc.stderr.strip())
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


async def _publish_and_wait(writer, topic, msgs):
    fut = asyncio.get_running_loop().create_future()
    publish(writer, topic, msgs, lambda base, count, error: fut.set_result((base, count, error)))
    return await fut


def test_disk_full_refuses_then_recovers(records_impl, tiny_fs):
    data_dir = tiny_fs / "data"
    filler = tiny_fs / "filler"
    filler.write_bytes(b"\0" * (256 * 1024))  # room to free later

    async def main():
        store = make_store(data_dir, segment_bytes=64 * 1024)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        stored = []
        refused = None
        i = 0
        while refused is None:
            batch = [b"%06d" % (i + k) + b"." * 994 for k in range(20)]
            base, count, error = await _publish_and_wait(writer, topic, batch)
            if error is not None:
                refused = error
                assert base is None and count == 20
                break
            assert base == len(stored)
            stored.extend(batch)
            i += 20
        assert refused.errno == errno.ENOSPC
        assert topic.end_offset == topic.next_offset == len(stored) > 500
        # Nothing of the refused batch is in the files: they hold exactly what was acked.
        on_disk = sum(os.path.getsize(os.path.join(topic.directory, f))
                      for f in segment_files(topic.directory))
        assert on_disk == topic.size_bytes == len(stored) * 1024
        # Reads keep working, and a full disk keeps refusing.
        assert [p for _o, _t, p in read_all(topic)] == stored
        _, _, error = await _publish_and_wait(writer, topic, [b"still full" * 100] * 20)
        assert error is not None and error.errno == errno.ENOSPC
        assert store.stats["write_errors"] >= 2
        # Space comes back: writes are accepted again, offsets continue.
        filler.unlink()
        more = [b"after %d" % k for k in range(50)]
        base, count, error = await _publish_and_wait(writer, topic, more)
        assert (base, count, error) == (len(stored), 50, None)
        stored.extend(more)
        assert [p for _o, _t, p in read_all(topic)] == stored
        await writer.close()
        store.close()
        return stored

    stored = asyncio.run(main())
    store = make_store(data_dir, segment_bytes=64 * 1024)
    assert [p for _o, _t, p in read_all(store.get("t"))] == stored
    store.close()


@pytest.mark.parametrize("batch", [2, 40], ids=["fits", "rolls"])
@pytest.mark.parametrize("fault", ["pwrite", "fsync"])
def test_eio_refuses_the_batch(records_impl, tmp_path, monkeypatch, fault, batch):
    faults = DiskFaults(monkeypatch)

    async def main():
        store = make_store(tmp_path, fsync="always", segment_bytes=4096)
        writer = await start_writer(store)
        topic = store.get_or_create("t")
        first = [b"a%d" % i * 30 for i in range(100)]  # spans several segments
        assert (await _publish_and_wait(writer, topic, first))[2] is None
        size, segments = topic.size_bytes, len(topic.segments)
        setattr(faults, fault, DiskFaults.ALWAYS)
        base, count, error = await _publish_and_wait(writer, topic, [b"b" * 300] * batch)
        setattr(faults, fault, 0)
        assert base is None and count == batch and error.errno == errno.EIO
        # Not visible, not in the files, no segment left behind.
        assert (topic.end_offset, topic.next_offset) == (100, 100)
        assert (topic.size_bytes, len(topic.segments)) == (size, segments)
        assert len(segment_files(topic.directory)) == segments
        assert os.path.getsize(topic.active.log_path) == topic.active.readable_size
        second = [b"c%d" % i for i in range(5)]
        assert await _publish_and_wait(writer, topic, second) == (100, 5, None)
        assert [p for _o, _t, p in read_all(topic)] == first + second
        await writer.close()
        store.close()
        return first + second

    stored = asyncio.run(main())
    store = make_store(tmp_path, fsync="always", segment_bytes=4096)
    assert [p for _o, _t, p in read_all(store.get("t"))] == stored
    store.close()


def test_failed_offsets_write_is_retried(tmp_path, monkeypatch):
    from broker.storage import offsets as offsets_module
    real = offsets_module.write_all
    failing = [True]

    def flaky(fd, data):
        if failing[0]:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data)

    monkeypatch.setattr(offsets_module, "write_all", flaky)

    async def main():
        store = make_store(tmp_path)
        writer = await start_writer(store)
        store.offsets.set(b"client", "t", 5)
        writer.offsets_changed()
        await writer.flush()  # the journal write failed; the update is kept for later
        failing[0] = False
        publish(writer, store.get_or_create("t"), [b"x"])  # any later job retries it
        await writer.flush()
        await writer.close()
        store.close()

    asyncio.run(main())
    store = make_store(tmp_path)
    assert store.offsets.get(b"client", "t") == 5
    store.close()
