"""Tile sweep for the fused GEMMs: every candidate tile on each of the ViT layer's four GEMMs, against
cuBLAS + the separate epilogue ops the fusion replaces — the next step after the H200 profile showed the
fused GEMMs at ~300 TFLOP/s against cuBLAS's ~700 (bench/results/nvidia-h200-2026-11-26-notes.md).

    python -m vithybrid_fast.bench.sweep_fused_linear --batch 64 --dtype bfloat16 --out sweep.jsonl

Launches `_fused_linear_kernel` directly with each tile (the shipped GPU configs and larger Hopper
candidates), bypassing the autotuner, so a tile need not be shipped to be measured. Each tile is checked
against the torch path first (same tolerance idiom as the tests) and timed only if it agrees; a compile
error or shared-memory overflow is a row, not a crash. Times are triton.testing.do_bench medians (queued
calls, L2 flushed between them). The last table ranks the tiles per GEMM: copy a winner into
kernels/fused_linear.py's tile lists only with this evidence.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import torch
import triton
from torch.nn import functional as F
from vithybrid_fast.kernels import _fused_linear_tiles as fl_tiles
from vithybrid_fast.kernels import fused_linear as fl
from vithybrid_fast.kernels._runtime import interpreter_enabled

from .arguments import ints_at_least, positive_int

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages): the shipped 16-bit tiles first, then Hopper candidates
TILES = [*fl_tiles.HALF_TILES, (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
         (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 4)]  # fmt: skip
INTERPRETER_TILES = [(32, 32, 32, 4, 1)]


def gemms(batch: int, tokens: int, hidden: int, intermediate: int) -> list[dict]:
    """The four GEMMs of one ViT layer: name, M, K, N and the epilogue the kernel fuses."""
    m = batch * tokens
    return [
        dict(name="qkv +LN", m=m, k=hidden, n=3 * hidden, ln=True, act="", residual=False),
        dict(name="out-proj +res", m=m, k=hidden, n=hidden, ln=False, act="", residual=True),
        dict(name="fc1 +LN +GELU", m=m, k=hidden, n=intermediate, ln=True, act="gelu", residual=False),
        dict(name="fc2 +res", m=m, k=intermediate, n=hidden, ln=False, act="", residual=True),
    ]


def make_inputs(g: dict, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x = rnd(g["m"], g["k"], shift=0.5)
    inputs = dict(x=x, w=rnd(g["n"], g["k"], scale=g["k"] ** -0.5), b=rnd(g["n"], scale=0.1))
    inputs["res"] = rnd(g["m"], g["n"]) if g["residual"] else None
    if g["ln"]:
        inputs.update(ln_w=rnd(g["k"], scale=0.2, shift=1.0), ln_b=rnd(g["k"], scale=0.1))
        inputs["mean"], inputs["rstd"] = fl.launch_layer_norm_stats(x, 1e-12)
    return inputs


def torch_path(g: dict, t: dict) -> Callable[[], torch.Tensor]:
    """What the fusion replaces: LayerNorm, cuBLAS GEMM (+bias), GELU, residual add — separate ops."""

    def run() -> torch.Tensor:
        x = F.layer_norm(t["x"], (g["k"],), t["ln_w"], t["ln_b"], 1e-12) if g["ln"] else t["x"]
        y = F.linear(x, t["w"], t["b"])
        y = F.gelu(y) if g["act"] == "gelu" else y
        return y + t["res"] if g["residual"] else y

    return run


def kernel_path(g: dict, t: dict, tile: tuple[int, int, int, int, int]) -> Callable[[], torch.Tensor]:
    bm, bn, bk, warps, stages = tile
    x, w, out = t["x"], t["w"], torch.empty(g["m"], g["n"], device=t["x"].device, dtype=t["x"].dtype)
    res = t["res"] if t["res"] is not None else out
    mean, rstd, ln_w, ln_b = (t.get(k, out) for k in ("mean", "rstd", "ln_w", "ln_b"))
    grid = (triton.cdiv(g["m"], bm) * triton.cdiv(g["n"], bn),)

    def run() -> torch.Tensor:
        fl._fused_linear_kernel[grid](
            x, w, t["b"], mean, rstd, ln_w, ln_b, res, out,
            g["m"], g["n"], g["k"], triton.next_power_of_2(g["m"]),
            x.stride(0), x.stride(1), w.stride(0), w.stride(1), res.stride(0), res.stride(1),
            out.stride(0), out.stride(1),
            HAS_BIAS=True, HAS_LN=g["ln"], ACTIVATION=g["act"], HAS_RESIDUAL=g["residual"],
            IEEE_FP32=x.dtype == torch.float32, DOT_IN_FP32=interpreter_enabled() and x.dtype == torch.bfloat16,
            EVEN_K=g["k"] % bk == 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
            num_warps=warps, num_stages=stages,
        )  # fmt: skip
        return out

    return run


def _time_ms(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    import time

    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def sweep(batch: int, dtype: torch.dtype, device: str, tiles=None, dims=(577, 768, 3072), log=print) -> list[dict]:
    """One row per (GEMM, provider): cuBLAS + epilogue ops, then each tile; ms, TFLOP/s, error vs float64."""
    tiles = tiles or (INTERPRETER_TILES if interpreter_enabled() else TILES)
    rows = []
    for g in gemms(batch, *dims):
        t = make_inputs(g, dtype, device)
        t64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in t.items()}
        if g["ln"]:
            t64["mean"], t64["rstd"] = fl.reference_layer_norm_stats(t64["x"], 1e-12)
        ref = torch_path(g, t64)()
        peer = torch_path(g, t)
        peer_err = (peer().double() - ref).abs().max().item()
        bound = 2 * peer_err + {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * max(
            1.0, ref.abs().max().item()
        )
        flops = 2.0 * g["m"] * g["n"] * g["k"]
        base = dict(gemm=g["name"], m=g["m"], n=g["n"], k=g["k"], batch=batch, dtype=str(dtype).removeprefix("torch."))
        ms = _time_ms(peer, device)
        rows.append(dict(base, provider="cublas+ops", ms=ms, tflops=flops / ms / 1e9, err=peer_err))
        log(f"{g['name']:16s} {'cublas+ops':28s} {ms:8.4f} ms {flops / ms / 1e9:7.1f} TFLOP/s  err {peer_err:.2e}")
        for tile in tiles:
            label = "x".join(map(str, tile[:3])) + f" w{tile[3]} s{tile[4]}"
            row = dict(base, provider=f"triton {label}")
            try:
                fn = kernel_path(g, t, tile)
                err = (fn().double() - ref).abs().max().item()
                row["err"] = err
                if not err <= bound:
                    row["error"] = f"error {err:.2e} over the bound {bound:.2e}"
                else:
                    row["ms"] = _time_ms(fn, device)
                    row["tflops"] = flops / row["ms"] / 1e9
            except Exception as exc:  # out of shared memory, a compile error: a row, not a crash
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            rows.append(row)
            shown = f"{row['ms']:8.4f} ms {row['tflops']:7.1f} TFLOP/s" if "ms" in row else row["error"]
            log(f"{g['name']:16s} {row['provider']:28s} {shown}")
    return rows


def ranking(rows: list[dict]) -> str:
    lines = ["", f"{'gemm':16s} {'best triton tile':28s} {'ms':>8s} {'cuBLAS+ops ms':>14s} {'ratio':>6s}"]
    for name in dict.fromkeys(r["gemm"] for r in rows):
        mine = [r for r in rows if r["gemm"] == name]
        peer = next(r for r in mine if r["provider"] == "cublas+ops")
        timed = [r for r in mine if r["provider"] != "cublas+ops" and "ms" in r]
        if not timed:
            lines.append(f"{name:16s} (no tile ran)")
            continue
        best = min(timed, key=lambda r: r["ms"])
        ratio = peer["ms"] / best["ms"]  # > 1: the fused tile beats cuBLAS + the separate ops
        lines.append(f"{name:16s} {best['provider']:28s} {best['ms']:8.4f} {peer['ms']:14.4f} {ratio:6.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vithybrid_fast.bench.sweep_fused_linear", description=__doc__)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16"))
    parser.add_argument(
        "--dims",
        type=ints_at_least(1, count=3),
        default=[577, 768, 3072],
        help="tokens,hidden,intermediate (default: the checkpoint's)",
    )
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file, one row each")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dims = tuple(args.dims)
    rows = sweep(args.batch, getattr(torch, args.dtype), device, dims=dims)
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(ranking(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
