"""Training-time augmentation for `finetune`: random resized crop and horizontal flip, on uint8.

Modes (`--augment`):
  * `crop-flip` (default): torchvision's RandomResizedCrop — a box of `min_scale`…1 of the image's area
    and aspect ratio 3/4…4/3, resized to the processor's output size with the processor's own filter —
    then a horizontal flip with probability 1/2. The recipe of transformers' and timm's image
    classification examples;
  * `flip`: the evaluation preprocessing (resize, center crop), then the flip;
  * `none`: the evaluation preprocessing only.

Every draw comes from a generator seeded with (seed, epoch, sample index), not from a process's global
generators. So an image's crop does not depend on the DataLoader worker that reads it, on the number of
workers or ranks, or on where an interrupted run resumed: `--resume` and torchrun runs see the images an
uninterrupted single-process run sees (tests/test_augment.py, tests/test_finetune.py).

The result is the (3, H, W) uint8 tensor `ImagePipeline.to_uint8` gives; rescale and normalize stay
batched on the model's device.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
from PIL import Image

from .processing import _to_hwc

MODES = ("crop-flip", "flip", "none")
RATIO = (3 / 4, 4 / 3)  # torchvision's RandomResizedCrop default
ATTEMPTS = 10  # boxes drawn before falling back to the central crop, as torchvision


def checked_min_scale(min_scale: float) -> float:
    """`min_scale` as a float, or a ValueError: a real number in (0, 1] (NaN and bools are not)."""
    if isinstance(min_scale, bool) or not isinstance(min_scale, numbers.Real) or not 0.0 < min_scale <= 1.0:
        raise ValueError(f"the smallest crop scale must lie in (0, 1], got {min_scale!r}")
    return float(min_scale)


def checked_seed(seed: int) -> int:
    """`seed` as an int, or a ValueError. numpy's SeedSequence takes non-negative integers only, and it
    would refuse a negative seed at the first draw, inside a DataLoader worker, where the error marks every
    training image unreadable; a float seed would be truncated silently."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"the augmentation seed must be an integer ≥ 0, got {seed!r}")
    return int(seed)


def crop_box(rng: np.random.Generator, height: int, width: int, min_scale: float) -> tuple[int, int, int, int]:
    """(top, left, box height, box width) of a random crop: area min_scale…1 of the image, ratio 3/4…4/3.

    A draw that does not fit the image is redrawn; after ATTEMPTS misses (very long or tall images), the
    largest central box whose ratio is clamped to 3/4…4/3 is taken, as torchvision does.
    """
    min_scale = checked_min_scale(min_scale)  # numpy's uniform(2.0, 1.0) said only "high - low < 0"
    area = height * width
    log_low, log_high = math.log(RATIO[0]), math.log(RATIO[1])
    for _ in range(ATTEMPTS):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(log_low, log_high))
        w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, min(height, round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w, h = min(width, round(height * RATIO[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainAugment:
    """`pipeline`'s per-image uint8 step with random crops and flips, seeded per (seed, epoch, index)."""

    def __init__(self, pipeline, mode: str = "crop-flip", min_scale: float = 0.08, seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"augment mode {mode!r}: choose one of {', '.join(MODES)}")
        self.pipeline, self.mode = pipeline, mode
        self.min_scale, self.seed = checked_min_scale(min_scale), checked_seed(seed)
        p = pipeline.processor
        fixed = p.crop_size if p.do_center_crop else p.size  # ImagePipeline checked that one of them is fixed
        self.height, self.width = fixed["height"], fixed["width"]

    def __repr__(self) -> str:
        scale = f", min_scale={self.min_scale}" if self.mode == "crop-flip" else ""
        return f"TrainAugment({self.mode!r}{scale}, seed={self.seed})"

    def describe(self) -> str:
        return f"{self.mode} (crop area ≥ {self.min_scale:g})" if self.mode == "crop-flip" else self.mode

    def generator(self, index: int, epoch: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, index])

    def to_uint8(self, image: Image.Image, index: int, epoch: int) -> torch.Tensor:
        """Decoded image → augmented (3, H, W) uint8 tensor; the same (index, epoch) gives the same pixels."""
        if self.mode == "none":
            return self.pipeline.to_uint8(image)
        rng = self.generator(index, epoch)
        if self.mode == "flip":
            pixels = self.pipeline.to_uint8(image)
        else:
            pixels = self._resized_crop(image, rng)
        return pixels.flip(-1) if rng.random() < 0.5 else pixels

    def _resized_crop(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        p = self.pipeline.processor
        array = _to_hwc(image, p.do_convert_rgb, None)
        if array.dtype != np.uint8:
            raise ValueError(f"a {image.mode} image decodes to {array.dtype}; the batched path takes 8-bit images")
        top, left, h, w = crop_box(rng, array.shape[0], array.shape[1], self.min_scale)
        source = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
        # PIL resizes the box straight from the source pixels (its filter support spans the box's edges)
        box = (left, top, left + w, top + h)
        resized = np.asarray(source.resize((self.width, self.height), resample=p.resample, box=box))
        resized = resized[..., None] if resized.ndim == 2 else resized
        return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1)))
