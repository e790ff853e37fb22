"""fused_linear's launches at the base checkpoint's shapes, for the offline checks and `warmup` (kernels/_offline.py).

Arguments are passed as `launch_layer_norm_stats` / `launch_fused_linear` pass them (contiguous rows),
with the tiles the prune keeps for each GPU of kernels/_offline.py. kernels/layer_norm_mlp.py builds the
MLP's two GEMMs from `gemm_launch` too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton

from ._fused_linear_tiles import select_configs
from ._offline import ARCHS, GPUS, HIDDEN, TOKENS, Launch, TensorArg
from .fused_linear import _fused_linear_tuned, _layer_norm_stats_kernel, _stats_block


def stats_launch(dtype: torch.dtype, m: int, k: int, phase: str = "forward"):
    block_m, block_k = _stats_block(k)
    args = dict(x_ptr=TensorArg(dtype), mean_ptr=TensorArg(torch.float32), rstd_ptr=TensorArg(torch.float32),
                M=m, K=k, stride_xm=k, stride_xk=1, eps=1e-12, BLOCK_M=block_m, BLOCK_K=block_k)  # fmt: skip
    return Launch(f"layer_norm_stats K={k}", _layer_norm_stats_kernel, args, [triton.Config({})], phase)


def gemm_launch(
    name: str, dtype: torch.dtype, m: int, n: int, k: int, *, bias: bool = True, ln: bool = False,
    activation: str | None = None, residual: bool = False, arch: int | None = None, phase: str = "forward",
):  # fmt: skip
    """One `launch_fused_linear` call on contiguous (m, k) x and (n, k) weight, as the launcher passes it."""
    t, f32 = TensorArg(dtype), TensorArg(torch.float32)
    args = dict(
        x_ptr=t, w_ptr=t, bias_ptr=t, mean_ptr=f32 if ln else t, rstd_ptr=f32 if ln else t, ln_w_ptr=t, ln_b_ptr=t,
        res_ptr=t, out_ptr=t, M=m, N=n, K=k, M_BUCKET=triton.next_power_of_2(m),
        stride_xm=k, stride_xk=1, stride_wn=k, stride_wk=1, stride_rm=n, stride_rn=1, stride_om=n, stride_on=1,
        HAS_BIAS=bias, HAS_LN=ln, ACTIVATION=activation or "", HAS_RESIDUAL=residual,
        IEEE_FP32=dtype == torch.float32, DOT_IN_FP32=False,
    )  # fmt: skip
    elem = torch.empty((), dtype=dtype).element_size()
    chosen: dict[str, triton.Config] = {}
    for a in [arch] if arch is not None else list(ARCHS.values()):
        sm_count, smem = GPUS[a]
        for cfg in select_configs(_fused_linear_tuned.configs, m, n, elem, sm_count, smem):
            chosen[repr(cfg)] = cfg
    return Launch(name, _fused_linear_tuned, args, list(chosen.values()), phase)


def vit_layer_gemms(dtype: torch.dtype, batches: Sequence[int], arch: int | None = None) -> list:
    """The four GEMMs (+ stats) of every ViT encoder layer of the base checkpoint, per batch."""
    launches = []
    for batch in batches:
        m = TOKENS * batch
        launches += [
            stats_launch(dtype, m, HIDDEN),
            gemm_launch("fused_linear qkv", dtype, m, 3 * HIDDEN, HIDDEN, ln=True, arch=arch),
            gemm_launch("fused_linear out-proj", dtype, m, HIDDEN, HIDDEN, residual=True, arch=arch),
        ]
    return launches


def offline_launches(dtype: torch.dtype, batches: Sequence[int], arch: int | None = None) -> list[Launch]:
    """fused_linear's launches in the model's attention blocks (the MLP's are layer_norm_mlp's)."""
    return vit_layer_gemms(dtype, batches, arch)
