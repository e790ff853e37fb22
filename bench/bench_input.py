"""Input-pipeline throughput: what the CPU side of `finetune` and `eval` can feed a GPU, in images/s.

Per image, in the DataLoader workers: JPEG decode, then the evaluation preprocessing (resize + center
crop, `ImagePipeline.to_uint8`) or a training augmentation (`augment.py`: crop-flip, flip, none), to a
(3, 384, 384) uint8 tensor. Rescale and normalize run batched on the GPU and are not in these times.

Modes measured, each over the same synthetic JPEGs (natural-image-like sizes and compression):
  decode        open + decode only (the floor every mode pays)
  eval          decode + the evaluation preprocessing
  eval-device   the worker's part of `eval --resize-on device`: decode, RGB, to a tensor (the resize and
                crop then run on the GPU, not timed here)
  crop-flip     decode + RandomResizedCrop + flip (finetune's default)
  flip | none   decode + evaluation preprocessing (+ flip)
For each: one process straight through the dataset (`workers=0`), then a DataLoader with each requested
number of worker processes (batch 32, collate as finetune does), timed over a second pass so that worker
start-up is not counted. A GPU that runs R images/s needs about R / (images/s per worker) workers.

    python -m vithybrid_fast.bench.bench_input --images 256 --workers 0,1,2 --out input.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .arguments import ints_at_least, positive_int
from .common import RecordLog, environment, print_and_save

MODES = ("decode", "eval", "eval-device", "crop-flip", "flip", "none")
SIZE = (500, 375)  # width, height: the most common ImageNet image size


def write_jpegs(folder: Path, count: int, size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """`count` JPEGs (quality 90) in folder/a and folder/b: smooth colour fields with noise and edges, so
    they compress like photographs (tens of kB), not like flat colour (a few hundred bytes)."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(count):
        cls = folder / ("a" if i % 2 == 0 else "b")
        cls.mkdir(parents=True, exist_ok=True)
        fx, fy, phase = rng.uniform(0.005, 0.05, 3)
        base = np.stack([np.sin(xx * fx + c + phase) * np.cos(yy * fy - c) for c in (0.0, 2.1, 4.2)], -1)
        pixels = 127 + 80 * base + rng.normal(0, 18, base.shape)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(cls / f"{i:05d}.jpg", quality=90)
    return folder


def make_dataset(folder: Path, mode: str, processor=None):
    """The dataset `finetune` / `eval` would build over `folder` for `mode` (decode: decode only)."""
    from vithybrid_fast.augment import TrainAugment
    from vithybrid_fast.data import ImagePipeline, open_dataset
    from vithybrid_fast.processing import ViTHybridImageProcessor

    resize_on = "device" if mode == "eval-device" else "cpu"
    pipeline = ImagePipeline(processor or ViTHybridImageProcessor.for_base_384(), resize_on=resize_on)
    data = open_dataset(folder, pipeline)
    if mode == "decode":
        data.pipeline = _DecodeOnly(pipeline.processor)
    elif mode not in ("eval", "eval-device"):
        data.augment = TrainAugment(pipeline, mode=mode)
    return data


class _DecodeOnly:
    """A pipeline stand-in whose per-image step only forces the decode (PIL decodes lazily)."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        image.load()
        return torch.zeros(3, 1, 1, dtype=torch.uint8)


def time_pass(run_pass: Callable[[], int], reps: int) -> dict[str, float]:
    """images/s of `run_pass` (returns the images it read): median and spread over `reps` passes."""
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        images = run_pass()
        rates.append(images / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "images_per_s_min": min(rates), "images_per_s_max": max(rates)}


def measure(data, workers: int, reps: int) -> dict[str, float]:
    from vithybrid_fast.data import collate

    if workers == 0:

        def one_process() -> int:
            errors = [i for i in range(len(data)) if "error" in data[i]]
            if errors:
                raise RuntimeError(f"{len(errors)} images could not be read")
            return len(data)

        return time_pass(one_process, reps)
    loader = torch.utils.data.DataLoader(
        data, batch_size=32, num_workers=workers, collate_fn=collate, persistent_workers=True, prefetch_factor=4
    )

    def through_loader() -> int:
        read = 0
        for batch in loader:
            if batch["errors"]:
                raise RuntimeError(f"unreadable images: {batch['errors'][:2]}")
            read += len(batch["labels"])
        return read

    through_loader()  # starts the workers; their start-up is not part of the rate
    return time_pass(through_loader, reps)  # the workers end with the loader, when this returns


def run(
    images: int = 256,
    workers: tuple[int, ...] = (0, 1, 2),
    modes: tuple[str, ...] = MODES,
    reps: int = 3,
    folder: Path | None = None,
    on_record: Callable[[dict], None] | None = None,
) -> list[dict]:
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
    env = {**environment("cpu"), "cpu_count": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0))}
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        root = folder or write_jpegs(Path(tmp) / "jpegs", images)
        sizes = [p.stat().st_size for p in root.rglob("*.jpg")]
        env["mean_jpeg_kib"] = sum(sizes) / len(sizes) / 1024 if sizes else None  # --folder may hold PNGs
        for mode in modes:
            data = make_dataset(root, mode)
            for count in workers:
                record = {"kind": "input", "mode": mode, "workers": count, "images": len(data), **env}
                try:
                    record.update(measure(data, count, reps))
                    record["ms_per_image"] = 1e3 / record["images_per_s"]
                except Exception as err:  # a worker crash is a result too
                    record["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                records.append(record)
                if on_record is not None:
                    on_record(record)
    return records


def table(records: list[dict]) -> str:
    lines = ["{:<11} {:>7} {:>9} {:>13} {:>12}".format("mode", "workers", "images/s", "min–max", "ms/image")]
    for r in records:
        if "error" in r:
            lines.append(f"{r['mode']:<11} {r['workers']:>7}  error: {r['error'][:60]}")
            continue
        spread = f"{r['images_per_s_min']:.0f}–{r['images_per_s_max']:.0f}"
        lines.append(
            f"{r['mode']:<11} {r['workers']:>7} {r['images_per_s']:>9.1f} {spread:>13} {r['ms_per_image']:>12.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=positive_int, default=256, help="synthetic JPEGs to write (default 256)")
    parser.add_argument("--folder", type=Path, default=None, help="an image folder of your own instead")
    parser.add_argument(
        "--workers", type=ints_at_least(0), default=[0, 1, 2], help="DataLoader worker counts; 0: one process"
    )
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--reps", type=positive_int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    args = parser.parse_args(argv)
    with RecordLog(args.out.with_suffix(".jsonl") if args.out else None) as log:
        records = run(
            args.images,
            tuple(args.workers),
            tuple(args.modes.split(",")),
            args.reps,
            args.folder,
            on_record=log.write,
        )
    env = records[0] if records else {}
    header = (
        f"input pipeline (decode + preprocessing per image, 384² output), {env.get('cpu_count')} CPUs "
        f"({env.get('usable_cpus')} usable), torch {env.get('torch')}, Pillow {Image.__version__}, {env.get('commit')}"
    )
    print_and_save(records, header, table(records), args.out)


if __name__ == "__main__":
    main()
