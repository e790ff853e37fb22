"""vithybrid_fast.load on the checkpoints that go wrong in the field (issue 14, blind spot 8).

Duplicate keys across shards (also through a legacy name), legacy LayerNorm `gamma`/`beta` names in
single-file, .bin and sharded checkpoints, every way a shard index can be bad, and `dtype="auto"`
(the checkpoint's own `torch_dtype`). A checkpoint that loads must give transformers' logits; one
that cannot must raise the package's own error naming what is wrong, never a bare KeyError or a
half-loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import vithybrid_fast as vf
from tests.hf_reference import TINY_CASES, build_hf_model

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(TINY_CASES["bottleneck-same"], "eager")


@pytest.fixture
def sharded(tmp_path, hf_model) -> Path:
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) >= 2
    return tmp_path


def logits_of(model, seed=0) -> torch.Tensor:
    pixels = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(pixels.to(model.dtype)).logits.float()


def _index(directory: Path) -> dict:
    return json.loads((directory / INDEX).read_text())


def _shard_holding(directory: Path, key: str) -> Path:
    return directory / _index(directory)["weight_map"][key]


def _legacy(key: str) -> str:
    """The pre-2020 transformers name of a LayerNorm parameter."""
    return key[: -len("weight")] + "gamma" if key.endswith("weight") else key[: -len("bias")] + "beta"


def _is_layer_norm(key: str) -> bool:
    return "layernorm" in key and key.endswith((".weight", ".bias"))


# -- duplicates -----------------------------------------------------------------------------------
def test_duplicate_key_across_shards_is_refused(sharded):
    shards = sorted(sharded.glob("model-*.safetensors"))
    first, second = load_file(shards[0]), load_file(shards[1])
    key = sorted(first)[0]
    second[key] = first[key].clone()  # the same tensor saved again in another shard
    save_file(second, shards[1])
    with pytest.raises(vf.CheckpointError, match=rf"{key} appears twice.*{shards[0].name}.*{shards[1].name}"):
        vf.load(sharded, kernels="eager")


def test_duplicate_through_a_legacy_name_is_refused(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["vit.layernorm.gamma"] = state["vit.layernorm.weight"] * 2  # which one would win?
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(vf.CheckpointError, match=r"vit\.layernorm\.weight appears twice"):
        vf.load(tmp_path, kernels="eager")


# -- legacy gamma / beta --------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded-safetensors"])
def test_legacy_gamma_beta_names_load(tmp_path, hf_model, layout):
    if layout == "bin":
        hf_model.save_pretrained(tmp_path, safe_serialization=False)
        state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
        torch.save(
            {(_legacy(k) if _is_layer_norm(k) else k): v for k, v in state.items()}, tmp_path / "pytorch_model.bin"
        )
    elif layout == "safetensors":
        hf_model.save_pretrained(tmp_path)
        state = load_file(tmp_path / "model.safetensors")
        save_file(
            {(_legacy(k) if _is_layer_norm(k) else k): v for k, v in state.items()}, tmp_path / "model.safetensors"
        )
    else:
        hf_model.save_pretrained(tmp_path, max_shard_size="200KB")
        for shard in tmp_path.glob("model-*.safetensors"):
            state = load_file(shard)
            save_file({(_legacy(k) if _is_layer_norm(k) else k): v for k, v in state.items()}, shard)
        index = _index(tmp_path)
        index["weight_map"] = {(_legacy(k) if _is_layer_norm(k) else k): v for k, v in index["weight_map"].items()}
        (tmp_path / INDEX).write_text(json.dumps(index))
    renamed = [k for k in hf_model.state_dict() if _is_layer_norm(k)]
    assert len(renamed) == 2 * (2 * 2 + 1)  # two per LayerNorm: 2 layers × (before, after) + the final one

    model = vf.load(tmp_path, kernels="eager")
    assert list(model.state_dict()) == list(hf_model.state_dict())  # today's names
    for key in renamed:
        assert torch.equal(model.state_dict()[key], hf_model.state_dict()[key]), key
    assert (logits_of(model) - logits_of(hf_model)).abs().max().item() <= 1e-4


# -- bad shard indexes ----------------------------------------------------------------------------
def _first_key(directory: Path) -> str:
    return sorted(_index(directory)["weight_map"])[0]


BAD_INDEXES = {
    "not-json": (lambda d: "{not json", vf.CheckpointError, "not a valid shard index"),
    "no-weight-map": (lambda d: json.dumps({"metadata": {}}), vf.CheckpointError, "not a valid shard index"),
    "weight-map-a-list": (lambda d: json.dumps({"weight_map": ["model-00001.safetensors"]}), vf.CheckpointError,
                          "weight_map"),
    "empty-weight-map": (lambda d: json.dumps({"weight_map": {}}), vf.CheckpointError, "weight_map"),
    "shard-outside-checkpoint": (
        lambda d: json.dumps({"weight_map": {**_index(d)["weight_map"], _first_key(d): "../model.safetensors"}}),
        vf.CheckpointError, "not a file name inside the checkpoint",
    ),
    "shard-file-missing": (
        lambda d: json.dumps({"weight_map": {**_index(d)["weight_map"], _first_key(d): "model-00099.safetensors"}}),
        vf.CheckpointNotFoundError, "model-00099.safetensors",
    ),
    "key-in-the-wrong-shard": (
        lambda d: json.dumps({"weight_map": {
            **_index(d)["weight_map"],
            _first_key(d): next(s for s in sorted(set(_index(d)["weight_map"].values()))
                                if s != _index(d)["weight_map"][_first_key(d)]),
        }}),
        vf.CheckpointError, "lists keys its shards do not hold",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_INDEXES))
def test_bad_shard_index_is_a_clear_error(sharded, case):
    content, error, message = BAD_INDEXES[case]
    (sharded / INDEX).write_text(content(sharded))
    with pytest.raises(error, match=message):
        vf.load(sharded, kernels="eager")


def test_key_missing_from_the_index_is_still_read(sharded, hf_model):
    # transformers reads whole shards; a key the index forgot is loaded, not silently dropped
    index = _index(sharded)
    del index["weight_map"][_first_key(sharded)]
    (sharded / INDEX).write_text(json.dumps(index))
    model = vf.load(sharded, kernels="eager")
    assert (logits_of(model) - logits_of(hf_model)).abs().max().item() <= 1e-4


# -- dtype="auto" ---------------------------------------------------------------------------------
def _set_torch_dtype(directory: Path, torch_dtype: str | None) -> None:
    config = json.loads((directory / "config.json").read_text())
    if torch_dtype is None:
        config.pop("torch_dtype", None)
    else:
        config["torch_dtype"] = torch_dtype
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("torch_dtype", "expected"),
    [("float16", torch.float16), ("bfloat16", torch.bfloat16), ("float32", torch.float32), (None, torch.float32)],
)
def test_dtype_auto_takes_the_checkpoint_dtype(tmp_path, hf_model, torch_dtype, expected):
    hf_model.save_pretrained(tmp_path)
    _set_torch_dtype(tmp_path, torch_dtype)
    model = vf.load(tmp_path, kernels="eager", dtype="auto")
    assert {p.dtype for p in model.parameters()} == {expected}
    reference = logits_of(hf_model)
    diff = (logits_of(model) - reference).abs().max().item()
    tol = 1e-4 if expected == torch.float32 else 0.1 * reference.abs().max().item()
    assert diff <= tol, f"dtype auto ({torch_dtype}): logits differ by {diff:.3e}"


def test_explicit_dtype_overrides_the_checkpoint_dtype(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    _set_torch_dtype(tmp_path, "float16")
    assert {p.dtype for p in vf.load(tmp_path, kernels="eager").parameters()} == {torch.float32}  # None: float32
    assert {p.dtype for p in vf.load(tmp_path, kernels="eager", dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_dtype_auto_from_a_half_precision_checkpoint(tmp_path, hf_model):
    """A checkpoint saved in float16 (tensors and config) loads as float16, its values exact."""
    half = build_hf_model(TINY_CASES["bottleneck-same"], "eager").half()
    half.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "float16"
    model = vf.load(tmp_path, kernels="eager", dtype="auto")
    for key, value in half.state_dict().items():
        got = model.state_dict()[key]
        assert got.dtype == torch.float16 and torch.equal(got, value), key


# -- a config.json that leaves out a shape-defining field -----------------------------------------
def _drop_from_config(directory: Path, *keys: str) -> Path:
    """Delete keys ("backbone_config.embedding_size" for a nested one) from a saved config.json."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key in keys:
        *parents, leaf = key.split(".")
        node = config
        for parent in parents:
            node = node[parent]
        del node[leaf]
    path.write_text(json.dumps(config))
    return path


def _load_error(directory: Path) -> str:
    with pytest.raises(vf.CheckpointError) as info:
        vf.load(directory, kernels="eager")
    return str(info.value)


def _shown(message: str, kind: str) -> int:
    """How many keys of one kind (missing, unexpected, mis-shaped) the message lists before "… and N more"."""
    listing = message.split(f"{kind} (", 1)[1].split("): ", 1)[1].split("; ")[0].split(" … and ")[0]
    return listing.count(": checkpoint (") if kind == "mis-shaped" else len(listing.split(", "))


def test_a_config_without_hidden_size_names_the_cause(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    path = _drop_from_config(tmp_path, "hidden_size")
    message = _load_error(tmp_path)
    # the cause leads: which file, which field, and the default that was taken instead
    assert message.startswith(f"{path} does not set hidden_size (so 768 was used)"), message
    # then a short sample of what does not fit, not every one of the ~37 mis-shaped keys
    total = int(message.split("mis-shaped (", 1)[1].split(")", 1)[0])
    assert total > 30
    assert _shown(message, "mis-shaped") == 5
    assert f"… and {total - 5} more" in message
    assert len(message.splitlines()) <= 3 and len(message) < 1200, message


@pytest.mark.parametrize(("dropped", "named"), [
    # 12 layers built for a 2-layer checkpoint: missing keys, not mis-shaped ones
    (["num_hidden_layers"], "num_hidden_layers (so 12 was used)"),
    (["intermediate_size"], "intermediate_size (so 3072 was used)"),
    # transformers writes the whole label map; without it (and num_labels) two labels are assumed
    (["id2label", "label2id"], "id2label or num_labels (so 2 labels were used)"),
    # a backbone field: its weights do not fit
    (["backbone_config.embedding_size"], "backbone_config.embedding_size (so 64 was used)"),
])  # fmt: skip
def test_a_config_without_an_architecture_field_names_it(tmp_path, hf_model, dropped, named):
    hf_model.save_pretrained(tmp_path)
    path = _drop_from_config(tmp_path, *dropped)
    message = _load_error(tmp_path)
    assert message.startswith(f"{path} does not set {named}"), message


def test_the_defaulted_fields_are_recorded_by_the_config(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    complete = vf.ViTHybridConfig.from_pretrained(tmp_path)
    # transformers leaves backbone fields equal to its defaults out; ours are the same defaults
    assert "hidden_size" not in complete.defaulted_fields
    assert complete.config_file == str(tmp_path / "config.json")
    _drop_from_config(tmp_path, "hidden_size", "backbone_config.embedding_size")
    config = vf.ViTHybridConfig.from_pretrained(tmp_path)
    assert config.defaulted_fields["hidden_size"] == 768
    assert config.defaulted_fields["backbone_config.embedding_size"] == 64
    # not part of the config itself: saving writes the values used, and equality ignores it
    assert "defaulted_fields" not in config.to_dict() and "config_file" not in config.to_dict()
    assert vf.ViTHybridConfig.from_dict(config.to_dict()).defaulted_fields == {}


def test_a_genuine_mismatch_with_a_complete_config_makes_no_claim_about_it(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["classifier.weight"] = torch.zeros(5, 48)
    save_file(state, tmp_path / "model.safetensors")
    message = _load_error(tmp_path)
    assert "does not set" not in message, message
    assert "mis-shaped (1): classifier.weight: checkpoint (5, 48) vs model (7, 48)" in message
    assert "more" not in message
    # a checkpoint at odds with its own config.json is broken: no advice to start a fresh head over it
    # (a Python-only flag, which the command line's users were told to pass)
    assert "ignore_mismatched_sizes" not in message, message


def test_a_defaulted_field_that_cannot_explain_the_mismatch_is_not_blamed(tmp_path, hf_model):
    # qkv_bias decides only the attention biases; a wrong classifier is not its doing
    hf_model.save_pretrained(tmp_path)
    _drop_from_config(tmp_path, "qkv_bias")
    state = load_file(tmp_path / "model.safetensors")
    state["classifier.weight"] = torch.zeros(5, 48)
    save_file(state, tmp_path / "model.safetensors")
    message = _load_error(tmp_path)
    assert "does not set" not in message and "qkv_bias" not in message, message


def test_many_mismatches_are_capped(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    reshaped = sorted(k for k, v in state.items() if v.ndim == 2)
    assert len(reshaped) > 10
    for key in reshaped:
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
    for index in range(7):
        state[f"vit.extra.{index}.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors")
    message = _load_error(tmp_path)
    assert "does not set" not in message, message
    assert f"mis-shaped ({len(reshaped)}): " in message
    assert _shown(message, "mis-shaped") == 5
    assert f"… and {len(reshaped) - 5} more" in message
    assert "unexpected (7): " in message and _shown(message, "unexpected") == 5 and "… and 2 more" in message
    assert len(message) < 1200, message
