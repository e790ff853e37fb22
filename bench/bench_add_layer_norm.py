"""Benchmark the encoder's glue between cuBLAS GEMMs: residual add + LayerNorm, and LayerNorm alone, on a CUDA GPU.

Providers, measured in the same run on the same GPU and inputs (ViT-Base rows: 577·batch × 768):
  ours           kernels.add_layer_norm (one launch: h = x + residual and LayerNorm(h), or LayerNorm(x))
  torch          `x + residual` then F.layer_norm (two launches), or F.layer_norm alone
  torch.compile  the same function, torch.compile(mode="default", dynamic=False): Inductor's fused kernel

and the training variant (kernels/add_layer_norm_train.py): a bf16/fp16 branch + the float32 residual
stream, LayerNorm in float32 written in the branch's dtype, forward and backward (`torch.autograd.grad` of
all four inputs), against autocast's unfused ops (torch's add, float32 `F.layer_norm`, the cast) and their
torch.compile; its minimum traffic is 28 bytes per element in bf16 (forward: read 2 + 4, write 4 + 2;
backward: read dy 2, h 4, dh 4, write 2 + 4).

The ops are memory-bound: each record reports GB/s of the minimum traffic (add + LayerNorm: read x and the
residual, write h and the output; LayerNorm: read x, write the output) and its percent of the measured HBM
copy bandwidth, from the eager calls' wall time (`ms_median`, which includes the host's launch time) and
from a replayed CUDA graph (`ms_device`, the kernels alone; no L2 flush between replays, and at batch 64 each
tensor, 57–113 MB, is larger than the H100's or H200's L2). The training variant needs both: on the H200
(session 19) ours took 1.03 ms a call in wall time against torch's 0.69 (bf16, batch 64), while in the
training step's profile its kernels averaged 0.07 ms forward and 0.13 ms backward a call, and the step's
kernels summed 94.7 ms with it against 102.7 with torch's glue: the wall time was the host's.

The inference variants' wall time is what `kernels="auto"` times per shape before it picks ours or torch's
(vithybrid_fast/fast.py, FastViTLayer.cublas_with_glue_kernels).

    python -m vithybrid_fast.bench.bench_add_layer_norm --out bench/results/add_layer_norm.json
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .common import (
    device_ms,
    environment,
    first_call_ms,
    measured_hbm_gbps,
    run_gpu_bench_cli,
    skip_without_cuda,
    time_fn,
)

TOKENS, D = 577, 768
EPS = 1e-12  # the hub checkpoint's LayerNorm eps


def torch_add_layer_norm(x, residual, weight, bias):
    h = x if residual is None else x + residual
    return h, F.layer_norm(h, (h.shape[-1],), weight, bias, EPS)


def torch_autocast_glue(x, residual, weight, bias):
    """What autocast's unfused ops compute: mixed-dtype add, float32 LayerNorm, the next GEMM's cast."""
    h = x + residual
    return h, F.layer_norm(h.float(), (h.shape[-1],), weight, bias, EPS).to(x.dtype)


def _train_providers() -> dict[str, Callable]:
    from vithybrid_fast.kernels import add_layer_norm_train

    compiled = torch.compile(torch_autocast_glue, mode="default", dynamic=False)
    return {
        "ours": lambda x, r, w, b: add_layer_norm_train(x, r, w, b, EPS, x.dtype),
        "torch": torch_autocast_glue,
        "torch.compile": compiled,
    }


def _on_device(call: Callable[[], object], device, nbytes: int, hbm_gbps: float) -> dict:
    """ms_device (a replayed CUDA graph of `call`: the kernels without the host) and its GB/s; None with the
    reason where the call cannot be captured (a record is still written with its wall time)."""
    try:
        ms = device_ms(call, device)
    except Exception as err:  # a capture failure is reported in the record, not fatal
        return {"ms_device": None, "device_error": f"{type(err).__name__}: {str(err)[:200]}"}
    gbps = nbytes / (ms * 1e-3) / 1e9
    return {"ms_device": ms, "gbps_device": gbps, "pct_of_hbm_device": 100 * gbps / hbm_gbps}


def _forward_backward(fn, x, r, w, b, dy, dh) -> Callable[[], tuple[torch.Tensor, ...]]:
    def step():
        h, y = fn(x, r, w, b)
        return (y, *torch.autograd.grad((h, y), (x, r, w, b), (dh, dy)))

    return step


def _train_records(dtype_name, batches, weight, bias, gen, device, hbm_gbps, env) -> Iterator[dict]:
    """One record per (batch, provider), yielded as measured."""
    dtype = getattr(torch, dtype_name)
    w = weight.float().requires_grad_()
    b = bias.float().requires_grad_()
    providers = _train_providers()
    for batch in batches:
        x = torch.randn(batch, TOKENS, D, device=device, generator=gen).to(dtype).requires_grad_()
        r = torch.randn(batch, TOKENS, D, device=device, generator=gen).requires_grad_()
        dy, dh = torch.randn_like(x), torch.randn_like(r)
        # x, y, dy, dx in x's dtype; residual, h (written, read back), dh, dresidual in the residual's.
        # (Session 19's records used 3 and 4, 22 of these 28 bytes in bf16: their GB/s read 22/28 low.)
        nbytes = x.numel() * (4 * x.element_size() + 5 * r.element_size())
        want = _forward_backward(torch_autocast_glue, x, r, w, b, dy, dh)()
        for provider, fn in providers.items():
            call = _forward_backward(fn, x, r, w, b, dy, dh)
            first = first_call_ms(call, device)
            timing = time_fn(call, device)
            diff = max((got.float() - ref.float()).abs().max().item() for got, ref in zip(call(), want, strict=True))
            gbps = nbytes / (timing["ms_median"] * 1e-3) / 1e9
            on_device = _on_device(call, device, nbytes, hbm_gbps)
            yield {
                "provider": provider, "kernel": "add_layer_norm_train", "variant": "train add+layer_norm",
                "batch": batch, "M": batch * TOKENS, "dtype": dtype_name, **timing, "first_call_ms": first,
                "bytes": nbytes, "gbps": gbps, "hbm_gbps": hbm_gbps, "pct_of_hbm": 100 * gbps / hbm_gbps,
                "max_abs_diff_vs_torch": diff, **on_device, **env,
            }  # fmt: skip


def _providers() -> dict[str, Callable]:
    from vithybrid_fast.kernels import add_layer_norm

    compiled = torch.compile(torch_add_layer_norm, mode="default", dynamic=False)
    return {
        "ours": lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS),
        "torch": torch_add_layer_norm,
        "torch.compile": compiled,
    }


def run(
    device: str = "cuda",
    batches: tuple[int, ...] = (1, 8, 64),
    dtypes: tuple[str, ...] = ("float16", "bfloat16"),
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One record per (dtype, variant, batch, provider), each handed to `on_record` as measured; [] without CUDA."""
    if skip_without_cuda("bench_add_layer_norm", device):
        return []
    hbm_gbps = measured_hbm_gbps(device)
    env = environment(device)
    records: list[dict] = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator(device=device).manual_seed(0)
        weight = 1 + 0.1 * torch.randn(D, device=device, generator=gen).to(dtype)
        bias = 0.1 * torch.randn(D, device=device, generator=gen).to(dtype)
        for with_residual in (True, False):
            providers = _providers()
            for batch in batches:
                x = torch.randn(batch, TOKENS, D, device=device, generator=gen).to(dtype)
                res = torch.randn_like(x) if with_residual else None
                nbytes = x.numel() * x.element_size() * (4 if with_residual else 2)
                with torch.inference_mode():
                    _, want = torch_add_layer_norm(x, res, weight, bias)
                    for provider, fn in providers.items():
                        call = functools.partial(fn, x, res, weight, bias)

                        first = first_call_ms(call, device)  # compile (Triton or Inductor) included
                        timing = time_fn(call, device)
                        diff = (call()[1].float() - want.float()).abs().max().item()
                        gbps = nbytes / (timing["ms_median"] * 1e-3) / 1e9
                        on_device = _on_device(call, device, nbytes, hbm_gbps)
                        records.append({
                            "provider": provider, "kernel": "add_layer_norm",
                            "variant": "add+layer_norm" if with_residual else "layer_norm",
                            "batch": batch, "M": batch * TOKENS, "dtype": dtype_name, **timing,
                            "first_call_ms": first, "bytes": nbytes, "gbps": gbps, "hbm_gbps": hbm_gbps,
                            "pct_of_hbm": 100 * gbps / hbm_gbps, "max_abs_diff_vs_torch": diff, **on_device,
                            **env,
                        })  # fmt: skip
                        if on_record is not None:
                            on_record(records[-1])
        for record in _train_records(dtype_name, batches, weight, bias, gen, device, hbm_gbps, env):
            records.append(record)
            if on_record is not None:
                on_record(record)
    return records


def format_table(records: list[dict]) -> str:
    header = f"{'dtype':<9} {'variant':<20} {'batch':>5} {'provider':<14} {'ms':>8} {'GB/s':>8} {'%HBM':>6} "
    header += f"{'ms dev':>8} {'%HBM dev':>8} {'maxdiff':>9}"
    lines = [header, "-" * len(header)]
    for r in records:
        dev = "—" if r.get("ms_device") is None else f"{r['ms_device']:.4f}"
        dev_pct = "—" if r.get("ms_device") is None else f"{r['pct_of_hbm_device']:.1f}"
        lines.append(
            f"{r['dtype']:<9} {r['variant']:<20} {r['batch']:>5} {r['provider']:<14} {r['ms_median']:>8.4f} "
            f"{r['gbps']:>8.1f} {r['pct_of_hbm']:>6.1f} {dev:>8} {dev_pct:>8} {r['max_abs_diff_vs_torch']:>9.2e}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    def describe(first: dict) -> str:
        return (
            f"{first['gpu']}  torch {first['torch']}  triton {first['triton']}  commit {first['commit']}"
            f"  | measured HBM copy bandwidth {first['hbm_gbps']:.0f} GB/s"
        )

    run_gpu_bench_cli("bench_add_layer_norm", __doc__.splitlines()[0], run, format_table, describe, argv)


if __name__ == "__main__":
    main()
