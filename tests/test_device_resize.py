"""device_resize: Pillow's 8-bit BILINEAR/BICUBIC resize as matrix products, compared byte for byte with the
installed Pillow (which the processor and transformers use), and its use by eval (`--resize-on device`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vithybrid_fast import device_resize
from vithybrid_fast.device_resize import (
    CALIBRATION_SIZES,
    KNOWN_ORDER_RULES,
    PRECISION_BITS,
    _orders_reproducing_pillow,
    _pillow_13_0_order,
    forget_installed_pillow,
    installed_order_rule,
    pillow_pass_order,
    resample_matrix,
    resize_and_crop,
    resize_batch,
)
from vithybrid_fast.processing import _center_crop, _output_size, _resize

BILINEAR, BICUBIC = int(Image.Resampling.BILINEAR), int(Image.Resampling.BICUBIC)
# (height, width, out_height, out_width): shrinking, growing, mixed, slivers, one pixel, and the checkpoint's
# shortest-edge-384 sizes, among them tall photos where Pillow 13 runs its vertical pass first
SIZES = [
    (375, 500, 384, 512), (500, 375, 512, 384), (333, 500, 384, 576), (1199, 531, 867, 384), (934, 387, 926, 384),
    (1081, 475, 873, 384), (595, 446, 384, 384), (229, 92, 367, 359), (335, 106, 45, 120), (50, 60, 90, 90),
    (1, 1, 3, 5), (7, 1, 2, 9), (1, 300, 1, 40), (40, 3, 384, 28), (64, 64, 64, 64), (64, 64, 64, 31),
    (300, 200, 2, 95), (97, 61, 72, 45),
]  # fmt: skip


def _pillow(array: np.ndarray, out_height: int, out_width: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((out_width, out_height), resample=resample))


def _ours(array: np.ndarray, size, crop, resample: int, order: str) -> np.ndarray:
    batch = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    return resize_and_crop(batch, size, crop, resample, order)[0].permute(1, 2, 0).numpy()


def test_weights_are_pillows_fixed_point():
    for in_size, out_size in ((500, 384), (384, 500), (7, 3), (1, 9)):
        matrix = resample_matrix(in_size, out_size, BICUBIC)
        assert np.array_equal(matrix, np.round(matrix))  # integers
        ksize = 2 * int(np.ceil(2.0 * max(in_size / out_size, 1.0))) + 1
        # each weight was rounded on its own: a column sums to 1.0 in fixed point within half a unit a tap
        assert np.all(np.abs(matrix.sum(axis=0) - (1 << PRECISION_BITS)) <= ksize / 2)
    assert np.array_equal(resample_matrix(64, 64, BILINEAR), np.eye(64) * (1 << PRECISION_BITS))  # same size


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "{}x{}-{}x{}".format(*s))
def test_the_order_pillow_uses_gives_its_bytes(size, resample):
    height, width, out_height, out_width = size
    array = np.random.default_rng(size).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = _pillow(array, out_height, out_width, resample)
    order = pillow_pass_order(height, width, out_height, out_width, resample)
    assert order in ("hv", "vh")
    assert np.array_equal(_ours(array, (out_height, out_width), None, resample, order), expected)


def test_the_probe_tells_the_orders_apart():
    """595×446 → 384×384: the two orders round the intermediate differently in about a quarter of the pixels,
    so only one of them is Pillow's, and the probe has to find which."""
    array = np.random.default_rng(0).integers(0, 256, (595, 446, 3), dtype=np.uint8)
    expected = _pillow(array, 384, 384, BILINEAR)
    results = {order: _ours(array, (384, 384), None, BILINEAR, order) for order in ("hv", "vh")}
    assert not np.array_equal(results["hv"], results["vh"])
    assert np.array_equal(results[pillow_pass_order(595, 446, 384, 384, BILINEAR)], expected)


@pytest.mark.parametrize(
    ("height", "width", "size", "crop"),
    [
        (375, 500, {"shortest_edge": 72}, (72, 72)),
        (97, 61, {"shortest_edge": 80}, (72, 64)),
        (50, 130, {"shortest_edge": 40}, (72, 72)),  # smaller than the crop: zero padding, odd pixel top/left
        (130, 50, {"height": 30, "width": 90}, (41, 61)),  # padded on one axis, cropped on the other
    ],
)
def test_resize_then_center_crop_matches_the_processor(height, width, size, crop):
    array = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    expected = _center_crop(_resize(array, size, BICUBIC), *crop)
    out_size = _output_size(height, width, size)
    order = pillow_pass_order(height, width, *out_size, BICUBIC)
    assert np.array_equal(_ours(array, out_size, crop, BICUBIC, order), expected)


def test_a_batch_of_mixed_sizes_keeps_its_order_and_chunks_large_groups(monkeypatch):
    monkeypatch.setattr(device_resize, "CHUNK_ELEMENTS", 3 * 40 * 50)  # one image per product
    rng = np.random.default_rng(1)
    shapes = [(40, 50), (60, 30), (40, 50), (40, 50), (17, 90)]
    arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    size = {"shortest_edge": 24}
    out = resize_batch(
        [torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1))) for a in arrays],
        lambda h, w: _output_size(h, w, size), (24, 24), BICUBIC, torch.device("cpu"),
    )  # fmt: skip
    expected = np.stack([_center_crop(_resize(a, size, BICUBIC), 24, 24).transpose(2, 0, 1) for a in arrays])
    assert out.dtype == torch.uint8 and np.array_equal(out.numpy(), expected)


def test_a_pillow_that_neither_order_reproduces_is_used_itself(monkeypatch):
    """The order is found, not assumed: were the installed Pillow to compute something else, its own resize
    runs (here a fake one that adds 1 to every byte), never a close imitation."""
    real_resize = Image.Image.resize

    def shifted(self, size, resample=None, *args, **kwargs):
        out = np.asarray(real_resize(self, size, resample, *args, **kwargs))
        return Image.fromarray(((out.astype(np.uint16) + 1) % 256).astype(np.uint8))

    monkeypatch.setattr(Image.Image, "resize", shifted)
    forget_installed_pillow()
    try:
        assert installed_order_rule(BICUBIC) is None
        assert pillow_pass_order(45, 70, 24, 37, BICUBIC) is None
        array = np.random.default_rng(2).integers(0, 256, (45, 70, 3), dtype=np.uint8)
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        out = resize_batch([image], lambda h, w: (24, 37), (24, 24), BICUBIC, torch.device("cpu"))
        expected = _center_crop(np.asarray(shifted(Image.fromarray(array), (37, 24), BICUBIC)), 24, 24)
        assert np.array_equal(out[0].permute(1, 2, 0).numpy(), expected)
    finally:
        forget_installed_pillow()  # the other tests' answers come from the real Pillow


def test_the_order_rule_agrees_with_pillows_bytes_on_random_sizes():
    """Whatever rule `pillow_pass_order` answers with (Pillow 13.0's for the pinned Pillow), the installed
    Pillow's bytes agree: 150 random sizes, growing and shrinking, each compared by resizing noise both ways."""
    rng = np.random.default_rng(7)
    for _ in range(150):
        height, width, out_height, out_width = (int(v) for v in rng.integers(1, 160, 4))
        resample = (BILINEAR, BICUBIC)[int(rng.integers(0, 2))]
        orders = _orders_reproducing_pillow(height, width, out_height, out_width, resample)
        assert pillow_pass_order(height, width, out_height, out_width, resample) in orders


def test_the_installed_pillow_is_recognized():
    version = tuple(int(part) for part in Image.__version__.split(".")[:2])
    if version == (13, 0):
        assert installed_order_rule(BICUBIC) == installed_order_rule(BILINEAR) == "Pillow 13.0"
    elif version < (13, 0):
        assert installed_order_rule(BICUBIC) == "horizontal first (Pillow up to 12.3)"
    else:  # a release whose source was not read: whatever is recognized must be the bytes' order
        rule = installed_order_rule(BICUBIC)
        assert rule is None or all(
            _orders_reproducing_pillow(*size, BICUBIC) == [KNOWN_ORDER_RULES[rule](*size)] for size in SIZES
        )


@pytest.mark.parametrize("resample", [BILINEAR, BICUBIC])
def test_the_calibration_sizes_tell_the_rules_apart(resample):
    """Each calibration size rounds differently in the two orders (so Pillow's bytes pick one), and the known
    rules disagree on at least one of them (so the bytes pick a rule)."""
    for size in CALIBRATION_SIZES:
        array = np.random.default_rng(size).integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        assert not np.array_equal(*(_ours(array, size[2:], None, resample, o) for o in ("hv", "vh")))
    rules = list(KNOWN_ORDER_RULES.values())
    for i, rule in enumerate(rules):
        for other in rules[i + 1 :]:
            assert any(rule(*size) != other(*size) for size in CALIBRATION_SIZES)


def _one_pass_at_a_time(first: str):
    """A fake Pillow resize that runs its two passes in a fixed order, each as a one-axis real resize (Pillow
    skips the pass an unchanged axis does not need, so each call runs one pass and rounds to 8 bits)."""
    real_resize = Image.Image.resize

    def resize(self, size, resample=None, *args, **kwargs):
        out_width, out_height = size
        if first == "hv":
            return real_resize(real_resize(self, (out_width, self.height), resample), size, resample)
        return real_resize(real_resize(self, (self.width, out_height), resample), size, resample)

    return resize


@pytest.mark.parametrize(
    ("first", "rule"), [("hv", "horizontal first (Pillow up to 12.3)"), ("vh", None)], ids=["pillow-12", "unknown"]
)
def test_an_older_or_unknown_pillow_is_followed(monkeypatch, first, rule):
    """A Pillow that always runs the horizontal pass first (every release up to 12.3) is recognized; one that
    always runs the vertical pass first follows no known rule, and each size is probed instead. Either way
    the resize gives that Pillow's bytes, here on a size where Pillow 13.0 would run the vertical pass first."""
    fake = _one_pass_at_a_time(first)
    monkeypatch.setattr(Image.Image, "resize", fake)
    forget_installed_pillow()
    try:
        assert installed_order_rule(BICUBIC) == rule
        assert pillow_pass_order(1199, 531, 867, 384, BICUBIC) == first
        array = np.random.default_rng(3).integers(0, 256, (300, 101, 3), dtype=np.uint8)
        assert _pillow_13_0_order(300, 101, 120, 90) == "vh"
        expected = _center_crop(np.asarray(fake(Image.fromarray(array), (90, 120), BICUBIC)), 64, 64)
        image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        out = resize_batch([image], lambda h, w: (120, 90), (64, 64), BICUBIC, torch.device("cpu"))
        assert np.array_equal(out[0].permute(1, 2, 0).numpy(), expected)
    finally:
        forget_installed_pillow()


def test_a_recognized_pillow_costs_no_resize_per_size(monkeypatch):
    """The probe's cost (a Pillow resize of a noise image of each new size: 0.35–0.59 s at 4000 × 3000 on the
    CI machine) is paid only for a Pillow that follows no known rule."""
    forget_installed_pillow()
    assert installed_order_rule(BICUBIC) is not None
    calls = []
    real_resize = Image.Image.resize
    monkeypatch.setattr(
        Image.Image, "resize", lambda self, *a, **k: calls.append(self.size) or real_resize(self, *a, **k)
    )
    assert pillow_pass_order(3000, 4000, 384, 512, BICUBIC) == "hv"
    assert pillow_pass_order(4000, 3000, 512, 384, BICUBIC) in ("hv", "vh")
    assert calls == []


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match=r"resample=0 is not one of \[2, 3\]"):
        resample_matrix(10, 5, int(Image.Resampling.NEAREST))
    with pytest.raises(ValueError, match="uint8 batch"):
        resize_and_crop(torch.zeros(1, 3, 8, 8), (4, 4), None, BICUBIC)
    with pytest.raises(ValueError, match="order must be"):
        resize_and_crop(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), (4, 4), None, BICUBIC, "vv")
    with pytest.raises(ValueError, match="no images"):
        resize_batch([], lambda h, w: (4, 4), (4, 4), BICUBIC, torch.device("cpu"))
