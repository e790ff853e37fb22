"""`from_pretrained` with transformers' arguments (vithybrid_fast/hf_arguments.py): a fine-tune start written
for transformers 4.47.1 gives here what it gives there — the same config, the same loaded weights, the
same weights started afresh — and every argument we cannot honour is an error, never dropped."""

from __future__ import annotations

import logging

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import randomize_, tiny_config
from vithybrid_fast.loading import CheckpointError

transformers = pytest.importorskip("transformers")
NEW_LABELS = {0: "cat", 1: "dog", 2: "bird"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config()))
    randomize_(model)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return path


def loaded_both(path, **kwargs):
    ours = vf.ViTHybridForImageClassification.from_pretrained(path, kernels="eager", **kwargs)
    hf = transformers.ViTHybridForImageClassification.from_pretrained(path, attn_implementation="eager", **kwargs)
    return ours, hf


def fresh_keys(model, path) -> set[str]:
    """The keys whose values are not the checkpoint's (shape changed, or value)."""
    saved = vf.load(path, kernels="eager").state_dict()
    state = model.state_dict()
    return {k for k, v in state.items() if k not in saved or saved[k].shape != v.shape or not torch.equal(saved[k], v)}


def test_a_new_head_as_transformers_starts_a_finetune(checkpoint, caplog):
    label2id = {name: i for i, name in NEW_LABELS.items()}
    with caplog.at_level(logging.WARNING, logger="vithybrid_fast"):
        ours, hf = loaded_both(
            checkpoint, num_labels=3, id2label=NEW_LABELS, label2id=label2id, ignore_mismatched_sizes=True
        )
    assert ours.config.id2label == hf.config.id2label == NEW_LABELS and ours.config.label2id == label2id
    assert fresh_keys(ours, checkpoint) == fresh_keys(hf, checkpoint) == {"classifier.weight", "classifier.bias"}
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert torch.equal(ours.classifier.bias, torch.zeros(3))  # transformers' initialization
    assert 0.01 < ours.classifier.weight.std().item() < 0.03  # truncated normal, std initializer_range 0.02
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "classifier.weight: checkpoint (7, 48), model (3, 48): newly initialized" in warned
    ours.classifier.load_state_dict(hf.classifier.state_dict())  # the rest is the checkpoint's in both
    pixels = torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels).logits, hf(pixels).logits, rtol=1e-4, atol=1e-4)
    ours.save_pretrained(checkpoint.parent / "restarted")  # and it saves as a checkpoint of the new classes
    assert vf.load(checkpoint.parent / "restarted").config.id2label == NEW_LABELS


def test_num_labels_alone_relabels_as_transformers_does(checkpoint):
    ours, hf = loaded_both(checkpoint, num_labels=3, ignore_mismatched_sizes=True)
    assert ours.config.id2label == hf.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}


def test_a_mismatched_head_without_the_flag_says_what_to_do(checkpoint):
    with pytest.raises(CheckpointError, match=r"classifier.weight: checkpoint \(7, 48\) vs model \(3, 48\).*"
                       r"pass ignore_mismatched_sizes=True"):  # fmt: skip
        vf.ViTHybridForImageClassification.from_pretrained(checkpoint, num_labels=3)


def test_another_input_size_starts_only_the_position_table_afresh(checkpoint):
    change = {"image_size": 96, "backbone_featmap_shape": [1, 96, 6, 6]}  # 72² → 96²: 6×6 tokens, not 5×5
    ours, hf = loaded_both(checkpoint, ignore_mismatched_sizes=True, **change)
    assert fresh_keys(ours, checkpoint) == fresh_keys(hf, checkpoint) == {"vit.embeddings.position_embeddings"}
    assert ours.vit.embeddings.position_embeddings.shape == (1, 37, 48)
    model = vf.load(checkpoint, config=change, ignore_mismatched_sizes=True)  # vf.load takes a dict of fields
    assert model.config.image_size == 96 and fresh_keys(model, checkpoint) == {"vit.embeddings.position_embeddings"}


def test_torch_dtype_attn_implementation_and_config_fields(checkpoint):
    Model = vf.ViTHybridForImageClassification
    model = Model.from_pretrained(checkpoint, torch_dtype=torch.bfloat16, attn_implementation="eager",
                                  hidden_dropout_prob=0.3)  # fmt: skip
    assert model.dtype == torch.bfloat16 and model.config.attn_implementation == "eager"
    assert model.config.hidden_dropout_prob == 0.3 and model.vit.encoder.layer[0].output.dropout.p == 0.3
    assert Model.from_pretrained(checkpoint, torch_dtype="auto").dtype == torch.float32  # config.json's dtype
    assert Model.from_pretrained(checkpoint, attn_implementation="sdpa").config.attn_implementation == "sdpa"
    model = Model.from_pretrained(checkpoint, device_map="cpu", low_cpu_mem_usage=True, trust_remote_code=False)
    assert model.device == torch.device("cpu")
    config = vf.ViTHybridConfig.from_pretrained(checkpoint)
    config.id2label = NEW_LABELS
    model = Model.from_pretrained(checkpoint, config=config, ignore_mismatched_sizes=True)
    assert model.config.id2label == NEW_LABELS and model.classifier.out_features == 3


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"foo": 1}, TypeError, r"unexpected keyword arguments \['foo'\]: it takes vf.load's arguments"),
        ({"subfolder": "model"}, TypeError, "subfolder"),  # not supported: refused, not ignored
        ({"attn_implementation": "flash_attention_2"}, ValueError, "takes 'eager' or 'sdpa'"),
        ({"attn_implementation": "eager", "kernels": "triton"}, ValueError, "disagree"),
        ({"torch_dtype": torch.float16, "dtype": torch.bfloat16}, ValueError, "disagree"),
        ({"device_map": {"": "cpu", "classifier": "cuda"}}, ValueError, "loads on one"),
        ({"device_map": {"": "nope"}}, ValueError, r"device_map=\{'': 'nope'\}: "),
        ({"attn_implementation": "eager", "kernels": {"attention": "sdpa"}}, ValueError, "disagree on the attention"),
        ({"attn_implementation": "eager", "kernels": {"attention": "triton"}}, ValueError, "disagree on the attention"),
        ({"config": {"num_labels": 3}}, TypeError, "config must be a vithybrid_fast.ViTHybridConfig"),
        ({"hidden_dropout_prob": 2.0}, ValueError, "hidden_dropout_prob"),
    ],
)
def test_what_cannot_be_honoured_is_an_error(checkpoint, kwargs, error, message):
    with pytest.raises(error, match=message):
        vf.ViTHybridForImageClassification.from_pretrained(checkpoint, **kwargs)


@pytest.mark.parametrize("device_map", [{"": "cpu"}, {"vit": "cpu", "classifier": "cpu"}, "sequential", "balanced"])
def test_a_device_map_of_one_device_loads_there(checkpoint, device_map):
    """The second audit: {"": "cpu"} was refused as placing modules "on several devices", and "sequential"
    or "balanced" reached torch.device as a device name (transformers 4.47.1 loads all four)."""
    model = vf.ViTHybridForImageClassification.from_pretrained(checkpoint, device_map=device_map)
    assert {p.device.type for p in model.parameters()} == {"cuda" if torch.cuda.is_available() else "cpu"}


def test_attn_implementation_sets_the_attention_beside_a_kernels_dict(checkpoint, monkeypatch):
    """from_pretrained(attn_implementation="eager", kernels={"mlp": "torch"}) ran SDPA: the dict replaced it."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or sdpa(*a, **k)
    )
    for kernels in ({"mlp": "torch"}, {"attention": "torch", "backbone": "torch"}, {"attention": "eager"}):
        model = vf.ViTHybridForImageClassification.from_pretrained(
            checkpoint, attn_implementation="eager", kernels=kernels
        )
        with torch.no_grad():
            model(torch.randn(1, 3, *model.config.image_size_hw))
        assert calls == [] and model.config.attn_implementation == "eager", kernels
    model = vf.ViTHybridForImageClassification.from_pretrained(
        checkpoint, attn_implementation="sdpa", kernels={"mlp": "torch"}
    )
    with torch.no_grad():
        model(torch.randn(1, 3, *model.config.image_size_hw))
    assert calls and model.config.attn_implementation == "sdpa"


def test_num_labels_of_the_same_count_keeps_the_class_names(checkpoint):
    ours, hf = loaded_both(checkpoint, num_labels=7)  # was: LABEL_0… over the checkpoint's names
    assert ours.config.id2label == hf.config.id2label == {i: f"class_{i}" for i in range(7)}


def test_a_config_given_is_copied_not_shared(checkpoint, tmp_path):
    """transformers deep-copies `config=`: the caller's config (often another model's) must not change."""
    other = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config()))
    before = other.config.to_dict()
    model = vf.ViTHybridForImageClassification.from_pretrained(
        checkpoint, config=other.config, attn_implementation="eager", torch_dtype=torch.bfloat16
    )
    model.save_pretrained(tmp_path / "saved")  # writes torch_dtype and architectures into its config
    model.config.id2label = NEW_LABELS
    assert model.config is not other.config and other.config.to_dict() == before
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    (weights_only / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    assert vf.load(weights_only, config=other.config).config is not other.config


def test_auto_dtype_with_a_config_naming_none_is_the_checkpoints(tmp_path):
    torch.manual_seed(0)
    vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).to(torch.bfloat16).save_pretrained(
        tmp_path
    )
    config = vf.ViTHybridConfig.from_dict(tiny_config())
    assert config.torch_dtype is None
    model = vf.ViTHybridForImageClassification.from_pretrained(tmp_path, config=config, torch_dtype="auto")
    assert model.dtype == torch.bfloat16  # config.json's, as transformers reads it from the weights


def test_a_transformers_config_is_refused_with_the_conversion(checkpoint):
    with pytest.raises(TypeError, match=r"got transformers.ViTHybridConfig: convert it with vf.ViTHybridConfig"):
        vf.ViTHybridForImageClassification.from_pretrained(checkpoint, config=transformers.ViTHybridConfig())


def test_a_headless_checkpoint_gets_a_new_head_when_asked(checkpoint, tmp_path):
    headless = tmp_path / "headless"
    vf.ViTHybridModel.from_pretrained(checkpoint).save_pretrained(headless)  # an encoder with no pooler
    with pytest.raises(CheckpointError, match="start one afresh with ignore_mismatched_sizes=True"):
        vf.ViTHybridForImageClassification.from_pretrained(headless, num_labels=3)
    ours, hf = loaded_both(headless, num_labels=3, ignore_mismatched_sizes=True)
    encoder = vf.load(headless, kernels="eager").state_dict()
    for model in (ours, hf):
        state = model.state_dict()
        assert {k for k in state if not k.startswith("vit.")} == {"classifier.weight", "classifier.bias"}
        assert all(torch.equal(state[f"vit.{k}"], v) for k, v in encoder.items())
    assert ours.classifier.out_features == hf.classifier.out_features == 3


def test_an_encoder_of_a_classifier_ignores_the_head_it_drops(checkpoint):
    ours = vf.ViTHybridModel.from_pretrained(checkpoint, num_labels=3)  # no flag needed: the head is not loaded
    hf = transformers.ViTHybridModel.from_pretrained(checkpoint, num_labels=3, add_pooling_layer=False)
    assert ours.state_dict().keys() == hf.state_dict().keys()
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in ours.state_dict().items())


def test_fewer_layers_than_the_checkpoint_leave_the_rest_unused_when_asked(checkpoint):
    with pytest.raises(CheckpointError, match="does not match the config as changed by the arguments given .*"
                       r"unexpected .*pass ignore_mismatched_sizes=True"):  # fmt: skip
        vf.ViTHybridForImageClassification.from_pretrained(checkpoint, num_hidden_layers=1)
    ours, hf = loaded_both(checkpoint, num_hidden_layers=1, ignore_mismatched_sizes=True)
    assert fresh_keys(ours, checkpoint) == fresh_keys(hf, checkpoint) == set()
    assert len(ours.vit.encoder.layer) == len(hf.vit.encoder.layer) == 1


def test_loading_info_is_transformers(checkpoint):
    kwargs = dict(num_labels=3, num_hidden_layers=1, ignore_mismatched_sizes=True, output_loading_info=True)
    (ours, info), (_, hf_info) = loaded_both(checkpoint, **kwargs)
    assert isinstance(ours, vf.ViTHybridForImageClassification)
    assert sorted(info) == sorted(hf_info) == ["error_msgs", "mismatched_keys", "missing_keys", "unexpected_keys"]
    assert sorted(info["unexpected_keys"]) == sorted(hf_info["unexpected_keys"])  # layer 1's weights
    assert info["unexpected_keys"] and info["missing_keys"] == hf_info["missing_keys"] == []
    assert sorted((k, tuple(a), tuple(b)) for k, a, b in info["mismatched_keys"]) == sorted(
        (k, tuple(a), tuple(b)) for k, a, b in hf_info["mismatched_keys"]
    )
    _, strict = vf.ViTHybridForImageClassification.from_pretrained(checkpoint, output_loading_info=True)
    assert strict == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def test_loading_info_of_an_encoder_from_a_classifier_names_the_dropped_head(checkpoint):
    """The second audit: ViTHybridModel.from_pretrained(classifier checkpoint, output_loading_info=True)
    reported no unexpected keys; transformers 4.47.1 names the head it leaves out."""
    _, info = vf.ViTHybridModel.from_pretrained(checkpoint, output_loading_info=True)
    _, hf_info = transformers.ViTHybridModel.from_pretrained(
        checkpoint, add_pooling_layer=False, output_loading_info=True
    )
    assert info["unexpected_keys"] == sorted(hf_info["unexpected_keys"]) == ["classifier.bias", "classifier.weight"]


def test_an_encoder_without_its_pooler(tmp_path):
    torch.manual_seed(0)
    vf.ViTHybridModel(vf.ViTHybridConfig.from_dict(tiny_config())).save_pretrained(tmp_path)  # with a pooler
    ours = vf.ViTHybridModel.from_pretrained(tmp_path, add_pooling_layer=False)
    hf = transformers.ViTHybridModel.from_pretrained(tmp_path, add_pooling_layer=False)
    assert ours.pooler is None and hf.pooler is None and ours.state_dict().keys() == hf.state_dict().keys()
    with torch.no_grad():
        assert ours(torch.randn(1, 3, 72, 72)).pooler_output is None
    with pytest.raises(TypeError, match="add_pooling_layer"):  # a classifier's encoder has no pooler to add
        vf.ViTHybridForImageClassification.from_pretrained(tmp_path, add_pooling_layer=False)


def test_weight_format_and_old_argument_names(checkpoint, tmp_path):
    Model = vf.ViTHybridForImageClassification
    with pytest.raises(vf.CheckpointNotFoundError, match=r"has none of pytorch_model\.bin"):
        Model.from_pretrained(checkpoint, use_safetensors=False)  # a safetensors-only checkpoint
    Model.from_pretrained(checkpoint).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(vf.CheckpointNotFoundError, match=r"has none of model\.safetensors"):
        Model.from_pretrained(tmp_path, use_safetensors=True)
    assert Model.from_pretrained(tmp_path, use_safetensors=False).config.num_labels == 7
    with pytest.warns(FutureWarning, match="use_auth_token is deprecated"):
        Model.from_pretrained(checkpoint, use_auth_token=False, resume_download=True)
