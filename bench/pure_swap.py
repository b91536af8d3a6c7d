"""Where the pure-Python broker loses its time, found by substitution.

A profile of the pure broker says where its instructions go; it does not
say what a scenario's throughput would be without them (on a 2-core
machine the broker, its disk thread and the benchmark's clients share the
CPUs, and what one saves another may take). This measures that directly.
It runs one scenario of ``pylogstreams bench`` against the pure broker as it
is, then with one compiled function put in place of its pure twin for each
``--swap``, then against the compiled broker, round after round, and prints
each variant's messages per second and broker CPU seconds per million
messages.

A swap names a codec module and function, ``wire1.publish_records`` (the
default) or ``records.index_entries``, or ``crc32``: the compiled
CRC-32 (``broker._speedups.frames.crc32``) where the pure modules call
zlib's. It is made in the broker process only, at its start, by a
``sitecustomize`` module this script writes to a temporary directory and
puts first on ``PYTHONPATH`` (for those runs it hides any other
``sitecustomize``); it replaces the module's attribute, which is what the
server calls (``wire1.publish_records(...)``). Each swapped broker
writes its pid and swaps to a report file, and a run whose broker did not
is an error: a figure measured without the swap would be read as one with
it.

    python bench/pure_swap.py [--scenario devlog50] [--swap wire1.publish_records ...]
                              [--rounds 3] [--quick] [-- extra bench options]

Anything after ``--`` goes to ``pylogstreams bench`` as it is (``--count``,
``--warm-memory``...).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Written into a temporary directory as sitecustomize.py. Python imports it
# at start in every process that inherits PYTHONPATH; it acts only in the
# broker ("python -m broker serve ...": sys.argv is ["-m", "serve", ...]).
_HOOK = '''\
import os
import sys

_SPEC = os.environ.get("PURE_SWAP")
if _SPEC and sys.argv[1:2] == ["serve"]:
    import importlib
    import types

    import broker._speedups.frames as _compiled_frames

    for _item in _SPEC.split(","):
        if _item == "crc32":
            _shim = types.SimpleNamespace(crc32=_compiled_frames.crc32)
            for _name in ("frames", "records", "wire1"):
                _mod = importlib.import_module("broker._pure." + _name)
                _mod.zlib = _shim
                if hasattr(_mod, "crc32"):
                    _mod.crc32 = _compiled_frames.crc32
        else:
            _mod_name, _fn = _item.rsplit(".", 1)
            _pure = importlib.import_module("broker._pure." + _mod_name)
            _compiled = importlib.import_module("broker._speedups." + _mod_name)
            setattr(_pure, _fn, getattr(_compiled, _fn))
    with open(os.environ["PURE_SWAP_REPORT"], "a") as _f:
        _f.write("%d %s\\n" % (os.getpid(), _SPEC))
'''


def _check_swap(item: str) -> str:
    if item == "crc32":
        return item
    import importlib
    mod, _, fn = item.rpartition(".")
    if mod not in ("frames", "records", "wire1"):
        raise argparse.ArgumentTypeError("no codec module %r (frames, records, wire1)" % mod)
    pure = importlib.import_module("broker._pure." + mod)
    try:
        compiled = importlib.import_module("broker._speedups." + mod)
    except ImportError as exc:
        raise argparse.ArgumentTypeError("the compiled codec is not built (%s)" % exc)
    if not callable(getattr(pure, fn, None)) or not callable(getattr(compiled, fn, None)):
        raise argparse.ArgumentTypeError("%s is not a function of both twins" % item)
    return item


def _run(variant: str, codec: str, swap: str | None, args, hook_dir: str, report: str) -> dict:
    env = dict(os.environ)
    env.pop("PURE_SWAP", None)
    if swap:
        env["PYTHONPATH"] = os.pathsep.join([hook_dir] + [p for p in (env.get("PYTHONPATH"),) if p])
        env["PURE_SWAP"] = swap
        env["PURE_SWAP_REPORT"] = report
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        before = _reported(report)
        cmd = [sys.executable, "-m", "broker", "bench", "--scenarios", args.scenario,
               "--codec", codec, "--mode", "client",
               "--peers", "none", "--json", out.name] + (["--quick"] if args.quick else []) + args.extra
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit("bench failed (%s):\n%s" % (variant, proc.stderr[-3000:]))
        if swap and len(_reported(report)) != len(before) + 1:
            raise SystemExit("the broker of the %s run did not report its swap: not measured" % variant)
        with open(out.name) as f:
            rows = [r for r in json.load(f)["results"] if r["scenario"] == args.scenario]
    if len(rows) != 1:
        raise SystemExit("expected one %s row, got %d" % (args.scenario, len(rows)))
    return rows[0]


def _reported(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        extra = argv[argv.index("--") + 1:]
        argv = argv[:argv.index("--")]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", default="devlog50",
                    help="a throughput scenario of pylogstreams bench (default devlog50)")
    ap.add_argument("--swap", action="append", type=_check_swap, metavar="MODULE.FUNCTION",
                    help="a compiled function in place of its pure twin, one variant each; "
                         "crc32 for the compiled CRC-32 (default: wire1.publish_records)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all variants (default 3)")
    ap.add_argument("--quick", action="store_true", help="the bench's tiny counts (a smoke run)")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    args.extra = extra
    swaps = args.swap or ["wire1.publish_records"]
    # (label, the broker's codec, the swap made in it)
    variants = ([("pure", "pure", None)] + [("pure + compiled " + s, "pure", s) for s in swaps]
                + [("cython", "cython", None)])
    results: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    with tempfile.TemporaryDirectory(prefix="pure-swap-") as hook_dir:
        with open(os.path.join(hook_dir, "sitecustomize.py"), "w") as f:
            f.write(_HOOK)
        report = os.path.join(hook_dir, "swapped.txt")
        for r in range(args.rounds):
            for name, codec, swap in variants:
                row = _run(name, codec, swap, args, hook_dir, report)
                results[name].append(row)
                print("round %d  %-40s %10s msg/s  %5.1f CPU s/M" % (
                    r + 1, name, format(round(row["msgs_per_s"]), ","), row["cpu_s_per_m"]),
                    file=sys.stderr, flush=True)
    print("| %s, broker | msg/s, each round | median | broker CPU s/M, median |" % args.scenario)
    print("| --- | --- | ---: | ---: |")
    for name, _, _ in variants:
        rates = [row["msgs_per_s"] for row in results[name]]
        cpu = statistics.median(row["cpu_s_per_m"] for row in results[name])
        print("| %s | %s | %s | %.1f |" % (name, ", ".join(format(round(x), ",") for x in rates),
                                          format(round(statistics.median(rates)), ","), cpu))


if __name__ == "__main__":
    main()
