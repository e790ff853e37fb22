"""Layout helpers that group_norm_act's forward and backward share (kernels/group_norm_act.py and
kernels/_group_norm_act_backward.py), and the per-lane Welford step every statistics loop of the forward
uses (group_norm_act.py's NCHW loops, _group_norm_act_tiles.py's channels-last `_gn_stats`).

They live here, not in group_norm_act.py, so the backward can use them without importing the forward's
module, which imports the backward's `launch_backward`: both import this leaf, and neither imports the
other's module back. Pure functions only; the test hooks (`_FORCE_GPU_BLOCKS`, `_sm_count`) stay in
group_norm_act.py, where tests patch them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _layout(t: torch.Tensor) -> bool | None:
    """False: NCHW-contiguous, True: channels-last dense, None: neither."""
    if t.is_contiguous():
        return False
    if t.dim() >= 3 and t.movedim(1, -1).is_contiguous():
        return True
    return None


def _to_layout(t: torch.Tensor, channels_last: bool) -> torch.Tensor:
    if _layout(t) == channels_last:
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1) if channels_last else t.contiguous()


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if NCHW-contiguous or channels-last dense, else a contiguous copy (the layout y takes)."""
    return x if _layout(x) is not None else x.contiguous()


@triton.jit
def _span_block(start, L, S, BLOCK: tl.constexpr):
    # Offsets, mask and channel (relative to the group's first) of elements [start, start + BLOCK) of one
    # NCHW group span. Channel of element e: e // S, from a float estimate corrected once — exact, since
    # the quotient of (start % S + i) is small — instead of an integer division per element.
    offs = start + tl.arange(0, BLOCK)
    c0 = start // S
    local = (start - c0 * S) + tl.arange(0, BLOCK)
    q = ((local.to(tl.float32) + 0.5) * (1.0 / (S * 1.0))).to(tl.int32)
    q = tl.where(local - q * S < 0, q - 1, q)
    q = tl.where(local - q * S >= S, q + 1, q)
    return offs, offs < L, c0 + q


@triton.jit
def _welford_lanes(lane_mean, lane_m2, x, mask, inv):
    # One more value into each valid lane's (mean, M2): Welford, elementwise, no reduction. A lane is valid
    # on a prefix of a loop's trips, so a lane valid on trip `it` then holds it + 1 values: inv = 1/(it + 1).
    delta = x - lane_mean
    lane_mean = tl.where(mask, lane_mean + delta * inv, lane_mean)
    lane_m2 = tl.where(mask, lane_m2 + delta * (x - lane_mean), lane_m2)
    return lane_mean, lane_m2


@triton.jit
def _lane_counts(start, L, ITERS, BLOCK: tl.constexpr):
    # How many values each of BLOCK lanes took in a loop of ITERS trips over [start, start + ITERS·BLOCK)
    # ∩ [0, L), lane j taking start + j, start + j + BLOCK, …: derived, not counted in the loop.
    left = tl.maximum(L - start - tl.arange(0, BLOCK), 0)
    return tl.minimum((left + BLOCK - 1) // BLOCK, ITERS).to(tl.float32)
