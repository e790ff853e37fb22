"""Synthetic labelled images and a tiny starting checkpoint for the data / eval / fine-tuning tests.

Three classes a small model learns in a few steps: reddish with horizontal stripes, greenish with a
checkerboard, bluish with vertical stripes; every image has its own noise, brightness and size
(so resizing and cropping are exercised), PNG and JPEG mixed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import vithybrid_fast as vf
from tests.hf_reference import randomize_, tiny_config

CLASSES = ("blue_vertical", "green_checker", "red_horizontal")  # sorted: the class index order
# hidden 64 in 2 heads: head size 32, which the Triton attention kernel takes (16 falls back to SDPA)
TRAIN_CONFIG = tiny_config(hidden_size=64, num_attention_heads=2, intermediate_size=96)


def synthetic_image(class_name: str, rng: np.random.Generator) -> Image.Image:
    height, width = int(rng.integers(72, 110)), int(rng.integers(72, 110))
    yy, xx = np.mgrid[0:height, 0:width]
    if class_name == "red_horizontal":
        pattern, colour = (yy // 6) % 2, (200, 40, 40)
    elif class_name == "green_checker":
        pattern, colour = ((yy // 8) + (xx // 8)) % 2, (40, 190, 60)
    else:
        pattern, colour = (xx // 6) % 2, (40, 60, 200)
    brightness = rng.uniform(0.7, 1.1)
    base = np.array(colour, dtype=np.float64)[None, None, :] * brightness * (0.6 + 0.4 * pattern[..., None])
    noisy = base + rng.normal(0, 12, size=base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_image_folder(root: Path, per_class: int, seed: int) -> Path:
    """root/<class>/<n>.png|jpg, nested one level for every third image (the scan is recursive)."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        for n in range(per_class):
            folder = root / name / ("nested" if n % 3 == 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            synthetic_image(name, rng).save(folder / f"{n:03d}.{'jpg' if n % 2 else 'png'}")
    return root


def write_dataset(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    write_image_folder(root / "train", train_per_class, seed=1)
    write_image_folder(root / "val", val_per_class, seed=2)
    return root


def write_start_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random tiny ViT Hybrid (7 ImageNet-style labels) with a 72 px, mean = std = 0.5 processor."""
    import torch

    torch.manual_seed(seed)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(TRAIN_CONFIG)).eval()
    randomize_(model)
    model.save_pretrained(path)
    processor = vf.ViTHybridImageProcessor.for_base_384(
        size={"shortest_edge": 72}, crop_size={"height": 72, "width": 72}
    )
    processor.save_pretrained(path)
    return path


def write_finetune_inputs(root: Path, val_per_class: int = 4) -> Path:
    """What a fine-tuning test reads: root/data (8 training images per class: 24, 3 steps of batch 8 an
    epoch; `val_per_class` validation images) and root/start (a tiny random checkpoint)."""
    write_dataset(root / "data", train_per_class=8, val_per_class=val_per_class)
    write_start_checkpoint(root / "start")
    return root
