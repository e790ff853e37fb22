"""`eval --resize-on device`'s resize and crop, in images/s on the device, beside Pillow on this host's CPU.

A batch of decoded uint8 images (synthetic, 500×375 by default, ImageNet's most common size, or a mix of
sizes) is resized to the base checkpoint's 384 shortest edge and center-cropped to 384² by
`device_resize.resize_batch`, as `ImagePipeline.finish` does each batch; the same images through Pillow
(`processing._resize` + `_center_crop`, what each DataLoader worker does otherwise) give the CPU rate of
one process. The bytes are compared too: a mismatch is an error, not a timing.

    python -m vithybrid_fast.bench.bench_device_resize --device cuda --batch 64
    python -m vithybrid_fast.bench.bench_device_resize --device cpu --batch 8 --mixed
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from .arguments import positive_int
from .common import RecordLog, environment, exit_without_cuda

MIXED_SIZES = [(375, 500), (500, 375), (333, 500), (500, 333), (1200, 531), (281, 500), (480, 640), (96, 120)]


def make_images(batch: int, mixed: bool, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = [MIXED_SIZES[i % len(MIXED_SIZES)] if mixed else (375, 500) for i in range(batch)]
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def measure(images: list[np.ndarray], device: torch.device, reps: int) -> dict:
    from vithybrid_fast.device_resize import resize_batch
    from vithybrid_fast.processing import _center_crop, _resize, resized_size

    size = {"shortest_edge": 384}
    tensors = [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) for a in images]
    if device.type == "cuda":
        tensors = [t.pin_memory() for t in tensors]  # as the DataLoader hands them over

    def on_device() -> torch.Tensor:
        out = resize_batch(tensors, lambda h, w: resized_size(h, w, size), (384, 384), 3, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    start = time.perf_counter()
    first = on_device()  # the pass-order check and the weights' upload happen here, once per size
    first_ms = (time.perf_counter() - start) * 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        on_device()
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    pillow = np.stack([_center_crop(_resize(a, size, 3), 384, 384).transpose(2, 0, 1) for a in images])
    pillow_s = time.perf_counter() - start
    if not np.array_equal(first.cpu().numpy(), pillow):
        raise RuntimeError("the device resize's bytes differ from Pillow's")
    median = sorted(times)[len(times) // 2]
    return {"device_images_per_s": len(images) / median, "first_call_ms": first_ms,
            "pillow_one_process_images_per_s": len(images) / pillow_s}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vithybrid_fast.bench.bench_device_resize",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--batch", type=positive_int, default=64)
    parser.add_argument("--mixed", action="store_true", help="images of 8 sizes, as a real folder has")
    parser.add_argument("--reps", type=positive_int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="append the record as a JSON line")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        exit_without_cuda(parser.prog, args.device)
    device = torch.device(args.device)
    record = {"kind": "device_resize", "batch": args.batch, "mixed": args.mixed, **environment(device)}
    record.update(measure(make_images(args.batch, args.mixed), device, args.reps))
    print(
        f"resize + crop to 384², batch {args.batch}{' of 8 sizes' if args.mixed else ' of 500×375'} on "
        f"{record['gpu']}: {record['device_images_per_s']:.0f} images/s (first call {record['first_call_ms']:.0f} "
        f"ms); Pillow, one CPU process: {record['pillow_one_process_images_per_s']:.0f} images/s; bytes equal"
    )
    with RecordLog(args.out) as log:
        log.write(record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
