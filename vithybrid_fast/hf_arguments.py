"""transformers' `from_pretrained` arguments, as `ViTHybridForImageClassification.from_pretrained` takes them.

Code written for transformers starts a fine-tune like this, and it works here unchanged:

    model = ViTHybridForImageClassification.from_pretrained(
        "google/vit-hybrid-base-bit-384", num_labels=3, id2label=..., label2id=...,
        ignore_mismatched_sizes=True, torch_dtype=torch.bfloat16, attn_implementation="sdpa")

- `torch_dtype` is `dtype`; `attn_implementation` ("eager" | "sdpa") is `kernels`, unless kernels is given.
- `config=` (a ViTHybridConfig) replaces the checkpoint's config.json; config fields given as keywords
  (num_labels, id2label, hidden_dropout_prob, …) change it, as transformers applies them.
- `ignore_mismatched_sizes=True`: weights whose shape the (changed) config does not take — a head of
  other classes, a position table of another size — start from transformers' initialization instead,
  and a warning names them. Without it such a checkpoint is a CheckpointError that says this.
- `device_map` naming one device is `device`; `use_safetensors` picks the weight format; `use_auth_token` is
  `token`; `output_loading_info=True` returns (model, info) as transformers does; `ViTHybridModel`'s
  `add_pooling_layer=False` drops the pooler; `low_cpu_mem_usage`, `trust_remote_code` and
  `resume_download` change nothing (see NO_EFFECT).
Anything else (`subfolder`, `force_download`, `proxies`, `variant`, …) is a TypeError naming what is
accepted, not an argument silently dropped.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
from torch import nn

from .config import ViTHybridConfig
from .modeling import init_parameter_

logger = logging.getLogger(__name__)

ATTENTION = ("eager", "sdpa")
# accepted and without effect here: the load never holds a second copy of the weights, runs no code from
# the checkpoint, and huggingface_hub always resumes an interrupted download
NO_EFFECT = ("low_cpu_mem_usage", "trust_remote_code", "resume_download")


def load_arguments(
    kwargs: dict[str, Any],
    load_parameters: set[str],
    config: ViTHybridConfig | None,
    torch_dtype: Any,
    attn_implementation: str | None,
    device_map: Any,
) -> dict[str, Any]:
    """`vf.load`'s keyword arguments for a `from_pretrained(**kwargs)` call written for transformers."""
    kwargs = dict(kwargs)
    if "use_auth_token" in kwargs:  # transformers' deprecated name of token (it warns too)
        if "token" in kwargs:
            raise ValueError("use_auth_token and token were both given: give token")
        warnings.warn("use_auth_token is deprecated in transformers: give token", FutureWarning, stacklevel=3)
        kwargs["token"] = kwargs.pop("use_auth_token")
    arguments = {k: v for k, v in kwargs.items() if k in load_parameters}
    fields = {k: v for k, v in kwargs.items() if k not in load_parameters and k not in NO_EFFECT}
    unknown = sorted(set(fields) - ViTHybridConfig.field_names())
    if unknown:
        raise TypeError(
            f"from_pretrained() got unexpected keyword arguments {unknown}: it takes vf.load's arguments "
            f"({', '.join(sorted(load_parameters))}), transformers' torch_dtype, attn_implementation, config, "
            "device_map, and config fields such as num_labels or id2label"
        )
    for name, value, target in (("torch_dtype", torch_dtype, "dtype"), ("device_map", device_map, "device")):
        if value is None:
            continue
        if name == "device_map":
            value = _single_device(value)
        if target in arguments and arguments[target] != value:
            raise ValueError(f"{name}={value!r} and {target}={arguments[target]!r} disagree: give one of them")
        arguments[target] = value
    if attn_implementation is not None:
        if attn_implementation not in ATTENTION:
            raise ValueError(
                f"attn_implementation={attn_implementation!r}: ViT Hybrid takes 'eager' or 'sdpa' (transformers "
                "4.47.1 too); our flash attention kernel is kernels='triton'"
            )
        kernels = arguments.setdefault("kernels", attn_implementation)
        if isinstance(kernels, dict):
            # it names the attention family's implementation unless the dict does (an audit found it
            # ignored beside kernels={"mlp": "torch"}); "torch" there is the reference module, which
            # attn_implementation then configures, and another implementation named is a disagreement
            named = kernels.get("attention", "torch")
            if named not in (attn_implementation, "torch"):
                raise ValueError(
                    f"attn_implementation={attn_implementation!r} and kernels={kernels!r} disagree on the attention"
                )
            arguments["kernels"] = {**kernels, "attention": attn_implementation}
        elif kernels not in (attn_implementation, "auto"):
            raise ValueError(f"attn_implementation={attn_implementation!r} and kernels={kernels!r} disagree")
        elif kernels == "auto":
            arguments["kernels"] = attn_implementation
    if config is not None and not isinstance(config, ViTHybridConfig):
        kind = f"{type(config).__module__.split('.')[0]}.{type(config).__name__}"
        raise TypeError(
            f"config must be a vithybrid_fast.ViTHybridConfig, got {kind}"
            + (": convert it with vf.ViTHybridConfig.from_dict(config.to_dict())" if hasattr(config, "to_dict") else "")
        )
    if fields:
        arguments["config"] = fields if config is None else changed_config(config, fields)
    elif config is not None:
        arguments["config"] = config
    return arguments


def _single_device(device_map: Any) -> Any:
    """The one device a transformers `device_map` names: a device, "auto" / "balanced" / "sequential" (one
    GPU if any, as transformers places a model this size), or a dict whose modules all go to one device."""
    if isinstance(device_map, dict):
        try:
            devices = {str(torch.device(f"cuda:{d}" if isinstance(d, int) else d)) for d in device_map.values()}
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"device_map={device_map!r}: {err}") from None
        if len(devices) != 1:
            raise ValueError(
                f"device_map={device_map!r} places modules on several devices; this model (about 400 MB) loads "
                "on one: give device='cuda' (or a device_map naming one device)"
            )
        return next(iter(devices))
    if device_map in ("auto", "balanced", "balanced_low_0", "sequential"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, int) and not isinstance(device_map, bool):  # transformers' GPU index
        return f"cuda:{device_map}"
    return device_map


def changed_config(config: ViTHybridConfig | None, change: ViTHybridConfig | dict[str, Any] | None) -> ViTHybridConfig:
    """`config` (the checkpoint's; None when it has none and `change` is a whole config) as `change` makes
    it: replaced by a copy of a config, or given fields set in order (num_labels=3 relabels LABEL_0…, as
    in transformers), then checked as any config is."""
    if change is None:
        return config
    if isinstance(change, ViTHybridConfig):
        return copy.deepcopy(change)  # as transformers: the model's config is its own, not the caller's
    if not isinstance(change, dict):
        raise TypeError(f"config must be a ViTHybridConfig or a dict of its fields, got {type(change).__name__}")
    changed = copy.deepcopy(config)
    known = ViTHybridConfig.field_names() | set(changed.extra)  # extra: other fields its config.json holds
    for key, value in change.items():
        if key not in known:
            raise TypeError(f"config has no field {key!r}; its fields: {', '.join(sorted(known))}")
        setattr(changed, key, value)
    checked = ViTHybridConfig.from_dict(changed.to_dict())  # the rules every config.json meets
    checked.config_file, checked.defaulted_fields = config.config_file, config.defaulted_fields
    return checked


def loosen(model: nn.Module, state: dict[str, torch.Tensor], info: dict[str, list] | None = None) -> list[str]:
    """ignore_mismatched_sizes=True: drop from `state` the tensors `model` does not take (another shape, or
    no such weight: fewer layers, an encoder's pooler), each with a warning; returns the keys of the
    model's weights left to initialize anew (mis-shaped or absent from the checkpoint). `info` (if given)
    gets them as transformers' `output_loading_info` reports them."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    unexpected = sorted(k for k in state if k not in expected)
    for key in unexpected:
        logger.warning("%s: in the checkpoint, not in the model: not used (ignore_mismatched_sizes=True)", key)
        del state[key]
    missing, mismatched = [], []
    for key, shape in expected.items():
        if key not in state:
            logger.warning("%s: not in the checkpoint: newly initialized (ignore_mismatched_sizes=True)", key)
            missing.append(key)
        elif state[key].shape != shape:
            logger.warning(
                "%s: checkpoint %s, model %s: newly initialized (ignore_mismatched_sizes=True)",
                key, tuple(state[key].shape), tuple(shape),
            )  # fmt: skip
            mismatched.append((key, state.pop(key).shape, shape))
    if info is not None:
        info.update(missing_keys=missing, unexpected_keys=unexpected, mismatched_keys=mismatched, error_msgs=[])
    return missing + [key for key, _, _ in mismatched]


def initialize(model: nn.Module, keys: list[str], std: float, dtype: torch.dtype, device: torch.device) -> None:
    """Give the (meta) parameters `keys` of `model` transformers' initial values, in float32 then `dtype`."""
    for key in keys:
        owner_name, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        shape = getattr(owner, name).shape
        setattr(owner, name, nn.Parameter(torch.empty(shape, device=device, dtype=torch.float32)))
        init_parameter_(owner, name, std)
        setattr(owner, name, nn.Parameter(getattr(owner, name).detach().to(dtype)))
