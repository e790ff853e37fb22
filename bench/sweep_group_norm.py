"""Sweep of group_norm_act's group loop: its tile, warps and L2 hints, and the split path, per backbone shape.

At batch 64, 28 of the 52 GroupNorms take `_gn_fwd_group_loop` (one program per (n, g) sweeping its group
twice). The H100 profile of 2026-11-27 (bench/results/nvidia-h100-2026-11-27-notes.md) had those 28
calls at 5.15 ms of a 31.89 ms forward, 63 % of HBM counted once. Its tile (4,096 elements, 8 warps) and
the L2 hints the plan adds (kernels/_group_norm_act_plan.py, `Blocks`) were chosen without a GPU; the
offline compile shows why that matters: 100–102 registers under Triton 3.6 leave 2 programs per SM.

    python -m vithybrid_fast.bench.sweep_group_norm --batch 64 --dtype bfloat16 --out sweep-gn.jsonl

Every candidate runs through group_norm_act's own plan (its `_BLOCKS` / `_FORCE_PATH` hooks), at each
distinct backbone shape the plan sends down the loop at this batch. Each is first checked against float64
(the bound of DESIGN.md: 2 × torch's own error in the dtype + atol) and timed only if it agrees. Times
are device times (`device_ms`: a CUDA graph replayed, so the host's launch cost is not in them); GB/s
counts the least traffic (x [+ residual] read once, y written once), % of the measured HBM copy
bandwidth. The ranking weighs each shape by its calls per forward: change `GPU_BLOCKS` only on its
evidence, and rerun `bench_backbone_kernels` after.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from vithybrid_fast.kernels import _group_norm_act_plan as plan
from vithybrid_fast.kernels._backbone_calls import group_norm_calls
from vithybrid_fast.kernels._runtime import interpreter_enabled

from .arguments import positive_int
from .bench_backbone_kernels import NUM_GROUPS, torch_group_norm_act
from .common import RecordLog, device_ms, exit_without_cuda, measured_hbm_gbps

gn = importlib.import_module("vithybrid_fast.kernels.group_norm_act")  # the module: the package re-exports the function


@dataclasses.dataclass(frozen=True)
class Candidate:
    label: str
    path: str  # "loop" or "split"
    blocks: plan.Blocks


def _loop(block: int, warps: int, hints: bool = True, base: plan.Blocks = plan.GPU_BLOCKS) -> Candidate:
    label = f"loop {block} w{warps}" + ("" if hints else " no-hints")
    return Candidate(label, "loop", dataclasses.replace(base, loop=block, loop_warps=warps, loop_l2_hints=hints))


SHIPPED = plan.GPU_BLOCKS


def _candidates() -> list[Candidate]:
    """The shipped tile first, then the same without hints; the tile shipped until the H200 sweep of
    2026-11-27 (4096 × 8 warps: 100–102 registers under Triton 3.6, 2 programs per SM) and tiles that trade
    registers for residency (offline, Triton 3.6, sm_90, bf16: 2048 × 8 warps 48 registers; 1024 × 4 40)."""
    tiles = [(SHIPPED.loop, SHIPPED.loop_warps, True), (SHIPPED.loop, SHIPPED.loop_warps, False)]
    tiles += [(4096, 8, True), (4096, 8, False), (2048, 8, True), (2048, 8, False), (2048, 4, True)]
    tiles += [(1024, 4, True), (4096, 16, True), (8192, 16, True)]
    unique = list(dict.fromkeys(tiles))  # the shipped tile is also one of the others
    return [_loop(block, warps, hints) for block, warps, hints in unique] + [Candidate("split", "split", SHIPPED)]


CANDIDATES = _candidates()
INTERPRETER_CANDIDATES = [
    _loop(64, 4, base=plan.INTERPRETER_BLOCKS),
    _loop(32, 2, hints=False, base=plan.INTERPRETER_BLOCKS),
    Candidate("split", "split", plan.INTERPRETER_BLOCKS),
]
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def loop_cases(batch: int, sm_count: int, image_size: int = 384) -> Counter:
    """{(C, H, W, residual, relu): calls per forward} of the norms the plan sends down the loop at `batch`."""
    cases: Counter = Counter()
    for call in group_norm_calls(image_size):
        cg = call.channels // call.num_groups
        if plan.choose_path(batch, call.num_groups, cg, call.s, False, sm_count) == "loop":
            cases[(call.channels, *call.spatial, call.residual, call.relu)] += 1
    return cases


def _inputs(case: tuple, batch: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    c, h, w, residual, _ = case
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)

    x = rnd(batch, c, h, w, shift=0.3)
    return dict(x=x, w=rnd(c, scale=0.2, shift=1.0), b=rnd(c, scale=0.1), res=rnd(batch, c, h, w) if residual else None)


def _ours(t: dict, act: str | None, candidate: Candidate, num_groups: int) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        saved = gn._BLOCKS, gn._FORCE_PATH
        gn._BLOCKS, gn._FORCE_PATH = candidate.blocks, candidate.path
        try:
            return gn.group_norm_act(t["x"], num_groups, t["w"], t["b"], act=act, residual=t["res"])
        finally:
            gn._BLOCKS, gn._FORCE_PATH = saved

    return run


def sweep(
    batch: int,
    dtype: torch.dtype,
    device: str,
    cases: Counter | None = None,
    candidates=None,
    log=print,
    keep=None,
    num_groups: int = NUM_GROUPS,
) -> list[dict]:
    """One row per (shape, provider): torch's ops, then each candidate; device ms, GB/s, error vs float64."""
    on_gpu = torch.device(device).type == "cuda"
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if on_gpu else 1
    cases = cases if cases is not None else loop_cases(batch, sm_count)
    candidates = candidates or (INTERPRETER_CANDIDATES if interpreter_enabled() else CANDIDATES)
    hbm = measured_hbm_gbps(device) if on_gpu else None
    rows = []

    def emit(row: dict) -> None:
        rows.append(row)
        if keep is not None:
            keep(row)
        shown = f"{row['ms']:8.4f} ms {row['gbps']:7.0f} GB/s" if "ms" in row else row["error"]
        log(f"{row['shape']:>22s} {row['provider']:24s} {shown}")

    with torch.no_grad():
        for case, calls in cases.items():
            c, h, w, residual, relu = case
            act = "relu" if relu else None
            t = _inputs(case, batch, dtype, device)
            wide = {k: None if v is None else v.double() for k, v in t.items()}
            ref = torch_group_norm_act(wide["x"], wide["w"], wide["b"], act, wide["res"], num_groups)
            peer = lambda t=t, act=act: torch_group_norm_act(t["x"], t["w"], t["b"], act, t["res"], num_groups)  # noqa: E731
            peer_err = (peer().double() - ref).abs().max().item()
            bound = 2 * peer_err + ATOL[dtype] * max(1.0, ref.abs().max().item())
            nbytes = t["x"].numel() * t["x"].element_size() * (3 if residual else 2)
            base = dict(kernel="group_norm_act", shape=f"{batch}x{c}x{h}x{w}" + ("+res" if residual else ""),
                        batch=batch, dtype=str(dtype).removeprefix("torch."), calls_per_forward=calls,
                        bytes=nbytes, hbm_gbps=hbm)  # fmt: skip
            providers = [("torch", peer)] + [(cand.label, _ours(t, act, cand, num_groups)) for cand in candidates]
            for provider, fn in providers:
                row = dict(base, provider=provider)
                try:
                    row["err"] = err = (fn().double() - ref).abs().max().item()
                    if not err <= bound:
                        row["error"] = f"error {err:.2e} over the bound {bound:.2e}"
                    else:
                        row["ms"] = device_ms(fn, device, rep_ms=25)  # 10 replays of ~25 ms: ~0.3 s a row
                        row["gbps"] = nbytes / (row["ms"] * 1e-3) / 1e9
                        if hbm:
                            row["pct_of_hbm"] = 100 * row["gbps"] / hbm
                except Exception as exc:  # a compile error or resource overflow: a row, not a crash
                    row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                emit(row)
    return rows


def ranking(rows: list[dict]) -> str:
    """Per shape the best provider; then each provider's ms per forward over every loop call (all timed)."""
    lines = [
        "",
        f"{'shape':>22s} {'calls':>5s} {'torch ms':>9s} {'shipped ms':>10s} {'best':24s} {'ms':>8s} {'%HBM':>5s}",
    ]
    shipped = CANDIDATES[0].label if any(r["provider"] == CANDIDATES[0].label for r in rows) else None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    for shape in shapes:
        mine = {r["provider"]: r for r in rows if r["shape"] == shape and "ms" in r}
        if not mine:
            lines.append(f"{shape:>22s} (nothing timed)")
            continue
        best = min(mine.values(), key=lambda r: r["ms"])
        torch_ms = f"{mine['torch']['ms']:9.4f}" if "torch" in mine else f"{'-':>9s}"
        ship_ms = f"{mine[shipped]['ms']:10.4f}" if shipped in mine else f"{'-':>10s}"
        pct = f"{best['pct_of_hbm']:5.1f}" if best.get("pct_of_hbm") else f"{'-':>5s}"
        lines.append(f"{shape:>22s} {best['calls_per_forward']:5d} {torch_ms} {ship_ms} {best['provider']:24s} "
                     f"{best['ms']:8.4f} {pct}")  # fmt: skip
    lines += ["", f"{'provider':24s} {'ms per forward (all loop calls)':>32s}"]
    for provider in dict.fromkeys(r["provider"] for r in rows):
        mine = [r for r in rows if r["provider"] == provider]
        if len(mine) == len(shapes) and all("ms" in r for r in mine):
            total = sum(r["ms"] * r["calls_per_forward"] for r in mine)
            lines.append(f"{provider:24s} {total:32.3f}")
        else:
            lines.append(f"{provider:24s} {'(not timed at every shape)':>32s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vithybrid_fast.bench.sweep_group_norm", description=__doc__)
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--out", type=Path, default=None, help="JSON-lines file, one row each, written as measured")
    args = parser.parse_args(argv)
    exit_without_cuda(parser.prog, "cuda")  # the candidates are GPU tiles: one line and exit 2, no file
    rows: list[dict] = []
    with RecordLog(args.out) as record_log:
        try:
            sweep(
                args.batch,
                getattr(torch, args.dtype),
                "cuda",
                keep=lambda row: (rows.append(row), record_log.write(row)),
            )
        except KeyboardInterrupt:  # gpu_session.sh's budget (SIGINT): rank what was measured
            print(f"stopped after {len(rows)} rows")
    print(ranking(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
