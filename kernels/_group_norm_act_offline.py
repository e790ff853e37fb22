"""group_norm_act's launches at the base checkpoint's shapes, for the offline compile checks (kernels/_offline.py).

Paths, grids and loop counts come from the same plan the launcher uses (kernels/_group_norm_act_plan.py),
for the SM count of each GPU in kernels/_offline.py; the flat NCHW kernels and the backward reduction
have one config, the backward's autotuned apply its pruned config set. Duplicates are dropped here.
"""

from __future__ import annotations

import torch
import triton

from ._backbone_calls import GroupNormCall, group_norm_calls
from ._group_norm_act_plan import GPU_BLOCKS, cdiv, forward_plan, reduce_plan
from ._group_norm_act_plan import Launch as PlannedLaunch

# The opt-in channels-last forward: compiled and checked, but not part of a default (NCHW) run's warm-up.
CHANNELS_LAST_PHASE = "channels_last"
EPS = 1e-5  # BiT's GroupNorm eps (a float: never specialized, so the value does not matter)


def _forward_args(step: PlannedLaunch, call: GroupNormCall, t, f32) -> dict:
    c, s, g = call.channels, call.s, call.num_groups
    cg = c // g
    flags = {"HAS_RES": call.residual, "RELU": call.relu}
    io = dict(x_ptr=t, res_ptr=t, y_ptr=t, w_ptr=t, b_ptr=t, mean_ptr=f32, rstd_ptr=f32)
    if step.kernel == "_gn_fwd_single_pass":
        args = dict(**io, C=c, S=s, G=g, CG=cg, eps=EPS, **flags, CHANNELS_LAST=False, RES_CHANNELS_LAST=False)
    elif step.kernel == "_gn_fwd_group_loop":
        args = dict(**io, S=s, G=g, CG=cg, L=cg * s, eps=EPS, ITERS=step.sizes["ITERS"], **flags)
    elif step.kernel == "_gn_group_stats":
        args = dict(x_ptr=t, part_mean_ptr=f32, part_m2_ptr=f32, L=cg * s, **step.sizes)
    else:  # _gn_apply_grouped
        args = dict(**io, part_mean_ptr=f32, part_m2_ptr=f32, S=s, G=g, CG=cg, L=cg * s, eps=EPS, **step.sizes)
        args.update(flags)
    return {**args, **step.constexprs}


def _reduce_args(call: GroupNormCall, batch: int, channels_last: bool, sm_count: int, t, f32) -> dict:
    c, s, g = call.channels, call.s, call.num_groups
    block_c, block_s, iters, chunks = reduce_plan(batch, c, s, channels_last, sm_count)
    return dict(
        gy_ptr=t, y_ptr=t, x_ptr=t, mean_ptr=f32, rstd_ptr=f32, part_ds_ptr=f32, part_dxh_ptr=f32, C=c, S=s, G=g,
        CG=c // g, P=chunks, ITERS=iters, RELU=call.relu, CHANNELS_LAST=channels_last, BLOCK_C=block_c,
        BLOCK_S=block_s,
    )  # fmt: skip


def backbone_launches(dtype: torch.dtype, batches: list[int], arch: int | None = None) -> list:
    """group_norm_act's NCHW launches at `batches` for `arch` (80 or 90; None: both), forward and backward."""
    from ._group_norm_act_backward import _gn_bwd_apply_grouped, _gn_bwd_reduce, bwd_apply_block
    from ._group_norm_act_tiles import _gn_fwd_single_pass
    from ._offline import ARCHS, GPUS, Launch, TensorArg
    from .group_norm_act import _gn_apply_grouped, _gn_fwd_group_loop, _gn_group_stats

    kernels = {
        "_gn_fwd_single_pass": _gn_fwd_single_pass,
        "_gn_fwd_group_loop": _gn_fwd_group_loop,
        "_gn_group_stats": _gn_group_stats,
        "_gn_apply_grouped": _gn_apply_grouped,
    }
    t, f32 = TensorArg(dtype), TensorArg(torch.float32)
    sm_counts = sorted({GPUS[a][0] for a in ([arch] if arch is not None else ARCHS.values())})
    one = [triton.Config({}, num_warps=4)]
    launches, seen = [], set()

    def add(name: str, kernel, args: dict, configs: list, phase: str) -> None:
        key = (name, repr(sorted(args.items())), repr(configs))
        if key not in seen:
            seen.add(key)
            launches.append(Launch(name, kernel, args, configs, phase))

    for call in group_norm_calls():
        c, s, g = call.channels, call.s, call.num_groups
        for batch in batches:
            for sm_count in sm_counts:
                for step in forward_plan(batch, c, s, g, False, sm_count).launches:
                    config = triton.Config({}, num_warps=step.num_warps)
                    args = _forward_args(step, call, t, f32)
                    add(f"group_norm_act {step.kernel}", kernels[step.kernel], args, [config], "forward")
                # Training: the backward's per-channel reduction and flat apply (one config each).
                reduce_args = _reduce_args(call, batch, False, sm_count, t, f32)
                add("group_norm_act backward reduce", _gn_bwd_reduce, reduce_args, one, "backward")
            cg = c // g
            tiles = cdiv(cg * s, GPU_BLOCKS.apply)
            apply_args = dict(
                gy_ptr=t, y_ptr=t, x_ptr=t, mean_ptr=f32, rstd_ptr=f32, coef_a_ptr=f32, coef_b_ptr=f32, w_ptr=t,
                gx_ptr=t, gz_ptr=t, S=s, G=g, CG=cg, L=cg * s, TILES=tiles, RELU=call.relu,
                WRITE_GZ=call.residual and call.relu, BLOCK=bwd_apply_block(False),
            )  # fmt: skip
            add("group_norm_act backward apply", _gn_bwd_apply_grouped, apply_args, one, "backward")
    return launches


def channels_last_launches(dtype: torch.dtype, batches: list[int], arch: int | None = None) -> list:
    """The launches of the same GroupNorms on channels-last activations (an opt-in layout), forward and backward.

    Phase "channels_last": the model runs NCHW unless asked, and the warm-up and its compile budget
    count what a default run compiles. tests/test_backbone_targets.py compiles these.
    """
    from ._group_norm_act_backward import _gn_bwd_apply_tuned, _gn_bwd_reduce
    from ._group_norm_act_tiles import _gn_finalize, _gn_fwd_single_pass, _gn_stats, gn_apply_tuned, prune_apply
    from ._offline import ARCHS, GPUS, Launch, TensorArg

    t, f32 = TensorArg(dtype), TensorArg(torch.float32)
    sm_counts = sorted({GPUS[a][0] for a in ([arch] if arch is not None else ARCHS.values())})
    launches, seen = [], set()
    for call in group_norm_calls():
        c, s, g = call.channels, call.s, call.num_groups
        cg = c // g
        flags = {"HAS_RES": call.residual, "RELU": call.relu}
        io = dict(x_ptr=t, res_ptr=t, y_ptr=t, w_ptr=t, b_ptr=t, mean_ptr=f32, rstd_ptr=f32)
        layouts = dict(CHANNELS_LAST=True, RES_CHANNELS_LAST=True)
        for batch in batches:
            for sm_count in sm_counts:
                plan = forward_plan(batch, c, s, g, True, sm_count)
                found = []
                if plan.path == "single":
                    (step,) = plan.launches
                    args = dict(**io, C=c, S=s, G=g, CG=cg, eps=EPS, **flags, **layouts, **step.constexprs)
                    found.append(("single", _gn_fwd_single_pass, args, [triton.Config({}, num_warps=step.num_warps)]))
                else:
                    stats, finalize, _ = plan.launches
                    one = [triton.Config({}, num_warps=4)]
                    part = dict(part_mean_ptr=f32, part_m2_ptr=f32)
                    stats_args = dict(x_ptr=t, **part, C=c, S=s, **stats.sizes, CHANNELS_LAST=True)
                    found.append(("stats", _gn_stats, {**stats_args, **stats.constexprs}, one))
                    fin_args = dict(**part, mean_ptr=f32, rstd_ptr=f32, S=s, P=stats.sizes["P"], eps=EPS, CG=cg)
                    found.append(("finalize", _gn_finalize, {**fin_args, **finalize.sizes, **finalize.constexprs}, one))
                    apply_args = dict(**io, N=batch, C=c, S=s, G=g, CG=cg, **flags, **layouts)
                    found.append(("apply", gn_apply_tuned, apply_args, prune_apply(gn_apply_tuned.configs, apply_args)))
                # Training on channels-last activations: per-channel reduction, autotuned apply.
                one = [triton.Config({}, num_warps=4)]
                found.append(
                    ("backward reduce", _gn_bwd_reduce, _reduce_args(call, batch, True, sm_count, t, f32), one)
                )
                bwd_args = dict(
                    gy_ptr=t, y_ptr=t, x_ptr=t, mean_ptr=f32, rstd_ptr=f32, coef_a_ptr=f32, coef_b_ptr=f32, w_ptr=t,
                    gx_ptr=t, gz_ptr=t, N=batch, C=c, S=s, G=g, CG=cg, RELU=call.relu,
                    WRITE_GZ=call.residual and call.relu, CHANNELS_LAST=True,
                )  # fmt: skip
                configs = prune_apply(_gn_bwd_apply_tuned.configs, bwd_args)
                found.append(("backward apply", _gn_bwd_apply_tuned, bwd_args, configs))
                for label, kernel, args, configs in found:
                    key = (id(kernel), repr(sorted(args.items())), repr(configs))
                    if key not in seen:
                        seen.add(key)
                        launches.append(
                            Launch(f"group_norm_act channels-last {label}", kernel, args, configs, CHANNELS_LAST_PHASE)
                        )
    return launches


def offline_launches(dtype: torch.dtype, batches: list[int], arch: int | None = None) -> list:
    """Every launch of the base checkpoint's 52 GroupNorms, built from the same plans as the launcher's.

    NCHW, as the model runs by default, forward (inference) and backward; then the opt-in channels-last
    forward, which a default run never compiles, under the phase "channels_last".
    """
    return backbone_launches(dtype, batches, arch) + channels_last_launches(dtype, batches, arch)
