"""Export-only twins of two shape computations, installed in the copy an ONNX export with a dynamic image
size traces (see export.py's docstring).

SAME padding is written in integer arithmetic and the position table's bicubic resize as two
interpolation matrices: the same values as the reference at every size, as shapes torch.export can
reason about (with the original code it spends minutes in sympy, and ONNX's integer division
truncates where Python's floors). The stem's max-pool pads explicitly there too (its pad-free shortcut
chooses by the size).
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


def _integer_same_pad_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DynamicPad2d's padding in integer arithmetic: ceil(x/s) = (x + s − 1) // s.

    Every operand stays non-negative: ONNX's integer Div truncates toward zero, so the shorter
    -(-x // s) would floor instead of ceil there. When (k−1)·d + 1 ≥ s the unclamped total is never
    negative, so max(·, 0) (which blocks the symbolic simplification) is dropped; the values are the
    reference's for every size, and each stage's size becomes a short expression, (x + 1) // 2.
    """
    span = (self.kernel_size - 1) * self.dilation + 1

    def total(size: Any) -> Any:
        pad = ((size + self.stride - 1) // self.stride - 1) * self.stride + span - size
        return pad if span >= self.stride else max(pad, 0)

    pad_h, pad_w = total(x.shape[-2]), total(x.shape[-1])
    return nn.functional.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2], value=self.value)


def bicubic_matrix(out_size: Any, in_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) matrix M with M @ v = F.interpolate(v, out, mode="bicubic", align_corners=False) on one axis."""
    a = -0.75  # PyTorch's (and ONNX Resize's default) cubic coefficient
    dst = torch.arange(out_size, dtype=dtype)
    src = (dst + 0.5) * (in_size / out_size) - 0.5
    left = torch.floor(src)
    t = src - left

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| ≤ 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)  # (out, 4)
    taps = (left.long().unsqueeze(-1) + torch.arange(-1, 3)).clamp(0, in_size - 1)  # border samples repeat
    one_hot = (taps.unsqueeze(-1) == torch.arange(in_size)).to(dtype)  # (out, 4, in)
    return (weights.unsqueeze(-1) * one_hot).sum(dim=1)


def _matrix_interpolate_pos_encoding(embeddings: nn.Module, grid: tuple[Any, Any]) -> torch.Tensor:
    """The position table resized to `grid` (always, so no size is special-cased in the graph)."""
    table = embeddings.position_embeddings
    gh, gw = embeddings.patch_embeddings.grid_size
    dim = table.shape[-1]
    patch_table = table[0, 1:].reshape(gh, gw, dim).permute(2, 0, 1).float()  # (D, gh, gw)
    resized = bicubic_matrix(grid[0], gh) @ patch_table @ bicubic_matrix(grid[1], gw).T  # (D, GH, GW)
    resized = resized.permute(1, 2, 0).reshape(1, -1, dim).to(table.dtype)
    return torch.cat((table[:, :1], resized), dim=1)


def install_dynamic_size_twins(model: nn.Module) -> nn.Module:
    """Give a (copied) model the export-friendly padding and position interpolation; returns it."""
    from .backbone import BitMaxPool2d, DynamicPad2d
    from .modeling import ViTHybridEmbeddings

    for module in model.modules():
        if isinstance(module, DynamicPad2d):
            module.forward = types.MethodType(_integer_same_pad_forward, module)
        elif isinstance(module, BitMaxPool2d):
            module.nonnegative_input = False  # its pad-free shortcut branches on the size: pad explicitly
        elif isinstance(module, ViTHybridEmbeddings):
            module.interpolate_pos_encoding = types.MethodType(_matrix_interpolate_pos_encoding, module)
    return model
