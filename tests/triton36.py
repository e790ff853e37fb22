"""Where the GPU machines' Triton (3.6.0) sits for the offline compile and interpreter tests, and whether this
interpreter can import it: `make test` installs it into .venv/triton36 for the venv's Python, and a build for
another Python failed to import (the tests failed instead of skipping) when the suite ran under another one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TRITON36 = Path(__file__).resolve().parent.parent / ".venv" / "triton36"


def why_triton36_unusable(root: Path = TRITON36) -> str | None:
    """None if triton 3.6.0 is installed at `root` for this Python, else why not (a skip reason)."""
    wheels = sorted(root.glob("triton-3.6.0.dist-info/WHEEL"))
    if not (root / "triton").is_dir() or not wheels:
        return f"triton 3.6.0 not installed at {root} (make test installs it)"
    tags = [line.split(":", 1)[1].strip() for line in wheels[0].read_text().splitlines() if line.startswith("Tag:")]
    this = f"cp{sys.version_info.major}{sys.version_info.minor}"
    if not any(tag.split("-")[0] == this for tag in tags):
        return f"triton 3.6.0 at {root} was built for {tags[0].split('-')[0] if tags else 'another Python'}, not {this}"
    return None


def require_triton36() -> Path:
    """The install's path, or a skip with the reason it cannot serve this interpreter."""
    reason = why_triton36_unusable()
    if reason is not None:
        pytest.skip(reason)
    return TRITON36
