"""Which class serves every module after patch, and after unpatch (issue 14, blind spot 6).

Patching could leave the convs and GroupNorms inside bottleneck blocks on the reference code — the
outputs would be identical, only slower — so output parity cannot catch it. These tests walk the
whole module tree of our models and of transformers 4.47.1 instances: after `patch(..., "triton")`
every module of a registered reference class (at every depth: the stem, each bottleneck's convs and
norms, its downsample, each ViT layer and its self-attention) is served by its fast class and no
reference instance is left; every other module is the very object it was. A forward pass then runs
none of the reference math (GroupNorm, weight standardization, LayerNorm inside layers, softmax
attention), and after `unpatch` the original objects are back and the reference math runs again.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from transformers.models.bit import modeling_bit as hf_bit
from transformers.models.deprecated.vit_hybrid import modeling_vit_hybrid as hf

import vithybrid_fast as vf
from tests.hf_reference import build_hf_model, randomize_, tiny_config
from vithybrid_fast import backbone as ours_bit
from vithybrid_fast import fast
from vithybrid_fast import modeling as ours

# reference class → the fast class that must serve it after patch(model, "triton")
FAST_CLASS = {
    ours_bit.WeightStandardizedConv2d: fast.FastWeightStandardizedConv2d,
    ours_bit.BitGroupNormActivation: fast.FastGroupNormActivation,
    ours_bit.BitBottleneckLayer: fast.FastBottleneckLayer,
    ours.ViTHybridLayer: fast.FastViTLayer,
    ours.ViTHybridSelfAttention: fast.FastSelfAttention,
    hf_bit.WeightStandardizedConv2d: fast.FastWeightStandardizedConv2d,
    hf_bit.BitGroupNormActivation: fast.FastGroupNormActivation,
    hf_bit.BitBottleneckLayer: fast.FastBottleneckLayer,
    hf_bit.BitEmbeddings: fast.FastBitEmbeddings,  # transformers' stem only: ours pools without the copy itself
    hf.ViTHybridLayer: fast.FastViTLayer,
    hf.ViTHybridSelfAttention: fast.FastSelfAttention,
    hf.ViTHybridSdpaSelfAttention: fast.FastSelfAttention,
}
BACKBONE_CLASSES = {
    ours_bit.WeightStandardizedConv2d, ours_bit.BitGroupNormActivation, ours_bit.BitBottleneckLayer,
    hf_bit.WeightStandardizedConv2d, hf_bit.BitGroupNormActivation, hf_bit.BitBottleneckLayer, hf_bit.BitEmbeddings,
}  # fmt: skip

# head size 32 (the flash kernel's smallest); the odd sizes of tiny_config otherwise
CONFIG = tiny_config(hidden_size=64, num_attention_heads=2)
PREACT_CONFIG = tiny_config(
    hidden_size=64, num_attention_heads=2, image_size=64, backbone_featmap_shape=[1, 96, 4, 4],
    backbone_config={"layer_type": "preactivation", "global_padding": None, "embedding_dynamic_padding": False},
)  # fmt: skip


def _ours(config: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(config))
    randomize_(model)
    return model.eval()


MODELS = {
    "ours-bottleneck": lambda: _ours(CONFIG),
    "ours-preactivation": lambda: _ours(PREACT_CONFIG),
    "transformers-eager": lambda: build_hf_model(CONFIG, "eager"),
    "transformers-sdpa": lambda: build_hf_model(CONFIG, "sdpa"),
}


def _tree(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return dict(model.named_modules(remove_duplicate=False))


def _pixels(model: torch.nn.Module, device: str) -> torch.Tensor:
    size = model.config.image_size
    size = size if isinstance(size, int) else size[0]
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("name", list(MODELS))
def test_every_registered_module_is_served_by_its_fast_class(name, device):
    model = MODELS[name]().to(device)
    before = _tree(model)
    vf.patch(model, "triton")
    after = _tree(model)
    assert set(before) <= set(after), f"modules vanished: {sorted(set(before) - set(after))[:5]}"
    for path, original in before.items():
        want = FAST_CLASS.get(type(original))
        if want is None:  # not registered: the very same object stays, at the same place
            assert after[path] is original, f"{path}: {type(original).__name__} was replaced"
        else:
            assert type(after[path]) is want, f"{path}: {type(after[path]).__name__}, want {want.__name__}"
    leftovers = [path for path, module in after.items() if type(module) in FAST_CLASS]
    assert not leftovers, f"reference modules left in the patched tree: {leftovers}"

    # spelled out for the bottleneck blocks, the case the issue names: every conv and norm inside
    blocks = [m for m in after.values() if type(m).__name__.endswith("BottleneckLayer")]
    assert blocks
    for block in blocks:  # conv1..3, norm1..3 and the downsample's conv and norm
        convs = [m for m in block.modules() if type(m).__name__.endswith("Conv2d")]
        norms = [m for m in block.modules() if type(m).__name__.endswith("GroupNormActivation")]
        assert convs and all(type(m) is fast.FastWeightStandardizedConv2d for m in convs), [type(m) for m in convs]
        assert norms and all(type(m) is fast.FastGroupNormActivation for m in norms), [type(m) for m in norms]


@pytest.mark.parametrize("name", ["ours-bottleneck", "transformers-eager"])
def test_backbone_family_alone_swaps_only_the_backbone(name, device):
    model = MODELS[name]().to(device)
    before = _tree(model)
    vf.patch(model, {"backbone": "triton"})
    after = _tree(model)
    for path, original in before.items():
        if type(original) in BACKBONE_CLASSES:
            assert type(after[path]) is FAST_CLASS[type(original)], path
        else:
            assert after[path] is original, f"{path}: {type(original).__name__} was replaced"


class _ReferenceMathSpy:
    """Counts calls of the functions only the reference modules use."""

    NAMES = ("group_norm", "batch_norm", "layer_norm", "softmax", "scaled_dot_product_attention")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for fn_name in self.NAMES:
            monkeypatch.setattr(F, fn_name, self._counting(fn_name, getattr(F, fn_name)))

    def _counting(self, fn_name, fn):
        def counted(*args, **kwargs):
            self.calls[fn_name] += 1
            return fn(*args, **kwargs)

        return counted

    def run(self, model: torch.nn.Module, pixels: torch.Tensor) -> tuple[Counter, torch.Tensor]:
        self.calls.clear()
        # with autograd on, no derived-weight cache may serve: every conv standardizes its weight
        logits = model(pixels).logits.detach()
        return Counter(self.calls), logits


@pytest.mark.parametrize("name", list(MODELS))
def test_no_reference_math_runs_when_patched_and_all_of_it_after_unpatch(name, device, monkeypatch):
    model = MODELS[name]().to(device)
    pixels = _pixels(model, device)
    before = _tree(model)
    spy = _ReferenceMathSpy(monkeypatch)
    reference_calls, reference_logits = spy.run(model, pixels)
    norms = sum(type(m) in BACKBONE_CLASSES and "GroupNorm" in type(m).__name__ for m in before.values())
    convs = sum(type(m) in BACKBONE_CLASSES and "Conv" in type(m).__name__ for m in before.values())
    assert reference_calls["group_norm"] >= norms - 1 > 0  # (a pre-activation BitModel's final norm never runs)
    assert reference_calls["batch_norm"] == convs > 0

    vf.patch(model, "triton")
    patched_calls, patched_logits = spy.run(model, pixels)
    # only the final vit.layernorm is left to torch; nothing else of the reference math runs
    assert patched_calls == Counter({"layer_norm": 1}), patched_calls
    assert (patched_logits - reference_logits).abs().max().item() <= 1e-4

    vf.unpatch(model)
    restored = _tree(model)
    assert restored.keys() == before.keys()
    assert all(restored[path] is module for path, module in before.items()), "unpatch did not restore the objects"
    assert spy.run(model, pixels)[0] == reference_calls


def test_patching_a_copy_leaves_the_original_tree_alone(device):
    model = MODELS["transformers-eager"]().to(device)
    before = _tree(model)
    patched = vf.patch(copy.deepcopy(model), "triton")
    assert any(isinstance(m, fast.FastBottleneckLayer) for m in patched.modules())
    assert all(_tree(model)[path] is module for path, module in before.items())
