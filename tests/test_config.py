"""ViTHybridConfig / BitConfig: HF config.json round-trips, the hub preset, clear errors."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

import vithybrid_fast as vf
from tests.hf_reference import TINY_CASES, tiny_config


def test_base_384_preset_is_the_hub_architecture():
    config = vf.ViTHybridConfig.base_384()
    assert config.image_size == 384 and config.layer_norm_eps == 1e-12
    assert config.hidden_size == 768 and config.num_hidden_layers == 12 and config.num_attention_heads == 12
    bb = config.backbone_config
    assert bb.global_padding == "SAME" and bb.layer_type == "bottleneck" and bb.depths == [3, 4, 9]
    assert bb.out_features == ["stage3"] and bb.out_indices == [3]
    assert config.num_labels == 1000
    assert config.id2label[0] == "tench, Tinca tinca" and config.id2label[999].startswith("toilet tissue")
    assert config.backbone_grid(384, 384) == (24, 24) == config.position_grid


def test_roundtrip_through_transformers(tmp_path):
    from transformers import ViTHybridConfig as HFConfig

    ours = vf.ViTHybridConfig.base_384()
    ours.save_pretrained(tmp_path)
    theirs = HFConfig.from_pretrained(tmp_path)
    assert theirs.image_size == 384 and theirs.backbone_config.depths == [3, 4, 9]
    assert theirs.id2label[281] == "tabby, tabby cat"
    theirs.save_pretrained(tmp_path / "hf")
    back = vf.ViTHybridConfig.from_pretrained(tmp_path / "hf")
    for key in ("image_size", "hidden_size", "layer_norm_eps", "backbone_featmap_shape", "qkv_bias"):
        assert getattr(back, key) == getattr(ours, key), key
    assert back.backbone_config.to_dict()["out_features"] == ["stage3"]
    assert back.id2label == ours.id2label


def test_unknown_fields_are_kept_on_roundtrip(tmp_path):
    data = tiny_config(custom_field={"a": 1}, transformers_version="4.26.0.dev0")
    config = vf.ViTHybridConfig.from_dict(data)
    assert config.extra["custom_field"] == {"a": 1}
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["custom_field"] == {"a": 1} and written["transformers_version"] == "4.26.0.dev0"


def test_save_replaces_a_symlinked_config_instead_of_writing_through_it(tmp_path):
    """A hub cache snapshot's config.json is a symlink into the cache's blobs: saving into the snapshot
    wrote through it, changing the cached file every other user reads."""
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    blob.write_text(original := vf.ViTHybridConfig.from_dict(tiny_config()).to_json_string())
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "config.json").symlink_to(blob)
    path = vf.ViTHybridConfig.from_dict(tiny_config(hidden_size=48)).save_pretrained(snapshot)
    assert blob.read_text() == original and not path.is_symlink()
    assert json.loads(path.read_text())["hidden_size"] == 48 and os.listdir(snapshot) == ["config.json"]


def test_transformers_default_config_reads_with_its_defaults():
    from transformers import ViTHybridConfig as HFConfig

    ours = vf.ViTHybridConfig.from_dict(HFConfig().to_dict())
    assert ours.image_size == 224 and ours.backbone_config.global_padding == "SAME"
    assert ours.backbone_config.embedding_dynamic_padding is True


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 50}, "not a multiple of num_attention_heads"),
        ({"hidden_act": "swishy"}, "hidden_act='swishy' is not supported"),
        ({"backbone_featmap_shape": [1, 512, 5, 5]}, "contradict the backbone"),
        ({"backbone_config": {"global_padding": "reflect"}}, "global_padding"),
        ({"backbone_config": {"layer_type": "basic"}}, "layer_type"),
        ({"backbone_config": {"out_features": ["stage9"]}}, "not stages"),
        ({"backbone_config": {"out_features": ["stage2"], "out_indices": [3]}}, "name different stages"),
        ({"backbone_config": {"model_type": "resnet"}}, "model_type"),
        ({"model_type": "vit"}, "model_type"),
        ({"use_timm_backbone": True}, "not supported"),
        ({"problem_type": "ranking"}, "problem_type"),
        ({"num_channels": 1}, "contradicts backbone_config.num_channels"),
    ],
)
def test_contradictory_or_invalid_fields_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        vf.ViTHybridConfig.from_dict(tiny_config(**overrides))


def bb(**fields) -> dict:
    return {"backbone_config": fields}


HW = "must be a positive int or [h, w] of positive ints, got "
# Values of the right JSON syntax and the wrong kind (each once crashed later with an error naming no field,
# or loaded silently wrong): (overrides of tiny_config, the message naming the field).
MALFORMED = [
    ({"patch_size": "1"}, f"patch_size {HW}'1'"),  # once an IndexError from indexing the string
    ({"patch_size": 0}, f"patch_size {HW}0"),  # once a ZeroDivisionError
    ({"patch_size": 6}, "patch_size 6 is larger than the (5, 5) feature map"),  # no patch fits a 5×5 map
    ({"image_size": None}, f"image_size {HW}None"),  # once a TypeError: not subscriptable
    ({"image_size": 72.0}, f"image_size {HW}72.0"),
    ({"image_size": "72"}, f"image_size {HW}'72'"),  # once read silently as 7×2
    ({"image_size": [72]}, f"image_size {HW}[72]"),
    ({"image_size": True}, f"image_size {HW}True"),  # a bool is an int to Python, never a size
    ({"hidden_size": True}, "hidden_size must be a positive int, got True"),
    ({"num_hidden_layers": "2"}, "num_hidden_layers must be a positive int, got '2'"),
    ({"layer_norm_eps": None}, "layer_norm_eps must be a positive number, got None"),  # once float(None)
    ({"layer_norm_eps": "1e-12"}, "layer_norm_eps must be a positive number, got '1e-12'"),  # once failed in forward
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps must be a positive number, got nan"),
    ({"hidden_dropout_prob": None}, "hidden_dropout_prob must be a number in [0, 1), got None"),
    ({"attention_probs_dropout_prob": 1.0}, "attention_probs_dropout_prob must be a number in [0, 1), got 1.0"),
    ({"initializer_range": "0.02"}, "initializer_range must be a number >= 0, got '0.02'"),
    ({"qkv_bias": "false"}, "qkv_bias must be true or false, got 'false'"),  # a non-empty string was truthy
    ({"qkv_bias": 0}, "qkv_bias must be true or false, got 0"),
    ({"return_dict": "yes"}, "return_dict must be true or false, got 'yes'"),
    ({"num_labels": "7"}, "num_labels must be an int >= 0, got '7'"),
    ({"id2label": ["a"] * 7}, "id2label must be an object of class index → name, got list"),
    ({"label2id": {"class_0": None}}, "label2id['class_0']=None is not a valid class index"),
    ({"backbone_featmap_shape": [1, 96, 5, True]}, "backbone_featmap_shape must be a list of positive ints"),
    (bb(drop_path_rate="x"), "backbone_config.drop_path_rate must be a number in [0, 1), got 'x'"),
    (bb(drop_path_rate=1), "backbone_config.drop_path_rate must be a number in [0, 1), got 1"),
    (bb(num_groups=None), "backbone_config.num_groups must be a positive int, got None"),
    (bb(num_groups=True), "backbone_config.num_groups must be a positive int, got True"),
    # 3 divides none of the stem's 16, stage1's 32 (bottleneck 8) or stage2's 64 (bottleneck 16) channels
    (bb(num_groups=3), "backbone_config.num_groups must divide the channels of every GroupNorm, got 3, "
                       "which does not divide [8, 16, 32, 64]"),
    # pre-activation: the final norm over hidden_sizes[-1] exists even past the last stage used
    (bb(layer_type="preactivation", hidden_sizes=[32, 64, 96, 100]),
     "backbone_config.num_groups must divide the channels of every GroupNorm, got 8, which does not divide [100]"),
    (bb(output_stride=7), "backbone_config.output_stride must be a power of two from 4 up, got 7"),
    (bb(output_stride=2), "backbone_config.output_stride must be a power of two from 4 up, got 2"),
    (bb(width_factor=1.5), "backbone_config.width_factor must be a positive int, got 1.5"),
    (bb(embedding_dynamic_padding="true"),
     "backbone_config.embedding_dynamic_padding must be true or false, got 'true'"),
    (bb(depths="121"), "backbone_config.depths must be a list of positive ints, got '121'"),
    (bb(depths=[True, 2, 1]), "backbone_config.depths must be a list of positive ints"),
    (bb(out_features="stage3"), "backbone_config.out_features must be a list of stage names or null, got 'stage3'"),
    (bb(out_features=None, out_indices=3),
     "backbone_config.out_indices must be a list of stage indices or null, got 3"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), MALFORMED)
def test_malformed_values_are_rejected_naming_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        vf.ViTHybridConfig.from_dict(tiny_config(**overrides))


@pytest.mark.parametrize(("overrides", "message"), MALFORMED)
def test_malformed_values_in_a_file_name_the_file_and_the_field(tmp_path, overrides, message):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(**overrides)))
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: .*{re.escape(message)}"):
        vf.ViTHybridConfig.from_pretrained(tmp_path)


def test_an_unforeseen_type_error_still_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(self=1)))  # a key that is a parameter name
    with pytest.raises(ValueError, match=f"^{re.escape(str(tmp_path / 'config.json'))}: .*'self'"):
        vf.ViTHybridConfig.from_json_file(tmp_path / "config.json")


@pytest.mark.parametrize(("overrides", "field", "value"), [
    ({"image_size": [72, 56]}, "image_size_hw", (72, 56)),  # [h, w], as transformers takes it
    ({"image_size": (72, 72), "patch_size": (1, 1)}, "patch_size_hw", (1, 1)),
    ({"hidden_dropout_prob": 0, "layer_norm_eps": 1}, "layer_norm_eps", 1),  # an int where a float is meant
    ({"backbone_config": {"drop_path_rate": 0}}, "backbone_config.drop_path_rate", 0),
    ({"backbone_config": {"output_stride": 64}}, "backbone_config.output_stride", 64),  # beyond the net's stride
    ({"backbone_featmap_shape": [1, 96, 9, 9], "backbone_config": {"output_stride": 8}},
     "backbone_config.output_stride", 8),  # stage3 dilated
    ({"label2id": {f"class_{i}": str(i) for i in range(7)}}, "label2id", {f"class_{i}": i for i in range(7)}),
    ({"num_labels": 7}, "num_labels", 7),
])  # fmt: skip
def test_values_transformers_takes_are_accepted(overrides, field, value):
    config = vf.ViTHybridConfig.from_dict(tiny_config(**overrides))
    for attribute in field.split("."):
        config = getattr(config, attribute)
    assert config == value


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_configs_transformers_writes_are_accepted(tmp_path, case):
    from transformers import ViTHybridConfig as HFConfig

    HFConfig(**TINY_CASES[case]).save_pretrained(tmp_path)
    config = vf.ViTHybridConfig.from_pretrained(tmp_path)
    assert config.defaulted_fields.keys() <= {f"backbone_config.{key}" for key in vf.BitConfig._DEFAULTS}


def test_a_left_out_field_no_weight_shape_shows_is_warned_about(tmp_path, caplog):
    data = tiny_config(hidden_act="gelu")  # hidden_size 48: 12 heads divide it, so only the outputs go wrong
    data.pop("num_attention_heads")
    data.pop("layer_norm_eps")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="vithybrid_fast.config"):
        config = vf.ViTHybridConfig.from_json_file(path)
    assert config.num_attention_heads == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(
        f"{path} does not set num_attention_heads (default 12), layer_norm_eps (default 1e-12)"
    )
    caplog.clear()
    vf.ViTHybridConfig.base_384().save_pretrained(tmp_path)  # every field set: nothing to say
    with caplog.at_level(logging.WARNING, logger="vithybrid_fast.config"):
        vf.ViTHybridConfig.from_json_file(path)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_invalid_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        vf.ViTHybridConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(("dropped", "message"), [
    # a hand-edited file without its backbone: the default BiT backbone contradicts the featmap shape
    ("backbone_config", r"contradict the backbone's stage3 .*\(not in the file, so defaulted: backbone_config\)"),
])  # fmt: skip
def test_config_file_errors_name_the_file_and_the_missing_fields(tmp_path, dropped, message):
    data = vf.ViTHybridConfig.from_dict(tiny_config()).to_dict()
    data["backbone_featmap_shape"][1] = 96  # a small backbone's channels, as in a tiny checkpoint
    data["backbone_config"]["hidden_sizes"] = [16, 32, 96]
    assert vf.ViTHybridConfig.from_dict(data).backbone_featmap_shape[1] == 96  # valid with every field
    data.pop(dropped)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: .*{message}"):
        vf.ViTHybridConfig.from_json_file(path)


def test_label2id_follows_id2label_as_transformers_lets_it(tmp_path, caplog):
    """transformers never checks label2id: `from_pretrained(base, id2label={2 new classes})` then
    `save_pretrained` writes the base model's whole label2id, and a config whose id2label was assigned
    keeps its old label2id. Such files were refused ("label2id['class_2']=2 is not a valid class index")."""
    config = vf.ViTHybridConfig.from_dict(tiny_config())
    config.id2label = {0: "cat", 1: "dog"}  # label2id still names the 7 old classes
    assert config.to_dict()["label2id"] == {"cat": 0, "dog": 1}  # what is written agrees with id2label
    stale = dict(config.to_dict(), label2id={f"class_{i}": i for i in range(7)}, num_labels=7)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(stale))
    with caplog.at_level(logging.WARNING, logger="vithybrid_fast.config"):
        read = vf.ViTHybridConfig.from_json_file(path)
    assert read.id2label == {0: "cat", 1: "dog"} and read.label2id == {"cat": 0, "dog": 1} and read.num_labels == 2
    assert "label2id does not match id2label: rebuilt from id2label" in caplog.text
    assert "num_labels=7 contradicts id2label with 2 entries: id2label's 2 labels are used" in caplog.text
    # a name given twice (ImageNet-1k's "crane", 134 and 517) agrees at either index: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vithybrid_fast.config"):
        twice = vf.ViTHybridConfig.from_dict(tiny_config(id2label={"0": "crane", "1": "crane", "2": "ox"},
                                                         label2id={"crane": 0, "ox": 2}))  # fmt: skip
    assert twice.label2id == {"crane": 0, "ox": 2} and caplog.text == ""


def test_a_checkpoint_whose_labels_were_reassigned_loads(tmp_path):
    config = vf.ViTHybridConfig.from_dict(tiny_config())
    config.id2label = {0: "cat", 1: "dog"}
    model = vf.ViTHybridForImageClassification(config)
    model.save_pretrained(tmp_path)
    loaded = vf.load(tmp_path, kernels="eager")
    assert loaded.config.id2label == {0: "cat", 1: "dog"} and loaded.config.label2id == {"cat": 0, "dog": 1}


def test_case_insensitive_padding_and_out_indices_derivation():
    config = vf.ViTHybridConfig.from_dict(tiny_config(backbone_config={"global_padding": "same", "out_features": None,
                                                                       "out_indices": [3]}))  # fmt: skip
    assert config.backbone_config.global_padding == "SAME"
    assert config.backbone_config.out_features == ["stage3"]


def test_backbone_grid_for_each_padding_mode():
    same = vf.ViTHybridConfig.from_dict(tiny_config())
    assert same.backbone_grid(72, 72) == (5, 5) and same.backbone_grid(400, 333) == (25, 21)
    static = vf.ViTHybridConfig.from_dict(tiny_config(
        image_size=64, backbone_featmap_shape=[1, 96, 4, 4],
        backbone_config={"layer_type": "preactivation", "global_padding": None, "embedding_dynamic_padding": False},
    ))  # fmt: skip
    assert static.backbone_grid(64, 64) == (4, 4)


def test_hub_id_offline_and_uncached_falls_back_to_the_identical_preset(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = vf.ViTHybridConfig.from_pretrained("google/vit-hybrid-base-bit-384", cache_dir=tmp_path)
    assert config == vf.ViTHybridConfig.base_384()
    processor = vf.load_processor("google/vit-hybrid-base-bit-384", cache_dir=tmp_path)
    assert processor.to_dict() == vf.ViTHybridImageProcessor.for_base_384().to_dict()
    with pytest.raises(vf.CheckpointNotFoundError):  # weights have no preset: loading still fails clearly
        vf.load("google/vit-hybrid-base-bit-384", cache_dir=tmp_path)
    with pytest.raises(vf.CheckpointNotFoundError):  # other repos get no fallback
        vf.ViTHybridConfig.from_pretrained("someone/else", cache_dir=tmp_path)
