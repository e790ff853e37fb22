"""save_pretrained / from_pretrained in the Hugging Face layout, round-tripped through transformers 4.47.1."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch

import vithybrid_fast as vf
from tests.hf_reference import build_hf_model, randomize_, tiny_config
from vithybrid_fast import saving
from vithybrid_fast.saving import parse_size

transformers = pytest.importorskip("transformers")


def ours_tiny(seed: int = 0) -> vf.ViTHybridForImageClassification:
    torch.manual_seed(seed)
    model = vf.ViTHybridForImageClassification(vf.ViTHybridConfig.from_dict(tiny_config())).eval()
    randomize_(model)
    return model


@pytest.fixture
def pixels() -> torch.Tensor:
    return torch.randn(2, 3, 72, 72, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "max_shard_size, safe, files",
    [
        ("5GB", True, {"model.safetensors"}),  # one file: the tiny model fits
        (60_000, True, {"model.safetensors.index.json"}),  # several shards + index
        ("5GB", False, {"pytorch_model.bin"}),
        ("60KB", False, {"pytorch_model.bin.index.json"}),
    ],
)
def test_ours_saved_loads_in_transformers_and_ours(tmp_path, pixels, max_shard_size, safe, files):
    model = ours_tiny()
    model.save_pretrained(tmp_path, max_shard_size=max_shard_size, safe_serialization=safe)
    names = {p.name for p in tmp_path.iterdir()}
    assert files <= names and "config.json" in names
    if any(name.endswith(".index.json") for name in files):
        index = json.loads((tmp_path / next(iter(files))).read_text())
        assert set(index["weight_map"]) == set(model.state_dict())
        assert len(set(index["weight_map"].values())) > 1
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["ViTHybridForImageClassification"]
    assert config["torch_dtype"] == "float32"
    assert config["id2label"] == {str(i): f"class_{i}" for i in range(7)}

    with torch.no_grad():
        expected = model(pixels).logits
        theirs = transformers.ViTHybridForImageClassification.from_pretrained(tmp_path).eval()(pixels).logits
        reloaded = vf.ViTHybridForImageClassification.from_pretrained(tmp_path, kernels="eager")(pixels).logits
        loaded = vf.load(tmp_path, kernels="sdpa")(pixels).logits
    assert torch.allclose(theirs, expected, atol=1e-5), (theirs - expected).abs().max()
    assert torch.allclose(reloaded, expected, atol=1e-5)
    assert torch.allclose(loaded, expected, atol=1e-5)
    assert transformers.ViTHybridForImageClassification.from_pretrained(tmp_path).config.id2label[3] == "class_3"


def test_transformers_saved_loads_through_from_pretrained(tmp_path, pixels):
    hf = build_hf_model(tiny_config(), attn_implementation="eager")
    hf.save_pretrained(tmp_path, max_shard_size="50KB")  # sharded, as large hub models are
    assert (tmp_path / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        expected = hf(pixels).logits
        ours = vf.ViTHybridForImageClassification.from_pretrained(tmp_path, kernels="eager", dtype="float32")
        assert torch.allclose(ours(pixels).logits, expected, atol=1e-5)
        encoder = vf.ViTHybridModel.from_pretrained(tmp_path, kernels="eager")
        assert type(encoder) is vf.ViTHybridModel
        assert torch.allclose(encoder(pixels).last_hidden_state, hf.vit(pixels).last_hidden_state, atol=1e-5)


def test_headless_checkpoint_is_not_a_classifier(tmp_path):
    ours_tiny().vit.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["ViTHybridModel"]
    assert type(vf.load(tmp_path, kernels="eager")) is vf.ViTHybridModel
    with pytest.raises(vf.CheckpointError, match="without a classification head"):
        vf.ViTHybridForImageClassification.from_pretrained(tmp_path)


def test_resave_replaces_earlier_shards(tmp_path, pixels):
    """A single-file save over a sharded one must not leave the old index behind (it would win on load)."""
    ours_tiny(seed=0).save_pretrained(tmp_path, max_shard_size=60_000)
    model = ours_tiny(seed=1)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with torch.no_grad():
        assert torch.allclose(vf.load(tmp_path, kernels="eager")(pixels).logits, model(pixels).logits, atol=1e-5)


def test_half_precision_save_records_its_dtype(tmp_path):
    model = ours_tiny().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert vf.load(tmp_path, kernels="eager", dtype="auto").dtype == torch.bfloat16


def test_patched_model_saves_the_same_state(tmp_path, pixels, device):
    model = ours_tiny().to(device)  # patched on the device the kernels run on: natively a GPU
    with pytest.warns(UserWarning, match="not 16: this model's attention runs torch SDPA"):  # tiny heads
        vf.patch(model, "triton")
    model.save_pretrained(tmp_path)
    vf.unpatch(model)
    model.cpu()  # beside the checkpoint loaded on the CPU
    with torch.no_grad():
        assert torch.allclose(vf.load(tmp_path, kernels="eager")(pixels).logits, model(pixels).logits, atol=1e-5)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize(
    "umask, expected",
    [
        (0o022, 0o644),  # the usual umask: a shared model directory others can read
        (0o077, 0o600),  # a private umask stays private: the mode follows the umask, it is not forced
        (0o002, 0o664),
    ],
)
@pytest.mark.parametrize("max_shard_size, safe", [("5GB", True), (60_000, True), ("60KB", False)])
def test_saved_files_get_the_umask_mode(tmp_path, umask, expected, max_shard_size, safe):
    """safetensors writes 0600; every file of a save must get the mode a new file gets, like config.json."""
    previous = os.umask(umask)
    try:
        ours_tiny().save_pretrained(tmp_path, max_shard_size=max_shard_size, safe_serialization=safe)
    finally:
        os.umask(previous)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()}
    weights = [name for name in modes if name.endswith((".safetensors", ".bin", ".index.json"))]
    assert len(weights) == 1 if max_shard_size == "5GB" else len(weights) > 2, modes  # shards + index
    assert modes == {name: oct(expected) for name in [*weights, "config.json"]}, modes


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_leftover_temporary_does_not_pass_its_mode_on(tmp_path):
    """A temporary file a crashed save left behind (here 0600) is replaced, not reused with its mode."""
    for name in ("model.safetensors.tmp", "config.json.tmp"):
        (tmp_path / name).write_bytes(b"partial")
        (tmp_path / name).chmod(0o600)
    previous = os.umask(0o022)
    try:
        ours_tiny().save_pretrained(tmp_path)
    finally:
        os.umask(previous)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in tmp_path.iterdir()}
    assert modes == {"model.safetensors": "0o644", "config.json": "0o644"}, modes


def test_bad_save_requests_raise(tmp_path):
    model = ours_tiny()
    with pytest.raises(ValueError, match="max_shard_size"):
        model.save_pretrained(tmp_path, max_shard_size="lots")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        model.save_pretrained(tmp_path / "file")
    model.config.id2label = {0: "only one"}
    model.config.label2id = {"only one": 0}
    with pytest.raises(ValueError, match="classifier has 7 outputs"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()  # refused before anything was written


@pytest.mark.parametrize(
    "size, expected", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1.5KB", 1500), (123, 123), (" 2 gb ", 2 * 10**9)]
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


def test_processor_round_trips_through_transformers(tmp_path):
    processor = vf.ViTHybridImageProcessor.for_base_384()
    processor.save_pretrained(tmp_path)
    theirs = transformers.ViTHybridImageProcessor.from_pretrained(tmp_path)
    theirs.save_pretrained(tmp_path / "back")
    again = vf.load_processor(tmp_path / "back")
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8).permute(1, 2, 0).numpy()
    ours_pixels = again([image], return_tensors="pt")["pixel_values"]
    their_pixels = theirs([image], return_tensors="pt")["pixel_values"]
    assert torch.allclose(ours_pixels, their_pixels, atol=1e-6)


def _failing_at_the_second_weight_file(monkeypatch):
    real, calls = saving._write_weights, []

    def write(path, shard, safe):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(path, shard, safe)

    monkeypatch.setattr(saving, "_write_weights", write)
    return calls


def test_a_save_failing_at_its_second_shard_leaves_the_earlier_checkpoint_as_it_was(tmp_path, pixels, monkeypatch):
    """Shard names repeat between saves: new shard 1 beside old shards 2… under the old index and config.json
    loaded silently as one checkpoint (same keys, same shapes), mixing two models' weights."""
    before = ours_tiny(seed=0)
    before.save_pretrained(tmp_path, max_shard_size=60_000)
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = _failing_at_the_second_weight_file(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        ours_tiny(seed=1).save_pretrained(tmp_path, max_shard_size=60_000)
    assert calls[1].startswith("model-00002-of-") and len(files) > 4  # config, index, shards 1, 2, …
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files  # no staging folder left either
    with torch.no_grad():
        assert torch.allclose(vf.load(tmp_path, kernels="eager")(pixels).logits, before(pixels).logits, atol=1e-5)


def test_a_failed_save_to_a_new_folder_leaves_no_folder(tmp_path, monkeypatch):
    _failing_at_the_second_weight_file(monkeypatch)
    with pytest.raises(OSError, match="No space left"):
        ours_tiny().save_pretrained(tmp_path / "runs" / "best", max_shard_size=60_000)
    assert list(tmp_path.iterdir()) == []
