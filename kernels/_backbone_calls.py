"""The backbone kernel calls of the base checkpoint, traced once on the meta device (no data, no GPU).

`group_norm_calls()` lists every GroupNorm a forward of google/vit-hybrid-base-bit-384 makes, as the
patched model calls `group_norm_act` (a bottleneck's norm3 is fused with the shortcut add and ReLU);
`conv_weight_shapes()` lists the weight of every weight-standardized conv that runs. Both feed the
kernels' `offline_launches` (compile checks, warm-up) and the launch-count tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

IMAGE_SIZE = 384


@dataclass(frozen=True)
class GroupNormCall:
    channels: int
    spatial: tuple[int, ...]  # (H, W) of one image
    num_groups: int
    residual: bool  # the bottleneck tail: relu(norm3(x) + shortcut)
    relu: bool

    @property
    def s(self) -> int:
        return int(torch.Size(self.spatial).numel())


@functools.lru_cache(maxsize=4)
def _trace(image_size: int) -> tuple[tuple[GroupNormCall, ...], tuple[tuple[int, ...], ...]]:
    from ..backbone import BitBackbone, BitBottleneckLayer, BitGroupNormActivation, WeightStandardizedConv2d
    from ..config import ViTHybridConfig

    config = ViTHybridConfig.base_384().backbone_config
    with torch.device("meta"):
        backbone = BitBackbone(config)
    tails = {id(m.norm3) for m in backbone.modules() if isinstance(m, BitBottleneckLayer)}
    norms: list[GroupNormCall] = []
    convs: list[tuple[int, ...]] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, WeightStandardizedConv2d):
            convs.append(tuple(module.weight.shape))
            return
        tail = id(module) in tails
        relu = tail or isinstance(module.activation, torch.nn.ReLU)
        norms.append(GroupNormCall(args[0].shape[1], tuple(args[0].shape[2:]), module.num_groups, tail, relu))

    for module in backbone.modules():
        if isinstance(module, (BitGroupNormActivation, WeightStandardizedConv2d)):
            module.register_forward_pre_hook(record)
    with torch.no_grad():
        backbone(torch.empty(1, config.num_channels, image_size, image_size, device="meta"))
    return tuple(norms), tuple(convs)


def group_norm_calls(image_size: int = IMAGE_SIZE) -> tuple[GroupNormCall, ...]:
    """Every group_norm_act call of one forward, in order (per image: batch them yourself)."""
    return _trace(image_size)[0]


def conv_weight_shapes(image_size: int = IMAGE_SIZE) -> tuple[tuple[int, ...], ...]:
    """The weight shape of every weight-standardized conv that runs, in order."""
    return _trace(image_size)[1]
