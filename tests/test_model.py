"""Reference model behaviour beyond parity: bad inputs, losses, position interpolation, outputs."""

from __future__ import annotations

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import tiny_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).eval()


def test_wrong_channel_count(model):
    with pytest.raises(ValueError, match="has 1 channels; the model expects 3"):
        model(torch.randn(1, 1, 72, 72))


def test_wrong_rank_and_dtype(model):
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        model(torch.randn(3, 72, 72))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 72, 72, dtype=torch.uint8))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        model([[0.0]])


def test_size_that_does_not_fit_the_position_table(model):
    with pytest.raises(ValueError, match=r"input 96×96 gives a 6×6 feature grid but the position table is 5×5"):
        model(torch.randn(1, 3, 96, 96))


def test_sizes_with_the_same_grid_are_accepted(model):
    # 66..80 all give a 5×5 grid through the stride-16 SAME backbone: no interpolation needed
    with torch.no_grad():
        assert model(torch.randn(1, 3, 66, 80)).logits.shape == (1, 7)


@pytest.mark.parametrize(("height", "width", "grid"), [(96, 96, (6, 6)), (130, 50, (9, 4)), (16, 16, (1, 1))])
def test_interpolate_pos_encoding_targets_the_backbone_grid(model, height, width, grid):
    pixels = torch.randn(2, 3, height, width)
    with torch.no_grad():
        out = model(pixels, interpolate_pos_encoding=True, output_hidden_states=True)
    assert out.hidden_states[0].shape == (2, 1 + grid[0] * grid[1], 48)
    emb = model.vit.embeddings
    table = emb.interpolate_pos_encoding(grid)
    assert table.shape == (1, 1 + grid[0] * grid[1], 48)
    assert torch.equal(table[:, 0], emb.position_embeddings[:, 0])  # CLS position untouched
    expected = torch.nn.functional.interpolate(
        emb.position_embeddings[:, 1:].reshape(1, 5, 5, 48).permute(0, 3, 1, 2), size=grid, mode="bicubic",
        align_corners=False,
    ).permute(0, 2, 3, 1).reshape(1, -1, 48)  # fmt: skip
    assert torch.allclose(table[:, 1:], expected, atol=1e-6)


def test_interpolation_at_native_size_is_identity(model):
    pixels = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        a = model(pixels).logits
        b = model(pixels, interpolate_pos_encoding=True).logits
    assert torch.equal(a, b)


def test_losses_by_problem_type():
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 72, 72)
    single = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).eval()
    labels = torch.tensor([0, 3, 6])
    out = single(pixels, labels=labels)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    assert single.config.problem_type is None  # inferred per call, not written back

    multi_targets = torch.rand(3, 7).round()
    out = single(pixels, labels=multi_targets)  # float targets → multi-label
    assert torch.allclose(out.loss, torch.nn.functional.binary_cross_entropy_with_logits(out.logits, multi_targets))

    regression = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config(id2label={"0": "y"})))
    target = torch.randn(3)
    out = regression(pixels, labels=target)
    assert torch.allclose(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(), target))

    explicit = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config(problem_type="regression")))
    targets = torch.randn(3, 7)
    out = explicit(pixels, labels=targets)
    assert torch.allclose(out.loss, torch.nn.functional.mse_loss(out.logits, targets))


def test_int32_class_indices_and_float_indices_by_mistake():
    """int32 indices failed in cross_entropy ("expected scalar type Long"); float indices are multi-label
    targets by transformers' rule, and their shape error now says why it came to that."""
    torch.manual_seed(0)
    pixels = torch.randn(3, 3, 72, 72)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).eval()
    labels = torch.tensor([0, 3, 6])
    with torch.no_grad():
        expected = model(pixels, labels=labels).loss
        for dtype in (torch.int32, torch.uint8):
            explicit = vf.ViTHybridForImageClassification(model.config.from_dict(
                {**model.config.to_dict(), "problem_type": "single_label_classification"}))  # fmt: skip
            explicit.load_state_dict(model.state_dict())
            assert torch.equal(explicit.eval()(pixels, labels=labels.to(dtype)).loss, expected), dtype
        assert torch.equal(model(pixels, labels=labels.int()).loss, expected)
        with pytest.raises(ValueError, match=r"got \(3,\): torch.float32 labels are read as multi-label .* torch.long"):
            model(pixels, labels=labels.float())


def test_loss_backpropagates_to_every_parameter():
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config()))
    model(torch.randn(2, 3, 72, 72), labels=torch.tensor([1, 2])).loss.backward()
    without_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_grad == []


def test_tuple_outputs_and_indexing(model):
    pixels = torch.randn(1, 3, 72, 72)
    with torch.no_grad():
        out = model(pixels, output_hidden_states=True, output_attentions=True)
        as_tuple = model(pixels, output_hidden_states=True, output_attentions=True, return_dict=False)
    assert torch.equal(out[0], out.logits) and torch.equal(as_tuple[0], out.logits)
    assert len(as_tuple) == 3 and len(as_tuple[1]) == 3 and len(as_tuple[2]) == 2
    assert out.attentions[0].shape == (1, 3, 26, 26)
    assert torch.allclose(out.attentions[0].sum(-1), torch.ones(1, 3, 26))


def test_outputs_answer_mapping_questions_as_transformers_model_output(model):
    """ModelOutput is an OrderedDict of the fields that are set: `"loss" in out` was False here even with
    the loss set (iteration went over the values), and len/items/values/get were missing."""
    from transformers.modeling_outputs import ImageClassifierOutput as HFOutput

    with torch.no_grad():
        out = model(torch.randn(2, 3, 72, 72), labels=torch.tensor([1, 2]))
    theirs = HFOutput(loss=out.loss, logits=out.logits)
    assert ("loss" in out, "logits" in out, "attentions" in out) == (True, True, False)
    assert list(out) == list(theirs) == ["loss", "logits"] and len(out) == len(theirs) == 2
    assert [name for name, _ in out.items()] == list(theirs.keys())
    assert all(a is b for a, b in zip(out.values(), theirs.values()))
    assert out.get("logits") is out.logits and out.get("attentions", "absent") == "absent"
    assert torch.equal(out[1], theirs[1]) and torch.equal(out["loss"], theirs["loss"])
    # a dict, as ModelOutput is: transformers' Trainer reads any other output as a plain tuple
    assert isinstance(out, dict) and isinstance(theirs, dict) and dict(out).keys() == dict(theirs).keys()
    out.loss = None  # fields and items stay one: a field set to None leaves the dict
    assert list(out) == ["logits"] and out[0] is out.logits and "loss" not in out
    out["attentions"] = (out.logits,)
    assert out.attentions[0] is out.logits and list(out) == ["logits", "attentions"]


def test_eager_and_sdpa_agree(model):
    pixels = torch.randn(2, 3, 72, 72)
    with torch.no_grad():
        model.set_attn_implementation("eager")
        eager = model(pixels).logits
        model.set_attn_implementation("sdpa")
        sdpa = model(pixels).logits
    assert (eager - sdpa).abs().max().item() < 1e-5


def test_a_five_dimensional_head_mask_is_taken_as_transformers_takes_it(model):
    """(layers, 1, heads, 1, 1), what transformers' get_head_mask makes, was refused here."""
    pixels = torch.randn(2, 3, 72, 72)
    per_layer = torch.rand(model.config.num_hidden_layers, model.config.num_attention_heads)
    with torch.no_grad():
        expected = model(pixels, head_mask=per_layer).logits
        five = model(pixels, head_mask=per_layer[:, None, :, None, None]).logits
    assert torch.equal(five, expected)


def test_bad_head_mask_shape(model):
    with pytest.raises(ValueError, match="head_mask must be"):
        model(torch.randn(1, 3, 72, 72), head_mask=torch.ones(4))


def test_mask_token_path():
    torch.manual_seed(0)
    base = vf.ViTHybridModel(vf.ViTHybridConfig.from_dict(tiny_config()), use_mask_token=True).eval()
    pixels = torch.randn(1, 3, 72, 72)
    mask = torch.zeros(1, 25, dtype=torch.bool)
    mask[0, :5] = True
    with torch.no_grad():
        masked = base(pixels, bool_masked_pos=mask).last_hidden_state
        plain = base(pixels).last_hidden_state
    assert not torch.allclose(masked, plain)
    with pytest.raises(ValueError, match="use_mask_token"):
        vf.ViTHybridModel(vf.ViTHybridConfig.from_dict(tiny_config()))(pixels, bool_masked_pos=mask)


def test_frozen_reference_caches_standardized_weights_and_follows_changes():
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).eval()
    conv = model.vit.embeddings.patch_embeddings.backbone.bit.embedder.convolution
    pixels = torch.randn(1, 3, 72, 72)
    with torch.inference_mode():
        assert conv.standardized_weight() is not conv.standardized_weight()  # default: recomputed
        vf.freeze(model)
        first = model(pixels).logits
        cached = conv.standardized_weight()
        assert conv.standardized_weight() is cached
    with torch.no_grad():
        conv.weight.add_(torch.randn_like(conv.weight))  # in place (standardization ignores affine edits)
        assert conv.standardized_weight() is not cached
        changed = model(pixels).logits
    assert not torch.allclose(first, changed)
    # frozen weights + an input that needs a gradient (saliency maps): the cached weight, made under
    # inference_mode, must still be usable by autograd
    for p in model.parameters():
        p.requires_grad_(False)
    pixels.requires_grad_(True)
    model(pixels).logits.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
