"""Fused multi-head attention (FlashAttention-2 forward and backward) for the ViT Hybrid encoder.

Math, per (batch, head):  O = softmax(S) V  with  S = Q Kᵀ · scale,  scale = D**-0.5 unless given.
The forward never materializes S: it streams key blocks and keeps an online softmax (running row max
m and row sum l, rescaling the accumulator when m grows). Logits are scaled by scale·log2(e) so every
exponential is an `exp2`. It also saves the per-row log-sum-exp (base 2, in those scaled units) so the
backward can rebuild P = exp2(S·log2e − lse) block by block:
    dV = Pᵀ dO,   dP = dO Vᵀ,   dS = P ⊙ (dP − δ) with δ = rowsum(dO ⊙ O),   dQ = dS K · scale,
    dK = dSᵀ Q · scale
(FlashAttention-2: a pre-pass computes δ, one kernel owns a key block and loops over query blocks for
dK/dV, another owns a query block and loops over key blocks for dQ; no atomics).

Shapes: q, k, v are (B, H, N, D), all the same shape; the output is a (B, H, N, D) tensor of q.dtype
laid out token-major — a transposed view of a contiguous (B, N, H, D) buffer — so the caller's
`out.transpose(1, 2).reshape(B, N, H·D)` back to hidden states is free (no copy kernel).
Any N ≥ 1 (577, 197, 50, 1 …): key columns past N are set to −inf before the row max, query
rows past N are never stored. D ∈ {32, 64, 128}.
Strides: every one of the four strides of q, k, v, dO is passed to the kernels, so views such as
`qkv.view(B, N, 3, H, D)[:, :, 0].transpose(1, 2)` of a packed QKV projection are read in place. Only
the last dim must have stride 1; a tensor that does not is made contiguous (one copy).
Dtypes: float32, float16, bfloat16 (q, k, v alike); softmax statistics and all accumulators are
float32; float32 dots use IEEE precision (never TF32).
N is a runtime argument on the GPU (one compile serves every sequence length; only the last key block
is masked) and a compile-time constant under the interpreter, where Triton 3.6 cannot loop to a runtime
bound. Autotuning (GPU, kernels/_tuning.py: shipped per-GPU tables, then a per-user cache, then one
benchmark) is keyed on power-of-two buckets of N and of the batch, on D and (by Triton) on the dtypes;
candidates are pruned by the GPU's SM count (kernels/_attention_tiles.py). Under the Triton interpreter
(TRITON_INTERPRET=1) a single small config is used unless a test forces another, and bfloat16 dots are
upcast to float32 there because the interpreter would multiply raw bit patterns.
Memory: the forward saves q, k, v (the caller's views, not copies), O and the float32 lse per row.
Entry points: `flash_attention(q, k, v, scale=None)`, backed by the torch custom op
`vithybrid::flash_attention` (and `vithybrid::flash_attention_backward`) so torch.compile traces a
model calling it without a graph break; `flash_attention_packed(qkv)` for a packed (B, N, 3, H, D)
projection output (ops `vithybrid::flash_attention_packed[_backward]`), whose gradient the backward
writes as one tensor. Limits: no attention mask or dropout, no causal mode, no
double backward.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from ._attention_tiles import autotuned, n_bucket
from ._eager import call, custom_op, run, twin
from ._runtime import check_launchable, interpreter_enabled, needs_registered_op
from ._tuning import jit

SUPPORTED_HEAD_DIMS = (32, 64, 128)
LOG2E = math.log2(math.e)


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v computed in float32 (float64 stays float64), returned in q.dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(scores, dim=-1), v.to(compute)).to(q.dtype)


# _LOOP_BOUNDS: each key/query loop spells its bound out instead of naming `n_full`/`m_full`. Triton 3.6's
# interpreter turns every assigned value into a 1-element tensor, which NumPy >= 2.4 no longer converts to
# the int that range() needs; the expression itself stays a Python int there (N is a constexpr under the
# interpreter) and compiles to the same code on a GPU.


@triton.jit
def _load_tile(base, rows, offs_d, stride_n, stride_d, N, MASK: tl.constexpr):
    """A (len(rows), D) tile of one (batch, head) slice; rows ≥ N read as 0 when MASK is set."""
    ptrs = base + rows[:, None] * stride_n + offs_d[None, :] * stride_d
    if MASK:
        tile = tl.load(ptrs, mask=(rows < N)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _load_rows(ptr, rows, N, MASK: tl.constexpr):
    if MASK:
        vals = tl.load(ptr + rows, mask=rows < N, other=0.0)
    else:
        vals = tl.load(ptr + rows)
    return vals


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    if DOT_UPCAST:  # interpreter + bfloat16: numpy would multiply the raw uint16 bit patterns
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _fwd_key_block(
    acc, m_i, l_i, q,  # running output, row max, row sum (float32) and the query tile
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start_n, offs_n, offs_d, qk_scale,
    N,
    MASK: tl.constexpr,  # only the last, partial key block pays for masking
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, offs_d, stride_kn, stride_kd, N, MASK)
    v = _load_tile(v_base, cols, offs_d, stride_vn, stride_vd, N, MASK)
    s = _dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale
    if MASK:
        # Padded keys must get -inf *before* the row max, or they would shift m and add exp2(0 - m) to l.
        s = tl.where((cols < N)[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # The first block always holds key 0, so m_new is finite and alpha = exp2(-inf) = 0 (no NaN).
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, DOT_UPCAST)
    return acc, m_new, l_i


@jit(constexpr_under_interpreter=["N"], do_not_specialize=["N_BUCKET", "B_BUCKET"])
def _attn_fwd(
    Q, K, V, O,  # (B, H, N, D) tensors, any strides
    LSE,  # (B, H, N) float32, contiguous: base-2 log-sum-exp of the scaled logits, for the backward
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H,  # heads
    qk_scale,  # scale * log2(e)
    # A runtime size on the GPU (one compile serves every sequence length); constexpr under the
    # interpreter only, where Triton 3.6 cannot loop to a runtime bound under NumPy >= 2.4.
    N,
    N_BUCKET,  # autotune key only: every N in a power-of-two bucket shares one tuning
    B_BUCKET,  # autotune key only: power-of-two bucket of the batch (a batch-1 winner is not batch 64's)
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32)
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    start_m = tl.program_id(0)
    # int64 batch/head offsets: B * H * N * D can pass 2**31 elements for large batches.
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    # Padded query rows load zeros: their logits stay finite (no NaN), and they are never stored.
    q = _load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, N, True)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, (N // BLOCK_N) * BLOCK_N, BLOCK_N):  # = n_full, not the name: see _LOOP_BOUNDS
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            start_n, offs_n, offs_d, qk_scale, N, False, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    if n_full < N:
        acc, m_i, l_i = _fwd_key_block(
            acc, m_i, l_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            n_full, offs_n, offs_d, qk_scale, N, True, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip

    acc = acc * (1.0 / l_i)[:, None]
    row_ok = offs_m < N
    o_base = O + off_b * stride_ob + off_h * stride_oh
    o_ptrs = o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE + (off_b * H + off_h) * N + offs_m, m_i + tl.math.log2(l_i), mask=row_ok)


@jit(constexpr_under_interpreter=["N"])
def _attn_bwd_delta(
    O, DO,  # (B, H, N, D), any strides
    DELTA,  # (B, H, N) float32 out: rowsum(dO * O), the softmax-backward correction term
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    H,
    N,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM)
    o_base = O + off_b * stride_ob + off_h * stride_oh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    o = _load_tile(o_base, offs_m, offs_d, stride_on, stride_od, N, True)
    do = _load_tile(do_base, offs_m, offs_d, stride_don, stride_dod, N, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (off_b * H + off_h) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _dkdv_query_block(
    dk, dv, k, v,  # float32 accumulators and this program's key/value tiles
    q_base, do_base, lse_ptr, delta_ptr, stride_qn, stride_qd, stride_don, stride_dod,
    start_m, offs_m, offs_d, qk_scale,
    N,
    MASK: tl.constexpr,  # only the last, partial query block pays for masking
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    rows = start_m + offs_m
    q = _load_tile(q_base, rows, offs_d, stride_qn, stride_qd, N, MASK)
    do = _load_tile(do_base, rows, offs_d, stride_don, stride_dod, N, MASK)
    lse = _load_rows(lse_ptr, rows, N, MASK)
    delta = _load_rows(delta_ptr, rows, N, MASK)
    # Transposed tiles (keys × queries): dV and dK accumulate without transposing P.
    p_t = tl.math.exp2(_dot(k, tl.trans(q), DOT_PRECISION, DOT_UPCAST) * qk_scale - lse[None, :])
    if MASK:
        # Padded query rows have no saved lse: zero their probabilities so they add nothing.
        p_t = tl.where((rows < N)[None, :], p_t, 0.0)
    dv += _dot(p_t.to(do.dtype), do, DOT_PRECISION, DOT_UPCAST)
    dp_t = _dot(v, tl.trans(do), DOT_PRECISION, DOT_UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += _dot(ds_t.to(q.dtype), q, DOT_PRECISION, DOT_UPCAST)
    return dk, dv


@jit(constexpr_under_interpreter=["N"], do_not_specialize=["N_BUCKET", "B_BUCKET"])
def _attn_bwd_dkdv(
    Q, K, V, DO,  # (B, H, N, D), any strides
    DK, DV,  # (B, H, N, D) out, contiguous (same strides as each other)
    LSE, DELTA,  # (B, H, N) float32, contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_gb, stride_gh, stride_gn, stride_gd,  # of DK and DV
    H,
    qk_scale,  # scale * log2(e), as in the forward
    sm_scale,  # scale: dS is the gradient w.r.t. the scaled logits
    N,
    N_BUCKET,  # autotune key only
    B_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step of the loop
    BLOCK_N: tl.constexpr,  # key rows owned by this program
):  # fmt: skip
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    lse_ptr = LSE + (off_b * H + off_h) * N
    delta_ptr = DELTA + (off_b * H + off_h) * N
    # Padded key rows load zeros. Their exp2(0 - lse) may overflow to inf (and their dK/dV rows to NaN),
    # but each row of the three dots below depends only on its own key row, and those rows are never
    # stored; masking them would cost a select per step in every program for nothing.
    k = _load_tile(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kn, stride_kd, N, True)
    v = _load_tile(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vn, stride_vd, N, True)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    m_full = (N // BLOCK_M) * BLOCK_M
    for start_m in range(0, (N // BLOCK_M) * BLOCK_M, BLOCK_M):  # = m_full, not the name: see _LOOP_BOUNDS
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, stride_qn, stride_qd, stride_don, stride_dod,
            start_m, offs_m, offs_d, qk_scale, N, False, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    if m_full < N:
        dk, dv = _dkdv_query_block(
            dk, dv, k, v, q_base, do_base, lse_ptr, delta_ptr, stride_qn, stride_qd, stride_don, stride_dod,
            m_full, offs_m, offs_d, qk_scale, N, True, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    dk = dk * sm_scale
    g_offs = off_b * stride_gb + off_h * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
    key_ok = (offs_n < N)[:, None]
    tl.store(DK + g_offs, dk.to(DK.dtype.element_ty), mask=key_ok)
    tl.store(DV + g_offs, dv.to(DV.dtype.element_ty), mask=key_ok)


@triton.jit
def _dq_key_block(
    dq, q, do, lse, delta,  # float32 accumulator and this program's query-side tiles / row stats
    k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
    start_n, offs_n, offs_d, qk_scale,
    N,
    MASK: tl.constexpr,  # only the last, partial key block pays for masking
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):  # fmt: skip
    cols = start_n + offs_n
    k = _load_tile(k_base, cols, offs_d, stride_kn, stride_kd, N, MASK)
    v = _load_tile(v_base, cols, offs_d, stride_vn, stride_vd, N, MASK)
    p = tl.math.exp2(_dot(q, tl.trans(k), DOT_PRECISION, DOT_UPCAST) * qk_scale - lse[:, None])
    if MASK:
        # Padded keys had probability 0 in the forward; exp2(0 - lse) is not 0.
        p = tl.where((cols < N)[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), DOT_PRECISION, DOT_UPCAST)
    ds = p * (dp - delta[:, None])
    dq += _dot(ds.to(k.dtype), k, DOT_PRECISION, DOT_UPCAST)
    return dq


@jit(constexpr_under_interpreter=["N"], do_not_specialize=["N_BUCKET", "B_BUCKET"])
def _attn_bwd_dq(
    Q, K, V, DO,  # (B, H, N, D), any strides
    DQ,  # (B, H, N, D) out, contiguous
    LSE, DELTA,  # (B, H, N) float32, contiguous
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_gb, stride_gh, stride_gn, stride_gd,  # of DQ
    H,
    qk_scale,  # scale * log2(e), as in the forward
    sm_scale,
    N,
    N_BUCKET,  # autotune key only
    B_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows owned by this program
    BLOCK_N: tl.constexpr,  # key rows per step of the loop
):  # fmt: skip
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_base = K + off_b * stride_kb + off_h * stride_kh
    v_base = V + off_b * stride_vb + off_h * stride_vh
    # Padded query rows load zeros (finite logits, lse = delta = 0) and are never stored.
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    do_base = DO + off_b * stride_dob + off_h * stride_doh
    q = _load_tile(q_base, offs_m, offs_d, stride_qn, stride_qd, N, True)
    do = _load_tile(do_base, offs_m, offs_d, stride_don, stride_dod, N, True)
    lse = _load_rows(LSE + (off_b * H + off_h) * N, offs_m, N, True)
    delta = _load_rows(DELTA + (off_b * H + off_h) * N, offs_m, N, True)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    n_full = (N // BLOCK_N) * BLOCK_N
    for start_n in range(0, (N // BLOCK_N) * BLOCK_N, BLOCK_N):  # = n_full, not the name: see _LOOP_BOUNDS
        dq = _dq_key_block(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            start_n, offs_n, offs_d, qk_scale, N, False, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    if n_full < N:
        dq = _dq_key_block(
            dq, q, do, lse, delta, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
            n_full, offs_n, offs_d, qk_scale, N, True, DOT_PRECISION, DOT_UPCAST,
        )  # fmt: skip
    dq = dq * sm_scale
    dq_base = DQ + off_b * stride_gb + off_h * stride_gh
    dq_ptrs = dq_base + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=(offs_m < N)[:, None])


_attn_fwd_tuned = autotuned("fwd", _attn_fwd)
_attn_bwd_dkdv_tuned = autotuned("dkdv", _attn_bwd_dkdv)
_attn_bwd_dq_tuned = autotuned("dq", _attn_bwd_dq)
_DELTA_BLOCK_M = 64


def _dot_options(batch: int, n: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Arguments shared by the forward and backward kernels (all but N compile-time)."""
    return dict(
        N=n,
        N_BUCKET=n_bucket(n),
        B_BUCKET=triton.next_power_of_2(batch),
        HEAD_DIM=head_dim,
        # fp32 must not silently run as TF32 (10-bit mantissa); fp16/bf16 ignore the setting.
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DOT_UPCAST=interpreter_enabled() and dtype == torch.bfloat16,
    )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"flash_attention: {name} must be a 4-D (B, H, N, D) tensor, got {got}")
    if not q.shape == k.shape == v.shape:
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        raise ValueError(f"flash_attention: q, k, v must have one shape, got {shapes}")
    check_launchable("flash_attention", q, k, v)
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise ValueError(
            f"flash_attention: head dim D={q.shape[-1]} is not supported; use one of {SUPPORTED_HEAD_DIMS}"
        )
    if q.shape[2] == 0:
        raise ValueError("flash_attention: sequence length N must be at least 1")


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    # The kernels read any batch/head/row stride; only rows need unit stride for vector loads.
    return t if t.stride(-1) == 1 else t.contiguous()


def _device_of(t: torch.Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the *current* CUDA device: make it the tensors' own (multi-GPU safety).
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    # token-major output: the kernel writes through o's strides, and the model reads it back as
    # (B, N, H·D) hidden states without a transpose copy
    o = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    with _device_of(q):
        _attn_fwd_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), H, B)](
            q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, scale * LOG2E,
            **_dot_options(B, N, D, q.dtype),
        )  # fmt: skip
    return o, lse


def _backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float, grads: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """dq, dk, dv; written into `grads` (any strides, unit last stride) when given, else into new tensors."""
    B, H, N, D = q.shape
    q, k, v, o, do = (_unit_last_stride(t) for t in (q, k, v, o, do))
    delta = torch.empty_like(lse)
    if grads is None:
        grads = tuple(torch.empty((B, H, N, D), device=q.device, dtype=q.dtype) for _ in range(3))
    dq, dk, dv = grads
    common = _dot_options(B, N, D, q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    with _device_of(q):
        _attn_bwd_delta[(triton.cdiv(N, _DELTA_BLOCK_M), H, B)](
            o, do, delta, *o.stride(), *do.stride(), H, N=N, HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M
        )
        _attn_bwd_dkdv_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), H, B)](
            q, k, v, do, dk, dv, lse, delta, *strides, *dk.stride(), H, scale * LOG2E, scale, **common
        )
        _attn_bwd_dq_tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_M"]), H, B)](
            q, k, v, do, dq, lse, delta, *strides, *dq.stride(), H, scale * LOG2E, scale, **common
        )
    return dq, dk, dv


# Custom ops: torch.compile sees one opaque node per call (no graph break) and never traces the launch.
# (`torch.library.triton_op` + `wrap_triton` would let Inductor see the kernels, but under
# TRITON_INTERPRET=1 wrap_triton returns the raw interpreted kernel, which then runs on FakeTensors
# during tracing and fails, so it cannot be tested on a CPU.) The op receives its arguments as given:
# strided q/k/v views reach the kernels without a copy in eager mode and under torch.compile (checked
# with the eager, aot_eager and inductor backends; Inductor keeps a custom op's input strides exact).
@custom_op("vithybrid::flash_attention")
def _flash_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, scale)


@_flash_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D)).transpose(1, 2), q.new_empty((B, H, N), dtype=torch.float32)


@custom_op("vithybrid::flash_attention_backward")
def _flash_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _backward(do, q, k, v, o, lse, scale)


@_flash_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale


def _backward_rule(ctx, grad_o, grad_lse):
    # lse is an internal by-product (never handed to users), so its gradient is ignored.
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = run(ctx, _flash_attention_backward_op, grad_o, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


_flash_attention_op.register_autograd(_backward_rule, setup_context=_setup_context)
_flash_attention_eager = twin(_flash_attention_op, _setup_context, _backward_rule, materialize_grads=False)


def _packed_views(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, H, N, D) strided views of a packed (B, N, 3, H, D) tensor (no copy)."""
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))  # type: ignore[return-value]


# The packed entry point's own ops: autograd sees one input, so the gradient is one (B, N, 3, H, D) tensor
# the backward kernels write in place. Given q, k, v as views of it instead, autograd makes one zero-filled
# tensor of qkv's size per view and adds the three: per layer 3 fills and 2 adds of 85M elements at
# batch 64, N = 577 (counted in a CPU profile of a training step).
@custom_op("vithybrid::flash_attention_packed")
def _flash_attention_packed_op(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(*_packed_views(qkv), scale)


@_flash_attention_packed_op.register_fake
def _(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H, D)).transpose(1, 2), qkv.new_empty((B, H, N), dtype=torch.float32)


@custom_op("vithybrid::flash_attention_packed_backward")
def _flash_attention_packed_backward_op(
    do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, scale: float
) -> torch.Tensor:
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)  # every element written by dq/dk/dv
    _backward(do, *_packed_views(qkv), o, lse, scale, grads=_packed_views(dqkv))
    return dqkv


@_flash_attention_packed_backward_op.register_fake
def _(do, qkv, o, lse, scale):
    return qkv.new_empty(qkv.shape)


def _setup_packed_context(ctx, inputs, output) -> None:
    qkv, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.scale = scale


def _packed_backward_rule(ctx, grad_o, grad_lse):
    qkv, o, lse = ctx.saved_tensors
    return run(ctx, _flash_attention_packed_backward_op, grad_o, qkv, o, lse, ctx.scale), None


_flash_attention_packed_op.register_autograd(_packed_backward_rule, setup_context=_setup_packed_context)
_flash_attention_packed_eager = twin(
    _flash_attention_packed_op, _setup_packed_context, _packed_backward_rule, materialize_grads=False
)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q kᵀ · scale) v for (B, H, N, D) inputs (any N, D in 32/64/128); differentiable.

    Returns a (B, H, N, D) tensor in q.dtype whose memory is token-major ((B, N, H, D) contiguous), so
    `.transpose(1, 2).reshape(B, N, H * D)` is a view. `scale` defaults to D**-0.5.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not needs_registered_op(q, k, v):
        return _forward(q, k, v, scale)[0]
    out, _ = call(_flash_attention_op, _flash_attention_eager, q, k, v, scale)
    return out


def flash_attention_packed(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`flash_attention` over the q, k, v of a packed (B, N, 3, H, D) QKV projection output (a view of the
    fused projection's (B, N, 3·H·D) output); returns (B, H, N, D) like `flash_attention`.

    Same kernels, same result; what differs is the backward: the gradient w.r.t. `qkv` is one tensor whose
    three slices the backward kernels write directly, with no zero-fill and no adds.
    """
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 5 or qkv.shape[2] != 3:
        got = tuple(qkv.shape) if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise ValueError(f"flash_attention_packed: qkv must be a 5-D (B, N, 3, H, D) tensor, got {got}")
    q, k, v = _packed_views(qkv)
    _check_inputs(q, k, v)
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    if not needs_registered_op(qkv):
        return _forward(q, k, v, scale)[0]
    out, _ = call(_flash_attention_packed_op, _flash_attention_packed_eager, qkv, scale)
    return out


def reference_packed(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`reference` over the packed tensor's three slices."""
    return reference(*_packed_views(qkv), scale)
