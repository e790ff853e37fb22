"""Where the GPU time of one training step goes, per provider: torch.profiler over a few warm optimizer
steps (forward, backward, clipping, AdamW under autocast, exactly as `bench_train` times them), kernels
grouped by name, ms per step.

On an H200 (bf16, batch 64) torch.compile's default mode trained 1.43× faster than ours-triton
(bench/results/nvidia-h200-2026-11-27-notes.md); this is the evidence for where that time goes.

And the host's side of the same step, after the profile: how long the Python side takes to enqueue one
step against the step's wall time (`host_ms` near `step_ms` means the GPU waited for the host: session 19's
H200 ran 94.7 ms of ours' kernels in steps of 120–188 ms, and could not say where the host's time went), and
cProfile's functions by self time over HOST_PROFILE_STEPS steps (Triton's launcher, our launchers, autograd,
torch ops: each a row), and on CUDA torch's synchronizing calls in one step (`set_sync_debug_mode`).

    python -m vithybrid_fast.bench.profile_train --providers ours-triton,compile-default --batch 64
    python -m vithybrid_fast.bench.profile_train --device cpu --config tiny --batch 2 --providers ref-sdpa

Prints one table per provider and appends the rows as JSON lines to --out when given.
"""

from __future__ import annotations

import argparse
import collections
import cProfile
import gc
import pstats
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .arguments import DTYPE_NAMES, positive_int
from .bench_train import BY_NAME_ONLY, PROVIDERS, build, step_for
from .common import RecordLog, exit_without_cuda
from .profile_e2e import format_table, kernel_table

WARM_STEPS = 3  # compile, autotune, AdamW's state and the allocator stay out of the profile
HOST_PROFILE_STEPS = 2  # cProfile slows the step it watches: few steps, after the timed ones


def profile_steps(step, device: torch.device, iters: int) -> tuple[list[dict], float]:
    on_gpu = device.type == "cuda"
    for _ in range(WARM_STEPS):
        step()
    if on_gpu:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            step()
        if on_gpu:
            torch.cuda.synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / iters
    return kernel_table(prof, iters, on_gpu), wall_ms


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_timing(step, device: torch.device, iters: int) -> dict:
    """Medians over `iters` steps of the time step() takes to return (`host_ms`: the host enqueueing the
    step; a CUDA launch returns before its kernel ends) and of the step to the GPU's end (`step_ms`)."""
    host, whole = [], []
    for _ in range(iters):
        _synchronize(device)
        start = time.perf_counter()
        step()
        enqueued = time.perf_counter()
        _synchronize(device)
        host.append((enqueued - start) * 1e3)
        whole.append((time.perf_counter() - start) * 1e3)
    return {"host_ms": statistics.median(host), "step_ms": statistics.median(whole)}


def host_functions(step, device: torch.device, steps: int = HOST_PROFILE_STEPS, top: int = 25) -> list[dict]:
    """cProfile's `top` functions by self time per step: {function, calls, self_ms, total_ms} per step."""
    profiler = cProfile.Profile()
    _synchronize(device)
    profiler.enable()
    for _ in range(steps):
        step()
    _synchronize(device)
    profiler.disable()
    rows = []
    for (path, line, name), (_, calls, self_s, total_s, _) in pstats.Stats(profiler).stats.items():
        where = name if path == "~" else f"{path.rsplit('site-packages/', 1)[-1]}:{line}({name})"
        rows.append({"function": where, "calls": calls // steps, "self_ms": self_s * 1e3 / steps,
                     "total_ms": total_s * 1e3 / steps})  # fmt: skip
    rows.sort(key=lambda r: r["self_ms"], reverse=True)
    return rows[:top]


def synchronizing_calls(step, device: torch.device) -> list[dict] | None:
    """torch's own synchronizing CUDA calls in one step ({message, count}; torch.cuda.set_sync_debug_mode
    warns on each), None off CUDA. A sync in the step makes host and device time add up instead of overlap."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    messages = collections.Counter(str(w.message)[:300] for w in caught if "synchroniz" in str(w.message))
    return [{"message": message, "count": count} for message, count in messages.most_common()]


def format_host(timing: dict, functions: list[dict], limit: int) -> str:
    share = timing["host_ms"] / timing["step_ms"] if timing["step_ms"] > 0 else float("nan")
    lines = [f"host: {timing['host_ms']:.3f} ms to enqueue a step of {timing['step_ms']:.3f} ms ({share:.0%}); "
             f"cProfile, by self time ({HOST_PROFILE_STEPS} steps, slowed by the profiler):",
             f"{'self ms':>8} {'total ms':>9} {'calls':>6}  function"]  # fmt: skip
    for r in functions[:limit]:
        lines.append(f"{r['self_ms']:8.3f} {r['total_ms']:9.3f} {r['calls']:6d}  {r['function'][-110:]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vithybrid_fast.bench.profile_train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--providers", default="ours-triton,compile-default")
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPE_NAMES, help="autocast dtype (default bfloat16)")
    parser.add_argument("--iters", type=positive_int, default=3)
    parser.add_argument("--rows", type=positive_int, default=30)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--config", choices=("base", "tiny"), default="base")
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file for the rows")
    args = parser.parse_args(argv)
    providers = args.providers.split(",")
    unknown = sorted(set(providers) - set(PROVIDERS + BY_NAME_ONLY))
    if unknown:
        parser.error(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(PROVIDERS + BY_NAME_ONLY)}")
    if args.device == "cuda":  # one line and exit 2 without a GPU (--device cpu: the smoke run on a CPU)
        exit_without_cuda(parser.prog, args.device)

    from .e2e import CONFIGS, random_state_dict

    device = torch.device(args.device)
    config = CONFIGS[args.config]()
    dtype_name = args.dtype
    dtype = getattr(torch, dtype_name)
    state = random_state_dict(config, device)
    generator = torch.Generator().manual_seed(args.batch)
    pixels = torch.randn(args.batch, 3, *config.image_size_hw, generator=generator).to(device)
    labels = torch.randint(0, config.num_labels, (args.batch,), generator=generator).to(device)
    with RecordLog(args.out) as log:
        for provider in providers:
            model = build(provider, config, state, device, dtype)
            step = step_for(provider, model, pixels, labels, dtype)
            rows, wall_ms = profile_steps(step, device, args.iters)
            title = f"{provider} {dtype_name} autocast b={args.batch} training step"
            print(format_table(title, rows, wall_ms, args.rows, per="step"), flush=True)
            timing, functions = host_timing(step, device, args.iters), host_functions(step, device)
            syncs = synchronizing_calls(step, device)
            print(format_host(timing, functions, args.rows), flush=True)
            if syncs is not None:
                print(f"synchronizing CUDA calls in one step: {sum(s['count'] for s in syncs)}", *syncs, sep="\n  ")
            log.write({"kind": "train_profile", "provider": provider, "dtype": dtype_name, "batch": args.batch,
                       "config": args.config, "wall_ms": wall_ms, "kernels": rows, **timing,
                       "host_functions": functions, "sync_warnings": syncs})  # fmt: skip
            del step, model  # the next provider's memory is its own (the step refers to itself: collected)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
