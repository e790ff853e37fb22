"""The BiT ResNet backbone in plain PyTorch, with transformers' module names (state-dict keys).

Shapes for the hub checkpoint at 384²: stem conv 7×7/2 → (B, 64, 192, 192) → GN+ReLU → max-pool 3×3/2 →
(B, 64, 96, 96); stage1 (3 bottlenecks) → (B, 256, 96, 96); stage2 (4) → (B, 512, 48, 48);
stage3 (9) → (B, 1024, 24, 24), the feature map the ViT encoder consumes.
Every conv is weight-standardized (per output channel, biased variance, eps 1e-8) and every norm is
GroupNorm(32, eps 1e-5). "SAME" padding is dynamic: total = max((ceil(x/s)−1)·s + (k−1)·d + 1 − x, 0),
left/top gets total // 2 (asymmetric for stride 2 on even sizes).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .activations import get_activation
from .checkpointing import call_layer
from .config import BitConfig, make_div
from .weight_cache import DerivedWeightCache


def same_padding_total(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class DynamicPad2d(nn.Module):
    """TensorFlow-style SAME padding computed from the input size at every call."""

    def __init__(self, kernel_size: int, stride: int, dilation: int, value: float = 0.0) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.dilation, self.value = kernel_size, stride, dilation, value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = same_padding_total(x.shape[-2], self.kernel_size, self.stride, self.dilation)
        pad_w = same_padding_total(x.shape[-1], self.kernel_size, self.stride, self.dilation)
        if pad_h > 0 or pad_w > 0:
            x = nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=self.value)
        return x


def padding_for(padding: str | None, kernel_size: int, stride: int, dilation: int) -> tuple[int, bool]:
    """(static padding, needs dynamic SAME padding) — transformers' get_padding_value."""
    symmetric = ((stride - 1) + dilation * (kernel_size - 1)) // 2
    if padding is None:
        return symmetric, False
    padding = padding.lower()
    if padding == "same":
        if stride == 1 and (dilation * (kernel_size - 1)) % 2 == 0:
            return symmetric, False
        return 0, True
    if padding == "valid":
        return 0, False
    return symmetric, False


def standardize_weight_reference(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """(w − mean) / sqrt(biased var + eps) per output channel, as transformers computes it."""
    flat = weight.reshape(1, weight.shape[0], -1)
    return nn.functional.batch_norm(flat, None, None, training=True, momentum=0.0, eps=eps).reshape_as(weight)


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose weight is standardized per output channel before every convolution."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: str | None = "SAME",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
    ) -> None:
        static, dynamic = padding_for(padding, kernel_size, stride, dilation)
        super().__init__(in_channels, out_channels, kernel_size, stride, static, dilation, groups, bias)
        self.pad = DynamicPad2d(kernel_size, stride, dilation) if dynamic else None
        self.eps = eps
        self._standardized = DerivedWeightCache()

    def standardized_weight(self) -> torch.Tensor:
        # derived afresh every call; held only while the model is frozen (weight_cache.freeze)
        return self._standardized.get(lambda: standardize_weight_reference(self.weight, self.eps), self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        return nn.functional.conv2d(
            x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class BitGroupNormActivation(nn.GroupNorm):
    """GroupNorm followed by the backbone activation (or identity)."""

    def __init__(self, config: BitConfig, num_channels: int, eps: float = 1e-5, apply_activation: bool = True):
        super().__init__(config.num_groups, num_channels, eps=eps, affine=True)
        self.activation = get_activation(config.hidden_act) if apply_activation else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.activation(x)


class BitMaxPool2d(nn.MaxPool2d):
    """Max-pool after TensorFlow-style SAME zero padding (dynamic) or none.

    `nonnegative_input` (set by the stem when a ReLU precedes the pool) skips the padded copy: on values
    ≥ 0 a zero pad never wins a max, so zero padding equals the implicit −∞ padding of max_pool2d, and
    SAME padding with k = 3, s = 2 is either symmetric (odd sizes) or one extra column/row on the right
    (even sizes: ceil_mode). Same values, without the padded copy: at batch 64 in bf16 that of the
    64×192×192 stem output is the largest of the model's four SAME-pad copies (fill + copy ≈ 0.9 GB of
    traffic; the four took 1.0 ms of a 33 ms forward in the H100 profile).
    """

    def __init__(self, kernel_size: int, stride: int, use_dynamic_padding: bool = True) -> None:
        super().__init__((kernel_size, kernel_size), (stride, stride), (0, 0), (1, 1), False)
        self.pad = DynamicPad2d(kernel_size, stride, 1, 0.0) if use_dynamic_padding else nn.Identity()
        self.nonnegative_input = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nonnegative_input and isinstance(self.pad, DynamicPad2d):
            padding = implicit_same_padding(x, self.pad.kernel_size, self.pad.stride)
            if padding is not None:
                return nn.functional.max_pool2d(x, self.kernel_size, self.stride, padding, self.dilation, True)
        x = self.pad(x)
        return nn.functional.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)


def implicit_same_padding(x: torch.Tensor, kernel: int, stride: int) -> tuple[int, int] | None:
    """max_pool2d's symmetric padding (+ ceil_mode) that gives SAME padding's windows over x's last two dims,
    or None where none does. Only equal to a zero-padded pool on inputs ≥ 0 (see BitMaxPool2d)."""
    padding = []
    for size in x.shape[-2:]:
        left = same_padding_total(size, kernel, stride, 1) // 2
        # max_pool2d pads symmetrically (at most half the kernel); ceil_mode adds the one extra right window
        # that an odd total needs — and only that: the output size must be SAME's ceil(size / stride)
        if left > kernel // 2:
            return None
        out = -(-(size + 2 * left - kernel) // stride) + 1
        if (out - 1) * stride >= size + left:
            out -= 1
        if out != -(-size // stride):
            return None
        padding.append(left)
    return padding[0], padding[1]


class BitEmbeddings(nn.Module):
    """The stem: one 7×7/2 conv, (GN+act unless pre-activation), 3×3/2 max-pool."""

    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.convolution = WeightStandardizedConv2d(
            config.num_channels, config.embedding_size, 7, stride=2, eps=1e-8, padding=config.global_padding
        )
        self.pooler = BitMaxPool2d(3, 2, use_dynamic_padding=config.embedding_dynamic_padding)
        same = config.global_padding is not None and config.global_padding.upper() == "SAME"
        self.pad = nn.Identity() if same else nn.ConstantPad2d((1, 1, 1, 1), 0.0)
        is_preact = config.layer_type == "preactivation"
        self.norm = nn.Identity() if is_preact else BitGroupNormActivation(config, config.embedding_size)
        # a ReLU's output is ≥ 0 (or NaN): the pool can skip its padded copy (BitMaxPool2d)
        self.pooler.nonnegative_input = not is_preact and config.hidden_act == "relu"
        self.num_channels = config.num_channels

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; the backbone expects {self.num_channels}"
            )
        return self.pooler(self.norm(self.pad(self.convolution(pixel_values))))


class BitDropPath(nn.Module):
    """Stochastic depth per sample (training only)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = (keep + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * mask


class BitDownsampleConv(nn.Module):
    def __init__(self, config: BitConfig, in_channels: int, out_channels: int, stride: int, preact: bool):
        super().__init__()
        self.conv = WeightStandardizedConv2d(
            in_channels, out_channels, 1, stride=stride, eps=1e-8, padding=config.global_padding
        )
        self.norm = nn.Identity() if preact else BitGroupNormActivation(config, out_channels, apply_activation=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class BitBottleneckLayer(nn.Module):
    """Post-activation bottleneck (the hub checkpoint's): conv-GN-act ×2, conv-GN, + shortcut, act."""

    def __init__(self, config: BitConfig, in_channels: int, out_channels: int, stride: int, first_dilation: int,
                 drop_path_rate: float, is_first_layer: bool) -> None:  # fmt: skip
        super().__init__()
        mid = make_div(out_channels * 0.25)
        pad = config.global_padding
        self.downsample = (
            BitDownsampleConv(config, in_channels, out_channels, stride, preact=False) if is_first_layer else None
        )
        self.conv1 = WeightStandardizedConv2d(in_channels, mid, 1, eps=1e-8, padding=pad)
        self.norm1 = BitGroupNormActivation(config, mid)
        self.conv2 = WeightStandardizedConv2d(mid, mid, 3, stride=stride, dilation=first_dilation, eps=1e-8,
                                              padding=pad)  # fmt: skip
        self.norm2 = BitGroupNormActivation(config, mid)
        self.conv3 = WeightStandardizedConv2d(mid, out_channels, 1, eps=1e-8, padding=pad)
        self.norm3 = BitGroupNormActivation(config, out_channels, apply_activation=False)
        self.drop_path = BitDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()
        self.activation = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.drop_path(self.norm3(self.conv3(x)))
        return self.activation(x + shortcut)


class BitPreActivationBottleneckLayer(nn.Module):
    """Pre-activation bottleneck (ResNet v2): GN-act before each conv, identity-ish shortcut."""

    def __init__(self, config: BitConfig, in_channels: int, out_channels: int, stride: int, first_dilation: int,
                 drop_path_rate: float, is_first_layer: bool) -> None:  # fmt: skip
        super().__init__()
        mid = make_div(out_channels * 0.25)
        pad = config.global_padding
        self.downsample = (
            BitDownsampleConv(config, in_channels, out_channels, stride, preact=True) if is_first_layer else None
        )
        self.norm1 = BitGroupNormActivation(config, in_channels)
        self.conv1 = WeightStandardizedConv2d(in_channels, mid, 1, eps=1e-8, padding=pad)
        self.norm2 = BitGroupNormActivation(config, mid)
        # transformers builds this conv without dilation; kept so that checkpoints behave the same
        self.conv2 = WeightStandardizedConv2d(mid, mid, 3, stride=stride, eps=1e-8, padding=pad)
        self.norm3 = BitGroupNormActivation(config, mid)
        self.conv3 = WeightStandardizedConv2d(mid, out_channels, 1, eps=1e-8, padding=pad)
        self.drop_path = BitDropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.norm1(x)
        shortcut = x if self.downsample is None else self.downsample(preact)
        x = self.conv1(preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        return self.drop_path(x) + shortcut


class BitStage(nn.Module):
    def __init__(self, config: BitConfig, in_channels: int, out_channels: int, stride: int, dilation: int,
                 depth: int, drop_path_rates: list[float]) -> None:  # fmt: skip
        super().__init__()
        first_dilation = 1 if dilation in (1, 2) else 2
        layer_cls = BitBottleneckLayer if config.layer_type == "bottleneck" else BitPreActivationBottleneckLayer
        self.layers = nn.Sequential()
        for idx in range(depth):
            self.layers.add_module(str(idx), layer_cls(
                config, in_channels, out_channels, stride=stride if idx == 0 else 1,
                first_dilation=first_dilation, drop_path_rate=drop_path_rates[idx], is_first_layer=idx == 0,
            ))  # fmt: skip
            in_channels, first_dilation = out_channels, dilation
        self.gradient_checkpointing = False  # see vithybrid_fast.checkpointing
        self._gradient_checkpointing_func = None

    # transformers checkpoints no backbone layer; ours never reentrant, whatever is asked (checkpointing.py)
    reentrant_checkpoint = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = call_layer(self, layer, x)
        return x


class BitEncoder(nn.Module):
    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        rates = np.linspace(0, config.drop_path_rate, sum(config.depths)).tolist()
        in_channels, start = config.embedding_size, 0
        for depth, (out_channels, stride, dilation) in zip(config.depths, config.stage_plan()):
            stage_rates = rates[start : start + depth]
            self.stages.append(BitStage(config, in_channels, out_channels, stride, dilation, depth, stage_rates))
            in_channels, start = out_channels, start + depth


class BitModel(nn.Module):
    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.config = config
        self.embedder = BitEmbeddings(config)
        self.encoder = BitEncoder(config)
        # transformers keeps this final norm (pre-activation only) in the state dict although the
        # hybrid model reads the stage outputs before it; we keep the weights and skip the compute.
        self.norm = (
            BitGroupNormActivation(config, config.hidden_sizes[-1])
            if config.layer_type == "preactivation"
            else nn.Identity()
        )


class BitBackbone(nn.Module):
    """Runs the stem and the stages up to the last requested one; returns the requested maps."""

    def __init__(self, config: BitConfig) -> None:
        super().__init__()
        self.config = config
        self.bit = BitModel(config)

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        wanted = self.config.out_indices
        x = self.bit.embedder(pixel_values)
        maps = [x] if 0 in wanted else []
        for stage_idx, stage in enumerate(self.bit.encoder.stages[: wanted[-1]], start=1):
            x = stage(x)
            if stage_idx in wanted:
                maps.append(x)
        return maps
