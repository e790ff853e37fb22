"""Derived weights (standardized conv weights, the fused QKV) are never served stale.

Every documented way of changing weights, on the reference path (eager, sdpa) and the patched Triton
path (interpreter on the CPU): after the change, the model's logits equal those of a model freshly
built with the new weights. The triton path is compared with a fresh reference model at the patching
tolerance (patched ≡ reference is proven in test_patching.py); a stale weight moves logits by ~0.1–1.
Under the interpreter a weight_standardize launch costs one slow program per output channel, so the
triton path takes the changes one after another on one narrow model instead of one test per change.

With `vf.freeze(model)` derived weights are held: the changes freeze can detect (version counter,
Parameter object, address, dtype, device, layout) are still honoured; `.data` edits are documented as
not detected until `vf.unfreeze(model)`.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import randomize_, tiny_config
from vithybrid_fast import fast
from vithybrid_fast.weight_cache import cached_bytes, is_frozen

# head size 32 (the flash kernel's smallest); a narrow one-block-per-stage BiT: 216 conv output channels
CONFIG = tiny_config(
    hidden_size=64, num_attention_heads=2, intermediate_size=80, num_hidden_layers=1,
    backbone_featmap_shape=[1, 32, 5, 5], backbone_config={"hidden_sizes": [16, 32, 32], "embedding_size": 8,
                                                           "depths": [1, 1, 1]},
)  # fmt: skip
EXACT = 1e-6  # the same path with the same weights: identical up to summation order
PATCHED_TOL = 1e-4  # patched vs reference (test_patching's FP32_TOL)
STALE = 1e-2  # every change below moves the logits by more than this


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton path runs (natively or interpreted)


def build(seed: int) -> vf.ViTHybridForImageClassification:
    torch.manual_seed(seed)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(CONFIG)).eval()
    randomize_(model)
    return model.to(DEVICE)


@pytest.fixture(scope="module")
def old_model():
    return build(0)


@pytest.fixture(scope="module")
def new_state():
    return {k: v.clone() for k, v in build(1).state_dict().items()}


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def on_path(model: torch.nn.Module, path: str) -> torch.nn.Module:
    if path == "triton":
        return vf.patch(model, "triton")
    model.set_attn_implementation(path)
    return model


def logits(model: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixels).logits


def fresh_logits(model: torch.nn.Module, path: str, pixels: torch.Tensor, replace: dict | None = None) -> torch.Tensor:
    """Logits of a newly built reference model holding `model`'s current weights, those named in `replace`
    taking its values instead."""
    state = {k: v.detach().clone().float() for k, v in {**model.state_dict(), **(replace or {})}.items()}
    fresh = build(2)
    fresh.load_state_dict(state)
    fresh.set_attn_implementation("sdpa" if path == "triton" else path)
    return logits(fresh, pixels)


def assert_fresh(model, path, pixels, before, what):
    got, want = logits(model, pixels).float(), fresh_logits(model, path, pixels)
    tol = PATCHED_TOL if path == "triton" else EXACT
    diff = (got - want).abs().max().item()
    assert diff <= tol, f"{what} on {path}: logits differ from a fresh model by {diff:.3e} (stale weights)"
    moved = (want - before).abs().max().item()
    assert moved > STALE, f"{what}: the change moved logits only {moved:.3e}; the test would not see staleness"
    return got


# Each takes (model, new_state) and changes every weight of `model` to new_state's values (or, for the
# optimizer and EMA, to something new), by one documented route.
def data_edit_in_place(model, new):
    for name, param in model.named_parameters():
        param.data.copy_(new[name])  # .data: no version bump


def data_assign_twice(model, new):
    for name, param in model.named_parameters():
        param.data = -new[name].clone()  # the second assignment may reuse the first one's freed address
        param.data = new[name].clone()


def load_state_dict_copy(model, new):
    model.load_state_dict(new)


def load_state_dict_assign(model, new):
    model.load_state_dict({k: v.clone() for k, v in new.items()}, assign=True)


def copy_under_no_grad(model, new):
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(new[name])


def optimizer_step(model, new):
    model.train()
    for name, param in model.named_parameters():
        param.grad = (param.detach() - new[name]) * 2.0
    torch.optim.SGD(model.parameters(), lr=0.5).step()  # p − 0.5·2(p − new): new, up to rounding
    model.eval()


def to_and_back(model, new):
    model.to(torch.float64)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(new[name])
    model.to(torch.float32)  # new storage, possibly at the old float32 weights' freed address


def ema_update(model, new):
    # timm's ModelEmaV3 / torch.optim.swa_utils: lerp over the state dict's tensors, in place
    with torch.no_grad():
        ema = list(model.state_dict().values())
        torch._foreach_lerp_(ema, [new[k] for k in model.state_dict()], 0.75)


def foreach_lerp_bumps_versions(device: str) -> bool:
    """Whether in-place `torch._foreach_lerp_` advances version counters on `device`.

    On the CPU it does (the per-tensor fallback). On CUDA, torch 2.11 (H100, 2026-11-26) it does not,
    while `_foreach_add_`/`mul_`/`sub_`/`copy_` do: a frozen model cannot see such an EMA update."""
    weight = torch.zeros(2, device=device)
    with torch.no_grad():
        torch._foreach_lerp_([weight], [torch.ones(2, device=device)], 0.5)
    return weight._version > 0


CHANGES = [data_edit_in_place, data_assign_twice, load_state_dict_copy, load_state_dict_assign,
           copy_under_no_grad, optimizer_step, to_and_back, ema_update]  # fmt: skip
DETECTED_WHILE_FROZEN = [load_state_dict_copy, load_state_dict_assign, copy_under_no_grad, optimizer_step,
                         to_and_back] + [ema_update] * foreach_lerp_bumps_versions(DEVICE)  # fmt: skip


@pytest.mark.parametrize("path", ["eager", "sdpa"])
@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__)
def test_no_stale_weights_by_default(old_model, new_state, pixels, path, change):
    model = on_path(copy.deepcopy(old_model), path)
    before = logits(model, pixels)  # a caching implementation would hold derived weights now
    change(model, new_state)
    assert_fresh(model, path, pixels, before, change.__name__)


@pytest.mark.parametrize("change", DETECTED_WHILE_FROZEN, ids=lambda f: f.__name__)
def test_frozen_model_follows_every_detectable_change(old_model, new_state, pixels, change):
    model = vf.freeze(on_path(copy.deepcopy(old_model), "sdpa"))
    before = logits(model, pixels)
    assert cached_bytes(model) > 0
    change(model, new_state)
    assert_fresh(model, "sdpa", pixels, before, f"frozen, {change.__name__}")


@pytest.mark.parametrize("frozen", [False, True], ids=["default", "frozen"])
def test_patched_triton_model_follows_every_change(old_model, new_state, pixels, frozen):
    """The changes in turn, alternating between two weight sets, each checked against a fresh model."""
    model = on_path(copy.deepcopy(old_model), "triton")
    if frozen:
        vf.freeze(model)
    targets = (new_state, {k: v.clone() for k, v in old_model.state_dict().items()})
    before = logits(model, pixels)
    for step, change in enumerate(DETECTED_WHILE_FROZEN if frozen else CHANGES):
        change(model, targets[step % 2])
        before = assert_fresh(model, "triton", pixels, before, f"{'frozen, ' * frozen}{change.__name__}")
        assert not frozen or cached_bytes(model) > 0


def derived_weight_modules(model):
    return [m for m in model.modules() if hasattr(m, "standardized_weight") or hasattr(m, "fused_qkv")]


def derived(module):
    return module.standardized_weight() if hasattr(module, "standardized_weight") else module.fused_qkv()[0]


@pytest.mark.parametrize("path", ["sdpa", "triton"])
def test_derived_weights_recomputed_unless_frozen(old_model, path):
    model = on_path(copy.deepcopy(old_model), path)
    modules = derived_weight_modules(model)
    kinds = {type(m) for m in modules}
    assert kinds == ({fast.FastWeightStandardizedConv2d, fast.FastSelfAttention} if path == "triton"
                     else {vf.backbone.WeightStandardizedConv2d})  # fmt: skip
    if path == "triton":  # one module of each kind: the interpreter is slow
        modules = [next(m for m in modules if isinstance(m, kind)) for kind in kinds]
    with torch.no_grad():
        assert all(derived(m) is not derived(m) for m in modules)  # default: a new tensor every call
        assert cached_bytes(model) == 0 and not is_frozen(model)
        vf.freeze(model)
        assert is_frozen(model)
        assert all(derived(m) is derived(m) for m in modules)  # frozen: computed once, then served
    with torch.enable_grad():  # a weight gradient is wanted: computed under autograd even when frozen
        assert all(derived(m).grad_fn is not None for m in modules)
    vf.unfreeze(model)
    assert cached_bytes(model) == 0 and not is_frozen(model)
    with torch.no_grad():
        assert all(derived(m) is not derived(m) for m in modules)


@pytest.mark.parametrize("path", ["sdpa", "triton"])
def test_frozen_memory_cost_is_the_derived_weights(old_model, pixels, path):
    model = vf.freeze(on_path(copy.deepcopy(old_model), path))
    logits(model, pixels)
    convs = [m for m in model.modules() if hasattr(m, "standardized_weight")]
    expected = sum(m.weight.numel() * m.weight.element_size() for m in convs)
    if path == "triton":  # plus the fused QKV weight and bias of every layer
        attention = [m for m in model.modules() if isinstance(m, fast.FastSelfAttention)]
        expected += sum(sum(p.numel() * p.element_size() for p in m.parameters()) for m in attention)
    assert cached_bytes(model) == expected


def test_data_edits_while_frozen_need_unfreeze(old_model, new_state, pixels):
    """The documented limit: `.data` writes bypass the version counter, so a frozen model cannot see them."""
    model = vf.freeze(on_path(copy.deepcopy(old_model), "sdpa"))
    before = logits(model, pixels)
    for name, param in model.named_parameters():
        if "convolution" in name or ".conv" in name:  # the sources of derived (standardized) weights
            param.data.copy_(new_state[name])
    torch.testing.assert_close(logits(model, pixels), before, rtol=0, atol=0)  # still the frozen weights
    vf.unfreeze(model)
    assert_fresh(model, "sdpa", pixels, before, "after unfreeze")
    vf.freeze(model)  # freezing again takes the current weights
    assert_fresh(model, "sdpa", pixels, before, "frozen again")


def derived_weight_sources(model: torch.nn.Module) -> list[str]:
    """Names of the parameters a frozen reference (sdpa) model derives cached weights from."""
    return [f"{name}.weight" for name, m in model.named_modules() if hasattr(m, "standardized_weight")]


def assert_frozen_keeps_only_the_derived_weights(model, frozen_state, pixels, what):
    """After writes the version counters missed, a frozen model computes with its derived (standardized conv)
    weights from `frozen_state` and every other weight as it is now: the derived ones are stale, the rest
    live. Anything else would be a half-frozen model no one could reason about."""
    derived_then = {name: frozen_state[name] for name in derived_weight_sources(model)}
    got, want = logits(model, pixels).float(), fresh_logits(model, "sdpa", pixels, replace=derived_then)
    diff = (got - want).abs().max().item()
    assert diff <= EXACT, f"{what}: frozen logits differ by {diff:.3e} from stale-derived, live-other weights"
    stale = (got - fresh_logits(model, "sdpa", pixels)).abs().max().item()
    assert stale > STALE, f"{what}: the derived weights moved only {stale:.3e}; the test would not see them stale"


def lerp_without_version_bumps(model, new):
    # what `torch._foreach_lerp_` does to CUDA tensors (torch 2.11, H100 and H200): the values move, the
    # version counters stay; `.data` reproduces that on any device
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.data.lerp_(new[name], 0.75)


def test_an_ema_update_while_frozen_is_followed_where_it_bumps_versions(old_model, new_state, pixels):
    """timm's ModelEmaV3 and torch.optim.swa_utils' EMA update in place with `torch._foreach_lerp_`.
    Where that advances version counters (CPU) a frozen model follows it; where it does not (CUDA) the
    derived weights stay those of the freeze until `unfreeze`, the documented remedy for writes the counter
    does not see; the weights used as they are (linear, norms) follow at once either way."""
    model = vf.freeze(on_path(copy.deepcopy(old_model), "sdpa"))
    frozen_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = logits(model, pixels)
    ema_update(model, new_state)
    if foreach_lerp_bumps_versions(DEVICE):
        assert_fresh(model, "sdpa", pixels, before, "frozen, ema_update")
        return
    assert_frozen_keeps_only_the_derived_weights(model, frozen_state, pixels, "frozen, ema_update")
    vf.unfreeze(model)
    assert_fresh(model, "sdpa", pixels, before, "ema_update, then unfreeze")


def test_an_update_the_counters_miss_leaves_a_frozen_model_stale_only_in_its_derived_weights(
    old_model, new_state, pixels
):
    """The CUDA EMA case, on every device: the H200 run found the frozen model's logits moved after such an
    EMA (its live weights moved), where the old test expected them unchanged."""
    model = vf.freeze(on_path(copy.deepcopy(old_model), "sdpa"))
    frozen_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    before = logits(model, pixels)
    lerp_without_version_bumps(model, new_state)
    assert_frozen_keeps_only_the_derived_weights(model, frozen_state, pixels, "frozen, unseen lerp")
    vf.unfreeze(model)
    assert_fresh(model, "sdpa", pixels, before, "unseen lerp, then unfreeze")


def test_foreach_lerp_bumps_versions_on_the_cpu():
    # the probe above decides what the frozen tests expect: it must see a bump where there is one
    assert foreach_lerp_bumps_versions("cpu")


def test_patch_and_unpatch_keep_a_model_frozen(old_model, new_state, pixels):
    model = vf.freeze(copy.deepcopy(old_model))
    before = logits(model, pixels)
    vf.patch(model, "triton")
    assert is_frozen(model)
    attention = model.vit.encoder.layer[0].attention.attention
    with torch.no_grad():
        assert attention.fused_qkv()[0] is attention.fused_qkv()[0]
    vf.unpatch(model)
    assert is_frozen(model)
    load_state_dict_assign(model, new_state)
    assert_fresh(model, "sdpa", pixels, before, "unpatched frozen model, assign=True")


def test_copies_of_a_frozen_model_do_not_share_its_caches(old_model, new_state, pixels):
    model = vf.freeze(copy.deepcopy(old_model))
    before = logits(model, pixels)
    for duplicate in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert is_frozen(duplicate)
        copy_under_no_grad(duplicate, new_state)
        assert_fresh(duplicate, "sdpa", pixels, before, "copy of a frozen model")
    torch.testing.assert_close(logits(model, pixels), before, rtol=0, atol=0)


def test_load_frozen(tmp_path, old_model, pixels):
    old_model.save_pretrained(tmp_path)
    frozen = vf.load(tmp_path, kernels="sdpa", frozen=True, device=DEVICE)  # beside `pixels`
    plain = vf.load(tmp_path, kernels="sdpa", device=DEVICE)
    assert is_frozen(frozen) and not is_frozen(plain)
    torch.testing.assert_close(logits(frozen, pixels), logits(plain, pixels), rtol=0, atol=0)
    assert cached_bytes(frozen) > 0 and cached_bytes(plain) == 0


def test_freezing_state_set_while_patched_survives_unpatch(old_model):
    model = vf.patch(copy.deepcopy(old_model), "triton")
    vf.freeze(model)
    vf.unpatch(model)
    conv = model.vit.embeddings.patch_embeddings.backbone.bit.embedder.convolution
    with torch.no_grad():
        assert is_frozen(model) and conv.standardized_weight() is conv.standardized_weight()
    vf.patch(model, "triton")
    vf.unfreeze(model)
    vf.unpatch(model)
    with torch.no_grad():
        assert not is_frozen(model) and conv.standardized_weight() is not conv.standardized_weight()


@pytest.mark.parametrize("change", [load_state_dict_copy, copy_under_no_grad, ema_update], ids=lambda f: f.__name__)
def test_frozen_model_of_inference_tensors_is_never_stale(tmp_path, old_model, new_state, pixels, change):
    """Loaded under inference_mode, the parameters are inference tensors: no version counter, and inside
    inference mode they take in-place changes without a trace. A frozen cache held the derived weights
    it had and served them stale (logits off by ~0.4); it must derive them afresh, and say why."""
    old_model.save_pretrained(tmp_path)
    with torch.inference_mode(), pytest.warns(vf.weight_cache.InferenceTensorWarning, match="inference tensors"):
        model = vf.load(tmp_path, kernels="sdpa", frozen=True, device=DEVICE)
        assert next(model.parameters()).is_inference()
        before = logits(model, pixels)
        change(model, new_state)
        assert_fresh(model, "sdpa", pixels, before, f"inference tensors, frozen, {change.__name__}")
    assert cached_bytes(model) == 0  # nothing held that could go stale
