"""In-process lifecycle probe, run in a subprocess by test_lifecycle.py.

    python tests/inproc_probe.py --loop asyncio|uvloop --data-dir DIR

It runs a :class:`broker.server.Broker` inside this process, on the stdlib
asyncio loop or on uvloop, makes consumers disconnect from a big backlog in
the middle of their stream in several ways, and checks after each that the
broker kept nothing running for them: its gauges are back to zero, no
message is written any more, the loop's tasks are the ones from before, no
live loop handle (stdlib loop: ``_ready`` and ``_scheduled``) is bound to a
connection, and no connection object survives a garbage collection. It
also checks that a consumer reconnecting with the same client id resumes no
earlier than what it received and no later than what the server wrote.

A subprocess because the codec implementation is chosen once, at import
(``PYLOGSTREAMS_NO_EXTENSIONS``), and so each run gets a fresh loop and
fresh module state. Prints one JSON object on stdout: ``problems`` (empty
when everything held) and the observations behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import json
import socket
import struct
import sys
import time
import uuid
import zlib

_U32 = struct.Struct(">I")
N_BACKLOG = 20_000
MSG_SIZE = 1000
TOPIC = b"backlog"
WAIT = 10.0  # seconds any single wait may take


def frame(body: bytes) -> bytes:
    return _U32.pack(len(body)) + body


def pub_frame(topic: bytes, msg: bytes) -> bytes:
    body = b"PUB " + topic + b" " + msg
    return _U32.pack(len(body)) + body + _U32.pack(zlib.crc32(msg))


def message(i: int) -> bytes:
    head = b"m%010d|" % i
    return head + b"x" * (MSG_SIZE - len(head))


class AClient:
    """A raw non-blocking socket driven through loop.sock_* (no tasks, no transports)."""

    def __init__(self, loop, sock: socket.socket) -> None:
        self.loop = loop
        self.sock = sock
        self.buf = bytearray()
        self.frames_read = 0

    @classmethod
    async def connect(cls, loop, port: int, rcvbuf: int | None = None) -> "AClient":
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), WAIT)
        return cls(loop, s)

    async def send(self, data: bytes) -> None:
        await asyncio.wait_for(self.loop.sock_sendall(self.sock, data), WAIT)

    async def read_frames(self, n: int) -> list:
        out = []
        deadline = time.monotonic() + WAIT
        while len(out) < n:
            while len(out) < n and len(self.buf) >= 4:
                size = _U32.unpack_from(self.buf, 0)[0]
                if len(self.buf) < 4 + size:
                    break
                out.append(bytes(self.buf[4:4 + size]))
                del self.buf[:4 + size]
            if len(out) >= n:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("read %d of %d frames" % (len(out), n))
            data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), remaining)
            if not data:
                raise ConnectionError("EOF after %d of %d frames" % (len(out), n))
            self.buf += data
        self.frames_read += len(out)
        return out

    async def read_eof(self) -> None:
        deadline = time.monotonic() + WAIT
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no EOF")
            try:
                data = await asyncio.wait_for(self.loop.sock_recv(self.sock, 65536), remaining)
            except ConnectionResetError:
                return
            if not data:
                return

    def abort(self) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


async def wait_until(pred, what: str, problems: list, timeout: float = WAIT,
                     detail=None) -> bool:
    """Bounded wait for a condition on broker state (the broker exposes no event for it)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            problems.append("timed out waiting for: " + what
                            + ("" if detail is None else " (%s)" % (detail(),)))
            return False
        await asyncio.sleep(0.01)
    return True


def _owners(handle) -> list:
    """Objects a loop handle's callback is bound to (bound method self, partial args, args)."""
    out = []
    cb = getattr(handle, "_callback", None)
    if cb is None:
        return out
    seen = [cb]
    while seen:
        f = seen.pop()
        if isinstance(f, functools.partial):
            seen.append(f.func)
            out.extend(f.args)
            continue
        owner = getattr(f, "__self__", None)
        if owner is not None:
            out.append(owner)
        for cell in getattr(f, "__closure__", None) or ():
            try:
                out.append(cell.cell_contents)
            except ValueError:
                pass
    out.extend(getattr(handle, "_args", None) or ())
    return out


def _is_connection_object(obj, conn_types) -> bool:
    if conn_types and isinstance(obj, conn_types):
        return True
    mod = type(obj).__module__ or ""
    return mod.startswith("broker.") and isinstance(obj, asyncio.BaseProtocol)


def live_connection_handles(loop, conn_types) -> list:
    """Stdlib loop only: live (not cancelled) handles bound to a connection object."""
    found = []
    handles = list(getattr(loop, "_ready", ())) + list(getattr(loop, "_scheduled", ()))
    for h in handles:
        if h.cancelled():
            continue
        for o in _owners(h):
            if _is_connection_object(o, conn_types):
                found.append(repr(h)[:200])
                break
    return found


async def main(args) -> dict:
    from broker import codec
    from broker.config import Config
    from broker.server import Broker
    try:
        from broker.server.connection import Connection
        from broker.server.delivery import Subscription
        conn_types = (Connection, Subscription)
    except ImportError:  # the layout may change; fall back to the module-name rule
        conn_types = ()

    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    problems: list = []
    obs: dict = {"codec": codec.IMPLEMENTATION, "loop": type(loop).__module__ + "." +
                 type(loop).__name__, "modes": {}}
    stdlib = args.loop == "asyncio"

    broker = Broker(Config(host="127.0.0.1", port=0, data_dir=args.data_dir,
                           heartbeat_timeout=120.0))
    await broker.start()
    port = broker.port
    tasks_at_start = {t for t in asyncio.all_tasks() if t is not me}

    def gauges() -> dict:
        s = broker.stats()
        return {k: s[k] for k in ("connections", "subscriptions", "pending_pumps", "timers",
                                  "messages_out")}

    def zeroed() -> bool:
        s = broker.stats()
        return (s["connections"] == 0 and s["subscriptions"] == 0
                and s["pending_pumps"] == 0 and s["timers"] == 0)

    # The backlog: N_BACKLOG messages from one pipelined producer.
    p = await AClient.connect(loop, port)
    await p.send(frame(b"REG"))
    [cid] = await p.read_frames(1)
    await p.send(frame(b"CID " + cid))
    for i in range(0, N_BACKLOG, 1000):
        await p.send(b"".join(pub_frame(TOPIC, message(j)) for j in range(i, i + 1000)))
    await p.send(b"\0\0\0\0")
    await p.read_eof()
    p.close()
    await wait_until(lambda: broker.stats()["messages_in"] >= N_BACKLOG and zeroed()
                     and broker.stats().get("pending_bytes", 0) == 0,
                     "backlog stored and producer gone", problems)
    baseline_tasks = {t for t in asyncio.all_tasks() if t is not me}
    obs["tasks_at_start"] = sorted(repr(t)[:120] for t in tasks_at_start)
    obs["tasks_baseline"] = sorted(repr(t)[:120] for t in baseline_tasks)
    if stdlib:
        baseline_fds = len(loop._selector.get_map())

    for mode in ("rst", "close_frame", "shutdown_wr", "rst_while_paused"):
        o: dict = {}
        obs["modes"][mode] = o
        s0 = broker.stats()
        mine = str(uuid.uuid4()).encode()
        small = mode == "rst_while_paused"
        c = await AClient.connect(loop, port, rcvbuf=4096 if small else None)
        await c.send(frame(b"CID " + mine) + frame(b"SUB " + TOPIC) + frame(b"SET " + TOPIC + b" 0"))
        got = await c.read_frames(10 if small else 300)
        for k, body in enumerate(got):
            if body != TOPIC + b" " + message(k):
                problems.append("%s: delivery %d wrong: %r" % (mode, k, body[:30]))
                break
        if small:
            # Stop reading: the kernel buffers fill, the transport pauses.
            last, stable_since = -1, time.monotonic()
            deadline = time.monotonic() + WAIT
            while time.monotonic() < deadline:
                now = broker.stats()["messages_out"]
                if now != last:
                    last, stable_since = now, time.monotonic()
                elif time.monotonic() - stable_since > 0.3:
                    break
                await asyncio.sleep(0.02)
        s1 = broker.stats()
        o["written_before_close"] = s1["messages_out"] - s0["messages_out"]
        o["frames_read"] = c.frames_read
        o["bytes_unparsed"] = len(c.buf)
        if o["written_before_close"] >= N_BACKLOG:
            problems.append("%s: the whole backlog was written before the disconnect: "
                            "not a mid-stream test" % mode)

        if mode in ("rst", "rst_while_paused"):
            c.abort()
        elif mode == "close_frame":
            await c.send(b"\0\0\0\0")
            c.sock.shutdown(socket.SHUT_WR)
            c.abort()  # unread data: the kernel resets anyway
        else:
            c.sock.shutdown(socket.SHUT_WR)  # EOF to the server, still able to receive

        if mode == "shutdown_wr":
            # The client only half-closed and reads nothing: the server may
            # keep the socket (a graceful close waits to flush what it
            # already wrote, bounded by the heartbeat), but nothing may be
            # delivering meanwhile.
            await wait_until(lambda: broker.stats()["pending_pumps"] == 0,
                             mode + ": no pump scheduled after EOF from the client", problems,
                             detail=gauges)
            before = broker.stats()["messages_out"]
            await asyncio.sleep(0.3)
            if broker.stats()["messages_out"] != before:
                problems.append("%s: still delivering after EOF from a client that reads nothing"
                                % mode)
            o["gauges_while_half_closed"] = gauges()
            c.abort()
        ok = await wait_until(zeroed, mode + ": connections/subscriptions/pumps/timers at 0",
                              problems, detail=gauges)
        s2 = broker.stats()
        o["stats_after"] = {k: s2[k] for k in ("connections", "subscriptions", "pending_pumps",
                                               "timers")}
        if ok:
            # Nothing keeps writing for the departed client.
            await asyncio.sleep(0.3)
            s3 = broker.stats()
            if s3["messages_out"] != s2["messages_out"]:
                problems.append("%s: %d messages written after the consumer was gone"
                                % (mode, s3["messages_out"] - s2["messages_out"]))
            for _ in range(5):
                await asyncio.sleep(0)
            tasks = {t for t in asyncio.all_tasks() if t is not me}
            extra = tasks - baseline_tasks
            if extra:
                problems.append("%s: tasks left behind: %r" % (mode, [repr(t)[:160] for t in extra]))
            if stdlib:
                live = live_connection_handles(loop, conn_types)
                if live:
                    problems.append("%s: loop handles bound to a connection: %r" % (mode, live))
                o["cancelled_handles_in_scheduled"] = sum(1 for h in loop._scheduled
                                                          if h.cancelled())
                fds = len(loop._selector.get_map())
                if fds != baseline_fds:
                    problems.append("%s: %d fds registered with the loop, %d before"
                                    % (mode, fds, baseline_fds))
            gc.collect()
            if conn_types:
                alive = [type(x).__name__ for x in gc.get_objects() if isinstance(x, conn_types)]
                o["connection_objects_alive"] = len(alive)
                if alive:
                    problems.append("%s: %d connection/subscription objects survive gc: %r"
                                    % (mode, len(alive), alive[:5]))

        # Reconnect with the same id and no SET: resume point.
        s4 = broker.stats()
        r = await AClient.connect(loop, port)
        await r.send(frame(b"CID " + mine) + frame(b"SUB " + TOPIC))
        first = await r.read_frames(1)
        idx = int(first[0][len(TOPIC) + 2:len(TOPIC) + 12])
        o["resumed_at"] = idx
        written = s2["messages_out"] - s0["messages_out"]
        o["written_total"] = written
        if not c.frames_read <= idx <= written:
            problems.append("%s: resumed at %d; the client had read %d and the server had "
                            "written %d" % (mode, idx, c.frames_read, written))
        if first[0] != TOPIC + b" " + message(idx):
            problems.append("%s: resumed delivery is corrupt" % mode)
        await r.send(b"\0\0\0\0")
        try:
            r.abort()
        except OSError:
            pass
        await wait_until(zeroed, mode + ": gauges at 0 after the resume check", problems)
        # Leave the client's offset where it was for the record.
        _ = s4

    await broker.stop()
    leftover = {t for t in asyncio.all_tasks() if t is not me}
    if leftover - tasks_at_start:
        problems.append("tasks alive after Broker.stop(): %r"
                        % [repr(t)[:160] for t in leftover - tasks_at_start])
    if stdlib:
        live = [repr(h)[:200] for h in list(loop._ready) + list(loop._scheduled)
                if not h.cancelled()]
        obs["live_handles_after_stop"] = live
    obs["final_stats"] = {k: v for k, v in broker.stats().items()
                          if isinstance(v, (int, float, str))}
    obs["problems"] = problems
    return obs


def run() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), required=True)
    ap.add_argument("--data-dir", required=True)
    args = ap.parse_args()
    if args.loop == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        obs = runner.run(asyncio.wait_for(main(args), 120))
    print(json.dumps(obs, indent=1, default=str))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(run())
