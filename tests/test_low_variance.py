"""LayerNorm eps where it decides the result (issue 14, blind spot 4).

Elsewhere test rows have variance 1–4 and the tolerance scales with the largest value, so LayerNorm's
eps — in `layer_norm_stats` (the fused_linear LN prologue), in `layer_norm_mlp` and the model's
`layer_norm_eps` — could be off tenfold without a failure. Here rows have variance near eps (where
rstd = 1/sqrt(var + eps) moves by √(11/2) if eps moves tenfold), below eps, and exactly zero
(constant rows: x − mean = 0, rstd = 1/sqrt(eps), and a missing eps gives NaN), mixed with ordinary
rows. Every check is per row: a row's error may be at most 2 × plain torch's error on that row plus
atol × max(1, that row's largest reference value) — the tolerance idiom of tests/tolerance.py,
row by row, so a large ordinary row cannot hide a wrong low-variance row.
(GroupNorm and weight-standardization eps are covered with the backbone kernels' tests.)
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from vithybrid_fast.kernels.fused_linear import fused_linear, layer_norm_stats, reference_layer_norm_stats
from vithybrid_fast.kernels.fused_linear import reference as linear_reference
from vithybrid_fast.kernels.layer_norm_mlp import layer_norm_mlp
from vithybrid_fast.kernels.layer_norm_mlp import reference as mlp_reference

import vithybrid_fast as vf
from tests.hf_reference import build_hf_model, tiny_config
from tests.tolerance import ATOL

HUB_EPS = 1e-12  # layer_norm_eps of google/vit-hybrid-base-bit-384


def low_variance_rows(rows_per_kind: int, width: int, eps: float, seed: int = 0, offset: float = 0.5) -> torch.Tensor:
    """(kinds · rows_per_kind, width) float32 rows whose normalisation depends on eps.

    Kinds: exactly constant rows (dyadic values, so the float32 mean is exact and x − mean is 0),
    variance = eps, 0.1·eps (every other one around `offset`) and 10·eps, and an ordinary row.
    """
    g = torch.Generator().manual_seed(seed)
    std = eps**0.5
    kinds = []
    for i in range(rows_per_kind):
        noise = torch.randn(5, width, generator=g)
        noise = (noise - noise.mean(-1, keepdim=True)) / noise.std(-1, correction=0, keepdim=True)  # variance 1
        kinds += [
            torch.full((width,), [0.5, -0.25, 0.0, 3.0][i % 4]),  # constant: var 0
            noise[0] * std,  # var = eps: eps halves rstd
            noise[1] * std * 0.1**0.5 + offset * (i % 2),  # var = 0.1·eps: eps dominates
            noise[2] * std * 10**0.5,  # var = 10·eps
            noise[3] + 1.0,  # ordinary
        ]
    return torch.stack(kinds)


def assert_rows_close(out, torch_out, ref, dtype, what: str) -> None:
    """The tolerance idiom applied to every row (last dim) separately."""
    ref = ref.double().reshape(-1, ref.shape[-1])
    out, torch_out = out.double().reshape(ref.shape), torch_out.double().reshape(ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite values in rows {(~torch.isfinite(out)).any(-1).nonzero()}"
    kernel_err = (out - ref).abs().amax(-1)
    torch_err = (torch_out - ref).abs().amax(-1)
    bound = 2 * torch_err + ATOL[dtype] * ref.abs().amax(-1).clamp(min=1.0)
    bad = (kernel_err > bound).nonzero().flatten().tolist()
    assert not bad, f"{what}: rows {bad} exceed the bound; " + ", ".join(
        f"row {r}: err {kernel_err[r]:.3e} > {bound[r]:.3e} (torch {torch_err[r]:.3e})" for r in bad[:5]
    )


EPS_CASES = [HUB_EPS, 1e-6, 1e-5]
WIDTH = 48  # not a power of two: the stats kernel masks the row tail


def _check_stats_per_row(x: torch.Tensor, eps: float) -> None:
    mean, rstd = layer_norm_stats(x, eps)
    # the plain-torch peer is eager LayerNorm's own statistics (what F.layer_norm computes in float32)
    _, torch_mean, torch_rstd = torch.ops.aten.native_layer_norm(x, (x.shape[-1],), None, None, eps)
    ref_mean, ref_rstd = reference_layer_norm_stats(x.double(), eps)
    # rstd reaches 1/sqrt(eps) = 1e6 on constant rows: each row is held to its own scale
    assert_rows_close(rstd[:, None], torch_rstd, ref_rstd[:, None], torch.float32, f"rstd eps={eps}")
    assert_rows_close(mean[:, None], torch_mean, ref_mean[:, None], torch.float32, f"mean eps={eps}")


@pytest.mark.parametrize(
    ("eps", "offset"),
    [(HUB_EPS, 0.0), (1e-6, 0.5), (1e-5, 0.5)],  # hub eps: rows centred near 0 (see the next test)
)
def test_layer_norm_stats_per_row(eps, offset, device):
    _check_stats_per_row(low_variance_rows(4, WIDTH, eps, offset=offset).to(device), eps)


# Variance 1e-13 around 0.5 (std ≈ 5 float32 ulps): a chunk centred on its rounded float32 mean sum/n
# gains n·δ² in M2 (a 1.6e-3 relative rstd error, 5× eager LayerNorm's) unless the kernel subtracts
# (Σ centred)²/n, the corrected two-pass formula. Found by this test; fixed in _layer_norm_stats_kernel.
def test_layer_norm_stats_tiny_variance_far_from_zero(device):
    _check_stats_per_row(low_variance_rows(4, WIDTH, HUB_EPS, offset=0.5).to(device), HUB_EPS)


@pytest.mark.parametrize(
    ("eps", "dtype"),
    [(HUB_EPS, torch.float32), (1e-6, torch.float32), (1e-5, torch.float32), (1e-5, torch.bfloat16)],
)
def test_fused_linear_ln_prologue_per_row(eps, dtype, device):
    g = torch.Generator().manual_seed(1)
    x = low_variance_rows(3, WIDTH, eps).to(device, dtype)
    weight = (torch.randn(40, WIDTH, generator=g) * WIDTH**-0.5).to(device, dtype)
    bias = (torch.randn(40, generator=g) * 0.1).to(device, dtype)
    ln_w = (1 + 0.2 * torch.randn(WIDTH, generator=g)).to(device, dtype)
    ln_b = (0.1 * torch.randn(WIDTH, generator=g)).to(device, dtype)
    mean, rstd = layer_norm_stats(x, eps)
    out = fused_linear(x, weight, bias, ln=(mean, rstd, ln_w, ln_b), activation="gelu")
    eager = F.gelu(F.linear(F.layer_norm(x, (WIDTH,), ln_w, ln_b, eps), weight, bias))
    x64 = x.double()
    ref = linear_reference(
        x64, weight.double(), bias.double(), ln=(*reference_layer_norm_stats(x64, eps), ln_w.double(), ln_b.double()),
        activation="gelu",
    )  # fmt: skip
    assert_rows_close(out, eager, ref, dtype, f"fused_linear LN prologue eps={eps}")


@pytest.mark.parametrize(
    ("eps", "dtype"),
    [(HUB_EPS, torch.float32), (1e-6, torch.float32), (1e-5, torch.float16), (1e-5, torch.bfloat16)],
)
def test_layer_norm_mlp_per_row(eps, dtype, device):
    g = torch.Generator().manual_seed(2)
    hidden = 80
    x = low_variance_rows(3, WIDTH, eps).to(device, dtype)
    ln_w = (1 + 0.2 * torch.randn(WIDTH, generator=g)).to(device, dtype)
    ln_b = (0.1 * torch.randn(WIDTH, generator=g)).to(device, dtype)
    fc1_w = (torch.randn(hidden, WIDTH, generator=g) * WIDTH**-0.5).to(device, dtype)
    fc1_b = (0.1 * torch.randn(hidden, generator=g)).to(device, dtype)
    fc2_w = (torch.randn(WIDTH, hidden, generator=g) * hidden**-0.5).to(device, dtype)
    fc2_b = (0.1 * torch.randn(WIDTH, generator=g)).to(device, dtype)
    params = (ln_w, ln_b, fc1_w, fc1_b, fc2_w, fc2_b)
    with torch.no_grad():
        out = layer_norm_mlp(x, *params, eps)
    eager = F.linear(F.gelu(F.linear(F.layer_norm(x, (WIDTH,), ln_w, ln_b, eps), fc1_w, fc1_b)), fc2_w, fc2_b) + x
    ref = mlp_reference(x.double(), *(p.double() for p in params), eps)
    assert_rows_close(out, eager, ref, dtype, f"layer_norm_mlp eps={eps}")


# ---------------------------------------------------------------------------------------------
# The model's layer_norm_eps: our encoder (reference and patched) against transformers' on
# low-variance hidden states. Each LayerNorm is made to see those rows and to decide the output:
#   "before": ordinary weights — layernorm_before of layer 0 normalises the input rows;
#   "after":  attention output projection zeroed, so h = x and layernorm_after normalises x;
#   "final":  both output projections zeroed, so the encoder returns x and vit.layernorm normalises it.
# ---------------------------------------------------------------------------------------------
def _model_pair(layer_norm_eps: float, block: str):
    config = tiny_config(hidden_size=64, num_attention_heads=2, num_hidden_layers=1, layer_norm_eps=layer_norm_eps)
    hf_model = build_hf_model(config, "eager")
    with torch.no_grad():
        for layer in hf_model.vit.encoder.layer:
            if block in ("after", "final"):
                layer.attention.output.dense.weight.zero_()
                layer.attention.output.dense.bias.zero_()
            if block == "final":
                layer.output.dense.weight.zero_()
                layer.output.dense.bias.zero_()
    ours = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(config)).eval()
    ours.load_state_dict(hf_model.state_dict())
    return ours, hf_model


def _encode(model, hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        sequence = model.vit.encoder(hidden)[0]
        return model.vit.layernorm(sequence)


@pytest.mark.parametrize("layer_norm_eps", [HUB_EPS, 1e-6])
@pytest.mark.parametrize("block", ["before", "after", "final"])
@pytest.mark.parametrize("kernels", ["eager", "triton"])
def test_model_layer_norm_eps_per_token(layer_norm_eps, block, kernels, device):
    ours, hf_model = _model_pair(layer_norm_eps, block)
    hidden = low_variance_rows(2, 64, layer_norm_eps, seed=3).reshape(2, 5, 64).to(device)
    ours, hf_model = vf.patch(ours.to(device), kernels), hf_model.to(device)
    assert all(m.eps == layer_norm_eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm))
    out = _encode(ours, hidden)
    torch_out = _encode(hf_model, hidden)
    ref = _encode(copy.deepcopy(hf_model).double(), hidden.double())
    assert_rows_close(out, torch_out, ref, torch.float32, f"{kernels} model, {block}, eps={layer_norm_eps}")
