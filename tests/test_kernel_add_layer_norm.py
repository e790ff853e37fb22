"""add_layer_norm (kernels/add_layer_norm.py): h = x + residual and LayerNorm(h), against float64 with torch's
unfused add + layer_norm in the same dtype as the peer (tests/tolerance.py's idiom)."""

from __future__ import annotations

import importlib

import pytest
import torch
from vithybrid_fast.kernels import add_layer_norm
from vithybrid_fast.kernels._runtime import interpreter_enabled

from tests.tolerance import assert_close_to_reference, unit_variance_row

aln = importlib.import_module("vithybrid_fast.kernels.add_layer_norm")  # the package binds the function
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
WIDTHS = [1, 5, 768, 1000, 3000]  # one element, odd, ViT-Base, a masked tail, 8 warps (block 4096)


def _inputs(rows, width, dtype, device, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, width, generator=g) * scale + offset).to(dtype).to(device)
    r = torch.randn(rows, width, generator=g).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(width, generator=g)).to(dtype).to(device)
    b = (0.1 * torch.randn(width, generator=g)).to(dtype).to(device)
    return x, r, w, b


def _float64(x, r, w, b, eps):
    return aln.reference(x.double(), None if r is None else r.double(), w.double(), b.double(), eps)


def _assert_sum_is_torchs(h, x, r, dtype):
    want = x + r
    if dtype == torch.bfloat16 and interpreter_enabled():
        # the interpreter truncates float32 → bfloat16 (a GPU rounds to nearest, as torch): ≤ 1 ulp apart
        ulp = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert ((h.float() - want.float()).abs() <= ulp).all()
    else:
        assert torch.equal(h, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("residual", [True, False], ids=["add", "plain"])
def test_matches_float64_as_closely_as_torch(width, dtype, residual, device):
    x, r, w, b = _inputs(6, width, dtype, device)
    r = r if residual else None
    h, y = add_layer_norm(x, r, w, b, 1e-12)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    if residual:
        _assert_sum_is_torchs(h, x, r, dtype)
    else:
        assert h is x
    _, torch_y = aln.reference(x, r, w, b, 1e-12)
    assert_close_to_reference(y, torch_y, _float64(x, r, w, b, 1e-12)[1], dtype)


def test_the_model_shape_in_every_dtype(device):
    # ViT-Base rows at B = 2 (2 × 577 rows of 768): the shape the glue runs at, a leading 3-D view
    for dtype in DTYPES:
        x, r, w, b = _inputs(2 * 577, 768, dtype, device, seed=1)
        x, r = x.view(2, 577, 768), r.view(2, 577, 768)
        h, y = add_layer_norm(x, r, w, b, 1e-12)
        assert h.shape == y.shape == (2, 577, 768)
        assert_close_to_reference(y, aln.reference(x, r, w, b, 1e-12)[1], _float64(x, r, w, b, 1e-12)[1], dtype)


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_low_variance_rows_follow_eps_row_by_row(eps, device):
    # constant rows (variance exactly 0), rows at variance ≈ eps, below it, and a large mean with a small
    # spread: each row against float64, so a tenfold eps (or E[h²] − E[h]²) fails on the rows it decides
    width = 768
    base = unit_variance_row(width, seed=3)
    rows = [torch.full((width,), 3.25, dtype=torch.float64)]
    rows += [base * s for s in (eps**0.5, 0.3 * eps**0.5, 3 * eps**0.5)]
    rows += [
        1000.0 + base * 1e-3,
        3e4 + base * 1e-2,
    ]  # the mean's float32 rounding decides these (no correction: 1e-4..1e-3 off)
    x = torch.stack(rows).float().to(device)
    w, b = torch.ones(width, device=device), torch.full((width,), 0.5, device=device)
    _, y = add_layer_norm(x, None, w, b, eps)
    _, want = _float64(x, None, w, b, eps)
    assert torch.equal(y[0], b)  # a constant row is exactly the bias
    for i in range(1, len(rows)):
        err = (y[i].double() - want[i]).abs().max().item()
        assert err <= 1e-5 * max(1.0, want[i].abs().max().item()), (i, err)  # float32 math: ~3e-7 measured
        _, tenfold = _float64(x[i : i + 1], None, w, b, eps * 10)
        if i < 4:  # rows whose variance is eps-sized: eps matters, and is honoured
            assert (tenfold[0] - want[i]).abs().max().item() > 10 * err, i


def test_a_recorded_gradient_takes_the_differentiable_reference(device):
    x, r, w, b = _inputs(4, 32, torch.float32, device, seed=4)
    w.requires_grad_(True)
    h, y = add_layer_norm(x, r, w, b, 1e-5)
    y.sum().backward()
    assert w.grad is not None and w.grad.shape == w.shape and torch.equal(h, x + r)
    with torch.no_grad():  # and without one, the kernel (same values)
        torch.testing.assert_close(add_layer_norm(x, r, w, b, 1e-5)[1], y.detach(), rtol=1e-5, atol=1e-5)


def test_the_registered_ops_agree_with_their_fake_shapes(device):
    x, r, w, b = _inputs(3, 40, torch.float32, device, seed=5)
    torch.library.opcheck(aln._add_layer_norm_op, (x, r, w, b, 1e-5), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(aln._layer_norm_op, (x, w, b, 1e-5), test_utils=("test_schema", "test_faketensor"))
    got_h, got_y = aln._add_layer_norm_op(x, r, w, b, 1e-5)
    assert torch.equal(got_h, x + r)
    torch.testing.assert_close(got_y, aln.reference(x, r, w, b, 1e-5)[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aln._layer_norm_op(x, w, b, 1e-5), aln.reference(x, None, w, b, 1e-5)[1])


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda x, r, w, b: (x, r[:, :-1], w, b), ValueError, "must match x"),
        (lambda x, r, w, b: (x, r.half(), w, b), ValueError, "must match x"),
        (lambda x, r, w, b: (x, r, w[:-1], b), ValueError, "weight and bias must be (16,)"),
        (lambda x, r, w, b: (x.double(), r.double(), w.double(), b.double()), TypeError, "float64"),
        (lambda x, r, w, b: (x[:, :0], r[:, :0], w[:0], b[:0]), ValueError, "rows of 1 to 8192"),
    ],
    ids=["residual-shape", "residual-dtype", "weight-shape", "float64", "empty-rows"],
)
def test_bad_inputs_are_clear_errors(change, error, message, device):
    x, r, w, b = change(*_inputs(2, 16, torch.float32, device))
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        add_layer_norm(x, r, w, b, 1e-5)


def test_rows_wider_than_a_block_are_refused(device):
    x, r, w, b = _inputs(1, aln.MAX_WIDTH + 1, torch.float32, device)
    with pytest.raises(ValueError, match="rows of 1 to 8192"):
        add_layer_norm(x, r, w, b, 1e-5)
