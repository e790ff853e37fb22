"""Where the GPU time of one forward goes, per provider: torch.profiler over a few warm forwards, kernels
grouped by name, ms per forward and share of the total — the evidence for what to tune next.

    python -m vithybrid_fast.bench.profile_e2e --providers ref-sdpa,ours-triton --batches 64,1 --dtype bfloat16

Prints one table per (provider, batch), and writes the same rows as JSON lines to --out when given.
The sum of kernel time beside the wall time per forward tells launch-bound (wall ≫ kernels) from
kernel-bound runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .arguments import positive_int, positive_ints
from .common import RecordLog
from .e2e import DTYPES, base_config, build_provider, make_pixels, random_state_dict, tiny_config


def _self_us(event, on_gpu: bool) -> float:
    names = ("self_device_time_total", "self_cuda_time_total") if on_gpu else ("self_cpu_time_total",)
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


def kernel_table(prof, iters: int, on_gpu: bool = True) -> list[dict]:
    """Rows {name, calls, ms per iteration}: device kernels only on a GPU, ops on a CPU (self time, so nothing
    counts twice). (On a CPU the device time is 0 for every event: the table was empty.)"""
    rows = []
    for event in prof.key_averages():
        us = _self_us(event, on_gpu)
        if us <= 0:
            continue
        rows.append({"name": event.key, "calls": event.count // iters, "ms": us / 1e3 / iters})
    rows.sort(key=lambda r: r["ms"], reverse=True)
    return rows


def profile_one(model, pixels: torch.Tensor, iters: int) -> tuple[list[dict], float]:
    on_gpu = pixels.device.type == "cuda"
    activities = [ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]
    with torch.inference_mode():
        for _ in range(3):  # compile, autotune and allocator warm-up stay out of the profile
            model(pixels)
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(iters):
                model(pixels)
            if on_gpu:
                torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3 / iters
    return kernel_table(prof, iters, on_gpu), wall_ms


def format_table(title: str, rows: list[dict], wall_ms: float, limit: int, per: str = "forward") -> str:
    total = sum(r["ms"] for r in rows) or float("nan")
    lines = [f"## {title}: kernels {total:.3f} ms per {per}, wall {wall_ms:.3f} ms (profiled)",
             f"{'ms':>8} {'share':>6} {'calls':>5}  kernel"]  # fmt: skip
    for r in rows[:limit]:
        lines.append(f"{r['ms']:8.3f} {100 * r['ms'] / total:5.1f}% {r['calls']:5d}  {r['name'][:110]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vithybrid_fast.bench.profile_e2e",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the docstring's paragraphs and lists as written
    )
    parser.add_argument("--providers", default="ref-sdpa,ours-triton")
    parser.add_argument("--batches", type=positive_ints, default=[64, 1], help="(default: 64,1)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--iters", type=positive_int, default=5)
    parser.add_argument("--rows", type=positive_int, default=25)
    parser.add_argument("--config", choices=("base", "tiny"), default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file for the rows")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config_name = args.config or ("base" if device.type == "cuda" else "tiny")
    config = base_config() if config_name == "base" else tiny_config()
    dtype = DTYPES[args.dtype]
    state = random_state_dict(config, device)
    with RecordLog(args.out) as log:
        for provider in args.providers.split(","):
            model = build_provider(provider, config, state, dtype, device)
            for batch in args.batches:
                pixels = make_pixels(config, batch).to(device=device, dtype=dtype)
                rows, wall_ms = profile_one(model, pixels, args.iters)
                print(format_table(f"{provider} {args.dtype} b={batch}", rows, wall_ms, args.rows), flush=True)
                log.write(
                    {"provider": provider, "dtype": args.dtype, "batch": batch, "wall_ms": wall_ms, "kernels": rows}
                )
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
