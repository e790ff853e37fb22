"""patch()/unpatch(): every swap proven on our tiny model and on a transformers model instance.

Kernels run under TRITON_INTERPRET=1 on the CPU (tests/conftest.py) and natively on a GPU.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import TINY_CASES, build_hf_model, randomize_, tiny_config
from tests.test_low_precision_patching import float16_conv_works
from tests.tolerance import assert_close_to_reference
from vithybrid_fast import fast
from vithybrid_fast.patching import patched_modules, resolve_kernels

FP32_TOL = 1e-4
# head size 32 (the flash kernel takes 32/64/128); otherwise the odd sizes of tiny_config
PATCH_CONFIG = tiny_config(hidden_size=64, num_attention_heads=2, intermediate_size=80)


def build_tiny_model() -> vf.ViTHybridForImageClassification:
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(PATCH_CONFIG))
    randomize_(model)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_model():
    return build_tiny_model()


def pixels_for(model, batch=2, seed=0, device="cpu"):
    height, width = model.config.image_size_hw if hasattr(model.config, "image_size_hw") else (72, 72)
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)).to(device)


def module_tree(model):
    return [(name, id(module), type(module)) for name, module in model.named_modules()]


def run(model, pixels, **kwargs):
    with torch.no_grad():
        return model(pixels, output_hidden_states=True, **kwargs)


def assert_same_outputs(a, b, tol, what):
    diff = (a.logits - b.logits).abs().max().item()
    assert diff <= tol, f"{what}: logits differ by {diff:.3e}"
    for i, (x, y) in enumerate(zip(a.hidden_states, b.hidden_states)):
        diff = (x - y).abs().max().item()
        assert diff <= tol, f"{what}: hidden state {i} differs by {diff:.3e}"


def test_triton_patch_swaps_every_family_and_keeps_state_dict(tiny_model, device):
    model = copy.deepcopy(tiny_model).to(device)
    pixels = pixels_for(model, device=device)
    before_state = {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()}
    reference = run(model, pixels)

    vf.patch(model, "triton")
    kinds = {kind for _, kind in patched_modules(model)}
    assert kinds == {"FastSelfAttention", "FastViTLayer", "FastWeightStandardizedConv2d",
                     "FastGroupNormActivation", "FastBottleneckLayer"}  # fmt: skip
    assert {k: (v.data_ptr(), v.shape) for k, v in model.state_dict().items()} == before_state
    assert isinstance(model.vit.encoder.layer[0], fast.FastViTLayer)
    assert isinstance(model.vit.encoder.layer[0].attention.attention, fast.FastSelfAttention)
    assert_same_outputs(run(model, pixels), reference, FP32_TOL, "patched vs reference")


def test_patch_twice_then_unpatch_restores_exact_modules(tiny_model, device):
    model = copy.deepcopy(tiny_model).to(device)
    pixels = pixels_for(model, device=device)
    tree = module_tree(model)
    reference = run(model, pixels)
    vf.patch(model, "triton")
    once = module_tree(model)
    once_out = run(model, pixels)
    vf.patch(model, "triton")
    assert [(n, t) for n, _, t in module_tree(model)] == [(n, t) for n, _, t in once]
    assert torch.equal(run(model, pixels).logits, once_out.logits)
    vf.unpatch(model)
    assert module_tree(model) == tree
    assert torch.equal(run(model, pixels).logits, reference.logits)
    assert patched_modules(model) == []


def test_unpatch_of_a_part_of_a_patched_model_says_which_model_to_unpatch(tiny_model):
    """The second audit: vf.unpatch(m.vit) after vf.patch(m, "triton") returned quietly, every fast
    module still in place (the patch's record lives on m)."""
    model = copy.deepcopy(tiny_model)
    vf.patch(model, "triton")
    patched = patched_modules(model)
    with pytest.raises(ValueError, match=r"unpatch: this ViTHybridModel holds patched modules .* unpatch the model"):
        vf.unpatch(model.vit)
    assert patched_modules(model) == patched  # nothing half undone
    vf.unpatch(model)
    assert patched_modules(model) == []
    vf.unpatch(model.vit)  # nothing patched there any more: a no-op, as unpatch of an unpatched model is
    part = copy.deepcopy(tiny_model)
    vf.patch(part.vit, "triton")  # patched where it is unpatched: fine
    vf.unpatch(part.vit)
    assert patched_modules(part) == []


def test_a_module_the_user_put_in_after_patch_is_neither_listed_nor_undone(tiny_model):
    model = copy.deepcopy(tiny_model)
    vf.patch(model, "triton")
    before = patched_modules(model)
    users_layer = copy.deepcopy(tiny_model.vit.encoder.layer[0])
    model.vit.encoder.layer[0] = users_layer  # the fast layer and the attention inside it leave the model
    after = patched_modules(model)
    gone = {"vit.encoder.layer.0", "vit.encoder.layer.0.attention.attention"}
    assert gone <= {name for name, _ in before}
    assert after == [(name, kind) for name, kind in before if name not in gone]
    vf.unpatch(model)
    assert patched_modules(model) == []
    assert model.vit.encoder.layer[0] is users_layer, "unpatch must not put the old layer back over the user's"
    assert type(model.vit.encoder.layer[1]) is type(users_layer)


@pytest.mark.parametrize(
    ("kernels", "expected"),
    [
        ({"attention": "triton"}, {"FastSelfAttention"}),
        ({"mlp": "triton"}, {"FastViTLayer"}),
        ({"backbone": "triton"}, {"FastWeightStandardizedConv2d", "FastGroupNormActivation", "FastBottleneckLayer"}),
    ],
)
def test_single_family(tiny_model, device, kernels, expected):
    model = copy.deepcopy(tiny_model).to(device)
    pixels = pixels_for(model, device=device)
    reference = run(model, pixels)
    vf.patch(model, kernels)
    assert {kind for _, kind in patched_modules(model)} == expected
    assert_same_outputs(run(model, pixels), reference, FP32_TOL, str(kernels))


def test_output_attentions_and_head_mask_on_patched_model(tiny_model, device):
    model = copy.deepcopy(tiny_model).to(device)
    pixels = pixels_for(model, batch=1, device=device)
    head_mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]], device=device)
    model.set_attn_implementation("eager")
    reference = run(model, pixels, output_attentions=True, head_mask=head_mask)
    vf.patch(model, "triton")
    patched = run(model, pixels, output_attentions=True, head_mask=head_mask)
    assert len(patched.attentions) == 2
    for a, b in zip(patched.attentions, reference.attentions):
        assert a.shape == (1, 2, 26, 26) and (a - b).abs().max().item() <= FP32_TOL
    assert_same_outputs(patched, reference, FP32_TOL, "head_mask")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_patched_model_low_precision_follows_tolerance_idiom(tiny_model, device, dtype):
    if dtype == torch.float16 and not float16_conv_works(device):
        pytest.skip(f"this torch build has no float16 conv2d on {device}")
    pixels = pixels_for(tiny_model, device=device)
    exact = run(copy.deepcopy(tiny_model).to(device).double(), pixels.double()).logits
    plain = copy.deepcopy(tiny_model).to(device=device, dtype=dtype)
    plain_out = run(plain, pixels.to(dtype)).logits
    patched = vf.patch(copy.deepcopy(tiny_model).to(device=device, dtype=dtype), "triton")
    patched_out = run(patched, pixels.to(dtype)).logits
    assert_close_to_reference(patched_out, plain_out, exact, dtype, what="patched logits")


def test_patched_model_trains_like_the_reference(tiny_model, device):
    model = copy.deepcopy(tiny_model).to(device).train()
    pixels, labels = pixels_for(model, device=device), torch.tensor([1, 4], device=device)
    model(pixels, labels=labels).loss.backward()
    reference_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    vf.patch(model, "triton")
    model(pixels, labels=labels).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient reached {name}"
        scale = reference_grads[name].abs().max().item() + 1e-6
        diff = (param.grad - reference_grads[name]).abs().max().item()
        assert diff <= 1e-3 * scale + 1e-5, f"{name}: gradient differs by {diff:.3e} (scale {scale:.3e})"


def test_standardized_weight_cache_follows_in_place_changes(tiny_model, device):
    model = vf.patch(copy.deepcopy(tiny_model).to(device), {"backbone": "triton"})
    conv = model.vit.embeddings.patch_embeddings.backbone.bit.embedder.convolution
    assert isinstance(conv, fast.FastWeightStandardizedConv2d)
    pixels = pixels_for(model, device=device)
    first = run(model, pixels).logits
    vf.freeze(model)  # held only while frozen (tests/test_weight_freshness.py covers the default)
    with torch.no_grad():  # inference: no weight gradient needed, so the cache serves
        cached = conv.standardized_weight()
        assert conv.standardized_weight() is cached  # steady state: no recomputation
        conv.weight.mul_(-1.0).add_(0.3)  # in place: same storage, new version
        assert conv.standardized_weight() is not cached
    assert conv.standardized_weight().grad_fn is not None  # with autograd: recomputed under the graph
    reference = vf.unpatch(copy.deepcopy(model))
    assert_same_outputs(run(model, pixels), run(reference, pixels), FP32_TOL, "after in-place change")
    assert not torch.allclose(run(model, pixels).logits, first)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_transformers_layer_fused_around_its_own_attention(attn, device):
    """mlp on Triton, attention left to transformers' own module (a 1-tuple from its eager path)."""
    hf_model = build_hf_model(PATCH_CONFIG, attn).to(device)
    pixels = pixels_for(hf_model, device=device)
    with torch.no_grad():
        reference = hf_model(pixels, output_hidden_states=True)
    vf.patch(hf_model, {"mlp": "triton", "attention": attn})
    assert {kind for _, kind in patched_modules(hf_model)} == {"FastViTLayer"}
    with torch.no_grad():
        assert_same_outputs(hf_model(pixels, output_hidden_states=True), reference, FP32_TOL, f"mlp-only {attn}")
        assert len(hf_model(pixels, output_attentions=True).attentions) == 2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_patch_transformers_model_instance(attn, device):
    hf_model = build_hf_model(PATCH_CONFIG, attn).to(device)
    pixels = pixels_for(hf_model, device=device)
    tree = module_tree(hf_model)
    state = {k: v.data_ptr() for k, v in hf_model.state_dict().items()}
    with torch.no_grad():
        reference = hf_model(pixels, output_hidden_states=True)
    vf.patch(hf_model, "triton")
    kinds = {kind for _, kind in patched_modules(hf_model)}
    assert {"FastSelfAttention", "FastViTLayer", "FastBottleneckLayer"} <= kinds
    assert {k: v.data_ptr() for k, v in hf_model.state_dict().items()} == state
    with torch.no_grad():
        patched = hf_model(pixels, output_hidden_states=True)
        probs = hf_model(pixels, output_attentions=True).attentions
    assert_same_outputs(patched, reference, FP32_TOL, f"transformers {attn}")
    assert probs[0].shape == (2, 2, 26, 26)
    assert torch.allclose(probs[0].sum(-1), torch.ones(2, 2, 26, device=device), atol=1e-5)
    vf.unpatch(hf_model)
    assert module_tree(hf_model) == tree


def test_transformers_pipeline_runs_a_patched_transformers_model(device):
    """pipeline("image-classification") takes a patched transformers model (README: ours it does not take)."""
    import numpy as np
    from PIL import Image
    from transformers import ViTHybridImageProcessor, pipeline

    side = PATCH_CONFIG["image_size"]
    processor = ViTHybridImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 90, 3), dtype=np.uint8))
    hf_model = build_hf_model(PATCH_CONFIG).to(device)
    classify = pipeline("image-classification", model=hf_model, image_processor=processor, device=device)
    reference = classify(image, top_k=3)
    vf.patch(hf_model, "triton")
    assert "FastViTLayer" in {kind for _, kind in patched_modules(hf_model)}
    patched = classify(image, top_k=3)
    assert [r["label"] for r in patched] == [r["label"] for r in reference]
    assert [r["score"] for r in patched] == pytest.approx([r["score"] for r in reference], abs=FP32_TOL)


def test_load_with_triton_kernels(tmp_path, device):
    build_hf_model(PATCH_CONFIG).save_pretrained(tmp_path)
    model = vf.load(tmp_path, kernels={"attention": "triton", "mlp": "triton"}, device=device)
    assert {kind for _, kind in patched_modules(model)} == {"FastSelfAttention", "FastViTLayer"}


def test_auto_picks_sdpa_without_a_gpu():
    assert resolve_kernels("auto", torch.device("cpu"))["attention"] == "sdpa"
    assert resolve_kernels("triton") == {"attention": "triton", "mlp": "triton", "backbone": "triton"}


def test_triton_without_gpu_or_interpreter_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    code = (
        "import torch, vithybrid_fast as vf\n"
        "from tests.hf_reference import tiny_config\n"
        "m = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config()))\n"
        "try:\n    vf.patch(m, 'triton')\nexcept RuntimeError as e:\n    print('ERR', e)\n"
        "print('AUTO', vf.patch(m, 'auto').config.attn_implementation)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert "ERR kernels='triton' cannot run" in out.stdout, out.stdout + out.stderr
    assert "kernels='sdpa'" in out.stdout and "AUTO sdpa" in out.stdout


def test_float64_model_cannot_take_triton(tiny_model, device):
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        vf.patch(copy.deepcopy(tiny_model).to(device).double(), "triton")


def test_unsupported_head_size_keeps_fused_qkv_with_sdpa(device):
    hf_model = build_hf_model(TINY_CASES["bottleneck-same"], "eager").to(device)  # head size 16
    pixels = pixels_for(hf_model, device=device)
    with torch.no_grad():
        reference = hf_model(pixels).logits
    with pytest.warns(UserWarning, match="not 16"):
        vf.patch(hf_model, {"attention": "triton"})
    attention = hf_model.vit.encoder.layer[0].attention.attention
    assert isinstance(attention, fast.FastSelfAttention) and not attention.use_flash_kernel
    with torch.no_grad():
        assert (hf_model(pixels).logits - reference).abs().max().item() <= FP32_TOL


def test_channels_last_backbone_end_to_end(tiny_model, device):
    """The whole backbone in channels_last: kernels keep the layout, results stay the reference's."""
    model = copy.deepcopy(tiny_model).to(device)
    pixels = pixels_for(model, device=device)
    reference = run(model, pixels)
    model = vf.patch(model.to(memory_format=torch.channels_last), {"backbone": "triton"})
    conv = model.vit.embeddings.patch_embeddings.backbone.bit.embedder.convolution
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    stage = model.vit.embeddings.patch_embeddings.backbone.bit.encoder.stages[0]
    hook = stage.register_forward_hook(lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last)))
    out = run(model, pixels.contiguous(memory_format=torch.channels_last))
    hook.remove()
    assert seen == [True]
    assert_same_outputs(out, reference, FP32_TOL, "channels_last backbone")


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_every_architecture_variant_patched(case, device):
    """Pre-activation blocks, static padding, dilation, tanh GELU, stage2 features: all swap cleanly."""
    config = copy.deepcopy(TINY_CASES[case])
    config.update(hidden_size=64, num_attention_heads=2)  # head size 32 for the flash kernel
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(config)).eval()
    randomize_(model)
    model = model.to(device)
    pixels = pixels_for(model, device=device)
    reference = run(model, pixels)
    vf.patch(model, "triton")
    assert patched_modules(model)
    assert_same_outputs(run(model, pixels), reference, FP32_TOL, case)


# -- unpatch carries what changed while patched (issue 10, item 5) ---------------------------------
def new_weights(seed=1):
    """Another random state for the PATCH_CONFIG model (every tensor differs)."""
    torch.manual_seed(seed)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(PATCH_CONFIG))
    randomize_(model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def fresh_model_logits(state, pixels):
    fresh = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(PATCH_CONFIG)).eval()
    fresh.load_state_dict(state)
    return run(fresh, pixels).logits


def test_unpatch_carries_parameters_assigned_while_patched(tiny_model, device):
    model = vf.patch(copy.deepcopy(tiny_model).to(device), "triton")  # CPU weights assigned below: CPU after
    state = new_weights()
    model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)  # new Parameter objects
    vf.unpatch(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} is not the weight assigned while patched"
    pixels = pixels_for(model)
    assert torch.equal(run(model, pixels).logits, fresh_model_logits(state, pixels))  # Δ 0


def test_unpatch_after_to_empty_carries_the_new_storage(tiny_model):
    with torch.device("meta"):
        model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(PATCH_CONFIG)).eval()
    vf.patch(model, "triton")
    model.to_empty(device="cpu")  # meta → CPU: new Parameter objects, in the patched tree only
    state = new_weights(seed=2)
    model.load_state_dict(state)
    vf.unpatch(model)
    assert all(not t.is_meta for t in (*model.parameters(), *model.buffers()))
    pixels = pixels_for(model)
    assert torch.equal(run(model, pixels).logits, fresh_model_logits(state, pixels))  # Δ 0


def test_unpatch_carries_train_mode(tiny_model, device):
    model = vf.patch(copy.deepcopy(tiny_model).to(device), "triton")
    model.train()
    vf.unpatch(model)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("source", ["ours", "transformers"])
def test_a_model_patched_in_eval_mode_stays_in_eval_mode(source, device):
    """A new nn.Module starts in training mode: fast modules put into an eval model once ran dropout at
    inference (two no-grad forwards differed) and unpatch carried training mode back to the originals."""
    overrides = {"attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1}
    if source == "ours":
        model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict({**PATCH_CONFIG, **overrides}))
    else:
        model = build_hf_model({**PATCH_CONFIG, **overrides})
    model = model.to(device).eval()
    vf.patch(model, "triton")
    assert patched_modules(model) and not [n for n, m in model.named_modules() if m.training]
    if source == "ours":  # the same fast modules in both: one interpreted pair of forwards is enough
        pixels = pixels_for(model, batch=1, device=device)
        assert torch.equal(run(model, pixels).logits, run(model, pixels).logits)  # no dropout drawn
    vf.unpatch(model)
    assert not [n for n, m in model.named_modules() if m.training]
    model.train()  # and the mode still follows the model's .train() while patched
    vf.patch(model, "triton")
    assert all(m.training for m in model.modules())


# -- a family not named keeps what it had (issue 10, item 6) ---------------------------------------
def attention_implementations(model):
    from vithybrid_fast.modeling import ViTHybridSelfAttention

    return {m.attn_implementation for m in model.modules() if isinstance(m, ViTHybridSelfAttention)}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_backbone_only_patch_keeps_our_attention(tiny_model, attn, device):
    model = copy.deepcopy(tiny_model).to(device)
    model.set_attn_implementation(attn)
    vf.patch(model, {"backbone": "triton"})
    assert attention_implementations(model) == {attn} and model.config.attn_implementation == attn
    vf.unpatch(model)
    assert attention_implementations(model) == {attn} and model.config.attn_implementation == attn


def test_unpatch_restores_our_attention_switched_by_a_preset(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.set_attn_implementation("eager")
    vf.patch(model, "sdpa")
    assert attention_implementations(model) == {"sdpa"} and model.config.attn_implementation == "sdpa"
    vf.unpatch(model)
    assert attention_implementations(model) == {"eager"} and model.config.attn_implementation == "eager"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("how", ["load", "from_pretrained"])
def test_the_attention_a_model_was_loaded_with_survives_unpatch(tmp_path, device, attn, how):
    """load(kernels="eager") and from_pretrained(attn_implementation="eager") choose the model's own reference
    attention, which unpatch keeps: a later patch/unpatch of another family used to leave it on "sdpa"."""
    build_tiny_model().save_pretrained(tmp_path)
    if how == "load":
        model = vf.load(tmp_path, kernels=attn, device=device)
    else:
        model = vf.ViTHybridForImageClassification.from_pretrained(tmp_path, attn_implementation=attn, device=device)
    pixels = pixels_for(model, device=device)
    before = run(model, pixels).logits
    vf.patch(model, {"mlp": "triton"})
    vf.unpatch(model)
    assert attention_implementations(model) == {attn} and model.config.attn_implementation == attn
    assert torch.equal(run(model, pixels).logits, before)
    vf.patch(model, "triton")
    vf.unpatch(model)
    assert attention_implementations(model) == {attn} and model.config.attn_implementation == attn


def test_families_not_named_keep_their_patches(tiny_model, device):
    model = vf.patch(copy.deepcopy(tiny_model).to(device), "triton")
    vf.patch(model, {"attention": "eager"})
    kinds = {kind for _, kind in patched_modules(model)}
    assert kinds == {"FastViTLayer", "FastWeightStandardizedConv2d", "FastGroupNormActivation", "FastBottleneckLayer"}
    assert attention_implementations(model) == {"eager"}
    vf.patch(model, {"backbone": "torch"})
    assert {kind for _, kind in patched_modules(model)} == {"FastViTLayer"}
    assert attention_implementations(model) == {"eager"}
    vf.unpatch(model)
    assert patched_modules(model) == [] and attention_implementations(model) == {tiny_model.config.attn_implementation}


def test_a_patch_of_a_submodule_is_the_models_too(tiny_model, device):
    """patch(model.vit) kept its record on model.vit: unpatch(model) did nothing, export's unpatched copy
    still held the fast modules, and patch(model) found no reference module left to swap."""
    from vithybrid_fast.export import reference_copy

    model = copy.deepcopy(tiny_model).to(device)
    original = module_tree(model)
    vf.patch(model.vit, "triton")
    encoder_swaps = patched_modules(model)
    assert len(encoder_swaps) == len(patched_modules(model.vit)) > 0
    copied = reference_copy(model, torch.float32)
    assert not [m for m in copied.modules() if type(m).__module__ == "vithybrid_fast.fast"]
    vf.patch(model, "triton")  # undoes the encoder's patch first, then patches the whole model
    assert sorted(patched_modules(model)) == sorted(encoder_swaps)
    vf.unpatch(model)
    assert module_tree(model) == original and patched_modules(model) == []
    vf.patch(model.vit, {"attention": "triton"})
    vf.patch(model.vit.encoder, {"mlp": "triton"})
    vf.unpatch(model)
    assert module_tree(model) == original
    # a layer patched alone, then swapped out by its model's patch: its record comes back with it
    vf.patch(model.vit.encoder.layer[0], {"attention": "triton"})
    vf.patch(model, {"mlp": "triton"})
    vf.unpatch(model)
    assert module_tree(model) == original and patched_modules(model) == []


def test_a_failed_patch_leaves_the_model_as_it_was(tiny_model, device):
    """A failure part-way switched the config to "eager" while the modules still ran SDPA, and the
    families restored before the failure stayed restored."""
    model = vf.patch(copy.deepcopy(tiny_model).to(device), "triton")
    implementation, tree, swaps = model.config.attn_implementation, module_tree(model), patched_modules(model)
    with pytest.raises(ValueError, match=r"put in by vf\.patch on a model enclosing it"):
        vf.patch(model.vit, {"attention": "eager"})  # its attention is model's patch
    assert model.config.attn_implementation == implementation
    assert module_tree(model) == tree and patched_modules(model) == swaps
    # the attention family switches, then the backbone family finds nothing in the encoder: both undone
    encoder = copy.deepcopy(tiny_model).vit.encoder.to(device)
    before = attention_implementations(encoder)
    with pytest.raises(ValueError, match=r"kernels\['backbone'\]='triton': ViTHybridEncoder has no module"):
        vf.patch(encoder, {"attention": "eager" if before == {"sdpa"} else "sdpa", "backbone": "triton"})
    assert attention_implementations(encoder) == before and patched_modules(encoder) == []


def hf_self_attention_classes(model):
    return {type(layer.attention.attention).__name__ for layer in model.vit.encoder.layer}


@pytest.mark.parametrize(("built", "asked"), [("sdpa", "eager"), ("eager", "sdpa")])
def test_transformers_attention_switches_and_unpatch_restores(built, asked):
    hf_model = build_hf_model(PATCH_CONFIG, built)
    twin = build_hf_model(PATCH_CONFIG, asked)  # built with `asked`, given the same weights
    twin.load_state_dict(hf_model.state_dict())
    pixels = pixels_for(hf_model)
    classes = {"eager": {"ViTHybridSelfAttention"}, "sdpa": {"ViTHybridSdpaSelfAttention"}}
    state = {k: v.data_ptr() for k, v in hf_model.state_dict().items()}
    vf.patch(hf_model, asked)
    assert hf_self_attention_classes(hf_model) == classes[asked]
    assert hf_model.config._attn_implementation == asked
    assert {k: v.data_ptr() for k, v in hf_model.state_dict().items()} == state
    with torch.no_grad():
        got, want = hf_model(pixels, output_attentions=True), twin(pixels, output_attentions=True)
    assert (got.logits - want.logits).abs().max().item() <= 1e-5
    # transformers' eager attention returns probabilities; its SDPA attention returns None
    assert (got.attentions[0] is None) == (asked == "sdpa") == (want.attentions[0] is None)
    vf.unpatch(hf_model)
    assert hf_self_attention_classes(hf_model) == classes[built]
    assert hf_model.config._attn_implementation == built


def test_transformers_backbone_only_patch_keeps_attention(device):
    hf_model = build_hf_model(PATCH_CONFIG, "eager").to(device)
    vf.patch(hf_model, {"backbone": "triton"})
    assert hf_self_attention_classes(hf_model) == {"ViTHybridSelfAttention"}
    assert hf_model.config._attn_implementation == "eager"


def test_what_cannot_be_done_is_a_clear_error(tiny_model, device):
    backbone = copy.deepcopy(tiny_model.vit.embeddings.patch_embeddings.backbone).to(device)
    with pytest.raises(ValueError, match="no ViT Hybrid self-attention module"):
        vf.patch(backbone, "sdpa")
    with pytest.raises(ValueError, match=r"kernels\['attention'\]='triton': BitBackbone has no module"):
        vf.patch(backbone, "triton")
    vf.patch(backbone, {"backbone": "triton"})  # what it has works
    assert {kind for _, kind in patched_modules(backbone)} >= {"FastWeightStandardizedConv2d"}


def test_patching_a_model_without_the_families_names_each_class_once():
    """The second audit, on a plain transformers ViT: the error listed ViTHybridSelfAttention twice (ours
    and transformers' share the name) and suggested {'backbone': 'triton'}, a family the model lacked too."""
    transformers = pytest.importorskip("transformers")
    import re

    vit = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                 image_size=32, patch_size=8)  # fmt: skip
    other = transformers.ViTModel(vit)
    with pytest.raises(ValueError) as triton_error:
        vf.patch(other, {"attention": "triton"})
    listed = re.search(r"\(([^)]*)\)", str(triton_error.value)).group(1).split(", ")
    assert listed and len(listed) == len(set(listed)), listed
    with pytest.raises(ValueError, match=r"families: attention, mlp, backbone") as sdpa_error:
        vf.patch(other, "sdpa")
    assert "{'backbone': 'triton'}" not in str(sdpa_error.value)


# -- modules a user changed or hooks: patching must call them, not read their weights (session 20's audit) ----
class LoraLinear(torch.nn.Module):
    """What peft's LoRA puts where an nn.Linear was: the base layer plus a low-rank update."""

    def __init__(self, base: torch.nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        generator = torch.Generator().manual_seed(base.out_features)
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) * 0.3)
        self.lora_b = torch.nn.Parameter(torch.randn(base.out_features, rank, generator=generator) * 0.3)

    @property
    def weight(self) -> torch.Tensor:  # peft exposes the base layer's weight too: a fused path reads it
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.lora_a.T @ self.lora_b.T


@pytest.mark.parametrize("kernels", ["triton", {"attention": "triton"}, {"mlp": "triton"}])
def test_a_lora_wrapped_linear_is_called_not_bypassed(kernels):
    """The fused QKV, LayerNorm+MLP and glue paths read .weight/.bias and dropped the adapters: a patched
    LoRA model gave exactly the base model's logits, silently."""
    model = build_tiny_model()
    pixels = pixels_for(model)
    base = run(model, pixels)
    for layer in model.vit.encoder.layer:
        attention = layer.attention.attention
        attention.query, attention.value = LoraLinear(attention.query), LoraLinear(attention.value)
        layer.intermediate.dense = LoraLinear(layer.intermediate.dense)
    with_lora = run(model, pixels)
    assert (with_lora.logits - base.logits).abs().max().item() > 1e-2  # the adapters matter
    vf.patch(model, kernels)
    assert_same_outputs(run(model, pixels), with_lora, 1e-4, f"patched {kernels} with LoRA")


def test_forward_hooks_keep_firing_after_patch():
    """Hooks on a replaced module (a layer, the stem) and on modules a fused path skips (a query projection,
    the last GroupNorm of a block) went silent after vf.patch."""
    model = build_tiny_model()
    pixels = pixels_for(model)
    layer = model.vit.encoder.layer[0]
    hooked = {
        "layer0": layer,
        "query0": layer.attention.attention.query,
        "fc1_0": layer.intermediate.dense,
        "norm3": next(m for name, m in model.named_modules() if name.endswith("norm3")),
    }
    fired = []
    for name, module in hooked.items():
        module.register_forward_hook(lambda m, args, out, name=name: fired.append(name))
    reference = run(model, pixels)
    assert sorted(set(fired)) == sorted(hooked)
    fired.clear()
    vf.patch(model, "triton")
    assert_same_outputs(run(model, pixels), reference, 1e-4, "patched with hooks")
    assert sorted(set(fired)) == sorted(hooked)


def test_layer_norm_hooks_fire_in_the_autocast_glue_path():
    """Under autocast the layer runs autocast_layer, whose glue kernel replaces both LayerNorms: a hook on
    either made it step aside only in the fp32 paths (one predicate now serves all of them)."""
    from vithybrid_fast.patching import patch_for_autocast

    model = build_tiny_model().train()
    layer = model.vit.encoder.layer[0]
    fired = []
    for name in ("layernorm_before", "layernorm_after"):
        getattr(layer, name).register_forward_hook(lambda m, args, out, name=name: fired.append(name))
    patch_for_autocast(model, "triton", torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(pixels_for(model)).logits.float().sum().backward()
    assert sorted(set(fired)) == ["layernorm_after", "layernorm_before"]
