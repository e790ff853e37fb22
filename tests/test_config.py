"""ViTHybridConfig / BitConfig: HF config.json round-trips, the hub preset, clear errors."""

from __future__ import annotations

import json
import re

import pytest

import vithybrid_fast as vf
from tests.hf_reference import tiny_config


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
        ({"num_labels": 3}, "contradicts id2label"),
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
        ({"label2id": {"x": 42}}, "not a valid class index"),
    ],
)
def test_contradictory_or_invalid_fields_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        vf.ViTHybridConfig.from_dict(tiny_config(**overrides))


def test_invalid_json_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        vf.ViTHybridConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(("dropped", "message"), [
    # a hand-edited file without its backbone: the default BiT backbone contradicts the featmap shape
    ("backbone_config", r"contradict the backbone's stage3 .*\(not in the file, so defaulted: backbone_config\)"),
    # label2id kept, id2label gone: the default two labels cannot hold label2id's indices
    ("id2label", r"is not a valid class index \(not in the file, so defaulted: id2label\)"),
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
