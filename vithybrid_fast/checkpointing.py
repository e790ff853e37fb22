"""Gradient (activation) checkpointing: keep a layer's input, recompute its activations in the backward pass.

transformers' API: `model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=None)`,
`model.gradient_checkpointing_disable()`, `model.is_gradient_checkpointing`. Modules that run a list of
layers (the ViT encoder, each BiT stage) carry `gradient_checkpointing` and `_gradient_checkpointing_func`,
the attribute names transformers sets, and call each layer through `call_layer`.

Two differences from transformers 4.47.1, both deliberate:
- the backbone's layers are checkpointed too, not only the encoder's: at 384² their feature
  maps hold about as much memory per image as the encoder's activations. They always use the
  non-reentrant variant (`reentrant_checkpoint = False` on the stage): with the reentrant one, a frozen
  stem would leave every stage after it without gradients, silently, where transformers trains them;
- `use_reentrant` defaults to False (transformers: True). With the reentrant variant a layer whose input
  needs no gradient (the first encoder layer after frozen embeddings, say) gets no gradient for its own
  weights, and neither does any layer after it, with only torch's generic warning; torch recommends the
  non-reentrant variant.
Checkpointing acts in training mode with autograd on; evaluation and `torch.no_grad()` run as before.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn


def call_layer(owner: nn.Module, layer: nn.Module, *args: Any) -> Any:
    """`layer(*args)`, through the checkpoint function when `owner` has checkpointing on and is training."""
    if owner.gradient_checkpointing and owner.training and torch.is_grad_enabled():
        return owner._gradient_checkpointing_func(layer, *args)
    return layer(*args)


def set_gradient_checkpointing(model: nn.Module, kwargs: dict[str, Any] | None) -> None:
    """Turn checkpointing on (kwargs: dict for `torch.utils.checkpoint.checkpoint`) or off (None) in every
    module of `model` that supports it; a ValueError when none does."""
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"gradient_checkpointing_kwargs must be a dict or None, got {type(kwargs).__name__}")
    owners = [m for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")]
    if not owners:
        raise ValueError(f"{type(model).__name__} has no layers that support gradient checkpointing")
    from torch.utils.checkpoint import checkpoint

    for owner in owners:
        func = None
        if kwargs is not None:
            chosen = {"use_reentrant": False, **kwargs}
            if not getattr(owner, "reentrant_checkpoint", True):
                chosen["use_reentrant"] = False
            func = functools.partial(checkpoint, **chosen)
        owner.gradient_checkpointing = func is not None
        owner._gradient_checkpointing_func = func
