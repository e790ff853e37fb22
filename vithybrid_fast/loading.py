"""load(): hub repo id or local directory → config + weights → model (+ kernels).

The model is built on the meta device (no memory, no random init), every tensor is read once from
the checkpoint (safetensors memory-mapped; .bin with `weights_only=True`, memory-mapped when the
file allows), converted to the requested dtype/device on the way, checked against the model's
expected keys and shapes, and only then assigned. A failure at any step raises before a model
exists, so a half-loaded model is never returned. Peak resident memory ≈ one copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ViTHybridConfig
from .hf_arguments import changed_config, initialize, loosen
from .hub import (
    CheckpointNotFoundError,
    hub_cache_dir,
    hub_offline,
    hub_unreachable_reason,
    not_cached_message,
    resolve_file,
    snapshot_commit,
)
from .modeling import ViTHybridForImageClassification, ViTHybridModel, ViTHybridPreTrainedModel

logger = logging.getLogger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64,
}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, truncated, or does not match the model's architecture."""


def resolve_dtype(dtype: torch.dtype | str | None, config: ViTHybridConfig | None) -> torch.dtype:
    """`dtype` as a torch dtype; "auto" reads `config.torch_dtype` (only "auto" needs the config)."""
    if dtype is None:
        return torch.float32  # like transformers: the checkpoint's torch_dtype is used only if asked ("auto")
    if dtype == "auto":
        if config is None:
            raise ValueError('dtype="auto" reads the checkpoint\'s config.json: pass the config')
        dtype = config.torch_dtype or "float32"
    # float64 is served too (plain-torch paths; the Triton kernels refuse it): the upcast reference of checks
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}, or 'auto'")
        dtype = DTYPES[dtype]
    if dtype not in set(DTYPES.values()):
        raise ValueError(
            f"dtype {dtype} is not supported; use torch.float32, torch.float16, torch.bfloat16 or torch.float64"
        )
    return dtype


def resolve_device(device: torch.device | str | int | None) -> torch.device:
    if isinstance(device, int) and not isinstance(device, bool):  # torch's index of the accelerator: a GPU
        device = f"cuda:{device}"
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but no CUDA GPU is available")
    return device


class WeightFiles(list):
    """The weight files to read; `weight_map` (key → shard file name) when they come from a shard index."""

    weight_map: dict[str, str] | None = None


def _read_shard_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a valid shard index: {err!r}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: weight_map must be a non-empty object of key → shard file")
    for key, shard in weight_map.items():
        # a shard is a file beside the index: "../other/model.safetensors" or "/etc/x" would read
        # weights from outside the checkpoint
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CheckpointError(f"{path}: shard {shard!r} of {key} is not a file name inside the checkpoint")
    return weight_map


def find_weight_files(
    name_or_path: str | os.PathLike, use_safetensors: bool | None = None, **hub_kwargs: Any
) -> WeightFiles:
    """The weight files to read, safetensors first; a sharded checkpoint gives all of its shards.
    use_safetensors (transformers' argument): True reads only safetensors, False only .bin files."""
    names = [n for n in WEIGHT_FILES if use_safetensors is None or ("safetensors" in n) == use_safetensors]
    for filename in names:
        path = resolve_file(name_or_path, filename, **hub_kwargs)
        if path is None:
            continue
        if not filename.endswith(".index.json"):
            return WeightFiles([path])
        weight_map = _read_shard_index(path)
        shards = sorted(set(weight_map.values()))
        files = WeightFiles(resolve_file(name_or_path, shard, required=True, **hub_kwargs) for shard in shards)
        files.weight_map = weight_map
        return files
    if not Path(name_or_path).is_dir():
        _raise_if_not_cached(str(name_or_path), **hub_kwargs)
    at = f" at revision {hub_kwargs['revision']}" if hub_kwargs.get("revision") else ""
    raise CheckpointNotFoundError(f"{name_or_path!s}{at} has none of {', '.join(names)}")


def _raise_if_not_cached(
    name: str,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> None:
    """When the hub was not asked (offline, or unreachable), "has none of" would be a guess: say that
    no weight file is cached, where the cache was searched, and what to do."""
    offline = local_files_only or hub_offline()
    unreachable = None if offline else hub_unreachable_reason()
    if not offline and unreachable is None:
        return
    message = not_cached_message(
        f"weight file {WEIGHT_FILES[0]} (or {', '.join(WEIGHT_FILES[1:])})", name, WEIGHT_FILES, revision=revision,
        cache=hub_cache_dir(cache_dir), local_files_only=local_files_only, unreachable=unreachable,
    )  # fmt: skip
    raise CheckpointNotFoundError(message)


def pin_to_snapshot(name_or_path: str | os.PathLike, config_path: Path, hub_kwargs: dict[str, Any]) -> dict[str, Any]:
    """`hub_kwargs` with the revision pinned to the commit config.json came from.

    Every hub file is resolved on its own, and a branch ("main") is looked up again each time: were
    refs/main to move between files (a push to the hub, another process downloading the new revision
    into the cache), the weights or a shard would come from another commit than the config. transformers
    pins its `_commit_hash` the same way."""
    commit = snapshot_commit(config_path)
    if commit is None or Path(name_or_path).is_dir():
        return hub_kwargs
    return {**hub_kwargs, "revision": commit}


def _read_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                yield key, handle.get_tensor(key)
    except SafetensorError as err:
        raise CheckpointError(f"{path} is corrupt or truncated (safetensors: {err})") from None


def _read_bin(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    mmap = zipfile.is_zipfile(path)  # only the zip format can be memory-mapped
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError… for bad files
        raise CheckpointError(f"{path} is corrupt, truncated or not a weights-only checkpoint: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    yield from state.items()


def read_state_dict(files: list[Path], dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    weight_map = getattr(files, "weight_map", None)
    found_in: dict[str, str] = {}
    for path in files:
        reader = _read_safetensors if path.name.endswith(".safetensors") else _read_bin
        for raw_key, tensor in reader(path):
            key = _legacy_key(raw_key)
            if key in state:
                raise CheckpointError(f"{key} appears twice in the checkpoint shards ({found_in[key]} and {path.name})")
            if not tensor.is_floating_point():
                raise CheckpointError(f"{path}: {raw_key} is a {tensor.dtype} tensor; this model's weights are float")
            found_in[key] = path.name
            # the conversion happens per tensor, so peak memory stays at one checkpoint copy plus the largest tensor
            state[key] = tensor.to(device=device, dtype=dtype)
    if weight_map is not None:
        absent = sorted(k for k, shard in weight_map.items() if found_in.get(_legacy_key(k)) != shard)
        if absent:
            shown = ", ".join(f"{k} (in {weight_map[k]}?)" for k in absent[:8])
            more = f" … (+{len(absent) - 8} more)" if len(absent) > 8 else ""
            raise CheckpointError(f"the shard index lists keys its shards do not hold: {shown}{more}")
    return state


def _legacy_key(key: str) -> str:
    """Old transformers checkpoints named LayerNorm weights gamma/beta."""
    if key.endswith(".gamma"):
        return key[: -len("gamma")] + "weight"
    if key.endswith(".beta"):
        return key[: -len("beta")] + "bias"
    return key


def build_for_keys(config: ViTHybridConfig, keys: set[str]) -> ViTHybridPreTrainedModel:
    """The class the checkpoint was saved from, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        if any(k.startswith("vit.") for k in keys):
            return ViTHybridForImageClassification(config)
        return ViTHybridModel(
            config,
            add_pooling_layer="pooler.dense.weight" in keys,
            use_mask_token="embeddings.mask_token" in keys,
        )


SHOWN = 5  # keys listed per kind in a mismatch error; the rest are counted


def _in_backbone(key: str) -> bool:
    return ".backbone." in key


def _in_layer(part: str) -> Callable[[str], bool]:
    pattern = re.compile(rf"encoder\.layer\.\d+\.{part}")
    return lambda key: pattern.search(key) is not None


def _in_patch_embedding(key: str) -> bool:
    return "patch_embeddings.projection." in key or "position_embeddings" in key


# What each config field that decides weights decides: which keys (a predicate), and whether it decides
# their sizes or which of them exist. transformers writes every top-level field but only the backbone
# fields that differ from its defaults (ours): a left-out field is blamed only where its default shows.
_DECIDES: dict[str, tuple[Callable[[str], bool], str]] = {
    "hidden_size": (lambda key: not _in_backbone(key), "size"),
    "num_hidden_layers": (_in_layer(""), "presence"),
    "intermediate_size": (_in_layer(r"(intermediate|output)\.dense\."), "size"),
    "qkv_bias": (_in_layer(r"attention\.attention\.(query|key|value)\.bias$"), "presence"),
    "patch_size": (_in_patch_embedding, "size"),
    "backbone_featmap_shape": (_in_patch_embedding, "size"),
    "id2label": (lambda key: key.startswith("classifier."), "size"),
    "num_channels": (_in_backbone, "size"),
    "backbone_config": (_in_backbone, "any"),
    "backbone_config.depths": (_in_backbone, "presence"),
    "backbone_config.layer_type": (_in_backbone, "presence"),
    **{
        f"backbone_config.{field}": (_in_backbone, "size")
        for field in ("num_channels", "embedding_size", "hidden_sizes", "width_factor")
    },
}


def _differing_dims(checkpoint: tuple[int, ...], model: tuple[int, ...]) -> set[int]:
    """The model's dimensions where its shape departs from the checkpoint's."""
    if len(checkpoint) != len(model):
        return set(model)
    return {m for c, m in zip(checkpoint, model) if c != m}


def _defaulted_causes(
    config: ViTHybridConfig | None, absent_or_extra: list[str], misshaped: dict[str, set[int]]
) -> list[str]:
    """The fields config.json left out whose default shows in what does not fit, described.

    A field deciding which weights exist is blamed for a missing or unexpected key it decides; one
    deciding sizes, for a mis-shaped key it decides where the model's differing size is its default
    (hidden_size 768 in (80, 768) vs the checkpoint's (80, 48))."""
    causes = []
    for field, value in (getattr(config, "defaulted_fields", None) or {}).items():
        if field not in _DECIDES:
            continue
        decides, kind = _DECIDES[field]
        if field == "id2label":
            sizes = {len(value)}
        else:
            sizes = set(value) if isinstance(value, (list, tuple)) else {value} if isinstance(value, int) else set()
        absence = kind != "size" and any(decides(key) for key in absent_or_extra)
        shape = kind != "presence" and any(
            decides(key) and (kind == "any" or dims & sizes) for key, dims in misshaped.items()
        )
        if absence or shape:
            causes.append(_describe_default(field, value))
    return causes


def _describe_default(field: str, value: Any) -> str:
    if field == "id2label":
        return f"id2label or num_labels (so {len(value)} labels were used)"
    if field == "backbone_config":
        return "backbone_config (so the default BiT-R50 backbone was used)"
    return f"{field} (so {json.dumps(value)} was used)"


def check_state_dict(
    model: torch.nn.Module,
    state: dict[str, torch.Tensor],
    source: str,
    config: ViTHybridConfig | None = None,
    fresh: set[str] = frozenset(),
    config_changed: bool = False,
) -> None:
    """Raise CheckpointError unless `state` has exactly the model's keys and shapes (but `fresh`, the keys
    left out to be initialized anew).

    When the config was read from a file that left out a field deciding the keys that do not fit,
    the error leads with that field and the default it took — the likeliest cause — and then shows
    the first few keys of each kind, counting the rest."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state) - fresh)
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(k for k in set(expected) & set(state) if tuple(state[k].shape) != expected[k])
    if not (missing or unexpected or misshaped):
        return

    def show(items: list[str]) -> str:
        return ", ".join(items[:SHOWN]) + (f" … and {len(items) - SHOWN} more" if len(items) > SHOWN else "")

    described = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}" for k in misshaped]
    parts = [f"{name} ({len(items)}): {show(items)}" for name, items in
             (("missing", missing), ("unexpected", unexpected), ("mis-shaped", described)) if items]  # fmt: skip
    config = config if config is not None else getattr(model, "config", None)
    causes = _defaulted_causes(
        config, missing + unexpected, {k: _differing_dims(tuple(state[k].shape), expected[k]) for k in misshaped}
    )
    if causes:
        config_file = getattr(config, "config_file", None) or "config.json"
        lead = (
            f"{config_file} does not set {', '.join(causes)}, which is likely why the weights in {source} "
            f"do not fit the model built from it (set {'them' if len(causes) > 1 else 'it'} to the checkpoint's value)"
        )
        raise CheckpointError(f"{lead} — " + "; ".join(parts))
    # a config changed on purpose (a head of other classes): transformers' flag starts those weights afresh.
    # Not offered where the checkpoint disagrees with its own config.json: a fresh head would hide a broken
    # checkpoint (and no command has that flag)
    hint = ""
    if config_changed:
        hint = " (to start the weights the changed config needs afresh, pass ignore_mismatched_sizes=True)"
    described_config = "the config as changed by the arguments given" if config_changed else "its config.json"
    raise CheckpointError(f"{source} does not match {described_config} — " + "; ".join(parts) + hint)


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | int | None = None,
    model_class: type[ViTHybridPreTrainedModel] | None = None,
    config: ViTHybridConfig | dict[str, Any] | None = None,
    ignore_mismatched_sizes: bool = False,
    use_safetensors: bool | None = None,
    loading_info: dict[str, list] | None = None,
    **hub_kwargs: Any,
) -> ViTHybridPreTrainedModel:
    """Config + weights → model in eval mode, with reference (plain PyTorch) modules.

    config, ignore_mismatched_sizes, use_safetensors, loading_info: as `load` takes them."""
    config_arg = config
    if model_class is not None and not (
        isinstance(model_class, type) and issubclass(model_class, ViTHybridPreTrainedModel)
    ):
        # before the weights are read (a string such as "ViTHybridModel" failed only after, in isinstance)
        raise TypeError(f"model_class must be ViTHybridModel or ViTHybridForImageClassification, got {model_class!r}")
    # a config given whole makes config.json optional: a weights-only save (transformers' Trainer saves a
    # model that is not its PreTrainedModel that way) loads with the config it was trained with
    given = isinstance(config, ViTHybridConfig)
    config_path = resolve_file(name_or_path, "config.json", required=not given, **hub_kwargs)
    saved = ViTHybridConfig.from_json_file(config_path) if config_path else None
    config = changed_config(saved, config)
    if config_path is not None:
        hub_kwargs = pin_to_snapshot(name_or_path, config_path, hub_kwargs)
    # "auto" is the dtype the weights were saved in: config.json's, where a config given whole names none
    dtype = resolve_dtype(dtype, config if config.torch_dtype or saved is None else saved)
    device = resolve_device(device)
    files = find_weight_files(name_or_path, use_safetensors, **hub_kwargs)
    logger.info("loading %s from %s", name_or_path, ", ".join(str(f) for f in files))
    raw = read_state_dict(files, dtype, device)
    state = _state_for_class(raw, model_class, ignore_mismatched_sizes, name_or_path)
    if loading_info is not None and model_class is ViTHybridModel and state is not raw:
        # the classifier's head, dropped for its encoder: unused, as transformers reports it
        loading_info.setdefault("unexpected_keys", []).extend(sorted(k for k in raw if not k.startswith("vit.")))
    model = build_for_keys(config, set(state))
    fresh = loosen(model, state, loading_info) if ignore_mismatched_sizes else []
    check_state_dict(model, state, str(name_or_path), config, fresh=set(fresh), config_changed=config_arg is not None)
    model.load_state_dict(state, strict=not fresh, assign=True)
    initialize(model, fresh, config.initializer_range, dtype, device)
    return model.eval()


def _state_for_class(
    state: dict[str, torch.Tensor], model_class: type | None, ignore_mismatched_sizes: bool, source: Any
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors named as `model_class` names them (None: the checkpoint's own class).

    A classifier checkpoint read as ViTHybridModel gives its encoder (the head dropped, as transformers
    does). A headless one read as a classifier needs a head started afresh: transformers does that with a
    warning; here only when asked by ignore_mismatched_sizes=True, since an untrained head's predictions
    look like any others."""
    classifier = any(k.startswith("vit.") for k in state)
    if model_class is ViTHybridModel and classifier:
        logger.info("%s: the classification head is dropped (ViTHybridModel asked for)", source)
        return {k.removeprefix("vit."): v for k, v in state.items() if k.startswith("vit.")}
    if model_class is ViTHybridForImageClassification and not classifier:
        if not ignore_mismatched_sizes:
            raise CheckpointError(
                f"{source} holds a ViTHybridModel without a classification head; load it with "
                "ViTHybridModel.from_pretrained (or vf.load), train a head with `vithybrid-fast finetune`, or "
                "start one afresh with ignore_mismatched_sizes=True (and num_labels or id2label), as transformers does"
            )
        # the classifier's encoder has neither pooler nor mask token: loosen() names them as unused
        return {f"vit.{k}": v for k, v in state.items()}
    return state


def load(
    name_or_path: str | os.PathLike,
    kernels: str | dict[str, str] = "auto",
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | int | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    cuda_graphs: bool = False,
    model_class: type[ViTHybridPreTrainedModel] | None = None,
    frozen: bool = False,
    config: ViTHybridConfig | dict[str, Any] | None = None,
    ignore_mismatched_sizes: bool = False,
    use_safetensors: bool | None = None,
    loading_info: dict[str, list] | None = None,
) -> torch.nn.Module:
    """Load a ViT Hybrid checkpoint (hub repo id or local directory) ready for inference.

    kernels: "eager" | "sdpa" | "triton" | "auto" (on a GPU that runs Triton, per op the faster of kernel
    and torch; else sdpa) or a dict per module family, e.g. {"attention": "triton", "mlp": "torch"}; see
    `vithybrid_fast.patch`.
    cuda_graphs: wrap the model so each input shape is captured once as a CUDA graph and replayed
    (static input buffers per batch size; calls it cannot serve fall through to the model).
    model_class: the class asked for (`from_pretrained` passes its own); None takes what the checkpoint holds.
    frozen: `vithybrid_fast.freeze(model)`: derived weights (standardized conv weights, fused QKV) are
    computed once and held, on the promise that the weights will not change (see `freeze`).
    config: a ViTHybridConfig to build instead of the checkpoint's config.json (which may then be absent,
    as in a weights-only save), or a dict of fields to change in it ({"num_labels": 3}).
    ignore_mismatched_sizes: weights whose shape the config does not take (a head of other classes)
    start from transformers' initialization, with a warning, instead of being a CheckpointError.
    use_safetensors: True reads only safetensors files, False only .bin files (None: safetensors first).
    loading_info: a dict to fill with what transformers' `output_loading_info` reports (missing_keys,
    unexpected_keys, mismatched_keys, error_msgs).
    """
    from .patching import apply_kernels, validate_kernels

    resolved_device = resolve_device(device)
    # fail before reading 400 MB ("auto" needs the checkpoint's config: the model's own check runs then)
    wanted_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype, None)
    validate_kernels(kernels, device=resolved_device, dtype=wanted_dtype)
    if cuda_graphs and resolved_device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs device='cuda', got {resolved_device}")
    model = load_model(
        name_or_path, dtype, device, model_class, config=config, ignore_mismatched_sizes=ignore_mismatched_sizes,
        use_safetensors=use_safetensors, loading_info=loading_info,
        revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
    )  # fmt: skip
    model = apply_kernels(model, kernels)
    if frozen:
        from .weight_cache import freeze

        freeze(model)
    if cuda_graphs:
        from .cuda_graphs import enable_cuda_graphs

        return enable_cuda_graphs(model)
    return model
