"""patch() / unpatch(): swap reference modules for kernel-backed ones, in our models and in
transformers' ViTHybrid models, through one registry.

The registry maps a reference class to the fast class that replaces it, per module family:

    attention  self-attention (ours, transformers' eager and SDPA)  → FastSelfAttention
    mlp        a whole ViT layer (LN + MLP fused; with attention too, ~5 launches per layer)
    backbone   weight-standardized convs, GroupNorm+act, bottleneck blocks

Per family the choice is "triton" (swap in the fast modules) or "torch" (the reference modules); the
attention family also takes "eager" or "sdpa", which switches the reference attention itself (ours:
its `attn_implementation`; transformers': its eager or SDPA class) and the config with it.
A preset names every family ("sdpa" = sdpa attention, torch mlp and backbone); a dict names some, and a
family it does not name keeps what it had, patched or not. What cannot be done raises a clear error.

A fast module is built *from* the module it replaces and shares its parameter objects, so
`state_dict()` keys and values are unchanged. `unpatch()` puts the original objects back, carrying
over any parameter or buffer replaced while patched (`load_state_dict(assign=True)`, `to_empty`) and
the train/eval mode, and restores the attention implementation the model had before. Patching is
idempotent: each family named is first restored, then given its new choice. A frozen model
(weight_cache.freeze) stays frozen through patch and unpatch.
"""

from __future__ import annotations

import functools
import itertools
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .dispatch import set_measured
from .gpu_support import auto_choice, triton_error_message, triton_unsupported_reason
from .weight_cache import derived_weight_caches, freeze, is_frozen

FAMILIES = ("attention", "mlp", "backbone")
FAMILY_CHOICES = {
    "attention": ("triton", "sdpa", "eager", "torch"),
    "mlp": ("triton", "torch"),
    "backbone": ("triton", "torch"),
}
PRESETS = ("eager", "sdpa", "triton", "auto")
_PATCH_RECORD = "_vithybrid_fast_patches"


def triton_can_run(device: torch.device | None = None) -> bool:
    # gpu_support, not kernels._runtime: importing the kernels package imports triton, and a failed
    # kernels="triton" check that imported it made its own advice (set TRITON_INTERPRET=1 before triton
    # is imported) impossible to follow in the same process
    return triton_unsupported_reason(device) is None


def resolve_kernels(kernels: str | dict[str, str], device: torch.device | None = None) -> dict[str, str]:
    """{family: choice}: every family for a preset; for a dict, only the families it names (the others
    keep what they have)."""
    if isinstance(kernels, str):
        if kernels not in PRESETS:
            raise ValueError(f"kernels={kernels!r}: choose one of {', '.join(PRESETS)} or a dict per family")
        if kernels == "auto":
            kernels = auto_choice(device, triton_can_run(device))  # on a GPU below sm_80 it warns why: sdpa
        if kernels == "triton":
            return dict.fromkeys(FAMILIES, "triton")
        return {"attention": kernels, "mlp": "torch", "backbone": "torch"}
    if not isinstance(kernels, dict):
        raise TypeError(
            f"kernels={kernels!r}: choose one of {', '.join(PRESETS)}, or a dict per family such as "
            "{'attention': 'triton', 'mlp': 'torch'}"
        )
    unknown = set(kernels) - set(FAMILIES)
    if unknown:  # sorted by repr: the keys may mix types ({1: "triton"}), which do not compare
        names = ", ".join(sorted(map(repr, unknown)))
        raise ValueError(f"unknown kernel families {names}; families are {', '.join(FAMILIES)}")
    choice: dict[str, str] = {}
    for family, value in kernels.items():
        if value not in FAMILY_CHOICES[family]:
            raise ValueError(f"kernels[{family!r}]={value!r}: choose one of {', '.join(FAMILY_CHOICES[family])}")
        choice[family] = value
    return choice


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def validate_kernels(
    kernels: str | dict[str, str], device: torch.device | None = None, dtype: torch.dtype | None = None
) -> dict[str, str]:
    """Resolve `kernels` and fail clearly if it asks for Triton where Triton cannot run, or for weights
    (dtype) it does not support. The dtype is checked first: it is wrong on every machine, the device only
    on some (a float64 model on a GPU machine's CPU would otherwise hear only about the device)."""
    choice = resolve_kernels(kernels, device)
    if "triton" in choice.values() and dtype is not None and dtype not in TRITON_DTYPES:
        raise TypeError(f"Triton kernels support float32, float16 and bfloat16 weights, not {dtype}")
    # a meta model (built before its weights are loaded) may be patched; running it raises a clear error
    is_meta = device is not None and torch.device(device).type == "meta"
    if "triton" in choice.values() and not is_meta and not triton_can_run(device):
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

        hf = _transformers_vit_hybrid()
        registry["attention"][hf.ViTHybridSelfAttention] = fast.FastSelfAttention
        if hasattr(hf, "ViTHybridSdpaSelfAttention"):
            registry["attention"][hf.ViTHybridSdpaSelfAttention] = fast.FastSelfAttention
        registry["mlp"][hf.ViTHybridLayer] = fast.FastViTLayer
        registry["backbone"][hf_bit.WeightStandardizedConv2d] = fast.FastWeightStandardizedConv2d
        registry["backbone"][hf_bit.BitGroupNormActivation] = fast.FastGroupNormActivation
        registry["backbone"][hf_bit.BitBottleneckLayer] = fast.FastBottleneckLayer
        registry["backbone"][hf_bit.BitEmbeddings] = fast.FastBitEmbeddings  # ours pools without the copy already
    return registry


def _transformers_vit_hybrid() -> Any:
    try:
        from transformers.models.deprecated.vit_hybrid import modeling_vit_hybrid as hf
    except ImportError:  # transformers < 4.41 kept it outside `deprecated`
        from transformers.models.vit_hybrid import modeling_vit_hybrid as hf  # type: ignore[no-redef]
    return hf


class SlowFloat32Warning(UserWarning):
    """Triton kernels asked for by name on a float32 model on a CUDA GPU, where torch's ops are faster."""


# Measured: bench/results/nvidia-h100-2026-11-26-fp32.md, batch 64 (ours-triton 753.5 ms, ref-sdpa 205.6 ms).
FLOAT32_TRITON_MESSAGE = (
    "kernels={kernels!r} on a float32 model on a CUDA GPU: the Triton {families} kernels compute in true "
    "float32 (no TF32), which measured 3.7x slower end to end than the reference with SDPA on an H100 "
    "(batch 64; bench/results/nvidia-h100-2026-11-26-fp32.md). kernels='auto' runs per op whichever is "
    "faster; bfloat16 or float16 weights let the kernels use tensor cores. (Under torch.autocast this does "
    "not apply: the fused GEMMs step aside for torch's ops and attention runs in autocast's dtype.)"
)


def float32_triton_warning(
    kernels: str | dict[str, str], choice: dict[str, str], device: torch.device | None, dtype: torch.dtype | None
) -> str | None:
    """The SlowFloat32Warning text where `patch` puts float32 GEMM kernels (attention, mlp) on a CUDA GPU
    without measuring them against torch ("auto" measures and needs no warning), else None. The
    backbone's kernels hold no GEMM, so they give up no TF32 tensor-core speed and alone warn nothing
    (their float32 speed on a GPU is not measured yet)."""
    if kernels == "auto" or dtype != torch.float32 or device is None or torch.device(device).type != "cuda":
        return None
    families = [family for family in ("attention", "mlp") if choice.get(family) == "triton"]
    if not families:
        return None
    return FLOAT32_TRITON_MESSAGE.format(kernels=kernels, families=" and ".join(families))


def patch_for_autocast(model: nn.Module, kernels: str | dict[str, str], autocast_dtype: torch.dtype) -> nn.Module:
    """`patch` for a float32 model that will run under torch.autocast(autocast_dtype) (finetune, the training
    benchmark): there the fused GEMMs step aside and attention gets half-precision q, k, v, so the float32
    warning would mislead; without autocast (float32) it is given as by `patch`."""
    with warnings.catch_warnings():
        if autocast_dtype != torch.float32:
            warnings.simplefilter("ignore", SlowFloat32Warning)
        return patch(model, kernels)


def _model_device(model: nn.Module) -> torch.device | None:
    param = next(model.parameters(), None)
    return None if param is None else param.device


# -- what patch changed, so that unpatch can undo it, one family at a time -------------------------
# Each change gets a number from one counter, so changes recorded by different patch calls — on a model
# and on one of its submodules (`patch(model.vit, ...)`) — are undone newest first together.
_SEQUENCE = itertools.count()


@dataclass
class _Swap:
    """`parent.name` was `original`; patch put `replacement`, a module built from it, there."""

    family: str
    parent: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module
    seq: int = field(default_factory=lambda: next(_SEQUENCE))


@dataclass
class _Setting:
    """`target.attribute` was `original` (an attention implementation, on a module or a config)."""

    family: str
    target: Any
    attribute: str
    original: Any
    seq: int = field(default_factory=lambda: next(_SEQUENCE))


def _record(model: nn.Module) -> list[_Swap | _Setting]:
    return model.__dict__.setdefault(_PATCH_RECORD, [])


def _holders(model: nn.Module) -> list[nn.Module]:
    """`model` and every module inside it holding changes of a patch call: one made on `model.vit` is
    `model`'s too (unpatch(model), export's unpatched copy and a new patch(model) all see it)."""
    return [m for m in model.modules() if vars(m).get(_PATCH_RECORD)]


def _carry_state(replacement: nn.Module, original: nn.Module) -> None:
    """Give `original` every parameter and buffer `replacement` holds under the same name, and its mode.

    They shared the same objects when the replacement was built; `load_state_dict(assign=True)`,
    `to_empty()` or `.to()` with swapped tensors put new objects into the replacement only.
    """
    for module_name, module in original.named_modules(remove_duplicate=False):
        try:
            counterpart = replacement.get_submodule(module_name)
        except AttributeError:
            continue
        for slots_name in ("_parameters", "_buffers"):
            slots, current = getattr(module, slots_name), getattr(counterpart, slots_name)
            for key, tensor in list(slots.items()):
                if key in current and current[key] is not tensor:
                    slots[key] = current[key]
    original.training = replacement.training  # its children are shared, so already in their own mode


def _undo(model: nn.Module, families: set[str]) -> list[Callable[[], None]]:
    """Undo, newest first, what patch calls on `model` or inside it did to `families`; the other
    families' changes stay. Returns the steps that redo it (run them in reverse order)."""
    redo: list[Callable[[], None]] = []
    while pending := sorted(
        ((holder, entry) for holder in _holders(model) for entry in _record(holder) if entry.family in families),
        key=lambda change: change[1].seq, reverse=True,
    ):  # fmt: skip
        # again until none is left: a module patched on its own and then swapped out by a patch of its
        # model (patch(layer), then patch(model, mlp)) is back in the tree, with its record, only now
        _undo_changes(pending, redo)
    return redo


def _undo_changes(pending: list[tuple[nn.Module, _Swap | _Setting]], redo: list[Callable[[], None]]) -> None:
    for holder, entry in pending:
        if isinstance(entry, _Swap):
            if _still_in_place(entry):  # else the user has put another module there since: theirs stays
                _carry_state(entry.replacement, entry.original)
                setattr(entry.parent, entry.name, entry.original)
                for cache in derived_weight_caches(entry.original):
                    cache.unfreeze()  # held since before the patch; the caller freezes again if the model is
                redo.append(functools.partial(setattr, entry.parent, entry.name, entry.replacement))
        else:
            redo.append(
                functools.partial(setattr, entry.target, entry.attribute, getattr(entry.target, entry.attribute))
            )
            setattr(entry.target, entry.attribute, entry.original)
        record = _record(holder)
        record[:] = [kept for kept in record if kept is not entry]
        redo.append(functools.partial(record.append, entry))


def _still_in_place(swap: _Swap) -> bool:
    return getattr(swap.parent, swap.name, None) is swap.replacement


def _revert(changes: list[_Swap | _Setting]) -> None:
    """Undo `changes` (this call's, not recorded yet), newest first."""
    for entry in reversed(changes):
        if isinstance(entry, _Swap):
            setattr(entry.parent, entry.name, entry.original)
        else:
            setattr(entry.target, entry.attribute, entry.original)


def _patched_from_outside(model: nn.Module, fast_classes: Any) -> str:
    """A hint for a family with nothing to act on because a patch of an enclosing model swapped its
    modules for `fast_classes` (patch on `model` itself undid its own swaps before looking)."""
    if any(isinstance(m, tuple(fast_classes)) for m in model.modules()):
        return (
            "; its fast modules were put in by vf.patch on a model enclosing it: patch or unpatch that model, "
            "or unpatch it first"
        )
    return ""


# -- attention implementation (eager / sdpa) -----------------------------------------------------
def _twin(original: nn.Module, cls: type) -> nn.Module:
    """A `cls` instance holding `original`'s children and attributes (transformers' eager and SDPA
    self-attention differ only in class and forward)."""
    twin = cls.__new__(cls)
    nn.Module.__init__(twin)
    fresh = set(vars(twin))
    for key, value in vars(original).items():
        if key in ("_parameters", "_buffers", "_modules"):
            getattr(twin, key).update(value)
        elif key not in fresh or key in ("training", "_non_persistent_buffers_set"):
            object.__setattr__(twin, key, value)
    if hasattr(original, "dropout"):
        twin.attention_probs_dropout_prob = original.dropout.p  # what transformers' SDPA class reads
    return twin


def _switch_attention(model: nn.Module, implementation: str, changes: list[_Swap | _Setting]) -> None:
    """Put every reference self-attention of `model` on `implementation` ("eager" or "sdpa"); each change
    joins `changes` as it is made, so a failure part-way can be reverted."""
    from .config import ViTHybridConfig
    from .fast import FastSelfAttention
    from .modeling import ViTHybridSelfAttention

    found = 0
    for module in model.modules():
        if isinstance(module, ViTHybridSelfAttention):
            found += 1
            changes.append(_Setting("attention", module, "attn_implementation", module.attn_implementation))
            module.attn_implementation = implementation
    config = getattr(model, "config", None)
    if isinstance(config, ViTHybridConfig):
        changes.append(_Setting("attention", config, "attn_implementation", config.attn_implementation))
        config.attn_implementation = implementation
    if "transformers" in sys.modules and any(type(m).__module__.startswith("transformers.") for m in model.modules()):
        found += _switch_transformers_attention(model, implementation, changes)
    if not found:
        raise ValueError(
            f"kernels asks for {implementation!r} attention, but {type(model).__name__} has no ViT Hybrid "
            "self-attention module (ours or transformers') to switch; name only the families it has in a kernels "
            f"dict (families: {', '.join(FAMILIES)})" + _patched_from_outside(model, [FastSelfAttention])
        )


def _switch_transformers_attention(model: nn.Module, implementation: str, changes: list[_Swap | _Setting]) -> int:
    """transformers picks eager or SDPA attention by class at construction: swap in the other class.
    Returns how many self-attention modules it found."""
    import transformers

    hf = _transformers_vit_hybrid()
    eager, sdpa = hf.ViTHybridSelfAttention, getattr(hf, "ViTHybridSdpaSelfAttention", None)
    slots = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if type(child) in (eager, sdpa)]  # fmt: skip
    if not slots:
        return 0
    if implementation == "sdpa" and sdpa is None:
        raise ValueError(
            f"transformers {transformers.__version__} has no SDPA attention for ViT Hybrid (added in 4.41): "
            "choose kernels 'eager' or 'triton' for this model"
        )
    target = sdpa if implementation == "sdpa" else eager
    for parent, name, child in slots:
        if type(child) is not target:
            setattr(parent, name, twin := _twin(child, target))
            changes.append(_Swap("attention", parent, name, child, twin))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "_attn_implementation_internal"):
        changes.append(_Setting("attention", config, "_attn_implementation_internal",
                                config._attn_implementation_internal))  # fmt: skip
        config._attn_implementation_internal = implementation
    return len(slots)


# -- patch / unpatch -------------------------------------------------------------------------------
def build_in_mode(builder: Callable[[nn.Module], nn.Module], original: nn.Module) -> nn.Module:
    """`builder(original)` in `original`'s train/eval mode. A new nn.Module starts in training mode: a fast
    module put into a model in eval mode would run dropout at inference (and unpatch would carry its mode
    back). Submodules it shares with `original` keep their own mode; the ones it made take the original's."""
    fast_module = builder(original)
    # the user's hooks on the replaced module (feature extraction, Grad-CAM) keep firing: the
    # fast module shares the original's hook dicts, so hooks added or removed while patched reach both
    for slot in (
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
    ):
        if hasattr(original, slot):
            object.__setattr__(fast_module, slot, getattr(original, slot))
    shared = {id(m) for m in original.modules()}
    for module in fast_module.modules():
        if id(module) not in shared:
            module.training = original.training
    return fast_module


def _swap_family(
    model: nn.Module, family: str, table: dict[type, Callable[[nn.Module], nn.Module]], changes: list[_Swap | _Setting]
) -> None:
    swaps = []
    # descendants before ancestors (reversed pre-order): a fast block is built from a parent whose
    # children were already swapped, so it holds the fast children
    for parent in reversed(list(model.modules())):
        for name, child in list(parent.named_children()):
            builder = table.get(type(child))
            if builder is not None:
                setattr(parent, name, fast_module := build_in_mode(builder, child))
                swaps.append(_Swap(family, parent, name, child, fast_module))
                changes.append(swaps[-1])
    if not swaps:
        known = ", ".join(sorted({cls.__name__ for cls in table}))  # ours and transformers' share names
        raise ValueError(
            f"kernels[{family!r}]='triton': {type(model).__name__} has no module of that family ({known})"
            + _patched_from_outside(model, table.values())
        )


def patch(model: nn.Module, kernels: str | dict[str, str] = "triton") -> nn.Module:
    """Swap modules in place for the kernels chosen (see module docstring); returns `model`."""
    device = _model_device(model)
    param = next(model.parameters(), None)
    dtype = None if param is None else param.dtype
    choice = validate_kernels(kernels, device, dtype=dtype)
    slow = float32_triton_warning(kernels, choice, device, dtype)
    if slow is not None:
        warnings.warn(slow, SlowFloat32Warning, stacklevel=2)
    frozen = is_frozen(model)
    redo = _undo(model, set(choice))
    registry = _registry(model)
    changes: list[_Swap | _Setting] = []
    try:
        # attention first: the fast ViT layer then finds a fused-QKV attention module inside it
        for family in FAMILIES:
            if family not in choice or choice[family] == "torch":
                continue
            if choice[family] == "triton":
                _swap_family(model, family, registry[family], changes)
            else:
                _switch_attention(model, choice[family], changes)
    except BaseException:
        # a failed call leaves the model as it was: a config switched to "eager" while its modules still
        # ran SDPA, and families restored before the failure, were what it left before
        _revert(changes)
        for step in reversed(redo):
            step()
        if frozen:
            freeze(model)
        raise
    _record(model).extend(changes)
    # "auto" on a GPU: every fused op runs its kernel or the torch ops it replaces, whichever measures faster.
    # A preset speaks for every family; a dict leaves the families it does not name as they were.
    if isinstance(kernels, str):
        on_gpu = device is not None and device.type == "cuda"
        set_measured(model, kernels == "auto" and "triton" in choice.values() and on_gpu)
    if frozen:
        freeze(model)  # the modules just put in (fast or restored) hold their derived weights too
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Put back the original modules and attention implementation `patch` replaced; returns `model`.

    Parameters and buffers that were replaced while patched come back with them (see module docstring).
    """
    if not _holders(model):
        fast = [name for name, m in model.named_modules() if type(m).__module__ == f"{__package__}.fast"]
        if fast:  # a patch made on an enclosing model keeps its record there: this call would do nothing
            raise ValueError(
                f"unpatch: this {type(model).__name__} holds patched modules ({fast[0] or 'itself'}, …) put in by a "
                "patch of a model enclosing it; unpatch the model that was patched"
            )
    frozen = is_frozen(model)
    _undo(model, set(FAMILIES))
    for module in model.modules():
        module.__dict__.pop(_PATCH_RECORD, None)
    if frozen:
        freeze(model)
    return model


def apply_kernels(model: nn.Module, kernels: str | dict[str, str]) -> nn.Module:
    """What `load(kernels=...)` does after loading: reference attention choice and/or patching.

    A reference attention ("eager" / "sdpa") chosen at load is the model's own implementation, as
    `from_pretrained(attn_implementation=...)` makes it, not a patch: unpatch keeps it."""
    param = next(model.parameters(), None)
    choice = validate_kernels(kernels, _model_device(model), dtype=None if param is None else param.dtype)
    if choice.get("attention") in ("eager", "sdpa") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(choice["attention"])
    return patch(model, kernels)


def patched_modules(model: nn.Module) -> list[tuple[str, Any]]:
    """(qualified name, class name) of every module patch put in that is still in `model` — for reports
    and tests. One the user has since replaced, or whose parent they replaced (say a whole encoder
    layer), is not part of the model, so it is not listed; unpatch leaves the user's module in place."""
    names = {id(m): n for n, m in model.named_modules()}
    entries = sorted((e for holder in _holders(model) for e in _record(holder)), key=lambda e: e.seq)
    swaps = [e for e in entries if isinstance(e, _Swap) and id(e.parent) in names and _still_in_place(e)]
    return [(f"{names[id(s.parent)]}.{s.name}".lstrip("."), type(getattr(s.parent, s.name)).__name__)
            for s in swaps]  # fmt: skip
