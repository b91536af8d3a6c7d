#!/usr/bin/env python
"""Soak: mixed load with random client kills and broker restarts, for N minutes.

    python scripts/soak.py --minutes 30
    python scripts/soak.py --minutes 3 --impl alternate --json

What runs, all against one data dir and one port:

- v1 producers (the ``broker.Client`` library) publishing acknowledged
  batches to four topics, and v0 producers (raw sockets, the prototype's
  protocol) to a fifth;
- v1 consumers committing what they processed (``auto_commit=False``),
  and v0 consumers;
- every client session ends at a random moment, half the time abruptly
  (the socket reset, no goodbye), and a new one starts;
- the broker is restarted every ``--restart-every`` seconds (randomised),
  alternately by SIGTERM (it must exit 0) and SIGKILL; with
  ``--impl alternate`` each restart switches between the Cython and the
  pure-Python codec on the same data dir.

Checked after every restart and at the end: every acknowledged message is
in its topic exactly once, at the offset its ACK named, with a valid CRC
(records are read back through a fresh connection, CRCs checked), offsets
are contiguous, nothing is stored that no producer sent, each producer's
messages are in publish order; no v1 consumer's committed offset is ahead
of what it processed; every v1 consumer saw offsets in order without gaps
within a connection. The broker's RSS is sampled every second: the report
gives it per broker run (after a 3 s warm-up, the maximum, and the last),
and the run fails if it exceeds ``--max-rss-mb`` or grows by more than
``--max-rss-growth-mb`` within one broker run.

Prints a JSON summary (``--json``) or a table; exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import array
import bisect
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from v1support import OLDEST, V1Conn, parse_msg  # noqa: E402

V1_TOPICS = ["soak.v1.%d" % i for i in range(4)]
V0_TOPIC = "soak.v0"
# Producer names: "prod<i>" publishes to V1_TOPICS[i], "v0prod" to V0_TOPIC.
PRODUCERS = {**{"prod%d" % i: t for i, t in enumerate(V1_TOPICS)}, "v0prod": V0_TOPIC}


def message(name: str, seq: int) -> bytes:
    """Message ``seq`` of producer ``name``: rebuilt from the two, so the
    bookkeeping keeps numbers, not bytes (a 30-minute run sends millions)."""
    return b"%s:%09d:%s" % (name.encode(), seq, b"s" * (seq * 7919 % 200))


def parse(value: bytes) -> tuple[str, int]:
    name, seq, _ = value.split(b":", 2)
    return name.decode(), int(seq)


class Failure(Exception):
    """A soak check failed."""


# -- the broker process --------------------------------------------------------

def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """SIGKILL the broker if this script dies: no broker outlives a soak."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class BrokerProc:
    def __init__(self, data_dir: str, port: int, impl: str, log_dir: str, extra: list[str]) -> None:
        self.data_dir, self.port, self.impl, self.log_dir, self.extra = data_dir, port, impl, log_dir, extra
        self.proc: subprocess.Popen | None = None
        self.runs = 0
        self.current_impl = "c" if impl != "py" else "py"

    def start(self) -> None:
        env = dict(os.environ)
        env.pop("PYLOGSTREAMS_NO_EXTENSIONS", None)
        if self.impl == "alternate":
            self.current_impl = "c" if self.runs % 2 == 0 else "py"
        if self.current_impl == "py":
            env["PYLOGSTREAMS_NO_EXTENSIONS"] = "1"
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
        self.runs += 1
        log = open(os.path.join(self.log_dir, "broker-run%03d.log" % self.runs), "wb")
        deadline = time.monotonic() + 30
        while True:  # the port may still be in TIME_WAIT use after a kill
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "broker", "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), "--data-dir", self.data_dir, *self.extra],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent)
            line = self.proc.stdout.readline().decode()
            if line.startswith("pylogstreams serving on"):
                want = "codec=%s" % ("cython" if self.current_impl == "c" else "python")
                if want not in line:
                    raise Failure("broker started with the wrong codec: %r" % line)
                break
            self.proc.wait(10)
            if time.monotonic() > deadline:
                raise Failure("broker did not start (see %s)" % log.name)
            time.sleep(0.2)
        log.close()

    def pid(self) -> int:
        return self.proc.pid

    def stop(self, graceful: bool) -> None:
        if graceful:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise Failure("broker did not stop within 60 s of SIGTERM")
            if rc != 0:
                raise Failure("broker exited %d after SIGTERM" % rc)
        else:
            self.proc.kill()
            self.proc.wait(30)
        self.proc.stdout.close()

    def kill_quietly(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)


def rss_kb(pid: int) -> int | None:
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


# -- load -------------------------------------------------------------------------

class Shared:
    """Bookkeeping shared by the workers (one lock: the load is modest)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, list] = {t: [] for t in V1_TOPICS}  # (name, first seq, n, base)
        self.sent_max: dict[str, int] = {n: 0 for n in PRODUCERS}  # highest seq sent, per producer
        self.processed: dict[tuple[str, str], int] = {}   # (client id, topic) -> processed up to
        self.counts = {"sessions": 0, "abrupt_ends": 0, "acked": 0, "v0_sent": 0,
                       "v1_consumed": 0, "v0_consumed": 0, "connect_failures": 0}
        self.errors: list[str] = []
        self.last_v0_log = array.array("q")  # v0 topic's seqs at the last verification
        self.stop = threading.Event()

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


def _abort(client) -> None:
    """End a library client's connection abruptly (RST), as a crashed process would."""
    proto = client._aclient._proto
    if proto is not None and proto.transport is not None:
        def kill():
            sock = proto.transport.get_extra_info("socket")
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            proto.transport.abort()
        client._lt.loop.call_soon_threadsafe(kill)
    client._lt.stop()


def _sessions(sh: Shared, rng: random.Random, connect, failure, max_seconds: float):
    """Each worker's sessions until the soak stops: ``(connection, end, abrupt)``.

    ``connect()`` is retried 0.2 s after a ``failure`` (the broker is being
    restarted); each session lasts 0.5 to ``max_seconds`` and ends abruptly
    (no goodbye) half the time.
    """
    while not sh.stop.is_set():
        try:
            conn = connect()
        except failure:
            with sh.lock:
                sh.counts["connect_failures"] += 1
            time.sleep(0.2)
            continue
        with sh.lock:
            sh.counts["sessions"] += 1
        yield conn, time.monotonic() + rng.uniform(0.5, max_seconds), rng.random() < 0.5


def _end(sh: Shared, abrupt: bool, kill, close) -> None:
    """End a session: ``kill()`` it (abrupt, counted) or ``close()`` it politely."""
    if abrupt:
        with sh.lock:
            sh.counts["abrupt_ends"] += 1
        kill()
    else:
        try:
            close()
        except Exception:  # noqa: BLE001 - closing a dead connection
            pass


def _end_v1(sh: Shared, client, abrupt: bool) -> None:
    _end(sh, abrupt, lambda: _abort(client), client.close)


def v1_producer(sh: Shared, port: int, topic: str, name: str, rng: random.Random) -> None:
    from broker import Client
    from broker.client.errors import PyLogStreamsError
    seq = 0

    def connect():
        return Client("127.0.0.1", port, client_id=name, reconnect=False, connect_timeout=5,
                      request_timeout=30)

    for client, end, abrupt in _sessions(sh, rng, connect, PyLogStreamsError, 8):
        try:
            while time.monotonic() < end and not sh.stop.is_set():
                first = seq + 1
                batch = [message(name, first + i) for i in range(rng.randrange(1, 50))]
                seq += len(batch)
                with sh.lock:
                    sh.sent_max[name] = seq
                base = client.publish_batch(topic, batch)
                with sh.lock:
                    sh.acked[topic].append((name, first, len(batch), base))
                    sh.counts["acked"] += len(batch)
                time.sleep(rng.uniform(0, 0.02))
        except PyLogStreamsError:
            abrupt = False  # the broker went away
        except Exception:  # noqa: BLE001
            sh.error("producer %s: %s" % (name, traceback.format_exc(limit=3)))
        _end_v1(sh, client, abrupt)


def v1_consumer(sh: Shared, port: int, topic: str, name: str, rng: random.Random) -> None:
    from broker import Client
    from broker.client.errors import PyLogStreamsError
    def connect():
        client = Client("127.0.0.1", port, client_id=name, reconnect=False, connect_timeout=5,
                        request_timeout=30)
        return client, client.subscribe(topic, "committed", auto_commit=False)

    for (client, sub), end, abrupt in _sessions(sh, rng, connect, PyLogStreamsError, 8):
        nxt = None
        try:
            while time.monotonic() < end and not sh.stop.is_set():
                batch = sub.poll(timeout=0.5, max_messages=500)
                for m in batch:
                    if nxt is not None and m.offset != nxt:
                        sh.error("consumer %s on %s: offset %d after %d (gap or disorder)"
                                 % (name, topic, m.offset, nxt - 1))
                    nxt = m.offset + 1
                if batch:
                    with sh.lock:
                        sh.counts["v1_consumed"] += len(batch)
                    if rng.random() < 0.5:
                        key = (name, topic)
                        with sh.lock:  # recorded before the commit is sent
                            sh.processed[key] = max(sh.processed.get(key, 0), nxt)
                        sub.commit(nxt)
        except PyLogStreamsError:
            abrupt = False
        except Exception:  # noqa: BLE001
            sh.error("consumer %s: %s" % (name, traceback.format_exc(limit=3)))
        _end_v1(sh, client, abrupt)


def _v0_frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _rst_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _v0_goodbye(sock: socket.socket) -> None:
    """The v0 close frame (length 0), then close."""
    try:
        sock.sendall(b"\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()


def _v0_connect(port: int, hello: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(hello)
    except OSError:
        sock.close()
        raise
    return sock


def v0_producer(sh: Shared, port: int, name: str, rng: random.Random) -> None:
    seq = 0
    topic = V0_TOPIC.encode()
    hello = _v0_frame(b"CID " + name.encode())
    for sock, end, abrupt in _sessions(sh, rng, lambda: _v0_connect(port, hello), OSError, 5):
        try:
            while time.monotonic() < end and not sh.stop.is_set():
                frames = []
                msgs = []
                for _ in range(rng.randrange(1, 30)):
                    seq += 1
                    m = message(name, seq)
                    msgs.append(m)
                    body = b"PUB " + topic + b" " + m
                    frames.append(_v0_frame(body) + struct.pack(">I", zlib.crc32(m)))
                with sh.lock:
                    sh.sent_max[name] = seq
                sock.sendall(b"".join(frames))
                with sh.lock:
                    sh.counts["v0_sent"] += len(msgs)
                time.sleep(rng.uniform(0, 0.03))
        except OSError:
            abrupt = True
        _end(sh, abrupt, lambda: _rst_close(sock), lambda: _v0_goodbye(sock))


def v0_consumer(sh: Shared, port: int, name: str, rng: random.Random, seen: list) -> None:
    topic = V0_TOPIC.encode()
    hello = _v0_frame(b"CID " + name.encode()) + _v0_frame(b"SUB " + topic)
    for sock, end, abrupt in _sessions(sh, rng, lambda: _v0_connect(port, hello), OSError, 5):
        run = array.array("q")  # seqs received on this connection
        seen.append(run)
        buf = bytearray()
        sock.settimeout(0.3)
        try:
            while time.monotonic() < end and not sh.stop.is_set():
                try:
                    data = sock.recv(1 << 16)
                except socket.timeout:
                    continue
                if not data:
                    break
                buf += data
                while len(buf) >= 4:
                    n = struct.unpack_from(">I", buf)[0]
                    if len(buf) < 4 + n:
                        break
                    body = bytes(buf[4:4 + n])
                    del buf[:4 + n]
                    if not body.startswith(topic + b" "):
                        sh.error("v0 consumer got a frame for another topic: %r" % body[:60])
                        continue
                    run.append(parse(body[len(topic) + 1:])[1])
                    with sh.lock:
                        sh.counts["v0_consumed"] += 1
        except OSError:
            pass
        _rst_close(sock) if abrupt else sock.close()


# -- verification -------------------------------------------------------------------

def read_log(port: int, topic: str):
    """Yield ``(offset, value)`` of the whole topic, oldest first (CRCs checked)."""
    with V1Conn(port, timeout=60) as c:
        c.hello()
        info = {t["topic"]: t for t in c.json(b"TOP")}.get(topic)
        if info is None or info["next_offset"] == info["first_offset"]:
            return
        n = info["next_offset"] - info["first_offset"]
        rid, start = c.subscribe(topic, OLDEST)
        got = 0
        deadline = time.monotonic() + 600
        while got < n:
            k, r, p = c.read_frame(max(0.001, deadline - time.monotonic()))
            if (k, r) != (b"MSG", rid):
                raise Failure("unexpected frame %r while reading %s" % (k, topic))
            _t, recs = parse_msg(p)  # CRC of every record checked
            for off, _ts, value in recs:
                yield off, value
            got += len(recs)


def scan_log(port: int, topic: str) -> tuple[array.array, array.array, list]:
    """The topic as two arrays indexed by offset: producer index and seq.

    Checks on the way: offsets contiguous from 0; every message is one a
    producer of this topic built (name, seq, content); each producer's seqs
    strictly increase (publish order, and no message twice).
    """
    names = [n for n, t in PRODUCERS.items() if t == topic]
    index = {n: i for i, n in enumerate(names)}
    who, seqs = array.array("b"), array.array("q")
    last = [0] * len(names)
    for off, value in read_log(port, topic):
        if off != len(seqs):
            raise Failure("%s: offset %d where %d was due" % (topic, off, len(seqs)))
        try:
            name, seq = parse(value)
            i = index[name]
        except (ValueError, KeyError):
            raise Failure("%s: %r at %d is no producer's message" % (topic, value[:40], off))
        if value != message(name, seq):
            raise Failure("%s: %r at %d is damaged" % (topic, value[:40], off))
        if seq <= last[i]:
            raise Failure("%s: %s seq %d at %d after seq %d (duplicate or out of order)"
                          % (topic, name, seq, off, last[i]))
        last[i] = seq
        who.append(i)
        seqs.append(seq)
    return who, seqs, names


def verify(sh: Shared, port: int) -> int:
    """All the stored-data checks; returns the number of stored messages checked."""
    checked = 0
    # Snapshots in an order that makes them comparable while the load runs:
    # what was acknowledged before reading must be in the log; what was
    # sent after reading bounds all that is in it; processed offsets read
    # after the committed ones bound them.
    with sh.lock:
        acked = {t: list(a) for t, a in sh.acked.items()}
    logs = {topic: scan_log(port, topic) for topic in V1_TOPICS + [V0_TOPIC]}
    with V1Conn(port) as c:
        c.hello()
        committed = {(o["client_id"], o["topic"]): o["offset"] for o in c.json(b"OFS", b"\x00\x00")}
    with sh.lock:
        sent_max = dict(sh.sent_max)
        processed = dict(sh.processed)
    for topic, (who, seqs, names) in logs.items():
        checked += len(seqs)
        for i, name in enumerate(names):
            top = max((q for w, q in zip(who, seqs) if w == i), default=0)
            if top > sent_max[name]:
                raise Failure("%s: %s seq %d stored, but only %d were sent"
                              % (topic, name, top, sent_max[name]))
        for name, first, n, base in acked.get(topic, ()):
            i = names.index(name)
            for k in range(n):
                off = base + k
                if off >= len(seqs) or who[off] != i or seqs[off] != first + k:
                    raise Failure("%s: acknowledged %s seq %d (offset %d) is not there"
                                  % (topic, name, first + k, off))
    for key, upto in processed.items():
        if committed.get(key, 0) > upto:
            raise Failure("consumer %s on %s: committed %d is ahead of processed %d"
                          % (key[0], key[1], committed[key], upto))
    sh.last_v0_log = logs[V0_TOPIC][1]
    return checked


# -- main ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict:
    rng = random.Random(args.seed)
    duration = args.minutes * 60
    restart_every = args.restart_every or max(10.0, duration / 6)
    work = args.data_dir or tempfile.mkdtemp(prefix="pls-soak-")
    data_dir = os.path.join(work, "data")
    log_dir = os.path.join(work, "logs")
    os.makedirs(log_dir, exist_ok=True)
    port = free_port()
    broker = BrokerProc(data_dir, port, args.impl, log_dir, args.broker_arg)
    sh = Shared()
    report: dict = {"minutes": args.minutes, "seed": args.seed, "impl": args.impl,
                    "work_dir": work, "restarts": {"graceful": 0, "kill9": 0}, "rss_kb": [],
                    "verifications": 0, "messages_checked": 0}
    broker.start()
    threads = []
    v0_runs: list[list[bytes]] = []
    for i, topic in enumerate(V1_TOPICS):
        threads.append(threading.Thread(target=v1_producer, daemon=True, args=(
            sh, port, topic, "prod%d" % i, random.Random(rng.random()))))
        threads.append(threading.Thread(target=v1_consumer, daemon=True, args=(
            sh, port, topic, "cons%d" % i, random.Random(rng.random()))))
    threads.append(threading.Thread(target=v0_producer, daemon=True, args=(
        sh, port, "v0prod", random.Random(rng.random()))))
    threads.append(threading.Thread(target=v0_consumer, daemon=True, args=(
        sh, port, "v0cons", random.Random(rng.random()), v0_runs)))
    for t in threads:
        t.start()
    start = time.monotonic()
    end = start + duration
    try:
        _load_loop(args, rng, sh, broker, port, report, end, restart_every)
    except Failure as exc:
        sh.errors.append(str(exc))
    except Exception:  # noqa: BLE001 - reported, and the broker still cleaned up
        sh.errors.append("soak crashed: %s" % traceback.format_exc())
    finally:
        sh.stop.set()
        for t in threads:
            t.join(60)
    return _finish(args, sh, broker, port, report, start, work, v0_runs)


def _load_loop(args, rng, sh, broker, port, report, end, restart_every) -> None:
    graceful_next = True
    while time.monotonic() < end and not sh.errors:
        run_start = time.monotonic()
        run_end = min(end, run_start + rng.uniform(restart_every * 0.6, restart_every * 1.4))
        samples = []
        while time.monotonic() < run_end and not sh.errors:
            time.sleep(1.0)
            rss = rss_kb(broker.pid())
            if rss is not None:
                samples.append((round(time.monotonic() - run_start, 1), rss))
        warm = [r for t, r in samples if t >= 3.0] or [r for _, r in samples]
        if warm:
            report["rss_kb"].append({"run": broker.runs, "codec": broker.current_impl,
                                     "seconds": round(time.monotonic() - run_start, 1),
                                     "after_warmup": warm[0], "max": max(warm),
                                     "last": warm[-1]})
        if time.monotonic() >= end or sh.errors:
            break
        broker.stop(graceful=graceful_next)
        report["restarts"]["graceful" if graceful_next else "kill9"] += 1
        graceful_next = not graceful_next
        broker.start()
        report["messages_checked"] += verify(sh, port)
        report["verifications"] += 1


def _finish(args, sh, broker, port, report, start, work, v0_runs) -> dict:
    try:
        if not sh.errors:
            time.sleep(0.5)
            report["messages_checked"] += verify(sh, port)
            report["verifications"] += 1
            # v0 consumer runs: each in log order, all of them stored messages
            # (the v0 log's seqs strictly increase: membership by bisection).
            log_seqs = sh.last_v0_log
            for run_ in v0_runs:
                for a, b in zip(run_, run_[1:]):
                    if b <= a:
                        raise Failure("a v0 consumer received seq %d after %d" % (b, a))
                for q in run_:
                    i = bisect.bisect_left(log_seqs, q)
                    if i == len(log_seqs) or log_seqs[i] != q:
                        raise Failure("a v0 consumer received seq %d, which is not stored" % q)
        broker.stop(graceful=True)
    except Failure as exc:
        sh.errors.append(str(exc))
    except Exception:  # noqa: BLE001
        sh.errors.append("soak crashed: %s" % traceback.format_exc())
    finally:
        broker.kill_quietly()
    report["elapsed_s"] = round(time.monotonic() - start, 1)
    report["counts"] = dict(sh.counts)
    report["acked_messages"] = sum(n for a in sh.acked.values() for _, _, n, _ in a)
    report["broker_runs"] = broker.runs
    rss = report["rss_kb"]
    if rss:
        report["rss_first_after_warmup_kb"] = rss[0]["after_warmup"]
        report["rss_last_kb"] = rss[-1]["last"]
        report["rss_max_kb"] = max(r["max"] for r in rss)
        for r in rss:
            if r["max"] > args.max_rss_mb * 1024:
                sh.errors.append("broker RSS %d kB in run %d exceeds %d MB"
                                 % (r["max"], r["run"], args.max_rss_mb))
            if r["last"] - r["after_warmup"] > args.max_rss_growth_mb * 1024:
                sh.errors.append("broker RSS grew %d kB within run %d"
                                 % (r["last"] - r["after_warmup"], r["run"]))
    report["errors"] = sh.errors
    report["ok"] = not sh.errors
    if report["ok"] and not args.keep and not args.data_dir:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--impl", choices=("c", "py", "alternate"), default="alternate",
                    help="codec of the broker; alternate: switch at every restart")
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--restart-every", type=float, default=None,
                    help="mean seconds between broker restarts (default: run/6, at least 10)")
    ap.add_argument("--max-rss-mb", type=float, default=512)
    ap.add_argument("--max-rss-growth-mb", type=float, default=128)
    ap.add_argument("--data-dir", default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--broker-arg", action="append", default=[],
                    help="extra argument for 'serve' (repeatable), e.g. --broker-arg=--fsync=always")
    args = ap.parse_args()
    report = run(args)
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        for k, v in report.items():
            print("%-28s %s" % (k, v))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
