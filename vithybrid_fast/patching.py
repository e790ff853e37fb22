"""patch() / unpatch(): swap reference modules for kernel-backed ones, in our models and in
transformers' ViTHybrid models, through one registry.

The registry maps a reference class to the fast class that replaces it, per module family:

    attention  self-attention (ours, transformers' eager and SDPA)  → FastSelfAttention
    mlp        a whole ViT layer (LN + MLP fused; with attention too, ~5 launches per layer)
    backbone   weight-standardized convs, GroupNorm+act, bottleneck blocks

A fast module is built *from* the module it replaces and shares its parameter objects, so
`state_dict()` keys and values are unchanged. `unpatch()` puts the exact original objects back.
Patching is idempotent: `patch()` first restores the originals, then applies the new choice.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .gpu_support import auto_choice, triton_error_message

FAMILIES = ("attention", "mlp", "backbone")
FAMILY_CHOICES = {
    "attention": ("triton", "sdpa", "eager", "torch"),
    "mlp": ("triton", "torch"),
    "backbone": ("triton", "torch"),
}
PRESETS = ("eager", "sdpa", "triton", "auto")
_PATCH_RECORD = "_vithybrid_fast_patches"


def triton_can_run(device: torch.device | None = None) -> bool:
    from vithybrid_fast.kernels._runtime import triton_can_run as can_run

    return can_run(device)


def resolve_kernels(kernels: str | dict[str, str], device: torch.device | None = None) -> dict[str, str]:
    """Turn a preset or a per-family dict into {family: choice} for every family."""
    if isinstance(kernels, str):
        if kernels not in PRESETS:
            raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(PRESETS)} or a dict per family")
        if kernels == "auto":
            kernels = auto_choice(device, triton_can_run(device))  # on a GPU below sm_80 it warns why: sdpa
        if kernels == "triton":
            return dict.fromkeys(FAMILIES, "triton")
        return {"attention": kernels, "mlp": "torch", "backbone": "torch"}
    if not isinstance(kernels, dict):
        raise TypeError(f"kernels must be a string or a dict, got {type(kernels).__name__}")
    unknown = set(kernels) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; families are {', '.join(FAMILIES)}")
    choice = {"attention": "sdpa", "mlp": "torch", "backbone": "torch"}
    for family, value in kernels.items():
        if value not in FAMILY_CHOICES[family]:
            raise ValueError(f"kernels[{family!r}]={value!r}: choose one of {', '.join(FAMILY_CHOICES[family])}")
        choice[family] = value
    return choice


def validate_kernels(kernels: str | dict[str, str], device: torch.device | None = None) -> dict[str, str]:
    """Resolve `kernels` and fail clearly if it asks for Triton where Triton cannot run."""
    choice = resolve_kernels(kernels, device)
    if "triton" in choice.values() and not triton_can_run(device):
        raise RuntimeError(triton_error_message(device))
    return choice


def _registry(model: nn.Module) -> dict[str, dict[type, Callable[[nn.Module], nn.Module]]]:
    from . import backbone as ours_bit
    from . import fast
    from . import modeling as ours

    registry: dict[str, dict[type, Callable[[nn.Module], nn.Module]]] = {
        "attention": {ours.ViTHybridSelfAttention: fast.FastSelfAttention},
        "mlp": {ours.ViTHybridLayer: fast.FastViTLayer},
        "backbone": {
            ours_bit.WeightStandardizedConv2d: fast.FastWeightStandardizedConv2d,
            ours_bit.BitGroupNormActivation: fast.FastGroupNormActivation,
            ours_bit.BitBottleneckLayer: fast.FastBottleneckLayer,
        },
    }
    # transformers' classes join only when the model is one of theirs (never import it ourselves)
    if any(type(m).__module__.startswith("transformers.") for m in model.modules()) and "transformers" in sys.modules:
        from transformers.models.bit import modeling_bit as hf_bit

        try:
            from transformers.models.deprecated.vit_hybrid import modeling_vit_hybrid as hf
        except ImportError:  # transformers < 4.41 kept it outside `deprecated`
            from transformers.models.vit_hybrid import modeling_vit_hybrid as hf  # type: ignore[no-redef]
        registry["attention"][hf.ViTHybridSelfAttention] = fast.FastSelfAttention
        if hasattr(hf, "ViTHybridSdpaSelfAttention"):
            registry["attention"][hf.ViTHybridSdpaSelfAttention] = fast.FastSelfAttention
        registry["mlp"][hf.ViTHybridLayer] = fast.FastViTLayer
        registry["backbone"][hf_bit.WeightStandardizedConv2d] = fast.FastWeightStandardizedConv2d
        registry["backbone"][hf_bit.BitGroupNormActivation] = fast.FastGroupNormActivation
        registry["backbone"][hf_bit.BitBottleneckLayer] = fast.FastBottleneckLayer
    return registry


def _model_device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


def _set_reference_attention(model: nn.Module, implementation: str) -> None:
    """eager/sdpa on our reference attention modules. transformers' models keep the attention class
    they were built with (their eager and SDPA paths are different classes, chosen at construction)."""
    from .config import ViTHybridConfig
    from .modeling import ViTHybridSelfAttention

    for module in model.modules():
        if isinstance(module, ViTHybridSelfAttention):
            module.attn_implementation = implementation
    config = getattr(model, "config", None)
    if isinstance(config, ViTHybridConfig):
        config.attn_implementation = implementation


def patch(model: nn.Module, kernels: str | dict[str, str] = "triton") -> nn.Module:
    """Swap modules in place for the kernels chosen (see module docstring); returns `model`."""
    device = _model_device(model)
    choice = validate_kernels(kernels, device)
    if "triton" in choice.values():
        dtype = next(model.parameters()).dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"Triton kernels support float32, float16 and bfloat16 weights, not {dtype}")
    unpatch(model)
    attention = choice["attention"]
    if attention in ("eager", "sdpa"):
        _set_reference_attention(model, attention)
    registry = _registry(model)
    # attention first: the fast ViT layer then finds a fused-QKV attention module inside it
    wanted = [family for family in FAMILIES if choice[family] == "triton"]
    record: list[tuple[nn.Module, str, nn.Module]] = []
    for family in wanted:
        table = registry[family]
        # descendants before ancestors (reversed pre-order): a fast block is built from a parent
        # whose children were already swapped, so it holds the fast children
        for parent in reversed(list(model.modules())):
            for name, child in list(parent.named_children()):
                builder = table.get(type(child))
                if builder is not None:
                    setattr(parent, name, builder(child))
                    record.append((parent, name, child))
    setattr(model, _PATCH_RECORD, record)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the exact module objects `patch` replaced (in reverse order); returns `model`."""
    record: list[tuple[nn.Module, str, nn.Module]] = getattr(model, _PATCH_RECORD, [])
    for parent, name, original in reversed(record):
        setattr(parent, name, original)
    if hasattr(model, _PATCH_RECORD):
        delattr(model, _PATCH_RECORD)
    return model


def apply_kernels(model: nn.Module, kernels: str | dict[str, str]) -> nn.Module:
    """What `load(kernels=...)` does after loading: reference attention choice and/or patching."""
    return patch(model, kernels)


def patched_modules(model: nn.Module) -> list[tuple[str, Any]]:
    """(qualified name, fast class name) of every swapped module — for reports and tests."""
    names = {id(m): n for n, m in model.named_modules()}
    record = getattr(model, _PATCH_RECORD, [])
    return [(f"{names.get(id(parent), '?')}.{name}".lstrip("."), type(getattr(parent, name)).__name__)
            for parent, name, _ in record]  # fmt: skip
