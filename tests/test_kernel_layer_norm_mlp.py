"""Parity of kernels.layer_norm_mlp: x + fc2(gelu_erf(fc1(LN(x)))) against plain torch and float64.

Tolerance idiom throughout: kernel error vs float64 ≤ 2 × plain-torch error in the same dtype + atol.
"""

from __future__ import annotations

import pytest
import torch
from tolerance import assert_close_to_reference
from torch import nn
from vithybrid_fast.kernels.layer_norm_mlp import layer_norm_mlp, reference

from vithybrid_fast import kernels

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


class EagerMLP(nn.Module):
    """What the kernel replaces: HF ViT layernorm_after → intermediate → output (+ residual)."""

    def __init__(self, d: int, hidden: int, eps: float, bias: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.fc1 = nn.Linear(d, hidden, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d, bias=bias)

    def forward(self, x: torch.Tensor, residual: bool = True) -> torch.Tensor:
        out = self.fc2(self.act(self.fc1(self.norm(x))))
        return out + x if residual else out

    def params(self) -> tuple:
        return (
            self.norm.weight,
            self.norm.bias,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
        )


def _make(d: int, hidden: int, eps: float, bias: bool = True, seed: int = 0) -> EagerMLP:
    torch.manual_seed(seed)
    mlp = EagerMLP(d, hidden, eps, bias)
    with torch.no_grad():  # non-trivial LN affine so γ/β are actually exercised
        mlp.norm.weight.normal_(1.0, 0.2)
        mlp.norm.bias.normal_(0.0, 0.1)
    return mlp


def _check(mlp: EagerMLP, x: torch.Tensor, eps: float, residual: bool, dtype: torch.dtype) -> None:
    device = x.device
    mlp_dtype = mlp.to(device=device, dtype=dtype)
    with torch.no_grad():
        out = layer_norm_mlp(x, *mlp_dtype.params(), eps, residual=residual)
        torch_out = mlp_dtype(x, residual)
        ref = mlp.to(torch.float64)(x.double(), residual)
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_to_reference(out, torch_out, ref, dtype)


@pytest.mark.parametrize(
    "shape,hidden",
    [
        ((37, 48), 80),  # odd M, D and hidden not multiples of the block
        ((1154, 32), 64),  # 2·577 rows (two ViT images), small D/hidden that tile exactly
        ((2, 37, 48), 80),  # 3-D input (B, N, D)
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("eps", [1e-12, 1e-5])  # 1e-12: the hub checkpoint's LayerNorm eps
def test_layer_norm_mlp(shape, hidden, dtype, residual, eps, device):
    mlp = _make(shape[-1], hidden, eps)
    x = (torch.randn(shape) + 0.5).to(device=device, dtype=dtype)
    _check(mlp, x, eps, residual, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_none(dtype, device):
    # nn.Linear(bias=False) layers: fc1_b = fc2_b = None.
    mlp = _make(48, 80, 1e-5, bias=False, seed=1)
    x = torch.randn(37, 48).to(device=device, dtype=dtype)
    _check(mlp, x, 1e-5, True, dtype)


def test_matches_reference_function(device):
    # The module's own `reference` (float32 math) agrees with the float64 eager module.
    mlp = _make(48, 80, 1e-12, seed=2)
    x = torch.randn(2, 37, 48, device=device)
    with torch.no_grad():
        ref32 = reference(x, *mlp.to(device).params(), 1e-12)
        ref64 = mlp.to(torch.float64)(x.double())
    torch.testing.assert_close(ref32.double(), ref64, rtol=1e-5, atol=1e-5)


def test_package_export_is_the_function():
    # kernels/__init__.py binds the name to the function (not the same-named submodule) + its twin.
    assert kernels.layer_norm_mlp is layer_norm_mlp
    assert kernels.layer_norm_mlp.reference is reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gradients(dtype, device):
    # Backward = autograd through the float32 reference (recompute); compare to eager grads.
    # Every provider starts from the same dtype-rounded inputs, as _check does: the float64 reference then
    # holds only the computation's error, not the inputs' rounding (which loosened the 2× bound up to 2×)
    eps = 1e-5
    weights = {k: v.to(dtype) for k, v in _make(48, 80, eps, seed=3).state_dict().items()}
    x0 = (torch.randn(2, 37, 48) + 0.5).to(dtype)
    grad_out = torch.randn(2, 37, 48).to(dtype)
    grads = {}
    for provider, cast in (("kernel", dtype), ("torch", dtype), ("ref", torch.float64)):
        mlp = _make(48, 80, eps, seed=3).to(device=device, dtype=cast)
        mlp.load_state_dict(weights)  # copied into the module's dtype: exact in float64
        x = x0.to(device=device, dtype=cast).detach().requires_grad_(True)
        if provider == "kernel":
            out = layer_norm_mlp(x, *mlp.params(), eps)
        else:
            out = mlp(x)
        out.backward(grad_out.to(device=device, dtype=cast))
        grads[provider] = [x.grad] + [p.grad for p in mlp.params()]
    names = ["x", "ln_w", "ln_b", "fc1_w", "fc1_b", "fc2_w", "fc2_b"]
    for name, g_kernel, g_torch, g_ref in zip(names, grads["kernel"], grads["torch"], grads["ref"]):
        assert g_kernel.dtype == dtype
        assert_close_to_reference(g_kernel, g_torch, g_ref, dtype, what=f"grad {name}")


def test_bad_inputs_raise_clear_errors(device):
    d, hidden = 48, 80
    params = [t.to(device) for t in _make(d, hidden, 1e-5).params()]
    x = torch.randn(37, d, device=device)
    with torch.no_grad():
        with pytest.raises(ValueError, match="K=47"):
            layer_norm_mlp(x[:, :47], *params, 1e-5)
        bad_ln = [params[0][:47], *params[1:]]
        with pytest.raises(ValueError, match="ln_w must be"):
            layer_norm_mlp(x, *bad_ln, 1e-5)
        with pytest.raises(TypeError, match="not supported"):
            layer_norm_mlp(x.to(torch.int32), *params, 1e-5)
        with pytest.raises(TypeError, match=r"fc1_w is torch\.float16"):
            layer_norm_mlp(x, *params[:2], params[2].half(), *params[3:], 1e-5)
        bad_fc2 = [*params[:4], params[4][:, :79], params[5]]
        with pytest.raises(ValueError, match="fc2_w must be"):
            layer_norm_mlp(x, *bad_fc2, 1e-5)
