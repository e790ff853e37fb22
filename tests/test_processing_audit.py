"""ViTHybridImageProcessor against transformers 4.47.1's on inputs users feed it that test_processing.py
does not cover (more PIL modes, EXIF, dtypes, images at the crop size), and the defects an audit found:
data_format=None, unconverted palette/bilevel images, keys transformers drops, saving over a symlink."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from vithybrid_fast.data import ImagePipeline
from vithybrid_fast.processing import BASE_384_PREPROCESSOR_CONFIG, CONFIG_NAME, ViTHybridImageProcessor

transformers = pytest.importorskip("transformers")
from transformers import ViTHybridImageProcessor as HFProcessor  # noqa: E402

from tests.test_processing import (  # noqa: E402
    assert_close,
    assert_matches_transformers,
    grace,
    processors_fixture,  # noqa: F401 (the `processors` fixture)
)


def grey() -> np.ndarray:
    return np.asarray(grace().convert("L"))


def palette_with_transparency() -> Image.Image:
    image = grace().quantize(colors=32)
    image.info["transparency"] = 3  # one palette entry transparent, as in GIFs and 8-bit PNGs
    return image


def exif_rotated_jpeg() -> Image.Image:
    """A JPEG tagged "rotate 90° CW to display": neither processor applies the tag (classify does)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    grace().save(buffer, "JPEG", exif=exif)
    buffer.seek(0)
    return Image.open(buffer)


# name -> builder of an input both processors accept
MORE_CASES = {
    "palette_with_transparency": palette_with_transparency,
    "palette_alpha_PA": lambda: grace().convert("PA"),
    "I_32bit_over_255": lambda: Image.fromarray(grey().astype(np.int32) * 100),  # PIL clips to 255, both sides
    "I16_over_255": lambda: Image.fromarray(grey().astype(np.uint16) * 200),
    "F_0_1": lambda: Image.fromarray(grey().astype(np.float32) / 255),
    "F_0_255": lambda: Image.fromarray(grey().astype(np.float32)),
    "YCbCr": lambda: grace().convert("YCbCr"),
    "exif_rotated_jpeg": exif_rotated_jpeg,
    "exactly_crop_384": lambda: grace().resize((384, 384), Image.Resampling.BOX),
    "exactly_crop_224": lambda: grace().resize((224, 224), Image.Resampling.BOX),
    "numpy_float16_0_1": lambda: (np.asarray(grace()) / 255).astype(np.float16),
    "numpy_int64": lambda: np.asarray(grace()).astype(np.int64),
    "numpy_bool": lambda: np.asarray(grace()) > 128,
    "numpy_big_endian_uint16": lambda: np.asarray(grace()).astype(">u2"),
    "numpy_negative_strides": lambda: np.asarray(grace())[::-1, ::-2],
    "torch_hwc_uint8": lambda: torch.from_numpy(np.asarray(grace()).copy()),
    "torch_float64_0_1": lambda: torch.from_numpy(np.asarray(grace()).transpose(2, 0, 1) / 255.0),
    "torch_requires_grad": lambda: torch.from_numpy(np.asarray(grace()) / 255.0).float().requires_grad_(),
    "tuple_of_pil_images": lambda: (grace(), grace().resize((100, 200))),
}


@pytest.mark.filterwarnings("ignore:It looks like", "ignore:Palette images with Transparency")
@pytest.mark.parametrize("case", list(MORE_CASES))
def test_more_inputs_match_transformers(processors, case):
    assert_matches_transformers(processors, MORE_CASES[case], case)


@pytest.mark.parametrize("images", [grace, lambda: np.asarray(grace()).transpose(2, 0, 1).copy()], ids=["pil", "chw"])
def test_data_format_none_is_refused_like_transformers(images):
    """data_format=None gave channels-last output, whatever the input's layout; transformers raises."""
    with pytest.raises(ValueError, match="data_format must be one of"):
        ViTHybridImageProcessor.for_base_384()(images(), data_format=None)
    with pytest.raises(ValueError):
        HFProcessor(**BASE_384_PREPROCESSOR_CONFIG)(images(), data_format=None)


UNCONVERTED = {
    "palette_P": lambda: grace().quantize(colors=64),
    "palette_with_transparency": palette_with_transparency,
    "palette_alpha_PA": lambda: grace().convert("PA"),
    "bilevel_1": lambda: grace().convert("1"),
}


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("case", list(UNCONVERTED))
@pytest.mark.parametrize("mean", [0.5, [0.5, 0.5, 0.5]], ids=["scalar_mean", "rgb_mean"])
def test_unconverted_palette_and_bilevel_images_are_refused(case, mean):
    """With do_convert_rgb=False a palette image's indices (or a bilevel image's 0/1) were read as grey
    intensities: a wrong picture, or a black one, without a word. transformers raises for them too."""
    config = {**BASE_384_PREPROCESSOR_CONFIG, "do_convert_rgb": False, "image_mean": mean, "image_std": mean}
    with pytest.raises(ValueError, match=r"holds (palette indices|0/1 bits), not pixel intensities"):
        ViTHybridImageProcessor(**config)(UNCONVERTED[case]())
    with pytest.raises(ValueError, match="holds"):  # the batched path of eval/finetune reads them alike
        ImagePipeline(ViTHybridImageProcessor(**config)).to_uint8(UNCONVERTED[case]())
    with pytest.raises(ValueError):
        HFProcessor(**config)(UNCONVERTED[case]())


def test_unconverted_grey_intensities_are_still_read():
    # the refusal is for modes whose values are not intensities; "L" stays the documented one-channel read
    config = {**BASE_384_PREPROCESSOR_CONFIG, "do_convert_rgb": False, "image_mean": 0.5, "image_std": 0.5}
    out = ViTHybridImageProcessor(**config)(grace().convert("L"), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 1, 384, 384)


def test_keys_transformers_drops_are_not_written_back(tmp_path):
    """A config written by an older transformers holds its private `_valid_processor_keys`; transformers
    4.47.1 drops it (and `feature_extractor_type`) on save, and so must we."""
    source = tmp_path / "old"
    source.mkdir()
    stale = {"_valid_processor_keys": ["images", "do_resize"], "feature_extractor_type": "ViTFeatureExtractor"}
    (source / CONFIG_NAME).write_text(json.dumps({**BASE_384_PREPROCESSOR_CONFIG, **stale}))
    ours = ViTHybridImageProcessor.from_pretrained(source)
    assert ours.extra == {}
    ours.save_pretrained(tmp_path / "ours")
    HFProcessor.from_pretrained(source).save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    theirs = json.loads((tmp_path / "theirs" / CONFIG_NAME).read_text())
    assert not set(stale) & set(saved) and not set(stale) & set(theirs)
    assert saved == {**theirs, "resample": int(theirs["resample"])}


def test_save_replaces_a_symlinked_config_instead_of_writing_through_it(tmp_path):
    """A hub cache snapshot's preprocessor_config.json is a symlink into the cache's blobs: saving into
    such a folder wrote through the link and changed the cached file of every other user of it."""
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    original = json.dumps(BASE_384_PREPROCESSOR_CONFIG)
    blob.write_text(original)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / CONFIG_NAME).symlink_to(os.path.relpath(blob, snapshot))

    path = ViTHybridImageProcessor.for_base_384(crop_size=320).save_pretrained(snapshot)
    assert blob.read_text() == original
    assert not path.is_symlink() and json.loads(path.read_text())["crop_size"] == {"height": 320, "width": 320}
    assert sorted(p.name for p in snapshot.iterdir()) == [CONFIG_NAME]  # no temporary file left behind


HALF = [0.5, 0.5, 0.5]
CONFIG_VARIANTS = {
    # what older checkpoints hold: a feature-extractor config with `size` as an int and no crop keys
    "old_feature_extractor": {
        **{"do_normalize": True, "do_resize": True, "feature_extractor_type": "ViTFeatureExtractor"},
        **{"image_mean": HALF, "image_std": HALF, "resample": 2, "size": 384},
    },
    "clip_feature_extractor_crop_int": {
        **{"crop_size": 256, "do_center_crop": True, "feature_extractor_type": "CLIPFeatureExtractor"},
        **{"image_mean": HALF, "image_std": HALF, "resample": 3, "size": 288},
    },
    "size_as_list": {"size": [300, 400], "do_center_crop": False},
    "missing_keys": {},
    "nulls_mean_defaults": {"crop_size": None, "image_mean": None, "image_std": None, "size": None},
    "processor_class_kept": {**BASE_384_PREPROCESSOR_CONFIG, "processor_class": "SomeProcessor"},
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_config_variants_load_and_process_like_transformers(tmp_path, variant):
    (tmp_path / CONFIG_NAME).write_text(json.dumps(CONFIG_VARIANTS[variant]))
    ours, theirs = ViTHybridImageProcessor.from_pretrained(tmp_path), HFProcessor.from_pretrained(tmp_path)
    got = ours(grace(), return_tensors="np")["pixel_values"]
    assert_close(got, theirs(grace(), return_tensors="np")["pixel_values"], variant)
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    saved = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    want = json.loads((tmp_path / "theirs" / CONFIG_NAME).read_text())
    assert saved == want  # both write the resolved values: size dicts, default means, processor_class


def test_from_pretrained_keeps_only_preprocessing_options_from_its_keywords(tmp_path):
    """`foo=1` or `force_download=True` went into `extra` and was written back by save_pretrained;
    transformers ignores them. `subfolder` would read the file at the top instead of the subfolder's."""
    (tmp_path / CONFIG_NAME).write_text(json.dumps(BASE_384_PREPROCESSOR_CONFIG))
    with pytest.warns(UserWarning, match=r"^from_pretrained ignores foo, force_download: not preprocessing options"):
        processor = ViTHybridImageProcessor.from_pretrained(tmp_path, foo=1, force_download=True, crop_size=320)
    assert processor.extra == {} and processor.crop_size == {"height": 320, "width": 320}
    saved = json.loads(processor.save_pretrained(tmp_path / "saved").read_text())
    assert "foo" not in saved and "force_download" not in saved
    with pytest.raises(TypeError, match="does not take subfolder"):
        ViTHybridImageProcessor.from_pretrained(tmp_path, subfolder="other")


def test_the_attributes_code_written_for_transformers_reads():
    ours, theirs = ViTHybridImageProcessor.for_base_384(), HFProcessor(**BASE_384_PREPROCESSOR_CONFIG)
    assert ours.model_input_names == theirs.model_input_names == ["pixel_values"]
    batch = ours(grace(), return_tensors="pt")
    assert list(batch.data) == list(theirs(grace(), return_tensors="pt").data) == ["pixel_values"]
    assert batch.data["pixel_values"] is batch["pixel_values"]
