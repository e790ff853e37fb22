"""Hand-written Triton kernels for ViT Hybrid, each beside its plain-torch `reference`.

    from vithybrid_fast.kernels import flash_attention, weight_standardize, group_norm_act, layer_norm_mlp
    from vithybrid_fast.kernels import add_layer_norm  # inference glue for kernels="auto"
    from vithybrid_fast.kernels import add_layer_norm_train  # the same under autocast, with its backward

Three of the kernel files share their name with their function (kernels/weight_standardize.py
defines weight_standardize). Python binds a package attribute to the submodule when it is
imported, so we import every submodule here first and then bind the names to the functions;
each function carries its twin as `.reference` (so `kernels.weight_standardize.reference` still
names the plain-torch definition, as DESIGN.md writes it). The modules stay reachable through
`importlib.import_module("kernels.<name>")` / `from kernels.<name> import ...`.

Importing this package imports triton: set TRITON_INTERPRET=1 before it to run on a CPU.
"""

from __future__ import annotations

from .add_layer_norm import add_layer_norm
from .add_layer_norm import reference as _add_layer_norm_reference
from .add_layer_norm_train import add_layer_norm_train
from .add_layer_norm_train import reference as _add_layer_norm_train_reference
from .attention import flash_attention, flash_attention_packed
from .attention import reference as _attention_reference
from .attention import reference_packed as _attention_packed_reference
from .group_norm_act import group_norm_act
from .group_norm_act import reference as _group_norm_act_reference
from .layer_norm_mlp import layer_norm_mlp
from .layer_norm_mlp import reference as _layer_norm_mlp_reference
from .weight_standardize import reference as _weight_standardize_reference
from .weight_standardize import weight_standardize

add_layer_norm.reference = _add_layer_norm_reference  # type: ignore[attr-defined]
add_layer_norm_train.reference = _add_layer_norm_train_reference  # type: ignore[attr-defined]
flash_attention.reference = _attention_reference  # type: ignore[attr-defined]
flash_attention_packed.reference = _attention_packed_reference  # type: ignore[attr-defined]
group_norm_act.reference = _group_norm_act_reference  # type: ignore[attr-defined]
layer_norm_mlp.reference = _layer_norm_mlp_reference  # type: ignore[attr-defined]
weight_standardize.reference = _weight_standardize_reference  # type: ignore[attr-defined]

__all__ = [
    "add_layer_norm", "add_layer_norm_train", "flash_attention", "flash_attention_packed", "group_norm_act",
    "layer_norm_mlp", "weight_standardize",
]  # fmt: skip
