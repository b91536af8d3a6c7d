"""Helpers for the hostile-input, fault, security, metrics and soak tests.

- :func:`start_server`: a :class:`conftest.ServerProcess` outside the
  function-scoped ``server`` fixture (for module-scoped brokers).
- :class:`Bystander`: an innocent client (its own producer and consumer
  connections, raw v1) that must keep working while others misbehave.
- :func:`rss_kb`: a process's resident memory, from ``/proc``.
- :func:`read_topic`: every record of a topic, read back through a fresh
  v1 connection with every CRC checked.
- :func:`stats`: the broker's ``STA`` counters through a fresh connection.
- the fsync recorder and power-loss simulation used by test_faults.py:
  ``python tests/reliability.py serve-recording-fsyncs LOG serve ...`` runs
  the broker with ``os.fsync`` wrapped so that every fsync that returned is
  logged; :func:`simulate_power_loss` then cuts the data dir back to what
  those fsyncs made durable.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # run as a script (the fsync recorder)
    sys.path.insert(0, str(HERE))

from v1support import OLDEST, V1Conn, parse_err, parse_msg  # noqa: E402


def start_server(impl: str, base: Path, name: str, *args, start: bool = True):
    """A broker with ``args`` in a fresh sandbox under ``base`` (caller kills it)."""
    from conftest import ServerProcess
    sandbox = base / ("%s-sandbox" % name)
    sandbox.mkdir(parents=True)
    logs = base / ("%s-logs" % name)
    logs.mkdir(exist_ok=True)
    srv = ServerProcess(impl, sandbox, list(args), logs, name)
    if start:
        srv.start()
    return srv


def stop_quietly(srv) -> None:
    srv.kill()
    if srv.proc is not None and srv.proc.stdout is not None:
        srv.proc.stdout.close()


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def stats(port: int) -> dict:
    with V1Conn(port) as c:
        c.hello()
        return c.json(b"STA")


def topics(port: int) -> dict:
    """``{topic: TOP entry}``."""
    with V1Conn(port) as c:
        c.hello()
        return {t["topic"]: t for t in c.json(b"TOP")}


def read_topic(port: int, topic: str, timeout: float = 20.0) -> list[tuple[int, bytes]]:
    """``[(offset, value)]`` of the whole topic (CRCs checked), oldest first."""
    with V1Conn(port, timeout=timeout) as c:
        c.hello()
        info = {t["topic"]: t for t in c.json(b"TOP")}.get(topic)
        if info is None:
            return []
        n = info["next_offset"] - info["first_offset"]
        if n == 0:
            return []
        rid, start = c.subscribe(topic, OLDEST)
        assert start == info["first_offset"]
        out: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:  # at least what TOP counted; more may have arrived since
            k, r, p = c.read_frame(max(0.001, deadline - time.monotonic()))
            assert (k, r) == (b"MSG", rid), (k, r, p[:60])
            _topic, recs = parse_msg(p)  # checks every record's CRC
            out.extend((off, value) for off, _ts, value in recs)
        return out


class Bystander:
    """An innocent client: publishes with acks on one connection, consumes on another."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.port = port
        self.topic = "bystander-" + uuid.uuid4().hex[:8]
        self.prod = V1Conn(port, timeout=timeout)
        self.prod.hello()
        self.cons = V1Conn(port, timeout=timeout)
        self.cons.hello()
        self.rid, _ = self.cons.subscribe(self.topic, OLDEST)
        self.n = 0
        self.latencies: list[float] = []

    def check(self, timeout: float = 10.0) -> float:
        """Publish one message (acked) and see it delivered; returns the seconds taken."""
        t0 = time.monotonic()
        self.n += 1
        value = b"bystander-%d" % self.n
        base, count = self.prod.publish(self.topic, [value])
        assert count == 1 and base == self.n - 1, (base, count, self.n)
        got = self.cons.read_messages(1, self.rid, timeout=timeout)
        assert got[0][0] == base and got[0][2] == value, got
        took = time.monotonic() - t0
        self.latencies.append(took)
        return took

    def close(self) -> None:
        self.prod.close()
        self.cons.close()

    def __enter__(self) -> "Bystander":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def expect_err(conn: V1Conn, rid: int, code: int, timeout: float = 10.0) -> str:
    k, r, p = conn.reply(rid, timeout)
    assert k == b"ERR", "expected ERR %d, got %s %r" % (code, k, p[:60])
    got, text = parse_err(p)
    assert got == code, "expected error %d, got %d (%s)" % (code, got, text)
    return text


def sandbox_paths(srv) -> list[str]:
    """Every path under the server's sandbox, relative to it."""
    out = []
    for root, dirs, files in os.walk(srv.sandbox):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(root, name), srv.sandbox))
    return sorted(out)


# -- fsync recording and power-loss simulation ---------------------------------

def _install_fsync_recorder(log_path: str) -> None:
    """Wrap ``os.fsync`` (and ``os.fdatasync``) to log what each completed call covered.

    Before the real call: for a regular file its inode and size (data
    appended after this moment is not claimed as covered); for a
    directory its inode and its entries (name -> inode). After the real
    call returned, one JSON line is appended to ``log_path`` with
    ``os.write`` (in the kernel once it returns, so a SIGKILL of this
    process cannot lose it). The broker reports a write (ACK) only after
    its fsync returned, so every acked byte's fsync is in the log.

    Two threads can fsync the same file at once (the syncer an active
    segment, the disk thread the same segment's seal after a roll): lines
    are appended as the calls return, not as they began. So each entry
    also records ``start``, a system-wide monotonic time taken, with the
    stat, under a lock: :func:`read_fsync_log` orders by it.
    """
    import stat as stat_mod
    import threading
    log_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    stat_lock = threading.Lock()

    def covered(fd) -> dict:
        st = os.fstat(fd)
        entry = {"dev": st.st_dev, "ino": st.st_ino, "start": time.monotonic_ns()}
        if stat_mod.S_ISDIR(st.st_mode):
            path = os.readlink("/proc/self/fd/%d" % fd)
            entries = {}
            for e in os.scandir(path):
                try:
                    entries[e.name] = e.inode()
                except OSError:
                    pass
            entry.update(kind="dir", path=path, entries=entries)
        else:
            entry.update(kind="file", size=st.st_size,
                         path=os.readlink("/proc/self/fd/%d" % fd))
        return entry

    def wrap(real):
        def recorded(fd):
            with stat_lock:  # the stat and its start time, in one order
                entry = covered(fd)
            real(fd)
            os.write(log_fd, (json.dumps(entry) + "\n").encode())
        return recorded

    os.fsync = wrap(os.fsync)
    if hasattr(os, "fdatasync"):
        os.fdatasync = wrap(os.fdatasync)


def read_fsync_log(log_path: str) -> tuple[dict, dict]:
    """``(files, dirs)``: inode -> size at its last fsync; inode -> entries at its last fsync.

    "Last" is the last to begin of those that returned: two fsyncs of one
    file can overlap, and the one that began first can return last.
    """
    files: dict[tuple[int, int], int] = {}
    dirs: dict[tuple[int, int], dict] = {}
    try:
        with open(log_path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return files, dirs
    entries = []
    for n, line in enumerate(lines):
        # One os.write per line, but a SIGKILL can still cut one short: the
        # kernel stops a write between pages for a fatal signal. The next
        # run's line then follows the torn one on the same line. The torn
        # record's fsync had returned, but the broker was killed before it
        # could act on it, so nothing it covered was acknowledged: dropped.
        start = line.rfind('{"dev"')
        if start < 0 or not line.endswith("}"):
            continue
        e = json.loads(line[start:])
        # In the order the fsyncs began (lines are in the order they returned).
        entries.append((e.get("start", 0), n, e))
    entries.sort(key=lambda t: t[:2])
    for _start, _n, e in entries:
        key = (e["dev"], e["ino"])
        if e["kind"] == "dir":
            dirs[key] = e["entries"]
        else:
            files[key] = e["size"]
    return files, dirs


def simulate_power_loss(data_dir: Path, log_path: str, *, drop_unsynced_files: bool) -> dict:
    """Cut ``data_dir`` back to what the logged fsyncs made durable.

    Call it on a data dir whose broker was just killed (SIGKILL). Model:

    - directory entries: a name that was not in its directory when that
      directory was last fsynced is removed (the entry never became
      durable). In a directory that was never fsynced, a name survives
      only if its file was fsynced itself (what ext4 and xfs do in
      practice);
    - file data: a file whose inode was fsynced is truncated to the size
      it had when its last fsync started; a file never fsynced loses all
      its data: it is emptied, or with ``drop_unsynced_files`` removed.

    Not modelled, because our copy no longer has the old bytes: a name
    renamed over or deleted after its directory's last fsync coming back
    with its old content (we keep the new file: a smaller loss than a real
    one could be). An inode number reused after a delete can make a file
    look fsynced when it was not (again only a smaller loss). Torn pages
    are not produced; the record CRCs are tested elsewhere for those.
    Returns counts of what was cut.
    """
    files, dirs = read_fsync_log(log_path)
    cut = {"truncated_files": 0, "bytes_cut": 0, "removed_entries": 0, "emptied_files": 0}
    for root, _dirnames, filenames in os.walk(data_dir, topdown=False):
        dst = os.stat(root)
        durable_entries = dirs.get((dst.st_dev, dst.st_ino))
        for name in filenames:
            path = os.path.join(root, name)
            st = os.stat(path)
            synced = files.get((st.st_dev, st.st_ino))
            if durable_entries is not None:
                entry_durable = name in durable_entries
            else:
                entry_durable = synced is not None
            if not entry_durable or (synced is None and drop_unsynced_files):
                os.unlink(path)
                cut["removed_entries"] += 1
                cut["bytes_cut"] += st.st_size
            elif synced is None:
                if st.st_size:
                    os.truncate(path, 0)
                    cut["emptied_files"] += 1
                    cut["bytes_cut"] += st.st_size
            elif st.st_size > synced:
                os.truncate(path, synced)
                cut["truncated_files"] += 1
                cut["bytes_cut"] += st.st_size - synced
    return cut


def _main(argv: list[str]) -> None:
    if argv[:1] == ["serve-recording-fsyncs"]:
        _install_fsync_recorder(argv[1])
        from broker.cli import main
        sys.argv = ["pylogstreams", *argv[2:]]
        main()
    else:
        raise SystemExit("usage: reliability.py serve-recording-fsyncs LOG serve [options]")


if __name__ == "__main__":
    _main(sys.argv[1:])
