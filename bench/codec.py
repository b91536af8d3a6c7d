"""Codec throughput, Cython twin against the pure-Python reference.

Run: ``python bench/codec.py`` (about 20 s). Prints a markdown table; for
each operation and payload size, messages per second and MB/s for both
implementations measured in the same run, and their ratio.

- scan+CRC: ``FrameReader.feed`` over a stream of v0 PUB frames (one topic,
  so they coalesce) fed in 64 KiB chunks, as a socket would deliver them;
  every CRC is checked and every message becomes a bytes object.
- encode_deliveries: frame a batch of 1000 messages for a v0 consumer.
- encode_records: encode a batch of 1000 messages as log records.
- records_to_deliveries: verify 1000 stored records and frame them.
- v1 publish_records: check the CRCs of a 1000-message v1 ``PUB`` payload
  and turn it into finished log records, with offsets, time and record
  CRCs (the broker's loop thread; each record CRC continues the message's
  CRC over the 16 bytes of offset and time).
- v1 message_frame: verify 1000 stored records and frame them as one
  ``MSG`` (a consumer reading from a segment file).
- v1 decode_messages: a client checking a ``MSG`` frame's 1000 records and
  building a ``Message`` per record.

MB/s counts the bytes the operation reads: the wire stream for scan+CRC, the
payloads for the encoders, the record buffer for records_to_deliveries.
Each cell is the best of several timed runs within ~1 s per implementation,
the two implementations alternating so that both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker._pure import frames as py_frames, records as py_records  # noqa: E402
from broker._pure import wire1 as py_wire1  # noqa: E402

try:
    from broker._speedups import frames as c_frames, records as c_records  # noqa: E402
    from broker._speedups import wire1 as c_wire1  # noqa: E402
except ImportError as exc:  # pragma: no cover - depends on the build
    sys.exit("the Cython codec does not import (%s): build it with "
             "`pip install -e . --no-build-isolation`" % exc)

TOPIC = b"bench-topic"
BATCH = 1000
CHUNK = 64 * 1024
TARGETS = (
    "Targets (Cython, scan+CRC): >= 5 M msg/s at 64 B, >= 1.5 M msg/s at 1 KB, "
    ">= 10x pure at 64 B."
)


def _calibrate(fn) -> int:
    """Calls of ``fn`` that make one timed run last at least ~50 ms."""
    fn()  # warm up
    loops = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        if time.perf_counter() - t0 >= 0.05:
            return loops
        loops *= 2


def best_rates(fns, work_items, budget: float) -> list[float]:
    """Best items/s of each function, timed in alternation.

    Alternating the implementations within one time budget exposes both to
    the same machine state (shared or throttled CPUs vary by tens of per
    cent from second to second), so their ratio is meaningful even when
    the absolute numbers drift.
    """
    loops = [_calibrate(fn) for fn in fns]
    best = [float("inf")] * len(fns)
    deadline = time.perf_counter() + budget * len(fns)
    while True:
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(loops[k]):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / loops[k])
        if time.perf_counter() >= deadline:
            break
    return [items / t for items, t in zip(work_items, best)]


def scan_case(frames, payload: bytes):
    n = max(BATCH, (4 << 20) // (len(payload) + 24))  # ~4 MiB of stream
    stream = frames.encode_pub(TOPIC, payload) * n
    chunks = [stream[i:i + CHUNK] for i in range(0, len(stream), CHUNK)]
    FrameReader = frames.FrameReader

    def run():
        reader = FrameReader()
        feed = reader.feed
        count = 0
        for chunk in chunks:
            for _op, _topic, msgs in feed(chunk):
                count += len(msgs)
        assert count == n, count

    return run, n, len(stream) / n


def deliveries_case(frames, payload: bytes):
    msgs = [payload] * BATCH
    encode = frames.encode_deliveries
    return (lambda: encode(TOPIC, msgs)), BATCH, len(payload)


def records_case(records, payload: bytes):
    msgs = [payload] * BATCH
    encode = records.encode_records
    return (lambda: encode(msgs, 1_000_000, 1_712_345_678_901)), BATCH, len(payload)


def to_deliveries_case(records, payload: bytes):
    buf = py_records.encode_records([payload] * BATCH, 0, 1_712_345_678_901)
    convert = records.records_to_deliveries

    def run():
        out = convert(buf, TOPIC, 0, BATCH, 1 << 30)
        assert out[1] == BATCH

    return run, BATCH, len(buf) / BATCH


def _pub_payload(payload: bytes) -> bytes:
    frame = py_wire1.encode_publish(1, TOPIC, [payload] * BATCH)
    return frame[4 + py_wire1.FRAME_HEADER:]


def publish_records_case(codec, payload: bytes):
    body = _pub_payload(payload)
    convert = codec.wire1.publish_records

    def run():
        out = convert(body, 1_000_000, 1_712_345_678_901)
        assert out[2] == BATCH and out[3] == -1

    return run, BATCH, len(payload)


def message_frame_case(codec, payload: bytes):
    buf = py_records.encode_records([payload] * BATCH, 0, 1_712_345_678_901)
    frame = codec.wire1.message_frame

    def run():
        assert frame(buf, 1, TOPIC, 0, BATCH, 1 << 30)[1] == BATCH

    return run, BATCH, len(buf) / BATCH


def decode_messages_case(codec, payload: bytes):
    buf = py_records.encode_records([payload] * BATCH, 0, 1_712_345_678_901)
    frame = py_wire1.message_frame(buf, 1, TOPIC, 0, BATCH, 1 << 30)[0]
    body = frame[4 + py_wire1.FRAME_HEADER:]
    decode = codec.wire1.decode_messages
    from broker.client import Message

    def run():
        assert len(decode(body, "bench-topic", 0, Message)[0]) == BATCH

    return run, BATCH, len(buf) / BATCH


CASES = [
    ("scan+CRC", "frames", scan_case),
    ("encode_deliveries", "frames", deliveries_case),
    ("encode_records", "records", records_case),
    ("records_to_deliveries", "records", to_deliveries_case),
    ("v1 publish_records", "v1", publish_records_case),
    ("v1 message_frame", "v1", message_frame_case),
    ("v1 decode_messages", "v1", decode_messages_case),
]


class _V1:
    def __init__(self, wire1, records) -> None:
        self.wire1 = wire1
        self.records = records


IMPLS = {"frames": (c_frames, py_frames), "records": (c_records, py_records),
         "v1": (_V1(c_wire1, c_records), _V1(py_wire1, py_records))}


def fmt_rate(rate: float) -> str:
    return "%.2f M" % (rate / 1e6) if rate >= 1e6 else "%.0f k" % (rate / 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timed runs per cell (default 1)")
    args = parser.parse_args()

    print("# Codec benchmark\n")
    print("Python %s, %s, zlib %s, %d CPUs. %s\n" % (
        platform.python_version(), platform.machine(), zlib.ZLIB_RUNTIME_VERSION,
        os.cpu_count() or 0, TARGETS))
    print("| operation | payload | Cython msg/s | Cython MB/s | pure msg/s | pure MB/s | Cython/pure |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, module, case in CASES:
        for size in (64, 1024):
            payload = bytes(range(256)) * (size // 256) if size >= 256 else b"x" * size
            cells = [case(impl, payload) for impl in IMPLS[module]]
            c_rate, p_rate = best_rates([fn for fn, _, _ in cells],
                                        [n for _, n, _ in cells], args.budget)
            c_mb = c_rate * cells[0][2] / 1e6
            p_mb = p_rate * cells[1][2] / 1e6
            print("| %s | %s | %s | %.0f | %s | %.0f | %.1fx |" % (
                name, "%d B" % size if size < 1024 else "1 KB", fmt_rate(c_rate), c_mb,
                fmt_rate(p_rate), p_mb, c_rate / p_rate), flush=True)
    print("\nmsg/s counts messages: one coalesced OP_PUB event holds many.")
    from broker._speedups.frames import CRC32_KERNEL
    print("CRC-32: the pure twin calls zlib.crc32 (zlib %s: ~140-190 ns at 64 B, "
          "~0.45-0.85 us at 1 KB on the reference machine); the Cython twin uses %s "
          "(PCLMULQDQ folding: ~17 ns at 64 B, ~65 ns at 1 KB there)."
          % (zlib.ZLIB_RUNTIME_VERSION, CRC32_KERNEL))
    print(TARGETS)


if __name__ == "__main__":
    main()
