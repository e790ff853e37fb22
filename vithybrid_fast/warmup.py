"""`vithybrid-fast warmup`: compile, without a GPU, the Triton kernels an inference run will launch.

    vithybrid-fast warmup --arch sm_90 --dtype bfloat16 --batches 1,8,64

Every forward launch of the base checkpoint at those batch sizes, with every config its autotuner can
pick there (kernels/_offline.py), compiled for the target GPU into Triton's cache (TRITON_CACHE_DIR,
default ~/.triton/cache) — e.g. while building a container image, so the first run on the GPU spends
its time measuring, not compiling. The cache only serves the same triton version (and its ptxas).
Last line: `compiles: N, seconds: S (C already cached)` — N the kernels compiled by this run, S their
summed compile seconds (what a run would have spent compiling them one after another), C the kernels
found in the cache (not compiled again; a second run prints `compiles: 0, seconds: 0.0 (C already cached)`).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time

ARCH_NAMES = ("sm_80", "sm_90")
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def _batches(text: str) -> list[int]:
    try:
        values = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"batches must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batches must be positive integers, got {text!r}")
    return values


def register(subparsers: argparse._SubParsersAction) -> None:
    from .cli import _positive_int

    parser = subparsers.add_parser(
        "warmup",
        help="precompile the inference kernels for a GPU, without one",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--arch", default="sm_90", choices=ARCH_NAMES, help="target GPU architecture (default: sm_90)")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="(default: bfloat16)")
    parser.add_argument("--batches", type=_batches, default=[1, 8, 64], help="e.g. 1,8,64 (the default)")
    parser.add_argument("--workers", type=_positive_int, default=None, help="parallel compiles (default: CPU count)")
    parser.add_argument("--list", action="store_true", help="print one line per compiled kernel")
    parser.set_defaults(func=run)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def run(args: argparse.Namespace) -> int:
    if _interpreter_on():
        # Kernels imported under the interpreter are not the native ones: compile in a clean process.
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        # the child is the CLI itself: one-line errors, one "interrupted" line on Ctrl-C
        argv = [sys.executable, "-m", "vithybrid_fast", "warmup", "--arch", args.arch, "--dtype", args.dtype,
                "--batches", ",".join(map(str, args.batches))]  # fmt: skip
        if args.workers:
            argv += ["--workers", str(args.workers)]
        if args.list:
            argv.append("--list")
        # a terminal's Ctrl-C reaches both processes: the child reports it, this one waits for the child
        child = subprocess.Popen(argv, env=env)  # started first: it must not inherit SIG_IGN
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            return child.wait()
        finally:
            signal.signal(signal.SIGINT, previous)

    import torch

    from .kernels import _offline

    arch = _offline.ARCHS[args.arch]
    dtype = getattr(torch, args.dtype)
    start = time.perf_counter()
    launches = _offline.collect_launches([dtype], args.batches, phases=("forward",), arch=arch)
    jobs = [(launch, config, arch) for launch, config in _offline.compile_jobs(launches, arch)]
    results = _offline.compile_all(jobs, args.workers)
    wall = time.perf_counter() - start
    failed = [r for r in results if r.error]
    if args.list:
        for r in results:
            state = "cached" if r.cached else f"{r.seconds:5.1f}s"
            print(f"{r.name:32s} {r.config:70s} {state}")
    for r in failed:
        print(f"error: {r.name} {r.config}: {r.error.splitlines()[0]}", file=sys.stderr)
    cached = sum(r.cached for r in results)
    workers = max(1, min(args.workers or os.cpu_count() or 1, len(jobs)))  # as compile_all runs them
    with_workers = f"{workers} worker" + ("s" if workers != 1 else "")
    print(f"{args.arch} {args.dtype} batches {','.join(map(str, args.batches))}: {len(results)} kernels "
          f"({cached} already cached), {wall:.1f} s wall with {with_workers}")  # fmt: skip
    compiled = [r for r in results if not r.cached and not r.error]
    print(
        f"cpu-seconds: {sum(r.cpu_seconds for r in compiled):.1f} (CPU time of the compiles; wall time grows with load)"
    )
    failures = f", FAILED: {len(failed)} (see the error lines above)" if failed else ""
    print(
        f"compiles: {len(compiled)}, seconds: {sum(r.seconds for r in compiled):.1f} ({cached} already cached)"
        + failures
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vithybrid-fast")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["warmup", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
