"""Benchmark the ViT-Base MLP block (LN → 768→3072 GELU → 3072→768 + residual) on a CUDA GPU.

Providers, measured in the same run on the same GPU and inputs:
  ours           kernels.layer_norm_mlp (LN stats + two fused GEMMs: 3 launches)
  eager          nn.LayerNorm + nn.Linear + nn.GELU + nn.Linear + add (5+ launches)
  torch.compile  the same module, torch.compile(mode="default")

M = 577·batch tokens (384² images, 16² patches + CLS). FLOPs = 2·M·768·3072·2 (the two GEMMs).
Usage: python -m vithybrid_fast.bench.bench_layer_norm_mlp --out bench/results/layer_norm_mlp.json
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .common import (
    environment,
    first_call_ms,
    measured_peak_matmul_tflops,
    run_gpu_bench_cli,
    skip_without_cuda,
    time_fn,
)

TOKENS = 577
D, HIDDEN = 768, 3072
EPS = 1e-12  # the hub checkpoint's LayerNorm eps


class EagerMLP(nn.Module):
    """HF ViT layernorm_after → intermediate.dense → GELU → output.dense, plus the residual."""

    def __init__(self, d: int = D, hidden: int = HIDDEN, eps: float = EPS):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


def _providers(mlp: EagerMLP) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    from vithybrid_fast.kernels.layer_norm_mlp import layer_norm_mlp

    params = (mlp.norm.weight, mlp.norm.bias, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    compiled = torch.compile(mlp, mode="default")
    return {
        "ours": lambda x: layer_norm_mlp(x, *params, EPS),
        "eager": mlp,
        "torch.compile": compiled,
    }


def run(
    device: str = "cuda",
    batches: tuple[int, ...] = (1, 8, 64),
    dtypes: tuple[str, ...] = ("float16", "bfloat16"),
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Time every provider at each (dtype, batch); one record per measurement ([] without CUDA).

    `on_record` receives each record as soon as it is measured."""
    if skip_without_cuda("bench_layer_norm_mlp", device):
        return []
    env = environment(device)
    records: list[dict] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        peak = measured_peak_matmul_tflops(device, dtype)
        torch.manual_seed(0)
        mlp = EagerMLP().to(device=device, dtype=dtype).eval()
        providers = _providers(mlp)
        for batch in batches:
            m = batch * TOKENS
            x = torch.randn(batch, TOKENS, D, device=device, dtype=dtype)
            flops = 2 * m * D * HIDDEN * 2
            with torch.inference_mode():
                eager_out = mlp(x)
                for provider, fn in providers.items():
                    call = functools.partial(fn, x)
                    first_ms = first_call_ms(call, device)  # includes compilation / autotuning
                    timing = time_fn(call, device)
                    diff = (call().float() - eager_out.float()).abs().max().item()
                    tflops = flops / (timing["ms_median"] * 1e-3) / 1e12
                    records.append(
                        {
                            "provider": provider,
                            "kernel": "layer_norm_mlp",
                            "batch": batch,
                            "M": m,
                            "dtype": dtype_name,
                            "ms_median": timing["ms_median"],
                            "ms_p10": timing["ms_p10"],
                            "ms_p90": timing["ms_p90"],
                            "reps": timing["reps"],
                            "first_call_ms": first_ms,
                            "tflops": tflops,
                            "peak_matmul_tflops": peak,
                            "fraction_of_peak": tflops / peak,
                            "max_abs_diff_vs_eager": diff,
                            **env,
                        }
                    )
                    if on_record is not None:
                        on_record(records[-1])
    return records


def format_table(records: list[dict]) -> str:
    header = f"{'dtype':<9} {'batch':>5} {'M':>6} {'provider':<14} {'ms':>8} {'p10':>8} {'p90':>8} "
    header += f"{'TFLOP/s':>8} {'%peak':>6} {'maxdiff':>9}"
    lines = [header, "-" * len(header)]
    for r in records:
        lines.append(
            f"{r['dtype']:<9} {r['batch']:>5} {r['M']:>6} {r['provider']:<14} {r['ms_median']:>8.3f} "
            f"{r['ms_p10']:>8.3f} {r['ms_p90']:>8.3f} {r['tflops']:>8.1f} {100 * r['fraction_of_peak']:>5.0f}% "
            f"{r['max_abs_diff_vs_eager']:>9.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    def describe(first: dict) -> str:
        return f"{first['gpu']}  torch {first['torch']}  triton {first['triton']}  commit {first['commit']}"

    run_gpu_bench_cli("bench_layer_norm_mlp", __doc__.splitlines()[0], run, format_table, describe, argv)


if __name__ == "__main__":
    main()
