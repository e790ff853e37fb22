"""Activation functions by their transformers names (`hidden_act` in config.json)."""

from __future__ import annotations

import torch
from torch import nn


class GELUTanh(nn.Module):
    """transformers' `gelu_new` / `gelu_fast` / `gelu_pytorch_tanh`: the tanh approximation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(x, approximate="tanh")


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_FACTORIES = {
    "gelu": lambda: nn.GELU(),  # exact erf GELU, the one the hub checkpoint uses
    "gelu_new": GELUTanh,
    "gelu_fast": GELUTanh,
    "gelu_pytorch_tanh": GELUTanh,
    "quick_gelu": QuickGELU,
    "relu": nn.ReLU,
    "selu": nn.SELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "mish": nn.Mish,
    "linear": nn.Identity,
}


def get_activation(name: str) -> nn.Module:
    try:
        return _FACTORIES[name]()
    except KeyError:
        raise ValueError(f"activation {name!r} is not supported; choose one of {', '.join(_FACTORIES)}") from None
