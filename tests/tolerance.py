"""The tolerance idiom of DESIGN.md, shared by every kernel test.

A kernel's error against an upcast reference may be at most
    2 × (plain torch's error in the same dtype) + atol(dtype).
Plain torch in float32 can be exact against a float64 reference, hence the atol floor.
"""

from __future__ import annotations

import torch

ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_reference(
    out: torch.Tensor,
    torch_out: torch.Tensor,
    ref_out: torch.Tensor,
    dtype: torch.dtype,
    factor: float = 2.0,
    atol_scale: float = 1.0,
    what: str = "output",
) -> None:
    """`out` (kernel) and `torch_out` (plain torch, same dtype) both against `ref_out` (float64/32)."""
    ref = ref_out.double()
    kernel_err = (out.double() - ref).abs().max().item()
    torch_err = (torch_out.double() - ref).abs().max().item()
    bound = factor * torch_err + atol_scale * ATOL[dtype] * max(1.0, ref.abs().max().item())
    assert kernel_err <= bound, (
        f"{what}: kernel max abs err {kernel_err:.3e} > bound {bound:.3e} "
        f"(torch {dtype} err {torch_err:.3e}, dtype {dtype})"
    )


def unit_variance_row(width: int, seed: int) -> torch.Tensor:
    """A float64 row of mean 0 and biased variance exactly 1: scaled by eps**0.5 it sits at variance ≈ eps,
    where a LayerNorm's eps decides the result (the low-variance tests)."""
    base = torch.randn(width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (base - base.mean()) / base.std(correction=0)
