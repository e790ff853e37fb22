"""ViTHybridConfig and BitConfig: read and write HuggingFace `config.json` without transformers.

Field names and defaults follow transformers 4.47.1 (`ViTHybridConfig`, `BitConfig`), so a
config.json written by transformers loads here and one written here loads there. Fields we do not
use are kept verbatim and written back; fields we use are validated, and contradictory ones
(a label map that disagrees with `num_labels`, `out_features` against `out_indices`, a backbone
whose channels do not match `backbone_featmap_shape`) raise `ValueError` instead of being guessed.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from .config_checks import (
    FLAG,
    NON_NEGATIVE,
    OUTPUT_STRIDE,
    POSITIVE,
    POSITIVE_INT,
    PROBABILITY,
    as_hw,
    as_int_list,
    check_fields,
    is_int,
    is_list_of,
)
from .files import write_atomic

logger = logging.getLogger(__name__)

ACTIVATIONS = (
    "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "quick_gelu", "relu", "selu", "silu", "swish",
    "tanh", "sigmoid", "mish", "linear",
)  # fmt: skip
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
PROBLEM_TYPES = (None, "regression", "single_label_classification", "multi_label_classification")
# Left out of config.json, these take transformers' default unseen: no weight has a shape they decide.
_UNSEEN_IN_WEIGHTS = ("num_attention_heads", "layer_norm_eps", "hidden_act")

# Generic PretrainedConfig fields that a transformers config.json carries; we keep them on round-trip.
_GENERIC_DEFAULTS: dict[str, Any] = {
    "architectures": None,
    "problem_type": None,
    "torch_dtype": None,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
}


def _check_activation(name: Any, field: str) -> str:
    if not isinstance(name, str) or name not in ACTIVATIONS:
        raise ValueError(f"{field}={name!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
    return name


def inverse_labels(id2label: dict[int, str]) -> dict[str, int]:
    """name → index; a name given twice (ImageNet-1k's "crane") maps to its last index, as a dict built
    the obvious way (transformers') does."""
    return {name: index for index, name in sorted(id2label.items())}


def labels_agree(id2label: dict[int, str], label2id: dict[str, int]) -> bool:
    """Whether label2id names exactly id2label's names, each at an index id2label gives that name."""
    return set(label2id) == set(id2label.values()) and all(id2label.get(i) == n for n, i in label2id.items())


class _ConfigBase:
    """Shared JSON plumbing: known fields are attributes, unknown ones are kept in `extra`."""

    model_type: str = ""
    _DEFAULTS: dict[str, Any] = {}

    def __init__(self, **kwargs: Any) -> None:
        kwargs = dict(kwargs)
        given_type = kwargs.pop("model_type", self.model_type)
        if given_type != self.model_type:
            raise ValueError(f"{type(self).__name__} expects model_type={self.model_type!r}, got {given_type!r}")
        for key, default in self._DEFAULTS.items():
            setattr(self, key, copy.deepcopy(kwargs.pop(key, default)))
        self.extra: dict[str, Any] = kwargs

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self.extra)
        out.update({key: copy.deepcopy(getattr(self, key)) for key in self._DEFAULTS})
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**data)

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.to_dict() == other.to_dict()  # type: ignore[union-attr]

    def __repr__(self) -> str:
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True)}"


class BitConfig(_ConfigBase):
    """The BiT ResNet backbone (transformers' `BitConfig`)."""

    model_type = "bit"
    _DEFAULTS = {
        "num_channels": 3,
        "embedding_size": 64,
        "hidden_sizes": [256, 512, 1024, 2048],
        "depths": [3, 4, 6, 3],
        "layer_type": "preactivation",
        "hidden_act": "relu",
        "global_padding": None,
        "num_groups": 32,
        "drop_path_rate": 0.0,
        "embedding_dynamic_padding": False,
        "output_stride": 32,
        "width_factor": 1,
        "out_features": None,
        "out_indices": None,
    }

    _RULES = {
        **dict.fromkeys(("num_channels", "embedding_size", "num_groups", "width_factor"), POSITIVE_INT),
        "output_stride": OUTPUT_STRIDE,
        "drop_path_rate": PROBABILITY,
        "embedding_dynamic_padding": FLAG,
    }

    def __init__(self, **kwargs: Any) -> None:
        kwargs.pop("stage_names", None)  # derived from depths; recomputed below
        super().__init__(**kwargs)
        if self.layer_type not in ("preactivation", "bottleneck"):
            raise ValueError(f"backbone_config.layer_type={self.layer_type!r} is not one of preactivation, bottleneck")
        if self.global_padding is not None:
            if not isinstance(self.global_padding, str) or self.global_padding.upper() not in ("SAME", "VALID"):
                raise ValueError(f"backbone_config.global_padding={self.global_padding!r}: use 'SAME', 'VALID' or null")
            self.global_padding = self.global_padding.upper()
        self.depths = as_int_list(self.depths, "backbone_config.depths")
        self.hidden_sizes = as_int_list(self.hidden_sizes, "backbone_config.hidden_sizes")
        if len(self.hidden_sizes) < len(self.depths):
            raise ValueError(
                f"backbone_config.hidden_sizes {self.hidden_sizes} has fewer entries than depths {self.depths}"
            )
        _check_activation(self.hidden_act, "backbone_config.hidden_act")
        check_fields(self, self._RULES, prefix="backbone_config.")
        self.out_features, self.out_indices = self._align_outputs(self.out_features, self.out_indices)
        self._check_num_groups()

    def _check_num_groups(self) -> None:
        """Every GroupNorm splits its channels into num_groups: the stem's, each stage's output and its
        bottleneck's (a quarter), and the pre-activation model's final norm over hidden_sizes[-1]."""
        stages = [channels for channels, _, _ in self.stage_plan()]
        normed = {self.embedding_size, *stages, *(make_div(channels * 0.25) for channels in stages)}
        if self.layer_type == "preactivation":
            normed.add(self.hidden_sizes[-1])
        indivisible = sorted(channels for channels in normed if channels % self.num_groups)
        if indivisible:
            raise ValueError(
                f"backbone_config.num_groups must divide the channels of every GroupNorm, got {self.num_groups}, "
                f"which does not divide {indivisible}"
            )

    @property
    def stage_names(self) -> list[str]:
        return ["stem"] + [f"stage{i}" for i in range(1, len(self.depths) + 1)]

    def _align_outputs(self, features: Any, indices: Any) -> tuple[list[str], list[int]]:
        names = self.stage_names
        if features is None and indices is None:
            return [names[-1]], [len(names) - 1]
        if features is not None and not is_list_of(features, lambda f: isinstance(f, str)):
            raise ValueError(f"backbone_config.out_features must be a list of stage names or null, got {features!r}")
        if indices is not None and not is_list_of(indices, is_int):
            raise ValueError(f"backbone_config.out_indices must be a list of stage indices or null, got {indices!r}")
        if features is not None:
            unknown = [f for f in features if f not in names]
            if unknown:
                raise ValueError(f"out_features {unknown} are not stages; stages are {names}")
        if indices is not None:
            bad = [i for i in indices if not -len(names) <= i < len(names)]
            if bad:
                raise ValueError(f"out_indices {bad} are out of range for stages {names}")
            indices = [i % len(names) for i in indices]
        if features is None:
            features = [names[i] for i in indices]
        if indices is None:
            indices = [names.index(f) for f in features]
        if [names.index(f) for f in features] != list(indices):
            raise ValueError(f"out_features {features} and out_indices {indices} name different stages")
        if list(indices) != sorted(set(indices)):
            raise ValueError(f"out_features {features} must be unique and in stage order")
        return list(features), list(indices)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["stage_names"] = self.stage_names
        return dict(sorted(out.items()))

    def stage_plan(self) -> list[tuple[int, int, int]]:
        """(out_channels, stride, dilation) of stage1, stage2, … — the one place the stage layout is derived.

        Channels are transformers' make_div of hidden_sizes × width_factor; once the running output
        stride reaches output_stride, later stages dilate instead of striding."""
        plan, current, dilation = [], 4, 1
        for stage_idx, hidden in enumerate(self.hidden_sizes[: len(self.depths)]):
            stride = 1 if stage_idx == 0 else 2
            if current >= self.output_stride:
                dilation, stride = dilation * stride, 1
            plan.append((make_div(hidden * self.width_factor), stride, dilation))
            current *= stride
        return plan

    def stage_channels(self) -> list[int]:
        """Output channels of stem, stage1, …"""
        return [self.embedding_size] + [channels for channels, _, _ in self.stage_plan()]


def make_div(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of 8, never below 90% of the request (BiT/timm rule)."""
    new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class ViTHybridConfig(_ConfigBase):
    """ViT Hybrid (transformers' `ViTHybridConfig`), with its `BitConfig` as `backbone_config`."""

    model_type = "vit-hybrid"
    _DEFAULTS = {
        **_GENERIC_DEFAULTS,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "image_size": 224,
        "patch_size": 1,
        "num_channels": 3,
        "backbone_featmap_shape": [1, 1024, 24, 24],
        "qkv_bias": True,
    }

    def __init__(
        self,
        backbone_config: BitConfig | dict[str, Any] | None = None,
        id2label: dict[Any, str] | None = None,
        label2id: dict[str, int] | None = None,
        num_labels: int | None = None,
        attn_implementation: str = "sdpa",
        **kwargs: Any,
    ) -> None:
        for unsupported in ("backbone", "backbone_kwargs"):
            if kwargs.get(unsupported):
                raise ValueError(
                    f"{unsupported}={kwargs[unsupported]!r}: only an inline BiT backbone_config is supported"
                )
        for unsupported in ("use_timm_backbone", "use_pretrained_backbone"):
            if kwargs.get(unsupported):
                raise ValueError(f"{unsupported}=true is not supported: the BiT backbone is built from backbone_config")
        kwargs.pop("_attn_implementation", None)
        kwargs.pop("_attn_implementation_autoset", None)
        super().__init__(**kwargs)
        if backbone_config is None:
            backbone_config = {
                "global_padding": "same", "layer_type": "bottleneck", "depths": [3, 4, 9],
                "out_features": ["stage3"], "embedding_dynamic_padding": True,
            }  # fmt: skip
        if isinstance(backbone_config, dict):
            backbone_config = BitConfig(**backbone_config)
        if not isinstance(backbone_config, BitConfig):
            raise ValueError(f"backbone_config must be a BitConfig or a dict, got {type(backbone_config).__name__}")
        self.backbone_config = backbone_config
        self.attn_implementation = attn_implementation
        self._set_labels(id2label, label2id, num_labels)
        self._validate()
        # Set by from_json_file: the file read, and the fields it left out → the default each took
        # (backbone ones dotted, "backbone_config.depths"). Not part of the config (to_dict, ==): the
        # loader names them when the weights do not fit, since a left-out size is the likeliest cause.
        self.config_file: str | None = None
        self.defaulted_fields: dict[str, Any] = {}

    # -- labels ---------------------------------------------------------------------------------
    def _set_labels(self, id2label: Any, label2id: Any, num_labels: int | None) -> None:
        if num_labels is not None and not (is_int(num_labels) and num_labels >= 0):
            raise ValueError(f"num_labels must be an int >= 0, got {num_labels!r}")
        if id2label is None:
            count = 2 if num_labels is None else num_labels
            id2label = {i: f"LABEL_{i}" for i in range(count)}
        if not isinstance(id2label, dict):
            raise ValueError(f"id2label must be an object of class index → name, got {type(id2label).__name__}")
        try:
            id2label = {int(k): str(v) for k, v in id2label.items()}
        except (TypeError, ValueError) as err:
            raise ValueError(f"id2label keys must be integers: {err}") from None
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError("id2label keys must be 0..num_labels-1 without gaps")
        if num_labels is not None and num_labels != len(id2label):  # transformers warns and keeps id2label
            logger.warning(
                "num_labels=%s contradicts id2label with %s entries: id2label's %s labels are used",
                num_labels, len(id2label), len(id2label),
            )  # fmt: skip
        if label2id is None:
            label2id = inverse_labels(id2label)
        if not isinstance(label2id, dict):
            raise ValueError(f"label2id must be an object of name → class index, got {type(label2id).__name__}")
        for name, index in label2id.items():
            if not (is_int(index) or str(index).isdigit()):
                raise ValueError(f"label2id[{name!r}]={index!r} is not a valid class index")
        label2id = {str(k): int(v) for k, v in label2id.items()}
        if not labels_agree(id2label, label2id):
            # id2label decides (the head's size, every name shown); transformers never checks label2id, so
            # its saves after `from_pretrained(base, id2label=...)` carry the base model's whole label2id
            logger.warning("label2id does not match id2label: rebuilt from id2label")
            label2id = inverse_labels(id2label)
        self.id2label, self.label2id = id2label, label2id

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @classmethod
    def field_names(cls) -> set[str]:
        """The fields a config takes by name (those `from_pretrained(path, <field>=value)` may change)."""
        return {*cls._DEFAULTS, "backbone_config", "id2label", "label2id", "num_labels"}

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if is_int(value) and value == len(self.id2label):
            return  # as transformers: the same count keeps the class names (LABEL_i only for a new count)
        self._set_labels(None, None, value)

    # -- validation -----------------------------------------------------------------------------
    _RULES = {
        **dict.fromkeys(("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                         "num_channels"), POSITIVE_INT),
        "layer_norm_eps": POSITIVE,
        "hidden_dropout_prob": PROBABILITY,
        "attention_probs_dropout_prob": PROBABILITY,
        "initializer_range": NON_NEGATIVE,
        **dict.fromkeys(("qkv_bias", "output_hidden_states", "output_attentions", "return_dict"), FLAG),
    }  # fmt: skip

    def _validate(self) -> None:
        check_fields(self, self._RULES)
        as_hw(self.image_size, "image_size")
        as_hw(self.patch_size, "patch_size")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        _check_activation(self.hidden_act, "hidden_act")
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type={self.problem_type!r}; choose one of {PROBLEM_TYPES[1:]} or null")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={self.attn_implementation!r}; choose one of {ATTN_IMPLEMENTATIONS}")
        if self.backbone_config.num_channels != self.num_channels:
            raise ValueError(
                f"num_channels={self.num_channels} contradicts backbone_config.num_channels="
                f"{self.backbone_config.num_channels}"
            )
        shape = self.backbone_featmap_shape
        if not isinstance(shape, (list, tuple)) or len(shape) != 4:
            raise ValueError(f"backbone_featmap_shape must be [batch, channels, height, width], got {shape!r}")
        self.backbone_featmap_shape = as_int_list(shape, "backbone_featmap_shape")
        backbone_channels = self.backbone_config.stage_channels()[self.backbone_config.out_indices[-1]]
        if self.backbone_featmap_shape[1] != backbone_channels:
            raise ValueError(
                f"backbone_featmap_shape channels {self.backbone_featmap_shape[1]} contradict the backbone's "
                f"{self.backbone_config.out_features[-1]} output of {backbone_channels} channels"
            )
        if 0 in self.position_grid:
            raise ValueError(
                f"patch_size {self.patch_size!r} is larger than the {self.feature_grid} feature map "
                "of backbone_featmap_shape: no patch would fit"
            )
        if self.backbone_grid(*self.image_size_hw) != tuple(self.feature_grid):
            logger.warning(
                "image_size %s gives a %s backbone grid but backbone_featmap_shape says %s: inputs of "
                "image_size will need interpolate_pos_encoding=True",
                self.image_size, self.backbone_grid(*self.image_size_hw), tuple(self.feature_grid),
            )  # fmt: skip

    @property
    def image_size_hw(self) -> tuple[int, int]:
        return as_hw(self.image_size, "image_size")

    @property
    def patch_size_hw(self) -> tuple[int, int]:
        return as_hw(self.patch_size, "patch_size")

    @property
    def feature_grid(self) -> tuple[int, int]:
        return self.backbone_featmap_shape[2], self.backbone_featmap_shape[3]

    @property
    def position_grid(self) -> tuple[int, int]:
        """Grid of the position-embedding table (excluding the CLS position)."""
        (fh, fw), (ph, pw) = self.feature_grid, self.patch_size_hw
        return fh // ph, fw // pw

    def backbone_grid(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the backbone's output feature map for an input of height × width."""
        bb = self.backbone_config
        return grid_after_backbone(bb, height), grid_after_backbone(bb, width)

    # -- (de)serialization ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["backbone_config"] = self.backbone_config.to_dict()
        out["id2label"] = {str(k): v for k, v in sorted(self.id2label.items())}
        # `config.id2label = {...}` leaves label2id as it was: what is written agrees with id2label
        label2id = self.label2id if labels_agree(self.id2label, self.label2id) else inverse_labels(self.id2label)
        out["label2id"] = dict(sorted(label2id.items()))
        return dict(sorted(out.items()))

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        # renamed into place: a symlink there (a hub cache snapshot points into its blobs) is replaced,
        # not written through, and a reader never sees half a file
        text = self.to_json_string()
        write_atomic(path, lambda tmp: tmp.write_text(text))
        return path

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ViTHybridConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} must hold a JSON object")
        try:
            config = cls.from_dict(data)
        except (TypeError, ValueError) as err:  # TypeError: a value of a kind no check above foresaw
            # A field missing from a hand-edited file takes its default, and the error then names the
            # contradiction, not the missing field: say both, and which file.
            own = [key for key in cls._DEFAULTS if key not in _GENERIC_DEFAULTS]
            missing = [key for key in [*own, "backbone_config", "id2label"] if key not in data]
            hint = f" (not in the file, so defaulted: {', '.join(missing)})" if missing else ""
            raise ValueError(f"{path}: {err}{hint}") from err
        config.config_file = str(path)
        config.defaulted_fields = config._defaulted_in(data)
        unseen = {key: value for key, value in config.defaulted_fields.items() if key in _UNSEEN_IN_WEIGHTS}
        if unseen:
            logger.warning(
                "%s does not set %s: transformers' defaults are used, which no weight shape can confirm (the "
                "outputs are wrong if the checkpoint was trained with other values)",
                path, ", ".join(f"{key} (default {json.dumps(value)})" for key, value in unseen.items()),
            )  # fmt: skip
        return config

    def _defaulted_in(self, data: dict[str, Any]) -> dict[str, Any]:
        """The fields `data` leaves out → the default each took (derived ones, like stage_names, aside).

        transformers writes every top-level field and the whole label map, but only the backbone fields
        that differ from its defaults (which are ours), so a left-out backbone field is usual."""
        defaulted = {
            key: copy.deepcopy(getattr(self, key))
            for key in self._DEFAULTS
            if key not in _GENERIC_DEFAULTS and key not in data
        }
        if "id2label" not in data and "num_labels" not in data:
            defaulted["id2label"] = dict(self.id2label)
        backbone = data.get("backbone_config")
        if not isinstance(backbone, dict):
            defaulted["backbone_config"] = self.backbone_config.to_dict()
            return defaulted
        for key in BitConfig._DEFAULTS:
            if key not in backbone and key not in ("out_features", "out_indices"):
                defaulted[f"backbone_config.{key}"] = copy.deepcopy(getattr(self.backbone_config, key))
        if "out_features" not in backbone and "out_indices" not in backbone:
            defaulted["backbone_config.out_features"] = list(self.backbone_config.out_features)
        return defaulted

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **hub_kwargs: Any) -> ViTHybridConfig:
        """Read config.json from a local directory or file, or from the hub (see `hub.resolve_file`)."""
        from .hub import CheckpointNotFoundError, resolve_file

        path = Path(name_or_path)
        if path.is_file():
            return cls.from_json_file(path)
        try:
            return cls.from_json_file(resolve_file(name_or_path, "config.json", required=True, **hub_kwargs))
        except CheckpointNotFoundError:
            preset = PRESETS.get(str(name_or_path))
            if preset is None or hub_kwargs.get("revision") not in (None, "main"):
                raise
            # the hub's config.json is known and identical to the preset: the architecture builds offline
            logger.warning("config.json of %s not reachable or cached: using the built-in preset", name_or_path)
            return preset()

    @classmethod
    def base_384(cls, **overrides: Any) -> ViTHybridConfig:
        """The exact config of `google/vit-hybrid-base-bit-384` (1000 ImageNet classes)."""
        data = copy.deepcopy(BASE_384)
        data["id2label"] = dict(enumerate(imagenet_labels()))
        data.update(overrides)
        return cls.from_dict(data)


def grid_after_backbone(bb: BitConfig, size: int) -> int:
    """Output length of one spatial axis through the BiT stem and stages (any padding mode)."""

    def conv_out(x: int, k: int, s: int, d: int = 1) -> int:
        if bb.global_padding == "SAME":
            return -(-x // s)
        pad = 0 if bb.global_padding == "VALID" else ((s - 1) + d * (k - 1)) // 2
        return (x + 2 * pad - d * (k - 1) - 1) // s + 1

    x = conv_out(size, 7, 2)
    if bb.global_padding != "SAME":
        x += 2  # the stem's ConstantPad2d(1)
    x = -(-x // 2) if bb.embedding_dynamic_padding else (x - 3) // 2 + 1
    for _, stride, _ in bb.stage_plan()[: bb.out_indices[-1]]:
        if stride > 1:
            # the stride-2 1×1 downsample conv decides the shortcut's size; the 3×3 conv matches it
            x = conv_out(x, 1, stride)
    return x


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in the order of the hub checkpoint's id2label."""
    text = resources.files("vithybrid_fast").joinpath("assets/imagenet1k_labels.json").read_text()
    return json.loads(text)


BASE_384: dict[str, Any] = {
    "architectures": ["ViTHybridForImageClassification"],
    "attention_probs_dropout_prob": 0.0,
    "backbone_config": {
        "depths": [3, 4, 9],
        "embedding_dynamic_padding": True,
        "global_padding": "SAME",
        "hidden_sizes": [256, 512, 1024, 2048],
        "layer_type": "bottleneck",
        "num_groups": 32,
        "out_features": ["stage3"],
        "model_type": "bit",
    },
    "backbone_featmap_shape": [1, 1024, 24, 24],
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 768,
    "image_size": 384,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "model_type": "vit-hybrid",
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 1,
    "qkv_bias": True,
    "torch_dtype": "float32",
}

PRESETS = {"google/vit-hybrid-base-bit-384": ViTHybridConfig.base_384}
