"""vithybrid_fast.load: local dirs, an offline HF cache, shards, dtypes, and every way a checkpoint can be wrong."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import vithybrid_fast as vf
from tests.hf_reference import TINY_CASES, build_hf_model
from tests.tolerance import assert_close_to_reference

REPO_ID = "google/vit-hybrid-base-bit-384"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hf_model():
    return build_hf_model(TINY_CASES["bottleneck-same"], "eager")


@pytest.fixture
def checkpoint(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path)
    return tmp_path


def logits_of(model, seed=0):
    pixels = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(pixels.to(model.device)).logits.float()


def make_offline_cache(cache_dir, source_dir):
    """The huggingface_hub cache layout: refs/main → snapshot with the files."""
    repo = cache_dir / f"models--{REPO_ID.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source_dir / name, snapshot / name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_loads_by_repo_id_from_offline_cache(tmp_path, checkpoint, hf_model, monkeypatch):
    cache = tmp_path / "hf-cache"
    make_offline_cache(cache, checkpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read at call time, not only at import
    model = vf.load(REPO_ID, kernels="eager", cache_dir=cache)
    expected = logits_of(hf_model)
    assert (logits_of(model) - expected).abs().max().item() <= 1e-4


def test_local_files_only_without_env(tmp_path, checkpoint, monkeypatch):
    cache = tmp_path / "hf-cache"
    make_offline_cache(cache, checkpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    model = vf.load(REPO_ID, kernels="sdpa", cache_dir=cache, local_files_only=True)
    assert model.config.hidden_size == 48


def test_uncached_repo_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(vf.CheckpointNotFoundError, match=r"config\.json"):
        vf.load("someone/not-cached", cache_dir=tmp_path)


def test_sharded_safetensors(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    model = vf.load(tmp_path, kernels="eager")
    assert (logits_of(model) - logits_of(hf_model)).abs().max().item() <= 1e-4


def test_sharded_bin(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, max_shard_size="200KB", safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin.index.json").is_file()
    model = vf.load(tmp_path, kernels="eager")
    assert (logits_of(model) - logits_of(hf_model)).abs().max().item() <= 1e-4


def test_safetensors_preferred_over_bin(checkpoint):
    (checkpoint / "pytorch_model.bin").write_bytes(b"garbage that must never be read")
    assert vf.load(checkpoint, kernels="eager").config.hidden_size == 48


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, "float16", "bf16"])
def test_dtype_conversion(checkpoint, hf_model, dtype):
    model = vf.load(checkpoint, kernels="eager", dtype=dtype)
    want = {"float16": torch.float16, "bf16": torch.bfloat16}.get(dtype, dtype)
    assert all(p.dtype == want for p in model.parameters())
    # float32 pixels are cast to the model dtype. DESIGN.md's tolerance: transformers' model in the same dtype
    # is plain torch's error, both against float64 from the same rounded weights and pixels (it was 10 % of
    # the largest logit)
    pixels = torch.randn(1, 3, 72, 72, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(pixels).logits
        hf_low = copy.deepcopy(hf_model).to(want)
        theirs = hf_low(pixels.to(want)).logits
        reference = hf_low.double()(pixels.to(want).double()).logits
    assert ours.dtype == want
    assert_close_to_reference(ours, theirs, reference, want, what=f"{want} logits")


def test_truncated_safetensors_is_a_clear_error(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(vf.CheckpointError, match="corrupt or truncated"):
        vf.load(checkpoint)


def test_garbage_safetensors_header_is_a_clear_error(checkpoint):
    (checkpoint / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(vf.CheckpointError, match="corrupt or truncated"):
        vf.load(checkpoint)


def test_truncated_bin_is_a_clear_error(tmp_path, hf_model):
    hf_model.save_pretrained(tmp_path, safe_serialization=False)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(vf.CheckpointError, match="corrupt, truncated"):
        vf.load(tmp_path)


class _TouchesAFileWhenUnpickled:
    """Pickled code: unpickling calls Path.touch(marker). A loader that runs it has run a stranger's code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_pickled_code_in_bin_is_refused(tmp_path, checkpoint):
    (checkpoint / "model.safetensors").unlink()
    marker = tmp_path / "code-ran"
    torch.save({"weights": torch.zeros(1), "obj": _TouchesAFileWhenUnpickled(marker)}, checkpoint / "pytorch_model.bin")
    with pytest.raises(vf.CheckpointError, match="not a weights-only checkpoint"):
        vf.load(checkpoint)
    assert not marker.exists()  # refused before anything ran (torch.load(weights_only=False) would touch it)


def test_missing_unexpected_and_misshaped_keys_are_named(checkpoint):
    from safetensors.torch import load_file

    state = load_file(checkpoint / "model.safetensors")
    del state["vit.layernorm.bias"]
    state["vit.extra.weight"] = torch.zeros(3)
    state["classifier.weight"] = torch.zeros(5, 48)
    save_file(state, checkpoint / "model.safetensors")
    with pytest.raises(vf.CheckpointError) as info:
        vf.load(checkpoint)
    message = str(info.value)
    assert "missing (1): vit.layernorm.bias" in message
    assert "unexpected (1): vit.extra.weight" in message
    assert "classifier.weight: checkpoint (5, 48) vs model (7, 48)" in message


def test_config_that_does_not_match_weights(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (checkpoint / "config.json").write_text(json.dumps(config))
    with pytest.raises(vf.CheckpointError, match=r"missing \(16\): vit.encoder.layer.2"):
        vf.load(checkpoint)


def test_missing_weights_or_directory(tmp_path, checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(vf.CheckpointNotFoundError, match=r"none of model\.safetensors"):
        vf.load(checkpoint)
    with pytest.raises(vf.CheckpointNotFoundError, match="no such checkpoint directory"):
        vf.load(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(vf.CheckpointNotFoundError, match=r"has no config\.json"):
        vf.load(tmp_path / "empty")


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"kernels": "fastest"}, ValueError, "choose one of eager, sdpa, triton, auto"),
    ({"kernels": {"attention": "cudnn"}}, ValueError, "kernels\\['attention'\\]"),
    ({"kernels": {"softmax": "triton"}}, ValueError, "unknown kernel families"),
    ({"kernels": {1: "triton", "attn": "x"}}, ValueError, "unknown kernel families 'attn', 1; families are"),
    ({"kernels": None}, TypeError, "kernels=None: choose one of eager, sdpa, triton, auto, or a dict per family"),
    ({"kernels": ["triton"]}, TypeError, "kernels=\\['triton'\\]: choose one of"),
    ({"dtype": torch.int8}, ValueError, "not supported; use torch.float32, .* or torch.float64"),
    # the message lists every name load() takes (float64 included: the upcast reference of checks)
    ({"dtype": "float8"}, ValueError, "not supported; use one of float32, .*bfloat16, bf16, float64, or 'auto'"),
    ({"cuda_graphs": True}, ValueError, "needs device=.cuda."),
])  # fmt: skip
def test_bad_load_arguments(checkpoint, kwargs, error, message):
    with pytest.raises(error, match=message):
        vf.load(checkpoint, **kwargs)


def test_float64_loads_for_plain_torch_and_the_kernels_refuse_it_clearly(checkpoint):
    model = vf.load(checkpoint, kernels="sdpa", dtype="float64")
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    with pytest.raises(TypeError, match=r"support float32, float16 and bfloat16 weights, not torch\.float64"):
        vf.load(checkpoint, kernels="triton", dtype=torch.float64)


def test_float64_with_triton_names_the_dtype_on_a_machine_where_triton_cannot_run_either(checkpoint, monkeypatch):
    """On a GPU machine a CPU model cannot run Triton (no interpreter) and float64 never can: the dtype,
    wrong everywhere, is named first, and before any weight is read (found natively on an H200)."""
    from vithybrid_fast import loading, patching

    monkeypatch.setattr(patching, "triton_can_run", lambda device=None: False)
    monkeypatch.setattr(loading, "read_state_dict", lambda *a, **k: pytest.fail("weights read before the check"))
    with pytest.raises(TypeError, match=r"not torch\.float64"):
        vf.load(checkpoint, kernels="triton", dtype="float64")
    with pytest.raises(RuntimeError):  # a supported dtype still hears about the device
        vf.load(checkpoint, kernels="triton", dtype="float32")


FOLLOW_THE_ADVICE = """
import os, sys, torch
os.environ.pop("TRITON_INTERPRET", None)
import vithybrid_fast as vf
try:
    vf.load(sys.argv[1], kernels="triton", device="cpu")
    raise SystemExit("loaded without a GPU or the interpreter")
except RuntimeError as err:
    assert "TRITON_INTERPRET=1 set before triton is imported" in str(err), err
print("triton imported:", "triton" in sys.modules)
os.environ["TRITON_INTERPRET"] = "1"  # what the error says to do
model = vf.load(sys.argv[1], kernels="triton", device="cpu")
with torch.no_grad():
    print("logits:", tuple(model(torch.randn(1, 3, *model.config.image_size_hw)).logits.shape))
"""


def test_the_triton_errors_advice_can_be_followed_in_the_same_process(checkpoint):
    """The second audit: a failed kernels="triton" load imported triton itself (its check imported the
    kernels package), so setting TRITON_INTERPRET=1 afterwards, as the error advises, loaded a model whose
    forward failed ("0 active drivers")."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU: kernels='triton' loads on cuda")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", FOLLOW_THE_ADVICE, str(checkpoint)], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines() == ["triton imported: False", "logits: (1, 7)"], done.stdout  # 7 labels


def test_cuda_device_without_gpu_is_a_clear_error(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        vf.load(checkpoint, device="cuda")


def test_loaded_model_is_in_eval_mode_and_keys_are_hf_keys(checkpoint, hf_model):
    model = vf.load(checkpoint, kernels="sdpa")
    assert not model.training
    assert list(model.state_dict()) == list(hf_model.state_dict())
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_load_with_a_dtype_logs_no_warning_about_a_config_it_never_loads(checkpoint, caplog):
    """The early dtype check of load() once built a default config to resolve the dtype name, and that
    config's 224 px / 24×24 mismatch warning reached every `classify --dtype` run's stderr (found by CI)."""
    with caplog.at_level(logging.WARNING):
        vf.load(checkpoint, kernels="sdpa", dtype="float32")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_transformers_relabelled_checkpoint_loads(tmp_path, checkpoint):
    """The usual start of a transformers fine-tune: from_pretrained(base, id2label={new classes},
    ignore_mismatched_sizes=True), then save_pretrained. Its config.json keeps the base model's whole
    label2id, which transformers never checks; we refused it."""
    from transformers import ViTHybridForImageClassification as HFModel

    base = vf.load(checkpoint, kernels="eager")
    base.save_pretrained(tmp_path / "base")  # a config.json with its label2id, as the hub's has
    relabelled = HFModel.from_pretrained(tmp_path / "base", id2label={0: "cat", 1: "dog"}, ignore_mismatched_sizes=True)
    relabelled.save_pretrained(tmp_path / "relabelled")
    written = json.loads((tmp_path / "relabelled" / "config.json").read_text())
    assert len(written["id2label"]) == 2 and len(written["label2id"]) > 2  # what transformers writes
    ours = vf.load(tmp_path / "relabelled", kernels="eager")
    assert ours.config.id2label == {0: "cat", 1: "dog"} and ours.config.label2id == {"cat": 0, "dog": 1}
    assert torch.allclose(logits_of(ours), logits_of(relabelled.eval()), atol=1e-5)


def test_argument_mistakes_fail_before_the_weights_are_read(checkpoint, monkeypatch):
    """model_class="ViTHybridModel" (a string) failed only after every weight was read, in isinstance;
    device=0 without a GPU raised torch's "Cannot access accelerator device"."""
    from vithybrid_fast import loading

    monkeypatch.setattr(loading, "read_state_dict", lambda *a, **k: pytest.fail("the weights were read"))
    with pytest.raises(TypeError, match="model_class must be ViTHybridModel or ViTHybridForImageClassification"):
        vf.load(checkpoint, model_class="ViTHybridModel")
    if torch.cuda.is_available():
        assert loading.resolve_device(0) == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match="device cuda:0 requested but no CUDA GPU is available"):
            vf.load(checkpoint, device=0)
