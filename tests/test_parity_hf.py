"""Our reference model vs transformers 4.47.1, through save_pretrained → vithybrid_fast.load.

Logits and every hidden state must agree in float32 to 1e-4, for eager and SDPA attention, for
safetensors and .bin checkpoints, for small odd-sized configs and the full 384² base config.
"""

from __future__ import annotations

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import TINY_CASES, build_hf_model

TOL = 1e-4


def assert_outputs_match(ours, theirs, what: str) -> None:
    diff = (ours.logits - theirs.logits).abs().max().item()
    assert diff <= TOL, f"{what}: logits differ by {diff:.3e}"
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    for i, (a, b) in enumerate(zip(ours.hidden_states, theirs.hidden_states)):
        diff = (a - b).abs().max().item()
        assert diff <= TOL, f"{what}: hidden state {i} differs by {diff:.3e}"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", sorted(TINY_CASES))
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_tiny_configs_match_transformers(tmp_path, case, attn, safe_serialization):
    config = TINY_CASES[case]
    hf_model = build_hf_model(config, attn)
    hf_model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    expected_file = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    assert (tmp_path / expected_file).is_file()

    model = vf.load(tmp_path, kernels=attn)
    assert isinstance(model, vf.ViTHybridForImageClassification)
    height, width = model.config.image_size_hw
    pixels = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = hf_model(pixels, output_hidden_states=True)
        ours = model(pixels, output_hidden_states=True)
    assert ours.logits.shape == (2, len(config["id2label"]))
    assert_outputs_match(ours, theirs, f"{case}/{attn}")


def test_attentions_match_transformers_eager(tmp_path):
    hf_model = build_hf_model(TINY_CASES["bottleneck-same"], "eager")
    hf_model.save_pretrained(tmp_path)
    model = vf.load(tmp_path, kernels="sdpa")  # sdpa asked for probabilities computes them exactly
    pixels = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        theirs = hf_model(pixels, output_attentions=True)
        ours = model(pixels, output_attentions=True)
    assert len(ours.attentions) == 2
    for a, b in zip(ours.attentions, theirs.attentions):
        assert a.shape == (1, 3, 26, 26)
        assert (a - b).abs().max().item() <= TOL


def test_head_mask_matches_transformers_eager(tmp_path):
    hf_model = build_hf_model(TINY_CASES["bottleneck-same"], "eager")
    hf_model.save_pretrained(tmp_path)
    model = vf.load(tmp_path, kernels="eager")
    head_mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.5]])
    pixels = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        theirs = hf_model(pixels, head_mask=head_mask).logits
        ours = model(pixels, head_mask=head_mask).logits
        unmasked = model(pixels).logits
    assert (ours - theirs).abs().max().item() <= TOL
    assert (ours - unmasked).abs().max().item() > 1e-3  # the mask really changed something


def test_base_model_without_head_matches_transformers(tmp_path):
    from transformers import ViTHybridConfig, ViTHybridModel

    from tests.hf_reference import randomize_, tiny_config

    torch.manual_seed(0)
    hf_model = ViTHybridModel(ViTHybridConfig(**tiny_config())).eval()  # with pooler
    randomize_(hf_model)
    hf_model.save_pretrained(tmp_path)
    model = vf.load(tmp_path, kernels="eager")
    assert isinstance(model, vf.ViTHybridModel) and model.pooler is not None
    pixels = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        theirs, ours = hf_model(pixels), model(pixels)
    assert (ours.last_hidden_state - theirs.last_hidden_state).abs().max().item() <= TOL
    assert (ours.pooler_output - theirs.pooler_output).abs().max().item() <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_base_384_config_matches_transformers(tmp_path_factory, attn):
    """The hub architecture itself (random weights): 384², BiT [3, 4, 9], ViT-Base, 1000 classes."""
    tmp_path = tmp_path_factory.mktemp(f"base-{attn}")
    config = vf.ViTHybridConfig.base_384().to_dict()
    hf_model = build_hf_model(config, attn)
    hf_model.save_pretrained(tmp_path)
    model = vf.load(tmp_path, kernels=attn)
    assert model.config.num_labels == 1000
    assert model.config.id2label[281] == "tabby, tabby cat"
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = hf_model(pixels, output_hidden_states=True)
        ours = model(pixels, output_hidden_states=True)
    assert ours.hidden_states[0].shape == (1, 577, 768)
    assert_outputs_match(ours, theirs, f"base-384/{attn}")
