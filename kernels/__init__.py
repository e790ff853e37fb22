"""Hand-written Triton kernels for ViT Hybrid, each beside its plain-torch `reference`.

Import is lazy per kernel so that `import kernels` never needs triton (CPU-only installs
of the model keep working); the functions import their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "flash_attention": "kernels.attention",
    "weight_standardize": "kernels.weight_standardize",
    "group_norm_act": "kernels.group_norm_act",
    "layer_norm_mlp": "kernels.layer_norm_mlp",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")
