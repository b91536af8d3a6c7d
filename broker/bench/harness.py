"""The end-to-end benchmark: scenarios, runs, the report.

Each *run* is one scenario against one system (ours in Cython or pure
mode, through the client library or raw frames; Redis Streams; NATS
JetStream) with a fresh server on a free loopback port in a temporary
directory. Load comes from ``spawn``-ed worker processes (see
:mod:`.workers`); the harness itself only starts servers, hands out the
plan, fires the start event and samples progress counters, the server's
CPU time and its memory.

Figures:

- ``msg/s``, ``MB/s``: messages (payload bytes) done between the start
  event and the last completion: acknowledged publishes for *publish*,
  deliveries for every scenario with consumers (each message counted
  once, when it arrives), round-trip pings for *conn*.
- latency: *e2e* is receipt time minus the ``time.time_ns()`` stamped into
  the payload when its batch was sent (same machine, same clock); *ack*
  is per batch, send to acknowledgement; *ping* is one round trip.
  Percentiles are nearest-rank over every sample.
- ``CPU s/M msgs``: the server process's user + system CPU seconds (all
  threads, from /proc/PID/stat) during the run, per million messages.
- ``peak RSS``: the server's VmHWM at the end of the run (a fresh server
  per run, so it is that run's peak).
"""

from __future__ import annotations

import argparse
import array
import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback

from . import report
from .servers import NatsServer, OursServer, RedisServer, ServerError, stop_all
from .workers import raise_nofile, worker_main

__all__ = ["main", "SCENARIOS"]

# name -> defaults. Counts are sized so that the default full run (every
# scenario, both codecs, raw mode, both peers) takes well under 10 minutes
# on a 2-core machine.
SCENARIOS: dict[str, dict] = {
    "publish": dict(desc="acknowledged publish only", producers=1, consumers=0, topics=1,
                    count=400_000, batch=1000, window=8),
    "consume": dict(desc="consume only, from a backlog", producers=0, consumers=1, topics=1,
                    count=400_000, batch=1000, window=8, backlog=True),
    "pubsub": dict(desc="produce and consume at once", producers=1, consumers=1, topics=1,
                   count=400_000, batch=1000, window=8),
    "devlog50": dict(desc="devlog: 50 producers + 50 consumers, 50 topics", producers=50,
                     consumers=50, topics=50, count=200_000, batch=100, window=2),
    "latency": dict(desc="fixed rate 10k msg/s, end-to-end latency", producers=1, consumers=1,
                    topics=1, rate=10_000, duration=5.0, batch=100, window=64),
    "conn1k": dict(desc="1,000 connections, each pinging every second", connections=1_000,
                   hold=3.0, ping_interval=1.0, procs=2),
    "conn10k": dict(desc="10,000 connections, each pinging every 5 seconds", connections=10_000,
                    hold=6.0, ping_interval=5.0, procs=2),
}
QUICK = {  # --quick: small enough for a smoke test
    "publish": dict(count=20_000), "consume": dict(count=20_000), "pubsub": dict(count=20_000),
    "devlog50": dict(count=10_000), "latency": dict(duration=1.0),
    "conn1k": dict(connections=200, hold=1.0), "conn10k": dict(connections=1_000, hold=1.0),
}
RAW_SCENARIOS = ("publish", "consume", "pubsub")
PEERS = ("redis", "nats")
_PROGRESS_EVERY = 0.1   # seconds between counter samples


# -- planning -------------------------------------------------------------------


class Run:
    """One scenario against one system."""

    def __init__(self, scenario: str, system: str, codec: str | None, params: dict) -> None:
        self.scenario = scenario
        self.system = system            # ours | ours-raw | redis | nats
        self.codec = codec              # cython | pure (ours only)
        self.params = params
        self.label = "%s/%s" % (system, codec) if codec else system


def _split(items: list, parts: int) -> list[list]:
    parts = max(1, min(parts, len(items)))
    return [items[i::parts] for i in range(parts)]


def plan_run(run: Run, port: int, args) -> dict:
    """Worker plans for the preload phase (if any) and the measured phase."""
    p = run.params
    sc = run.scenario
    topics = ["bench-%s-%d" % (sc, t) for t in range(max(1, p.get("topics", 1)))]
    base = dict(system=run.system, host="127.0.0.1", port=port, size=p["size"], batch=p["batch"],
                window=p["window"], fetch=p["fetch"], max_seconds=args.max_seconds,
                client_pure=(run.codec == "pure" and args.client_codec == "same")
                or args.client_codec == "pure",
                max_frame_bytes=p.get("max_frame_bytes", 1 << 20), stamps=not p.get("backlog"),
                commit_interval=args.commit_interval, malloc=args.malloc)
    phases = []
    if sc.startswith("conn"):
        clients = [dict(name="conn-%d" % j) for j in range(p["connections"])]
        plans = [dict(base, role="conn", clients=part, hold=p["hold"],
                      ping_interval=p["ping_interval"])
                 for part in _split(clients, p.get("procs") or 2)]
        phases.append(("measure", plans))
        return {"phases": phases, "expected": [], "headline": "conn"}

    batch = p["batch"]
    expected: list[int] = []
    if p.get("backlog"):
        # Preload the whole count, split over the topics; consumers read it all.
        per_topic = [p["count"] // len(topics) + (1 if t < p["count"] % len(topics) else 0)
                     for t in range(len(topics))]
        preload_system = "ours-raw" if run.system == "ours" else run.system
        pre_clients = [dict(name="pre-%d" % t, topic=topics[t], quota=per_topic[t])
                       for t in range(len(topics))]
        phases.append(("preload", [dict(base, system=preload_system, role="preload",
                                        clients=pre_clients, batch=batch, window=4)]))
        topic_total = dict(zip(topics, per_topic))
        n_prod = 0
    else:
        n_prod = p["producers"]
        topic_total = dict.fromkeys(topics, 0)
    plans = []
    if n_prod:
        count = p.get("count") or 0
        prods = []
        for j in range(n_prod):
            quota = count // n_prod + (1 if j < count % n_prod else 0)
            topic = topics[j % len(topics)]
            topic_total[topic] += quota
            prods.append(dict(name="prod-%d" % j, topic=topic, quota=quota))
        for part in _split(prods, p.get("procs") or 1):
            plans.append(dict(base, role="produce", clients=part, rate=p.get("rate") or 0,
                              duration=p.get("duration") or 0))
    n_cons = p.get("consumers", 0)
    if n_cons:
        cons = []
        for j in range(n_cons):
            topic = topics[j % len(topics)]
            cons.append(dict(name="cons-%d" % j, topic=topic, slot=j))
            # Known up front in count mode; set from the producers' results otherwise.
            expected.append(-1 if p.get("duration") else topic_total[topic])
        for part in _split(cons, p.get("procs") or 1):
            plans.append(dict(base, role="consume", clients=part))
    phases.append(("measure", plans))
    return {"phases": phases, "expected": expected,
            "headline": "consume" if n_cons else "produce", "topics": topics}


# -- running ----------------------------------------------------------------------


class _Progress:
    """A progress bar on stderr, only when stderr is a terminal (tqdm if installed)."""

    def __init__(self, desc: str, total: float, unit: str) -> None:
        self.bar = None
        self.simple = False
        self.desc = desc
        self.total = total
        self.last = 0.0
        if not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
            extra = {"bar_format": "{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} s"} \
                if unit == "s" else {}
            self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                            file=sys.stderr, dynamic_ncols=True, **extra)
        except ImportError:
            self.simple = True

    def update(self, value: float) -> None:
        if self.bar is not None:
            value = min(value, self.total) if self.total else value
            self.bar.update(value - self.last)
            self.last = value
        elif self.simple:
            sys.stderr.write("\r%s %s/%s   " % (self.desc, report.fmt_rate(value), report.fmt_rate(self.total)))
            sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.simple:
            sys.stderr.write("\r" + " " * (len(self.desc) + 40) + "\r")
            sys.stderr.flush()


def _phase(ctx, server, plans: list[dict], expected_init: list[int], progress_desc: str):
    """Spawn the workers of one phase, start them together, collect what they report."""
    n = len(plans)
    counters = ctx.Array("q", max(1, n), lock=False)
    expected = ctx.Array("q", max(1, len(expected_init)), lock=False)
    for i, v in enumerate(expected_init):
        expected[i] = v
    start, stop = ctx.Event(), ctx.Event()
    q = ctx.Queue()
    shared = dict(counters=counters, expected=expected, start=start, stop=stop, queue=q)
    procs = [ctx.Process(target=worker_main, args=(wid, plan, shared), daemon=True,
                         name="bench-%s-%d" % (plan["role"], wid))
             for wid, plan in enumerate(plans)]
    out = {"results": {}, "errors": [], "series": []}
    started = []
    try:
        for proc in procs:
            proc.start()
            started.append(proc)
        connections = sum(len(p["clients"]) for p in plans)
        ready_deadline = time.monotonic() + 60 + connections / 200
        ready = {}
        while len(ready) < n:
            try:
                msg = q.get(timeout=max(0.05, ready_deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError("workers not ready after %.0f s (%d of %d)"
                                   % (60 + connections / 200, len(ready), n)) from None
            if msg[0] == "ready":
                ready[msg[1]] = msg[2]
            elif msg[0] == "error":
                raise RuntimeError("worker %d failed while connecting: %s" % (msg[1], msg[2]))
            if not all(p.is_alive() for p in procs) and len(ready) < n:
                dead = [p.name for p in procs if not p.is_alive()]
                if dead and q.empty():
                    raise RuntimeError("worker(s) died before ready: %s" % ", ".join(dead))
        out["connect_seconds"] = max(ready.values()) if ready else 0.0
        mem_ready = server.stats.memory()
        cpu0 = server.stats.cpu_seconds()
        t0 = time.time()
        start.set()
        head_role = "consume" if any(p["role"] == "consume" for p in plans) else plans[0]["role"]
        head_ids = [i for i, p in enumerate(plans) if p["role"] == head_role]
        prod_ids = [i for i, p in enumerate(plans) if p["role"] == "produce"]
        duration = max([p.get("duration") or 0 for p in plans] + [p.get("hold") or 0 for p in plans])
        total = sum(x for x in expected_init if x > 0) if head_role == "consume" else \
            sum(c.get("quota", 0) for i in head_ids for c in plans[i]["clients"])
        use_time = duration > 0 and (head_role == "conn" or any(x < 0 for x in expected_init)
                                     or plans[0].get("rate"))
        bar = _Progress(progress_desc, duration if use_time else total, "s" if use_time else "msg")
        deadline = time.monotonic() + run_deadline(plans)
        producers_done = False
        dead_since: dict = {}   # worker index -> when it was first seen dead without a result
        finished: set = set()   # workers that reported a result or an error
        try:
            while len(finished) < n:
                try:
                    msg = q.get(timeout=_PROGRESS_EVERY)
                except queue.Empty:
                    msg = None
                if msg is not None:
                    if msg[0] == "result":
                        out["results"][msg[1]] = msg[2]
                        finished.add(msg[1])
                    elif msg[0] == "error":
                        out["errors"].append("worker %d (%s): %s" % (msg[1], plans[msg[1]]["role"], msg[2]))
                        finished.add(msg[1])
                        stop.set()
                now = time.time()
                done = sum(counters[i] for i in head_ids)
                out["series"].append((round(now - t0, 3), done))
                bar.update(now - t0 if use_time else done)
                if not producers_done and prod_ids and all(i in out["results"] for i in prod_ids):
                    producers_done = True
                    per_topic: dict = {}
                    for i in prod_ids:
                        for topic, k in out["results"][i]["per_topic"].items():
                            per_topic[topic] = per_topic.get(topic, 0) + k
                    cons = [c for p in plans if p["role"] == "consume" for c in p["clients"]]
                    for c in cons:
                        expected[c["slot"]] = per_topic.get(c["topic"], 0)
                if time.monotonic() > deadline and not stop.is_set():
                    out["errors"].append("run exceeded its time limit; stopped")
                    stop.set()
                    deadline = time.monotonic() + 15
                elif time.monotonic() > deadline:
                    break
                for i, proc in enumerate(procs):
                    if proc.is_alive() or i in finished or not q.empty():
                        continue
                    # Dead without a result: give its last message a moment to arrive.
                    gone = dead_since.setdefault(i, time.monotonic())
                    if time.monotonic() - gone > 2.0:
                        out["errors"].append("worker %d exited (code %s) without a result"
                                             % (i, proc.exitcode))
                        stop.set()
                        finished.add(i)
        finally:
            bar.close()
        out["cpu"] = server.stats.cpu_seconds() - cpu0
        out["t0"] = t0
        out["mem_ready"] = mem_ready
        out["mem_end"] = server.stats.memory()
        out["head_ids"] = head_ids
        out["plans"] = plans
        return out
    finally:
        stop.set()
        for proc in started:
            proc.join(timeout=10)
        for proc in started:
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        q.close()
        q.cancel_join_thread()


def run_deadline(plans: list[dict]) -> float:
    p = plans[0]
    extra = (p.get("duration") or 0) + (p.get("hold") or 0)
    return p["max_seconds"] + extra + 5


def _start_server(run: Run, args, connections: int):
    if run.system.startswith("ours"):
        extra: tuple = ()
        if run.params.get("max_frame_bytes"):
            extra += ("--max-frame-bytes", str(run.params["max_frame_bytes"]))
        if connections:
            # The broker's defaults cap connections (5,000 per address): lift
            # them for the run, every benchmark client comes from 127.0.0.1.
            extra += OursServer.connection_limit_options(connections + 100)
        return OursServer(pure=run.codec == "pure", fsync=args.fsync, extra=extra).start()
    if run.system == "redis":
        return RedisServer(fsync=args.fsync, maxclients=max(10_000, connections + 64)).start()
    if run.system == "nats":
        return NatsServer(fsync=args.fsync).start()
    raise ValueError(run.system)


def execute(ctx, run: Run, args, index: int, total: int) -> dict:
    """Do one run; a dict for the report (``error`` set if it failed)."""
    p = run.params
    row = {"scenario": run.scenario, "system": run.system, "codec": run.codec, "label": run.label,
           "params": {k: v for k, v in p.items() if k != "desc"}}
    conns = p.get("connections", 0)
    server = None
    try:
        server = _start_server(run, args, conns)
        row["server"] = server.description
        plan = plan_run(run, server.port, args)
        base_mem = server.stats.memory()
        for name, plans in plan["phases"]:
            desc = "[%d/%d] %s %s%s" % (index, total, run.scenario, run.label,
                                        " (preload)" if name == "preload" else "")
            out = _phase(ctx, server, plans, plan["expected"] if name == "measure" else [], desc)
            if out["errors"]:
                raise RuntimeError("; ".join(e.strip() for e in out["errors"]))
            if name == "preload":
                continue
            fill_row(row, run, out, plan, base_mem)
    except Exception as exc:  # noqa: BLE001 - one failed run must not stop the others
        row["error"] = str(exc) if isinstance(exc, (ServerError, RuntimeError, OSError)) else \
            "%s: %s\n%s" % (type(exc).__name__, exc, traceback.format_exc(limit=6))
        if server is not None and server.proc is not None and server.proc.poll() is not None:
            row["error"] += " (server exited %s; log tail: %s)" % (server.proc.returncode,
                                                                  server.log_tail(5))
    finally:
        if server is not None:
            server.stop()
    return row


def fill_row(row: dict, run: Run, out: dict, plan: dict, base_mem: dict) -> None:
    p = run.params
    results = out["results"]
    head = plan["headline"]
    role = "conn" if head == "conn" else head
    heads = [r for r in results.values() if r["role"] == role]
    prods = [r for r in results.values() if r["role"] == "produce"]
    count = sum(r["count"] for r in heads)
    t_last = max([r["t_last"] for r in heads if r["t_last"]] or [out["t0"]])
    seconds = max(1e-9, t_last - out["t0"])
    if head == "conn":
        # Pings are spread over the hold time by design: rate over the hold.
        seconds = max(seconds, p["hold"])
    lat = array.array("q")
    kind = "-"
    if head == "conn":
        for r in heads:
            lat.frombytes(r["lat"])
        kind = "ping"
    elif head == "consume" and not p.get("backlog") and run.system != "ours-raw":
        for r in heads:
            lat.frombytes(r["lat"])
        kind = "e2e"
    elif prods:
        for r in prods:
            lat.frombytes(r["lat"])
        kind = "ack/batch"
    row.update({
        "messages": count,
        "published": sum(r["count"] for r in prods),
        "seconds": round(seconds, 3),
        "msgs_per_s": count / seconds,
        "mb_per_s": None if head == "conn" else count * p.get("size", 0) / seconds / 1e6,
        "latency_ms": report.percentiles(lat),
        "latency_kind": kind,
        "latency_samples": len(lat),
        "cpu_seconds": round(out["cpu"], 3),
        "cpu_s_per_m": out["cpu"] / (count / 1e6) if count else None,
        "server_hwm": out["mem_end"]["hwm"],
        "server_rss_base": base_mem["rss"],
        "server_rss_ready": out["mem_ready"]["rss"],
        "series": out["series"][:: max(1, len(out["series"]) // 600)],
        "malloc_tuned": bool(results) and all(r.get("malloc_tuned") for r in results.values()),
        "_lat": lat,
    })
    notes = []
    if head == "conn":
        n = p["connections"]
        row["connections"] = n
        per = (out["mem_ready"]["rss"] - base_mem["rss"]) / n / 1024 if n else 0
        notes.append("%s conns, %.1f KB/conn, connected in %.1f s"
                     % ("{:,}".format(n), per, out.get("connect_seconds", 0.0)))
        if p.get("capped"):
            notes.append(p["capped"])
    if p.get("rate") and prods:
        p_last = max([r["t_last"] for r in prods if r["t_last"]] or [out["t0"]])
        achieved = row["published"] / max(1e-9, p_last - out["t0"])
        row["achieved_rate"] = achieved
        notes.append("published at %s of %s msg/s" % (report.fmt_rate(achieved), report.fmt_rate(p["rate"])))
        if achieved < 0.95 * p["rate"]:
            notes.append("fell behind the rate")
    if run.system == "ours-raw":
        notes.append("pre-encoded frames")
    if head == "consume" and p.get("backlog"):
        notes.append("backlog")
    expected = sum(x for x in plan["expected"] if x > 0)
    if head == "consume" and expected and count < expected:
        notes.append("got %s of %s" % ("{:,}".format(count), "{:,}".format(expected)))
    row["notes"] = "; ".join(notes)


# -- command line -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="pylogstreams bench",
        description="End-to-end benchmark of pylogstreams against Redis Streams and NATS "
                    "JetStream, all started on free loopback ports and stopped afterwards. "
                    "Prints a markdown report (results, ours/peer ratios, issue 5 targets).",
        epilog="Scenarios: " + "; ".join("%s: %s" % (k, v["desc"]) for k, v in SCENARIOS.items()))
    ap.add_argument("--scenarios", default="all",
                    help="comma-separated subset of: %s (default: all)" % ",".join(SCENARIOS))
    ap.add_argument("--quick", action="store_true", help="tiny counts: a smoke run of a few seconds per scenario")
    ap.add_argument("--codec", choices=("both", "cython", "pure"), default="both",
                    help="broker codec(s) to run (default: both)")
    ap.add_argument("--pure", action="store_true", help="same as --codec pure")
    ap.add_argument("--mode", choices=("client", "raw", "both"), default="both",
                    help="ours through the client library, through pre-encoded raw frames, or both "
                         "(raw only applies to publish, consume, pubsub; default: both)")
    ap.add_argument("--client-codec", choices=("cython", "pure", "same"), default="cython",
                    help="codec of the load-generating clients (default: cython, so that the "
                         "broker is what is measured; 'same' follows the broker)")
    ap.add_argument("--peers", default="redis,nats", help="comma-separated peers, or 'none' (default: redis,nats)")
    ap.add_argument("--commit-interval", type=float, metavar="S",
                    help="our client's auto commit interval in seconds; 0 commits every time a "
                         "subscription's buffer runs dry (default: the client's, 0.1)")
    ap.add_argument("--fsync", choices=("always", "interval", "never"), default="interval",
                    help="our --fsync; Redis appendfsync always/everysec/no to match (default: interval)")
    g = ap.add_argument_group("load (override every selected scenario's default)")
    g.add_argument("--size", type=int, default=1024, help="message size in bytes (default: 1024, min 16)")
    g.add_argument("--count", type=int, help="messages per run (count mode)")
    g.add_argument("--duration", type=float, help="seconds of producing per run (duration mode, instead of --count)")
    g.add_argument("--batch", type=int, help="messages per publish batch / fetch")
    g.add_argument("--window", type=int, help="batches in flight per producer connection")
    g.add_argument("--rate", type=float, help="target publish rate, msg/s (all producers together)")
    g.add_argument("--topics", type=int, help="topics")
    g.add_argument("--producers", type=int, help="producer connections")
    g.add_argument("--consumers", type=int, help="consumer connections")
    g.add_argument("--procs", type=int, help="worker processes per role")
    g.add_argument("--connections", type=int, help="connections for the conn scenarios")
    ap.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                    help="glibc malloc settings of every worker process, ours and the peers' "
                         "alike: 'tuned' calls broker.client.tune_malloc() (freed memory stays "
                         "in the process; see docs/benchmarks.md), 'default' leaves glibc's "
                         "(default: tuned)")
    ap.add_argument("--warm-memory", type=float, default=0.0, metavar="GIB",
                    help="before each run, touch and release GIB GiB of memory, so that the "
                         "run's page cache and heaps land on RAM the machine has backed (on VMs "
                         "that back guest RAM lazily and take freed RAM back within seconds, "
                         "first-touch writes are several times slower; see docs/benchmarks.md; "
                         "default: 0, off)")
    ap.add_argument("--max-seconds", type=float, default=90.0,
                    help="time limit per run; a run over it is stopped and reported (default: 90)")
    ap.add_argument("--json", metavar="FILE", help="write every figure, the settings and the machine as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="also write the markdown report to FILE")
    ap.add_argument("--plot", metavar="FILE.png", help="latency histograms and throughput over time (needs matplotlib)")
    return ap


def make_runs(args) -> tuple[list[Run], list[str]]:
    names = list(SCENARIOS) if args.scenarios == "all" else [s.strip() for s in args.scenarios.split(",") if s.strip()]
    for s in names:
        if s not in SCENARIOS:
            raise SystemExit("unknown scenario %r; choose from %s" % (s, ", ".join(SCENARIOS)))
    codec = "pure" if args.pure else args.codec
    codecs = ["cython", "pure"] if codec == "both" else [codec]
    peers = [] if args.peers.strip() in ("", "none") else [p.strip() for p in args.peers.split(",")]
    for p in peers:
        if p not in PEERS:
            raise SystemExit("unknown peer %r; choose from %s" % (p, ", ".join(PEERS)))
    if args.size < 16:
        raise SystemExit("--size must be at least 16 (8 bytes carry the timestamp)")
    notes: list[str] = []
    if args.commit_interval is not None:
        if args.commit_interval < 0:
            raise SystemExit("--commit-interval must be >= 0")
        notes.append("our client's auto commit interval: %g s (--commit-interval; the "
                     "client's default is 0.1 s)" % args.commit_interval)
    runs = []
    soft, hard = raise_nofile()
    for s in names:
        params = dict(SCENARIOS[s])
        if args.quick:
            params.update(QUICK[s])
        params["size"] = args.size
        params.setdefault("batch", 1000)
        params.setdefault("window", 8)
        for opt in ("count", "duration", "batch", "window", "rate", "topics", "producers",
                    "consumers", "procs", "connections"):
            v = getattr(args, opt)
            if v is not None and (opt != "connections" or s.startswith("conn")):
                params[opt] = v
        if args.duration is not None and not s.startswith("conn"):
            params.pop("count", None)
        if params.get("rate") and not params.get("duration") and not params.get("count"):
            params["duration"] = 5.0
        # A batch must fit in one frame (the broker's default --max-frame-bytes, 1 MiB);
        # a message too big for that raises the broker's limit for the run.
        fit = max(1, ((1 << 20) - 256) // (args.size + 8))
        if args.size + 8 + 256 > (1 << 20):
            params["max_frame_bytes"] = args.size + 4096
        if params["batch"] > fit:
            params["batch"] = fit
            notes.append("%s: batch capped to %d messages so that a PUB frame fits in 1 MiB" % (s, fit))
        params["fetch"] = max(params["batch"], 1000)
        if s.startswith("conn"):
            need = params["connections"] + 256
            if hard != -1 and need > hard:
                params["capped"] = "capped: RLIMIT_NOFILE hard limit %d" % hard
                notes.append("%s: %d connections need %d file descriptors but the hard limit is %d; "
                             "running %d" % (s, params["connections"], need, hard, hard - 256))
                params["connections"] = max(1, hard - 256)
        for c in codecs:
            runs.append(Run(s, "ours", c, dict(params)))
        if args.mode in ("raw", "both") and s in RAW_SCENARIOS:
            for c in codecs:
                runs.append(Run(s, "ours-raw", c, dict(params)))
        if args.mode == "raw":
            runs = [r for r in runs if not (r.system == "ours" and r.scenario in RAW_SCENARIOS)]
        for peer in peers:
            runs.append(Run(s, peer, None, dict(params)))
    return runs, notes


def check_peers(peers: list[str]) -> dict:
    """peer -> reason it is unavailable (binary or Python client missing)."""
    from .peers import missing_client
    missing = {}
    for p in peers:
        binary = RedisServer.binary() if p == "redis" else NatsServer.binary()
        if binary is None:
            missing[p] = "%s-server not installed (apt-get install %s-server)" % (p, p)
            continue
        why = missing_client(p)
        if why:
            missing[p] = why + " (pip install 'pylogstreams[bench]')"
    return missing


def warm_memory(gib: float) -> tuple[int, float]:
    """Touch ``gib`` GiB of anonymous memory once, then release it: (bytes, seconds).

    Some hypervisors back guest RAM only when the guest first writes it;
    until then every new page (the page cache our log writes fill, a
    consumer's fresh heap) costs a trip to the host, and pwrite into such
    pages ran at 0.6 to 0.9 GB/s here against 4 to 5 GB/s once warm. The
    released pages go back to the guest's free lists, still backed, and are
    what the next allocations get, until the guest reports them free to
    the host (free page reporting), which here took under 20 s: hence a
    warm-up before each run. Capped at MemAvailable less 2 GiB.
    """
    import mmap
    want = int(gib * 2 ** 30)
    cap = report.meminfo("MemAvailable") - 2 * 2 ** 30
    size = max(0, min(want, cap)) // mmap.PAGESIZE * mmap.PAGESIZE
    if size <= 0:
        return 0, 0.0
    t0 = time.monotonic()
    m = mmap.mmap(-1, size)
    try:
        page = mmap.PAGESIZE
        for pos in range(0, size, page):
            m[pos] = 1
    finally:
        m.close()
    return size, time.monotonic() - t0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    runs, notes = make_runs(args)
    peers = sorted({r.system for r in runs if r.system in PEERS}, key=PEERS.index)
    missing = check_peers(peers)
    for p, why in missing.items():
        msg = "%s: skipped, %s" % (p, why)
        notes.append(msg)
        print("bench: " + msg, file=sys.stderr)
    if "redis" in peers and "redis" not in missing:
        from .peers import has_hiredis
        if not has_hiredis():
            notes.append("redis: hiredis not installed; redis-py uses its pure-Python parser")
    runs = [r for r in runs if r.system not in missing]
    peers = [p for p in peers if p not in missing]

    # Ctrl-C reaches us (the servers run in their own sessions); SIGTERM too.
    def on_term(signum, frame):
        raise KeyboardInterrupt
    old_term = signal.signal(signal.SIGTERM, on_term)
    ctx = mp.get_context("spawn")
    machine = report.machine_info()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    results: list[dict] = []
    warmed: list[tuple[int, float]] = []
    t_all = time.monotonic()
    interrupted = False
    try:
        for i, run in enumerate(runs, 1):
            if args.warm_memory > 0:
                size, secs = warm_memory(args.warm_memory)
                warmed.append((size, secs))
            row = execute(ctx, run, args, i, len(runs))
            results.append(row)
            if row.get("error"):
                print("bench: [%d/%d] %s %s FAILED: %s" % (i, len(runs), run.scenario, run.label,
                                                          row["error"][:400]), file=sys.stderr)
            else:
                lat = row.get("latency_ms")
                print("bench: [%d/%d] %-9s %-16s %12s msg/s %8s MB/s  p99 %s ms (%s)  cpu %s s/M  rss %.0f MB"
                      % (i, len(runs), run.scenario, run.label, report.fmt_rate(row["msgs_per_s"]),
                         report.fmt_rate(row["mb_per_s"]), "%.2f" % lat[1] if lat else "-",
                         row["latency_kind"], "%.1f" % row["cpu_s_per_m"] if row.get("cpu_s_per_m") else "-",
                         row["server_hwm"] / 1e6), file=sys.stderr)
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; stopping servers and workers", file=sys.stderr)
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, old_term)
    elapsed = time.monotonic() - t_all
    if args.warm_memory > 0:
        done = [w for w in warmed if w[0]]
        if done:
            notes.append("warmed %.2f GiB of memory before each of %d runs (--warm-memory %g), "
                         "%.1f s in all" % (min(w[0] for w in done) / 2 ** 30, len(done),
                                            args.warm_memory, sum(w[1] for w in done)))
        if len(done) < len(warmed):
            notes.append("--warm-memory %g skipped before %d runs: MemAvailable unknown or "
                         "under 2 GiB" % (args.warm_memory, len(warmed) - len(done)))
    measured = [r for r in results if not r.get("error")]
    if args.malloc == "tuned" and measured:
        tuned = sum(1 for r in measured if r.get("malloc_tuned"))
        notes.append("worker processes (ours and the peers' alike) kept freed memory for reuse "
                     "(broker.client.tune_malloc(), glibc) in %d of %d runs; --malloc default "
                     "leaves glibc's settings" % (tuned, len(measured)))
    elif measured:
        notes.append("worker processes ran with glibc's own malloc settings (--malloc default)")
    load_after = report.machine_info()["loadavg"]

    text = render(results, peers, notes, machine, load_after, args, started, elapsed, interrupted)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        doc = {"started": started, "elapsed_s": round(elapsed, 1), "command": report.command_line(),
               "git": report.git_describe(os.path.dirname(os.path.dirname(os.path.dirname(
                   os.path.abspath(__file__))))),
               "machine": machine, "loadavg_after": load_after, "notes": notes,
               "settings": {k: v for k, v in vars(args).items()},
               "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]}
        report.write_json(args.json, doc)
    if args.plot:
        why = report.plot(args.plot, results)
        if why:
            print("bench: " + why, file=sys.stderr)
    if interrupted:
        return 130
    return 1 if any(r.get("error") for r in results) else 0


def render(results, peers, notes, machine, load_after, args, started, elapsed, interrupted) -> str:
    m = machine
    busy = max(m["loadavg"][0], load_after[0]) > 0.5
    lines = [
        "## pylogstreams end-to-end benchmark",
        "",
        "%s; %s cores, %s, %s GiB; Linux %s; %s %s; CRC-32 %s; %s; fsync %s; %d-byte messages; %s"
        % (started, m["nproc"], m["cpu"], m["memory_gib"], m["kernel"], m["implementation"],
           m["python"], m.get("crc32", "?"), "--quick" if args.quick else "full run", args.fsync,
           args.size, "%.0f s" % elapsed),
        "",
        "Load average before / after: %s / %s%s" % (
            " ".join("%.2f" % x for x in m["loadavg"]), " ".join("%.2f" % x for x in load_after),
            " (**busy machine**: other work was running, figures are lower and noisier than on an "
            "idle one)" if busy else ""),
        "",
    ]
    servers = []
    for r in results:
        if r.get("server") and r["server"] not in servers and not r["system"].startswith("ours"):
            servers.append(r["server"])
    if servers:
        lines += ["Peers: " + "; ".join(servers) + ".", ""]
    if interrupted:
        lines += ["**Interrupted**: the tables hold the runs that finished.", ""]
    lines += ["### Results", "", report.results_table(results), ""]
    if peers:
        lines += ["### Ratios, ours / peer", "", report.ratio_table(results, peers), ""]
    lines += ["### Targets (issue 5)", "", report.targets_table(results, args.quick), ""]
    if notes:
        lines += ["### Notes", ""] + ["- " + n for n in notes] + [""]
    return "\n".join(lines).rstrip()
