"""A tensor derived from parameters (a standardized conv weight, a fused QKV weight), cached for
inference.

Recomputed when any source parameter's storage, in-place version counter, dtype, device or shape
changes, so `load_state_dict`, `.to()`, optimizer steps and in-place edits all invalidate it.
Bypassed — computed fresh under autograd — whenever a gradient must reach a source parameter, and
under torch.compile (the compiler must see the computation).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def needs_weight_grad(*params: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


class DerivedWeightCache:
    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None

    @staticmethod
    def key_of(*params: torch.Tensor | None) -> tuple:
        return tuple(
            None if p is None else (p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape)) for p in params
        )

    def get(self, compute: Callable[[], Any], *params: torch.Tensor | None) -> Any:
        if needs_weight_grad(*params) or torch.compiler.is_compiling():
            return compute()
        key = self.key_of(*params)
        if key != self.key:
            # a normal tensor even when called under inference_mode: an inference tensor could not
            # later be saved for backward by a conv whose *input* needs a gradient
            with torch.inference_mode(False), torch.no_grad():
                self.value = compute()
            self.key = key
        return self.value
