"""Derived weights — a standardized conv weight, a fused QKV weight — recomputed every call unless frozen.

By default every forward derives them afresh from the parameters as they are at that moment, as
transformers does, so no way of changing a weight (`.data` edits and assignments, `load_state_dict`
with or without `assign=True`, `copy_`, optimizer steps, `.to()`, EMA updates) can leave an old copy
in use. The price is the derivation itself: a per-channel standardization of every backbone conv
weight (~12 % of the parameters) and, patched, a concatenation of the q/k/v weights (~21 %).

`freeze(model)` trades that for memory: each derived weight is computed once, on the first inference
call, and served until `unfreeze(model)` drops it. The promise you make by freezing: **the weights do
not change while the model is frozen**. A frozen cache still checks, for ~1 µs per weight, that each
source is the same Parameter object with the same address, dtype, device, layout and version counter,
and recomputes when one differs — so `load_state_dict` (either way), `copy_`, optimizer steps, `.to()`
and in-place EMA updates on the CPU are followed. What it cannot see are writes that bypass the version
counter: `w.data.mul_(…)`, `w.data = t` (which may reuse the old address), writes through an alias made
before (`alias = w.data`), and `torch._foreach_lerp_` on CUDA — the EMA update of timm's ModelEmaV3 and
`torch.optim.swa_utils` — which, unlike `_foreach_add_`/`mul_`/`copy_`, advanced no version counter on
an H100 with torch 2.11. After such an edit call `unfreeze(model)` (or `freeze(model)` again, which
starts from the current weights).

Parameters that are inference tensors (a model loaded or converted under `torch.inference_mode()`) have
no version counter at all, and inside inference mode they can be changed in place (`load_state_dict`,
`copy_`) without a trace: a frozen cache cannot check them, so it derives their weights every call, as
an unfrozen one does, and warns (`InferenceTensorWarning`). Load the model outside inference mode
to hold them.

Frozen or not, a derived weight is computed under autograd whenever a gradient must reach its source
parameters (training), and under torch.compile (the compiler must see the computation).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

# Set on the model passed to freeze(): patch()/unpatch() freeze the modules they put in.
_FROZEN_FLAG = "_vithybrid_fast_frozen"

# Bumped whenever a frozen cache takes or drops a value: a CUDA graph captured with frozen derived
# weights reads them at their addresses and must be recaptured when they are replaced.
_generation = 0


def generation() -> int:
    """A counter that changes whenever any frozen derived weight is computed or dropped."""
    return _generation


class InferenceTensorWarning(UserWarning):
    """A frozen model's parameters are inference tensors, so their derived weights cannot be held."""


def needs_weight_grad(*params: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params)


def _any_inference_tensor(params: tuple[torch.Tensor | None, ...]) -> bool:
    return any(p is not None and p.is_inference() for p in params)


def _warn_cannot_hold() -> None:
    warnings.warn(
        "vithybrid_fast.freeze: the model's parameters are inference tensors (made under "
        "torch.inference_mode()), whose in-place changes (load_state_dict, copy_) leave no trace to check, "
        "so their derived weights are recomputed every call instead of held. Load or convert the model "
        "outside inference_mode to hold them.",
        InferenceTensorWarning,
        stacklevel=4,
    )


def _layout(p: torch.Tensor) -> tuple:  # never an inference tensor: get() holds nothing derived from one
    return (p.data_ptr(), p._version, p.dtype, p.device, tuple(p.shape), p.stride())


class DerivedWeightCache:
    """One derived tensor (or tuple of tensors) of a module: computed per call, or held while frozen."""

    def __init__(self) -> None:
        self.frozen = False
        self.value: Any = None
        self._sources: list[tuple[Any, tuple]] = []  # (weakref to the Parameter or None, its layout)

    def _sources_match(self, params: tuple[torch.Tensor | None, ...]) -> bool:
        if len(params) != len(self._sources):
            return False
        for p, (ref, layout) in zip(params, self._sources):
            if p is None:
                if ref is not None:
                    return False
            elif ref is None or ref() is not p or _layout(p) != layout:
                return False
        return True

    def get(self, compute: Callable[[], Any], *params: torch.Tensor | None) -> Any:
        if not self.frozen or needs_weight_grad(*params) or torch.compiler.is_compiling():
            return compute()
        if _any_inference_tensor(params):
            # no version counter to check: a held value could go stale unseen (load_state_dict under
            # inference_mode copies into the same memory), so derive it afresh, as unfrozen
            self.drop()
            _warn_cannot_hold()
            return compute()
        if self.value is None or not self._sources_match(params):
            # a normal tensor even when called under inference_mode: an inference tensor could not
            # later be saved for backward by a conv whose *input* needs a gradient
            with torch.inference_mode(False), torch.no_grad():
                self.value = compute()
            self._sources = [(None, ()) if p is None else (weakref.ref(p), _layout(p)) for p in params]
            _bump_generation()
        return self.value

    def freeze(self) -> None:
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False
        self.drop()

    def drop(self) -> None:
        """Forget the held value (a frozen cache recomputes it on the next inference call)."""
        if self.value is not None:
            _bump_generation()
        self.value, self._sources = None, []

    def nbytes(self) -> int:
        tensors = self.value if isinstance(self.value, tuple) else (self.value,)
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))

    # Copies (deepcopy, pickle, torch.save of a whole model) keep the frozen flag, never the value:
    # a copy's parameters are other objects, so its derived weights are derived again from them.
    def __getstate__(self) -> dict[str, Any]:
        return {"frozen": self.frozen}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()  # type: ignore[misc]
        self.frozen = state["frozen"]


def _bump_generation() -> None:
    global _generation
    _generation += 1


def derived_weight_caches(model: nn.Module) -> Iterator[DerivedWeightCache]:
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, DerivedWeightCache):
                yield value


def freeze(model: nn.Module) -> nn.Module:
    """Compute derived weights once (on the next inference call) and serve them until `unfreeze`.

    Freezing promises that the weights will not change while frozen. Changes made through the version
    counter or by replacing/moving a Parameter (`load_state_dict`, `copy_`, optimizer steps, `.to()`)
    are still detected and followed; in-place edits through `.data` (and `.data` assignments) and an
    EMA by `torch._foreach_lerp_` on CUDA (no version bump there) are NOT: call `unfreeze(model)` after
    one. Memory: the derived
    weights stay resident (standardized conv weights ≈ 12 % of the base model's weights; patched with
    Triton attention, the fused QKV weights add ≈ 21 %). Returns `model`; calling it again is harmless.
    """
    object.__setattr__(model, _FROZEN_FLAG, True)
    for cache in derived_weight_caches(model):
        cache.freeze()
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Drop every held derived weight; from now on they are recomputed every call (the default)."""
    if _FROZEN_FLAG in vars(model):
        object.__delattr__(model, _FROZEN_FLAG)
    for cache in derived_weight_caches(model):
        cache.unfreeze()
    return model


def is_frozen(model: nn.Module) -> bool:
    """True after `freeze(model)` (until `unfreeze`), or when any derived-weight cache inside is frozen."""
    return bool(vars(model).get(_FROZEN_FLAG, False)) or any(c.frozen for c in derived_weight_caches(model))


def cached_bytes(model: nn.Module) -> int:
    """Bytes held by derived-weight caches in `model` (0 unless frozen and called at least once)."""
    return sum(cache.nbytes() for cache in derived_weight_caches(model))
