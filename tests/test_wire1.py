"""The protocol v1 codec (``wire1``) on both twins.

Every behaviour test runs twice through the ``w`` fixture: ``c`` is the
Cython extension (``broker._speedups.wire1``), ``py`` the pure-Python
reference (``broker._pure.wire1``). The ``c`` run fails, never skips, when
the extension does not import, unless PYLOGSTREAMS_NO_EXTENSIONS is set.
Expected bytes are built here with ``struct``/``zlib`` from the layouts in
the module docstring, not with the codec under test. The hypothesis tests
at the end feed both twins identical (often garbage) input and require
identical results, or identical exception types and messages.
"""

from __future__ import annotations

import importlib
import os
import random
import struct
import types
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NO_EXTENSIONS = os.environ.get("PYLOGSTREAMS_NO_EXTENSIONS", "") not in ("", "0")


def _load(param: str) -> types.SimpleNamespace:
    if param == "c":
        if NO_EXTENSIONS:
            pytest.skip("PYLOGSTREAMS_NO_EXTENSIONS is set: pure build, Cython codec not tested")
        try:
            wire1 = importlib.import_module("broker._speedups.wire1")
            records = importlib.import_module("broker._speedups.records")
        except ImportError as exc:
            pytest.fail("the Cython codec does not import (%s); build it with "
                        "`python setup.py build_ext --inplace`" % exc, pytrace=False)
    else:
        wire1 = importlib.import_module("broker._pure.wire1")
        records = importlib.import_module("broker._pure.records")
    return types.SimpleNamespace(name=param, wire1=wire1, records=records)


@pytest.fixture(params=["c", "py"])
def w(request) -> types.SimpleNamespace:
    """One twin: ``.wire1`` and the ``.records`` module it pairs with."""
    return _load(request.param)


@pytest.fixture(scope="module")
def twins():
    return _load("c"), _load("py")


def test_default_codec_is_compiled():
    """A default import must load the Cython wire1, not fall back silently."""
    if NO_EXTENSIONS:
        pytest.skip("pure build requested")
    from broker import codec
    assert codec.IMPLEMENTATION == "cython"
    assert codec.wire1.__name__ == "broker._speedups.wire1"


def test_twins_export_the_same_names(twins):
    c, py = twins
    assert c.wire1.__all__ == py.wire1.__all__
    for name in py.wire1.__all__:
        assert hasattr(c.wire1, name), name
    assert c.wire1.KINDS == py.wire1.KINDS
    for k in ("K_ERROR", "K_CLOSE", "K_UNKNOWN", "FRAME_HEADER"):
        assert getattr(c.wire1, k) == getattr(py.wire1, k), k
    # Each twin's MSG decoder raises its own records module's error.
    assert c.wire1.CorruptRecordError is c.records.CorruptRecordError
    assert py.wire1.CorruptRecordError is py.records.CorruptRecordError


# -- helpers (independent of the codec) -----------------------------------------

def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def raw_frame(kind: bytes, rid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I3sI", 7 + len(payload), kind, rid) + payload


def raw_str(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def raw_pub_payload(topic: bytes, msgs, crcs=None) -> bytes:
    out = raw_str(topic) + u32(len(msgs))
    for i, m in enumerate(msgs):
        crc = zlib.crc32(m) if not crcs or i not in crcs else crcs[i]
        out += struct.pack(">II", len(m), crc) + m
    return out


def raw_records(msgs, base: int, ts: int) -> bytes:
    """Stored records, per the layout in broker/_pure/records.py."""
    out = b""
    for i, m in enumerate(msgs):
        tail = struct.pack(">QQ", base + i, ts + i) + m
        out += struct.pack(">II", 20 + len(m), zlib.crc32(tail[:16], zlib.crc32(m))) + tail
    return out


def record_sizes(msgs) -> list[int]:
    return [24 + len(m) for m in msgs]


# A stream of frames of every client and server kind, an unknown one and
# some edge sizes.
KNOWN = [b"HEL", b"PUB", b"SUB", b"UNS", b"CMT", b"SEK", b"PNG", b"TOP", b"OFS", b"STA",
         b"AUT", b"RES", b"ACK", b"ERR", b"MSG", b"POG"]
KIND_CODES = {b"HEL": 1, b"PUB": 2, b"SUB": 3, b"UNS": 4, b"CMT": 5, b"SEK": 6, b"PNG": 7,
              b"TOP": 8, b"OFS": 9, b"STA": 10, b"AUT": 11, b"CFG": 12, b"RES": 20, b"ACK": 21, b"ERR": 22,
              b"MSG": 23, b"POG": 24}


def sample_stream():
    frames, expected = [], []
    for i, kind in enumerate(KNOWN):
        payload = bytes(range(i * 3 % 256, i * 3 % 256 + i)) if i % 4 else b""
        rid = (i * 0x01010101 + 7) & 0xFFFFFFFF
        frames.append(raw_frame(kind, rid, payload))
        expected.append((KIND_CODES[kind], rid, payload))
    frames.append(raw_frame(b"XYZ", 0xFFFFFFFF, b"ignored payload"))
    expected.append((30, 0xFFFFFFFF, b"XYZ"))
    frames.append(raw_frame(b"hel", 5, b""))  # case matters
    expected.append((30, 5, b"hel"))
    big = bytes(random.Random(1).randrange(256) for _ in range(5000))
    frames.append(raw_frame(b"PUB", 0, big))
    expected.append((2, 0, big))
    return b"".join(frames), expected


def feed_all(reader, chunks) -> list:
    out = []
    for ch in chunks:
        out.extend(reader.feed(ch))
    return out


# -- V1Reader ------------------------------------------------------------------

def test_constants(w):
    assert w.wire1.KINDS == KIND_CODES
    assert (w.wire1.K_CLOSE, w.wire1.K_UNKNOWN, w.wire1.K_ERROR) == (0, 30, 31)


def test_reader_whole_stream(w):
    data, expected = sample_stream()
    r = w.wire1.V1Reader()
    assert r.feed(data) == expected
    assert r.buffered == 0 and not r.broken


def test_reader_every_two_chunk_split(w):
    data, expected = sample_stream()
    for cut in range(len(data) + 1):
        r = w.wire1.V1Reader()
        assert feed_all(r, [data[:cut], data[cut:]]) == expected, cut
        assert r.buffered == 0


def test_reader_byte_by_byte_and_random_chunks(w):
    data, expected = sample_stream()
    r = w.wire1.V1Reader()
    assert feed_all(r, [data[i:i + 1] for i in range(len(data))]) == expected
    rng = random.Random(42)
    for _ in range(50):
        r = w.wire1.V1Reader()
        chunks, pos = [], 0
        while pos < len(data):
            n = rng.choice([1, 2, 3, 7, 11, 64, 1000, 6000])
            chunks.append(data[pos:pos + n])
            pos += n
        assert feed_all(r, chunks) == expected


BULK = (KIND_CODES[b"PUB"], KIND_CODES[b"MSG"])  # payloads that may be views


def _immutable_view(kind, payload) -> bool:
    """A bulk kind's payload as a view: never of what the caller may change
    (its bytearray, its memoryview), only of immutable bytes."""
    return (kind in BULK and type(payload) is memoryview and payload.readonly
            and type(payload.obj) is bytes)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview], ids=["bytes", "bytearray", "memoryview"])
def test_reader_accepts_buffers(w, wrap):
    data, expected = sample_stream()
    r = w.wire1.V1Reader()
    chunks = [wrap(data[:100]), wrap(data[100:])]
    got = feed_all(r, chunks)
    assert got == expected
    assert all(type(p) is bytes or _immutable_view(k, p) for k, _r, p in got)
    if wrap is bytearray:  # the caller reuses its buffer: what we handed out stays
        for ch in chunks:
            ch[:] = bytes(len(ch))
        assert got == expected


def test_bulk_payloads_are_views_of_the_chunk(w):
    """A PUB or MSG frame that arrives whole in a bytes chunk is handed out
    without a copy: a read-only view of that chunk. Other kinds are bytes."""
    pub = raw_frame(b"PUB", 1, b"p" * 3000)
    msg = raw_frame(b"MSG", 2, b"m" * 3000)
    png = raw_frame(b"PNG", 3, b"")
    chunk = pub + msg + png
    got = w.wire1.V1Reader().feed(chunk)
    assert [(k, rid, bytes(p)) for k, rid, p in got] == [
        (KIND_CODES[b"PUB"], 1, b"p" * 3000), (KIND_CODES[b"MSG"], 2, b"m" * 3000),
        (KIND_CODES[b"PNG"], 3, b"")]
    for _, _, payload in got[:2]:
        assert type(payload) is memoryview and payload.readonly and payload.obj is chunk
    assert type(got[2][2]) is bytes


def test_reader_large_frames_any_chunking(w):
    """Frames over 64 KiB (which the Cython twin fills in place) in any pieces."""
    rnd = random.Random(7)
    sizes = [70_000, 5, 65_536, 200_000, 0, 65_529, 1_000_000 - 11]
    frames, expected = [], []
    for i, n in enumerate(sizes):
        payload = bytes(rnd.getrandbits(8) for _ in range(64)) * (n // 64) + b"z" * (n % 64)
        kind = [b"PUB", b"PNG", b"SUB"][i % 3]
        frames.append(raw_frame(kind, i + 1, payload))
        expected.append((KIND_CODES[kind], i + 1, payload))
    frames.append(raw_frame(b"QQQ", 99, b"u" * 100_000))  # unknown kind, large
    expected.append((30, 99, b"QQQ"))
    stream = b"".join(frames)
    for trial in range(6):
        reader = w.wire1.V1Reader(1 << 20)
        out, pos = [], 0
        while pos < len(stream):
            step = rnd.choice([1, 7, 11, 12, 4096, 65_536, 300_000]) if trial else len(stream)
            chunk = stream[pos:pos + step]
            got = reader.feed(chunk if trial % 2 else bytearray(chunk))
            assert all(type(p) in (bytes, str) or _immutable_view(k, p) for k, _r, p in got)
            out.extend(got)
            pos += len(chunk)
            # What is held is exactly the unconsumed tail of the stream.
            consumed = sum(4 + 7 + (len(p) if k != 30 else 100_000) for k, _r, p in out)
            assert reader.buffered == pos - consumed
        assert out == expected
        assert reader.buffered == 0


def test_reader_partial_frame_is_buffered(w):
    f = raw_frame(b"PNG", 9, b"abc")
    r = w.wire1.V1Reader()
    assert r.feed(f[:5]) == []
    assert r.buffered == 5
    assert r.feed(f[5:-1]) == []
    assert r.buffered == len(f) - 1
    assert r.feed(f[-1:] + f[:2]) == [(7, 9, b"abc")]
    assert r.buffered == 2


def test_reader_close_frame_stops(w):
    before = raw_frame(b"PNG", 1)
    after = raw_frame(b"PNG", 2)
    r = w.wire1.V1Reader()
    assert r.feed(before + u32(0) + after) == [(7, 1, b""), (0, 0, b"")]
    assert r.broken
    assert r.buffered == 0
    assert r.feed(after) == []
    # Split in the middle of the zero length, too.
    r = w.wire1.V1Reader()
    assert r.feed(b"\0\0") == []
    assert r.feed(b"\0\0" + after) == [(0, 0, b"")]
    assert r.feed(after) == [] and r.broken


@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_reader_too_short_frame(w, n):
    r = w.wire1.V1Reader()
    events = r.feed(raw_frame(b"PNG", 3) + u32(n) + b"x" * 20)
    assert events[0] == (7, 3, b"")
    assert len(events) == 2
    kind, rid, reason = events[1]
    assert (kind, rid) == (31, 0)
    assert reason == "frame length %d is below the v1 minimum 7" % n
    assert r.broken and r.buffered == 0
    assert r.feed(raw_frame(b"PNG", 4)) == []


def test_reader_minimum_frame_is_seven(w):
    r = w.wire1.V1Reader()
    assert r.feed(u32(7) + b"POG" + u32(77)) == [(24, 77, b"")]


def test_reader_oversize(w):
    limit = 64
    r = w.wire1.V1Reader(limit)
    assert r.max_frame_bytes == limit
    ok = raw_frame(b"PUB", 1, b"p" * (limit - 7))  # N == limit: accepted
    assert r.feed(ok) == [(2, 1, b"p" * (limit - 7))]
    # Only the length prefix has arrived: refused before the body is buffered.
    events = r.feed(u32(limit + 1))
    assert events == [(31, 0, "frame length %d exceeds limit %d" % (limit + 1, limit))]
    assert r.broken and r.buffered == 0
    assert r.feed(ok) == []


def test_reader_huge_length_refused_at_once(w):
    r = w.wire1.V1Reader()
    events = r.feed(b"\xff\xff\xff\xff")
    assert events == [(31, 0, "frame length 4294967295 exceeds limit 1048576")]


def test_reader_min_limit(w):
    with pytest.raises(ValueError, match="at least 16"):
        w.wire1.V1Reader(15)
    w.wire1.V1Reader(16)


def test_reader_unknown_type_does_not_stop(w):
    r = w.wire1.V1Reader()
    data = raw_frame(b"ZZZ", 5, b"whatever") + raw_frame(b"\0\0\0", 6) + raw_frame(b"PNG", 7)
    assert r.feed(data) == [(30, 5, b"ZZZ"), (30, 6, b"\0\0\0"), (7, 7, b"")]
    assert not r.broken


# -- encode / pack_str / read_str ------------------------------------------------

def test_encode_layout(w):
    assert w.wire1.encode(b"PNG", 1) == u32(7) + b"PNG" + u32(1)
    assert w.wire1.encode(b"RES", 0xFFFFFFFF, b"xyz") == u32(10) + b"RES" + u32(0xFFFFFFFF) + b"xyz"
    assert w.wire1.encode(b"ERR", 2, bytearray(b"ab")) == raw_frame(b"ERR", 2, b"ab")
    assert w.wire1.encode(b"ERR", 2, memoryview(b"ab")) == raw_frame(b"ERR", 2, b"ab")


@pytest.mark.parametrize("kind", [b"", b"AB", b"ABCD"])
def test_encode_refuses_bad_kind(w, kind):
    with pytest.raises(ValueError):
        w.wire1.encode(kind, 1)


@pytest.mark.parametrize("rid", [-1, 1 << 32])
def test_encode_refuses_bad_rid(w, rid):
    with pytest.raises(OverflowError):
        w.wire1.encode(b"PNG", rid)


def test_pack_str(w):
    assert w.wire1.pack_str("") == b"\0\0"
    assert w.wire1.pack_str("topic") == b"\0\x05topic"
    assert w.wire1.pack_str("é") == b"\0\x02\xc3\xa9"
    assert w.wire1.pack_str(b"\xff\x00") == b"\0\x02\xff\x00"
    assert w.wire1.pack_str(bytearray(b"ab")) == b"\0\x02ab"
    assert w.wire1.pack_str(b"x" * 65535) == b"\xff\xff" + b"x" * 65535
    with pytest.raises(ValueError, match="65535"):
        w.wire1.pack_str(b"x" * 65536)
    with pytest.raises(ValueError, match="65535"):
        w.wire1.pack_str("é" * 40000)


@pytest.mark.parametrize("bad", [5, None, [1, 2], 1.5], ids=["int", "none", "list", "float"])
def test_non_bytes_refused(w, bad):
    """Only str (where a string is meant) and bytes-like objects: bytes(5) is
    five zero bytes and bytes([1, 2]) two, neither is what the caller meant."""
    wire1 = w.wire1
    with pytest.raises(TypeError):
        wire1.pack_str(bad)
    with pytest.raises(TypeError):
        wire1.encode(b"PNG", 1, bad)
    with pytest.raises(TypeError):
        wire1.encode(bad, 1)
    with pytest.raises(TypeError):
        wire1.encode_publish(1, bad, [b"x"])
    with pytest.raises(TypeError):
        wire1.message_frame(raw_records([b"v"], 0, 0), 1, bad, 0, 10, 100)


def test_read_str(w):
    rs = w.wire1.read_str
    data = b"junk" + b"\0\x03abc" + b"\0\0" + b"tail"
    assert rs(data, 4) == (b"abc", 9)
    assert rs(data, 9) == (b"", 11)
    assert rs(bytearray(data), 4) == (b"abc", 9)
    assert rs(memoryview(data), 4) == (b"abc", 9)
    for bad_pos in (len(data) - 1, len(data), len(data) + 5):
        with pytest.raises(w.wire1.ProtocolError, match="truncated string"):
            rs(data, bad_pos)
    with pytest.raises(w.wire1.ProtocolError, match="truncated string"):
        rs(b"\0\x05abcd", 0)
    with pytest.raises(w.wire1.ProtocolError, match="truncated string"):
        rs(b"", 0)
    assert issubclass(w.wire1.ProtocolError, ValueError)


def test_read_str_negative_position(w):
    # A negative position must not read from the end of the buffer.
    with pytest.raises(w.wire1.ProtocolError, match="truncated string"):
        w.wire1.read_str(b"\0\x01a", -3)


# -- PUB -------------------------------------------------------------------------

MSGS = [b"", b"a", b"hello world", bytes(range(256)) * 3, b"\0" * 10]


def test_encode_publish_layout(w):
    f = w.wire1.encode_publish(77, "topic-1", MSGS)
    assert f == raw_frame(b"PUB", 77, raw_pub_payload(b"topic-1", MSGS))
    assert w.wire1.encode_publish(77, b"topic-1", tuple(MSGS)) == f
    assert w.wire1.encode_publish(1, b"t", []) == raw_frame(b"PUB", 1, b"\0\x01t" + u32(0))
    mixed = [bytearray(b"ab"), memoryview(b"cd"), b"ef"]
    assert w.wire1.encode_publish(1, b"t", mixed) == raw_frame(
        b"PUB", 1, raw_pub_payload(b"t", [b"ab", b"cd", b"ef"]))


def test_encode_publish_refuses(w):
    with pytest.raises(ValueError, match="65535"):
        w.wire1.encode_publish(1, b"t" * 65536, [b"x"])
    with pytest.raises(OverflowError):
        w.wire1.encode_publish(1 << 32, b"t", [b"x"])
    with pytest.raises(OverflowError):
        w.wire1.encode_publish(-1, b"t", [b"x"])
    with pytest.raises(TypeError):
        w.wire1.encode_publish(1, b"t", ["a str is not bytes"])



def test_encode_publish_sizes_buffers_in_bytes(w):
    """An array('I') or a cast memoryview is sent as its bytes, not its items."""
    import array
    values = [array.array("I", [1, 2, 3]), memoryview(b"abcdefgh").cast("H"), b"xyz"]
    frame = w.wire1.encode_publish(4, b"t", values)
    (kind, rid, payload), = w.wire1.V1Reader().feed(frame)
    assert w.wire1.parse_publish(payload) == (b"t", [bytes(v) for v in values], -1)
    with pytest.raises(BufferError):
        w.wire1.encode_publish(4, b"t", [memoryview(b"abcdef")[::2]])  # not contiguous


def test_publish_round_trip(w):
    f = w.wire1.encode_publish(5, "tópic", MSGS)
    (kind, rid, payload), = w.wire1.V1Reader().feed(f)
    assert (kind, rid) == (2, 5)
    topic, msgs, bad = w.wire1.parse_publish(payload)
    assert topic == "tópic".encode()
    assert msgs == MSGS and all(type(m) is bytes for m in msgs)
    assert bad == -1
    assert w.wire1.parse_publish(bytearray(payload)) == (topic, MSGS, -1)
    assert w.wire1.parse_publish(memoryview(payload)) == (topic, MSGS, -1)


@pytest.mark.parametrize("bad_indexes,first", [({0: 1}, 0), ({2: 0}, 2), ({4: 5, 1: 9}, 1)])
def test_parse_publish_bad_crc_index(w, bad_indexes, first):
    payload = raw_pub_payload(b"t", MSGS, bad_indexes)
    topic, msgs, bad = w.wire1.parse_publish(payload)
    assert bad == first
    assert msgs == MSGS  # still split, so the broker can say which one


def test_parse_publish_every_truncation(w):
    payload = raw_pub_payload(b"topic", [b"abc", b"", b"defgh"])
    for cut in range(len(payload)):
        with pytest.raises(w.wire1.ProtocolError):
            w.wire1.parse_publish(payload[:cut])


def test_parse_publish_errors(w):
    pp = w.wire1.parse_publish
    PE = w.wire1.ProtocolError
    with pytest.raises(PE, match="truncated string"):
        pp(b"\0")
    with pytest.raises(PE, match="missing message count"):
        pp(b"\0\x01t\0\0")
    with pytest.raises(PE, match="count 1 does not fit"):
        pp(b"\0\x01t" + u32(1) + b"1234567")
    with pytest.raises(PE, match="count 4294967295 does not fit"):
        pp(b"\0\x01t" + u32(0xFFFFFFFF) + b"\0" * 64)
    with pytest.raises(PE, match="truncated message$"):
        pp(b"\0\x01t" + u32(1) + struct.pack(">II", 9, 0) + b"abc")
    with pytest.raises(PE, match="truncated message header"):
        # The count fits (2 x 8 <= 20 bytes left) but the first message eats
        # into the space of the second one's header.
        pp(b"\0\x01t" + u32(2) + struct.pack(">II", 5, zlib.crc32(b"abcde")) + b"abcde" + b"\0" * 7)
    with pytest.raises(PE, match="3 trailing bytes"):
        pp(raw_pub_payload(b"t", [b"x"]) + b"abc")
    assert pp(b"\0\0" + u32(0)) == (b"", [], -1)



# -- publish_records: the broker's publish path ------------------------------------

# Empty, short and long payloads: below 64 bytes the compiled CRC is zlib's,
# from 64 the PCLMULQDQ fold (where the CPU has it), whose tail (the last
# n % 16 bytes) is zlib's again.
STAMP_MSGS = [b"", b"a", b"y" * 127, b"z" * 128, bytes(range(256)) * 4, b"\0" * 129,
              b"q" * 5000, b"r" * 2047, b"s" * 2048, bytes(range(256)) * 8 + b"t",
              b"u" * 3000, b"v" * 2500, b"w" * 3000]


def test_publish_records_equals_encode_records(w):
    payload = raw_pub_payload(b"t\xc3\xa9", STAMP_MSGS)
    topic, recs, count, bad, last_len = w.wire1.publish_records(payload, 1000, 1_700_000_000_123)
    assert (topic, count, bad, last_len) == (b"t\xc3\xa9", len(STAMP_MSGS), -1,
                                             24 + len(STAMP_MSGS[-1]))
    assert type(recs) is bytearray
    # Finished records: offsets from 1000, the time, each record's CRC.
    assert bytes(recs) == w.records.encode_records(STAMP_MSGS, 1000, 1_700_000_000_123)
    assert bytes(recs) == bytes(raw_records_same_time(STAMP_MSGS, 1000, 1_700_000_000_123))
    assert w.records.scan_records(recs, 1000) == (len(STAMP_MSGS), len(recs))


@pytest.mark.parametrize("kernel", ["zlib", "pclmulqdq"])
def test_record_crcs_with_either_crc_kernel(twins, kernel):
    # The compiled records and wire1 modules hash with PCLMULQDQ where the
    # CPU has it (the payload by folding, the 16 bytes of offset and time
    # by one reduction) and with zlib elsewhere: run both on this CPU.
    c, py = twins
    try:
        for mod in (c.records, c.wire1):
            got = mod._use_crc32_kernel("zlib" if kernel == "zlib" else None)
            if kernel == "zlib":
                assert got == "zlib", mod.__name__  # the hook must take effect
            elif got != kernel:
                pytest.skip("this CPU has no PCLMULQDQ (the compiled codec uses zlib)")
        for base, ts in ((0, 0), (77, 88), ((1 << 63) + 5, (1 << 64) - 1)):
            for msgs in (STAMP_MSGS, STAMP_MSGS[::-1]):
                want = py.records.encode_records(msgs, base, ts)
                assert c.records.encode_records(msgs, base, ts) == want
                got = c.wire1.publish_records(raw_pub_payload(b"t", msgs), base, ts)
                assert got == (b"t", want, len(msgs), -1, 24 + len(msgs[-1]))
                assert c.records.scan_records(want, base) == (len(msgs), len(want))
                assert c.records.decode_records(want, 0, 1 << 64, 0) == \
                    py.records.decode_records(want, 0, 1 << 64, 0)
                for flip in (4, 9, 23, 24, len(want) - 1):  # CRC, offset, time, payload
                    bad = bytearray(want)
                    bad[flip] ^= 0x10
                    assert c.records.scan_records(bytes(bad), base) == \
                        py.records.scan_records(bytes(bad), base)
                    assert c.records.scan_records(bytes(bad), base)[0] < len(msgs)
    finally:
        c.records._use_crc32_kernel(None)
        c.wire1._use_crc32_kernel(None)


def raw_records_same_time(msgs, base, ts):
    out = b""
    for i, m in enumerate(msgs):
        tail = struct.pack(">QQ", base + i, ts) + m
        out += struct.pack(">II", 20 + len(m), zlib.crc32(tail[:16], zlib.crc32(m))) + tail
    return out


def test_publish_records_accepts_buffers_and_empty(w):
    payload = raw_pub_payload(b"t", MSGS)
    ref = w.wire1.publish_records(payload, 5, 6)
    assert w.wire1.publish_records(bytearray(payload), 5, 6) == ref
    assert w.wire1.publish_records(memoryview(payload), 5, 6) == ref
    assert w.wire1.publish_records(b"\0\0" + u32(0), 5, 6) == (b"", bytearray(), 0, -1, 0)


@pytest.mark.parametrize("bad_indexes,first", [({0: 1}, 0), ({2: 0}, 2), ({4: 5, 1: 9}, 1)])
def test_publish_records_bad_crc_refuses_the_batch(w, bad_indexes, first):
    payload = raw_pub_payload(b"t", MSGS, bad_indexes)
    assert w.wire1.publish_records(payload, 0, 0) == (b"t", None, len(MSGS), first, 0)


def test_publish_records_same_errors_as_parse_publish(w):
    samples = [b"\0", b"\0\x01t\0\0", b"\0\x01t" + u32(1) + b"1234567",
               b"\0\x01t" + u32(0xFFFFFFFF) + b"\0" * 64,
               b"\0\x01t" + u32(1) + struct.pack(">II", 9, 0) + b"abc",
               b"\0\x01t" + u32(2) + struct.pack(">II", 5, zlib.crc32(b"abcde")) + b"abcde" + b"\0" * 7,
               raw_pub_payload(b"t", [b"x"]) + b"abc",
               # The pure twin's fast path checks the CRC of what is there
               # before it notices the message runs past the end: a CRC that
               # matches the truncated part must still be refused.
               b"\0\x01t" + u32(1) + struct.pack(">II", 9, zlib.crc32(b"abc")) + b"abc",
               b"\0\x01t" + u32(2) + raw_pub_payload(b"", [b"ok"])[6:]
               + struct.pack(">II", 9, zlib.crc32(b"abc")) + b"abc"]
    payload = raw_pub_payload(b"topic", [b"abc", b"", b"defgh"])
    samples += [payload[:cut] for cut in range(len(payload))]
    for sample in samples:
        with pytest.raises(w.wire1.ProtocolError) as a:
            w.wire1.parse_publish(sample)
        with pytest.raises(w.wire1.ProtocolError) as b:
            w.wire1.publish_records(sample, 0, 0)
        assert str(a.value) == str(b.value)


def test_publish_records_offsets_and_time_in_range(w):
    payload = raw_pub_payload(b"t", [b"a", b"b", b"c"])
    top = 1 << 64
    recs = w.wire1.publish_records(payload, top - 3, top - 1)[1]  # offsets up to 2**64 - 1
    assert bytes(recs) == w.records.encode_records([b"a", b"b", b"c"], top - 3, top - 1)
    assert w.wire1.publish_records(b"\0\x01t" + u32(0), top - 1, 0)[2] == 0
    for base, ts in ((top - 2, 0), (-1, 0), (0, -1), (0, top), (top, 0)):
        with pytest.raises(ValueError, match="offset or time out of range"):
            w.wire1.publish_records(payload, base, ts)
    for base, ts in ((0, 2.5), (1.0, 0), ("1", 0)):  # integers only, as in encode_records
        with pytest.raises(TypeError):
            w.wire1.publish_records(payload, base, ts)


# -- MSG ---------------------------------------------------------------------------

VALUES = [b"m%d-" % i + b"x" * (i * 7) for i in range(10)]
BASE, TS = 100, 1_700_000_000_000


def test_message_frame_all(w):
    buf = raw_records(VALUES, BASE, TS)
    frame, count, nxt, used = w.wire1.message_frame(buf, 9, b"topic", BASE, 1 << 62, 1 << 20)
    assert (count, nxt, used) == (10, BASE + 10, len(buf))
    assert frame == raw_frame(b"MSG", 9, raw_str(b"topic") + u32(10) + buf)
    (kind, rid, payload), = w.wire1.V1Reader().feed(frame)
    assert (kind, rid) == (23, 9)
    topic, recs = w.wire1.parse_messages(payload)
    assert topic == b"topic"
    assert recs == [(BASE + i, TS + i, v) for i, v in enumerate(VALUES)]


@pytest.mark.parametrize("topic", [b"t", b"topic.name_1-2", b"x" * 200])
def test_batch_frame_is_message_frame_of_the_whole_batch(w, topic):
    """The server's shortcut for a whole tail-cache batch (v1.batch_frame)
    sends exactly what message_frame makes of it."""
    from broker.server.v1 import batch_frame
    buf = bytearray(raw_records(VALUES, BASE, TS))
    frame, count, nxt, used = w.wire1.message_frame(buf, 77, topic, BASE, BASE + 10, len(buf),
                                                    False)
    assert (count, nxt, used) == (10, BASE + 10, len(buf))
    head, body = batch_frame(77, w.wire1.pack_str(topic), buf, 10)
    assert body is buf  # sent as it is, not copied
    assert head + body == frame


def test_message_frame_ranges(w):
    buf = raw_records(VALUES, BASE, TS)
    sizes = record_sizes(VALUES)
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    mf = w.wire1.message_frame
    for lo in range(BASE - 2, BASE + 12):
        for hi in range(BASE - 1, BASE + 12):
            frame, count, nxt, used = mf(buf, 1, b"t", lo, hi, 1 << 20)
            consumed = min(max(hi - BASE, 0), 10)  # every record below hi is read through
            want = [o for o in range(BASE, BASE + consumed) if o >= lo]
            assert count == len(want), (lo, hi)
            assert used == starts[consumed], (lo, hi)
            assert nxt == max(BASE + consumed if consumed else lo, lo), (lo, hi)
            if count:
                topic, recs = w.wire1.parse_messages(frame[11:])
                assert [r[0] for r in recs] == want
            else:
                assert frame == b""


def test_message_frame_max_bytes(w):
    buf = raw_records(VALUES, BASE, TS)
    sizes = record_sizes(VALUES)
    mf = w.wire1.message_frame
    # At least one record, however small the limit.
    frame, count, nxt, used = mf(buf, 1, b"t", BASE, 1 << 62, 1)
    assert (count, nxt, used) == (1, BASE + 1, sizes[0])
    for k in range(1, 11):
        limit = sum(sizes[:k])
        frame, count, nxt, used = mf(buf, 1, b"t", BASE, 1 << 62, limit)
        assert (count, nxt, used) == (k, BASE + k, limit), k
        frame, count, nxt, used = mf(buf, 1, b"t", BASE, 1 << 62, limit - 1)
        assert count == max(1, k - 1), k
    # Records skipped before from_offset don't count against the limit.
    frame, count, nxt, used = mf(buf, 1, b"t", BASE + 5, 1 << 62, sizes[5])
    assert (count, nxt, used) == (1, BASE + 6, sum(sizes[:6]))


def test_message_frame_incomplete_tail(w):
    buf = raw_records(VALUES[:3], BASE, TS)
    sizes = record_sizes(VALUES[:3])
    for cut in range(len(buf)):
        frame, count, nxt, used = w.wire1.message_frame(buf[:cut], 1, b"t", BASE, 1 << 62, 1 << 20)
        whole = sum(1 for i in range(4) if sum(sizes[:i]) <= cut) - 1
        assert (count, used) == (whole, sum(sizes[:whole])), cut
        assert nxt == BASE + whole


@pytest.mark.parametrize("index", [0, 4, 9])
def test_message_frame_corrupt_record(w, index):
    buf = bytearray(raw_records(VALUES, BASE, TS))
    pos = sum(record_sizes(VALUES)[:index])
    buf[pos + 24 - 1] ^= 0x01  # last byte of the timestamp: covered by the CRC
    with pytest.raises(w.records.CorruptRecordError) as info:
        w.wire1.message_frame(bytes(buf), 1, b"t", BASE, 1 << 62, 1 << 20)
    assert info.value.position == pos
    assert "checksum mismatch" in str(info.value)
    # Even a corrupt record before from_offset is refused: it is read through.
    if index < 9:
        with pytest.raises(w.records.CorruptRecordError):
            w.wire1.message_frame(bytes(buf), 1, b"t", BASE + 9, 1 << 62, 1 << 20)
    # verify=False (batches the broker holds in memory): forwarded unchecked.
    frame, count, nxt, used = w.wire1.message_frame(bytes(buf), 1, b"t", BASE, 1 << 62, 1 << 20, False)
    assert (count, nxt, used) == (10, BASE + 10, len(buf)) and frame.endswith(bytes(buf))


def test_message_frame_short_length(w):
    buf = raw_records(VALUES[:2], BASE, TS)
    bad = u32(19) + buf[4:]
    with pytest.raises(w.records.CorruptRecordError, match="length 19 below minimum"):
        w.wire1.message_frame(bad, 1, b"t", BASE, 1 << 62, 1 << 20)


def test_message_frame_topic_forms(w):
    buf = raw_records(VALUES[:2], BASE, TS)
    want = w.wire1.message_frame(buf, 3, b"topic", BASE, 1 << 62, 1 << 20)
    assert w.wire1.message_frame(buf, 3, bytearray(b"topic"), BASE, 1 << 62, 1 << 20) == want
    # Like pack_str and encode_publish, a str topic is UTF-8 encoded.
    assert w.wire1.message_frame(buf, 3, "topic", BASE, 1 << 62, 1 << 20) == want
    with pytest.raises(ValueError, match="65535"):
        w.wire1.message_frame(buf, 3, b"t" * 65536, BASE, 1 << 62, 1 << 20)


def test_parse_messages_errors(w):
    buf = raw_records(VALUES[:3], BASE, TS)
    good = raw_str(b"t") + u32(3) + buf
    assert len(w.wire1.parse_messages(good)[1]) == 3
    with pytest.raises(w.wire1.ProtocolError, match="truncated string"):
        w.wire1.parse_messages(b"\0")
    with pytest.raises(w.wire1.ProtocolError, match="missing record count"):
        w.wire1.parse_messages(b"\0\x01t\0")
    with pytest.raises(w.records.CorruptRecordError, match="2 of 3 records"):
        w.wire1.parse_messages(raw_str(b"t") + u32(3) + raw_records(VALUES[:2], BASE, TS))
    with pytest.raises(w.records.CorruptRecordError, match="3 of 4 records"):
        w.wire1.parse_messages(raw_str(b"t") + u32(4) + buf)
    for cut in range(7, len(good)):   # every truncation inside the records
        with pytest.raises(w.records.CorruptRecordError):
            w.wire1.parse_messages(good[:cut])
    corrupt = bytearray(good)
    corrupt[-1] ^= 0xFF
    with pytest.raises(w.records.CorruptRecordError, match="checksum"):
        w.wire1.parse_messages(bytes(corrupt))
    assert w.wire1.parse_messages(raw_str(b"t") + u32(0)) == (b"t", [])


# -- the twins agree on anything ------------------------------------------------------

def outcome(fn, *args):
    """``("ok", result)`` or ``("raise", exception type name, message)``."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:  # noqa: BLE001 - comparing whatever the twins raise
        return ("raise", type(exc).__name__, str(exc))


def both(twins, name, *args):
    c, py = twins
    a = outcome(getattr(c.wire1, name), *args)
    b = outcome(getattr(py.wire1, name), *args)
    assert a == b, "%s%r: c=%r py=%r" % (name, tuple(repr(x)[:60] for x in args), a, b)
    return b


HYP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

kinds = st.sampled_from(KNOWN + [b"XYZ", b"\0\0\0", b"pub"])
payloads = st.binary(max_size=80)


@st.composite
def streams(draw):
    """Mostly well-formed frames, sometimes with garbage spliced in."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        choice = draw(st.integers(0, 9))
        if choice < 7:
            parts.append(raw_frame(draw(kinds), draw(st.integers(0, 0xFFFFFFFF)), draw(payloads)))
        elif choice == 7:
            parts.append(draw(st.binary(max_size=20)))
        elif choice == 8:
            parts.append(u32(draw(st.integers(0, 6))))
        else:
            parts.append(u32(draw(st.integers(0, 0xFFFFFFFF))))
    data = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    chunks, prev = [], 0
    for c in cuts + [len(data)]:
        chunks.append(data[prev:c])
        prev = c
    return chunks


@HYP
@given(chunks=streams(), limit=st.integers(16, 200))
def test_differential_reader(twins, chunks, limit):
    c, py = twins
    rc, rp = c.wire1.V1Reader(limit), py.wire1.V1Reader(limit)
    for ch in chunks:
        assert rc.feed(ch) == rp.feed(ch)
        assert (rc.buffered, rc.broken) == (rp.buffered, rp.broken)


@HYP
@given(data=st.binary(max_size=40), pos=st.integers(-50, 50))
def test_differential_read_str(twins, data, pos):
    both(twins, "read_str", data, pos)


@HYP
@given(kind=st.binary(max_size=5), rid=st.integers(-2, (1 << 32) + 2), payload=payloads)
def test_differential_encode(twins, kind, rid, payload):
    both(twins, "encode", kind, rid, payload)


anything = st.one_of(st.binary(max_size=40), st.text(max_size=20), st.integers(-3, 300),
                     st.none(), st.lists(st.integers(0, 255), max_size=4),
                     st.binary(max_size=20).map(bytearray), st.binary(max_size=20).map(memoryview))


@HYP
@given(value=anything)
def test_differential_pack_str(twins, value):
    both(twins, "pack_str", value)


@HYP
@given(kind=st.one_of(kinds, anything), payload=anything, topic=anything,
       msgs=st.lists(st.one_of(st.binary(max_size=8), anything), max_size=3))
def test_differential_argument_types(twins, kind, payload, topic, msgs):
    both(twins, "encode", kind, 1, payload)
    both(twins, "message_frame", raw_records([b"v", b"w"], 0, 0), 1, topic, 0, 10, 100)
    # With several wrong messages the twins may complain about different ones
    # (C sizes them all first): the same result, or the same exception type.
    c, py = twins
    a = outcome(c.wire1.encode_publish, 1, topic, msgs)
    b = outcome(py.wire1.encode_publish, 1, topic, msgs)
    assert a[:2] == b[:2], (a, b)
    if a[0] == "ok" or all(type(m) is bytes for m in msgs):
        assert a == b


@st.composite
def pub_payloads(draw):
    msgs = draw(st.lists(st.binary(max_size=20), max_size=5))
    crcs = draw(st.dictionaries(st.integers(0, 4), st.integers(0, 0xFFFFFFFF), max_size=2))
    payload = bytearray(raw_pub_payload(draw(st.binary(max_size=8)), msgs, crcs))
    mode = draw(st.integers(0, 3))
    if mode == 1 and payload:   # truncate
        del payload[draw(st.integers(0, len(payload) - 1)):]
    elif mode == 2 and payload:  # flip a byte
        i = draw(st.integers(0, len(payload) - 1))
        payload[i] ^= draw(st.integers(1, 255))
    elif mode == 3:              # append garbage
        payload += draw(st.binary(min_size=1, max_size=10))
    return bytes(payload)


@HYP
@given(payload=st.one_of(pub_payloads(), st.binary(max_size=60)))
def test_differential_parse_publish(twins, payload):
    both(twins, "parse_publish", payload)


@HYP
@given(rid=st.integers(-1, (1 << 32)), topic=st.one_of(st.binary(max_size=8), st.text(max_size=4)),
       msgs=st.lists(st.binary(max_size=20), max_size=5))
def test_differential_encode_publish(twins, rid, topic, msgs):
    r = both(twins, "encode_publish", rid, topic, msgs)
    if r[0] == "ok":
        both(twins, "parse_publish", r[1][11:])



@HYP
@given(payload=st.one_of(pub_payloads(), st.binary(max_size=60)),
       base=st.integers(0, (1 << 64) - 1), ts=st.integers(0, (1 << 64) - 1))
def test_differential_publish_records(twins, payload, base, ts):
    r = both(twins, "publish_records", payload, base, ts)
    if r[0] == "ok" and r[1][1] is not None:
        # Both twins' records are what encode_records makes.
        py = twins[1]
        msgs = py.wire1.parse_publish(payload)[1]
        assert bytes(r[1][1]) == py.records.encode_records(msgs, base, ts)


@HYP
@given(msgs=st.lists(st.binary(max_size=300) | st.binary(min_size=2000, max_size=2600),
                     max_size=8),
       base=st.integers(0, 1 << 62), ts=st.integers(0, 1 << 62))
def test_differential_publish_records_large_payloads(twins, msgs, base, ts):
    c, py = twins
    payload = raw_pub_payload(b"t", msgs)
    a = c.wire1.publish_records(payload, base, ts)
    assert a == py.wire1.publish_records(payload, base, ts)
    assert a[1] == c.records.encode_records(msgs, base, ts)


@st.composite
def record_chunks(draw):
    msgs = draw(st.lists(st.binary(max_size=30), max_size=6))
    base = draw(st.integers(0, 1 << 40))
    buf = bytearray(raw_records(msgs, base, draw(st.integers(0, 1 << 50))))
    mode = draw(st.integers(0, 3))
    if mode == 1 and buf:
        del buf[draw(st.integers(0, len(buf) - 1)):]
    elif mode == 2 and buf:
        i = draw(st.integers(0, len(buf) - 1))
        buf[i] ^= draw(st.integers(1, 255))
    elif mode == 3:
        buf += draw(st.binary(min_size=1, max_size=30))
    return bytes(buf), base


@HYP
@given(chunk=record_chunks(), garbage=st.binary(max_size=80), use_garbage=st.booleans(),
       rid=st.integers(0, 0xFFFFFFFF), topic=st.binary(max_size=6),
       lo=st.integers(-2, 8), hi=st.integers(-2, 8), max_bytes=st.integers(0, 300))
def test_differential_message_frame(twins, chunk, garbage, use_garbage, rid, topic, lo, hi, max_bytes):
    buf, base = chunk
    if use_garbage:
        buf, base = garbage, 0
    r = both(twins, "message_frame", buf, rid, topic, base + lo if base + lo >= 0 else 0,
             base + hi if base + hi >= 0 else 0, max_bytes)
    if r[0] == "ok" and r[1][1]:
        both(twins, "parse_messages", r[1][0][11:])


@HYP
@given(chunk=record_chunks(), topic=st.binary(max_size=6), count_delta=st.integers(-1, 1),
       garbage=st.binary(max_size=60), use_garbage=st.booleans())
def test_differential_parse_messages(twins, chunk, topic, count_delta, garbage, use_garbage):
    buf, _ = chunk
    if use_garbage:
        payload = garbage
    else:
        n = 0
        pos = 0
        while len(buf) - pos >= 24:  # count whole records, roughly, then perturb
            pos += 4 + struct.unpack_from(">I", buf, pos)[0]
            n += 1
        payload = raw_str(topic) + u32(max(0, n + count_delta)) + buf
    both(twins, "parse_messages", payload)


# -- decode_messages (the client's one-call-per-frame decoder) -----------------

def _msg_payload(w, records_mod, offsets_values, topic=b"dm"):
    recs = records_mod.encode_records([v for _, v in offsets_values], offsets_values[0][0], 77)
    frame = w.wire1.message_frame(recs, 9, topic, 0, 1 << 40, 1 << 30)[0]
    return frame[11:]


def test_decode_messages_builds_and_filters(w):
    from broker._pure import records as precords
    values = [(5, b"a"), (6, b""), (7, b"ccc")]
    payload = _msg_payload(w, precords, values)
    make = lambda *args: args  # noqa: E731 - the factory just returns its arguments
    assert w.wire1.decode_messages(payload, "dm", 0, make) == (
        [("dm", 5, 77, b"a"), ("dm", 6, 77, b""), ("dm", 7, 77, b"ccc")], 8)
    assert w.wire1.decode_messages(payload, "dm", 7, make) == ([("dm", 7, 77, b"ccc")], 8)
    assert w.wire1.decode_messages(payload, "dm", 9, make) == ([], 9)


def test_decode_messages_namedtuple_factories(w):
    """The client's Message (a NamedTuple) and other namedtuples come out as
    instances of their class; a subclass with its own __new__ gets it called."""
    import collections
    from broker._pure import records as precords
    from broker.client.message import Message
    payload = _msg_payload(w, precords, [(5, b"a"), (6, b"bb")])
    msgs, nxt = w.wire1.decode_messages(payload, "dm", 0, Message)
    assert nxt == 7 and [type(m) for m in msgs] == [Message, Message]
    assert msgs == [Message("dm", 5, 77, b"a"), Message("dm", 6, 77, b"bb")]
    assert msgs[1].value == b"bb" and msgs[1].offset == 6
    Plain = collections.namedtuple("Plain", "t o ts v")
    assert [type(m) for m in w.wire1.decode_messages(payload, "dm", 0, Plain)[0]] == [Plain] * 2

    class Shouting(Plain):
        __slots__ = ()

        def __new__(cls, t, o, ts, v):
            return super().__new__(cls, t, o, ts, v.upper())

    assert [m.v for m in w.wire1.decode_messages(payload, "dm", 0, Shouting)[0]] == [b"A", b"BB"]
    Three = collections.namedtuple("Three", "a b c")
    with pytest.raises(TypeError):
        w.wire1.decode_messages(payload, "dm", 0, Three)

    class Unhashable:
        __hash__ = None

        def __call__(self, *args):
            return args

    assert w.wire1.decode_messages(payload, "dm", 0, Unhashable())[0][0] == ("dm", 5, 77, b"a")


def test_decode_messages_messages_are_whole_tuples(w):
    """Messages built without tuple.__new__ (the compiled twin allocates
    them directly) hash and compare as tuples, and hold their fields'
    references exactly once; the compiled twin's stay out of the cyclic GC."""
    import gc
    import sys
    from broker._pure import records as precords
    from broker.client.message import Message
    payload = _msg_payload(w, precords, [(5, b"a"), (6, b"bb"), (7, b"")])
    topic = "".join(["refcount-", "topic"])  # a str of its own
    before = sys.getrefcount(topic)
    for _ in range(50):
        msgs, _nxt = w.wire1.decode_messages(payload, topic, 0, Message)
    assert sys.getrefcount(topic) == before + len(msgs)
    expected = [Message(topic, 5, 77, b"a"), Message(topic, 6, 77, b"bb"),
                Message(topic, 7, 77, b"")]
    assert msgs == expected and [hash(m) for m in msgs] == [hash(m) for m in expected]
    if w.name == "c":  # the compiled twin keeps them out of the GC's lists
        assert not any(gc.is_tracked(m) for m in msgs)
    assert msgs[2]._replace(value=b"z").value == b"z" and tuple(msgs[0]) == tuple(expected[0])
    del msgs, expected
    assert sys.getrefcount(topic) == before


def test_decode_messages_refuses_corruption(w):
    from broker._pure import records as precords
    payload = bytearray(_msg_payload(w, precords, [(0, b"hello"), (1, b"world")]))
    payload[-1] ^= 0x01
    with pytest.raises(ValueError, match="checksum"):
        w.wire1.decode_messages(bytes(payload), "dm", 0, lambda *a: a)
    with pytest.raises(ValueError, match="records decoded"):
        w.wire1.decode_messages(bytes(payload[:-3]), "dm", 0, lambda *a: a)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 12))
def test_decode_messages_twins_agree(data, min_offset):
    from broker._pure import wire1 as pw
    if os.environ.get("PYLOGSTREAMS_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("pure-only run (PYLOGSTREAMS_NO_EXTENSIONS): no compiled twin to compare")
    from broker._speedups import wire1 as cw  # must import in a default build
    results = []
    for mod in (pw, cw):
        try:
            results.append(mod.decode_messages(data, "t", min_offset, lambda *a: a))
        except Exception as exc:  # the same exception type (and text) from both
            results.append((type(exc).__name__, str(exc)))
    assert results[0] == results[1]
