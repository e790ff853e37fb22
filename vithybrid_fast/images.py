"""Image files in: which paths are images, and opening one the way transformers' `load_image` does.

`open_image` does what transformers' `load_image` does: it applies the EXIF orientation (a phone photo
stored sideways with a "rotate 90°" tag is classified upright) and converts to RGB, so grey, palette,
RGBA and CMYK files reach the processor as the 3 channels it normalizes, whatever the checkpoint's
`do_convert_rgb`. It warns when that conversion destroys the image: Pillow clips 16-bit and float
images (PIL modes I;16*, I, F) to 0–255 and drops fractions, so a 16-bit scan comes out mostly white
and a float image in 0–1 black.

Which files are images: the extensions Pillow registers, less those it cannot decode by itself
(write-only PDF and Palm, identify-only MPEG, stub HDF5/GRIB/BUFR/WMF plugins, EPS without Ghostscript);
inside a directory, hidden files and folders (`._IMG_1.jpg`, `.ipynb_checkpoints/`) are left out, as
`eval` leaves them out of class folders.

Pillow refuses images over `PIL.Image.MAX_IMAGE_PIXELS` (a decompression-bomb guard, 89.5 MP, an
error over twice that); `classify`, `eval` and `finetune` set it with `--max-image-pixels` (`pixel_limit`).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, ImageOps

# formats Pillow registers extensions for but cannot decode without help: a folder's .pdf or .h5 taken
# for an image stopped `classify` (and counted as an unreadable image in `eval`)
_UNDECODABLE_FORMATS = frozenset({"PDF", "PALM", "MPEG", "HDF5", "GRIB", "BUFR", "WMF", "EPS"})


def _readable_extensions() -> frozenset[str]:
    Image.init()  # every plugin registered, not only the common ones Pillow preloads
    registered = Image.registered_extensions()
    return frozenset(ext.lower() for ext, fmt in registered.items() if fmt not in _UNDECODABLE_FORMATS)


# the extensions of the formats Pillow decodes, lower-case with the dot
IMAGE_EXTENSIONS = _readable_extensions()
_LOSSY_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def image_files_below(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively and sorted, following symlinked folders as torchvision's
    ImageFolder does; hidden files and folders (`._IMG_1.jpg`, `.ipynb_checkpoints` copies) left out.
    The one walk behind `classify`'s directories and `eval`'s class folders."""
    found, seen = [], set()
    for directory, subfolders, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(directory)
        if real in seen:  # a link back up the tree (or twice to one folder) is read once, not forever
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        found.extend(Path(directory) / n for n in names if not n.startswith(".") and is_image_file(n))
    return sorted(found)


def expand_image_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories searched recursively for image files (sorted, hidden ones left out); glob
    patterns expanded.

    A pattern the shell did not expand (quoted, or on Windows) is expanded here. Each file comes once, in
    first-seen order, however many inputs name it (a directory and a glob over it, `a.jpg` and `./a.jpg`).
    A directory or pattern that yields no image and a path that does not exist raise FileNotFoundError
    naming it.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = image_files_below(path)
            if not found:
                raise FileNotFoundError(f"{path}: no image files in this directory (or below it)")
            paths.extend(found)
        elif path.exists():
            paths.append(path)
        elif glob.has_magic(str(item)):
            found = sorted(Path(p) for p in glob.glob(str(item), recursive=True) if is_image_file(p))
            if not found:
                raise FileNotFoundError(f"{item}: the pattern matches no image files")
            paths.extend(found)
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
    # one entry per file, keyed by its absolute normalized path (symlinks are not followed): first seen wins
    first: dict[str, Path] = {}
    for path in paths:
        first.setdefault(os.path.normpath(os.path.abspath(path)), path)
    return list(first.values())


def open_image(path: str | os.PathLike) -> Image.Image:
    """The decoded image as RGB, upright per its EXIF orientation; warns if the RGB conversion destroys it."""
    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        if upright is None:  # Pillow < 9.4 returns None for in_place; ours is a copy either way
            upright = image
        if upright.mode in _LOSSY_MODES:
            warnings.warn(
                f"{path}: a {upright.mode} (16-bit or float) image; converting it to 8-bit RGB clips its values to "
                "0–255 and drops fractions (a 16-bit image turns mostly white, a 0–1 float image black), so the "
                "model sees a destroyed image. Convert it to 8-bit yourself first (e.g. scale to 0–255).",
                stacklevel=2,
            )
        return upright.convert("RGB")  # a new image in every case (also for RGB), so the file can close


def parse_pixel_limit(text: str) -> int | None:
    """An argparse `type` for `--max-image-pixels`: a positive integer (commas and underscores allowed:
    200,000,000), or `none` for no limit."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text.replace(",", "").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of pixels nor 'none'") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (or 'none' for no limit), got {value}")
    return value


def add_pixel_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-image-pixels", type=parse_pixel_limit, default=Image.MAX_IMAGE_PIXELS, metavar="N",
        help="Pillow's decompression-bomb limit: a larger image is an error over 2 × N pixels (and warns over "
        "N); 'none' lifts it, for large scans from a source you trust (default: %(default)s)",
    )  # fmt: skip


@contextlib.contextmanager
def pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's limit set to `limit` for the block, then as it was (a command run by `cli.main` in a
    process that goes on: tests, notebooks). DataLoader workers get it from the dataset (data.py)."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous
