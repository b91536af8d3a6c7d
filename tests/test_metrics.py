"""``/metrics`` (Prometheus text format) and ``/healthz``, and JSON logs.

The page is checked with a small strict parser of the text exposition
format 0.0.4 written here (no prometheus_client dependency): every line a
comment, HELP/TYPE or a sample; every sample of a family declared by TYPE;
valid names, label escapes and values; no duplicate series; histograms
with cumulative buckets ending at +Inf == _count. Then the figures are
compared with what the test did: messages in and out per topic, consumer
lag, disk pending bytes, errors by kind, fsyncs.
"""

from __future__ import annotations

import json
import math
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from v0client import V0Client, consumer
from v1support import OLDEST, V1Conn, cmt, frame, pub

pytestmark = pytest.mark.integration

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"'
_SAMPLE = re.compile(r"^(%s)(\{(%s(?:,%s)*)?,?\})?\s+(\S+)(\s+-?\d+)?$" % (_NAME, _LABEL, _LABEL))
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_prometheus(text: str) -> dict:
    """``{family: {"type", "help", "samples": {(name, labels tuple): value}}}``; raises on errors."""
    assert text.endswith("\n"), "exposition must end with a newline"
    families: dict = {}
    current = None
    for n, line in enumerate(text.split("\n")[:-1], 1):
        if not line.strip():
            continue
        if line.startswith("#"):
            parts = line.split(None, 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                name = parts[2]
                assert re.fullmatch(_NAME, name), "line %d: bad metric name %r" % (n, name)
                fam = families.setdefault(name, {"type": None, "help": None, "samples": {}})
                if parts[1] == "TYPE":
                    assert fam["type"] is None, "line %d: second TYPE for %s" % (n, name)
                    assert not fam["samples"], "line %d: TYPE after samples of %s" % (n, name)
                    assert len(parts) == 4 and parts[3] in _TYPES, "line %d: %r" % (n, line)
                    fam["type"] = parts[3]
                    current = name
                else:
                    fam["help"] = parts[3] if len(parts) == 4 else ""
            continue
        m = _SAMPLE.match(line)
        assert m, "line %d is not a valid sample: %r" % (n, line)
        name, value = m.group(1), m.group(m.lastindex - 1) if m.group(m.lastindex) else None
        # Re-parse the pieces plainly (the regex above only validates).
        name = m.group(1)
        labels_text = m.group(2) or ""
        labels = tuple((k, _unescape(v)) for k, v in re.findall(_LABEL, labels_text))
        value_text = line[m.end(2) if m.group(2) else len(name):].split()[0]
        value = _value(value_text, n)
        fam_name = _family_of(name, families)
        assert fam_name is not None and families[fam_name]["type"], (
            "line %d: sample %s without a TYPE for its family" % (n, name))
        assert fam_name == current, "line %d: %s is not in its family's block" % (n, name)
        series = families[fam_name]["samples"]
        assert (name, labels) not in series, "line %d: duplicate series %s%r" % (n, name, labels)
        assert len({k for k, _ in labels}) == len(labels), "line %d: repeated label" % n
        series[(name, labels)] = value
    for name, fam in families.items():
        if fam["type"] == "histogram":
            _check_histogram(name, fam["samples"])
        if fam["type"] == "counter":
            assert all(v >= 0 for v in fam["samples"].values()), "negative counter %s" % name
    return families


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], v)


def _value(text: str, n: int) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf"))
    try:
        return float(text)
    except ValueError:
        raise AssertionError("line %d: bad value %r" % (n, text)) from None


def _family_of(sample: str, families: dict) -> str | None:
    if sample in families:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and families.get(sample[:-len(suffix)], {}).get("type") in (
                "histogram", "summary"):
            return sample[:-len(suffix)]
    return None


def _check_histogram(name: str, samples: dict) -> None:
    groups: dict = {}
    for (sample, labels), value in samples.items():
        rest = tuple(l for l in labels if l[0] != "le")
        g = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if sample == name + "_bucket":
            le = dict(labels)["le"]
            g["buckets"].append((float(le.replace("Inf", "inf")), value))
        elif sample == name + "_sum":
            g["sum"] = value
        elif sample == name + "_count":
            g["count"] = value
    for rest, g in groups.items():
        b = sorted(g["buckets"])
        assert b and math.isinf(b[-1][0]), "%s: no +Inf bucket" % name
        counts = [c for _, c in b]
        assert counts == sorted(counts), "%s: buckets not cumulative: %r" % (name, b)
        assert g["count"] == b[-1][1], "%s: _count %r != +Inf bucket %r" % (name, g["count"], b[-1][1])
        assert g["sum"] is not None and g["sum"] >= 0


def _get(port: int, path: str, method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request("http://127.0.0.1:%d%s" % (port, path), method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def _sample(fams: dict, family: str, sample: str | None = None, **labels) -> float | None:
    want = tuple(sorted(labels.items()))
    for (name, lab), v in fams["pylogstreams_" + family]["samples"].items():
        if name == "pylogstreams_" + (sample or family) and tuple(sorted(lab)) == want:
            return v
    return None


@pytest.fixture
def metrics_server(server):
    srv = server("--metrics-port", "0", "--log-format", "json", "--fsync", "always")
    m = None
    for line in srv.log_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            m = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", rec["message"]) or m
    assert m, "no 'metrics on' log line\n" + srv.log_tail()
    srv.metrics_port = int(m[1])
    return srv


def test_healthz_and_http_edges(metrics_server):
    port = metrics_server.metrics_port
    assert _get(port, "/healthz") == (200, "text/plain", "ok\n")
    assert _get(port, "/nope")[0] == 404
    assert _get(port, "/metrics", method="POST")[0] == 405
    # A garbage or oversized request does not hurt the broker.
    for junk in (b"\x00" * 100 + b"\r\n\r\n", b"GET /" + b"a" * 20000 + b" HTTP/1.0\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(junk)
            s.settimeout(10)
            try:
                while s.recv(65536):
                    pass
            except ConnectionError:
                pass
    assert _get(port, "/healthz")[0] == 200
    status, ctype, body = _get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    parse_prometheus(body)


def test_metrics_match_the_traffic(metrics_server):
    srv = metrics_server
    port = srv.port
    # v1: 7 messages to m.a in two batches; one consumer reads them; a
    # second client commits offset 3 (lag 4).
    with V1Conn(port) as p:
        p.hello(b"metrics-producer")
        p.publish("m.a", [b"1", b"2", b"3"])
        p.publish("m.a", [b"4", b"5", b"6", b"7"])
        with V1Conn(port) as c:
            c.hello(b"metrics-reader")
            rid, _ = c.subscribe("m.a", OLDEST)
            assert len(c.read_messages(7, rid)) == 7
            c.request(b"CMT", cmt("m.a", 7))
        with V1Conn(port) as lag:
            lag.hello(b"laggard")
            lag.request(b"CMT", cmt("m.a", 3))
        # Errors of three kinds, one each.
        expect = p.send(b"PUB", pub("m.a", [b"bad"], crcs={0: 1}))
        assert p.reply(expect)[0] == b"ERR"
        expect = p.send(b"XYZ")
        assert p.reply(expect)[0] == b"ERR"
        expect = p.send(b"PUB", pub("../m", [b"x"]))
        assert p.reply(expect)[0] == b"ERR"
    # v0: 5 messages to m.b, read by two consumers (10 out).
    consumers = [consumer(port, b"m.b", 0) for _ in range(2)]
    try:
        for c in consumers:
            c.barrier()
        with V0Client(port) as p:
            p.cid()
            p.pub_many(b"m.b", [b"b%d" % i for i in range(5)])
        for c in consumers:
            assert len(c.read_deliveries(5, topic=b"m.b")) == 5
    finally:
        for c in consumers:
            c.close()

    deadline = time.monotonic() + 10
    while True:  # offsets of v0 consumers and counters settle asynchronously
        fams = parse_prometheus(_get(srv.metrics_port, "/metrics")[2])
        if _sample(fams, "messages_out_total", topic="m.b") == 10:
            break
        assert time.monotonic() < deadline, _sample(fams, "messages_out_total", topic="m.b")
        time.sleep(0.05)
    assert fams["pylogstreams_messages_in_total"]["type"] == "counter"
    assert _sample(fams, "messages_in_total", topic="m.a") == 7
    assert _sample(fams, "messages_in_total", topic="m.b") == 5
    assert _sample(fams, "messages_out_total", topic="m.a") == 7
    assert _sample(fams, "messages_out_total", topic="m.b") == 10
    assert _sample(fams, "topic_next_offset", topic="m.a") == 7
    assert _sample(fams, "topic_bytes", topic="m.a") == 7 * (24 + 1)  # record header + 1 byte
    assert _sample(fams, "consumer_lag", client_id="laggard", topic="m.a") == 4
    assert _sample(fams, "consumer_lag", client_id="metrics-reader", topic="m.a") == 0
    assert _sample(fams, "disk_pending_bytes") == 0
    assert fams["pylogstreams_disk_pending_bytes"]["type"] == "gauge"
    assert _sample(fams, "errors_total", kind="bad_crc") == 1
    assert _sample(fams, "errors_total", kind="unknown_commands") == 1
    assert _sample(fams, "errors_total", kind="invalid_topics") == 1
    assert _sample(fams, "errors_total", kind="read_timeouts") == 0
    # --fsync always: every batch was fsynced, and timed.
    fsyncs = _sample(fams, "fsyncs_total")
    assert fsyncs >= 3
    assert _sample(fams, "disk_inline_writes_total") == 0  # never under fsync=always
    assert fams["pylogstreams_fsync_seconds"]["type"] == "histogram"
    assert _sample(fams, "fsync_seconds", "fsync_seconds_count") >= fsyncs
    assert _sample(fams, "connections") >= 0
    info = [lab for (n, lab) in fams["pylogstreams_info"]["samples"]]
    assert dict(info[0])["codec"] == {"c": "cython", "py": "python"}[srv.impl]


def test_labels_are_escaped(metrics_server):
    """A client id with quotes, backslashes and a newline cannot break the page."""
    with V1Conn(metrics_server.port) as c:
        c.hello(b'evil"} 1\nfake_metric{x="\\')
        c.publish("m.esc", [b"x"])
        c.request(b"CMT", cmt("m.esc", 0))
    fams = parse_prometheus(_get(metrics_server.metrics_port, "/metrics")[2])
    assert "fake_metric" not in fams
    assert _sample(fams, "consumer_lag", client_id='evil"} 1\nfake_metric{x="\\', topic="m.esc") == 1


def test_json_logs_are_one_object_per_line(metrics_server):
    with V1Conn(metrics_server.port) as c:
        c.hello()
        c.send_raw(frame(b"PUB", 5, pub("m.j", [b"x"], crcs={0: 7})))
        c.reply(5)
    lines = [l for l in metrics_server.log_text().splitlines() if l and not l.startswith("---")]
    assert lines
    levels = set()
    for line in lines:
        rec = json.loads(line)
        assert {"time", "level", "logger", "message"} <= rec.keys(), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["time"]), rec["time"]
        levels.add(rec["level"])
    assert {"info"} <= levels


def test_parser_rejects_broken_pages():
    """The parser above can fail: it is not a rubber stamp."""
    good = "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"b\"} 1\n"
    parse_prometheus(good)
    for bad in (good[:-1],                                         # no final newline
                "x_total 1\n",                                     # no TYPE
                good + 'x_total{a="b"} 2\n',                       # duplicate series
                good.replace('{a="b"}', '{a="b\n"}'),              # raw newline in a label
                good.replace(" 1\n", " one\n"),                    # bad value
                "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                "h_sum 1\nh_count 1\n",                            # not cumulative
                "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n"):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)
