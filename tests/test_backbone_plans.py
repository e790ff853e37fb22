"""The backbone kernels' GPU planning, run on the CPU with the SM counts and shapes of an A100 and an H100.

group_norm_act's plan (path, grid, chunking, tiles) and its apply-config prune, and weight_standardize's
plan, are pure functions; here they are asserted at the base checkpoint's real GroupNorm shapes for
batch 1–128, so a change to a threshold or a grid formula shows up without a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import triton
from vithybrid_fast.kernels import _group_norm_act_plan as plan
from vithybrid_fast.kernels._backbone_calls import conv_weight_shapes, group_norm_calls
from vithybrid_fast.kernels._group_norm_act_tiles import gpu_apply_configs, prune_apply

ws = importlib.import_module("vithybrid_fast.kernels.weight_standardize")

A100, H100 = 108, 132  # SM counts
GPU = plan.GPU_BLOCKS
# (C, S) of the base checkpoint's GroupNorms at 384² (32 groups each).
STEM, S1_MID, S1_OUT, S2_MID, S2_OUT, S3_MID, S3_OUT = (
    (64, 192 * 192), (64, 96 * 96), (256, 96 * 96), (128, 48 * 48), (512, 48 * 48), (256, 24 * 24), (1024, 24 * 24),
)  # fmt: skip


def kernels_of(p: plan.ForwardPlan) -> list[str]:
    return [launch.kernel for launch in p.launches]


def test_traced_backbone_calls():
    # 1 stem + 3 stages × (3 per block) + 3 downsample norms; 52 weight-standardized convs.
    calls = group_norm_calls()
    assert len(calls) == 52 and len(conv_weight_shapes()) == 52
    assert sum(c.residual for c in calls) == 16  # one fused tail per bottleneck block (3 + 4 + 9)
    assert sum(not c.relu for c in calls) == 3  # the downsample norms
    assert {(c.channels, c.s) for c in calls} == {STEM, S1_MID, S1_OUT, S2_MID, S2_OUT, S3_MID, S3_OUT,
                                                  (128, 96 * 96), (256, 48 * 48)}  # fmt: skip
    assert all(c.num_groups == 32 for c in calls)


@pytest.mark.parametrize(("sm_count", "first_single_batch"), [(A100, 7), (H100, 9)])
def test_single_pass_threshold(sm_count, first_single_batch):
    # Single pass needs N·32 ≥ 2·SMs: A100 216 → batch 7, H100 264 → batch 9; below it the group split.
    for c, s in (S2_MID, S3_MID):  # the two model shapes whose padded group fits (4 × 4096, 8 × 1024)
        assert plan.choose_path(first_single_batch - 1, 32, c // 32, s, False, sm_count) == "split"
        assert plan.choose_path(first_single_batch, 32, c // 32, s, False, sm_count) == "single"
        assert plan.choose_path(first_single_batch, 32, c // 32, s, True, sm_count) == "single"
    for c, s in (STEM, S1_MID, S1_OUT, S2_OUT, S3_OUT):  # too big for registers at any batch
        assert plan.choose_path(first_single_batch - 1, 32, c // 32, s, False, sm_count) == "split"
        assert plan.choose_path(first_single_batch, 32, c // 32, s, False, sm_count) == "loop"
        assert plan.choose_path(128, 32, c // 32, s, True, sm_count) == "split_channels"


def test_single_pass_tile_limit():
    assert plan.single_pass_tile(8, 576) == (8, 1024)  # 8192 elements: fits
    assert plan.choose_path(64, 32, 16, 1024, False, H100) == "single"  # exactly SINGLE_PASS_MAX_TILE
    assert plan.choose_path(64, 32, 16, 1025, False, H100) == "loop"  # one more column: 16 × 2048


@pytest.mark.parametrize("sm_count", [A100, H100])
@pytest.mark.parametrize("batch", [1, 2, 4, 8, 16, 32, 64, 128])
@pytest.mark.parametrize(("c", "s"), [STEM, S1_OUT, S2_MID, S2_OUT, S3_MID, S3_OUT])
def test_forward_plan_invariants(c, s, batch, sm_count):
    # Whatever the path: grids cover every (n, g) group and every element exactly once.
    cg, rows = c // 32, batch * 32
    length = cg * s
    p = plan.forward_plan(batch, c, s, 32, False, sm_count)
    if p.path == "single":
        (launch,) = p.launches
        assert launch.grid == (rows,) and launch.num_warps == 16  # both fitting model tiles hold ≥ 8192
        assert launch.constexprs["BLOCK_CG"] >= cg and launch.constexprs["BLOCK_S"] >= s
    elif p.path == "loop":
        (launch,) = p.launches
        hints = {"FIRST_EVICT": "evict_last", "LAST_EVICT": "evict_first"}  # the statistics sweep's, the output's
        assert launch.grid == (rows,) and launch.constexprs == {"BLOCK": GPU.loop, **hints}
        assert launch.num_warps == GPU.loop_warps == 4  # the H200 sweep's tile (2026-11-27)
        assert launch.sizes == {"ITERS": triton.cdiv(length, GPU.loop)}
    else:
        assert p.path == "split" and rows < 2 * sm_count
        stats, apply = p.launches
        iters, chunks = stats.sizes["ITERS"], stats.sizes["P"]
        blocks = triton.cdiv(length, GPU.stats)
        assert (chunks - 1) * iters < blocks <= chunks * iters  # no empty chunk, none missing
        assert 1 <= chunks <= GPU.max_chunks == apply.constexprs["BLOCK_P"]
        assert stats.grid == (rows * chunks,)
        tiles = triton.cdiv(length, GPU.apply)
        assert apply.grid == (rows * tiles,)
        assert apply.sizes == {"P": chunks, "CHUNK": iters * GPU.stats, "TILES": tiles}


@pytest.mark.parametrize(
    ("shape", "sm_count", "batch", "iters", "chunks", "apply_grid"),
    [
        # stem (64, 192²): L = 2 · 36,864 = 36 blocks of 2048. H100 batch 1: ⌈528 / 32⌉ = 17 chunks wanted,
        # 3 blocks each → 12 chunks; 32 · 12 = 384 stats programs, 32 · 36 = 1152 apply programs.
        (STEM, H100, 1, 3, 12, 1152),
        (STEM, A100, 1, 3, 12, 1152),  # ⌈432 / 32⌉ = 14 → 3 blocks each → 12
        (STEM, H100, 4, 8, 5, 4608),  # ⌈528 / 128⌉ = 5 → 8 blocks each → 5 chunks
        (STEM, A100, 4, 9, 4, 4608),  # ⌈432 / 128⌉ = 4 → 9 blocks each
        (STEM, H100, 8, 12, 3, 9216),  # ⌈528 / 256⌉ = 3 (batch 8 on an H100 is still below 264 programs)
        (S3_OUT, H100, 1, 1, 9, 288),  # (1024, 24²): L = 18,432 = 9 blocks; 17 wanted, 9 exist
        (S2_OUT, H100, 1, 2, 9, 576),  # (512, 48²): L = 36,864 = 18 blocks; 17 wanted → 2 each → 9
    ],
)
def test_split_plan_values(shape, sm_count, batch, iters, chunks, apply_grid):
    c, s = shape
    p = plan.forward_plan(batch, c, s, 32, False, sm_count)
    assert p.path == "split"
    stats, apply = p.launches
    assert stats.sizes == {"ITERS": iters, "P": chunks} and stats.grid == (batch * 32 * chunks,)
    assert apply.grid == (apply_grid,)


def test_channels_last_plan():
    # Per-channel statistics → finalize → autotuned apply; the stem at batch 1 on an A100:
    # 64-channel tiles × 32 positions, 1152 S-blocks, 432 programs wanted → 3 blocks per chunk → 384 chunks.
    p = plan.forward_plan(1, *STEM, 32, True, A100)
    assert p.path == "split_channels"
    stats, finalize, apply = p.launches
    assert (stats.kernel, finalize.kernel, apply.kernel) == ("_gn_stats", "_gn_finalize", "_gn_apply")
    assert stats.grid == (384, 1, 1) and stats.constexprs == {"BLOCK_C": 64, "BLOCK_S": 32}
    assert stats.sizes == {"ITERS": 3, "P": 384}
    # 2 channels × 384 chunks = 768 partials per group: one step of the fixed 1024-wide merge.
    assert finalize.grid == (32,) and finalize.constexprs == {"BLOCK_E": 1024}
    assert finalize.sizes == {"E_ITERS": 1, "CHUNK_S": 96}
    # Stage 3 out at batch 1 on an H100: 32 channels × 36 chunks = 1152 partials → two steps.
    stats, finalize, _ = plan.forward_plan(1, *S3_OUT, 32, True, H100).launches
    assert stats.sizes["P"] == 36 and finalize.sizes["E_ITERS"] == 2
    assert apply.grid is None and apply.num_warps is None  # the autotuner's tile decides


@pytest.mark.parametrize(
    ("shape", "channels_last", "sm_count", "batch", "expected"),
    [
        # (BLOCK_C, BLOCK_S, ITERS, P): the backward's NCHW tile is 32 × 64 for every model shape.
        (S3_OUT, False, H100, 1, (32, 64, 1, 9)),  # 9 S-blocks, 17 chunks wanted
        (S3_OUT, False, H100, 64, (32, 64, 9, 1)),  # 64 · 32 channel blocks already fill the GPU
        (S2_OUT, False, A100, 1, (32, 64, 2, 18)),  # 16 channel blocks: ⌈432 / 16⌉ = 27 → 2 of 36 S-blocks → 18
        (STEM, False, H100, 1, (32, 64, 3, 192)),  # 2 channel blocks: 264 wanted of 576 S-blocks → 3 each
        (S3_OUT, True, H100, 1, (128, 16, 1, 36)),  # channels-last: 128-channel tiles × 16 positions
        (STEM, True, A100, 1, (64, 32, 3, 384)),
    ],
)
def test_reduce_plan(shape, channels_last, sm_count, batch, expected):
    assert plan.reduce_plan(batch, *shape, channels_last, sm_count) == expected


@pytest.mark.parametrize(
    ("shape", "channels_last", "expected"),
    [
        (S3_OUT, False, {(32, 64, 4), (64, 64, 8)}),  # span(576) = 64
        (S2_OUT, False, {(8, 256, 4), (16, 256, 8)}),  # span(2304) = 256 (512 pads 11% more)
        (STEM, False, {(4, 512, 4), (8, 512, 8)}),
        (S3_OUT, True, {(128, 16, 4), (128, 32, 8)}),  # channels-last: 128 channels wide
        (STEM, True, {(64, 32, 4), (64, 64, 8)}),  # 64 channels: the whole C
        ((12, 35), False, {(32, 64, 4)}),  # nothing tight: the smallest coalesced tile
    ],
)
def test_apply_config_prune(shape, channels_last, expected):
    c, s = shape
    kept = prune_apply(gpu_apply_configs(), {"C": c, "S": s, "CHANNELS_LAST": channels_last})
    assert {(cfg.kwargs["BLOCK_C"], cfg.kwargs["BLOCK_S"], cfg.num_warps) for cfg in kept} == expected


def test_gpu_apply_configs():
    configs = gpu_apply_configs()
    assert len(configs) == 19  # 2K tiles (10 shapes, 2..1024 wide) on 4 warps, 4K tiles (9) on 8 warps
    assert all(c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_S"] == 512 * c.num_warps for c in configs)


@pytest.mark.parametrize(
    ("sm_count", "batch", "launches", "paths"),
    [
        # Steady-state inference (standardized conv weights cached): GroupNorm launches per forward.
        (H100, 1, 104, {"split": 52}),
        (H100, 8, 104, {"split": 52}),
        (A100, 8, 52, {"single": 24, "loop": 28}),
        (H100, 64, 52, {"single": 24, "loop": 28}),
        (A100, 128, 52, {"single": 24, "loop": 28}),
    ],
)
def test_launches_per_forward(sm_count, batch, launches, paths):
    plans = [plan.forward_plan(batch, c.channels, c.s, c.num_groups, False, sm_count) for c in group_norm_calls()]
    assert sum(len(p.launches) for p in plans) == launches
    counted: dict[str, int] = {}
    for p in plans:
        counted[p.path] = counted.get(p.path, 0) + 1
    assert counted == paths


def test_weight_standardize_plan():
    # One program per output channel, one block and warp count for every conv, GPU or batch.
    for shape in conv_weight_shapes():
        p = ws.plan(shape[0], shape[1] * shape[2] * shape[3])
        assert p.grid == (shape[0],) and (p.block, p.num_warps) == (1024, 4)
    fan_ins = {s[1] * s[2] * s[3] for s in conv_weight_shapes()}
    assert max(fan_ins) == 2304 and min(fan_ins) == 64  # ≤ 3 loop steps per sweep
    # What Triton specializes K on: only the stem's 147 is not a multiple of 16 → 2 compiles per dtype.
    assert {k % 16 == 0 for k in fan_ins} == {True, False} and sorted(k for k in fan_ins if k % 16) == [147]
    assert ws.plan(8, 100, interpreter=True).block == ws.INTERPRETER_BLOCK


COUNT_COMPILES = """
import importlib, torch
from vithybrid_fast.kernels import _offline
for phases in (("forward",), ("forward", "backward")):
    for arch in (80, 90):
        launches = []
        for name in ("_group_norm_act_offline", "weight_standardize"):
            module = importlib.import_module("vithybrid_fast.kernels." + name)
            launches += [ln for ln in module.offline_launches(torch.bfloat16, [1, 8, 64], arch) if ln.phase in phases]
        jobs = _offline.compile_jobs(launches, arch)
        print(len(phases), arch, len(jobs), len([j for j in jobs if j[0].name.startswith("weight")]))
"""


def test_backbone_compile_count():
    # Issue 11: distinct compiled kernels (Triton's own cache key, bound offline) of a bf16 run at batch
    # 1, 8, 64. Inference: GroupNorm 9 (group stats 1, grouped apply 3 and group loop 3 for the
    # (residual, ReLU) pairs, single pass 2 tiles) + weight standardization 2 (K = 147 is not a multiple of 16).
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", COUNT_COMPILES], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {tuple(map(int, line.split()[:2])): tuple(map(int, line.split()[2:])) for line in done.stdout.splitlines()}
    assert rows[(1, 80)] == rows[(1, 90)] == (11, 2)
    # Training adds the backward: GroupNorm 5 (the one-tile reduction per ReLU flag, the flat apply per
    # (ReLU, d residual) pair) and weight standardization 2.
    assert rows[(2, 80)] == rows[(2, 90)] == (18, 4)


@pytest.mark.parametrize("hints", [True, False])
def test_group_loop_blocks_choose_its_tile_warps_and_hints(hints):
    # bench/sweep_group_norm.py times candidates through `Blocks`; the plan must launch exactly them.
    blocks = dataclasses.replace(GPU, loop=4096, loop_warps=8, loop_l2_hints=hints)
    (launch,) = plan.forward_plan(64, 256, 96 * 96, 32, False, H100, blocks=blocks).launches
    assert launch.kernel == "_gn_fwd_group_loop" and launch.num_warps == 8
    expected = (
        {"FIRST_EVICT": "evict_last", "LAST_EVICT": "evict_first"} if hints else {"FIRST_EVICT": "", "LAST_EVICT": ""}
    )
    assert launch.constexprs == {"BLOCK": 4096, **expected}
    assert launch.sizes == {"ITERS": 8 * 96 * 96 // 4096}
