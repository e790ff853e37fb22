"""Labelled images in: image folders, CSV / JSON-lines lists, Hugging Face datasets.

Sources (`open_dataset(spec, processor)`):
  * a directory of class subfolders, as torchvision's ImageFolder reads it: class index = position of
    the subfolder in sorted order (or, given the training classes, of its name among them: a
    validation folder may lack classes); hidden subfolders (.ipynb_checkpoints) are skipped; image files
    (by extension Pillow knows) found recursively, sorted;
  * a `.csv` file of `path,label` rows (a first row `path,label` is a header; a first row with other
    column names, such as `file,label`, is an error, not data) or a `.jsonl` file of
    `{"path": ..., "label": ...}` objects; relative paths are relative to the list file; classes are
    the sorted distinct labels unless `classes` is given;
  * `hf:NAME[:SPLIT]`: a Hugging Face `datasets` dataset (the optional `[datasets]` extra) with an image
    and a label column; `NAME` is a hub name or a `save_to_disk` directory.

Preprocessing (`ImagePipeline`) splits the processor in two, for speed, with bit-identical results:
  * per image, in DataLoader workers: decode → RGB → resize (PIL, on uint8) → center crop, using the
    processor's own functions, giving a (3, H, W) uint8 tensor — a quarter of the bytes of float32 to
    collate, pin and copy to the GPU;
  * per batch, on the model's device: rescale (float64 product cast to float32) and normalize (float32),
    the same IEEE operations in the same order as `ViTHybridImageProcessor`, so the pixels are equal
    bit for bit (tests/test_data.py checks it on the CPU).
  Files are opened with `images.open_image`, which applies the EXIF orientation as `classify` does (the
  processor itself receives decoded images).

An unreadable file never becomes a silently wrong label: its item carries the error, and the consumer
(`split_errors`) raises `UnreadableImageError` naming the path, or with `on_error="skip"` reports it and
leaves it out of every count.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import image_files_below, is_image_file, open_image, pixel_limit
from .processing import ViTHybridImageProcessor, _center_crop, _resize, _to_hwc, resized_size

ON_ERROR = ("fail", "skip")
LIST_SUFFIXES = (".csv", ".jsonl")
HF_PREFIX = "hf:"


def is_list_file(spec: str | os.PathLike) -> bool:
    """Whether a data spec names a .csv / .jsonl list (by its extension, in any case)."""
    return Path(spec).suffix.lower() in LIST_SUFFIXES


class UnreadableImageError(RuntimeError):
    """An image file could not be decoded or preprocessed (the message names it)."""


@dataclass(frozen=True)
class Sample:
    source: str  # a file path, or "NAME[row]" for a datasets row
    label: int


def _require_folder(root: str | os.PathLike) -> None:
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: not a directory (expected one subfolder per class)")


def image_folder_samples(
    root: str | os.PathLike, classes: Sequence[str] | None = None
) -> tuple[list[Sample], list[str]]:
    """(samples, classes) of a directory of class subfolders; see the module docstring.

    Given `classes` (a validation folder read with the training classes), each subfolder is labelled by
    its name's position among them: the folder may lack some classes (a small validation set), but a
    subfolder that is none of them is an error naming it.
    """
    root = Path(root)
    _require_folder(root)
    # hidden folders (.ipynb_checkpoints, .git, .cache) are no classes: taken as one, an empty
    # .ipynb_checkpoints became class 0 and moved every real class's index
    folders = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"{root}: no class subfolders (expected e.g. {root}/cat/*.jpg, {root}/dog/*.jpg)")
    classes = folders if classes is None else list(classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = [name for name in folders if name not in index]
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the classes {classes}")
    samples = []
    for name in folders:
        files = image_files_below(root / name)
        samples.extend(Sample(str(p), index[name]) for p in files)
    if not samples:
        raise FileNotFoundError(f"{root}: the class subfolders hold no image files")
    return samples, classes


def _csv_header_error(path: Path, line_no: int, row: list[str]) -> str | None:
    """Why the first row of a CSV list is a header other than `path,label`; None when it reads as data.

    A first row whose path cell is neither an image file name (by extension) nor an existing file is
    a header with other column names (`file,lab`): read as data it became a class of its own. A
    first row naming a missing image stays data: it fails (or is skipped) as an unreadable image.
    """
    cell = row[0].strip()
    if is_image_file(cell) or (path.parent / cell).is_file():
        return None
    return (
        f"{path}:{line_no}: the first row {','.join(row)!r} is not the header 'path,label' and {cell!r} is no "
        "image file. A CSV list's header must be exactly path,label: rename its columns, or remove the header "
        "row (every row is then path,label)"
    )


def _list_rows(path: Path) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    # utf-8-sig: a byte-order mark (spreadsheets' "CSV UTF-8") is not part of the first cell
    with open(path, encoding="utf-8-sig", newline="") as f:
        if path.suffix.lower() == ".csv":
            first = True
            for line_no, row in enumerate(csv.reader(f), 1):
                if not row:
                    continue
                if first and [c.strip().lower() for c in row] == ["path", "label"]:
                    first = False
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}:{line_no}: expected 2 columns path,label, got {len(row)}")
                if first and (error := _csv_header_error(path, line_no, row)) is not None:
                    raise ValueError(error)
                first = False
                rows.append((row[0].strip(), row[1].strip()))
        else:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    rows.append((str(item["path"]), str(item["label"])))
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{line_no}: expected {{'path': ..., 'label': ...}}: {err!r}") from None
    if not rows:
        raise ValueError(f"{path}: the list holds no rows")
    return rows


def list_file_samples(path: str | os.PathLike, classes: Sequence[str] | None = None) -> tuple[list[Sample], list[str]]:
    """(samples, classes) of a `path,label` CSV or JSON-lines list; see the module docstring."""
    path = Path(path)
    if not is_list_file(path):
        raise ValueError(f"{path}: a list must be a .csv or .jsonl file")
    rows = _list_rows(path)
    classes = sorted({label for _, label in rows}) if classes is None else list(classes)
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in rows} - set(index))
    if unknown:
        raise ValueError(f"{path}: labels not among the classes {classes}: {unknown}")
    return [Sample(str(path.parent / p), index[label]) for p, label in rows], classes


RESIZE_ON = ("cpu", "device")


class ImagePipeline:
    """The processor split into a per-image uint8 part (workers) and a batched float part (device).

    resize_on="device": the workers only decode (and convert to RGB); `finish` resizes and crops on the
    model's device, with Pillow's arithmetic (`device_resize`), so the bytes are the same. On an H200's host
    the CPU resize held evaluation to 746 images/s; decoding alone ran at 2,542/s."""

    def __init__(self, processor: ViTHybridImageProcessor, resize_on: str = "cpu") -> None:
        self.processor = processor
        fixed_size = processor.do_center_crop or (processor.do_resize and "height" in processor.size)
        if not fixed_size:
            raise ValueError("batched preprocessing needs a fixed image size: do_center_crop or size={height, width}")
        if resize_on not in RESIZE_ON:
            raise ValueError(f"resize_on must be one of {RESIZE_ON}, got {resize_on!r}")
        if resize_on == "device":
            from .device_resize import SUPPORTED_RESAMPLE

            if not (processor.do_resize and processor.do_center_crop):
                raise ValueError("resize_on='device' takes a processor that resizes and center-crops")
            if int(processor.resample) not in SUPPORTED_RESAMPLE:
                raise ValueError(
                    f"resize_on='device' reproduces Pillow's BILINEAR and BICUBIC resizes, not resample="
                    f"{processor.resample}: use resize_on='cpu'"
                )
        self.resize_on = resize_on
        channels = 3 if processor.do_convert_rgb else None
        self.mean = self._per_channel(processor.image_mean, channels)
        self.std = self._per_channel(processor.image_std, channels)

    @staticmethod
    def _per_channel(value: float | list[float], channels: int | None) -> torch.Tensor:
        values = value if isinstance(value, list) else [value] * (channels or 1)
        return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)  # float32, as the processor's arrays

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """Decoded image → (3, H, W) uint8: RGB, resized and cropped exactly as the processor does."""
        p = self.processor
        array = _to_hwc(image, p.do_convert_rgb, None)
        if array.dtype != np.uint8:
            raise ValueError(f"a {image.mode} image decodes to {array.dtype}; the batched path takes 8-bit images")
        if self.resize_on == "device":  # `finish` resizes; the size limit is checked here, per image, as before
            resized_size(array.shape[0], array.shape[1], p.size)
            return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
        if p.do_resize:
            array = _resize(array, p.size, p.resample)
        if p.do_center_crop:
            array = _center_crop(array, p.crop_size["height"], p.crop_size["width"])
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def finish(self, pixels: torch.Tensor | list[torch.Tensor], device: torch.device | str) -> torch.Tensor:
        """A collated batch of `to_uint8` outputs → (B, C, H, W) uint8 on `device`, resized and cropped there
        where resize_on="device" (the images may then differ in size: a list)."""
        if self.resize_on == "cpu":
            return pixels.to(device, non_blocking=True)
        from .device_resize import resize_batch

        p = self.processor
        crop = (p.crop_size["height"], p.crop_size["width"])
        size_of = functools.partial(resized_size, size=p.size)
        return resize_batch(list(pixels), size_of, crop, int(p.resample), torch.device(device))

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) uint8 → float32 pixel_values, on whatever device `pixels` is on."""
        p = self.processor
        x = pixels
        if p.do_rescale:
            x = (x.to(torch.float64) * p.rescale_factor).to(torch.float32)  # float64 product, as the processor
        if p.do_normalize:
            x = x.to(torch.float32)
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x.to(torch.float32)


_REWARNED: set[tuple] = set()  # the warnings LabelledImages.__getitem__ gave on (see there)


class LabelledImages(torch.utils.data.Dataset):
    """Samples + classes; item i → {"index", "label", "pixels": uint8 (3, H, W)} or {"index", "label", "error"}.

    With `augment` set (training), the pixels are that augmentation's draw for (index, epoch)."""

    def __init__(self, samples: list[Sample], classes: list[str], pipeline: ImagePipeline, name: str = "") -> None:
        self.samples, self.classes, self.pipeline, self.name = samples, classes, pipeline, name
        self.augment: Any = None  # a TrainAugment for training data (see `augment.py`), else None
        self.epoch = 0
        # Pillow's decompression-bomb limit as set when the data was opened (by --max-image-pixels, or by
        # the user): a DataLoader worker started by forkserver or spawn imports PIL afresh, with the default
        self.pixel_limit = Image.MAX_IMAGE_PIXELS

    def set_epoch(self, epoch: int) -> None:
        """The epoch the augmentation draws for. DataLoader workers copy the dataset when an epoch's
        iteration starts, so this must be set before it, with non-persistent workers (`finetune` does)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> Image.Image:
        return open_image(self.samples[index].source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        item: dict[str, Any] = {"index": index, "label": sample.label}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # this image's warnings, given on below with its name where needed
            try:
                with pixel_limit(self.pixel_limit):  # the processor's resize check reads it too
                    image = self.load_image(index)
                    if self.augment is None:
                        item["pixels"] = self.pipeline.to_uint8(image)
                    else:
                        item["pixels"] = self.augment.to_uint8(image, index, self.epoch)
            except Exception as err:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError…
                item["error"] = f"{sample.source}: {type(err).__name__}: {err}"
        for record in caught:
            # Pillow's decompression-bomb warning names no file ("Image size (N pixels) exceeds limit…"):
            # a data set of such images warned the same line for each, with no way to find them
            bomb = issubclass(record.category, Image.DecompressionBombWarning)
            if not bomb:
                # any other warning (same text, same place for every image) once per process, as Python's
                # default filter showed it before this capture (a registry cannot: catch_warnings clears them)
                key = (record.category, str(record.message), record.filename, record.lineno)
                if key in _REWARNED:
                    continue
                _REWARNED.add(key)
            message = f"{sample.source}: {record.message}" if bomb else record.message
            warnings.warn_explicit(message, record.category, record.filename, record.lineno)
        return item


class HFLabelledImages(LabelledImages):
    """Rows of a `datasets.Dataset` with an image column (PIL images) and a label column."""

    def __init__(
        self, dataset: Any, pipeline: ImagePipeline, name: str, image_column: str, label_column: str,
        classes: Sequence[str] | None = None,
    ):  # fmt: skip
        for column in (image_column, label_column):
            if column not in dataset.column_names:
                raise ValueError(
                    f"{name}: no column {column!r}; columns are {dataset.column_names} "
                    "(--image-column / --label-column name them)"
                )
        feature = dataset.features[label_column]
        raw = dataset[label_column]
        if hasattr(feature, "names"):  # a ClassLabel: its names in index order (open_dataset checks them)
            classes, labels = list(feature.names), [int(v) for v in raw]
        else:  # plain values: sorted, or by name among the given classes (a split may lack some)
            values = sorted({str(v) for v in raw})
            classes = values if classes is None else list(classes)
            index = {c: i for i, c in enumerate(classes)}
            unknown = [v for v in values if v not in index]
            if unknown:
                raise ValueError(f"{name}: labels {unknown} are not among the classes {classes}")
            labels = [index[str(v)] for v in raw]
        samples = [Sample(f"{name}[{row}]", label) for row, label in enumerate(labels)]
        super().__init__(samples, classes, pipeline, name)
        self.dataset, self.image_column = dataset, image_column

    def load_image(self, index: int) -> Image.Image:
        image = self.dataset[index][self.image_column]
        if not isinstance(image, Image.Image):
            raise ValueError(f"column {self.image_column!r} holds {type(image).__name__}, not a PIL image")
        # RGB, as transformers' image-classification example converts a dataset's images (and as
        # open_image converts files): grey and RGBA rows batch with the rest whatever do_convert_rgb says
        return image.convert("RGB")


def _import_datasets(spec: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"{spec} needs the `datasets` package: pip install 'vithybrid-fast[datasets]'") from None
    return datasets


def _hf_name(spec: str) -> tuple[str, str]:
    """(NAME, SPLIT or "") of `hf:NAME[:SPLIT]`; an empty NAME is an error, not a dataset."""
    name, _, split = spec[len(HF_PREFIX) :].partition(":")
    if not name:
        raise ValueError(f"{spec!r}: no dataset name after 'hf:' (hf:NAME, hf:NAME:SPLIT or hf:DIR)")
    return name, split


def check_source(spec: str | os.PathLike) -> None:
    """open_dataset's cheap checks, for a command to run before it loads a model: a typo in DATA must not
    cost a model download (or, offline, hide behind the hub's error) first. A local source must exist;
    `hf:` needs a name and the `datasets` package."""
    text = str(spec)
    if text.startswith(HF_PREFIX):
        _hf_name(text)
        _import_datasets(text)
    elif is_list_file(text) and not Path(text).is_dir():
        if not Path(text).is_file():  # a mistyped list name, not "not a directory"
            raise FileNotFoundError(f"{text}: no such file")
    else:
        _require_folder(text)


def _load_hub_dataset(datasets: Any, spec: str, name: str, split: str) -> Any:
    """datasets.load_dataset, cache only where the hub is unreachable: otherwise datasets retries a dead
    network five times, printing each retry's traceback (27 s, then the error)."""
    from huggingface_hub import constants

    from .hub import hub_offline, hub_unreachable_reason

    unreachable = None if hub_offline() else hub_unreachable_reason()
    if unreachable is None:
        return datasets.load_dataset(name, split=split)
    # the offline switches each library reads at call time (datasets' names vary across its versions)
    switches = [(module, attr) for module, attr in ((constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
                (datasets.config, "HF_DATASETS_OFFLINE")) if hasattr(module, attr)]  # fmt: skip
    saved = [getattr(module, attr) for module, attr in switches]
    for module, attr in switches:
        setattr(module, attr, True)
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as err:  # datasets' offline errors vary by version: the cause goes in the message
        raise ConnectionError(
            f"{spec}: the hub is unreachable ({unreachable}) and {name!r} is not in the local datasets cache "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
        ) from None
    finally:
        for (module, attr), value in zip(switches, saved):
            setattr(module, attr, value)


def _load_hf(spec: str, split: str | None) -> tuple[Any, str]:
    datasets = _import_datasets(spec)
    name, spec_split = _hf_name(spec)
    split = spec_split or split or "train"
    if Path(name).is_dir():
        loaded = datasets.load_from_disk(name)
        if not isinstance(loaded, datasets.DatasetDict):
            # one Dataset saved alone has no splits: it is the data whatever split was asked, and its
            # name says so (finetune refuses to validate on its training images: see train.py)
            if spec_split:
                raise ValueError(f"{spec}: {name} holds one dataset without splits; name it as hf:{name}")
            return loaded, name
        if split not in loaded:  # a KeyError here ended the command with a traceback
            raise ValueError(f"{spec}: {name} has no split {split!r}; its splits are {list(loaded)}")
        dataset = loaded[split]
    else:
        dataset = _load_hub_dataset(datasets, spec, name, split)
    return dataset, f"{name}:{split}"


def open_dataset(
    spec: str | os.PathLike,
    pipeline: ImagePipeline,
    classes: Sequence[str] | None = None,
    split: str | None = None,
    image_column: str = "image",
    label_column: str = "label",
) -> LabelledImages:
    """An image folder, a .csv/.jsonl list or `hf:NAME[:SPLIT]` as a LabelledImages dataset.

    `classes` (the training classes, for a validation set) fixes the label indices by class name; the
    set may lack some of them, but a class outside them is an error (a datasets ClassLabel must list
    exactly these names, in this order)."""
    text = str(spec)
    check_source(text)
    if text.startswith(HF_PREFIX):
        dataset, name = _load_hf(text, split)
        data: LabelledImages = HFLabelledImages(dataset, pipeline, name, image_column, label_column, classes)
    elif is_list_file(text) and not Path(text).is_dir():
        samples, found = list_file_samples(text, classes)
        data = LabelledImages(samples, found, pipeline, text)
    else:
        samples, found = image_folder_samples(text, classes)
        data = LabelledImages(samples, found, pipeline, text)
    if classes is not None and list(data.classes) != list(classes):
        raise ValueError(f"{text}: classes {data.classes} differ from the expected {list(classes)}")
    return data


def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Items → a batch: uint8 pixels of the readable ones, their labels and indices, and the errors."""
    good = [item for item in items if "pixels" in item]
    pixels: Any = None
    if good:  # images still to be resized on the device (ImagePipeline resize_on="device") differ in size
        same_size = len({tuple(item["pixels"].shape) for item in good}) == 1
        pixels = torch.stack([item["pixels"] for item in good]) if same_size else [item["pixels"] for item in good]
    return {
        "pixels": pixels,
        "labels": torch.tensor([item["label"] for item in good], dtype=torch.long),
        "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "errors": [item["error"] for item in items if "error" in item],
    }


def split_errors(batch: dict[str, Any], on_error: str, report: Any = None) -> list[str]:
    """Raise on the batch's unreadable files (`on_error="fail"`), or report them and return their messages."""
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    errors = batch["errors"]
    if errors and on_error == "fail":
        raise UnreadableImageError(f"cannot read image {errors[0]} (pass --on-error skip to leave such files out)")
    for message in errors:
        if report is not None:
            report(f"skipped unreadable image {message}")
    return errors
