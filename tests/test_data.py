"""Labelled image sources and the batched preprocessing path (vithybrid_fast/data.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vithybrid_fast as vf
from tests.image_folders import CLASSES, synthetic_image, write_image_folder
from vithybrid_fast.data import (
    ImagePipeline,
    LabelledImages,
    UnreadableImageError,
    collate,
    image_folder_samples,
    list_file_samples,
    open_dataset,
    split_errors,
)
from vithybrid_fast.images import open_image


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("folder"), per_class=3, seed=0)


@pytest.fixture
def pipeline():
    return ImagePipeline(vf.ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 72}, crop_size=72))


def test_image_folder_is_recursive_sorted_images_only_classes_in_sorted_order(tmp_path):
    for name in ("b_cls", "a_cls", "c_empty"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "b_cls" / "2.png")
    (tmp_path / "b_cls" / "deep" / "er").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "b_cls" / "deep" / "er" / "1.JPG")  # upper-case extension
    Image.new("RGB", (8, 8)).save(tmp_path / "a_cls" / "x.webp")
    (tmp_path / "a_cls" / "notes.txt").write_text("not an image")
    (tmp_path / "stray.png").write_bytes(b"")  # a file at the top is no class
    samples, classes = image_folder_samples(tmp_path)
    assert classes == ["a_cls", "b_cls", "c_empty"]  # an empty folder still holds a class index
    assert [(s.source.removeprefix(str(tmp_path) + "/"), s.label) for s in samples] == [
        ("a_cls/x.webp", 0),
        ("b_cls/2.png", 1),
        ("b_cls/deep/er/1.JPG", 1),
    ]


def test_image_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        image_folder_samples(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        image_folder_samples(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(FileNotFoundError, match="hold no image files"):
        image_folder_samples(tmp_path)


def test_csv_and_jsonl_lists(folder, tmp_path):
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    rel = [p.relative_to(folder) for p in files]
    labels = [p.parts[0] for p in rel]
    csv_path = folder / "list.csv"
    csv_path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in zip(rel, labels)))
    jsonl_path = tmp_path / "list.jsonl"  # elsewhere: absolute paths
    jsonl_path.write_text("".join(json.dumps({"path": str(p), "label": lab}) + "\n" for p, lab in zip(files, labels)))
    from_csv, csv_classes = list_file_samples(csv_path)
    from_jsonl, jsonl_classes = list_file_samples(jsonl_path)
    assert csv_classes == jsonl_classes == list(CLASSES)
    assert [s.label for s in from_csv] == [CLASSES.index(lab) for lab in labels]
    assert [s.source for s in from_csv] == [str(p) for p in files] == [s.source for s in from_jsonl]
    # given classes fix the index order; a label outside them is an error naming it
    samples, _ = list_file_samples(csv_path, classes=list(reversed(CLASSES)))
    assert [s.label for s in samples] == [2 - CLASSES.index(lab) for lab in labels]
    with pytest.raises(ValueError, match=r"labels not among the classes .*\['red_horizontal'\]"):
        list_file_samples(csv_path, classes=["blue_vertical", "green_checker"])
    bad = tmp_path / "bad.csv"
    bad.write_text("a.png,cat,extra\n")
    with pytest.raises(ValueError, match=r"bad.csv:1: expected 2 columns"):
        list_file_samples(bad)


@pytest.mark.parametrize(
    "header",
    [
        "",  # no header: every row is path,label
        "path,label\n",
        "\ufeffpath,label\n",  # a spreadsheet's "CSV UTF-8" starts with a byte-order mark
        "\n Path , LABEL \n",  # blank first line; case and spaces do not matter
    ],
)
def test_csv_list_with_or_without_its_header(folder, header):
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ".png")
    csv_path = folder / "headers.csv"
    csv_path.write_text(
        header + "".join(f"{p.relative_to(folder)},{p.relative_to(folder).parts[0]}\n" for p in files), "utf-8"
    )
    samples, classes = list_file_samples(csv_path)
    assert classes == list(CLASSES)
    assert [(s.source, s.label) for s in samples] == [
        (str(p), CLASSES.index(p.relative_to(folder).parts[0])) for p in files
    ]


@pytest.mark.parametrize("header", ["file,lab", "filename,class", "image_path,label"])
def test_csv_list_with_another_header_is_an_error_about_the_csv(folder, header):
    """`file,lab` was read as a row: class 'lab' with one image 'file', then an error about class folders."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix == ".png")
    csv_path = folder / "other_header.csv"
    csv_path.write_text(
        header + "\n" + "".join(f"{p.relative_to(folder)},{p.relative_to(folder).parts[0]}\n" for p in files)
    )
    with pytest.raises(ValueError) as error:
        list_file_samples(csv_path)
    assert str(error.value) == (
        f"{csv_path}:1: the first row {header!r} is not the header 'path,label' and {header.split(',')[0]!r} is "
        "no image file. A CSV list's header must be exactly path,label: rename its columns, or remove the header "
        "row (every row is then path,label)"
    )


def test_csv_list_first_row_naming_a_missing_image_stays_data(folder):
    """A missing image is an unreadable file (fail or skip), not a header."""
    csv_path = folder / "missing_first.csv"
    csv_path.write_text("gone/photo.JPG,cat\nred_horizontal/000.png,red_horizontal\n")
    samples, classes = list_file_samples(csv_path)
    assert classes == ["cat", "red_horizontal"]
    assert [(s.source, s.label) for s in samples] == [
        (str(folder / "gone/photo.JPG"), 0), (str(folder / "red_horizontal/000.png"), 1)
    ]  # fmt: skip


def _odd_images(tmp_path):
    rng = np.random.default_rng(3)
    images = [synthetic_image(name, rng) for name in CLASSES]
    images.append(Image.fromarray(rng.integers(0, 256, (50, 130), dtype=np.uint8), "L"))  # grayscale, small
    images.append(Image.fromarray(rng.integers(0, 256, (97, 61, 4), dtype=np.uint8), "RGBA"))
    images.append(images[0].convert("P"))  # palette
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        image.save(paths[-1])
    exif_path = tmp_path / "rotated.jpg"  # stored sideways with an EXIF "rotate 90°" tag
    exif = Image.Exif()
    exif[0x0112] = 6
    images[1].save(exif_path, exif=exif)
    return [*paths, exif_path]


@pytest.mark.parametrize(
    "processor_kwargs",
    [
        {"size": {"shortest_edge": 72}, "crop_size": 72},  # the hub preset at 72 px
        {"size": {"shortest_edge": 80}, "crop_size": {"height": 72, "width": 64}, "resample": 2},
        {"size": {"shortest_edge": 40}, "crop_size": 72},  # crop larger than the image: zero padding
        {"size": {"height": 72, "width": 72}, "do_center_crop": False, "do_rescale": False},
    ],
)
def test_batched_pipeline_is_bit_identical_to_the_processor(tmp_path, processor_kwargs):
    processor = vf.ViTHybridImageProcessor.for_base_384(**processor_kwargs)
    pipeline = ImagePipeline(processor)
    paths = _odd_images(tmp_path)
    expected = processor([open_image(p) for p in paths], return_tensors="pt")["pixel_values"]
    uint8 = torch.stack([pipeline.to_uint8(open_image(p)) for p in paths])
    assert uint8.dtype == torch.uint8
    ours = pipeline.normalize(uint8)
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert torch.equal(ours, expected), (ours - expected).abs().max()
    if not (processor.do_resize and processor.do_center_crop):
        with pytest.raises(ValueError, match="resizes and center-crops"):
            ImagePipeline(processor, resize_on="device")
        return
    # the workers only decode; the resize and crop run where the batch goes, with the same bytes
    on_device = ImagePipeline(processor, resize_on="device")
    raw = [on_device.to_uint8(open_image(p)) for p in paths]
    assert len({tuple(r.shape) for r in raw}) > 1  # not resized yet: the batch is a list
    batch = collate([{"index": i, "label": 0, "pixels": r} for i, r in enumerate(raw)])
    assert isinstance(batch["pixels"], list)
    assert torch.equal(on_device.normalize(on_device.finish(batch["pixels"], "cpu")), expected)


def test_grey_rgba_and_palette_files_batch_whatever_the_checkpoint_says_of_rgb(tmp_path):
    """do_convert_rgb false (some checkpoints' preprocessor_config.json): a grey file failed with "image_mean
    has 3 values but the image has 1 channels", and eval's batches with "stack expects each tensor to be
    equal size". Files open as transformers' load_image opens them, in RGB, so both flags agree."""
    kwargs = {"size": {"shortest_edge": 72}, "crop_size": 72}
    converting = vf.ViTHybridImageProcessor.for_base_384(**kwargs)
    as_given = vf.ViTHybridImageProcessor.for_base_384(**kwargs, do_convert_rgb=False)
    paths = _odd_images(tmp_path)
    opened = [open_image(p) for p in paths]
    assert {image.mode for image in opened} == {"RGB"}
    expected = converting(opened, return_tensors="pt")["pixel_values"]
    assert torch.equal(as_given(opened, return_tensors="pt")["pixel_values"], expected)
    pipeline = ImagePipeline(as_given)
    batch = collate([{"index": i, "label": 0, "pixels": pipeline.to_uint8(im)} for i, im in enumerate(opened)])
    assert torch.equal(pipeline.normalize(batch["pixels"]), expected)


def test_pipeline_needs_a_fixed_size():
    processor = vf.ViTHybridImageProcessor(do_center_crop=False, size={"shortest_edge": 72})
    with pytest.raises(ValueError, match="fixed image size"):
        ImagePipeline(processor)


def test_resize_on_device_refuses_what_it_cannot_reproduce_and_keeps_the_size_limit(monkeypatch):
    processor = vf.ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 72}, crop_size=72)
    with pytest.raises(ValueError, match=r"resize_on must be one of \('cpu', 'device'\), got 'gpu'"):
        ImagePipeline(processor, resize_on="gpu")
    lanczos = vf.ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 72}, crop_size=72, resample=1)
    with pytest.raises(ValueError, match="not resample=1: use resize_on='cpu'"):
        ImagePipeline(lanczos, resize_on="device")
    # a sliver whose resize would exceed Pillow's pixel limit is refused in the worker, as on the CPU path
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 72 * 1000)
    sliver = Image.fromarray(np.zeros((2, 3000, 3), dtype=np.uint8))
    for resize_on in ("cpu", "device"):
        with pytest.raises(ValueError, match=r"its aspect ratio \(1,500:1\) is too extreme"):
            ImagePipeline(processor, resize_on=resize_on).to_uint8(sliver)


def test_unreadable_files_in_worker_processes_fail_or_skip_by_path(folder, tmp_path, pipeline):
    samples, classes = image_folder_samples(folder)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    samples.insert(2, type(samples[0])(str(broken), 0))
    dataset = LabelledImages(samples, classes, pipeline)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=collate)
    batches = list(loader)
    assert batches[0]["errors"] and str(broken) in batches[0]["errors"][0]
    assert batches[0]["indices"].tolist() == [0, 1, 3]  # the broken file is not in the batch
    assert batches[0]["labels"].tolist() == [s.label for s in samples[:4] if s.source != str(broken)]
    with pytest.raises(UnreadableImageError, match=f"cannot read image {broken}"):
        split_errors(batches[0], "fail")
    reported = []
    assert split_errors(batches[0], "skip", reported.append) == batches[0]["errors"]
    assert reported == [f"skipped unreadable image {batches[0]['errors'][0]}"]
    assert sum(len(b["labels"]) for b in batches) == len(samples) - 1


BOMB_SCRIPT = """
import sys, warnings
import torch
from PIL import Image
import vithybrid_fast as vf
from vithybrid_fast.data import ImagePipeline, LabelledImages, Sample, collate

Image.MAX_IMAGE_PIXELS = 7000  # 12,000 px: over the limit, under twice it
pipeline = ImagePipeline(vf.ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 72}, crop_size=72))
dataset = LabelledImages([Sample(p, 0) for p in sys.argv[2:]], ["x"], pipeline)
loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=int(sys.argv[1]), collate_fn=collate)
(batch,) = list(loader)
assert batch["indices"].tolist() == [0, 1] and not batch["errors"]
"""


@pytest.mark.parametrize("workers", [0, 1])
def test_a_decompression_bomb_warning_names_its_file(tmp_path, workers):
    """Pillow's warning over the pixel limit names no file; eval and finetune read images in DataLoader
    workers (a process of their own, printing its own warnings), where classify's naming did not reach."""
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for path in paths:
        Image.new("RGB", (120, 100)).save(path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", BOMB_SCRIPT, str(workers), *map(str, paths)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "DecompressionBombWarning" in line]
    assert len(lines) == 2, done.stderr
    for path, line in zip(paths, lines, strict=True):
        assert f"{path}: Image size (12000 pixels) exceeds limit of 7000 pixels" in line


def test_a_warning_every_image_gives_is_shown_once(folder, pipeline, monkeypatch):
    # the per-image capture that names bomb warnings gives other warnings on as Python would: once per
    # text and place under the default filter, not once per image
    import uuid
    import warnings

    samples, classes = image_folder_samples(folder)
    text = f"the same for every image {uuid.uuid4()}"
    real = LabelledImages.load_image

    def warning_load(self, index):
        warnings.warn(text, UserWarning, stacklevel=1)
        return real(self, index)

    monkeypatch.setattr(LabelledImages, "load_image", warning_load)
    dataset = LabelledImages(samples[:3], classes, pipeline)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        items = [dataset[i] for i in range(3)]
    assert all("pixels" in item for item in items)
    assert [str(w.message) for w in caught].count(text) == 1


def test_open_dataset_dispatches_and_checks_classes(folder, pipeline):
    data = open_dataset(folder, pipeline)
    assert data.classes == list(CLASSES) and len(data) == 9
    item = data[0]
    assert item["pixels"].shape == (3, 72, 72) and item["label"] == 0
    with pytest.raises(ValueError, match=r"class folders \['blue_vertical', 'green_checker', 'red_horizontal'\] "
                       r"are not among the classes \['x', 'y', 'z'\]"):  # fmt: skip
        open_dataset(folder, pipeline, classes=["x", "y", "z"])


def test_a_folder_read_with_given_classes_labels_by_name_and_may_lack_some(folder, pipeline, tmp_path):
    """A validation folder without one of the training classes: its labels stay the training indices."""
    subset = tmp_path / "val"
    shutil.copytree(folder / "green_checker", subset / "green_checker")
    shutil.copytree(folder / "red_horizontal", subset / "red_horizontal")
    training_classes = ["red_horizontal", "blue_vertical", "green_checker"]  # not sorted: names decide
    data = open_dataset(subset, pipeline, classes=training_classes)
    assert data.classes == training_classes and len(data) == 6
    by_folder = {Path(s.source).relative_to(subset).parts[0]: s.label for s in data.samples}
    assert by_folder == {"green_checker": 2, "red_horizontal": 0}
    (subset / "purple_dots").mkdir()
    with pytest.raises(ValueError, match=r"class folders \['purple_dots'\] are not among the classes"):
        open_dataset(subset, pipeline, classes=training_classes)


def test_hugging_face_dataset_with_class_labels(pipeline, tmp_path):
    datasets = pytest.importorskip("datasets")  # the optional [datasets] extra
    rng = np.random.default_rng(0)
    names = ["red_horizontal", "blue_vertical", "green_checker"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict(
        {"image": [synthetic_image(n, rng) for n in names], "label": [0, 1, 2]}, features=features
    )
    from vithybrid_fast.data import HFLabelledImages

    data = HFLabelledImages(ds, pipeline, "toy:train", "image", "label")
    assert data.classes == names  # ClassLabel order, not sorted
    assert [s.label for s in data.samples] == [0, 1, 2]
    assert data.samples[1].source == "toy:train[1]"
    expected = pipeline.processor(list(ds["image"]), return_tensors="pt")["pixel_values"]
    batch = collate([data[i] for i in range(3)])
    assert torch.equal(pipeline.normalize(batch["pixels"]), expected)
    with pytest.raises(ValueError, match="no column 'img'"):
        HFLabelledImages(ds, pipeline, "toy", "img", "label")
    # the spec the commands take: hf:NAME[:SPLIT], NAME a save_to_disk directory here (no hub access)
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "toy"))
    opened = open_dataset(f"hf:{tmp_path / 'toy'}", pipeline, split="validation")
    assert opened.classes == names and opened.samples[2].source == f"{tmp_path / 'toy'}:validation[2]"


def test_hugging_face_rows_in_grey_or_rgba_batch_with_rgb_ones(tmp_path):
    datasets = pytest.importorskip("datasets")
    from vithybrid_fast.data import HFLabelledImages

    rng = np.random.default_rng(2)
    rgb = synthetic_image("red_horizontal", rng)
    rows = [rgb, rgb.convert("L"), rgb.convert("RGBA")]
    ds = datasets.Dataset.from_dict(
        {"image": rows, "label": ["a", "b", "c"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    processor = vf.ViTHybridImageProcessor.for_base_384(size={"shortest_edge": 72}, crop_size=72, do_convert_rgb=False)
    pipeline = ImagePipeline(processor)
    data = HFLabelledImages(ds, pipeline, "toy", "image", "label")
    batch = collate([data[i] for i in range(3)])
    assert batch["errors"] == [] and batch["pixels"].shape == (3, 3, 72, 72)
    expected = processor([image.convert("RGB") for image in ds["image"]], return_tensors="pt")["pixel_values"]
    assert torch.equal(pipeline.normalize(batch["pixels"]), expected)


def _toy_hf(datasets, names, column="image"):
    rng = np.random.default_rng(0)
    features = datasets.Features({column: datasets.Image(), "label": datasets.ClassLabel(names=names)})
    images = [synthetic_image(n, rng) for n in names]
    return datasets.Dataset.from_dict({column: images, "label": list(range(len(names)))}, features=features)


def test_hugging_face_directory_splits_are_checked(pipeline, tmp_path):
    """A DatasetDict without the split asked for raised a bare KeyError (a traceback in the CLI); a
    Dataset saved alone answered every split with itself, so finetune validated on its training images."""
    datasets = pytest.importorskip("datasets")
    names = ["red_horizontal", "blue_vertical", "green_checker"]
    datasets.DatasetDict({"train": _toy_hf(datasets, names), "test": _toy_hf(datasets, names)}).save_to_disk(
        str(tmp_path / "splits")
    )
    with pytest.raises(ValueError, match=r"has no split 'validation'; its splits are \['train', 'test'\]"):
        open_dataset(f"hf:{tmp_path / 'splits'}", pipeline, split="validation")
    assert open_dataset(f"hf:{tmp_path / 'splits'}:test", pipeline, split="validation").name.endswith(":test")
    _toy_hf(datasets, names).save_to_disk(str(tmp_path / "one"))
    assert open_dataset(f"hf:{tmp_path / 'one'}", pipeline, split="validation").name == str(tmp_path / "one")
    with pytest.raises(ValueError, match="holds one dataset without splits"):
        open_dataset(f"hf:{tmp_path / 'one'}:train", pipeline)


def test_finetune_refuses_to_validate_on_its_training_images(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from tests.image_folders import write_start_checkpoint
    from vithybrid_fast.cli import main

    _toy_hf(datasets, ["red_horizontal", "blue_vertical"]).save_to_disk(str(tmp_path / "one"))
    write_start_checkpoint(tmp_path / "start")
    argv = ["finetune", f"hf:{tmp_path / 'one'}", "--model", str(tmp_path / "start"), "--output-dir",
            str(tmp_path / "run"), "--device", "cpu", "--kernels", "sdpa", "--num-workers", "0"]  # fmt: skip
    assert main(argv) == 1
    assert "the training and the validation data are both" in capsys.readouterr().err
    assert not (tmp_path / "run" / "last").exists()


def test_hugging_face_columns_are_named_on_the_command_line(tmp_path, capsys):
    """A CIFAR-style dataset keeps its images in "img": eval had no way to say so."""
    datasets = pytest.importorskip("datasets")
    from tests.image_folders import write_start_checkpoint
    from vithybrid_fast.cli import main

    names = ["red_horizontal", "blue_vertical"]
    datasets.DatasetDict({"validation": _toy_hf(datasets, names, column="img")}).save_to_disk(str(tmp_path / "c"))
    write_start_checkpoint(tmp_path / "start")
    (tmp_path / "map.json").write_text(json.dumps({name: i for i, name in enumerate(names)}))
    argv = ["eval", f"hf:{tmp_path / 'c'}", "--model", str(tmp_path / "start"), "--device", "cpu", "--kernels",
            "sdpa", "--num-workers", "0", "--label-map", str(tmp_path / "map.json")]  # fmt: skip
    assert main(argv) == 1
    assert "no column 'image'; columns are ['img', 'label'] (--image-column" in capsys.readouterr().err
    assert main([*argv, "--image-column", "img"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("images: 2")


def test_hugging_face_plain_labels_map_by_name_onto_given_classes(pipeline):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(1)
    ds = datasets.Dataset.from_dict(
        {"image": [synthetic_image("red_horizontal", rng) for _ in range(2)], "label": ["dog", "cat"]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("string")}),
    )
    from vithybrid_fast.data import HFLabelledImages

    assert HFLabelledImages(ds, pipeline, "toy", "image", "label").classes == ["cat", "dog"]  # sorted alone
    data = HFLabelledImages(ds, pipeline, "toy", "image", "label", classes=["bird", "cat", "dog"])
    assert data.classes == ["bird", "cat", "dog"] and [s.label for s in data.samples] == [2, 1]
    with pytest.raises(ValueError, match=r"toy: labels \['dog'\] are not among the classes \['bird', 'cat'\]"):
        HFLabelledImages(ds, pipeline, "toy", "image", "label", classes=["bird", "cat"])


def test_hidden_folders_are_neither_classes_nor_samples(folder, tmp_path):
    """Jupyter's .ipynb_checkpoints (copies of images) beside or inside class folders: no class, no sample."""
    root = tmp_path / "with-hidden"
    shutil.copytree(folder, root)
    shutil.copytree(folder / "green_checker", root / ".ipynb_checkpoints")
    shutil.copytree(folder / "red_horizontal", root / "red_horizontal" / ".ipynb_checkpoints")
    samples, classes = image_folder_samples(root)
    assert classes == list(CLASSES) and len(samples) == 9
    assert not [s for s in samples if ".ipynb_checkpoints" in s.source]


def test_symlinked_folders_inside_class_folders_are_followed(folder, tmp_path):
    """As torchvision's ImageFolder (os.walk followlinks=True): images kept elsewhere, linked in."""
    root = tmp_path / "linked"
    shutil.copytree(folder, root)
    shutil.copytree(folder / "red_horizontal", tmp_path / "elsewhere")
    (root / "red_horizontal" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    samples, classes = image_folder_samples(root)
    assert classes == list(CLASSES) and len(samples) == 12
    assert sum("/more/" in s.source for s in samples) == 3
    (root / "green_checker" / "loop").symlink_to(root / "green_checker", target_is_directory=True)
    assert len(image_folder_samples(root)[0]) == 12  # a link back up is read once, not forever
