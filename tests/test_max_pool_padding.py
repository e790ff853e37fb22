"""The stem's max-pool skips its SAME-padded copy when a ReLU feeds it (backbone.BitMaxPool2d).

On values ≥ 0 a zero pad never wins a max, so max_pool2d's implicit padding (+ ceil_mode) gives the
padded pool's values exactly; the padded copy of the stem output was the largest pad in the H100 profile.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.hf_reference import tiny_config
from vithybrid_fast import ViTHybridConfig, ViTHybridForImageClassification
from vithybrid_fast.backbone import BitMaxPool2d

SIZES = [(192, 192), (193, 193), (192, 193), (8, 7), (1, 1), (2, 2), (3, 3), (4, 5)]


def padded_pool(x: torch.Tensor) -> torch.Tensor:
    pool = BitMaxPool2d(3, 2)  # the default: pads explicitly, as transformers does
    assert not pool.nonnegative_input
    return pool(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_pad_free_pool_equals_the_padded_one_on_relu_output(size, dtype):
    torch.manual_seed(0)
    x = torch.relu(torch.randn(2, 3, *size)).to(dtype)  # about half exact zeros, as after a ReLU
    pool = BitMaxPool2d(3, 2)
    pool.nonnegative_input = True
    calls = []
    pool.pad.register_forward_hook(lambda *_: calls.append(1))
    for layout in (torch.contiguous_format, torch.channels_last):
        got = pool(x.contiguous(memory_format=layout))
        want = padded_pool(x)
        assert got.shape == want.shape and torch.equal(got, want), (size, layout)
    assert calls == []  # no padded copy was made


def test_negative_values_are_why_the_shortcut_needs_a_relu():
    x = -torch.rand(1, 1, 4, 4) - 0.5  # all negative: the explicit zero pad wins on the right edge
    pool = BitMaxPool2d(3, 2)
    pool.nonnegative_input = True
    assert not torch.equal(pool(x), padded_pool(x))  # so only a ReLU'd input may take it


@pytest.mark.parametrize(
    ("changes", "expected"),
    [({}, True), ({"hidden_act": "gelu"}, False), ({"layer_type": "preactivation"}, False)],
    ids=["relu", "gelu", "preactivation"],
)
def test_the_stem_takes_the_shortcut_only_after_a_relu(changes, expected):
    config = tiny_config()
    config["backbone_config"] = {**config["backbone_config"], **changes}
    model = ViTHybridForImageClassification(ViTHybridConfig.from_dict(config))
    pooler = model.vit.embeddings.patch_embeddings.backbone.bit.embedder.pooler
    assert isinstance(pooler, BitMaxPool2d) and pooler.nonnegative_input is expected
    assert isinstance(pooler.pad, nn.Module)


def test_a_patched_transformers_stem_pools_without_the_copy_and_unpatches(monkeypatch, device):
    pytest.importorskip("transformers")  # the peer whose model is patched
    import vithybrid_fast as vf
    from tests.hf_reference import build_hf_model
    from vithybrid_fast.fast import FastBitEmbeddings

    model = build_hf_model(tiny_config())
    stem = model.vit.embeddings.patch_embeddings.backbone.bit.embedder
    fast = FastBitEmbeddings(stem)  # transformers' own norm: the pool change alone
    # transformers' DynamicPad2d overrides __call__ (no hooks fire): count the pads of stem-output width
    padded, real_pad = [], torch.nn.functional.pad

    def counting_pad(x, *args, **kwargs):
        padded.append(x.shape[1])
        return real_pad(x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "pad", counting_pad)
    channels = model.config.backbone_config.embedding_size
    for size in (72, 70):  # a 36² (even) and a 35² (odd) stem output
        pixels = torch.randn(2, 3, size, size)
        with torch.no_grad():
            padded.clear()
            want = stem(pixels)
            assert channels in padded  # transformers' stem pads its output before the pool
            padded.clear()
            got = fast(pixels)
        assert fast.pad_free_pool and channels not in padded and torch.equal(got, want), (size, padded)
    assert fast.pooler is stem.pooler  # transformers' module, read and never changed

    # on the device where Triton runs: natively on a GPU (a CPU model there is refused, as the H200 run of
    # 2026-11-26 found), interpreted on the CPU
    vf.patch(model.to(device), {"backbone": "triton"})
    patched = model.vit.embeddings.patch_embeddings.backbone.bit.embedder
    assert isinstance(patched, FastBitEmbeddings) and patched.pad_free_pool  # its norm: group_norm_act + ReLU
    vf.unpatch(model)
    assert model.vit.embeddings.patch_embeddings.backbone.bit.embedder is stem
