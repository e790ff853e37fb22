"""argparse types shared by the benchmarks' command lines: a bad value is a usage error (exit 2, one line
naming the flag and what it must be), never a traceback minutes into a run or a record of a batch of 0.

Imports neither torch nor triton: `python -m vithybrid_fast.bench` parses its arguments before it points
Triton's caches at fresh folders, which must happen before triton is imported.
"""

from __future__ import annotations

import argparse

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what the kernels and the end-to-end benchmark accept


def positive_ints(text: str) -> list[int]:
    """argparse type for "1,8,64": a batch of 0 or a typo is a usage error (exit 2), not a traceback later."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"each value must be at least 1, got {text!r}")
    return values


def positive_int(text: str) -> int:
    """argparse type for a count that must be at least 1 (reps, images)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def dtype_names(text: str) -> list[str]:
    """argparse type for "bfloat16,float16": an unknown name is a usage error naming the choices."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in DTYPE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown or text!r}; choose from {', '.join(DTYPE_NAMES)}")
    return names
