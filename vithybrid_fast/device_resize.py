"""Pillow's resize of 8-bit images, bit for bit, as two matrix products that run on the model's device.

Why: on an H200's host (16 CPU threads) the evaluation preprocessing peaked at 746 images/s, a third of the
model's rate, and two thirds of each image's CPU time was Pillow's bicubic resize
(bench/results/nvidia-h200-2026-11-27-notes.md). With the resize here, DataLoader workers only decode.

Pillow (`libImaging/Resample.c`) resizes an 8-bit image in two separable passes, horizontal then vertical
(Pillow 13.0 runs the vertical one first where the height shrinks more than twice as much as the width:
`pillow_pass_order`). For each output pixel it computes filter weights in float64, normalizes them to sum
1, turns them into fixed-point integers (22 fractional bits), sums integer pixel × weight products onto a
rounding offset of 2**21, and keeps bits 22–29, clamped to 0..255; the second pass reads the rounded 8-bit
result of the first. Every quantity is an integer below 2**53, so a float64 matrix product computes each
sum exactly in any order:
`resample_matrix` builds the weights exactly as Pillow does, and the products give Pillow's bytes on any
device (tests/test_device_resize.py compares against Pillow itself).

Only the filters whose weights are plain arithmetic are taken (BILINEAR, BICUBIC): Pillow's LANCZOS and
HAMMING call the C library's sin/cos, whose last bit numpy need not share; NEAREST is no convolution.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed point for 8-bit images
SUPPORTED_RESAMPLE = {int(Image.Resampling.BILINEAR): 1.0, int(Image.Resampling.BICUBIC): 2.0}  # filter support
# float64 elements of one matrix product's input: large photos of one size are resized a few at a time
CHUNK_ELEMENTS = 1 << 25


def _filter(resample: int, x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    if resample == Image.Resampling.BILINEAR:
        return np.where(x < 1.0, 1.0 - x, 0.0)
    a = -0.5  # Pillow's bicubic; the expressions keep its C evaluation order
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)  # 1.5 MB for a 500-pixel axis to 384, 16 MB for 4000 to 512
def resample_matrix(in_size: int, out_size: int, resample: int) -> np.ndarray:
    """(in_size, out_size) float64: column j holds output pixel j's fixed-point weights (integers), as
    Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` make them for a resize of a whole axis."""
    if resample not in SUPPORTED_RESAMPLE:
        raise ValueError(f"resample={resample} is not one of {sorted(SUPPORTED_RESAMPLE)} (BILINEAR, BICUBIC)")
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be at least 1, got {in_size} → {out_size}")
    scale = float(np.float32(in_size)) / out_size  # Pillow: (double)(in1 - in0) / outSize, in1 - in0 a float
    filterscale = max(scale, 1.0)
    support = SUPPORTED_RESAMPLE[resample] * filterscale
    ksize = math.ceil(support) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale  # in0 = 0: the whole axis
    xmin = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    used = taps[None, :] < xmax[:, None]
    # Pillow: filter((x + xmin - center + 0.5) * (1 / filterscale)) for tap x, in this evaluation order
    offsets = ((taps[None, :] + xmin[:, None]) - center[:, None] + 0.5) * (1.0 / filterscale)
    weights = np.where(used, _filter(resample, offsets), 0.0)
    total = np.zeros(out_size)
    for k in range(ksize):  # Pillow sums the weights in tap order; numpy's sum would pair them
        total += weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << PRECISION_BITS)  # to fixed point, rounded half away from zero as Pillow's C casts
    fixed = np.trunc(np.where(weights < 0, -0.5 + scaled, 0.5 + scaled))
    matrix = np.zeros((in_size, out_size))
    rows = xmin[:, None] + taps[None, :]
    columns = np.broadcast_to(np.arange(out_size)[:, None], rows.shape)
    matrix[rows[used], columns[used]] = fixed[used]
    matrix.setflags(write=False)
    return matrix


def _round_to_uint8(sums: torch.Tensor) -> torch.Tensor:
    """Pillow's clip8 of (2**21 + the weighted sum): bits 22 and up, clamped to 0..255 (still float64)."""
    # in place (`sums` is a fresh product); the scaling by a power of two is exact
    return sums.add_(1 << (PRECISION_BITS - 1)).mul_(2.0**-PRECISION_BITS).floor_().clamp_(0, 255)


def _operands(horizontal: np.ndarray, vertical: np.ndarray, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The passes' weights on `device`, cut to the input rows and columns they touch, and those indices."""
    used_columns = np.flatnonzero(horizontal.any(axis=1))
    used_rows = np.flatnonzero(vertical.any(axis=1))
    h = torch.from_numpy(horizontal[used_columns]).to(device)
    v = torch.from_numpy(np.ascontiguousarray(vertical[used_rows].T)).to(device)
    return h, v, torch.from_numpy(used_rows).to(device), torch.from_numpy(used_columns).to(device)


TILE = 64  # output pixels a pass computes together from one window of input pixels


def _tiled(matrix: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A pass's (inputs, outputs) weights as tiles of TILE outputs, each over the one window of `window`
    consecutive inputs its nonzero weights lie in: (input index per tile and window position, weights
    (tiles, window, TILE), outputs). Each output's sum keeps every nonzero weight, so it is exact, and the
    work is about (inputs + taps) per output instead of the whole axis."""
    inputs, outputs = matrix.shape
    tiles = -(-outputs // TILE)
    padded = np.zeros((inputs, tiles * TILE))
    padded[:, :outputs] = matrix
    spans = []
    for t in range(tiles):
        nonzero = np.flatnonzero(padded[:, t * TILE : (t + 1) * TILE].any(axis=1))
        spans.append((nonzero[0], nonzero[-1] + 1) if nonzero.size else (0, 1))
    window = max(stop - start for start, stop in spans)
    starts = [min(start, inputs - window) for start, _ in spans]
    index = np.concatenate([np.arange(start, start + window) for start in starts])
    weights = np.stack([padded[st : st + window, t * TILE : (t + 1) * TILE] for t, st in enumerate(starts)])
    return torch.from_numpy(index).to(device), torch.from_numpy(weights).to(device), outputs


@functools.lru_cache(maxsize=16)  # device memory: about 2 × (inputs + taps × outputs / TILE) × TILE × 8 bytes
def _crop_operands(
    in_h: int, in_w: int, size: tuple[int, int], box: tuple[int, int, int, int], resample: int, device: torch.device
) -> tuple[tuple[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, int]]:
    """The tiled weights of one resize and crop box (top, left, rows, columns), kept on the device: a batch's
    common image sizes come back in every batch."""
    top, left, rows, columns = box
    horizontal = _tiled(resample_matrix(in_w, size[1], resample)[:, left : left + columns], device)
    vertical = _tiled(resample_matrix(in_h, size[0], resample)[:, top : top + rows], device)
    return horizontal, vertical


def _pass(x: torch.Tensor, tiled: tuple[torch.Tensor, torch.Tensor, int], axis: int) -> torch.Tensor:
    """One rounded pass of (B, C, H, W) float64 along `axis` (-1: horizontal, -2: vertical)."""
    index, weights, outputs = tiled
    tiles, window, _ = weights.shape
    if axis == -1:
        windows = x.index_select(-1, index).unflatten(-1, (tiles, window)).transpose(-3, -2)  # (B, C, t, H, win)
        sums = (windows @ weights).transpose(-3, -2).flatten(-2)  # (B, C, H, t * TILE): a copy
        return _round_to_uint8(sums[..., :outputs])
    windows = x.index_select(-2, index).unflatten(-2, (tiles, window))  # (B, C, t, win, W)
    sums = (weights.transpose(-1, -2) @ windows).flatten(-3, -2)  # (B, C, t * TILE, W)
    return _round_to_uint8(sums[..., :outputs, :])


def _resample_tiled(images: torch.Tensor, operands, order: str) -> torch.Tensor:
    horizontal, vertical = operands
    x = images.to(torch.float64)
    if order == "hv":
        return _pass(_pass(x, horizontal, -1), vertical, -2)
    return _pass(_pass(x, vertical, -2), horizontal, -1)


def _resample(images: torch.Tensor, operands: tuple[torch.Tensor, ...], order: str) -> torch.Tensor:
    """(B, C, H, W) uint8 → (B, C, rows, columns) float64 holding bytes: the two passes in `order` ("hv": the
    horizontal first, as Pillow's Resample.c; "vh": the vertical first)."""
    h, v, rows_index, columns_index = operands
    x = images.index_select(-2, rows_index).index_select(-1, columns_index).to(torch.float64)
    if order == "hv":
        return _round_to_uint8(v @ _round_to_uint8(x @ h))
    return _round_to_uint8(_round_to_uint8(v @ x) @ h)


def _horizontal_first(height: int, width: int, out_height: int, out_width: int) -> str:
    return "hv"


def _pillow_13_0_order(height: int, width: int, out_height: int, out_width: int) -> str:
    """Pillow 13.0's `ImagingResampleInner`: "If height is being scaled down more than twice the amount the
    width is, run the vertical pass first, to make the horizontal pass faster"."""
    shrink = height - out_height
    return "vh" if shrink > 0 and shrink > (width - out_width) * 2 else "hv"


# The pass orders of the Pillow releases whose Resample.c was read (their source archives on PyPI): 11.3
# through 12.3 always run the horizontal pass first; 13.0 added the rule above.
KNOWN_ORDER_RULES: dict[str, Callable[[int, int, int, int], str]] = {
    "horizontal first (Pillow up to 12.3)": _horizontal_first,
    "Pillow 13.0": _pillow_13_0_order,
}
# (height, width, out_height, out_width): sizes on which the two orders round differently, so the installed
# Pillow's bytes say which it ran; the rules differ on the first two (13.0: vertical first), not on the third
CALIBRATION_SIZES = ((120, 50, 40, 30), (97, 61, 30, 45), (60, 120, 30, 40))


def _orders_reproducing_pillow(height: int, width: int, out_height: int, out_width: int, resample: int) -> list[str]:
    """The pass orders ("hv", "vh") whose bytes equal the installed Pillow's for a noise image of this size,
    compared at up to 48 × 48 output pixels spread over the image, and at every pixel where that sample
    cannot tell the orders apart."""
    rng = np.random.default_rng([height, width, out_height, out_width, resample])
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(noise).resize((out_width, out_height), resample=resample))
    rows = np.unique(np.linspace(0, out_height - 1, min(out_height, 48)).round().astype(np.int64))
    columns = np.unique(np.linspace(0, out_width - 1, min(out_width, 48)).round().astype(np.int64))
    wanted = torch.from_numpy(np.ascontiguousarray(expected[rows][:, columns].transpose(2, 0, 1))).double()
    pixels = torch.from_numpy(np.ascontiguousarray(noise.transpose(2, 0, 1)))[None]
    horizontal = resample_matrix(width, out_width, resample)[:, columns]
    vertical = resample_matrix(height, out_height, resample)[:, rows]
    sampled = _operands(horizontal, vertical, pixels.device)
    matching = [o for o in ("hv", "vh") if torch.equal(_resample(pixels, sampled, o)[0], wanted)]
    if len(matching) == 2:  # the sample could not tell them apart: compare every pixel
        whole = torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 0, 1)))
        size = (out_height, out_width)
        matching = [o for o in matching if torch.equal(resize_and_crop(pixels, size, None, resample, o)[0], whole)]
    return matching


@functools.cache
def installed_order_rule(resample: int) -> str | None:
    """The name of the known rule (`KNOWN_ORDER_RULES`) that the installed Pillow follows, judged by its bytes
    on `CALIBRATION_SIZES` (small noise images, a few milliseconds once per process and filter), or None for
    a Pillow that follows none of them (a newer release, a fork such as Pillow-SIMD)."""
    found = [_orders_reproducing_pillow(*size, resample) for size in CALIBRATION_SIZES]
    for name, rule in KNOWN_ORDER_RULES.items():
        if all(orders == [rule(*size)] for size, orders in zip(CALIBRATION_SIZES, found)):
            return name
    return None


@functools.lru_cache(maxsize=4096)
def _probed_pass_order(height: int, width: int, out_height: int, out_width: int, resample: int) -> str | None:
    matching = _orders_reproducing_pillow(height, width, out_height, out_width, resample)
    return matching[0] if matching else None


def pillow_pass_order(height: int, width: int, out_height: int, out_width: int, resample: int) -> str | None:
    """Which pass the installed Pillow runs first for this resize: "hv", "vh", or None where neither
    reproduces it (then the caller resizes with Pillow itself).

    Where the installed Pillow follows a known rule (`installed_order_rule`) the answer is that rule's, at no
    cost per size. Otherwise the order is not assumed: a noise image of this size is resized by Pillow and
    by both orders, and the order that gives Pillow's bytes is kept (once per size and process: a Pillow
    resize of an image of that size, 0.35–0.59 s at 4000 × 3000 on the 2-core CI machine)."""
    rule = installed_order_rule(resample)
    if rule is not None:
        return KNOWN_ORDER_RULES[rule](height, width, out_height, out_width)
    return _probed_pass_order(height, width, out_height, out_width, resample)


def forget_installed_pillow() -> None:
    """Drop what was learnt about the installed Pillow (for tests that replace its resize)."""
    installed_order_rule.cache_clear()
    _probed_pass_order.cache_clear()


def _crop_box(height: int, width: int, crop: tuple[int, int] | None) -> tuple[int, int, int, int, int, int]:
    """(top, left, rows, columns, pad_top, pad_left): the processor's center crop, zero-padded where the
    image is smaller than the crop (odd padding pixel on the top/left), as `processing._center_crop`."""
    if crop is None:
        return 0, 0, height, width, 0, 0
    crop_h, crop_w = crop
    pad_top, pad_left = math.ceil(max(crop_h - height, 0) / 2), math.ceil(max(crop_w - width, 0) / 2)
    top, left = max((height - crop_h) // 2, 0), max((width - crop_w) // 2, 0)
    return top, left, min(crop_h, height), min(crop_w, width), pad_top, pad_left


def resize_and_crop(
    images: torch.Tensor, size: tuple[int, int], crop: tuple[int, int] | None, resample: int, order: str = "hv"
) -> torch.Tensor:
    """(B, C, H, W) uint8 → (B, C, crop or size) uint8: Pillow's resize to `size` (height, width) with its
    passes in `order` (see `pillow_pass_order`), then the processor's center crop. Only the output pixels
    the crop keeps are computed: each is a sum of its own, so this is exact."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected a (B, C, H, W) uint8 batch, got {images.dtype} of shape {tuple(images.shape)}")
    if order not in ("hv", "vh"):
        raise ValueError(f"order must be 'hv' or 'vh', got {order!r}")
    out_h, out_w = size
    top, left, rows, columns, pad_top, pad_left = _crop_box(out_h, out_w, crop)
    batch, channels, in_h, in_w = images.shape
    operands = _crop_operands(in_h, in_w, (out_h, out_w), (top, left, rows, columns), resample, images.device)
    final_h, final_w = crop if crop is not None else size
    out = torch.zeros(batch, channels, final_h, final_w, dtype=torch.uint8, device=images.device)
    step = max(1, CHUNK_ELEMENTS // (channels * in_h * in_w))
    for start in range(0, batch, step):
        resized = _resample_tiled(images[start : start + step], operands, order)
        out[start : start + step, :, pad_top : pad_top + rows, pad_left : pad_left + columns] = resized.to(torch.uint8)
    return out


def _resize_with_pillow(image: torch.Tensor, size: tuple[int, int], crop: tuple[int, int], resample: int):
    """The fallback where no pass order reproduces the installed Pillow: the processor's own resize and crop."""
    from .processing import _center_crop, _resize

    array = image.permute(1, 2, 0).cpu().numpy()
    resized = _resize(array, {"height": size[0], "width": size[1]}, resample)
    return torch.from_numpy(np.ascontiguousarray(_center_crop(resized, *crop).transpose(2, 0, 1)))


def resize_batch(
    images: list[torch.Tensor],
    size_of: Callable[[int, int], tuple[int, int]],
    crop: tuple[int, int],
    resample: int,
    device: torch.device,
) -> torch.Tensor:
    """Decoded (C, H, W) uint8 images of any sizes → one (B, C, *crop) uint8 batch on `device`, in order.
    `size_of(height, width)` gives each image's resize target; images of one size share their products."""
    if not images:
        raise ValueError("no images to resize")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    out = torch.empty(len(images), images[0].shape[0], *crop, dtype=torch.uint8, device=device)
    for shape, members in groups.items():
        size = size_of(shape[1], shape[2])
        order = pillow_pass_order(shape[1], shape[2], *size, resample)
        if order is None:
            resized = torch.stack([_resize_with_pillow(images[i], size, crop, resample) for i in members]).to(device)
        else:
            # each to the device first: the DataLoader pinned them, so the copies overlap; a stack would not be
            stacked = torch.stack([images[i].to(device, non_blocking=True) for i in members])
            resized = resize_and_crop(stacked, size, crop, resample, order)
        out[torch.tensor(members, device=device)] = resized
    return out
