"""What each config.json field must be, as transformers reads it, and the checks that say so.

Each rule is (test, wording): a failed test raises ValueError "FIELD must be WORDING, got VALUE", so a
hand-edited config.json fails when it is read, naming the field, instead of as an IndexError or a
ZeroDivisionError inside the model (or, for "72" as image_size, not at all: it read as 7 × 2).
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no size or count


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value: Any) -> bool:
    return is_int(value) and value > 0


def is_list_of(value: Any, valid: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(map(valid, value))


# What a field must be, as transformers reads it: (test, wording for the error).
POSITIVE_INT = (is_positive_int, "a positive int")
POSITIVE = (lambda v: is_real(v) and v > 0, "a positive number")
NON_NEGATIVE = (lambda v: is_real(v) and v >= 0, "a number >= 0")
PROBABILITY = (lambda v: is_real(v) and 0 <= v < 1, "a number in [0, 1)")
FLAG = (lambda v: isinstance(v, bool), "true or false")
# the stem strides 4 and each later stage 2 (or dilates instead), so no other output stride exists
OUTPUT_STRIDE = (lambda v: is_int(v) and v >= 4 and v & (v - 1) == 0, "a power of two from 4 up")


def check_fields(config: Any, rules: dict[str, tuple[Any, str]], prefix: str = "") -> None:
    for field, (valid, wanted) in rules.items():
        value = getattr(config, field)
        if not valid(value):
            raise ValueError(f"{prefix}{field} must be {wanted}, got {value!r}")


def as_int_list(value: Any, field: str) -> list[int]:
    if not is_list_of(value, is_positive_int):
        raise ValueError(f"{field} must be a list of positive ints, got {value!r}")
    return list(value)


def as_hw(value: Any, field: str) -> tuple[int, int]:
    """An int or an [h, w] pair (what transformers takes for image_size and patch_size) as (h, w)."""
    pair = (value, value) if is_int(value) else tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(pair) != 2 or not is_list_of(pair, is_positive_int):
        raise ValueError(f"{field} must be a positive int or [h, w] of positive ints, got {value!r}")
    return pair
