"""ViTHybridImageProcessor against transformers 4.47.1's, on real photographs and variants derived from them.

Every parity case runs under two configs: transformers' class defaults (224 px, CLIP mean/std) and the hub
config of google/vit-hybrid-base-bit-384 (384 px, mean = std = 0.5), and must agree to 1e-4.
"""

from __future__ import annotations

import gzip
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vithybrid_fast.processing import (
    BASE_384_PREPROCESSOR_CONFIG,
    CONFIG_NAME,
    BatchFeature,
    ViTHybridImageProcessor,
    load_processor,
    sample_image_path,
)

transformers = pytest.importorskip("transformers")
from transformers import ViTHybridImageProcessor as HFProcessor  # noqa: E402

ATOL = 1e-4
CONFIGS = {"class_defaults": {}, "base_384": BASE_384_PREPROCESSOR_CONFIG}
REPO_ID = "google/vit-hybrid-base-bit-384"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _sample_data(name: str) -> Path:
    """A file of matplotlib's bundled sample data (real images that are available offline)."""
    matplotlib = pytest.importorskip("matplotlib")
    path = Path(matplotlib.get_data_path()) / "sample_data" / name
    if not path.is_file():
        pytest.skip(f"matplotlib {matplotlib.__version__} has no sample_data/{name}")
    return path


def grace() -> Image.Image:
    return Image.open(sample_image_path()).convert("RGB")  # 512 x 600 (w x h) photograph


def mri_slice() -> np.ndarray:
    """matplotlib's s1045.ima.gz: a real 256 x 256 MRI head slice, big-endian uint16 with values 0..215."""
    raw = gzip.decompress(_sample_data("s1045.ima.gz").read_bytes())
    return np.frombuffer(raw, dtype=">u2").reshape(256, 256).astype(np.uint16)


def gift_rgba() -> Image.Image:
    """matplotlib's Minduka_Present_Blue_Pack.png: a real RGBA image with a partly transparent background."""
    return Image.open(_sample_data("Minduka_Present_Blue_Pack.png")).copy()


def strip(width: int, height: int) -> Image.Image:
    """A band of the photograph with an odd size (upscaled first when the band is wider than the photo)."""
    image = grace()
    if width > image.width:
        image = image.resize((width, image.height * width // image.width), Image.Resampling.BICUBIC)
    top = (image.height - height) // 3
    return image.crop((0, top, width, top + height))


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).copy()


# name -> builder of an input both processors accept (PIL, numpy, torch, 4-D batch or list)
CASES = {
    "photo": grace,
    "rotated_landscape_600x512": lambda: grace().transpose(Image.Transpose.ROTATE_90),
    "portrait_383x517": lambda: strip(383, 517),
    "landscape_1000x97": lambda: strip(1000, 97),  # long edge int(384 * 1000 / 97) truncates
    "very_tall_97x1000": lambda: strip(1000, 97).transpose(Image.Transpose.ROTATE_270),
    "tiny_10x10_upsampled": lambda: grace().resize((10, 10), Image.Resampling.BOX),
    "tiny_7x10": lambda: grace().resize((7, 10), Image.Resampling.BOX),
    "gray_L": lambda: grace().convert("L"),
    "gray_LA": lambda: grace().convert("LA"),
    "rgba_alpha_dropped": lambda: _with_alpha(grace()),
    "rgba_real_transparent": gift_rgba,
    "palette_P": lambda: grace().quantize(colors=64),
    "cmyk": lambda: grace().convert("CMYK"),
    "bilevel_1": lambda: grace().convert("1"),
    "mri_gray_L": lambda: Image.fromarray(mri_slice().astype(np.uint8)),
    "mri_I16": lambda: Image.fromarray(mri_slice()),
    "numpy_hwc_uint8": lambda: as_array(strip(383, 517)),
    "numpy_chw_uint8": lambda: as_array(strip(383, 517)).transpose(2, 0, 1),
    "numpy_hwc_float_0_255": lambda: as_array(grace()).astype(np.float32),
    "numpy_chw_float_0_1": lambda: as_array(strip(383, 517)).transpose(2, 0, 1).astype(np.float32) / 255,
    "numpy_hwc_float64_0_1": lambda: as_array(grace()).astype(np.float64) / 255,
    # off the 1/255 grid, so truncating (as transformers does before PIL) and rounding differ
    "numpy_hwc_float_off_grid": lambda: (as_array(grace()).astype(np.float32) + 0.7) / 256,
    "torch_chw_uint8": lambda: torch.from_numpy(as_array(grace()).transpose(2, 0, 1).copy()),
    "torch_chw_float_0_1": lambda: torch.from_numpy(as_array(strip(1000, 97))).permute(2, 0, 1).float() / 255,
    "numpy_batch_4d": lambda: np.stack([as_array(strip(383, 517)), as_array(strip(383, 517))[::-1]]),
    "torch_batch_4d": lambda: torch.from_numpy(np.stack([as_array(grace()), as_array(grace())[:, ::-1]])),
    "list_mixed_sizes_and_types": lambda: [
        grace(),
        strip(1000, 97),
        grace().resize((10, 10), Image.Resampling.BOX),
        grace().convert("L"),
        _with_alpha(grace()),
    ],
}


def _with_alpha(image: Image.Image) -> Image.Image:
    """RGBA whose alpha is a gradient, so compositing (which neither side does) would change the result."""
    alpha = np.linspace(0, 255, image.width, dtype=np.uint8)[None, :].repeat(image.height, axis=0)
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def assert_close(ours: object, theirs: object, what: str) -> None:
    ours_list = list(ours) if isinstance(ours, list) else [ours]
    theirs_list = list(theirs) if isinstance(theirs, list) else [theirs]
    assert len(ours_list) == len(theirs_list), what
    for a, b in zip(ours_list, theirs_list):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert a.shape == b.shape, f"{what}: shape {a.shape} != transformers {b.shape}"
        diff = np.abs(a - b).max()
        assert diff <= ATOL, f"{what}: max abs diff {diff:.3e} > {ATOL}"


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS), name="processors")  # test_processing_audit shares it
def processors_fixture(request: pytest.FixtureRequest) -> tuple[ViTHybridImageProcessor, HFProcessor]:
    config = CONFIGS[request.param]
    return ViTHybridImageProcessor(**config), HFProcessor(**config)


@pytest.mark.filterwarnings("ignore:It looks like")
@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(processors, case):
    assert_matches_transformers(processors, CASES[case], case)


def assert_matches_transformers(processors, make_input, case: str) -> None:
    """Both processors on the same input: float32 (B, 3, H, W) pixel values within ATOL of transformers'."""
    ours, theirs = processors
    got = ours(make_input(), return_tensors="pt")["pixel_values"]
    want = theirs(make_input(), return_tensors="pt")["pixel_values"]
    assert got.dtype == torch.float32 and got.ndim == 4 and got.shape[1] == 3
    assert_close(got, want, case)


@pytest.mark.filterwarnings("ignore:It looks like")
@pytest.mark.parametrize("case", ["photo", "gray_L", "numpy_chw_float_0_1", "numpy_hwc_float_off_grid"])
def test_bit_exact_on_photographs(processors, case):
    # Same float64/float32 steps in the same order as transformers, so not just close: identical.
    ours, theirs = processors
    got = ours(CASES[case](), return_tensors="np")["pixel_values"]
    want = theirs(CASES[case](), return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(got, want)


OVERRIDES = {
    "size_int_shortest_edge": {"size": 200},
    "size_height_width": {"size": {"height": 150, "width": 333}},
    "size_with_longest_edge_ignored": {"size": {"shortest_edge": 100, "longest_edge": 120}},
    "crop_int": {"crop_size": 97},
    "crop_rect": {"crop_size": {"height": 120, "width": 301}},
    "crop_larger_than_resized_pads": {"size": 64, "crop_size": {"height": 100, "width": 80}},
    "no_resize_pads_tiny": {"do_resize": False},
    "bilinear": {"resample": Image.Resampling.BILINEAR},
    "nearest": {"resample": 0},
    "lanczos": {"resample": 1},
    "no_rescale": {"do_rescale": False},
    "no_normalize": {"do_normalize": False},
    "everything_off": {
        "do_resize": False,
        "do_center_crop": False,
        "do_rescale": False,
        "do_normalize": False,
    },
    "scalar_mean_std": {"image_mean": 0.4, "image_std": 0.2},
    "other_rescale_factor": {"rescale_factor": 1 / 127.5},
    "no_convert_rgb_on_rgb": {"do_convert_rgb": False},
}


@pytest.mark.filterwarnings("ignore:It looks like")
@pytest.mark.parametrize("case", ["photo", "portrait_383x517", "tiny_7x10", "numpy_chw_float_0_1"])
@pytest.mark.parametrize("override", list(OVERRIDES))
def test_per_call_overrides_match_transformers(processors, override, case):
    ours, theirs = processors
    before = ours.to_dict()
    got = ours(CASES[case](), return_tensors="np", **OVERRIDES[override])["pixel_values"]
    want = theirs(CASES[case](), return_tensors="np", **OVERRIDES[override])["pixel_values"]
    assert got.dtype == np.float32  # transformers keeps uint8 when every step is off; we always give float32
    assert_close(got, want, f"{case} with {override}")
    assert ours.to_dict() == before, "a per-call override must not change the processor"


SHAPES = [
    (edge, height, width)
    for edge in (37, 384)
    for height in (1, 2, 3, 7, 97, 383, 384, 385, 517, 1000)
    for width in (1, 5, 96, 383, 384, 600, 999)
    if edge * max(height, width) / min(height, width) <= 20_000  # keep the largest output ~60 MB
]


@pytest.mark.parametrize(("shortest_edge", "height", "width"), SHAPES)
def test_resized_shape_matches_transformers(shortest_edge, height, width):
    # The long edge is int(size * long / short): a truncation that rounding would get wrong.
    image = np.full((height, width, 3), 128, dtype=np.uint8)
    config = {**BASE_384_PREPROCESSOR_CONFIG, "size": shortest_edge, "do_center_crop": False}
    config |= {"do_rescale": False, "do_normalize": False}  # only the shape is under test here
    layout = {"input_data_format": "channels_last"}  # a 1- or 3-pixel-tall array would look channels-first
    got = ViTHybridImageProcessor(**config)(image, **layout)["pixel_values"][0]
    want = HFProcessor(**config)(image, **layout)["pixel_values"][0]
    assert got.shape == want.shape


@pytest.mark.parametrize(
    ("ours_input", "hf_input"),
    [
        # transformers rejects 1-channel and 4-channel arrays with an RGB mean; we convert them the way
        # PIL's convert("RGB") converts "L" and "RGBA" images, so they must equal transformers on PIL input.
        (lambda: as_array(grace().convert("L")), lambda: grace().convert("L")),  # (H, W)
        (lambda: as_array(grace().convert("L"))[..., None], lambda: grace().convert("L")),  # (H, W, 1)
        (lambda: as_array(grace().convert("L"))[None], lambda: grace().convert("L")),  # (1, H, W)
        (lambda: as_array(_with_alpha(grace())), lambda: _with_alpha(grace())),  # (H, W, 4)
        (lambda: torch.from_numpy(as_array(gift_rgba())).permute(2, 0, 1), gift_rgba),  # (4, H, W) tensor
    ],
    ids=["numpy_hw", "numpy_hw1", "numpy_1hw", "numpy_hw4_rgba", "torch_4hw_rgba"],
)
def test_gray_and_rgba_arrays_convert_like_pil(processors, ours_input, hf_input):
    ours, theirs = processors
    got = ours(ours_input(), return_tensors="np")["pixel_values"]
    want = theirs(hf_input(), return_tensors="np")["pixel_values"]
    assert_close(got, want, "array converted to RGB")


@pytest.mark.parametrize("size", [(1, 1), (50, 1), (50, 3), (3, 3)], ids=str)
def test_pil_images_are_channels_last_even_when_the_shape_looks_ambiguous(processors, size):
    # transformers guesses the channel axis of np.array(pil_image) from its shape; a PIL image 1 or 3 pixels
    # tall gives (1|3, W, 3), read as channels-first: wrong. A PIL image is always (H, W, C), so we never
    # guess; transformers agrees once told the layout.
    ours, theirs = processors
    image = grace().resize(size, Image.Resampling.BOX)
    got = ours(image, return_tensors="np")["pixel_values"]
    want = theirs(image, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    assert_close(got, want, f"PIL image of size {size}")


def test_class_defaults_are_transformers_class_defaults():
    ours, theirs = ViTHybridImageProcessor().to_dict(), HFProcessor().to_dict()
    theirs.pop("_processor_class")
    theirs["resample"] = int(theirs["resample"])
    assert ours == theirs
    assert ours["size"] == {"shortest_edge": 224} and ours["crop_size"] == {"height": 224, "width": 224}


def test_base_384_preset_is_the_hub_config():
    processor = ViTHybridImageProcessor.for_base_384()
    assert processor.to_dict() == {**BASE_384_PREPROCESSOR_CONFIG}
    assert processor.size == {"shortest_edge": 384} and processor.image_mean == [0.5, 0.5, 0.5]
    assert processor.resample == 3 and processor.rescale_factor == pytest.approx(1 / 255, abs=0)
    assert processor(grace(), return_tensors="pt")["pixel_values"].shape == (1, 3, 384, 384)


def test_return_tensors_none_np_pt_agree():
    processor = ViTHybridImageProcessor.for_base_384()
    images = [grace(), strip(383, 517)]
    as_list = processor(images)["pixel_values"]
    as_np = processor(images, return_tensors="np")["pixel_values"]
    as_pt = processor(images, return_tensors="pt")
    assert isinstance(as_list, list) and all(a.shape == (3, 384, 384) and a.dtype == np.float32 for a in as_list)
    assert isinstance(as_np, np.ndarray) and as_np.shape == (2, 3, 384, 384) and as_np.dtype == np.float32
    assert isinstance(as_pt, BatchFeature) and as_pt.pixel_values.dtype == torch.float32
    np.testing.assert_array_equal(np.stack(as_list), as_np)
    np.testing.assert_array_equal(as_pt["pixel_values"].numpy(), as_np)
    assert as_pt.to(torch.float64)["pixel_values"].dtype == torch.float64
    theirs = HFProcessor(**BASE_384_PREPROCESSOR_CONFIG)(images)["pixel_values"]
    assert_close(as_list, theirs, "return_tensors=None")


def test_channels_last_output_and_explicit_input_format():
    processor = ViTHybridImageProcessor.for_base_384()
    hwc = as_array(grace())
    first = processor(hwc, return_tensors="np")["pixel_values"]
    last = processor(hwc, return_tensors="np", data_format="channels_last")["pixel_values"]
    np.testing.assert_array_equal(last, first.transpose(0, 2, 3, 1))
    # A 3 x 3 x 3 array is ambiguous: like transformers we then assume channels first, unless told.
    tiny = as_array(grace().resize((3, 3), Image.Resampling.BOX))
    reference = HFProcessor(**BASE_384_PREPROCESSOR_CONFIG)
    for layout in ({}, {"input_data_format": "channels_last"}, {"input_data_format": "channels_first"}):
        got = processor(tiny, **layout)["pixel_values"]
        assert_close(got, reference(tiny, **layout)["pixel_values"], f"3x3x3 array with {layout}")
    told = processor(tiny, return_tensors="np", input_data_format="channels_last")["pixel_values"]
    guessed = processor(tiny, return_tensors="np")["pixel_values"]
    assert np.abs(told - guessed).max() > 0.1  # the two readings really differ


def test_save_and_load_round_trip_with_transformers(tmp_path):
    ours = ViTHybridImageProcessor.for_base_384(crop_size=320, some_future_key={"kept": True})
    path = ours.save_pretrained(tmp_path / "ours")
    assert path == tmp_path / "ours" / CONFIG_NAME
    saved = json.loads(path.read_text())
    assert saved["some_future_key"] == {"kept": True} and saved["crop_size"] == {"height": 320, "width": 320}

    reloaded = ViTHybridImageProcessor.from_pretrained(tmp_path / "ours")
    assert reloaded.to_dict() == ours.to_dict() and reloaded.extra == {"some_future_key": {"kept": True}}
    assert ViTHybridImageProcessor.from_pretrained(path).to_dict() == ours.to_dict()  # the JSON file itself

    theirs = HFProcessor.from_pretrained(tmp_path / "ours")  # transformers reads our file ...
    assert_close(ours(grace())["pixel_values"], theirs(grace())["pixel_values"], "transformers reading ours")
    theirs.save_pretrained(tmp_path / "theirs")  # ... and we read theirs
    from_theirs = ViTHybridImageProcessor.from_pretrained(str(tmp_path / "theirs"))
    assert from_theirs.to_dict() == ours.to_dict()


def test_from_dict_overrides_and_type_mismatch_warning():
    processor = ViTHybridImageProcessor.from_dict(BASE_384_PREPROCESSOR_CONFIG, size=256, do_normalize=False)
    assert processor.size == {"shortest_edge": 256} and processor.do_normalize is False
    assert processor.crop_size == {"height": 384, "width": 384}
    with pytest.warns(UserWarning, match="ViTImageProcessor"):
        ViTHybridImageProcessor.from_dict({**BASE_384_PREPROCESSOR_CONFIG, "image_processor_type": "ViTImageProcessor"})


def _fake_hub_cache(cache: Path) -> Path:
    """huggingface_hub's cache layout for one repo, holding only preprocessor_config.json."""
    repo = cache / ("models--" + REPO_ID.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    config = {**BASE_384_PREPROCESSOR_CONFIG, "crop_size": {"height": 352, "width": 352}}  # tell it apart
    (snapshot / CONFIG_NAME).write_text(json.dumps(config))
    return snapshot


@pytest.mark.parametrize("how", ["local_files_only", "HF_HUB_OFFLINE", "both", "revision_hash"])
def test_from_offline_hub_cache(tmp_path, monkeypatch, how):
    _fake_hub_cache(tmp_path)
    # huggingface_hub may have read HF_HUB_OFFLINE at import; we must honour it when set only now.
    if how in ("HF_HUB_OFFLINE", "both", "revision_hash"):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    kwargs = {"cache_dir": tmp_path, "local_files_only": how in ("local_files_only", "both")}
    if how == "revision_hash":
        kwargs["revision"] = COMMIT
    processor = load_processor(REPO_ID, **kwargs)
    assert isinstance(processor, ViTHybridImageProcessor)
    assert processor.crop_size == {"height": 352, "width": 352}
    assert processor(grace(), return_tensors="pt")["pixel_values"].shape == (1, 3, 352, 352)


def test_offline_cache_miss_and_missing_dir_raise(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not-cached"):
        ViTHybridImageProcessor.from_pretrained("org/not-cached", cache_dir=tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        ViTHybridImageProcessor.from_pretrained(tmp_path / "empty")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        ViTHybridImageProcessor.from_pretrained(tmp_path / "list.json")


def test_a_bad_preprocessor_config_is_named_when_it_is_loaded(tmp_path):
    """An audit found a broken preprocessor_config.json reported as a bare JSONDecodeError or
    'do_resize must be a bool' (no file named), and image_mean [0.5] blamed on every image in classify
    while `eval` broadcast it to three channels and reported top-1 without a word."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    config = folder / CONFIG_NAME
    config.write_text("{bad")
    with pytest.raises(ValueError, match=rf"{re.escape(str(config))}: not valid JSON \(Expecting property name"):
        load_processor(folder)
    for fields, message in [
        ({"do_resize": None}, "do_resize must be a bool, got None"),
        ({"image_mean": [0.5]}, r"image_mean is a list of 1 value, but do_convert_rgb makes every image 3 channels"),
        ({"image_std": [0.5], "image_mean": 0.5}, r"image_std is a list of 1 value"),
    ]:
        config.write_text(json.dumps(fields))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(config))}: {message}"):
            load_processor(folder)
    # a grey-image processor (no RGB conversion) may hold one value per its one channel
    config.write_text(json.dumps({"image_mean": [0.5], "image_std": [0.25], "do_convert_rgb": False}))
    assert load_processor(folder).image_mean == [0.5]
    config.write_text(json.dumps({"image_mean": 0.5}))
    with pytest.raises(ValueError, match=r"^size\['shortest_edge'\] must be a positive int"):  # the override's
        load_processor(folder, size=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": -5}, r"size\['shortest_edge'\] must be a positive int"),
        ({"size": {"shortest_edge": 0}}, "must be a positive int"),
        ({"size": {"short_edge": 384}}, "size must be an int, \\(height, width\\) or a dict"),
        ({"crop_size": {"height": 384, "width": 3.5}}, r"crop_size\['width'\] must be a positive int"),
        ({"crop_size": {"shortest_edge": 384}}, "crop_size must have keys 'height' and 'width'"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be a number or a list of 1 or 3"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std must not contain 0"),
        ({"image_mean": [0.5, "a", 0.5]}, "image_mean must be a finite number"),
        ({"resample": 9}, "resample must be a PIL filter"),
        ({"resample": "bicubic"}, "resample must be a PIL filter"),
        ({"rescale_factor": -1 / 255}, "rescale_factor must be a positive number"),
        ({"do_resize": "yes"}, "do_resize must be a bool"),
    ],
)
def test_invalid_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTHybridImageProcessor(**kwargs)
    with pytest.raises(ValueError, match=message):  # the same checks apply to per-call overrides
        ViTHybridImageProcessor()(grace(), **kwargs)


@pytest.mark.parametrize(
    ("images", "kwargs", "message"),
    [
        (lambda: np.zeros((40, 50, 2), np.uint8), {}, "Unable to infer the channel axis"),
        (lambda: np.zeros((5, 40, 50), np.uint8), {}, "Unable to infer the channel axis"),
        (lambda: np.zeros((40, 50, 5), np.uint8), {"input_data_format": "channels_last"}, "got 5"),
        (lambda: np.zeros((40, 50, 4), np.uint8), {"do_convert_rgb": False}, "Unable to infer"),
        (lambda: _with_alpha(grace()), {"do_convert_rgb": False}, "1 or 3 channels .* got 4"),
        (lambda: np.zeros((0, 50, 3), np.uint8), {}, "Empty image"),
        (lambda: torch.zeros(3, 40, 0), {}, "Empty image"),
        (lambda: np.zeros((1, 2, 40, 50, 3), np.uint8), {}, "2 or 3 dimensions"),
        (lambda: [np.zeros((2, 40, 50, 3), np.uint8)], {}, "2 or 3 dimensions"),
        (lambda: [], {}, "No images given"),
        (lambda: np.zeros((0, 40, 50, 3), np.uint8), {}, "No images given"),
        (lambda: "photo.jpg", {}, "Invalid image type str"),
        (lambda: [[grace()]], {}, "Invalid image type list"),
        (lambda: np.full((40, 50, 3), -0.5), {}, r"must lie in \[0, 1\]"),
        (lambda: np.full((40, 50, 3), 300, np.uint16), {}, r"must lie in \[0, 255\]"),
        (grace, {"return_tensors": "tf"}, "return_tensors must be one of"),
        (grace, {"data_format": "NCHW"}, "data_format must be one of"),
        (
            lambda: [grace(), strip(1000, 97)],
            {"do_center_crop": False, "return_tensors": "pt"},
            "different shapes",
        ),
        (lambda: np.zeros((40, 50, 1), np.uint8), {"do_convert_rgb": False}, "image_mean has 3 values"),
    ],
)
def test_invalid_images_raise(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTHybridImageProcessor.for_base_384()(images(), **kwargs)


def test_transformers_raises_too_on_out_of_range_floats():
    # Not our invention: transformers refuses these as well (so nobody relies on them being accepted).
    with pytest.raises(ValueError):
        HFProcessor()(np.full((40, 50, 3), -0.5))


def test_warnings_for_rescaled_input_and_unknown_kwargs():
    processor = ViTHybridImageProcessor.for_base_384()
    with pytest.warns(UserWarning, match="already rescaled"):
        processor(np.full((40, 50, 3), 0.5, np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        processor(np.full((40, 50, 3), 0.5, np.float32), do_rescale=False)  # told: no warning
    with pytest.warns(UserWarning, match="unrecognized kwargs: colour"):
        processor(grace(), colour="red")


def test_mixed_sizes_without_crop_as_list():
    processor = ViTHybridImageProcessor.for_base_384(do_center_crop=False)
    out = processor([grace(), strip(1000, 97)])["pixel_values"]
    assert [a.shape for a in out] == [(3, 450, 384), (3, 384, 3958)]


def test_sample_image():
    path = sample_image_path()
    assert path.is_file() and path.stat().st_size < 100_000
    with Image.open(path) as image:
        assert image.format == "JPEG" and image.mode == "RGB" and image.size == (512, 600)
    assert (path.parent / "README.md").is_file()


def test_a_sliver_whose_resize_would_be_a_bomb_is_refused():
    """A 95-byte 1×3000 PNG, resized by its short edge to 384, became 384×1,152,000 pixels (4.5 GB)."""
    processor = ViTHybridImageProcessor.for_base_384()
    with pytest.raises(
        ValueError, match=r"would make 384×1152000 pixels, more than twice Pillow's limit of 89,478,485"
    ):
        processor(Image.new("RGB", (1, 3000)), return_tensors="pt")
    panorama = processor(Image.new("RGB", (8000, 600)), return_tensors="pt")["pixel_values"]  # 13:1 is fine
    assert panorama.shape == (1, 3, 384, 384)
    # classify and eval read a file this way: it is one unreadable image, skipped with --on-error skip
    from vithybrid_fast.data import ImagePipeline

    with pytest.raises(ValueError, match=r"its aspect ratio \(3,000:1\) is too extreme"):
        ImagePipeline(processor).to_uint8(Image.new("RGB", (3000, 1)))


def test_a_low_pixel_limit_refuses_only_resizes_that_enlarge_past_twice_it(monkeypatch):
    """--max-image-pixels 120000 refused every 400×400 photo for the base model ("its aspect ratio is too
    extreme"): the resize's output (384², 147,456 px) was held against the limit itself, shrink or not."""
    processor = ViTHybridImageProcessor.for_base_384()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 120_000)
    assert processor(Image.new("RGB", (400, 400)), return_tensors="pt")["pixel_values"].shape == (1, 3, 384, 384)
    small = ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 64}, crop_size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)
    assert small(Image.new("RGB", (90, 70)), return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)  # a shrink
    assert small(Image.new("RGB", (40, 40)), return_tensors="pt")["pixel_values"].shape == (1, 3, 64, 64)  # 4,096 px
    with pytest.raises(ValueError, match=r"would make 64×128 pixels, more than twice .* 4,000") as refused:
        small(Image.new("RGB", (16, 32)), return_tensors="pt")  # grows to 8,192 px > 8,000
    assert "aspect ratio" not in str(refused.value)  # 2:1 is not the cause


@pytest.mark.parametrize(
    "saved",
    [
        {"size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]},
        {},  # transformers' ViTImageProcessor defaults throughout: 224 × 224, bilinear, mean/std 0.5
    ],
)
def test_a_vit_image_processor_config_is_read_with_its_meaning(saved, tmp_path):
    """A checkpoint saved with transformers' ViTImageProcessor (no center crop) got our default 224 crop:
    a 384 model's input came out 224 and the error spoke of the feature grid (session 20's user audit)."""
    from transformers import ViTImageProcessor

    config = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "do_rescale": True, **saved}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="a ViTImageProcessor's: read with its meaning"):
        ours = ViTHybridImageProcessor.from_pretrained(tmp_path)
    theirs = ViTImageProcessor(**{k: v for k, v in config.items() if k != "image_processor_type"})
    image = grace()
    got = ours(image, return_tensors="np")["pixel_values"]
    want = theirs(image, return_tensors="np")["pixel_values"]
    side = saved.get("size", {"height": 224})["height"]
    assert got.shape == want.shape == (1, 3, side, side)
    assert_close(got, want, "ViTImageProcessor config")
    assert ours.to_dict()["do_center_crop"] is False  # saved again, transformers' ViTHybridImageProcessor agrees


def test_a_model_config_given_as_the_processor_config_is_refused(tmp_path):
    """load_processor("ckpt/config.json") read a model's config as a processor config naming no option:
    224 px and CLIP's mean and std, silently (session 20's audit)."""
    import vithybrid_fast as vf

    vf.ViTHybridConfig.base_384().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"config.json is a model config, not a preprocessor config"):
        vf.load_processor(str(tmp_path / "config.json"))
