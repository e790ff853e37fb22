"""Fused linear layer: `act(LN(x) @ Wᵀ + b) + residual` in one GEMM, plus the LayerNorm row statistics.

The building block of every dense op in a ViT encoder layer (HF names):

    qkv  = fused_linear(x, W_qkv, b_qkv, ln=(mean, rstd, ln_before.w, ln_before.b))      # (M, 3D)
    h    = fused_linear(ctx, W_o, b_o, residual=x)                                      # (M, D)
    mid  = fused_linear(h, W_1, b_1, ln=(mean_h, rstd_h, ln_after.w, ln_after.b), activation="gelu")
    out  = fused_linear(mid, W_2, b_2, residual=h)

with `mean, rstd = layer_norm_stats(x, eps)`. Shapes: x (…, K) with leading dims flattened to M rows,
weight (N, K) as `nn.Linear` stores it (read transposed through its strides, never copied), bias (N,),
residual and output (…, N); mean/rstd float32 with M elements; ln_w/ln_b (K,).

How LayerNorm is fused (prologue, not weight folding): a tiny kernel reads x once and writes per-row mean
and rstd in float32 (8 bytes/row). The GEMM applies `(x − mean)·rstd·γ + β` in float32 to each A tile as
it is loaded, then rounds once to the dot dtype — the same rounding point plain torch has when it stores
the LN output, so errors track torch's. Folding (`LN(x)Wᵀ + b = rstd·(x·W'ᵀ) − rstd·mean·ΣW' + Wβ + b`
with W' = W·diag(γ)) would drop the prologue but still need the same stats kernel, plus folded weights
cached and invalidated whenever the module's weights change (training, loading, patching HF models), and
its float32 cancellation between x·W'ᵀ and mean·ΣW' costs accuracy growing with |mean|/std of a row,
which the prologue does not. The prologue's price is BLOCK_M·BLOCK_K float32 FMAs per K step against
BLOCK_M·BLOCK_N·BLOCK_K tensor-core MACs (~1/BLOCK_N), and an A operand that passes through registers
(mma.sync on sm_80 / wgmma with a register A on sm_90, both still cp.async-pipelined).

Epilogue (float32, one store in x.dtype): + bias, exact erf GELU, + residual.

Compiles: M and K are runtime arguments (M unspecialized), so each epilogue (qkv, out-proj/fc2, fc1)
compiles once per tile for every batch and width; tiles are autotuned per (M bucket, N, K, epilogue)
among the candidates kernels/_fused_linear_tiles.py keeps, through kernels/_tuning.py (per-GPU tables, per-user cache).

Numerics: float16/bfloat16 use tensor cores with float32 accumulation; float32 uses
`input_precision="ieee"` (never silent TF32). Any M, N, K: edges are masked. Autograd: forward runs the
kernels; backward re-runs `reference` (float32 math) under torch.autograd (see `reference_grads`).

Entry points `layer_norm_stats` and `fused_linear` are backed by the torch custom ops
`vithybrid::layer_norm_stats` and `vithybrid::fused_linear`, so torch.compile traces a model calling
them without a graph break; their backward (the float32 recompute) is traced as plain torch ops.
No double backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl

from ._eager import call, custom_op, twin
from ._fused_linear_tiles import GPU_CONFIGS, INTERPRETER_CONFIG, prune_configs
from ._runtime import check_launchable, interpreter_enabled, needs_registered_op
from ._tuning import jit, tuned

LayerNormPrologue = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # mean, rstd, ln_w, ln_b
ACTIVATIONS = (None, "gelu")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float32 math for half types; a float64 input (a test's reference) stays float64.
    return torch.promote_types(dtype, torch.float32)


def reference_layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and 1/sqrt(biased var + eps) of x (…, K) in float32 (float64 for float64 input)."""
    xf = x.to(_compute_dtype(x.dtype))
    mean = xf.mean(dim=-1)
    var = xf.var(dim=-1, correction=0)
    return mean, torch.rsqrt(var + eps)


def reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln: LayerNormPrologue | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch twin of `fused_linear`, computed in float32 (float64 for float64 input)."""
    compute = _compute_dtype(x.dtype)
    a = x.to(compute)
    if ln is not None:
        mean, rstd, ln_w, ln_b = ln
        lead = x.shape[:-1]
        a = (a - mean.reshape(lead).unsqueeze(-1).to(compute)) * rstd.reshape(lead).unsqueeze(-1).to(compute)
        a = a * ln_w.to(compute) + ln_b.to(compute)
    y = a @ weight.to(compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    if activation == "gelu":
        y = torch.nn.functional.gelu(y)
    if residual is not None:
        y = y + residual.to(compute)
    return y.to(x.dtype)


@jit(constexpr_under_interpreter=["K"], do_not_specialize=["M"])
def _layer_norm_stats_kernel(
    x_ptr,  # (M, K) input rows, any float dtype
    mean_ptr,  # (M,) float32 out
    rstd_ptr,  # (M,) float32 out
    M,  # rows (not specialized: 577·B is a multiple of 16 for some batches only)
    K,  # row length (see the K note in _fused_linear_kernel)
    stride_xm,  # x row stride (elements)
    stride_xk,  # x column stride (elements)
    eps,  # LayerNorm eps (1e-12 for the hub checkpoint)
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_K: tl.constexpr,  # row chunk length
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    row_ptrs = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    # One read of x. Each chunk's mean and centred sum of squares are merged with Chan's formula, so
    # the variance never comes from E[x²] − E[x]², which cancels catastrophically when |mean| ≫ std.
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_valid = cols < K
        mask = row_mask[:, None] & col_valid[None, :]
        chunk = tl.load(row_ptrs + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
        seen = k0 * 1.0  # elements merged so far, as float32
        n_chunk = tl.sum(col_valid.to(tl.float32), axis=0)
        chunk_mean = tl.sum(chunk, axis=1) / n_chunk
        centred = tl.where(mask, chunk - chunk_mean[:, None], 0.0)
        # corrected two-pass: the rounded float32 mean leaves a residual sum r in the centred values;
        # without it M2 is inflated by r²/n, which decides rstd for near-constant rows (variance ≈ eps)
        resid = tl.sum(centred, axis=1)
        chunk_m2 = tl.sum(centred * centred, axis=1) - resid * resid / n_chunk
        chunk_mean = chunk_mean + resid / n_chunk
        total = seen + n_chunk
        delta = chunk_mean - mean
        mean = mean + delta * (n_chunk / total)
        m2 = m2 + chunk_m2 + delta * delta * (seen * n_chunk / total)
    rstd = 1.0 / tl.sqrt(m2 / K + eps)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@jit(constexpr_under_interpreter=["K"], do_not_specialize=["M", "M_BUCKET"])
def _fused_linear_kernel(
    x_ptr,  # (M, K) activations
    w_ptr,  # (N, K) weight, nn.Linear layout; read as (K, N) through strides
    bias_ptr,  # (N,) or unused
    mean_ptr,  # (M,) float32 LayerNorm mean, or unused
    rstd_ptr,  # (M,) float32 LayerNorm 1/std, or unused
    ln_w_ptr,  # (K,) LayerNorm γ, or unused
    ln_b_ptr,  # (K,) LayerNorm β, or unused
    res_ptr,  # (M, N) residual, or unused
    out_ptr,  # (M, N) output, x.dtype
    M,  # not specialized: one compile serves every batch
    N,
    # A runtime bound on the GPU: fc2 (K=3072) shares its compile with the output projection (K=768).
    # constexpr under the interpreter only: the Triton 3.6 interpreter cannot loop to a runtime bound
    # under NumPy >= 2.4.
    K,
    M_BUCKET,  # next power of two of M: only an autotune key, so each batch size does not retune
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    HAS_BIAS: tl.constexpr,
    HAS_LN: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "" or "gelu"
    HAS_RESIDUAL: tl.constexpr,
    IEEE_FP32: tl.constexpr,  # float32 operands: forbid TF32
    DOT_IN_FP32: tl.constexpr,  # interpreter + bfloat16 only: it would multiply raw uint16 bit patterns
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0 (a heuristic): the hot loop carries no K mask
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,  # row-blocks per group of the L2-friendly program order
):
    # Grouped ordering: consecutive programs sweep GROUP_M row-blocks down one column of tiles before
    # moving right, so the GROUP_M A-panels and the current W-panel stay resident in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    tiles_per_group = GROUP_M * grid_n
    group = pid // tiles_per_group
    first_m = group * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows

    row0 = pid_m * BLOCK_M
    col0 = pid_n * BLOCK_N
    local_m = tl.arange(0, BLOCK_M)
    local_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows/cols past the edge are clamped onto the last valid one, so the hot-loop loads need no M/N
    # masks; their results are never stored. Tile bases are int64 (row·stride passes 2³¹ at large
    # batch); offsets inside a tile stay int32.
    a_rows = tl.minimum(local_m, M - 1 - row0)
    b_cols = tl.minimum(local_n, N - 1 - col0)
    x_tile = x_ptr + row0.to(tl.int64) * stride_xm
    w_tile = w_ptr + col0.to(tl.int64) * stride_wn
    a_ptrs = x_tile + a_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    b_ptrs = w_tile + offs_k[:, None] * stride_wk + b_cols[None, :] * stride_wn
    if HAS_LN:
        row_mean = tl.load(mean_ptr + row0 + a_rows)
        row_rstd = tl.load(rstd_ptr + row0 + a_rows)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        if HAS_LN:
            # Masked K columns get γ = β = 0, so they stay exactly 0 after normalisation.
            k_valid = (k0 + offs_k) < K
            gamma = tl.load(ln_w_ptr + k0 + offs_k, mask=k_valid, other=0.0).to(tl.float32)
            beta = tl.load(ln_b_ptr + k0 + offs_k, mask=k_valid, other=0.0).to(tl.float32)
            a_hat = (a.to(tl.float32) - row_mean[:, None]) * row_rstd[:, None]
            a = (a_hat * gamma[None, :] + beta[None, :]).to(b.dtype)
        if DOT_IN_FP32:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_wk

    offs_n = col0 + local_n
    n_mask = offs_n < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if ACTIVATION == "gelu":
        # Exact erf GELU (HF "gelu"), not the tanh approximation.
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out_mask = ((row0 + local_m) < M)[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        res_tile = res_ptr + row0.to(tl.int64) * stride_rm
        res_ptrs = res_tile + local_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(res_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    out_tile = out_ptr + row0.to(tl.int64) * stride_om
    out_ptrs = out_tile + local_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


_fused_linear_tuned = tuned(
    "fused_linear",
    triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})(_fused_linear_kernel),
    configs=GPU_CONFIGS,
    key=["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_LN", "ACTIVATION", "HAS_RESIDUAL"],  # + tensor dtypes
    prune=prune_configs,
    interpreter_config=INTERPRETER_CONFIG,
)


def _stats_block(k: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_K) of the stats kernel: a whole ViT row (768) in one chunk, ~4K elements/program."""
    block_k = min(triton.next_power_of_2(k), 4096)
    return max(1, min(64, 4096 // block_k)), block_k


def launch_layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch only (no checks, no autograd): `layer_norm_stats` and fused ops call this after validating."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty(m, device=x.device, dtype=torch.float32)
    if m > 0:
        block_m, block_k = _stats_block(k)
        grid = (triton.cdiv(m, block_m),)
        _layer_norm_stats_kernel[grid](
            x2, mean, rstd, m, k, x2.stride(0), x2.stride(1), eps, BLOCK_M=block_m, BLOCK_K=block_k
        )
    return mean.reshape(x.shape[:-1]), rstd.reshape(x.shape[:-1])


def launch_fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mean: torch.Tensor | None,
    rstd: torch.Tensor | None,
    ln_w: torch.Tensor | None,
    ln_b: torch.Tensor | None,
    residual: torch.Tensor | None,
    activation: str | None,
) -> torch.Tensor:
    """Launch only (no checks, no autograd); `fused_linear` validates first."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    res2 = residual.reshape(m, n) if residual is not None else out
    has_ln = mean is not None
    dummy = out  # never dereferenced: its branch is compiled out by a constexpr flag

    def vec(t: torch.Tensor | None) -> torch.Tensor:
        return t.reshape(-1).contiguous() if t is not None else dummy

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

    _fused_linear_tuned[grid](
        x2, weight, vec(bias), vec(mean), vec(rstd), vec(ln_w), vec(ln_b), res2, out,
        m, n, k, triton.next_power_of_2(m),
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1),
        res2.stride(0), res2.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, HAS_LN=has_ln, ACTIVATION=activation or "",
        HAS_RESIDUAL=residual is not None, IEEE_FP32=x.dtype == torch.float32,
        DOT_IN_FP32=interpreter_enabled() and x.dtype == torch.bfloat16,
    )  # fmt: skip
    return out.reshape(*x.shape[:-1], n)


def reference_grads(
    ref: Callable, inputs: Sequence[torch.Tensor | None], needs: Sequence[bool], grads: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor | None, ...]:
    """Recompute backward: the vector-Jacobian product of `ref(*inputs)` with `grads`, per input.

    Returns one entry per input: its gradient where `needs` is set, else None. Only the inputs are
    saved (no activations); `ref` recomputes in float32, so gradients are at least as accurate as eager
    half-precision ones, at the cost of one extra torch forward per backward. Called from the autograd
    rules of the custom ops below (not from inside an op: a custom op's kernel runs with autograd
    dispatch switched off), so under torch.compile AOTAutograd traces this recompute into the backward
    graph as plain aten ops.
    """
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) if t is not None else None for t, need in zip(inputs, needs)]
        outs = ref(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
        found = torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs], allow_unused=True)
    packed = iter(found)
    return tuple(next(packed) if t is not None and t.requires_grad else None for t in leaves)


# Custom ops (as in kernels/attention.py): torch.compile sees one opaque node per forward call, so no
# graph break; the backward is `reference_grads` in each op's autograd rule.
@custom_op("vithybrid::layer_norm_stats")
def _layer_norm_stats_op(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_layer_norm_stats(x, eps)


@_layer_norm_stats_op.register_fake
def _(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    mean = x.new_empty(x.shape[:-1], dtype=torch.float32)
    return mean, torch.empty_like(mean)


def _layer_norm_stats_setup(ctx, inputs, output) -> None:
    x, eps = inputs
    ctx.save_for_backward(x)
    ctx.eps = eps


def _layer_norm_stats_backward(ctx, grad_mean, grad_rstd):
    (x,) = ctx.saved_tensors
    (dx,) = reference_grads(lambda t: reference_layer_norm_stats(t, ctx.eps), (x,), (True,), (grad_mean, grad_rstd))
    return dx, None


_layer_norm_stats_op.register_autograd(_layer_norm_stats_backward, setup_context=_layer_norm_stats_setup)
_layer_norm_stats_eager = twin(_layer_norm_stats_op, _layer_norm_stats_setup, _layer_norm_stats_backward)


@custom_op("vithybrid::fused_linear")
def _fused_linear_op(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor | None,
    rstd: torch.Tensor | None, ln_w: torch.Tensor | None, ln_b: torch.Tensor | None,
    residual: torch.Tensor | None, activation: str | None,
) -> torch.Tensor:  # fmt: skip
    return launch_fused_linear(x, weight, bias, mean, rstd, ln_w, ln_b, residual, activation)


@_fused_linear_op.register_fake
def _(x, weight, bias, mean, rstd, ln_w, ln_b, residual, activation):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))  # contiguous, as the launcher allocates


def _fused_linear_setup(ctx, inputs, output) -> None:
    *tensors, activation = inputs
    ctx.save_for_backward(*tensors)
    ctx.activation = activation


def _fused_linear_backward(ctx, grad):
    def ref(x, weight, bias, mean, rstd, ln_w, ln_b, residual):
        prologue = (mean, rstd, ln_w, ln_b) if mean is not None else None
        return reference(x, weight, bias, ln=prologue, activation=ctx.activation, residual=residual)

    return (*reference_grads(ref, ctx.saved_tensors, ctx.needs_input_grad, (grad,)), None)


_fused_linear_op.register_autograd(_fused_linear_backward, setup_context=_fused_linear_setup)
_fused_linear_eager = twin(_fused_linear_op, _fused_linear_setup, _fused_linear_backward)


def layer_norm_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row LayerNorm (mean, rstd) of x (…, K) as float32 tensors of shape x.shape[:-1]."""
    check_launchable("layer_norm_stats", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm_stats: x needs a non-empty last dimension, got shape {tuple(x.shape)}")
    if not needs_registered_op(x):
        return launch_layer_norm_stats(x, float(eps))
    return call(_layer_norm_stats_op, _layer_norm_stats_eager, x, float(eps))


def check_linear_inputs(
    name: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    ln_affine: tuple[torch.Tensor, torch.Tensor] | None = None,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    weight_name: str = "weight",
) -> None:
    """Raise one clear error for any input `fused_linear` cannot take (no device work: cheap per call)."""
    extras = [t for t in (bias, residual, *(ln_affine or ()), *(stats or ())) if t is not None]
    check_launchable(name, x, weight, *extras)
    if weight.dim() != 2:
        raise ValueError(f"{name}: {weight_name} must be (N, K), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1] or weight.shape[1] == 0:
        k_x = x.shape[-1] if x.dim() else None
        raise ValueError(f"{name}: x has K={k_x} but {weight_name} is {tuple(weight.shape)} (N, K)")
    n, k = weight.shape
    named = {weight_name: weight, "bias": bias, "residual": residual}
    if ln_affine is not None:
        named.update(ln_w=ln_affine[0], ln_b=ln_affine[1])
    for what, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{name}: {what} is {t.dtype} but x is {x.dtype}; cast them to one dtype")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"{name}: bias must be ({n},), got {tuple(bias.shape)}")
    out_shape = (*x.shape[:-1], n)
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"{name}: residual must be {out_shape}, got {tuple(residual.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {activation!r}")
    for what, t in zip(("ln_w", "ln_b"), ln_affine or ()):
        if tuple(t.shape) != (k,):
            raise ValueError(f"{name}: {what} must be ({k},), got {tuple(t.shape)}")
    rows = x.numel() // k
    for what, t in zip(("mean", "rstd"), stats or ()):
        if t.dtype != torch.float32 or t.numel() != rows:
            raise ValueError(f"{name}: ln {what} must be float32 with {rows} elements (layer_norm_stats)")


def fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ln: LayerNormPrologue | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """`act(LN(x) @ weight.T + bias) + residual` in one Triton GEMM; LN from `ln=(mean, rstd, ln_w, ln_b)`."""
    if ln is not None and len(ln) != 4:
        raise ValueError(f"fused_linear: ln must be (mean, rstd, ln_w, ln_b), got {len(ln)} items")
    mean, rstd, ln_w, ln_b = ln if ln is not None else (None, None, None, None)
    check_linear_inputs(
        "fused_linear",
        x,
        weight,
        bias,
        ln_affine=(ln_w, ln_b) if ln is not None else None,
        stats=(mean, rstd) if ln is not None else None,
        activation=activation,
        residual=residual,
    )
    if not needs_registered_op(x, weight, bias, mean, rstd, ln_w, ln_b, residual):
        return launch_fused_linear(x, weight, bias, mean, rstd, ln_w, ln_b, residual, activation)
    args = (x, weight, bias, mean, rstd, ln_w, ln_b, residual, activation)
    return call(_fused_linear_op, _fused_linear_eager, *args)
