"""Build transformers 4.47.1 ViTHybrid models (the reference) from our config dicts.

Small configs use odd sizes on purpose: a 5×5 feature grid, 3 heads of 16, channel counts that
are not powers of two, so shape bugs cannot hide behind square, aligned sizes.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")


def tiny_config(**overrides) -> dict:
    """72² input → BiT stem 18² → stages 18², 9², 5² → 5×5 tokens of width 48."""
    config = {
        "model_type": "vit-hybrid",
        "image_size": 72,
        "hidden_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "intermediate_size": 80,
        "backbone_featmap_shape": [1, 96, 5, 5],
        "layer_norm_eps": 1e-12,
        "id2label": {str(i): f"class_{i}" for i in range(7)},
        "backbone_config": {
            "model_type": "bit",
            "embedding_size": 16,
            "hidden_sizes": [32, 64, 96],
            "depths": [1, 2, 1],
            "num_groups": 8,
            "layer_type": "bottleneck",
            "global_padding": "SAME",
            "embedding_dynamic_padding": True,
            "out_features": ["stage3"],
        },
    }
    backbone = overrides.pop("backbone_config", {})
    config.update(overrides)
    config["backbone_config"] = {**config["backbone_config"], **backbone}
    return copy.deepcopy(config)


# Each case exercises another branch of the architecture (name → config dict).
TINY_CASES = {
    "bottleneck-same": tiny_config(),
    # pre-activation blocks, static symmetric padding, stem ConstantPad2d + un-padded max-pool
    "preact-static-pad": tiny_config(
        image_size=64, backbone_featmap_shape=[1, 96, 4, 4],
        backbone_config={"layer_type": "preactivation", "global_padding": None, "embedding_dynamic_padding": False},
    ),
    # output_stride 8: stage3 is dilated instead of strided; tanh GELU; no qkv bias; patch 3 on a 9×9 map
    "dilated-gelu_new-patch3": tiny_config(
        image_size=70, hidden_act="gelu_new", qkv_bias=False, patch_size=3,
        backbone_featmap_shape=[1, 96, 9, 9], backbone_config={"output_stride": 8},
    ),
    # features from stage2 (stage3 weights exist but are unused), non-square image
    "stage2-nonsquare": tiny_config(
        image_size=[72, 56], backbone_featmap_shape=[1, 64, 9, 7], backbone_config={"out_features": ["stage2"]},
    ),
}  # fmt: skip


def build_hf_model(config: dict, attn_implementation: str = "eager", seed: int = 0):
    """A transformers ViTHybridForImageClassification with random, non-trivial weights."""
    from transformers import ViTHybridConfig, ViTHybridForImageClassification

    torch.manual_seed(seed)
    hf_config = ViTHybridConfig(**copy.deepcopy(config), attn_implementation=attn_implementation)
    model = ViTHybridForImageClassification(hf_config).eval()
    randomize_(model)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module) -> None:
    """Norm affines away from 1/0 and visible biases, so every parameter matters to the output."""
    for name, param in model.named_parameters():
        if param.ndim == 1 and name.endswith("weight"):
            param.copy_(1 + 0.2 * torch.randn_like(param))
        elif param.ndim == 1:
            param.copy_(0.1 * torch.randn_like(param))
        elif "embeddings" in name and param.ndim == 3:
            param.copy_(0.5 * torch.randn_like(param))
        else:
            param.copy_(torch.randn_like(param) / param[0].numel() ** 0.5)
