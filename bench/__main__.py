"""`python -m vithybrid_fast.bench`: the one benchmark entry point.

    python -m vithybrid_fast.bench                                   # everything the device allows
    python -m vithybrid_fast.bench --device cuda --batches 1,8,64 --dtypes bfloat16 --providers ref-sdpa,ours-triton
    python -m vithybrid_fast.bench --device cpu                      # tiny config, CPU providers only (CI smoke, ~10 s)
    python -m vithybrid_fast.bench --device cpu --cpu-compare        # + base-config CPU comparison and load memory

Runs the end-to-end benchmark (bench/e2e.py), on a GPU the kernel microbenchmarks (bench/bench_*.py)
and the measured matmul/HBM peaks they are judged against, optionally the CPU comparison
(bench/bench_cpu.py), then writes JSON + Markdown + plots (bench/report.py) and prints the table.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

KERNEL_BENCHMARKS = (
    "vithybrid_fast.bench.bench_attention",
    "vithybrid_fast.bench.bench_backbone_kernels",
    "vithybrid_fast.bench.bench_layer_norm_mlp",
)
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _csv(text: str | None) -> list[str] | None:
    return [part.strip() for part in text.split(",") if part.strip()] if text else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vithybrid_fast.bench", description="ViT Hybrid benchmarks")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--batches", help="comma-separated, e.g. 1,8,64 (default: 1,2,4,8,32,64,128; CPU 1,2)")
    parser.add_argument("--dtypes", help="comma-separated from float32,float16,bfloat16 (default: all; CPU float32)")
    parser.add_argument("--providers", help="comma-separated e2e providers (default: all; see bench/e2e.py)")
    parser.add_argument("--config", choices=("base", "tiny"), help="default: base on a GPU, tiny on a CPU")
    parser.add_argument(
        "--kernels", action=argparse.BooleanOptionalAction, default=None, help="kernel microbenchmarks (GPU default)"
    )
    parser.add_argument("--cpu-compare", action="store_true", help="base-config CPU comparison + load memory")
    parser.add_argument("--cpu-reps", type=int, default=5, help="interleaved reps per provider for --cpu-compare")
    parser.add_argument("--reps", type=int, help="timed reps per measurement (default: adaptive on a GPU, 3 on CPU)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)")
    parser.add_argument(
        "--warm-caches",
        action="store_true",
        help="keep Inductor/Triton on-disk caches (default: fresh ones, so first-call times are cold starts)",
    )
    return parser.parse_args(argv)


def fresh_compile_caches(root: str) -> None:
    """Point Inductor's and Triton's on-disk caches at empty folders: a warm cache left by an earlier run
    would hide compile and autotune time in first_call_ms. Must run before triton is imported."""
    for name, sub in (("TORCHINDUCTOR_CACHE_DIR", "inductor"), ("TRITON_CACHE_DIR", "triton")):
        path = os.path.join(root, sub)
        os.makedirs(path, exist_ok=True)
        os.environ[name] = path


def kernel_records(device: str, batches: list[int] | None, dtypes: list[str] | None) -> list[dict[str, Any]]:
    """Every kernel microbenchmark's records; an import or run failure becomes an error record."""
    from .common import environment

    records: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"device": device}
    if batches:
        kwargs["batches"] = tuple(batches)
    if dtypes:
        kwargs["dtypes"] = tuple(dtypes)
    for module_name in KERNEL_BENCHMARKS:
        try:
            module_records = importlib.import_module(module_name).run(**kwargs)
        except Exception as err:
            print(f"{module_name}: failed: {type(err).__name__}: {err}", file=sys.stderr)
            module_records = [{"error": f"{type(err).__name__}: {err}", **environment(device)}]
        for rec in module_records:
            rec.setdefault("kernel", module_name.removeprefix("vithybrid_fast.bench.bench_"))
            rec.update(kind="kernel", module=module_name)
            for key in ("provider", "batch", "dtype", "ms_median", "images_per_s"):
                rec.setdefault(key, None)
            records.append(rec)
    return records


def peak_records(device: str, dtypes: list[str]) -> list[dict[str, Any]]:
    """Measured (not datasheet) matmul throughput per dtype and HBM copy bandwidth: the roofs."""
    import torch

    from .common import environment, measured_hbm_gbps, measured_peak_matmul_tflops

    env = environment(device)
    base = {"kind": "peak", "provider": None, "batch": None, "ms_median": None, "images_per_s": None, **env}
    records = []
    for dtype in dtypes:
        value = measured_peak_matmul_tflops(device, getattr(torch, dtype))
        records.append({**base, "metric": "matmul_tflops", "dtype": dtype, "value": value})
    records.append({**base, "metric": "hbm_gbps", "dtype": None, "value": measured_hbm_gbps(device)})
    return records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cache_root = None
    if not args.warm_caches:
        cache_root = tempfile.TemporaryDirectory(prefix="vithybrid-bench-caches-")
        fresh_compile_caches(cache_root.name)

    import torch

    from . import e2e, report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if device == "cuda" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("warning: TRITON_INTERPRET is set, so Triton kernels would run in the CPU interpreter; "
              "ours-triton* providers are skipped — unset it for real GPU numbers", file=sys.stderr)  # fmt: skip
    batches = [int(b) for b in _csv(args.batches) or []] or None
    dtypes = _csv(args.dtypes)
    records = e2e.run(device, batches, dtypes, _csv(args.providers), args.config, args.reps)

    run_kernels = device == "cuda" if args.kernels is None else args.kernels
    if run_kernels:
        if device == "cuda":
            records += peak_records(device, dtypes or list(e2e.DTYPES))
            records += kernel_records(device, batches, dtypes)
        else:
            print("kernel microbenchmarks skipped: they need a CUDA GPU")
    if args.cpu_compare:
        from . import bench_cpu

        print("CPU comparison (base config; minutes on a small CPU)")
        records += bench_cpu.run_cpu(reps=args.cpu_reps)
        records.append(bench_cpu.measure_load_memory())

    paths = report.write_results(records, args.out)
    print()
    print(paths["markdown"].read_text())
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    if cache_root is not None:
        cache_root.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
