"""Image processor with the semantics of transformers' `ViTHybridImageProcessor` (4.47.1), standalone.

Pipeline per image (all steps switchable per call, as in transformers):
  convert to RGB → resize (shortest edge, PIL, on uint8) → center crop (zero-pads small images)
  → rescale (×1/255) → normalize ((x − mean) / std) → channels-first float32.

Numerics that matter for bit-parity with transformers:
  * resizing goes through PIL on uint8; float images in [0, 1] are scaled by 255 in float64, cast to
    float32 and *truncated* to uint8 first, then divided by 255 again afterwards (transformers' round trip);
  * the long edge is `int(shortest_edge * long / short)` (truncation, not rounding);
  * rescale multiplies in float64 and casts to float32; normalize runs in float32 (the dtype of the image).

Class defaults are transformers' class defaults (224 px, OpenAI CLIP mean/std). The released checkpoint
`google/vit-hybrid-base-bit-384` uses `BASE_384_PREPROCESSOR_CONFIG` (384 px, mean = std = 0.5); get it with
`ViTHybridImageProcessor.for_base_384()` or `load_processor("google/vit-hybrid-base-bit-384")`.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .files import write_atomic
from .hub import CheckpointNotFoundError, resolve_file

logger = logging.getLogger(__name__)
BASE_384_REPO_ID = "google/vit-hybrid-base-bit-384"

CONFIG_NAME = "preprocessor_config.json"
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
BASE_384_PREPROCESSOR_CONFIG: dict[str, Any] = {
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTHybridImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 384},
    "crop_size": {"height": 384, "width": 384},
}

# transformers' ViTImageProcessor's defaults, where they differ from ours: a checkpoint saved with one (its
# preprocessor_config.json says so) resizes to `size` without a center crop, with its own mean and std.
VIT_IMAGE_PROCESSOR_DEFAULTS: dict[str, Any] = {
    "do_center_crop": False,
    "size": {"height": 224, "width": 224},
    "resample": 2,  # bilinear
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}

ImageInput = Image.Image | np.ndarray | torch.Tensor | Sequence[Image.Image | np.ndarray | torch.Tensor]

_FLAGS = ("do_resize", "do_center_crop", "do_rescale", "do_normalize", "do_convert_rgb")
_OPTIONS = (*_FLAGS, "size", "resample", "crop_size", "rescale_factor", "image_mean", "image_std")
# The size-dict key sets transformers accepts (`VALID_SIZE_DICT_KEYS`); only two of them can resize.
_SIZE_KEY_SETS = [set(k.split()) for k in ("height width", "shortest_edge", "shortest_edge longest_edge")]
_SIZE_KEY_SETS += [{"longest_edge"}, {"max_height", "max_width"}]
_RESAMPLE_FILTERS = frozenset(int(f) for f in Image.Resampling)  # whatever this Pillow can do
_CHANNEL_FORMATS = ("channels_first", "channels_last")
_RETURN_TENSORS = (None, "np", "pt")
# PIL modes whose arrays are not intensities: unusable unless converted to RGB
_NOT_INTENSITY_MODES = {"P": "palette indices", "PA": "palette indices", "1": "0/1 bits"}
# Keys a config may hold that are no processing options: an obsolete one, and a private attribute older
# transformers versions wrote out; transformers 4.47.1 drops both, so we neither keep nor write them back.
_DROPPED_KEYS = ("feature_extractor_type", "_valid_processor_keys")


def sample_image_path() -> Path:
    """Path of the bundled sample photograph (Grace Hopper, public domain; see assets/README.md)."""
    return Path(__file__).resolve().parent / "assets" / "grace_hopper.jpg"


class BatchFeature(dict):
    """The processor's output: a dict (`batch["pixel_values"]`) that also allows `batch.pixel_values`."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def data(self) -> dict[str, Any]:
        """The dict itself: transformers' BatchFeature is a UserDict, and code written for it reads `.data`."""
        return self

    def to(self, *args: Any, **kwargs: Any) -> BatchFeature:
        """Move/cast every tensor value with `Tensor.to(*args, **kwargs)`; other values are kept."""
        return BatchFeature({k: v.to(*args, **kwargs) if torch.is_tensor(v) else v for k, v in self.items()})


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _size_dict(size: Any, default_to_square: bool, name: str) -> dict[str, int]:
    """transformers' `get_size_dict`: an int means a square (crop) or the shortest edge (resize)."""
    if _is_int(size):
        size = {"height": size, "width": size} if default_to_square else {"shortest_edge": size}
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        size = {"height": size[0], "width": size[1]}
    if not isinstance(size, dict) or set(size) not in _SIZE_KEY_SETS:
        examples = "{'shortest_edge': 384} or {'height': 384, 'width': 384}"
        raise ValueError(f"{name} must be an int, (height, width) or a dict like {examples}; got {size!r}")
    for key, value in size.items():
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name}[{key!r}] must be a positive int, got {value!r}")
    return {key: int(value) for key, value in size.items()}


def _mean_or_std(value: Any, name: str) -> float | list[float]:
    values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be a finite number or a list of them, got {value!r}")
    # After RGB conversion an image has 1 or 3 channels, so any other length could never be applied.
    if len(values) not in (1, 3):
        raise ValueError(f"{name} must be a number or a list of 1 or 3 numbers (one per channel), got {value!r}")
    if name == "image_std" and any(v == 0 for v in values):
        raise ValueError(f"image_std must not contain 0, got {value!r}")
    return [float(v) for v in values] if isinstance(value, (list, tuple, np.ndarray)) else float(value)


def _validated(options: dict[str, Any]) -> dict[str, Any]:
    """Check and canonicalise the processing options (used at construction and for per-call overrides)."""
    out = dict(options)
    for flag in _FLAGS:
        if not isinstance(out[flag], (bool, np.bool_)):
            raise ValueError(f"{flag} must be a bool, got {out[flag]!r}")
        out[flag] = bool(out[flag])
    out["size"] = _size_dict(out["size"], default_to_square=False, name="size")
    out["crop_size"] = _size_dict(out["crop_size"], default_to_square=True, name="crop_size")
    if set(out["crop_size"]) != {"height", "width"}:
        raise ValueError(f"crop_size must have keys 'height' and 'width', got {out['crop_size']!r}")
    resample = out["resample"]
    if not _is_int(resample) or resample not in _RESAMPLE_FILTERS:
        raise ValueError(f"resample must be a PIL filter {sorted(_RESAMPLE_FILTERS)}, got {resample!r}")
    out["resample"] = int(resample)
    factor = out["rescale_factor"]
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 < factor < math.inf:
        raise ValueError(f"rescale_factor must be a positive number, got {factor!r}")
    out["rescale_factor"] = float(factor)
    out["image_mean"] = _mean_or_std(out["image_mean"], "image_mean")
    out["image_std"] = _mean_or_std(out["image_std"], "image_std")
    for name in ("image_mean", "image_std"):
        # RGB conversion makes every image 3 channels, so a 1-value list could never apply (it failed
        # image by image in classify, and `eval`'s batched path broadcast it without a word)
        if out["do_convert_rgb"] and isinstance(out[name], list) and len(out[name]) == 1:
            raise ValueError(
                f"{name} is a list of 1 value, but do_convert_rgb makes every image 3 channels: give 3 values, "
                f"or the number {out[name][0]} for all channels"
            )
    return out


def _channel_format(shape: tuple[int, ...], allow_rgba: bool) -> str:
    """transformers' `infer_channel_dimension_format` (1 or 3 channels; first axis wins a tie), then RGBA."""
    for counts in ((1, 3), (4,)) if allow_rgba else ((1, 3),):
        if shape[0] in counts:
            return "channels_first"
        if shape[-1] in counts:
            return "channels_last"
    raise ValueError(
        f"Unable to infer the channel axis of an image of shape {shape}: need 1 or 3 channels"
        f"{' (or 4, RGBA)' if allow_rgba else ''} on the first or last axis; pass input_data_format"
    )


def _pil_to_array(image: Image.Image, do_convert_rgb: bool) -> np.ndarray:
    """A PIL image's pixels, converted to RGB by PIL itself where transformers converts."""
    if do_convert_rgb and image.mode != "RGB":
        return np.asarray(image.convert("RGB"))  # as transformers: alpha is dropped, not composited
    if image.mode in _NOT_INTENSITY_MODES:
        # Unconverted, a palette image's array holds palette indices and a bilevel one 0/1: read as grey
        # intensities they gave a wrong (or a near-black) picture. transformers rejects both (a 2-D array).
        raise ValueError(
            f"a PIL image of mode {image.mode} holds {_NOT_INTENSITY_MODES[image.mode]}, not pixel intensities: "
            "pass do_convert_rgb=True or convert it first (image.convert('RGB'))"
        )
    return np.asarray(image)


def _to_hwc(image: Any, do_convert_rgb: bool, input_data_format: str | None) -> np.ndarray:
    """One image as an (H, W, C) array, converted to RGB like transformers where it converts."""
    if isinstance(image, Image.Image):
        array, input_data_format = _pil_to_array(image, do_convert_rgb), "channels_last"
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        array = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()  # numpy has no bf16
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ValueError(f"Invalid image type {type(image).__name__}: expected PIL.Image, numpy array or torch tensor")
    if array.ndim not in (2, 3):
        raise ValueError(f"An image must have 2 or 3 dimensions (4 for a batch), got shape {tuple(array.shape)}")
    if array.size == 0:
        raise ValueError(f"Empty image of shape {tuple(array.shape)}")
    if array.ndim == 2:
        array = array[..., None]  # (H, W) grayscale; transformers rejects it, we read it as one channel
    else:
        fmt = input_data_format or _channel_format(array.shape, allow_rgba=do_convert_rgb)
        array = array.transpose(1, 2, 0) if fmt == "channels_first" else array
    channels = array.shape[-1]
    if channels not in (1, 3) and not (channels == 4 and do_convert_rgb):
        raise ValueError(f"Images must have 1 or 3 channels (4 with do_convert_rgb), got {channels}")
    if do_convert_rgb and channels != 3:
        # Same result as PIL's convert("RGB") on "L" / "RGBA" images, applied to arrays too.
        array = np.repeat(array, 3, axis=-1) if channels == 1 else array[..., :3]
    return array


def _needs_255_scaling(array: np.ndarray) -> bool:
    """transformers' `_rescale_for_pil_conversion`: floats in [0, 1] must be scaled to [0, 255] for PIL."""
    if array.dtype == np.uint8:
        return False
    if np.allclose(array, array.astype(int)):
        if array.min() >= 0 and array.max() <= 255:
            return False
        raise ValueError(f"Image values must lie in [0, 255] to resize, got [{array.min()}, {array.max()}]")
    if array.min() >= 0 and array.max() <= 1:
        return True
    raise ValueError(f"Float image values must lie in [0, 1] to resize, got [{array.min()}, {array.max()}]")


def _rescale(array: np.ndarray, factor: float) -> np.ndarray:
    return (array.astype(np.float64) * factor).astype(np.float32)  # float64 product, as transformers


def _output_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    if "shortest_edge" in size:  # a "longest_edge" next to it is ignored, as transformers does
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise ValueError(f"size must contain 'shortest_edge' or 'height' and 'width' to resize, got {size!r}")


def resized_size(height: int, width: int, size: dict[str, int]) -> tuple[int, int]:
    """(height, width) the processor resizes a height × width image to, refused where it is too large."""
    new_height, new_width = _output_size(height, width, size)
    # A sliver resized by its short edge grows without bound (a 95-byte 1×3000 PNG became 384×1,152,000
    # and took 4.5 GB); transformers would do the same. Refused: a resize that enlarges the image past
    # Pillow's own error threshold, twice PIL.Image.MAX_IMAGE_PIXELS (at the default limit and 384 px,
    # aspect ratios over ~1,200:1). Never a shrink, nor a square image: both once were, whenever the
    # limit (--max-image-pixels) was below the model's input size.
    limit = Image.MAX_IMAGE_PIXELS
    made = new_height * new_width
    if limit is not None and made > 2 * limit and made > height * width:
        ratio = max(height, width) / max(min(height, width), 1)
        why = f": its aspect ratio ({ratio:,.0f}:1) is too extreme" if ratio >= 10 else ""
        raise ValueError(
            f"resizing this {width}×{height} image to {size} would make {new_width}×{new_height} pixels, "
            f"more than twice Pillow's limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS, --max-image-pixels){why}"
        )
    return new_height, new_width


def _resize(array: np.ndarray, size: dict[str, int], resample: int) -> np.ndarray:
    height, width = resized_size(array.shape[0], array.shape[1], size)
    scaled = _needs_255_scaling(array)
    pixels = _rescale(array, 255) if scaled else array
    pixels = pixels.astype(np.uint8)  # truncates, like transformers' to_pil_image
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    resized = np.asarray(image.resize((width, height), resample=resample))
    resized = resized[..., None] if resized.ndim == 2 else resized
    return _rescale(resized, 1 / 255) if scaled else resized


def _center_crop(array: np.ndarray, crop_height: int, crop_width: int) -> np.ndarray:
    height, width = array.shape[:2]
    if height < crop_height or width < crop_width:
        # transformers zero-pads a too-small image, with the odd pixel of padding on the top/left.
        new_height, new_width = max(height, crop_height), max(width, crop_width)
        padded = np.zeros((new_height, new_width, array.shape[2]), dtype=array.dtype)
        top, left = math.ceil((new_height - height) / 2), math.ceil((new_width - width) / 2)
        padded[top : top + height, left : left + width] = array
        array, height, width = padded, new_height, new_width
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    return array[top : top + crop_height, left : left + crop_width]


def _normalize(array: np.ndarray, mean: float | list[float], std: float | list[float]) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
    channels = array.shape[-1]
    per_channel = []
    for name, value in (("image_mean", mean), ("image_std", std)):
        values = value if isinstance(value, list) else [value] * channels
        if len(values) != channels:
            raise ValueError(f"{name} has {len(values)} values but the image has {channels} channels")
        per_channel.append(np.array(values, dtype=array.dtype))  # stay in the image's dtype, as transformers
    return (array - per_channel[0]) / per_channel[1]


def _as_list(images: ImageInput) -> list[Any]:
    """transformers' `make_list_of_images`: a list or a 4-D array/tensor is a batch, else one image."""
    batched = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
    images = list(images) if batched or isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("No images given")
    return images  # each element's type is checked by _to_hwc


def _preprocessing_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The `kwargs` of from_pretrained that are preprocessing options; a warning names the rest."""
    if "subfolder" in kwargs:  # a file of another folder would be read silently: refuse, as vf.load does
        raise TypeError(
            "from_pretrained() does not take subfolder: pass the folder itself (a local path, or a hub repo "
            "downloaded with huggingface_hub.snapshot_download)"
        )
    ignored = sorted(set(kwargs) - set(_OPTIONS))
    if ignored:
        warnings.warn(f"from_pretrained ignores {', '.join(ignored)}: not preprocessing options", stacklevel=3)
    return {name: value for name, value in kwargs.items() if name in _OPTIONS}


class ViTHybridImageProcessor:
    """Turns images into `pixel_values` for ViT Hybrid, matching transformers' processor of the same name.

    Unknown config keys are kept in `self.extra` and written back by `to_dict`/`save_pretrained`.
    """

    model_input_names = ["pixel_values"]  # as transformers' processor: what it makes for the model

    def __init__(
        self,
        do_resize: bool = True,
        size: int | dict[str, int] | None = None,
        resample: int = Image.Resampling.BICUBIC,
        do_center_crop: bool = True,
        crop_size: int | dict[str, int] | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: float | Sequence[float] | None = None,
        image_std: float | Sequence[float] | None = None,
        do_convert_rgb: bool = True,
        **extra: Any,
    ) -> None:
        options = _validated(
            {
                "do_resize": do_resize,
                "size": 224 if size is None else size,
                "resample": resample,
                "do_center_crop": do_center_crop,
                "crop_size": 224 if crop_size is None else crop_size,
                "do_rescale": do_rescale,
                "rescale_factor": rescale_factor,
                "do_normalize": do_normalize,
                "image_mean": OPENAI_CLIP_MEAN if image_mean is None else image_mean,
                "image_std": OPENAI_CLIP_STD if image_std is None else image_std,
                "do_convert_rgb": do_convert_rgb,
            }
        )
        for name in _OPTIONS:
            setattr(self, name, options[name])
        kind = extra.pop("image_processor_type", None)  # written by us on save
        for key in _DROPPED_KEYS:
            extra.pop(key, None)
        if kind not in (None, type(self).__name__):
            warnings.warn(f"Config is for a {kind}, read as a {type(self).__name__}", stacklevel=2)
        self.extra: dict[str, Any] = extra

    @classmethod
    def for_base_384(cls, **overrides: Any) -> ViTHybridImageProcessor:
        """The processor of `google/vit-hybrid-base-bit-384` (its hub preprocessor_config.json), offline."""
        return cls.from_dict(BASE_384_PREPROCESSOR_CONFIG, **overrides)

    @classmethod
    def from_dict(cls, config: dict[str, Any], **overrides: Any) -> ViTHybridImageProcessor:
        config = copy.deepcopy(config)
        if config.get("image_processor_type") == "ViTImageProcessor":
            # ViTImageProcessor resizes to `size` and has no center crop: read with our defaults, our 224 crop
            # cut a 384 model's input to 224 (and the error then spoke of the feature grid, not the config)
            config = {**VIT_IMAGE_PROCESSOR_DEFAULTS, **config, "image_processor_type": cls.__name__}
            warnings.warn(
                "preprocessor_config.json is a ViTImageProcessor's: read with its meaning (resize to "
                f"{config['size']}, no center crop)",
                stacklevel=2,
            )
        return cls(**{**config, **overrides})

    def to_dict(self) -> dict[str, Any]:
        out = {name: copy.deepcopy(getattr(self, name)) for name in _OPTIONS}
        out.update(copy.deepcopy(self.extra))
        out["image_processor_type"] = type(self).__name__
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string()}"

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: str | os.PathLike,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> ViTHybridImageProcessor:
        """Read preprocessor_config.json from a directory, a JSON file or a hub repo (or its cache).

        Keyword arguments that name preprocessing options override the file's; others are ignored with a
        warning (transformers ignores them silently), not kept to be written back by save_pretrained.
        """
        overrides = _preprocessing_options(overrides)
        path = Path(path_or_repo_id)
        if not path.is_file():
            try:
                path = resolve_file(
                    path_or_repo_id,
                    CONFIG_NAME,
                    required=True,
                    revision=revision,
                    cache_dir=cache_dir,
                    local_files_only=local_files_only,
                    token=token,
                )
            except CheckpointNotFoundError:
                if str(path_or_repo_id) != BASE_384_REPO_ID or revision not in (None, "main"):
                    raise
                # the hub file is known and identical to the built-in preset: work offline with it
                logger.warning("%s not reachable or cached: using the built-in preprocessor preset", CONFIG_NAME)
                return cls.for_base_384(**overrides)
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
        if not any(name in config for name in _OPTIONS) and ("architectures" in config or "model_type" in config):
            # a model's config.json names no preprocessing option: read as one it gave every default (224,
            # CLIP's mean and std), silently the wrong preprocessing for this model
            raise ValueError(
                f"{path} is a model config, not a preprocessor config (preprocessor_config.json); "
                f"pass the checkpoint directory ({path.parent}) or its preprocessor_config.json"
            )
        try:
            return cls.from_dict(config, **overrides)
        except ValueError:
            try:  # the file's own options alone: an error there names the file, an override's does not
                cls.from_dict(config)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
            raise

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write preprocessor_config.json into `save_directory` (created if needed); returns its path."""
        directory = Path(save_directory)
        if directory.is_file():
            raise NotADirectoryError(f"{directory} is a file; save_pretrained needs a directory")
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        # Renamed into place, as the model's files are: a reader never sees half a file, and a symlink
        # there (a hub cache snapshot points into its blobs) is replaced, not written through.
        text = self.to_json_string()
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return path

    def preprocess(
        self,
        images: ImageInput,
        return_tensors: str | None = None,
        *,
        data_format: str = "channels_first",
        input_data_format: str | None = None,
        **overrides: Any,
    ) -> BatchFeature:
        """Process one image or a batch into {"pixel_values": ...}.

        return_tensors: "pt" → torch tensor (B, 3, H, W) float32, "np" → numpy array, None → list of
        (3, H, W) arrays (as transformers). Overrides: any constructor option (do_resize, size, ...) for this
        call only; None means "use the processor's value". input_data_format / data_format:
        "channels_first" or "channels_last" (input inferred per image when None).
        """
        if return_tensors not in _RETURN_TENSORS:
            raise ValueError(f"return_tensors must be one of {_RETURN_TENSORS}, got {return_tensors!r}")
        # data_format has no "same as the input" (None): transformers 4.47.1 rejects None too
        if data_format not in _CHANNEL_FORMATS:
            raise ValueError(f"data_format must be one of {_CHANNEL_FORMATS}, got {data_format!r}")
        if input_data_format is not None and input_data_format not in _CHANNEL_FORMATS:
            raise ValueError(f"input_data_format must be one of {_CHANNEL_FORMATS} or None, got {input_data_format!r}")
        unknown = sorted(set(overrides) - set(_OPTIONS))
        if unknown:  # transformers logs and ignores these; a warning is harder to miss
            warnings.warn(f"Unused or unrecognized kwargs: {', '.join(unknown)}", stacklevel=2)
        opts = {name: getattr(self, name) for name in _OPTIONS}
        opts.update({k: v for k, v in overrides.items() if k in _OPTIONS and v is not None})
        opts = _validated(opts)

        arrays = [_to_hwc(image, opts["do_convert_rgb"], input_data_format) for image in _as_list(images)]
        if opts["do_rescale"] and any(a.dtype != np.uint8 and a.min() >= 0 and a.max() <= 1 for a in arrays):
            msg = "It looks like the images are already rescaled to [0, 1]; if so, pass do_rescale=False"
            warnings.warn(msg, stacklevel=2)
        outputs = []
        for array in arrays:
            if opts["do_resize"]:
                array = _resize(array, opts["size"], opts["resample"])
            if opts["do_center_crop"]:
                array = _center_crop(array, opts["crop_size"]["height"], opts["crop_size"]["width"])
            if opts["do_rescale"]:
                array = _rescale(array, opts["rescale_factor"])
            if opts["do_normalize"]:
                array = _normalize(array, opts["image_mean"], opts["image_std"])
            array = array.transpose(2, 0, 1) if data_format == "channels_first" else array
            outputs.append(np.ascontiguousarray(array, dtype=np.float32))

        if return_tensors is None:
            return BatchFeature(pixel_values=outputs)
        if len({a.shape for a in outputs}) > 1:
            shapes = sorted({a.shape for a in outputs})
            msg = f"Cannot stack images of different shapes {shapes}; use do_center_crop or return_tensors=None"
            raise ValueError(msg)
        stacked = np.stack(outputs)
        return BatchFeature(pixel_values=torch.from_numpy(stacked) if return_tensors == "pt" else stacked)

    __call__ = preprocess


def load_processor(name_or_path: str | os.PathLike, **hub_kwargs: Any) -> ViTHybridImageProcessor:
    """`ViTHybridImageProcessor.from_pretrained(name_or_path, **hub_kwargs)`."""
    return ViTHybridImageProcessor.from_pretrained(name_or_path, **hub_kwargs)
