"""Training-mode branches of the patched model against the reference in training mode (issue 14, blind spot 5).

The fast modules fall back to reference code where a kernel cannot serve a call: attention dropout
(FastSelfAttention runs eager attention), hidden dropout (FastViTLayer adds the residual itself
after the output dropout, or runs the reference MLP), drop_path and a non-ReLU backbone activation
(FastBottleneckLayer runs the reference tail, FastGroupNormActivation applies the activation after the
kernel), and a tanh-GELU ViT MLP. None of these ran in a test before: one could drop a residual or
a dropout silently. Each case here runs one training step of the patched model and of the reference
(ours, and a transformers 4.47.1 instance) from the same RNG seed — every fallback draws its dropout
and drop_path masks in the reference's order, so the masks are identical — and compares loss, logits
and every parameter gradient. A second seed must change the logits, so the randomness is really on.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import build_hf_model, tiny_config
from vithybrid_fast import fast
from vithybrid_fast.patching import patched_modules

OUT_TOL = 1e-4  # float32 logits/loss, as tests/test_patching.py
GRAD_RTOL, GRAD_ATOL = 1e-3, 1e-5

# head size 32 for the flash kernel. Each case switches on other training-only branches and patches the
# families whose fast modules have them (the backbone kernels' backward is the slow part in the interpreter).
VIT = {"attention": "triton", "mlp": "triton"}
BACKBONE = {"backbone": "triton"}


def backbone_config(**backbone) -> dict:
    """Two one-block stages on a 32² input (features 64×4×4): every kernel backward runs in the
    interpreter here, one launch per conv and norm, so the backbone is kept to 9 convs."""
    return tiny_config(
        hidden_size=64, num_attention_heads=2, image_size=32, backbone_featmap_shape=[1, 64, 4, 4],
        backbone_config={"depths": [1, 1], "hidden_sizes": [32, 64], "out_features": ["stage2"], **backbone},
    )  # fmt: skip


CASES = {
    # FastViTLayer: output dropout after the out-projection (+ residual), reference MLP with dropout
    "hidden-dropout": (tiny_config(hidden_size=64, num_attention_heads=2, hidden_dropout_prob=0.2), VIT),
    # FastSelfAttention: eager attention with dropout on the probabilities
    "attention-dropout": (
        tiny_config(hidden_size=64, num_attention_heads=2, attention_probs_dropout_prob=0.2), VIT
    ),
    # both dropouts and a tanh-GELU MLP (the reference MLP path under the fast layer)
    "dropouts+gelu_new": (
        tiny_config(
            hidden_size=64, num_attention_heads=2, hidden_act="gelu_new", hidden_dropout_prob=0.1,
            attention_probs_dropout_prob=0.1,
        ),
        VIT,
    ),
    # stochastic depth in every bottleneck: FastBottleneckLayer's reference tail
    "drop-path": (backbone_config(drop_path_rate=0.5), BACKBONE),
    # SiLU backbone: activation after the GroupNorm kernel, reference bottleneck tail; with drop_path
    "silu-backbone+drop-path": (backbone_config(hidden_act="silu", drop_path_rate=0.3), BACKBONE),
}  # fmt: skip
# transformers' modules, for one case per half (the SiLU backbone on transformers: the eval test below)
TRANSFORMERS_CASES = ["dropouts+gelu_new", "drop-path"]
OURS_CASES = [case for case in CASES if case != "drop-path"]


def _pixels(config: dict, batch: int = 2) -> torch.Tensor:
    size = config["image_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def _models(case: str, source: str, device: str):
    """(reference, patched) in training mode, same weights; the reference uses eager attention."""
    config, kernels = CASES[case]
    hf_model = build_hf_model(config, "eager")
    if source == "transformers":
        reference = hf_model
    else:
        reference = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(config))
        reference.load_state_dict(hf_model.state_dict())
        reference.set_attn_implementation("eager")  # SDPA would draw its dropout mask differently
    reference = reference.to(device).train()
    patched = vf.patch(copy.deepcopy(reference), kernels).train()
    return reference, patched


def _step(model, pixels: torch.Tensor, labels: torch.Tensor, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(pixels, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


def _assert_step_matches(got, want, what: str) -> None:
    logits, loss, grads = got
    ref_logits, ref_loss, ref_grads = want
    diff = (logits - ref_logits).abs().max().item()
    assert diff <= OUT_TOL, f"{what}: logits differ by {diff:.3e}"
    assert abs(loss.item() - ref_loss.item()) <= OUT_TOL, f"{what}: loss {loss.item()} vs {ref_loss.item()}"
    assert grads.keys() == ref_grads.keys(), f"{what}: gradients reach {set(grads) ^ set(ref_grads)} differently"
    for name, ref_grad in ref_grads.items():
        scale = ref_grad.abs().max().item()
        diff = (grads[name] - ref_grad).abs().max().item()
        assert diff <= GRAD_RTOL * scale + GRAD_ATOL, (
            f"{what}: {name} gradient differs by {diff:.3e} (scale {scale:.3e})"
        )


@pytest.mark.parametrize(
    ("case", "source"), [(c, "ours") for c in OURS_CASES] + [(c, "transformers") for c in TRANSFORMERS_CASES]
)
def test_training_step_matches_reference(case, source, device):
    reference, patched = _models(case, source, device)
    assert patched_modules(patched), "nothing was patched"
    pixels, labels = _pixels(CASES[case][0]).to(device), torch.tensor([1, 4], device=device)
    want = _step(reference, pixels, labels, seed=0)
    got = _step(patched, pixels, labels, seed=0)
    _assert_step_matches(got, want, f"{case}/{source}")
    # the randomness is really on: another seed draws other masks and other logits, so the match above
    # needed the patched model to draw the reference's masks in the reference's order
    other_seed_logits = _step(reference, pixels, labels, seed=1)[0]
    assert (other_seed_logits - want[0]).abs().max().item() > 1e-3, "dropout/drop_path had no effect"


def test_attention_family_alone_with_attention_dropout(device):
    """Only FastSelfAttention swapped in: the reference ViT layer around it, attention dropout on."""
    reference, _ = _models("attention-dropout", "ours", device)
    patched = vf.patch(copy.deepcopy(reference), {"attention": "triton"}).train()
    assert {kind for _, kind in patched_modules(patched)} == {"FastSelfAttention"}
    pixels, labels = _pixels(CASES["attention-dropout"][0]).to(device), torch.tensor([0, 6], device=device)
    _assert_step_matches(_step(patched, pixels, labels, 3), _step(reference, pixels, labels, 3), "attention only")


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_non_relu_backbone_activation_in_eval(act, device):
    """Inference with a non-ReLU backbone: GroupNorm kernel without its fused ReLU, activation after it."""
    config = backbone_config(hidden_act=act)
    hf_model = build_hf_model(config, "eager").to(device)
    patched = vf.patch(copy.deepcopy(hf_model), {"backbone": "triton"})
    norms = [m for m in patched.modules() if isinstance(m, fast.FastGroupNormActivation)]
    assert norms and all(m.fused_act is None for m in norms)
    pixels = _pixels(config).to(device)
    with torch.no_grad():
        want = hf_model(pixels, output_hidden_states=True)
        got = patched(pixels, output_hidden_states=True)
    assert (got.logits - want.logits).abs().max().item() <= OUT_TOL
    diff = (got.hidden_states[0] - want.hidden_states[0]).abs().max().item()
    assert diff <= OUT_TOL, f"backbone output (embeddings) differs by {diff:.3e}"
