"""argparse types shared by the benchmarks' command lines: a bad value is a usage error (exit 2, one line
naming the flag and what it must be), never a traceback minutes into a run or a record of a batch of 0.

Imports no triton (nor does `vithybrid_fast.cli`): `python -m vithybrid_fast.bench` parses its arguments
before it points Triton's caches at fresh folders, which must happen before triton is imported.
"""

from __future__ import annotations

import argparse

from vithybrid_fast.cli import int_at_least

DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what the kernels and the end-to-end benchmark accept


def ints_at_least(minimum: int, count: int | None = None):
    """argparse type for "1,8,64": each value ≥ `minimum` (and `count` of them where given); a typo or a
    batch of 0 is a usage error (exit 2), not a traceback later."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(f"each value must be at least {minimum}, got {text!r}")
        if count is not None and len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated values, got {text!r}")
        return values

    return parse


positive_ints = ints_at_least(1)


positive_int = int_at_least(1)


def dtype_names(text: str) -> list[str]:
    """argparse type for "bfloat16,float16": an unknown name is a usage error naming the choices."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in DTYPE_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown dtype {unknown or text!r}; choose from {', '.join(DTYPE_NAMES)}")
    return names
