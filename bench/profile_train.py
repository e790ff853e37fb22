"""Where the GPU time of one training step goes, per provider: torch.profiler over a few warm optimizer
steps (forward, backward, clipping, AdamW under autocast, exactly as `bench_train` times them), kernels
grouped by name, ms per step.

On an H200 (bf16, batch 64) torch.compile's default mode trained 1.43× faster than ours-triton
(bench/results/nvidia-h200-2026-11-27-notes.md); this is the evidence for where that time goes.

    python -m vithybrid_fast.bench.profile_train --providers ours-triton,compile-default --batch 64
    python -m vithybrid_fast.bench.profile_train --device cpu --config tiny --batch 2 --providers ref-sdpa

Prints one table per provider and appends the rows as JSON lines to --out when given.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .arguments import DTYPE_NAMES, positive_int
from .bench_train import BY_NAME_ONLY, PROVIDERS, build, step_for
from .common import RecordLog, exit_without_cuda
from .profile_e2e import format_table, kernel_table

WARM_STEPS = 3  # compile, autotune, AdamW's state and the allocator stay out of the profile


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
            log.write({"kind": "train_profile", "provider": provider, "dtype": dtype_name, "batch": args.batch,
                       "config": args.config, "wall_ms": wall_ms, "kernels": rows})  # fmt: skip
            del step, model  # the next provider's peak memory is its own
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
