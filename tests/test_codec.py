"""The codec: FrameReader, encoders and the record format, on both twins.

Every behaviour test runs twice through the ``codec`` fixture: ``c`` is the
Cython extension (``broker._speedups``), ``py`` the pure-Python reference
(``broker._pure``). The ``c`` run fails, never skips, when the extension
does not import, unless PYLOGSTREAMS_NO_EXTENSIONS is set (a pure build).
The hypothesis tests at the end feed both twins the same random input and
require identical results.
"""

from __future__ import annotations

import importlib
import os
import random
import re
import struct
import subprocess
import sys
import tracemalloc
import types
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NO_EXTENSIONS = os.environ.get("PYLOGSTREAMS_NO_EXTENSIONS", "") not in ("", "0")
NO_EXTENSIONS_REASON = "PYLOGSTREAMS_NO_EXTENSIONS is set: pure build, Cython codec not tested"


def _load(param: str) -> types.SimpleNamespace:
    if param == "c":
        if NO_EXTENSIONS:
            pytest.skip(NO_EXTENSIONS_REASON)
        try:
            frames = importlib.import_module("broker._speedups.frames")
            records = importlib.import_module("broker._speedups.records")
        except ImportError as exc:
            pytest.fail("the Cython codec does not import (%s); build it with "
                        "`pip install -e . --no-build-isolation`" % exc, pytrace=False)
    else:
        frames = importlib.import_module("broker._pure.frames")
        records = importlib.import_module("broker._pure.records")
    return types.SimpleNamespace(name=param, frames=frames, records=records)


@pytest.fixture(params=["c", "py"])
def codec(request) -> types.SimpleNamespace:
    """The codec under test: ``.frames`` and ``.records`` of one twin."""
    return _load(request.param)


@pytest.fixture(scope="module")
def twins() -> tuple[types.SimpleNamespace, types.SimpleNamespace]:
    """Both twins, for the differential tests: (cython, pure)."""
    return _load("c"), _load("py")


# -- helpers ---------------------------------------------------------------

OP_CLOSE, OP_REG, OP_CID, OP_SUB, OP_SET, OP_PUB, OP_PNG = range(7)
OP_BADCRC, OP_UNKNOWN, OP_MALFORMED, OP_ERROR, OP_HEL = range(7, 12)


def u32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def frame(body: bytes) -> bytes:
    return u32(len(body)) + body


def pub(topic: bytes, msg: bytes, crc: int | None = None) -> bytes:
    body = b"PUB " + topic + b" " + msg
    return u32(len(body)) + body + u32(zlib.crc32(msg) if crc is None else crc)


def flatten(events: list) -> list:
    """Events with PUB batches expanded to one per message, so streams fed
    in different chunkings (which coalesce differently) can be compared."""
    out = []
    for op, a, b in events:
        if op == OP_PUB:
            out.extend((OP_PUB, a, m) for m in b)
        else:
            out.append((op, a, b))
    return out


def feed_all(reader, chunks) -> list:
    events = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    return events


def record(offset: int, ts: int, payload: bytes) -> bytes:
    """One record, written out by hand from the documented layout."""
    tail = offset.to_bytes(8, "big") + ts.to_bytes(8, "big") + payload
    return u32(4 + len(tail)) + u32(zlib.crc32(tail[:16], zlib.crc32(payload))) + tail


# -- FrameReader: each command and event kind -----------------------------

COMMANDS = [
    (frame(b"REG"), [(OP_REG, None, None)]),
    (frame(b"PNG"), [(OP_PNG, None, None)]),
    (frame(b"PNG extra"), [(OP_PNG, None, None)]),
    (frame(b"CID 1234-abcd"), [(OP_CID, b"1234-abcd", None)]),
    (frame(b"CID "), [(OP_MALFORMED, b"CID", "CID needs a client id")]),
    (frame(b"CID"), [(OP_MALFORMED, b"CID", "CID needs a client id")]),
    (frame(b"SUB orders"), [(OP_SUB, b"orders", None)]),
    (frame(b"SUB"), [(OP_MALFORMED, b"SUB", "SUB needs a topic")]),
    (frame(b"SET orders 0"), [(OP_SET, b"orders", b"0")]),
    (frame(b"SET orders -1"), [(OP_SET, b"orders", b"-1")]),
    (frame(b"SET orders 5 x"), [(OP_SET, b"orders", b"5 x")]),
    (frame(b"SET orders"), [(OP_MALFORMED, b"SET", "SET needs a topic and an offset")]),
    (frame(b"SET orders "), [(OP_MALFORMED, b"SET", "SET needs a topic and an offset")]),
    (frame(b"SET  0"), [(OP_MALFORMED, b"SET", "SET needs a topic and an offset")]),
    (frame(b"SET"), [(OP_MALFORMED, b"SET", "SET needs a topic and an offset")]),
    (frame(b"XYZ"), [(OP_UNKNOWN, b"XYZ", None)]),
    (frame(b"AB"), [(OP_UNKNOWN, b"AB", None)]),
    (frame(b"REGISTER-ME-PLEASE-NOW"), [(OP_UNKNOWN, b"REGISTER-ME-PLEA", None)]),
    (frame(b"png"), [(OP_UNKNOWN, b"png", None)]),
    (pub(b"t", b"hello world"), [(OP_PUB, b"t", [b"hello world"])]),
    (pub(b"t", b""), [(OP_PUB, b"t", [b""])]),
    (pub(b"t", b"x", crc=0), [(OP_BADCRC, b"t", 1)]),
    (pub(b"", b"x"), [(OP_MALFORMED, b"PUB", "PUB needs a topic and a message")]),
    (frame(b"PUB t") + u32(0), [(OP_MALFORMED, b"PUB", "PUB needs a topic and a message")]),
    (frame(b"PUB") + u32(0), [(OP_MALFORMED, b"PUB", "PUB needs a topic and a message")]),
    (frame(b"PUB ") + u32(0), [(OP_MALFORMED, b"PUB", "PUB needs a topic and a message")]),
    # "PUB..." always carries the trailer, even when it is not a real PUB
    (frame(b"PUBLISH t m") + u32(0), [(OP_MALFORMED, b"PUB", "PUB needs a topic and a message")]),
    (u32(0), [(OP_CLOSE, None, None)]),
]


@pytest.mark.parametrize("data,expected", COMMANDS, ids=[repr(c[0][4:20]) for c in COMMANDS])
def test_each_event_kind(codec, data, expected):
    reader = codec.frames.FrameReader()
    assert reader.feed(data) == expected
    assert reader.buffered == 0


def test_op_constants(codec):
    f = codec.frames
    assert [f.OP_CLOSE, f.OP_REG, f.OP_CID, f.OP_SUB, f.OP_SET, f.OP_PUB, f.OP_PNG,
            f.OP_BADCRC, f.OP_UNKNOWN, f.OP_MALFORMED, f.OP_ERROR, f.OP_HEL] == list(range(12))
    assert all(type(getattr(f, name)) is int for name in f.__all__ if name.startswith("OP_"))


def test_pub_message_may_contain_spaces_and_binary(codec):
    msg = b"a b  c \x00\xff\n "
    assert codec.frames.FrameReader().feed(pub(b"t", msg)) == [(OP_PUB, b"t", [msg])]


# -- coalescing ------------------------------------------------------------

def test_coalescing_same_topic(codec):
    data = pub(b"a", b"1") + pub(b"a", b"2") + pub(b"a", b"3")
    assert codec.frames.FrameReader().feed(data) == [(OP_PUB, b"a", [b"1", b"2", b"3"])]


def test_coalescing_breaks_on_topic_change(codec):
    data = pub(b"a", b"1") + pub(b"b", b"2") + pub(b"a", b"3") + pub(b"ab", b"4")
    assert codec.frames.FrameReader().feed(data) == [
        (OP_PUB, b"a", [b"1"]), (OP_PUB, b"b", [b"2"]),
        (OP_PUB, b"a", [b"3"]), (OP_PUB, b"ab", [b"4"]),
    ]


@pytest.mark.parametrize("between,event", [
    (frame(b"PNG"), (OP_PNG, None, None)),
    (frame(b"SUB a"), (OP_SUB, b"a", None)),
    (frame(b"???"), (OP_UNKNOWN, b"???", None)),
    (pub(b"a", b"bad", crc=1), (OP_BADCRC, b"a", 3)),
    (pub(b"", b"x"), (OP_MALFORMED, b"PUB", "PUB needs a topic and a message")),
])
def test_coalescing_breaks_on_any_other_event(codec, between, event):
    data = pub(b"a", b"1") + pub(b"a", b"2") + between + pub(b"a", b"3")
    assert codec.frames.FrameReader().feed(data) == [
        (OP_PUB, b"a", [b"1", b"2"]), event, (OP_PUB, b"a", [b"3"]),
    ]


def test_coalescing_does_not_span_feed_calls(codec):
    reader = codec.frames.FrameReader()
    assert reader.feed(pub(b"a", b"1")) == [(OP_PUB, b"a", [b"1"])]
    assert reader.feed(pub(b"a", b"2")) == [(OP_PUB, b"a", [b"2"])]


def test_coalescing_across_carried_frame(codec):
    # A frame completed from the carry buffer coalesces with the frames
    # parsed from the rest of the same chunk.
    data = pub(b"a", b"1") + pub(b"a", b"2") + pub(b"a", b"3")
    reader = codec.frames.FrameReader()
    assert reader.feed(data[:5]) == []
    assert reader.feed(data[5:]) == [(OP_PUB, b"a", [b"1", b"2", b"3"])]


# -- chunking --------------------------------------------------------------

STREAM = (frame(b"CID c1") + frame(b"SUB t") + pub(b"t", b"m1") + pub(b"t", b"m 2")
          + frame(b"PNG") + pub(b"u", b"x", crc=7) + pub(b"u", b"") + frame(b"SET t 0")
          + frame(b"???") + frame(b"REG"))
STREAM_EVENTS = [
    (OP_CID, b"c1", None), (OP_SUB, b"t", None), (OP_PUB, b"t", [b"m1", b"m 2"]),
    (OP_PNG, None, None), (OP_BADCRC, b"u", 1), (OP_PUB, b"u", [b""]),
    (OP_SET, b"t", b"0"), (OP_UNKNOWN, b"???", None), (OP_REG, None, None),
]


def test_stream_in_one_chunk(codec):
    assert codec.frames.FrameReader().feed(STREAM) == STREAM_EVENTS


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_chunking_at_every_split_point(codec, kind):
    expected = flatten(STREAM_EVENTS)
    for i in range(len(STREAM) + 1):
        reader = codec.frames.FrameReader()
        first = reader.feed(kind(STREAM[:i]))
        assert reader.buffered == i - sum(len(e) for e in _frame_ends(STREAM, i))
        assert flatten(first + reader.feed(kind(STREAM[i:]))) == expected, i
        assert reader.buffered == 0


def _frame_ends(stream: bytes, limit: int) -> list[bytes]:
    """The whole frames of ``stream`` that end at or before ``limit``."""
    out, pos = [], 0
    while pos + 4 <= len(stream):
        n = int.from_bytes(stream[pos:pos + 4], "big")
        total = 4 + n + (4 if stream[pos + 4:pos + 7] == b"PUB" else 0)
        if pos + total > limit:
            break
        out.append(stream[pos:pos + total])
        pos += total
    return out


def test_chunking_at_every_pair_of_split_points(codec):
    expected = flatten(STREAM_EVENTS)
    n = len(STREAM)
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1):
            reader = codec.frames.FrameReader()
            chunks = [STREAM[:i], STREAM[i:j], STREAM[j:]]
            assert flatten(feed_all(reader, chunks)) == expected, (i, j)


def test_byte_by_byte(codec):
    reader = codec.frames.FrameReader()
    events = feed_all(reader, [STREAM[i:i + 1] for i in range(len(STREAM))])
    assert flatten(events) == flatten(STREAM_EVENTS)


@pytest.mark.parametrize("data", [f for f, _ in COMMANDS if f != u32(0)],
                         ids=[repr(c[0][4:20]) for c in COMMANDS if c[0] != u32(0)])
def test_frame_cut_anywhere(codec, data):
    expected = codec.frames.FrameReader().feed(data)
    for cut in range(len(data)):
        reader = codec.frames.FrameReader()
        assert reader.feed(data[:cut]) == []
        assert reader.buffered == cut
        assert reader.feed(data[cut:]) == expected
        assert reader.buffered == 0


def test_large_frame_in_many_chunks(codec):
    msg = bytes(range(256)) * 4096  # 1 MiB
    first = pub(b"big", msg)
    data = first + frame(b"PNG")
    reader = codec.frames.FrameReader(max_frame_bytes=2 << 20)
    step = 4093
    events = []
    for pos in range(0, len(data), step):
        events.extend(reader.feed(data[pos:pos + step]))
        if pos + step < len(first):
            assert events == []
            assert reader.buffered == pos + step
    assert events == [(OP_PUB, b"big", [msg]), (OP_PNG, None, None)]
    assert reader.buffered == 0


def test_empty_feed(codec):
    reader = codec.frames.FrameReader()
    assert reader.feed(b"") == []
    assert reader.feed(STREAM[:3]) == []
    assert reader.feed(b"") == []
    assert reader.buffered == 3


def test_feed_rejects_non_buffers(codec):
    reader = codec.frames.FrameReader()
    with pytest.raises(TypeError):
        reader.feed("REG")
    with pytest.raises(TypeError):
        reader.feed(5)
    assert reader.feed(frame(b"REG")) == [(OP_REG, None, None)]


# -- limits, errors, close ---------------------------------------------------

def test_max_frame_bytes_validation(codec):
    with pytest.raises(ValueError):
        codec.frames.FrameReader(max_frame_bytes=15)
    reader = codec.frames.FrameReader(max_frame_bytes=16)
    assert reader.max_frame_bytes == 16
    assert codec.frames.FrameReader().max_frame_bytes == 1 << 20


def test_frame_at_limit_is_accepted(codec):
    reader = codec.frames.FrameReader(max_frame_bytes=20)
    body = b"CID " + b"x" * 16
    assert reader.feed(frame(body)) == [(OP_CID, b"x" * 16, None)]
    # the PUB trailer does not count towards the limit
    msg = b"m" * 14
    assert reader.feed(pub(b"t", msg)) == [(OP_PUB, b"t", [msg])]


def test_frame_over_limit_breaks_the_reader(codec):
    reader = codec.frames.FrameReader(max_frame_bytes=20)
    data = frame(b"REG") + frame(b"CID " + b"x" * 17) + frame(b"PNG")
    assert reader.feed(data) == [
        (OP_REG, None, None), (OP_ERROR, "frame length 21 exceeds limit 20", None),
    ]
    assert reader.broken
    assert reader.buffered == 0
    assert reader.feed(frame(b"PNG")) == []


def test_huge_length_prefix_does_not_allocate(codec):
    reader = codec.frames.FrameReader()
    assert reader.feed(b"\xff\xff\xff\xff") == [
        (OP_ERROR, "frame length 4294967295 exceeds limit 1048576", None),
    ]
    assert reader.broken and reader.buffered == 0
    assert reader.feed(b"\x00" * 100) == []


def test_length_prefix_under_limit_allocates_only_what_arrived(codec):
    # A 4-byte prefix claiming 512 MiB (under a 1 GiB limit) must not make
    # the reader reserve 512 MiB: memory follows the bytes received.
    reader = codec.frames.FrameReader(max_frame_bytes=1 << 30)
    tracemalloc.start()
    try:
        assert reader.feed(u32(512 << 20) + b"CID xyz") == []
        assert reader.feed(b"z" * 1000) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.buffered == 1011
    assert peak < 1 << 20


def test_limit_is_checked_on_the_prefix_alone(codec):
    reader = codec.frames.FrameReader(max_frame_bytes=100)
    assert reader.feed(u32(50)[:2]) == []
    assert reader.feed(b"\x00\x65") == [(OP_ERROR, "frame length 101 exceeds limit 100", None)]


def test_zero_length_frame_closes(codec):
    reader = codec.frames.FrameReader()
    data = pub(b"t", b"1") + u32(0) + frame(b"REG") + b"garbage"
    assert reader.feed(data) == [(OP_PUB, b"t", [b"1"]), (OP_CLOSE, None, None)]
    assert reader.broken
    assert reader.buffered == 0
    assert reader.feed(frame(b"PNG")) == []


def test_close_completed_from_carry(codec):
    reader = codec.frames.FrameReader()
    assert reader.feed(b"\x00\x00") == []
    assert reader.feed(b"\x00\x00" + frame(b"REG")) == [(OP_CLOSE, None, None)]
    assert reader.broken and reader.buffered == 0


def test_crc_mismatch(codec):
    good = pub(b"t", b"payload")
    bad = bytearray(good)
    bad[-1] ^= 1
    reader = codec.frames.FrameReader()
    assert reader.feed(bytes(bad) + good) == [
        (OP_BADCRC, b"t", 7), (OP_PUB, b"t", [b"payload"]),
    ]
    assert not reader.broken


def test_crc_of_a_large_message(codec):
    # Over 1 MiB: the Cython twin computes this CRC without the GIL (over
    # 64 KiB where it hashes with zlib)
    msg = os.urandom(1_200_000)
    reader = codec.frames.FrameReader(max_frame_bytes=2 << 20)
    assert reader.feed(pub(b"t", msg)) == [(OP_PUB, b"t", [msg])]
    assert reader.feed(pub(b"t", msg, crc=zlib.crc32(msg) ^ 1)) == [
        (OP_BADCRC, b"t", len(msg)),
    ]


# -- HEL: a first frame of type HEL hands the connection to protocol v1 ------

def test_hel_first_frame_detaches(codec):
    reader = codec.frames.FrameReader()
    data = frame(b"HEL 1") + frame(b"whatever v1 sends") + b"\xff\xff"
    assert reader.feed(data) == [(OP_HEL, None, None)]
    assert not reader.broken
    assert reader.buffered == len(data)
    assert reader.feed(b"more") == []           # collected, not parsed
    assert reader.buffered == len(data) + 4
    assert reader.detach() == data + b"more"
    assert reader.broken and reader.buffered == 0
    assert reader.feed(frame(b"REG")) == []
    with pytest.raises(RuntimeError):
        reader.detach()


def test_hel_at_every_split_point(codec):
    data = frame(b"HEL") + pub(b"t", b"m") + frame(b"REG")
    for cut in range(len(data) + 1):
        reader = codec.frames.FrameReader()
        events = reader.feed(data[:cut]) + reader.feed(data[cut:])
        assert events == [(OP_HEL, None, None)], cut
        assert reader.detach() == data


def test_hel_is_only_special_first(codec):
    reader = codec.frames.FrameReader()
    assert reader.feed(frame(b"REG") + frame(b"HEL")) == [
        (OP_REG, None, None), (OP_UNKNOWN, b"HEL", None)]
    reader = codec.frames.FrameReader()
    assert reader.feed(frame(b"HE") + frame(b"HEL")) == [
        (OP_UNKNOWN, b"HE", None), (OP_UNKNOWN, b"HEL", None)]
    reader = codec.frames.FrameReader()  # the command is the first 3 bytes
    assert reader.feed(frame(b"HELLO")) == [(OP_HEL, None, None)]
    reader = codec.frames.FrameReader()
    assert reader.feed(u32(0) + frame(b"HEL")) == [(OP_CLOSE, None, None)]


def test_detach_without_hel(codec):
    reader = codec.frames.FrameReader()
    reader.feed(frame(b"REG"))
    with pytest.raises(RuntimeError):
        reader.detach()


def test_hel_then_large_input_is_collected(codec):
    reader = codec.frames.FrameReader(max_frame_bytes=16)
    data = frame(b"HEL") + os.urandom(300_000)  # no limit once detached
    assert feed_all(reader, [data[i:i + 1000] for i in range(0, len(data), 1000)]) == [
        (OP_HEL, None, None)]
    assert reader.detach() == data


# -- encoders ----------------------------------------------------------------

def test_crc32_matches_zlib(codec):
    crc32 = codec.frames.crc32
    for data in (b"", b"a", b"hello world", os.urandom(100_000)):
        assert crc32(data) == zlib.crc32(data)
        assert crc32(bytearray(data)) == zlib.crc32(data)
        assert crc32(memoryview(data)) == zlib.crc32(data)
        assert crc32(data, 12345) == zlib.crc32(data, 12345)
        assert crc32(data, -1) == zlib.crc32(data, -1)
        assert crc32(data, 1 << 40) == zlib.crc32(data, 1 << 40)
    assert crc32(b"123456789") == 0xCBF43926  # the CRC-32 check value
    with pytest.raises(TypeError):
        crc32("text")



def test_crc32_every_length_and_alignment(codec):
    # The Cython twin folds 16-byte blocks with PCLMULQDQ from 64 bytes up
    # and hands the rest to zlib: cover both sides of each block edge, the
    # 4-lane loop, the single-block loop and the tail, at every alignment,
    # with and without a running CRC.
    crc32 = codec.frames.crc32
    data = bytes(random.Random(5).getrandbits(8) for _ in range(1200))
    view = memoryview(data)
    for length in range(0, 1100):
        for offset in range(16):
            part = view[offset:offset + length]
            assert crc32(part) == zlib.crc32(part), (length, offset)
        part = view[3:3 + length]
        assert crc32(part, 0xDEADBEEF) == zlib.crc32(part, 0xDEADBEEF), length


def test_crc32_large_buffers_and_chaining(codec):
    # Over 1 MiB (64 KiB with zlib) the GIL is released; chaining pieces
    # must give the CRC of the whole.
    crc32 = codec.frames.crc32
    data = os.urandom((1 << 20) + 3 * 65536 + 77)
    assert crc32(data) == zlib.crc32(data)
    crc = 0
    for cut in range(0, len(data), 400_000):
        crc = crc32(data[cut:cut + 400_000], crc)
    assert crc == zlib.crc32(data)


def test_crc32_kernel_is_the_fastest_the_cpu_allows(codec):
    # A build or CPU probe that silently falls back to zlib would still
    # pass every other test: name the kernel and check it against the CPU.
    kernel = codec.frames.CRC32_KERNEL
    if codec.name == "py":
        assert kernel == "zlib"
        return
    flags: set[str] = set()
    if sys.platform.startswith("linux") and os.path.exists("/proc/cpuinfo"):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if os.uname().machine == "x86_64" and {"pclmulqdq", "sse4_1"} <= flags:
        assert kernel == "pclmulqdq"
    elif flags:
        assert kernel == "zlib"
    else:
        assert kernel in ("pclmulqdq", "zlib")


def _gf2_mod(value: int, poly: int) -> int:
    while value.bit_length() >= poly.bit_length():
        value ^= poly << (value.bit_length() - poly.bit_length())
    return value


def _gf2_div(value: int, poly: int) -> int:
    quotient = 0
    while value.bit_length() >= poly.bit_length():
        shift = value.bit_length() - poly.bit_length()
        quotient |= 1 << shift
        value ^= poly << shift
    return quotient


def _reflect(value: int, bits: int) -> int:
    return int(format(value, "0%db" % bits)[::-1], 2)


def test_crc32_clmul_constants_follow_from_the_polynomial():
    # crc32_clmul.h spells its folding constants in hex; derive each from
    # the CRC-32 polynomial (x^k mod P, bit-reflected, shifted left by one;
    # P and floor(x^64 / P) bit-reflected) and find it in the header.
    header = (Path(__file__).resolve().parent.parent
              / "broker" / "_speedups" / "crc32_clmul.h").read_text()
    poly = 0x104C11DB7
    wanted = {"k1": _reflect(_gf2_mod(1 << (4 * 128 + 32), poly), 32) << 1,
              "k2": _reflect(_gf2_mod(1 << (4 * 128 - 32), poly), 32) << 1,
              "k3": _reflect(_gf2_mod(1 << (128 + 32), poly), 32) << 1,
              "k4": _reflect(_gf2_mod(1 << (128 - 32), poly), 32) << 1,
              "k5": _reflect(_gf2_mod(1 << 64, poly), 32) << 1,
              "P": _reflect(poly, 33),
              "mu": _reflect(_gf2_div(1 << 64, poly), 33)}
    spelled = {int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{9,10})LL", header)}
    assert spelled == set(wanted.values()), {
        k: hex(v) for k, v in wanted.items() if v not in spelled}


def test_encode_frame(codec):
    enc = codec.frames.encode_frame
    assert enc(b"REG") == b"\x00\x00\x00\x03REG"
    assert enc(b"") == b"\x00\x00\x00\x00"
    assert enc(bytearray(b"ab")) == b"\x00\x00\x00\x02ab"
    assert enc(memoryview(b"xabx")[1:3]) == b"\x00\x00\x00\x02ab"
    uid = b"0f8fad5b-d9cb-469f-a165-70867728950e"
    assert enc(uid) == b"\x00\x00\x00\x24" + uid


def test_encode_pub(codec):
    # crc32(b"hello") == 0x3610a686
    assert codec.frames.encode_pub(b"news", b"hello") == (
        b"\x00\x00\x00\x0ePUB news hello\x36\x10\xa6\x86")
    assert codec.frames.encode_pub(bytearray(b"t"), memoryview(b"")) == (
        b"\x00\x00\x00\x06PUB t \x00\x00\x00\x00")
    with pytest.raises(TypeError):
        codec.frames.encode_pub(b"t", "text")


def test_encode_deliveries(codec):
    enc = codec.frames.encode_deliveries
    assert enc(b"t", [b"a", b"bc", b""]) == (
        b"\x00\x00\x00\x03t a" b"\x00\x00\x00\x04t bc" b"\x00\x00\x00\x02t ")
    assert enc(b"t", []) == b""
    assert enc(b"t", (m for m in [bytearray(b"x"), memoryview(b"yz")])) == (
        b"\x00\x00\x00\x03t x" b"\x00\x00\x00\x04t yz")
    with pytest.raises(TypeError):
        enc(b"t", [b"ok", "text"])


def test_encoders_feed_the_reader(codec):
    f = codec.frames
    data = (f.encode_frame(b"CID x") + f.encode_pub(b"t", b"1") + f.encode_pub(b"t", b"2")
            + f.encode_frame(b""))
    assert f.FrameReader().feed(data) == [
        (OP_CID, b"x", None), (OP_PUB, b"t", [b"1", b"2"]), (OP_CLOSE, None, None),
    ]


# -- records: encoding -------------------------------------------------------

def test_record_layout(codec):
    # Hand-written: length 20 + 2, CRC of the payload continued over offset
    # and time, offset 7, time 1000, "hi"
    head = b"\x00\x00\x00\x00\x00\x00\x00\x07" b"\x00\x00\x00\x00\x00\x00\x03\xe8"
    assert zlib.crc32(head, zlib.crc32(b"hi")) == 0x644F2E82
    expected = b"\x00\x00\x00\x16" + b"\x64\x4f\x2e\x82" + head + b"hi"
    assert codec.records.encode_records([b"hi"], 7, 1000) == expected
    assert codec.records.HEADER_SIZE == 24


def test_record_crc_any_offset_time_and_payload(codec):
    # The record CRC's tail (16 bytes of offset and time) has its own path
    # in the compiled codec (one PCLMULQDQ reduction): every bit of offset
    # and time, continued from many payload CRCs, against zlib.
    rng = random.Random(16)
    cases = [(0, 0), ((1 << 64) - 1, (1 << 64) - 1)] + [
        (1 << k, rng.getrandbits(64)) for k in range(64)] + [
        (rng.getrandbits(64), 1 << k) for k in range(64)] + [
        (rng.getrandbits(64), rng.getrandbits(64)) for _ in range(300)]
    for i, (off, ts) in enumerate(cases):
        msg = rng.randbytes(rng.choice([0, 1, 15, 16, 17, 63, 64, 100, 1024]))
        rec = record(off, ts, msg)
        assert codec.records.encode_records([msg], off, ts) == rec, (off, ts, len(msg))
        assert codec.records.scan_records(rec, off) == (1, len(rec))
        bad = bytearray(rec)
        bad[8 + i % 16] ^= 1 << (i % 8)  # one bit of offset or time
        # the offset the header now claims: only the CRC can refuse it
        assert codec.records.scan_records(bytes(bad), int.from_bytes(bad[8:16], "big")) == (0, 0)


def test_encode_records_batch(codec):
    msgs = [b"", b"a", b"bb" * 100, bytearray(b"ba"), memoryview(b"mv")]
    expected = b"".join(record(5 + i, 42, bytes(m)) for i, m in enumerate(msgs))
    assert codec.records.encode_records(msgs, 5, 42) == expected
    assert codec.records.encode_records(iter(msgs), 5, 42) == expected
    assert codec.records.encode_records([], 5, 42) == b""
    big = os.urandom(100_000)
    assert codec.records.encode_records([big], 0, 0) == record(0, 0, big)


def test_encode_records_u64_limits(codec):
    top = 2**64 - 1
    assert codec.records.encode_records([b"x"], top, top) == record(top, top, b"x")
    with pytest.raises(struct.error):
        codec.records.encode_records([b"x", b"y"], top, 0)  # offset 2**64
    with pytest.raises(struct.error):
        codec.records.encode_records([b"x"], -1, 0)
    with pytest.raises(struct.error):
        codec.records.encode_records([b"x"], 0, -1)
    with pytest.raises(TypeError):
        codec.records.encode_records(["text"], 0, 0)


# -- records: scanning, truncation, bit flips ---------------------------------

MSGS = [b"first", b"", b"third message", b"x" * 300, b"last"]


def _positions(msgs, base=0):
    pos, out = 0, []
    for m in msgs:
        out.append(pos)
        pos += 24 + len(m)
    return out + [pos]


def test_scan_records_round_trip(codec):
    r = codec.records
    buf = r.encode_records(MSGS, 100, 7)
    ends = _positions(MSGS)
    assert r.scan_records(buf, 100) == (5, len(buf))
    assert r.scan_records(buf, 102, ends[2]) == (3, len(buf))
    assert r.scan_records(buf, 101) == (0, 0)          # offsets must match
    assert r.scan_records(buf, 100, len(buf)) == (0, len(buf))
    assert r.scan_records(buf, 100, len(buf) + 50) == (0, len(buf) + 50)
    assert r.scan_records(b"", 0) == (0, 0)
    assert r.scan_records(bytearray(buf), 100) == (5, len(buf))
    assert r.scan_records(memoryview(buf)[:ends[3]], 100) == (3, ends[3])


def test_scan_records_truncated_anywhere(codec):
    r = codec.records
    buf = r.encode_records(MSGS, 0, 0)
    ends = _positions(MSGS)
    for cut in range(len(buf) + 1):
        whole = max(i for i, e in enumerate(ends) if e <= cut)
        assert r.scan_records(buf[:cut], 0) == (whole, ends[whole]), cut


def test_scan_records_bit_flips(codec):
    r = codec.records
    msgs = [b"ab", b"cde", b"f"]
    buf = r.encode_records(msgs, 10, 99)
    ends = _positions(msgs)
    for i in range(len(buf)):
        for bit in (0, 3, 7):
            bad = bytearray(buf)
            bad[i] ^= 1 << bit
            k = max(j for j, e in enumerate(ends) if e <= i)  # damaged record
            assert r.scan_records(bytes(bad), 10) == (k, ends[k]), (i, bit)


def test_scan_records_garbage_after_valid_prefix(codec):
    r = codec.records
    buf = r.encode_records(MSGS, 0, 0)
    assert r.scan_records(buf + b"\x00" * 30, 0) == (5, len(buf))
    assert r.scan_records(buf + os.urandom(100), 0)[1] == len(buf)


def test_scan_records_rejects_negative_arguments(codec):
    buf = codec.records.encode_records(MSGS, 0, 0)
    with pytest.raises(ValueError):
        codec.records.scan_records(buf, -1)
    with pytest.raises(ValueError):
        codec.records.scan_records(buf, 0, -24)


def test_scan_records_offset_at_u64_max(codec):
    r = codec.records
    top = 2**64 - 1
    buf = r.encode_records([b"a"], top, 0) + record(0, 0, b"b")
    assert r.scan_records(buf, top) == (1, 25)  # offset 2**64 can't follow
    assert r.scan_records(buf, 2**64) == (0, 0)


# -- records: decoding ---------------------------------------------------------

def test_decode_records(codec):
    r = codec.records
    buf = r.encode_records(MSGS, 100, 7)
    ends = _positions(MSGS)
    assert r.decode_records(buf, 0, 2**64) == (
        [(100 + i, 7, m) for i, m in enumerate(MSGS)], len(buf))
    assert r.decode_records(buf, 101, 103) == ([(101, 7, b""), (102, 7, b"third message")],
                                               ends[3])
    assert r.decode_records(buf, 102, 200, ends[1]) == (
        [(102 + i, 7, m) for i, m in enumerate(MSGS[2:])], len(buf))
    assert r.decode_records(buf, 0, 100) == ([], 0)
    assert r.decode_records(buf[:ends[2] + 10], 0, 200) == (
        [(100, 7, b"first"), (101, 7, b"")], ends[2])
    assert r.decode_records(buf, 2**70, 2**71) == ([], len(buf))
    assert r.decode_records(buf, -5, -1) == ([], 0)
    payloads = r.decode_records(memoryview(buf), 0, 2**64)[0]
    assert all(type(p) is bytes for _, _, p in payloads)


def test_decode_records_corruption(codec):
    r = codec.records
    buf = bytearray(r.encode_records(MSGS, 0, 0))
    ends = _positions(MSGS)
    buf[ends[2] + 30] ^= 0x40  # payload of record 2
    with pytest.raises(r.CorruptRecordError) as info:
        r.decode_records(bytes(buf), 0, 100)
    assert info.value.position == ends[2]
    assert info.value.reason == "checksum mismatch"
    assert str(info.value) == "corrupt record at byte %d: checksum mismatch" % ends[2]
    assert isinstance(info.value, ValueError)
    # a corrupt record at or past end_offset is never looked at
    assert r.decode_records(bytes(buf), 0, 2) == ([(0, 0, b"first"), (1, 0, b"")], ends[2])

    short = record(0, 0, b"ok") + u32(19) + b"\x00" * 20
    with pytest.raises(r.CorruptRecordError) as info:
        r.decode_records(short, 0, 100)
    assert (info.value.position, info.value.reason) == (26, "length 19 below minimum")


def test_corrupt_record_error(codec):
    err = codec.records.CorruptRecordError(12, "checksum mismatch")
    assert isinstance(err, ValueError)
    assert (err.position, err.reason) == (12, "checksum mismatch")
    assert str(err) == "corrupt record at byte 12: checksum mismatch"
    with pytest.raises(ValueError):
        raise err


# -- records: index entries ---------------------------------------------------

def test_index_entries(codec):
    r = codec.records
    msgs = [b"x" * 10] * 6  # 34-byte records
    buf = r.encode_records(msgs, 1000, 0)

    def entry(rel, pos):
        return rel.to_bytes(4, "big") + pos.to_bytes(4, "big")

    assert r.index_entries(buf, 0, 0, 1, 1000) == (
        b"".join(entry(i, 34 * i) for i in range(6)), 34 * 5 + 1)
    assert r.index_entries(buf, 500, 500, 70, 1000) == (
        entry(0, 500) + entry(3, 602), 672)
    assert r.index_entries(buf, 500, 10_000, 70, 1000) == (b"", 10_000)
    assert r.index_entries(b"", 0, 0, 4096, 0) == (b"", 0)
    with pytest.raises(struct.error):
        r.index_entries(buf, 0, 0, 1, 1001)  # offset below the segment base
    with pytest.raises(struct.error):
        r.index_entries(buf, 2**32, 0, 1, 1000)  # position past u32
    assert r.index_entries(buf, 2**70, 2**71, 1, 0) == (b"", 2**71)


# -- records: deliveries -------------------------------------------------------

def test_records_to_deliveries(codec):
    r = codec.records
    buf = r.encode_records([b"a", b"bb", b"ccc"], 10, 0)
    ends = _positions([b"a", b"bb", b"ccc"])
    all_frames = b"\x00\x00\x00\x03t a" b"\x00\x00\x00\x04t bb" b"\x00\x00\x00\x05t ccc"
    assert r.records_to_deliveries(buf, b"t", 10, 100, 1 << 20) == (
        all_frames, 3, 13, len(buf))
    assert r.records_to_deliveries(buf, b"t", 11, 12, 1 << 20) == (
        b"\x00\x00\x00\x04t bb", 1, 12, ends[2])
    assert r.records_to_deliveries(buf, b"t", 0, 10, 1 << 20) == (b"", 0, 0, 0)
    assert r.records_to_deliveries(buf, b"t", 20, 100, 1 << 20) == (b"", 0, 20, len(buf))
    assert r.records_to_deliveries(buf, bytearray(b"t"), 10, 100, 1 << 20, ends[1]) == (
        all_frames[7:], 2, 13, len(buf))


def test_records_to_deliveries_max_bytes(codec):
    r = codec.records
    buf = r.encode_records([b"a", b"bb", b"ccc"], 10, 0)
    ends = _positions([b"a", b"bb", b"ccc"])
    d = r.records_to_deliveries
    # frames are 7, 8 and 9 bytes
    assert d(buf, b"t", 10, 100, 0)[:2] == (b"\x00\x00\x00\x03t a", 1)   # at least one
    assert d(buf, b"t", 10, 100, -5)[1:] == (1, 11, ends[1])
    assert d(buf, b"t", 10, 100, 14)[1:] == (1, 11, ends[1])
    assert d(buf, b"t", 10, 100, 15)[1:] == (2, 12, ends[2])             # exactly fits
    assert d(buf, b"t", 10, 100, 23)[1:] == (2, 12, ends[2])
    assert d(buf, b"t", 10, 100, 24)[1:] == (3, 13, len(buf))
    assert d(buf, b"t", 11, 100, 8)[1:] == (1, 12, ends[2])              # skipped ones are free
    assert d(buf, b"t", 10, 100, 2**80)[1:] == (3, 13, len(buf))


def test_records_to_deliveries_corruption(codec):
    r = codec.records
    buf = bytearray(r.encode_records([b"a", b"bb", b"ccc"], 10, 0))
    ends = _positions([b"a", b"bb", b"ccc"])
    buf[ends[1] + 25] ^= 1
    with pytest.raises(r.CorruptRecordError) as info:
        r.records_to_deliveries(bytes(buf), b"t", 10, 100, 1 << 20)
    assert (info.value.position, info.value.reason) == (ends[1], "checksum mismatch")
    # end_offset stops before the bad record is checked; max_bytes does not
    assert r.records_to_deliveries(bytes(buf), b"t", 10, 11, 1 << 20)[1:] == (1, 11, ends[1])
    with pytest.raises(r.CorruptRecordError):
        r.records_to_deliveries(bytes(buf), b"t", 10, 100, 1)
    with pytest.raises(ValueError):
        r.records_to_deliveries(bytes(buf), b"t", 10, 100, 1, -1)
    # verify=False (the broker's own batches in memory) skips the CRC only:
    # the record goes out as it is; lengths are still checked.
    out = r.records_to_deliveries(bytes(buf), b"t", 10, 100, 1 << 20, 0, False)
    assert out[1:] == (3, 13, len(buf))
    assert out[0] == b"".join(len(b"t " + m).to_bytes(4, "big") + b"t " + m
                              for m in (b"a", b"b" + bytes([ord("b") ^ 1]), b"ccc"))
    short = bytearray(buf)
    short[0:4] = (19).to_bytes(4, "big")
    with pytest.raises(r.CorruptRecordError, match="below minimum"):
        r.records_to_deliveries(bytes(short), b"t", 10, 100, 1 << 20, 0, False)


def test_records_to_deliveries_matches_encode_deliveries(codec):
    msgs = [os.urandom(n) for n in (0, 1, 50, 70_000)]
    buf = codec.records.encode_records(msgs, 0, 0)
    frames, count, nxt, pos = codec.records.records_to_deliveries(buf, b"topic", 0, 10, 1 << 30)
    assert frames == codec.frames.encode_deliveries(b"topic", msgs)
    assert (count, nxt, pos) == (4, 4, len(buf))


# -- the default build loads the compiled codec ----------------------------------

def _implementation(no_extensions: str | None, what: str = "broker.codec.IMPLEMENTATION") -> str:
    import broker
    env = {k: v for k, v in os.environ.items() if k != "PYLOGSTREAMS_NO_EXTENSIONS"}
    if no_extensions is not None:
        env["PYLOGSTREAMS_NO_EXTENSIONS"] = no_extensions
    # Run next to the broker package the tests import, so the subprocess
    # sees the same build.
    root = Path(broker.__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", "import broker.codec, broker.storage; print(%s)" % what],
        cwd=root, env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


def test_default_install_loads_cython():
    """A broken build must not hide behind the pure fallback."""
    if NO_EXTENSIONS:
        pytest.skip(NO_EXTENSIONS_REASON)
    assert _implementation(None) == "cython"
    assert _implementation("0") == "cython"
    assert _implementation("1") == "python"


def test_default_install_loads_the_compiled_writer():
    """The writer's compiled build goes with the Cython codec (and its absence is a
    test failure, not a silent fallback to writer.py)."""
    if NO_EXTENSIONS:
        pytest.skip(NO_EXTENSIONS_REASON)
    assert _implementation(None, "broker.storage.DiskWriter.__module__") == "broker._speedups.writer"
    assert _implementation("1", "broker.storage.DiskWriter.__module__") == "broker.storage.writer"


# -- differential tests: both twins, same random input ---------------------------

TOPICS = [b"a", b"b", b"topic", b"a b"]  # "a b": the space moves into the message


@st.composite
def frame_pieces(draw):
    kind = draw(st.sampled_from(
        ["pub"] * 6 + ["badcrc", "cmd", "cmd", "garbage", "oversize", "close", "raw"]))
    if kind == "pub":
        return pub(draw(st.sampled_from(TOPICS)), draw(st.binary(max_size=40)))
    if kind == "badcrc":
        msg = draw(st.binary(max_size=20))
        return pub(draw(st.sampled_from(TOPICS)), msg, crc=zlib.crc32(msg) ^ 0x10)
    if kind == "cmd":
        return frame(draw(st.sampled_from([
            b"REG", b"PNG", b"CID abc", b"CID", b"SUB a", b"SUB ", b"SET a 0", b"SET a",
            b"SET a ", b"SET  1", b"XYZ", b"AB", b"A", b"PUBX", b"QQQQ z", b"SUBX a",
        ])))
    if kind == "garbage":
        return draw(st.binary(max_size=12))
    if kind == "oversize":
        return u32(draw(st.sampled_from([0xFFFFFFFF, 1 << 20 | 1, 70, 65])))
    if kind == "close":
        return u32(0)
    # raw: a frame with a random body, possibly starting with "PUB"
    body = draw(st.sampled_from([b"", b"PUB", b"PUB "])) + draw(st.binary(max_size=30))
    return u32(len(body)) + body + draw(st.binary(max_size=4))


@st.composite
def chunked_streams(draw):
    first = draw(st.sampled_from([b"", b"", b"", frame(b"HEL 1"), frame(b"HEL"), b"\x00\x00\x00\x03HE"]))
    data = first + b"".join(draw(st.lists(frame_pieces(), max_size=25)))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    bounds = [0] + cuts + [len(data)]
    chunks = [data[a:b] for a, b in zip(bounds, bounds[1:])]
    return chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=chunked_streams(), limit=st.sampled_from([16, 64, 1 << 20]),
       kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_frame_reader_twins_agree(twins, chunks, limit, kind):
    c, py = twins
    rc, rp = c.frames.FrameReader(limit), py.frames.FrameReader(limit)
    detached = False
    for chunk in chunks:
        events = rc.feed(kind(chunk))
        assert events == rp.feed(kind(chunk))
        assert (rc.buffered, rc.broken) == (rp.buffered, rp.broken)
        detached = detached or (OP_HEL, None, None) in events
    if detached:
        assert rc.detach() == rp.detach()


@settings(max_examples=100, deadline=None)
@given(topic=st.binary(max_size=10), msgs=st.lists(st.binary(max_size=50), max_size=10),
       body=st.binary(max_size=50), value=st.integers(-2**40, 2**40))
def test_encoders_twins_agree(twins, topic, msgs, body, value):
    c, py = twins
    assert c.frames.encode_frame(body) == py.frames.encode_frame(body)
    assert c.frames.encode_deliveries(topic, msgs) == py.frames.encode_deliveries(topic, msgs)
    assert c.frames.crc32(body, value) == py.frames.crc32(body, value)
    if msgs:
        assert c.frames.encode_pub(topic, msgs[0]) == py.frames.encode_pub(topic, msgs[0])


def _outcome(fn, *args):
    """A call's result, or its exception reduced to what both twins share."""
    try:
        return ("ok", fn(*args))
    except struct.error:
        return ("struct.error",)  # messages differ between struct and Cython
    except Exception as exc:  # noqa: BLE001 - compared, not swallowed
        return (type(exc).__name__, str(exc), getattr(exc, "position", None),
                getattr(exc, "reason", None))


@st.composite
def record_buffers(draw):
    msgs = draw(st.lists(st.binary(max_size=40), max_size=8))
    base = draw(st.sampled_from([0, 5, 2**32 - 2, 2**64 - 3]))
    buf = bytearray(encode_reference(msgs[:2**64 - base], base))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "append", "splice"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del buf[draw(st.integers(0, len(buf))):]
        elif op == "append":
            buf += draw(st.binary(max_size=30))
        elif op == "splice" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i:i + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(buf), base


def encode_reference(msgs, base):
    from broker._pure.records import encode_records
    return encode_records(msgs, base, 1234)


OFFSETS = st.one_of(st.integers(0, 12), st.sampled_from([-1, 2**32 - 2, 2**64 - 3, 2**64 - 1,
                                                          2**64, 2**70]))


@settings(max_examples=300, deadline=None)
@given(data=record_buffers(), expected=OFFSETS, lo=OFFSETS, hi=OFFSETS,
       start=st.integers(-1, 80), max_bytes=st.integers(-1, 200),
       index=st.tuples(st.integers(-100, 300), st.integers(-100, 300), st.integers(-5, 100),
                       st.sampled_from([0, 5, -3, 2**32 - 2, 2**64 - 3, 2**61])))
def test_records_twins_agree(twins, data, expected, lo, hi, start, max_bytes, index):
    c, py = twins
    buf, base = data
    for name, args in [
        ("scan_records", (buf, expected)),
        ("scan_records", (buf, base, start)),
        ("decode_records", (buf, lo, hi)),
        ("decode_records", (buf, lo, hi, start)),
        ("records_to_deliveries", (buf, b"tp", lo, hi, max_bytes)),
        ("records_to_deliveries", (buf, b"tp", lo, hi, max_bytes, start)),
        ("index_entries", (buf,) + index),
    ]:
        assert _outcome(getattr(c.records, name), *args) == \
            _outcome(getattr(py.records, name), *args), name


@settings(max_examples=300, deadline=None)
@given(size=st.integers(0, 40), count=st.one_of(st.integers(1, 5), st.integers(30, 40)),
       base=st.sampled_from([0, 7, 2**32 - 2]),
       changed=st.integers(0, 39),
       tail=st.binary(max_size=30), where=st.integers(-100, 700), due=st.integers(-100, 3000),
       interval=st.integers(-5, 300), segment_base=st.sampled_from([0, 5, 2**32]))
def test_index_entries_equal_sized_twins_agree(twins, size, count, base, changed, tail, where,
                                               due, interval, segment_base):
    # The pure twin's shortcut for a batch of many equal-sized records
    # (and its walk for a few), against the Cython twin's record-by-record
    # walk: every interval (<= 0 indexes each record), a due position
    # before, inside and past the batch, and batches the shortcut must not
    # take (a record of another length, bytes after the last record).
    c, py = twins
    buf = encode_reference([bytes([i]) * size for i in range(count)], base)
    bufs = [buf, memoryview(bytearray(buf)), buf + tail]
    for byte in range(4):  # one record's length field, changed in each of its bytes
        other = bytearray(buf)
        other[(changed % count) * (size + 24) + byte] ^= 1
        bufs.append(bytes(other))
    for data in bufs:
        args = (data, where, due, interval, segment_base)
        assert _outcome(c.records.index_entries, *args) == _outcome(py.records.index_entries, *args)


@settings(max_examples=100, deadline=None)
@given(msgs=st.lists(st.binary(max_size=40), max_size=8),
       base=st.sampled_from([0, 1, 2**63, 2**64 - 2, 2**64 - 1, -1, 2**64]),
       ts=st.sampled_from([0, 1712345678901, 2**64 - 1, -1]))
def test_encode_records_twins_agree(twins, msgs, base, ts):
    c, py = twins
    assert _outcome(c.records.encode_records, msgs, base, ts) == \
        _outcome(py.records.encode_records, msgs, base, ts)
