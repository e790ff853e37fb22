"""The ViT MLP block: `x + fc2(gelu_erf(fc1(LayerNorm(x))))` in three launches.

Shapes (HF ViT names): x (…, D); ln_w/ln_b = layernorm_after (D,); fc1 = intermediate.dense, weight
(H, D), bias (H,); fc2 = output.dense, weight (D, H), bias (D,). D=768, H=3072, M = B·577 rows for the
hub checkpoint; any D, H, M work (edges are masked). Biases may be None.

Launches:
  1. `layer_norm_stats`: per-row mean, rstd in float32 (one read of x).
  2. `fused_linear`: LN applied to each x tile in the GEMM prologue, + fc1 bias, exact erf GELU, stored
     once in x.dtype — the normalised x is never written to memory.
  3. `fused_linear`: + fc2 bias + residual x in the epilogue.
See kernels/fused_linear.py for why LN is a prologue rather than folded into the weights.

Dtypes: float32, float16, bfloat16 (all tensors one dtype); float32 accumulation; float32 GEMMs never
use TF32. The (M, H) intermediate is rounded once to x.dtype, as plain torch rounds it.

Autograd: forward runs the kernels and saves only the inputs; backward re-runs `reference` (float32
math) under torch.autograd — a recompute backward, not a hand-written Triton one. It saves the (M, H)
activation memory eager keeps, at the cost of one torch forward per backward.

Entry point: `layer_norm_mlp(...)`, backed by the torch custom op `vithybrid::layer_norm_mlp`, so
torch.compile traces a model calling it without a graph break (the recompute backward is traced as
plain torch ops). No double backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ._eager import call, custom_op, twin
from ._runtime import needs_registered_op
from .fused_linear import check_linear_inputs, launch_fused_linear, launch_layer_norm_stats, reference_grads


def reference(
    x: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor | None,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor | None,
    eps: float,
    residual: bool = True,
) -> torch.Tensor:
    """Plain torch in float32 (float64 for float64 input), cast back to x.dtype."""
    compute = torch.promote_types(x.dtype, torch.float32)

    def up(t: torch.Tensor | None) -> torch.Tensor | None:
        return t.to(compute) if t is not None else None

    xf = x.to(compute)
    h = torch.nn.functional.layer_norm(xf, (x.shape[-1],), up(ln_w), up(ln_b), eps)
    h = torch.nn.functional.gelu(torch.nn.functional.linear(h, up(fc1_w), up(fc1_b)))
    out = torch.nn.functional.linear(h, up(fc2_w), up(fc2_b))
    if residual:
        out = out + xf
    return out.to(x.dtype)


def _forward(
    x: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor | None,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor | None,
    eps: float,
    residual: bool,
) -> torch.Tensor:
    mean, rstd = launch_layer_norm_stats(x, eps)
    hidden = launch_fused_linear(x, fc1_w, fc1_b, mean, rstd, ln_w, ln_b, None, "gelu")
    return launch_fused_linear(hidden, fc2_w, fc2_b, None, None, None, None, x if residual else None, None)


def offline_launches(dtype: torch.dtype, batches: Sequence[int], arch: int | None = None) -> list:
    """The MLP block's three launches at the base checkpoint's shapes (for kernels/_offline.py)."""
    from ._fused_linear_offline import gemm_launch, stats_launch
    from ._offline import HIDDEN, MLP, TOKENS

    launches = []
    for batch in batches:
        m = TOKENS * batch
        launches += [
            stats_launch(dtype, m, HIDDEN),
            gemm_launch("layer_norm_mlp fc1", dtype, m, MLP, HIDDEN, ln=True, activation="gelu", arch=arch),
            gemm_launch("layer_norm_mlp fc2", dtype, m, HIDDEN, MLP, residual=True, arch=arch),
        ]
    return launches


# Custom op (as in kernels/attention.py): torch.compile sees one opaque node per forward call, so no
# graph break; the backward is `reference_grads` (kernels/fused_linear.py) in the autograd rule.
@custom_op("vithybrid::layer_norm_mlp")
def _layer_norm_mlp_op(
    x: torch.Tensor, ln_w: torch.Tensor, ln_b: torch.Tensor, fc1_w: torch.Tensor, fc1_b: torch.Tensor | None,
    fc2_w: torch.Tensor, fc2_b: torch.Tensor | None, eps: float, residual: bool,
) -> torch.Tensor:  # fmt: skip
    return _forward(x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps, residual)


@_layer_norm_mlp_op.register_fake
def _(x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, eps, residual):
    return x.new_empty((*x.shape[:-1], fc2_w.shape[0]))  # contiguous, as the fc2 launch allocates


def _setup_context(ctx, inputs, output) -> None:
    *tensors, eps, residual = inputs
    ctx.save_for_backward(*tensors)
    ctx.eps, ctx.residual = eps, residual


def _backward_rule(ctx, grad):
    def ref(*t: torch.Tensor | None) -> torch.Tensor:
        return reference(*t, ctx.eps, ctx.residual)

    return (*reference_grads(ref, ctx.saved_tensors, ctx.needs_input_grad, (grad,)), None, None)


_layer_norm_mlp_op.register_autograd(_backward_rule, setup_context=_setup_context)
_layer_norm_mlp_eager = twin(_layer_norm_mlp_op, _setup_context, _backward_rule)


def layer_norm_mlp(
    x: torch.Tensor,
    ln_w: torch.Tensor,
    ln_b: torch.Tensor,
    fc1_w: torch.Tensor,
    fc1_b: torch.Tensor | None,
    fc2_w: torch.Tensor,
    fc2_b: torch.Tensor | None,
    eps: float,
    residual: bool = True,
) -> torch.Tensor:
    """`x + fc2(gelu_erf(fc1(LN(x))))` (residual optional) in three Triton launches, as `reference`."""
    name = "layer_norm_mlp"
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{name}: x must be a tensor (…, D)")
    check_linear_inputs(name, x, fc1_w, fc1_b, ln_affine=(ln_w, ln_b), activation="gelu", weight_name="fc1_w")
    hidden = fc1_w.shape[0]
    if fc2_w.dim() != 2 or fc2_w.shape[1] != hidden:
        raise ValueError(f"{name}: fc2_w must be (D_out, {hidden}), got {tuple(fc2_w.shape)}")
    if residual and fc2_w.shape[0] != x.shape[-1]:
        raise ValueError(f"{name}: residual needs fc2_w ({x.shape[-1]}, {hidden}), got {tuple(fc2_w.shape)}")
    for what, t in (("fc2_w", fc2_w), ("fc2_b", fc2_b)):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            raise TypeError(f"{name}: {what} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}")
    if fc2_b is not None and tuple(fc2_b.shape) != (fc2_w.shape[0],):
        raise ValueError(f"{name}: fc2_b must be ({fc2_w.shape[0]},), got {tuple(fc2_b.shape)}")

    if not needs_registered_op(x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b):
        return _forward(x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, float(eps), bool(residual))
    args = (x, ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b, float(eps), bool(residual))
    return call(_layer_norm_mlp_op, _layer_norm_mlp_eager, *args)
