"""The patched model in float16 wherever float16 convolutions run (issue 14, blind spot 8).

tests/test_patching.py skips its float16 case on every CPU ("float16 convolutions are not
implemented for the CPU in every torch build"), although the torch builds this project supports run
them; so float16 end to end never ran without a GPU. Here the skip is decided by trying one: the
case runs wherever a float16 conv2d works (the CPU here, every CUDA GPU) and is skipped, with the
reason, only where it does not.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import build_hf_model, randomize_, tiny_config
from tests.tolerance import assert_close_to_reference

CONFIG = tiny_config(hidden_size=64, num_attention_heads=2)  # head size 32 for the flash kernel


@functools.cache
def float16_conv_works(device: str) -> bool:
    """Whether this torch build runs a float16 conv2d (with padding and stride) on `device`."""
    try:
        x = torch.ones(1, 2, 5, 5, dtype=torch.float16, device=device)
        w = torch.ones(3, 2, 3, 3, dtype=torch.float16, device=device)
        out = torch.nn.functional.conv2d(x, w, padding=1, stride=2)
    except (RuntimeError, NotImplementedError):
        return False
    return out.dtype == torch.float16 and out[0, 0, 1, 1].item() == 18.0


def _needs_float16_conv(device: str) -> None:
    if not float16_conv_works(device):
        pytest.skip(f"this torch build has no float16 conv2d on {device}")


def _pixels(device: str) -> torch.Tensor:
    return torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(0)).to(device)


def test_the_probe_runs_here():
    # This machine's torch (2.x CPU wheels) has float16 conv2d: the cases below must run, not skip.
    assert float16_conv_works("cpu")


@pytest.mark.parametrize("source", ["ours", "transformers"])
def test_float16_patched_model_follows_tolerance_idiom(source, device):
    _needs_float16_conv(device)
    if source == "ours":
        torch.manual_seed(0)
        model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(CONFIG))
        randomize_(model)
    else:
        model = build_hf_model(CONFIG, "eager")
    model = model.eval().to(device)
    pixels = _pixels(device)
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(pixels.double()).logits
        plain = copy.deepcopy(model).half()(pixels.half()).logits  # plain torch in float16
        patched = vf.patch(copy.deepcopy(model).half(), "triton")
        out = patched(pixels.half()).logits
    assert out.dtype == torch.float16
    assert_close_to_reference(out, plain, exact, torch.float16, what=f"float16 patched logits ({source})")
