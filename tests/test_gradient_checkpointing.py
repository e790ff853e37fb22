"""Gradient checkpointing (`model.gradient_checkpointing_enable()`, transformers' API): the same loss and
gradients as without it, dropout and drop_path masks included (the checkpoint replays the RNG), with
fewer activations kept for the backward pass; plain PyTorch, SDPA and our Triton modules alike, in our
model and in a patched transformers 4.47.1 instance."""

from __future__ import annotations

import copy

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import build_hf_model
from tests.test_training_mode import backbone_config

LAYERS = 2 + 2  # backbone_config(): two encoder layers, two one-block stages


def model_of(config: dict, device: str) -> vf.ViTHybridForImageClassification:
    torch.manual_seed(0)
    return vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(config)).to(device).train()


def step(model: torch.nn.Module, device: str) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """(loss, every parameter's gradient, bytes autograd kept for the backward pass) of one training step."""
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)).to(device)
    labels = torch.tensor([0, 3, 6], device=device)
    model.zero_grad(set_to_none=True)
    kept = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    torch.manual_seed(5)  # the same dropout and drop_path masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):  # outside the checkpoints only
        loss = model(pixels, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(kept)


CASES = {
    "eager, dropout + drop_path": ({**backbone_config(drop_path_rate=0.3), "hidden_dropout_prob": 0.2}, "eager"),
    "sdpa": (backbone_config(), "sdpa"),
    "triton": (backbone_config(), "triton"),  # the fused layer, flash attention and backbone kernels
}


@pytest.mark.parametrize("case", CASES)
def test_checkpointed_steps_match_and_keep_less(case, device):
    config, kernels = CASES[case]
    model = vf.patch(model_of(config, device), kernels)
    loss, grads, kept = step(model, device)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss_ckpt, grads_ckpt, kept_ckpt = step(model, device)
    assert torch.equal(loss_ckpt, loss)
    assert grads_ckpt.keys() == grads.keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():  # recomputation repeats the same arithmetic; atomics may reorder on a GPU
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert kept_ckpt < kept / 2, (kept_ckpt, kept)


def test_only_training_with_autograd_recomputes(device):
    model = model_of(backbone_config(), device)
    model.gradient_checkpointing_enable()
    calls = []
    for owner in model.modules():
        if getattr(owner, "gradient_checkpointing", False):
            real = owner._gradient_checkpointing_func
            owner._gradient_checkpointing_func = lambda *args, real=real: calls.append(1) or real(*args)
    pixels = torch.randn(1, 3, 32, 32, device=device)
    model(pixels)
    assert len(calls) == LAYERS
    with torch.no_grad():
        model(pixels)
    model.eval()
    model(pixels)
    assert len(calls) == LAYERS  # evaluation and no_grad run the layers directly


def test_the_transformers_api():
    model = vf.ViTHybridModel(vf.ViTHybridConfig.from_dict(backbone_config()))  # headless too
    assert model.supports_gradient_checkpointing and not model.is_gradient_checkpointing
    model.gradient_checkpointing_enable({"use_reentrant": True, "preserve_rng_state": False})
    owners = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    assert len(owners) == 1 + 2  # the encoder and each backbone stage
    asked = {"use_reentrant": True, "preserve_rng_state": False}
    assert model.encoder._gradient_checkpointing_func.keywords == asked  # transformers' layers: as asked
    stages = model.embeddings.patch_embeddings.backbone.bit.encoder.stages
    assert all(s._gradient_checkpointing_func.keywords == {**asked, "use_reentrant": False} for s in stages)
    model.gradient_checkpointing_enable()
    assert model.encoder._gradient_checkpointing_func.keywords == {"use_reentrant": False}  # torch's advice
    assert copy.deepcopy(model).is_gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs must be a dict"):
        model.gradient_checkpointing_enable(True)
    assert model.state_dict().keys() == vf.ViTHybridModel(model.config).state_dict().keys()


def test_a_patched_transformers_model_checkpoints_through_our_layers(device):
    """transformers' encoder calls each layer through its checkpoint function with (hidden_states,
    head_mask, output_attentions): our fused layer must take that call and give the same gradients."""
    pytest.importorskip("transformers")
    model = build_hf_model(backbone_config()).to(device).train()
    vf.patch(model, {"attention": "triton", "mlp": "triton"})
    loss, grads, _ = step(model, device)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, grads_ckpt, _ = step(model, device)
    assert model.vit.encoder.gradient_checkpointing
    assert torch.equal(loss_ckpt, loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_reentrant_checkpointing_after_a_frozen_stem_still_trains_the_backbone(device):
    """Asked for the reentrant variant (copied from transformers examples, or for DDP), a frozen stem gave the
    first stage layer an input without gradient: that layer and every one after it got none, silently."""
    model = model_of(backbone_config(), device)
    model.vit.embeddings.patch_embeddings.backbone.bit.embedder.requires_grad_(False)
    _, grads, _ = step(model, device)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    _, grads_ckpt, _ = step(model, device)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n in trainable if grads_ckpt[n] is None] == []
    for name in trainable:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
