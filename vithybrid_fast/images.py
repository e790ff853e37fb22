"""Image files in: which paths are images, and opening one the way transformers' `load_image` does.

`open_image` applies the EXIF orientation (a phone photo stored sideways with an "rotate 90°" tag
is classified upright, as transformers' `load_image` does) and warns when the conversion to 8-bit RGB
will destroy the image: 16-bit and float images (PIL modes I;16*, I, F) are clipped to 0–255 by
Pillow's RGB conversion, so a 16-bit scan comes out mostly white.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageOps

# the extensions Pillow can open (its own registry), lower-case with the dot
IMAGE_EXTENSIONS = frozenset(ext.lower() for ext in Image.registered_extensions())
_LOSSY_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def is_image_file(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def expand_image_paths(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given; directories searched recursively for image files (sorted); glob patterns expanded.

    A pattern the shell did not expand (quoted, or on Windows) is expanded here. Each file comes once, in
    first-seen order, however many inputs name it (a directory and a glob over it, `a.jpg` and `./a.jpg`).
    A directory or pattern that yields no image and a path that does not exist raise FileNotFoundError
    naming it.
    """
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
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
    """The decoded image, upright per its EXIF orientation; warns if RGB conversion will destroy it."""
    with Image.open(path) as image:
        image.load()
        upright = ImageOps.exif_transpose(image)
        if upright is None:  # Pillow < 9.4 returns None for in_place; ours is a copy either way
            upright = image
        upright = upright.copy()
    if upright.mode in _LOSSY_MODES:
        warnings.warn(
            f"{path}: a {upright.mode} (16-bit or float) image; converting it to 8-bit RGB clips values above "
            "255, so the model sees a destroyed image. Convert it to 8-bit yourself first (e.g. scale to 0–255).",
            stacklevel=2,
        )
    return upright
