#!/usr/bin/env python
"""The long fuzz run: frame scanners, payload parsers and command handling.

    python scripts/fuzz_long.py --seconds 600                  # atheris, all targets
    python scripts/fuzz_long.py --engine random --seconds 600  # no atheris needed
    python scripts/fuzz_long.py --target commands --seconds 300 --corpus out/corpus

Targets and checks are those of tests/test_fuzz.py (``tests/fuzz_targets.py``);
see there for what each asserts. Engines:

- ``atheris`` (default when it imports): coverage-guided, libFuzzer; the
  pure-Python twins and the broker's server modules are instrumented (the
  Cython twins are compiled code, compared result for result). A finding
  stops the run and libFuzzer writes the input to ``crash-*``.
- ``random``: seeded random streams from the same grammar, for machines
  without atheris; a finding prints the seed and example number.

The command target runs a real broker in this process (asyncio loop, disk
thread, temp data dir), with the codec this process loads
(``PYLOGSTREAMS_NO_EXTENSIONS=1`` for the pure one). Prints one JSON line
with the executions per target when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

TARGETS = ("scanners", "payloads", "commands")


class Runner:
    """Dispatches one input to a target and counts executions."""

    def __init__(self, targets, workdir: str) -> None:
        import fuzz_targets as ft
        self.ft = ft
        self.c, self.py = ft.codec_modules()
        if self.c is None:
            print("warning: Cython codec not built; twins are not compared", file=sys.stderr)
        self.targets = list(targets)
        self.counts = {t: 0 for t in self.targets}
        self.harness = None
        self.workdir = workdir
        self.store_checked = 0
        if "commands" in self.targets:
            self.harness = ft.CommandHarness(os.path.join(workdir, "broker"))

    def one(self, src) -> None:
        ft = self.ft
        target = self.targets[src.int(0, len(self.targets) - 1)]
        if target == "scanners":
            limit = src.pick([16, 64, 300, 4096, 1 << 20])
            r = src.int(0, 2)
            stream = ft.v0_stream(src) if r == 0 else ft.v1_stream(src) if r == 1 else src.bytes(400)
            chunks = ft.chunked(src, stream)
            ft.check_frames(self.c, self.py, chunks, limit)
            ft.check_v1_reader(self.c, self.py, chunks, limit)
        elif target == "payloads":
            ft.check_payloads(self.c, self.py, src)
        else:
            self.harness.run(ft.chunked(src, ft.any_stream(src)))
            if self.harness.executions % 5000 == 0:
                self.store_checked = self.harness.check_store()
        self.counts[target] += 1

    def finish(self) -> dict:
        if self.harness is not None:
            self.store_checked = self.harness.check_store()
            acked = len(self.harness.acked)
            self.harness.close()
        else:
            acked = 0
        from broker import codec
        return {"codec": codec.IMPLEMENTATION, "executions": self.counts,
                "total": sum(self.counts.values()), "stored_messages_checked": self.store_checked,
                "acked_batches_checked": acked}


def run_random(runner: Runner, seconds: float, seed: int) -> None:
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        ex_seed = seed * 1_000_003 + n
        src = runner.ft.RandomSource(random.Random(ex_seed))
        try:
            runner.one(src)
        except Exception:
            print("FINDING at example seed %d (reproduce: RandomSource(random.Random(%d)))"
                  % (ex_seed, ex_seed), file=sys.stderr)
            raise
        n += 1


def run_atheris(runner: Runner, seconds: float, corpus: str | None, report) -> None:
    import atheris

    deadline = time.monotonic() + seconds

    def one_input(data: bytes) -> None:
        runner.one(runner.ft.FdpSource(atheris.FuzzedDataProvider(data)))
        if time.monotonic() >= deadline:
            # libFuzzer would end the process with exit(), skipping Python's
            # clean-up: stop here instead, after the final checks.
            report()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    args = [sys.argv[0], "-max_len=4096", "-max_total_time=%d" % int(seconds + 600)]
    if corpus:
        os.makedirs(corpus, exist_ok=True)
        args.append(corpus)
    atheris.Setup(args, one_input)
    atheris.Fuzz()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--target", choices=TARGETS + ("all",), default="all")
    ap.add_argument("--engine", choices=("atheris", "random"), default=None)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--corpus", default=None, help="atheris corpus directory (kept between runs)")
    args = ap.parse_args()
    targets = TARGETS if args.target == "all" else (args.target,)
    engine = args.engine
    if engine is None:
        import importlib.util
        engine = "atheris" if importlib.util.find_spec("atheris") else "random"
    with tempfile.TemporaryDirectory(prefix="pls-fuzz-long-") as work:
        if engine == "atheris":
            import atheris
            # Coverage for the pure twins and the server (the Cython twins are
            # compiled; they are compared with the pure ones on every input).
            import importlib
            with atheris.instrument_imports(include=["broker"]):
                for name in ("broker._pure.frames", "broker._pure.wire1", "broker._pure.records",
                             "broker.server.connection", "broker.server.v1",
                             "broker.server.broker"):
                    importlib.import_module(name)
        runner = Runner(targets, work)
        start = time.monotonic()
        if engine == "atheris":
            def report() -> None:
                out = runner.finish()
                out.update(engine=engine, seconds=round(time.monotonic() - start, 1))
                print(json.dumps(out), flush=True)
                import shutil
                shutil.rmtree(work, ignore_errors=True)  # os._exit skips the context manager
            run_atheris(runner, args.seconds, args.corpus, report)
        else:
            run_random(runner, args.seconds, args.seed)
            out = runner.finish()
            out.update(engine=engine, seed=args.seed, seconds=round(time.monotonic() - start, 1))
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
