"""weight_standardize against the float64 reference, with HF's batch_norm trick as the same-dtype peer."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from vithybrid_fast.kernels.weight_standardize import GPU_BLOCK, INTERPRETER_BLOCK, reference, weight_standardize

from tests.tolerance import assert_close_to_reference

# The module (the package binds `kernels.weight_standardize` to the function).
ws_module = importlib.import_module("vithybrid_fast.kernels.weight_standardize")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SHAPES = [
    (5, 3, 7, 7),  # odd out-channels, stem-like fan-in 147 (not a power of two)
    (7, 13, 3, 3),  # odd in-channels, fan-in 117
    (16, 8, 1, 1),  # 1x1 conv
    (4, 1, 1, 1),  # fan-in 1: variance 0, output exactly 0
    (64, 3, 7, 7),  # the real stem conv
    (3, 520, 3, 3),  # fan-in 4680: several blocks (interpreter and GPU) with a masked tail
]


def hf_batch_norm_trick(w: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """What HF's BitWeightStandardizedConv2d computes, in w's own dtype."""
    if w[0].numel() == 1:  # batch_norm refuses one value per channel (HF cannot run it); all zeros
        return torch.zeros_like(w) * w
    flat = w.reshape(1, w.shape[0], -1)
    return F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(w)


def test_looped_shape_exceeds_block():
    # Keeps SHAPES[-1] several blocks long (with a tail) if a block size changes.
    for block in (GPU_BLOCK, INTERPRETER_BLOCK):
        assert 2 * block < 520 * 9 and (520 * 9) % block != 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward(shape, dtype, device):
    torch.manual_seed(0)
    w = (torch.randn(shape, device=device) * 0.05 + 0.01).to(dtype)
    out = weight_standardize(w)
    assert out.shape == w.shape and out.dtype == dtype
    assert_close_to_reference(out, hf_batch_norm_trick(w), reference(w.double()), dtype)


def test_large_mean_is_exact(device):
    # |mean| / std = 1e4: E[w²] − E[w]² in float32 would lose every digit of the variance.
    torch.manual_seed(0)
    w = torch.randn(8, 16, 3, 3, device=device) * 1e-3 + 10.0
    out = weight_standardize(w)
    ref = reference(w.double())
    assert (out.double() - ref).abs().max().item() < 1e-2


def test_eps_is_used(device):
    w = torch.randn(6, 5, 3, 3, device=device) * 0.1
    out = weight_standardize(w, eps=0.5)
    assert_close_to_reference(out, hf_batch_norm_trick(w, eps=0.5), reference(w.double(), eps=0.5), w.dtype)


def test_channels_last_in_place_layout(device):
    w = torch.randn(9, 6, 3, 3, device=device).to(memory_format=torch.channels_last)
    out = weight_standardize(w)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(out, hf_batch_norm_trick(w), reference(w.double()), w.dtype)


def test_non_contiguous_input(device):
    # A strided slice: copied to contiguous, values unchanged.
    base = torch.randn(10, 12, 3, 3, device=device)
    w = base[::2, ::3]
    assert not w.is_contiguous()
    assert_close_to_reference(weight_standardize(w), hf_batch_norm_trick(w), reference(w.double()), w.dtype)


def grads(fn, w: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    w = w.detach().clone().requires_grad_()
    fn(w).backward(grad_out.to(w.dtype))
    return w.grad


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((5, 3, 7, 7), torch.float32),  # single-pass backward
        ((7, 13, 3, 3), torch.bfloat16),
        ((16, 8, 1, 1), torch.float16),
        ((4, 1, 1, 1), torch.float32),  # fan-in 1: gradient exactly 0
        ((3, 520, 3, 3), torch.float32),  # looped backward
        ((3, 520, 3, 3), torch.bfloat16),
    ],
)
def test_backward(shape, dtype, device):
    torch.manual_seed(0)
    w = (torch.randn(shape, device=device) * 0.05).to(dtype)
    grad_out = torch.randn(shape, device=device)
    ours = grads(weight_standardize, w, grad_out)
    peer = grads(hf_batch_norm_trick, w, grad_out)
    ref = grads(reference, w.double(), grad_out.double())
    assert ours.dtype == dtype
    # Gradients scale with rstd (~20 here): compare relative to that scale.
    assert_close_to_reference(ours, peer, ref, dtype, what="dw")


def test_backward_channels_last_and_strided_grad(device):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, device=device).to(memory_format=torch.channels_last)
    grad_out = torch.randn(6, 3, 3, 4, device=device).permute(0, 3, 1, 2)  # yet another layout
    ours = grads(weight_standardize, w, grad_out)
    ref = grads(reference, w.double(), grad_out.double())
    assert_close_to_reference(ours, grads(hf_batch_norm_trick, w, grad_out), ref, w.dtype, what="dw")


def test_no_grad_matches_grad_path(device):
    w = torch.randn(5, 3, 7, 7, device=device, requires_grad=True)
    with torch.no_grad():
        a = weight_standardize(w)
    assert torch.equal(a, weight_standardize(w).detach())
    torch.testing.assert_close(a.double(), reference(w.detach().double()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("w", "error", "match"),
    [
        (torch.ones(4, 3, 3, 3, dtype=torch.int32), TypeError, "dtype"),
        (torch.ones(8), ValueError, "at least 2 dims"),
        (torch.ones(0, 3, 3, 3), ValueError, "non-empty"),
    ],
)
def test_bad_inputs(w, error, match, device):
    with pytest.raises(error, match=match):
        weight_standardize(w.to(device))


# The GPU's one block (1024), forced under the interpreter (issue 14 item 1): fan-in 1, one partial
# block (147), one full block (1024), two full blocks (2048), three with a partial tail (2304).
@pytest.mark.parametrize("shape", [(4, 1, 1, 1), (6, 3, 7, 7), (5, 1024, 1, 1), (3, 512, 2, 2), (4, 256, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_block_forward_and_backward(shape, dtype, device, monkeypatch):
    monkeypatch.setattr(ws_module, "_FORCE_GPU_BLOCK", True)
    assert ws_module._active_plan(shape[0], 1).block == GPU_BLOCK
    torch.manual_seed(0)
    w = (torch.randn(shape, device=device) * 0.05 + 0.01).to(dtype)
    assert_close_to_reference(weight_standardize(w), hf_batch_norm_trick(w), reference(w.double()), dtype)
    grad_out = torch.randn(shape, device=device)
    ours = grads(weight_standardize, w, grad_out)
    ref = grads(reference, w.double(), grad_out.double())
    assert_close_to_reference(ours, grads(hf_batch_norm_trick, w, grad_out), ref, dtype, what="dw")


def low_variance_rows(dtype, device, fan_in: int) -> torch.Tensor:
    """4 rows: std 0.05; std 1e-4 (variance 1e-8 = BiT's eps); exactly constant; std 1e-4 around 0.01."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(4, fan_in, generator=g)
    w[0] *= 0.05
    w[1] *= 1e-4
    w[2] = 0.02
    w[3] = 0.01 + 1e-4 * w[3]
    return w.reshape(4, fan_in // 9, 3, 3).to(device, dtype)


# issue 14 item 4: on the looped (large fan-in) path, eps decides rows 1 and 3; checked row by row.
@pytest.mark.parametrize("gpu_block", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_low_variance_rows_eps(dtype, gpu_block, device, monkeypatch):
    monkeypatch.setattr(ws_module, "_FORCE_GPU_BLOCK", gpu_block)
    w = low_variance_rows(dtype, device, 2304)  # the largest fan-in of the model: 3 GPU blocks, 36 here
    out, peer, ref = weight_standardize(w, eps=1e-8), hf_batch_norm_trick(w, eps=1e-8), reference(w.double(), 1e-8)
    for row in range(4):
        assert_close_to_reference(out[row], peer[row], ref[row], dtype, what=f"row {row}")
    assert torch.equal(out[2], torch.zeros_like(out[2]))  # a constant row standardizes to exactly 0
    # The check has teeth: eps tenfold fails it on each low-variance row.
    wrong = weight_standardize(w, eps=1e-7)
    for row in (1, 3):
        with pytest.raises(AssertionError):
            assert_close_to_reference(wrong[row], peer[row], ref[row], dtype)
