"""Attention microbenchmark at ViT Hybrid's shape: our Triton kernel vs eager math vs every SDPA backend.

Shape (B, 12, 577, 64): ViT-Base heads over 576 patches + CLS at 384 px. Forward only;
FLOPs = 4·B·H·N²·D (the two matmuls; softmax not counted). Every provider runs in the same process on
the same inputs; each record also carries the max abs difference of its output against SDPA's default
dispatch, so a fast but wrong provider cannot hide. An SDPA backend that cannot run (not built, no
kernel for this GPU/dtype) is recorded with the reason instead of a time.

    python -m vithybrid_fast.bench.bench_attention --out bench/results/attention_h100.json
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .common import (
    environment,
    first_call_ms,
    measured_peak_matmul_tflops,
    run_gpu_bench_cli,
    skip_without_cuda,
    time_fn,
)

HEADS, SEQ_LEN, HEAD_DIM = 12, 577, 64
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION")


def _eager_same_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √D) v in the input dtype: what an unfused model runs."""
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


def _providers() -> list[tuple[str, Callable, Callable[[], contextlib.AbstractContextManager], str | None]]:
    """(name, fn(q, k, v), context to time it in, reason it cannot run or None)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from vithybrid_fast.kernels.attention import flash_attention, reference

    providers = [
        ("ours_triton", flash_attention, contextlib.nullcontext, None),
        ("eager_reference_fp32_math", reference, contextlib.nullcontext, None),
        ("eager_same_dtype", _eager_same_dtype, contextlib.nullcontext, None),
    ]
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        reason = None if backend is not None else f"SDPBackend.{name} does not exist in torch {torch.__version__}"
        # The backend is pinned around the whole timing loop, not per call, so the context manager's
        # Python overhead is not timed.
        providers.append(
            (f"sdpa_{name.lower()}", F.scaled_dot_product_attention, lambda b=backend: sdpa_kernel(b), reason)
        )
    return providers


def _record_base(provider: str, batch: int, dtype: str, env: dict) -> dict:
    return {
        "provider": provider,
        "kernel": "attention",
        "batch": batch,
        "dtype": dtype,
        "shape": [batch, HEADS, SEQ_LEN, HEAD_DIM],
        **env,
    }


def _measure(fn: Callable, context: Callable, inputs: tuple, device: str) -> tuple[float, torch.Tensor, dict]:
    """First-call time (compile/autotune), one output for the accuracy check, then steady-state timing."""
    with context():
        compile_ms = first_call_ms(lambda: fn(*inputs), device)
        out = fn(*inputs)
        timing = time_fn(lambda: fn(*inputs), device)
    return compile_ms, out, timing


def run(
    device: str = "cuda",
    batches: tuple[int, ...] = (1, 8, 64),
    dtypes: tuple[str, ...] = ("float16", "bfloat16"),
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time every provider at (B, 12, 577, 64) for each batch and dtype; [] without a CUDA device.

    `on_record` receives each record as soon as it is measured."""
    if skip_without_cuda("bench_attention", device):
        return []
    env = environment(device)
    providers = _providers()
    records: list[dict] = []

    def keep(record: dict) -> None:
        records.append(record)
        if on_record is not None:
            on_record(record)

    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        peak = measured_peak_matmul_tflops(device, dtype)
        for batch in batches:
            g = torch.Generator(device=device).manual_seed(0)
            shape = (batch, HEADS, SEQ_LEN, HEAD_DIM)
            q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g) for _ in range(3))
            baseline = F.scaled_dot_product_attention(q, k, v).float()
            flops = 4 * batch * HEADS * SEQ_LEN**2 * HEAD_DIM
            for name, fn, context, reason in providers:
                record = _record_base(name, batch, dtype_name, env)
                if reason is None:
                    try:
                        compile_ms, out, timing = _measure(fn, context, (q, k, v), device)
                    except Exception as exc:  # a backend without a kernel for this GPU/dtype/shape
                        reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                if reason is not None:
                    record.update(skipped=reason, ms_median=None, ms_p10=None, ms_p90=None, tflops=None)
                    keep(record)
                    continue
                record.update(
                    ms_median=timing["ms_median"],
                    ms_p10=timing["ms_p10"],
                    ms_p90=timing["ms_p90"],
                    reps=timing["reps"],
                    first_call_ms=compile_ms,
                    tflops=flops / (timing["ms_median"] * 1e-3) / 1e12,
                    measured_peak_tflops=peak,
                    max_abs_diff_vs_sdpa=(out.float() - baseline).abs().max().item(),
                )
                record["pct_of_peak"] = 100.0 * record["tflops"] / peak
                keep(record)
            del q, k, v, baseline
            torch.cuda.empty_cache()
    return records


def format_table(records: list[dict]) -> str:
    header = (
        f"{'provider':<28} {'dtype':<9} {'B':>3} {'ms p50':>9} {'p10':>8} {'p90':>8} "
        f"{'TFLOP/s':>8} {'%peak':>6} {'maxdiff':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in records:
        if r.get("skipped"):
            lines.append(f"{r['provider']:<28} {r['dtype']:<9} {r['batch']:>3}  skipped: {r['skipped'][:70]}")
            continue
        lines.append(
            f"{r['provider']:<28} {r['dtype']:<9} {r['batch']:>3} {r['ms_median']:>9.4f} {r['ms_p10']:>8.4f} "
            f"{r['ms_p90']:>8.4f} {r['tflops']:>8.1f} {r['pct_of_peak']:>6.1f} {r['max_abs_diff_vs_sdpa']:>9.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    def describe(first: dict) -> str:
        return (
            f"{first['gpu']} | torch {first['torch']} | triton {first['triton']} | "
            f"commit {first['commit']} | shape (B, {HEADS}, {SEQ_LEN}, {HEAD_DIM})"
        )

    run_gpu_bench_cli("bench_attention", __doc__.splitlines()[0], run, format_table, describe, argv)


if __name__ == "__main__":
    main()
